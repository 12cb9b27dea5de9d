//! What a model's commit records beside its rows, read in one place: the positions its rows
//! cover (`kappa.offsets`) and the dead-letter position it reached. A field that is there but
//! does not read is an error that stops the model with the reason in its status — never a
//! silent start from offset 0, which would write every row a second time.

use std::collections::{BTreeMap, HashMap};

use kappa_pipeline::Project;

/// Snapshot property: the next offset of every input partition the table covers.
pub const OFFSETS_PROPERTY: &str = "kappa.offsets";

/// Snapshot property: the model version that wrote the snapshot.
pub const VERSION_PROPERTY: &str = "kappa.version";

/// Snapshot property: the dead-letter topic's end when the snapshot was written.
pub const DEAD_LETTERS_PROPERTY: &str = "kappa.dead_letters_offset";

/// Snapshot property: a fresh id per commit attempt, to recognise our own commit after an
/// error whose outcome is unknown.
pub const ATTEMPT_PROPERTY: &str = "kappa.attempt";

/// The row-level expectations' failing rows per expectation, in the commit that wrote them.
pub const EXPECTATIONS_PROPERTY: &str = "kappa.expectations";

/// The rows a commit's `drop` expectations set aside: a state file, delivered to the model's
/// quarantine table right after the commit lands (and again on start until it is).
pub const QUARANTINE_PROPERTY: &str = "kappa.quarantine";

/// In a quarantine table's commit: the state file it delivered.
pub const QUARANTINE_FROM_PROPERTY: &str = "kappa.quarantine-from";

/// The offsets a table covers: topic → partition → next offset.
pub type Offsets = BTreeMap<String, BTreeMap<u32, u64>>;

/// The topics `model_id`'s commits record offsets of, each with its key in `kappa.offsets`: a
/// topic it reads (as a stream or a table topic) under its name — for a model reading an
/// upstream's table, only those it names itself — and a dimension model's topic under
/// `dimension:<model>` ([`DIMENSION_KEY_PREFIX`]).
pub fn offset_keys(project: &Project, model_id: &str) -> Vec<(String, String)> {
    let (topics, dimensions): (Vec<String>, Vec<String>) = match (
        project.reads_tables.get(model_id),
        project.models.get(model_id),
    ) {
        // Its upstream reads the topics and looks up the dimensions under it: the model reads
        // only what it names itself (the other side of a join, its own lookups; a refreshed
        // model's dimension is its upstream).
        (Some(upstreams), Some(model)) => {
            let (mut topics, mut dimensions) = (Vec::new(), Vec::new());
            for input in &model.inputs {
                match input {
                    kappa_pipeline::Input::Topic(t) => topics.push(t.clone()),
                    kappa_pipeline::Input::Model(m)
                        if project.looks_up(model_id, m) && !upstreams.contains(m) =>
                    {
                        dimensions.push(m.clone());
                    }
                    kappa_pipeline::Input::Model(_) => {}
                }
            }
            (topics, dimensions)
        }
        _ => (
            project.stream_topics(model_id).into_iter().collect(),
            project.dimension_models(model_id).into_iter().collect(),
        ),
    };
    let mut keys: Vec<(String, String)> = topics.into_iter().map(|t| (t.clone(), t)).collect();
    for dimension in dimensions {
        // The one stream its commits cover (the table topics it looks up are its own).
        let streams = project
            .stream_topics(&dimension)
            .into_iter()
            .filter(|t| !project.is_table_topic(t));
        for topic in streams {
            keys.push((topic, format!("{}{dimension}", DIMENSION_KEY_PREFIX)));
        }
    }
    keys
}

/// The `kappa.offsets` key prefix of a dimension model's offsets.
pub const DIMENSION_KEY_PREFIX: &str = "dimension:";
/// How a position on a table is named in `kappa.offsets`: `table:<namespace>.<name>`.
pub const TABLE_KEY_PREFIX: &str = "table:";

/// The JSON value a snapshot summary (`properties`) holds under `key`, or the default when
/// there is no snapshot or no such key; a value that does not parse is an error naming `key`.
pub(crate) fn summary_json<T: serde::de::DeserializeOwned + Default>(
    properties: Option<&HashMap<String, String>>,
    key: &str,
) -> Result<T, kappa_lakehouse::LakehouseError> {
    properties
        .and_then(|p| p.get(key))
        .map(|v| serde_json::from_str(v))
        .transpose()
        .map_err(|e| kappa_lakehouse::LakehouseError::Query(format!("{key}: {e}")))
        .map(Option::unwrap_or_default)
}

/// The positions a commit records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CommitRecord {
    /// Source key (a topic, `table:<upstream>`, `dimension:<model>`) → partition → next.
    pub offsets: Offsets,
    /// The dead-letter topic's end when the commit was made.
    pub dead_letters_offset: u64,
}

/// Whether `offsets` (a commit's) hold positions in topics and none in an upstream's table
/// (dimensions aside): the version was written from its topics, and keeps reading them.
pub fn from_topics(offsets: &Offsets) -> bool {
    offsets.keys().any(|k| !k.starts_with(DIMENSION_KEY_PREFIX))
        && !offsets.keys().any(|k| k.starts_with(TABLE_KEY_PREFIX))
}

/// A commit field that does not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "its last commit's `{field}` does not read ({reason}); it stops rather than start again \
     from offset 0 and write its rows twice"
)]
pub struct CorruptRecord {
    pub field: &'static str,
    pub reason: String,
}

impl CommitRecord {
    /// The record of the commit whose summary is `properties` (none: the table's start).
    pub(crate) fn of(
        properties: Option<&HashMap<String, String>>,
    ) -> Result<CommitRecord, CorruptRecord> {
        let field = |name: &str| properties.and_then(|p| p.get(name));
        let offsets = match field(OFFSETS_PROPERTY) {
            Some(text) => serde_json::from_str(text).map_err(|e| CorruptRecord {
                field: OFFSETS_PROPERTY,
                reason: e.to_string(),
            })?,
            None => Offsets::new(),
        };
        let dead_letters_offset = match field(DEAD_LETTERS_PROPERTY) {
            Some(text) => text
                .parse()
                .map_err(|e: std::num::ParseIntError| CorruptRecord {
                    field: DEAD_LETTERS_PROPERTY,
                    reason: format!("{text:?}: {e}"),
                })?,
            None => 0,
        };
        Ok(CommitRecord {
            offsets,
            dead_letters_offset,
        })
    }

    /// The record of `table`'s newest commit (the audit branch's head while one waits).
    pub(crate) fn of_table(table: &kappa_lakehouse::Table) -> Result<CommitRecord, CorruptRecord> {
        let properties =
            kappa_lakehouse::wap::head(table).map(|s| s.summary().additional_properties.clone());
        CommitRecord::of(properties.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model reading a table counts only what it reads itself: the other side of its join
    /// and its own lookups — never its upstream's topics or dimensions, which it never
    /// commits (its lag would never drain, and a deploy of it never cut over).
    #[test]
    fn a_table_reader_records_only_its_own_inputs() {
        let mut files = kappa_pipeline::ProjectFiles::new();
        for (path, text) in [
            ("kappa.toml", ""),
            (
                "topics/customers.toml",
                "key = \"id\"\n[schema]\nid = \"bigint\"\n",
            ),
            (
                "topics/orders.toml",
                "[schema]\nid = \"bigint\"\ncustomer = \"bigint\"\n",
            ),
            ("topics/payments.toml", "[schema]\norder_id = \"bigint\"\n"),
            ("models/silver/customers.sql", "SELECT id FROM customers"),
            (
                "models/silver/customers.toml",
                "materialization = \"scd1\"\nkey = [\"id\"]\n",
            ),
            (
                "models/silver/orders.sql",
                "SELECT o.id, c.id AS customer FROM orders o JOIN silver.customers c ON \
                 o.customer = c.id",
            ),
            (
                "models/gold/paid.sql",
                "SELECT o.id FROM silver.orders o JOIN payments p ON p.order_id = o.id",
            ),
            (
                "models/gold/per_customer.sql",
                "SELECT id FROM silver.customers",
            ),
        ] {
            files.insert(path.into(), text.into());
        }
        let mut project = kappa_pipeline::load(&files).expect("the project loads");
        let keys = |project: &Project, id: &str| {
            let mut keys: Vec<String> = offset_keys(project, id)
                .into_iter()
                .map(|(_, k)| k)
                .collect();
            keys.sort();
            keys
        };
        // Recomputing silver: every topic under it, and the dimension under its own key.
        assert_eq!(
            keys(&project, "gold.paid"),
            ["dimension:silver.customers", "orders", "payments"]
        );
        project
            .reads_tables
            .insert("gold.paid".into(), vec!["silver.orders".into()]);
        project
            .reads_tables
            .insert("gold.per_customer".into(), vec!["silver.customers".into()]);
        assert_eq!(keys(&project, "gold.paid"), ["payments"]);
        assert!(keys(&project, "gold.per_customer").is_empty());
    }

    #[test]
    fn a_record_reads_or_says_which_field_does_not() {
        let props = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(CommitRecord::of(None), Ok(CommitRecord::default()));
        let good = props(&[
            (OFFSETS_PROPERTY, r#"{"orders":{"0":12,"1":7}}"#),
            (DEAD_LETTERS_PROPERTY, "3"),
        ]);
        let record = CommitRecord::of(Some(&good)).expect("a good record");
        assert_eq!(record.offsets["orders"][&1], 7);
        assert_eq!(record.dead_letters_offset, 3);
        let broken = props(&[(OFFSETS_PROPERTY, r#"{"orders":{"0":"#)]);
        let error = CommitRecord::of(Some(&broken)).expect_err("a broken record");
        assert_eq!(error.field, OFFSETS_PROPERTY);
        assert!(
            error
                .to_string()
                .contains("rather than start again from offset 0")
        );
        let broken = props(&[(DEAD_LETTERS_PROPERTY, "-1")]);
        assert_eq!(
            CommitRecord::of(Some(&broken))
                .expect_err("a broken record")
                .field,
            DEAD_LETTERS_PROPERTY
        );
    }
}
