//! The serving layer read by engines that are not ours: pyiceberg and DuckDB.
#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Decimal128Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use kappa_lakehouse::{CatalogKind, Lakehouse, LakehouseError, WarehouseConfig, table_ident};
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

/// Copy-on-write: an overwrite replaces some files and keeps the others; every reader sees the
/// table as of the last snapshot, and a commit from a stale table is refused.
#[tokio::test]
async fn overwrites_replace_files_for_every_reader() {
    let dir = tempfile::tempdir().unwrap();
    let (schema, batch) = region_totals();
    let lakehouse = Lakehouse::open(dir.path()).await.unwrap();
    let ident = table_ident("gold", "totals").unwrap();
    let table = lakehouse.ensure_table(&ident, &schema).await.unwrap();

    // Bucket 0 holds north, bucket 1 holds south; first commit adds both.
    let north = lakehouse
        .write_data_files(&table, &[batch(&["north"], &[1])], "b0-")
        .await
        .unwrap();
    let south = lakehouse
        .write_data_files(&table, &[batch(&["south"], &[5])], "b1-")
        .await
        .unwrap();
    let north_path = north[0].file_path().to_owned();
    let south_bytes = south[0].file_size_in_bytes();
    let first = lakehouse
        .overwrite(
            &table,
            &Default::default(),
            north.into_iter().chain(south).collect(),
            HashMap::from([("kappa.offsets".to_owned(), "1".to_owned())]),
        )
        .await
        .unwrap();

    // Second commit rewrites bucket 0 only.
    let north2 = lakehouse
        .write_data_files(&first, &[batch(&["north", "east"], &[3, 7])], "b0-")
        .await
        .unwrap();
    let north2_bytes = north2[0].file_size_in_bytes();
    let second = lakehouse
        .overwrite(
            &first,
            &[north_path.clone()].into(),
            north2,
            HashMap::from([("kappa.offsets".to_owned(), "2".to_owned())]),
        )
        .await
        .unwrap();
    let summary = &second
        .metadata()
        .current_snapshot()
        .unwrap()
        .summary()
        .additional_properties;
    assert_eq!(summary["total-records"], "3");
    assert_eq!(summary["deleted-data-files"], "1");

    // A commit from the stale `first` loses: the catalog moved on.
    let stale = lakehouse
        .overwrite(&first, &[north_path].into(), vec![], HashMap::new())
        .await
        .unwrap_err();
    assert!(stale.to_string().contains("conflicted"), "{stale}");

    // Appends: one that adds nothing (a checkpoint of properties), one that adds a file; the
    // manifests of earlier snapshots are carried, not rewritten.
    let third = lakehouse
        .append_files(
            &second,
            vec![],
            HashMap::from([("kappa.offsets".to_owned(), "3".to_owned())]),
        )
        .await
        .unwrap();
    let west = lakehouse
        .write_data_files(&third, &[batch(&["west"], &[2])], "")
        .await
        .unwrap();
    let west_bytes = west[0].file_size_in_bytes();
    // Data files are written with zstd.
    let west_path = west[0].file_path().trim_start_matches("file://").to_owned();
    let reader =
        parquet::file::reader::SerializedFileReader::new(std::fs::File::open(&west_path).unwrap())
            .unwrap();
    let row_group = parquet::file::reader::FileReader::metadata(&reader).row_group(0);
    for column in row_group.columns() {
        assert!(
            matches!(column.compression(), parquet::basic::Compression::ZSTD(_)),
            "{:?}",
            column.compression()
        );
    }
    let fourth = lakehouse
        .append_files(
            &third,
            west,
            HashMap::from([("kappa.offsets".to_owned(), "4".to_owned())]),
        )
        .await
        .unwrap();
    let summary = &fourth
        .metadata()
        .current_snapshot()
        .unwrap()
        .summary()
        .additional_properties;
    assert_eq!(summary["total-records"], "4");
    assert_eq!(summary["total-data-files"], "3");
    // The bytes of what the table holds now: the rewritten north, south and west.
    assert_eq!(
        summary["total-files-size"],
        (north2_bytes + south_bytes + west_bytes).to_string()
    );
    let second = fourth;

    // State files round-trip.
    let state = batch(&["north"], &[3]);
    let location = lakehouse
        .write_state(&second, "b0", &schema, std::slice::from_ref(&state))
        .await
        .unwrap();
    assert_eq!(
        lakehouse.read_state(&second, &location).await.unwrap(),
        vec![state]
    );

    // DataFusion, pyiceberg and DuckDB agree.
    let (_, ours) = lakehouse
        .query("SELECT region, total FROM gold.totals ORDER BY region")
        .await
        .unwrap();
    assert_eq!(
        arrow::util::pretty::pretty_format_batches(&ours)
            .unwrap()
            .to_string(),
        "+--------+-------+\n| region | total |\n+--------+-------+\n| east   | 7     |\n| north  | 3     |\n| south  | 5     |\n| west   | 2     |\n+--------+-------+"
    );
    let data = dir.path().to_str().unwrap().to_owned();
    let out =
        tokio::task::spawn_blocking(move || run_python(READ_TABLE_SCRIPT, &[&data, "gold.totals"]))
            .await
            .unwrap();
    let read: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let expected = serde_json::json!([
        {"region": "east", "total": "7"},
        {"region": "north", "total": "3"},
        {"region": "south", "total": "5"},
        {"region": "west", "total": "2"},
    ]);
    assert_eq!(read["pyiceberg"], expected, "{out}");
    assert_eq!(read["duckdb"], expected, "{out}");
    assert_eq!(read["summary"]["kappa.offsets"], "4");
}

/// A live table commits often; its metadata, manifests and files stay bounded: old snapshots
/// expire, manifests fold into one, small files merge by size tier, and files nothing uses
/// any more are removed — while every reader still sees every row.
#[tokio::test]
async fn many_small_appends_stay_a_small_table() {
    let dir = tempfile::tempdir().unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("region", DataType::Utf8, true),
    ]));
    // Replaced snapshots expire at once here (10 s after they were replaced by default).
    let lakehouse = Lakehouse::open(dir.path())
        .await
        .unwrap()
        .with_replaced_snapshot_ms(0);
    let ident = table_ident("silver", "live").unwrap();
    let mut table = lakehouse.ensure_table(&ident, &schema).await.unwrap();
    let commits: i64 = 150;
    for commit in 0..commits {
        let ids: Vec<i64> = (commit * 10..commit * 10 + 10).collect();
        let regions: Vec<Option<&str>> = ids
            .iter()
            .map(|i| (i % 3 != 0).then_some("north"))
            .collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(ids)),
                Arc::new(StringArray::from(regions)),
            ],
        )
        .unwrap();
        let props = HashMap::from([("kappa.offsets".to_owned(), format!("{commit}"))]);
        table = lakehouse.append(&table, &[batch], props).await.unwrap();
    }
    let metadata = table.metadata();
    assert!(metadata.snapshots().count() <= kappa_lakehouse::commit::SNAPSHOTS_KEPT);
    let current = metadata.current_snapshot().unwrap();
    let summary = &current.summary().additional_properties;
    assert_eq!(summary["kappa.offsets"], format!("{}", commits - 1));
    assert_eq!(summary["total-records"], (commits * 10).to_string());
    let files: usize = summary["total-data-files"].parse().unwrap();
    assert!(
        files < 2 * kappa_lakehouse::commit::TIER_FILES,
        "{files} data files"
    );

    // Files of expired snapshots go; the table reads the same, here and elsewhere.
    let before = count_files(dir.path());
    let removed = lakehouse
        .remove_orphans(&table, std::time::Duration::ZERO)
        .await
        .unwrap();
    assert!(removed > 0 && count_files(dir.path()) == before - removed);
    let (_, batches) = lakehouse
        .query(
            "SELECT count(*) AS n, count(DISTINCT id) AS ids, count(region) AS r FROM silver.live",
        )
        .await
        .unwrap();
    let row = arrow::util::pretty::pretty_format_batches(&batches)
        .unwrap()
        .to_string();
    assert!(row.contains("| 1500 | 1500 | 1000 |"), "{row}");
    let data = dir.path().to_str().unwrap().to_owned();
    let out =
        tokio::task::spawn_blocking(move || run_python(READ_TABLE_SCRIPT, &[&data, "silver.live"]))
            .await
            .unwrap();
    let read: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(read["pyiceberg"].as_array().unwrap().len(), 1500, "{out}");
    assert_eq!(read["duckdb"].as_array().unwrap().len(), 1500, "{out}");
}

/// A table read as a stream (`changes.rs`): a reader that reads every few commits what was
/// added after its position, holding that position, reads every row exactly once while small
/// files merge below it; the table stays small; a reader left behind without a hold is told
/// (a merged file holds rows from before its position) instead of reading rows twice. Every
/// file, merged or not, carries event-time marks (`marks.rs`) that bound its rows.
#[tokio::test]
async fn a_stream_reader_reads_each_appended_row_once_while_files_merge() {
    let dir = tempfile::tempdir().unwrap();
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
    let lakehouse = Lakehouse::open(dir.path())
        .await
        .unwrap()
        .with_replaced_snapshot_ms(0);
    let ident = table_ident("silver", "stream").unwrap();
    let mut table = lakehouse.ensure_table(&ident, &schema).await.unwrap();
    let (mut position, mut read) = (0i64, Vec::new());
    let stale = 40i64;
    lakehouse.hold(&ident, "reader", 0);
    let commits: i64 = 150;
    for commit in 0..commits {
        let ids: Vec<i64> = (commit * 10..commit * 10 + 10).collect();
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(ids))]).unwrap();
        // The ids stand for event times: before the commit partition 0 had reached the last
        // commit's greatest, after it this one's.
        let marks = serde_json::json!({"topic": {"id": {
            "before": {"0": commit * 10 - 1}, "after": {"0": commit * 10 + 9}
        }}});
        table = lakehouse
            .append(
                &table,
                &[batch],
                HashMap::from([(
                    kappa_lakehouse::marks::FILE_MARKS_PROPERTY.to_owned(),
                    marks.to_string(),
                )]),
            )
            .await
            .unwrap();
        if commit % 7 == 6 || commit == commits - 1 {
            let added = lakehouse.added_after(&table, position).await.unwrap();
            assert!(added.continues(position, 0), "merged past the hold");
            assert!(added.files.iter().all(|f| f.sequence > position));
            read.extend(ids_of(&lakehouse, &table, &added).await);
            position = added.last_sequence;
            lakehouse.hold(&ident, "reader", position);
        }
    }
    read.sort_unstable();
    assert_eq!(read, (0..commits * 10).collect::<Vec<_>>());
    let summary = &table
        .metadata()
        .current_snapshot()
        .unwrap()
        .summary()
        .additional_properties;
    let files: usize = summary["total-data-files"].parse().unwrap();
    assert!(
        files < 4 * kappa_lakehouse::commit::TIER_FILES,
        "{files} data files"
    );
    // The merges passed a position nobody held: a reader still there cannot go on (a merged
    // file holds rows it read and rows it did not).
    let added = lakehouse.added_after(&table, stale).await.unwrap();
    assert!(!added.continues(stale, 0), "files merged below the reader");
    // Had the reader begun after those merges, it would read the merged files whole.
    assert!(added.continues(stale, added.last_sequence));
    // From the start, the merged files give every row once.
    let from_start = lakehouse.added_after(&table, 0).await.unwrap();
    let mut again = ids_of(&lakehouse, &table, &from_start).await;
    again.sort_unstable();
    assert_eq!(again, read);
    // Each file's marks bound its rows: before ≤ every row's time ≤ after.
    let mut merged = 0;
    for added_file in &from_start.files {
        let (batches, marks) = lakehouse
            .read_marked_file(&table, &added_file.file)
            .await
            .unwrap();
        let marks = &marks.expect("every file carries marks")["topic"]["id"];
        merged += usize::from(added_file.first < added_file.sequence);
        for batch in batches {
            let ids = batch
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            for id in ids.values() {
                assert!(
                    marks.before[&0] < *id && *id <= marks.after[&0],
                    "{id}: {marks:?}"
                );
            }
        }
    }
    assert!(merged > 0, "no file was merged");
}

/// The `id` column of every file `added` lists, in its order.
async fn ids_of(
    lakehouse: &Lakehouse,
    table: &kappa_lakehouse::Table,
    added: &kappa_lakehouse::Added,
) -> Vec<i64> {
    let mut ids = Vec::new();
    for added_file in &added.files {
        for batch in lakehouse
            .read_data_file(table, &added_file.file)
            .await
            .unwrap()
        {
            let column = batch.column(0).as_any().downcast_ref::<Int64Array>();
            ids.extend(column.unwrap().values().iter().copied());
        }
    }
    ids
}

fn count_files(dir: &std::path::Path) -> usize {
    let mut n = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                pending.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

/// A table partitioned by a column and a day of a timestamp: rows land in one file per
/// partition, carry their partition values, and every reader reads them back.
#[tokio::test]
async fn partitioned_tables_split_rows_by_partition() {
    let dir = tempfile::tempdir().unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("order_id", DataType::Int64, false),
        Field::new("region", DataType::Utf8, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
            false,
        ),
    ]));
    let day = 86_400_000_000i64;
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
            Arc::new(StringArray::from(vec![
                Some("north"),
                Some("south"),
                Some("north"),
                None,
            ])),
            Arc::new(
                TimestampMicrosecondArray::from(vec![
                    1_767_600_000_000_000,
                    1_767_600_000_000_000,
                    1_767_600_000_000_000 + day,
                    1_767_600_000_000_000,
                ])
                .with_timezone("+00:00"),
            ),
        ],
    )
    .unwrap();
    let lakehouse = Lakehouse::open(dir.path()).await.unwrap();
    let ident = table_ident("gold", "parts").unwrap();
    let partition_by = ["region".to_owned(), "day(ts)".to_owned()];
    let table = lakehouse
        .ensure_partitioned_table(&ident, &schema, &partition_by)
        .await
        .unwrap();
    assert!(!table.metadata().default_partition_spec().is_unpartitioned());
    let table = lakehouse
        .append(&table, &[batch], HashMap::new())
        .await
        .unwrap();
    let summary = &table
        .metadata()
        .current_snapshot()
        .unwrap()
        .summary()
        .additional_properties;
    assert_eq!(
        summary["total-data-files"], "4",
        "one file per (region, day)"
    );
    assert_eq!(summary["total-records"], "4");

    let data = dir.path().to_str().unwrap().to_owned();
    let out =
        tokio::task::spawn_blocking(move || run_python(READ_TABLE_SCRIPT, &[&data, "gold.parts"]))
            .await
            .unwrap();
    let read: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let ids = |reader: &str| {
        let mut ids: Vec<String> = read[reader]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["order_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids("pyiceberg"), ["1", "2", "3", "4"], "{out}");
    assert_eq!(ids("duckdb"), ["1", "2", "3", "4"], "{out}");

    // What cannot partition a table is said before any table exists.
    assert!(kappa_lakehouse::partition_problem(&schema, &["week(ts)".to_owned()]).is_some());
    assert!(
        kappa_lakehouse::partition_problem(&schema, &["regoin".to_owned()])
            .is_some_and(|why| why.contains("no column `regoin`"))
    );
    assert!(
        kappa_lakehouse::partition_problem(&schema, &["bucket(8, order_id)".to_owned()]).is_none()
    );
}

/// The warehouse on an object store: an S3-compatible server on loopback (moto) holds the
/// Parquet, metadata and state files; the catalog stays in the data directory. Our reads and
/// pyiceberg's (through the same SQLite catalog and the bucket) see both commits, and the
/// configuration recorded in the data directory is what a later `open` uses.
#[tokio::test]
async fn an_s3_warehouse_holds_the_tables_and_pyiceberg_reads_them() {
    let s3 = tokio::task::spawn_blocking(|| kappa_testkit::python::S3Server::start("lake"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = WarehouseConfig {
        warehouse: Some(format!("s3://{}/warehouse", s3.bucket)),
        properties: s3.properties().into_iter().collect(),
        ..Default::default()
    };
    config.record(dir.path()).unwrap();
    let lakehouse = Lakehouse::open(dir.path()).await.unwrap();
    assert_eq!(lakehouse.warehouse(), "s3://lake/warehouse");
    let (schema, batch) = region_totals();
    let ident = table_ident("gold", "totals").unwrap();
    let table = lakehouse.ensure_table(&ident, &schema).await.unwrap();
    let first = lakehouse
        .write_data_files(&table, &[batch(&["north", "south"], &[1, 5])], "b0-")
        .await
        .unwrap();
    let first_path = first[0].file_path().to_owned();
    assert!(
        first_path.starts_with("s3://lake/warehouse/gold/totals/data/"),
        "{first_path}"
    );
    let table = lakehouse
        .overwrite(
            &table,
            &Default::default(),
            first,
            HashMap::from([("kappa.offsets".to_owned(), "1".to_owned())]),
        )
        .await
        .unwrap();
    // Copy-on-write through our commit layer: the file replaced by one with new totals.
    let replaced = [first_path].into();
    let files = lakehouse
        .write_data_files(
            &table,
            &[batch(&["north", "south", "east"], &[3, 5, 7])],
            "b0-",
        )
        .await
        .unwrap();
    lakehouse
        .overwrite(
            &table,
            &replaced,
            files,
            HashMap::from([("kappa.offsets".to_owned(), "2".to_owned())]),
        )
        .await
        .unwrap();

    let (ours, rows) = region_totals_read(&lakehouse).await;
    assert!(ours.contains("| east   | 7     |"), "{ours}");
    assert_eq!(rows, 3);

    let data = dir.path().to_str().unwrap().to_owned();
    let mut args = vec![data, "gold.totals".to_owned()];
    args.extend(s3.properties().into_iter().map(|(k, v)| format!("{k}={v}")));
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_python(
            r#"
import json, sys
from pyiceberg.catalog.sql import SqlCatalog
data, ident = sys.argv[1], sys.argv[2]
props = dict(a.split("=", 1) for a in sys.argv[3:])
catalog = SqlCatalog("kappa", uri=f"sqlite:///{data}/catalog.db", **props)
table = catalog.load_table(ident)
rows = sorted(table.scan().to_arrow().to_pylist(), key=lambda r: r["region"])
print(json.dumps({"rows": rows, "location": table.metadata_location,
    "offsets": table.current_snapshot().summary.additional_properties["kappa.offsets"]}))
"#,
            &args,
        )
    })
    .await
    .unwrap();
    let read: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        read["rows"],
        serde_json::json!([
            {"region": "east", "total": 7},
            {"region": "north", "total": 3},
            {"region": "south", "total": 5},
        ]),
        "{out}"
    );
    assert!(
        read["location"]
            .as_str()
            .unwrap()
            .starts_with("s3://lake/warehouse/gold/totals/metadata/"),
        "{out}"
    );
    assert_eq!(read["offsets"], "2");
    // Nothing of the table is in the data directory but the catalog.
    assert!(!dir.path().join("warehouse").exists());
}

/// The tables behind an Iceberg REST catalog: a server on loopback (pyiceberg's catalog behind
/// the REST protocol, so every commit is checked and applied by another implementation) takes
/// our copy-on-write commits, refuses one built on a stale table with a conflict, accepts
/// snapshot expiry, and pyiceberg reads the rows and the committed offsets back through it.
#[tokio::test]
async fn a_rest_catalog_takes_the_commits_and_refuses_stale_ones() {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = tempfile::tempdir().unwrap();
    let warehouse = format!("file://{}/lake", server_dir.path().display());
    let server = {
        let (path, warehouse) = (server_dir.path().to_owned(), warehouse.clone());
        tokio::task::spawn_blocking(move || {
            kappa_testkit::python::RestCatalogServer::start(&path, &warehouse, &[])
        })
        .await
        .unwrap()
    };
    let config = WarehouseConfig {
        warehouse: Some(warehouse.clone()),
        catalog: Some(CatalogKind::Rest),
        uri: Some(server.uri.clone()),
        ..Default::default()
    };
    assert_eq!(config.problem(), None);
    let lakehouse = Lakehouse::open_with(dir.path(), &config)
        .await
        .unwrap()
        .with_replaced_snapshot_ms(0);
    let (schema, batch) = region_totals();
    let ident = table_ident("gold", "totals").unwrap();
    let created = lakehouse.ensure_table(&ident, &schema).await.unwrap();
    let offsets = |o: &str| HashMap::from([("kappa.offsets".to_owned(), o.to_owned())]);
    let first = lakehouse
        .write_data_files(&created, &[batch(&["north", "south"], &[1, 5])], "b0-")
        .await
        .unwrap();
    let first_path = first[0].file_path().to_owned();
    let table = lakehouse
        .overwrite(&created, &Default::default(), first, offsets("1"))
        .await
        .unwrap();
    let files = lakehouse
        .write_data_files(&table, &[batch(&["north", "east"], &[3, 7])], "b0-")
        .await
        .unwrap();
    let mut table = lakehouse
        .overwrite(&table, &[first_path].into(), files, offsets("2"))
        .await
        .unwrap();

    // A commit built on the table as it was before: the catalog's requirement fails.
    let stale = lakehouse
        .append_files(&created, Vec::new(), offsets("stale"))
        .await
        .unwrap_err();
    assert!(matches!(stale, LakehouseError::Conflict(_)), "{stale}");

    // Past SNAPSHOTS_KEPT snapshots, each commit also removes the oldest: the catalog applies
    // that change too.
    for i in 0..kappa_lakehouse::commit::SNAPSHOTS_KEPT {
        table = lakehouse
            .append_files(&table, Vec::new(), offsets(&format!("2.{i}")))
            .await
            .unwrap();
    }
    let kept = table.metadata().snapshots().count();
    assert!(
        kept <= kappa_lakehouse::commit::SNAPSHOTS_KEPT,
        "{kept} snapshots"
    );

    let (ours, rows) = region_totals_read(&lakehouse).await;
    assert!(ours.contains("| east   | 7     |"), "{ours}");
    assert_eq!(rows, 2);

    let uri = server.uri.clone();
    let out = tokio::task::spawn_blocking(move || {
        run_python(
            r#"
import json, sys
from pyiceberg.catalog.rest import RestCatalog
catalog = RestCatalog("kappa", uri=sys.argv[1])
table = catalog.load_table("gold.totals")
rows = sorted(table.scan().to_arrow().to_pylist(), key=lambda r: r["region"])
print(json.dumps({"rows": rows, "snapshots": len(table.metadata.snapshots),
    "offsets": table.current_snapshot().summary.additional_properties["kappa.offsets"]}))
"#,
            &[&uri],
        )
    })
    .await
    .unwrap();
    let read: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        read["rows"],
        serde_json::json!([{"region": "east", "total": 7}, {"region": "north", "total": 3}]),
        "{out}"
    );
    assert_eq!(
        read["offsets"],
        format!("2.{}", kappa_lakehouse::commit::SNAPSHOTS_KEPT - 1)
    );
    assert_eq!(read["snapshots"], kept);
    // The data directory holds no catalog of its own.
    assert!(!dir.path().join(kappa_lakehouse::CATALOG_FILE).exists());

    // A wrong address fails when the lakehouse opens, naming it.
    drop(server);
    let refused = Lakehouse::open_with(dir.path(), &config)
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains(config.uri.as_deref().unwrap()),
        "{refused}"
    );
}

#[test]
fn a_rest_catalog_needs_its_address_and_warehouse() {
    let rest = |uri: Option<&str>, warehouse: Option<&str>| WarehouseConfig {
        catalog: Some(CatalogKind::Rest),
        uri: uri.map(str::to_owned),
        warehouse: warehouse.map(str::to_owned),
        ..Default::default()
    };
    assert_eq!(
        rest(Some("http://127.0.0.1:8181"), Some("s3://lake")).problem(),
        None
    );
    assert!(
        rest(None, Some("s3://lake"))
            .problem()
            .unwrap()
            .contains("needs the catalog's `uri`")
    );
    assert!(
        rest(Some("127.0.0.1:8181"), Some("s3://lake"))
            .problem()
            .unwrap()
            .contains("expected http://")
    );
    assert!(
        rest(Some("http://127.0.0.1:8181"), None)
            .problem()
            .unwrap()
            .contains("needs a `warehouse`")
    );
    let stray = WarehouseConfig {
        uri: Some("http://127.0.0.1:8181".into()),
        ..Default::default()
    };
    assert!(stray.problem().unwrap().contains("set catalog = \"rest\""));
    assert_eq!(CatalogKind::parse("rest"), Ok(CatalogKind::Rest));
    assert!(
        CatalogKind::parse("hive")
            .unwrap_err()
            .contains("expected \"sql\" or \"rest\"")
    );
}

#[test]
fn only_s3_and_absolute_file_warehouses_are_accepted() {
    let problem = |w: &str| {
        WarehouseConfig {
            warehouse: Some(w.to_owned()),
            ..Default::default()
        }
        .problem()
    };
    assert_eq!(problem("s3://bucket/prefix"), None);
    assert_eq!(problem("file:///var/lake"), None);
    assert!(
        problem("gs://bucket")
            .unwrap()
            .contains("expected s3://bucket")
    );
    assert!(problem("s3://").is_some());
    assert!(problem("warehouse").is_some());
}

/// `gold.totals` as `kappa sql` would read it (ordered by region, printed), and its row count.
async fn region_totals_read(lakehouse: &Lakehouse) -> (String, usize) {
    let (_, batches) = lakehouse
        .query("SELECT region, total FROM gold.totals ORDER BY region")
        .await
        .unwrap();
    let shown = arrow::util::pretty::pretty_format_batches(&batches)
        .unwrap()
        .to_string();
    (shown, batches.iter().map(RecordBatch::num_rows).sum())
}

/// The schema (region, total) of the overwrite tests, and a maker of its batches.
fn region_totals() -> (Arc<Schema>, impl Fn(&[&str], &[i64]) -> RecordBatch) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("region", DataType::Utf8, false),
        Field::new("total", DataType::Int64, false),
    ]));
    let batch = {
        let schema = schema.clone();
        move |regions: &[&str], totals: &[i64]| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(regions.to_vec())),
                    Arc::new(Int64Array::from(totals.to_vec())),
                ],
            )
            .unwrap()
        }
    };
    (schema, batch)
}

/// A data directory keeps its warehouse: opened with another one, it refuses with the table
/// that is elsewhere, instead of failing on every read and commit of it later.
#[tokio::test]
async fn a_data_directory_refuses_another_warehouse_for_its_tables() {
    let dir = tempfile::tempdir().unwrap();
    let (schema, _) = region_totals();
    let lakehouse = Lakehouse::open(dir.path()).await.unwrap();
    let ident = table_ident("gold", "totals").unwrap();
    lakehouse.ensure_table(&ident, &schema).await.unwrap();
    drop(lakehouse);
    let elsewhere = WarehouseConfig {
        warehouse: Some("s3://another/place".into()),
        ..Default::default()
    };
    let refused = Lakehouse::open_with(dir.path(), &elsewhere)
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("table gold.totals is at file://"),
        "{refused}"
    );
    assert!(
        refused.contains("outside the configured warehouse s3://another/place"),
        "{refused}"
    );
    // The warehouse it has still opens.
    Lakehouse::open(dir.path()).await.unwrap();
}

/// A cutover's mechanism: aliases `gold.a` and `gold.b` follow version tables; `publish`
/// switches both in one transaction while readers query the two aliases together, and no
/// answer mixes versions. A commit to the live version moves its alias; a commit to the other
/// does not; pyiceberg reads the alias as a table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_aliases_switch_together_and_follow_their_tables() {
    let dir = tempfile::tempdir().unwrap();
    let lakehouse = Lakehouse::open(dir.path()).await.unwrap();
    let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
    let rows = |v: i64, n: usize| {
        RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![v; n]))]).unwrap()
    };
    let mut versions = HashMap::new();
    for version in [1, 2] {
        for name in ["a", "b"] {
            let ident =
                table_ident("kappa_versions", &format!("gold__{name}__v{version}")).unwrap();
            let table = lakehouse.ensure_table(&ident, &schema).await.unwrap();
            let table = lakehouse
                .append(&table, &[rows(version, 3)], HashMap::new())
                .await
                .unwrap();
            versions.insert((name, version), (ident, table));
        }
    }
    let switch = |version: i64| -> Vec<_> {
        ["a", "b"]
            .iter()
            .map(|name| {
                (
                    table_ident("gold", name).unwrap(),
                    versions[&(*name, version)].0.clone(),
                )
            })
            .collect()
    };
    lakehouse.publish(&switch(1)).await.unwrap();
    let answer = |lakehouse: Lakehouse| async move {
        let both = "SELECT (SELECT min(v) FROM gold.a), (SELECT max(v) FROM gold.a), \
                    (SELECT min(v) FROM gold.b), (SELECT max(v) FROM gold.b)";
        let (_, batches) = lakehouse.query(both).await.unwrap();
        let columns = batches[0].columns();
        (0..4)
            .map(|i| {
                columns[i]
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .value(0)
            })
            .collect::<Vec<i64>>()
    };
    assert_eq!(answer(lakehouse.clone()).await, [1, 1, 1, 1]);

    // Readers query while the aliases switch back and forth.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (lakehouse, stop) = (lakehouse.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut answers, mut mixed) = (0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let got = answer(lakehouse.clone()).await;
                    if got.iter().any(|v| *v != got[0]) {
                        mixed.push(got);
                    }
                    answers += 1;
                }
                (answers, mixed)
            })
        })
        .collect();
    for round in 0..60 {
        lakehouse.publish(&switch(2 - round % 2)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answers = 0;
    for reader in readers {
        let (n, mixed) = reader.await.unwrap();
        assert!(mixed.is_empty(), "answers mixing versions: {mixed:?}");
        answers += n;
    }
    assert!(answers >= 20, "only {answers} answers during the switches");
    // The last round (59) published version 1.
    assert_eq!(answer(lakehouse.clone()).await, [1, 1, 1, 1]);
    let aliases = lakehouse.aliases().await.unwrap();
    assert_eq!(
        aliases[&table_ident("gold", "a").unwrap()],
        versions[&("a", 1)].0
    );

    // A commit to the live version moves its alias; one to the other version does not.
    let (_, live) = &versions[&("a", 1)];
    let live = lakehouse.load_table(live.identifier()).await.unwrap();
    lakehouse
        .append(&live, &[rows(1, 2)], HashMap::new())
        .await
        .unwrap();
    let (_, other) = &versions[&("a", 2)];
    let other = lakehouse.load_table(other.identifier()).await.unwrap();
    lakehouse
        .append(&other, &[rows(2, 7)], HashMap::new())
        .await
        .unwrap();
    let (_, counted) = lakehouse
        .query("SELECT count(*) AS n FROM gold.a")
        .await
        .unwrap();
    let n = counted[0]
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0);
    assert_eq!(n, 5, "the alias follows version 1's new commit");

    // An independent reader loads the alias as a table.
    let data = dir.path().to_str().unwrap().to_owned();
    let out =
        tokio::task::spawn_blocking(move || run_python(READ_TABLE_SCRIPT, &[&data, "gold.a"]))
            .await
            .unwrap();
    let read: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(read["pyiceberg"].as_array().unwrap().len(), 5, "{out}");
    assert_eq!(read["pyiceberg"], read["duckdb"], "{out}");
}
