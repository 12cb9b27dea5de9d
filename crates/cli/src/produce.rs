//! `kappa produce TOPIC [FILE]`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use kappa_server::client::Client;
use kappa_server::ingest::{IngestError, count_lines, parse_ndjson};

use crate::{Global, print_json};

/// Input is sent in requests of about this many bytes (each is all or nothing).
const PRODUCE_REQUEST_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Args)]
pub(crate) struct ProduceArgs {
    topic: String,
    /// NDJSON file; standard input when absent or `-`.
    file: Option<PathBuf>,
    /// JSON field whose value is the record key (records with one key stay in order in one
    /// partition).
    #[arg(long, value_name = "FIELD")]
    key: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Where a produce run put its records, per partition.
#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    topic: String,
    records: u64,
    partitions: BTreeMap<u32, PartitionSummary>,
}

#[derive(Debug, serde::Serialize)]
struct PartitionSummary {
    records: u64,
    first_offset: u64,
    last_offset: u64,
}

pub(crate) async fn run(global: &Global, args: ProduceArgs) -> anyhow::Result<()> {
    let file = args.file.filter(|f| f.as_os_str() != "-");
    let source = file
        .as_ref()
        .map_or_else(|| "stdin".to_owned(), |f| f.display().to_string());
    let open = || -> anyhow::Result<Box<dyn BufRead + Send>> {
        Ok(match &file {
            Some(path) => Box::new(BufReader::new(
                std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?,
            )),
            None => Box::new(BufReader::new(std::io::stdin())),
        })
    };
    // A file is checked whole before anything is sent, so a bad line appends nothing.
    if file.is_some() {
        let key = args.key.clone();
        let source = source.clone();
        let reader = open()?;
        tokio::task::spawn_blocking(move || validate(reader, key.as_deref(), &source)).await??;
    }
    let client = global.connect().await?;
    let result = send(&client, open()?, &args.topic, args.key.as_deref(), &source).await;
    client.close().await?;
    let summary = result?;
    if args.json {
        print_json(&summary)?;
    } else {
        let parts: Vec<String> = summary
            .partitions
            .iter()
            .map(|(p, s)| {
                format!(
                    "partition {p}: offsets {}..={}",
                    s.first_offset, s.last_offset
                )
            })
            .collect();
        println!(
            "appended {} record{} to `{}`{}{}",
            summary.records,
            if summary.records == 1 { "" } else { "s" },
            summary.topic,
            if parts.is_empty() { "" } else { "; " },
            parts.join(", ")
        );
    }
    Ok(())
}

/// Reads the next chunk of whole lines, about [`PRODUCE_REQUEST_BYTES`] long.
fn next_chunk(reader: &mut dyn BufRead) -> anyhow::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(PRODUCE_REQUEST_BYTES + 4096);
    while buf.len() < PRODUCE_REQUEST_BYTES {
        let n = reader.read_until(b'\n', &mut buf).context("read input")?;
        if n == 0 {
            break;
        }
    }
    Ok(if buf.is_empty() { None } else { Some(buf) })
}

fn located(source: &str, e: &IngestError) -> anyhow::Error {
    anyhow::anyhow!("{source}:{}: byte {}: {}", e.line, e.byte_offset, e.reason)
}

fn validate(
    mut reader: Box<dyn BufRead + Send>,
    key: Option<&str>,
    source: &str,
) -> anyhow::Result<()> {
    let (mut lines, mut bytes) = (0u64, 0u64);
    while let Some(chunk) = next_chunk(&mut reader)? {
        let chunk = Bytes::from(chunk);
        parse_ndjson(&chunk, key).map_err(|e| located(source, &e.shifted(lines, bytes)))?;
        lines += count_lines(&chunk);
        bytes += chunk.len() as u64;
    }
    Ok(())
}

async fn send(
    client: &Client,
    reader: Box<dyn BufRead + Send>,
    topic: &str,
    key: Option<&str>,
    source: &str,
) -> anyhow::Result<Summary> {
    let mut summary = Summary {
        topic: topic.to_owned(),
        ..Summary::default()
    };
    let (mut lines, mut bytes) = (0u64, 0u64);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Vec<u8>>>(2);
    // Reading stdin blocks, so it happens on its own thread, one chunk ahead of the sender.
    let reading = tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        loop {
            let next = next_chunk(&mut reader);
            let done = !matches!(next, Ok(Some(_)));
            let item = match next {
                Ok(Some(chunk)) => Ok(chunk),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            if tx.blocking_send(item).is_err() || done {
                break;
            }
        }
    });
    while let Some(chunk) = rx.recv().await {
        let chunk = Bytes::from(chunk?);
        let chunk_lines = count_lines(&chunk);
        let chunk_bytes = chunk.len() as u64;
        let response =
            client
                .produce(topic, chunk, key)
                .await
                .map_err(|e| match e.ingest_error() {
                    Some(ingest) => {
                        let err = located(source, &ingest.shifted(lines, bytes));
                        if summary.records > 0 {
                            err.context(format!(
                                "{} records before it were appended",
                                summary.records
                            ))
                        } else {
                            err
                        }
                    }
                    None => anyhow::Error::new(e).context(format!("append to `{topic}`")),
                })?;
        for place in &response.offsets {
            let entry = summary
                .partitions
                .entry(place.partition)
                .or_insert(PartitionSummary {
                    records: 0,
                    first_offset: place.offset,
                    last_offset: place.offset,
                });
            entry.records += 1;
            entry.first_offset = entry.first_offset.min(place.offset);
            entry.last_offset = entry.last_offset.max(place.offset);
        }
        summary.records += response.records;
        lines += chunk_lines;
        bytes += chunk_bytes;
    }
    reading.await.context("join the input reader")?;
    Ok(summary)
}
