//! An in-memory file system that models what a power loss keeps.
//!
//! Every file has its *durable* bytes (as of its last fsync) and its *volatile* bytes (what
//! reads see). Directory entries likewise become durable only when their directory is synced.
//! [`SimStorage::power_loss`] returns the state a machine would come back with: the durable
//! bytes, plus a random prefix of the writes made since the last fsync, the last of them torn
//! at a random byte — never anything that was not written.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use kappa_log::{OpenMode, Storage, StorageFile};

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Clone, Default)]
struct Inode {
    volatile: Vec<u8>,
    durable: Vec<u8>,
    /// Changes since the last fsync, in order.
    pending: Vec<Op>,
}

fn apply(data: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, bytes } => {
            let start = *offset as usize;
            if data.len() < start + bytes.len() {
                data.resize(start + bytes.len(), 0);
            }
            data[start..start + bytes.len()].copy_from_slice(bytes);
        }
        Op::SetLen(len) => data.resize(*len as usize, 0),
    }
}

#[derive(Debug, Default)]
struct Fs {
    inodes: HashMap<u64, Inode>,
    /// What directory listings show now.
    names: BTreeMap<PathBuf, u64>,
    /// What survives a power loss.
    durable_names: BTreeMap<PathBuf, u64>,
    /// Directories that exist now, and those whose entry in their parent was synced.
    dirs: BTreeSet<PathBuf>,
    durable_dirs: BTreeSet<PathBuf>,
    next_inode: u64,
    locked: BTreeSet<PathBuf>,
}

/// The simulated file system; clones share it.
#[derive(Debug, Clone, Default)]
pub struct SimStorage {
    fs: Arc<Mutex<Fs>>,
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

impl SimStorage {
    pub fn new() -> SimStorage {
        SimStorage::default()
    }

    fn lock(&self) -> MutexGuard<'_, Fs> {
        self.fs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The machine as it comes back after a power loss now, as a new, independent file system.
    /// `seed` picks how much of each file's unsynced writes reached the disk.
    pub fn power_loss(&self, seed: u64) -> SimStorage {
        let fs = self.lock();
        // splitmix64 of the seed: distinct seeds give distinct, never-zero xorshift states.
        let mut rng = {
            let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) | 1
        };
        let mut next = move || {
            // xorshift64*: enough randomness for choosing cut points, reproducible from the seed.
            rng ^= rng >> 12;
            rng ^= rng << 25;
            rng ^= rng >> 27;
            rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut inodes = HashMap::new();
        for (id, inode) in &fs.inodes {
            let mut data = inode.durable.clone();
            let kept = (next() % (inode.pending.len() as u64 + 1)) as usize;
            for (i, op) in inode.pending.iter().take(kept).enumerate() {
                match op {
                    Op::Write { offset, bytes } if i + 1 == kept && !bytes.is_empty() => {
                        let torn = (next() % (bytes.len() as u64 + 1)) as usize;
                        apply(
                            &mut data,
                            &Op::Write {
                                offset: *offset,
                                bytes: bytes[..torn].to_vec(),
                            },
                        );
                    }
                    op => apply(&mut data, op),
                }
            }
            inodes.insert(
                *id,
                Inode {
                    volatile: data.clone(),
                    durable: data,
                    pending: Vec::new(),
                },
            );
        }
        // A directory survives when its entry, and every ancestor's, was synced; so do the
        // files in it whose entries were synced.
        let reachable = |dir: &Path| {
            dir.ancestors().all(|a| {
                a.parent().is_none() || a.as_os_str().is_empty() || fs.durable_dirs.contains(a)
            })
        };
        let dirs: BTreeSet<PathBuf> = fs
            .durable_dirs
            .iter()
            .filter(|d| reachable(d))
            .cloned()
            .collect();
        let names: BTreeMap<PathBuf, u64> = fs
            .durable_names
            .iter()
            .filter(|(p, _)| {
                p.parent()
                    .is_some_and(|d| d.parent().is_none() || dirs.contains(d))
            })
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        let after = Fs {
            inodes,
            names: names.clone(),
            durable_names: names,
            durable_dirs: dirs.clone(),
            dirs,
            next_inode: fs.next_inode,
            locked: BTreeSet::new(),
        };
        SimStorage {
            fs: Arc::new(Mutex::new(after)),
        }
    }
}

impl SimStorage {
    /// The machine as it is after the process dies but the OS keeps running (kill -9): every
    /// write reached the OS, nothing more is durable than before. A new, independent copy.
    pub fn process_crash(&self) -> SimStorage {
        let fs = self.lock();
        let copy = Fs {
            inodes: fs.inodes.clone(),
            names: fs.names.clone(),
            durable_names: fs.durable_names.clone(),
            dirs: fs.dirs.clone(),
            durable_dirs: fs.durable_dirs.clone(),
            next_inode: fs.next_inode,
            locked: BTreeSet::new(),
        };
        SimStorage {
            fs: Arc::new(Mutex::new(copy)),
        }
    }
}

impl Storage for SimStorage {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.lock();
        for ancestor in path.ancestors() {
            if !ancestor.as_os_str().is_empty() {
                fs.dirs.insert(ancestor.to_path_buf());
            }
        }
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let fs = self.lock();
        if !fs.dirs.contains(path) {
            return Err(not_found(path));
        }
        let files = fs.names.keys().filter(|p| p.parent() == Some(path));
        let dirs = fs.dirs.iter().filter(|p| p.parent() == Some(path));
        Ok(files
            .chain(dirs)
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect())
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.lock().dirs.contains(path)
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
        let mut fs = self.lock();
        let existing = fs.names.get(path).copied();
        let id = match (mode, existing) {
            (OpenMode::Read | OpenMode::ReadWrite, Some(id)) => id,
            (OpenMode::Read | OpenMode::ReadWrite, None) => return Err(not_found(path)),
            (OpenMode::CreateNew, Some(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists", path.display()),
                ));
            }
            (OpenMode::CreateTruncate, Some(id)) => {
                let inode = fs.inodes.entry(id).or_default();
                inode.volatile.clear();
                inode.pending.push(Op::SetLen(0));
                id
            }
            (OpenMode::CreateNew | OpenMode::CreateTruncate, None) => {
                let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
                if !fs.dirs.contains(&parent) {
                    return Err(not_found(&parent));
                }
                fs.next_inode += 1;
                let id = fs.next_inode;
                fs.inodes.insert(id, Inode::default());
                fs.names.insert(path.to_path_buf(), id);
                id
            }
        };
        Ok(Arc::new(SimFile {
            fs: self.fs.clone(),
            id,
        }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.lock()
            .names
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.lock();
        fs.names.retain(|p, _| !p.starts_with(path));
        fs.dirs.retain(|p| !p.starts_with(path));
        // Removal is made durable at once: the log only removes what it could have lost anyway.
        fs.durable_names.retain(|p, _| !p.starts_with(path));
        fs.durable_dirs.retain(|p| !p.starts_with(path));
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut fs = self.lock();
        let id = fs.names.remove(from).ok_or_else(|| not_found(from))?;
        fs.names.insert(to.to_path_buf(), id);
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut fs = self.lock();
        let now: Vec<(PathBuf, u64)> = fs
            .names
            .iter()
            .filter(|(p, _)| p.parent() == Some(path))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        fs.durable_names.retain(|p, _| p.parent() != Some(path));
        fs.durable_names.extend(now);
        let subdirs: Vec<PathBuf> = fs
            .dirs
            .iter()
            .filter(|d| d.parent() == Some(path))
            .cloned()
            .collect();
        fs.durable_dirs.retain(|d| d.parent() != Some(path));
        fs.durable_dirs.extend(subdirs);
        Ok(())
    }

    fn lock_exclusive(&self, path: &Path) -> io::Result<Box<dyn Send + Sync + Debug>> {
        let mut fs = self.lock();
        if !fs.locked.insert(path.to_path_buf()) {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "locked"));
        }
        Ok(Box::new(SimLock {
            fs: self.fs.clone(),
            path: path.to_path_buf(),
        }))
    }
}

#[derive(Debug)]
struct SimLock {
    fs: Arc<Mutex<Fs>>,
    path: PathBuf,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        self.fs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .locked
            .remove(&self.path);
    }
}

#[derive(Debug)]
struct SimFile {
    fs: Arc<Mutex<Fs>>,
    id: u64,
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut Inode) -> T) -> T {
        let mut fs = self
            .fs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(fs.inodes.entry(self.id).or_default())
    }
}

impl StorageFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.with(|inode| {
            let start = (offset as usize).min(inode.volatile.len());
            let n = buf.len().min(inode.volatile.len() - start);
            buf[..n].copy_from_slice(&inode.volatile[start..start + n]);
            Ok(n)
        })
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.with(|inode| {
            let op = Op::Write {
                offset,
                bytes: buf.to_vec(),
            };
            apply(&mut inode.volatile, &op);
            inode.pending.push(op);
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(|inode| {
            inode.durable = inode.volatile.clone();
            inode.pending.clear();
            Ok(())
        })
    }

    fn len(&self) -> io::Result<u64> {
        self.with(|inode| Ok(inode.volatile.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with(|inode| {
            let op = Op::SetLen(len);
            apply(&mut inode.volatile, &op);
            inode.pending.push(op);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_power_loss_keeps_synced_bytes_and_at_most_a_prefix_of_the_rest() {
        let sim = SimStorage::new();
        sim.create_dir_all(Path::new("/d")).unwrap();
        sim.sync_dir(Path::new("/")).unwrap();
        let f = sim.open(Path::new("/d/f"), OpenMode::CreateNew).unwrap();
        f.write_all_at(b"durable", 0).unwrap();
        f.sync_data().unwrap();
        sim.sync_dir(Path::new("/d")).unwrap();
        f.write_all_at(b"-volatile", 7).unwrap();
        let g = sim.open(Path::new("/d/g"), OpenMode::CreateNew).unwrap();
        g.write_all_at(b"never synced dir", 0).unwrap();
        g.sync_data().unwrap();
        for seed in 0..50 {
            let after = sim.power_loss(seed);
            let f = after.open(Path::new("/d/f"), OpenMode::Read).unwrap();
            let mut buf = vec![0u8; 64];
            let n = f.read_at(&mut buf, 0).unwrap();
            let text = std::str::from_utf8(&buf[..n]).unwrap();
            assert!(
                "durable-volatile".starts_with(text) && text.len() >= 7,
                "{text:?}"
            );
            assert!(
                after.open(Path::new("/d/g"), OpenMode::Read).is_err(),
                "its directory was never synced"
            );
        }
    }

    #[test]
    fn a_directory_survives_only_once_its_parent_is_synced() {
        let sim = SimStorage::new();
        sim.create_dir_all(Path::new("/a/b")).unwrap();
        sim.open(Path::new("/a/b/f"), OpenMode::CreateNew)
            .unwrap()
            .sync_data()
            .unwrap();
        sim.sync_dir(Path::new("/a/b")).unwrap();
        assert!(
            !sim.power_loss(1).is_dir(Path::new("/a")),
            "nobody synced / after creating /a"
        );
        sim.sync_dir(Path::new("/")).unwrap();
        sim.sync_dir(Path::new("/a")).unwrap();
        let after = sim.power_loss(1);
        assert!(after.is_dir(Path::new("/a/b")));
        assert!(after.open(Path::new("/a/b/f"), OpenMode::Read).is_ok());
    }

    #[test]
    fn seeds_give_different_outcomes() {
        let sim = SimStorage::new();
        sim.create_dir_all(Path::new("/d")).unwrap();
        sim.sync_dir(Path::new("/")).unwrap();
        let f = sim.open(Path::new("/d/f"), OpenMode::CreateNew).unwrap();
        sim.sync_dir(Path::new("/d")).unwrap();
        for i in 0..64u8 {
            f.write_all_at(&[i], u64::from(i)).unwrap();
        }
        let lengths: BTreeSet<u64> = (0..16)
            .map(|seed| {
                sim.power_loss(seed)
                    .open(Path::new("/d/f"), OpenMode::Read)
                    .unwrap()
                    .len()
                    .unwrap()
            })
            .collect();
        assert!(lengths.len() > 8, "{lengths:?}");
    }
}
