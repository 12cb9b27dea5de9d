//! What a partition's handle, its readers and its write path share: the state behind one
//! lock, its options, and what an append returns.

use std::path::PathBuf;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::TopicConfig;
use crate::index::{IndexEntry, IndexRule};
use crate::recovery::SegmentInfo;
use crate::segment::{SegmentPaths, segment_paths};
use crate::storage::Storage;

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

    pub(crate) fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, PartitionState> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn segment_paths(&self, base_offset: u64) -> SegmentPaths {
        segment_paths(&self.dir, base_offset)
    }
}

/// Options a partition inherits from its log.
#[derive(Debug, Clone)]
pub(crate) struct PartitionOptions {
    pub storage: Arc<dyn Storage>,
    pub clock: Arc<dyn Clock>,
    pub retention_check_interval_ms: u64,
    pub read_chunk_bytes: usize,
}
