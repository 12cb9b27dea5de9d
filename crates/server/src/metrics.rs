//! `GET /metrics`: the server's state in Prometheus' text format — ingest, the log, every
//! model's and bronze table's lag and progress, dead letters, replays, commits and queries.

use std::fmt::Write;
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
}

/// A label value, escaped as the text format wants.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes `# HELP` and `# TYPE` for a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The whole exposition.
pub async fn render(state: &AppState) -> String {
    let mut out = String::new();
    let m = &state.metrics;
    family(
        &mut out,
        "kappa_ingest_records_total",
        "counter",
        "Records appended over HTTP.",
    );
    let _ = writeln!(
        out,
        "kappa_ingest_records_total {}",
        m.ingest_records.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "kappa_ingest_bytes_total",
        "counter",
        "Request bytes of appended records.",
    );
    let _ = writeln!(
        out,
        "kappa_ingest_bytes_total {}",
        m.ingest_bytes.load(Ordering::Relaxed)
    );

    let topics = crate::service::topics(&state.log);
    family(
        &mut out,
        "kappa_log_size_bytes",
        "gauge",
        "Bytes the log keeps, per topic.",
    );
    for t in &topics {
        let bytes: u64 = t.partitions.iter().map(|p| p.size_bytes).sum();
        let _ = writeln!(
            out,
            "kappa_log_size_bytes{{topic=\"{}\"}} {bytes}",
            label(&t.name)
        );
    }
    family(
        &mut out,
        "kappa_log_records",
        "gauge",
        "Records the log keeps, per topic.",
    );
    for t in &topics {
        let _ = writeln!(
            out,
            "kappa_log_records{{topic=\"{}\"}} {}",
            label(&t.name),
            t.record_count()
        );
    }

    let project = state.deployer.as_ref().and_then(|d| d.live_project());
    let runners = state.deployer.as_ref().and_then(|d| d.states());
    if let Ok(mut status) = crate::service::status(
        &state.log,
        &state.lakehouse,
        project.as_deref(),
        runners.as_ref(),
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
        );
        for s in &all {
            let _ = writeln!(
                out,
                "kappa_model_lag_records{{model=\"{}\"}} {}",
                label(&s.model),
                s.lag_records
            );
        }
        family(
            &mut out,
            "kappa_model_rows",
            "gauge",
            "Rows in a model's published table.",
        );
        for s in &all {
            if let Some(rows) = s.rows {
                let _ = writeln!(
                    out,
                    "kappa_model_rows{{model=\"{}\"}} {rows}",
                    label(&s.model)
                );
            }
        }
        family(
            &mut out,
            "kappa_model_up",
            "gauge",
            "1 while a model's runner runs; its state as a label.",
        );
        for s in &all {
            let up = u8::from(s.state == "running");
            let _ = writeln!(
                out,
                "kappa_model_up{{model=\"{}\",state=\"{}\"}} {up}",
                label(&s.model),
                label(&s.state)
            );
        }
        family(
            &mut out,
            "kappa_model_last_commit_seconds",
            "gauge",
            "When a model's table was last committed (seconds since the epoch).",
        );
        for s in &all {
            if let Some(at) = s
                .last_commit
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
            {
                let secs = at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                let _ = writeln!(
                    out,
                    "kappa_model_last_commit_seconds{{model=\"{}\"}} {secs}",
                    label(&s.model)
                );
            }
        }
        family(
            &mut out,
            "kappa_dead_letters",
            "gauge",
            "Records a model sent to the dead-letter topic, per input topic.",
        );
        for d in &status.dead_letters {
            let _ = writeln!(
                out,
                "kappa_dead_letters{{model=\"{}\",topic=\"{}\"}} {}",
                label(&d.model),
                label(&d.topic),
                d.count
            );
        }
        family(
            &mut out,
            "kappa_models_quarantined",
            "gauge",
            "Models whose last commit failed its audit.",
        );
        let quarantined = all.iter().filter(|s| s.state == "quarantined").count();
        let _ = writeln!(out, "kappa_models_quarantined {quarantined}");
    }

    if let Some(deployer) = &state.deployer {
        let progress = deployer.progress().await;
        family(
            &mut out,
            "kappa_replay_records_done",
            "gauge",
            "Input records a replaying version has committed.",
        );
        for r in &progress.models {
            let _ = writeln!(
                out,
                "kappa_replay_records_done{{model=\"{}\",version=\"{}\"}} {}",
                label(&r.model),
                label(&r.version),
                r.records_done
            );
        }
        family(
            &mut out,
            "kappa_replay_records_total",
            "gauge",
            "Input records a replaying version has to read.",
        );
        for r in &progress.models {
            let _ = writeln!(
                out,
                "kappa_replay_records_total{{model=\"{}\",version=\"{}\"}} {}",
                label(&r.model),
                label(&r.version),
                r.records_total
            );
        }
    }

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
    );
    let _ = writeln!(
        out,
        "kappa_queries_total {}",
        m.queries.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "kappa_query_errors_total",
        "counter",
        "SQL queries over HTTP that failed.",
    );
    let _ = writeln!(
        out,
        "kappa_query_errors_total {}",
        m.query_errors.load(Ordering::Relaxed)
    );
    m.query_seconds.render(
        "kappa_query_seconds",
        "How long SQL queries over HTTP take.",
        &mut out,
    );
    out
}
