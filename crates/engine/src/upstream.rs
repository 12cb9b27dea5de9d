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
use kappa_pipeline::Project;

use crate::commit_record::Offsets;
use crate::error::EngineError;
use crate::event_log::EventLog;
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

/// Holds position 0 on each upstream table `model_id` reads: nothing of it is merged until the
/// model's runner has read its own position. Called before a runner starts, so that the
/// upstream's runner, starting beside it, cannot merge past that position first.
pub fn hold_before_start(lakehouse: &Lakehouse, project: &Project, model_id: &str) {
    let Ok(reader) = crate::tables::live_table(lakehouse, project, model_id) else {
        return;
    };
    for upstream_id in project.reads_tables.get(model_id).into_iter().flatten() {
        if let Ok(upstream) = upstream_table(lakehouse, project, upstream_id) {
            lakehouse.hold(&upstream, &reader.to_string(), 0);
        }
    }
}

/// The upstream models whose published tables `model_id` of `project` reads, if it reads any
/// (see [`reading_of`]).
pub async fn readable_upstream(project: &Project, model_id: &str) -> Option<Vec<String>> {
    reading_of(project, model_id)
        .await
        .map(|(upstreams, _)| upstreams)
}

/// The name a reader's commits record the upstream table `table`'s `name`
/// ([`UPSTREAM_UUID_PROPERTY`], [`UPSTREAM_BEGAN_PROPERTY`]) under: one per table read (a join
/// of two models reads two).
fn property_of(name: &str, table: &TableIdent) -> String {
    format!("{name}:{table}")
}

/// What a reader's commit (its summary's `properties`) recorded as `name` of the upstream
/// table `table`; a commit of a kappa that read one table at most recorded it as `name` alone.
pub(crate) fn recorded<'p>(
    properties: &'p HashMap<String, String>,
    name: &str,
    table: &TableIdent,
) -> Option<&'p String> {
    properties
        .get(&property_of(name, table))
        .or_else(|| properties.get(name))
}

/// How a model reads its upstreams' published tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// The rows each commit adds, in commit order ([`TableSource`]).
    Stream,
    /// The whole table at each new snapshot, the model's SQL run over it as a batch
    /// ([`SnapshotSource`], `refresh.rs`).
    Refresh,
    /// As a side of a join of two streams, the other a topic or another model's table: the
    /// rows each commit adds, in commit order, with event time judged over them
    /// ([`TableSource::judging_lateness`]).
    Join,
}

/// The upstream models whose published tables `model_id` of `project` reads, and how:
/// - a model that reads only one model whose table is upserted in place (a GROUP BY or a
///   dimension) is refreshed from it (any SQL);
/// - a model that reads one model and otherwise only dimensions, where that model appends
///   (row by row, windows, deduplication, a stream join — never rewrites rows), reads its
///   commits as a stream when over the table it runs as it would recomputing that model: row
///   by row, one GROUP BY without windows (neither depends on the order of the rows), or
///   windows over the event time of an upstream that deduplicates (which emits rows as its
///   watermark passes them, so its recorded watermark closes them);
/// - a model that joins two streams, one or both of them models that append row by row over
///   one topic, reads each such model's commits as a side of the join (`joined_upstreams`).
pub async fn reading_of(project: &Project, model_id: &str) -> Option<(Vec<String>, Reading)> {
    if let Some((upstream_id, planned)) = refresh_plan(project, model_id).await {
        planned.ok()?;
        return Some((vec![upstream_id], Reading::Refresh));
    }
    if let Some(upstreams) = joined_upstreams(project, model_id).await {
        return Some((upstreams, Reading::Join));
    }
    let upstream_id = crate::plan_tables::upstream_of(project, model_id)?;
    // A dimension's table is rewritten in place: it is looked up, not read as a stream.
    if upserted(project, &upstream_id).await {
        return None;
    }
    // `plan_over_upstream` refuses what would run another way over the table.
    plan_over_upstream(project, model_id).await.ok()?;
    Some((vec![upstream_id], Reading::Stream))
}

/// The models whose tables `model_id` reads as sides of a join of two streams: it joins a
/// model that appends with a stream topic, or two such models (and otherwise looks up
/// dimensions), and each model's files carry the event-time marks its side is judged by
/// ([`joined_side`]). Sorted by name (as `Model::inputs`); the sides are matched by name.
async fn joined_upstreams(project: &Project, model_id: &str) -> Option<Vec<String>> {
    let (upstreams, streams) = crate::plan::models_read(project, model_id)?;
    if upstreams.is_empty() || upstreams.len() + streams != 2 {
        return None;
    }
    for upstream in &upstreams {
        if upserted(project, upstream).await {
            return None;
        }
    }
    let planned = crate::plan::plan_model_reading(project, model_id, &upstreams)
        .await
        .ok()?;
    for upstream in &upstreams {
        joined_side(project, &planned, upstream).await?;
    }
    Some(upstreams)
}

/// Where the side of `planned`'s join that reads `upstream`'s table takes its event time
/// from: the upstream's topic and the timestamp field of it that the side's time column is
/// (the upstream runs row by row over that one topic and passes the field through, so that
/// its files' marks bound the column). `None`: no such side.
pub(crate) async fn joined_side(
    project: &Project,
    planned: &crate::plan::PlannedModel,
    upstream: &str,
) -> Option<(String, String)> {
    let join = &planned.join.as_ref()?.found;
    let column = match (&join.left_topic, &join.right_topic) {
        (left, _) if left == upstream => &join.left_time,
        (_, right) if right == upstream => &join.right_time,
        _ => return None,
    };
    // Only a model that reads its topic itself marks its files (one reading another model's
    // table has no partitions to mark).
    let reads_a_model = project.models.get(upstream)?.inputs.iter().any(
        |input| matches!(input, kappa_pipeline::Input::Model(m) if !project.looks_up(upstream, m)),
    );
    let up = crate::plan::plan_model(project, upstream).await.ok()?;
    if reads_a_model
        || up.shape != crate::plan::Shape::RowByRow
        || up.dedup.is_some()
        || up.join.is_some()
        || project.is_dimension(upstream)
    {
        return None;
    }
    let output = datafusion::common::Column::from_name(column);
    let field = crate::windowed::source_column(
        &datafusion::logical_expr::Expr::Column(output.clone()),
        &up.plan,
    )?;
    let spec = project.topics.get(&up.topic)?;
    let schema = crate::schema::topic_schema(spec);
    let marked = schema.field_with_name(&field).ok()?.data_type().clone();
    // The same instants as the field the marks follow (a cast to seconds would judge a
    // truncated time against marks of the exact ones).
    let published = up
        .plan
        .schema()
        .field_with_unqualified_name(column)
        .ok()?
        .data_type()
        .clone();
    (matches!(marked, arrow::datatypes::DataType::Timestamp(..)) && marked == published)
        .then_some((up.topic, field))
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

/// Which models of `project` read upstreams' published tables, with those upstreams
/// (`Project::reads_tables` of a project no version of which ran before).
pub async fn table_readers(project: &Project) -> BTreeMap<String, Vec<String>> {
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
    /// The upstream model (what the dead letters of late rows name).
    upstream_id: String,
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
    /// A side of a join of two streams: the late rows set aside, judged per source partition
    /// by the event-time marks the upstream's files carry.
    lateness: Option<Lateness>,
}

/// How a side of a join judges the upstream's rows late: its event-time column is the field
/// `field` of the upstream's topic `topic`, whose marks (`kappa_lakehouse::marks`) every data
/// file of the upstream carries.
#[derive(Debug, Clone)]
pub(crate) struct Lateness {
    /// The column's index in the rows read.
    index: usize,
    topic: String,
    field: String,
    /// The topic's partitions: a watermark needs a mark from each.
    partitions: usize,
    delay_us: i64,
    /// The watermark after the rows read so far (never lower than before).
    watermark: Option<i64>,
}

impl Lateness {
    /// The watermark `marks` (a file's `before` or `after`) give: the least partition's mark
    /// less the delay, once every partition has one.
    fn watermark_of(
        &self,
        file: Option<&kappa_lakehouse::marks::FileMarks>,
        after: bool,
    ) -> Option<i64> {
        let marks = file?.get(&self.topic)?.get(&self.field)?;
        let by_partition = if after { &marks.after } else { &marks.before };
        if by_partition.len() < self.partitions {
            return None;
        }
        by_partition
            .values()
            .min()
            .map(|m| m.saturating_sub(self.delay_us))
    }
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
        log: &EventLog,
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
                let partitions = log.partition_count(topic)?;
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
            upstream_id: upstream_id.to_owned(),
            upstream,
            holder,
            position: 0,
            began_at: 0,
            uuid: None,
            slot_schema,
            marks,
            lateness: None,
        })
    }

    /// The source as a side of a join of two streams, whose event time is `event_time` (a
    /// column of the upstream's rows, the field `field` of its topic `topic` of `partitions`
    /// partitions): a row of a file whose time is behind the watermark the file's marks held
    /// before its commit (each partition's greatest time then, the least of them, less the
    /// delay) is late — set aside and reported. That watermark is never above the one the
    /// model would have judged the row by reading the topic itself (its own partition's mark
    /// at that row), so every row it would keep is kept; and every later file's is at least
    /// the watermark after this one's commit, which the source gives the join.
    pub(crate) fn judging_lateness(
        mut self,
        event_time: &crate::plan::EventTime,
        topic: &str,
        field: &str,
        partitions: u32,
    ) -> TableSource {
        self.lateness = Some(Lateness {
            index: event_time.index,
            topic: topic.to_owned(),
            field: field.to_owned(),
            partitions: usize::try_from(partitions).unwrap_or(usize::MAX),
            delay_us: i64::try_from(event_time.delay_ms)
                .unwrap_or(i64::MAX / 1000)
                .saturating_mul(1000),
            watermark: None,
        });
        self
    }

    /// The rows of `files` (commits in order), the late ones set aside when the source judges
    /// lateness; and the greatest watermark the files' marks give after their commits.
    async fn rows_of(
        &self,
        source: &Table,
        files: &[kappa_lakehouse::AddedFile],
    ) -> Result<(RecordBatch, Vec<crate::decode::Rejected>, Option<i64>), SourceError> {
        let Some(lateness) = &self.lateness else {
            let batch = read_files(&self.lakehouse, source, files, &self.slot_schema)
                .await
                .map_err(SourceError::Unavailable)?;
            return Ok((batch, Vec::new(), None));
        };
        let mut kept = Vec::new();
        let mut rejected = Vec::new();
        let mut after = None;
        for added in files {
            let (batches, marks) = self
                .lakehouse
                .read_marked_file(source, &added.file)
                .await
                .map_err(|e| SourceError::Unavailable(format!("reading {}: {e}", self.upstream)))?;
            let before = lateness.watermark_of(marks.as_ref(), false);
            after = after.max(lateness.watermark_of(marks.as_ref(), true));
            for batch in batches {
                let batch = conform(&batch, &self.slot_schema).map_err(SourceError::Read)?;
                let (rows, late) =
                    crate::watermark::set_behind_aside(&batch, lateness.index, before)
                        .map_err(|e| SourceError::Read(format!("judging lateness: {e}")))?;
                for crate::watermark::Late { row, reason } in late {
                    rejected.push(crate::decode::Rejected {
                        partition: 0,
                        offset: u64::try_from(added.sequence).unwrap_or(0),
                        reason: format!(
                            "{reason} (a row {} published in its commit {})",
                            self.upstream_id, added.sequence
                        ),
                        raw: row_json(&batch, row),
                    });
                }
                kept.push(rows);
            }
        }
        let batch = arrow::compute::concat_batches(&self.slot_schema, &kept)
            .map_err(|e| SourceError::Read(e.to_string()))?;
        Ok((batch, rejected, after))
    }
}

/// Row `row` of `batch` as one line of JSON (what a dead letter shows of it).
fn row_json(batch: &RecordBatch, row: usize) -> Vec<u8> {
    let mut writer = arrow::json::LineDelimitedWriter::new(Vec::new());
    match writer
        .write(&batch.slice(row, 1))
        .and_then(|()| writer.finish())
    {
        Ok(()) => {
            let mut bytes = writer.into_inner();
            if bytes.last() == Some(&b'\n') {
                bytes.pop();
            }
            bytes
        }
        Err(e) => format!("(row {row}: {e})").into_bytes(),
    }
}

#[async_trait::async_trait]
impl Source for TableSource {
    fn key(&self) -> &str {
        &self.key
    }

    fn letters_name(&self) -> &str {
        &self.upstream_id
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
        let (batch, rejected, mut after) = self.rows_of(&source, &added.files[..taken]).await?;
        if all && let Some(lateness) = &self.lateness {
            // Read to the end: the last commit's marks hold even when it added no file (a
            // model that filtered its records out still moves the watermark).
            let head = source
                .metadata()
                .current_snapshot()
                .and_then(|s| {
                    s.summary()
                        .additional_properties
                        .get(kappa_lakehouse::marks::FILE_MARKS_PROPERTY)
                })
                .and_then(|text| kappa_lakehouse::marks::parse(text));
            after = after.max(lateness.watermark_of(head.as_ref(), true));
        }
        // Every row of the commits up to `complete` has been read: a file still to read
        // (merged before this reader held its position) may hold rows of earlier commits than
        // the ones just read, which the watermark must not have passed.
        let complete = added.files[taken..]
            .iter()
            .map(|f| f.first - 1)
            .min()
            .map_or(target, |first| first.min(target));
        let watermark = match (&mut self.marks, &mut self.lateness) {
            (Some((topic, marks)), _) => watermark_at(&source, topic, marks, complete),
            // Files merged before this reader began may still hold rows of earlier commits,
            // whose marks are lower: no watermark until they are read.
            (None, Some(_)) if complete < target => None,
            (None, Some(lateness)) => {
                lateness.watermark = lateness.watermark.max(after);
                lateness.watermark
            }
            (None, None) => None,
        };
        self.position = target;
        Ok(Taken {
            batch,
            rejected,
            watermark,
            records,
            full: !all,
        })
    }

    fn position(&self) -> BTreeMap<u32, u64> {
        BTreeMap::from([(0, u64::try_from(self.position).unwrap_or(0))])
    }

    fn restore(&mut self, properties: Option<&HashMap<String, String>>) {
        let property = |name: &str| properties.and_then(|p| recorded(p, name, &self.upstream));
        self.began_at = property(UPSTREAM_BEGAN_PROPERTY)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        self.uuid = property(UPSTREAM_UUID_PROPERTY).cloned();
    }

    fn properties(&self, into: &mut HashMap<String, String>) {
        if let Some(uuid) = &self.uuid {
            into.insert(
                property_of(UPSTREAM_UUID_PROPERTY, &self.upstream),
                uuid.clone(),
            );
        }
        into.insert(
            property_of(UPSTREAM_BEGAN_PROPERTY, &self.upstream),
            self.began_at.to_string(),
        );
    }

    fn landed(&mut self, committed: &Offsets) {
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
            .and_then(|p| recorded(p, UPSTREAM_UUID_PROPERTY, &self.upstream))
            .cloned();
    }

    fn properties(&self, into: &mut HashMap<String, String>) {
        if let Some(uuid) = &self.uuid {
            into.insert(
                property_of(UPSTREAM_UUID_PROPERTY, &self.upstream),
                uuid.clone(),
            );
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
pub(crate) fn table_position(committed: &Offsets, key: &str) -> Result<i64, SourceError> {
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
