//! Every way a model reads history is a [`Source`] behind the one runner loop
//! (`runner::run_version`): today a topic of the log ([`crate::topic_source::TopicSource`]:
//! JSON decoded to Arrow, late records set aside at the source) and an upstream model's table
//! as `main` published it ([`crate::upstream::TableSource`]: its commits in order, Parquet);
//! next a Kafka cluster and the cold tier.
//!
//! ```text
//!   source ──read(max)──► Taken { rows, rejects, watermark } ──► dedup / join ──► model ──► commit
//!     ▲                                                                                    │
//!     └──rewind(committed)── kappa.offsets {key: {partition: next}} in the same snapshot ◄──┘
//! ```
//!
//! A source's position is a map partition → next position under its own key in
//! `kappa.offsets`, committed in the snapshot that holds the rows computed from what it covers:
//! a restart rewinds every source to what the table says, which is exactly once.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use arrow::array::RecordBatch;

use crate::commit_record::Offsets;
use crate::decode::Rejected;

/// What one read of a source gives the runner.
#[derive(Debug)]
pub(crate) struct Taken {
    /// The rows that go on, in the source's schema (what is not late and fits).
    pub batch: RecordBatch,
    /// Records read that this model reports to the dead-letter topic.
    pub rejected: Vec<Rejected>,
    /// The source's event-time watermark after this read, if it has one.
    pub watermark: Option<i64>,
    /// Input records read: what a commit's size, the rates and the lag count.
    pub records: usize,
    /// Whether the read took all it was allowed (far behind: more is waiting).
    pub full: bool,
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SourceError {
    /// A read or decode failed after the position moved: the runner goes back to its last
    /// commit and tries again.
    #[error("{0}")]
    Read(String),
    /// What the source reads could not be reached; the position did not move, so the same
    /// read can simply be tried again.
    #[error("{0}")]
    Unavailable(String),
    /// What the source reads no longer continues from the committed position (an upstream
    /// table rebuilt or merged across it): the model is rebuilt from the source's start.
    #[error("{0}")]
    Restart(String),
}

/// How the runner waits for a source to have more.
#[derive(Debug)]
pub(crate) enum Waiter {
    /// The partitions' visible offsets to watch, each with the reader's next offset.
    Watch(Vec<(tokio::sync::watch::Receiver<u64>, u64)>),
    /// Nothing to watch: look again after this long.
    Poll(Duration),
}

/// One input of a model, read from a committed position.
#[async_trait::async_trait]
pub(crate) trait Source: Send + Sync {
    /// The key of its position in `kappa.offsets` (a topic's name, `table:<layer>.<name>`).
    fn key(&self) -> &str;

    /// What its dead letters name as their `topic`: the topic, or the model whose table it
    /// reads.
    fn letters_name(&self) -> &str {
        self.key()
    }

    /// Goes back to the position `committed` records under [`Source::key`] (its start when
    /// there is none).
    fn rewind(&mut self, committed: &Offsets) -> Result<(), SourceError>;

    /// Reads about `max` records from the position, which moves past them.
    async fn read(&mut self, max: usize) -> Result<Taken, SourceError>;

    /// The position after what was read: partition → next position.
    fn position(&self) -> BTreeMap<u32, u64>;

    /// Its event-time progress as the last commit saved it (under `kappa.watermarks`).
    fn load_marks(&mut self, _saved: Option<&serde_json::Value>) -> Result<(), String> {
        Ok(())
    }

    /// Its event-time progress, to be saved with the commit.
    fn save_marks(&self) -> Option<serde_json::Value> {
        None
    }

    /// Takes what the table's last commit (`properties`) recorded for this source.
    fn restore(&mut self, _properties: Option<&HashMap<String, String>>) {}

    /// What the source records in each commit beside its position.
    fn properties(&self, _into: &mut HashMap<String, String>) {}

    /// The commit recording `committed` landed (or the runner starts from it).
    fn landed(&mut self, _committed: &Offsets) {}

    /// How to wait for more.
    fn waiter(&self) -> Waiter;
}

/// Waits until a source has something past its position, for at most a second.
pub(crate) async fn wait_for_more(
    sources: &[Box<dyn Source>],
    stop: &mut tokio::sync::watch::Receiver<bool>,
    settle: Duration,
) {
    use futures::FutureExt as _;

    let mut watchers = Vec::new();
    let mut poll = Duration::from_secs(1);
    for source in sources {
        match source.waiter() {
            Waiter::Watch(partitions) => {
                for (watcher, next) in partitions {
                    if *watcher.borrow() > next {
                        return;
                    }
                    watchers.push(watcher);
                }
            }
            Waiter::Poll(every) => poll = poll.min(every),
        }
    }
    let changes = async {
        if watchers.is_empty() {
            std::future::pending::<()>().await;
        }
        let _ = futures::future::select_all(watchers.iter_mut().map(|w| w.changed().boxed())).await;
    };
    tokio::select! {
        () = changes => tokio::time::sleep(settle).await,
        _ = stop.changed() => {}
        () = tokio::time::sleep(poll) => {}
    }
}
