use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the log, named after what it means to the user.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{action} `{}`: {source}", path.display())]
    Io {
        /// What the log was doing, as a verb phrase ("open segment").
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("invalid topic name {name:?}: {reason}")]
    InvalidTopicName { name: String, reason: String },

    #[error("unknown topic `{name}`; topics are: {}", list_or_none(known))]
    UnknownTopic { name: String, known: Vec<String> },

    #[error("topic `{name}` already exists")]
    TopicExists { name: String },

    #[error("topic `{topic}` has no partition {partition}; it has partitions 0..{partitions}")]
    UnknownPartition {
        topic: String,
        partition: u32,
        partitions: u32,
    },

    #[error("invalid topic configuration: {reason}")]
    InvalidConfig { reason: String },

    #[error(
        "corrupt batch in segment `{}` at byte {position}: stored CRC32C {expected_crc:#010x}, \
         computed {actual_crc:#010x}; this data was durable, so it is not truncated",
        segment.display()
    )]
    CorruptBatch {
        segment: PathBuf,
        position: u64,
        expected_crc: u32,
        actual_crc: u32,
    },

    #[error("malformed batch in segment `{}` at byte {position}: {reason}", segment.display())]
    MalformedBatch {
        segment: PathBuf,
        position: u64,
        reason: String,
    },

    #[error(
        "segment `{}` holds {file_bytes} bytes but {durable_position} bytes were durable; \
         durable data is missing",
        segment.display()
    )]
    DurableDataMissing {
        segment: PathBuf,
        durable_position: u64,
        file_bytes: u64,
    },

    #[error(
        "recovery checkpoint `{}` is unreadable (both slots fail their CRC); delete it to make \
         the next open validate every segment",
        path.display()
    )]
    CorruptCheckpoint { path: PathBuf },

    #[error(
        "offset {requested} is out of range for {topic}/{partition}: records are kept from \
         offset {start_offset} to {visible_offset}"
    )]
    OffsetOutOfRange {
        topic: String,
        partition: u32,
        requested: u64,
        start_offset: u64,
        visible_offset: u64,
    },

    #[error("record of {bytes} bytes is over the limit of {max} bytes")]
    RecordTooLarge { bytes: usize, max: usize },

    #[error("an append of more than {max} bytes is not accepted; split it")]
    AppendTooLarge { max: usize },

    #[error("record has {count} headers, over the limit of {max}")]
    TooManyHeaders { count: usize, max: usize },

    #[error("data directory `{}` is in use by another process", path.display())]
    Locked { path: PathBuf },

    #[error(
        "partition {topic}/{partition} stopped accepting appends after a storage error: \
         {reason}; restart to recover"
    )]
    WriterFailed {
        topic: String,
        partition: u32,
        reason: String,
    },

    #[error("the log is closed")]
    Closed,
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "(none)".to_owned()
    } else {
        names.join(", ")
    }
}

pub type Result<T, E = LogError> = std::result::Result<T, E>;

/// Attaches a verb phrase and a path to an I/O error.
pub(crate) trait IoContext<T> {
    fn io(self, action: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn io(self, action: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| LogError::Io {
            action,
            path: path.to_path_buf(),
            source,
        })
    }
}
