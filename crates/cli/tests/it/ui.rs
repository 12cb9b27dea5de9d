//! The web UI in headless Chromium, driven through ChromeDriver's W3C WebDriver protocol: the
//! DAG shows the demo's models, a query's result draws as a bar and a line chart, and a
//! deploy's replay progress bar advances. Screenshots land in `target/ui-screenshots/`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use kappa_testkit::process::KappaProcess;
use serde_json::{Value, json};

use crate::{KAPPA, kappa, stderr, stdout};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The flags the machine notes give for Chromium on a closed network, as root.
const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1200",
];

/// A ChromeDriver on loopback with one browser session; both end when it drops.
struct Browser {
    driver: std::process::Child,
    base: String,
    session: String,
    http: reqwest::Client,
    runtime: tokio::runtime::Runtime,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = std::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{CHROMEDRIVER} (Debian's chromium-driver): {e}"));
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            http: reqwest::Client::new(),
            runtime,
            _profile: profile,
        };
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
        args.push(format!(
            "--user-data-dir={}",
            browser._profile.path().display()
        ));
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let deadline = Instant::now() + Duration::from_secs(30);
        let created = loop {
            match browser.call(reqwest::Method::POST, "/session", Some(&capabilities)) {
                Ok(v) => break v,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("no browser session: {e}"),
            }
        };
        browser.session = created["sessionId"].as_str().unwrap().to_owned();
        browser
    }

    /// One WebDriver command; its `value`, or the error it answered.
    fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        self.runtime.block_on(async {
            let mut request = self.http.request(method, &url);
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await.map_err(|e| e.to_string())?;
            let ok = response.status().is_success();
            let answer: Value = response.json().await.map_err(|e| e.to_string())?;
            if ok {
                Ok(answer["value"].clone())
            } else {
                Err(answer.to_string())
            }
        })
    }

    fn session(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let body = (method != reqwest::Method::GET).then_some(&body);
        self.call(method, &path, body)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn open(&self, url: &str) {
        self.session(reqwest::Method::POST, "/url", json!({ "url": url }));
    }

    /// Runs `script` (a function body) in the page; what it returns.
    fn eval(&self, script: &str) -> Value {
        self.session(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
    }

    fn element(&self, css: &str) -> String {
        let found = self.session(
            reqwest::Method::POST,
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_owned()
    }

    fn click(&self, css: &str) {
        let id = self.element(css);
        self.session(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            json!({}),
        );
    }

    /// Replaces the text of an input or textarea, as typing does.
    fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.session(
            reqwest::Method::POST,
            &format!("/element/{id}/clear"),
            json!({}),
        );
        self.session(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            json!({ "text": text }),
        );
    }

    /// Waits until `script` returns something truthy; that.
    fn wait_for(&self, what: &str, script: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(script);
            let truthy = !(v.is_null()
                || v == json!(false)
                || v == json!(0)
                || v == json!("")
                || v == json!([]));
            if truthy {
                return v;
            }
            assert!(Instant::now() < deadline, "never {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self, name: &str) {
        let png = self.session(reqwest::Method::GET, "/screenshot", Value::Null);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        let dir = screenshots();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call(
                reqwest::Method::DELETE,
                &format!("/session/{}", self.session),
                None,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// `target/ui-screenshots`, kept after the test as its artifacts.
fn screenshots() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/ui-screenshots")
}

/// The demo's project folder, as `kappa demo` writes it.
fn demo_project(dir: &Path) {
    let files: &[(&str, &str)] = &[
        ("kappa.toml", include_str!("../../src/demo/kappa.toml")),
        (
            "topics/orders.toml",
            include_str!("../../src/demo/topics/orders.toml"),
        ),
        (
            "topics/products.toml",
            include_str!("../../src/demo/topics/products.toml"),
        ),
        (
            "models/silver/orders.sql",
            include_str!("../../src/demo/models/silver/orders.sql"),
        ),
        (
            "models/silver/orders.toml",
            include_str!("../../src/demo/models/silver/orders.toml"),
        ),
        (
            "models/gold/revenue_by_month.sql",
            include_str!("../../src/demo/models/gold/revenue_by_month.sql"),
        ),
        (
            "models/gold/revenue_by_month.toml",
            include_str!("../../src/demo/models/gold/revenue_by_month.toml"),
        ),
    ];
    for (path, text) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

/// Orders `from..to` over 2025, in the demo's shape.
fn orders(from: u64, to: u64) -> String {
    const YEAR_START_MS: u64 = 1_735_689_600_000;
    (from..to)
        .map(|i| {
            // 37 s apart: 800,000 orders fill 343 days.
            let ts = YEAR_START_MS + i * 37_000;
            format!(
                "{{\"order_id\":{i},\"customer_id\":\"c{}\",\"product_id\":\"p{}\",\"region\":\"EU\",\"quantity\":{},\"unit_price\":{}.{:02},\"ts\":{ts}}}\n",
                i % 500,
                i % 7,
                1 + i % 4,
                2 + i % 90,
                i % 100
            )
        })
        .collect()
}

/// The demo's models in the DAG, a query drawn as a chart, a replay's progress bar moving.
#[test]
fn the_web_ui_shows_the_pipeline_runs_queries_and_follows_a_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    demo_project(&dir);
    let data = dir.join(".kappa");
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let base = crate::server_file(&data)["http"]
        .as_str()
        .unwrap()
        .to_owned();

    let products: String = (0..7)
        .map(|p| {
            format!(
                "{{\"product_id\":\"p{p}\",\"category\":\"c{p}\",\"tax_rate\":0.{}}}\n",
                if p % 2 == 0 { "200" } else { "070" }
            )
        })
        .collect();
    let out = kappa(&data, &["produce", "products"], Some(products.as_bytes()));
    assert!(out.status.success(), "{}", stderr(&out));
    // Enough for a replay of several commits (262,144 records each), so that its progress moves
    // in steps the page sees.
    const ORDERS: u64 = 800_000;
    let out = kappa(
        &data,
        &["produce", "orders"],
        Some(orders(1, ORDERS + 1).as_bytes()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    crate::wait_caught_up(&data, project, 2, Duration::from_secs(300));

    let browser = Browser::start();
    browser.open(&format!("{base}/"));

    // The DAG: both topics, their bronze tables, silver and gold, each a node with its state.
    let nodes = browser.wait_for(
        "the DAG with the demo's models",
        "const ids = [...document.querySelectorAll('#dag .node')].map(n => n.dataset.model);
         const gold = document.querySelector('#dag .node[data-model=\"gold.revenue_by_month\"]');
         return gold && gold.textContent.includes('running') && ids.length >= 6 ? ids : null;",
        Duration::from_secs(30),
    );
    let mut nodes: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    nodes.sort();
    assert_eq!(
        nodes,
        [
            "bronze.orders",
            "bronze.products",
            "gold.revenue_by_month",
            "silver.orders",
            "topic:orders",
            "topic:products",
        ]
    );
    let edges = browser.eval(
        "return [...document.querySelectorAll('#dag path.edge')]
                  .map(e => e.dataset.from + ' -> ' + e.dataset.to).sort();",
    );
    for edge in [
        "topic:orders -> bronze.orders",
        "topic:orders -> silver.orders",
        "silver.orders -> gold.revenue_by_month",
        "topic:products -> gold.revenue_by_month",
    ] {
        assert!(
            edges.as_array().unwrap().contains(&json!(edge)),
            "{edge} missing from {edges}"
        );
    }
    // The node counts the rows SQL counts.
    let count = |sql: &str| -> u64 {
        let out = kappa(&data, &["sql", "--json", sql], None);
        assert!(out.status.success(), "{}", stderr(&out));
        let answer: Value = serde_json::from_str(&stdout(&out)).unwrap();
        answer["rows"][0][0].as_u64().unwrap()
    };
    let silver_rows = count("SELECT count(*) FROM silver.orders");
    assert!(silver_rows > ORDERS - 100, "{silver_rows}");
    let thousands = silver_rows
        .to_string()
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(",");
    let silver = browser.eval(
        "return document.querySelector('#dag .node[data-model=\"silver.orders\"]').textContent;",
    );
    assert!(
        silver
            .as_str()
            .unwrap()
            .contains(&format!("{thousands} rows")),
        "silver node: {silver}"
    );
    browser.screenshot("dag.png");

    // A query, drawn as bars (one per month), then as a line.
    let months = count("SELECT count(*) FROM gold.revenue_by_month");
    assert!(months >= 12, "{months} months");
    browser.type_into(
        "#query",
        "SELECT month, revenue FROM gold.revenue_by_month ORDER BY month",
    );
    browser.click("#chart-kind option[value=bar]");
    browser.click("#run");
    let bars = browser.wait_for(
        "a bar chart",
        "return document.querySelectorAll('#chart svg rect.bar').length;",
        Duration::from_secs(30),
    );
    assert_eq!(bars.as_u64(), Some(months));
    let rows = browser.eval("return document.querySelectorAll('#result-table tbody tr').length;");
    assert_eq!(rows.as_u64(), Some(months));
    browser.screenshot("bar-chart.png");
    browser.click("#chart-kind option[value=line]");
    browser.wait_for(
        "a line chart",
        "return document.querySelectorAll('#chart svg path.series').length === 1;",
        Duration::from_secs(10),
    );
    browser.screenshot("line-chart.png");
    // A query that fails says why, in the page.
    browser.type_into("#query", "SELECT nope FROM gold.revenue_by_month");
    browser.click("#run");
    let error = browser.wait_for(
        "the query's error",
        "const e = document.getElementById('query-error'); return e && e.textContent;",
        Duration::from_secs(30),
    );
    assert!(error.as_str().unwrap().contains("nope"), "{error}");

    // A deploy of the fixed gold model: its replay's progress bar advances while the page
    // watches, until the new version serves.
    std::fs::write(
        dir.join("models/gold/revenue_by_month.sql"),
        include_str!("../../src/demo/revenue_by_month.v2.sql"),
    )
    .unwrap();
    std::fs::write(
        dir.join("models/silver/orders.sql"),
        include_str!("../../src/demo/models/silver/orders.sql")
            .replace("WHERE rn = 1", "WHERE rn = 1 AND quantity > 0"),
    )
    .unwrap();
    let out = kappa(&data, &["--project", project, "deploy"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut seen: Vec<f64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let value = browser.eval(
            "const bar = document.querySelector('#deploy .progress[data-model=\"silver.orders\"]');
             return bar ? Number(bar.getAttribute('aria-valuenow')) : null;",
        );
        if let Some(v) = value.as_f64() {
            if seen.last() != Some(&v) {
                seen.push(v);
                if seen.len() == 2 {
                    browser.screenshot("replay.png");
                }
            }
        } else if !seen.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replay never ended: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        seen.len() >= 2 && seen.windows(2).all(|w| w[0] < w[1]) && seen[seen.len() - 1] > 0.0,
        "the progress bar did not advance: {seen:?}"
    );
    eprintln!("replay progress seen: {seen:?}");
    drop(browser);
    api_answers_in_json_and_arrow(&base);
    up.terminate().unwrap();
}

/// The API the page is built on: the graph, the deployments, and SQL as JSON and as an Arrow
/// IPC stream that arrow-rs reads back to the same values.
fn api_answers_in_json_and_arrow(base: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let get = |path: &str| -> Value {
        runtime.block_on(async {
            let response = http.get(format!("{base}{path}")).send().await.unwrap();
            assert!(response.status().is_success(), "{path}");
            response.json().await.unwrap()
        })
    };
    // The cutover after the replay.
    let deadline = Instant::now() + Duration::from_secs(120);
    while get("/v1/deploy")["state"] != "idle" {
        assert!(
            Instant::now() < deadline,
            "no cutover: {}",
            get("/v1/deploy")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let models = get("/v1/models");
    let gold = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == "gold.revenue_by_month")
        .unwrap_or_else(|| panic!("{models}"));
    assert_eq!(
        gold["inputs"],
        json!([{"kind": "topic", "name": "products"}, {"kind": "model", "name": "silver.orders"}])
    );
    assert!(gold["sql"].as_str().unwrap().contains("p.tax_rate)"));
    assert_eq!(models["topics"][0]["name"], "orders");
    assert_eq!(models["topics"][0]["records"], 800_000);
    let deployments = get("/v1/deployments");
    assert_eq!(deployments["deployments"][0]["role"], "serving");
    assert_eq!(
        deployments["deployments"][0]["models"]["gold.revenue_by_month"],
        gold["version"]
    );
    assert_eq!(deployments["deployments"][1]["role"], "previous");

    let sql =
        json!({"sql": "SELECT month, orders, revenue FROM gold.revenue_by_month ORDER BY month"});
    let (rows, stream) = runtime.block_on(async {
        let rows: Value = http
            .post(format!("{base}/v1/sql"))
            .json(&sql)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let response = http
            .post(format!("{base}/v1/sql"))
            .header("accept", "application/vnd.apache.arrow.stream")
            .json(&sql)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers()["content-type"],
            "application/vnd.apache.arrow.stream"
        );
        (rows, response.bytes().await.unwrap())
    });
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(stream), None).unwrap();
    let schema = reader.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["month", "orders", "revenue"]);
    let batches: Vec<_> = reader.map(Result::unwrap).collect();
    let total: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(total, rows["rows"].as_array().unwrap().len());
    let orders: Vec<i64> = batches
        .iter()
        .flat_map(|b| {
            let column =
                arrow::array::cast::as_primitive_array::<arrow::datatypes::Int64Type>(b.column(1));
            column.values().to_vec()
        })
        .collect();
    let json_orders: Vec<i64> = rows["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[1].as_i64().unwrap())
        .collect();
    assert_eq!(orders, json_orders);
}
