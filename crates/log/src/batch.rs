//! The record batch: the unit that is written, checksummed, fsynced and read.
//!
//! The exact byte layout is specified in `docs/log-format.md`; this module is its only
//! implementation. All integers are little-endian; varints are unsigned LEB128.

use bytes::Bytes;

use crate::limits::{APPEND_BYTES_MAX, BATCH_BYTES_MAX, RECORD_BYTES_MAX, RECORD_HEADERS_MAX};
use crate::{LogError, Result};

/// Bytes in the fixed batch header.
pub const BATCH_HEADER_BYTES: usize = 40;

/// The batch format this code writes and reads.
pub const FORMAT_VERSION: u8 = 1;

/// A record to append. The log assigns its offset and its timestamp (append time).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
}

/// An optional key/value pair carried beside a record's value (trace ids, content types).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub key: String,
    pub value: Option<Bytes>,
}

impl Record {
    /// A record with only a value.
    pub fn from_value(value: impl Into<Bytes>) -> Record {
        Record {
            key: None,
            value: value.into(),
            headers: Vec::new(),
        }
    }

    /// A record with a key and a value.
    pub fn keyed(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Record {
        Record {
            key: Some(key.into()),
            value: value.into(),
            headers: Vec::new(),
        }
    }

    /// Bytes of key, value and headers: what [`RECORD_BYTES_MAX`] limits.
    pub fn payload_len(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len)
            + self.value.len()
            + self
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.as_ref().map_or(0, Bytes::len))
                .sum::<usize>()
    }
}

/// The fixed header of a batch, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    /// Length of the whole batch in bytes, header included.
    pub length: u32,
    pub crc: u32,
    pub record_count: u32,
    pub base_offset: u64,
    pub first_timestamp_ms: i64,
    pub last_timestamp_ms: i64,
}

impl BatchHeader {
    /// The offset after this batch's last record.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }
}

/// Why bytes are not a valid batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchError {
    /// Fewer bytes than the batch needs: a torn tail, or a read that stopped short.
    Truncated { needed: usize, available: usize },
    /// The checksum does not match the bytes.
    Crc { expected: u32, actual: u32 },
    /// The bytes pass the checksum (or fail before it) but break the format.
    Malformed(String),
}

impl BatchError {
    /// Names the place the error was found in.
    pub(crate) fn at(self, segment: &std::path::Path, position: u64) -> LogError {
        let segment = segment.to_path_buf();
        match self {
            BatchError::Crc { expected, actual } => LogError::CorruptBatch {
                segment,
                position,
                expected_crc: expected,
                actual_crc: actual,
            },
            BatchError::Truncated { needed, available } => LogError::MalformedBatch {
                segment,
                position,
                reason: format!("batch needs {needed} bytes but only {available} are there"),
            },
            BatchError::Malformed(reason) => LogError::MalformedBatch {
                segment,
                position,
                reason,
            },
        }
    }
}

/// A batch encoded by a producer, waiting for the writer to give it offsets and a timestamp.
#[derive(Debug, Clone)]
pub struct PendingBatch {
    bytes: Vec<u8>,
    record_count: u32,
}

impl PendingBatch {
    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// The encoded batch.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Fills in the base offset and timestamp, then the checksum over everything.
    pub(crate) fn seal(&mut self, base_offset: u64, timestamp_ms: i64) {
        let batch = &mut self.bytes[..];
        batch[16..24].copy_from_slice(&base_offset.to_le_bytes());
        batch[24..32].copy_from_slice(&timestamp_ms.to_le_bytes());
        batch[32..40].copy_from_slice(&timestamp_ms.to_le_bytes());
        let crc = batch_crc(batch);
        batch[4..8].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Encodes records into batches of at most [`BATCH_BYTES_MAX`] bytes, in order.
pub fn encode_batches(records: &[Record]) -> Result<Vec<PendingBatch>> {
    let mut batches = Vec::new();
    let mut current = new_batch_buffer();
    let mut count: u32 = 0;
    let mut record_buf = Vec::new();
    let mut total = 0usize;
    for record in records {
        check_record(record)?;
        record_buf.clear();
        encode_record_body(record, &mut record_buf);
        let needed = varint_len(record_buf.len() as u64) + record_buf.len();
        if count > 0 && current.len() + needed > BATCH_BYTES_MAX {
            batches.push(finish_batch(current, count));
            current = new_batch_buffer();
            count = 0;
        }
        put_varint(&mut current, record_buf.len() as u64);
        current.extend_from_slice(&record_buf);
        count += 1;
        total += needed;
        if total > APPEND_BYTES_MAX {
            return Err(LogError::AppendTooLarge {
                max: APPEND_BYTES_MAX,
            });
        }
    }
    if count > 0 {
        batches.push(finish_batch(current, count));
    }
    Ok(batches)
}

/// Checks a record against the size limits.
fn check_record(record: &Record) -> Result<()> {
    if record.payload_len() > RECORD_BYTES_MAX {
        return Err(LogError::RecordTooLarge {
            bytes: record.payload_len(),
            max: RECORD_BYTES_MAX,
        });
    }
    if record.headers.len() > RECORD_HEADERS_MAX {
        return Err(LogError::TooManyHeaders {
            count: record.headers.len(),
            max: RECORD_HEADERS_MAX,
        });
    }
    Ok(())
}

fn new_batch_buffer() -> Vec<u8> {
    let mut buf = Vec::with_capacity(BATCH_HEADER_BYTES + 256);
    buf.resize(BATCH_HEADER_BYTES, 0);
    buf
}

fn finish_batch(mut bytes: Vec<u8>, record_count: u32) -> PendingBatch {
    let length = u32::try_from(bytes.len()).expect("batches are cut at BATCH_BYTES_MAX < 4 GiB");
    bytes[0..4].copy_from_slice(&length.to_le_bytes());
    bytes[8] = FORMAT_VERSION;
    bytes[12..16].copy_from_slice(&record_count.to_le_bytes());
    PendingBatch {
        bytes,
        record_count,
    }
}

fn encode_record_body(record: &Record, out: &mut Vec<u8>) {
    put_varint(out, 0); // timestamp delta: every record of a v1 batch shares the append time
    match &record.key {
        None => put_varint(out, 0),
        Some(key) => {
            put_varint(out, key.len() as u64 + 1);
            out.extend_from_slice(key);
        }
    }
    put_varint(out, record.value.len() as u64);
    out.extend_from_slice(&record.value);
    put_varint(out, record.headers.len() as u64);
    for header in &record.headers {
        put_varint(out, header.key.len() as u64);
        out.extend_from_slice(header.key.as_bytes());
        match &header.value {
            None => put_varint(out, 0),
            Some(value) => {
                put_varint(out, value.len() as u64 + 1);
                out.extend_from_slice(value);
            }
        }
    }
}

/// The checksum of a batch: CRC32C over every byte except the checksum field itself.
pub fn batch_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&batch[0..4]), &batch[8..])
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Decodes and sanity-checks a batch header from the first [`BATCH_HEADER_BYTES`] of `buf`.
/// Does not check the CRC: a header is read first to learn how many bytes the batch needs.
pub fn parse_header(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    if buf.len() < BATCH_HEADER_BYTES {
        return Err(BatchError::Truncated {
            needed: BATCH_HEADER_BYTES,
            available: buf.len(),
        });
    }
    let header = BatchHeader {
        length: read_u32(buf, 0),
        crc: read_u32(buf, 4),
        record_count: read_u32(buf, 12),
        base_offset: read_u64(buf, 16),
        first_timestamp_ms: read_u64(buf, 24) as i64,
        last_timestamp_ms: read_u64(buf, 32) as i64,
    };
    let length = header.length as usize;
    if !(BATCH_HEADER_BYTES..=BATCH_BYTES_MAX).contains(&length) {
        return Err(BatchError::Malformed(format!(
            "batch length {length} is outside {BATCH_HEADER_BYTES}..={BATCH_BYTES_MAX}"
        )));
    }
    Ok(header)
}

/// Checks the parts of the header the CRC protects; called once the CRC has matched, so a
/// failure here means a writer bug or a newer format, not a torn write.
fn check_header_fields(buf: &[u8], header: &BatchHeader) -> Result<(), BatchError> {
    if buf[8] != FORMAT_VERSION {
        return Err(BatchError::Malformed(format!(
            "format version {} is not supported (this build reads version {FORMAT_VERSION})",
            buf[8]
        )));
    }
    if buf[9] != 0 || buf[10] != 0 || buf[11] != 0 {
        return Err(BatchError::Malformed(
            "reserved header bytes are not zero".into(),
        ));
    }
    if header.record_count == 0 {
        return Err(BatchError::Malformed("batch has no records".into()));
    }
    if header.last_timestamp_ms < header.first_timestamp_ms {
        return Err(BatchError::Malformed(
            "last timestamp is before first timestamp".into(),
        ));
    }
    if header
        .base_offset
        .checked_add(u64::from(header.record_count))
        .is_none()
    {
        return Err(BatchError::Malformed("offsets overflow".into()));
    }
    Ok(())
}

/// Decodes one whole batch from the start of `buf`, checking length, checksum and header.
/// Records are decoded lazily by [`RecordIter`].
pub fn decode_batch(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = parse_header(buf)?;
    let length = header.length as usize;
    if buf.len() < length {
        return Err(BatchError::Truncated {
            needed: length,
            available: buf.len(),
        });
    }
    let actual = batch_crc(&buf[..length]);
    if actual != header.crc {
        return Err(BatchError::Crc {
            expected: header.crc,
            actual,
        });
    }
    check_header_fields(buf, &header)?;
    Ok(header)
}

/// Walks every record of a decoded batch to prove the record section is well formed.
pub fn validate_records(batch: &[u8], header: &BatchHeader) -> Result<(), BatchError> {
    let mut iter = RecordIter::new(&batch[..header.length as usize], header, 0);
    for record in &mut iter {
        record?;
    }
    Ok(())
}

/// One record read from the log, borrowing the bytes of its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub headers: Headers<'a>,
}

/// The headers of a [`RecordRef`], already validated, decoded on iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers<'a> {
    raw: &'a [u8],
    count: usize,
}

impl<'a> Headers<'a> {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Each header as (key, value).
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> + 'a {
        let mut cursor = Cursor { buf: self.raw };
        // RecordIter validated every header before handing out this value, so parse errors
        // cannot occur here; map_while stops cleanly rather than panicking if one ever did.
        (0..self.count).map_while(move |_| cursor.header().ok())
    }

    /// Owned copies, for callers that outlive the batch.
    pub fn to_owned_headers(&self) -> Vec<Header> {
        self.iter()
            .map(|(k, v)| Header {
                key: k.to_owned(),
                value: v.map(Bytes::copy_from_slice),
            })
            .collect()
    }
}

/// Iterates the records of one batch, starting at the first record with offset ≥ `from`.
#[derive(Debug)]
pub struct RecordIter<'a> {
    cursor: Cursor<'a>,
    next_offset: u64,
    remaining: u32,
    first_timestamp_ms: i64,
    last_timestamp_ms: i64,
    skip_below: u64,
    failed: bool,
}

impl<'a> RecordIter<'a> {
    /// `batch` holds exactly one batch whose header is `header`.
    #[inline]
    pub fn new(batch: &'a [u8], header: &BatchHeader, skip_below: u64) -> RecordIter<'a> {
        RecordIter {
            cursor: Cursor {
                buf: &batch[BATCH_HEADER_BYTES.min(batch.len())..],
            },
            next_offset: header.base_offset,
            remaining: header.record_count,
            first_timestamp_ms: header.first_timestamp_ms,
            last_timestamp_ms: header.last_timestamp_ms,
            skip_below,
            failed: false,
        }
    }

    #[inline]
    fn decode_one(&mut self) -> Result<RecordRef<'a>, BatchError> {
        let body_len = self.cursor.varint()? as usize;
        let body = self.cursor.take(body_len)?;
        let mut c = Cursor { buf: body };
        let delta = c.varint()?;
        // v1 writers give every record of a batch the same timestamp: delta 0.
        let timestamp_ms = if delta == 0 {
            self.first_timestamp_ms
        } else {
            timestamp_after(self.first_timestamp_ms, self.last_timestamp_ms, delta)?
        };
        let key = match c.varint()? {
            0 => None,
            n => Some(c.take(n as usize - 1)?),
        };
        let value_len = c.varint()? as usize;
        let value = c.take(value_len)?;
        let header_count = c.varint()? as usize;
        let headers_raw = c.buf;
        if header_count > 0 {
            if header_count > RECORD_HEADERS_MAX {
                return Err(malformed(format!("{header_count} headers")));
            }
            for _ in 0..header_count {
                c.header()?;
            }
        }
        if !c.buf.is_empty() {
            return Err(malformed("record has trailing bytes".into()));
        }
        Ok(RecordRef {
            offset: self.next_offset,
            timestamp_ms,
            key,
            value,
            headers: Headers {
                raw: headers_raw,
                count: header_count,
            },
        })
    }
}

#[cold]
fn malformed(reason: String) -> BatchError {
    BatchError::Malformed(reason)
}

#[cold]
fn timestamp_after(first: i64, last: i64, delta: u64) -> Result<i64, BatchError> {
    i64::try_from(delta)
        .ok()
        .and_then(|d| first.checked_add(d))
        .filter(|t| *t <= last)
        .ok_or_else(|| malformed("record timestamp is past the batch's last".into()))
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<RecordRef<'a>, BatchError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.failed {
                return None;
            }
            if self.remaining == 0 {
                if !self.cursor.buf.is_empty() {
                    self.failed = true;
                    return Some(Err(BatchError::Malformed(
                        "bytes after the batch's last record".into(),
                    )));
                }
                return None;
            }
            match self.decode_one() {
                Ok(record) => {
                    self.remaining -= 1;
                    self.next_offset += 1;
                    if record.offset >= self.skip_below {
                        return Some(Ok(record));
                    }
                }
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    #[inline(always)]
    fn varint(&mut self) -> Result<u64, BatchError> {
        if let Some((&b, rest)) = self.buf.split_first()
            && b < 0x80
        {
            self.buf = rest;
            return Ok(u64::from(b));
        }
        self.varint_long()
    }

    fn varint_long(&mut self) -> Result<u64, BatchError> {
        let mut value: u64 = 0;
        for (i, &b) in self.buf.iter().enumerate().take(10) {
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                self.buf = &self.buf[i + 1..];
                return Ok(value);
            }
        }
        Err(malformed("unterminated varint".into()))
    }

    #[inline(always)]
    fn take(&mut self, n: usize) -> Result<&'a [u8], BatchError> {
        match self.buf.split_at_checked(n) {
            Some((head, tail)) => {
                self.buf = tail;
                Ok(head)
            }
            None => Err(past_the_end(n, self.buf.len())),
        }
    }

    fn header(&mut self) -> Result<(&'a str, Option<&'a [u8]>), BatchError> {
        let key_len = self.varint()? as usize;
        let key = std::str::from_utf8(self.take(key_len)?)
            .map_err(|_| BatchError::Malformed("header key is not UTF-8".into()))?;
        let value = match self.varint()? {
            0 => None,
            n => Some(self.take(n as usize - 1)?),
        };
        Ok((key, value))
    }
}

#[cold]
fn past_the_end(n: usize, left: usize) -> BatchError {
    malformed(format!(
        "field of {n} bytes runs past the end of its record ({left} left)"
    ))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sealed(records: &[Record], base: u64, ts: i64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut offset = base;
        for mut batch in encode_batches(records).unwrap() {
            batch.seal(offset, ts);
            out.extend_from_slice(batch.bytes());
            offset += u64::from(batch.record_count());
        }
        out
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        (
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::vec(
                (
                    "[a-z]{0,8}",
                    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
                ),
                0..3,
            ),
        )
            .prop_map(|(key, value, headers)| Record {
                key: key.map(Bytes::from),
                value: Bytes::from(value),
                headers: headers
                    .into_iter()
                    .map(|(k, v)| Header {
                        key: k,
                        value: v.map(Bytes::from),
                    })
                    .collect(),
            })
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<(u64, i64, Record)>, BatchError> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            let header = decode_batch(&bytes[pos..])?;
            let batch = &bytes[pos..pos + header.length as usize];
            for r in RecordIter::new(batch, &header, 0) {
                let r = r?;
                out.push((
                    r.offset,
                    r.timestamp_ms,
                    Record {
                        key: r.key.map(Bytes::copy_from_slice),
                        value: Bytes::copy_from_slice(r.value),
                        headers: r.headers.to_owned_headers(),
                    },
                ));
            }
            pos += header.length as usize;
        }
        Ok(out)
    }

    proptest! {
        #[test]
        fn round_trip(records in proptest::collection::vec(arb_record(), 1..20), base in 0u64..1<<40, ts in 0i64..1<<45) {
            let bytes = sealed(&records, base, ts);
            let decoded = decode_all(&bytes).unwrap();
            prop_assert_eq!(decoded.len(), records.len());
            for (i, (offset, timestamp, record)) in decoded.into_iter().enumerate() {
                prop_assert_eq!(offset, base + i as u64);
                prop_assert_eq!(timestamp, ts);
                prop_assert_eq!(&record, &records[i]);
            }
        }

        #[test]
        fn any_byte_flip_is_detected(records in proptest::collection::vec(arb_record(), 1..5), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = sealed(&records, 7, 1_700_000_000_000);
            let header = decode_batch(&bytes).unwrap();
            let len = header.length as usize;
            let i = at.index(len);
            bytes[i] ^= 1 << bit;
            prop_assert!(decode_batch(&bytes[..len]).is_err(), "flip of bit {} at byte {} went unnoticed", bit, i);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_all(&bytes);
            if let Ok(header) = parse_header(&bytes) {
                let end = (header.length as usize).min(bytes.len());
                let _ = RecordIter::new(&bytes[..end], &header, 0).count();
            }
        }
    }

    #[test]
    fn varint_lengths_match_encoding() {
        for v in [
            0u64,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "{v}");
            assert_eq!(Cursor { buf: &buf }.varint().unwrap(), v);
        }
    }

    #[test]
    fn truncated_batch_is_reported_as_truncated() {
        let bytes = sealed(&[Record::from_value("hello")], 0, 1);
        for cut in 0..bytes.len() {
            match decode_batch(&bytes[..cut]) {
                Err(BatchError::Truncated { .. }) => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn large_inputs_split_into_several_batches() {
        let value = Bytes::from(vec![b'x'; 1024 * 1024]);
        let records: Vec<Record> = (0..100)
            .map(|_| Record::from_value(value.clone()))
            .collect();
        let batches = encode_batches(&records).unwrap();
        assert!(batches.len() >= 2);
        assert!(batches.iter().all(|b| b.len() <= BATCH_BYTES_MAX));
        assert_eq!(batches.iter().map(|b| b.record_count()).sum::<u32>(), 100);
    }
}
