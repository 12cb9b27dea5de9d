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
use iceberg::{MetadataLocation, TableIdent, TableRequirement};

use crate::{Context, Lakehouse, LakehouseError, Result};

/// Snapshots kept in a table's metadata (the newest ones): time travel reaches this far back.
pub const SNAPSHOTS_KEPT: usize = 32;
/// How long a snapshot stays after the next one replaced it (ms).
pub const SNAPSHOT_REPLACED_MIN_MS: i64 = 10_000;
/// Data manifests a snapshot may list before a commit folds them into one.
pub const MANIFESTS_MAX: usize = 8;
/// Files of one size tier that an append table merges into one.
pub const TIER_FILES: usize = 8;
/// Size tiers of data files that are merged: under 1 MiB and under 8 MiB; larger files stay.
const TIER_BOUNDS: [u64; 2] = [1 << 20, 8 << 20];
/// A merge reads its files into memory: at most this many bytes of Parquet at once.
const MERGE_BYTES_MAX: u64 = 64 << 20;
/// Every this many commits, files no kept snapshot uses are removed.
pub const CLEANUP_EVERY: i64 = 64;
/// How old an unreferenced file must be before it is removed: a query that planned on an
/// expired snapshot has this long to read its files.
pub const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_secs(120);

/// A live manifest entry carried into a rewritten manifest.
struct Kept {
    file: DataFile,
    snapshot: i64,
    data_sequence: i64,
    file_sequence: Option<i64>,
}

/// The manifest list of `snapshot` of `table`.
pub(crate) async fn manifest_list(table: &Table, snapshot: &Snapshot) -> Result<ManifestList> {
    let ident = table.identifier();
    let bytes = table
        .file_io()
        .new_input(snapshot.manifest_list())
        .doing(|| format!("open the manifest list of {ident}"))?
        .read()
        .await
        .doing(|| format!("read the manifest list of {ident}"))?;
    ManifestList::parse_with_version(&bytes, table.metadata().format_version())
        .doing(|| format!("parse the manifest list of {ident}"))
}

/// Small files merged into new ones.
struct Merge {
    inputs: Vec<String>,
    written: Vec<DataFile>,
    /// The greatest data sequence number of the inputs: the merged files' own.
    sequence: i64,
}

/// Counts for the snapshot summary, named as the Iceberg spec suggests.
#[derive(Default)]
struct Counts {
    added_files: u64,
    added_records: u64,
    deleted_files: u64,
    deleted_records: u64,
    added_bytes: u64,
    removed_bytes: u64,
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
        self.commit_files(table, remove, add, properties, Operation::Overwrite, None)
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
        self.commit_files(
            table,
            &BTreeSet::new(),
            add,
            properties,
            Operation::Append,
            None,
        )
        .await
    }

    /// Commits to the branch [`Lakehouse::branch_for`] says (main, or the audit branch of a
    /// staged table, started from main), on top of that branch's head; `to_main` forces main
    /// and drops the audit branch in the same step (a discard).
    pub(crate) async fn commit_files(
        &self,
        table: &Table,
        remove: &BTreeSet<String>,
        add: Vec<DataFile>,
        properties: HashMap<String, String>,
        operation: Operation,
        to_main: Option<()>,
    ) -> Result<Table> {
        let ident = table.identifier().clone();
        let branch = match to_main {
            Some(()) => iceberg::spec::MAIN_BRANCH,
            None => self.branch_for(&ident),
        };
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
        let base = crate::wap::branch_head(table, branch);
        let parent = base.map(|s| s.snapshot_id());
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
        // The live entries of the manifests this commit rewrites.
        let mut rewritten = Vec::new();
        if let Some(current) = base {
            let list = manifest_list(table, current).await?;
            let live = |m: &iceberg::spec::ManifestFile| {
                m.added_files_count.unwrap_or(1) + m.existing_files_count.unwrap_or(1) > 0
            };
            // Every commit adds a manifest; past a few, they are folded into this one, so that
            // planning a scan reads a bounded number of manifests.
            let merge = list
                .entries()
                .iter()
                .filter(|m| m.content == ManifestContentType::Data && live(m))
                .count()
                >= MANIFESTS_MAX;
            for manifest_file in list.entries() {
                if !live(manifest_file) {
                    // Only entries deleted by an earlier snapshot: nothing to list any more.
                    continue;
                }
                if manifest_file.content != ManifestContentType::Data
                    || (remove.is_empty() && !merge)
                {
                    // Delete files (kappa writes none) and manifests untouched by this commit
                    // stay as they are.
                    carried.push(manifest_file.clone());
                    continue;
                }
                let manifest = manifest_file
                    .load_manifest(file_io)
                    .await
                    .doing(|| format!("read a manifest of {ident}"))?;
                if !merge
                    && !manifest
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
                    rewritten.push(Kept {
                        file: entry.data_file().clone(),
                        snapshot: entry_snapshot,
                        data_sequence,
                        file_sequence: entry.file_sequence_number,
                    });
                }
            }
        }
        // An append table's small files are merged as their manifests are: any size tier
        // holding TIER_FILES files becomes one file of the next tier.
        let mut operation = operation;
        let mut compacted = BTreeSet::new();
        // Merged files keep the greatest data sequence number of what they merged, so that
        // a stream reader past it never reads their rows again (`changes.rs`).
        let mut merged_files = Vec::new();
        if operation == Operation::Append {
            let merges = self.compact(table, &rewritten, remove).await?;
            for merge in merges {
                compacted.extend(merge.inputs);
                merged_files.extend(merge.written.into_iter().map(|f| (merge.sequence, f)));
                operation = Operation::Overwrite;
            }
        }
        for kept in rewritten {
            let path = kept.file.file_path().to_owned();
            if remove.contains(&path) || compacted.contains(&path) {
                counts.deleted_files += 1;
                counts.deleted_records += kept.file.record_count();
                counts.removed_bytes += kept.file.file_size_in_bytes();
                writer
                    .add_delete_file(kept.file, kept.data_sequence, kept.file_sequence)
                    .doing(|| format!("mark a file of {ident} deleted"))?;
            } else {
                writer
                    .add_existing_file(
                        kept.file,
                        kept.snapshot,
                        kept.data_sequence,
                        kept.file_sequence,
                    )
                    .doing(|| format!("keep a file of {ident}"))?;
            }
        }
        for (file, data_sequence) in add
            .into_iter()
            .map(|f| (f, sequence))
            .chain(merged_files.into_iter().map(|(s, f)| (f, s)))
        {
            if file.content_type() != DataContentType::Data {
                return Err(LakehouseError::Unsupported(format!(
                    "{ident}: only data files can be added by an overwrite"
                )));
            }
            counts.added_files += 1;
            counts.added_records += file.record_count();
            counts.added_bytes += file.file_size_in_bytes();
            writer
                .add_file(file, data_sequence)
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
            base.and_then(|s| s.summary().additional_properties.get(key).cloned())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let total_files = (previous("total-data-files") + counts.added_files)
            .saturating_sub(counts.deleted_files);
        let total_records = (previous("total-records") + counts.added_records)
            .saturating_sub(counts.deleted_records);
        let total_bytes = (previous("total-files-size") + counts.added_bytes)
            .saturating_sub(counts.removed_bytes);
        let mut summary = properties;
        for (key, value) in [
            ("added-data-files", counts.added_files),
            ("added-records", counts.added_records),
            ("deleted-data-files", counts.deleted_files),
            ("deleted-records", counts.deleted_records),
            ("total-data-files", total_files),
            ("total-records", total_records),
            ("added-files-size", counts.added_bytes),
            ("removed-files-size", counts.removed_bytes),
            ("total-files-size", total_bytes),
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
        // Only the newest snapshots stay in the metadata, so that it does not grow with every
        // commit; the files only expired snapshots used are removed by `remove_orphans`. A
        // snapshot stays while the one after it is younger than SNAPSHOT_REPLACED_MIN_MS (10 s),
        // so a query planned on it has that long to read its files.
        let mut by_age: Vec<(i64, i64, i64)> = metadata
            .snapshots()
            .map(|s| (s.sequence_number(), s.timestamp_ms(), s.snapshot_id()))
            .collect();
        by_age.sort_unstable();
        let now = chrono_now_ms();
        let newest_kept = by_age.len().saturating_sub(SNAPSHOTS_KEPT - 1);
        // The heads of main and of the audit branch are never expired.
        let heads: Vec<i64> = [iceberg::spec::MAIN_BRANCH, crate::wap::AUDIT_BRANCH]
            .iter()
            .filter_map(|b| metadata.snapshot_for_ref(b).map(|s| s.snapshot_id()))
            .collect();
        let expired: Vec<i64> = by_age
            .windows(2)
            .take(newest_kept)
            .filter(|pair| now - pair[1].1 >= self.replaced_snapshot_ms)
            .map(|pair| pair[0].2)
            .filter(|id| !heads.contains(id))
            .collect();
        let audit_head = metadata
            .snapshot_for_ref(crate::wap::AUDIT_BRANCH)
            .map(|s| s.snapshot_id());
        let updated = TableMetadataBuilder::new_from_metadata(
            metadata.clone(),
            Some(current_location.clone()),
        )
        .set_branch_snapshot(snapshot, branch)
        .map(|b| match to_main {
            Some(()) => b.remove_ref(crate::wap::AUDIT_BRANCH),
            None => b,
        })
        .map(|b| b.remove_snapshots(&expired))
        .and_then(TableMetadataBuilder::build)
        .doing(|| format!("build the new metadata of {ident}"))?;
        let mut requirements = vec![TableRequirement::RefSnapshotIdMatch {
            r#ref: iceberg::spec::MAIN_BRANCH.to_owned(),
            snapshot_id: metadata.current_snapshot_id(),
        }];
        if branch != iceberg::spec::MAIN_BRANCH || to_main.is_some() {
            requirements.push(TableRequirement::RefSnapshotIdMatch {
                r#ref: crate::wap::AUDIT_BRANCH.to_owned(),
                snapshot_id: audit_head,
            });
        }
        self.commit_metadata(table, updated, requirements).await?;
        let committed = self.load_table(&ident).await?;
        if sequence % CLEANUP_EVERY == 0 {
            // Committed already: a failed clean-up only leaves files for the next one.
            if let Err(e) = self.remove_orphans(&committed, ORPHAN_GRACE).await {
                tracing::warn!(table = %ident, error = %e, "removing unreferenced files failed");
            }
        }
        Ok(committed)
    }

    /// Makes `updated` (built on `table`'s metadata) the table's metadata if the catalog
    /// still names `table`'s: the SQL catalog's pointer swapped, or the REST catalog's commit
    /// with `requirements` (plus the table's UUID).
    pub(crate) async fn commit_metadata(
        &self,
        table: &Table,
        updated: iceberg::spec::TableMetadataBuildResult,
        mut requirements: Vec<TableRequirement>,
    ) -> Result<()> {
        let ident = table.identifier().clone();
        let metadata = table.metadata();
        let file_io = table.file_io();
        let current_location = table
            .metadata_location_result()
            .doing(|| format!("locate the metadata of {ident}"))?
            .to_owned();
        match &self.commits {
            Committer::Sql(pointers) => {
                let next_location = MetadataLocation::from_str(&current_location)
                    .doing(|| format!("parse the metadata location of {ident}"))?
                    .with_next_version();
                updated
                    .metadata
                    .write_to(file_io, &next_location)
                    .await
                    .doing(|| format!("write the new metadata of {ident}"))?;
                swap_pointer(
                    pointers,
                    &ident,
                    &current_location,
                    &next_location.to_string(),
                )
                .await?;
            }
            Committer::Rest(rest) => {
                // The catalog applies the same changes if the table is still the one they
                // were built on, and writes the metadata file itself.
                requirements.push(TableRequirement::UuidMatch {
                    uuid: metadata.uuid(),
                });
                rest.commit(&ident, requirements, updated.changes).await?;
            }
        }
        Ok(())
    }

    /// Merges the small files among `live` (those not in `remove`): each size tier with
    /// [`TIER_FILES`] files or more is read and written again as one file; files above the
    /// least position a stream reader holds ([`Lakehouse::hold`]) are not merged.
    async fn compact(
        &self,
        table: &Table,
        live: &[Kept],
        remove: &BTreeSet<String>,
    ) -> Result<Vec<Merge>> {
        let ident = table.identifier();
        // Files above a position a stream reader holds are left to it.
        let floor = self.merge_floor(ident);
        let mut merges = Vec::new();
        for (tier, bound) in TIER_BOUNDS.iter().enumerate() {
            let lower = if tier == 0 { 0 } else { TIER_BOUNDS[tier - 1] };
            // All of the tier's files, as many as fit in one merge's memory.
            let mut bytes = 0;
            let files: Vec<&Kept> = live
                .iter()
                .filter(|k| !remove.contains(k.file.file_path()))
                .filter(|k| (lower..*bound).contains(&k.file.file_size_in_bytes()))
                .filter(|k| floor.is_none_or(|floor| k.data_sequence <= floor))
                .take_while(|k| {
                    bytes += k.file.file_size_in_bytes();
                    bytes <= MERGE_BYTES_MAX
                })
                .collect();
            if files.len() < TIER_FILES {
                continue;
            }
            let mut batches = Vec::new();
            let mut marks = Vec::new();
            for kept in &files {
                let (rows, file_marks) = self.read_marked_file(table, &kept.file).await?;
                batches.extend(rows);
                marks.push(file_marks);
            }
            // Never stricter than the files it replaces (`marks`).
            let marks = crate::marks::merged(&marks).and_then(|m| serde_json::to_string(&m).ok());
            tracing::debug!(table = %ident, files = files.len(), tier, "merging small files");
            // The name says the least sequence number merged: a stream reader past it must
            // not read the file again (`changes.rs`).
            let first = first_sequence_of(
                files
                    .iter()
                    .map(|k| first_sequence(k.file.file_path(), k.data_sequence)),
            );
            let label = format!("{}{first}-", MERGED_LABEL);
            merges.push(Merge {
                written: self
                    .write_marked_files(table, &batches, &label, marks.as_deref())
                    .await?,
                inputs: files
                    .iter()
                    .map(|k| k.file.file_path().to_owned())
                    .collect(),
                sequence: files.iter().map(|k| k.data_sequence).max().unwrap_or(0),
            });
        }
        Ok(merges)
    }

    /// Removes the files of `table` that none of its snapshots uses any more (data files
    /// replaced, manifests and lists of expired snapshots, old metadata, state files no
    /// snapshot names), if they are older than `grace` ([`ORPHAN_GRACE`] after commits).
    /// Local warehouses only. Returns how many files it removed.
    pub async fn remove_orphans(&self, table: &Table, grace: std::time::Duration) -> Result<usize> {
        let metadata = table.metadata();
        let Some(root) = local_path(metadata.location()) else {
            return Ok(0);
        };
        let file_io = table.file_io();
        let mut used: BTreeSet<String> = BTreeSet::new();
        let mut summaries = String::new();
        if let Ok(current) = table.metadata_location_result() {
            used.insert(normalized(current));
        }
        for log in metadata.metadata_log() {
            used.insert(normalized(&log.metadata_file));
        }
        let mut manifests_seen = BTreeSet::new();
        for snapshot in metadata.snapshots() {
            used.insert(normalized(snapshot.manifest_list()));
            for value in snapshot.summary().additional_properties.values() {
                summaries.push_str(value);
                summaries.push('\n');
            }
            let bytes = file_io
                .new_input(snapshot.manifest_list())
                .doing(|| format!("open {}", snapshot.manifest_list()))?
                .read()
                .await
                .doing(|| format!("read {}", snapshot.manifest_list()))?;
            let list = ManifestList::parse_with_version(&bytes, metadata.format_version())
                .doing(|| format!("parse {}", snapshot.manifest_list()))?;
            for manifest_file in list.entries() {
                used.insert(normalized(&manifest_file.manifest_path));
                if !manifests_seen.insert(manifest_file.manifest_path.clone()) {
                    continue;
                }
                let manifest = manifest_file
                    .load_manifest(file_io)
                    .await
                    .doing(|| format!("read {}", manifest_file.manifest_path))?;
                for entry in manifest.entries() {
                    used.insert(normalized(entry.file_path()));
                }
            }
        }
        // The file names the summaries name (state files), as whole names: a file whose name
        // merely contains a named one's is not kept for it.
        let named: BTreeSet<String> = summaries
            .split(|c: char| {
                c.is_whitespace()
                    || matches!(c, '"' | '\'' | ',' | ':' | '{' | '}' | '[' | ']' | '/')
            })
            .filter(|token| !token.is_empty())
            .map(str::to_owned)
            .collect();
        // The walk and the removals are blocking file system calls: off the async threads.
        tokio::task::spawn_blocking(move || remove_unused(root, &used, &named, grace))
            .await
            .map_err(|e| LakehouseError::Catalog(format!("join the orphan removal: {e}")))
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
}

/// Points the SQL catalog at `next` if it still points at `current`, and the aliases that
/// follow the table with it, in one transaction (`alias.rs`).
async fn swap_pointer(
    pointers: &sqlx::SqlitePool,
    ident: &TableIdent,
    current: &str,
    next: &str,
) -> Result<()> {
    let failed = |e: sqlx::Error| LakehouseError::Catalog(format!("commit to {ident}: {e}"));
    let namespace = ident.namespace().join(".");
    let mut tx = pointers.begin().await.map_err(failed)?;
    let result = sqlx::query(
        "UPDATE iceberg_tables SET metadata_location = ?, previous_metadata_location = ? \
         WHERE catalog_name = ? AND table_namespace = ? AND table_name = ? \
         AND (iceberg_type = 'TABLE' OR iceberg_type IS NULL) AND metadata_location = ?",
    )
    .bind(next)
    .bind(current)
    .bind(crate::CATALOG_NAME)
    .bind(&namespace)
    .bind(ident.name())
    .bind(current)
    .execute(&mut *tx)
    .await
    .map_err(failed)?;
    if result.rows_affected() == 0 {
        // Dropping the transaction rolls it back: nothing changed.
        return Err(LakehouseError::Conflict(ident.to_string()));
    }
    sqlx::query(
        "UPDATE iceberg_tables SET previous_metadata_location = metadata_location, \
         metadata_location = ? \
         WHERE catalog_name = ? AND (table_namespace, table_name) IN \
         (SELECT table_namespace, table_name FROM kappa_aliases \
          WHERE catalog_name = ? AND target_namespace = ? AND target_name = ?)",
    )
    .bind(next)
    .bind(crate::CATALOG_NAME)
    .bind(crate::CATALOG_NAME)
    .bind(&namespace)
    .bind(ident.name())
    .execute(&mut *tx)
    .await
    .map_err(failed)?;
    tx.commit().await.map_err(failed)
}

/// Where a commit's new metadata goes.
#[derive(Debug, Clone)]
pub(crate) enum Committer {
    /// The SQL catalog's database: the metadata file is written by us and the table's pointer
    /// swapped by a conditional `UPDATE`.
    Sql(sqlx::SqlitePool),
    /// A REST catalog: the changes are posted with their requirements; the catalog checks
    /// them, writes the metadata file and moves the pointer, or answers 409.
    Rest(RestCommits),
}

/// Commits through an Iceberg REST catalog (`POST …/namespaces/{ns}/tables/{table}`).
/// iceberg-rust's `RestCatalog` sends only what its own transactions build, so this posts
/// the changes our commit layer built, with the catalog's address, prefix and headers.
#[derive(Debug, Clone)]
pub(crate) struct RestCommits {
    http: reqwest::Client,
    /// `{uri}/v1[/{prefix}]`
    base: reqwest::Url,
    headers: reqwest::header::HeaderMap,
}

impl Committer {
    /// Commits through the REST catalog at `uri`, asking its configuration for `warehouse`
    /// (which may set the path prefix). `properties`: `token` (a bearer token), `header.NAME`
    /// (extra headers), `prefix`.
    pub(crate) async fn rest(
        uri: &str,
        warehouse: &str,
        properties: &HashMap<String, String>,
    ) -> Result<Committer> {
        let bad = |why: String| LakehouseError::Catalog(format!("REST catalog {uri}: {why}"));
        let mut headers = reqwest::header::HeaderMap::new();
        for (key, value) in properties {
            let (name, value) = match (key.as_str(), key.strip_prefix("header.")) {
                ("token", _) => ("authorization", format!("Bearer {value}")),
                (_, Some(name)) => (name, value.clone()),
                _ => continue,
            };
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| bad(format!("header `{name}`: {e}")))?;
            let value = reqwest::header::HeaderValue::from_str(&value)
                .map_err(|e| bad(format!("the value of header `{name}`: {e}")))?;
            headers.insert(name, value);
        }
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let mut config_url =
            reqwest::Url::parse(&format!("{}/v1/config", uri.trim_end_matches('/')))
                .map_err(|e| bad(e.to_string()))?;
        config_url
            .query_pairs_mut()
            .append_pair("warehouse", warehouse);
        let config: serde_json::Value = http
            .get(config_url)
            .headers(headers.clone())
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| bad(format!("read its configuration: {e}")))?
            .json()
            .await
            .map_err(|e| bad(format!("read its configuration: {e}")))?;
        let setting = |section: &str| config[section]["prefix"].as_str().map(str::to_owned);
        let prefix = setting("overrides")
            .or_else(|| properties.get("prefix").cloned())
            .or_else(|| setting("defaults"));
        let mut base = reqwest::Url::parse(&format!("{}/v1", uri.trim_end_matches('/')))
            .map_err(|e| bad(e.to_string()))?;
        if let Some(prefix) = prefix.filter(|p| !p.is_empty()) {
            base = reqwest::Url::parse(&format!("{base}/{}", prefix.trim_matches('/')))
                .map_err(|e| bad(format!("prefix `{prefix}`: {e}")))?;
        }
        Ok(Committer::Rest(RestCommits {
            http,
            base,
            headers,
        }))
    }
}

impl RestCommits {
    /// Posts one commit of `ident`. A 409 is a conflict (nothing changed); any other failure
    /// leaves the outcome unknown, to be decided by reading the table.
    async fn commit(
        &self,
        ident: &TableIdent,
        requirements: Vec<TableRequirement>,
        updates: Vec<iceberg::TableUpdate>,
    ) -> Result<()> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| {
                LakehouseError::Catalog(format!("REST catalog {}: not a base", self.base))
            })?
            .extend([
                "namespaces",
                &ident.namespace().join("\u{1f}"),
                "tables",
                ident.name(),
            ]);
        let request = iceberg_catalog_rest::CommitTableRequest {
            identifier: Some(ident.clone()),
            requirements,
            updates,
        };
        let unknown = |why: String| {
            LakehouseError::Catalog(format!(
                "commit to {ident} through the REST catalog: {why} (its outcome is read from \
                 the table)"
            ))
        };
        let response = self
            .http
            .post(url)
            .headers(self.headers.clone())
            .json(&request)
            .send()
            .await
            .map_err(|e| unknown(e.to_string()))?;
        match response.status() {
            reqwest::StatusCode::OK => Ok(()),
            reqwest::StatusCode::CONFLICT => {
                // The catalog says which requirement failed.
                let body = response.text().await.unwrap_or_default();
                Err(LakehouseError::Conflict(format!(
                    "{ident} ({})",
                    body.trim()
                )))
            }
            status => {
                let body = response.text().await.unwrap_or_default();
                Err(unknown(format!("{status}: {}", body.trim())))
            }
        }
    }
}

/// The local directory of a `file:` location (or a plain path); none for object stores.
fn local_path(location: &str) -> Option<std::path::PathBuf> {
    if let Some(path) = location.strip_prefix("file://") {
        return Some(path.into());
    }
    (!location.contains("://")).then(|| location.into())
}

/// A file location as a local path's text, to compare with what a directory listing gives.
fn normalized(location: &str) -> String {
    local_path(location).map_or_else(|| location.to_owned(), |p| p.to_string_lossy().into_owned())
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Removes every file below `root` older than `grace` that is neither in `used` (full paths)
/// nor named in `named` (file names); how many it removed.
fn remove_unused(
    root: std::path::PathBuf,
    used: &BTreeSet<String>,
    named: &BTreeSet<String>,
    grace: std::time::Duration,
) -> usize {
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    let mut pending = vec![root];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(path);
                continue;
            }
            let text = path.to_string_lossy().into_owned();
            let old = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age >= grace);
            let is_named = path
                .file_name()
                .is_some_and(|n| named.contains(n.to_string_lossy().as_ref()));
            if old && !used.contains(&text) && !is_named && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// What a merged file's name holds before its first sequence number.
pub(crate) const MERGED_LABEL: &str = "merged-s";

/// The least data sequence number whose rows the file at `path` holds: its own (`sequence`),
/// or for a merged file the least of the files merged, as its name says.
pub(crate) fn first_sequence(path: &str, sequence: i64) -> i64 {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.split_once(MERGED_LABEL)
        .and_then(|(_, rest)| rest.split('-').next())
        .and_then(|digits| digits.parse().ok())
        .map_or(sequence, |first: i64| first.min(sequence))
}

/// The least of some first sequence numbers (0 for none).
pub(crate) fn first_sequence_of(firsts: impl Iterator<Item = i64>) -> i64 {
    firsts.min().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file is kept for a summary's mention only by its whole name: `b0-state.arrow` named
    /// keeps that file, not `xb0-state.arrow` (kept by a substring match before).
    #[test]
    fn orphans_are_kept_by_whole_names_only() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let root = dir.path().join("table");
        std::fs::create_dir_all(root.join("state")).expect("folders");
        for name in [
            "b0-state.arrow",
            "xb0-state.arrow",
            "data.parquet",
            "used.parquet",
        ] {
            std::fs::write(root.join("state").join(name), b"x").expect("a file");
        }
        let used = BTreeSet::from([root.join("state/used.parquet").display().to_string()]);
        let named = BTreeSet::from(["b0-state.arrow".to_owned()]);
        let removed = remove_unused(root.clone(), &used, &named, std::time::Duration::ZERO);
        assert_eq!(removed, 2);
        let mut left: Vec<String> = std::fs::read_dir(root.join("state"))
            .expect("the folder")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["b0-state.arrow", "used.parquet"]);
    }
}
