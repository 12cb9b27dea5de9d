use datafusion::arrow::array::Int64Array;
use datafusion::catalog::{MemTable, MemoryCatalogProvider, MemorySchemaProvider};

use super::*;
#[allow(unused_imports)]
use super::{auth::*, catalog::*, limits::*, statements::*};
use datafusion::catalog::{CatalogProvider, SchemaProvider};

/// A catalog whose schema `gold` has tables `a` and `b`, each one row of `value`.
fn state(value: i64) -> Arc<dyn CatalogProvider> {
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("v", arrow::datatypes::DataType::Int64, false),
    ]));
    let batch = arrow::array::RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(Int64Array::from(vec![value]))],
    )
    .unwrap();
    let layer = MemorySchemaProvider::new();
    for name in ["a", "b"] {
        let table = MemTable::try_new(schema.clone(), vec![vec![batch.clone()]]).unwrap();
        layer.register_table(name.into(), Arc::new(table)).unwrap();
    }
    let catalog = MemoryCatalogProvider::new();
    catalog.register_schema("gold", Arc::new(layer)).unwrap();
    Arc::new(catalog)
}

/// The engine's settings and file writes are refused however they are spelled; the
/// session's own settings and queries that merely mention the word pass.
#[test]
fn engine_settings_and_copy_are_refused_however_spelled() {
    for refused in [
        "SET datafusion.runtime.memory_limit = '1T'",
        "SET \"datafusion\".runtime.memory_limit='100G'",
        "RESET \"datafusion\".runtime.memory_limit",
        "ABORT; SET datafusion.runtime.memory_limit='1T'",
        "/* hi */ set datafusion . runtime.temp_directory = '/x'",
        "-- note\nSET SESSION datafusion.execution.target_partitions TO 64",
        "COPY (SELECT 1) TO '/tmp/x.csv'",
    ] {
        let refused_as = refuse_engine_settings(refused).unwrap_err().to_string();
        assert!(
            refused_as.contains("42501")
                || refused_as.contains("refused")
                || refused_as.contains("server's"),
            "{refused}: {refused_as}"
        );
    }
    for passes in [
        "SET statement_timeout = '5s'",
        "SET application_name = 'datafusion.x'",
        "SET application_name TO 'datafusion.x'",
        "SELECT 'datafusion.runtime' AS x",
        "SELECT count(*) FROM silver.orders",
    ] {
        assert!(refuse_engine_settings(passes).is_ok(), "{passes}");
    }
    for write in [
        "INSERT INTO silver.orders VALUES (1)",
        "delete from gold.revenue",
        "SELECT 1; DROP TABLE silver.orders",
        "/* x */ CREATE TABLE t (a int)",
    ] {
        let refused_as = refuse_engine_settings(write).unwrap_err().to_string();
        assert!(
            refused_as.contains("25006") && refused_as.contains("read-only"),
            "{write}: {refused_as}"
        );
    }
}

/// A query planned on one state of the catalog reads that state in all its tables, though
/// the endpoint moves on (a cutover) before it runs; the connection's next query reads the
/// new state.
#[tokio::test]
async fn a_query_reads_one_catalog_state_in_all_its_tables() {
    let endpoint = LiveCatalog::default();
    endpoint.set(state(1));
    let connection = Arc::new(endpoint.pinned());
    let ctx = SessionContext::new();
    ctx.register_catalog("kappa", connection.clone());
    let sql = "SELECT a.v, b.v FROM kappa.gold.a a CROSS JOIN kappa.gold.b b";
    let planned = ctx.sql(sql).await.unwrap();
    // The cutover lands between the plan and the scans.
    endpoint.set(state(2));
    let rows = planned.collect().await.unwrap();
    let values: Vec<i64> = (0..2)
        .map(|c| {
            rows[0]
                .column(c)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0)
        })
        .collect();
    assert_eq!(values, [1, 1]);
    // The next query starts by pinning the endpoint's state.
    connection.pin(&endpoint);
    let rows = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let a = rows[0]
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0);
    assert_eq!(a, 2);
}

/// A statement planned before a deploy changed a table's columns fails with Postgres'
/// "cached plan must not change result type" (0A000), so that drivers prepare it again,
/// instead of reading the old version beside the others' new state.
#[tokio::test]
async fn a_plan_over_changed_columns_fails_as_postgres_does() {
    let endpoint = LiveCatalog::default();
    endpoint.set(state(1));
    let connection = Arc::new(endpoint.pinned());
    let ctx = SessionContext::new();
    ctx.register_catalog("kappa", connection.clone());
    let planned = ctx.sql("SELECT v FROM kappa.gold.a").await.unwrap();
    // The deploy: gold.a now has a column of another type.
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("v", arrow::datatypes::DataType::Utf8, false),
    ]));
    let layer = MemorySchemaProvider::new();
    let table = MemTable::try_new(schema, vec![vec![]]).unwrap();
    layer.register_table("a".into(), Arc::new(table)).unwrap();
    let catalog = MemoryCatalogProvider::new();
    catalog.register_schema("gold", Arc::new(layer)).unwrap();
    endpoint.set(Arc::new(catalog));
    connection.pin(&endpoint);
    let error = planned.collect().await.unwrap_err().to_string();
    assert!(error.contains(CHANGED_RESULT_TYPE), "{error}");
    assert_eq!(sqlstate(&error), "0A000");
}
