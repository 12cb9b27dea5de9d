//! What a model's commit records beside its rows, read in one place: the positions its rows
//! cover (`kappa.offsets`) and the dead-letter position it reached. A field that is there but
//! does not read is an error that stops the model with the reason in its status — never a
//! silent start from offset 0, which would write every row a second time.

use std::collections::HashMap;

use crate::runner::{DEAD_LETTERS_PROPERTY, OFFSETS_PROPERTY, Offsets};

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
    offsets
        .keys()
        .any(|k| !k.starts_with(crate::dimension::DIMENSION_KEY_PREFIX))
        && !offsets
            .keys()
            .any(|k| k.starts_with(crate::upstream::TABLE_KEY_PREFIX))
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
