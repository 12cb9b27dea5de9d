//! The project's pipelines inside `kappa up`: topics created as declared, one runner per model.

use std::collections::BTreeMap;
use std::sync::Arc;

use kappa_engine::runner::{RunnerError, run_version};
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

/// A set of running model runners, stopped together.
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
    pub(crate) fn start_versions(
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
                kappa_engine::upstream::hold_before_start(&lakehouse, &project, model);
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

    /// Turns true when the runners are told to stop.
    pub(crate) fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop.subscribe()
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
