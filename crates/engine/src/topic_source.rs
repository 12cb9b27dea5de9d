//! A topic of the log as a [`Source`]: its partitions read in step from the committed
//! offsets, each record decoded from JSON to the topic's Arrow schema, the late ones set aside
//! at the source (event time, watermarks), the rest handed on.
//!
//! ```text
//!   partitions ──read_some (least far through first)──► decode ──► watermarks ──► Taken
//!                                                         └─ rejects, late ─► dead letters
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use kappa_log::{PartitionReader, StartAt, Topic};

use crate::commit_record::Offsets;
use crate::decode::{Decoder, Raw, Rejected};
use crate::in_step::Fraction;
use crate::kafka_topic::KafkaTopic;
use crate::source::{Source, SourceError, Taken, Waiter};
use crate::watermark::Watermarks;

/// Bytes asked of the log per read.
pub const READ_BYTES: usize = 1 << 20;

/// A stream topic a model reads: its readers, decoder and event-time progress.
pub(crate) struct TopicSource {
    pub(crate) name: String,
    pub(crate) readers: TopicReaders,
    pub(crate) decoder: Decoder,
    pub(crate) marks: Option<Watermarks>,
    /// Whether this model reports the topic's records that do not fit its schema.
    pub(crate) reports_rejects: bool,
    /// Whether this model reports the topic's late records.
    pub(crate) reports_late: bool,
    /// The greatest event time per partition of each timestamp field, which the commit's
    /// data files carry (`kappa_lakehouse::marks`): kept by a model that appends row by row,
    /// so that a join reading its table judges lateness per source partition.
    pub(crate) times: Option<TimeMarks>,
}

/// Where a topic's records are read from.
pub(crate) enum TopicReaders {
    /// The embedded log: a reader per partition, waited for through its visible offset.
    Embedded {
        topic: Arc<Topic>,
        readers: Vec<PartitionReader>,
    },
    /// A Kafka cluster: a reader per partition by explicit assignment, polled.
    Kafka(KafkaTopic),
}

impl TopicReaders {
    /// Readers of `name` in `log`, placed by the first rewind. On a Kafka cluster the offsets
    /// of each landed commit go to the consumer group of `owner` (a model or bronze table and
    /// its version), if any.
    pub(crate) fn of(
        log: &crate::event_log::EventLog,
        name: &str,
        owner: Option<(&str, &str)>,
    ) -> Result<TopicReaders, crate::event_log::EventLogError> {
        Ok(match log {
            crate::event_log::EventLog::Embedded(log) => TopicReaders::Embedded {
                topic: log.topic(name)?,
                readers: Vec::new(),
            },
            crate::event_log::EventLog::Kafka(kafka) => {
                let group = owner.map(|(model, version)| kafka.group(model, version));
                TopicReaders::Kafka(KafkaTopic::new(kafka.clone(), name, group))
            }
        })
    }

    /// The commit recording `committed` (this topic's partition → next offset) landed.
    pub(crate) fn landed(&mut self, committed: Option<&BTreeMap<u32, u64>>) {
        if let (TopicReaders::Kafka(kafka), Some(offsets)) = (self, committed) {
            kafka.landed(offsets);
        }
    }

    /// How a runner waits for more.
    pub(crate) fn waiter(&self) -> Waiter {
        match self {
            TopicReaders::Embedded { topic, readers } => {
                watch_partitions(topic.partitions(), readers)
            }
            TopicReaders::Kafka(_) => Waiter::Poll(crate::kafka_topic::POLL),
        }
    }

    /// Places the readers at `committed` (partition → next offset); a partition it does not
    /// name at its start.
    pub(crate) fn rewind(&mut self, committed: Option<&BTreeMap<u32, u64>>) -> Result<(), String> {
        match self {
            TopicReaders::Embedded { topic, readers } => {
                let mut fresh = Vec::new();
                for partition in topic.partitions() {
                    let next = committed
                        .and_then(|p| p.get(&partition.id()))
                        .copied()
                        .unwrap_or(0);
                    let start = if next == 0 {
                        StartAt::Beginning
                    } else {
                        StartAt::Offset(next)
                    };
                    fresh.push(partition.reader(start).map_err(|e| e.to_string())?);
                }
                *readers = fresh;
                Ok(())
            }
            TopicReaders::Kafka(kafka) => kafka.rewind(committed),
        }
    }

    /// The offset after what was read, per partition.
    pub(crate) fn position(&self) -> BTreeMap<u32, u64> {
        match self {
            TopicReaders::Embedded { readers, .. } => next_offsets(readers),
            TopicReaders::Kafka(kafka) => kafka.position(),
        }
    }

    /// The next offset of each partition: where what the log holds now ends.
    pub(crate) fn ends(&self) -> Result<BTreeMap<u32, u64>, String> {
        match self {
            TopicReaders::Embedded { topic, .. } => Ok(topic
                .partitions()
                .iter()
                .map(|p| (p.id(), p.offsets().visible_offset))
                .collect()),
            TopicReaders::Kafka(kafka) => kafka.ends(),
        }
    }

    /// Every record (partition, offset, value) from the readers' positions on: with `targets`
    /// (partition → next offset; a partition not named is not read), those below them (the
    /// readers may stop past them: a rewind follows); without, at least up to where the log
    /// ends now, and every record read on the way. A read error is an error, never fewer
    /// records; a record the log cannot decode is logged and passed over, as the log reports it.
    pub(crate) fn read_until(
        &mut self,
        targets: Option<&BTreeMap<u32, u64>>,
    ) -> Result<Vec<(u32, u64, Vec<u8>)>, String> {
        match self {
            TopicReaders::Embedded { readers, .. } => {
                let mut read = Vec::new();
                for reader in readers {
                    let partition = reader.partition();
                    let target = match targets {
                        Some(targets) => match targets.get(&partition) {
                            Some(&target) => target,
                            None => continue,
                        },
                        None => u64::MAX,
                    };
                    while reader.next_offset() < target {
                        let Some(chunk) = reader.read(READ_BYTES).map_err(|e| e.to_string())?
                        else {
                            break;
                        };
                        for record in chunk.records() {
                            match record {
                                Ok(record) if record.offset < target => {
                                    read.push((partition, record.offset, record.value.to_vec()))
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    tracing::error!(error = %e, partition, "unreadable record")
                                }
                            }
                        }
                    }
                }
                Ok(read)
            }
            TopicReaders::Kafka(kafka) => Ok(kafka
                .read_until(targets)?
                .into_iter()
                .map(|(partition, r)| (partition, r.offset, r.record.value.to_vec()))
                .collect()),
        }
    }
}

/// The greatest time per partition of each timestamp field of a topic, at the last commit
/// that landed (`before`) and now (`after`).
#[derive(Debug, Clone)]
pub(crate) struct TimeMarks {
    /// Each timestamp field, with its index in the topic's schema.
    fields: Vec<(String, usize)>,
    before: BTreeMap<String, BTreeMap<u32, i64>>,
    after: BTreeMap<String, BTreeMap<u32, i64>>,
}

impl TimeMarks {
    /// The marks of the timestamp fields of `schema` named in `published` (fields the model
    /// writes unmasked: never a masked column's raw value); `None` when there are none. A mark
    /// is the greatest time of the topic's records, those the model filters out included.
    pub(crate) fn new(
        schema: &arrow::datatypes::Schema,
        published: &[String],
    ) -> Option<TimeMarks> {
        let fields: Vec<(String, usize)> = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| matches!(f.data_type(), arrow::datatypes::DataType::Timestamp(..)))
            .filter(|(_, f)| published.contains(f.name()))
            .map(|(i, f)| (f.name().clone(), i))
            .collect();
        (!fields.is_empty()).then(|| TimeMarks {
            fields,
            before: BTreeMap::new(),
            after: BTreeMap::new(),
        })
    }

    /// Advances the marks over `batch`, whose row `i` comes from partition `partitions[i]`.
    fn observe(&mut self, batch: &RecordBatch, partitions: &[u32]) {
        use arrow::array::Array;
        for (name, index) in &self.fields {
            let Ok(times) = crate::watermark::micros(batch.column(*index)) else {
                continue;
            };
            let marks = self.after.entry(name.clone()).or_default();
            // Rows come in runs of one partition (a chunk of the log each): one map update
            // per run, not per row.
            let rows = partitions.len().min(times.len());
            let mut start = 0;
            for run in partitions[..rows].chunk_by(|a, b| a == b) {
                let greatest = (start..start + run.len())
                    .filter(|&row| times.is_valid(row))
                    .map(|row| times.value(row))
                    .max();
                start += run.len();
                if let Some(greatest) = greatest {
                    let mark = marks.entry(run[0]).or_insert(greatest);
                    *mark = (*mark).max(greatest);
                }
            }
        }
    }

    /// The marks of the files a commit now writes, for the topic `name`.
    fn file_marks(&self, name: &str) -> kappa_lakehouse::marks::FileMarks {
        let columns = self
            .fields
            .iter()
            .map(|(field, _)| {
                let marks = kappa_lakehouse::marks::Marks {
                    before: self.before.get(field).cloned().unwrap_or_default(),
                    after: self.after.get(field).cloned().unwrap_or_default(),
                };
                (field.clone(), marks)
            })
            .collect();
        BTreeMap::from([(name.to_owned(), columns)])
    }

    /// Takes what the table's last commit recorded for the topic `name` (nothing: none yet).
    fn restore(
        &mut self,
        name: &str,
        properties: Option<&std::collections::HashMap<String, String>>,
    ) {
        let recorded = properties
            .and_then(|p| p.get(kappa_lakehouse::marks::FILE_MARKS_PROPERTY))
            .and_then(|text| kappa_lakehouse::marks::parse(text))
            .and_then(|mut marks| marks.remove(name))
            .unwrap_or_default();
        self.after = recorded
            .into_iter()
            .map(|(field, marks)| (field, marks.after))
            .collect();
        self.before = self.after.clone();
    }
}

impl std::fmt::Debug for TopicSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicSource")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TopicSource {
    /// Decodes records read from the topic and sets the late ones aside: the rows that go on,
    /// and the records this model reports.
    fn take(
        &mut self,
        raws: &[Raw<'_>],
    ) -> datafusion::error::Result<(RecordBatch, Vec<Rejected>)> {
        let (batch, mut rejected, rows) = self.decoder.decode_indexed(raws);
        if !self.reports_rejects {
            rejected.clear();
        }
        if raws.is_empty() || (self.marks.is_none() && self.times.is_none()) {
            return Ok((batch, rejected));
        }
        let partitions: Vec<u32> = rows.iter().map(|&i| raws[i].partition).collect();
        let (kept, kept_partitions) = match &mut self.marks {
            Some(marks) => {
                let (kept, kept_partitions, late) = marks.apply(&batch, &partitions)?;
                if self.reports_late {
                    set_aside(&mut rejected, late, &rows, raws);
                }
                (kept, kept_partitions)
            }
            None => (batch, partitions),
        };
        if let Some(times) = &mut self.times {
            times.observe(&kept, &kept_partitions);
        }
        Ok((kept, rejected))
    }
}

#[async_trait::async_trait]
impl Source for TopicSource {
    fn key(&self) -> &str {
        &self.name
    }

    fn rewind(&mut self, committed: &Offsets) -> Result<(), SourceError> {
        self.readers
            .rewind(committed.get(&self.name))
            .map_err(|e| SourceError::Read(format!("{}: {e}", self.name)))
    }

    async fn read(&mut self, max: usize) -> Result<Taken, SourceError> {
        let name = self.name.clone();
        let read_err = |e: String| SourceError::Read(format!("{name}: {e}"));
        let (batch, rejected, records) = match &mut self.readers {
            TopicReaders::Embedded { topic, readers } => {
                let read = read_some(topic.partitions(), readers, max, READ_BYTES);
                let mut raws = Vec::with_capacity(read.records);
                for (partition, chunk) in &read.chunks {
                    collect_records(chunk, *partition, &mut raws);
                }
                let (batch, rejected) = self.take(&raws).map_err(|e| read_err(e.to_string()))?;
                (batch, rejected, read.records)
            }
            TopicReaders::Kafka(kafka) => {
                let read = kafka.read(max).map_err(read_err)?;
                let raws: Vec<Raw<'_>> = read
                    .iter()
                    .map(|(partition, r)| Raw {
                        partition: *partition,
                        offset: r.offset,
                        value: &r.record.value,
                    })
                    .collect();
                let (batch, rejected) = self.take(&raws).map_err(|e| read_err(e.to_string()))?;
                (batch, rejected, read.len())
            }
        };
        Ok(Taken {
            batch,
            rejected,
            watermark: self.marks.as_ref().and_then(Watermarks::watermark),
            records,
            full: records >= max,
        })
    }

    fn position(&self) -> BTreeMap<u32, u64> {
        self.readers.position()
    }

    fn load_marks(&mut self, saved: Option<&serde_json::Value>) -> Result<(), String> {
        match &mut self.marks {
            Some(marks) => marks.load(saved),
            None => Ok(()),
        }
    }

    fn save_marks(&self) -> Option<serde_json::Value> {
        self.marks.as_ref().map(Watermarks::save)
    }

    fn restore(&mut self, properties: Option<&std::collections::HashMap<String, String>>) {
        if let Some(times) = &mut self.times {
            times.restore(&self.name, properties);
        }
    }

    fn properties(&self, into: &mut std::collections::HashMap<String, String>) {
        let Some(times) = &self.times else {
            return;
        };
        // Only a model reading one topic row by row keeps marks: the property is its alone.
        if let Ok(text) = serde_json::to_string(&times.file_marks(&self.name)) {
            into.insert(kappa_lakehouse::marks::FILE_MARKS_PROPERTY.to_owned(), text);
        }
    }

    fn landed(&mut self, committed: &Offsets) {
        if let Some(times) = &mut self.times {
            times.before = times.after.clone();
        }
        self.readers.landed(committed.get(&self.name));
    }

    fn waiter(&self) -> Waiter {
        self.readers.waiter()
    }
}

/// The next offset of each reader's partition.
pub(crate) fn next_offsets(readers: &[PartitionReader]) -> BTreeMap<u32, u64> {
    readers
        .iter()
        .map(|r| (r.partition(), r.next_offset()))
        .collect()
}

/// Waits on `partitions`' visible offsets, each with its reader's next offset.
pub(crate) fn watch_partitions(
    partitions: &[kappa_log::Partition],
    readers: &[PartitionReader],
) -> Waiter {
    Waiter::Watch(
        partitions
            .iter()
            .zip(readers)
            .map(|(partition, reader)| (partition.watch_visible(), reader.next_offset()))
            .collect(),
    )
}

/// Adds the records the source set aside (late, no event time) to the rejects.
fn set_aside(
    rejected: &mut Vec<Rejected>,
    late: Vec<crate::watermark::Late>,
    rows: &[usize],
    raws: &[Raw<'_>],
) {
    for l in late {
        // `rows` maps the decoded batch's rows to `raws`, which they were decoded from.
        let raw = raws[rows[l.row]];
        rejected.push(Rejected {
            partition: raw.partition,
            offset: raw.offset,
            reason: l.reason,
            raw: raw.value.to_vec(),
        });
    }
}

/// Chunks read from a topic's partitions (each with its partition), and what they hold.
pub(crate) struct Read {
    pub(crate) chunks: Vec<(u32, kappa_log::RecordChunk)>,
    pub(crate) records: usize,
}

/// Appends a chunk's records to `raws` (borrowing their bytes from the chunk: no copy). A
/// record in a batch that passed its CRC but does not decode is corruption the log reports; it
/// cannot be read, so it is logged, not guessed.
pub(crate) fn collect_records<'a>(
    chunk: &'a kappa_log::RecordChunk,
    partition: u32,
    raws: &mut Vec<Raw<'a>>,
) {
    for record in chunk.records() {
        match record {
            Ok(record) => raws.push(Raw {
                partition,
                offset: record.offset,
                value: record.value,
            }),
            Err(e) => tracing::error!(error = %e, partition, "unreadable record"),
        }
    }
}

/// Reads about `max` records across a source's partitions (whole chunks); returns them with
/// the offsets after them.
///
/// The next chunk always comes from the partition least far through what it holds
/// ([`crate::in_step`]).
pub(crate) fn read_some(
    partitions: &[kappa_log::Partition],
    readers: &mut [PartitionReader],
    max: usize,
    chunk_bytes: usize,
) -> Read {
    // (first kept offset, end) of each partition, fixed for this read.
    let spans: Vec<(u64, u64)> = partitions
        .iter()
        .map(|p| {
            let o = p.offsets();
            (o.start_offset, o.visible_offset)
        })
        .collect();
    let mut done = vec![false; readers.len()];
    let mut chunks = Vec::new();
    let mut records = 0;
    while records < max {
        let behind = (0..readers.len()).filter(|&i| !done[i]).min_by(|&a, &b| {
            Fraction::through(readers[a].next_offset(), spans.get(a))
                .cmp_fraction(Fraction::through(readers[b].next_offset(), spans.get(b)))
        });
        let Some(i) = behind else {
            break;
        };
        let reader = &mut readers[i];
        match reader.read(chunk_bytes) {
            Ok(Some(chunk)) => {
                records += usize::try_from(chunk.record_count()).unwrap_or(usize::MAX);
                chunks.push((reader.partition(), chunk));
            }
            Ok(None) => done[i] = true,
            Err(e) => {
                done[i] = true;
                tracing::error!(error = %e, partition = reader.partition(), "reading the log failed")
            }
        }
    }
    Read { chunks, records }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kappa_log::{FsyncPolicy, Log, Record, TopicConfig};

    /// Two partitions of one topic, one three times the other: however many records a read
    /// takes, each partition is as far through what it holds as the other, within a chunk.
    /// (Read round-robin, the small one was done while the large one was a third through.)
    #[test]
    fn reads_keep_unequal_partitions_in_step() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let log = Log::open(dir.path()).expect("a log in a fresh directory");
        let topic = log
            .create_topic(
                "orders",
                TopicConfig {
                    partitions: 2,
                    fsync: FsyncPolicy::Interval { interval_ms: 1000 },
                    ..TopicConfig::default()
                },
            )
            .expect("a new topic");
        let sizes = [3000u64, 1000];
        for (partition, &n) in topic.partitions().iter().zip(&sizes) {
            for i in 0..n {
                let record = Record {
                    key: None,
                    value: format!("{{\"i\":{i:0>90}}}").into_bytes().into(),
                    headers: Vec::new(),
                };
                // One batch per record: chunks end on any record.
                partition.append_blocking(&[record]).expect("an append");
            }
        }
        let mut readers: Vec<PartitionReader> = topic
            .partitions()
            .iter()
            .map(|p| p.reader(StartAt::Beginning).expect("a reader"))
            .collect();
        let chunk_bytes = 1024;
        let mut total = 0;
        loop {
            let read = read_some(topic.partitions(), &mut readers, 50, chunk_bytes);
            if read.records == 0 {
                break;
            }
            total += read.records;
            let through: Vec<f64> = readers
                .iter()
                .zip(&sizes)
                .map(|(r, &n)| r.next_offset() as f64 / n as f64)
                .collect();
            // A chunk is under 10 records: 1 % of the small partition.
            assert!(
                (through[0] - through[1]).abs() <= 0.011,
                "after {total} records the partitions are {through:?} through"
            );
        }
        assert_eq!(total as u64, sizes.iter().sum::<u64>());
        log.close().expect("a clean close");
    }

    #[test]
    fn marks_keep_each_partitions_greatest_time() {
        use arrow::array::TimestampMicrosecondArray;
        use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
                true,
            ),
            Field::new("at", DataType::Timestamp(TimeUnit::Microsecond, None), true),
        ]));
        // Only the published field is marked.
        let mut marks = TimeMarks::new(&schema, &["ts".to_owned()]).expect("a timestamp field");
        let times = |values: Vec<Option<i64>>| {
            Arc::new(TimestampMicrosecondArray::from(values).with_timezone("+00:00"))
        };
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                times(vec![
                    Some(5),
                    None,
                    Some(9),
                    Some(3),
                    None,
                    Some(7),
                    Some(1),
                ]),
                Arc::new(TimestampMicrosecondArray::from(vec![Some(99); 7])),
            ],
        )
        .unwrap();
        marks.observe(&batch, &[0, 0, 0, 1, 1, 0, 2]);
        assert_eq!(marks.after["ts"], BTreeMap::from([(0, 9), (1, 3), (2, 1)]));
        assert!(!marks.after.contains_key("at"));
        let first = marks.file_marks("orders");
        assert!(first["orders"]["ts"].before.is_empty());
        marks.before = marks.after.clone();
        let later = RecordBatch::try_new(
            schema,
            vec![
                times(vec![Some(2), Some(4)]),
                Arc::new(TimestampMicrosecondArray::from(vec![Some(1); 2])),
            ],
        )
        .unwrap();
        marks.observe(&later, &[0, 1]);
        let second = marks.file_marks("orders");
        assert_eq!(
            second["orders"]["ts"].before,
            BTreeMap::from([(0, 9), (1, 3), (2, 1)])
        );
        assert_eq!(
            second["orders"]["ts"].after,
            BTreeMap::from([(0, 9), (1, 4), (2, 1)])
        );
    }
}
