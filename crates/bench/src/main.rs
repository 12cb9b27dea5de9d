//! `kappa-bench`: macro benchmarks that print JSON, each figure next to a reference measured in
//! the same run on the same disk.
//!
//! ```text
//! kappa-bench log-append   append throughput and acknowledgement latency under fsync = always,
//!                          vs writing + fsyncing a plain file of the same size
//! kappa-bench log-replay   sequential replay of a ≥ 2 GiB topic from offset 0,
//!                          vs reading a plain file of the same size
//! kappa-bench pipelines    replay of five reference pipelines over ≥ 10 M order events,
//!                          vs DuckDB running the same SQL over the same events as NDJSON
//! kappa-bench decode       JSON records -> Arrow batches, vs arrow-json on the same bytes
//! kappa-bench live-latency commit cadence and live event -> visible latency
//! kappa-bench status       dead-letter counts of a status with 1 M dead letters, counted as
//!                          they arrive, vs counting the whole topic
//! ```
//!
//! Run with `cargo run --release -p kappa-bench -- log-append` (see docs/benchmarks.md).

mod decode;
mod latency;
mod pipelines;
mod status;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use kappa_log::{Log, Record, StartAt, TopicConfig};
use serde::Serialize;

/// Size of one write or read of the plain-file references.
const RAW_IO_BYTES: usize = 1 << 20;
/// Size of one read when replaying.
const REPLAY_READ_BYTES: usize = 1 << 20;
/// Bytes the plain-file write reference writes per way and round.
const RAW_WRITE_BYTES: u64 = 512 << 20;
/// Rounds of the plain-file write reference.
const RAW_WRITE_ROUNDS: usize = 3;
/// Replay measurements per case; the median is reported.
const REPLAY_RUNS: usize = 5;
/// Bytes one batched append carries (a typical producer batch).
const BATCHED_APPEND_BYTES: usize = 64 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "kappa-bench",
    about = "kappa's macro benchmarks (JSON on stdout)"
)]
struct Cli {
    /// Where to put the benchmark's files (removed afterwards).
    #[arg(long, global = true, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Append throughput and latency under fsync = "always".
    LogAppend {
        /// Seconds per configuration.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Sequential replay of a large topic from offset 0.
    LogReplay {
        /// Size of the replayed topic, in MiB.
        #[arg(long, default_value_t = 2048)]
        mib: u64,
    },
    /// Replay throughput of the reference pipelines Q1–Q6, next to DuckDB.
    Pipelines {
        /// Generated order events (redelivered copies come on top).
        #[arg(long, default_value_t = 10_000_000)]
        events: u64,
        /// A Python with the `duckdb` package.
        #[arg(long, default_value = "target/bench-venv/bin/python")]
        python: PathBuf,
        /// Only these queries, e.g. `Q1,Q3`.
        #[arg(long)]
        only: Option<String>,
    },
    /// JSON records → Arrow batches: the engine's decoder next to arrow-json on the same bytes.
    Decode {
        /// Generated order records.
        #[arg(long, default_value_t = 2_000_000)]
        records: u64,
    },
    /// Commit cadence and live event → visible latency of a row-by-row and a GROUP BY model.
    LiveLatency {
        /// Events in the log before the models start (the catch-up phase).
        #[arg(long, default_value_t = 1_000_000)]
        backlog: u64,
        /// Live events per second.
        #[arg(long, default_value_t = 5_000)]
        rate: u64,
        /// Live seconds measured (after a 2 s warm-up).
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
    },
    /// What a status pays for the dead-letter counts with a large dead-letter topic.
    Status {
        /// Dead letters in the topic.
        #[arg(long, default_value_t = 1_000_000)]
        letters: u64,
    },
    /// The plain-file write reference alone, run by `log-append` in a child process so that
    /// its buffer does not count in the benchmark's peak RSS. Prints MB/s.
    #[command(hide = true)]
    RawWrite {
        /// Write distinct bytes (a prefilled buffer as large as the file) instead of one 1 MiB
        /// buffer over and over.
        #[arg(long)]
        distinct: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let work = cli.dir.join(format!("kappa-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let result = match cli.command {
        Command::LogAppend { seconds } => append(&work, Duration::from_secs_f64(seconds))
            .and_then(|r| Ok(serde_json::to_value(r)?)),
        Command::LogReplay { mib } => {
            replay(&work, mib << 20).and_then(|r| Ok(serde_json::to_value(r)?))
        }
        Command::Pipelines {
            events,
            python,
            only,
        } => pipelines::run(&work, events, &python, only.as_deref())
            .and_then(|r| Ok(serde_json::to_value(r)?)),
        Command::Decode { records } => {
            decode::run(records).and_then(|r| Ok(serde_json::to_value(r)?))
        }
        Command::LiveLatency {
            backlog,
            rate,
            seconds,
        } => latency::run(&work, backlog, rate, seconds).and_then(|r| Ok(serde_json::to_value(r)?)),
        Command::Status { letters } => {
            status::run(&work, letters).and_then(|r| Ok(serde_json::to_value(r)?))
        }
        Command::RawWrite { distinct } => raw_write_fsync(&work.join("raw-write"), distinct)
            .and_then(|r| Ok(serde_json::to_value(r)?)),
    };
    let _ = std::fs::remove_dir_all(&work);
    let report = result?;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &report)?;
    writeln!(out)?;
    Ok(())
}

/// Lets the disk finish what earlier cases left behind — writeback, and the discards of deleted
/// files on a file system mounted with `discard` — so that it does not slow the next measurement.
fn settle() {
    let _ = std::process::Command::new("sync").status();
    std::thread::sleep(Duration::from_secs(1));
}

fn note(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Peak resident memory of this process so far, from /proc/self/status.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn value_of(id: u64, size: usize) -> Bytes {
    let mut v = format!("{{\"id\":{id},\"pad\":\"").into_bytes();
    while v.len() + 2 < size {
        v.push(b'a' + (v.len() % 26) as u8);
    }
    v.extend_from_slice(b"\"}");
    v.truncate(size);
    Bytes::from(v)
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

#[derive(Debug, Serialize)]
struct AppendReport {
    benchmark: &'static str,
    seconds_per_case: f64,
    cases: Vec<AppendCase>,
    peak_rss_bytes: u64,
}

#[derive(Debug, Serialize)]
struct AppendCase {
    record_bytes: usize,
    records_per_append: usize,
    producers: usize,
    records_per_s: f64,
    payload_mb_per_s: f64,
    /// Bytes the log wrote (batch headers and record framing included).
    log_mb_per_s: f64,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    appends_per_s: f64,
    /// The best a plain file reached writing the same amount of distinct bytes durably in this
    /// run (see `raw_write_fsync`).
    raw_write_fsync_mb_per_s: f64,
    /// `log_mb_per_s` ÷ `raw_write_fsync_mb_per_s`.
    ratio_to_raw: f64,
    /// The same, rewriting one buffer that stays in the CPU cache: an upper bound no writer of
    /// real data reaches.
    raw_same_buffer_mb_per_s: f64,
    ratio_to_raw_same_buffer: f64,
    /// One fdatasync per append-sized write, one writer: a log without group commit.
    raw_fsync_per_append_mb_per_s: f64,
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn append(work: &Path, seconds: Duration) -> anyhow::Result<AppendReport> {
    let raw = raw_write_fsync_in_child(work, true)?;
    let raw_same_buffer = raw_write_fsync_in_child(work, false)?;
    note(&format!(
        "raw write+fdatasync of a plain file: {raw:.0} MB/s of distinct bytes, {raw_same_buffer:.0} MB/s rewriting one cached buffer (best of {RAW_WRITE_ROUNDS} rounds × 3 ways each)"
    ));
    let mut cases = Vec::new();
    for record_bytes in [100usize, 1024] {
        for records_per_append in [1, BATCHED_APPEND_BYTES / record_bytes] {
            for producers in [1usize, 8, 64] {
                let case = append_case(
                    work,
                    record_bytes,
                    records_per_append,
                    producers,
                    seconds,
                    (raw, raw_same_buffer),
                )?;
                note(&format!(
                    "append {record_bytes:>4} B × {records_per_append:>3}/append, {producers:>2} producers: {:>10.0} rec/s {:>7.1} MB/s, p50 {:.2} ms p99 {:.2} ms, raw {:.1} MB/s, ratio {:.2} (to the cached-buffer raw {:.2})",
                    case.records_per_s,
                    case.payload_mb_per_s,
                    case.ack_p50_ms,
                    case.ack_p99_ms,
                    case.raw_write_fsync_mb_per_s,
                    case.ratio_to_raw,
                    case.ratio_to_raw_same_buffer
                ));
                cases.push(case);
            }
        }
    }
    Ok(AppendReport {
        benchmark: "log-append",
        seconds_per_case: seconds.as_secs_f64(),
        cases,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

fn append_case(
    work: &Path,
    record_bytes: usize,
    records_per_append: usize,
    producers: usize,
    seconds: Duration,
    (raw, raw_same_buffer): (f64, f64),
) -> anyhow::Result<AppendCase> {
    let dir = work.join("append");
    let _ = std::fs::remove_dir_all(&dir);
    settle();
    let log = Log::open(&dir)?;
    let topic = log.create_topic("bench", TopicConfig::default())?;
    let started = Instant::now();
    let deadline = started + seconds;
    let latencies: Vec<Vec<Duration>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..producers)
            .map(|p| {
                let topic = topic.clone();
                s.spawn(move || -> anyhow::Result<Vec<Duration>> {
                    let partition = topic.partition(0)?;
                    let mut latencies = Vec::new();
                    // Built once: the benchmark measures the log, not the making of records.
                    let first = (p as u64) << 40;
                    let records: Vec<Record> = (0..records_per_append as u64)
                        .map(|i| Record::from_value(value_of(first + i, record_bytes)))
                        .collect();
                    while Instant::now() < deadline {
                        let sent = Instant::now();
                        partition.append_blocking(&records)?;
                        latencies.push(sent.elapsed());
                    }
                    Ok(latencies)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("producer thread panicked"))
            .collect::<anyhow::Result<_>>()
    })?;
    let elapsed = started.elapsed();
    let stats = topic.partition(0)?.stats();
    let records = stats.offsets.visible_offset;
    let log_bytes = stats.size_bytes;
    drop(topic);
    log.close()?;
    drop(log);
    let mut all: Vec<Duration> = latencies.into_iter().flatten().collect();
    let appends = all.len();
    all.sort();
    let per_append = raw_fsync_per_append(
        &work.join("raw-per-append"),
        records_per_append * record_bytes,
        seconds,
    )?;
    let log_mb_per_s = mb_per_s(log_bytes, elapsed);
    Ok(AppendCase {
        record_bytes,
        records_per_append,
        producers,
        records_per_s: records as f64 / elapsed.as_secs_f64(),
        payload_mb_per_s: mb_per_s(records * record_bytes as u64, elapsed),
        log_mb_per_s,
        ack_p50_ms: percentile_ms(&all, 0.50),
        ack_p99_ms: percentile_ms(&all, 0.99),
        appends_per_s: appends as f64 / elapsed.as_secs_f64(),
        raw_write_fsync_mb_per_s: raw,
        ratio_to_raw: log_mb_per_s / raw,
        raw_same_buffer_mb_per_s: raw_same_buffer,
        ratio_to_raw_same_buffer: log_mb_per_s / raw_same_buffer,
        raw_fsync_per_append_mb_per_s: per_append,
    })
}

/// The best MB/s a plain file reaches writing durably: [`RAW_WRITE_ROUNDS`] rounds of three
/// ways — 1 MiB writes then one fdatasync; 1 MiB writes each fdatasync-ed; 16 MiB writes each
/// fdatasync-ed — over [`RAW_WRITE_BYTES`]. The best, because a shared VM disk is noisy and the
/// reference should be the hardest to beat. With `distinct`, the file's bytes come from a
/// prefilled buffer of its whole size, as a log's records do; otherwise one 1 MiB buffer (always
/// in the CPU's cache) is written again and again.
fn raw_write_fsync(path: &Path, distinct: bool) -> anyhow::Result<f64> {
    let source: Vec<u8> = if distinct {
        (0..RAW_WRITE_BYTES).map(|i| (i % 251) as u8).collect()
    } else {
        vec![b'x'; 16 * RAW_IO_BYTES]
    };
    let mut best: f64 = 0.0;
    for _ in 0..RAW_WRITE_ROUNDS {
        for (write_bytes, sync_each) in [
            (RAW_IO_BYTES, false),
            (RAW_IO_BYTES, true),
            (16 * RAW_IO_BYTES, true),
        ] {
            settle();
            let file = File::create(path)?;
            let started = Instant::now();
            let mut written = 0u64;
            while written < RAW_WRITE_BYTES {
                let n = (RAW_WRITE_BYTES - written).min(write_bytes as u64) as usize;
                let from = if distinct { written as usize } else { 0 };
                file.write_all_at(&source[from..from + n], written)?;
                if sync_each {
                    file.sync_data()?;
                }
                written += n as u64;
            }
            file.sync_data()?;
            best = best.max(mb_per_s(RAW_WRITE_BYTES, started.elapsed()));
            std::fs::remove_file(path)?;
        }
    }
    Ok(best)
}

/// Runs [`raw_write_fsync`] in a child `kappa-bench raw-write`, so its buffer stays out of this
/// process's peak RSS.
fn raw_write_fsync_in_child(work: &Path, distinct: bool) -> anyhow::Result<f64> {
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command.arg("--dir").arg(work).arg("raw-write");
    if distinct {
        command.arg("--distinct");
    }
    let output = command.output().context("run kappa-bench raw-write")?;
    anyhow::ensure!(
        output.status.success(),
        "raw-write failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// MB/s of one writer doing `chunk`-byte writes, each followed by fdatasync, for `seconds`.
fn raw_fsync_per_append(path: &Path, chunk: usize, seconds: Duration) -> anyhow::Result<f64> {
    let buf = vec![b'x'; chunk];
    let file = File::create(path)?;
    let started = Instant::now();
    let mut written = 0u64;
    while started.elapsed() < seconds.min(Duration::from_secs(2)) {
        file.write_all_at(&buf, written)?;
        file.sync_data()?;
        written += chunk as u64;
    }
    let elapsed = started.elapsed();
    std::fs::remove_file(path)?;
    Ok(mb_per_s(written, elapsed))
}

#[derive(Debug, Serialize)]
struct ReplayReport {
    benchmark: &'static str,
    cases: Vec<ReplayCase>,
    /// Whether the page cache could be dropped, making the cold figures truly cold.
    cold_cache_available: bool,
    peak_rss_bytes: u64,
}

#[derive(Debug, Serialize)]
struct ReplayCase {
    record_bytes: usize,
    records: u64,
    log_bytes: u64,
    cache: &'static str,
    replay_records_per_s: f64,
    replay_mb_per_s: f64,
    raw_read_mb_per_s: f64,
    /// `replay_mb_per_s` ÷ `raw_read_mb_per_s`, median run.
    ratio_to_raw: f64,
    /// The ratio of every run, each replay next to a raw read just before it.
    ratio_runs: Vec<f64>,
}

/// Drops the page cache so the next reads come from the disk; `false` when not permitted.
fn drop_caches() -> bool {
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n").is_ok()
}

fn replay(work: &Path, bytes: u64) -> anyhow::Result<ReplayReport> {
    let mut cases = Vec::new();
    let mut cold_available = false;
    for record_bytes in [100usize, 1024] {
        let dir = work.join(format!("replay-{record_bytes}"));
        let _ = std::fs::remove_dir_all(&dir);
        let (records, log_bytes) = fill_topic(&dir, record_bytes, bytes)?;
        let raw_path = work.join("raw-replay");
        write_plain(&raw_path, log_bytes)?;
        for cache in ["cold", "warm"] {
            // The median of several runs: one run on a shared VM disk is noisy.
            let mut runs = Vec::new();
            for run in 0..REPLAY_RUNS {
                if cache == "warm" {
                    raw_read(&raw_path)?;
                    replay_topic(&dir)?;
                }
                // Which goes first alternates, so that neither always meets the disk (or the
                // host's cache) in the same state.
                let mut raw = 0.0;
                let mut replay = (0, Duration::ZERO);
                for step in 0..2 {
                    if cache == "cold" {
                        cold_available = drop_caches();
                    }
                    if (step + run) % 2 == 0 {
                        raw = raw_read(&raw_path)?;
                    } else {
                        replay = replay_topic(&dir)?;
                    }
                }
                let (replayed, elapsed) = replay;
                anyhow::ensure!(
                    replayed == records,
                    "replayed {replayed} of {records} records"
                );
                runs.push((mb_per_s(log_bytes, elapsed) / raw, elapsed, raw));
            }
            runs.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (ratio, elapsed, raw) = runs[runs.len() / 2];
            let case = ReplayCase {
                record_bytes,
                records,
                log_bytes,
                cache,
                replay_records_per_s: records as f64 / elapsed.as_secs_f64(),
                replay_mb_per_s: mb_per_s(log_bytes, elapsed),
                raw_read_mb_per_s: raw,
                ratio_to_raw: ratio,
                ratio_runs: runs.iter().map(|r| r.0).collect(),
            };
            note(&format!(
                "replay {record_bytes:>4} B records, {cache}: {:>11.0} rec/s {:>7.0} MB/s; raw read {:>7.0} MB/s; ratio {:.2} (runs {:.2?})",
                case.replay_records_per_s,
                case.replay_mb_per_s,
                case.raw_read_mb_per_s,
                case.ratio_to_raw,
                case.ratio_runs
            ));
            cases.push(case);
        }
        std::fs::remove_file(&raw_path)?;
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(ReplayReport {
        benchmark: "log-replay",
        cases,
        cold_cache_available: cold_available,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Fills a one-partition topic with about `bytes` of `record_bytes`-byte records.
fn fill_topic(dir: &Path, record_bytes: usize, bytes: u64) -> anyhow::Result<(u64, u64)> {
    let log = Arc::new(Log::open(dir)?);
    let topic = log.create_topic("replay", TopicConfig::default())?;
    let per_append = (1 << 20) / record_bytes;
    let target = bytes / record_bytes as u64;
    let mut id = 0u64;
    let started = Instant::now();
    while id < target {
        let records: Vec<Record> = (0..per_append)
            .map(|_| {
                id += 1;
                Record::from_value(value_of(id, record_bytes))
            })
            .collect();
        topic.partition(0)?.append_blocking(&records)?;
    }
    let stats = topic.partition(0)?.stats();
    note(&format!(
        "filled a topic with {} records of {record_bytes} B ({:.0} MiB) in {:.1} s",
        stats.offsets.visible_offset,
        stats.size_bytes as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    ));
    drop(topic);
    log.close()?;
    Ok((stats.offsets.visible_offset, stats.size_bytes))
}

fn write_plain(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let buf = vec![b'y'; RAW_IO_BYTES];
    let file = File::create(path)?;
    let mut written = 0u64;
    while written < bytes {
        let n = (bytes - written).min(RAW_IO_BYTES as u64) as usize;
        file.write_all_at(&buf[..n], written)?;
        written += n as u64;
    }
    file.sync_data()?;
    Ok(())
}

/// Reads every byte of `bytes` (a word-wise sum): what any consumer of the data does at least.
/// The replay and the plain-file reference both use it, on values and on whole buffers.
fn touch(bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(8);
    let mut sum = 0u64;
    for w in &mut words {
        sum = sum.wrapping_add(u64::from_le_bytes([
            w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7],
        ]));
    }
    words
        .remainder()
        .iter()
        .fold(sum, |s, b| s.wrapping_add(u64::from(*b)))
}

/// MB/s of reading a plain file in 1 MiB reads (touching every byte, as a replay does).
fn raw_read(path: &Path) -> anyhow::Result<f64> {
    let file = File::open(path)?;
    let mut buf = vec![0u8; RAW_IO_BYTES];
    let started = Instant::now();
    let (mut at, mut checksum) = (0u64, 0u64);
    loop {
        let n = file.read_at(&mut buf, at)?;
        if n == 0 {
            break;
        }
        checksum = checksum.wrapping_add(touch(&buf[..n]));
        at += n as u64;
    }
    let elapsed = started.elapsed();
    std::hint::black_box(checksum);
    Ok(mb_per_s(at, elapsed))
}

/// Replays a topic from offset 0, touching every value; returns records and time.
fn replay_topic(dir: &Path) -> anyhow::Result<(u64, Duration)> {
    let log = Log::open(dir)?;
    let topic = log.topic("replay")?;
    let mut reader = topic.partition(0)?.reader(StartAt::Beginning)?;
    let started = Instant::now();
    let (mut records, mut checksum) = (0u64, 0u64);
    while let Some(chunk) = reader.read(REPLAY_READ_BYTES)? {
        for record in chunk.records() {
            let record = record?;
            checksum = checksum.wrapping_add(touch(record.value));
            records += 1;
        }
    }
    let elapsed = started.elapsed();
    std::hint::black_box(checksum);
    drop(topic);
    log.close()?;
    Ok((records, elapsed))
}
