//! Where things live and which addresses are served: flags, then `kappa.toml`, then defaults
//! (the conventions in PRODUCT.md).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use kappa_pipeline::ProjectConfig;

/// Default address of the HTTP API and web UI.
pub const HTTP_ADDR_DEFAULT: &str = "127.0.0.1:7878";

/// Default address of the Postgres wire endpoint.
pub const PG_ADDR_DEFAULT: &str = "127.0.0.1:5433";

/// Default cap on one HTTP request body, in bytes.
pub const REQUEST_BYTES_MAX_DEFAULT: usize = 32 * 1024 * 1024;

/// A request body must arrive within this long, or the request is answered 408.
pub const BODY_READ_TIMEOUT_MS_DEFAULT: u64 = 30_000;

/// Request bodies being received at once may hold at most this many bytes in memory; past it,
/// new ones wait up to [`INGEST_WAIT_MS`] and are then answered 503.
pub const INGEST_BYTES_IN_FLIGHT_MAX: usize = 256 * 1024 * 1024;

/// How long a request waits for room under [`INGEST_BYTES_IN_FLIGHT_MAX`].
pub const INGEST_WAIT_MS: u64 = 5_000;

/// How long one query may run when `kappa.toml` does not say.
pub const QUERY_TIMEOUT_DEFAULT: std::time::Duration = std::time::Duration::from_secs(300);

/// How much memory one query's operators may hold when `kappa.toml` does not say.
pub const QUERY_MEMORY_DEFAULT: usize = 1024 * 1024 * 1024;

/// Name of the data directory inside a project folder.
pub const DATA_DIR_NAME: &str = ".kappa";

pub use kappa_pipeline::PROJECT_FILE;

/// Everything `kappa up` needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub http_addr: SocketAddr,
    /// The Postgres wire endpoint.
    pub pg_addr: SocketAddr,
    /// Larger request bodies are answered with 413 before they are read.
    pub max_request_bytes: usize,
    /// A body that takes longer to arrive is answered with 408 (slow or stalled clients).
    pub body_read_timeout_ms: u64,
    /// The project folder whose topics and models `kappa up` runs, when it holds a kappa.toml.
    pub project_dir: Option<PathBuf>,
    /// What one query may take.
    pub query_limits: QueryLimits,
    /// The user the Postgres endpoint asks for, when it asks (SCRAM-SHA-256), and where its
    /// password is.
    pub pg_auth: Option<PgAuthConfig>,
}

/// What one query may take before it is stopped with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    pub timeout: std::time::Duration,
    /// Bytes the query's operators may reserve (hash tables, sort buffers, aggregation state).
    pub memory_bytes: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            timeout: QUERY_TIMEOUT_DEFAULT,
            memory_bytes: QUERY_MEMORY_DEFAULT,
        }
    }
}

/// The one user of the Postgres endpoint and the environment variable holding its password
/// (read by `kappa up` only: the client commands do not need it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgAuthConfig {
    pub user: String,
    pub password_env: String,
}

impl PgAuthConfig {
    /// The user and its password, or why the password cannot be read.
    pub fn resolve(&self) -> anyhow::Result<PgAuth> {
        let var = &self.password_env;
        let password = std::env::var(var).map_err(|_| {
            anyhow::anyhow!(
                "{PROJECT_FILE}: [server] pg_password_env names `{var}`, which is not set: set \
                 it to the password of the Postgres user `{}`",
                self.user
            )
        })?;
        anyhow::ensure!(
            !password.is_empty(),
            "{PROJECT_FILE}: [server] pg_password_env `{var}` is empty"
        );
        Ok(PgAuth {
            user: self.user.clone(),
            password,
        })
    }
}

/// The one user of the Postgres endpoint and its password.
#[derive(Clone, PartialEq, Eq)]
pub struct PgAuth {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for PgAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgAuth")
            .field("user", &self.user)
            .field("password", &"…")
            .finish()
    }
}

/// Command-line choices that override the project file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub project: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub http_addr: Option<SocketAddr>,
    pub pg_addr: Option<SocketAddr>,
    pub max_request_bytes: Option<usize>,
}

impl ServerConfig {
    /// Resolves the configuration: flags first, then `kappa.toml` in the project folder, then
    /// the defaults.
    pub fn resolve(overrides: &Overrides) -> anyhow::Result<ServerConfig> {
        let project = project_dir(overrides.project.as_deref())?;
        let file = read_project_file(&project)?;
        let http_addr = address(
            overrides.http_addr,
            file.server.http.as_deref(),
            "http",
            HTTP_ADDR_DEFAULT,
        )?;
        let pg_addr = address(
            overrides.pg_addr,
            file.server.pg.as_deref(),
            "pg",
            PG_ADDR_DEFAULT,
        )?;
        let pg_auth = pg_auth(&file.server)?;
        anyhow::ensure!(
            pg_addr.ip().is_loopback() || pg_auth.is_some(),
            "the Postgres endpoint asks for no password unless [server] pg_user and \
             pg_password_env say which: bind it to a loopback address (127.0.0.1 or ::1), not \
             {pg_addr}, or configure them"
        );
        let mut query_limits = QueryLimits::default();
        if let Some(text) = &file.server.query_timeout {
            query_limits.timeout = humantime::parse_duration(text)
                .ok()
                .filter(|t| !t.is_zero())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{PROJECT_FILE}: [server] query_timeout `{text}` is not a duration \
                         above zero like \"30s\""
                    )
                })?;
        }
        if let Some(text) = &file.server.query_memory {
            query_limits.memory_bytes = parse_bytes(text).filter(|b| *b > 0).ok_or_else(|| {
                anyhow::anyhow!(
                    "{PROJECT_FILE}: [server] query_memory `{text}` is not a size above zero \
                     like \"512MiB\" or \"2GiB\""
                )
            })?;
        }
        Ok(ServerConfig {
            data_dir: data_dir(&project, overrides.data_dir.as_deref()),
            http_addr,
            pg_addr,
            max_request_bytes: overrides
                .max_request_bytes
                .or(file.server.max_request_bytes)
                .unwrap_or(REQUEST_BYTES_MAX_DEFAULT),
            body_read_timeout_ms: BODY_READ_TIMEOUT_MS_DEFAULT,
            project_dir: project
                .join(PROJECT_FILE)
                .is_file()
                .then(|| project.clone()),
            query_limits,
            pg_auth,
        })
    }

    /// Where the log keeps its topics.
    pub fn log_dir(&self) -> PathBuf {
        log_dir(&self.data_dir)
    }
}

/// An address: the flag's, else `[server] KEY` of the project file, else `default`. A
/// malformed one in the file is an error even when the flag overrides it.
fn address(
    flag: Option<SocketAddr>,
    configured: Option<&str>,
    key: &str,
    default: &str,
) -> anyhow::Result<SocketAddr> {
    let parse = |text: &str| {
        text.parse::<SocketAddr>().with_context(|| {
            format!("{PROJECT_FILE}: [server] {key} `{text}` is not an address like {default}")
        })
    };
    let configured = configured.map(parse).transpose()?;
    match flag.or(configured) {
        Some(addr) => Ok(addr),
        None => parse(default),
    }
}

/// The Postgres endpoint's user, when `[server]` names one and where its password is.
fn pg_auth(server: &kappa_pipeline::ServerSection) -> anyhow::Result<Option<PgAuthConfig>> {
    match (&server.pg_user, &server.pg_password_env) {
        (None, None) => Ok(None),
        (Some(user), Some(var)) => Ok(Some(PgAuthConfig {
            user: user.clone(),
            password_env: var.clone(),
        })),
        _ => anyhow::bail!(
            "{PROJECT_FILE}: [server] pg_user and pg_password_env go together (the user, and \
             the environment variable holding its password)"
        ),
    }
}

/// A size like `512MiB`, `2GiB`, `100MB`, `64KiB` or a number of bytes.
pub fn parse_bytes(text: &str) -> Option<usize> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number.parse().ok()?;
    let factor: usize = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// The project folder: `--project`, else the current directory.
pub fn project_dir(project: Option<&Path>) -> anyhow::Result<PathBuf> {
    match project {
        Some(dir) => {
            anyhow::ensure!(
                dir.is_dir(),
                "project folder `{}` does not exist",
                dir.display()
            );
            Ok(dir.to_path_buf())
        }
        None => std::env::current_dir().context("find the current directory"),
    }
}

/// The data directory: `--data-dir` (or `KAPPA_DATA_DIR`), else `.kappa/` in the project folder.
pub fn data_dir(project: &Path, data_dir: Option<&Path>) -> PathBuf {
    data_dir.map_or_else(|| project.join(DATA_DIR_NAME), Path::to_path_buf)
}

/// Where the log lives inside a data directory.
pub fn log_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("log")
}

/// `kappa.toml`, or the defaults when there is none.
fn read_project_file(project: &Path) -> anyhow::Result<ProjectConfig> {
    let path = project.join(PROJECT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map_err(|e| {
            let at = e.span().map_or(0, |s| s.start);
            let file = path.display().to_string();
            anyhow::anyhow!(
                "{}",
                kappa_pipeline::Diagnostic::at_byte(&file, &text, at, e.message().trim())
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ProjectConfig::default()),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_binary_and_decimal_units() {
        assert_eq!(parse_bytes("512MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("2GiB"), Some(2 << 30));
        assert_eq!(parse_bytes("100 MB"), Some(100_000_000));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("1.5GiB"), None);
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("99999999999999999999GiB"), None);
    }

    #[test]
    fn flags_beat_the_project_file_which_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let overrides = Overrides {
            project: Some(dir.path().to_path_buf()),
            ..Overrides::default()
        };
        let config = ServerConfig::resolve(&overrides).unwrap();
        assert_eq!(config.http_addr.to_string(), HTTP_ADDR_DEFAULT);
        assert_eq!(config.data_dir, dir.path().join(".kappa"));

        std::fs::write(
            dir.path().join("kappa.toml"),
            "[project]\nname = \"x\"\n[server]\nhttp = \"127.0.0.1:9000\"\n",
        )
        .unwrap();
        let config = ServerConfig::resolve(&overrides).unwrap();
        assert_eq!(config.http_addr.port(), 9000);

        let overrides = Overrides {
            http_addr: Some("127.0.0.1:9100".parse().unwrap()),
            ..overrides
        };
        assert_eq!(
            ServerConfig::resolve(&overrides).unwrap().http_addr.port(),
            9100
        );

        std::fs::write(dir.path().join("kappa.toml"), "[server]\nhtp = \"x\"\n").unwrap();
        let err = ServerConfig::resolve(&overrides).unwrap_err().to_string();
        assert!(err.contains("kappa.toml") && err.contains("htp"), "{err}");
    }
}
