//! kappa's composition root: opens the data directory, serves the HTTP API, and provides the
//! client that every `kappa` command uses to reach a running server or the data directory.
//!
//! ```text
//!   kappa up ──► Server::start ──► Log::open(<data>/log) ──► axum on 127.0.0.1:7878
//!                                  writes <data>/server.json (address, pid)
//!   kappa produce/consume/topics ──► client::connect ──► HTTP, if server.json answers
//!                                                   └──► the data directory, otherwise
//! ```

pub mod alerts;
pub mod api;
pub mod audit;
pub mod client;
pub mod config;
pub mod dead_letters;
pub mod deployer;
pub mod deployment;
pub mod http;
pub mod ingest;
mod isolated;
pub mod metrics;
pub mod models;
pub mod pg;
mod pg_types;
pub mod pipelines;
pub mod project;
pub mod quality;
pub mod service;
mod ui;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use kappa_log::{Log, LogError};
use serde::{Deserialize, Serialize};

pub use config::ServerConfig;

/// The file a running server writes into its data directory so clients can find it.
pub const SERVER_FILE: &str = "server.json";

/// What `server.json` says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerFile {
    pub pid: u32,
    /// Base URL of the HTTP API.
    pub http: String,
    /// Address of the Postgres wire endpoint.
    #[serde(default)]
    pub pg: String,
}

/// State shared by every request handler.
#[derive(Debug)]
pub struct AppState {
    pub log: Arc<Log>,
    /// The log records are produced to and models read: the embedded one (`log`) for now.
    pub events: kappa_engine::event_log::EventLog,
    pub config: ServerConfig,
    /// Absolute data directory, reported by `/v1/health` so clients can check they found the
    /// right server.
    pub data_dir: PathBuf,
    /// Becomes `true` when the server shuts down, ending long polls.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// KiB of request bodies that may be held in memory at once.
    pub ingest_budget: Arc<tokio::sync::Semaphore>,
    /// The Iceberg tables.
    pub lakehouse: kappa_lakehouse::Lakehouse,
    /// The project `kappa up` runs (if any), its runners and deploys.
    pub deployer: Option<Arc<deployer::Deployer>>,
    /// Alerts raised, and the webhooks they go to.
    pub alerts: Arc<alerts::Alerts>,
    /// Counters for `GET /metrics`.
    pub metrics: Arc<metrics::Metrics>,
    /// The dead letters counted so far, for the status.
    pub dead_letters: Arc<dead_letters::DeadLetterTally>,
}

impl AppState {
    pub fn health(&self) -> api::Health {
        api::Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            data_dir: self.data_dir.display().to_string(),
            max_request_bytes: Some(self.config.max_request_bytes),
        }
    }
}

/// A started server: the data directory is open and the listener bound.
#[derive(Debug)]
pub struct Server {
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    http_addr: SocketAddr,
    pg_listener: tokio::net::TcpListener,
    pg_addr: SocketAddr,
    /// The Postgres endpoint's user and password, when it asks for one.
    pg_auth: Option<config::PgAuth>,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    deployer: Option<Arc<deployer::Deployer>>,
}

impl Server {
    /// Opens the data directory (recovering the log) and binds the HTTP listener.
    pub async fn start(config: ServerConfig) -> anyhow::Result<Server> {
        // Before anything starts: a missing password stops here, with the variable's name.
        let pg_auth = config
            .pg_auth
            .as_ref()
            .map(config::PgAuthConfig::resolve)
            .transpose()?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("create data directory {}", config.data_dir.display()))?;
        let data_dir = std::fs::canonicalize(&config.data_dir)
            .with_context(|| format!("resolve data directory {}", config.data_dir.display()))?;
        let log = open_log(&data_dir).await?;
        for event in log.recovery_events() {
            tracing::info!(?event, "recovery");
        }
        let log = Arc::new(log);
        // The ports first: a start that cannot bind them fails before any runner starts.
        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("bind the HTTP API to {}", config.http_addr))?;
        let http_addr = listener
            .local_addr()
            .context("read the bound HTTP address")?;
        let pg_listener = tokio::net::TcpListener::bind(config.pg_addr)
            .await
            .with_context(|| format!("bind the Postgres endpoint to {}", config.pg_addr))?;
        let pg_addr = pg_listener
            .local_addr()
            .context("read the bound Postgres address")?;
        // What runs: what is deployed, or — the first time — the folder. The folder changes
        // what runs only through `kappa deploy`, so an edit not deployed (even one that does
        // not check) never stops the deployed versions from serving after a restart.
        let deployed = deployment::load(&data_dir)?.and_then(|d| {
            let project = d.project()?;
            Some((Arc::new(project), d.files))
        });
        let project = match (&config.project_dir, deployed) {
            (Some(dir), Some((deployed, files))) => {
                kappa_engine::mask::read_hash_key_from(deployed.config.masking.secret_env());
                project::warn_if_not_deployed(dir, &deployed, &files).await;
                Some((deployed, files))
            }
            (Some(dir), None) => {
                let files = project::read_files(dir)?;
                match project::check_files(&files).await {
                    Ok(project) => Some((Arc::new(project), files)),
                    Err(diagnostics) => {
                        let lines: Vec<String> =
                            diagnostics.iter().map(ToString::to_string).collect();
                        anyhow::bail!(
                            "the project in {} has problems:\n{}",
                            dir.display(),
                            lines.join("\n")
                        );
                    }
                }
            }
            (None, _) => None,
        };
        if let Some((project, _)) = &project
            && project.config.log.backend == kappa_pipeline::LogBackend::Kafka
        {
            // Refused rather than ignored: records must not go to the embedded log while the
            // project says they are on the cluster.
            anyhow::bail!(
                "kappa.toml [log] backend = \"kafka\": this kappa up does not run on a Kafka \
                 cluster yet (its Kafka client is built and tested, serving from it is not); \
                 remove [log] to run on the embedded log"
            );
        }
        // The project says where the warehouse is; it is recorded in the data directory for
        // the commands that work on it without a project or a server.
        let warehouse = match &project {
            Some((project, _)) => {
                let section = &project.config.lakehouse;
                kappa_lakehouse::WarehouseConfig::from_section(
                    section.catalog.as_deref(),
                    section.uri.clone(),
                    section.warehouse.clone(),
                    section.properties.clone(),
                )
                .map_err(|problem| anyhow::anyhow!("kappa.toml [lakehouse]: {problem}"))?
            }
            None => kappa_lakehouse::WarehouseConfig::recorded(&data_dir)?,
        };
        let lakehouse = kappa_lakehouse::Lakehouse::open_with(&data_dir, &warehouse)
            .await
            .context("open the Iceberg catalog")?;
        // Recorded once it opened: a refused warehouse must not become the directory's.
        warehouse.record(&data_dir)?;
        let alerts = alerts::Alerts::new(
            &project
                .as_ref()
                .map(|(p, _)| p.config.alerts.clone())
                .unwrap_or_default(),
            Some(&data_dir),
        );
        // The log records are produced to and models read: the embedded one, until `kappa up`
        // runs on a Kafka cluster.
        let events = kappa_engine::event_log::EventLog::Embedded(log.clone());
        let deployer = match project {
            Some((project, files)) => {
                pipelines::ensure_topics(&events, &project).await?;
                // The folder is deployed over what the data directory records as deployed.
                Some(
                    deployer::Deployer::start(
                        events.clone(),
                        lakehouse.clone(),
                        data_dir.clone(),
                        project,
                        files,
                    )
                    .await?,
                )
            }
            None => None,
        };
        let file = ServerFile {
            pid: std::process::id(),
            http: format!("http://{http_addr}"),
            pg: pg_addr.to_string(),
        };
        write_server_file(&data_dir, &file)?;
        let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
        let ingest_budget_kib = config::INGEST_BYTES_IN_FLIGHT_MAX / 1024;
        let state = Arc::new(AppState {
            events,
            log,
            config,
            data_dir,
            shutdown,
            ingest_budget: Arc::new(tokio::sync::Semaphore::new(ingest_budget_kib)),
            lakehouse,
            deployer: deployer.clone(),
            alerts,
            metrics: Arc::default(),
            dead_letters: dead_letters::DeadLetterTally::new(),
        });
        Ok(Server {
            state,
            listener,
            http_addr,
            pg_listener,
            pg_addr,
            pg_auth,
            shutdown_tx,
            deployer,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where the Postgres wire endpoint listens.
    pub fn pg_addr(&self) -> SocketAddr {
        self.pg_addr
    }

    pub fn log(&self) -> &Arc<Log> {
        &self.state.log
    }

    pub fn data_dir(&self) -> &Path {
        &self.state.data_dir
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests, closes the log
    /// (flushing indexes and checkpoints) and removes `server.json`.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let router = http::router(self.state.clone());
        let monitor = tokio::spawn(alerts::monitor(
            self.state.clone(),
            self.state.shutdown.clone(),
        ));
        let shutdown_tx = self.shutdown_tx;
        let signal = async move {
            shutdown.await;
            let _ = shutdown_tx.send(true);
        };
        let pg = tokio::spawn({
            let (lakehouse, limits, metrics, shutdown) = (
                self.state.lakehouse.clone(),
                self.state.config.query_limits,
                self.state.metrics.pg.clone(),
                self.state.shutdown.clone(),
            );
            let auth = self.pg_auth;
            async move {
                pg::serve(
                    self.pg_listener,
                    lakehouse,
                    limits,
                    auth.as_ref(),
                    metrics,
                    shutdown,
                )
                .await
            }
        });
        let served = axum::serve(self.listener, router)
            .with_graceful_shutdown(signal)
            .await;
        monitor.abort();
        pg.abort();
        if let Some(deployer) = self.deployer {
            deployer.stop().await;
        }
        let _ = std::fs::remove_file(self.state.data_dir.join(SERVER_FILE));
        let log = self.state.log.clone();
        let closed = tokio::task::spawn_blocking(move || log.close()).await;
        served.context("serve HTTP")?;
        closed
            .context("join the closing task")?
            .context("close the log")?;
        Ok(())
    }
}

/// Opens the log of a data directory, off the async threads (recovery reads files).
pub async fn open_log(data_dir: &Path) -> anyhow::Result<Log> {
    match try_open_log(data_dir).await? {
        Ok(log) => Ok(log),
        Err(LogError::Locked { .. }) => Err(in_use(data_dir)),
        Err(e) => Err(e).with_context(|| format!("open the log in {}", data_dir.display())),
    }
}

/// [`open_log`] with the log's own error, so callers can tell "in use" apart.
pub(crate) async fn try_open_log(data_dir: &Path) -> anyhow::Result<Result<Log, LogError>> {
    let dir = config::log_dir(data_dir);
    tokio::task::spawn_blocking(move || Log::open(&dir))
        .await
        .context("join the opening task")
}

/// The error for a data directory another process has open.
pub(crate) fn in_use(data_dir: &Path) -> anyhow::Error {
    let holder = read_server_file(data_dir)
        .map(|f| format!(" (a kappa server, pid {}, at {})", f.pid, f.http));
    anyhow::anyhow!(
        "data directory {} is in use by another process{}",
        data_dir.display(),
        holder.unwrap_or_default()
    )
}

fn write_server_file(data_dir: &Path, file: &ServerFile) -> anyhow::Result<()> {
    let path = data_dir.join(SERVER_FILE);
    let tmp = data_dir.join(format!("{SERVER_FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(file).context("encode server.json")?;
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))
}

/// The `server.json` of a data directory, if there is one.
pub fn read_server_file(data_dir: &Path) -> Option<ServerFile> {
    let bytes = std::fs::read(data_dir.join(SERVER_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}
