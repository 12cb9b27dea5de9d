//! Segment files: names, scanning and validation, index files on disk.

use std::io;
use std::path::{Path, PathBuf};

use crate::batch::{self, BATCH_HEADER_BYTES, BatchError};
use crate::error::IoContext;
use crate::index::{
    self, INDEX_HEADER_BYTES, IndexCoverage, IndexEntry, IndexKind, IndexRule, encode_index,
};
use crate::limits::READ_CHUNK_BYTES_DEFAULT;
use crate::storage::{OpenMode, Storage, StorageFile, read_file};
use crate::{LogError, Result};

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::Truncated { needed, available } => {
                write!(f, "incomplete batch ({available} of {needed} bytes)")
            }
            BatchError::Crc { expected, actual } => {
                write!(
                    f,
                    "CRC32C mismatch (stored {expected:#010x}, computed {actual:#010x})"
                )
            }
            BatchError::Malformed(reason) => f.write_str(reason),
        }
    }
}

/// The three files of one segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SegmentPaths {
    pub log: PathBuf,
    pub offset_index: PathBuf,
    pub time_index: PathBuf,
}

pub(crate) fn segment_paths(dir: &Path, base_offset: u64) -> SegmentPaths {
    SegmentPaths {
        log: dir.join(format!("{base_offset:020}.log")),
        offset_index: dir.join(format!("{base_offset:020}.index")),
        time_index: dir.join(format!("{base_offset:020}.timeindex")),
    }
}

/// What a file in a partition directory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PartitionFile {
    Segment(u64),
    Index(u64),
    Temporary,
    Checkpoint,
    Unknown,
}

pub(crate) fn classify(name: &str) -> PartitionFile {
    if name == crate::checkpoint::CHECKPOINT_FILE {
        return PartitionFile::Checkpoint;
    }
    if name.ends_with(".tmp") {
        return PartitionFile::Temporary;
    }
    let Some((stem, ext)) = name.split_once('.') else {
        return PartitionFile::Unknown;
    };
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return PartitionFile::Unknown;
    }
    let Ok(base) = stem.parse::<u64>() else {
        return PartitionFile::Unknown;
    };
    match ext {
        "log" => PartitionFile::Segment(base),
        "index" | "timeindex" => PartitionFile::Index(base),
        _ => PartitionFile::Unknown,
    }
}

/// A window over a file that reads ahead in large chunks, so a scan is not a syscall per batch.
#[derive(Debug)]
pub(crate) struct ReadWindow {
    buf: Vec<u8>,
    start: u64,
    chunk_bytes: usize,
}

impl ReadWindow {
    pub(crate) fn new(chunk_bytes: usize) -> Self {
        ReadWindow {
            buf: Vec::new(),
            start: 0,
            chunk_bytes,
        }
    }

    /// The bytes `[position, position + len)` of a file `file_len` long, or `None` when the file
    /// ends before them.
    pub(crate) fn get(
        &mut self,
        file: &dyn StorageFile,
        position: u64,
        len: usize,
        file_len: u64,
    ) -> io::Result<Option<&[u8]>> {
        if position + len as u64 > file_len {
            return Ok(None);
        }
        let end = self.start + self.buf.len() as u64;
        if position < self.start || position + len as u64 > end {
            let want = (len.max(self.chunk_bytes) as u64).min(file_len - position) as usize;
            self.buf.resize(want, 0);
            let n = file.read_full_at(&mut self.buf, position)?;
            self.buf.truncate(n);
            self.start = position;
            if n < len {
                return Ok(None);
            }
        }
        let from = (position - self.start) as usize;
        Ok(Some(&self.buf[from..from + len]))
    }
}

/// The result of scanning a segment's batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ScanOutcome {
    /// Where the last valid batch ends.
    pub end_position: u64,
    pub next_offset: u64,
    pub max_timestamp_ms: i64,
    /// Where the scan stopped at a batch that is not valid, past the durable point, and why.
    pub torn: Option<(u64, String)>,
}

/// What a scan starts from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScanStart {
    pub position: u64,
    pub next_offset: u64,
    pub max_timestamp_ms: i64,
    /// Bytes before this are durable: an invalid batch there is corruption, not a torn tail.
    pub durable_position: u64,
}

/// Validates every batch from `start` to the end of the segment (CRC, header, records, offset
/// continuity) and appends the index entries the rule asks for to `entries`.
pub(crate) fn scan_segment(
    file: &dyn StorageFile,
    path: &Path,
    start: ScanStart,
    rule: IndexRule,
    entries: &mut Vec<IndexEntry>,
    base_offset: u64,
) -> Result<ScanOutcome> {
    let file_len = file.len().io("stat segment", path)?;
    if file_len < start.durable_position {
        return Err(LogError::DurableDataMissing {
            segment: path.to_path_buf(),
            durable_position: start.durable_position,
            file_bytes: file_len,
        });
    }
    let mut window = ReadWindow::new(READ_CHUNK_BYTES_DEFAULT);
    let mut position = start.position;
    let mut next_offset = start.next_offset;
    let mut max_timestamp_ms = start.max_timestamp_ms;
    let mut torn = None;
    while position < file_len {
        let checked = check_batch_at(&mut window, file, path, position, file_len, next_offset)?;
        let header = match checked {
            Ok(header) => header,
            Err(e) if position < start.durable_position => return Err(e.at(path, position)),
            Err(e) => {
                torn = Some((position, e.to_string()));
                break;
            }
        };
        let end = position + u64::from(header.length);
        if position < start.durable_position && end > start.durable_position {
            return Err(LogError::MalformedBatch {
                segment: path.to_path_buf(),
                position,
                reason: format!(
                    "the durable point {} falls inside this batch, which ends at {end}",
                    start.durable_position
                ),
            });
        }
        if rule.wants_entry(position, entries.last().map(|e| e.position)) {
            entries.push(IndexEntry {
                relative_offset: u32::try_from(header.base_offset - base_offset)
                    .map_err(|_| too_many_records(path, position))?,
                position: u32::try_from(position).map_err(|_| too_many_records(path, position))?,
                timestamp_ms: header.last_timestamp_ms,
            });
        }
        max_timestamp_ms = max_timestamp_ms.max(header.last_timestamp_ms);
        next_offset = header.next_offset();
        position = end;
    }
    Ok(ScanOutcome {
        end_position: position,
        next_offset,
        max_timestamp_ms,
        torn,
    })
}

fn too_many_records(path: &Path, position: u64) -> LogError {
    LogError::MalformedBatch {
        segment: path.to_path_buf(),
        position,
        reason: "segment is larger than its index can address (4 GiB or 2^32 records)".into(),
    }
}

/// Reads and fully validates the batch at `position`. The outer `Result` is an I/O failure;
/// the inner one says whether the bytes are a valid batch with base offset `expected_offset`.
fn check_batch_at(
    window: &mut ReadWindow,
    file: &dyn StorageFile,
    path: &Path,
    position: u64,
    file_len: u64,
    expected_offset: u64,
) -> Result<std::result::Result<batch::BatchHeader, BatchError>> {
    let available = (file_len - position) as usize;
    let Some(head) = window
        .get(file, position, BATCH_HEADER_BYTES.min(available), file_len)
        .io("read segment", path)?
    else {
        return Ok(Err(BatchError::Truncated {
            needed: BATCH_HEADER_BYTES,
            available,
        }));
    };
    let header = match batch::parse_header(head) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    let len = header.length as usize;
    let Some(bytes) = window
        .get(file, position, len, file_len)
        .io("read segment", path)?
    else {
        return Ok(Err(BatchError::Truncated {
            needed: len,
            available,
        }));
    };
    let header = match batch::decode_batch(bytes).and_then(|h| {
        batch::validate_records(bytes, &h)?;
        Ok(h)
    }) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    if header.base_offset != expected_offset {
        return Ok(Err(BatchError::Malformed(format!(
            "expected base offset {expected_offset}, found {}",
            header.base_offset
        ))));
    }
    Ok(Ok(header))
}

/// An index read from disk: what it covers and its entries.
pub(crate) type LoadedIndex = (IndexCoverage, Vec<IndexEntry>);

/// Reads a segment's two index files. `Ok(None)` when either is missing; `Err(reason)` when
/// they exist but cannot be used.
pub(crate) fn load_index(
    storage: &dyn Storage,
    paths: &SegmentPaths,
) -> Result<std::result::Result<Option<LoadedIndex>, String>> {
    let read = |p: &Path| match read_file(storage, p) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).io("read index", p),
    };
    let (Some(offsets), Some(times)) = (read(&paths.offset_index)?, read(&paths.time_index)?)
    else {
        return Ok(Ok(None));
    };
    Ok(index::decode_index_files(&offsets, &times).map(Some))
}

/// Reads only the header of a segment's offset index: cheap enough to do for every sealed
/// segment at open. The entries are checked when a read first uses them.
pub(crate) fn load_index_header(
    storage: &dyn Storage,
    paths: &SegmentPaths,
) -> Result<std::result::Result<IndexCoverage, String>> {
    let mut coverage = None;
    for (kind, path) in [
        (IndexKind::Offset, &paths.offset_index),
        (IndexKind::Time, &paths.time_index),
    ] {
        let file = match storage.open(path, OpenMode::Read) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Err("missing".into())),
            Err(e) => return Err(e).io("open index", path),
        };
        let len = file.len().io("stat index", path)?;
        let mut head = [0u8; INDEX_HEADER_BYTES];
        let n = file.read_full_at(&mut head, 0).io("read index", path)?;
        match index::decode_index_header(kind, &head[..n], len) {
            Ok(h) if coverage.is_none_or(|c| c == h.coverage) => coverage = Some(h.coverage),
            Ok(_) => return Ok(Err("offset and time index disagree".into())),
            Err(reason) => return Ok(Err(reason)),
        }
    }
    Ok(coverage.ok_or_else(|| "missing".to_owned()))
}

/// Writes both index files of a segment durably (temporary file, fsync, rename).
pub(crate) fn write_index(
    storage: &dyn Storage,
    paths: &SegmentPaths,
    entries: &[IndexEntry],
    coverage: IndexCoverage,
) -> Result<()> {
    for (kind, path) in [
        (IndexKind::Offset, &paths.offset_index),
        (IndexKind::Time, &paths.time_index),
    ] {
        let bytes = encode_index(kind, entries, coverage);
        let tmp = path.with_extension(match kind {
            IndexKind::Offset => "index.tmp",
            IndexKind::Time => "timeindex.tmp",
        });
        let file = storage
            .open(&tmp, OpenMode::CreateTruncate)
            .io("create index", &tmp)?;
        file.write_all_at(&bytes, 0).io("write index", &tmp)?;
        file.sync_data().io("sync index", &tmp)?;
        storage.rename(&tmp, path).io("rename index", path)?;
    }
    Ok(())
}

/// Rebuilds a segment's two index files from its batches alone, as recovery would; every batch
/// must be valid. Returns the bytes of the offset index and of the time index.
pub fn rebuild_index_files(
    storage: &dyn Storage,
    segment: &Path,
    base_offset: u64,
    index_interval_bytes: u32,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let file = storage
        .open(segment, OpenMode::Read)
        .io("open segment", segment)?;
    let file_len = file.len().io("stat segment", segment)?;
    let start = ScanStart {
        position: 0,
        next_offset: base_offset,
        max_timestamp_ms: i64::MIN,
        durable_position: file_len,
    };
    let mut entries = Vec::new();
    let rule = IndexRule {
        interval_bytes: index_interval_bytes,
    };
    let outcome = scan_segment(
        file.as_ref(),
        segment,
        start,
        rule,
        &mut entries,
        base_offset,
    )?;
    let coverage = IndexCoverage {
        covered_bytes: outcome.end_position,
        next_offset: outcome.next_offset,
        max_timestamp_ms: outcome.max_timestamp_ms,
    };
    Ok((
        encode_index(IndexKind::Offset, &entries, coverage),
        encode_index(IndexKind::Time, &entries, coverage),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_classify() {
        assert_eq!(
            classify("00000000000000000042.log"),
            PartitionFile::Segment(42)
        );
        assert_eq!(
            classify("00000000000000000042.timeindex"),
            PartitionFile::Index(42)
        );
        assert_eq!(
            classify("00000000000000000042.index.tmp"),
            PartitionFile::Temporary
        );
        assert_eq!(classify("recovery-checkpoint"), PartitionFile::Checkpoint);
        assert_eq!(classify("42.log"), PartitionFile::Unknown);
        assert_eq!(
            segment_paths(Path::new("p"), 7).log,
            Path::new("p/00000000000000000007.log")
        );
    }
}
