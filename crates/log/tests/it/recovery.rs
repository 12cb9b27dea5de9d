//! Torn tails, bit flips and lost files: recovery keeps everything durable, drops only what was
//! not, and says so; corruption of durable data is a typed error, never a silent truncation.

use std::path::{Path, PathBuf};

use kappa_log::inspect::{
    IndexEntry, IndexKind, decode_index_files, encode_index, rebuild_index_files,
};
use kappa_log::{FsyncPolicy, Log, LogError, OsStorage, RecoveryEvent, TopicConfig};
use kappa_testkit::fs::{copy_dir, flip_bit, truncate};

use crate::{all_values, values};

const INDEX_INTERVAL: u32 = 64;

fn config() -> TopicConfig {
    // Fsyncs only when asked, so the test decides where the durable point is.
    TopicConfig {
        fsync: FsyncPolicy::Interval {
            interval_ms: 3_600_000,
        },
        index_interval_bytes: INDEX_INTERVAL,
        ..TopicConfig::default()
    }
}

fn segment(dir: &Path, base: u64) -> PathBuf {
    dir.join("t/0").join(format!("{base:020}.log"))
}

/// A crash image: `durable` appends fsynced, then `tail` appends written but not fsynced.
/// Returns the image directory and the byte position of every batch boundary.
fn crash_image(durable: usize, tail: usize) -> (tempfile::TempDir, Vec<u64>, u64) {
    let live = tempfile::tempdir().unwrap();
    let log = Log::open(live.path()).unwrap();
    let topic = log.create_topic("t", config()).unwrap();
    let mut boundaries = vec![0];
    let path = segment(live.path(), 0);
    for i in 0..durable {
        topic
            .partition(0)
            .unwrap()
            .append_blocking(&values(&format!("d{i}"), i % 3 + 1))
            .unwrap();
        boundaries.push(std::fs::metadata(&path).unwrap().len());
    }
    topic.sync().unwrap();
    let durable_end = *boundaries.last().unwrap();
    for i in 0..tail {
        topic
            .partition(0)
            .unwrap()
            .append_blocking(&values(&format!("t{i}"), i % 4 + 1))
            .unwrap();
        boundaries.push(std::fs::metadata(&path).unwrap().len());
    }
    let image = tempfile::tempdir().unwrap();
    copy_dir(live.path(), image.path()).unwrap();
    std::fs::remove_file(image.path().join("LOCK")).unwrap();
    (image, boundaries, durable_end)
}

/// The records a log holds after the first `batches` appends of [`crash_image`].
fn expected(durable: usize, batches: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 0..batches {
        let (prefix, count) = if i < durable {
            (format!("d{i}"), i % 3 + 1)
        } else {
            (format!("t{}", i - durable), (i - durable) % 4 + 1)
        };
        for j in 0..count {
            out.push(format!("{prefix}-{j}").into_bytes());
        }
    }
    out
}

fn assert_index_matches_rebuild(dir: &Path) {
    let seg = segment(dir, 0);
    let (offsets, times) = rebuild_index_files(&OsStorage, &seg, 0, INDEX_INTERVAL).unwrap();
    assert_eq!(
        std::fs::read(seg.with_extension("index")).unwrap(),
        offsets,
        "offset index differs from a rebuild"
    );
    assert_eq!(
        std::fs::read(seg.with_extension("timeindex")).unwrap(),
        times,
        "time index differs from a rebuild"
    );
}

#[test]
fn a_torn_tail_at_every_byte_recovers_to_the_last_whole_batch() {
    let (durable, tail) = (6, 4);
    let (image, boundaries, durable_end) = crash_image(durable, tail);
    let end = *boundaries.last().unwrap();
    let mut truncations = 0;
    for cut in durable_end..=end {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(image.path(), dir.path()).unwrap();
        truncate(&segment(dir.path(), 0), cut).unwrap();
        let whole = boundaries.iter().rposition(|b| *b <= cut).unwrap();
        let log = Log::open(dir.path()).unwrap();
        let got: Vec<Vec<u8>> = all_values(&log, "t", 0)
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(got, expected(durable, whole), "cut at byte {cut}");
        let torn: Vec<_> = log
            .recovery_events()
            .iter()
            .filter_map(|e| match e {
                RecoveryEvent::TruncatedTornTail {
                    segment,
                    position,
                    bytes_removed,
                    ..
                } => Some((segment.clone(), *position, *bytes_removed)),
                _ => None,
            })
            .collect();
        if boundaries.contains(&cut) {
            assert!(
                torn.is_empty(),
                "cut at a batch boundary {cut} needs no truncation: {torn:?}"
            );
        } else {
            truncations += 1;
            assert_eq!(
                torn,
                vec![(
                    segment(dir.path(), 0),
                    boundaries[whole],
                    cut - boundaries[whole]
                )],
                "cut at {cut}"
            );
        }
        // Appending continues at the next offset, and the index equals a rebuild.
        let topic = log.topic("t").unwrap();
        let next = topic
            .partition(0)
            .unwrap()
            .append_blocking(&values("after", 1))
            .unwrap();
        assert_eq!(next.base_offset, expected(durable, whole).len() as u64);
        drop(topic);
        log.close().unwrap();
        drop(log);
        assert_index_matches_rebuild(dir.path());
    }
    assert!(
        truncations > 100,
        "only {truncations} torn positions exercised"
    );
}

#[test]
fn a_flipped_bit_past_the_durable_point_truncates_from_that_batch() {
    let (durable, tail) = (4, 4);
    let (image, boundaries, durable_end) = crash_image(durable, tail);
    let end = *boundaries.last().unwrap();
    for position in durable_end..end {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(image.path(), dir.path()).unwrap();
        flip_bit(&segment(dir.path(), 0), position, (position % 8) as u8).unwrap();
        let log = Log::open(dir.path()).unwrap();
        let batch = boundaries.iter().rposition(|b| *b <= position).unwrap();
        let got: Vec<Vec<u8>> = all_values(&log, "t", 0)
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(got, expected(durable, batch), "flip at byte {position}");
        assert!(
            log.recovery_events().iter().any(|e| matches!(e,
                RecoveryEvent::TruncatedTornTail { position: p, .. } if *p == boundaries[batch])),
            "flip at {position}: {:?}",
            log.recovery_events()
        );
    }
}

#[test]
fn a_flipped_bit_before_the_durable_point_is_a_typed_error_not_a_truncation() {
    let (durable, tail) = (5, 2);
    let (image, boundaries, durable_end) = crash_image(durable, tail);
    for position in 0..durable_end {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(image.path(), dir.path()).unwrap();
        let seg = segment(dir.path(), 0);
        let before = std::fs::read(&seg).unwrap();
        flip_bit(&seg, position, 3).unwrap();
        let batch_start = boundaries[boundaries.iter().rposition(|b| *b <= position).unwrap()];
        let err = Log::open(dir.path()).unwrap_err();
        let in_length_field = position - batch_start < 4;
        match &err {
            LogError::CorruptBatch {
                segment,
                position: at,
                expected_crc,
                actual_crc,
            } => {
                assert_eq!(segment, &seg);
                assert_eq!(*at, batch_start);
                assert_ne!(expected_crc, actual_crc);
            }
            LogError::MalformedBatch {
                segment,
                position: at,
                ..
            } if in_length_field => {
                assert_eq!(segment, &seg);
                assert_eq!(*at, batch_start);
            }
            other => panic!("flip at {position}: {other}"),
        }
        // Nothing was cut: the segment still has every byte.
        assert_eq!(
            std::fs::read(&seg).unwrap().len(),
            before.len(),
            "flip at {position}"
        );
    }
}

#[tokio::test]
async fn corruption_in_a_sealed_segment_fails_the_read_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path()).unwrap();
        let topic = log.create_topic("t", crate::small_segments()).unwrap();
        for i in 0..40 {
            topic.append(values(&format!("v{i}"), 4)).await.unwrap();
        }
    }
    let seg = segment(dir.path(), 0);
    flip_bit(&seg, 100, 0).unwrap();
    let log = Log::open(dir.path()).unwrap();
    let topic = log.topic("t").unwrap();
    let mut reader = topic
        .partition(0)
        .unwrap()
        .reader(kappa_log::StartAt::Beginning)
        .unwrap();
    let err = loop {
        match reader.read(1 << 20) {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("corruption was read silently"),
            Err(e) => break e,
        }
    };
    let LogError::CorruptBatch { segment, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(segment, &seg);
    assert!(err.to_string().contains("not truncated"), "{err}");
}

#[test]
fn a_segment_shorter_than_its_durable_point_is_an_error() {
    let (image, _, durable_end) = crash_image(3, 1);
    truncate(&segment(image.path(), 0), durable_end - 1).unwrap();
    let err = Log::open(image.path()).unwrap_err();
    assert!(
        matches!(err, LogError::DurableDataMissing { durable_position, .. } if durable_position == durable_end),
        "{err}"
    );
}

#[tokio::test]
async fn missing_and_damaged_indexes_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let n = {
        let log = Log::open(dir.path()).unwrap();
        let topic = log.create_topic("t", crate::small_segments()).unwrap();
        for i in 0..60 {
            topic.append(values(&format!("v{i}"), 3)).await.unwrap();
        }
        180
    };
    let partition = dir.path().join("t/0");
    let mut sealed: Vec<PathBuf> = std::fs::read_dir(&partition)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "index"))
        .collect();
    sealed.sort();
    assert!(sealed.len() >= 3);
    std::fs::remove_file(&sealed[0]).unwrap();
    flip_bit(&sealed[1], 3, 1).unwrap();
    std::fs::write(sealed[2].with_extension("timeindex"), b"junk").unwrap();
    let log = Log::open(dir.path()).unwrap();
    let rebuilt = log
        .recovery_events()
        .iter()
        .filter(|e| matches!(e, RecoveryEvent::RebuiltIndex { .. }))
        .count();
    assert_eq!(rebuilt, 3, "{:?}", log.recovery_events());
    assert_eq!(all_values(&log, "t", 0).len(), n);
    for path in &sealed[..3] {
        let seg = path.with_extension("log");
        let base: u64 = seg.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        let (offsets, _) = rebuild_index_files(&OsStorage, &seg, base, 128).unwrap();
        assert_eq!(std::fs::read(path).unwrap(), offsets);
    }
}

/// A log of 60 appends of 3 records, 10 ms apart, in small segments; returns its records.
fn sixty_appends(dir: &Path) -> Vec<(u64, Vec<u8>)> {
    let clock = kappa_testkit::clock::ManualClock::new(1_000_000);
    let options = kappa_log::LogOptions {
        clock: std::sync::Arc::new(clock.clone()),
        ..Default::default()
    };
    let log = Log::open_with(dir, options).unwrap();
    let topic = log.create_topic("t", crate::small_segments()).unwrap();
    for i in 0..60 {
        topic
            .partition(0)
            .unwrap()
            .append_blocking(&values(&format!("v{i}"), 3))
            .unwrap();
        clock.advance_ms(10);
    }
    drop(topic);
    let all = all_values(&log, "t", 0);
    log.close().unwrap();
    all
}

/// Rewrites the first segment's two index files with `change` applied to their entries, keeping
/// their coverage header (so recovery trusts them) and valid CRCs.
fn doctor_first_index(dir: &Path, change: impl Fn(usize, IndexEntry) -> IndexEntry) {
    let seg = segment(dir, 0);
    let offsets = std::fs::read(seg.with_extension("index")).unwrap();
    let times = std::fs::read(seg.with_extension("timeindex")).unwrap();
    let (coverage, entries) = decode_index_files(&offsets, &times).unwrap();
    assert!(
        entries.len() > 3,
        "the test needs a segment with several index entries"
    );
    let changed: Vec<IndexEntry> = entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| change(i, e))
        .collect();
    std::fs::write(
        seg.with_extension("index"),
        encode_index(IndexKind::Offset, &changed, coverage),
    )
    .unwrap();
    std::fs::write(
        seg.with_extension("timeindex"),
        encode_index(IndexKind::Time, &changed, coverage),
    )
    .unwrap();
}

/// Reads from every offset and looks up every append's timestamp through a doctored index.
fn assert_reads_ignore_the_lying_index(dir: &Path, expected: &[(u64, Vec<u8>)]) {
    let log = Log::open(dir).unwrap();
    assert!(
        !log.recovery_events()
            .iter()
            .any(|e| matches!(e, RecoveryEvent::RebuiltIndex { .. })),
        "the doctored index must be trusted at open, so that reads meet it: {:?}",
        log.recovery_events()
    );
    let topic = log.topic("t").unwrap();
    let partition = topic.partition(0).unwrap();
    for start in 0..expected.len() as u64 {
        let mut reader = partition.reader(kappa_log::StartAt::Offset(start)).unwrap();
        assert_eq!(
            crate::drain(&mut reader),
            expected[start as usize..],
            "from {start}"
        );
    }
    for append in 0..60u64 {
        let ts = 1_000_000 + append as i64 * 10;
        assert_eq!(
            partition.offset_for_timestamp(ts).unwrap(),
            append * 3,
            "timestamp of append {append}"
        );
    }
}

#[test]
fn index_entries_that_lie_about_offsets_are_caught_at_read_time() {
    let dir = tempfile::tempdir().unwrap();
    let expected = sixty_appends(dir.path());
    // Every entry but the first claims its batch starts one offset earlier than it does.
    doctor_first_index(dir.path(), |i, e| {
        if i == 0 {
            e
        } else {
            IndexEntry {
                relative_offset: e.relative_offset - 1,
                ..e
            }
        }
    });
    assert_reads_ignore_the_lying_index(dir.path(), &expected);
}

#[test]
fn index_entries_pointing_inside_batches_are_caught_at_read_time() {
    let dir = tempfile::tempdir().unwrap();
    let expected = sixty_appends(dir.path());
    doctor_first_index(dir.path(), |i, e| {
        if i == 0 {
            e
        } else {
            IndexEntry {
                position: e.position + 3,
                ..e
            }
        }
    });
    assert_reads_ignore_the_lying_index(dir.path(), &expected);
}

#[test]
fn a_lost_checkpoint_validates_everything_and_keeps_valid_data() {
    let (image, _, _) = crash_image(4, 2);
    std::fs::remove_file(image.path().join("t/0/recovery-checkpoint")).unwrap();
    let log = Log::open(image.path()).unwrap();
    assert!(
        log.recovery_events()
            .iter()
            .any(|e| matches!(e, RecoveryEvent::NoCheckpoint { .. }))
    );
    assert_eq!(all_values(&log, "t", 0).len(), expected(4, 6).len());
}

#[test]
fn an_incompletely_created_topic_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("half/0")).unwrap();
    let log = Log::open(dir.path()).unwrap();
    assert!(log.topics().is_empty());
    assert!(!dir.path().join("half").exists());
    log.create_topic("half", TopicConfig::default()).unwrap();
}
