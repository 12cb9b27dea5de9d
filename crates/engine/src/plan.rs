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
use kappa_pipeline::{Input, Materialization, Project, TopicKind};

use crate::aggregate::{NO_GROUP_BY, aggregate_shape, slot_for};
use crate::dedup::{DEFAULT_HORIZON_MS, DedupMatch, find_dedup, replace_dedup};
use crate::dimension::DimensionTable;
use crate::schema::topic_schema;
use crate::stateless::{session, stateless_shape};
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
    /// The topic every row of the model comes from.
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
        self.shape == Shape::Windowed || self.dedup.is_some()
    }

    /// The table the rest of the plan reads: the dedup's output, or the source.
    pub fn input_slot(&self) -> Arc<MemTable> {
        match &self.dedup {
            Some(d) => d.output_slot.clone(),
            None => self.slot.clone(),
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

/// The topics a model's rows come from, through the models it reads.
pub fn source_topics(project: &Project, model_id: &str) -> BTreeSet<String> {
    let mut topics = BTreeSet::new();
    let mut pending = vec![model_id.to_owned()];
    let mut seen = BTreeSet::new();
    while let Some(id) = pending.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let Some(model) = project.models.get(&id) else {
            continue;
        };
        for input in &model.inputs {
            match input {
                Input::Topic(t) => {
                    topics.insert(t.clone());
                }
                Input::Model(m) => pending.push(m.clone()),
            }
        }
    }
    topics
}

/// Sorts the topics a model reads into its one stream and the tables (dimensions) it looks
/// up. A model that reads only one table reads its records as a stream.
fn stream_and_tables(
    project: &Project,
    topics: &BTreeSet<String>,
) -> Result<(String, Vec<String>)> {
    let is_table = |t: &String| {
        project
            .topics
            .get(t)
            .is_some_and(|spec| spec.kind == TopicKind::Table)
    };
    let (tables, streams): (Vec<String>, Vec<String>) = topics.iter().cloned().partition(is_table);
    match (streams.as_slice(), tables.as_slice()) {
        ([one], _) => Ok((one.clone(), tables)),
        ([], [one]) => Ok((one.clone(), Vec::new())),
        ([], []) => Err(DataFusionError::NotImplemented(
            "the model reads no topic".into(),
        )),
        ([], many) => Err(DataFusionError::NotImplemented(format!(
            "the model reads only tables ({}); join them to a stream, which drives the lookups",
            many.join(", ")
        ))),
        (many, _) => Err(DataFusionError::NotImplemented(format!(
            "the model reads several streams ({}); joining two streams is not supported yet — \
             declare the side that holds the current state of something as kind = \"table\" \
             in its topics/<name>.toml, and it becomes a dimension looked up by each event",
            many.join(", ")
        ))),
    }
}

/// Plans `model_id`. `NotImplemented` errors say why the model cannot run incrementally.
pub async fn plan_model(project: &Project, model_id: &str) -> Result<PlannedModel> {
    let model = project
        .models
        .get(model_id)
        .ok_or_else(|| DataFusionError::Plan(format!("no model `{model_id}`")))?;
    let topics = source_topics(project, model_id);
    let (topic, tables) = stream_and_tables(project, &topics)?;
    let spec = project
        .topics
        .get(&topic)
        .ok_or_else(|| DataFusionError::Plan(format!("no topic `{topic}`")))?;
    let ctx = session();
    let slot = Arc::new(MemTable::try_new(topic_schema(spec), vec![vec![]])?);
    ctx.register_table(TableReference::bare(topic.as_str()), slot.clone())?;
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
    // Upstream models become views, in dependency order.
    let upstream: BTreeSet<&String> = project
        .order
        .iter()
        .filter(|id| id.as_str() != model_id && reads_transitively(project, model_id, id.as_str()))
        .collect();
    for id in project.order.iter().filter(|id| upstream.contains(id)) {
        let upstream_model = &project.models[id];
        let plan = ctx.state().create_logical_plan(&upstream_model.sql).await?;
        register_schema(&ctx, &upstream_model.layer);
        ctx.register_table(
            TableReference::partial(upstream_model.layer.as_str(), upstream_model.name.as_str()),
            Arc::new(ViewTable::new(plan, Some(upstream_model.sql.clone()))),
        )?;
    }
    let state = ctx.state();
    let plan = state.create_logical_plan(&model.sql).await?;
    let plan = state
        .analyzer()
        .execute_and_check(plan, state.config_options(), |_, _| {})?;
    let plan = distinct_as_group_by(plan)?;
    let event_time = event_time_of(project, model_id, spec)?;
    let (plan, dedup) = match find_dedup(&plan).map_err(DataFusionError::NotImplemented)? {
        None => (plan, None),
        Some(found) => {
            if event_time.is_none() {
                return Err(DataFusionError::NotImplemented(format!(
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
    let mut shape = shape_of(&plan).map_err(DataFusionError::NotImplemented)?;
    if shape == Shape::Grouped {
        let windowed = match (&event_time, model.config.materialization) {
            (Some(et), materialization) if materialization != Some(Materialization::Upsert) => {
                let aggregate = aggregate_shape(&plan).map_err(DataFusionError::NotImplemented)?;
                window_key(aggregate, &et.column)
                    .map_err(DataFusionError::NotImplemented)?
                    .is_some()
            }
            _ => false,
        };
        if windowed {
            shape = Shape::Windowed;
        } else if model.config.materialization == Some(Materialization::Append) {
            return Err(DataFusionError::NotImplemented(
                "materialization = \"append\", but a GROUP BY without a window over the event \
                 time updates its rows; use \"upsert\", or group by a window such as \
                 date_bin(INTERVAL '1 minute', <event_time>)"
                    .into(),
            ));
        }
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
    })
}

/// The dedup horizon declared by `model_id` or the nearest model it reads.
fn dedup_horizon_of(project: &Project, model_id: &str) -> Option<u64> {
    let mut pending = std::collections::VecDeque::from([model_id.to_owned()]);
    let mut seen = BTreeSet::new();
    while let Some(id) = pending.pop_front() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let model = project.models.get(&id)?;
        if let Some(horizon) = model.config.dedup_horizon_ms {
            return Some(horizon);
        }
        for input in &model.inputs {
            if let Input::Model(m) = input {
                pending.push_back(m.clone());
            }
        }
    }
    None
}

/// The event time declared by `model_id` or, failing that, the nearest model it reads.
fn event_time_of(
    project: &Project,
    model_id: &str,
    topic: &kappa_pipeline::TopicSpec,
) -> Result<Option<EventTime>> {
    let mut pending = std::collections::VecDeque::from([model_id.to_owned()]);
    let mut seen = BTreeSet::new();
    while let Some(id) = pending.pop_front() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let Some(model) = project.models.get(&id) else {
            continue;
        };
        if let Some(column) = &model.config.event_time {
            let schema = topic_schema(topic);
            let index = schema.index_of(column).map_err(|_| {
                DataFusionError::Configuration(format!(
                    "event_time `{column}` is not a field of topic `{}`",
                    topic.name
                ))
            })?;
            if !matches!(
                schema.field(index).data_type(),
                arrow::datatypes::DataType::Timestamp(..)
            ) {
                return Err(DataFusionError::Configuration(format!(
                    "event_time `{column}` of topic `{}` is not a timestamp",
                    topic.name
                )));
            }
            return Ok(Some(EventTime {
                column: column.clone(),
                index,
                delay_ms: model.config.watermark_ms.unwrap_or(0),
                declared_by: id.clone(),
            }));
        }
        for input in &model.inputs {
            if let Input::Model(m) = input {
                pending.push_back(m.clone());
            }
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

/// Whether `model_id` reads `other`, directly or through other models.
fn reads_transitively(project: &Project, model_id: &str, other: &str) -> bool {
    let mut pending = vec![model_id];
    let mut seen = BTreeSet::new();
    while let Some(id) = pending.pop() {
        if !seen.insert(id) {
            continue;
        }
        let Some(model) = project.models.get(id) else {
            continue;
        };
        for input in &model.inputs {
            if let Input::Model(m) = input {
                if m == other {
                    return true;
                }
                pending.push(m);
            }
        }
    }
    false
}

/// `SELECT DISTINCT …` is a GROUP BY of every column with no aggregates.
fn distinct_as_group_by(plan: LogicalPlan) -> Result<LogicalPlan> {
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
