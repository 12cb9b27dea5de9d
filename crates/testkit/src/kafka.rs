//! A Kafka-protocol broker on 127.0.0.1 for the tests: tansu (a broker in Rust, crates.io),
//! storing in SQLite under a temporary directory. The first test that needs it installs it
//! (`cargo install`, about 12 minutes on 2 cores) under `target/kappa-test-tools/`, once, then
//! reuses it, so `cargo test` works on a fresh machine that has only Rust.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::python::{exclusive, free_port, target_dir, wait_listening};

/// The tansu release the tests run, and the feature that gives it a storage engine that works
/// on its own (SQLite).
const TANSU_VERSION: &str = "0.6.0";
const TANSU_FEATURES: &str = "libsql";

/// The tansu binary, installed when missing. Panics with the reason when it cannot be.
pub fn tansu() -> PathBuf {
    let root = target_dir().join("kappa-test-tools");
    let binary = root.join("bin/tansu");
    let marker = root.join(format!("tansu-{TANSU_VERSION}-{TANSU_FEATURES}"));
    std::fs::create_dir_all(&root).expect("create target/kappa-test-tools");
    let _lock = exclusive(&root.join("install.lock"));
    if !(binary.exists() && marker.exists()) {
        eprintln!(
            "installing the Kafka broker the tests use: cargo install tansu {TANSU_VERSION} \
             (about 12 minutes, once)"
        );
        // Built aside (not in the workspace's target/, whose lock the running tests' cargo
        // may hold), then that build is removed.
        let build = root.join("build");
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["install", "tansu", "--version", TANSU_VERSION])
            .args(["--features", TANSU_FEATURES, "--root"])
            .arg(&root)
            .arg("--target-dir")
            .arg(&build)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .output()
            .unwrap_or_else(|e| panic!("cargo install tansu: {e}"));
        assert!(
            out.status.success(),
            "cargo install tansu {TANSU_VERSION} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_dir_all(&build);
        std::fs::write(&marker, "").expect("write the tansu marker");
    }
    binary
}

/// A tansu broker on a free loopback port for as long as it lives.
#[derive(Debug)]
pub struct Broker {
    child: Option<Child>,
    port: u16,
    storage: PathBuf,
    /// `127.0.0.1:PORT`, what `bootstrap.servers` names.
    pub bootstrap: String,
}

impl Broker {
    /// Starts a broker storing under `dir`.
    pub fn start(dir: &Path) -> Broker {
        let port = free_port();
        let mut broker = Broker {
            child: None,
            port,
            storage: dir.join("tansu.db"),
            bootstrap: format!("127.0.0.1:{port}"),
        };
        broker.restart();
        broker
    }

    /// Starts the broker again on the same port and storage (after [`Broker::kill9`]).
    pub fn restart(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        // tansu resolves the SQLite URL's path against its working directory.
        let folder = self.storage.parent().unwrap_or(Path::new("."));
        let file = self
            .storage
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let child = Command::new(tansu())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .arg("--storage-engine")
            .arg(format!("sqlite://{file}"))
            .current_dir(folder)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start tansu: {e}"));
        self.child = Some(child);
        wait_listening(self.port, "tansu");
    }

    /// Kills the broker with SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}
