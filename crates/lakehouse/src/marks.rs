//! Event-time marks carried by data files: how far each source partition's event time had
//! come before and after the commit that wrote a file, so that a reader of the table as a
//! stream can judge lateness per source partition long after the commit's snapshot expired.
//!
//! ```text
//!  commit k of silver (reads topic `orders`, partitions 0..n)
//!    summary  kappa.file-marks = {"orders": {"ts": {"before": {p: µs}, "after": {p: µs}}}}
//!    every data file it writes: the same JSON in its Parquet footer (key-value metadata)
//!  a merge of files a..b writes before = min of theirs (per partition present in all),
//!                               after  = max of theirs (per partition present in any)
//! ```
//!
//! `before[p]` is the greatest event time partition `p` had delivered when the commit's reading
//! began; `after[p]` when it ended. A merged file's `before` is never above any of its inputs'
//! and its `after` never below, so what a reader concludes from a merged file is at most as
//! strict as from the files it replaced.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Commit property (and Parquet footer key) of the marks of the files a commit writes.
pub const FILE_MARKS_PROPERTY: &str = "kappa.file-marks";

/// One event-time column's greatest time per source partition, before and after a commit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marks {
    pub before: BTreeMap<u32, i64>,
    pub after: BTreeMap<u32, i64>,
}

/// The marks of one file: source stream → event-time column → marks.
pub type FileMarks = BTreeMap<String, BTreeMap<String, Marks>>;

/// The marks a file's footer (or a commit's summary) holds, if it holds readable ones.
pub fn parse(text: &str) -> Option<FileMarks> {
    serde_json::from_str(text).ok()
}

/// The marks of a file holding the rows of every file of `inputs` (`None`: a file without
/// marks — nothing is known of its rows' partitions).
pub fn merged(inputs: &[Option<FileMarks>]) -> Option<FileMarks> {
    let mut known = inputs.iter();
    let first = known.next()?.clone()?;
    let mut out = first;
    for next in known {
        let next = next.as_ref()?;
        out.retain(|stream, columns| {
            let Some(theirs) = next.get(stream) else {
                return false;
            };
            columns.retain(|column, marks| {
                let Some(other) = theirs.get(column) else {
                    return false;
                };
                marks.before.retain(|p, t| match other.before.get(p) {
                    Some(o) => {
                        *t = (*t).min(*o);
                        true
                    }
                    None => false,
                });
                for (p, o) in &other.after {
                    let t = marks.after.entry(*p).or_insert(*o);
                    *t = (*t).max(*o);
                }
                true
            });
            !columns.is_empty()
        });
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(before: &[(u32, i64)], after: &[(u32, i64)]) -> FileMarks {
        BTreeMap::from([(
            "orders".to_owned(),
            BTreeMap::from([(
                "ts".to_owned(),
                Marks {
                    before: before.iter().copied().collect(),
                    after: after.iter().copied().collect(),
                },
            )]),
        )])
    }

    #[test]
    fn a_merge_is_never_stricter_than_its_inputs() {
        let a = marks(&[(0, 10), (1, 5)], &[(0, 20), (1, 8)]);
        let b = marks(&[(0, 20), (1, 8)], &[(0, 30), (1, 9), (2, 1)]);
        // Partition 2 had nothing before b: before leaves it out (no watermark from it).
        let c = marks(&[(0, 30), (1, 9), (2, 1)], &[(0, 31), (1, 9), (2, 4)]);
        assert_eq!(
            merged(&[Some(a.clone()), Some(b), Some(c)]),
            Some(marks(&[(0, 10), (1, 5)], &[(0, 31), (1, 9), (2, 4)]))
        );
        // A file without marks makes the merge's unknown.
        assert_eq!(merged(&[Some(a.clone()), None]), None);
        assert_eq!(merged(&[Some(a.clone())]), Some(a.clone()));
        let text = serde_json::to_string(&a).unwrap();
        assert_eq!(parse(&text), Some(a));
        assert_eq!(parse("not json"), None);
    }
}
