//! How many records each model sent to the dead-letter topic, counted as letters arrive: the
//! status (asked every 500 ms by the alert monitor, by the UI and by `/metrics`) reads only the
//! letters appended since it last looked, never the whole topic again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kappa_log::{Log, LogError};

use crate::api::DeadLetterCount;

/// The dead letters per (model, topic), and how far each partition of the topic has been read.
#[derive(Debug, Default)]
pub struct DeadLetterTally {
    inner: Mutex<Tally>,
}

#[derive(Debug, Default)]
struct Tally {
    /// The next offset to read, per partition of the dead-letter topic.
    next_offsets: BTreeMap<u32, u64>,
    /// Count and latest reason per (model, topic).
    counts: BTreeMap<(String, String), (u64, String)>,
}

impl DeadLetterTally {
    pub fn new() -> Arc<DeadLetterTally> {
        Arc::new(DeadLetterTally::default())
    }

    /// The counts, after reading what was appended since the last call (blocking I/O: call it
    /// off the async threads). A read error changes nothing: the next call reads the same
    /// letters again.
    pub fn counts(&self, log: &Log) -> Result<Vec<DeadLetterCount>, LogError> {
        let mut tally = self
            .inner
            .lock()
            .expect("a tally is only updated by whole letters, never left half done by a panic");
        let topic = match log.topic(kappa_engine::runner::DEAD_LETTER_TOPIC) {
            Ok(topic) => topic,
            // No letter has been written yet.
            Err(LogError::UnknownTopic { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        for partition in topic.partitions() {
            let from = tally
                .next_offsets
                .get(&partition.id())
                .copied()
                .unwrap_or(0);
            // Counted aside, and kept only once the whole read succeeded.
            let mut fresh = Tally::default();
            let next =
                kappa_engine::runner::each_letter(partition, from, |letter| fresh.count(letter))?;
            for (key, (count, reason)) in fresh.counts {
                let entry = tally.counts.entry(key).or_insert((0, String::new()));
                entry.0 += count;
                entry.1 = reason;
            }
            tally.next_offsets.insert(partition.id(), next);
        }
        Ok(tally
            .counts
            .iter()
            .map(|((model, topic), (count, last_reason))| DeadLetterCount {
                model: model.clone(),
                topic: topic.clone(),
                count: *count,
                last_reason: last_reason.clone(),
            })
            .collect())
    }
}

impl Tally {
    /// Counts one letter.
    fn count(&mut self, letter: &serde_json::Value) {
        let text = |k: &str| letter[k].as_str().unwrap_or("?").to_owned();
        let entry = self
            .counts
            .entry((text("model"), text("topic")))
            .or_insert((0, String::new()));
        entry.0 += 1;
        entry.1 = text("reason");
    }
}
