//! `kappa demo`: the log's part of the story, self-contained, with figures.
//!
//! Starts kappa in-process on a fresh data directory, streams generated order events through
//! the HTTP API from concurrent clients while a follower reads them live, then replays the whole
//! topic from offset 0 — checking along the way that nothing was lost or duplicated.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fmt::thousands;
use anyhow::Context;
use clap::Args;
use kappa_log::{Log, StartAt, TopicConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Events per HTTP request in the demo.
const DEMO_EVENTS_PER_REQUEST: usize = 1000;

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Order events to generate.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Concurrent HTTP clients producing.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Partitions of the `orders` topic.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Keep the demo's data directory instead of removing it.
    #[arg(long)]
    keep: bool,
    /// Random seed of the generated events.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

const REGIONS: [&str; 5] = ["north", "south", "east", "west", "central"];
const CATEGORIES: [&str; 6] = ["books", "garden", "toys", "kitchen", "music", "sports"];

/// Order events of the demo's shop, reproducible from a seed.
struct Orders {
    rng: StdRng,
    next_id: u64,
    start_ms: i64,
}

impl Orders {
    fn new(seed: u64, first_id: u64) -> Orders {
        Orders {
            rng: StdRng::seed_from_u64(seed ^ first_id),
            next_id: first_id,
            start_ms: 1_735_689_600_000,
        }
    }

    /// Appends one event as a JSON line; returns its quantity.
    fn write(&mut self, out: &mut String) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let customer = self.rng.random_range(1..=20_000u32);
        let product = self.rng.random_range(1..=500u32);
        let quantity = self.rng.random_range(1..=5u64);
        let cents = self.rng.random_range(199..=19_999u32);
        let region = REGIONS[self.rng.random_range(0..REGIONS.len())];
        let category = CATEGORIES[product as usize % CATEGORIES.len()];
        // A year of events, spread evenly.
        let ts = self.start_ms + (id as i64 * 31_536) % 31_536_000_000;
        out.push_str(&format!(
            "{{\"order_id\":{id},\"customer_id\":\"c{customer}\",\"product_id\":\"p{product}\",\"category\":\"{category}\",\"region\":\"{region}\",\"quantity\":{quantity},\"unit_price\":{}.{:02},\"ts\":{ts}}}\n",
            cents / 100,
            cents % 100
        ));
        quantity
    }
}

/// The `quantity` of an order event, read without a full JSON parse.
fn quantity_of(value: &[u8]) -> u64 {
    const FIELD: &[u8] = b"\"quantity\":";
    value
        .windows(FIELD.len())
        .position(|w| w == FIELD)
        .map(|at| {
            value[at + FIELD.len()..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .fold(0u64, |n, b| n * 10 + u64::from(b - b'0'))
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.events > 0 && args.clients > 0,
        "--events and --clients must be positive"
    );
    let data_dir: PathBuf = std::env::temp_dir().join(format!("kappa-demo-{}", std::process::id()));
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)
            .with_context(|| format!("clear {}", data_dir.display()))?;
    }
    let config = kappa_server::ServerConfig {
        data_dir: data_dir.clone(),
        http_addr: "127.0.0.1:0".parse()?,
        max_request_bytes: kappa_server::config::REQUEST_BYTES_MAX_DEFAULT,
        body_read_timeout_ms: kappa_server::config::BODY_READ_TIMEOUT_MS_DEFAULT,
        project_dir: None,
    };
    let server = kappa_server::Server::start(config).await?;
    let base = format!("http://{}", server.http_addr());
    let log = server.log().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));
    println!("kappa demo — the embedded log");
    println!(
        "  data directory {} ({})",
        data_dir.display(),
        if args.keep {
            "kept"
        } else {
            "removed at the end; --keep keeps it"
        }
    );
    println!("  HTTP API       {base}");

    let result = story(&args, &base, &log).await;
    let _ = stop_tx.send(());
    drop(log);
    serving.await.context("join the server")??;
    if !args.keep {
        std::fs::remove_dir_all(&data_dir)
            .with_context(|| format!("remove {}", data_dir.display()))?;
    }
    result
}

async fn story(args: &DemoArgs, base: &str, log: &Arc<Log>) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().no_proxy().build()?;
    let create =
        serde_json::json!({ "name": "orders", "config": { "partitions": args.partitions } });
    let response = http
        .post(format!("{base}/v1/topics"))
        .json(&create)
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "create topic: {}",
        response.text().await?
    );
    let topic = log.topic("orders")?;
    println!(
        "[1/4] created topic `orders`: {} partitions, fsync {} (acknowledged = on disk)",
        args.partitions,
        TopicConfig::default().fsync
    );

    // Followers read every partition live, from offset 0, while the events arrive.
    let (targets_tx, targets_rx) = tokio::sync::watch::channel::<Option<Vec<u64>>>(None);
    let mut followers = Vec::new();
    for p in 0..args.partitions {
        let mut reader = topic.partition(p)?.reader(StartAt::Beginning)?;
        let mut targets = targets_rx.clone();
        followers.push(tokio::spawn(async move {
            let (mut seen, mut quantity, mut gaps) = (0u64, 0u64, 0u64);
            let mut expected = 0u64;
            loop {
                while let Some(chunk) = reader.read(1 << 20)? {
                    for record in chunk.records() {
                        let record = record?;
                        if record.offset != expected {
                            gaps += 1;
                        }
                        expected = record.offset + 1;
                        seen += 1;
                        quantity += quantity_of(record.value);
                    }
                }
                if let Some(t) = targets.borrow().as_ref()
                    && reader.next_offset() >= t[p as usize]
                {
                    return anyhow::Ok((seen, quantity, gaps));
                }
                tokio::select! {
                    waited = reader.wait() => waited?,
                    changed = targets.changed() => changed?,
                }
            }
        }));
    }

    println!(
        "[2/4] producing {} order events over HTTP from {} clients, {} per request, keyed by customer_id",
        thousands(args.events as u64),
        args.clients,
        DEMO_EVENTS_PER_REQUEST
    );
    let started = Instant::now();
    let mut producers = Vec::new();
    let per_client = args.events.div_ceil(args.clients);
    for c in 0..args.clients {
        let first = c * per_client;
        let last = ((c + 1) * per_client).min(args.events);
        let http = http.clone();
        let url = format!("{base}/v1/topics/orders/records?key=customer_id");
        let seed = args.seed;
        producers.push(tokio::spawn(async move {
            let mut orders = Orders::new(seed, first as u64 + 1);
            let (mut latencies, mut bytes, mut quantity) = (Vec::new(), 0u64, 0u64);
            let mut at = first;
            while at < last {
                let n = DEMO_EVENTS_PER_REQUEST.min(last - at);
                let mut body = String::with_capacity(n * 200);
                for _ in 0..n {
                    quantity += orders.write(&mut body);
                }
                bytes += body.len() as u64;
                let sent = Instant::now();
                let response = http.post(&url).body(body).send().await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "produce: {}",
                    response.text().await?
                );
                latencies.push(sent.elapsed());
                at += n;
            }
            anyhow::Ok((latencies, bytes, quantity))
        }));
    }
    let (mut latencies, mut bytes, mut produced_quantity) = (Vec::new(), 0u64, 0u64);
    for p in producers {
        let (l, b, q) = p.await??;
        latencies.extend(l);
        bytes += b;
        produced_quantity += q;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let events = args.events as u64;
    println!(
        "      {} events, {:.1} MB in {:.2} s: {} events/s, {:.1} MB/s; acknowledgement p50 {} ms, p99 {} ms",
        thousands(events),
        bytes as f64 / 1e6,
        elapsed.as_secs_f64(),
        thousands((events as f64 / elapsed.as_secs_f64()) as u64),
        bytes as f64 / 1e6 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.5).as_millis(),
        percentile(&latencies, 0.99).as_millis()
    );

    let visible: Vec<u64> = topic
        .stats()
        .iter()
        .map(|s| s.offsets.visible_offset)
        .collect();
    let _ = targets_tx.send(Some(visible.clone()));
    let (mut seen, mut live_quantity, mut gaps) = (0u64, 0u64, 0u64);
    for f in followers {
        let (s, q, g) = f.await??;
        seen += s;
        live_quantity += q;
        gaps += g;
    }
    let follower_done = started.elapsed();
    println!(
        "[3/4] a follower read every event live: {} events ({} gaps, {} duplicates), caught up {} ms after the last acknowledgement",
        thousands(seen),
        gaps,
        seen.saturating_sub(events),
        follower_done.saturating_sub(elapsed).as_millis()
    );

    let replay_started = Instant::now();
    let (mut replayed, mut replay_bytes, mut replay_quantity) = (0u64, 0u64, 0u64);
    for p in 0..args.partitions {
        let mut reader = topic.partition(p)?.reader(StartAt::Beginning)?;
        let counted = tokio::task::spawn_blocking(move || {
            let (mut n, mut b, mut q) = (0u64, 0u64, 0u64);
            while let Some(chunk) = reader.read(1 << 20)? {
                b += chunk.byte_len() as u64;
                for record in chunk.records() {
                    q += quantity_of(record?.value);
                    n += 1;
                }
            }
            anyhow::Ok((n, b, q))
        })
        .await??;
        replayed += counted.0;
        replay_bytes += counted.1;
        replay_quantity += counted.2;
    }
    let replay_time = replay_started.elapsed();
    println!(
        "[4/4] replayed the whole topic from offset 0: {} events, {:.1} MB in {:.2} s ({} events/s, {:.0} MB/s)",
        thousands(replayed),
        replay_bytes as f64 / 1e6,
        replay_time.as_secs_f64(),
        thousands((replayed as f64 / replay_time.as_secs_f64().max(1e-9)) as u64),
        replay_bytes as f64 / 1e6 / replay_time.as_secs_f64().max(1e-9)
    );
    let ok = seen == events
        && replayed == events
        && gaps == 0
        && live_quantity == produced_quantity
        && replay_quantity == produced_quantity;
    println!(
        "  check: items ordered — produced {}, read live {}, replayed {}: {}",
        thousands(produced_quantity),
        thousands(live_quantity),
        thousands(replay_quantity),
        if ok { "all equal" } else { "MISMATCH" }
    );
    println!("  offsets per partition: {visible:?}");
    anyhow::ensure!(
        ok,
        "the demo's check failed: the log lost or duplicated events"
    );
    Ok(())
}
