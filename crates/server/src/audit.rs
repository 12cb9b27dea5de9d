//! The audit before a cutover: the old and the new version of a model, measured alike over the
//! same rows (their count and the sums of chosen columns), side by side.
//!
//! ```text
//!  [audit] columns, where, max_change      (the model's .toml; all numeric columns by default)
//!  SELECT count(*), sum(c1), … FROM <version table> WHERE <where>     old │ new │ change
//!  a change beyond max_change fails the deploy: the old versions keep serving
//! ```

use arrow::datatypes::DataType;
use kappa_lakehouse::{Lakehouse, TableIdent};
use kappa_pipeline::Audit;
use serde::{Deserialize, Serialize};

/// One model's audit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelAudit {
    pub model: String,
    /// The version serving until the cutover; absent for a new model.
    pub old_version: Option<String>,
    pub new_version: String,
    /// The predicate choosing the rows compared; absent: all rows.
    pub filter: Option<String>,
    pub measures: Vec<Measure>,
    /// Columns the new version has and the old one does not (measured in the new only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added_columns: Vec<String>,
    /// Columns the old version has and the new one does not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_columns: Vec<String>,
    /// Why the audit stops the cutover: a measure changed beyond `max_change`, or the audit
    /// could not be computed. Empty: the cutover may go on.
    pub failures: Vec<String>,
}

/// One measure of both versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measure {
    /// `rows` or `sum(column)`.
    pub name: String,
    /// The old version's value as SQL prints it (absent for a new model).
    pub old: Option<String>,
    pub new: String,
    /// `(new − old) / |old|`, when both are numbers and old is not zero.
    pub change: Option<f64>,
}

/// Measures `old` (absent for a new model) and `new` as `audit` says.
pub async fn audit(
    lakehouse: &Lakehouse,
    model: &str,
    audit: &Audit,
    old: Option<(&str, &TableIdent)>,
    new: (&str, &TableIdent),
) -> ModelAudit {
    let mut report = ModelAudit {
        model: model.to_owned(),
        old_version: old.map(|(version, _)| version.to_owned()),
        new_version: new.0.to_owned(),
        filter: audit.filter.clone(),
        measures: Vec::new(),
        added_columns: Vec::new(),
        removed_columns: Vec::new(),
        failures: Vec::new(),
    };
    if let Err(e) = measure(lakehouse, audit, old.map(|(_, t)| t), new.1, &mut report).await {
        report
            .failures
            .push(format!("the audit of {model} failed: {e}"));
    }
    report
}

async fn measure(
    lakehouse: &Lakehouse,
    audit: &Audit,
    old: Option<&TableIdent>,
    new: &TableIdent,
    report: &mut ModelAudit,
) -> Result<(), String> {
    // A version that has committed nothing (no input yet) has no table to measure: nothing
    // to compare is no reason to hold the cutover.
    if !written(lakehouse, new).await {
        return Ok(());
    }
    let old = match old {
        Some(table) if written(lakehouse, table).await => Some(table),
        _ => None,
    };
    let schema_of = |table: &TableIdent| {
        let sql = format!("SELECT * FROM {} LIMIT 0", sql_name(table));
        async move {
            let (schema, _) = lakehouse.query(&sql).await.map_err(|e| e.to_string())?;
            Ok::<Vec<(String, DataType)>, String>(
                schema
                    .fields()
                    .iter()
                    .map(|f| (f.name().clone(), f.data_type().clone()))
                    .collect(),
            )
        }
    };
    let new_fields = schema_of(new).await?;
    let old_fields = match old {
        Some(table) => Some(schema_of(table).await?),
        None => None,
    };
    let has = |fields: &[(String, DataType)], column: &str| fields.iter().any(|(n, _)| n == column);
    if let Some(old_fields) = &old_fields {
        report.added_columns = new_fields
            .iter()
            .filter(|(n, _)| !has(old_fields, n))
            .map(|(n, _)| n.clone())
            .collect();
        report.removed_columns = old_fields
            .iter()
            .filter(|(n, _)| !has(&new_fields, n))
            .map(|(n, _)| n.clone())
            .collect();
    }
    let columns: Vec<String> = if audit.columns.is_empty() {
        new_fields
            .iter()
            .filter(|(n, t)| {
                (t.is_numeric() || matches!(t, DataType::Decimal128(..))) && !identifies(n)
            })
            .map(|(n, _)| n.clone())
            .collect()
    } else {
        audit.columns.clone()
    };
    let filter = audit
        .filter
        .as_ref()
        .map(|f| format!(" WHERE {f}"))
        .unwrap_or_default();
    // The row count, then the sum of each of `columns` the table has (`None` for the others).
    let values = |table: &TableIdent, fields: &[(String, DataType)]| {
        let present: Vec<&String> = columns.iter().filter(|c| has(fields, c)).collect();
        let mut select = vec!["CAST(count(*) AS VARCHAR)".to_owned()];
        select.extend(
            present
                .iter()
                .map(|c| format!("CAST(sum(\"{}\") AS VARCHAR)", c.replace('"', "\"\""))),
        );
        let sql = format!(
            "SELECT {} FROM {}{filter}",
            select.join(", "),
            sql_name(table)
        );
        let shape: Vec<bool> = columns.iter().map(|c| has(fields, c)).collect();
        async move {
            let (schema, batches) = lakehouse.query(&sql).await.map_err(|e| e.to_string())?;
            let answer = crate::api::SqlResponse::from_batches(&schema, &batches)?;
            let row = answer.rows.into_iter().next().unwrap_or_default();
            let mut found = row.into_iter().map(|v| match v {
                serde_json::Value::String(s) => s,
                serde_json::Value::Null => "NULL".to_owned(),
                other => other.to_string(),
            });
            let rows = found.next();
            let mut out = vec![rows];
            for present in shape {
                out.push(if present { found.next() } else { None });
            }
            Ok::<Vec<Option<String>>, String>(out)
        }
    };
    let new_values = values(new, &new_fields).await?;
    let old_values = match (old, &old_fields) {
        (Some(table), Some(fields)) => Some(values(table, fields).await?),
        _ => None,
    };
    let names =
        std::iter::once("rows".to_owned()).chain(columns.iter().map(|c| format!("sum({c})")));
    for (i, name) in names.enumerate() {
        let Some(new) = new_values.get(i).cloned().flatten() else {
            return Err(format!(
                "the new version's table has no column `{}` to measure ([audit] columns); its \
                 columns are: {}",
                columns.get(i.wrapping_sub(1)).map_or("", String::as_str),
                new_fields
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        // A column the old version lacks has no old value (and no change).
        let old = old_values
            .as_ref()
            .and_then(|o| o.get(i).cloned().flatten());
        let change = old.as_deref().and_then(|old| relative_change(old, &new));
        if let (Some(limit), Some(change)) = (audit.max_change_bp, change)
            && change.abs() * 10_000.0 > limit as f64
        {
            report.failures.push(format!(
                "{name} changed by {:+.2} % ({} → {new}), more than max_change {:.2} %",
                change * 100.0,
                old.as_deref().unwrap_or(""),
                limit as f64 / 100.0
            ));
        }
        report.measures.push(Measure {
            name,
            old,
            new,
            change,
        });
    }
    Ok(())
}

/// Whether `table` exists and has a commit.
async fn written(lakehouse: &Lakehouse, table: &TableIdent) -> bool {
    matches!(lakehouse.last_commit(table).await, Ok(Some(_)))
}

/// A table's name in SQL: `namespace.name`.
fn sql_name(table: &TableIdent) -> String {
    format!("{}.{}", table.namespace().join("."), table.name())
}

/// `(new − old) / |old|` of two numbers as SQL prints them; none unless both are numbers and
/// old is not zero (a change from zero has no ratio).
fn relative_change(old: &str, new: &str) -> Option<f64> {
    let (old, new): (f64, f64) = (old.parse().ok()?, new.parse().ok()?);
    (old != 0.0 && old.is_finite() && new.is_finite()).then(|| (new - old) / old.abs())
}

/// A measure as people read it: a float's sum (`38911757.004203897`) to two decimals; exact
/// numbers (counts, decimals of up to five places) as SQL printed them.
fn shown(value: &str) -> String {
    match (value.split_once('.'), value.parse::<f64>()) {
        (Some((_, fraction)), Ok(number)) if fraction.len() > 5 && number.is_finite() => {
            format!("{number:.2}")
        }
        _ => value.to_owned(),
    }
}

impl ModelAudit {
    /// The audit as text: a header, then `measure  old  new  change` lines.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "audit of {} ({} → {}){}:\n",
            self.model,
            self.old_version.as_deref().unwrap_or("new"),
            self.new_version,
            self.filter
                .as_ref()
                .map(|f| format!(" where {f}"))
                .unwrap_or_default()
        );
        let width = self
            .measures
            .iter()
            .map(|m| m.name.len())
            .max()
            .unwrap_or(0);
        let old_width = self
            .measures
            .iter()
            .map(|m| m.old.as_deref().map_or(1, |v| shown(v).len()))
            .max()
            .unwrap_or(0)
            .max(3);
        let new_width = self
            .measures
            .iter()
            .map(|m| shown(&m.new).len())
            .max()
            .unwrap_or(0)
            .max(3);
        out.push_str(&format!(
            "  {:<width$}  {:>old_width$}  {:>new_width$}  change\n",
            "", "old", "new"
        ));
        for m in &self.measures {
            out.push_str(&format!(
                "  {:<width$}  {:>old_width$}  {:>new_width$}  {}\n",
                m.name,
                m.old.as_deref().map_or_else(|| "-".to_owned(), shown),
                shown(&m.new),
                m.change
                    .map(|c| format!("{:+.2} %", c * 100.0))
                    .unwrap_or_else(|| "-".into())
            ));
        }
        if !self.added_columns.is_empty() {
            out.push_str(&format!(
                "  new columns: {}\n",
                self.added_columns.join(", ")
            ));
        }
        if !self.removed_columns.is_empty() {
            out.push_str(&format!(
                "  removed columns: {}\n",
                self.removed_columns.join(", ")
            ));
        }
        for failure in &self.failures {
            out.push_str(&format!("  FAILED: {failure}\n"));
        }
        out
    }
}

/// Whether a column named `name` identifies rows rather than measures them (`id`, `…_id`,
/// `…_key`: order ids, surrogate keys): its sum means nothing, so a default audit leaves it out.
fn identifies(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name == "id" || name.ends_with("_id") || name == "key" || name.ends_with("_key")
}

#[cfg(test)]
mod tests {

    #[test]
    fn identifiers_are_not_summed_by_default() {
        for name in ["id", "order_id", "product_prices_key", "Customer_ID"] {
            assert!(identifies(name), "{name}");
        }
        for name in ["amount", "quantity", "ideal", "keys_held", "paid"] {
            assert!(!identifies(name), "{name}");
        }
    }

    use super::*;

    #[tokio::test]
    async fn versions_that_wrote_nothing_yet_are_not_a_failure() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let lakehouse = Lakehouse::open(dir.path()).await.expect("a lakehouse");
        let table = |name: &str| kappa_lakehouse::table_ident("gold", name).expect("a name");
        let (old, new) = (table("v1"), table("v2"));
        let strict = Audit {
            max_change_bp: Some(0),
            ..Audit::default()
        };
        let report = audit(
            &lakehouse,
            "gold.x",
            &strict,
            Some(("v1", &old)),
            ("v2", &new),
        )
        .await;
        assert_eq!(report.failures, Vec::<String>::new());
        assert!(report.measures.is_empty());
    }

    /// A new version that adds a column is compared on the columns both have; the new one is
    /// measured in the new version only and listed (it was a schema error naming the old
    /// version's table).
    #[tokio::test]
    async fn a_column_only_the_new_version_has_is_listed_not_an_error() {
        use arrow::array::{Int64Array, RecordBatch};
        use arrow::datatypes::{Field, Schema};
        use std::sync::Arc;

        let dir = tempfile::tempdir().expect("a temporary folder");
        let lakehouse = Lakehouse::open(dir.path()).await.expect("a lakehouse");
        let write = |name: &'static str, columns: &'static [&'static str]| {
            let lakehouse = lakehouse.clone();
            async move {
                let ident = kappa_lakehouse::table_ident("gold", name).expect("a name");
                let schema = Arc::new(Schema::new(
                    columns
                        .iter()
                        .map(|c| Field::new(*c, DataType::Int64, false))
                        .collect::<Vec<_>>(),
                ));
                let batch = RecordBatch::try_new(
                    schema.clone(),
                    columns
                        .iter()
                        .map(|_| Arc::new(Int64Array::from(vec![1, 2, 3])) as _)
                        .collect(),
                )
                .expect("a batch");
                let table = lakehouse
                    .ensure_table(&ident, &schema)
                    .await
                    .expect("a table");
                lakehouse
                    .append(&table, &[batch], Default::default())
                    .await
                    .expect("a commit");
                ident
            }
        };
        let old = write("v1", &["total"]).await;
        let new = write("v2", &["total", "biggest"]).await;
        let report = audit(
            &lakehouse,
            "gold.x",
            &Audit::default(),
            Some(("v1", &old)),
            ("v2", &new),
        )
        .await;
        assert_eq!(report.failures, Vec::<String>::new());
        assert_eq!(report.added_columns, ["biggest"]);
        let measured: Vec<(&str, Option<&str>, &str)> = report
            .measures
            .iter()
            .map(|m| (m.name.as_str(), m.old.as_deref(), m.new.as_str()))
            .collect();
        assert_eq!(
            measured,
            [
                ("rows", Some("3"), "3"),
                ("sum(total)", Some("6"), "6"),
                ("sum(biggest)", None, "6")
            ]
        );
    }

    #[test]
    fn float_sums_show_two_decimals_and_exact_numbers_as_they_are() {
        assert_eq!(shown("38911757.004203897"), "38911757.00");
        assert_eq!(shown("9.87220"), "9.87220");
        assert_eq!(shown("12"), "12");
        assert_eq!(shown("NULL"), "NULL");
    }

    #[test]
    fn changes_are_relative_to_the_old_value() {
        assert_eq!(relative_change("200", "250"), Some(0.25));
        assert_eq!(relative_change("-200", "-100"), Some(0.5));
        assert_eq!(relative_change("0", "5"), None);
        assert_eq!(relative_change("NULL", "5"), None);
    }

    #[test]
    fn an_audit_prints_side_by_side() {
        let audit = ModelAudit {
            model: "gold.revenue".into(),
            old_version: Some("c46e19e1".into()),
            new_version: "404363d0".into(),
            filter: Some("month < '2026-01-01'".into()),
            measures: vec![
                Measure {
                    name: "rows".into(),
                    old: Some("12".into()),
                    new: "12".into(),
                    change: Some(0.0),
                },
                Measure {
                    name: "sum(tax)".into(),
                    old: Some("38911700.38".into()),
                    new: "45513379.63".into(),
                    change: relative_change("38911700.38", "45513379.63"),
                },
            ],
            added_columns: vec!["biggest".into()],
            removed_columns: Vec::new(),
            failures: vec!["sum(tax) changed by +16.97 %".into()],
        };
        expect_test::expect![[r#"
            audit of gold.revenue (c46e19e1 → 404363d0) where month < '2026-01-01':
                                old          new  change
              rows               12           12  +0.00 %
              sum(tax)  38911700.38  45513379.63  +16.97 %
              new columns: biggest
              FAILED: sum(tax) changed by +16.97 %
        "#]]
        .assert_eq(&audit.to_text());
    }
}
