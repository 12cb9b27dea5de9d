//! A deduplication key: its row-encoded bytes, inline when short.

use std::collections::HashMap;
use std::sync::Arc;

/// A row-encoded key, held inline when short (an integer or a short string key: no allocation,
/// and the hash table compares it without following a pointer), shared otherwise.
#[derive(Clone)]
pub(super) enum Key {
    Inline { len: u8, bytes: [u8; KEY_INLINE] },
    Shared(Arc<[u8]>),
}

/// The longest key held inline (a 24-byte `Key`): an integer's row encoding (9 bytes), a
/// string's of up to 8 bytes (10).
pub(super) const KEY_INLINE: usize = 16;

impl Key {
    pub(super) fn as_slice(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Key::Shared(bytes) => bytes,
        }
    }
}

impl From<&[u8]> for Key {
    fn from(key: &[u8]) -> Key {
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= KEY_INLINE => {
                // Built in registers and stored at once: copying the bytes into a zeroed array
                // and reading it back stalled on store forwarding, a fifth of the dedup's time.
                let (low, high) = key.split_at(key.len().min(8));
                let packed = (u128::from(word(high)) << 64) | u128::from(word(low));
                Key::Inline {
                    len,
                    bytes: packed.to_le_bytes(),
                }
            }
            _ => Key::Shared(key.into()),
        }
    }
}

/// Up to 8 bytes as a little-endian word, zero-padded.
fn word(bytes: &[u8]) -> u64 {
    match <[u8; 8]>::try_from(bytes) {
        Ok(full) => u64::from_le_bytes(full),
        Err(_) => bytes
            .iter()
            .rev()
            .fold(0, |word, &b| (word << 8) | u64::from(b)),
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        // A key is inline exactly when it is short, and inline bytes past `len` are zero: two
        // keys are equal when their representations are (a fixed-size compare, no `memcmp`).
        match (self, other) {
            (Key::Inline { len: a, bytes: x }, Key::Inline { len: b, bytes: y }) => {
                a == b && x == y
            }
            (Key::Shared(x), Key::Shared(y)) => x == y,
            _ => false,
        }
    }
}

impl Eq for Key {}

/// Hashes as its bytes do, so that the maps can be searched with a `&[u8]`.
impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

pub(super) type SharedKeyMap<V> = HashMap<Key, V, foldhash::fast::RandomState>;
