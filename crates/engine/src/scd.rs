//! Slowly changing dimensions: a row-by-row model whose rows are versions of things (products,
//! customers) kept as a dimension table, maintained incrementally.
//!
//! ```text
//!  micro-batch ─► the model's SQL (row by row) ─► bucket = hash(key) % B ─► pending rows
//!  settle a bucket: its rows + pending, sorted by (key, updated_at, arrival)
//!      scd1: the last row of each key            scd2: the last row of each (key, updated_at)
//!  output: scd2 adds valid_from = updated_at, valid_to = the next version's valid_from,
//!          is_current = (valid_to IS NULL); both add a surrogate key
//!  commit: each changed bucket's rows replace its old data file (one copy-on-write snapshot;
//!          `kappa.buckets` names every bucket's data and state files)
//! ```
//!
//! A version arriving late (older than the current one) slots into the history: the versions
//! around it get their `valid_to` from it, as a batch run over all records would give. The
//! result depends only on the set of records, except for ties — records of one key and one
//! `updated_at` (or, in scd1 without `updated_at`, of one key): the one read last wins, which is
//! the one last in the log when a key's records share a partition (a topic keyed by the
//! dimension's key). A null `updated_at` sorts before every time: the oldest version.
//!
//! The surrogate key is a 64-bit FNV-1a hash of the business key's values as text (and, for
//! scd2, of `valid_from`): stable across replays and versions of the model, so facts that
//! carry it stay joinable after a redeploy.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Int64Array, RecordBatch, UInt32Array, UInt64Array};
use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take, take_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::row::{RowConverter, SortField};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::error::{DataFusionError, Result};
use kappa_lakehouse::{Lakehouse, LakehouseError, Table};
use kappa_pipeline::{Materialization, Model};

use crate::grouped::{BUCKETS_PROPERTY, BucketCommit, BucketMap, GROUP_BUCKETS, df};
use crate::stateless::StatelessModel;

/// The columns an scd2 dimension adds after its SQL's.
pub const VALID_FROM: &str = "valid_from";
pub const VALID_TO: &str = "valid_to";
pub const IS_CURRENT: &str = "is_current";

/// How a dimension keeps its rows.
#[derive(Debug, Clone)]
pub struct ScdSpec {
    /// Type 2 (every version) rather than type 1 (the latest row).
    history: bool,
    /// The business key's columns in the SQL's output.
    key: Vec<usize>,
    /// The `updated_at` column in the SQL's output.
    updated_at: Option<usize>,
    /// The SQL's output: what the state keeps.
    rows_schema: SchemaRef,
    /// The table's.
    output_schema: SchemaRef,
}

impl ScdSpec {
    /// The dimension `model` declares, over its SQL's output `rows_schema`; `Configuration`
    /// errors name what is wrong in its TOML.
    pub fn new(model: &Model, rows_schema: SchemaRef) -> Result<ScdSpec> {
        let config = &model.config;
        let history = match config.materialization {
            Some(Materialization::Scd2) => true,
            Some(Materialization::Scd1) => false,
            _ => {
                return Err(DataFusionError::Internal(format!(
                    "{} is not a dimension",
                    model.id()
                )));
            }
        };
        let column = |name: &str, what: &str| {
            rows_schema.index_of(name).map_err(|_| {
                DataFusionError::Configuration(format!(
                    "{what} `{name}` is not a column of the model's result; its columns: {}",
                    rows_schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
        };
        let key = config
            .key
            .iter()
            .map(|k| column(k, "key"))
            .collect::<Result<Vec<_>>>()?;
        let updated_at = config
            .updated_at
            .as_deref()
            .map(|u| column(u, "updated_at"))
            .transpose()?;
        let surrogate = config
            .surrogate_key
            .clone()
            .unwrap_or_else(|| format!("{}_key", model.name));
        let mut fields: Vec<Field> = rows_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        if let (true, Some(at)) = (history, updated_at) {
            let at_type = rows_schema.field(at).data_type().clone();
            fields.push(Field::new(VALID_FROM, at_type.clone(), true));
            fields.push(Field::new(VALID_TO, at_type, true));
            fields.push(Field::new(IS_CURRENT, DataType::Boolean, false));
        }
        fields.push(Field::new(&surrogate, DataType::Int64, false));
        let mut names = BTreeSet::new();
        for field in &fields {
            if !names.insert(field.name().as_str()) {
                return Err(DataFusionError::Configuration(format!(
                    "the dimension adds the column `{}`, which its SQL gives already; rename \
                     that column (or set surrogate_key = \"…\")",
                    field.name()
                )));
            }
        }
        Ok(ScdSpec {
            history,
            key,
            updated_at,
            rows_schema,
            output_schema: Arc::new(Schema::new(fields)),
        })
    }

    /// The dimension table's schema.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// The key (and for scd2 `updated_at`) columns that make a row's identity.
    fn identity(&self) -> Vec<usize> {
        let mut columns = self.key.clone();
        if self.history {
            columns.extend(self.updated_at);
        }
        columns
    }
}

/// One bucket of a dimension: its settled rows (sorted, one per identity) and rows read since.
#[derive(Debug, Default)]
struct Bucket {
    rows: Option<RecordBatch>,
    pending: Vec<RecordBatch>,
    /// Changed since the last commit.
    dirty: bool,
}

/// A dimension's rows, in buckets by key.
#[derive(Debug)]
pub struct ScdState {
    spec: ScdSpec,
    buckets: Vec<Bucket>,
}

impl ScdState {
    pub fn new(spec: ScdSpec) -> ScdState {
        ScdState {
            spec,
            buckets: (0..GROUP_BUCKETS).map(|_| Bucket::default()).collect(),
        }
    }

    pub fn spec(&self) -> &ScdSpec {
        &self.spec
    }

    /// Takes rows of the SQL's output, in the order they were read.
    pub fn push(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let keys = texts(batch, &self.spec.key)?;
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); GROUP_BUCKETS];
        for (i, key) in keys.iter().enumerate() {
            let bucket = (fnv(key.as_bytes()) % GROUP_BUCKETS as u64) as usize;
            members[bucket]
                .push(u32::try_from(i).map_err(|_| {
                    DataFusionError::Execution("a micro-batch over 4G rows".into())
                })?);
        }
        for (b, rows) in members.into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let rows = take_record_batch(batch, &UInt32Array::from(rows))?;
            self.buckets[b].pending.push(rows);
            self.buckets[b].dirty = true;
        }
        Ok(())
    }

    /// Whether rows came since the last commit.
    pub fn has_changes(&self) -> bool {
        self.buckets.iter().any(|b| b.dirty)
    }

    /// Folds bucket `b`'s pending rows into its settled rows.
    fn settle(&mut self, b: usize) -> Result<()> {
        let bucket = &mut self.buckets[b];
        if bucket.pending.is_empty() {
            return Ok(());
        }
        let mut all: Vec<RecordBatch> = bucket.rows.take().into_iter().collect();
        all.append(&mut bucket.pending);
        let rows = concat_batches(&self.spec.rows_schema, &all)?;
        bucket.rows = Some(latest_per_identity(&self.spec, &rows)?);
        Ok(())
    }

    /// Bucket `b`'s table rows.
    fn output(&mut self, b: usize) -> Result<Option<RecordBatch>> {
        self.settle(b)?;
        match &self.buckets[b].rows {
            Some(rows) if rows.num_rows() > 0 => Ok(Some(versions(&self.spec, rows)?)),
            _ => Ok(None),
        }
    }

    /// Every row of the table.
    pub fn all(&mut self) -> Result<RecordBatch> {
        let mut batches = Vec::new();
        for b in 0..GROUP_BUCKETS {
            batches.extend(self.output(b)?);
        }
        Ok(concat_batches(&self.spec.output_schema, &batches)?)
    }

    /// Forgets every row.
    pub fn clear(&mut self) {
        for bucket in &mut self.buckets {
            *bucket = Bucket::default();
        }
    }
}

/// Sorts `rows` by (identity, arrival) and keeps the last row of each identity.
fn latest_per_identity(spec: &ScdSpec, rows: &RecordBatch) -> Result<RecordBatch> {
    let n = rows.num_rows();
    let arrival: ArrayRef = Arc::new(UInt64Array::from_iter_values(0..n as u64));
    let identity = spec.identity();
    let mut order: Vec<usize> = identity.clone();
    if !spec.history {
        // scd1: the latest by updated_at, among equals the last read.
        order.extend(spec.updated_at);
    }
    let mut columns: Vec<SortColumn> = order
        .iter()
        .map(|&c| SortColumn {
            values: rows.column(c).clone(),
            options: None,
        })
        .collect();
    columns.push(SortColumn {
        values: arrival,
        options: None,
    });
    let sorted = lexsort_to_indices(&columns, None)?;
    let sorted = take_record_batch(rows, &sorted)?;
    let same = same_as_next(&sorted, &identity)?;
    let keep: Vec<u32> = (0..n)
        .filter(|&i| !same[i])
        .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
        .collect();
    Ok(take_record_batch(&sorted, &UInt32Array::from(keep))?)
}

/// For each row, whether the next row has the same values in `columns` (nulls equal).
fn same_as_next(rows: &RecordBatch, columns: &[usize]) -> Result<Vec<bool>> {
    let n = rows.num_rows();
    let fields = columns
        .iter()
        .map(|&c| SortField::new(rows.schema().field(c).data_type().clone()))
        .collect();
    let converter = RowConverter::new(fields)?;
    let arrays: Vec<ArrayRef> = columns.iter().map(|&c| rows.column(c).clone()).collect();
    let converted = converter.convert_columns(&arrays)?;
    Ok((0..n)
        .map(|i| i + 1 < n && converted.row(i) == converted.row(i + 1))
        .collect())
}

/// The table rows of settled `rows` (sorted by identity).
fn versions(spec: &ScdSpec, rows: &RecordBatch) -> Result<RecordBatch> {
    let n = rows.num_rows();
    let mut columns: Vec<ArrayRef> = rows.columns().to_vec();
    let mut identity_text = texts(rows, &spec.key)?;
    if let (true, Some(at)) = (spec.history, spec.updated_at) {
        let same_key = same_as_next(rows, &spec.key)?;
        let next: UInt32Array = (0..n)
            .map(|i| same_key[i].then(|| u32::try_from(i + 1).unwrap_or(u32::MAX)))
            .collect();
        let valid_from = rows.column(at).clone();
        let valid_to = take(valid_from.as_ref(), &next, None)?;
        let is_current: BooleanArray = (0..n).map(|i| Some(!same_key[i])).collect();
        let at_text = texts(rows, &[at])?;
        for (text, at) in identity_text.iter_mut().zip(at_text) {
            text.push('\u{1f}');
            text.push_str(&at);
        }
        columns.push(valid_from);
        columns.push(valid_to);
        columns.push(Arc::new(is_current));
    }
    let surrogate: Int64Array = identity_text
        .iter()
        .map(|t| i64::from_ne_bytes(fnv(t.as_bytes()).to_ne_bytes()))
        .collect();
    columns.push(Arc::new(surrogate));
    Ok(RecordBatch::try_new(spec.output_schema.clone(), columns)?)
}

/// Each row's values of `columns` as one text (unit separators between values; `∅` for null).
fn texts(batch: &RecordBatch, columns: &[usize]) -> Result<Vec<String>> {
    let options = FormatOptions::default().with_null("\u{2205}");
    let formatters = columns
        .iter()
        .map(|&c| ArrayFormatter::try_new(batch.column(c).as_ref(), &options))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((0..batch.num_rows())
        .map(|i| {
            let mut text = String::new();
            for (n, f) in formatters.iter().enumerate() {
                if n > 0 {
                    text.push('\u{1f}');
                }
                text.push_str(&f.value(i).to_string());
            }
            text
        })
        .collect())
}

/// FNV-1a, 64 bits: stable across builds and restarts.
fn fnv(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A dimension model's run: its SQL over each micro-batch, its rows kept as [`ScdState`],
/// each commit rewriting the buckets that changed.
pub struct ScdModel {
    model: StatelessModel,
    state: ScdState,
    committed: BucketMap,
    /// Files written for a commit whose outcome is not known yet.
    pending: BucketMap,
}

impl std::fmt::Debug for ScdModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScdModel")
            .field("spec", &self.state.spec)
            .finish_non_exhaustive()
    }
}

impl ScdModel {
    pub fn new(model: StatelessModel, spec: ScdSpec) -> ScdModel {
        ScdModel {
            model,
            state: ScdState::new(spec),
            committed: BucketMap::new(),
            pending: BucketMap::new(),
        }
    }

    pub fn output_schema(&self) -> &SchemaRef {
        self.state.spec.output_schema()
    }

    pub async fn push(&mut self, batch: RecordBatch) -> Result<()> {
        for rows in self.model.run(batch).await? {
            self.state.push(&rows)?;
        }
        Ok(())
    }

    pub fn has_changes(&self) -> bool {
        self.state.has_changes()
    }

    /// Writes each changed bucket's rows (data file) and settled rows (state file) and commits
    /// them in one overwrite snapshot carrying `properties`.
    pub async fn commit(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        properties: HashMap<String, String>,
    ) -> std::result::Result<Table, LakehouseError> {
        let mut commit = BucketCommit::new(&self.committed);
        for b in 0..GROUP_BUCKETS {
            if !self.state.buckets[b].dirty {
                continue;
            }
            let rows: Vec<RecordBatch> = self.state.output(b).map_err(df)?.into_iter().collect();
            let settled: Vec<RecordBatch> = self.state.buckets[b].rows.iter().cloned().collect();
            commit
                .bucket(
                    lakehouse,
                    table,
                    b,
                    &rows,
                    &self.state.spec.rows_schema,
                    &settled,
                )
                .await?;
        }
        let table = commit
            .finish(lakehouse, table, &mut self.pending, properties)
            .await?;
        self.landed();
        Ok(table)
    }

    /// The last commit landed: its files are the table's now.
    pub fn landed(&mut self) {
        for (b, files) in std::mem::take(&mut self.pending) {
            self.state.buckets[b].dirty = false;
            self.committed.insert(b, files);
        }
    }

    /// Takes the rows the state files of the table's snapshot (`properties`) name, dropping
    /// everything not committed.
    pub async fn restore(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        properties: Option<&HashMap<String, String>>,
    ) -> std::result::Result<(), LakehouseError> {
        self.pending.clear();
        self.state.clear();
        self.committed = crate::commit_record::summary_json(properties, BUCKETS_PROPERTY)?;
        for (b, files) in self.committed.clone() {
            if b >= GROUP_BUCKETS {
                return Err(LakehouseError::Query(format!(
                    "{BUCKETS_PROPERTY} names bucket {b}; there are {GROUP_BUCKETS}"
                )));
            }
            let batches = lakehouse.read_state(table, &files.state).await?;
            let rows = concat_batches(&self.state.spec.rows_schema, &batches)
                .map_err(|e| LakehouseError::Query(e.to_string()))?;
            self.state.buckets[b].rows = Some(rows);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{StringArray, TimestampMicrosecondArray};
    use arrow::util::pretty::pretty_format_batches;

    use super::*;

    fn spec(history: bool) -> ScdSpec {
        let rows_schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("name", DataType::Utf8, true),
            Field::new(
                "at",
                DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None),
                true,
            ),
        ]));
        let project = kappa_pipeline::load(
            &[
                (
                    "kappa.toml".to_owned(),
                    "[project]\nname = \"t\"\n".to_owned(),
                ),
                (
                    "topics/p.toml".to_owned(),
                    "[schema]\nid = \"string\"\nname = \"string\"\nat = \"timestamp\"\n".to_owned(),
                ),
                (
                    "models/gold/dim.sql".to_owned(),
                    "SELECT * FROM p".to_owned(),
                ),
                (
                    "models/gold/dim.toml".to_owned(),
                    format!(
                        "materialization = \"scd{}\"\nkey = [\"id\"]\nupdated_at = \"at\"\n",
                        if history { 2 } else { 1 }
                    ),
                ),
            ]
            .into_iter()
            .collect(),
        )
        .expect("a valid project");
        ScdSpec::new(&project.models["gold.dim"], rows_schema).expect("a valid dimension")
    }

    fn rows(spec: &ScdSpec, list: &[(&str, &str, i64)]) -> RecordBatch {
        RecordBatch::try_new(
            spec.rows_schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(list.iter().map(|r| r.0))),
                Arc::new(StringArray::from_iter_values(list.iter().map(|r| r.1))),
                Arc::new(TimestampMicrosecondArray::from_iter_values(
                    list.iter().map(|r| r.2 * 1_000_000),
                )),
            ],
        )
        .unwrap()
    }

    fn table(state: &mut ScdState) -> String {
        let all = state.all().unwrap();
        let mut columns: Vec<usize> = (0..all.num_columns() - 1).collect();
        columns.sort_unstable();
        let all = all.project(&columns).unwrap();
        let order = lexsort_to_indices(
            &[0, 2]
                .iter()
                .map(|&c| SortColumn {
                    values: all.column(c).clone(),
                    options: None,
                })
                .collect::<Vec<_>>(),
            None,
        )
        .unwrap();
        pretty_format_batches(&[take_record_batch(&all, &order).unwrap()])
            .unwrap()
            .to_string()
    }

    #[test]
    fn scd2_keeps_every_version_and_slots_late_ones_in() {
        let spec = spec(true);
        let mut state = ScdState::new(spec.clone());
        state
            .push(&rows(
                &spec,
                &[("a", "one", 10), ("b", "x", 5), ("a", "three", 30)],
            ))
            .unwrap();
        // Late: a version between the two of `a`; a correction of `b` at the same time.
        state
            .push(&rows(&spec, &[("a", "two", 20), ("b", "y", 5)]))
            .unwrap();
        expect_test::expect![[r#"
            +----+-------+---------------------+---------------------+---------------------+------------+
            | id | name  | at                  | valid_from          | valid_to            | is_current |
            +----+-------+---------------------+---------------------+---------------------+------------+
            | a  | one   | 1970-01-01T00:00:10 | 1970-01-01T00:00:10 | 1970-01-01T00:00:20 | false      |
            | a  | two   | 1970-01-01T00:00:20 | 1970-01-01T00:00:20 | 1970-01-01T00:00:30 | false      |
            | a  | three | 1970-01-01T00:00:30 | 1970-01-01T00:00:30 |                     | true       |
            | b  | y     | 1970-01-01T00:00:05 | 1970-01-01T00:00:05 |                     | true       |
            +----+-------+---------------------+---------------------+---------------------+------------+"#]]
        .assert_eq(&table(&mut state));
        // The surrogate key names the version: the same whichever order the rows came in.
        let mut again = ScdState::new(spec.clone());
        again
            .push(&rows(
                &spec,
                &[
                    ("b", "y", 5),
                    ("a", "two", 20),
                    ("a", "three", 30),
                    ("a", "one", 10),
                ],
            ))
            .unwrap();
        let keys = |s: &mut ScdState| {
            let all = s.all().unwrap();
            let mut k: Vec<i64> = all
                .column(all.num_columns() - 1)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .values()
                .to_vec();
            k.sort_unstable();
            k
        };
        assert_eq!(keys(&mut state), keys(&mut again));
    }

    #[test]
    fn scd1_keeps_the_latest_row_per_key() {
        let spec = spec(false);
        let mut state = ScdState::new(spec.clone());
        state
            .push(&rows(
                &spec,
                &[("a", "new", 30), ("b", "x", 5), ("a", "old", 10)],
            ))
            .unwrap();
        state.push(&rows(&spec, &[("b", "y", 5)])).unwrap();
        expect_test::expect![[r#"
            +----+------+---------------------+
            | id | name | at                  |
            +----+------+---------------------+
            | a  | new  | 1970-01-01T00:00:30 |
            | b  | y    | 1970-01-01T00:00:05 |
            +----+------+---------------------+"#]]
        .assert_eq(&table(&mut state));
    }
}
