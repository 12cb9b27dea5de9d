//! An append-only table read as a stream: the rows each commit added, in commit order.
//!
//! Every data file of a table carries the data sequence number of the commit that added its
//! rows, so a reader's position is one number — the last sequence number it consumed — and
//! what follows it is every live file with a greater one, whatever snapshots have expired
//! since. Only the small-file merge (`commit.rs`) moves rows into new files; it gives a
//! merged file the greatest sequence number of the files it merged, merges only files at or
//! below the positions readers hold ([`Lakehouse::hold`]), and records the greatest sequence
//! number it ever merged ([`MERGED_UPTO_PROPERTY`]). A reader whose position is below that
//! number cannot resume (a merged file mixes rows it read with rows it did not) and must read
//! the table from the start.

use std::collections::{BTreeMap, HashMap};

use arrow::record_batch::RecordBatch;
use iceberg::TableIdent;
use iceberg::spec::{DataFile, ManifestContentType, ManifestList, ManifestStatus};
use iceberg::table::Table;

use crate::{Context, Lakehouse, LakehouseError, Result};

/// Summary property: the greatest data sequence number any merge of the table's files took in
/// (carried from commit to commit).
pub const MERGED_UPTO_PROPERTY: &str = "kappa.merged-upto";

/// Positions readers hold on tables, by table and reader: a merge takes only files at or below
/// the least of a table's.
pub(crate) type Holds = std::sync::Mutex<HashMap<TableIdent, BTreeMap<String, i64>>>;

/// The data files a table's commits added after a position.
#[derive(Debug, Default)]
pub struct Added {
    /// `(data sequence number, file)`, oldest first.
    pub files: Vec<(i64, DataFile)>,
    /// The table's [`MERGED_UPTO_PROPERTY`] (0 when nothing was ever merged).
    pub merged_upto: i64,
    /// The current snapshot's sequence number (0 for an empty table): a reader at it has
    /// read everything.
    pub last_sequence: i64,
}

impl Lakehouse {
    /// Holds `position` on `table` for `reader`: until it is moved or released, the table's
    /// small-file merge leaves every file above the least position held alone.
    pub fn hold(&self, table: &TableIdent, reader: &str, position: i64) {
        if let Ok(mut holds) = self.holds.lock() {
            holds
                .entry(table.clone())
                .or_default()
                .insert(reader.to_owned(), position);
        }
    }

    /// Releases `reader`'s hold on `table`.
    pub fn release(&self, table: &TableIdent, reader: &str) {
        if let Ok(mut holds) = self.holds.lock()
            && let Some(readers) = holds.get_mut(table)
        {
            readers.remove(reader);
            if readers.is_empty() {
                holds.remove(table);
            }
        }
    }

    /// Releases every hold whose reader `keep` does not name.
    pub fn release_all_but(&self, keep: &dyn Fn(&str) -> bool) {
        if let Ok(mut holds) = self.holds.lock() {
            for readers in holds.values_mut() {
                readers.retain(|reader, _| keep(reader));
            }
            holds.retain(|_, readers| !readers.is_empty());
        }
    }

    /// The least position held on `table`, if any reader holds one. A poisoned lock holds
    /// everything (no merge).
    pub(crate) fn merge_floor(&self, table: &TableIdent) -> Option<i64> {
        match self.holds.lock() {
            Ok(holds) => holds
                .get(table)
                .and_then(|readers| readers.values().min().copied()),
            Err(_) => Some(0),
        }
    }

    /// The live data files of `table`'s current snapshot whose rows were added after the data
    /// sequence number `after`, oldest first.
    pub async fn added_after(&self, table: &Table, after: i64) -> Result<Added> {
        let ident = table.identifier();
        let metadata = table.metadata();
        let Some(current) = metadata.current_snapshot() else {
            return Ok(Added::default());
        };
        let merged_upto = current
            .summary()
            .additional_properties
            .get(MERGED_UPTO_PROPERTY)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let file_io = table.file_io();
        let bytes = file_io
            .new_input(current.manifest_list())
            .doing(|| format!("open the manifest list of {ident}"))?
            .read()
            .await
            .doing(|| format!("read the manifest list of {ident}"))?;
        let list = ManifestList::parse_with_version(&bytes, metadata.format_version())
            .doing(|| format!("parse the manifest list of {ident}"))?;
        let mut files = Vec::new();
        for manifest_file in list.entries() {
            // A manifest's entries are no newer than the manifest: one written at or before
            // `after` holds nothing to read.
            if manifest_file.content != ManifestContentType::Data
                || manifest_file.sequence_number <= after
            {
                continue;
            }
            let manifest = manifest_file
                .load_manifest(file_io)
                .await
                .doing(|| format!("read a manifest of {ident}"))?;
            for entry in manifest.entries() {
                if entry.status() == ManifestStatus::Deleted {
                    continue;
                }
                let Some(sequence) = entry.sequence_number() else {
                    return Err(LakehouseError::Unsupported(format!(
                        "{ident}: manifest entry {} lacks its sequence number",
                        entry.file_path()
                    )));
                };
                if sequence > after {
                    files.push((sequence, entry.data_file().clone()));
                }
            }
        }
        files.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| a.1.file_path().cmp(b.1.file_path()))
        });
        Ok(Added {
            files,
            merged_upto,
            last_sequence: current.sequence_number(),
        })
    }

    /// The rows of one of `table`'s data files, as its Parquet holds them.
    pub async fn read_data_file(&self, table: &Table, file: &DataFile) -> Result<Vec<RecordBatch>> {
        let bytes = table
            .file_io()
            .new_input(file.file_path())
            .doing(|| format!("open {}", file.file_path()))?
            .read()
            .await
            .doing(|| format!("read {}", file.file_path()))?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|builder| builder.build())
            .map_err(|e| LakehouseError::Query(format!("read {}: {e}", file.file_path())))?;
        reader
            .map(|batch| {
                batch.map_err(|e| LakehouseError::Query(format!("read {}: {e}", file.file_path())))
            })
            .collect()
    }
}
