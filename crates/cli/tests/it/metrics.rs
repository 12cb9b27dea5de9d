//! `GET /metrics`, read by a Prometheus text-format parser (prometheus_client's).

use kappa_testkit::process::KappaProcess;

use crate::quality::write_project;
use crate::{KAPPA, kappa, stderr};

/// Fetches the server's `/metrics`, parses it with prometheus_client and prints every sample
/// as `{"name{label=value,…}": value}`.
const SCRAPE: &str = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen(sys.argv[1] + "/metrics", timeout=10).read().decode()
out = {}
for family in text_string_to_metric_families(text):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;

/// Every family parses; ingest counts what was posted; a running model's lag returns to 0
/// while one that cannot run (its hash key is missing) lags by exactly what arrived, and grows
/// with the next records; commits and queries are counted.
#[test]
fn metrics_parse_and_lag_moves() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("crm");
    let data = write_project(
        &dir,
        &[
            (
                "kappa.toml",
                "[masking]\nsecret_env = \"CRM_KEY_UNSET_IN_TESTS\"\n",
            ),
            (
                "topics/signups.toml",
                "partitions = 2\n\n[schema]\ncustomer_id = \"string\"\nphone = \"string\"\n",
            ),
            (
                "models/silver/names.sql",
                "SELECT customer_id FROM signups\n",
            ),
            (
                "models/silver/names.toml",
                "[[expect]]\nname = \"not_c1\"\nrow = \"customer_id <> 'c1'\"\nseverity = \"warn\"\n",
            ),
            (
                "models/silver/phones.sql",
                "SELECT customer_id, hash(phone) AS phone FROM signups\n",
            ),
        ],
    );
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    let file: serde_json::Value = crate::server_file(&data);
    let base = file["http"].as_str().unwrap().to_owned();
    let produce = |from: usize, to: usize| {
        let lines: String = (from..to)
            .map(|i| format!("{{\"customer_id\":\"c{i}\",\"phone\":\"+44 {i:04}\"}}\n"))
            .collect();
        let out = kappa(&data, &["produce", "signups"], Some(lines.as_bytes()));
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let scrape = || -> serde_json::Value {
        let out = kappa_testkit::python::run_python(SCRAPE, &[&base]);
        serde_json::from_str(out.trim()).unwrap()
    };
    let wait_for = |what: &str, want: f64| -> serde_json::Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let samples = scrape();
            if samples[what].as_f64() == Some(want) {
                return samples;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what} never {want}: {samples}"
            );
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    };
    produce(0, 10);
    wait_for("kappa_model_lag_records{model=silver.names}", 0.0);
    let samples = wait_for("kappa_model_lag_records{model=bronze.signups}", 0.0);
    assert_eq!(samples["kappa_ingest_records_total{}"], 10.0, "{samples}");
    assert!(
        samples["kappa_ingest_bytes_total{}"].as_f64().unwrap() > 200.0,
        "{samples}"
    );
    assert_eq!(
        samples["kappa_log_records{topic=signups}"], 10.0,
        "{samples}"
    );
    assert_eq!(
        samples["kappa_model_lag_records{model=silver.phones}"], 10.0,
        "{samples}"
    );
    assert_eq!(
        samples["kappa_model_up{model=silver.phones,state=not running}"], 0.0,
        "{samples}"
    );
    assert_eq!(
        samples["kappa_model_up{model=silver.names,state=running}"], 1.0,
        "{samples}"
    );
    assert_eq!(
        samples["kappa_model_rows{model=silver.names}"], 10.0,
        "{samples}"
    );
    // Caught up: no lag in time either; the one that never committed has no age to give.
    assert_eq!(
        samples["kappa_model_lag_seconds{model=silver.names}"], 0.0,
        "{samples}"
    );
    assert!(
        samples
            .get("kappa_model_lag_seconds{model=silver.phones}")
            .is_none(),
        "{samples}"
    );
    // The warned rows are counted (c1 is one of the ten).
    assert_eq!(
        samples["kappa_expectation_failed_rows_total{expectation=not_c1,model=silver.names}"], 1.0,
        "{samples}"
    );
    // Committed input records, per version: every record once.
    let committed: Vec<(&String, &serde_json::Value)> = samples
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("kappa_model_records_total{model=silver.names,version="))
        .collect();
    assert_eq!(committed.len(), 1, "{samples}");
    assert_eq!(committed[0].1, 10.0, "{samples}");
    assert_eq!(
        samples["kappa_model_records_total{model=bronze.signups,version=raw}"], 10.0,
        "{samples}"
    );
    assert!(
        samples["kappa_model_records_per_second{model=silver.names}"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{samples}"
    );
    assert!(
        samples["kappa_commit_seconds_count{}"].as_f64().unwrap() >= 2.0,
        "{samples}"
    );
    assert!(
        samples["kappa_commit_seconds_bucket{le=+Inf}"]
            .as_f64()
            .unwrap()
            >= 2.0,
        "{samples}"
    );
    // Cumulative buckets, in order, ending at the count.
    let bounds = [
        "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "+Inf",
    ];
    let counts: Vec<f64> = bounds
        .iter()
        .map(|b| {
            samples[format!("kappa_commit_seconds_bucket{{le={b}}}").as_str()]
                .as_f64()
                .unwrap_or_else(|| panic!("bucket {b}: {samples}"))
        })
        .collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    assert_eq!(
        counts.last(),
        samples["kappa_commit_seconds_count{}"].as_f64().as_ref()
    );

    // The lag follows what arrives.
    produce(10, 15);
    wait_for("kappa_model_lag_records{model=silver.phones}", 15.0);
    wait_for("kappa_model_lag_records{model=silver.names}", 0.0);
    let out = kappa(&data, &["sql", "SELECT count(*) FROM silver.names"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let samples = scrape();
    assert_eq!(samples["kappa_queries_total{}"], 1.0, "{samples}");
    assert_eq!(samples["kappa_query_seconds_count{}"], 1.0, "{samples}");
    assert_eq!(samples["kappa_ingest_records_total{}"], 15.0, "{samples}");
    assert!(up.terminate().unwrap().success());
}

/// `--log-format json`: every line `kappa up` logs is a JSON object with its level, target and
/// fields (what log shippers expect); the default is text.
#[test]
fn logs_are_json_lines_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("logs");
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", "[project]\nname = \"logs\"\n"),
            (
                "topics/events.toml",
                "partitions = 1\n\n[schema]\nid = \"bigint\"\n",
            ),
            ("models/silver/events.sql", "SELECT id FROM events\n"),
        ],
    );
    let project = dir.to_str().unwrap();
    let up = KappaProcess::start(
        KAPPA.as_ref(),
        &data,
        &["--project", project, "--log-format", "json"],
    )
    .unwrap();
    // A malformed record: the runner logs it.
    let out = kappa(&data, &["produce", "events"], Some(b"{\"id\":\"x\"}\n"));
    assert!(out.status.success(), "{}", stderr(&out));
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(up.terminate().unwrap().success());
    let log = std::fs::read_to_string(data.with_extension("stderr")).unwrap();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "kappa up logged nothing");
    for line in lines {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(event["level"].is_string(), "{line}");
        assert!(event["target"].is_string(), "{line}");
        assert!(event["fields"].is_object(), "{line}");
    }
}
