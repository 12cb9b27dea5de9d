//! Work that runs on an OS thread and tokio runtime of its own: SQL queries. DataFusion's
//! operators compute inside `poll` for long stretches, so queries sharing a runtime's threads
//! can hold them all while a short one — or the pipelines, or the HTTP API — waits; across
//! threads, the operating system shares the cores fairly. A query keeps its parallelism: the
//! runtime has a worker per core.

use std::sync::Arc;

/// Runs `task` to its end on a new thread (named `name`) with a runtime of its own.
pub(crate) fn spawn(
    name: &str,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let worker_name = format!("{name}-worker");
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name(worker_name)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(task),
                Err(e) => tracing::error!(error = %e, "starting a query runtime failed"),
            }
        })
        .map(drop)
}

/// `ctx` with a memory pool of its own of `memory_bytes` for the operators of what it runs
/// (joins, sorts, aggregations), without spilling: past it, a query stops with "Resources
/// exhausted" instead of filling the memory or the disk.
pub(crate) fn bounded(
    ctx: &datafusion::prelude::SessionContext,
    memory_bytes: usize,
) -> anyhow::Result<datafusion::prelude::SessionContext> {
    use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_limit(memory_bytes, 1.0)
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()
        .map_err(|e| anyhow::anyhow!("a query memory pool: {e}"))?;
    let state = datafusion::execution::SessionStateBuilder::new_from_existing(ctx.state())
        .with_runtime_env(runtime)
        .build();
    Ok(datafusion::prelude::SessionContext::new_with_state(state))
}

/// The result of a query: its schema (also of an empty result) and its batches.
pub(crate) type Answer = (arrow::datatypes::SchemaRef, Vec<arrow::array::RecordBatch>);

/// Runs `sql` over `ctx` on a thread of its own, within `limits`: the answer, or why not.
/// Given up (and stopped) when the caller stops waiting.
pub(crate) async fn query(
    ctx: datafusion::prelude::SessionContext,
    sql: String,
    limits: crate::config::QueryLimits,
) -> Result<Answer, QueryError> {
    let ctx =
        bounded(&ctx, limits.memory_bytes).map_err(|e| QueryError::Internal(e.to_string()))?;
    let (mut tx, rx) = tokio::sync::oneshot::channel();
    spawn("kappa-sql", async move {
        // A task of its own: one poll of DataFusion's streams can compute for seconds, and the
        // deadline must be answered meanwhile.
        let run = tokio::spawn(async move {
            // Read-only: no DDL, no DML (`COPY … TO` writes files), no `SET` of the engine's
            // settings (the memory pool is the server's).
            let options = datafusion::execution::context::SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false);
            let frame = ctx.sql_with_options(&sql, options).await?;
            let schema = Arc::new(frame.schema().as_arrow().clone());
            let batches = frame.collect().await?;
            Ok::<_, datafusion::error::DataFusionError>((schema, batches))
        });
        let stop = run.abort_handle();
        let answer = tokio::select! {
            answer = tokio::time::timeout(limits.timeout, run) => match answer {
                Ok(Ok(Ok(answer))) => Ok(answer),
                Ok(Ok(Err(e))) => Err(QueryError::Query(with_memory_hint(e.to_string(), &limits))),
                Ok(Err(e)) => Err(QueryError::Internal(format!("the query's task failed: {e}"))),
                Err(_) => Err(QueryError::Query(format!(
                    "the query ran longer than the server's per-query limit ({}, [server] \
                     query_timeout in kappa.toml) and was stopped",
                    humantime::format_duration(limits.timeout)
                ))),
            },
            // Nobody waits for it any more.
            () = tx.closed() => Err(QueryError::Internal("nobody waits for it".into())),
        };
        stop.abort();
        let _ = tx.send(answer);
    })
    .map_err(|e| QueryError::Internal(format!("start a query thread: {e}")))?;
    rx.await
        .map_err(|_| QueryError::Internal("the query thread ended without an answer".into()))?
}

/// Why a query has no answer.
#[derive(Debug)]
pub(crate) enum QueryError {
    /// The query's fault, or a limit it hit.
    Query(String),
    Internal(String),
}

/// `message`, told which limit it hit when it is DataFusion's "Resources exhausted".
pub(crate) fn with_memory_hint(message: String, limits: &crate::config::QueryLimits) -> String {
    if message.contains("Resources exhausted") {
        format!(
            "the query needs more memory than one query may use ({} MiB, [server] query_memory \
             in kappa.toml): {message}",
            limits.memory_bytes >> 20
        )
    } else {
        message
    }
}
