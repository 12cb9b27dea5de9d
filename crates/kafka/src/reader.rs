//! One partition read by explicit assignment from an offset kappa chose (from its own Iceberg
//! commits), in order, with each record's offset and timestamp.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kappa_log::{Header, Record};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::{KafkaError, Result};

/// A record read from the cluster, where it was and when the cluster stamped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRecord {
    pub offset: u64,
    /// Milliseconds since the epoch (the producer's or the log's time, as the topic says).
    pub timestamp_ms: Option<i64>,
    pub record: Record,
}

/// A reader of one partition.
pub struct PartitionReader {
    consumer: BaseConsumer,
    servers: String,
    topic: String,
    partition: u32,
    /// The offset of the next record it returns.
    next: u64,
}

impl std::fmt::Debug for PartitionReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionReader")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl PartitionReader {
    pub(crate) fn open(
        config: &ClientConfig,
        servers: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<PartitionReader> {
        let mut config = config.clone();
        // No group decides what it reads, and nothing is committed behind kappa's back.
        config
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "error");
        if config.get("group.id").is_none() {
            config.set("group.id", "kappa.readers");
        }
        let consumer: BaseConsumer = config
            .create()
            .map_err(|e| KafkaError::Settings(e.to_string()))?;
        let mut reader = PartitionReader {
            consumer,
            servers: servers.to_owned(),
            topic: topic.to_owned(),
            partition,
            next: offset,
        };
        reader.assign(offset)?;
        Ok(reader)
    }

    fn assign(&mut self, offset: u64) -> Result<()> {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(
            &self.topic,
            i32::try_from(self.partition).unwrap_or(i32::MAX),
            Offset::Offset(i64::try_from(offset).unwrap_or(i64::MAX)),
        )
        .map_err(|e| self.error(e))?;
        self.consumer.assign(&list).map_err(|e| self.error(e))?;
        self.next = offset;
        Ok(())
    }

    fn error(&self, reason: impl std::fmt::Display) -> KafkaError {
        KafkaError::Topic {
            topic: self.topic.clone(),
            reason: format!(
                "partition {} at offset {} (cluster {}): {reason}",
                self.partition, self.next, self.servers
            ),
        }
    }

    /// The offset of the next record [`PartitionReader::read`] returns.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Reads from `offset` on.
    pub fn rewind(&mut self, offset: u64) -> Result<()> {
        self.assign(offset)
    }

    /// Up to `max` records, in offset order: waits up to `wait` for the first, then takes
    /// what has already arrived. Empty when nothing came. Blocking.
    pub fn read(&mut self, max: usize, wait: Duration) -> Result<Vec<ReadRecord>> {
        let mut records = Vec::new();
        let deadline = Instant::now() + wait;
        while records.len() < max {
            let timeout = if records.is_empty() {
                deadline.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            let Some(polled) = self.consumer.poll(timeout) else {
                break;
            };
            let message = polled.map_err(|e| self.error(e))?;
            let offset =
                u64::try_from(message.offset()).map_err(|_| self.error("a negative offset"))?;
            if offset < self.next {
                // Already returned (a fetch that began before a rewind): skipped.
                continue;
            }
            let headers = message
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| Header {
                            key: h.key.to_owned(),
                            value: h.value.map(Bytes::copy_from_slice),
                        })
                        .collect()
                })
                .unwrap_or_default();
            records.push(ReadRecord {
                offset,
                timestamp_ms: message.timestamp().to_millis(),
                record: Record {
                    key: message.key().map(Bytes::copy_from_slice),
                    value: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
                    headers,
                },
            });
            self.next = offset + 1;
        }
        Ok(records)
    }
}
