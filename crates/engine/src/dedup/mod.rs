//! Deduplication: the `ROW_NUMBER() OVER (PARTITION BY key ORDER BY event_time) = 1` pattern,
//! the earliest row of each key, emitted once the watermark makes it final.
//!
//! ```text
//!  row (key k, event time t) ─► k decided already?  yes ─► dropped (a later duplicate)
//!                                 └ no ─► candidate for k: the earliest t so far (ties: first seen)
//!  watermark W > t of k's candidate ─► emitted, k decided (remembered until W − horizon)
//! ```
//!
//! Why waiting for the watermark is exact: a record that is not late has ts ≥ W, so once W has
//! passed a candidate's t no later record of its key can be earlier — the batch query would pick
//! the same row. The output is append-only, so any model shape can run over it (a GROUP BY over
//! deduplicated rows, windows over them).
//!
//! State: the undecided candidates (rows whose event time the watermark has not passed yet) and
//! the decided keys of the last `dedup_horizon` of event time (default 24 h). A duplicate that
//! arrives after its key was forgotten is emitted again: the horizon is how far apart in event
//! time two copies may be and still be recognised (a decided key is forgotten once the whole
//! 1/64-of-the-horizon slice of event time it falls in is older than `W − horizon`: it is
//! remembered for at least the horizon, at most 1/64 longer). A candidate is a reference to
//! its row in the micro-batch it came in, which is kept while any candidate points into it
//! (and gathered into one batch when few rows of many batches are still needed); emitting
//! gathers the chosen rows column by column. Checkpoints write the candidates whole (they
//! are few) and the decisions as deltas, folded into a new base every
//! [`crate::deltas::DELTAS_BEFORE_COMPACTION`] commits.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt64Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef, TimeUnit, TimestampMicrosecondType};
use arrow::row::{RowConverter, SortField};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{ExprSchemable, LogicalPlan};
use datafusion::physical_expr::PhysicalExpr;

use crate::aggregate::physical_expr;
use datafusion::prelude::{DataFrame, SessionContext};
use serde::{Deserialize, Serialize};

use crate::aggregate::slot_for;
use crate::dedup_shape::dedup_window;
pub use crate::dedup_shape::{DedupMatch, find_dedup, replace_dedup};
use key::{KEY_INLINE, Key, SharedKeyMap};

mod key;
mod state;

/// Snapshot property: the dedup state files (`{"candidates", "base", "deltas"}`).
pub const DEDUP_PROPERTY: &str = "kappa.dedup";
/// How long a decided key is remembered when the model does not say.
pub const DEFAULT_HORIZON_MS: u64 = 24 * 3600 * 1000;

/// The files of the dedup state in the table's current snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupFiles {
    pub candidates: Option<String>,
    /// The decided keys (`base` and `deltas` in the property).
    #[serde(flatten)]
    pub decided: crate::deltas::DeltaFiles,
}

/// The earliest row of an undecided key so far: its event time and where it is.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    t: i64,
    /// The micro-batch's number (they wrap after 4 G batches; a candidate lives a few).
    batch: u32,
    row: u32,
}

/// Where a key stands: undecided with its earliest row so far, or decided at an event time.
#[derive(Debug, Clone, Copy)]
enum KeyState {
    Candidate(Candidate),
    Decided(i64),
}

/// A row offered to the dedup, in its shard's list.
struct Offered {
    key: OfferedKey,
    t: i64,
    batch: u32,
    row: u32,
}

/// An offered row's key: owned when short, else the index of its batch's row encoding.
enum OfferedKey {
    Inline(Key),
    Long(usize),
}

/// A micro-batch candidates point into, and how many do.
struct Held {
    batch: RecordBatch,
    live: usize,
}

/// Key tables by hash: a micro-batch's rows are offered (and its decisions forgotten) one shard
/// at a time, so the table being probed is a 64th of the keys — in cache, where one table of a
/// replay's 262 K keys per micro-batch cost two memory misses per probe.
const SHARDS: usize = 64;

/// One shard of the keys.
#[derive(Default)]
struct Shard {
    /// Every key remembered, undecided or decided: one probe per row offered.
    states: SharedKeyMap<KeyState>,
    /// The undecided keys (each once), in the order they became candidates.
    undecided: Vec<Key>,
    /// Keys removed since the table was last rebuilt (removals leave tombstones that lengthen
    /// probes until then).
    removed: usize,
}

/// Held rows beyond this (and beyond twice the candidates) are gathered into one batch.
const HELD_ROWS_SLACK: usize = 1 << 16;
/// Decided keys expire in slices of this fraction of the horizon.
const EXPIRY_SLICES: i64 = 64;

/// The dedup stage of a model: source rows in, the earliest row per key out once final.
pub struct Dedup {
    ctx: SessionContext,
    input_slot: Arc<MemTable>,
    input_plan: LogicalPlan,
    key_exprs: Vec<Arc<dyn PhysicalExpr>>,
    order_expr: Arc<dyn PhysicalExpr>,
    keys: RowConverter,
    key_types: Vec<DataType>,
    input_schema: SchemaRef,
    window_slot: Arc<MemTable>,
    window_schema: SchemaRef,
    output_plan: LogicalPlan,
    output_schema: SchemaRef,
    horizon: i64,
    /// Every key remembered, undecided or decided, in shards by hash.
    shards: Vec<Shard>,
    /// Picks a key's shard (fixed: shards are not saved, only consistent in one process).
    shard_hasher: foldhash::fast::FixedState,
    /// The batches candidates point into, by number.
    held: BTreeMap<u32, Held>,
    next_batch: u32,
    /// The shards' lists of offered rows, empty between micro-batches (kept for their
    /// allocations).
    offered: Vec<Vec<Offered>>,
    #[cfg(test)]
    offer_chunk: Option<usize>,
    /// [`HELD_ROWS_SLACK`]; tests lower it to gather on every emit.
    held_slack: usize,
    /// Decided keys by expiry slice (event time ÷ slice width).
    expiry: BTreeMap<i64, Vec<(Key, i64)>>,
    new_decisions: Vec<(Key, i64)>,
    committed: DedupFiles,
    pending: Option<DedupFiles>,
}

impl std::fmt::Debug for Dedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedup")
            .field(
                "candidates",
                &self.shards.iter().map(|s| s.undecided.len()).sum::<usize>(),
            )
            .field(
                "keys",
                &self.shards.iter().map(|s| s.states.len()).sum::<usize>(),
            )
            .finish_non_exhaustive()
    }
}

impl Dedup {
    /// The dedup `found` in a plan whose source is `input_slot` in `ctx`; the order expression
    /// must be the event-time column `event_time` of the source. Output batches are of
    /// `output_schema` (the slot the rest of the plan reads).
    pub fn new(
        ctx: SessionContext,
        input_slot: Arc<MemTable>,
        found: &DedupMatch,
        event_time: &str,
        horizon_ms: u64,
        output_schema: SchemaRef,
    ) -> Result<Dedup> {
        let (partition_by, order_by) =
            dedup_window(&found.window).map_err(crate::error::unsupported)?;
        let window = &found.window;
        match crate::windowed::source_column(&order_by, &window.input) {
            Some(c) if c == event_time => {}
            _ => {
                return Err(crate::error::unsupported(format!(
                    "deduplication orders by the event time `{event_time}`: \
                     ROW_NUMBER() OVER (PARTITION BY key ORDER BY {event_time})"
                )));
            }
        }
        let state = ctx.state();
        let input_schema = window.input.schema().clone();
        let props = state.execution_props();
        let key_exprs = partition_by
            .iter()
            .map(|e| physical_expr(e, &input_schema, props))
            .collect::<Result<Vec<_>>>()?;
        let order_expr = physical_expr(&order_by, &input_schema, props)?;
        let key_types = partition_by
            .iter()
            .map(|e| e.get_type(&input_schema))
            .collect::<Result<Vec<_>>>()?;
        let keys = RowConverter::new(key_types.iter().cloned().map(SortField::new).collect())?;
        let arrow_input = Arc::new(input_schema.as_arrow().clone());
        let (window_slot, window_schema, window_scan) =
            slot_for("kappa_row_number", &window.schema)?;
        let target = LogicalPlan::Window(window.clone());
        let output_plan = found
            .filter
            .clone()
            .transform_down(|node| {
                Ok(if node == target {
                    Transformed::new(window_scan.clone(), true, TreeNodeRecursion::Jump)
                } else {
                    Transformed::no(node)
                })
            })?
            .data;
        Ok(Dedup {
            ctx,
            input_slot,
            input_plan: window.input.as_ref().clone(),
            key_exprs,
            order_expr,
            keys,
            key_types,
            input_schema: arrow_input,
            window_slot,
            window_schema,
            output_plan,
            output_schema,
            horizon: i64::try_from(horizon_ms)
                .unwrap_or(i64::MAX / 1000)
                .saturating_mul(1000),
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            shard_hasher: foldhash::fast::FixedState::with_seed(0x6b61_7070_615f_6464),
            held: BTreeMap::new(),
            next_batch: 0,
            offered: Vec::new(),
            #[cfg(test)]
            offer_chunk: None,
            held_slack: HELD_ROWS_SLACK,
            expiry: BTreeMap::new(),
            new_decisions: Vec::new(),
            committed: DedupFiles::default(),
            pending: None,
        })
    }

    /// Takes one micro-batch of source records that are not late; returns the rows decided
    /// now that `watermark` has advanced (rows of the dedup's output).
    pub async fn push(
        &mut self,
        batch: RecordBatch,
        watermark: Option<i64>,
    ) -> Result<Vec<RecordBatch>> {
        if batch.num_rows() > 0 {
            *self.input_slot.batches[0].write().await = vec![batch];
            let frame = DataFrame::new(self.ctx.state(), self.input_plan.clone());
            let batches = frame.collect().await;
            self.input_slot.batches[0].write().await.clear();
            let batches = batches?;
            #[cfg(test)]
            let batches = match self.offer_chunk {
                // Tests offer a micro-batch as many small batches, as a plan may split it.
                Some(size) => batches
                    .iter()
                    .flat_map(|b| {
                        (0..b.num_rows())
                            .step_by(size)
                            .map(move |at| b.slice(at, size.min(b.num_rows() - at)))
                    })
                    .collect(),
                None => batches,
            };
            self.offer(&batches)?;
            // Also when nothing is emitted (no watermark yet, or one that passes no
            // candidate): held batches stay within twice the candidates plus the slack.
            self.compact_held()?;
        }
        let Some(watermark) = watermark else {
            return Ok(Vec::new());
        };
        self.expire(watermark);
        self.emit(watermark).await
    }

    /// Offers the rows of one micro-batch (the input plan's output batches, in order).
    fn offer(&mut self, batches: &[RecordBatch]) -> Result<()> {
        // First, one sequential pass over the rows puts each row's key, time and place in its
        // shard's list; then each shard's table is probed by reading its list in order. (Probing
        // row by row in shard order instead read the row-encoded keys at random: a cache miss
        // per row, most of the dedup's time in a replay.)
        let mut by_shard: Vec<Vec<Offered>> = std::mem::take(&mut self.offered);
        by_shard.resize_with(SHARDS, Vec::new);
        let mut long_keys = Vec::new();
        let mut ids = Vec::with_capacity(batches.len());
        for batch in batches {
            let n = batch.num_rows();
            let id = self.next_batch;
            self.next_batch = self.next_batch.wrapping_add(1);
            ids.push(id);
            if n == 0 {
                continue;
            }
            u32::try_from(n)
                .map_err(|_| DataFusionError::Execution("a micro-batch over 4G rows".into()))?;
            let keys: Vec<ArrayRef> = self
                .key_exprs
                .iter()
                .map(|e| e.evaluate(batch)?.into_array(n))
                .collect::<Result<_>>()?;
            let key_rows = self.keys.convert_columns(&keys)?;
            let times = micros(&self.order_expr.evaluate(batch)?.into_array(n)?)?;
            for (i, time) in times.iter().enumerate() {
                // Rows without event time never reach here (the source sets them aside).
                let Some(t) = *time else {
                    continue;
                };
                let key = key_rows.row(i);
                let key = key.as_ref();
                let shard = self.shard_of(key);
                let key = if key.len() <= KEY_INLINE {
                    OfferedKey::Inline(Key::from(key))
                } else {
                    // Long keys stay in the row encoding (this batch's, pushed below) until
                    // they turn out to be new.
                    OfferedKey::Long(long_keys.len())
                };
                // `n` fits a u32 (checked above).
                let row = i as u32;
                by_shard[shard].push(Offered {
                    key,
                    t,
                    batch: id,
                    row,
                });
            }
            long_keys.push(key_rows);
        }
        let mut live: HashMap<u32, usize, foldhash::fast::RandomState> = HashMap::default();
        let held = &mut self.held;
        for (shard, offered) in self.shards.iter_mut().zip(by_shard.iter_mut()) {
            if offered.is_empty() {
                continue;
            }
            // Rebuilt once as many keys were removed as remain: amortized O(1) per removal.
            if shard.removed > shard.states.len() + 64 {
                shard.states.shrink_to(0);
                shard.removed = 0;
            }
            // Room for every row's key being new: no rehash in the middle.
            shard.states.reserve(offered.len());
            for o in offered.drain(..) {
                let here = Candidate {
                    t: o.t,
                    batch: o.batch,
                    row: o.row,
                };
                let state = match o.key {
                    // A short key costs nothing to own: one probe finds or inserts it.
                    OfferedKey::Inline(key) => match shard.states.entry(key) {
                        std::collections::hash_map::Entry::Occupied(e) => Some(e.into_mut()),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            shard.undecided.push(e.key().clone());
                            e.insert(KeyState::Candidate(here));
                            *live.entry(o.batch).or_default() += 1;
                            None
                        }
                    },
                    // A long one is looked up first, so that only a new key allocates.
                    OfferedKey::Long(at) => {
                        let key = long_keys[at].row(o.row as usize);
                        match shard.states.get_mut(key.as_ref()) {
                            Some(state) => Some(state),
                            None => {
                                let key: Key = key.as_ref().into();
                                shard.states.insert(key.clone(), KeyState::Candidate(here));
                                shard.undecided.push(key);
                                *live.entry(o.batch).or_default() += 1;
                                None
                            }
                        }
                    }
                };
                if let Some(KeyState::Candidate(c)) = state
                    && o.t < c.t
                {
                    let before = std::mem::replace(c, here);
                    *live.entry(o.batch).or_default() += 1;
                    match live.get_mut(&before.batch) {
                        Some(count) if *count > 0 => *count -= 1,
                        _ => {
                            if let Some(h) = held.get_mut(&before.batch) {
                                h.live -= 1;
                            }
                        }
                    }
                }
            }
        }
        self.offered = by_shard;
        for (batch, id) in batches.iter().zip(ids) {
            if let Some(&live) = live.get(&id)
                && live > 0
            {
                self.held.insert(
                    id,
                    Held {
                        batch: batch.clone(),
                        live,
                    },
                );
            }
        }
        self.held.retain(|_, h| h.live > 0);
        Ok(())
    }

    fn expire(&mut self, watermark: i64) {
        let (width, limit) = (self.slice_width(), self.forget_before(watermark));
        let mut by_shard: Vec<Vec<(Key, i64)>> = vec![Vec::new(); SHARDS];
        while let Some(entry) = self.expiry.first_entry() {
            if !slice_expired(*entry.key(), width, limit) {
                break;
            }
            for (key, t) in entry.remove() {
                by_shard[self.shard_of(key.as_slice())].push((key, t));
            }
        }
        for (shard, expired) in self.shards.iter_mut().zip(by_shard) {
            for (key, t) in expired {
                if let std::collections::hash_map::Entry::Occupied(e) = shard.states.entry(key)
                    && matches!(e.get(), KeyState::Decided(d) if *d == t)
                {
                    e.remove();
                    shard.removed += 1;
                }
            }
        }
    }

    /// The shard `key` belongs to.
    fn shard_of(&self, key: &[u8]) -> usize {
        use std::hash::BuildHasher;
        // The top bits: the maps use their own (random) hasher's bits.
        (self.shard_hasher.hash_one(key) >> (64 - SHARDS.trailing_zeros())) as usize
    }

    fn slice_width(&self) -> i64 {
        (self.horizon / EXPIRY_SLICES).max(1)
    }

    /// The event time before which decided keys are forgotten at `watermark`.
    fn forget_before(&self, watermark: i64) -> i64 {
        watermark.saturating_sub(self.horizon)
    }

    /// Remembers `key` as decided at event time `t`.
    fn decide(&mut self, key: Key, t: i64) {
        let shard = self.shard_of(key.as_slice());
        let before = self.shards[shard]
            .states
            .insert(key.clone(), KeyState::Decided(t));
        if !matches!(before, Some(KeyState::Decided(d)) if d == t) {
            let width = self.slice_width();
            schedule_expiry(&mut self.expiry, width, key, t);
        }
    }

    /// The rows of `chosen` (in that order), as a batch of the dedup's input.
    fn gather(&self, chosen: &[Candidate]) -> Result<Vec<ArrayRef>> {
        let mut position: HashMap<u32, usize, foldhash::fast::RandomState> = HashMap::default();
        let mut batches = Vec::new();
        let mut indices = Vec::with_capacity(chosen.len());
        let mut last: Option<(u32, usize)> = None;
        for c in chosen {
            let at = match last {
                Some((batch, at)) if batch == c.batch => at,
                _ => {
                    let at = *position.entry(c.batch).or_insert_with(|| {
                        batches.push(c.batch);
                        batches.len() - 1
                    });
                    last = Some((c.batch, at));
                    at
                }
            };
            indices.push((at, c.row as usize));
        }
        let held: Vec<&RecordBatch> = batches
            .iter()
            .map(|b| {
                self.held.get(b).map(|h| &h.batch).ok_or_else(|| {
                    DataFusionError::Internal(format!("a candidate in a released batch {b}"))
                })
            })
            .collect::<Result<_>>()?;
        (0..self.input_schema.fields().len())
            .map(|j| {
                let arrays: Vec<&dyn Array> = held.iter().map(|b| b.column(j).as_ref()).collect();
                Ok(arrow::compute::interleave(&arrays, &indices)?)
            })
            .collect()
    }

    /// The undecided keys' candidates, in the order of `undecided`.
    fn candidates(&mut self) -> Vec<Candidate> {
        let mut all = Vec::with_capacity(self.undecided_count());
        self.walk_candidates(|c| all.push(*c));
        all
    }

    /// Visits every candidate, shard by shard in `undecided` order: the one order in which
    /// candidates are listed and renumbered.
    fn walk_candidates(&mut self, mut visit: impl FnMut(&mut Candidate)) {
        for shard in &mut self.shards {
            for key in &shard.undecided {
                if let Some(KeyState::Candidate(c)) = shard.states.get_mut(key) {
                    visit(c);
                }
            }
        }
    }

    /// How many keys are undecided.
    fn undecided_count(&self) -> usize {
        self.shards.iter().map(|s| s.undecided.len()).sum()
    }

    /// Gathers the candidates into one batch when the batches they point into hold many more
    /// rows than they need.
    fn compact_held(&mut self) -> Result<()> {
        let held_rows: usize = self.held.values().map(|h| h.batch.num_rows()).sum();
        if held_rows <= self.held_slack + 2 * self.undecided_count() {
            return Ok(());
        }
        let chosen = self.candidates();
        let columns = self.gather(&chosen)?;
        let batch = RecordBatch::try_new(self.input_schema.clone(), columns)?;
        let id = self.next_batch;
        self.next_batch = self.next_batch.wrapping_add(1);
        // The same walk as `candidates()`: row r of the new batch is its r-th candidate.
        u32::try_from(chosen.len())
            .map_err(|_| DataFusionError::Execution("over 4G candidates".into()))?;
        let mut row = 0u32;
        self.walk_candidates(|c| {
            c.batch = id;
            c.row = row;
            // At most `chosen.len()` candidates, which fits a u32 (checked above).
            row = row.wrapping_add(1);
        });
        self.held.clear();
        self.held.insert(
            id,
            Held {
                batch,
                live: chosen.len(),
            },
        );
        Ok(())
    }

    async fn emit(&mut self, watermark: i64) -> Result<Vec<RecordBatch>> {
        let mut chosen = Vec::new();
        let (width, limit) = (self.slice_width(), self.forget_before(watermark));
        for shard in &mut self.shards {
            let mut waiting = Vec::new();
            for key in std::mem::take(&mut shard.undecided) {
                let std::collections::hash_map::Entry::Occupied(mut entry) =
                    shard.states.entry(key.clone())
                else {
                    continue;
                };
                match *entry.get() {
                    KeyState::Candidate(c) if c.t < watermark => {
                        chosen.push(c);
                        let slice = c.t.div_euclid(width);
                        if slice_expired(slice, width, limit) {
                            // Already past the horizon (a replay's micro-batch spans days):
                            // the key is forgotten at once, as `expire` would forget it next.
                            entry.remove();
                            shard.removed += 1;
                        } else {
                            *entry.get_mut() = KeyState::Decided(c.t);
                            schedule_expiry(&mut self.expiry, width, key.clone(), c.t);
                            self.new_decisions.push((key, c.t));
                        }
                    }
                    KeyState::Candidate(_) => waiting.push(key),
                    KeyState::Decided(_) => {}
                }
            }
            shard.undecided = waiting;
        }
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        // In the order the candidates' rows are held (arrival order, until a compaction or a
        // restore renumbers them): not the hash maps' order.
        chosen.sort_unstable_by_key(|c| (c.batch, c.row));
        let mut columns = self.gather(&chosen)?;
        for c in &chosen {
            if let Some(h) = self.held.get_mut(&c.batch) {
                h.live -= 1;
            }
        }
        self.held.retain(|_, h| h.live > 0);
        self.compact_held()?;
        columns.push(Arc::new(UInt64Array::from(vec![1u64; chosen.len()])));
        let columns = columns
            .into_iter()
            .zip(self.window_schema.fields())
            .map(|(c, f)| {
                if c.data_type() == f.data_type() {
                    Ok(c)
                } else {
                    cast(&c, f.data_type())
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let batch = RecordBatch::try_new(self.window_schema.clone(), columns)?;
        *self.window_slot.batches[0].write().await = vec![batch];
        let frame = DataFrame::new(self.ctx.state(), self.output_plan.clone());
        let out = frame.collect().await;
        self.window_slot.batches[0].write().await.clear();
        out?.iter()
            .map(|b| crate::stateless::to_storable(b, &self.output_schema))
            .collect()
    }

    /// The schema of the rows it emits.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// Whether the state changed since the last checkpoint.
    pub fn has_changes(&self) -> bool {
        !self.new_decisions.is_empty() || self.undecided_count() > 0
    }
}

/// Lists `key`, decided at `t`, for expiry with the keys of its slice (of `width` µs).
fn schedule_expiry(expiry: &mut BTreeMap<i64, Vec<(Key, i64)>>, width: i64, key: Key, t: i64) {
    expiry
        .entry(t.div_euclid(width))
        .or_default()
        .push((key, t));
}

/// Whether the keys decided at event times in `slice` (of `width` µs) are forgotten once
/// decided keys before `limit` are: the slice's end (exclusive) is at or before `limit`.
fn slice_expired(slice: i64, width: i64, limit: i64) -> bool {
    slice.saturating_add(1).saturating_mul(width) <= limit
}

/// A timestamp column as microseconds.
fn micros(column: &ArrayRef) -> Result<Vec<Option<i64>>> {
    let micros = cast(column, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
    let micros = micros.as_primitive::<TimestampMicrosecondType>();
    Ok((0..micros.len())
        .map(|i| (!micros.is_null(i)).then(|| micros.value(i)))
        .collect())
}

#[cfg(test)]
mod tests;
