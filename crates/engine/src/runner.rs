//! Runs one model continuously: reads its topic from the committed offsets, decodes, computes,
//! and commits the result to its Iceberg table together with the offsets it covers — so a
//! restart at any moment resumes exactly where the last commit ended (exactly once).
//!
//! ```text
//!   log partitions ──read from committed offsets──► decode ──► model ──► Iceberg append
//!          ▲                     │ rejects                             snapshot summary:
//!          │                     └──► dead_letters topic               kappa.offsets = {topic: {p: next}}
//!          └──────────── after a crash: the table says where to resume ─┘
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use kappa_lakehouse::{Lakehouse, table_ident};
use kappa_log::{Log, Record, StartAt, Topic};
use kappa_pipeline::Project;

use crate::commit_record::CommitRecord;
use crate::decode::{Decoder, Rejected};
use crate::dedup::Dedup;
use crate::dimension::Dimension;
use crate::grouped::GroupedModel;
use crate::plan::{Shape, plan_model};
use crate::source::{Source, SourceError};
use crate::stateless::StatelessModel;
use crate::stream_join::StreamJoin;
use crate::topic_source::TopicSource;
pub(crate) use crate::topic_source::{collect_records, read_some};
use crate::watermark::{WATERMARKS_PROPERTY, Watermarks};
use crate::windowed::WindowedModel;

/// The topic where records that do not fit their topic's schema go, with the reason.
pub const DEAD_LETTER_TOPIC: &str = "dead_letters";
/// Snapshot property: the next offset of every input partition the table covers.
pub const OFFSETS_PROPERTY: &str = "kappa.offsets";
/// Snapshot property: the model version that wrote the snapshot.
pub const VERSION_PROPERTY: &str = "kappa.version";
/// Snapshot property: the dead-letter topic's end when the snapshot was written.
pub const DEAD_LETTERS_PROPERTY: &str = "kappa.dead_letters_offset";
/// Snapshot property: a fresh id per commit attempt, to recognise our own commit after an
/// error whose outcome is unknown.
pub const ATTEMPT_PROPERTY: &str = "kappa.attempt";

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
/// Bytes asked of the log per read.
pub(crate) const READ_BYTES: usize = 1 << 20;
/// After a failed commit, wait this long before trying again.
const RETRY_DELAY_MS: u64 = 1000;

/// The offsets a table covers: topic → partition → next offset.
pub type Offsets = BTreeMap<String, BTreeMap<u32, u64>>;

/// Why a model cannot run.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("model {model}: {reason}")]
    Unsupported { model: String, reason: String },
    #[error("model {model}: {source}")]
    Log {
        model: String,
        #[source]
        source: kappa_log::LogError,
    },
    #[error("model {model}: {source}")]
    Lakehouse {
        model: String,
        #[source]
        source: kappa_lakehouse::LakehouseError,
    },
    /// The runner panicked: a bug; it is restarted from its last commit.
    #[error("model {model}: panicked: {reason}")]
    Panicked { model: String, reason: String },
    #[error("model {model}: {source}")]
    Plan {
        model: String,
        #[source]
        source: datafusion::error::DataFusionError,
    },
    /// One of its sources cannot be read.
    #[error("model {model}: {reason}")]
    Source { model: String, reason: String },
    /// Its table's last commit does not say where its rows end.
    #[error("model {model}: {source}")]
    CorruptCommit {
        model: String,
        #[source]
        source: crate::commit_record::CorruptRecord,
    },
    /// A commit failed its audit: it waits on the table's audit branch, main untouched,
    /// until someone publishes or discards it.
    #[error("model {model}: quarantined: {reason}")]
    Quarantined { model: String, reason: String },
    /// A model it reads stopped until someone decides: it waits for it, without reading on.
    #[error("model {model}: waits for {upstream}, which is {reason}")]
    Waiting {
        model: String,
        upstream: String,
        reason: String,
    },
}

/// A model `model_id` reads (directly or not) whose writer stopped until someone decides, and
/// why ([`kappa_lakehouse::Lakehouse::block`]).
pub fn blocked_upstream(
    lakehouse: &Lakehouse,
    project: &Project,
    model_id: &str,
) -> Option<(String, String)> {
    first_blocked(lakehouse, &upstream_tables(lakehouse, project, model_id))
}

/// What `model_id` waits for before it starts: a blocked model it reads (directly or not), or
/// one whose last commit awaits its audit on the audit branch — which outlives a restart, when
/// the blocks (in memory) do not. `None`: it may run.
pub async fn waits_for(
    lakehouse: &Lakehouse,
    project: &Project,
    model_id: &str,
) -> Option<(String, String)> {
    let upstream = upstream_tables(lakehouse, project, model_id);
    if let Some(blocked) = first_blocked(lakehouse, &upstream) {
        return Some(blocked);
    }
    for (id, ident) in &upstream {
        if let Ok(table) = lakehouse.load_table(ident).await
            && kappa_lakehouse::wap::unpublished(&table).is_some()
        {
            return Some((id.clone(), "awaiting the audit of its last commit".into()));
        }
    }
    None
}

/// Blocks the table of `model_id` (which keeps failing with `error`) so that the models reading
/// it wait; a quarantine's block stays as it is.
pub fn block_failing(lakehouse: &Lakehouse, project: &Project, model_id: &str, error: &str) {
    if let Ok(ident) = live_table(lakehouse, project, model_id)
        && lakehouse
            .blocked(&ident)
            .is_none_or(|reason| reason.starts_with(FAILING))
    {
        lakehouse.block(&ident, &format!("{FAILING}: {error}"));
    }
}

/// The topics `model_id`'s commits record offsets of, each with its key in `kappa.offsets`: a
/// topic it reads (as a stream or a table topic) under its name, a dimension model's topic
/// under `dimension:<model>` ([`crate::dimension::DIMENSION_KEY_PREFIX`]).
pub fn offset_keys(project: &Project, model_id: &str) -> Vec<(String, String)> {
    let mut keys: Vec<(String, String)> = project
        .stream_topics(model_id)
        .into_iter()
        .map(|t| (t.clone(), t))
        .collect();
    for dimension in project.dimension_models(model_id) {
        for topic in project.stream_topics(&dimension) {
            keys.push((
                topic,
                format!("{}{dimension}", crate::dimension::DIMENSION_KEY_PREFIX),
            ));
        }
    }
    keys
}

/// The reason a failing model's table is blocked with, so that the models reading it wait.
pub const FAILING: &str = "failing";

/// A runner committed, or found nothing to commit, without failing: a block its failures set
/// (not a quarantine's) is lifted.
pub fn recovered(lakehouse: &Lakehouse, ident: &kappa_lakehouse::TableIdent) {
    if lakehouse
        .blocked(ident)
        .is_some_and(|reason| reason.starts_with(FAILING))
    {
        lakehouse.unblock(ident);
    }
}

/// The models `model_id` reads (directly or not) with the tables they write.
fn upstream_tables(
    lakehouse: &Lakehouse,
    project: &Project,
    model_id: &str,
) -> Vec<(String, kappa_lakehouse::TableIdent)> {
    // Every version at once: one hash of the project, not one per model.
    let versions = kappa_pipeline::deploy::versions(project);
    project
        .order
        .iter()
        .filter(|id| crate::plan::reads_transitively(project, model_id, id))
        .filter_map(|id| {
            let (layer, name) = id.split_once('.')?;
            let ident = written_table(lakehouse, layer, name, versions.get(id)?).ok()?;
            Some((id.clone(), ident))
        })
        .collect()
}

/// The first of `upstream` whose writer is blocked, and why.
fn first_blocked(
    lakehouse: &Lakehouse,
    upstream: &[(String, kappa_lakehouse::TableIdent)],
) -> Option<(String, String)> {
    upstream
        .iter()
        .find_map(|(id, ident)| Some((id.clone(), lakehouse.blocked(ident)?)))
}

/// The row-level expectations' failing rows per expectation, in the commit that wrote them.
pub const EXPECTATIONS_PROPERTY: &str = "kappa.expectations";
/// The rows a commit's `drop` expectations set aside: a state file, delivered to the model's
/// quarantine table right after the commit lands (and again on start until it is).
pub const QUARANTINE_PROPERTY: &str = "kappa.quarantine";
/// In a quarantine table's commit: the state file it delivered.
pub const QUARANTINE_FROM_PROPERTY: &str = "kappa.quarantine-from";

/// The quarantine table of version `version` of `model_id`: `quarantine.layer__name__version`,
/// the model's columns and the failed expectations' names.
pub fn quarantine_table(
    model_id: &str,
    version: &str,
) -> kappa_lakehouse::Result<kappa_lakehouse::TableIdent> {
    let (layer, name) = model_id.split_once('.').unwrap_or(("", model_id));
    table_ident("quarantine", &format!("{layer}__{name}__{version}"))
}

/// Delivers the rows the newest commit of `table` set aside to the quarantine table `into`
/// (of `schema`), unless that table's last commit delivered them already: exactly once,
/// whenever the runner stopped.
async fn deliver_quarantined(
    lakehouse: &Lakehouse,
    table: &kappa_lakehouse::Table,
    into: &kappa_lakehouse::TableIdent,
    schema: &arrow::datatypes::SchemaRef,
) -> kappa_lakehouse::Result<()> {
    let Some(location) = kappa_lakehouse::wap::head(table)
        .and_then(|s| s.summary().additional_properties.get(QUARANTINE_PROPERTY))
        .cloned()
    else {
        return Ok(());
    };
    let quarantine = lakehouse.ensure_table(into, schema).await?;
    let delivered = quarantine
        .metadata()
        .current_snapshot()
        .and_then(|s| {
            s.summary()
                .additional_properties
                .get(QUARANTINE_FROM_PROPERTY)
        })
        .is_some_and(|from| *from == location);
    if delivered {
        return Ok(());
    }
    let rows = lakehouse.read_state(table, &location).await?;
    lakehouse
        .append(
            &quarantine,
            &rows,
            HashMap::from([(QUARANTINE_FROM_PROPERTY.to_owned(), location)]),
        )
        .await?;
    Ok(())
}

/// A model's computation, by the shape of its query.
pub(crate) enum Compute {
    /// Row by row: each micro-batch's rows are appended.
    Stateless {
        model: Box<StatelessModel>,
        pending: Vec<RecordBatch>,
    },
    /// GROUP BY: groups are updated in place (copy-on-write buckets).
    Grouped(Box<GroupedModel>),
    /// GROUP BY a window over event time: windows are appended when they close.
    Windowed(Box<WindowedModel>),
    /// A slowly changing dimension: versions kept per key, rewritten in place (buckets).
    Dimension(Box<crate::scd::ScdModel>),
}

/// A model planned over its topics: the stream topics, an optional dedup or join stage, and
/// its computation.
struct Planned {
    /// The stream topics it reads (two when it joins them, the left side first), each with its
    /// event time.
    sources: Vec<(String, Option<crate::plan::EventTime>)>,
    dimensions: Vec<(String, Arc<crate::dimension::DimensionTable>)>,
    compute: Compute,
    dedup: Option<Dedup>,
    join: Option<StreamJoin>,
}

/// A model ready to run: what it reads, its lookups, its stages and its computation.
struct Ready {
    sources: Vec<Box<dyn Source>>,
    dimensions: Vec<(String, Arc<crate::dimension::DimensionTable>)>,
    compute: Compute,
    dedup: Option<Dedup>,
    join: Option<StreamJoin>,
}

/// A planning error as the runner reports it: a shape that cannot run incrementally is
/// `Unsupported`, the rest a planning error.
fn planning_error(model_id: &str, error: datafusion::error::DataFusionError) -> RunnerError {
    match error {
        datafusion::error::DataFusionError::NotImplemented(reason) => RunnerError::Unsupported {
            model: model_id.to_owned(),
            reason,
        },
        source => RunnerError::Plan {
            model: model_id.to_owned(),
            source,
        },
    }
}

/// `model_id` planned over its stream topics, each read from the log.
async fn over_topics(log: &Log, project: &Project, model_id: &str) -> Result<Ready, RunnerError> {
    let Planned {
        sources: source_plans,
        dimensions,
        compute,
        dedup,
        join,
    } = Compute::plan(project, model_id)
        .await
        .map_err(|e| planning_error(model_id, e))?;
    let needs_event_time = compute.uses_event_time() || dedup.is_some() || join.is_some();
    let mut sources: Vec<Box<dyn Source>> = Vec::with_capacity(source_plans.len());
    for (name, event_time) in source_plans {
        let topic = log.topic(&name).map_err(|source| RunnerError::Log {
            model: model_id.to_owned(),
            source,
        })?;
        // Late records are reported by the model that declares the event time, if it uses
        // it; otherwise by each model that does.
        let reports_late = match &event_time {
            Some(et) if et.declared_by != model_id => !plan_model(project, &et.declared_by)
                .await
                .is_ok_and(|p| p.uses_event_time()),
            _ => true,
        };
        // Event time at the source: late records set aside, the watermark advanced.
        let marks = match (&event_time, needs_event_time) {
            (Some(et), true) => Some(Watermarks::new(
                &et.column,
                et.index,
                et.delay_ms,
                topic.partition_count(),
            )),
            _ => None,
        };
        sources.push(Box::new(TopicSource {
            decoder: Decoder::new(&project.topics[&name]),
            // A record that does not fit its topic's schema is reported once, by one model.
            reports_rejects: rejects_reporter(project, &name).as_deref() == Some(model_id),
            reports_late,
            marks,
            readers: Vec::new(),
            topic,
            name,
        }));
    }
    Ok(Ready {
        sources,
        dimensions,
        compute,
        dedup,
        join,
    })
}

/// `model_id` planned over the table its upstream `upstream_id` published.
async fn over_table(
    log: &Log,
    lakehouse: &Lakehouse,
    project: &Project,
    model_id: &str,
    upstream_id: &str,
) -> Result<Ready, RunnerError> {
    let (planned, _) = crate::plan::plan_over_upstream(project, model_id)
        .await
        .map_err(|e| planning_error(model_id, e))?;
    let source = crate::upstream::TableSource::new(
        log,
        lakehouse,
        project,
        model_id,
        upstream_id,
        datafusion::datasource::TableProvider::schema(planned.slot.as_ref()),
        planned.upstream_marks.as_ref(),
    )?;
    let compute = Compute::new(
        planned.shape,
        planned.ctx,
        planned.slot,
        planned.plan,
        planned.event_time,
    )
    .map_err(|e| planning_error(model_id, e))?;
    Ok(Ready {
        sources: vec![Box::new(source)],
        dimensions: planned.dimensions,
        compute,
        dedup: None,
        join: None,
    })
}

impl Compute {
    /// Plans a model, or says why it cannot run incrementally.
    async fn plan(
        project: &Project,
        model_id: &str,
    ) -> Result<Planned, datafusion::error::DataFusionError> {
        let planned = plan_model(project, model_id).await?;
        let below_dedup = planned.dedup.as_ref().map(|d| &d.found.filter);
        if let Some(reason) =
            crate::mask::missing_key(std::iter::once(&planned.plan).chain(below_dedup))
        {
            return Err(datafusion::error::DataFusionError::NotImplemented(reason));
        }
        let event_time = planned.event_time.clone();
        let dimensions = planned.dimensions.clone();
        let input_slot = planned.input_slot();
        let mut sources = vec![(planned.topic.clone(), event_time.clone())];
        let join = match &planned.join {
            Some(j) => {
                sources.push((
                    j.found.right_topic.clone(),
                    Some(j.right_event_time.clone()),
                ));
                Some(StreamJoin::new(
                    planned.ctx.clone(),
                    &j.found,
                    planned.slot.clone(),
                    j.right_slot.clone(),
                    j.output_schema.clone(),
                )?)
            }
            None => None,
        };
        let dedup = match (&planned.dedup, &event_time) {
            (Some(d), Some(et)) => Some(Dedup::new(
                planned.ctx.clone(),
                planned.slot.clone(),
                &d.found,
                &et.column,
                d.horizon_ms,
                d.output_schema.clone(),
            )?),
            _ => None,
        };
        let compute = match project.models.get(model_id) {
            Some(model) if project.is_dimension(model_id) => {
                let rows = StatelessModel::from_plan(planned.ctx, input_slot, planned.plan)?;
                let spec = crate::scd::ScdSpec::new(model, rows.output_schema().clone())?;
                Compute::Dimension(Box::new(crate::scd::ScdModel::new(rows, spec)))
            }
            _ => Compute::new(
                planned.shape,
                planned.ctx,
                input_slot,
                planned.plan,
                planned.event_time,
            )?,
        };
        Ok(Planned {
            sources,
            dimensions,
            compute,
            dedup,
            join,
        })
    }

    /// The computation of a planned model of `shape` reading `input_slot`.
    pub(crate) fn new(
        shape: Shape,
        ctx: datafusion::prelude::SessionContext,
        input_slot: Arc<datafusion::datasource::MemTable>,
        plan: datafusion::logical_expr::LogicalPlan,
        event_time: Option<crate::plan::EventTime>,
    ) -> Result<Compute, datafusion::error::DataFusionError> {
        Ok(match shape {
            Shape::RowByRow => Compute::Stateless {
                model: Box::new(StatelessModel::from_plan(ctx, input_slot, plan)?),
                pending: Vec::new(),
            },
            Shape::Grouped => {
                Compute::Grouped(Box::new(GroupedModel::from_plan(ctx, input_slot, plan)?))
            }
            Shape::Windowed => {
                let event_time = event_time.ok_or_else(|| {
                    datafusion::error::DataFusionError::Internal(
                        "a windowed model without event time".into(),
                    )
                })?;
                let model = WindowedModel::from_plan(ctx, input_slot, plan, &event_time.column)?
                    .ok_or_else(|| {
                        datafusion::error::DataFusionError::Internal(
                            "a windowed model without a window".into(),
                        )
                    })?;
                Compute::Windowed(Box::new(model))
            }
        })
    }

    pub(crate) fn output_schema(&self) -> &arrow::datatypes::SchemaRef {
        match self {
            Compute::Stateless { model, .. } => model.output_schema(),
            Compute::Grouped(model) => model.output_schema(),
            Compute::Windowed(model) => model.output_schema(),
            Compute::Dimension(model) => model.output_schema(),
        }
    }

    /// Whether the model needs event time (a watermark) at its source.
    fn uses_event_time(&self) -> bool {
        matches!(self, Compute::Windowed(_))
    }

    /// Computes one micro-batch of records that are not late.
    pub(crate) async fn push(
        &mut self,
        batch: RecordBatch,
        watermark: Option<i64>,
    ) -> datafusion::error::Result<()> {
        match self {
            Compute::Stateless { model, pending } => {
                pending.extend(model.run(batch).await?);
                Ok(())
            }
            Compute::Grouped(model) => model.push(batch).await,
            Compute::Windowed(model) => model.push(batch, watermark).await,
            Compute::Dimension(model) => model.push(batch).await,
        }
    }

    pub(crate) fn has_changes(&self) -> bool {
        match self {
            Compute::Stateless { pending, .. } => !pending.is_empty(),
            Compute::Grouped(model) => model.has_changes(),
            Compute::Windowed(model) => model.has_changes(),
            Compute::Dimension(model) => model.has_changes(),
        }
    }

    /// Commits what was computed since the last commit, with `properties`.
    pub(crate) async fn commit(
        &mut self,
        lakehouse: &Lakehouse,
        table: &kappa_lakehouse::Table,
        properties: HashMap<String, String>,
    ) -> kappa_lakehouse::Result<kappa_lakehouse::Table> {
        match self {
            Compute::Stateless { pending, .. } => {
                let table = if pending.is_empty() {
                    // Nothing to add, but offsets or state to record.
                    lakehouse
                        .append_files(table, Vec::new(), properties)
                        .await?
                } else {
                    lakehouse.append(table, pending, properties).await?
                };
                pending.clear();
                Ok(table)
            }
            Compute::Grouped(model) => model.commit(lakehouse, table, properties).await,
            Compute::Windowed(model) => model.commit(lakehouse, table, properties).await,
            Compute::Dimension(model) => model.commit(lakehouse, table, properties).await,
        }
    }

    /// The last commit, reported as failed, landed after all.
    pub(crate) fn landed(&mut self) {
        match self {
            Compute::Stateless { pending, .. } => pending.clear(),
            Compute::Grouped(model) => model.landed(),
            Compute::Windowed(model) => model.landed(),
            Compute::Dimension(model) => model.landed(),
        }
    }

    /// Forgets everything not committed and takes the state the table's snapshot names.
    pub(crate) async fn restore(
        &mut self,
        lakehouse: &Lakehouse,
        table: &kappa_lakehouse::Table,
    ) -> kappa_lakehouse::Result<()> {
        match self {
            Compute::Stateless { pending, .. } => {
                pending.clear();
                Ok(())
            }
            Compute::Grouped(model) => {
                let properties = kappa_lakehouse::wap::head(table)
                    .map(|s| s.summary().additional_properties.clone());
                model.restore(lakehouse, table, properties.as_ref()).await
            }
            Compute::Windowed(model) => {
                let properties = kappa_lakehouse::wap::head(table)
                    .map(|s| s.summary().additional_properties.clone());
                model.restore(lakehouse, table, properties.as_ref()).await
            }
            Compute::Dimension(model) => {
                let properties = kappa_lakehouse::wap::head(table)
                    .map(|s| s.summary().additional_properties.clone());
                model.restore(lakehouse, table, properties.as_ref()).await
            }
        }
    }
}

/// A model's version (`kappa_pipeline::deploy::versions`: its normalized SQL, configuration
/// and the versions of its inputs), recorded with every commit.
pub fn model_version(project: &Project, model_id: &str) -> String {
    kappa_pipeline::deploy::versions(project)
        .remove(model_id)
        .unwrap_or_default()
}

/// The namespace of the tables versions write (`alias.rs` in the lakehouse: the public name
/// `layer.model` follows one of them).
pub const VERSIONS_NAMESPACE: &str = "kappa_versions";

/// The table version `version` of model `layer.name` writes: `kappa_versions.layer__name__version`.
pub fn version_table(
    layer: &str,
    name: &str,
    version: &str,
) -> kappa_lakehouse::Result<kappa_lakehouse::TableIdent> {
    table_ident(VERSIONS_NAMESPACE, &format!("{layer}__{name}__{version}"))
}

/// Runs `model` until `stop` turns true (see [`run_version`]); its table becomes the model's
/// public one at once when the model has none yet.
pub async fn run_model(
    log: Arc<Log>,
    lakehouse: Lakehouse,
    project: Arc<Project>,
    model_id: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), RunnerError> {
    run_version(log, lakehouse, project, model_id, true, stop).await
}

/// Runs the version of `model` that `project` holds until `stop` turns true, into its own table
/// ([`version_table`]; with a catalog without aliases, into `layer.model` itself). With
/// `publish_if_new`, the public name `layer.model` is pointed at that table when it names no
/// table yet; otherwise the deploy publishes it at cutover. Errors of one commit are logged and
/// retried; only a model that cannot run at all returns an error.
pub async fn run_version(
    log: Arc<Log>,
    lakehouse: Lakehouse,
    project: Arc<Project>,
    model_id: String,
    publish_if_new: bool,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), RunnerError> {
    let err_model = || model_id.clone();
    let Ready {
        mut sources,
        dimensions,
        mut compute,
        mut dedup,
        mut join,
    } = match project.reads_tables.get(&model_id) {
        Some(upstream) => over_table(&log, &lakehouse, &project, &model_id, upstream).await?,
        None => over_topics(&log, &project, &model_id).await?,
    };
    let mut dims = open_dimensions(&log, &project, &model_id, dimensions).await?;
    let dead_letters = dead_letter_topic(&log).map_err(|source| RunnerError::Log {
        model: err_model(),
        source,
    })?;
    let version = model_version(&project, &model_id);
    let lake_err = |source| RunnerError::Lakehouse {
        model: model_id.clone(),
        source,
    };
    // Cloned: a borrow of `compute` held across an await would need it to be `Sync`.
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
    let properties =
        kappa_lakehouse::wap::head(&table).map(|s| s.summary().additional_properties.clone());
    // A version keeps the source it began with: a table its topics wrote goes on from them,
    // whatever the deployment says (read from the table at its position, it would take the
    // upstream's rows from its start again on top of the ones it holds).
    if project.reads_tables.contains_key(&model_id) && written_from_topics(properties.as_ref()) {
        tracing::warn!(model = %model_id, "its table was written from its topics: it goes on reading them");
        let ready = over_topics(&log, &project, &model_id).await?;
        (sources, compute, dedup, join) = (ready.sources, ready.compute, ready.dedup, ready.join);
        dims = open_dimensions(&log, &project, &model_id, ready.dimensions).await?;
    }
    compute
        .restore(&lakehouse, &table)
        .await
        .map_err(lake_err)?;
    restore_marks(&mut sources, properties.as_ref())
        .map_err(|reason| lake_err(kappa_lakehouse::LakehouseError::Query(reason)))?;
    for source in &mut sources {
        source.restore(properties.as_ref());
    }
    if let Some(dedup) = &mut dedup {
        dedup
            .restore(&lakehouse, &table, properties.as_ref())
            .await
            .map_err(lake_err)?;
    }
    if let Some(join) = &mut join {
        join.restore(&lakehouse, &table, properties.as_ref())
            .await
            .map_err(lake_err)?;
    }

    let model = &project.models[&model_id];
    let row_checks = match &compute {
        Compute::Stateless { .. } => crate::expect::RowChecks::new(
            &crate::stateless::session(),
            &output_schema,
            &model.config.expectations,
        )
        .map_err(|source| RunnerError::Plan {
            model: err_model(),
            source,
        })?,
        _ => None,
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
    table = set_staging(&lakehouse, &ident, table, staged)
        .await
        .map_err(lake_err)?;
    let quarantine = quarantine_table(&model_id, &version).map_err(lake_err)?;
    // What the last commit set aside reaches the quarantine table before anything goes on.
    if let Some(checks) = row_checks.as_ref().filter(|c| c.drops()) {
        deliver_quarantined(&lakehouse, &table, &quarantine, checks.quarantine_schema())
            .await
            .map_err(lake_err)?;
    }
    // The tables of the models this one reads, looked at before each read.
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
    let mut audit = crate::commit_audit::CommitAudit::default();
    table = settle(
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
    let mut committed = record.offsets;
    let dead_letters_from = record.dead_letters_offset;
    let mut already_dead = dead_letters_after(&dead_letters, dead_letters_from, &model_id)
        .map_err(|source| RunnerError::Log {
            model: err_model(),
            source,
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
    // Records of dimensions that do not fit their schema, until the commit that passes them.
    let mut dim_rejected: Vec<(String, Rejected)> = Vec::new();
    // Rows of the commit being made that failed each row-level expectation.
    let mut failed_rows: BTreeMap<String, u64> = BTreeMap::new();
    // The offsets the table records, and when it last did: progress over records that add
    // no rows (skipped, filtered out) is committed after a while, so the table's lag is true.
    let mut table_offsets = committed.clone();
    let mut last_commit = Instant::now();
    // While far behind, each source's share of a commit's records.
    let share = COMMIT_RECORDS_MAX / sources.len().max(1);
    // Whether the last read took a full share: far behind, commits follow each other with as
    // many records as they may hold; live, they are LIVE_COMMIT_INTERVAL_MS apart and hold
    // what arrived meanwhile.
    let mut far_behind = true;
    // Input records read since the last commit.
    let mut uncommitted = 0usize;
    // The sources' watermarks after the last read.
    let mut last_watermarks: Vec<Option<i64>> = Vec::new();

    // After a failure: the state back to the last commit, the readers and dimensions back to
    // its offsets, and a pause before reading again.
    macro_rules! start_over {
        () => {{
            // Until the state is back to a commit, nothing is read.
            loop {
                match recover(
                    &mut compute,
                    &mut dedup,
                    &mut join,
                    &mut sources,
                    &lakehouse,
                    &table,
                )
                .await
                {
                    Ok(reloaded) => {
                        table = reloaded;
                        committed = CommitRecord::of_table(&table)
                            .map_err(|source| RunnerError::CorruptCommit {
                                model: model_id.clone(),
                                source,
                            })?
                            .offsets;
                        table_offsets = committed.clone();
                        uncommitted = 0;
                        // What the sources saw last is unknown again: a watermark is pushed
                        // anew even when the reread brings no record.
                        last_watermarks.clear();
                        break;
                    }
                    Err(e) => {
                        tracing::error!(model = %model_id, error = %e, "recovering failed; retrying");
                        sleep_or_stop(&mut stop, RETRY_DELAY_MS).await;
                        if *stop.borrow() {
                            return Ok(());
                        }
                    }
                }
            }
            for source in &mut sources {
                if let Err(e) = source.rewind(&committed) {
                    tracing::error!(model = %model_id, error = %e, "repositioning a reader failed");
                }
                // Back to the committed position: what an upstream may merge follows it.
                source.landed(&committed);
            }
            reset_dimensions(&mut dims, &committed, &model_id).await;
            dim_rejected.clear();
            sleep_or_stop(&mut stop, RETRY_DELAY_MS).await;
        }};
    }

    loop {
        if *stop.borrow() {
            return Ok(());
        }
        // What a quarantined model withholds is not computed on by what reads it.
        if let Some((upstream, reason)) = first_blocked(&lakehouse, &upstream) {
            return Err(RunnerError::Waiting {
                model: model_id,
                upstream,
                reason,
            });
        }
        // Dimensions first: every event is looked up in what its dimensions hold by now.
        if !catch_up_dimensions(&mut dims, &mut dim_rejected, &model_id).await {
            start_over!();
            continue;
        }
        if !far_behind {
            let since = last_commit.elapsed();
            let interval = Duration::from_millis(LIVE_COMMIT_INTERVAL_MS);
            if since < interval {
                // Rounded up: a sleep of 0 ms would spin.
                let wait = (interval - since).as_micros().div_ceil(1000) as u64;
                sleep_or_stop(&mut stop, wait).await;
                continue;
            }
        }
        // Take what is there, up to a commit's worth; while live, wait a little for more.
        let mut taken = Vec::with_capacity(sources.len());
        let mut read_failed = None;
        for source in &mut sources {
            match source.read(share).await {
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
                tracing::warn!(model = %model_id, error = %e, "reading failed; trying again");
                sleep_or_stop(&mut stop, RETRY_DELAY_MS).await;
                continue;
            }
            Some(SourceError::Read(e) | SourceError::Unavailable(e)) => {
                tracing::error!(model = %model_id, error = %e, "reading failed; retrying");
                start_over!();
                continue;
            }
            Some(SourceError::Restart(why)) => {
                // What it read is gone: its table is rebuilt from the start of its sources.
                tracing::warn!(model = %model_id, %why, "rebuilding the model's table from the start");
                table = lakehouse
                    .replace_table(&ident, &output_schema, &model.config.partition_by)
                    .await
                    .map_err(lake_err)?;
                table = set_staging(&lakehouse, &ident, table, staged)
                    .await
                    .map_err(lake_err)?;
                start_over!();
                continue;
            }
        }
        let records: usize = taken.iter().map(|t| t.records).sum();
        far_behind = taken.iter().any(|t| t.full);
        let mut target = committed.clone();
        for source in &sources {
            target.insert(source.key().to_owned(), source.position());
        }
        let progress_due = target != table_offsets
            && last_commit.elapsed() >= Duration::from_millis(PROGRESS_COMMIT_INTERVAL_MS);
        if records == 0 && !progress_due {
            recovered(&lakehouse, &ident);
            crate::source::wait_for_more(
                &sources,
                &mut stop,
                Duration::from_millis(LIVE_COMMIT_INTERVAL_MS),
            )
            .await;
            continue;
        }
        let started = Instant::now();
        let mut rejected: Vec<(String, Rejected)> = Vec::new();
        let mut kept = Vec::with_capacity(sources.len());
        let mut watermarks = Vec::with_capacity(sources.len());
        for (source, t) in sources.iter().zip(taken) {
            rejected.extend(t.rejected.into_iter().map(|r| (source.key().to_owned(), r)));
            kept.push(t.batch);
            watermarks.push(t.watermark);
        }
        // A watermark that moved without records (an upstream's commit of no rows) still
        // closes what it passes.
        let marks_moved = watermarks != last_watermarks;
        let pushed = if records == 0 && !marks_moved {
            Ok(())
        } else {
            push_stages(&mut compute, &mut dedup, &mut join, kept, &watermarks).await
        };
        last_watermarks = watermarks;
        if let Err(e) = pushed {
            tracing::error!(model = %model_id, error = %e, "computing a micro-batch failed; retrying");
            start_over!();
            continue;
        }
        let fresh: Vec<(&str, &Rejected)> = rejected
            .iter()
            .chain(dim_rejected.iter())
            .map(|(t, r)| (t.as_str(), r))
            .filter(|(t, r)| !already_dead.contains(&((*t).to_owned(), r.partition, r.offset)))
            .collect();
        if !fresh.is_empty() {
            let records: Vec<Record> = fresh
                .iter()
                .map(|(t, r)| dead_letter(&model_id, t, r))
                .collect();
            if let Err(e) = dead_letters.append(records).await {
                tracing::error!(model = %model_id, error = %e, "writing dead letters failed; retrying");
                start_over!();
                continue;
            }
            // In the topic now: a retry of this batch must not write them again.
            for (t, r) in &fresh {
                already_dead.insert(((*t).to_owned(), r.partition, r.offset));
            }
        }
        for (dimension, _) in &dims {
            target.insert(dimension.offsets_key.clone(), dimension.next_offsets());
        }
        let state_changed = dedup.as_ref().is_some_and(Dedup::has_changes)
            || join.as_ref().is_some_and(StreamJoin::has_changes);
        let progress_interval = Duration::from_millis(PROGRESS_COMMIT_INTERVAL_MS);
        uncommitted += records;
        let nothing_to_write = !compute.has_changes()
            && !state_changed
            && fresh.is_empty()
            && (target == table_offsets || last_commit.elapsed() < progress_interval);
        // Far behind, a GROUP BY's changes wait for more records (its state is its groups; the
        // commit rewrites them all). A crash meanwhile rereads from the last commit, as always.
        let grouped_waits = far_behind
            && matches!(compute, Compute::Grouped(_) | Compute::Dimension(_))
            && uncommitted < GROUPED_COMMIT_RECORDS_MAX;
        if nothing_to_write || grouped_waits {
            // The offsets are recorded with the next commit.
            committed = target;
            dim_rejected.clear();
            recovered(&lakehouse, &ident);
            continue;
        }
        let attempt = uuid_like();
        let mut properties = HashMap::from([
            (
                OFFSETS_PROPERTY.to_owned(),
                serde_json::to_string(&target).unwrap_or_default(),
            ),
            (VERSION_PROPERTY.to_owned(), version.clone()),
            (ATTEMPT_PROPERTY.to_owned(), attempt.clone()),
        ]);
        let marks: serde_json::Map<String, serde_json::Value> = sources
            .iter()
            .filter_map(|s| s.save_marks().map(|m| (s.key().to_owned(), m)))
            .collect();
        if !marks.is_empty() {
            properties.insert(
                WATERMARKS_PROPERTY.to_owned(),
                serde_json::Value::Object(marks).to_string(),
            );
        }
        properties.insert(
            DEAD_LETTERS_PROPERTY.to_owned(),
            dead_letters
                .partition(0)
                .map(|p| p.offsets().visible_offset)
                .unwrap_or(0)
                .to_string(),
        );
        for source in &sources {
            source.properties(&mut properties);
        }
        let saved = match (&mut dedup, &mut join) {
            (Some(stage), _) => Some(stage.checkpoint(&lakehouse, &table).await),
            (None, Some(stage)) => Some(stage.checkpoint(&lakehouse, &table).await),
            (None, None) => None,
        };
        match saved {
            Some(Ok((key, value))) => {
                properties.insert(key, value);
            }
            Some(Err(e)) => {
                tracing::error!(model = %model_id, error = %e, "saving the operator state failed; retrying");
                start_over!();
                continue;
            }
            None => {}
        }
        if let (Some(checks), Compute::Stateless { pending, .. }) = (&row_checks, &mut compute) {
            match checks.check(std::mem::take(pending)) {
                Ok(checked) => {
                    *pending = checked.kept;
                    failed_rows = checked.failures.clone();
                    if !checked.quarantined.is_empty() {
                        match lakehouse
                            .write_state(
                                &table,
                                "quarantine",
                                checks.quarantine_schema(),
                                &checked.quarantined,
                            )
                            .await
                        {
                            Ok(location) => {
                                properties.insert(QUARANTINE_PROPERTY.to_owned(), location);
                            }
                            Err(e) => {
                                tracing::error!(model = %model_id, error = %e, "writing the quarantined rows failed; retrying");
                                start_over!();
                                continue;
                            }
                        }
                    }
                    if !checked.failures.is_empty() {
                        properties.insert(
                            EXPECTATIONS_PROPERTY.to_owned(),
                            serde_json::to_string(&checked.failures).unwrap_or_default(),
                        );
                        for (name, count) in &checked.failures {
                            tracing::warn!(model = %model_id, expectation = %name, rows = count, "expectation failed");
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(model = %model_id, error = %e, "checking the expectations failed; retrying");
                    start_over!();
                    continue;
                }
            }
        }
        let commit_started = Instant::now();
        let committed_now = compute.commit(&lakehouse, &table, properties).await;
        crate::metrics::COMMIT_SECONDS.observe(commit_started.elapsed());
        let landed = match committed_now {
            Ok(updated) => {
                table = updated;
                tracing::debug!(model = %model_id, records, ms = started.elapsed().as_millis() as u64, "committed");
                true
            }
            Err(e) => {
                let (reloaded, landed) = commit_landed(&lakehouse, &ident, &attempt).await;
                if let Some(reloaded) = reloaded {
                    table = reloaded;
                }
                if landed {
                    compute.landed();
                    tracing::warn!(model = %model_id, error = %e, "commit reported an error but landed");
                } else {
                    tracing::error!(model = %model_id, error = %e, "commit failed; rereading from the committed offsets");
                    start_over!();
                }
                landed
            }
        };
        if landed && let Some(checks) = row_checks.as_ref().filter(|c| c.drops()) {
            // A failure here stops the runner: its start delivers them before going on.
            deliver_quarantined(&lakehouse, &table, &quarantine, checks.quarantine_schema())
                .await
                .map_err(lake_err)?;
        }
        if landed && staged {
            table = settle(
                &lakehouse,
                model,
                table,
                staged,
                row_checks.is_some(),
                &mut audit,
            )
            .await?;
        }
        if landed {
            recovered(&lakehouse, &ident);
            if let Some(dedup) = &mut dedup {
                dedup.landed();
            }
            if let Some(join) = &mut join {
                join.landed();
            }
            table_offsets = target.clone();
            for source in &sources {
                source.landed(&target);
            }
            last_commit = Instant::now();
            crate::metrics::THROUGHPUT.add(&model_id, &version, uncommitted as u64);
            crate::metrics::EXPECTATION_FAILURES.add(&model_id, &std::mem::take(&mut failed_rows));
            uncommitted = 0;
            committed = target;
            dim_rejected.clear();
            // Records the commit passed are never read again.
            already_dead.retain(|(t, p, o)| {
                committed
                    .get(t)
                    .and_then(|next| next.get(p))
                    .is_none_or(|next| o >= next)
            });
        }
    }
}

/// Whether the table the deployed version of `model_id` writes holds commits waiting for a
/// decision (after its runner stopped quarantined).
pub async fn awaits_decision(
    lakehouse: &Lakehouse,
    project: &Project,
    model_id: &str,
) -> kappa_lakehouse::Result<bool> {
    let table = lakehouse
        .load_table(&live_table(lakehouse, project, model_id)?)
        .await?;
    Ok(kappa_lakehouse::wap::unpublished(&table).is_some())
}

/// The table the version of `model_id` in `project` writes.
pub fn live_table(
    lakehouse: &Lakehouse,
    project: &Project,
    model_id: &str,
) -> kappa_lakehouse::Result<kappa_lakehouse::TableIdent> {
    let (layer, name) = model_id.split_once('.').unwrap_or(("", model_id));
    written_table(lakehouse, layer, name, &model_version(project, model_id))
}

/// The table version `version` of `layer.name` writes: its own (`version_table`) where the
/// catalog has aliases to switch readers with, else the public name itself.
pub fn written_table(
    lakehouse: &Lakehouse,
    layer: &str,
    name: &str,
    version: &str,
) -> kappa_lakehouse::Result<kappa_lakehouse::TableIdent> {
    if lakehouse.supports_aliases() {
        version_table(layer, name, version)
    } else {
        table_ident(layer, name)
    }
}

/// Decides about `table`'s commits waiting on its audit branch, if any: published when the
/// model's expectations pass (or it has none that audit any more), quarantined otherwise.
/// `row_level_counted`: the row-level ones were counted on the rows written
/// ([`EXPECTATIONS_PROPERTY`]), not to be queried again.
async fn settle(
    lakehouse: &Lakehouse,
    model: &kappa_pipeline::Model,
    table: kappa_lakehouse::Table,
    staged: bool,
    row_level_counted: bool,
    audit: &mut crate::commit_audit::CommitAudit,
) -> Result<kappa_lakehouse::Table, RunnerError> {
    let model_id = model.id();
    let lake_err = |source| RunnerError::Lakehouse {
        model: model_id.clone(),
        source,
    };
    let Some(head) = kappa_lakehouse::wap::unpublished(&table) else {
        return Ok(table);
    };
    if staged {
        let mut blocking = Vec::new();
        if row_level_counted {
            let counted: BTreeMap<String, u64> = head
                .summary()
                .additional_properties
                .get(EXPECTATIONS_PROPERTY)
                .and_then(|c| serde_json::from_str(c).ok())
                .unwrap_or_default();
            for e in &model.config.expectations {
                if let Some(n) = counted.get(&e.name)
                    && e.severity == kappa_pipeline::expect::Severity::Fail
                {
                    blocking.push(format!(
                        "expectation `{}` ({}) failed: {n} failing",
                        e.name,
                        e.check.kind()
                    ));
                }
            }
        }
        let judged = audit
            .judge(lakehouse, model, &table, row_level_counted)
            .await
            .map_err(lake_err)?;
        // A check that cannot run is retried (a table it reads may not exist yet), not a
        // reason to withhold the commit.
        if let Some(j) = judged.iter().find(|j| j.audited.error.is_some()) {
            return Err(lake_err(kappa_lakehouse::LakehouseError::Query(
                j.audited.describe(),
            )));
        }
        // A commit fails a check only by making it worse than what is published: a forced
        // publication, an empty table's freshness or a row count still growing to its minimum
        // do not hold back every commit after it.
        for j in &judged {
            if j.blocks() {
                blocking.push(j.audited.describe());
            } else if j.audited.failing > 0 {
                tracing::warn!(model = %model_id, "{}", j.audited.describe());
            }
        }
        if !blocking.is_empty() {
            let reason = format!(
                "{}; main is untouched — `kappa audit {model_id}` shows what failed, `kappa \
                 publish {model_id} --force` or `kappa discard {model_id}` decides",
                blocking.join("; ")
            );
            tracing::error!(model = %model_id, "commit quarantined: {reason}");
            return Err(RunnerError::Quarantined {
                model: model_id,
                reason,
            });
        }
    }
    lakehouse.publish_audited(&table).await.map_err(lake_err)
}

/// The table the version `version` of `model_id` writes (see [`run_version`]), created as
/// `output_schema` says, or rebuilt when another version or schema wrote it; with
/// `publish_if_new`, published as the model's public table when that names none yet.
pub(crate) async fn open_output(
    lakehouse: &Lakehouse,
    project: &Project,
    model_id: &str,
    version: &str,
    output_schema: &arrow::datatypes::SchemaRef,
    publish_if_new: bool,
) -> Result<(kappa_lakehouse::TableIdent, kappa_lakehouse::Table), RunnerError> {
    let model = &project.models[model_id];
    let err_model = || model_id.to_owned();
    let (public, ident) = table_ident(&model.layer, &model.name)
        .and_then(|public| {
            let ident = written_table(lakehouse, &model.layer, &model.name, version)?;
            Ok((public, ident))
        })
        .map_err(|source| RunnerError::Lakehouse {
            model: err_model(),
            source,
        })?;
    let lake_err = |source| RunnerError::Lakehouse {
        model: model_id.to_owned(),
        source,
    };
    let partition_by = &model.config.partition_by;
    let mut table = lakehouse
        .ensure_partitioned_table(&ident, output_schema, partition_by)
        .await
        .map_err(lake_err)?;
    let written_by = kappa_lakehouse::wap::head(&table).and_then(|s| {
        s.summary()
            .additional_properties
            .get(VERSION_PROPERTY)
            .cloned()
    });
    if written_by.is_some_and(|v| v != version) || !lakehouse.schema_matches(&table, output_schema)
    {
        // The model changed: its table is rebuilt from the start of the log.
        tracing::warn!(model = %model_id, "the model changed since its table was written; rebuilding the table from the start of the log");
        table = lakehouse
            .replace_table(&ident, output_schema, partition_by)
            .await
            .map_err(lake_err)?;
    }
    if publish_if_new
        && public != ident
        && !lakehouse
            .aliases()
            .await
            .map_err(lake_err)?
            .contains_key(&public)
    {
        // The model's first version: its table is the public one from the start.
        lakehouse
            .publish(&[(public.clone(), ident.clone())])
            .await
            .map_err(lake_err)?;
    }
    Ok((ident, table))
}

/// The dimensions `model_id` looks up, each with whether this model reports the records of
/// its topic that do not fit its schema.
pub(crate) async fn open_dimensions(
    log: &Log,
    project: &Project,
    model_id: &str,
    dimensions: Vec<(String, Arc<crate::dimension::DimensionTable>)>,
) -> Result<Vec<(Dimension, bool)>, RunnerError> {
    let mut dims = Vec::new();
    for (name, table) in dimensions {
        if project.is_dimension(&name) {
            dims.push((
                open_dimension_model(log, project, model_id, &name, table).await?,
                false,
            ));
            continue;
        }
        let topic = log.topic(&name).map_err(|source| RunnerError::Log {
            model: model_id.to_owned(),
            source,
        })?;
        let dimension = Dimension::new(topic, &project.topics[&name], table).map_err(|reason| {
            RunnerError::Unsupported {
                model: model_id.to_owned(),
                reason,
            }
        })?;
        let reports = rejects_reporter(project, &name).as_deref() == Some(model_id);
        dims.push((dimension, reports));
    }
    Ok(dims)
}

/// The dimension model `name`, looked up by `model_id`: computed from its topic in this
/// runner (the dimension's own runner reports the records that do not fit).
async fn open_dimension_model(
    log: &Log,
    project: &Project,
    model_id: &str,
    name: &str,
    table: Arc<crate::dimension::DimensionTable>,
) -> Result<Dimension, RunnerError> {
    let plan_error = |source| RunnerError::Plan {
        model: model_id.to_owned(),
        source,
    };
    let planned = plan_model(project, name).await.map_err(plan_error)?;
    let spec = project.topics.get(&planned.topic).ok_or_else(|| {
        plan_error(datafusion::error::DataFusionError::Plan(format!(
            "no topic `{}`",
            planned.topic
        )))
    })?;
    let topic = log
        .topic(&planned.topic)
        .map_err(|source| RunnerError::Log {
            model: model_id.to_owned(),
            source,
        })?;
    let slot = planned.input_slot();
    // What the dimension's table holds: without the rows its `drop` expectations set aside.
    let plan = crate::expect::without_dropped(&planned.ctx, planned.plan, &project.models[name])
        .map_err(plan_error)?;
    let sql = StatelessModel::from_plan(planned.ctx, slot, plan).map_err(plan_error)?;
    let scd = crate::scd::ScdSpec::new(&project.models[name], sql.output_schema().clone())
        .map_err(plan_error)?;
    Ok(Dimension::of_model(
        name,
        topic,
        spec,
        table,
        sql,
        crate::scd::ScdState::new(scd),
    ))
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

/// Runs one micro-batch (one batch per source) through the model's stages: the dedup or the
/// join when there is one, then the computation.
async fn push_stages(
    compute: &mut Compute,
    dedup: &mut Option<Dedup>,
    join: &mut Option<StreamJoin>,
    mut batches: Vec<RecordBatch>,
    watermarks: &[Option<i64>],
) -> datafusion::error::Result<()> {
    let first = watermarks.first().copied().flatten();
    if let Some(join) = join {
        let (Some(right), Some(left)) = (batches.pop(), batches.pop()) else {
            return Err(datafusion::error::DataFusionError::Internal(
                "a join of two streams without two sources".into(),
            ));
        };
        let second = watermarks.get(1).copied().flatten();
        let rows = join.push(left, right, first, second).await?;
        // The pairs' watermark: the lesser of the two.
        let watermark = first.zip(second).map(|(a, b)| a.min(b));
        return compute.push(rows, watermark).await;
    }
    let Some(batch) = batches.pop() else {
        return Ok(());
    };
    let rows = dedup_push(dedup, batch, first).await?;
    compute.push(rows, first).await
}

/// Catches every dimension up to the end of its topic; the records that do not fit, of those
/// whose topic this model reports, are added to `rejected`. False when one failed (it is to be
/// rebuilt: start over).
pub(crate) async fn catch_up_dimensions(
    dims: &mut [(Dimension, bool)],
    rejected: &mut Vec<(String, Rejected)>,
    model: &str,
) -> bool {
    for (dimension, reports) in dims.iter_mut() {
        match dimension.catch_up().await {
            Ok(found) if *reports => {
                rejected.extend(found.into_iter().map(|r| (dimension.topic_name.clone(), r)))
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(model, topic = %dimension.topic_name, error = %e, "computing a dimension failed");
                return false;
            }
        }
    }
    true
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

/// After a failure, puts the computation back to the table's last commit, read again from the
/// catalog (the failed commit may have landed after all). Returns that table, or why the
/// state could not be restored — then nothing may be read until a retry succeeds.
async fn recover(
    compute: &mut Compute,
    dedup: &mut Option<Dedup>,
    join: &mut Option<StreamJoin>,
    sources: &mut [Box<dyn Source>],
    lakehouse: &Lakehouse,
    table: &kappa_lakehouse::Table,
) -> Result<kappa_lakehouse::Table, String> {
    let table = lakehouse
        .load_table(table.identifier())
        .await
        .map_err(|e| format!("reloading the table failed: {e}"))?;
    compute
        .restore(lakehouse, &table)
        .await
        .map_err(|e| format!("restoring the model's state failed: {e}"))?;
    let properties =
        kappa_lakehouse::wap::head(&table).map(|s| s.summary().additional_properties.clone());
    if let Some(dedup) = dedup {
        dedup
            .restore(lakehouse, &table, properties.as_ref())
            .await
            .map_err(|e| format!("restoring the dedup state failed: {e}"))?;
    }
    if let Some(join) = join {
        join.restore(lakehouse, &table, properties.as_ref())
            .await
            .map_err(|e| format!("restoring the join state failed: {e}"))?;
    }
    restore_marks(sources, properties.as_ref())
        .map_err(|e| format!("restoring the watermarks failed: {e}"))?;
    for source in sources {
        source.restore(properties.as_ref());
    }
    Ok(table)
}

/// Stages `table` (its commits go to the audit branch) when `staged`, unstages it otherwise.
/// Iceberg catalogs only branch from a snapshot: a staged table without one first gets an
/// empty one on main (readers see no rows either way).
async fn set_staging(
    lakehouse: &Lakehouse,
    ident: &kappa_lakehouse::TableIdent,
    mut table: kappa_lakehouse::Table,
    staged: bool,
) -> kappa_lakehouse::Result<kappa_lakehouse::Table> {
    lakehouse.unstage(ident);
    if staged {
        if table.metadata().current_snapshot().is_none() {
            table = lakehouse
                .append_files(&table, Vec::new(), HashMap::new())
                .await?;
        }
        lakehouse.stage(ident);
    }
    Ok(table)
}

/// Whether the commit whose summary is `properties` records positions in topics and none in
/// an upstream's table (dimensions aside).
/// (A record that does not read is reported where it is read for the start.)
fn written_from_topics(properties: Option<&HashMap<String, String>>) -> bool {
    CommitRecord::of(properties).is_ok_and(|r| crate::commit_record::from_topics(&r.offsets))
}

/// Runs the dedup stage: the rows it decides, as one batch for the model.
async fn dedup_push(
    dedup: &mut Option<Dedup>,
    batch: RecordBatch,
    watermark: Option<i64>,
) -> datafusion::error::Result<RecordBatch> {
    let Some(dedup) = dedup else {
        return Ok(batch);
    };
    let rows = dedup.push(batch, watermark).await?;
    Ok(arrow::compute::concat_batches(
        dedup.output_schema(),
        &rows,
    )?)
}

/// Puts every source's watermarks back to what the table's current snapshot (`properties`)
/// saved.
fn restore_marks(
    sources: &mut [Box<dyn Source>],
    properties: Option<&HashMap<String, String>>,
) -> Result<(), String> {
    let mut saved: BTreeMap<String, serde_json::Value> =
        crate::summary_json(properties, WATERMARKS_PROPERTY).map_err(|e| e.to_string())?;
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

/// The model that reports the records of `topic` that do not fit its schema: the first model,
/// in dependency order, whose rows come from `topic`. Every other model skips them silently.
pub fn rejects_reporter(project: &Project, topic: &str) -> Option<String> {
    project
        .order
        .iter()
        .find(|id| reads_topic(project, id, topic))
        .cloned()
}

/// Whether the rows of model `id` come from `topic`: through the models it recomputes, or
/// directly when it reads its upstream's table.
fn reads_topic(project: &Project, id: &str, topic: &str) -> bool {
    if project.reads_tables.contains_key(id) {
        project.models.get(id).is_some_and(|m| {
            m.inputs
                .contains(&kappa_pipeline::Input::Topic(topic.to_owned()))
        })
    } else {
        project.source_topics(id).contains(topic)
    }
}

/// The dead-letter topic, created on first use.
pub fn dead_letter_topic(log: &Log) -> kappa_log::Result<Arc<Topic>> {
    match log.topic(DEAD_LETTER_TOPIC) {
        Ok(topic) => Ok(topic),
        Err(kappa_log::LogError::UnknownTopic { .. }) => {
            match log.create_topic(DEAD_LETTER_TOPIC, kappa_log::TopicConfig::default()) {
                Ok(topic) => Ok(topic),
                Err(kappa_log::LogError::TopicExists { .. }) => log.topic(DEAD_LETTER_TOPIC),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

pub(crate) fn dead_letter(model: &str, topic: &str, rejected: &Rejected) -> Record {
    let mut value = serde_json::json!({
        "model": model,
        "topic": topic,
        "partition": rejected.partition,
        "offset": rejected.offset,
        "reason": rejected.reason,
        "raw_base64": BASE64.encode(&rejected.raw),
    });
    // The raw bytes as text too when they are UTF-8, for people reading the topic.
    if let (Ok(text), Some(fields)) = (std::str::from_utf8(&rejected.raw), value.as_object_mut()) {
        fields.insert("raw".to_owned(), text.into());
    }
    Record::keyed(model.to_owned(), value.to_string())
}

/// The records this model already put in the dead-letter topic after `from`: a commit that
/// failed after its dead letters were written must not write them twice. A read error is an
/// error, never a shorter set (which would write the letters past it again).
pub(crate) fn dead_letters_after(
    topic: &Topic,
    from: u64,
    model: &str,
) -> Result<BTreeSet<(String, u32, u64)>, kappa_log::LogError> {
    let mut seen = BTreeSet::new();
    each_letter(topic.partition(0)?, from, |letter| {
        if letter["model"] == model
            && let (Some(topic), Some(p), Some(o)) = (
                letter["topic"].as_str(),
                letter["partition"].as_u64(),
                letter["offset"].as_u64(),
            )
        {
            seen.insert((topic.to_owned(), p as u32, o));
        }
    })?;
    Ok(seen)
}

/// Calls `each` with every letter of a dead-letter `partition` from offset `from` to its end
/// (a record that is not JSON is not one of ours, and is passed over); returns the offset after
/// the last record read. A read error is an error, never a shorter read.
pub fn each_letter(
    partition: &kappa_log::Partition,
    from: u64,
    mut each: impl FnMut(&serde_json::Value),
) -> Result<u64, kappa_log::LogError> {
    let mut next = from;
    if from >= partition.offsets().visible_offset {
        return Ok(next);
    }
    let start = if from == 0 {
        StartAt::Beginning
    } else {
        StartAt::Offset(from)
    };
    let mut reader = partition.reader(start)?;
    while let Some(chunk) = reader.read(READ_BYTES)? {
        for record in chunk.records() {
            let record = record?;
            next = record.offset + 1;
            if let Ok(letter) = serde_json::from_slice::<serde_json::Value>(record.value) {
                each(&letter);
            }
        }
    }
    Ok(next)
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

#[cfg(test)]
mod tests {
    use super::*;
    use kappa_log::TopicConfig;

    /// A damaged letter in the middle of the dead-letter topic is an error, not the letters
    /// before it: with those only, the runner would write the letters after it again.
    #[test]
    fn dead_letters_after_a_damaged_letter_are_an_error_not_a_short_set() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        {
            let log = Log::open(dir.path()).expect("a log in a fresh directory");
            let topic = log
                .create_topic(DEAD_LETTER_TOPIC, TopicConfig::default())
                .expect("a new topic");
            let partition = topic.partition(0).expect("partition 0");
            for offset in 0..3 {
                let rejected = Rejected {
                    partition: 0,
                    offset,
                    reason: "bad".into(),
                    raw: b"{\"x\":".to_vec(),
                };
                partition
                    .append_blocking(&[dead_letter("silver.orders", "orders", &rejected)])
                    .expect("an append");
            }
            let found = dead_letters_after(&topic, 0, "silver.orders").expect("a whole topic");
            assert_eq!(found.len(), 3);
            log.close().expect("a clean close");
        }
        // Flip a byte of the second letter's value.
        let segment = walk(dir.path())
            .into_iter()
            .find(|p| p.extension().is_some_and(|e| e == "log"))
            .expect("a segment file");
        let mut bytes = std::fs::read(&segment).expect("the segment");
        let second = bytes
            .windows(5)
            .enumerate()
            .filter(|(_, w)| *w == b"model")
            .nth(1)
            .expect("a second letter")
            .0;
        bytes[second] ^= 0x20;
        std::fs::write(&segment, bytes).expect("the damaged segment");
        let log =
            Log::open(dir.path()).expect("the log opens: the damage is before the durable point");
        let topic = log.topic(DEAD_LETTER_TOPIC).expect("the topic");
        assert!(dead_letters_after(&topic, 0, "silver.orders").is_err());
    }

    /// Every file below `dir`.
    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).expect("a readable folder").flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
        files
    }
}
