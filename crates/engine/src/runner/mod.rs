//! Runs one model continuously: reads its sources from the committed positions, decodes,
//! computes, and commits the result to its Iceberg table together with the positions it covers
//! — so a restart at any moment resumes exactly where the last commit ended (exactly once).
//!
//! ```text
//!   log partitions ──read from committed offsets──► decode ──► model ──► Iceberg append
//!          ▲                     │ rejects                             snapshot summary:
//!          │                     └──► dead_letters topic               kappa.offsets = {topic: {p: next}}
//!          └──────────── after a crash: the table says where to resume ─┘
//! ```
//!
//! - `run` and `commit`: the loop, written once over [`crate::source::Source`]s and one
//!   [`crate::operator::Operator`] (recover → read → compute → commit → pace);
//! - `ready`: what a model reads and computes with, planned over its topics or its
//!   upstream's published table, and the table it writes;
//! - `wap`: the audit of each commit (Write-Audit-Publish) and the quarantine table;
//! - `waiting`: models waiting for a quarantined or failing upstream;
//! - `letters`: the dead-letter topic;
//! - `error`: why a model cannot run.

mod commit;
mod error;
mod letters;
mod ready;
mod run;
mod waiting;
mod wap;

pub use crate::commit_record::{
    ATTEMPT_PROPERTY, DEAD_LETTERS_PROPERTY, EXPECTATIONS_PROPERTY, OFFSETS_PROPERTY, Offsets,
    QUARANTINE_FROM_PROPERTY, QUARANTINE_PROPERTY, VERSION_PROPERTY, offset_keys,
};
pub use crate::tables::{
    VERSIONS_NAMESPACE, live_table, model_version, quarantine_table, version_table, written_table,
};
pub use error::RunnerError;
pub use letters::{DEAD_LETTER_TOPIC, dead_letter_topic, each_letter, rejects_reporter};
pub(crate) use run::{BronzeCopy, run_bronze_table};
pub use run::{
    COMMIT_RECORDS_MAX, GROUPED_COMMIT_RECORDS_MAX, LIVE_COMMIT_INTERVAL_MS,
    PROGRESS_COMMIT_INTERVAL_MS, run_model, run_version,
};
pub use waiting::{FAILING, block_failing, blocked_upstream, recovered, waits_for};
pub use wap::{awaits_decision, what_failed};
