use std::sync::Arc;

use kappa_log::{FsyncPolicy, Log, LogError, LogOptions, Record, TopicConfig};
use kappa_testkit::storage::InstrumentedStorage;

use crate::{all_values, values};

fn open(dir: &std::path::Path, storage: &InstrumentedStorage) -> Log {
    Log::open_with(
        dir,
        LogOptions {
            storage: Arc::new(storage.clone()),
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn concurrent_appends_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let storage = InstrumentedStorage::new();
    let log = open(dir.path(), &storage);
    let topic = log.create_topic("t", TopicConfig::default()).unwrap();
    let syncs_before = storage.data_syncs();
    let producers = 32;
    let appends_each = 50;
    std::thread::scope(|s| {
        for p in 0..producers {
            let topic = topic.clone();
            s.spawn(move || {
                for i in 0..appends_each {
                    topic
                        .append_blocking(vec![Record::from_value(format!("{p}-{i}"))])
                        .unwrap();
                }
            });
        }
    });
    let appends = producers * appends_each;
    let syncs = storage.data_syncs() - syncs_before;
    assert_eq!(all_values(&log, "t", 0).len(), appends as usize);
    // Every append was acknowledged only after an fsync, and fsyncs were shared.
    assert!(syncs >= 1);
    assert!(
        syncs < appends as u64,
        "{syncs} fsyncs for {appends} appends: no group commit"
    );
}

#[test]
fn fsync_always_syncs_before_every_acknowledgement() {
    let dir = tempfile::tempdir().unwrap();
    let storage = InstrumentedStorage::new();
    let log = open(dir.path(), &storage);
    let topic = log.create_topic("t", TopicConfig::default()).unwrap();
    for i in 0..20 {
        let before = storage.data_syncs();
        topic.append_blocking(values(&format!("a{i}"), 1)).unwrap();
        assert!(
            storage.data_syncs() > before,
            "append {i} acknowledged without an fsync"
        );
        let offsets = topic.partition(0).unwrap().offsets();
        assert_eq!(offsets.durable_offset, offsets.appended_offset);
    }
}

#[tokio::test]
async fn interval_policy_acknowledges_before_fsync_and_syncs_soon_after() {
    let dir = tempfile::tempdir().unwrap();
    let storage = InstrumentedStorage::new();
    let log = open(dir.path(), &storage);
    let config = TopicConfig {
        fsync: FsyncPolicy::Interval { interval_ms: 200 },
        ..TopicConfig::default()
    };
    let topic = log.create_topic("t", config).unwrap();
    let before = storage.data_syncs();
    topic.append(values("x", 5)).await.unwrap();
    let offsets = topic.partition(0).unwrap().offsets();
    assert_eq!(
        offsets.visible_offset, 5,
        "acknowledged records are visible"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while topic.partition(0).unwrap().offsets().durable_offset < 5 {
        assert!(std::time::Instant::now() < deadline, "never fsynced");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(storage.data_syncs() > before);
}

#[tokio::test]
async fn interval_policy_acknowledges_without_an_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let storage = InstrumentedStorage::new();
    let log = open(dir.path(), &storage);
    let config = TopicConfig {
        fsync: FsyncPolicy::Interval {
            interval_ms: 3_600_000,
        },
        ..TopicConfig::default()
    };
    let topic = log.create_topic("t", config).unwrap();
    let partition = topic.partition(0).unwrap();
    let before = storage.data_syncs();
    partition.append(&values("x", 5)).await.unwrap();
    assert_eq!(
        storage.data_syncs(),
        before,
        "acknowledged before any fsync"
    );
    let offsets = partition.offsets();
    assert_eq!((offsets.visible_offset, offsets.durable_offset), (5, 0));
    partition.sync().unwrap();
    assert!(storage.data_syncs() > before);
    assert_eq!(partition.offsets().durable_offset, 5);
}

#[tokio::test]
async fn a_failed_write_is_never_acknowledged_and_leaves_no_partial_batch() {
    let dir = tempfile::tempdir().unwrap();
    let storage = InstrumentedStorage::new();
    {
        let log = open(dir.path(), &storage);
        let topic = log.create_topic("t", TopicConfig::default()).unwrap();
        topic.append(values("good", 10)).await.unwrap();
        storage.fail_syncs(true);
        let err = topic.append(values("bad", 3)).await.unwrap_err();
        assert!(matches!(err, LogError::WriterFailed { .. }), "{err}");
        assert!(err.to_string().contains("injected EIO"), "{err}");
        // Once failed, the partition refuses appends until it is reopened.
        storage.fail_syncs(false);
        assert!(matches!(
            topic.append(values("later", 1)).await,
            Err(LogError::WriterFailed { .. })
        ));
        assert_eq!(topic.partition(0).unwrap().offsets().visible_offset, 10);
    }
    storage.fail_writes(false);
    let log = open(dir.path(), &storage);
    let got = all_values(&log, "t", 0);
    // The 10 acknowledged records are there; the failed append is wholly there or wholly not.
    assert!(got.len() == 10 || got.len() == 13, "{} records", got.len());
    for (i, (offset, value)) in got.iter().take(10).enumerate() {
        assert_eq!(*offset, i as u64);
        assert_eq!(value, format!("good-{i}").as_bytes());
    }
    let topic = log.topic("t").unwrap();
    topic.append(values("again", 1)).await.unwrap();
}

#[tokio::test]
async fn a_failed_write_before_it_reaches_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let storage = InstrumentedStorage::new();
    {
        let log = open(dir.path(), &storage);
        let topic = log.create_topic("t", TopicConfig::default()).unwrap();
        topic.append(values("good", 4)).await.unwrap();
        storage.fail_writes(true);
        assert!(topic.append(values("bad", 2)).await.is_err());
        storage.fail_writes(false);
    }
    let log = open(dir.path(), &storage);
    assert_eq!(all_values(&log, "t", 0).len(), 4);
}
