//! Stream ⋈ dimension: a topic of kind `"table"` is read as a table — the latest record per
//! key is its current row — and a model that joins it to a stream looks each event up in the
//! rows the dimension has when the event is processed (a lookup join).
//!
//! ```text
//!  products (kind = "table") ──latest per key──► DimensionTable ─┐
//!  orders   (stream)         ──micro-batch────► slot ───────────┴─► JOIN ─► rest of the model
//! ```
//!
//! Before each micro-batch of the stream, every dimension is caught up to the end of its
//! topic; its next offsets are committed with the model's, so after a restart the dimension is
//! rebuilt to exactly the rows the last commit saw. While the stream replays history, the
//! dimension is therefore at its latest state: replayed events see today's product catalogue,
//! as the same SQL run once over the log does.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::Array;
use arrow::compute::cast;
use arrow::datatypes::DataType;
use datafusion::error::Result;
use kappa_log::{PartitionReader, StartAt, Topic};
use kappa_pipeline::TopicSpec;

use crate::decode::{Decoder, Raw, Rejected};
use crate::scd::ScdState;
use crate::schema::topic_schema;
use crate::stateless::StatelessModel;
use crate::topic_source::{READ_BYTES, collect_records};

pub use crate::commit_record::DIMENSION_KEY_PREFIX;
pub use crate::lookup::DimensionTable;

/// One dimension of a running model: its topic read to the end, kept as a topic of kind
/// "table" (the latest record per key) or as a dimension model computes it (`scd.rs`).
pub struct Dimension {
    pub topic_name: String,
    /// Where its offsets are committed in `kappa.offsets`: the topic's name for a topic of
    /// kind "table", `dimension:<model>` for a dimension model (so that a model may also read
    /// that topic as its stream).
    pub offsets_key: String,
    /// A rebuild failed: nothing is read until [`Dimension::reset`] succeeds.
    broken: bool,
    topic: Arc<Topic>,
    decoder: Decoder,
    rows: Rows,
    table: Arc<DimensionTable>,
    readers: Vec<PartitionReader>,
}

/// How a dimension keeps its rows.
enum Rows {
    /// A topic of kind "table": key (as text) → the latest record's value.
    Latest {
        key_index: usize,
        latest: BTreeMap<String, Vec<u8>>,
    },
    /// A dimension model: its SQL over each run of records, its versions kept per key.
    Model {
        sql: Box<StatelessModel>,
        state: Box<ScdState>,
    },
}

impl std::fmt::Debug for Dimension {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dimension")
            .field("topic", &self.topic_name)
            .finish_non_exhaustive()
    }
}

impl Dimension {
    /// A dimension over `topic`, declared by `spec`, whose rows go to `table`. Empty until
    /// [`Dimension::reset`] or [`Dimension::catch_up`].
    pub fn new(
        topic: Arc<Topic>,
        spec: &TopicSpec,
        table: Arc<DimensionTable>,
    ) -> std::result::Result<Dimension, String> {
        let key = spec
            .key
            .as_deref()
            .ok_or_else(|| format!("topic `{}` of kind \"table\" has no key", spec.name))?;
        let key_index = topic_schema(spec)
            .index_of(key)
            .map_err(|_| format!("key `{key}` is not a field of topic `{}`", spec.name))?;
        Ok(Dimension {
            topic_name: spec.name.clone(),
            offsets_key: spec.name.clone(),
            broken: false,
            topic,
            decoder: Decoder::new(spec),
            rows: Rows::Latest {
                key_index,
                latest: BTreeMap::new(),
            },
            table,
            readers: Vec::new(),
        })
    }

    /// A dimension model over `topic` (declared by `spec`): `sql` computes its rows from the
    /// records, `state` keeps their versions; they go to `table`.
    pub fn of_model(
        model: &str,
        topic: Arc<Topic>,
        spec: &TopicSpec,
        table: Arc<DimensionTable>,
        sql: StatelessModel,
        state: ScdState,
    ) -> Dimension {
        Dimension {
            topic_name: spec.name.clone(),
            offsets_key: format!("{DIMENSION_KEY_PREFIX}{model}"),
            broken: false,
            topic,
            decoder: Decoder::new(spec),
            rows: Rows::Model {
                sql: Box::new(sql),
                state: Box::new(state),
            },
            table,
            readers: Vec::new(),
        }
    }

    /// Rebuilds the rows from the start of the topic up to `upto` (the next offset of each
    /// partition; a partition not named contributes nothing), and positions the readers there.
    pub async fn reset(&mut self, upto: Option<&BTreeMap<u32, u64>>) -> Result<()> {
        // Until the rebuild is done, the dimension is not to be read on from where it was.
        self.broken = true;
        self.readers.clear();
        match &mut self.rows {
            Rows::Latest { latest, .. } => latest.clear(),
            Rows::Model { state, .. } => state.clear(),
        }
        let mut readers = Vec::new();
        let topic = self.topic.clone();
        for partition in topic.partitions() {
            let target = upto
                .and_then(|u| u.get(&partition.id()))
                .copied()
                .unwrap_or(0);
            if target > 0 {
                let mut reader = partition.reader(StartAt::Beginning).map_err(log_error)?;
                let mut chunks = Vec::new();
                while reader.next_offset() < target {
                    let Some(chunk) = reader.read(READ_BYTES).map_err(log_error)? else {
                        break;
                    };
                    chunks.push(chunk);
                }
                let mut raws = Vec::new();
                for chunk in &chunks {
                    collect_records(chunk, partition.id(), &mut raws);
                }
                raws.retain(|r| r.offset < target);
                // Records that did not fit were reported before the commit that passed them.
                self.apply(&raws).await?;
            }
            readers.push(
                partition
                    .reader(if target == 0 {
                        StartAt::Beginning
                    } else {
                        StartAt::Offset(target)
                    })
                    .map_err(log_error)?,
            );
        }
        self.readers = readers;
        self.refresh().await?;
        self.broken = false;
        Ok(())
    }

    /// Reads what the topic has past the readers and applies it; returns the records that do
    /// not fit the topic's schema or have no key. An error (a dimension model's SQL failing
    /// at run time) leaves the dimension to be [`Dimension::reset`].
    pub async fn catch_up(&mut self) -> Result<Vec<Rejected>> {
        if self.broken {
            return Err(datafusion::error::DataFusionError::Execution(format!(
                "the dimension over `{}` could not be rebuilt; retrying",
                self.topic_name
            )));
        }
        let mut chunks = Vec::new();
        for reader in &mut self.readers {
            loop {
                match reader.read(READ_BYTES) {
                    Ok(Some(chunk)) => chunks.push((reader.partition(), chunk)),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, topic = %self.topic_name, "reading a dimension failed");
                        break;
                    }
                }
            }
        }
        let mut raws = Vec::new();
        for (partition, chunk) in &chunks {
            collect_records(chunk, *partition, &mut raws);
        }
        if raws.is_empty() {
            return Ok(Vec::new());
        }
        let rejected = self.apply(&raws).await?;
        self.refresh().await?;
        Ok(rejected)
    }

    /// The next offset of every partition.
    pub fn next_offsets(&self) -> BTreeMap<u32, u64> {
        self.readers
            .iter()
            .map(|r| (r.partition(), r.next_offset()))
            .collect()
    }

    /// Folds records, in log order, into the rows.
    async fn apply(&mut self, raws: &[Raw<'_>]) -> Result<Vec<Rejected>> {
        let (batch, mut rejected, rows) = self.decoder.decode_indexed(raws);
        let (key_index, latest) = match &mut self.rows {
            Rows::Latest { key_index, latest } => (*key_index, latest),
            Rows::Model { sql, state } => {
                for rows in sql.run(batch).await? {
                    state.push(&rows)?;
                }
                return Ok(rejected);
            }
        };
        let keys = match cast(batch.column(key_index), &DataType::Utf8) {
            Ok(keys) => keys,
            Err(e) => {
                tracing::error!(error = %e, topic = %self.topic_name, "reading dimension keys failed");
                return Ok(rejected);
            }
        };
        let keys = keys.as_any().downcast_ref::<arrow::array::StringArray>();
        for (row, &i) in rows.iter().enumerate() {
            let Raw {
                partition,
                offset,
                value,
            } = raws[i];
            match keys.filter(|k| !k.is_null(row)).map(|k| k.value(row)) {
                Some(key) => {
                    latest.insert(key.to_owned(), value.to_vec());
                }
                None => rejected.push(Rejected {
                    partition,
                    offset,
                    reason: "the key field is null: a table's record needs a key".into(),
                    raw: value.to_vec(),
                }),
            }
        }
        Ok(rejected)
    }

    /// Puts the current rows into the table.
    async fn refresh(&mut self) -> Result<()> {
        let batch = match &mut self.rows {
            Rows::Latest { latest, .. } => {
                self.decoder
                    .decode_positioned(latest.values().map(|v| Raw {
                        partition: 0,
                        offset: 0,
                        value: v,
                    }))
                    .0
            }
            Rows::Model { state, .. } => state.all()?,
        };
        self.table.set(batch).await;
        Ok(())
    }
}

fn log_error(e: kappa_log::LogError) -> datafusion::error::DataFusionError {
    datafusion::error::DataFusionError::External(Box::new(e))
}
