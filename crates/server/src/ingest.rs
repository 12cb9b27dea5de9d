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

/// Where the records of a produce request get their keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFrom<'a> {
    /// No key: the log spreads the records over the partitions.
    Nothing,
    /// The field the request names (`--key`, `?key=`): every record must be an object that
    /// has it.
    Field(&'a str),
    /// The key the topic declares (`key` in `topics/<topic>.toml`), used when no field is
    /// named: a record that is no object or lacks the field has no key (the models that read
    /// the topic judge it), so that producers and the declared partitioning agree.
    Declared(&'a str),
}

impl<'a> KeyFrom<'a> {
    /// The field named by a request, else the topic's declared key, else none.
    pub fn of(named: Option<&'a str>, declared: Option<&'a str>) -> KeyFrom<'a> {
        match (named, declared) {
            (Some(field), _) => KeyFrom::Field(field),
            (None, Some(field)) => KeyFrom::Declared(field),
            (None, None) => KeyFrom::Nothing,
        }
    }
}

/// Parses an NDJSON body into records. Blank lines are skipped; every other line must be one
/// JSON value. The key of a record is the field `key` says (a string's text, or the JSON text
/// of any other value; `null` means no key).
///
/// All or nothing: the first bad line fails the whole body.
pub fn parse_ndjson(body: &Bytes, key: KeyFrom<'_>) -> Result<Vec<Record>, IngestError> {
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
            let key = check_line(line, key).map_err(|(at, reason)| IngestError {
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

fn check_line(line: &[u8], key_from: KeyFrom<'_>) -> Result<Option<Bytes>, (usize, String)> {
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
    // A declared key is taken from objects that have it; any other value is read as JSON only.
    let declared = match key_from {
        KeyFrom::Declared(field) => {
            let mut probe = serde_json::Deserializer::from_slice(line);
            match (KeyOf { field }).deserialize(&mut probe) {
                Ok(Some(value)) if probe.end().is_ok() => Some(value),
                _ => None,
            }
        }
        _ => None,
    };
    let key = match key_from {
        KeyFrom::Nothing | KeyFrom::Declared(_) => {
            <IgnoredAny as serde::Deserialize>::deserialize(&mut de)
                .map_err(|e| (at(&e), reason(e)))?;
            declared.and_then(key_bytes)
        }
        KeyFrom::Field(field) => {
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
                Some(value) => key_bytes(value),
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

/// A key field's value as the record's key: a string's text, or the JSON text of any other
/// value; `null` is no key.
fn key_bytes(value: serde_json::Value) -> Option<Bytes> {
    match value {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(Bytes::from(s)),
        other => Some(Bytes::from(other.to_string())),
    }
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
        parse_ndjson(
            &Bytes::copy_from_slice(s.as_bytes()),
            key.map_or(KeyFrom::Nothing, KeyFrom::Field),
        )
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
    fn a_declared_key_is_taken_where_records_have_it() {
        let body = "{\"c\":\"x\"}\n{\"n\":1}\n[1]\n{\"c\":7}\n\"text\"\n";
        let keys: Vec<Option<Bytes>> = parse_ndjson(&Bytes::from(body), KeyFrom::Declared("c"))
            .unwrap()
            .into_iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(
            keys,
            vec![
                Some(Bytes::from("x")),
                None,
                None,
                Some(Bytes::from("7")),
                None
            ]
        );
        // Invalid JSON is refused as without a key.
        let err = parse_ndjson(
            &Bytes::from("{\"c\":1}\n{\"c\" 2}\n"),
            KeyFrom::Declared("c"),
        )
        .unwrap_err();
        assert_eq!(err.line, 2);
        assert_eq!(KeyFrom::of(Some("a"), Some("b")), KeyFrom::Field("a"));
        assert_eq!(KeyFrom::of(None, Some("b")), KeyFrom::Declared("b"));
        assert_eq!(KeyFrom::of(None, None), KeyFrom::Nothing);
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

        let err =
            parse_ndjson(&Bytes::from_static(b"{}\n\"\xff\"\n"), KeyFrom::Nothing).unwrap_err();
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
            let _ = parse_ndjson(&body, KeyFrom::Nothing);
            let _ = parse_ndjson(&body, KeyFrom::Field("k"));
            let _ = parse_ndjson(&body, KeyFrom::Declared("k"));
        }
    }
}
