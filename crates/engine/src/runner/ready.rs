//! What a model runs with: its sources, lookups, stage and operator, planned over its topics
//! or over the table its upstream published; and the table it writes.

use std::collections::HashMap;
use std::sync::Arc;

use kappa_lakehouse::{Lakehouse, table_ident};
use kappa_pipeline::Project;

use super::error::{RunnerError, planning_error};
use super::letters::rejects_reporter;
use crate::commit_record::{CommitRecord, VERSION_PROPERTY};
use crate::decode::Decoder;
use crate::dedup::Dedup;
use crate::dimension::Dimension;
use crate::event_log::EventLog;
use crate::operator::{Operator, Stage};
use crate::plan::plan_model;
use crate::source::Source;
use crate::stateless::StatelessModel;
use crate::stream_join::StreamJoin;
use crate::tables::written_table;
use crate::topic_source::{TopicReaders, TopicSource};
use crate::watermark::Watermarks;

/// A model planned over its topics: the stream topics (two when it joins them, the left side
/// first, each with its event time), its lookups, an optional stage and its operator.
struct Planned {
    /// Each with its event time and the schema of the slot its rows go in.
    sources: Vec<(
        String,
        Option<crate::plan::EventTime>,
        arrow::datatypes::SchemaRef,
    )>,
    dimensions: Vec<(String, Arc<crate::lookup::DimensionTable>)>,
    operator: Box<dyn Operator>,
    stage: Option<Box<dyn Stage>>,
    /// Row by row from one topic, appended: the topic's fields it writes unmasked, whose
    /// event-time marks its files carry (`None`: it is not).
    row_by_row: Option<Vec<String>>,
    /// For each side of a join that reads a model's table: the model, and its topic and the
    /// field of it whose marks that side's lateness is judged by (`upstream::joined_side`).
    marked_sides: Vec<(String, (String, String))>,
}

/// A model ready to run: what it reads, its lookups, its stage and its operator.
pub(super) struct Ready {
    pub sources: Vec<Box<dyn Source>>,
    pub dimensions: Vec<(String, Arc<crate::lookup::DimensionTable>)>,
    pub operator: Box<dyn Operator>,
    pub stage: Option<Box<dyn Stage>>,
}

/// Plans a model over its topics (and the models `tables` it reads as tables), or says why it
/// cannot run incrementally.
async fn plan_topics(
    project: &Project,
    model_id: &str,
    tables: &[String],
) -> Result<Planned, datafusion::error::DataFusionError> {
    let planned = crate::plan::plan_model_reading(project, model_id, tables).await?;
    let below_dedup = planned.dedup.as_ref().map(|d| &d.found.filter);
    if let Some(reason) =
        crate::mask_plan::missing_key(std::iter::once(&planned.plan).chain(below_dedup))
    {
        return Err(crate::error::unsupported(reason));
    }
    let row_by_row = (planned.shape == crate::plan::Shape::RowByRow
        && planned.dedup.is_none()
        && planned.join.is_none()
        && !project.is_dimension(model_id))
    .then(|| {
        planned
            .plan
            .schema()
            .columns()
            .into_iter()
            .filter_map(|c| {
                crate::windowed::source_column(
                    &datafusion::logical_expr::Expr::Column(c),
                    &planned.plan,
                )
            })
            .collect()
    });
    let mut marked_sides = Vec::new();
    for upstream in tables {
        if let Some(side) = crate::upstream::joined_side(project, &planned, upstream).await {
            marked_sides.push((upstream.clone(), side));
        }
    }
    let event_time = planned.event_time.clone();
    let dimensions = planned.dimensions.clone();
    let input_slot = planned.input_slot();
    let slot_schema = |slot: &Arc<datafusion::datasource::MemTable>| {
        datafusion::datasource::TableProvider::schema(slot.as_ref())
    };
    let mut sources = vec![(
        planned.topic.clone(),
        event_time.clone(),
        slot_schema(&planned.slot),
    )];
    let mut stage: Option<Box<dyn Stage>> = None;
    if let (Some(d), Some(et)) = (&planned.dedup, &event_time) {
        stage = Some(Box::new(Dedup::new(
            planned.ctx.clone(),
            planned.slot.clone(),
            &d.found,
            &et.column,
            d.horizon_ms,
            d.output_schema.clone(),
        )?));
    }
    if let Some(j) = &planned.join {
        sources.push((
            j.found.right_topic.clone(),
            Some(j.right_event_time.clone()),
            slot_schema(&j.right_slot),
        ));
        stage = Some(Box::new(StreamJoin::new(
            planned.ctx.clone(),
            &j.found,
            planned.slot.clone(),
            j.right_slot.clone(),
            j.output_schema.clone(),
        )?));
    }
    let operator: Box<dyn Operator> = match project.models.get(model_id) {
        Some(model) if project.is_dimension(model_id) => {
            let rows = StatelessModel::from_plan(planned.ctx, input_slot, planned.plan)?;
            let spec = crate::scd::ScdSpec::new(model, rows.output_schema().clone())?;
            Box::new(crate::scd::ScdModel::new(rows, spec))
        }
        _ => crate::operator::for_shape(
            planned.shape,
            planned.ctx,
            input_slot,
            planned.plan,
            planned.event_time,
        )?,
    };
    Ok(Planned {
        sources,
        dimensions,
        operator,
        stage,
        row_by_row,
        marked_sides,
    })
}

/// `model_id` planned over its stream topics, each read from the log.
pub(super) async fn over_topics(
    log: &EventLog,
    project: &Project,
    model_id: &str,
) -> Result<Ready, RunnerError> {
    over_streams(log, None, project, model_id).await
}

/// `model_id` planned over its streams: its topics, each read from the log, and with
/// `joined` (a lakehouse and models), the tables those models published as sides of a join of
/// two streams.
async fn over_streams(
    log: &EventLog,
    joined: Option<(&Lakehouse, &[String])>,
    project: &Project,
    model_id: &str,
) -> Result<Ready, RunnerError> {
    let tables: &[String] = joined.map_or(&[], |(_, models)| models);
    let Planned {
        sources: source_plans,
        dimensions,
        operator,
        stage,
        row_by_row,
        marked_sides,
    } = plan_topics(project, model_id, tables)
        .await
        .map_err(|e| planning_error(model_id, e))?;
    let needs_event_time = operator.uses_event_time() || stage.is_some();
    let mut sources: Vec<Box<dyn Source>> = Vec::with_capacity(source_plans.len());
    for (name, event_time, slot_schema) in source_plans {
        if let Some((lakehouse, upstream_id)) = joined
            .and_then(|(lakehouse, models)| Some((lakehouse, models.iter().find(|m| **m == name)?)))
        {
            let et = event_time.ok_or_else(|| {
                planning_error(
                    model_id,
                    datafusion::error::DataFusionError::Internal(
                        "a side of a join without event time".into(),
                    ),
                )
            })?;
            let (topic, field) = marked_sides
                .iter()
                .find(|(m, _)| m == upstream_id)
                .map(|(_, side)| side.clone())
                .ok_or_else(|| {
                    planning_error(
                        model_id,
                        datafusion::error::DataFusionError::Internal(format!(
                            "the join's side over {upstream_id} has no event time its files mark"
                        )),
                    )
                })?;
            let partitions = log
                .partition_count(&topic)
                .map_err(|source| RunnerError::Log {
                    model: model_id.to_owned(),
                    source,
                })?;
            let source = crate::upstream::TableSource::new(
                log,
                lakehouse,
                project,
                model_id,
                upstream_id,
                slot_schema,
                None,
            )
            .map_err(|e| RunnerError::of(model_id, e))?
            .judging_lateness(&et, &topic, &field, partitions);
            sources.push(Box::new(source));
            continue;
        }
        let log_err = |source| RunnerError::Log {
            model: model_id.to_owned(),
            source,
        };
        let partitions = log.partition_count(&name).map_err(log_err)?;
        let version = crate::tables::model_version(project, model_id);
        let readers = TopicReaders::of(log, &name, Some((model_id, &version))).map_err(log_err)?;
        // Late records are reported by the model that declares the event time, if it uses
        // it; otherwise by each model that does.
        let reports_late = match &event_time {
            Some(et) if et.declared_by != model_id => !plan_model(project, &et.declared_by)
                .await
                .is_ok_and(|p| p.uses_event_time()),
            _ => true,
        };
        // Event time at the source: late records set aside, the watermark advanced.
        let marks = match (&event_time, needs_event_time) {
            (Some(et), true) => Some(Watermarks::new(
                &et.column,
                et.index,
                et.delay_ms,
                partitions,
            )),
            _ => None,
        };
        let decoder = Decoder::new(&project.topics[&name]);
        sources.push(Box::new(TopicSource {
            times: row_by_row.as_ref().and_then(|published| {
                crate::topic_source::TimeMarks::new(decoder.schema(), published)
            }),
            decoder,
            // A record that does not fit its topic's schema is reported once, by one model.
            reports_rejects: rejects_reporter(project, &name).as_deref() == Some(model_id),
            reports_late,
            marks,
            readers,
            name,
        }));
    }
    Ok(Ready {
        sources,
        dimensions,
        operator,
        stage,
    })
}

/// `model_id` planned over the tables its upstreams `upstreams` published.
pub(super) async fn over_tables(
    log: &EventLog,
    lakehouse: &Lakehouse,
    project: &Project,
    model_id: &str,
    upstreams: &[String],
) -> Result<Ready, RunnerError> {
    let reading = crate::upstream::reading_of(project, model_id).await;
    if let Some((_, crate::upstream::Reading::Join)) = reading {
        return over_streams(log, Some((lakehouse, upstreams)), project, model_id).await;
    }
    let [upstream_id] = upstreams else {
        return Err(RunnerError::Unsupported {
            model: model_id.to_owned(),
            reason: format!(
                "it was deployed to read the tables of {}, and reads them only as the two \
                 sides of a join of two streams, which it no longer plans as",
                upstreams.join(" and ")
            ),
        });
    };
    if let Some((_, crate::upstream::Reading::Refresh)) = reading {
        let (ctx, slot, plan, _) = crate::plan_tables::plan_refresh(project, model_id)
            .await
            .map_err(|e| planning_error(model_id, e))?;
        let source = crate::upstream::SnapshotSource::new(
            lakehouse,
            project,
            upstream_id,
            datafusion::datasource::TableProvider::schema(slot.as_ref()),
        )
        .map_err(|e| RunnerError::of(model_id, e))?;
        return Ok(Ready {
            sources: vec![Box::new(source)],
            dimensions: Vec::new(),
            operator: Box::new(crate::refresh::Refresh::new(ctx, slot, plan)),
            stage: None,
        });
    }
    let (planned, _) = crate::plan_tables::plan_over_upstream(project, model_id)
        .await
        .map_err(|e| planning_error(model_id, e))?;
    let source = crate::upstream::TableSource::new(
        log,
        lakehouse,
        project,
        model_id,
        upstream_id,
        datafusion::datasource::TableProvider::schema(planned.slot.as_ref()),
        planned.upstream_marks.as_ref(),
    )
    .map_err(|e| RunnerError::of(model_id, e))?;
    let operator = crate::operator::for_shape(
        planned.shape,
        planned.ctx,
        planned.slot,
        planned.plan,
        planned.event_time,
    )
    .map_err(|e| planning_error(model_id, e))?;
    Ok(Ready {
        sources: vec![Box::new(source)],
        dimensions: planned.dimensions,
        operator,
        stage: None,
    })
}

/// The table the version `version` of `model_id` writes (see [`run_version`]), created as
/// `output_schema` says, or rebuilt when another version or schema wrote it; with
/// `publish_if_new`, published as the model's public table when that names none yet.
pub(crate) async fn open_output(
    lakehouse: &Lakehouse,
    project: &Project,
    model_id: &str,
    version: &str,
    output_schema: &arrow::datatypes::SchemaRef,
    publish_if_new: bool,
) -> Result<(kappa_lakehouse::TableIdent, kappa_lakehouse::Table), RunnerError> {
    let model = &project.models[model_id];
    let err_model = || model_id.to_owned();
    let (public, ident) = table_ident(&model.layer, &model.name)
        .and_then(|public| {
            let ident = written_table(lakehouse, &model.layer, &model.name, version)?;
            Ok((public, ident))
        })
        .map_err(|source| RunnerError::Lakehouse {
            model: err_model(),
            source,
        })?;
    let lake_err = |source| RunnerError::Lakehouse {
        model: model_id.to_owned(),
        source,
    };
    let partition_by = &model.config.partition_by;
    let mut table = lakehouse
        .ensure_partitioned_table(&ident, output_schema, partition_by)
        .await
        .map_err(lake_err)?;
    let written_by = kappa_lakehouse::wap::head(&table).and_then(|s| {
        s.summary()
            .additional_properties
            .get(VERSION_PROPERTY)
            .cloned()
    });
    if written_by.is_some_and(|v| v != version) || !lakehouse.schema_matches(&table, output_schema)
    {
        // The model changed: its table is rebuilt from the start of the log.
        tracing::warn!(model = %model_id, "the model changed since its table was written; rebuilding the table from the start of the log");
        table = lakehouse
            .replace_table(&ident, output_schema, partition_by)
            .await
            .map_err(lake_err)?;
    }
    if publish_if_new
        && public != ident
        && !lakehouse
            .aliases()
            .await
            .map_err(lake_err)?
            .contains_key(&public)
    {
        // The model's first version: its table is the public one from the start.
        lakehouse
            .publish(&[(public.clone(), ident.clone())])
            .await
            .map_err(lake_err)?;
    }
    Ok((ident, table))
}

/// The dimensions `model_id` looks up, each with whether this model reports the records of
/// its topic that do not fit its schema.
pub(super) async fn open_dimensions(
    log: &EventLog,
    lakehouse: &Lakehouse,
    project: &Project,
    model_id: &str,
    dimensions: Vec<(String, Arc<crate::lookup::DimensionTable>)>,
) -> Result<Vec<(Dimension, bool)>, RunnerError> {
    let mut dims = Vec::new();
    for (name, table) in dimensions {
        if project.models.contains_key(&name) {
            dims.push((
                open_dimension_model(log, lakehouse, project, model_id, &name, table).await?,
                false,
            ));
            continue;
        }
        let readers = dimension_readers(log, model_id, &name)?;
        let dimension =
            Dimension::new(readers, &project.topics[&name], table).map_err(|reason| {
                RunnerError::Unsupported {
                    model: model_id.to_owned(),
                    reason,
                }
            })?;
        let reports = rejects_reporter(project, &name).as_deref() == Some(model_id);
        dims.push((dimension, reports));
    }
    Ok(dims)
}

/// The model `name` (a dimension, or a GROUP BY) looked up by `model_id`: its version's table
/// as `main` published it (its own runner computes it and reports the records that do not
/// fit). It covers one topic: the one it reads, or the one the last of the tables it reads
/// (`Project::reads_tables`, followed down) reads.
async fn open_dimension_model(
    log: &EventLog,
    lakehouse: &Lakehouse,
    project: &Project,
    model_id: &str,
    name: &str,
    table: Arc<crate::lookup::DimensionTable>,
) -> Result<Dimension, RunnerError> {
    let plan_error = |source| planning_error(model_id, source);
    let lake_err = |source| RunnerError::Lakehouse {
        model: model_id.to_owned(),
        source,
    };
    let read = project.table_chain(name);
    let mut chain = Vec::with_capacity(read.len());
    for upstream in &read {
        let table =
            crate::upstream::upstream_table(lakehouse, project, upstream).map_err(lake_err)?;
        let key = crate::upstream::table_key(&table);
        chain.push((table, key));
    }
    let bottom = read.last().copied().unwrap_or(name);
    let planned = plan_model(project, bottom).await.map_err(plan_error)?;
    if planned.join.is_some() {
        return Err(RunnerError::Unsupported {
            model: model_id.to_owned(),
            reason: format!(
                "{name} is looked up, and {bottom} joins two streams: a model looked up by a \
                 stream reads one topic (itself or through the tables it reads), so that each \
                 micro-batch can wait until it covers that topic's end"
            ),
        });
    }
    let spec = project.topics.get(&planned.topic).ok_or_else(|| {
        plan_error(datafusion::error::DataFusionError::Plan(format!(
            "no topic `{}`",
            planned.topic
        )))
    })?;
    let readers = dimension_readers(log, model_id, &planned.topic)?;
    let published = crate::tables::live_table(lakehouse, project, name).map_err(lake_err)?;
    Ok(Dimension::published(
        name,
        readers,
        spec,
        table,
        lakehouse.clone(),
        published,
        chain,
    ))
}

/// Whether the commit whose summary is `properties` records positions in topics and none in
/// an upstream's table (dimensions aside).
/// (A record that does not read is reported where it is read for the start.)
pub(super) fn written_from_topics(properties: Option<&HashMap<String, String>>) -> bool {
    CommitRecord::of(properties).is_ok_and(|r| crate::commit_record::from_topics(&r.offsets))
}

/// Readers of the topic `name` a dimension is read from (they commit to no consumer group: the
/// model's stream topics do).
fn dimension_readers(
    log: &EventLog,
    model_id: &str,
    name: &str,
) -> Result<TopicReaders, RunnerError> {
    TopicReaders::of(log, name, None).map_err(|source| RunnerError::Log {
        model: model_id.to_owned(),
        source,
    })
}
