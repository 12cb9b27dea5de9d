//! Public table names that follow another table: the mechanism of an atomic cutover.
//!
//! ```text
//! iceberg_tables   gold.revenue            ──metadata_location──┐  (the alias: a catalog row
//!                  kappa_versions.gold__revenue__<v2>  ─────────┴─►  pointing at its target's
//!                                                                     current metadata file)
//! kappa_aliases    gold.revenue → kappa_versions.gold__revenue__<v2>
//! ```
//!
//! An alias is an ordinary row of the SQL catalog, so every Iceberg reader (pyiceberg, DuckDB,
//! Spark) loads it as a table: it reads the metadata file of the table it follows. `publish`
//! points a set of aliases at new targets in one SQLite transaction, and every commit to a
//! target moves the aliases that follow it in the transaction that moves the target
//! (`commit::swap_pointer`), so a reader of the catalog sees all the aliases of a cutover
//! before it or all after it, and an alias is never behind its target.

use std::collections::{BTreeMap, HashMap};

use iceberg::{NamespaceIdent, TableIdent};

use crate::commit::Committer;
use crate::{CATALOG_NAME, Context, Lakehouse, LakehouseError, Result};

/// The SQL catalog's table of aliases (created when the catalog is opened).
pub(crate) const ALIASES_DDL: &str = "CREATE TABLE IF NOT EXISTS kappa_aliases (\
     catalog_name VARCHAR(255) NOT NULL, \
     table_namespace VARCHAR(255) NOT NULL, \
     table_name VARCHAR(255) NOT NULL, \
     target_namespace VARCHAR(255) NOT NULL, \
     target_name VARCHAR(255) NOT NULL, \
     PRIMARY KEY (catalog_name, table_namespace, table_name))";

impl Lakehouse {
    /// Points every alias of `switches` (alias, target) at its target, in one transaction: a
    /// reader of the catalog sees them all before or all after. An alias name held by a plain
    /// table becomes an alias (that table's files stay where they are). From then on, each
    /// commit to a target moves its aliases with it.
    pub async fn publish(&self, switches: &[(TableIdent, TableIdent)]) -> Result<()> {
        let Committer::Sql(pool) = &self.commits else {
            return Err(LakehouseError::Unsupported(
                "switching several tables at once needs the SQL catalog; an Iceberg REST \
                 catalog has no multi-table commit kappa can use yet"
                    .into(),
            ));
        };
        for (alias, _) in switches {
            self.ensure_namespace(alias.namespace()).await?;
        }
        let described: Vec<String> = switches
            .iter()
            .map(|(alias, target)| format!("{alias} → {target}"))
            .collect();
        let failed = |e: sqlx::Error| {
            LakehouseError::Catalog(format!("publish {}: {e}", described.join(", ")))
        };
        // IMMEDIATE takes the write lock first, waiting out another writer (the busy
        // timeout); a deferred transaction that read first could not upgrade and would fail
        // with "database is locked" at once.
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(failed)?;
        for (alias, target) in switches {
            let location: Option<(Option<String>,)> = sqlx::query_as(
                "SELECT metadata_location FROM iceberg_tables \
                 WHERE catalog_name = ? AND table_namespace = ? AND table_name = ?",
            )
            .bind(CATALOG_NAME)
            .bind(target.namespace().join("."))
            .bind(target.name())
            .fetch_optional(&mut *tx)
            .await
            .map_err(failed)?;
            let Some((Some(location),)) = location else {
                return Err(LakehouseError::Catalog(format!(
                    "publish {alias} → {target}: no table {target}"
                )));
            };
            sqlx::query(
                "INSERT INTO iceberg_tables (catalog_name, table_namespace, table_name, \
                 metadata_location, previous_metadata_location, iceberg_type) \
                 VALUES (?, ?, ?, ?, NULL, 'TABLE') \
                 ON CONFLICT (catalog_name, table_namespace, table_name) DO UPDATE SET \
                 previous_metadata_location = metadata_location, \
                 metadata_location = excluded.metadata_location",
            )
            .bind(CATALOG_NAME)
            .bind(alias.namespace().join("."))
            .bind(alias.name())
            .bind(&location)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
            sqlx::query(
                "INSERT INTO kappa_aliases (catalog_name, table_namespace, table_name, \
                 target_namespace, target_name) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT (catalog_name, table_namespace, table_name) DO UPDATE SET \
                 target_namespace = excluded.target_namespace, \
                 target_name = excluded.target_name",
            )
            .bind(CATALOG_NAME)
            .bind(alias.namespace().join("."))
            .bind(alias.name())
            .bind(target.namespace().join("."))
            .bind(target.name())
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        }
        tx.commit().await.map_err(failed)
    }

    /// Whether public names can follow other tables here (the SQL catalog; not a REST one).
    pub fn supports_aliases(&self) -> bool {
        matches!(self.commits, Committer::Sql(_))
    }

    /// Every alias and the table it follows.
    pub async fn aliases(&self) -> Result<BTreeMap<TableIdent, TableIdent>> {
        let Committer::Sql(pool) = &self.commits else {
            return Ok(BTreeMap::new());
        };
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT table_namespace, table_name, target_namespace, target_name \
             FROM kappa_aliases WHERE catalog_name = ?",
        )
        .bind(CATALOG_NAME)
        .fetch_all(pool)
        .await
        .map_err(|e| LakehouseError::Catalog(format!("read the aliases: {e}")))?;
        rows.into_iter()
            .map(|(ns, name, target_ns, target)| {
                Ok((ident(&ns, name)?, ident(&target_ns, target)?))
            })
            .collect()
    }

    /// Creates `namespace` unless it exists.
    pub(crate) async fn ensure_namespace(&self, namespace: &NamespaceIdent) -> Result<()> {
        let exists = self
            .catalog
            .namespace_exists(namespace)
            .await
            .doing(|| format!("look up namespace {namespace:?}"))?;
        if exists {
            return Ok(());
        }
        // Another model may create it at the same moment: that is success too. The SQL
        // catalog reports that race as a unique-constraint failure, not as "already exists",
        // so any failure is followed by a second look.
        match self
            .catalog
            .create_namespace(namespace, HashMap::new())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == iceberg::ErrorKind::NamespaceAlreadyExists => Ok(()),
            Err(e) => match self.catalog.namespace_exists(namespace).await {
                Ok(true) => Ok(()),
                _ => Err(e).doing(|| format!("create namespace {namespace:?}")),
            },
        }
    }
}

/// A table identifier from the catalog's columns (a dotted namespace).
pub(crate) fn ident(namespace: &str, name: String) -> Result<TableIdent> {
    let namespace = NamespaceIdent::from_vec(namespace.split('.').map(str::to_owned).collect())
        .map_err(|e| LakehouseError::Catalog(format!("namespace `{namespace}`: {e}")))?;
    Ok(TableIdent::new(namespace, name))
}
