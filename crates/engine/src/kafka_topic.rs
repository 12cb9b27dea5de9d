//! A topic of a Kafka cluster as a model reads it: one reader per partition by explicit
//! assignment, from the offsets the model's own table records (exactly once without Kafka
//! transactions), read in step across partitions like the embedded log's; the offsets of each
//! commit that lands are also written to the model's consumer group, for Kafka's tools only.
//!
//! ```text
//!   rewind(committed) ─► a reader per partition at its committed offset (none: the earliest
//!                        the cluster keeps)
//!   read(max) ─► the partition least far through first, what librdkafka has fetched already
//!   landed(committed) ─► commit_group(kappa.<project>.<model>.<version>), at most once a second
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kappa_kafka::{PartitionReader, ReadRecord};

use crate::event_log::{KafkaLog, READ_RECORDS, blocking};
use crate::in_step::Fraction;

/// How often the partitions' offsets are asked again (what "least far through" is measured
/// against), and how often the consumer group is written.
const REFRESH: Duration = Duration::from_secs(1);

/// How long a runner waits before it looks for records again (librdkafka fetches in the
/// background meanwhile).
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// How long [`KafkaTopic::read_until`] waits for records the cluster says it has.
const UNTIL_WAIT: Duration = Duration::from_secs(10);

/// A Kafka topic read from positions a model chose.
pub(crate) struct KafkaTopic {
    log: KafkaLog,
    topic: String,
    /// The consumer group its commits' offsets are written to (none: not written).
    group: Option<String>,
    readers: Vec<PartitionReader>,
    /// Each partition's earliest kept and next offset, as last asked, and when.
    spans: Vec<(u64, u64)>,
    spans_at: Option<Instant>,
    /// The offsets waiting to be written to the consumer group, and whether a writer runs.
    group_writes: Arc<GroupWrites>,
}

/// Offsets on their way to a consumer group: the latest landed, written by one background
/// task at most once per [`REFRESH`], so that the group ends at the last commit's offsets.
#[derive(Default)]
struct GroupWrites {
    pending: std::sync::Mutex<Option<BTreeMap<u32, u64>>>,
    running: AtomicBool,
}

impl GroupWrites {
    fn take(&self) -> Option<BTreeMap<u32, u64>> {
        self.pending.lock().ok().and_then(|mut p| p.take())
    }
}

impl KafkaTopic {
    pub(crate) fn new(log: KafkaLog, topic: &str, group: Option<String>) -> KafkaTopic {
        KafkaTopic {
            log,
            topic: topic.to_owned(),
            group,
            readers: Vec::new(),
            spans: Vec::new(),
            spans_at: None,
            group_writes: Arc::new(GroupWrites::default()),
        }
    }

    fn refresh_spans(&mut self) -> Result<(), String> {
        let offsets =
            blocking(|| self.log.cluster.offsets(&self.topic)).map_err(|e| e.to_string())?;
        self.spans = offsets.iter().map(|p| (p.earliest, p.next)).collect();
        self.spans_at = Some(Instant::now());
        Ok(())
    }

    /// Reads from `committed` (partition → next offset) on; a partition it does not name from
    /// the earliest offset the cluster keeps.
    pub(crate) fn rewind(&mut self, committed: Option<&BTreeMap<u32, u64>>) -> Result<(), String> {
        self.refresh_spans()?;
        let mut readers = Vec::with_capacity(self.spans.len());
        for (partition, (earliest, _)) in (0u32..).zip(self.spans.clone()) {
            // 0 (or nothing) is the partition's start, as on the embedded log: the earliest
            // offset the cluster keeps.
            let from = committed
                .and_then(|c| c.get(&partition))
                .copied()
                .filter(|&next| next > 0)
                .unwrap_or(earliest);
            let reader = blocking(|| self.log.cluster.reader(&self.topic, partition, from))
                .map_err(|e| e.to_string())?;
            readers.push(reader);
        }
        let replaced = std::mem::replace(&mut self.readers, readers);
        // Closing a consumer waits for librdkafka to leave its queues: not on an async thread.
        blocking(|| drop(replaced));
        Ok(())
    }

    /// About `max` records (at most what librdkafka has fetched: it never waits), each with its
    /// partition, the partition least far through what it holds first, so that partitions
    /// stay close in event time.
    pub(crate) fn read(&mut self, max: usize) -> Result<Vec<(u32, ReadRecord)>, String> {
        if self.spans_at.is_none_or(|at| at.elapsed() >= REFRESH)
            && let Err(e) = self.refresh_spans()
        {
            // Reads go on with the offsets known (the readers report what they cannot read).
            tracing::warn!(topic = %self.topic, error = %e, "asking the Kafka cluster for offsets");
        }
        let mut done = vec![false; self.readers.len()];
        let mut read = Vec::new();
        while read.len() < max {
            let behind = (0..self.readers.len())
                .filter(|&i| !done[i])
                .min_by(|&a, &b| self.through(a).cmp_fraction(self.through(b)));
            let Some(i) = behind else {
                break;
            };
            let reader = &mut self.readers[i];
            let partition = u32::try_from(i).unwrap_or(u32::MAX);
            match reader.read((max - read.len()).min(READ_RECORDS), Duration::ZERO) {
                Ok(records) if records.is_empty() => done[i] = true,
                Ok(records) => read.extend(records.into_iter().map(|r| (partition, r))),
                // What was read stays read; the error comes again with the next read.
                Err(_) if !read.is_empty() => done[i] = true,
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(read)
    }

    /// Every record from the readers' positions: with `targets` (partition → next offset; a
    /// partition not named is not read), those below them; without, at least up to the
    /// partitions' ends now, and every record read on the way. Waits for what librdkafka has
    /// not fetched yet; a partition whose end holds no record to deliver (a transaction's
    /// marker) is done when the reader reaches its end. Blocking.
    pub(crate) fn read_until(
        &mut self,
        targets: Option<&BTreeMap<u32, u64>>,
    ) -> Result<Vec<(u32, ReadRecord)>, String> {
        let ends;
        let (targets, keep_past) = match targets {
            Some(targets) => (targets, false),
            None => {
                ends = self.ends()?;
                (&ends, true)
            }
        };
        let mut read = Vec::new();
        for (partition, reader) in (0u32..).zip(self.readers.iter_mut()) {
            let Some(&target) = targets.get(&partition) else {
                continue;
            };
            while reader.position() < target {
                let records = blocking(|| reader.read(READ_RECORDS, UNTIL_WAIT))
                    .map_err(|e| e.to_string())?;
                if records.is_empty() {
                    if reader.at_end() {
                        break;
                    }
                    return Err(format!(
                        "partition {partition} of `{}` gave nothing past offset {} within {:?}, \
                         though the cluster said it ends at {target}",
                        self.topic,
                        reader.position(),
                        UNTIL_WAIT
                    ));
                }
                read.extend(
                    records
                        .into_iter()
                        .filter(|r| keep_past || r.offset < target)
                        .map(|r| (partition, r)),
                );
            }
        }
        Ok(read)
    }

    /// The next offset of each partition, as the cluster says now. Blocking.
    pub(crate) fn ends(&self) -> Result<BTreeMap<u32, u64>, String> {
        self.log.ends(&self.topic).map_err(|e| e.to_string())
    }

    fn through(&self, i: usize) -> Fraction {
        Fraction::through(self.readers[i].position(), self.spans.get(i))
    }

    /// The offset after what was read, per partition.
    pub(crate) fn position(&self) -> BTreeMap<u32, u64> {
        (0u32..)
            .zip(self.readers.iter().map(PartitionReader::position))
            .collect()
    }

    /// Writes `committed` (partition → next offset) to the model's consumer group, in the
    /// background, at most once a second and always the latest: for monitoring only, so a
    /// failure is logged.
    pub(crate) fn landed(&mut self, committed: &BTreeMap<u32, u64>) {
        let (Some(group), Ok(runtime)) = (&self.group, tokio::runtime::Handle::try_current())
        else {
            return;
        };
        if let Ok(mut pending) = self.group_writes.pending.lock() {
            *pending = Some(committed.clone());
        }
        if self.group_writes.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let cluster = self.log.cluster.clone();
        let (group, topic) = (group.clone(), self.topic.clone());
        let writes = self.group_writes.clone();
        runtime.spawn_blocking(move || {
            loop {
                while let Some(offsets) = writes.take() {
                    let offsets = BTreeMap::from([(topic.clone(), offsets)]);
                    if let Err(e) = cluster.commit_group(&group, &offsets) {
                        tracing::warn!(group = %group, error = %e, "writing the consumer group's offsets (for monitoring only)");
                    }
                    std::thread::sleep(REFRESH);
                }
                writes.running.store(false, Ordering::Release);
                // Offsets that landed after the last look, while this writer was stopping.
                let more = writes.pending.lock().is_ok_and(|p| p.is_some());
                if !more || writes.running.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
        });
    }
}
