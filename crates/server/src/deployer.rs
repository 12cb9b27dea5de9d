//! Deploys inside `kappa up`: the live project's runners, and a deploy in progress — new
//! versions replaying beside the live ones until one transaction switches their public names.
//!
//! ```text
//! deploy(P) ──► runners of P's changed models (new versions, new tables) ──► caught up?
//!      live runners (the deployed project) keep running and serving         │ every 200 ms
//!                                                                           ▼
//!                      audit: old vs new version of each (crate::audit) ── fails? ──► stop P
//!                                                                           ▼
//!         publish(all public names) · stop old runners · start P's runners · record P
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use kappa_engine::event_log::EventLog;
use kappa_engine::runner::{OFFSETS_PROPERTY, Offsets, version_table, written_table};
use kappa_lakehouse::{Lakehouse, TableIdent};
use kappa_pipeline::deploy::{Deployment, FolderFile};
use kappa_pipeline::{Project, ProjectFiles};
use serde::{Deserialize, Serialize};

use crate::api::VersionStatus;
use crate::audit::ModelAudit;
use crate::deployment;
use crate::pipelines::{Pipelines, RunnerStates};

/// How often retired versions are looked at for expiry (seconds).
const RETENTION_CHECK_S: u64 = 60;
/// How often a deploy looks whether its new versions caught up.
const CUTOVER_CHECK_MS: u64 = 200;

/// The project `kappa up` runs and the deploy in progress, if any.
#[derive(Debug)]
pub struct Deployer {
    log: EventLog,
    lakehouse: Lakehouse,
    data_dir: PathBuf,
    inner: tokio::sync::Mutex<Inner>,
    /// The live project and its runners' states, for status (read without waiting on a
    /// deploy).
    live: std::sync::RwLock<Option<(Arc<Project>, RunnerStates)>>,
    /// The audit of the deploy in progress or of the last one.
    audit: std::sync::Mutex<AuditState>,
    /// `bronze.<topic>` for every topic a deploy brought.
    bronze: tokio::sync::Mutex<crate::pipelines::Bronze>,
    bronze_states: RunnerStates,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct AuditState {
    #[serde(skip)]
    running: bool,
    models: Vec<ModelAudit>,
    /// Why the last deploy did not cut over.
    failure: Option<String>,
}

/// Where the last audit is kept, in the data directory, so that a restart still shows it.
const AUDIT_FILE: &str = "audit.json";

#[derive(Debug, Default)]
struct Inner {
    live: Option<Pipelines>,
    pending: Option<Pending>,
}

/// A deploy waiting for its new versions.
#[derive(Debug)]
struct Pending {
    project: Arc<Project>,
    replaying: Vec<String>,
    runners: Pipelines,
    cutover: tokio::task::JoinHandle<()>,
    started: std::time::Instant,
    /// A rollback's project files as they were before it rewrote them: put back if the
    /// deploy stops without a cutover, so that the folder says what serves.
    undo: Vec<FolderFile>,
}

/// What a deploy is doing, as `GET /v1/deploy` reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeployProgress {
    /// `replaying`, `auditing` (caught up, old and new compared), `idle` (nothing to deploy)
    /// or `failed` (the last deploy did not cut over: `failure` says why).
    pub state: String,
    /// The new versions replaying: how many of their input records they committed.
    pub models: Vec<ReplayProgress>,
    /// The audit of the deploy in progress, or of the last deploy.
    #[serde(default)]
    pub audit: Vec<ModelAudit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

impl DeployProgress {
    /// Nothing deploying, no audit.
    pub fn idle() -> DeployProgress {
        DeployProgress {
            state: "idle".into(),
            ..DeployProgress::default()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayProgress {
    pub model: String,
    pub version: String,
    pub records_done: u64,
    pub records_total: u64,
    /// Since the deploy started.
    #[serde(default)]
    pub seconds: f64,
}

impl Deployer {
    /// The log the project's models read.
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// Runs what `data_dir` records as deployed, then deploys `project` (read from `files`)
    /// over it: at once when nothing was deployed, otherwise beside it until the cutover.
    pub async fn start(
        log: EventLog,
        lakehouse: Lakehouse,
        data_dir: PathBuf,
        project: Arc<Project>,
        files: ProjectFiles,
    ) -> anyhow::Result<Arc<Deployer>> {
        let bronze = crate::pipelines::Bronze::default();
        let bronze_states = bronze.states();
        let deployer = Arc::new(Deployer {
            log,
            lakehouse,
            data_dir,
            inner: tokio::sync::Mutex::new(Inner::default()),
            live: std::sync::RwLock::new(None),
            audit: std::sync::Mutex::new(AuditState::default()),
            bronze: tokio::sync::Mutex::new(bronze),
            bronze_states,
        });
        // The last audit, as a restart found it (a deploy at start replaces it).
        if let Ok(text) = std::fs::read(deployer.data_dir.join(AUDIT_FILE))
            && let Ok(last) = serde_json::from_slice::<AuditState>(&text)
            && let Ok(mut audit) = deployer.audit.lock()
        {
            *audit = last;
        }
        let deployed = deployment::load(&deployer.data_dir)?.and_then(|d| d.project());
        match deployed {
            Some(deployed) => {
                let deployed = Arc::new(deployed);
                // Every deployed topic's records are kept in bronze, as a deploy started them.
                deployer
                    .bronze
                    .lock()
                    .await
                    .ensure(&deployer.log, &deployer.lakehouse, &deployed)
                    .await;
                let mut inner = deployer.inner.lock().await;
                deployer.go_live(&mut inner, deployed);
                drop(inner);
                // A deploy in progress when the server stopped carries on.
                if let Some(target) = deployment::load_target(&deployer.data_dir)?
                    && let Some(project) = target.project()
                {
                    tracing::info!("a deploy was in progress when kappa stopped: it carries on");
                    let project = Arc::new(project);
                    crate::pipelines::ensure_topics(&deployer.log, &project).await?;
                    deployer
                        .deploy_undoing(project, target.files, target.undo)
                        .await?;
                }
            }
            // The first start: the folder is deployed.
            None => {
                deployer.deploy(project, files).await?;
            }
        }
        // Retired versions expire while the server runs: a look a minute.
        let weak = Arc::downgrade(&deployer);
        tokio::spawn(async move {
            loop {
                let Some(deployer) = weak.upgrade() else {
                    return;
                };
                if let Err(e) = deployer.expire_retired().await {
                    tracing::warn!(error = %format!("{e:#}"), "expiring retired versions failed");
                }
                drop(deployer);
                tokio::time::sleep(std::time::Duration::from_secs(RETENTION_CHECK_S)).await;
            }
        });
        Ok(deployer)
    }

    /// Deploys `project` (read from `files`): the models whose version is not live start as
    /// new versions replaying from the beginning; once all have caught up, their public names
    /// switch together and the project is recorded. A deploy in progress is replaced. Returns
    /// the models that replay.
    pub async fn deploy(
        self: &Arc<Self>,
        project: Arc<Project>,
        files: ProjectFiles,
    ) -> anyhow::Result<Vec<String>> {
        self.deploy_undoing(project, files, Vec::new()).await
    }

    /// [`Deployer::deploy`], with the folder files to put back if it stops without a cutover.
    async fn deploy_undoing(
        self: &Arc<Self>,
        project: Arc<Project>,
        files: ProjectFiles,
        undo: Vec<FolderFile>,
    ) -> anyhow::Result<Vec<String>> {
        // Every topic's records are kept in bronze from the moment it is deployed.
        self.bronze
            .lock()
            .await
            .ensure(&self.log, &self.lakehouse, &project)
            .await;
        let mut inner = self.inner.lock().await;
        if let Some(pending) = inner.pending.take() {
            tracing::info!(models = ?pending.replaying, "a new deploy replaces the one in progress");
            pending.cutover.abort();
            pending.runners.stop().await;
        }
        let live = self.live_project();
        let replaying: Vec<String> = match &live {
            Some(live) => {
                let before = kappa_pipeline::deploy::versions(live);
                let after = kappa_pipeline::deploy::versions(&project);
                project
                    .order
                    .iter()
                    .filter(|id| after.get(*id) != before.get(*id))
                    .cloned()
                    .collect()
            }
            None => Vec::new(),
        };
        let project = Arc::new(
            self.choose_sources(project, live.as_deref(), &replaying)
                .await,
        );
        let mut record = Deployment::of(&project, &files);
        // Kept with the deploy in progress, so that a restart can still put them back.
        record.undo = undo.clone();
        let same_models = live
            .as_ref()
            .is_some_and(|l| l.models.keys().eq(project.models.keys()));
        if replaying.is_empty() && same_models && inner.live.is_some() {
            // The same versions (the files may differ in spacing or comments). A model whose
            // expectations changed runs on from its table with them: its runner starts again.
            let rechecked: Vec<String> = match &live {
                Some(before) => project
                    .order
                    .iter()
                    .filter(|m| !same_checks(before, &project, m))
                    .cloned()
                    .collect(),
                None => Vec::new(),
            };
            if let Some(running) = inner.live.as_mut()
                && !rechecked.is_empty()
            {
                tracing::info!(models = ?rechecked, "deploying changed expectations: these runners start again with them");
                running.stop_models(&rechecked).await;
                running.start_more(
                    self.log.clone(),
                    self.lakehouse.clone(),
                    project.clone(),
                    &rechecked,
                    &|_| true,
                );
            }
            if let Ok(mut live) = self.live.write()
                && let Some((running, _)) = live.as_mut()
            {
                *running = project;
            }
            self.record(record, false)?;
            return Ok(replaying);
        }
        // Nothing live (the first deploy), nothing to replay, or a catalog without aliases
        // (whose tables are rebuilt in place): the project goes live at once.
        // What is shown from here on is this deploy's audit, if it has one.
        if let Ok(mut audit) = self.audit.lock() {
            *audit = AuditState::default();
        }
        if live.is_none() || replaying.is_empty() || !self.lakehouse.supports_aliases() {
            if let Some(old) = inner.live.take() {
                old.stop().await;
            }
            self.go_live(&mut inner, project);
            self.record(record, true)?;
            return Ok(replaying);
        }
        tracing::info!(models = ?replaying, "deploying: new versions replay beside the live ones");
        // Recorded first, so that a restart carries the deploy on.
        deployment::save_target(&self.data_dir, Some(&record))?;
        let runners = Pipelines::start_versions(
            self.log.clone(),
            self.lakehouse.clone(),
            project.clone(),
            &replaying,
            &|_| false,
        );
        let stopped = runners.stopping();
        let cutover = tokio::spawn({
            let deployer = self.clone();
            let (project, replaying) = (project.clone(), replaying.clone());
            async move {
                if let Err(e) = deployer
                    .cut_over(project, &replaying, record, stopped)
                    .await
                {
                    tracing::error!(error = %format!("{e:#}"), "the cutover failed; the deployed versions keep serving");
                }
            }
        });
        inner.pending = Some(Pending {
            project,
            replaying: replaying.clone(),
            runners,
            cutover,
            started: std::time::Instant::now(),
            undo,
        });
        Ok(replaying)
    }

    /// A deploy that stopped without a cutover: its runners stopped, a rollback's rewrite of
    /// the project folder put back, and the deploy forgotten.
    async fn stop_pending(&self, inner: &mut Inner) {
        if let Some(pending) = inner.pending.take() {
            pending.runners.stop().await;
            for FolderFile { folder, path, text } in &pending.undo {
                match crate::project::restore_file(folder, path, text.as_deref()) {
                    Ok(()) => tracing::info!(path, "the stopped rollback's file is put back"),
                    Err(e) => {
                        tracing::error!(path, error = %format!("{e:#}"), "putting back a file of the stopped rollback failed")
                    }
                }
            }
        }
        self.forget_target();
    }
    /// Which models read their upstreams' published tables (`Project::reads_tables`): every
    /// model over models whose shape runs over their tables (`readable_upstream`), so that it
    /// computes on what those models published — never on rows an audit holds back or a
    /// discard drops — and each upstream is computed once. A version keeps the source it
    /// started with: one whose table was written from the topics (by an earlier kappa) goes
    /// on reading them.
    async fn choose_sources(
        &self,
        project: Arc<Project>,
        live: Option<&Project>,
        replaying: &[String],
    ) -> Project {
        let mut project = Arc::unwrap_or_clone(project);
        project.reads_tables.clear();
        if let Some(live) = live {
            for (id, upstreams) in &live.reads_tables {
                if !replaying.contains(id) && project.models.contains_key(id) {
                    project.reads_tables.insert(id.clone(), upstreams.clone());
                }
            }
        }
        let versions = kappa_pipeline::deploy::versions(&project);
        for id in project.order.clone() {
            if project.reads_tables.contains_key(&id) {
                continue;
            }
            let Some(upstreams) = kappa_engine::upstream::readable_upstream(&project, &id).await
            else {
                continue;
            };
            if !self.written_from_topics(&project, &versions, &id).await {
                let upstream = upstreams.join(", ");
                tracing::info!(model = %id, %upstream, "reads its upstreams' published tables");
                project.reads_tables.insert(id, upstreams);
            }
        }
        project
    }

    /// Whether `id`'s version wrote its table from the topics (a version keeps its source).
    async fn written_from_topics(
        &self,
        project: &Project,
        versions: &BTreeMap<String, String>,
        id: &str,
    ) -> bool {
        let model = &project.models[id];
        let version = versions.get(id).cloned().unwrap_or_default();
        match written_table(&self.lakehouse, &model.layer, &model.name, &version) {
            Ok(table) => kappa_engine::commit_record::from_topics(
                &committed_offsets(&self.lakehouse, &table).await,
            ),
            Err(_) => true,
        }
    }

    /// Releases the holds on upstream tables of versions neither the live project nor the
    /// deploy in progress runs (their readers stopped for good).
    fn release_stopped_readers(&self, inner: &Inner) {
        let mut keep = std::collections::BTreeSet::new();
        let projects = self
            .live_project()
            .into_iter()
            .chain(inner.pending.as_ref().map(|p| p.project.clone()));
        for project in projects {
            let versions = kappa_pipeline::deploy::versions(&project);
            for id in project.reads_tables.keys() {
                let model = &project.models[id];
                let version = versions.get(id).cloned().unwrap_or_default();
                if let Ok(table) = version_table(&model.layer, &model.name, &version) {
                    keep.insert(table.to_string());
                }
            }
        }
        self.lakehouse
            .release_all_but(&|reader| keep.contains(reader));
    }

    /// Where each of `models` would have read everything its inputs hold now: the end of
    /// every partition of its topics, and for a model reading its upstreams' tables, each
    /// table's last commit (its sequence number).
    async fn input_ends(&self, project: &Project, models: &[String]) -> BTreeMap<String, Offsets> {
        let mut ends = topic_ends(&self.log, project, models);
        for id in models {
            for upstream in project.reads_tables.get(id).into_iter().flatten() {
                self.add_table_end(project, id, upstream, &mut ends).await;
            }
        }
        ends
    }

    /// Adds to `ends` of the reader `id` the last commit of `upstream`'s table.
    async fn add_table_end(
        &self,
        project: &Project,
        id: &str,
        upstream: &str,
        ends: &mut BTreeMap<String, Offsets>,
    ) {
        let Ok(table) = kappa_engine::upstream::upstream_table(&self.lakehouse, project, upstream)
        else {
            return;
        };
        let last = match self.lakehouse.load_table(&table).await {
            Ok(t) => t
                .metadata()
                .current_snapshot()
                .map_or(0, |s| s.sequence_number()),
            Err(_) => 0,
        };
        // Beside its own stream topic, if it reads one (the other side of a join).
        ends.entry(id.to_owned()).or_default().insert(
            kappa_engine::upstream::table_key(&table),
            BTreeMap::from([(0, u64::try_from(last).unwrap_or(0))]),
        );
    }

    /// Of the records `upstream`'s table holds, how many a reader at the position `committed`
    /// records has read, and how many there are.
    async fn upstream_progress(
        &self,
        project: &Project,
        upstream: &str,
        committed: &Offsets,
    ) -> Option<(u64, u64)> {
        let table =
            kappa_engine::upstream::upstream_table(&self.lakehouse, project, upstream).ok()?;
        let position = committed
            .get(&kappa_engine::upstream::table_key(&table))
            .and_then(|p| p.get(&0))
            .and_then(|p| i64::try_from(*p).ok())
            .unwrap_or(0);
        let table = self.lakehouse.load_table(&table).await.ok()?;
        let total: u64 = table
            .metadata()
            .current_snapshot()
            .and_then(|s| {
                s.summary()
                    .additional_properties
                    .get("total-records")
                    .cloned()
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let ahead = self.lakehouse.added_after(&table, position).await.ok()?;
        let unread: u64 = ahead.files.iter().map(|f| f.file.record_count()).sum();
        Some((total.saturating_sub(unread), total))
    }

    /// The project whose versions serve, if any.
    pub fn live_project(&self) -> Option<Arc<Project>> {
        self.live
            .read()
            .ok()
            .and_then(|live| live.as_ref().map(|(p, _)| p.clone()))
    }

    /// What the live runners are doing.
    pub fn states(&self) -> Option<RunnerStates> {
        self.live
            .read()
            .ok()
            .and_then(|live| live.as_ref().map(|(_, s)| s.clone()))
    }

    /// The deploy in progress: each new version's committed input records of its total, and
    /// its audit once caught up.
    pub async fn progress(&self) -> DeployProgress {
        let audit = self.audit.lock().map(|a| a.clone()).unwrap_or_default();
        let (project, replaying, seconds) = {
            let inner = self.inner.lock().await;
            match &inner.pending {
                Some(p) => (
                    p.project.clone(),
                    p.replaying.clone(),
                    p.started.elapsed().as_secs_f64(),
                ),
                None => {
                    let state = if audit.failure.is_some() {
                        "failed"
                    } else {
                        "idle"
                    };
                    return DeployProgress {
                        state: state.into(),
                        models: Vec::new(),
                        audit: audit.models,
                        failure: audit.failure,
                    };
                }
            }
        };
        let versions = kappa_pipeline::deploy::versions(&project);
        let ends = self.input_ends(&project, &replaying).await;
        let mut models = Vec::new();
        for id in &replaying {
            let version = versions.get(id).cloned().unwrap_or_default();
            let model = &project.models[id];
            let committed = match version_table(&model.layer, &model.name, &version) {
                Ok(table) => committed_offsets(&self.lakehouse, &table).await,
                Err(_) => Offsets::new(),
            };
            let (mut done, mut total) = (0, 0);
            for upstream in project.reads_tables.get(id).into_iter().flatten() {
                // Records of the upstream's table, read or not.
                let (d, t) = self
                    .upstream_progress(&project, upstream, &committed)
                    .await
                    .unwrap_or((0, 0));
                (done, total) = (done + d, total + t);
            }
            for (topic, partitions) in
                ends.get(id).into_iter().flatten().filter(|(topic, _)| {
                    !topic.starts_with(kappa_engine::upstream::TABLE_KEY_PREFIX)
                })
            {
                for (partition, end) in partitions {
                    total += end;
                    let next = committed.get(topic).and_then(|c| c.get(partition));
                    done += next.copied().unwrap_or(0).min(*end);
                }
            }
            models.push(ReplayProgress {
                model: id.clone(),
                version,
                records_done: done,
                records_total: total,
                seconds,
            });
        }
        DeployProgress {
            state: if audit.running {
                "auditing"
            } else {
                "replaying"
            }
            .into(),
            models,
            audit: audit.models,
            failure: None,
        }
    }

    /// Every version kappa knows, and what each is doing: the recorded ones (live, retired)
    /// and the deploy's (replaying with its progress, caught up, auditing, failed).
    pub async fn versions(&self) -> Vec<VersionStatus> {
        let mut all = recorded_versions(&self.data_dir);
        let progress = self.progress().await;
        for m in &progress.models {
            let state = if progress.state == "auditing" {
                "auditing"
            } else if m.records_done >= m.records_total {
                "caught up"
            } else {
                "replaying"
            };
            let mut version = VersionStatus::new(&m.model, &m.version, state);
            if state == "replaying" {
                let rate = m.records_done as f64 / m.seconds.max(1e-3);
                version.percent_done =
                    Some(m.records_done as f64 * 100.0 / m.records_total.max(1) as f64);
                version.records_per_second = Some(rate);
                version.eta_seconds = (rate > 0.0)
                    .then(|| m.records_total.saturating_sub(m.records_done) as f64 / rate);
            }
            all.push(version);
        }
        if progress.state == "failed" {
            for audit in progress.audit.iter().filter(|a| !a.failures.is_empty()) {
                let mut version = VersionStatus::new(&audit.model, &audit.new_version, "failed");
                version.detail = Some(audit.failures.join("; "));
                all.push(version);
            }
        }
        all.sort_by(|a, b| a.model.cmp(&b.model));
        all
    }

    /// What the bronze runners are doing, by topic.
    pub fn bronze_states(&self) -> RunnerStates {
        self.bronze_states.clone()
    }

    /// Stops every runner and the deploy in progress.
    pub async fn stop(&self) {
        self.bronze.lock().await.stop().await;
        let mut inner = self.inner.lock().await;
        if let Some(pending) = inner.pending.take() {
            pending.cutover.abort();
            pending.runners.stop().await;
        }
        if let Some(live) = inner.live.take() {
            live.stop().await;
        }
    }

    /// Starts `project`'s runners as the live ones (a model without a public table gets its
    /// version's).
    fn go_live(&self, inner: &mut Inner, project: Arc<Project>) {
        let runners = Pipelines::start(self.log.clone(), self.lakehouse.clone(), project.clone());
        if let Ok(mut live) = self.live.write() {
            *live = Some((project, runners.states()));
        }
        inner.live = Some(runners);
    }

    /// Waits until every model of `replaying` has committed, in its version's table, every
    /// record its topics held at the previous check (its lag is then within a check and a
    /// commit interval), audits each against its live version, then — unless an audit failed,
    /// which ends the deploy — switches their public names in one transaction, replaces the
    /// live runners by `project`'s and records the deployment.
    async fn cut_over(
        &self,
        project: Arc<Project>,
        replaying: &[String],
        record: Deployment,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let versions = kappa_pipeline::deploy::versions(&project);
        let mut switches: Vec<(String, TableIdent, TableIdent)> = Vec::new();
        for id in replaying {
            let model = &project.models[id];
            let version = versions.get(id).cloned().unwrap_or_default();
            switches.push((
                id.clone(),
                kappa_lakehouse::table_ident(&model.layer, &model.name)?,
                version_table(&model.layer, &model.name, &version)?,
            ));
        }
        let mut ends_before: Option<BTreeMap<String, Offsets>> = None;
        // Every version has caught up once it passed where its inputs ended at the previous
        // check. A version reading a replaying upstream's table must pass where that table
        // ended once the upstream had caught up: so the checks must pass in a row once per
        // level of such a chain (silver → gold: twice), however much keeps arriving.
        let passes_needed = replaying
            .iter()
            .map(|id| chain_depth(&project, replaying, id))
            .max()
            .unwrap_or(1);
        let mut passes = 0;
        loop {
            if *stopped.borrow() {
                return Ok(());
            }
            // A new version whose commit failed its audit stops the deploy: the deployed
            // versions keep serving.
            if let Some((id, reason)) = switches.iter().find_map(|(id, _, table)| {
                // A failing runner restarts; only a quarantine decides the deploy.
                let reason = self.lakehouse.blocked(table)?;
                (!reason.starts_with(kappa_engine::runner::FAILING)).then_some((id, reason))
            }) {
                // What decides a live model's quarantine (publish, discard) does not apply:
                // the deploy stops, and a new one is the way on.
                let what = kappa_engine::runner::what_failed(&reason);
                let failure = format!(
                    "the new version of {id} is {what}; the deploy stopped and the deployed \
                     versions keep serving: filter those rows in the model, or relax the \
                     expectation (severity = \"warn\" or \"drop\"), and deploy again"
                );
                tracing::warn!(%failure, "the deploy stops; the deployed versions keep serving");
                if let Ok(mut audit) = self.audit.lock() {
                    audit.running = false;
                    audit.failure = Some(failure);
                }
                let mut inner = self.inner.lock().await;
                self.stop_pending(&mut inner).await;
                for (_, _, table) in &switches {
                    self.lakehouse.unblock(table);
                }
                self.release_stopped_readers(&inner);
                return Ok(());
            }
            if let Some(before) = &ends_before {
                let mut all = true;
                for (id, _, table) in &switches {
                    let committed = committed_offsets(&self.lakehouse, table).await;
                    all &= before.get(id).is_none_or(|ends| passed(&committed, ends));
                }
                passes = if all { passes + 1 } else { 0 };
                if passes >= passes_needed {
                    break;
                }
            }
            // Read after the check: an upstream that passed its ends has committed them by
            // the time its table's end is read here.
            ends_before = Some(self.input_ends(&project, replaying).await);
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_millis(CUTOVER_CHECK_MS)) => {}
                _ = stopped.changed() => {}
            }
        }
        if let Some(failure) = self.audit(&project, &switches, &versions).await {
            tracing::warn!(%failure, "the audit stopped the deploy; the deployed versions keep serving");
            let mut inner = self.inner.lock().await;
            self.stop_pending(&mut inner).await;
            self.release_stopped_readers(&inner);
            return Ok(());
        }
        let mut inner = self.inner.lock().await;
        let pairs: Vec<(TableIdent, TableIdent)> = switches
            .iter()
            .map(|(_, public, table)| (public.clone(), table.clone()))
            .collect();
        self.lakehouse.publish(&pairs).await?;
        tracing::info!(models = ?replaying, "cut over: the new versions serve");
        // This task is the pending deploy's: it is taken, not aborted.
        let pending = inner.pending.take();
        match (inner.live.take(), pending, self.live_project()) {
            (Some(mut live), Some(pending), Some(before)) => {
                // No pause for the live path: the new versions' runners, caught up, go on as
                // the live ones, and so do the unchanged models' runners.
                let going: Vec<String> = live
                    .models()
                    .into_iter()
                    .filter(|m| !runs_on(&before, &project, replaying, m))
                    .collect();
                live.stop_models(&going).await;
                live.adopt(pending.runners).await;
                let running = live.models();
                let missing: Vec<String> = project
                    .order
                    .iter()
                    .filter(|m| !running.contains(m))
                    .cloned()
                    .collect();
                live.start_more(
                    self.log.clone(),
                    self.lakehouse.clone(),
                    project.clone(),
                    &missing,
                    &|_| true,
                );
                if let Ok(mut state) = self.live.write() {
                    *state = Some((project, live.states()));
                }
                inner.live = Some(live);
            }
            (live, pending, _) => {
                if let Some(pending) = pending {
                    pending.runners.stop().await;
                }
                if let Some(old) = live {
                    old.stop().await;
                }
                self.go_live(&mut inner, project);
            }
        }
        self.record(record, true)?;
        self.release_stopped_readers(&inner);
        drop(inner);
        self.expire_retired().await
    }

    /// Audits every switching model's new version against the live one; returns why the
    /// deploy must stop, if it must. The audits stay for [`Deployer::progress`].
    async fn audit(
        &self,
        project: &Project,
        switches: &[(String, TableIdent, TableIdent)],
        versions: &BTreeMap<String, String>,
    ) -> Option<String> {
        let set = |f: &dyn Fn(&mut AuditState)| {
            if let Ok(mut audit) = self.audit.lock() {
                f(&mut audit);
            }
        };
        set(&|a| a.running = true);
        let live = self.live_project();
        let live_versions = live.as_deref().map(kappa_pipeline::deploy::versions);
        let mut failures = Vec::new();
        for (id, _, table) in switches {
            let model = &project.models[id];
            let new_version = versions.get(id).cloned().unwrap_or_default();
            let old = live_versions
                .as_ref()
                .and_then(|v| v.get(id))
                .and_then(|v| Some((v.clone(), version_table(&model.layer, &model.name, v).ok()?)));
            let report = crate::audit::audit(
                &self.lakehouse,
                id,
                &model.config.audit,
                old.as_ref().map(|(v, t)| (v.as_str(), t)),
                (&new_version, table),
            )
            .await;
            tracing::info!(model = %id, audit = %report.to_text(), "audited");
            failures.extend(report.failures.iter().map(|f| format!("{id}: {f}")));
            // The new version's expectations, over what it would publish.
            match self.lakehouse.load_table(table).await {
                Ok(new_table) => {
                    match kappa_engine::expect::audit(
                        &self.lakehouse,
                        model,
                        &new_table,
                        None,
                        false,
                        0,
                    )
                    .await
                    {
                        Ok(audited) => failures.extend(
                            audited
                                .iter()
                                .filter(|a| a.blocks())
                                .map(|a| format!("{id}: {}", a.describe())),
                        ),
                        Err(e) => {
                            failures.push(format!("{id}: its expectations could not run: {e}"))
                        }
                    }
                }
                Err(e) => failures.push(format!("{id}: its new table could not be read: {e}")),
            }
            set(&|a| a.models.push(report.clone()));
        }
        let failure = (!failures.is_empty())
            .then(|| format!("the audit stopped the cutover: {}", failures.join("; ")));
        set(&|a| {
            a.running = false;
            a.failure = failure.clone();
        });
        let finished = self.audit.lock().map(|a| a.clone()).unwrap_or_default();
        match serde_json::to_vec_pretty(&finished) {
            Ok(text) => {
                if let Err(e) = deployment::replace_file(&self.data_dir.join(AUDIT_FILE), &text) {
                    tracing::warn!(error = %e, "keeping the audit failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "keeping the audit failed"),
        }
        failure
    }

    /// Records `record` as deployed. When it `replaces` the recorded deployment (other
    /// versions), that one becomes its previous, for a rollback; otherwise the recorded one's
    /// previous stays.
    /// Records `record` as what is deployed (`replaces`: as a new deployment the current one
    /// retires to, kept for rollback); no deploy is in progress after it.
    fn record(&self, mut record: Deployment, replaces: bool) -> anyhow::Result<()> {
        // Deployed: nothing is to be put back.
        record.undo.clear();
        let current = deployment::load(&self.data_dir)?;
        record.previous = match current {
            Some(mut current) if replaces && !current.files.is_empty() => {
                current.previous = None;
                current.retired_at_ms = Some(now_ms());
                Some(Box::new(current))
            }
            Some(current) => current.previous,
            None => None,
        };
        deployment::save(&self.data_dir, &record)?;
        deployment::save_target(&self.data_dir, None)
    }

    /// Forgets the deploy in progress (it stopped without a cutover): a restart serves what
    /// is deployed and does not try it again.
    fn forget_target(&self) {
        if let Err(e) = deployment::save_target(&self.data_dir, None) {
            tracing::warn!(error = %format!("{e:#}"), "forgetting the stopped deploy failed; a restart tries it again");
        }
    }

    /// Drops the tables of the replaced deployment's versions once the live project's
    /// `deploy.retention` has passed since its cutover (the versions the live deployment or a
    /// deploy in progress still uses stay), then forgets that deployment: a rollback has
    /// nothing to go back to.
    pub async fn expire_retired(&self) -> anyhow::Result<()> {
        let inner = self.inner.lock().await;
        let Some(mut record) = deployment::load(&self.data_dir)? else {
            return Ok(());
        };
        let Some(previous) = record.previous.take() else {
            return Ok(());
        };
        let retention = self
            .live_project()
            .map(|p| p.config.deploy.retention_ms())
            .transpose()
            .map_err(|e| anyhow::anyhow!(e))?
            .unwrap_or(kappa_pipeline::DEFAULT_RETENTION_MS);
        let Some(retired_at) = previous.retired_at_ms else {
            // Recorded before deployments kept the time: the retention starts now.
            let mut previous = previous;
            previous.retired_at_ms = Some(now_ms());
            record.previous = Some(previous);
            return deployment::save(&self.data_dir, &record);
        };
        if now_ms() < retired_at.saturating_add(retention) {
            return Ok(());
        }
        let pending = inner
            .pending
            .as_ref()
            .map(|p| kappa_pipeline::deploy::versions(&p.project))
            .unwrap_or_default();
        for (id, model) in &previous.models {
            let in_use = record
                .models
                .get(id)
                .is_some_and(|m| m.version == model.version)
                || pending.get(id) == Some(&model.version);
            let Some((layer, name)) = id.split_once('.') else {
                continue;
            };
            if in_use || !self.lakehouse.supports_aliases() {
                continue;
            }
            let table = version_table(layer, name, &model.version)?;
            match self.lakehouse.drop_table(&table).await {
                Ok(()) => {
                    tracing::info!(model = %id, version = %model.version, "retention passed: the retired version's table is dropped")
                }
                Err(e) => {
                    tracing::warn!(model = %id, error = %e, "dropping a retired version's table failed")
                }
            }
        }
        deployment::save(&self.data_dir, &record)
    }

    /// Deploys the live deployment with `model` as the previous deployment had it (and every
    /// model that reads it following). When `folder` is the project folder, the model's `.sql`
    /// and `.toml` there are first rewritten as they were (each written aside, fsynced and
    /// renamed), so that the folder says what serves: a restart — after a crash mid-rollback
    /// too — deploys the rolled-back version, and `kappa plan` shows nothing to deploy. If the
    /// rollback stops without a cutover (a quarantine, its audit), they are put back.
    /// Returns the models that replay.
    pub async fn rollback(
        self: &Arc<Self>,
        model: &str,
        folder: Option<&std::path::Path>,
    ) -> anyhow::Result<Vec<String>> {
        let live = deployment::load(&self.data_dir)?
            .ok_or_else(|| anyhow::anyhow!("nothing is deployed"))?;
        let files = kappa_pipeline::deploy::rolled_back(&live, model)
            .map_err(|reason| anyhow::anyhow!("roll back {model}: {reason}"))?;
        let project = crate::project::check_files(&files)
            .await
            .map_err(|diagnostics| {
                let lines: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
                anyhow::anyhow!(
                    "roll back {model}: the previous version no longer checks:\n{}",
                    lines.join("\n")
                )
            })?;
        let mut undo = Vec::new();
        if let Some(folder) = folder {
            let (layer, name) = model.split_once('.').unwrap_or(("", model));
            let paths =
                ["sql", "toml"].map(|extension| format!("models/{layer}/{name}.{extension}"));
            // An edit not deployed yet would be lost: refused by name instead.
            for path in &paths {
                let on_disk = std::fs::read_to_string(folder.join(path)).ok();
                anyhow::ensure!(
                    on_disk.as_deref() == live.files.get(path).map(String::as_str),
                    "roll back {model}: {path} in {} differs from what is deployed; deploy it, \
                     or put it back, before rolling back",
                    folder.display()
                );
            }
            for path in &paths {
                undo.push(FolderFile {
                    folder: folder.to_path_buf(),
                    path: path.clone(),
                    text: live.files.get(path).cloned(),
                });
                crate::project::restore_file(folder, path, files.get(path).map(String::as_str))
                    .map_err(|e| anyhow::anyhow!("roll back {model}: {e:#}"))?;
            }
            tracing::info!(model, folder = %folder.display(), "rolled back in the project folder");
        }
        self.deploy_undoing(Arc::new(project), files, undo).await
    }
}

/// The versions the data directory records: the deployment's (live) and those of the one it
/// replaced that it no longer runs (retired, kept for a rollback).
pub fn recorded_versions(data_dir: &std::path::Path) -> Vec<VersionStatus> {
    let Ok(Some(deployed)) = deployment::load(data_dir) else {
        return Vec::new();
    };
    let mut all: Vec<VersionStatus> = deployed
        .models
        .iter()
        .map(|(model, m)| VersionStatus::new(model, &m.version, "live"))
        .collect();
    if let Some(previous) = &deployed.previous {
        // The models whose own files changed: a rollback names one of them (a model retired
        // only because a model it reads changed comes back with that one's rollback).
        let changed = |model: &str| {
            previous.models.get(model).is_some_and(|before| {
                deployed
                    .models
                    .get(model)
                    .is_some_and(|now| now.sql != before.sql || now.config != before.config)
            })
        };
        for (model, m) in &previous.models {
            if deployed
                .models
                .get(model)
                .is_none_or(|live| live.version != m.version)
            {
                let mut retired = VersionStatus::new(model, &m.version, "retired");
                let by: Vec<String> = upstream_of(previous, model)
                    .into_iter()
                    .filter(|m| changed(m))
                    .map(|m| format!("`kappa rollback {m}`"))
                    .collect();
                retired.detail = Some(match by.is_empty() {
                    true => "kept for a rollback".to_owned(),
                    false => format!("kept for {}", by.join(" or ")),
                });
                all.push(retired);
            }
        }
    }
    all.sort_by(|a, b| a.model.cmp(&b.model));
    all
}

/// `model` and the models it reads in `deployment`, directly or not, nearest first.
fn upstream_of(deployment: &Deployment, model: &str) -> Vec<String> {
    let mut found = vec![model.to_owned()];
    let mut at = 0;
    while let Some(id) = found.get(at).cloned() {
        for input in deployment.models.get(&id).map_or(&[][..], |m| &m.inputs) {
            if let kappa_pipeline::Input::Model(up) = input
                && !found.contains(up)
            {
                found.push(up.clone());
            }
        }
        at += 1;
    }
    found
}

/// Whether the runner of `model` started for the deployment `before` runs on unchanged in
/// `after`: the model is there with the same version (not among `replaying`), and it reports
/// the rejected records of the same topics (which model does can change with the others).
fn runs_on(before: &Project, after: &Project, replaying: &[String], model: &str) -> bool {
    if replaying.iter().any(|m| m == model)
        || !after.models.contains_key(model)
        || !same_checks(before, after, model)
    {
        return false;
    }
    after.topics.keys().all(|topic| {
        let reports = |p: &Project| {
            kappa_engine::runner::rejects_reporter(p, topic).as_deref() == Some(model)
        };
        reports(before) == reports(after)
    })
}

/// 1 for a version that reads topics or upstreams that are not replaying; one more per
/// replaying upstream whose table it reads, through the deepest chain of them.
fn chain_depth(project: &Project, replaying: &[String], model: &str) -> usize {
    // A model reads only models before it in `order`: the recursion ends.
    1 + project
        .reads_tables
        .get(model)
        .into_iter()
        .flatten()
        .filter(|upstream| replaying.contains(upstream))
        .map(|upstream| chain_depth(project, replaying, upstream))
        .max()
        .unwrap_or(0)
}

/// Whether `model` has the same expectations in `before` and `after` (those of severity
/// `drop` are part of its version; the others only decide what its runner checks).
fn same_checks(before: &Project, after: &Project, model: &str) -> bool {
    let checks = |p: &Project| p.models.get(model).map(|m| m.config.expectations.clone());
    checks(before) == checks(after)
}

/// Milliseconds since the epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The end of every partition of the topics each model reads, keyed as its commits record them
/// (`offset_keys`), by model.
fn topic_ends(log: &EventLog, project: &Project, models: &[String]) -> BTreeMap<String, Offsets> {
    models
        .iter()
        .map(|id| {
            let mut ends = Offsets::new();
            for (name, key) in kappa_engine::runner::offset_keys(project, id) {
                if let Ok(partitions) = log.ends(&name) {
                    ends.insert(key, partitions);
                }
            }
            (id.clone(), ends)
        })
        .collect()
}

/// The offsets the last commit of `table` records (none before its first commit).
async fn committed_offsets(lakehouse: &Lakehouse, table: &TableIdent) -> Offsets {
    match lakehouse.last_commit(table).await {
        Ok(Some(properties)) => properties
            .get(OFFSETS_PROPERTY)
            .and_then(|o| serde_json::from_str(o).ok())
            .unwrap_or_default(),
        _ => Offsets::new(),
    }
}

/// Whether `committed` reaches every offset of `ends` (an empty partition needs nothing).
fn passed(committed: &Offsets, ends: &Offsets) -> bool {
    ends.iter().all(|(topic, partitions)| {
        partitions.iter().all(|(partition, end)| {
            *end == 0
                || committed
                    .get(topic)
                    .and_then(|c| c.get(partition))
                    .is_some_and(|next| next >= end)
        })
    })
}
