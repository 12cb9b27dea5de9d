//! What a model's SQL reads, found by parsing it (sqlparser, DataFusion's parser).

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{ObjectName, ObjectNamePart, Query, Statement, Visit, Visitor};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

use crate::diagnostic::Diagnostic;

/// A table named in a FROM or JOIN, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Name parts, unquoted ones lowercased (as SQL folds them).
    pub parts: Vec<String>,
    /// Where the name starts in the file, 1-based.
    pub line_column: (usize, usize),
}

/// A model file's one SELECT, as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedModel {
    /// The tables it reads (common table expressions excluded).
    pub relations: Vec<Relation>,
    /// Its SELECT, or the one query it selects from, has a GROUP BY or DISTINCT.
    pub groups: bool,
    /// It calls a window function over time (`date_bin`, `date_trunc`, `hop`) anywhere: a
    /// window may be keyed by position, alias or a subquery's column, so any call makes a
    /// GROUP BY windowed, as far as the SQL alone tells.
    pub calls_window: bool,
}

/// Parses a model file, which must hold exactly one SELECT: the tables it reads and whether it
/// groups. Problems go to `diagnostics`.
pub fn parse_model(
    file: &str,
    sql: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<ParsedModel> {
    let statements = match Parser::parse_sql(&GenericDialect {}, sql) {
        Ok(statements) => statements,
        Err(e) => {
            diagnostics.push(parse_error(file, &e.to_string()));
            return None;
        }
    };
    let query = match statements.as_slice() {
        [Statement::Query(query)] => query,
        [] => {
            diagnostics.push(Diagnostic::in_file(
                file,
                "the model is empty: write one SELECT",
            ));
            return None;
        }
        [_] => {
            diagnostics.push(Diagnostic::in_file(
                file,
                "a model is one SELECT (a query); other statements are not models",
            ));
            return None;
        }
        _ => {
            diagnostics.push(Diagnostic::in_file(
                file,
                format!(
                    "a model is one SELECT, this file has {} statements",
                    statements.len()
                ),
            ));
            return None;
        }
    };
    let mut names = CteNames::default();
    let _ = query.visit(&mut names);
    let mut found = Vec::new();
    let _ = sqlparser::ast::visit_relations(query, |name: &ObjectName| {
        let relation = relation_of(name);
        let is_cte = matches!(relation.parts.as_slice(), [single] if names.0.contains(single));
        if !is_cte {
            found.push(relation);
        }
        ControlFlow::<()>::Continue(())
    });
    Some(ParsedModel {
        relations: found,
        groups: query_groups(query),
        calls_window: calls_window(query),
    })
}

/// Whether the SELECT of `query`, or the one query it selects from, groups.
fn query_groups(query: &Query) -> bool {
    use sqlparser::ast::{Distinct, GroupByExpr, SetExpr, TableFactor};
    let SetExpr::Select(select) = query.body.as_ref() else {
        return false;
    };
    let grouped = match &select.group_by {
        GroupByExpr::Expressions(keys, _) => !keys.is_empty(),
        GroupByExpr::All(_) => true,
    };
    if grouped || matches!(select.distinct, Some(Distinct::Distinct)) {
        return true;
    }
    // Row-by-row steps over one grouped subquery.
    match select.from.as_slice() {
        [from] if from.joins.is_empty() => {
            matches!(&from.relation, TableFactor::Derived { subquery, .. } if query_groups(subquery))
        }
        _ => false,
    }
}

/// Whether `query` calls a window function over time anywhere.
fn calls_window(query: &Query) -> bool {
    let mut found = false;
    let _ = sqlparser::ast::visit_expressions(query, |e| {
        if let sqlparser::ast::Expr::Function(f) = e {
            let name = f.name.to_string().to_lowercase();
            found |= matches!(name.as_str(), "date_bin" | "date_trunc" | "hop" | "tumble");
        }
        ControlFlow::<()>::Continue(())
    });
    found
}

fn relation_of(name: &ObjectName) -> Relation {
    let mut line_column = (1, 1);
    let parts = name
        .0
        .iter()
        .enumerate()
        .map(|(i, part)| match part {
            ObjectNamePart::Identifier(ident) => {
                if i == 0 {
                    let start = ident.span.start;
                    line_column = (start.line.max(1) as usize, start.column.max(1) as usize);
                }
                if ident.quote_style.is_some() {
                    ident.value.clone()
                } else {
                    ident.value.to_lowercase()
                }
            }
            other => other.to_string(),
        })
        .collect();
    Relation { parts, line_column }
}

/// Names of every common table expression in a query, nested ones included.
#[derive(Debug, Default)]
struct CteNames(BTreeSet<String>);

impl Visitor for CteNames {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.0.insert(cte.alias.name.value.to_lowercase());
            }
        }
        ControlFlow::Continue(())
    }
}

/// A parser message "… at Line: 3, Column: 14" as a located diagnostic.
fn parse_error(file: &str, message: &str) -> Diagnostic {
    let message = message
        .strip_prefix("sql parser error: ")
        .unwrap_or(message);
    let (text, location) = match message.rsplit_once(" at Line: ") {
        Some((text, location)) => (text, Some(location)),
        None => (message, None),
    };
    let (line, column) = location
        .and_then(|l| {
            let (line, column) = l.split_once(", Column: ")?;
            Some((line.trim().parse().ok()?, column.trim().parse().ok()?))
        })
        .unwrap_or((1, 1));
    Diagnostic {
        file: file.to_owned(),
        line,
        column,
        message: format!("SQL: {text}"),
        suggestion: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relations(file: &str, sql: &str, d: &mut Vec<Diagnostic>) -> Option<Vec<Relation>> {
        parse_model(file, sql, d).map(|p| p.relations)
    }

    fn parsed(sql: &str) -> ParsedModel {
        parse_model("m.sql", sql, &mut Vec::new()).unwrap()
    }

    /// As a model without a `materialization` is read.
    fn groups(sql: &str) -> bool {
        let p = parsed(sql);
        p.groups && !p.calls_window
    }

    /// As a model with `materialization = "upsert"` is read.
    fn groups_by_any_key(sql: &str) -> bool {
        parsed(sql).groups
    }

    fn names(sql: &str) -> Vec<String> {
        let mut d = Vec::new();
        relations("m.sql", sql, &mut d)
            .unwrap()
            .into_iter()
            .map(|r| r.parts.join("."))
            .collect()
    }

    #[test]
    fn finds_tables_but_not_ctes() {
        assert_eq!(names("SELECT * FROM orders"), vec!["orders"]);
        assert_eq!(
            names(
                "WITH x AS (SELECT * FROM Orders) SELECT * FROM x JOIN silver.customers c ON true"
            ),
            vec!["orders", "silver.customers"]
        );
        assert_eq!(
            names("SELECT (SELECT max(a) FROM gold.t) FROM \"Mixed\""),
            vec!["gold.t", "Mixed"]
        );
    }

    #[test]
    fn tells_a_grouping_model() {
        assert!(groups("SELECT a, count(*) FROM t GROUP BY a"));
        assert!(groups("SELECT DISTINCT a FROM t"));
        assert!(groups(
            "SELECT a, n * 2 AS m FROM (SELECT a, count(*) AS n FROM t GROUP BY a) WHERE n > 1"
        ));
        assert!(!groups("SELECT a FROM t"));
        assert!(!groups(
            "SELECT date_bin(INTERVAL '1 minute', ts) AS w, count(*) FROM t GROUP BY 1"
        ));
        assert!(!groups(
            "SELECT date_trunc('hour', ts) AS w, a, count(*) FROM t GROUP BY date_trunc('hour', ts), a"
        ));
        assert!(!groups(
            "SELECT date_bin(INTERVAL '1 minute', ts) AS w, count(*) FROM t GROUP BY w"
        ));
        assert!(!groups(
            "SELECT a, unnest(hop(ts, 1, 2)) AS w FROM t GROUP BY a, 2"
        ));
        assert!(!groups(
            "SELECT a FROM (SELECT a FROM t GROUP BY a) x JOIN u ON true"
        ));
        // Upserted by its configuration, a windowed key is a key like any other.
        assert!(groups_by_any_key(
            "SELECT date_trunc('hour', ts) AS h, count(*) FROM t GROUP BY 1"
        ));
        assert!(!groups_by_any_key("SELECT count(*) FROM t"));
    }

    #[test]
    fn locates_names_and_errors() {
        let mut d = Vec::new();
        let found = relations("m.sql", "SELECT a\n  FROM  orders", &mut d).unwrap();
        assert_eq!(found[0].line_column, (2, 9));
        assert!(relations("m.sql", "SELECT a FROM", &mut d).is_none());
        assert!(
            d[0].message.starts_with("SQL: Expected"),
            "{}",
            d[0].message
        );
        assert!(relations("m.sql", "SELECT 1; SELECT 2", &mut d).is_none());
        assert!(d[1].message.contains("2 statements"));
        assert!(relations("m.sql", "DELETE FROM t", &mut d).is_none());
        assert!(d[2].message.contains("one SELECT"));
    }
}
