//! PII masking: the SQL functions `mask_email`, `hash`, `redact`, `truncate_date` and `last4`,
//! and a model's `[mask]` (output column → mask) applied to its plan.
//!
//! Masks are applied where a row leaves the model: a projection on top of its plan, so the
//! model's own SQL computes with the real values and its table holds only masked ones. A
//! deduplicating model keeps candidate rows in its state until the watermark passes them; the
//! masked columns that are not its key or order, and that the SQL above it only passes on, are
//! masked before the deduplication, so that state never holds their raw values either. (Group keys and join buffers keep the values
//! they are keyed on: mask a column in the model that reads them, not one that groups by it.)
//!
//! `hash` is HMAC-SHA256 under a key read from the environment (the variable named by
//! `masking.secret_env` in `kappa.toml`, `KAPPA_HASH_SECRET` by default) each time it runs; the
//! key is never in the project folder or the warehouse.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use arrow::array::{
    Array, ArrayRef, AsArray, Date64Array, StringArray, StringBuilder, TimestampMicrosecondArray,
    TimestampMillisecondArray, TimestampNanosecondArray, TimestampSecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, exec_err, plan_err};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, Expr, LogicalPlan, LogicalPlanBuilder, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility,
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

fn hash_key() -> Result<Vec<u8>> {
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

/// Why `plans` cannot run here: they call `hash` and its key is not set.
pub fn missing_key<'a>(plans: impl IntoIterator<Item = &'a LogicalPlan>) -> Option<String> {
    let calls_hash = |e: &Expr| {
        e.exists(|e| Ok(matches!(e, Expr::ScalarFunction(f) if f.name() == "hash")))
            .unwrap_or(false)
    };
    let uses = plans.into_iter().any(|plan| {
        plan.exists(|node| Ok(node.expressions().iter().any(calls_hash)))
            .unwrap_or(false)
    });
    if !uses {
        return None;
    }
    hash_key().err().map(|e| {
        e.strip_backtrace()
            .trim_start_matches("Execution error: ")
            .to_owned()
    })
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

fn udf(mask: Mask) -> ScalarUDF {
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
            crate::functions::with_zone(&truncated, zone.clone())?
        }
        other => return exec_err!("truncate_date() takes a date or a timestamp, not {other}"),
    })
}

/// `plan` with `masks` applied to its output columns (see the module's notes); an error names
/// a masked column the model does not output.
pub fn mask_plan(plan: LogicalPlan, masks: &BTreeMap<String, Mask>) -> Result<LogicalPlan> {
    masked(plan, masks).map_err(|e| match e {
        DataFusionError::Configuration(reason) => DataFusionError::Configuration(reason),
        other => DataFusionError::Configuration(format!(
            "[mask]: {}",
            other
                .strip_backtrace()
                .trim_start_matches("Error during planning: ")
        )),
    })
}

fn masked(plan: LogicalPlan, masks: &BTreeMap<String, Mask>) -> Result<LogicalPlan> {
    if masks.is_empty() {
        return Ok(plan);
    }
    let outputs: Vec<&str> = plan
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    for column in masks.keys() {
        if !outputs.contains(&column.as_str()) {
            return Err(DataFusionError::Configuration(format!(
                "[mask] names `{column}`, which the model does not output; its columns are {}",
                outputs.join(", ")
            )));
        }
    }
    let (plan, early) = mask_before_dedup(plan, masks)?;
    let late: BTreeMap<String, Mask> = masks
        .iter()
        .filter(|(column, _)| !early.contains(column))
        .map(|(c, m)| (c.clone(), *m))
        .collect();
    if late.is_empty() {
        return Ok(plan);
    }
    project_masks(plan, &late)
}

/// A projection over `plan` applying `masks` to the columns of those names, keeping them.
fn project_masks(plan: LogicalPlan, masks: &BTreeMap<String, Mask>) -> Result<LogicalPlan> {
    let schema: &DFSchema = plan.schema();
    let exprs: Vec<Expr> = schema
        .iter()
        .map(|(qualifier, field)| {
            let column = Expr::Column(Column::new(qualifier.cloned(), field.name()));
            match masks.get(field.name()) {
                Some(mask) => udf(*mask)
                    .call(vec![column])
                    .alias_qualified(qualifier.cloned(), field.name()),
                None => column,
            }
        })
        .collect();
    LogicalPlanBuilder::from(plan).project(exprs)?.build()
}

/// In a deduplicating plan, masks the columns of `masks` that the row-number window neither
/// partitions nor orders by, under that window: the rows its state keeps are masked. Returns
/// the plan (schemas recomputed above the change) and the columns masked there.
fn mask_before_dedup(
    plan: LogicalPlan,
    masks: &BTreeMap<String, Mask>,
) -> Result<(LogicalPlan, Vec<String>)> {
    let Some(found) = crate::dedup::find_dedup(&plan).map_err(DataFusionError::NotImplemented)?
    else {
        return Ok((plan, Vec::new()));
    };
    let window = &found.window;
    let mut used = Vec::new();
    for expr in &window.window_expr {
        for column in expr.column_refs() {
            used.push(column.name.clone());
        }
    }
    let input_columns: Vec<&str> = window
        .input
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    // Above the window, a column masked early may only be passed on as it is: computed with
    // (`coalesce(email, alt)`, `email LIKE …`, renamed), it is masked at the output instead,
    // where the model's SQL has seen the real values.
    let target = LogicalPlan::Window(window.clone());
    let mut computed = Vec::new();
    let _ = plan.apply(|node| {
        if *node == target {
            return Ok(TreeNodeRecursion::Jump);
        }
        for expr in node.expressions() {
            let passed_on = match &expr {
                Expr::Column(_) => true,
                Expr::Alias(alias) => {
                    matches!(alias.expr.as_ref(), Expr::Column(c) if c.name == alias.name)
                }
                _ => false,
            };
            if !passed_on {
                computed.extend(expr.column_refs().into_iter().map(|c| c.name.clone()));
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    let early: BTreeMap<String, Mask> = masks
        .iter()
        .filter(|(column, _)| {
            input_columns.contains(&column.as_str())
                && !used.contains(column)
                && !computed.contains(column)
        })
        .map(|(c, m)| (c.clone(), *m))
        .collect();
    if early.is_empty() {
        return Ok((plan, Vec::new()));
    }
    let masked_input = project_masks(window.input.as_ref().clone(), &early)?;
    let plan = plan
        .transform_down(|node| {
            Ok(if node == target {
                let LogicalPlan::Window(mut w) = node else {
                    return Ok(Transformed::no(node));
                };
                w.input = Arc::new(masked_input.clone());
                Transformed::new(LogicalPlan::Window(w), true, TreeNodeRecursion::Jump)
            } else {
                Transformed::no(node)
            })
        })?
        .data
        .transform_up(|node| Ok(Transformed::yes(node.recompute_schema()?)))?
        .data;
    Ok((plan, early.into_keys().collect()))
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
