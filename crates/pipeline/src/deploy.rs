//! Versions of models, what is deployed, and the plan from one to the other.
//!
//! ```text
//! Project ──versions──► {model: version}      version = hash(normalized SQL, config,
//!                                                       versions of its inputs)
//! Project ──Deployment::of──► Deployment      what `kappa up` runs (saved in the data dir)
//! (Project, Deployment) ──plan──► [ModelPlan] new / changed / downstream / unchanged / removed
//! ```
//!
//! A topic's version is a hash of what models see of it (its fields, key and kind), so a schema
//! change replays the models that read it, as a changed upstream model does.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sqlparser::dialect::GenericDialect;
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Token, Tokenizer};

use crate::project::{Input, Model, Project, ProjectFiles, TopicSpec};

/// What is deployed: every model's version and what it was built from, and the versions of
/// the topics they read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// By `layer.name`.
    pub models: BTreeMap<String, DeployedModel>,
    /// By topic name.
    pub topics: BTreeMap<String, String>,
    /// The project folder's files as deployed, to run the deployed versions again.
    #[serde(default)]
    pub files: ProjectFiles,
    /// The deployment this one replaced (without its own previous), for `kappa rollback`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Box<Deployment>>,
    /// When a deployment stopped serving (ms since the epoch): set on `previous`, whose
    /// versions' tables are dropped once the project's `deploy.retention` has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at_ms: Option<u64>,
    /// On a deploy in progress that is a rollback: the project files it rewrote, as they were,
    /// to put back if it stops without a cutover (also after a restart).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub undo: Vec<FolderFile>,
}

/// A file of a project folder as it was: the folder, its path in it, and its text (`None`:
/// absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderFile {
    pub folder: std::path::PathBuf,
    pub path: String,
    pub text: Option<String>,
}

/// One deployed model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RecordedModel")]
pub struct DeployedModel {
    pub version: String,
    /// The SQL as written.
    pub sql: String,
    /// Its configuration as TOML (what the model's `.toml` means, defaults left out).
    pub config: String,
    pub inputs: Vec<Input>,
    /// The upstream models whose committed tables it reads ([`Project::reads_tables`]), if it
    /// reads any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reads_tables: Vec<String>,
}

/// A [`DeployedModel`] as a record holds it, this kappa's or an earlier one's, which named the
/// one table a model read `reads_table`: read into `reads_tables`, so that the record written
/// back keeps it.
#[derive(Deserialize)]
struct RecordedModel {
    version: String,
    sql: String,
    config: String,
    inputs: Vec<Input>,
    #[serde(default)]
    reads_tables: Vec<String>,
    #[serde(default)]
    reads_table: Option<String>,
}

impl From<RecordedModel> for DeployedModel {
    fn from(recorded: RecordedModel) -> DeployedModel {
        let mut reads_tables = recorded.reads_tables;
        if reads_tables.is_empty() {
            reads_tables.extend(recorded.reads_table);
        }
        DeployedModel {
            version: recorded.version,
            sql: recorded.sql,
            config: recorded.config,
            inputs: recorded.inputs,
            reads_tables,
        }
    }
}

impl Deployment {
    /// The project deployed, read back from its files (`None` when nothing is deployed, or
    /// the files no longer load: a kappa that reads projects differently).
    pub fn project(&self) -> Option<Project> {
        if self.files.is_empty() {
            return None;
        }
        let mut project = crate::load(&self.files).ok()?;
        project.reads_tables = self
            .models
            .iter()
            .map(|(id, m)| (id.clone(), m.reads_tables.clone()))
            .filter(|(_, tables)| !tables.is_empty())
            .filter(|(id, _)| project.models.contains_key(id))
            .collect();
        Some(project)
    }

    /// The deployment that runs `project`, read from `files`.
    pub fn of(project: &Project, files: &ProjectFiles) -> Deployment {
        let versions = versions(project);
        Deployment {
            models: project
                .models
                .iter()
                .map(|(id, model)| {
                    let deployed = DeployedModel {
                        version: versions.get(id).cloned().unwrap_or_default(),
                        sql: model.sql.clone(),
                        config: config_text(model),
                        inputs: model.inputs.clone(),
                        reads_tables: project.reads_tables.get(id).cloned().unwrap_or_default(),
                    };
                    (id.clone(), deployed)
                })
                .collect(),
            topics: project
                .topics
                .iter()
                .map(|(name, topic)| (name.clone(), topic_version(topic)))
                .collect(),
            files: files.clone(),
            previous: None,
            retired_at_ms: None,
            undo: Vec::new(),
        }
    }
}

/// The files of `live` with `model`'s files (its `.sql` and `.toml`) as the previous deployment
/// had them: what `kappa rollback MODEL` deploys. Models reading it change version with it.
pub fn rolled_back(live: &Deployment, model: &str) -> Result<ProjectFiles, String> {
    let Some(previous) = &live.previous else {
        return Err("no earlier deployment is recorded to roll back to".into());
    };
    let (Some(now), Some(before)) = (live.models.get(model), previous.models.get(model)) else {
        return Err(format!(
            "{model} is not in both the live and the previous deployment; \
             add or remove it in the folder and deploy instead"
        ));
    };
    if now.sql == before.sql && now.config == before.config {
        return Err(format!(
            "{model} is the same in the previous deployment: nothing to roll back"
        ));
    }
    let (layer, name) = model.split_once('.').unwrap_or(("", model));
    let mut files = live.files.clone();
    for extension in ["sql", "toml"] {
        let path = format!("models/{layer}/{name}.{extension}");
        match previous.files.get(&path) {
            Some(text) => files.insert(path, text.clone()),
            None => files.remove(&path),
        };
    }
    Ok(files)
}

/// Every model's version, by `layer.name`: a hash of its normalized SQL, its configuration and
/// the versions of its inputs, so that a change reaches every model downstream of it.
pub fn versions(project: &Project) -> BTreeMap<String, String> {
    let mut versions: BTreeMap<String, String> = BTreeMap::new();
    // `order` lists every model after the models it reads.
    for id in &project.order {
        let Some(model) = project.models.get(id) else {
            continue;
        };
        let mut hash = Fnv::new();
        hash.write("sql");
        hash.write(&normalized_sql(&model.sql));
        hash.write("config");
        hash.write(&config_text(model));
        let mut inputs = model.inputs.clone();
        inputs.sort();
        for input in &inputs {
            match input {
                Input::Topic(name) => {
                    hash.write("topic");
                    hash.write(name);
                    hash.write(
                        &project
                            .topics
                            .get(name)
                            .map(topic_version)
                            .unwrap_or_default(),
                    );
                }
                Input::Model(input) => {
                    hash.write("model");
                    hash.write(input);
                    hash.write(versions.get(input).map_or("", String::as_str));
                }
            }
        }
        versions.insert(id.clone(), hash.finish());
    }
    versions
}

/// A topic's version: what models see of it (its fields, key and kind).
pub fn topic_version(topic: &TopicSpec) -> String {
    let mut hash = Fnv::new();
    hash.write(&format!("{:?}", topic.kind));
    hash.write(topic.key.as_deref().unwrap_or(""));
    for field in &topic.fields {
        hash.write(&field.name);
        hash.write(&format!("{:?}", field.data_type));
        hash.write(if field.required {
            "required"
        } else {
            "optional"
        });
    }
    hash.finish()
}

/// The SQL as its tokens: comments, spacing and the case of keywords do not count. Tokens, not
/// the parsed statement printed back, so that a new SQL parser printing differently does not
/// change every version (and replay every model).
pub fn normalized_sql(sql: &str) -> String {
    match Tokenizer::new(&GenericDialect {}, sql).tokenize() {
        Ok(tokens) => tokens
            .iter()
            .filter(|t| !matches!(t, Token::Whitespace(_) | Token::EOF))
            .map(|t| match t {
                Token::Word(w) if w.quote_style.is_none() && w.keyword != Keyword::NoKeyword => {
                    w.value.to_ascii_uppercase()
                }
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => sql.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

/// A model's configuration as TOML, for versions and diffs.
fn config_text(model: &Model) -> String {
    // Plain strings, numbers and lists: the serializer cannot fail on them.
    toml::to_string(&model.config).unwrap_or_else(|_| format!("{:?}", model.config))
}

/// A model's expectations of every severity, one line each (`name (severity): check`): what a
/// [`Change::Checks`] shows as its diff.
fn checks_text(model: &Model) -> String {
    model
        .config
        .expectations
        .iter()
        .map(|e| {
            let check = toml::Value::try_from(&e.check)
                .map_or_else(|_| format!("{:?}", e.check), |v| v.to_string());
            format!("{} ({}): {check}\n", e.name, e.severity.as_str())
        })
        .collect()
}

/// 64-bit FNV-1a over length-prefixed parts: stable across builds and platforms, which std's
/// hasher does not promise.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, part: &str) {
        for byte in (part.len() as u64)
            .to_le_bytes()
            .iter()
            .chain(part.as_bytes())
        {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// What a deploy does to one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// Not deployed yet: built from the beginning of its inputs.
    New,
    /// Its SQL or configuration changed: a new version replays from the beginning.
    Changed,
    /// Unchanged itself, but something it reads changed: a new version replays.
    Downstream,
    /// Only its expectations changed (those that keep no rows out, which are not part of its
    /// version): the deployed version runs on, checking its next commits with them; nothing
    /// replays.
    Checks,
    Unchanged,
    /// Deployed, no longer in the project: stopped, its table kept.
    Removed,
}

impl Change {
    /// Whether a deploy builds a new version of the model from the beginning of its inputs.
    pub fn replays(self) -> bool {
        matches!(self, Change::New | Change::Changed | Change::Downstream)
    }
}

/// One model in a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelPlan {
    pub model: String,
    pub change: Change,
    /// The version deployed, if any.
    pub deployed: Option<String>,
    /// The version the project folder holds, unless removed.
    pub version: Option<String>,
    /// For a changed model: its SQL, line by line, old against new.
    pub sql_diff: Vec<DiffLine>,
    /// For a changed model: its configuration (TOML), line by line.
    pub config_diff: Vec<DiffLine>,
    /// For a model downstream of a change: the inputs that changed (`layer.name` or a topic).
    pub because: Vec<String>,
    /// What it reads.
    pub inputs: Vec<Input>,
}

/// A line of a diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", content = "line", rename_all = "lowercase")]
pub enum DiffLine {
    Same(String),
    Removed(String),
    Added(String),
}

/// What deploying `project` over `deployed` does to each model: the project's models in
/// dependency order, then the removed ones.
pub fn plan(project: &Project, deployed: &Deployment) -> Vec<ModelPlan> {
    let versions = versions(project);
    // The deployed models' full configuration (expectations included), when it still loads.
    let deployed_project = deployed.project();
    let mut plans = Vec::new();
    for id in &project.order {
        let Some(model) = project.models.get(id) else {
            continue;
        };
        let version = versions.get(id).cloned();
        let mut plan = ModelPlan {
            model: id.clone(),
            change: Change::Unchanged,
            deployed: None,
            version: version.clone(),
            sql_diff: Vec::new(),
            config_diff: Vec::new(),
            because: Vec::new(),
            inputs: model.inputs.clone(),
        };
        match deployed.models.get(id) {
            None => plan.change = Change::New,
            Some(old) => {
                plan.deployed = Some(old.version.clone());
                let config = config_text(model);
                if normalized_sql(&old.sql) != normalized_sql(&model.sql) || old.config != config {
                    plan.change = Change::Changed;
                    plan.sql_diff = diff_lines(&old.sql, &model.sql);
                    if old.config != config {
                        plan.config_diff = diff_lines(&old.config, &config);
                    }
                } else if Some(&old.version) != version.as_ref() {
                    plan.change = Change::Downstream;
                    plan.because = changed_inputs(model, project, &versions, deployed);
                } else if let Some(before) =
                    deployed_project.as_ref().and_then(|p| p.models.get(id))
                    && before.config.expectations != model.config.expectations
                {
                    plan.change = Change::Checks;
                    plan.config_diff = diff_lines(&checks_text(before), &checks_text(model));
                }
            }
        }
        plans.push(plan);
    }
    for (id, old) in &deployed.models {
        if !project.models.contains_key(id) {
            plans.push(ModelPlan {
                model: id.clone(),
                change: Change::Removed,
                deployed: Some(old.version.clone()),
                version: None,
                sql_diff: Vec::new(),
                config_diff: Vec::new(),
                because: Vec::new(),
                inputs: old.inputs.clone(),
            });
        }
    }
    plans
}

/// The inputs of `model` whose versions differ from the deployed ones.
fn changed_inputs(
    model: &Model,
    project: &Project,
    versions: &BTreeMap<String, String>,
    deployed: &Deployment,
) -> Vec<String> {
    let mut changed = BTreeSet::new();
    for input in &model.inputs {
        match input {
            Input::Topic(name) => {
                let now = project.topics.get(name).map(topic_version);
                if now.as_ref() != deployed.topics.get(name) {
                    changed.insert(format!("topic {name}"));
                }
            }
            Input::Model(id) => {
                if versions.get(id) != deployed.models.get(id).map(|m| &m.version) {
                    changed.insert(id.clone());
                }
            }
        }
    }
    changed.into_iter().collect()
}

/// A line diff of `old` against `new` (longest common subsequence; model files are short).
pub fn diff_lines(old: &str, new: &str) -> Vec<DiffLine> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // lcs[i][j]: the longest common subsequence of a[i..] and b[j..].
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push(DiffLine::Same(a[i].to_owned()));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            // Removed lines first, as diffs show them.
            out.push(DiffLine::Removed(a[i].to_owned()));
            i += 1;
        } else {
            out.push(DiffLine::Added(b[j].to_owned()));
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ProjectFiles, load};

    fn project(files: &[(&str, &str)]) -> Project {
        let mut all = ProjectFiles::new();
        all.insert("kappa.toml".into(), String::new());
        all.insert(
            "topics/orders.toml".into(),
            "[schema]\nid = \"bigint\"\nregion = \"string\"\namount = \"double\"\n".into(),
        );
        for (path, text) in files {
            all.insert((*path).into(), (*text).into());
        }
        load(&all).expect("a valid project")
    }

    const SILVER: (&str, &str) = (
        "models/silver/orders.sql",
        "SELECT id, region, amount FROM orders",
    );
    const GOLD: (&str, &str) = (
        "models/gold/revenue.sql",
        "SELECT region, sum(amount) AS revenue FROM silver.orders GROUP BY region",
    );

    #[test]
    fn the_tables_a_model_reads_survive_the_record_as_earlier_kappas_wrote_it_too() {
        let mut files = ProjectFiles::new();
        for (path, text) in [("kappa.toml", ""), SILVER, GOLD] {
            files.insert(path.into(), text.into());
        }
        files.insert(
            "topics/orders.toml".into(),
            "[schema]\nid = \"bigint\"\nregion = \"string\"\namount = \"double\"\n".into(),
        );
        let mut running = load(&files).expect("a valid project");
        running
            .reads_tables
            .insert("gold.revenue".into(), vec!["silver.orders".into()]);
        let record = Deployment::of(&running, &files);
        let text = serde_json::to_string(&record).expect("serializes");
        assert!(
            text.contains(r#""reads_tables":["silver.orders"]"#),
            "{text}"
        );
        let read: Deployment = serde_json::from_str(&text).expect("reads back");
        assert_eq!(
            read.project().expect("loads").reads_tables,
            running.reads_tables
        );
        // A record of a kappa that read one table at most named it `reads_table`.
        let legacy = text.replace(
            r#""reads_tables":["silver.orders"]"#,
            r#""reads_table":"silver.orders""#,
        );
        let read: Deployment = serde_json::from_str(&legacy).expect("reads back");
        assert_eq!(
            read.project().expect("loads").reads_tables,
            running.reads_tables
        );
        // Written back (the server rewrites its record), it keeps what was read.
        let again = serde_json::to_string(&read).expect("serializes");
        assert!(
            again.contains(r#""reads_tables":["silver.orders"]"#),
            "{again}"
        );
    }

    #[test]
    fn spacing_comments_and_keyword_case_do_not_change_a_version() {
        let a = versions(&project(&[SILVER]));
        let b = versions(&project(&[(
            "models/silver/orders.sql",
            "-- the clean orders\nselect id,\n       region, amount\n  from orders",
        )]));
        assert_eq!(a, b);
    }

    #[test]
    fn a_change_reaches_every_model_downstream() {
        let before = versions(&project(&[SILVER, GOLD]));
        let after = versions(&project(&[
            (
                "models/silver/orders.sql",
                "SELECT id, region, amount * 2 AS amount FROM orders",
            ),
            GOLD,
        ]));
        assert_ne!(before["silver.orders"], after["silver.orders"]);
        assert_ne!(before["gold.revenue"], after["gold.revenue"]);
        // A topic's schema is an input too.
        let mut files = ProjectFiles::new();
        files.insert("kappa.toml".into(), String::new());
        files.insert(
            "topics/orders.toml".into(),
            "[schema]\nid = \"bigint\"\nregion = \"string\"\namount = \"decimal(10,2)\"\n".into(),
        );
        files.insert(SILVER.0.into(), SILVER.1.into());
        files.insert(GOLD.0.into(), GOLD.1.into());
        let retyped = versions(&load(&files).expect("a valid project"));
        assert_ne!(before["silver.orders"], retyped["silver.orders"]);
        assert_ne!(before["gold.revenue"], retyped["gold.revenue"]);
    }

    #[test]
    fn a_config_change_is_a_change() {
        let before = versions(&project(&[SILVER]));
        let after = versions(&project(&[
            SILVER,
            ("models/silver/orders.toml", "partition_by = [\"region\"]\n"),
        ]));
        assert_ne!(before["silver.orders"], after["silver.orders"]);
    }

    #[test]
    fn normalized_sql_is_its_tokens() {
        assert_eq!(
            normalized_sql("select a,\n  \"B\" -- why\nFROM t where x = 'y'"),
            "SELECT a , \"B\" FROM t WHERE x = 'y'"
        );
    }

    #[test]
    fn a_rollback_takes_one_model_back_and_nothing_else() {
        let files = |gold: &str, silver: &str| {
            let mut all = ProjectFiles::new();
            all.insert("kappa.toml".into(), String::new());
            all.insert(
                "topics/orders.toml".into(),
                "[schema]\nid = \"bigint\"\nregion = \"string\"\namount = \"double\"\n".into(),
            );
            all.insert(SILVER.0.into(), silver.into());
            all.insert(GOLD.0.into(), gold.into());
            all
        };
        let deployment =
            |files: &ProjectFiles| Deployment::of(&load(files).expect("a valid project"), files);
        let v1 = files(GOLD.1, SILVER.1);
        let doubled = GOLD.1.replace("sum(amount)", "2 * sum(amount)");
        let v2 = files(
            &doubled,
            "SELECT id, region, amount FROM orders WHERE amount > 1",
        );
        let mut live = deployment(&v2);
        assert_eq!(
            rolled_back(&live, "gold.revenue"),
            Err("no earlier deployment is recorded to roll back to".into())
        );
        live.previous = Some(Box::new(deployment(&v1)));
        let back = rolled_back(&live, "gold.revenue").expect("a rollback");
        assert_eq!(back[GOLD.0], GOLD.1);
        assert_eq!(back[SILVER.0], v2[SILVER.0], "silver stays as deployed");
        live.previous = Some(Box::new(deployment(&files(&doubled, SILVER.1))));
        assert!(rolled_back(&live, "gold.revenue").is_err_and(|e| e.contains("the same")));
    }

    #[test]
    fn a_line_diff_keeps_the_common_lines() {
        let diff = diff_lines("a\nb\nc\nd", "a\nc\nx\nd");
        assert_eq!(
            diff,
            [
                DiffLine::Same("a".into()),
                DiffLine::Removed("b".into()),
                DiffLine::Same("c".into()),
                DiffLine::Added("x".into()),
                DiffLine::Same("d".into()),
            ]
        );
    }
}
