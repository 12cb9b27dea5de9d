//! One partition read by explicit assignment from an offset kappa chose (from its own Iceberg
//! commits), in order, with each record's offset and timestamp.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kappa_log::{Header, Record};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as ClientError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::{KafkaError, REQUEST_TIMEOUT, Result, client_error, partition_index};

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
    /// Why it cannot read from `next` (librdkafka reports that once, then stops fetching
    /// the partition): every read fails with it until a rewind.
    stuck: Option<String>,
    /// Whether librdkafka said it reached the partition's end with nothing since.
    at_end: bool,
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
        // No group decides what it reads, nothing is committed behind kappa's back, an offset
        // the cluster does not hold is an error (never a silent jump), the end of the
        // partition is reported (a transaction's markers end it without a record to deliver,
        // below the cluster's next offset), and only committed transactions are read.
        config
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "error")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed");
        if config.get("group.id").is_none() {
            config.set("group.id", "kappa.readers");
        }
        let consumer: BaseConsumer = config.create().map_err(client_error)?;
        let mut reader = PartitionReader {
            consumer,
            servers: servers.to_owned(),
            topic: topic.to_owned(),
            partition,
            next: offset,
            stuck: None,
            at_end: false,
        };
        reader.assign(offset)?;
        Ok(reader)
    }

    fn assign(&mut self, offset: u64) -> Result<()> {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(
            &self.topic,
            partition_index(self.partition),
            Offset::Offset(i64::try_from(offset).unwrap_or(i64::MAX)),
        )
        .map_err(|e| self.error(e))?;
        self.consumer.assign(&list).map_err(|e| self.error(e))?;
        self.next = offset;
        self.at_end = false;
        // Checked here too: not every broker answers a fetch out of range with an error (tansu
        // answers it with nothing), and nothing would look like being caught up.
        self.stuck = match self.watermarks() {
            Ok(range) => out_of_range(offset, range),
            // Unreachable now: librdkafka reports an offset out of range once it fetches.
            Err(_) => None,
        };
        Ok(())
    }

    /// The partition's earliest kept offset and its next offset.
    fn watermarks(&self) -> Result<(i64, i64), ClientError> {
        self.consumer.fetch_watermarks(
            &self.topic,
            partition_index(self.partition),
            REQUEST_TIMEOUT,
        )
    }

    /// Why the partition cannot be read from `next` (librdkafka said so).
    fn unreadable(&self) -> String {
        match self.watermarks() {
            Ok(range) => out_of_range(self.next, range).unwrap_or_else(|| {
                "the cluster refused the offset, which is in its range now".to_owned()
            }),
            Err(e) => format!("the cluster does not hold that offset ({e})"),
        }
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

    /// Whether the last read reached the end of what the partition delivers (librdkafka said
    /// so, and nothing came since): past the last record, or at a transaction's marker.
    pub fn at_end(&self) -> bool {
        self.at_end
    }

    /// Reads from `offset` on.
    pub fn rewind(&mut self, offset: u64) -> Result<()> {
        self.assign(offset)
    }

    /// Up to `max` records, in offset order: waits up to `wait` for the first, then takes
    /// what has already arrived. Empty when nothing came (also while the cluster cannot be
    /// reached: librdkafka reconnects by itself, and the failure is logged). An offset the
    /// cluster does not hold fails this read and every later one until a rewind. Blocking.
    pub fn read(&mut self, max: usize, wait: Duration) -> Result<Vec<ReadRecord>> {
        if let Some(reason) = &self.stuck {
            return Err(self.error(reason));
        }
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
            let message = match polled {
                Ok(message) => message,
                Err(ClientError::PartitionEOF(_)) => {
                    self.at_end = true;
                    break;
                }
                Err(ClientError::MessageConsumption(
                    RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange,
                )) => {
                    let reason = self.unreadable();
                    self.stuck = Some(reason.clone());
                    if records.is_empty() {
                        return Err(self.error(reason));
                    }
                    break;
                }
                Err(ClientError::MessageConsumption(code)) if transient(code) => {
                    tracing::warn!(topic = %self.topic, partition = self.partition, servers = %self.servers, error = %code, "reading the Kafka cluster (retrying)");
                    break;
                }
                // What it has read stays read; the error comes again with the next read.
                Err(_) if !records.is_empty() => break,
                Err(e) => return Err(self.error(e)),
            };
            let Ok(offset) = u64::try_from(message.offset()) else {
                // Never from a fetch; what was read stays read.
                tracing::error!(topic = %self.topic, partition = self.partition, offset = message.offset(), "librdkafka gave a negative offset");
                break;
            };
            if offset < self.next {
                // Below the position (a fetch from before a forward rewind): skipped. After a
                // backward rewind librdkafka drops what it had fetched from the old position.
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
            self.at_end = false;
        }
        Ok(records)
    }
}

/// Why `offset` cannot be read from a partition whose earliest kept offset and next offset
/// are `(earliest, next)`; `None`: it can.
fn out_of_range(offset: u64, (earliest, next): (i64, i64)) -> Option<String> {
    let at = i64::try_from(offset).unwrap_or(i64::MAX);
    if at < earliest {
        Some(format!(
            "the cluster no longer keeps it: the partition starts at offset {earliest} \
             (retention dropped what came before)"
        ))
    } else if at > next {
        Some(format!(
            "the partition ends before it (its next offset is {next}): the topic was \
             recreated, or the offset is not this topic's"
        ))
    } else {
        None
    }
}

/// Whether `code` is a failure librdkafka recovers from by itself (a broker down or moving).
fn transient(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::Resolve
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::NotLeaderForPartition
    )
}
