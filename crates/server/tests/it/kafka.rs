//! Ingest and consume on a Kafka cluster (a tansu broker on 127.0.0.1): what `POST
//! /v1/topics/…/records`, `GET …/records`, `kappa produce` and `kappa consume` do there.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kappa_engine::event_log::{EventLog, KafkaLog};
use kappa_log::{Log, StartAt, TopicConfig};
use kappa_server::service::{self, ReadRequest, ServiceError};
use kappa_testkit::kafka::Broker;

/// NDJSON orders `ids`, keyed by customer.
fn orders(ids: std::ops::Range<u32>) -> Bytes {
    ids.map(|i| format!("{{\"id\": {i}, \"customer\": \"c{}\"}}\n", i % 7))
        .collect::<String>()
        .into()
}

/// Produced records land in the partition the embedded log would put them in (so other
/// producers and kappa agree) and read back as the embedded log reads them (from the start, a
/// time, the end; an offset past the end refused); an unknown topic is refused; with the broker killed, ingest
/// answers "unavailable" instead of hanging, and once it is back every acknowledged record is
/// there exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_on_a_kafka_cluster_keeps_keys_and_says_when_it_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path());
    let cluster = Arc::new(
        kappa_kafka::Cluster::connect(&broker.bootstrap)
            .expect("clients")
            .with_replication(1),
    );
    cluster.ensure_topic("orders", 3).await.unwrap();
    let kafka = EventLog::Kafka(KafkaLog {
        cluster: cluster.clone(),
        project: "ingest".into(),
    });
    let declared = Some("customer".to_owned());

    let produced = service::produce(&kafka, "orders", orders(0..30), None, declared.clone())
        .await
        .unwrap();
    assert_eq!(produced.records, 30);
    // The embedded log's partitions for the same records.
    let embedded = Arc::new(Log::open(dir.path().join("log")).unwrap());
    embedded
        .create_topic(
            "orders",
            TopicConfig {
                partitions: 3,
                ..TopicConfig::default()
            },
        )
        .unwrap();
    let local = service::produce(
        &EventLog::Embedded(embedded.clone()),
        "orders",
        orders(0..30),
        None,
        declared.clone(),
    )
    .await
    .unwrap();
    let partitions = |r: &kappa_server::api::ProduceResponse| -> Vec<u32> {
        r.offsets.iter().map(|p| p.partition).collect()
    };
    assert_eq!(partitions(&produced), partitions(&local));

    // Consumed from the cluster, each partition holds what the embedded log's does, in order.
    let local_log = EventLog::Embedded(embedded.clone());
    for partition in 0..3 {
        let request = |start| ReadRequest {
            partition,
            start,
            max_records: 1000,
            max_bytes: 1 << 20,
            wait_ms: 0,
        };
        let values = |r: &service::ReadResult| -> Vec<Bytes> {
            r.records.iter().map(|c| c.value.clone()).collect()
        };
        let there = service::read(&kafka, "orders", request(StartAt::Beginning), None)
            .await
            .unwrap();
        let here = service::read(&local_log, "orders", request(StartAt::Beginning), None)
            .await
            .unwrap();
        assert_eq!(values(&there), values(&here), "partition {partition}");
        assert_eq!(there.next_offset, here.next_offset);
        // From the first record's time: all of them; from the end: none.
        let from_time = service::read(&kafka, "orders", request(StartAt::Timestamp(0)), None)
            .await
            .unwrap();
        assert_eq!(values(&from_time), values(&here));
        let at_end = service::read(&kafka, "orders", request(StartAt::End), None)
            .await
            .unwrap();
        assert!(at_end.records.is_empty());
        assert_eq!(at_end.next_offset, here.next_offset);
        let offsets = service::offsets(&kafka, "orders", partition, Some(0)).unwrap();
        let local_offsets = service::offsets(&local_log, "orders", partition, Some(0)).unwrap();
        assert_eq!(
            (
                offsets.start_offset,
                offsets.visible_offset,
                offsets.offset_for_timestamp
            ),
            (
                local_offsets.start_offset,
                local_offsets.visible_offset,
                local_offsets.offset_for_timestamp
            )
        );
        let past = service::read(&kafka, "orders", request(StartAt::Offset(10_000)), None)
            .await
            .expect_err("past the end");
        assert!(
            matches!(
                past,
                ServiceError::Log(kappa_log::LogError::OffsetOutOfRange { .. })
            ),
            "{past:?}"
        );
    }

    let unknown = service::produce(&kafka, "nope", orders(0..1), None, None)
        .await
        .expect_err("no such topic");
    assert!(
        matches!(
            unknown,
            ServiceError::Log(kappa_log::LogError::UnknownTopic { .. })
        ),
        "{unknown:?}"
    );

    broker.kill9();
    let down = service::produce(&kafka, "orders", orders(30..40), None, declared.clone())
        .await
        .expect_err("the broker is down");
    assert!(matches!(down, ServiceError::Unavailable(_)), "{down:?}");
    assert!(down.to_string().contains(&broker.bootstrap), "{down}");

    broker.restart();
    let again = service::produce(&kafka, "orders", orders(40..60), None, declared)
        .await
        .unwrap();
    assert_eq!(again.records, 20);

    // Every acknowledged record once; none of the refused batch.
    let mut ids = Vec::new();
    for p in cluster.offsets("orders").unwrap() {
        let mut reader = cluster.reader("orders", p.partition, p.earliest).unwrap();
        while reader.position() < p.next {
            let read = reader.read(1000, Duration::from_secs(10)).unwrap();
            assert!(!read.is_empty(), "partition {} stops short", p.partition);
            for r in read {
                let value: serde_json::Value = serde_json::from_slice(&r.record.value).unwrap();
                ids.push(value["id"].as_u64().unwrap());
            }
        }
    }
    ids.sort_unstable();
    let expected: Vec<u64> = (0..30).chain(40..60).collect();
    assert_eq!(ids, expected);
}
