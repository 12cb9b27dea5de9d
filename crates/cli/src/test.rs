//! `kappa test`: every expectation of every model, run on demand over the published tables.

use clap::Args;
use kappa_pipeline::expect::Expectation;

use crate::{Global, print_json};

#[derive(Debug, Args)]
pub(crate) struct TestArgs {
    /// Only these models (`silver.orders`); all when absent.
    models: Vec<String>,
    /// Print JSON: one object per expectation.
    #[arg(long)]
    json: bool,
}

/// One expectation's outcome.
#[derive(Debug, serde::Serialize)]
struct Outcome {
    model: String,
    expectation: String,
    kind: &'static str,
    severity: &'static str,
    /// `pass`, `warn` (failed, severity warn), `fail`, or `error` (the check could not run).
    result: &'static str,
    /// Rows the check returned: failing rows, duplicated keys, orphans, or 1 for a table-wide
    /// bound.
    failing: u64,
    /// The query that was run.
    sql: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub(crate) async fn run(global: &Global, args: TestArgs) -> anyhow::Result<()> {
    let (dir, project) = crate::project::checked(global).await?;
    for model in &args.models {
        if !project.models.contains_key(model) {
            anyhow::bail!(
                "no model `{model}` in {}; its models are {}",
                dir.display(),
                project.order.join(", ")
            );
        }
    }
    let client = global.connect_existing().await?;
    let mut outcomes = Vec::new();
    for id in &project.order {
        if !args.models.is_empty() && !args.models.contains(id) {
            continue;
        }
        for e in &project.models[id].config.expectations {
            outcomes.push(run_one(&client, id, e).await);
        }
    }
    client.close().await?;
    if args.json {
        print_json(&outcomes)?;
    } else {
        print!("{}", table(&outcomes));
    }
    let failed = outcomes
        .iter()
        .filter(|o| o.result == "fail" || o.result == "error")
        .count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} expectations failed", outcomes.len());
    }
    Ok(())
}

async fn run_one(client: &kappa_server::client::Client, model: &str, e: &Expectation) -> Outcome {
    let sql = kappa_engine::expect::failing_sql(model, &e.check);
    let counted = format!("SELECT count(*) FROM ({sql}) AS failing");
    let (result, failing, error) = match client.sql(&counted).await {
        Ok(response) => {
            let failing = response
                .rows
                .first()
                .and_then(|r| r.first())
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            (
                kappa_engine::expect::result_of(e.severity, failing, false),
                failing,
                None,
            )
        }
        Err(err) => ("error", 0, Some(err.to_string())),
    };
    Outcome {
        model: model.to_owned(),
        expectation: e.name.clone(),
        kind: e.check.kind(),
        severity: e.severity.as_str(),
        result,
        failing,
        sql,
        error,
    }
}

fn table(outcomes: &[Outcome]) -> String {
    if outcomes.is_empty() {
        return "no expectations: declare them as [[expect]] in a model's .toml\n".into();
    }
    let width = |f: &dyn Fn(&Outcome) -> usize, title: &str| {
        outcomes.iter().map(f).max().unwrap_or(0).max(title.len())
    };
    let wm = width(&|o| o.model.len(), "MODEL");
    let we = width(&|o| o.expectation.len(), "EXPECTATION");
    let wk = width(&|o| o.kind.len(), "KIND");
    let mut out = format!(
        "{:<wm$}  {:<we$}  {:<wk$}  {:<8}  {:<6}  {:>8}\n",
        "MODEL", "EXPECTATION", "KIND", "SEVERITY", "RESULT", "FAILING"
    );
    for o in outcomes {
        out.push_str(&format!(
            "{:<wm$}  {:<we$}  {:<wk$}  {:<8}  {:<6}  {:>8}\n",
            o.model, o.expectation, o.kind, o.severity, o.result, o.failing
        ));
        if let Some(error) = &o.error {
            out.push_str(&format!("{:<wm$}  ↳ {error}\n", ""));
        }
    }
    let count = |r: &str| outcomes.iter().filter(|o| o.result == r).count();
    out.push_str(&format!(
        "\n{} passed, {} warned, {} failed, {} could not run\n",
        count("pass"),
        count("warn"),
        count("fail"),
        count("error")
    ));
    out
}
