//! A model over a table that is upserted in place (a GROUP BY model's): its SQL run as a batch
//! query over the upstream's published rows, whole, each time the upstream publishes a commit,
//! and the model's table replaced by the result in one commit. Any SQL runs this way — a
//! re-aggregation, a filter, a ranking — and the table always equals the model's SQL over what
//! its upstream published (never over rows an audit holds back). It costs one read of the
//! upstream's table per upstream commit, so it suits what upserted tables hold: one row per
//! group.
//!
//! ```text
//!   upstream's table on main ──whole, on each new snapshot──► slot ──► SQL ──► overwrite ──► table
//!        (upstream::SnapshotSource)                                        kappa.offsets =
//!                                                                          {"table:<upstream>": {0: seq}}
//! ```

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::datasource::MemTable;
use datafusion::error::Result;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use kappa_lakehouse::{Lakehouse, Table};

use crate::operator::Operator;
use crate::stateless::{storable_schema, to_storable};

/// The model's SQL over its upstream's rows, and the files of its table's current rows.
pub struct Refresh {
    ctx: SessionContext,
    slot: Arc<MemTable>,
    plan: LogicalPlan,
    output_schema: SchemaRef,
    /// The result of the last push, to replace the table's rows with.
    result: Option<Vec<RecordBatch>>,
    /// The data files of the table's newest snapshot: what the next commit removes.
    files: BTreeSet<String>,
    /// The files the commit in flight adds.
    pending: BTreeSet<String>,
}

impl std::fmt::Debug for Refresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresh")
            .field("files", &self.files.len())
            .finish_non_exhaustive()
    }
}

impl Refresh {
    /// The model planned as `plan` over `slot` (the upstream's name) in `ctx`.
    pub fn new(ctx: SessionContext, slot: Arc<MemTable>, plan: LogicalPlan) -> Refresh {
        let output_schema = storable_schema(plan.schema().as_arrow());
        Refresh {
            ctx,
            slot,
            plan,
            output_schema,
            result: None,
            files: BTreeSet::new(),
            pending: BTreeSet::new(),
        }
    }
}

#[async_trait]
impl Operator for Refresh {
    fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// Far behind, only the last of many upstream commits matters.
    fn rewrites_on_commit(&self) -> bool {
        true
    }

    /// `batch`: every row the upstream's table holds.
    async fn push(&mut self, batch: RecordBatch, _watermark: Option<i64>) -> Result<()> {
        *self.slot.batches[0].write().await = vec![batch];
        let frame = datafusion::prelude::DataFrame::new(self.ctx.state(), self.plan.clone());
        let batches = frame.collect().await;
        self.slot.batches[0].write().await.clear();
        let rows = batches?
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| to_storable(b, &self.output_schema))
            .collect::<Result<Vec<_>>>()?;
        self.result = Some(rows);
        Ok(())
    }

    fn has_changes(&self) -> bool {
        self.result.is_some()
    }

    async fn commit(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        properties: HashMap<String, String>,
    ) -> kappa_lakehouse::Result<Table> {
        let Some(rows) = &self.result else {
            // Nothing computed: positions to record.
            return lakehouse.append_files(table, Vec::new(), properties).await;
        };
        let files = lakehouse.write_data_files(table, rows, "").await?;
        self.pending = files.iter().map(|f| f.file_path().to_owned()).collect();
        let committed = lakehouse
            .overwrite(table, &self.files, files, properties)
            .await?;
        self.landed();
        Ok(committed)
    }

    fn landed(&mut self) {
        if self.result.take().is_some() {
            self.files = std::mem::take(&mut self.pending);
        }
    }

    async fn restore(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
    ) -> kappa_lakehouse::Result<()> {
        self.result = None;
        self.pending.clear();
        self.files = match kappa_lakehouse::wap::head(table) {
            Some(head) => lakehouse
                .added_in(table, head, 0)
                .await?
                .files
                .iter()
                .map(|f| f.file.file_path().to_owned())
                .collect(),
            None => BTreeSet::new(),
        };
        Ok(())
    }
}
