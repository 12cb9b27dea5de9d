//! The HTTP API against an in-process server on 127.0.0.1, one test binary.
#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

mod bad_input;
mod kafka;
mod records;

use kappa_server::{Server, ServerConfig};

/// Bodies slower than this are refused in these tests.
pub const TEST_BODY_TIMEOUT_MS: u64 = 500;

/// Request bodies above this are refused in these tests.
pub const TEST_BODY_LIMIT: usize = 64 * 1024;

/// A server on a fresh data directory; dropped with the runtime.
#[derive(Debug)]
pub struct TestServer {
    pub base: String,
    pub _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let config = ServerConfig {
            data_dir: dir.path().join("data"),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            pg_addr: "127.0.0.1:0".parse().unwrap(),
            max_request_bytes: TEST_BODY_LIMIT,
            body_read_timeout_ms: TEST_BODY_TIMEOUT_MS,
            project_dir: None,
            query_limits: Default::default(),
            pg_auth: None,
        };
        let server = Server::start(config).await.unwrap();
        let base = format!("http://{}", server.http_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        TestServer {
            base,
            _dir: dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn create(&self, name: &str, partitions: u32) -> reqwest::Response {
        let body = serde_json::json!({ "name": name, "config": { "partitions": partitions } });
        reqwest::Client::new()
            .post(format!("{}/v1/topics", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post(&self, topic: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/v1/topics/{topic}/records", self.base))
            .body(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        reqwest::get(format!("{}{path}", self.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}
