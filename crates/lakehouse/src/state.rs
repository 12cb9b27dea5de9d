//! Operator state saved next to a table: Arrow IPC files under `<table>/state/`, named once and
//! never rewritten, referenced from the snapshot whose rows they are consistent with. A
//! snapshot plus the state files it names is a complete checkpoint.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use iceberg::table::Table;

use crate::{Context, Lakehouse, Result};

impl Lakehouse {
    /// Writes `batches` (of `schema`) as a new state file of `table`; returns its location.
    pub async fn write_state(
        &self,
        table: &Table,
        label: &str,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<String> {
        let ident = table.identifier();
        let mut bytes = Vec::new();
        {
            let mut writer = FileWriter::try_new(&mut bytes, schema)
                .doing(|| format!("encode state of {ident}"))?;
            for batch in batches {
                writer
                    .write(batch)
                    .doing(|| format!("encode state of {ident}"))?;
            }
            writer
                .finish()
                .doing(|| format!("encode state of {ident}"))?;
        }
        let location = format!(
            "{}/state/kappa-{label}-{}.arrow",
            table.metadata().location().trim_end_matches('/'),
            uuid::Uuid::new_v4().simple()
        );
        table
            .file_io()
            .new_output(&location)
            .doing(|| format!("create {location}"))?
            .write(bytes.into())
            .await
            .doing(|| format!("write {location}"))?;
        Ok(location)
    }

    /// Reads a state file written by [`Lakehouse::write_state`].
    pub async fn read_state(&self, table: &Table, location: &str) -> Result<Vec<RecordBatch>> {
        let bytes = table
            .file_io()
            .new_input(location)
            .doing(|| format!("open {location}"))?
            .read()
            .await
            .doing(|| format!("read {location}"))?;
        let reader = FileReader::try_new(std::io::Cursor::new(bytes), None)
            .doing(|| format!("decode {location}"))?;
        reader
            .collect::<std::result::Result<Vec<_>, _>>()
            .doing(|| format!("decode {location}"))
    }
}
