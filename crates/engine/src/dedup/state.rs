//! A dedup's checkpoint: its undecided candidates written whole and its decided keys as
//! deltas, recorded in the commit (`kappa.dedup`) and taken back on restore.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::error::{DataFusionError, Result};
use kappa_lakehouse::{Lakehouse, LakehouseError, Table};

use super::key::Key;
use super::{Candidate, DEDUP_PROPERTY, Dedup, Held, KeyState, Shard};
use crate::grouped::df;

impl Dedup {
    fn candidates_schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = self
            .input_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        fields.push(Field::new("kappa_t", DataType::Int64, false));
        Arc::new(Schema::new(fields))
    }

    fn decisions_schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = self
            .key_types
            .iter()
            .enumerate()
            .map(|(i, t)| Field::new(format!("k{i}"), t.clone(), true))
            .collect();
        fields.push(Field::new("kappa_t", DataType::Int64, false));
        Arc::new(Schema::new(fields))
    }

    fn decisions_batch<'a>(
        &self,
        decisions: impl Iterator<Item = (&'a Key, i64)>,
    ) -> Result<RecordBatch> {
        let (keys, times): (Vec<&Key>, Vec<i64>) = decisions.unzip();
        let parser = self.keys.parser();
        let mut columns = self
            .keys
            .convert_rows(keys.iter().map(|k| parser.parse(k.as_slice())))?;
        columns.push(Arc::new(Int64Array::from(times)));
        Ok(RecordBatch::try_new(self.decisions_schema(), columns)?)
    }

    /// Writes the state as files of `table` and returns the property naming them, to commit
    /// with the model's next snapshot.
    pub async fn checkpoint(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
    ) -> Result<(String, String), LakehouseError> {
        let mut files = self.committed.clone();
        files.candidates = if self.undecided_count() == 0 {
            None
        } else {
            let chosen = self.candidates();
            let mut columns = self.gather(&chosen).map_err(df)?;
            columns.push(Arc::new(Int64Array::from(
                chosen.iter().map(|c| c.t).collect::<Vec<_>>(),
            )));
            let batch = RecordBatch::try_new(self.candidates_schema(), columns)
                .map_err(|e| df(e.into()))?;
            Some(
                lakehouse
                    .write_state(table, "candidates", &self.candidates_schema(), &[batch])
                    .await?,
            )
        };
        let schema = self.decisions_schema();
        files
            .decided
            .record(
                lakehouse,
                table,
                "decided",
                &schema,
                || {
                    self.decisions_batch(self.shards.iter().flat_map(|shard| {
                        shard.states.iter().filter_map(|(k, s)| match s {
                            KeyState::Decided(t) => Some((k, *t)),
                            KeyState::Candidate(_) => None,
                        })
                    }))
                    .map_err(df)
                },
                || {
                    self.decisions_batch(self.new_decisions.iter().map(|(k, t)| (k, *t)))
                        .map(|b| vec![b])
                        .map_err(df)
                },
            )
            .await?;
        let property = serde_json::to_string(&files).unwrap_or_default();
        self.pending = Some(files);
        Ok((DEDUP_PROPERTY.to_owned(), property))
    }

    /// The checkpoint was committed.
    pub fn landed(&mut self) {
        if let Some(files) = self.pending.take() {
            self.committed = files;
        }
        self.new_decisions.clear();
    }

    /// Takes the state the table's current snapshot (`properties`) names.
    pub async fn restore(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        properties: Option<&HashMap<String, String>>,
    ) -> Result<(), LakehouseError> {
        for shard in &mut self.shards {
            *shard = Shard::default();
        }
        self.held.clear();
        self.expiry.clear();
        self.new_decisions.clear();
        self.pending = None;
        self.committed = crate::commit_record::summary_json(properties, DEDUP_PROPERTY)?;
        let files = self.committed.clone();
        for location in files.decided.locations() {
            for batch in lakehouse.read_state(table, location).await? {
                let key_count = self.key_types.len();
                let rows = self
                    .keys
                    .convert_columns(&batch.columns()[..key_count])
                    .map_err(|e| df(e.into()))?;
                let times = batch
                    .column(key_count)
                    .as_primitive::<arrow::datatypes::Int64Type>();
                for (i, row) in rows.iter().enumerate() {
                    self.decide(row.as_ref().into(), times.value(i));
                }
            }
        }
        if let Some(location) = &files.candidates {
            for batch in lakehouse.read_state(table, location).await? {
                let width = self.input_schema.fields().len();
                let times = batch
                    .column(width)
                    .as_primitive::<arrow::datatypes::Int64Type>();
                let n = batch.num_rows();
                let input = RecordBatch::try_new(
                    self.input_schema.clone(),
                    batch.columns()[..width].to_vec(),
                )
                .map_err(|e| df(e.into()))?;
                let keys: Vec<ArrayRef> = self
                    .key_exprs
                    .iter()
                    .map(|e| e.evaluate(&input)?.into_array(n))
                    .collect::<Result<_>>()
                    .map_err(df)?;
                let key_rows = self.keys.convert_columns(&keys).map_err(|e| df(e.into()))?;
                let id = self.next_batch;
                self.next_batch = self.next_batch.wrapping_add(1);
                let mut live = 0;
                for i in 0..n {
                    let row = u32::try_from(i)
                        .map_err(|_| df(DataFusionError::Execution("over 4G candidates".into())))?;
                    let key: Key = key_rows.row(i).as_ref().into();
                    let candidate = Candidate {
                        t: times.value(i),
                        batch: id,
                        row,
                    };
                    let shard = self.shard_of(key.as_slice());
                    let shard = &mut self.shards[shard];
                    let before = shard
                        .states
                        .insert(key.clone(), KeyState::Candidate(candidate));
                    match before {
                        Some(KeyState::Candidate(c)) if c.batch == id => {}
                        Some(KeyState::Candidate(c)) => {
                            if let Some(h) = self.held.get_mut(&c.batch) {
                                h.live -= 1;
                            }
                            live += 1;
                        }
                        _ => {
                            shard.undecided.push(key);
                            live += 1;
                        }
                    }
                }
                self.held.insert(id, Held { batch: input, live });
            }
        }
        Ok(())
    }
}
