//! A topic: a name, a configuration and a fixed set of partitions.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::batch::{PendingBatch, Record, encode_batches};
use crate::config::TopicConfig;
use crate::partition::{Partition, PartitionStats};
use crate::{LogError, Result};

/// Where one appended record landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordPosition {
    pub partition: u32,
    pub offset: u64,
}

/// A named stream of records split into partitions.
#[derive(Debug)]
pub struct Topic {
    name: String,
    config: TopicConfig,
    partitions: Vec<Partition>,
    /// Next partition for a record without a key.
    next_round_robin: AtomicU32,
}

impl Topic {
    pub(crate) fn new(name: String, config: TopicConfig, partitions: Vec<Partition>) -> Topic {
        Topic {
            name,
            config,
            partitions,
            next_round_robin: AtomicU32::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &TopicConfig {
        &self.config
    }

    pub fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }

    pub fn partitions(&self) -> &[Partition] {
        &self.partitions
    }

    pub fn partition(&self, partition: u32) -> Result<&Partition> {
        self.partitions
            .get(partition as usize)
            .ok_or_else(|| LogError::UnknownPartition {
                topic: self.name.clone(),
                partition,
                partitions: self.partition_count(),
            })
    }

    /// The partition for a record: by key hash (Kafka's murmur2, so keys land in the same
    /// partition on a Kafka cluster too), round-robin without a key.
    pub fn partition_for(&self, key: Option<&[u8]>) -> u32 {
        let n = self.partition_count();
        match key {
            Some(key) => (murmur2(key) & 0x7fff_ffff) % n,
            None => self.next_round_robin.fetch_add(1, Ordering::Relaxed) % n,
        }
    }

    /// Appends records, each to the partition [`Topic::partition_for`] picks, and returns where
    /// each landed, in input order, once all are acknowledged.
    ///
    /// Every record is checked and encoded before anything is written, so a bad record rejects
    /// the whole call. Each partition's share is written as one unit: after a crash before the
    /// acknowledgement, a partition's share is either wholly present or wholly absent.
    pub async fn append(&self, records: Vec<Record>) -> Result<Vec<RecordPosition>> {
        let (shares, slots) = self.encode(records)?;
        let mut pending = Vec::with_capacity(shares.len());
        for (partition, batches) in shares {
            pending.push((partition, self.partitions[partition].submit(batches).await?));
        }
        let mut bases = vec![0u64; self.partitions.len()];
        for (partition, reply) in pending {
            bases[partition] = self.partitions[partition]
                .acknowledged(reply)
                .await?
                .base_offset;
        }
        Ok(positions(slots, &bases))
    }

    /// [`Topic::append`] for callers outside an async runtime.
    pub fn append_blocking(&self, records: Vec<Record>) -> Result<Vec<RecordPosition>> {
        let (shares, slots) = self.encode(records)?;
        let mut pending = Vec::with_capacity(shares.len());
        for (partition, batches) in shares {
            pending.push((
                partition,
                self.partitions[partition].submit_blocking(batches)?,
            ));
        }
        let mut bases = vec![0u64; self.partitions.len()];
        for (partition, reply) in pending {
            bases[partition] = self.partitions[partition]
                .acknowledged_blocking(reply)?
                .base_offset;
        }
        Ok(positions(slots, &bases))
    }

    /// Splits records by partition and encodes each partition's share; `slots[i]` says where
    /// record `i` went within its share.
    #[allow(clippy::type_complexity, reason = "a private pair of shares and slots")]
    fn encode(
        &self,
        records: Vec<Record>,
    ) -> Result<(Vec<(usize, Vec<PendingBatch>)>, Vec<(u32, usize)>)> {
        let (groups, slots) = self.split(records);
        let mut shares = Vec::new();
        for (partition, group) in groups.iter().enumerate() {
            if !group.is_empty() {
                shares.push((partition, encode_batches(group)?));
            }
        }
        Ok((shares, slots))
    }

    /// Groups records by partition; `slots[i]` says where record `i` went within its group.
    fn split(&self, records: Vec<Record>) -> (Vec<Vec<Record>>, Vec<(u32, usize)>) {
        let mut groups: Vec<Vec<Record>> = (0..self.partitions.len()).map(|_| Vec::new()).collect();
        let mut slots = Vec::with_capacity(records.len());
        for record in records {
            let partition = self.partition_for(record.key.as_deref());
            let group = &mut groups[partition as usize];
            slots.push((partition, group.len()));
            group.push(record);
        }
        (groups, slots)
    }

    pub fn stats(&self) -> Vec<PartitionStats> {
        self.partitions.iter().map(Partition::stats).collect()
    }

    /// Fsyncs every partition (a no-op under `fsync = "always"`).
    pub fn sync(&self) -> Result<()> {
        self.partitions.iter().try_for_each(Partition::sync)
    }

    pub(crate) fn close(&self) -> Result<()> {
        let mut first_error = None;
        for partition in &self.partitions {
            if let Err(e) = partition.close() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Where each record landed, from where it went within its share and each share's base offset.
fn positions(slots: Vec<(u32, usize)>, bases: &[u64]) -> Vec<RecordPosition> {
    slots
        .into_iter()
        .map(|(partition, i)| RecordPosition {
            partition,
            offset: bases[partition as usize] + i as u64,
        })
        .collect()
}

/// Kafka's murmur2 hash (the one its default partitioner uses).
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() == 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::murmur2;

    #[test]
    fn murmur2_matches_kafka() {
        // Values from Kafka's UtilsTest.testMurmur2 (as signed ints there).
        let cases: [(&str, i32); 6] = [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            ("abc", 479470107),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input.as_bytes()) as i32, expected, "{input}");
        }
    }
}
