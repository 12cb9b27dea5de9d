//! Planning a model over the tables its upstream models published (`upstream.rs` reads
//! them): one appending upstream read commit by commit (`plan_over_upstream`), or one upserted
//! upstream whose whole table the model's SQL runs over at each commit (`plan_refresh`).

use std::sync::Arc;

use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::TableReference;
use kappa_pipeline::Project;

use crate::aggregate::aggregate_shape;
use crate::dedup::find_dedup;
use crate::plan::{
    PlannedModel, Shape, analyzed_plan, dimension_schema, keep_own_lookups, key_problem,
    plan_model, plan_over_rows, register_inputs, shape_of, slot_for_view,
};
use crate::stateless::session;
use crate::windowed::window_key;

/// The one model `model_id` reads, when it reads one and otherwise only dimensions (topics of
/// kind "table").
pub fn upstream_of(project: &Project, model_id: &str) -> Option<String> {
    match crate::plan::one_model_read(project, model_id)? {
        (upstream, 0) => Some(upstream),
        _ => None,
    }
}

/// Plans `model_id`, which reads one model and otherwise only dimensions, over that model's
/// committed rows: the upstream's name is a slot of its output schema that the rows its table's commits
/// added are put in (`upstream.rs`). Only models whose output over a stream does not depend on
/// the order of its rows run this way: row by row, or one GROUP BY upserted (no event time,
/// windows, deduplication or joins). Returns the plan and the upstream model.
pub async fn plan_over_upstream(
    project: &Project,
    model_id: &str,
) -> Result<(PlannedModel, String)> {
    let model = project
        .models
        .get(model_id)
        .ok_or_else(|| DataFusionError::Plan(format!("no model `{model_id}`")))?;
    let upstream_id = upstream_of(project, model_id).ok_or_else(|| {
        crate::error::unsupported(format!(
            "{model_id} reads more than one model, or a stream topic: it recomputes what it \
             reads"
        ))
    })?;
    let upstream = project
        .models
        .get(&upstream_id)
        .ok_or_else(|| DataFusionError::Plan(format!("no model `{upstream_id}`")))?;
    if project.is_dimension(model_id) {
        return Err(crate::error::unsupported(
            "a dimension recomputes what it reads".into(),
        ));
    }
    let ctx = session();
    let (_, _, mut dimensions) = register_inputs(&ctx, project, model_id).await?;
    keep_own_lookups(model, &mut dimensions);
    let slot = slot_for_view(&ctx, upstream).await?;
    let plan = analyzed_plan(&ctx, model).await?;
    if find_dedup(&plan)
        .map_err(crate::error::unsupported)?
        .is_some()
    {
        return Err(crate::error::unsupported(
            "a deduplicating model recomputes what it reads".into(),
        ));
    }
    // The shape it has when it recomputes its upstream decides: a GROUP BY over the event
    // time its upstream declares is windowed.
    let inline = plan_model(project, model_id).await?;
    let mut shape = shape_of(&plan).map_err(crate::error::unsupported)?;
    let mut upstream_marks = None;
    if inline.shape == Shape::Windowed && shape == Shape::Grouped {
        let et = inline.event_time.as_ref().ok_or_else(|| {
            DataFusionError::Internal("a windowed model without event time".into())
        })?;
        let aggregate = aggregate_shape(&plan).map_err(crate::error::unsupported)?;
        if window_key(aggregate, &et.column)
            .map_err(crate::error::unsupported)?
            .is_some()
        {
            shape = Shape::Windowed;
        }
        // Windows close as the upstream's watermark passes them, which says that no row
        // still to come is older only when the upstream emits rows as its watermark passes
        // them: a deduplication.
        let up = plan_model(project, &upstream_id).await?;
        match (&up.dedup, &up.event_time) {
            (Some(_), Some(up_et)) if up_et.column == et.column => {
                upstream_marks = Some((up.topic.clone(), up_et.clone()));
            }
            _ => {
                return Err(crate::error::unsupported(
                    "windows over a model that does not emit its rows in watermark order \
                     recompute it"
                        .into(),
                ));
            }
        }
    }
    // A join of two streams upstream (inlined in `inline`) is no reason to recompute: its
    // table holds the pairs, appended.
    if shape != inline.shape {
        return Err(crate::error::unsupported(
            "over its upstream's table the model would run another way; it recomputes it".into(),
        ));
    }
    key_problem(&plan, shape, model).map_err(DataFusionError::Configuration)?;
    Ok((
        PlannedModel {
            ctx,
            topic: upstream_id.clone(),
            dimensions,
            slot,
            plan,
            shape,
            event_time: upstream_marks.as_ref().and(inline.event_time),
            dedup: None,
            join: None,
            upstream_marks,
        },
        upstream_id,
    ))
}

/// Plans `model_id`, which reads exactly one model and nothing else, as a batch query over
/// that model's published rows (`refresh.rs`): any SQL, run whole on each upstream commit.
/// Returns the session, the slot the upstream's rows go in (its name, its output schema), the
/// plan, and the upstream model.
pub async fn plan_refresh(
    project: &Project,
    model_id: &str,
) -> Result<(SessionContext, Arc<MemTable>, LogicalPlan, String)> {
    let model = project
        .models
        .get(model_id)
        .ok_or_else(|| DataFusionError::Plan(format!("no model `{model_id}`")))?;
    let upstream_id = match model.inputs.as_slice() {
        [kappa_pipeline::Input::Model(m)] if !project.is_dimension(model_id) => m.clone(),
        _ => {
            return Err(crate::error::unsupported(format!(
                "{model_id} reads more than one model, or a topic: it is not refreshed from \
                 one table"
            )));
        }
    };
    let upstream = project
        .models
        .get(&upstream_id)
        .ok_or_else(|| DataFusionError::Plan(format!("no model `{upstream_id}`")))?;
    let ctx = session();
    register_inputs(&ctx, project, model_id).await?;
    let reference = TableReference::partial(upstream.layer.as_str(), upstream.name.as_str());
    let schema = match project.is_dimension(&upstream_id) {
        true => dimension_schema(project, &upstream_id).await?,
        false => crate::stateless::storable_schema(
            ctx.table(reference.clone()).await?.schema().as_arrow(),
        ),
    };
    let (slot, plan) = plan_over_rows(&ctx, upstream, schema, model).await?;
    if let Some(e) = model
        .config
        .expectations
        .iter()
        .find(|e| e.severity == kappa_pipeline::expect::Severity::Drop)
    {
        return Err(DataFusionError::Configuration(format!(
            "expectation `{}` has severity = \"drop\", which sets rows aside as a model appends \
             them; {model_id} is refreshed whole from {upstream_id}'s table at each of its \
             commits: use \"fail\" or \"warn\", or leave the rows out in its SQL",
            e.name
        )));
    }
    Ok((ctx, slot, plan, upstream_id))
}
