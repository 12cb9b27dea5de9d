//! Statements as kappa takes them: read-only (writes get SQLSTATE 25006), engine settings
//! refused, errors mapped to Postgres SQLSTATEs.

use std::sync::Arc;

use datafusion::catalog::CatalogProvider;
use datafusion_postgres::DfSessionService;
use datafusion_postgres::pgwire::api::Type;
use datafusion_postgres::pgwire::api::portal::Format;
use datafusion_postgres::pgwire::api::portal::Portal;
use datafusion_postgres::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use datafusion_postgres::pgwire::api::results::{FieldInfo, Response};
use datafusion_postgres::pgwire::api::stmt::QueryParser;
use datafusion_postgres::pgwire::api::store::PortalStore;
use datafusion_postgres::pgwire::api::{ClientInfo, ClientPortalStore, ErrorHandler};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::PgWireBackendMessage;
use futures::Sink;

use super::catalog::{CHANGED_RESULT_TYPE, LiveCatalog};
use super::limits::Limited;
use crate::config::QueryLimits;

/// Refuses what a client may not do through the engine: change its settings (`SET` or `RESET`
/// of `datafusion.…` — they include the memory pool and the spill directory, which are the
/// server's) and write files (`COPY … TO`). Read on the text with quotes and comments removed,
/// statement by statement, so that `SET "datafusion".runtime…` or a statement after one the
/// parser does not know cannot slip by. `SET statement_timeout` and the like pass.
pub(super) fn refuse_engine_settings(query: &str) -> PgWireResult<()> {
    for statement in normalized_statements(query) {
        let words: Vec<&str> = statement.split_whitespace().collect();
        let setting = match words.as_slice() {
            ["set" | "reset", "session" | "local", rest @ ..] | ["set" | "reset", rest @ ..] => {
                // The name up to `=` or `to`, its parts joined as the engine joins them.
                let name: String = rest
                    .iter()
                    .take_while(|w| **w != "to" && !w.starts_with('='))
                    .flat_map(|w| w.split('='))
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                Some(name)
            }
            _ => None,
        };
        let refused = match (setting, words.first()) {
            (Some(name), _) if name.starts_with("datafusion") => Some(
                "the engine's settings are the server's (the per-query limits are [server] \
                 query_timeout and query_memory in kappa.toml)",
            ),
            (_, Some(&"copy")) => Some("the endpoint is read-only: COPY is refused"),
            _ => None,
        };
        if let Some(why) = refused {
            return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".into(),
                "42501".into(),
                format!("`{statement}`: {why}"),
            ))));
        }
        // Writes get the one error Postgres gives them on a read-only transaction, whatever
        // the engine would have said (a missing table, an unsupported statement).
        if let Some(write) = words.first().filter(|w| WRITES.contains(w)) {
            return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".into(),
                "25006".into(),
                format!(
                    "cannot execute {} in a read-only transaction: the endpoint serves the \
                     tables kappa's models write, and clients only read them",
                    write.to_uppercase()
                ),
            ))));
        }
    }
    Ok(())
}

/// The first words of statements that write: refused as read-only (SQLSTATE 25006).
pub(super) const WRITES: &[&str] = &[
    "insert", "update", "delete", "merge", "upsert", "create", "drop", "alter", "truncate",
    "grant", "revoke", "vacuum",
];

/// The statements of `query`, lowercased, without comments and double quotes, and with the
/// spaces around dots removed (`datafusion . runtime` is one name); split at semicolons.
pub(super) fn normalized_statements(query: &str) -> Vec<String> {
    let mut text = String::with_capacity(query.len());
    let mut chars = query.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('-', Some('-')) => {
                // A line comment.
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                text.push(' ');
            }
            ('/', Some('*')) => {
                chars.next();
                let mut last = ' ';
                for c in chars.by_ref() {
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
                text.push(' ');
            }
            ('"', _) => {}
            _ => text.extend(c.to_lowercase()),
        }
    }
    let mut joined = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !joined.is_empty() && !joined.ends_with('.') && !word.starts_with('.') {
            joined.push(' ');
        }
        joined.push_str(word);
    }
    joined
        .split(';')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

#[async_trait::async_trait]
impl SimpleQueryHandler for Limited {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        refuse_engine_settings(query)?;
        let bounds = self.start(client);
        let mut responses = bounds
            .plan(SimpleQueryHandler::do_query(&self.inner, client, query))
            .await?;
        // A single query's `numeric(p, s)` columns say their precision and scale.
        if let [Response::Query(response)] = responses.as_mut_slice()
            && response
                .row_schema
                .iter()
                .any(|f| *f.datatype() == Type::NUMERIC)
            && let Ok(plan) = self.ctx.state().create_logical_plan(query).await
        {
            response.row_schema =
                Arc::new(with_typmods(&response.row_schema, plan.schema().as_arrow()));
        }
        // Every statement of the string streams within the same bounds.
        Ok(responses.into_iter().map(|r| bounds.stream(r)).collect())
    }
}

#[async_trait::async_trait]
impl ExtendedQueryHandler for Limited {
    type Statement = <DfSessionService as ExtendedQueryHandler>::Statement;
    type QueryParser = TypedParser;

    /// Asked for as a statement is parsed (planned), which is the start of a query too: the
    /// connection's catalog is pinned to the endpoint's state first.
    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.pinned.pin(&self.live);
        Arc::new(TypedParser(self.inner.query_parser()))
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        refuse_engine_settings(&portal.statement.statement.0)?;
        let bounds = self.start(client);
        let mut response = bounds
            .plan(ExtendedQueryHandler::do_query(
                &self.inner,
                client,
                portal,
                max_rows,
            ))
            .await?;
        if let (Response::Query(response), (_, Some((_, plan)))) =
            (&mut response, &portal.statement.statement)
        {
            response.row_schema =
                Arc::new(with_typmods(&response.row_schema, plan.schema().as_arrow()));
        }
        Ok(bounds.stream(response))
    }
}

/// datafusion-postgres's parser, whose result schemas (a statement's or portal's Describe)
/// carry the type modifiers of `numeric(p, s)` columns.
pub(super) struct TypedParser(Arc<<DfSessionService as ExtendedQueryHandler>::QueryParser>);

#[async_trait::async_trait]
impl QueryParser for TypedParser {
    type Statement = <DfSessionService as ExtendedQueryHandler>::Statement;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Self::Statement>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        self.0.parse_sql(client, sql, types).await
    }

    fn get_parameter_types(&self, statement: &Self::Statement) -> PgWireResult<Vec<Type>> {
        self.0.get_parameter_types(statement)
    }

    fn get_result_schema(
        &self,
        statement: &Self::Statement,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        let fields = self.0.get_result_schema(statement, format)?;
        Ok(match statement {
            (_, Some((_, plan))) => with_typmods(&fields, plan.schema().as_arrow()),
            (_, None) => fields,
        })
    }
}

/// `fields` (a RowDescription) with the type modifier Postgres gives each column of `schema`
/// that has one (`numeric(p, s)`), as `pg_attribute.atttypmod` says it: JDBC's
/// `getPrecision`/`getScale` and psycopg's `description` read it from here.
pub(super) fn with_typmods(
    fields: &[FieldInfo],
    schema: &arrow::datatypes::Schema,
) -> Vec<FieldInfo> {
    fields
        .iter()
        .enumerate()
        .map(|(i, field)| {
            let typmod = schema
                .fields()
                .get(i)
                .map_or(-1, |f| crate::pg_types::pg_type(f.data_type()).typmod);
            match typmod {
                -1 => field.clone(),
                typmod => field.clone().with_type_modifier(typmod),
            }
        })
        .collect()
}

/// Gives DataFusion's errors (all `XX000`, internal error, as they come) the SQLSTATE a
/// Postgres client expects, so that drivers and BI tools can tell a typo from a crash; a query
/// over its memory is told which limit it hit.
pub(super) struct SqlStates {
    pub(super) limits: QueryLimits,
    /// The tables a "table not found" names candidates from.
    pub(super) live: Arc<LiveCatalog>,
}

impl ErrorHandler for SqlStates {
    fn on_error<C: ClientInfo>(&self, _client: &C, error: &mut PgWireError) {
        if let PgWireError::ApiError(e) = error {
            let message = e.to_string();
            *error = PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".into(),
                "XX000".into(),
                message,
            )));
        }
        if let PgWireError::UserError(info) = error
            && info.code == "XX000"
        {
            info.code = sqlstate(&info.message).to_owned();
            info.message =
                crate::isolated::with_memory_hint(std::mem::take(&mut info.message), &self.limits);
            if info.code == "42P01" {
                let tables: Vec<(String, String)> = self
                    .live
                    .schema_names()
                    .into_iter()
                    .filter_map(|schema| Some((self.live.schema(&schema)?, schema)))
                    .flat_map(|(provider, schema)| {
                        provider
                            .table_names()
                            .into_iter()
                            .map(move |table| (schema.clone(), table))
                    })
                    .collect();
                info.message = crate::service::name_candidates(
                    std::mem::take(&mut info.message),
                    tables.into_iter(),
                );
            }
        }
    }
}

/// The SQLSTATE of a DataFusion error message.
pub(super) fn sqlstate(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    let has = |s: &str| m.contains(s);
    if has(CHANGED_RESULT_TYPE) {
        "0A000" // feature_not_supported, as Postgres answers it
    } else if has("no field named") || has("column") && has("not found") {
        "42703" // undefined_column
    } else if has("table") && has("not found") {
        "42P01" // undefined_table
    } else if has("parser error") || has("syntax") {
        "42601" // syntax_error
    } else if has("invalid function") || has("function") && has("not found") {
        "42883" // undefined_function
    } else if has("divide by zero") || has("division by zero") {
        "22012" // division_by_zero
    } else if has("cast") || has("cannot parse") {
        "22P02" // invalid_text_representation
    } else if has("placeholder") {
        "22023" // invalid_parameter_value
    } else if has("resources exhausted") {
        "53200" // out_of_memory
    } else if has("cancel") {
        "57014" // query_canceled
    } else if has("not implemented") || has("unsupported") {
        "0A000" // feature_not_supported
    } else {
        "XX000"
    }
}
