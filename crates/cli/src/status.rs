//! `kappa status`: every model's state, rows, lag and dead letters.

use clap::Args;

use crate::{Global, print_json};

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Print JSON: {"models": [{model, state, detail?, version, table_version?, rows?,
    /// last_commit?, lag_records, dead_letters}…], "dead_letters": [{model, topic, count,
    /// last_reason}…]}.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(global: &Global, args: StatusArgs) -> anyhow::Result<()> {
    let client = global.connect_existing().await?;
    // Without a server, the project folder says which models there are.
    let project = match (&client, global.project_dir()) {
        (kappa_server::client::Client::Direct { .. }, Some(dir)) => {
            let files = kappa_server::project::read_files(&dir)?;
            kappa_pipeline::load(&files).ok()
        }
        _ => None,
    };
    let result = client.status(project.as_ref()).await;
    client.close().await?;
    let result = result?;
    if args.json {
        print_json(&result)
    } else {
        print!("{}", result.to_text());
        Ok(())
    }
}
