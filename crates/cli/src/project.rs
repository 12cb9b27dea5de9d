//! `kappa init DIR` and `kappa check`.

use std::path::PathBuf;

use clap::Args;

use crate::{Global, print_json};

#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    /// Folder to create the project in (created if missing).
    dir: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The project folder the command works on, checked: its folder and the project, or an error
/// listing its problems.
pub(crate) async fn checked(global: &Global) -> anyhow::Result<(PathBuf, kappa_pipeline::Project)> {
    let dir = kappa_server::config::project_dir(global.project.as_deref())?;
    match kappa_server::project::check(&dir).await? {
        Ok(project) => Ok((dir, project)),
        Err(diagnostics) => {
            let lines: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
            anyhow::bail!(
                "the project in {} has problems (`kappa check`):\n{}",
                dir.display(),
                lines.join("\n")
            );
        }
    }
}

pub(crate) fn init(args: InitArgs) -> anyhow::Result<()> {
    let written = kappa_server::project::scaffold(&args.dir)?;
    println!(
        "created a kappa project in {} ({} files):",
        args.dir.display(),
        written.len()
    );
    for file in &written {
        println!("  {file}");
    }
    println!("next: cd {} && kappa check && kappa up", args.dir.display());
    Ok(())
}

pub(crate) async fn check(global: &Global, args: CheckArgs) -> anyhow::Result<()> {
    let dir = kappa_server::config::project_dir(global.project.as_deref())?;
    let result = kappa_server::project::check(&dir).await?;
    if args.json {
        let value = match &result {
            Ok(project) => serde_json::json!({
                "ok": true,
                "diagnostics": [],
                "topics": project.topics.keys().collect::<Vec<_>>(),
                "models": project.order,
            }),
            Err(diagnostics) => serde_json::json!({ "ok": false, "diagnostics": diagnostics }),
        };
        print_json(&value)?;
    }
    match result {
        Ok(project) => {
            if !args.json {
                println!(
                    "ok: {} topic{}, {} model{}{}{}",
                    project.topics.len(),
                    if project.topics.len() == 1 { "" } else { "s" },
                    project.models.len(),
                    if project.models.len() == 1 { "" } else { "s" },
                    if project.order.is_empty() {
                        ""
                    } else {
                        " in order "
                    },
                    project.order.join(", ")
                );
            }
            Ok(())
        }
        Err(diagnostics) => {
            if !args.json {
                for d in &diagnostics {
                    println!("{d}");
                }
            }
            let n = diagnostics.len();
            anyhow::bail!(
                "{n} problem{} in {}",
                if n == 1 { "" } else { "s" },
                dir.display()
            )
        }
    }
}
