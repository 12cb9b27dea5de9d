//! `kappa-bench decode`: how fast the engine turns JSON records into Arrow batches, next to
//! arrow-json (arrow-rs's own columnar JSON reader) decoding the same bytes into the same schema,
//! in the same run.
//!
//! Both get the order records of `kappa-bench pipelines` (the same generator), in batches of
//! [`kappa_engine::runner::COMMIT_RECORDS_MAX`] records; each side runs five rounds, taking turns
//! to go first, and the best round counts. The decoder checks every record against the topic's
//! schema and keeps each rejected record's reason; arrow-json stops at the first bad record.

use std::time::Instant;

use anyhow::Context;
use arrow::json::ReaderBuilder;
use kappa_engine::decode::{Decoder, Raw};
use kappa_pipeline::ProjectFiles;
use serde::Serialize;

use crate::note;
use crate::pipelines::{ORDERS_TOML, Rng, order_line};

const ROUNDS: usize = 5;

#[derive(Debug, Serialize)]
pub struct DecodeReport {
    records: u64,
    bytes: u64,
    kappa_records_per_second: f64,
    kappa_mb_per_second: f64,
    arrow_json_records_per_second: f64,
    arrow_json_mb_per_second: f64,
    /// kappa ÷ arrow-json, records per second.
    ratio: f64,
    kappa_seconds: Vec<f64>,
    arrow_json_seconds: Vec<f64>,
}

pub fn run(records: u64) -> anyhow::Result<DecodeReport> {
    let mut files = ProjectFiles::new();
    files.insert("kappa.toml".into(), String::new());
    files.insert("topics/orders.toml".into(), ORDERS_TOML.into());
    let project = kappa_pipeline::load(&files)
        .map_err(|d| anyhow::anyhow!("the orders topic does not load: {d:?}"))?;
    let topic = project.topics.get("orders").context("no orders topic")?;
    let decoder = Decoder::new(topic);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let lines: Vec<String> = (0..records)
        .map(|i| order_line(&mut rng, i, records).1)
        .collect();
    let bytes: u64 = lines.iter().map(|l| l.len() as u64 + 1).sum();
    let batch = kappa_engine::runner::COMMIT_RECORDS_MAX;
    // arrow-json reads newline-delimited text: one buffer per batch, built before timing.
    let ndjson: Vec<Vec<u8>> = lines
        .chunks(batch)
        .map(|chunk| {
            let mut text = chunk.join("\n").into_bytes();
            text.push(b'\n');
            text
        })
        .collect();

    let kappa = || -> anyhow::Result<f64> {
        let started = Instant::now();
        let mut rows = 0;
        for chunk in lines.chunks(batch) {
            let (decoded, rejected) = decoder.decode(chunk.iter().enumerate().map(|(i, l)| Raw {
                partition: 0,
                offset: i as u64,
                value: l.as_bytes(),
            }));
            anyhow::ensure!(rejected.is_empty(), "rejected: {:?}", rejected.first());
            rows += decoded.num_rows();
        }
        anyhow::ensure!(rows as u64 == records, "decoded {rows} of {records}");
        Ok(started.elapsed().as_secs_f64())
    };
    let arrow_json = || -> anyhow::Result<f64> {
        let started = Instant::now();
        let mut rows = 0;
        for text in &ndjson {
            let reader = ReaderBuilder::new(decoder.schema().clone())
                .with_batch_size(batch)
                .build(std::io::Cursor::new(text))?;
            for decoded in reader {
                rows += decoded?.num_rows();
            }
        }
        anyhow::ensure!(
            rows as u64 == records,
            "arrow-json read {rows} of {records}"
        );
        Ok(started.elapsed().as_secs_f64())
    };
    let (mut kappa_seconds, mut arrow_json_seconds) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        if round % 2 == 0 {
            kappa_seconds.push(kappa()?);
            arrow_json_seconds.push(arrow_json()?);
        } else {
            arrow_json_seconds.push(arrow_json()?);
            kappa_seconds.push(kappa()?);
        }
    }
    let best = |s: &[f64]| s.iter().copied().fold(f64::INFINITY, f64::min);
    let (k, a) = (best(&kappa_seconds), best(&arrow_json_seconds));
    let report = DecodeReport {
        records,
        bytes,
        kappa_records_per_second: records as f64 / k,
        kappa_mb_per_second: bytes as f64 / k / 1e6,
        arrow_json_records_per_second: records as f64 / a,
        arrow_json_mb_per_second: bytes as f64 / a / 1e6,
        ratio: a / k,
        kappa_seconds,
        arrow_json_seconds,
    };
    note(&format!(
        "decode {records} records ({bytes} B): kappa {:.0} rec/s ({:.0} MB/s) · arrow-json {:.0} \
         rec/s ({:.0} MB/s) · ratio {:.2}",
        report.kappa_records_per_second,
        report.kappa_mb_per_second,
        report.arrow_json_records_per_second,
        report.arrow_json_mb_per_second,
        report.ratio
    ));
    Ok(report)
}
