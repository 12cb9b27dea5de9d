//! Star schemas: slowly changing dimensions maintained incrementally, and facts that join the
//! version of a dimension valid at their event time — both held to a batch computation of the
//! same history in DuckDB.

use kappa_testkit::process::KappaProcess;

use crate::quality::write_project;
use crate::{KAPPA, kappa, stderr};

const PRODUCTS: &str = "partitions = 2\nkey = \"product_id\"\n\n[schema]\nproduct_id = \
                        \"string\"\nname = \"string\"\nprice_cents = \"bigint\"\nupdated_at = \
                        \"timestamp\"\n";
const ORDERS: &str = "partitions = 2\nkey = \"order_id\"\n\n[schema]\norder_id = \
                      \"bigint\"\nproduct_id = \"string\"\nquantity = \"int\"\nts = \
                      \"timestamp\"\n";
const HISTORY_SQL: &str = "SELECT product_id, upper(name) AS name, price_cents, updated_at FROM \
                           products\n";
const HISTORY_TOML: &str = "materialization = \"scd2\"\nkey = [\"product_id\"]\nupdated_at = \
                            \"updated_at\"\nsurrogate_key = \"product_key\"\n";
const LATEST_SQL: &str = "SELECT product_id, name, price_cents, updated_at FROM products\n";
const LATEST_TOML: &str = "materialization = \"scd1\"\nkey = [\"product_id\"]\nupdated_at = \
                           \"updated_at\"\n";
/// The fact: each order priced by the product's version valid when it was placed.
const SALES_SQL: &str = "SELECT o.order_id, o.ts, o.quantity, p.product_key, \
                         o.quantity * p.price_cents AS amount_cents\nFROM orders o\nJOIN \
                         gold.products p ON o.product_id = p.product_id\n  AND o.ts >= \
                         p.valid_from AND (p.valid_to IS NULL OR o.ts < p.valid_to)\n";

/// Reads `products` twice: as its stream, and through the dimension built from it (each
/// change with the surrogate key of the version it made).
const CHANGES_SQL: &str = "SELECT c.product_id, c.updated_at, p.product_key FROM products c \
                           JOIN gold.products p ON c.product_id = p.product_id AND \
                           c.updated_at = p.valid_from\n";

const PRODUCT_COUNT: u64 = 24;
const ROUNDS: u64 = 4;
const DAY_MS: i64 = 86_400_000;
const START_MS: i64 = 1_767_225_600_000; // 2026-01-01

/// A small deterministic generator (tests need no randomness crate).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

/// Round `round`'s product changes: each product changes 0–3 times during day `round`, the
/// versions produced out of time order, some corrected (same product and time, new values).
fn product_changes(round: u64, rng: &mut Lcg) -> Vec<serde_json::Value> {
    let mut changes = Vec::new();
    for p in 0..PRODUCT_COUNT {
        let versions = if round == 0 {
            1 + rng.next(3)
        } else {
            rng.next(4)
        };
        let mut times: Vec<i64> = (0..versions)
            .map(|_| START_MS + round as i64 * DAY_MS + rng.next(DAY_MS as u64 / 2) as i64)
            .collect();
        // Later versions first: the history is built out of order.
        times.sort_unstable_by(|a, b| b.cmp(a));
        for at in times {
            changes.push(serde_json::json!({
                "product_id": format!("p{p:02}"),
                "name": format!("product {p} v{}", rng.next(1000)),
                "price_cents": 100 + rng.next(10_000),
                "updated_at": at,
            }));
            if rng.next(5) == 0 {
                changes.push(serde_json::json!({
                    "product_id": format!("p{p:02}"),
                    "name": format!("product {p} corrected"),
                    "price_cents": 100 + rng.next(10_000),
                    "updated_at": at,
                }));
            }
        }
    }
    changes
}

/// Round `round`'s orders: placed in the second half of day `round`, after that day's changes
/// (a fact joins the versions its dimension holds when it is processed).
fn orders(round: u64, rng: &mut Lcg, next_id: &mut u64) -> Vec<serde_json::Value> {
    (0..150)
        .map(|_| {
            *next_id += 1;
            serde_json::json!({
                "order_id": *next_id,
                "product_id": format!("p{:02}", rng.next(PRODUCT_COUNT + 2)),
                "quantity": 1 + rng.next(5),
                "ts": START_MS + round as i64 * DAY_MS + DAY_MS / 2 + rng.next(DAY_MS as u64 / 2) as i64,
            })
        })
        .collect()
}

fn produce(data: &std::path::Path, topic: &str, key: &str, records: &[serde_json::Value]) {
    let lines: String = records.iter().map(|r| format!("{r}\n")).collect();
    let out = kappa(
        data,
        &["produce", topic, "--key", key],
        Some(lines.as_bytes()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Computes the dimensions and the fact as batch SQL in DuckDB over every record produced, reads
/// the tables kappa wrote (DuckDB's iceberg_scan of the metadata pyiceberg finds), and prints
/// both side by side.
const ORACLE: &str = r#"
import json, os, site, sys
import duckdb
from pyiceberg.catalog.sql import SqlCatalog
data, products, orders = sys.argv[1], sys.argv[2], sys.argv[3]
catalog = SqlCatalog("kappa", uri=f"sqlite:///{data}/catalog.db", warehouse=f"file://{data}/warehouse")
ext = [os.path.join(p, "duckdb_ext", "extensions") for p in site.getsitepackages() if os.path.isdir(os.path.join(p, "duckdb_ext"))][0]
con = duckdb.connect()
con.execute("SET enable_progress_bar = false")
con.execute(f"SET extension_directory='{ext}'")
con.execute("LOAD iceberg")
for name in ["products", "products_latest", "sales"]:
    location = catalog.load_table(f"gold.{name}").metadata_location.removeprefix("file://")
    con.execute(f"CREATE VIEW kappa_{name} AS SELECT * FROM iceberg_scan('{location}')")
# The records in the order each partition holds them (a product's records share one).
con.execute(f"CREATE TABLE p AS SELECT row_number() OVER () AS seq, product_id, name, price_cents, make_timestamp(updated_at * 1000) AS updated_at FROM read_json('{products}', format='newline_delimited', columns={{'product_id':'VARCHAR','name':'VARCHAR','price_cents':'BIGINT','updated_at':'BIGINT'}})")
con.execute(f"CREATE TABLE o AS SELECT order_id, product_id, quantity, make_timestamp(ts * 1000) AS ts FROM read_json('{orders}', format='newline_delimited', columns={{'order_id':'BIGINT','product_id':'VARCHAR','quantity':'INTEGER','ts':'BIGINT'}})")
con.execute("""CREATE TABLE versions AS
  SELECT product_id, updated_at, arg_max(upper(name), seq) AS name, arg_max(price_cents, seq) AS price_cents
  FROM p GROUP BY product_id, updated_at""")
con.execute("""CREATE TABLE history AS
  SELECT *, updated_at AS valid_from,
         lead(updated_at) OVER (PARTITION BY product_id ORDER BY updated_at) AS valid_to
  FROM versions""")
def rows(sql):
    return sorted([[str(v) for v in r] for r in con.execute(sql).fetchall()])
out = {
  "history": {
    "batch": rows("SELECT product_id, name, price_cents, epoch_ms(valid_from), coalesce(epoch_ms(valid_to), -1), valid_to IS NULL FROM history"),
    "kappa": rows("SELECT product_id, name, price_cents, epoch_ms(valid_from), coalesce(epoch_ms(valid_to), -1), is_current FROM kappa_products"),
  },
  "latest": {
    "batch": rows("SELECT product_id, arg_max(name, (updated_at, seq)), arg_max(price_cents, (updated_at, seq)), epoch_ms(max(updated_at)) FROM p GROUP BY product_id"),
    "kappa": rows("SELECT product_id, name, price_cents, epoch_ms(updated_at) FROM kappa_products_latest"),
  },
  "keys_unique": rows("SELECT count(*) = count(DISTINCT product_key) FROM kappa_products"),
  "sales": {
    "batch": rows("""SELECT o.order_id, h.product_id, epoch_ms(h.valid_from), o.quantity * h.price_cents
                     FROM o JOIN history h ON o.product_id = h.product_id
                      AND o.ts >= h.valid_from AND (h.valid_to IS NULL OR o.ts < h.valid_to)"""),
    "kappa": rows("""SELECT s.order_id, d.product_id, epoch_ms(d.valid_from), s.amount_cents
                     FROM kappa_sales s JOIN kappa_products d ON s.product_key = d.product_key"""),
  },
}
print(json.dumps(out))
"#;

/// SCD2 history and SCD1 latest rows equal a batch computation of the same records, built
/// round by round out of time order with corrections and a kill -9 between rounds; every
/// fact row carries the surrogate key of the version valid at its event time.
#[test]
fn dimensions_match_a_batch_computation_and_facts_join_as_of_event_time() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop");
    let data = write_project(
        &dir,
        &[
            ("kappa.toml", "[project]\nname = \"shop\"\n"),
            ("topics/products.toml", PRODUCTS),
            ("topics/orders.toml", ORDERS),
            ("models/gold/products.sql", HISTORY_SQL),
            ("models/gold/products.toml", HISTORY_TOML),
            ("models/gold/products_latest.sql", LATEST_SQL),
            ("models/gold/products_latest.toml", LATEST_TOML),
            ("models/gold/sales.sql", SALES_SQL),
            ("models/gold/changes.sql", CHANGES_SQL),
        ],
    );
    let project = dir.to_str().unwrap();
    let check = kappa(&data, &["--project", project, "check"], None);
    assert!(check.status.success(), "{}", stderr(&check));

    let mut rng = Lcg(7);
    let (mut all_products, mut all_orders, mut next_id) = (Vec::new(), Vec::new(), 0);
    let mut up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
    for round in 0..ROUNDS {
        let changes = product_changes(round, &mut rng);
        produce(&data, "products", "product_id", &changes);
        let placed = orders(round, &mut rng, &mut next_id);
        // The changes are in the log before the orders that follow them.
        produce(&data, "orders", "order_id", &placed);
        all_products.extend(changes);
        all_orders.extend(placed);
        crate::wait_caught_up(&data, project, 4, std::time::Duration::from_secs(60));
        if round == 1 {
            // The dimensions restart from their state files, the fact from its offsets.
            up.kill9().unwrap();
            up = KappaProcess::start(KAPPA.as_ref(), &data, &["--project", project]).unwrap();
        }
    }
    crate::wait_caught_up(&data, project, 4, std::time::Duration::from_secs(60));
    // Every change once, though the model also commits the dimension's offsets in that topic.
    let out = kappa(
        &data,
        &[
            "sql",
            "SELECT count(*), count(DISTINCT product_key) FROM gold.changes",
            "--json",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let counted: serde_json::Value = serde_json::from_str(&crate::stdout(&out)).unwrap();
    assert_eq!(
        counted["rows"][0][0],
        serde_json::json!(all_products.len()),
        "{counted}"
    );
    // A new version of the fact replays beside the live one (its dimension computed again from
    // the topic) and cuts over; the checks below read it.
    std::fs::write(
        dir.join("models/gold/sales.sql"),
        SALES_SQL.replace("FROM orders o", ", p.name AS product FROM orders o"),
    )
    .unwrap();
    let out = kappa(&data, &["--project", project, "deploy", "--wait"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    crate::wait_caught_up(&data, project, 4, std::time::Duration::from_secs(60));
    assert!(up.terminate().unwrap().success());

    // The order each partition holds a product's records in is the order they were produced.
    let lines = |records: &[serde_json::Value]| -> String {
        records.iter().map(|r| format!("{r}\n")).collect()
    };
    std::fs::write(tmp.path().join("products.ndjson"), lines(&all_products)).unwrap();
    std::fs::write(tmp.path().join("orders.ndjson"), lines(&all_orders)).unwrap();
    let out = kappa_testkit::python::run_python(
        ORACLE,
        &[
            data.to_str().unwrap(),
            tmp.path().join("products.ndjson").to_str().unwrap(),
            tmp.path().join("orders.ndjson").to_str().unwrap(),
        ],
    );
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for what in ["history", "latest", "sales"] {
        let batch = json[what]["batch"].as_array().unwrap();
        let ours = json[what]["kappa"].as_array().unwrap();
        assert!(!batch.is_empty(), "{what}: the batch computation is empty");
        if batch != ours {
            let first = batch.iter().zip(ours).position(|(b, k)| b != k);
            panic!(
                "{what}: kappa has {} rows, the batch {}; first difference: {:?} vs {:?}",
                ours.len(),
                batch.len(),
                first.map(|i| &ours[i]),
                first.map(|i| &batch[i])
            );
        }
    }
    // Versions were built out of order and corrected: history is longer than the products.
    let history = json["history"]["batch"].as_array().unwrap().len() as u64;
    assert!(history > 2 * PRODUCT_COUNT, "{history} versions");
    assert_eq!(json["keys_unique"], serde_json::json!([["True"]]));
    // Orders of unknown products (p24, p25) have no version to join.
    let sales = json["sales"]["batch"].as_array().unwrap().len();
    assert!(sales > 400 && sales < all_orders.len(), "{sales} sales");
}
