//! File-system helpers for crash images.

use std::io;
use std::path::Path;

/// Copies a directory tree, as a crash would leave it on disk (the source may be in use).
pub fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Flips one bit of a file in place.
pub fn flip_bit(path: &Path, position: u64, bit: u8) -> io::Result<()> {
    let mut bytes = std::fs::read(path)?;
    let i = usize::try_from(position).map_err(io::Error::other)?;
    let byte = bytes
        .get_mut(i)
        .ok_or_else(|| io::Error::other("position past the end"))?;
    *byte ^= 1 << bit;
    std::fs::write(path, bytes)
}

/// Cuts a file to `len` bytes.
pub fn truncate(path: &Path, len: u64) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(len)
}
