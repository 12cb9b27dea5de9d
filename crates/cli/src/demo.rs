//! `kappa demo`: the Kappa Architecture's story in one command, self-contained, with figures.
//!
//! Writes a shop's project into a temporary folder and runs `kappa up` on it in-process: a year
//! of generated order events flows through bronze → silver → gold, where v1 of the gold model
//! computes the tax wrongly. The fix (v2) is planned and deployed while live events keep
//! arriving: v2 replays all of history beside v1 — silver's committed rows, silver unchanged
//! and not recomputed — then every reader switches at once. The
//! corrected totals are printed next to the same figures tallied while generating the events,
//! and the live events are checked to be all there.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::fmt::thousands;
use anyhow::Context;
use clap::Args;
use kappa_server::client::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How often the demo's reader counts the live rows in bronze.orders.
const READ_EVERY_MS: u64 = 50;
/// Events per HTTP request in the demo.
const DEMO_EVENTS_PER_REQUEST: usize = 1000;
/// One order in this many is delivered twice.
const DUPLICATE_EVERY: u64 = 100;
/// One event in this many is followed by a malformed one (a dead letter).
const BAD_EVERY: u64 = 100_000;
/// 2025-01-01T00:00:00Z: the generated year starts here.
const YEAR_START_MS: i64 = 1_735_689_600_000;
const YEAR_MS: i64 = 365 * 86_400_000;

/// The demo's project folder, v1. Paths are relative to the folder.
const PROJECT: &[(&str, &str)] = &[
    ("kappa.toml", include_str!("demo/kappa.toml")),
    (
        "topics/orders.toml",
        include_str!("demo/topics/orders.toml"),
    ),
    (
        "topics/products.toml",
        include_str!("demo/topics/products.toml"),
    ),
    (
        "models/silver/orders.sql",
        include_str!("demo/models/silver/orders.sql"),
    ),
    (
        "models/silver/orders.toml",
        include_str!("demo/models/silver/orders.toml"),
    ),
    (
        "models/gold/revenue_by_month.sql",
        include_str!("demo/models/gold/revenue_by_month.sql"),
    ),
    (
        "models/gold/revenue_by_month.toml",
        include_str!("demo/models/gold/revenue_by_month.toml"),
    ),
];
/// The gold model with the tax fixed.
const GOLD_V2: &str = include_str!("demo/revenue_by_month.v2.sql");
const GOLD: &str = "gold.revenue_by_month";

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Order events of the generated year (live events come on top).
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Live order events per second during and after the deploy.
    #[arg(long, default_value_t = 2000)]
    live_rate: u64,
    /// Keep the demo's folder (project and data directory) instead of removing it.
    #[arg(long)]
    keep: bool,
    /// Random seed of the generated events.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

const REGIONS: [&str; 5] = ["north", "south", "east", "west", "central"];
/// Categories and their VAT rates in thousandths.
const CATEGORIES: [(&str, i64); 6] = [
    ("books", 70),
    ("garden", 190),
    ("toys", 190),
    ("kitchen", 190),
    ("food", 70),
    ("sports", 190),
];
const PRODUCTS: u32 = 500;
const CUSTOMERS: u32 = 20_000;
/// The partitions of `topics/orders.toml`: the year is produced by one client per partition,
/// each in event-time order, as a partition's events arrive in a real shop.
const ORDER_PARTITIONS: u32 = 4;

/// The partition of a customer's orders (Kafka's partitioner: murmur2 of the key).
fn partition_of(customer: u32) -> u32 {
    (kappa_log::murmur2(format!("c{customer}").as_bytes()) & 0x7fff_ffff) % ORDER_PARTITIONS
}

/// The customers whose orders land in `partition`.
fn customers_of(partition: u32) -> Vec<u32> {
    (1..=CUSTOMERS)
        .filter(|c| partition_of(*c) == partition)
        .collect()
}

fn category_of(product: u32) -> (&'static str, i64) {
    CATEGORIES[product as usize % CATEGORIES.len()]
}

/// Per month (`year * 100 + month`): orders, net revenue in cents, VAT in 1e-5 units — the
/// correct figures, tallied as the events are generated.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct MonthTally {
    orders: u64,
    revenue_cents: i64,
    tax_e5: i64,
}

/// Order events of the demo's shop, reproducible from a seed; order `id` happens at
/// `YEAR_START_MS + (id - 1) * YEAR_MS / events`, so the year's events fill 2025 and live ones
/// go on into 2026. A generator makes every `stride`-th order, from its own customers.
struct Orders {
    rng: StdRng,
    next_id: u64,
    stride: u64,
    customers: Vec<u32>,
    year_events: u64,
    tally: BTreeMap<u32, MonthTally>,
    /// When each generated order happened (epoch ms), for the live check.
    times: Vec<i64>,
    /// The latest order time per partition: the watermark follows the least of them.
    partition_last: BTreeMap<u32, i64>,
    /// The rows these events make in bronze.orders (redelivered copies and malformed events
    /// included: bronze keeps every record).
    bronze_rows: u64,
}

impl Orders {
    fn new(seed: u64, first_id: u64, stride: u64, customers: Vec<u32>, year_events: u64) -> Orders {
        Orders {
            rng: StdRng::seed_from_u64(seed ^ first_id),
            next_id: first_id,
            stride: stride.max(1),
            customers,
            year_events,
            tally: BTreeMap::new(),
            times: Vec::new(),
            partition_last: BTreeMap::new(),
            bronze_rows: 0,
        }
    }

    fn time_of(&self, id: u64) -> i64 {
        YEAR_START_MS + ((id - 1) as i128 * YEAR_MS as i128 / self.year_events as i128) as i64
    }

    /// Appends the next order as a JSON line (sometimes twice, sometimes with a malformed
    /// event after it).
    fn write(&mut self, out: &mut String) {
        let id = self.next_id;
        self.next_id += self.stride;
        let customer = match self.customers.len() {
            0 => self.rng.random_range(1..=CUSTOMERS),
            n => self.customers[self.rng.random_range(0..n)],
        };
        let product = self.rng.random_range(1..=PRODUCTS);
        let quantity = self.rng.random_range(1..=5i64);
        let cents = self.rng.random_range(199..=19_999i64);
        let region = REGIONS[self.rng.random_range(0..REGIONS.len())];
        let ts = self.time_of(id);
        let line = format!(
            "{{\"order_id\":{id},\"customer_id\":\"c{customer}\",\"product_id\":\"p{product}\",\"region\":\"{region}\",\"quantity\":{quantity},\"unit_price\":{}.{:02},\"ts\":{ts}}}\n",
            cents / 100,
            cents % 100
        );
        out.push_str(&line);
        self.bronze_rows += 1;
        if id.is_multiple_of(DUPLICATE_EVERY) {
            out.push_str(&line);
            self.bronze_rows += 1;
        }
        if id.is_multiple_of(BAD_EVERY) {
            self.bronze_rows += 1;
            out.push_str(&format!(
                "{{\"order_id\":{id},\"customer_id\":\"c{customer}\",\"product_id\":\"p{product}\",\"region\":\"{region}\",\"quantity\":\"a few\",\"unit_price\":1.00,\"ts\":{ts}}}\n"
            ));
        }
        let month = self.tally.entry(year_month(ts)).or_default();
        month.orders += 1;
        month.revenue_cents += quantity * cents;
        month.tax_e5 += quantity * cents * category_of(product).1;
        self.times.push(ts);
        let last = self
            .partition_last
            .entry(partition_of(customer))
            .or_default();
        *last = (*last).max(ts);
    }
}

/// `year * 100 + month` of a UTC time (epoch ms), by the days-to-civil-date arithmetic of the
/// proleptic Gregorian calendar.
fn year_month(ms: i64) -> u32 {
    let days = ms.div_euclid(86_400_000) + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year * 100 + month) as u32
}

impl MonthTally {
    fn add(&mut self, other: &MonthTally) {
        self.orders += other.orders;
        self.revenue_cents += other.revenue_cents;
        self.tax_e5 += other.tax_e5;
    }
}

fn merge(into: &mut BTreeMap<u32, MonthTally>, from: &BTreeMap<u32, MonthTally>) {
    for (month, t) in from {
        into.entry(*month).or_default().add(t);
    }
}

/// Runs the demo; its data directory is `data_dir` when given (it must be new or empty, and
/// it is kept), else `.kappa/` in the demo's temporary project folder.
pub(crate) async fn run(args: DemoArgs, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.events > 0 && args.live_rate > 0,
        "--events and --live-rate must be positive"
    );
    if let Some(dir) = &data_dir
        && std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
    {
        anyhow::bail!(
            "the data directory {} is not empty: the demo starts from nothing (name a new or \
             empty folder, or leave --data-dir out to use a temporary one)",
            dir.display()
        );
    }
    let root: PathBuf = std::env::temp_dir().join(format!("kappa-demo-{}", std::process::id()));
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("clear {}", root.display()))?;
    }
    let project = root.join("shop");
    for (path, text) in PROJECT {
        let path = project.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    }
    let named = data_dir.is_some();
    let data_dir = data_dir.unwrap_or_else(|| project.join(".kappa"));
    let config = kappa_server::ServerConfig {
        data_dir: data_dir.clone(),
        http_addr: "127.0.0.1:0".parse()?,
        pg_addr: "127.0.0.1:0".parse()?,
        max_request_bytes: kappa_server::config::REQUEST_BYTES_MAX_DEFAULT,
        body_read_timeout_ms: kappa_server::config::BODY_READ_TIMEOUT_MS_DEFAULT,
        project_dir: Some(project.clone()),
        query_limits: Default::default(),
        pg_auth: None,
    };
    let started = Instant::now();
    let server = kappa_server::Server::start(config).await?;
    let base = format!("http://{}", server.http_addr());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));
    println!("kappa demo — a tax bug found, fixed, replayed over all of history, cut over live");
    println!(
        "  project {} ({}), data in {}{}, HTTP API {base}",
        project.display(),
        if args.keep {
            "kept"
        } else {
            "removed at the end; --keep keeps it"
        },
        data_dir.display(),
        if named { " (kept)" } else { "" }
    );

    let result = story(&args, &project, &base).await;
    let _ = stop_tx.send(());
    serving.await.context("join the server")??;
    if !args.keep {
        std::fs::remove_dir_all(&root).with_context(|| format!("remove {}", root.display()))?;
    }
    if result.is_ok() {
        println!(
            "the whole story took {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    result
}

async fn story(args: &DemoArgs, project: &Path, base: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().no_proxy().build()?;
    let client = Client::http(base);
    println!(
        "[1/7] the project: topics `orders` (4 partitions) and `products` (a table with each \
         product's VAT rate), each kept raw in bronze.<topic>; models silver.orders (typed, \
         duplicates dropped) → {GOLD} (v1)"
    );
    let mut products = String::new();
    for p in 1..=PRODUCTS {
        let (category, rate) = category_of(p);
        products.push_str(&format!(
            "{{\"product_id\":\"p{p}\",\"category\":\"{category}\",\"tax_rate\":0.{rate:03}}}\n"
        ));
    }
    post(
        &http,
        &format!("{base}/v1/topics/products/records?key=product_id"),
        products,
    )
    .await?;

    // The year, from a client per partition.
    let produce_started = Instant::now();
    let mut producers = Vec::new();
    for partition in 0..ORDER_PARTITIONS {
        let http = http.clone();
        let url = format!("{base}/v1/topics/orders/records?key=customer_id");
        let (seed, events) = (args.seed, args.events);
        producers.push(tokio::spawn(async move {
            let (first, stride) = (u64::from(partition) + 1, u64::from(ORDER_PARTITIONS));
            let mut orders = Orders::new(seed, first, stride, customers_of(partition), events);
            let mut bytes = 0u64;
            while orders.next_id <= events {
                let mut body = String::with_capacity(DEMO_EVENTS_PER_REQUEST * 160);
                for _ in 0..DEMO_EVENTS_PER_REQUEST {
                    if orders.next_id > events {
                        break;
                    }
                    orders.write(&mut body);
                }
                bytes += body.len() as u64;
                post(&http, &url, body).await?;
            }
            anyhow::Ok((orders.tally, bytes))
        }));
    }
    let (mut year, mut bytes) = (BTreeMap::new(), 0u64);
    for p in producers {
        let (tally, b) = p.await??;
        merge(&mut year, &tally);
        bytes += b;
    }
    let produced_in = produce_started.elapsed();
    println!(
        "[2/7] produced {} order events of 2025 over HTTP, a client per partition ({:.0} MB, 1 in {DUPLICATE_EVERY} \
         delivered twice, 1 in {} followed by a malformed one) in {:.1} s: {} events/s",
        thousands(args.events),
        bytes as f64 / 1e6,
        thousands(BAD_EVERY),
        produced_in.as_secs_f64(),
        thousands((args.events as f64 / produced_in.as_secs_f64().max(1e-9)) as u64)
    );
    let status = caught_up(&client, None).await?;
    let processed_in = produce_started.elapsed();
    let rows = |model: &str| {
        status
            .models
            .iter()
            .chain(&status.bronze)
            .find(|m| m.model == model)
            .and_then(|m| m.rows)
            .unwrap_or(0)
    };
    let dead: u64 = status.dead_letters.iter().map(|d| d.count).sum();
    println!(
        "[3/7] the pipelines caught up {:.1} s after the first event: bronze.orders {} rows, \
         silver.orders {} rows, {} dead letters (kappa consume dead_letters says why)",
        processed_in.as_secs_f64(),
        thousands(rows("bronze.orders")),
        thousands(rows("silver.orders")),
        thousands(dead)
    );
    let expected = of_2025(&year);
    let v1 = of_2025(&months(&client, GOLD).await?);
    println!(
        "      {GOLD} v1 says: 2025 revenue {}, VAT {} — an effective rate of {:.2} %, but \
         the catalogue's rates are 7 % and 19 %: the VAT is wrong",
        money(v1.revenue_cents, 2),
        money(v1.tax_e5, 5),
        v1.tax_e5 as f64 / 1000.0 / v1.revenue_cents.max(1) as f64 * 100.0
    );
    if v1.orders < expected.orders {
        // Silver emits a deduplicated order once the watermark passes it: the year's last
        // orders wait for later events, and v1's figures for 2025 grow when they come.
        println!(
            "      (v1 counts {} of the year's {} orders so far: the last ones wait in \
             silver.orders until later events move the watermark past them)",
            thousands(v1.orders),
            thousands(expected.orders)
        );
    }

    // Live events from here on, into 2026.
    // Each request's send time and the live rows in bronze once it is in, and a reader
    // counting the live rows bronze.orders shows: an event's latency to visible is from its
    // send to the first count that includes it.
    // Every record appended from here on is a live one.
    let since = kappa_server::api::format_timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
    );
    let live_stop = Arc::new(AtomicBool::new(false));
    // Per request: its send time, the live rows in bronze and the live orders (each once)
    // once it is in.
    let sent = Arc::new(std::sync::Mutex::new(Vec::<(Instant, u64, u64)>::new()));
    let live = {
        let (http, stop, sent) = (http.clone(), live_stop.clone(), sent.clone());
        let url = format!("{base}/v1/topics/orders/records?key=customer_id");
        let (seed, events, rate) = (args.seed, args.events, args.live_rate);
        tokio::spawn(async move {
            let mut orders = Orders::new(seed, events + 1, 1, Vec::new(), events);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let mut body = String::new();
                for _ in 0..rate.div_ceil(10) {
                    orders.write(&mut body);
                }
                let at = Instant::now();
                post(&http, &url, body).await?;
                if let Ok(mut sent) = sent.lock() {
                    sent.push((at, orders.bronze_rows, orders.times.len() as u64));
                }
            }
            anyhow::Ok((orders.times, orders.partition_last))
        })
    };
    let reader_stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, reader) = (reader_stop.clone(), Client::http(base));
        let sql = format!("SELECT count(*) FROM bronze.orders WHERE \"timestamp\" >= '{since}'");
        // The live orders (all after 2025) gold counts: each once, once silver's watermark
        // has passed it and gold has read silver's commit of it.
        let gold_sql = format!(
            "SELECT CAST(coalesce(sum(orders), 0) AS BIGINT) FROM {GOLD} \
             WHERE month >= to_timestamp_millis({})",
            YEAR_START_MS + YEAR_MS
        );
        tokio::spawn(async move {
            let (mut seen, mut seen_gold) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let at = Instant::now();
                if let Ok(n) = count(&reader, &sql).await {
                    seen.push((at, n));
                }
                let at = Instant::now();
                if let Ok(n) = count(&reader, &gold_sql).await {
                    seen_gold.push((at, n));
                }
                tokio::time::sleep(Duration::from_millis(READ_EVERY_MS)).await;
            }
            (seen, seen_gold)
        })
    };

    let gold = project.join("models/gold/revenue_by_month.sql");
    std::fs::write(&gold, GOLD_V2).with_context(|| format!("write {}", gold.display()))?;
    let v1_version = client.deployment().await?.models[GOLD].version.clone();
    println!(
        "[4/7] the fix, in models/gold/revenue_by_month.sql: the prices are net, VAT = amount × \
         rate (v2); live events now arrive at {} a second. `kappa plan`:",
        thousands(args.live_rate)
    );
    let planned = match kappa_server::project::check(project).await? {
        Ok(project) => crate::plan::report(&client, &project).await?,
        Err(problems) => anyhow::bail!("the fixed project does not check: {problems:?}"),
    };
    for line in crate::plan::render(&planned).lines() {
        println!("      {line}");
    }

    // A few seconds of live events before the deploy, for the latency before it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "[5/7] `kappa deploy --wait`: v2 replays all of history (silver.orders' committed \
         rows: silver is unchanged, so it is not recomputed) while v1 serves, is audited \
         against v1 (the model's [audit]), then every reader switches"
    );
    let deploy_started = Instant::now();
    let replaying = client.deploy().await?;
    anyhow::ensure!(
        replaying == [GOLD],
        "the fix should replay {GOLD} alone, the deploy replays {replaying:?}"
    );
    let shown = if std::io::stdout().is_terminal() {
        crate::deploy::Shown::Bar
    } else {
        crate::deploy::Shown::Lines
    };
    let watched = crate::deploy::watch(&client, shown).await?;
    let cutover_in = deploy_started.elapsed();
    let cutover_at = Instant::now();
    for model in &watched.audit {
        for line in model.to_text().lines() {
            println!("      {line}");
        }
    }
    println!(
        "      cut over {:.1} s after the deploy: {} rows replayed at {} rows/s; every reader \
         switched to v2 in one catalog transaction",
        cutover_in.as_secs_f64(),
        thousands(watched.records),
        thousands((watched.records as f64 / cutover_in.as_secs_f64().max(1e-9)) as u64)
    );
    let deployed = client.deployment().await?;
    let v2_version = deployed.models[GOLD].version.clone();
    anyhow::ensure!(
        deployed.models[GOLD].reads_tables == ["silver.orders"],
        "v2 of {GOLD} should have read silver.orders' table instead of recomputing it"
    );

    // Live events go on after the cutover, then stop; everything settles.
    tokio::time::sleep(Duration::from_secs(3)).await;
    live_stop.store(true, Ordering::Relaxed);
    let (live_times, partition_last) = live.await??;
    caught_up(&client, None).await?;
    reader_stop.store(true, Ordering::Relaxed);
    let (seen, seen_gold) = reader.await?;
    let sent = sent.lock().map(|s| s.clone()).unwrap_or_default();
    let sent_rows: Vec<(Instant, u64)> = sent.iter().map(|(at, rows, _)| (*at, *rows)).collect();
    let sent_orders: Vec<(Instant, u64)> = sent.iter().map(|(at, _, n)| (*at, *n)).collect();
    let phases = latencies(&sent_rows, &seen, deploy_started, cutover_at);
    let gold_phases = latencies(&sent_orders, &seen_gold, deploy_started, cutover_at);

    println!(
        "[6/7] 2025 by month: v1 (kept for `kappa rollback {GOLD}`) beside v2, and the VAT \
         tallied while generating the events"
    );
    let by_month = |version: &str| {
        let table = format!(
            "{}.gold__revenue_by_month__{version}",
            kappa_engine::runner::VERSIONS_NAMESPACE
        );
        let client = &client;
        async move { months(client, &table).await }
    };
    let (old, new) = (by_month(&v1_version).await?, by_month(&v2_version).await?);
    println!(
        "      {:<8} {:>8} {:>15} {:>13} {:>13} {:>13}",
        "month", "orders", "revenue", "VAT v1", "VAT v2", "VAT tallied"
    );
    let mut all_equal = true;
    for (month, tallied) in &year {
        let (o, n) = (old.get(month), new.get(month));
        let equal = n == Some(tallied);
        all_equal &= equal;
        println!(
            "      {}-{:02} {:>8} {:>15} {:>13} {:>13} {:>13}{}",
            month / 100,
            month % 100,
            thousands(n.map_or(0, |n| n.orders)),
            money(n.map_or(0, |n| n.revenue_cents), 2),
            money(o.map_or(0, |o| o.tax_e5), 5),
            money(n.map_or(0, |n| n.tax_e5), 5),
            money(tallied.tax_e5, 5),
            if equal { "" } else { "  ≠" }
        );
    }
    let (old_year, new_year) = (of_2025(&old), of_2025(&new));
    let revenue_kept =
        old_year.revenue_cents == new_year.revenue_cents && old_year.orders == new_year.orders;
    println!(
        "      2025: VAT {} (v1 said {}); {} orders, revenue {}{}: {}",
        money(new_year.tax_e5, 5),
        money(old_year.tax_e5, 5),
        thousands(new_year.orders),
        money(new_year.revenue_cents, 2),
        if revenue_kept {
            " in both versions"
        } else {
            ", v1 differs"
        },
        if all_equal && expected == new_year {
            "v2 equals the tally to the cent in every month"
        } else {
            "MISMATCH"
        }
    );

    // Every live order old enough to be final (an hour of event time before the watermark's
    // source, the least of the partitions' latest events; far past the 5 s watermark) is in
    // silver and counted by gold.
    let last = partition_last
        .values()
        .copied()
        .min()
        .unwrap_or(YEAR_START_MS);
    let cutoff = last - 3_600_000;
    let final_live = live_times
        .iter()
        .filter(|t| **t >= YEAR_START_MS + YEAR_MS && **t <= cutoff)
        .count() as u64;
    let in_silver = count(
        &client,
        &format!(
            "SELECT count(*) FROM silver.orders WHERE ts >= to_timestamp_millis({}) \
             AND ts <= to_timestamp_millis({cutoff})",
            YEAR_START_MS + YEAR_MS
        ),
    )
    .await?;
    let silver_all = count(&client, "SELECT count(*) FROM silver.orders").await?;
    let gold_all = count(
        &client,
        "SELECT CAST(sum(orders) AS BIGINT) FROM gold.revenue_by_month",
    )
    .await?;
    let live_ok = in_silver == final_live && gold_all == silver_all;
    println!(
        "[7/7] live events during and after the replay: {} produced; the {} of them final by \
         the watermark are all in silver.orders ({}), and gold counts every silver order \
         ({} = {}): {}",
        thousands(live_times.len() as u64),
        thousands(final_live),
        thousands(in_silver),
        thousands(gold_all),
        thousands(silver_all),
        if live_ok {
            "nothing missed, nothing twice"
        } else {
            "MISMATCH"
        }
    );
    println!(
        "      live event → visible in bronze.orders (p50 / p99, a read every {READ_EVERY_MS} \
         ms): {}",
        shown_phases(&phases)
    );
    println!(
        "      live order → counted in {GOLD} (through silver.orders' deduplication, which \
         emits an order once the watermark passes it, and its published table): {}",
        shown_phases(&gold_phases)
    );
    anyhow::ensure!(
        all_equal && expected == new_year && revenue_kept && live_ok,
        "the demo's checks failed"
    );
    Ok(())
}

/// Latencies by phase as "before the deploy 30 / 95 ms, …" (p50 / p99).
fn shown_phases(phases: &[Vec<f64>; 3]) -> String {
    let shown: Vec<String> = [
        "before the deploy",
        "during the replay",
        "after the cutover",
    ]
    .iter()
    .zip(phases)
    .map(
        |(phase, ms)| match (percentile(ms, 0.5), percentile(ms, 0.99)) {
            (Some(p50), Some(p99)) => format!("{phase} {p50:.0} / {p99:.0} ms"),
            _ => format!("{phase} -"),
        },
    )
    .collect();
    shown.join(", ")
}

/// The latency (ms) of every live request, from its send to the first read that counted its
/// rows, by when it was sent: before the deploy, during the replay, after the cutover.
fn latencies(
    sent: &[(Instant, u64)],
    seen: &[(Instant, u64)],
    deploy: Instant,
    cutover: Instant,
) -> [Vec<f64>; 3] {
    let mut phases: [Vec<f64>; 3] = Default::default();
    for (at, rows) in sent {
        let visible = seen
            .iter()
            .find(|(read, count)| read >= at && count >= rows)
            .map(|(read, _)| read.duration_since(*at).as_secs_f64() * 1000.0);
        let phase = if *at < deploy {
            0
        } else if *at < cutover {
            1
        } else {
            2
        };
        if let Some(ms) = visible {
            phases[phase].push(ms);
        }
    }
    phases
}

/// The `p` quantile (nearest rank) of `values`.
fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

/// Posts NDJSON records; an error carries the server's answer.
async fn post(http: &reqwest::Client, url: &str, body: String) -> anyhow::Result<()> {
    let response = http.post(url).body(body).send().await?;
    anyhow::ensure!(
        response.status().is_success(),
        "produce: {}",
        response.text().await?
    );
    Ok(())
}

/// Waits until every model has committed all of its inputs, twice in a row; returns the status.
async fn caught_up(
    client: &Client,
    project: Option<&kappa_pipeline::Project>,
) -> anyhow::Result<kappa_server::api::StatusResponse> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut settled = 0;
    loop {
        let status = client.status(project).await?;
        if status
            .models
            .iter()
            .chain(&status.bronze)
            .all(|m| m.lag_records == 0 && m.rows.is_some())
        {
            settled += 1;
            if settled == 2 {
                return Ok(status);
            }
        } else {
            settled = 0;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the pipelines did not catch up in 10 minutes: {}",
            status.to_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The 2025 totals of months (`year * 100 + month`).
fn of_2025(months: &BTreeMap<u32, MonthTally>) -> MonthTally {
    let mut year = MonthTally::default();
    for (_, m) in months.range(202501..=202512) {
        year.add(m);
    }
    year
}

/// A gold table's rows by `year * 100 + month`.
async fn months(client: &Client, table: &str) -> anyhow::Result<BTreeMap<u32, MonthTally>> {
    let sql = format!(
        "SELECT CAST(date_part('year', month) * 100 + date_part('month', month) AS BIGINT), \
         CAST(orders AS BIGINT), CAST(revenue AS VARCHAR), \
         CAST(CAST(tax AS DECIMAL(38, 5)) AS VARCHAR) FROM {table}"
    );
    let answer = client.sql(&sql).await?;
    let mut months = BTreeMap::new();
    for row in answer.rows {
        let number = |i: usize| row.get(i).and_then(serde_json::Value::as_i64);
        let text = |i: usize| row.get(i).and_then(serde_json::Value::as_str);
        let parsed = (|| {
            Some((
                u32::try_from(number(0)?).ok()?,
                MonthTally {
                    orders: u64::try_from(number(1)?).ok()?,
                    revenue_cents: scaled(text(2)?, 2)?,
                    tax_e5: scaled(text(3)?, 5)?,
                },
            ))
        })();
        let (month, tally) =
            parsed.with_context(|| format!("an unexpected row of {table}: {row:?}"))?;
        months.insert(month, tally);
    }
    Ok(months)
}

async fn count(client: &Client, sql: &str) -> anyhow::Result<u64> {
    let answer = client.sql(sql).await?;
    answer
        .rows
        .first()
        .and_then(|row| row.first())
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("{sql}: expected one count, got {:?}", answer.rows))
}

/// A decimal's text as an integer of `scale` decimal places, when it has no more non-zero ones.
fn scaled(text: &str, scale: usize) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let fraction = fraction.trim_end_matches('0');
    if fraction.len() > scale {
        return None;
    }
    let mut value: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    for i in 0..scale {
        let digit = fraction
            .as_bytes()
            .get(i)
            .map_or(0, |b| b.wrapping_sub(b'0'));
        if digit > 9 {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(i64::from(digit))?;
    }
    Some(if negative { -value } else { value })
}

/// An amount of `scale` decimal places, shown to the cent with thousands separators.
fn money(value: i64, scale: u32) -> String {
    let cents = value as f64 / 10f64.powi(scale as i32 - 2);
    let cents = cents.round() as i64;
    let sign = if cents < 0 { "-" } else { "" };
    format!(
        "{sign}{}.{:02}",
        thousands(cents.unsigned_abs() / 100),
        cents.unsigned_abs() % 100
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_of_the_year_and_its_edges() {
        assert_eq!(year_month(YEAR_START_MS), 202501);
        assert_eq!(year_month(YEAR_START_MS - 1), 202412);
        assert_eq!(year_month(YEAR_START_MS + 59 * 86_400_000), 202503);
        assert_eq!(year_month(YEAR_START_MS + YEAR_MS - 1), 202512);
        assert_eq!(year_month(YEAR_START_MS + YEAR_MS), 202601);
        // 2024 was a leap year: 306 days before 2025 is 1 March, 307 days is 29 February.
        assert_eq!(year_month(YEAR_START_MS - 306 * 86_400_000), 202403);
        assert_eq!(year_month(YEAR_START_MS - 307 * 86_400_000), 202402);
    }

    #[test]
    fn latencies_run_from_the_send_to_the_first_read_that_counts_it() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let sent = [(at(0), 10), (at(100), 20), (at(200), 30)];
        let seen = [(at(50), 5), (at(120), 10), (at(180), 20), (at(400), 30)];
        let phases = latencies(&sent, &seen, at(100), at(200));
        assert_eq!(phases, [vec![120.0], vec![80.0], vec![200.0]]);
        assert_eq!(percentile(&[3.0, 1.0, 2.0, 4.0], 0.5), Some(2.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0, 4.0], 0.99), Some(4.0));
        assert_eq!(percentile(&[], 0.99), None);
    }

    #[test]
    fn decimals_become_integers_of_their_scale() {
        assert_eq!(scaled("1234.5", 2), Some(123_450));
        assert_eq!(scaled("-0.07000", 5), Some(-7_000));
        assert_eq!(scaled("12", 5), Some(1_200_000));
        assert_eq!(scaled("1.234", 2), None);
        assert_eq!(scaled("1.2x", 2), None);
        assert_eq!(money(123_456_789, 5), "1,234.57");
        assert_eq!(money(-5, 2), "-0.05");
    }

    #[test]
    fn a_year_of_orders_fills_2025_and_the_tally_counts_each_once() {
        let mut orders = Orders::new(7, 1, 1, Vec::new(), 1000);
        let mut out = String::new();
        for _ in 0..1000 {
            orders.write(&mut out);
        }
        assert_eq!(out.lines().count(), 1000 + 10, "10 duplicates");
        let months: Vec<u32> = orders.tally.keys().copied().collect();
        assert_eq!(months.len(), 12);
        assert_eq!((months[0], months[11]), (202501, 202512));
        assert_eq!(orders.tally.values().map(|m| m.orders).sum::<u64>(), 1000);
    }

    #[test]
    fn each_partition_gets_its_own_customers_in_event_time_order() {
        assert!(include_str!("demo/topics/orders.toml").contains("partitions = 4\n"));
        let all: usize = (0..ORDER_PARTITIONS).map(|p| customers_of(p).len()).sum();
        assert_eq!(all, CUSTOMERS as usize);
        let customers = customers_of(2);
        let mut orders = Orders::new(7, 3, 4, customers.clone(), 1000);
        let mut out = String::new();
        for _ in 0..50 {
            orders.write(&mut out);
        }
        assert!(orders.times.windows(2).all(|w| w[0] < w[1]));
        for line in out.lines() {
            let record: serde_json::Value = serde_json::from_str(line).expect("JSON lines");
            let customer = record["customer_id"].as_str().expect("a customer");
            let n: u32 = customer[1..].parse().expect("c<number>");
            assert!(customers.contains(&n), "{customer} is not partition 2's");
        }
    }
}
