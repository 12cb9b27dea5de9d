//! The serving layer read by engines that are not ours: pyiceberg and DuckDB.
#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Decimal128Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use kappa_lakehouse::{Lakehouse, table_ident};
use kappa_testkit::python::{READ_TABLE_SCRIPT, run_python};

#[tokio::test]
async fn pyiceberg_and_duckdb_read_what_we_commit() {
    let dir = tempfile::tempdir().unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("order_id", DataType::Int64, false),
        Field::new("region", DataType::Utf8, true),
        Field::new("amount", DataType::Decimal128(10, 2), false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
            false,
        ),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![1, 2])),
            Arc::new(StringArray::from(vec![Some("north"), None])),
            Arc::new(
                Decimal128Array::from(vec![1999_i128, 450])
                    .with_precision_and_scale(10, 2)
                    .unwrap(),
            ),
            Arc::new(
                TimestampMicrosecondArray::from(vec![1_767_600_000_000_000, 1_767_600_001_000_000])
                    .with_timezone("+00:00"),
            ),
        ],
    )
    .unwrap();
    let lakehouse = Lakehouse::open(dir.path()).await.unwrap();
    let ident = table_ident("silver", "orders").unwrap();
    let table = lakehouse.ensure_table(&ident, &schema).await.unwrap();
    let props = HashMap::from([("kappa.offsets".to_owned(), "orders/0:2".to_owned())]);
    lakehouse.append(&table, &[batch], props).await.unwrap();

    let data = dir.path().to_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        run_python(READ_TABLE_SCRIPT, &[&data, "silver.orders"])
    })
    .await
    .unwrap();
    let read: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let expected = serde_json::json!([
        {"order_id": "1", "region": "north", "amount": "19.99", "ts": "2026-01-05 08:00:00+00:00"},
        {"order_id": "2", "region": null, "amount": "4.50", "ts": "2026-01-05 08:00:01+00:00"},
    ]);
    assert_eq!(read["pyiceberg"], expected, "{out}");
    assert_eq!(read["duckdb"], expected, "{out}");
    assert_eq!(read["summary"]["kappa.offsets"], "orders/0:2");
}
