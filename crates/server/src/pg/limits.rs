//! The bounds of each connection and query: statement timeout, cancel, memory, rows sent
//! ahead.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use datafusion_postgres::DfSessionService;
use datafusion_postgres::pgwire::api::ClientInfo;
use datafusion_postgres::pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use datafusion_postgres::pgwire::api::results::Response;
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::cancel::CancelRequest;
use datafusion_postgres::pgwire::messages::data::DataRow;
use datafusion_postgres::pgwire::messages::startup::SecretKey;
use futures::StreamExt as _;

use super::catalog::LiveCatalog;
use crate::config::QueryLimits;

/// The queries running now, by connection (the backend pid a client is given at startup), so
/// that a cancel request stops one wherever it is: planning, or streaming its rows.
#[derive(Default)]
pub(super) struct Running {
    /// By (pid, secret), as pgwire's `ConnectionManager` keys them.
    pub(super) by_key: std::sync::Mutex<std::collections::HashMap<(i32, bytes::Bytes), CancelCell>>,
}

/// Counts the cancel requests a connection got; a query stops when the count moves past the
/// one its start saw. Held by the connection (its session extensions), so it goes with it.
pub(super) type CancelCell = std::sync::Weak<tokio::sync::watch::Sender<u64>>;

impl Running {
    /// The cancel counter of `client`'s connection, registered on first use.
    pub(super) fn cell<C: ClientInfo>(&self, client: &C) -> Arc<tokio::sync::watch::Sender<u64>> {
        let cell = client
            .session_extensions()
            .get_or_insert_with(|| tokio::sync::watch::Sender::new(0u64));
        let (pid, secret) = client.pid_and_secret_key();
        if let Ok(mut by_key) = self.by_key.lock() {
            by_key.retain(|_, weak| weak.strong_count() > 0);
            by_key
                .entry((pid, secret.to_bytes()))
                .or_insert_with(|| Arc::downgrade(&cell));
        }
        cell
    }

    /// Stops what the connection `pid` with `secret` runs.
    pub(super) fn cancel(&self, pid: i32, secret: &SecretKey) {
        // As bytes: the same 4 bytes may arrive as another variant on the cancel's own
        // connection.
        let cell = self
            .by_key
            .lock()
            .ok()
            .and_then(|by_key| by_key.get(&(pid, secret.to_bytes()))?.upgrade());
        if let Some(cell) = cell {
            cell.send_modify(|n| *n += 1);
        }
    }
}

/// Honours a cancel request (psql's Ctrl+C, a driver's `cancel()`): pgwire's own (which stops
/// a query being planned) and [`Running`] (which stops one streaming its rows).
pub(super) struct Canceller {
    pub(super) connections: DefaultCancelHandler,
    pub(super) running: Arc<Running>,
}

#[async_trait::async_trait]
impl CancelHandler for Canceller {
    async fn on_cancel_request(&self, request: CancelRequest) {
        self.running.cancel(request.pid, &request.secret_key);
        self.connections.on_cancel_request(request).await;
    }
}

/// DataFusion's session service with every query bounded: its time (`limits.timeout`, or the
/// session's `statement_timeout` if shorter), cancel requests, and — through the connection's
/// memory pool — its memory. Each bound stops the query with an error naming it.
pub(super) struct Limited {
    pub(super) inner: DfSessionService,
    /// The session `inner` runs in: a simple query is planned again here for the types of
    /// its result's columns.
    pub(super) ctx: Arc<datafusion::prelude::SessionContext>,
    /// The connection's catalog, and the endpoint's it is pinned to as each query starts.
    pub(super) pinned: Arc<LiveCatalog>,
    pub(super) live: Arc<LiveCatalog>,
    pub(super) limits: QueryLimits,
    pub(super) running: Arc<Running>,
    pub(super) metrics: Arc<crate::metrics::PgMetrics>,
}

/// The session setting datafusion-postgres keeps `SET statement_timeout` in (milliseconds).
pub(super) const STATEMENT_TIMEOUT_KEY: &str = "statement_timeout_ms";

impl Limited {
    /// Starts bounding a query of `client`.
    pub(super) fn start<C: ClientInfo>(&self, client: &C) -> Bounds {
        let session = client
            .metadata()
            .get(STATEMENT_TIMEOUT_KEY)
            .and_then(|ms| ms.parse::<u64>().ok())
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis);
        let (timeout, by_session) = match session {
            Some(t) if t < self.limits.timeout => (t, true),
            _ => (self.limits.timeout, false),
        };
        self.pinned.pin(&self.live);
        let cell = self.running.cell(client);
        let at_start = *cell.borrow();
        self.metrics.queries.fetch_add(1, Ordering::Relaxed);
        Bounds {
            deadline: tokio::time::Instant::now() + timeout,
            timeout,
            by_session,
            cell,
            at_start,
            timer: Arc::new(QueryTimer {
                started: std::time::Instant::now(),
                metrics: self.metrics.clone(),
            }),
        }
    }
}

/// The bounds of one running query (one query string: all its statements).
#[derive(Clone)]
pub(super) struct Bounds {
    pub(super) deadline: tokio::time::Instant,
    pub(super) timeout: Duration,
    /// Whether the deadline is the session's `statement_timeout` (not the server's limit).
    pub(super) by_session: bool,
    /// The connection's cancel counter, and its value when the query started.
    pub(super) cell: Arc<tokio::sync::watch::Sender<u64>>,
    pub(super) at_start: u64,
    /// Records the latency once the last of the query's row streams is done.
    pub(super) timer: Arc<QueryTimer>,
}

/// Observes a query's latency when dropped (with the last of its row streams).
pub(super) struct QueryTimer {
    pub(super) started: std::time::Instant,
    pub(super) metrics: Arc<crate::metrics::PgMetrics>,
}

impl Drop for QueryTimer {
    fn drop(&mut self) {
        self.metrics.seconds.observe(self.started.elapsed());
    }
}

pub(super) type Stop = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl Bounds {
    /// Resolves when a cancel request for the connection comes after the query started.
    pub(super) fn cancelled(&self) -> Stop {
        let mut seen = self.cell.subscribe();
        let at_start = self.at_start;
        Box::pin(async move {
            if seen.wait_for(|n| *n > at_start).await.is_err() {
                // The connection is gone: nobody can cancel any more.
                std::future::pending::<()>().await;
            }
        })
    }

    /// Runs `planning` within the bounds.
    pub(super) async fn plan<T>(
        &self,
        planning: impl std::future::Future<Output = PgWireResult<T>>,
    ) -> PgWireResult<T> {
        let outcome = tokio::select! {
            planned = planning => planned,
            () = tokio::time::sleep_until(self.deadline) => Err(self.timed_out()),
            () = self.cancelled() => Err(cancelled()),
        };
        if outcome.is_err() {
            self.timer.metrics.errors.fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    pub(super) fn timed_out(&self) -> PgWireError {
        let limit = humantime::format_duration(self.timeout);
        let why = if self.by_session {
            format!("the session's statement_timeout ({limit})")
        } else {
            format!("the server's per-query limit ({limit}, [server] query_timeout in kappa.toml)")
        };
        PgWireError::UserError(Box::new(ErrorInfo::new(
            "ERROR".into(),
            "57014".into(),
            format!(
                "canceling statement due to statement timeout: the query ran longer than {why}"
            ),
        )))
    }

    /// Bounds the rows of `response` too (they are computed as they are sent). They are
    /// computed by a task of their own: one poll of DataFusion's stream can compute for
    /// seconds, and the deadline and cancel requests must be answered meanwhile.
    pub(super) fn stream(&self, response: Response) -> Response {
        match response {
            Response::Query(mut query) => {
                let rows =
                    std::mem::replace(&mut query.data_rows, Box::pin(futures::stream::empty()));
                query.data_rows = Box::pin(BoundedRows {
                    deadline: Box::pin(tokio::time::sleep_until(self.deadline)),
                    cancelled: self.cancelled(),
                    source: Some(rows),
                    rows: None,
                    pump: None,
                    done: false,
                    bounds: self.clone(),
                });
                Response::Query(query)
            }
            other => other,
        }
    }
}

/// Computes `rows` into `tx`, then `None` to say they are all there (a channel closed without
/// it means the computation failed).
pub(super) async fn pump(
    mut rows: datafusion_postgres::pgwire::api::results::SendableRowStream,
    tx: tokio::sync::mpsc::Sender<Option<PgWireResult<DataRow>>>,
) {
    while let Some(row) = rows.next().await {
        if tx.send(Some(row)).await.is_err() {
            return;
        }
    }
    let _ = tx.send(None).await;
}

pub(super) fn cancelled() -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        "57014".into(),
        "canceling statement due to user request".into(),
    )))
}

/// Rows computed ahead of the client.
pub(super) const ROWS_AHEAD: usize = 256;

/// A query's rows, ended by an error when its deadline passes or a cancel request comes; the
/// task computing them starts when they are first asked for (the statements of one query
/// string run one after the other) and is stopped when they stop or are dropped.
pub(super) struct BoundedRows {
    pub(super) source: Option<datafusion_postgres::pgwire::api::results::SendableRowStream>,
    pub(super) rows: Option<tokio::sync::mpsc::Receiver<Option<PgWireResult<DataRow>>>>,
    pub(super) pump: Option<tokio::task::AbortHandle>,
    pub(super) deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    pub(super) cancelled: Stop,
    pub(super) bounds: Bounds,
    pub(super) done: bool,
}

impl futures::Stream for BoundedRows {
    type Item = PgWireResult<DataRow>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let stopped = if this.cancelled.as_mut().poll(cx).is_ready() {
            Some(cancelled())
        } else if this.deadline.as_mut().poll(cx).is_ready() {
            Some(this.bounds.timed_out())
        } else {
            None
        };
        let next = match stopped {
            Some(error) => Poll::Ready(Some(Err(error))),
            None => {
                if let Some(source) = this.source.take() {
                    let (tx, rx) = tokio::sync::mpsc::channel(ROWS_AHEAD);
                    this.pump = Some(tokio::spawn(pump(source, tx)).abort_handle());
                    this.rows = Some(rx);
                }
                match this.rows.as_mut().map(|rows| rows.poll_recv(cx)) {
                    Some(Poll::Ready(Some(Some(row)))) => Poll::Ready(Some(row)),
                    Some(Poll::Ready(Some(None))) => Poll::Ready(None),
                    Some(Poll::Ready(None)) | None => {
                        Poll::Ready(Some(Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                            "ERROR".into(),
                            "XX000".into(),
                            "the query's computation ended before its last row (see the server's \
                             log)"
                                .into(),
                        ))))))
                    }
                    Some(Poll::Pending) => Poll::Pending,
                }
            }
        };
        match &next {
            Poll::Ready(Some(Err(_))) => {
                this.stop();
                this.bounds
                    .timer
                    .metrics
                    .errors
                    .fetch_add(1, Ordering::Relaxed);
            }
            Poll::Ready(None) => this.stop(),
            _ => {}
        }
        next
    }
}

impl BoundedRows {
    /// No more rows: the computation stops, its memory is given back.
    pub(super) fn stop(&mut self) {
        self.done = true;
        if let Some(pump) = self.pump.take() {
            pump.abort();
        }
        self.rows = None;
        self.source = None;
    }
}

impl Drop for BoundedRows {
    fn drop(&mut self) {
        self.stop();
    }
}
