//! The model runner end to end: log → decode → model → Iceberg, exactly once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on unexpected errors"
)]

use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::util::pretty::pretty_format_batches;
use futures::TryStreamExt;
use kappa_engine::runner::{DEAD_LETTER_TOPIC, OFFSETS_PROPERTY, run_model};
use kappa_lakehouse::{Lakehouse, table_ident};
use kappa_log::{Log, Record, StartAt, TopicConfig};
use kappa_pipeline::{Project, ProjectFiles};

fn project(model_sql: &str) -> Arc<Project> {
    let mut files = ProjectFiles::new();
    files.insert("kappa.toml".into(), String::new());
    files.insert(
        "topics/orders.toml".into(),
        "partitions = 2\nkey = \"customer\"\n[schema]\nid = \"bigint\"\ncustomer = \"string\"\nqty = \"int\"\nprice = \"decimal(8,2)\"\n".into(),
    );
    files.insert("models/silver/orders.sql".into(), model_sql.into());
    Arc::new(kappa_pipeline::load(&files).unwrap())
}

fn order(id: u64) -> Record {
    if id % 10 == 7 {
        return Record::keyed(
            format!("c{}", id % 5),
            format!(
                "{{\"id\":{id},\"customer\":\"c{}\",\"qty\":\"many\"}}",
                id % 5
            ),
        );
    }
    Record::keyed(
        format!("c{}", id % 5),
        format!(
            "{{\"id\":{id},\"customer\":\"c{}\",\"qty\":{},\"price\":{}.{:02}}}",
            id % 5,
            id % 4,
            id % 50,
            id % 100
        ),
    )
}

async fn table_rows(lakehouse: &Lakehouse) -> (Vec<RecordBatch>, usize) {
    let table = lakehouse
        .load_table(&table_ident("silver", "orders").unwrap())
        .await
        .unwrap();
    let batches: Vec<RecordBatch> = table
        .scan()
        .build()
        .unwrap()
        .to_arrow()
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let rows = batches.iter().map(RecordBatch::num_rows).sum();
    (batches, rows)
}

async fn sorted(batches: &[RecordBatch]) -> String {
    let ctx = datafusion::prelude::SessionContext::new();
    let schema = batches.first().map(|b| b.schema()).unwrap();
    ctx.register_table(
        "t",
        Arc::new(
            datafusion::datasource::MemTable::try_new(schema, vec![batches.to_vec()]).unwrap(),
        ),
    )
    .unwrap();
    let out = ctx
        .sql("SELECT * FROM t ORDER BY 1, 2")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    pretty_format_batches(&out).unwrap().to_string()
}

const SQL: &str = "SELECT id, customer, qty * price AS amount FROM orders WHERE qty > 0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_runs_live_survives_restarts_and_equals_the_batch_query() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path().join("log")).unwrap());
    let topic = log
        .create_topic(
            "orders",
            TopicConfig {
                partitions: 2,
                ..TopicConfig::default()
            },
        )
        .unwrap();
    let lakehouse = Lakehouse::open(dir.path()).await.unwrap();
    let project = project(SQL);
    let total = 600u64;

    // Three lives of the runner, each stopped mid-stream; records keep arriving in bursts.
    let mut next = 0u64;
    for life in 0..3 {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let runner = tokio::spawn(run_model(
            log.clone(),
            lakehouse.clone(),
            project.clone(),
            "silver.orders".into(),
            stop_rx,
        ));
        for _ in 0..4 {
            let burst: Vec<Record> = (next..next + 50).map(order).collect();
            topic.append(burst).await.unwrap();
            next += 50;
            tokio::time::sleep(Duration::from_millis(30 + life * 20)).await;
        }
        stop_tx.send(true).unwrap();
        runner.await.unwrap().unwrap();
    }
    assert_eq!(next, total);
    // A last life catches up with everything.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn(run_model(
        log.clone(),
        lakehouse.clone(),
        project.clone(),
        "silver.orders".into(),
        stop_rx,
    ));
    let expected_rows = (0..total).filter(|id| id % 10 != 7 && id % 4 > 0).count();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, rows) = table_rows(&lakehouse).await;
        if rows >= expected_rows {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {rows} of {expected_rows} rows arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_tx.send(true).unwrap();
    runner.await.unwrap().unwrap();

    // The table equals the same SQL run as a batch query over the same (valid) records.
    let (batches, rows) = table_rows(&lakehouse).await;
    assert_eq!(rows, expected_rows, "no duplicates");
    let decoder = kappa_engine::decode::Decoder::new(&project.topics["orders"]);
    let mut all = Vec::new();
    for p in 0..2 {
        let mut reader = topic
            .partition(p)
            .unwrap()
            .reader(StartAt::Beginning)
            .unwrap();
        while let Some(chunk) = reader.read(1 << 20).unwrap() {
            for r in chunk.records() {
                let r = r.unwrap();
                all.push((p, r.offset, r.value.to_vec()));
            }
        }
    }
    let (input, rejected) = decoder.decode(all.iter().map(|(p, o, v)| kappa_engine::decode::Raw {
        partition: *p,
        offset: *o,
        value: v,
    }));
    assert_eq!(rejected.len(), (0..total).filter(|id| id % 10 == 7).count());
    let batch_model =
        kappa_engine::stateless::StatelessModel::new(SQL, "orders", decoder.schema().clone())
            .await
            .unwrap();
    let oracle = batch_model.run(input).await.unwrap();
    assert_eq!(sorted(&batches).await, sorted(&oracle).await);

    // Every bad record is in the dead-letter topic exactly once.
    let dead = log.topic(DEAD_LETTER_TOPIC).unwrap();
    let mut letters = Vec::new();
    let mut reader = dead
        .partition(0)
        .unwrap()
        .reader(StartAt::Beginning)
        .unwrap();
    while let Some(chunk) = reader.read(1 << 20).unwrap() {
        for r in chunk.records() {
            let v: serde_json::Value = serde_json::from_slice(r.unwrap().value).unwrap();
            letters.push((
                v["partition"].as_u64().unwrap(),
                v["offset"].as_u64().unwrap(),
            ));
            assert!(v["reason"].as_str().unwrap().contains("field `qty`"), "{v}");
        }
    }
    let unique: std::collections::BTreeSet<_> = letters.iter().collect();
    assert_eq!(
        unique.len(),
        letters.len(),
        "a dead letter was written twice"
    );
    assert_eq!(letters.len(), rejected.len());

    // The last snapshot records the end of both partitions.
    let props = lakehouse
        .last_commit(&table_ident("silver", "orders").unwrap())
        .await
        .unwrap()
        .unwrap();
    let offsets: serde_json::Value = serde_json::from_str(&props[OFFSETS_PROPERTY]).unwrap();
    let ends: u64 = (0..2)
        .map(|p| topic.partition(p).unwrap().offsets().visible_offset)
        .sum();
    let recorded: u64 = offsets["orders"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(recorded <= ends);
}
