//! Write-Audit-Publish: a staged table's commits go to its `audit` branch; readers (every
//! session, pyiceberg, DuckDB) read `main`, which moves only when the audit passes
//! ([`Lakehouse::publish_audited`], a fast-forward) or someone publishes anyway; [`Lakehouse::discard`]
//! drops what the branch holds beyond main.
//!
//! ```text
//!  main  ──●───────────────●   ← publish: main := audit head, the branch is dropped
//!           \\             /
//!  audit     ●──●──●──────●      writer commits here (its offsets and state are the head's)
//! ```
//!
//! The branch exists exactly while commits wait for publication; its head is the writer's
//! position, so a writer restarting (after kill -9) carries on from it, and the decision about
//! it is taken again.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use datafusion::catalog::{MemorySchemaProvider, SchemaProvider};
use datafusion::prelude::SessionContext;
use iceberg::TableIdent;
use iceberg::TableRequirement;
use iceberg::spec::{
    MAIN_BRANCH, Operation, SnapshotRef, SnapshotReference, SnapshotRetention, TableMetadataBuilder,
};
use iceberg::table::Table;

use crate::{CATALOG_NAME, Context, Lakehouse, Result, UNQUALIFIED_SCHEMA};

/// The branch a staged table's commits wait on.
pub const AUDIT_BRANCH: &str = "audit";

/// The head of `branch` of `table`; the audit branch starts from main's head.
pub fn branch_head<'t>(table: &'t Table, branch: &str) -> Option<&'t SnapshotRef> {
    let metadata = table.metadata();
    if branch == AUDIT_BRANCH
        && let Some(head) = metadata.snapshot_for_ref(AUDIT_BRANCH)
    {
        return Some(head);
    }
    metadata.current_snapshot()
}

/// The newest snapshot of `table`, published or not: what its writer carries on from.
pub fn head(table: &Table) -> Option<&SnapshotRef> {
    branch_head(table, AUDIT_BRANCH)
}

/// The snapshot waiting for publication, if any.
pub fn unpublished(table: &Table) -> Option<&SnapshotRef> {
    table.metadata().snapshot_for_ref(AUDIT_BRANCH)
}

impl Lakehouse {
    /// From now on, commits to `ident` (by any clone of this lakehouse) go to its audit branch.
    pub fn stage(&self, ident: &TableIdent) {
        if let Ok(mut staged) = self.staged.lock() {
            staged.insert(ident.clone());
        }
    }

    /// Commits to `ident` go to main again.
    pub fn unstage(&self, ident: &TableIdent) {
        if let Ok(mut staged) = self.staged.lock() {
            staged.remove(ident);
        }
    }

    /// Says that `ident`'s writer stopped until someone decides (a quarantined commit), and
    /// why: writers of what is computed from it wait ([`Lakehouse::blocked`]).
    pub fn block(&self, ident: &TableIdent, reason: &str) {
        if let Ok(mut blocked) = self.blocked.lock() {
            blocked.insert(ident.clone(), reason.to_owned());
        }
    }

    /// `ident`'s writer runs again.
    pub fn unblock(&self, ident: &TableIdent) {
        if let Ok(mut blocked) = self.blocked.lock() {
            blocked.remove(ident);
        }
    }

    /// Why `ident`'s writer stopped, if it did ([`Lakehouse::block`]).
    pub fn blocked(&self, ident: &TableIdent) -> Option<String> {
        self.blocked.lock().ok()?.get(ident).cloned()
    }

    /// The branch commits to `ident` go to.
    pub fn branch_for(&self, ident: &TableIdent) -> &'static str {
        let staged = self
            .staged
            .lock()
            .map(|s| s.contains(ident))
            .unwrap_or(false);
        if staged { AUDIT_BRANCH } else { MAIN_BRANCH }
    }

    /// Fast-forwards main to the audit branch's head and drops the branch, in one step; the
    /// table as it was when there is nothing to publish. Fails with a conflict if either
    /// branch moved since `table` was loaded.
    pub async fn publish_audited(&self, table: &Table) -> Result<Table> {
        let ident = table.identifier().clone();
        let Some(audited) = unpublished(table).map(|s| s.snapshot_id()) else {
            return Ok(table.clone());
        };
        let metadata = table.metadata();
        let location = table
            .metadata_location_result()
            .doing(|| format!("locate the metadata of {ident}"))?
            .to_owned();
        let updated = TableMetadataBuilder::new_from_metadata(metadata.clone(), Some(location))
            .set_ref(
                MAIN_BRANCH,
                SnapshotReference::new(audited, SnapshotRetention::branch(None, None, None)),
            )
            .map(|b| b.remove_ref(AUDIT_BRANCH))
            .and_then(TableMetadataBuilder::build)
            .doing(|| format!("build the published metadata of {ident}"))?;
        let requirements = vec![
            TableRequirement::RefSnapshotIdMatch {
                r#ref: MAIN_BRANCH.to_owned(),
                snapshot_id: metadata.current_snapshot_id(),
            },
            TableRequirement::RefSnapshotIdMatch {
                r#ref: AUDIT_BRANCH.to_owned(),
                snapshot_id: Some(audited),
            },
        ];
        self.commit_metadata(table, updated, requirements).await?;
        self.load_table(&ident).await
    }

    /// Drops what the audit branch holds beyond main: main gets one snapshot with its own
    /// data and summary, except the keys of `position` taken from the branch's head (the
    /// writer's offsets: what was discarded is not read again), without the keys of `forget`
    /// (what only the commit it copies did), and the branch goes, in one step. The table as
    /// it was when there is nothing to discard.
    pub async fn discard(
        &self,
        table: &Table,
        position: &[&str],
        forget: &[&str],
    ) -> Result<Table> {
        let Some(audited) = unpublished(table) else {
            return Ok(table.clone());
        };
        let mut properties: HashMap<String, String> = table
            .metadata()
            .current_snapshot()
            .map(|s| s.summary().additional_properties.clone())
            .unwrap_or_default();
        // The totals are the commit's own business.
        for key in [
            "added-data-files",
            "added-records",
            "deleted-data-files",
            "deleted-records",
            "total-data-files",
            "total-records",
            "added-files-size",
            "removed-files-size",
            "total-files-size",
        ] {
            properties.remove(key);
        }
        for key in forget {
            properties.remove(*key);
        }
        for key in position {
            match audited.summary().additional_properties.get(*key) {
                Some(value) => properties.insert((*key).to_owned(), value.clone()),
                None => properties.remove(*key),
            };
        }
        self.commit_files(
            table,
            &BTreeSet::new(),
            Vec::new(),
            properties,
            Operation::Append,
            Some(()),
        )
        .await
    }

    /// A session like [`Lakehouse::session`] in which `layer.name` (and `name` alone, if it is
    /// reachable so) reads `table` at snapshot `at`, by default its newest (the unpublished
    /// head): what an audit checks.
    pub async fn audit_session(
        &self,
        layer: &str,
        name: &str,
        table: &Table,
        at: Option<i64>,
    ) -> Result<SessionContext> {
        let ctx = self.session().await?;
        let Some(audited) = at.or_else(|| head(table).map(|s| s.snapshot_id())) else {
            return Ok(ctx);
        };
        let provider: Arc<dyn datafusion::catalog::TableProvider> = Arc::new(
            iceberg_datafusion::IcebergStaticTableProvider::try_new_from_table_snapshot(
                table.clone(),
                audited,
            )
            .await
            .doing(|| format!("read {} at snapshot {audited}", table.identifier()))?,
        );
        if let Some(catalog) = ctx.catalog(CATALOG_NAME) {
            // The layer's tables in a schema of our own (a catalog's schema may not take
            // tables), the audited one in place of its published state.
            let schema = MemorySchemaProvider::new();
            if let Some(existing) = catalog.schema(layer) {
                for other in existing.table_names() {
                    if other != name
                        && let Ok(Some(table)) = existing.table(&other).await
                    {
                        let _ = schema.register_table(other, table);
                    }
                }
            }
            let _ = schema.register_table(name.to_owned(), provider.clone());
            catalog
                .register_schema(layer, Arc::new(schema))
                .map_err(|e| {
                    crate::LakehouseError::Query(format!(
                        "register the audited {layer}.{name}: {e}"
                    ))
                })?;
            if let Some(unqualified) = catalog.schema(UNQUALIFIED_SCHEMA)
                && unqualified.table_exist(name)
            {
                // Built by the session as a memory schema, which takes tables.
                let _ = unqualified.deregister_table(name);
                let _ = unqualified.register_table(name.to_owned(), provider);
            }
        }
        Ok(ctx)
    }
}
