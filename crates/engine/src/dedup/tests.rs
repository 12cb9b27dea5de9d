use std::collections::BTreeSet;

use arrow::array::{Int64Array, StringArray, TimestampMicrosecondArray};
use kappa_pipeline::ProjectFiles;
use proptest::prelude::*;

use super::*;

/// A dedup over `orders(id, v, ts)` keeping the earliest row per id, with `horizon_ms`.
async fn dedup(horizon_ms: u64) -> Dedup {
    let mut files = ProjectFiles::new();
    files.insert("kappa.toml".into(), String::new());
    files.insert(
        "topics/orders.toml".into(),
        "[schema]\nid = \"bigint\"\nv = \"string\"\nts = \"timestamp\"\n".into(),
    );
    files.insert(
        "models/silver/d.sql".into(),
        "SELECT id, v, ts FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY ts) \
         AS rn FROM orders) WHERE rn = 1"
            .into(),
    );
    files.insert(
        "models/silver/d.toml".into(),
        "event_time = \"ts\"\nwatermark = \"0s\"\n".into(),
    );
    let project = kappa_pipeline::load(&files).expect("the project loads");
    let planned = crate::plan::plan_model(&project, "silver.d")
        .await
        .expect("the model plans");
    let found = planned.dedup.expect("the model deduplicates");
    Dedup::new(
        planned.ctx,
        planned.slot,
        &found.found,
        "ts",
        horizon_ms,
        found.output_schema,
    )
    .expect("the dedup builds")
}

fn batch(rows: &[(i64, i64)], first: usize) -> RecordBatch {
    let schema = crate::schema::topic_schema(&kappa_pipeline::TopicSpec {
        name: "orders".into(),
        file: "topics/orders.toml".into(),
        partitions: 1,
        key: None,
        fsync: None,
        retention_ms: None,
        kind: Default::default(),
        fields: ["id", "v", "ts"]
            .iter()
            .zip([
                kappa_pipeline::FieldType::Bigint,
                kappa_pipeline::FieldType::String,
                kappa_pipeline::FieldType::Timestamp,
            ])
            .map(|(name, data_type)| kappa_pipeline::Field {
                name: (*name).into(),
                data_type,
                required: false,
            })
            .collect(),
    });
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(StringArray::from_iter_values(
                (first..first + rows.len()).map(|i| format!("row {i}")),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.1))
                    .with_timezone(crate::schema::UTC),
            ),
        ],
    )
    .expect("columns match the schema")
}

/// Every emitted (id, v, ts), feeding `batches` with a watermark `lag` behind the latest
/// time seen (never back), gathering held rows on every emit when `gather`.
async fn run(
    batches: &[Vec<(i64, i64)>],
    lag: i64,
    gather: bool,
    horizon_ms: u64,
    chunk: Option<usize>,
) -> BTreeSet<String> {
    let mut d = dedup(horizon_ms).await;
    if gather {
        d.held_slack = 0;
    }
    d.offer_chunk = chunk;
    let (mut seen, mut first) = (i64::MIN, 0);
    let mut out = BTreeSet::new();
    for rows in batches {
        // Rows older than the watermark are late: the source sets them aside.
        let watermark = seen.saturating_sub(lag);
        let kept: Vec<(i64, i64)> = rows.iter().copied().filter(|r| r.1 >= watermark).collect();
        seen = kept.iter().map(|r| r.1).fold(seen, i64::max);
        let input = batch(&kept, first);
        first += kept.len();
        let emitted = d
            .push(input, Some(seen.saturating_sub(lag)))
            .await
            .expect("a batch dedups");
        for b in emitted {
            let text = arrow::util::pretty::pretty_format_batches(&[b])
                .unwrap()
                .to_string();
            for line in text
                .lines()
                .filter(|l| l.starts_with("| ") && !l.contains(" id "))
            {
                assert!(out.insert(line.to_owned()), "emitted twice: {line}");
            }
        }
    }
    out
}

/// A key is remembered for the horizon (1 s here): a copy within it is dropped; once the
/// watermark is a horizon (and a slice) past the key's time, the key is forgotten and a later
/// copy comes out again.
#[tokio::test]
async fn a_key_is_forgotten_a_horizon_after_its_time() {
    let mut d = dedup(1_000).await;
    let mut out = Vec::new();
    // (rows (id, µs), watermark after them)
    let steps: [(&[(i64, i64)], i64); 4] = [
        (&[(1, 0)], 1),
        (&[(1, 500_000)], 500_001),
        (&[(2, 3_000_000)], 3_000_001),
        (&[(1, 3_500_000)], 3_500_001),
    ];
    for (i, (rows, watermark)) in steps.iter().enumerate() {
        for b in d.push(batch(rows, i), Some(*watermark)).await.unwrap() {
            let ids = b.column(0).as_primitive::<arrow::datatypes::Int64Type>();
            let v = b.column(1).as_string::<i32>();
            out.extend((0..b.num_rows()).map(|r| (ids.value(r), v.value(r).to_owned())));
        }
    }
    assert_eq!(
        out,
        [
            (1, "row 0".to_owned()),
            (2, "row 2".to_owned()),
            (1, "row 3".to_owned())
        ]
    );
}

proptest! {
    /// Short keys are inline, long ones shared; either way two keys are equal exactly
    /// when their bytes are, and a map finds a key by its bytes.
    #[test]
    fn keys_compare_and_hash_as_their_bytes(
        a in proptest::collection::vec(0u8..3, 0..40),
        b in proptest::collection::vec(0u8..3, 0..40),
    ) {
        let (x, y) = (Key::from(a.as_slice()), Key::from(b.as_slice()));
        prop_assert_eq!(x == y, a == b);
        prop_assert_eq!(x.as_slice(), a.as_slice());
        let mut map = SharedKeyMap::default();
        map.insert(x, 1);
        prop_assert_eq!(map.get(a.as_slice()), Some(&1));
        prop_assert_eq!(map.contains_key(b.as_slice()), a == b);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    /// Candidates gathered out of their batches on every emit give the same rows as
    /// candidates left in place: no row lost, moved to another key, or emitted twice.
    #[test]
    fn the_earliest_row_per_key_comes_out_once_whether_held_rows_are_gathered_or_not(
        batches in proptest::collection::vec(
            proptest::collection::vec((0i64..40, 0i64..5_000), 0..60), 1..12),
        lag in 0i64..2_000,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        // A horizon of 1 ms forgets keys within the run; one of an hour never does.
        let (in_place, gathered, split, remembered) = runtime.block_on(async {
            (
                run(&batches, lag, false, 1, None).await,
                run(&batches, lag, true, 1, None).await,
                run(&batches, lag, true, 1, Some(3)).await,
                run(&batches, lag, true, 3_600_000, None).await,
            )
        });
        prop_assert_eq!(&in_place, &gathered);
        // A micro-batch offered as several batches (a key's rows spread over them).
        prop_assert_eq!(in_place, split);
        // Never forgetting, the output is the batch answer: per id, the earliest of the
        // rows that were not late (the first to arrive on a tie), once the final
        // watermark has passed it.
        let (mut seen, mut arrival) = (i64::MIN, 0usize);
        let mut earliest: BTreeMap<i64, (i64, usize)> = BTreeMap::new();
        for rows in &batches {
            let watermark = seen.saturating_sub(lag);
            for &(id, t) in rows.iter().filter(|r| r.1 >= watermark) {
                let e = earliest.entry(id).or_insert((t, arrival));
                if t < e.0 {
                    *e = (t, arrival);
                }
                arrival += 1;
                seen = seen.max(t);
            }
        }
        let last = seen.saturating_sub(lag);
        let expected: BTreeSet<String> = earliest
            .iter()
            .filter(|(_, (t, _))| *t < last)
            .map(|(id, (t, i))| (*id, *t, *i))
            .map(|(id, t, i)| {
                let ts = arrow::array::TimestampMicrosecondArray::from(vec![t])
                    .with_timezone(crate::schema::UTC);
                let ts = arrow::util::display::ArrayFormatter::try_new(&ts, &Default::default())
                    .unwrap()
                    .value(0)
                    .to_string();
                (id, format!("row {i}"), ts)
            })
            // The dedup's rows still carry the row number, 1.
            .map(|(id, v, ts)| format!("{id} {v} {ts} 1"))
            .collect();
        let remembered: BTreeSet<String> = remembered
            .iter()
            .map(|l| l.split('|').map(str::trim).filter(|c| !c.is_empty()).collect::<Vec<_>>().join(" "))
            .collect();
        prop_assert_eq!(remembered, expected);
    }
}
