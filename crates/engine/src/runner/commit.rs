//! The second half of the loop: a read pushed through the stage and the operator, its dead
//! letters written, and the commit made, audited and moved past.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use kappa_log::Record;

use super::error::RunnerError;
use super::letters::dead_letter;
use super::run::{
    GROUPED_COMMIT_RECORDS_MAX, Next, PROGRESS_COMMIT_INTERVAL_MS, Read, Run, commit_landed,
    uuid_like,
};
use super::waiting::recovered;
use super::wap::{deliver_quarantined, settle};
use crate::commit_record::{
    ATTEMPT_PROPERTY, DEAD_LETTERS_PROPERTY, EXPECTATIONS_PROPERTY, OFFSETS_PROPERTY, Offsets,
    QUARANTINE_PROPERTY, VERSION_PROPERTY,
};
use crate::decode::Rejected;
use crate::watermark::WATERMARKS_PROPERTY;

impl Run {
    /// Pushes a read through the stage and the operator and writes its dead letters; returns
    /// the positions to commit (with when the work began and how many records it holds), or
    /// `Again` when there is nothing to write yet.
    pub(super) async fn compute(
        &mut self,
        read: Read,
    ) -> Result<Next<(Offsets, Instant, usize)>, RunnerError> {
        let started = Instant::now();
        let Read {
            records,
            batches,
            watermarks,
            rejected,
            mut target,
        } = read;
        // A watermark that moved without records (an upstream's commit of no rows) still
        // closes what it passes.
        let marks_moved = watermarks != self.last_watermarks;
        let pushed = if records == 0 && !marks_moved {
            Ok(())
        } else {
            self.push(batches, &watermarks).await
        };
        self.last_watermarks = watermarks;
        if let Err(e) = pushed {
            tracing::error!(model = %self.model_id, error = %e, "computing a micro-batch failed; retrying");
            return self.start_over().await;
        }
        let fresh: Vec<(&str, &Rejected)> = rejected
            .iter()
            .chain(self.dim_rejected.iter())
            .map(|(t, r)| (t.as_str(), r))
            .filter(|(t, r)| {
                !self
                    .already_dead
                    .contains(&((*t).to_owned(), r.partition, r.offset))
            })
            .collect();
        let wrote_letters = !fresh.is_empty();
        if wrote_letters {
            let letters: Vec<Record> = fresh
                .iter()
                .map(|(t, r)| dead_letter(&self.model_id, t, r))
                .collect();
            let fresh: Vec<(String, u32, u64)> = fresh
                .iter()
                .map(|(t, r)| ((*t).to_owned(), r.partition, r.offset))
                .collect();
            let from = self.dead_letters.end();
            if let Err(e) = self.dead_letters.append(letters).await {
                tracing::error!(model = %self.model_id, error = %e, "writing dead letters failed; retrying");
                // Some may be in the topic all the same (a cluster acknowledges each record):
                // those must not be written again.
                match self.dead_letters.written_after(from, &self.model_id) {
                    Ok(landed) => self.already_dead.extend(landed),
                    Err(e) => {
                        tracing::warn!(model = %self.model_id, error = %e, "reading back the dead letters written")
                    }
                }
                return self.start_over().await;
            }
            // In the topic now: a retry of this batch must not write them again.
            self.already_dead.extend(fresh);
        }
        for (dimension, _) in &self.dims {
            target.insert(dimension.offsets_key.clone(), dimension.next_offsets());
        }
        let state_changed = self.stage.as_ref().is_some_and(|s| s.has_changes());
        let progress_interval = Duration::from_millis(PROGRESS_COMMIT_INTERVAL_MS);
        self.uncommitted += records;
        let nothing_to_write = !self.operator.has_changes()
            && !state_changed
            && !wrote_letters
            && (target == self.table_offsets || self.last_commit.elapsed() < progress_interval);
        // Far behind, an operator whose commit rewrites its rows waits for more records (its
        // state is its rows; the commit rewrites what changed). A crash meanwhile rereads from
        // the last commit, as always.
        let gathers = self.far_behind
            && self.operator.rewrites_on_commit()
            && self.uncommitted < GROUPED_COMMIT_RECORDS_MAX;
        if nothing_to_write || gathers {
            // The positions are recorded with the next commit.
            self.committed = target;
            self.dim_rejected.clear();
            recovered(&self.lakehouse, &self.ident);
            return Ok(Next::Again);
        }
        Ok(Next::Go((target, started, records)))
    }

    /// Runs one micro-batch (one batch per source) through the stage, if any, then the
    /// operator.
    async fn push(
        &mut self,
        batches: Vec<RecordBatch>,
        watermarks: &[Option<i64>],
    ) -> datafusion::error::Result<()> {
        match &mut self.stage {
            Some(stage) => {
                let (rows, watermark) = stage.push(batches, watermarks).await?;
                self.operator.push(rows, watermark).await
            }
            None => match batches.into_iter().next() {
                Some(batch) => {
                    let watermark = watermarks.first().copied().flatten();
                    self.operator.push(batch, watermark).await
                }
                None => Ok(()),
            },
        }
    }

    /// What the commit to `target` records beside its rows; `Again`/`Stop` when saving the
    /// stage's state or the rows set aside failed (and the run started over).
    async fn commit_properties(
        &mut self,
        target: &Offsets,
        attempt: &str,
    ) -> Result<Next<HashMap<String, String>>, RunnerError> {
        let mut properties = HashMap::from([
            (
                OFFSETS_PROPERTY.to_owned(),
                serde_json::to_string(target).unwrap_or_default(),
            ),
            (VERSION_PROPERTY.to_owned(), self.version.clone()),
            (ATTEMPT_PROPERTY.to_owned(), attempt.to_owned()),
        ]);
        let marks: serde_json::Map<String, serde_json::Value> = self
            .sources
            .iter()
            .filter_map(|s| s.save_marks().map(|m| (s.key().to_owned(), m)))
            .collect();
        if !marks.is_empty() {
            properties.insert(
                WATERMARKS_PROPERTY.to_owned(),
                serde_json::Value::Object(marks).to_string(),
            );
        }
        properties.insert(
            DEAD_LETTERS_PROPERTY.to_owned(),
            self.dead_letters.end().to_string(),
        );
        for source in &self.sources {
            source.properties(&mut properties);
        }
        if let Some(stage) = &mut self.stage {
            match stage.checkpoint(&self.lakehouse, &self.table).await {
                Ok((key, value)) => {
                    properties.insert(key, value);
                }
                Err(e) => {
                    tracing::error!(model = %self.model_id, error = %e, "saving the operator state failed; retrying");
                    return self.start_over().await;
                }
            }
        }
        if let Some(checks) = &self.row_checks
            && let Some(pending) = self.operator.rows_to_append()
        {
            let checked = match checks.check(std::mem::take(pending)) {
                Ok(checked) => checked,
                Err(e) => {
                    tracing::error!(model = %self.model_id, error = %e, "checking the expectations failed; retrying");
                    return self.start_over().await;
                }
            };
            *pending = checked.kept;
            self.failed_rows = checked.failures.clone();
            if !checked.quarantined.is_empty() {
                let written = self
                    .lakehouse
                    .write_state(
                        &self.table,
                        "quarantine",
                        checks.quarantine_schema(),
                        &checked.quarantined,
                    )
                    .await;
                match written {
                    Ok(location) => {
                        properties.insert(QUARANTINE_PROPERTY.to_owned(), location);
                    }
                    Err(e) => {
                        tracing::error!(model = %self.model_id, error = %e, "writing the quarantined rows failed; retrying");
                        return self.start_over().await;
                    }
                }
            }
            if !checked.failures.is_empty() {
                properties.insert(
                    EXPECTATIONS_PROPERTY.to_owned(),
                    serde_json::to_string(&checked.failures).unwrap_or_default(),
                );
                for (name, count) in &checked.failures {
                    tracing::warn!(model = %self.model_id, expectation = %name, rows = count, "expectation failed");
                }
            }
        }
        Ok(Next::Go(properties))
    }

    /// Commits what was computed with the positions `target`, then audits it when the table
    /// is staged; a commit whose outcome is unknown is looked for before anything is retried.
    pub(super) async fn commit(
        &mut self,
        target: Offsets,
        started: Instant,
        records: usize,
    ) -> Result<Next<()>, RunnerError> {
        let attempt = uuid_like();
        let properties = match self.commit_properties(&target, &attempt).await? {
            Next::Go(properties) => properties,
            Next::Again => return Ok(Next::Again),
            Next::Stop => return Ok(Next::Stop),
        };
        let commit_started = Instant::now();
        let committed_now = self
            .operator
            .commit(&self.lakehouse, &self.table, properties)
            .await;
        crate::metrics::COMMIT_SECONDS.observe(commit_started.elapsed());
        match committed_now {
            Ok(updated) => {
                self.table = updated;
                tracing::debug!(model = %self.model_id, records, ms = started.elapsed().as_millis() as u64, "committed");
            }
            Err(e) => {
                let (reloaded, landed) =
                    commit_landed(&self.lakehouse, &self.ident, &attempt).await;
                if let Some(reloaded) = reloaded {
                    self.table = reloaded;
                }
                if !landed {
                    tracing::error!(model = %self.model_id, error = %e, "commit failed; rereading from the committed offsets");
                    return self.start_over().await;
                }
                self.operator.landed();
                tracing::warn!(model = %self.model_id, error = %e, "commit reported an error but landed");
            }
        }
        self.landed(target).await?;
        Ok(Next::Go(()))
    }

    /// After a commit landed: its rows set aside delivered, its audit decided, and the
    /// positions moved on.
    async fn landed(&mut self, target: Offsets) -> Result<(), RunnerError> {
        if let Some(checks) = self.row_checks.as_ref().filter(|c| c.drops()) {
            // A failure here stops the runner: its start delivers them before going on.
            deliver_quarantined(
                &self.lakehouse,
                &self.table,
                &self.quarantine,
                checks.quarantine_schema(),
            )
            .await
            .map_err(|e| self.lake_err(e))?;
        }
        if self.staged
            && let Some(model) = &self.model
        {
            self.table = settle(
                &self.lakehouse,
                model,
                self.table.clone(),
                self.staged,
                self.row_checks.is_some(),
                &mut self.audit,
            )
            .await?;
        }
        recovered(&self.lakehouse, &self.ident);
        if let Some(stage) = &mut self.stage {
            stage.landed();
        }
        self.table_offsets = target.clone();
        for source in &mut self.sources {
            source.landed(&target);
        }
        self.last_commit = Instant::now();
        crate::metrics::THROUGHPUT.add(&self.model_id, &self.version, self.uncommitted as u64);
        crate::metrics::EXPECTATION_FAILURES
            .add(&self.model_id, &std::mem::take(&mut self.failed_rows));
        self.uncommitted = 0;
        self.committed = target;
        self.dim_rejected.clear();
        // Records the commit passed are never read again (a table's rows go by the upstream's
        // name in dead letters, by the table's key in the positions).
        let committed = &self.committed;
        let keys: std::collections::HashMap<&str, &str> = self
            .sources
            .iter()
            .map(|s| (s.letters_name(), s.key()))
            .collect();
        self.already_dead.retain(|(t, p, o)| {
            committed
                .get(keys.get(t.as_str()).copied().unwrap_or(t.as_str()))
                .and_then(|next| next.get(p))
                .is_none_or(|next| o >= next)
        });
        Ok(())
    }
}
