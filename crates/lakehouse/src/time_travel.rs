//! Time travel in SQL: `layer."model@SNAPSHOT_ID"` or `layer."model@2026-12-01T10:00:00Z"`
//! reads a table as one of its published snapshots was — by id, or the newest at or before a
//! time (RFC 3339, UTC when no zone is given). Only `main`'s history counts: snapshots waiting
//! on an audit branch, or quarantined, are not reachable. As Delta Lake's `table@v5`; the name
//! is quoted because of the `@`.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::error::{DataFusionError, Result as DfResult};
use iceberg::table::Table;

/// A layer's tables as one catalog state pinned them, plus each at its earlier snapshots.
#[derive(Debug)]
pub(crate) struct TimeTravelSchema {
    pub(crate) layer: String,
    pub(crate) tables: Arc<dyn SchemaProvider>,
    /// The pinned tables, with their snapshot history.
    pub(crate) history: HashMap<String, Table>,
}

#[async_trait::async_trait]
impl SchemaProvider for TimeTravelSchema {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn table_names(&self) -> Vec<String> {
        self.tables.table_names()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        if let Some(table) = self.tables.table(name).await? {
            return Ok(Some(table));
        }
        let Some((base, at)) = name.rsplit_once('@') else {
            return Ok(None);
        };
        let Some(table) = self.history.get(base) else {
            return Ok(None);
        };
        let id = snapshot_at(table, at).map_err(|reason| {
            DataFusionError::Plan(format!("{}.{base}@{at}: {reason}", self.layer))
        })?;
        let provider = iceberg_datafusion::IcebergStaticTableProvider::try_new_from_table_snapshot(
            table.clone(),
            id,
        )
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(Some(Arc::new(provider)))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.tables.table_exist(name)
    }
}

/// The snapshot of `table`'s published history that `at` names: a snapshot id, or a time.
pub(crate) fn snapshot_at(table: &Table, at: &str) -> Result<i64, String> {
    let metadata = table.metadata();
    // main's history, newest first: its snapshot and that one's ancestors.
    let mut history = Vec::new();
    let mut next = metadata.current_snapshot();
    // Bounded by the snapshots there are, should the metadata hold a cycle.
    while let Some(snapshot) = next.filter(|_| history.len() < metadata.snapshots().len()) {
        history.push((snapshot.snapshot_id(), snapshot.timestamp_ms()));
        next = snapshot
            .parent_snapshot_id()
            .and_then(|p| metadata.snapshot_by_id(p));
    }
    let oldest = || {
        history.last().map_or_else(
            || "it has no published snapshot".to_owned(),
            |(id, ms)| {
                format!(
                    "its history goes back to snapshot {id} at {}",
                    humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH
                            + std::time::Duration::from_millis(u64::try_from(*ms).unwrap_or(0))
                    )
                )
            },
        )
    };
    if let Ok(id) = at.parse::<i64>() {
        return if history.iter().any(|(s, _)| *s == id) {
            Ok(id)
        } else {
            Err(format!(
                "no published snapshot {id} ({} published; {})",
                history.len(),
                oldest()
            ))
        };
    }
    let time = humantime::parse_rfc3339_weak(at)
        .or_else(|_| humantime::parse_rfc3339(at))
        .map_err(|_| {
            format!("`{at}` is neither a snapshot id nor a time like 2026-12-01T10:00:00Z")
        })?;
    let ms = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    history
        .iter()
        .find(|(_, at_ms)| *at_ms <= ms)
        .map(|(id, _)| *id)
        .ok_or_else(|| format!("no published snapshot at or before {at}; {}", oldest()))
}
