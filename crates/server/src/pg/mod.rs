//! The Postgres wire protocol endpoint of `kappa up` (default `127.0.0.1:5433`): psql, BI tools
//! and drivers query the published tables through DataFusion.
//!
//! ```text
//!  client ──pgwire──► a thread + runtime per connection: Limited (time, cancel, memory)
//!                       └► DfSessionService (datafusion-postgres) over a SessionContext of the
//!                          connection's own, made from the shared one
//!                                                   ▼
//!            catalog `kappa`: LiveCatalog ──► the catalog as Lakehouse::session pins it,
//!                                             rebuilt when the SQL catalog's rows change
//!            + pg_catalog and information_schema (so `\dt`, `\d TABLE` and BI tools work)
//! ```
//!
//! A query plans against one pinned state of the catalog (every table at the metadata the
//! catalog named in one read): all of a cutover or none of it, never a half-written commit,
//! and only `main` — never a commit waiting on its audit branch.

mod auth;
mod catalog;
mod limits;
mod statements;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use datafusion::prelude::SessionContext;
use datafusion_postgres::DfSessionService;
use datafusion_postgres::pgwire::api::RandomPidSecretKeyGenerator;
use datafusion_postgres::pgwire::api::auth::sasl::SASLAuthStartupHandler;
use datafusion_postgres::pgwire::api::auth::sasl::scram::ScramAuth;
use datafusion_postgres::pgwire::api::auth::{DefaultServerParameterProvider, StartupHandler};
use datafusion_postgres::pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use datafusion_postgres::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use datafusion_postgres::pgwire::api::{ConnectionManager, ErrorHandler, PgWireServerHandlers};
use kappa_lakehouse::Lakehouse;
use tokio::net::TcpListener;

use crate::config::QueryLimits;
use auth::{OpenStartup, SCRAM_ITERATIONS, Scram, Startup};
use catalog::{LiveCatalog, Refresher, refresh, session};
use limits::{Canceller, Limited, Running};
use statements::SqlStates;

/// Serves the Postgres protocol on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    lakehouse: Lakehouse,
    limits: QueryLimits,
    auth: Option<&crate::config::PgAuth>,
    metrics: Arc<crate::metrics::PgMetrics>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let live = Arc::new(LiveCatalog::default());
    let shared = Shared {
        ctx: Arc::new(session(live.clone())?),
        live: live.clone(),
        limits,
        auth: auth.map(|a| Arc::new(Scram::new(a))),
        connections: Arc::new(ConnectionManager::new()),
        running: Arc::new(Running::default()),
        metrics,
        pids: Arc::new(RandomPidSecretKeyGenerator::default()),
        slots: Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX)),
    };
    let refresher = Arc::new(Refresher {
        lakehouse,
        live,
        seen: tokio::sync::Mutex::new(None),
        clients: std::sync::atomic::AtomicUsize::new(0),
    });
    tokio::spawn(refresh(refresher.clone(), shutdown.clone()));
    let main = tokio::runtime::Handle::current();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return Ok(()),
        };
        match accepted {
            Ok((socket, peer)) => {
                let Ok(slot) = shared.slots.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "refused a Postgres connection: {CONNECTIONS_MAX} are open");
                    continue;
                };
                let handlers = match Handlers::for_connection(&shared) {
                    Ok(handlers) => Arc::new(handlers),
                    Err(e) => {
                        tracing::error!(%peer, error = %e, "setting up a Postgres connection failed");
                        continue;
                    }
                };
                let (refresher, main, mut stop) =
                    (refresher.clone(), main.clone(), shutdown.clone());
                // Moved to the connection's own runtime.
                let socket = match socket.into_std() {
                    Ok(socket) => socket,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "taking a Postgres connection failed");
                        continue;
                    }
                };
                // On a thread and runtime of its own (as Postgres runs a process per
                // connection): its queries cannot starve the other sessions or the pipelines.
                let started = crate::isolated::spawn("kappa-pg", async move {
                    let socket = match tokio::net::TcpStream::from_std(socket) {
                        Ok(socket) => socket,
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "taking a Postgres connection failed");
                            return;
                        }
                    };
                    // Without clients the catalog is not followed: each new one brings it up
                    // to date (one read of the catalog when nothing changed) before it is
                    // answered — also when it comes while another is doing so.
                    refresher.clients.fetch_add(1, Ordering::SeqCst);
                    // On the server's runtime, whose catalog connections these are.
                    let refreshing = refresher.clone();
                    if let Err(e) = main.spawn(async move { refreshing.refresh().await }).await {
                        tracing::warn!(%peer, error = %e, "bringing the catalog up to date failed");
                    }
                    // Until the client leaves or the server stops.
                    tokio::select! {
                        served = datafusion_postgres::pgwire::tokio::process_socket(socket, None, handlers) => {
                            if let Err(e) = served {
                                tracing::debug!(%peer, error = %e, "a Postgres connection ended with an error");
                            }
                        }
                        _ = stop.wait_for(|stopping| *stopping) => {}
                    }
                    refresher.clients.fetch_sub(1, Ordering::SeqCst);
                    drop(slot);
                });
                if let Err(e) = started {
                    tracing::error!(%peer, error = %e, "starting a Postgres connection's thread failed");
                }
            }
            Err(e) => {
                // E.g. out of file descriptors: do not spin.
                tracing::warn!(error = %e, "accepting a Postgres connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What every connection shares: the session its own is made from, the limits, the running
/// queries cancel requests reach, the password, the counters.
struct Shared {
    ctx: Arc<SessionContext>,
    /// The catalog as the endpoint follows it.
    live: Arc<LiveCatalog>,
    limits: QueryLimits,
    auth: Option<Arc<Scram>>,
    connections: Arc<ConnectionManager>,
    running: Arc<Running>,
    metrics: Arc<crate::metrics::PgMetrics>,
    /// Backend pids and secrets, unique across connections (cancel requests name them).
    pids: Arc<RandomPidSecretKeyGenerator>,
    /// Connections that may be open at once.
    slots: Arc<tokio::sync::Semaphore>,
}

/// Connections the endpoint serves at once; more are closed at once (each holds a thread per
/// core and a memory pool).
pub const CONNECTIONS_MAX: usize = 64;

/// The pgwire handlers of one connection: DataFusion's session service over a session of its
/// own — the shared catalog, its own memory pool of `limits.memory_bytes` (a connection runs one
/// query at a time, so that is the query's) — behind [`Limited`]; SCRAM-SHA-256 when a password
/// is configured; cancel requests honoured.
struct Handlers {
    query: Arc<Limited>,
    startup: Arc<Startup>,
    cancel: Arc<Canceller>,
    errors: Arc<SqlStates>,
}

impl Handlers {
    fn for_connection(shared: &Shared) -> anyhow::Result<Handlers> {
        // Its own memory pool: a connection runs one query at a time, so the pool is the
        // query's. Its own `kappa` catalog, pinned as each query starts.
        let bounded = crate::isolated::bounded(&shared.ctx, shared.limits.memory_bytes)?;
        let pinned = Arc::new(shared.live.pinned());
        let state = datafusion::execution::SessionStateBuilder::new_from_existing(bounded.state())
            .with_catalog_list(Arc::new(
                datafusion::catalog::MemoryCatalogProviderList::new(),
            ))
            .build();
        let ctx = SessionContext::new_with_state(state);
        ctx.register_catalog(kappa_lakehouse::CATALOG_NAME, pinned.clone());
        let ctx = Arc::new(ctx);
        let startup = match &shared.auth {
            None => Startup::Open(OpenStartup {
                connections: shared.connections.clone(),
            }),
            Some(scram) => {
                let mut method = ScramAuth::new(scram.clone());
                method.set_iterations(SCRAM_ITERATIONS);
                Startup::Scram(Box::new(
                    SASLAuthStartupHandler::new(
                        Arc::new(DefaultServerParameterProvider::default()),
                    )
                    .with_scram(method)
                    .with_pid_secret_key_generator(shared.pids.clone())
                    .with_connection_manager(shared.connections.clone()),
                ))
            }
        };
        Ok(Handlers {
            query: Arc::new(Limited {
                inner: DfSessionService::new(ctx.clone()),
                ctx,
                pinned,
                live: shared.live.clone(),
                limits: shared.limits,
                running: shared.running.clone(),
                metrics: shared.metrics.clone(),
            }),
            startup: Arc::new(startup),
            cancel: Arc::new(Canceller {
                connections: DefaultCancelHandler::new(shared.connections.clone()),
                running: shared.running.clone(),
            }),
            errors: Arc::new(SqlStates {
                limits: shared.limits,
                live: shared.live.clone(),
            }),
        })
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.query.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.query.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        self.cancel.clone()
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        self.errors.clone()
    }
}

#[cfg(test)]
mod tests;
