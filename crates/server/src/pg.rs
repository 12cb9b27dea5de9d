//! The Postgres wire protocol endpoint of `kappa up` (default `127.0.0.1:5433`): psql, BI tools
//! and drivers query the published tables through DataFusion.
//!
//! ```text
//!  client ──pgwire (simple + extended query)──► DfSessionService (datafusion-postgres)
//!                                                   │ one SessionContext for every session
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
use datafusion_postgres::pgwire::api::auth::noop::NoopStartupHandler;
use datafusion_postgres::pgwire::api::cancel::DefaultCancelHandler;
use datafusion_postgres::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use datafusion_postgres::pgwire::api::{
    ClientInfo, ConnectionManager, ErrorHandler, PgWireServerHandlers,
};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError};
use kappa_lakehouse::Lakehouse;
use tokio::net::TcpListener;

/// The schema of the versions' own tables (`kappa_versions`), not listed to clients.
const HIDDEN_SCHEMA: &str = "kappa_versions";

/// How often the endpoint looks whether the catalog changed (a commit, a cutover).
const REFRESH_MS: u64 = 100;

/// Serves the Postgres protocol on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    lakehouse: Lakehouse,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let live = Arc::new(LiveCatalog::default());
    let ctx = Arc::new(session(live.clone())?);
    let refresher = Arc::new(Refresher {
        lakehouse,
        live,
        seen: tokio::sync::Mutex::new(None),
        clients: std::sync::atomic::AtomicUsize::new(0),
    });
    tokio::spawn(refresh(refresher.clone(), shutdown.clone()));
    let handlers = Arc::new(Handlers::new(ctx));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return Ok(()),
        };
        match accepted {
            Ok((socket, peer)) => {
                let (handlers, refresher) = (handlers.clone(), refresher.clone());
                tokio::spawn(async move {
                    // Without clients the catalog is not followed: the first one brings it up
                    // to date before it is answered.
                    if refresher.clients.fetch_add(1, Ordering::SeqCst) == 0 {
                        refresher.refresh().await;
                    }
                    if let Err(e) =
                        datafusion_postgres::pgwire::tokio::process_socket(socket, None, handlers)
                            .await
                    {
                        tracing::debug!(%peer, error = %e, "a Postgres connection ended with an error");
                    }
                    refresher.clients.fetch_sub(1, Ordering::SeqCst);
                });
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

/// The session every connection shares: the live catalog as `kappa` (the default, with the
/// unqualified names in `public`), information_schema and pg_catalog.
fn session(live: Arc<LiveCatalog>) -> anyhow::Result<SessionContext> {
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_default_catalog_and_schema(
            kappa_lakehouse::CATALOG_NAME,
            kappa_lakehouse::UNQUALIFIED_SCHEMA,
        );
    let ctx = SessionContext::new_with_config(config);
    ctx.register_catalog(kappa_lakehouse::CATALOG_NAME, live);
    datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog(
        &ctx,
        kappa_lakehouse::CATALOG_NAME,
        datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider,
    )
    .map_err(|e| anyhow::anyhow!("set up pg_catalog: {e}"))?;
    Ok(ctx)
}

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
            // Tried again at the next look (the state is not recorded as seen).
            tracing::debug!(error = %e, "reading the catalog for Postgres clients failed");
            seen
        }
    }
}

/// The `kappa` catalog as of the last refresh, plus pg_catalog. Read-only to clients: DDL
/// (`DROP TABLE`, `CREATE TABLE`, `CREATE SCHEMA`) is refused, since every client shares it.
#[derive(Debug, Default)]
struct LiveCatalog {
    current: Arc<RwLock<Option<Arc<dyn CatalogProvider>>>>,
    extra: RwLock<BTreeMap<String, Arc<dyn SchemaProvider>>>,
}

impl LiveCatalog {
    fn set(&self, catalog: Arc<dyn CatalogProvider>) {
        if let Ok(mut current) = self.current.write() {
            *current = Some(catalog);
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
        if name != "pg_catalog" {
            return Err(read_only());
        }
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
            // The same columns: the newest state. Otherwise the plan is of another version's
            // table; it reads what it was planned on (prepare again to see the new one).
            Some(now) if now.schema() == self.planned.schema() => now,
            _ => self.planned.clone(),
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

/// The pgwire handlers: DataFusion's session service for both query protocols, no
/// authentication (the endpoint binds to loopback), cancel requests honoured.
struct Handlers {
    service: Arc<DfSessionService>,
    startup: Arc<Startup>,
    cancel: Arc<DefaultCancelHandler>,
}

impl Handlers {
    fn new(ctx: Arc<SessionContext>) -> Handlers {
        let connections = Arc::new(ConnectionManager::new());
        Handlers {
            service: Arc::new(DfSessionService::new(ctx)),
            startup: Arc::new(Startup {
                connections: connections.clone(),
            }),
            cancel: Arc::new(DefaultCancelHandler::new(connections)),
        }
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.service.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.service.clone()
    }

    fn startup_handler(&self) -> Arc<impl datafusion_postgres::pgwire::api::auth::StartupHandler> {
        self.startup.clone()
    }

    fn cancel_handler(&self) -> Arc<impl datafusion_postgres::pgwire::api::cancel::CancelHandler> {
        self.cancel.clone()
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(SqlStates)
    }
}

/// Gives DataFusion's errors (all `XX000`, internal error, as they come) the SQLSTATE a
/// Postgres client expects, so that drivers and BI tools can tell a typo from a crash.
struct SqlStates;

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
        }
    }
}

/// The SQLSTATE of a DataFusion error message.
fn sqlstate(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    let has = |s: &str| m.contains(s);
    if has("no field named") || has("column") && has("not found") {
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

/// Accepts every client (loopback only) and registers it for cancel requests.
struct Startup {
    connections: Arc<ConnectionManager>,
}

#[async_trait::async_trait]
impl NoopStartupHandler for Startup {
    fn connection_manager(&self) -> Option<Arc<ConnectionManager>> {
        Some(self.connections.clone())
    }
}
