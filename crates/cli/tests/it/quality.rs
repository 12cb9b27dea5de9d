//! The trust layer: PII masking and data-quality expectations.

use std::path::{Path, PathBuf};

use kappa_testkit::process::KappaProcess;

use crate::{KAPPA, kappa, stderr, stdout};

const SIGNUPS: &str = "partitions = 1\nkey = \"customer_id\"\n\n[schema]\ncustomer_id = \
                       \"string\"\nemail = \"string\"\nphone = \"string\"\ncard = \
                       \"string\"\nname = \"string\"\nts = \"timestamp\"\n";

/// Deduplicated customers: every personal column masked, the ones the deduplication neither
/// keys nor orders on before the rows wait in its state.
const CUSTOMERS_SQL: &str = "SELECT customer_id, email, phone, card, name, ts FROM (\n  SELECT \
                             *, ROW_NUMBER() OVER (PARTITION BY customer_id ORDER BY ts) AS rn \
                             FROM signups\n) WHERE rn = 1\n";
const CUSTOMERS_TOML: &str = "event_time = \"ts\"\nwatermark = \"1s\"\n\n[mask]\nemail = \
                              \"mask_email\"\nphone = \"hash\"\ncard = \"last4\"\nname = \
                              \"redact\"\nts = \"truncate_date\"\n";
/// Row by row, with the mask functions in its SQL too.
const CONTACTS_SQL: &str =
    "SELECT customer_id, phone, hash(email) AS email_key, last4(card) AS card_end FROM signups\n";
const CONTACTS_TOML: &str = "[mask]\nphone = \"hash\"\n";
/// Reads the masked silver table's columns (recomputed inline from the topic).
const DOMAINS_SQL: &str = "SELECT email, count(*) AS customers FROM silver.customers GROUP BY \
                           email\n";

const CUSTOMERS: usize = 120;

fn raw(i: usize) -> [String; 4] {
    [
        format!("person{i:04}@example.com"),
        format!("+44 7700 9{i:05}"),
        format!("4111 1111 1111 {:04}", 1000 + i),
        format!("Person Number {i:04}"),
    ]
}

/// Masked columns hold no raw value anywhere in the warehouse — not in the Parquet data files
/// (read column by column), not in the deduplication's state, not in metadata — while the
/// tables show each mask's form, a keyed hash is the same in two models (so joins still work)
/// and a model downstream computes over the masked values.
#[test]
fn masked_columns_never_reach_the_warehouse_raw() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("crm");
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", "[project]\nname = \"crm\"\n"),
            ("topics/signups.toml", SIGNUPS),
            ("models/silver/customers.sql", CUSTOMERS_SQL),
            ("models/silver/customers.toml", CUSTOMERS_TOML),
            ("models/silver/contacts.sql", CONTACTS_SQL),
            ("models/silver/contacts.toml", CONTACTS_TOML),
            ("models/gold/domains.sql", DOMAINS_SQL),
        ],
    );
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start_with_env(
        KAPPA.as_ref(),
        &data,
        &["--project", project],
        &[("KAPPA_HASH_SECRET", "test-key-not-in-the-folder")],
    )
    .unwrap();
    // Every customer signs up, a third twice (redelivered), a minute apart; the last event
    // stays a candidate in the deduplication's state (the watermark has not passed it).
    let mut lines = String::new();
    for i in 0..CUSTOMERS {
        let [email, phone, card, name] = raw(i);
        let copies = if i % 3 == 0 { 2 } else { 1 };
        for _ in 0..copies {
            lines.push_str(&format!(
                "{{\"customer_id\":\"c{i}\",\"email\":\"{email}\",\"phone\":\"{phone}\",\
                 \"card\":\"{card}\",\"name\":\"{name}\",\"ts\":\"2026-03-0{}T{:02}:{:02}:07Z\"}}\n",
                1 + i / 60 % 9,
                i / 60 % 24,
                i % 60
            ));
        }
    }
    let out = kappa(
        &data,
        &["produce", "signups", "--key", "customer_id"],
        Some(lines.as_bytes()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    crate::wait_caught_up(&data, project, 3, std::time::Duration::from_secs(60));

    let rows = |sql: &str| -> Vec<Vec<serde_json::Value>> {
        let out = kappa(&data, &["sql", sql, "--json"], None);
        assert!(out.status.success(), "{sql}: {}", stderr(&out));
        let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        json["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().clone())
            .collect()
    };
    // The last customer still waits for the watermark.
    let customers = rows(
        "SELECT customer_id, email, phone, card, name, CAST(ts AS VARCHAR) FROM silver.customers \
         ORDER BY customer_id",
    );
    assert_eq!(customers.len(), CUSTOMERS - 1);
    for row in &customers {
        let id = row[0].as_str().unwrap();
        let i: usize = id[1..].parse().unwrap();
        let text = |k: usize| row[k].as_str().unwrap().to_owned();
        assert_eq!(text(1), "p***@example.com", "{row:?}");
        assert!(
            text(2).len() == 64 && text(2).bytes().all(|b| b.is_ascii_hexdigit()),
            "{row:?}"
        );
        assert_eq!(text(3), format!("****{:04}", 1000 + i), "{row:?}");
        assert_eq!(text(4), "[redacted]", "{row:?}");
        assert!(
            text(5).ends_with("00:00:00+00:00") || text(5).ends_with("T00:00:00Z"),
            "{row:?}"
        );
    }
    // The same key hashes the same phone the same in both models: they still join.
    let joined = rows(
        "SELECT count(DISTINCT c.customer_id) FROM silver.customers c JOIN silver.contacts t ON c.customer_id = \
         t.customer_id AND c.phone = t.phone",
    );
    assert_eq!(joined[0][0], serde_json::json!(CUSTOMERS - 1));
    let domains = rows("SELECT email, customers FROM gold.domains");
    assert_eq!(
        domains,
        vec![vec![
            serde_json::json!("p***@example.com"),
            serde_json::json!(CUSTOMERS - 1)
        ]]
    );
    // Bronze keeps every signup, with the fields a model masks redacted (and the rest as it
    // arrived): the scan below holds it to the same rule.
    let produced = lines.lines().count();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let bronze = rows(
            "SELECT count(*), count(*) FILTER (WHERE CAST(value AS VARCHAR) LIKE \
             '%\"customer_id\":\"c%\"email\":\"[redacted]\"%') FROM bronze.signups",
        );
        if bronze[0][0] == serde_json::json!(produced) {
            assert_eq!(bronze[0][1], serde_json::json!(produced), "{bronze:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "bronze: {bronze:?}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(up.terminate().unwrap().success());

    // Every file of the warehouse: Parquet read value by value, the rest byte by byte.
    let secrets: Vec<String> = (0..CUSTOMERS).flat_map(raw).collect();
    let (mut parquet, mut state) = (0, 0);
    let mut redacted_in_state = false;
    for file in files_under(&data.join("warehouse")) {
        let name = file.to_string_lossy().into_owned();
        if name.ends_with(".parquet") {
            parquet += 1;
            for value in parquet_values(&file) {
                assert!(
                    !secrets.iter().any(|s| value.contains(s.as_str())),
                    "raw value {value:?} in {name}"
                );
            }
        } else {
            let bytes = std::fs::read(&file).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            for secret in &secrets {
                assert!(
                    !text.contains(secret.as_str()),
                    "raw value {secret:?} in {name}"
                );
            }
            if name.contains("/state/") {
                state += 1;
                redacted_in_state |= text.contains("[redacted]");
            }
        }
    }
    assert!(parquet >= 3, "{parquet} Parquet files");
    // The scan sees the state's strings: the waiting candidate is there, masked.
    assert!(state > 0 && redacted_in_state, "{state} state files");
}

/// Without the key, a model that hashes fails with the reason, and nothing is written.
#[test]
fn hashing_without_a_key_fails_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("crm");
    let data = write_project(
        &dir,
        &[
            (
                "kappa.toml",
                "[masking]\nsecret_env = \"CRM_KEY_UNSET_IN_TESTS\"\n",
            ),
            ("topics/signups.toml", SIGNUPS),
            ("models/silver/contacts.sql", CONTACTS_SQL),
            ("models/silver/contacts.toml", CONTACTS_TOML),
        ],
    );
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let line = "{\"customer_id\":\"c1\",\"email\":\"a@b.c\",\"phone\":\"1\",\"card\":\"12345\",\
                \"name\":\"A\",\"ts\":\"2026-03-01T00:00:00Z\"}\n";
    let out = kappa(&data, &["produce", "signups"], Some(line.as_bytes()));
    assert!(out.status.success(), "{}", stderr(&out));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let status = crate::status(&data, project);
        let reason = status["models"][0]["detail"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if reason.contains("CRM_KEY_UNSET_IN_TESTS") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reason given: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(up.terminate().unwrap().success());
}

/// Asserts `got == expected`, naming only the counts and the first difference.
fn same_rows(got: &[(i64, String)], expected: &[(i64, String)], what: &str) {
    if got != expected {
        let first = got.iter().zip(expected).position(|(g, e)| g != e);
        let at = first.unwrap_or(got.len().min(expected.len()));
        panic!(
            "{what}: {} rows, expected {}; first difference at {at}: {:?} instead of {:?}",
            got.len(),
            expected.len(),
            got.get(at),
            expected.get(at)
        );
    }
}

/// Writes a project folder at `dir` (path → text) and creates its data directory, which it
/// returns.
pub(crate) fn write_project(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    for (path, text) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let data = dir.join(".kappa");
    std::fs::create_dir_all(&data).unwrap();
    data
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// Every value of every column of a Parquet file, as text.
fn parquet_values(file: &Path) -> Vec<String> {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(file).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap();
    let mut values = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        for column in batch.columns() {
            let text = arrow::compute::cast(column, &arrow::datatypes::DataType::Utf8).unwrap();
            let text = text
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap();
            values.extend(text.iter().flatten().map(str::to_owned));
        }
    }
    values
}

const ORDERS_TOPIC: &str = "partitions = 1\n\n[schema]\norder_id = \"bigint\"\nstatus = \
                            \"string\"\namount = \"int\"\nproduct_id = \"string\"\ncoupon = { \
                            type = \"string\", required = false }\nts = \"timestamp\"\n";

/// The silver model of the audit tests: the orders as they come.
const SILVER_ORDERS_SQL: &str = "SELECT order_id, status, amount, product_id, ts FROM orders\n";

/// Every kind of expectation twice: `<kind>_ok` holds over the test's orders, `<kind>_bad`
/// does not.
const ORDER_EXPECTATIONS: &str = r#"
[[expect]]
name = "not_null_ok"
not_null = "order_id"
[[expect]]
name = "not_null_bad"
not_null = "coupon"
[[expect]]
name = "accepted_values_ok"
accepted_values = { column = "status", values = ["new", "paid"] }
[[expect]]
name = "accepted_values_bad"
accepted_values = { column = "status", values = ["new"] }
[[expect]]
name = "range_ok"
range = { column = "amount", min = 1, max = 10 }
[[expect]]
name = "range_bad"
range = { column = "amount", max = 5 }
[[expect]]
name = "row_ok"
row = "amount > 0 OR status = 'paid'"
[[expect]]
name = "row_bad"
row = "status = 'new'"
[[expect]]
name = "unique_ok"
unique = "order_id"
[[expect]]
name = "unique_bad"
unique = ["status"]
[[expect]]
name = "relationships_ok"
relationships = { column = "product_id", to = "silver.products" }
[[expect]]
name = "relationships_bad"
relationships = { column = "product_id", to = "silver.top_products", field = "product_id" }
[[expect]]
name = "row_count_ok"
row_count = { min = 1, max = 10 }
[[expect]]
name = "row_count_bad"
row_count = { max = 3 }
[[expect]]
name = "freshness_ok"
freshness = { column = "ts", max_age = "36500d" }
[[expect]]
name = "freshness_bad"
freshness = { column = "ts", max_age = "1h" }
severity = "warn"
[[expect]]
name = "query_ok"
query = "SELECT * FROM silver.orders WHERE amount > 1000"
[[expect]]
name = "query_bad"
query = "SELECT * FROM silver.orders o JOIN silver.products p USING (product_id) WHERE o.amount > 8"
"#;

/// `kappa test` runs every expectation the folder declares over the published tables, through
/// a running server and without one, and tells each kind's passing case from its failing one; a failed
/// expectation of severity "fail" fails the command, one of severity "warn" does not.
#[test]
fn kappa_test_runs_every_kind_of_expectation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", "[project]\nname = \"shop\"\n"),
            ("topics/orders.toml", ORDERS_TOPIC),
            (
                "topics/products.toml",
                "partitions = 1\n\n[schema]\nproduct_id = \"string\"\n",
            ),
            (
                "models/silver/orders.sql",
                "SELECT order_id, status, amount, product_id, coupon, ts FROM orders\n",
            ),
            (
                "models/silver/products.sql",
                "SELECT product_id FROM products\n",
            ),
            (
                "models/silver/top_products.sql",
                "SELECT product_id FROM products WHERE product_id = 'p1'\n",
            ),
        ],
    );
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let orders: String = (1..=10)
        .map(|i| {
            let coupon = if i % 4 == 0 {
                "\"coupon\":\"SPRING\","
            } else {
                ""
            };
            format!(
                "{{\"order_id\":{i},\"status\":\"{}\",\"amount\":{i},\"product_id\":\"p{}\",\
                 {coupon}\"ts\":\"2026-03-01T10:00:{i:02}Z\"}}\n",
                if i % 2 == 0 { "paid" } else { "new" },
                1 + i % 3
            )
        })
        .collect();
    let out = kappa(&data, &["produce", "orders"], Some(orders.as_bytes()));
    assert!(out.status.success(), "{}", stderr(&out));
    let products = "{\"product_id\":\"p1\"}\n{\"product_id\":\"p2\"}\n{\"product_id\":\"p3\"}\n";
    let out = kappa(&data, &["produce", "products"], Some(products.as_bytes()));
    assert!(out.status.success(), "{}", stderr(&out));
    crate::wait_caught_up(&data, project, 3, std::time::Duration::from_secs(60));
    // Declared now, over published tables (expectations that drop no rows are not part of
    // the version: nothing replays): `kappa test` runs the folder's expectations on demand.
    std::fs::write(dir.join("models/silver/orders.toml"), ORDER_EXPECTATIONS).unwrap();

    let results = |args: &[&str]| {
        let mut all = vec!["--project", project, "test"];
        all.extend_from_slice(args);
        let out = kappa(&data, &all, None);
        (out.status.success(), stdout(&out), stderr(&out))
    };
    let (ok, json, err) = results(&["--json"]);
    assert!(!ok, "failing expectations fail the command");
    assert!(err.contains("8 of 18 expectations failed"), "{err}");
    let outcomes: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let got: Vec<(String, String, u64)> = outcomes
        .iter()
        .map(|o| {
            (
                o["expectation"].as_str().unwrap().to_owned(),
                o["result"].as_str().unwrap().to_owned(),
                o["failing"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, String, u64)> = [
        ("not_null_ok", "pass", 0),
        ("not_null_bad", "fail", 8),
        ("accepted_values_ok", "pass", 0),
        ("accepted_values_bad", "fail", 5),
        ("range_ok", "pass", 0),
        ("range_bad", "fail", 5),
        ("row_ok", "pass", 0),
        ("row_bad", "fail", 5),
        ("unique_ok", "pass", 0),
        ("unique_bad", "fail", 2),
        ("relationships_ok", "pass", 0),
        ("relationships_bad", "fail", 7),
        ("row_count_ok", "pass", 0),
        ("row_count_bad", "fail", 1),
        ("freshness_ok", "pass", 0),
        ("freshness_bad", "warn", 1),
        ("query_ok", "pass", 0),
        ("query_bad", "fail", 2),
    ]
    .iter()
    .map(|(n, r, c)| ((*n).to_owned(), (*r).to_owned(), *c))
    .collect();
    assert_eq!(got, expected);
    // A table for people, and only the named model's expectations when one is named.
    let (ok, text, _) = results(&["silver.products"]);
    assert!(ok, "{text}");
    assert!(text.starts_with("no expectations"), "{text}");
    let (_, text, _) = results(&[]);
    assert!(text.starts_with("MODEL "), "{text}");
    assert!(
        text.contains("9 passed, 1 warned, 8 failed, 0 could not run"),
        "{text}"
    );
    assert!(up.terminate().unwrap().success());
    // Without the server, from the data directory: the same.
    let (_, json, _) = results(&["--json"]);
    let stopped: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(stopped, outcomes);
}

/// Orders whose amounts must not be negative (a row-level `fail`) and whose ids are unique (a
/// table-level `fail`): every commit waits on the audit branch until both pass.
const AUDITED_TOML: &str = r#"
[[expect]]
name = "no_refunds"
range = { column = "amount", min = 0 }

[[expect]]
unique = "order_id"
"#;

/// The external readers' view of `silver.orders` (pyiceberg and DuckDB, which agree): the
/// order ids main holds, sorted.
fn published_ids(data: &Path) -> Vec<i64> {
    let out = kappa_testkit::python::run_python(
        kappa_testkit::python::READ_TABLE_SCRIPT,
        &[data.to_str().unwrap(), "silver.orders"],
    );
    let read: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(read["pyiceberg"], read["duckdb"], "{out}");
    let mut ids: Vec<i64> = read["pyiceberg"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["order_id"].as_str().unwrap().parse().unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

/// Appends orders `ids`, each of `amount`, to the audit tests' `orders` topic.
fn produce_orders(data: &Path, ids: std::ops::RangeInclusive<i64>, amount: i64) {
    let lines: String = ids
        .map(|i| {
            format!(
                "{{\"order_id\":{i},\"status\":\"new\",\"amount\":{amount},\"product_id\":\"p1\",\
                 \"ts\":\"2026-03-01T10:00:00Z\"}}\n"
            )
        })
        .collect();
    let out = kappa(data, &["produce", "orders"], Some(lines.as_bytes()));
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The rows `sql` answers through `kappa sql --json` (the error while a table does not exist).
fn rows_of(data: &Path, project: &str, sql: &str) -> serde_json::Value {
    let (ok, out, err) = project_command(data, project, &["sql", sql, "--json"]);
    if !ok {
        return serde_json::json!({ "error": err });
    }
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["rows"].clone()
}

/// Waits (30 s at most) until `sql` answers `expected`.
fn wait_rows(data: &Path, project: &str, sql: &str, expected: serde_json::Value) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let rows = rows_of(data, project, sql);
        if rows == expected {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{sql}: {rows}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Runs `kappa --project PROJECT ARGS…` on `data`: (success, stdout, stderr).
fn project_command(data: &Path, project: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["--project", project];
    all.extend_from_slice(args);
    let out = kappa(data, &all, None);
    (out.status.success(), stdout(&out), stderr(&out))
}

/// Waits until silver.orders is in `state` ("quarantined", or "running" with nothing left to
/// read); returns its status.
fn wait_state(data: &Path, project: &str, state: &str) -> serde_json::Value {
    wait_model_state(data, project, "silver.orders", state)
}

/// Waits until silver.orders is quarantined and asserts its reason names `expectation`.
fn quarantined_by(data: &Path, project: &str, expectation: &str) {
    let model = wait_state(data, project, "quarantined");
    let reason = model["detail"].as_str().unwrap_or_default();
    assert!(reason.contains(expectation), "{model}");
}

/// [`wait_state`] of `model`.
fn wait_model_state(data: &Path, project: &str, model: &str, state: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let status = crate::status(data, project);
        let model = status["models"]
            .as_array()
            .and_then(|all| all.iter().find(|m| m["model"] == model))
            .cloned()
            .unwrap_or_default();
        let done = model["state"] == state && (state != "running" || model["lag_records"] == 0);
        if done {
            return model;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never {state}: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Write-Audit-Publish, alternating passing and failing batches: external readers of main
/// (pyiceberg and DuckDB) see every passing batch and never a row of a failing one; the model
/// says it is quarantined and why; `kappa audit` shows the failing rows; `kappa discard` drops
/// a failing commit and the model carries on; `kappa publish --force` publishes one; and a
/// restart meanwhile takes the same decision again.
#[test]
fn external_readers_never_see_a_failing_commit_until_it_is_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", "[project]\nname = \"shop\"\n"),
            ("topics/orders.toml", ORDERS_TOPIC),
            ("models/silver/orders.sql", SILVER_ORDERS_SQL),
            ("models/silver/orders.toml", AUDITED_TOML),
            (
                "models/gold/per_status.sql",
                "SELECT status, count(*) AS n FROM silver.orders GROUP BY status\n",
            ),
        ],
    );
    let project = dir.to_str().unwrap();
    let mut up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let produce = |ids, amount| produce_orders(&data, ids, amount);
    let cli = |args: &[&str]| project_command(&data, project, args);
    let range = |ids: std::ops::RangeInclusive<i64>| ids.collect::<Vec<i64>>();

    // 1. Passing: published.
    produce(1..=5, 10);
    wait_state(&data, project, "running");
    assert_eq!(published_ids(&data), range(1..=5));

    // 2. Failing (a refund): quarantined with the reason, main untouched.
    produce(6..=8, -3);
    quarantined_by(&data, project, "no_refunds");
    // What reads silver waits for it, and says so.
    let gold = wait_model_state(&data, project, "gold.per_status", "waiting");
    assert!(
        gold["detail"]
            .as_str()
            .unwrap()
            .starts_with("waits for silver.orders, which is quarantined"),
        "{gold}"
    );
    assert_eq!(published_ids(&data), range(1..=5));
    // A failing audit fails the command (status 1), as `kappa test` does, and says why.
    let (ok, text, err) = cli(&["audit", "silver.orders"]);
    assert!(
        !ok && err.contains("silver.orders: 1 of 2 expectations fail (no_refunds)"),
        "{err}"
    );
    assert!(text.contains("waits on the audit branch"), "{text}");
    assert!(text.contains("FAIL no_refunds"), "{text}");
    assert!(text.contains("PASS unique_order_id"), "{text}");
    assert!(text.contains("-3"), "the failing rows are shown: {text}");
    // And how many rows a decision moves: the three refunds (one commit).
    assert!(text.contains("drops the 3 rows it writes"), "{text}");
    // Records arriving meanwhile wait too.
    produce(9..=10, 20);
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(published_ids(&data), range(1..=5));
    // A restart takes the same decision again, and what reads silver waits from its start (it
    // does not count the orders the quarantine holds back before silver is quarantined anew).
    let gold_rows = || cli(&["sql", "SELECT status, n FROM gold.per_status", "--json"]).1;
    let before = gold_rows();
    assert!(up.terminate().unwrap().success());
    up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    wait_state(&data, project, "quarantined");
    wait_model_state(&data, project, "gold.per_status", "waiting");
    assert_eq!(gold_rows(), before);
    assert_eq!(published_ids(&data), range(1..=5));

    // 3. Discarded: the refunds never reach main; the model carries on with 9 and 10.
    let (ok, text, err) = cli(&["publish", "silver.orders"]);
    assert!(!ok && err.contains("--force"), "{text}{err}");
    let (ok, text, err) = cli(&["discard", "silver.orders"]);
    assert!(ok, "{err}");
    assert!(text.contains("discarded"), "{text}");
    wait_state(&data, project, "running");
    wait_model_state(&data, project, "gold.per_status", "running");
    let mut expected = range(1..=5);
    expected.extend(9..=10);
    assert_eq!(published_ids(&data), expected);
    // What reads silver reads what silver published: the discarded refunds are not counted.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let counted =
        || serde_json::from_str::<serde_json::Value>(&gold_rows()).unwrap()["rows"].clone();
    while counted() != serde_json::json!([["new", 7]]) {
        assert!(
            std::time::Instant::now() < deadline,
            "gold.per_status: {}",
            gold_rows()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // 4. A table-level failure (a duplicated id), then forced through.
    produce(5..=5, 1);
    quarantined_by(&data, project, "unique_order_id");
    assert_eq!(published_ids(&data), expected);
    let (ok, text, err) = cli(&["publish", "silver.orders", "--force"]);
    assert!(ok, "{err}");
    assert!(text.contains("published"), "{text}");
    expected.push(5);
    expected.sort_unstable();
    assert_eq!(published_ids(&data), expected);
    // The forced duplicate stays in the table; a commit fails `unique` only by adding another.
    produce(11..=11, 1);
    wait_state(&data, project, "running");
    expected.push(11);
    assert_eq!(published_ids(&data), expected);
    produce(9..=9, 1);
    quarantined_by(&data, project, "unique_order_id");
    assert_eq!(published_ids(&data), expected);
    assert!(up.terminate().unwrap().success());
}

/// Expectations added to a running model take effect with `kappa deploy`: the plan shows
/// them, nothing replays, the next commits are audited; and what reads the model reads what it
/// published — rows its audit holds back, and then discards, never reach gold (they did when
/// gold recomputed silver from the topic).
#[test]
fn expectations_deployed_later_guard_what_reads_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", "[project]\nname = \"shop\"\n"),
            ("topics/orders.toml", ORDERS_TOPIC),
            ("models/silver/orders.sql", SILVER_ORDERS_SQL),
            (
                "models/gold/per_status.sql",
                "SELECT status, count(*) AS n, sum(amount) AS total FROM silver.orders \
                 GROUP BY status\n",
            ),
        ],
    );
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let produce = |ids, amount| produce_orders(&data, ids, amount);
    let cli = |args: &[&str]| project_command(&data, project, args);
    // The error until gold's table exists.
    let gold = || rows_of(&data, project, "SELECT n, total FROM gold.per_status");
    let wait_gold = |expected| {
        wait_rows(
            &data,
            project,
            "SELECT n, total FROM gold.per_status",
            expected,
        )
    };
    produce(1..=5, 10);
    wait_gold(serde_json::json!([[5, 50]]));

    // The expectation arrives with a deploy: shown by the plan, applied without a replay.
    std::fs::write(dir.join("models/silver/orders.toml"), AUDITED_TOML).unwrap();
    let (ok, text, err) = cli(&["plan"]);
    assert!(ok, "{err}");
    assert!(text.contains("1 with changed expectations"), "{text}");
    assert!(text.contains("+ no_refunds (fail)"), "{text}");
    let (ok, text, err) = cli(&["deploy", "--wait"]);
    assert!(ok, "{err}");
    assert!(
        text.contains("silver.orders: its changed expectations check its next commits"),
        "{text}"
    );
    let (ok, text2, err) = cli(&["plan"]);
    assert!(ok, "{err}");
    assert!(
        text2.contains("0 to replay") && !text2.contains("expectations changed"),
        "{text}\n{text2}"
    );

    // Refunds fail it: silver is quarantined, and gold does not count them.
    produce(6..=8, -3);
    quarantined_by(&data, project, "no_refunds");
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(gold(), serde_json::json!([[5, 50]]));
    // Discarded: gold never counts them, and goes on with what comes next.
    let (ok, _, err) = cli(&["discard", "silver.orders"]);
    assert!(ok, "{err}");
    produce(9..=9, 20);
    wait_state(&data, project, "running");
    wait_gold(serde_json::json!([[6, 70]]));
    assert!(up.terminate().unwrap().success());
}

/// A join of two streams whose sides are models reads those models' tables as main published
/// them: the orders silver's audit holds back meet their payments only if they are published,
/// and once discarded they never do (they did when the join recomputed silver). So for a join
/// of silver.orders with the topic `payments` (gold.paid), and with the model silver.payments
/// over it (gold.both).
#[test]
fn a_join_of_models_reads_what_they_published() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", "[project]\nname = \"shop\"\n"),
            ("topics/orders.toml", ORDERS_TOPIC),
            (
                "topics/payments.toml",
                "partitions = 1\n\n[schema]\norder_id = \"bigint\"\npaid = \"int\"\nts = \
                 \"timestamp\"\n",
            ),
            ("models/silver/orders.sql", SILVER_ORDERS_SQL),
            ("models/silver/orders.toml", AUDITED_TOML),
            (
                "models/silver/payments.sql",
                "SELECT order_id, paid, ts FROM payments WHERE paid > 0\n",
            ),
            (
                "models/gold/paid.sql",
                "SELECT count(*) AS n, sum(p.paid) AS paid FROM silver.orders o JOIN payments p \
                 ON p.order_id = o.order_id AND p.ts BETWEEN o.ts AND o.ts + INTERVAL '1 hour'\n",
            ),
            (
                "models/gold/both.sql",
                "SELECT count(*) AS n, sum(p.paid) AS paid FROM silver.orders o JOIN \
                 silver.payments p ON p.order_id = o.order_id AND p.ts BETWEEN o.ts AND o.ts + \
                 INTERVAL '1 hour'\n",
            ),
        ],
    );
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let cli = |args: &[&str]| project_command(&data, project, args);
    let pay = |ids: std::ops::RangeInclusive<i64>| {
        let lines: String = ids
            .map(|i| format!("{{\"order_id\":{i},\"paid\":1,\"ts\":\"2026-03-01T10:30:00Z\"}}\n"))
            .collect();
        let out = kappa(&data, &["produce", "payments"], Some(lines.as_bytes()));
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let paid = |model: &str| rows_of(&data, project, &format!("SELECT n, paid FROM {model}"));
    let wait_paid = |expected: serde_json::Value| {
        for model in ["gold.paid", "gold.both"] {
            wait_rows(
                &data,
                project,
                &format!("SELECT n, paid FROM {model}"),
                expected.clone(),
            );
        }
    };
    let (ok, text, err) = cli(&["plan"]);
    assert!(ok, "{err}");
    assert!(text.contains("silver.orders"), "{text}");
    let deployment: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("deployment.json")).unwrap())
            .unwrap();
    assert_eq!(
        deployment["models"]["gold.both"]["reads_tables"],
        serde_json::json!(["silver.orders", "silver.payments"]),
        "{deployment}"
    );
    produce_orders(&data, 1..=5, 10);
    pay(1..=5);
    wait_paid(serde_json::json!([[5, 5]]));

    // Refunds fail silver's audit: their payments find no order in what silver published.
    produce_orders(&data, 6..=8, -3);
    quarantined_by(&data, project, "no_refunds");
    pay(6..=8);
    std::thread::sleep(std::time::Duration::from_secs(2));
    for model in ["gold.paid", "gold.both"] {
        assert_eq!(paid(model), serde_json::json!([[5, 5]]), "{model}");
    }

    // Discarded: they never meet; what comes next does.
    let (ok, _, err) = cli(&["discard", "silver.orders"]);
    assert!(ok, "{err}");
    produce_orders(&data, 9..=9, 20);
    pay(9..=9);
    wait_state(&data, project, "running");
    wait_paid(serde_json::json!([[6, 6]]));
    assert!(up.terminate().unwrap().success());
}

/// A model over a GROUP BY model is refreshed from the GROUP BY's table as main published it:
/// any SQL (here an aggregate of aggregates, which no incremental shape runs), and never the
/// groups an audit holds back.
#[test]
fn a_model_over_a_group_by_reads_what_it_published() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", "[project]\nname = \"shop\"\n"),
            ("topics/orders.toml", ORDERS_TOPIC),
            (
                "models/silver/per_status.sql",
                "SELECT status, count(*) AS n, sum(amount) AS total FROM orders GROUP BY status\n",
            ),
            (
                "models/silver/per_status.toml",
                "[[expect]]\nname = \"no_net_refunds\"\nrange = { column = \"total\", min = 0 }\n",
            ),
            // Two table hops: a GROUP BY over a row-by-row model's table, refreshed from.
            ("models/silver/lines.sql", SILVER_ORDERS_SQL),
            (
                "models/gold/per_product.sql",
                "SELECT product_id, count(*) AS n FROM silver.lines GROUP BY product_id\n",
            ),
            (
                "models/gold/products.sql",
                "SELECT count(*) AS products, sum(n) AS n FROM gold.per_product\n",
            ),
            (
                "models/gold/overall.sql",
                "SELECT sum(n) AS n, sum(total) AS total, max(total) AS biggest FROM \
                 silver.per_status\n",
            ),
        ],
    );
    let project = dir.to_str().unwrap();
    let (ok, out, err) = project_command(&data, project, &["check"]);
    assert!(ok, "{out}{err}");
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let cli = |args: &[&str]| project_command(&data, project, args);
    let overall = || rows_of(&data, project, "SELECT n, total FROM gold.overall");
    let wait_overall = |expected| {
        wait_rows(
            &data,
            project,
            "SELECT n, total FROM gold.overall",
            expected,
        )
    };
    produce_orders(&data, 1..=5, 10);
    wait_overall(serde_json::json!([[5, 50]]));
    // Lag counts through every table hop down to the topic: nothing left once caught up.
    wait_rows(
        &data,
        project,
        "SELECT products, n FROM gold.products",
        serde_json::json!([[1, 5]]),
    );
    crate::wait_caught_up(&data, project, 5, std::time::Duration::from_secs(30));

    // A refund that takes the group below zero fails silver's audit: gold keeps what main has.
    produce_orders(&data, 6..=6, -100);
    wait_model_state(&data, project, "silver.per_status", "quarantined");
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(overall(), serde_json::json!([[5, 50]]));

    // Discarded: gold never counts it, and follows what comes next.
    let (ok, _, err) = cli(&["discard", "silver.per_status"]);
    assert!(ok, "{err}");
    produce_orders(&data, 7..=7, 20);
    wait_overall(serde_json::json!([[6, 70]]));
    assert!(up.terminate().unwrap().success());
}

/// A dimension model is looked up as its table on main published it: while a change of it
/// waits for a decision, the facts that would join it wait too, and once it is discarded they
/// join the version main kept — never the held one.
#[test]
fn facts_look_a_dimension_up_as_it_was_published() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", "[project]\nname = \"shop\"\n"),
            (
                "topics/prices.toml",
                "partitions = 2\nkey = \"product_id\"\n\n[schema]\nproduct_id = \"string\"\n\
                 cents = \"bigint\"\nupdated_at = \"timestamp\"\n",
            ),
            ("topics/orders.toml", ORDERS_TOPIC),
            (
                "models/silver/prices.sql",
                "SELECT product_id, cents, updated_at FROM prices\n",
            ),
            (
                "models/silver/prices.toml",
                "materialization = \"scd1\"\nkey = [\"product_id\"]\nupdated_at = \
                 \"updated_at\"\n\n[[expect]]\nname = \"no_negative_price\"\nrange = { column \
                 = \"cents\", min = 0 }\n",
            ),
            (
                "models/gold/priced.sql",
                "SELECT o.order_id, p.cents FROM orders o LEFT JOIN silver.prices p ON \
                 o.product_id = p.product_id\n",
            ),
        ],
    );
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let cli = |args: &[&str]| project_command(&data, project, args);
    let price = |cents: i64, minute: u32| {
        let line = format!(
            "{{\"product_id\":\"p1\",\"cents\":{cents},\"updated_at\":\"2026-03-01T10:{minute:02}:00Z\"}}\n"
        );
        let out = kappa(&data, &["produce", "prices"], Some(line.as_bytes()));
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let priced = || {
        rows_of(
            &data,
            project,
            "SELECT order_id, cents FROM gold.priced ORDER BY order_id",
        )
    };
    let wait_priced = |expected| {
        wait_rows(
            &data,
            project,
            "SELECT order_id, cents FROM gold.priced ORDER BY order_id",
            expected,
        )
    };
    // A change produced before an order is what the order finds.
    price(100, 0);
    produce_orders(&data, 1..=1, 5);
    wait_priced(serde_json::json!([[1, 100]]));

    // A negative price fails the dimension's audit: the order after it waits, unpriced.
    price(-5, 1);
    produce_orders(&data, 2..=2, 5);
    let held = wait_model_state(&data, project, "silver.prices", "quarantined");
    assert!(
        held["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("no_negative_price"),
        "{held}"
    );
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(priced(), serde_json::json!([[1, 100]]));

    // Discarded: the order joins the price main kept, and the next change is seen.
    let (ok, _, err) = cli(&["discard", "silver.prices"]);
    assert!(ok, "{err}");
    wait_priced(serde_json::json!([[1, 100], [2, 100]]));
    price(120, 2);
    produce_orders(&data, 3..=3, 5);
    wait_priced(serde_json::json!([[1, 100], [2, 100], [3, 120]]));
    // A change while no order comes: the fact records how far its lookups reach, and lags
    // nothing (its lag counts the dimension's topic too).
    price(130, 3);
    crate::wait_caught_up(&data, project, 2, std::time::Duration::from_secs(30));
    assert!(up.terminate().unwrap().success());
}

/// A GROUP BY read beside a stream is looked up as its table on main published it, as a
/// dimension is: a visit finds the orders produced before it; while a commit of the GROUP BY
/// waits for a decision the visits after it wait too, and once it is discarded they find what
/// main kept — never the held totals.
#[test]
fn a_stream_looks_a_group_by_up_as_it_was_published() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", "[project]\nname = \"shop\"\n"),
            ("topics/orders.toml", ORDERS_TOPIC),
            (
                "topics/visits.toml",
                "partitions = 1\n\n[schema]\nvisit_id = \"bigint\"\nproduct_id = \"string\"\n",
            ),
            (
                "models/gold/per_product.sql",
                "SELECT product_id, sum(amount) AS amount, count(*) AS n FROM orders \
                 GROUP BY product_id\n",
            ),
            (
                "models/gold/per_product.toml",
                "[[expect]]\nname = \"at_most_100\"\nrange = { column = \"amount\", max = 100 }\n",
            ),
            (
                "models/gold/visits.sql",
                "SELECT v.visit_id, p.amount, p.n FROM visits v LEFT JOIN gold.per_product p \
                 ON v.product_id = p.product_id\n",
            ),
        ],
    );
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let cli = |args: &[&str]| project_command(&data, project, args);
    let visit = |id: i64| {
        let line = format!("{{\"visit_id\":{id},\"product_id\":\"p1\"}}\n");
        let out = kappa(&data, &["produce", "visits"], Some(line.as_bytes()));
        assert!(out.status.success(), "{}", stderr(&out));
    };
    const VISITS: &str = "SELECT visit_id, amount, n FROM gold.visits ORDER BY visit_id";
    let wait_visits = |expected| wait_rows(&data, project, VISITS, expected);
    produce_orders(&data, 1..=2, 10);
    visit(1);
    wait_visits(serde_json::json!([[1, 20, 2]]));

    // An order past the limit fails the GROUP BY's audit: the visit after it waits.
    produce_orders(&data, 3..=3, 500);
    visit(2);
    let held = wait_model_state(&data, project, "gold.per_product", "quarantined");
    assert!(
        held["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("at_most_100"),
        "{held}"
    );
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(
        rows_of(&data, project, VISITS),
        serde_json::json!([[1, 20, 2]])
    );

    // Discarded: the visit finds what main kept, and the next order is seen.
    let (ok, _, err) = cli(&["discard", "gold.per_product"]);
    assert!(ok, "{err}");
    wait_visits(serde_json::json!([[1, 20, 2], [2, 20, 2]]));
    produce_orders(&data, 4..=4, 5);
    visit(3);
    wait_visits(serde_json::json!([[1, 20, 2], [2, 20, 2], [3, 25, 3]]));
    // Nothing lags: the visits' commits record how far in `orders` their lookups reach.
    crate::wait_caught_up(&data, project, 2, std::time::Duration::from_secs(30));
    assert!(up.terminate().unwrap().success());
}

/// `drop` sets exactly the violating rows aside into the model's quarantine table, each once,
/// with the names of what they failed — while `kappa up` is killed with SIGKILL again and
/// again as it processes them.
#[test]
fn dropped_rows_reach_quarantine_exactly_once_under_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    let toml = "[[expect]]\nname = \"no_refunds\"\nrange = { column = \"amount\", min = 0 \
                }\nseverity = \"drop\"\n\n[[expect]]\nname = \"known_product\"\nrow = \
                \"product_id LIKE 'p%'\"\nseverity = \"drop\"\n\n[[expect]]\nname = \
                \"small\"\nrange = { column = \"amount\", max = 90 }\nseverity = \"warn\"\n";
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", "[project]\nname = \"shop\"\n"),
            (
                "topics/orders.toml",
                ORDERS_TOPIC
                    .replace("partitions = 1", "partitions = 3")
                    .as_str(),
            ),
            ("models/silver/orders.sql", SILVER_ORDERS_SQL),
            ("models/silver/orders.toml", toml),
            (
                "models/gold/per_product.sql",
                "SELECT product_id, count(*) AS n FROM silver.orders GROUP BY product_id\n",
            ),
        ],
    );
    let project = dir.to_str().unwrap();
    // Order i: a refund when i % 7 == 0, an unknown product when i % 11 == 0 (both when both).
    let order = |i: i64| {
        let amount = if i % 7 == 0 { -(i % 50) - 1 } else { i % 100 };
        let product = if i % 11 == 0 { "x9" } else { "p1" };
        format!(
            "{{\"order_id\":{i},\"status\":\"new\",\"amount\":{amount},\"product_id\":\"{product}\",\
             \"ts\":\"2026-03-01T10:00:00Z\"}}\n"
        )
    };
    const BATCHES: i64 = 24;
    const PER_BATCH: i64 = 250;
    let mut up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let mut kills = 0;
    for b in 0..BATCHES {
        let lines: String = (b * PER_BATCH..(b + 1) * PER_BATCH).map(order).collect();
        let out = kappa(
            &data,
            &["produce", "orders", "--key", "order_id"],
            Some(lines.as_bytes()),
        );
        assert!(out.status.success(), "{}", stderr(&out));
        if b % 3 == 2 {
            // Somewhere in the processing of what was just produced.
            std::thread::sleep(std::time::Duration::from_millis(17 * (b as u64 % 5)));
            up.kill9().unwrap();
            kills += 1;
            up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
        }
    }
    crate::wait_caught_up(&data, project, 2, std::time::Duration::from_secs(120));
    let status = crate::status(&data, project);
    let version = status["models"][0]["version"].as_str().unwrap().to_owned();
    let ids = |sql: &str| -> Vec<(i64, String)> {
        let out = kappa(&data, &["sql", sql, "--json"], None);
        assert!(out.status.success(), "{sql}: {}", stderr(&out));
        let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        json["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r[0].as_i64().unwrap(),
                    r[1].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    let all = 0..BATCHES * PER_BATCH;
    let kept: Vec<(i64, String)> = all
        .clone()
        .filter(|i| i % 7 != 0 && i % 11 != 0)
        .map(|i| (i, String::new()))
        .collect();
    same_rows(
        &ids("SELECT order_id, '' FROM silver.orders ORDER BY order_id"),
        &kept,
        &format!("silver holds exactly the rows that passed, each once ({kills} kills)"),
    );
    // A model reading silver (recomputing it inline) counts what silver's table holds.
    same_rows(
        &ids("SELECT n, product_id FROM gold.per_product"),
        &[(kept.len() as i64, "p1".to_owned())],
        "gold counts silver's rows, not the dropped ones",
    );
    let quarantined: Vec<(i64, String)> = all
        .filter(|i| i % 7 == 0 || i % 11 == 0)
        .map(|i| {
            let failed = match (i % 7 == 0, i % 11 == 0) {
                (true, true) => "no_refunds,known_product",
                (true, false) => "no_refunds",
                _ => "known_product",
            };
            (i, failed.to_owned())
        })
        .collect();
    same_rows(
        &ids(&format!(
            "SELECT order_id, _failed_expectations FROM quarantine.silver__orders__{version} \
             ORDER BY order_id"
        )),
        &quarantined,
        &format!("the quarantine holds exactly the violating rows, each once ({kills} kills)"),
    );
    assert!(up.terminate().unwrap().success());
}

/// A webhook receiver on 127.0.0.1: records every request's path and body; the first
/// `failures` requests to `/flaky` get a 500.
struct Receiver {
    url: String,
    got: std::sync::Arc<std::sync::Mutex<Vec<(String, String, u16)>>>,
}

impl Receiver {
    fn start(failures: usize) -> Receiver {
        use std::io::{BufRead, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = got.clone();
        std::thread::spawn(move || {
            let mut flaky = 0;
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .to_owned();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let status = if path == "/flaky" && flaky < failures {
                    flaky += 1;
                    500
                } else {
                    200
                };
                seen.lock().unwrap().push((
                    path,
                    String::from_utf8_lossy(&body).into_owned(),
                    status,
                ));
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        Receiver { url, got }
    }

    fn bodies(&self, path: &str, status: u16) -> Vec<serde_json::Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, s)| p == path && *s == status)
            .map(|(_, b, _)| serde_json::from_str(b).unwrap())
            .collect()
    }
}

/// Alerts reach the webhooks of kappa.toml — generic JSON and Slack-compatible — for dead
/// letters and for a commit that failed its audit; a webhook that fails gets the alert again
/// with backoff until it takes it; the last alerts are in `kappa status`.
#[test]
fn alerts_reach_webhooks_with_retries() {
    let receiver = Receiver::start(2);
    let warned = format!(
        "{AUDITED_TOML}\n[[expect]]\nname = \"small\"\nrange = {{ column = \"amount\", max = 90 \
         }}\nseverity = \"warn\"\n"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    let kappa_toml = format!(
        "[project]\nname = \"shop\"\n\n[alerts]\nlag_records = 1000000\n\n[[alerts.webhooks]]\n\
         url = \"{0}/flaky\"\n\n[[alerts.webhooks]]\nurl = \"{0}/slack\"\nformat = \"slack\"\n",
        receiver.url
    );
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", kappa_toml.as_str()),
            ("topics/orders.toml", ORDERS_TOPIC),
            ("models/silver/orders.sql", SILVER_ORDERS_SQL),
            ("models/silver/orders.toml", &warned),
        ],
    );
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    // The monitor takes its first look (the dead letters it then finds are not new).
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let bad = "{\"order_id\":1,\"status\":\"new\",\"amount\":\"lots\",\"product_id\":\"p1\",\
               \"ts\":\"2026-03-01T10:00:00Z\"}\n";
    let out = kappa(&data, &["produce", "orders"], Some(bad.as_bytes()));
    assert!(out.status.success(), "{}", stderr(&out));
    let big = "{\"order_id\":3,\"status\":\"new\",\"amount\":95,\"product_id\":\"p1\",\
               \"ts\":\"2026-03-01T10:00:00Z\"}\n";
    let out = kappa(&data, &["produce", "orders"], Some(big.as_bytes()));
    assert!(out.status.success(), "{}", stderr(&out));
    wait_state(&data, project, "running");
    let refund = "{\"order_id\":2,\"status\":\"new\",\"amount\":-5,\"product_id\":\"p1\",\
                  \"ts\":\"2026-03-01T10:00:00Z\"}\n";
    let out = kappa(&data, &["produce", "orders"], Some(refund.as_bytes()));
    assert!(out.status.success(), "{}", stderr(&out));
    wait_state(&data, project, "quarantined");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let kinds = |bodies: &[serde_json::Value], field: &str| -> Vec<String> {
        let mut kinds: Vec<String> = bodies
            .iter()
            .map(|b| b[field].as_str().unwrap_or_default().to_owned())
            .collect();
        kinds.sort();
        kinds
    };
    loop {
        let delivered = receiver.bodies("/flaky", 200);
        let slack = receiver.bodies("/slack", 200);
        if delivered.len() >= 3 && slack.len() >= 3 {
            assert_eq!(
                kinds(&delivered, "kind"),
                ["dead_letters", "expectation_failed", "expectation_warning"],
                "{delivered:?}"
            );
            for body in &delivered {
                assert_eq!(body["model"], "silver.orders", "{body}");
                assert_eq!(body["source"], "kappa", "{body}");
            }
            let texts = kinds(&slack, "text");
            assert!(
                texts[0].starts_with("kappa dead_letters (silver.orders): 1 new dead letters"),
                "{texts:?}"
            );
            assert!(
                texts[1].starts_with("kappa expectation_failed (silver.orders)"),
                "{texts:?}"
            );
            assert!(texts[1].contains("no_refunds"), "{texts:?}");
            assert!(
                texts[2].starts_with("kappa expectation_warning (silver.orders)")
                    && texts[2].contains("`small` on 1 rows"),
                "{texts:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "alerts not delivered: {:?}",
            receiver.got.lock().unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The failing webhook was retried: two refusals, then it took every alert.
    assert_eq!(receiver.bodies("/flaky", 500).len(), 2);
    let status = crate::status(&data, project);
    let alerts = status["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 3, "{status}");
    for alert in alerts {
        assert_eq!(alert["delivered"], 2, "{alert}");
        assert_eq!(alert["failed"], 0, "{alert}");
    }
    let attempts: u64 = alerts.iter().map(|a| a["attempts"].as_u64().unwrap()).sum();
    assert_eq!(attempts, 6 + 2, "three alerts to two webhooks, two retries");
    let text = stdout(&kappa(&data, &["--project", project, "status"], None));
    assert!(text.contains("recent alerts:"), "{text}");
    // Killed and started again, the server still shows what was raised before, and the model
    // still waits for its decision.
    up.kill9().unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    wait_state(&data, project, "quarantined");
    let status = crate::status(&data, project);
    let kept: Vec<&serde_json::Value> = status["alerts"].as_array().unwrap().iter().collect();
    assert!(kept.len() >= 3, "{status}");
    assert_eq!(
        kept[..3]
            .iter()
            .map(|a| a["delivered"].as_u64())
            .collect::<Vec<_>>(),
        [Some(2); 3],
        "{status}"
    );
    assert!(
        kept.iter().any(|a| a["kind"] == "expectation_failed"),
        "{status}"
    );
    assert!(up.terminate().unwrap().success());
}

/// A deploy whose new version fails its expectations stops before the cutover: the replaying
/// version's failing commit quarantines it, the deploy fails saying so, and the deployed
/// version keeps serving what it served.
#[test]
fn a_deploy_whose_new_version_fails_its_expectations_does_not_cut_over() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    let silver = dir.join("models/silver/orders.sql");
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", "[project]\nname = \"shop\"\n"),
            ("topics/orders.toml", ORDERS_TOPIC),
            ("models/silver/orders.sql", SILVER_ORDERS_SQL),
            ("models/silver/orders.toml", AUDITED_TOML),
        ],
    );
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let lines: String = (1..=20)
        .map(|i| {
            format!(
                "{{\"order_id\":{i},\"status\":\"new\",\"amount\":{i},\"product_id\":\"p1\",\
                 \"ts\":\"2026-03-01T10:00:00Z\"}}\n"
            )
        })
        .collect();
    let out = kappa(&data, &["produce", "orders"], Some(lines.as_bytes()));
    assert!(out.status.success(), "{}", stderr(&out));
    wait_state(&data, project, "running");
    assert_eq!(published_ids(&data), (1..=20).collect::<Vec<i64>>());

    // v2 takes a fee off every amount: the small ones go negative.
    std::fs::write(
        &silver,
        "SELECT order_id, status, amount - 5 AS amount, product_id, ts FROM orders\n",
    )
    .unwrap();
    let out = kappa(&data, &["--project", project, "deploy", "--wait"], None);
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("the new version of silver.orders is quarantined")
            && err.contains("no_refunds"),
        "{err}"
    );
    // It says what to do about a deploy, not what decides a live model's quarantine.
    assert!(
        err.contains("deploy again") && !err.contains("kappa discard"),
        "{err}"
    );
    // v1 serves on, unchanged, and keeps running.
    let status = wait_state(&data, project, "running");
    assert_eq!(published_ids(&data), (1..=20).collect::<Vec<i64>>());
    let sum = kappa(
        &data,
        &["sql", "SELECT sum(amount) FROM silver.orders", "--json"],
        None,
    );
    let sum: serde_json::Value = serde_json::from_str(&stdout(&sum)).unwrap();
    assert_eq!(sum["rows"][0][0], 210, "{status}");

    // v3 never goes below zero and cuts over; a refund follows, which v3 passes. Rolling back
    // to v1 fails v1's audit on that refund: the rollback stops, and the folder says v3 again,
    // which serves.
    let v3 = "SELECT order_id, status, greatest(amount - 5, 0) AS amount, product_id, ts FROM \
              orders\n";
    std::fs::write(&silver, v3).unwrap();
    let out = kappa(&data, &["--project", project, "deploy", "--wait"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    produce_orders(&data, 21..=21, -3);
    let (ok, out, err) = project_command(&data, project, &["rollback", "silver.orders", "--wait"]);
    assert!(!ok, "{out}");
    assert!(err.contains("no_refunds"), "{err}");
    assert_eq!(std::fs::read_to_string(&silver).unwrap(), v3);
    let (ok, plan, err) = project_command(&data, project, &["plan"]);
    assert!(ok, "{err}");
    assert!(plan.contains("0 to replay"), "{plan}");
    assert!(up.terminate().unwrap().success());
}

/// A model whose upstream keeps failing waits, and says for what, instead of computing on; it
/// goes on once the upstream runs cleanly again.
#[test]
fn models_wait_while_what_they_read_is_failing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    // silver.amounts' audit query names a table that does not exist yet: every commit's audit
    // fails to run, and the runner restarts.
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", "[project]\nname = \"shop\"\n"),
            (
                "topics/orders.toml",
                "partitions = 1\n\n[schema]\nid = \"bigint\"\namount = \"bigint\"\n",
            ),
            (
                "models/silver/amounts.sql",
                "SELECT id, amount FROM orders\n",
            ),
            (
                "models/silver/amounts.toml",
                "[[expect]]\nname = \"known\"\nquery = \"SELECT a.id FROM silver.amounts a \
                 JOIN gold.allowed w ON a.id = w.id WHERE false\"\n",
            ),
            (
                "models/gold/big.sql",
                "SELECT id, amount FROM silver.amounts WHERE amount > 10\n",
            ),
        ],
    );
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let line = "{\"id\":1,\"amount\":50}\n";
    let out = kappa(&data, &["produce", "orders"], Some(line.as_bytes()));
    assert!(out.status.success(), "{}", stderr(&out));
    let waiting = wait_model_state(&data, project, "gold.big", "waiting");
    let detail = waiting["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("waits for silver.amounts, which is failing") && detail.contains("allowed"),
        "{waiting}"
    );
    // The table the audit needs arrives with a deploy: silver's audits run, it publishes, and
    // gold goes on.
    std::fs::write(
        dir.join("models/gold/allowed.sql"),
        "SELECT id FROM orders\n",
    )
    .unwrap();
    let out = kappa(&data, &["--project", project, "deploy", "--wait"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let running = wait_model_state(&data, project, "gold.big", "running");
    assert_eq!(running["rows"], 1, "{running}");
    assert!(up.terminate().unwrap().success());
}
