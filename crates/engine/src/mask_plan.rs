//! A model's `[mask]` (output column → mask) applied to its plan.
//!
//! Masks are applied where a row leaves the model: a projection on top of its plan, so the
//! model's own SQL computes with the real values and its table holds only masked ones. A
//! deduplicating model keeps candidate rows in its state until the watermark passes them; the
//! masked columns that are not its key or order, and that the SQL above it only passes on, are
//! masked before the deduplication, so that state never holds their raw values either. (Group
//! keys and join buffers keep the values they are keyed on: mask a column in the model that
//! reads them, not one that groups by it.)

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder};
use kappa_pipeline::Mask;

use crate::mask::{hash_key, udf};

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

/// `plan` with `masks` applied to its output columns (see the module's notes); an error names
/// a masked column the model does not output.
pub fn mask_plan(plan: LogicalPlan, masks: &BTreeMap<String, Mask>) -> Result<LogicalPlan> {
    masked(plan, masks).map_err(|e| match e {
        DataFusionError::Configuration(reason) => DataFusionError::Configuration(reason),
        // A shape that cannot run stays what it is, reported where the SQL says it.
        e if crate::error::unsupported_reason(&e).is_some() => e,
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
    let Some(found) = crate::dedup::find_dedup(&plan).map_err(crate::error::unsupported)? else {
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
