//! From a model to the plan the engine runs: the model's SQL planned by DataFusion over its
//! source topic, with every model it reads inlined as a view, then sorted by shape.
//!
//! ```text
//!  gold.revenue ──reads──► silver.orders ──reads──► topic orders
//!        └─ planned as: gold's SQL over (silver's SQL over the micro-batch slot of `orders`)
//! ```
//!
//! Inlining means a model that reads another recomputes it from the log, in the same runner,
//! with the same exactly-once commit; no model waits for another's table.

use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::catalog::MemorySchemaProvider;
use datafusion::common::tree_node::TreeNode;
use datafusion::datasource::{MemTable, ViewTable};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Distinct, LogicalPlan, LogicalPlanBuilder};
use datafusion::prelude::{SessionContext, col};
use datafusion::sql::TableReference;
use kappa_pipeline::{Input, Materialization, Model, Project};

use crate::aggregate::{NO_GROUP_BY, aggregate_shape, slot_for};
use crate::dedup::{DEFAULT_HORIZON_MS, DedupMatch, find_dedup, replace_dedup};
use crate::lookup::DimensionTable;
use crate::schema::topic_schema;
use crate::stateless::{session, stateless_shape};
use crate::stream_join::{StreamJoinMatch, find_stream_join, replace_join};
use crate::windowed::window_key;

/// How a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Each output row from one input row: appended batch by batch.
    RowByRow,
    /// One GROUP BY (or DISTINCT) with row-by-row steps around it: upserted in place.
    Grouped,
    /// One GROUP BY with a window over event time: appended when windows close.
    Windowed,
}

/// The event time of a model's rows: a timestamp field of its source topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTime {
    pub column: String,
    /// Its index in the topic's schema.
    pub index: usize,
    /// How far the watermark trails the latest event, in milliseconds.
    pub delay_ms: u64,
    /// The model whose configuration declares it.
    pub declared_by: String,
}

/// A model planned over the micro-batch slot of its source topic.
pub struct PlannedModel {
    pub ctx: SessionContext,
    /// The topic every row of the model comes from (the left side of a join of two streams).
    pub topic: String,
    /// The topics of kind "table" it joins, each with the table its current rows are put in.
    pub dimensions: Vec<(String, Arc<DimensionTable>)>,
    /// The table the topic's micro-batches are put in.
    pub slot: Arc<MemTable>,
    /// The analyzed plan (views inlined, types coerced).
    pub plan: LogicalPlan,
    pub shape: Shape,
    /// Declared by the model or the models it reads (the nearest declaration wins).
    pub event_time: Option<EventTime>,
    /// A deduplication between the source and `plan`, whose output `plan` reads.
    pub dedup: Option<DedupPlan>,
    /// A join of `topic` with a second stream, whose output `plan` reads.
    pub join: Option<StreamJoinPlan>,
    /// Over an upstream's table (`plan_over_upstream`), windowed: the upstream's source topic
    /// and event time, whose watermarks its commits record and which close the windows.
    pub upstream_marks: Option<(String, EventTime)>,
}

/// A join of two streams found in a model.
#[derive(Debug)]
pub struct StreamJoinPlan {
    pub found: StreamJoinMatch,
    /// The table the right topic's micro-batches are put in.
    pub right_slot: Arc<MemTable>,
    /// The right topic's event time (the left one's is the model's `event_time`).
    pub right_event_time: EventTime,
    /// The table the joined rows are put in for the rest of the plan.
    pub output_slot: Arc<MemTable>,
    pub output_schema: arrow::datatypes::SchemaRef,
}

/// A deduplication found in a model.
#[derive(Debug)]
pub struct DedupPlan {
    pub found: DedupMatch,
    /// The table the deduplicated rows are put in for the rest of the plan.
    pub output_slot: Arc<MemTable>,
    pub output_schema: arrow::datatypes::SchemaRef,
    pub horizon_ms: u64,
}

impl PlannedModel {
    /// Whether the model needs event time at its source (windows, deduplication).
    pub fn uses_event_time(&self) -> bool {
        self.shape == Shape::Windowed || self.dedup.is_some() || self.join.is_some()
    }

    /// The table the rest of the plan reads: the dedup's or the join's output, or the source.
    pub fn input_slot(&self) -> Arc<MemTable> {
        match (&self.dedup, &self.join) {
            (Some(d), _) => d.output_slot.clone(),
            (None, Some(j)) => j.output_slot.clone(),
            (None, None) => self.slot.clone(),
        }
    }
}

impl std::fmt::Debug for PlannedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlannedModel")
            .field("topic", &self.topic)
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

/// Sorts the topics a model reads into its streams (one, or two it joins) and the tables
/// (dimensions) it looks up. A model that reads only one table reads its records as a stream.
fn stream_and_tables(
    project: &Project,
    topics: &BTreeSet<String>,
) -> Result<(Vec<String>, Vec<String>)> {
    let (tables, streams): (Vec<String>, Vec<String>) = topics
        .iter()
        .cloned()
        .partition(|t| project.is_table_topic(t));
    match (streams.as_slice(), tables.as_slice()) {
        ([_] | [_, _], _) => Ok((streams, tables)),
        ([], [one]) => Ok((vec![one.clone()], Vec::new())),
        ([], []) => Err(crate::error::unsupported("the model reads no topic".into())),
        ([], many) => Err(crate::error::unsupported(format!(
            "the model reads only tables ({}); join them to a stream, which drives the lookups",
            many.join(", ")
        ))),
        (many, _) => Err(crate::error::unsupported(format!(
            "the model reads {} streams ({}); a model joins at most two streams — write one \
             model per join, or declare the sides that hold the current state of something as \
             kind = \"table\" in their topics/<name>.toml, and they become dimensions looked \
             up by each event",
            many.len(),
            many.join(", ")
        ))),
    }
}

/// Plans `model_id`. An [`crate::error::Unsupported`] error says why the model cannot run
/// incrementally.
pub async fn plan_model(project: &Project, model_id: &str) -> Result<PlannedModel> {
    plan_model_reading(project, model_id, &[]).await
}

/// Plans `model_id` with the models `tables` (which it reads directly) read as streams of
/// their published rows, each a slot of its output schema named `layer.name`, instead of
/// recomputed from their topics.
pub async fn plan_model_reading(
    project: &Project,
    model_id: &str,
    tables: &[String],
) -> Result<PlannedModel> {
    let model = project
        .models
        .get(model_id)
        .ok_or_else(|| DataFusionError::Plan(format!("no model `{model_id}`")))?;
    let ctx = session();
    let (mut streams, mut slots, mut dimensions) = register_inputs(&ctx, project, model_id).await?;
    if !tables.is_empty() {
        (streams, slots) = read_as_tables(&ctx, project, model_id, tables, slots).await?;
        keep_own_lookups(model, &mut dimensions);
    }
    let plan = analyzed_plan(&ctx, model).await?;
    let (plan, join) = match slots.len() {
        1 => (plan, None),
        _ => {
            let (rest, join) = plan_stream_join(project, model_id, &plan, &streams, &slots)?;
            (rest, Some(join))
        }
    };
    let (topic, slot) = match &join {
        Some(j) => slots
            .iter()
            .find(|(name, _)| *name == j.found.left_topic)
            .cloned(),
        None => slots.first().cloned(),
    }
    .ok_or_else(|| DataFusionError::Internal("a model without a stream".into()))?;
    let event_time = match &join {
        Some(j) => Some(join_event_time(
            project,
            model_id,
            &topic,
            &slot,
            &j.found.left_time,
        )?),
        None => {
            let spec = project
                .topics
                .get(&topic)
                .ok_or_else(|| DataFusionError::Plan(format!("no topic `{topic}`")))?;
            event_time_of(project, model_id, spec)?
        }
    };
    let (plan, dedup) = match find_dedup(&plan).map_err(crate::error::unsupported)? {
        None => (plan, None),
        Some(_) if join.is_some() => {
            return Err(crate::error::unsupported(
                "deduplication and a join of two streams in one model are not supported yet".into(),
            ));
        }
        Some(found) => {
            if event_time.is_none() {
                return Err(crate::error::unsupported(format!(
                    "deduplication needs the event time: set event_time (and watermark) in {}",
                    model.file.replace(".sql", ".toml")
                )));
            }
            let (output_slot, output_schema, scan) =
                slot_for("kappa_dedup", found.filter.schema())?;
            let rest = replace_dedup(plan, &found, &scan)?;
            let horizon_ms = dedup_horizon_of(project, model_id).unwrap_or(DEFAULT_HORIZON_MS);
            (
                rest,
                Some(DedupPlan {
                    found,
                    output_slot,
                    output_schema,
                    horizon_ms,
                }),
            )
        }
    };
    let mut shape = shape_of(&plan).map_err(crate::error::unsupported)?;
    if shape == Shape::Grouped {
        let windowed = match (&event_time, model.config.materialization) {
            (Some(et), materialization) if materialization != Some(Materialization::Upsert) => {
                let aggregate = aggregate_shape(&plan).map_err(crate::error::unsupported)?;
                window_key(aggregate, &et.column)
                    .map_err(crate::error::unsupported)?
                    .is_some()
            }
            _ => false,
        };
        if windowed && join.is_some() {
            return Err(crate::error::unsupported(
                "windows over a join of two streams are not supported yet (a pair is produced \
                 when its second row arrives, up to the time bound after the first); group the \
                 joined rows by their keys instead"
                    .into(),
            ));
        } else if windowed {
            shape = Shape::Windowed;
        } else if model.config.materialization == Some(Materialization::Append) {
            return Err(crate::error::unsupported(
                "materialization = \"append\", but a GROUP BY without a window over the event \
                 time updates its rows; use \"upsert\", or group by a window such as \
                 date_bin(INTERVAL '1 minute', <event_time>)"
                    .into(),
            ));
        }
    }
    if project.is_dimension(model_id) {
        if shape != Shape::RowByRow || dedup.is_some() || join.is_some() {
            return Err(crate::error::unsupported(
                "a dimension (materialization = \"scd1\" or \"scd2\") is computed row by row \
                 from its topic: one row per record, which it keeps as the versions of its key; \
                 no GROUP BY, windows, deduplication or join of two streams (lookups of other \
                 dimensions are fine)"
                    .into(),
            ));
        }
    } else {
        key_problem(&plan, shape, model).map_err(DataFusionError::Configuration)?;
    }
    if shape != Shape::RowByRow
        && let Some(e) = model
            .config
            .expectations
            .iter()
            .find(|e| e.severity == kappa_pipeline::expect::Severity::Drop)
    {
        return Err(DataFusionError::Configuration(format!(
            "expectation `{}`: severity \"drop\" sets rows aside as the model writes them, \
             which a model that updates its rows (a GROUP BY or windows) does not do; use \
             \"warn\" or \"fail\", or drop the rows in the model that reads the topic",
            e.name
        )));
    }
    Ok(PlannedModel {
        ctx,
        topic,
        dimensions,
        slot,
        plan,
        shape,
        event_time,
        dedup,
        join,
        upstream_marks: None,
    })
}

/// Keeps of `dimensions` the lookups `model` names itself: those of the models it reads as
/// tables are in their tables.
pub(crate) fn keep_own_lookups(model: &Model, dimensions: &mut Vec<(String, Arc<DimensionTable>)>) {
    dimensions.retain(|(name, _)| {
        model.inputs.contains(&Input::Topic(name.clone()))
            || model.inputs.contains(&Input::Model(name.clone()))
    });
}

/// The one model (not a dimension) `model_id` reads, with how many stream topics it reads
/// beside it; `None` when it reads no such model or several.
pub(crate) fn one_model_read(project: &Project, model_id: &str) -> Option<(String, usize)> {
    let (models, streams) = models_read(project, model_id)?;
    let [upstream] = <[String; 1]>::try_from(models).ok()?;
    Some((upstream, streams))
}

/// The models `model_id` reads as streams of rows (not those it looks up), sorted by name (as
/// `Model::inputs`), with how many stream topics it reads beside them; `None`: no model
/// `model_id`.
pub(crate) fn models_read(project: &Project, model_id: &str) -> Option<(Vec<String>, usize)> {
    let mut models = Vec::new();
    let mut streams = 0;
    for input in &project.models.get(model_id)?.inputs {
        match input {
            Input::Model(m) if project.looks_up(model_id, m) => {}
            Input::Model(m) => models.push(m.clone()),
            Input::Topic(t) => streams += usize::from(!project.is_table_topic(t)),
        }
    }
    Some((models, streams))
}

/// Replaces the views of `tables` (models `model_id` reads directly) by slots of their output
/// schema, and returns the streams the model itself reads: its stream topics, then `tables`.
#[allow(clippy::type_complexity)]
async fn read_as_tables(
    ctx: &SessionContext,
    project: &Project,
    model_id: &str,
    tables: &[String],
    topic_slots: Vec<(String, Arc<MemTable>)>,
) -> Result<(Vec<String>, Vec<(String, Arc<MemTable>)>)> {
    let model = &project.models[model_id];
    let mut slots: Vec<(String, Arc<MemTable>)> = topic_slots
        .into_iter()
        .filter(|(name, _)| model.inputs.contains(&Input::Topic(name.clone())))
        .collect();
    for id in tables {
        let upstream = project
            .models
            .get(id)
            .ok_or_else(|| DataFusionError::Plan(format!("no model `{id}`")))?;
        slots.push((id.clone(), slot_for_view(ctx, upstream).await?));
    }
    Ok((slots.iter().map(|(name, _)| name.clone()).collect(), slots))
}

/// Puts a slot where the view of `upstream` was in `ctx`, for the rows its table published:
/// of the schema its SQL gives (its table holds the same columns; rows read back are cast).
pub(crate) async fn slot_for_view(ctx: &SessionContext, upstream: &Model) -> Result<Arc<MemTable>> {
    let reference = TableReference::partial(upstream.layer.as_str(), upstream.name.as_str());
    let schema = Arc::new(
        ctx.table(reference.clone())
            .await?
            .schema()
            .as_arrow()
            .clone(),
    );
    ctx.deregister_table(reference.clone())?;
    let slot = Arc::new(MemTable::try_new(schema, vec![vec![]])?);
    ctx.register_table(reference, slot.clone())?;
    Ok(slot)
}

/// Registers in `ctx` what `model_id` reads: its stream topics as slots (returned with their
/// names), its dimensions, and every model it reads, directly or not, as a view.
#[allow(clippy::type_complexity)]
pub(crate) async fn register_inputs(
    ctx: &SessionContext,
    project: &Project,
    model_id: &str,
) -> Result<(
    Vec<String>,
    Vec<(String, Arc<MemTable>)>,
    Vec<(String, Arc<DimensionTable>)>,
)> {
    let topics = project.stream_topics(model_id);
    let (streams, tables) = stream_and_tables(project, &topics)?;
    let mut slots = Vec::new();
    for name in &streams {
        let spec = project
            .topics
            .get(name)
            .ok_or_else(|| DataFusionError::Plan(format!("no topic `{name}`")))?;
        let slot = Arc::new(MemTable::try_new(topic_schema(spec), vec![vec![]])?);
        ctx.register_table(TableReference::bare(name.as_str()), slot.clone())?;
        slots.push((name.clone(), slot));
    }
    let mut dimensions = Vec::new();
    for name in tables {
        let table_spec = project
            .topics
            .get(&name)
            .ok_or_else(|| DataFusionError::Plan(format!("no topic `{name}`")))?;
        let table = Arc::new(DimensionTable::new(topic_schema(table_spec))?);
        ctx.register_table(TableReference::bare(name.as_str()), table.clone())?;
        dimensions.push((name, table));
    }
    // Dimension models (every version) and GROUP BYs read beside a stream are looked up:
    // their published rows are put in a table.
    for id in project.dimension_models(model_id) {
        let dimension = &project.models[&id];
        let schema = lookup_schema(project, &id).await?;
        let table = Arc::new(DimensionTable::new(schema)?);
        register_schema(ctx, &dimension.layer);
        ctx.register_table(
            TableReference::partial(dimension.layer.as_str(), dimension.name.as_str()),
            table.clone(),
        )?;
        dimensions.push((id, table));
    }
    // Upstream models become views, in dependency order.
    let upstream: BTreeSet<&String> = project
        .order
        .iter()
        .filter(|id| id.as_str() != model_id && project.recomputes(model_id, id.as_str()))
        .collect();
    for id in project.order.iter().filter(|id| upstream.contains(id)) {
        let upstream_model = &project.models[id];
        let plan = ctx.state().create_logical_plan(&upstream_model.sql).await?;
        let plan = crate::mask_plan::mask_plan(plan, &upstream_model.config.mask)?;
        let plan = crate::expect::without_dropped(ctx, plan, upstream_model)?;
        register_schema(ctx, &upstream_model.layer);
        ctx.register_table(
            TableReference::partial(upstream_model.layer.as_str(), upstream_model.name.as_str()),
            Arc::new(ViewTable::new(plan, Some(upstream_model.sql.clone()))),
        )?;
    }
    Ok((streams, slots, dimensions))
}

/// Finds the join of the model's two streams and replaces it by the slot its pairs are put in.
fn plan_stream_join(
    project: &Project,
    model_id: &str,
    plan: &LogicalPlan,
    streams: &[String],
    slots: &[(String, Arc<MemTable>)],
) -> Result<(LogicalPlan, StreamJoinPlan)> {
    let found = find_stream_join(plan, streams)
        .map_err(crate::error::unsupported)?
        .ok_or_else(|| {
            crate::error::unsupported(format!(
                "the model reads two streams ({}) but does not join them; a join of two \
                 streams needs a time bound in its ON clause, such as ON p.order_id = o.id \
                 AND p.ts BETWEEN o.ts AND o.ts + INTERVAL '1 hour'",
                streams.join(", ")
            ))
        })?;
    let right_slot = slots
        .iter()
        .find(|(name, _)| *name == found.right_topic)
        .map(|(_, slot)| slot.clone())
        .ok_or_else(|| DataFusionError::Internal("the join's right topic has no slot".into()))?;
    let right_event_time = join_event_time(
        project,
        model_id,
        &found.right_topic,
        &right_slot,
        &found.right_time,
    )?;
    let (output_slot, output_schema, scan) = slot_for("kappa_join", found.node.schema())?;
    let rest = replace_join(plan.clone(), &found, &scan)?;
    Ok((
        rest,
        StreamJoinPlan {
            found,
            right_slot,
            right_event_time,
            output_slot,
            output_schema,
        },
    ))
}

/// A joined stream's event time (a topic, or a model's table): the field its time bound
/// compares; the watermark delay is the nearest declared one; it is declared by the model whose
/// own SQL reads the stream.
fn join_event_time(
    project: &Project,
    model_id: &str,
    stream: &str,
    slot: &Arc<MemTable>,
    column: &str,
) -> Result<EventTime> {
    let schema = datafusion::datasource::TableProvider::schema(slot.as_ref());
    let index = timestamp_in(&schema, stream, column)
        .map_err(|why| crate::error::unsupported(format!("the join's time bound: {why}")))?;
    let mut delay_ms = None;
    let mut declared_by = None;
    for (id, model) in nearest_first(project, model_id) {
        delay_ms = delay_ms.or(model.config.watermark_ms);
        if model.inputs.contains(&Input::Topic(stream.to_owned()))
            || model.inputs.contains(&Input::Model(stream.to_owned()))
        {
            declared_by.get_or_insert(id);
        }
    }
    Ok(EventTime {
        column: column.to_owned(),
        index,
        delay_ms: delay_ms.unwrap_or(0),
        declared_by: declared_by.unwrap_or_else(|| model_id.to_owned()),
    })
}

/// The dedup horizon declared by `model_id` or the nearest model it reads.
fn dedup_horizon_of(project: &Project, model_id: &str) -> Option<u64> {
    nearest_first(project, model_id)
        .into_iter()
        .find_map(|(_, model)| model.config.dedup_horizon_ms)
}

/// `model_id` and the models it reads, directly or not, nearest first (breadth first).
fn nearest_first<'p>(project: &'p Project, model_id: &str) -> Vec<(String, &'p Model)> {
    let mut out = Vec::new();
    let mut pending = std::collections::VecDeque::from([model_id.to_owned()]);
    let mut seen = BTreeSet::new();
    while let Some(id) = pending.pop_front() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let Some(model) = project.models.get(&id) else {
            continue;
        };
        for input in &model.inputs {
            if let Input::Model(m) = input {
                pending.push_back(m.clone());
            }
        }
        out.push((id, model));
    }
    out
}

/// The index of `column` in `topic`'s schema if it is a timestamp field; else why not
/// ("`x` is not a field of topic `t`").
fn timestamp_field(
    topic: &kappa_pipeline::TopicSpec,
    column: &str,
) -> std::result::Result<usize, String> {
    timestamp_in(
        &topic_schema(topic),
        &format!("topic `{}`", topic.name),
        column,
    )
}

/// The index of `column` in `schema` (of `what`) if it is a timestamp field; else why not.
fn timestamp_in(
    schema: &arrow::datatypes::Schema,
    what: &str,
    column: &str,
) -> std::result::Result<usize, String> {
    let index = schema
        .index_of(column)
        .map_err(|_| format!("`{column}` is not a field of {what}"))?;
    match schema.field(index).data_type() {
        arrow::datatypes::DataType::Timestamp(..) => Ok(index),
        _ => Err(format!("`{column}` of {what} is not a timestamp")),
    }
}

/// The event time declared by `model_id` or, failing that, the nearest model it reads.
fn event_time_of(
    project: &Project,
    model_id: &str,
    topic: &kappa_pipeline::TopicSpec,
) -> Result<Option<EventTime>> {
    for (id, model) in nearest_first(project, model_id) {
        if let Some(column) = &model.config.event_time {
            let index = timestamp_field(topic, column)
                .map_err(|why| DataFusionError::Configuration(format!("event_time {why}")))?;
            return Ok(Some(EventTime {
                column: column.clone(),
                index,
                delay_ms: model.config.watermark_ms.unwrap_or(0),
                declared_by: id,
            }));
        }
    }
    Ok(None)
}

fn register_schema(ctx: &SessionContext, layer: &str) {
    if let Some(catalog) = ctx.catalog("datafusion")
        && catalog.schema(layer).is_none()
    {
        let _ = catalog.register_schema(layer, Arc::new(MemorySchemaProvider::new()));
    }
}

/// The table schema of the dimension model `id`: its SQL's columns and those the dimension
/// adds (`scd::ScdSpec`).
pub async fn dimension_schema(project: &Project, id: &str) -> Result<arrow::datatypes::SchemaRef> {
    let planned = Box::pin(plan_model(project, id)).await?;
    let rows = crate::stateless::storable_schema(planned.plan.schema().as_arrow());
    let spec = crate::scd::ScdSpec::new(&project.models[id], rows)?;
    Ok(spec.output_schema().clone())
}

/// The table schema of `id`, a model others look up: a dimension's ([`dimension_schema`]), or
/// a GROUP BY's (one row per group, its SQL's columns).
async fn lookup_schema(project: &Project, id: &str) -> Result<arrow::datatypes::SchemaRef> {
    if project.is_dimension(id) {
        return dimension_schema(project, id).await;
    }
    // A GROUP BY of another GROUP BY (a rollup) is refreshed from that one's table: its SQL
    // over the table's rows (as `plan_tables::plan_refresh` plans it).
    let model = project
        .models
        .get(id)
        .ok_or_else(|| DataFusionError::Plan(format!("no model `{id}`")))?;
    if let [Input::Model(upstream_id)] = model.inputs.as_slice()
        && project.upserts(upstream_id)
    {
        let upstream = &project.models[upstream_id];
        let rows = Box::pin(lookup_schema(project, upstream_id)).await?;
        let (_, plan) = plan_over_rows(&session(), upstream, rows, model).await?;
        return Ok(crate::stateless::storable_schema(plan.schema().as_arrow()));
    }
    let planned = Box::pin(plan_model(project, id)).await?;
    if planned.join.is_some() {
        return Err(crate::error::unsupported(format!(
            "{id} is looked up, but its rows come from a join of two streams: a stream looks up \
             a GROUP BY of one topic, so that it can wait until the GROUP BY covers that \
             topic's end"
        )));
    }
    if planned.shape != Shape::Grouped {
        return Err(crate::error::unsupported(format!(
            "{id} is looked up as one row per group, but it runs {}; a stream looks up a \
             GROUP BY without a window, or a dimension",
            match planned.shape {
                Shape::Windowed => "as windows",
                _ => "row by row",
            }
        )));
    }
    Ok(crate::stateless::storable_schema(
        planned.plan.schema().as_arrow(),
    ))
}

/// Puts a slot of `rows` where `upstream`'s name is in `ctx`, and plans `model`'s SQL over
/// it, its mask applied: a model refreshed whole from the table `upstream` published.
pub(crate) async fn plan_over_rows(
    ctx: &SessionContext,
    upstream: &Model,
    rows: arrow::datatypes::SchemaRef,
    model: &Model,
) -> Result<(Arc<MemTable>, LogicalPlan)> {
    let reference = TableReference::partial(upstream.layer.as_str(), upstream.name.as_str());
    register_schema(ctx, &upstream.layer);
    ctx.deregister_table(reference.clone())?;
    let slot = Arc::new(MemTable::try_new(rows, vec![vec![]])?);
    ctx.register_table(reference, slot.clone())?;
    let plan = ctx.state().create_logical_plan(&model.sql).await?;
    let plan = crate::mask_plan::mask_plan(plan, &model.config.mask)?;
    Ok((slot, plan))
}

/// Whether `model_id` reads `other`, directly or through other models.
pub fn reads_transitively(project: &Project, model_id: &str, other: &str) -> bool {
    project.reads_transitively(model_id, other)
}

/// `model`'s SQL planned over what `ctx` holds: analyzed (views inlined, types coerced),
/// `DISTINCT` as a GROUP BY, its `[mask]` applied.
pub(crate) async fn analyzed_plan(ctx: &SessionContext, model: &Model) -> Result<LogicalPlan> {
    let state = ctx.state();
    let plan = state.create_logical_plan(&model.sql).await?;
    let plan = state
        .analyzer()
        .execute_and_check(plan, state.config_options(), |_, _| {})?;
    let plan = distinct_as_group_by(plan)?;
    crate::mask_plan::mask_plan(plan, &model.config.mask)
}

/// `SELECT DISTINCT …` is a GROUP BY of every column with no aggregates.
pub(crate) fn distinct_as_group_by(plan: LogicalPlan) -> Result<LogicalPlan> {
    Ok(plan
        .transform_up(|node| match node {
            LogicalPlan::Distinct(Distinct::All(input)) => {
                let columns: Vec<_> = input.schema().columns().into_iter().map(col).collect();
                let grouped = LogicalPlanBuilder::from(input.as_ref().clone())
                    .aggregate(columns, Vec::<datafusion::logical_expr::Expr>::new())?
                    .build()?;
                Ok(datafusion::common::tree_node::Transformed::yes(grouped))
            }
            other => Ok(datafusion::common::tree_node::Transformed::no(other)),
        })?
        .data)
}

/// Why a model's `key` (or its upsert materialization) does not fit its shape: only a GROUP BY
/// is upserted, and its key is its group keys, so a `key` must name exactly the output columns
/// the group keys become. Accepting anything else would write a table keyed otherwise than
/// the user said.
pub(crate) fn key_problem(
    plan: &LogicalPlan,
    shape: Shape,
    model: &Model,
) -> std::result::Result<(), String> {
    let upsert = model.config.materialization == Some(Materialization::Upsert);
    match shape {
        Shape::RowByRow if upsert || !model.config.key.is_empty() => Err(String::from(
            "materialization = \"upsert\" (or a `key`), but the model has no GROUP \
             BY: its rows are appended as they come, so nothing would replace them; group by \
             the key (GROUP BY k with the aggregates you need), or declare the topic kind = \
             \"table\" and join it to get the latest row per key",
        )),
        Shape::Windowed if !model.config.key.is_empty() => Err(String::from(
            "`key`, but windowed rows are appended once when their window closes; \
             drop `key`",
        )),
        Shape::Grouped if !model.config.key.is_empty() => {
            let wanted: BTreeSet<&str> = model.config.key.iter().map(String::as_str).collect();
            match group_key_columns(plan) {
                Some(keys)
                    if keys.iter().map(String::as_str).collect::<BTreeSet<_>>() == wanted =>
                {
                    Ok(())
                }
                Some(keys) => Err(format!(
                    "key = [{}], but the table is keyed by its GROUP BY keys: key = \
                     [{}]",
                    quoted(&model.config.key),
                    quoted(&keys)
                )),
                None => Err(String::from(
                    "`key`, but not every GROUP BY key is a column of the result; \
                     select each group key as a column, or drop `key`",
                )),
            }
        }
        _ => Ok(()),
    }
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The result columns that carry a grouped plan's group keys, one per key, or `None` when a
/// group key is not selected as a plain column.
fn group_key_columns(plan: &LogicalPlan) -> Option<Vec<String>> {
    match plan {
        LogicalPlan::Aggregate(aggregate) => Some(
            aggregate
                .schema
                .fields()
                .iter()
                .take(aggregate.group_expr.len())
                .map(|f| f.name().clone())
                .collect(),
        ),
        LogicalPlan::Filter(f) => group_key_columns(&f.input),
        LogicalPlan::SubqueryAlias(a) => group_key_columns(&a.input),
        LogicalPlan::Projection(p) => {
            let below = group_key_columns(&p.input)?;
            let above: Vec<String> = p
                .expr
                .iter()
                .zip(p.schema.fields())
                .filter_map(|(e, field)| match e.clone().unalias() {
                    datafusion::logical_expr::Expr::Column(c) if below.contains(&c.name) => {
                        Some(field.name().clone())
                    }
                    _ => None,
                })
                .collect();
            (above.len() == below.len()).then_some(above)
        }
        _ => None,
    }
}

/// How an analyzed plan runs, or why it cannot run incrementally (with the nearest form
/// that can).
pub fn shape_of(plan: &LogicalPlan) -> std::result::Result<Shape, String> {
    let row_by_row = match stateless_shape(plan) {
        Ok(()) => return Ok(Shape::RowByRow),
        Err(reason) => reason,
    };
    match aggregate_shape(plan) {
        Ok(_) => Ok(Shape::Grouped),
        Err(reason) if reason == NO_GROUP_BY => Err(format!(
            "{row_by_row}; a model runs row by row (projections, filters) or as one GROUP BY"
        )),
        Err(reason) => Err(reason),
    }
}
