//! kill -9 during ingest, many times: every acknowledged record is in the log exactly once, at
//! its acknowledged offset; unacknowledged records appear at most once.
//!
//! `KAPPA_CRASH_SEED` reproduces a run; `KAPPA_CRASH_KILLS` sets the number of kills (≥ 50).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kappa_log::Log;
use kappa_testkit::data::{tagged_contents, tagged_value};
use kappa_testkit::process::KappaProcess;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::KAPPA;

const CLIENTS: usize = 4;
const PARTITIONS: u32 = 3;

/// What the clients were told: record id → (partition, offset).
type Acked = Arc<Mutex<HashMap<String, (u32, u64)>>>;

async fn client_loop(
    base: String,
    iteration: usize,
    client: usize,
    seed: u64,
    acked: Acked,
    first_ack: Arc<tokio::sync::Notify>,
) {
    let http = reqwest::Client::new();
    let mut rng = StdRng::seed_from_u64(seed ^ ((iteration * 31 + client) as u64));
    for request in 0.. {
        let n = rng.random_range(1..=30);
        let mut body = Vec::new();
        let mut ids = Vec::new();
        for i in 0..n {
            let id = format!("i{iteration}c{client}r{request}n{i}");
            let value = tagged_value(&id, rng.random_range(20..400));
            // The key field decides the partition; several keys spread a request over partitions.
            let mut line = value[..value.len() - 1].to_vec();
            line.extend_from_slice(format!(r#","k":"key{}"}}"#, rng.random_range(0..7)).as_bytes());
            body.extend_from_slice(&line);
            body.push(b'\n');
            ids.push(id);
        }
        let url = format!("{base}/v1/topics/crash/records?key=k");
        let Ok(response) = http.post(url).body(body).send().await else {
            return;
        };
        if !response.status().is_success() {
            return;
        }
        let Ok(placed) = response.json::<kappa_server::api::ProduceResponse>().await else {
            return;
        };
        assert_eq!(placed.offsets.len(), ids.len());
        {
            let mut acked = acked.lock().unwrap();
            for (id, place) in ids.into_iter().zip(placed.offsets) {
                acked.insert(id, (place.partition, place.offset));
            }
        }
        first_ack.notify_one();
    }
}

/// Reads the whole log directly and checks it against what was acknowledged.
fn verify(
    log_dir: &std::path::Path,
    acked: &HashMap<String, (u32, u64)>,
    kill: usize,
    seed: u64,
) -> usize {
    let log = Log::open(log_dir)
        .unwrap_or_else(|e| panic!("kill {kill} (seed {seed}): reopen failed: {e}"));
    let found =
        tagged_contents(&log, "crash").unwrap_or_else(|e| panic!("kill {kill} (seed {seed}): {e}"));
    for (id, place) in acked {
        match found.get(id) {
            Some(at) if at == place => {}
            Some(at) => panic!(
                "kill {kill} (seed {seed}): acknowledged {id} at {place:?} but found at {at:?}"
            ),
            None => {
                panic!("kill {kill} (seed {seed}): acknowledged record {id} at {place:?} is lost")
            }
        }
    }
    log.close().unwrap();
    found.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_ingest_loses_nothing_acknowledged() {
    let seed: u64 = std::env::var("KAPPA_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let kills: usize = std::env::var("KAPPA_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
        .max(50);
    println!(
        "crash test: seed {seed}, {kills} kills (KAPPA_CRASH_SEED={seed} reproduces the schedule)"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let created = crate::kappa(
        &data_dir,
        &[
            "topics",
            "create",
            "crash",
            "--partitions",
            &PARTITIONS.to_string(),
        ],
        None,
    );
    assert!(created.status.success(), "{}", crate::stderr(&created));

    let acked: Acked = Arc::new(Mutex::new(HashMap::new()));
    let mut stored = 0;
    for kill in 0..kills {
        let server = KappaProcess::start(KAPPA.as_ref(), &data_dir, &[]).unwrap();
        let first_ack = Arc::new(tokio::sync::Notify::new());
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                tokio::spawn(client_loop(
                    server.base.clone(),
                    kill,
                    c,
                    seed,
                    acked.clone(),
                    first_ack.clone(),
                ))
            })
            .collect();
        // Kill at a random moment once ingest is under way.
        let _ = tokio::time::timeout(Duration::from_secs(10), first_ack.notified()).await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
        server.kill9().unwrap();
        for c in clients {
            c.await.unwrap();
        }
        let snapshot = acked.lock().unwrap().clone();
        let log_dir = data_dir.join("log");
        stored = tokio::task::spawn_blocking(move || verify(&log_dir, &snapshot, kill, seed))
            .await
            .unwrap();
    }
    let acknowledged = acked.lock().unwrap().len();
    println!(
        "crash test: {kills} kills, {acknowledged} acknowledged records all present once, {stored} stored"
    );
    assert!(
        acknowledged > kills * 10,
        "too little was acknowledged to mean anything: {acknowledged}"
    );
}
