//! The audit of a model's table and the decisions about commits that failed it (Write-Audit-
//! Publish): what `kappa audit`, `kappa publish --force` and `kappa discard` do, through the
//! server or on the data directory.

use kappa_engine::runner::{DEAD_LETTERS_PROPERTY, OFFSETS_PROPERTY, VERSION_PROPERTY, live_table};
use kappa_pipeline::Project;
use serde::{Deserialize, Serialize};

use crate::service::ServiceError;

/// How many failing rows `kappa audit` shows per expectation.
pub const SAMPLE_ROWS: usize = 5;

/// What a discard takes from the discarded head: the writer's position (the records it read
/// are not read again), not its rows or its operator state.
const POSITION: &[&str] = &[
    OFFSETS_PROPERTY,
    kappa_engine::watermark::WATERMARKS_PROPERTY,
    DEAD_LETTERS_PROPERTY,
    VERSION_PROPERTY,
];

/// What a discard does not copy from main's last commit: what only that commit did (its
/// expectation counts, the rows it set aside — delivered already).
const FORGET: &[&str] = &[
    kappa_engine::runner::EXPECTATIONS_PROPERTY,
    kappa_engine::runner::QUARANTINE_PROPERTY,
];

/// `GET /v1/models/{model}/audit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditResponse {
    pub model: String,
    /// The snapshot readers see (its id as a string: ids exceed what JSON numbers hold
    /// exactly in jq or JavaScript).
    #[serde(with = "crate::api::snapshot_id")]
    pub published: Option<i64>,
    /// The newest snapshot waiting for publication on the audit branch, if one waits.
    #[serde(with = "crate::api::snapshot_id")]
    pub waiting: Option<i64>,
    /// The rows the waiting commits write, failing or not: what a discard drops and a forced
    /// publish publishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_rows: Option<u64>,
    pub expectations: Vec<AuditedExpectation>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditedExpectation {
    pub name: String,
    pub kind: String,
    pub severity: String,
    /// `pass`, `warn`, `fail` or `error`.
    pub result: String,
    pub failing: u64,
    /// Some of what failed.
    pub sample: Option<crate::api::SqlResponse>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What to do with the commits waiting on a model's audit branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Readers get them although the audit failed.
    Publish,
    /// Their rows are dropped; the model carries on after the records they came from.
    Discard,
}

/// `POST /v1/models/{model}/publish` and `…/discard`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionResponse {
    pub model: String,
    pub decision: Decision,
    /// False when no commit waited.
    pub decided: bool,
    /// The snapshot readers see now (its id as a string).
    #[serde(with = "crate::api::snapshot_id")]
    pub published: Option<i64>,
}

fn model_of<'p>(
    project: &'p Project,
    model: &str,
) -> Result<&'p kappa_pipeline::Model, ServiceError> {
    project.models.get(model).ok_or_else(|| {
        ServiceError::BadRequest(format!(
            "no model `{model}`; the models are {}",
            project.order.join(", ")
        ))
    })
}

async fn live(
    lakehouse: &kappa_lakehouse::Lakehouse,
    project: &Project,
    model: &str,
) -> Result<kappa_lakehouse::Table, ServiceError> {
    let ident =
        live_table(lakehouse, project, model).map_err(|e| ServiceError::Internal(e.to_string()))?;
    lakehouse.load_table(&ident).await.map_err(|e| {
        ServiceError::BadRequest(format!("{model} has no table yet (is it deployed?): {e}"))
    })
}

/// Runs `model`'s expectations over its newest snapshot, with samples of what failed.
pub async fn audit(
    lakehouse: &kappa_lakehouse::Lakehouse,
    project: &Project,
    model: &str,
) -> Result<AuditResponse, ServiceError> {
    let spec = model_of(project, model)?;
    let table = live(lakehouse, project, model).await?;
    let audited = kappa_engine::expect::audit(lakehouse, spec, &table, None, false, SAMPLE_ROWS)
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    let mut expectations = Vec::new();
    for a in audited {
        let sample = match a.sample.first() {
            Some(first) => Some(
                crate::api::SqlResponse::from_batches(&first.schema(), &a.sample)
                    .map_err(ServiceError::Internal)?,
            ),
            None => None,
        };
        let result =
            kappa_engine::expect::result_of(a.expectation.severity, a.failing, a.error.is_some());
        expectations.push(AuditedExpectation {
            name: a.expectation.name.clone(),
            kind: a.expectation.check.kind().to_owned(),
            severity: a.expectation.severity.as_str().to_owned(),
            result: result.to_owned(),
            failing: a.failing,
            sample,
            error: a.error,
        });
    }
    let waiting = kappa_lakehouse::wap::unpublished(&table);
    let waiting_rows = match waiting {
        Some(head) => {
            let main = table
                .metadata()
                .current_snapshot()
                .map_or(0, |s| s.sequence_number());
            let added = lakehouse
                .added_in(&table, head, main)
                .await
                .map_err(|e| ServiceError::Internal(e.to_string()))?;
            Some(added.files.iter().map(|f| f.file.record_count()).sum())
        }
        None => None,
    };
    Ok(AuditResponse {
        model: model.to_owned(),
        published: table.metadata().current_snapshot_id(),
        waiting: waiting.map(|s| s.snapshot_id()),
        waiting_rows,
        expectations,
    })
}

/// Publishes or discards the commits waiting on `model`'s audit branch.
pub async fn decide(
    lakehouse: &kappa_lakehouse::Lakehouse,
    project: &Project,
    model: &str,
    decision: Decision,
) -> Result<DecisionResponse, ServiceError> {
    model_of(project, model)?;
    let table = live(lakehouse, project, model).await?;
    let decided = kappa_lakehouse::wap::unpublished(&table).is_some();
    let table = match decision {
        Decision::Publish => lakehouse.publish_audited(&table).await,
        Decision::Discard => lakehouse.discard(&table, POSITION, FORGET).await,
    }
    .map_err(|e| ServiceError::Internal(e.to_string()))?;
    tracing::info!(%model, ?decision, decided, "decided about the quarantined commits");
    Ok(DecisionResponse {
        model: model.to_owned(),
        decision,
        decided,
        published: table.metadata().current_snapshot_id(),
    })
}
