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
//! State is bounded by the number of distinct groups (plus, for `count(DISTINCT x)`, the
//! distinct values per group). Nothing expires: a GROUP BY without a time window keeps every
//! group it has seen, as its table does.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use kappa_lakehouse::{Lakehouse, LakehouseError, Table};
use serde::{Deserialize, Serialize};

use crate::aggregate::{AggregatePlan, GroupSet};

/// How many buckets a grouped table is split into: a commit rewrites the buckets whose groups
/// changed, so a live update touching a few groups rewrites a few small files.
pub const GROUP_BUCKETS: usize = 16;
/// Snapshot property: every bucket's data files and state file.
pub const BUCKETS_PROPERTY: &str = "kappa.buckets";

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

/// A DataFusion error where the lakehouse's are expected.
pub(crate) fn df(e: DataFusionError) -> LakehouseError {
    LakehouseError::Query(e.to_string())
}

/// One GROUP BY model's incremental computation and state.
pub struct GroupedModel {
    plan: AggregatePlan,
    buckets: Vec<GroupSet>,
    committed: BucketMap,
    /// Files written for a commit whose outcome is not known yet.
    pending: BucketMap,
}

impl std::fmt::Debug for GroupedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupedModel")
            .field("output_schema", &self.plan.output_schema)
            .field("groups", &self.groups())
            .finish_non_exhaustive()
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
        let plan = AggregatePlan::new(ctx, input_slot, plan)?;
        let buckets = (0..GROUP_BUCKETS)
            .map(|_| plan.empty_set())
            .collect::<Result<_>>()?;
        Ok(GroupedModel {
            plan,
            buckets,
            committed: BucketMap::new(),
            pending: BucketMap::new(),
        })
    }

    /// The schema of the model's table.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.plan.output_schema
    }

    /// The number of groups held.
    pub fn groups(&self) -> usize {
        self.buckets.iter().map(GroupSet::len).sum()
    }

    /// Folds one micro-batch of input into the groups.
    pub async fn push(&mut self, batch: RecordBatch) -> Result<()> {
        for batch in self.plan.input(batch).await? {
            let n = batch.num_rows();
            if n == 0 {
                continue;
            }
            let keys = self.plan.keys(&batch)?;
            let rows = self.plan.rows(&keys)?;
            let arguments = self.plan.arguments(&batch)?;
            let mut members: Vec<Vec<u32>> = vec![Vec::new(); GROUP_BUCKETS];
            for (i, row) in rows.iter().enumerate() {
                members[bucket_of(row.as_ref())].push(u32::try_from(i).map_err(|_| {
                    DataFusionError::Execution("a micro-batch over 4G rows".into())
                })?);
            }
            for (b, rows_of_bucket) in members.iter().enumerate() {
                self.buckets[b].update(
                    &keys,
                    rows_of_bucket,
                    rows_of_bucket.len() == n,
                    &arguments,
                )?;
            }
        }
        Ok(())
    }

    /// Whether a commit has something to write.
    pub fn has_changes(&self) -> bool {
        self.buckets.iter().any(|b| b.dirty)
    }

    /// Writes the changed buckets' rows and state as new files and commits them in one
    /// overwrite snapshot that carries `properties`. On error the outcome is unknown: the caller
    /// reads the table and calls [`GroupedModel::landed`] or [`GroupedModel::restore`].
    pub async fn commit(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        properties: HashMap<String, String>,
    ) -> Result<Table, LakehouseError> {
        let mut commit = BucketCommit::new(&self.committed);
        for b in 0..GROUP_BUCKETS {
            if !self.buckets[b].dirty {
                continue;
            }
            let (state, values) = self.buckets[b].evaluate(&self.plan, true).map_err(df)?;
            let rows = self.plan.output(values).await.map_err(df)?;
            commit
                .bucket(
                    lakehouse,
                    table,
                    b,
                    &rows,
                    &self.plan.state_schema,
                    &[state],
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
    ) -> Result<(), LakehouseError> {
        self.pending.clear();
        self.committed = crate::commit_record::summary_json(properties, BUCKETS_PROPERTY)?;
        for b in 0..GROUP_BUCKETS {
            self.buckets[b] = self.plan.empty_set().map_err(df)?;
        }
        for (b, files) in self.committed.clone() {
            if b >= GROUP_BUCKETS {
                return Err(LakehouseError::Query(format!(
                    "{BUCKETS_PROPERTY} names bucket {b}; there are {GROUP_BUCKETS}"
                )));
            }
            for batch in lakehouse.read_state(table, &files.state).await? {
                self.buckets[b].load(&self.plan, &batch, None).map_err(df)?;
            }
            self.buckets[b].dirty = false;
        }
        Ok(())
    }
}

/// One copy-on-write commit of bucketed rows (a GROUP BY's groups, a dimension's versions):
/// each changed bucket's rows become new data files and its state a new state file, its old
/// data files leave the table, and `kappa.buckets` names every bucket's files.
pub(crate) struct BucketCommit<'a> {
    committed: &'a BucketMap,
    written: BucketMap,
    remove: BTreeSet<String>,
    add: Vec<kappa_lakehouse::DataFile>,
}

impl<'a> BucketCommit<'a> {
    pub(crate) fn new(committed: &'a BucketMap) -> BucketCommit<'a> {
        BucketCommit {
            committed,
            written: BucketMap::new(),
            remove: BTreeSet::new(),
            add: Vec::new(),
        }
    }

    /// Writes bucket `b`'s new `rows` and `state`.
    pub(crate) async fn bucket(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        b: usize,
        rows: &[RecordBatch],
        state_schema: &SchemaRef,
        state: &[RecordBatch],
    ) -> Result<(), LakehouseError> {
        let files = if rows.iter().all(|r| r.num_rows() == 0) {
            Vec::new()
        } else {
            lakehouse
                .write_data_files(table, rows, &format!("b{b}-"))
                .await?
        };
        let state = lakehouse
            .write_state(table, &format!("b{b}"), state_schema, state)
            .await?;
        if let Some(old) = self.committed.get(&b) {
            self.remove.extend(old.data.iter().cloned());
        }
        self.written.insert(
            b,
            BucketFiles {
                data: files.iter().map(|f| f.file_path().to_owned()).collect(),
                state,
            },
        );
        self.add.extend(files);
        Ok(())
    }

    /// Commits the written buckets in one overwrite snapshot carrying `properties`; `pending`
    /// gets their files (the caller's until it knows the commit landed).
    pub(crate) async fn finish(
        self,
        lakehouse: &Lakehouse,
        table: &Table,
        pending: &mut BucketMap,
        mut properties: HashMap<String, String>,
    ) -> Result<Table, LakehouseError> {
        *pending = self.written;
        let mut buckets = self.committed.clone();
        buckets.extend(pending.clone());
        properties.insert(
            BUCKETS_PROPERTY.to_owned(),
            serde_json::to_string(&buckets).unwrap_or_default(),
        );
        lakehouse
            .overwrite(table, &self.remove, self.add, properties)
            .await
    }
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
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::aggregate::NO_GROUP_BY;

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
