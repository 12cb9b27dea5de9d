use arrow::util::pretty::pretty_format_batches;
use expect_test::expect;
use kappa_pipeline::TopicSpec;

use super::*;

fn topic(schema: &[(&str, FieldType, bool)]) -> TopicSpec {
    TopicSpec {
        name: "t".into(),
        file: "topics/t.toml".into(),
        partitions: 1,
        key: None,
        fsync: None,
        retention_ms: None,
        kind: Default::default(),
        fields: schema
            .iter()
            .map(|(n, t, r)| Field {
                name: (*n).into(),
                data_type: *t,
                required: *r,
            })
            .collect(),
    }
}

fn run(decoder: &Decoder, lines: &[&str]) -> (String, Vec<String>) {
    let raws = lines.iter().enumerate().map(|(i, l)| Raw {
        partition: 0,
        offset: i as u64,
        value: l.as_bytes(),
    });
    let (batch, rejected) = decoder.decode(raws);
    (
        pretty_format_batches(&[batch]).unwrap().to_string(),
        rejected
            .iter()
            .map(|r| format!("{}: {}", r.offset, r.reason))
            .collect(),
    )
}

#[test]
fn records_decode_and_misfits_are_set_aside_with_reasons() {
    let decoder = Decoder::new(&topic(&[
        ("id", FieldType::Bigint, true),
        (
            "price",
            FieldType::Decimal {
                precision: 10,
                scale: 2,
            },
            true,
        ),
        ("qty", FieldType::Int, false),
        ("ok", FieldType::Boolean, false),
        ("day", FieldType::Date, false),
        ("ts", FieldType::Timestamp, false),
        ("extra", FieldType::Json, false),
    ]));
    let (table, rejected) = run(
        &decoder,
        &[
            r#"{"id":1,"price":19.99,"qty":2,"ok":true,"day":"2026-11-25","ts":"2026-11-25T10:00:00.5Z","extra":{"a":[1]}}"#,
            r#"{"id":2,"price":"0.1","ts":1700000000123,"unknown":"ignored"}"#,
            r#"{"id":3,"price":19.999}"#,
            r#"{"price":1}"#,
            r#"{"id":"4","price":1}"#,
            r#"{"id":5,"price":1,"qty":3000000000}"#,
            r#"[1,2]"#,
            r#"{"id":6,"price":1,"ts":"yesterday"}"#,
            r#"{"id":7,"price":123456789.5}"#,
            r#"{"id":8,"price":-0.50,"qty":null}"#,
            "{oops",
        ],
    );
    expect![[r#"
        +----+-------+-----+------+------------+--------------------------+-----------+
        | id | price | qty | ok   | day        | ts                       | extra     |
        +----+-------+-----+------+------------+--------------------------+-----------+
        | 1  | 19.99 | 2   | true | 2026-11-25 | 2026-11-25T10:00:00.500Z | {"a":[1]} |
        | 2  | 0.10  |     |      |            | 2023-11-14T22:13:20.123Z |           |
        | 8  | -0.50 |     |      |            |                          |           |
        +----+-------+-----+------+------------+--------------------------+-----------+"#]]
    .assert_eq(&table);
    expect![[r#"
        [
            "2: field `price`: 19.999 has more than 2 decimal places",
            "3: required field `id` is missing or null",
            "4: field `id`: expected a bigint (64-bit integer), found \"4\"",
            "5: field `qty`: expected an int (32-bit integer), found 3000000000",
            "6: not a JSON object",
            "7: field `ts`: expected an RFC 3339 time or epoch milliseconds, found \"yesterday\"",
            "8: field `price`: 123456789.5 has more than 8 digits before the point",
            "10: invalid JSON: key must be a string at line 1 column 2",
        ]
    "#]]
    .assert_debug_eq(&rejected);
}

#[test]
fn spacing_escapes_and_key_order_do_not_matter() {
    let decoder = Decoder::new(&topic(&[
        ("id", FieldType::Bigint, true),
        ("name", FieldType::String, true),
        ("ts", FieldType::Timestamp, false),
    ]));
    let (table, rejected) = run(
        &decoder,
        &[
            "{ \"id\" : 1 ,\n \"name\" : \"plain\" , \"ts\" : 1700000000000 }",
            r#"{"name":"tab\there \"quoted\" \u00e9","id":-2}"#,
            r#"{"ts":"2026-11-25T10:00:00Z","name":"","id":3,"name":"last wins"}"#,
            r#"{"id":4.0,"name":"x"}"#,
            r#"{"id":5,"name":7}"#,
        ],
    );
    expect![[r#"
        +----+---------------------+----------------------+
        | id | name                | ts                   |
        +----+---------------------+----------------------+
        | 1  | plain               | 2023-11-14T22:13:20Z |
        | -2 | tab	here "quoted" é |                      |
        | 3  | last wins           | 2026-11-25T10:00:00Z |
        +----+---------------------+----------------------+"#]]
    .assert_eq(&table);
    expect![[r#"
        [
            "3: field `id`: expected a bigint (64-bit integer), found 4.0",
            "4: field `name`: expected a string, found 7",
        ]
    "#]]
    .assert_debug_eq(&rejected);
}

#[test]
fn untyped_topics_keep_the_json_text() {
    let decoder = Decoder::new(&topic(&[]));
    let (table, rejected) = run(&decoder, &[r#"{"any": "thing"}"#, "nope"]);
    assert!(table.contains(r#"{"any": "thing"}"#), "{table}");
    assert_eq!(rejected.len(), 1);
}

proptest::proptest! {
    #[test]
    fn any_bytes_decode_or_are_rejected_never_a_panic(
        records in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80), 0..20)
    ) {
        let decoder = Decoder::new(&topic(&[
            ("a", FieldType::Decimal { precision: 38, scale: 10 }, true),
            ("b", FieldType::Timestamp, false),
            ("c", FieldType::Date, false),
        ]));
        let raws = records.iter().enumerate().map(|(i, r)| Raw { partition: 0, offset: i as u64, value: r });
        let (batch, rejected) = decoder.decode(raws);
        proptest::prop_assert_eq!(batch.num_rows() + rejected.len(), records.len());
    }
}

/// One JSON value of many kinds, valid and not, as text.
fn any_value() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        (-5i64..5).prop_map(|v| v.to_string()),
        any::<i32>().prop_map(|v| format!("{v}.{:02}", v.unsigned_abs() % 100)),
        any::<f64>().prop_map(|v| v.to_string()),
        Just("1e3".to_owned()),
        Just("-0".to_owned()),
        Just("01".to_owned()),
        Just("1.".to_owned()),
        Just("-".to_owned()),
        Just("2E-2".to_owned()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        Just("null".to_owned()),
        Just("nul".to_owned()),
        Just("{\"a\":[1,{\"b\":null}]}".to_owned()),
        Just("[]".to_owned()),
        "[a-z0-9 é]{0,8}".prop_map(|v| format!("\"{v}\"")),
        Just("\"tab\\there\"".to_owned()),
        Just("\"\\u00e9\\\"\"".to_owned()),
        Just("\"a\tb\"".to_owned()),
        (
            1890i32..2210,
            0u32..14,
            0u32..33,
            0u32..25,
            0u32..61,
            0usize..11
        )
            .prop_map(|(y, mo, d, h, mi, f)| {
                let fraction = if f == 0 {
                    String::new()
                } else {
                    format!(".{}", "123456789012".get(..f).unwrap_or(""))
                };
                format!(
                    "\"{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{:02}{fraction}Z\"",
                    mi % 60
                )
            }),
        Just("\"2026-11-25T10:00:00+01:00\"".to_owned()),
        Just("\"2026-11-25 10:00:00Z\"".to_owned()),
        Just("\"2026-11-25\"".to_owned()),
        Just("1700000000123".to_owned()),
    ]
}

/// A record: mostly objects of the test schema's keys (and others), in any order, with
/// any spacing; sometimes cut short or with a byte changed.
fn any_record() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let key = prop_oneof![
        Just("id"),
        Just("name"),
        Just("qty"),
        Just("price"),
        Just("ok"),
        Just("ts"),
        Just("day"),
        Just("x"),
        Just("extra"),
        Just("other"),
        Just("i\\u0064"),
        // Keys that share the first eight or more bytes with `unit_price_eur`.
        Just("unit_price_eur"),
        Just("unit_price_eur"),
        Just("unit_price_usd"),
        Just("unit_price_eu"),
        Just("unit_price_eurx"),
        Just("unit_price_eur_and_more"),
    ];
    let space = prop_oneof![Just(""), Just(" "), Just("\n\t "), Just("\u{a0}")];
    // Mostly a value the key's field accepts, so that many records decode whole and the
    // rows themselves are compared, not only the first reason to reject.
    let fitting = |key: &str| -> &'static [&'static str] {
        match key {
            "id" => &["1", "-42", "9007199254740993"],
            "name" => &["\"plain\"", "\"\"", "null"],
            "qty" => &["3", "-7", "null"],
            "price" | "unit_price_eur" => &["19.99", "\"0.10\"", "7", "null"],
            "ok" => &["true", "false"],
            "ts" => &["\"2026-11-25T10:00:00.123Z\"", "1700000000123"],
            "day" => &["\"2026-02-28\""],
            "x" => &["1.5", "-2e3"],
            _ => &["\"anything\"", "12"],
        }
    };
    let member =
        (key, any_value(), 0usize..3, any::<usize>()).prop_map(move |(k, random, pick, which)| {
            let values = fitting(k);
            let value = if pick == 0 {
                random
            } else {
                values[which % values.len()].to_owned()
            };
            (k, value)
        });
    (
        proptest::collection::vec((member, space.clone()), 0..12).prop_map(|m| {
            m.into_iter()
                .map(|((k, v), sp)| (k, v, sp))
                .collect::<Vec<_>>()
        }),
        space,
        0u8..10,
        any::<usize>(),
        any::<u8>(),
    )
        .prop_map(|(members, space, damage, at, byte)| {
            let body: Vec<String> = members
                .iter()
                .map(|(k, v, sp)| format!("{sp}\"{k}\"{sp}:{sp}{v}{sp}"))
                .collect();
            let mut record = format!("{space}{{{}}}{space}", body.join(",")).into_bytes();
            match damage {
                0 if !record.is_empty() => record.truncate(at % record.len()),
                1 if !record.is_empty() => {
                    let i = at % record.len();
                    record[i] = byte;
                }
                _ => {}
            }
            record
        })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]
    /// The flat-record scanner decides exactly as the full parser does: the same rows,
    /// the same rejections with the same reasons. (Both paths parse times with
    /// `utc_micros`; the next test holds that to arrow's parser.)
    #[test]
    fn the_fast_path_decodes_exactly_as_the_full_parser(
        records in proptest::collection::vec(any_record(), 1..30)
    ) {
        let fields = [
            ("id", FieldType::Bigint, true),
            ("name", FieldType::String, false),
            ("qty", FieldType::Int, false),
            ("price", FieldType::Decimal { precision: 10, scale: 2 }, false),
            ("ok", FieldType::Boolean, false),
            ("ts", FieldType::Timestamp, false),
            ("day", FieldType::Date, false),
            ("x", FieldType::Double, false),
            ("extra", FieldType::Json, false),
            ("unit_price_eur", FieldType::Decimal { precision: 10, scale: 2 }, false),
        ];
        let fast = Decoder::new(&topic(&fields));
        let full = Decoder { fast: false, ..fast.clone() };
        let raws = || records.iter().enumerate().map(|(i, r)| Raw { partition: 0, offset: i as u64, value: r });
        let (fast_batch, fast_rejected) = fast.decode(raws());
        let (full_batch, full_rejected) = full.decode(raws());
        proptest::prop_assert_eq!(fast_batch, full_batch);
        proptest::prop_assert_eq!(fast_rejected, full_rejected);
    }

    #[test]
    fn the_time_fast_path_agrees_with_arrows_parser(
        y in 1890i64..2210, mo in 0u32..14, d in 0u32..33, h in 0u32..25, mi in 0u32..61,
        sec in 0u32..61, digits in 0usize..11, fraction in proptest::prelude::any::<u64>()
    ) {
        let fraction = if digits == 0 {
            String::new()
        } else {
            format!(".{:0>width$}", fraction % 10u64.pow(digits as u32), width = digits)
        };
        let text = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{sec:02}{fraction}Z");
        let arrow = string_to_timestamp_nanos(&text).ok().map(|n| n.div_euclid(1000));
        match utc_micros(&text) {
            Some(micros) => proptest::prop_assert_eq!(Some(micros), arrow, "{}", text),
            None => proptest::prop_assert!(
                arrow.is_none() || !(1900..2200).contains(&y) || digits > 9 || sec > 59,
                "the fast path refused {} which arrow reads", text
            ),
        }
    }
}

#[test]
fn decimals_are_exact() {
    assert_eq!(parse_decimal("0", 4, 2), Ok(0));
    assert_eq!(parse_decimal("00012.30", 4, 2), Ok(1230));
    assert_eq!(parse_decimal("-7.5", 4, 2), Ok(-750));
    assert!(parse_decimal("1e3", 10, 2).is_err());
    assert!(parse_decimal(".5", 10, 2).is_err());
    assert!(parse_decimal("123", 4, 2).is_err());
}
