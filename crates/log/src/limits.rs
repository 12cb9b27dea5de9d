//! Every limit of the log, named in one place.

/// Longest topic name, in bytes (the same bound Kafka uses, so names move between backends).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;

/// Most partitions a topic may have; each partition owns one writer thread.
pub const PARTITIONS_MAX: u32 = 1024;

/// Largest encoded batch. A batch's length field is a `u32`; this keeps a corrupt length from
/// asking a reader for gigabytes.
pub const BATCH_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Largest single record (key + value + headers), like Kafka's `message.max.bytes` but roomier.
pub const RECORD_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Largest single append (all its batches). Segments roll only between appends, so this bounds
/// how far a segment can grow past its configured size, and keeps positions within `u32`.
pub const APPEND_BYTES_MAX: usize = 1024 * 1024 * 1024;

/// Most headers on one record.
pub const RECORD_HEADERS_MAX: usize = 1024;

/// A group commit stops collecting queued appends once it holds this many bytes.
pub const GROUP_COMMIT_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Appends queued to one partition's writer before producers wait (back-pressure).
pub const APPEND_QUEUE_LEN: usize = 1024;

/// Default size of one sequential read of history.
pub const READ_CHUNK_BYTES_DEFAULT: usize = 1024 * 1024;

/// A replaying reader's helper keeps the OS reading up to this far ahead of it.
pub const READAHEAD_WINDOW_BYTES: u64 = 16 * 1024 * 1024;

/// The helper asks for this much at a time.
pub const READAHEAD_STEP_BYTES: u64 = 2 * 1024 * 1024;

/// Default segment size before it rolls.
pub const SEGMENT_BYTES_MAX_DEFAULT: u64 = 128 * 1024 * 1024;

/// A segment's positions are `u32` in the index, so no segment may grow past this.
pub const SEGMENT_BYTES_LIMIT: u64 = 2 * 1024 * 1024 * 1024 - 1;

/// Smallest configurable segment size (tests use tiny segments to exercise rolls).
pub const SEGMENT_BYTES_MIN: u64 = 1024;

/// Default segment age before it rolls (7 days).
pub const SEGMENT_MS_MAX_DEFAULT: u64 = 7 * 24 * 3600 * 1000;

/// Default distance in bytes between two sparse index entries.
pub const INDEX_INTERVAL_BYTES_DEFAULT: u32 = 4096;

/// How often the writer thread wakes when idle, to run time-based work (interval fsync,
/// retention).
pub const WRITER_TICK_MS: u64 = 100;

/// How often retention runs, in milliseconds.
pub const RETENTION_CHECK_INTERVAL_MS_DEFAULT: u64 = 60_000;

/// The recovery checkpoint is written after every fsync of data but itself fsynced at most this
/// often: it bounds how much acknowledged data a later bit flip could make look like a torn tail.
pub const CHECKPOINT_SYNC_INTERVAL_MS: u64 = 1000;
