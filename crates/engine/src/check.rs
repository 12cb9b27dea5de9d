//! Semantic checks of a project: every model planned by DataFusion against the schemas of what
//! it reads, so unknown columns, wrong types and unknown functions are found before anything
//! runs.

use std::sync::Arc;

use datafusion::catalog::MemorySchemaProvider;
use datafusion::datasource::empty::EmptyTable;
use datafusion::error::DataFusionError;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::TableReference;
use kappa_pipeline::diagnostic::did_you_mean;
use kappa_pipeline::{Diagnostic, Project};

use crate::schema::topic_schema;

/// Plans every model in dependency order; returns what is wrong, located in its SQL file.
pub async fn check(project: &Project) -> Vec<Diagnostic> {
    let mut config = SessionConfig::new();
    config.options_mut().sql_parser.collect_spans = true;
    let ctx = SessionContext::new_with_config(config);
    crate::functions::register(&ctx);
    let mut diagnostics = Vec::new();
    for topic in project.topics.values() {
        let table = Arc::new(EmptyTable::new(topic_schema(topic)));
        if let Err(e) = ctx.register_table(TableReference::bare(topic.name.as_str()), table) {
            diagnostics.push(Diagnostic::in_file(
                &topic.file,
                format!("register topic: {e}"),
            ));
        }
    }
    let lakehouse = &project.config.lakehouse;
    if let Err(problem) = kappa_lakehouse::WarehouseConfig::from_section(
        lakehouse.catalog.as_deref(),
        lakehouse.uri.clone(),
        lakehouse.warehouse.clone(),
        lakehouse.properties.clone(),
    ) {
        diagnostics.push(Diagnostic::in_file(
            "kappa.toml",
            format!("[lakehouse]: {problem}"),
        ));
    }
    let catalog = ctx.catalog("datafusion");
    for model in &project.order {
        let model = &project.models[model];
        if let Some(catalog) = &catalog
            && catalog.schema(&model.layer).is_none()
        {
            let _ = catalog.register_schema(&model.layer, Arc::new(MemorySchemaProvider::new()));
        }
        match ctx.state().create_logical_plan(&model.sql).await {
            Ok(plan) => {
                // Valid SQL; can the engine run it incrementally?
                // Over one upserted table, any SQL runs: refreshed from it (`refresh.rs`).
                let refreshed = crate::upstream::refresh_plan(project, &model.id())
                    .await
                    .map(|(_, planned)| planned);
                let planned = match refreshed {
                    Some(Ok(())) => Ok(()),
                    Some(Err(e)) => Err(e),
                    None => crate::plan::plan_model(project, &model.id())
                        .await
                        .map(|_| ()),
                };
                match planned {
                    Err(e) if crate::error::unsupported_reason(&e).is_some() => {
                        let reason = crate::error::unsupported_reason(&e).unwrap_or_default();
                        let (line, column) = locate_construct(&model.sql, &reason);
                        diagnostics.push(Diagnostic {
                            file: model.file.clone(),
                            line,
                            column,
                            message: format!("not incremental: {reason}"),
                            suggestion: None,
                        });
                    }
                    Err(DataFusionError::Configuration(reason)) => {
                        diagnostics.push(Diagnostic::in_file(
                            &model.file.replace(".sql", ".toml"),
                            reason,
                        ));
                    }
                    _ => {}
                }
                // What readers of the model see: its masked columns (a problem with them was
                // reported above, through plan_model).
                let plan =
                    crate::mask_plan::mask_plan(plan.clone(), &model.config.mask).unwrap_or(plan);
                let schema = Arc::new(plan.schema().as_arrow().clone());
                let stored = crate::stateless::storable_schema(&schema);
                for field in stored.fields() {
                    if kappa_lakehouse::Lakehouse::unstorable(field).is_some() {
                        let (line, column) =
                            find_word(&model.sql, &format!("`{}`", field.name())).unwrap_or((1, 1));
                        diagnostics.push(Diagnostic {
                            file: model.file.clone(),
                            line,
                            column,
                            message: format!(
                                "column `{}` is of type {}, which an Iceberg table cannot store",
                                field.name(),
                                field.data_type()
                            ),
                            suggestion: Some(
                                "make it a number, e.g. date_part('epoch', p.ts) - \
                                 date_part('epoch', o.ts) for seconds, or a string"
                                    .into(),
                            ),
                        });
                    }
                }
                if let Some(why) =
                    kappa_lakehouse::partition_problem(&stored, &model.config.partition_by)
                {
                    diagnostics.push(Diagnostic::in_file(
                        &model.file.replace(".sql", ".toml"),
                        why,
                    ));
                }
                // A dimension's readers see the columns it adds (versions, surrogate key).
                let schema = match project.is_dimension(&model.id()) {
                    false => schema,
                    true => match crate::scd::ScdSpec::new(model, stored.clone()) {
                        Ok(spec) => spec.output_schema().clone(),
                        Err(e) => {
                            let reason = match e {
                                DataFusionError::Configuration(reason) => reason,
                                other => other.to_string(),
                            };
                            diagnostics.push(Diagnostic::in_file(
                                &model.file.replace(".sql", ".toml"),
                                reason,
                            ));
                            schema
                        }
                    },
                };
                let name = TableReference::partial(model.layer.as_str(), model.name.as_str());
                if let Err(e) = ctx.register_table(name, Arc::new(EmptyTable::new(schema))) {
                    diagnostics.push(Diagnostic::in_file(
                        &model.file,
                        format!("register model: {e}"),
                    ));
                }
            }
            Err(e) => diagnostics.push(locate(&model.file, &model.sql, &e)),
        }
    }
    diagnostics
}

/// A DataFusion planning error as a diagnostic at its place in the SQL.
fn locate(file: &str, sql: &str, error: &DataFusionError) -> Diagnostic {
    let (line, column) = error
        .diagnostic()
        .and_then(|d| d.span)
        .map(|span| {
            (
                span.start.line.max(1) as usize,
                span.start.column.max(1) as usize,
            )
        })
        .unwrap_or((1, 1));
    let root = error.find_root();
    let (message, suggestion) = match root {
        DataFusionError::SchemaError(e, _) => match e.as_ref() {
            datafusion::common::SchemaError::FieldNotFound {
                field,
                valid_fields,
            } => {
                let names: Vec<&str> = valid_fields.iter().map(|c| c.name.as_str()).collect();
                let mut unique = names.clone();
                unique.sort_unstable();
                unique.dedup();
                (
                    format!(
                        "no column `{}`; columns are: {}",
                        field.name,
                        unique.join(", ")
                    ),
                    did_you_mean(&field.name, names.iter().copied()),
                )
            }
            other => (other.to_string(), None),
        },
        other => (clean(&other.strip_backtrace()), None),
    };
    let (line, column) = if (line, column) == (1, 1) {
        find_word(sql, &message).unwrap_or((1, 1))
    } else {
        (line, column)
    };
    Diagnostic {
        file: file.to_owned(),
        line,
        column,
        message,
        suggestion,
    }
}

/// Where the construct a shape error names starts in the SQL (its keyword), else 1:1.
fn locate_construct(sql: &str, reason: &str) -> (usize, usize) {
    const KEYWORDS: &[(&str, &str)] = &[
        ("ORDER BY", "order by"),
        ("LIMIT", "limit"),
        ("window functions", " over"),
        ("two streams", "join"),
        ("join would", "join"),
        ("UNION", "union"),
        ("ROLLUP", "group by"),
        ("DISTINCT", "distinct"),
        ("subquery", "(select"),
        ("GROUP BY", "group by"),
        ("reads only tables", "from"),
    ];
    let lower = sql.to_lowercase();
    let named = reason
        .strip_prefix("aggregate `")
        .and_then(|r| r.split('`').next())
        .map(|f| format!("{f}("));
    let read = reason
        .strip_prefix("reads ")
        .and_then(|r| r.split(',').next())
        .map(str::to_lowercase);
    let found = named.or(read).and_then(|f| lower.find(&f)).or_else(|| {
        KEYWORDS
            .iter()
            .filter(|(needle, _)| reason.contains(needle))
            .find_map(|(_, keyword)| lower.find(keyword))
            .map(|at| at + usize::from(lower[at..].starts_with([' ', '('])))
    });
    found.map_or((1, 1), |at| {
        kappa_pipeline::diagnostic::line_column(sql, at)
    })
}

/// DataFusion's messages start with the error kind ("Error during planning: "); keep the point.
fn clean(message: &str) -> String {
    let message = message.lines().next().unwrap_or(message);
    for prefix in [
        "Error during planning: ",
        "This feature is not implemented: ",
        "Execution error: ",
    ] {
        if let Some(rest) = message.strip_prefix(prefix) {
            return rest.to_owned();
        }
    }
    message.to_owned()
}

/// Where the first `name` in backquotes of `message` appears in `sql`, as a fallback position.
fn find_word(sql: &str, message: &str) -> Option<(usize, usize)> {
    let name = message.split('`').nth(1)?;
    let at = sql.to_lowercase().find(&name.to_lowercase())?;
    Some(kappa_pipeline::diagnostic::line_column(sql, at))
}

#[cfg(test)]
mod tests {
    use kappa_pipeline::ProjectFiles;

    use super::*;

    fn project(models: &[(&str, &str)]) -> Project {
        let mut files = ProjectFiles::new();
        files.insert("kappa.toml".into(), String::new());
        files.insert(
            "topics/orders.toml".into(),
            "[schema]\norder_id = \"bigint\"\nquantity = \"int\"\nprice = \"decimal(10,2)\"\nregion = \"string\"\nts = \"timestamp\"\n".into(),
        );
        files.insert("topics/raw.toml".into(), "partitions = 1\n".into());
        files.insert(
            "topics/payments.toml".into(),
            "[schema]\norder_id = \"bigint\"\namount = \"decimal(10,2)\"\nts = \"timestamp\"\n"
                .into(),
        );
        files.insert(
            "topics/regions.toml".into(),
            "kind = \"table\"\nkey = \"region\"\n[schema]\nregion = \"string\"\nmanager = \"string\"\n".into(),
        );
        for (path, sql) in models {
            files.insert((*path).into(), (*sql).into());
        }
        kappa_pipeline::load(&files).unwrap()
    }

    async fn report(models: &[(&str, &str)]) -> String {
        check(&project(models))
            .await
            .iter()
            .map(|d| format!("{d}\n"))
            .collect()
    }

    #[tokio::test]
    async fn columns_types_and_functions_are_checked_downstream_too() {
        let got = report(&[
            (
                "models/silver/orders.sql",
                "SELECT order_id, quantity * price AS amount, region, ts FROM orders",
            ),
            (
                "models/gold/by_region.sql",
                "SELECT region, sum(amount) AS revenue FROM silver.orders GROUP BY region",
            ),
            (
                "models/gold/bad_column.sql",
                "SELECT region,\n       sum(qty) FROM orders GROUP BY region",
            ),
            (
                "models/gold/bad_downstream.sql",
                "SELECT price FROM silver.orders",
            ),
            (
                "models/gold/bad_function.sql",
                "SELECT frobnicate(region) FROM orders",
            ),
            ("models/gold/untyped.sql", "SELECT value FROM raw"),
        ])
        .await;
        assert_eq!(
            got,
            "models/gold/bad_column.sql:2:12: no column `qty`; columns are: order_id, price, quantity, region, ts; did you mean `quantity`?\n\
             models/gold/bad_downstream.sql:1:8: no column `price`; columns are: amount, order_id, region, ts\n\
             models/gold/bad_function.sql:1:8: Invalid function 'frobnicate'.\n"
        );
    }

    #[tokio::test]
    async fn dimensions_run_row_by_row_and_readers_see_their_versions() {
        let got = report(&[
            (
                "models/gold/regions.sql",
                "SELECT region, upper(region) AS label, ts FROM orders",
            ),
            (
                "models/gold/regions.toml",
                "materialization = \"scd2\"\nkey = [\"region\"]\nupdated_at = \"ts\"\n",
            ),
            (
                "models/gold/sales.sql",
                "SELECT o.order_id, r.regions_key, r.label FROM orders o JOIN gold.regions r \
                 ON o.region = r.region AND o.ts >= r.valid_from AND (r.valid_to IS NULL OR \
                 o.ts < r.valid_to)",
            ),
            (
                "models/gold/counts.sql",
                "SELECT region, count(*) AS n, max(ts) AS ts FROM orders GROUP BY region",
            ),
            (
                "models/gold/counts.toml",
                "materialization = \"scd1\"\nkey = [\"region\"]\n",
            ),
            (
                "models/gold/clash.sql",
                "SELECT region, ts AS valid_to FROM orders",
            ),
            (
                "models/gold/clash.toml",
                "materialization = \"scd2\"\nkey = [\"region\"]\nupdated_at = \"valid_to\"\n",
            ),
            (
                "models/gold/not_current.sql",
                "SELECT o.order_id, r.is_current FROM orders o JOIN gold.regions r ON o.region = \
                 r.region WHERE r.valid_too IS NULL",
            ),
        ])
        .await;
        expect_test::expect![[r#"
            models/gold/clash.toml:1:1: the dimension adds the column `valid_to`, which its SQL gives already; rename that column (or set surrogate_key = "…")
            models/gold/counts.sql:1:57: not incremental: a dimension (materialization = "scd1" or "scd2") is computed row by row from its topic: one row per record, which it keeps as the versions of its key; no GROUP BY, windows, deduplication or join of two streams (lookups of other dimensions are fine)
            models/gold/not_current.sql:1:96: no column `valid_too`; columns are: is_current, label, order_id, price, quantity, region, regions_key, ts, valid_from, valid_to; did you mean `valid_to`?
        "#]]
        .assert_eq(&got);
    }

    /// A stream looks a GROUP BY up (and a rollup of one), with the GROUP BY's columns; one
    /// whose rows come from a join of two streams is refused, naming why.
    #[tokio::test]
    async fn a_stream_looks_up_a_group_by_of_one_topic() {
        let got = report(&[
            (
                "models/gold/per_order.sql",
                "SELECT order_id, count(*) AS n, sum(quantity) AS q FROM orders GROUP BY order_id",
            ),
            (
                "models/gold/rollup.sql",
                "SELECT n, count(*) AS orders FROM gold.per_order GROUP BY n",
            ),
            (
                "models/gold/looked_up.sql",
                "SELECT p.order_id, g.q, r.orders FROM payments p \
                 JOIN gold.per_order g ON p.order_id = g.order_id \
                 LEFT JOIN gold.rollup r ON g.n = r.n",
            ),
            (
                "models/gold/paid.sql",
                "SELECT o.order_id, p.amount FROM orders o JOIN payments p \
                 ON p.order_id = o.order_id AND p.ts BETWEEN o.ts AND o.ts + INTERVAL '1 hour'",
            ),
            (
                "models/gold/paid_count.sql",
                "SELECT order_id, count(*) AS n FROM gold.paid GROUP BY order_id",
            ),
            (
                "models/gold/over_a_join.sql",
                "SELECT o.order_id, c.n FROM orders o JOIN gold.paid_count c \
                 ON o.order_id = c.order_id",
            ),
        ])
        .await;
        expect_test::expect![[r#"
            models/gold/over_a_join.sql:1:38: not incremental: gold.paid_count is looked up, but its rows come from a join of two streams: a stream looks up a GROUP BY of one topic, so that it can wait until the GROUP BY covers that topic's end
        "#]].assert_eq(&got);
    }

    #[tokio::test]
    async fn masks_name_output_columns_of_a_fitting_type_and_readers_see_masked_types() {
        let got = report(&[
            (
                "models/silver/orders.sql",
                "SELECT order_id, quantity, region, ts FROM orders",
            ),
            (
                "models/silver/orders.toml",
                "[mask]\norder_id = \"hash\"\nts = \"truncate_date\"\n",
            ),
            (
                "models/gold/by_order.sql",
                "SELECT sum(order_id) AS n FROM silver.orders",
            ),
            ("models/silver/typo.sql", "SELECT region FROM orders"),
            ("models/silver/typo.toml", "[mask]\nregoin = \"redact\"\n"),
            ("models/silver/email.sql", "SELECT quantity FROM orders"),
            (
                "models/silver/email.toml",
                "[mask]\nquantity = \"mask_email\"\n",
            ),
            (
                "models/gold/per_region.sql",
                "SELECT region, count(*) AS n FROM orders GROUP BY region",
            ),
            (
                "models/gold/per_region.toml",
                "[[expect]]\nrange = { column = \"n\", max = 5 }\nseverity = \"drop\"\n",
            ),
        ])
        .await;
        expect_test::expect![[r#"
            models/gold/by_order.sql:1:1: Internal error: Function 'sum' failed to match any signature, errors: Error during planning: Function 'sum' requires TypeSignatureClass::Decimal, but received String (DataType: Utf8).,Error during planning: Function 'sum' requires TypeSignatureClass::Native(LogicalType(Native(UInt64), UInt64)), but received String (DataType: Utf8).,Error during planning: Function 'sum' requires TypeSignatureClass::Native(LogicalType(Native(Int64), Int64)), but received String (DataType: Utf8).,Error during planning: Function 'sum' requires TypeSignatureClass::Native(LogicalType(Native(Float64), Float64)), but received String (DataType: Utf8).,Error during planning: Function 'sum' requires TypeSignatureClass::Duration, but received String (DataType: Utf8)..
            models/gold/per_region.toml:1:1: expectation `range_n`: severity "drop" sets rows aside as the model writes them, which a model that updates its rows (a GROUP BY or windows) does not do; use "warn" or "fail", or drop the rows in the model that reads the topic
            models/silver/email.toml:1:1: [mask]: mask_email() takes text, not Int32
            models/silver/typo.toml:1:1: [mask] names `regoin`, which the model does not output; its columns are region
        "#]].assert_eq(&got);
    }

    #[tokio::test]
    async fn what_cannot_run_incrementally_is_refused_with_the_nearest_form() {
        let got = report(&[
            (
                "models/silver/orders.sql",
                "SELECT order_id, quantity * price AS amount, region, ts FROM orders",
            ),
            (
                "models/gold/sorted.sql",
                "SELECT region, amount\nFROM silver.orders\nORDER BY amount",
            ),
            (
                "models/gold/ranked.sql",
                "SELECT region, rank() OVER (ORDER BY amount) AS r FROM silver.orders",
            ),
            (
                "models/silver/numbered.sql",
                "SELECT order_id, ROW_NUMBER() OVER (PARTITION BY order_id ORDER BY ts) AS rn FROM orders",
            ),
            (
                "models/gold/both.sql",
                "SELECT o.region FROM orders o JOIN raw r ON o.region = r.value",
            ),
            (
                "models/gold/paid.sql",
                "SELECT o.order_id, p.amount FROM orders o JOIN payments p\n\
                 ON p.order_id = o.order_id AND p.ts BETWEEN o.ts AND o.ts + INTERVAL '1 hour'",
            ),
            (
                "models/gold/paid_per_region.sql",
                "SELECT o.region, count(*) AS n FROM orders o JOIN payments p ON \
                 p.order_id = o.order_id AND o.ts <= p.ts AND p.ts < o.ts + INTERVAL '1 day' \
                 GROUP BY o.region",
            ),
            (
                "models/gold/waits.sql",
                "SELECT o.order_id,\n       p.ts - o.ts AS waited FROM orders o JOIN payments p\n\
                 ON p.order_id = o.order_id AND p.ts BETWEEN o.ts AND o.ts + INTERVAL '1 hour'",
            ),
            (
                "models/gold/unbounded.sql",
                "SELECT o.order_id, p.amount FROM orders o\nJOIN payments p ON p.order_id = o.order_id",
            ),
            (
                "models/gold/partitioned.sql",
                "SELECT order_id, region, ts FROM orders",
            ),
            (
                "models/gold/partitioned.toml",
                "partition_by = [\"region\", \"week(ts)\"]\n",
            ),
            (
                "models/gold/same_day.sql",
                "SELECT o.order_id, p.amount FROM orders o\nJOIN payments p ON p.order_id = o.order_id \
                 AND CAST(p.ts AS DATE) BETWEEN CAST(o.ts AS DATE) AND CAST(o.ts AS DATE) + 1",
            ),
            (
                "models/gold/unpaid.sql",
                "SELECT o.order_id, p.amount FROM orders o LEFT JOIN payments p\n\
                 ON p.order_id = o.order_id AND p.ts BETWEEN o.ts AND o.ts + INTERVAL '1 hour'",
            ),
            (
                "models/gold/looked_up.sql",
                "SELECT o.order_id, r.manager FROM silver.orders o LEFT JOIN regions r \
                 ON o.region = r.region",
            ),
            (
                "models/gold/every_region.sql",
                "SELECT o.order_id, r.manager FROM silver.orders o\nRIGHT JOIN regions r \
                 ON o.region = r.region",
            ),
            (
                "models/gold/median.sql",
                "SELECT region, median(amount) FROM silver.orders GROUP BY region",
            ),
            (
                "models/gold/totals.sql",
                "SELECT region, sum(amount) AS revenue FROM silver.orders GROUP BY region",
            ),
            (
                // Reads only a GROUP BY model: refreshed from its table, no diagnostic.
                "models/gold/twice.sql",
                "SELECT count(*) AS regions FROM gold.totals",
            ),
            (
                // Refreshed too, but a refreshed table cannot set rows aside.
                "models/gold/big_regions.sql",
                "SELECT region, revenue FROM gold.totals WHERE revenue > 0",
            ),
            (
                "models/gold/big_regions.toml",
                "[[expect]]\nname = \"positive\"\nrange = { column = \"revenue\", min = 1 }\nseverity = \"drop\"\n",
            ),
            (
                "models/gold/appended.sql",
                "SELECT region, count(*) AS n FROM orders GROUP BY region",
            ),
            (
                "models/gold/appended.toml",
                "materialization = \"append\"\n",
            ),
            (
                "kappa.toml",
                "[lakehouse]\ncatalog = \"rest\"\nwarehouse = \"s3://lake\"\n",
            ),
            (
                "models/gold/latest.sql",
                "SELECT region, price FROM orders",
            ),
            (
                "models/gold/latest.toml",
                "materialization = \"upsert\"\nkey = [\"region\"]\n",
            ),
            (
                "models/gold/rekeyed.sql",
                "SELECT region AS r, count(*) AS n FROM orders GROUP BY region",
            ),
            ("models/gold/rekeyed.toml", "key = [\"n\"]\n"),
            (
                "models/gold/keyed.sql",
                "SELECT upper(region) AS r, count(*) AS n FROM orders GROUP BY upper(region)",
            ),
            ("models/gold/keyed.toml", "key = [\"r\"]\n"),
            (
                "models/gold/untimed.sql",
                "SELECT region, count(*) AS n FROM orders GROUP BY region",
            ),
            ("models/gold/untimed.toml", "event_time = \"region\"\n"),
            (
                "models/gold/per_minute.sql",
                "SELECT date_bin(INTERVAL '1 minute', ts) AS w, count(*) AS n FROM orders \
                 GROUP BY date_bin(INTERVAL '1 minute', ts)",
            ),
            (
                "models/gold/per_minute.toml",
                "event_time = \"ts\"\nwatermark = \"5s\"\n",
            ),
        ])
        .await;
        expect_test::expect![[r#"
            kappa.toml:1:1: [lakehouse]: catalog = "rest" needs the catalog's `uri`
            models/gold/appended.sql:1:42: not incremental: materialization = "append", but a GROUP BY without a window over the event time updates its rows; use "upsert", or group by a window such as date_bin(INTERVAL '1 minute', <event_time>)
            models/gold/big_regions.toml:1:1: expectation `positive` has severity = "drop", which sets rows aside as a model appends them; gold.big_regions is refreshed whole from gold.totals's table at each of its commits: use "fail" or "warn", or leave the rows out in its SQL
            models/gold/both.sql:1:31: not incremental: joining two streams needs a time bound in its ON clause that keeps the state finite, such as ON p.order_id = o.id AND p.ts BETWEEN o.ts AND o.ts + INTERVAL '1 hour'; or declare the side that holds the current state of something as kind = "table" in its topics/<name>.toml, and it becomes a dimension looked up by each event
            models/gold/every_region.sql:2:7: not incremental: a right join would produce rows of the dimension that no event looked up; use JOIN or LEFT JOIN from the stream to the dimension; a model runs row by row (projections, filters) or as one GROUP BY
            models/gold/latest.toml:1:1: materialization = "upsert" (or a `key`), but the model has no GROUP BY: its rows are appended as they come, so nothing would replace them; group by the key (GROUP BY k with the aggregates you need), or declare the topic kind = "table" and join it to get the latest row per key
            models/gold/median.sql:1:16: not incremental: aggregate `median` is not incremental; supported: count, sum, min, max, avg, mean, bool_and, bool_or
            models/gold/partitioned.toml:1:1: partition_by `week(ts)`: expected a column, year(c), month(c), day(c), hour(c), bucket(N, c) or truncate(N, c)
            models/gold/ranked.sql:1:23: not incremental: window functions (OVER …) are not incremental; for running totals use GROUP BY; a model runs row by row (projections, filters) or as one GROUP BY
            models/gold/rekeyed.toml:1:1: key = ["n"], but the table is keyed by its GROUP BY keys: key = ["r"]
            models/gold/same_day.sql:2:1: not incremental: joining two streams needs a time bound in its ON clause that keeps the state finite, such as ON p.order_id = o.id AND p.ts BETWEEN o.ts AND o.ts + INTERVAL '1 hour'; or declare the side that holds the current state of something as kind = "table" in its topics/<name>.toml, and it becomes a dimension looked up by each event
            models/gold/sorted.sql:3:1: not incremental: ORDER BY: a table's rows have no order; drop it and order when you query the table; a model runs row by row (projections, filters) or as one GROUP BY
            models/gold/unbounded.sql:2:1: not incremental: joining two streams needs a time bound in its ON clause that keeps the state finite, such as ON p.order_id = o.id AND p.ts BETWEEN o.ts AND o.ts + INTERVAL '1 hour'; or declare the side that holds the current state of something as kind = "table" in its topics/<name>.toml, and it becomes a dimension looked up by each event
            models/gold/unpaid.sql:1:48: not incremental: a left join of two streams would have to wait until no partner can come to emit an unmatched row; that is not supported yet — use JOIN (inner) with a time bound, ON p.order_id = o.id AND p.ts BETWEEN o.ts AND o.ts + INTERVAL '1 hour'
            models/gold/untimed.toml:1:1: event_time `region` of topic `orders` is not a timestamp
            models/gold/waits.sql:2:23: column `waited` is of type Duration(µs), which an Iceberg table cannot store; make it a number, e.g. date_part('epoch', p.ts) - date_part('epoch', o.ts) for seconds, or a string
            models/silver/numbered.sql:1:59: not incremental: ROW_NUMBER() runs as a deduplication only when the same model keeps the first row of each key: SELECT … FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY <key> ORDER BY <event time>) AS rn FROM <topic>) WHERE rn = 1; a model runs row by row (projections, filters) or as one GROUP BY
        "#]]
        .assert_eq(&got);
    }
}
