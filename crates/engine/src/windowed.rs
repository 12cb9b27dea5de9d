//! Event-time windows: a GROUP BY whose keys include a window of the event-time column —
//! tumbling (`date_bin(INTERVAL '1 minute', ts)`, `date_trunc('hour', ts)`) or hopping
//! (`unnest(hop(ts, slide, size))`) — appended once per window when the watermark passes its
//! end.
//!
//! ```text
//!  records that are not late (see `watermark`) ─► their window(s) [start, start + size)
//!                                                 ─► accumulators of that window
//!  a window with start + size ≤ watermark is closed: evaluated, appended, forgotten
//! ```
//!
//! State is bounded by the open windows: those ending after the watermark. All open windows'
//! groups live in one set keyed by (window start, other keys), so a micro-batch spanning
//! thousands of windows (a replay) is one update of DataFusion's accumulators, not one per
//! window; closing windows splits the set once per watermark advance that passes a window end.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef, TimeUnit, TimestampMicrosecondType};
use datafusion::common::{Column, ScalarValue};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::prelude::SessionContext;
use kappa_lakehouse::{Lakehouse, LakehouseError, Table};

use crate::aggregate::{AggregatePlan, GroupSet};
use crate::functions::interval_micros;
use crate::grouped::df;

/// Snapshot property: the state file of the open windows.
pub const WINDOWS_PROPERTY: &str = "kappa.windows";

/// Which group key is the window, and how long windows last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowKey {
    /// Index among the GROUP BY keys.
    pub key: usize,
    /// Window length in microseconds.
    pub size: i64,
}

/// One windowed GROUP BY model.
pub struct WindowedModel {
    plan: AggregatePlan,
    window: WindowKey,
    /// The groups of every open window.
    open: GroupSet,
    /// The starts of the open windows.
    starts: BTreeSet<i64>,
    /// Rows of windows closed since the last commit.
    closed: Vec<RecordBatch>,
    dirty: bool,
}

impl std::fmt::Debug for WindowedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowedModel")
            .field("window", &self.window)
            .field("open_windows", &self.starts.len())
            .finish_non_exhaustive()
    }
}

/// What a group key is made of, as far as windows care.
enum Traced {
    /// A column of the source topic.
    Source(String),
    /// A tumbling window start over a traced instant.
    Tumble {
        size: i64,
        of: Box<Traced>,
    },
    /// The list of hopping window starts over a traced instant.
    HopList {
        size: i64,
        of: Box<Traced>,
    },
    /// One element of an unnested list.
    Unnested(Box<Traced>),
    Other,
}

/// The window among `aggregate`'s group keys over the source column `event_time`, if any.
/// Errors when a key is a window over another column, or there are two windows.
pub fn window_key(
    aggregate: &datafusion::logical_expr::Aggregate,
    event_time: &str,
) -> std::result::Result<Option<WindowKey>, String> {
    let mut found = None;
    for (i, e) in aggregate.group_expr.iter().enumerate() {
        let (size, of) = match trace(e, &aggregate.input) {
            Traced::Tumble { size, of } => (size, of),
            Traced::Unnested(inner) => match *inner {
                Traced::HopList { size, of } => (size, of),
                _ => continue,
            },
            _ => continue,
        };
        match *of {
            Traced::Source(column) if column == event_time => {}
            Traced::Source(column) => {
                return Err(format!(
                    "the window is over `{column}`, but the event time is `{event_time}`"
                ));
            }
            _ => continue,
        }
        if found.is_some() {
            return Err("a GROUP BY has at most one window".into());
        }
        found = Some(WindowKey { key: i, size });
    }
    Ok(found)
}

fn trace(expr: &Expr, plan: &LogicalPlan) -> Traced {
    match expr {
        Expr::Alias(a) => trace(&a.expr, plan),
        Expr::Cast(c) if matches!(c.data_type, DataType::Timestamp(..)) => trace(&c.expr, plan),
        Expr::Column(c) => trace_column(c, plan),
        Expr::ScalarFunction(f) => {
            let name = f.func.name();
            let args = &f.args;
            match (name, args.as_slice()) {
                (
                    "date_bin",
                    [
                        Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(i)), _),
                        ts,
                        ..,
                    ],
                ) => match interval_micros(*i) {
                    Some(size) if size > 0 => Traced::Tumble {
                        size,
                        of: Box::new(trace(ts, plan)),
                    },
                    _ => Traced::Other,
                },
                ("date_trunc", [Expr::Literal(unit, _), ts]) => {
                    let unit = match unit {
                        ScalarValue::Utf8(Some(u))
                        | ScalarValue::Utf8View(Some(u))
                        | ScalarValue::LargeUtf8(Some(u)) => u.to_lowercase(),
                        _ => return Traced::Other,
                    };
                    let size: i64 = match unit.as_str() {
                        "second" => 1_000_000,
                        "minute" => 60_000_000,
                        "hour" => 3_600_000_000,
                        "day" => 86_400_000_000,
                        "week" => 7 * 86_400_000_000,
                        _ => return Traced::Other,
                    };
                    Traced::Tumble {
                        size,
                        of: Box::new(trace(ts, plan)),
                    }
                }
                (
                    "hop",
                    [
                        ts,
                        Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(_)), _),
                        Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(size)), _),
                    ],
                ) => match interval_micros(*size) {
                    Some(size) if size > 0 => Traced::HopList {
                        size,
                        of: Box::new(trace(ts, plan)),
                    },
                    _ => Traced::Other,
                },
                _ => Traced::Other,
            }
        }
        _ => Traced::Other,
    }
}

/// Follows a column down to what defines it.
fn trace_column(column: &Column, plan: &LogicalPlan) -> Traced {
    match plan {
        LogicalPlan::Projection(p) => match p.schema.index_of_column(column) {
            Ok(i) => trace(&p.expr[i], &p.input),
            Err(_) => Traced::Other,
        },
        LogicalPlan::Filter(f) => trace_column(column, &f.input),
        LogicalPlan::SubqueryAlias(a) => match a.schema.index_of_column(column) {
            Ok(i) => {
                let (qualifier, field) = a.input.schema().qualified_field(i);
                trace_column(&Column::from((qualifier, field)), &a.input)
            }
            Err(_) => Traced::Other,
        },
        LogicalPlan::Unnest(u) => {
            let Ok(i) = u.schema.index_of_column(column) else {
                return Traced::Other;
            };
            let Some(&j) = u.dependency_indices.get(i) else {
                return Traced::Other;
            };
            let (qualifier, field) = u.input.schema().qualified_field(j);
            let inner = trace_column(&Column::from((qualifier, field)), &u.input);
            if u.list_type_columns.iter().any(|(index, _)| *index == j) {
                Traced::Unnested(Box::new(inner))
            } else {
                inner
            }
        }
        LogicalPlan::TableScan(_) => Traced::Source(column.name.clone()),
        _ => Traced::Other,
    }
}

impl WindowedModel {
    /// A windowed model from its analyzed `plan` (input `input_slot` in `ctx`) whose window is
    /// over the source column `event_time`. `None` when no GROUP BY key is a window.
    pub fn from_plan(
        ctx: SessionContext,
        input_slot: Arc<MemTable>,
        plan: LogicalPlan,
        event_time: &str,
    ) -> Result<Option<WindowedModel>> {
        let plan = AggregatePlan::new(ctx, input_slot, plan)?;
        let window = window_key(&plan.aggregate, event_time).map_err(crate::error::unsupported)?;
        let Some(window) = window else {
            return Ok(None);
        };
        let open = plan.empty_set()?;
        Ok(Some(WindowedModel {
            plan,
            window,
            open,
            starts: BTreeSet::new(),
            closed: Vec::new(),
            dirty: false,
        }))
    }

    /// The schema of the model's table.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.plan.output_schema
    }

    /// Folds one micro-batch of records that are not late into their windows, then closes the
    /// windows `watermark` has passed.
    pub async fn push(&mut self, batch: RecordBatch, watermark: Option<i64>) -> Result<()> {
        for batch in self.plan.input(batch).await? {
            self.fold(&batch)?;
        }
        self.dirty = true;
        if let Some(watermark) = watermark {
            self.close_windows(watermark).await?;
        }
        Ok(())
    }

    fn fold(&mut self, batch: &RecordBatch) -> Result<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let keys = self.plan.keys(batch)?;
        let starts = window_starts(&keys[self.window.key])?;
        let arguments = self.plan.arguments(batch)?;
        let mut members = Vec::with_capacity(n);
        let mut last = None;
        for (i, start) in starts.iter().enumerate() {
            let Some(start) = *start else {
                continue;
            };
            if last != Some(start) {
                self.starts.insert(start);
                last = Some(start);
            }
            members
                .push(u32::try_from(i).map_err(|_| {
                    DataFusionError::Execution("a micro-batch over 4G rows".into())
                })?);
        }
        self.open
            .update(&keys, &members, members.len() == n, &arguments)
    }

    /// Evaluates and forgets every window the watermark has passed: the open set is split in
    /// two, once, whatever the number of windows closing.
    async fn close_windows(&mut self, watermark: i64) -> Result<()> {
        let size = self.window.size;
        let closes = |start: i64| start.saturating_add(size) <= watermark;
        if !self.starts.first().is_some_and(|s| closes(*s)) {
            return Ok(());
        }
        let (state, values) = self.open.evaluate(&self.plan, false)?;
        let starts = window_starts(state.column(self.window.key))?;
        let (mut closed, mut open) = (Vec::new(), Vec::new());
        for (i, start) in starts.iter().enumerate() {
            let i = u32::try_from(i)
                .map_err(|_| DataFusionError::Execution("over 4G open groups".into()))?;
            match start {
                Some(start) if !closes(*start) => open.push(i),
                _ => closed.push(i),
            }
        }
        if !open.is_empty() {
            self.open.load(&self.plan, &state, Some(&open))?;
        }
        self.starts.retain(|start| !closes(*start));
        // Every closed window's values go through the plan above the aggregate at once: one
        // query per micro-batch, not one per window (a year of 1-minute windows is 525,600).
        if !closed.is_empty() {
            let values = take_rows(&values, &closed)?;
            let rows = self.plan.output(values).await?;
            self.closed.extend(rows);
        }
        Ok(())
    }

    /// Whether a commit has something to write.
    pub fn has_changes(&self) -> bool {
        self.dirty || !self.closed.is_empty()
    }

    /// Appends the rows of the windows closed since the last commit and saves the open windows,
    /// in one snapshot with `properties`. On error the outcome is unknown: the
    /// caller reads the table and calls [`WindowedModel::landed`] or [`WindowedModel::restore`].
    pub async fn commit(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        mut properties: HashMap<String, String>,
    ) -> Result<Table, LakehouseError> {
        let files = if self.closed.is_empty() {
            Vec::new()
        } else {
            lakehouse.write_data_files(table, &self.closed, "").await?
        };
        if self.open.len() > 0 {
            let (state, _) = self.open.evaluate(&self.plan, true).map_err(df)?;
            let location = lakehouse
                .write_state(table, "windows", &self.plan.state_schema, &[state])
                .await?;
            properties.insert(WINDOWS_PROPERTY.to_owned(), location);
        }
        let table = lakehouse.append_files(table, files, properties).await?;
        self.landed();
        Ok(table)
    }

    /// The last commit landed.
    pub fn landed(&mut self) {
        self.closed.clear();
        self.dirty = false;
        self.open.dirty = false;
    }

    /// Takes the open windows the table's current snapshot (`properties`) names, dropping
    /// everything not committed.
    pub async fn restore(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        properties: Option<&HashMap<String, String>>,
    ) -> Result<(), LakehouseError> {
        self.closed.clear();
        self.open = self.plan.empty_set().map_err(df)?;
        self.starts.clear();
        self.dirty = false;
        let Some(location) = properties.and_then(|p| p.get(WINDOWS_PROPERTY)) else {
            return Ok(());
        };
        for batch in lakehouse.read_state(table, location).await? {
            let starts = window_starts(batch.column(self.window.key)).map_err(df)?;
            self.starts.extend(starts.into_iter().flatten());
            self.open.load(&self.plan, &batch, None).map_err(df)?;
        }
        self.open.dirty = false;
        Ok(())
    }
}

/// The rows `indices` of `batch`.
fn take_rows(batch: &RecordBatch, indices: &[u32]) -> Result<RecordBatch> {
    let indices = arrow::array::UInt32Array::from(indices.to_vec());
    let columns = batch
        .columns()
        .iter()
        .map(|c| arrow::compute::take(c, &indices, None))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

/// The window start of each row, in microseconds.
fn window_starts(column: &arrow::array::ArrayRef) -> Result<Vec<Option<i64>>> {
    let micros = cast(column, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
    let micros = micros.as_primitive::<TimestampMicrosecondType>();
    Ok((0..micros.len())
        .map(|i| (!micros.is_null(i)).then(|| micros.value(i)))
        .collect())
}

/// The source column `expr` is, traced through the plan below it (renames, projections,
/// filters), if it is one.
pub(crate) fn source_column(expr: &Expr, plan: &LogicalPlan) -> Option<String> {
    match trace(expr, plan) {
        Traced::Source(column) => Some(column),
        _ => None,
    }
}
