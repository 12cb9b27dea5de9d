//! JSON records in, Arrow batches out: each record is checked against its topic's schema, and a
//! record that does not fit is set aside with the reason instead of stopping the pipeline.

use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder,
    Int32Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::compute::kernels::cast_utils::{Parser, string_to_timestamp_nanos};
use arrow::datatypes::{Date32Type, SchemaRef};
use kappa_pipeline::{Field, FieldType, TopicSpec};
use serde_json::value::RawValue;

use crate::schema::{UTC, topic_schema};

/// A record that did not fit its topic's schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub partition: u32,
    pub offset: u64,
    pub reason: String,
    pub raw: Vec<u8>,
}

/// Turns one topic's JSON records into batches of its schema.
#[derive(Debug, Clone)]
pub struct Decoder {
    schema: SchemaRef,
    fields: Vec<Field>,
    /// Whether flat records take the hand-written scanner (off only to test it against the
    /// full parser).
    fast: bool,
    /// Each field's name as the scanner matches it.
    keys: Vec<Option<QuotedKey>>,
}

/// Where a record comes from, and its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Raw<'a> {
    pub partition: u32,
    pub offset: u64,
    pub value: &'a [u8],
}

impl Decoder {
    pub fn new(topic: &TopicSpec) -> Decoder {
        Decoder {
            schema: topic_schema(topic),
            fields: topic.fields.clone(),
            fast: true,
            keys: topic
                .fields
                .iter()
                .map(|f| QuotedKey::new(&f.name))
                .collect(),
        }
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Decodes records into one batch, in order; those that do not fit are returned apart.
    pub fn decode<'a>(
        &self,
        records: impl IntoIterator<Item = Raw<'a>>,
    ) -> (RecordBatch, Vec<Rejected>) {
        let (batch, rejected, _) = self.decode_positioned(records);
        (batch, rejected)
    }

    /// [`Decoder::decode`], also returning where each row of the batch comes from
    /// (partition, offset).
    pub fn decode_positioned<'a>(
        &self,
        records: impl IntoIterator<Item = Raw<'a>>,
    ) -> (RecordBatch, Vec<Rejected>, Vec<(u32, u64)>) {
        let records: Vec<Raw<'a>> = records.into_iter().collect();
        let (batch, rejected, rows) = self.decode_indexed(&records);
        let positions = rows
            .iter()
            .map(|&i| (records[i].partition, records[i].offset))
            .collect();
        (batch, rejected, positions)
    }

    /// [`Decoder::decode`], also returning the index in `records` of each row of the batch.
    pub fn decode_indexed(&self, records: &[Raw<'_>]) -> (RecordBatch, Vec<Rejected>, Vec<usize>) {
        let mut columns = Columns::new(&self.fields);
        let mut rejected = Vec::new();
        let mut rows = Vec::with_capacity(records.len());
        let mut scratch = Scratch {
            fast: self.fast,
            keys: &self.keys,
            raws: Vec::with_capacity(self.fields.len()),
            values: Vec::with_capacity(self.fields.len()),
        };
        for (i, raw) in records.iter().enumerate() {
            match columns.push(&self.fields, raw.value, &mut scratch) {
                Ok(()) => rows.push(i),
                Err(reason) => rejected.push(Rejected {
                    partition: raw.partition,
                    offset: raw.offset,
                    reason,
                    raw: raw.value.to_vec(),
                }),
            }
        }
        let arrays = columns.finish();
        let batch = if arrays.is_empty() {
            RecordBatch::new_empty(self.schema.clone())
        } else {
            // The builders follow the schema's fields one for one; a mismatch is a bug here.
            RecordBatch::try_new(self.schema.clone(), arrays)
                .expect("builders match the topic schema")
        };
        (batch, rejected, rows)
    }
}

/// One builder per column; a record is either added to every column or to none.
enum Columns {
    /// An untyped topic: the JSON text of each record.
    Untyped(StringBuilder),
    Typed(Vec<Column>),
}

enum Column {
    String(StringBuilder),
    Boolean(BooleanBuilder),
    Int(Int32Builder),
    Bigint(Int64Builder),
    Double(Float64Builder),
    Decimal(Decimal128Builder),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
}

/// Buffers reused from record to record (all records of one call share the lifetime `'a`).
struct Scratch<'a> {
    fast: bool,
    keys: &'a [Option<QuotedKey>],
    /// Each field's raw JSON text, in field order.
    raws: Vec<Option<&'a str>>,
    values: Vec<Value<'a>>,
}

/// A field's value, parsed but not yet added (so a record can still be rejected whole).
enum Value<'a> {
    Null,
    /// Borrowed from the record when the JSON string has no escapes.
    String(std::borrow::Cow<'a, str>),
    Boolean(bool),
    Int(i32),
    Bigint(i64),
    Double(f64),
    Decimal(i128),
    Date(i32),
    Timestamp(i64),
}

impl Columns {
    fn new(fields: &[Field]) -> Columns {
        if fields.is_empty() {
            return Columns::Untyped(StringBuilder::new());
        }
        Columns::Typed(
            fields
                .iter()
                .map(|f| match f.data_type {
                    FieldType::String | FieldType::Json => Column::String(StringBuilder::new()),
                    FieldType::Boolean => Column::Boolean(BooleanBuilder::new()),
                    FieldType::Int => Column::Int(Int32Builder::new()),
                    FieldType::Bigint => Column::Bigint(Int64Builder::new()),
                    FieldType::Double => Column::Double(Float64Builder::new()),
                    FieldType::Decimal { precision, scale } => Column::Decimal(
                        Decimal128Builder::new()
                            .with_precision_and_scale(precision, scale as i8)
                            .expect("precision and scale were validated with the topic"),
                    ),
                    FieldType::Date => Column::Date(Date32Builder::new()),
                    FieldType::Timestamp => {
                        Column::Timestamp(TimestampMicrosecondBuilder::new().with_timezone(UTC))
                    }
                })
                .collect(),
        )
    }

    fn push<'a>(
        &mut self,
        fields: &[Field],
        json: &'a [u8],
        scratch: &mut Scratch<'a>,
    ) -> Result<(), String> {
        match self {
            Columns::Untyped(builder) => {
                let text = std::str::from_utf8(json).map_err(|_| "not UTF-8".to_owned())?;
                serde_json::from_str::<&RawValue>(text)
                    .map_err(|e| format!("invalid JSON: {e}"))?;
                builder.append_value(text);
                Ok(())
            }
            Columns::Typed(columns) => {
                let raws = &mut scratch.raws;
                let keys = scratch.keys;
                let flat = scratch.fast
                    && std::str::from_utf8(json)
                        .ok()
                        .and_then(|text| scan_flat(text, fields, keys, raws))
                        .is_some();
                if !flat {
                    let mut deserializer = serde_json::Deserializer::from_slice(json);
                    let object = serde::Deserializer::deserialize_map(
                        &mut deserializer,
                        FieldValues { fields },
                    )
                    .and_then(|object| deserializer.end().map(|()| object))
                    .map_err(|e| {
                        if e.is_data() {
                            "not a JSON object".to_owned()
                        } else {
                            format!("invalid JSON: {e}")
                        }
                    })?;
                    raws.clear();
                    raws.extend(object.into_iter().map(|raw| raw.map(RawValue::get)));
                }
                let values = &mut scratch.values;
                values.clear();
                for (field, raw) in fields.iter().zip(raws.iter()) {
                    let raw = raw.filter(|v| *v != "null");
                    let value = match raw {
                        None if field.required => {
                            return Err(format!(
                                "required field `{}` is missing or null",
                                field.name
                            ));
                        }
                        None => Value::Null,
                        Some(raw) => parse(field, raw)
                            .map_err(|why| format!("field `{}`: {why}", field.name))?,
                    };
                    values.push(value);
                }
                for (column, value) in columns.iter_mut().zip(values.drain(..)) {
                    column.append(value);
                }
                Ok(())
            }
        }
    }

    fn finish(self) -> Vec<ArrayRef> {
        match self {
            Columns::Untyped(mut b) => vec![Arc::new(b.finish())],
            Columns::Typed(columns) => columns.into_iter().map(Column::finish).collect(),
        }
    }
}

impl Column {
    fn append(&mut self, value: Value<'_>) {
        match (self, value) {
            (Column::String(b), Value::String(v)) => b.append_value(v),
            (Column::Boolean(b), Value::Boolean(v)) => b.append_value(v),
            (Column::Int(b), Value::Int(v)) => b.append_value(v),
            (Column::Bigint(b), Value::Bigint(v)) => b.append_value(v),
            (Column::Double(b), Value::Double(v)) => b.append_value(v),
            (Column::Decimal(b), Value::Decimal(v)) => b.append_value(v),
            (Column::Date(b), Value::Date(v)) => b.append_value(v),
            (Column::Timestamp(b), Value::Timestamp(v)) => b.append_value(v),
            (column, _) => column.append_null(),
        }
    }

    fn append_null(&mut self) {
        match self {
            Column::String(b) => b.append_null(),
            Column::Boolean(b) => b.append_null(),
            Column::Int(b) => b.append_null(),
            Column::Bigint(b) => b.append_null(),
            Column::Double(b) => b.append_null(),
            Column::Decimal(b) => b.append_null(),
            Column::Date(b) => b.append_null(),
            Column::Timestamp(b) => b.append_null(),
        }
    }

    fn finish(self) -> ArrayRef {
        match self {
            Column::String(mut b) => Arc::new(b.finish()),
            Column::Boolean(mut b) => Arc::new(b.finish()),
            Column::Int(mut b) => Arc::new(b.finish()),
            Column::Bigint(mut b) => Arc::new(b.finish()),
            Column::Double(mut b) => Arc::new(b.finish()),
            Column::Decimal(mut b) => Arc::new(b.finish()),
            Column::Date(mut b) => Arc::new(b.finish()),
            Column::Timestamp(mut b) => ArrayBuilder::finish(&mut b),
        }
    }
}

/// Reads a JSON object into the raw values of `fields`, in their order, by matching each key
/// against the field names (a topic has few): no map is built per record. Other keys are
/// skipped; of a key given twice, the last value counts.
struct FieldValues<'f> {
    fields: &'f [Field],
}

impl<'de> serde::de::Visitor<'de> for FieldValues<'_> {
    type Value = Vec<Option<&'de RawValue>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut values = vec![None; self.fields.len()];
        // Records usually list the fields in the schema's order: the one after the last match
        // is tried first.
        let mut next = 0;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let found = match self.fields.get(next) {
                Some(f) if f.name == key => Some(next),
                _ => self.fields.iter().position(|f| f.name == key),
            };
            if let Some(i) = found {
                next = i + 1;
            }
            match found {
                Some(i) => values[i] = Some(map.next_value::<&'de RawValue>()?),
                None => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(values)
    }
}

/// The fast path for the common record: a JSON object of scalars, with no escapes in keys or
/// string values. Puts the raw text of each field's value (the last, if a key repeats) in
/// `raws`, in field order. `None` for anything else — nested values, escapes, anything invalid
/// — which the full parser then reads, accepting or rejecting it with its reason: this path
/// only ever accepts what the full parser accepts, with the same values (tested).
fn scan_flat<'a>(
    text: &'a str,
    fields: &[Field],
    keys: &[Option<QuotedKey>],
    raws: &mut Vec<Option<&'a str>>,
) -> Option<()> {
    raws.clear();
    raws.resize(fields.len(), None);
    let b = text.as_bytes();
    let mut i = skip_space(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_space(b, i + 1);
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        // Records usually list the fields in the schema's order: the one after the last match
        // is tried first.
        let mut next = 0;
        loop {
            if b.get(i) != Some(&b'"') {
                return None;
            }
            let (key_end, found) = match keys.get(next) {
                Some(Some(expected)) if expected.at(b, i) => (i + expected.len - 1, Some(next)),
                _ => {
                    let key_end = plain_string_end(b, i + 1)?;
                    // Every index sliced at is that of an ASCII byte (or the end): a char
                    // boundary.
                    let key = &text[i + 1..key_end];
                    (key_end, fields.iter().position(|f| f.name == key))
                }
            };
            i = skip_space(b, key_end + 1);
            if b.get(i) != Some(&b':') {
                return None;
            }
            let start = skip_space(b, i + 1);
            i = scalar_end(b, start)?;
            if let Some(k) = found {
                raws[k] = Some(&text[start..i]);
                next = k + 1;
            }
            i = skip_space(b, i);
            match b.get(i) {
                Some(b',') => i = skip_space(b, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (skip_space(b, i) == b.len()).then_some(())
}

/// A field name with its quotes, as it appears in a record when it needs no escape, compared
/// sixteen bytes at a time (two masked words) when it fits: most keys do, and a key compared
/// this way needs neither a scan for its end nor a call to `memcmp`.
#[derive(Debug, Clone)]
struct QuotedKey {
    /// `"name"`.
    pattern: Vec<u8>,
    len: usize,
    words: Option<([u64; 2], [u64; 2])>,
}

impl QuotedKey {
    /// `None` for a name that would need escaping in JSON.
    fn new(name: &str) -> Option<QuotedKey> {
        if name.bytes().any(|c| c == b'"' || c == b'\\' || c < 0x20) {
            return None;
        }
        let pattern = format!("\"{name}\"").into_bytes();
        let words = (pattern.len() <= 16).then(|| {
            let mut bytes = [0u8; 16];
            let mut mask = [0u8; 16];
            bytes[..pattern.len()].copy_from_slice(&pattern);
            mask[..pattern.len()].fill(0xff);
            let word = |b: &[u8; 16], half: usize| {
                u64::from_le_bytes(b[half * 8..half * 8 + 8].try_into().expect("8 bytes"))
            };
            (
                [word(&bytes, 0), word(&bytes, 1)],
                [word(&mask, 0), word(&mask, 1)],
            )
        });
        Some(QuotedKey {
            len: pattern.len(),
            pattern,
            words,
        })
    }

    /// Whether the key at `i` (its opening quote) is this one.
    fn at(&self, b: &[u8], i: usize) -> bool {
        if let (Some((words, masks)), Some(text)) = (&self.words, b.get(i..i + 16)) {
            let lo = u64::from_le_bytes(text[..8].try_into().expect("8 bytes"));
            let hi = u64::from_le_bytes(text[8..].try_into().expect("8 bytes"));
            return ((lo ^ words[0]) & masks[0]) | ((hi ^ words[1]) & masks[1]) == 0;
        }
        b.get(i..i + self.len) == Some(self.pattern.as_slice())
    }
}

/// The index after JSON whitespace from `i`.
fn skip_space(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The index of the closing quote of a string whose text starts at `i`, if it has no escape
/// and no control character.
fn plain_string_end(b: &[u8], i: usize) -> Option<usize> {
    let length = b
        .get(i..)?
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
    (b[i + length] == b'"').then_some(i + length)
}

/// The index after the scalar (plain string, number, `true`, `false`, `null`) at `i`.
fn scalar_end(b: &[u8], i: usize) -> Option<usize> {
    let digits = |mut j: usize| {
        while b.get(j).is_some_and(u8::is_ascii_digit) {
            j += 1;
        }
        j
    };
    let rest = b.get(i..)?;
    match rest.first()? {
        b'"' => plain_string_end(b, i + 1).map(|end| end + 1),
        b't' if rest.starts_with(b"true") => Some(i + 4),
        b'f' if rest.starts_with(b"false") => Some(i + 5),
        b'n' if rest.starts_with(b"null") => Some(i + 4),
        b'-' | b'0'..=b'9' => {
            let mut j = i + usize::from(rest[0] == b'-');
            j = match b.get(j)? {
                b'0' => j + 1,
                b'1'..=b'9' => digits(j + 1),
                _ => return None,
            };
            if b.get(j) == Some(&b'.') {
                let end = digits(j + 1);
                if end == j + 1 {
                    return None;
                }
                j = end;
            }
            if matches!(b.get(j), Some(b'e' | b'E')) {
                j += 1;
                if matches!(b.get(j), Some(b'+' | b'-')) {
                    j += 1;
                }
                let end = digits(j);
                if end == j {
                    return None;
                }
                j = end;
            }
            Some(j)
        }
        _ => None,
    }
}

/// Parses one field's raw JSON text as its declared type.
fn parse<'a>(field: &Field, raw: &'a str) -> Result<Value<'a>, String> {
    let string = || -> Result<std::borrow::Cow<'a, str>, String> {
        // `raw` is valid JSON: a string without escapes is its text between the quotes.
        if raw.len() >= 2 && raw.starts_with('"') && raw.ends_with('"') && !raw.contains('\\') {
            return Ok(std::borrow::Cow::Borrowed(&raw[1..raw.len() - 1]));
        }
        serde_json::from_str::<String>(raw)
            .map(std::borrow::Cow::Owned)
            .map_err(|_| format!("expected a string, found {}", shorten(raw)))
    };
    Ok(match field.data_type {
        FieldType::String => Value::String(string()?),
        FieldType::Json => Value::String(std::borrow::Cow::Borrowed(raw)),
        FieldType::Boolean => Value::Boolean(
            serde_json::from_str(raw)
                .map_err(|_| format!("expected true or false, found {}", shorten(raw)))?,
        ),
        FieldType::Int => Value::Int(
            integer(raw)
                .and_then(|v| i32::try_from(v).ok())
                .ok_or_else(|| {
                    format!("expected an int (32-bit integer), found {}", shorten(raw))
                })?,
        ),
        FieldType::Bigint => Value::Bigint(integer(raw).ok_or_else(|| {
            format!("expected a bigint (64-bit integer), found {}", shorten(raw))
        })?),
        FieldType::Double => Value::Double(
            serde_json::from_str::<f64>(raw)
                .map_err(|_| format!("expected a number, found {}", shorten(raw)))?,
        ),
        FieldType::Decimal { precision, scale } => {
            // Exact: from the number's text (or a string holding one), never through a float.
            let text = if raw.starts_with('"') {
                string()?
            } else {
                std::borrow::Cow::Borrowed(raw)
            };
            Value::Decimal(parse_decimal(&text, precision, scale)?)
        }
        FieldType::Date => {
            let text = string()?;
            Value::Date(Date32Type::parse(&text).ok_or_else(|| {
                format!(
                    "expected a date like \"2026-11-25\", found {}",
                    shorten(raw)
                )
            })?)
        }
        FieldType::Timestamp => {
            if raw.starts_with('"') {
                let text = string()?;
                match utc_micros(&text) {
                    Some(micros) => Value::Timestamp(micros),
                    None => {
                        let nanos = string_to_timestamp_nanos(&text).map_err(|_| {
                            format!(
                                "expected an RFC 3339 time or epoch milliseconds, found {}",
                                shorten(raw)
                            )
                        })?;
                        Value::Timestamp(nanos.div_euclid(1000))
                    }
                }
            } else {
                let millis = integer(raw).ok_or_else(|| {
                    format!(
                        "expected an RFC 3339 time or epoch milliseconds, found {}",
                        shorten(raw)
                    )
                })?;
                Value::Timestamp(
                    millis
                        .checked_mul(1000)
                        .ok_or_else(|| format!("timestamp {raw} is out of range"))?,
                )
            }
        }
    })
}

/// The fast path for the most common time form, `YYYY-MM-DDTHH:MM:SS[.fraction]Z` with a year
/// in 1900–2199, in microseconds (a fraction finer than that truncated, as arrow's parser's
/// nanoseconds are). `None` for every other form (offsets, spaces, other years, invalid
/// dates), which arrow's parser then reads; where this accepts, it agrees with it (tested).
fn utc_micros(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || *b.last()? != b'Z' {
        return None;
    }
    let number = |from: usize, to: usize| -> Option<i64> {
        b[from..to].iter().try_fold(0i64, |n, c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    };
    let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
    let (hour, minute, second) = (number(11, 13)?, number(14, 16)?, number(17, 19)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if !(1900..2200).contains(&year) || day < 1 || day > month_days {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut nanos = 0;
    match &b[19..b.len() - 1] {
        [] => {}
        [b'.', fraction @ ..] if (1..=9).contains(&fraction.len()) => {
            nanos = number(20, 20 + fraction.len())? * 10i64.pow(9 - fraction.len() as u32);
        }
        _ => return None,
    }
    // Days from 1970-01-01 to the date (the proleptic Gregorian calendar's civil-day count).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * m + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some(seconds * 1_000_000 + nanos / 1000)
}

/// A JSON integer (`raw` is valid JSON, so `str::parse` sees no `+` and no leading zeros);
/// none for anything else, fractions and exponents included.
fn integer(raw: &str) -> Option<i64> {
    raw.parse::<i64>().ok()
}

/// `19.99` with scale 2 → 1999. Rejects more fractional digits than the scale allows (no silent
/// rounding) and values with more digits than the precision.
fn parse_decimal(text: &str, precision: u8, scale: u8) -> Result<i128, String> {
    let bad = || {
        format!(
            "expected a decimal({precision},{scale}), found {}",
            shorten(text)
        )
    };
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if int_part.is_empty()
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let frac_trimmed = frac_part.trim_end_matches('0');
    if frac_trimmed.len() > scale as usize {
        return Err(format!(
            "{} has more than {scale} decimal places",
            shorten(text)
        ));
    }
    let int_trimmed = int_part.trim_start_matches('0');
    if int_trimmed.len() + scale as usize > precision as usize {
        return Err(format!(
            "{} has more than {} digits before the point",
            shorten(text),
            precision - scale
        ));
    }
    let mut value: i128 = 0;
    for b in int_trimmed.bytes().chain(frac_trimmed.bytes()) {
        value = value * 10 + i128::from(b - b'0');
    }
    for _ in frac_trimmed.len()..scale as usize {
        value *= 10;
    }
    Ok(if negative { -value } else { value })
}

fn shorten(raw: &str) -> String {
    const SHOWN_CHARS_MAX: usize = 40;
    if raw.chars().count() <= SHOWN_CHARS_MAX {
        raw.to_owned()
    } else {
        format!("{}…", raw.chars().take(SHOWN_CHARS_MAX).collect::<String>())
    }
}

#[cfg(test)]
mod tests;
