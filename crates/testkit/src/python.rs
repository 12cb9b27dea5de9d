//! Independent readers and clients for the tests: pyiceberg, DuckDB and psycopg, in a virtualenv the tests create
//! themselves (under `target/`, once, then reused), so `cargo test` works on a fresh machine.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Exactly what the venv holds; changing it rebuilds the venv.
pub const REQUIREMENTS: &[&str] = &[
    "pyiceberg[sql-sqlite,pyarrow]==0.12.0",
    "duckdb==1.4.4",
    "duckdb-ext-iceberg==1.4.4.20260205",
    "duckdb-ext-avro==1.4.4.20260205",
    // An S3-compatible server on loopback for the object-store warehouse.
    "moto[server]==5.2.5",
    // A Postgres driver for the wire endpoint (extended query protocol, typed values).
    "psycopg[binary]==3.3.9",
    // A Prometheus text-format parser for `GET /metrics`.
    "prometheus-client==0.26.0",
];

/// The workspace's `target/` directory, found from the running test binary.
pub(crate) fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("a test binary has a path");
    // target/<profile>/deps/<test binary>
    exe.ancestors()
        .nth(3)
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
}

/// A Python interpreter with [`REQUIREMENTS`] installed, creating the venv when needed.
/// Panics with the reason when it cannot (a test that needs a reader fails loudly).
pub fn python() -> PathBuf {
    let venv = target_dir().join("kappa-test-venv");
    let python = venv.join("bin/python");
    let marker = venv.join("kappa-requirements.txt");
    let wanted = REQUIREMENTS.join("\n");
    let _lock = exclusive(&target_dir().join("kappa-test-venv.lock"));
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
        let _ = std::fs::remove_dir_all(&venv);
        let system = std::env::var("KAPPA_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
        run(
            Command::new(&system).args(["-m", "venv"]).arg(&venv),
            "create the test venv",
        );
        run(
            Command::new(&python)
                .args(["-m", "pip", "install", "--quiet"])
                .args(REQUIREMENTS),
            "install the test venv's packages",
        );
        std::fs::write(&marker, &wanted).expect("write the venv marker");
    }
    python
}

fn run(command: &mut Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a Python script with the test venv and returns its stdout; panics with its stderr if
/// it fails.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A script reading one table of a kappa data directory with pyiceberg (through its SQL catalog)
/// and with DuckDB (through the table's latest metadata file); prints one JSON object:
/// `{"pyiceberg": [rows], "duckdb": [rows], "summary": {…}}`, rows sorted.
pub const READ_TABLE_SCRIPT: &str = r#"
import glob, json, os, site, sys
import duckdb
from pyiceberg.catalog.sql import SqlCatalog
data, ident = sys.argv[1], sys.argv[2]
catalog = SqlCatalog("kappa", uri=f"sqlite:///{data}/catalog.db", warehouse=f"file://{data}/warehouse")
table = catalog.load_table(ident)
def rows(arrow):
    out = [{k: (str(v) if v is not None else None) for k, v in r.items()} for r in arrow.to_pylist()]
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True))
py = rows(table.scan().to_arrow())
ext = [os.path.join(p, "duckdb_ext", "extensions") for p in site.getsitepackages() if os.path.isdir(os.path.join(p, "duckdb_ext"))][0]
con = duckdb.connect()
# A query over 2 s draws a progress bar on stdout, before the JSON.
con.execute("SET enable_progress_bar = false")
con.execute(f"SET extension_directory='{ext}'")
con.execute("LOAD iceberg")
metadata = table.metadata_location.removeprefix("file://")
dd = rows(con.execute(f"SELECT * FROM iceberg_scan('{metadata}')").fetch_arrow_table())
summary = dict(table.current_snapshot().summary.additional_properties) if table.current_snapshot() else {}
print(json.dumps({"pyiceberg": py, "duckdb": dd, "summary": summary}))
"#;

/// An S3-compatible server (moto) on 127.0.0.1 for as long as it lives, with one bucket.
#[derive(Debug)]
pub struct S3Server {
    child: std::process::Child,
    pub endpoint: String,
    pub bucket: String,
}

impl S3Server {
    /// Starts moto on a free loopback port and creates `bucket` in it.
    pub fn start(bucket: &str) -> S3Server {
        let port = free_port();
        let child = Command::new(python())
            .args(["-c", "from moto.server import main; main()"])
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start moto");
        let endpoint = format!("http://127.0.0.1:{port}");
        let server = S3Server {
            child,
            endpoint,
            bucket: bucket.to_owned(),
        };
        wait_listening(port, "moto");
        run_python(
            "import sys, boto3\n\
             boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
                 aws_access_key_id='kappa', aws_secret_access_key='kappa')\\\n\
                 .create_bucket(Bucket=sys.argv[2])",
            &[&server.endpoint, bucket],
        );
        server
    }

    /// The catalog and file IO properties that reach it (iceberg-rust's and pyiceberg's names).
    pub fn properties(&self) -> Vec<(String, String)> {
        [
            ("s3.endpoint", self.endpoint.as_str()),
            ("s3.region", "us-east-1"),
            ("s3.path-style-access", "true"),
            ("s3.access-key-id", "kappa"),
            ("s3.secret-access-key", "kappa"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An Iceberg REST catalog on 127.0.0.1 for as long as it lives: the REST protocol in front of
/// pyiceberg's SQL catalog (`rest_catalog.py`), so requests are checked and applied by an
/// implementation independent of iceberg-rust. Its database is in `dir`; tables go under
/// `warehouse` (`file://…` or `s3://…`, reached with `properties`).
#[derive(Debug)]
pub struct RestCatalogServer {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`, the catalog's `uri`.
    pub uri: String,
}

impl RestCatalogServer {
    pub fn start(
        dir: &Path,
        warehouse: &str,
        properties: &[(String, String)],
    ) -> RestCatalogServer {
        Self::start_with(dir, warehouse, properties, false)
    }

    /// [`RestCatalogServer::start`] with injected commit faults: of every three table commits
    /// the first is applied but answered with a 500, the second answered with a 503 and not
    /// applied; `dir/faults.log` lists them.
    pub fn start_faulty(
        dir: &Path,
        warehouse: &str,
        properties: &[(String, String)],
    ) -> RestCatalogServer {
        Self::start_with(dir, warehouse, properties, true)
    }

    fn start_with(
        dir: &Path,
        warehouse: &str,
        properties: &[(String, String)],
        faults: bool,
    ) -> RestCatalogServer {
        let port = free_port();
        let child = Command::new(python())
            .env("KAPPA_TEST_CATALOG_FAULTS", if faults { "1" } else { "0" })
            .args(["-c", include_str!("rest_catalog.py")])
            .arg(port.to_string())
            .arg(dir)
            .arg(warehouse)
            .args(properties.iter().map(|(k, v)| format!("{k}={v}")))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the REST catalog");
        let server = RestCatalogServer {
            child,
            uri: format!("http://127.0.0.1:{port}"),
        };
        wait_listening(port, "the REST catalog");
        server
    }
}

impl Drop for RestCatalogServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free now, for a server child to listen on.
/// Holds `path` locked (created if missing) until the file is dropped: one test at a time
/// installs what the tests share, in one test process or several.
pub(crate) fn exclusive(path: &Path) -> std::fs::File {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open the lock {}: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("lock {}: {e}", path.display()));
    file
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Waits (up to a minute) until `what` accepts connections on the loopback `port`.
pub(crate) fn wait_listening(port: u16, what: &str) {
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{what} did not listen on port {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
