//! `kappa produce TOPIC [FILE]`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use kappa_server::client::Client;
use kappa_server::ingest::{IngestError, KeyFrom, count_lines, parse_ndjson};

use crate::{Global, print_json};

/// Input is sent in requests of about this many bytes (each is all or nothing).
const PRODUCE_REQUEST_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Args)]
pub(crate) struct ProduceArgs {
    topic: String,
    /// NDJSON file; standard input when absent or `-`.
    file: Option<PathBuf>,
    /// JSON field whose value is the record key (records with one key stay in order in one
    /// partition); every record must have it. Default: the topic's declared `key`
    /// (topics/<topic>.toml), taken from the records that have it.
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
    let client = global.connect().await?;
    // Requests stay within what the server accepts.
    let limit = client.health().await?.max_request_bytes;
    let chunk_bytes = limit.map_or(PRODUCE_REQUEST_BYTES, |max| {
        PRODUCE_REQUEST_BYTES.min(max / 2).max(1)
    });
    // A file is checked whole before anything is sent, so a bad line appends nothing.
    if file.is_some() {
        let key = args.key.clone();
        let source = source.clone();
        let reader = open()?;
        let checked = tokio::task::spawn_blocking(move || {
            validate(reader, key.as_deref(), &source, chunk_bytes, limit)
        })
        .await;
        if let Err(e) = checked.map_err(anyhow::Error::new).and_then(|r| r) {
            client.close().await?;
            return Err(e);
        }
    }
    let result = send(
        &client,
        open()?,
        &args.topic,
        args.key.as_deref(),
        &source,
        chunk_bytes,
    )
    .await;
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

/// Reads the next chunk of whole lines, about `chunk_bytes` long.
fn next_chunk(reader: &mut dyn BufRead, chunk_bytes: usize) -> anyhow::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(chunk_bytes + 4096);
    while buf.len() < chunk_bytes {
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

/// Checks every line as the server will, and that each fits in a request.
fn validate(
    mut reader: Box<dyn BufRead + Send>,
    key: Option<&str>,
    source: &str,
    chunk_bytes: usize,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    let (mut lines, mut bytes) = (0u64, 0u64);
    while let Some(chunk) = next_chunk(&mut reader, chunk_bytes)? {
        let chunk = Bytes::from(chunk);
        parse_ndjson(&chunk, key.map_or(KeyFrom::Nothing, KeyFrom::Field))
            .map_err(|e| located(source, &e.shifted(lines, bytes)))?;
        if let Some(max) = limit
            && chunk.len() > max
        {
            // Only a single line can make a chunk larger than the chunk size.
            let e = IngestError {
                line: 1,
                byte_offset: 0,
                reason: format!(
                    "a line of {} bytes is over the server's request limit of {max} bytes",
                    chunk.len()
                ),
            };
            return Err(located(source, &e.shifted(lines, bytes)));
        }
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
    chunk_bytes: usize,
) -> anyhow::Result<Summary> {
    let mut summary = Summary {
        topic: topic.to_owned(),
        ..Summary::default()
    };
    let (mut lines, mut bytes) = (0u64, 0u64);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Vec<u8>>>(2);
    // Reading stdin blocks, so it runs on a thread of its own, one chunk ahead of the sender.
    // A plain thread, not a blocking task: after an error the process exits without waiting for
    // a pipe that may stay open forever.
    std::thread::spawn(move || {
        let mut reader = reader;
        loop {
            let item = match next_chunk(&mut reader, chunk_bytes) {
                Ok(Some(chunk)) => Ok(chunk),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                break;
            }
        }
    });
    while let Some(chunk) = rx.recv().await {
        let appended = summary.records;
        let with_count = |e: anyhow::Error| {
            if appended > 0 {
                e.context(format!("{appended} records before it were appended"))
            } else {
                e
            }
        };
        let chunk = Bytes::from(chunk.map_err(with_count)?);
        let chunk_lines = count_lines(&chunk);
        let chunk_bytes = chunk.len() as u64;
        let response = client.produce(topic, chunk, key).await.map_err(|e| {
            with_count(match e.ingest_error() {
                Some(ingest) => located(source, &ingest.shifted(lines, bytes)),
                None => anyhow::Error::new(e).context(format!("append to `{topic}`")),
            })
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
    Ok(summary)
}
