//! SQL functions kappa adds to DataFusion's.
//!
//! `hop(ts, slide, size)` — the starts of the hopping windows of length `size`, every `slide`,
//! that contain `ts`, as a list. With `unnest` each event joins every window it falls in:
//!
//! ```sql
//! SELECT window_start, region, count(*) AS orders
//! FROM (SELECT unnest(hop(ts, INTERVAL '1 minute', INTERVAL '5 minutes')) AS window_start, region
//!       FROM orders)
//! GROUP BY window_start, region
//! ```
//!
//! Tumbling windows need nothing new: `date_bin(INTERVAL '1 minute', ts)` or
//! `date_trunc('minute', ts)`. Windows are aligned to the Unix epoch.

use std::any::Any;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, ListBuilder, TimestampMicrosecondBuilder};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, IntervalMonthDayNano, TimeUnit, TimestampMicrosecondType};
use datafusion::common::{ScalarValue, exec_err, plan_err};
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;

/// Registers kappa's functions in a session: `hop`, and the JSON functions of
/// `datafusion-functions-json` (`json_get_str(value, 'customer', 'id')`, `json_get_int`,
/// `json_get_float`, `json_get_bool`, `json_get_json`, `json_length`, `json_contains`, …) for
/// untyped topics, whose one `value` column is the record's JSON text.
pub fn register(ctx: &SessionContext) {
    ctx.register_udf(ScalarUDF::from(Hop::new()));
    ctx.register_udf(ScalarUDF::from(UtcDateTrunc::new()));
    crate::mask::register(ctx);
    let state = ctx.state_ref();
    let mut state = state.write();
    if let Err(e) = datafusion_functions_json::register_all(&mut *state) {
        // Only a name clash with an existing function can fail here; the rest still works.
        tracing::warn!(error = %e, "registering the JSON functions failed");
    }
}

/// Microseconds of an interval with no months (a month has no fixed length).
pub fn interval_micros(interval: IntervalMonthDayNano) -> Option<i64> {
    if interval.months != 0 {
        return None;
    }
    i64::from(interval.days)
        .checked_mul(86_400_000_000)?
        .checked_add(interval.nanoseconds / 1000)
}

/// The starts, ascending, of the windows `[start, start + size)` aligned to multiples of
/// `slide` that contain `ts` (all in microseconds).
pub fn hop_starts(ts: i64, slide: i64, size: i64) -> impl Iterator<Item = i64> {
    let last = ts.div_euclid(slide) * slide;
    // Windows starting at last, last - slide, … reach past ts while start + size > ts.
    let count = if size <= 0 {
        0
    } else {
        (size - 1 - (ts - last)).div_euclid(slide) + 1
    };
    (0..count.max(0)).rev().map(move |k| last - k * slide)
}

/// DataFusion's `date_trunc`, computed without a time zone when the timestamps' zone is UTC.
/// DataFusion converts every zoned value through chrono, whatever the zone: a tenth of the
/// replay of a daily rollup. In UTC, zoned and naive truncation are the same, so the values go
/// through DataFusion's own naive path (plain arithmetic for hours and days) and get their zone
/// back. Everything else — planning, names, types, other zones — is DataFusion's.
#[derive(Debug, PartialEq, Eq, Hash)]
struct UtcDateTrunc {
    inner: Arc<ScalarUDF>,
}

impl UtcDateTrunc {
    fn new() -> UtcDateTrunc {
        UtcDateTrunc {
            inner: datafusion::functions::datetime::date_trunc(),
        }
    }
}

/// Zone names that are UTC.
fn is_utc(zone: &str) -> bool {
    matches!(zone, "+00:00" | "+00" | "+0000" | "UTC" | "Z" | "Etc/UTC")
}

impl ScalarUDFImpl for UtcDateTrunc {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(
        &self,
        args: datafusion::logical_expr::ReturnFieldArgs,
    ) -> Result<arrow::datatypes::FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn output_ordering(
        &self,
        input: &[datafusion::logical_expr::sort_properties::ExprProperties],
    ) -> Result<datafusion::logical_expr::sort_properties::SortProperties> {
        self.inner.output_ordering(input)
    }

    fn documentation(&self) -> Option<&datafusion::logical_expr::Documentation> {
        self.inner.documentation()
    }

    fn invoke_with_args(&self, mut args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let zone = match args.args.get(1) {
            Some(ColumnarValue::Array(a)) => match a.data_type() {
                DataType::Timestamp(_, Some(zone)) if is_utc(zone) => Some(zone.clone()),
                _ => None,
            },
            _ => None,
        };
        let Some(zone) = zone else {
            return self.inner.invoke_with_args(args);
        };
        if let Some(ColumnarValue::Array(a)) = args.args.get_mut(1) {
            *a = crate::mask::with_zone(a, None)?;
        }
        let naive_field = |f: &arrow::datatypes::FieldRef| match f.data_type() {
            DataType::Timestamp(unit, _) => Arc::new(
                f.as_ref()
                    .clone()
                    .with_data_type(DataType::Timestamp(*unit, None)),
            ),
            _ => f.clone(),
        };
        if let Some(field) = args.arg_fields.get_mut(1) {
            *field = naive_field(field);
        }
        args.return_field = naive_field(&args.return_field);
        match self.inner.invoke_with_args(args)? {
            ColumnarValue::Array(out) => Ok(ColumnarValue::Array(crate::mask::with_zone(
                &out,
                Some(zone),
            )?)),
            scalar => Ok(scalar),
        }
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Hop {
    signature: Signature,
}

impl Hop {
    fn new() -> Hop {
        Hop {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

fn zone(t: &DataType) -> Option<Arc<str>> {
    match t {
        DataType::Timestamp(_, zone) => zone.clone(),
        _ => None,
    }
}

impl ScalarUDFImpl for Hop {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn name(&self) -> &str {
        "hop"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match arg_types {
            [ts @ DataType::Timestamp(..), _, _] => Ok(vec![
                DataType::Timestamp(TimeUnit::Microsecond, zone(ts)),
                DataType::Interval(arrow::datatypes::IntervalUnit::MonthDayNano),
                DataType::Interval(arrow::datatypes::IntervalUnit::MonthDayNano),
            ]),
            _ => plan_err!(
                "hop(ts, slide, size) takes a timestamp and two intervals, e.g. \
                 hop(ts, INTERVAL '1 minute', INTERVAL '5 minutes')"
            ),
        }
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        let zone = arg_types.first().and_then(zone);
        Ok(DataType::List(Arc::new(Field::new(
            "item",
            DataType::Timestamp(TimeUnit::Microsecond, zone),
            true,
        ))))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [ts, slide, size] = args.args.as_slice() else {
            return exec_err!("hop takes three arguments");
        };
        let length = |v: &ColumnarValue, what: &str| -> Result<i64> {
            match v {
                ColumnarValue::Scalar(ScalarValue::IntervalMonthDayNano(Some(i))) => {
                    match interval_micros(*i) {
                        Some(us) if us > 0 => Ok(us),
                        _ => exec_err!(
                            "hop: the {what} must be a positive interval of days or less, not months"
                        ),
                    }
                }
                _ => exec_err!("hop: the {what} must be a constant interval"),
            }
        };
        let slide = length(slide, "slide")?;
        let size = length(size, "size")?;
        let ts: ArrayRef = ts.to_array(args.number_rows)?;
        let zone = zone(ts.data_type());
        let ts = cast(
            &ts,
            &DataType::Timestamp(TimeUnit::Microsecond, zone.clone()),
        )?;
        let ts = ts
            .as_any()
            .downcast_ref::<arrow::array::PrimitiveArray<TimestampMicrosecondType>>()
            .ok_or_else(|| {
                datafusion::error::DataFusionError::Internal("hop: not a timestamp".into())
            })?;
        let values = TimestampMicrosecondBuilder::new().with_timezone_opt(zone.clone());
        let mut lists = ListBuilder::new(values).with_field(Arc::new(Field::new(
            "item",
            DataType::Timestamp(TimeUnit::Microsecond, zone),
            true,
        )));
        for i in 0..ts.len() {
            if ts.is_null(i) {
                lists.append(false);
                continue;
            }
            for start in hop_starts(ts.value(i), slide, size) {
                lists.values().append_value(start);
            }
            lists.append(true);
        }
        Ok(ColumnarValue::Array(Arc::new(lists.finish())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// In UTC, the naive path gives what DataFusion's zoned path gives, for every
        /// granularity, over two centuries either side of the epoch (and nulls stay null).
        #[test]
        fn date_trunc_in_utc_equals_datafusions(
            values in proptest::collection::vec(
                proptest::option::weighted(0.95, -6_000_000_000_000_000i64..6_000_000_000_000_000),
                1..40,
            ),
            granularity in proptest::sample::select(vec![
                "microsecond", "millisecond", "second", "minute", "hour", "day", "week",
                "month", "quarter", "year",
            ]),
            zone in proptest::sample::select(vec!["+00:00", "UTC"]),
        ) {
            let zone: Arc<str> = zone.into();
            let array: ArrayRef = Arc::new(
                arrow::array::TimestampMicrosecondArray::from(values.clone())
                    .with_timezone(zone.clone()),
            );
            let args = |array: &ArrayRef| {
                let ts = DataType::Timestamp(TimeUnit::Microsecond, Some(zone.clone()));
                ScalarFunctionArgs {
                    args: vec![
                        ColumnarValue::Scalar(ScalarValue::from(granularity)),
                        ColumnarValue::Array(array.clone()),
                    ],
                    arg_fields: vec![
                        Arc::new(Field::new("g", DataType::Utf8, false)),
                        Arc::new(Field::new("ts", ts.clone(), true)),
                    ],
                    number_rows: values.len(),
                    return_field: Arc::new(Field::new("out", ts, true)),
                    config_options: Default::default(),
                }
            };
            let ours = UtcDateTrunc::new().invoke_with_args(args(&array)).unwrap();
            let theirs = datafusion::functions::datetime::date_trunc()
                .invoke_with_args(args(&array))
                .unwrap();
            let (ColumnarValue::Array(ours), ColumnarValue::Array(theirs)) = (ours, theirs) else {
                panic!("arrays in, arrays out");
            };
            proptest::prop_assert_eq!(ours.data_type(), theirs.data_type());
            proptest::prop_assert_eq!(ours.to_data(), theirs.to_data());
        }
    }

    #[test]
    fn hop_starts_cover_exactly_the_windows_holding_the_instant() {
        let minute = 60_000_000;
        assert_eq!(
            hop_starts(7 * minute + 5, minute, 3 * minute).collect::<Vec<_>>(),
            vec![5 * minute, 6 * minute, 7 * minute]
        );
        assert_eq!(
            hop_starts(7 * minute, minute, 3 * minute).collect::<Vec<_>>(),
            vec![5 * minute, 6 * minute, 7 * minute]
        );
        // Tumbling is hopping with slide = size; negative instants floor correctly.
        assert_eq!(
            hop_starts(-1, minute, minute).collect::<Vec<_>>(),
            vec![-minute]
        );
        // Slide longer than size: some instants are in no window.
        assert_eq!(hop_starts(10, 2 * minute, minute).count(), 1);
        assert_eq!(hop_starts(minute + 10, 2 * minute, minute).count(), 0);
        for ts in [-5 * minute - 3, 0, 17, 11 * minute + 59_999_999] {
            for start in hop_starts(ts, minute, 5 * minute) {
                assert!(start <= ts && ts < start + 5 * minute);
                assert_eq!(start.rem_euclid(minute), 0);
            }
            assert_eq!(hop_starts(ts, minute, 5 * minute).count(), 5);
        }
    }

    #[tokio::test]
    async fn hop_with_unnest_puts_each_event_in_every_window() {
        let ctx = SessionContext::new();
        register(&ctx);
        let out = ctx
            .sql(
                "SELECT w, count(*) AS n FROM (\
                   SELECT unnest(hop(ts, INTERVAL '1 minute', INTERVAL '2 minutes')) AS w \
                   FROM (VALUES (TIMESTAMP '2026-01-05 10:00:30'), \
                                (TIMESTAMP '2026-01-05 10:01:10')) AS t(ts)) \
                 GROUP BY w ORDER BY w",
            )
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(
            arrow::util::pretty::pretty_format_batches(&out)
                .unwrap()
                .to_string(),
            "+---------------------+---+\n\
             | w                   | n |\n\
             +---------------------+---+\n\
             | 2026-01-05T09:59:00 | 1 |\n\
             | 2026-01-05T10:00:00 | 2 |\n\
             | 2026-01-05T10:01:00 | 1 |\n\
             +---------------------+---+"
        );
    }
}
