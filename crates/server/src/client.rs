//! How `kappa` commands reach the log: over HTTP when a `kappa up` serves the data directory,
//! directly on the data directory otherwise. Both paths run the same [`service`] code.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use kappa_log::{Log, LogError, StartAt};

use crate::api::{
    ConsumedRecord, CreateTopic, Envelope, ErrorBody, ErrorDetail, Health, OffsetsResponse,
    ProduceResponse, TopicInfo,
};
use crate::ingest::IngestError;
use crate::service::{self, ReadRequest, ReadResult, ServiceError};
use crate::{in_use, read_server_file, try_open_log};

/// How long a client waits for a server named in `server.json` to answer its health check.
pub const HEALTH_TIMEOUT_MS: u64 = 1000;

/// How long it waits the second time, once the data directory turned out to be in use.
pub const HEALTH_RETRY_TIMEOUT_MS: u64 = 10_000;

/// A failed client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{}", .detail.message)]
    Api { status: u16, detail: ErrorDetail },
    /// The call failed on the data directory.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// The server could not be reached or answered nonsense.
    #[error("{0}")]
    Transport(String),
}

impl ClientError {
    /// For a rejected NDJSON line: where it was, relative to the body sent.
    pub fn ingest_error(&self) -> Option<IngestError> {
        match self {
            ClientError::Service(ServiceError::Ingest(e)) => Some(e.clone()),
            ClientError::Api { detail, .. } => Some(IngestError {
                line: detail.line?,
                byte_offset: detail.byte_offset?,
                reason: detail.reason.clone()?,
            }),
            _ => None,
        }
    }
}

/// A connection to the log, over HTTP or direct.
#[derive(Debug, Clone)]
pub enum Client {
    Http { base: String, http: reqwest::Client },
    Direct { log: Arc<Log> },
}

/// Connects to the server given by `server`, else to the server named in the data directory's
/// `server.json` if it answers for this directory, else opens the data directory itself.
pub async fn connect(data_dir: &Path, server: Option<&str>) -> anyhow::Result<Client> {
    if let Some(url) = server {
        let client = Client::http(url);
        client
            .health()
            .await
            .map_err(|e| anyhow::anyhow!("no kappa server answers at {url}: {e}"))?;
        return Ok(client);
    }
    if let Some(client) = server_of(data_dir, HEALTH_TIMEOUT_MS).await {
        return Ok(client);
    }
    match try_open_log(data_dir).await? {
        Ok(log) => Ok(Client::Direct { log: Arc::new(log) }),
        // A server that was too busy to answer the first health check holds the directory:
        // give it longer before giving up.
        Err(LogError::Locked { .. }) => match server_of(data_dir, HEALTH_RETRY_TIMEOUT_MS).await {
            Some(client) => Ok(client),
            None => Err(in_use(data_dir)),
        },
        Err(e) => Err(e).with_context(|| format!("open the log in {}", data_dir.display())),
    }
}

/// The key the deployed project (the data directory's `deployment.json`) declares for `topic`:
/// without a server, records are keyed as `kappa up` would key them.
fn deployed_key(log: &Log, topic: &str) -> Option<String> {
    let data_dir = log.dir().parent()?;
    let deployment = crate::deployment::load(data_dir).ok().flatten()?;
    deployment.project()?.topics.get(topic)?.key.clone()
}

/// The server named in the data directory's `server.json`, if it answers for this directory
/// within `timeout_ms`.
async fn server_of(data_dir: &Path, timeout_ms: u64) -> Option<Client> {
    let file = read_server_file(data_dir)?;
    let client = Client::http(&file.http);
    let here = std::fs::canonicalize(data_dir).ok();
    match tokio::time::timeout(Duration::from_millis(timeout_ms), client.health()).await {
        Ok(Ok(health)) if here.as_deref() == Some(Path::new(&health.data_dir)) => Some(client),
        _ => {
            tracing::debug!(server = %file.http, "server.json names no live server for this directory");
            None
        }
    }
}

impl Client {
    pub fn http(base: &str) -> Client {
        Client::Http {
            base: base.trim_end_matches('/').to_owned(),
            // kappa servers are reached directly, never through an HTTP_PROXY of the environment.
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .unwrap_or_default(),
        }
    }

    /// Where this client goes, for messages.
    pub fn describe(&self) -> String {
        match self {
            Client::Http { base, .. } => format!("server {base}"),
            Client::Direct { log } => format!("data directory {}", log.dir().display()),
        }
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        match self {
            Client::Http { .. } => self.get_json("/v1/health").await,
            Client::Direct { log } => Ok(Health {
                status: "ok".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                data_dir: log.dir().display().to_string(),
                max_request_bytes: None,
            }),
        }
    }

    pub async fn create_topic(&self, request: CreateTopic) -> Result<TopicInfo, ClientError> {
        match self {
            Client::Http { base, http } => {
                let response = http
                    .post(format!("{base}/v1/topics"))
                    .json(&request)
                    .send()
                    .await;
                decode(response).await
            }
            Client::Direct { log } => Ok(service::create_topic(log, request).await?),
        }
    }

    pub async fn topics(&self) -> Result<Vec<TopicInfo>, ClientError> {
        match self {
            Client::Http { .. } => {
                #[derive(serde::Deserialize)]
                struct Topics {
                    topics: Vec<TopicInfo>,
                }
                Ok(self.get_json::<Topics>("/v1/topics").await?.topics)
            }
            Client::Direct { log } => Ok(service::topics(log)),
        }
    }

    pub async fn topic(&self, name: &str) -> Result<TopicInfo, ClientError> {
        match self {
            Client::Http { .. } => self.get_json(&format!("/v1/topics/{}", encode(name))).await,
            Client::Direct { log } => Ok(service::topic(log, name)?),
        }
    }

    /// Appends an NDJSON body; all or nothing.
    pub async fn produce(
        &self,
        topic: &str,
        body: Bytes,
        key: Option<&str>,
    ) -> Result<ProduceResponse, ClientError> {
        match self {
            Client::Http { base, http } => {
                let mut request = http
                    .post(format!("{base}/v1/topics/{}/records", encode(topic)))
                    .body(body);
                if let Some(key) = key {
                    request = request.query(&[("key", key)]);
                }
                decode(
                    request
                        .header("content-type", "application/x-ndjson")
                        .send()
                        .await,
                )
                .await
            }
            Client::Direct { log } => {
                let declared = match key {
                    Some(_) => None,
                    None => deployed_key(log, topic),
                };
                let log = kappa_engine::event_log::EventLog::Embedded(log.clone());
                Ok(service::produce(&log, topic, body, key.map(str::to_owned), declared).await?)
            }
        }
    }

    /// Reads records of one partition.
    pub async fn read(&self, topic: &str, request: ReadRequest) -> Result<ReadResult, ClientError> {
        match self {
            Client::Http { base, http } => {
                let mut query: Vec<(&str, String)> = vec![
                    ("max_records", request.max_records.to_string()),
                    ("max_bytes", request.max_bytes.to_string()),
                    ("wait_ms", request.wait_ms.to_string()),
                ];
                match request.start {
                    StartAt::Beginning => query.push(("from", "beginning".into())),
                    StartAt::End => query.push(("from", "end".into())),
                    StartAt::Offset(o) => query.push(("offset", o.to_string())),
                    StartAt::Timestamp(t) => query.push(("timestamp_ms", t.to_string())),
                }
                let url = format!(
                    "{base}/v1/topics/{}/partitions/{}/records",
                    encode(topic),
                    request.partition
                );
                let response = http
                    .get(url)
                    .query(&query)
                    .send()
                    .await
                    .map_err(transport)?;
                let response = check(response).await?;
                let next_offset = response
                    .headers()
                    .get(crate::http::NEXT_OFFSET_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| {
                        ClientError::Transport("response has no kappa-next-offset header".into())
                    })?;
                let body = response.bytes().await.map_err(transport)?;
                let mut records = Vec::new();
                for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    let envelope: Envelope = serde_json::from_slice(line)
                        .map_err(|e| ClientError::Transport(e.to_string()))?;
                    records.push(
                        ConsumedRecord::from_envelope(envelope).map_err(ClientError::Transport)?,
                    );
                }
                Ok(ReadResult {
                    records,
                    next_offset,
                })
            }
            Client::Direct { log } => {
                let log = kappa_engine::event_log::EventLog::Embedded(log.clone());
                Ok(service::read(&log, topic, request, None).await?)
            }
        }
    }

    pub async fn offsets(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: Option<i64>,
    ) -> Result<OffsetsResponse, ClientError> {
        match self {
            Client::Http { .. } => {
                let mut path = format!(
                    "/v1/topics/{}/partitions/{partition}/offsets",
                    encode(topic)
                );
                if let Some(ts) = timestamp_ms {
                    path.push_str(&format!("?timestamp_ms={ts}"));
                }
                self.get_json(&path).await
            }
            Client::Direct { log } => {
                let log = kappa_engine::event_log::EventLog::Embedded(log.clone());
                let topic = topic.to_owned();
                tokio::task::spawn_blocking(move || {
                    service::offsets(&log, &topic, partition, timestamp_ms)
                })
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?
                .map_err(ClientError::from)
            }
        }
    }

    /// Runs SQL over the serving tables.
    pub async fn sql(&self, sql: &str) -> Result<crate::api::SqlResponse, ClientError> {
        match self {
            Client::Http { base, http } => {
                let request = crate::api::SqlRequest {
                    sql: sql.to_owned(),
                };
                decode(
                    http.post(format!("{base}/v1/sql"))
                        .json(&request)
                        .send()
                        .await,
                )
                .await
            }
            Client::Direct { log } => {
                let data_dir = log.dir().parent().unwrap_or(log.dir()).to_path_buf();
                let lakehouse = kappa_lakehouse::Lakehouse::open(&data_dir)
                    .await
                    .map_err(|e| ClientError::Service(ServiceError::Internal(e.to_string())))?;
                Ok(service::sql(&lakehouse, sql, None).await?)
            }
        }
    }

    /// Every model's state and the dead letters. A direct client reports on `project` (the
    /// models it declares) from the tables and the log; a server on the project it runs.
    pub async fn status(
        &self,
        project: Option<&kappa_pipeline::Project>,
    ) -> Result<crate::api::StatusResponse, ClientError> {
        match self {
            Client::Http { .. } => self.get_json("/v1/status").await,
            Client::Direct { log } => {
                let data_dir = log.dir().parent().unwrap_or(log.dir()).to_path_buf();
                let lakehouse = kappa_lakehouse::Lakehouse::open(&data_dir)
                    .await
                    .map_err(|e| ClientError::Service(ServiceError::Internal(e.to_string())))?;
                // What `kappa up` would serve: the deployed project with what each version
                // reads, as recorded (the folder may have changed since); the folder's only
                // when nothing was deployed.
                let deployed = crate::deployment::load(&data_dir)
                    .ok()
                    .flatten()
                    .and_then(|d| d.project());
                let project = match (project, deployed) {
                    (Some(_), Some(deployed)) => Some(deployed),
                    (project, _) => project.cloned(),
                };
                let tally = crate::dead_letters::DeadLetterTally::new();
                let mut status =
                    service::status(log, &lakehouse, project.as_ref(), None, &tally).await?;
                status.versions = crate::deployer::recorded_versions(&data_dir);
                if let Some(project) = &project {
                    status.bronze = service::bronze_status(log, &lakehouse, project, None).await;
                }
                Ok(status)
            }
        }
    }

    /// What is deployed: what the server runs, or what the data directory records (empty when
    /// nothing was ever deployed).
    pub async fn deployment(&self) -> Result<kappa_pipeline::deploy::Deployment, ClientError> {
        match self {
            Client::Http { .. } => self.get_json("/v1/deployment").await,
            Client::Direct { log } => {
                let data_dir = log.dir().parent().unwrap_or(log.dir());
                crate::deployment::load(data_dir)
                    .map(Option::unwrap_or_default)
                    .map_err(|e| ClientError::Service(ServiceError::Internal(format!("{e:#}"))))
            }
        }
    }

    /// Asks the running `kappa up` to deploy its project folder; returns the models that
    /// replay. A deploy needs the server: its runners are the ones that keep serving.
    pub async fn deploy(&self) -> Result<Vec<String>, ClientError> {
        match self {
            Client::Http { base, http } => {
                let deployed: Deployed =
                    decode(http.post(format!("{base}/v1/deploy")).send().await).await?;
                Ok(deployed.replaying)
            }
            Client::Direct { log } => Err(ClientError::Transport(format!(
                "no kappa up serves {}: a deploy happens in a running server (`kappa up` \
                 deploys the folder when it starts)",
                log.dir().parent().unwrap_or(log.dir()).display()
            ))),
        }
    }

    /// Asks the running `kappa up` to roll `model` back to the previous deployment's version;
    /// returns the models that replay.
    pub async fn rollback(&self, model: &str) -> Result<Vec<String>, ClientError> {
        match self {
            Client::Http { base, http } => {
                let request = http
                    .post(format!("{base}/v1/rollback"))
                    .json(&serde_json::json!({ "model": model }));
                let deployed: Deployed = decode(request.send().await).await?;
                Ok(deployed.replaying)
            }
            Client::Direct { log } => Err(ClientError::Transport(format!(
                "no kappa up serves {}: a rollback happens in a running server",
                log.dir().parent().unwrap_or(log.dir()).display()
            ))),
        }
    }

    /// The deploy in progress in the running `kappa up` (idle without one).
    pub async fn deploy_progress(&self) -> Result<crate::deployer::DeployProgress, ClientError> {
        match self {
            Client::Http { .. } => self.get_json("/v1/deploy").await,
            Client::Direct { .. } => Ok(crate::deployer::DeployProgress::idle()),
        }
    }

    /// Closes the data directory (direct clients); a no-op over HTTP.
    pub async fn close(self) -> anyhow::Result<()> {
        if let Client::Direct { log } = self {
            tokio::task::spawn_blocking(move || log.close()).await??;
        }
        Ok(())
    }

    /// `model`'s expectations over its newest snapshot, with samples of what failed. A direct
    /// client audits the table of `model`'s version in `project`; a server its own project's.
    pub async fn audit(
        &self,
        project: &kappa_pipeline::Project,
        model: &str,
    ) -> Result<crate::quality::AuditResponse, ClientError> {
        match self {
            Client::Http { .. } => {
                self.get_json(&format!("/v1/models/{}/audit", encode(model)))
                    .await
            }
            Client::Direct { log } => {
                let lakehouse = self.lakehouse(log).await?;
                Ok(crate::quality::audit(&lakehouse, project, model).await?)
            }
        }
    }

    /// Publishes or discards the commits waiting on `model`'s audit branch.
    pub async fn decide(
        &self,
        project: &kappa_pipeline::Project,
        model: &str,
        decision: crate::quality::Decision,
    ) -> Result<crate::quality::DecisionResponse, ClientError> {
        match self {
            Client::Http { base, http } => {
                let verb = match decision {
                    crate::quality::Decision::Publish => "publish",
                    crate::quality::Decision::Discard => "discard",
                };
                decode(
                    http.post(format!("{base}/v1/models/{}/{verb}", encode(model)))
                        .send()
                        .await,
                )
                .await
            }
            Client::Direct { log } => {
                let lakehouse = self.lakehouse(log).await?;
                Ok(crate::quality::decide(&lakehouse, project, model, decision).await?)
            }
        }
    }

    /// The lakehouse of a direct client's data directory.
    async fn lakehouse(&self, log: &Log) -> Result<kappa_lakehouse::Lakehouse, ClientError> {
        let data_dir = log.dir().parent().unwrap_or(log.dir()).to_path_buf();
        kappa_lakehouse::Lakehouse::open(&data_dir)
            .await
            .map_err(|e| ClientError::Service(ServiceError::Internal(e.to_string())))
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let Client::Http { base, http } = self else {
            return Err(ClientError::Transport("not an HTTP client".into()));
        };
        decode(http.get(format!("{base}{path}")).send().await).await
    }
}

/// What the server answers a deploy or a rollback.
#[derive(serde::Deserialize)]
struct Deployed {
    replaying: Vec<String>,
}

fn encode(segment: &str) -> String {
    // Topic names are validated to [A-Za-z0-9._-], which needs no escaping; anything else is
    // escaped so a bad name reaches the server intact and is rejected there by name.
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn transport(e: reqwest::Error) -> ClientError {
    ClientError::Transport(format!("talking to the kappa server: {e}"))
}

async fn check(response: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.bytes().await.map_err(transport)?;
    match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(error) => Err(ClientError::Api {
            status: status.as_u16(),
            detail: error.error,
        }),
        Err(_) => Err(ClientError::Transport(format!(
            "server answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ))),
    }
}

async fn decode<T: serde::de::DeserializeOwned>(
    response: reqwest::Result<reqwest::Response>,
) -> Result<T, ClientError> {
    let response = check(response.map_err(transport)?).await?;
    response.json::<T>().await.map_err(transport)
}
