//! kill -9 of `kappa up` while it processes: the example project's models (dedup, a products
//! lookup, GROUP BY upserts, a row-by-row model) end with the tables a clean run produces, and
//! every bad or late record is in `dead_letters` exactly once.
//!
//! `KAPPA_CRASH_SEED` reproduces a run.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use kappa_testkit::process::KappaProcess;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{KAPPA, kappa, stderr, stdout};

const MODELS: [&str; 4] = [
    "silver.orders",
    "silver.amounts",
    "gold.revenue_by_category",
    "gold.revenue_by_region",
];
const ORDERS: u64 = 4000;
const CHUNKS: u64 = 8;

/// Order events for the example project: one second apart, one in seven 3 s early (within
/// the 5 s watermark), one in 97 a minute late, one in thirteen followed by a copy of an
/// order two back, one in 500 missing most fields.
fn orders(from: u64, to: u64) -> String {
    let line = |id: u64| {
        if id % 500 == 250 {
            return format!("{{\"order_id\":{id},\"customer_id\":\"c1\",\"quantity\":\"many\"}}\n");
        }
        let mut seconds = 1_767_600_000 + id as i64;
        if id % 7 == 3 {
            seconds -= 3;
        }
        if id % 97 == 50 {
            seconds -= 60;
        }
        format!(
            "{{\"order_id\":{id},\"customer_id\":\"c{}\",\"product_id\":\"p{}\",\"region\":\"{}\",\
             \"quantity\":{},\"unit_price\":{}.{:02},\"ts\":{}}}\n",
            id % 17,
            [3, 7, 11, 5][(id % 4) as usize],
            ["north", "south", "east", "west"][(id % 4) as usize],
            id % 5,
            id % 40,
            id % 100,
            seconds * 1000
        )
    };
    let mut out = String::new();
    for id in from..to {
        out.push_str(&line(id));
        if id % 13 == 6 && id >= 2 {
            out.push_str(&line(id - 2));
        }
    }
    out
}

fn produce(data: &Path, project: &Path, topic: &str, key: &str, body: &str) {
    let out = kappa(
        data,
        &[
            "--project",
            project.to_str().unwrap(),
            "produce",
            topic,
            "--key",
            key,
        ],
        Some(body.as_bytes()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Starts `kappa up`, waits until every model has committed everything, and returns every
/// table's rows (sorted) and the dead letters' (topic, partition, offset, reason).
fn start(data: &Path, project: &Path) -> KappaProcess {
    KappaProcess::start(
        KAPPA.as_ref(),
        data,
        &["--project", project.to_str().unwrap()],
    )
    .unwrap()
}

/// A data directory with the project's topics (a first `kappa up` creates them) and products.
fn prepare(data: &Path, project: &Path, products: &str) {
    start(data, project).terminate().unwrap();
    produce(data, project, "products", "product_id", products);
}

/// Appends the orders of chunk `chunk`.
fn produce_chunk(data: &Path, project: &Path, chunk: u64) {
    let per_chunk = ORDERS / CHUNKS;
    let body = orders(chunk * per_chunk, (chunk + 1) * per_chunk);
    produce(data, project, "orders", "customer_id", &body);
}

/// A dead letter: topic, partition, offset, reason.
type Letter = (String, u64, u64, String);

fn settle(data: &Path, project: &Path) -> (Vec<Vec<String>>, Vec<Letter>) {
    let up = start(data, project);
    crate::wait_caught_up(
        data,
        project.to_str().unwrap(),
        MODELS.len(),
        Duration::from_secs(60),
    );
    let tables = MODELS
        .iter()
        .map(|model| {
            let out = kappa(
                data,
                &["sql", &format!("SELECT * FROM {model}"), "--json"],
                None,
            );
            assert!(out.status.success(), "{}", stderr(&out));
            let result: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
            let mut rows: Vec<String> = result["rows"]
                .as_array()
                .unwrap()
                .iter()
                .map(ToString::to_string)
                .collect();
            rows.sort();
            rows
        })
        .collect();
    let out = kappa(data, &["consume", "dead_letters", "--from-beginning"], None);
    let mut letters: Vec<Letter> = stdout(&out)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["topic"].as_str().unwrap().to_owned(),
                v["partition"].as_u64().unwrap(),
                v["offset"].as_u64().unwrap(),
                v["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    letters.sort();
    assert!(up.terminate().unwrap().success());
    (tables, letters)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_processing_ends_with_a_clean_runs_tables() {
    let seed: u64 = std::env::var("KAPPA_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("processing crash test: seed {seed} (KAPPA_CRASH_SEED={seed} reproduces it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("shop");
    let init = std::process::Command::new(KAPPA)
        .arg("init")
        .arg(&project)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", stderr(&init));
    std::fs::write(
        project.join("models/silver/amounts.sql"),
        "SELECT order_id, region, quantity * unit_price AS amount FROM orders WHERE quantity > 0",
    )
    .unwrap();
    let products = std::fs::read_to_string(project.join("data/products.ndjson")).unwrap();

    // Crashing run: orders arrive in chunks; `kappa up` is killed during each, at 20–340 ms.
    let crashed = tmp.path().join("crashed");
    prepare(&crashed, &project, &products);
    let mut mid_processing = 0;
    for chunk in 0..CHUNKS {
        produce_chunk(&crashed, &project, chunk);
        let up = start(&crashed, &project);
        // Spread over the phases: the first kills land during start-up or the first commits,
        // the later ones mid-stream or after catching up; the jitter comes from the seed.
        let delay = 20 + chunk * 40 + rng.random_range(0..40);
        std::thread::sleep(Duration::from_millis(delay));
        up.kill9().unwrap();
        // Where the kill landed: what each model had committed by then.
        let lags = crate::lags(&crashed, project.to_str().unwrap());
        eprintln!("kill {chunk}: records not yet committed per model {lags:?}");
        if lags.iter().any(|&lag| lag > 0) {
            mid_processing += 1;
        }
    }
    assert!(
        mid_processing > 0,
        "no kill landed before the models caught up (seed {seed})"
    );
    let (tables, letters) = settle(&crashed, &project);

    // Clean run: the same records, one `kappa up` that is never killed.
    let clean = tmp.path().join("clean");
    prepare(&clean, &project, &products);
    for chunk in 0..CHUNKS {
        produce_chunk(&clean, &project, chunk);
    }
    let (clean_tables, clean_letters) = settle(&clean, &project);

    for ((model, got), want) in MODELS.iter().zip(&tables).zip(&clean_tables) {
        assert!(!want.is_empty(), "{model} has rows");
        assert_eq!(got, want, "{model} after kill -9 (seed {seed})");
    }
    let unique: BTreeSet<_> = letters.iter().map(|(t, p, o, _)| (t, p, o)).collect();
    assert_eq!(
        unique.len(),
        letters.len(),
        "a dead letter twice (seed {seed})"
    );
    assert_eq!(letters, clean_letters, "dead letters (seed {seed})");
    assert!(letters.iter().any(|l| l.3.starts_with("late")));
    assert!(
        letters
            .iter()
            .any(|l| l.3.starts_with("required field `product_id`"))
    );
}
