//! `kappa-bench pipelines`: replay throughput of the five reference pipelines over generated
//! order events, next to DuckDB running the same SQL as a batch over the same events exported
//! as NDJSON, in the same run.
//!
//! ```text
//! Q1  stateless transform with a dimension lookup (tax rate from products)
//! Q2  GROUP BY customer
//! Q3  1-minute tumbling window per region
//! Q4  dedup by order id
//! Q5  the gold fact: dedup + products lookup + GROUP BY region, category, day
//! Q6  Q4 with expectations, one of them table-level: every commit is audited on a branch
//! Q5c Q5 as a chain: silver deduplicates, gold reads silver's published table (lookup +
//!     GROUP BY); both runners at once, done when gold covers all silver covers
//! ```
//!
//! kappa: one model runner replays the whole `orders` log (already written, page cache warm)
//! into an Iceberg table, timed until the table's last commit covers every partition's end.
//! DuckDB: `COPY (<same SQL>) TO '…parquet'` over `read_json` of the NDJSON with the topic's
//! declared types, in a child Python process, with as many threads as kappa uses (1) and with
//! every core. Both write their full result.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kappa_lakehouse::{Lakehouse, table_ident};
use kappa_log::{Log, Record, TopicConfig};
use kappa_pipeline::ProjectFiles;
use serde::Serialize;

use crate::{note, peak_rss_bytes};

/// Records per append while filling the log.
const APPEND_RECORDS: usize = 8192;
/// Distinct customers, products, regions.
const CUSTOMERS: u64 = 100_000;
const PRODUCTS: u64 = 1_000;
const REGIONS: [&str; 8] = [
    "north", "south", "east", "west", "central", "coast", "mountain", "islands",
];
const CATEGORIES: [&str; 12] = [
    "books", "toys", "kitchen", "garden", "music", "sports", "tools", "office", "beauty", "games",
    "pets", "baby",
];
/// 2026-01-01T00:00:00Z in ms; events spread over a year.
const YEAR_START_MS: i64 = 1_767_225_600_000;
const YEAR_MS: i64 = 365 * 24 * 3600 * 1000;

const DEDUP: &str = "SELECT order_id, customer_id, product_id, region, quantity, unit_price, ts \
                     FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY order_id ORDER BY ts) AS rn \
                     FROM orders) WHERE rn = 1";

/// One reference pipeline: its SQL (run by both engines) and kappa's model configuration.
struct Query {
    name: &'static str,
    what: &'static str,
    sql: String,
    toml: &'static str,
    /// A chain: `silver.s` runs this SQL and configuration, and the model (`sql`, over
    /// `silver.s`) reads its published table. DuckDB runs `batch_sql` instead.
    upstream: Option<(&'static str, &'static str)>,
    batch_sql: Option<String>,
}

fn queries() -> Vec<Query> {
    vec![
        Query {
            name: "Q1",
            what: "stateless transform with a dimension lookup",
            sql:
                "SELECT o.order_id, o.customer_id, o.region, o.quantity * o.unit_price AS amount, \
                  o.quantity * o.unit_price * p.tax_rate AS tax, o.ts \
                  FROM orders o JOIN products p ON o.product_id = p.product_id"
                    .into(),
            toml: "",
            upstream: None,
            batch_sql: None,
        },
        Query {
            name: "Q2",
            what: "GROUP BY customer",
            sql: "SELECT customer_id, count(*) AS orders, sum(quantity * unit_price) AS revenue, \
                  max(ts) AS last_order FROM orders GROUP BY customer_id"
                .into(),
            toml: "",
            upstream: None,
            batch_sql: None,
        },
        Query {
            name: "Q3",
            what: "1-minute tumbling window per region",
            sql: "SELECT date_trunc('minute', ts) AS minute, region, count(*) AS orders, \
                  sum(quantity * unit_price) AS revenue FROM orders \
                  GROUP BY date_trunc('minute', ts), region"
                .into(),
            toml: "event_time = \"ts\"\nwatermark = \"5s\"\n",
            upstream: None,
            batch_sql: None,
        },
        Query {
            name: "Q4",
            what: "dedup by order id",
            sql: DEDUP.into(),
            toml: "event_time = \"ts\"\nwatermark = \"5s\"\n",
            upstream: None,
            batch_sql: None,
        },
        Query {
            name: "Q5",
            what: "gold fact: dedup + products lookup + GROUP BY region, category, day",
            sql: format!(
                "SELECT o.region, p.category, date_trunc('day', o.ts) AS day, count(*) AS orders, \
                 sum(o.quantity * o.unit_price) AS revenue, \
                 sum(o.quantity * o.unit_price * p.tax_rate) AS tax \
                 FROM ({DEDUP}) o JOIN products p ON o.product_id = p.product_id \
                 GROUP BY o.region, p.category, date_trunc('day', o.ts)"
            ),
            toml: "event_time = \"ts\"\nwatermark = \"5s\"\n",
            upstream: None,
            batch_sql: None,
        },
        Query {
            name: "Q6",
            what: "Q4 audited: not_null, range and unique order_id over the whole table on every \
                   commit (Write-Audit-Publish)",
            sql: DEDUP.into(),
            toml: "event_time = \"ts\"\nwatermark = \"5s\"\n\n[[expect]]\nnot_null = \
                   \"customer_id\"\n\n[[expect]]\nrange = { column = \"quantity\", min = 1 \
                   }\n\n[[expect]]\nunique = \"order_id\"\n",
            upstream: None,
            batch_sql: None,
        },
        Query {
            name: "Q5c",
            what: "Q5 as a chain: silver dedup, gold over silver's published table",
            sql:
                "SELECT o.region, p.category, date_trunc('day', o.ts) AS day, count(*) AS orders, \
                  sum(o.quantity * o.unit_price) AS revenue, \
                  sum(o.quantity * o.unit_price * p.tax_rate) AS tax \
                  FROM silver.s o JOIN products p ON o.product_id = p.product_id \
                  GROUP BY o.region, p.category, date_trunc('day', o.ts)"
                    .into(),
            toml: "",
            upstream: Some((DEDUP, "event_time = \"ts\"\nwatermark = \"5s\"\n")),
            batch_sql: Some(format!(
                "SELECT o.region, p.category, date_trunc('day', o.ts) AS day, count(*) AS orders, \
                 sum(o.quantity * o.unit_price) AS revenue, \
                 sum(o.quantity * o.unit_price * p.tax_rate) AS tax \
                 FROM ({DEDUP}) o JOIN products p ON o.product_id = p.product_id \
                 GROUP BY o.region, p.category, date_trunc('day', o.ts)"
            )),
        },
    ]
}

pub(crate) const ORDERS_TOML: &str = "partitions = 4\nkey = \"customer_id\"\n[schema]\norder_id = \"bigint\"\n\
    customer_id = \"string\"\nproduct_id = \"string\"\nregion = \"string\"\nquantity = \"int\"\n\
    unit_price = \"decimal(10,2)\"\nts = \"timestamp\"\n";
const PRODUCTS_TOML: &str = "kind = \"table\"\nkey = \"product_id\"\n[schema]\n\
    product_id = \"string\"\ncategory = \"string\"\ntax_rate = \"decimal(4,3)\"\n";

/// DuckDB's side, run in a child Python process: argv = orders.ndjson products.ndjson sql
/// threads out.parquet; prints {"seconds", "rows", "peak_rss_bytes"}.
const DUCKDB_SCRIPT: &str = r#"
import json, sys, time
import duckdb
orders, products, sql, threads, out = sys.argv[1:6]
con = duckdb.connect()
con.execute(f"SET threads = {int(threads)}")
con.execute("SET TimeZone = 'UTC'")
con.execute("SET enable_progress_bar = false")
con.execute(f"""CREATE VIEW orders AS SELECT * FROM read_json('{orders}', format = 'newline_delimited',
    columns = {{'order_id': 'BIGINT', 'customer_id': 'VARCHAR', 'product_id': 'VARCHAR',
                'region': 'VARCHAR', 'quantity': 'INTEGER', 'unit_price': 'DECIMAL(10,2)',
                'ts': 'TIMESTAMPTZ'}})""")
con.execute(f"""CREATE VIEW products AS SELECT * FROM read_json('{products}', format = 'newline_delimited',
    columns = {{'product_id': 'VARCHAR', 'category': 'VARCHAR', 'tax_rate': 'DECIMAL(4,3)'}})""")
start = time.perf_counter()
con.execute(f"COPY ({sql}) TO '{out}' (FORMAT parquet)")
seconds = time.perf_counter() - start
rows = con.execute(f"SELECT count(*) FROM read_parquet('{out}')").fetchone()[0]
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "rows": rows, "peak_rss_bytes": peak}))
"#;

#[derive(Debug, Serialize)]
pub struct PipelinesReport {
    events: u64,
    ndjson_bytes: u64,
    /// Records appended to the log (events plus redelivered copies).
    records: u64,
    duckdb_version: String,
    queries: Vec<QueryReport>,
}

#[derive(Debug, Serialize)]
struct QueryReport {
    name: &'static str,
    what: &'static str,
    kappa_seconds: f64,
    kappa_events_per_s: f64,
    kappa_rows: u64,
    /// Peak RSS of the benchmark process during this query's replay (the log's page cache is
    /// not counted; the process holds the runner, DataFusion and the lakehouse).
    kappa_peak_rss_bytes: u64,
    duckdb_1_thread_seconds: f64,
    duckdb_1_thread_events_per_s: f64,
    duckdb_all_threads_seconds: f64,
    duckdb_rows: u64,
    duckdb_peak_rss_bytes: u64,
    /// kappa events/s ÷ DuckDB events/s, both on one thread.
    ratio_equal_threads: f64,
    /// kappa (one runner) ÷ DuckDB with every core.
    ratio_vs_all_threads: f64,
}

/// Runs the benchmark in `work` with `events` generated orders, DuckDB through `python`.
pub fn run(
    work: &Path,
    events: u64,
    python: &Path,
    only: Option<&str>,
) -> anyhow::Result<PipelinesReport> {
    let duckdb_version = duckdb_version(python)?;
    let orders_file = work.join("orders.ndjson");
    let products_file = work.join("products.ndjson");
    let log_dir = work.join("log");
    let runtime = tokio::runtime::Runtime::new()?;
    let (records, ndjson_bytes) =
        runtime.block_on(fill(&log_dir, &orders_file, &products_file, events))?;
    note(&format!(
        "{records} records ({ndjson_bytes} B of NDJSON) in the log and in {}",
        orders_file.display()
    ));
    let log = Arc::new(Log::open(&log_dir)?);
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut reports = Vec::new();
    for query in queries() {
        if only.is_some_and(|o| !o.split(',').any(|q| q.eq_ignore_ascii_case(query.name))) {
            continue;
        }
        crate::settle();
        let (kappa_seconds, kappa_rows, kappa_peak) =
            runtime.block_on(replay(&log, work, &query, records))?;
        let out = work.join(format!("{}.parquet", query.name));
        let batch_sql = query.batch_sql.as_ref().unwrap_or(&query.sql);
        let one = duckdb(python, &orders_file, &products_file, batch_sql, 1, &out)?;
        let all = duckdb(
            python,
            &orders_file,
            &products_file,
            batch_sql,
            threads,
            &out,
        )?;
        let _ = std::fs::remove_file(&out);
        let kappa_rate = records as f64 / kappa_seconds;
        let duck_rate = records as f64 / one.seconds;
        let report = QueryReport {
            name: query.name,
            what: query.what,
            kappa_seconds,
            kappa_events_per_s: kappa_rate,
            kappa_rows,
            kappa_peak_rss_bytes: kappa_peak,
            duckdb_1_thread_seconds: one.seconds,
            duckdb_1_thread_events_per_s: duck_rate,
            duckdb_all_threads_seconds: all.seconds,
            duckdb_rows: one.rows,
            duckdb_peak_rss_bytes: one.peak_rss_bytes.max(all.peak_rss_bytes),
            ratio_equal_threads: kappa_rate / duck_rate,
            ratio_vs_all_threads: all.seconds / kappa_seconds,
        };
        note(&format!(
            "{}: kappa {:.2} s ({:.0} ev/s, {} rows, peak {} MiB) · DuckDB 1 thread {:.2} s, \
             {threads} threads {:.2} s ({} rows) · ratio {:.2} (equal threads), {:.2} (all)",
            report.name,
            kappa_seconds,
            kappa_rate,
            kappa_rows,
            kappa_peak >> 20,
            one.seconds,
            all.seconds,
            one.rows,
            report.ratio_equal_threads,
            report.ratio_vs_all_threads
        ));
        reports.push(report);
    }
    log.close()?;
    Ok(PipelinesReport {
        events,
        ndjson_bytes,
        records,
        duckdb_version,
        queries: reports,
    })
}

/// Order `i` of `events`: its customer and its JSON text. Order `i` is at
/// `YEAR_START + i · year / events`, one in ten 2 s earlier (out of order).
pub(crate) fn order_line(rng: &mut Rng, i: u64, events: u64) -> (String, String) {
    let mut ts = YEAR_START_MS + (i128::from(i) * i128::from(YEAR_MS) / i128::from(events)) as i64;
    if i % 10 == 3 {
        ts -= 2000;
    }
    let customer = format!("c{}", rng.below(CUSTOMERS));
    let line = format!(
        "{{\"order_id\":{i},\"customer_id\":\"{customer}\",\"product_id\":\"p{}\",\
         \"region\":\"{}\",\"quantity\":{},\"unit_price\":{}.{:02},\"ts\":\"{}\"}}",
        rng.below(PRODUCTS),
        REGIONS[rng.below(REGIONS.len() as u64) as usize],
        1 + rng.below(5),
        1 + rng.below(200),
        rng.below(100),
        rfc3339(ts)
    );
    (customer, line)
}

/// A small deterministic generator (xorshift64*).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn rfc3339(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(time).to_string()
}

/// Generates the events into the log and into NDJSON files: order `i` at
/// `YEAR_START + i · year / events`, one in ten 2 s out of order, one in fifty followed by a
/// redelivered copy of an order three back. Returns (records, NDJSON bytes).
async fn fill(
    log_dir: &Path,
    orders_file: &Path,
    products_file: &Path,
    events: u64,
) -> anyhow::Result<(u64, u64)> {
    let log = Log::open(log_dir)?;
    let products = log.create_topic("products", TopicConfig::default())?;
    let orders = log.create_topic(
        "orders",
        TopicConfig {
            partitions: 4,
            ..TopicConfig::default()
        },
    )?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut file = BufWriter::new(std::fs::File::create(products_file)?);
    let mut batch = Vec::new();
    for p in 0..PRODUCTS {
        let line = format!(
            "{{\"product_id\":\"p{p}\",\"category\":\"{}\",\"tax_rate\":0.{:03}}}",
            CATEGORIES[(p % CATEGORIES.len() as u64) as usize],
            [0u64, 70, 100, 190, 210][rng.below(5) as usize]
        );
        writeln!(file, "{line}")?;
        batch.push(Record::keyed(format!("p{p}"), line));
    }
    file.flush()?;
    products.append(batch).await?;

    let mut file = BufWriter::with_capacity(1 << 20, std::fs::File::create(orders_file)?);
    let mut bytes = 0u64;
    let mut records = 0u64;
    let mut batch = Vec::with_capacity(APPEND_RECORDS);
    let mut recent: Vec<(String, String)> = Vec::new();
    for i in 0..events {
        let (customer, line) = order_line(&mut rng, i, events);
        recent.push((customer.clone(), line.clone()));
        if recent.len() > 4 {
            recent.remove(0);
        }
        let mut lines = vec![(customer, line)];
        if i % 50 == 49 {
            lines.push(recent[0].clone());
        }
        for (key, line) in lines {
            bytes += line.len() as u64 + 1;
            writeln!(file, "{line}")?;
            batch.push(Record::keyed(key, line));
            records += 1;
        }
        if batch.len() >= APPEND_RECORDS {
            orders.append(std::mem::take(&mut batch)).await?;
        }
    }
    if !batch.is_empty() {
        orders.append(batch).await?;
    }
    file.flush()?;
    tokio::task::spawn_blocking(move || log.close()).await??;
    Ok((records, bytes))
}

/// Replays the whole `orders` topic through `query`'s model; returns (seconds until the last
/// commit covers every partition's end, rows in the table, peak RSS during the replay).
async fn replay(
    log: &Arc<Log>,
    work: &Path,
    query: &Query,
    records: u64,
) -> anyhow::Result<(f64, u64, u64)> {
    let mut files = ProjectFiles::new();
    files.insert("kappa.toml".into(), String::new());
    files.insert("topics/orders.toml".into(), ORDERS_TOML.into());
    files.insert("topics/products.toml".into(), PRODUCTS_TOML.into());
    files.insert("models/gold/q.sql".into(), query.sql.clone());
    if !query.toml.is_empty() {
        files.insert("models/gold/q.toml".into(), query.toml.into());
    }
    if let Some((sql, toml)) = query.upstream {
        files.insert("models/silver/s.sql".into(), sql.into());
        files.insert("models/silver/s.toml".into(), toml.into());
    }
    let mut project = kappa_pipeline::load(&files).map_err(|d| {
        anyhow::anyhow!(
            "{}: {}",
            query.name,
            d.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    if query.upstream.is_some() {
        project
            .reads_tables
            .insert("gold.q".into(), vec!["silver.s".into()]);
    }
    let project = Arc::new(project);
    let data = work.join(format!("lake-{}", query.name));
    let lakehouse = Lakehouse::open(&data).await?;
    let ident = table_ident("gold", "q")?;
    let orders = log.topic("orders")?;
    let ends: Vec<u64> = orders
        .partitions()
        .iter()
        .map(|p| p.offsets().visible_offset)
        .collect();
    anyhow::ensure!(
        ends.iter().sum::<u64>() == records,
        "the log holds every record"
    );
    reset_peak_rss();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let models: Vec<&str> = if query.upstream.is_some() {
        vec!["silver.s", "gold.q"]
    } else {
        vec!["gold.q"]
    };
    let runners: Vec<_> = models
        .iter()
        .map(|model| {
            tokio::spawn(kappa_engine::runner::run_model(
                kappa_engine::event_log::EventLog::Embedded(log.clone()),
                lakehouse.clone(),
                project.clone(),
                (*model).to_owned(),
                stop_rx.clone(),
            ))
        })
        .collect();
    let covers_the_log = |props: &std::collections::HashMap<String, String>| {
        props
            .get(kappa_engine::runner::OFFSETS_PROPERTY)
            .and_then(|o| serde_json::from_str::<kappa_engine::runner::Offsets>(o).ok())
            .and_then(|offsets| offsets.get("orders").cloned())
            .is_some_and(|done| {
                ends.iter()
                    .enumerate()
                    .all(|(p, end)| done.get(&(p as u32)) == Some(end))
            })
    };
    let silver = table_ident("silver", "s")?;
    // Gold's position names the table silver's version writes.
    let silver_key = kappa_engine::upstream::upstream_table(&lakehouse, &project, "silver.s")
        .map(|t| kappa_engine::upstream::table_key(&t))
        .unwrap_or_default();
    let seconds = loop {
        if runners.iter().any(tokio::task::JoinHandle::is_finished) {
            break None;
        }
        let done = match query.upstream {
            // The chain: silver covers the log, and gold has read silver's last commit.
            Some(_) => match (
                lakehouse.load_table(&silver).await,
                lakehouse.last_commit(&ident).await,
            ) {
                (Ok(s), Ok(Some(gold))) => {
                    let silver_props = s
                        .metadata()
                        .current_snapshot()
                        .map(|snap| snap.summary().additional_properties.clone());
                    let last = s
                        .metadata()
                        .current_snapshot()
                        .map_or(0, |snap| snap.sequence_number());
                    let read = gold
                        .get(kappa_engine::runner::OFFSETS_PROPERTY)
                        .and_then(|o| serde_json::from_str::<kappa_engine::runner::Offsets>(o).ok())
                        .and_then(|o| o.get(&silver_key).and_then(|p| p.get(&0)).copied())
                        .unwrap_or(0);
                    silver_props.as_ref().is_some_and(covers_the_log)
                        && i64::try_from(read).is_ok_and(|r| r >= last)
                }
                _ => false,
            },
            None => {
                matches!(lakehouse.last_commit(&ident).await, Ok(Some(p)) if covers_the_log(&p))
            }
        };
        if done {
            break Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let peak = peak_rss_bytes();
    let _ = stop_tx.send(true);
    for runner in runners {
        runner
            .await
            .context("join the runner")?
            .with_context(|| format!("{} failed", query.name))?;
    }
    let seconds = seconds.with_context(|| format!("{} stopped before the end", query.name))?;
    let table = lakehouse.load_table(&ident).await?;
    let rows = table
        .metadata()
        .current_snapshot()
        .and_then(|s| {
            s.summary()
                .additional_properties
                .get("total-records")
                .cloned()
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let _ = std::fs::remove_dir_all(&data);
    Ok((seconds, rows, peak))
}

/// Resets the process's peak RSS to its current RSS (Linux ≥ 4.0), so that each query's peak
/// is its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[derive(Debug, serde::Deserialize)]
struct DuckRun {
    seconds: f64,
    rows: u64,
    peak_rss_bytes: u64,
}

fn duckdb(
    python: &Path,
    orders: &Path,
    products: &Path,
    sql: &str,
    threads: usize,
    out: &Path,
) -> anyhow::Result<DuckRun> {
    crate::settle();
    let output = std::process::Command::new(python)
        .arg("-c")
        .arg(DUCKDB_SCRIPT)
        .arg(orders)
        .arg(products)
        .arg(sql)
        .arg(threads.to_string())
        .arg(out)
        .output()
        .with_context(|| format!("run {}", python.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "DuckDB failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The report is the last line; anything before it is DuckDB talking.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("DuckDB's report: {stdout}"))
}

fn duckdb_version(python: &Path) -> anyhow::Result<String> {
    let output = std::process::Command::new(python)
        .args(["-c", "import duckdb; print(duckdb.__version__)"])
        .output()
        .with_context(|| format!("run {}", python.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "no DuckDB for {}: create a venv with `python3 -m venv target/bench-venv && \
         target/bench-venv/bin/pip install duckdb` and pass --python target/bench-venv/bin/python",
        python.display()
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
