//! `GET /v1/models`: the project as a graph (topics, bronze tables, models and what each reads)
//! with what each model's last commit said of its expectations. The web UI draws its DAG from
//! it; `GET /v1/status` adds the moving parts (state, lag, rate).

use std::collections::BTreeMap;

use kappa_log::Log;
use kappa_pipeline::{Input, Project};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelsResponse {
    pub topics: Vec<TopicNode>,
    /// Every model, in the order they run (a model after those it reads).
    pub models: Vec<ModelNode>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicNode {
    pub name: String,
    pub partitions: u32,
    /// Records readers can see, over all partitions (0 when the topic does not exist yet).
    pub records: u64,
    /// The table keeping its records as they arrived.
    pub bronze: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelNode {
    /// `layer.name`.
    pub model: String,
    pub layer: String,
    pub name: String,
    /// As configured (`append`, `upsert`, `scd1`, `scd2`); absent: chosen from the SQL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub materialization: Option<kappa_pipeline::Materialization>,
    pub version: String,
    /// What it reads: `{"kind": "topic" | "model", "name": …}`.
    pub inputs: Vec<InputRef>,
    pub sql: String,
    pub expectations: Vec<ExpectationNode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRef {
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExpectationNode {
    pub name: String,
    pub kind: String,
    pub severity: String,
    /// Rows of the table's newest commit that failed it, for the checks counted row by row
    /// (`not_null`, `accepted_values`, `range`, `row`); absent for the table-wide ones, which the
    /// audit branch runs (`GET /v1/models/{model}/audit` runs them all now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_in_last_commit: Option<u64>,
}

/// The graph of `project` with each model's newest-commit expectation counts.
pub async fn models(
    log: &Log,
    lakehouse: &kappa_lakehouse::Lakehouse,
    project: &Project,
) -> ModelsResponse {
    let topics = project
        .topics
        .values()
        .map(|spec| TopicNode {
            name: spec.name.clone(),
            partitions: spec.partitions,
            records: log.topic(&spec.name).map_or(0, |topic| {
                topic
                    .partitions()
                    .iter()
                    .map(|p| {
                        let o = p.offsets();
                        o.visible_offset.saturating_sub(o.start_offset)
                    })
                    .sum()
            }),
            bronze: format!("{}.{}", kappa_engine::bronze::BRONZE_LAYER, spec.name),
        })
        .collect();
    let mut models = Vec::new();
    // Every model's version at once: each hashes the versions of what it reads.
    let versions = kappa_pipeline::deploy::versions(project);
    for id in &project.order {
        let Some(model) = project.models.get(id) else {
            continue;
        };
        let version = versions.get(id).cloned().unwrap_or_default();
        let counted = last_commit_failures(lakehouse, model, &version).await;
        models.push(ModelNode {
            model: id.clone(),
            layer: model.layer.clone(),
            name: model.name.clone(),
            materialization: model.config.materialization,
            version,
            inputs: model
                .inputs
                .iter()
                .map(|input| match input {
                    Input::Topic(t) => InputRef {
                        kind: "topic".into(),
                        name: t.clone(),
                    },
                    Input::Model(m) => InputRef {
                        kind: "model".into(),
                        name: m.clone(),
                    },
                })
                .collect(),
            sql: model.sql.clone(),
            expectations: model
                .config
                .expectations
                .iter()
                .map(|e| ExpectationNode {
                    name: e.name.clone(),
                    kind: e.check.kind().to_owned(),
                    severity: e.severity.as_str().to_owned(),
                    failing_in_last_commit: e
                        .check
                        .is_row_level()
                        .then(|| {
                            counted
                                .as_ref()
                                .map(|c| c.get(&e.name).copied().unwrap_or(0))
                        })
                        .flatten(),
                })
                .collect(),
        });
    }
    ModelsResponse { topics, models }
}

/// The failing-row counts `model`'s newest commit recorded; absent without a commit.
async fn last_commit_failures(
    lakehouse: &kappa_lakehouse::Lakehouse,
    model: &kappa_pipeline::Model,
    version: &str,
) -> Option<BTreeMap<String, u64>> {
    let ident =
        kappa_engine::runner::written_table(lakehouse, &model.layer, &model.name, version).ok()?;
    let table = lakehouse.load_table(&ident).await.ok()?;
    let head = kappa_lakehouse::wap::head(&table)?;
    Some(
        head.summary()
            .additional_properties
            .get(kappa_engine::runner::EXPECTATIONS_PROPERTY)
            .and_then(|c| serde_json::from_str(c).ok())
            .unwrap_or_default(),
    )
}
