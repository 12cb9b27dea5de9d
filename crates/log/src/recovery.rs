//! Opening a partition after a clean close or a crash.
//!
//! Everything before the recovery checkpoint is durable and is trusted to be there: a missing
//! byte or a failed check in it is a typed error, never a truncation. Everything after it is
//! validated batch by batch; the first invalid batch there is a torn tail, which is truncated and
//! reported with its file and byte position.

use std::path::{Path, PathBuf};

use crate::checkpoint::{self, DurablePoint};
use crate::error::IoContext;
use crate::index::{IndexCoverage, IndexEntry, IndexRule};
use crate::segment::{
    self, PartitionFile, ScanStart, SegmentPaths, load_index, load_index_header, scan_segment,
    segment_paths, write_index,
};
use crate::storage::{OpenMode, Storage};
use crate::{LogError, Result};

/// Something recovery changed on disk, kept so callers and tests can see it (it is also logged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecoveryEvent {
    /// Bytes past the durable point that did not form a valid batch were cut off.
    TruncatedTornTail {
        segment: PathBuf,
        position: u64,
        bytes_removed: u64,
        reason: String,
    },
    /// A segment created after the durable point held nothing that could be kept.
    RemovedSegment { segment: PathBuf, reason: String },
    /// An index was missing or unusable and was rebuilt from its segment.
    RebuiltIndex { segment: PathBuf, reason: String },
    /// A leftover file (an interrupted write or an index without its segment) was removed.
    RemovedLeftover { path: PathBuf },
    /// There was no recovery checkpoint, so the last segment was validated from its start.
    NoCheckpoint { partition: PathBuf },
}

/// What the partition knows about one of its segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegmentInfo {
    pub base_offset: u64,
    pub next_offset: u64,
    pub size_bytes: u64,
    /// `i64::MIN` while the segment is empty.
    pub max_timestamp_ms: i64,
}

/// A partition as found on disk, ready for its writer.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// Non-empty, contiguous in offsets; the last one is the active segment.
    pub segments: Vec<SegmentInfo>,
    pub active_index: Vec<IndexEntry>,
    pub active_first_timestamp_ms: Option<i64>,
    pub checkpoint_sequence: u64,
}

/// Creates the files of a new, empty partition.
pub(crate) fn create_partition(storage: &dyn Storage, dir: &Path) -> Result<()> {
    storage
        .create_dir_all(dir)
        .io("create partition directory", dir)?;
    let paths = segment_paths(dir, 0);
    storage
        .open(&paths.log, OpenMode::CreateNew)
        .io("create segment", &paths.log)?;
    let mut ckpt = checkpoint::CheckpointWriter::open(storage, dir, 0)?;
    ckpt.write(
        DurablePoint {
            segment_base_offset: 0,
            position: 0,
            next_offset: 0,
        },
        true,
    )?;
    storage.sync_dir(dir).io("sync partition directory", dir)?;
    Ok(())
}

pub(crate) fn recover(
    storage: &dyn Storage,
    dir: &Path,
    rule: IndexRule,
    events: &mut Vec<RecoveryEvent>,
) -> Result<Recovered> {
    let mut bases = Vec::new();
    let mut index_bases = Vec::new();
    for name in storage.list_dir(dir).io("list partition directory", dir)? {
        match segment::classify(&name) {
            PartitionFile::Segment(base) => bases.push(base),
            PartitionFile::Index(base) => index_bases.push((base, name)),
            PartitionFile::Temporary => remove_leftover(storage, &dir.join(name), events)?,
            PartitionFile::Checkpoint => {}
            PartitionFile::Unknown => {
                tracing::warn!(path = %dir.join(&name).display(), "unknown file in partition directory; left alone");
            }
        }
    }
    bases.sort_unstable();
    for (base, name) in index_bases {
        if bases.binary_search(&base).is_err() {
            remove_leftover(storage, &dir.join(name), events)?;
        }
    }

    let found = checkpoint::read(storage, dir)?;
    let checkpoint_sequence = found.map_or(0, |(sequence, _)| sequence);
    let durable = match found {
        Some((_, point)) => point,
        None => {
            // Without a checkpoint, sealed segments are still durable: a roll fsyncs a segment
            // before the next one is created. Only the last segment is validated as a tail.
            let first = bases.last().copied().unwrap_or(0);
            if !bases.is_empty() {
                tracing::warn!(partition = %dir.display(), "no recovery checkpoint; validating the last segment");
                events.push(RecoveryEvent::NoCheckpoint {
                    partition: dir.to_path_buf(),
                });
            }
            DurablePoint {
                segment_base_offset: first,
                position: 0,
                next_offset: first,
            }
        }
    };
    if bases.binary_search(&durable.segment_base_offset).is_err() {
        let paths = segment_paths(dir, durable.segment_base_offset);
        let empty_partition = durable.position == 0
            && bases
                .last()
                .is_none_or(|b| *b < durable.segment_base_offset);
        if !empty_partition {
            return Err(LogError::DurableDataMissing {
                segment: paths.log,
                durable_position: durable.position,
                file_bytes: 0,
            });
        }
        // A roll or a creation was interrupted before the new segment's file was durable.
        storage
            .open(&paths.log, OpenMode::CreateNew)
            .io("create segment", &paths.log)?;
        storage.sync_dir(dir).io("sync partition directory", dir)?;
        bases.push(durable.segment_base_offset);
    }

    let mut segments: Vec<SegmentInfo> = Vec::with_capacity(bases.len());
    // Index entries of the newest segment at or past the durable point, kept in memory while it
    // may still be the active segment.
    let mut tail_entries: Option<Vec<IndexEntry>> = None;
    let mut truncated = false;
    for &base in &bases {
        let paths = segment_paths(dir, base);
        let expected_base = segments.last().map_or(base, |s| s.next_offset);
        if base < durable.segment_base_offset {
            let info = open_sealed(storage, &paths, base, rule, events)?;
            if base != expected_base {
                return Err(offset_gap(&paths, expected_base, base));
            }
            segments.push(info);
            continue;
        }
        if base == durable.segment_base_offset && base != expected_base {
            return Err(offset_gap(&paths, expected_base, base));
        }
        if truncated || base != expected_base {
            // Past the durable point and not continuing the log: nothing here was acknowledged.
            remove_segment(
                storage,
                &paths,
                events,
                "it follows a torn tail or an offset gap",
            )?;
            continue;
        }
        let durable_position = if base == durable.segment_base_offset {
            durable.position
        } else {
            0
        };
        let (info, entries, torn) =
            open_tail(storage, &paths, base, durable_position, rule, events)?;
        if let (Some(prev_entries), Some(prev)) = (tail_entries.take(), segments.last()) {
            // The previous segment is sealed now that a later one continues it.
            seal_index(storage, dir, *prev, &prev_entries)?;
        }
        tail_entries = Some(entries);
        truncated = torn;
        segments.push(info);
    }
    let active_index = tail_entries.unwrap_or_default();
    let active = segments
        .last()
        .copied()
        .ok_or_else(|| LogError::MalformedBatch {
            segment: dir.to_path_buf(),
            position: 0,
            reason: "partition has no segments".into(),
        })?;
    let active_first_timestamp_ms =
        first_timestamp(storage, &segment_paths(dir, active.base_offset), active)?;
    Ok(Recovered {
        segments,
        active_index,
        active_first_timestamp_ms,
        checkpoint_sequence,
    })
}

fn offset_gap(paths: &SegmentPaths, expected: u64, found: u64) -> LogError {
    LogError::MalformedBatch {
        segment: paths.log.clone(),
        position: 0,
        reason: format!("segment starts at offset {found} but the previous one ends at {expected}"),
    }
}

fn remove_leftover(
    storage: &dyn Storage,
    path: &Path,
    events: &mut Vec<RecoveryEvent>,
) -> Result<()> {
    storage.remove_file(path).io("remove leftover file", path)?;
    tracing::info!(path = %path.display(), "removed leftover file");
    events.push(RecoveryEvent::RemovedLeftover {
        path: path.to_path_buf(),
    });
    Ok(())
}

fn remove_segment(
    storage: &dyn Storage,
    paths: &SegmentPaths,
    events: &mut Vec<RecoveryEvent>,
    reason: &str,
) -> Result<()> {
    for path in [&paths.log, &paths.offset_index, &paths.time_index] {
        match storage.remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).io("remove segment", path),
        }
    }
    tracing::warn!(segment = %paths.log.display(), reason, "removed segment past the durable point");
    events.push(RecoveryEvent::RemovedSegment {
        segment: paths.log.clone(),
        reason: reason.into(),
    });
    Ok(())
}

/// A sealed, durable segment: its metadata comes from its index header; the index is rebuilt
/// when missing or unusable.
fn open_sealed(
    storage: &dyn Storage,
    paths: &SegmentPaths,
    base: u64,
    rule: IndexRule,
    events: &mut Vec<RecoveryEvent>,
) -> Result<SegmentInfo> {
    let file = storage
        .open(&paths.log, OpenMode::Read)
        .io("open segment", &paths.log)?;
    let file_len = file.len().io("stat segment", &paths.log)?;
    let problem = match load_index_header(storage, paths)? {
        Ok(c) if c.covered_bytes == file_len && c.next_offset >= base => {
            return Ok(SegmentInfo {
                base_offset: base,
                next_offset: c.next_offset,
                size_bytes: file_len,
                max_timestamp_ms: c.max_timestamp_ms,
            });
        }
        Ok(c) => format!("index covers {} of {file_len} bytes", c.covered_bytes),
        Err(reason) => reason,
    };
    let mut entries = Vec::new();
    let start = ScanStart {
        position: 0,
        next_offset: base,
        max_timestamp_ms: i64::MIN,
        durable_position: file_len,
    };
    let outcome = scan_segment(file.as_ref(), &paths.log, start, rule, &mut entries, base)?;
    let coverage = IndexCoverage {
        covered_bytes: outcome.end_position,
        next_offset: outcome.next_offset,
        max_timestamp_ms: outcome.max_timestamp_ms,
    };
    write_index(storage, paths, &entries, coverage)?;
    tracing::warn!(segment = %paths.log.display(), reason = %problem, "rebuilt index");
    events.push(RecoveryEvent::RebuiltIndex {
        segment: paths.log.clone(),
        reason: problem,
    });
    Ok(SegmentInfo {
        base_offset: base,
        next_offset: outcome.next_offset,
        size_bytes: file_len,
        max_timestamp_ms: outcome.max_timestamp_ms,
    })
}

/// The segment holding the durable point, or one after it: validates from what its index
/// already covers (or from the start) to the end, truncating a torn tail.
fn open_tail(
    storage: &dyn Storage,
    paths: &SegmentPaths,
    base: u64,
    durable_position: u64,
    rule: IndexRule,
    events: &mut Vec<RecoveryEvent>,
) -> Result<(SegmentInfo, Vec<IndexEntry>, bool)> {
    let file = storage
        .open(&paths.log, OpenMode::ReadWrite)
        .io("open segment", &paths.log)?;
    let file_len = file.len().io("stat segment", &paths.log)?;
    let mut start = ScanStart {
        position: 0,
        next_offset: base,
        max_timestamp_ms: i64::MIN,
        durable_position,
    };
    let mut entries = Vec::new();
    let mut from_index = false;
    match load_index(storage, paths)? {
        Ok(Some((c, loaded)))
            if c.covered_bytes <= durable_position
                && c.covered_bytes <= file_len
                && c.next_offset >= base =>
        {
            start.position = c.covered_bytes;
            start.next_offset = c.next_offset;
            start.max_timestamp_ms = c.max_timestamp_ms;
            entries = loaded;
            from_index = true;
        }
        Ok(None) => {}
        Ok(Some((c, _))) => {
            let reason = format!(
                "index covers {} bytes ending at offset {}, which does not fit the segment (durable point {durable_position})",
                c.covered_bytes, c.next_offset
            );
            events.push(RecoveryEvent::RebuiltIndex {
                segment: paths.log.clone(),
                reason,
            });
        }
        Err(reason) => {
            tracing::warn!(segment = %paths.log.display(), %reason, "rebuilding unusable index");
            events.push(RecoveryEvent::RebuiltIndex {
                segment: paths.log.clone(),
                reason,
            });
        }
    }
    let outcome = match scan_segment(file.as_ref(), &paths.log, start, rule, &mut entries, base) {
        Ok(outcome) => outcome,
        Err(e) if from_index => {
            // The index passed its checks but does not describe this segment (it was left by
            // another life of the file): rebuild from the start, which also judges the bytes
            // the index claimed to cover.
            let reason = format!("scanning from the index failed: {e}");
            tracing::warn!(segment = %paths.log.display(), %reason, "rebuilding index");
            events.push(RecoveryEvent::RebuiltIndex {
                segment: paths.log.clone(),
                reason,
            });
            entries.clear();
            let start = ScanStart {
                position: 0,
                next_offset: base,
                max_timestamp_ms: i64::MIN,
                durable_position,
            };
            scan_segment(file.as_ref(), &paths.log, start, rule, &mut entries, base)?
        }
        Err(e) => return Err(e),
    };
    let torn = outcome.torn.is_some();
    if outcome.end_position > durable_position {
        // Valid bytes past the durable point outlived a crash of the process, but only in the OS
        // cache: they become durable before anything treats them as such (visible, or named by
        // the checkpoint written next).
        file.sync_data().io("sync recovered tail", &paths.log)?;
    }
    if let Some((position, reason)) = outcome.torn {
        file.set_len(position)
            .io("truncate torn tail", &paths.log)?;
        file.sync_data().io("sync truncated segment", &paths.log)?;
        let bytes_removed = file_len - position;
        tracing::warn!(
            segment = %paths.log.display(),
            position,
            bytes_removed,
            %reason,
            "truncated torn tail past the durable point"
        );
        events.push(RecoveryEvent::TruncatedTornTail {
            segment: paths.log.clone(),
            position,
            bytes_removed,
            reason,
        });
    }
    let info = SegmentInfo {
        base_offset: base,
        next_offset: outcome.next_offset,
        size_bytes: outcome.end_position,
        max_timestamp_ms: outcome.max_timestamp_ms,
    };
    Ok((info, entries, torn))
}

fn seal_index(
    storage: &dyn Storage,
    dir: &Path,
    info: SegmentInfo,
    entries: &[IndexEntry],
) -> Result<()> {
    let coverage = IndexCoverage {
        covered_bytes: info.size_bytes,
        next_offset: info.next_offset,
        max_timestamp_ms: info.max_timestamp_ms,
    };
    write_index(
        storage,
        &segment_paths(dir, info.base_offset),
        entries,
        coverage,
    )
}

fn first_timestamp(
    storage: &dyn Storage,
    paths: &SegmentPaths,
    info: SegmentInfo,
) -> Result<Option<i64>> {
    if info.size_bytes == 0 {
        return Ok(None);
    }
    let file = storage
        .open(&paths.log, OpenMode::Read)
        .io("open segment", &paths.log)?;
    let mut head = [0u8; crate::batch::BATCH_HEADER_BYTES];
    file.read_exact_at(&mut head, 0)
        .io("read segment", &paths.log)?;
    let header = crate::batch::parse_header(&head).map_err(|e| e.at(&paths.log, 0))?;
    Ok(Some(header.first_timestamp_ms))
}
