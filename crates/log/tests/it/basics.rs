use bytes::Bytes;
use kappa_log::{Header, Log, LogError, Record, StartAt, TopicConfig};

use crate::{all_values, drain, small_segments, values};

#[tokio::test]
async fn offsets_are_dense_per_partition_and_keys_pick_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path()).unwrap();
    let topic = log
        .create_topic(
            "orders",
            TopicConfig {
                partitions: 3,
                ..TopicConfig::default()
            },
        )
        .unwrap();
    let mut records = Vec::new();
    for i in 0..60 {
        records.push(Record::keyed(
            format!("customer-{}", i % 7),
            format!("v{i}"),
        ));
    }
    let placed = topic.append(records.clone()).await.unwrap();
    for (record, place) in records.iter().zip(&placed) {
        assert_eq!(place.partition, topic.partition_for(record.key.as_deref()));
    }
    for p in 0..3 {
        let offsets: Vec<u64> = placed
            .iter()
            .filter(|x| x.partition == p)
            .map(|x| x.offset)
            .collect();
        assert_eq!(
            offsets,
            (0..offsets.len() as u64).collect::<Vec<_>>(),
            "partition {p}"
        );
        let stored = all_values(&log, "orders", p);
        assert_eq!(stored.len(), offsets.len());
    }
    // Same key, same partition, in order.
    let p = topic.partition_for(Some(b"customer-3"));
    let mine: Vec<Vec<u8>> = all_values(&log, "orders", p)
        .into_iter()
        .map(|(_, v)| v)
        .filter(|v| {
            let i: usize = std::str::from_utf8(&v[1..]).unwrap().parse().unwrap();
            i % 7 == 3
        })
        .collect();
    let expected: Vec<Vec<u8>> = (0..60)
        .filter(|i| i % 7 == 3)
        .map(|i| format!("v{i}").into_bytes())
        .collect();
    assert_eq!(mine, expected);
}

#[tokio::test]
async fn records_without_key_go_round_robin() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path()).unwrap();
    let topic = log
        .create_topic(
            "t",
            TopicConfig {
                partitions: 4,
                ..TopicConfig::default()
            },
        )
        .unwrap();
    topic.append(values("x", 40)).await.unwrap();
    for p in 0..4 {
        assert_eq!(topic.partition(p).unwrap().offsets().visible_offset, 10);
    }
}

#[tokio::test]
async fn keys_headers_and_timestamps_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path()).unwrap();
    let topic = log.create_topic("t", TopicConfig::default()).unwrap();
    let record = Record {
        key: Some(Bytes::from_static(b"k")),
        value: Bytes::from_static(b"{}"),
        headers: vec![
            Header {
                key: "trace".into(),
                value: Some(Bytes::from_static(b"abc")),
            },
            Header {
                key: "empty".into(),
                value: None,
            },
        ],
    };
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    topic
        .append(vec![record.clone(), Record::from_value("plain")])
        .await
        .unwrap();
    let mut reader = topic
        .partition(0)
        .unwrap()
        .reader(StartAt::Beginning)
        .unwrap();
    let chunk = reader.read(4096).unwrap().unwrap();
    let got: Vec<_> = chunk.records().map(|r| r.unwrap()).collect();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].key, Some(&b"k"[..]));
    assert_eq!(got[0].headers.to_owned_headers(), record.headers);
    assert_eq!(got[1].key, None);
    assert!(got[0].timestamp_ms >= before);
    assert!(got[1].timestamp_ms >= got[0].timestamp_ms);
}

#[tokio::test]
async fn reads_start_at_any_offset_across_segment_rolls() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path()).unwrap();
    let topic = log.create_topic("t", small_segments()).unwrap();
    // Appends of 1..=5 records, so batches have different sizes and offsets fall mid-batch.
    let mut n = 0;
    for i in 0..120 {
        let count = i % 5 + 1;
        topic
            .append(
                (0..count)
                    .map(|j| Record::from_value(format!("value-{}", n + j)))
                    .collect(),
            )
            .await
            .unwrap();
        n += count;
    }
    let partition = topic.partition(0).unwrap();
    assert!(
        partition.stats().segment_count > 3,
        "{:?}",
        partition.stats()
    );
    for start in [0, 1, 7, 63, 64, 65, 200, n - 1, n] {
        let mut reader = partition.reader(StartAt::Offset(start as u64)).unwrap();
        let got = drain(&mut reader);
        let expected: Vec<(u64, Vec<u8>)> = (start..n)
            .map(|i| (i as u64, format!("value-{i}").into_bytes()))
            .collect();
        assert_eq!(got, expected, "from offset {start}");
    }
    // Small max_bytes still makes progress, one batch at a time.
    let mut reader = partition.reader(StartAt::Beginning).unwrap();
    let mut count = 0;
    while let Some(chunk) = reader.read(1).unwrap() {
        count += chunk.record_count();
    }
    assert_eq!(count, n as u64);
    // Reopened, the sealed segments' indexes are used and the same reads hold.
    drop(topic);
    log.close().unwrap();
    drop(log);
    let log = Log::open(dir.path()).unwrap();
    assert!(
        log.recovery_events().is_empty(),
        "{:?}",
        log.recovery_events()
    );
    let got = all_values(&log, "t", 0);
    assert_eq!(got.len(), n);
    let topic = log.topic("t").unwrap();
    let placed = topic.append(values("after", 1)).await.unwrap();
    assert_eq!(placed[0].offset, n as u64);
}

#[tokio::test]
async fn reads_from_a_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let clock = kappa_testkit::clock::ManualClock::new(1_000_000);
    let options = kappa_log::LogOptions {
        clock: std::sync::Arc::new(clock.clone()),
        ..Default::default()
    };
    let log = Log::open_with(dir.path(), options).unwrap();
    let topic = log.create_topic("t", small_segments()).unwrap();
    for i in 0..100u64 {
        clock.set_ms(1_000_000 + (i as i64) * 10);
        topic
            .append(vec![Record::from_value(format!("v{i}"))])
            .await
            .unwrap();
    }
    let partition = topic.partition(0).unwrap();
    assert_eq!(partition.offset_for_timestamp(0).unwrap(), 0);
    assert_eq!(partition.offset_for_timestamp(1_000_000).unwrap(), 0);
    assert_eq!(partition.offset_for_timestamp(1_000_001).unwrap(), 1);
    assert_eq!(partition.offset_for_timestamp(1_000_500).unwrap(), 50);
    assert_eq!(partition.offset_for_timestamp(1_000_990).unwrap(), 99);
    assert_eq!(partition.offset_for_timestamp(2_000_000).unwrap(), 100);
    let mut reader = partition.reader(StartAt::Timestamp(1_000_955)).unwrap();
    let got = drain(&mut reader);
    assert_eq!(got.first().unwrap().0, 96);
    assert_eq!(got.len(), 4);
    // A clock that goes backwards does not make timestamps go backwards.
    clock.set_ms(5);
    topic.append(values("late", 1)).await.unwrap();
    let mut reader = partition.reader(StartAt::Offset(100)).unwrap();
    let chunk = reader.read(4096).unwrap().unwrap();
    assert_eq!(
        chunk.records().next().unwrap().unwrap().timestamp_ms,
        1_000_990
    );
}

#[tokio::test]
async fn errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path()).unwrap();
    log.create_topic("orders", TopicConfig::default()).unwrap();
    log.create_topic("payments", TopicConfig::default())
        .unwrap();
    let err = log.topic("order").unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown topic `order`; topics are: orders, payments"
    );
    assert!(matches!(
        log.create_topic("orders", TopicConfig::default()),
        Err(LogError::TopicExists { .. })
    ));
    assert!(matches!(
        log.create_topic("../x", TopicConfig::default()),
        Err(LogError::InvalidTopicName { .. })
    ));
    assert!(matches!(
        log.create_topic(
            "x",
            TopicConfig {
                partitions: 0,
                ..TopicConfig::default()
            }
        ),
        Err(LogError::InvalidConfig { .. })
    ));
    let topic = log.topic("orders").unwrap();
    assert!(matches!(
        topic.partition(3),
        Err(LogError::UnknownPartition { .. })
    ));
    let err = topic
        .partition(0)
        .unwrap()
        .reader(StartAt::Offset(5))
        .unwrap_err();
    assert!(
        matches!(
            err,
            LogError::OffsetOutOfRange {
                requested: 5,
                visible_offset: 0,
                ..
            }
        ),
        "{err}"
    );
    let huge = Record::from_value(vec![0u8; kappa_log::limits::RECORD_BYTES_MAX + 1]);
    assert!(matches!(
        topic.append(vec![Record::from_value("ok"), huge]).await,
        Err(LogError::RecordTooLarge { .. })
    ));
    assert_eq!(
        topic.partition(0).unwrap().offsets().visible_offset,
        0,
        "a rejected append writes nothing"
    );
    // A second process (here: a second open) cannot take the same directory.
    assert!(matches!(
        Log::open(dir.path()),
        Err(LogError::Locked { .. })
    ));
}

#[test]
fn blocking_appends_work_outside_a_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path()).unwrap();
    let topic = log
        .create_topic(
            "t",
            TopicConfig {
                partitions: 2,
                ..TopicConfig::default()
            },
        )
        .unwrap();
    let placed = topic.append_blocking(values("b", 10)).unwrap();
    assert_eq!(placed.len(), 10);
    assert_eq!(
        all_values(&log, "t", 0).len() + all_values(&log, "t", 1).len(),
        10
    );
}

#[tokio::test]
async fn segments_roll_by_age_at_the_next_append() {
    let dir = tempfile::tempdir().unwrap();
    let clock = kappa_testkit::clock::ManualClock::new(1_000_000);
    let options = kappa_log::LogOptions {
        clock: std::sync::Arc::new(clock.clone()),
        ..Default::default()
    };
    let log = Log::open_with(dir.path(), options).unwrap();
    let config = TopicConfig {
        segment_ms_max: 60_000,
        ..TopicConfig::default()
    };
    let topic = log.create_topic("t", config).unwrap();
    let partition = topic.partition(0).unwrap();
    topic.append(values("a", 2)).await.unwrap();
    clock.advance_ms(59_999);
    topic.append(values("b", 2)).await.unwrap();
    assert_eq!(
        partition.stats().segment_count,
        1,
        "younger than segment_ms_max: no roll"
    );
    clock.advance_ms(1);
    topic.append(values("c", 2)).await.unwrap();
    assert_eq!(
        partition.stats().segment_count,
        2,
        "the first append past the age rolls"
    );
    let got: Vec<u64> = all_values(&log, "t", 0)
        .into_iter()
        .map(|(o, _)| o)
        .collect();
    assert_eq!(got, (0..6).collect::<Vec<_>>());
}

#[tokio::test]
async fn timestamps_never_go_back_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = kappa_testkit::clock::ManualClock::new(5_000_000);
    let options = || kappa_log::LogOptions {
        clock: std::sync::Arc::new(clock.clone()),
        ..Default::default()
    };
    {
        let log = Log::open_with(dir.path(), options()).unwrap();
        let config = TopicConfig {
            segment_ms_max: 1,
            ..TopicConfig::default()
        };
        let topic = log.create_topic("t", config).unwrap();
        topic.append(values("a", 1)).await.unwrap();
        clock.advance_ms(10);
        topic.append(values("b", 1)).await.unwrap();
    }
    clock.set_ms(1_000);
    let log = Log::open_with(dir.path(), options()).unwrap();
    let topic = log.topic("t").unwrap();
    let ack = topic
        .partition(0)
        .unwrap()
        .append(&values("c", 1))
        .await
        .unwrap();
    assert_eq!(ack.timestamp_ms, 5_000_010);
}

#[test]
fn an_append_never_straddles_a_segment_roll() {
    // Each append is six 15 MiB records: two batches (64 MiB at most each), more than a
    // 70 MiB segment holds.
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path()).unwrap();
    let config = TopicConfig {
        segment_bytes_max: 70 << 20,
        ..TopicConfig::default()
    };
    let topic = log.create_topic("t", config).unwrap();
    let big = bytes::Bytes::from(vec![b'x'; 15 << 20]);
    for _ in 0..3 {
        let append: Vec<Record> = (0..6).map(|_| Record::from_value(big.clone())).collect();
        topic
            .partition(0)
            .unwrap()
            .append_blocking(&append)
            .unwrap();
    }
    let mut bases: Vec<u64> = std::fs::read_dir(dir.path().join("t/0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| p.file_stem().unwrap().to_str().unwrap().parse().unwrap())
        .collect();
    bases.sort();
    assert_eq!(
        bases,
        vec![0, 6, 12],
        "segments must start at append boundaries"
    );
}
