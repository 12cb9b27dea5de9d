use std::sync::Arc;

use kappa_log::{Log, LogError, LogOptions, StartAt, TopicConfig};
use kappa_testkit::clock::ManualClock;

use crate::{drain, small_segments, values};

fn open(dir: &std::path::Path, clock: &ManualClock) -> Log {
    let options = LogOptions {
        clock: Arc::new(clock.clone()),
        retention_check_interval_ms: u64::MAX / 2,
        ..Default::default()
    };
    Log::open_with(dir, options).unwrap()
}

#[tokio::test]
async fn time_retention_deletes_only_old_sealed_segments() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000_000_000);
    let log = open(dir.path(), &clock);
    let config = TopicConfig {
        retention_ms: Some(60_000),
        ..small_segments()
    };
    let topic = log.create_topic("t", config).unwrap();
    for i in 0..50 {
        topic.append(values(&format!("old{i}"), 3)).await.unwrap();
    }
    clock.advance_ms(120_000);
    for i in 0..50 {
        topic.append(values(&format!("new{i}"), 3)).await.unwrap();
    }
    let partition = topic.partition(0).unwrap();
    let before = partition.stats();
    partition.enforce_retention().unwrap();
    let after = partition.stats();
    assert!(after.segment_count < before.segment_count);
    let start = after.offsets.start_offset;
    assert!(start > 0 && start <= 150, "start offset {start}");
    // Every record still kept is readable; the newest were all kept.
    let mut reader = partition.reader(StartAt::Beginning).unwrap();
    let got = drain(&mut reader);
    assert_eq!(got.first().unwrap().0, start);
    assert_eq!(got.len() as u64, 300 - start);
    // A reader positioned before the start offset gets a clear error.
    let err = partition.reader(StartAt::Offset(0)).unwrap_err();
    assert!(
        matches!(err, LogError::OffsetOutOfRange { requested: 0, .. }),
        "{err}"
    );
    // The deletion survives a reopen.
    drop(topic);
    drop(log);
    let log = open(dir.path(), &clock);
    assert_eq!(
        log.topic("t")
            .unwrap()
            .partition(0)
            .unwrap()
            .offsets()
            .start_offset,
        start
    );
}

#[tokio::test]
async fn size_retention_keeps_the_partition_under_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000_000_000);
    let log = open(dir.path(), &clock);
    let config = TopicConfig {
        retention_bytes: Some(8 * 1024),
        ..small_segments()
    };
    let topic = log.create_topic("t", config).unwrap();
    for i in 0..200 {
        topic.append(values(&format!("r{i}"), 2)).await.unwrap();
    }
    let partition = topic.partition(0).unwrap();
    partition.enforce_retention().unwrap();
    let stats = partition.stats();
    let active_max = 2048;
    assert!(stats.size_bytes <= 8 * 1024 + active_max, "{stats:?}");
    assert!(
        stats.size_bytes >= 8 * 1024,
        "deleted more than needed: {stats:?}"
    );
    assert_eq!(stats.offsets.visible_offset, 400);
}

#[tokio::test]
async fn no_retention_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000_000_000);
    let log = open(dir.path(), &clock);
    let topic = log.create_topic("t", small_segments()).unwrap();
    topic.append(values("x", 500)).await.unwrap();
    clock.advance_ms(10 * 365 * 24 * 3600 * 1000);
    let partition = topic.partition(0).unwrap();
    partition.enforce_retention().unwrap();
    assert_eq!(partition.offsets().start_offset, 0);
}

#[tokio::test]
async fn a_reader_past_a_deleted_segment_reads_on() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000_000_000);
    let log = open(dir.path(), &clock);
    let config = TopicConfig {
        retention_ms: Some(60_000),
        ..small_segments()
    };
    let topic = log.create_topic("t", config).unwrap();
    for i in 0..60 {
        topic.append(values(&format!("old{i}"), 3)).await.unwrap();
    }
    let partition = topic.partition(0).unwrap();
    let active_base: u64 = std::fs::read_dir(dir.path().join("t/0"))
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()?
                .strip_suffix(".log")
                .map(|b| b.parse::<u64>().unwrap())
        })
        .max()
        .unwrap();
    assert!(active_base > 0);
    // Read one batch at a time up to the end of the last sealed segment: the reader still has
    // that segment open when retention deletes it.
    let mut reader = partition.reader(StartAt::Beginning).unwrap();
    while reader.next_offset() < active_base {
        reader.read(1).unwrap().unwrap();
    }
    assert_eq!(reader.next_offset(), active_base);
    clock.advance_ms(120_000);
    for i in 0..30 {
        topic.append(values(&format!("new{i}"), 3)).await.unwrap();
    }
    partition.enforce_retention().unwrap();
    assert_eq!(
        partition.offsets().start_offset,
        active_base,
        "every old sealed segment is deleted"
    );
    let rest = drain(&mut reader);
    assert_eq!(
        rest.first().unwrap().0,
        active_base,
        "continues exactly where it stopped"
    );
    assert_eq!(rest.last().unwrap().0, 269);
}
