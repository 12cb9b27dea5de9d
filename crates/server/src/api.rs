//! The HTTP API's request and response bodies, shared by the server and the client.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use kappa_log::{Header, PartitionStats, RecordPosition, RecordRef, Topic, TopicConfig};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub pid: u32,
    /// The data directory this server owns, absolute.
    pub data_dir: String,
    /// Largest request body the server accepts (absent when a client opened the directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_bytes: Option<usize>,
}

/// `POST /v1/topics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTopic {
    pub name: String,
    #[serde(default)]
    pub config: TopicConfig,
}

/// A topic and the state of its partitions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicInfo {
    pub name: String,
    pub config: TopicConfig,
    pub partitions: Vec<PartitionInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionInfo {
    pub partition: u32,
    pub start_offset: u64,
    pub appended_offset: u64,
    pub durable_offset: u64,
    pub visible_offset: u64,
    pub segment_count: usize,
    pub size_bytes: u64,
}

impl TopicInfo {
    pub fn of(topic: &Topic) -> TopicInfo {
        TopicInfo {
            name: topic.name().to_owned(),
            config: topic.config().clone(),
            partitions: topic
                .stats()
                .into_iter()
                .enumerate()
                .map(|(p, s): (usize, PartitionStats)| PartitionInfo {
                    partition: p as u32,
                    start_offset: s.offsets.start_offset,
                    appended_offset: s.offsets.appended_offset,
                    durable_offset: s.offsets.durable_offset,
                    visible_offset: s.offsets.visible_offset,
                    segment_count: s.segment_count,
                    size_bytes: s.size_bytes,
                })
                .collect(),
        }
    }

    /// Records kept across all partitions.
    pub fn record_count(&self) -> u64 {
        self.partitions
            .iter()
            .map(|p| p.visible_offset - p.start_offset)
            .sum()
    }
}

/// `POST /v1/topics/{topic}/records`: where every record landed, in input order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProduceResponse {
    pub topic: String,
    pub records: u64,
    pub offsets: Vec<RecordPosition>,
}

/// `POST /v1/sql`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlRequest {
    pub sql: String,
}

/// A query's result: the columns, then rows of JSON values in column order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SqlResponse {
    pub columns: Vec<SqlColumn>,
    pub rows: Vec<Vec<serde_json::Value>>,
}

/// One result column: its name and its Arrow type as Arrow prints it (`Int64`, `Utf8`,
/// `Decimal128(10, 2)`, `Timestamp(µs, "+00:00")`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqlColumn {
    pub name: String,
    #[serde(rename = "type")]
    pub data_type: String,
}

impl SqlResponse {
    /// Converts a result to JSON values as arrow-json writes them (numbers for integers and
    /// floats; RFC 3339 text for times; `null`), except decimals, which are text so that no
    /// digit is lost to a JSON reader's floats. Column by column, so columns that share a name
    /// (`SELECT a.id, b.id`) stay apart.
    pub fn from_batches(
        schema: &arrow::datatypes::Schema,
        batches: &[arrow::array::RecordBatch],
    ) -> Result<SqlResponse, String> {
        let columns = schema
            .fields()
            .iter()
            .map(|f| SqlColumn {
                name: f.name().clone(),
                data_type: f.data_type().to_string(),
            })
            .collect();
        let mut rows = Vec::new();
        for batch in batches {
            let mut batch_rows: Vec<Vec<serde_json::Value>> =
                vec![Vec::with_capacity(schema.fields().len()); batch.num_rows()];
            for (index, field) in batch.schema().fields().iter().enumerate() {
                let mut values = batch.column(index).clone();
                let mut field = field.as_ref().clone().with_name("v");
                if matches!(
                    field.data_type(),
                    arrow::datatypes::DataType::Decimal128(..)
                        | arrow::datatypes::DataType::Decimal256(..)
                ) {
                    values = arrow::compute::cast(&values, &arrow::datatypes::DataType::Utf8)
                        .map_err(|e| e.to_string())?;
                    field = field.with_data_type(arrow::datatypes::DataType::Utf8);
                }
                let single = arrow::datatypes::Schema::new(vec![field]);
                let column =
                    arrow::array::RecordBatch::try_new(std::sync::Arc::new(single), vec![values])
                        .map_err(|e| e.to_string())?;
                let mut writer = arrow::json::ArrayWriter::new(Vec::new());
                writer.write(&column).map_err(|e| e.to_string())?;
                writer.finish().map_err(|e| e.to_string())?;
                let objects: Vec<serde_json::Map<String, serde_json::Value>> =
                    serde_json::from_slice(&writer.into_inner()).map_err(|e| e.to_string())?;
                // arrow-json leaves NULLs out of the object, and writes no objects at all
                // for an empty batch.
                for (row, object) in batch_rows
                    .iter_mut()
                    .zip(objects.into_iter().map(Some).chain(std::iter::repeat(None)))
                {
                    row.push(
                        object
                            .and_then(|mut o| o.remove("v"))
                            .unwrap_or(serde_json::Value::Null),
                    );
                }
            }
            rows.extend(batch_rows);
        }
        Ok(SqlResponse { columns, rows })
    }

    /// The result as a text table for people.
    pub fn to_table(&self) -> String {
        let cell = |v: &serde_json::Value| match v {
            serde_json::Value::Null => String::new(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let mut widths: Vec<usize> = self
            .columns
            .iter()
            .map(|c| c.name.chars().count())
            .collect();
        for row in &self.rows {
            for (w, v) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell(v).chars().count());
            }
        }
        let line = |cells: Vec<String>| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            format!("| {} |\n", padded.join(" | "))
        };
        let rule = format!(
            "+-{}-+\n",
            widths
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("-+-")
        );
        let mut out = rule.clone();
        out.push_str(&line(self.columns.iter().map(|c| c.name.clone()).collect()));
        out.push_str(&rule);
        for row in &self.rows {
            out.push_str(&line(row.iter().map(cell).collect()));
        }
        out.push_str(&rule);
        out.push_str(&format!(
            "{} row{}\n",
            self.rows.len(),
            if self.rows.len() == 1 { "" } else { "s" }
        ));
        out
    }
}

/// `GET /v1/topics/{topic}/partitions/{p}/offsets`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OffsetsResponse {
    pub start_offset: u64,
    pub visible_offset: u64,
    /// With `?timestamp_ms=`: the first offset at or after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset_for_timestamp: Option<u64>,
}

/// One record read back, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub headers: Vec<Header>,
    pub value: Bytes,
}

impl ConsumedRecord {
    pub fn from_ref(topic: &str, partition: u32, r: &RecordRef<'_>) -> ConsumedRecord {
        ConsumedRecord {
            topic: topic.to_owned(),
            partition,
            offset: r.offset,
            timestamp_ms: r.timestamp_ms,
            key: r.key.map(Bytes::copy_from_slice),
            headers: r.headers.to_owned_headers(),
            value: Bytes::copy_from_slice(r.value),
        }
    }

    /// The record as one JSON object: metadata plus the value, embedded as JSON when it is
    /// JSON and as base64 otherwise (never altered).
    pub fn to_envelope(&self) -> Envelope {
        // Embedded only when the JSON text would come back byte for byte: RawValue drops
        // surrounding whitespace, so such values travel as base64 instead.
        let value = std::str::from_utf8(&self.value)
            .ok()
            .filter(|s| s.trim() == *s && serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok())
            .and_then(|s| RawValue::from_string(s.to_owned()).ok())
            .filter(|raw| raw.get().as_bytes() == &self.value[..]);
        Envelope {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            timestamp: format_timestamp(self.timestamp_ms),
            key: self.key.as_deref().map(Text::of),
            headers: self
                .headers
                .iter()
                .map(|h| EnvelopeHeader {
                    key: h.key.clone(),
                    value: h.value.as_deref().map(Text::of),
                })
                .collect(),
            value_base64: if value.is_none() {
                Some(BASE64.encode(&self.value))
            } else {
                None
            },
            value,
        }
    }

    pub fn from_envelope(e: Envelope) -> Result<ConsumedRecord, String> {
        let value = match (e.value, e.value_base64) {
            (Some(raw), _) => Bytes::from(raw.get().to_owned()),
            (None, Some(b64)) => Bytes::from(BASE64.decode(b64).map_err(|err| err.to_string())?),
            (None, None) => return Err("record has neither `value` nor `value_base64`".into()),
        };
        Ok(ConsumedRecord {
            topic: e.topic,
            partition: e.partition,
            offset: e.offset,
            timestamp_ms: e.timestamp_ms,
            key: e.key.map(Text::into_bytes).transpose()?,
            headers: e
                .headers
                .into_iter()
                .map(|h| {
                    Ok(Header {
                        key: h.key,
                        value: h.value.map(Text::into_bytes).transpose()?,
                    })
                })
                .collect::<Result<_, String>>()?,
            value,
        })
    }
}

/// A record as the API and `kappa consume --json` show it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    /// The same instant as RFC 3339, for people.
    pub timestamp: String,
    pub key: Option<Text>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<EnvelopeHeader>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EnvelopeHeader {
    pub key: String,
    pub value: Option<Text>,
}

/// Bytes shown as text when they are UTF-8, as `{"base64": …}` otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Text {
    Utf8(String),
    Binary { base64: String },
}

impl Text {
    fn of(bytes: &[u8]) -> Text {
        match std::str::from_utf8(bytes) {
            Ok(s) => Text::Utf8(s.to_owned()),
            Err(_) => Text::Binary {
                base64: BASE64.encode(bytes),
            },
        }
    }

    fn into_bytes(self) -> Result<Bytes, String> {
        match self {
            Text::Utf8(s) => Ok(Bytes::from(s)),
            Text::Binary { base64 } => BASE64
                .decode(base64)
                .map(Bytes::from)
                .map_err(|e| e.to_string()),
        }
    }
}

/// A byte count in B, KiB, MiB, GiB or TiB.
pub fn format_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// Iceberg snapshot ids in JSON as strings: they are random 63-bit numbers, and jq or
/// JavaScript round numbers above 2^53. Reads a number too.
pub mod snapshot_id {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) => s.serialize_str(&id.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Id {
            Text(String),
            Number(i64),
        }
        match Option::<Id>::deserialize(d)? {
            None => Ok(None),
            Some(Id::Number(n)) => Ok(Some(n)),
            Some(Id::Text(t)) => t.parse().map(Some).map_err(serde::de::Error::custom),
        }
    }
}

/// Milliseconds since the epoch as RFC 3339 (UTC, millisecond precision).
pub fn format_timestamp(ms: i64) -> String {
    // RFC 3339 has four-digit years; later (or earlier) instants are shown as the number.
    const YEAR_10000_MS: u64 = 253_402_300_800_000;
    match u64::try_from(ms) {
        Ok(ms) if ms < YEAR_10000_MS => {
            let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
            humantime::format_rfc3339_millis(time).to_string()
        }
        _ => ms.to_string(),
    }
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable machine-readable kind, e.g. `unknown_topic`, `malformed_record`.
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byte_offset: Option<u64>,
    /// For a rejected record: the reason alone, without its position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topics: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lists_every_version_with_its_progress() {
        let mut replaying = VersionStatus::new("gold.revenue", "404363d065d95bc2", "replaying");
        replaying.percent_done = Some(52.4);
        replaying.records_per_second = Some(480_000.0);
        replaying.eta_seconds = Some(1.2);
        let mut retired = VersionStatus::new("gold.revenue", "0a1b2c3d4e5f6071", "retired");
        retired.detail = Some("kept for `kappa rollback gold.revenue`".into());
        let status = StatusResponse {
            models: vec![ModelStatus {
                model: "gold.revenue".into(),
                state: "running".into(),
                detail: None,
                version: "c46e19e1d11804a3".into(),
                table_version: None,
                rows: Some(12),
                bytes: Some(48_310),
                last_commit: Some("2026-12-02T10:59:59.500Z".into()),
                lag_records: 0,
                lag_seconds: Some(0.0),
                records_per_second: None,
                dead_letters: 0,
            }],
            bronze: Vec::new(),
            dead_letters: Vec::new(),
            versions: vec![
                VersionStatus::new("gold.revenue", "c46e19e1d11804a3", "live"),
                replaying,
                retired,
            ],
            alerts: vec![crate::alerts::Alert {
                at: "2026-12-02T11:00:00.000Z".into(),
                kind: "lag".into(),
                model: Some("gold.revenue".into()),
                message: "gold.revenue is 12000 records behind".into(),
                delivered: 1,
                failed: 1,
                attempts: 6,
            }],
        };
        expect_test::expect![[r#"
            MODEL         STATE              ROWS        SIZE       LAG  DEAD LETTERS  LAST COMMIT
            gold.revenue  running              12    47.2 KiB         0             0  2026-12-02T10:59:59.500Z

            versions:
              gold.revenue  c46e19e1d11804a3  live
              gold.revenue  404363d065d95bc2  replaying 52% · 480000 records/s · ETA 1 s
              gold.revenue  0a1b2c3d4e5f6071  retired · kept for `kappa rollback gold.revenue`

            dead letters: 0

            recent alerts:
              2026-12-02T11:00:00.000Z lag: gold.revenue is 12000 records behind · delivered to 1, failed at 1
        "#]]
        .assert_eq(&status.to_text());
    }

    #[test]
    fn envelopes_round_trip_json_and_binary_values() {
        for value in [
            &b"{\"a\": [1, 2]}"[..],
            b" {\"padded\": true} ",
            b"not json",
            b"\xff\x00binary",
        ] {
            let record = ConsumedRecord {
                topic: "t".into(),
                partition: 2,
                offset: 9,
                timestamp_ms: 1_700_000_000_123,
                key: Some(Bytes::from_static(b"\xfekey")),
                headers: vec![Header {
                    key: "h".into(),
                    value: Some(Bytes::from_static(b"v")),
                }],
                value: Bytes::copy_from_slice(value),
            };
            let json = serde_json::to_string(&record.to_envelope()).unwrap();
            let back = ConsumedRecord::from_envelope(serde_json::from_str(&json).unwrap()).unwrap();
            assert_eq!(back, record, "{json}");
        }
        assert_eq!(
            format_timestamp(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
    }

    #[test]
    fn sql_results_keep_columns_apart_and_nulls_in_place() {
        use arrow::array::{ArrayRef, Decimal128Array, Int64Array, StringArray};
        use arrow::datatypes::{DataType, Field, Schema};
        use serde_json::json;
        use std::sync::Arc;
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("id", DataType::Utf8, true),
            Field::new("amount", DataType::Decimal128(10, 2), true),
        ]));
        let batch = arrow::array::RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![Some(1), None])) as ArrayRef,
                Arc::new(StringArray::from(vec![None, Some("b")])),
                Arc::new(
                    Decimal128Array::from(vec![Some(3998), Some(-5)])
                        .with_precision_and_scale(10, 2)
                        .unwrap(),
                ),
            ],
        )
        .unwrap();
        let result = SqlResponse::from_batches(&schema, &[batch]).unwrap();
        assert_eq!(
            result.rows,
            vec![
                vec![json!(1), json!(null), json!("39.98")],
                vec![json!(null), json!("b"), json!("-0.05")],
            ]
        );
        assert_eq!(result.columns[2].data_type, "Decimal128(10, 2)");

        // No rows: the columns are still there.
        let empty = SqlResponse::from_batches(&schema, &[]).unwrap();
        assert_eq!(empty.columns.len(), 3);
        assert!(empty.rows.is_empty());
        assert!(
            empty.to_table().contains("| id | id | amount |"),
            "{}",
            empty.to_table()
        );
    }
}

/// `GET /v1/status`: every model of the project, and the dead letters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusResponse {
    pub models: Vec<ModelStatus>,
    /// `bronze.<topic>` of every topic: its records as they arrived (`model` is the table,
    /// `version` is `raw`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bronze: Vec<ModelStatus>,
    /// Dead letters per model and input topic.
    pub dead_letters: Vec<DeadLetterCount>,
    /// Every version of every model kappa knows: live, replaying, auditing, failed, retired.
    #[serde(default)]
    pub versions: Vec<VersionStatus>,
    /// The last alerts raised, oldest first (a running server's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<crate::alerts::Alert>,
}

/// One version of a model and what it is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionStatus {
    /// `layer.name`.
    pub model: String,
    pub version: String,
    /// `live` (serves), `replaying` (a deploy's new version reading history), `caught up`,
    /// `auditing`, `failed` (`detail` says why), `retired` (replaced; its table is kept for
    /// `kappa rollback`).
    pub state: String,
    /// Of a replaying version: its committed input records of the total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent_done: Option<f64>,
    /// Of a replaying version: input records per second since the deploy started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_per_second: Option<f64>,
    /// Of a replaying version: seconds left at that rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl VersionStatus {
    /// A version that only has a state.
    pub fn new(model: &str, version: &str, state: &str) -> VersionStatus {
        VersionStatus {
            model: model.to_owned(),
            version: version.to_owned(),
            state: state.to_owned(),
            percent_done: None,
            records_per_second: None,
            eta_seconds: None,
            detail: None,
        }
    }
}

/// One model's state, as its runner and its table tell it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelStatus {
    /// `layer.name`.
    pub model: String,
    /// `running`, `restarting` (after an error, `detail` says which), `not running` (the model
    /// cannot run; `detail` says why) or `stopped` (no `kappa up` runs it).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The version of the project's model (a hash of its SQL and configuration).
    pub version: String,
    /// The version that wrote the table's last commit; differs while a change is rebuilding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_version: Option<String>,
    /// Rows in the table's current snapshot; absent when there is no table yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// Bytes of the data files of the table's current snapshot (Parquet, zstd); absent when
    /// there is no table yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// When the last commit was made (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_commit: Option<String>,
    /// Records of its input topics not covered by the last commit.
    pub lag_records: u64,
    /// How far behind in time: 0 when nothing lags, otherwise the age of the last commit
    /// (absent before the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// Input records per second it committed over the last 10 s (a running server's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_per_second: Option<f64>,
    /// Records of its inputs this model sent to the dead-letter topic.
    pub dead_letters: u64,
}

/// Dead letters one model reported for one topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetterCount {
    pub model: String,
    pub topic: String,
    pub count: u64,
    /// The reason of the latest one.
    pub last_reason: String,
}

impl StatusResponse {
    /// The human form `kappa status` prints.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let width = self
            .bronze
            .iter()
            .chain(&self.models)
            .map(|m| m.model.len())
            .max()
            .unwrap_or(5)
            .max(5);
        out.push_str(&format!(
            "{:<width$}  {:<11}  {:>10}  {:>10}  {:>8}  {:>12}  LAST COMMIT\n",
            "MODEL", "STATE", "ROWS", "SIZE", "LAG", "DEAD LETTERS"
        ));
        for m in self.bronze.iter().chain(&self.models) {
            out.push_str(&format!(
                "{:<width$}  {:<11}  {:>10}  {:>10}  {:>8}  {:>12}  {}\n",
                m.model,
                m.state,
                m.rows.map_or_else(|| "-".to_owned(), |r| r.to_string()),
                m.bytes.map_or_else(|| "-".to_owned(), format_bytes),
                m.lag_records,
                m.dead_letters,
                m.last_commit.as_deref().unwrap_or("-"),
            ));
            if let Some(detail) = &m.detail {
                out.push_str(&format!("{:<width$}  ↳ {detail}\n", ""));
            }
        }
        if !self.versions.is_empty() {
            out.push_str("\nversions:\n");
            let width = self
                .versions
                .iter()
                .map(|v| v.model.len())
                .max()
                .unwrap_or(0);
            for v in &self.versions {
                let mut line = format!("  {:<width$}  {:<16}  {}", v.model, v.version, v.state);
                if let Some(done) = v.percent_done {
                    line.push_str(&format!(" {done:.0}%"));
                }
                if let Some(rate) = v.records_per_second {
                    line.push_str(&format!(" · {rate:.0} records/s"));
                }
                if let Some(eta) = v.eta_seconds {
                    line.push_str(&format!(" · ETA {eta:.0} s"));
                }
                if let Some(detail) = &v.detail {
                    line.push_str(&format!(" · {detail}"));
                }
                out.push_str(&line);
                out.push('\n');
            }
        }
        let total: u64 = self.dead_letters.iter().map(|d| d.count).sum();
        out.push_str(&format!("\ndead letters: {total}\n"));
        for d in &self.dead_letters {
            out.push_str(&format!(
                "  {} from {}: {} (latest: {})\n",
                d.model, d.topic, d.count, d.last_reason
            ));
        }
        if !self.alerts.is_empty() {
            out.push_str("\nrecent alerts:\n");
            // The newest five, newest last.
            for a in self.alerts.iter().skip(self.alerts.len().saturating_sub(5)) {
                let delivery = match (a.delivered, a.failed) {
                    (0, 0) => String::new(),
                    (d, 0) => format!(" · delivered to {d}"),
                    (d, f) => format!(" · delivered to {d}, failed at {f}"),
                };
                out.push_str(&format!("  {} {}: {}{delivery}\n", a.at, a.kind, a.message));
            }
        }
        out
    }
}
