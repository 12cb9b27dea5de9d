//! Alerts: what goes wrong in the pipelines, recorded (the last ones are in `kappa status` and
//! `GET /v1/alerts`) and posted to the webhooks of `kappa.toml`'s `[alerts]`, with retries.
//!
//! A monitor looks at the models every [`CHECK_INTERVAL_MS`] and raises:
//!
//! | kind | when |
//! |---|---|
//! | `expectation_failed` | a model is quarantined (a commit failed its audit) |
//! | `expectation_warning` | a commit's rows failed an expectation of severity `warn` or `drop` |
//! | `pipeline_failed` | a model's runner stopped on an error, or cannot run |
//! | `lag` | a model's lag went over `alerts.lag_records` |
//! | `dead_letters` | records were dead-lettered since the last look |

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kappa_pipeline::{AlertsSection, Webhook, WebhookFormat};
use serde::{Deserialize, Serialize};

use crate::AppState;

/// How often the monitor looks.
pub const CHECK_INTERVAL_MS: u64 = 500;
/// How many alerts are kept for `kappa status`.
pub const RECENT_MAX: usize = 50;
/// Attempts to post one alert to one webhook; between them 200 ms, 400 ms, 800 ms, …
pub const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF_MS: u64 = 200;
/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// One alert and what became of its deliveries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// RFC 3339.
    pub at: String,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub message: String,
    /// Webhooks that accepted it.
    pub delivered: u32,
    /// Webhooks that refused it on every attempt.
    pub failed: u32,
    /// Posts made, retries included.
    pub attempts: u32,
}

/// The file in the data directory that keeps the recent alerts across restarts.
pub const ALERTS_FILE: &str = "alerts.json";

/// The alerts raised and where they go.
#[derive(Debug)]
pub struct Alerts {
    recent: Mutex<VecDeque<(u64, Alert)>>,
    next_id: std::sync::atomic::AtomicU64,
    webhooks: Vec<Webhook>,
    http: reqwest::Client,
    /// Where the recent alerts are kept (`<data>/alerts.json`), so that a restart — a kill -9
    /// too — still shows what was raised before it; `None` keeps them in memory only.
    file: Option<std::path::PathBuf>,
    /// Held while writing `file`: each write takes the list as it is once it holds this, so
    /// the last write holds the newest list.
    writing: Mutex<()>,
}

impl Alerts {
    /// Alerts going to `config`'s webhooks, kept in `data_dir` when given (the alerts kept
    /// there from before are the first recent ones).
    pub fn new(config: &AlertsSection, data_dir: Option<&std::path::Path>) -> Arc<Alerts> {
        let file = data_dir.map(|d| d.join(ALERTS_FILE));
        let kept: Vec<Alert> = file
            .as_deref()
            .and_then(|f| match std::fs::read(f) {
                Ok(bytes) => Some(bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    tracing::warn!(file = %f.display(), error = %e, "the alerts kept before this start cannot be read");
                    None
                }
            })
            .and_then(|bytes| match serde_json::from_slice(&bytes) {
                Ok(kept) => Some(kept),
                Err(e) => {
                    tracing::warn!(error = %e, "the alerts kept before this start are not a list of alerts; starting without them");
                    None
                }
            })
            .unwrap_or_default();
        let next_id = kept.len() as u64;
        Arc::new(Alerts {
            recent: Mutex::new(
                kept.into_iter()
                    .enumerate()
                    .map(|(i, a)| (i as u64, a))
                    .collect(),
            ),
            next_id: std::sync::atomic::AtomicU64::new(next_id),
            webhooks: config.webhooks.clone(),
            http: reqwest::Client::new(),
            file,
            writing: Mutex::new(()),
        })
    }

    /// Writes the recent alerts to the data directory (off the async threads; a failure is
    /// logged: alerts still go to the webhooks and the status).
    fn keep(self: &Arc<Self>) {
        if self.file.is_none() {
            return;
        }
        let alerts = self.clone();
        let write = move || {
            let Ok(_writing) = alerts.writing.lock() else {
                return;
            };
            let list = alerts.recent();
            let (Some(file), Ok(bytes)) = (&alerts.file, serde_json::to_vec(&list)) else {
                return;
            };
            if let Err(e) = crate::deployment::replace_file(file, &bytes) {
                tracing::warn!(file = %file.display(), error = %e, "keeping the alerts failed");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(write)),
            Err(_) => write(),
        }
    }

    /// The last alerts, oldest first.
    pub fn recent(&self) -> Vec<Alert> {
        self.recent
            .lock()
            .map(|r| r.iter().map(|(_, a)| a.clone()).collect())
            .unwrap_or_default()
    }

    /// Records an alert and posts it to every webhook (in the background, with retries).
    pub fn raise(self: &Arc<Self>, kind: &str, model: Option<&str>, message: String) {
        let alert = Alert {
            at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            kind: kind.to_owned(),
            model: model.map(str::to_owned),
            message,
            delivered: 0,
            failed: 0,
            attempts: 0,
        };
        tracing::warn!(
            kind,
            model = model.unwrap_or(""),
            "alert: {}",
            alert.message
        );
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut recent) = self.recent.lock() {
            recent.push_back((id, alert.clone()));
            while recent.len() > RECENT_MAX {
                recent.pop_front();
            }
        }
        self.keep();
        for hook in &self.webhooks {
            let alerts = self.clone();
            let hook = hook.clone();
            let alert = alert.clone();
            tokio::spawn(async move {
                let (delivered, attempts) = alerts.post(&hook, &alert).await;
                if !delivered {
                    tracing::error!(url = %hook.url, kind = %alert.kind, attempts, "an alert webhook refused the alert on every attempt");
                }
                if let Ok(mut recent) = alerts.recent.lock()
                    && let Some((_, a)) = recent.iter_mut().find(|(i, _)| *i == id)
                {
                    a.attempts += attempts;
                    if delivered {
                        a.delivered += 1;
                    } else {
                        a.failed += 1;
                    }
                }
                alerts.keep();
            });
        }
    }

    /// Posts `alert` to `hook` until it answers 2xx, at most [`ATTEMPTS`] times with growing
    /// pauses; whether it did and how many posts it took.
    async fn post(&self, hook: &Webhook, alert: &Alert) -> (bool, u32) {
        let body = match hook.format {
            WebhookFormat::Json => serde_json::json!({
                "source": "kappa",
                "kind": alert.kind,
                "model": alert.model,
                "message": alert.message,
                "at": alert.at,
            }),
            WebhookFormat::Slack => serde_json::json!({
                "text": format!(
                    "kappa {}{}: {}",
                    alert.kind,
                    alert.model.as_ref().map(|m| format!(" ({m})")).unwrap_or_default(),
                    alert.message
                ),
            }),
        };
        let mut backoff = FIRST_BACKOFF_MS;
        for attempt in 1..=ATTEMPTS {
            let sent = self
                .http
                .post(&hook.url)
                .timeout(ATTEMPT_TIMEOUT)
                .json(&body)
                .send()
                .await;
            match sent {
                Ok(response) if response.status().is_success() => return (true, attempt),
                Ok(response) => {
                    tracing::warn!(url = %hook.url, status = %response.status(), attempt, "alert webhook refused; retrying");
                }
                Err(e) => {
                    tracing::warn!(url = %hook.url, error = %e, attempt, "alert webhook unreachable; retrying");
                }
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(Duration::from_millis(backoff)).await;
                backoff *= 2;
            }
        }
        (false, ATTEMPTS)
    }
}

/// Watches the pipelines of `state` and raises alerts until `shutdown` turns true.
pub async fn monitor(state: Arc<AppState>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let Some(deployer) = state.deployer.clone() else {
        return;
    };
    let mut last_raised: HashMap<String, (String, Option<String>)> = HashMap::new();
    let mut over_lag: HashSet<String> = HashSet::new();
    let mut dead_letters: Option<BTreeMap<(String, String), u64>> = None;
    let mut seen_commit: HashMap<String, i64> = HashMap::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(CHECK_INTERVAL_MS)) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        let project = deployer.live_project();
        let Some(project) = project else {
            continue;
        };
        let mut status = match crate::service::status(
            &state.log,
            &state.lakehouse,
            Some(&project),
            deployer.states().as_ref(),
            &state.dead_letters,
        )
        .await
        {
            Ok(status) => status,
            Err(e) => {
                tracing::debug!(error = %e, "the alert monitor could not read the status");
                continue;
            }
        };
        // Bronze tables fail and lag like models.
        status.bronze = crate::service::bronze_status(
            &state.log,
            &state.lakehouse,
            &project,
            Some(&deployer.bronze_states()),
        )
        .await;
        let config = &project.config.alerts;
        for m in status.models.iter().chain(&status.bronze) {
            let kind = match m.state.as_str() {
                "quarantined" => Some("expectation_failed"),
                "restarting" | "not running" => Some("pipeline_failed"),
                _ => None,
            };
            if let Some(kind) = kind {
                let key = (m.state.clone(), m.detail.clone());
                if last_raised.get(&m.model) != Some(&key) {
                    let message = format!(
                        "{} is {}: {}",
                        m.model,
                        m.state,
                        m.detail.as_deref().unwrap_or("no reason given")
                    );
                    state.alerts.raise(kind, Some(&m.model), message);
                    last_raised.insert(m.model.clone(), key);
                }
            }
            if let Some(limit) = config.lag_records {
                if m.lag_records > limit {
                    if over_lag.insert(m.model.clone()) {
                        state.alerts.raise(
                            "lag",
                            Some(&m.model),
                            format!(
                                "{} is {} records behind (alerts.lag_records = {limit})",
                                m.model, m.lag_records
                            ),
                        );
                    }
                } else {
                    over_lag.remove(&m.model);
                }
            }
        }
        // Dead letters since the last look, by model and topic.
        let now: BTreeMap<(String, String), u64> = status
            .dead_letters
            .iter()
            .map(|d| ((d.model.clone(), d.topic.clone()), d.count))
            .collect();
        if let Some(before) = &dead_letters {
            for d in &status.dead_letters {
                let was = before
                    .get(&(d.model.clone(), d.topic.clone()))
                    .copied()
                    .unwrap_or(0);
                if d.count > was {
                    state.alerts.raise(
                        "dead_letters",
                        Some(&d.model),
                        format!(
                            "{} new dead letters from topic {} ({} in all); the latest: {}",
                            d.count - was,
                            d.topic,
                            d.count,
                            d.last_reason
                        ),
                    );
                }
            }
        }
        dead_letters = Some(now);
        // Rows that failed an expectation that does not block: counted in their commit.
        for id in &project.order {
            let model = &project.models[id];
            let noted: Vec<&str> = model
                .config
                .expectations
                .iter()
                .filter(|e| {
                    e.check.is_row_level() && e.severity != kappa_pipeline::expect::Severity::Fail
                })
                .map(|e| e.name.as_str())
                .collect();
            if noted.is_empty() {
                continue;
            }
            let Ok(ident) = kappa_engine::runner::live_table(&state.lakehouse, &project, id) else {
                continue;
            };
            // A table without commits yet (or not created yet) has seen none: its first ones
            // count.
            let Ok(table) = state.lakehouse.load_table(&ident).await else {
                seen_commit.entry(id.clone()).or_insert(0);
                continue;
            };
            let Some(head) = kappa_lakehouse::wap::head(&table) else {
                seen_commit.entry(id.clone()).or_insert(0);
                continue;
            };
            // Every commit since the last look (by its parents), not only the newest.
            let Some(seen) = seen_commit.insert(id.clone(), head.sequence_number()) else {
                continue;
            };
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            let mut commits = 0;
            let mut at = Some(head);
            while let Some(snapshot) = at.filter(|s| s.sequence_number() > seen) {
                commits += 1;
                let these: BTreeMap<String, u64> = snapshot
                    .summary()
                    .additional_properties
                    .get(kappa_engine::runner::EXPECTATIONS_PROPERTY)
                    .and_then(|c| serde_json::from_str(c).ok())
                    .unwrap_or_default();
                for (name, n) in these {
                    *counts.entry(name).or_default() += n;
                }
                at = snapshot
                    .parent_snapshot_id()
                    .and_then(|p| table.metadata().snapshot_by_id(p));
            }
            let failed: Vec<String> = counts
                .iter()
                .filter(|(name, _)| noted.contains(&name.as_str()))
                .map(|(name, n)| format!("`{name}` on {n} rows"))
                .collect();
            if !failed.is_empty() {
                state.alerts.raise(
                    "expectation_warning",
                    Some(id),
                    format!(
                        "{id}: rows of {commits} new commit{} failed {}",
                        if commits == 1 { "" } else { "s" },
                        failed.join(", ")
                    ),
                );
            }
        }
    }
}
