//! Bronze: every topic's records exactly as they arrived, in `bronze.<topic>`, read back by
//! pyiceberg and DuckDB.

use std::collections::BTreeMap;

use kappa_testkit::process::KappaProcess;

use crate::quality::write_project;
use crate::{KAPPA, kappa, stderr, stdout};

const ORDERS: &str = "partitions = 3\nkey = \"customer_id\"\n\n[schema]\norder_id = \
                      \"bigint\"\ncustomer_id = \"string\"\namount = \"decimal(10,2)\"\n";

/// Reads `bronze.<topic>` with pyiceberg and DuckDB; prints `{"pyiceberg": rows, "duckdb":
/// rows}`, each row [topic, partition, offset, key, value, timestamp ms, ingest ms], sorted.
const READ_BRONZE: &str = r#"
import json, os, site, sys
import duckdb
from pyiceberg.catalog.sql import SqlCatalog
data, ident = sys.argv[1], sys.argv[2]
catalog = SqlCatalog("kappa", uri=f"sqlite:///{data}/catalog.db", warehouse=f"file://{data}/warehouse")
table = catalog.load_table(ident)
def text(b):
    return None if b is None else b.decode("utf-8", "backslashreplace")
def ms(t):
    return int(t.timestamp() * 1000)
py = sorted([[r["topic"], r["partition"], r["offset"], text(r["key"]), text(r["value"]), ms(r["timestamp"]), ms(r["ingest_time"])]
             for r in table.scan().to_arrow().to_pylist()], key=lambda r: (r[1], r[2]))
ext = [os.path.join(p, "duckdb_ext", "extensions") for p in site.getsitepackages() if os.path.isdir(os.path.join(p, "duckdb_ext"))][0]
con = duckdb.connect()
con.execute("SET enable_progress_bar = false")
con.execute(f"SET extension_directory='{ext}'")
con.execute("LOAD iceberg")
metadata = table.metadata_location.removeprefix("file://")
dd = sorted([[r[0], r[1], r[2], text(r[3]), text(r[4]), r[5], r[6]] for r in con.execute(
    f'SELECT topic, "partition", "offset", key, value, epoch_ms("timestamp"), epoch_ms(ingest_time) FROM iceberg_scan(\'{metadata}\')').fetchall()],
    key=lambda r: (r[1], r[2]))
print(json.dumps({"pyiceberg": py, "duckdb": dd}))
"#;

/// Every record — typed, of the wrong types, not an object, keyless — is in `bronze.orders` once,
/// byte for byte, with the partition, offset, key and timestamp the log gave it, across a
/// kill -9 while records arrive; a model reading the topic rejects what bronze keeps.
#[test]
fn bronze_keeps_every_record_exactly_as_it_arrived() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", "[project]\nname = \"shop\"\n"),
            ("topics/orders.toml", ORDERS),
            (
                "models/silver/orders.sql",
                "SELECT order_id, customer_id, amount FROM orders\n",
            ),
        ],
    );
    let project = dir.to_str().unwrap();
    let mut up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let mut produced: Vec<(Option<String>, String)> = Vec::new();
    for round in 0..4 {
        let mut lines = String::new();
        for i in 0..500 {
            let id = round * 500 + i;
            let line = format!(
                "{{\"order_id\":{id},\"customer_id\":\"c{}\",\"amount\":\"{}.{:02}\"}}",
                id % 37,
                id % 90,
                id % 100
            );
            produced.push((Some(format!("c{}", id % 37)), line.clone()));
            lines.push_str(&line);
            lines.push('\n');
        }
        let out = kappa(
            &data,
            &["produce", "orders", "--key", "customer_id"],
            Some(lines.as_bytes()),
        );
        assert!(out.status.success(), "{}", stderr(&out));
        // Records no model can read: bronze keeps them too.
        let bad = [
            format!("{{\"order_id\":\"many\",\"round\":{round}}}"),
            format!("\"a JSON string, no object, round {round} \u{00e9}\""),
            format!("[{round}, \"an array\"]"),
        ];
        let body: String = bad.iter().map(|b| format!("{b}\n")).collect();
        let out = kappa(&data, &["produce", "orders"], Some(body.as_bytes()));
        assert!(out.status.success(), "{}", stderr(&out));
        produced.extend(bad.into_iter().map(|b| (None, b)));
        if round == 1 {
            up.kill9().unwrap();
            up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
        }
    }
    // Caught up: bronze and silver have every record.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let status = crate::status(&data, project);
        let done = status["bronze"].as_array().is_some_and(|b| {
            b.len() == 1 && b[0]["lag_records"] == 0 && b[0]["model"] == "bronze.orders"
        }) && status["models"][0]["lag_records"] == 0;
        if done {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never caught up: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let text = kappa(&data, &["--project", project, "status"], None);
    assert!(stdout(&text).contains("bronze.orders"), "{}", stdout(&text));
    assert!(up.terminate().unwrap().success());

    // The log's own view of the records: partition, offset, timestamp.
    let out = kappa(&data, &["consume", "orders", "--json"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut log: BTreeMap<(u64, u64), i64> = BTreeMap::new();
    for line in stdout(&out).lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        log.insert(
            (
                e["partition"].as_u64().unwrap(),
                e["offset"].as_u64().unwrap(),
            ),
            e["timestamp_ms"].as_i64().unwrap(),
        );
    }
    assert_eq!(log.len(), produced.len());

    let out =
        kappa_testkit::python::run_python(READ_BRONZE, &[data.to_str().unwrap(), "bronze.orders"]);
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        json["pyiceberg"], json["duckdb"],
        "the two readers disagree"
    );
    let rows = json["duckdb"].as_array().unwrap();
    // Once each: the same (partition, offset) set as the log, nothing twice.
    let positions: Vec<(u64, u64)> = rows
        .iter()
        .map(|r| (r[1].as_u64().unwrap(), r[2].as_u64().unwrap()))
        .collect();
    let expected: Vec<(u64, u64)> = log.keys().copied().collect();
    if positions != expected {
        let at = positions.iter().zip(&expected).position(|(a, b)| a != b);
        panic!(
            "bronze holds {} records, the log {}; first difference at {at:?}",
            positions.len(),
            expected.len()
        );
    }
    let mut seen: Vec<(Option<String>, String)> = Vec::new();
    for r in rows {
        assert_eq!(r[0], "orders");
        let at = (r[1].as_u64().unwrap(), r[2].as_u64().unwrap());
        assert_eq!(r[5].as_i64().unwrap(), log[&at], "timestamp of {at:?}");
        assert!(r[6].as_i64().unwrap() >= r[5].as_i64().unwrap(), "{r:?}");
        seen.push((
            r[3].as_str().map(str::to_owned),
            r[4].as_str().unwrap().to_owned(),
        ));
    }
    // Byte for byte, with their keys.
    let sorted = |mut v: Vec<(Option<String>, String)>| {
        v.sort();
        v
    };
    assert_eq!(sorted(seen), sorted(produced));
    // The model read the same records and rejected the ones bronze kept anyway.
    let out = kappa(
        &data,
        &["sql", "SELECT count(*) AS n FROM silver.orders", "--json"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["rows"][0][0], serde_json::json!(2000));
}
