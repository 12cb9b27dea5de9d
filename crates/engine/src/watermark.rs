//! Event time at the source: which records are late, and how far event time has advanced.
//!
//! ```text
//!  partition p: m_p = greatest event time it has delivered
//!  a record with ts < m_p − delay (m_p taken before it) is late ─► dead letters, reason `late`
//!  watermark W = min over all partitions (m_p) − delay        (none until every partition has data)
//! ```
//!
//! Lateness is decided per partition from that partition's records alone, in log order, so it
//! does not depend on how partitions interleave: live, replayed or restarted, the same records
//! are late. A record that is not late has ts ≥ m_p − delay ≥ W, so it can never belong to
//! anything the watermark has already closed (a window, a dedup decision).

use std::collections::BTreeMap;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, TimestampMicrosecondArray,
};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, TimeUnit, TimestampMicrosecondType};
use datafusion::error::Result;
use serde::Deserialize;

/// Snapshot property: the greatest event time seen per partition of each source topic,
/// `{topic: {partition: µs}}`.
pub const WATERMARKS_PROPERTY: &str = "kappa.watermarks";

/// A record set aside at the source: its row in the pushed batch and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Late {
    pub row: usize,
    pub reason: String,
}

/// The event-time progress of one model's source topic.
#[derive(Debug, Clone)]
pub struct Watermarks {
    column: String,
    index: usize,
    delay: i64,
    partitions: u32,
    seen: BTreeMap<u32, i64>,
}

impl Watermarks {
    /// Event time is the source column `column` (at `index`); the watermark trails it by
    /// `delay_ms`; the topic has `partitions` partitions.
    pub fn new(column: &str, index: usize, delay_ms: u64, partitions: u32) -> Watermarks {
        Watermarks {
            column: column.to_owned(),
            index,
            delay: i64::try_from(delay_ms)
                .unwrap_or(i64::MAX / 1000)
                .saturating_mul(1000),
            partitions: partitions.max(1),
            seen: BTreeMap::new(),
        }
    }

    /// The watermark (µs), once every partition has delivered a record.
    pub fn watermark(&self) -> Option<i64> {
        if self.seen.len() < self.partitions as usize {
            return None;
        }
        self.seen
            .values()
            .min()
            .map(|m| m.saturating_sub(self.delay))
    }

    /// Removes the late records of a batch (rows from `partitions`, in log order per
    /// partition) and advances each partition's event time. Returns the records kept, the
    /// partition of each, and the late ones.
    pub fn apply(
        &mut self,
        batch: &RecordBatch,
        partitions: &[u32],
    ) -> Result<(RecordBatch, Vec<u32>, Vec<Late>)> {
        let n = batch.num_rows();
        let times = micros(batch.column(self.index))?;
        let mut keep = Vec::with_capacity(n);
        let mut kept_partitions = Vec::with_capacity(n);
        let mut late = Vec::new();
        for (row, partition) in partitions.iter().enumerate().take(n) {
            if times.is_null(row) {
                late.push(Late {
                    row,
                    reason: format!("no event time: `{}` is null", self.column),
                });
                keep.push(false);
                continue;
            }
            let ts = times.value(row);
            let seen = self.seen.entry(*partition).or_insert(i64::MIN);
            let mark = seen.saturating_sub(self.delay);
            if *seen != i64::MIN && ts < mark {
                late.push(Late {
                    row,
                    reason: format!(
                        "late: event time {} is behind partition {partition}'s watermark {}",
                        micros_text(ts),
                        micros_text(mark)
                    ),
                });
                keep.push(false);
                continue;
            }
            *seen = (*seen).max(ts);
            keep.push(true);
            kept_partitions.push(*partition);
        }
        let kept = filter_record_batch(batch, &BooleanArray::from(keep))?;
        Ok((kept, kept_partitions, late))
    }

    /// The per-partition event times, for a snapshot property.
    pub fn save(&self) -> serde_json::Value {
        serde_json::to_value(&self.seen).unwrap_or_default()
    }

    /// Takes the per-partition event times a snapshot saved (none: start over).
    pub fn load(&mut self, saved: Option<&serde_json::Value>) -> std::result::Result<(), String> {
        self.seen = match saved {
            Some(value) => {
                BTreeMap::deserialize(value).map_err(|e| format!("{WATERMARKS_PROPERTY}: {e}"))?
            }
            None => BTreeMap::new(),
        };
        Ok(())
    }
}

/// An event-time column as µs since the epoch, whatever its unit or zone.
pub(crate) fn micros(column: &ArrayRef) -> Result<TimestampMicrosecondArray> {
    let times = cast(column, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
    Ok(times.as_primitive::<TimestampMicrosecondType>().clone())
}

/// `batch` without the rows whose event time (column `index`) is null or behind the
/// watermark `watermark`, and those rows with why: lateness judged against one watermark for
/// every row, where [`Watermarks::apply`] judges each partition by its own records.
pub(crate) fn set_behind_aside(
    batch: &RecordBatch,
    index: usize,
    watermark: Option<i64>,
) -> Result<(RecordBatch, Vec<Late>)> {
    let times = micros(batch.column(index))?;
    let column = batch.schema().field(index).name().clone();
    let mut late = Vec::new();
    let keep: BooleanArray = (0..times.len())
        .map(|row| {
            let reason = match (times.is_valid(row), watermark) {
                (false, _) => Some(format!("no event time: `{column}` is null")),
                (true, Some(w)) if times.value(row) < w => Some(format!(
                    "late: event time {} is behind the watermark {}",
                    micros_text(times.value(row)),
                    micros_text(w)
                )),
                _ => None,
            };
            let keep = reason.is_none();
            if let Some(reason) = reason {
                late.push(Late { row, reason });
            }
            Some(keep)
        })
        .collect();
    Ok((filter_record_batch(batch, &keep)?, late))
}

/// An instant in µs as RFC 3339 text.
pub fn micros_text(us: i64) -> String {
    arrow::temporal_conversions::timestamp_us_to_datetime(us).map_or_else(
        || format!("{us} µs"),
        |t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::TimestampMicrosecondArray;
    use arrow::datatypes::{Field, Schema};

    use super::*;

    #[test]
    fn lateness_is_per_partition_and_the_watermark_waits_for_every_partition() {
        let batch = |ts: Vec<i64>| {
            RecordBatch::try_new(
                Arc::new(Schema::new(vec![Field::new(
                    "ts",
                    DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
                    true,
                )])),
                vec![Arc::new(
                    TimestampMicrosecondArray::from(ts).with_timezone("+00:00"),
                )],
            )
            .unwrap()
        };
        let s = 1_000_000;
        let mut marks = Watermarks::new("ts", 0, 10_000, 2);
        // Partition 0 reaches 100 s; partition 1 has nothing yet: no watermark.
        let (kept, _, late) = marks
            .apply(&batch(vec![100 * s, 95 * s, 89 * s]), &[0, 0, 0])
            .unwrap();
        assert_eq!(kept.num_rows(), 2);
        assert_eq!(late.len(), 1);
        assert!(late[0].reason.starts_with("late: "), "{}", late[0].reason);
        assert_eq!(marks.watermark(), None);
        // Partition 1 is judged on its own events: 20 s is not late there.
        let (kept, partitions, late) = marks.apply(&batch(vec![20 * s]), &[1]).unwrap();
        assert_eq!((kept.num_rows(), partitions, late.len()), (1, vec![1], 0));
        assert_eq!(marks.watermark(), Some(10 * s));
        // Saved and loaded, the state goes on the same.
        let mut again = Watermarks::new("ts", 0, 10_000, 2);
        again.load(Some(&marks.save())).unwrap();
        assert_eq!(again.watermark(), Some(10 * s));
    }
}
