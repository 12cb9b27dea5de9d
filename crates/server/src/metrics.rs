//! `GET /metrics`: the server's state in Prometheus' text format — ingest, the log, every
//! model's and bronze table's lag and progress, dead letters, replays, commits and queries.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kappa_engine::metrics::Histogram;

use crate::AppState;

/// Counters the request handlers keep.
#[derive(Debug, Default)]
pub struct Metrics {
    pub ingest_records: AtomicU64,
    pub ingest_bytes: AtomicU64,
    pub queries: AtomicU64,
    pub query_errors: AtomicU64,
    pub query_seconds: Histogram,
    /// Queries over the Postgres endpoint.
    pub pg: Arc<PgMetrics>,
}

/// What the Postgres endpoint counts.
#[derive(Debug, Default)]
pub struct PgMetrics {
    pub queries: AtomicU64,
    /// Failed, timed out, cancelled or over their memory.
    pub errors: AtomicU64,
    /// From the query's arrival to its last row.
    pub seconds: Histogram,
}

/// A label value, escaped as the text format wants.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family: `# HELP`, `# TYPE` and a sample per (labels, value), labels as
/// `(name, value)` pairs.
fn family<'a, V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, V)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
            .collect();
        match labels.is_empty() {
            true => {
                let _ = writeln!(out, "{name} {value}");
            }
            false => {
                let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
            }
        }
    }
}

/// The whole exposition.
pub async fn render(state: &AppState) -> String {
    let mut out = String::new();
    let m = &state.metrics;
    let counter = |c: &AtomicU64| [(Vec::new(), c.load(Ordering::Relaxed))];
    family(
        &mut out,
        "kappa_ingest_records_total",
        "counter",
        "Records appended over HTTP.",
        counter(&m.ingest_records),
    );
    family(
        &mut out,
        "kappa_ingest_bytes_total",
        "counter",
        "Request bytes of appended records.",
        counter(&m.ingest_bytes),
    );

    let topics = crate::service::topics(&state.log);
    family(
        &mut out,
        "kappa_log_size_bytes",
        "gauge",
        "Bytes the log keeps, per topic.",
        topics.iter().map(|t| {
            let bytes: u64 = t.partitions.iter().map(|p| p.size_bytes).sum();
            (vec![("topic", t.name.as_str())], bytes)
        }),
    );
    family(
        &mut out,
        "kappa_log_records",
        "gauge",
        "Records the log keeps, per topic.",
        topics
            .iter()
            .map(|t| (vec![("topic", t.name.as_str())], t.record_count())),
    );

    let project = state.deployer.as_ref().and_then(|d| d.live_project());
    let runners = state.deployer.as_ref().and_then(|d| d.states());
    if let Ok(mut status) = crate::service::status(
        &state.log,
        &state.lakehouse,
        project.as_deref(),
        runners.as_ref(),
        &state.dead_letters,
    )
    .await
    {
        if let (Some(deployer), Some(project)) = (&state.deployer, &project) {
            status.bronze = crate::service::bronze_status(
                &state.log,
                &state.lakehouse,
                project,
                Some(&deployer.bronze_states()),
            )
            .await;
        }
        let all: Vec<_> = status.models.iter().chain(&status.bronze).collect();
        family(
            &mut out,
            "kappa_model_lag_records",
            "gauge",
            "Records of a model's inputs its table's last commit does not cover.",
            all.iter()
                .map(|s| (vec![("model", s.model.as_str())], s.lag_records)),
        );
        family(
            &mut out,
            "kappa_model_lag_seconds",
            "gauge",
            "How far behind in time a model is: 0 when nothing lags, else its last commit's age.",
            all.iter()
                .filter_map(|s| Some((vec![("model", s.model.as_str())], s.lag_seconds?))),
        );
        family(
            &mut out,
            "kappa_model_records_per_second",
            "gauge",
            "Input records per second a model committed over the last 10 s.",
            all.iter()
                .filter_map(|s| Some((vec![("model", s.model.as_str())], s.records_per_second?))),
        );
        family(
            &mut out,
            "kappa_model_rows",
            "gauge",
            "Rows in a model's published table.",
            all.iter()
                .filter_map(|s| Some((vec![("model", s.model.as_str())], s.rows?))),
        );
        family(
            &mut out,
            "kappa_model_up",
            "gauge",
            "1 while a model's runner runs; its state as a label.",
            all.iter().map(|s| {
                (
                    vec![("model", s.model.as_str()), ("state", s.state.as_str())],
                    u8::from(s.state == "running"),
                )
            }),
        );
        family(
            &mut out,
            "kappa_model_last_commit_seconds",
            "gauge",
            "When a model's table was last committed (seconds since the epoch).",
            all.iter().filter_map(|s| {
                let at = humantime::parse_rfc3339(s.last_commit.as_deref()?).ok()?;
                let seconds = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64();
                Some((vec![("model", s.model.as_str())], seconds))
            }),
        );
        family(
            &mut out,
            "kappa_dead_letters",
            "gauge",
            "Records a model sent to the dead-letter topic, per input topic.",
            status.dead_letters.iter().map(|d| {
                (
                    vec![("model", d.model.as_str()), ("topic", d.topic.as_str())],
                    d.count,
                )
            }),
        );
        let quarantined = all.iter().filter(|s| s.state == "quarantined").count();
        family(
            &mut out,
            "kappa_models_quarantined",
            "gauge",
            "Models whose last commit failed its audit.",
            [(Vec::new(), quarantined)],
        );
    }

    if let Some(deployer) = &state.deployer {
        let progress = deployer.progress().await;
        family(
            &mut out,
            "kappa_replay_records_done",
            "gauge",
            "Input records a replaying version has committed.",
            progress
                .models
                .iter()
                .map(|r| (replaying(r), r.records_done)),
        );
        family(
            &mut out,
            "kappa_replay_records_total",
            "gauge",
            "Input records a replaying version has to read.",
            progress
                .models
                .iter()
                .map(|r| (replaying(r), r.records_total)),
        );
    }

    let committed = kappa_engine::metrics::THROUGHPUT.totals();
    family(
        &mut out,
        "kappa_model_records_total",
        "counter",
        "Input records a model's version (or a bronze table) committed since the server started.",
        committed.iter().map(|(model, version, n)| {
            (
                vec![("model", model.as_str()), ("version", version.as_str())],
                *n,
            )
        }),
    );
    let failed = kappa_engine::metrics::EXPECTATION_FAILURES.totals();
    family(
        &mut out,
        "kappa_expectation_failed_rows_total",
        "counter",
        "Rows of landed commits that failed a row-level expectation, since the server started.",
        failed.iter().map(|(model, expectation, n)| {
            (
                vec![
                    ("model", model.as_str()),
                    ("expectation", expectation.as_str()),
                ],
                *n,
            )
        }),
    );
    kappa_engine::metrics::COMMIT_SECONDS.render(
        "kappa_commit_seconds",
        "How long commits to the Iceberg tables take.",
        &mut out,
    );
    family(
        &mut out,
        "kappa_queries_total",
        "counter",
        "SQL queries answered over HTTP.",
        counter(&m.queries),
    );
    family(
        &mut out,
        "kappa_query_errors_total",
        "counter",
        "SQL queries over HTTP that failed.",
        counter(&m.query_errors),
    );
    m.query_seconds.render(
        "kappa_query_seconds",
        "How long SQL queries over HTTP take.",
        &mut out,
    );
    family(
        &mut out,
        "kappa_pg_queries_total",
        "counter",
        "Queries over the Postgres endpoint (a query string, or one execution of a prepared statement).",
        counter(&m.pg.queries),
    );
    family(
        &mut out,
        "kappa_pg_query_errors_total",
        "counter",
        "Queries over the Postgres endpoint that failed, timed out, ran out of memory or were cancelled.",
        counter(&m.pg.errors),
    );
    m.pg.seconds.render(
        "kappa_pg_query_seconds",
        "How long queries over the Postgres endpoint take, to their last row.",
        &mut out,
    );
    out
}

/// The labels of a replaying version.
fn replaying(r: &crate::deployer::ReplayProgress) -> Vec<(&str, &str)> {
    vec![("model", r.model.as_str()), ("version", r.version.as_str())]
}
