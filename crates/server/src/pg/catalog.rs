//! What psql sees: the live catalog (`LiveCatalog`), rebuilt when the SQL catalog's rows
//! change, with `pg_catalog` and `information_schema` beside it.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use datafusion::catalog::{CatalogProvider, SchemaProvider};
use datafusion::error::Result as DfResult;
use datafusion::prelude::{SessionConfig, SessionContext};
use kappa_lakehouse::Lakehouse;

/// The schema of the versions' own tables (`kappa_versions`), not listed to clients.
pub(super) const HIDDEN_SCHEMA: &str = "kappa_versions";

/// How often the endpoint looks whether the catalog changed (a commit, a cutover).
pub(super) const REFRESH_MS: u64 = 100;

/// Keeps the live catalog on the catalog's state while clients are connected.
pub(super) struct Refresher {
    pub(super) lakehouse: Lakehouse,
    pub(super) live: Arc<LiveCatalog>,
    /// The state `live` holds.
    pub(super) seen: tokio::sync::Mutex<Option<CatalogState>>,
    /// Connections open now.
    pub(super) clients: std::sync::atomic::AtomicUsize,
}

impl Refresher {
    pub(super) async fn refresh(&self) {
        let mut seen = self.seen.lock().await;
        *seen = refresh_once(&self.lakehouse, &self.live, seen.take()).await;
    }
}

/// The session every connection's own is made from: the live catalog as `kappa` (the default,
/// with the unqualified names in `public`), information_schema and pg_catalog.
pub(super) fn session(live: Arc<LiveCatalog>) -> anyhow::Result<SessionContext> {
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
pub(super) const INFORMATION_SCHEMA: &str = "information_schema";

/// Every [`REFRESH_MS`] while clients are connected, brings the live catalog up to date:
/// rebuilt (every table pinned in one read) when the SQL catalog's rows changed.
pub(super) async fn refresh(
    refresher: Arc<Refresher>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
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

pub(super) type CatalogState = Vec<(String, String, String)>;

/// Puts the catalog's current state in `live` if it differs from `seen`; returns the state
/// `live` holds.
pub(super) async fn refresh_once(
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
pub(super) struct LiveCatalog {
    pub(super) current: Arc<RwLock<Option<Arc<dyn CatalogProvider>>>>,
    pub(super) extra: Arc<RwLock<BTreeMap<String, Arc<dyn SchemaProvider>>>>,
}

impl LiveCatalog {
    pub(super) fn set(&self, catalog: Arc<dyn CatalogProvider>) {
        if let Ok(mut current) = self.current.write() {
            *current = Some(catalog);
        }
    }

    /// A connection's own: `self`'s state now, and the same pg_catalog.
    pub(super) fn pinned(&self) -> LiveCatalog {
        LiveCatalog {
            current: Arc::new(RwLock::new(self.current())),
            extra: self.extra.clone(),
        }
    }

    /// Takes `endpoint`'s state (as a query starts).
    pub(super) fn pin(&self, endpoint: &LiveCatalog) {
        if let Some(catalog) = endpoint.current() {
            self.set(catalog);
        }
    }

    pub(super) fn current(&self) -> Option<Arc<dyn CatalogProvider>> {
        current(&self.current)
    }
}

pub(super) fn current(
    cell: &RwLock<Option<Arc<dyn CatalogProvider>>>,
) -> Option<Arc<dyn CatalogProvider>> {
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

pub(super) fn read_only() -> datafusion::error::DataFusionError {
    datafusion::error::DataFusionError::NotImplemented(
        "the tables are kappa's: models write them, clients only read (read-only endpoint)".into(),
    )
}

/// One schema (a layer, or the unqualified names) of the live catalog, read-only. Its tables
/// are found again when a query runs (`LiveTable`), not when it was planned: a statement a
/// driver prepared once keeps reading the newest published state.
#[derive(Debug)]
pub(super) struct LiveSchema {
    pub(super) catalog: Arc<RwLock<Option<Arc<dyn CatalogProvider>>>>,
    pub(super) name: String,
}

impl LiveSchema {
    pub(super) fn schema(&self) -> Option<Arc<dyn SchemaProvider>> {
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
pub(super) struct LiveTable {
    pub(super) catalog: Arc<RwLock<Option<Arc<dyn CatalogProvider>>>>,
    pub(super) schema: String,
    pub(super) name: String,
    pub(super) planned: Arc<dyn datafusion::catalog::TableProvider>,
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

/// Postgres' message when a prepared statement's tables changed their columns.
pub(super) const CHANGED_RESULT_TYPE: &str = "cached plan must not change result type";
