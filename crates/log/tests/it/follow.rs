//! Following readers see every record exactly once, across appends, segment rolls and restarts.

use std::time::Duration;

use kappa_log::{Log, LogError, StartAt};

use crate::{small_segments, values};

/// Follows partition 0 of `t` from `from` until the log closes; returns the values seen.
async fn follow(log: &Log, from: u64) -> (Vec<(u64, Vec<u8>)>, u64) {
    let topic = log.topic("t").unwrap();
    let mut reader = topic
        .partition(0)
        .unwrap()
        .reader(StartAt::Offset(from))
        .unwrap();
    drop(topic);
    let mut seen = Vec::new();
    loop {
        while let Some(chunk) = reader.read(4096).unwrap() {
            for r in chunk.records() {
                let r = r.unwrap();
                seen.push((r.offset, r.value.to_vec()));
            }
        }
        match reader.wait().await {
            Ok(()) => continue,
            Err(LogError::Closed) => {
                // Records that became visible right before the close are still read.
                while let Some(chunk) = reader.read(4096).unwrap() {
                    for r in chunk.records() {
                        let r = r.unwrap();
                        seen.push((r.offset, r.value.to_vec()));
                    }
                }
                return (seen, reader.next_offset());
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sees_every_record_once_across_rolls_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path()).unwrap();
        log.create_topic("t", small_segments()).unwrap();
    }
    let mut seen = Vec::new();
    let mut next = 0;
    let mut expected = Vec::new();
    for round in 0..4 {
        let log = std::sync::Arc::new(Log::open(dir.path()).unwrap());
        let follower = {
            let log = log.clone();
            tokio::spawn(async move { follow(&log, next).await })
        };
        let topic = log.topic("t").unwrap();
        for burst in 0..25 {
            let batch = values(&format!("r{round}b{burst}"), burst % 4 + 1);
            expected.extend(batch.iter().map(|r| r.value.to_vec()));
            topic.append(batch).await.unwrap();
            if burst % 5 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        drop(topic);
        log.close().unwrap();
        let (got, resume) = follower.await.unwrap();
        seen.extend(got);
        next = resume;
    }
    let offsets: Vec<u64> = seen.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (0..expected.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        seen.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        expected
    );
    let log = Log::open(dir.path()).unwrap();
    assert!(
        log.topic("t")
            .unwrap()
            .partition(0)
            .unwrap()
            .stats()
            .segment_count
            > 3
    );
}

#[tokio::test]
async fn a_reader_at_the_end_wakes_on_the_next_append() {
    let dir = tempfile::tempdir().unwrap();
    let log = std::sync::Arc::new(Log::open(dir.path()).unwrap());
    let topic = log.create_topic("t", small_segments()).unwrap();
    topic.append(values("old", 3)).await.unwrap();
    let mut reader = topic.partition(0).unwrap().reader(StartAt::End).unwrap();
    assert_eq!(reader.next_offset(), 3);
    assert!(reader.read(4096).unwrap().is_none());
    let waiter = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(10), reader.wait())
            .await
            .unwrap()
            .unwrap();
        let chunk = reader.read(4096).unwrap().unwrap();
        chunk
            .records()
            .map(|r| r.unwrap().value.to_vec())
            .collect::<Vec<_>>()
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    topic.append(values("new", 2)).await.unwrap();
    assert_eq!(
        waiter.await.unwrap(),
        vec![b"new-0".to_vec(), b"new-1".to_vec()]
    );
}
