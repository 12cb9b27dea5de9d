//! `kappa audit MODEL`, `kappa publish MODEL --force`, `kappa discard MODEL`: what a model's
//! audit says, and the decision about commits that failed it.

use clap::Args;
use kappa_server::quality::Decision;

use crate::{Global, print_json};

/// Exits with status 1 when an expectation fails (or errs) or a commit waits for a decision.
#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    /// The model (`silver.orders`).
    model: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// The model (`silver.orders`).
    model: String,
    /// Publish although the audit failed (required: publishing is what the audit withheld).
    #[arg(long)]
    force: bool,
    /// Print JSON: {model, decision, decided, published} (the snapshot id as a string).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct DiscardArgs {
    /// The model (`silver.orders`).
    model: String,
    /// Print JSON: {model, decision, decided, published} (the snapshot id as a string).
    #[arg(long)]
    json: bool,
}

pub(crate) async fn audit(global: &Global, args: AuditArgs) -> anyhow::Result<()> {
    let (_, project) = crate::project::checked(global).await?;
    let client = global.connect_existing().await?;
    let result = client.audit(&project, &args.model).await;
    client.close().await?;
    let audit = result?;
    // Like `kappa test` and `dbt test`: a failing audit is a failing command, for scripts.
    let failing: Vec<&str> = audit
        .expectations
        .iter()
        .filter(|e| matches!(e.result.as_str(), "fail" | "error"))
        .map(|e| e.name.as_str())
        .collect();
    let verdict = || match (failing.as_slice(), audit.waiting) {
        ([], None) => Ok(()),
        ([], Some(_)) => anyhow::bail!(
            "{}: a commit waits on the audit branch (its checks pass now; publish or discard it)",
            audit.model
        ),
        (names, _) => anyhow::bail!(
            "{}: {} of {} expectations fail ({})",
            audit.model,
            names.len(),
            audit.expectations.len(),
            names.join(", ")
        ),
    };
    if args.json {
        print_json(&audit)?;
        return verdict();
    }
    match audit.waiting {
        Some(waiting) => println!(
            "{}: snapshot {waiting} waits on the audit branch; readers see {}",
            audit.model,
            audit
                .published
                .map_or_else(|| "nothing yet".to_owned(), |p| format!("snapshot {p}"))
        ),
        None => println!(
            "{}: nothing waits for publication; the published table is audited",
            audit.model
        ),
    }
    if audit.expectations.is_empty() {
        println!("no expectations: declare them as [[expect]] in the model's .toml");
        return Ok(());
    }
    for e in &audit.expectations {
        println!(
            "\n{} {} ({}, severity {}): {} failing",
            e.result.to_uppercase(),
            e.name,
            e.kind,
            e.severity,
            e.failing
        );
        if let Some(error) = &e.error {
            println!("  ↳ {error}");
        }
        if let Some(sample) = &e.sample {
            for line in sample.to_table().lines() {
                println!("  {line}");
            }
        }
    }
    if audit.waiting.is_some() {
        let rows = audit.waiting_rows.map_or_else(
            || "its rows".to_owned(),
            |n| format!("the {n} rows it writes"),
        );
        println!(
            "\n`kappa publish {0} --force` publishes {rows} anyway; `kappa discard {0}` drops \
             {rows}, those that pass too (the model carries on after their records)",
            audit.model
        );
    }
    verdict()
}

pub(crate) async fn publish(global: &Global, args: PublishArgs) -> anyhow::Result<()> {
    if !args.force {
        anyhow::bail!(
            "commits wait on the audit branch because their audit failed; `kappa audit {0}` \
             shows why, and `kappa publish {0} --force` publishes them anyway",
            args.model
        );
    }
    decide(global, &args.model, Decision::Publish, args.json).await
}

pub(crate) async fn discard(global: &Global, args: DiscardArgs) -> anyhow::Result<()> {
    decide(global, &args.model, Decision::Discard, args.json).await
}

async fn decide(
    global: &Global,
    model: &str,
    decision: Decision,
    json: bool,
) -> anyhow::Result<()> {
    let (_, project) = crate::project::checked(global).await?;
    let client = global.connect_existing().await?;
    let result = client.decide(&project, model, decision).await;
    client.close().await?;
    let decided = result?;
    if json {
        return print_json(&decided);
    }
    let seen = decided
        .published
        .map_or_else(|| "no snapshot".to_owned(), |p| format!("snapshot {p}"));
    match (decided.decided, decision) {
        (false, _) => println!("{model}: nothing waited for publication; readers see {seen}"),
        (true, Decision::Publish) => println!("{model}: published; readers see {seen}"),
        (true, Decision::Discard) => println!(
            "{model}: discarded the waiting commits; readers see {seen}, which holds the rows \
             they saw before, and the model carries on after the records they came from"
        ),
    }
    Ok(())
}
