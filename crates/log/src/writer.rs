//! The write path of one partition: a writer thread and a syncer thread, pipelined.
//!
//! ```text
//!  producers ─► queue ─► writer: assign offsets, seal batches, one pwritev per group ─┐
//!                          ▲ acks (interval policy)                                    │ written
//!                          │                                                           ▼
//!  readers ◄─ visible ◄────┴──────────── syncer: one fdatasync for every group written since
//!                                          the last one, then checkpoint and acks (always)
//! ```
//!
//! While the syncer waits for an fsync, the writer already writes the next group, so a slow
//! fsync does not stop the intake; every group written before an fsync starts is covered by it.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::batch::PendingBatch;
use crate::checkpoint::{CheckpointWriter, DurablePoint};
use crate::clock::Clock;
use crate::config::FsyncPolicy;
use crate::error::IoContext;
use crate::index::{IndexCoverage, IndexEntry};
use crate::limits::{CHECKPOINT_SYNC_INTERVAL_MS, GROUP_COMMIT_BYTES_MAX, WRITER_TICK_MS};
use crate::recovery::{Recovered, SegmentInfo};
use crate::segment::{SegmentPaths, write_index};
use crate::shared::{AppendAck, PartitionOptions, PartitionShared};
use crate::storage::{OpenMode, StorageFile};
use crate::{LogError, Result};

pub(crate) type AckSender = flume::Sender<Result<AppendAck>>;

/// What producers and the partition handle ask of the writer.
pub(crate) enum Command {
    Append {
        batches: Vec<PendingBatch>,
        reply: AckSender,
    },
    /// Make everything appended so far durable.
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

/// What the writer tells the syncer.
enum SyncCommand {
    /// A group was written; under `always` its acknowledgements wait for the next fsync.
    Written(WrittenGroup),
    /// Fsync everything written so far (whatever the policy), then reply.
    Barrier(flume::Sender<Result<()>>),
    /// A new active segment starts empty at `base_offset`: record it as the durable point.
    NewSegment {
        base_offset: u64,
        reply: flume::Sender<Result<()>>,
    },
    /// Fsync, write the final checkpoint, stop.
    Close(flume::Sender<Result<()>>),
}

struct WrittenGroup {
    file: Arc<dyn StorageFile>,
    point: DurablePoint,
    acks: Vec<(AckSender, AppendAck)>,
}

/// Marks the partition failed: after a storage error the bytes past the durable point are in an
/// unknown state until the next open validates them, so nothing more is written.
fn fail(shared: &PartitionShared, e: &LogError) -> String {
    let reason = e.to_string();
    let mut state = shared.state_mut();
    if state.failure.is_none() {
        tracing::error!(topic = %shared.topic, partition = shared.id, %reason, "partition writer failed");
        state.failure = Some(reason.clone());
    }
    state.failure.clone().unwrap_or(reason)
}

fn failed_error(shared: &PartitionShared) -> Option<LogError> {
    shared
        .state()
        .failure
        .as_ref()
        .map(|reason| LogError::WriterFailed {
            topic: shared.topic.clone(),
            partition: shared.id,
            reason: reason.clone(),
        })
}

fn reject(shared: &PartitionShared, acks: Vec<(AckSender, AppendAck)>, reason: &str) {
    for (reply, _) in acks {
        let _ = reply.send(Err(LogError::WriterFailed {
            topic: shared.topic.clone(),
            partition: shared.id,
            reason: reason.to_owned(),
        }));
    }
}

/// The partition's single writer: assigns offsets and timestamps, writes groups, rolls
/// segments, applies retention.
pub(crate) struct Writer {
    shared: Arc<PartitionShared>,
    rx: flume::Receiver<Command>,
    syncer_tx: flume::Sender<SyncCommand>,
    syncer: Option<JoinHandle<()>>,
    clock: Arc<dyn Clock>,
    retention_check_interval_ms: u64,

    file: Arc<dyn StorageFile>,
    paths: SegmentPaths,
    base_offset: u64,
    /// Bytes written to the active segment.
    position: u64,
    /// The offset the next record gets (records in the group being assembled included).
    next_offset: u64,
    last_timestamp_ms: i64,
    segment_first_timestamp_ms: Option<i64>,
    segment_max_timestamp_ms: i64,
    last_index_position: Option<u32>,

    /// The group being assembled: sealed batches, their bytes, index entries and acks.
    group: Vec<PendingBatch>,
    group_bytes: usize,
    group_index: Vec<IndexEntry>,
    acks: Vec<(AckSender, AppendAck)>,
    last_retention_ms: i64,
}

impl Writer {
    /// Starts the syncer thread and returns the writer, ready to [`run`](Writer::run).
    pub(crate) fn start(
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
        let durable = DurablePoint {
            segment_base_offset: active.base_offset,
            position: active.size_bytes,
            next_offset: active.next_offset,
        };
        checkpoint.write(durable, true)?;
        let (syncer_tx, syncer_rx) = flume::unbounded();
        let now = options.clock.now_ms();
        let syncer = Syncer {
            shared: shared.clone(),
            rx: syncer_rx,
            clock: options.clock.clone(),
            checkpoint,
            pending: None,
            acks: Vec::new(),
            durable,
            last_sync_ms: now,
            last_checkpoint_sync_ms: now,
        };
        let syncer = std::thread::Builder::new()
            .name(format!("kappa-sync-{}-{}", shared.topic, shared.id))
            .spawn(move || syncer.run())
            .io("spawn syncer thread", &shared.dir)?;
        Ok(Writer {
            last_index_position: recovered.active_index.last().map(|e| e.position),
            shared,
            rx,
            syncer_tx,
            syncer: Some(syncer),
            clock: options.clock.clone(),
            retention_check_interval_ms: options.retention_check_interval_ms,
            file,
            paths,
            base_offset: active.base_offset,
            position: active.size_bytes,
            next_offset: active.next_offset,
            // Timestamps never go back, not even across a restart onto an empty active segment.
            last_timestamp_ms: recovered
                .segments
                .iter()
                .map(|s| s.max_timestamp_ms)
                .max()
                .unwrap_or(0)
                .max(0),
            segment_first_timestamp_ms: recovered.active_first_timestamp_ms,
            segment_max_timestamp_ms: active.max_timestamp_ms,
            group: Vec::new(),
            group_bytes: 0,
            group_index: Vec::new(),
            acks: Vec::new(),
            last_retention_ms: i64::MIN,
        })
    }

    pub(crate) fn run(mut self) {
        loop {
            match self.rx.recv_timeout(Duration::from_millis(WRITER_TICK_MS)) {
                Ok(command) => {
                    if !self.handle(command) {
                        return;
                    }
                    while self.group_bytes < GROUP_COMMIT_BYTES_MAX {
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
                if let Some(e) = failed_error(&self.shared) {
                    let _ = reply.send(Err(e));
                    return true;
                }
                match self.stage(batches) {
                    Ok(ack) => self.acks.push((reply, ack)),
                    Err(e) => {
                        let _ = self.check(Err(e));
                        let _ =
                            reply.send(Err(failed_error(&self.shared).unwrap_or(LogError::Closed)));
                    }
                }
            }
            Command::Sync { reply } => {
                let result = self.commit().and_then(|()| self.barrier());
                let _ = reply.send(self.check(result));
            }
            Command::Retention { reply } => {
                let result = self.commit().and_then(|()| self.enforce_retention());
                let _ = reply.send(self.check(result));
            }
            Command::Close { reply } => {
                let result = self.close();
                let _ = reply.send(self.check(result));
                return false;
            }
        }
        true
    }

    /// Records a failure and answers the appends in the group being assembled.
    fn check(&mut self, result: Result<()>) -> Result<()> {
        if let Err(e) = &result
            && !matches!(e, LogError::Closed)
        {
            let reason = fail(&self.shared, e);
            self.group.clear();
            self.group_bytes = 0;
            self.group_index.clear();
            reject(&self.shared, std::mem::take(&mut self.acks), &reason);
        }
        result
    }

    /// Adds an append's batches to the group being assembled.
    fn stage(&mut self, batches: Vec<PendingBatch>) -> Result<AppendAck> {
        let timestamp_ms = self.clock.now_ms().max(self.last_timestamp_ms);
        let append_bytes: u64 = batches.iter().map(|b| b.len() as u64).sum();
        let position = self.position + self.group_bytes as u64;
        let too_big = position + append_bytes > self.shared.config.segment_bytes_max;
        let too_old = self.segment_first_timestamp_ms.is_some_and(|first| {
            timestamp_ms.saturating_sub(first) >= self.shared.config.segment_ms_max as i64
        });
        // Segments roll between appends only: an append never straddles a roll, so no part of
        // it becomes durable and readable (a sealed segment is read whole) before all of it is.
        if position > 0 && (too_big || too_old) {
            self.commit()?;
            self.roll()?;
        }
        let base_offset = self.next_offset;
        for mut batch in batches {
            let position = self.position + self.group_bytes as u64;
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
                self.group_index.push(entry);
                self.last_index_position = Some(entry.position);
            }
            batch.seal(self.next_offset, timestamp_ms);
            self.next_offset += u64::from(batch.record_count());
            self.group_bytes += batch.len();
            self.group.push(batch);
        }
        self.segment_first_timestamp_ms.get_or_insert(timestamp_ms);
        self.segment_max_timestamp_ms = self.segment_max_timestamp_ms.max(timestamp_ms);
        self.last_timestamp_ms = timestamp_ms;
        Ok(AppendAck {
            base_offset,
            record_count: self.next_offset - base_offset,
            timestamp_ms,
        })
    }

    fn segment_full(&self) -> LogError {
        LogError::InvalidConfig {
            reason: format!(
                "segment `{}` cannot address more records",
                self.paths.log.display()
            ),
        }
    }

    /// Writes the assembled group with one vectored write and hands it to the syncer.
    fn commit(&mut self) -> Result<()> {
        if self.group.is_empty() {
            return Ok(());
        }
        let slices: Vec<&[u8]> = self.group.iter().map(PendingBatch::bytes).collect();
        self.file
            .write_all_vectored_at(&slices, self.position)
            .io("append to segment", &self.paths.log)?;
        self.position += self.group_bytes as u64;
        self.group.clear();
        self.group_bytes = 0;
        let always = self.shared.config.fsync == FsyncPolicy::Always;
        let visible_offset = {
            let mut state = self.shared.state_mut();
            if let Some(active) = state.segments.last_mut() {
                active.next_offset = self.next_offset;
                active.size_bytes = self.position;
                active.max_timestamp_ms = self.segment_max_timestamp_ms;
            }
            state.active_index.append(&mut self.group_index);
            state.appended_offset = self.next_offset;
            if !always {
                // Under an interval policy a written record is acknowledged, so readers see it.
                state.visible_offset = self.next_offset;
                state.visible_position = self.position;
            }
            state.visible_offset
        };
        let mut acks = std::mem::take(&mut self.acks);
        if !always {
            self.shared.visible_tx.send_replace(visible_offset);
            for (reply, ack) in acks.drain(..) {
                let _ = reply.send(Ok(ack));
            }
        }
        let point = DurablePoint {
            segment_base_offset: self.base_offset,
            position: self.position,
            next_offset: self.next_offset,
        };
        self.syncer_tx
            .send(SyncCommand::Written(WrittenGroup {
                file: self.file.clone(),
                point,
                acks,
            }))
            .map_err(|_| LogError::Closed)
    }

    /// Waits until everything written so far is fsynced and acknowledged.
    fn barrier(&mut self) -> Result<()> {
        let (reply, rx) = flume::bounded(1);
        self.syncer_tx
            .send(SyncCommand::Barrier(reply))
            .map_err(|_| LogError::Closed)?;
        rx.recv().map_err(|_| LogError::Closed)?
    }

    /// Seals the active segment and starts a new one at the next offset.
    fn roll(&mut self) -> Result<()> {
        // A sealed segment is read whole, so it must be durable before it is sealed.
        self.barrier()?;
        let storage = self.shared.storage.clone();
        let entries = self.shared.state().active_index.clone();
        let coverage = IndexCoverage {
            covered_bytes: self.position,
            next_offset: self.next_offset,
            max_timestamp_ms: self.segment_max_timestamp_ms,
        };
        write_index(storage.as_ref(), &self.paths, &entries, coverage)?;
        let base = self.next_offset;
        let paths = self.shared.segment_paths(base);
        let file = storage
            .open(&paths.log, OpenMode::CreateNew)
            .io("create segment", &paths.log)?;
        storage
            .sync_dir(&self.shared.dir)
            .io("sync partition directory", &self.shared.dir)?;
        tracing::debug!(segment = %paths.log.display(), "rolled segment");
        {
            let mut state = self.shared.state_mut();
            state.segments.push(SegmentInfo {
                base_offset: base,
                next_offset: base,
                size_bytes: 0,
                max_timestamp_ms: i64::MIN,
            });
            state.active_index.clear();
            state.visible_position = 0;
        }
        self.file = file;
        self.paths = paths;
        self.base_offset = base;
        self.position = 0;
        self.last_index_position = None;
        self.segment_first_timestamp_ms = None;
        self.segment_max_timestamp_ms = i64::MIN;
        let (reply, rx) = flume::bounded(1);
        self.syncer_tx
            .send(SyncCommand::NewSegment {
                base_offset: base,
                reply,
            })
            .map_err(|_| LogError::Closed)?;
        rx.recv().map_err(|_| LogError::Closed)?
    }

    fn tick(&mut self) -> Result<()> {
        if self.shared.state().failure.is_some() {
            return Ok(());
        }
        let now = self.clock.now_ms();
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

    /// Flushes, writes the active segment's index and the final checkpoint, stops the syncer.
    fn close(&mut self) -> Result<()> {
        let result = self.flush_for_close();
        let (reply, rx) = flume::bounded(1);
        let stopped = match self.syncer_tx.send(SyncCommand::Close(reply)) {
            Ok(()) => rx.recv().unwrap_or(Err(LogError::Closed)),
            Err(_) => Err(LogError::Closed),
        };
        if let Some(syncer) = self.syncer.take() {
            let _ = syncer.join();
        }
        self.shared.state_mut().closed = true;
        self.shared.visible_tx.send_modify(|_| {});
        match (result, stopped) {
            (Err(e), _) => Err(e),
            (Ok(()), Err(LogError::Closed)) => Ok(()),
            (Ok(()), other) => other,
        }
    }

    fn flush_for_close(&mut self) -> Result<()> {
        if self.shared.state().failure.is_some() {
            return Ok(());
        }
        self.commit()?;
        self.barrier()?;
        let entries = self.shared.state().active_index.clone();
        let coverage = IndexCoverage {
            covered_bytes: self.position,
            next_offset: self.next_offset,
            max_timestamp_ms: self.segment_max_timestamp_ms,
        };
        write_index(
            self.shared.storage.as_ref(),
            &self.paths,
            &entries,
            coverage,
        )
    }
}

/// Makes written groups durable: one fdatasync covers every group written before it.
struct Syncer {
    shared: Arc<PartitionShared>,
    rx: flume::Receiver<SyncCommand>,
    clock: Arc<dyn Clock>,
    checkpoint: CheckpointWriter,
    /// The newest written group not yet fsynced: its file and where it ends.
    pending: Option<(Arc<dyn StorageFile>, DurablePoint)>,
    /// Acknowledgements waiting for the next fsync.
    acks: Vec<(AckSender, AppendAck)>,
    durable: DurablePoint,
    last_sync_ms: i64,
    last_checkpoint_sync_ms: i64,
}

impl Syncer {
    fn run(mut self) {
        loop {
            match self.rx.recv_timeout(Duration::from_millis(WRITER_TICK_MS)) {
                Ok(command) => {
                    if !self.handle(command) {
                        return;
                    }
                    // Everything written meanwhile shares the next fsync.
                    while let Ok(command) = self.rx.try_recv() {
                        if !self.handle(command) {
                            return;
                        }
                    }
                }
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => {
                    let _ = self.sync();
                    return;
                }
            }
            let now = self.clock.now_ms();
            let due = match self.shared.config.fsync {
                FsyncPolicy::Always => true,
                FsyncPolicy::Interval { interval_ms } => {
                    now.saturating_sub(self.last_sync_ms) >= interval_ms as i64
                }
            };
            if due && self.pending.is_some() {
                let _ = self.sync();
            }
            if now.saturating_sub(self.last_checkpoint_sync_ms)
                >= CHECKPOINT_SYNC_INTERVAL_MS as i64
            {
                self.write_checkpoint(true);
            }
        }
    }

    /// Handles one command; `false` once closed.
    fn handle(&mut self, command: SyncCommand) -> bool {
        match command {
            SyncCommand::Written(group) => {
                if let Some(reason) = self.shared.state().failure.clone() {
                    reject(&self.shared, group.acks, &reason);
                    return true;
                }
                if self
                    .pending
                    .as_ref()
                    .is_some_and(|(_, p)| p.segment_base_offset != group.point.segment_base_offset)
                {
                    // Never happens (rolls wait for a barrier), but an fsync per file keeps it safe.
                    let _ = self.sync();
                }
                self.pending = Some((group.file, group.point));
                self.acks.extend(group.acks);
            }
            SyncCommand::Barrier(reply) => {
                let _ = reply.send(self.sync());
            }
            SyncCommand::NewSegment { base_offset, reply } => {
                self.durable = DurablePoint {
                    segment_base_offset: base_offset,
                    position: 0,
                    next_offset: base_offset,
                };
                let result = self.checkpoint.write(self.durable, true);
                if result.is_ok() {
                    self.last_checkpoint_sync_ms = self.clock.now_ms();
                }
                let _ = reply.send(result);
            }
            SyncCommand::Close(reply) => {
                let result = self
                    .sync()
                    .and_then(|()| self.checkpoint.write(self.durable, true));
                let _ = reply.send(result);
                return false;
            }
        }
        true
    }

    /// Fsyncs the newest written group (and so every one before it), publishes the durable
    /// point and sends the waiting acknowledgements.
    fn sync(&mut self) -> Result<()> {
        if let Some(e) = failed_error(&self.shared) {
            reject(&self.shared, std::mem::take(&mut self.acks), &e.to_string());
            return Err(e);
        }
        let Some((file, point)) = self.pending.take() else {
            for (reply, ack) in self.acks.drain(..) {
                let _ = reply.send(Ok(ack));
            }
            return Ok(());
        };
        if let Err(source) = file.sync_data() {
            let path = self.shared.segment_paths(point.segment_base_offset).log;
            let e = LogError::Io {
                action: "fsync segment",
                path,
                source,
            };
            let reason = fail(&self.shared, &e);
            reject(&self.shared, std::mem::take(&mut self.acks), &reason);
            return Err(e);
        }
        self.last_sync_ms = self.clock.now_ms();
        self.durable = point;
        let visible = {
            let mut state = self.shared.state_mut();
            state.durable_offset = point.next_offset;
            if self.shared.config.fsync == FsyncPolicy::Always {
                state.visible_offset = point.next_offset;
                state.visible_position = point.position;
            }
            state.visible_offset
        };
        self.shared.visible_tx.send_replace(visible);
        self.write_checkpoint(false);
        for (reply, ack) in self.acks.drain(..) {
            let _ = reply.send(Ok(ack));
        }
        Ok(())
    }

    /// Records the durable point; the checkpoint only ever trails the fsynced data, so an error
    /// here is logged and retried at the next sync rather than failing the partition.
    fn write_checkpoint(&mut self, force_sync: bool) {
        let now = self.clock.now_ms();
        let sync = force_sync
            || now.saturating_sub(self.last_checkpoint_sync_ms)
                >= CHECKPOINT_SYNC_INTERVAL_MS as i64;
        match self.checkpoint.write(self.durable, sync) {
            Ok(()) if sync => self.last_checkpoint_sync_ms = now,
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(topic = %self.shared.topic, partition = self.shared.id, error = %e, "writing the recovery checkpoint")
            }
        }
    }
}
