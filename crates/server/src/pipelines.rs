//! The project's pipelines inside `kappa up`: topics created as declared, one runner per model.

use std::collections::BTreeMap;
use std::sync::Arc;

use kappa_engine::runner::{RunnerError, run_model};
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

/// The running model runners.
#[derive(Debug)]
pub struct Pipelines {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<(String, JoinHandle<()>)>,
    states: RunnerStates,
}

impl Pipelines {
    /// Starts a runner for every model, in dependency order.
    pub fn start(log: Arc<Log>, lakehouse: Lakehouse, project: Arc<Project>) -> Pipelines {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        let states = RunnerStates::default();
        for model in &project.order {
            let states = states.clone();
            let (log, lakehouse, project) = (log.clone(), lakehouse.clone(), project.clone());
            let mut stopped = stopped.clone();
            let name = model.clone();
            let task = tokio::spawn(async move {
                // A runner that fails (its table or the log unavailable) starts again from its
                // last commit after a pause; only a model that cannot run at all gives up.
                loop {
                    states.set(&name, RunnerState::Running);
                    // Each attempt is a task of its own: a panic (a bug, in kappa or a library)
                    // ends the attempt, is reported and restarted like any failure, instead of
                    // leaving the model silently stopped.
                    let run = tokio::spawn(run_model(
                        log.clone(),
                        lakehouse.clone(),
                        project.clone(),
                        name.clone(),
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
            });
            tasks.push((model.clone(), task));
        }
        Pipelines {
            stop,
            tasks,
            states,
        }
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
