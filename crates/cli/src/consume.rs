//! `kappa consume TOPIC [--from-beginning | --offset N | --since TIME] [--follow]`.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use kappa_log::StartAt;
use kappa_server::api::ConsumedRecord;
use kappa_server::service::ReadRequest;

use crate::Global;

/// Records asked for per read.
const CONSUME_READ_RECORDS: usize = 10_000;
/// Bytes asked for per read.
const CONSUME_READ_BYTES: usize = 4 * 1024 * 1024;
/// How long one read waits for new records when following.
const FOLLOW_WAIT_MS: u64 = 5_000;

#[derive(Debug, Args)]
pub(crate) struct ConsumeArgs {
    topic: String,
    /// Start at the first record kept (the default).
    #[arg(long, group = "start")]
    from_beginning: bool,
    /// Start at this offset (needs --partition when the topic has several).
    #[arg(long, group = "start", value_name = "N")]
    offset: Option<u64>,
    /// Start at the first record appended at or after TIME: RFC 3339
    /// (`2026-11-25T10:00:00Z`), a duration ago (`15m`), or epoch milliseconds.
    #[arg(long, group = "start", value_name = "TIME")]
    since: Option<String>,
    /// Keep waiting for new records instead of stopping at the end.
    #[arg(long)]
    follow: bool,
    /// Read only this partition.
    #[arg(long, value_name = "P")]
    partition: Option<u32>,
    /// Stop after this many records.
    #[arg(long, value_name = "N")]
    max_records: Option<u64>,
    /// Print each record as a JSON envelope (partition, offset, timestamp, key, headers,
    /// value) instead of its value alone.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(global: &Global, args: ConsumeArgs) -> anyhow::Result<()> {
    let client = global.connect_existing().await?;
    let result = consume(&client, &args).await;
    client.close().await?;
    result
}

async fn consume(client: &kappa_server::client::Client, args: &ConsumeArgs) -> anyhow::Result<()> {
    let info = client.topic(&args.topic).await?;
    let count = info.partitions.len() as u32;
    let partitions: Vec<u32> = match args.partition {
        Some(p) if p >= count => anyhow::bail!(
            "topic `{}` has partitions 0..{count}; there is no partition {p}",
            args.topic
        ),
        Some(p) => vec![p],
        None => (0..count).collect(),
    };
    let start = match (&args.offset, &args.since) {
        (Some(offset), _) => {
            anyhow::ensure!(
                partitions.len() == 1,
                "--offset needs --partition: offsets are per partition and `{}` has {count}",
                args.topic
            );
            StartAt::Offset(*offset)
        }
        (None, Some(since)) => StartAt::Timestamp(parse_since(since)?),
        (None, None) => StartAt::Beginning,
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Vec<ConsumedRecord>>>(4);
    for partition in partitions {
        let client = client.clone();
        let tx = tx.clone();
        let topic = args.topic.clone();
        let follow = args.follow;
        tokio::spawn(async move {
            let mut start = start;
            loop {
                let request = ReadRequest {
                    partition,
                    start,
                    max_records: CONSUME_READ_RECORDS,
                    max_bytes: CONSUME_READ_BYTES,
                    wait_ms: if follow { FOLLOW_WAIT_MS } else { 0 },
                };
                let result = client
                    .read(&topic, request)
                    .await
                    .with_context(|| format!("read {topic}/{partition}"));
                let stop = match &result {
                    Ok(r) => r.records.is_empty() && !follow,
                    Err(_) => true,
                };
                let item = result.map(|r| {
                    start = StartAt::Offset(r.next_offset);
                    r.records
                });
                if stop {
                    if let Err(e) = item {
                        let _ = tx.send(Err(e)).await;
                    }
                    return;
                }
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let mut printed = 0u64;
    let limit = args.max_records.unwrap_or(u64::MAX);
    while let Some(records) = rx.recv().await {
        let mut out = std::io::stdout().lock();
        for record in records? {
            if printed == limit {
                return Ok(());
            }
            if args.json {
                serde_json::to_writer(&mut out, &record.to_envelope())?;
            } else {
                out.write_all(&record.value)?;
            }
            out.write_all(b"\n")?;
            printed += 1;
        }
        out.flush()?;
        if printed == limit {
            return Ok(());
        }
    }
    Ok(())
}

/// `--since`: RFC 3339, a duration ago, or epoch milliseconds.
fn parse_since(s: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(time) = humantime::parse_rfc3339_weak(s) {
        let ms = time
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        return Ok(i64::try_from(ms)?);
    }
    if let Ok(ago) = humantime::parse_duration(s) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        return Ok(i64::try_from(now.saturating_sub(ago).as_millis())?);
    }
    anyhow::bail!(
        "--since {s:?} is not a time: give RFC 3339 (2026-11-25T10:00:00Z), a duration ago (15m), or epoch milliseconds"
    )
}

#[cfg(test)]
mod tests {
    use super::parse_since;

    #[test]
    fn since_takes_three_forms() {
        assert_eq!(parse_since("1700000000000").unwrap(), 1_700_000_000_000);
        assert_eq!(
            parse_since("2023-11-14T22:13:20Z").unwrap(),
            1_700_000_000_000
        );
        let ago = parse_since("1h").unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!((now - 3_600_000 - ago).abs() < 5_000);
        assert!(
            parse_since("yesterday-ish")
                .unwrap_err()
                .to_string()
                .contains("RFC 3339")
        );
    }
}
