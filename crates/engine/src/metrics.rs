//! Process-wide measurements for `GET /metrics`: latency histograms kept in atomics, so the
//! hot paths record without locking.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the histogram buckets, in seconds (Prometheus' `le`).
pub const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A latency histogram in Prometheus' shape: cumulative counts per bucket, a sum and a count.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BUCKETS.len()],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        // The count first: a scrape in between sees every bucket at most `+Inf` (the count).
        self.count.fetch_add(1, Ordering::Relaxed);
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The histogram as Prometheus text lines for `name` (with `# HELP` and `# TYPE`).
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

/// How long commits to the lakehouse take (every model's and bronze's, landed or not).
pub static COMMIT_SECONDS: Histogram = Histogram::new();

/// Input records each version of each model (and each `bronze.<topic>`, version `raw`)
/// committed since the process started, with what is needed for a recent rate. By version, so
/// that a replaying new version does not count as the live one's rate.
#[derive(Debug, Default)]
pub struct Throughput {
    models: std::sync::Mutex<std::collections::BTreeMap<(String, String), Committed>>,
}

/// How far back [`Throughput::rate`] looks.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Committed {
    total: u64,
    /// (when, total then) of the commits within the rate window, oldest first.
    recent: std::collections::VecDeque<(std::time::Instant, u64)>,
}

impl Throughput {
    pub const fn new() -> Throughput {
        Throughput {
            models: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    /// Version `version` of `model` committed `records` more input records.
    pub fn add(&self, model: &str, version: &str, records: u64) {
        let Ok(mut models) = self.models.lock() else {
            return;
        };
        let entry = models
            .entry((model.to_owned(), version.to_owned()))
            .or_default();
        let now = std::time::Instant::now();
        if entry.recent.is_empty() {
            // The rate starts from the total before this commit.
            entry.recent.push_back((now, entry.total));
        }
        entry.total += records;
        entry.recent.push_back((now, entry.total));
        while entry.recent.len() > 2
            && entry
                .recent
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
        {
            entry.recent.pop_front();
        }
    }

    /// Every (model, version)'s total, by name.
    pub fn totals(&self) -> Vec<(String, String, u64)> {
        self.models
            .lock()
            .map(|m| {
                m.iter()
                    .map(|((model, version), v)| (model.clone(), version.clone(), v.total))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Input records per second `model` committed over the last [`RATE_WINDOW`]: 0 when it
    /// committed nothing in that time, absent when it never committed in this process.
    pub fn rate(&self, model: &str, version: &str) -> Option<f64> {
        let models = self.models.lock().ok()?;
        let entry = models.get(&(model.to_owned(), version.to_owned()))?;
        let now = std::time::Instant::now();
        let (first_at, first_total) = entry
            .recent
            .iter()
            .find(|(at, _)| now.duration_since(*at) <= RATE_WINDOW)
            .copied()
            .or_else(|| entry.recent.back().copied())?;
        if now.duration_since(first_at) > RATE_WINDOW {
            return Some(0.0);
        }
        // Over the time since the window's first commit, at least a second, so that one
        // commit a moment ago does not read as a huge rate.
        let seconds = now.duration_since(first_at).as_secs_f64().max(1.0);
        Some((entry.total - first_total) as f64 / seconds)
    }
}

/// Input records committed per model (and per `bronze.<topic>`).
pub static THROUGHPUT: Throughput = Throughput::new();

/// Rows of landed commits that failed each row-level expectation, by (model, expectation).
#[derive(Debug, Default)]
pub struct ExpectationFailures {
    counts: std::sync::Mutex<std::collections::BTreeMap<(String, String), u64>>,
}

impl ExpectationFailures {
    pub const fn new() -> ExpectationFailures {
        ExpectationFailures {
            counts: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    /// A commit of `model` landed with these failing rows per expectation.
    pub fn add(&self, model: &str, failed: &std::collections::BTreeMap<String, u64>) {
        if failed.is_empty() {
            return;
        }
        if let Ok(mut counts) = self.counts.lock() {
            for (expectation, rows) in failed {
                *counts
                    .entry((model.to_owned(), expectation.clone()))
                    .or_default() += rows;
            }
        }
    }

    /// Every (model, expectation, rows), by model.
    pub fn totals(&self) -> Vec<(String, String, u64)> {
        self.counts
            .lock()
            .map(|c| {
                c.iter()
                    .map(|((m, e), n)| (m.clone(), e.clone(), *n))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Failing rows per model and expectation since the process started.
pub static EXPECTATION_FAILURES: ExpectationFailures = ExpectationFailures::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_counts_and_rates_what_was_committed() {
        let t = Throughput::new();
        assert_eq!(t.rate("silver.orders", "v1"), None);
        t.add("silver.orders", "v1", 500);
        t.add("silver.orders", "v1", 700);
        t.add("silver.orders", "v2", 10);
        assert_eq!(
            t.totals(),
            vec![
                ("silver.orders".to_owned(), "v1".to_owned(), 1200),
                ("silver.orders".to_owned(), "v2".to_owned(), 10)
            ]
        );
        // Within the first second the rate is over one second.
        let rate = t.rate("silver.orders", "v1").expect("committed");
        assert!((rate - 1200.0).abs() < 1.0, "{rate}");
        assert_eq!(t.rate("silver.orders", "v2"), Some(10.0));
    }
}
