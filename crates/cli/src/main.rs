//! `kappa`: one binary for the log, the pipelines and the serving layer.
//!
//! This crate parses arguments and prints results; the work happens in `kappa-server` (and,
//! through it, `kappa-log`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod audit;
mod consume;
mod demo;
mod deploy;
mod fmt;
mod plan;
mod produce;
mod project;
mod sql;
mod status;
mod test;
mod topics;

/// kappa: the Kappa Architecture as one binary — an infinite replayable log, versioned SQL
/// pipelines, and Iceberg serving tables.
#[derive(Debug, Parser)]
#[command(name = "kappa", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Args)]
struct Global {
    /// Project folder (holds kappa.toml); default: the current directory.
    #[arg(long, global = true, value_name = "DIR")]
    project: Option<PathBuf>,
    /// Data directory (log, catalog, warehouse, state); default: .kappa/ in the project folder.
    #[arg(long, global = true, value_name = "DIR", env = "KAPPA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Talk to the kappa server at this URL instead of finding one for the data directory.
    #[arg(long, global = true, value_name = "URL")]
    server: Option<String>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a project folder with a working example.
    Init(project::InitArgs),
    /// Validate the project folder without running it: TOML, SQL, references, cycles.
    Check(project::CheckArgs),
    /// Run kappa in the foreground: the embedded log and the HTTP API.
    Up(UpArgs),
    /// Create, list and describe topics.
    #[command(subcommand)]
    Topics(topics::TopicsCommand),
    /// Append NDJSON records to a topic, from a file or stdin.
    Produce(produce::ProduceArgs),
    /// Print a topic's records as NDJSON.
    Consume(consume::ConsumeArgs),
    /// Query the serving tables with SQL (`silver.orders`, or `orders` when unambiguous).
    Sql(sql::SqlArgs),
    /// Every model: state, rows, lag, dead letters; and the dead letters by reason.
    Status(status::StatusArgs),
    /// Compare the project folder with what is deployed: new, changed (with the diff),
    /// downstream of a change, unchanged and removed models, and the history each replay reads.
    Plan(plan::PlanArgs),
    /// Deploy the project folder to the running `kappa up`: changed models (and what reads
    /// them) replay as new versions while the live ones serve, then all switch at once.
    Deploy(deploy::DeployArgs),
    /// Take a model back to the previous deployment's version (and what reads it), switching
    /// over as a deploy does, once the old version has caught up again. The model's files in
    /// the project folder are written back as they were.
    Rollback(deploy::RollbackArgs),
    /// Run every model's expectations over its published table and print a table of
    /// results; fails when an expectation of severity "fail" does.
    Test(test::TestArgs),
    /// A model's expectations over its newest commit, with samples of what failed: why a
    /// commit waits on the audit branch instead of reaching readers.
    Audit(audit::AuditArgs),
    /// Publish the commits waiting on a model's audit branch although their audit failed.
    Publish(audit::PublishArgs),
    /// Drop the commits waiting on a model's audit branch; the model carries on after the
    /// records they came from.
    Discard(audit::DiscardArgs),
    /// Run a self-contained demonstration and print its figures.
    Demo(demo::DemoArgs),
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Address of the HTTP API [default: 127.0.0.1:7878, or kappa.toml's server.http]
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Address of the Postgres wire endpoint [default: 127.0.0.1:5433, or kappa.toml's
    /// server.pg]
    #[arg(long, value_name = "ADDR")]
    pg: Option<SocketAddr>,
    /// Largest request body accepted, in bytes [default: 33554432]
    #[arg(long, value_name = "BYTES")]
    max_request_bytes: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server reports what it does; client commands only warn.
    let verbose = matches!(cli.command, Command::Up(_));
    init_tracing(cli.global.log_format, verbose);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::anyhow!("start the async runtime: {e}")),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    // A closed stdout (`kappa consume t | head`) is the reader's choice, not an error.
    let broken_pipe = e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        return ExitCode::SUCCESS;
    }
    let _ = writeln!(std::io::stderr(), "error: {e:#}");
    ExitCode::FAILURE
}

fn init_tracing(format: LogFormat, verbose: bool) {
    let default = if verbose {
        "warn,kappa_log=info,kappa_server=info,kappa=info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KAPPA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let global = cli.global;
    match cli.command {
        Command::Init(args) => project::init(args),
        Command::Check(args) => project::check(&global, args).await,
        Command::Up(args) => up(&global, args).await,
        Command::Topics(command) => topics::run(&global, command).await,
        Command::Produce(args) => produce::run(&global, args).await,
        Command::Consume(args) => consume::run(&global, args).await,
        Command::Sql(args) => sql::run(&global, args).await,
        Command::Test(args) => test::run(&global, args).await,
        Command::Audit(args) => audit::audit(&global, args).await,
        Command::Publish(args) => audit::publish(&global, args).await,
        Command::Discard(args) => audit::discard(&global, args).await,
        Command::Status(args) => status::run(&global, args).await,
        Command::Plan(args) => plan::run(&global, args).await,
        Command::Deploy(args) => deploy::run(&global, args).await,
        Command::Rollback(args) => deploy::rollback(&global, args).await,
        Command::Demo(args) => demo::run(args, global.data_dir.clone()).await,
    }
}

impl Global {
    fn overrides(&self) -> kappa_server::config::Overrides {
        kappa_server::config::Overrides {
            project: self.project.clone(),
            data_dir: self.data_dir.clone(),
            ..Default::default()
        }
    }

    /// The project folder, when there is one (it holds `kappa.toml`).
    fn project_dir(&self) -> Option<std::path::PathBuf> {
        kappa_server::ServerConfig::resolve(&self.overrides())
            .ok()
            .and_then(|c| c.project_dir)
    }

    /// Connects to a running server for the data directory, or opens the directory.
    async fn connect(&self) -> anyhow::Result<kappa_server::client::Client> {
        let config = kappa_server::ServerConfig::resolve(&self.overrides())?;
        kappa_server::client::connect(&config.data_dir, self.server.as_deref()).await
    }

    /// [`Global::connect`] for commands that only read: a data directory that does not exist
    /// is an error that says where it looked, not a new empty one left behind.
    async fn connect_existing(&self) -> anyhow::Result<kappa_server::client::Client> {
        let config = kappa_server::ServerConfig::resolve(&self.overrides())?;
        if self.server.is_none() && !config.data_dir.exists() {
            anyhow::bail!(
                "no kappa data directory at {}: nothing has run here yet (run `kappa up` in a \
                 project folder, or name one with --project DIR or --data-dir DIR)",
                config.data_dir.display()
            );
        }
        kappa_server::client::connect(&config.data_dir, self.server.as_deref()).await
    }
}

async fn up(global: &Global, args: UpArgs) -> anyhow::Result<()> {
    let overrides = kappa_server::config::Overrides {
        http_addr: args.http,
        pg_addr: args.pg,
        max_request_bytes: args.max_request_bytes,
        ..global.overrides()
    };
    let config = kappa_server::ServerConfig::resolve(&overrides)?;
    // Signals are caught from before the address is printed: whoever starts `kappa up` may
    // stop it as soon as it reads that line.
    let shutdown = shutdown_signal()?;
    let server = kappa_server::Server::start(config).await?;
    println!(
        "kappa is up: HTTP API on http://{}, Postgres on {}, data in {}",
        server.http_addr(),
        server.pg_addr(),
        server.data_dir().display()
    );
    std::io::stdout().flush()?;
    server.run(shutdown).await
}

/// A future that completes on Ctrl-C (SIGINT) or SIGTERM; both are caught from this call on.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
        tracing::info!("shutting down");
    })
}

/// Prints a value as pretty JSON on stdout.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}
