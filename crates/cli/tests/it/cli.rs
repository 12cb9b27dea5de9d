//! The command line: every command, its output, its errors and exit codes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use kappa_testkit::process::KappaProcess;

use crate::{KAPPA, kappa, stderr, stdout};

const ORDERS: &str = "{\"id\":1,\"c\":\"a\"}\n{\"id\":2,\"c\":\"b\"}\n{\"id\":3,\"c\":\"a\"}\n";

#[test]
fn topics_produce_and_consume_on_a_data_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let out = kappa(
        &data,
        &[
            "topics",
            "create",
            "orders",
            "--partitions",
            "2",
            "--retention",
            "7d",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "created topic `orders` with 2 partitions (fsync always)\n"
    );

    let file = tmp.path().join("orders.ndjson");
    std::fs::write(&file, ORDERS).unwrap();
    let out = kappa(
        &data,
        &[
            "produce",
            "orders",
            file.to_str().unwrap(),
            "--key",
            "c",
            "--json",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(summary["records"], 3);

    let out = kappa(&data, &["produce", "orders"], Some(b"{\"id\":4}\n"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("appended 1 record to `orders`"),
        "{}",
        stdout(&out)
    );

    // Values come back byte for byte; keyed records keep their order within a partition.
    let out = kappa(&data, &["consume", "orders"], None);
    let mut lines: Vec<&str> = stdout(&out).leak().lines().collect();
    let at = |needle: &str| lines.iter().position(|l| l.starts_with(needle)).unwrap();
    assert!(
        at("{\"id\":1,") < at("{\"id\":3,"),
        "key `a`: id 1 was appended before id 3"
    );
    lines.sort();
    assert_eq!(
        lines,
        vec![
            "{\"id\":1,\"c\":\"a\"}",
            "{\"id\":2,\"c\":\"b\"}",
            "{\"id\":3,\"c\":\"a\"}",
            "{\"id\":4}"
        ]
    );

    let out = kappa(
        &data,
        &["consume", "orders", "--json", "--max-records", "2"],
        None,
    );
    let envelopes: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(envelopes.len(), 2);
    assert!(envelopes[0]["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(envelopes[0]["value"].is_object());

    let out = kappa(&data, &["topics", "describe", "orders", "--json"], None);
    let info: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(info["config"]["retention_ms"], 7 * 24 * 3600 * 1000);
    assert_eq!(info["partitions"].as_array().unwrap().len(), 2);

    let out = kappa(&data, &["topics", "list"], None);
    assert!(
        stdout(&out).starts_with("orders\t2 partitions\t4 records"),
        "{}",
        stdout(&out)
    );
}

/// Without `--key`, records are keyed by the topic's declared key (the example's orders by
/// `customer_id`), through a server and without one: one customer's orders share a partition.
#[test]
fn produce_keys_records_by_the_topics_declared_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    init(&dir);
    let data = dir.join(".kappa");
    let project = dir.to_str().unwrap();
    let order = |id: u32, customer: &str| {
        format!(
            "{{\"order_id\":{id},\"customer_id\":\"{customer}\",\"product_id\":\"p1\",\
             \"region\":\"north\",\"quantity\":1,\"unit_price\":\"1.00\",\
             \"ts\":\"2026-01-05T08:00:00Z\"}}\n"
        )
    };
    let mut orders = String::new();
    for id in 0..16 {
        orders.push_str(&order(id, &format!("c-{}", id % 3)));
    }
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let out = kappa(&data, &["produce", "orders"], Some(orders.as_bytes()));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(up.terminate().unwrap().success());
    // Without a server: keyed as the deployed project declares.
    let out = kappa(
        &data,
        &["produce", "orders"],
        Some(order(99, "c-1").as_bytes()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = kappa(&data, &["consume", "orders", "--json"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut partitions: std::collections::BTreeMap<String, std::collections::BTreeSet<u64>> =
        Default::default();
    for line in stdout(&out).lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(record["key"], record["value"]["customer_id"], "{line}");
        partitions
            .entry(record["key"].as_str().unwrap().to_owned())
            .or_default()
            .insert(record["partition"].as_u64().unwrap());
    }
    assert_eq!(partitions.len(), 3, "{partitions:?}");
    assert!(partitions.values().all(|p| p.len() == 1), "{partitions:?}");
}

/// Commands that only read leave nothing behind where nothing ran: `kappa status` in an
/// empty folder says where it looked, and creates no `.kappa/`.
#[test]
fn reading_commands_outside_a_project_create_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    for args in [
        &["status"][..],
        &["sql", "SELECT 1"],
        &["consume", "orders"],
    ] {
        let out = Command::new(KAPPA)
            .args(args)
            .current_dir(tmp.path())
            .env_remove("KAPPA_DATA_DIR")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr(&out).contains("no kappa data directory at"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(!tmp.path().join(".kappa").exists());
}

#[test]
fn bad_input_fails_with_a_located_reason_and_appends_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    assert!(
        kappa(&data, &["topics", "create", "orders"], None)
            .status
            .success()
    );
    let file = tmp.path().join("bad.ndjson");
    std::fs::write(&file, "{\"id\":1}\n{\"id\":2}\n{\"id\" 3}\n").unwrap();
    let out = kappa(&data, &["produce", "orders", file.to_str().unwrap()], None);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("bad.ndjson:3: byte 24: invalid JSON: expected `:`"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one-line reason: {err}");
    let out = kappa(&data, &["consume", "orders"], None);
    assert_eq!(stdout(&out), "", "a file with a bad line appends nothing");

    let out = kappa(&data, &["produce", "order"], Some(b"{}\n"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown topic `order`; topics are: orders"),
        "{}",
        stderr(&out)
    );

    for name in ["a/b", "..", &"x".repeat(250)] {
        let out = kappa(&data, &["topics", "create", name], None);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("invalid topic name"),
            "{name}: {}",
            stderr(&out)
        );
    }
    let out = kappa(&data, &["consume", "orders", "--offset", "5"], None);
    assert!(stderr(&out).contains("out of range"), "{}", stderr(&out));
    let out = kappa(
        &data,
        &["produce", "orders", "--key", "customer"],
        Some(b"{\"id\":1}\n"),
    );
    assert!(
        stderr(&out).contains("stdin:1: byte 0: field `customer` is missing"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn client_commands_use_a_running_server_and_follow_the_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let server = KappaProcess::start(KAPPA.as_ref(), &data, &[]).unwrap();
    // While the server owns the data directory, commands go through its HTTP API.
    let out = kappa(
        &data,
        &["topics", "create", "live", "--partitions", "3"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut follower = Command::new(KAPPA)
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "consume",
            "live",
            "--follow",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Lines arrive through a channel, so a follower that never wakes fails the test instead of
    // hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout_pipe = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout_pipe).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    // The follower has read the (empty) topic and is waiting on a long poll by now.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let produced = std::time::Instant::now();
    let out = kappa(&data, &["produce", "live"], Some(ORDERS.as_bytes()));
    assert!(out.status.success(), "{}", stderr(&out));
    let mut seen: Vec<String> = (0..3)
        .map(|_| {
            rx.recv_timeout(std::time::Duration::from_secs(20))
                .expect("follower printed nothing")
        })
        .collect();
    // Woken by the append, not by the end of its 5 s poll.
    assert!(
        produced.elapsed() < std::time::Duration::from_secs(4),
        "took {:?}",
        produced.elapsed()
    );
    seen.sort();
    assert_eq!(seen.len(), 3);
    assert!(seen[0].starts_with("{\"id\":1"));
    follower.kill().unwrap();
    follower.wait().unwrap();
    // A clean stop removes server.json and closes the log; direct access works again.
    let status = server.terminate().unwrap();
    assert!(status.success());
    assert!(!data.join("server.json").exists());
    let out = kappa(&data, &["consume", "live"], None);
    assert_eq!(stdout(&out).lines().count(), 3);
}

#[test]
fn a_second_server_on_the_same_data_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let _server = KappaProcess::start(KAPPA.as_ref(), &data, &[]).unwrap();
    let out = Command::new(KAPPA)
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "up",
            "--http",
            "127.0.0.1:0",
            "--pg",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is in use by another process (a kappa server"),
        "{}",
        stderr(&out)
    );
}

/// A project on a Kafka cluster is refused by `kappa up` until it serves from one: never
/// run on the embedded log while the project says the records are on the cluster.
#[test]
fn a_kafka_log_is_refused_rather_than_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    let data = crate::quality::write_project(
        &dir,
        &[
            (
                "kappa.toml",
                "[project]\nname = \"shop\"\n[log]\nbackend = \"kafka\"\n[log.kafka]\n\
                 \"bootstrap.servers\" = \"127.0.0.1:9\"\n",
            ),
            ("topics/orders.toml", "[schema]\nid = \"bigint\"\n"),
        ],
    );
    let out = Command::new(KAPPA)
        .args(["up", "--data-dir", data.to_str().unwrap(), "--project"])
        .arg(&dir)
        .args(["--http", "127.0.0.1:0", "--pg", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not run on a Kafka cluster yet"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["up", "--help"],
        vec!["topics", "create", "--help"],
        vec!["produce", "--help"],
        vec!["consume", "--help"],
        vec!["demo", "--help"],
    ] {
        let out = Command::new(KAPPA).args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(stdout(&out).contains("Usage"), "{args:?}");
    }
}

/// The demo's whole story, small: its own checks (v2 = the tally in every month, every final
/// live event in silver and counted by gold) decide its exit status.
#[test]
fn the_demo_tells_its_story_and_checks_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(KAPPA)
        .args(["demo", "--events", "20000", "--live-rate", "500"])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "~ gold.revenue_by_month (changed",
        "audit of gold.revenue_by_month",
        "v2 equals the tally to the cent in every month",
        "nothing missed, nothing twice",
    ] {
        assert!(text.contains(expected), "no `{expected}` in:\n{text}");
    }
    let revenue = text
        .lines()
        .find(|l| l.trim_start().starts_with("sum(revenue)"))
        .unwrap_or_else(|| panic!("no revenue in the audit:\n{text}"));
    assert!(revenue.ends_with("+0.00 %"), "{revenue}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "the demo leaves its folder: {left:?}");
}

#[test]
fn produce_from_a_pipe_exits_on_an_error_while_the_pipe_stays_open() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    // A small request limit makes produce send its first chunk after a few lines.
    let _server =
        KappaProcess::start(KAPPA.as_ref(), &data, &["--max-request-bytes", "2048"]).unwrap();
    let mut producer = Command::new(KAPPA)
        .args(["--data-dir", data.to_str().unwrap(), "produce", "nope"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = producer.stdin.take().unwrap();
    for i in 0..100 {
        writeln!(
            stdin,
            "{{\"id\":{i},\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}}"
        )
        .unwrap();
    }
    stdin.flush().unwrap();
    // stdin stays open: the producer must still stop at the first failed request.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = producer.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "produce hung after its error"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    drop(stdin);
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut producer.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("unknown topic `nope`"), "{err}");
}

#[test]
fn init_writes_a_project_that_checks_clean_and_check_reports_problems() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    let out = Command::new(KAPPA).arg("init").arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let check = |args: &[&str]| {
        Command::new(KAPPA)
            .arg("--project")
            .arg(&dir)
            .arg("check")
            .args(args)
            .output()
            .unwrap()
    };
    let out = check(&[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(
        stdout(&out),
        "ok: 2 topics, 3 models in order silver.orders, gold.revenue_by_category, gold.revenue_by_region\n"
    );

    std::fs::write(dir.join("models/gold/x.sql"), "SELECT *\nFROM silver.ordrs").unwrap();
    let out = check(&[]);
    assert!(!out.status.success());
    assert_eq!(
        stdout(&out),
        "models/gold/x.sql:2:6: no model `silver.ordrs`; did you mean `silver.orders`?\n"
    );
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    let out = check(&["--json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["diagnostics"][0]["line"], 2);

    let again = Command::new(KAPPA).arg("init").arg(&dir).output().unwrap();
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already holds a kappa project"));
}

#[test]
fn check_finds_unknown_columns_with_datafusion() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    init(&dir);
    std::fs::write(
        dir.join("models/gold/big.sql"),
        "SELECT order_id\nFROM silver.orders\nWHERE qty > 3",
    )
    .unwrap();
    let out = Command::new(KAPPA)
        .arg("--project")
        .arg(&dir)
        .arg("check")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        stdout(&out),
        "models/gold/big.sql:3:7: no column `qty`; columns are: amount, customer_id, order_id, product_id, quantity, region, ts, unit_price; did you mean `quantity`?\n"
    );
}

#[test]
fn up_runs_models_into_iceberg_and_sql_reads_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    init(&dir);
    std::fs::write(
        dir.join("models/silver/amounts.sql"),
        "SELECT order_id, region, quantity * unit_price AS amount FROM orders WHERE quantity > 0",
    )
    .unwrap();
    let data = dir.join(".kappa");
    let mut up = Command::new(KAPPA)
        .args([
            "--project",
            dir.to_str().unwrap(),
            "up",
            "--http",
            "127.0.0.1:0",
            "--pg",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(up.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("kappa is up"), "{first}");
    let with_project = |args: &[&str], stdin: Option<&[u8]>| kappa(&data, args, stdin);
    let out = with_project(
        &[
            "produce",
            "products",
            dir.join("data/products.ndjson").to_str().unwrap(),
            "--key",
            "product_id",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    produce_example_orders(&data, &dir);
    let out = with_project(&["produce", "orders"], Some(b"{\"order_id\":9}\n"));
    assert!(out.status.success(), "{}", stderr(&out));
    // Visible within a moment: poll the SQL endpoint.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let rows = loop {
        let out = with_project(
            &[
                "sql",
                "SELECT order_id, amount FROM silver.amounts ORDER BY order_id",
                "--json",
            ],
            None,
        );
        if out.status.success() {
            let result: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
            if result["rows"].as_array().unwrap().len() == 11 {
                break result["rows"].clone();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rows never arrived: {}{}",
            stdout(&out),
            stderr(&out)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(rows[0], serde_json::json!([1, "39.98"]));
    // The example's gold model — a GROUP BY over silver.orders, which deduplicates — upserts
    // the orders the watermark has made final (in the example's data, each partition's last
    // orders are not final yet).
    let gold = loop {
        let out = with_project(
            &[
                "sql",
                "SELECT region, orders, revenue FROM gold.revenue_by_region ORDER BY region",
                "--json",
            ],
            None,
        );
        let result: serde_json::Value =
            serde_json::from_str(&stdout(&out)).unwrap_or(serde_json::Value::Null);
        if result["rows"].as_array().is_some_and(|r| r.len() == 4)
            || std::time::Instant::now() > deadline
        {
            break result["rows"].clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(
        gold,
        serde_json::json!([
            ["east", 1, "6.75"],
            ["north", 2, "51.23"],
            ["south", 1, "19.99"],
            ["west", 2, "24.49"]
        ])
    );
    // The same orders per product category, each looked up in the products table.
    let by_category = loop {
        let out = with_project(
            &[
                "sql",
                "SELECT category, day, orders, revenue, tax FROM gold.revenue_by_category \
                 ORDER BY category, day",
                "--json",
            ],
            None,
        );
        let result: serde_json::Value =
            serde_json::from_str(&stdout(&out)).unwrap_or(serde_json::Value::Null);
        let orders: i64 = result["rows"]
            .as_array()
            .map(|rows| rows.iter().map(|r| r[2].as_i64().unwrap_or(0)).sum())
            .unwrap_or(0);
        if orders == 6 || std::time::Instant::now() > deadline {
            break result["rows"].clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // books: orders 1 and 6 on the 5th, 4 on the 6th; kitchen: 2; toys: 3 and 5 (tax 7 % / 19 %).
    assert_eq!(
        by_category,
        serde_json::json!([
            ["books", "2026-01-05T00:00:00Z", 2, "59.97", "4.19790"],
            ["books", "2026-01-06T00:00:00Z", 1, "19.99", "1.39930"],
            ["kitchen", "2026-01-05T00:00:00Z", 1, "4.50", "0.85500"],
            ["toys", "2026-01-05T00:00:00Z", 2, "18.00", "3.42000"]
        ])
    );
    // The bad record is reported once, by the first model that reads `orders`, though three
    // models read it; the late copy once, by the model that declares the event time.
    let letters = loop {
        let out = with_project(&["consume", "dead_letters"], None);
        let letters: Vec<serde_json::Value> = stdout(&out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if letters.len() >= 2 || std::time::Instant::now() > deadline {
            break letters;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut reasons: Vec<&str> = letters
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    reasons.sort_unstable();
    assert_eq!(
        reasons,
        [
            // The copy of order 2 came after order 3, 98 s later in event time.
            "late: event time 2026-01-05T09:13:02.000000Z is behind partition 2's watermark 2026-01-05T09:14:35.000000Z",
            "required field `customer_id` is missing or null",
        ],
        "{letters:?}"
    );
    // `kappa status` counts them per model, with every model's state, rows and lag.
    let project_dir = dir.to_str().unwrap().to_owned();
    let status = |expect_state: &str| loop {
        let out = with_project(&["--project", &project_dir, "status", "--json"], None);
        assert!(out.status.success(), "{}", stderr(&out));
        let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        let models = status["models"].as_array().unwrap().clone();
        let settled = models
            .iter()
            .all(|m| m["state"] == expect_state && m["lag_records"] == 0);
        if settled || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let running = status("running");
    let models: Vec<(&str, &str, u64, u64)> = running["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["model"].as_str().unwrap(),
                m["state"].as_str().unwrap(),
                m["lag_records"].as_u64().unwrap(),
                m["dead_letters"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        models,
        [
            ("silver.orders", "running", 0, 2),
            ("gold.revenue_by_category", "running", 0, 0),
            ("gold.revenue_by_region", "running", 0, 0),
            ("silver.amounts", "running", 0, 0),
        ],
        "{running}"
    );
    assert_eq!(running["models"][3]["rows"], 11);
    // Each table's size is its data files' bytes.
    assert!(
        running["models"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["bytes"].as_u64().is_some_and(|b| b > 0)),
        "{running}"
    );
    // A table named without its layer: the error names the layers that have it.
    let out = with_project(&["sql", "SELECT * FROM orders"], None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("name one: bronze.orders, silver.orders"),
        "{}",
        stderr(&out)
    );
    let text = stdout(&with_project(&["status"], None));
    assert!(text.starts_with("MODEL "), "{text}");
    assert!(text.contains("dead letters: 2"), "{text}");
    rustix_term(&up);
    assert!(up.wait().unwrap().success());
    // Without a server, the tables and the log tell the same, with every model stopped.
    let stopped = status("stopped");
    assert_eq!(stopped["models"][3]["rows"], 11, "{stopped}");
    assert_eq!(stopped["dead_letters"], running["dead_letters"]);
    // Independent readers (pyiceberg and DuckDB) read every table from the warehouse and get
    // the rows `kappa sql` gets.
    for model in [
        "silver.orders",
        "silver.amounts",
        "gold.revenue_by_category",
        "gold.revenue_by_region",
    ] {
        let out = kappa_testkit::python::run_python(
            kappa_testkit::python::READ_TABLE_SCRIPT,
            &[data.to_str().unwrap(), model],
        );
        let read: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(read["pyiceberg"], read["duckdb"], "{model}: {out}");
        let ours = with_project(&["sql", &format!("SELECT * FROM {model}"), "--json"], None);
        let ours: serde_json::Value = serde_json::from_str(&stdout(&ours)).unwrap();
        let ours = ours["rows"].as_array().unwrap();
        let theirs = read["pyiceberg"].as_array().unwrap();
        assert_eq!(theirs.len(), ours.len(), "{model}: {out}");
        if model == "gold.revenue_by_region" {
            let mut regions: Vec<(String, String, String)> = theirs
                .iter()
                .map(|r| {
                    (
                        r["region"].as_str().unwrap().to_owned(),
                        r["orders"].as_str().unwrap().to_owned(),
                        r["revenue"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            regions.sort();
            assert_eq!(
                regions,
                [
                    ("east".into(), "1".into(), "6.75".into()),
                    ("north".into(), "2".into(), "51.23".into()),
                    ("south".into(), "1".into(), "19.99".into()),
                    ("west".into(), "2".into(), "24.49".into()),
                ]
            );
        }
    }
}

fn rustix_term(child: &std::process::Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
}

/// `[lakehouse]` in `kappa.toml` puts the tables on S3 (moto on loopback): `kappa up` writes
/// them there, `kappa sql` reads them through the server and, once it is gone, straight from
/// the data directory (which recorded the warehouse), and no table file is in the data
/// directory.
#[test]
fn a_warehouse_on_s3_from_kappa_toml_serves_kappa_sql() {
    let s3 = kappa_testkit::python::S3Server::start("shop-lake");
    serve_amounts_from(&s3, "warehouse = \"s3://shop-lake/tables\"\n");
}

/// The scale-out configuration: an Iceberg REST catalog (pyiceberg's catalog behind the REST
/// protocol, on loopback) holding tables on S3. `kappa up` commits through the catalog,
/// `kappa sql` reads through it, and pyiceberg, asking the same catalog, reads the same rows.
/// The catalog fails a third of the commits after applying them (the reply lost) and another
/// third before: each outcome is learnt from the table, and the rows are exactly those of the
/// example orders, none lost, none twice.
#[test]
fn a_rest_catalog_from_kappa_toml_holds_the_tables_on_s3() {
    let s3 = kappa_testkit::python::S3Server::start("shop-lake");
    let catalog_dir = tempfile::tempdir().unwrap();
    let catalog = kappa_testkit::python::RestCatalogServer::start_faulty(
        catalog_dir.path(),
        "s3://shop-lake/tables",
        &s3.properties(),
    );
    let rows = serve_amounts_from(
        &s3,
        &format!(
            "catalog = \"rest\"\nuri = \"{}\"\nwarehouse = \"s3://shop-lake/tables\"\n",
            catalog.uri
        ),
    );
    let mut args = vec![catalog.uri.clone()];
    args.extend(s3.properties().into_iter().map(|(k, v)| format!("{k}={v}")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let read = kappa_testkit::python::run_python(
        r#"
import json, sys
import pyarrow.compute as pc
from pyiceberg.catalog.rest import RestCatalog
props = dict(a.split("=", 1) for a in sys.argv[2:])
table = RestCatalog("kappa", uri=sys.argv[1], **props).load_table("silver.amounts").scan().to_arrow()
print(json.dumps([table.num_rows, str(pc.sum(table["amount"]))]))
"#,
        &args,
    );
    let read: serde_json::Value = serde_json::from_str(read.trim()).unwrap();
    assert_eq!(read[0].as_i64(), rows[0][0].as_i64(), "{read} vs {rows}");
    assert_eq!(read[1].as_str(), rows[0][1].as_str(), "{read} vs {rows}");
    assert_eq!(rows[0][0].as_i64(), Some(11), "{rows}");
    let faults = std::fs::read_to_string(catalog_dir.path().join("faults.log")).unwrap();
    for kind in ["applied-then-500", "refused-503"] {
        assert!(
            faults.contains(kind),
            "no {kind} among the faults:\n{faults}"
        );
    }
}

/// Runs the example project with `lakehouse` as its `[lakehouse]` section (plus the S3
/// properties of `s3`) and a model `silver.amounts` with expectations (so its commits are
/// audited on a branch, then published); checks that `kappa sql` answers through
/// the server and, after it stopped, from the data directory alone, and that the table's
/// files are in the bucket, not the data directory. Returns the rows of
/// `SELECT count(*), sum(amount)`.
fn serve_amounts_from(s3: &kappa_testkit::python::S3Server, lakehouse: &str) -> serde_json::Value {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    init(&dir);
    let mut config = std::fs::read_to_string(dir.join("kappa.toml")).unwrap();
    config.push_str(&format!(
        "\n[lakehouse]\n{lakehouse}[lakehouse.properties]\n"
    ));
    for (key, value) in s3.properties() {
        config.push_str(&format!("\"{key}\" = \"{value}\"\n"));
    }
    std::fs::write(dir.join("kappa.toml"), config).unwrap();
    std::fs::write(
        dir.join("models/silver/amounts.sql"),
        "SELECT order_id, quantity * unit_price AS amount FROM orders WHERE quantity > 0",
    )
    .unwrap();
    // Audited: every commit goes to the table's audit branch first and is published by a
    // fast-forward of main (through the catalog, faults included).
    std::fs::write(
        dir.join("models/silver/amounts.toml"),
        "[[expect]]\nrow_count = { min = 1 }\n\n[[expect]]\nrange = { column = \"amount\", min = 0 }\n",
    )
    .unwrap();
    let data = dir.join(".kappa");
    std::fs::create_dir_all(&data).unwrap();
    let up =
        KappaProcess::start(KAPPA.as_ref(), &data, &["--project", dir.to_str().unwrap()]).unwrap();
    produce_example_orders(&data, &dir);
    let models = walk_sql(&dir.join("models"));
    crate::wait_caught_up(
        &data,
        dir.to_str().unwrap(),
        models,
        std::time::Duration::from_secs(60),
    );
    let query = [
        "sql",
        "SELECT count(*) AS n, CAST(sum(amount) AS VARCHAR) AS total FROM silver.amounts",
        "--json",
    ];
    let out = kappa(&data, &query, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let through_server =
        serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()["rows"].clone();
    assert!(
        through_server[0][0].as_i64().unwrap() > 0,
        "{through_server}"
    );
    up.terminate().unwrap();
    let out = kappa(&data, &query, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let direct: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(direct["rows"], through_server);
    assert!(data.join("lakehouse.json").exists());
    assert!(
        !data.join("warehouse").exists(),
        "table files in the data directory"
    );
    let listed = kappa_testkit::python::run_python(
        "import sys, boto3\n\
         s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
             aws_access_key_id='kappa', aws_secret_access_key='kappa')\n\
         keys = [o['Key'] for o in s3.list_objects_v2(Bucket='shop-lake').get('Contents', [])]\n\
         print(sum(1 for k in keys if '/data/' in k and (k.startswith('tables/silver/amounts/')\n\
             or k.startswith('tables/kappa_versions/silver__amounts__'))))",
        &[&s3.endpoint],
    );
    assert!(listed.trim().parse::<usize>().unwrap() > 0, "{listed}");
    through_server
}

/// The number of `.sql` files under `dir` (a project's models).
fn walk_sql(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            if p.is_dir() {
                walk_sql(&p)
            } else {
                usize::from(p.extension().is_some_and(|x| x == "sql"))
            }
        })
        .sum()
}

/// `kappa init DIR`, which must succeed.
fn init(dir: &std::path::Path) {
    let out = Command::new(KAPPA).arg("init").arg(dir).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Produces the example project's orders (`kappa init`'s `data/orders.ndjson`), keyed by
/// customer, into the data directory `data`.
fn produce_example_products(data: &std::path::Path, project: &std::path::Path) {
    let products = project.join("data/products.ndjson");
    let out = kappa(
        data,
        &[
            "produce",
            "products",
            products.to_str().unwrap(),
            "--key",
            "product_id",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Every version `kappa status` lists: (model, version, state).
fn version_states(data: &std::path::Path, project: &str) -> Vec<(String, String, String)> {
    let out = kappa(data, &["--project", project, "status", "--json"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    status["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let field = |k: &str| v[k].as_str().unwrap().to_owned();
            (field("model"), field("version"), field("state"))
        })
        .collect()
}

/// Both gold tables' total revenue of the example shop, as text: one version's two tables
/// agree, so two different values are a mix of versions.
const BOTH_REVENUES: &str = "SELECT CAST((SELECT sum(revenue) FROM gold.revenue_by_region) AS \
                             VARCHAR), CAST((SELECT sum(revenue) FROM gold.revenue_by_category) \
                             AS VARCHAR)";

fn produce_example_orders(data: &std::path::Path, project: &std::path::Path) {
    // The example's redelivered copy of order 2 follows it, and deduplication drops it; here it
    // comes after order 3 instead, 98 s later in event time, so that it is late: the tests
    // see a late record as well as a dropped duplicate's absence.
    let text = std::fs::read_to_string(project.join("data/orders.ndjson")).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    let copy = lines.remove(2);
    assert!(
        copy.contains("\"order_id\":2"),
        "the example's copy moved: {copy}"
    );
    lines.insert(3, copy);
    let orders = project.join("data/orders-late-copy.ndjson");
    std::fs::write(&orders, lines.join("\n") + "\n").unwrap();
    let out = kappa(
        data,
        &[
            "produce",
            "orders",
            orders.to_str().unwrap(),
            "--key",
            "customer_id",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `kappa up` records what it runs; `kappa plan` compares the folder with it, through the
/// server while it runs and from the data directory once it stopped: an edited gold model is
/// changed (with its diff), the other models unchanged, a new one new, and each replay names
/// what it reads (here the unchanged silver's committed table).
#[test]
fn plan_compares_the_folder_with_what_up_deployed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    init(&dir);
    let data = dir.join(".kappa");
    std::fs::create_dir_all(&data).unwrap();
    let project = dir.to_str().unwrap();
    let plan = || {
        let out = kappa(&data, &["--project", project, "plan", "--json"], None);
        assert!(out.status.success(), "{}", stderr(&out));
        let plan: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        let text = kappa(&data, &["--project", project, "plan"], None);
        assert!(text.status.success(), "{}", stderr(&text));
        (plan, stdout(&text))
    };
    // Nothing deployed yet: every model is new.
    let (first, _) = plan();
    assert_eq!(first["summary"]["new"], 3, "{first}");

    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    produce_example_orders(&data, &dir);
    // The plan counts silver's committed rows, so wait until silver committed them.
    crate::wait_caught_up(&data, project, 3, std::time::Duration::from_secs(60));
    let region = dir.join("models/gold/revenue_by_region.sql");
    let sql = std::fs::read_to_string(&region).unwrap();
    std::fs::write(
        &region,
        sql.replace("sum(amount) AS revenue", "sum(amount) * 2 AS revenue"),
    )
    .unwrap();
    std::fs::write(
        dir.join("models/gold/orders_by_region.sql"),
        "SELECT region, count(*) AS orders FROM silver.orders GROUP BY region",
    )
    .unwrap();
    let changes = |plan: &serde_json::Value| -> Vec<(String, String)> {
        plan["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["model"].as_str().unwrap().to_owned(),
                    m["change"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let (live, text) = plan();
    let mut got = changes(&live);
    got.sort();
    assert_eq!(
        got,
        [
            ("gold.orders_by_region".into(), "new".into()),
            ("gold.revenue_by_category".into(), "unchanged".into()),
            ("gold.revenue_by_region".into(), "changed".into()),
            ("silver.orders".into(), "unchanged".into()),
        ],
        "{live}"
    );
    assert!(text.contains("-     sum(amount) AS revenue"), "{text}");
    assert!(text.contains("+     sum(amount) * 2 AS revenue"), "{text}");
    let changed = live["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["change"] == "changed")
        .unwrap();
    // Over unchanged silver, the changed gold model replays silver's committed rows.
    assert_eq!(
        changed["reads_tables"][0]["model"], "silver.orders",
        "{changed}"
    );
    assert!(
        changed["reads_tables"][0]["rows"].as_u64().unwrap() > 0,
        "{changed}"
    );
    assert!(
        text.contains("reads the table silver.orders publishes"),
        "{text}"
    );
    assert!(up.terminate().unwrap().success());
    // Without the server, the data directory's record says the same.
    let (stopped, _) = plan();
    assert_eq!(changes(&stopped), changes(&live));
}

/// A changed model, deployed with `kappa deploy`: its new version replays into a table of its
/// own while the old one keeps serving, then its public name switches; `kappa plan` shows
/// nothing left to deploy, the unchanged upstream model kept its table, and the answer equals
/// the same computation done another way. A restart on the edited folder (with a model that
/// does not even check) serves what is deployed until then.
#[test]
fn a_changed_model_replays_beside_the_old_one_then_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    init(&dir);
    let data = dir.join(".kappa");
    std::fs::create_dir_all(&data).unwrap();
    let project = dir.to_str().unwrap();
    let models = walk_sql(&dir.join("models"));
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    produce_example_orders(&data, &dir);
    crate::wait_caught_up(&data, project, models, std::time::Duration::from_secs(60));
    let query = |sql: &str| -> serde_json::Value {
        let out = kappa(&data, &["--project", project, "sql", sql, "--json"], None);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()["rows"].clone()
    };
    let revenue = "SELECT CAST(sum(revenue) AS VARCHAR) FROM gold.revenue_by_region";
    let before = query(revenue);
    let silver_tables = |data: &std::path::Path| -> Vec<String> {
        let db = catalog_tables(data);
        db.into_iter()
            .filter(|t| t.starts_with("kappa_versions.silver__orders__"))
            .collect()
    };
    let silver_before = silver_tables(&data);
    assert_eq!(silver_before.len(), 1, "{silver_before:?}");
    assert!(up.terminate().unwrap().success());

    // v2 doubles the revenue; the server restarts on the edited folder.
    let region = dir.join("models/gold/revenue_by_region.sql");
    let sql = std::fs::read_to_string(&region).unwrap();
    std::fs::write(
        &region,
        sql.replace("sum(amount) AS revenue", "2 * sum(amount) AS revenue"),
    )
    .unwrap();
    let typo = dir.join("models/gold/typo.sql");
    std::fs::write(&typo, "SELECT nothing_here FROM silver.orders").unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    crate::wait_caught_up(&data, project, models, std::time::Duration::from_secs(60));
    assert_eq!(query(revenue), before, "a restart deploys nothing");
    let out = kappa(&data, &["--project", project, "deploy"], None);
    assert!(
        !out.status.success(),
        "a folder with problems is not deployed"
    );
    assert!(stderr(&out).contains("nothing_here"), "{}", stderr(&out));
    std::fs::remove_file(&typo).unwrap();
    let out = kappa(&data, &["--project", project, "deploy"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    // Until the cutover readers get v1's answer, then v2's; never anything else.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let doubled = loop {
        let now = query(revenue);
        if now != before {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never cut over: {now}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // Computed another way: twice the sum over the clean orders.
    let oracle = query("SELECT CAST(2 * sum(amount) AS VARCHAR) FROM silver.orders");
    assert_eq!(doubled, oracle);
    // The deployment is recorded: nothing left to deploy.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = kappa(&data, &["--project", project, "plan", "--json"], None);
        let plan: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        if plan["summary"]["replaying"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not recorded: {plan}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The unchanged upstream model kept its version's table.
    assert_eq!(silver_tables(&data), silver_before);
    assert!(up.terminate().unwrap().success());
    let log = std::fs::read_to_string(data.with_extension("stderr")).unwrap();
    let replaying = log
        .find("new versions replay beside the live ones")
        .expect(&log);
    let cut = log.find("cut over: the new versions serve").expect(&log);
    assert!(replaying < cut, "{log}");
    assert!(log.contains("gold.revenue_by_region"), "{log}");
    // The cutover did not restart the unchanged model's runner: the live path never paused.
    let silver_starts = log[cut..]
        .lines()
        .filter(|l| l.contains("model starts") && l.contains("silver.orders"))
        .count();
    assert_eq!(silver_starts, 0, "{log}");
    // The audit of the deploy outlives a restart with nothing to deploy.
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let progress = runtime
        .block_on(kappa_server::client::Client::http(&up.base).deploy_progress())
        .unwrap();
    assert_eq!(progress.state, "idle");
    assert!(
        progress
            .audit
            .iter()
            .any(|a| a.model == "gold.revenue_by_region"),
        "{progress:?}"
    );
    assert!(up.terminate().unwrap().success());
    // External readers see the new version under the public name.
    let out = kappa_testkit::python::run_python(
        kappa_testkit::python::READ_TABLE_SCRIPT,
        &[data.to_str().unwrap(), "gold.revenue_by_region"],
    );
    let read: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(read["pyiceberg"], read["duckdb"], "{out}");
    let total: f64 = read["pyiceberg"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["revenue"].as_str().unwrap().parse::<f64>().unwrap())
        .sum();
    let expected: f64 = oracle[0][0].as_str().unwrap().parse().unwrap();
    assert!((total - expected).abs() < 1e-6, "{total} vs {expected}");
}

/// A change to the gold models only: their new versions read silver's committed table as a
/// stream instead of recomputing silver (whose table gets no commit from the deploy), then
/// follow silver live; further such deploys killed with kill -9 carry on after a restart; and
/// the tables end equal to a from-scratch run of the same folder over the same records.
#[test]
fn a_downstream_only_change_reads_its_upstreams_table() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    init(&dir);
    let data = dir.join(".kappa");
    std::fs::create_dir_all(&data).unwrap();
    let project = dir.to_str().unwrap();
    let models = walk_sql(&dir.join("models"));
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    produce_example_products(&data, &dir);
    produce_example_orders(&data, &dir);
    crate::wait_caught_up(&data, project, models, std::time::Duration::from_secs(60));
    let silver = version_states(&data, project)
        .into_iter()
        .find(|(model, _, _)| model == "silver.orders")
        .map(|(_, version, _)| format!("silver__orders__{version}"))
        .unwrap();
    let silver_before = metadata_location(&data, &silver);

    // Both gold models change; one of them looks products up as it goes.
    for (name, from, to) in [
        (
            "revenue_by_region",
            "sum(amount) AS revenue",
            "2 * sum(amount) AS revenue",
        ),
        (
            "revenue_by_category",
            "sum(o.amount) AS revenue",
            "2 * sum(o.amount) AS revenue",
        ),
    ] {
        let path = dir.join(format!("models/gold/{name}.sql"));
        let sql = std::fs::read_to_string(&path).unwrap();
        assert!(sql.contains(from), "{sql}");
        std::fs::write(&path, sql.replace(from, to)).unwrap();
    }
    let out = kappa(
        &data,
        &["--project", project, "deploy", "--wait", "--json"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let deployed: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(deployed["cut_over"], true, "{deployed}");
    assert_eq!(
        deployed["replaying"],
        serde_json::json!(["gold.revenue_by_category", "gold.revenue_by_region"])
    );
    // Silver was not recomputed: its table got no commit from the deploy.
    assert_eq!(metadata_location(&data, &silver), silver_before);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("deployment.json")).unwrap())
            .unwrap();
    for model in ["gold.revenue_by_region", "gold.revenue_by_category"] {
        assert_eq!(
            record["models"][model]["reads_tables"],
            serde_json::json!(["silver.orders"]),
            "{record}"
        );
    }
    let gold = [
        "SELECT region, CAST(day AS VARCHAR) AS d, orders, CAST(revenue AS VARCHAR) AS r FROM \
         gold.revenue_by_region ORDER BY region, d",
        "SELECT category, CAST(day AS VARCHAR) AS d, orders, CAST(revenue AS VARCHAR) AS r, \
         CAST(tax AS VARCHAR) AS t FROM gold.revenue_by_category ORDER BY category, d",
    ];
    let rows = |data: &std::path::Path| -> Vec<serde_json::Value> {
        gold.iter()
            .map(|sql| {
                let out = kappa(data, &["--project", project, "sql", sql, "--json"], None);
                assert!(out.status.success(), "{}", stderr(&out));
                serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()["rows"].clone()
            })
            .collect()
    };
    let deployed_rows = rows(&data);
    assert!(
        deployed_rows
            .iter()
            .all(|r| r.as_array().is_some_and(|rows| !rows.is_empty())),
        "{deployed_rows:?}"
    );

    // Live: new orders reach silver, then the new gold version, read from silver's table.
    let later = dir.join("later.ndjson");
    let lines: Vec<String> = (0..20)
        .map(|i| {
            format!(
                "{{\"order_id\":{},\"customer_id\":\"c{i}\",\"product_id\":\"p3\",\
                 \"region\":\"east\",\"quantity\":{},\"unit_price\":3.50,\
                 \"ts\":\"2026-01-07T10:{:02}:00Z\"}}",
                100 + i,
                1 + i % 3,
                i * 2
            )
        })
        .collect();
    std::fs::write(&later, lines.join("\n")).unwrap();
    let out = kappa(
        &data,
        &[
            "produce",
            "orders",
            later.to_str().unwrap(),
            "--key",
            "customer_id",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let both = "SELECT CAST((SELECT sum(revenue) FROM gold.revenue_by_region) AS VARCHAR), \
                CAST((SELECT 2 * sum(amount) FROM silver.orders) AS VARCHAR), \
                (SELECT count(*) FROM silver.orders)";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = kappa(&data, &["sql", both, "--json"], None);
        let answer: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        let row = &answer["rows"][0];
        // Silver holds the new orders that are final (the watermark passed them).
        if row[0] == row[1] && row[2].as_i64().unwrap() > 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gold did not follow silver: {answer}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // kill -9 at seeded moments of further downstream-only deploys (gold × k): after each
    // restart the deploy carries on to exactly k × silver.
    let mut up = up;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut phases = Vec::new();
    let mut k = 2;
    for seed in 0..3u64 {
        k = seed + 3;
        for (name, column) in [
            ("revenue_by_region", "amount"),
            ("revenue_by_category", "o.amount"),
        ] {
            let path = dir.join(format!("models/gold/{name}.sql"));
            let sql = std::fs::read_to_string(&path).unwrap();
            let from = format!("{} * sum({column}) AS revenue", k - 1);
            let from = if k == 3 {
                format!("2 * sum({column}) AS revenue")
            } else {
                from
            };
            assert!(sql.contains(&from), "{sql}");
            std::fs::write(
                &path,
                sql.replace(&from, &format!("{k} * sum({column}) AS revenue")),
            )
            .unwrap();
        }
        let out = kappa(&data, &["--project", project, "deploy"], None);
        assert!(out.status.success(), "{}", stderr(&out));
        std::thread::sleep(std::time::Duration::from_millis((seed * 257 + 50) % 500));
        let client = kappa_server::client::Client::http(&up.base);
        let phase = runtime.block_on(client.deploy_progress()).map(|p| p.state);
        phases.push(phase.unwrap_or_else(|e| format!("unknown: {e}")));
        up.kill9().unwrap();
        up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
        let times_k = both.replace(
            "SELECT 2 * sum(amount)",
            &format!("SELECT {k} * sum(amount)"),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let out = kappa(&data, &["sql", &times_k, "--json"], None);
            let answer: Option<serde_json::Value> = serde_json::from_str(&stdout(&out)).ok();
            let row = answer.as_ref().map(|a| a["rows"][0].clone());
            if row.is_some_and(|row| row[0] == row[1]) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "seed {seed}: never reached {k} × silver: {answer:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    eprintln!("killed while: {phases:?}");
    crate::wait_caught_up(&data, project, models, std::time::Duration::from_secs(60));
    let final_rows = rows(&data);
    assert_ne!(final_rows, deployed_rows, "gold is {k} × now");
    assert!(up.terminate().unwrap().success());
    let log = std::fs::read_to_string(data.with_extension("stderr")).unwrap();
    assert!(
        log.contains("reads its upstreams' published tables"),
        "{log}"
    );

    // A from-scratch run of the same folder and records gives the rows the deploys did.
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &scratch, &["--project", project]).unwrap();
    produce_example_products(&scratch, &dir);
    produce_example_orders(&scratch, &dir);
    let out = kappa(
        &scratch,
        &[
            "produce",
            "orders",
            later.to_str().unwrap(),
            "--key",
            "customer_id",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    crate::wait_caught_up(
        &scratch,
        project,
        models,
        std::time::Duration::from_secs(60),
    );
    assert_eq!(rows(&scratch), final_rows);
    assert!(up.terminate().unwrap().success());
}

/// The metadata file the SQL catalog in `data` points `kappa_versions.<table>` at: it moves
/// with every commit.
fn metadata_location(data: &std::path::Path, table: &str) -> String {
    kappa_testkit::python::run_python(
        "import sqlite3, sys\n\
         db = sqlite3.connect(sys.argv[1])\n\
         print(db.execute('SELECT metadata_location FROM iceberg_tables WHERE table_name = ?', \
         (sys.argv[2],)).fetchone()[0])",
        &[data.join("catalog.db").to_str().unwrap(), table],
    )
    .trim()
    .to_owned()
}

/// The tables of the SQL catalog in `data` (`namespace.name`), read by Python's sqlite3.
fn catalog_tables(data: &std::path::Path) -> Vec<String> {
    let out = kappa_testkit::python::run_python(
        "import sqlite3, sys\n\
         db = sqlite3.connect(sys.argv[1])\n\
         for ns, name in db.execute('SELECT table_namespace, table_name FROM iceberg_tables'):\n\
         \x20   print(f'{ns}.{name}')",
        &[data.join("catalog.db").to_str().unwrap()],
    );
    out.lines().map(str::to_owned).collect()
}

/// `kappa deploy --wait` on a running `kappa up`: a change to the silver model replays it and
/// both gold models that read it as new versions, then switches all three at once. Readers
/// querying the two gold tables together over HTTP all along (≥ 1,000 queries) get the old
/// answer or the new one, never a mix.
#[test]
fn kappa_deploy_switches_every_table_at_once_while_readers_query() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    init(&dir);
    let data = dir.join(".kappa");
    std::fs::create_dir_all(&data).unwrap();
    let project = dir.to_str().unwrap();
    let models = walk_sql(&dir.join("models"));
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    produce_example_products(&data, &dir);
    produce_example_orders(&data, &dir);
    crate::wait_caught_up(&data, project, models, std::time::Duration::from_secs(60));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime
        .block_on(kappa_server::client::connect(&data, None))
        .unwrap();
    let ask = |client: kappa_server::client::Client| async move {
        let rows = client.sql(BOTH_REVENUES).await.unwrap().rows;
        (rows[0][0].clone(), rows[0][1].clone())
    };
    let before = runtime.block_on(ask(client.clone()));
    assert_eq!(before.0, before.1, "one version's two tables agree");

    // v2 of silver.orders doubles every amount.
    let silver = dir.join("models/silver/orders.sql");
    let v1_sql = std::fs::read_to_string(&silver).unwrap();
    let v2_sql = v1_sql.replace(
        "quantity * unit_price AS amount",
        "2 * quantity * unit_price AS amount",
    );
    std::fs::write(&silver, &v2_sql).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (client, stop, asked) = (client.clone(), stop.clone(), asked.clone());
            runtime.spawn(async move {
                let mut answers = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    answers.push(ask(client.clone()).await);
                    asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                answers
            })
        })
        .collect();
    let out = kappa(
        &data,
        &["--project", project, "deploy", "--wait", "--json"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let deployed: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(deployed["cut_over"], true, "{deployed}");
    // The audit showed the doubling before the cutover, old and new side by side.
    let audit = deployed["audit"].as_array().unwrap();
    let silver_audit = audit
        .iter()
        .find(|a| a["model"] == "silver.orders")
        .unwrap_or_else(|| panic!("no audit of silver.orders: {deployed}"));
    let amount = silver_audit["measures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "sum(amount)")
        .unwrap_or_else(|| panic!("no sum(amount): {silver_audit}"));
    assert_eq!(amount["change"], 1.0, "{amount}");
    // Status shows every version: silver's new one live, its old one retired for a rollback.
    let silver_states: Vec<String> = version_states(&data, project)
        .into_iter()
        .filter(|(m, _, _)| m == "silver.orders")
        .map(|(_, _, state)| state)
        .collect();
    assert_eq!(silver_states, ["live", "retired"]);
    // A gold version retired only because silver changed names the rollback that brings it
    // back: silver's (gold's own files are the same, so `kappa rollback gold…` has nothing).
    let out = kappa(&data, &["--project", project, "status", "--json"], None);
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let gold_retired = status["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["model"] == "gold.revenue_by_region" && v["state"] == "retired")
        .unwrap_or_else(|| panic!("no retired gold version: {status}"));
    assert_eq!(
        gold_retired["detail"], "kept for `kappa rollback silver.orders`",
        "{gold_retired}"
    );
    let mut replayed: Vec<&str> = deployed["replaying"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    replayed.sort_unstable();
    assert_eq!(
        replayed,
        [
            "gold.revenue_by_category",
            "gold.revenue_by_region",
            "silver.orders"
        ]
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let after = runtime.block_on(ask(client.clone()));
    assert_ne!(after, before, "the new versions serve");
    // Readers go on until a thousand answers in all.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while asked.load(std::sync::atomic::Ordering::Relaxed) < 1000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the readers are too slow"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answers = Vec::new();
    for reader in readers {
        answers.extend(runtime.block_on(reader).unwrap());
    }
    let mixed: Vec<_> = answers
        .iter()
        .filter(|a| a.0 != a.1 || (**a != before && **a != after))
        .collect();
    assert!(mixed.is_empty(), "mixed answers: {mixed:?}");
    assert!(answers.contains(&before) && answers.contains(&after));
    assert!(answers.len() >= 1000, "only {} answers", answers.len());

    // Rolling silver back brings back v1 of it and of both gold models that read it: the
    // answer returns to the one before the deploy exactly.
    let out = kappa(
        &data,
        &[
            "--project",
            project,
            "rollback",
            "silver.orders",
            "--wait",
            "--json",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let rolled: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(rolled["cut_over"], true, "{rolled}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(runtime.block_on(ask(client.clone())), before);
    // The folder says what serves: the rollback wrote v1 back, so nothing is left to deploy.
    assert_eq!(std::fs::read_to_string(&silver).unwrap(), v1_sql);
    let out = kappa(&data, &["--project", project, "plan", "--json"], None);
    let plan: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(plan["summary"]["replaying"], 0, "{plan}");

    // An audit that allows 1 % of change stops the same deploy before the cutover: the
    // deploy fails with the measure that moved, and v1 keeps serving.
    // (The audit is not part of the model's version: v2 of it resumes.)
    std::fs::write(&silver, &v2_sql).unwrap();
    let config = dir.join("models/gold/revenue_by_region.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}\n[audit]\ncolumns = [\"revenue\"]\nmax_change = \"1%\"\n"),
    )
    .unwrap();
    let out = kappa(&data, &["--project", project, "deploy", "--wait"], None);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("gold.revenue_by_region: sum(revenue) changed by +100.00 %"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("audit of gold.revenue_by_region"));
    let failed = version_states(&data, project);
    assert!(
        failed
            .iter()
            .any(|(m, _, state)| m == "gold.revenue_by_region" && state == "failed"),
        "{failed:?}"
    );
    assert_eq!(runtime.block_on(ask(client.clone())), before);
    // A model the deployments do not have is refused by name.
    let out = kappa(
        &data,
        &["--project", project, "rollback", "gold.no_such_model"],
        None,
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("gold.no_such_model"),
        "{}",
        stderr(&out)
    );
    assert!(up.terminate().unwrap().success());
}

/// With `deploy.retention = "0s"`, the versions a cutover replaces are dropped right after it:
/// their tables leave the catalog and the warehouse, status lists no retired version, and a
/// rollback says there is nothing to go back to.
#[test]
fn retired_versions_are_dropped_once_their_retention_passed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    init(&dir);
    let settings = dir.join("kappa.toml");
    let text = std::fs::read_to_string(&settings).unwrap();
    std::fs::write(&settings, format!("{text}\n[deploy]\nretention = \"0s\"\n")).unwrap();
    let data = dir.join(".kappa");
    std::fs::create_dir_all(&data).unwrap();
    let project = dir.to_str().unwrap();
    let models = walk_sql(&dir.join("models"));
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    produce_example_orders(&data, &dir);
    crate::wait_caught_up(&data, project, models, std::time::Duration::from_secs(60));
    let versions = || version_states(&data, project);
    let old = versions()
        .into_iter()
        .find(|(model, _, state)| model == "silver.orders" && state == "live")
        .map(|(_, version, _)| version)
        .unwrap();
    let table = format!("kappa_versions.silver__orders__{old}");
    let count = format!("SELECT count(*) FROM {table}");
    let out = kappa(&data, &["sql", &count], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !files_of(&data, &old).is_empty(),
        "the old version has files"
    );

    let silver = dir.join("models/silver/orders.sql");
    let sql = std::fs::read_to_string(&silver).unwrap();
    std::fs::write(
        &silver,
        sql.replace(
            "quantity * unit_price AS amount",
            "2 * quantity * unit_price AS amount",
        ),
    )
    .unwrap();
    let out = kappa(&data, &["--project", project, "deploy", "--wait"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while versions().iter().any(|(_, _, state)| state == "retired") {
        assert!(std::time::Instant::now() < deadline, "{:?}", versions());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out = kappa(&data, &["sql", &count], None);
    assert!(
        !out.status.success(),
        "{table} is still there: {}",
        stdout(&out)
    );
    let left = files_of(&data, &old);
    assert!(
        left.is_empty(),
        "files of the dropped version remain: {left:?}"
    );
    let out = kappa(
        &data,
        &["--project", project, "rollback", "silver.orders"],
        None,
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no earlier deployment"),
        "{}",
        stderr(&out)
    );
    assert!(up.terminate().unwrap().success());
}

/// The warehouse's files and folders of silver.orders' `version`.
fn files_of(data: &std::path::Path, version: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut folders = vec![data.join("warehouse")];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path
                .to_string_lossy()
                .contains(&format!("silver__orders__{version}"))
            {
                found.push(path.clone());
            }
            if path.is_dir() {
                folders.push(path);
            }
        }
    }
    found
}

/// kill -9 at seeded moments of a deploy (its replay, audit or cutover, or just after) and of a
/// rollback: after a restart on the same folder the deploy or rollback carries on, the tables
/// end as a clean run leaves them, and no answer read along the way mixed versions.
#[test]
fn a_deploy_killed_at_any_moment_carries_on_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    init(&dir);
    let data = dir.join(".kappa");
    std::fs::create_dir_all(&data).unwrap();
    let project = dir.to_str().unwrap();
    let models = walk_sql(&dir.join("models"));
    let mut up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    produce_example_products(&data, &dir);
    produce_example_orders(&data, &dir);
    crate::wait_caught_up(&data, project, models, std::time::Duration::from_secs(60));

    let ask = || -> Option<(String, String)> {
        let out = kappa(&data, &["sql", BOTH_REVENUES, "--json"], None);
        if !out.status.success() {
            return None; // the server is down or starting
        }
        let answer: serde_json::Value = serde_json::from_str(&stdout(&out)).ok()?;
        let row = answer["rows"].get(0)?;
        let value = |i: usize| row.get(i).and_then(|v| v.as_str()).map(str::to_owned);
        Some((value(0)?, value(1)?))
    };
    let original = ask().unwrap();
    assert_eq!(original.0, original.1);
    let silver = dir.join("models/silver/orders.sql");
    let v1_sql = std::fs::read_to_string(&silver).unwrap();
    let v2_sql = v1_sql.replace(
        "quantity * unit_price AS amount",
        "2 * quantity * unit_price AS amount",
    );
    // A clean run: v2 (amounts doubled) deployed without a crash.
    std::fs::write(&silver, &v2_sql).unwrap();
    let out = kappa(&data, &["--project", project, "deploy", "--wait"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    // The oracle: a version that multiplies every amount by k answers k times the original.
    let number = |text: &str| -> f64 { text.parse().unwrap() };
    let times = |answer: &(String, String), k: f64| {
        answer.0 == answer.1 && (number(&answer.0) - k * number(&original.0)).abs() < 1e-6
    };
    assert!(times(&ask().unwrap(), 2.0), "the clean deploy doubles");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (mut seen, mut phases) = (Vec::new(), Vec::new());
    for seed in 0..8u64 {
        // Each deploy is a new version (amounts times k), killed `delay` ms after it started.
        let k = seed + 3;
        std::fs::write(
            &silver,
            v1_sql.replace(
                "quantity * unit_price AS amount",
                &format!("{k} * quantity * unit_price AS amount"),
            ),
        )
        .unwrap();
        let out = kappa(&data, &["--project", project, "deploy"], None);
        assert!(out.status.success(), "{}", stderr(&out));
        let delay = (seed * 7919 + 211) % 700;
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_millis(delay) {
            seen.extend(ask());
        }
        let client = kappa_server::client::Client::http(&up.base);
        let phase = runtime.block_on(client.deploy_progress()).map(|p| p.state);
        phases.push(phase.unwrap_or_else(|e| format!("unknown: {e}")));
        up.kill9().unwrap();
        up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let answer = ask();
            if answer.as_ref().is_some_and(|a| times(a, k as f64)) {
                break;
            }
            seen.extend(answer);
            assert!(
                std::time::Instant::now() < deadline,
                "seed {seed} (killed after {delay} ms): never reached {k} × {original:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    // Rollbacks killed the same way: the last two versions (×10, ×9) take turns. The
    // rollback wrote the folder first, so the restart carries it on.
    for seed in 0..3u64 {
        let k = if seed % 2 == 0 { 9 } else { 10 };
        let out = kappa(
            &data,
            &["--project", project, "rollback", "silver.orders"],
            None,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let delay = (seed * 4391 + 97) % 400;
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_millis(delay) {
            seen.extend(ask());
        }
        let client = kappa_server::client::Client::http(&up.base);
        let phase = runtime.block_on(client.deploy_progress()).map(|p| p.state);
        phases.push(format!(
            "rollback {}",
            phase.unwrap_or_else(|e| format!("unknown: {e}"))
        ));
        up.kill9().unwrap();
        up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let answer = ask();
            if answer.as_ref().is_some_and(|a| times(a, k as f64)) {
                break;
            }
            seen.extend(answer);
            assert!(
                std::time::Instant::now() < deadline,
                "rollback {seed} (killed after {delay} ms): never reached {k} × {original:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    let mixed: Vec<_> = seen.iter().filter(|a| a.0 != a.1).collect();
    assert!(mixed.is_empty(), "mixed answers: {mixed:?}");
    eprintln!("killed while: {phases:?}");
    assert!(
        phases.iter().any(|p| p == "replaying" || p == "auditing"),
        "no kill landed inside a deploy: {phases:?}"
    );
    assert!(up.terminate().unwrap().success());
}
