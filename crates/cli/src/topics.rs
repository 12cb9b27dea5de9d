//! `kappa topics create|list|describe`.

use clap::{Args, Subcommand};
use kappa_log::{FsyncPolicy, TopicConfig};
use kappa_server::api::{CreateTopic, TopicInfo};

use crate::{Global, print_json};

#[derive(Debug, Subcommand)]
pub(crate) enum TopicsCommand {
    /// Create a topic.
    Create(CreateArgs),
    /// List topics.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a topic's configuration and partitions.
    Describe {
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    name: String,
    /// Number of partitions, fixed for the topic's life.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// `always` (every acknowledged record is fsynced) or an interval like `100ms`.
    #[arg(long, default_value = "always")]
    fsync: FsyncPolicy,
    /// Delete records older than this (e.g. `7d`); default: keep forever.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    retention: Option<u64>,
    /// Delete the oldest records while a partition is larger than this (e.g. `10GiB`).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    retention_bytes: Option<u64>,
    /// Roll segments at this size [default: 128MiB].
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    segment_bytes: Option<u64>,
    /// Roll segments at this age [default: 7d].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    segment_age: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(global: &Global, command: TopicsCommand) -> anyhow::Result<()> {
    let client = global.connect().await?;
    let result = match command {
        TopicsCommand::Create(args) => {
            let defaults = TopicConfig::default();
            let config = TopicConfig {
                partitions: args.partitions,
                fsync: args.fsync,
                retention_ms: args.retention,
                retention_bytes: args.retention_bytes,
                segment_bytes_max: args.segment_bytes.unwrap_or(defaults.segment_bytes_max),
                segment_ms_max: args.segment_age.unwrap_or(defaults.segment_ms_max),
                index_interval_bytes: defaults.index_interval_bytes,
            };
            let info = client
                .create_topic(CreateTopic {
                    name: args.name,
                    config,
                })
                .await?;
            if args.json {
                print_json(&info)
            } else {
                println!(
                    "created topic `{}` with {} partition{} (fsync {})",
                    info.name,
                    info.partitions.len(),
                    if info.partitions.len() == 1 { "" } else { "s" },
                    info.config.fsync
                );
                Ok(())
            }
        }
        TopicsCommand::List { json } => {
            let topics = client.topics().await?;
            if json {
                print_json(&topics)
            } else {
                if topics.is_empty() {
                    println!("no topics; create one with `kappa topics create NAME`");
                }
                for t in &topics {
                    println!(
                        "{}\t{} partitions\t{} records\t{} bytes",
                        t.name,
                        t.partitions.len(),
                        t.record_count(),
                        t.partitions.iter().map(|p| p.size_bytes).sum::<u64>()
                    );
                }
                Ok(())
            }
        }
        TopicsCommand::Describe { name, json } => {
            let info = client.topic(&name).await?;
            if json {
                print_json(&info)
            } else {
                describe(&info)
            }
        }
    };
    client.close().await?;
    result
}

fn describe(info: &TopicInfo) -> anyhow::Result<()> {
    let c = &info.config;
    println!("topic {}", info.name);
    println!("  partitions     {}", c.partitions);
    println!("  fsync          {}", c.fsync);
    println!(
        "  retention      {}",
        c.retention_ms
            .map_or("forever".into(), |ms| humantime::format_duration(
                std::time::Duration::from_millis(ms)
            )
            .to_string())
    );
    println!(
        "  retention size {}",
        c.retention_bytes
            .map_or("unlimited".into(), |b| format!("{b} bytes"))
    );
    println!(
        "  segment size   {} bytes, age {}",
        c.segment_bytes_max,
        humantime::format_duration(std::time::Duration::from_millis(c.segment_ms_max))
    );
    println!("  partition  start_offset  visible_offset  durable_offset  segments  bytes");
    for p in &info.partitions {
        println!(
            "  {:>9}  {:>12}  {:>14}  {:>14}  {:>8}  {}",
            p.partition,
            p.start_offset,
            p.visible_offset,
            p.durable_offset,
            p.segment_count,
            p.size_bytes
        );
    }
    Ok(())
}

fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (try `30s`, `12h`, `7d`)"))?;
    u64::try_from(d.as_millis()).map_err(|_| "duration too long".to_owned())
}

/// Parses `1024`, `64KiB`, `128MiB`, `10GiB`, `1TiB` (also KB/MB/GB/TB, decimal).
pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a size like `512MiB`"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit `{other}`; use B, KiB, MiB, GiB or TiB"
            ));
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("128MiB"), Ok(128 << 20));
        assert_eq!(parse_bytes("2 GB"), Ok(2_000_000_000));
        assert!(
            parse_bytes("12 parsecs")
                .unwrap_err()
                .contains("unknown size unit")
        );
        assert!(parse_bytes("MiB").is_err());
    }
}
