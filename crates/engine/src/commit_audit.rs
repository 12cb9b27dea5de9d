//! The audit of a commit waiting on the audit branch (Write-Audit-Publish): whether it makes
//! the model's table worse than what `main` publishes.
//!
//! A commit that only adds rows (every commit of an append-only table, between its small-file
//! merges) is judged by what it adds, at a cost that does not grow with the table:
//! - row-level checks and `relationships` run over the added rows only (the rows already
//!   published were judged when they came);
//! - `row_count` reads the `total-records` the snapshot summaries keep;
//! - `unique` keeps a hash of every key the table holds, filled by one scan of the key columns
//!   when the runner starts: an added key whose hash is new cannot be a duplicate; one whose
//!   hash was seen (a real duplicate, or two keys sharing a hash) sends that check to the
//!   whole table.
//!
//! `freshness` and `query`, and every check of a commit that replaces rows (a GROUP BY's
//! upsert, a merge), run over the whole table at the head and, when they fail there, at
//! `main`: a commit fails a check only by failing more than what is published.

use std::collections::{BTreeMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::compute::{and, is_not_null};
use arrow::row::{RowConverter, SortField};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use kappa_lakehouse::{Lakehouse, LakehouseError, Result, Table, wap};
use kappa_pipeline::expect::{Check, Expectation};

use crate::expect::{Audited, count_failing, failing_sql, fails_when_empty};

/// The name the added rows take in the session that checks them.
const ADDED_ROWS: &str = "kappa_added_rows";

/// One expectation judged over a commit.
#[derive(Debug)]
pub struct Judged {
    pub audited: Audited,
    /// What `main` fails the same check by: the commit blocks only when it fails by more.
    pub before: u64,
}

impl Judged {
    /// Whether the commit must wait: a blocking expectation it makes worse.
    pub fn blocks(&self) -> bool {
        self.audited.blocks() && self.audited.failing > self.before
    }
}

/// The hashes of the keys a `unique` expectation has seen in the table.
#[derive(Debug)]
struct KeySet {
    hashes: HashSet<u64, foldhash::fast::FixedState>,
    /// Duplicated keys in the table as of the last exact count (0 until one ran).
    duplicated: u64,
}

/// A runner's audit of its commits, with what it keeps between them.
#[derive(Debug, Default)]
pub struct CommitAudit {
    /// Per `unique` expectation (by name), the keys of every row up to `covered`.
    keys: BTreeMap<String, KeySet>,
    /// The table (its UUID: a replaced table starts its sequence numbers again) and data
    /// sequence number the key sets cover (`None`: rebuild them).
    covered: Option<(u128, i64)>,
}

/// The hasher of keys: fixed, so a rebuilt set agrees with the one it replaces.
fn key_hasher() -> foldhash::fast::FixedState {
    foldhash::fast::FixedState::with_seed(0x6b61_7070_615f_756e)
}

/// `total-records` of a snapshot's summary.
fn total_records(snapshot: &kappa_lakehouse::Snapshot) -> Option<u64> {
    snapshot
        .summary()
        .additional_properties
        .get("total-records")
        .and_then(|v| v.parse().ok())
}

/// Whether `rows` is out of `check`'s bounds (a `row_count` check).
fn row_count_fails(check: &Check, rows: u64) -> u64 {
    match check {
        Check::RowCount { min, max } => {
            let low = min.is_some_and(|m| rows < m);
            let high = max.is_some_and(|m| rows > m);
            u64::from(low || high)
        }
        _ => 0,
    }
}

impl CommitAudit {
    /// Judges the commit waiting on `table`'s audit branch by `model`'s expectations, leaving
    /// out the row-level ones when `row_level_counted` (the runner counted them on the rows it
    /// wrote). Empty when nothing waits.
    pub async fn judge(
        &mut self,
        lakehouse: &Lakehouse,
        model: &kappa_pipeline::Model,
        table: &Table,
        row_level_counted: bool,
    ) -> Result<Vec<Judged>> {
        let Some(head) = wap::unpublished(table) else {
            return Ok(Vec::new());
        };
        let main = table.metadata().current_snapshot();
        let main_sequence = main.map_or(0, |s| s.sequence_number());
        let added = lakehouse.added_in(table, head, main_sequence).await?;
        let added_records: u64 = added.files.iter().map(|f| f.file.record_count()).sum();
        let main_records = match main {
            None => Some(0),
            Some(m) => total_records(m),
        };
        // Rows were only added since `main`: no file merged from older ones, and the count
        // grew by exactly what the new files hold.
        let appended_only = added.files.iter().all(|f| f.first > main_sequence)
            && matches!(
                (total_records(head), main_records),
                (Some(now), Some(before)) if now == before + added_records
            );
        let checked: Vec<&Expectation> = model
            .config
            .expectations
            .iter()
            .filter(|e| !(row_level_counted && e.check.is_row_level()))
            .collect();
        if !appended_only {
            self.covered = None;
            return whole_table(lakehouse, model, table, &checked).await;
        }

        let name = format!("{}.{}", model.layer, model.name);
        let mut head_session: Option<SessionContext> = None;
        let mut added_session: Option<SessionContext> = None;
        let mut out = Vec::new();
        for e in checked {
            // `unique`: whether an added key's hash was in the set already.
            let seen_before = match &e.check {
                Check::Unique { columns } => Some(
                    self.add_keys(lakehouse, table, head, &added, &e.name, columns)
                        .await?,
                ),
                _ => None,
            };
            let judged = match &e.check {
                // No row added (a commit of positions or state only): none fails.
                check
                    if added_records == 0
                        && (check.is_row_level()
                            || matches!(check, Check::Relationships { .. })) =>
                {
                    Judged {
                        audited: Audited::counted(e, 0),
                        before: 0,
                    }
                }
                check if check.is_row_level() || matches!(check, Check::Relationships { .. }) => {
                    let ctx = match &added_session {
                        Some(ctx) => ctx,
                        None => {
                            let rows = read_added(lakehouse, table, &added.files, None).await?;
                            added_session
                                .insert(added_rows_session(lakehouse, model, table, rows).await?)
                        }
                    };
                    Judged {
                        audited: count_failing(ctx, &failing_sql(ADDED_ROWS, check), e, 0).await,
                        before: 0,
                    }
                }
                Check::RowCount { .. } => {
                    let failing = row_count_fails(&e.check, total_records(head).unwrap_or(0));
                    let before = match main.and_then(|m| total_records(m)) {
                        Some(rows) => row_count_fails(&e.check, rows),
                        None => fails_when_empty(&e.check),
                    };
                    Judged {
                        audited: Audited::counted(e, failing),
                        before,
                    }
                }
                // No added key's hash was seen before: no duplicate is new.
                Check::Unique { .. } if seen_before == Some(false) => {
                    let failing = self.keys.get(&e.name).map_or(0, |k| k.duplicated);
                    Judged {
                        audited: Audited::counted(e, failing),
                        before: failing,
                    }
                }
                // Over the whole table: freshness, query, and a unique whose key hash was seen.
                _ => {
                    let ctx = match &head_session {
                        Some(ctx) => ctx,
                        None => head_session.insert(
                            lakehouse
                                .audit_session(&model.layer, &model.name, table, None)
                                .await?,
                        ),
                    };
                    let audited = count_failing(ctx, &failing_sql(&name, &e.check), e, 0).await;
                    if let Some(keys) = self.keys.get_mut(&e.name) {
                        keys.duplicated = audited.failing;
                    }
                    let before = published(lakehouse, model, table, e, &audited).await?;
                    Judged { audited, before }
                }
            };
            out.push(judged);
        }
        self.covered = Some((table.metadata().uuid().as_u128(), head.sequence_number()));
        Ok(out)
    }

    /// Adds the keys of the rows `head` holds past what the key set of `name` covers (all of
    /// them when it covers nothing, or a merge rewrote rows it covered); whether any added
    /// key's hash was already there.
    async fn add_keys(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        head: &kappa_lakehouse::Snapshot,
        added: &kappa_lakehouse::Added,
        name: &str,
        columns: &[String],
    ) -> Result<bool> {
        let covered = self
            .covered
            .filter(|(uuid, _)| *uuid == table.metadata().uuid().as_u128())
            .map(|(_, sequence)| sequence);
        // A merged file holding rows the set covers and rows it does not: read them all.
        let fresh = match (covered, self.keys.contains_key(name)) {
            (Some(covered), true) => added
                .files
                .iter()
                .any(|f| f.first <= covered && f.sequence > covered),
            _ => true,
        };
        let (files, mut keys) = match fresh {
            true => {
                let all = lakehouse.added_in(table, head, 0).await?;
                let keys = KeySet {
                    hashes: HashSet::with_hasher(key_hasher()),
                    duplicated: 0,
                };
                (all.files, keys)
            }
            false => {
                let covered = covered.unwrap_or(0);
                let keys = self.keys.remove(name).unwrap_or(KeySet {
                    hashes: HashSet::with_hasher(key_hasher()),
                    duplicated: 0,
                });
                let files = added
                    .files
                    .iter()
                    .filter(|f| f.sequence > covered)
                    .cloned()
                    .collect();
                (files, keys)
            }
        };
        let rows = read_added(lakehouse, table, &files, Some(columns)).await?;
        let mut seen = false;
        for batch in &rows {
            let key_columns: Vec<ArrayRef> = columns
                .iter()
                .map(|c| {
                    batch.column_by_name(c).cloned().ok_or_else(|| {
                        LakehouseError::Query(format!(
                            "unique: {} has no column `{c}`",
                            table.identifier()
                        ))
                    })
                })
                .collect::<Result<_>>()?;
            for hash in key_hashes(&key_columns)? {
                seen |= !keys.hashes.insert(hash);
            }
        }
        self.keys.insert(name.to_owned(), keys);
        Ok(seen)
    }
}

/// The hashes of the rows of `columns` whose key is complete (a NULL in any column makes no
/// key, as `unique` reads it).
fn key_hashes(columns: &[ArrayRef]) -> Result<Vec<u64>> {
    let fail = |e: arrow::error::ArrowError| LakehouseError::Query(format!("unique: {e}"));
    let mut present: Option<arrow::array::BooleanArray> = None;
    for c in columns {
        let here = is_not_null(c.as_ref()).map_err(fail)?;
        present = Some(match present {
            None => here,
            Some(p) => and(&p, &here).map_err(fail)?,
        });
    }
    let Some(present) = present else {
        return Ok(Vec::new());
    };
    let columns: Vec<ArrayRef> = match present.false_count() {
        0 => columns.to_vec(),
        _ => columns
            .iter()
            .map(|c| arrow::compute::filter(c.as_ref(), &present))
            .collect::<std::result::Result<_, _>>()
            .map_err(fail)?,
    };
    let converter = RowConverter::new(
        columns
            .iter()
            .map(|c| SortField::new(c.data_type().clone()))
            .collect(),
    )
    .map_err(fail)?;
    let rows = converter.convert_columns(&columns).map_err(fail)?;
    let hasher = key_hasher();
    Ok(rows
        .iter()
        .map(|row| hasher.hash_one(row.as_ref()))
        .collect())
}

/// The rows of `files` (only `columns`, when named).
async fn read_added(
    lakehouse: &Lakehouse,
    table: &Table,
    files: &[kappa_lakehouse::AddedFile],
    columns: Option<&[String]>,
) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    for f in files {
        out.extend(
            lakehouse
                .read_data_file_columns(table, &f.file, columns)
                .await?,
        );
    }
    Ok(out)
}

/// A session over the catalog — `model`'s own table at its head, as the audit reads it, so
/// that a `relationships` check on the model itself sees the rows the commit added — in which
/// [`ADDED_ROWS`] holds `rows` (at least one).
async fn added_rows_session(
    lakehouse: &Lakehouse,
    model: &kappa_pipeline::Model,
    table: &Table,
    rows: Vec<RecordBatch>,
) -> Result<SessionContext> {
    let ctx = lakehouse
        .audit_session(&model.layer, &model.name, table, None)
        .await?;
    let failed = |e: datafusion::error::DataFusionError| {
        LakehouseError::Query(format!("the added rows: {e}"))
    };
    let schema = rows
        .first()
        .map(RecordBatch::schema)
        .ok_or_else(|| LakehouseError::Query("the added rows: none".into()))?;
    let added = MemTable::try_new(schema, vec![rows]).map_err(failed)?;
    ctx.register_table(ADDED_ROWS, Arc::new(added))
        .map_err(failed)?;
    Ok(ctx)
}

/// What `main` fails `e` by, asked only when `at_head` blocks (0 when it could not run;
/// what an empty table fails when nothing is published).
async fn published(
    lakehouse: &Lakehouse,
    model: &kappa_pipeline::Model,
    table: &Table,
    e: &Expectation,
    at_head: &Audited,
) -> Result<u64> {
    if !at_head.blocks() {
        return Ok(0);
    }
    let Some(main) = table.metadata().current_snapshot_id() else {
        return Ok(fails_when_empty(&e.check));
    };
    let ctx = lakehouse
        .audit_session(&model.layer, &model.name, table, Some(main))
        .await?;
    let name = format!("{}.{}", model.layer, model.name);
    Ok(count_failing(&ctx, &failing_sql(&name, &e.check), e, 0)
        .await
        .failing)
}

/// Every check in `checked` over the whole table at the head, and at `main` for those that
/// fail.
async fn whole_table(
    lakehouse: &Lakehouse,
    model: &kappa_pipeline::Model,
    table: &Table,
    checked: &[&Expectation],
) -> Result<Vec<Judged>> {
    let ctx = lakehouse
        .audit_session(&model.layer, &model.name, table, None)
        .await?;
    let name = format!("{}.{}", model.layer, model.name);
    let mut out = Vec::new();
    for e in checked {
        let audited = count_failing(&ctx, &failing_sql(&name, &e.check), e, 0).await;
        let before = published(lakehouse, model, table, e, &audited).await?;
        out.push(Judged { audited, before });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use kappa_pipeline::ProjectFiles;

    use super::*;

    const MODEL_TOML: &str = r#"
[[expect]]
name = "key_unique"
unique = "id"
[[expect]]
name = "ref_known"
relationships = { column = "ref", to = "silver.refs", field = "ref" }
[[expect]]
name = "few"
row_count = { max = 40 }
[[expect]]
name = "ref_present"
not_null = "ref"
"#;

    fn model() -> kappa_pipeline::Model {
        let mut files = ProjectFiles::new();
        files.insert("kappa.toml".into(), String::new());
        files.insert(
            "topics/t.toml".into(),
            "[schema]\nid = \"bigint\"\nref = \"bigint\"\n".into(),
        );
        files.insert("models/silver/m.sql".into(), "SELECT id, ref FROM t".into());
        files.insert("models/silver/m.toml".into(), MODEL_TOML.into());
        files.insert("models/silver/refs.sql".into(), "SELECT ref FROM t".into());
        let project = kappa_pipeline::load(&files).expect("the project loads");
        project.models["silver.m"].clone()
    }

    fn schema(columns: &[&str]) -> Arc<Schema> {
        Arc::new(Schema::new(
            columns
                .iter()
                .map(|c| Field::new(*c, DataType::Int64, true))
                .collect::<Vec<_>>(),
        ))
    }

    fn rows(schema: &Arc<Schema>, rows: &[(i64, Option<i64>)]) -> RecordBatch {
        let ids: Int64Array = rows.iter().map(|r| Some(r.0)).collect();
        let refs: Int64Array = rows.iter().map(|r| r.1).collect();
        RecordBatch::try_new(schema.clone(), vec![Arc::new(ids), Arc::new(refs)])
            .expect("two Int64 columns")
    }

    /// What each commit's audit decides by what it adds (carrying its key sets from commit to
    /// commit, and starting afresh as a restarted runner does) is what the whole-table audit
    /// decides: the same blocking checks and the same counts; over commits that add duplicates,
    /// orphans, NULLs and too many rows, some published, some discarded, some forced.
    #[tokio::test]
    async fn judging_what_a_commit_adds_agrees_with_the_whole_table() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let lakehouse = Lakehouse::open(dir.path())
            .await
            .expect("the lakehouse opens");
        let model = model();
        let refs_ident = kappa_lakehouse::table_ident("silver", "refs").expect("a valid name");
        let refs = lakehouse
            .ensure_table(&refs_ident, &schema(&["ref"]))
            .await
            .expect("refs table");
        let known: Int64Array = (0..5).map(Some).collect();
        let known = RecordBatch::try_new(schema(&["ref"]), vec![Arc::new(known)])
            .expect("one Int64 column");
        lakehouse
            .append(&refs, &[known], HashMap::new())
            .await
            .expect("refs written");
        let ident = kappa_lakehouse::table_ident("silver", "m").expect("a valid name");
        let row_schema = schema(&["id", "ref"]);
        let mut table = lakehouse
            .ensure_table(&ident, &row_schema)
            .await
            .expect("model table");
        lakehouse.stage(&ident);

        // (rows, then: publish / discard / force)
        type Rows = Vec<(i64, Option<i64>)>;
        let commits: Vec<(Rows, &str)> = vec![
            (vec![(1, Some(1)), (2, Some(2))], "publish"),
            (vec![(3, Some(3)), (4, Some(4))], "publish"),
            (vec![(5, Some(1)), (1, Some(2))], "discard"), // a duplicate key
            (vec![(6, Some(9))], "discard"),               // an orphan
            (vec![(7, None)], "discard"),                  // a NULL
            (vec![(8, Some(0)), (8, Some(0))], "force"),   // duplicates within the commit
            (vec![(9, Some(1))], "publish"),               // the forced duplicate stays
            (vec![(10, Some(2)), (3, Some(3))], "discard"), // another duplicate
            ((11..50).map(|i| (i, Some(i % 5))).collect(), "discard"), // too many rows
            (vec![(12, Some(4))], "publish"),
            (vec![], "publish"), // positions only: no row added
        ];
        let mut audit = CommitAudit::default();
        for (n, (added, then)) in commits.into_iter().enumerate() {
            table = match added.is_empty() {
                true => {
                    lakehouse
                        .append_files(&table, Vec::new(), HashMap::new())
                        .await
                }
                false => {
                    lakehouse
                        .append(&table, &[rows(&row_schema, &added)], HashMap::new())
                        .await
                }
            }
            .expect("a commit");
            if n == 6 {
                // A restarted runner keeps nothing.
                audit = CommitAudit::default();
            }
            let by_commit = audit
                .judge(&lakehouse, &model, &table, false)
                .await
                .expect("the audit runs");
            assert!(
                audit.covered.is_some(),
                "commit {n} is judged by what it adds"
            );
            let checked: Vec<&Expectation> = model.config.expectations.iter().collect();
            let whole = whole_table(&lakehouse, &model, &table, &checked)
                .await
                .expect("the whole-table audit runs");
            let decided = |judged: &[Judged]| -> Vec<(String, bool)> {
                judged
                    .iter()
                    .map(|j| (j.audited.expectation.name.clone(), j.blocks()))
                    .collect()
            };
            assert_eq!(decided(&by_commit), decided(&whole), "commit {n}");
            for (a, b) in by_commit.iter().zip(&whole) {
                assert!(
                    a.audited.error.is_none() && b.audited.error.is_none(),
                    "commit {n}"
                );
            }
            let blocked = by_commit.iter().any(Judged::blocks);
            assert_eq!(blocked, then != "publish", "commit {n}: {}", then);
            table = match then {
                "discard" => lakehouse
                    .discard(&table, &[], &[])
                    .await
                    .expect("discarded"),
                _ => lakehouse.publish_audited(&table).await.expect("published"),
            };
        }
    }
}
