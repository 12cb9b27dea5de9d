//! Storage wrappers for tests: count fsyncs, inject failures.

use std::fmt::Debug;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kappa_log::{OpenMode, OsStorage, Storage, StorageFile};

/// The real file system, counting fsyncs of data and failing on demand.
#[derive(Debug, Default, Clone)]
pub struct InstrumentedStorage {
    inner: OsStorage,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    data_syncs: AtomicU64,
    writes: AtomicU64,
    fail_writes: AtomicBool,
    fail_syncs: AtomicBool,
}

impl InstrumentedStorage {
    pub fn new() -> InstrumentedStorage {
        InstrumentedStorage::default()
    }

    /// fsyncs of file data (directories not counted) since creation.
    pub fn data_syncs(&self) -> u64 {
        self.counters.data_syncs.load(Ordering::SeqCst)
    }

    /// Positional writes since creation.
    pub fn writes(&self) -> u64 {
        self.counters.writes.load(Ordering::SeqCst)
    }

    /// From now on, every write fails with EIO (or succeeds again when `false`).
    pub fn fail_writes(&self, fail: bool) {
        self.counters.fail_writes.store(fail, Ordering::SeqCst);
    }

    /// From now on, every fsync of file data fails with EIO.
    pub fn fail_syncs(&self, fail: bool) {
        self.counters.fail_syncs.store(fail, Ordering::SeqCst);
    }
}

fn eio() -> io::Error {
    io::Error::other("injected EIO")
}

impl Storage for InstrumentedStorage {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.create_dir_all(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        self.inner.list_dir(path)
    }
    fn is_dir(&self, path: &Path) -> bool {
        self.inner.is_dir(path)
    }
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
        let inner = self.inner.open(path, mode)?;
        Ok(Arc::new(InstrumentedFile {
            inner,
            counters: self.counters.clone(),
        }))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_dir_all(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.sync_dir(path)
    }
    fn lock_exclusive(&self, path: &Path) -> io::Result<Box<dyn Send + Sync + Debug>> {
        self.inner.lock_exclusive(path)
    }
}

#[derive(Debug)]
struct InstrumentedFile {
    inner: Arc<dyn StorageFile>,
    counters: Arc<Counters>,
}

impl StorageFile for InstrumentedFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.counters.fail_writes.load(Ordering::SeqCst) {
            return Err(eio());
        }
        self.counters.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        if self.counters.fail_syncs.load(Ordering::SeqCst) {
            return Err(eio());
        }
        self.counters.data_syncs.fetch_add(1, Ordering::SeqCst);
        self.inner.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}
