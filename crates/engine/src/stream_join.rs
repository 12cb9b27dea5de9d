//! Stream ⋈ stream within a time bound: an inner join of two topics whose ON clause bounds the
//! distance between their event times (`p.ts BETWEEN o.ts AND o.ts + INTERVAL '1 hour'`).
//!
//! ```text
//!  orders   ─► watermark ─► left rows  ΔL ─┐  out = ΔL ⋈ (R ∪ ΔR)  ∪  L ⋈ ΔR
//!  payments ─► watermark ─► right rows ΔR ─┘  then L ∪= ΔL, R ∪= ΔR, expired rows dropped
//! ```
//!
//! Each side keeps the rows it has seen in a buffer; every new row is joined with the other
//! side's buffer and with the other side's new rows, so every pair is produced exactly once,
//! by whichever of its two rows arrives second. The output is append-only: any model shape
//! runs over it (row by row, a GROUP BY).
//!
//! Why expiry is exact: with the bound `lo ≤ r.t − l.t ≤ hi`, a record that is not late has an
//! event time at or after its topic's watermark (see `watermark`). A left row can still meet a
//! future right row only if `l.t + hi ≥ W_right`, a right row a future left row only if
//! `r.t − lo ≥ W_left`; rows past that are dropped. The state is therefore about
//! `(hi − lo + watermark delay) × event rate` rows per side. Each commit checkpoints the rows
//! added since the last one as a delta; every 16 deltas the whole buffer becomes a new base
//! (`kappa.join`).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, RecordBatch};
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, ScalarValue};
use datafusion::datasource::MemTable;
use datafusion::error::Result;
use datafusion::logical_expr::{Between, BinaryExpr, Expr, Join, JoinType, LogicalPlan, Operator};
use datafusion::prelude::{DataFrame, SessionContext};
use kappa_lakehouse::{Lakehouse, LakehouseError, Table};
use serde::{Deserialize, Serialize};

use crate::aggregate::slot_for;
use crate::deltas::DeltaFiles;
use crate::grouped::df;

/// Snapshot property: the buffer files of both sides
/// (`{"left": {"base", "deltas"}, "right": …}`).
pub const JOIN_PROPERTY: &str = "kappa.join";

/// The bound on event times a join's ON clause sets: `lo ≤ right − left ≤ hi` (µs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeBound {
    /// The left side's time column, in the left input's schema.
    pub left: Column,
    /// The right side's time column, in the right input's schema.
    pub right: Column,
    pub lo_us: i64,
    pub hi_us: i64,
}

/// A join of two streams found in a plan.
#[derive(Debug, Clone)]
pub struct StreamJoinMatch {
    /// The join node, as it appears in the plan.
    pub node: LogicalPlan,
    pub join: Join,
    /// The stream each side reads: a topic, or a model whose table it reads (`layer.name`).
    pub left_topic: String,
    pub right_topic: String,
    pub bound: TimeBound,
    /// The fields of each side's stream the bound compares (each side's event time).
    pub left_time: String,
    pub right_time: String,
}

/// Finds the join of the two stream topics `streams` in `plan`, or says why it cannot run.
pub fn find_stream_join(
    plan: &LogicalPlan,
    streams: &[String],
) -> std::result::Result<Option<StreamJoinMatch>, String> {
    let mut found = Vec::new();
    let mut problem = None;
    let _ = plan.apply(|node| {
        let LogicalPlan::Join(join) = node else {
            return Ok(TreeNodeRecursion::Continue);
        };
        let left = scanned(&join.left, streams);
        let right = scanned(&join.right, streams);
        if left.len() != 1 || right.len() != 1 || left == right {
            return Ok(TreeNodeRecursion::Continue);
        }
        match stream_join(node, join, &left[0], &right[0]) {
            Ok(m) => found.push(m),
            Err(reason) => {
                problem = Some(reason);
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Jump)
    });
    if let Some(reason) = problem {
        return Err(reason);
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err("a model joins two streams once; write one model per join".into()),
    }
}

/// The streams a plan scans: topics by their bare name, models' tables as `layer.name`.
fn scanned(plan: &LogicalPlan, streams: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    let _ = plan.apply(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Some(name) = streams.iter().find(|s| names(&scan.table_name, s))
            && !found.contains(name)
        {
            found.push(name.clone());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// Whether a scan of `table` reads the stream `name`: a topic by its bare name (which may hold
/// a dot, `"app.orders"`), a model's table as `layer.name`.
fn names(table: &datafusion::sql::TableReference, name: &str) -> bool {
    let bare = matches!(table.schema(), None | Some("public")) && table.table() == name;
    bare || name
        .split_once('.')
        .is_some_and(|(layer, rest)| table.schema() == Some(layer) && table.table() == rest)
}

const BOUND_EXAMPLE: &str = "ON p.order_id = o.id AND p.ts BETWEEN o.ts AND o.ts + INTERVAL \
                             '1 hour'";

fn stream_join(
    node: &LogicalPlan,
    join: &Join,
    left_topic: &str,
    right_topic: &str,
) -> std::result::Result<StreamJoinMatch, String> {
    if join.join_type != JoinType::Inner {
        return Err(format!(
            "a {} join of two streams would have to wait until no partner can come to emit an \
             unmatched row; that is not supported yet — use JOIN (inner) with a time bound, \
             {BOUND_EXAMPLE}",
            join.join_type.to_string().to_lowercase()
        ));
    }
    for side in [&join.left, &join.right] {
        crate::stateless::stateless_shape(side).map_err(|reason| {
            format!("each side of a join of two streams runs row by row: {reason}")
        })?;
    }
    let bound = join
        .filter
        .as_ref()
        .and_then(|f| time_bound(f, join))
        .ok_or_else(|| {
            format!(
                "joining two streams needs a time bound in its ON clause that keeps the state \
                 finite, such as {BOUND_EXAMPLE}; or declare the side that holds the current \
                 state of something as kind = \"table\" in its topics/<name>.toml, and it \
                 becomes a dimension looked up by each event"
            )
        })?;
    let time_of = |column: &Column, side: &LogicalPlan, topic: &str| {
        crate::windowed::source_column(&Expr::Column(column.clone()), side).ok_or_else(|| {
            format!(
                "the time bound compares `{column}`, which is not a field of `{topic}`; \
                 bound the sides' own timestamp fields, {BOUND_EXAMPLE}"
            )
        })
    };
    let left_time = time_of(&bound.left, &join.left, left_topic)?;
    let right_time = time_of(&bound.right, &join.right, right_topic)?;
    Ok(StreamJoinMatch {
        node: node.clone(),
        join: join.clone(),
        left_topic: left_topic.to_owned(),
        right_topic: right_topic.to_owned(),
        bound,
        left_time,
        right_time,
    })
}

/// The bound `lo ≤ right − left ≤ hi` the conjuncts of `filter` set on one pair of columns.
fn time_bound(filter: &Expr, join: &Join) -> Option<TimeBound> {
    let mut conjuncts = Vec::new();
    split_and(filter, &mut conjuncts);
    // (left column, right column) → (lo, hi)
    let mut bounds: Vec<(Column, Column, Option<i64>, Option<i64>)> = Vec::new();
    let mut add = |l: Column, r: Column, lo: Option<i64>, hi: Option<i64>| {
        if let Some(entry) = bounds.iter_mut().find(|(a, b, _, _)| *a == l && *b == r) {
            entry.2 = max_opt(entry.2, lo);
            entry.3 = min_opt(entry.3, hi);
        } else {
            bounds.push((l, r, lo, hi));
        }
    };
    for conjunct in conjuncts {
        let comparisons = match conjunct {
            Expr::Between(Between {
                expr,
                negated: false,
                low,
                high,
            }) => vec![
                (expr.as_ref(), Operator::GtEq, low.as_ref()),
                (expr.as_ref(), Operator::LtEq, high.as_ref()),
            ],
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                vec![(left.as_ref(), *op, right.as_ref())]
            }
            _ => continue,
        };
        for (a, op, b) in comparisons {
            let (Some((Some(x), dx)), Some((Some(y), dy))) = (linear(a), linear(b)) else {
                continue;
            };
            // x + dx op y + dy  ⇔  x − y op dy − dx; only timestamps bound event time.
            let side = |c: &Column| {
                let is_time = |plan: &LogicalPlan| {
                    plan.schema()
                        .qualified_field_from_column(c)
                        .is_ok_and(|(_, f)| matches!(f.data_type(), DataType::Timestamp(..)))
                };
                if is_time(&join.left) {
                    Some(false)
                } else if is_time(&join.right) {
                    Some(true)
                } else {
                    None
                }
            };
            let (l, r, op, c) = match (side(&x), side(&y)) {
                // right − left op c
                (Some(true), Some(false)) => (y, x, op, dy.checked_sub(dx)?),
                // left − right op c  ⇔  right − left (flipped op) −c
                (Some(false), Some(true)) => (x, y, flip(op)?, dx.checked_sub(dy)?),
                _ => continue,
            };
            match op {
                Operator::GtEq | Operator::Gt => add(l, r, Some(c), None),
                Operator::LtEq | Operator::Lt => add(l, r, None, Some(c)),
                Operator::Eq => add(l, r, Some(c), Some(c)),
                _ => {}
            }
        }
    }
    bounds.into_iter().find_map(|(left, right, lo, hi)| {
        let (lo_us, hi_us) = (lo?, hi?);
        (lo_us <= hi_us).then_some(TimeBound {
            left,
            right,
            lo_us,
            hi_us,
        })
    })
}

fn max_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn flip(op: Operator) -> Option<Operator> {
    Some(match op {
        Operator::Eq => Operator::Eq,
        Operator::Gt => Operator::Lt,
        Operator::GtEq => Operator::LtEq,
        Operator::Lt => Operator::Gt,
        Operator::LtEq => Operator::GtEq,
        _ => return None,
    })
}

fn split_and<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
    match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) => {
            split_and(left, out);
            split_and(right, out);
        }
        other => out.push(other),
    }
}

/// An expression as `column + constant` (µs), or a constant alone.
fn linear(e: &Expr) -> Option<(Option<Column>, i64)> {
    // A cast keeps the instant only to a timestamp at least as fine as the µs we store.
    let keeps_time = |t: &DataType| {
        matches!(
            t,
            DataType::Timestamp(TimeUnit::Microsecond | TimeUnit::Nanosecond, _)
        )
    };
    match e {
        Expr::Cast(c) if keeps_time(&c.data_type) => linear(&c.expr),
        Expr::TryCast(c) if keeps_time(&c.data_type) => linear(&c.expr),
        Expr::Alias(a) => linear(&a.expr),
        Expr::Column(c) => Some((Some(c.clone()), 0)),
        Expr::Literal(v, _) => duration_us(v).map(|us| (None, us)),
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (a, da) = linear(left)?;
            let (b, db) = linear(right)?;
            match (op, a, b) {
                (Operator::Plus, Some(c), None) | (Operator::Plus, None, Some(c)) => {
                    Some((Some(c), da.checked_add(db)?))
                }
                (Operator::Minus, Some(c), None) => Some((Some(c), da.checked_sub(db)?)),
                (Operator::Plus, None, None) => Some((None, da.checked_add(db)?)),
                (Operator::Minus, None, None) => Some((None, da.checked_sub(db)?)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A fixed length of time in µs (intervals of months have no fixed length).
fn duration_us(v: &ScalarValue) -> Option<i64> {
    const DAY_US: i64 = 86_400_000_000;
    match v {
        ScalarValue::IntervalMonthDayNano(Some(i)) if i.months == 0 => i64::from(i.days)
            .checked_mul(DAY_US)?
            .checked_add(i.nanoseconds / 1000),
        ScalarValue::IntervalDayTime(Some(i)) => i64::from(i.days)
            .checked_mul(DAY_US)?
            .checked_add(i64::from(i.milliseconds) * 1000),
        ScalarValue::DurationSecond(Some(s)) => s.checked_mul(1_000_000),
        ScalarValue::DurationMillisecond(Some(ms)) => ms.checked_mul(1000),
        ScalarValue::DurationMicrosecond(Some(us)) => Some(*us),
        ScalarValue::DurationNanosecond(Some(ns)) => Some(ns / 1000),
        _ => None,
    }
}

/// Replaces the join node of `found` in `plan` by `replacement`.
pub fn replace_join(
    plan: LogicalPlan,
    found: &StreamJoinMatch,
    replacement: &LogicalPlan,
) -> Result<LogicalPlan> {
    crate::aggregate::replace_node(plan, &found.node, replacement)
}

/// The buffer files of the join state in the table's current snapshot: per side, a base (the
/// whole buffer when it was written) and the rows added since. Rows expired since the base
/// are dropped again after a restore (the join condition never pairs them with a record that
/// is not late, so they only cost memory until then).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinFiles {
    pub left: DeltaFiles,
    pub right: DeltaFiles,
}

/// One side of the join: its topic's rows through the side's row-by-row steps, and the rows
/// it keeps for the other side.
struct Side {
    source: Arc<MemTable>,
    plan: LogicalPlan,
    slot: Arc<MemTable>,
    schema: SchemaRef,
    time: usize,
    buffer: RecordBatch,
    /// Rows added since the last checkpoint that landed.
    fresh: Vec<RecordBatch>,
}

impl Side {
    fn new(
        source: Arc<MemTable>,
        plan: &LogicalPlan,
        name: &str,
        time: &Column,
    ) -> Result<(Side, LogicalPlan)> {
        let (slot, schema, scan) = slot_for(name, plan.schema())?;
        let time = plan.schema().index_of_column(time)?;
        Ok((
            Side {
                source,
                plan: plan.clone(),
                slot,
                buffer: RecordBatch::new_empty(schema.clone()),
                fresh: Vec::new(),
                schema,
                time,
            },
            scan,
        ))
    }

    /// The side's rows for a batch of its topic's records.
    async fn rows(&self, ctx: &SessionContext, batch: RecordBatch) -> Result<RecordBatch> {
        if batch.num_rows() == 0 {
            return Ok(RecordBatch::new_empty(self.schema.clone()));
        }
        *self.source.batches[0].write().await = vec![batch];
        let out = DataFrame::new(ctx.state(), self.plan.clone())
            .collect()
            .await;
        self.source.batches[0].write().await.clear();
        let out = out?
            .iter()
            .map(|b| crate::stateless::to_storable(b, &self.schema))
            .collect::<Result<Vec<_>>>()?;
        Ok(concat_batches(&self.schema, &out)?)
    }

    /// Keeps the rows that can still meet a future row of the other side: `keep(t)`.
    fn expire(&mut self, keep: impl Fn(i64) -> bool) -> Result<bool> {
        let times = crate::watermark::micros(self.buffer.column(self.time))?;
        let mask: BooleanArray = (0..times.len())
            .map(|i| Some(!times.is_null(i) && keep(times.value(i))))
            .collect();
        if mask.true_count() == self.buffer.num_rows() {
            return Ok(false);
        }
        self.buffer = filter_record_batch(&self.buffer, &mask)?;
        Ok(true)
    }
}

/// The join stage of a model: the two topics' rows in, the joined pairs out.
pub struct StreamJoin {
    ctx: SessionContext,
    left: Side,
    right: Side,
    joined: LogicalPlan,
    output_schema: SchemaRef,
    lo: i64,
    hi: i64,
    changed: bool,
    committed: JoinFiles,
    pending: Option<JoinFiles>,
}

impl std::fmt::Debug for StreamJoin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamJoin")
            .field("left", &self.left.buffer.num_rows())
            .field("right", &self.right.buffer.num_rows())
            .finish_non_exhaustive()
    }
}

impl StreamJoin {
    /// The join `found`, whose sides read the topic slots `left_source` and `right_source` in
    /// `ctx`; it emits batches of `output_schema` (the slot the rest of the plan reads).
    pub fn new(
        ctx: SessionContext,
        found: &StreamJoinMatch,
        left_source: Arc<MemTable>,
        right_source: Arc<MemTable>,
        output_schema: SchemaRef,
    ) -> Result<StreamJoin> {
        let join = &found.join;
        let (left, left_scan) = Side::new(
            left_source,
            &join.left,
            "kappa_join_left",
            &found.bound.left,
        )?;
        let (right, right_scan) = Side::new(
            right_source,
            &join.right,
            "kappa_join_right",
            &found.bound.right,
        )?;
        let mut over_buffers = join.clone();
        over_buffers.left = Arc::new(left_scan);
        over_buffers.right = Arc::new(right_scan);
        Ok(StreamJoin {
            ctx,
            left,
            right,
            joined: LogicalPlan::Join(over_buffers),
            output_schema,
            lo: found.bound.lo_us,
            hi: found.bound.hi_us,
            changed: false,
            committed: JoinFiles::default(),
            pending: None,
        })
    }

    /// The schema of the rows it emits.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// Takes one micro-batch of each topic's records that are not late and the topics'
    /// watermarks; returns the pairs that met.
    pub async fn push(
        &mut self,
        left: RecordBatch,
        right: RecordBatch,
        left_watermark: Option<i64>,
        right_watermark: Option<i64>,
    ) -> Result<RecordBatch> {
        let new_left = self.left.rows(&self.ctx, left).await?;
        let new_right = self.right.rows(&self.ctx, right).await?;
        let mut out = Vec::new();
        if new_left.num_rows() > 0 {
            let rights = concat_batches(&self.right.schema, [&self.right.buffer, &new_right])?;
            out.extend(self.join(new_left.clone(), rights).await?);
        }
        if new_right.num_rows() > 0 && self.left.buffer.num_rows() > 0 {
            out.extend(
                self.join(self.left.buffer.clone(), new_right.clone())
                    .await?,
            );
        }
        if new_left.num_rows() > 0 {
            self.left.buffer = concat_batches(&self.left.schema, [&self.left.buffer, &new_left])?;
            self.left.fresh.push(new_left);
            self.changed = true;
        }
        if new_right.num_rows() > 0 {
            self.right.buffer =
                concat_batches(&self.right.schema, [&self.right.buffer, &new_right])?;
            self.right.fresh.push(new_right);
            self.changed = true;
        }
        // A left row meets future right rows (t ≥ W_right) while l + hi ≥ W_right; a right row
        // meets future left rows (t ≥ W_left) while r − lo ≥ W_left.
        let hi = self.hi;
        let lo = self.lo;
        if let Some(w) = right_watermark {
            self.changed |= self.left.expire(|t| t.saturating_add(hi) >= w)?;
        }
        if let Some(w) = left_watermark {
            self.changed |= self.right.expire(|t| t.saturating_sub(lo) >= w)?;
        }
        Ok(concat_batches(&self.output_schema, &out)?)
    }

    async fn join(&self, left: RecordBatch, right: RecordBatch) -> Result<Vec<RecordBatch>> {
        *self.left.slot.batches[0].write().await = vec![left];
        *self.right.slot.batches[0].write().await = vec![right];
        let out = DataFrame::new(self.ctx.state(), self.joined.clone())
            .collect()
            .await;
        self.left.slot.batches[0].write().await.clear();
        self.right.slot.batches[0].write().await.clear();
        out?.iter()
            .map(|b| crate::stateless::to_storable(b, &self.output_schema))
            .collect()
    }

    /// The rows each side keeps, for tests and status.
    pub fn buffered(&self) -> (usize, usize) {
        (self.left.buffer.num_rows(), self.right.buffer.num_rows())
    }

    /// Whether the state changed since the last checkpoint.
    pub fn has_changes(&self) -> bool {
        self.changed
    }

    /// Writes the buffers as files of `table` (when they changed) and returns the property
    /// naming them, to commit with the model's next snapshot.
    pub async fn checkpoint(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
    ) -> std::result::Result<(String, String), LakehouseError> {
        let mut files = self.committed.clone();
        if self.changed {
            save(lakehouse, table, &self.left, "join-left", &mut files.left).await?;
            save(
                lakehouse,
                table,
                &self.right,
                "join-right",
                &mut files.right,
            )
            .await?;
        }
        let property = serde_json::to_string(&files).unwrap_or_default();
        self.pending = Some(files);
        Ok((JOIN_PROPERTY.to_owned(), property))
    }

    /// The checkpoint was committed.
    pub fn landed(&mut self) {
        if let Some(files) = self.pending.take() {
            self.committed = files;
        }
        self.changed = false;
        self.left.fresh.clear();
        self.right.fresh.clear();
    }

    /// Takes the buffers the table's current snapshot (`properties`) names.
    pub async fn restore(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        properties: Option<&HashMap<String, String>>,
    ) -> std::result::Result<(), LakehouseError> {
        self.pending = None;
        self.changed = false;
        self.committed = crate::commit_record::summary_json(properties, JOIN_PROPERTY)?;
        for (side, files) in [
            (&mut self.left, &self.committed.left),
            (&mut self.right, &self.committed.right),
        ] {
            side.fresh.clear();
            let mut batches = Vec::new();
            for location in files.locations() {
                for batch in lakehouse.read_state(table, location).await? {
                    batches.push(crate::stateless::to_storable(&batch, &side.schema).map_err(df)?);
                }
            }
            side.buffer = concat_batches(&side.schema, &batches).map_err(|e| df(e.into()))?;
        }
        Ok(())
    }
}

/// Records a side's new rows in `files` (see [`DeltaFiles::record`]).
async fn save(
    lakehouse: &Lakehouse,
    table: &Table,
    side: &Side,
    label: &str,
    files: &mut DeltaFiles,
) -> std::result::Result<(), LakehouseError> {
    files
        .record(
            lakehouse,
            table,
            label,
            &side.schema,
            || Ok(side.buffer.clone()),
            || Ok(side.fresh.clone()),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_have_a_fixed_length_or_none() {
        use arrow::datatypes::IntervalMonthDayNano;
        let hour = ScalarValue::IntervalMonthDayNano(Some(IntervalMonthDayNano::new(
            0,
            0,
            3_600_000_000_000,
        )));
        assert_eq!(duration_us(&hour), Some(3_600_000_000));
        let month = ScalarValue::IntervalMonthDayNano(Some(IntervalMonthDayNano::new(1, 0, 0)));
        assert_eq!(duration_us(&month), None);
        assert_eq!(
            duration_us(&ScalarValue::DurationSecond(Some(2))),
            Some(2_000_000)
        );
    }
}
