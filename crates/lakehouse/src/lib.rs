//! kappa's serving layer: every model's output is the Apache Iceberg table `layer.model`, in a
//! SQL catalog on SQLite with a warehouse folder (both inside the data directory), written by
//! commits that record which input offsets they cover.
//!
//! ```text
//! <data>/catalog.db        the Iceberg SQL catalog (SQLite): namespaces, tables, metadata pointers
//! <data>/warehouse/<layer>/<model>/{metadata,data}/…   Iceberg metadata and Parquet files
//! ```
//!
//! The warehouse can be an S3 bucket instead (`[lakehouse] warehouse = "s3://bucket/prefix"`
//! in `kappa.toml`, see [`WarehouseConfig`]); the catalog stays in the data directory, and
//! `kappa up` records the warehouse there (`<data>/lakehouse.json`) so that every command on
//! the data directory finds it.
//!
//! A commit is one `fast_append` snapshot whose summary carries the writer's properties (the
//! pipeline version and the consumed offsets, see the engine), so after any failure the table
//! itself says what was committed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema as ArrowSchema, SchemaRef};
use datafusion::catalog::{
    CatalogProvider, MemoryCatalogProvider, MemorySchemaProvider, SchemaProvider,
};
use datafusion::prelude::{SessionConfig, SessionContext};
pub use iceberg::TableIdent;
use iceberg::arrow::{arrow_schema_to_schema_auto_assign_ids, schema_to_arrow_schema};
use iceberg::spec::DataFileFormat;
pub use iceberg::spec::{DataFile, Snapshot};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::file_writer::location_generator::{
    DefaultFileNameGenerator, DefaultLocationGenerator,
};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::{IcebergWriter, IcebergWriterBuilder};
use iceberg::{Catalog, CatalogBuilder, TableCreation};
use iceberg_catalog_sql::{SqlBindStyle, SqlCatalogBuilder};
use iceberg_datafusion::IcebergCatalogProvider;
use iceberg_storage_opendal::OpenDalStorageFactory;
use parquet::file::properties::WriterProperties;

mod alias;
mod changes;
pub mod commit;
pub mod marks;
mod state;
mod time_travel;
pub mod wap;

pub use changes::{Added, AddedFile};
pub use iceberg::table::Table;

/// The catalog's file inside the data directory.
pub const CATALOG_FILE: &str = "catalog.db";
/// zstd level of every Parquet data file: level 1 compresses the demo's bronze and silver
/// tables several fold at a small fraction of a commit's cost (higher levels bought little).
pub const PARQUET_ZSTD_LEVEL: i32 = 1;
/// The warehouse folder inside the data directory.
pub const WAREHOUSE_DIR: &str = "warehouse";
/// Where `kappa up` records the data directory's warehouse configuration.
pub const WAREHOUSE_CONFIG_FILE: &str = "lakehouse.json";
/// The catalog's name, as external engines see it.
pub const CATALOG_NAME: &str = "kappa";
/// The DataFusion schema holding every table whose name is unique, for unqualified queries.
pub const UNQUALIFIED_SCHEMA: &str = "public";

fn query_error(e: datafusion::error::DataFusionError) -> LakehouseError {
    LakehouseError::Query(e.strip_backtrace())
}

/// What went wrong in the serving layer.
#[derive(Debug, thiserror::Error)]
pub enum LakehouseError {
    #[error("{action}: {source}")]
    Iceberg {
        action: String,
        /// Boxed: iceberg's error is large and this one travels through every `Result`.
        #[source]
        source: Box<iceberg::Error>,
    },
    #[error("{action}: {source}")]
    Arrow {
        action: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    #[error("{0}")]
    Query(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Catalog(String),
    #[error("commit to {0} conflicted: the table changed since it was read")]
    Conflict(String),
    #[error("{action} `{}`: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = LakehouseError> = std::result::Result<T, E>;

trait Context<T> {
    fn doing(self, action: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for iceberg::Result<T> {
    fn doing(self, action: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| LakehouseError::Iceberg {
            action: action(),
            source: Box::new(source),
        })
    }
}

impl<T> Context<T> for std::result::Result<T, arrow::error::ArrowError> {
    fn doing(self, action: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| LakehouseError::Arrow {
            action: action(),
            source,
        })
    }
}

/// Where the tables' files go: the data directory's warehouse folder (the default), or an
/// object store. `properties` go to the catalog and its file IO: for S3, `s3.endpoint`,
/// `s3.region`, `s3.path-style-access`, … (iceberg-rust's names). Credentials are best left
/// to the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, or the AWS config files),
/// which the S3 client reads: nothing secret needs to be in the project or the data directory.
///
/// With `catalog = Some(CatalogKind::Rest)`, the tables are an Iceberg REST catalog's at `uri`
/// instead of the data directory's SQL catalog; `warehouse` is then required (it is passed to
/// the catalog, and its scheme chooses the file IO), and `properties` also carry the catalog's
/// own settings (`token`, `header.*`, `prefix`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WarehouseConfig {
    /// `s3://bucket/prefix`; `None` for the data directory's `warehouse/` folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warehouse: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub properties: std::collections::BTreeMap<String, String>,
    /// Which catalog holds the tables; `None` is the SQL catalog in the data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog: Option<CatalogKind>,
    /// The REST catalog's address, `http(s)://host:port[/path]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
}

/// The kinds of Iceberg catalog kappa writes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatalogKind {
    /// iceberg-rust's SQL catalog on SQLite, in the data directory (the default).
    Sql,
    /// An Iceberg REST catalog server.
    Rest,
}

impl CatalogKind {
    /// The kind `kappa.toml` names (`"sql"` or `"rest"`).
    pub fn parse(name: &str) -> std::result::Result<CatalogKind, String> {
        match name {
            "sql" => Ok(CatalogKind::Sql),
            "rest" => Ok(CatalogKind::Rest),
            other => Err(format!("catalog `{other}`: expected \"sql\" or \"rest\"")),
        }
    }
}

impl WarehouseConfig {
    /// The configuration `kappa.toml`'s `[lakehouse]` section gives (`catalog` by name), or
    /// what is wrong with it.
    pub fn from_section(
        catalog: Option<&str>,
        uri: Option<String>,
        warehouse: Option<String>,
        properties: std::collections::BTreeMap<String, String>,
    ) -> std::result::Result<WarehouseConfig, String> {
        let config = WarehouseConfig {
            warehouse,
            properties,
            catalog: catalog.map(CatalogKind::parse).transpose()?,
            uri,
        };
        match config.problem() {
            Some(problem) => Err(problem),
            None => Ok(config),
        }
    }

    /// What is wrong with it, if anything: an unsupported location, a REST catalog without
    /// its address or warehouse, or an address without a REST catalog.
    pub fn problem(&self) -> Option<String> {
        match (self.catalog, &self.uri) {
            (Some(CatalogKind::Rest), None) => {
                return Some("catalog = \"rest\" needs the catalog's `uri`".into());
            }
            (Some(CatalogKind::Rest), Some(uri))
                if !(uri.starts_with("http://") || uri.starts_with("https://")) =>
            {
                return Some(format!("uri `{uri}`: expected http://… or https://…"));
            }
            (Some(CatalogKind::Rest), Some(_)) if self.warehouse.is_none() => {
                return Some(
                    "catalog = \"rest\" needs a `warehouse` (s3://… or file:///…): the \
                     tables' files are not in the data directory"
                        .into(),
                );
            }
            (Some(CatalogKind::Rest), Some(_)) if self.properties.contains_key("credential") => {
                return Some(
                    "the REST catalog's OAuth2 `credential` is not supported yet; give a bearer \
                     `token` (from the environment's secret store) in [lakehouse.properties]"
                        .into(),
                );
            }
            (None | Some(CatalogKind::Sql), Some(_)) => {
                return Some(
                    "`uri` is the address of a REST catalog: set catalog = \"rest\"".into(),
                );
            }
            _ => {}
        }
        let location = self.warehouse.as_deref()?;
        match location.split_once("://") {
            Some(("s3" | "s3a", rest)) if !rest.trim_matches('/').is_empty() => None,
            Some(("file", rest)) if rest.starts_with('/') => None,
            _ => Some(format!(
                "warehouse `{location}`: expected s3://bucket[/prefix] or file:///absolute/path"
            )),
        }
    }

    /// The configuration `kappa up` recorded in `data_dir`, or the default.
    pub fn recorded(data_dir: &Path) -> Result<WarehouseConfig> {
        let path = data_dir.join(WAREHOUSE_CONFIG_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                LakehouseError::Catalog(format!(
                    "{}: not a warehouse configuration: {e}",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(WarehouseConfig::default()),
            Err(source) => Err(LakehouseError::Io {
                action: "read the warehouse configuration",
                path,
                source,
            }),
        }
    }

    /// Records it in `data_dir` for every later command (written whole, then renamed).
    pub fn record(&self, data_dir: &Path) -> Result<()> {
        let path = data_dir.join(WAREHOUSE_CONFIG_FILE);
        let partial = data_dir.join(format!("{WAREHOUSE_CONFIG_FILE}.partial"));
        let text = serde_json::to_vec_pretty(self).unwrap_or_default();
        std::fs::write(&partial, text)
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|source| LakehouseError::Io {
                action: "record the warehouse configuration",
                path,
                source,
            })
    }
}

/// The catalog and warehouse of one data directory.
#[derive(Debug, Clone)]
pub struct Lakehouse {
    catalog: Arc<dyn Catalog>,
    /// Where our own commits (`commit.rs`) go.
    commits: commit::Committer,
    /// The warehouse's location (`file:///…` or `s3://…`).
    warehouse: String,
    /// How long a snapshot stays after the next one replaced it (ms).
    replaced_snapshot_ms: i64,
    /// Positions of readers of tables as streams (`changes.rs`), shared by every clone.
    holds: Arc<changes::Holds>,
    /// Tables whose commits go to their audit branch (`wap.rs`), shared by every clone.
    staged: Arc<std::sync::Mutex<std::collections::HashSet<TableIdent>>>,
    /// Tables whose writer waits for a decision, and why (`wap.rs`), shared by every clone.
    blocked: Arc<std::sync::Mutex<HashMap<TableIdent, String>>>,
}

/// The partition spec `partition_by` asks for, over an Iceberg `schema`. Each entry is a column
/// (identity), `year(col)`, `month(col)`, `day(col)`, `hour(col)`, `bucket(N, col)` or
/// `truncate(N, col)`; otherwise, why not.
pub fn partition_spec(
    schema: &iceberg::spec::Schema,
    partition_by: &[String],
) -> std::result::Result<iceberg::spec::UnboundPartitionSpec, String> {
    use iceberg::spec::Transform;
    let mut builder = iceberg::spec::UnboundPartitionSpec::builder();
    for entry in partition_by {
        let entry = entry.trim();
        let (transform, column) = match entry.split_once('(') {
            None => (Transform::Identity, entry),
            Some((name, rest)) => {
                let inside = rest
                    .strip_suffix(')')
                    .ok_or_else(|| format!("partition_by `{entry}`: a `)` is missing"))?;
                let args: Vec<&str> = inside.split(',').map(str::trim).collect();
                let width = || {
                    args.first()
                        .and_then(|n| n.parse::<u32>().ok())
                        .ok_or_else(|| {
                            format!("partition_by `{entry}`: expected {name}(N, column)")
                        })
                };
                match (name.trim().to_lowercase().as_str(), args.as_slice()) {
                    ("year", [c]) => (Transform::Year, *c),
                    ("month", [c]) => (Transform::Month, *c),
                    ("day", [c]) => (Transform::Day, *c),
                    ("hour", [c]) => (Transform::Hour, *c),
                    ("bucket", [_, c]) => (Transform::Bucket(width()?), *c),
                    ("truncate", [_, c]) => (Transform::Truncate(width()?), *c),
                    _ => {
                        return Err(format!(
                            "partition_by `{entry}`: expected a column, year(c), month(c), day(c), \
                             hour(c), bucket(N, c) or truncate(N, c)"
                        ));
                    }
                }
            }
        };
        let field = schema
            .field_by_name(column)
            .ok_or_else(|| format!("partition_by `{entry}`: the table has no column `{column}`"))?;
        if transform.result_type(&field.field_type).is_err() {
            return Err(format!(
                "partition_by `{entry}`: {transform} does not apply to `{column}` ({})",
                field.field_type
            ));
        }
        let name = match transform {
            Transform::Identity => column.to_owned(),
            other => format!(
                "{column}_{}",
                other.to_string().split('[').next().unwrap_or("part")
            ),
        };
        builder = builder
            .add_partition_field(field.id, name, transform)
            .map_err(|e| format!("partition_by `{entry}`: {}", e.message()))?;
    }
    Ok(builder.build())
}

/// Why `partition_by` cannot partition a table of `schema` (Arrow), if it cannot.
pub fn partition_problem(schema: &ArrowSchema, partition_by: &[String]) -> Option<String> {
    if partition_by.is_empty() {
        return None;
    }
    let schema = arrow_schema_to_schema_auto_assign_ids(schema).ok()?;
    partition_spec(&schema, partition_by).err()
}

/// `layer.model` as an Iceberg table identifier.
pub fn table_ident(layer: &str, model: &str) -> Result<TableIdent> {
    TableIdent::from_strs([layer, model]).doing(|| format!("name the table {layer}.{model}"))
}

impl Lakehouse {
    /// Opens (or creates) the catalog and warehouse of a data directory, with the warehouse
    /// configuration recorded there (see [`WarehouseConfig::recorded`]).
    pub async fn open(data_dir: &Path) -> Result<Lakehouse> {
        Lakehouse::open_with(data_dir, &WarehouseConfig::recorded(data_dir)?).await
    }

    /// Opens (or creates) the catalog of a data directory with the warehouse `config`.
    pub async fn open_with(data_dir: &Path, config: &WarehouseConfig) -> Result<Lakehouse> {
        if let Some(problem) = config.problem() {
            return Err(LakehouseError::Catalog(problem));
        }
        let (warehouse, storage) = match &config.warehouse {
            Some(location) if !location.starts_with("file://") => (
                location.trim_end_matches('/').to_owned(),
                OpenDalStorageFactory::S3 {
                    customized_credential_load: None,
                },
            ),
            configured => {
                let folder = match configured {
                    Some(location) => PathBuf::from(location.trim_start_matches("file://")),
                    None => data_dir.join(WAREHOUSE_DIR),
                };
                std::fs::create_dir_all(&folder).map_err(|source| LakehouseError::Io {
                    action: "create the warehouse",
                    path: folder.clone(),
                    source,
                })?;
                (
                    format!("file://{}", folder.display()),
                    OpenDalStorageFactory::Fs,
                )
            }
        };
        if config.catalog == Some(CatalogKind::Rest) {
            return Lakehouse::open_rest(config, warehouse, storage).await;
        }
        let db = data_dir.join(CATALOG_FILE);
        let catalog = SqlCatalogBuilder::default()
            .uri(format!("sqlite:{}?mode=rwc", db.display()))
            .warehouse_location(warehouse.clone())
            .sql_bind_style(SqlBindStyle::QMark)
            .with_storage_factory(Arc::new(storage))
            .load(
                CATALOG_NAME,
                config.properties.clone().into_iter().collect(),
            )
            .await
            .doing(|| format!("open the Iceberg catalog {}", db.display()))?;
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db)
            .busy_timeout(std::time::Duration::from_secs(30));
        let pointers = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(|e| LakehouseError::Catalog(format!("open {}: {e}", db.display())))?;
        sqlx::query(alias::ALIASES_DDL)
            .execute(&pointers)
            .await
            .map_err(|e| LakehouseError::Catalog(format!("prepare {}: {e}", db.display())))?;
        // A data directory keeps its warehouse: tables written elsewhere could not be read
        // (one storage backend per catalog) and every runner would fail on them.
        let elsewhere: Option<(String, String)> = sqlx::query_as(
            "SELECT table_namespace || '.' || table_name, metadata_location FROM iceberg_tables \
             WHERE substr(metadata_location, 1, length(?)) <> ? LIMIT 1",
        )
        .bind(format!("{warehouse}/"))
        .bind(format!("{warehouse}/"))
        .fetch_optional(&pointers)
        .await
        .map_err(|e| LakehouseError::Catalog(format!("read {}: {e}", db.display())))?;
        if let Some((table, location)) = elsewhere {
            return Err(LakehouseError::Catalog(format!(
                "table {table} is at {location}, outside the configured warehouse {warehouse}: \
                 a data directory keeps its warehouse (use a new data directory for another)"
            )));
        }
        Ok(Lakehouse {
            catalog: Arc::new(catalog),
            commits: commit::Committer::Sql(pointers),
            warehouse,
            replaced_snapshot_ms: commit::SNAPSHOT_REPLACED_MIN_MS,
            holds: Arc::default(),
            staged: Arc::default(),
            blocked: Arc::default(),
        })
    }

    /// The tables of the REST catalog `config` names, with their files in `warehouse`.
    async fn open_rest(
        config: &WarehouseConfig,
        warehouse: String,
        storage: OpenDalStorageFactory,
    ) -> Result<Lakehouse> {
        let uri = config.uri.clone().unwrap_or_default();
        let mut properties: HashMap<String, String> =
            config.properties.clone().into_iter().collect();
        properties.insert("uri".into(), uri.clone());
        properties.insert("warehouse".into(), warehouse.clone());
        let catalog = iceberg_catalog_rest::RestCatalogBuilder::default()
            .with_storage_factory(Arc::new(storage))
            .load(CATALOG_NAME, properties.clone())
            .await
            .doing(|| format!("open the Iceberg REST catalog at {uri}"))?;
        // Reached now, so that a wrong address fails here, not on the first commit.
        catalog
            .list_namespaces(None)
            .await
            .doing(|| format!("list the namespaces of the REST catalog at {uri}"))?;
        let commits = commit::Committer::rest(&uri, &warehouse, &properties).await?;
        Ok(Lakehouse {
            catalog: Arc::new(catalog),
            commits,
            warehouse,
            replaced_snapshot_ms: commit::SNAPSHOT_REPLACED_MIN_MS,
            holds: Arc::default(),
            staged: Arc::default(),
            blocked: Arc::default(),
        })
    }

    /// Keeps a replaced snapshot `ms` milliseconds instead of
    /// [`commit::SNAPSHOT_REPLACED_MIN_MS`] (tests of expiry).
    pub fn with_replaced_snapshot_ms(mut self, ms: i64) -> Lakehouse {
        self.replaced_snapshot_ms = ms;
        self
    }

    pub fn catalog(&self) -> Arc<dyn Catalog> {
        self.catalog.clone()
    }

    /// The warehouse's location (`file:///…` or `s3://…`).
    pub fn warehouse(&self) -> &str {
        &self.warehouse
    }

    /// The table `ident`, created with `schema` (field ids assigned) if it does not exist.
    pub async fn ensure_table(&self, ident: &TableIdent, schema: &ArrowSchema) -> Result<Table> {
        self.ensure_partitioned_table(ident, schema, &[]).await
    }

    /// [`Lakehouse::ensure_table`], partitioned by `partition_by` when the table is created
    /// (see [`partition_spec`]).
    pub async fn ensure_partitioned_table(
        &self,
        ident: &TableIdent,
        schema: &ArrowSchema,
        partition_by: &[String],
    ) -> Result<Table> {
        self.ensure_namespace(ident.namespace()).await?;
        if self
            .catalog
            .table_exists(ident)
            .await
            .doing(|| format!("look up table {ident}"))?
        {
            return self
                .catalog
                .load_table(ident)
                .await
                .doing(|| format!("load table {ident}"));
        }
        let schema = arrow_schema_to_schema_auto_assign_ids(schema)
            .doing(|| format!("convert the schema of {ident}"))?;
        let spec = partition_spec(&schema, partition_by)
            .map_err(|why| LakehouseError::Unsupported(format!("{ident}: {why}")))?;
        let creation = TableCreation::builder()
            .name(ident.name().to_owned())
            .schema(schema)
            .partition_spec(spec)
            .build();
        match self.catalog.create_table(ident.namespace(), creation).await {
            Err(e) if e.kind() == iceberg::ErrorKind::TableAlreadyExists => self
                .catalog
                .load_table(ident)
                .await
                .doing(|| format!("load table {ident}")),
            other => other.doing(|| format!("create table {ident}")),
        }
    }

    /// Why an Iceberg table cannot hold a column of `field`'s type, if it cannot (durations
    /// and intervals, for instance, have no Iceberg type).
    pub fn unstorable(field: &arrow::datatypes::Field) -> Option<String> {
        let schema = ArrowSchema::new(vec![field.clone()]);
        arrow_schema_to_schema_auto_assign_ids(&schema)
            .err()
            .map(|e| e.message().to_owned())
    }

    /// Whether `table` stores `schema`: the same column names, types and nullability as a table
    /// created from `schema` would have.
    pub fn schema_matches(&self, table: &Table, schema: &ArrowSchema) -> bool {
        let Ok(stored) = schema_to_arrow_schema(table.metadata().current_schema()) else {
            return false;
        };
        let Ok(schema) =
            arrow_schema_to_schema_auto_assign_ids(schema).and_then(|s| schema_to_arrow_schema(&s))
        else {
            return false;
        };
        stored.fields().len() == schema.fields().len()
            && stored.fields().iter().zip(schema.fields()).all(|(a, b)| {
                a.name() == b.name()
                    && a.data_type() == b.data_type()
                    && a.is_nullable() == b.is_nullable()
            })
    }

    /// Drops `ident` (its files stay in the warehouse) and creates it anew with `schema`.
    pub async fn replace_table(
        &self,
        ident: &TableIdent,
        schema: &ArrowSchema,
        partition_by: &[String],
    ) -> Result<Table> {
        if self
            .catalog
            .table_exists(ident)
            .await
            .doing(|| format!("look up table {ident}"))?
        {
            self.catalog
                .drop_table(ident)
                .await
                .doing(|| format!("drop table {ident}"))?;
        }
        self.ensure_partitioned_table(ident, schema, partition_by)
            .await
    }

    pub async fn load_table(&self, ident: &TableIdent) -> Result<Table> {
        self.catalog
            .load_table(ident)
            .await
            .doing(|| format!("load table {ident}"))
    }

    /// The table `ident` names, or `None` while the catalog has no such table (a writer that
    /// has not created it yet).
    pub async fn load_table_if_exists(&self, ident: &TableIdent) -> Result<Option<Table>> {
        let exists = self
            .catalog
            .table_exists(ident)
            .await
            .doing(|| format!("look for table {ident}"))?;
        if !exists {
            return Ok(None);
        }
        self.load_table(ident).await.map(Some)
    }

    /// Drops `ident` from the catalog and deletes its files (everything under its location).
    pub async fn drop_table(&self, ident: &TableIdent) -> Result<()> {
        let table = self.load_table(ident).await?;
        self.catalog
            .drop_table(ident)
            .await
            .doing(|| format!("drop table {ident}"))?;
        let location = format!("{}/", table.metadata().location().trim_end_matches('/'));
        table
            .file_io()
            .delete_prefix(&location)
            .await
            .doing(|| format!("delete the files of {ident} under {location}"))
    }

    /// Writes `batches` as new Parquet data files and commits them in one snapshot whose summary
    /// carries `properties`. Returns the table as committed.
    pub async fn append(
        &self,
        table: &Table,
        batches: &[RecordBatch],
        properties: HashMap<String, String>,
    ) -> Result<Table> {
        // The files carry the commit's event-time marks, which outlive its snapshot.
        let footer = properties.get(marks::FILE_MARKS_PROPERTY).cloned();
        let files = self
            .write_marked_files(table, batches, "", footer.as_deref())
            .await?;
        self.append_files(table, files, properties).await
    }

    /// Writes `batches` as new Parquet data files of `table` (not yet committed). Every call
    /// writes files of its own: a retried or abandoned commit never overwrites a file another
    /// snapshot references. `label` goes into the file names (e.g. a bucket number).
    pub async fn write_data_files(
        &self,
        table: &Table,
        batches: &[RecordBatch],
        label: &str,
    ) -> Result<Vec<iceberg::spec::DataFile>> {
        self.write_marked_files(table, batches, label, None).await
    }

    /// [`Lakehouse::write_data_files`], each file's footer carrying `marks` (the JSON of
    /// [`marks::FileMarks`]) under [`marks::FILE_MARKS_PROPERTY`].
    pub(crate) async fn write_marked_files(
        &self,
        table: &Table,
        batches: &[RecordBatch],
        label: &str,
        marks: Option<&str>,
    ) -> Result<Vec<iceberg::spec::DataFile>> {
        let ident = table.identifier().clone();
        let metadata = table.metadata();
        let schema = metadata.current_schema().clone();
        let arrow_schema =
            Arc::new(schema_to_arrow_schema(&schema).doing(|| format!("schema of {ident}"))?);
        let location =
            DefaultLocationGenerator::new(metadata).doing(|| format!("locate files of {ident}"))?;
        let prefix = format!("kappa-{label}{}", uuid::Uuid::new_v4().simple());
        let names = DefaultFileNameGenerator::new(prefix, None, DataFileFormat::Parquet);
        let parquet = ParquetWriterBuilder::new(parquet_properties(marks), schema);
        let rolling = RollingFileWriterBuilder::new_with_default_file_size(
            parquet,
            table.file_io().clone(),
            location,
            names,
        );
        let builder = DataFileWriterBuilder::new(rolling);
        let spec = metadata.default_partition_spec().clone();
        // The table's own Arrow schema carries the Iceberg field ids the Parquet files need.
        let with_ids = |batch: &RecordBatch| {
            RecordBatch::try_new(arrow_schema.clone(), batch.columns().to_vec())
                .doing(|| format!("match a batch to the schema of {ident}"))
        };
        if spec.is_unpartitioned() {
            let mut writer = builder
                .build(None)
                .await
                .doing(|| format!("open a writer for {ident}"))?;
            for batch in batches {
                writer
                    .write(with_ids(batch)?)
                    .await
                    .doing(|| format!("write to {ident}"))?;
            }
            return writer
                .close()
                .await
                .doing(|| format!("finish the files of {ident}"));
        }
        // Partitioned: each batch split by the partition spec, one file (or more) per partition.
        let splitter = iceberg::arrow::RecordBatchPartitionSplitter::try_new_with_computed_values(
            metadata.current_schema().clone(),
            spec,
        )
        .doing(|| format!("partition the rows of {ident}"))?;
        let mut writer = iceberg::writer::partitioning::fanout_writer::FanoutWriter::new(builder);
        for batch in batches {
            let parts = splitter
                .split(&with_ids(batch)?)
                .doing(|| format!("partition the rows of {ident}"))?;
            for (key, part) in parts {
                iceberg::writer::partitioning::PartitioningWriter::write(&mut writer, key, part)
                    .await
                    .doing(|| format!("write to {ident}"))?;
            }
        }
        iceberg::writer::partitioning::PartitioningWriter::close(writer)
            .await
            .doing(|| format!("finish the files of {ident}"))
    }

    /// Runs a SQL query over the tables' current snapshots. Tables are named `layer.model`, or
    /// just `model` when no other layer has a model of that name.
    /// The schema comes with the batches so an empty result still has its columns.
    pub async fn query(&self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let ctx = self.session().await?;
        let frame = ctx.sql(sql).await.map_err(query_error)?;
        let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
        let batches = frame.collect().await.map_err(query_error)?;
        Ok((schema, batches))
    }

    /// What names each table's current metadata, cheaply: with the SQL catalog, every row of
    /// it (a commit or a cutover changes one); a REST catalog has no such read, so its state
    /// reads as changed every 2 s.
    pub async fn catalog_state(&self) -> Result<Vec<(String, String, String)>> {
        match &self.commits {
            commit::Committer::Sql(pool) => sqlx::query_as(
                "SELECT table_namespace, table_name, COALESCE(metadata_location, '') FROM \
                 iceberg_tables WHERE catalog_name = ? ORDER BY table_namespace, table_name",
            )
            .bind(CATALOG_NAME)
            .fetch_all(pool)
            .await
            .map_err(|e| LakehouseError::Catalog(format!("read the catalog: {e}"))),
            _ => {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                Ok(vec![(
                    String::new(),
                    String::new(),
                    (now_ms / 2000).to_string(),
                )])
            }
        }
    }

    /// A DataFusion session over the catalog as it is now. With the SQL catalog every table is
    /// pinned to the metadata the catalog named in one read, so a query over several tables
    /// sees one state of the catalog: all of a cutover or none of it (`alias.rs`).
    pub async fn session(&self) -> Result<SessionContext> {
        let config =
            SessionConfig::new().with_default_catalog_and_schema(CATALOG_NAME, UNQUALIFIED_SCHEMA);
        let ctx = SessionContext::new_with_config(config);
        if let commit::Committer::Sql(pool) = &self.commits {
            return self.pinned_session(ctx, pool).await;
        }
        let iceberg = IcebergCatalogProvider::try_new(self.catalog.clone())
            .await
            .doing(|| "read the catalog".to_owned())?;
        let catalog = MemoryCatalogProvider::new();
        // Every table whose name is unique across layers is also reachable unqualified.
        let unqualified = MemorySchemaProvider::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut tables = Vec::new();
        for layer in iceberg.schema_names() {
            let Some(schema) = iceberg.schema(&layer) else {
                continue;
            };
            for name in schema.table_names() {
                *seen.entry(name.clone()).or_default() += 1;
                if let Ok(Some(table)) = schema.table(&name).await {
                    tables.push((name, table));
                }
            }
            let _ = catalog.register_schema(&layer, schema);
        }
        for (name, table) in tables {
            if seen.get(&name) == Some(&1) {
                let _ = unqualified.register_table(name, table);
            }
        }
        let _ = catalog.register_schema(UNQUALIFIED_SCHEMA, Arc::new(unqualified));
        ctx.register_catalog(CATALOG_NAME, Arc::new(catalog));
        Ok(ctx)
    }

    /// [`Lakehouse::session`] over the tables the SQL catalog names in one statement.
    async fn pinned_session(
        &self,
        ctx: SessionContext,
        pool: &sqlx::SqlitePool,
    ) -> Result<SessionContext> {
        // One statement: SQLite answers it from one state of the database.
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT table_namespace, table_name, metadata_location FROM iceberg_tables \
             WHERE catalog_name = ? AND metadata_location IS NOT NULL \
             AND (iceberg_type = 'TABLE' OR iceberg_type IS NULL)",
        )
        .bind(CATALOG_NAME)
        .fetch_all(pool)
        .await
        .map_err(|e| LakehouseError::Catalog(format!("read the catalog: {e}")))?;
        let catalog = MemoryCatalogProvider::new();
        let mut layers: BTreeMap<String, (Arc<MemorySchemaProvider>, HashMap<String, Table>)> =
            BTreeMap::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut tables: Vec<(String, Arc<dyn datafusion::catalog::TableProvider>)> = Vec::new();
        let mut file_io = None;
        for (namespace, name, location) in rows {
            let ident = alias::ident(&namespace, name.clone())?;
            let io = match &file_io {
                Some(io) => io,
                // The catalog's file IO, taken from a table it loads (one per catalog).
                None => file_io.insert(self.load_table(&ident).await?.file_io().clone()),
            };
            let table =
                iceberg::table::StaticTable::from_metadata_file(&location, ident, io.clone())
                    .await
                    .doing(|| format!("read {location}"))?
                    .into_table();
            let provider: Arc<dyn datafusion::catalog::TableProvider> = Arc::new(
                iceberg_datafusion::IcebergStaticTableProvider::try_new_from_table(table.clone())
                    .await
                    .doing(|| format!("read {namespace}.{name}"))?,
            );
            let (layer, history) = layers
                .entry(namespace)
                .or_insert_with(|| (Arc::new(MemorySchemaProvider::new()), HashMap::new()));
            let _ = layer.register_table(name.clone(), provider.clone());
            history.insert(name.clone(), table);
            *seen.entry(name.clone()).or_default() += 1;
            tables.push((name, provider));
        }
        // Every table whose name is unique across layers is also reachable unqualified.
        let unqualified = MemorySchemaProvider::new();
        for (name, table) in tables {
            if seen.get(&name) == Some(&1) {
                let _ = unqualified.register_table(name, table);
            }
        }
        for (layer, (tables, history)) in layers {
            let schema = time_travel::TimeTravelSchema {
                layer: layer.clone(),
                tables,
                history,
            };
            let _ = catalog.register_schema(&layer, Arc::new(schema));
        }
        let _ = catalog.register_schema(UNQUALIFIED_SCHEMA, Arc::new(unqualified));
        ctx.register_catalog(CATALOG_NAME, Arc::new(catalog));
        Ok(ctx)
    }

    /// The summary properties of the table's current snapshot: what its last commit recorded.
    pub async fn last_commit(&self, ident: &TableIdent) -> Result<Option<HashMap<String, String>>> {
        let table = self.load_table(ident).await?;
        Ok(table
            .metadata()
            .current_snapshot()
            .map(|s| s.summary().additional_properties.clone()))
    }
}

/// How every data file is written: zstd ([`PARQUET_ZSTD_LEVEL`]), the rest as Parquet's
/// defaults; with `marks` in its footer.
fn parquet_properties(marks: Option<&str>) -> WriterProperties {
    let level = parquet::basic::ZstdLevel::try_new(PARQUET_ZSTD_LEVEL)
        .expect("PARQUET_ZSTD_LEVEL is within zstd's levels (1..=22)");
    WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(level))
        .set_key_value_metadata(marks.map(|m| {
            vec![parquet::file::metadata::KeyValue::new(
                marks::FILE_MARKS_PROPERTY.to_owned(),
                m.to_owned(),
            )]
        }))
        .build()
}

#[cfg(test)]
mod tests {
    use arrow::array::{Decimal128Array, Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, TimeUnit};
    use futures::TryStreamExt;

    use super::*;

    fn schema() -> Arc<ArrowSchema> {
        Arc::new(ArrowSchema::new(vec![
            Field::new("order_id", DataType::Int64, false),
            Field::new("region", DataType::Utf8, true),
            Field::new("amount", DataType::Decimal128(10, 2), false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
                false,
            ),
        ]))
    }

    fn batch(ids: &[i64]) -> RecordBatch {
        let n = ids.len();
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from(ids.to_vec())),
                Arc::new(StringArray::from(
                    (0..n)
                        .map(|i| (i % 2 == 0).then_some("north"))
                        .collect::<Vec<_>>(),
                )),
                Arc::new(
                    Decimal128Array::from(
                        ids.iter()
                            .map(|i| i128::from(*i) * 1999)
                            .collect::<Vec<_>>(),
                    )
                    .with_precision_and_scale(10, 2)
                    .unwrap(),
                ),
                Arc::new(
                    TimestampMicrosecondArray::from(
                        ids.iter()
                            .map(|i| 1_700_000_000_000_000 + i)
                            .collect::<Vec<_>>(),
                    )
                    .with_timezone("+00:00"),
                ),
            ],
        )
        .unwrap()
    }

    #[tokio::test]
    async fn appends_commit_with_their_properties_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let lakehouse = Lakehouse::open(dir.path()).await.unwrap();
        let ident = table_ident("silver", "orders").unwrap();
        let table = lakehouse.ensure_table(&ident, &schema()).await.unwrap();
        assert_eq!(lakehouse.last_commit(&ident).await.unwrap(), None);
        let props = |o: &str| HashMap::from([("kappa.offsets".to_owned(), o.to_owned())]);
        let table = lakehouse
            .append(&table, &[batch(&[1, 2, 3])], props("orders:0=3"))
            .await
            .unwrap();
        let table = lakehouse
            .append(&table, &[batch(&[4]), batch(&[5, 6])], props("orders:0=6"))
            .await
            .unwrap();
        assert_eq!(table.metadata().snapshots().count(), 2);
        assert_eq!(
            lakehouse.last_commit(&ident).await.unwrap().unwrap()["kappa.offsets"],
            "orders:0=6"
        );

        // Reopened from the catalog file, the table reads back every row.
        drop(lakehouse);
        let lakehouse = Lakehouse::open(dir.path()).await.unwrap();
        let table = lakehouse.ensure_table(&ident, &schema()).await.unwrap();
        let batches: Vec<RecordBatch> = table
            .scan()
            .build()
            .unwrap()
            .to_arrow()
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let mut ids: Vec<i64> = batches
            .iter()
            .flat_map(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect();
        ids.sort();
        assert_eq!(ids, vec![1, 2, 3, 4, 5, 6]);

        // SQL over the tables, qualified or not.
        let out = lakehouse
            .query("SELECT count(*) AS n, sum(amount) AS total FROM silver.orders")
            .await
            .unwrap()
            .1;
        let shown = arrow::util::pretty::pretty_format_batches(&out)
            .unwrap()
            .to_string();
        assert!(shown.contains("| 6 | 419.79 |"), "{shown}");
        let out = lakehouse
            .query("SELECT count(*) FROM orders WHERE region IS NULL")
            .await
            .unwrap()
            .1;
        assert!(
            arrow::util::pretty::pretty_format_batches(&out)
                .unwrap()
                .to_string()
                .contains("| 2 ")
        );
        let err = lakehouse
            .query("SELECT * FROM nope")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
    }

    /// A staged table's commits wait on its audit branch: readers see main; the writer's head
    /// is the branch; publishing fast-forwards main; discarding keeps main's rows and takes
    /// the branch's position.
    #[tokio::test]
    async fn staged_commits_reach_readers_only_when_published() {
        let dir = tempfile::tempdir().unwrap();
        let lakehouse = Lakehouse::open(dir.path()).await.unwrap();
        let ident = table_ident("silver", "orders").unwrap();
        let table = lakehouse.ensure_table(&ident, &schema()).await.unwrap();
        let props = |o: &str| HashMap::from([("kappa.offsets".to_owned(), o.to_owned())]);
        let count = |lakehouse: Lakehouse| async move {
            let out = lakehouse
                .query("SELECT count(*) FROM silver.orders")
                .await
                .unwrap()
                .1;
            out[0]
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0)
        };
        let table = lakehouse
            .append(&table, &[batch(&[1, 2])], props("1"))
            .await
            .unwrap();
        lakehouse.stage(&ident);
        let table = lakehouse
            .append(&table, &[batch(&[3])], props("2"))
            .await
            .unwrap();
        let table = lakehouse
            .append(&table, &[batch(&[4, 5])], props("3"))
            .await
            .unwrap();
        assert_eq!(count(lakehouse.clone()).await, 2, "readers see main");
        let offsets = |s: Option<&iceberg::spec::SnapshotRef>| {
            s.unwrap().summary().additional_properties["kappa.offsets"].clone()
        };
        assert_eq!(offsets(table.metadata().current_snapshot()), "1");
        assert_eq!(offsets(wap::head(&table)), "3");
        // The audit reads the branch under the model's name.
        let ctx = lakehouse
            .audit_session("silver", "orders", &table, None)
            .await
            .unwrap();
        let audited = ctx
            .sql("SELECT count(*) FROM silver.orders")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let n = audited[0]
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0);
        assert_eq!(n, 5);
        let table = lakehouse.publish_audited(&table).await.unwrap();
        assert!(wap::unpublished(&table).is_none());
        assert_eq!(count(lakehouse.clone()).await, 5);
        assert_eq!(offsets(table.metadata().current_snapshot()), "3");

        // Discarding: main keeps its rows and takes the branch's position.
        let table = lakehouse
            .append(&table, &[batch(&[6])], props("4"))
            .await
            .unwrap();
        let table = lakehouse
            .discard(&table, &["kappa.offsets"], &[])
            .await
            .unwrap();
        assert!(wap::unpublished(&table).is_none());
        assert_eq!(count(lakehouse.clone()).await, 5);
        assert_eq!(offsets(table.metadata().current_snapshot()), "4");
        assert_eq!(offsets(wap::head(&table)), "4");
        // Commits after that start a new branch from main.
        let table = lakehouse
            .append(&table, &[batch(&[7])], props("5"))
            .await
            .unwrap();
        assert_eq!(count(lakehouse.clone()).await, 5);
        lakehouse.unstage(&ident);
        let table = lakehouse.publish_audited(&table).await.unwrap();
        assert_eq!(count(lakehouse.clone()).await, 6);
        assert_eq!(offsets(table.metadata().current_snapshot()), "5");
    }
}
