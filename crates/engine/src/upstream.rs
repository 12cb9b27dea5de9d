//! A model that reads the committed table of the one model it reads, as a stream, instead of
//! recomputing that model from its topics: what a deploy runs for a changed model over an
//! unchanged upstream, so the upstream is not computed twice and gets no new commits.
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
//! upserted: `plan::plan_over_upstream`), so the result equals the model recomputed inline.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::datasource::TableProvider;
use kappa_lakehouse::{Lakehouse, Table, TableIdent};
use kappa_pipeline::Project;

use kappa_log::{Log, Record};

use crate::decode::Rejected;
use crate::plan::plan_over_upstream;
use crate::runner::{
    ATTEMPT_PROPERTY, COMMIT_RECORDS_MAX, Compute, DEAD_LETTERS_PROPERTY,
    GROUPED_COMMIT_RECORDS_MAX, LIVE_COMMIT_INTERVAL_MS, OFFSETS_PROPERTY, Offsets,
    PROGRESS_COMMIT_INTERVAL_MS, RunnerError, VERSION_PROPERTY, catch_up_dimensions, commit_landed,
    committed_offsets, dead_letter, dead_letter_topic, dead_letters_after, model_version,
    open_dimensions, open_output, reset_dimensions, sleep_or_stop,
};
use crate::watermark::{WATERMARKS_PROPERTY, Watermarks};

/// Snapshot property: the upstream table's uuid, so that a rebuilt upstream is noticed.
pub const UPSTREAM_UUID_PROPERTY: &str = "kappa.upstream-uuid";
/// Snapshot property: the upstream's last sequence number when the model began reading it
/// from its start (files merged before then are read whole, not mistaken for a broken stream).
pub const UPSTREAM_BEGAN_PROPERTY: &str = "kappa.upstream-began";
/// How a position on a table is named in `kappa.offsets`: `table:<namespace>.<name>`.
pub const TABLE_KEY_PREFIX: &str = "table:";
/// While live, how often the upstream's table is looked at.
const POLL_MS: u64 = 100;
/// After a failure, wait this long before trying again.
const RETRY_DELAY_MS: u64 = 1000;

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
    crate::runner::live_table(lakehouse, project, upstream_id)
}

/// Holds position 0 on the upstream table `model_id` reads, if it reads one: nothing of it is
/// merged until the model's runner has read its own position. Called before a runner starts,
/// so that the upstream's runner, starting beside it, cannot merge past that position first.
pub fn hold_before_start(lakehouse: &Lakehouse, project: &Project, model_id: &str) {
    let Some(upstream_id) = project.reads_tables.get(model_id) else {
        return;
    };
    let reader = crate::runner::live_table(lakehouse, project, model_id);
    if let (Ok(upstream), Ok(reader)) = (upstream_table(lakehouse, project, upstream_id), reader) {
        lakehouse.hold(&upstream, &reader.to_string(), 0);
    }
}

/// The upstream model whose committed table `model_id` of `project` can read as a stream, if
/// it can: it reads one model and otherwise only dimensions, that model appends (row by row,
/// windows, deduplication, a stream join — never rewrites rows), and over the table it runs as
/// it would recomputing that model: row by row, one GROUP BY without windows (neither depends on
/// the order of the rows), or windows over the event time of an upstream that deduplicates
/// (which emits rows as its watermark passes them, so its recorded watermark closes them).
pub async fn readable_upstream(project: &Project, model_id: &str) -> Option<String> {
    // Expectations are checked by the runner over the topics only (their counts, the
    // quarantine, the audit branch): a model with any recomputes what it reads.
    if !project.models.get(model_id)?.config.expectations.is_empty() {
        return None;
    }
    let upstream_id = crate::plan::upstream_of(project, model_id)?;
    let upstream = crate::plan::plan_model(project, &upstream_id).await.ok()?;
    if upstream.shape == crate::plan::Shape::Grouped {
        return None;
    }
    // `plan_over_upstream` refuses what would run another way over the table.
    plan_over_upstream(project, model_id).await.ok()?;
    Some(upstream_id)
}

/// Runs `model_id` over `upstream_id`'s committed table until `stop` turns true, as
/// [`crate::runner::run_version`] runs a model over its topics.
pub(crate) async fn run_over_upstream(
    log: Arc<Log>,
    lakehouse: Lakehouse,
    project: Arc<Project>,
    model_id: String,
    upstream_id: String,
    publish_if_new: bool,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), RunnerError> {
    let (planned, _) = match plan_over_upstream(&project, &model_id).await {
        Ok(planned) => planned,
        Err(datafusion::error::DataFusionError::NotImplemented(reason)) => {
            return Err(RunnerError::Unsupported {
                model: model_id,
                reason,
            });
        }
        Err(source) => {
            return Err(RunnerError::Plan {
                model: model_id,
                source,
            });
        }
    };
    let slot_schema: SchemaRef = planned.slot.schema();
    let mut dims = open_dimensions(&log, &project, &model_id, planned.dimensions.clone()).await?;
    let dead_letters = dead_letter_topic(&log).map_err(|source| RunnerError::Log {
        model: model_id.clone(),
        source,
    })?;
    // Windows close as the upstream's recorded watermark passes them.
    let mut marks = match &planned.upstream_marks {
        Some((topic, et)) => {
            let partitions = log
                .topic(topic)
                .map_err(|source| RunnerError::Log {
                    model: model_id.clone(),
                    source,
                })?
                .partition_count();
            Some((
                topic.clone(),
                Watermarks::new(&et.column, et.index, et.delay_ms, partitions),
            ))
        }
        None => None,
    };
    let mut compute = Compute::new(
        planned.shape,
        planned.ctx,
        planned.slot,
        planned.plan,
        planned.event_time,
    )
    .map_err(|source| RunnerError::Plan {
        model: model_id.clone(),
        source,
    })?;
    let lake_err = |source| RunnerError::Lakehouse {
        model: model_id.clone(),
        source,
    };
    let version = model_version(&project, &model_id);
    let output_schema = compute.output_schema().clone();
    let (ident, mut table) = open_output(
        &lakehouse,
        &project,
        &model_id,
        &version,
        &output_schema,
        publish_if_new,
    )
    .await?;
    let upstream = upstream_table(&lakehouse, &project, &upstream_id).map_err(lake_err)?;
    let key = table_key(&upstream);
    let holder = ident.to_string();
    // Until the position is known, the upstream merges nothing.
    hold_before_start(&lakehouse, &project, &model_id);
    compute
        .restore(&lakehouse, &table)
        .await
        .map_err(lake_err)?;
    let mut position = committed_position(&table, &key);
    // The upstream's last commit when this table began reading it from its start.
    let mut began_at = last_property(&table, UPSTREAM_BEGAN_PROPERTY)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    lakehouse.hold(&upstream, &holder, position);
    reset_dimensions(&mut dims, &committed_offsets(&table), &model_id).await;
    // Dimension records already dead-lettered past the last commit are not written again.
    let dead_letters_from = last_property(&table, DEAD_LETTERS_PROPERTY)
        .and_then(|o| o.parse::<u64>().ok())
        .unwrap_or(0);
    let mut already_dead = dead_letters_after(&dead_letters, dead_letters_from, &model_id);
    // Records of dimensions that do not fit their schema, until the commit that passes them.
    let mut dim_rejected: Vec<(String, Rejected)> = Vec::new();
    tracing::info!(model = %model_id, upstream = %upstream, position, "model starts over its upstream's table");

    let mut far_behind = true;
    let mut last_commit = Instant::now();
    // The position the table records, and the records read since it was committed.
    let mut table_position = position;
    let mut uncommitted = 0usize;
    // After a failure: the computation, the position and the dimensions back to the last
    // commit (read again), after a pause.
    macro_rules! start_over {
        () => {{
            let Some(recovered) =
                start_over(&lakehouse, &mut compute, &table, &key, &mut stop).await
            else {
                return Ok(());
            };
            (table, position) = recovered;
            (table_position, uncommitted) = (position, 0);
            reset_dimensions(&mut dims, &committed_offsets(&table), &model_id).await;
            dim_rejected.clear();
        }};
    }

    loop {
        if *stop.borrow() {
            return Ok(());
        }
        if !far_behind {
            let since = last_commit.elapsed();
            let interval = Duration::from_millis(LIVE_COMMIT_INTERVAL_MS);
            if since < interval {
                let wait = (interval - since).as_micros().div_ceil(1000) as u64;
                sleep_or_stop(&mut stop, wait).await;
                continue;
            }
        }
        // It reads only what its upstream published, but says why nothing comes while the
        // upstream (or one above it) waits for a decision or fails.
        if let Some((upstream, reason)) =
            crate::runner::blocked_upstream(&lakehouse, &project, &model_id)
        {
            return Err(RunnerError::Waiting {
                model: model_id,
                upstream,
                reason,
            });
        }
        // Dimensions first: every row is looked up in what its dimensions hold by now.
        if !catch_up_dimensions(&mut dims, &mut dim_rejected, &model_id).await {
            start_over!();
            continue;
        }
        let source = match lakehouse.load_table(&upstream).await {
            Ok(source) => source,
            Err(e) => {
                tracing::warn!(model = %model_id, upstream = %upstream, error = %e, "the upstream's table cannot be read yet");
                sleep_or_stop(&mut stop, RETRY_DELAY_MS).await;
                continue;
            }
        };
        let uuid = source.metadata().uuid().to_string();
        let added = match lakehouse.added_after(&source, position).await {
            Ok(added) => added,
            Err(e) => {
                tracing::error!(model = %model_id, error = %e, "listing the upstream's files failed; retrying");
                sleep_or_stop(&mut stop, RETRY_DELAY_MS).await;
                continue;
            }
        };
        let recorded_uuid = last_property(&table, UPSTREAM_UUID_PROPERTY);
        let rebuilt = recorded_uuid.is_some_and(|u| u != uuid);
        if position == 0 {
            // Reading from the start: files merged before now are read whole.
            began_at = added.last_sequence;
        }
        if position > 0 && (rebuilt || !added.continues(position, began_at)) {
            // The upstream was rebuilt, or merged files across this position: what it added
            // since cannot be told apart any more.
            tracing::warn!(model = %model_id, upstream = %upstream, position, "the upstream's table no longer continues from this position; rebuilding from its start");
            table = lakehouse
                .replace_table(
                    &ident,
                    &output_schema,
                    &project.models[&model_id].config.partition_by,
                )
                .await
                .map_err(lake_err)?;
            compute
                .restore(&lakehouse, &table)
                .await
                .map_err(lake_err)?;
            (position, table_position, uncommitted) = (0, 0, 0);
            lakehouse.hold(&upstream, &holder, 0);
            reset_dimensions(&mut dims, &Offsets::new(), &model_id).await;
            dim_rejected.clear();
            continue;
        }
        // Whole commits, oldest first, up to a micro-batch's worth of records.
        let mut records = 0usize;
        let mut taken = 0;
        let mut target = position;
        for (i, added_file) in added.files.iter().enumerate() {
            let starts_commit = i == 0 || added.files[i - 1].sequence != added_file.sequence;
            if starts_commit && records >= COMMIT_RECORDS_MAX {
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
        far_behind = !all;
        let progress_due = target != table_position
            && last_commit.elapsed() >= Duration::from_millis(PROGRESS_COMMIT_INTERVAL_MS);
        if taken == 0 && !progress_due {
            if target != position {
                position = target;
            }
            crate::runner::recovered(&lakehouse, &ident);
            sleep_or_stop(&mut stop, POLL_MS).await;
            continue;
        }
        let mut pushed = Ok(());
        for added_file in &added.files[..taken] {
            let batches = match lakehouse.read_data_file(&source, &added_file.file).await {
                Ok(batches) => batches,
                Err(e) => {
                    pushed = Err(e.to_string());
                    break;
                }
            };
            for batch in batches {
                let cast = match conform(&batch, &slot_schema) {
                    Ok(cast) => cast,
                    Err(e) => {
                        pushed = Err(e);
                        break;
                    }
                };
                if let Err(e) = compute.push(cast, None).await {
                    pushed = Err(e.to_string());
                    break;
                }
            }
            if pushed.is_err() {
                break;
            }
        }
        // Every row of the commits up to `complete` has been read: a file still to read
        // (merged before this reader held its position) may hold rows of earlier commits than
        // the ones just read, which the watermark must not have passed.
        let complete = added.files[taken..]
            .iter()
            .map(|f| f.first - 1)
            .min()
            .map_or(target, |first| first.min(target));
        if pushed.is_ok()
            && let Some((topic, marks)) = &mut marks
            && let Some(watermark) = watermark_at(&source, topic, marks, complete)
            && let Err(e) = compute
                .push(RecordBatch::new_empty(slot_schema.clone()), Some(watermark))
                .await
        {
            pushed = Err(e.to_string());
        }
        if let Err(e) = pushed {
            tracing::error!(model = %model_id, error = %e, "computing over the upstream's rows failed; retrying");
            start_over!();
            continue;
        }
        position = target;
        uncommitted += records;
        let grouped_waits = far_behind
            && matches!(compute, Compute::Grouped(_) | Compute::Dimension(_))
            && uncommitted < GROUPED_COMMIT_RECORDS_MAX;
        if grouped_waits || (!compute.has_changes() && !progress_due && dim_rejected.is_empty()) {
            crate::runner::recovered(&lakehouse, &ident);
            continue;
        }
        let fresh: Vec<&(String, Rejected)> = dim_rejected
            .iter()
            .filter(|(t, r)| !already_dead.contains(&(t.clone(), r.partition, r.offset)))
            .collect();
        if !fresh.is_empty() {
            let records: Vec<Record> = fresh
                .iter()
                .map(|(t, r)| dead_letter(&model_id, t, r))
                .collect();
            if let Err(e) = dead_letters.append(records).await {
                tracing::error!(model = %model_id, error = %e, "writing dead letters failed; retrying");
                sleep_or_stop(&mut stop, RETRY_DELAY_MS).await;
                continue;
            }
            for (t, r) in fresh {
                already_dead.insert((t.clone(), r.partition, r.offset));
            }
        }
        let attempt = crate::runner::uuid_like();
        let mut offsets: Offsets = BTreeMap::from([(
            key.clone(),
            BTreeMap::from([(0, u64::try_from(position).unwrap_or(0))]),
        )]);
        for (dimension, _) in &dims {
            offsets.insert(dimension.offsets_key.clone(), dimension.next_offsets());
        }
        let properties = HashMap::from([
            (
                OFFSETS_PROPERTY.to_owned(),
                serde_json::to_string(&offsets).unwrap_or_default(),
            ),
            (VERSION_PROPERTY.to_owned(), version.clone()),
            (ATTEMPT_PROPERTY.to_owned(), attempt.clone()),
            (UPSTREAM_UUID_PROPERTY.to_owned(), uuid.clone()),
            (UPSTREAM_BEGAN_PROPERTY.to_owned(), began_at.to_string()),
            (
                DEAD_LETTERS_PROPERTY.to_owned(),
                dead_letters
                    .partition(0)
                    .map(|p| p.offsets().visible_offset)
                    .unwrap_or(0)
                    .to_string(),
            ),
        ]);
        let commit_started = Instant::now();
        let committed_now = compute.commit(&lakehouse, &table, properties).await;
        crate::metrics::COMMIT_SECONDS.observe(commit_started.elapsed());
        let landed = match committed_now {
            Ok(updated) => {
                table = updated;
                true
            }
            Err(e) => {
                let (reloaded, ours) = commit_landed(&lakehouse, &ident, &attempt).await;
                if let Some(reloaded) = reloaded {
                    table = reloaded;
                }
                if ours {
                    compute.landed();
                    tracing::warn!(model = %model_id, error = %e, "commit reported an error but landed");
                } else {
                    tracing::error!(model = %model_id, error = %e, "commit failed; rereading from the committed position");
                    start_over!();
                }
                ours
            }
        };
        if landed {
            crate::runner::recovered(&lakehouse, &ident);
            table_position = position;
            crate::metrics::THROUGHPUT.add(&model_id, &version, uncommitted as u64);
            uncommitted = 0;
            last_commit = Instant::now();
            lakehouse.hold(&upstream, &holder, position);
            dim_rejected.clear();
            // Records the commit passed are never read again.
            already_dead.retain(|(t, p, o)| {
                offsets
                    .get(t)
                    .and_then(|next| next.get(p))
                    .is_none_or(|next| o >= next)
            });
        }
    }
}

/// The position on the upstream's table that `table`'s last commit records under `key`
/// (0: nothing read).
fn committed_position(table: &Table, key: &str) -> i64 {
    last_property(table, OFFSETS_PROPERTY)
        .and_then(|o| serde_json::from_str::<Offsets>(&o).ok())
        .and_then(|o| o.get(key).and_then(|p| p.get(&0)).copied())
        .and_then(|p| i64::try_from(p).ok())
        .unwrap_or(0)
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

/// A summary property of `table`'s current snapshot.
fn last_property(table: &Table, name: &str) -> Option<String> {
    kappa_lakehouse::wap::head(table)
        .and_then(|s| s.summary().additional_properties.get(name).cloned())
}

/// After a failure: the computation back to the table's last commit (read again: the failed
/// commit may have landed) and its position. `None` when stopped meanwhile.
async fn start_over(
    lakehouse: &Lakehouse,
    compute: &mut Compute,
    table: &Table,
    key: &str,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<(Table, i64)> {
    loop {
        let reloaded = lakehouse.load_table(table.identifier()).await;
        let restored = match reloaded {
            Ok(reloaded) => match compute.restore(lakehouse, &reloaded).await {
                Ok(()) => Ok(reloaded),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        match restored {
            Ok(reloaded) => {
                let position = committed_position(&reloaded, key);
                sleep_or_stop(stop, RETRY_DELAY_MS).await;
                return Some((reloaded, position));
            }
            Err(e) => {
                tracing::error!(table = %table.identifier(), error = %e, "recovering failed; retrying");
                sleep_or_stop(stop, RETRY_DELAY_MS).await;
                if *stop.borrow() {
                    return None;
                }
            }
        }
    }
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
