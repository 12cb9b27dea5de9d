//! The recovery checkpoint: where a partition's durable bytes end.
//!
//! Written after every fsync of segment data (so it never claims more than is durable) without an
//! fsync of its own, and fsynced at segment rolls, at close and at most every
//! [`CHECKPOINT_SYNC_INTERVAL_MS`](crate::limits::CHECKPOINT_SYNC_INTERVAL_MS). Two slots are
//! written alternately, each with a sequence number and a CRC, so a torn write of one slot leaves
//! the other readable.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::IoContext;
use crate::storage::{OpenMode, Storage, StorageFile};
use crate::{LogError, Result};

pub(crate) const CHECKPOINT_FILE: &str = "recovery-checkpoint";
const SLOT_BYTES: usize = 64;
const MAGIC: &[u8; 4] = b"KPCK";
const VERSION: u8 = 1;

/// A durable point: everything before `position` in segment `segment_base_offset` (and every
/// earlier segment) has been fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurablePoint {
    pub segment_base_offset: u64,
    pub position: u64,
    pub next_offset: u64,
}

fn encode_slot(sequence: u64, point: DurablePoint) -> [u8; SLOT_BYTES] {
    let mut slot = [0u8; SLOT_BYTES];
    slot[0..4].copy_from_slice(MAGIC);
    slot[4] = VERSION;
    slot[8..16].copy_from_slice(&sequence.to_le_bytes());
    slot[16..24].copy_from_slice(&point.segment_base_offset.to_le_bytes());
    slot[24..32].copy_from_slice(&point.position.to_le_bytes());
    slot[32..40].copy_from_slice(&point.next_offset.to_le_bytes());
    let crc = crc32c::crc32c(&slot[0..40]);
    slot[40..44].copy_from_slice(&crc.to_le_bytes());
    slot
}

fn decode_slot(slot: &[u8]) -> Option<(u64, DurablePoint)> {
    if slot.len() < SLOT_BYTES || &slot[0..4] != MAGIC || slot[4] != VERSION {
        return None;
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&slot[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&slot[40..44]);
    if u32::from_le_bytes(crc) != crc32c::crc32c(&slot[0..40]) {
        return None;
    }
    Some((
        u64_at(8),
        DurablePoint {
            segment_base_offset: u64_at(16),
            position: u64_at(24),
            next_offset: u64_at(32),
        },
    ))
}

/// Reads a partition's checkpoint: `None` when there is no file.
pub(crate) fn read(storage: &dyn Storage, dir: &Path) -> Result<Option<(u64, DurablePoint)>> {
    let path = dir.join(CHECKPOINT_FILE);
    let file = match storage.open(&path, OpenMode::Read) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).io("open recovery checkpoint", &path),
    };
    let mut buf = [0u8; SLOT_BYTES * 2];
    let n = file
        .read_full_at(&mut buf, 0)
        .io("read recovery checkpoint", &path)?;
    let best = buf[..n]
        .chunks(SLOT_BYTES)
        .filter_map(decode_slot)
        .max_by_key(|(sequence, _)| *sequence);
    match best {
        Some(found) => Ok(Some(found)),
        None => Err(LogError::CorruptCheckpoint { path }),
    }
}

/// Writes a partition's checkpoint; owned by the partition's writer thread.
#[derive(Debug)]
pub(crate) struct CheckpointWriter {
    path: PathBuf,
    file: Arc<dyn StorageFile>,
    sequence: u64,
    last: Option<DurablePoint>,
    synced: bool,
}

impl CheckpointWriter {
    pub(crate) fn open(storage: &dyn Storage, dir: &Path, sequence: u64) -> Result<Self> {
        let path = dir.join(CHECKPOINT_FILE);
        let file = match storage.open(&path, OpenMode::ReadWrite) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = storage
                    .open(&path, OpenMode::CreateNew)
                    .io("create recovery checkpoint", &path)?;
                storage.sync_dir(dir).io("sync partition directory", dir)?;
                f
            }
            Err(e) => return Err(e).io("open recovery checkpoint", &path),
        };
        Ok(CheckpointWriter {
            path,
            file,
            sequence,
            last: None,
            synced: true,
        })
    }

    /// Records `point`; fsyncs the file only when `sync` is set.
    pub(crate) fn write(&mut self, point: DurablePoint, sync: bool) -> Result<()> {
        if self.last != Some(point) {
            self.sequence += 1;
            let slot = encode_slot(self.sequence, point);
            let at = (self.sequence % 2) * SLOT_BYTES as u64;
            self.file
                .write_all_at(&slot, at)
                .io("write recovery checkpoint", &self.path)?;
            self.last = Some(point);
            self.synced = false;
        }
        if sync && !self.synced {
            self.file
                .sync_data()
                .io("sync recovery checkpoint", &self.path)?;
            self.synced = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_valid_slot_wins_and_a_torn_slot_is_skipped() {
        let a = DurablePoint {
            segment_base_offset: 0,
            position: 100,
            next_offset: 5,
        };
        let b = DurablePoint {
            segment_base_offset: 0,
            position: 200,
            next_offset: 9,
        };
        let mut buf = [0u8; SLOT_BYTES * 2];
        buf[SLOT_BYTES..].copy_from_slice(&encode_slot(1, a));
        buf[..SLOT_BYTES].copy_from_slice(&encode_slot(2, b));
        let best = buf
            .chunks(SLOT_BYTES)
            .filter_map(decode_slot)
            .max_by_key(|s| s.0);
        assert_eq!(best, Some((2, b)));
        buf[20] ^= 1;
        let best = buf
            .chunks(SLOT_BYTES)
            .filter_map(decode_slot)
            .max_by_key(|s| s.0);
        assert_eq!(best, Some((1, a)));
    }
}
