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
    psql_as(data, "kappa", None, args)
}

/// [`psql`] as `user`, with `password` (in `PGPASSWORD`) when given.
fn psql_as(
    data: &Path,
    user: &str,
    password: Option<&str>,
    args: &[&str],
) -> (bool, String, String) {
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
        .args(["-h", host, "-p", port, "-U", user, "-d", "kappa"])
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PGPASSWORD", password.unwrap_or(""))
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
        "amount|numeric(10,2)",
        "ts|timestamp with time zone",
        "paid|boolean",
    ] {
        assert!(
            columns.contains(column),
            "{column} missing from:\n{columns}"
        );
    }
    // A name in two layers: the error names both.
    let (ok, _, err) = psql(&data, &["-c", "SELECT * FROM orders"]);
    assert!(!ok);
    assert!(
        err.contains("42P01") && err.contains("name one: bronze.orders, silver.orders"),
        "{err}"
    );
    // What BI tools introspect: information_schema (Grafana), pg_attribute with format_type
    // (pgjdbc for Metabase, SQLAlchemy for Superset), pg_typeof.
    let (ok, described, err) = psql(
        &data,
        &[
            "-c",
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = \
             'silver' AND table_name = 'orders' ORDER BY ordinal_position",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(
        described.trim(),
        "order_id|bigint\ncustomer_id|text\nregion|text\namount|numeric\nts|timestamp with \
         time zone\npaid|boolean",
        "{described}"
    );
    let (ok, attributes, err) = psql(
        &data,
        &[
            "-c",
            "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), t.typname FROM \
             pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON a.attrelid = c.oid JOIN \
             pg_catalog.pg_namespace n ON c.relnamespace = n.oid JOIN pg_catalog.pg_type t ON \
             a.atttypid = t.oid WHERE n.nspname = 'silver' AND c.relname = 'orders' AND \
             a.attnum > 0 ORDER BY a.attnum",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(
        attributes.trim(),
        "order_id|bigint|int8\ncustomer_id|text|text\nregion|text|text\namount|numeric(10,2)|\
         numeric\nts|timestamp with time zone|timestamptz\npaid|boolean|bool",
        "{attributes}"
    );
    let (ok, typed, err) = psql(
        &data,
        &[
            "-c",
            "SELECT pg_typeof(ts), pg_typeof(amount), pg_typeof(order_id) FROM silver.orders \
             LIMIT 1",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(
        typed.trim(),
        "timestamp with time zone|numeric|bigint",
        "{typed}"
    );

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
    # numeric(p, s) as the RowDescription's typmod says it: the extended protocol, then the simple.
    numeric = [[c.type_code, c.precision, c.scale] for c in cur.description if c.name == "amount"]
    simple = psycopg.ClientCursor(conn).execute("SELECT amount, id FROM silver.typed").description
    numeric += [[c.type_code, c.precision, c.scale] for c in simple]
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
print(json.dumps({"rows": rows, "numeric": numeric, "tz": tz, "naive": naive, "nulls": nulls, "error": error, "prepared": before + [after]}))
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
    assert_eq!(
        json["numeric"],
        serde_json::json!([[1700, 10, 2], [1700, 10, 2], [20, null, null]]),
        "{json}"
    );
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

/// Three runaway queries in sessions of their own — a cross join of 900 million rows that runs
/// past the server's time limit, the same grouped past the memory limit, and one cancelled by the
/// client — while a fourth session keeps asking a simple query. Prints one JSON object.
const RUNAWAY: &str = r#"
import json, sys, threading, time
import psycopg
host, port = sys.argv[1], int(sys.argv[2])
connect = lambda: psycopg.connect(host=host, port=port, user="kappa", dbname="kappa", autocommit=True, connect_timeout=10)
EXPLOSION = "SELECT count(*) FROM silver.nums a, silver.nums b WHERE a.n + b.n >= 0"
GROUPS = "SELECT a.n, b.n, count(*) FROM silver.nums a CROSS JOIN silver.nums b GROUP BY a.n, b.n"
out = {}
def runaway(key, sql, cancel_after=None):
    conn = connect()
    started = time.monotonic()
    if cancel_after is not None:
        threading.Timer(cancel_after, conn.cancel).start()
    try:
        # The simple query protocol (a client-side cursor), which takes several statements.
        rows = psycopg.ClientCursor(conn).execute(sql).fetchall()
        out[key] = {"rows": len(rows)}
    except psycopg.Error as e:
        out[key] = {"sqlstate": e.sqlstate, "message": str(e).strip()}
    out[key]["seconds"] = time.monotonic() - started
    # The session goes on after its query was stopped.
    out[key]["after"] = conn.execute("SELECT count(*) FROM silver.nums").fetchone()[0]
    conn.close()
# A client may not lift the limits.
with connect() as conn:
    try:
        conn.execute("SET datafusion.runtime.memory_limit = '1T'")
        out["set"] = "accepted"
    except psycopg.Error as e:
        out["set"] = e.sqlstate
threads = [threading.Thread(target=runaway, args=a) for a in
           [("timeout", EXPLOSION), ("memory", GROUPS), ("cancel", EXPLOSION, 1.0),
            ("first_of_two", EXPLOSION + "; SELECT 1")]]
for t in threads:
    t.start()
other = connect()
latencies, answers = [], set()
while any(t.is_alive() for t in threads):
    started = time.monotonic()
    answers.add(other.execute("SELECT count(*) FROM silver.nums").fetchone()[0])
    latencies.append(time.monotonic() - started)
    time.sleep(0.1)
for t in threads:
    t.join()
out["other"] = {"queries": len(latencies), "max_seconds": max(latencies), "answers": sorted(answers)}
print(json.dumps(out))
"#;

/// The per-query limits: past the time limit a query is stopped with SQLSTATE 57014 and a
/// message naming the limit; past the memory limit with 53200 naming it; a cancel request
/// stops one mid-stream; each session goes on, and another session answers all along.
#[test]
fn runaway_queries_are_stopped_while_other_sessions_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, data) = numbers_project(
        tmp.path(),
        "limits",
        "[project]\nname = \"limits\"\n\n[server]\nquery_timeout = \"6s\"\nquery_memory = \
                 \"32MiB\"\n",
    );
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    const ROWS: u64 = 30_000;
    let lines: String = (0..ROWS).map(|n| format!("{{\"n\":{n}}}\n")).collect();
    let out = kappa(&data, &["produce", "numbers"], Some(lines.as_bytes()));
    assert!(out.status.success(), "{}", stderr(&out));
    crate::wait_caught_up(&data, project, 1, std::time::Duration::from_secs(60));
    let file: serde_json::Value = crate::server_file(&data);
    let (host, port) = file["pg"].as_str().unwrap().rsplit_once(':').unwrap();
    let out = kappa_testkit::python::run_python(RUNAWAY, &[host, port]);
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    eprintln!("{json:#}");

    let timeout = &json["timeout"];
    assert_eq!(timeout["sqlstate"], "57014", "{json}");
    let message = timeout["message"].as_str().unwrap();
    assert!(
        message.contains("statement timeout") && message.contains("query_timeout"),
        "{message}"
    );
    let seconds = timeout["seconds"].as_f64().unwrap();
    assert!((5.5..20.0).contains(&seconds), "stopped after {seconds} s");

    let memory = &json["memory"];
    assert_eq!(memory["sqlstate"], "53200", "{json}");
    let message = memory["message"].as_str().unwrap();
    assert!(
        message.contains("32 MiB") && message.contains("query_memory"),
        "{message}"
    );

    // A runaway statement followed by another in one query string is bounded too.
    assert_eq!(json["first_of_two"]["sqlstate"], "57014", "{json}");
    assert_eq!(json["set"], "42501", "{json}");

    let cancel = &json["cancel"];
    assert_eq!(cancel["sqlstate"], "57014", "{json}");
    assert!(
        cancel["message"].as_str().unwrap().contains("user request"),
        "{json}"
    );
    assert!(cancel["seconds"].as_f64().unwrap() < 4.0, "{json}");

    for key in ["timeout", "memory", "cancel", "first_of_two"] {
        assert_eq!(json[key]["after"], ROWS, "{key} session: {json}");
    }
    let other = &json["other"];
    assert_eq!(other["answers"], serde_json::json!([ROWS]), "{json}");
    assert!(other["queries"].as_u64().unwrap() >= 10, "{json}");
    assert!(other["max_seconds"].as_f64().unwrap() < 3.0, "{json}");

    // POST /v1/sql (the UI's query box) is bounded alike, while a simple query answers.
    let base = file["http"].as_str().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let post = |sql: &str| {
        let request = http
            .post(format!("{base}/v1/sql"))
            .json(&serde_json::json!({ "sql": sql }))
            .send();
        async move {
            let response = request.await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let ((timeout, timeout_body), (memory, memory_body), simple) = runtime.block_on(async {
        let simple = async {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let started = std::time::Instant::now();
            let answer = post("SELECT count(*) FROM silver.nums").await;
            (answer, started.elapsed())
        };
        tokio::join!(
            post("SELECT count(*) FROM silver.nums a, silver.nums b WHERE a.n + b.n >= 0"),
            post("SELECT a.n, b.n, count(*) FROM silver.nums a CROSS JOIN silver.nums b GROUP BY a.n, b.n"),
            simple
        )
    });
    assert_eq!(timeout, 400, "{timeout_body}");
    assert!(
        timeout_body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("query_timeout"),
        "{timeout_body}"
    );
    assert_eq!(memory, 400, "{memory_body}");
    assert!(
        memory_body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("query_memory"),
        "{memory_body}"
    );
    // Read-only: no file is written, no setting changed.
    let copy_to = tmp.path().join("out.csv");
    for sql in [
        format!("COPY (SELECT 1) TO '{}'", copy_to.display()),
        "SET datafusion.runtime.memory_limit = '1T'".to_owned(),
    ] {
        let (status, body) = runtime.block_on(post(&sql));
        assert_eq!(status, 400, "{sql}: {body}");
    }
    assert!(!copy_to.exists());
    let ((status, answer), took) = simple;
    assert_eq!(
        (status, &answer["rows"][0][0]),
        (200, &serde_json::json!(ROWS)),
        "{answer}"
    );
    assert!(took < std::time::Duration::from_secs(3), "{took:?}");

    // Counted: the runaway queries among the errors.
    let metrics = reqwest_text(&format!("{}/metrics", file["http"].as_str().unwrap()));
    let errors = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kappa_pg_query_errors_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(errors >= 4.0, "{metrics}");
    assert!(up.terminate().unwrap().success());
}

/// A GET's body as text.
fn reqwest_text(url: &str) -> String {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() })
}

/// With `[server] pg_user` and `pg_password_env`, the endpoint asks for the password by
/// SCRAM-SHA-256: the right one gets in, a wrong one, another user or none do not; a missing
/// variable stops `kappa up` with a message naming it.
#[test]
fn a_configured_password_is_asked_by_scram() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, data) = numbers_project(
        tmp.path(),
        "locked",
        "[project]\nname = \"locked\"\n\n[server]\npg_user = \"bi\"\npg_password_env = \
                 \"KAPPA_TEST_PG_PASSWORD\"\n",
    );
    let project = dir.to_str().unwrap();
    // Without the variable, kappa up refuses to start and says which one.
    let out = kappa(&data, &["--project", project, "up"], None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("KAPPA_TEST_PG_PASSWORD"),
        "{}",
        stderr(&out)
    );
    let up = KappaProcess::start_with_env(
        KAPPA.as_ref(),
        &data,
        &["--project", project],
        &[("KAPPA_TEST_PG_PASSWORD", "s3cret pass")],
    )
    .unwrap();
    let out = kappa(
        &data,
        &["produce", "numbers"],
        Some(b"{\"n\":1}\n{\"n\":2}\n"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    crate::wait_caught_up(&data, project, 1, std::time::Duration::from_secs(60));

    let (ok, rows, err) = psql_as(
        &data,
        "bi",
        Some("s3cret pass"),
        &["-c", "SELECT sum(n) FROM silver.nums"],
    );
    assert!(ok, "{err}");
    assert_eq!(rows.trim(), "3");
    for (user, password) in [
        ("bi", Some("wrong")),
        ("kappa", Some("s3cret pass")),
        ("bi", None),
    ] {
        let (ok, _, err) = psql_as(&data, user, password, &["-c", "SELECT 1"]);
        assert!(!ok, "{user} with {password:?} got in");
        assert!(
            err.to_lowercase().contains("password"),
            "{user} with {password:?}: {err}"
        );
    }
    // Cancel requests reach the right connection when a password is asked: two sessions, the
    // second's long query cancelled.
    let file: serde_json::Value = crate::server_file(&data);
    let (host, port) = file["pg"].as_str().unwrap().rsplit_once(':').unwrap();
    let out = kappa_testkit::python::run_python(SCRAM_CANCEL, &[host, port]);
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(json["first"], 3, "{json}");
    assert_eq!(json["sqlstate"], "57014", "{json}");
    assert!(
        json["message"].as_str().unwrap().contains("user request"),
        "{json}"
    );
    assert!(json["seconds"].as_f64().unwrap() < 5.0, "{json}");
    assert!(up.terminate().unwrap().success());
}

/// Two password-authenticated sessions; the second's endless query is cancelled after 0.5 s.
const SCRAM_CANCEL: &str = r#"
import json, sys, threading, time
import psycopg
host, port = sys.argv[1], int(sys.argv[2])
connect = lambda: psycopg.connect(host=host, port=port, user="bi", password="s3cret pass", dbname="kappa", autocommit=True, connect_timeout=10)
first, second = connect(), connect()
out = {"first": first.execute("SELECT sum(n) FROM silver.nums").fetchone()[0]}
threading.Timer(0.5, second.cancel).start()
started = time.monotonic()
try:
    second.execute("SELECT count(*) FROM range(100000000000) WHERE value >= 0").fetchall()
except psycopg.Error as e:
    out.update(sqlstate=e.sqlstate, message=str(e).strip())
out["seconds"] = time.monotonic() - started
print(json.dumps(out))
"#;

/// `layer."model@SNAPSHOT"` and `layer."model@TIME"` read a table as it was published then,
/// over psql and `kappa sql` alike; an unknown snapshot is an error naming the table's history.
#[test]
fn tables_read_as_of_a_snapshot_or_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, data) = numbers_project(tmp.path(), "travel", "[project]\nname = \"travel\"\n");
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let produce = |from: u64, to: u64| {
        let lines: String = (from..to).map(|n| format!("{{\"n\":{n}}}\n")).collect();
        let out = kappa(&data, &["produce", "numbers"], Some(lines.as_bytes()));
        assert!(out.status.success(), "{}", stderr(&out));
        crate::wait_caught_up(&data, project, 1, std::time::Duration::from_secs(60));
    };
    produce(0, 10);
    let audit = kappa(
        &data,
        &["--project", project, "audit", "silver.nums", "--json"],
        None,
    );
    assert!(audit.status.success(), "{}", stderr(&audit));
    let audit: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    // Snapshot ids are strings in JSON (they exceed 2^53).
    let first: i64 = audit["published"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("{audit}"));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let between = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    produce(10, 25);

    let count = |table: &str| {
        let (ok, out, err) = psql(&data, &["-c", &format!("SELECT count(*) FROM {table}")]);
        assert!(ok, "{table}: {err}");
        out.trim().to_owned()
    };
    assert_eq!(count("silver.nums"), "25");
    assert_eq!(count(&format!("silver.\"nums@{first}\"")), "10");
    assert_eq!(count(&format!("silver.\"nums@{between}\"")), "10");
    // The same through kappa sql (the HTTP API's sessions).
    let out = kappa(
        &data,
        &[
            "sql",
            "--json",
            &format!("SELECT count(*) FROM silver.\"nums@{first}\""),
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["rows"][0][0], 10, "{answer}");
    // Before the table's first commit, and a snapshot that is not in its history.
    let (ok, _, err) = psql(
        &data,
        &[
            "-c",
            "SELECT count(*) FROM silver.\"nums@2000-01-01T00:00:00Z\"",
        ],
    );
    assert!(
        !ok && err.contains("no published snapshot at or before"),
        "{err}"
    );
    let (ok, _, err) = psql(&data, &["-c", "SELECT count(*) FROM silver.\"nums@42\""]);
    assert!(!ok && err.contains("no published snapshot 42"), "{err}");
    assert!(up.terminate().unwrap().success());
}

/// A project `name` under `root` with `kappa_toml`, a topic `numbers` ({"n": bigint}) and the
/// model `silver.nums` reading it; the folder and its data directory.
fn numbers_project(
    root: &Path,
    name: &str,
    kappa_toml: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = root.join(name);
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", kappa_toml),
            (
                "topics/numbers.toml",
                "partitions = 1\n\n[schema]\nn = \"bigint\"\n",
            ),
            ("models/silver/nums.sql", "SELECT n FROM numbers\n"),
        ],
    );
    (dir, data)
}
