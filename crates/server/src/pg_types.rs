//! Postgres names and OIDs for the Arrow types of kappa's tables, wherever a client asks what a
//! column is: `pg_attribute` (psql's `\d`, pgjdbc, SQLAlchemy — `format_type(atttypid,
//! atttypmod)`), `information_schema.columns` (Grafana's query builder), and `pg_typeof`.
//!
//! ```text
//!   pg_catalog (datafusion-pg-catalog) ──pg_attribute──► TypedTable: atttypid/atttypmod from
//!                                                         the table's Arrow schema
//!   information_schema (DataFusion's)  ──columns──────► TypedTable: data_type as Postgres says it
//! ```
//!
//! datafusion-pg-catalog maps types it does not know (a timestamp with a time zone) to `text`
//! and gives every column `atttypmod = -1` (a `numeric` without precision); DataFusion's
//! information_schema names Arrow's types (`Int64`, `Utf8`). BI tools then treat times as text.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Int16Array, Int32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::{CatalogProviderList, SchemaProvider, Session, TableProvider};
use datafusion::datasource::{MemTable, TableType};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::physical_plan::ExecutionPlan;

/// How Postgres describes a column of `data_type`: its type's OID, its name (as
/// `information_schema.columns.data_type` and `pg_typeof` say it), its type modifier
/// (`numeric(p,s)`: `((p << 16) | s) + 4`; otherwise -1) and its length (-1: variable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PgType {
    pub oid: i32,
    pub name: &'static str,
    pub typmod: i32,
    pub len: i16,
}

/// The Postgres type kappa's wire endpoint answers for `data_type`.
pub(crate) fn pg_type(data_type: &DataType) -> PgType {
    let fixed = |oid, name, len| PgType {
        oid,
        name,
        typmod: -1,
        len,
    };
    match data_type {
        DataType::Boolean => fixed(16, "boolean", 1),
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => fixed(21, "smallint", 2),
        DataType::Int32 | DataType::UInt16 => fixed(23, "integer", 4),
        DataType::Int64 | DataType::UInt32 => fixed(20, "bigint", 8),
        DataType::Float16 | DataType::Float32 => fixed(700, "real", 4),
        DataType::Float64 => fixed(701, "double precision", 8),
        DataType::Decimal32(p, s)
        | DataType::Decimal64(p, s)
        | DataType::Decimal128(p, s)
        | DataType::Decimal256(p, s) => PgType {
            oid: 1700,
            name: "numeric",
            typmod: ((i32::from(*p) << 16) | i32::from((*s).max(0) as u8)) + 4,
            len: -1,
        },
        DataType::UInt64 => fixed(1700, "numeric", -1),
        DataType::Date32 | DataType::Date64 => fixed(1082, "date", 4),
        DataType::Time32(_) | DataType::Time64(_) => fixed(1083, "time without time zone", 8),
        DataType::Timestamp(_, Some(_)) => fixed(1184, "timestamp with time zone", 8),
        DataType::Timestamp(_, None) => fixed(1114, "timestamp without time zone", 8),
        DataType::Interval(_) | DataType::Duration(_) => fixed(1186, "interval", 16),
        DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::FixedSizeBinary(_) => fixed(17, "bytea", -1),
        _ => fixed(25, "text", -1),
    }
}

/// The catalog list of the session a scan runs in.
fn catalogs(state: &dyn Session) -> DfResult<Arc<dyn CatalogProviderList>> {
    state
        .as_any()
        .downcast_ref::<datafusion::execution::session_state::SessionState>()
        .map(|s| s.catalog_list().clone())
        .ok_or_else(|| DataFusionError::Internal("a scan outside a SessionState".into()))
}

/// The Arrow type of `catalog.schema.table.column`, if there is such a column.
async fn column_type(
    catalogs: &dyn CatalogProviderList,
    catalog: &str,
    schema: &str,
    table: &str,
    column: &str,
    cache: &mut HashMap<(String, String, String), Option<SchemaRef>>,
) -> Option<DataType> {
    let key = (catalog.to_owned(), schema.to_owned(), table.to_owned());
    if !cache.contains_key(&key) {
        let found = match catalogs.catalog(catalog).and_then(|c| c.schema(schema)) {
            Some(s) => s.table(table).await.ok().flatten().map(|t| t.schema()),
            None => None,
        };
        cache.insert(key.clone(), found);
    }
    let schema = cache.get(&key)?.as_ref()?;
    schema
        .field_with_name(column)
        .ok()
        .map(|f| f.data_type().clone())
}

/// Every batch of `table`'s scan in `state`.
async fn scan_all(table: &dyn TableProvider, state: &dyn Session) -> DfResult<Vec<RecordBatch>> {
    let plan = table.scan(state, None, &[], None).await?;
    datafusion::physical_plan::collect(plan, state.task_ctx()).await
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> DfResult<&'a T> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            DataFusionError::Internal(format!("no column `{name}` of the expected type"))
        })
}

/// Which catalog schema a [`TypedSchema`] wraps, and so which of its tables it corrects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Catalog {
    /// datafusion-pg-catalog's pg_catalog: `pg_attribute` gets [`TypedTable`].
    PgCatalog,
    /// DataFusion's information_schema: `columns` gets [`TypedTable`].
    InformationSchema,
}

/// A catalog schema whose type-describing table names Postgres' types; every other table as
/// it was.
#[derive(Debug)]
pub(crate) struct TypedSchema {
    pub inner: Arc<dyn SchemaProvider>,
    pub catalog: Catalog,
}

#[async_trait::async_trait]
impl SchemaProvider for TypedSchema {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn table_names(&self) -> Vec<String> {
        self.inner.table_names()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        let table = self.inner.table(name).await?;
        let Some(table) = table else {
            return Ok(None);
        };
        Ok(Some(match (self.catalog, name) {
            (Catalog::PgCatalog, "pg_attribute") => {
                let (Some(classes), Some(namespaces)) = (
                    self.inner.table("pg_class").await?,
                    self.inner.table("pg_namespace").await?,
                ) else {
                    return Ok(None);
                };
                Arc::new(TypedTable {
                    table,
                    fix: Fix::Attributes {
                        classes,
                        namespaces,
                    },
                })
            }
            (Catalog::InformationSchema, "columns") => Arc::new(TypedTable {
                table,
                fix: Fix::Columns,
            }),
            _ => table,
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.inner.table_exist(name)
    }
}

/// How a [`TypedTable`] corrects its table's rows.
#[derive(Debug)]
enum Fix {
    /// `pg_attribute`, whose tables are found through these two.
    Attributes {
        classes: Arc<dyn TableProvider>,
        namespaces: Arc<dyn TableProvider>,
    },
    /// `information_schema.columns`.
    Columns,
}

/// A catalog table that describes columns, its types corrected to Postgres' at each scan.
#[derive(Debug)]
struct TypedTable {
    table: Arc<dyn TableProvider>,
    fix: Fix,
}

#[async_trait::async_trait]
impl TableProvider for TypedTable {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn schema(&self) -> SchemaRef {
        self.table.schema()
    }

    fn table_type(&self) -> TableType {
        self.table.table_type()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let rows = match &self.fix {
            Fix::Attributes {
                classes,
                namespaces,
            } => {
                attribute_rows(
                    self.table.as_ref(),
                    classes.as_ref(),
                    namespaces.as_ref(),
                    state,
                )
                .await?
            }
            Fix::Columns => column_rows(self.table.as_ref(), state).await?,
        };
        MemTable::try_new(self.schema(), vec![rows])?
            .scan(state, projection, filters, limit)
            .await
    }
}

/// The rows of `pg_attribute` with each column's `atttypid`, `atttypmod` and `attlen` taken
/// from its table's Arrow schema ([`pg_type`]), the table found through `pg_class` and
/// `pg_namespace`.
async fn attribute_rows(
    attributes: &dyn TableProvider,
    classes: &dyn TableProvider,
    namespaces: &dyn TableProvider,
    state: &dyn Session,
) -> DfResult<Vec<RecordBatch>> {
    let catalogs = catalogs(state)?;
    let mut namespace_of: HashMap<i32, String> = HashMap::new();
    for batch in scan_all(namespaces, state).await? {
        let oids = column::<Int32Array>(&batch, "oid")?;
        let names = column::<StringArray>(&batch, "nspname")?;
        for i in 0..batch.num_rows() {
            namespace_of.insert(oids.value(i), names.value(i).to_owned());
        }
    }
    let mut relation_of: HashMap<i32, (String, String)> = HashMap::new();
    for batch in scan_all(classes, state).await? {
        let oids = column::<Int32Array>(&batch, "oid")?;
        let names = column::<StringArray>(&batch, "relname")?;
        let namespaces = column::<Int32Array>(&batch, "relnamespace")?;
        for i in 0..batch.num_rows() {
            if let Some(namespace) = namespace_of.get(&namespaces.value(i)) {
                relation_of.insert(
                    oids.value(i),
                    (namespace.clone(), names.value(i).to_owned()),
                );
            }
        }
    }
    let mut cache = HashMap::new();
    let mut fixed = Vec::new();
    for batch in scan_all(attributes, state).await? {
        let relations = column::<Int32Array>(&batch, "attrelid")?;
        let names = column::<StringArray>(&batch, "attname")?;
        let mut type_ids: Vec<i32> = column::<Int32Array>(&batch, "atttypid")?.values().to_vec();
        let mut typmods: Vec<i32> = column::<Int32Array>(&batch, "atttypmod")?.values().to_vec();
        let mut lens: Vec<i16> = column::<Int16Array>(&batch, "attlen")?.values().to_vec();
        for i in 0..batch.num_rows() {
            let Some((schema, table)) = relation_of.get(&relations.value(i)) else {
                continue;
            };
            let found = column_type(
                catalogs.as_ref(),
                kappa_lakehouse::CATALOG_NAME,
                schema,
                table,
                names.value(i),
                &mut cache,
            )
            .await;
            if let Some(data_type) = found {
                let t = pg_type(&data_type);
                (type_ids[i], typmods[i], lens[i]) = (t.oid, t.typmod, t.len);
            }
        }
        let replaced: [(&str, ArrayRef); 3] = [
            ("atttypid", Arc::new(Int32Array::from(type_ids))),
            ("atttypmod", Arc::new(Int32Array::from(typmods))),
            ("attlen", Arc::new(Int16Array::from(lens))),
        ];
        fixed.push(replace_columns(&batch, &replaced)?);
    }
    Ok(fixed)
}

/// The rows of `information_schema.columns` with `data_type` as Postgres names it (`bigint`,
/// `text`, `timestamp with time zone`, `numeric`) instead of Arrow's names.
async fn column_rows(
    columns: &dyn TableProvider,
    state: &dyn Session,
) -> DfResult<Vec<RecordBatch>> {
    let catalogs = catalogs(state)?;
    let mut cache = HashMap::new();
    let mut fixed = Vec::new();
    for batch in scan_all(columns, state).await? {
        let catalog = column::<StringArray>(&batch, "table_catalog")?;
        let schema = column::<StringArray>(&batch, "table_schema")?;
        let table = column::<StringArray>(&batch, "table_name")?;
        let name = column::<StringArray>(&batch, "column_name")?;
        let before = column::<StringArray>(&batch, "data_type")?;
        let mut types: Vec<Option<String>> = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let found = column_type(
                catalogs.as_ref(),
                catalog.value(i),
                schema.value(i),
                table.value(i),
                name.value(i),
                &mut cache,
            )
            .await;
            types.push(match found {
                Some(data_type) => Some(pg_type(&data_type).name.to_owned()),
                None => before.is_valid(i).then(|| before.value(i).to_owned()),
            });
        }
        let data_type: ArrayRef = Arc::new(StringArray::from(types));
        fixed.push(replace_columns(&batch, &[("data_type", data_type)])?);
    }
    Ok(fixed)
}

/// `batch` with the named columns replaced.
fn replace_columns(batch: &RecordBatch, replaced: &[(&str, ArrayRef)]) -> DfResult<RecordBatch> {
    let schema = batch.schema();
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(field, column)| {
            replaced
                .iter()
                .find(|(name, _)| *name == field.name())
                .map_or_else(|| column.clone(), |(_, new)| new.clone())
        })
        .collect();
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// `pg_typeof(value)`: the Postgres name of the value's type, as text.
#[derive(Debug, PartialEq, Eq, Hash)]
struct PgTypeOf {
    signature: Signature,
}

impl ScalarUDFImpl for PgTypeOf {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn name(&self) -> &str {
        "pg_typeof"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let [value] = args.args.as_slice() else {
            return Err(DataFusionError::Plan("pg_typeof takes one argument".into()));
        };
        let name = pg_type(&value.data_type()).name;
        Ok(ColumnarValue::Scalar(
            datafusion::scalar::ScalarValue::Utf8(Some(name.to_owned())),
        ))
    }
}

/// The `pg_typeof` function.
pub(crate) fn pg_typeof() -> ScalarUDF {
    ScalarUDF::new_from_impl(PgTypeOf {
        signature: Signature::any(1, Volatility::Immutable),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kappa_types_have_their_postgres_names() {
        let of = |t: DataType| {
            let p = pg_type(&t);
            (p.oid, p.name, p.typmod)
        };
        assert_eq!(
            of(DataType::Timestamp(
                arrow::datatypes::TimeUnit::Microsecond,
                Some("+00:00".into())
            )),
            (1184, "timestamp with time zone", -1)
        );
        assert_eq!(
            of(DataType::Decimal128(10, 2)),
            (1700, "numeric", (10 << 16 | 2) + 4)
        );
        assert_eq!(of(DataType::Int64), (20, "bigint", -1));
        assert_eq!(of(DataType::Utf8), (25, "text", -1));
        assert_eq!(of(DataType::Date32), (1082, "date", -1));
        assert_eq!(of(DataType::Binary), (17, "bytea", -1));
    }
}
