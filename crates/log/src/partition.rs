//! One partition: the handle producers and readers use, and the state they share with the
//! write path (see `writer.rs`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use tokio::sync::watch;

use crate::batch::{PendingBatch, Record, encode_batches};
use crate::config::TopicConfig;
use crate::error::IoContext;
use crate::index::IndexRule;
use crate::limits::APPEND_QUEUE_LEN;
use crate::reader::{PartitionReader, StartAt};
use crate::recovery::{RecoveryEvent, recover};
pub use crate::shared::{AppendAck, PartitionOffsets, PartitionStats};
use crate::shared::{PartitionOptions, PartitionShared, PartitionState};
use crate::storage::Storage;
use crate::writer::{Command, Writer};
use crate::{LogError, Result};

/// The pending acknowledgement of a submitted append.
#[derive(Debug)]
pub(crate) struct AckReceiver(flume::Receiver<Result<AppendAck>>);

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
        let writer = Writer::start(shared.clone(), rx, options, recovered, active)?;
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
        let reply = self.submit_blocking(encode_batches(records)?)?;
        self.acknowledged_blocking(reply)
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

    /// [`Partition::submit`] for callers outside an async runtime.
    pub(crate) fn submit_blocking(&self, batches: Vec<PendingBatch>) -> Result<AckReceiver> {
        let (reply, rx) = flume::bounded(1);
        if batches.is_empty() {
            let _ = reply.send(Ok(self.empty_ack()));
        } else {
            self.send_blocking(Command::Append { batches, reply })?;
        }
        Ok(AckReceiver(rx))
    }

    /// Waits for the acknowledgement of a [`Partition::submit`].
    pub(crate) async fn acknowledged(&self, reply: AckReceiver) -> Result<AppendAck> {
        reply.0.recv_async().await.map_err(|_| self.stopped())?
    }

    /// [`Partition::acknowledged`] for callers outside an async runtime.
    pub(crate) fn acknowledged_blocking(&self, reply: AckReceiver) -> Result<AppendAck> {
        reply.0.recv().map_err(|_| self.stopped())?
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
