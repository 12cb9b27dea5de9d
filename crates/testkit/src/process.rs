//! `kappa up` as a child process, for tests that kill it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a child `kappa up` may take to report its address.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `kappa up` child on 127.0.0.1 with an OS-assigned port.
#[derive(Debug)]
pub struct KappaProcess {
    child: Child,
    /// Base URL of its HTTP API.
    pub base: String,
    pub data_dir: PathBuf,
}

impl KappaProcess {
    /// Starts `binary up --data-dir DATA_DIR --http 127.0.0.1:0 --pg 127.0.0.1:0 EXTRA…` and
    /// waits until it prints its address. Its stderr goes to `DATA_DIR.stderr` for post-mortems.
    pub fn start(binary: &Path, data_dir: &Path, extra: &[&str]) -> std::io::Result<KappaProcess> {
        KappaProcess::start_with_env(binary, data_dir, extra, &[])
    }

    /// [`KappaProcess::start`] with `env` added to the child's environment.
    pub fn start_with_env(
        binary: &Path,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> std::io::Result<KappaProcess> {
        let stderr_path = data_dir.with_extension("stderr");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)?;
        let mut child = Command::new(binary)
            .arg("up")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--http", "127.0.0.1:0", "--pg", "127.0.0.1:0"])
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                return Err(std::io::Error::other(format!(
                    "kappa up did not start ({other:?}); stderr:\n{log}"
                )));
            }
        };
        let base = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .map(|w| w.trim_end_matches(',').to_owned())
            .ok_or_else(|| std::io::Error::other(format!("no address in {line:?}")))?;
        Ok(KappaProcess {
            child,
            base,
            data_dir: data_dir.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap.
    pub fn kill9(mut self) -> std::io::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(mut self) -> std::io::Result<std::process::ExitStatus> {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        self.child.wait()
    }
}

impl Drop for KappaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
