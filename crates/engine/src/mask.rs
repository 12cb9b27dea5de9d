//! PII masking's SQL functions: `mask_email`, `hash`, `redact`, `truncate_date` and `last4`
//! (`mask_plan.rs` applies a model's `[mask]` to its plan).
//!
//! `hash` is HMAC-SHA256 under a key read from the environment (the variable named by
//! `masking.secret_env` in `kappa.toml`, `KAPPA_HASH_SECRET` by default) each time it runs; the
//! key is never in the project folder or the warehouse.

use std::any::Any;
use std::sync::{Arc, RwLock};

use arrow::array::{
    Array, ArrayRef, AsArray, Date64Array, StringArray, StringBuilder, TimestampMicrosecondArray,
    TimestampMillisecondArray, TimestampNanosecondArray, TimestampSecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::{exec_err, plan_err};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;
use hmac::{Hmac, Mac};
use kappa_pipeline::{DEFAULT_SECRET_ENV, Mask};
use sha2::Sha256;

/// What `redact` writes in place of a value.
pub const REDACTED: &str = "[redacted]";

/// The environment variable `hash` reads its key from.
static SECRET_ENV: RwLock<Option<String>> = RwLock::new(None);

/// Makes `hash` read its key from the environment variable `name` (from `kappa.toml`).
pub fn read_hash_key_from(name: &str) {
    let mut env = SECRET_ENV
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    *env = Some(name.to_owned());
}

/// The key `hash` signs with, from the environment.
pub(crate) fn hash_key() -> Result<Vec<u8>> {
    let name = SECRET_ENV
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
        .unwrap_or_else(|| DEFAULT_SECRET_ENV.to_owned());
    match std::env::var_os(&name) {
        Some(key) if !key.is_empty() => Ok(key.into_encoded_bytes()),
        _ => exec_err!(
            "hash() needs a key: set the environment variable {name} (kappa.toml's \
             masking.secret_env names the variable; the key itself never goes in the project)"
        ),
    }
}

/// Registers the mask functions in a session.
pub fn register(ctx: &SessionContext) {
    for mask in [
        Mask::MaskEmail,
        Mask::Hash,
        Mask::Redact,
        Mask::TruncateDate,
        Mask::Last4,
    ] {
        ctx.register_udf(udf(mask));
    }
}

/// The SQL function applying `mask`.
pub(crate) fn udf(mask: Mask) -> ScalarUDF {
    ScalarUDF::from(MaskFunction {
        mask,
        signature: Signature::any(1, Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct MaskFunction {
    mask: Mask,
    signature: Signature,
}

impl ScalarUDFImpl for MaskFunction {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn name(&self) -> &str {
        self.mask.function()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        let name = self.mask.function();
        let [input] = arg_types else {
            return plan_err!("{name}() takes one value");
        };
        match self.mask {
            Mask::MaskEmail if !is_text(input) => {
                plan_err!("mask_email() takes text, not {input}")
            }
            Mask::TruncateDate => match input {
                DataType::Date32 | DataType::Date64 | DataType::Timestamp(..) | DataType::Null => {
                    Ok(input.clone())
                }
                other => plan_err!("truncate_date() takes a date or a timestamp, not {other}"),
            },
            _ => Ok(DataType::Utf8),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let [input] = args.args.as_slice() else {
            return exec_err!("{}() takes one value", self.mask.function());
        };
        let array = input.to_array(rows)?;
        let out = match self.mask {
            Mask::TruncateDate => truncate_to_day(&array)?,
            Mask::MaskEmail => map_text(&array, |s, out| out.append_value(mask_email(s)))?,
            Mask::Redact => map_text(&array, |_, out| out.append_value(REDACTED))?,
            Mask::Last4 => map_text(&array, |s, out| out.append_value(last4(s)))?,
            Mask::Hash => {
                let key = hash_key()?;
                let mac = Hmac::<Sha256>::new_from_slice(&key)
                    .map_err(|e| DataFusionError::Execution(format!("hash key: {e}")))?;
                let mut hex = String::with_capacity(64);
                map_text(&array, |s, out| {
                    let mut m = mac.clone();
                    m.update(s.as_bytes());
                    hex.clear();
                    for byte in m.finalize().into_bytes() {
                        hex.push(HEX[usize::from(byte >> 4)]);
                        hex.push(HEX[usize::from(byte & 15)]);
                    }
                    out.append_value(&hex);
                })?
            }
        };
        Ok(match input {
            ColumnarValue::Scalar(_) => {
                ColumnarValue::Scalar(datafusion::common::ScalarValue::try_from_array(&out, 0)?)
            }
            ColumnarValue::Array(_) => ColumnarValue::Array(out),
        })
    }
}

const HEX: [char; 16] = [
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', 'a', 'b', 'c', 'd', 'e', 'f',
];

fn is_text(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null
    )
}

/// Each non-null value of `array` as text (cast when it is not) through `f`; NULL stays NULL.
fn map_text(array: &ArrayRef, mut f: impl FnMut(&str, &mut StringBuilder)) -> Result<ArrayRef> {
    let text = cast(array, &DataType::Utf8)?;
    let text: &StringArray = text.as_string();
    let mut out = StringBuilder::with_capacity(text.len(), text.len() * 16);
    for value in text {
        match value {
            Some(s) => f(s, &mut out),
            None => out.append_null(),
        }
    }
    Ok(Arc::new(out.finish()))
}

/// `alice@example.com` → `a***@example.com`; text without an `@` → `***`.
pub fn mask_email(s: &str) -> String {
    match s.rsplit_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_owned(),
    }
}

/// `4111111111111234` → `****1234`; four characters or fewer → `****` (showing them would show
/// everything).
pub fn last4(s: &str) -> String {
    let count = s.chars().count();
    if count <= 4 {
        return "****".to_owned();
    }
    let tail: String = s.chars().skip(count - 4).collect();
    format!("****{tail}")
}

/// Dates and timestamps cut to the start of their day (UTC); dates are days already.
fn truncate_to_day(array: &ArrayRef) -> Result<ArrayRef> {
    const DAY_MS: i64 = 86_400_000;
    let day = |per_day: i64| move |v: i64| v.div_euclid(per_day) * per_day;
    Ok(match array.data_type() {
        DataType::Date32 | DataType::Null => array.clone(),
        DataType::Date64 => {
            let a: &Date64Array = array.as_primitive();
            Arc::new(a.unary::<_, arrow::datatypes::Date64Type>(day(DAY_MS)))
        }
        DataType::Timestamp(unit, zone) => {
            // `unary` drops the zone; it is put back.
            let truncated: ArrayRef = match unit {
                TimeUnit::Second => {
                    let a: &TimestampSecondArray = array.as_primitive();
                    Arc::new(a.unary::<_, arrow::datatypes::TimestampSecondType>(day(86_400)))
                        as ArrayRef
                }
                TimeUnit::Millisecond => {
                    let a: &TimestampMillisecondArray = array.as_primitive();
                    Arc::new(a.unary::<_, arrow::datatypes::TimestampMillisecondType>(day(DAY_MS)))
                }
                TimeUnit::Microsecond => {
                    let a: &TimestampMicrosecondArray = array.as_primitive();
                    Arc::new(
                        a.unary::<_, arrow::datatypes::TimestampMicrosecondType>(
                            day(DAY_MS * 1000),
                        ),
                    )
                }
                TimeUnit::Nanosecond => {
                    let a: &TimestampNanosecondArray = array.as_primitive();
                    Arc::new(a.unary::<_, arrow::datatypes::TimestampNanosecondType>(day(
                        DAY_MS * 1_000_000
                    )))
                }
            };
            with_zone(&truncated, zone.clone())?
        }
        other => return exec_err!("truncate_date() takes a date or a timestamp, not {other}"),
    })
}

/// `array` (timestamps) with its zone replaced by `zone`; the values are unchanged.
pub(crate) fn with_zone(array: &ArrayRef, zone: Option<Arc<str>>) -> Result<ArrayRef> {
    let DataType::Timestamp(unit, _) = array.data_type() else {
        return Ok(array.clone());
    };
    let data = array
        .to_data()
        .into_builder()
        .data_type(DataType::Timestamp(*unit, zone))
        .build()?;
    Ok(arrow::array::make_array(data))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_hide_all_but_what_they_promise() {
        assert_eq!(mask_email("alice@example.com"), "a***@example.com");
        assert_eq!(mask_email("no-at-sign"), "***");
        assert_eq!(mask_email("@x.org"), "***@x.org");
        assert_eq!(last4("4111111111111234"), "****1234");
        assert_eq!(last4("1234"), "****");
        assert_eq!(last4("ñandú-ñandú"), "****andú");
    }
}
