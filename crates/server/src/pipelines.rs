//! The project's pipelines inside `kappa up`: topics created as declared, one runner per model.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;
use kappa_engine::event_log::EventLog;
use kappa_engine::runner::{RunnerError, run_version};
use kappa_lakehouse::Lakehouse;
use kappa_log::{FsyncPolicy, Log, TopicConfig};
use kappa_pipeline::Project;
use tokio::task::JoinHandle;

/// Creates every topic the project declares that the log does not have yet. On the embedded
/// log, a topic that exists with another partition count is left as it is, with a warning
/// (partitions are fixed); on a Kafka cluster, where other producers rely on the partitioning
/// too, it is an error that says what differs.
pub async fn ensure_topics(log: &EventLog, project: &Arc<Project>) -> anyhow::Result<()> {
    match log {
        EventLog::Embedded(log) => {
            let (log, project) = (log.clone(), project.clone());
            tokio::task::spawn_blocking(move || ensure_embedded_topics(&log, &project))
                .await
                .context("join topic creation")?
        }
        EventLog::Kafka(kafka) => {
            for spec in project.topics.values() {
                let ensured = kafka
                    .cluster
                    .ensure_topic(&spec.name, spec.partitions)
                    .await
                    .with_context(|| spec.file.clone())?;
                if ensured == kappa_kafka::Ensured::Created {
                    tracing::info!(topic = %spec.name, partitions = spec.partitions, "created topic on the Kafka cluster from the project");
                }
            }
            Ok(())
        }
    }
}

fn ensure_embedded_topics(log: &Log, project: &Project) -> anyhow::Result<()> {
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
    /// A commit failed its audit and waits for `kappa publish --force` or `kappa discard`;
    /// what failed.
    Quarantined(String),
    /// A model it reads is quarantined: which, and why.
    Waiting(String),
}

/// How often a quarantined model looks whether its commit was decided.
const DECISION_POLL_MS: u64 = 300;

/// The state of every runner, by model: each runner writes its own cell, which moves with it
/// when another set adopts it ([`Pipelines::adopt`]).
#[derive(Debug, Clone, Default)]
pub struct RunnerStates(Arc<std::sync::Mutex<BTreeMap<String, StateCell>>>);

type StateCell = Arc<std::sync::Mutex<RunnerState>>;

impl RunnerStates {
    pub fn get(&self, model: &str) -> Option<RunnerState> {
        let cell = self.0.lock().ok()?.get(model).cloned()?;
        cell.lock().ok().map(|state| state.clone())
    }

    fn insert(&self, model: &str, cell: StateCell) {
        if let Ok(mut states) = self.0.lock() {
            states.insert(model.to_owned(), cell);
        }
    }

    fn remove(&self, model: &str) {
        if let Ok(mut states) = self.0.lock() {
            states.remove(model);
        }
    }
}

/// One model's runner task, with its own stop signal.
#[derive(Debug)]
struct Runner {
    stop: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<()>,
    state: StateCell,
}

/// A set of running model runners: stopped together, or some of them, or handed to another
/// set at a cutover so that they run on without a pause.
#[derive(Debug)]
pub struct Pipelines {
    /// Turns true when the whole set is told to stop.
    stopped: tokio::sync::watch::Sender<bool>,
    runners: BTreeMap<String, Runner>,
    states: RunnerStates,
}

impl Pipelines {
    /// Starts a runner for every model, in dependency order, each publishing its table as the
    /// model's public one when the model has none.
    pub fn start(log: EventLog, lakehouse: Lakehouse, project: Arc<Project>) -> Pipelines {
        let models = project.order.clone();
        Pipelines::start_versions(log, lakehouse, project, &models, &|_| true)
    }

    /// Starts a runner for each of `models` of `project` (their versions, into their tables).
    pub(crate) fn start_versions(
        log: EventLog,
        lakehouse: Lakehouse,
        project: Arc<Project>,
        models: &[String],
        publish_if_new: &dyn Fn(&str) -> bool,
    ) -> Pipelines {
        let mut pipelines = Pipelines {
            stopped: tokio::sync::watch::channel(false).0,
            runners: BTreeMap::new(),
            states: RunnerStates::default(),
        };
        pipelines.start_more(log, lakehouse, project, models, publish_if_new);
        pipelines
    }

    /// Starts a runner for each of `models` of `project` in this set.
    pub(crate) fn start_more(
        &mut self,
        log: EventLog,
        lakehouse: Lakehouse,
        project: Arc<Project>,
        models: &[String],
        publish_if_new: &dyn Fn(&str) -> bool,
    ) {
        for model in models {
            kappa_engine::upstream::hold_before_start(&lakehouse, &project, model);
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let state: StateCell = Arc::new(std::sync::Mutex::new(RunnerState::Running));
            let task = tokio::spawn(run_until_stopped(
                log.clone(),
                lakehouse.clone(),
                project.clone(),
                model.clone(),
                publish_if_new(model),
                state.clone(),
                stopped,
            ));
            self.states.insert(model, state.clone());
            self.runners
                .insert(model.clone(), Runner { stop, task, state });
        }
    }

    /// Turns true when the runners are told to stop.
    pub(crate) fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stopped.subscribe()
    }

    /// What every runner is doing.
    pub fn states(&self) -> RunnerStates {
        self.states.clone()
    }

    /// The models this set runs.
    pub(crate) fn models(&self) -> Vec<String> {
        self.runners.keys().cloned().collect()
    }

    /// Stops the runners of `models` at their next step and waits for them; the others go on.
    pub(crate) async fn stop_models(&mut self, models: &[String]) {
        let mut stopping = Vec::new();
        for model in models {
            if let Some(runner) = self.runners.remove(model) {
                let _ = runner.stop.send(true);
                self.states.remove(model);
                stopping.push((model.clone(), runner.task));
            }
        }
        for (model, task) in stopping {
            if let Err(e) = task.await {
                tracing::error!(%model, error = %e, "runner task failed");
            }
        }
    }

    /// Takes `other`'s runners into this set (they run on; a runner this set had for the same
    /// model is stopped first).
    pub(crate) async fn adopt(&mut self, mut other: Pipelines) {
        let models = other.models();
        self.stop_models(&models).await;
        for (model, runner) in std::mem::take(&mut other.runners) {
            self.states.insert(&model, runner.state.clone());
            self.runners.insert(model, runner);
        }
    }

    /// Stops every runner at its next step and waits for them.
    pub async fn stop(mut self) {
        let _ = self.stopped.send(true);
        let models = self.models();
        self.stop_models(&models).await;
    }
}

/// One model's runner: restarted after a failure (from its last commit, after a pause) until
/// `stopped`; a model that cannot run at all gives up.
async fn run_until_stopped(
    log: EventLog,
    lakehouse: Lakehouse,
    project: Arc<Project>,
    name: String,
    publish_if_new: bool,
    state: StateCell,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let set = |to: RunnerState| set_state(&state, to);
    loop {
        set(RunnerState::Running);
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
        // A failing model's table is blocked, so that the models reading it wait (and say
        // why) instead of computing on; its runner lifts the block once it commits again.
        let failing = |e: &RunnerError| {
            kappa_engine::runner::block_failing(&lakehouse, &project, &name, &e.to_string());
        };
        let unblock_failing = || {
            if let Ok(ident) = kappa_engine::runner::live_table(&lakehouse, &project, &name) {
                kappa_engine::runner::recovered(&lakehouse, &ident);
            }
        };
        match outcome {
            Ok(()) => {
                unblock_failing();
                return;
            }
            // Neither gets better by itself: it stays stopped, saying why (its readers wait).
            Err(e @ (RunnerError::Unsupported { .. } | RunnerError::CorruptCommit { .. })) => {
                tracing::warn!(model = %name, "not running: {e}");
                failing(&e);
                set(RunnerState::NotRunning(e.to_string()));
                return;
            }
            Err(RunnerError::Waiting {
                upstream, reason, ..
            }) => {
                set(RunnerState::Waiting(format!(
                    "waits for {upstream}, which is {reason}"
                )));
                // Runs again once the model it waits for does.
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(std::time::Duration::from_millis(DECISION_POLL_MS)) => {}
                        _ = stopped.changed() => {}
                    }
                    if *stopped.borrow() {
                        return;
                    }
                    if kappa_engine::runner::waits_for(&lakehouse, &project, &name)
                        .await
                        .is_none()
                    {
                        break;
                    }
                }
                continue;
            }
            Err(RunnerError::Quarantined { reason, .. }) => {
                let ident = kappa_engine::runner::live_table(&lakehouse, &project, &name).ok();
                if let Some(ident) = &ident {
                    lakehouse.block(ident, &format!("quarantined: {reason}"));
                }
                set(RunnerState::Quarantined(reason));
                // Runs again once someone published or discarded the commit.
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(std::time::Duration::from_millis(DECISION_POLL_MS)) => {}
                        _ = stopped.changed() => {}
                    }
                    if *stopped.borrow() {
                        if let Some(ident) = &ident {
                            lakehouse.unblock(ident);
                        }
                        return;
                    }
                    match kappa_engine::runner::awaits_decision(&lakehouse, &project, &name).await {
                        Ok(true) => {}
                        Ok(false) => {
                            if let Some(ident) = &ident {
                                lakehouse.unblock(ident);
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(model = %name, error = %e, "reading the quarantined table failed")
                        }
                    }
                }
                continue;
            }
            Err(e) => {
                failing(&e);
                set(RunnerState::Restarting(e.to_string()));
                tracing::error!(model = %name, "stopped: {e}; restarting in {RESTART_DELAY_MS} ms")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_millis(RESTART_DELAY_MS)) => {}
            _ = stopped.changed() => {}
        }
        if *stopped.borrow() {
            unblock_failing();
            return;
        }
    }
}

/// Records what a runner is doing in its cell.
fn set_state(cell: &StateCell, to: RunnerState) {
    if let Ok(mut state) = cell.lock() {
        *state = to;
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

/// The bronze runners: one per topic (`bronze.<topic>`), started once the topic is part of a
/// deployed project and run until the server stops; no versions, no deploys.
#[derive(Debug, Default)]
pub struct Bronze {
    runners: BTreeMap<String, (Runner, kappa_engine::bronze::Redactions)>,
    states: RunnerStates,
}

impl Bronze {
    /// Starts a runner for each of `project`'s topics that has none, and restarts those that
    /// the project gives more fields to redact (records already kept stay as they were
    /// written).
    pub async fn ensure(&mut self, log: &EventLog, lakehouse: &Lakehouse, project: &Project) {
        for topic in project.topics.keys() {
            let mut redact = kappa_engine::bronze::redacted_fields(project, topic);
            // A deploy may yet fail and leave the running project's masks in force: what
            // either masks stays redacted (until the server restarts).
            if let Some((_, running)) = self.runners.get(topic) {
                let mut union = running.clone();
                union.fields.extend(redact.fields.iter().cloned());
                union.key |= redact.key;
                if union == *running {
                    continue;
                }
                redact = union;
                self.stop_topic(topic).await;
            }
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let state: StateCell = Arc::new(std::sync::Mutex::new(RunnerState::Running));
            let task = tokio::spawn(run_bronze_until_stopped(
                log.clone(),
                lakehouse.clone(),
                topic.clone(),
                redact.clone(),
                state.clone(),
                stopped,
            ));
            self.states.insert(topic, state.clone());
            self.runners
                .insert(topic.clone(), (Runner { stop, task, state }, redact));
        }
    }

    async fn stop_topic(&mut self, topic: &str) {
        if let Some((runner, _)) = self.runners.remove(topic) {
            let _ = runner.stop.send(true);
            self.states.remove(topic);
            if let Err(e) = runner.task.await {
                tracing::error!(%topic, error = %e, "bronze task failed");
            }
        }
    }

    /// What every bronze runner is doing, by topic.
    pub fn states(&self) -> RunnerStates {
        self.states.clone()
    }

    /// Stops every runner at its next step and waits for them.
    pub async fn stop(&mut self) {
        for (runner, _) in self.runners.values() {
            let _ = runner.stop.send(true);
        }
        for (topic, (runner, _)) in std::mem::take(&mut self.runners) {
            self.states.remove(&topic);
            if let Err(e) = runner.task.await {
                tracing::error!(%topic, error = %e, "bronze task failed");
            }
        }
    }
}

/// One topic's bronze runner, restarted after a failure (from its last commit, after a pause)
/// until `stopped`.
async fn run_bronze_until_stopped(
    log: EventLog,
    lakehouse: Lakehouse,
    topic: String,
    redact: kappa_engine::bronze::Redactions,
    state: StateCell,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let set = |to: RunnerState| set_state(&state, to);
    loop {
        set(RunnerState::Running);
        let run = tokio::spawn(kappa_engine::bronze::run_bronze(
            log.clone(),
            lakehouse.clone(),
            topic.clone(),
            redact.clone(),
            stopped.clone(),
        ));
        let error = match run.await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("panicked: {}", panic_message(e)),
        };
        tracing::error!(%topic, "bronze stopped: {error}; restarting in {RESTART_DELAY_MS} ms");
        set(RunnerState::Restarting(error));
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_millis(RESTART_DELAY_MS)) => {}
            _ = stopped.changed() => {}
        }
        if *stopped.borrow() {
            return;
        }
    }
}
