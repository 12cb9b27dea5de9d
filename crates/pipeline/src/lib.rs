//! The project folder as data: topics, models, their configuration and dependency order, and
//! located diagnostics for everything wrong with them. Pure: callers read the files.
//!
//! ```text
//! ProjectFiles (path → text) ──load──► Project { topics, models, order }  or  [Diagnostic]
//!                                        models/<layer>/<name>.sql parsed with sqlparser:
//!                                        FROM orders → topic, FROM silver.orders → model
//! ```
//!
//! ```
//! let mut files = kappa_pipeline::ProjectFiles::new();
//! files.insert("kappa.toml".into(), "[project]\nname = \"demo\"\n".into());
//! files.insert("topics/orders.toml".into(), "[schema]\nqty = \"int\"\n".into());
//! files.insert("models/silver/big.sql".into(), "SELECT * FROM order WHERE qty > 3".into());
//! let errors = kappa_pipeline::load(&files).unwrap_err();
//! assert_eq!(errors[0].to_string(), "models/silver/big.sql:1:15: no topic or model `order`; did you mean `orders`?");
//! ```

mod dag;
pub mod deploy;
pub mod diagnostic;
pub mod expect;
mod log_section;
mod project;
pub mod scaffold;
pub mod schema;
mod sql;

pub use diagnostic::Diagnostic;
pub use log_section::{
    KAFKA_PRODUCER_SETTINGS, KAFKA_SECRET_PROPERTIES, LogBackend, LogSection, PropertyValue,
    kafka_fixed_setting, kafka_setting_problem,
};
pub use project::{
    AlertsSection, Audit, BRONZE_LAYER, DEFAULT_RETENTION_MS, DEFAULT_SECRET_ENV, DeploySection,
    Input, Mask, MaskingSection, Materialization, Model, ModelConfig, PROJECT_FILE, Project,
    ProjectConfig, ProjectFiles, ProjectSection, ServerSection, TopicKind, TopicSpec, Webhook,
    WebhookFormat, load,
};
pub use schema::{Field, FieldType};
