//! Finding deduplication in a plan: the `ROW_NUMBER() OVER (PARTITION BY key ORDER BY
//! event_time) = 1` pattern (`dedup/` runs it).

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, ScalarValue};
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, LogicalPlan, Operator, Window};

use crate::stateless::stateless_shape;

/// The dedup pattern found in a plan.
#[derive(Debug, Clone)]
pub struct DedupMatch {
    /// The `… WHERE rn = 1` filter: its output is the deduplicated rows.
    pub filter: LogicalPlan,
    /// The window computing the row number.
    pub window: Window,
}

/// Finds the one dedup pattern in `plan`, if any; errors when a `ROW_NUMBER` is used in
/// another way.
pub fn find_dedup(plan: &LogicalPlan) -> std::result::Result<Option<DedupMatch>, String> {
    let mut found: Vec<DedupMatch> = Vec::new();
    let _ = plan.apply(|node| {
        if let LogicalPlan::Filter(filter) = node
            && let Some(window) = row_number_filter(&filter.predicate, &filter.input)
        {
            found.push(DedupMatch {
                filter: node.clone(),
                window,
            });
            return Ok(TreeNodeRecursion::Jump);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err("a model deduplicates at most once".into()),
    }
}

/// The row-number window a `rn = 1` (or `rn <= 1`, `rn < 2`) conjunct of `predicate` tests.
fn row_number_filter(predicate: &Expr, input: &LogicalPlan) -> Option<Window> {
    let mut conjuncts = Vec::new();
    split_and(predicate, &mut conjuncts);
    conjuncts.into_iter().find_map(|c| {
        let Expr::BinaryExpr(b) = c else {
            return None;
        };
        let (column, op, value) = match (strip(&b.left), strip(&b.right)) {
            (Expr::Column(c), Expr::Literal(v, _)) => (c, b.op, v),
            (Expr::Literal(v, _), Expr::Column(c)) => (c, flip(b.op)?, v),
            _ => return None,
        };
        let first = matches!(
            (op, integer(value)?),
            (Operator::Eq, 1) | (Operator::LtEq, 1) | (Operator::Lt, 2)
        );
        if !first {
            return None;
        }
        row_number_window(column, input)
    })
}

fn split_and<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
    match e {
        Expr::BinaryExpr(b) if b.op == Operator::And => {
            split_and(&b.left, out);
            split_and(&b.right, out);
        }
        other => out.push(other),
    }
}

fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => strip(&c.expr),
        Expr::TryCast(c) => strip(&c.expr),
        Expr::Alias(a) => strip(&a.expr),
        other => other,
    }
}

fn flip(op: Operator) -> Option<Operator> {
    Some(match op {
        Operator::Eq => Operator::Eq,
        Operator::Gt => Operator::Lt,
        Operator::GtEq => Operator::LtEq,
        _ => return None,
    })
}

fn integer(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::Int8(Some(x)) => Some(i64::from(*x)),
        ScalarValue::Int16(Some(x)) => Some(i64::from(*x)),
        ScalarValue::Int32(Some(x)) => Some(i64::from(*x)),
        ScalarValue::Int64(Some(x)) => Some(*x),
        ScalarValue::UInt8(Some(x)) => Some(i64::from(*x)),
        ScalarValue::UInt16(Some(x)) => Some(i64::from(*x)),
        ScalarValue::UInt32(Some(x)) => Some(i64::from(*x)),
        ScalarValue::UInt64(Some(x)) => i64::try_from(*x).ok(),
        _ => None,
    }
}

/// Follows `column` down to a Window whose one expression is `row_number()`.
fn row_number_window(column: &Column, plan: &LogicalPlan) -> Option<Window> {
    match plan {
        LogicalPlan::Projection(p) => {
            let i = p.schema.index_of_column(column).ok()?;
            match strip(&p.expr[i]) {
                Expr::Column(c) => row_number_window(c, &p.input),
                _ => None,
            }
        }
        LogicalPlan::SubqueryAlias(a) => {
            let i = a.schema.index_of_column(column).ok()?;
            let (qualifier, field) = a.input.schema().qualified_field(i);
            row_number_window(&Column::from((qualifier, field)), &a.input)
        }
        LogicalPlan::Filter(f) => row_number_window(column, &f.input),
        LogicalPlan::Window(w) => {
            let i = w.schema.index_of_column(column).ok()?;
            let inputs = w.input.schema().fields().len();
            let Expr::WindowFunction(f) = strip(w.window_expr.get(i.checked_sub(inputs)?)?) else {
                return None;
            };
            (f.fun.name() == "row_number").then(|| w.clone())
        }
        _ => None,
    }
}

/// Checks the window of a dedup: one `row_number()`, partitioned, ordered ascending by one
/// expression over a row-by-row input. Returns the partition and order expressions.
pub(crate) fn dedup_window(window: &Window) -> std::result::Result<(Vec<Expr>, Expr), String> {
    let [expr] = window.window_expr.as_slice() else {
        return Err(
            "deduplication needs the ROW_NUMBER() alone in its SELECT; compute other \
                    window functions elsewhere"
                .into(),
        );
    };
    let Expr::WindowFunction(f) = strip(expr) else {
        return Err("not a window function".into());
    };
    let params = &f.params;
    if params.partition_by.is_empty() {
        return Err(
            "ROW_NUMBER() without PARTITION BY keeps one row in all; deduplicate with \
                    PARTITION BY the key"
                .into(),
        );
    }
    let [order] = params.order_by.as_slice() else {
        return Err("deduplication orders by the event time alone: \
                    ROW_NUMBER() OVER (PARTITION BY key ORDER BY event_time)"
            .into());
    };
    if !order.asc {
        return Err(
            "keeping the latest row per key (ORDER BY … DESC) changes rows as data \
                    arrives; only the earliest (ORDER BY event_time) is supported"
                .into(),
        );
    }
    stateless_shape(&window.input).map_err(|e| format!("below the ROW_NUMBER(): {e}"))?;
    Ok((params.partition_by.clone(), order.expr.clone()))
}

/// Replaces the dedup's filter in `plan` by `replacement`.
pub fn replace_dedup(
    plan: LogicalPlan,
    found: &DedupMatch,
    replacement: &LogicalPlan,
) -> Result<LogicalPlan> {
    crate::aggregate::replace_node(plan, &found.filter, replacement)
}
