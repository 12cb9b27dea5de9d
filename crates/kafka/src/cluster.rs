//! The cluster: its topics, an idempotent producer, and consumer groups written for
//! monitoring.

use std::collections::BTreeMap;
use std::time::Duration;

use kappa_log::{Record, RecordPosition};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::reader::PartitionReader;
use crate::settings::{PRODUCER_SETTINGS, servers};
use crate::{KafkaError, REQUEST_TIMEOUT, Result, client_error, partition_index};

/// How many times a topic another member created is looked for in the metadata, and the pause
/// between two looks.
const TOPIC_APPEARS_ATTEMPTS: usize = 5;
const TOPIC_APPEARS_PAUSE: Duration = Duration::from_millis(200);
/// The pause before a record is offered again to a full local queue.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// A Kafka-protocol cluster reached with one configuration.
pub struct Cluster {
    config: ClientConfig,
    servers: String,
    admin: AdminClient<DefaultClientContext>,
    /// Also asked for metadata and offsets (its client is polled, so its events drain).
    producer: FutureProducer,
    /// The replication factor of the topics it creates (-1: the brokers' default).
    replication: i32,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

/// What [`Cluster::ensure_topic`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    Created,
    /// It was there, with the partitions declared.
    Existed,
}

/// One partition's offsets: the first the cluster still keeps (not 0 once retention dropped
/// history) and the next it will assign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub partition: u32,
    pub earliest: u64,
    pub next: u64,
}

impl Cluster {
    /// Clients of the cluster `config` names (created without a connection: librdkafka
    /// connects when asked, and reports an unreachable cluster on the first request).
    pub fn new(config: ClientConfig) -> Result<Cluster> {
        let servers = servers(&config);
        let mut producing = config.clone();
        for (name, value) in PRODUCER_SETTINGS {
            producing.set(*name, *value);
        }
        Ok(Cluster {
            admin: config.create().map_err(client_error)?,
            producer: producing.create().map_err(client_error)?,
            servers,
            config,
            replication: -1,
        })
    }

    /// Clients of the cluster at `bootstrap` (`host:port`, comma-separated), librdkafka's
    /// defaults otherwise: for tools and tests that need no `[log.kafka]`.
    pub fn connect(bootstrap: &str) -> Result<Cluster> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", bootstrap);
        Cluster::new(config)
    }

    /// Topics it creates get `factor` replicas instead of the brokers' default (a broker
    /// that has no default, or a test's single broker).
    pub fn with_replication(mut self, factor: i32) -> Cluster {
        self.replication = factor;
        self
    }

    fn cluster_err(&self, reason: impl std::fmt::Display) -> KafkaError {
        KafkaError::Cluster {
            servers: self.servers.clone(),
            reason: reason.to_string(),
        }
    }

    fn topic_err(topic: &str, reason: impl std::fmt::Display) -> KafkaError {
        KafkaError::Topic {
            topic: topic.to_owned(),
            reason: reason.to_string(),
        }
    }

    /// The number of partitions of `topic`, `None` when the cluster has no such topic.
    /// Blocking (up to [`REQUEST_TIMEOUT`]).
    pub fn partition_count(&self, topic: &str) -> Result<Option<u32>> {
        let metadata = self
            .producer
            .client()
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
            .map_err(|e| self.cluster_err(format!("metadata of `{topic}`: {e}")))?;
        let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Ok(None);
        };
        match found.error() {
            None => Ok(Some(
                u32::try_from(found.partitions().len()).unwrap_or(u32::MAX),
            )),
            Some(code)
                if RDKafkaErrorCode::from(code) == RDKafkaErrorCode::UnknownTopicOrPartition =>
            {
                Ok(None)
            }
            Some(code) => Err(Self::topic_err(topic, RDKafkaErrorCode::from(code))),
        }
    }

    /// Makes sure the cluster has `topic` with `partitions` partitions: creates it when
    /// missing; an existing topic with another count is an error that says both. Its metadata
    /// requests block (up to [`REQUEST_TIMEOUT`] each): call it where blocking is allowed.
    pub async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<Ensured> {
        // Created meanwhile by another member, the topic may take a moment to show in the
        // metadata: looked at again a few times.
        for _ in 0..TOPIC_APPEARS_ATTEMPTS {
            match self.create_or_check(topic, partitions).await? {
                Some(ensured) => return Ok(ensured),
                None => tokio::time::sleep(TOPIC_APPEARS_PAUSE).await,
            }
        }
        Err(Self::topic_err(
            topic,
            "the cluster says it exists, and its metadata does not show it",
        ))
    }

    /// One attempt of [`Cluster::ensure_topic`]; `None`: created by someone else meanwhile.
    async fn create_or_check(&self, topic: &str, partitions: u32) -> Result<Option<Ensured>> {
        match self.partition_count(topic)? {
            Some(n) if n == partitions => return Ok(Some(Ensured::Existed)),
            Some(n) => {
                return Err(Self::topic_err(
                    topic,
                    format!(
                        "it has {n} partitions, and topics/{topic}.toml declares {partitions}: \
                         change the declaration to {n}, or recreate the topic on the cluster"
                    ),
                ));
            }
            None => {}
        }
        let count = i32::try_from(partitions)
            .map_err(|_| Self::topic_err(topic, format!("{partitions} partitions is too many")))?;
        let new = NewTopic::new(topic, count, TopicReplication::Fixed(self.replication));
        let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let results = self
            .admin
            .create_topics([&new], &options)
            .await
            .map_err(|e| self.cluster_err(format!("creating `{topic}`: {e}")))?;
        for result in results {
            match result {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => return Ok(None),
                Err((_, code)) => {
                    return Err(Self::topic_err(topic, format!("creating it: {code}")));
                }
            }
        }
        tracing::info!(topic, partitions, servers = %self.servers, "created the topic on the Kafka cluster");
        Ok(Some(Ensured::Created))
    }

    /// Every partition of `topic` with its earliest and next offsets. Blocking.
    pub fn offsets(&self, topic: &str) -> Result<Vec<PartitionOffsets>> {
        self.topic_offsets(topic)?
            .ok_or_else(|| Self::topic_err(topic, "no such topic"))
    }

    /// [`Cluster::offsets`], `None` when the cluster has no such topic. Blocking.
    pub fn topic_offsets(&self, topic: &str) -> Result<Option<Vec<PartitionOffsets>>> {
        let Some(count) = self.partition_count(topic)? else {
            return Ok(None);
        };
        (0..count)
            .map(|partition| {
                let p = partition_index(partition);
                let (low, high) = self
                    .producer
                    .client()
                    .fetch_watermarks(topic, p, REQUEST_TIMEOUT)
                    .map_err(|e| self.cluster_err(format!("offsets of `{topic}`/{p}: {e}")))?;
                Ok(PartitionOffsets {
                    partition,
                    earliest: u64::try_from(low).unwrap_or(0),
                    next: u64::try_from(high).unwrap_or(0),
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Appends `records` to `topic`, each to the partition its key hashes to (Kafka's murmur2,
    /// as the embedded log and Kafka's Java client do; spread without a key), and returns
    /// where each landed, in input order, once the cluster acknowledged every one (acks=all).
    ///
    /// Every record handed to the producer is waited for, also when one fails: the error says
    /// which records failed and that the others are in the log (the idempotent producer never
    /// writes one twice, but a retry of the whole call would).
    pub async fn append(&self, topic: &str, records: &[Record]) -> Result<Vec<RecordPosition>> {
        let mut deliveries = Vec::with_capacity(records.len());
        let mut refused = None;
        for (i, record) in records.iter().enumerate() {
            let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
            for header in &record.headers {
                headers = headers.insert(Header {
                    key: &header.key,
                    value: header.value.as_deref(),
                });
            }
            let mut message = FutureRecord::<[u8], [u8]>::to(topic)
                .payload(&record.value[..])
                .headers(headers);
            if let Some(key) = &record.key {
                message = message.key(&key[..]);
            }
            // A full local queue waits for room rather than failing the record.
            loop {
                match self.producer.send_result(message) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                        back,
                    )) => {
                        message = back;
                        tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                    }
                    Err((e, _)) => {
                        refused = Some(format!("record {i} was refused before sending: {e}"));
                        break;
                    }
                }
            }
            if refused.is_some() {
                break;
            }
        }
        let mut placed = Vec::with_capacity(deliveries.len());
        let mut failed = Vec::new();
        for (i, delivery) in deliveries.into_iter().enumerate() {
            match delivery.await {
                Ok(Ok(delivered)) => match (
                    u32::try_from(delivered.partition),
                    u64::try_from(delivered.offset),
                ) {
                    (Ok(partition), Ok(offset)) => {
                        placed.push(RecordPosition { partition, offset });
                    }
                    _ => failed.push(format!(
                        "record {i}: delivered at an impossible place (partition {}, offset {})",
                        delivered.partition, delivered.offset
                    )),
                },
                Ok(Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        RDKafkaErrorCode::MessageTimedOut,
                    ),
                    _,
                ))) => {
                    failed.push(format!(
                        "record {i}: no acknowledgement in time (it may have been written)"
                    ));
                }
                Ok(Err((e, _))) => failed.push(format!("record {i} not delivered: {e}")),
                Err(_) => failed.push(format!("record {i}: the producer stopped")),
            }
        }
        if failed.is_empty() && refused.is_none() {
            return Ok(placed);
        }
        let not_sent = records.len() - placed.len() - failed.len();
        let first = failed
            .first()
            .or(refused.as_ref())
            .cloned()
            .unwrap_or_default();
        Err(Self::topic_err(
            topic,
            format!(
                "{} of {} records are in the log, {} failed, {not_sent} were not sent ({first}; \
                 cluster {})",
                placed.len(),
                records.len(),
                failed.len(),
                self.servers
            ),
        ))
    }

    /// Waits until every record handed to the producer is delivered or failed.
    pub fn flush(&self) -> Result<()> {
        self.producer
            .flush(REQUEST_TIMEOUT)
            .map_err(|e| self.cluster_err(format!("flushing the producer: {e}")))
    }

    /// A reader of `topic`'s partition `partition` from `offset` (by explicit assignment: no
    /// consumer group decides what it reads).
    pub fn reader(&self, topic: &str, partition: u32, offset: u64) -> Result<PartitionReader> {
        PartitionReader::open(&self.config, &self.servers, topic, partition, offset)
    }

    /// The offset of the first record of `topic`'s `partition` stamped at or after
    /// `timestamp_ms`; the partition's next offset when there is none. Blocking.
    pub fn offset_for_time(&self, topic: &str, partition: u32, timestamp_ms: i64) -> Result<u64> {
        let consumer = self.group_member("kappa.offsets")?;
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(
            topic,
            partition_index(partition),
            Offset::Offset(timestamp_ms),
        )
        .map_err(|e| Self::topic_err(topic, e))?;
        let found = consumer
            .offsets_for_times(list, REQUEST_TIMEOUT)
            .map_err(|e| self.cluster_err(format!("offsets of `{topic}` by time: {e}")))?;
        let offset = found
            .elements()
            .first()
            .map(|e| e.offset())
            .ok_or_else(|| Self::topic_err(topic, format!("no partition {partition}")))?;
        match offset {
            Offset::Offset(o) => Ok(u64::try_from(o).unwrap_or(0)),
            // No record that late: where the next one will go.
            _ => {
                let (_, high) = self
                    .producer
                    .client()
                    .fetch_watermarks(topic, partition_index(partition), REQUEST_TIMEOUT)
                    .map_err(|e| self.cluster_err(format!("offsets of `{topic}`: {e}")))?;
                Ok(u64::try_from(high).unwrap_or(0))
            }
        }
    }

    /// A client of consumer group `group` that reads nothing and commits only when told.
    fn group_member(&self, group: &str) -> Result<BaseConsumer> {
        let mut config = self.config.clone();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false");
        config.create().map_err(client_error)
    }

    /// Records `offsets` (topic → partition → next offset) as consumer group `group`'s
    /// committed offsets: what Kafka's tools show as its position and lag. kappa itself
    /// resumes from its Iceberg commits, never from these. Blocking.
    pub fn commit_group(
        &self,
        group: &str,
        offsets: &BTreeMap<String, BTreeMap<u32, u64>>,
    ) -> Result<()> {
        if offsets.values().all(BTreeMap::is_empty) {
            return Ok(());
        }
        let consumer = self.group_member(group)?;
        let mut list = TopicPartitionList::new();
        for (topic, partitions) in offsets {
            for (partition, next) in partitions {
                let p = partition_index(*partition);
                let o = i64::try_from(*next).unwrap_or(i64::MAX);
                list.add_partition_offset(topic, p, Offset::Offset(o))
                    .map_err(|e| self.cluster_err(format!("group {group}: {e}")))?;
            }
        }
        consumer
            .commit(&list, CommitMode::Sync)
            .map_err(|e| self.cluster_err(format!("committing group {group}'s offsets: {e}")))
    }

    /// Consumer group `group`'s committed offsets of `topic`'s partitions (those it has).
    /// Blocking.
    pub fn group_offsets(&self, group: &str, topic: &str) -> Result<BTreeMap<u32, u64>> {
        let count = self
            .partition_count(topic)?
            .ok_or_else(|| Self::topic_err(topic, "no such topic"))?;
        let consumer = self.group_member(group)?;
        let mut list = TopicPartitionList::new();
        for partition in 0..count {
            list.add_partition(topic, partition_index(partition));
        }
        let committed = consumer
            .committed_offsets(list, REQUEST_TIMEOUT)
            .map_err(|e| self.cluster_err(format!("group {group}'s offsets: {e}")))?;
        Ok(committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => {
                    Some((u32::try_from(e.partition()).ok()?, u64::try_from(o).ok()?))
                }
                _ => None,
            })
            .collect())
    }
}
