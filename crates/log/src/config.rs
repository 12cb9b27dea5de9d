//! Topic configuration and topic names.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limits::{
    INDEX_INTERVAL_BYTES_DEFAULT, PARTITIONS_MAX, SEGMENT_BYTES_LIMIT, SEGMENT_BYTES_MAX_DEFAULT,
    SEGMENT_BYTES_MIN, SEGMENT_MS_MAX_DEFAULT, TOPIC_NAME_BYTES_MAX,
};
use crate::{LogError, Result};

/// When appended data is fsynced, and so what a crash can lose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every append is fsynced before it is acknowledged (concurrent appends share one fsync).
    /// A crash of the process, the OS or the machine loses nothing acknowledged.
    #[default]
    Always,
    /// Appends are acknowledged once written to the OS and fsynced every `interval_ms`.
    /// A process crash loses nothing acknowledged; an OS crash or power loss can lose the
    /// acknowledged appends of the last `interval_ms` (plus the fsync's own duration).
    Interval { interval_ms: u64 },
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Interval { interval_ms } => {
                write!(
                    f,
                    "{}",
                    humantime::format_duration(Duration::from_millis(*interval_ms))
                )
            }
        }
    }
}

impl FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "always" {
            return Ok(FsyncPolicy::Always);
        }
        let interval = humantime::parse_duration(s).map_err(|e| {
            format!("fsync policy {s:?} is neither \"always\" nor an interval like \"100ms\": {e}")
        })?;
        let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        if interval_ms == 0 {
            return Err("an fsync interval must be at least 1ms; use \"always\" instead".into());
        }
        Ok(FsyncPolicy::Interval { interval_ms })
    }
}

impl Serialize for FsyncPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FsyncPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A topic's settings, fixed at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicConfig {
    /// Number of partitions; records with the same key always land in the same one.
    pub partitions: u32,
    pub fsync: FsyncPolicy,
    /// Delete sealed segments whose newest record is older than this; `None` keeps forever.
    pub retention_ms: Option<u64>,
    /// Delete the oldest sealed segments while the partition is larger than this.
    pub retention_bytes: Option<u64>,
    /// A segment rolls before it would grow past this many bytes.
    pub segment_bytes_max: u64,
    /// A segment rolls at the first append once its first record is this old.
    pub segment_ms_max: u64,
    /// Bytes between two sparse index entries.
    pub index_interval_bytes: u32,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            partitions: 1,
            fsync: FsyncPolicy::Always,
            retention_ms: None,
            retention_bytes: None,
            segment_bytes_max: SEGMENT_BYTES_MAX_DEFAULT,
            segment_ms_max: SEGMENT_MS_MAX_DEFAULT,
            index_interval_bytes: INDEX_INTERVAL_BYTES_DEFAULT,
        }
    }
}

impl TopicConfig {
    /// Checks every field against its limits.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(LogError::InvalidConfig { reason });
        if self.partitions == 0 || self.partitions > PARTITIONS_MAX {
            return bad(format!(
                "partitions must be 1..={PARTITIONS_MAX}, not {}",
                self.partitions
            ));
        }
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_LIMIT).contains(&self.segment_bytes_max) {
            return bad(format!(
                "segment_bytes_max must be {SEGMENT_BYTES_MIN}..={SEGMENT_BYTES_LIMIT}, not {}",
                self.segment_bytes_max
            ));
        }
        if self.segment_ms_max == 0 {
            return bad("segment_ms_max must be at least 1".into());
        }
        if self.index_interval_bytes == 0 {
            return bad("index_interval_bytes must be at least 1".into());
        }
        if self.retention_ms == Some(0) || self.retention_bytes == Some(0) {
            return bad(
                "a retention of 0 would delete everything; leave it unset to keep forever".into(),
            );
        }
        Ok(())
    }
}

/// Checks a topic name: 1 to 249 bytes of ASCII letters, digits, `.`, `_` and `-`, and neither
/// `.` nor `..` (the names double as directory names).
pub fn validate_topic_name(name: &str) -> Result<()> {
    let invalid = |reason: String| {
        Err(LogError::InvalidTopicName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("a topic name cannot be empty".into());
    }
    if name.len() > TOPIC_NAME_BYTES_MAX {
        return invalid(format!(
            "{} bytes is over the limit of {TOPIC_NAME_BYTES_MAX}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return invalid("`.` and `..` are reserved".into());
    }
    if let Some((at, c)) = name
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        let shown = match c {
            '\0' => "NUL".to_owned(),
            '/' => "`/`".to_owned(),
            c if c.is_control() => format!("U+{:04X}", c as u32),
            c => format!("`{c}`"),
        };
        return invalid(format!(
            "{shown} at byte {at} is not allowed; use ASCII letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_topic_name("orders.v2_raw-1").is_ok());
        for (bad, needle) in [
            ("", "empty"),
            ("..", "reserved"),
            ("a/b", "`/` at byte 1"),
            ("a\0b", "NUL at byte 1"),
            ("caf\u{e9}", "at byte 3"),
            (&"x".repeat(250), "250 bytes"),
        ] {
            let err = validate_topic_name(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
        assert!(validate_topic_name(&"x".repeat(249)).is_ok());
    }

    #[test]
    fn fsync_policies_parse_and_print() {
        assert_eq!(
            "always".parse::<FsyncPolicy>().unwrap(),
            FsyncPolicy::Always
        );
        let p: FsyncPolicy = "250ms".parse().unwrap();
        assert_eq!(p, FsyncPolicy::Interval { interval_ms: 250 });
        assert_eq!(p.to_string(), "250ms");
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
        assert!("0s".parse::<FsyncPolicy>().is_err());
        let json = serde_json::to_string(&TopicConfig {
            fsync: p,
            ..TopicConfig::default()
        })
        .unwrap();
        let back: TopicConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.fsync, p);
    }
}
