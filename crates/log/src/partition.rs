//! One partition: its shared state, its writer thread (group commit), retention.
//!
//! ```text
//!  producers ──append──► queue ──► writer thread: seal batches ─► one write ─► one fsync
//!                                        │                                      │
//!                                        └── acks ◄── publish offsets ◄─────────┘
//!  readers ◄── visible_offset (watch) ───┘
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::batch::{PendingBatch, Record, encode_batches};
use crate::checkpoint::{CheckpointWriter, DurablePoint};
use crate::clock::Clock;
use crate::config::{FsyncPolicy, TopicConfig};
use crate::error::IoContext;
use crate::index::{IndexCoverage, IndexEntry, IndexRule};
use crate::limits::{
    APPEND_QUEUE_LEN, CHECKPOINT_SYNC_INTERVAL_MS, GROUP_COMMIT_BYTES_MAX, WRITER_TICK_MS,
};
use crate::reader::{PartitionReader, StartAt};
use crate::recovery::{Recovered, RecoveryEvent, SegmentInfo, recover};
use crate::segment::{SegmentPaths, segment_paths, write_index};
use crate::storage::{OpenMode, Storage, StorageFile};
use crate::{LogError, Result};

/// Where an append landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendAck {
    /// Offset of the first record; the others follow densely.
    pub base_offset: u64,
    pub record_count: u64,
    /// The append time given to every record of the append.
    pub timestamp_ms: i64,
}

/// A partition's positions; see the glossary in ARCHITECTURE.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionOffsets {
    /// The first offset still kept (retention moves it forward).
    pub start_offset: u64,
    /// The end of the records written to the segment files.
    pub appended_offset: u64,
    /// The end of the records known to be fsynced.
    pub durable_offset: u64,
    /// The end of what readers see: acknowledged records.
    pub visible_offset: u64,
}

/// A partition's size on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionStats {
    pub offsets: PartitionOffsets,
    pub segment_count: usize,
    pub size_bytes: u64,
}

/// State shared by the writer thread and every reader.
#[derive(Debug)]
pub(crate) struct PartitionState {
    /// Contiguous in offsets, never empty; the last one is the active segment.
    pub segments: Vec<SegmentInfo>,
    /// Index of the active segment (sealed segments keep theirs on disk).
    pub active_index: Vec<IndexEntry>,
    pub appended_offset: u64,
    pub durable_offset: u64,
    pub visible_offset: u64,
    /// Where the visible records end in the active segment.
    pub visible_position: u64,
    pub failure: Option<String>,
    pub closed: bool,
}

impl PartitionState {
    pub(crate) fn start_offset(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.base_offset)
    }
}

#[derive(Debug)]
pub(crate) struct PartitionShared {
    pub topic: String,
    pub id: u32,
    pub dir: PathBuf,
    pub storage: Arc<dyn Storage>,
    pub config: TopicConfig,
    pub state: RwLock<PartitionState>,
    /// Carries `visible_offset`, so followers wake on new records.
    pub visible_tx: watch::Sender<u64>,
    pub rule: IndexRule,
    pub read_chunk_bytes: usize,
}

impl PartitionShared {
    pub(crate) fn state(&self) -> RwLockReadGuard<'_, PartitionState> {
        // A panic while holding this lock is a bug in this crate; the state it guards is only
        // ever replaced whole, so reading it after such a panic is still sound.
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, PartitionState> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn segment_paths(&self, base_offset: u64) -> SegmentPaths {
        segment_paths(&self.dir, base_offset)
    }
}

enum Command {
    Append {
        batches: Vec<PendingBatch>,
        reply: flume::Sender<Result<AppendAck>>,
    },
    Sync {
        reply: flume::Sender<Result<()>>,
    },
    Retention {
        reply: flume::Sender<Result<()>>,
    },
    Close {
        reply: flume::Sender<Result<()>>,
    },
}

/// The pending acknowledgement of a submitted append.
#[derive(Debug)]
pub(crate) struct AckReceiver(flume::Receiver<Result<AppendAck>>);

/// Options a partition inherits from its log.
#[derive(Debug, Clone)]
pub(crate) struct PartitionOptions {
    pub storage: Arc<dyn Storage>,
    pub clock: Arc<dyn Clock>,
    pub retention_check_interval_ms: u64,
    pub read_chunk_bytes: usize,
}

/// One partition of a topic: an ordered, append-only sequence of records.
#[derive(Debug)]
pub struct Partition {
    shared: Arc<PartitionShared>,
    tx: flume::Sender<Command>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Partition {
    /// Creates the files of a new, empty partition.
    pub(crate) fn create(storage: &dyn Storage, dir: &Path) -> Result<()> {
        crate::recovery::create_partition(storage, dir)
    }

    /// Recovers the partition in `dir` and starts its writer thread.
    pub(crate) fn open(
        topic: &str,
        id: u32,
        dir: PathBuf,
        config: TopicConfig,
        options: &PartitionOptions,
        events: &mut Vec<RecoveryEvent>,
    ) -> Result<Partition> {
        let rule = IndexRule {
            interval_bytes: config.index_interval_bytes,
        };
        let recovered = recover(options.storage.as_ref(), &dir, rule, events)?;
        let active = *recovered.segments.last().ok_or(LogError::Closed)?;
        let end = active.next_offset;
        let state = PartitionState {
            segments: recovered.segments.clone(),
            active_index: recovered.active_index.clone(),
            appended_offset: end,
            durable_offset: end,
            visible_offset: end,
            visible_position: active.size_bytes,
            failure: None,
            closed: false,
        };
        let (visible_tx, _) = watch::channel(end);
        let shared = Arc::new(PartitionShared {
            topic: topic.to_owned(),
            id,
            dir,
            storage: options.storage.clone(),
            config,
            state: RwLock::new(state),
            visible_tx,
            rule,
            read_chunk_bytes: options.read_chunk_bytes,
        });
        let (tx, rx) = flume::bounded(APPEND_QUEUE_LEN);
        let writer = Writer::new(shared.clone(), rx, options, recovered, active)?;
        let handle = std::thread::Builder::new()
            .name(format!("kappa-log-{topic}-{id}"))
            .spawn(move || writer.run())
            .io("spawn writer thread", &shared.dir)?;
        Ok(Partition {
            shared,
            tx,
            writer: Mutex::new(Some(handle)),
        })
    }

    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// Appends records as one all-or-nothing unit and returns once they are acknowledged:
    /// durable under `fsync = "always"`, written to the OS under an interval policy.
    pub async fn append(&self, records: &[Record]) -> Result<AppendAck> {
        let reply = self.submit(encode_batches(records)?).await?;
        self.acknowledged(reply).await
    }

    /// [`Partition::append`] for callers outside an async runtime.
    pub fn append_blocking(&self, records: &[Record]) -> Result<AppendAck> {
        let batches = encode_batches(records)?;
        if batches.is_empty() {
            return Ok(self.empty_ack());
        }
        let (reply, rx) = flume::bounded(1);
        self.send_blocking(Command::Append { batches, reply })?;
        rx.recv().map_err(|_| self.stopped())?
    }

    /// Queues encoded batches for the writer; the returned receiver yields the acknowledgement.
    pub(crate) async fn submit(&self, batches: Vec<PendingBatch>) -> Result<AckReceiver> {
        let (reply, rx) = flume::bounded(1);
        if batches.is_empty() {
            let _ = reply.send(Ok(self.empty_ack()));
        } else {
            self.tx
                .send_async(Command::Append { batches, reply })
                .await
                .map_err(|_| self.stopped())?;
        }
        Ok(AckReceiver(rx))
    }

    /// Waits for the acknowledgement of a [`Partition::submit`].
    pub(crate) async fn acknowledged(&self, reply: AckReceiver) -> Result<AppendAck> {
        reply.0.recv_async().await.map_err(|_| self.stopped())?
    }

    fn empty_ack(&self) -> AppendAck {
        let state = self.shared.state();
        AppendAck {
            base_offset: state.appended_offset,
            record_count: 0,
            timestamp_ms: 0,
        }
    }

    fn send_blocking(&self, command: Command) -> Result<()> {
        self.tx.send(command).map_err(|_| self.stopped())
    }

    fn stopped(&self) -> LogError {
        let state = self.shared.state();
        match &state.failure {
            Some(reason) => LogError::WriterFailed {
                topic: self.shared.topic.clone(),
                partition: self.shared.id,
                reason: reason.clone(),
            },
            None => LogError::Closed,
        }
    }

    fn call(&self, make: impl FnOnce(flume::Sender<Result<()>>) -> Command) -> Result<()> {
        let (reply, rx) = flume::bounded(1);
        self.send_blocking(make(reply))?;
        rx.recv().map_err(|_| self.stopped())?
    }

    /// Fsyncs everything appended so far (a no-op under `fsync = "always"`).
    pub fn sync(&self) -> Result<()> {
        self.call(|reply| Command::Sync { reply })
    }

    /// Applies the retention policy now instead of at the next periodic check.
    pub fn enforce_retention(&self) -> Result<()> {
        self.call(|reply| Command::Retention { reply })
    }

    /// Flushes, writes the active segment's index and checkpoint, and stops the writer.
    pub(crate) fn close(&self) -> Result<()> {
        let result = match self.call(|reply| Command::Close { reply }) {
            Err(LogError::Closed) => Ok(()),
            other => other,
        };
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        result
    }

    pub fn offsets(&self) -> PartitionOffsets {
        let state = self.shared.state();
        PartitionOffsets {
            start_offset: state.start_offset(),
            appended_offset: state.appended_offset,
            durable_offset: state.durable_offset,
            visible_offset: state.visible_offset,
        }
    }

    pub fn stats(&self) -> PartitionStats {
        let state = self.shared.state();
        PartitionStats {
            offsets: PartitionOffsets {
                start_offset: state.start_offset(),
                appended_offset: state.appended_offset,
                durable_offset: state.durable_offset,
                visible_offset: state.visible_offset,
            },
            segment_count: state.segments.len(),
            size_bytes: state.segments.iter().map(|s| s.size_bytes).sum(),
        }
    }

    /// A reader positioned at `start`.
    pub fn reader(&self, start: StartAt) -> Result<PartitionReader> {
        PartitionReader::new(self.shared.clone(), start)
    }

    /// The first offset whose timestamp is at or after `timestamp_ms`, or the visible end when
    /// every record is older.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<u64> {
        crate::reader::offset_for_timestamp(&self.shared, timestamp_ms)
    }

    /// A receiver of `visible_offset`, for waiting on new records.
    pub fn watch_visible(&self) -> watch::Receiver<u64> {
        self.shared.visible_tx.subscribe()
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The partition's single writer: assigns offsets and timestamps, writes, fsyncs, acknowledges.
struct Writer {
    shared: Arc<PartitionShared>,
    rx: flume::Receiver<Command>,
    clock: Arc<dyn Clock>,
    retention_check_interval_ms: u64,

    file: Arc<dyn StorageFile>,
    paths: SegmentPaths,
    base_offset: u64,
    /// Bytes written to the active segment.
    position: u64,
    /// The offset the next record gets (records in `buf` included).
    next_offset: u64,
    /// The end of the records written to the file.
    written_offset: u64,
    durable_position: u64,
    durable_offset: u64,
    last_timestamp_ms: i64,
    segment_first_timestamp_ms: Option<i64>,
    segment_max_timestamp_ms: i64,
    last_index_position: Option<u32>,

    /// The group commit being assembled: sealed batches, their index entries, their acks.
    buf: Vec<u8>,
    buf_index: Vec<IndexEntry>,
    acks: Vec<(flume::Sender<Result<AppendAck>>, AppendAck)>,

    checkpoint: CheckpointWriter,
    last_sync_ms: i64,
    last_checkpoint_sync_ms: i64,
    last_retention_ms: i64,
    failure: Option<String>,
}

impl Writer {
    fn new(
        shared: Arc<PartitionShared>,
        rx: flume::Receiver<Command>,
        options: &PartitionOptions,
        recovered: Recovered,
        active: SegmentInfo,
    ) -> Result<Writer> {
        let storage = shared.storage.clone();
        let paths = shared.segment_paths(active.base_offset);
        let file = storage
            .open(&paths.log, OpenMode::ReadWrite)
            .io("open segment", &paths.log)?;
        let mut checkpoint =
            CheckpointWriter::open(storage.as_ref(), &shared.dir, recovered.checkpoint_sequence)?;
        let point = DurablePoint {
            segment_base_offset: active.base_offset,
            position: active.size_bytes,
            next_offset: active.next_offset,
        };
        checkpoint.write(point, true)?;
        let now = options.clock.now_ms();
        Ok(Writer {
            last_index_position: recovered.active_index.last().map(|e| e.position),
            shared,
            rx,
            clock: options.clock.clone(),
            retention_check_interval_ms: options.retention_check_interval_ms,
            file,
            paths,
            base_offset: active.base_offset,
            position: active.size_bytes,
            next_offset: active.next_offset,
            written_offset: active.next_offset,
            durable_position: active.size_bytes,
            durable_offset: active.next_offset,
            last_timestamp_ms: active.max_timestamp_ms.max(0),
            segment_first_timestamp_ms: recovered.active_first_timestamp_ms,
            segment_max_timestamp_ms: active.max_timestamp_ms,
            buf: Vec::new(),
            buf_index: Vec::new(),
            acks: Vec::new(),
            checkpoint,
            last_sync_ms: now,
            last_checkpoint_sync_ms: now,
            last_retention_ms: i64::MIN,
            failure: None,
        })
    }

    fn run(mut self) {
        loop {
            match self.rx.recv_timeout(Duration::from_millis(WRITER_TICK_MS)) {
                Ok(command) => {
                    if !self.handle(command) {
                        return;
                    }
                    while self.buf.len() < GROUP_COMMIT_BYTES_MAX {
                        match self.rx.try_recv() {
                            Ok(command) => {
                                if !self.handle(command) {
                                    return;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    let result = self.commit();
                    let _ = self.check(result);
                }
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => {
                    let result = self.close();
                    let _ = self.check(result);
                    return;
                }
            }
            let result = self.tick();
            let _ = self.check(result);
        }
    }

    /// Handles one command; `false` once the writer has closed.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Append { batches, reply } => {
                if let Some(e) = self.failed() {
                    let _ = reply.send(Err(e));
                    return true;
                }
                let result = self.stage(batches, reply);
                let _ = self.check(result);
            }
            Command::Sync { reply } => {
                let result = self.commit().and_then(|()| self.sync());
                let result = self.check(result);
                let _ = reply.send(result);
            }
            Command::Retention { reply } => {
                let result = self.commit().and_then(|()| self.enforce_retention());
                let result = self.check(result);
                let _ = reply.send(result);
            }
            Command::Close { reply } => {
                let result = self.close();
                let result = self.check(result);
                let _ = reply.send(result);
                return false;
            }
        }
        true
    }

    fn failed(&self) -> Option<LogError> {
        self.failure.as_ref().map(|reason| LogError::WriterFailed {
            topic: self.shared.topic.clone(),
            partition: self.shared.id,
            reason: reason.clone(),
        })
    }

    /// After a storage error nothing more is written: the state of the file past the durable
    /// point is unknown until the next open validates it. Pending appends get the error.
    fn check(&mut self, result: Result<()>) -> Result<()> {
        if let Err(e) = &result
            && self.failure.is_none()
            && !matches!(e, LogError::Closed)
        {
            let reason = e.to_string();
            tracing::error!(topic = %self.shared.topic, partition = self.shared.id, %reason, "partition writer failed");
            self.failure = Some(reason.clone());
            self.shared.state_mut().failure = Some(reason);
            self.buf.clear();
            self.buf_index.clear();
            for (reply, _) in self.acks.drain(..) {
                let _ = reply.send(Err(LogError::WriterFailed {
                    topic: self.shared.topic.clone(),
                    partition: self.shared.id,
                    reason: e.to_string(),
                }));
            }
        }
        match (result, self.failed()) {
            (Ok(()), Some(e)) => Err(e),
            (result, _) => result,
        }
    }

    /// Adds an append's batches to the group commit being assembled.
    fn stage(
        &mut self,
        batches: Vec<PendingBatch>,
        reply: flume::Sender<Result<AppendAck>>,
    ) -> Result<()> {
        let timestamp_ms = self.clock.now_ms().max(self.last_timestamp_ms);
        let base_offset = self.next_offset;
        let (segment_bytes_max, segment_ms_max) = (
            self.shared.config.segment_bytes_max,
            self.shared.config.segment_ms_max as i64,
        );
        for batch in &batches {
            let position = self.position + self.buf.len() as u64;
            let too_big = position + batch.len() as u64 > segment_bytes_max;
            let too_old = self
                .segment_first_timestamp_ms
                .is_some_and(|first| timestamp_ms.saturating_sub(first) >= segment_ms_max);
            let position = if position > 0 && (too_big || too_old) {
                self.commit()?;
                self.roll()?;
                0
            } else {
                position
            };
            if self
                .shared
                .rule
                .wants_entry(position, self.last_index_position)
            {
                let entry = IndexEntry {
                    relative_offset: u32::try_from(self.next_offset - self.base_offset)
                        .map_err(|_| self.segment_full())?,
                    position: u32::try_from(position).map_err(|_| self.segment_full())?,
                    timestamp_ms,
                };
                self.buf_index.push(entry);
                self.last_index_position = Some(entry.position);
            }
            batch.seal_into(&mut self.buf, self.next_offset, timestamp_ms);
            self.next_offset += u64::from(batch.record_count());
            self.segment_first_timestamp_ms.get_or_insert(timestamp_ms);
            self.segment_max_timestamp_ms = self.segment_max_timestamp_ms.max(timestamp_ms);
        }
        self.last_timestamp_ms = timestamp_ms;
        let ack = AppendAck {
            base_offset,
            record_count: self.next_offset - base_offset,
            timestamp_ms,
        };
        self.acks.push((reply, ack));
        Ok(())
    }

    fn segment_full(&self) -> LogError {
        LogError::InvalidConfig {
            reason: format!(
                "segment `{}` cannot address more records",
                self.paths.log.display()
            ),
        }
    }

    /// Writes the assembled group with one write, fsyncs it (under `always`), publishes the new
    /// offsets and acknowledges every append in it.
    fn commit(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(&self.buf, self.position)
            .io("append to segment", &self.paths.log)?;
        self.position += self.buf.len() as u64;
        self.written_offset = self.next_offset;
        if self.shared.config.fsync == FsyncPolicy::Always {
            self.file.sync_data().io("fsync segment", &self.paths.log)?;
            self.last_sync_ms = self.clock.now_ms();
            self.durable_position = self.position;
            self.durable_offset = self.written_offset;
        }
        self.publish();
        self.write_checkpoint(false)?;
        self.buf.clear();
        for (reply, ack) in self.acks.drain(..) {
            let _ = reply.send(Ok(ack));
        }
        Ok(())
    }

    /// Makes the new offsets visible to readers.
    fn publish(&mut self) {
        let visible_offset;
        {
            let mut state = self.shared.state_mut();
            if let Some(active) = state.segments.last_mut() {
                active.next_offset = self.written_offset;
                active.size_bytes = self.position;
                active.max_timestamp_ms = self.segment_max_timestamp_ms;
            }
            state.active_index.append(&mut self.buf_index);
            state.appended_offset = self.written_offset;
            state.durable_offset = self.durable_offset;
            (state.visible_offset, state.visible_position) = match self.shared.config.fsync {
                FsyncPolicy::Always => (self.durable_offset, self.durable_position),
                FsyncPolicy::Interval { .. } => (self.written_offset, self.position),
            };
            visible_offset = state.visible_offset;
        }
        self.shared.visible_tx.send_replace(visible_offset);
    }

    fn write_checkpoint(&mut self, force_sync: bool) -> Result<()> {
        let now = self.clock.now_ms();
        let sync = force_sync
            || now.saturating_sub(self.last_checkpoint_sync_ms)
                >= CHECKPOINT_SYNC_INTERVAL_MS as i64;
        let point = DurablePoint {
            segment_base_offset: self.base_offset,
            position: self.durable_position,
            next_offset: self.durable_offset,
        };
        self.checkpoint.write(point, sync)?;
        if sync {
            self.last_checkpoint_sync_ms = now;
        }
        Ok(())
    }

    /// Fsyncs what was written but not yet fsynced (interval policy).
    fn sync(&mut self) -> Result<()> {
        if self.durable_position == self.position {
            return Ok(());
        }
        self.file.sync_data().io("fsync segment", &self.paths.log)?;
        self.last_sync_ms = self.clock.now_ms();
        self.durable_position = self.position;
        self.durable_offset = self.written_offset;
        self.publish();
        self.write_checkpoint(false)
    }

    /// Seals the active segment and starts a new one at the next offset.
    fn roll(&mut self) -> Result<()> {
        self.sync()?;
        let storage = self.shared.storage.clone();
        let entries = self.shared.state().active_index.clone();
        let coverage = IndexCoverage {
            covered_bytes: self.position,
            next_offset: self.written_offset,
            max_timestamp_ms: self.segment_max_timestamp_ms,
        };
        write_index(storage.as_ref(), &self.paths, &entries, coverage)?;
        let base = self.written_offset;
        let paths = self.shared.segment_paths(base);
        let file = storage
            .open(&paths.log, OpenMode::CreateNew)
            .io("create segment", &paths.log)?;
        storage
            .sync_dir(&self.shared.dir)
            .io("sync partition directory", &self.shared.dir)?;
        tracing::debug!(segment = %paths.log.display(), "rolled segment");
        self.file = file;
        self.paths = paths;
        self.base_offset = base;
        self.position = 0;
        self.durable_position = 0;
        self.last_index_position = None;
        self.segment_first_timestamp_ms = None;
        self.segment_max_timestamp_ms = i64::MIN;
        self.write_checkpoint(true)?;
        let mut state = self.shared.state_mut();
        state.segments.push(SegmentInfo {
            base_offset: base,
            next_offset: base,
            size_bytes: 0,
            max_timestamp_ms: i64::MIN,
        });
        state.active_index.clear();
        state.visible_position = 0;
        Ok(())
    }

    fn tick(&mut self) -> Result<()> {
        if self.failure.is_some() {
            return Ok(());
        }
        let now = self.clock.now_ms();
        if let FsyncPolicy::Interval { interval_ms } = self.shared.config.fsync
            && now.saturating_sub(self.last_sync_ms) >= interval_ms as i64
        {
            self.sync()?;
            self.last_sync_ms = now;
        }
        if now.saturating_sub(self.last_checkpoint_sync_ms) >= CHECKPOINT_SYNC_INTERVAL_MS as i64 {
            self.write_checkpoint(true)?;
        }
        if now.saturating_sub(self.last_retention_ms) >= self.retention_check_interval_ms as i64 {
            self.enforce_retention()?;
        }
        Ok(())
    }

    /// Deletes the oldest sealed segments that are past the time or size retention.
    fn enforce_retention(&mut self) -> Result<()> {
        let now = self.clock.now_ms();
        self.last_retention_ms = now;
        let config = &self.shared.config;
        if config.retention_ms.is_none() && config.retention_bytes.is_none() {
            return Ok(());
        }
        let doomed: Vec<SegmentInfo> = {
            let state = self.shared.state();
            let mut total: u64 = state.segments.iter().map(|s| s.size_bytes).sum();
            let sealed = &state.segments[..state.segments.len().saturating_sub(1)];
            sealed
                .iter()
                .take_while(|s| {
                    let too_old = config.retention_ms.is_some_and(|ms| {
                        s.max_timestamp_ms != i64::MIN
                            && now.saturating_sub(s.max_timestamp_ms) > ms as i64
                    });
                    let too_big = config
                        .retention_bytes
                        .is_some_and(|max| total.saturating_sub(s.size_bytes) >= max);
                    if too_old || too_big {
                        total -= s.size_bytes;
                    }
                    too_old || too_big
                })
                .copied()
                .collect()
        };
        if doomed.is_empty() {
            return Ok(());
        }
        self.shared.state_mut().segments.drain(..doomed.len());
        for segment in &doomed {
            let paths = self.shared.segment_paths(segment.base_offset);
            for path in [&paths.log, &paths.offset_index, &paths.time_index] {
                match self.shared.storage.remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).io("delete segment", path),
                }
            }
            tracing::info!(
                segment = %paths.log.display(),
                offsets = %format!("{}..{}", segment.base_offset, segment.next_offset),
                "retention deleted segment"
            );
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        let result = self.flush_for_close();
        self.shared.state_mut().closed = true;
        self.shared.visible_tx.send_modify(|_| {});
        result
    }

    fn flush_for_close(&mut self) -> Result<()> {
        if self.failure.is_some() {
            return Ok(());
        }
        self.commit()?;
        self.sync()?;
        let entries = self.shared.state().active_index.clone();
        let coverage = IndexCoverage {
            covered_bytes: self.position,
            next_offset: self.written_offset,
            max_timestamp_ms: self.segment_max_timestamp_ms,
        };
        write_index(
            self.shared.storage.as_ref(),
            &self.paths,
            &entries,
            coverage,
        )?;
        self.write_checkpoint(true)
    }
}
