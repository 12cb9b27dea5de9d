//! What every aggregating model shares: the plan split at its Aggregate, DataFusion's own
//! accumulators per group, and sets of groups that can be updated, evaluated, saved and loaded.
//!
//! ```text
//!  micro-batch ─► input plan (row by row) ─► group keys ──────────────┐
//!                                         └► aggregate arguments ────┴► GroupSet accumulators
//!  GroupSet ─► evaluate ─► upper plan (HAVING, projection) ─► rows of the model's table
//!          └─► state arrays (DataFusion's partial-aggregate state) ─► state file
//! ```
//!
//! Using DataFusion's `GroupsAccumulator`s means a group's value is computed exactly as a batch
//! query computes it; their intermediate state is the same arrays DataFusion exchanges between
//! partial and final aggregation, which is what the state files hold. Group keys are interned by
//! DataFusion's own `GroupValues` (the vectorized hash table its hash aggregate uses, specialized
//! for one string or primitive key).

use std::collections::HashMap;

/// Row-encoded keys to values, hashed with foldhash: much faster than the standard SipHash on
/// short keys, and seeded at random per map as the standard one is.
pub type KeyMap<V> = HashMap<Box<[u8]>, V, foldhash::fast::RandomState>;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, RecordBatch, UInt32Array};
use arrow::compute::take;
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use arrow::row::{RowConverter, Rows, SortField};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema};
use datafusion::datasource::{MemTable, provider_as_source};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{
    Aggregate, EmitTo, Expr, GroupsAccumulator, LogicalPlan, LogicalPlanBuilder,
};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::{GroupsAccumulatorAdapter, PhysicalExpr, create_physical_expr};
use datafusion::physical_plan::aggregates::group_values::{GroupValues, new_group_values};
use datafusion::physical_plan::aggregates::order::GroupOrdering;
use datafusion::physical_planner::create_aggregate_expr_and_maybe_filter;
use datafusion::prelude::{DataFrame, SessionContext};

use crate::stateless::{stateless_shape, storable_schema, to_storable};

/// Aggregate functions whose intermediate state merges exactly, so that incremental results
/// equal a batch query's.
pub const MERGEABLE: &[&str] = &[
    "count", "sum", "min", "max", "avg", "mean", "bool_and", "bool_or",
];

/// [`aggregate_shape`]'s reason for a plan without any aggregation.
pub const NO_GROUP_BY: &str = "the query has no GROUP BY";

/// Splits a plan at its one Aggregate: the part above must be row by row (projection, HAVING
/// filter, aliases), the part below too. Returns the Aggregate, or why the plan is not that.
pub fn aggregate_shape(plan: &LogicalPlan) -> std::result::Result<&Aggregate, String> {
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
                             them beside other inputs is not incremental — a model that reads \
                             only {view} runs any SQL over it (refreshed at each of its \
                             commits), or group the rows {view} reads instead"
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
                let step = step.split(':').next().unwrap_or("this step").to_owned();
                return Err(format!(
                    "{step} above a GROUP BY is not incremental; only projections and \
                     HAVING filters may follow it"
                ));
            }
        }
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
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// One aggregate of the model and the filter (`FILTER (WHERE …)`) on its rows.
pub(crate) struct Aggregator {
    pub expr: Arc<AggregateFunctionExpr>,
    pub filter: Option<Arc<dyn PhysicalExpr>>,
}

impl Aggregator {
    pub fn accumulator(&self) -> Result<Box<dyn GroupsAccumulator>> {
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

/// The values of every aggregate's arguments (and filter) for the rows of one batch.
pub(crate) type Arguments = Vec<(Vec<ArrayRef>, Option<ArrayRef>)>;

/// A model's plan split at its Aggregate, and what is needed to run each part.
pub(crate) struct AggregatePlan {
    ctx: SessionContext,
    input_slot: Arc<MemTable>,
    input_plan: LogicalPlan,
    /// The Aggregate node as planned (logical), for finding window keys.
    pub aggregate: Aggregate,
    /// No GROUP BY: one group, keyed by a constant.
    global: bool,
    group_exprs: Vec<Arc<dyn PhysicalExpr>>,
    pub aggregators: Vec<Aggregator>,
    aggregate_slot: Arc<MemTable>,
    aggregate_schema: SchemaRef,
    upper_plan: LogicalPlan,
    pub output_schema: SchemaRef,
    pub state_schema: SchemaRef,
    /// Row encoding of the group keys (for hashing keys into buckets).
    pub converter: RowConverter,
    /// The group keys' columns.
    key_schema: SchemaRef,
    pub key_count: usize,
}

impl AggregatePlan {
    /// Splits the analyzed `plan`, whose input is `input_slot` in `ctx`.
    pub fn new(
        ctx: SessionContext,
        input_slot: Arc<MemTable>,
        plan: LogicalPlan,
    ) -> Result<AggregatePlan> {
        let state = ctx.state();
        let aggregate = aggregate_shape(&plan)
            .map_err(crate::error::unsupported)?
            .clone();
        let input_plan = aggregate.input.as_ref().clone();
        let input_df_schema = input_plan.schema().clone();
        let physical_input = input_df_schema.as_arrow();
        let props = state.execution_props();
        let group_exprs = aggregate
            .group_expr
            .iter()
            .map(|e| physical_expr(e, &input_df_schema, props))
            .collect::<Result<Vec<_>>>()?;
        let aggregators = aggregate
            .aggr_expr
            .iter()
            .map(|e| {
                // The aggregate's arguments and filter are simplified as a batch query's are.
                let e = e
                    .clone()
                    .map_children(|child| Ok(Transformed::yes(simplify(child, &input_df_schema)?)))?
                    .data;
                let (expr, filter, _) = create_aggregate_expr_and_maybe_filter(
                    &e,
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
        let (aggregate_slot, aggregate_schema, replacement) =
            slot_for("kappa_aggregate", &aggregate_df_schema)?;
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
        Ok(AggregatePlan {
            ctx,
            input_slot,
            input_plan,
            aggregate,
            global,
            group_exprs,
            aggregators,
            aggregate_slot,
            aggregate_schema,
            upper_plan,
            output_schema,
            state_schema: Arc::new(Schema::new(state_fields)),
            converter,
            key_schema: Arc::new(Schema::new(
                key_types
                    .iter()
                    .enumerate()
                    .map(|(i, t)| Field::new(format!("k{i}"), t.clone(), true))
                    .collect::<Vec<_>>(),
            )),
            key_count: key_types.len(),
        })
    }

    /// The rows of one micro-batch as the Aggregate sees them (after the plan below it).
    pub async fn input(&mut self, batch: RecordBatch) -> Result<Vec<RecordBatch>> {
        if batch.num_rows() == 0 {
            return Ok(Vec::new());
        }
        *self.input_slot.batches[0].write().await = vec![batch];
        let frame = DataFrame::new(self.ctx.state(), self.input_plan.clone());
        let batches = frame.collect().await;
        self.input_slot.batches[0].write().await.clear();
        batches
    }

    /// The group key columns of a batch of the Aggregate's input.
    pub fn keys(&self, batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
        let n = batch.num_rows();
        if self.global {
            return Ok(vec![Arc::new(BooleanArray::from(vec![true; n]))]);
        }
        self.group_exprs
            .iter()
            .map(|e| e.evaluate(batch)?.into_array(n))
            .collect()
    }

    /// The keys' rows in the row encoding.
    pub fn rows(&self, keys: &[ArrayRef]) -> Result<Rows> {
        Ok(self.converter.convert_columns(keys)?)
    }

    /// Every aggregate's argument values (and filter) for a batch of the Aggregate's input.
    pub fn arguments(&self, batch: &RecordBatch) -> Result<Arguments> {
        let n = batch.num_rows();
        self.aggregators
            .iter()
            .map(|a| {
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
                Ok((values, filter))
            })
            .collect()
    }

    /// A set with no groups.
    pub fn empty_set(&self) -> Result<GroupSet> {
        Ok(GroupSet {
            values: new_group_values(self.key_schema.clone(), &GroupOrdering::None)?,
            accumulators: self
                .aggregators
                .iter()
                .map(Aggregator::accumulator)
                .collect::<Result<_>>()?,
            dirty: false,
        })
    }

    /// The rows of the model's table for a batch of aggregate values (the upper plan over
    /// them). `&mut`: the future must be `Send`, and accumulators are not `Sync`.
    pub async fn output(&mut self, values: RecordBatch) -> Result<Vec<RecordBatch>> {
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
}

/// Groups and their accumulators.
pub(crate) struct GroupSet {
    /// The keys, each interned as a group number.
    values: Box<dyn GroupValues>,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    /// Changed since it was last saved.
    pub dirty: bool,
}

impl GroupSet {
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Folds the rows `members` of a batch (whose key columns are `keys`, arguments
    /// `arguments`) into this set's groups. `members` lists every row of the batch when `whole`.
    pub fn update(
        &mut self,
        keys: &[ArrayRef],
        members: &[u32],
        whole: bool,
        arguments: &Arguments,
    ) -> Result<()> {
        if members.is_empty() {
            return Ok(());
        }
        let indices = UInt32Array::from(members.to_vec());
        let mut groups = Vec::with_capacity(members.len());
        if whole {
            self.values.intern(keys, &mut groups)?;
        } else {
            let taken = keys
                .iter()
                .map(|k| take(k, &indices, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            self.values.intern(&taken, &mut groups)?;
        }
        let total = self.len();
        for ((values, filter), accumulator) in arguments.iter().zip(self.accumulators.iter_mut()) {
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
            accumulator.update_batch(&values, &groups, filter.as_ref(), total)?;
        }
        self.dirty = true;
        Ok(())
    }

    /// The set's state (one batch of the plan's state schema) and its evaluated aggregate
    /// values (one batch of the Aggregate's output). With `keep`, the accumulators go on as
    /// they were; without, the set is left empty.
    pub fn evaluate(
        &mut self,
        plan: &AggregatePlan,
        keep: bool,
    ) -> Result<(RecordBatch, RecordBatch)> {
        let n = self.len();
        // `emit` hands the keys over; interned again in the same order into a fresh table (an
        // emptied one is not to be reused), they keep their numbers.
        let keys = self.values.emit(EmitTo::All)?;
        if keep {
            self.values = new_group_values(plan.key_schema.clone(), &GroupOrdering::None)?;
            let mut groups = Vec::with_capacity(n);
            self.values.intern(&keys, &mut groups)?;
        }
        let all: Vec<usize> = (0..n).collect();
        let mut state_columns = keys.clone();
        let mut value_columns = if plan.global { Vec::new() } else { keys };
        for (j, aggregator) in plan.aggregators.iter().enumerate() {
            // `state` hands the accumulator's groups over; a fresh accumulator takes them back
            // when the set goes on, another is evaluated.
            let state = self.accumulators[j].state(EmitTo::All)?;
            if keep {
                let mut kept = aggregator.accumulator()?;
                kept.merge_batch(&state, &all, None, n)?;
                self.accumulators[j] = kept;
            }
            let mut evaluated = aggregator.accumulator()?;
            evaluated.merge_batch(&state, &all, None, n)?;
            value_columns.push(evaluated.evaluate(EmitTo::All)?);
            state_columns.extend(state);
        }
        if !keep {
            *self = plan.empty_set()?;
        }
        let state = RecordBatch::try_new(plan.state_schema.clone(), state_columns)?;
        let values = RecordBatch::try_new(plan.aggregate_schema.clone(), value_columns)?;
        Ok((state, values))
    }

    /// Merges saved state (a batch of the plan's state schema, or the rows `members` of it)
    /// into this set.
    pub fn load(
        &mut self,
        plan: &AggregatePlan,
        batch: &RecordBatch,
        members: Option<&[u32]>,
    ) -> Result<()> {
        if batch.schema().fields().len() != plan.state_schema.fields().len() {
            return Err(DataFusionError::Execution(format!(
                "a state file with {} columns; this model's state has {}",
                batch.schema().fields().len(),
                plan.state_schema.fields().len()
            )));
        }
        // `GroupValues` takes the key columns on trust (a wrong type would panic in it).
        for (found, wanted) in batch
            .schema()
            .fields()
            .iter()
            .zip(plan.state_schema.fields())
            .take(plan.key_count)
        {
            if found.data_type() != wanted.data_type() {
                return Err(DataFusionError::Execution(format!(
                    "a state file whose key `{}` is {}; this model's is {}",
                    wanted.name(),
                    found.data_type(),
                    wanted.data_type()
                )));
            }
        }
        let batch = match members {
            Some(rows) => {
                let indices = UInt32Array::from(rows.to_vec());
                let columns = batch
                    .columns()
                    .iter()
                    .map(|c| take(c, &indices, None))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                RecordBatch::try_new(batch.schema(), columns)?
            }
            None => batch.clone(),
        };
        let mut groups = Vec::with_capacity(batch.num_rows());
        self.values
            .intern(&batch.columns()[..plan.key_count], &mut groups)?;
        let total = self.len();
        let mut column = plan.key_count;
        for (j, a) in plan.aggregators.iter().enumerate() {
            let width = a.expr.state_fields()?.len();
            let state = &batch.columns()[column..column + width];
            self.accumulators[j].merge_batch(state, &groups, None, total)?;
            column += width;
        }
        Ok(())
    }
}

/// A slot that stands in for a plan node of schema `schema`: the table batches are put in, its
/// schema, and the plan that reads it back with the node's column names
/// and qualifiers, so the plan above the node reads the slot exactly as it read the node.
pub(crate) fn slot_for(
    name: &str,
    schema: &DFSchema,
) -> Result<(Arc<MemTable>, SchemaRef, LogicalPlan)> {
    // A column keeps its name in the slot unless another column shares it (`o.id`, `p.id`),
    // so that lineage through the slot still sees source names.
    let names: Vec<String> = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let shared = schema
                .fields()
                .iter()
                .filter(|g| g.name() == f.name())
                .count()
                > 1;
            if shared {
                format!("c{i}")
            } else {
                f.name().clone()
            }
        })
        .collect();
    let slot_schema = Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .zip(&names)
            .map(|(f, name)| Field::new(name, f.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    let slot = Arc::new(MemTable::try_new(slot_schema.clone(), vec![vec![]])?);
    let renamed: Vec<Expr> = schema
        .iter()
        .zip(&names)
        .map(|((qualifier, field), slot_name)| {
            Expr::Column(Column::new(Some(name), slot_name))
                .alias_qualified(qualifier.cloned(), field.name())
        })
        .collect();
    let plan = LogicalPlanBuilder::scan(name, provider_as_source(slot.clone()), None)?
        .project(renamed)?
        .build()?;
    Ok((slot, slot_schema, plan))
}

/// `plan` with the node `target` replaced by `replacement` (the first time it is met).
pub(crate) fn replace_node(
    plan: LogicalPlan,
    target: &LogicalPlan,
    replacement: &LogicalPlan,
) -> Result<LogicalPlan> {
    use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
    Ok(plan
        .transform_down(|node| {
            Ok(if node == *target {
                Transformed::new(replacement.clone(), true, TreeNodeRecursion::Jump)
            } else {
                Transformed::no(node)
            })
        })?
        .data)
}

/// Simplifies an expression as DataFusion's optimizer does before it runs one: some functions
/// (`coalesce`, `nvl`, …) only exist in simplified form at execution.
pub fn simplify(expr: Expr, schema: &datafusion::common::DFSchemaRef) -> Result<Expr> {
    let context =
        datafusion::logical_expr::simplify::SimplifyContext::default().with_schema(schema.clone());
    datafusion::optimizer::simplify_expressions::ExprSimplifier::new(context).simplify(expr)
}

/// The physical form of an expression over `schema`, simplified first.
pub fn physical_expr(
    expr: &Expr,
    schema: &datafusion::common::DFSchemaRef,
    props: &datafusion::execution::context::ExecutionProps,
) -> Result<Arc<dyn PhysicalExpr>> {
    create_physical_expr(&simplify(expr.clone(), schema)?, schema, props)
}
