//! A model waits while a model it reads is quarantined (its commit awaits a decision) or keeps
//! failing: it computes nothing on rows its upstream withholds.

use kappa_lakehouse::Lakehouse;
use kappa_pipeline::Project;

use crate::tables::{live_table, written_table};

/// A model `model_id` reads (directly or not) whose writer stopped until someone decides, and
/// why ([`kappa_lakehouse::Lakehouse::block`]).
pub fn blocked_upstream(
    lakehouse: &Lakehouse,
    project: &Project,
    model_id: &str,
) -> Option<(String, String)> {
    first_blocked(lakehouse, &upstream_tables(lakehouse, project, model_id))
}

/// What `model_id` waits for before it starts: a blocked model it reads (directly or not), or
/// one whose last commit awaits its audit on the audit branch — which outlives a restart, when
/// the blocks (in memory) do not. `None`: it may run.
pub async fn waits_for(
    lakehouse: &Lakehouse,
    project: &Project,
    model_id: &str,
) -> Option<(String, String)> {
    let upstream = upstream_tables(lakehouse, project, model_id);
    if let Some(blocked) = first_blocked(lakehouse, &upstream) {
        return Some(blocked);
    }
    for (id, ident) in &upstream {
        if let Ok(table) = lakehouse.load_table(ident).await
            && kappa_lakehouse::wap::unpublished(&table).is_some()
        {
            return Some((id.clone(), "awaiting the audit of its last commit".into()));
        }
    }
    None
}

/// Blocks the table of `model_id` (which keeps failing with `error`) so that the models reading
/// it wait; a quarantine's block stays as it is.
pub fn block_failing(lakehouse: &Lakehouse, project: &Project, model_id: &str, error: &str) {
    if let Ok(ident) = live_table(lakehouse, project, model_id)
        && lakehouse
            .blocked(&ident)
            .is_none_or(|reason| reason.starts_with(FAILING))
    {
        lakehouse.block(&ident, &format!("{FAILING}: {error}"));
    }
}

/// The reason a failing model's table is blocked with, so that the models reading it wait.
pub const FAILING: &str = "failing";

/// A runner committed, or found nothing to commit, without failing: a block its failures set
/// (not a quarantine's) is lifted.
pub fn recovered(lakehouse: &Lakehouse, ident: &kappa_lakehouse::TableIdent) {
    if lakehouse
        .blocked(ident)
        .is_some_and(|reason| reason.starts_with(FAILING))
    {
        lakehouse.unblock(ident);
    }
}

/// The models `model_id` reads (directly or not) with the tables they write.
pub(super) fn upstream_tables(
    lakehouse: &Lakehouse,
    project: &Project,
    model_id: &str,
) -> Vec<(String, kappa_lakehouse::TableIdent)> {
    // Every version at once: one hash of the project, not one per model.
    let versions = kappa_pipeline::deploy::versions(project);
    project
        .order
        .iter()
        .filter(|id| crate::plan::reads_transitively(project, model_id, id))
        .filter_map(|id| {
            let (layer, name) = id.split_once('.')?;
            let ident = written_table(lakehouse, layer, name, versions.get(id)?).ok()?;
            Some((id.clone(), ident))
        })
        .collect()
}

/// The first of `upstream` whose writer is blocked, and why.
pub(super) fn first_blocked(
    lakehouse: &Lakehouse,
    upstream: &[(String, kappa_lakehouse::TableIdent)],
) -> Option<(String, String)> {
    upstream
        .iter()
        .find_map(|(id, ident)| Some((id.clone(), lakehouse.blocked(ident)?)))
}
