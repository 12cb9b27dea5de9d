//! How many records each model sent to the dead-letter topic, counted as letters arrive: the
//! status (asked every 500 ms by the alert monitor, by the UI and by `/metrics`) reads only the
//! letters appended since it last looked, never the whole topic again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kappa_log::{Log, LogError, StartAt};

use crate::api::DeadLetterCount;

/// Bytes of the dead-letter topic read at a time.
const READ_BYTES: usize = 1 << 20;

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
    /// off the async threads). A read error leaves the counts where the last whole letter
    /// left them, to be continued by the next call.
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
            if from >= partition.offsets().visible_offset {
                continue;
            }
            let start = if from == 0 {
                StartAt::Beginning
            } else {
                StartAt::Offset(from)
            };
            let mut reader = partition.reader(start)?;
            while let Some(chunk) = reader.read(READ_BYTES)? {
                for record in chunk.records() {
                    let record = record?;
                    tally.count(record.value);
                    tally.next_offsets.insert(partition.id(), record.offset + 1);
                }
            }
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
    /// Counts one letter (a value that is not JSON is not one of ours and is passed over).
    fn count(&mut self, value: &[u8]) {
        let Ok(letter) = serde_json::from_slice::<serde_json::Value>(value) else {
            return;
        };
        let text = |k: &str| letter[k].as_str().unwrap_or("?").to_owned();
        let entry = self
            .counts
            .entry((text("model"), text("topic")))
            .or_insert((0, String::new()));
        entry.0 += 1;
        entry.1 = text("reason");
    }
}
