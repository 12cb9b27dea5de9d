//! Engine cases as text files (`tests/cases/*.case`), in the spirit of DataFusion's `.slt`:
//! a project, records produced, runners started, killed and restarted in-process, and what the
//! tables must then hold. Every file runs as part of `cases_run_as_written`; a failure names the
//! file and the line of the step that failed.
//!
//! ```text
//! # a comment
//! file topics/orders.toml          the project's files, each up to `end`
//! partitions = 2
//! [schema]
//! id = "bigint"
//! end
//! project ../../../cli/tests/golden  or every .toml and .sql file of a folder (relative to
//!                                  the case's), as the project's files
//! produce orders                   NDJSON records (keyed by the topic's declared key), to `end`
//! {"id": 1}
//! end
//! run                              start a runner per model (all, or those named)
//! kill                             abort every runner where it stands (the in-process kill -9)
//! stop                             stop every runner cleanly
//! query SELECT ... ORDER BY ...    the rows, as a table, to `end` — waited for (30 s)
//! +----+
//! end
//! same-as-batch silver.orders      the table equals the model's SQL run once over every valid
//!                                  record (upstream models as views) — waited for (30 s)
//! same-as-batch gold.w where window_start < '2026-01-05T08:03:00Z'
//!                                  the same, of the rows both keep (rows made final by a
//!                                  watermark, say)
//! dead-letters 2                   the dead-letter topic holds this many letters
//! reads gold.x from gold.y         gold.x reads gold.y's published table (`from topics`:
//!                                  it reads no table; `from a.b and c.d`: it reads both),
//!                                  as `kappa up` would run it
//! embedded-only REASON             the case runs over the embedded log only, for REASON
//! broker kill                      over a Kafka cluster: SIGKILL to the broker (the runners
//! broker restart                   keep going, and wait); then start it again on the same
//!                                  storage. Nothing over the embedded log
//! group-at-end silver.orders orders  over a Kafka cluster: the model's consumer group
//!                                  (`kappa.cases.<model>.<version>`, for Kafka's tools) holds
//!                                  the topic's end — waited for (30 s). Nothing over the
//!                                  embedded log
//! ```
//!
//! Every case runs twice: over the embedded log (`cases_run_as_written`), and over a Kafka
//! cluster (`cases_run_on_a_kafka_cluster`: a tansu broker on loopback, started per case), where
//! the same oracle must hold.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::util::pretty::pretty_format_batches;
use kappa_engine::event_log::{EventLog, KafkaLog};
use kappa_engine::runner::{DEAD_LETTER_TOPIC, run_model};
use kappa_lakehouse::Lakehouse;
use kappa_log::{Log, Record, StartAt, TopicConfig};
use kappa_pipeline::{Project, ProjectFiles};
use kappa_testkit::kafka::Broker;

const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cases");
/// How long a `query` or `same-as-batch` waits for the tables to say what it expects.
const SETTLE: Duration = Duration::from_secs(30);

/// One step of a case, with the line it starts on.
#[derive(Debug)]
enum Step {
    File(String, String),
    Project(String),
    Produce(String, Vec<String>),
    Run(Vec<String>),
    Kill,
    Stop,
    Query(String, String),
    /// A model, and a predicate over its columns both sides are filtered by.
    SameAsBatch(String, Option<String>),
    DeadLetters(usize),
    /// A model, and the upstreams whose tables it reads (`None`: it reads no table).
    Reads(String, Option<Vec<String>>),
    /// Why the case runs over the embedded log only.
    EmbeddedOnly(String),
    /// Kill the Kafka broker (`false`) or start it again (`true`).
    Broker(bool),
    /// A model and a topic it reads, whose consumer group must reach the topic's end.
    GroupAtEnd(String, String),
}

/// The steps of a case file, or what is wrong with it and where.
fn parse(name: &str, text: &str) -> Vec<(usize, Step)> {
    let mut steps = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    let block = |lines: &mut std::iter::Peekable<std::iter::Enumerate<std::str::Lines>>,
                 at: usize| {
        let mut body = Vec::new();
        for (_, line) in lines.by_ref() {
            if line == "end" {
                return body;
            }
            body.push(line.to_owned());
        }
        panic!("{name}:{at}: no `end` for this block");
    };
    while let Some((i, line)) = lines.next() {
        let at = i + 1;
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        let step = match word {
            "file" => Step::File(rest.to_owned(), block(&mut lines, at).join("\n") + "\n"),
            "produce" => Step::Produce(rest.to_owned(), block(&mut lines, at)),
            "run" => Step::Run(rest.split_whitespace().map(str::to_owned).collect()),
            "kill" => Step::Kill,
            "stop" => Step::Stop,
            "query" => Step::Query(rest.to_owned(), block(&mut lines, at).join("\n")),
            "project" => Step::Project(rest.to_owned()),
            "same-as-batch" => match rest.split_once(" where ") {
                Some((model, predicate)) => {
                    Step::SameAsBatch(model.trim().to_owned(), Some(predicate.trim().to_owned()))
                }
                None => Step::SameAsBatch(rest.to_owned(), None),
            },
            "dead-letters" => Step::DeadLetters(
                rest.parse()
                    .unwrap_or_else(|e| panic!("{name}:{at}: dead-letters {rest:?}: {e}")),
            ),
            "reads" => match rest.split_once(" from ") {
                Some((model, "topics")) => Step::Reads(model.trim().to_owned(), None),
                Some((model, upstreams)) => Step::Reads(
                    model.trim().to_owned(),
                    Some(
                        upstreams
                            .split(" and ")
                            .map(|u| u.trim().to_owned())
                            .collect(),
                    ),
                ),
                None => panic!("{name}:{at}: reads MODEL from UPSTREAM [and UPSTREAM]|topics"),
            },
            "embedded-only" if !rest.is_empty() => Step::EmbeddedOnly(rest.to_owned()),
            "group-at-end" => match rest.split_once(' ') {
                Some((model, topic)) => Step::GroupAtEnd(model.to_owned(), topic.trim().to_owned()),
                None => panic!("{name}:{at}: group-at-end MODEL TOPIC"),
            },
            "broker" => match rest {
                "kill" => Step::Broker(false),
                "restart" => Step::Broker(true),
                _ => panic!("{name}:{at}: broker kill|restart"),
            },
            other => panic!("{name}:{at}: unknown step `{other}`"),
        };
        steps.push((at, step));
    }
    steps
}

/// A model's runner, as spawned.
type Runner = tokio::task::JoinHandle<Result<(), kappa_engine::runner::RunnerError>>;

/// A case being run: its data directory, log, lakehouse, project and runners.
struct Case {
    name: String,
    dir: tempfile::TempDir,
    files: ProjectFiles,
    project: Option<Arc<Project>>,
    log: Option<EventLog>,
    lakehouse: Option<Lakehouse>,
    runners: Vec<(tokio::sync::watch::Sender<bool>, Runner)>,
    /// Whether the log is a Kafka cluster, and its broker once started.
    on_kafka: bool,
    broker: Option<Broker>,
}

impl Drop for Case {
    /// A case that failed stops its runners before its broker goes (they would wait on it).
    fn drop(&mut self) {
        for (_, runner) in &self.runners {
            runner.abort();
        }
    }
}

impl Case {
    /// The project, loaded (and its topics created) when first needed.
    async fn open(&mut self) -> (Arc<Project>, EventLog, Lakehouse) {
        if self.project.is_none() {
            let mut files = self.files.clone();
            files.entry("kappa.toml".into()).or_default();
            let mut project = kappa_pipeline::load(&files)
                .unwrap_or_else(|d| panic!("{}: the project does not load: {d:#?}", self.name));
            // As `kappa up` starts it: models over a model read its published table.
            project.reads_tables = kappa_engine::upstream::table_readers(&project).await;
            let log = if self.on_kafka {
                let broker = Broker::start(self.dir.path());
                let cluster = Arc::new(
                    kappa_kafka::Cluster::connect(&broker.bootstrap)
                        .expect("clients")
                        .with_replication(1),
                );
                self.broker = Some(broker);
                for topic in project.topics.values() {
                    cluster
                        .ensure_topic(&topic.name, topic.partitions)
                        .await
                        .expect("a new topic");
                }
                EventLog::Kafka(KafkaLog {
                    cluster,
                    project: "cases".into(),
                })
            } else {
                let log = Arc::new(Log::open(self.dir.path().join("log")).expect("a fresh log"));
                for topic in project.topics.values() {
                    log.create_topic(
                        &topic.name,
                        TopicConfig {
                            partitions: topic.partitions,
                            ..TopicConfig::default()
                        },
                    )
                    .expect("a new topic");
                }
                EventLog::Embedded(log)
            };
            self.lakehouse = Some(Lakehouse::open(self.dir.path()).await.expect("a lakehouse"));
            self.project = Some(Arc::new(project));
            self.log = Some(log);
        }
        (
            self.project.clone().expect("opened above"),
            self.log.clone().expect("opened above"),
            self.lakehouse.clone().expect("opened above"),
        )
    }

    async fn step(&mut self, at: usize, step: Step) {
        let here = format!("{}:{at}", self.name);
        match step {
            Step::File(path, text) => {
                assert!(
                    self.project.is_none(),
                    "{here}: files come before anything runs"
                );
                self.files.insert(path, text);
            }
            Step::Produce(topic, lines) => {
                let (project, log, _) = self.open().await;
                let spec = &project.topics[&topic];
                let records: Vec<Record> = lines
                    .iter()
                    .map(|line| match &spec.key {
                        Some(field) => {
                            let key = serde_json::from_str::<serde_json::Value>(line)
                                .ok()
                                .and_then(|v| v.get(field).map(|k| k.to_string()))
                                .unwrap_or_default();
                            Record::keyed(key, line.clone())
                        }
                        None => Record::from_value(line.clone()),
                    })
                    .collect();
                match log {
                    EventLog::Embedded(log) => {
                        log.topic(&topic)
                            .unwrap_or_else(|e| panic!("{here}: {e}"))
                            .append(records)
                            .await
                            .unwrap_or_else(|e| panic!("{here}: {e}"));
                    }
                    EventLog::Kafka(kafka) => {
                        kafka
                            .cluster
                            .append(&topic, &records)
                            .await
                            .unwrap_or_else(|e| panic!("{here}: {e}"));
                    }
                }
            }
            Step::Run(models) => {
                let (project, log, lakehouse) = self.open().await;
                let models = if models.is_empty() {
                    project.order.clone()
                } else {
                    models
                };
                for model in models {
                    let (stop, stopped) = tokio::sync::watch::channel(false);
                    let runner = tokio::spawn(supervised(
                        log.clone(),
                        lakehouse.clone(),
                        project.clone(),
                        model,
                        stopped,
                    ));
                    self.runners.push((stop, runner));
                }
            }
            Step::Kill => {
                for (_, runner) in self.runners.drain(..) {
                    runner.abort();
                    let _ = runner.await;
                }
            }
            Step::Stop => {
                for (stop, runner) in self.runners.drain(..) {
                    let _ = stop.send(true);
                    match runner.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => panic!("{here}: a runner failed: {e}"),
                        Err(e) => panic!("{here}: a runner panicked: {e}"),
                    }
                }
            }
            Step::Query(sql, expected) => {
                let (_, _, lakehouse) = self.open().await;
                let expected = expected.trim().to_owned();
                self.settle(&here, &expected, || async {
                    match lakehouse.query(&sql).await {
                        Ok((_, batches)) => table_text(&batches),
                        Err(e) => format!("error: {e}"),
                    }
                })
                .await;
            }
            Step::Project(folder) => {
                assert!(
                    self.project.is_none(),
                    "{here}: files come before anything runs"
                );
                let root = Path::new(CASES).join(folder);
                read_folder(&root, &root, &mut self.files);
                assert!(
                    !self.files.is_empty(),
                    "{here}: no project files in {root:?}"
                );
            }
            Step::SameAsBatch(model, predicate) => {
                let (project, log, lakehouse) = self.open().await;
                let filter = predicate.map_or(String::new(), |p| format!(" WHERE {p}"));
                let expected = sorted(&batch_of(&project, &log, &model, &filter).await).await;
                self.settle(&here, &expected, || async {
                    match lakehouse
                        .query(&format!("SELECT * FROM {model}{filter}"))
                        .await
                    {
                        Ok((_, batches)) => sorted(&batches).await,
                        Err(e) => format!("error: {e}"),
                    }
                })
                .await;
            }
            Step::Reads(model, upstream) => {
                let (project, _, _) = self.open().await;
                assert_eq!(
                    project.reads_tables.get(&model),
                    upstream.as_ref(),
                    "{here}: the table {model} reads"
                );
            }
            Step::EmbeddedOnly(_) => {}
            Step::GroupAtEnd(model, topic) => {
                let (project, log, _) = self.open().await;
                if let EventLog::Kafka(kafka) = &log {
                    let version = kappa_engine::tables::model_version(&project, &model);
                    let group = kafka.group(&model, &version);
                    let ends = log.ends(&topic).expect("the topic's ends");
                    let expected = format!("{ends:?}");
                    self.settle(&here, &expected, || async {
                        let (cluster, group, topic) =
                            (kafka.cluster.clone(), group.clone(), topic.clone());
                        tokio::task::spawn_blocking(move || {
                            match cluster.group_offsets(&group, &topic) {
                                Ok(offsets) => format!("{offsets:?}"),
                                Err(e) => format!("error: {e}"),
                            }
                        })
                        .await
                        .expect("a blocking task")
                    })
                    .await;
                }
            }
            Step::Broker(up) => {
                self.open().await;
                if let Some(broker) = &mut self.broker {
                    if up {
                        broker.restart();
                    } else {
                        broker.kill9();
                    }
                }
            }
            Step::DeadLetters(count) => {
                let (_, log, _) = self.open().await;
                let expected = count.to_string();
                self.settle(&here, &expected, || async { letters(&log).to_string() })
                    .await;
            }
        }
    }

    /// Waits until `now()` says `expected`, or fails naming the step and what it said last.
    async fn settle<F, Fut>(&self, here: &str, expected: &str, now: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = String>,
    {
        let deadline = std::time::Instant::now() + SETTLE;
        loop {
            let got = now().await;
            if got.trim() == expected.trim() {
                return;
            }
            if let Some((_, runner)) = self.runners.iter().find(|(_, r)| r.is_finished()) {
                panic!("{here}: a runner ended early ({runner:?}); the tables say:\n{got}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{here}: expected\n{expected}\nbut the tables say\n{got}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `batches` as a table of text, or `(no rows)`.
fn table_text(batches: &[RecordBatch]) -> String {
    if batches.iter().all(|b| b.num_rows() == 0) {
        return "(no rows)".into();
    }
    pretty_format_batches(batches)
        .map(|t| t.to_string())
        .unwrap_or_else(|e| format!("error: {e}"))
}

/// `batches` sorted by every column, as text.
async fn sorted(batches: &[RecordBatch]) -> String {
    let Some(schema) = batches.first().map(RecordBatch::schema) else {
        return "(no rows)".into();
    };
    let ctx = datafusion::prelude::SessionContext::new();
    let table = datafusion::datasource::MemTable::try_new(schema.clone(), vec![batches.to_vec()])
        .expect("batches of one schema");
    ctx.register_table("t", Arc::new(table))
        .expect("a fresh session");
    let order: Vec<String> = (1..=schema.fields().len()).map(|i| i.to_string()).collect();
    let out = ctx
        .sql(&format!("SELECT * FROM t ORDER BY {}", order.join(", ")))
        .await
        .expect("a valid query")
        .collect()
        .await
        .expect("rows in memory");
    table_text(&out)
}

/// Every `.toml` and `.sql` file under `dir`, by its path relative to `root`.
fn read_folder(root: &Path, dir: &Path, files: &mut ProjectFiles) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir:?}: {e}"))
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_folder(root, &path, files);
        } else if path.extension().is_some_and(|e| e == "toml" || e == "sql") {
            let relative = path
                .strip_prefix(root)
                .expect("under the root")
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            files.insert(relative, text);
        }
    }
}

/// `model`'s SQL run once by DataFusion over every valid record of the topics it reads, with
/// the models it reads as views, its rows kept by `filter` (` WHERE …`, or nothing): the
/// oracle.
async fn batch_of(
    project: &Project,
    log: &EventLog,
    model: &str,
    filter: &str,
) -> Vec<RecordBatch> {
    let ctx = datafusion::prelude::SessionContext::new();
    kappa_engine::functions::register(&ctx);
    for (name, spec) in &project.topics {
        let decoder = kappa_engine::decode::Decoder::new(spec);
        let raw = every_record(log, name);
        let (rows, _, _) =
            decoder.decode_positioned(raw.iter().map(|(p, o, v)| kappa_engine::decode::Raw {
                partition: *p,
                offset: *o,
                value: v,
            }));
        let table = datafusion::datasource::MemTable::try_new(rows.schema(), vec![vec![rows]])
            .expect("one batch");
        ctx.register_table(name.as_str(), Arc::new(table))
            .expect("a fresh session");
    }
    let mut layers: BTreeMap<&str, ()> = BTreeMap::new();
    for id in &project.order {
        let m = &project.models[id];
        if layers.insert(&m.layer, ()).is_none() {
            ctx.sql(&format!("CREATE SCHEMA IF NOT EXISTS {}", m.layer))
                .await
                .expect("a schema");
        }
        if id == model {
            return ctx
                .sql(&format!("SELECT * FROM ({}){filter}", m.sql))
                .await
                .expect("the model's SQL plans")
                .collect()
                .await
                .expect("the model's SQL runs");
        }
        ctx.sql(&format!("CREATE VIEW {id} AS {}", m.sql))
            .await
            .expect("a view of an upstream model");
    }
    panic!("no model {model}");
}

/// How long a runner that could not reach the log waits before it starts again.
const LOG_RETRY: Duration = Duration::from_secs(1);

/// A model's runner as `kappa up` supervises it: one that stopped because the log could not
/// be reached or read (a broker down while it started) starts again after a pause; any other
/// end is the runner's.
async fn supervised(
    log: EventLog,
    lakehouse: Lakehouse,
    project: Arc<Project>,
    model: String,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> Result<(), kappa_engine::runner::RunnerError> {
    loop {
        let run = run_model(
            log.clone(),
            lakehouse.clone(),
            project.clone(),
            model.clone(),
            stopped.clone(),
        );
        match run.await {
            Err(
                kappa_engine::runner::RunnerError::Log { .. }
                | kappa_engine::runner::RunnerError::Source { .. },
            ) if !*stopped.borrow() => {
                tokio::time::sleep(LOG_RETRY).await;
            }
            outcome => return outcome,
        }
    }
}

/// Every record of `topic` as (partition, offset, value).
fn every_record(log: &EventLog, name: &str) -> Vec<(u32, u64, Vec<u8>)> {
    let mut raw = Vec::new();
    match log {
        EventLog::Embedded(log) => {
            let topic = log.topic(name).expect("a topic of the project");
            for p in 0..topic.partition_count() {
                let mut reader = topic
                    .partition(p)
                    .expect("a partition")
                    .reader(StartAt::Beginning)
                    .expect("a reader");
                while let Some(chunk) = reader.read(1 << 20).expect("a read") {
                    for r in chunk.records() {
                        let r = r.expect("a record");
                        raw.push((p, r.offset, r.value.to_vec()));
                    }
                }
            }
        }
        EventLog::Kafka(kafka) => {
            for p in kafka.cluster.offsets(name).expect("a topic of the project") {
                let mut reader = kafka
                    .cluster
                    .reader(name, p.partition, p.earliest)
                    .expect("a reader");
                while reader.position() < p.next {
                    let read = reader
                        .read(10_000, Duration::from_secs(10))
                        .expect("a read");
                    assert!(!read.is_empty(), "{name}/{} stops short", p.partition);
                    for r in read {
                        raw.push((p.partition, r.offset, r.record.value.to_vec()));
                    }
                }
            }
        }
    }
    raw
}

/// How many letters the dead-letter topic holds.
fn letters(log: &EventLog) -> u64 {
    log.ends(DEAD_LETTER_TOPIC)
        .map(|ends| ends.values().sum())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cases_run_as_written() {
    run_cases(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cases_run_on_a_kafka_cluster() {
    run_cases(true).await;
}

/// Runs every case (`KAPPA_CASE=name`: those whose file name holds it), over a Kafka cluster
/// with `on_kafka`, else over the embedded log.
async fn run_cases(on_kafka: bool) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut paths: Vec<_> = std::fs::read_dir(CASES)
        .expect("tests/cases")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "case"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no cases in {CASES}");
    let only = std::env::var("KAPPA_CASE").ok();
    let mut ran = 0;
    for path in paths {
        let name = file_name(&path);
        if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("a readable case");
        let steps = parse(&name, &text);
        if on_kafka
            && let Some(reason) = steps.iter().find_map(|(_, s)| match s {
                Step::EmbeddedOnly(reason) => Some(reason),
                _ => None,
            })
        {
            eprintln!("{name}: over the embedded log only: {reason}");
            continue;
        }
        let mut case = Case {
            name: name.clone(),
            dir: tempfile::tempdir().expect("a temporary directory"),
            files: ProjectFiles::new(),
            project: None,
            log: None,
            lakehouse: None,
            runners: Vec::new(),
            on_kafka,
            broker: None,
        };
        for (at, step) in steps {
            case.step(at, step).await;
        }
        case.step(0, Step::Stop).await;
        ran += 1;
    }
    assert!(ran > 0 || only.is_some(), "no case ran");
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
