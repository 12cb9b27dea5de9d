//! Operator state written as a base file and deltas: each commit writes what changed since the
//! last one; every [`DELTAS_BEFORE_COMPACTION`] deltas the whole state becomes a new base. Used
//! by deduplication (decided keys) and stream joins (each side's buffer).

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use kappa_lakehouse::{Lakehouse, LakehouseError, Table};
use serde::{Deserialize, Serialize};

/// Deltas kept before they are folded into one base file.
pub const DELTAS_BEFORE_COMPACTION: usize = 16;

/// The files of one piece of state named by a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaFiles {
    pub base: Option<String>,
    pub deltas: Vec<String>,
}

impl DeltaFiles {
    /// Every file to read back, in order: the base, then the deltas.
    pub fn locations(&self) -> impl Iterator<Item = &String> {
        self.base.iter().chain(&self.deltas)
    }

    /// Records a checkpoint as files of `table` labelled `label`: a new base of `whole()` once
    /// enough deltas piled up (none when the state is empty), otherwise a delta of `fresh()`
    /// when it has rows.
    pub async fn record(
        &mut self,
        lakehouse: &Lakehouse,
        table: &Table,
        label: &str,
        schema: &SchemaRef,
        whole: impl FnOnce() -> Result<RecordBatch, LakehouseError>,
        fresh: impl FnOnce() -> Result<Vec<RecordBatch>, LakehouseError>,
    ) -> Result<(), LakehouseError> {
        if self.deltas.len() >= DELTAS_BEFORE_COMPACTION {
            let whole = whole()?;
            self.base = if whole.num_rows() == 0 {
                None
            } else {
                Some(
                    lakehouse
                        .write_state(table, label, schema, &[whole])
                        .await?,
                )
            };
            self.deltas.clear();
            return Ok(());
        }
        let fresh = fresh()?;
        if fresh.iter().any(|b| b.num_rows() > 0) {
            let label = format!("{label}-delta");
            self.deltas
                .push(lakehouse.write_state(table, &label, schema, &fresh).await?);
        }
        Ok(())
    }
}
