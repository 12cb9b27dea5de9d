//! An upstream model's table as `main` published it, read as a [`Source`] of the one runner:
//! what a model over another model reads, so that it computes on what its upstream published
//! (never on rows an audit holds back or a discard drops) and the upstream is computed once.
//!
//! ```text
//!   upstream's table ──files added after the position, in commit order──► model ──► its table
//!        (data sequence numbers, `kappa_lakehouse::Added`)                snapshot summary:
//!        ▲                                                                kappa.offsets =
//!        └── position held: the upstream merges no file above it ──────  {"table:<upstream>": {0: seq}}
//! ```
//!
//! Exactly once as for topics: the position (the upstream's last data sequence number read)
//! is committed with the rows computed from what it covers. Only models whose result over a
//! stream does not depend on the order of its rows run this way (row by row, one GROUP BY
//! upserted, windows over a deduplicating upstream: `plan_tables::plan_over_upstream`), so the
//! result equals the model computed from its upstream's SQL.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use kappa_lakehouse::{Lakehouse, Table, TableIdent};
use kappa_log::Log;
use kappa_pipeline::Project;

use crate::commit_record::Offsets;
use crate::error::EngineError;
use crate::plan_tables::plan_over_upstream;
use crate::source::{Source, SourceError, Taken, Waiter};
use crate::watermark::{WATERMARKS_PROPERTY, Watermarks};

/// Snapshot property: the upstream table's uuid, so that a rebuilt upstream is noticed.
pub const UPSTREAM_UUID_PROPERTY: &str = "kappa.upstream-uuid";
/// Snapshot property: the upstream's last sequence number when the model began reading it
/// from its start (files merged before then are read whole, not mistaken for a broken stream).
pub const UPSTREAM_BEGAN_PROPERTY: &str = "kappa.upstream-began";
pub use crate::commit_record::TABLE_KEY_PREFIX;
/// While live, how often the upstream's table is looked at.
const POLL_MS: u64 = 100;

/// The `kappa.offsets` key of a position on `table`.
pub fn table_key(table: &TableIdent) -> String {
    format!("{TABLE_KEY_PREFIX}{table}")
}

/// The table the version of `upstream_id` in `project` writes (its public name with a catalog
/// without aliases).
pub fn upstream_table(
    lakehouse: &Lakehouse,
    project: &Project,
    upstream_id: &str,
) -> kappa_lakehouse::Result<TableIdent> {
    crate::tables::live_table(lakehouse, project, upstream_id)
}

/// Holds position 0 on the upstream table `model_id` reads, if it reads one: nothing of it is
/// merged until the model's runner has read its own position. Called before a runner starts,
/// so that the upstream's runner, starting beside it, cannot merge past that position first.
pub fn hold_before_start(lakehouse: &Lakehouse, project: &Project, model_id: &str) {
    let Some(upstream_id) = project.reads_tables.get(model_id) else {
        return;
    };
    let reader = crate::tables::live_table(lakehouse, project, model_id);
    if let (Ok(upstream), Ok(reader)) = (upstream_table(lakehouse, project, upstream_id), reader) {
        lakehouse.hold(&upstream, &reader.to_string(), 0);
    }
}

/// The upstream model whose published table `model_id` of `project` reads, if it reads one
/// (see [`reading_of`]).
pub async fn readable_upstream(project: &Project, model_id: &str) -> Option<String> {
    reading_of(project, model_id)
        .await
        .map(|(upstream, _)| upstream)
}

/// How a model reads its upstream's published table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// The rows each commit adds, in commit order ([`TableSource`]).
    Stream,
    /// The whole table at each new snapshot, the model's SQL run over it as a batch
    /// ([`SnapshotSource`], `refresh.rs`).
    Refresh,
}

/// The upstream model whose published table `model_id` of `project` reads, and how:
/// - a model that reads only one model whose table is upserted in place (a GROUP BY or a
///   dimension) is refreshed from it (any SQL);
/// - a model that reads one model and otherwise only dimensions, where that model appends
///   (row by row, windows, deduplication, a stream join — never rewrites rows), reads its
///   commits as a stream when over the table it runs as it would recomputing that model: row
///   by row, one GROUP BY without windows (neither depends on the order of the rows), or
///   windows over the event time of an upstream that deduplicates (which emits rows as its
///   watermark passes them, so its recorded watermark closes them).
pub async fn reading_of(project: &Project, model_id: &str) -> Option<(String, Reading)> {
    if let Some((upstream_id, planned)) = refresh_plan(project, model_id).await {
        planned.ok()?;
        return Some((upstream_id, Reading::Refresh));
    }
    let upstream_id = crate::plan_tables::upstream_of(project, model_id)?;
    // A dimension's table is rewritten in place: it is looked up, not read as a stream.
    if upserted(project, &upstream_id).await {
        return None;
    }
    // `plan_over_upstream` refuses what would run another way over the table.
    plan_over_upstream(project, model_id).await.ok()?;
    Some((upstream_id, Reading::Stream))
}

/// When `model_id` reads only one model whose table is upserted in place (so that it is
/// refreshed from that table): that model, and whether the model plans that way (why not).
pub async fn refresh_plan(
    project: &Project,
    model_id: &str,
) -> Option<(String, datafusion::error::Result<()>)> {
    let model = project.models.get(model_id)?;
    let [kappa_pipeline::Input::Model(upstream_id)] = model.inputs.as_slice() else {
        return None;
    };
    if !upserted(project, upstream_id).await {
        return None;
    }
    let planned = crate::plan_tables::plan_refresh(project, model_id)
        .await
        .map(|_| ());
    Some((upstream_id.clone(), planned))
}

/// Whether `model_id`'s table is upserted in place: a dimension, or one GROUP BY.
async fn upserted(project: &Project, model_id: &str) -> bool {
    project.is_dimension(model_id)
        || crate::plan::plan_model(project, model_id)
            .await
            .is_ok_and(|p| p.shape == crate::plan::Shape::Grouped)
}

/// Which models of `project` read an upstream's published table, with that upstream
/// (`Project::reads_tables` of a project no version of which ran before).
pub async fn table_readers(project: &Project) -> BTreeMap<String, String> {
    let mut readers = BTreeMap::new();
    for id in &project.order {
        if let Some(upstream) = readable_upstream(project, id).await {
            readers.insert(id.clone(), upstream);
        }
    }
    readers
}

/// An upstream model's table as `main` published it, read as a [`Source`]: the data files its
/// commits added after the position (the last data sequence number read), whole commits in
/// order; rows cast to the schema the model was planned against.
pub(crate) struct TableSource {
    lakehouse: Lakehouse,
    /// The upstream version's table.
    upstream: TableIdent,
    /// `table:<upstream>`, its key in `kappa.offsets`.
    key: String,
    /// The reader's own table, the name its hold on the upstream goes by.
    holder: String,
    /// The last data sequence number read.
    position: i64,
    /// The upstream's last sequence number when this reader began from its start.
    began_at: i64,
    /// The upstream table's uuid the reader's commits record (a rebuilt upstream differs).
    uuid: Option<String>,
    /// The schema rows are put in the model with.
    slot_schema: SchemaRef,
    /// Windows over the upstream's event time close as its recorded watermark passes them.
    marks: Option<(String, Watermarks)>,
}

impl std::fmt::Debug for TableSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableSource")
            .field("upstream", &self.upstream)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

impl TableSource {
    /// The source `model_id` of `project` reads `upstream_id`'s table through, its rows put in
    /// `slot_schema`; `upstream_marks`: the upstream's topic and event time whose recorded
    /// watermark closes the model's windows. Holds position 0 on the upstream until rewound.
    pub(crate) fn new(
        log: &Log,
        lakehouse: &Lakehouse,
        project: &Project,
        model_id: &str,
        upstream_id: &str,
        slot_schema: SchemaRef,
        upstream_marks: Option<&(String, crate::plan::EventTime)>,
    ) -> Result<TableSource, EngineError> {
        let upstream = upstream_table(lakehouse, project, upstream_id)?;
        let holder = crate::tables::live_table(lakehouse, project, model_id)?.to_string();
        let marks = match upstream_marks {
            Some((topic, et)) => {
                let partitions = log.topic(topic)?.partition_count();
                Some((
                    topic.clone(),
                    Watermarks::new(&et.column, et.index, et.delay_ms, partitions),
                ))
            }
            None => None,
        };
        // Until the position is known, the upstream merges nothing.
        lakehouse.hold(&upstream, &holder, 0);
        Ok(TableSource {
            lakehouse: lakehouse.clone(),
            key: table_key(&upstream),
            upstream,
            holder,
            position: 0,
            began_at: 0,
            uuid: None,
            slot_schema,
            marks,
        })
    }
}

#[async_trait::async_trait]
impl Source for TableSource {
    fn key(&self) -> &str {
        &self.key
    }

    fn rewind(&mut self, committed: &Offsets) -> Result<(), SourceError> {
        self.position = table_position(committed, &self.key)?;
        Ok(())
    }

    async fn read(&mut self, max: usize) -> Result<Taken, SourceError> {
        let upstream = self.upstream.clone();
        let read_err = |e: kappa_lakehouse::LakehouseError| {
            SourceError::Read(format!("reading {upstream}: {e}"))
        };
        let Some(source) = self
            .lakehouse
            .load_table_if_exists(&self.upstream)
            .await
            .map_err(read_err)?
        else {
            // The upstream's runner has not created its table yet: nothing to read so far.
            return Ok(Taken {
                batch: RecordBatch::new_empty(self.slot_schema.clone()),
                rejected: Vec::new(),
                watermark: None,
                records: 0,
                full: false,
            });
        };
        let uuid = source.metadata().uuid().to_string();
        let added = self
            .lakehouse
            .added_after(&source, self.position)
            .await
            .map_err(read_err)?;
        if self.position > 0
            && (self.uuid.as_ref().is_some_and(|u| *u != uuid)
                || !added.continues(self.position, self.began_at))
        {
            return Err(SourceError::Restart(format!(
                "the upstream's table {} no longer continues from position {} (rebuilt, or \
                 files merged across it)",
                self.upstream, self.position
            )));
        }
        self.uuid = Some(uuid);
        if self.position == 0 {
            // Reading from the start: files merged before now are read whole.
            self.began_at = added.last_sequence;
        }
        // Whole commits, oldest first, up to `max` records.
        let mut records = 0usize;
        let mut taken = 0;
        let mut target = self.position;
        for (i, added_file) in added.files.iter().enumerate() {
            let starts_commit = i == 0 || added.files[i - 1].sequence != added_file.sequence;
            if starts_commit && records >= max {
                break;
            }
            records += usize::try_from(added_file.file.record_count()).unwrap_or(usize::MAX);
            taken = i + 1;
            target = added_file.sequence;
        }
        let all = taken == added.files.len();
        if all {
            // Commits that added no file are passed too.
            target = target.max(added.last_sequence);
        }
        let batch = read_files(
            &self.lakehouse,
            &source,
            &added.files[..taken],
            &self.slot_schema,
        )
        .await
        .map_err(SourceError::Unavailable)?;
        // Every row of the commits up to `complete` has been read: a file still to read
        // (merged before this reader held its position) may hold rows of earlier commits than
        // the ones just read, which the watermark must not have passed.
        let complete = added.files[taken..]
            .iter()
            .map(|f| f.first - 1)
            .min()
            .map_or(target, |first| first.min(target));
        let watermark = match &mut self.marks {
            Some((topic, marks)) => watermark_at(&source, topic, marks, complete),
            None => None,
        };
        self.position = target;
        Ok(Taken {
            batch,
            rejected: Vec::new(),
            watermark,
            records,
            full: !all,
        })
    }

    fn position(&self) -> BTreeMap<u32, u64> {
        BTreeMap::from([(0, u64::try_from(self.position).unwrap_or(0))])
    }

    fn restore(&mut self, properties: Option<&HashMap<String, String>>) {
        let property = |name: &str| properties.and_then(|p| p.get(name));
        self.began_at = property(UPSTREAM_BEGAN_PROPERTY)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        self.uuid = property(UPSTREAM_UUID_PROPERTY).cloned();
    }

    fn properties(&self, into: &mut HashMap<String, String>) {
        if let Some(uuid) = &self.uuid {
            into.insert(UPSTREAM_UUID_PROPERTY.to_owned(), uuid.clone());
        }
        into.insert(
            UPSTREAM_BEGAN_PROPERTY.to_owned(),
            self.began_at.to_string(),
        );
    }

    fn landed(&self, committed: &Offsets) {
        let position = committed
            .get(&self.key)
            .and_then(|p| p.get(&0))
            .and_then(|&p| i64::try_from(p).ok())
            .unwrap_or(0);
        self.lakehouse.hold(&self.upstream, &self.holder, position);
    }

    fn waiter(&self) -> Waiter {
        Waiter::Poll(Duration::from_millis(POLL_MS))
    }
}

/// An upstream's table upserted in place, read whole at each new snapshot of `main`: what a
/// refreshed model (`refresh.rs`) reads. Its position is the snapshot's sequence number.
pub(crate) struct SnapshotSource {
    lakehouse: Lakehouse,
    upstream: TableIdent,
    key: String,
    /// The sequence number of the snapshot last read (0: none).
    position: i64,
    /// The upstream table's uuid at that snapshot (a rebuilt table starts its numbers again).
    uuid: Option<String>,
    slot_schema: SchemaRef,
}

impl std::fmt::Debug for SnapshotSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSource")
            .field("upstream", &self.upstream)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

impl SnapshotSource {
    /// The source `model_id` of `project` reads `upstream_id`'s table through, its rows put in
    /// `slot_schema`.
    pub(crate) fn new(
        lakehouse: &Lakehouse,
        project: &Project,
        upstream_id: &str,
        slot_schema: SchemaRef,
    ) -> Result<SnapshotSource, EngineError> {
        let upstream = upstream_table(lakehouse, project, upstream_id)?;
        Ok(SnapshotSource {
            lakehouse: lakehouse.clone(),
            key: table_key(&upstream),
            upstream,
            position: 0,
            uuid: None,
            slot_schema,
        })
    }

    fn nothing(&self) -> Taken {
        Taken {
            batch: RecordBatch::new_empty(self.slot_schema.clone()),
            rejected: Vec::new(),
            watermark: None,
            records: 0,
            full: false,
        }
    }
}

#[async_trait::async_trait]
impl Source for SnapshotSource {
    fn key(&self) -> &str {
        &self.key
    }

    fn rewind(&mut self, committed: &Offsets) -> Result<(), SourceError> {
        self.position = table_position(committed, &self.key)?;
        Ok(())
    }

    async fn read(&mut self, _max: usize) -> Result<Taken, SourceError> {
        let upstream = self.upstream.clone();
        let read_err = |e: kappa_lakehouse::LakehouseError| {
            SourceError::Unavailable(format!("reading {upstream}: {e}"))
        };
        let Some(table) = self
            .lakehouse
            .load_table_if_exists(&self.upstream)
            .await
            .map_err(read_err)?
        else {
            return Ok(self.nothing());
        };
        let Some(main) = table.metadata().current_snapshot() else {
            return Ok(self.nothing());
        };
        let uuid = table.metadata().uuid().to_string();
        let sequence = main.sequence_number();
        if sequence == self.position && self.uuid.as_ref().is_none_or(|u| *u == uuid) {
            return Ok(self.nothing());
        }
        let added = self
            .lakehouse
            .added_in(&table, main, 0)
            .await
            .map_err(read_err)?;
        let batch = read_files(&self.lakehouse, &table, &added.files, &self.slot_schema)
            .await
            .map_err(SourceError::Unavailable)?;
        self.position = sequence;
        self.uuid = Some(uuid);
        Ok(Taken {
            // A snapshot with no rows is news too: the model's result changes with it.
            records: batch.num_rows().max(1),
            batch,
            rejected: Vec::new(),
            watermark: None,
            full: false,
        })
    }

    fn position(&self) -> BTreeMap<u32, u64> {
        BTreeMap::from([(0, u64::try_from(self.position).unwrap_or(0))])
    }

    fn restore(&mut self, properties: Option<&HashMap<String, String>>) {
        self.uuid = properties
            .and_then(|p| p.get(UPSTREAM_UUID_PROPERTY))
            .cloned();
    }

    fn properties(&self, into: &mut HashMap<String, String>) {
        if let Some(uuid) = &self.uuid {
            into.insert(UPSTREAM_UUID_PROPERTY.to_owned(), uuid.clone());
        }
    }

    fn waiter(&self) -> Waiter {
        Waiter::Poll(Duration::from_millis(POLL_MS))
    }
}

/// The watermark of `topic` that the upstream's commit with sequence number `sequence`
/// recorded, if that snapshot is still in its metadata (a later read closes the windows
/// otherwise).
fn watermark_at(source: &Table, topic: &str, marks: &mut Watermarks, sequence: i64) -> Option<i64> {
    let snapshot = source
        .metadata()
        .snapshots()
        .find(|s| s.sequence_number() == sequence)?;
    let saved: BTreeMap<String, serde_json::Value> = snapshot
        .summary()
        .additional_properties
        .get(WATERMARKS_PROPERTY)
        .and_then(|v| serde_json::from_str(v).ok())?;
    marks.load(saved.get(topic)).ok()?;
    marks.watermark()
}

/// The position on a table `committed` records under `key` (0: none).
fn table_position(committed: &Offsets, key: &str) -> Result<i64, SourceError> {
    match committed.get(key).and_then(|p| p.get(&0)) {
        Some(&position) => i64::try_from(position)
            .map_err(|_| SourceError::Read(format!("{key}: position {position} out of range"))),
        None => Ok(0),
    }
}

/// The rows of `files` of `table`, one batch in `schema` (columns by name, cast).
pub(crate) async fn read_files(
    lakehouse: &Lakehouse,
    table: &Table,
    files: &[kappa_lakehouse::AddedFile],
    schema: &SchemaRef,
) -> Result<RecordBatch, String> {
    let mut batches = Vec::new();
    for file in files {
        for batch in lakehouse
            .read_data_file(table, &file.file)
            .await
            .map_err(|e| format!("reading {}: {e}", table.identifier()))?
        {
            batches.push(conform(&batch, schema)?);
        }
    }
    arrow::compute::concat_batches(schema, &batches).map_err(|e| e.to_string())
}

/// `batch` (read back from Parquet) with the columns and types of `schema`, by name.
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, String> {
    let mut columns = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let column = batch
            .column_by_name(field.name())
            .ok_or_else(|| format!("the upstream's table has no column `{}`", field.name()))?;
        columns.push(
            arrow::compute::cast(column, field.data_type())
                .map_err(|e| format!("column `{}`: {e}", field.name()))?,
        );
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}
