//! The runner's loop, written once over the model's sources and operator: recover → read →
//! compute → commit → pace.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use kappa_lakehouse::{Lakehouse, Table, TableIdent};
use kappa_pipeline::Project;
use tokio::sync::watch;

use super::error::RunnerError;
use super::letters::DeadLetters;
use super::ready::{
    Ready, open_dimensions, open_output, over_tables, over_topics, written_from_topics,
};
use super::waiting::{first_blocked, recovered, upstream_tables, waits_for};
use super::wap::{deliver_quarantined, set_staging, settle};
use crate::commit_audit::CommitAudit;
use crate::commit_record::{ATTEMPT_PROPERTY, CommitRecord, Offsets};
use crate::decode::Rejected;
use crate::dimension::{CaughtUp, Dimension};
use crate::event_log::EventLog;
use crate::expect::RowChecks;
use crate::operator::{Operator, Stage};
use crate::source::{Source, SourceError, Taken};
use crate::tables::{model_version, quarantine_table};
use crate::watermark::WATERMARKS_PROPERTY;

/// While far behind, a micro-batch (and a commit) covers up to this many input records.
pub const COMMIT_RECORDS_MAX: usize = 262_144;

/// While far behind, a GROUP BY model commits once per this many input records: its commit
/// rewrites every changed group, which a replay changes all of each time, while what it holds
/// between commits is its groups, however many records went by.
pub const GROUPED_COMMIT_RECORDS_MAX: usize = 4 * COMMIT_RECORDS_MAX;

/// While live, commits are this far apart, and a new record is committed within this long.
pub const LIVE_COMMIT_INTERVAL_MS: u64 = 100;

/// How long progress over records that add no rows waits before it is committed anyway.
pub const PROGRESS_COMMIT_INTERVAL_MS: u64 = 1000;

/// A wait for a dimension this long is logged (shorter ones only at debug level).
const DIMENSION_WAIT_REPORT_S: u64 = 5;

/// After a failed commit, wait this long before trying again.
pub(super) const RETRY_DELAY_MS: u64 = 1000;

/// Runs `model` until `stop` turns true (see [`run_version`]); its table becomes the model's
/// public one at once when the model has none yet.
pub async fn run_model(
    log: EventLog,
    lakehouse: Lakehouse,
    project: Arc<Project>,
    model_id: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), RunnerError> {
    run_version(log, lakehouse, project, model_id, true, stop).await
}

/// After a commit reported an error, whose outcome is therefore unknown: the table read again
/// (if it can be) and whether its last commit is the attempt `attempt` — never retry blindly.
pub(crate) async fn commit_landed(
    lakehouse: &Lakehouse,
    ident: &kappa_lakehouse::TableIdent,
    attempt: &str,
) -> (Option<kappa_lakehouse::Table>, bool) {
    match lakehouse.load_table(ident).await {
        Ok(reloaded) => {
            let ours = kappa_lakehouse::wap::head(&reloaded)
                .and_then(|s| s.summary().additional_properties.get(ATTEMPT_PROPERTY))
                .is_some_and(|a| a == attempt);
            (Some(reloaded), ours)
        }
        Err(_) => (None, false),
    }
}

/// What catching the dimensions up came to.
pub(crate) enum Dimensions {
    Ready,
    /// A dimension model has not yet published what its topic holds: why.
    Waiting(String),
    /// One failed: it is to be rebuilt (start over).
    Failed,
}

/// Catches every dimension up to the end of its topic; the records that do not fit, of those
/// whose topic this model reports, are added to `rejected`.
pub(crate) async fn catch_up_dimensions(
    dims: &mut [(Dimension, bool)],
    rejected: &mut Vec<(String, Rejected)>,
    model: &str,
) -> Dimensions {
    for (dimension, reports) in dims.iter_mut() {
        match dimension.catch_up().await {
            Ok(CaughtUp::Ready(found)) if *reports => {
                rejected.extend(found.into_iter().map(|r| (dimension.topic_name.clone(), r)))
            }
            Ok(CaughtUp::Ready(_)) => {}
            Ok(CaughtUp::Waiting(why)) => return Dimensions::Waiting(why),
            Err(e) => {
                tracing::error!(model, topic = %dimension.topic_name, error = %e, "computing a dimension failed");
                return Dimensions::Failed;
            }
        }
    }
    Dimensions::Ready
}

/// Rebuilds every dimension to the offsets `committed` names.
pub(crate) async fn reset_dimensions(
    dims: &mut [(Dimension, bool)],
    committed: &Offsets,
    model: &str,
) {
    for (dimension, _) in dims.iter_mut() {
        if let Err(e) = dimension.reset(committed.get(&dimension.offsets_key)).await {
            tracing::error!(model, topic = %dimension.topic_name, error = %e, "rebuilding a dimension failed");
        }
    }
}

/// Puts every source's watermarks back to what the table's current snapshot (`properties`)
/// saved.
fn restore_marks(
    sources: &mut [Box<dyn Source>],
    properties: Option<&HashMap<String, String>>,
) -> Result<(), String> {
    let mut saved: BTreeMap<String, serde_json::Value> =
        crate::commit_record::summary_json(properties, WATERMARKS_PROPERTY)
            .map_err(|e| e.to_string())?;
    // Tables written before models read two topics saved one topic's `{partition: µs}`.
    if !saved.is_empty() && saved.keys().all(|k| k.parse::<u32>().is_ok()) {
        let legacy = serde_json::Value::Object(std::mem::take(&mut saved).into_iter().collect());
        if let Some(first) = sources.first() {
            saved.insert(first.key().to_owned(), legacy);
        }
    }
    for source in sources {
        let key = source.key().to_owned();
        source.load_marks(saved.get(&key))?;
    }
    Ok(())
}

pub(crate) async fn sleep_or_stop(stop: &mut tokio::sync::watch::Receiver<bool>, ms: u64) {
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(ms)) => {}
        _ = stop.changed() => {}
    }
}

/// A unique id for a commit attempt.
pub(crate) fn uuid_like() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{now:x}-{}-{n}", std::process::id())
}

/// Runs the version of `model` that `project` holds until `stop` turns true, into its own table
/// ([`crate::tables::version_table`]; with a catalog without aliases, into `layer.model`
/// itself). With `publish_if_new`, the public name `layer.model` is pointed at that table when
/// it names no table yet; otherwise the deploy publishes it at cutover. Errors of one commit
/// are logged and retried; only a model that cannot run at all returns an error.
pub async fn run_version(
    log: EventLog,
    lakehouse: Lakehouse,
    project: Arc<Project>,
    model_id: String,
    publish_if_new: bool,
    stop: watch::Receiver<bool>,
) -> Result<(), RunnerError> {
    match Run::start(log, lakehouse, project, model_id, publish_if_new, stop).await? {
        Some(run) => run.run().await,
        None => Ok(()),
    }
}

/// Copies a topic into its bronze table until `stop` turns true: the one loop, over `source`
/// (the topic's records as rows) and `operator` (appending them).
pub(crate) async fn run_bronze_table(
    log: &EventLog,
    lakehouse: Lakehouse,
    copy: BronzeCopy,
    source: Box<dyn Source>,
    operator: Box<dyn Operator>,
    stop: watch::Receiver<bool>,
) -> Result<(), RunnerError> {
    Run::bronze(log, lakehouse, copy, source, operator, stop)
        .await?
        .run()
        .await
}

/// A bronze table, as [`run_bronze_table`] writes it.
pub(crate) struct BronzeCopy {
    /// `bronze.<topic>`, as errors and logs name it.
    pub name: String,
    pub ident: TableIdent,
    /// The table as loaded.
    pub table: Table,
    pub partition_by: Vec<String>,
    /// What its commits record as their version, and its throughput's label.
    pub version: &'static str,
}

/// A running model: what it reads and computes, where it writes, and where it is.
pub(super) struct Run {
    pub(super) lakehouse: Lakehouse,
    /// The model it runs (none: a bronze table's copy of a topic).
    pub(super) model: Option<kappa_pipeline::Model>,
    pub(super) model_id: String,
    pub(super) version: String,
    pub(super) stop: watch::Receiver<bool>,

    pub(super) sources: Vec<Box<dyn Source>>,
    /// Its lookups, each with whether this model reports its topic's rejects.
    pub(super) dims: Vec<(Dimension, bool)>,
    pub(super) stage: Option<Box<dyn Stage>>,
    pub(super) operator: Box<dyn Operator>,
    /// Checked by the runner on the rows a row-by-row operator appends.
    pub(super) row_checks: Option<RowChecks>,

    pub(super) ident: TableIdent,
    pub(super) table: Table,
    pub(super) output_schema: SchemaRef,
    /// How its table is partitioned (`partition_by`), for a rebuild.
    pub(super) partition_by: Vec<String>,
    /// Its commits go to the audit branch and wait for their audit.
    pub(super) staged: bool,
    pub(super) audit: CommitAudit,
    pub(super) quarantine: TableIdent,
    /// The tables of the models it reads, looked at before each read.
    pub(super) upstream: Vec<(String, TableIdent)>,
    pub(super) dead_letters: DeadLetters,
    /// Letters this model wrote past its last commit (a retried batch must not write them
    /// again).
    pub(super) already_dead: BTreeSet<(String, u32, u64)>,

    /// Where the state is: the positions of the last commit plus what was read and committed
    /// nowhere because it wrote nothing.
    pub(super) committed: Offsets,
    /// The positions the table records.
    pub(super) table_offsets: Offsets,
    pub(super) last_commit: Instant,
    /// Records of dimensions that do not fit their schema, until the commit that passes them.
    pub(super) dim_rejected: Vec<(String, Rejected)>,
    /// A read waiting for a dimension model to publish what its topic held by then, and since
    /// when the run waits (and whether that wait was logged).
    pub(super) pending: Option<Read>,
    pub(super) waiting_since: Option<(Instant, bool)>,
    /// Rows of the commit being made that failed each row-level expectation.
    pub(super) failed_rows: BTreeMap<String, u64>,
    /// While far behind, each source's share of a commit's records.
    pub(super) share: usize,
    /// Whether the last read took a full share: far behind, commits follow each other with as
    /// many records as they may hold; live, they are LIVE_COMMIT_INTERVAL_MS apart and hold
    /// what arrived meanwhile.
    pub(super) far_behind: bool,
    /// Input records read since the last commit.
    pub(super) uncommitted: usize,
    /// The sources' watermarks after the last read.
    pub(super) last_watermarks: Vec<Option<i64>>,
}

/// What comes next in the loop.
pub(super) enum Next<T> {
    Go(T),
    /// Back to the top of the loop.
    Again,
    /// Stop was asked.
    Stop,
}

/// What a run is made of, before it runs: [`Run::start`]'s for a model, [`Run::bronze`]'s
/// for a bronze table.
struct Parts {
    lakehouse: Lakehouse,
    model: Option<kappa_pipeline::Model>,
    model_id: String,
    version: String,
    stop: watch::Receiver<bool>,
    sources: Vec<Box<dyn Source>>,
    dims: Vec<(Dimension, bool)>,
    stage: Option<Box<dyn Stage>>,
    operator: Box<dyn Operator>,
    row_checks: Option<RowChecks>,
    ident: TableIdent,
    table: Table,
    output_schema: SchemaRef,
    partition_by: Vec<String>,
    staged: bool,
    audit: CommitAudit,
    quarantine: TableIdent,
    upstream: Vec<(String, TableIdent)>,
    dead_letters: DeadLetters,
    already_dead: BTreeSet<(String, u32, u64)>,
    committed: Offsets,
}

/// One read of every source, ready to compute.
pub(super) struct Read {
    pub(super) records: usize,
    pub(super) batches: Vec<RecordBatch>,
    pub(super) watermarks: Vec<Option<i64>>,
    pub(super) rejected: Vec<(String, Rejected)>,
    /// The positions after it.
    pub(super) target: Offsets,
}

impl Run {
    /// Opens the model: plans it, opens its table, restores its state from the table's newest
    /// commit, and decides a commit that awaited its audit. `None`: stop was asked meanwhile.
    async fn start(
        log: EventLog,
        lakehouse: Lakehouse,
        project: Arc<Project>,
        model_id: String,
        publish_if_new: bool,
        stop: watch::Receiver<bool>,
    ) -> Result<Option<Run>, RunnerError> {
        let err_model = || model_id.clone();
        let lake_err = |source| RunnerError::Lakehouse {
            model: model_id.clone(),
            source,
        };
        let Ready {
            mut sources,
            dimensions,
            mut operator,
            mut stage,
        } = match project.reads_tables.get(&model_id) {
            Some(upstreams) => {
                over_tables(&log, &lakehouse, &project, &model_id, upstreams).await?
            }
            None => over_topics(&log, &project, &model_id).await?,
        };
        let mut dims = open_dimensions(&log, &lakehouse, &project, &model_id, dimensions).await?;
        let dead_letters = DeadLetters::open(&log)
            .await
            .map_err(|source| RunnerError::Log {
                model: err_model(),
                source,
            })?;
        let version = model_version(&project, &model_id);
        let output_schema = operator.output_schema().clone();
        let (ident, table) = open_output(
            &lakehouse,
            &project,
            &model_id,
            &version,
            &output_schema,
            publish_if_new,
        )
        .await?;
        let properties =
            kappa_lakehouse::wap::head(&table).map(|s| s.summary().additional_properties.clone());
        // A version keeps the source it began with: a table its topics wrote goes on from them,
        // whatever the deployment says (read from the table at its position, it would take the
        // upstream's rows from its start again on top of the ones it holds).
        if project.reads_tables.contains_key(&model_id) && written_from_topics(properties.as_ref())
        {
            tracing::warn!(model = %model_id, "its table was written from its topics: it goes on reading them");
            let ready = over_topics(&log, &project, &model_id).await?;
            (sources, operator, stage) = (ready.sources, ready.operator, ready.stage);
            dims = open_dimensions(&log, &lakehouse, &project, &model_id, ready.dimensions).await?;
        }
        operator
            .restore(&lakehouse, &table)
            .await
            .map_err(lake_err)?;
        restore_marks(&mut sources, properties.as_ref())
            .map_err(|reason| lake_err(kappa_lakehouse::LakehouseError::Query(reason)))?;
        for source in &mut sources {
            source.restore(properties.as_ref());
        }
        if let Some(stage) = &mut stage {
            stage
                .restore(&lakehouse, &table, properties.as_ref())
                .await
                .map_err(lake_err)?;
        }

        let model = &project.models[&model_id];
        let row_checks = match operator.rows_to_append() {
            Some(_) => RowChecks::new(
                &crate::stateless::session(),
                &output_schema,
                &model.config.expectations,
            )
            .map_err(|source| RunnerError::Plan {
                model: err_model(),
                source,
            })?,
            None => None,
        };
        // A model that does not write rows as they come has its row-level expectations checked
        // over its table, by the audit.
        let staged = crate::expect::audits_commits(model)
            || (row_checks.is_none()
                && model
                    .config
                    .expectations
                    .iter()
                    .any(|e| e.check.is_row_level()));
        let table = set_staging(&lakehouse, &ident, table, staged)
            .await
            .map_err(lake_err)?;
        let quarantine = quarantine_table(&model_id, &version).map_err(lake_err)?;
        // What the last commit set aside reaches the quarantine table before anything goes on.
        if let Some(checks) = row_checks.as_ref().filter(|c| c.drops()) {
            deliver_quarantined(&lakehouse, &table, &quarantine, checks.quarantine_schema())
                .await
                .map_err(lake_err)?;
        }
        let upstream = upstream_tables(&lakehouse, &project, &model_id);
        // A quarantine outlives a restart in its table (the audit branch), before its runner
        // blocks it again: what this model would compute on waits for it from the start.
        if let Some((upstream, reason)) = waits_for(&lakehouse, &project, &model_id).await {
            return Err(RunnerError::Waiting {
                model: model_id,
                upstream,
                reason,
            });
        }
        // A commit that waited for its audit when the runner stopped is decided first.
        let mut audit = CommitAudit::default();
        let table = settle(
            &lakehouse,
            model,
            table,
            staged,
            row_checks.is_some(),
            &mut audit,
        )
        .await?;

        // Resume from what the table says it covers.
        let record =
            CommitRecord::of(properties.as_ref()).map_err(|source| RunnerError::CorruptCommit {
                model: err_model(),
                source,
            })?;
        let committed = record.offsets;
        let already_dead = dead_letters
            .written_after(record.dead_letters_offset, &model_id)
            .map_err(|reason| RunnerError::Source {
                model: err_model(),
                reason: format!("reading the dead-letter topic: {reason}"),
            })?;
        for source in &mut sources {
            source.rewind(&committed).map_err(|e| RunnerError::Source {
                model: err_model(),
                reason: e.to_string(),
            })?;
            source.landed(&committed);
        }
        reset_dimensions(&mut dims, &committed, &model_id).await;
        tracing::info!(model = %model_id, offsets = ?committed, "model starts");
        if *stop.borrow() {
            return Ok(None);
        }
        let partition_by = model.config.partition_by.clone();
        let model = model.clone();
        Ok(Some(Run::from_parts(Parts {
            lakehouse,
            model: Some(model),
            model_id,
            version,
            stop,
            sources,
            dims,
            stage,
            operator,
            row_checks,
            ident,
            table,
            output_schema,
            partition_by,
            staged,
            audit,
            quarantine,
            upstream,
            dead_letters,
            already_dead,
            committed,
        })))
    }

    /// A run of what `parts` holds, from the positions `parts.committed`.
    fn from_parts(parts: Parts) -> Run {
        let Parts {
            lakehouse,
            model,
            model_id,
            version,
            stop,
            sources,
            dims,
            stage,
            operator,
            row_checks,
            ident,
            table,
            output_schema,
            partition_by,
            staged,
            audit,
            quarantine,
            upstream,
            dead_letters,
            already_dead,
            committed,
        } = parts;
        Run {
            share: COMMIT_RECORDS_MAX / sources.len().max(1),
            lakehouse,
            version,
            stop,
            sources,
            dims,
            stage,
            operator,
            row_checks,
            ident,
            table,
            output_schema,
            partition_by,
            staged,
            audit,
            quarantine,
            upstream,
            dead_letters,
            already_dead,
            table_offsets: committed.clone(),
            committed,
            last_commit: Instant::now(),
            dim_rejected: Vec::new(),
            pending: None,
            waiting_since: None,
            failed_rows: BTreeMap::new(),
            far_behind: true,
            uncommitted: 0,
            last_watermarks: Vec::new(),
            model,
            model_id,
        }
    }

    /// The run that copies a topic into its bronze table `ident` (`crate::bronze`): `source`
    /// gives the rows, `operator` appends them, no expectations, nothing upstream.
    async fn bronze(
        log: &EventLog,
        lakehouse: Lakehouse,
        copy: BronzeCopy,
        mut source: Box<dyn Source>,
        mut operator: Box<dyn Operator>,
        stop: watch::Receiver<bool>,
    ) -> Result<Run, RunnerError> {
        let BronzeCopy {
            name,
            ident,
            table,
            partition_by,
            version,
        } = copy;
        let committed = CommitRecord::of_table(&table)
            .map_err(|source| RunnerError::CorruptCommit {
                model: name.clone(),
                source,
            })?
            .offsets;
        operator
            .restore(&lakehouse, &table)
            .await
            .map_err(|source| RunnerError::Lakehouse {
                model: name.clone(),
                source,
            })?;
        source.rewind(&committed).map_err(|e| RunnerError::Source {
            model: name.clone(),
            reason: e.to_string(),
        })?;
        let log_err = |source| RunnerError::Log {
            model: name.clone(),
            source,
        };
        let dead_letters = DeadLetters::open(log).await.map_err(log_err)?;
        let quarantine = quarantine_table(&name, "").map_err(|source| RunnerError::Lakehouse {
            model: name.clone(),
            source,
        })?;
        Ok(Run::from_parts(Parts {
            lakehouse,
            model: None,
            model_id: name,
            version: version.to_owned(),
            stop,
            output_schema: operator.output_schema().clone(),
            sources: vec![source],
            dims: Vec::new(),
            stage: None,
            operator,
            row_checks: None,
            ident,
            table,
            partition_by,
            staged: false,
            audit: CommitAudit::default(),
            quarantine,
            upstream: Vec::new(),
            dead_letters,
            already_dead: BTreeSet::new(),
            committed,
        }))
    }

    pub(super) fn lake_err(&self, source: kappa_lakehouse::LakehouseError) -> RunnerError {
        RunnerError::Lakehouse {
            model: self.model_id.clone(),
            source,
        }
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Reads, computes and commits until stop is asked or the model cannot go on.
    async fn run(mut self) -> Result<(), RunnerError> {
        loop {
            if self.stopped() {
                return Ok(());
            }
            // What a quarantined model withholds is not computed on by what reads it.
            if let Some((upstream, reason)) = first_blocked(&self.lakehouse, &self.upstream) {
                return Err(RunnerError::Waiting {
                    model: self.model_id,
                    upstream,
                    reason,
                });
            }
            let read = match self.read().await? {
                Next::Go(read) => read,
                Next::Again => continue,
                Next::Stop => return Ok(()),
            };
            match self.compute(read).await? {
                Next::Go((target, started, records)) => {
                    if let Next::Stop = self.commit(target, started, records).await? {
                        return Ok(());
                    }
                }
                Next::Again => continue,
                Next::Stop => return Ok(()),
            }
        }
    }

    /// After a failure: the state back to the last commit, the readers and dimensions back to
    /// its positions, and a pause before reading again. `Next::Stop` when stop was asked
    /// meanwhile; `Next::Again` otherwise.
    pub(super) async fn start_over<T>(&mut self) -> Result<Next<T>, RunnerError> {
        // Until the state is back to a commit, nothing is read.
        loop {
            match self.recover().await {
                Ok(reloaded) => {
                    self.table = reloaded;
                    self.committed = CommitRecord::of_table(&self.table)
                        .map_err(|source| RunnerError::CorruptCommit {
                            model: self.model_id.clone(),
                            source,
                        })?
                        .offsets;
                    self.table_offsets = self.committed.clone();
                    self.uncommitted = 0;
                    // What the sources saw last is unknown again: a watermark is pushed anew
                    // even when the reread brings no record.
                    self.last_watermarks.clear();
                    break;
                }
                Err(e) => {
                    tracing::error!(model = %self.model_id, error = %e, "recovering failed; retrying");
                    sleep_or_stop(&mut self.stop, RETRY_DELAY_MS).await;
                    if self.stopped() {
                        return Ok(Next::Stop);
                    }
                }
            }
        }
        for i in 0..self.sources.len() {
            // A source left where it was would read on past records the restored state never
            // saw, and the next commit would record that position: it is retried until it is
            // back at the commit.
            while let Err(e) = self.sources[i].rewind(&self.committed) {
                tracing::error!(model = %self.model_id, error = %e, "repositioning a reader failed; retrying");
                sleep_or_stop(&mut self.stop, RETRY_DELAY_MS).await;
                if self.stopped() {
                    return Ok(Next::Stop);
                }
            }
            // Back to the committed position: what an upstream may merge follows it.
            self.sources[i].landed(&self.committed);
        }
        reset_dimensions(&mut self.dims, &self.committed, &self.model_id).await;
        self.dim_rejected.clear();
        self.pending = None;
        sleep_or_stop(&mut self.stop, RETRY_DELAY_MS).await;
        Ok(if self.stopped() {
            Next::Stop
        } else {
            Next::Again
        })
    }

    /// Puts the operator and stage back to the table's last commit, read again from the
    /// catalog (the failed commit may have landed after all). Returns that table, or why the
    /// state could not be restored — then nothing may be read until a retry succeeds.
    async fn recover(&mut self) -> Result<Table, String> {
        let table = self
            .lakehouse
            .load_table(self.table.identifier())
            .await
            .map_err(|e| format!("reloading the table failed: {e}"))?;
        self.operator
            .restore(&self.lakehouse, &table)
            .await
            .map_err(|e| format!("restoring the model's state failed: {e}"))?;
        let properties =
            kappa_lakehouse::wap::head(&table).map(|s| s.summary().additional_properties.clone());
        if let Some(stage) = &mut self.stage {
            stage
                .restore(&self.lakehouse, &table, properties.as_ref())
                .await
                .map_err(|e| format!("restoring the stage's state failed: {e}"))?;
        }
        restore_marks(&mut self.sources, properties.as_ref())
            .map_err(|e| format!("restoring the watermarks failed: {e}"))?;
        for source in &mut self.sources {
            source.restore(properties.as_ref());
        }
        Ok(table)
    }

    /// Paces (live, commits are LIVE_COMMIT_INTERVAL_MS apart), takes what every source has,
    /// up to a commit's worth (while live, waits a little for more), then catches the
    /// dimensions up.
    async fn read(&mut self) -> Result<Next<Read>, RunnerError> {
        let read = match self.pending.take() {
            Some(read) => read,
            None => match self.read_sources().await? {
                Next::Go(read) => read,
                Next::Again => return Ok(Next::Again),
                Next::Stop => return Ok(Next::Stop),
            },
        };
        // Dimensions after the read: every event is looked up in what its dimensions hold
        // once they have every change produced before it was read.
        match catch_up_dimensions(&mut self.dims, &mut self.dim_rejected, &self.model_id).await {
            Dimensions::Ready => {
                self.waiting_since = None;
                Ok(Next::Go(read))
            }
            Dimensions::Waiting(why) => {
                // Waiting is not failing: a block its failures set is lifted.
                recovered(&self.lakehouse, &self.ident);
                let (since, reported) = self
                    .waiting_since
                    .get_or_insert_with(|| (Instant::now(), false));
                if !*reported && since.elapsed() >= Duration::from_secs(DIMENSION_WAIT_REPORT_S) {
                    *reported = true;
                    tracing::info!(model = %self.model_id, %why, "waiting for a dimension to publish");
                } else {
                    tracing::debug!(model = %self.model_id, %why, "waiting for a dimension");
                }
                self.pending = Some(read);
                sleep_or_stop(&mut self.stop, LIVE_COMMIT_INTERVAL_MS).await;
                Ok(Next::Again)
            }
            Dimensions::Failed => self.start_over().await,
        }
    }

    /// Whether the dimensions, caught up, reach further than the table's last commit records.
    async fn dimensions_moved(&mut self) -> bool {
        if self.dims.is_empty() {
            return false;
        }
        if !matches!(
            catch_up_dimensions(&mut self.dims, &mut self.dim_rejected, &self.model_id).await,
            Dimensions::Ready
        ) {
            return false;
        }
        self.dims.iter().any(|(dimension, _)| {
            self.table_offsets.get(&dimension.offsets_key) != Some(&dimension.next_offsets())
        })
    }

    /// The sources' part of [`Run::read`].
    async fn read_sources(&mut self) -> Result<Next<Read>, RunnerError> {
        if !self.far_behind {
            let since = self.last_commit.elapsed();
            let interval = Duration::from_millis(LIVE_COMMIT_INTERVAL_MS);
            if since < interval {
                // Rounded up: a sleep of 0 ms would spin.
                let wait = (interval - since).as_micros().div_ceil(1000) as u64;
                sleep_or_stop(&mut self.stop, wait).await;
                return Ok(Next::Again);
            }
        }
        let mut taken: Vec<Taken> = Vec::with_capacity(self.sources.len());
        let mut read_failed = None;
        for source in &mut self.sources {
            match source.read(self.share).await {
                Ok(t) => taken.push(t),
                Err(e) => {
                    read_failed = Some(e);
                    break;
                }
            }
        }
        match read_failed {
            None => {}
            // Nothing was consumed: the same read again after a pause, the work since the
            // last commit kept (unless another source had read meanwhile).
            Some(SourceError::Unavailable(e)) if taken.is_empty() => {
                tracing::warn!(model = %self.model_id, error = %e, "reading failed; trying again");
                sleep_or_stop(&mut self.stop, RETRY_DELAY_MS).await;
                return Ok(Next::Again);
            }
            Some(SourceError::Read(e) | SourceError::Unavailable(e)) => {
                tracing::error!(model = %self.model_id, error = %e, "reading failed; retrying");
                return self.start_over().await;
            }
            Some(SourceError::Restart(why)) => {
                // What it read is gone: its table is rebuilt from the start of its sources.
                tracing::warn!(model = %self.model_id, %why, "rebuilding the model's table from the start");
                let partition_by = self.partition_by.clone();
                let table = self
                    .lakehouse
                    .replace_table(&self.ident, &self.output_schema, &partition_by)
                    .await
                    .map_err(|e| self.lake_err(e))?;
                self.table = set_staging(&self.lakehouse, &self.ident, table, self.staged)
                    .await
                    .map_err(|e| self.lake_err(e))?;
                return self.start_over().await;
            }
        }
        let records: usize = taken.iter().map(|t| t.records).sum();
        self.far_behind = taken.iter().any(|t| t.full);
        let mut target = self.committed.clone();
        for source in &self.sources {
            target.insert(source.key().to_owned(), source.position());
        }
        let progress_time =
            self.last_commit.elapsed() >= Duration::from_millis(PROGRESS_COMMIT_INTERVAL_MS);
        let progress_due = progress_time
            && (target != self.table_offsets
                // A quiet stream still records how far its dimensions reach (its lag and a
                // deploy's cutover count their topics too).
                || (records == 0 && self.dimensions_moved().await));
        if records == 0 && !progress_due {
            recovered(&self.lakehouse, &self.ident);
            crate::source::wait_for_more(
                &self.sources,
                &mut self.stop,
                Duration::from_millis(LIVE_COMMIT_INTERVAL_MS),
            )
            .await;
            return Ok(Next::Again);
        }
        let mut read = Read {
            records,
            batches: Vec::with_capacity(taken.len()),
            watermarks: Vec::with_capacity(taken.len()),
            rejected: Vec::new(),
            target,
        };
        for (source, t) in self.sources.iter().zip(taken) {
            read.rejected.extend(
                t.rejected
                    .into_iter()
                    .map(|r| (source.letters_name().to_owned(), r)),
            );
            read.batches.push(t.batch);
            read.watermarks.push(t.watermark);
        }
        Ok(Next::Go(read))
    }
}
