//! The Postgres wire endpoint of `kappa up`, driven by Debian's real `psql`.

use std::path::Path;
use std::process::Command;

use kappa_testkit::process::KappaProcess;

use crate::quality::write_project;
use crate::{KAPPA, kappa, stderr};

const ORDERS: &str = "partitions = 2\nkey = \"customer_id\"\n\n[schema]\norder_id = \
                      \"bigint\"\ncustomer_id = \"string\"\namount = \"decimal(10,2)\"\nts = \
                      \"timestamp\"\npaid = \"boolean\"\n";
const CUSTOMERS: &str = "kind = \"table\"\nkey = \"customer_id\"\n\n[schema]\ncustomer_id = \
                         \"string\"\nregion = \"string\"\n";

/// `psql` against the endpoint `kappa up` recorded in the data directory: unaligned, no
/// headers, errors verbose (with their SQLSTATE); returns (success, stdout, stderr).
fn psql(data: &Path, args: &[&str]) -> (bool, String, String) {
    let file: serde_json::Value = crate::server_file(data);
    let addr = file["pg"].as_str().unwrap();
    let (host, port) = addr.rsplit_once(':').unwrap();
    let out = Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "VERBOSITY=verbose",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args(["-h", host, "-p", port, "-U", "kappa", "-d", "kappa"])
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql runs (postgresql-client, installed by .ci/run)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `\dt` and `\d` list the published tables (not the versions' own), a join across layers and
/// a prepared statement answer, errors carry their SQLSTATE, and a new commit is visible to the
/// next query.
#[test]
fn psql_lists_describes_joins_and_prepares() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", "[project]\nname = \"shop\"\n"),
            ("topics/orders.toml", ORDERS),
            ("topics/customers.toml", CUSTOMERS),
            (
                "models/silver/orders.sql",
                "SELECT o.order_id, o.customer_id, c.region, o.amount, o.ts, o.paid FROM orders o \
                 LEFT JOIN customers c ON o.customer_id = c.customer_id\n",
            ),
            (
                "models/gold/by_region.sql",
                "SELECT region, count(*) AS orders, sum(amount) AS revenue FROM silver.orders \
                 GROUP BY region\n",
            ),
        ],
    );
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let produce = |topic: &str, key: &str, lines: &str| {
        let out = kappa(
            &data,
            &["produce", topic, "--key", key],
            Some(lines.as_bytes()),
        );
        assert!(out.status.success(), "{}", stderr(&out));
    };
    produce(
        "customers",
        "customer_id",
        "{\"customer_id\":\"c1\",\"region\":\"north\"}\n{\"customer_id\":\"c2\",\"region\":\"south\"}\n",
    );
    let orders: String = (1..=6)
        .map(|i| {
            format!(
                "{{\"order_id\":{i},\"customer_id\":\"c{}\",\"amount\":\"{i}.50\",\"ts\":\
                 \"2026-03-0{i}T10:00:00Z\",\"paid\":{}}}\n",
                1 + i % 2,
                i % 3 == 0
            )
        })
        .collect();
    produce("orders", "customer_id", &orders);
    crate::wait_caught_up(&data, project, 2, std::time::Duration::from_secs(60));

    let (ok, tables, err) = psql(&data, &["-c", "\\dt"]);
    assert!(ok, "{err}");
    for table in [
        "bronze|orders|table",
        "bronze|customers|table",
        "silver|orders|table",
        "gold|by_region|table",
    ] {
        assert!(tables.contains(table), "{table} missing from:\n{tables}");
    }
    // The versions' own tables (kappa_versions.<layer>__<model>__<version>) are not listed,
    // in their schema or unqualified.
    assert!(
        !tables.contains("kappa_versions") && !tables.contains("__"),
        "{tables}"
    );

    let (ok, columns, err) = psql(&data, &["-c", "\\d silver.orders"]);
    assert!(ok, "{err}");
    for column in [
        "order_id|bigint",
        "customer_id|text",
        "amount|numeric",
        "paid|boolean",
    ] {
        assert!(
            columns.contains(column),
            "{column} missing from:\n{columns}"
        );
    }

    let (ok, joined, err) = psql(
        &data,
        &[
            "-c",
            "SELECT o.region, count(*), sum(o.amount), max(b.\"offset\") >= 0 FROM silver.orders o \
             JOIN gold.by_region g ON o.region = g.region JOIN bronze.orders b ON \
             CAST(b.value AS VARCHAR) LIKE '%\"order_id\":' || o.order_id || ',%' GROUP BY \
             o.region ORDER BY o.region",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(joined, "north|3|13.50|t\nsouth|3|10.50|t\n", "{joined}");

    let (ok, prepared, err) = psql(
        &data,
        &[
            "-c",
            "PREPARE by_id(bigint) AS SELECT order_id, region, amount, paid FROM silver.orders \
             WHERE order_id = $1",
            "-c",
            "EXECUTE by_id(3)",
        ],
    );
    assert!(ok, "{err}");
    assert!(prepared.contains("3|south|3.50|t"), "{prepared}");

    for (sql, state) in [
        ("SELECT nope FROM silver.orders", "42703"),
        ("SELECT * FROM silver.nothere", "42P01"),
        ("SELEC 1", "42601"),
    ] {
        let (ok, _, err) = psql(&data, &["-c", sql]);
        assert!(!ok && err.contains(state), "{sql}: {err}");
    }

    // A commit is visible to the next query (the endpoint follows the catalog).
    produce(
        "orders",
        "customer_id",
        "{\"order_id\":7,\"customer_id\":\"c1\",\"amount\":\"1.00\",\"ts\":\"2026-03-07T10:00:00Z\",\"paid\":true}\n",
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (ok, count, err) = psql(&data, &["-c", "SELECT count(*) FROM silver.orders"]);
        assert!(ok, "{err}");
        if count.trim() == "7" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {count}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(up.terminate().unwrap().success());
}

/// Reads every supported type through psycopg (server-side binding: the extended protocol),
/// with parameters of several types; prints one JSON object.
const PSYCOPG: &str = r#"
import datetime, decimal, json, sys, time, urllib.request
import psycopg
host, port = sys.argv[1], int(sys.argv[2])
with psycopg.connect(host=host, port=port, user="kappa", dbname="kappa", autocommit=True, connect_timeout=10) as conn:
    cur = conn.execute(
        "SELECT id, small, amount, ratio, name, ok, day, ts, local_ts, note FROM silver.typed "
        "WHERE id = %s AND name = %s AND amount >= %s AND ok = %s AND day >= %s ORDER BY id",
        (2, "b", decimal.Decimal("1.25"), False, datetime.date(2026, 1, 1)))
    columns = [c.name for c in cur.description]
    rows = [{c: [type(v).__name__, None if v is None else str(v)] for c, v in zip(columns, r)} for r in cur.fetchall()]
    tz = [r[0].tzinfo is not None for r in conn.execute("SELECT ts FROM silver.typed WHERE id = %s", (1,)).fetchall()]
    naive = [r[0].tzinfo is None for r in conn.execute("SELECT local_ts FROM silver.typed WHERE id = %s", (1,)).fetchall()]
    nulls = conn.execute("SELECT count(*) FROM silver.typed WHERE note IS NULL").fetchone()[0]
    try:
        conn.execute("SELECT nope FROM silver.typed")
        error = None
    except psycopg.Error as e:
        error = e.sqlstate
    # A statement the driver prepared (named, on the server) sees later commits.
    conn.prepare_threshold = 0
    count = lambda: conn.execute("SELECT count(*) FROM silver.typed WHERE id >= %s", (0,), prepare=True).fetchone()[0]
    before = [count() for _ in range(6)]
    line = json.dumps({"id": 3, "small": 1, "amount": "1.00", "ratio": 1.0, "name": "c", "ok": True,
                       "day": "2026-04-05", "ts": "2026-04-05T00:00:00Z", "note": None})
    urllib.request.urlopen(urllib.request.Request(sys.argv[3] + "/v1/topics/things/records", data=(line + "\n").encode(), method="POST"), timeout=10).read()
    deadline = time.time() + 30
    after = count()
    while after != 3 and time.time() < deadline:
        time.sleep(0.2)
        after = count()
print(json.dumps({"rows": rows, "tz": tz, "naive": naive, "nulls": nulls, "error": error, "prepared": before + [after]}))
"#;

/// A Python driver reads each supported type as its own Python type, with parameterised
/// queries (integers, text, numeric, bool and date parameters) and a SQLSTATE on error.
#[test]
fn psycopg_reads_every_type_with_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("types");
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", "[project]\nname = \"types\"\n"),
            (
                "topics/things.toml",
                "partitions = 1\n\n[schema]\nid = \"bigint\"\nsmall = \"int\"\namount = \
                 \"decimal(10,2)\"\nratio = \"double\"\nname = \"string\"\nok = \"boolean\"\nday = \
                 \"date\"\nts = \"timestamp\"\nnote = { type = \"string\", required = false }\n",
            ),
            (
                "models/silver/typed.sql",
                "SELECT id, small, amount, ratio, name, ok, day, ts, arrow_cast(ts, \
                 'Timestamp(Microsecond, None)') AS local_ts, note FROM things\n",
            ),
        ],
    );
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let lines = "{\"id\":1,\"small\":7,\"amount\":\"1.25\",\"ratio\":0.5,\"name\":\"a\",\"ok\":true,\
                 \"day\":\"2026-02-03\",\"ts\":\"2026-02-03T04:05:06Z\",\"note\":\"hi\"}\n\
                 {\"id\":2,\"small\":-3,\"amount\":\"99.99\",\"ratio\":2.25,\"name\":\"b\",\"ok\":false,\
                 \"day\":\"2026-03-04\",\"ts\":\"2026-03-04T05:06:07Z\",\"note\":null}\n";
    let out = kappa(&data, &["produce", "things"], Some(lines.as_bytes()));
    assert!(out.status.success(), "{}", stderr(&out));
    crate::wait_caught_up(&data, project, 1, std::time::Duration::from_secs(60));
    let file: serde_json::Value = crate::server_file(&data);
    let (host, port) = file["pg"].as_str().unwrap().rsplit_once(':').unwrap();
    let base = file["http"].as_str().unwrap();
    let out = kappa_testkit::python::run_python(PSYCOPG, &[host, port, base]);
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let row = &json["rows"][0];
    let expected = serde_json::json!({
        "id": ["int", "2"],
        "small": ["int", "-3"],
        "amount": ["Decimal", "99.99"],
        "ratio": ["float", "2.25"],
        "name": ["str", "b"],
        "ok": ["bool", "False"],
        "day": ["date", "2026-03-04"],
        "ts": ["datetime", "2026-03-04 05:06:07+00:00"],
        "local_ts": ["datetime", "2026-03-04 05:06:07"],
        "note": ["NoneType", null],
    });
    assert_eq!(row, &expected, "{json}");
    assert_eq!(json["rows"].as_array().unwrap().len(), 1, "{json}");
    assert_eq!(json["tz"], serde_json::json!([true]), "{json}");
    assert_eq!(json["naive"], serde_json::json!([true]), "{json}");
    assert_eq!(json["nulls"], serde_json::json!(1), "{json}");
    assert_eq!(json["error"], serde_json::json!("42703"), "{json}");
    assert_eq!(
        json["prepared"],
        serde_json::json!([2, 2, 2, 2, 2, 2, 3]),
        "{json}"
    );
    assert!(up.terminate().unwrap().success());
}
