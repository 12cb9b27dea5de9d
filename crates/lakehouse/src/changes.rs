//! An append-only table read as a stream: the rows each commit added, in commit order.
//!
//! Every data file of a table carries the data sequence number of the commit that added its
//! rows, so a reader's position is one number — the last sequence number it consumed — and
//! what follows it is every live file with a greater one, whatever snapshots have expired
//! since. Only the small-file merge (`commit.rs`) moves rows into new files: a merged file
//! takes the greatest sequence number of the files it merged, and its name the least
//! (`kappa-merged-s<first>-…`, [`AddedFile::first`]); a merge takes only files at or below the
//! positions readers hold ([`Lakehouse::hold`]). A file merged after a reader began, listed
//! after its position with a first sequence number at or below it, mixes rows the reader read
//! with rows it did not: the reader cannot go on from there ([`Added::continues`]) and reads
//! the table from the start.

use std::collections::{BTreeMap, HashMap};

use arrow::record_batch::RecordBatch;
use iceberg::TableIdent;
use iceberg::spec::{DataFile, ManifestContentType, ManifestStatus};
use iceberg::table::Table;

use crate::{Context, Lakehouse, LakehouseError, Result};

/// Positions readers hold on tables, by table and reader: a merge takes only files at or below
/// the least of a table's.
pub(crate) type Holds = std::sync::Mutex<HashMap<TableIdent, BTreeMap<String, i64>>>;

/// The data files a table's commits added after a position.
#[derive(Debug, Default)]
pub struct Added {
    /// Oldest first (by data sequence number).
    pub files: Vec<AddedFile>,
    /// The current snapshot's sequence number (0 for an empty table): a reader at it has
    /// read everything.
    pub last_sequence: i64,
}

/// A data file listed after a position.
#[derive(Debug, Clone)]
pub struct AddedFile {
    /// The data sequence number: the commit whose rows it holds, or the last of them.
    pub sequence: i64,
    /// The first commit whose rows it holds (below `sequence` only for a merged file).
    pub first: i64,
    /// The commit that added the file (later than `sequence` for a merged file).
    pub added_at: i64,
    pub file: DataFile,
}

impl Added {
    /// Whether a reader at `position`, which began reading the table from its start when its
    /// last commit was `began_at`, can go on with these files: none was merged after it began
    /// from files it has read (a file merged before it began is read whole, once).
    pub fn continues(&self, position: i64, began_at: i64) -> bool {
        self.files
            .iter()
            .all(|f| f.first > position || f.added_at <= began_at)
    }
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
        match table.metadata().current_snapshot() {
            Some(current) => self.added_in(table, current, after).await,
            None => Ok(Added::default()),
        }
    }

    /// The live data files of snapshot `current` of `table` (a branch's head, say) whose rows
    /// were added after the data sequence number `after`, oldest first.
    pub async fn added_in(
        &self,
        table: &Table,
        current: &iceberg::spec::Snapshot,
        after: i64,
    ) -> Result<Added> {
        let ident = table.identifier();
        let file_io = table.file_io();
        let list = crate::commit::manifest_list(table, current).await?;
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
                    files.push(AddedFile {
                        sequence,
                        first: crate::commit::first_sequence(entry.file_path(), sequence),
                        added_at: entry.file_sequence_number.unwrap_or(sequence),
                        file: entry.data_file().clone(),
                    });
                }
            }
        }
        files.sort_by(|a, b| {
            (a.sequence, a.file.file_path()).cmp(&(b.sequence, b.file.file_path()))
        });
        Ok(Added {
            files,
            last_sequence: current.sequence_number(),
        })
    }

    /// The rows of one of `table`'s data files, as its Parquet holds them.
    pub async fn read_data_file(&self, table: &Table, file: &DataFile) -> Result<Vec<RecordBatch>> {
        self.read_data_file_columns(table, file, None).await
    }

    /// The rows of one of `table`'s data files and the event-time marks its footer carries
    /// ([`crate::marks`]), if any.
    pub async fn read_marked_file(
        &self,
        table: &Table,
        file: &DataFile,
    ) -> Result<(Vec<RecordBatch>, Option<crate::marks::FileMarks>)> {
        let builder = reader_of(table, file).await?;
        let marks = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| {
                kv.iter()
                    .find(|e| e.key == crate::marks::FILE_MARKS_PROPERTY)
            })
            .and_then(|e| e.value.as_deref())
            .and_then(crate::marks::parse);
        let batches = builder
            .build()
            .map_err(|e| LakehouseError::Query(format!("read {}: {e}", file.file_path())))?
            .map(|batch| {
                batch.map_err(|e| LakehouseError::Query(format!("read {}: {e}", file.file_path())))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((batches, marks))
    }

    /// The rows of one of `table`'s data files, only the `columns` named (all when `None`).
    pub async fn read_data_file_columns(
        &self,
        table: &Table,
        file: &DataFile,
        columns: Option<&[String]>,
    ) -> Result<Vec<RecordBatch>> {
        let builder = reader_of(table, file).await?;
        let reader = match columns {
            None => builder.build(),
            Some(columns) => {
                let mask = parquet::arrow::ProjectionMask::columns(
                    builder.parquet_schema(),
                    columns.iter().map(String::as_str),
                );
                builder.with_projection(mask).build()
            }
        }
        .map_err(|e| LakehouseError::Query(format!("read {}: {e}", file.file_path())))?;
        reader
            .map(|batch| {
                batch.map_err(|e| LakehouseError::Query(format!("read {}: {e}", file.file_path())))
            })
            .collect()
    }
}

/// A reader of one of `table`'s data files.
async fn reader_of(
    table: &Table,
    file: &DataFile,
) -> Result<
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder<
        impl parquet::file::reader::ChunkReader + 'static,
    >,
> {
    let bytes = table
        .file_io()
        .new_input(file.file_path())
        .doing(|| format!("open {}", file.file_path()))?
        .read()
        .await
        .doing(|| format!("read {}", file.file_path()))?;
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| LakehouseError::Query(format!("read {}: {e}", file.file_path())))
}
