//! kappa's embedded infinite log: the source of truth every pipeline replays.
//!
//! A [`Log`] is a directory of topics; a [`Topic`] has a fixed number of partitions; a
//! [`Partition`] is an append-only sequence of records with dense offsets from 0, stored as
//! segment files of checksummed record batches with a sparse offset index and a time index.
//! The payload is bytes: this crate knows nothing of JSON, Arrow, SQL or Iceberg.
//!
//! ```text
//! Log ─┬─ Topic "orders" ─┬─ Partition 0 ─┬─ 00000000000000000000.log  (+ .index, .timeindex)
//!      │                  │               ├─ 00000000000000052133.log  (active segment)
//!      │                  │               └─ recovery-checkpoint
//!      │                  └─ Partition 1 ─ …
//!      └─ Topic "payments" ─ …
//! ```
//!
//! Appends are acknowledged once durable (group commit: concurrent appends share one fsync);
//! readers see only acknowledged records and can follow the tail.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use kappa_log::{Log, Record, StartAt, TopicConfig};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let log = Log::open(dir.path()).unwrap();
//! let orders = log.create_topic("orders", TopicConfig::default()).unwrap();
//! let placed = orders.append(vec![Record::keyed("c1", r#"{"id":1}"#)]).await.unwrap();
//! assert_eq!(placed[0].offset, 0);
//!
//! let mut reader = orders.partition(0).unwrap().reader(StartAt::Beginning).unwrap();
//! let chunk = reader.read(1 << 20).unwrap().unwrap();
//! let record = chunk.records().next().unwrap().unwrap();
//! assert_eq!(record.value, br#"{"id":1}"#);
//! # });
//! ```

mod batch;
mod checkpoint;
mod clock;
mod config;
mod error;
mod index;
pub mod limits;
mod log;
mod partition;
mod reader;
mod recovery;
mod segment;
mod shared;
mod storage;
mod topic;
mod writer;

pub use batch::{BatchHeader, Header, Headers, Record, RecordRef};
pub use clock::{Clock, SystemClock};
pub use config::{FsyncPolicy, TopicConfig, validate_topic_name};
pub use error::{LogError, Result};
pub use log::{Log, LogOptions};
pub use partition::{AppendAck, Partition, PartitionOffsets, PartitionStats};
pub use reader::{ChunkRecords, PartitionReader, RecordChunk, StartAt};
pub use recovery::RecoveryEvent;
pub use storage::{OpenMode, OsStorage, Storage, StorageFile};
pub use topic::{RecordPosition, Topic, murmur2};

/// Tools for tests and diagnostics: rebuilding an index from its segment, the batch codec.
pub mod inspect {
    pub use crate::batch::{
        BATCH_HEADER_BYTES, BatchError, FORMAT_VERSION, PendingBatch, RecordIter, batch_crc,
        decode_batch, encode_batches, parse_header,
    };
    pub use crate::index::{IndexEntry, IndexKind, decode_index_files, encode_index};
    pub use crate::segment::rebuild_index_files;
}
