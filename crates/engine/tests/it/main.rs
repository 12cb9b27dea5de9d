//! The model runner end to end: log → decode → model → Iceberg, exactly once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on unexpected errors"
)]

mod cases;

use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::util::pretty::pretty_format_batches;
use futures::TryStreamExt;
use kappa_engine::runner::{DEAD_LETTER_TOPIC, OFFSETS_PROPERTY, run_model};
use kappa_lakehouse::{Lakehouse, table_ident};
use kappa_log::{Log, Record, StartAt, TopicConfig};
use kappa_pipeline::{Project, ProjectFiles};

fn project(model_sql: &str, model_toml: &str) -> Arc<Project> {
    let mut files = ProjectFiles::new();
    files.insert("kappa.toml".into(), String::new());
    files.insert(
        "topics/orders.toml".into(),
        "partitions = 2\nkey = \"customer\"\n[schema]\nid = \"bigint\"\ncustomer = \"string\"\nqty = \"int\"\nprice = \"decimal(8,2)\"\nts = { type = \"timestamp\", required = false }\n".into(),
    );
    files.insert(
        "topics/payments.toml".into(),
        "partitions = 2\nkey = \"order_id\"\n[schema]\norder_id = \"bigint\"\namount = \"decimal(8,2)\"\nts = { type = \"timestamp\", required = false }\n".into(),
    );
    files.insert(
        "topics/customers.toml".into(),
        "kind = \"table\"\nkey = \"customer\"\n[schema]\ncustomer = \"string\"\ntier = \"string\"\ndiscount = \"decimal(3,2)\"\n".into(),
    );
    files.insert("models/silver/orders.sql".into(), model_sql.into());
    if !model_toml.is_empty() {
        files.insert("models/silver/orders.toml".into(), model_toml.into());
    }
    Arc::new(kappa_pipeline::load(&files).unwrap())
}

/// A log in `dir/log` with the two-partition `orders` topic.
fn log_with_orders(dir: &std::path::Path) -> (Arc<Log>, Arc<kappa_log::Topic>) {
    let log = Arc::new(Log::open(dir.join("log")).unwrap());
    let topic = log
        .create_topic(
            "orders",
            TopicConfig {
                partitions: 2,
                ..TopicConfig::default()
            },
        )
        .unwrap();
    (log, topic)
}

/// 2026-01-05T10:00:00Z, in seconds.
const BASE_SECONDS: u64 = 1_767_607_200;

/// Order `id`'s event time in µs: one second apart, some 4 s out of order, a few 5 minutes
/// late.
fn event_time(id: u64) -> i64 {
    let mut ts = (BASE_SECONDS + id) as i64 * 1_000_000;
    if id % 7 == 3 {
        ts -= 4_000_000;
    }
    if id % 97 == 50 {
        ts -= 300_000_000;
    }
    ts
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
            "{{\"id\":{id},\"customer\":\"c{}\",\"qty\":{},\"price\":{}.{:02},\"ts\":{}}}",
            id % 5,
            id % 4,
            id % 50,
            id % 100,
            event_time(id) / 1000
        ),
    )
}

/// The records sent at step `id`: order `id`, and for some steps a second copy of order
/// `id − 2` — redelivered with an event time 1 s earlier than the first copy and another price,
/// so that only the earliest copy is right.
fn orders(id: u64) -> Vec<Record> {
    let mut out = vec![order(id)];
    if id % 13 == 4 && (id - 2) % 10 != 7 {
        let original = id - 2;
        out.push(Record::keyed(
            format!("c{}", original % 5),
            format!(
                "{{\"id\":{original},\"customer\":\"c{}\",\"qty\":1,\"price\":0.01,\"ts\":{}}}",
                original % 5,
                event_time(original) / 1000 - 1000
            ),
        ));
    }
    out
}

/// The payments sent at step `step`, for the order of step `step − 40`: most orders are paid
/// 45–48 s after it (one in eleven twice), so that a bound of 47 s keeps some and drops others;
/// a few payments are 10 minutes late, one in fifty does not fit the schema.
fn payments(step: u64) -> Vec<Record> {
    let Some(id) = step.checked_sub(40) else {
        return Vec::new();
    };
    if id % 3 == 0 {
        return Vec::new();
    }
    let key = format!("{id}");
    if id % 50 == 25 {
        return vec![Record::keyed(
            key,
            format!("{{\"order_id\":{id},\"amount\":\"free\"}}"),
        )];
    }
    let mut ts = (BASE_SECONDS + id + 45 + id % 4) as i64 * 1000;
    if id % 89 == 20 {
        ts -= 600_000;
    }
    let mut out = vec![Record::keyed(
        key.clone(),
        format!(
            "{{\"order_id\":{id},\"amount\":{}.{:02},\"ts\":{ts}}}",
            id % 40,
            id % 100
        ),
    )];
    if id % 11 == 1 {
        out.push(Record::keyed(
            key,
            format!("{{\"order_id\":{id},\"amount\":1.00,\"ts\":{}}}", ts + 1000),
        ));
    }
    out
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
    let Some(schema) = batches.first().map(|b| b.schema()) else {
        return String::new();
    };
    let schema_width = schema.fields().len();
    ctx.register_table(
        "t",
        Arc::new(
            datafusion::datasource::MemTable::try_new(schema, vec![batches.to_vec()]).unwrap(),
        ),
    )
    .unwrap();
    let out = ctx
        .sql(&format!(
            "SELECT * FROM t ORDER BY {}",
            (1..=schema_width)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    pretty_format_batches(&out).unwrap().to_string()
}

/// Every record of the topic, decoded: the valid rows as one batch, and the rejects.
fn all_input(
    topic: &kappa_log::Topic,
    project: &Project,
) -> (RecordBatch, Vec<kappa_engine::decode::Rejected>) {
    let (batch, rejected, _) = all_input_positioned(topic, project);
    (batch, rejected)
}

/// [`all_input`] with the (partition, offset) of every row.
fn all_input_positioned(
    topic: &kappa_log::Topic,
    project: &Project,
) -> (
    RecordBatch,
    Vec<kappa_engine::decode::Rejected>,
    Vec<(u32, u64)>,
) {
    let decoder = kappa_engine::decode::Decoder::new(&project.topics[topic.name()]);
    let mut all = Vec::new();
    for p in 0..topic.partition_count() {
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
    decoder.decode_positioned(all.iter().map(|(p, o, v)| kappa_engine::decode::Raw {
        partition: *p,
        offset: *o,
        value: v,
    }))
}

/// The oracle: the model's SQL run once by DataFusion over every valid record.
async fn batch_query(sql: &str, input: RecordBatch) -> Vec<RecordBatch> {
    let ctx = datafusion::prelude::SessionContext::new();
    kappa_engine::functions::register(&ctx);
    ctx.register_table(
        "orders",
        Arc::new(
            datafusion::datasource::MemTable::try_new(input.schema(), vec![vec![input]]).unwrap(),
        ),
    )
    .unwrap();
    ctx.sql(sql).await.unwrap().collect().await.unwrap()
}

/// Runs `sql` as `silver.orders` through three lives of the runner, each stopped mid-stream
/// while records keep arriving in bursts, then a last life that catches up; returns the log,
/// the lakehouse and the topic for the checks.
async fn run_through_restarts(
    dir: &std::path::Path,
    sql: &str,
) -> (Arc<Log>, Lakehouse, Arc<kappa_log::Topic>, Arc<Project>) {
    run_with_oracle(dir, sql, "", |input, _, _| batch_query(sql, input)).await
}

/// [`run_through_restarts`] for a model with configuration `toml`, compared with `oracle`.
async fn run_with_oracle<F, Fut>(
    dir: &std::path::Path,
    sql: &str,
    toml: &str,
    oracle: F,
) -> (Arc<Log>, Lakehouse, Arc<kappa_log::Topic>, Arc<Project>)
where
    F: FnOnce(RecordBatch, Vec<(u32, u64)>, Arc<Log>) -> Fut,
    Fut: std::future::Future<Output = Vec<RecordBatch>>,
{
    // `RUST_LOG=kappa_engine=debug` shows what the runner does.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let log = Arc::new(Log::open(dir.join("log")).unwrap());
    let topic = log
        .create_topic(
            "orders",
            TopicConfig {
                partitions: 2,
                ..TopicConfig::default()
            },
        )
        .unwrap();
    let payment_topic = log
        .create_topic(
            "payments",
            TopicConfig {
                partitions: 2,
                ..TopicConfig::default()
            },
        )
        .unwrap();
    let lakehouse = Lakehouse::open(dir).await.unwrap();
    let project = project(sql, toml);
    let mut next = 0u64;
    for life in 0..3 {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let runner = tokio::spawn(run_model(
            kappa_engine::event_log::EventLog::Embedded(log.clone()),
            lakehouse.clone(),
            project.clone(),
            "silver.orders".into(),
            stop_rx,
        ));
        for _ in 0..4 {
            let burst: Vec<Record> = (next..next + 50).flat_map(orders).collect();
            topic.append(burst).await.unwrap();
            let burst: Vec<Record> = (next..next + 50).flat_map(payments).collect();
            payment_topic.append(burst).await.unwrap();
            next += 50;
            tokio::time::sleep(Duration::from_millis(30 + life * 20)).await;
        }
        // A runner that ended early says why below.
        let _ = stop_tx.send(true);
        runner.await.unwrap().unwrap();
    }
    // A last life catches up with everything: the table converges to the oracle.
    let (input, _, positions) = all_input_positioned(&topic, &project);
    let expected = sorted(&oracle(input, positions, log.clone()).await).await;
    assert!(!expected.is_empty(), "the oracle has rows to compare");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn(run_model(
        kappa_engine::event_log::EventLog::Embedded(log.clone()),
        lakehouse.clone(),
        project.clone(),
        "silver.orders".into(),
        stop_rx,
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (batches, rows) = table_rows(&lakehouse).await;
        let now = if rows == 0 {
            String::new()
        } else {
            sorted(&batches).await
        };
        if now == expected {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the table never equalled the batch query:\n{now}\nexpected:\n{expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A runner that ended early says why below.
    let _ = stop_tx.send(true);
    runner.await.unwrap().unwrap();
    (log, lakehouse, topic, project)
}

/// Every record of the dead-letter topic, as JSON.
fn dead_letters(log: &Log) -> Vec<serde_json::Value> {
    let dead = log.topic(DEAD_LETTER_TOPIC).unwrap();
    let mut reader = dead
        .partition(0)
        .unwrap()
        .reader(StartAt::Beginning)
        .unwrap();
    let mut letters = Vec::new();
    while let Some(chunk) = reader.read(1 << 20).unwrap() {
        for r in chunk.records() {
            letters.push(serde_json::from_slice(r.unwrap().value).unwrap());
        }
    }
    letters
}

/// Every bad record is in the dead-letter topic exactly once.
fn assert_dead_letters_once(log: &Log, rejected: usize) {
    let mut letters = Vec::new();
    for v in dead_letters(log) {
        letters.push((
            v["partition"].as_u64().unwrap(),
            v["offset"].as_u64().unwrap(),
        ));
        let reason = v["reason"].as_str().unwrap();
        assert!(
            reason.contains("field `qty`") || reason.starts_with("late: "),
            "{v}"
        );
    }
    let unique: std::collections::BTreeSet<_> = letters.iter().collect();
    assert_eq!(
        unique.len(),
        letters.len(),
        "a dead letter was written twice"
    );
    assert_eq!(letters.len(), rejected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_by_row_model_survives_restarts_and_equals_the_batch_query() {
    let dir = tempfile::tempdir().unwrap();
    let sql = "SELECT id, customer, qty * price AS amount FROM orders WHERE qty > 0";
    let (log, lakehouse, topic, project) = run_through_restarts(dir.path(), sql).await;
    let (_, rejected) = all_input(&topic, &project);
    assert_eq!(rejected.len(), (0..600).filter(|id| id % 10 == 7).count());
    assert_dead_letters_once(&log, rejected.len());

    // The last snapshot records no more than the end of both partitions.
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

/// Groups update in place: every aggregate the engine supports, a HAVING that removes a
/// group it once showed, restarts that restore the groups from their state files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_by_model_updates_in_place_and_equals_the_batch_query() {
    let dir = tempfile::tempdir().unwrap();
    let sql = "SELECT customer, count(*) AS n, sum(qty * price) AS revenue, min(price) AS low, \
               max(qty) AS most, avg(price) AS mean, count(DISTINCT qty) AS qtys \
               FROM orders WHERE qty IS NOT NULL GROUP BY customer HAVING count(*) < 100";
    let (log, lakehouse, topic, project) = run_through_restarts(dir.path(), sql).await;
    let (_, rejected) = all_input(&topic, &project);
    assert_dead_letters_once(&log, rejected.len());
    let props = lakehouse
        .last_commit(&table_ident("silver", "orders").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(props.contains_key(kappa_engine::grouped::BUCKETS_PROPERTY));
    // c2 (every bad record is c2's) stays under 100 orders; the others were shown while they
    // were, and removed when they passed it.
    let table = lakehouse
        .load_table(&table_ident("silver", "orders").unwrap())
        .await
        .unwrap();
    let (batches, rows) = table_rows(&lakehouse).await;
    assert_eq!(rows, 1, "{}", sorted(&batches).await);
    let most = table
        .metadata()
        .snapshots()
        .filter_map(|s| s.summary().additional_properties.get("total-records"))
        .map(|n| n.parse::<u64>().unwrap())
        .max()
        .unwrap();
    assert_eq!(most, 5, "every customer was in the table at some point");
}

/// Far behind, a GROUP BY commits once per several micro-batches (each commit rewrites every
/// group a replay touched): 800 K records waiting in the log land in one commit, not four, and
/// the table equals the batch query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_by_far_behind_commits_many_micro_batches_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (log, topic) = log_with_orders(dir.path());
    let records = 800_000u64;
    for start in (0..records).step_by(100_000) {
        let burst: Vec<Record> = (start..start + 100_000)
            .map(|id| {
                Record::keyed(
                    format!("c{}", id % 5),
                    format!(
                        "{{\"id\":{id},\"customer\":\"c{}\",\"qty\":{},\"price\":1.00}}",
                        id % 5,
                        id % 3
                    ),
                )
            })
            .collect();
        topic.append(burst).await.unwrap();
    }
    let sql = "SELECT customer, count(*) AS n, sum(qty) AS q FROM orders GROUP BY customer";
    let project = project(sql, "");
    let lakehouse = Lakehouse::open(dir.path()).await.unwrap();
    let (input, _) = all_input(&topic, &project);
    let expected = sorted(&batch_query(sql, input).await).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn(run_model(
        kappa_engine::event_log::EventLog::Embedded(log.clone()),
        lakehouse.clone(),
        project.clone(),
        "silver.orders".into(),
        stop_rx,
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let ident = table_ident("silver", "orders").unwrap();
    loop {
        // Before its first commit the table does not exist.
        if lakehouse.load_table(&ident).await.is_ok() {
            let (batches, rows) = table_rows(&lakehouse).await;
            if rows > 0 && sorted(&batches).await == expected {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replay never finished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop_tx.send(true);
    runner.await.unwrap().unwrap();
    let table = lakehouse.load_table(&ident).await.unwrap();
    let commits = table
        .metadata()
        .snapshots()
        .filter(|s| {
            s.summary()
                .additional_properties
                .contains_key(OFFSETS_PROPERTY)
        })
        .count();
    assert_eq!(commits, 1, "800 K records in one commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_aggregate_is_one_row() {
    let dir = tempfile::tempdir().unwrap();
    let sql = "SELECT count(*) AS n, sum(qty) AS q, count(DISTINCT customer) AS customers \
               FROM orders";
    run_through_restarts(dir.path(), sql).await;
}

/// Tumbling and hopping windows: appended once when the watermark passes them, late events
/// dead-lettered, and the table equal to the batch query over the events that were not late,
/// restricted to the windows closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_close_once_and_late_events_are_dead_lettered() {
    for (name, sql, size_us) in [
        (
            "tumbling",
            "SELECT date_bin(INTERVAL '1 minute', ts) AS window_start, customer, \
                    count(*) AS n, sum(qty * price) AS revenue \
             FROM orders WHERE qty > 0 \
             GROUP BY date_bin(INTERVAL '1 minute', ts), customer",
            60_000_000i64,
        ),
        (
            "hopping",
            "SELECT window_start, count(*) AS n, max(price) AS top \
             FROM (SELECT unnest(hop(ts, INTERVAL '30 seconds', INTERVAL '2 minutes')) \
                          AS window_start, price FROM orders) \
             GROUP BY window_start",
            120_000_000,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let delay_us = 10_000_000;
        let sql_owned = sql.to_owned();
        let (log, _, topic, project) = run_with_oracle(
            dir.path(),
            sql,
            "event_time = \"ts\"\nwatermark = \"10s\"\n",
            |input, positions, _| async move {
                // The oracle: events that were not late, in windows the watermark has passed.
                let (kept, _, watermark) = lateness(&input, &positions, delay_us);
                let out = batch_query(&sql_owned, kept).await;
                let ctx = datafusion::prelude::SessionContext::new();
                ctx.register_batch("out", arrow::compute::concat_batches(&out[0].schema(), &out).unwrap())
                    .unwrap();
                ctx.sql(&format!(
                    "SELECT * FROM out WHERE CAST(arrow_cast(window_start, 'Timestamp(Microsecond, None)') \
                     AS BIGINT) + {size_us} <= {watermark}"
                ))
                .await
                .unwrap()
                .collect()
                .await
                .unwrap()
            },
        )
        .await;
        let (input, rejected, positions) = all_input_positioned(&topic, &project);
        let (_, late, _) = lateness(&input, &positions, delay_us);
        assert!(late > 0, "{name}: the data has late events");
        assert_dead_letters_once(&log, rejected.len() + late);
    }
}

/// Splits decoded input (in log order per partition) into the events that are not late and
/// counts those that are; also returns the final watermark (µs). The rule: late when older
/// than the partition's latest event so far minus the delay.
fn lateness(
    input: &RecordBatch,
    positions: &[(u32, u64)],
    delay_us: i64,
) -> (RecordBatch, usize, i64) {
    use arrow::array::AsArray;
    let ts = arrow::compute::cast(
        input.column_by_name("ts").unwrap(),
        &arrow::datatypes::DataType::Int64,
    )
    .unwrap();
    let ts = ts.as_primitive::<arrow::datatypes::Int64Type>();
    let mut seen: std::collections::BTreeMap<u32, i64> = Default::default();
    let mut order: Vec<usize> = (0..input.num_rows()).collect();
    order.sort_by_key(|&i| positions[i]);
    let mut keep = vec![true; input.num_rows()];
    let mut late = 0;
    for i in order {
        let p = positions[i].0;
        let t = ts.value(i);
        let max = seen.entry(p).or_insert(i64::MIN);
        if *max != i64::MIN && t < *max - delay_us {
            keep[i] = false;
            late += 1;
        } else {
            *max = (*max).max(t);
        }
    }
    let watermark = seen.values().min().unwrap() - delay_us;
    let kept = arrow::compute::filter_record_batch(input, &arrow::array::BooleanArray::from(keep))
        .unwrap();
    (kept, late, watermark)
}

/// Deduplication: the earliest copy of each order, once the watermark makes it final — alone,
/// and feeding a GROUP BY — equal to the batch query over the events that were not late,
/// restricted to the rows the watermark has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_dropped_keeping_the_earliest_copy() {
    let dedup = "SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY ts) AS rn \
                 FROM orders) WHERE rn = 1";
    for (name, sql, oracle) in [
        (
            "alone",
            format!("SELECT id, customer, price, ts FROM ({dedup})"),
            format!("SELECT id, customer, price, ts FROM ({dedup}) WHERE {{decided}}"),
        ),
        (
            "then grouped",
            format!(
                "SELECT customer, count(*) AS n, sum(price) AS total FROM ({dedup}) \
                 GROUP BY customer"
            ),
            format!(
                "SELECT customer, count(*) AS n, sum(price) AS total FROM ({dedup}) \
                 WHERE {{decided}} GROUP BY customer"
            ),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let delay_us = 10_000_000;
        let (log, _, topic, project) = run_with_oracle(
            dir.path(),
            &sql,
            "event_time = \"ts\"\nwatermark = \"10s\"\n",
            |input, positions, _| async move {
                let (kept, _, watermark) = lateness(&input, &positions, delay_us);
                let decided = format!(
                    "CAST(arrow_cast(ts, 'Timestamp(Microsecond, None)') AS BIGINT) < {watermark}"
                );
                batch_query(&oracle.replace("{decided}", &decided), kept).await
            },
        )
        .await;
        let (input, rejected, positions) = all_input_positioned(&topic, &project);
        let (_, late, _) = lateness(&input, &positions, delay_us);
        assert!(late > 0, "{name}: the data has late events");
        assert_dead_letters_once(&log, rejected.len() + late);
    }
}

/// Stream ⋈ dimension: each order looks its customer up in the latest record per key of the
/// `customers` table topic, loaded before the orders are processed; equal to the batch query
/// with `customers` as its latest rows, for an inner and a left join, across restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_look_up_their_customer_in_a_dimension() {
    for (name, sql) in [
        (
            "inner",
            "SELECT o.id, o.customer, c.tier, o.qty * o.price * (1 - c.discount) AS net \
             FROM orders o JOIN customers c ON o.customer = c.customer WHERE o.qty > 0",
        ),
        (
            "left, then grouped",
            "SELECT coalesce(c.tier, 'none') AS tier, count(*) AS n, sum(o.price) AS total \
             FROM orders o LEFT JOIN customers c ON o.customer = c.customer \
             GROUP BY coalesce(c.tier, 'none')",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        // The dimension: c1 changes tier (the latest record wins), c4 is unknown, one record
        // does not fit the schema.
        let customers = [
            r#"{"customer":"c0","tier":"gold","discount":0.10}"#,
            r#"{"customer":"c1","tier":"silver","discount":0.05}"#,
            r#"{"customer":"c2","tier":"bronze","discount":0}"#,
            r#"{"customer":"c3","tier":"silver","discount":0.05}"#,
            r#"{"customer":"c1","tier":"gold","discount":0.10}"#,
            r#"{"customer":"c9","tier":"gold","discount":"lots"}"#,
        ];
        {
            let log = Log::open(dir.path().join("log")).unwrap();
            let topic = log
                .create_topic(
                    "customers",
                    TopicConfig {
                        partitions: 2,
                        ..TopicConfig::default()
                    },
                )
                .unwrap();
            for c in customers {
                let key: serde_json::Value = serde_json::from_str(c).unwrap();
                let key = key["customer"].as_str().unwrap().to_owned();
                topic.append(vec![Record::keyed(key, c)]).await.unwrap();
            }
        }
        let sql_owned = sql.to_owned();
        let (log, _, topic, project) =
            run_with_oracle(dir.path(), sql, "", |input, _, _| async move {
                let ctx = datafusion::prelude::SessionContext::new();
                ctx.register_batch("orders", input).unwrap();
                // The dimension's latest row per key.
                ctx.sql(
                    "CREATE VIEW customers AS SELECT customer, tier, \
                     CAST(discount AS DECIMAL(3,2)) AS discount FROM (VALUES \
                     ('c0', 'gold', 0.10), ('c1', 'gold', 0.10), ('c2', 'bronze', 0), \
                     ('c3', 'silver', 0.05)) AS t(customer, tier, discount)",
                )
                .await
                .unwrap();
                ctx.sql(&sql_owned).await.unwrap().collect().await.unwrap()
            })
            .await;
        let (_, rejected) = all_input(&topic, &project);
        // The bad customer record is a dead letter too, once.
        let mut from_customers = 0;
        let mut from_orders = 0;
        for v in dead_letters(&log) {
            match v["topic"].as_str().unwrap() {
                "customers" => {
                    assert!(v["reason"].as_str().unwrap().contains("discount"), "{v}");
                    from_customers += 1;
                }
                _ => from_orders += 1,
            }
        }
        assert_eq!(from_customers, 1, "{name}");
        assert_eq!(from_orders, rejected.len(), "{name}");
    }
}

/// Stream ⋈ stream within a time bound: orders meet the payments made 0–47 s after them —
/// alone and feeding a GROUP BY — equal to the batch join over the records of both topics that
/// were not late, across restarts; each side keeps only the rows the bound still needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_meet_their_payments_within_a_time_bound() {
    let on = "ON p.order_id = o.id AND p.ts BETWEEN o.ts AND o.ts + INTERVAL '47 seconds'";
    for (name, sql) in [
        (
            "pairs",
            format!(
                "SELECT o.id, o.customer, p.amount, p.ts AS paid_at \
                 FROM orders o JOIN payments p {on} WHERE o.qty > 0"
            ),
        ),
        (
            "then grouped",
            format!(
                "SELECT o.customer, count(*) AS payments, sum(p.amount) AS paid \
                 FROM orders o JOIN payments p {on} GROUP BY o.customer"
            ),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let delay_us = 10_000_000;
        let sql_owned = sql.clone();
        let (log, lakehouse, topic, project) = run_with_oracle(
            dir.path(),
            &sql,
            "watermark = \"10s\"\n",
            |input, positions, log| async move {
                let (orders, _, _) = lateness(&input, &positions, delay_us);
                let project = project(&sql_owned, "");
                let (paid, _, paid_at) =
                    all_input_positioned(&log.topic("payments").unwrap(), &project);
                let (paid, _, _) = lateness(&paid, &paid_at, delay_us);
                let ctx = datafusion::prelude::SessionContext::new();
                ctx.register_batch("orders", orders).unwrap();
                ctx.register_batch("payments", paid).unwrap();
                ctx.sql(&sql_owned).await.unwrap().collect().await.unwrap()
            },
        )
        .await;
        // Dead letters: bad and late records of both topics, each once.
        let (input, rejected, positions) = all_input_positioned(&topic, &project);
        let (_, late, _) = lateness(&input, &positions, delay_us);
        let (paid, paid_rejected, paid_at) =
            all_input_positioned(&log.topic("payments").unwrap(), &project);
        let (_, paid_late, _) = lateness(&paid, &paid_at, delay_us);
        assert!(
            late > 0 && paid_late > 0 && !paid_rejected.is_empty(),
            "{name}"
        );
        let all = dead_letters(&log);
        let count = all.len();
        let letters: std::collections::BTreeSet<_> = all
            .iter()
            .map(|v| {
                (
                    v["topic"].as_str().unwrap().to_owned(),
                    v["partition"].as_u64().unwrap(),
                    v["offset"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            count,
            letters.len(),
            "{name}: a dead letter was written twice"
        );
        assert_eq!(
            count,
            rejected.len() + late + paid_rejected.len() + paid_late,
            "{name}"
        );
        // The state is bounded by the time bound and the watermark, not by the stream.
        let table = lakehouse
            .load_table(&table_ident("silver", "orders").unwrap())
            .await
            .unwrap();
        // Restored from the last commit and caught up with its watermarks, each side keeps only
        // the rows the bound still needs.
        let planned = kappa_engine::plan::plan_model(&project, "silver.orders")
            .await
            .unwrap();
        let plan = planned.join.as_ref().unwrap();
        let mut stage = kappa_engine::stream_join::StreamJoin::new(
            planned.ctx.clone(),
            &plan.found,
            planned.slot.clone(),
            plan.right_slot.clone(),
            plan.output_schema.clone(),
        )
        .unwrap();
        let props = table
            .metadata()
            .current_snapshot()
            .unwrap()
            .summary()
            .additional_properties
            .clone();
        stage
            .restore(&lakehouse, &table, Some(&props))
            .await
            .unwrap();
        let restored = stage.buffered();
        let marks: serde_json::Value = serde_json::from_str(&props["kappa.watermarks"]).unwrap();
        let watermark = |topic: &str| {
            marks[topic]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_i64().unwrap())
                .min()
                .map(|m| m - delay_us)
        };
        let empty = |topic: &str| {
            RecordBatch::new_empty(
                kappa_engine::decode::Decoder::new(&project.topics[topic])
                    .schema()
                    .clone(),
            )
        };
        stage
            .push(
                empty("orders"),
                empty("payments"),
                watermark("orders"),
                watermark("payments"),
            )
            .await
            .unwrap();
        let (left, right) = stage.buffered();
        eprintln!("{name}: restored {restored:?}, kept ({left}, {right})");
        assert!(
            left > 0 && left < 150,
            "{name}: the left side keeps {left} rows"
        );
        assert!(
            right > 0 && right < 150,
            "{name}: the right side keeps {right} rows"
        );
    }
}

/// A commit whose `kappa.offsets` does not read stops the model with the reason: it does not
/// start again from offset 0 (which wrote every row a second time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_record_that_does_not_read_stops_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let (log, topic) = log_with_orders(dir.path());
    log.create_topic("payments", TopicConfig::default())
        .unwrap();
    let lakehouse = Lakehouse::open(dir.path()).await.unwrap();
    let project = project("SELECT id, customer FROM orders", "");
    topic
        .append((0..20).flat_map(orders).collect())
        .await
        .unwrap();
    let run = |stop| {
        run_model(
            kappa_engine::event_log::EventLog::Embedded(log.clone()),
            lakehouse.clone(),
            project.clone(),
            "silver.orders".into(),
            stop,
        )
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn(run(stop_rx));
    let ident = kappa_engine::runner::live_table(&lakehouse, &project, "silver.orders").unwrap();
    let rows = loop {
        if let Ok(table) = lakehouse.load_table(&ident).await
            && let Some(s) = table.metadata().current_snapshot()
            && s.summary()
                .additional_properties
                .contains_key(OFFSETS_PROPERTY)
        {
            break s.summary().additional_properties["total-records"].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop_tx.send(true).unwrap();
    runner.await.unwrap().unwrap();
    // A commit whose offsets were damaged.
    let table = lakehouse.load_table(&ident).await.unwrap();
    let version = kappa_engine::runner::model_version(&project, "silver.orders");
    lakehouse
        .append_files(
            &table,
            Vec::new(),
            std::collections::HashMap::from([
                (
                    OFFSETS_PROPERTY.to_owned(),
                    "{\"orders\":{\"0\":".to_owned(),
                ),
                (kappa_engine::runner::VERSION_PROPERTY.to_owned(), version),
            ]),
        )
        .await
        .unwrap();
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let outcome = tokio::time::timeout(Duration::from_secs(30), run(stop_rx))
        .await
        .expect("the runner stops by itself");
    let error = outcome.expect_err("a damaged record is an error");
    assert!(
        matches!(
            error,
            kappa_engine::runner::RunnerError::CorruptCommit { .. }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("kappa.offsets"), "{error}");
    // Nothing was written again.
    let table = lakehouse.load_table(&ident).await.unwrap();
    let summary = &table
        .metadata()
        .current_snapshot()
        .unwrap()
        .summary()
        .additional_properties;
    assert_eq!(summary["total-records"], rows);
}
