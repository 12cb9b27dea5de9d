//! The names of the tables a model's versions write: each version its own table in
//! `kappa_versions` where the catalog keeps aliases (the public `layer.name` follows one of
//! them), else the public name itself; and each version's quarantine table.

use kappa_lakehouse::{Lakehouse, table_ident};
use kappa_pipeline::Project;

/// A model's version (`kappa_pipeline::deploy::versions`: its normalized SQL, configuration
/// and the versions of its inputs), recorded with every commit.
pub fn model_version(project: &Project, model_id: &str) -> String {
    kappa_pipeline::deploy::versions(project)
        .remove(model_id)
        .unwrap_or_default()
}

/// The namespace of the tables versions write (`alias.rs` in the lakehouse: the public name
/// `layer.model` follows one of them).
pub const VERSIONS_NAMESPACE: &str = "kappa_versions";

/// The table version `version` of model `layer.name` writes: `kappa_versions.layer__name__version`.
pub fn version_table(
    layer: &str,
    name: &str,
    version: &str,
) -> kappa_lakehouse::Result<kappa_lakehouse::TableIdent> {
    table_ident(VERSIONS_NAMESPACE, &format!("{layer}__{name}__{version}"))
}

/// The table the version of `model_id` in `project` writes.
pub fn live_table(
    lakehouse: &Lakehouse,
    project: &Project,
    model_id: &str,
) -> kappa_lakehouse::Result<kappa_lakehouse::TableIdent> {
    let (layer, name) = model_id.split_once('.').unwrap_or(("", model_id));
    written_table(lakehouse, layer, name, &model_version(project, model_id))
}

/// The table version `version` of `layer.name` writes: its own (`version_table`) where the
/// catalog has aliases to switch readers with, else the public name itself.
pub fn written_table(
    lakehouse: &Lakehouse,
    layer: &str,
    name: &str,
    version: &str,
) -> kappa_lakehouse::Result<kappa_lakehouse::TableIdent> {
    if lakehouse.supports_aliases() {
        version_table(layer, name, version)
    } else {
        table_ident(layer, name)
    }
}

/// The quarantine table of version `version` of `model_id`: `quarantine.layer__name__version`,
/// the model's columns and the failed expectations' names.
pub fn quarantine_table(
    model_id: &str,
    version: &str,
) -> kappa_lakehouse::Result<kappa_lakehouse::TableIdent> {
    let (layer, name) = model_id.split_once('.').unwrap_or(("", model_id));
    table_ident("quarantine", &format!("{layer}__{name}__{version}"))
}
