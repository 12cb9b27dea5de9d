//! The sparse offset index and the time index of a segment.
//!
//! Both are derived data: they can always be rebuilt by scanning the segment, and they are
//! rebuilt whenever they are missing, stale or fail their checksums. An entry is added for the
//! first batch of a segment and then for the first batch that starts at least
//! `index_interval_bytes` after the previous entry. The rule depends only on the sequence of
//! batches, so an index kept up to date while appending is identical to one rebuilt later.

/// One index entry: where a batch starts and the newest timestamp up to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// Base offset of the batch, relative to the segment's base offset.
    pub relative_offset: u32,
    /// Byte position of the batch in the segment.
    pub position: u32,
    /// The batch's last timestamp; timestamps never decrease within a partition.
    pub timestamp_ms: i64,
}

/// What an index file says about the segment bytes it describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexCoverage {
    /// Segment bytes this index describes, from the start.
    pub covered_bytes: u64,
    /// The offset after the last record in the covered bytes.
    pub next_offset: u64,
    /// Newest timestamp in the covered bytes, `i64::MIN` when they are empty.
    pub max_timestamp_ms: i64,
}

/// Decides which batches get an index entry.
#[derive(Clone, Copy, Debug)]
pub struct IndexRule {
    pub interval_bytes: u32,
}

impl IndexRule {
    /// Whether a batch at `position` gets an entry, given the last entry's position.
    pub fn wants_entry(&self, position: u64, last_entry_position: Option<u32>) -> bool {
        match last_entry_position {
            None => true,
            Some(last) => position >= u64::from(last) + u64::from(self.interval_bytes),
        }
    }
}

const OFFSET_MAGIC: &[u8; 4] = b"KPOI";
const TIME_MAGIC: &[u8; 4] = b"KPTI";
const INDEX_VERSION: u8 = 1;
/// Bytes of the header both index files start with.
pub const INDEX_HEADER_BYTES: usize = 48;
const OFFSET_ENTRY_BYTES: usize = 8;
const TIME_ENTRY_BYTES: usize = 12;

/// Which of the two index files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexKind {
    Offset,
    Time,
}

impl IndexKind {
    fn magic(self) -> &'static [u8; 4] {
        match self {
            IndexKind::Offset => OFFSET_MAGIC,
            IndexKind::Time => TIME_MAGIC,
        }
    }

    fn entry_bytes(self) -> usize {
        match self {
            IndexKind::Offset => OFFSET_ENTRY_BYTES,
            IndexKind::Time => TIME_ENTRY_BYTES,
        }
    }
}

/// Encodes one index file.
pub fn encode_index(kind: IndexKind, entries: &[IndexEntry], coverage: IndexCoverage) -> Vec<u8> {
    let mut out = Vec::with_capacity(INDEX_HEADER_BYTES + entries.len() * kind.entry_bytes());
    out.extend_from_slice(kind.magic());
    out.push(INDEX_VERSION);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&coverage.covered_bytes.to_le_bytes());
    out.extend_from_slice(&coverage.next_offset.to_le_bytes());
    out.extend_from_slice(&coverage.max_timestamp_ms.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    out.extend_from_slice(&[0; 8]); // header CRC and entries CRC, filled in below
    for e in entries {
        match kind {
            IndexKind::Offset => {
                out.extend_from_slice(&e.relative_offset.to_le_bytes());
                out.extend_from_slice(&e.position.to_le_bytes());
            }
            IndexKind::Time => {
                out.extend_from_slice(&e.timestamp_ms.to_le_bytes());
                out.extend_from_slice(&e.relative_offset.to_le_bytes());
            }
        }
    }
    let entries_crc = crc32c::crc32c(&out[INDEX_HEADER_BYTES..]);
    out[44..48].copy_from_slice(&entries_crc.to_le_bytes());
    let header_crc = crc32c::crc32c_append(crc32c::crc32c(&out[..40]), &out[44..48]);
    out[40..44].copy_from_slice(&header_crc.to_le_bytes());
    out
}

/// A decoded index header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexHeader {
    pub coverage: IndexCoverage,
    pub entry_count: u64,
    entries_crc: u32,
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Decodes and checks an index header; `file_bytes` is the index file's length.
pub fn decode_index_header(
    kind: IndexKind,
    header: &[u8],
    file_bytes: u64,
) -> Result<IndexHeader, String> {
    if header.len() < INDEX_HEADER_BYTES {
        return Err(format!(
            "index file of {} bytes has no complete header",
            header.len()
        ));
    }
    if &header[0..4] != kind.magic() {
        return Err("wrong magic".into());
    }
    if header[4] != INDEX_VERSION {
        return Err(format!("index version {} is not supported", header[4]));
    }
    let stored = le_u32(&header[40..44]);
    let actual = crc32c::crc32c_append(crc32c::crc32c(&header[..40]), &header[44..48]);
    if stored != actual {
        return Err(format!(
            "header CRC {stored:#010x} does not match {actual:#010x}"
        ));
    }
    let entry_count = le_u64(&header[32..40]);
    let expected_bytes = (INDEX_HEADER_BYTES as u64)
        .saturating_add(entry_count.saturating_mul(kind.entry_bytes() as u64));
    if expected_bytes != file_bytes {
        return Err(format!(
            "{entry_count} entries need {expected_bytes} bytes, file has {file_bytes}"
        ));
    }
    Ok(IndexHeader {
        coverage: IndexCoverage {
            covered_bytes: le_u64(&header[8..16]),
            next_offset: le_u64(&header[16..24]),
            max_timestamp_ms: le_u64(&header[24..32]) as i64,
        },
        entry_count,
        entries_crc: le_u32(&header[44..48]),
    })
}

/// Decodes both index files of a segment into entries, checking every CRC and that the two
/// files describe the same batches.
pub fn decode_index_files(
    offset_file: &[u8],
    time_file: &[u8],
) -> Result<(IndexCoverage, Vec<IndexEntry>), String> {
    let oh = decode_index_header(IndexKind::Offset, offset_file, offset_file.len() as u64)?;
    let th = decode_index_header(IndexKind::Time, time_file, time_file.len() as u64)?;
    if oh.coverage != th.coverage || oh.entry_count != th.entry_count {
        return Err("offset and time index disagree".into());
    }
    let offset_entries = &offset_file[INDEX_HEADER_BYTES..];
    let time_entries = &time_file[INDEX_HEADER_BYTES..];
    if crc32c::crc32c(offset_entries) != oh.entries_crc {
        return Err("offset index entries fail their CRC".into());
    }
    if crc32c::crc32c(time_entries) != th.entries_crc {
        return Err("time index entries fail their CRC".into());
    }
    let mut entries = Vec::with_capacity(oh.entry_count as usize);
    for (o, t) in offset_entries
        .chunks_exact(OFFSET_ENTRY_BYTES)
        .zip(time_entries.chunks_exact(TIME_ENTRY_BYTES))
    {
        let entry = IndexEntry {
            relative_offset: le_u32(&o[0..4]),
            position: le_u32(&o[4..8]),
            timestamp_ms: le_u64(&t[0..8]) as i64,
        };
        if le_u32(&t[8..12]) != entry.relative_offset {
            return Err("offset and time index entries disagree".into());
        }
        if let Some(prev) = entries.last() {
            let prev: &IndexEntry = prev;
            if entry.relative_offset <= prev.relative_offset
                || entry.position <= prev.position
                || entry.timestamp_ms < prev.timestamp_ms
            {
                return Err("index entries are not increasing".into());
            }
        }
        if u64::from(entry.position) >= oh.coverage.covered_bytes {
            return Err("index entry points past the covered bytes".into());
        }
        entries.push(entry);
    }
    Ok((oh.coverage, entries))
}

/// The entry to start reading from to find `relative_offset`: the last entry at or before it.
pub fn lookup_offset(entries: &[IndexEntry], relative_offset: u64) -> Option<IndexEntry> {
    let i = entries.partition_point(|e| u64::from(e.relative_offset) <= relative_offset);
    i.checked_sub(1).map(|i| entries[i])
}

/// The entry to start scanning from to find the first record with timestamp ≥ `timestamp_ms`:
/// the last entry whose batch is entirely older.
pub fn lookup_timestamp(entries: &[IndexEntry], timestamp_ms: i64) -> Option<IndexEntry> {
    let i = entries.partition_point(|e| e.timestamp_ms < timestamp_ms);
    i.checked_sub(1).map(|i| entries[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<IndexEntry> {
        (0..10)
            .map(|i| IndexEntry {
                relative_offset: i * 10,
                position: i * 5000,
                timestamp_ms: 100 + i as i64,
            })
            .collect()
    }

    fn coverage() -> IndexCoverage {
        IndexCoverage {
            covered_bytes: 60_000,
            next_offset: 1_100,
            max_timestamp_ms: 200,
        }
    }

    #[test]
    fn index_files_round_trip() {
        let entries = sample();
        let o = encode_index(IndexKind::Offset, &entries, coverage());
        let t = encode_index(IndexKind::Time, &entries, coverage());
        let (cov, decoded) = decode_index_files(&o, &t).unwrap();
        assert_eq!(cov, coverage());
        assert_eq!(decoded, entries);
    }

    #[test]
    fn every_byte_flip_in_an_index_file_is_detected() {
        let entries = sample();
        let o = encode_index(IndexKind::Offset, &entries, coverage());
        let t = encode_index(IndexKind::Time, &entries, coverage());
        for i in 0..o.len() {
            let mut bad = o.clone();
            bad[i] ^= 0x10;
            assert!(
                decode_index_files(&bad, &t).is_err(),
                "offset index byte {i}"
            );
        }
        for i in 0..t.len() {
            let mut bad = t.clone();
            bad[i] ^= 0x10;
            assert!(decode_index_files(&o, &bad).is_err(), "time index byte {i}");
        }
    }

    #[test]
    fn lookups_find_the_entry_at_or_before() {
        let entries = sample();
        assert_eq!(lookup_offset(&entries, 0).unwrap().relative_offset, 0);
        assert_eq!(lookup_offset(&entries, 15).unwrap().relative_offset, 10);
        assert_eq!(lookup_offset(&entries, 1000).unwrap().relative_offset, 90);
        assert_eq!(lookup_timestamp(&entries, 100), None);
        assert_eq!(lookup_timestamp(&entries, 103).unwrap().timestamp_ms, 102);
        assert!(lookup_offset(&[], 5).is_none());
    }
}
