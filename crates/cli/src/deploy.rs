//! `kappa deploy`: the running `kappa up` deploys its project folder — changed models replay as
//! new versions beside the live ones, then every public name switches at once.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::Args;

use kappa_server::audit::ModelAudit;

use crate::fmt::thousands;
use crate::{Global, print_json};

#[derive(Debug, Args)]
pub(crate) struct DeployArgs {
    /// Wait for the cutover, showing each replay's progress (a bar in a terminal, a line a
    /// second otherwise).
    #[arg(long)]
    wait: bool,
    /// Print JSON: {"replaying": [models], "cut_over": bool, "seconds": s, "audit": [...]}.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RollbackArgs {
    /// The model (`layer.name`) to take back to the previous deployment's version.
    model: String,
    #[command(flatten)]
    follow: DeployArgs,
}

pub(crate) async fn run(global: &Global, args: DeployArgs) -> anyhow::Result<()> {
    let client = global.connect().await?;
    let started = Instant::now();
    let before = client.deployment().await.ok();
    let result = match client.deploy().await {
        Ok(replaying) => follow(&client, replaying, &args).await,
        Err(e) => Err(e.into()),
    };
    let after = client.deployment().await.ok();
    client.close().await?;
    let result = result?;
    if !args.json {
        for model in rechecked(before.as_ref(), after.as_ref()) {
            println!("{model}: its changed expectations check its next commits (no replay)");
        }
    }
    report(result, &args, started)
}

/// The models whose expectations differ between two deployments (both still serving the same
/// version: a change of checks alone).
fn rechecked(
    before: Option<&kappa_pipeline::deploy::Deployment>,
    after: Option<&kappa_pipeline::deploy::Deployment>,
) -> Vec<String> {
    let (Some(before), Some(after)) = (before, after) else {
        return Vec::new();
    };
    let (Some(old), Some(new)) = (before.project(), after.project()) else {
        return Vec::new();
    };
    let version = |d: &kappa_pipeline::deploy::Deployment, id: &str| {
        d.models.get(id).map(|m| m.version.clone())
    };
    new.order
        .iter()
        .filter(|id| {
            version(before, id) == version(after, id)
                && old
                    .models
                    .get(*id)
                    .is_some_and(|m| m.config.expectations != new.models[*id].config.expectations)
        })
        .cloned()
        .collect()
}

pub(crate) async fn rollback(global: &Global, args: RollbackArgs) -> anyhow::Result<()> {
    let client = global.connect().await?;
    let started = Instant::now();
    let result = match client.rollback(&args.model).await {
        Ok(replaying) => follow(&client, replaying, &args.follow).await,
        Err(e) => Err(e.into()),
    };
    client.close().await?;
    report(result?, &args.follow, started)
}

fn report(followed: Followed, args: &DeployArgs, started: Instant) -> anyhow::Result<()> {
    let Followed {
        replaying,
        cut_over,
        audit,
    } = followed;
    if args.json {
        print_json(&serde_json::json!({
            "replaying": replaying,
            "cut_over": cut_over,
            "seconds": started.elapsed().as_secs_f64(),
            "audit": audit,
        }))
    } else {
        for model in &audit {
            print!("{}", model.to_text());
        }
        if cut_over && !replaying.is_empty() {
            println!(
                "cut over in {:.1} s: the new versions serve",
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }
}

/// What [`follow`] saw of a deploy.
struct Followed {
    replaying: Vec<String>,
    /// Whether the new versions serve.
    cut_over: bool,
    audit: Vec<ModelAudit>,
}

/// Follows a started deploy (`replaying` its new versions): with `--wait`, to the cutover.
async fn follow(
    client: &kappa_server::client::Client,
    replaying: Vec<String>,
    args: &DeployArgs,
) -> anyhow::Result<Followed> {
    if replaying.is_empty() {
        if !args.json {
            println!("deployed: no model replays, the project serves as it is");
        }
        return Ok(Followed {
            replaying,
            cut_over: true,
            audit: Vec::new(),
        });
    }
    if !args.json {
        println!(
            "deploying: {} replay from the beginning",
            replaying.join(", ")
        );
    }
    if !args.wait {
        if !args.json {
            println!("the live versions serve until the new ones catch up (--wait follows it)");
        }
        return Ok(Followed {
            replaying,
            cut_over: false,
            audit: Vec::new(),
        });
    }
    let shown = if args.json {
        Shown::Nothing
    } else if std::io::stdout().is_terminal() {
        Shown::Bar
    } else {
        Shown::Lines
    };
    let watched = watch(client, shown).await?;
    Ok(Followed {
        replaying,
        cut_over: true,
        audit: watched.audit,
    })
}

/// How [`watch`] shows a deploy's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shown {
    /// One line redrawn in place (a terminal).
    Bar,
    /// A line a second (a log).
    Lines,
    /// Nothing (JSON output).
    Nothing,
}

/// What [`watch`] saw of a deploy that cut over.
pub(crate) struct Watched {
    /// The records its replays had to read (the last total seen).
    pub(crate) records: u64,
    /// Its audit.
    pub(crate) audit: Vec<ModelAudit>,
}

/// Polls the running deploy until it has cut over, showing its progress; an error when its
/// audit stopped it (the audit is printed first, unless nothing is shown).
pub(crate) async fn watch(
    client: &kappa_server::client::Client,
    shown: Shown,
) -> anyhow::Result<Watched> {
    let mut last: Option<(Instant, u64)> = None;
    let mut last_line = Instant::now() - Duration::from_secs(1);
    let mut seen_total = 0;
    let mut auditing_shown = false;
    loop {
        let progress = client.deploy_progress().await?;
        if matches!(progress.state.as_str(), "idle" | "failed") && shown == Shown::Bar {
            println!();
        }
        match progress.state.as_str() {
            "idle" => {
                return Ok(Watched {
                    records: seen_total,
                    audit: progress.audit,
                });
            }
            "failed" => {
                if shown != Shown::Nothing {
                    for model in &progress.audit {
                        print!("{}", model.to_text());
                    }
                }
                anyhow::bail!(
                    "{}; the deployed versions keep serving",
                    progress.failure.as_deref().unwrap_or("the deploy failed")
                );
            }
            "auditing" if !auditing_shown => {
                auditing_shown = true;
                if shown != Shown::Nothing {
                    println!(
                        "{}caught up: auditing the new versions against the live ones",
                        if shown == Shown::Bar { "\n" } else { "" }
                    );
                }
            }
            _ => {}
        }
        let done: u64 = progress.models.iter().map(|m| m.records_done).sum();
        let total: u64 = progress.models.iter().map(|m| m.records_total).sum();
        seen_total = seen_total.max(total);
        let now = Instant::now();
        let rate = last.map(|(at, before)| {
            done.saturating_sub(before) as f64 / now.duration_since(at).as_secs_f64().max(1e-3)
        });
        let line = progress_line(done, total, rate);
        match shown {
            Shown::Bar => {
                print!("\r{line:<100}");
                let _ = std::io::stdout().flush();
            }
            Shown::Lines if now.duration_since(last_line) >= Duration::from_secs(1) => {
                println!("{line}");
                last_line = now;
            }
            _ => {}
        }
        last = Some((now, done));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `[#####     ] 52% · 530,000 of 1,020,000 records · 480,000 records/s · ETA 1 s`.
fn progress_line(done: u64, total: u64, rate: Option<f64>) -> String {
    let share = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let filled = (share * 20.0).round() as usize;
    let bar: String = (0..20)
        .map(|i| if i < filled { '#' } else { ' ' })
        .collect();
    let mut line = format!(
        "[{bar}] {:>3.0}% · {} of {} records",
        share * 100.0,
        thousands(done),
        thousands(total)
    );
    if let Some(rate) = rate.filter(|r| *r > 0.0) {
        let left = total.saturating_sub(done) as f64 / rate;
        line.push_str(&format!(
            " · {} records/s · ETA {left:.0} s",
            thousands(rate as u64)
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_progress_line_has_the_share_the_rate_and_what_is_left() {
        assert_eq!(
            super::progress_line(530_000, 1_020_000, Some(490_000.0)),
            "[##########          ]  52% · 530,000 of 1,020,000 records · 490,000 records/s · ETA 1 s"
        );
        assert_eq!(
            super::progress_line(0, 0, None),
            "[####################] 100% · 0 of 0 records"
        );
    }
}
