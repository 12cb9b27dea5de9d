//! A project folder read into topics, models and their dependency order.
//!
//! ```text
//! kappa.toml                     ProjectConfig
//! topics/<name>.toml             TopicSpec   (partitions, key, schema)
//! models/<layer>/<name>.sql      Model       (one SELECT over topics and `layer.model`s)
//! models/<layer>/<name>.toml       its ModelConfig
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use indexmap::IndexMap;
use serde::Deserialize;
use toml::Spanned;

use crate::diagnostic::{Diagnostic, did_you_mean};
use crate::log_section::{LogSection, log_problems};
use crate::schema::{Field, FieldType};

/// The files of a project folder: path relative to the folder (with `/`) → contents.
pub type ProjectFiles = BTreeMap<String, String>;

/// The layer of the tables kappa keeps of every topic, `bronze.<topic>`: records exactly as
/// they arrived.
pub const BRONZE_LAYER: &str = "bronze";

/// The project file.
pub const PROJECT_FILE: &str = "kappa.toml";

/// What `kappa.toml` says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    #[serde(default)]
    pub project: ProjectSection,
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub lakehouse: LakehouseSection,
    #[serde(default)]
    pub deploy: DeploySection,
    #[serde(default)]
    pub masking: MaskingSection,
    #[serde(default)]
    pub alerts: AlertsSection,
    #[serde(default)]
    pub log: LogSection,
}

/// What raises an alert and where alerts go.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsSection {
    /// A model's lag (records not yet in its table) over this raises a `lag` alert; none when
    /// absent.
    pub lag_records: Option<u64>,
    /// Webhooks every alert is posted to.
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
}

/// One alert webhook.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// `http://…` or `https://…`.
    pub url: String,
    #[serde(default)]
    pub format: WebhookFormat,
}

/// The body an alert webhook receives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// The alert as a JSON object: kind, model, message, time.
    #[default]
    Json,
    /// `{"text": "…"}`, which Slack's incoming webhooks (and Mattermost, Discord's Slack
    /// endpoint) accept.
    Slack,
}

/// Where the key of the `hash` mask comes from. The key itself is never in the project
/// folder: `kappa check` refuses a `secret` here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MaskingSection {
    /// The environment variable holding the key; `KAPPA_HASH_SECRET` when absent.
    pub secret_env: Option<String>,
    /// Only read to refuse it with the reason.
    #[serde(default, skip_serializing)]
    secret: Option<String>,
}

/// The environment variable holding the `hash` mask's key when `kappa.toml` names none.
pub const DEFAULT_SECRET_ENV: &str = "KAPPA_HASH_SECRET";

impl MaskingSection {
    /// The environment variable the `hash` mask's key is read from.
    pub fn secret_env(&self) -> &str {
        self.secret_env.as_deref().unwrap_or(DEFAULT_SECRET_ENV)
    }
}

/// How a column's values are masked before they reach a table (`[mask]` in a model's TOML;
/// also SQL functions of the same names).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
pub enum Mask {
    /// `alice@example.com` → `a***@example.com`.
    #[serde(rename = "mask_email")]
    MaskEmail,
    /// HMAC-SHA256 of the value under the project's secret key, as hex: equal values stay
    /// equal (joins and counts of distinct values still work), nobody without the key can
    /// test a guess.
    #[serde(rename = "hash")]
    Hash,
    /// Replaced by `[redacted]` (NULL stays NULL).
    #[serde(rename = "redact")]
    Redact,
    /// A date or timestamp cut to its day.
    #[serde(rename = "truncate_date")]
    TruncateDate,
    /// Only the last four characters kept: `****1234`.
    #[serde(rename = "last4")]
    Last4,
}

impl Mask {
    /// The SQL function applying it.
    pub fn function(self) -> &'static str {
        match self {
            Mask::MaskEmail => "mask_email",
            Mask::Hash => "hash",
            Mask::Redact => "redact",
            Mask::TruncateDate => "truncate_date",
            Mask::Last4 => "last4",
        }
    }
}

/// How deploys treat the versions they replace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeploySection {
    /// How long a replaced version's table is kept for `kappa rollback` after its cutover,
    /// e.g. `"7d"` (the default) or `"0s"` (dropped at once).
    pub retention: Option<String>,
}

/// How long replaced versions are kept when `kappa.toml` does not say.
pub const DEFAULT_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

impl DeploySection {
    /// The retention in ms, or why `retention` is not a duration.
    pub fn retention_ms(&self) -> Result<u64, String> {
        match &self.retention {
            None => Ok(DEFAULT_RETENTION_MS),
            Some(text) => humantime::parse_duration(text)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .map_err(|e| {
                    format!("deploy.retention `{text}` is not a duration like \"7d\": {e}")
                }),
        }
    }
}

/// Where the serving tables' files go (the catalog stays in the data directory).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LakehouseSection {
    /// `"sql"` (the default: SQLite in the data directory) or `"rest"` (an Iceberg REST
    /// catalog at `uri`).
    pub catalog: Option<String>,
    /// The REST catalog's address.
    pub uri: Option<String>,
    /// `s3://bucket/prefix`; by default the data directory's `warehouse/` folder.
    pub warehouse: Option<String>,
    /// Passed to the catalog and its file IO: `s3.endpoint`, `s3.region`,
    /// `s3.path-style-access`, … Credentials come from the environment.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectSection {
    pub name: Option<String>,
}

/// Addresses and limits of `kappa up`; flags override them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// HTTP API and web UI, e.g. `127.0.0.1:7878`.
    pub http: Option<String>,
    /// Postgres wire endpoint, e.g. `127.0.0.1:5433`.
    pub pg: Option<String>,
    pub max_request_bytes: Option<usize>,
    /// How long one query (Postgres endpoint) may run, e.g. `"30s"`.
    pub query_timeout: Option<String>,
    /// How much memory one query's operators (joins, sorts, aggregations) may hold, e.g.
    /// `"512MiB"`.
    pub query_memory: Option<String>,
    /// With `pg_password_env`: the one user the Postgres endpoint accepts, by SCRAM-SHA-256.
    pub pg_user: Option<String>,
    /// The environment variable holding that user's password (never the password itself: the
    /// project folder is in git).
    pub pg_password_env: Option<String>,
}

/// A topic as the project declares it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TopicSpec {
    pub name: String,
    pub file: String,
    pub partitions: u32,
    /// The record field whose value is the record key.
    pub key: Option<String>,
    /// `"always"` or an interval like `"100ms"`.
    pub fsync: Option<String>,
    /// How long records are kept; forever when absent.
    pub retention_ms: Option<u64>,
    /// The declared fields, in file order; empty for an untyped topic (JSON access only).
    pub fields: Vec<Field>,
    /// How models read the topic.
    pub kind: TopicKind,
}

/// How models read a topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicKind {
    /// Every record is an event.
    #[default]
    Stream,
    /// A changelog: the latest record per key is the current row. Joined to a stream, it is a
    /// dimension looked up by each event.
    Table,
}

/// How a model's table is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Materialization {
    /// Every result row is appended.
    Append,
    /// Rows are keyed; a new row for a key replaces the old one.
    Upsert,
    /// A dimension, slowly changing type 1: the latest row per `key` (by `updated_at` when
    /// given, else the last read), plus a surrogate key.
    Scd1,
    /// A dimension, slowly changing type 2: every version of each `key`, one per `updated_at`,
    /// with `valid_from`, `valid_to`, `is_current` and a surrogate key per version.
    Scd2,
}

impl Materialization {
    /// Whether the model is a slowly changing dimension (`scd1` or `scd2`).
    pub fn is_dimension(self) -> bool {
        matches!(self, Materialization::Scd1 | Materialization::Scd2)
    }
}

/// A model's `<name>.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ModelConfig {
    /// Absent: `upsert` for a GROUP BY (keyed by the group keys), `append` otherwise.
    pub materialization: Option<Materialization>,
    /// Upsert key columns; absent: the GROUP BY keys. A dimension's business key.
    pub key: Vec<String>,
    /// A dimension's column saying when a row's values took effect (`scd2`: required, the
    /// versions' `valid_from`; `scd1`: which row is the latest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    /// The name of a dimension's surrogate key column; absent: `<model name>_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub surrogate_key: Option<String>,
    /// Partition transforms of the table, e.g. `day(ts)`, `region`.
    pub partition_by: Vec<String>,
    /// The column that carries event time, for windows and watermarks.
    pub event_time: Option<String>,
    /// How late an event may arrive before its window closes without it.
    pub watermark_ms: Option<u64>,
    /// How long (in event time) a deduplicated key is remembered, to drop later duplicates.
    pub dedup_horizon_ms: Option<u64>,
    /// How a deploy compares a new version with the old before the cutover. Not part of the
    /// model's logic, so not of its version: changing it replays nothing.
    #[serde(skip)]
    pub audit: Audit,
    /// Output column → how its values are masked. Part of the logic: a new mask replays.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub mask: BTreeMap<String, Mask>,
    /// `[[expect]]`. Only those of severity "drop" change what the table holds, so only they
    /// are part of the version.
    #[serde(serialize_with = "serialize_drops", skip_serializing_if = "no_drops")]
    pub expectations: Vec<crate::expect::Expectation>,
}

fn no_drops(expectations: &[crate::expect::Expectation]) -> bool {
    !expectations
        .iter()
        .any(|e| e.severity == crate::expect::Severity::Drop)
}

fn serialize_drops<S: serde::Serializer>(
    expectations: &[crate::expect::Expectation],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(
        expectations
            .iter()
            .filter(|e| e.severity == crate::expect::Severity::Drop),
    )
}

/// A model's `[audit]`: what a deploy compares between the old and the new version's tables
/// before switching readers, side by side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audit {
    /// The columns whose sums are compared (besides the row count); empty: every numeric
    /// column but identifiers (`id`, `…_id`, `…_key`).
    pub columns: Vec<String>,
    /// A SQL predicate choosing the rows compared (a period, say); absent: all rows.
    pub filter: Option<String>,
    /// The largest change of a measure, in basis points of the old value, that lets the
    /// cutover go on; absent: any change does (the audit only reports).
    pub max_change_bp: Option<u64>,
}

/// What a model reads.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "lowercase")]
pub enum Input {
    Topic(String),
    /// `layer.name`.
    Model(String),
}

/// One model: a SELECT that becomes the table `layer.name`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Model {
    pub layer: String,
    pub name: String,
    /// The `.sql` file.
    pub file: String,
    pub sql: String,
    pub config: ModelConfig,
    /// Every topic and model it reads, without repeats.
    pub inputs: Vec<Input>,
    /// Its SQL ends in one GROUP BY (or DISTINCT) without a window over time
    /// ([`crate::sql::ParsedModel`]) and its configuration does not say `append` or a
    /// dimension: its table holds one row per group, upserted in place.
    #[serde(skip)]
    pub groups: bool,
}

impl Project {
    /// Whether `model_id` is a slowly changing dimension, which the models reading it look
    /// up rather than recompute as a stream.
    pub fn is_dimension(&self, model_id: &str) -> bool {
        self.models.get(model_id).is_some_and(|m| {
            m.config
                .materialization
                .is_some_and(Materialization::is_dimension)
        })
    }

    /// Whether `reader` looks `model_id` up — reads the rows it published, whole, as each of
    /// its micro-batches finds them — rather than reading it as a stream of rows: `model_id`
    /// is a dimension, or keeps one row per group (a GROUP BY) and `reader` reads it beside a
    /// stream (a topic that is not of kind "table", or a model that neither is a dimension nor
    /// groups).
    pub fn looks_up(&self, reader: &str, model_id: &str) -> bool {
        if self.is_dimension(model_id) {
            return true;
        }
        let (Some(reader), Some(model)) = (self.models.get(reader), self.models.get(model_id))
        else {
            return false;
        };
        model.groups
            && reader.inputs.iter().any(|input| match input {
                Input::Topic(t) => self.topics.contains_key(t) && !self.is_table_topic(t),
                Input::Model(m) => m != model_id && !self.upserts(m),
            })
    }

    /// Whether `model_id`'s table is upserted in place: a dimension, or a GROUP BY.
    pub fn upserts(&self, model_id: &str) -> bool {
        self.is_dimension(model_id) || self.models.get(model_id).is_some_and(|m| m.groups)
    }

    /// Whether `topic` is of kind "table" (its records are the current rows of something).
    pub fn is_table_topic(&self, topic: &str) -> bool {
        self.topics
            .get(topic)
            .is_some_and(|spec| spec.kind == TopicKind::Table)
    }

    /// The models whose published tables `model_id` reads ([`Project::reads_tables`]), followed
    /// down: the one it reads, the one that one reads, and so on (empty: it reads its topics).
    /// The walk stops at a model that reads two tables (a join of two models).
    pub fn table_chain(&self, model_id: &str) -> Vec<&str> {
        let mut chain = Vec::new();
        let mut at = model_id;
        // A model reads only models before it in `order`, so the walk ends; the bound keeps a
        // map that says otherwise from looping.
        while let Some([upstream]) = self.reads_tables.get(at).map(Vec::as_slice)
            && chain.len() < self.models.len()
        {
            chain.push(upstream.as_str());
            at = upstream;
        }
        chain
    }

    /// The models `model_id` looks up ([`Project::looks_up`]), itself or through the models it
    /// recomputes.
    pub fn dimension_models(&self, model_id: &str) -> BTreeSet<String> {
        self.reachable(model_id, &|reader, m| !self.looks_up(reader, m))
            .looked_up
    }

    /// The topics `model_id` reads as streams or table topics: [`Project::source_topics`]
    /// without those it reaches only through the models it looks up.
    pub fn stream_topics(&self, model_id: &str) -> BTreeSet<String> {
        self.reachable(model_id, &|reader, m| !self.looks_up(reader, m))
            .topics
    }

    /// Whether `model_id` recomputes `other`: reads it, directly or through other models, and
    /// not only by looking it up.
    pub fn recomputes(&self, model_id: &str, other: &str) -> bool {
        self.reachable(model_id, &|reader, m| !self.looks_up(reader, m))
            .walked
            .contains(other)
    }

    /// The topics a model's rows come from, through the models it reads.
    pub fn source_topics(&self, model_id: &str) -> BTreeSet<String> {
        self.reachable(model_id, &|_, _| true).topics
    }

    /// Whether `model_id` reads `other`, directly or through other models.
    pub fn reads_transitively(&self, model_id: &str, other: &str) -> bool {
        self.reachable(model_id, &|_, _| true)
            .walked
            .contains(other)
    }

    /// What `model_id` reads: its inputs, and the inputs of each model read that `through`
    /// (given the reader and the model it reads) lets the walk go into.
    pub fn reachable(&self, model_id: &str, through: &dyn Fn(&str, &str) -> bool) -> Reached {
        let mut reached = Reached::default();
        let mut pending = vec![model_id.to_owned()];
        let mut seen = BTreeSet::new();
        while let Some(id) = pending.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            let Some(model) = self.models.get(&id) else {
                continue;
            };
            for input in &model.inputs {
                match input {
                    Input::Topic(t) => {
                        reached.topics.insert(t.clone());
                    }
                    Input::Model(m) if through(&id, m) => {
                        reached.walked.insert(m.clone());
                        pending.push(m.clone());
                    }
                    Input::Model(m) => {
                        reached.looked_up.insert(m.clone());
                    }
                }
            }
        }
        // A model read both ways is recomputed (and the lookup of it refused when planned).
        reached.looked_up.retain(|m| !reached.walked.contains(m));
        reached
    }
}

/// What a walk over the models a model reads found ([`Project::reachable`]).
#[derive(Debug, Default)]
pub struct Reached {
    /// Every topic named by the models walked into.
    pub topics: BTreeSet<String>,
    /// The models walked into.
    pub walked: BTreeSet<String>,
    /// The models read but not walked into.
    pub looked_up: BTreeSet<String>,
}

impl Model {
    /// `layer.name`, the model's table name.
    pub fn id(&self) -> String {
        format!("{}.{}", self.layer, self.name)
    }
}

/// A project folder that passed every structural check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Project {
    pub config: ProjectConfig,
    pub topics: BTreeMap<String, TopicSpec>,
    /// By `layer.name`.
    pub models: BTreeMap<String, Model>,
    /// Model ids, every model after the models it reads.
    pub order: Vec<String>,
    /// Models that read the committed tables of the models they read, instead of recomputing
    /// them from their topics: model → those upstream models (one; two, sorted by name, when it
    /// joins two models). Not from the files: kappa-server's deployer
    /// chooses it for each model whose shape runs over the tables, and the deployment
    /// records it.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub reads_tables: BTreeMap<String, Vec<String>>,
}

/// The `.sql` and `.toml` paths of one model, as found.
type ModelFiles<'a> = (Option<&'a str>, Option<&'a str>);

/// Reads a project folder's files, reporting every problem found (not only the first).
pub fn load(files: &ProjectFiles) -> Result<Project, Vec<Diagnostic>> {
    let mut diagnostics = Vec::new();
    let config = match files.get(PROJECT_FILE) {
        Some(text) => {
            parse_toml::<ProjectConfig>(PROJECT_FILE, text, &mut diagnostics).unwrap_or_default()
        }
        None => {
            diagnostics.push(Diagnostic::in_file(
                PROJECT_FILE,
                "no kappa.toml here: not a kappa project folder; `kappa init DIR` creates one",
            ));
            ProjectConfig::default()
        }
    };
    if let Err(message) = config.deploy.retention_ms() {
        diagnostics.push(Diagnostic::in_file(PROJECT_FILE, message));
    }
    for hook in &config.alerts.webhooks {
        if !(hook.url.starts_with("http://") || hook.url.starts_with("https://")) {
            diagnostics.push(Diagnostic::in_file(
                PROJECT_FILE,
                format!(
                    "alerts.webhooks: `{}` is not an http:// or https:// URL",
                    hook.url
                ),
            ));
        }
    }
    for problem in log_problems(&config.log) {
        diagnostics.push(Diagnostic::in_file(PROJECT_FILE, problem));
    }
    if config.masking.secret.is_some() {
        diagnostics.push(Diagnostic::in_file(
            PROJECT_FILE,
            format!(
                "masking.secret: the key of the hash mask is never stored in the project \
                 folder; put it in the environment variable {} (or name another with \
                 masking.secret_env)",
                config.masking.secret_env()
            ),
        ));
    }

    let mut topics = BTreeMap::new();
    // Every topic file names a topic, also one with errors (which are reported on their own):
    // models reading it get no second, misleading "no topic" error.
    let mut topic_names = BTreeSet::new();
    // (layer, name) → (the .sql file, the .toml file)
    let mut model_files: BTreeMap<(String, String), ModelFiles<'_>> = BTreeMap::new();
    for (path, text) in files {
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["topics", file] if file.ends_with(".toml") => {
                let name = file.trim_end_matches(".toml");
                topic_names.insert(name.to_owned());
                if let Some(topic) = parse_topic(name, path, text, &mut diagnostics) {
                    topics.insert(name.to_owned(), topic);
                }
            }
            ["models", layer, file] if file.ends_with(".sql") || file.ends_with(".toml") => {
                let (name, is_sql) = match file.strip_suffix(".sql") {
                    Some(name) => (name, true),
                    None => (file.trim_end_matches(".toml"), false),
                };
                let entry = model_files
                    .entry(((*layer).to_owned(), name.to_owned()))
                    .or_default();
                if is_sql {
                    entry.0 = Some(path.as_str());
                } else {
                    entry.1 = Some(path.as_str());
                }
            }
            _ => {}
        }
    }

    let mut models = BTreeMap::new();
    let mut parsed = Vec::new();
    for ((layer, name), (sql_path, toml_path)) in &model_files {
        let Some(sql_path) = sql_path else {
            if let Some(toml_path) = toml_path {
                diagnostics.push(Diagnostic::in_file(
                    toml_path,
                    format!("configuration without a model: there is no models/{layer}/{name}.sql"),
                ));
            }
            continue;
        };
        for (what, value) in [("layer", layer), ("model", name)] {
            if !is_identifier(value) {
                diagnostics.push(Diagnostic::in_file(
                    sql_path,
                    format!(
                        "{what} name `{value}` must be lowercase letters, digits and `_`, starting with a letter, so that SQL can name it unquoted"
                    ),
                ));
            }
        }
        if layer == BRONZE_LAYER && topic_names.contains(name) {
            diagnostics.push(Diagnostic::in_file(
                sql_path,
                format!(
                    "`bronze.{name}` is the table kappa keeps of topic `{name}`: its records \
                     exactly as they arrived; name this model otherwise (silver.{name}, say)"
                ),
            ));
        }
        let config = toml_path
            .and_then(|p| parse_model_config(p, &files[p], &mut diagnostics))
            .unwrap_or_default();
        let sql = files[*sql_path].clone();
        if let Some(model) = crate::sql::parse_model(sql_path, &sql, &mut diagnostics) {
            parsed.push((
                layer.clone(),
                name.clone(),
                sql_path.to_string(),
                sql,
                config,
                model,
            ));
        }
    }
    let model_ids: BTreeSet<String> = parsed.iter().map(|(l, n, ..)| format!("{l}.{n}")).collect();
    for (layer, name, file, sql, config, query) in parsed {
        for e in &config.expectations {
            if let crate::expect::Check::Relationships { to, .. } = &e.check
                && !model_ids.contains(to)
            {
                diagnostics.push(Diagnostic::in_file(
                    &file.replace(".sql", ".toml"),
                    format!(
                        "expectation `{}`: relationships names `{to}`, which is no model{}",
                        e.name,
                        did_you_mean(to, model_ids.iter().map(String::as_str))
                            .map(|m| format!("; {m}"))
                            .unwrap_or_default()
                    ),
                ));
            }
        }
        let mut inputs = BTreeSet::new();
        for relation in &query.relations {
            match resolve(relation, &topic_names, &model_ids) {
                Ok(input) => {
                    inputs.insert(input);
                }
                Err((message, suggestion)) => {
                    let (line, column) = relation.line_column;
                    diagnostics.push(Diagnostic {
                        file: file.clone(),
                        line,
                        column,
                        message,
                        suggestion,
                    });
                }
            }
        }
        let groups = match config.materialization {
            None => query.groups && !query.calls_window,
            // Upserted even when its keys hold a window.
            Some(Materialization::Upsert) => query.groups,
            Some(_) => false,
        };
        let model = Model {
            layer,
            name,
            file,
            sql,
            config,
            inputs: inputs.into_iter().collect(),
            groups,
        };
        models.insert(model.id(), model);
    }

    let reads: BTreeMap<String, Vec<String>> = models
        .iter()
        .map(|(id, model)| {
            let upstream = model.inputs.iter().filter_map(|input| match input {
                Input::Model(upstream) => Some(upstream.clone()),
                Input::Topic(_) => None,
            });
            (id.clone(), upstream.collect())
        })
        .collect();
    let order = match crate::dag::order(&reads) {
        Ok(order) => order,
        Err(cycle) => {
            let first = &models[&cycle[0]];
            diagnostics.push(Diagnostic::in_file(
                &first.file,
                format!("models read each other in a cycle: {}", cycle.join(" → ")),
            ));
            Vec::new()
        }
    };
    if diagnostics.is_empty() {
        Ok(Project {
            config,
            topics,
            models,
            order,
            reads_tables: BTreeMap::new(),
        })
    } else {
        diagnostics.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        Err(diagnostics)
    }
}

/// Whether `s` can be used unquoted as a SQL identifier.
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn resolve(
    relation: &crate::sql::Relation,
    topics: &BTreeSet<String>,
    models: &BTreeSet<String>,
) -> Result<Input, (String, Option<String>)> {
    let everything = || {
        topics
            .iter()
            .map(String::as_str)
            .chain(models.iter().map(String::as_str))
    };
    match relation.parts.as_slice() {
        [topic] if topics.contains(topic) => Ok(Input::Topic(topic.clone())),
        [name] => {
            let suffix = format!(".{name}");
            let same_name: Vec<&str> = models
                .iter()
                .filter(|m| m.ends_with(&suffix))
                .map(String::as_str)
                .collect();
            if same_name.is_empty() {
                Err((
                    format!("no topic or model `{name}`"),
                    did_you_mean(name, everything()),
                ))
            } else {
                let message = format!("no topic `{name}`; models are read by layer and name");
                Err((
                    message,
                    Some(format!("did you mean `{}`?", same_name.join("` or `"))),
                ))
            }
        }
        [layer, model] => {
            let id = format!("{layer}.{model}");
            if models.contains(&id) {
                Ok(Input::Model(id))
            } else if layer == BRONZE_LAYER && topics.contains(model) {
                Err((
                    format!(
                        "`{id}` is the table of topic `{model}`'s raw records (bytes), which \
                         models do not read"
                    ),
                    Some(format!("read the topic, typed by its schema: FROM {model}")),
                ))
            } else {
                Err((format!("no model `{id}`"), did_you_mean(&id, everything())))
            }
        }
        parts => Err((
            format!(
                "`{}`: name a topic (`orders`) or a model (`silver.orders`)",
                parts.join(".")
            ),
            None,
        )),
    }
}

/// Parses a TOML file, reporting a syntax or shape error at its place.
fn parse_toml<T: serde::de::DeserializeOwned>(
    file: &str,
    text: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<T> {
    match toml::from_str::<T>(text) {
        Ok(value) => Some(value),
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            diagnostics.push(Diagnostic::at_byte(
                file,
                text,
                offset,
                e.message().trim().to_owned(),
            ));
            None
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopic {
    #[serde(default = "one")]
    partitions: Spanned<u32>,
    key: Option<Spanned<String>>,
    fsync: Option<Spanned<String>>,
    retention: Option<Spanned<String>>,
    kind: Option<Spanned<TopicKind>>,
    #[serde(default)]
    schema: IndexMap<String, Spanned<RawField>>,
}

fn one() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawField {
    Type(String),
    Detailed(RawFieldTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFieldTable {
    #[serde(rename = "type")]
    data_type: String,
    #[serde(default = "yes")]
    required: bool,
}

fn yes() -> bool {
    true
}

fn parse_topic(
    name: &str,
    file: &str,
    text: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<TopicSpec> {
    let raw: RawTopic = parse_toml(file, text, diagnostics)?;
    let before = diagnostics.len();
    let at =
        |span: Range<usize>, message: String| Diagnostic::at_byte(file, text, span.start, message);
    if name.is_empty()
        || name.len() > 249
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        diagnostics.push(Diagnostic::in_file(
            file,
            format!("topic name `{name}` (the file name) must be 1 to 249 ASCII letters, digits, `.`, `_` or `-`"),
        ));
    }
    if *raw.partitions.get_ref() == 0 {
        diagnostics.push(at(
            raw.partitions.span(),
            "a topic needs at least 1 partition".into(),
        ));
    }
    let mut fields = Vec::new();
    for (field, value) in &raw.schema {
        let (type_name, required) = match value.get_ref() {
            RawField::Type(t) => (t.as_str(), true),
            RawField::Detailed(d) => (d.data_type.as_str(), d.required),
        };
        match type_name.parse::<FieldType>() {
            Ok(data_type) => fields.push(Field {
                name: field.clone(),
                data_type,
                required,
            }),
            Err(message) => {
                diagnostics.push(at(value.span(), format!("field `{field}`: {message}")))
            }
        }
    }
    if let Some(key) = &raw.key
        && !raw.schema.is_empty()
        && !raw.schema.contains_key(key.get_ref())
    {
        diagnostics.push(
            at(
                key.span(),
                format!("key field `{}` is not in the schema", key.get_ref()),
            )
            .with_suggestion(did_you_mean(
                key.get_ref(),
                raw.schema.keys().map(String::as_str),
            )),
        );
    }
    let kind = raw.kind.as_ref().map(|k| *k.get_ref()).unwrap_or_default();
    let kind_span = raw.kind.as_ref().map_or(0..0, Spanned::span);
    if kind == TopicKind::Table && raw.key.is_none() {
        diagnostics.push(at(
            kind_span.clone(),
            "a topic of kind \"table\" needs a `key`: the field whose latest record is the row"
                .into(),
        ));
    }
    if kind == TopicKind::Table && raw.schema.is_empty() {
        diagnostics.push(at(
            kind_span,
            "a topic of kind \"table\" needs a [schema], so its key can be read".into(),
        ));
    }
    if let Some(fsync) = &raw.fsync
        && fsync.get_ref() != "always"
        && humantime::parse_duration(fsync.get_ref()).is_err()
    {
        diagnostics.push(at(
            fsync.span(),
            format!(
                "fsync `{}` is neither \"always\" nor an interval like \"100ms\"",
                fsync.get_ref()
            ),
        ));
    }
    let retention_ms = match &raw.retention {
        None => None,
        Some(r) => match humantime::parse_duration(r.get_ref()) {
            Ok(d) => Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            Err(e) => {
                diagnostics.push(at(
                    r.span(),
                    format!(
                        "retention `{}` is not a duration like \"30d\": {e}",
                        r.get_ref()
                    ),
                ));
                None
            }
        },
    };
    (diagnostics.len() == before).then(|| TopicSpec {
        name: name.to_owned(),
        file: file.to_owned(),
        partitions: *raw.partitions.get_ref(),
        key: raw.key.map(Spanned::into_inner),
        fsync: raw.fsync.map(Spanned::into_inner),
        retention_ms,
        fields,
        kind,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModelConfig {
    materialization: Option<Materialization>,
    #[serde(default)]
    key: Vec<String>,
    updated_at: Option<String>,
    surrogate_key: Option<String>,
    #[serde(default)]
    partition_by: Vec<String>,
    event_time: Option<String>,
    watermark: Option<Spanned<String>>,
    dedup_horizon: Option<Spanned<String>>,
    audit: Option<RawAudit>,
    #[serde(default)]
    mask: BTreeMap<String, Mask>,
    #[serde(default)]
    expect: Vec<Spanned<crate::expect::RawExpectation>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    #[serde(default)]
    columns: Vec<String>,
    #[serde(rename = "where")]
    filter: Option<String>,
    max_change: Option<Spanned<String>>,
}

/// `"5%"` or `"0.5 %"` as basis points.
fn percent_bp(text: &str) -> Option<u64> {
    let number: f64 = text.trim().strip_suffix('%')?.trim().parse().ok()?;
    (number.is_finite() && number >= 0.0).then(|| (number * 100.0).round() as u64)
}

fn parse_model_config(
    file: &str,
    text: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<ModelConfig> {
    let raw: RawModelConfig = parse_toml(file, text, diagnostics)?;
    let duration = |key: &str,
                    value: &Option<Spanned<String>>,
                    diagnostics: &mut Vec<Diagnostic>| match value {
        None => Ok(None),
        Some(w) => match humantime::parse_duration(w.get_ref()) {
            Ok(d) => Ok(Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))),
            Err(e) => {
                let message = format!(
                    "{key} `{}` is not a duration like \"10s\": {e}",
                    w.get_ref()
                );
                diagnostics.push(Diagnostic::at_byte(file, text, w.span().start, message));
                Err(())
            }
        },
    };
    let watermark_ms = duration("watermark", &raw.watermark, diagnostics).ok()?;
    let dedup_horizon_ms = duration("dedup_horizon", &raw.dedup_horizon, diagnostics).ok()?;
    let audit = match raw.audit {
        None => Audit::default(),
        Some(audit) => {
            let max_change_bp = match &audit.max_change {
                None => None,
                Some(m) => match percent_bp(m.get_ref()) {
                    Some(bp) => Some(bp),
                    None => {
                        let message = format!(
                            "audit.max_change `{}` is not a percentage like \"5%\"",
                            m.get_ref()
                        );
                        diagnostics.push(Diagnostic::at_byte(file, text, m.span().start, message));
                        return None;
                    }
                },
            };
            Audit {
                columns: audit.columns,
                filter: audit.filter.filter(|f| !f.trim().is_empty()),
                max_change_bp,
            }
        }
    };
    let dimension = raw.materialization.filter(|m| m.is_dimension());
    let problem = match (dimension, &raw.updated_at, &raw.surrogate_key) {
        (Some(_), _, _) if raw.key.is_empty() => Some(
            "a dimension (materialization = \"scd1\" or \"scd2\") needs its business key: \
             key = [\"<column>\"]",
        ),
        (Some(Materialization::Scd2), None, _) => Some(
            "materialization = \"scd2\" needs updated_at = \"<column>\": the column saying \
             when each row's values took effect, which becomes its version's valid_from",
        ),
        (None, Some(_), _) | (None, _, Some(_)) => Some(
            "updated_at and surrogate_key are for dimensions: materialization = \"scd1\" or \
             \"scd2\"",
        ),
        _ => None,
    };
    if let Some(problem) = problem {
        diagnostics.push(Diagnostic::in_file(file, problem.to_owned()));
        return None;
    }
    Some(ModelConfig {
        materialization: raw.materialization,
        updated_at: raw.updated_at,
        surrogate_key: raw.surrogate_key,
        key: raw.key,
        partition_by: raw.partition_by,
        event_time: raw.event_time,
        watermark_ms,
        dedup_horizon_ms,
        audit,
        mask: raw.mask,
        expectations: crate::expect::read(file, text, raw.expect, diagnostics),
    })
}

#[cfg(test)]
mod tests {
    use expect_test::expect;

    use super::*;
    use crate::log_section::LogBackend;

    fn files(list: &[(&str, &str)]) -> ProjectFiles {
        list.iter()
            .map(|(p, c)| ((*p).to_owned(), (*c).to_owned()))
            .collect()
    }

    fn report(list: &[(&str, &str)]) -> String {
        match load(&files(list)) {
            Ok(project) => format!("ok: {}", project.order.join(" → ")),
            Err(diagnostics) => diagnostics.iter().map(|d| format!("{d}\n")).collect(),
        }
    }

    const ORDERS: &str = "partitions = 2\nkey = \"customer_id\"\n\n[schema]\ncustomer_id = \"string\"\nquantity = \"int\"\n";

    /// A GROUP BY is looked up by a model that reads it beside a stream (so its topic is none
    /// of that model's streams), and read whole by one that reads only it.
    #[test]
    fn a_group_by_beside_a_stream_is_looked_up() {
        let project = load(&files(&[
            ("kappa.toml", "[project]\nname = \"x\"\n"),
            ("topics/orders.toml", ORDERS),
            ("topics/visits.toml", "[schema]\ncustomer_id = \"string\"\n"),
            (
                "models/silver/orders.sql",
                "SELECT customer_id, quantity FROM orders WHERE quantity > 0",
            ),
            (
                "models/gold/totals.sql",
                "SELECT customer_id, sum(quantity) AS q FROM silver.orders GROUP BY customer_id",
            ),
            (
                "models/gold/visits.sql",
                "SELECT v.customer_id, t.q FROM visits v JOIN gold.totals t USING (customer_id)",
            ),
            (
                "models/gold/lines.sql",
                "SELECT o.customer_id, t.q FROM silver.orders o JOIN gold.totals t USING (customer_id)",
            ),
            ("models/gold/top.sql", "SELECT max(q) AS q FROM gold.totals"),
        ]))
        .expect("the project loads");
        assert!(project.models["gold.totals"].groups);
        assert!(!project.models["silver.orders"].groups);
        assert!(project.looks_up("gold.visits", "gold.totals"));
        assert!(project.looks_up("gold.lines", "gold.totals"));
        assert!(!project.looks_up("gold.top", "gold.totals"));
        let set = |names: &[&str]| {
            names
                .iter()
                .map(|n| (*n).to_owned())
                .collect::<BTreeSet<_>>()
        };
        assert_eq!(project.stream_topics("gold.visits"), set(&["visits"]));
        assert_eq!(
            project.dimension_models("gold.visits"),
            set(&["gold.totals"])
        );
        assert_eq!(project.stream_topics("gold.lines"), set(&["orders"]));
        assert!(project.recomputes("gold.lines", "silver.orders"));
        assert!(!project.recomputes("gold.lines", "gold.totals"));
        assert_eq!(project.stream_topics("gold.top"), set(&["orders"]));
        assert!(project.reads_transitively("gold.visits", "silver.orders"));
    }

    #[test]
    fn an_audit_is_read_and_is_not_part_of_the_logic() {
        let sql = (
            "models/gold/a.sql",
            "SELECT customer_id, quantity FROM orders",
        );
        let audited =
            "[audit]\ncolumns = [\"quantity\"]\nwhere = \"quantity > 1\"\nmax_change = \"2.5%\"\n";
        let project = load(&files(&[
            ("kappa.toml", "[project]\nname = \"x\"\n"),
            ("topics/orders.toml", ORDERS),
            sql,
            ("models/gold/a.toml", audited),
        ]))
        .expect("the project loads");
        let config = &project.models["gold.a"].config;
        assert_eq!(
            config.audit,
            Audit {
                columns: vec!["quantity".into()],
                filter: Some("quantity > 1".into()),
                max_change_bp: Some(250),
            }
        );
        assert_eq!(
            toml::to_string(config).expect("TOML"),
            toml::to_string(&ModelConfig::default()).expect("TOML"),
            "the audit is left out of what versions hash"
        );
        let got = report(&[
            ("kappa.toml", "[project]\nname = \"x\"\n"),
            ("topics/orders.toml", ORDERS),
            sql,
            ("models/gold/a.toml", "[audit]\nmax_change = \"a lot\"\n"),
        ]);
        expect![[r#"
            models/gold/a.toml:2:14: audit.max_change `a lot` is not a percentage like "5%"
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn expectations_are_read_named_and_checked() {
        let expectations = "[[expect]]\nnot_null = \"customer_id\"\n\n\
                            [[expect]]\nname = \"small\"\nrange = { column = \"quantity\", max = 100 }\nseverity = \"drop\"\n\n\
                            [[expect]]\naccepted_values = { column = \"customer_id\", values = [\"a\", \"o'b\"] }\nseverity = \"warn\"\n\n\
                            [[expect]]\nunique = [\"customer_id\", \"quantity\"]\n\n\
                            [[expect]]\nrow_count = { min = 1 }\n\n\
                            [[expect]]\nfreshness = { column = \"ts\", max_age = \"1h\" }\n";
        let project = load(&files(&[
            ("kappa.toml", ""),
            ("topics/orders.toml", ORDERS),
            (
                "models/silver/a.sql",
                "SELECT customer_id, quantity FROM orders",
            ),
            ("models/silver/a.toml", expectations),
        ]))
        .expect("loads");
        let got: Vec<String> = project.models["silver.a"]
            .config
            .expectations
            .iter()
            .map(|e| format!("{} {} {:?}", e.name, e.severity.as_str(), e.check))
            .collect();
        expect![[r#"
            [
                "not_null_customer_id fail NotNull { column: \"customer_id\" }",
                "small drop Range { column: \"quantity\", min: None, max: Some(\"100\") }",
                "accepted_values_customer_id warn AcceptedValues { column: \"customer_id\", values: [\"'a'\", \"'o''b'\"] }",
                "unique_customer_id_quantity fail Unique { columns: [\"customer_id\", \"quantity\"] }",
                "row_count fail RowCount { min: Some(1), max: None }",
                "freshness_ts fail Freshness { column: \"ts\", max_age_ms: 3600000 }",
            ]
        "#]].assert_debug_eq(&got);
        let bad = "[[expect]]\nnot_null = \"a\"\nunique = \"a\"\n\n\
                   [[expect]]\nseverity = \"warn\"\n\n\
                   [[expect]]\nrow_count = { min = 1 }\nseverity = \"drop\"\n\n\
                   [[expect]]\nrelationships = { column = \"customer_id\", to = \"silver.b\" }\n\n\
                   [[expect]]\nrange = { column = \"quantity\", min = [1] }\n\n\
                   [[expect]]\nfreshness = { column = \"ts\", max_age = \"soon\" }\n";
        let got = report(&[
            ("kappa.toml", ""),
            ("topics/orders.toml", ORDERS),
            (
                "models/silver/a.sql",
                "SELECT customer_id, quantity FROM orders",
            ),
            ("models/silver/a.toml", bad),
        ]);
        expect![[r#"
            models/silver/a.toml:1:1: an [[expect]] checks one thing, this one not_null and unique: write one [[expect]] each
            models/silver/a.toml:1:1: expectation `relationships_customer_id`: relationships names `silver.b`, which is no model; did you mean `silver.a`?
            models/silver/a.toml:5:1: an [[expect]] says what it checks: one of not_null, accepted_values, range, row, unique, relationships, row_count, freshness, query
            models/silver/a.toml:10:12: severity "drop" routes failing rows to quarantine, but row_count checks the whole table: use "warn" or "fail"
            models/silver/a.toml:15:1: range: [1] is not a value a column holds
            models/silver/a.toml:18:1: freshness: max_age `soon` is not a duration like "1h": expected number at 0
        "#]].assert_eq(&got);
    }

    #[test]
    fn masks_are_read_their_key_is_refused_in_the_folder() {
        let sql = ("models/silver/a.sql", "SELECT customer_id FROM orders");
        let project = load(&files(&[
            ("kappa.toml", "[masking]\nsecret_env = \"SHOP_KEY\"\n"),
            ("topics/orders.toml", ORDERS),
            sql,
            ("models/silver/a.toml", "[mask]\ncustomer_id = \"hash\"\n"),
        ]))
        .expect("loads");
        assert_eq!(project.config.masking.secret_env(), "SHOP_KEY");
        let config = &project.models["silver.a"].config;
        assert_eq!(config.mask["customer_id"], Mask::Hash);
        assert_ne!(
            toml::to_string(config).expect("TOML"),
            toml::to_string(&ModelConfig::default()).expect("TOML"),
            "masks change what a model outputs, so its version"
        );
        let got = report(&[
            ("kappa.toml", "[masking]\nsecret = \"hunter2\"\n"),
            ("topics/orders.toml", ORDERS),
            sql,
            (
                "models/silver/a.toml",
                "[mask]\ncustomer_id = \"scramble\"\n",
            ),
        ]);
        expect![[r#"
            kappa.toml:1:1: masking.secret: the key of the hash mask is never stored in the project folder; put it in the environment variable KAPPA_HASH_SECRET (or name another with masking.secret_env)
            models/silver/a.toml:2:15: unknown variant `scramble`, expected one of `mask_email`, `hash`, `redact`, `truncate_date`, `last4`
        "#]].assert_eq(&got);
    }

    #[test]
    fn bronze_tables_of_topics_are_kappas() {
        let got = report(&[
            ("kappa.toml", "[project]\nname = \"x\"\n"),
            ("topics/orders.toml", ORDERS),
            ("models/bronze/orders.sql", "SELECT * FROM orders"),
            ("models/bronze/typed.sql", "SELECT * FROM orders"),
            ("models/silver/a.sql", "SELECT * FROM bronze.orders"),
        ]);
        expect![[r#"
            models/bronze/orders.sql:1:1: `bronze.orders` is the table kappa keeps of topic `orders`: its records exactly as they arrived; name this model otherwise (silver.orders, say)
        "#]]
        .assert_eq(&got);
        let got = report(&[
            ("kappa.toml", "[project]\nname = \"x\"\n"),
            ("topics/orders.toml", ORDERS),
            ("models/silver/a.sql", "SELECT * FROM bronze.orders"),
        ]);
        expect![[r#"
            models/silver/a.sql:1:15: `bronze.orders` is the table of topic `orders`'s raw records (bytes), which models do not read; read the topic, typed by its schema: FROM orders
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn dimensions_need_a_key_and_scd2_its_time() {
        let sql = |name: &'static str| -> (&'static str, &'static str) {
            (name, "SELECT customer_id, quantity FROM orders")
        };
        let got = report(&[
            ("kappa.toml", "[project]\nname = \"x\"\n"),
            ("topics/orders.toml", ORDERS),
            sql("models/gold/a.sql"),
            ("models/gold/a.toml", "materialization = \"scd1\"\n"),
            sql("models/gold/b.sql"),
            (
                "models/gold/b.toml",
                "materialization = \"scd2\"\nkey = [\"customer_id\"]\n",
            ),
            sql("models/gold/c.sql"),
            ("models/gold/c.toml", "updated_at = \"quantity\"\n"),
        ]);
        expect![[r#"
            models/gold/a.toml:1:1: a dimension (materialization = "scd1" or "scd2") needs its business key: key = ["<column>"]
            models/gold/b.toml:1:1: materialization = "scd2" needs updated_at = "<column>": the column saying when each row's values took effect, which becomes its version's valid_from
            models/gold/c.toml:1:1: updated_at and surrogate_key are for dimensions: materialization = "scd1" or "scd2"
        "#]]
        .assert_eq(&got);
        // A model that is no dimension keeps the version it had.
        let plain = ModelConfig::default();
        assert_eq!(
            toml::to_string(&plain).expect("TOML"),
            "key = []\npartition_by = []\n"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_place() {
        let got = report(&[
            (
                "kappa.toml",
                "[project]\nname = \"x\"\n[servr]\nhttp = \"a\"\n",
            ),
            (
                "topics/orders.toml",
                "partitions = 0\nkey = \"custmer_id\"\nfsync = \"sometimes\"\n[schema]\ncustomer_id = \"strng\"\nqty = { type = \"int\", required = false }\n",
            ),
            ("topics/bad topic.toml", "partitions = 1\n"),
            ("topics/broken.toml", "partitions = \n"),
            ("models/silver/a.sql", "SELECT * FROM gold.b"),
            (
                "models/gold/b.sql",
                "SELECT *\nFROM silver.a JOIN ordrs ON true",
            ),
            ("models/gold/c.sql", "SELECT * FROM silver.missing, c"),
            ("models/gold/c.toml", "materialisation = \"append\"\n"),
            ("models/gold/orphan.toml", "materialization = \"append\"\n"),
            ("models/Gold/d.sql", "SELECT 1"),
            ("models/gold/e.sql", "SELEC 1"),
            ("models/gold/f.sql", "SELECT * FROM silver.x.y"),
        ]);
        expect![[r#"
            kappa.toml:3:2: unknown field `servr`, expected one of `project`, `server`, `lakehouse`, `deploy`, `masking`, `alerts`, `log`
            models/Gold/d.sql:1:1: layer name `Gold` must be lowercase letters, digits and `_`, starting with a letter, so that SQL can name it unquoted
            models/gold/b.sql:1:1: models read each other in a cycle: gold.b → silver.a → gold.b
            models/gold/b.sql:2:20: no topic or model `ordrs`; did you mean `orders`?
            models/gold/c.sql:1:15: no model `silver.missing`
            models/gold/c.sql:1:31: no topic `c`; models are read by layer and name; did you mean `gold.c`?
            models/gold/c.toml:1:1: unknown field `materialisation`, expected one of `materialization`, `key`, `updated_at`, `surrogate_key`, `partition_by`, `event_time`, `watermark`, `dedup_horizon`, `audit`, `mask`, `expect`
            models/gold/e.sql:1:1: SQL: Expected: an SQL statement, found: SELEC
            models/gold/f.sql:1:15: `silver.x.y`: name a topic (`orders`) or a model (`silver.orders`)
            models/gold/orphan.toml:1:1: configuration without a model: there is no models/gold/orphan.sql
            topics/bad topic.toml:1:1: topic name `bad topic` (the file name) must be 1 to 249 ASCII letters, digits, `.`, `_` or `-`
            topics/broken.toml:1:14: string values must be quoted, expected literal string
            topics/orders.toml:1:14: a topic needs at least 1 partition
            topics/orders.toml:2:7: key field `custmer_id` is not in the schema; did you mean `customer_id`?
            topics/orders.toml:3:9: fsync `sometimes` is neither "always" nor an interval like "100ms"
            topics/orders.toml:5:15: field `customer_id`: unknown type `strng`; types are: string, boolean, int, bigint, double, decimal(p,s), date, timestamp, json; did you mean `string`?
        "#]]
        .assert_eq(&got);
    }

    #[test]
    fn models_resolve_to_topics_and_models_in_order() {
        let got = report(&[
            ("kappa.toml", ""),
            ("topics/orders.toml", ORDERS),
            (
                "models/gold/by_customer.sql",
                "SELECT customer_id, count(*) FROM silver.orders GROUP BY customer_id",
            ),
            (
                "models/silver/orders.sql",
                "WITH o AS (SELECT * FROM orders) SELECT * FROM o",
            ),
            (
                "models/silver/orders.toml",
                "materialization = \"append\"\nwatermark = \"10s\"\nevent_time = \"ts\"\n",
            ),
        ]);
        expect!["ok: silver.orders → gold.by_customer"].assert_eq(&got);
        let project = load(&files(&[
            ("kappa.toml", ""),
            ("topics/orders.toml", ORDERS),
        ]))
        .unwrap();
        assert_eq!(project.topics["orders"].partitions, 2);
    }

    #[test]
    fn a_kafka_log_is_configured_with_secrets_from_the_environment_only() {
        let kafka = "[log]\nbackend = \"kafka\"\n[log.kafka]\n\"bootstrap.servers\" = \
                     \"127.0.0.1:9092\"\n\"sasl.username\" = \"kappa\"\n\"sasl.password_env\" = \
                     \"KAFKA_PASSWORD\"\n\"socket.timeout.ms\" = 6000\n\"enable.ssl.certificate.verification\" = false\n";
        let project = load(&files(&[
            ("kappa.toml", kafka),
            ("topics/orders.toml", ORDERS),
        ]))
        .expect("loads");
        assert_eq!(project.config.log.backend, LogBackend::Kafka);
        let text: BTreeMap<&str, String> = project
            .config
            .log
            .kafka
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_string()))
            .collect();
        assert_eq!(text["socket.timeout.ms"], "6000");
        assert_eq!(text["enable.ssl.certificate.verification"], "false");
        assert_eq!(text["sasl.password_env"], "KAFKA_PASSWORD");
        let got = report(&[
            (
                "kappa.toml",
                "[log]\nbackend = \"kafka\"\n[log.kafka]\n\"sasl.password\" = \"hunter2\"\n\
                 \"ssl.key.password_env\" = \"not a name\"\nacks = 1\n",
            ),
            ("topics/orders.toml", ORDERS),
        ]);
        expect![[r#"
            kappa.toml:1:1: log.backend = "kafka" needs log.kafka."bootstrap.servers": the cluster's brokers, e.g. "127.0.0.1:9092"
            kappa.toml:1:1: log.kafka."acks" = "1": kappa needs acks = all (it acknowledges a record only once the cluster keeps it, exactly once, where its key belongs)
            kappa.toml:1:1: log.kafka."sasl.password": a secret is never stored in the project folder; name the environment variable that holds it: "sasl.password_env" = "KAFKA_PASSWORD"
            kappa.toml:1:1: log.kafka."ssl.key.password_env": the name of the environment variable that holds ssl.key.password, e.g. "KAFKA_PASSWORD" (found `not a name`)
        "#]]
        .assert_eq(&got);
        let got = report(&[
            (
                "kappa.toml",
                "[log.kafka]\n\"bootstrap.servers\" = \"127.0.0.1:9092\"\n",
            ),
            ("topics/orders.toml", ORDERS),
        ]);
        expect![[r#"
            kappa.toml:1:1: log.kafka is set, but log.backend is "embedded": set backend = "kafka" to use the cluster
        "#]]
        .assert_eq(&got);
        let got = report(&[
            ("kappa.toml", "[log]\nbackend = \"kinesis\"\n"),
            ("topics/orders.toml", ORDERS),
        ]);
        assert!(
            got.contains("unknown variant `kinesis`, expected `embedded` or `kafka`"),
            "{got}"
        );
    }

    #[test]
    fn a_model_named_without_its_layer_gets_a_hint() {
        let got = report(&[
            ("kappa.toml", ""),
            ("topics/orders.toml", ORDERS),
            ("models/silver/clean.sql", "SELECT * FROM orders"),
            ("models/gold/g.sql", "SELECT * FROM clean"),
        ]);
        expect![[r#"
            models/gold/g.sql:1:15: no topic `clean`; models are read by layer and name; did you mean `silver.clean`?
        "#]]
        .assert_eq(&got);
        expect![[r#"
            kappa.toml:1:1: no kappa.toml here: not a kappa project folder; `kappa init DIR` creates one
        "#]]
        .assert_eq(&report(&[]));
    }
}
