//! Write-Audit-Publish for a runner: its table staged when its expectations audit commits,
//! each commit judged ([`crate::commit_audit::CommitAudit`]) and published or quarantined,
//! and the rows its `drop` expectations set aside delivered to its quarantine table.

use std::collections::{BTreeMap, HashMap};

use kappa_lakehouse::Lakehouse;
use kappa_pipeline::Project;

use super::error::RunnerError;
use crate::commit_record::{EXPECTATIONS_PROPERTY, QUARANTINE_FROM_PROPERTY, QUARANTINE_PROPERTY};
use crate::tables::live_table;

/// What a quarantine's reason says after what failed: how a live model's waiting commits are
/// decided (`kappa publish`/`kappa discard`).
const DECISION_HINT: &str = "; main is untouched — ";

/// What failed, of a quarantine's reason: without how a live model's commits are decided
/// (which does not apply to a deploy's new version).
pub fn what_failed(reason: &str) -> &str {
    reason.split(DECISION_HINT).next().unwrap_or(reason)
}

/// Whether the table the deployed version of `model_id` writes holds commits waiting for a
/// decision (after its runner stopped quarantined).
pub async fn awaits_decision(
    lakehouse: &Lakehouse,
    project: &Project,
    model_id: &str,
) -> kappa_lakehouse::Result<bool> {
    let table = lakehouse
        .load_table(&live_table(lakehouse, project, model_id)?)
        .await?;
    Ok(kappa_lakehouse::wap::unpublished(&table).is_some())
}

/// Decides about `table`'s commits waiting on its audit branch, if any: published when the
/// model's expectations pass (or it has none that audit any more), quarantined otherwise.
/// `row_level_counted`: the row-level ones were counted on the rows written
/// ([`EXPECTATIONS_PROPERTY`]), not to be queried again.
pub(super) async fn settle(
    lakehouse: &Lakehouse,
    model: &kappa_pipeline::Model,
    table: kappa_lakehouse::Table,
    staged: bool,
    row_level_counted: bool,
    audit: &mut crate::commit_audit::CommitAudit,
) -> Result<kappa_lakehouse::Table, RunnerError> {
    let model_id = model.id();
    let lake_err = |source| RunnerError::Lakehouse {
        model: model_id.clone(),
        source,
    };
    let Some(head) = kappa_lakehouse::wap::unpublished(&table) else {
        return Ok(table);
    };
    if staged {
        let mut blocking = Vec::new();
        if row_level_counted {
            let counted: BTreeMap<String, u64> = head
                .summary()
                .additional_properties
                .get(EXPECTATIONS_PROPERTY)
                .and_then(|c| serde_json::from_str(c).ok())
                .unwrap_or_default();
            for e in &model.config.expectations {
                if let Some(n) = counted.get(&e.name)
                    && e.severity == kappa_pipeline::expect::Severity::Fail
                {
                    blocking.push(format!(
                        "expectation `{}` ({}) failed: {n} failing",
                        e.name,
                        e.check.kind()
                    ));
                }
            }
        }
        let judged = audit
            .judge(lakehouse, model, &table, row_level_counted)
            .await
            .map_err(lake_err)?;
        // A check that cannot run is retried (a table it reads may not exist yet), not a
        // reason to withhold the commit.
        if let Some(j) = judged.iter().find(|j| j.audited.error.is_some()) {
            return Err(lake_err(kappa_lakehouse::LakehouseError::Query(
                j.audited.describe(),
            )));
        }
        // A commit fails a check only by making it worse than what is published: a forced
        // publication, an empty table's freshness or a row count still growing to its minimum
        // do not hold back every commit after it.
        for j in &judged {
            if j.blocks() {
                blocking.push(j.audited.describe());
            } else if j.audited.failing > 0 {
                tracing::warn!(model = %model_id, "{}", j.audited.describe());
            }
        }
        if !blocking.is_empty() {
            let reason = format!(
                "{}{DECISION_HINT}`kappa audit {model_id}` shows what failed, `kappa publish \
                 {model_id} --force` or `kappa discard {model_id}` decides",
                blocking.join("; ")
            );
            tracing::error!(model = %model_id, "commit quarantined: {reason}");
            return Err(RunnerError::Quarantined {
                model: model_id,
                reason,
            });
        }
    }
    lakehouse.publish_audited(&table).await.map_err(lake_err)
}

/// Stages `table` (its commits go to the audit branch) when `staged`, unstages it otherwise.
/// Iceberg catalogs only branch from a snapshot: a staged table without one first gets an
/// empty one on main (readers see no rows either way).
pub(super) async fn set_staging(
    lakehouse: &Lakehouse,
    ident: &kappa_lakehouse::TableIdent,
    mut table: kappa_lakehouse::Table,
    staged: bool,
) -> kappa_lakehouse::Result<kappa_lakehouse::Table> {
    lakehouse.unstage(ident);
    if staged {
        if table.metadata().current_snapshot().is_none() {
            table = lakehouse
                .append_files(&table, Vec::new(), HashMap::new())
                .await?;
        }
        lakehouse.stage(ident);
    }
    Ok(table)
}

/// Delivers the rows the newest commit of `table` set aside to the quarantine table `into`
/// (of `schema`), unless that table's last commit delivered them already: exactly once,
/// whenever the runner stopped.
pub(super) async fn deliver_quarantined(
    lakehouse: &Lakehouse,
    table: &kappa_lakehouse::Table,
    into: &kappa_lakehouse::TableIdent,
    schema: &arrow::datatypes::SchemaRef,
) -> kappa_lakehouse::Result<()> {
    let Some(location) = kappa_lakehouse::wap::head(table)
        .and_then(|s| s.summary().additional_properties.get(QUARANTINE_PROPERTY))
        .cloned()
    else {
        return Ok(());
    };
    let quarantine = lakehouse.ensure_table(into, schema).await?;
    let delivered = quarantine
        .metadata()
        .current_snapshot()
        .and_then(|s| {
            s.summary()
                .additional_properties
                .get(QUARANTINE_FROM_PROPERTY)
        })
        .is_some_and(|from| *from == location);
    if delivered {
        return Ok(());
    }
    let rows = lakehouse.read_state(table, &location).await?;
    lakehouse
        .append(
            &quarantine,
            &rows,
            HashMap::from([(QUARANTINE_FROM_PROPERTY.to_owned(), location)]),
        )
        .await?;
    Ok(())
}
