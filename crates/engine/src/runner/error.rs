//! Why a model cannot run.

/// Why a model cannot run.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("model {model}: {reason}")]
    Unsupported { model: String, reason: String },
    #[error("model {model}: {source}")]
    Log {
        model: String,
        #[source]
        source: crate::event_log::EventLogError,
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

/// A planning error as the runner reports it: a shape that cannot run incrementally is
/// `Unsupported`, the rest a planning error.
pub(super) fn planning_error(
    model_id: &str,
    error: datafusion::error::DataFusionError,
) -> RunnerError {
    RunnerError::of(model_id, crate::error::EngineError::from(error))
}

impl RunnerError {
    /// `error` of the engine, as the runner of `model_id` reports it.
    pub fn of(model_id: &str, error: crate::error::EngineError) -> RunnerError {
        use crate::error::EngineError;
        let model = model_id.to_owned();
        match error {
            EngineError::Unsupported(reason) => RunnerError::Unsupported { model, reason },
            EngineError::Plan(source) => RunnerError::Plan { model, source },
            EngineError::Log(source) => RunnerError::Log { model, source },
            EngineError::Lakehouse(source) => RunnerError::Lakehouse { model, source },
        }
    }
}
