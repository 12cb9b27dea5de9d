//! The operators a runner drives, behind two traits:
//! - an [`Operator`] turns the rows of a micro-batch into what its model's table holds and
//!   commits it: row by row ([`RowByRow`]), a GROUP BY ([`GroupedModel`]), a window
//!   ([`WindowedModel`]) or a slowly changing dimension ([`ScdModel`]);
//! - a [`Stage`] comes before it and decides which rows go on, keeping state it checkpoints
//!   with each commit: a dedup ([`Dedup`]) or a join of two streams ([`StreamJoin`]).
//!
//! The runner knows nothing of the shapes: it pushes, asks whether there is anything to
//! commit, commits, and restores after a failure.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use kappa_lakehouse::{Lakehouse, LakehouseError, Table};

use crate::dedup::Dedup;
use crate::grouped::GroupedModel;
use crate::plan::{EventTime, Shape};
use crate::scd::ScdModel;
use crate::stateless::StatelessModel;
use crate::stream_join::StreamJoin;
use crate::windowed::WindowedModel;

/// What a model's table holds, computed micro-batch by micro-batch.
#[async_trait]
pub trait Operator: Send + std::fmt::Debug {
    /// The schema of the rows it writes.
    fn output_schema(&self) -> &SchemaRef;

    /// Whether it needs event time (a watermark) at its source.
    fn uses_event_time(&self) -> bool {
        false
    }

    /// Whether each commit rewrites what changed in place (its state is its rows), so that far
    /// behind it commits once per many records rather than once per read.
    fn rewrites_on_commit(&self) -> bool {
        false
    }

    /// The rows its next commit appends, for the runner to check row by row (row-by-row
    /// operators only).
    fn rows_to_append(&mut self) -> Option<&mut Vec<RecordBatch>> {
        None
    }

    /// Computes one micro-batch of records that are not late; `watermark`: the source's, after
    /// the batch.
    async fn push(&mut self, batch: RecordBatch, watermark: Option<i64>) -> Result<()>;

    /// Whether anything was computed since the last commit.
    fn has_changes(&self) -> bool;

    /// Commits what was computed since the last commit, with `properties`.
    async fn commit(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        properties: HashMap<String, String>,
    ) -> kappa_lakehouse::Result<Table>;

    /// The last commit, reported as failed, landed after all.
    fn landed(&mut self);

    /// Forgets everything not committed and takes the state `table`'s newest snapshot names.
    async fn restore(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
    ) -> kappa_lakehouse::Result<()>;
}

/// A stage before the operator, with state of its own recorded in each commit.
#[async_trait]
pub trait Stage: Send + std::fmt::Debug {
    /// Pushes one batch per source (with each source's watermark after it) and returns the
    /// rows that go on, with the watermark they carry.
    async fn push(
        &mut self,
        batches: Vec<RecordBatch>,
        watermarks: &[Option<i64>],
    ) -> Result<(RecordBatch, Option<i64>)>;

    /// Whether its state changed since the last commit.
    fn has_changes(&self) -> bool;

    /// Writes what it must remember to state files: the snapshot property naming them.
    async fn checkpoint(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
    ) -> std::result::Result<(String, String), LakehouseError>;

    /// The commit carrying the last checkpoint landed.
    fn landed(&mut self);

    /// Takes the state the snapshot whose summary is `properties` names.
    async fn restore(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        properties: Option<&HashMap<String, String>>,
    ) -> std::result::Result<(), LakehouseError>;
}

/// The operator of a planned model of `shape` reading `input_slot`.
pub fn for_shape(
    shape: Shape,
    ctx: SessionContext,
    input_slot: Arc<MemTable>,
    plan: LogicalPlan,
    event_time: Option<EventTime>,
) -> Result<Box<dyn Operator>> {
    Ok(match shape {
        Shape::RowByRow => {
            let model = StatelessModel::from_plan(ctx, input_slot, plan)?;
            let rows = Appended::new(model.output_schema().clone());
            Box::new(RowByRow { model, rows })
        }
        Shape::Grouped => Box::new(GroupedModel::from_plan(ctx, input_slot, plan)?),
        Shape::Windowed => {
            let event_time = event_time.ok_or_else(|| {
                DataFusionError::Internal("a windowed model without event time".into())
            })?;
            let model = WindowedModel::from_plan(ctx, input_slot, plan, &event_time.column)?
                .ok_or_else(|| {
                    DataFusionError::Internal("a windowed model without a window".into())
                })?;
            Box::new(model)
        }
    })
}

/// Row by row: each micro-batch's rows are appended.
#[derive(Debug)]
pub struct RowByRow {
    pub model: StatelessModel,
    /// The rows of the next commit.
    rows: Appended,
}

/// The newest snapshot's summary of `table`.
fn head_properties(table: &Table) -> Option<HashMap<String, String>> {
    kappa_lakehouse::wap::head(table).map(|s| s.summary().additional_properties.clone())
}

#[async_trait]
impl Operator for RowByRow {
    fn output_schema(&self) -> &SchemaRef {
        self.model.output_schema()
    }

    fn rows_to_append(&mut self) -> Option<&mut Vec<RecordBatch>> {
        Some(&mut self.rows.pending)
    }

    async fn push(&mut self, batch: RecordBatch, _watermark: Option<i64>) -> Result<()> {
        self.rows.pending.extend(self.model.run(batch).await?);
        Ok(())
    }

    fn has_changes(&self) -> bool {
        self.rows.has_changes()
    }

    async fn commit(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        properties: HashMap<String, String>,
    ) -> kappa_lakehouse::Result<Table> {
        self.rows.commit(lakehouse, table, properties).await
    }

    fn landed(&mut self) {
        self.rows.landed();
    }

    async fn restore(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
    ) -> kappa_lakehouse::Result<()> {
        self.rows.restore(lakehouse, table).await
    }
}

/// The rows its source gives, appended as they come, computed by nothing: a bronze table's
/// copy of a topic.
#[derive(Debug)]
pub struct Appended {
    schema: SchemaRef,
    pending: Vec<RecordBatch>,
}

impl Appended {
    pub fn new(schema: SchemaRef) -> Appended {
        Appended {
            schema,
            pending: Vec::new(),
        }
    }
}

#[async_trait]
impl Operator for Appended {
    fn output_schema(&self) -> &SchemaRef {
        &self.schema
    }

    async fn push(&mut self, batch: RecordBatch, _watermark: Option<i64>) -> Result<()> {
        if batch.num_rows() > 0 {
            self.pending.push(batch);
        }
        Ok(())
    }

    fn has_changes(&self) -> bool {
        !self.pending.is_empty()
    }

    async fn commit(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        properties: HashMap<String, String>,
    ) -> kappa_lakehouse::Result<Table> {
        let table = if self.pending.is_empty() {
            // Nothing to add, but offsets or state to record.
            lakehouse
                .append_files(table, Vec::new(), properties)
                .await?
        } else {
            lakehouse.append(table, &self.pending, properties).await?
        };
        self.pending.clear();
        Ok(table)
    }

    fn landed(&mut self) {
        self.pending.clear();
    }

    async fn restore(
        &mut self,
        _lakehouse: &Lakehouse,
        _table: &Table,
    ) -> kappa_lakehouse::Result<()> {
        self.pending.clear();
        Ok(())
    }
}

/// The [`Operator`] of a model that keeps its own state in the table it commits (its
/// inherent `push`, `has_changes`, `commit`, `landed` and `restore`); `push` adapts its own.
macro_rules! stateful_operator {
    ($model:ty, rewrites: $rewrites:expr, event_time: $event_time:expr,
     push($this:ident, $batch:ident, $watermark:ident) => $push:expr) => {
        #[async_trait]
        impl Operator for $model {
            fn output_schema(&self) -> &SchemaRef {
                <$model>::output_schema(self)
            }

            fn uses_event_time(&self) -> bool {
                $event_time
            }

            fn rewrites_on_commit(&self) -> bool {
                $rewrites
            }

            async fn push(&mut self, $batch: RecordBatch, $watermark: Option<i64>) -> Result<()> {
                let $this = self;
                $push.await
            }

            fn has_changes(&self) -> bool {
                <$model>::has_changes(self)
            }

            async fn commit(
                &mut self,
                lakehouse: &Lakehouse,
                table: &Table,
                properties: HashMap<String, String>,
            ) -> kappa_lakehouse::Result<Table> {
                <$model>::commit(self, lakehouse, table, properties).await
            }

            fn landed(&mut self) {
                <$model>::landed(self);
            }

            async fn restore(
                &mut self,
                lakehouse: &Lakehouse,
                table: &Table,
            ) -> kappa_lakehouse::Result<()> {
                <$model>::restore(self, lakehouse, table, head_properties(table).as_ref()).await
            }
        }
    };
}

stateful_operator!(GroupedModel, rewrites: true, event_time: false,
    push(model, batch, _watermark) => GroupedModel::push(model, batch));
stateful_operator!(WindowedModel, rewrites: false, event_time: true,
    push(model, batch, watermark) => WindowedModel::push(model, batch, watermark));
stateful_operator!(ScdModel, rewrites: true, event_time: false,
    push(model, batch, _watermark) => ScdModel::push(model, batch));

#[async_trait]
impl Stage for Dedup {
    async fn push(
        &mut self,
        mut batches: Vec<RecordBatch>,
        watermarks: &[Option<i64>],
    ) -> Result<(RecordBatch, Option<i64>)> {
        let watermark = watermarks.first().copied().flatten();
        let Some(batch) = batches.pop() else {
            return Err(DataFusionError::Internal("a dedup without a source".into()));
        };
        let rows = Dedup::push(self, batch, watermark).await?;
        let rows = arrow::compute::concat_batches(self.output_schema(), &rows)?;
        Ok((rows, watermark))
    }

    fn has_changes(&self) -> bool {
        Dedup::has_changes(self)
    }

    async fn checkpoint(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
    ) -> std::result::Result<(String, String), LakehouseError> {
        Dedup::checkpoint(self, lakehouse, table).await
    }

    fn landed(&mut self) {
        Dedup::landed(self);
    }

    async fn restore(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        properties: Option<&HashMap<String, String>>,
    ) -> std::result::Result<(), LakehouseError> {
        Dedup::restore(self, lakehouse, table, properties).await
    }
}

#[async_trait]
impl Stage for StreamJoin {
    async fn push(
        &mut self,
        mut batches: Vec<RecordBatch>,
        watermarks: &[Option<i64>],
    ) -> Result<(RecordBatch, Option<i64>)> {
        let (Some(right), Some(left)) = (batches.pop(), batches.pop()) else {
            return Err(DataFusionError::Internal(
                "a join of two streams without two sources".into(),
            ));
        };
        let first = watermarks.first().copied().flatten();
        let second = watermarks.get(1).copied().flatten();
        let rows = StreamJoin::push(self, left, right, first, second).await?;
        // The pairs' watermark: the lesser of the two.
        Ok((rows, first.zip(second).map(|(a, b)| a.min(b))))
    }

    fn has_changes(&self) -> bool {
        StreamJoin::has_changes(self)
    }

    async fn checkpoint(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
    ) -> std::result::Result<(String, String), LakehouseError> {
        StreamJoin::checkpoint(self, lakehouse, table).await
    }

    fn landed(&mut self) {
        StreamJoin::landed(self);
    }

    async fn restore(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        properties: Option<&HashMap<String, String>>,
    ) -> std::result::Result<(), LakehouseError> {
        StreamJoin::restore(self, lakehouse, table, properties).await
    }
}
