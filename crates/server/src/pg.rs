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

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use datafusion::catalog::{CatalogProvider, SchemaProvider};
use datafusion::error::Result as DfResult;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_postgres::DfSessionService;
use datafusion_postgres::pgwire::api::RandomPidSecretKeyGenerator;
use datafusion_postgres::pgwire::api::auth::noop::NoopStartupHandler;
use datafusion_postgres::pgwire::api::auth::sasl::scram::ScramAuth;
use datafusion_postgres::pgwire::api::auth::sasl::{SASLAuthStartupHandler, scram};
use datafusion_postgres::pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use datafusion_postgres::pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use datafusion_postgres::pgwire::api::portal::Portal;
use datafusion_postgres::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use datafusion_postgres::pgwire::api::results::Response;
use datafusion_postgres::pgwire::api::store::PortalStore;
use datafusion_postgres::pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionManager, ErrorHandler, PgWireServerHandlers,
};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::cancel::CancelRequest;
use datafusion_postgres::pgwire::messages::data::DataRow;
use datafusion_postgres::pgwire::messages::startup::SecretKey;
use datafusion_postgres::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use futures::{Sink, StreamExt as _};
use kappa_lakehouse::Lakehouse;
use tokio::net::TcpListener;

use crate::config::QueryLimits;

/// The schema of the versions' own tables (`kappa_versions`), not listed to clients.
const HIDDEN_SCHEMA: &str = "kappa_versions";

/// How often the endpoint looks whether the catalog changed (a commit, a cutover).
const REFRESH_MS: u64 = 100;

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

/// Keeps the live catalog on the catalog's state while clients are connected.
struct Refresher {
    lakehouse: Lakehouse,
    live: Arc<LiveCatalog>,
    /// The state `live` holds.
    seen: tokio::sync::Mutex<Option<CatalogState>>,
    /// Connections open now.
    clients: std::sync::atomic::AtomicUsize,
}

impl Refresher {
    async fn refresh(&self) {
        let mut seen = self.seen.lock().await;
        *seen = refresh_once(&self.lakehouse, &self.live, seen.take()).await;
    }
}

/// The session every connection's own is made from: the live catalog as `kappa` (the default,
/// with the unqualified names in `public`), information_schema and pg_catalog.
fn session(live: Arc<LiveCatalog>) -> anyhow::Result<SessionContext> {
    // DataFusion's own information_schema would name Arrow's types: the catalog holds one
    // that names Postgres' (`crate::pg_types`).
    let config = SessionConfig::new()
        .with_information_schema(false)
        .with_default_catalog_and_schema(
            kappa_lakehouse::CATALOG_NAME,
            kappa_lakehouse::UNQUALIFIED_SCHEMA,
        );
    let ctx = SessionContext::new_with_config(config);
    ctx.register_catalog(kappa_lakehouse::CATALOG_NAME, live.clone());
    datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog(
        &ctx,
        kappa_lakehouse::CATALOG_NAME,
        datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider,
    )
    .map_err(|e| anyhow::anyhow!("set up pg_catalog: {e}"))?;
    let information_schema = crate::pg_types::TypedSchema {
        inner: Arc::new(
            datafusion::catalog::information_schema::InformationSchemaProvider::new(
                ctx.state().catalog_list().clone(),
            ),
        ),
        catalog: crate::pg_types::Catalog::InformationSchema,
    };
    live.register_schema(INFORMATION_SCHEMA, Arc::new(information_schema))
        .map_err(|e| anyhow::anyhow!("set up information_schema: {e}"))?;
    ctx.register_udf(crate::pg_types::pg_typeof());
    Ok(ctx)
}

/// The schema of the SQL standard's catalog views.
const INFORMATION_SCHEMA: &str = "information_schema";

/// Every [`REFRESH_MS`] while clients are connected, brings the live catalog up to date:
/// rebuilt (every table pinned in one read) when the SQL catalog's rows changed.
async fn refresh(refresher: Arc<Refresher>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(REFRESH_MS)) => {}
            _ = shutdown.changed() => return,
        }
        if refresher.clients.load(Ordering::SeqCst) > 0 {
            refresher.refresh().await;
        }
    }
}

type CatalogState = Vec<(String, String, String)>;

/// Puts the catalog's current state in `live` if it differs from `seen`; returns the state
/// `live` holds.
async fn refresh_once(
    lakehouse: &Lakehouse,
    live: &LiveCatalog,
    seen: Option<CatalogState>,
) -> Option<CatalogState> {
    let state = match lakehouse.catalog_state().await {
        Ok(state) if seen.as_ref() != Some(&state) => state,
        Ok(_) => return seen,
        Err(e) => {
            tracing::debug!(error = %e, "reading the catalog for Postgres clients failed");
            return seen;
        }
    };
    match lakehouse.session().await {
        Ok(ctx) => match ctx.catalog(kappa_lakehouse::CATALOG_NAME) {
            Some(catalog) => {
                live.set(catalog);
                Some(state)
            }
            None => seen,
        },
        Err(e) => {
            // Tried again at the next look (the state is not recorded as seen); meanwhile
            // clients read the state before.
            tracing::warn!(error = %e, "reading the catalog for Postgres clients failed");
            seen
        }
    }
}

/// The `kappa` catalog as of the last refresh, plus pg_catalog. Read-only to clients: DDL
/// (`DROP TABLE`, `CREATE TABLE`, `CREATE SCHEMA`) is refused, since every client shares it.
///
/// The endpoint's one follows the catalog; each connection has its own ([`LiveCatalog::pinned`])
/// set to the endpoint's state as each query starts, so every table of one query is of one
/// state of the catalog — all of a cutover or none of it — however long the query runs.
#[derive(Debug, Default)]
struct LiveCatalog {
    current: Arc<RwLock<Option<Arc<dyn CatalogProvider>>>>,
    extra: Arc<RwLock<BTreeMap<String, Arc<dyn SchemaProvider>>>>,
}

impl LiveCatalog {
    fn set(&self, catalog: Arc<dyn CatalogProvider>) {
        if let Ok(mut current) = self.current.write() {
            *current = Some(catalog);
        }
    }

    /// A connection's own: `self`'s state now, and the same pg_catalog.
    fn pinned(&self) -> LiveCatalog {
        LiveCatalog {
            current: Arc::new(RwLock::new(self.current())),
            extra: self.extra.clone(),
        }
    }

    /// Takes `endpoint`'s state (as a query starts).
    fn pin(&self, endpoint: &LiveCatalog) {
        if let Some(catalog) = endpoint.current() {
            self.set(catalog);
        }
    }

    fn current(&self) -> Option<Arc<dyn CatalogProvider>> {
        current(&self.current)
    }
}

fn current(cell: &RwLock<Option<Arc<dyn CatalogProvider>>>) -> Option<Arc<dyn CatalogProvider>> {
    cell.read().ok().and_then(|c| c.clone())
}

impl CatalogProvider for LiveCatalog {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn schema_names(&self) -> Vec<String> {
        // Each version's own table is reached through its model's name: not listed.
        let mut names: Vec<String> = self
            .current()
            .map(|c| c.schema_names())
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s != HIDDEN_SCHEMA)
            .collect();
        if let Ok(extra) = self.extra.read() {
            names.extend(extra.keys().cloned());
        }
        names
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        if let Some(schema) = self.extra.read().ok().and_then(|e| e.get(name).cloned()) {
            return Some(schema);
        }
        self.current()?.schema(name)?;
        Some(Arc::new(LiveSchema {
            catalog: self.current.clone(),
            name: name.to_owned(),
        }))
    }

    fn register_schema(
        &self,
        name: &str,
        schema: Arc<dyn SchemaProvider>,
    ) -> DfResult<Option<Arc<dyn SchemaProvider>>> {
        // pg_catalog (set up by datafusion-pg-catalog) with Postgres' types in pg_attribute,
        // and information_schema: the endpoint's own, never a client's.
        let schema: Arc<dyn SchemaProvider> = match name {
            "pg_catalog" => Arc::new(crate::pg_types::TypedSchema {
                inner: schema,
                catalog: crate::pg_types::Catalog::PgCatalog,
            }),
            INFORMATION_SCHEMA
                if !self
                    .extra
                    .read()
                    .is_ok_and(|e| e.contains_key(INFORMATION_SCHEMA)) =>
            {
                schema
            }
            _ => return Err(read_only()),
        };
        Ok(self
            .extra
            .write()
            .ok()
            .and_then(|mut e| e.insert(name.to_owned(), schema)))
    }
}

fn read_only() -> datafusion::error::DataFusionError {
    datafusion::error::DataFusionError::NotImplemented(
        "the tables are kappa's: models write them, clients only read (read-only endpoint)".into(),
    )
}

/// One schema (a layer, or the unqualified names) of the live catalog, read-only. Its tables
/// are found again when a query runs (`LiveTable`), not when it was planned: a statement a
/// driver prepared once keeps reading the newest published state.
#[derive(Debug)]
struct LiveSchema {
    catalog: Arc<RwLock<Option<Arc<dyn CatalogProvider>>>>,
    name: String,
}

impl LiveSchema {
    fn schema(&self) -> Option<Arc<dyn SchemaProvider>> {
        current(&self.catalog)?.schema(&self.name)
    }
}

#[async_trait::async_trait]
impl SchemaProvider for LiveSchema {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn table_names(&self) -> Vec<String> {
        let names = self.schema().map(|s| s.table_names()).unwrap_or_default();
        if self.name != kappa_lakehouse::UNQUALIFIED_SCHEMA {
            return names;
        }
        // The unqualified names, without those of the version tables.
        let hidden = current(&self.catalog)
            .and_then(|c| c.schema(HIDDEN_SCHEMA))
            .map(|s| s.table_names())
            .unwrap_or_default();
        names.into_iter().filter(|t| !hidden.contains(t)).collect()
    }

    async fn table(
        &self,
        name: &str,
    ) -> DfResult<Option<Arc<dyn datafusion::catalog::TableProvider>>> {
        let Some(schema) = self.schema() else {
            return Ok(None);
        };
        let Some(table) = schema.table(name).await? else {
            return Ok(None);
        };
        Ok(Some(Arc::new(LiveTable {
            catalog: self.catalog.clone(),
            schema: self.name.clone(),
            name: name.to_owned(),
            planned: table,
        })))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.schema().is_some_and(|s| s.table_exist(name))
    }

    fn register_table(
        &self,
        _name: String,
        _table: Arc<dyn datafusion::catalog::TableProvider>,
    ) -> DfResult<Option<Arc<dyn datafusion::catalog::TableProvider>>> {
        Err(read_only())
    }

    fn deregister_table(
        &self,
        _name: &str,
    ) -> DfResult<Option<Arc<dyn datafusion::catalog::TableProvider>>> {
        Err(read_only())
    }
}

/// A table found again in the live catalog each time a plan over it runs; `planned` is the
/// state it was planned against (its schema).
#[derive(Debug)]
struct LiveTable {
    catalog: Arc<RwLock<Option<Arc<dyn CatalogProvider>>>>,
    schema: String,
    name: String,
    planned: Arc<dyn datafusion::catalog::TableProvider>,
}

#[async_trait::async_trait]
impl datafusion::catalog::TableProvider for LiveTable {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.planned.schema()
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        self.planned.table_type()
    }

    async fn scan(
        &self,
        state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        filters: &[datafusion::logical_expr::Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        let now = match current(&self.catalog).and_then(|c| c.schema(&self.schema)) {
            Some(schema) => schema.table(&self.name).await?,
            None => None,
        };
        let table = match now {
            // The same columns: the newest state.
            Some(now) if now.schema() == self.planned.schema() => now,
            // Another version's table, with other columns (a deploy changed them since the
            // statement was planned): reading the old one beside the other tables' new state
            // would mix versions. Postgres' own error for it makes drivers prepare again.
            Some(_) => {
                return Err(datafusion::error::DataFusionError::Execution(format!(
                    "{CHANGED_RESULT_TYPE}: {}.{} changed its columns since the statement was \
                     prepared (a deploy); prepare it again",
                    self.schema, self.name
                )));
            }
            // Gone from the catalog: what it was planned on.
            None => self.planned.clone(),
        };
        table.scan(state, projection, filters, limit).await
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&datafusion::logical_expr::Expr],
    ) -> DfResult<Vec<datafusion::logical_expr::TableProviderFilterPushDown>> {
        self.planned.supports_filters_pushdown(filters)
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
                inner: DfSessionService::new(ctx),
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

/// The queries running now, by connection (the backend pid a client is given at startup), so
/// that a cancel request stops one wherever it is: planning, or streaming its rows.
#[derive(Default)]
struct Running {
    /// By (pid, secret), as pgwire's `ConnectionManager` keys them.
    by_key: std::sync::Mutex<std::collections::HashMap<(i32, bytes::Bytes), CancelCell>>,
}

/// Counts the cancel requests a connection got; a query stops when the count moves past the
/// one its start saw. Held by the connection (its session extensions), so it goes with it.
type CancelCell = std::sync::Weak<tokio::sync::watch::Sender<u64>>;

impl Running {
    /// The cancel counter of `client`'s connection, registered on first use.
    fn cell<C: ClientInfo>(&self, client: &C) -> Arc<tokio::sync::watch::Sender<u64>> {
        let cell = client
            .session_extensions()
            .get_or_insert_with(|| tokio::sync::watch::Sender::new(0u64));
        let (pid, secret) = client.pid_and_secret_key();
        if let Ok(mut by_key) = self.by_key.lock() {
            by_key.retain(|_, weak| weak.strong_count() > 0);
            by_key
                .entry((pid, secret.to_bytes()))
                .or_insert_with(|| Arc::downgrade(&cell));
        }
        cell
    }

    /// Stops what the connection `pid` with `secret` runs.
    fn cancel(&self, pid: i32, secret: &SecretKey) {
        // As bytes: the same 4 bytes may arrive as another variant on the cancel's own
        // connection.
        let cell = self
            .by_key
            .lock()
            .ok()
            .and_then(|by_key| by_key.get(&(pid, secret.to_bytes()))?.upgrade());
        if let Some(cell) = cell {
            cell.send_modify(|n| *n += 1);
        }
    }
}

/// Honours a cancel request (psql's Ctrl+C, a driver's `cancel()`): pgwire's own (which stops
/// a query being planned) and [`Running`] (which stops one streaming its rows).
struct Canceller {
    connections: DefaultCancelHandler,
    running: Arc<Running>,
}

#[async_trait::async_trait]
impl CancelHandler for Canceller {
    async fn on_cancel_request(&self, request: CancelRequest) {
        self.running.cancel(request.pid, &request.secret_key);
        self.connections.on_cancel_request(request).await;
    }
}

/// DataFusion's session service with every query bounded: its time (`limits.timeout`, or the
/// session's `statement_timeout` if shorter), cancel requests, and — through the connection's
/// memory pool — its memory. Each bound stops the query with an error naming it.
struct Limited {
    inner: DfSessionService,
    /// The connection's catalog, and the endpoint's it is pinned to as each query starts.
    pinned: Arc<LiveCatalog>,
    live: Arc<LiveCatalog>,
    limits: QueryLimits,
    running: Arc<Running>,
    metrics: Arc<crate::metrics::PgMetrics>,
}

/// The session setting datafusion-postgres keeps `SET statement_timeout` in (milliseconds).
const STATEMENT_TIMEOUT_KEY: &str = "statement_timeout_ms";

impl Limited {
    /// Starts bounding a query of `client`.
    fn start<C: ClientInfo>(&self, client: &C) -> Bounds {
        let session = client
            .metadata()
            .get(STATEMENT_TIMEOUT_KEY)
            .and_then(|ms| ms.parse::<u64>().ok())
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis);
        let (timeout, by_session) = match session {
            Some(t) if t < self.limits.timeout => (t, true),
            _ => (self.limits.timeout, false),
        };
        self.pinned.pin(&self.live);
        let cell = self.running.cell(client);
        let at_start = *cell.borrow();
        self.metrics.queries.fetch_add(1, Ordering::Relaxed);
        Bounds {
            deadline: tokio::time::Instant::now() + timeout,
            timeout,
            by_session,
            cell,
            at_start,
            timer: Arc::new(QueryTimer {
                started: std::time::Instant::now(),
                metrics: self.metrics.clone(),
            }),
        }
    }
}

/// The bounds of one running query (one query string: all its statements).
#[derive(Clone)]
struct Bounds {
    deadline: tokio::time::Instant,
    timeout: Duration,
    /// Whether the deadline is the session's `statement_timeout` (not the server's limit).
    by_session: bool,
    /// The connection's cancel counter, and its value when the query started.
    cell: Arc<tokio::sync::watch::Sender<u64>>,
    at_start: u64,
    /// Records the latency once the last of the query's row streams is done.
    timer: Arc<QueryTimer>,
}

/// Observes a query's latency when dropped (with the last of its row streams).
struct QueryTimer {
    started: std::time::Instant,
    metrics: Arc<crate::metrics::PgMetrics>,
}

impl Drop for QueryTimer {
    fn drop(&mut self) {
        self.metrics.seconds.observe(self.started.elapsed());
    }
}

type Stop = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl Bounds {
    /// Resolves when a cancel request for the connection comes after the query started.
    fn cancelled(&self) -> Stop {
        let mut seen = self.cell.subscribe();
        let at_start = self.at_start;
        Box::pin(async move {
            if seen.wait_for(|n| *n > at_start).await.is_err() {
                // The connection is gone: nobody can cancel any more.
                std::future::pending::<()>().await;
            }
        })
    }

    /// Runs `planning` within the bounds.
    async fn plan<T>(
        &self,
        planning: impl std::future::Future<Output = PgWireResult<T>>,
    ) -> PgWireResult<T> {
        let outcome = tokio::select! {
            planned = planning => planned,
            () = tokio::time::sleep_until(self.deadline) => Err(self.timed_out()),
            () = self.cancelled() => Err(cancelled()),
        };
        if outcome.is_err() {
            self.timer.metrics.errors.fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    fn timed_out(&self) -> PgWireError {
        let limit = humantime::format_duration(self.timeout);
        let why = if self.by_session {
            format!("the session's statement_timeout ({limit})")
        } else {
            format!("the server's per-query limit ({limit}, [server] query_timeout in kappa.toml)")
        };
        PgWireError::UserError(Box::new(ErrorInfo::new(
            "ERROR".into(),
            "57014".into(),
            format!(
                "canceling statement due to statement timeout: the query ran longer than {why}"
            ),
        )))
    }

    /// Bounds the rows of `response` too (they are computed as they are sent). They are
    /// computed by a task of their own: one poll of DataFusion's stream can compute for
    /// seconds, and the deadline and cancel requests must be answered meanwhile.
    fn stream(&self, response: Response) -> Response {
        match response {
            Response::Query(mut query) => {
                let rows =
                    std::mem::replace(&mut query.data_rows, Box::pin(futures::stream::empty()));
                query.data_rows = Box::pin(BoundedRows {
                    deadline: Box::pin(tokio::time::sleep_until(self.deadline)),
                    cancelled: self.cancelled(),
                    source: Some(rows),
                    rows: None,
                    pump: None,
                    done: false,
                    bounds: self.clone(),
                });
                Response::Query(query)
            }
            other => other,
        }
    }
}

/// Computes `rows` into `tx`, then `None` to say they are all there (a channel closed without
/// it means the computation failed).
async fn pump(
    mut rows: datafusion_postgres::pgwire::api::results::SendableRowStream,
    tx: tokio::sync::mpsc::Sender<Option<PgWireResult<DataRow>>>,
) {
    while let Some(row) = rows.next().await {
        if tx.send(Some(row)).await.is_err() {
            return;
        }
    }
    let _ = tx.send(None).await;
}

fn cancelled() -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        "57014".into(),
        "canceling statement due to user request".into(),
    )))
}

/// Refuses what a client may not do through the engine: change its settings (`SET` or `RESET`
/// of `datafusion.…` — they include the memory pool and the spill directory, which are the
/// server's) and write files (`COPY … TO`). Read on the text with quotes and comments removed,
/// statement by statement, so that `SET "datafusion".runtime…` or a statement after one the
/// parser does not know cannot slip by. `SET statement_timeout` and the like pass.
fn refuse_engine_settings(query: &str) -> PgWireResult<()> {
    for statement in normalized_statements(query) {
        let words: Vec<&str> = statement.split_whitespace().collect();
        let setting = match words.as_slice() {
            ["set" | "reset", "session" | "local", rest @ ..] | ["set" | "reset", rest @ ..] => {
                // The name up to `=` or `to`, its parts joined as the engine joins them.
                let name: String = rest
                    .iter()
                    .take_while(|w| **w != "to" && !w.starts_with('='))
                    .flat_map(|w| w.split('='))
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                Some(name)
            }
            _ => None,
        };
        let refused = match (setting, words.first()) {
            (Some(name), _) if name.starts_with("datafusion") => Some(
                "the engine's settings are the server's (the per-query limits are [server] \
                 query_timeout and query_memory in kappa.toml)",
            ),
            (_, Some(&"copy")) => Some("the endpoint is read-only: COPY is refused"),
            _ => None,
        };
        if let Some(why) = refused {
            return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".into(),
                "42501".into(),
                format!("`{statement}`: {why}"),
            ))));
        }
        // Writes get the one error Postgres gives them on a read-only transaction, whatever
        // the engine would have said (a missing table, an unsupported statement).
        if let Some(write) = words.first().filter(|w| WRITES.contains(w)) {
            return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".into(),
                "25006".into(),
                format!(
                    "cannot execute {} in a read-only transaction: the endpoint serves the \
                     tables kappa's models write, and clients only read them",
                    write.to_uppercase()
                ),
            ))));
        }
    }
    Ok(())
}

/// The first words of statements that write: refused as read-only (SQLSTATE 25006).
const WRITES: &[&str] = &[
    "insert", "update", "delete", "merge", "upsert", "create", "drop", "alter", "truncate",
    "grant", "revoke", "vacuum",
];

/// The statements of `query`, lowercased, without comments and double quotes, and with the
/// spaces around dots removed (`datafusion . runtime` is one name); split at semicolons.
fn normalized_statements(query: &str) -> Vec<String> {
    let mut text = String::with_capacity(query.len());
    let mut chars = query.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('-', Some('-')) => {
                // A line comment.
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                text.push(' ');
            }
            ('/', Some('*')) => {
                chars.next();
                let mut last = ' ';
                for c in chars.by_ref() {
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
                text.push(' ');
            }
            ('"', _) => {}
            _ => text.extend(c.to_lowercase()),
        }
    }
    let mut joined = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !joined.is_empty() && !joined.ends_with('.') && !word.starts_with('.') {
            joined.push(' ');
        }
        joined.push_str(word);
    }
    joined
        .split(';')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Rows computed ahead of the client.
const ROWS_AHEAD: usize = 256;

/// A query's rows, ended by an error when its deadline passes or a cancel request comes; the
/// task computing them starts when they are first asked for (the statements of one query
/// string run one after the other) and is stopped when they stop or are dropped.
struct BoundedRows {
    source: Option<datafusion_postgres::pgwire::api::results::SendableRowStream>,
    rows: Option<tokio::sync::mpsc::Receiver<Option<PgWireResult<DataRow>>>>,
    pump: Option<tokio::task::AbortHandle>,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    cancelled: Stop,
    bounds: Bounds,
    done: bool,
}

impl futures::Stream for BoundedRows {
    type Item = PgWireResult<DataRow>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let stopped = if this.cancelled.as_mut().poll(cx).is_ready() {
            Some(cancelled())
        } else if this.deadline.as_mut().poll(cx).is_ready() {
            Some(this.bounds.timed_out())
        } else {
            None
        };
        let next = match stopped {
            Some(error) => Poll::Ready(Some(Err(error))),
            None => {
                if let Some(source) = this.source.take() {
                    let (tx, rx) = tokio::sync::mpsc::channel(ROWS_AHEAD);
                    this.pump = Some(tokio::spawn(pump(source, tx)).abort_handle());
                    this.rows = Some(rx);
                }
                match this.rows.as_mut().map(|rows| rows.poll_recv(cx)) {
                    Some(Poll::Ready(Some(Some(row)))) => Poll::Ready(Some(row)),
                    Some(Poll::Ready(Some(None))) => Poll::Ready(None),
                    Some(Poll::Ready(None)) | None => {
                        Poll::Ready(Some(Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                            "ERROR".into(),
                            "XX000".into(),
                            "the query's computation ended before its last row (see the server's \
                             log)"
                                .into(),
                        ))))))
                    }
                    Some(Poll::Pending) => Poll::Pending,
                }
            }
        };
        match &next {
            Poll::Ready(Some(Err(_))) => {
                this.stop();
                this.bounds
                    .timer
                    .metrics
                    .errors
                    .fetch_add(1, Ordering::Relaxed);
            }
            Poll::Ready(None) => this.stop(),
            _ => {}
        }
        next
    }
}

impl BoundedRows {
    /// No more rows: the computation stops, its memory is given back.
    fn stop(&mut self) {
        self.done = true;
        if let Some(pump) = self.pump.take() {
            pump.abort();
        }
        self.rows = None;
        self.source = None;
    }
}

impl Drop for BoundedRows {
    fn drop(&mut self) {
        self.stop();
    }
}

#[async_trait::async_trait]
impl SimpleQueryHandler for Limited {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        refuse_engine_settings(query)?;
        let bounds = self.start(client);
        let responses = bounds
            .plan(SimpleQueryHandler::do_query(&self.inner, client, query))
            .await?;
        // Every statement of the string streams within the same bounds.
        Ok(responses.into_iter().map(|r| bounds.stream(r)).collect())
    }
}

#[async_trait::async_trait]
impl ExtendedQueryHandler for Limited {
    type Statement = <DfSessionService as ExtendedQueryHandler>::Statement;
    type QueryParser = <DfSessionService as ExtendedQueryHandler>::QueryParser;

    /// Asked for as a statement is parsed (planned), which is the start of a query too: the
    /// connection's catalog is pinned to the endpoint's state first.
    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.pinned.pin(&self.live);
        self.inner.query_parser()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        refuse_engine_settings(&portal.statement.statement.0)?;
        let bounds = self.start(client);
        let response = bounds
            .plan(ExtendedQueryHandler::do_query(
                &self.inner,
                client,
                portal,
                max_rows,
            ))
            .await?;
        Ok(bounds.stream(response))
    }
}

/// Gives DataFusion's errors (all `XX000`, internal error, as they come) the SQLSTATE a
/// Postgres client expects, so that drivers and BI tools can tell a typo from a crash; a query
/// over its memory is told which limit it hit.
struct SqlStates {
    limits: QueryLimits,
    /// The tables a "table not found" names candidates from.
    live: Arc<LiveCatalog>,
}

impl ErrorHandler for SqlStates {
    fn on_error<C: ClientInfo>(&self, _client: &C, error: &mut PgWireError) {
        if let PgWireError::ApiError(e) = error {
            let message = e.to_string();
            *error = PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".into(),
                "XX000".into(),
                message,
            )));
        }
        if let PgWireError::UserError(info) = error
            && info.code == "XX000"
        {
            info.code = sqlstate(&info.message).to_owned();
            info.message =
                crate::isolated::with_memory_hint(std::mem::take(&mut info.message), &self.limits);
            if info.code == "42P01" {
                let tables: Vec<(String, String)> = self
                    .live
                    .schema_names()
                    .into_iter()
                    .filter_map(|schema| Some((self.live.schema(&schema)?, schema)))
                    .flat_map(|(provider, schema)| {
                        provider
                            .table_names()
                            .into_iter()
                            .map(move |table| (schema.clone(), table))
                    })
                    .collect();
                info.message = crate::service::name_candidates(
                    std::mem::take(&mut info.message),
                    tables.into_iter(),
                );
            }
        }
    }
}

/// Postgres' message when a prepared statement's tables changed their columns.
const CHANGED_RESULT_TYPE: &str = "cached plan must not change result type";

/// The SQLSTATE of a DataFusion error message.
fn sqlstate(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    let has = |s: &str| m.contains(s);
    if has(CHANGED_RESULT_TYPE) {
        "0A000" // feature_not_supported, as Postgres answers it
    } else if has("no field named") || has("column") && has("not found") {
        "42703" // undefined_column
    } else if has("table") && has("not found") {
        "42P01" // undefined_table
    } else if has("parser error") || has("syntax") {
        "42601" // syntax_error
    } else if has("invalid function") || has("function") && has("not found") {
        "42883" // undefined_function
    } else if has("divide by zero") || has("division by zero") {
        "22012" // division_by_zero
    } else if has("cast") || has("cannot parse") {
        "22P02" // invalid_text_representation
    } else if has("placeholder") {
        "22023" // invalid_parameter_value
    } else if has("resources exhausted") {
        "53200" // out_of_memory
    } else if has("cancel") {
        "57014" // query_canceled
    } else if has("not implemented") || has("unsupported") {
        "0A000" // feature_not_supported
    } else {
        "XX000"
    }
}

/// How a connection starts: open (the endpoint is on loopback), or by SCRAM-SHA-256.
enum Startup {
    Open(OpenStartup),
    Scram(Box<SASLAuthStartupHandler<DefaultServerParameterProvider>>),
}

#[async_trait::async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match self {
            Startup::Open(open) => open.on_startup(client, message).await,
            Startup::Scram(scram) => scram.on_startup(client, message).await,
        }
    }
}

/// Accepts every client (loopback only) and registers it for cancel requests.
struct OpenStartup {
    connections: Arc<ConnectionManager>,
}

#[async_trait::async_trait]
impl NoopStartupHandler for OpenStartup {
    fn connection_manager(&self) -> Option<Arc<ConnectionManager>> {
        Some(self.connections.clone())
    }
}

/// The one user's password, salted and hashed once as SCRAM-SHA-256 wants it.
struct Scram {
    user: String,
    salt: Vec<u8>,
    salted: Vec<u8>,
}

impl std::fmt::Debug for Scram {
    // The salted password opens the door as the password does: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scram").field("user", &self.user).finish()
    }
}

/// PBKDF2 rounds of the salted password (RFC 7677's minimum, Postgres' default).
const SCRAM_ITERATIONS: usize = 4096;

impl Scram {
    fn new(auth: &crate::config::PgAuth) -> Scram {
        let salt = scram::random_nonce().into_bytes();
        let salted = scram::gen_salted_password(&auth.password, &salt, SCRAM_ITERATIONS);
        Scram {
            user: auth.user.clone(),
            salt,
            salted,
        }
    }
}

#[async_trait::async_trait]
impl AuthSource for Scram {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        match login.user() {
            Some(user) if user == self.user => {
                Ok(Password::new(Some(self.salt.clone()), self.salted.clone()))
            }
            Some(user) => Err(PgWireError::InvalidPassword(user.to_owned())),
            None => Err(PgWireError::UserNameRequired),
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::Int64Array;
    use datafusion::catalog::{MemTable, MemoryCatalogProvider, MemorySchemaProvider};

    use super::*;

    /// A catalog whose schema `gold` has tables `a` and `b`, each one row of `value`.
    fn state(value: i64) -> Arc<dyn CatalogProvider> {
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("v", arrow::datatypes::DataType::Int64, false),
        ]));
        let batch = arrow::array::RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![value]))],
        )
        .unwrap();
        let layer = MemorySchemaProvider::new();
        for name in ["a", "b"] {
            let table = MemTable::try_new(schema.clone(), vec![vec![batch.clone()]]).unwrap();
            layer.register_table(name.into(), Arc::new(table)).unwrap();
        }
        let catalog = MemoryCatalogProvider::new();
        catalog.register_schema("gold", Arc::new(layer)).unwrap();
        Arc::new(catalog)
    }

    /// The engine's settings and file writes are refused however they are spelled; the
    /// session's own settings and queries that merely mention the word pass.
    #[test]
    fn engine_settings_and_copy_are_refused_however_spelled() {
        for refused in [
            "SET datafusion.runtime.memory_limit = '1T'",
            "SET \"datafusion\".runtime.memory_limit='100G'",
            "RESET \"datafusion\".runtime.memory_limit",
            "ABORT; SET datafusion.runtime.memory_limit='1T'",
            "/* hi */ set datafusion . runtime.temp_directory = '/x'",
            "-- note\nSET SESSION datafusion.execution.target_partitions TO 64",
            "COPY (SELECT 1) TO '/tmp/x.csv'",
        ] {
            let refused_as = refuse_engine_settings(refused).unwrap_err().to_string();
            assert!(
                refused_as.contains("42501")
                    || refused_as.contains("refused")
                    || refused_as.contains("server's"),
                "{refused}: {refused_as}"
            );
        }
        for passes in [
            "SET statement_timeout = '5s'",
            "SET application_name = 'datafusion.x'",
            "SET application_name TO 'datafusion.x'",
            "SELECT 'datafusion.runtime' AS x",
            "SELECT count(*) FROM silver.orders",
        ] {
            assert!(refuse_engine_settings(passes).is_ok(), "{passes}");
        }
        for write in [
            "INSERT INTO silver.orders VALUES (1)",
            "delete from gold.revenue",
            "SELECT 1; DROP TABLE silver.orders",
            "/* x */ CREATE TABLE t (a int)",
        ] {
            let refused_as = refuse_engine_settings(write).unwrap_err().to_string();
            assert!(
                refused_as.contains("25006") && refused_as.contains("read-only"),
                "{write}: {refused_as}"
            );
        }
    }

    /// A query planned on one state of the catalog reads that state in all its tables, though
    /// the endpoint moves on (a cutover) before it runs; the connection's next query reads the
    /// new state.
    #[tokio::test]
    async fn a_query_reads_one_catalog_state_in_all_its_tables() {
        let endpoint = LiveCatalog::default();
        endpoint.set(state(1));
        let connection = Arc::new(endpoint.pinned());
        let ctx = SessionContext::new();
        ctx.register_catalog("kappa", connection.clone());
        let sql = "SELECT a.v, b.v FROM kappa.gold.a a CROSS JOIN kappa.gold.b b";
        let planned = ctx.sql(sql).await.unwrap();
        // The cutover lands between the plan and the scans.
        endpoint.set(state(2));
        let rows = planned.collect().await.unwrap();
        let values: Vec<i64> = (0..2)
            .map(|c| {
                rows[0]
                    .column(c)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .value(0)
            })
            .collect();
        assert_eq!(values, [1, 1]);
        // The next query starts by pinning the endpoint's state.
        connection.pin(&endpoint);
        let rows = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let a = rows[0]
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0);
        assert_eq!(a, 2);
    }

    /// A statement planned before a deploy changed a table's columns fails with Postgres'
    /// "cached plan must not change result type" (0A000), so that drivers prepare it again,
    /// instead of reading the old version beside the others' new state.
    #[tokio::test]
    async fn a_plan_over_changed_columns_fails_as_postgres_does() {
        let endpoint = LiveCatalog::default();
        endpoint.set(state(1));
        let connection = Arc::new(endpoint.pinned());
        let ctx = SessionContext::new();
        ctx.register_catalog("kappa", connection.clone());
        let planned = ctx.sql("SELECT v FROM kappa.gold.a").await.unwrap();
        // The deploy: gold.a now has a column of another type.
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("v", arrow::datatypes::DataType::Utf8, false),
        ]));
        let layer = MemorySchemaProvider::new();
        let table = MemTable::try_new(schema, vec![vec![]]).unwrap();
        layer.register_table("a".into(), Arc::new(table)).unwrap();
        let catalog = MemoryCatalogProvider::new();
        catalog.register_schema("gold", Arc::new(layer)).unwrap();
        endpoint.set(Arc::new(catalog));
        connection.pin(&endpoint);
        let error = planned.collect().await.unwrap_err().to_string();
        assert!(error.contains(CHANGED_RESULT_TYPE), "{error}");
        assert_eq!(sqlstate(&error), "0A000");
    }
}
