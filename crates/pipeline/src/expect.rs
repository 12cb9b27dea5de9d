//! Data-quality expectations: `[[expect]]` tables in a model's TOML.
//!
//! ```toml
//! [[expect]]
//! not_null = "order_id"            # severity "fail" unless it says otherwise
//!
//! [[expect]]
//! name = "known_status"
//! accepted_values = { column = "status", values = ["new", "paid", "shipped"] }
//! severity = "drop"                # the row goes to the model's quarantine table
//!
//! [[expect]]
//! range = { column = "amount", min = 0, max = 100000 }
//! severity = "warn"
//! ```
//!
//! Row-level kinds (`not_null`, `accepted_values`, `range`, `row`) say of each row whether it
//! passes; table-level kinds (`unique`, `relationships`, `row_count`, `freshness`, `query`)
//! say it of the whole table. Every kind is also a query counting what fails (the engine's
//! `expect` module), which `kappa test` runs over the published tables.

use serde::Deserialize;
use toml::Spanned;

use crate::diagnostic::Diagnostic;

/// What happens when an expectation fails.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Recorded and alerted; the rows are published.
    Warn,
    /// Row-level only: the failing rows go to the model's quarantine table, the rest on.
    Drop,
    /// Publication is blocked until the data passes or someone decides.
    Fail,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warn => "warn",
            Severity::Drop => "drop",
            Severity::Fail => "fail",
        }
    }
}

/// One expectation of a model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Expectation {
    /// Unique within the model: given, or `<kind>_<column>`.
    pub name: String,
    pub severity: Severity,
    pub check: Check,
}

/// What an expectation checks. Values are SQL literals (`'paid'`, `42`, `TIMESTAMP '…'`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    NotNull {
        column: String,
    },
    /// NULL passes (say `not_null` as well to refuse it).
    AcceptedValues {
        column: String,
        values: Vec<String>,
    },
    /// Inclusive bounds; NULL passes.
    Range {
        column: String,
        min: Option<String>,
        max: Option<String>,
    },
    /// A SQL boolean over the row's columns; a row fails when it is false (NULL passes).
    Row {
        sql: String,
    },
    /// No two rows share these columns' values (rows with a NULL among them are not compared).
    Unique {
        columns: Vec<String>,
    },
    /// Every non-NULL `column` value is a `field` value of the model `to`.
    Relationships {
        column: String,
        to: String,
        field: String,
    },
    RowCount {
        min: Option<u64>,
        max: Option<u64>,
    },
    /// The newest `column` value (event time) is at most `max_age_ms` old.
    Freshness {
        column: String,
        max_age_ms: u64,
    },
    /// A SQL query over the tables returning the failing rows; it passes when none return.
    Query {
        sql: String,
    },
}

impl Check {
    /// Whether the check is decided row by row.
    pub fn is_row_level(&self) -> bool {
        matches!(
            self,
            Check::NotNull { .. }
                | Check::AcceptedValues { .. }
                | Check::Range { .. }
                | Check::Row { .. }
        )
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Check::NotNull { .. } => "not_null",
            Check::AcceptedValues { .. } => "accepted_values",
            Check::Range { .. } => "range",
            Check::Row { .. } => "row",
            Check::Unique { .. } => "unique",
            Check::Relationships { .. } => "relationships",
            Check::RowCount { .. } => "row_count",
            Check::Freshness { .. } => "freshness",
            Check::Query { .. } => "query",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawExpectation {
    name: Option<String>,
    severity: Option<Spanned<Severity>>,
    not_null: Option<String>,
    accepted_values: Option<RawAccepted>,
    range: Option<RawRange>,
    row: Option<String>,
    unique: Option<OneOrMany>,
    relationships: Option<RawRelationships>,
    row_count: Option<RawRowCount>,
    freshness: Option<RawFreshness>,
    query: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccepted {
    column: String,
    values: Vec<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRange {
    column: String,
    min: Option<toml::Value>,
    max: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelationships {
    column: String,
    to: String,
    field: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRowCount {
    min: Option<u64>,
    max: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFreshness {
    column: String,
    max_age: String,
}

/// A TOML value as a SQL literal, or why it cannot be one.
fn literal(value: &toml::Value) -> Result<String, String> {
    Ok(match value {
        toml::Value::String(s) => format!("'{}'", s.replace('\'', "''")),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) if f.is_finite() => format!("{f:?}"),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => format!("TIMESTAMP '{d}'"),
        other => return Err(format!("{other} is not a value a column holds")),
    })
}

/// Reads a model's `[[expect]]` tables; problems go to `diagnostics` (at `file`, whose text is
/// `text`) and leave the expectation out.
pub(crate) fn read(
    file: &str,
    text: &str,
    raws: Vec<Spanned<RawExpectation>>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<Expectation> {
    let mut out: Vec<Expectation> = Vec::new();
    for raw in raws {
        let at = raw.span().start;
        let raw = raw.into_inner();
        let mut problems: Vec<String> = Vec::new();
        let mut problem = |message: String| problems.push(message);
        let mut checks: Vec<(Check, String)> = Vec::new();
        if let Some(column) = raw.not_null {
            checks.push((
                Check::NotNull {
                    column: column.clone(),
                },
                column,
            ));
        }
        if let Some(a) = raw.accepted_values {
            match a.values.iter().map(literal).collect::<Result<Vec<_>, _>>() {
                Ok(values) if !values.is_empty() => checks.push((
                    Check::AcceptedValues {
                        column: a.column.clone(),
                        values,
                    },
                    a.column,
                )),
                Ok(_) => problem("accepted_values: `values` is empty".into()),
                Err(e) => problem(format!("accepted_values: {e}")),
            }
        }
        if let Some(r) = raw.range {
            let min = r.min.as_ref().map(literal).transpose();
            let max = r.max.as_ref().map(literal).transpose();
            match (min, max) {
                (Ok(None), Ok(None)) => problem("range: give `min`, `max` or both".into()),
                (Ok(min), Ok(max)) => checks.push((
                    Check::Range {
                        column: r.column.clone(),
                        min,
                        max,
                    },
                    r.column,
                )),
                (Err(e), _) | (_, Err(e)) => problem(format!("range: {e}")),
            }
        }
        if let Some(sql) = raw.row {
            checks.push((Check::Row { sql }, String::new()));
        }
        if let Some(columns) = raw.unique {
            let columns = match columns {
                OneOrMany::One(c) => vec![c],
                OneOrMany::Many(cs) => cs,
            };
            if columns.is_empty() {
                problem("unique: name at least one column".into());
            } else {
                let suffix = columns.join("_");
                checks.push((Check::Unique { columns }, suffix));
            }
        }
        if let Some(r) = raw.relationships {
            if r.to.split('.').count() != 2 {
                problem(format!(
                    "relationships: `to` names a model as layer.name, not `{}`",
                    r.to
                ));
            } else {
                checks.push((
                    Check::Relationships {
                        field: r.field.unwrap_or_else(|| r.column.clone()),
                        column: r.column.clone(),
                        to: r.to,
                    },
                    r.column,
                ));
            }
        }
        if let Some(c) = raw.row_count {
            if c.min.is_none() && c.max.is_none() {
                problem("row_count: give `min`, `max` or both".into());
            } else {
                checks.push((
                    Check::RowCount {
                        min: c.min,
                        max: c.max,
                    },
                    String::new(),
                ));
            }
        }
        if let Some(f) = raw.freshness {
            match humantime::parse_duration(&f.max_age) {
                Ok(d) => checks.push((
                    Check::Freshness {
                        column: f.column.clone(),
                        max_age_ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                    },
                    f.column,
                )),
                Err(e) => problem(format!(
                    "freshness: max_age `{}` is not a duration like \"1h\": {e}",
                    f.max_age
                )),
            }
        }
        if let Some(sql) = raw.query {
            checks.push((Check::Query { sql }, String::new()));
        }
        if !problems.is_empty() {
            for message in problems {
                diagnostics.push(Diagnostic::at_byte(file, text, at, message));
            }
            continue;
        }
        let mut problem = |message: String| {
            diagnostics.push(Diagnostic::at_byte(file, text, at, message));
        };
        let (check, column) = match checks.len() {
            1 => checks.remove(0),
            0 => {
                problem(
                    "an [[expect]] says what it checks: one of not_null, accepted_values, range, \
                     row, unique, relationships, row_count, freshness, query"
                        .into(),
                );
                continue;
            }
            _ => {
                let kinds: Vec<&str> = checks.iter().map(|(c, _)| c.kind()).collect();
                problem(format!(
                    "an [[expect]] checks one thing, this one {}: write one [[expect]] each",
                    kinds.join(" and ")
                ));
                continue;
            }
        };
        let severity = raw
            .severity
            .as_ref()
            .map_or(Severity::Fail, |s| *s.get_ref());
        if severity == Severity::Drop && !check.is_row_level() {
            let at = raw.severity.as_ref().map_or(at, |s| s.span().start);
            diagnostics.push(Diagnostic::at_byte(
                file,
                text,
                at,
                format!(
                    "severity \"drop\" routes failing rows to quarantine, but {} checks the whole \
                     table: use \"warn\" or \"fail\"",
                    check.kind()
                ),
            ));
            continue;
        }
        let name = raw.name.unwrap_or_else(|| {
            let base = if column.is_empty() {
                check.kind().to_owned()
            } else {
                format!("{}_{column}", check.kind())
            };
            // Unnamed repeats of one kind get a number.
            let mut name = base.clone();
            let mut n = 2;
            while out.iter().any(|e| e.name == name) {
                name = format!("{base}_{n}");
                n += 1;
            }
            name
        });
        if out.iter().any(|e| e.name == name) {
            diagnostics.push(Diagnostic::at_byte(
                file,
                text,
                at,
                format!("two expectations are named `{name}`; names say which one failed"),
            ));
            continue;
        }
        out.push(Expectation {
            name,
            severity,
            check,
        });
    }
    out
}
