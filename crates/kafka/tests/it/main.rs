//! kappa-kafka against a real Kafka-protocol broker (tansu) on 127.0.0.1.

use std::collections::BTreeMap;
use std::time::Duration;

use kappa_kafka::{Cluster, Ensured, settings};
use kappa_log::Record;
use kappa_pipeline::PropertyValue;
use kappa_testkit::kafka::Broker;

/// A cluster client of `broker`, with a session timeout tansu's groups work with.
fn cluster(bootstrap: &str) -> Cluster {
    let properties: BTreeMap<String, PropertyValue> = [
        ("bootstrap.servers", bootstrap),
        ("session.timeout.ms", "6000"),
        ("message.timeout.ms", "10000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), PropertyValue::Text(v.to_owned())))
    .collect();
    let config = settings::client_config(&properties, &|_| None).expect("a configuration");
    Cluster::new(config).expect("clients").with_replication(1)
}

/// A topic name no other test uses (tansu does not auto-create topics, and every test gets
/// its own).
fn unique(what: &str) -> String {
    format!(
        "{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_created_once_and_checked_against_the_declaration() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let cluster = cluster(&broker.bootstrap);
    let topic = unique("orders");
    assert_eq!(cluster.partition_count(&topic).unwrap(), None);
    assert_eq!(
        cluster.ensure_topic(&topic, 3).await.unwrap(),
        Ensured::Created
    );
    assert_eq!(
        cluster.ensure_topic(&topic, 3).await.unwrap(),
        Ensured::Existed
    );
    let differs = cluster
        .ensure_topic(&topic, 4)
        .await
        .expect_err("3 partitions are not 4")
        .to_string();
    assert!(
        differs.contains(&format!("topic `{topic}`"))
            && differs.contains("it has 3 partitions")
            && differs.contains("declares 4"),
        "{differs}"
    );
    let offsets = cluster.offsets(&topic).unwrap();
    assert_eq!(offsets.len(), 3);
    assert!(
        offsets.iter().all(|p| p.earliest == 0 && p.next == 0),
        "{offsets:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_land_where_the_embedded_log_puts_them_and_read_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let cluster = cluster(&broker.bootstrap);
    let topic = unique("orders");
    cluster.ensure_topic(&topic, 3).await.unwrap();
    let records: Vec<Record> = (0..300)
        .map(|i| {
            let mut record =
                Record::keyed(format!("customer-{}", i % 17), format!("{{\"id\":{i}}}"));
            if i % 10 == 0 {
                record.headers.push(kappa_log::Header {
                    key: "trace".into(),
                    value: Some(format!("t{i}").into()),
                });
            }
            record
        })
        .collect();
    let placed = cluster.append(&topic, &records).await.unwrap();
    assert_eq!(placed.len(), records.len());

    // The same partition the embedded log's Topic::partition_for gives (Kafka's murmur2).
    let mut expected: BTreeMap<u32, Vec<&Record>> = BTreeMap::new();
    for (record, at) in records.iter().zip(&placed) {
        let key = record.key.as_deref().unwrap();
        let partition = (kappa_log::murmur2(key) & 0x7fff_ffff) % 3;
        assert_eq!(at.partition, partition, "key {key:?}");
        expected.entry(partition).or_default().push(record);
    }
    let offsets = cluster.offsets(&topic).unwrap();
    for p in &offsets {
        assert_eq!(
            p.next,
            expected.get(&p.partition).map_or(0, Vec::len) as u64,
            "{offsets:?}"
        );
    }

    // Each partition reads back in order, byte for byte, headers included.
    for (partition, wanted) in &expected {
        let mut reader = cluster.reader(&topic, *partition, 0).unwrap();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while got.len() < wanted.len() && std::time::Instant::now() < deadline {
            got.extend(reader.read(1000, Duration::from_millis(500)).unwrap());
        }
        assert_eq!(got.len(), wanted.len(), "partition {partition}");
        for (i, (read, record)) in got.iter().zip(wanted).enumerate() {
            assert_eq!(read.offset, i as u64);
            assert_eq!(&read.record, *record, "partition {partition} offset {i}");
            assert!(read.timestamp_ms.is_some());
        }
        assert_eq!(reader.position(), wanted.len() as u64);

        // From an offset: what follows it, and nothing when there is nothing.
        let mut from = cluster.reader(&topic, *partition, 2).unwrap();
        let first = read_one(&mut from);
        assert_eq!(first.offset, 2);
        assert_eq!(&first.record, wanted[2]);
        assert!(
            reader
                .read(10, Duration::from_millis(300))
                .unwrap()
                .is_empty()
        );
        // Rewound, it reads from there again.
        reader.rewind(1).unwrap();
        assert_eq!(read_one(&mut reader).offset, 1);
    }

    // An offset past the end is an error that says where the partition ends, every time
    // until a rewind (librdkafka reports it once and stops fetching).
    let end = offsets[0].next;
    let mut past = cluster.reader(&topic, 0, end + 5).unwrap();
    let mut error = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while error.is_none() && std::time::Instant::now() < deadline {
        match past.read(10, Duration::from_millis(500)) {
            Ok(read) => assert!(read.is_empty(), "{read:?}"),
            Err(e) => error = Some(e.to_string()),
        }
    }
    let error = error.expect("an offset past the end fails");
    assert!(
        error.contains(&format!("partition 0 at offset {}", end + 5))
            && error.contains(&format!("its next offset is {end}")),
        "{error}"
    );
    assert_eq!(
        past.read(10, Duration::from_millis(100))
            .expect_err("still past the end")
            .to_string(),
        error
    );
    past.rewind(0).unwrap();
    assert_eq!(read_one(&mut past).offset, 0);

    // Without a key, records are spread, and all land.
    let unkeyed: Vec<Record> = (0..30)
        .map(|i| Record::from_value(format!("{i}")))
        .collect();
    let placed = cluster.append(&topic, &unkeyed).await.unwrap();
    assert_eq!(placed.len(), 30);
    let after = cluster.offsets(&topic).unwrap();
    assert_eq!(
        after.iter().map(|p| p.next).sum::<u64>(),
        offsets.iter().map(|p| p.next).sum::<u64>() + 30
    );

    // Offsets written to a consumer group, for Kafka's tools to show the lag.
    let group = unique("kappa.shop.silver.orders.v1");
    let committed = BTreeMap::from([(topic.clone(), BTreeMap::from([(0, 5), (1, 7)]))]);
    cluster.commit_group(&group, &committed).unwrap();
    assert_eq!(
        cluster.group_offsets(&group, &topic).unwrap(),
        BTreeMap::from([(0, 5), (1, 7)])
    );
    // Nothing to commit is no error.
    cluster.commit_group(&group, &BTreeMap::new()).unwrap();
}

/// The next record `reader` returns, waiting up to 20 s for it.
fn read_one(reader: &mut kappa_kafka::PartitionReader) -> kappa_kafka::ReadRecord {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Some(record) = reader
            .read(1, Duration::from_millis(500))
            .expect("the partition reads")
            .into_iter()
            .next()
        {
            return record;
        }
    }
    panic!("no record within 20 s from {reader:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_is_named_in_the_error() {
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bootstrap = format!("127.0.0.1:{port}");
    let cluster = cluster(&bootstrap);
    let error = cluster
        .partition_count("orders")
        .expect_err("no broker")
        .to_string();
    assert!(
        error.contains(&format!("the Kafka cluster at {bootstrap}")),
        "{error}"
    );
    let error = cluster
        .append(
            "orders",
            &[Record::keyed("k", "v"), Record::keyed("l", "w")],
        )
        .await
        .expect_err("no broker")
        .to_string();
    assert!(
        error.contains("topic `orders`")
            && error.contains("0 of 2 records are in the log, 2 failed")
            && error.contains(&format!("cluster {bootstrap}")),
        "{error}"
    );
}
