//! Stream ⋈ dimension: a model that joins a stream to a dimension looks each event up in the
//! rows the dimension has when the event is processed (a lookup join). A dimension is one of:
//!
//! - a topic of kind `"table"`, read as a table: the latest record per key is its current row;
//! - a dimension model (`scd1`/`scd2`), read as its table on `main` published it — never
//!   recomputed here, so an audit that holds its commit back holds it back from the lookups too.
//!
//! ```text
//!  products (kind = "table") ──latest per key──────────────► DimensionTable ─┐
//!  gold.products (scd2)      ──its table on main, whole────► DimensionTable ─┤
//!  orders   (stream)         ──micro-batch────► slot ─────────────────────────┴─► JOIN ─► …
//! ```
//!
//! Before each micro-batch of the stream, every dimension is caught up to the end of its
//! topic: a topic read to its end, a dimension model waited for until a commit it published
//! covers the end its topic had (so an event produced after a change finds the change). The
//! offsets a dimension covers are committed with the model's. A topic's dimension is rebuilt
//! after a restart to exactly the rows the last commit saw; a dimension model's is its
//! table's latest published rows. While the stream replays history, a dimension is therefore
//! at its latest state: replayed events see today's product catalogue, as the same SQL run once
//! over the log does.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::Array;
use arrow::compute::cast;
use arrow::datatypes::DataType;
use datafusion::error::{DataFusionError, Result};
use kappa_lakehouse::{Lakehouse, TableIdent};
use kappa_pipeline::TopicSpec;

use crate::commit_record::CommitRecord;
use crate::decode::{Decoder, Raw, Rejected};
use crate::schema::topic_schema;
use crate::topic_source::TopicReaders;

pub use crate::commit_record::DIMENSION_KEY_PREFIX;
pub use crate::lookup::DimensionTable;

/// One dimension of a running model: a topic of kind "table" read to its end (the latest
/// record per key), or a dimension model's published table.
pub struct Dimension {
    pub topic_name: String,
    /// Where its offsets are committed in `kappa.offsets`: the topic's name for a topic of
    /// kind "table", `dimension:<model>` for a dimension model (so that a model may also read
    /// that topic as its stream).
    pub offsets_key: String,
    /// A rebuild failed: nothing is read until [`Dimension::reset`] succeeds.
    broken: bool,
    decoder: Decoder,
    rows: Rows,
    table: Arc<DimensionTable>,
    readers: TopicReaders,
}

/// How a dimension keeps its rows.
enum Rows {
    /// A topic of kind "table": key (as text) → the latest record's value.
    Latest {
        key_index: usize,
        latest: BTreeMap<String, Vec<u8>>,
    },
    /// A dimension model: its table as `main` published it.
    Published(Box<Published>),
}

/// A dimension model's published table, and how much of the model's topic its rows cover.
struct Published {
    lakehouse: Lakehouse,
    /// The table the dimension model's version writes.
    table: TableIdent,
    /// The `main` snapshot whose rows the dimension holds.
    snapshot: Option<i64>,
    /// The next offset of each partition of the topic that snapshot's commit covers.
    covered: BTreeMap<u32, u64>,
    /// The topic's end when the stream's next micro-batch was asked for: covered before it is
    /// read. Kept until covered, so that a topic written without pause cannot starve it.
    awaited: Option<BTreeMap<u32, u64>>,
    /// When the model reads another model's table rather than the topic: the tables down to
    /// the topic, and how far the wait has come through them.
    chain: Chain,
}

/// The tables between a looked-up model and its topic, when it reads another model's table (a
/// GROUP BY over `silver.orders`, say): the first is the table the model reads, each reads
/// the next, the last reads the topic. A commit records a position on the table it reads
/// (`table:<ident>` in `kappa.offsets`, with that table's uuid), not offsets: the model covers
/// the topic's end once the last table's head covers it, the table before reaches that
/// commit, and so on up to the model.
#[derive(Default)]
struct Chain {
    /// Each table with the key its reader records its position on it under.
    tables: Vec<(TableIdent, String)>,
    /// The table (its index) whose head was last seen covering the awaited end.
    found: Option<Found>,
}

/// A table's commit that covers the awaited end.
struct Found {
    /// Its index in [`Chain::tables`].
    at: usize,
    sequence: i64,
    /// The table's uuid (a rebuilt table starts its sequence numbers again).
    uuid: String,
    /// The topic's offsets it covers.
    offsets: BTreeMap<u32, u64>,
}

impl Chain {
    /// Whether the reader of `tables[at]`, whose newest commit on `main` is `head`, has read
    /// that table up to the commit found covering; an error when its record does not read.
    fn reached(&self, head: &kappa_lakehouse::Snapshot, at: usize) -> Result<bool> {
        let Some(found) = self.found.as_ref().filter(|f| f.at == at) else {
            return Ok(false);
        };
        let record = CommitRecord::of(Some(&head.summary().additional_properties))
            .map_err(|e| DataFusionError::Execution(e.to_string()))?;
        let position = crate::upstream::table_position(&record.offsets, &self.tables[at].1)
            .map_err(|e| DataFusionError::Execution(e.to_string()))?;
        Ok(uuid_read(head, &self.tables[at].0) == Some(&found.uuid) && position >= found.sequence)
    }

    /// Starts the climb again when `head` (a reader's commit) read another table than the
    /// one whose commit was found: that table was rebuilt, and its sequence numbers began again.
    fn forget_if_rebuilt(&mut self, head: &kappa_lakehouse::Snapshot) {
        if let Some(found) = &self.found
            && let Some((table, _)) = self.tables.get(found.at)
            && uuid_read(head, table).is_some_and(|read| *read != found.uuid)
        {
            self.found = None;
        }
    }

    /// Walks up the chain as far as its commits reach: `None` when the table the model reads
    /// has reached the covering commit (the model may now be judged), else why it waits.
    async fn climb(
        &mut self,
        lakehouse: &Lakehouse,
        topic_name: &str,
        awaited: &BTreeMap<u32, u64>,
    ) -> Result<Option<String>> {
        let lake_error =
            |e: kappa_lakehouse::LakehouseError| DataFusionError::External(Box::new(e));
        let Some(last) = self.tables.len().checked_sub(1) else {
            return Ok(None);
        };
        loop {
            let at = match &self.found {
                None => last,
                Some(found) if found.at == 0 => return Ok(None),
                Some(found) => found.at - 1,
            };
            let ident = self.tables[at].0.clone();
            let table = lakehouse
                .load_table_if_exists(&ident)
                .await
                .map_err(lake_error)?;
            let Some((uuid, head)) = table.as_ref().and_then(|t| {
                let head = t.metadata().current_snapshot()?.clone();
                Some((t.metadata().uuid().to_string(), head))
            }) else {
                return Ok(Some(format!("{ident} has published nothing yet")));
            };
            let offsets = if at == last {
                let offsets = CommitRecord::of(Some(&head.summary().additional_properties))
                    .map_err(|e| DataFusionError::Execution(format!("the table {ident}: {e}")))?
                    .offsets
                    .remove(topic_name)
                    .unwrap_or_default();
                if !covers(awaited, &offsets) {
                    return Ok(Some(format!(
                        "{ident} has published offsets {offsets:?} of `{topic_name}`"
                    )));
                }
                offsets
            } else if self.reached(&head, at + 1)? {
                self.found.take().map(|f| f.offsets).unwrap_or_default()
            } else {
                self.forget_if_rebuilt(&head);
                return Ok(Some(format!(
                    "{ident} has not yet read {} up to what covers `{topic_name}`",
                    self.tables[at + 1].0
                )));
            };
            self.found = Some(Found {
                at,
                sequence: head.sequence_number(),
                uuid,
                offsets,
            });
        }
    }
}

/// What [`Dimension::catch_up`] found.
#[derive(Debug)]
pub enum CaughtUp {
    /// Up to date; the records of its topic that do not fit (a topic of kind "table").
    Ready(Vec<Rejected>),
    /// A dimension model has not yet published what its topic holds: the stream waits, why.
    Waiting(String),
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
    pub(crate) fn new(
        readers: TopicReaders,
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
            decoder: Decoder::new(spec),
            rows: Rows::Latest {
                key_index,
                latest: BTreeMap::new(),
            },
            table,
            readers,
        })
    }

    /// The model `model` looked up (a dimension, or a GROUP BY; over `topic`, declared by
    /// `spec`) as its version's table `table` on `main` published it; its rows go to
    /// `rows_table`. `chain`: the tables from the one the model reads down to the one that
    /// reads the topic, each with its key in `kappa.offsets` (none: it reads the topic).
    pub(crate) fn published(
        model: &str,
        readers: TopicReaders,
        spec: &TopicSpec,
        rows_table: Arc<DimensionTable>,
        lakehouse: Lakehouse,
        table: TableIdent,
        chain: Vec<(TableIdent, String)>,
    ) -> Dimension {
        Dimension {
            topic_name: spec.name.clone(),
            offsets_key: format!("{DIMENSION_KEY_PREFIX}{model}"),
            broken: false,
            decoder: Decoder::new(spec),
            rows: Rows::Published(Box::new(Published {
                lakehouse,
                table,
                snapshot: None,
                covered: BTreeMap::new(),
                awaited: None,
                chain: Chain {
                    tables: chain,
                    found: None,
                },
            })),
            table: rows_table,
            readers,
        }
    }

    /// Rebuilds the rows from the start of the topic up to `upto` (the next offset of each
    /// partition; a partition not named contributes nothing), and positions the readers there.
    pub async fn reset(&mut self, upto: Option<&BTreeMap<u32, u64>>) -> Result<()> {
        // Until the rebuild is done, the dimension is not to be read on from where it was.
        self.broken = true;
        let latest = match &mut self.rows {
            Rows::Latest { latest, .. } => latest,
            Rows::Published(published) => {
                // Its latest published rows, read again before the next micro-batch.
                published.snapshot = None;
                published.awaited = None;
                published.chain.found = None;
                self.broken = false;
                return Ok(());
            }
        };
        latest.clear();
        let targets: BTreeMap<u32, u64> = upto
            .into_iter()
            .flatten()
            .filter(|(_, target)| **target > 0)
            .map(|(p, t)| (*p, *t))
            .collect();
        self.readers.rewind(None).map_err(read_error)?;
        let records = self
            .readers
            .read_until(Some(&targets))
            .map_err(read_error)?;
        // Records that did not fit were reported before the commit that passed them.
        self.apply(&raws_of(&records)).await?;
        self.readers.rewind(upto).map_err(read_error)?;
        self.refresh().await?;
        self.broken = false;
        Ok(())
    }

    /// Reads what the topic has past the readers and applies it, with the records that do not
    /// fit the topic's schema or have no key; or, for a dimension model, its published rows once
    /// they cover the topic's end. An error leaves the dimension to be [`Dimension::reset`].
    pub async fn catch_up(&mut self) -> Result<CaughtUp> {
        if let Rows::Published(published) = &mut self.rows {
            return published
                .catch_up(&self.readers, &self.topic_name, &self.table)
                .await;
        }
        if self.broken {
            return Err(datafusion::error::DataFusionError::Execution(format!(
                "the dimension over `{}` could not be rebuilt; retrying",
                self.topic_name
            )));
        }
        let records = self.readers.read_until(None).map_err(read_error)?;
        let raws = raws_of(&records);
        if raws.is_empty() {
            return Ok(CaughtUp::Ready(Vec::new()));
        }
        let rejected = self.apply(&raws).await?;
        self.refresh().await?;
        Ok(CaughtUp::Ready(rejected))
    }

    /// The next offset of every partition (of those a dimension model's rows cover).
    pub fn next_offsets(&self) -> BTreeMap<u32, u64> {
        if let Rows::Published(published) = &self.rows {
            return published.covered.clone();
        }
        self.readers.position()
    }

    /// Folds records, in log order, into the rows.
    async fn apply(&mut self, raws: &[Raw<'_>]) -> Result<Vec<Rejected>> {
        let (batch, mut rejected, rows) = self.decoder.decode_indexed(raws);
        let Rows::Latest { key_index, latest } = &mut self.rows else {
            // A dimension model's rows are its published table's.
            return Ok(rejected);
        };
        let key_index = *key_index;
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
        let Rows::Latest { latest, .. } = &self.rows else {
            return Ok(());
        };
        let batch = self
            .decoder
            .decode_positioned(latest.values().map(|v| Raw {
                partition: 0,
                offset: 0,
                value: v,
            }))
            .0;
        self.table.set(batch).await;
        Ok(())
    }
}

impl Published {
    /// Waits (returns `Waiting`) until a commit on `main` covers the end `topic` had when the
    /// wait began, then puts that commit's rows into `rows` if they are new.
    async fn catch_up(
        &mut self,
        topic: &TopicReaders,
        topic_name: &str,
        rows: &DimensionTable,
    ) -> Result<CaughtUp> {
        let awaited = match &self.awaited {
            Some(awaited) => awaited.clone(),
            None => {
                let end: BTreeMap<u32, u64> = topic
                    .ends()
                    .map_err(read_error)?
                    .into_iter()
                    .filter(|(_, end)| *end > 0)
                    .collect();
                self.awaited = Some(end.clone());
                end
            }
        };
        let covers = |covered: &BTreeMap<u32, u64>| covers(&awaited, covered);
        if self.snapshot.is_some() && covers(&self.covered) {
            self.done();
            return Ok(CaughtUp::Ready(Vec::new()));
        }
        let lake_error =
            |e: kappa_lakehouse::LakehouseError| DataFusionError::External(Box::new(e));
        // Reading another model's table: first the commits of the tables below that cover
        // the end.
        if !awaited.is_empty()
            && let Some(why) = self
                .chain
                .climb(&self.lakehouse, topic_name, &awaited)
                .await?
        {
            return Ok(CaughtUp::Waiting(format!("{} reads {why}", self.table)));
        }
        let Some(table) = self
            .lakehouse
            .load_table_if_exists(&self.table)
            .await
            .map_err(lake_error)?
        else {
            if awaited.is_empty() {
                // Nothing produced yet: no rows to look up, nothing to wait for.
                self.snapshot = Some(-1);
                self.done();
                rows.set(arrow::array::RecordBatch::new_empty(rows.schema_ref()))
                    .await;
                return Ok(CaughtUp::Ready(Vec::new()));
            }
            return Ok(CaughtUp::Waiting(format!(
                "the dimension {} has no table yet",
                self.table
            )));
        };
        let Some(main) = table.metadata().current_snapshot() else {
            return Ok(CaughtUp::Waiting(format!(
                "the dimension {} has published nothing yet",
                self.table
            )));
        };
        let snapshot = main.snapshot_id();
        let corrupt = |e: &dyn std::fmt::Display| {
            DataFusionError::Execution(format!("the dimension {}: {e}", self.table))
        };
        let covered = if self.chain.tables.is_empty() {
            CommitRecord::of(Some(&main.summary().additional_properties))
                .map_err(|e| corrupt(&e))?
                .offsets
                .remove(topic_name)
                .unwrap_or_default()
        } else if self.chain.reached(main, 0).map_err(|e| corrupt(&e))? {
            // Its position on the table it reads reached the covering commit: it covers what
            // that commit covers.
            self.chain
                .found
                .as_ref()
                .map(|f| f.offsets.clone())
                .unwrap_or_default()
        } else {
            self.chain.forget_if_rebuilt(main);
            BTreeMap::new()
        };
        if self.snapshot != Some(snapshot) {
            let added = self
                .lakehouse
                .added_in(&table, main, 0)
                .await
                .map_err(lake_error)?;
            let batch = crate::upstream::read_files(
                &self.lakehouse,
                &table,
                &added.files,
                &rows.schema_ref(),
            )
            .await
            .map_err(|e| {
                DataFusionError::Execution(format!("the dimension {}: {e}", self.table))
            })?;
            rows.set(batch).await;
            self.snapshot = Some(snapshot);
        }
        let covering = awaited.is_empty() || covers(&covered);
        if covering || self.chain.tables.is_empty() {
            self.covered = covered;
        }
        if covering {
            self.done();
            Ok(CaughtUp::Ready(Vec::new()))
        } else if let Some((read, _)) = self.chain.tables.first() {
            Ok(CaughtUp::Waiting(format!(
                "{} has not yet read {read} up to what covers `{topic_name}`, which holds {:?}",
                self.table, awaited
            )))
        } else {
            Ok(CaughtUp::Waiting(format!(
                "the dimension {} has published offsets {:?} of `{topic_name}`, which holds {:?}",
                self.table, self.covered, awaited
            )))
        }
    }

    /// The awaited end is covered: the next micro-batch awaits the topic's end anew.
    fn done(&mut self) {
        self.awaited = None;
        self.chain.found = None;
    }
}

/// The uuid of the upstream table `table` as the commit `head` read it
/// (`kappa.upstream-uuid`).
fn uuid_read<'h>(head: &'h kappa_lakehouse::Snapshot, table: &TableIdent) -> Option<&'h String> {
    crate::upstream::recorded(
        &head.summary().additional_properties,
        crate::upstream::UPSTREAM_UUID_PROPERTY,
        table,
    )
}

/// Whether `covered` (a commit's next offsets) reaches every partition's end in `awaited`.
fn covers(awaited: &BTreeMap<u32, u64>, covered: &BTreeMap<u32, u64>) -> bool {
    awaited
        .iter()
        .all(|(p, end)| covered.get(p).is_some_and(|c| c >= end))
}

fn read_error(reason: String) -> DataFusionError {
    DataFusionError::Execution(format!("reading a dimension's topic: {reason}"))
}

/// Records read as (partition, offset, value), as the decoder takes them.
fn raws_of(records: &[(u32, u64, Vec<u8>)]) -> Vec<Raw<'_>> {
    records
        .iter()
        .map(|(partition, offset, value)| Raw {
            partition: *partition,
            offset: *offset,
            value,
        })
        .collect()
}
