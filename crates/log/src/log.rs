//! The log: a directory of topics.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::clock::{Clock, SystemClock};
use crate::config::{TopicConfig, validate_topic_name};
use crate::error::IoContext;
use crate::limits::{READ_CHUNK_BYTES_DEFAULT, RETENTION_CHECK_INTERVAL_MS_DEFAULT};
use crate::partition::Partition;
use crate::recovery::RecoveryEvent;
use crate::shared::PartitionOptions;
use crate::storage::{OsStorage, Storage, create_dir_durable, read_file, write_file_atomic};
use crate::topic::Topic;
use crate::{LogError, Result};

const TOPIC_FILE: &str = "topic.json";
const LOCK_FILE: &str = "LOCK";
const TOPIC_FORMAT_VERSION: u32 = 1;

/// How a log is opened.
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub storage: Arc<dyn Storage>,
    pub clock: Arc<dyn Clock>,
    pub retention_check_interval_ms: u64,
    /// Size of one sequential read when looking up timestamps.
    pub read_chunk_bytes: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            storage: Arc::new(OsStorage),
            clock: Arc::new(SystemClock),
            retention_check_interval_ms: RETENTION_CHECK_INTERVAL_MS_DEFAULT,
            read_chunk_bytes: READ_CHUNK_BYTES_DEFAULT,
        }
    }
}

impl From<&LogOptions> for PartitionOptions {
    fn from(options: &LogOptions) -> Self {
        PartitionOptions {
            storage: options.storage.clone(),
            clock: options.clock.clone(),
            retention_check_interval_ms: options.retention_check_interval_ms,
            read_chunk_bytes: options.read_chunk_bytes,
        }
    }
}

/// What `topic.json` holds.
#[derive(Debug, Serialize, Deserialize)]
struct TopicFile {
    format_version: u32,
    name: String,
    created_ms: i64,
    config: TopicConfig,
}

/// The embedded log: every topic under one directory, which one process owns at a time.
#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    options: LogOptions,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serializes topic creation so two creators of one name cannot race.
    create_lock: Mutex<()>,
    recovery_events: Vec<RecoveryEvent>,
    /// Held for the log's lifetime: a second process opening the directory fails fast.
    _dir_lock: Box<dyn Send + Sync + Debug>,
}

impl Log {
    /// Opens (or creates) the log in `dir` on the real file system.
    pub fn open(dir: impl AsRef<Path>) -> Result<Log> {
        Log::open_with(dir, LogOptions::default())
    }

    /// Opens (or creates) the log in `dir`, recovering every partition.
    pub fn open_with(dir: impl AsRef<Path>, options: LogOptions) -> Result<Log> {
        let dir = dir.as_ref().to_path_buf();
        let storage = options.storage.clone();
        create_dir_durable(storage.as_ref(), &dir).io("create log directory", &dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let dir_lock = match storage.lock_exclusive(&lock_path) {
            Ok(lock) => lock,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(LogError::Locked { path: dir });
            }
            Err(e) => return Err(e).io("lock log directory", &lock_path),
        };
        let partition_options = PartitionOptions::from(&options);
        let mut events = Vec::new();
        let mut topics = BTreeMap::new();
        let mut names = storage.list_dir(&dir).io("list log directory", &dir)?;
        names.sort();
        for name in names {
            let topic_dir = dir.join(&name);
            if !storage.is_dir(&topic_dir) {
                continue;
            }
            if validate_topic_name(&name).is_err() {
                tracing::warn!(path = %topic_dir.display(), "directory is not a topic; left alone");
                continue;
            }
            let topic_file = topic_dir.join(TOPIC_FILE);
            let bytes = match read_file(storage.as_ref(), &topic_file) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // Creation writes topic.json last; without it the topic never existed.
                    storage
                        .remove_dir_all(&topic_dir)
                        .io("remove incomplete topic", &topic_dir)?;
                    tracing::info!(path = %topic_dir.display(), "removed incompletely created topic");
                    events.push(RecoveryEvent::RemovedLeftover { path: topic_dir });
                    continue;
                }
                Err(e) => return Err(e).io("read topic file", &topic_file),
            };
            let file: TopicFile =
                serde_json::from_slice(&bytes).map_err(|e| LogError::InvalidConfig {
                    reason: format!("`{}`: {e}", topic_file.display()),
                })?;
            if file.format_version != TOPIC_FORMAT_VERSION {
                return Err(LogError::InvalidConfig {
                    reason: format!(
                        "`{}` has format version {}, this build reads {TOPIC_FORMAT_VERSION}",
                        topic_file.display(),
                        file.format_version
                    ),
                });
            }
            let topic = open_topic(
                &name,
                &topic_dir,
                file.config,
                &partition_options,
                &mut events,
            )?;
            topics.insert(name, Arc::new(topic));
        }
        Ok(Log {
            dir,
            options,
            topics: RwLock::new(topics),
            create_lock: Mutex::new(()),
            recovery_events: events,
            _dir_lock: dir_lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What recovery changed when this log was opened.
    pub fn recovery_events(&self) -> &[RecoveryEvent] {
        &self.recovery_events
    }

    fn topics_read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Topic>>> {
        // Only whole-map inserts happen under the write lock; the map is sound after a panic.
        self.topics
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Creates a topic with its partitions. The topic exists once its `topic.json` is durable.
    pub fn create_topic(&self, name: &str, config: TopicConfig) -> Result<Arc<Topic>> {
        validate_topic_name(name)?;
        config.validate()?;
        let _guard = self
            .create_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.topics_read().contains_key(name) {
            return Err(LogError::TopicExists {
                name: name.to_owned(),
            });
        }
        let storage = self.options.storage.as_ref();
        let topic_dir = self.dir.join(name);
        if storage.is_dir(&topic_dir) {
            storage
                .remove_dir_all(&topic_dir)
                .io("remove leftover topic directory", &topic_dir)?;
        }
        storage
            .create_dir_all(&topic_dir)
            .io("create topic directory", &topic_dir)?;
        for p in 0..config.partitions {
            Partition::create(storage, &topic_dir.join(p.to_string()))?;
        }
        storage
            .sync_dir(&topic_dir)
            .io("sync topic directory", &topic_dir)?;
        let file = TopicFile {
            format_version: TOPIC_FORMAT_VERSION,
            name: name.to_owned(),
            created_ms: self.options.clock.now_ms(),
            config: config.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| LogError::InvalidConfig {
            reason: e.to_string(),
        })?;
        write_file_atomic(storage, &topic_dir.join(TOPIC_FILE), &bytes)
            .io("write topic file", &topic_dir)?;
        storage
            .sync_dir(&self.dir)
            .io("sync log directory", &self.dir)?;
        let mut events = Vec::new();
        let options = PartitionOptions::from(&self.options);
        let topic = Arc::new(open_topic(name, &topic_dir, config, &options, &mut events)?);
        self.topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_owned(), topic.clone());
        tracing::info!(
            topic = name,
            partitions = topic.partition_count(),
            "created topic"
        );
        Ok(topic)
    }

    /// The topic named `name`, or an error listing the topics there are.
    pub fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        let topics = self.topics_read();
        topics
            .get(name)
            .cloned()
            .ok_or_else(|| LogError::UnknownTopic {
                name: name.to_owned(),
                known: topics.keys().cloned().collect(),
            })
    }

    /// Every topic, by name.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.topics_read().values().cloned().collect()
    }

    /// Flushes every partition, writes indexes and checkpoints, and stops the writers. Appends
    /// after this fail with [`LogError::Closed`].
    pub fn close(&self) -> Result<()> {
        let mut first_error = None;
        for topic in self.topics() {
            if let Err(e) = topic.close() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "closing the log");
        }
    }
}

fn open_topic(
    name: &str,
    dir: &Path,
    config: TopicConfig,
    options: &PartitionOptions,
    events: &mut Vec<RecoveryEvent>,
) -> Result<Topic> {
    let partitions = (0..config.partitions)
        .map(|p| {
            Partition::open(
                name,
                p,
                dir.join(p.to_string()),
                config.clone(),
                options,
                events,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Topic::new(name.to_owned(), config, partitions))
}
