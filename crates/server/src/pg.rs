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
    tokio::spawn(refresh(lakehouse, live, shutdown.clone()));
    let handlers = Arc::new(Handlers::new(ctx));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return Ok(()),
        };
        match accepted {
            Ok((socket, peer)) => {
                let handlers = handlers.clone();
                tokio::spawn(async move {
                    if let Err(e) =
                        datafusion_postgres::pgwire::tokio::process_socket(socket, None, handlers)
                            .await
                    {
                        tracing::debug!(%peer, error = %e, "a Postgres connection ended with an error");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "accepting a Postgres connection failed"),
        }
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

/// Keeps `live` on the catalog's current state: rebuilt (every table pinned in one read) when
/// the SQL catalog's rows change.
async fn refresh(
    lakehouse: Lakehouse,
    live: Arc<LiveCatalog>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut seen = None;
    loop {
        match lakehouse.catalog_state().await {
            Ok(state) if seen.as_ref() != Some(&state) => match lakehouse.session().await {
                Ok(ctx) => {
                    if let Some(catalog) = ctx.catalog(kappa_lakehouse::CATALOG_NAME) {
                        live.set(catalog);
                        seen = Some(state);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the catalog for Postgres clients failed")
                }
            },
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading the catalog for Postgres clients failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(REFRESH_MS)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The `kappa` catalog as of the last refresh, plus the schemas registered into it
/// (pg_catalog).
#[derive(Debug, Default)]
struct LiveCatalog {
    current: RwLock<Option<Arc<dyn CatalogProvider>>>,
    extra: RwLock<BTreeMap<String, Arc<dyn SchemaProvider>>>,
}

impl LiveCatalog {
    fn set(&self, catalog: Arc<dyn CatalogProvider>) {
        if let Ok(mut current) = self.current.write() {
            *current = Some(catalog);
        }
    }

    fn current(&self) -> Option<Arc<dyn CatalogProvider>> {
        self.current.read().ok().and_then(|c| c.clone())
    }
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
        let current = self.current()?;
        let schema = current.schema(name)?;
        if name != kappa_lakehouse::UNQUALIFIED_SCHEMA {
            return Some(schema);
        }
        // The unqualified names, without those of the version tables.
        let hidden = current
            .schema(HIDDEN_SCHEMA)
            .map(|s| s.table_names())
            .unwrap_or_default();
        Some(Arc::new(Without { schema, hidden }))
    }

    fn register_schema(
        &self,
        name: &str,
        schema: Arc<dyn SchemaProvider>,
    ) -> DfResult<Option<Arc<dyn SchemaProvider>>> {
        Ok(self
            .extra
            .write()
            .ok()
            .and_then(|mut e| e.insert(name.to_owned(), schema)))
    }
}

/// A schema without some of its table names in listings.
#[derive(Debug)]
struct Without {
    schema: Arc<dyn SchemaProvider>,
    hidden: Vec<String>,
}

#[async_trait::async_trait]
impl SchemaProvider for Without {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn table_names(&self) -> Vec<String> {
        self.schema
            .table_names()
            .into_iter()
            .filter(|t| !self.hidden.contains(t))
            .collect()
    }

    async fn table(
        &self,
        name: &str,
    ) -> DfResult<Option<Arc<dyn datafusion::catalog::TableProvider>>> {
        self.schema.table(name).await
    }

    fn table_exist(&self, name: &str) -> bool {
        self.schema.table_exist(name)
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
