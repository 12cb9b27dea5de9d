//! `kappa-bench status`: what `kappa status` (and the alert monitor every 500 ms, the UI and
//! `/metrics`) pays for the dead-letter counts with a large dead-letter topic — counted as
//! letters arrive (`DeadLetterTally`) next to a count of the whole topic, the reference (what
//! each status cost before).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use kappa_log::{Log, Record, TopicConfig};
use kappa_server::dead_letters::DeadLetterTally;
use serde::Serialize;

/// Letters appended per batch while filling the topic.
const FILL_BATCH: u64 = 10_000;
/// Status calls measured, each after a few new letters.
const CALLS: usize = 200;
/// Letters arriving between two measured calls.
const NEW_PER_CALL: u64 = 10;

#[derive(Debug, Serialize)]
pub(crate) struct StatusReport {
    benchmark: &'static str,
    dead_letters: u64,
    /// Counting the whole topic once (the first status of a server, and what every status
    /// cost before the tally).
    full_count_ms: f64,
    /// A status after `NEW_PER_CALL` new letters: median and slowest of `CALLS`.
    incremental_p50_ms: f64,
    incremental_max_ms: f64,
    /// `full_count_ms / incremental_p50_ms`.
    speedup: f64,
    peak_rss_bytes: u64,
}

pub(crate) fn run(work: &Path, letters: u64) -> anyhow::Result<StatusReport> {
    let log = Log::open(work.join("log")).context("open the log")?;
    let topic = log
        .create_topic(
            kappa_engine::runner::DEAD_LETTER_TOPIC,
            TopicConfig {
                partitions: 1,
                ..TopicConfig::default()
            },
        )
        .context("create the dead-letter topic")?;
    let partition = topic.partition(0)?;
    let letter = |i: u64| {
        Record::keyed(
            format!("silver.m{}", i % 7),
            format!(
                "{{\"model\":\"silver.m{}\",\"topic\":\"orders\",\"partition\":{},\"offset\":{i},\
                 \"reason\":\"field `amount`: expected a decimal, found \\\"lots\\\"\",\
                 \"raw_base64\":\"eyJhbW91bnQiOiJsb3RzIn0=\"}}",
                i % 7,
                i % 4
            ),
        )
    };
    let mut next = 0;
    while next < letters {
        let batch: Vec<Record> = (next..(next + FILL_BATCH).min(letters))
            .map(letter)
            .collect();
        next += batch.len() as u64;
        partition.append_blocking(&batch)?;
    }
    crate::note(&format!("{letters} dead letters written"));
    let tally = DeadLetterTally::new();
    let started = Instant::now();
    let counted: u64 = tally.counts(&log)?.iter().map(|c| c.count).sum();
    let full = started.elapsed();
    anyhow::ensure!(counted == letters, "counted {counted} of {letters} letters");
    let mut times: Vec<Duration> = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let batch: Vec<Record> = (next..next + NEW_PER_CALL).map(letter).collect();
        next += NEW_PER_CALL;
        partition.append_blocking(&batch)?;
        let started = Instant::now();
        let counted: u64 = tally.counts(&log)?.iter().map(|c| c.count).sum();
        times.push(started.elapsed());
        anyhow::ensure!(counted == next, "counted {counted} of {next} letters");
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p50 = ms(times[times.len() / 2]);
    Ok(StatusReport {
        benchmark: "status",
        dead_letters: letters,
        full_count_ms: ms(full),
        incremental_p50_ms: p50,
        incremental_max_ms: times.last().map_or(0.0, |d| ms(*d)),
        speedup: ms(full) / p50.max(1e-6),
        peak_rss_bytes: crate::peak_rss_bytes(),
    })
}
