//! Bronze: every topic's records exactly as they arrived, in the Iceberg table
//! `bronze.<topic>`, append-only.
//!
//! ```text
//!  topic partitions ──read in step──► one row per record: topic, partition, offset, key,
//!   (BronzeSource)                    value (the bytes), timestamp (the log's), ingest_time
//!                   ──► append snapshot carrying the next offsets (`kappa.offsets`)
//! ```
//!
//! It runs on the one runner (`runner::run_bronze_table`): [`BronzeSource`] is its source, an
//! `operator::Appended` its operator.
//!
//! Nothing is decoded, so nothing is rejected: a record that no model can decode is still here,
//! byte for byte. One exception keeps personal data out of the warehouse: a top-level field
//! that a model reading the topic masks (`[mask]`, by the field's name) is stored as
//! `"[redacted]"` — in the value, and as the key when the topic is keyed by it
//! ([`redacted_fields`]). Exactly once as a model's table: the offsets are committed with the rows, a
//! restart reads on from them, and a commit whose outcome is unknown is resolved by its attempt
//! id. The table is no model's and has no versions: its schema is fixed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{
    Int32Builder, Int64Builder, LargeBinaryBuilder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use kappa_lakehouse::{Lakehouse, TableIdent};

use crate::commit_record::Offsets;
use crate::event_log::EventLog;
use crate::runner::RunnerError;
use crate::source::{Source, SourceError, Taken, Waiter};
use crate::topic_source::{READ_BYTES, TopicReaders, read_some};

pub use kappa_pipeline::BRONZE_LAYER;

/// How a bronze table is partitioned: by the day its records reached the log.
pub const BRONZE_PARTITION_BY: &str = "day(timestamp)";

/// What bronze's commits record as their version, and its throughput metric's label.
pub const BRONZE_VERSION: &str = "raw";

/// The schema of every bronze table.
pub fn bronze_schema() -> SchemaRef {
    let time = DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into()));
    Arc::new(Schema::new(vec![
        Field::new("topic", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        // Iceberg's `binary` is Arrow's LargeBinary.
        Field::new("key", DataType::LargeBinary, true),
        Field::new("value", DataType::LargeBinary, false),
        Field::new("timestamp", time.clone(), false),
        Field::new("ingest_time", time, false),
    ]))
}

/// `bronze.<topic>`.
pub fn bronze_table(topic: &str) -> kappa_lakehouse::Result<TableIdent> {
    kappa_lakehouse::table_ident(BRONZE_LAYER, topic)
}

/// How a bronze runner is named in errors and logs.
fn who(topic: &str) -> String {
    format!("{BRONZE_LAYER}.{topic}")
}

/// The fields of `topic` stored redacted in its bronze table: those a model reading it masks
/// under the field's own name; and whether the record key is one of them.
pub fn redacted_fields(project: &kappa_pipeline::Project, topic: &str) -> Redactions {
    let Some(spec) = project.topics.get(topic) else {
        return Redactions::default();
    };
    let mut fields = BTreeSet::new();
    for id in &project.order {
        let model = &project.models[id];
        if model.config.mask.is_empty() || !project.source_topics(id).contains(topic) {
            continue;
        }
        for column in model.config.mask.keys() {
            if spec.fields.iter().any(|f| f.name == *column) {
                fields.insert(column.clone());
            }
        }
    }
    let key = spec.key.as_ref().is_some_and(|k| fields.contains(k));
    Redactions { fields, key }
}

/// What a bronze table stores redacted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redactions {
    pub fields: BTreeSet<String>,
    pub key: bool,
}

/// Copies `topic`'s records into `bronze.<topic>` until `stop` turns true, with `redact`'s
/// fields redacted; returns an error (to be restarted after a pause) when the log or the
/// lakehouse fails.
pub async fn run_bronze(
    log: EventLog,
    lakehouse: Lakehouse,
    topic_name: String,
    redact: Redactions,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), RunnerError> {
    let name = who(&topic_name);
    let lake_err = |source| RunnerError::Lakehouse {
        model: name.clone(),
        source,
    };
    let log_err = |source| RunnerError::Log {
        model: name.clone(),
        source,
    };
    let readers =
        TopicReaders::of(&log, &topic_name, Some((&name, BRONZE_VERSION))).map_err(log_err)?;
    let ident = bronze_table(&topic_name).map_err(lake_err)?;
    let schema = bronze_schema();
    let table = lakehouse
        .ensure_partitioned_table(&ident, &schema, &[BRONZE_PARTITION_BY.to_owned()])
        .await
        .map_err(lake_err)?;
    if !lakehouse.schema_matches(&table, &schema) {
        return Err(RunnerError::Unsupported {
            model: name.clone(),
            reason: format!(
                "the table {name} exists but is not a bronze table (an earlier model of that \
                 name wrote it?); bronze keeps every record of the topic from its start, in a \
                 table of its own schema: drop that table, or use a fresh data directory"
            ),
        });
    }
    let source = BronzeSource {
        name: topic_name,
        readers,
        redact,
        schema: schema.clone(),
    };
    let copy = crate::runner::BronzeCopy {
        name,
        ident,
        table,
        partition_by: vec![BRONZE_PARTITION_BY.to_owned()],
        version: BRONZE_VERSION,
    };
    crate::runner::run_bronze_table(
        &log,
        lakehouse,
        copy,
        Box::new(source),
        Box::new(crate::operator::Appended::new(schema)),
        stop,
    )
    .await
}

/// A topic's records as bronze rows, byte for byte (redactions aside): the source of its
/// bronze table. Its position is the topic's, under the topic's name.
pub(crate) struct BronzeSource {
    name: String,
    readers: TopicReaders,
    redact: Redactions,
    schema: SchemaRef,
}

#[async_trait::async_trait]
impl Source for BronzeSource {
    fn key(&self) -> &str {
        &self.name
    }

    fn rewind(&mut self, committed: &Offsets) -> Result<(), SourceError> {
        self.readers
            .rewind(committed.get(&self.name))
            .map_err(|e| SourceError::Read(format!("{}: {e}", self.name)))
    }

    async fn read(&mut self, max: usize) -> Result<Taken, SourceError> {
        let read_err = |e: String| SourceError::Read(format!("{}: {e}", self.name));
        let (batch, records) = match &mut self.readers {
            TopicReaders::Embedded { topic, readers } => {
                let read = read_some(topic.partitions(), readers, max, READ_BYTES);
                let batch = rows(
                    &self.schema,
                    &self.name,
                    embedded(&self.name, &read.chunks),
                    &self.redact,
                )
                .map_err(|e| read_err(e.to_string()))?;
                (batch, read.records)
            }
            TopicReaders::Kafka(kafka) => {
                let read = kafka.read(max).map_err(read_err)?;
                let now_ms = now_us() / 1000;
                let records = read.iter().map(|(partition, r)| BronzeRecord {
                    partition: *partition,
                    offset: r.offset,
                    key: r.record.key.as_deref(),
                    value: &r.record.value,
                    timestamp_ms: r.timestamp_ms.unwrap_or(now_ms),
                });
                let batch = rows(&self.schema, &self.name, records, &self.redact)
                    .map_err(|e| read_err(e.to_string()))?;
                (batch, read.len())
            }
        };
        Ok(Taken {
            batch,
            rejected: Vec::new(),
            watermark: None,
            records,
            full: records >= max,
        })
    }

    fn position(&self) -> BTreeMap<u32, u64> {
        self.readers.position()
    }

    fn landed(&mut self, committed: &Offsets) {
        self.readers.landed(committed.get(&self.name));
    }

    fn waiter(&self) -> Waiter {
        self.readers.waiter()
    }
}

/// A record as bronze keeps it.
struct BronzeRecord<'a> {
    partition: u32,
    offset: u64,
    key: Option<&'a [u8]>,
    value: &'a [u8],
    timestamp_ms: i64,
}

/// The records of chunks read from the embedded log.
fn embedded<'a>(
    topic: &'a str,
    chunks: &'a [(u32, kappa_log::RecordChunk)],
) -> impl Iterator<Item = BronzeRecord<'a>> {
    chunks.iter().flat_map(move |(partition, chunk)| {
        chunk.records().filter_map(move |record| match record {
            Ok(record) => Some(BronzeRecord {
                partition: *partition,
                offset: record.offset,
                key: record.key,
                value: record.value,
                timestamp_ms: record.timestamp_ms,
            }),
            Err(e) => {
                // A batch that passed its CRC but does not decode: the log reports it.
                tracing::error!(error = %e, topic, partition, "unreadable record");
                None
            }
        })
    })
}

/// Microseconds since the epoch.
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// One row per record.
fn rows<'a>(
    schema: &SchemaRef,
    topic: &str,
    records: impl Iterator<Item = BronzeRecord<'a>>,
    redact: &Redactions,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let now_us = now_us();
    let mut topics = StringBuilder::new();
    let mut partitions = Int32Builder::new();
    let mut offsets = Int64Builder::new();
    let mut keys = LargeBinaryBuilder::new();
    let mut values = LargeBinaryBuilder::new();
    let mut times = TimestampMicrosecondBuilder::new().with_timezone("+00:00");
    let mut ingested = TimestampMicrosecondBuilder::new().with_timezone("+00:00");
    for record in records {
        topics.append_value(topic);
        partitions.append_value(i32::try_from(record.partition).unwrap_or(i32::MAX));
        offsets.append_value(i64::try_from(record.offset).unwrap_or(i64::MAX));
        if redact.key && record.key.is_some() {
            keys.append_value(REDACTED_JSON.trim_matches('"'));
        } else {
            keys.append_option(record.key);
        }
        match redacted(record.value, &redact.fields) {
            Some(value) => values.append_value(value),
            None => values.append_value(record.value),
        }
        times.append_value(record.timestamp_ms.saturating_mul(1000));
        ingested.append_value(now_us);
    }
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(topics.finish()),
            Arc::new(partitions.finish()),
            Arc::new(offsets.finish()),
            Arc::new(keys.finish()),
            Arc::new(values.finish()),
            Arc::new(times.finish()),
            Arc::new(ingested.finish()),
        ],
    )
}

/// `"[redacted]"` as JSON.
const REDACTED_JSON: &str = "\"[redacted]\"";

/// `value` with the top-level `fields` of its JSON object redacted, the other fields' bytes
/// kept and in their order; `None` when nothing needs redacting (not an object, or none of
/// the fields in it).
fn redacted(value: &[u8], fields: &BTreeSet<String>) -> Option<Vec<u8>> {
    if fields.is_empty() {
        return None;
    }
    let members: Members<'_> = serde_json::from_slice(value).ok()?;
    if !members.0.iter().any(|(k, _)| fields.contains(k.as_ref())) {
        return None;
    }
    let mut out = Vec::with_capacity(value.len());
    out.push(b'{');
    for (i, (name, raw)) in members.0.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // A name re-encoded as JSON: the same text it arrived as, escapes normalized.
        out.extend_from_slice(serde_json::to_string(name.as_ref()).ok()?.as_bytes());
        out.push(b':');
        if fields.contains(name.as_ref()) {
            out.extend_from_slice(REDACTED_JSON.as_bytes());
        } else {
            out.extend_from_slice(raw.get().as_bytes());
        }
    }
    out.push(b'}');
    Some(out)
}

/// A JSON object's members in their order, values unparsed.
struct Members<'a>(Vec<(std::borrow::Cow<'a, str>, &'a serde_json::value::RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    members.push(entry);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_fields_are_redacted_and_the_rest_keeps_its_bytes() {
        let fields: BTreeSet<String> = ["email".to_owned()].into();
        let value = br#"{"id": 7, "email":"a@b.c","nested":{"email":"x"},"n":1.50}"#;
        assert_eq!(
            String::from_utf8(redacted(value, &fields).unwrap()).unwrap(),
            r#"{"id":7,"email":"[redacted]","nested":{"email":"x"},"n":1.50}"#
        );
        assert_eq!(redacted(br#"{"id":7}"#, &fields), None);
        assert_eq!(redacted(br#"["email"]"#, &fields), None);
        assert_eq!(redacted(b"not json", &fields), None);
        let escaped = br#"{"email":"a@b.c"}"#;
        assert_eq!(
            String::from_utf8(redacted(escaped, &fields).unwrap()).unwrap(),
            r#"{"email":"[redacted]"}"#
        );
    }
}
