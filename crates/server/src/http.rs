//! The HTTP API (documented in `docs/http-api.md`).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use kappa_log::{LogError, StartAt};
use serde::Deserialize;

use crate::api::{CreateTopic, ErrorBody, ErrorDetail, Health};
use crate::service::{self, ReadRequest, ServiceError};
use crate::{AppState, config};

/// The header that tells a reader where to continue.
pub const NEXT_OFFSET_HEADER: &str = "kappa-next-offset";

pub(crate) fn router(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/", get(crate::ui::index))
        .route("/ui/app.js", get(crate::ui::script))
        .route("/ui/app.css", get(crate::ui::style))
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/sql", post(sql))
        .route("/v1/status", get(status))
        .route("/v1/deployment", get(deployment))
        .route("/v1/deployments", get(deployments))
        .route("/v1/deploy", get(deploy_progress).post(deploy))
        .route("/v1/rollback", post(rollback))
        .route("/v1/topics", get(list_topics).post(create_topic))
        .route("/v1/topics/{topic}", get(describe_topic))
        .route("/v1/topics/{topic}/records", post(produce))
        .route(
            "/v1/topics/{topic}/partitions/{partition}/records",
            get(read_records),
        )
        .route(
            "/v1/topics/{topic}/partitions/{partition}/offsets",
            get(partition_offsets),
        )
        .route("/v1/alerts", get(alerts))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}/audit", get(audit))
        .route("/v1/models/{model}/publish", post(publish))
        .route("/v1/models/{model}/discard", post(discard))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// An error as the API returns it: a status and a JSON body naming what went wrong.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: String) -> ApiError {
        ApiError {
            status,
            detail: ErrorDetail {
                code: code.into(),
                message,
                line: None,
                byte_offset: None,
                reason: None,
                topics: None,
            },
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        let message = e.to_string();
        match e {
            ServiceError::Log(e) => {
                let (status, code) = match &e {
                    LogError::UnknownTopic { .. } => (StatusCode::NOT_FOUND, "unknown_topic"),
                    LogError::UnknownPartition { .. } => {
                        (StatusCode::NOT_FOUND, "unknown_partition")
                    }
                    LogError::TopicExists { .. } => (StatusCode::CONFLICT, "topic_exists"),
                    LogError::InvalidTopicName { .. } => {
                        (StatusCode::BAD_REQUEST, "invalid_topic_name")
                    }
                    LogError::InvalidConfig { .. } => (StatusCode::BAD_REQUEST, "invalid_config"),
                    LogError::AppendTooLarge { .. } => {
                        (StatusCode::BAD_REQUEST, "append_too_large")
                    }
                    LogError::RecordTooLarge { .. } => {
                        (StatusCode::BAD_REQUEST, "record_too_large")
                    }
                    LogError::TooManyHeaders { .. } => {
                        (StatusCode::BAD_REQUEST, "too_many_headers")
                    }
                    LogError::OffsetOutOfRange { .. } => {
                        (StatusCode::BAD_REQUEST, "offset_out_of_range")
                    }
                    LogError::WriterFailed { .. } | LogError::Closed => {
                        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
                    }
                    _ => (StatusCode::INTERNAL_SERVER_ERROR, "storage_error"),
                };
                if status.is_server_error() {
                    tracing::error!(error = %e, "request failed");
                }
                let mut error = ApiError::new(status, code, message);
                if let LogError::UnknownTopic { known, .. } = e {
                    error.detail.topics = Some(known);
                }
                error
            }
            ServiceError::Ingest(e) => {
                let mut error = ApiError::new(StatusCode::BAD_REQUEST, "malformed_record", message);
                error.detail.line = Some(e.line);
                error.detail.byte_offset = Some(e.byte_offset);
                error.detail.reason = Some(e.reason);
                error
            }
            ServiceError::BodyTooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", message)
            }
            ServiceError::BadRequest(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
            }
            ServiceError::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
            ServiceError::Internal(_) => {
                tracing::error!(error = %message, "request failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
            }
        }
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> ApiError {
        ServiceError::Log(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: self.detail })).into_response()
    }
}

/// Turns axum's own rejections (a bad path segment, query or body) into the API's error shape.
fn rejected(status: StatusCode, text: String) -> ApiError {
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "body_too_large"
    } else {
        "bad_request"
    };
    ApiError::new(status, code, text)
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> ApiError {
        rejected(r.status(), r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> ApiError {
        rejected(r.status(), r.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> ApiError {
        rejected(r.status(), r.body_text())
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method; see docs/http-api.md".into(),
    )
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see docs/http-api.md".into(),
    )
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Health> {
    Json(state.health())
}

async fn status(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let mut status = service::status(
        &state.log,
        &state.lakehouse,
        state
            .deployer
            .as_ref()
            .and_then(|d| d.live_project())
            .as_deref(),
        state.deployer.as_ref().and_then(|d| d.states()).as_ref(),
        &state.dead_letters,
    )
    .await?;
    status.versions = match &state.deployer {
        Some(deployer) => deployer.versions().await,
        None => crate::deployer::recorded_versions(&state.data_dir),
    };
    if let Some(deployer) = &state.deployer
        && let Some(project) = deployer.live_project()
    {
        status.bronze = service::bronze_status(
            &state.log,
            &state.lakehouse,
            &project,
            Some(&deployer.bronze_states()),
        )
        .await;
    }
    status.alerts = state.alerts.recent();
    Ok(Json(status).into_response())
}

/// What is deployed: the deployment recorded in the data directory (empty when none is).
async fn deployment(
    State(state): State<Arc<AppState>>,
) -> Result<Json<kappa_pipeline::deploy::Deployment>, ApiError> {
    Ok(Json(recorded_deployment(&state).map_err(storage_error)?))
}

/// What the data directory records as deployed (empty before the first deploy).
fn recorded_deployment(state: &AppState) -> anyhow::Result<kappa_pipeline::deploy::Deployment> {
    Ok(crate::deployment::load(&state.data_dir)?.unwrap_or_default())
}

/// A failure to read the data directory, as the API answers it.
fn storage_error(e: anyhow::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "storage_error",
        format!("{e:#}"),
    )
}

/// `GET /v1/deployments`: what serves, what it replaced (kept for rollback), the deploy in
/// progress and every version known.
async fn deployments(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let recorded = recorded_deployment(&state).map_err(storage_error)?;
    let summary = |role: &str, d: &kappa_pipeline::deploy::Deployment| {
        serde_json::json!({
            "role": role,
            "models": d.models.iter().map(|(m, v)| (m.clone(), v.version.clone()))
                .collect::<std::collections::BTreeMap<_, _>>(),
            "retired_at_ms": d.retired_at_ms,
        })
    };
    let mut deployments = vec![summary("serving", &recorded)];
    if let Some(previous) = &recorded.previous {
        deployments.push(summary("previous", previous));
    }
    let (progress, versions) = match &state.deployer {
        Some(deployer) => (deployer.progress().await, deployer.versions().await),
        None => (
            crate::deployer::DeployProgress::idle(),
            crate::deployer::recorded_versions(&state.data_dir),
        ),
    };
    Ok(Json(serde_json::json!({
        "deployments": deployments,
        "deploying": progress,
        "versions": versions,
    }))
    .into_response())
}

/// Deploys the project folder `kappa up` runs from: `{"replaying": [models]}` (empty when the
/// folder went live at once).
async fn deploy(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let (Some(deployer), Some(dir)) = (&state.deployer, &state.config.project_dir) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_project",
            "this kappa up runs no project folder (start it in one, or with --project DIR)".into(),
        ));
    };
    let internal = |e: anyhow::Error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{e:#}"),
        )
    };
    let files = crate::project::read_files(dir).map_err(internal)?;
    let project = match crate::project::check_files(&files).await {
        Ok(project) => Arc::new(project),
        Err(diagnostics) => {
            let lines: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "project_problems",
                format!(
                    "the project in {} has problems:\n{}",
                    dir.display(),
                    lines.join("\n")
                ),
            ));
        }
    };
    crate::pipelines::ensure_topics(deployer.log(), &project)
        .await
        .map_err(internal)?;
    let replaying = deployer.deploy(project, files).await.map_err(internal)?;
    Ok(Json(serde_json::json!({ "replaying": replaying })).into_response())
}

/// Rolls one model back to the previous deployment's version: `{"model": "gold.x"}` in,
/// `{"replaying": [models]}` out, as a deploy.
async fn rollback(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    #[derive(Deserialize)]
    struct Rollback {
        model: String,
    }
    let request: Rollback = serde_json::from_slice(&body?).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("expected {{\"model\": \"layer.name\"}}: {e}"),
        )
    })?;
    let Some(deployer) = &state.deployer else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_project",
            "this kappa up runs no project folder".into(),
        ));
    };
    let replaying = deployer
        .rollback(&request.model, state.config.project_dir.as_deref())
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "cannot_roll_back",
                format!("{e:#}"),
            )
        })?;
    Ok(Json(serde_json::json!({ "replaying": replaying })).into_response())
}

/// The deploy in progress (`{"state": "idle"}` when none is).
async fn deploy_progress(
    State(state): State<Arc<AppState>>,
) -> Json<crate::deployer::DeployProgress> {
    Json(match &state.deployer {
        Some(deployer) => deployer.progress().await,
        None => crate::deployer::DeployProgress::idle(),
    })
}

async fn alerts(State(state): State<Arc<AppState>>) -> Response {
    Json(serde_json::json!({ "alerts": state.alerts.recent() })).into_response()
}

/// The project the server runs, if it runs one.
fn running_project(state: &AppState) -> Option<Arc<kappa_pipeline::Project>> {
    state.deployer.as_ref().and_then(|d| d.live_project())
}

/// What a request about the project answers when the server runs none.
fn no_project() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "no_project",
        "this kappa up runs no project folder".into(),
    )
}

async fn models(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let project = running_project(&state).ok_or_else(no_project)?;
    Ok(Json(crate::models::models(&state.log, &state.lakehouse, &project).await).into_response())
}

async fn audit(
    State(state): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(model) = path?;
    let project = running_project(&state).ok_or_else(no_project)?;
    Ok(Json(crate::quality::audit(&state.lakehouse, &project, &model).await?).into_response())
}

async fn publish(
    State(state): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    decide(state, path, crate::quality::Decision::Publish).await
}

async fn discard(
    State(state): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    decide(state, path, crate::quality::Decision::Discard).await
}

async fn decide(
    state: Arc<AppState>,
    path: Result<Path<String>, PathRejection>,
    decision: crate::quality::Decision,
) -> Result<Response, ApiError> {
    let Path(model) = path?;
    let project = running_project(&state).ok_or_else(no_project)?;
    let decided = crate::quality::decide(&state.lakehouse, &project, &model, decision).await?;
    Ok(Json(decided).into_response())
}

/// The media type of an Arrow IPC stream, which `POST /v1/sql` answers in when asked.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

async fn sql(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrow = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with(ARROW_STREAM)));
    let request: crate::api::SqlRequest = serde_json::from_slice(&body?).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("invalid SQL request: {e}"),
        )
    })?;
    let started = std::time::Instant::now();
    let answer = if arrow {
        service::sql_arrow(
            &state.lakehouse,
            &request.sql,
            Some(state.config.query_limits),
        )
        .await
        .map(|bytes| ([(header::CONTENT_TYPE, ARROW_STREAM)], bytes).into_response())
    } else {
        service::sql(
            &state.lakehouse,
            &request.sql,
            Some(state.config.query_limits),
        )
        .await
        .map(|rows| Json(rows).into_response())
    };
    state.metrics.query_seconds.observe(started.elapsed());
    state
        .metrics
        .queries
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if answer.is_err() {
        state
            .metrics
            .query_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(answer?)
}

/// `GET /metrics`: Prometheus' text format.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&state).await,
    )
        .into_response()
}

async fn list_topics(State(state): State<Arc<AppState>>) -> Response {
    Json(serde_json::json!({ "topics": service::topics(&state.log) })).into_response()
}

async fn describe_topic(
    State(state): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(topic) = path?;
    Ok(Json(service::topic(&state.log, &topic)?).into_response())
}

async fn create_topic(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let request: CreateTopic = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("invalid topic request: {e}"),
        )
    })?;
    let info = service::create_topic(&state.log, request).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProduceQuery {
    /// JSON field whose value is the record key.
    key: Option<String>,
}

async fn produce(
    State(state): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ProduceQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (Path(topic), Query(query)) = (path?, query?);
    // An unknown topic is reported before the body is read.
    state.log.topic(&topic)?;
    let max = state.config.max_request_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(bytes) = declared
        && bytes > max as u64
    {
        return Err(ServiceError::BodyTooLarge { bytes, max }.into());
    }
    // Bodies in memory are bounded: a request takes its size (or the limit, when it does not
    // say) from a shared budget before reading, and waits a while for room.
    let budget_kib = config::INGEST_BYTES_IN_FLIGHT_MAX / 1024;
    let kib = declared
        .map_or(max as u64, |b| b.min(max as u64))
        .div_ceil(1024)
        .clamp(1, budget_kib as u64) as u32;
    let wait = Duration::from_millis(config::INGEST_WAIT_MS);
    let _permit =
        match tokio::time::timeout(wait, state.ingest_budget.clone().acquire_many_owned(kib)).await
        {
            Ok(Ok(permit)) => permit,
            _ => {
                let message = "too many request bodies in flight; retry in a moment".to_owned();
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    message,
                ));
            }
        };
    let timeout = Duration::from_millis(state.config.body_read_timeout_ms);
    let body = match tokio::time::timeout(timeout, Limited::new(body, max).collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(ServiceError::BodyTooLarge {
                bytes: max as u64 + 1,
                max,
            }
            .into());
        }
        Ok(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("reading the body: {e}"),
            ));
        }
        Err(_) => {
            let message = format!(
                "the request body did not arrive within {} ms",
                timeout.as_millis()
            );
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                message,
            ));
        }
    };
    let bytes = body.len() as u64;
    // Without `?key=`, records are keyed as the running project declares the topic's key.
    let declared = running_project(&state).and_then(|p| p.topics.get(&topic)?.key.clone());
    let response = service::produce(&state.events, &topic, body, query.key, declared).await?;
    state
        .metrics
        .ingest_records
        .fetch_add(response.records, std::sync::atomic::Ordering::Relaxed);
    state
        .metrics
        .ingest_bytes
        .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    Ok(Json(response).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadQuery {
    /// Start at this offset; without it, `from` decides.
    offset: Option<u64>,
    /// `beginning` (default) or `end`.
    from: Option<String>,
    /// Start at the first record at or after this time (ms since the epoch).
    timestamp_ms: Option<i64>,
    max_records: Option<usize>,
    max_bytes: Option<usize>,
    wait_ms: Option<u64>,
}

async fn read_records(
    State(state): State<Arc<AppState>>,
    path: Result<Path<(String, u32)>, PathRejection>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (Path((topic, partition)), Query(query)) = (path?, query?);
    let start = match (query.offset, query.timestamp_ms, query.from.as_deref()) {
        (Some(offset), None, None) => StartAt::Offset(offset),
        (None, Some(ts), None) => StartAt::Timestamp(ts),
        (None, None, None | Some("beginning")) => StartAt::Beginning,
        (None, None, Some("end")) => StartAt::End,
        (None, None, Some(other)) => {
            let message = format!("`from` must be `beginning` or `end`, not `{other}`");
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                message,
            ));
        }
        _ => {
            let message = "give at most one of `offset`, `timestamp_ms` and `from`".to_owned();
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                message,
            ));
        }
    };
    let request = ReadRequest {
        partition,
        start,
        max_records: query.max_records.unwrap_or(1000),
        max_bytes: query.max_bytes.unwrap_or(1 << 20),
        wait_ms: query.wait_ms.unwrap_or(0),
    };
    let result =
        service::read(&state.events, &topic, request, Some(state.shutdown.clone())).await?;
    let mut body = Vec::with_capacity(result.records.len() * 200);
    for record in &result.records {
        serde_json::to_writer(&mut body, &record.to_envelope()).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
        body.push(b'\n');
    }
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert(NEXT_OFFSET_HEADER, HeaderValue::from(result.next_offset));
    Ok(response)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OffsetsQuery {
    timestamp_ms: Option<i64>,
}

async fn partition_offsets(
    State(state): State<Arc<AppState>>,
    path: Result<Path<(String, u32)>, PathRejection>,
    query: Result<Query<OffsetsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (Path((topic, partition)), Query(query)) = (path?, query?);
    let log = state.events.clone();
    let response = tokio::task::spawn_blocking(move || {
        service::offsets(&log, &topic, partition, query.timestamp_ms)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    Ok(Json(response).into_response())
}
