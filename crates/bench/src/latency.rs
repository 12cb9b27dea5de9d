//! `kappa-bench live-latency`: how the commit cadence adapts, and how soon a live event is
//! visible to a query.
//!
//! ```text
//!  phase 1  catch-up: the log already holds `backlog` events when the runners start
//!           → records per commit while far behind
//!  phase 2  live: a producer appends `rate` events/s in 10 ms ticks; a reader queries the tables
//!           every 20 ms the way `kappa sql` does (a fresh DataFusion session over the current
//!           snapshots) → for every event, the time from just before its append to the first
//!           query that returns it; commits per second
//! ```
//!
//! Three models run, as in `kappa up` (one runner each): a row-by-row model (an event is
//! visible when its row is); a GROUP BY (an event is visible when its partition's group covers
//! it: the group keeps the partition's greatest `order_id`, and a partition is committed in log
//! order); and a row-by-row model over the first one's published table (`gold.chained`: what a
//! model over a model pays for reading what its upstream published — the upstream's commit,
//! then its own read of the new Parquet and commit). The reference, measured in the same run:
//! the log's own append latency (append → durable acknowledgement) of the same records.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::{Array, AsArray};
use kappa_lakehouse::{Lakehouse, table_ident};
use kappa_log::{Log, Record, TopicConfig};
use kappa_pipeline::ProjectFiles;
use serde::Serialize;

use crate::note;

const PARTITIONS: u32 = 4;
/// The producer's tick.
const TICK_MS: u64 = 10;
/// The reader's poll interval.
const POLL_MS: u64 = 20;
/// Live seconds not measured (the runners settle after the catch-up).
const WARM_UP_SECONDS: f64 = 2.0;
/// How long the last events may take to show before the run fails.
const DRAIN_SECONDS: u64 = 15;

const ORDERS_TOML: &str = "partitions = 4\nkey = \"customer\"\n[schema]\norder_id = \"bigint\"\n\
                           lane = \"int\"\ncustomer = \"string\"\namount = \"decimal(10,2)\"\n\
                           ts = \"timestamp\"\n";
const ROWS_SQL: &str = "SELECT order_id, lane, customer, amount * 2 AS doubled FROM orders";
const CHAINED_SQL: &str = "SELECT order_id, lane, doubled FROM silver.rows";
const GROUPS_SQL: &str =
    "SELECT lane, max(order_id) AS max_id, count(*) AS n FROM orders GROUP BY lane";

#[derive(Debug, Serialize)]
pub struct Report {
    catch_up: CatchUp,
    live: Live,
    peak_rss_bytes: u64,
}

#[derive(Debug, Serialize)]
struct CatchUp {
    backlog_events: u64,
    seconds: f64,
    /// Commits of the row-by-row model while it caught up, and records per commit.
    commits: usize,
    records_per_commit: u64,
}

#[derive(Debug, Serialize)]
struct Live {
    rate_events_per_s: u64,
    measured_seconds: f64,
    events_measured: usize,
    /// Event → visible in a query, per model, in ms.
    row_by_row_ms: Percentiles,
    group_by_ms: Percentiles,
    /// Event → visible in the model over silver.rows's published table.
    chained_ms: Percentiles,
    /// Reference: append → durable acknowledgement of the same records, in ms.
    log_append_ms: Percentiles,
    /// How long the reader's queries took (part of every visibility figure), in ms.
    query_ms: Percentiles,
    /// Commits per second of each model while live.
    row_by_row_commits_per_s: f64,
    group_by_commits_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn percentiles(mut ms: Vec<f64>) -> Percentiles {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if ms.is_empty() {
            return 0.0;
        }
        let i = ((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1;
        (ms[i] * 10.0).round() / 10.0
    };
    Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: at(1.0),
    }
}

fn record(id: u64, lane: u32) -> Record {
    let customer = format!("c{}", id % 1000);
    let value = format!(
        "{{\"order_id\":{id},\"lane\":{lane},\"customer\":\"{customer}\",\"amount\":{}.{:02},\
         \"ts\":{}}}",
        id % 300,
        id % 100,
        1_767_225_600_000u64 + id
    );
    Record::keyed(customer, value)
}

/// What the producer did: when each event was handed to the log, and its partition.
#[derive(Default)]
struct Sent {
    at: Vec<Instant>,
    ack_ms: Vec<f64>,
}

pub fn run(work: &Path, backlog: u64, rate: u64, seconds: f64) -> anyhow::Result<Report> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(work, backlog, rate, seconds))
}

async fn run_async(work: &Path, backlog: u64, rate: u64, seconds: f64) -> anyhow::Result<Report> {
    let log = Arc::new(Log::open(work.join("log"))?);
    let topic = log.create_topic(
        "orders",
        TopicConfig {
            partitions: PARTITIONS,
            ..TopicConfig::default()
        },
    )?;
    let mut files = ProjectFiles::new();
    files.insert("kappa.toml".into(), String::new());
    files.insert("topics/orders.toml".into(), ORDERS_TOML.into());
    files.insert("models/silver/rows.sql".into(), ROWS_SQL.into());
    files.insert("models/gold/lanes.sql".into(), GROUPS_SQL.into());
    files.insert("models/gold/chained.sql".into(), CHAINED_SQL.into());
    let mut project = kappa_pipeline::load(&files).map_err(|d| {
        anyhow::anyhow!(
            "{}",
            d.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    // As a deploy records it: gold.chained reads silver.rows's published table.
    project
        .reads_tables
        .insert("gold.chained".into(), vec!["silver.rows".into()]);
    let project = Arc::new(project);
    let lakehouse = Lakehouse::open(work).await?;

    // Phase 1: a backlog, then the runners start and catch up.
    note(&format!("writing a backlog of {backlog} events"));
    let mut next_id = 0u64;
    while next_id < backlog {
        for lane in 0..PARTITIONS {
            let records: Vec<Record> = (0..2048)
                .map(|i| next_id + u64::from(lane) + i * u64::from(PARTITIONS))
                .map(|id| record(id, lane))
                .collect();
            topic.partition(lane)?.append(&records).await?;
        }
        next_id += 2048 * u64::from(PARTITIONS);
    }
    let backlog = next_id;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let mut runners = Vec::new();
    for model in ["silver.rows", "gold.lanes", "gold.chained"] {
        runners.push(tokio::spawn(kappa_engine::runner::run_model(
            kappa_engine::event_log::EventLog::Embedded(log.clone()),
            lakehouse.clone(),
            project.clone(),
            model.into(),
            stop_rx.clone(),
        )));
    }
    loop {
        // Before its first commit a table may not exist yet.
        let mut covered = Vec::new();
        for sql in [
            "SELECT count(*) FROM silver.rows",
            "SELECT sum(n) FROM gold.lanes",
            "SELECT count(*) FROM gold.chained",
        ] {
            let batches = lakehouse
                .query(sql)
                .await
                .map(|(_, b)| b)
                .unwrap_or_default();
            covered.push(first_integer(&batches));
        }
        if covered.iter().all(|&n| n >= backlog) {
            break;
        }
        anyhow::ensure!(
            runners.iter().all(|r| !r.is_finished()),
            "a runner stopped during the catch-up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let catch_up_seconds = started.elapsed().as_secs_f64();
    let catch_up_commits = snapshots(&lakehouse, "silver.rows").await?;
    note(&format!(
        "caught up with {backlog} events in {catch_up_seconds:.1} s, {catch_up_commits} commits"
    ));

    // Phase 2: live.
    let sent = Arc::new(Mutex::new(Sent {
        at: Vec::new(),
        ack_ms: Vec::new(),
    }));
    let first_live = backlog;
    let per_tick = (rate * TICK_MS / 1000).max(1);
    let total = ((seconds + WARM_UP_SECONDS) * rate as f64) as u64;
    let producer = {
        let sent = sent.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
            let mut id = first_live;
            while id < first_live + total {
                tick.tick().await;
                let mut lanes: BTreeMap<u32, Vec<Record>> = BTreeMap::new();
                let from = id;
                for _ in 0..per_tick {
                    let lane = (id % u64::from(PARTITIONS)) as u32;
                    lanes.entry(lane).or_default().push(record(id, lane));
                    id += 1;
                }
                let now = Instant::now();
                {
                    let mut sent = sent.lock().expect("the producer alone writes `sent`");
                    sent.at.extend((from..id).map(|_| now));
                }
                for (lane, records) in lanes {
                    let partition = topic.partition(lane)?;
                    partition.append(&records).await?;
                    let ms = now.elapsed().as_secs_f64() * 1000.0;
                    sent.lock()
                        .expect("the producer alone writes `sent`")
                        .ack_ms
                        .extend(std::iter::repeat_n(ms, records.len()));
                }
            }
            anyhow::Ok(())
        })
    };
    let live_started = Instant::now();
    let rows_commits_before = snapshots(&lakehouse, "silver.rows").await?;
    let lanes_commits_before = snapshots(&lakehouse, "gold.lanes").await?;

    // The reader: each event's first sighting, per model.
    let mut row_seen: Vec<Option<f64>> = vec![None; total as usize];
    let mut group_seen: Vec<Option<f64>> = vec![None; total as usize];
    let mut chained_seen: Vec<Option<f64>> = vec![None; total as usize];
    let mut lowest_unseen = first_live;
    let mut lowest_unchained = first_live;
    let mut lane_top: BTreeMap<u32, u64> = BTreeMap::new();
    let deadline_after_producer = Duration::from_secs(DRAIN_SECONDS);
    let mut producer_done: Option<Instant> = None;
    let mut query_ms = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
        for (table, seen, lowest) in [
            ("silver.rows", &mut row_seen, &mut lowest_unseen),
            ("gold.chained", &mut chained_seen, &mut lowest_unchained),
        ] {
            let (batches, now) = timed_query(
                &lakehouse,
                &format!("SELECT order_id FROM {table} WHERE order_id >= {lowest}"),
                &mut query_ms,
            )
            .await?;
            // Taken after the query: every event it returned was handed to the log before.
            let sent_at = sent_times(&sent);
            for batch in &batches {
                for id in batch
                    .column(0)
                    .as_primitive::<arrow::datatypes::Int64Type>()
                    .values()
                {
                    let i = (*id as u64 - first_live) as usize;
                    if let (Some(slot), Some(at)) = (seen.get_mut(i), sent_at.get(i))
                        && slot.is_none()
                    {
                        *slot = Some(now.duration_since(*at).as_secs_f64() * 1000.0);
                    }
                }
            }
            while seen
                .get((*lowest - first_live) as usize)
                .is_some_and(Option::is_some)
            {
                *lowest += 1;
            }
        }
        let (batches, now) = timed_query(
            &lakehouse,
            "SELECT lane, max_id FROM gold.lanes",
            &mut query_ms,
        )
        .await?;
        let sent_at = sent_times(&sent);
        for batch in &batches {
            let lanes = batch
                .column(0)
                .as_primitive::<arrow::datatypes::Int32Type>();
            let tops = batch
                .column(1)
                .as_primitive::<arrow::datatypes::Int64Type>();
            for (lane, top) in lanes.values().iter().zip(tops.values()) {
                let lane = *lane as u32;
                let top = *top as u64;
                let from = lane_top.get(&lane).map_or(first_live, |t| t + 1);
                for id in (from.max(first_live)..=top).filter(|id| id % 4 == u64::from(lane)) {
                    let i = (id - first_live) as usize;
                    if let (Some(slot), Some(at)) = (group_seen.get_mut(i), sent_at.get(i))
                        && slot.is_none()
                    {
                        *slot = Some(now.duration_since(*at).as_secs_f64() * 1000.0);
                    }
                }
                if top >= first_live {
                    lane_top.insert(lane, top);
                }
            }
        }
        let all_seen = row_seen.iter().all(Option::is_some)
            && group_seen.iter().all(Option::is_some)
            && chained_seen.iter().all(Option::is_some);
        if producer.is_finished() && producer_done.is_none() {
            producer_done = Some(Instant::now());
        }
        if all_seen && producer.is_finished() {
            break;
        }
        if producer_done.is_some_and(|d| d.elapsed() > deadline_after_producer) {
            anyhow::bail!(
                "events not visible {DRAIN_SECONDS} s after the producer ended: {} rows, {} \
                 group entries, {} chained rows (first row {:?}, first group entry {:?})",
                row_seen.iter().filter(|s| s.is_none()).count(),
                group_seen.iter().filter(|s| s.is_none()).count(),
                chained_seen.iter().filter(|s| s.is_none()).count(),
                row_seen
                    .iter()
                    .position(Option::is_none)
                    .map(|i| first_live + i as u64),
                group_seen
                    .iter()
                    .position(Option::is_none)
                    .map(|i| first_live + i as u64),
            );
        }
    }
    producer.await.context("join the producer")??;
    let live_seconds = live_started.elapsed().as_secs_f64();
    let rows_commits = snapshots(&lakehouse, "silver.rows").await? - rows_commits_before;
    let lanes_commits = snapshots(&lakehouse, "gold.lanes").await? - lanes_commits_before;
    let _ = stop_tx.send(true);
    for runner in runners {
        runner.await.context("join a runner")??;
    }
    // Events of the warm-up are not measured.
    let skip = (WARM_UP_SECONDS * rate as f64) as usize;
    let measured =
        |seen: &[Option<f64>]| -> Vec<f64> { seen.iter().skip(skip).flatten().copied().collect() };
    let ack_ms = sent
        .lock()
        .expect("the producer has ended")
        .ack_ms
        .iter()
        .skip(skip)
        .copied()
        .collect();
    Ok(Report {
        catch_up: CatchUp {
            backlog_events: backlog,
            seconds: (catch_up_seconds * 100.0).round() / 100.0,
            commits: catch_up_commits,
            records_per_commit: backlog / catch_up_commits.max(1) as u64,
        },
        live: Live {
            rate_events_per_s: rate,
            measured_seconds: seconds,
            events_measured: row_seen.len().saturating_sub(skip),
            row_by_row_ms: percentiles(measured(&row_seen)),
            group_by_ms: percentiles(measured(&group_seen)),
            chained_ms: percentiles(measured(&chained_seen)),
            log_append_ms: percentiles(ack_ms),
            query_ms: percentiles(query_ms),
            row_by_row_commits_per_s: (rows_commits as f64 / live_seconds * 10.0).round() / 10.0,
            group_by_commits_per_s: (lanes_commits as f64 / live_seconds * 10.0).round() / 10.0,
        },
        peak_rss_bytes: crate::peak_rss_bytes(),
    })
}

/// Runs a reader's query; returns its rows and when they came back, and records how long it took.
async fn timed_query(
    lakehouse: &Lakehouse,
    sql: &str,
    query_ms: &mut Vec<f64>,
) -> anyhow::Result<(Vec<arrow::array::RecordBatch>, Instant)> {
    let asked = Instant::now();
    let (_, batches) = lakehouse
        .query(sql)
        .await
        .with_context(|| format!("query: {sql}"))?;
    let now = Instant::now();
    query_ms.push(now.duration_since(asked).as_secs_f64() * 1000.0);
    Ok((batches, now))
}

/// When each live event was handed to the log, so far.
fn sent_times(sent: &Mutex<Sent>) -> Vec<Instant> {
    sent.lock()
        .expect("the producer never panics holding `sent`")
        .at
        .clone()
}

/// The first value of a one-number query result (0 when there is none).
fn first_integer(batches: &[arrow::array::RecordBatch]) -> u64 {
    batches
        .first()
        .filter(|b| b.num_rows() > 0 && b.column(0).is_valid(0))
        .and_then(|b| arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Int64).ok())
        .map_or(0, |c| {
            c.as_primitive::<arrow::datatypes::Int64Type>().value(0) as u64
        })
}

/// How many commits a table has had: its last sequence number (old snapshots expire, so
/// counting them would not do).
async fn snapshots(lakehouse: &Lakehouse, model: &str) -> anyhow::Result<usize> {
    let (layer, name) = model.split_once('.').context("a model is layer.name")?;
    let table = lakehouse.load_table(&table_ident(layer, name)?).await?;
    let last = table.metadata().last_sequence_number();
    Ok(usize::try_from(last).unwrap_or(0))
}
