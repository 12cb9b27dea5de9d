//! Arrow schemas of topics, from their declared fields.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use kappa_pipeline::{FieldType, TopicSpec};

/// How Arrow spells the UTC zone of Iceberg's `timestamptz`.
pub const UTC: &str = "+00:00";

/// The column holding the raw JSON of each record of an untyped topic.
pub const UNTYPED_VALUE_COLUMN: &str = "value";

/// The Arrow type a declared field type reads as.
pub fn arrow_type(t: FieldType) -> DataType {
    match t {
        FieldType::String | FieldType::Json => DataType::Utf8,
        FieldType::Boolean => DataType::Boolean,
        FieldType::Int => DataType::Int32,
        FieldType::Bigint => DataType::Int64,
        FieldType::Double => DataType::Float64,
        FieldType::Decimal { precision, scale } => DataType::Decimal128(precision, scale as i8),
        FieldType::Date => DataType::Date32,
        // Iceberg's timestamptz: microseconds, UTC, written "+00:00" in Arrow.
        FieldType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())),
    }
}

/// The schema a topic's records are read with: its declared fields, or one `value` column of
/// JSON text for an untyped topic.
pub fn topic_schema(topic: &TopicSpec) -> SchemaRef {
    if topic.fields.is_empty() {
        return Arc::new(Schema::new(vec![Field::new(
            UNTYPED_VALUE_COLUMN,
            DataType::Utf8,
            false,
        )]));
    }
    let fields: Vec<Field> = topic
        .fields
        .iter()
        .map(|f| Field::new(&f.name, arrow_type(f.data_type), !f.required))
        .collect();
    Arc::new(Schema::new(fields))
}
