//! Stateless models (projections, filters, scalar functions over one input) run on each
//! micro-batch by DataFusion: the batch is the input table, the model's SQL the query.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::TableReference;

/// The Arrow type Iceberg stores for a DataFusion result type, so that what is written reads
/// back as the same type: string views are strings, small integers are `int`, times are
/// microseconds, zoned timestamps are UTC.
pub fn storable(data_type: &DataType) -> DataType {
    use arrow::datatypes::TimeUnit;
    match data_type {
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        DataType::BinaryView | DataType::LargeBinary => DataType::Binary,
        DataType::Int8 | DataType::Int16 | DataType::UInt8 | DataType::UInt16 => DataType::Int32,
        DataType::UInt32 => DataType::Int64,
        DataType::UInt64 => DataType::Decimal128(20, 0),
        DataType::Float16 => DataType::Float32,
        DataType::Date64 => DataType::Date32,
        DataType::Time32(_) | DataType::Time64(_) => DataType::Time64(TimeUnit::Microsecond),
        DataType::Timestamp(_, zone) => DataType::Timestamp(
            TimeUnit::Microsecond,
            zone.as_ref().map(|_| "+00:00".into()),
        ),
        other => other.clone(),
    }
}

/// `schema` with every type made [`storable`].
pub fn storable_schema(schema: &Schema) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| Field::new(f.name(), storable(f.data_type()), f.is_nullable()))
        .collect();
    Arc::new(Schema::new(fields))
}

/// Casts a result batch to the storable schema.
pub fn to_storable(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| {
            if column.data_type() == field.data_type() {
                Ok(column.clone())
            } else {
                cast(column, field.data_type())
            }
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(DataFusionError::from)
}

/// Whether a plan computes each output row from one input row alone (projections, filters,
/// scalar functions), so that running it batch by batch gives what running it once gives.
/// Otherwise, the reason.
pub fn stateless_shape(plan: &LogicalPlan) -> std::result::Result<(), String> {
    let mut problem = None;
    let _ = plan.apply(|node| {
        if let Some(reason) = not_row_by_row(node) {
            problem = Some(reason);
            return Ok(TreeNodeRecursion::Stop);
        }
        let subquery = node.expressions().iter().any(|e| {
            e.exists(|e| {
                Ok(matches!(
                    e,
                    Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_)
                ))
            })
            .unwrap_or(true)
        });
        if subquery {
            problem = Some("a subquery reads more than the current row".to_owned());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    problem.map_or(Ok(()), Err)
}

/// Why a plan step is not row by row, with the nearest form that is; `None` if it is.
fn not_row_by_row(node: &LogicalPlan) -> Option<String> {
    Some(match node {
        LogicalPlan::Projection(_)
        | LogicalPlan::Filter(_)
        | LogicalPlan::TableScan(_)
        | LogicalPlan::SubqueryAlias(_)
        | LogicalPlan::Unnest(_) => return None,
        LogicalPlan::Sort(_) => "ORDER BY: a table's rows have no order; drop it and order \
                                 when you query the table"
            .into(),
        LogicalPlan::Limit(_) => "LIMIT over an endless stream has no stable answer; select \
                                  rows with WHERE, or summarise them with GROUP BY"
            .into(),
        LogicalPlan::Window(w) if is_row_number(w) => {
            "ROW_NUMBER() runs as a deduplication only when the same model keeps the first row \
             of each key: SELECT … FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY <key> ORDER \
             BY <event time>) AS rn FROM <topic>) WHERE rn = 1"
                .into()
        }
        LogicalPlan::Window(_) => "window functions (OVER …) are not incremental; for \
                                   running totals use GROUP BY"
            .into(),
        LogicalPlan::Join(join) => return crate::lookup::lookup_join_problem(join),
        LogicalPlan::Union(_) => "UNION is not supported yet; write one model per input".into(),
        LogicalPlan::Aggregate(_) | LogicalPlan::Distinct(_) => {
            "GROUP BY and DISTINCT keep state; they are not a row-by-row step".into()
        }
        LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => {
            "a model reads a topic or another model, not constant rows".into()
        }
        other => format!(
            "{} is not incremental",
            other
                .display()
                .to_string()
                .split(':')
                .next()
                .unwrap_or("this step")
        ),
    })
}

/// The DataFusion session models run in: one partition, since a micro-batch is one batch.
pub fn session() -> SessionContext {
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    crate::functions::register(&ctx);
    ctx
}

/// Runs one stateless model over micro-batches of its input: the plan is made once, each
/// micro-batch is put in the input's slot and the plan executed over it.
pub struct StatelessModel {
    ctx: SessionContext,
    slot: Arc<MemTable>,
    plan: LogicalPlan,
    output_schema: SchemaRef,
}

impl std::fmt::Debug for StatelessModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatelessModel")
            .field("output_schema", &self.output_schema)
            .finish_non_exhaustive()
    }
}

impl StatelessModel {
    /// Plans `sql`, which reads the table `input` of `input_schema`.
    pub async fn new(sql: &str, input: &str, input_schema: SchemaRef) -> Result<StatelessModel> {
        let ctx = session();
        let slot = Arc::new(MemTable::try_new(input_schema, vec![vec![]])?);
        ctx.register_table(TableReference::parse_str(input), slot.clone())?;
        let state = ctx.state();
        let plan = state.create_logical_plan(sql).await?;
        let plan = state
            .analyzer()
            .execute_and_check(plan, state.config_options(), |_, _| {})?;
        StatelessModel::from_plan(ctx, slot, plan)
    }

    /// A model from its analyzed `plan`, whose input is `slot` in `ctx`.
    pub fn from_plan(
        ctx: SessionContext,
        slot: Arc<MemTable>,
        plan: LogicalPlan,
    ) -> Result<StatelessModel> {
        if let Err(reason) = stateless_shape(&plan) {
            return Err(crate::error::unsupported(reason));
        }
        let output_schema = storable_schema(plan.schema().as_arrow());
        Ok(StatelessModel {
            ctx,
            slot,
            plan,
            output_schema,
        })
    }

    /// The schema of the model's table.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// The model's rows for one micro-batch of input.
    pub async fn run(&self, batch: RecordBatch) -> Result<Vec<RecordBatch>> {
        *self.slot.batches[0].write().await = vec![batch];
        let frame = datafusion::prelude::DataFrame::new(self.ctx.state(), self.plan.clone());
        let batches = frame.collect().await;
        self.slot.batches[0].write().await.clear();
        batches?
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| to_storable(b, &self.output_schema))
            .collect()
    }
}

/// Whether a window node computes `row_number()` alone over partitions (a deduplication
/// written without its `WHERE rn = 1`, or with it in another model).
fn is_row_number(window: &datafusion::logical_expr::Window) -> bool {
    use datafusion::logical_expr::Expr;
    let function = match window.window_expr.as_slice() {
        [Expr::WindowFunction(f)] => f,
        [Expr::Alias(a)] => match a.expr.as_ref() {
            Expr::WindowFunction(f) => f,
            _ => return false,
        },
        _ => return false,
    };
    function.fun.name() == "row_number" && !function.params.partition_by.is_empty()
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, StringArray};
    use arrow::util::pretty::pretty_format_batches;

    use super::*;

    #[tokio::test]
    async fn each_micro_batch_runs_through_the_model() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("region", DataType::Utf8, true),
        ]));
        let model = StatelessModel::new(
            "SELECT id * 10 AS id10, upper(region) AS region FROM orders WHERE id % 2 = 1",
            "orders",
            schema.clone(),
        )
        .await
        .unwrap();
        let batch = |ids: Vec<i64>| {
            let regions: Vec<Option<&str>> = ids
                .iter()
                .map(|i| (i % 3 != 0).then_some("north"))
                .collect();
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from(ids)),
                    Arc::new(StringArray::from(regions)),
                ],
            )
            .unwrap()
        };
        let first = model.run(batch(vec![1, 2, 3])).await.unwrap();
        let second = model.run(batch(vec![4, 5])).await.unwrap();
        let all: Vec<RecordBatch> = first.into_iter().chain(second).collect();
        assert_eq!(all[0].schema().field(1).data_type(), &DataType::Utf8);
        assert_eq!(
            pretty_format_batches(&all).unwrap().to_string(),
            "+------+--------+\n| id10 | region |\n+------+--------+\n| 10   | NORTH  |\n| 30   |        |\n| 50   | NORTH  |\n+------+--------+"
        );
    }

    #[tokio::test]
    async fn only_row_by_row_queries_are_run_batch_by_batch() {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        for (sql, reason) in [
            (
                "SELECT count(*) FROM orders",
                "GROUP BY and DISTINCT keep state",
            ),
            (
                "SELECT id, row_number() OVER (ORDER BY id) FROM orders",
                "window functions",
            ),
            (
                "SELECT DISTINCT id FROM orders",
                "GROUP BY and DISTINCT keep state",
            ),
            (
                "SELECT id FROM orders ORDER BY id",
                "ORDER BY: a table's rows have no order",
            ),
            (
                "SELECT id FROM orders LIMIT 3",
                "LIMIT over an endless stream",
            ),
            (
                "SELECT id FROM orders WHERE id IN (SELECT id FROM orders WHERE id > 3)",
                "subquery",
            ),
            ("SELECT 1 AS one", "not constant rows"),
        ] {
            let err = StatelessModel::new(sql, "orders", schema.clone())
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains(reason), "{sql}: {err}");
        }
        StatelessModel::new(
            "SELECT id + 1 AS next FROM orders AS o WHERE o.id > 2",
            "orders",
            schema,
        )
        .await
        .unwrap();
    }
}
