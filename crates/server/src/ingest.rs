//! NDJSON in: one JSON value per line becomes one record, its bytes kept exactly as they came.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use kappa_log::Record;
use kappa_log::limits::RECORD_BYTES_MAX;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};

/// Deepest nesting of arrays and objects accepted in a record: well inside serde_json's own
/// limit (127), so every accepted record can later be parsed in full, also inside an envelope.
pub const JSON_DEPTH_MAX: usize = 100;

/// A line that is not a record, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[error("line {line} (byte {byte_offset}): {reason}")]
pub struct IngestError {
    /// 1-based line number in the input.
    pub line: u64,
    /// 0-based byte offset of the problem in the input.
    pub byte_offset: u64,
    pub reason: String,
}

impl IngestError {
    /// The same error, for input that started `lines` lines and `bytes` bytes into a file.
    pub fn shifted(mut self, lines: u64, bytes: u64) -> IngestError {
        self.line += lines;
        self.byte_offset += bytes;
        self
    }
}

/// Parses an NDJSON body into records. Blank lines are skipped; every other line must be one
/// JSON value. With `key_field`, every record must be an object and its key is that field
/// (a string's text, or the JSON text of any other value; `null` means no key).
///
/// All or nothing: the first bad line fails the whole body.
pub fn parse_ndjson(body: &Bytes, key_field: Option<&str>) -> Result<Vec<Record>, IngestError> {
    let mut records = Vec::new();
    let mut start = 0usize;
    let mut line_no = 0u64;
    while start < body.len() {
        line_no += 1;
        let end = memchr::memchr(b'\n', &body[start..]).map_or(body.len(), |i| start + i);
        let mut line_end = end;
        if line_end > start && body[line_end - 1] == b'\r' {
            line_end -= 1;
        }
        let line = &body[start..line_end];
        if !line.iter().all(u8::is_ascii_whitespace) {
            let key = check_line(line, key_field).map_err(|(at, reason)| IngestError {
                line: line_no,
                byte_offset: (start + at) as u64,
                reason,
            })?;
            records.push(Record {
                key,
                value: body.slice(start..line_end),
                headers: Vec::new(),
            });
        }
        start = end + 1;
    }
    Ok(records)
}

/// Counts the lines of `body` (for reporting where a later chunk starts).
pub fn count_lines(body: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', body).count() as u64
}

fn check_line(line: &[u8], key_field: Option<&str>) -> Result<Option<Bytes>, (usize, String)> {
    let at = |e: &serde_json::Error| match e.classify() {
        // The line ended too early: the problem is where it ends.
        serde_json::error::Category::Eof => line.len(),
        _ => e.column().saturating_sub(1).min(line.len()),
    };
    let reason = |e: serde_json::Error| {
        let text = e.to_string();
        // serde_json appends " at line 1 column N"; we report our own position.
        let text = text
            .rsplit_once(" at line ")
            .map_or(text.as_str(), |(head, _)| head)
            .to_owned();
        match e.classify() {
            serde_json::error::Category::Eof => format!("incomplete JSON: {text}"),
            _ => format!("invalid JSON: {text}"),
        }
    };
    // JSON text is UTF-8 (RFC 8259), and skipping a value does not check its strings.
    if let Err(e) = std::str::from_utf8(line) {
        return Err((
            e.valid_up_to(),
            "invalid UTF-8: JSON text must be UTF-8".into(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(line);
    let key = match key_field {
        None => {
            <IgnoredAny as serde::Deserialize>::deserialize(&mut de)
                .map_err(|e| (at(&e), reason(e)))?;
            None
        }
        Some(field) => {
            let found = KeyOf { field }
                .deserialize(&mut de)
                .map_err(|e| (at(&e), reason(e)))?;
            match found {
                None => {
                    return Err((
                        0,
                        format!("field `{field}` is missing; --key needs it in every record"),
                    ));
                }
                Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(Bytes::from(s)),
                Some(other) => Some(Bytes::from(other.to_string())),
            }
        }
    };
    de.end().map_err(|e| (at(&e), reason(e)))?;
    let bytes = line.len() + key.as_ref().map_or(0, Bytes::len);
    if bytes > RECORD_BYTES_MAX {
        return Err((
            0,
            format!("record of {bytes} bytes is over the limit of {RECORD_BYTES_MAX} bytes"),
        ));
    }
    if let Some(at) = too_deep(line) {
        return Err((at, format!("nested deeper than {JSON_DEPTH_MAX} levels")));
    }
    Ok(key)
}

/// Where valid JSON first nests deeper than [`JSON_DEPTH_MAX`], if it does.
fn too_deep(json: &[u8]) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in json.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > JSON_DEPTH_MAX {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// Reads one field of a JSON object, skipping the rest without building it.
struct KeyOf<'a> {
    field: &'a str,
}

impl<'de> DeserializeSeed<'de> for KeyOf<'_> {
    type Value = Option<serde_json::Value>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for KeyOf<'_> {
    type Value = Option<serde_json::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a JSON object with field `{}` (--key)", self.field)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if found.is_none() && key == self.field {
                found = Some(map.next_value::<serde_json::Value>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str, key: Option<&str>) -> Result<Vec<Record>, IngestError> {
        parse_ndjson(&Bytes::copy_from_slice(s.as_bytes()), key)
    }

    #[test]
    fn values_are_kept_byte_for_byte_and_blank_lines_skipped() {
        let body = "{\"a\": 1}\r\n\n  \n[1,2]\n\"s\"";
        let records = parse(body, None).unwrap();
        let values: Vec<&[u8]> = records.iter().map(|r| &r.value[..]).collect();
        assert_eq!(values, vec![&b"{\"a\": 1}"[..], b"[1,2]", b"\"s\""]);
    }

    #[test]
    fn keys_come_from_the_named_field() {
        let body =
            "{\"c\":\"x\",\"n\":1}\n{\"c\":42}\n{\"c\":null}\n{\"z\":{\"c\":1},\"c\":\"y\"}\n";
        let keys: Vec<Option<Bytes>> = parse(body, Some("c"))
            .unwrap()
            .into_iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(
            keys,
            vec![
                Some(Bytes::from("x")),
                Some(Bytes::from("42")),
                None,
                Some(Bytes::from("y"))
            ]
        );
    }

    #[test]
    fn errors_name_the_line_and_byte() {
        let body = "{\"a\":1}\n{\"a\":2}\n{\"a\" 3}\n{\"a\":4}\n";
        let err = parse(body, None).unwrap_err();
        assert_eq!(err.line, 3);
        assert_eq!(err.byte_offset, 16 + 5);
        assert!(
            err.reason.starts_with("invalid JSON: expected `:`"),
            "{}",
            err.reason
        );

        let err = parse("{\"a\":1}\n{\"a\":", None).unwrap_err();
        assert_eq!((err.line, err.byte_offset), (2, 13));
        assert!(err.reason.starts_with("incomplete JSON"), "{}", err.reason);

        let err = parse("{\"a\":1} x\n", None).unwrap_err();
        assert_eq!((err.line, err.byte_offset), (1, 8));

        let err = parse("{\"b\":1}\n", Some("customer")).unwrap_err();
        assert_eq!(
            err.reason,
            "field `customer` is missing; --key needs it in every record"
        );

        let err = parse("[1]\n", Some("customer")).unwrap_err();
        assert!(
            err.reason
                .contains("expected a JSON object with field `customer`"),
            "{}",
            err.reason
        );

        let err = parse_ndjson(&Bytes::from_static(b"{}\n\"\xff\"\n"), None).unwrap_err();
        assert_eq!((err.line, err.byte_offset), (2, 4));
        assert!(err.reason.contains("invalid UTF-8"), "{}", err.reason);

        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let err = parse(&deep, None).map(|r| r.len()).unwrap_err();
        assert!(
            err.reason.contains("nested deeper than 100"),
            "{}",
            err.reason
        );
        assert_eq!(err.byte_offset, 100);
        // Brackets inside strings do not count; what is accepted parses whole, even wrapped in
        // one more level (an envelope).
        let fine = format!("{}\"[{{\\\"\"{}", "[".repeat(100), "]".repeat(100));
        let records = parse(&fine, None).unwrap();
        let wrapped = format!(
            "{{\"value\":{}}}",
            std::str::from_utf8(&records[0].value).unwrap()
        );
        serde_json::from_str::<serde_json::Value>(&wrapped).unwrap();
        assert_eq!(err.clone().shifted(10, 100).line, 11);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_give_records_or_an_error_never_a_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let body = Bytes::from(bytes);
            let _ = parse_ndjson(&body, None);
            let _ = parse_ndjson(&body, Some("k"));
        }
    }
}
