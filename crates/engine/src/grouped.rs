//! GROUP BY models, computed incrementally: each micro-batch updates per-group accumulators, and
//! each commit rewrites only the part of the table whose groups changed.
//!
//! ```text
//!  micro-batch ─► input plan (row by row) ─► group keys ─► bucket = hash(key) % B
//!                                                         └► accumulators of that bucket
//!  commit: for each changed bucket ─► evaluate its groups ─► upper plan (HAVING, projection)
//!          ─► new data file + new state file; the bucket's old files leave the table
//!          (one copy-on-write Iceberg snapshot; `kappa.buckets` names every bucket's files)
//! ```
//!
//! The accumulators are DataFusion's own (`GroupsAccumulator`), so a group's value is computed
//! exactly as a batch query computes it. Their intermediate state — the same arrays DataFusion
//! exchanges between partial and final aggregation — is what the state files hold.
//!
//! State is bounded by the number of distinct groups (plus, for `count(DISTINCT x)`, the
//! distinct values per group). Nothing expires: a GROUP BY without a time window keeps every
//! group it has seen, as its table does.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, RecordBatch, UInt32Array};
use arrow::compute::take;
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use arrow::row::{RowConverter, Rows, SortField};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchema};
use datafusion::datasource::{MemTable, provider_as_source};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{
    Aggregate, EmitTo, Expr, GroupsAccumulator, LogicalPlan, LogicalPlanBuilder,
};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::{GroupsAccumulatorAdapter, PhysicalExpr, create_physical_expr};
use datafusion::physical_planner::create_aggregate_expr_and_maybe_filter;
use datafusion::prelude::{DataFrame, SessionContext};
use kappa_lakehouse::{Lakehouse, Table};
use serde::{Deserialize, Serialize};

use crate::stateless::{stateless_shape, storable_schema, to_storable};

/// How many buckets a grouped table is split into: a commit rewrites the buckets whose groups
/// changed, so a live update touching a few groups rewrites a few small files.
pub const GROUP_BUCKETS: usize = 16;
/// Snapshot property: every bucket's data files and state file.
pub const BUCKETS_PROPERTY: &str = "kappa.buckets";

/// Aggregate functions whose intermediate state merges exactly, so that incremental results
/// equal a batch query's.
const MERGEABLE: &[&str] = &[
    "count", "sum", "min", "max", "avg", "mean", "bool_and", "bool_or",
];

/// [`grouped_shape`]'s reason for a plan without any aggregation.
pub const NO_GROUP_BY: &str = "the query has no GROUP BY";

/// The files of one bucket in the table's current snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketFiles {
    /// Data files holding the bucket's rows (none when every group is filtered out).
    pub data: Vec<String>,
    /// The state file the bucket's accumulators were saved to.
    pub state: String,
}

/// The `kappa.buckets` property: bucket number → its files.
pub type BucketMap = BTreeMap<usize, BucketFiles>;

struct Aggregator {
    expr: Arc<AggregateFunctionExpr>,
    filter: Option<Arc<dyn PhysicalExpr>>,
}

impl Aggregator {
    fn accumulator(&self) -> Result<Box<dyn GroupsAccumulator>> {
        if self.expr.groups_accumulator_supported() {
            self.expr.create_groups_accumulator()
        } else {
            let expr = self.expr.clone();
            Ok(Box::new(GroupsAccumulatorAdapter::new(move || {
                expr.create_accumulator()
            })))
        }
    }
}

struct Bucket {
    index: HashMap<Box<[u8]>, usize>,
    keys: Rows,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    dirty: bool,
}

impl Bucket {
    fn len(&self) -> usize {
        self.keys.num_rows()
    }
}

/// One GROUP BY model's incremental computation and state.
pub struct GroupedModel {
    ctx: SessionContext,
    input_slot: Arc<MemTable>,
    input_plan: LogicalPlan,
    /// No GROUP BY: one group, keyed by a constant.
    global: bool,
    group_exprs: Vec<Arc<dyn PhysicalExpr>>,
    aggregators: Vec<Aggregator>,
    aggregate_slot: Arc<MemTable>,
    aggregate_schema: SchemaRef,
    upper_plan: LogicalPlan,
    output_schema: SchemaRef,
    state_schema: SchemaRef,
    converter: RowConverter,
    key_count: usize,
    buckets: Vec<Bucket>,
    committed: BucketMap,
    /// Files written for a commit whose outcome is not known yet.
    pending: BucketMap,
}

impl std::fmt::Debug for GroupedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupedModel")
            .field("output_schema", &self.output_schema)
            .field(
                "groups",
                &self.buckets.iter().map(Bucket::len).sum::<usize>(),
            )
            .finish_non_exhaustive()
    }
}

/// Splits a plan at its one Aggregate: the part above must be row by row (projection, HAVING
/// filter, aliases), the part below too. Returns the Aggregate, or why the plan is not that.
pub fn grouped_shape(plan: &LogicalPlan) -> std::result::Result<&Aggregate, String> {
    let has_aggregate = plan
        .exists(|n| Ok(matches!(n, LogicalPlan::Aggregate(_))))
        .unwrap_or(false);
    if !has_aggregate {
        return Err(NO_GROUP_BY.to_owned());
    }
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Projection(p) => node = &p.input,
            LogicalPlan::Filter(f) => node = &f.input,
            LogicalPlan::SubqueryAlias(a) => node = &a.input,
            LogicalPlan::Aggregate(aggregate) => {
                if let Err(e) = stateless_shape(&aggregate.input) {
                    return Err(match grouping_view(&aggregate.input) {
                        Some(view) => format!(
                            "reads {view}, whose rows are groups that change; a GROUP BY over \
                             another model's groups is not incremental yet — group the rows \
                             {view} reads instead"
                        ),
                        None => format!("below the GROUP BY: {e}"),
                    });
                }
                for e in &aggregate.group_expr {
                    if matches!(e, Expr::GroupingSet(_)) {
                        return Err("GROUPING SETS, CUBE and ROLLUP are not incremental; \
                                    write one model per grouping"
                            .into());
                    }
                }
                for e in &aggregate.aggr_expr {
                    let mut inner = e;
                    while let Expr::Alias(a) = inner {
                        inner = &a.expr;
                    }
                    let Expr::AggregateFunction(f) = inner else {
                        return Err(format!("`{e}` is not an aggregate function"));
                    };
                    let name = f.func.name().to_lowercase();
                    if !MERGEABLE.contains(&name.as_str()) {
                        return Err(format!(
                            "aggregate `{name}` is not incremental; supported: {}",
                            MERGEABLE.join(", ")
                        ));
                    }
                    if !f.params.order_by.is_empty() {
                        return Err(format!("`{name}(… ORDER BY …)` is not incremental"));
                    }
                    if f.params.distinct && name != "count" {
                        return Err(format!(
                            "`{name}(DISTINCT …)` is not incremental; count(DISTINCT …) is"
                        ));
                    }
                }
                return Ok(aggregate);
            }
            other => {
                let step = other.display().to_string();
                let step = step.split(':').next().unwrap_or("this step");
                return Err(format!(
                    "{step} above a GROUP BY is not incremental; only projections and \
                     HAVING filters may follow it"
                ));
            }
        }
    }
}

impl GroupedModel {
    /// Plans `sql` (one GROUP BY over the table `input` of `input_schema`).
    pub async fn new(sql: &str, input: &str, input_schema: SchemaRef) -> Result<GroupedModel> {
        let ctx = crate::stateless::session();
        let input_slot = Arc::new(MemTable::try_new(input_schema, vec![vec![]])?);
        ctx.register_table(
            datafusion::sql::TableReference::parse_str(input),
            input_slot.clone(),
        )?;
        let state = ctx.state();
        let plan = state.create_logical_plan(sql).await?;
        let plan = state
            .analyzer()
            .execute_and_check(plan, state.config_options(), |_, _| {})?;
        GroupedModel::from_plan(ctx, input_slot, plan)
    }

    /// A model from its analyzed `plan`, whose input is `input_slot` in `ctx`.
    pub fn from_plan(
        ctx: SessionContext,
        input_slot: Arc<MemTable>,
        plan: LogicalPlan,
    ) -> Result<GroupedModel> {
        let state = ctx.state();
        let aggregate = grouped_shape(&plan)
            .map_err(DataFusionError::NotImplemented)?
            .clone();
        let input_plan = aggregate.input.as_ref().clone();
        let input_df_schema = input_plan.schema().clone();
        let physical_input = input_df_schema.as_arrow();
        let props = state.execution_props();
        let group_exprs = aggregate
            .group_expr
            .iter()
            .map(|e| create_physical_expr(e, &input_df_schema, props))
            .collect::<Result<Vec<_>>>()?;
        let aggregators = aggregate
            .aggr_expr
            .iter()
            .map(|e| {
                let (expr, filter, _) = create_aggregate_expr_and_maybe_filter(
                    e,
                    &input_df_schema,
                    physical_input,
                    props,
                )?;
                Ok(Aggregator { expr, filter })
            })
            .collect::<Result<Vec<_>>>()?;

        // The aggregate's output becomes a table of its own, re-qualified so that the plan
        // above reads it exactly as it read the Aggregate.
        let aggregate_df_schema = aggregate.schema.clone();
        let aggregate_schema = Arc::new(Schema::new(
            aggregate_df_schema
                .fields()
                .iter()
                .enumerate()
                .map(|(i, f)| Field::new(format!("c{i}"), f.data_type().clone(), true))
                .collect::<Vec<_>>(),
        ));
        let aggregate_slot = Arc::new(MemTable::try_new(aggregate_schema.clone(), vec![vec![]])?);
        let replacement = LogicalPlanBuilder::scan(
            "kappa_aggregate",
            provider_as_source(aggregate_slot.clone()),
            None,
        )?
        .project(requalify(&aggregate_df_schema))?
        .build()?;
        let upper_plan = plan
            .transform_up(|node| {
                Ok(if matches!(node, LogicalPlan::Aggregate(_)) {
                    Transformed::yes(replacement.clone())
                } else {
                    Transformed::no(node)
                })
            })?
            .data;
        let output_schema = storable_schema(upper_plan.schema().as_arrow());

        let global = group_exprs.is_empty();
        let key_types: Vec<DataType> = if global {
            vec![DataType::Boolean]
        } else {
            aggregate_df_schema
                .fields()
                .iter()
                .take(group_exprs.len())
                .map(|f| f.data_type().clone())
                .collect()
        };
        let converter = RowConverter::new(key_types.iter().cloned().map(SortField::new).collect())?;
        let mut state_fields: Vec<FieldRef> = key_types
            .iter()
            .enumerate()
            .map(|(i, t)| Arc::new(Field::new(format!("k{i}"), t.clone(), true)))
            .collect();
        for (j, a) in aggregators.iter().enumerate() {
            for (m, f) in a.expr.state_fields()?.iter().enumerate() {
                state_fields.push(Arc::new(
                    f.as_ref()
                        .clone()
                        .with_name(format!("a{j}_{m}"))
                        .with_nullable(true),
                ));
            }
        }
        let state_schema = Arc::new(Schema::new(state_fields));
        let mut model = GroupedModel {
            ctx,
            input_slot,
            input_plan,
            global,
            group_exprs,
            aggregators,
            aggregate_slot,
            aggregate_schema,
            upper_plan,
            output_schema,
            state_schema,
            converter,
            key_count: key_types.len(),
            buckets: Vec::new(),
            committed: BucketMap::new(),
            pending: BucketMap::new(),
        };
        model.buckets = (0..GROUP_BUCKETS)
            .map(|_| model.empty_bucket())
            .collect::<Result<_>>()?;
        Ok(model)
    }

    fn empty_bucket(&self) -> Result<Bucket> {
        Ok(Bucket {
            index: HashMap::new(),
            keys: self.converter.empty_rows(0, 0),
            accumulators: self
                .aggregators
                .iter()
                .map(Aggregator::accumulator)
                .collect::<Result<_>>()?,
            dirty: false,
        })
    }

    /// The schema of the model's table.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// The number of groups held.
    pub fn groups(&self) -> usize {
        self.buckets.iter().map(Bucket::len).sum()
    }

    /// Folds one micro-batch of input into the groups.
    pub async fn push(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        *self.input_slot.batches[0].write().await = vec![batch];
        let frame = DataFrame::new(self.ctx.state(), self.input_plan.clone());
        let batches = frame.collect().await;
        self.input_slot.batches[0].write().await.clear();
        for batch in batches? {
            self.fold(&batch)?;
        }
        Ok(())
    }

    fn fold(&mut self, batch: &RecordBatch) -> Result<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let keys: Vec<ArrayRef> = if self.global {
            vec![Arc::new(BooleanArray::from(vec![true; n]))]
        } else {
            self.group_exprs
                .iter()
                .map(|e| e.evaluate(batch)?.into_array(n))
                .collect::<Result<_>>()?
        };
        let rows = self.converter.convert_columns(&keys)?;
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); GROUP_BUCKETS];
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); GROUP_BUCKETS];
        for (i, row) in rows.iter().enumerate() {
            let b = bucket_of(row.as_ref());
            let bucket = &mut self.buckets[b];
            let group = match bucket.index.get(row.as_ref()) {
                Some(g) => *g,
                None => {
                    let g = bucket.keys.num_rows();
                    bucket.keys.push(row);
                    bucket.index.insert(row.as_ref().into(), g);
                    g
                }
            };
            members[b]
                .push(u32::try_from(i).map_err(|_| {
                    DataFusionError::Execution("a micro-batch over 4G rows".into())
                })?);
            groups[b].push(group);
        }
        let mut arguments = Vec::with_capacity(self.aggregators.len());
        for a in &self.aggregators {
            let values = a
                .expr
                .expressions()
                .iter()
                .map(|e| e.evaluate(batch)?.into_array(n))
                .collect::<Result<Vec<_>>>()?;
            let filter = match &a.filter {
                Some(f) => Some(f.evaluate(batch)?.into_array(n)?),
                None => None,
            };
            arguments.push((values, filter));
        }
        for (b, rows_of_bucket) in members.iter().enumerate() {
            if rows_of_bucket.is_empty() {
                continue;
            }
            let whole = rows_of_bucket.len() == n;
            let indices = UInt32Array::from(rows_of_bucket.clone());
            let bucket = &mut self.buckets[b];
            let total = bucket.len();
            for ((values, filter), accumulator) in
                arguments.iter().zip(bucket.accumulators.iter_mut())
            {
                let values: Vec<ArrayRef> = if whole {
                    values.clone()
                } else {
                    values
                        .iter()
                        .map(|v| take(v, &indices, None))
                        .collect::<std::result::Result<_, _>>()?
                };
                let filter = match filter {
                    Some(f) if whole => Some(f.clone()),
                    Some(f) => Some(take(f, &indices, None)?),
                    None => None,
                };
                let filter = filter
                    .as_ref()
                    .map(|f| {
                        f.as_any()
                            .downcast_ref::<BooleanArray>()
                            .cloned()
                            .ok_or_else(|| {
                                DataFusionError::Internal("a FILTER that is not boolean".into())
                            })
                    })
                    .transpose()?;
                accumulator.update_batch(&values, &groups[b], filter.as_ref(), total)?;
            }
            bucket.dirty = true;
        }
        Ok(())
    }

    /// Whether a commit has something to write.
    pub fn has_changes(&self) -> bool {
        self.buckets.iter().any(|b| b.dirty)
    }

    /// The current state of bucket `b` as one batch of the state schema, with the accumulators
    /// left as they were; and the bucket's evaluated aggregate rows.
    fn snapshot_bucket(&mut self, b: usize) -> Result<(RecordBatch, RecordBatch)> {
        let keys = self.converter.convert_rows(self.buckets[b].keys.iter())?;
        let n = self.buckets[b].len();
        let all: Vec<usize> = (0..n).collect();
        let mut state_columns = keys.clone();
        let mut value_columns = if self.global { Vec::new() } else { keys };
        for j in 0..self.aggregators.len() {
            // `state` hands the accumulator's groups over; two fresh accumulators take them
            // back: one stays, one is evaluated.
            let state = self.buckets[b].accumulators[j].state(EmitTo::All)?;
            let mut kept = self.aggregators[j].accumulator()?;
            kept.merge_batch(&state, &all, None, n)?;
            let mut evaluated = self.aggregators[j].accumulator()?;
            evaluated.merge_batch(&state, &all, None, n)?;
            value_columns.push(evaluated.evaluate(EmitTo::All)?);
            self.buckets[b].accumulators[j] = kept;
            state_columns.extend(state);
        }
        let state = RecordBatch::try_new(self.state_schema.clone(), state_columns)?;
        let values = RecordBatch::try_new(self.aggregate_schema.clone(), value_columns)?;
        Ok((state, values))
    }

    /// Rows of the model's table for one bucket. (`&mut`: the future must be `Send`, and the
    /// accumulators are not `Sync`.)
    async fn output_of(&mut self, values: RecordBatch) -> Result<Vec<RecordBatch>> {
        if values.num_rows() == 0 {
            return Ok(Vec::new());
        }
        *self.aggregate_slot.batches[0].write().await = vec![values];
        let frame = DataFrame::new(self.ctx.state(), self.upper_plan.clone());
        let batches = frame.collect().await;
        self.aggregate_slot.batches[0].write().await.clear();
        batches?
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| to_storable(b, &self.output_schema))
            .collect()
    }

    /// Writes the changed buckets' rows and state as new files and commits them in one
    /// overwrite snapshot that carries `properties`. On error the outcome is unknown: the caller
    /// reads the table and calls [`GroupedModel::landed`] or [`GroupedModel::restore`].
    pub async fn commit(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        mut properties: HashMap<String, String>,
    ) -> Result<Table, kappa_lakehouse::LakehouseError> {
        let df = |e: DataFusionError| kappa_lakehouse::LakehouseError::Query(e.to_string());
        self.pending.clear();
        let mut remove = BTreeSet::new();
        let mut add = Vec::new();
        for b in 0..GROUP_BUCKETS {
            if !self.buckets[b].dirty {
                continue;
            }
            let (state, values) = self.snapshot_bucket(b).map_err(df)?;
            let rows = self.output_of(values).await.map_err(df)?;
            let files = if rows.is_empty() {
                Vec::new()
            } else {
                lakehouse
                    .write_data_files(table, &rows, &format!("b{b}-"))
                    .await?
            };
            let state = lakehouse
                .write_state(table, &format!("b{b}"), &self.state_schema, &[state])
                .await?;
            if let Some(old) = self.committed.get(&b) {
                remove.extend(old.data.iter().cloned());
            }
            self.pending.insert(
                b,
                BucketFiles {
                    data: files.iter().map(|f| f.file_path().to_owned()).collect(),
                    state,
                },
            );
            add.extend(files);
        }
        let mut buckets = self.committed.clone();
        buckets.extend(self.pending.clone());
        properties.insert(
            BUCKETS_PROPERTY.to_owned(),
            serde_json::to_string(&buckets).unwrap_or_default(),
        );
        let table = lakehouse.overwrite(table, &remove, add, properties).await?;
        self.landed();
        Ok(table)
    }

    /// The last commit landed: its files are the table's now.
    pub fn landed(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        for (b, files) in pending {
            self.buckets[b].dirty = false;
            self.committed.insert(b, files);
        }
    }

    /// Rebuilds the groups from the state files named by the table's current snapshot
    /// (`properties` of that snapshot), dropping everything not committed.
    pub async fn restore(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        properties: Option<&HashMap<String, String>>,
    ) -> Result<(), kappa_lakehouse::LakehouseError> {
        let df = |e: DataFusionError| kappa_lakehouse::LakehouseError::Query(e.to_string());
        self.pending.clear();
        self.committed = properties
            .and_then(|p| p.get(BUCKETS_PROPERTY))
            .map(|b| serde_json::from_str(b))
            .transpose()
            .map_err(|e| {
                kappa_lakehouse::LakehouseError::Query(format!("{BUCKETS_PROPERTY}: {e}"))
            })?
            .unwrap_or_default();
        for b in 0..GROUP_BUCKETS {
            self.buckets[b] = self.empty_bucket().map_err(df)?;
        }
        for (b, files) in self.committed.clone() {
            if b >= GROUP_BUCKETS {
                return Err(kappa_lakehouse::LakehouseError::Query(format!(
                    "{BUCKETS_PROPERTY} names bucket {b}; there are {GROUP_BUCKETS}"
                )));
            }
            for batch in lakehouse.read_state(table, &files.state).await? {
                self.load_state(b, &batch).map_err(df)?;
            }
        }
        Ok(())
    }

    fn load_state(&mut self, b: usize, batch: &RecordBatch) -> Result<()> {
        if batch.schema().fields().len() != self.state_schema.fields().len() {
            return Err(DataFusionError::Execution(format!(
                "a state file with {} columns; this model's state has {}",
                batch.schema().fields().len(),
                self.state_schema.fields().len()
            )));
        }
        let n = batch.num_rows();
        let key_count = self.key_count;
        let rows = self
            .converter
            .convert_columns(&batch.columns()[..key_count])?;
        let bucket = &mut self.buckets[b];
        let mut groups = Vec::with_capacity(n);
        for row in rows.iter() {
            let g = match bucket.index.get(row.as_ref()) {
                Some(g) => *g,
                None => {
                    let g = bucket.keys.num_rows();
                    bucket.keys.push(row);
                    bucket.index.insert(row.as_ref().into(), g);
                    g
                }
            };
            groups.push(g);
        }
        let total = bucket.len();
        let mut column = key_count;
        for (j, a) in self.aggregators.iter().enumerate() {
            let width = a.expr.state_fields()?.len();
            let state = &batch.columns()[column..column + width];
            bucket.accumulators[j].merge_batch(state, &groups, None, total)?;
            column += width;
        }
        Ok(())
    }
}

/// The name of a model read by `plan` that itself aggregates, if any.
fn grouping_view(plan: &LogicalPlan) -> Option<String> {
    let mut found = None;
    let _ = plan.apply(|node| {
        if let LogicalPlan::SubqueryAlias(alias) = node
            && alias
                .input
                .exists(|n| Ok(matches!(n, LogicalPlan::Aggregate(_))))
                .unwrap_or(false)
        {
            found = Some(alias.alias.to_string());
            return Ok(datafusion::common::tree_node::TreeNodeRecursion::Stop);
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    found
}

/// The plan's columns as `kappa_aggregate.c{i}`, renamed back to what they were called.
fn requalify(schema: &DFSchema) -> Vec<Expr> {
    schema
        .iter()
        .enumerate()
        .map(|(i, (qualifier, field))| {
            Expr::Column(Column::new(Some("kappa_aggregate"), format!("c{i}")))
                .alias_qualified(qualifier.cloned(), field.name())
        })
        .collect()
}

/// A key's bucket; FNV-1a, stable across builds and restarts (state files are per bucket).
fn bucket_of(key: &[u8]) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % GROUP_BUCKETS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_incremental_group_bys_are_accepted() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("region", DataType::Utf8, true),
        ]));
        for (sql, reason) in [
            ("SELECT id FROM orders", NO_GROUP_BY),
            (
                "SELECT region, array_agg(id) FROM orders GROUP BY region",
                "aggregate `array_agg` is not incremental",
            ),
            (
                "SELECT region, sum(DISTINCT id) FROM orders GROUP BY region",
                "sum(DISTINCT …)",
            ),
            (
                "SELECT region, count(*) FROM orders GROUP BY ROLLUP(region)",
                "ROLLUP",
            ),
            (
                "SELECT region, count(*) AS n FROM orders GROUP BY region ORDER BY n",
                "only projections and HAVING filters may follow it",
            ),
            (
                "SELECT region, count(*) FROM (SELECT * FROM orders LIMIT 5) GROUP BY region",
                "below the GROUP BY",
            ),
        ] {
            let err = GroupedModel::new(sql, "orders", schema.clone())
                .await
                .expect_err(sql)
                .to_string();
            assert!(err.contains(reason), "{sql}: {err}");
        }
        let model = GroupedModel::new(
            "SELECT upper(region) AS r, count(*) FILTER (WHERE id > 2) AS big \
             FROM orders AS o GROUP BY region HAVING count(*) > 1",
            "orders",
            schema,
        )
        .await
        .unwrap();
        assert_eq!(
            model
                .output_schema()
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>(),
            ["r", "big"]
        );
    }
}
