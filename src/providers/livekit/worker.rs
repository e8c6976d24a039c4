//! Worker mode: the backend as a LiveKit agent worker, taking the jobs
//! LiveKit's own dispatch hands it.
//!
//! A [`Worker`] connects to the server's `/agent` WebSocket with a token it
//! mints itself (the `agent` video grant), registers
//! (`RegisterWorkerRequest`: job type, agent name, namespace, version, the
//! permissions its participants may have), and then, in binary protobuf
//! frames:
//!
//! - answers each job offer (`AvailabilityRequest`): available while the
//!   sessions it runs plus the jobs it holds (offers accepted and waiting for
//!   their assignment, assignments not yet taken) stay under the capacity
//!   its [`WorkerLoad`] reports, refused (`available: false`) when full;
//! - queues each `JobAssignment` as a [`Job`] (the room, the agent's
//!   identity, the server-minted token) for [`Worker::next_job`]; a session
//!   holds its `Job` while it runs, and dropping it tells the server the job
//!   ended (`UpdateJobStatus`);
//! - reports its load (`UpdateWorkerStatus`: available or full, the load as
//!   a fraction of capacity, the job count) when it changes, checked every
//!   [`WorkerOptions::load_check_interval`], and every
//!   [`WorkerOptions::report_interval`] regardless;
//! - answers a `JobTermination` (a queued job is dropped, a running one's
//!   [`Job::terminated`] resolves);
//! - pings (`WorkerPing`) and takes a server silent for
//!   [`WorkerOptions::ping_timeout`] as lost;
//! - reconnects with its [`RetryPolicy`] when the socket drops (or the
//!   server says it is draining the connection), registers again and tells
//!   the server which jobs it still runs (`MigrateJobRequest`);
//! - counts what it sends, reads and skips ([`WorkerCounters`]): a malformed
//!   server message is counted and skipped, never a panic.
//!
//! [`Dispatch`] is the provider's side: a worker built from the `livekit`
//! config whose jobs become sessions.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use livekit_api::access_token::{AccessToken, VideoGrants};
use livekit_protocol as proto;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{Secret, Violations, shown_in_error};
use crate::error::{BackendError, ErrorCode, Result};
use crate::runtime::{LinkCounters, RetryPolicy};

mod dispatch;
mod task;
mod wire;

pub use dispatch::{Claim, Dispatch};
use task::{connect, run};
use wire::job_status;
pub use wire::{JobInfo, ServerEvent, decode_server_message};

/// How messages name the service.
const SERVICE: &str = "the LiveKit agent endpoint";
const OP: &str = "livekit.worker";
/// How often the load is reported even when it did not change (LiveKit
/// Agents reports every 2.5 s).
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_millis(2500);
/// How often the load is checked for a change to report.
pub const DEFAULT_LOAD_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How often the worker pings the server.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(10);
/// How long the server may stay silent before the connection counts as lost.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an accepted offer waits for its assignment (the server gives up
/// after 10 s).
pub const DEFAULT_ASSIGNMENT_TIMEOUT: Duration = Duration::from_millis(7500);
/// The participant attribute naming the agent (LiveKit's `lk.agent_name`).
const AGENT_NAME_ATTRIBUTE: &str = "lk.agent_name";
/// How long the worker's own `/agent` token is valid: it is used only to
/// connect, and a fresh one is minted for every connection.
const TOKEN_TTL: Duration = Duration::from_secs(600);
/// The largest message taken from the server.
const MAX_MESSAGE: usize = 1 << 20;
/// How long stopping waits for the goodbye to be written.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Which jobs the worker takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum JobKind {
    /// One job per room (`JT_ROOM`).
    #[default]
    Room,
    /// One job per publishing participant (`JT_PUBLISHER`).
    Publisher,
}

/// Where and how a [`Worker`] registers.
#[derive(Clone)]
pub struct WorkerOptions {
    /// The LiveKit server: `wss://` / `ws://`, or `https://` / `http://` read
    /// as the same host's WebSocket. The worker connects to `<url>/agent`.
    pub url: String,
    /// The API key: the issuer of the worker's token.
    pub api_key: Secret,
    /// The API secret that signs the worker's token.
    pub api_secret: Secret,
    /// The agent name LiveKit dispatches jobs for; empty: automatic
    /// dispatch.
    pub agent_name: String,
    /// The worker's namespace, when the deployment uses them.
    pub namespace: Option<String>,
    /// Which jobs to take.
    pub kind: JobKind,
    /// The version the worker registers with.
    pub version: String,
    /// The load is reported at least this often.
    pub report_interval: Duration,
    /// The load is checked this often, and reported when it changed.
    pub load_check_interval: Duration,
    /// The worker pings the server this often.
    pub ping_interval: Duration,
    /// A server silent this long is lost: the worker reconnects.
    pub ping_timeout: Duration,
    /// How long an accepted offer holds a place while it waits for its
    /// assignment.
    pub assignment_timeout: Duration,
    /// How to reconnect after the connection drops: retries, backoff, and
    /// the longest one connect-and-register may take.
    pub retry: RetryPolicy,
}

impl fmt::Debug for WorkerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerOptions")
            .field("url", &crate::config::redact_url(&self.url))
            .field("api_key", &self.api_key)
            .field("api_secret", &self.api_secret)
            .field("agent_name", &self.agent_name)
            .field("namespace", &self.namespace)
            .field("kind", &self.kind)
            .field("report_interval", &self.report_interval)
            .field("ping_interval", &self.ping_interval)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl WorkerOptions {
    /// Options for a worker of the server at `url` with these credentials:
    /// automatic dispatch, room jobs, the default intervals, and 3 retries
    /// from 1 s, 30 s per attempt (the config's defaults).
    pub fn new(url: impl Into<String>, api_key: Secret, api_secret: Secret) -> Self {
        WorkerOptions {
            url: url.into(),
            api_key,
            api_secret,
            agent_name: String::new(),
            namespace: None,
            kind: JobKind::Room,
            version: concat!("voice-backends/", env!("CARGO_PKG_VERSION")).to_owned(),
            report_interval: DEFAULT_REPORT_INTERVAL,
            load_check_interval: DEFAULT_LOAD_CHECK_INTERVAL,
            ping_interval: DEFAULT_PING_INTERVAL,
            ping_timeout: DEFAULT_PING_TIMEOUT,
            assignment_timeout: DEFAULT_ASSIGNMENT_TIMEOUT,
            retry: RetryPolicy {
                max_retries: 3,
                retry_delay: Duration::from_secs(1),
                timeout: Duration::from_secs(30),
            },
        }
    }

    /// Checks the options.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` naming each bad option.
    pub fn check(&self) -> Result<()> {
        let mut v = Violations::new();
        if let Err(m) = agent_url(&self.url) {
            v.push("url", m);
        }
        if self.api_key.expose().trim().is_empty() {
            v.push("api_key", "must be non-empty");
        }
        if self.api_secret.is_empty() || self.api_secret.is_redaction_marker() {
            v.push("api_secret", "must be the real, non-empty secret");
        }
        for (name, d) in [
            ("report_interval", self.report_interval),
            ("load_check_interval", self.load_check_interval),
            ("ping_interval", self.ping_interval),
            ("assignment_timeout", self.assignment_timeout),
            ("retry.timeout", self.retry.timeout),
        ] {
            if d.is_zero() {
                v.push(name, "must be longer than zero");
            }
        }
        if self.ping_timeout <= self.ping_interval {
            v.push("ping_timeout", "must be longer than ping_interval");
        }
        v.into_result(OP)
    }

    /// A fresh token for `/agent`: signed with the API secret, the `agent`
    /// video grant and nothing else.
    fn token(&self) -> Result<Secret> {
        AccessToken::with_api_key(self.api_key.expose(), self.api_secret.expose())
            .with_grants(VideoGrants {
                agent: true,
                ..VideoGrants::default()
            })
            .with_ttl(TOKEN_TTL)
            .to_jwt()
            .map(Secret::new)
            .map_err(|e| {
                BackendError::invalid_config(OP, format!("the worker's token cannot be made: {e}"))
            })
    }
}

/// The WebSocket URL of the `/agent` endpoint of the server at `server`:
/// the scheme as a WebSocket's, the path with `/agent` appended, no query.
///
/// # Errors
///
/// What is wrong with `server`, without repeating it.
pub fn agent_url(server: &str) -> std::result::Result<String, String> {
    let mut url = url::Url::parse(server).map_err(|e| format!("is not a valid URL ({e})"))?;
    let scheme = match url.scheme() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        other => {
            return Err(format!(
                "scheme {:?} is not supported; use wss, ws, https or http",
                shown_in_error(other)
            ));
        }
    };
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    url.set_scheme(scheme)
        .map_err(|()| "cannot be read as a WebSocket URL".to_owned())?;
    let path = format!("{}/agent", url.path().trim_end_matches('/'));
    url.set_path(&path);
    url.set_query(None);
    url.set_fragment(None);
    Ok(url.into())
}

/// What a worker runs and can run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Sessions running now.
    pub active: usize,
    /// The most sessions the worker runs at once.
    pub capacity: usize,
}

/// Where a [`Worker`] reads its load: asked before every offer is answered
/// and at every load check, so it must be cheap and must not block. A
/// closure `Fn() -> Load` is one.
///
/// The worker counts the jobs it handed out and are still held on its own:
/// it takes the larger of [`Load::active`] and that count, so a load that
/// counts no sessions (`active: 0`) still fills up with the worker's jobs.
pub trait WorkerLoad: Send + Sync + 'static {
    /// The load now.
    fn load(&self) -> Load;
}

impl<F> WorkerLoad for F
where
    F: Fn() -> Load + Send + Sync + 'static,
{
    fn load(&self) -> Load {
        self()
    }
}

/// A job LiveKit assigned to the worker: a room to join as the agent.
///
/// Hold it while the session runs: dropping it tells the server the job
/// ended (`JS_SUCCESS`; [`Job::fail`] reports `JS_FAILED`) and frees its
/// place in the worker's load.
pub struct Job {
    /// The job's id.
    pub id: String,
    /// The id of the dispatch that made the job (may be empty).
    pub dispatch_id: String,
    /// The room to join.
    pub room: String,
    /// The agent participant's identity in the room (`agent-<job id>`).
    pub identity: String,
    /// The participant the job is for (publisher jobs), when the server
    /// named one.
    pub participant: Option<String>,
    /// The dispatch's metadata.
    pub metadata: String,
    /// The token the server minted for the agent to join the room.
    pub token: Secret,
    /// The server to join at: the assignment's URL, or the worker's server.
    pub url: String,
    lease: Lease,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("room", &self.room)
            .field("identity", &self.identity)
            .field("participant", &self.participant)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl Job {
    /// Resolves when the server terminates the job (`JobTermination`): the
    /// session should leave the room. Never resolves if it does not.
    pub async fn terminated(&self) {
        let mut rx = self.lease.terminated.clone();
        if rx.wait_for(|t| *t).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether the server terminated the job.
    pub fn is_terminated(&self) -> bool {
        *self.lease.terminated.borrow()
    }

    /// Ends the job as failed, with `error` shown on LiveKit's dashboard.
    pub fn fail(mut self, error: impl Into<String>) {
        self.lease.error = Some(error.into());
    }
}

/// A job's place in the worker's book, given back when the job is dropped.
struct Lease {
    id: String,
    shared: Weak<Shared>,
    terminated: watch::Receiver<bool>,
    error: Option<String>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.job_ended(&self.id, self.error.take());
        }
    }
}

/// Where a worker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    /// Connected and registered: offers are answered.
    Registered,
    /// The connection dropped; the worker is connecting again.
    Reconnecting,
    /// Reconnecting failed under the retry policy; the worker is done
    /// ([`Worker::failure`] says why).
    Failed,
    /// Stopped by [`Worker::stop`].
    Stopped,
}

impl WorkerState {
    /// The state's name, as health details show it.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Registered => "registered",
            WorkerState::Reconnecting => "reconnecting",
            WorkerState::Failed => "failed",
            WorkerState::Stopped => "stopped",
        }
    }
}

/// A worker's counts, for health checks ([`WorkerCounters::health`]).
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// Messages sent and read, malformed server messages skipped, and
    /// reconnections.
    pub messages: LinkCounters,
    /// Job offers accepted.
    pub offers_accepted: AtomicU64,
    /// Job offers refused (full, or stopping).
    pub offers_refused: AtomicU64,
    /// Job assignments queued.
    pub assignments: AtomicU64,
    /// Assignments for a job the worker was not waiting for (reported
    /// failed to the server).
    pub assignments_unexpected: AtomicU64,
    /// Accepted offers whose assignment did not come in time.
    pub assignments_timed_out: AtomicU64,
    /// Job terminations from the server.
    pub terminations: AtomicU64,
    /// Registrations (the first and each after a reconnect).
    pub registrations: AtomicU64,
}

impl WorkerCounters {
    /// The counts as health details, named `livekit_worker_<count>`
    /// (`livekit_worker_messages_malformed`, `..._offers_refused`, ...).
    pub fn health(&self) -> BTreeMap<String, String> {
        let mut details = self.messages.health("livekit_worker");
        for (name, n) in [
            ("offers_accepted", &self.offers_accepted),
            ("offers_refused", &self.offers_refused),
            ("assignments", &self.assignments),
            ("assignments_unexpected", &self.assignments_unexpected),
            ("assignments_timed_out", &self.assignments_timed_out),
            ("terminations", &self.terminations),
            ("registrations", &self.registrations),
        ] {
            details.insert(
                format!("livekit_worker_{name}"),
                n.load(Ordering::Relaxed).to_string(),
            );
        }
        details
    }
}

fn bump(n: &AtomicU64) {
    n.fetch_add(1, Ordering::Relaxed);
}

/// A running LiveKit agent worker: [`Worker::start`] connects and
/// registers, a task then answers the server until [`Worker::stop`]
/// (dropping the worker stops it too).
pub struct Worker {
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("state", &self.state())
            .field("worker_id", &self.worker_id())
            .finish_non_exhaustive()
    }
}

struct Shared {
    options: WorkerOptions,
    load: Arc<dyn WorkerLoad>,
    counters: Arc<WorkerCounters>,
    book: Mutex<Book>,
    /// Woken when a job is queued or the worker closes.
    jobs_ready: Notify,
    /// Woken when the book changed outside the task (a job taken or
    /// ended, a load change): the task reports and sends what waits.
    wake: Notify,
    state: watch::Sender<WorkerState>,
    worker_id: Mutex<Option<String>>,
    failure: Mutex<Option<(ErrorCode, String)>>,
    stop: watch::Sender<bool>,
}

/// The jobs the worker holds.
#[derive(Default)]
struct Book {
    /// Offers accepted, waiting for their assignment.
    pending: HashMap<String, Pending>,
    /// Assigned jobs not yet taken.
    queue: VecDeque<Job>,
    /// Jobs taken, not yet ended.
    running: HashSet<String>,
    /// Each queued or running job's termination signal.
    terminations: HashMap<String, watch::Sender<bool>>,
    /// Job status updates waiting for the connection.
    outbox: Vec<proto::WorkerMessage>,
    /// No more offers are taken, no more jobs queued.
    closed: bool,
}

struct Pending {
    identity: String,
    deadline: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn book(&self) -> MutexGuard<'_, Book> {
        lock(&self.book)
    }

    fn job_ended(&self, id: &str, error: Option<String>) {
        let mut book = self.book();
        book.running.remove(id);
        book.terminations.remove(id);
        book.outbox.push(job_status(id, error));
        drop(book);
        self.wake.notify_one();
    }

    /// What to report: available or full, the load, the job count.
    fn snapshot(&self) -> (proto::WorkerStatus, f32, u32) {
        let load = self.load.load();
        let book = self.book();
        let active = load.active.max(book.running.len());
        let held = active + book.pending.len() + book.queue.len();
        let full = book.closed || held >= load.capacity;
        let fraction = if load.capacity == 0 {
            1.0
        } else {
            (held as f32 / load.capacity as f32).min(1.0)
        };
        let status = if full {
            proto::WorkerStatus::WsFull
        } else {
            proto::WorkerStatus::WsAvailable
        };
        (status, fraction, (active + book.queue.len()) as u32)
    }

    fn set_state(&self, state: WorkerState) {
        self.state.send_if_modified(|s| {
            // Failed and Stopped are final.
            let change = *s != state && !matches!(*s, WorkerState::Failed | WorkerState::Stopped);
            if change {
                *s = state;
            }
            change
        });
    }

    /// Takes no more jobs; `drop_queued`: the queued ones are taken out (to
    /// be dropped by the caller, outside the lock).
    fn close(&self, drop_queued: bool) -> Vec<Job> {
        let mut book = self.book();
        book.closed = true;
        book.pending.clear();
        let queued = if drop_queued {
            book.queue.drain(..).collect()
        } else {
            Vec::new()
        };
        drop(book);
        self.jobs_ready.notify_waiters();
        queued
    }
}

impl Worker {
    /// Connects to the server's `/agent` endpoint and registers, once (the
    /// runtime retries a backend's connect), then starts the worker's task.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` for unusable options, `AuthenticationFailed` when the
    /// server refuses the token (HTTP 401/403), `ConnectionTimeout` when
    /// connecting and registering take longer than `retry.timeout`,
    /// `ConnectionFailed` otherwise.
    pub async fn start(options: WorkerOptions, load: Arc<dyn WorkerLoad>) -> Result<Worker> {
        options.check()?;
        let timeout = options.retry.timeout;
        let shared = Arc::new(Shared {
            options,
            load,
            counters: Arc::default(),
            book: Mutex::default(),
            jobs_ready: Notify::new(),
            wake: Notify::new(),
            state: watch::channel(WorkerState::Reconnecting).0,
            worker_id: Mutex::default(),
            failure: Mutex::default(),
            stop: watch::channel(false).0,
        });
        let ws = tokio::time::timeout(timeout, connect(&shared))
            .await
            .map_err(|_| {
                BackendError::new(
                    OP,
                    ErrorCode::ConnectionTimeout,
                    format!(
                        "registering with {SERVICE} took longer than {}",
                        humantime::format_duration(timeout)
                    ),
                )
            })??;
        let span = tracing::info_span!("livekit_worker");
        let task = tokio::spawn(tracing::Instrument::instrument(
            run(shared.clone(), ws),
            span,
        ));
        Ok(Worker {
            shared,
            task: Mutex::new(Some(task)),
        })
    }

    /// The next assigned job, once there is one; `None` once the worker
    /// stopped or failed and no job is left. Taking a job moves it from the
    /// queued to the running jobs. Cancel-safe.
    pub async fn next_job(&self) -> Option<Job> {
        loop {
            let ready = self.shared.jobs_ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            let (job, closed) = self.take();
            if job.is_some() || closed {
                return job;
            }
            ready.await;
        }
    }

    /// The next assigned job, if one is queued now.
    pub fn try_next_job(&self) -> Option<Job> {
        self.take().0
    }

    fn take(&self) -> (Option<Job>, bool) {
        let mut book = self.shared.book();
        let job = book.queue.pop_front();
        if let Some(job) = &job {
            book.running.insert(job.id.clone());
        }
        let closed = book.closed;
        drop(book);
        if job.is_some() {
            self.shared.wake.notify_one();
        }
        (job, closed)
    }

    /// Assigned jobs waiting to be taken.
    pub fn queued(&self) -> usize {
        self.shared.book().queue.len()
    }

    /// Jobs taken and not yet ended.
    pub fn running(&self) -> usize {
        self.shared.book().running.len()
    }

    /// The id the server gave the worker at its last registration.
    pub fn worker_id(&self) -> Option<String> {
        lock(&self.shared.worker_id).clone()
    }

    /// Where the worker is.
    pub fn state(&self) -> WorkerState {
        *self.shared.state.borrow()
    }

    /// The worker's state as it changes.
    pub fn watch_state(&self) -> watch::Receiver<WorkerState> {
        self.shared.state.subscribe()
    }

    /// Why the worker failed, once it did ([`WorkerState::Failed`]).
    pub fn failure(&self) -> Option<BackendError> {
        lock(&self.shared.failure)
            .as_ref()
            .map(|(code, message)| BackendError::new(OP, *code, message.clone()))
    }

    /// The worker's counters.
    pub fn counters(&self) -> &Arc<WorkerCounters> {
        &self.shared.counters
    }

    /// Tells the worker its load changed (a session ended), so it reports
    /// at once rather than at the next load check.
    pub fn load_changed(&self) {
        self.shared.wake.notify_one();
    }

    /// Health details: the state, the worker id, the queued and running
    /// jobs, and [`WorkerCounters::health`].
    pub fn health(&self) -> BTreeMap<String, String> {
        let mut details = self.shared.counters.health();
        details.insert(
            "livekit_worker_state".into(),
            self.state().as_str().to_owned(),
        );
        if let Some(id) = self.worker_id() {
            details.insert("livekit_worker_id".into(), id);
        }
        details.insert(
            "livekit_worker_jobs_queued".into(),
            self.queued().to_string(),
        );
        details.insert(
            "livekit_worker_jobs_running".into(),
            self.running().to_string(),
        );
        details
    }

    /// Stops the worker: reports it full, reports the jobs still queued as
    /// failed, closes the connection. Running jobs are left to their
    /// sessions; [`Worker::next_job`] returns `None` from now on.
    pub async fn stop(&self) {
        self.shared.stop.send_replace(true);
        let task = lock(&self.task).take();
        if let Some(mut task) = task
            && tokio::time::timeout(STOP_WAIT, &mut task).await.is_err()
        {
            task.abort();
        }
        drop(self.shared.close(true));
        self.shared.set_state(WorkerState::Stopped);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
    }
}
