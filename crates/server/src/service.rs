//! What the API does, over a [`Log`]: used by the HTTP handlers and by client commands that
//! work on a data directory directly, so both behave the same.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kappa_engine::event_log::{EventLog, KafkaLog};
use kappa_log::{Log, LogError, StartAt};

use crate::api::{ConsumedRecord, OffsetsResponse, ProduceResponse, TopicInfo};
use crate::ingest::{IngestError, KeyFrom, parse_ndjson};

/// Most records one read returns.
pub const READ_RECORDS_MAX: usize = 100_000;
/// Most bytes of batches one read returns (a single larger batch is still returned whole).
pub const READ_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Longest a read waits for new records.
pub const READ_WAIT_MS_MAX: u64 = 30_000;
/// A read of a Kafka cluster polls in slices this long, so that a shutdown ends its wait.
const KAFKA_POLL_SLICE: Duration = Duration::from_millis(200);

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("request body of {bytes} bytes is over the limit of {max} bytes")]
    BodyTooLarge { bytes: u64, max: usize },
    #[error("{0}")]
    BadRequest(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The log cannot take or give records now (a Kafka cluster down or unreachable): try
    /// again later.
    #[error("{0}")]
    Unavailable(String),
}

/// Parses an NDJSON body and appends it; all or nothing on parse errors. Records are keyed by
/// the field `named` (every record must have it), else by the topic's `declared` key. Returns
/// once the log holds every record (on a Kafka cluster: acknowledged by all in-sync replicas).
pub async fn produce(
    log: &EventLog,
    topic: &str,
    body: Bytes,
    named: Option<String>,
    declared: Option<String>,
) -> Result<ProduceResponse, ServiceError> {
    let parse = move || parse_ndjson(&body, KeyFrom::of(named.as_deref(), declared.as_deref()));
    let offsets = match log {
        EventLog::Embedded(log) => {
            let topic = log.topic(topic)?;
            let records = tokio::task::spawn_blocking(parse)
                .await
                .map_err(|e| ServiceError::Internal(e.to_string()))??;
            topic.append(records).await?
        }
        EventLog::Kafka(kafka) => {
            // Asked first: an unknown topic is refused, and an unreachable cluster answered
            // within the request timeout, before anything is sent.
            let (cluster, name) = (kafka.cluster.clone(), topic.to_owned());
            let found = tokio::task::spawn_blocking(move || cluster.partition_count(&name))
                .await
                .map_err(|e| ServiceError::Internal(e.to_string()))?
                .map_err(unavailable)?;
            if found.is_none() {
                return Err(LogError::UnknownTopic {
                    name: topic.to_owned(),
                    known: Vec::new(),
                }
                .into());
            }
            let records = tokio::task::spawn_blocking(parse)
                .await
                .map_err(|e| ServiceError::Internal(e.to_string()))??;
            kafka
                .cluster
                .append(topic, &records)
                .await
                .map_err(unavailable)?
        }
    };
    Ok(ProduceResponse {
        topic: topic.to_owned(),
        records: offsets.len() as u64,
        offsets,
    })
}

/// Records read from one partition, and where to continue.
#[derive(Debug, Clone)]
pub struct ReadResult {
    pub records: Vec<ConsumedRecord>,
    pub next_offset: u64,
}

/// What to read.
#[derive(Debug, Clone, Copy)]
pub struct ReadRequest {
    pub partition: u32,
    pub start: StartAt,
    pub max_records: usize,
    pub max_bytes: usize,
    /// When nothing is there yet, wait this long for new records.
    pub wait_ms: u64,
}

/// Reads up to `max_records` records from one partition, waiting up to `wait_ms` for the first.
/// `shutdown` ends a wait early.
pub async fn read(
    log: &EventLog,
    topic: &str,
    request: ReadRequest,
    shutdown: Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<ReadResult, ServiceError> {
    match log {
        EventLog::Embedded(log) => read_embedded(log, topic, request, shutdown).await,
        EventLog::Kafka(kafka) => read_kafka(kafka, topic, request, shutdown).await,
    }
}

/// [`read`] from a Kafka cluster: a reader placed as `request` says, polled in slices so that
/// a shutdown ends the wait.
async fn read_kafka(
    kafka: &KafkaLog,
    topic: &str,
    request: ReadRequest,
    shutdown: Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<ReadResult, ServiceError> {
    let joined = |e: tokio::task::JoinError| ServiceError::Internal(e.to_string());
    let (cluster, name) = (kafka.cluster.clone(), topic.to_owned());
    let reader = tokio::task::spawn_blocking(move || -> Result<_, ServiceError> {
        let offsets = kafka_partition(&cluster, &name, request.partition)?;
        let start = match request.start {
            StartAt::Beginning => offsets.earliest,
            StartAt::End => offsets.next,
            StartAt::Offset(offset) if (offsets.earliest..=offsets.next).contains(&offset) => {
                offset
            }
            StartAt::Offset(requested) => {
                return Err(LogError::OffsetOutOfRange {
                    topic: name,
                    partition: request.partition,
                    requested,
                    start_offset: offsets.earliest,
                    visible_offset: offsets.next,
                }
                .into());
            }
            StartAt::Timestamp(ms) => cluster
                .offset_for_time(&name, request.partition, ms)
                .map_err(unavailable)?,
        };
        let reader = cluster
            .reader(&name, request.partition, start)
            .map_err(unavailable)?;
        Ok((reader, offsets.next))
    })
    .await
    .map_err(joined)??;
    let (mut reader, known_end) = reader;
    let max_records = request.max_records.clamp(1, READ_RECORDS_MAX);
    let max_bytes = request.max_bytes.clamp(1, READ_BYTES_MAX);
    let wait = Duration::from_millis(request.wait_ms.min(READ_WAIT_MS_MAX));
    let began = tokio::time::Instant::now();
    let deadline = began + wait;
    // Records the cluster said it holds are waited for (a fresh reader has fetched nothing
    // yet), also by a read that asked not to wait: as on the embedded log, they are there.
    let fetched_by = began + kappa_kafka::REQUEST_TIMEOUT;
    let stopped = || shutdown.as_ref().is_some_and(|rx| *rx.borrow());
    loop {
        let now = tokio::time::Instant::now();
        let due = if reader.position() < known_end {
            deadline.max(fetched_by)
        } else {
            deadline
        };
        let slice = due.saturating_duration_since(now).min(KAFKA_POLL_SLICE);
        let (back, read) = tokio::task::spawn_blocking(move || {
            let read = reader.read(max_records, slice);
            (reader, read)
        })
        .await
        .map_err(joined)?;
        reader = back;
        let read = read.map_err(unavailable)?;
        if !read.is_empty() || tokio::time::Instant::now() >= due || stopped() {
            let mut records = Vec::with_capacity(read.len());
            let mut bytes = 0usize;
            let mut next_offset = reader.position();
            for r in read {
                // A single larger record is still returned whole.
                if !records.is_empty() && bytes + r.record.value.len() > max_bytes {
                    next_offset = r.offset;
                    break;
                }
                bytes += r.record.value.len();
                records.push(ConsumedRecord {
                    topic: topic.to_owned(),
                    partition: request.partition,
                    offset: r.offset,
                    timestamp_ms: r.timestamp_ms.unwrap_or(0),
                    key: r.record.key,
                    headers: r.record.headers,
                    value: r.record.value,
                });
            }
            return Ok(ReadResult {
                records,
                next_offset,
            });
        }
    }
}

/// [`read`] from the embedded log.
async fn read_embedded(
    log: &Log,
    topic: &str,
    request: ReadRequest,
    mut shutdown: Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<ReadResult, ServiceError> {
    let topic = log.topic(topic)?;
    // Positioning may read an index and scan a segment (a timestamp): off the async threads.
    let mut reader = {
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || {
            topic.partition(request.partition)?.reader(request.start)
        })
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))??
    };
    let max_records = request.max_records.clamp(1, READ_RECORDS_MAX);
    let max_bytes = request.max_bytes.clamp(1, READ_BYTES_MAX);
    let wait = Duration::from_millis(request.wait_ms.min(READ_WAIT_MS_MAX));
    let name: Arc<str> = topic.name().into();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let (records, next_offset, back) = tokio::task::spawn_blocking({
            let name = name.clone();
            move || -> Result<_, LogError> {
                let mut out = Vec::new();
                let mut bytes = 0usize;
                let mut next = reader.next_offset();
                while out.len() < max_records && bytes < max_bytes {
                    let Some(chunk) = reader.read(max_bytes - bytes)? else {
                        break;
                    };
                    bytes += chunk.byte_len();
                    for record in chunk.records() {
                        let record = record?;
                        if out.len() == max_records {
                            break;
                        }
                        out.push(ConsumedRecord::from_ref(&name, reader.partition(), &record));
                        next = record.offset + 1;
                    }
                }
                Ok((out, next, reader))
            }
        })
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))??;
        reader = back;
        if !records.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(ReadResult {
                records,
                next_offset,
            });
        }
        let reader_ref = &mut reader;
        let shutdown_signal = async {
            match shutdown.as_mut() {
                Some(rx) => {
                    let _ = rx.wait_for(|stop| *stop).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            waited = tokio::time::timeout_at(deadline, reader_ref.wait()) => match waited {
                Ok(Ok(())) => continue,
                Ok(Err(LogError::Closed)) | Err(_) => {
                    return Ok(ReadResult { records: Vec::new(), next_offset: reader.next_offset() });
                }
                Ok(Err(e)) => return Err(e.into()),
            },
            () = shutdown_signal => {
                return Ok(ReadResult { records: Vec::new(), next_offset: reader.next_offset() });
            }
        }
    }
}

/// Offsets of one partition, and optionally the first offset at or after a timestamp.
/// Blocking (a Kafka cluster is asked).
pub fn offsets(
    log: &EventLog,
    topic: &str,
    partition: u32,
    timestamp_ms: Option<i64>,
) -> Result<OffsetsResponse, ServiceError> {
    let kafka = match log {
        EventLog::Embedded(log) => {
            let topic = log.topic(topic)?;
            let partition = topic.partition(partition)?;
            let offsets = partition.offsets();
            return Ok(OffsetsResponse {
                start_offset: offsets.start_offset,
                visible_offset: offsets.visible_offset,
                offset_for_timestamp: timestamp_ms
                    .map(|ts| partition.offset_for_timestamp(ts))
                    .transpose()?,
            });
        }
        EventLog::Kafka(kafka) => kafka,
    };
    let cluster = &kafka.cluster;
    let found = kafka_partition(cluster, topic, partition)?;
    Ok(OffsetsResponse {
        start_offset: found.earliest,
        visible_offset: found.next,
        offset_for_timestamp: timestamp_ms
            .map(|ts| cluster.offset_for_time(topic, partition, ts))
            .transpose()
            .map_err(unavailable)?,
    })
}

/// A cluster's error: it cannot be asked now.
fn unavailable(e: kappa_kafka::KafkaError) -> ServiceError {
    ServiceError::Unavailable(e.to_string())
}

/// The offsets of `topic`'s `partition` on a cluster, as one request for the topic asks them:
/// an unknown topic or partition is refused as on the embedded log. Blocking.
fn kafka_partition(
    cluster: &kappa_kafka::Cluster,
    topic: &str,
    partition: u32,
) -> Result<kappa_kafka::PartitionOffsets, ServiceError> {
    let offsets = cluster
        .topic_offsets(topic)
        .map_err(unavailable)?
        .ok_or_else(|| LogError::UnknownTopic {
            name: topic.to_owned(),
            known: Vec::new(),
        })?;
    let partitions = u32::try_from(offsets.len()).unwrap_or(u32::MAX);
    Ok(offsets
        .into_iter()
        .find(|p| p.partition == partition)
        .ok_or(LogError::UnknownPartition {
            topic: topic.to_owned(),
            partition,
            partitions,
        })?)
}

/// Runs `sql` within `limits` on a thread of its own, or here without them.
async fn answer(
    lakehouse: &kappa_lakehouse::Lakehouse,
    sql: &str,
    limits: Option<crate::config::QueryLimits>,
) -> Result<crate::isolated::Answer, ServiceError> {
    let answered = match limits {
        None => lakehouse.query(sql).await.map_err(query_error),
        Some(limits) => {
            // The catalog is read here, on the server's runtime, whose catalog connections
            // these are.
            let ctx = lakehouse.session().await.map_err(query_error)?;
            crate::isolated::query(ctx, sql.to_owned(), limits)
                .await
                .map_err(|e| match e {
                    crate::isolated::QueryError::Query(message) => {
                        ServiceError::BadRequest(message)
                    }
                    crate::isolated::QueryError::Internal(message) => {
                        ServiceError::Internal(message)
                    }
                })
        }
    };
    match answered {
        Err(ServiceError::BadRequest(message)) => Err(ServiceError::BadRequest(
            with_candidates(lakehouse, message).await,
        )),
        other => other,
    }
}

/// A query's "table not found" with the tables of that name in the layers appended
/// (`orders` → `bronze.orders`, `silver.orders`), so the reader knows what to write.
async fn with_candidates(lakehouse: &kappa_lakehouse::Lakehouse, message: String) -> String {
    if missing_table(&message).is_none() {
        return message;
    }
    match lakehouse.catalog_state().await {
        Ok(tables) => name_candidates(
            message,
            tables
                .into_iter()
                .map(|(namespace, name, _)| (namespace, name)),
        ),
        Err(_) => message,
    }
}

/// The bare name of the table DataFusion says it did not find ("Error during planning: table
/// 'kappa.public.orders' not found"), if the message says that.
fn missing_table(message: &str) -> Option<&str> {
    message
        .split_once("table '")
        .and_then(|(_, rest)| rest.split_once("' not found"))
        .map(|(name, _)| name.rsplit('.').next().unwrap_or(name))
}

/// `message` — a query's "table not found" — with the layers' tables of that name among
/// `tables` (schema, name) appended; the message as it is otherwise.
pub(crate) fn name_candidates(
    message: String,
    tables: impl Iterator<Item = (String, String)>,
) -> String {
    let Some(missing) = missing_table(&message).map(str::to_owned) else {
        return message;
    };
    let mut candidates: Vec<String> = tables
        .filter(|(namespace, name)| {
            *name == missing
                && !namespace.is_empty()
                && !namespace.starts_with("kappa_")
                && !["public", "pg_catalog", "information_schema"].contains(&namespace.as_str())
        })
        .map(|(namespace, name)| format!("{namespace}.{name}"))
        .collect();
    candidates.sort();
    candidates.dedup();
    match candidates.as_slice() {
        [] => message,
        [one] => format!("{message}; did you mean {one}?"),
        many => format!(
            "{message}; `{missing}` is in several layers, name one: {}",
            many.join(", ")
        ),
    }
}

/// A query's failure: the query's fault (400) or the server's.
fn query_error(e: kappa_lakehouse::LakehouseError) -> ServiceError {
    match e {
        kappa_lakehouse::LakehouseError::Query(message) => ServiceError::BadRequest(message),
        other => ServiceError::Internal(other.to_string()),
    }
}

/// Runs SQL over the serving tables.
/// `limits`: a server's queries run within them on a thread of their own (so that none can
/// starve the pipelines); a command's own run here, unbounded.
pub async fn sql(
    lakehouse: &kappa_lakehouse::Lakehouse,
    sql: &str,
    limits: Option<crate::config::QueryLimits>,
) -> Result<crate::api::SqlResponse, ServiceError> {
    let (schema, batches) = answer(lakehouse, sql, limits).await?;
    crate::api::SqlResponse::from_batches(&schema, &batches).map_err(ServiceError::Internal)
}

/// Runs SQL over the serving tables; the result as an Arrow IPC stream. `limits` as [`sql`]'s.
pub async fn sql_arrow(
    lakehouse: &kappa_lakehouse::Lakehouse,
    sql: &str,
    limits: Option<crate::config::QueryLimits>,
) -> Result<Vec<u8>, ServiceError> {
    let (schema, batches) = answer(lakehouse, sql, limits).await?;
    let internal = |e: arrow::error::ArrowError| ServiceError::Internal(e.to_string());
    let mut writer =
        arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &schema).map_err(internal)?;
    for batch in &batches {
        writer.write(batch).map_err(internal)?;
    }
    writer.into_inner().map_err(internal)
}

pub fn topics(log: &Log) -> Vec<TopicInfo> {
    log.topics().iter().map(|t| TopicInfo::of(t)).collect()
}

pub fn topic(log: &Log, name: &str) -> Result<TopicInfo, ServiceError> {
    let topic = log.topic(name)?;
    Ok(TopicInfo::of(&topic))
}

pub async fn create_topic(
    log: &Arc<Log>,
    request: crate::api::CreateTopic,
) -> Result<TopicInfo, ServiceError> {
    let log = log.clone();
    tokio::task::spawn_blocking(move || {
        let topic = log.create_topic(&request.name, request.config)?;
        Ok(TopicInfo::of(&topic))
    })
    .await
    .map_err(|e| ServiceError::Internal(e.to_string()))?
}

/// Every model's state, table and lag, and the dead letters (counted by `tally`, which reads
/// only the letters that arrived since it last did). `runners` is what a running `kappa up`
/// knows of its runners; without it every model is `stopped`.
pub async fn status(
    log: &Arc<Log>,
    lakehouse: &kappa_lakehouse::Lakehouse,
    project: Option<&kappa_pipeline::Project>,
    runners: Option<&crate::pipelines::RunnerStates>,
    tally: &Arc<crate::dead_letters::DeadLetterTally>,
) -> Result<crate::api::StatusResponse, ServiceError> {
    let dead_letters = {
        let (log, tally) = (log.clone(), tally.clone());
        tokio::task::spawn_blocking(move || tally.counts(&log))
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))??
    };
    let mut models = Vec::new();
    // Without a project there are no models to report, only the dead letters.
    if let Some(project) = project {
        let versions = kappa_pipeline::deploy::versions(project);
        for id in &project.order {
            let version = versions.get(id).cloned().unwrap_or_default();
            models.push(
                model_status(log, lakehouse, project, id, version, runners, &dead_letters).await,
            );
        }
    }
    Ok(crate::api::StatusResponse {
        models,
        bronze: Vec::new(),
        dead_letters,
        versions: Vec::new(),
        alerts: Vec::new(),
    })
}

/// One model's status: its runner's state, its table's last commit, its lag and dead letters.
async fn model_status(
    log: &Log,
    lakehouse: &kappa_lakehouse::Lakehouse,
    project: &kappa_pipeline::Project,
    id: &str,
    version: String,
    runners: Option<&crate::pipelines::RunnerStates>,
    dead_letters: &[crate::api::DeadLetterCount],
) -> crate::api::ModelStatus {
    use kappa_engine::runner::VERSION_PROPERTY;

    let model = &project.models[id];
    let snapshot = published(
        lakehouse,
        kappa_lakehouse::table_ident(&model.layer, &model.name),
    )
    .await;
    let committed = offsets_of(snapshot.as_ref());
    let lag_records = model_lag(log, lakehouse, project, id, &committed).await;
    let (state, detail) = runner_state(runners.and_then(|r| r.get(id)));
    let rows = rows_of(snapshot.as_ref());
    let records_per_second = kappa_engine::metrics::THROUGHPUT.rate(id, &version);
    crate::api::ModelStatus {
        model: id.to_owned(),
        state,
        detail,
        version,
        table_version: snapshot
            .as_ref()
            .and_then(|(p, _)| p.get(VERSION_PROPERTY).cloned()),
        rows,
        bytes: bytes_of(snapshot.as_ref()),
        last_commit: snapshot
            .as_ref()
            .map(|(_, ms)| crate::api::format_timestamp(*ms)),
        lag_seconds: lag_seconds(lag_records, snapshot.as_ref().map(|(_, ms)| *ms)),
        records_per_second,
        lag_records,
        dead_letters: dead_letters
            .iter()
            .filter(|d| d.model == id)
            .map(|d| d.count)
            .sum(),
    }
}

/// How far behind in time a table is that lags `lag_records` and last committed at
/// `last_commit_ms`: 0 when nothing lags, otherwise the age of its last commit.
fn lag_seconds(lag_records: u64, last_commit_ms: Option<i64>) -> Option<f64> {
    if lag_records == 0 {
        return Some(0.0);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    last_commit_ms.map(|ms| (now - ms).max(0) as f64 / 1000.0)
}

/// `bronze.<topic>` of each of the project's topics: its runner's state (from `runners`, by
/// topic), rows and lag.
pub async fn bronze_status(
    log: &Log,
    lakehouse: &kappa_lakehouse::Lakehouse,
    project: &kappa_pipeline::Project,
    runners: Option<&crate::pipelines::RunnerStates>,
) -> Vec<crate::api::ModelStatus> {
    let mut all = Vec::new();
    for topic_name in project.topics.keys() {
        let snapshot = published(lakehouse, kappa_engine::bronze::bronze_table(topic_name)).await;
        let committed = offsets_of(snapshot.as_ref());
        let mut lag_records = 0;
        if let Ok(topic) = log.topic(topic_name) {
            for partition in topic.partitions() {
                let offsets = partition.offsets();
                let done = committed
                    .get(topic_name)
                    .and_then(|p| p.get(&partition.id()))
                    .copied()
                    .unwrap_or(offsets.start_offset);
                lag_records += offsets.visible_offset.saturating_sub(done);
            }
        }
        let (state, detail) = runner_state(runners.and_then(|r| r.get(topic_name)));
        let model = format!("{}.{topic_name}", kappa_engine::bronze::BRONZE_LAYER);
        all.push(crate::api::ModelStatus {
            lag_seconds: lag_seconds(lag_records, snapshot.as_ref().map(|(_, ms)| *ms)),
            records_per_second: kappa_engine::metrics::THROUGHPUT.rate(&model, "raw"),
            model,
            state,
            detail,
            version: "raw".to_owned(),
            table_version: None,
            rows: rows_of(snapshot.as_ref()),
            bytes: bytes_of(snapshot.as_ref()),
            last_commit: snapshot
                .as_ref()
                .map(|(_, ms)| crate::api::format_timestamp(*ms)),
            lag_records,
            dead_letters: 0,
        });
    }
    all
}

/// The properties and time of the published snapshot of the table `ident` names, if it has one.
async fn published(
    lakehouse: &kappa_lakehouse::Lakehouse,
    ident: kappa_lakehouse::Result<kappa_lakehouse::TableIdent>,
) -> Option<(std::collections::HashMap<String, String>, i64)> {
    let table = lakehouse.load_table(&ident.ok()?).await.ok()?;
    table
        .metadata()
        .current_snapshot()
        .map(|s| (s.summary().additional_properties.clone(), s.timestamp_ms()))
}

/// The rows a published snapshot holds (its `total-records`); `None` without a snapshot.
fn rows_of(snapshot: Option<&(std::collections::HashMap<String, String>, i64)>) -> Option<u64> {
    let (properties, _) = snapshot?;
    Some(
        properties
            .get("total-records")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
    )
}

/// The bytes of data files a published snapshot holds (its `total-files-size`, which every
/// commit writes); `None` without a snapshot or before commits recorded it.
fn bytes_of(snapshot: Option<&(std::collections::HashMap<String, String>, i64)>) -> Option<u64> {
    let (properties, _) = snapshot?;
    properties.get("total-files-size")?.parse().ok()
}

/// The offsets a snapshot's `kappa.offsets` records.
fn offsets_of(
    snapshot: Option<&(std::collections::HashMap<String, String>, i64)>,
) -> kappa_engine::runner::Offsets {
    snapshot
        .and_then(|(p, _)| p.get(kappa_engine::runner::OFFSETS_PROPERTY))
        .and_then(|o| serde_json::from_str(o).ok())
        .unwrap_or_default()
}

/// A runner's state as the status words it, with its detail.
fn runner_state(state: Option<crate::pipelines::RunnerState>) -> (String, Option<String>) {
    use crate::pipelines::RunnerState;
    match state {
        None => ("stopped".to_owned(), None),
        Some(RunnerState::Running) => ("running".to_owned(), None),
        Some(RunnerState::Restarting(e)) => ("restarting".to_owned(), Some(e)),
        Some(RunnerState::NotRunning(e)) => ("not running".to_owned(), Some(e)),
        Some(RunnerState::Quarantined(e)) => ("quarantined".to_owned(), Some(e)),
        Some(RunnerState::Waiting(e)) => ("waiting".to_owned(), Some(e)),
    }
}

/// The records of `id`'s topics past the offsets `committed` records.
fn topic_lag(
    log: &Log,
    project: &kappa_pipeline::Project,
    id: &str,
    committed: &kappa_engine::runner::Offsets,
) -> u64 {
    let read = kappa_engine::runner::offset_keys(project, id);
    let mut lag = 0;
    for (topic_name, key) in read {
        let Ok(topic) = log.topic(&topic_name) else {
            continue;
        };
        for partition in topic.partitions() {
            let offsets = partition.offsets();
            let done = committed
                .get(&key)
                .and_then(|p| p.get(&partition.id()))
                .copied()
                .unwrap_or(offsets.start_offset);
            lag += offsets.visible_offset.saturating_sub(done);
        }
    }
    lag
}

/// The records `id` has still to read from the positions `committed` records: on its topics,
/// or, for a model reading an upstream's table, through that table to the topics under it.
async fn model_lag(
    log: &Log,
    lakehouse: &kappa_lakehouse::Lakehouse,
    project: &kappa_pipeline::Project,
    id: &str,
    committed: &kappa_engine::runner::Offsets,
) -> u64 {
    // A model reading a table may read a topic too (the other side of a join).
    let mut lag = topic_lag(log, project, id, committed);
    for upstream in project.reads_tables.get(id).into_iter().flatten() {
        lag += Box::pin(upstream_lag(log, lakehouse, project, upstream, committed)).await;
    }
    lag
}

/// The lag of a model reading `upstream`'s table from the position `committed` records: the
/// upstream's own lag (on its topics, or through the table it reads) plus the records its
/// table holds past the position.
async fn upstream_lag(
    log: &Log,
    lakehouse: &kappa_lakehouse::Lakehouse,
    project: &kappa_pipeline::Project,
    upstream: &str,
    committed: &kappa_engine::runner::Offsets,
) -> u64 {
    use kappa_engine::upstream::{table_key, upstream_table};
    let Ok(ident) = upstream_table(lakehouse, project, upstream) else {
        return 0;
    };
    let Ok(table) = lakehouse.load_table(&ident).await else {
        return 0;
    };
    let upstream_committed: kappa_engine::runner::Offsets = table
        .metadata()
        .current_snapshot()
        .and_then(|s| {
            s.summary()
                .additional_properties
                .get(kappa_engine::runner::OFFSETS_PROPERTY)
                .cloned()
        })
        .and_then(|o| serde_json::from_str(&o).ok())
        .unwrap_or_default();
    let position = committed
        .get(&table_key(&ident))
        .and_then(|p| p.get(&0))
        .and_then(|p| i64::try_from(*p).ok())
        .unwrap_or(0);
    let unread: u64 = match lakehouse.added_after(&table, position).await {
        Ok(added) => added.files.iter().map(|f| f.file.record_count()).sum(),
        Err(_) => 0,
    };
    model_lag(log, lakehouse, project, upstream, &upstream_committed).await + unread
}
