//! Records that say who they are, so tests can track each one.

use std::collections::HashMap;

use kappa_log::{Log, StartAt};

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

/// Every tagged record of `topic`, by tag: `(partition, offset)`. Fails when a tag appears
/// twice, a record is untagged, or a partition's offsets are not dense from its start offset.
pub fn tagged_contents(log: &Log, topic: &str) -> Result<HashMap<String, (u32, u64)>, String> {
    let topic = log.topic(topic).map_err(|e| e.to_string())?;
    let mut found = HashMap::new();
    for p in 0..topic.partition_count() {
        let partition = topic.partition(p).map_err(|e| e.to_string())?;
        let mut reader = partition
            .reader(StartAt::Beginning)
            .map_err(|e| e.to_string())?;
        let mut expected = reader.next_offset();
        while let Some(chunk) = reader.read(1 << 20).map_err(|e| e.to_string())? {
            for record in chunk.records() {
                let record = record.map_err(|e| e.to_string())?;
                if record.offset != expected {
                    return Err(format!(
                        "partition {p}: offset {} follows {}",
                        record.offset, expected
                    ));
                }
                expected += 1;
                let tag = tag_of(record.value)
                    .ok_or_else(|| format!("untagged record at {p}/{}", record.offset))?;
                if let Some(first) = found.insert(tag.to_owned(), (p, record.offset)) {
                    return Err(format!(
                        "record {tag} appears twice: at {first:?} and at {:?}",
                        (p, record.offset)
                    ));
                }
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_at_any_length() {
        let shortest = tagged_value("c1-42", 0).len();
        for len in [0, 10, 100, 1024] {
            let v = tagged_value("c1-42", len);
            assert_eq!(v.len(), len.max(shortest));
            assert_eq!(tag_of(&v), Some("c1-42"));
            serde_json::from_slice::<serde_json::Value>(&v).unwrap();
        }
    }
}
