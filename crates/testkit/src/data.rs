//! Records that say who they are, so tests can track each one.

/// A JSON value of exactly `len` bytes (or the shortest possible) that names its own `id`.
pub fn tagged_value(id: &str, len: usize) -> Vec<u8> {
    let mut v = format!(r#"{{"id":"{id}","pad":""#).into_bytes();
    let tail = b"\"}";
    while v.len() + tail.len() < len {
        v.push(b'x');
    }
    v.extend_from_slice(tail);
    v
}

/// The `id` a [`tagged_value`] names, if it is one.
pub fn tag_of(value: &[u8]) -> Option<&str> {
    let rest = value.strip_prefix(br#"{"id":""#)?;
    let end = rest.iter().position(|b| *b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_at_any_length() {
        for len in [0, 10, 100, 1024] {
            let v = tagged_value("c1-42", len);
            assert!(v.len() >= len.min(v.len()));
            assert_eq!(tag_of(&v), Some("c1-42"));
            serde_json::from_slice::<serde_json::Value>(&v).unwrap();
        }
    }
}
