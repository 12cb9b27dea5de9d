//! kappa's stream processor (being built): plans each model with DataFusion against the schemas
//! of the topics and models it reads.

pub mod aggregate;
pub mod bronze;
pub mod check;
pub mod commit_audit;
pub mod commit_record;
pub mod decode;
pub mod dedup;
pub mod deltas;
pub mod dimension;
pub mod expect;
pub mod functions;
pub mod grouped;
pub mod mask;
pub mod metrics;
pub mod plan;
pub mod runner;
pub mod scd;
pub mod schema;
mod source;
pub mod stateless;
pub mod stream_join;
mod topic_source;
pub mod upstream;
pub mod watermark;
pub mod windowed;

/// The JSON value a snapshot summary (`properties`) holds under `key`, or the default when
/// there is no snapshot or no such key; a value that does not parse is an error naming `key`.
pub(crate) fn summary_json<T: serde::de::DeserializeOwned + Default>(
    properties: Option<&std::collections::HashMap<String, String>>,
    key: &str,
) -> Result<T, kappa_lakehouse::LakehouseError> {
    properties
        .and_then(|p| p.get(key))
        .map(|v| serde_json::from_str(v))
        .transpose()
        .map_err(|e| kappa_lakehouse::LakehouseError::Query(format!("{key}: {e}")))
        .map(Option::unwrap_or_default)
}
