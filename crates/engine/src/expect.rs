//! Expectations as SQL: each one (`kappa_pipeline::expect`) is a query returning what fails —
//! the failing rows of a row-level check, the duplicated keys of `unique`, the orphan keys of
//! `relationships`, one row when `row_count` or `freshness` is out of bounds, the rows of a
//! `query`. It passes when the query returns nothing. `kappa test` runs them over the
//! published tables; the runner evaluates the row-level ones on every batch it commits
//! ([`RowChecks`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, StringArray};
use arrow::compute::{filter_record_batch, not, or_kleene};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::error::{DataFusionError, Result};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;
use kappa_pipeline::expect::{Check, Expectation, Severity};

/// The column of a quarantine table naming the expectations a row failed.
pub const FAILED_COLUMN: &str = "_failed_expectations";

/// `name` quoted as a SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The SQL boolean a row passes a row-level check by (never NULL), or `None` for a
/// table-level one.
pub fn row_passes_sql(check: &Check) -> Option<String> {
    Some(match check {
        Check::NotNull { column } => format!("{} IS NOT NULL", ident(column)),
        Check::AcceptedValues { column, values } => {
            let c = ident(column);
            format!("({c} IS NULL OR {c} IN ({}))", values.join(", "))
        }
        Check::Range { column, min, max } => {
            let c = ident(column);
            let mut bounds = Vec::new();
            if let Some(min) = min {
                bounds.push(format!("{c} >= {min}"));
            }
            if let Some(max) = max {
                bounds.push(format!("{c} <= {max}"));
            }
            format!("({c} IS NULL OR ({}))", bounds.join(" AND "))
        }
        Check::Row { sql } => format!("(({sql}) IS NOT FALSE)"),
        _ => return None,
    })
}

/// The query returning what fails `check` in `table` (a `layer.name` SQL can read).
pub fn failing_sql(table: &str, check: &Check) -> String {
    if let Some(passes) = row_passes_sql(check) {
        return format!("SELECT * FROM {table} WHERE NOT {passes}");
    }
    match check {
        Check::Unique { columns } => {
            let cols: Vec<String> = columns.iter().map(|c| ident(c)).collect();
            let cols = cols.join(", ");
            let present: Vec<String> = columns
                .iter()
                .map(|c| format!("{} IS NOT NULL", ident(c)))
                .collect();
            format!(
                "SELECT {cols}, count(*) AS copies FROM {table} WHERE {} GROUP BY {cols} HAVING \
                 count(*) > 1",
                present.join(" AND ")
            )
        }
        Check::Relationships { column, to, field } => {
            let c = ident(column);
            let f = ident(field);
            format!(
                "SELECT * FROM {table} WHERE {c} IS NOT NULL AND {c} NOT IN (SELECT {f} FROM {to} \
                 WHERE {f} IS NOT NULL)"
            )
        }
        Check::RowCount { min, max } => {
            let mut out = Vec::new();
            if let Some(min) = min {
                out.push(format!("count(*) < {min}"));
            }
            if let Some(max) = max {
                out.push(format!("count(*) > {max}"));
            }
            format!(
                "SELECT count(*) AS row_count FROM {table} HAVING {}",
                out.join(" OR ")
            )
        }
        Check::Freshness { column, max_age_ms } => {
            let c = ident(column);
            format!(
                "SELECT max({c}) AS newest FROM {table} HAVING max({c}) IS NULL OR max({c}) < \
                 now() - INTERVAL '{max_age_ms} milliseconds'"
            )
        }
        Check::Query { sql } => sql.clone(),
        // Row-level checks returned above.
        Check::NotNull { .. }
        | Check::AcceptedValues { .. }
        | Check::Range { .. }
        | Check::Row { .. } => String::new(),
    }
}

/// The row-level expectations of a model, compiled against its output schema and evaluated on
/// each batch it commits.
#[derive(Debug)]
pub struct RowChecks {
    checks: Vec<(Expectation, Arc<dyn PhysicalExpr>)>,
    quarantine_schema: SchemaRef,
}

/// What the row-level expectations made of a batch.
#[derive(Debug, Default)]
pub struct Checked {
    /// The rows that go on to the table.
    pub kept: Vec<RecordBatch>,
    /// The rows a `drop` expectation failed, with the names of every one they failed.
    pub quarantined: Vec<RecordBatch>,
    /// Failing rows per expectation (of every severity).
    pub failures: BTreeMap<String, u64>,
}

impl Checked {
    /// The `fail` expectations that failed, with their counts.
    pub fn blocking(&self, checks: &RowChecks) -> Vec<(String, u64)> {
        checks
            .checks
            .iter()
            .filter(|(e, _)| e.severity == Severity::Fail)
            .filter_map(|(e, _)| self.failures.get(&e.name).map(|n| (e.name.clone(), *n)))
            .collect()
    }
}

impl RowChecks {
    /// Compiles `expectations`' row-level checks for batches of `schema`; `None` when there are
    /// none. An error names the expectation whose SQL does not fit the model.
    pub fn new(
        ctx: &SessionContext,
        schema: &SchemaRef,
        expectations: &[Expectation],
    ) -> Result<Option<RowChecks>> {
        let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
        let mut checks = Vec::new();
        for e in expectations {
            let Some(sql) = row_passes_sql(&e.check) else {
                continue;
            };
            let compiled = ctx
                .parse_sql_expr(&sql, &df_schema)
                .and_then(|expr| ctx.create_physical_expr(expr, &df_schema))
                .map_err(|err| {
                    DataFusionError::Configuration(format!(
                        "expectation `{}` ({}): {}",
                        e.name,
                        e.check.kind(),
                        err.strip_backtrace()
                    ))
                })?;
            checks.push((e.clone(), compiled));
        }
        if checks.is_empty() {
            return Ok(None);
        }
        let mut fields: Vec<Arc<Field>> = schema.fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new(FAILED_COLUMN, DataType::Utf8, false)));
        Ok(Some(RowChecks {
            checks,
            quarantine_schema: Arc::new(Schema::new(fields)),
        }))
    }

    /// The schema of the model's quarantine table: its columns and [`FAILED_COLUMN`].
    pub fn quarantine_schema(&self) -> &SchemaRef {
        &self.quarantine_schema
    }

    /// Whether any expectation drops rows (the model has a quarantine table).
    pub fn drops(&self) -> bool {
        self.checks
            .iter()
            .any(|(e, _)| e.severity == Severity::Drop)
    }

    /// Checks `batches`: counts every expectation's failing rows, and sets aside the rows
    /// failing a `drop` expectation.
    pub fn check(&self, batches: Vec<RecordBatch>) -> Result<Checked> {
        let mut out = Checked::default();
        for batch in batches {
            if batch.num_rows() == 0 {
                continue;
            }
            let mut dropped: Option<BooleanArray> = None;
            let mut failed_names: Vec<(String, BooleanArray)> = Vec::new();
            for (e, expr) in &self.checks {
                let passes = expr.evaluate(&batch)?.into_array(batch.num_rows())?;
                let passes = passes
                    .as_any()
                    .downcast_ref::<BooleanArray>()
                    .ok_or_else(|| {
                        DataFusionError::Execution(format!(
                            "expectation `{}` is not a boolean",
                            e.name
                        ))
                    })?;
                // NULL counts as passing (the SQL says IS NOT FALSE already).
                let fails = not(&fill_true(passes))?;
                let count = fails.true_count() as u64;
                if count == 0 {
                    continue;
                }
                *out.failures.entry(e.name.clone()).or_default() += count;
                if e.severity == Severity::Drop {
                    dropped = Some(match dropped {
                        None => fails.clone(),
                        Some(d) => or_kleene(&d, &fails)?,
                    });
                    failed_names.push((e.name.clone(), fails));
                }
            }
            let Some(dropped) = dropped else {
                out.kept.push(batch);
                continue;
            };
            out.kept.push(filter_record_batch(&batch, &not(&dropped)?)?);
            let names: StringArray = (0..batch.num_rows())
                .map(|row| {
                    let names: Vec<&str> = failed_names
                        .iter()
                        .filter(|(_, fails)| fails.value(row))
                        .map(|(n, _)| n.as_str())
                        .collect();
                    Some(names.join(","))
                })
                .collect();
            let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
            columns.push(Arc::new(names));
            let with_names = RecordBatch::try_new(self.quarantine_schema.clone(), columns)?;
            out.quarantined
                .push(filter_record_batch(&with_names, &dropped)?);
        }
        Ok(out)
    }
}

/// `passes` with NULL read as true.
fn fill_true(passes: &BooleanArray) -> BooleanArray {
    if passes.null_count() == 0 {
        return passes.clone();
    }
    passes.iter().map(|v| Some(v.unwrap_or(true))).collect()
}

/// One expectation checked over a table.
#[derive(Debug, Clone)]
pub struct Audited {
    pub expectation: Expectation,
    /// What the check returned (failing rows, duplicated keys, 1 for a table-wide bound).
    pub failing: u64,
    /// Up to the asked number of what failed.
    pub sample: Vec<RecordBatch>,
    /// The check could not run.
    pub error: Option<String>,
}

impl Audited {
    /// `e` found failing `failing` times without a query (no sample).
    pub fn counted(e: &Expectation, failing: u64) -> Audited {
        Audited {
            expectation: e.clone(),
            failing,
            sample: Vec::new(),
            error: None,
        }
    }

    /// Whether it blocks publication: a `fail` expectation that failed or could not run.
    pub fn blocks(&self) -> bool {
        self.expectation.severity == Severity::Fail && (self.failing > 0 || self.error.is_some())
    }

    /// `expectation `x` (kind) failed on N rows`, or why it could not run.
    pub fn describe(&self) -> String {
        match &self.error {
            Some(e) => format!(
                "expectation `{}` ({}) could not run: {e}",
                self.expectation.name,
                self.expectation.check.kind()
            ),
            None => format!(
                "expectation `{}` ({}) failed: {} failing",
                self.expectation.name,
                self.expectation.check.kind(),
                self.failing
            ),
        }
    }
}

/// Runs `model`'s expectations over `table` at snapshot `at` — by default its newest (the
/// audit branch's head when one waits) — as `layer.name`; `skip_row_level` leaves out the
/// row-level ones (the runner counted them on the rows it wrote). With `samples`, keeps that
/// many failing rows of each.
pub async fn audit(
    lakehouse: &kappa_lakehouse::Lakehouse,
    model: &kappa_pipeline::Model,
    table: &kappa_lakehouse::Table,
    at: Option<i64>,
    skip_row_level: bool,
    samples: usize,
) -> kappa_lakehouse::Result<Vec<Audited>> {
    let ctx = lakehouse
        .audit_session(&model.layer, &model.name, table, at)
        .await?;
    let name = format!("{}.{}", model.layer, model.name);
    let mut out = Vec::new();
    for e in &model.config.expectations {
        if skip_row_level && e.check.is_row_level() {
            continue;
        }
        out.push(count_failing(&ctx, &failing_sql(&name, &e.check), e, samples).await);
    }
    Ok(out)
}

/// Runs `sql`, the query returning what fails `e`, in `ctx`: how much it returns and, with
/// `samples`, up to that many of it.
pub async fn count_failing(
    ctx: &SessionContext,
    sql: &str,
    e: &Expectation,
    samples: usize,
) -> Audited {
    let counted = async {
        let batches = ctx
            .sql(&format!("SELECT count(*) FROM ({sql}) AS failing"))
            .await?
            .collect()
            .await?;
        let failing = batches
            .first()
            .filter(|b| b.num_rows() > 0)
            .and_then(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .map(|a| a.value(0))
            })
            .unwrap_or(0);
        let failing = u64::try_from(failing).unwrap_or(0);
        let sample = if samples > 0 && failing > 0 {
            ctx.sql(&format!("SELECT * FROM ({sql}) AS failing LIMIT {samples}"))
                .await?
                .collect()
                .await?
        } else {
            Vec::new()
        };
        Ok::<_, DataFusionError>((failing, sample))
    };
    match counted.await {
        Ok((failing, sample)) => Audited {
            expectation: e.clone(),
            failing,
            sample,
            error: None,
        },
        Err(err) => Audited {
            expectation: e.clone(),
            failing: 0,
            sample: Vec::new(),
            error: Some(err.strip_backtrace()),
        },
    }
}

/// Whether `model`'s commits wait on the audit branch: it has a table-level expectation, or
/// one that blocks publication.
pub fn audits_commits(model: &kappa_pipeline::Model) -> bool {
    model
        .config
        .expectations
        .iter()
        .any(|e| !e.check.is_row_level() || e.severity == Severity::Fail)
}

/// `plan` (of `model`, a row-by-row model) without the rows its `drop` expectations set aside:
/// what its table holds, for the models that recompute it inline.
pub fn without_dropped(
    ctx: &SessionContext,
    plan: datafusion::logical_expr::LogicalPlan,
    model: &kappa_pipeline::Model,
) -> Result<datafusion::logical_expr::LogicalPlan> {
    let mut keep: Option<datafusion::logical_expr::Expr> = None;
    for e in &model.config.expectations {
        if e.severity != Severity::Drop {
            continue;
        }
        let Some(sql) = row_passes_sql(&e.check) else {
            continue;
        };
        let passes = ctx.parse_sql_expr(&sql, plan.schema())?;
        keep = Some(match keep {
            None => passes,
            Some(k) => k.and(passes),
        });
    }
    match keep {
        None => Ok(plan),
        Some(keep) => datafusion::logical_expr::LogicalPlanBuilder::from(plan)
            .filter(keep)?
            .build(),
    }
}

/// What `check` returns over an empty table: a minimum row count and freshness fail (one row
/// each), the rest pass.
pub fn fails_when_empty(check: &Check) -> u64 {
    match check {
        Check::RowCount { min: Some(min), .. } if *min > 0 => 1,
        Check::Freshness { .. } => 1,
        _ => 0,
    }
}

/// How an expectation of `severity` that returned `failing` rows (or could not run) reads in a
/// report: `pass`, `warn` (failed, not blocking), `fail` or `error`.
pub fn result_of(severity: Severity, failing: u64, errored: bool) -> &'static str {
    match (errored, failing, severity) {
        (true, ..) => "error",
        (false, 0, _) => "pass",
        (false, _, Severity::Fail) => "fail",
        (false, ..) => "warn",
    }
}
