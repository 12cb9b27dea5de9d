//! The log a project's models read and write their dead letters to: the embedded log
//! (`kappa-log`, the default) or a Kafka-protocol cluster (`kappa-kafka`, `[log] backend =
//! "kafka"`). Either way a model keeps its positions in its own Iceberg commits; the backend
//! only decides where records are read from and where dead letters go.
//!
//! ```text
//!   EventLog::Embedded(Log) ─► TopicSource over kappa_log readers (waits on visible offsets)
//!   EventLog::Kafka(KafkaLog) ─► TopicSource over kappa_kafka readers (explicit assignment,
//!                                polled; offsets also committed to a consumer group)
//!   dead letters ─► runner::letters::DeadLetters: the `dead_letters` topic of the same log
//! ```

use std::sync::Arc;

use kappa_kafka::Cluster;
use kappa_log::Log;

/// Where a project's topics live.
#[derive(Clone)]
pub enum EventLog {
    Embedded(Arc<Log>),
    Kafka(KafkaLog),
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventLog::Embedded(_) => f.write_str("EventLog::Embedded"),
            EventLog::Kafka(kafka) => write!(f, "EventLog::Kafka({:?})", kafka.cluster),
        }
    }
}

/// A Kafka cluster as a project's log.
#[derive(Clone, Debug)]
pub struct KafkaLog {
    pub cluster: Arc<Cluster>,
    /// The project's name: a model's consumer group is `kappa.<project>.<model>.<version>`.
    pub project: String,
}

impl KafkaLog {
    /// The next offset of each partition of `topic`, as the cluster says now. Blocking.
    pub fn ends(&self, topic: &str) -> Result<std::collections::BTreeMap<u32, u64>, EventLogError> {
        Ok(blocking(|| self.cluster.offsets(topic))?
            .into_iter()
            .map(|p| (p.partition, p.next))
            .collect())
    }

    /// The consumer group a version of a model commits its offsets to, for monitoring only.
    pub fn group(&self, model_id: &str, version: &str) -> String {
        format!("kappa.{}.{model_id}.{version}", self.project)
    }
}

/// Why the log could not be reached or read.
#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error(transparent)]
    Embedded(#[from] kappa_log::LogError),
    #[error(transparent)]
    Kafka(#[from] kappa_kafka::KafkaError),
}

impl EventLog {
    /// The next offset of each partition of `topic` (where the records written so far end).
    pub fn ends(&self, topic: &str) -> Result<std::collections::BTreeMap<u32, u64>, EventLogError> {
        match self {
            EventLog::Embedded(log) => Ok(log
                .topic(topic)?
                .partitions()
                .iter()
                .map(|p| (p.id(), p.offsets().visible_offset))
                .collect()),
            EventLog::Kafka(kafka) => kafka.ends(topic),
        }
    }

    /// The number of partitions of `topic`.
    pub fn partition_count(&self, topic: &str) -> Result<u32, EventLogError> {
        match self {
            EventLog::Embedded(log) => Ok(log.topic(topic)?.partition_count()),
            EventLog::Kafka(kafka) => blocking(|| kafka.cluster.partition_count(topic))?
                .ok_or_else(|| {
                    EventLogError::Kafka(kappa_kafka::KafkaError::Topic {
                        topic: topic.to_owned(),
                        reason: "no such topic on the cluster (kappa up creates the project's \
                                 topics when it starts)"
                            .to_owned(),
                    })
                }),
        }
    }
}

/// Records asked of a Kafka partition per read.
pub(crate) const READ_RECORDS: usize = 10_000;

/// Runs `f`, which may wait on the network, without stalling the other tasks of a
/// multi-threaded runtime (a single-threaded one, as in tests, simply waits).
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
