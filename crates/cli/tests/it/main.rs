//! Tests of the `kappa` binary, one test binary (see STYLE.md).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on unexpected errors"
)]

mod bronze;
mod cli;
mod crash;
mod dimensions;
mod golden;
mod metrics;
mod pg;
mod processing_crash;
mod quality;
mod ui;

use std::path::Path;
use std::process::{Command, Output};

pub const KAPPA: &str = env!("CARGO_BIN_EXE_kappa");

/// Runs `kappa ARGS` on a data directory, with optional stdin.
pub fn kappa(data_dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    let mut child = Command::new(KAPPA)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(input) = stdin {
        pipe.write_all(input).unwrap();
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

/// `kappa status --json` of a project on a data directory (through its server if one runs);
/// null while the status cannot be read.
pub fn status(data_dir: &Path, project: &str) -> serde_json::Value {
    let out = kappa(data_dir, &["--project", project, "status", "--json"], None);
    serde_json::from_str(&stdout(&out)).unwrap_or(serde_json::Value::Null)
}

/// Each model's records not yet covered by its table's last commit.
pub fn lags(data_dir: &Path, project: &str) -> Vec<u64> {
    let status = status(data_dir, project);
    status["models"]
        .as_array()
        .unwrap_or_else(|| panic!("no status: {status}"))
        .iter()
        .map(|m| m["lag_records"].as_u64().unwrap())
        .collect()
}

/// Waits until `models` models run and have committed everything in the log.
pub fn wait_caught_up(data_dir: &Path, project: &str, models: usize, timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let status = status(data_dir, project);
        let done = status["models"].as_array().is_some_and(|all| {
            all.len() == models
                && all
                    .iter()
                    .all(|m| m["lag_records"] == 0 && m["state"] == "running")
        });
        if done {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never caught up: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The `server.json` of a running `kappa up`: its pid and addresses (`http`, `pg`).
pub fn server_file(data_dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(data_dir.join("server.json")).unwrap()).unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
