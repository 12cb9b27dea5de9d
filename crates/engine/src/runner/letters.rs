//! The dead-letter topic: every record that does not fit its topic's schema (or comes too
//! late), with the reason, reported once by one model.

use std::collections::BTreeSet;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kappa_kafka::Cluster;
use kappa_log::{Log, Record, StartAt, Topic};
use kappa_pipeline::Project;

use crate::decode::Rejected;
use crate::event_log::{EventLog, EventLogError, READ_RECORDS, blocking};
use crate::topic_source::READ_BYTES;

/// The topic where records that do not fit their topic's schema go, with the reason.
pub const DEAD_LETTER_TOPIC: &str = "dead_letters";

/// The model that reports the records of `topic` that do not fit its schema: the first model,
/// in dependency order, whose rows come from `topic`. Every other model skips them silently.
pub fn rejects_reporter(project: &Project, topic: &str) -> Option<String> {
    project
        .order
        .iter()
        .find(|id| reads_topic(project, id, topic))
        .cloned()
}

/// Whether the rows of model `id` come from `topic`: through the models it recomputes, or
/// directly when it reads its upstream's table.
fn reads_topic(project: &Project, id: &str, topic: &str) -> bool {
    if project.reads_tables.contains_key(id) {
        project.models.get(id).is_some_and(|m| {
            m.inputs
                .contains(&kappa_pipeline::Input::Topic(topic.to_owned()))
        })
    } else {
        project.source_topics(id).contains(topic)
    }
}

/// The dead-letter topic, created on first use.
pub fn dead_letter_topic(log: &Log) -> kappa_log::Result<Arc<Topic>> {
    match log.topic(DEAD_LETTER_TOPIC) {
        Ok(topic) => Ok(topic),
        Err(kappa_log::LogError::UnknownTopic { .. }) => {
            match log.create_topic(DEAD_LETTER_TOPIC, kappa_log::TopicConfig::default()) {
                Ok(topic) => Ok(topic),
                Err(kappa_log::LogError::TopicExists { .. }) => log.topic(DEAD_LETTER_TOPIC),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

pub(super) fn dead_letter(model: &str, topic: &str, rejected: &Rejected) -> Record {
    let mut value = serde_json::json!({
        "model": model,
        "topic": topic,
        "partition": rejected.partition,
        "offset": rejected.offset,
        "reason": rejected.reason,
        "raw_base64": BASE64.encode(&rejected.raw),
    });
    // The raw bytes as text too when they are UTF-8, for people reading the topic.
    if let (Ok(text), Some(fields)) = (std::str::from_utf8(&rejected.raw), value.as_object_mut()) {
        fields.insert("raw".to_owned(), text.into());
    }
    Record::keyed(model.to_owned(), value.to_string())
}

/// The dead-letter topic of a project's log.
#[derive(Clone)]
pub(crate) enum DeadLetters {
    Embedded(Arc<Topic>),
    Kafka {
        cluster: Arc<Cluster>,
        /// An offset no letter written after it is below: the topic's end as last asked (at
        /// most [`END_ASKED_EVERY`] ago), or past this runner's last letter if that is further.
        end: Arc<AtomicU64>,
        asked: Arc<std::sync::Mutex<std::time::Instant>>,
    },
}

/// How often a runner on a Kafka cluster asks for the dead-letter topic's end, so that the
/// offset its commits record stays close (a retry reads the letters from it on).
const END_ASKED_EVERY: Duration = Duration::from_secs(10);

/// How long a read of the dead letters of a Kafka cluster waits for the next record before it
/// takes the topic's end as reached.
const LETTERS_READ_WAIT: Duration = Duration::from_secs(2);

/// The earliest kept and the next offset of the dead-letter topic's one partition on a
/// cluster. Blocking.
fn letters_span(cluster: &Cluster) -> kappa_kafka::Result<(u64, u64)> {
    Ok(cluster
        .offsets(DEAD_LETTER_TOPIC)?
        .first()
        .map_or((0, 0), |p| (p.earliest, p.next)))
}

impl DeadLetters {
    /// The dead-letter topic of `log`, created on first use.
    pub(crate) async fn open(log: &EventLog) -> Result<DeadLetters, EventLogError> {
        match log {
            EventLog::Embedded(log) => Ok(DeadLetters::Embedded(dead_letter_topic(log)?)),
            EventLog::Kafka(kafka) => {
                // One partition: a model's letters keep their order, and one offset says where
                // a commit's letters end.
                kafka.cluster.ensure_topic(DEAD_LETTER_TOPIC, 1).await?;
                let (_, end) = blocking(|| letters_span(&kafka.cluster))?;
                Ok(DeadLetters::Kafka {
                    cluster: kafka.cluster.clone(),
                    end: Arc::new(AtomicU64::new(end)),
                    asked: Arc::new(std::sync::Mutex::new(std::time::Instant::now())),
                })
            }
        }
    }

    /// Appends `letters`, once the log has them all.
    pub(crate) async fn append(&self, letters: Vec<Record>) -> Result<(), String> {
        match self {
            DeadLetters::Embedded(topic) => topic
                .append(letters)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            DeadLetters::Kafka { cluster, end, .. } => {
                let landed = cluster
                    .append(DEAD_LETTER_TOPIC, &letters)
                    .await
                    .map_err(|e| e.to_string())?;
                if let Some(last) = landed.iter().map(|p| p.offset + 1).max() {
                    end.fetch_max(last, Ordering::Relaxed);
                }
                Ok(())
            }
        }
    }

    /// An offset of the dead-letter topic that every letter written after this call is at or
    /// past: what a commit records, so that a retry finds the letters it already wrote.
    pub(crate) fn end(&self) -> u64 {
        match self {
            DeadLetters::Embedded(topic) => topic
                .partition(0)
                .map(|p| p.offsets().visible_offset)
                .unwrap_or(0),
            DeadLetters::Kafka {
                cluster,
                end,
                asked,
            } => {
                let due = asked.lock().map_or(true, |mut at| {
                    let due = at.elapsed() >= END_ASKED_EVERY;
                    if due {
                        *at = std::time::Instant::now();
                    }
                    due
                });
                if due {
                    match blocking(|| letters_span(cluster)) {
                        Ok((_, next)) => {
                            end.fetch_max(next, Ordering::Relaxed);
                        }
                        // The last end known still holds: it only gets further from the end.
                        Err(e) => {
                            tracing::warn!(error = %e, "asking for the dead-letter topic's end")
                        }
                    }
                }
                end.load(Ordering::Relaxed)
            }
        }
    }

    /// The records `model` put in the dead-letter topic from offset `from` on, as (topic,
    /// partition, offset) of the records they report. A read error is an error, never a
    /// shorter set (which would write the letters past it again).
    pub(crate) fn written_after(
        &self,
        from: u64,
        model: &str,
    ) -> Result<BTreeSet<(String, u32, u64)>, String> {
        let mut seen = BTreeSet::new();
        let mut each = |letter: &serde_json::Value| {
            if letter["model"] == model
                && let (Some(topic), Some(p), Some(o)) = (
                    letter["topic"].as_str(),
                    letter["partition"].as_u64(),
                    letter["offset"].as_u64(),
                )
            {
                seen.insert((topic.to_owned(), p as u32, o));
            }
        };
        match self {
            DeadLetters::Embedded(topic) => {
                let partition = topic.partition(0).map_err(|e| e.to_string())?;
                each_letter(partition, from, each).map_err(|e| e.to_string())?;
            }
            DeadLetters::Kafka { cluster, .. } => blocking(|| {
                let (earliest, end) = letters_span(cluster).map_err(|e| e.to_string())?;
                // Letters retention dropped are not there to be written twice.
                let from = from.max(earliest);
                if from >= end {
                    return Ok(());
                }
                let mut reader = cluster
                    .reader(DEAD_LETTER_TOPIC, 0, from)
                    .map_err(|e| e.to_string())?;
                while reader.position() < end {
                    let read = reader
                        .read(READ_RECORDS, LETTERS_READ_WAIT)
                        .map_err(|e| e.to_string())?;
                    if read.is_empty() {
                        if reader.at_end() {
                            break;
                        }
                        return Err(format!(
                            "the dead-letter topic on the Kafka cluster stopped at offset {} \
                             before its end {end}",
                            reader.position()
                        ));
                    }
                    for record in read {
                        if let Ok(letter) = serde_json::from_slice(&record.record.value) {
                            each(&letter);
                        }
                    }
                }
                Ok::<(), String>(())
            })?,
        }
        Ok(seen)
    }
}

/// Calls `each` with every letter of a dead-letter `partition` from offset `from` to its end
/// (a record that is not JSON is not one of ours, and is passed over); returns the offset after
/// the last record read. A read error is an error, never a shorter read.
pub fn each_letter(
    partition: &kappa_log::Partition,
    from: u64,
    mut each: impl FnMut(&serde_json::Value),
) -> Result<u64, kappa_log::LogError> {
    let mut next = from;
    if from >= partition.offsets().visible_offset {
        return Ok(next);
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
            next = record.offset + 1;
            if let Ok(letter) = serde_json::from_slice::<serde_json::Value>(record.value) {
                each(&letter);
            }
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kappa_log::TopicConfig;

    /// A damaged letter in the middle of the dead-letter topic is an error, not the letters
    /// before it: with those only, the runner would write the letters after it again.
    #[test]
    fn dead_letters_after_a_damaged_letter_are_an_error_not_a_short_set() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        {
            let log = Log::open(dir.path()).expect("a log in a fresh directory");
            let topic = log
                .create_topic(DEAD_LETTER_TOPIC, TopicConfig::default())
                .expect("a new topic");
            let partition = topic.partition(0).expect("partition 0");
            for offset in 0..3 {
                let rejected = Rejected {
                    partition: 0,
                    offset,
                    reason: "bad".into(),
                    raw: b"{\"x\":".to_vec(),
                };
                partition
                    .append_blocking(&[dead_letter("silver.orders", "orders", &rejected)])
                    .expect("an append");
            }
            let found = DeadLetters::Embedded(topic.clone())
                .written_after(0, "silver.orders")
                .expect("a whole topic");
            assert_eq!(found.len(), 3);
            log.close().expect("a clean close");
        }
        // Flip a byte of the second letter's value.
        let segment = walk(dir.path())
            .into_iter()
            .find(|p| p.extension().is_some_and(|e| e == "log"))
            .expect("a segment file");
        let mut bytes = std::fs::read(&segment).expect("the segment");
        let second = bytes
            .windows(5)
            .enumerate()
            .filter(|(_, w)| *w == b"model")
            .nth(1)
            .expect("a second letter")
            .0;
        bytes[second] ^= 0x20;
        std::fs::write(&segment, bytes).expect("the damaged segment");
        let log =
            Log::open(dir.path()).expect("the log opens: the damage is before the durable point");
        let topic = log.topic(DEAD_LETTER_TOPIC).expect("the topic");
        assert!(
            DeadLetters::Embedded(topic)
                .written_after(0, "silver.orders")
                .is_err()
        );
    }

    /// Every file below `dir`.
    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).expect("a readable folder").flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
        files
    }
}
