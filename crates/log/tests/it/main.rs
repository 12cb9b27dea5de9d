//! Integration tests of the embedded log, one binary (see STYLE.md).
#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

mod basics;
mod durability;
mod follow;
mod power_loss;
mod recovery;
mod retention;

use kappa_log::{Log, PartitionReader, Record, TopicConfig};

/// Every record a reader yields until it catches up: (offset, value).
pub fn drain(reader: &mut PartitionReader) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(chunk) = reader.read(64 * 1024).unwrap() {
        for r in chunk.records() {
            let r = r.unwrap();
            out.push((r.offset, r.value.to_vec()));
        }
    }
    out
}

/// Everything in partition `p` of `topic`, from the start.
pub fn all_values(log: &Log, topic: &str, p: u32) -> Vec<(u64, Vec<u8>)> {
    let topic = log.topic(topic).unwrap();
    let mut reader = topic
        .partition(p)
        .unwrap()
        .reader(kappa_log::StartAt::Beginning)
        .unwrap();
    drain(&mut reader)
}

pub fn values(prefix: &str, n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record::from_value(format!("{prefix}-{i}")))
        .collect()
}

pub fn small_segments() -> TopicConfig {
    TopicConfig {
        segment_bytes_max: 2048,
        index_interval_bytes: 128,
        ..TopicConfig::default()
    }
}
