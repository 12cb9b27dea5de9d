//! Reading a partition: from an offset or a timestamp, in large sequential chunks, and following
//! the tail as new records become visible.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::watch;

use crate::batch::{self, BATCH_HEADER_BYTES, BatchHeader, RecordIter, RecordRef};
use crate::error::IoContext;
use crate::index::{self, IndexEntry};
use crate::limits::{READAHEAD_STEP_BYTES, READAHEAD_WINDOW_BYTES};
use crate::segment::{ReadWindow, load_index};
use crate::shared::PartitionShared;
use crate::storage::{OpenMode, StorageFile};
use crate::{LogError, Result};

/// Where a reader starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// The first record still kept.
    Beginning,
    /// After the last visible record: only records appended from now on.
    End,
    /// A specific offset, from the start offset up to the visible offset.
    Offset(u64),
    /// The first record whose timestamp is at or after this many ms since the epoch.
    Timestamp(i64),
}

/// A cursor over one partition. Reads return whole batches in chunks of about `max_bytes`, so
/// replaying history costs one read call per chunk, not per record.
#[derive(Debug)]
pub struct PartitionReader {
    shared: Arc<PartitionShared>,
    visible_rx: watch::Receiver<u64>,
    next_offset: u64,
    segment: Option<OpenSegment>,
    /// The previous chunk's buffer: reused when the caller has dropped that chunk, which saves
    /// an allocation and its page faults per read.
    spare: Option<Bytes>,
}

#[derive(Debug)]
struct OpenSegment {
    base_offset: u64,
    path: Arc<Path>,
    file: Arc<dyn StorageFile>,
    position: u64,
    /// The position came from an index; if the batch there is not the one the index promised,
    /// the index is bad and the segment is scanned from its start instead.
    positioned_by_index: bool,
    readahead: Option<Readahead>,
}

/// A thread that asks the OS to read a segment ahead of its reader, so disk reads overlap with
/// decoding instead of alternating with it. It stays at most [`READAHEAD_WINDOW_BYTES`] ahead
/// and stops when the segment's end is reached or the reader moves on.
#[derive(Debug)]
struct Readahead {
    /// Where the reader is; the helper stays within a window past it.
    reader_position: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Readahead {
    fn start(file: Arc<dyn StorageFile>, from: u64, end: u64) -> Readahead {
        let reader_position = Arc::new(AtomicU64::new(from));
        let stop = Arc::new(AtomicBool::new(false));
        let (at, halt) = (reader_position.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("kappa-log-readahead".into())
            .spawn(move || {
                let mut scratch = vec![0u8; READAHEAD_STEP_BYTES as usize];
                let mut ahead = from;
                while ahead < end && !halt.load(Ordering::Relaxed) {
                    if ahead >= at.load(Ordering::Relaxed) + READAHEAD_WINDOW_BYTES {
                        std::thread::park_timeout(std::time::Duration::from_millis(5));
                        continue;
                    }
                    let step = READAHEAD_STEP_BYTES.min(end - ahead);
                    // A plain read pulls the bytes into the OS cache through its usual readahead.
                    if file.read_at(&mut scratch[..step as usize], ahead).is_err() {
                        return;
                    }
                    ahead += step;
                }
            })
            .ok();
        Readahead {
            reader_position,
            stop,
            thread,
        }
    }

    fn advance(&self, position: u64) {
        self.reader_position.store(position, Ordering::Relaxed);
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }
}

impl Drop for Readahead {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl PartitionReader {
    pub(crate) fn new(shared: Arc<PartitionShared>, start: StartAt) -> Result<PartitionReader> {
        let next_offset = match start {
            StartAt::Beginning => shared.state().start_offset(),
            StartAt::End => shared.state().visible_offset,
            StartAt::Offset(offset) => {
                let state = shared.state();
                if offset < state.start_offset() || offset > state.visible_offset {
                    return Err(out_of_range(
                        &shared,
                        offset,
                        state.start_offset(),
                        state.visible_offset,
                    ));
                }
                offset
            }
            StartAt::Timestamp(ts) => offset_for_timestamp(&shared, ts)?,
        };
        let visible_rx = shared.visible_tx.subscribe();
        Ok(PartitionReader {
            shared,
            visible_rx,
            next_offset,
            segment: None,
            spare: None,
        })
    }

    pub fn topic(&self) -> &str {
        &self.shared.topic
    }

    pub fn partition(&self) -> u32 {
        self.shared.id
    }

    /// The offset of the next record this reader returns.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Reads the next chunk of whole batches, about `max_bytes` long (longer when one batch is).
    /// `None` when the reader has caught up with the visible end.
    pub fn read(&mut self, max_bytes: usize) -> Result<Option<RecordChunk>> {
        loop {
            let limit = {
                let state = self.shared.state();
                let start = state.start_offset();
                if self.next_offset < start {
                    return Err(out_of_range(
                        &self.shared,
                        self.next_offset,
                        start,
                        state.visible_offset,
                    ));
                }
                if self.next_offset >= state.visible_offset {
                    return Ok(None);
                }
                match &self.segment {
                    None => None,
                    Some(open) => match state
                        .segments
                        .iter()
                        .position(|s| s.base_offset == open.base_offset)
                    {
                        Some(i) if i + 1 == state.segments.len() => {
                            Some((state.visible_position, true))
                        }
                        Some(i) => Some((state.segments[i].size_bytes, false)),
                        // Retention deleted the segment this reader had finished; the next
                        // offset (still kept, checked above) is in a later one.
                        None => None,
                    },
                }
            };
            let Some((limit, active)) = limit else {
                self.segment = None;
                self.open_segment()?;
                continue;
            };
            let Some(open) = self.segment.as_mut() else {
                continue;
            };
            if open.position >= limit {
                if active {
                    return Ok(None);
                }
                // Everything of this sealed segment is read; the next offset is in a later one.
                self.segment = None;
                continue;
            }
            let buf = self
                .spare
                .take()
                .and_then(|b| b.try_into_mut().ok())
                .map(Vec::from)
                .unwrap_or_default();
            match read_chunk(open, limit, max_bytes, self.next_offset, buf)? {
                ChunkRead::Chunk(chunk) => {
                    self.next_offset = chunk.next_offset();
                    self.spare = Some(chunk.data.clone());
                    return Ok(Some(chunk));
                }
                ChunkRead::Skipped => continue,
                ChunkRead::BadIndex => {
                    tracing::warn!(
                        segment = %open.path.display(),
                        offset = self.next_offset,
                        "index entry does not match the segment; scanning the segment from its start"
                    );
                    open.position = 0;
                    open.positioned_by_index = false;
                }
            }
        }
    }

    fn open_segment(&mut self) -> Result<()> {
        let (base_offset, active_entry, active) = {
            let state = self.shared.state();
            let i = state
                .segments
                .partition_point(|s| s.base_offset <= self.next_offset);
            let Some(i) = i.checked_sub(1) else {
                return Err(out_of_range(
                    &self.shared,
                    self.next_offset,
                    state.start_offset(),
                    state.visible_offset,
                ));
            };
            let base = state.segments[i].base_offset;
            let active = i + 1 == state.segments.len();
            let entry = if active {
                index::lookup_offset(&state.active_index, self.next_offset - base)
            } else {
                None
            };
            (base, entry, active)
        };
        let entry = if active {
            active_entry
        } else {
            index::lookup_offset(
                &sealed_index(&self.shared, base_offset),
                self.next_offset - base_offset,
            )
        };
        let path: Arc<Path> = self.shared.segment_paths(base_offset).log.into();
        let file = match self.shared.storage.open(&path, OpenMode::Read) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let state = self.shared.state();
                return Err(out_of_range(
                    &self.shared,
                    self.next_offset,
                    state.start_offset(),
                    state.visible_offset,
                ));
            }
            Err(e) => return Err(e).io("open segment", &path),
        };
        file.advise_sequential();
        let position = entry.map_or(0, |e| u64::from(e.position));
        let end = {
            let state = self.shared.state();
            match state
                .segments
                .iter()
                .position(|s| s.base_offset == base_offset)
            {
                Some(i) if i + 1 == state.segments.len() => state.visible_position,
                Some(i) => state.segments[i].size_bytes,
                None => 0,
            }
        };
        // Far behind the tail (a replay), a helper keeps the disk busy ahead of the decoding.
        let readahead = (end.saturating_sub(position) > READAHEAD_WINDOW_BYTES)
            .then(|| Readahead::start(file.clone(), position, end));
        self.segment = Some(OpenSegment {
            base_offset,
            path,
            file,
            position,
            positioned_by_index: entry.is_some(),
            readahead,
        });
        Ok(())
    }

    /// Waits until records past [`next_offset`](Self::next_offset) are visible.
    /// Fails with [`LogError::Closed`] when the log closes.
    pub async fn wait(&mut self) -> Result<()> {
        loop {
            let visible = *self.visible_rx.borrow_and_update();
            if visible > self.next_offset {
                return Ok(());
            }
            if self.shared.state().closed {
                return Err(LogError::Closed);
            }
            self.visible_rx
                .changed()
                .await
                .map_err(|_| LogError::Closed)?;
        }
    }
}

fn out_of_range(
    shared: &PartitionShared,
    requested: u64,
    start_offset: u64,
    visible_offset: u64,
) -> LogError {
    LogError::OffsetOutOfRange {
        topic: shared.topic.clone(),
        partition: shared.id,
        requested,
        start_offset,
        visible_offset,
    }
}

/// The index entries of a sealed segment. A missing or damaged index is logged and treated as
/// empty, so the segment is scanned from its start: slower, never wrong.
fn sealed_index(shared: &PartitionShared, base_offset: u64) -> Vec<IndexEntry> {
    let paths = shared.segment_paths(base_offset);
    match load_index(shared.storage.as_ref(), &paths) {
        Ok(Ok(Some((_, entries)))) => entries,
        Ok(Ok(None)) => {
            tracing::warn!(segment = %paths.log.display(), "index missing; scanning segment");
            Vec::new()
        }
        Ok(Err(reason)) => {
            tracing::warn!(segment = %paths.log.display(), %reason, "index unusable; scanning segment");
            Vec::new()
        }
        Err(e) => {
            tracing::warn!(segment = %paths.log.display(), error = %e, "index unreadable; scanning segment");
            Vec::new()
        }
    }
}

enum ChunkRead {
    Chunk(RecordChunk),
    /// Only batches before the wanted offset were read; read on.
    Skipped,
    BadIndex,
}

fn read_chunk(
    open: &mut OpenSegment,
    limit: u64,
    max_bytes: usize,
    next_offset: u64,
    mut buf: Vec<u8>,
) -> Result<ChunkRead> {
    let start = open.position;
    let want = (max_bytes.max(BATCH_HEADER_BYTES) as u64).min(limit - start) as usize;
    buf.resize(want, 0);
    let n = open
        .file
        .read_full_at(&mut buf, start)
        .io("read segment", &open.path)?;
    if n < want {
        return Err(LogError::MalformedBatch {
            segment: open.path.to_path_buf(),
            position: start + n as u64,
            reason: format!("segment ends {} bytes early", want - n),
        });
    }
    let mut batches = Vec::new();
    let mut at = 0usize;
    let mut expected_base: Option<u64> = None;
    if want < BATCH_HEADER_BYTES {
        if open.positioned_by_index {
            return Ok(ChunkRead::BadIndex);
        }
        return Err(LogError::MalformedBatch {
            segment: open.path.to_path_buf(),
            position: start,
            reason: format!(
                "{want} bytes left before the end of the visible records: no room for a batch"
            ),
        });
    }
    // The first batch of a read that starts where an index pointed proves the index right or
    // wrong: whatever is wrong with it is the index's fault, and the segment is rescanned.
    let by_index = open.positioned_by_index;
    while at + BATCH_HEADER_BYTES <= buf.len() {
        let position = start + at as u64;
        let header = match batch::parse_header(&buf[at..]) {
            Ok(header) => header,
            Err(_) if by_index && at == 0 => return Ok(ChunkRead::BadIndex),
            Err(e) => return Err(e.at(&open.path, position)),
        };
        let len = header.length as usize;
        if at + len > buf.len() {
            if !batches.is_empty() || at > 0 {
                break;
            }
            // One batch larger than the chunk: read exactly that batch.
            if start + len as u64 > limit {
                if by_index {
                    return Ok(ChunkRead::BadIndex);
                }
                return Err(LogError::MalformedBatch {
                    segment: open.path.to_path_buf(),
                    position,
                    reason: "batch runs past the end of the visible records".into(),
                });
            }
            buf.resize(len, 0);
            open.file
                .read_exact_at(&mut buf, start)
                .io("read segment", &open.path)?;
            continue;
        }
        let header = match batch::decode_batch(&buf[at..at + len]) {
            Ok(header) => header,
            Err(_) if by_index && at == 0 => return Ok(ChunkRead::BadIndex),
            Err(e) => return Err(e.at(&open.path, position)),
        };
        match expected_base {
            None if header.base_offset > next_offset => {
                if by_index {
                    return Ok(ChunkRead::BadIndex);
                }
                return Err(gap(&open.path, position, next_offset, header.base_offset));
            }
            Some(expected) if header.base_offset != expected => {
                return Err(gap(&open.path, position, expected, header.base_offset));
            }
            _ => {}
        }
        expected_base = Some(header.next_offset());
        if header.next_offset() > next_offset {
            batches.push((at as u32, header));
        }
        at += len;
    }
    open.position = start + at as u64;
    open.positioned_by_index = false;
    if let Some(readahead) = &open.readahead {
        readahead.advance(open.position);
    }
    if batches.is_empty() {
        return Ok(ChunkRead::Skipped);
    }
    buf.truncate(at);
    Ok(ChunkRead::Chunk(RecordChunk {
        data: Bytes::from(buf),
        batches,
        skip_below: next_offset,
        segment: open.path.clone(),
        position: start,
    }))
}

fn gap(path: &Path, position: u64, expected: u64, found: u64) -> LogError {
    LogError::MalformedBatch {
        segment: path.to_path_buf(),
        position,
        reason: format!("expected a batch starting at offset {expected}, found {found}"),
    }
}

/// Whole batches read in one go, with their records decoded on iteration.
#[derive(Debug, Clone)]
pub struct RecordChunk {
    data: Bytes,
    /// Start of each batch in `data`, and its header.
    batches: Vec<(u32, BatchHeader)>,
    /// Records below this offset were asked to be skipped (the reader started mid-batch).
    skip_below: u64,
    segment: Arc<Path>,
    /// Where `data` starts in the segment.
    position: u64,
}

impl RecordChunk {
    /// The offset of the first record the chunk yields.
    pub fn first_offset(&self) -> u64 {
        self.batches
            .first()
            .map_or(self.skip_below, |(_, h)| h.base_offset.max(self.skip_below))
    }

    /// The offset after the chunk's last record.
    pub fn next_offset(&self) -> u64 {
        self.batches
            .last()
            .map_or(self.skip_below, |(_, h)| h.next_offset())
    }

    pub fn record_count(&self) -> u64 {
        self.next_offset() - self.first_offset()
    }

    /// Bytes of the batches in this chunk.
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// The records, in offset order. An error means a batch passed its CRC but is malformed.
    pub fn records(&self) -> ChunkRecords<'_> {
        ChunkRecords {
            chunk: self,
            next_batch: 0,
            current: None,
        }
    }
}

/// Iterator over the records of a [`RecordChunk`].
#[derive(Debug)]
pub struct ChunkRecords<'a> {
    chunk: &'a RecordChunk,
    next_batch: usize,
    /// The batch being read and where it starts in the chunk.
    current: Option<(RecordIter<'a>, usize)>,
}

impl<'a> Iterator for ChunkRecords<'a> {
    type Item = Result<RecordRef<'a>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((records, at)) = &mut self.current {
                match records.next() {
                    Some(Ok(record)) => return Some(Ok(record)),
                    Some(Err(e)) => {
                        let position = self.chunk.position + *at as u64;
                        return Some(Err(e.at(&self.chunk.segment, position)));
                    }
                    None => self.current = None,
                }
            }
            let (at, header) = self.chunk.batches.get(self.next_batch)?;
            self.next_batch += 1;
            let at = *at as usize;
            let bytes = &self.chunk.data[at..at + header.length as usize];
            self.current = Some((RecordIter::new(bytes, header, self.chunk.skip_below), at));
        }
    }
}

/// The first offset with a timestamp at or after `timestamp_ms`; the visible end if none.
pub(crate) fn offset_for_timestamp(shared: &PartitionShared, timestamp_ms: i64) -> Result<u64> {
    let (segment, limit, active_entry, active, visible) = {
        let state = shared.state();
        let Some(i) = state
            .segments
            .iter()
            .position(|s| s.max_timestamp_ms >= timestamp_ms)
        else {
            return Ok(state.visible_offset);
        };
        let segment = state.segments[i];
        let active = i + 1 == state.segments.len();
        let limit = if active {
            state.visible_position
        } else {
            segment.size_bytes
        };
        let entry = if active {
            index::lookup_timestamp(&state.active_index, timestamp_ms)
        } else {
            None
        };
        (segment, limit, entry, active, state.visible_offset)
    };
    let entry = if active {
        active_entry
    } else {
        index::lookup_timestamp(&sealed_index(shared, segment.base_offset), timestamp_ms)
    };
    let path: PathBuf = shared.segment_paths(segment.base_offset).log;
    let file = shared
        .storage
        .open(&path, OpenMode::Read)
        .io("open segment", &path)?;
    let from = entry.map_or(0, |e| u64::from(e.position));
    let found = match first_at_or_after(shared, file.as_ref(), &path, from, limit, timestamp_ms) {
        Err(e) if from > 0 => {
            tracing::warn!(segment = %path.display(), error = %e, "time index entry does not match the segment; scanning it");
            first_at_or_after(shared, file.as_ref(), &path, 0, limit, timestamp_ms)?
        }
        other => other?,
    };
    if let Some(offset) = found {
        return Ok(offset);
    }
    Ok(if active { visible } else { segment.next_offset })
}

/// Scans batches from `from` to `limit` for the first record at or after `timestamp_ms`.
fn first_at_or_after(
    shared: &PartitionShared,
    file: &dyn StorageFile,
    path: &Path,
    from: u64,
    limit: u64,
    timestamp_ms: i64,
) -> Result<Option<u64>> {
    let mut window = ReadWindow::new(shared.read_chunk_bytes);
    let mut position = from;
    while position < limit {
        let Some(head) = window
            .get(file, position, BATCH_HEADER_BYTES, limit)
            .io("read segment", path)?
        else {
            break;
        };
        let header = batch::parse_header(head).map_err(|e| e.at(path, position))?;
        let len = header.length as usize;
        let Some(bytes) = window
            .get(file, position, len, limit)
            .io("read segment", path)?
        else {
            break;
        };
        let header = batch::decode_batch(bytes).map_err(|e| e.at(path, position))?;
        if header.last_timestamp_ms >= timestamp_ms {
            for record in RecordIter::new(bytes, &header, 0) {
                let record = record.map_err(|e| e.at(path, position))?;
                if record.timestamp_ms >= timestamp_ms {
                    return Ok(Some(record.offset));
                }
            }
        }
        position += len as u64;
    }
    Ok(None)
}
