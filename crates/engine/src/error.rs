//! The engine's errors, by kind.
//!
//! A model whose SQL cannot run incrementally is [`Unsupported`], with the reason and the
//! nearest form that runs — its own type, never DataFusion's "not implemented" (which means a
//! SQL feature DataFusion lacks). Where a signature is DataFusion's (planning, operators built
//! from plans), it travels inside `DataFusionError::External` and is found again with
//! [`unsupported_reason`].

use datafusion::error::DataFusionError;

/// A model's shape that cannot run incrementally, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

/// `reason` as the DataFusion error a planning function returns.
pub fn unsupported(reason: String) -> DataFusionError {
    DataFusionError::External(Box::new(Unsupported(reason)))
}

/// The reason, when `error` says a shape cannot run incrementally (through DataFusion's
/// wrappers: context, shared, external).
pub fn unsupported_reason(error: &DataFusionError) -> Option<String> {
    match error {
        DataFusionError::External(inner) => inner
            .downcast_ref::<Unsupported>()
            .map(|u| u.0.clone())
            .or_else(|| {
                inner
                    .downcast_ref::<DataFusionError>()
                    .and_then(unsupported_reason)
            }),
        DataFusionError::Context(_, inner) => unsupported_reason(inner),
        DataFusionError::Shared(inner) => unsupported_reason(inner),
        _ => None,
    }
}

/// What went wrong in the engine, by kind.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model cannot run incrementally.
    #[error("{0}")]
    Unsupported(String),
    /// Planning or computing failed.
    #[error("{}", .0.message())]
    Plan(DataFusionError),
    #[error(transparent)]
    Log(#[from] crate::event_log::EventLogError),
    #[error(transparent)]
    Lakehouse(#[from] kappa_lakehouse::LakehouseError),
}

impl From<kappa_log::LogError> for EngineError {
    fn from(error: kappa_log::LogError) -> EngineError {
        EngineError::Log(error.into())
    }
}

impl From<DataFusionError> for EngineError {
    fn from(error: DataFusionError) -> EngineError {
        match unsupported_reason(&error) {
            Some(reason) => EngineError::Unsupported(reason),
            None => EngineError::Plan(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unsupported_shape_is_found_through_datafusions_wrappers() {
        let wrapped =
            unsupported("window functions are not incremental".into()).context("planning silver.x");
        assert_eq!(
            unsupported_reason(&wrapped).as_deref(),
            Some("window functions are not incremental")
        );
        assert!(matches!(
            EngineError::from(wrapped),
            EngineError::Unsupported(reason) if reason == "window functions are not incremental"
        ));
        // DataFusion's own "not implemented" is a planning error, not a shape of ours.
        let theirs = DataFusionError::NotImplemented("some SQL feature".into());
        assert!(unsupported_reason(&theirs).is_none());
        assert!(matches!(EngineError::from(theirs), EngineError::Plan(_)));
    }
}
