//! A Kafka-protocol cluster as kappa's log (`[log] backend = "kafka"` in `kappa.toml`):
//! Apache Kafka, Redpanda, MSK, Confluent or Tansu, reached through librdkafka (`rdkafka`).
//!
//! ```text
//! kappa.toml [log.kafka] ──settings::client_config──► ClientConfig (secrets from the environment)
//!                                                      │
//!                      Cluster ◄────────────────────────┘
//!                      ├─ ensure_topic: create what the project declares, check what exists
//!                      ├─ topic: partitions with their earliest and next offsets
//!                      ├─ append: idempotent producer, acks=all, Kafka's murmur2 partitioner
//!                      ├─ reader: one partition by explicit assignment, from an offset
//!                      └─ commit_group: offsets into a consumer group, for monitoring only
//! ```
//!
//! Exactly once without Kafka transactions: a reader starts from the offsets kappa keeps in
//! its own Iceberg commits; the consumer group is only written to, so that Kafka's tools show
//! the lag.

mod cluster;
mod reader;
pub mod settings;

pub use cluster::{Cluster, Ensured, PartitionOffsets};
pub use reader::{PartitionReader, ReadRecord};

/// What went wrong talking to the cluster, named so that the user can act on it.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// `[log.kafka]` cannot make a client.
    #[error("kappa.toml [log.kafka]: {0}")]
    Settings(String),
    /// The cluster did not answer, or refused the request.
    #[error("the Kafka cluster at {servers}: {reason}")]
    Cluster { servers: String, reason: String },
    /// A topic differs from what the project declares, or an operation on it failed.
    #[error("topic `{topic}` on the Kafka cluster: {reason}")]
    Topic { topic: String, reason: String },
}

pub type Result<T, E = KafkaError> = std::result::Result<T, E>;

/// How long a request to the cluster may take before it is reported as unanswered.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// librdkafka's index of partition `partition`. Partition counts come from the cluster's own
/// metadata (a list librdkafka indexes with `i32`), so every partition kappa names fits.
pub(crate) fn partition_index(partition: u32) -> i32 {
    i32::try_from(partition).unwrap_or(i32::MAX)
}

/// A client librdkafka would not create from the settings (a property it does not know, a
/// value it refuses).
pub(crate) fn client_error(e: rdkafka::error::KafkaError) -> KafkaError {
    KafkaError::Settings(e.to_string())
}
