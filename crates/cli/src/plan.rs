//! `kappa plan`: the project folder against what is deployed — which models are new, changed,
//! downstream of a change, unchanged or removed, and for every replay the history it reads.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use clap::Args;
use kappa_log::StartAt;
use kappa_pipeline::deploy::{Change, DiffLine, ModelPlan};
use kappa_server::client::Client;
use kappa_server::service::ReadRequest;
use serde::Serialize;

use crate::fmt::{bytes, thousands};
use crate::{Global, print_json};

/// Records per second a replay is estimated at: the slowest of the five reference pipelines
/// replaying 10 M events on 2 cores (`kappa-bench pipelines`, docs/benchmarks.md), rounded down.
pub(crate) const ESTIMATE_RECORDS_PER_S: u64 = 500_000;

#[derive(Debug, Args)]
pub(crate) struct PlanArgs {
    /// Print JSON: {"summary": {new, changed, downstream, unchanged, removed, replaying},
    /// "models": [{model, change, deployed?, version?, sql_diff, config_diff, because, inputs,
    /// history: [{topic, records, bytes, first_offsets, first_time?}], reads_tables?: [{model,
    /// rows, replays}], estimated_seconds?}…]}.
    #[arg(long)]
    json: bool,
}

/// A plan with what each replay reads.
#[derive(Debug, Serialize)]
pub(crate) struct PlanReport {
    summary: Summary,
    models: Vec<ModelReport>,
}

#[derive(Debug, Default, Serialize)]
struct Summary {
    new: usize,
    changed: usize,
    downstream: usize,
    /// Models whose expectations alone changed: they run on, checking with the new ones.
    checks: usize,
    unchanged: usize,
    removed: usize,
    /// Models a deploy builds from the beginning of their inputs.
    replaying: usize,
}

#[derive(Debug, Serialize)]
struct ModelReport {
    #[serde(flatten)]
    plan: ModelPlan,
    /// For a replay: the topics it reads from their first kept offset.
    history: Vec<TopicHistory>,
    /// For a replay: its records ÷ [`ESTIMATE_RECORDS_PER_S`].
    estimated_seconds: Option<f64>,
    /// For a replay over upstream models: the tables it reads instead of recomputing those
    /// models (one; two for a join of two models). Its history is then those tables, its own
    /// topics and its own dimensions.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    reads_tables: Vec<UpstreamRead>,
}

/// The published table of an upstream model a replay reads.
#[derive(Debug, Clone, Serialize)]
struct UpstreamRead {
    model: String,
    /// Its rows now (unknown when it cannot be counted).
    rows: Option<u64>,
    /// Whether the upstream replays too (its new version's table is read as it is written).
    replays: bool,
}

/// What a replay reads of one topic.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TopicHistory {
    topic: String,
    records: u64,
    bytes: u64,
    /// The first kept offset of each partition.
    first_offsets: BTreeMap<u32, u64>,
    /// When the first kept record was appended (RFC 3339), if there is one.
    first_time: Option<String>,
}

pub(crate) async fn run(global: &Global, args: PlanArgs) -> anyhow::Result<()> {
    let (_, project) = crate::project::checked(global).await?;
    let client = global.connect().await?;
    let report = report(&client, &project).await;
    client.close().await?;
    let report = report?;
    if args.json {
        print_json(&report)
    } else {
        print!("{}", render(&report));
        Ok(())
    }
}

pub(crate) async fn report(
    client: &Client,
    project: &kappa_pipeline::Project,
) -> anyhow::Result<PlanReport> {
    let deployed = client.deployment().await?;
    let plans = kappa_pipeline::deploy::plan(project, &deployed);
    let table_reads = table_reads(project, &plans).await;
    let plans_replaying: Vec<String> = plans
        .iter()
        .filter(|p| p.change.replays())
        .map(|p| p.model.clone())
        .collect();
    let mut histories: BTreeMap<String, TopicHistory> = BTreeMap::new();
    let mut models = Vec::new();
    for plan in plans {
        let mut history = Vec::new();
        let mut reads_tables = Vec::new();
        if plan.change.replays() {
            let topics = match table_reads.get(&plan.model) {
                Some(upstreams) => {
                    for u in upstreams {
                        reads_tables.push(UpstreamRead {
                            model: u.clone(),
                            rows: count_rows(client, u).await,
                            replays: plans_replaying.contains(u),
                        });
                    }
                    project.models[&plan.model]
                        .inputs
                        .iter()
                        .filter_map(|i| match i {
                            kappa_pipeline::Input::Topic(t) => Some(t.clone()),
                            kappa_pipeline::Input::Model(_) => None,
                        })
                        .collect()
                }
                None => project.stream_topics(&plan.model),
            };
            for topic in topics {
                if !histories.contains_key(&topic) {
                    let found = topic_history(client, &topic).await?;
                    histories.insert(topic.clone(), found);
                }
                history.extend(histories.get(&topic).cloned());
            }
        }
        let table_rows: u64 = reads_tables.iter().filter_map(|r| r.rows).sum();
        let estimated_seconds = plan.change.replays().then(|| {
            (history.iter().map(|h| h.records).sum::<u64>() + table_rows) as f64
                / ESTIMATE_RECORDS_PER_S as f64
        });
        models.push(ModelReport {
            plan,
            history,
            estimated_seconds,
            reads_tables,
        });
    }
    Ok(PlanReport {
        summary: summarize(&models),
        models,
    })
}

fn summarize(models: &[ModelReport]) -> Summary {
    let mut summary = Summary::default();
    for m in models {
        match m.plan.change {
            Change::New => summary.new += 1,
            Change::Changed => summary.changed += 1,
            Change::Downstream => summary.downstream += 1,
            Change::Checks => summary.checks += 1,
            Change::Unchanged => summary.unchanged += 1,
            Change::Removed => summary.removed += 1,
        }
        if m.plan.change.replays() {
            summary.replaying += 1;
        }
    }
    summary
}

/// The models of `plans` a deploy would have read their upstreams' published tables (as
/// `kappa_server::deployer` decides: every model whose shape runs over tables), with those
/// upstreams.
async fn table_reads(
    project: &kappa_pipeline::Project,
    plans: &[ModelPlan],
) -> BTreeMap<String, Vec<String>> {
    let mut reads = BTreeMap::new();
    for plan in plans.iter().filter(|p| p.change.replays()) {
        if let Some(upstream) =
            kappa_engine::upstream::readable_upstream(project, &plan.model).await
        {
            reads.insert(plan.model.clone(), upstream);
        }
    }
    reads
}

/// The rows of `model`'s public table, if it can be counted.
async fn count_rows(client: &Client, model: &str) -> Option<u64> {
    let answer = client
        .sql(&format!("SELECT count(*) FROM {model}"))
        .await
        .ok()?;
    answer.rows.first()?.first()?.as_u64()
}

/// What the log holds of `topic` (nothing, before the topic is created).
async fn topic_history(client: &Client, topic: &str) -> anyhow::Result<TopicHistory> {
    let mut history = TopicHistory {
        topic: topic.to_owned(),
        records: 0,
        bytes: 0,
        first_offsets: BTreeMap::new(),
        first_time: None,
    };
    let Ok(info) = client.topic(topic).await else {
        return Ok(history);
    };
    let mut first_ms: Option<i64> = None;
    for p in &info.partitions {
        history.records += p.visible_offset.saturating_sub(p.start_offset);
        history.bytes += p.size_bytes;
        history.first_offsets.insert(p.partition, p.start_offset);
        if p.visible_offset > p.start_offset {
            let read = client
                .read(
                    topic,
                    ReadRequest {
                        partition: p.partition,
                        start: StartAt::Offset(p.start_offset),
                        max_records: 1,
                        max_bytes: 1 << 20,
                        wait_ms: 0,
                    },
                )
                .await?;
            if let Some(first) = read.records.first() {
                first_ms = Some(first_ms.map_or(first.timestamp_ms, |t| t.min(first.timestamp_ms)));
            }
        }
    }
    history.first_time = first_ms.map(kappa_server::api::format_timestamp);
    Ok(history)
}

/// The plan as text: a summary line, then one block per model (diffs and history under the
/// models a deploy replays).
pub(crate) fn render(report: &PlanReport) -> String {
    let s = &report.summary;
    let mut out = format!(
        "Plan: {} new, {} changed, {} downstream, {}{} unchanged, {} removed; {} to replay.\n",
        s.new,
        s.changed,
        s.downstream,
        if s.checks > 0 {
            format!("{} with changed expectations, ", s.checks)
        } else {
            String::new()
        },
        s.unchanged,
        s.removed,
        s.replaying
    );
    for m in &report.models {
        let p = &m.plan;
        let short = |v: &Option<String>| {
            v.as_deref()
                .map_or("-", |v| &v[..v.len().min(8)])
                .to_owned()
        };
        let (mark, what) = match p.change {
            Change::New => ('+', format!("new, {}", short(&p.version))),
            Change::Changed => (
                '~',
                format!("changed, {} -> {}", short(&p.deployed), short(&p.version)),
            ),
            Change::Downstream => (
                '>',
                format!(
                    "downstream of {}, {} -> {}",
                    p.because.join(", "),
                    short(&p.deployed),
                    short(&p.version)
                ),
            ),
            Change::Checks => (
                '!',
                format!(
                    "expectations changed, {}; runs on and checks its next commits with them, \
                     no replay",
                    short(&p.version)
                ),
            ),
            Change::Unchanged => ('=', format!("unchanged, {}", short(&p.version))),
            Change::Removed => (
                '-',
                format!("removed, {}; it stops, its table stays", short(&p.deployed)),
            ),
        };
        let _ = writeln!(out, "\n{mark} {} ({what})", p.model);
        let config_title = if p.change == Change::Checks {
            "expectations"
        } else {
            "config"
        };
        for (title, diff) in [("SQL", &p.sql_diff), (config_title, &p.config_diff)] {
            if diff.iter().any(|l| !matches!(l, DiffLine::Same(_))) {
                let _ = writeln!(out, "    {title}:");
                for line in diff {
                    let (sign, text) = match line {
                        DiffLine::Same(t) => (' ', t),
                        DiffLine::Removed(t) => ('-', t),
                        DiffLine::Added(t) => ('+', t),
                    };
                    let _ = writeln!(out, "    {sign} {text}");
                }
            }
        }
        if p.change.replays() {
            for read in &m.reads_tables {
                let rows = read
                    .rows
                    .map(|r| format!(" ({} rows)", thousands(r)))
                    .unwrap_or_default();
                if read.replays {
                    let _ = writeln!(
                        out,
                        "    reads what the new version of {} publishes, as it replays",
                        read.model
                    );
                } else {
                    let _ = writeln!(
                        out,
                        "    reads the table {} publishes{rows}, which is unchanged",
                        read.model
                    );
                }
            }
            for h in &m.history {
                let offsets = if h.first_offsets.values().all(|&o| o == 0) {
                    "offset 0".to_owned()
                } else {
                    let each: Vec<String> = h
                        .first_offsets
                        .iter()
                        .map(|(p, o)| format!("{p}:{o}"))
                        .collect();
                    format!("offsets {}", each.join(" "))
                };
                let _ = writeln!(
                    out,
                    "    replays topic {}: {} records, {} from {offsets}{}",
                    h.topic,
                    thousands(h.records),
                    bytes(h.bytes),
                    h.first_time
                        .as_deref()
                        .map(|t| format!(" (first appended {t})"))
                        .unwrap_or_default()
                );
            }
            if let Some(seconds) = m.estimated_seconds {
                let _ = writeln!(
                    out,
                    "    estimated {seconds:.1} s at {} records/s",
                    thousands(ESTIMATE_RECORDS_PER_S)
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kappa_pipeline::deploy::Deployment;

    fn project(files: &[(&str, &str)]) -> kappa_pipeline::Project {
        kappa_pipeline::load(&project_files(files)).expect("a valid project")
    }

    fn project_files(files: &[(&str, &str)]) -> kappa_pipeline::ProjectFiles {
        let mut all = kappa_pipeline::ProjectFiles::new();
        all.insert("kappa.toml".into(), String::new());
        all.insert(
            "topics/orders.toml".into(),
            "[schema]\nid = \"bigint\"\nregion = \"string\"\namount = \"double\"\n".into(),
        );
        for (path, text) in files {
            all.insert((*path).into(), (*text).into());
        }
        all
    }

    /// The plan of `now` over the deployment of `before`, each replay reading `history`.
    fn rendered(before: &[(&str, &str)], now: &[(&str, &str)]) -> String {
        let deployed = Deployment::of(&project(before), &project_files(before));
        let history = TopicHistory {
            topic: "orders".into(),
            records: 1_020_000,
            bytes: 155_000_000,
            first_offsets: BTreeMap::from([(0, 0), (1, 0)]),
            first_time: Some("2026-01-01T00:00:00.000Z".into()),
        };
        let plans = kappa_pipeline::deploy::plan(&project(now), &deployed);
        let reads = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(table_reads(&project(now), &plans));
        let replaying: Vec<String> = plans
            .iter()
            .filter(|p| p.change.replays())
            .map(|p| p.model.clone())
            .collect();
        let models: Vec<ModelReport> = plans
            .into_iter()
            .map(|plan| {
                let replays = plan.change.replays();
                let reads_tables: Vec<UpstreamRead> = reads
                    .get(&plan.model)
                    .into_iter()
                    .flatten()
                    .map(|u| UpstreamRead {
                        model: u.clone(),
                        rows: Some(1_000_000),
                        replays: replaying.contains(u),
                    })
                    .collect();
                // Over a table, the history is the table (the models here read no dimension).
                let history = if replays && reads_tables.is_empty() {
                    vec![history.clone()]
                } else {
                    Vec::new()
                };
                let records = history.iter().map(|h| h.records).sum::<u64>()
                    + reads_tables.iter().filter_map(|r| r.rows).sum::<u64>();
                ModelReport {
                    plan,
                    history,
                    estimated_seconds: replays
                        .then_some(records as f64 / ESTIMATE_RECORDS_PER_S as f64),
                    reads_tables,
                }
            })
            .collect();
        let report = PlanReport {
            summary: summarize(&models),
            models,
        };
        render(&report)
    }

    const SILVER: (&str, &str) = (
        "models/silver/orders.sql",
        "SELECT id, region, amount\nFROM orders\nWHERE amount > 0",
    );
    const GOLD: (&str, &str) = (
        "models/gold/revenue.sql",
        "SELECT region, sum(amount) AS revenue\nFROM silver.orders\nGROUP BY region",
    );
    const COUNTS: (&str, &str) = (
        "models/gold/counts.sql",
        "SELECT region, count(*) AS n FROM silver.orders GROUP BY region",
    );

    #[test]
    fn a_first_deploy_builds_every_model() {
        expect_test::expect![[r#"
            Plan: 2 new, 0 changed, 0 downstream, 0 unchanged, 0 removed; 2 to replay.

            + silver.orders (new, ac3355f8)
                replays topic orders: 1,020,000 records, 147.8 MiB from offset 0 (first appended 2026-01-01T00:00:00.000Z)
                estimated 2.0 s at 500,000 records/s

            + gold.revenue (new, 82a1ff10)
                reads what the new version of silver.orders publishes, as it replays
                estimated 2.0 s at 500,000 records/s
        "#]]
        .assert_eq(&rendered(&[], &[SILVER, GOLD]));
    }

    #[test]
    fn a_changed_model_shows_its_diff_and_replays_what_reads_it() {
        let fixed = (
            "models/silver/orders.sql",
            "SELECT id, region, amount\nFROM orders\nWHERE amount >= 0",
        );
        expect_test::expect![[r#"
            Plan: 0 new, 1 changed, 2 downstream, 0 unchanged, 0 removed; 3 to replay.

            ~ silver.orders (changed, ac3355f8 -> 1d4b9d7e)
                SQL:
                  SELECT id, region, amount
                  FROM orders
                - WHERE amount > 0
                + WHERE amount >= 0
                replays topic orders: 1,020,000 records, 147.8 MiB from offset 0 (first appended 2026-01-01T00:00:00.000Z)
                estimated 2.0 s at 500,000 records/s

            > gold.counts (downstream of silver.orders, 98ec1c47 -> 685d8628)
                reads what the new version of silver.orders publishes, as it replays
                estimated 2.0 s at 500,000 records/s

            > gold.revenue (downstream of silver.orders, 82a1ff10 -> cb0b4408)
                reads what the new version of silver.orders publishes, as it replays
                estimated 2.0 s at 500,000 records/s
        "#]]
        .assert_eq(&rendered(&[SILVER, GOLD, COUNTS], &[fixed, GOLD, COUNTS]));
    }

    #[test]
    fn a_config_change_a_new_model_and_a_removed_one() {
        let partitioned = ("models/gold/revenue.toml", "partition_by = [\"region\"]\n");
        expect_test::expect![[r#"
            Plan: 1 new, 1 changed, 0 downstream, 1 unchanged, 1 removed; 2 to replay.

            = silver.orders (unchanged, ac3355f8)

            + gold.counts (new, 98ec1c47)
                reads the table silver.orders publishes (1,000,000 rows), which is unchanged
                estimated 2.0 s at 500,000 records/s

            ~ gold.revenue (changed, 82a1ff10 -> 16d9f7d3)
                config:
                  key = []
                - partition_by = []
                + partition_by = ["region"]
                reads the table silver.orders publishes (1,000,000 rows), which is unchanged
                estimated 2.0 s at 500,000 records/s

            - gold.gone (removed, 0664e5af; it stops, its table stays)
        "#]]
        .assert_eq(&rendered(
            &[
                SILVER,
                GOLD,
                ("models/gold/gone.sql", "SELECT id FROM silver.orders"),
            ],
            &[SILVER, GOLD, COUNTS, partitioned],
        ));
    }

    #[test]
    fn an_added_expectation_shows_and_replays_nothing() {
        let checked = (
            "models/silver/orders.toml",
            "[[expect]]\nnot_null = \"region\"\nseverity = \"fail\"\n",
        );
        expect_test::expect![[r#"
            Plan: 0 new, 0 changed, 0 downstream, 1 with changed expectations, 1 unchanged, 0 removed; 0 to replay.

            ! silver.orders (expectations changed, ac3355f8; runs on and checks its next commits with them, no replay)
                expectations:
                + not_null_region (fail): { not_null = { column = "region" } }

            = gold.revenue (unchanged, 82a1ff10)
        "#]]
        .assert_eq(&rendered(&[SILVER, GOLD], &[SILVER, checked, GOLD]));
    }

    #[test]
    fn spacing_and_comments_alone_change_nothing() {
        let respaced = (
            "models/silver/orders.sql",
            "-- clean orders\nselect id, region, amount from orders where amount > 0",
        );
        expect_test::expect![[r#"
            Plan: 0 new, 0 changed, 0 downstream, 2 unchanged, 0 removed; 0 to replay.

            = silver.orders (unchanged, ac3355f8)

            = gold.revenue (unchanged, 82a1ff10)
        "#]]
        .assert_eq(&rendered(&[SILVER, GOLD], &[respaced, GOLD]));
    }
}
