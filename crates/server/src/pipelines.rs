//! The project's pipelines inside `kappa up`: topics created as declared, one runner per model.

use std::collections::BTreeMap;
use std::sync::Arc;

use kappa_engine::runner::{OFFSETS_PROPERTY, Offsets, RunnerError, run_version, version_table};
use kappa_lakehouse::Lakehouse;
use kappa_log::{FsyncPolicy, Log, TopicConfig};
use kappa_pipeline::Project;
use tokio::task::JoinHandle;

/// Creates every topic the project declares that the log does not have yet. A topic that
/// exists with another partition count is left as it is, with a warning: partitions are fixed.
pub fn ensure_topics(log: &Log, project: &Project) -> anyhow::Result<()> {
    for spec in project.topics.values() {
        if let Ok(existing) = log.topic(&spec.name) {
            if existing.partition_count() != spec.partitions {
                tracing::warn!(
                    topic = %spec.name,
                    declared = spec.partitions,
                    actual = existing.partition_count(),
                    "topic exists with another partition count; partitions are fixed at creation"
                );
            }
            continue;
        }
        let fsync = match &spec.fsync {
            Some(policy) => policy
                .parse::<FsyncPolicy>()
                .map_err(|e| anyhow::anyhow!("{}: {e}", spec.file))?,
            None => FsyncPolicy::Always,
        };
        let config = TopicConfig {
            partitions: spec.partitions,
            fsync,
            retention_ms: spec.retention_ms,
            ..TopicConfig::default()
        };
        log.create_topic(&spec.name, config)?;
        tracing::info!(topic = %spec.name, partitions = spec.partitions, "created topic from the project");
    }
    Ok(())
}

/// How long a failed runner waits before it starts again.
const RESTART_DELAY_MS: u64 = 2000;

/// What a model's runner is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunnerState {
    Running,
    /// Stopped by this error; starts again from its last commit after a pause.
    Restarting(String),
    /// The model cannot run; the reason.
    NotRunning(String),
}

/// The state of every runner, by model.
#[derive(Debug, Clone, Default)]
pub struct RunnerStates(Arc<std::sync::Mutex<BTreeMap<String, RunnerState>>>);

impl RunnerStates {
    pub fn get(&self, model: &str) -> Option<RunnerState> {
        self.0
            .lock()
            .map(|states| states.get(model).cloned())
            .unwrap_or(None)
    }

    fn set(&self, model: &str, state: RunnerState) {
        if let Ok(mut states) = self.0.lock() {
            states.insert(model.to_owned(), state);
        }
    }
}

/// The running model runners, and the cutover a deploy waits for.
#[derive(Debug)]
pub struct Pipelines {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<(String, JoinHandle<()>)>,
    states: RunnerStates,
}

impl Pipelines {
    /// Starts a runner for every model, in dependency order, each publishing its table as the
    /// model's public one when the model has none.
    pub fn start(log: Arc<Log>, lakehouse: Lakehouse, project: Arc<Project>) -> Pipelines {
        let models = project.order.clone();
        Pipelines::start_versions(log, lakehouse, project, &models, &|_| true)
    }

    /// Starts a runner for each of `models` of `project` (their versions, into their tables).
    fn start_versions(
        log: Arc<Log>,
        lakehouse: Lakehouse,
        project: Arc<Project>,
        models: &[String],
        publish_if_new: &dyn Fn(&str) -> bool,
    ) -> Pipelines {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let states = RunnerStates::default();
        let tasks = models
            .iter()
            .map(|model| {
                let task = tokio::spawn(run_until_stopped(
                    log.clone(),
                    lakehouse.clone(),
                    project.clone(),
                    model.clone(),
                    publish_if_new(model),
                    states.clone(),
                    stopped.clone(),
                ));
                (model.clone(), task)
            })
            .collect();
        Pipelines {
            stop,
            tasks,
            states,
        }
    }

    /// Runs `project` over what `deployed` ran. Models whose version is deployed go on; changed
    /// and new ones run as new versions into new tables, replaying their inputs, while the
    /// deployed versions of the changed ones keep running and serving. Once every new version
    /// has caught up, one transaction points all their public names at the new tables
    /// (`Lakehouse::publish`), the old versions stop, and `on_cutover` records the deployment.
    /// With nothing deployed, every model's table is public from the start.
    pub fn deploy(
        log: Arc<Log>,
        lakehouse: Lakehouse,
        project: Arc<Project>,
        deployed: Option<&Project>,
        on_cutover: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
    ) -> anyhow::Result<Pipelines> {
        let Some(deployed) = deployed.filter(|_| lakehouse.supports_aliases()) else {
            on_cutover()?;
            return Ok(Pipelines::start(log, lakehouse, project));
        };
        let versions = kappa_pipeline::deploy::versions(&project);
        let before = kappa_pipeline::deploy::versions(deployed);
        let replaying: Vec<String> = project
            .order
            .iter()
            .filter(|id| versions.get(*id) != before.get(*id))
            .cloned()
            .collect();
        if replaying.is_empty() {
            on_cutover()?;
            return Ok(Pipelines::start(log, lakehouse, project));
        }
        tracing::info!(models = ?replaying, "deploying: new versions replay beside the live ones");
        // A model whose version is deployed keeps its public table (or gets one, if it never
        // had); the others' public names wait for the cutover.
        let mut pipelines = Pipelines::start_versions(
            log.clone(),
            lakehouse.clone(),
            project.clone(),
            &project.order,
            &|id| !replaying.iter().any(|r| r == id),
        );
        // The live versions of the changed models keep running until the cutover.
        let live: Vec<String> = replaying
            .iter()
            .filter(|id| deployed.models.contains_key(*id))
            .cloned()
            .collect();
        let old = Pipelines::start_versions(
            log.clone(),
            lakehouse.clone(),
            Arc::new(deployed.clone()),
            &live,
            &|_| false,
        );
        let stopped = pipelines.stop.subscribe();
        let cutover = tokio::spawn(async move {
            if let Err(e) = cut_over(
                &log, &lakehouse, &project, &replaying, old, stopped, on_cutover,
            )
            .await
            {
                tracing::error!(error = %format!("{e:#}"), "the cutover failed; the deployed versions keep serving");
            }
        });
        pipelines.tasks.push(("(cutover)".to_owned(), cutover));
        Ok(pipelines)
    }

    /// What every runner is doing.
    pub fn states(&self) -> RunnerStates {
        self.states.clone()
    }

    /// Stops every runner at its next step and waits for them.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for (model, task) in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(%model, error = %e, "runner task failed");
            }
        }
    }
}

/// How often a deploy looks whether its new versions caught up.
const CUTOVER_CHECK_MS: u64 = 200;

/// Waits until every model of `replaying` has committed, in its version's table, every record
/// its topics held at the previous check (so its lag is within a check and a commit interval),
/// then publishes their public names together, stops `old` and calls `on_cutover`. Returns
/// early, stopping `old`, when `stopped` turns true.
async fn cut_over(
    log: &Log,
    lakehouse: &Lakehouse,
    project: &Project,
    replaying: &[String],
    old: Pipelines,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    on_cutover: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let versions = kappa_pipeline::deploy::versions(project);
    let mut switches = Vec::new();
    for id in replaying {
        let model = &project.models[id];
        let version = versions.get(id).cloned().unwrap_or_default();
        switches.push((
            id.clone(),
            kappa_lakehouse::table_ident(&model.layer, &model.name)?,
            version_table(&model.layer, &model.name, &version)?,
        ));
    }
    let mut ends_before: Option<BTreeMap<String, Offsets>> = None;
    loop {
        if *stopped.borrow() {
            old.stop().await;
            return Ok(());
        }
        let ends = topic_ends(log, project, replaying);
        if let Some(before) = &ends_before {
            let mut all = true;
            for (id, _, table) in &switches {
                all &= caught_up(lakehouse, table, &before[id]).await;
            }
            if all {
                let pairs: Vec<_> = switches
                    .iter()
                    .map(|(_, public, table)| (public.clone(), table.clone()))
                    .collect();
                lakehouse.publish(&pairs).await?;
                tracing::info!(models = ?replaying, "cut over: the new versions serve");
                old.stop().await;
                return on_cutover();
            }
        }
        ends_before = Some(ends);
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_millis(CUTOVER_CHECK_MS)) => {}
            _ = stopped.changed() => {}
        }
    }
}

/// The end of every partition of each model's source topics, by model.
fn topic_ends(log: &Log, project: &Project, models: &[String]) -> BTreeMap<String, Offsets> {
    models
        .iter()
        .map(|id| {
            let mut ends = Offsets::new();
            for name in project.source_topics(id) {
                if let Ok(topic) = log.topic(&name) {
                    let partitions = topic
                        .partitions()
                        .iter()
                        .map(|p| (p.id(), p.offsets().visible_offset))
                        .collect();
                    ends.insert(name, partitions);
                }
            }
            (id.clone(), ends)
        })
        .collect()
}

/// Whether the last commit of `table` passed every offset of `ends`.
async fn caught_up(
    lakehouse: &Lakehouse,
    table: &kappa_lakehouse::TableIdent,
    ends: &Offsets,
) -> bool {
    let committed: Offsets = match lakehouse.last_commit(table).await {
        Ok(Some(properties)) => properties
            .get(OFFSETS_PROPERTY)
            .and_then(|o| serde_json::from_str(o).ok())
            .unwrap_or_default(),
        // No commit yet: caught up only with empty topics.
        _ => Offsets::new(),
    };
    ends.iter().all(|(topic, partitions)| {
        partitions.iter().all(|(partition, end)| {
            *end == 0
                || committed
                    .get(topic)
                    .and_then(|c| c.get(partition))
                    .is_some_and(|next| next >= end)
        })
    })
}

/// One model's runner: restarted after a failure (from its last commit, after a pause) until
/// `stopped`; a model that cannot run at all gives up.
async fn run_until_stopped(
    log: Arc<Log>,
    lakehouse: Lakehouse,
    project: Arc<Project>,
    name: String,
    publish_if_new: bool,
    states: RunnerStates,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        states.set(&name, RunnerState::Running);
        // Each attempt is a task of its own: a panic (a bug, in kappa or a library) ends the
        // attempt, is reported and restarted like any failure, instead of leaving the model
        // silently stopped.
        let run = tokio::spawn(run_version(
            log.clone(),
            lakehouse.clone(),
            project.clone(),
            name.clone(),
            publish_if_new,
            stopped.clone(),
        ));
        let outcome = match run.await {
            Ok(outcome) => outcome,
            Err(e) => Err(RunnerError::Panicked {
                model: name.clone(),
                reason: panic_message(e),
            }),
        };
        match outcome {
            Ok(()) => return,
            Err(e @ RunnerError::Unsupported { .. }) => {
                tracing::warn!(model = %name, "not running: {e}");
                states.set(&name, RunnerState::NotRunning(e.to_string()));
                return;
            }
            Err(e) => {
                states.set(&name, RunnerState::Restarting(e.to_string()));
                tracing::error!(model = %name, "stopped: {e}; restarting in {RESTART_DELAY_MS} ms")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_millis(RESTART_DELAY_MS)) => {}
            _ = stopped.changed() => {}
        }
        if *stopped.borrow() {
            return;
        }
    }
}

/// What a runner task that did not finish says about why.
fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned()),
        Err(e) => e.to_string(),
    }
}
