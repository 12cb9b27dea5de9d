//! The commits iceberg-rust 0.10 has no action for, built from its public spec types: an
//! overwrite snapshot that removes some data files and adds others (copy-on-write), and an
//! append that may add nothing (a checkpoint of operator state), each in one atomic step.
//!
//! ```text
//!  new Parquet files ──────────────┐
//!  manifests holding removed files ┴─► one new data manifest: EXISTING (kept) · DELETED
//!  other manifests ─── carried as they are ─┐   (removed) · ADDED (new)
//!                                           └─► manifest list ─► snapshot (our properties)
//!                               └─► metadata vN+1.json ─► catalog pointer swapped if still vN
//! ```
//!
//! The pointer swap is a conditional `UPDATE` of the SQL catalog's row — the same statement the
//! catalog itself runs for its commits — so a concurrent writer makes this commit fail with a
//! conflict instead of losing either commit. Nothing is visible before the swap; files of a
//! failed attempt are orphans with names no other attempt uses.

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;

use iceberg::spec::{
    DataContentType, DataFile, FormatVersion, ManifestContentType, ManifestList,
    ManifestListWriter, ManifestStatus, ManifestWriterBuilder, Operation, Snapshot, Summary,
    TableMetadataBuilder,
};
use iceberg::table::Table;
use iceberg::{MetadataLocation, TableIdent};

use crate::{Context, Lakehouse, LakehouseError, Result};

/// Counts for the snapshot summary, named as the Iceberg spec suggests.
#[derive(Default)]
struct Counts {
    added_files: u64,
    added_records: u64,
    deleted_files: u64,
    deleted_records: u64,
}

impl Lakehouse {
    /// Commits one overwrite snapshot to `table`: the data files whose paths are in `remove`
    /// leave the table, `add` join it, and the snapshot's summary carries `properties`.
    /// Fails with a conflict if the table changed since `table` was loaded; on any error the
    /// outcome is decided by the catalog's pointer (read the table to learn it).
    pub async fn overwrite(
        &self,
        table: &Table,
        remove: &BTreeSet<String>,
        add: Vec<DataFile>,
        properties: HashMap<String, String>,
    ) -> Result<Table> {
        self.commit_files(table, remove, add, properties, Operation::Overwrite)
            .await
    }

    /// Commits one append snapshot to `table` adding `add` — possibly nothing, to record
    /// `properties` (offsets, a state checkpoint) with the table. Same failure rules as
    /// [`Lakehouse::overwrite`].
    pub async fn append_files(
        &self,
        table: &Table,
        add: Vec<DataFile>,
        properties: HashMap<String, String>,
    ) -> Result<Table> {
        self.commit_files(table, &BTreeSet::new(), add, properties, Operation::Append)
            .await
    }

    async fn commit_files(
        &self,
        table: &Table,
        remove: &BTreeSet<String>,
        add: Vec<DataFile>,
        properties: HashMap<String, String>,
        operation: Operation,
    ) -> Result<Table> {
        let ident = table.identifier().clone();
        let metadata = table.metadata();
        if metadata.format_version() != FormatVersion::V2 {
            return Err(LakehouseError::Unsupported(format!(
                "{ident} is an Iceberg format {} table; kappa writes format 2",
                metadata.format_version()
            )));
        }
        let file_io = table.file_io();
        let current_location = table
            .metadata_location_result()
            .doing(|| format!("locate the metadata of {ident}"))?
            .to_owned();
        let snapshot_id = self.fresh_snapshot_id(table);
        let parent = metadata.current_snapshot_id();
        let sequence = metadata.next_sequence_number();
        let commit_id = uuid::Uuid::new_v4().simple().to_string();
        let metadata_dir = format!("{}/metadata", metadata.location().trim_end_matches('/'));

        let mut writer = ManifestWriterBuilder::new(
            file_io
                .new_output(format!("{metadata_dir}/kappa-{commit_id}-m0.avro"))
                .doing(|| format!("create a manifest of {ident}"))?,
            Some(snapshot_id),
            metadata.current_schema().clone(),
            metadata.default_partition_spec().as_ref().clone(),
        )
        .build_v2_data();
        let mut counts = Counts::default();
        let mut carried = Vec::new();
        if let Some(current) = metadata.current_snapshot() {
            let bytes = file_io
                .new_input(current.manifest_list())
                .doing(|| format!("open the manifest list of {ident}"))?
                .read()
                .await
                .doing(|| format!("read the manifest list of {ident}"))?;
            let list = ManifestList::parse_with_version(&bytes, metadata.format_version())
                .doing(|| format!("parse the manifest list of {ident}"))?;
            for manifest_file in list.entries() {
                let live = manifest_file.added_files_count.unwrap_or(1)
                    + manifest_file.existing_files_count.unwrap_or(1);
                if live == 0 {
                    // Only entries deleted by an earlier snapshot: nothing to list any more.
                    continue;
                }
                if manifest_file.content != ManifestContentType::Data || remove.is_empty() {
                    // Delete files (kappa writes none) and manifests untouched by this commit
                    // stay as they are.
                    carried.push(manifest_file.clone());
                    continue;
                }
                let manifest = manifest_file
                    .load_manifest(file_io)
                    .await
                    .doing(|| format!("read a manifest of {ident}"))?;
                if !manifest
                    .entries()
                    .iter()
                    .any(|e| e.is_alive() && remove.contains(e.file_path()))
                {
                    carried.push(manifest_file.clone());
                    continue;
                }
                for entry in manifest.entries() {
                    if entry.status() == ManifestStatus::Deleted {
                        continue;
                    }
                    // Entries read through a manifest list have inherited their numbers.
                    let (Some(entry_snapshot), Some(data_sequence)) =
                        (entry.snapshot_id(), entry.sequence_number())
                    else {
                        return Err(LakehouseError::Unsupported(format!(
                            "{ident}: manifest entry {} lacks its snapshot or sequence number",
                            entry.file_path()
                        )));
                    };
                    let file_sequence = entry.file_sequence_number;
                    let file = entry.data_file().clone();
                    if remove.contains(file.file_path()) {
                        counts.deleted_files += 1;
                        counts.deleted_records += file.record_count();
                        writer
                            .add_delete_file(file, data_sequence, file_sequence)
                            .doing(|| format!("mark a file of {ident} deleted"))?;
                    } else {
                        writer
                            .add_existing_file(file, entry_snapshot, data_sequence, file_sequence)
                            .doing(|| format!("keep a file of {ident}"))?;
                    }
                }
            }
        }
        for file in add {
            if file.content_type() != DataContentType::Data {
                return Err(LakehouseError::Unsupported(format!(
                    "{ident}: only data files can be added by an overwrite"
                )));
            }
            counts.added_files += 1;
            counts.added_records += file.record_count();
            writer
                .add_file(file, sequence)
                .doing(|| format!("add a file to {ident}"))?;
        }
        let manifest = writer
            .write_manifest_file()
            .await
            .doing(|| format!("write a manifest of {ident}"))?;

        let list_path = format!("{metadata_dir}/snap-{snapshot_id}-kappa-{commit_id}.avro");
        let mut list_writer = ManifestListWriter::v2(
            file_io
                .new_output(&list_path)
                .doing(|| format!("create the manifest list of {ident}"))?
                .writer()
                .await
                .doing(|| format!("open the manifest list of {ident}"))?,
            snapshot_id,
            parent,
            sequence,
        );
        list_writer
            .add_manifests(std::iter::once(manifest).chain(carried))
            .doing(|| format!("list the manifests of {ident}"))?;
        list_writer
            .close()
            .await
            .doing(|| format!("write the manifest list of {ident}"))?;

        // Totals carry on from the parent's summary, as Iceberg writers keep them.
        let previous = |key: &str| -> u64 {
            metadata
                .current_snapshot()
                .and_then(|s| s.summary().additional_properties.get(key).cloned())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let total_files = (previous("total-data-files") + counts.added_files)
            .saturating_sub(counts.deleted_files);
        let total_records = (previous("total-records") + counts.added_records)
            .saturating_sub(counts.deleted_records);
        let mut summary = properties;
        for (key, value) in [
            ("added-data-files", counts.added_files),
            ("added-records", counts.added_records),
            ("deleted-data-files", counts.deleted_files),
            ("deleted-records", counts.deleted_records),
            ("total-data-files", total_files),
            ("total-records", total_records),
        ] {
            summary.insert(key.to_owned(), value.to_string());
        }
        let snapshot = Snapshot::builder()
            .with_snapshot_id(snapshot_id)
            .with_parent_snapshot_id(parent)
            .with_sequence_number(sequence)
            .with_timestamp_ms(chrono_now_ms())
            .with_manifest_list(list_path)
            .with_summary(Summary {
                operation,
                additional_properties: summary,
            })
            .with_schema_id(metadata.current_schema_id())
            .build();
        let updated = TableMetadataBuilder::new_from_metadata(
            metadata.clone(),
            Some(current_location.clone()),
        )
        .set_branch_snapshot(snapshot, iceberg::spec::MAIN_BRANCH)
        .and_then(TableMetadataBuilder::build)
        .doing(|| format!("build the new metadata of {ident}"))?
        .metadata;
        let next_location = MetadataLocation::from_str(&current_location)
            .doing(|| format!("parse the metadata location of {ident}"))?
            .with_next_version();
        updated
            .write_to(file_io, &next_location)
            .await
            .doing(|| format!("write the new metadata of {ident}"))?;
        self.swap_pointer(&ident, &current_location, &next_location.to_string())
            .await?;
        self.load_table(&ident).await
    }

    /// A snapshot id not used in `table`, positive as the spec asks.
    fn fresh_snapshot_id(&self, table: &Table) -> i64 {
        loop {
            let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
            let id = ((high ^ low) & (i64::MAX as u64)) as i64;
            if id != 0 && table.metadata().snapshot_by_id(id).is_none() {
                return id;
            }
        }
    }

    /// Points the catalog at `next` if it still points at `current`.
    async fn swap_pointer(&self, ident: &TableIdent, current: &str, next: &str) -> Result<()> {
        let result = sqlx::query(
            "UPDATE iceberg_tables SET metadata_location = ?, previous_metadata_location = ? \
             WHERE catalog_name = ? AND table_namespace = ? AND table_name = ? \
             AND (iceberg_type = 'TABLE' OR iceberg_type IS NULL) AND metadata_location = ?",
        )
        .bind(next)
        .bind(current)
        .bind(crate::CATALOG_NAME)
        .bind(ident.namespace().join("."))
        .bind(ident.name())
        .bind(current)
        .execute(&self.pointers)
        .await
        .map_err(|e| LakehouseError::Catalog(format!("commit to {ident}: {e}")))?;
        if result.rows_affected() == 0 {
            return Err(LakehouseError::Conflict(ident.to_string()));
        }
        Ok(())
    }
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
