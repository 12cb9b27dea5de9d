//! `kappa sql [QUERY]`.

use std::io::Read;

use clap::Args;

use crate::{Global, print_json};

#[derive(Debug, Args)]
pub(crate) struct SqlArgs {
    /// The query; read from standard input when absent.
    query: Option<String>,
    /// Print JSON: {"columns": [{"name", "type"}…], "rows": [[…]…]}.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(global: &Global, args: SqlArgs) -> anyhow::Result<()> {
    let query = match args.query {
        Some(q) => q,
        None => {
            let mut q = String::new();
            std::io::stdin().read_to_string(&mut q)?;
            q
        }
    };
    let client = global.connect_existing().await?;
    let result = client.sql(&query).await;
    client.close().await?;
    let result = result?;
    if args.json {
        print_json(&result)
    } else {
        print!("{}", result.to_table());
        Ok(())
    }
}
