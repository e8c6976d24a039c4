//! The shared runtime: the one [`VoiceBackend`] implementation every provider
//! reuses.
//!
//! A provider contributes a [`Connector`] (how to reach its service); the
//! [`RuntimeBackend`] around it owns everything else once, for every provider:
//! the session table with unique ids and strict isolation, capacity, the auth
//! hook, rate limiting (the provider's own or the framework's fallback),
//! health checks, the connection state machine,
//! connection retries with exponential backoff, timeouts, graceful stop,
//! validated config updates, tracing spans and metrics, and persistence of
//! the active sessions in a [`SessionStore`] (see
//! [`PersistenceStatus`](crate::session::PersistenceStatus)).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::backend::{ConnectionState, Health, HealthStatus, VoiceBackend};
use crate::config::{Config, PipelineType, Secret, SessionConfig};
use crate::error::{BackendError, ErrorCode, Result};
use crate::hooks::{Hooks, Operation, Principal, RateLimiter, TokenBucketLimiter};
use crate::metrics::{Metrics, Op};
use crate::pipeline::engine::{Engine, EngineParts, PreparedConverters};
use crate::pipeline::link::Remote;
use crate::pipeline::{ComponentRegistries, Plan, components};
use crate::provider::HostedStages;
use crate::provider::ProviderCapabilities;
use crate::session::store::{SessionRecord, SessionStore};
use crate::session::{SessionId, SessionInfo, VoiceSession};

#[cfg(feature = "callbacks")]
pub mod callbacks;
mod connector;
mod link;
mod media;
mod persist;
mod provider;
mod restore;
mod session;
pub use connector::Connector;
#[cfg(feature = "link-websocket")]
pub use link::{
    Dial, ENDPOINT_INFO_KEY, ENDPOINT_STAGE, Endpoints, Fallbacks, LinkCounters, LinkSettings,
    WebSocketLink, WireEvent, WireProtocol, WsMessage, WsStream, endpoint_of,
};
pub use link::{
    Handed, Link, LinkEvent, LinkEvents, LinkInput, LinkRequest, MAX_RETRY_DELAY, MediaLink,
    RetryPolicy, ServiceLink,
};
pub use provider::{Provider, Registered};
pub use session::RuntimeSession;

/// The VAD used when the config names none.
pub const DEFAULT_VAD: &str = crate::config::DEFAULT_VAD_PROVIDER;
/// The turn detector used when the config names none.
pub const DEFAULT_TURN_DETECTOR: &str = crate::config::DEFAULT_TURN_DETECTION_PROVIDER;
/// Capacity of the channels between a session's components and its task.
const COMPONENT_CHANNEL: usize = 256;

/// The runtime's [`VoiceBackend`]: a [`Connector`] plus everything shared.
pub struct RuntimeBackend {
    inner: Arc<Inner>,
}

struct Inner {
    provider: String,
    caps: ProviderCapabilities,
    connector: Arc<dyn Connector>,
    components: &'static ComponentRegistries,
    config: RwLock<Arc<Config>>,
    hooks: RwLock<Hooks>,
    fallback_limiter: RwLock<Arc<TokenBucketLimiter>>,
    sessions: RwLock<HashMap<SessionId, Arc<RuntimeSession>>>,
    /// Sessions counted against capacity (reserved before they are built).
    open: AtomicUsize,
    state: AtomicU8,
    accepting: AtomicBool,
    /// Bumped by every `stop`; a `start` that a `stop` overtook (the number
    /// changed while it connected) does not publish its connection. Held
    /// while `start` publishes and while `stop` bumps it.
    lifecycle: std::sync::Mutex<u64>,
    metrics: Arc<Metrics>,
    /// Where active sessions are kept, once a store is set.
    persistence: arc_swap::ArcSwapOption<persist::Persistence>,
    /// Sessions ending now keep their records (the backend is stopping).
    keep_records: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The writer task ends (and lets go of the store) at once.
        if let Some(p) = self.persistence.load_full() {
            p.wake();
        }
    }
}

impl fmt::Debug for RuntimeBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeBackend")
            .field("provider", &self.inner.provider)
            .field("state", &self.connection_state())
            .field("sessions", &self.active_session_count())
            .finish_non_exhaustive()
    }
}

fn conn_from(v: u8) -> ConnectionState {
    match v {
        1 => ConnectionState::Connecting,
        2 => ConnectionState::Connected,
        3 => ConnectionState::Reconnecting,
        4 => ConnectionState::Error,
        _ => ConnectionState::Disconnected,
    }
}

fn conn_code(s: ConnectionState) -> u8 {
    match s {
        ConnectionState::Disconnected => 0,
        ConnectionState::Connecting => 1,
        ConnectionState::Connected => 2,
        ConnectionState::Reconnecting => 3,
        ConnectionState::Error => 4,
    }
}

/// A process-unique session id: a time-seeded prefix and a counter.
fn next_session_id() -> SessionId {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()) << 32
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    SessionId::new(format!("sess_{:08x}{:08x}", (seed >> 16) as u32, n))
}

impl RuntimeBackend {
    /// A backend around `connector`, checking `config` first: the generic rules,
    /// the connector's own, and that every component it names is registered.
    pub fn new(connector: Arc<dyn Connector>, config: &Config) -> Result<Self> {
        Self::with_components(connector, config, components())
    }

    /// Like [`RuntimeBackend::new`], resolving components in `registries`.
    pub fn with_components(
        connector: Arc<dyn Connector>,
        config: &Config,
        registries: &'static ComponentRegistries,
    ) -> Result<Self> {
        const OP: &str = "backend.new";
        config
            .validate_for(connector.hosted_stages())
            .map_err(|e| e.with_op(OP))?;
        connector
            .validate_config(config)
            .map_err(|e| e.with_op(OP))?;
        check_components(registries, config, connector.hosted_stages())
            .map_err(|e| e.with_op(OP))?;
        let provider = connector.provider().to_owned();
        let limiter = fallback_limiter(config)?;
        Ok(RuntimeBackend {
            inner: Arc::new(Inner {
                metrics: Arc::new(Metrics::new(&provider)),
                provider,
                caps: connector.capabilities(),
                connector,
                components: registries,
                config: RwLock::new(Arc::new(config.clone())),
                hooks: RwLock::new(Hooks::default()),
                fallback_limiter: RwLock::new(Arc::new(limiter)),
                sessions: RwLock::new(HashMap::new()),
                open: AtomicUsize::new(0),
                state: AtomicU8::new(conn_code(ConnectionState::Disconnected)),
                accepting: AtomicBool::new(false),
                lifecycle: std::sync::Mutex::new(0),
                persistence: arc_swap::ArcSwapOption::empty(),
                keep_records: AtomicBool::new(false),
            }),
        })
    }

    /// The most sessions this backend opens at once: the config's limit, and
    /// the provider's if it has one.
    pub fn capacity(&self) -> usize {
        self.inner.capacity()
    }
}

/// A hook's error as the operation reports it: `refusal` (the hook said no),
/// unless the hook itself could not answer (its service timed out or is
/// unreachable, or the call was cancelled), which keeps its code so the
/// caller can tell a refusal from an outage and retry the latter.
fn hook_error(mut e: BackendError, refusal: ErrorCode) -> BackendError {
    let outage = matches!(
        e.code,
        ErrorCode::ConnectionFailed
            | ErrorCode::ConnectionTimeout
            | ErrorCode::Timeout
            | ErrorCode::ContextCanceled
    );
    if !outage {
        e.code = refusal;
    }
    e
}

fn fallback_limiter(config: &Config) -> Result<TokenBucketLimiter> {
    TokenBucketLimiter::new(config.rate_limit_per_second, config.rate_limit_burst)
}

/// Checks that every component the config names is registered, and that the
/// ones whose options can be checked without side effects accept them, so a
/// backend whose every session would fail is not made: the config's
/// [`Plan::check`], as `voice-backends validate` runs it.
fn check_components(
    reg: &ComponentRegistries,
    config: &Config,
    hosted: HostedStages,
) -> Result<()> {
    Plan::check(config, hosted, reg)
        .map(drop)
        .map_err(|e| e.into_error("backend.new"))
}

impl Inner {
    fn state(&self) -> ConnectionState {
        conn_from(self.state.load(Ordering::Acquire))
    }

    fn lifecycle(&self) -> std::sync::MutexGuard<'_, u64> {
        self.lifecycle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn set_state(&self, s: ConnectionState) {
        let before = conn_from(self.state.swap(conn_code(s), Ordering::AcqRel));
        if before != s {
            tracing::info!(provider = %self.provider, from = %before, to = %s, "connection state");
        }
    }

    fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn capacity(&self) -> usize {
        let cfg = self.config().max_concurrent_sessions as usize;
        match self.caps.max_concurrent_sessions {
            0 => cfg,
            p => cfg.min(p as usize),
        }
    }

    fn hooks(&self) -> Hooks {
        self.hooks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every open session, as of now.
    fn sessions_snapshot(&self) -> Vec<Arc<RuntimeSession>> {
        self.sessions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    fn remove_session(&self, id: &SessionId) -> Option<Arc<RuntimeSession>> {
        let removed = self
            .sessions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        if let Some(session) = &removed {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.metrics.session_closed();
            if let Some(p) = self.persistence.load_full() {
                let keep = self.keep_records.load(Ordering::Acquire)
                    || session.keep_record.load(Ordering::Acquire);
                p.ended(session, keep);
            }
        }
        removed
    }

    fn session_not_found(op: &'static str, id: &SessionId) -> BackendError {
        BackendError::new(
            op,
            ErrorCode::SessionNotFound,
            format!("no session {id} on this backend (closed, or never opened here)"),
        )
    }

    async fn authorize(&self, config: &SessionConfig, op: Operation) -> Result<Option<Principal>> {
        let Some(auth) = self.hooks().auth else {
            return Ok(None);
        };
        let principal = auth
            .authenticate(config.auth_token.as_ref())
            .await
            .map_err(|e| hook_error(e, ErrorCode::AuthenticationFailed))?;
        auth.authorize(&principal, op)
            .await
            .map_err(|e| hook_error(e, ErrorCode::AuthorizationFailed))?;
        Ok(Some(principal))
    }

    async fn rate_limit(&self, key: &str) -> Result<()> {
        let limiter: Arc<dyn RateLimiter> = match self.hooks().rate_limiter {
            Some(l) => l,
            None if self.caps.custom_rate_limiting => return Ok(()),
            None => self
                .fallback_limiter
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        };
        limiter
            .check(key)
            .await
            .map_err(|e| hook_error(e, ErrorCode::RateLimitExceeded))
    }

    async fn build_session(
        self: &Arc<Self>,
        config: SessionConfig,
        restore: Option<&SessionRecord>,
    ) -> Result<Arc<RuntimeSession>> {
        const OP: &str = "backend.create_session";
        let base = self.config();
        let hosted = self.connector.hosted_stages();
        let plan = Plan::for_session(&base, &config, hosted, self.components)
            .map_err(|e| e.with_op(OP))?;
        let id = restore.map_or_else(next_session_id, |r| r.id.clone());
        // A restored session's provider starts from what it had published,
        // and is told so to re-attach.
        let (info, restored) = match restore {
            Some(r) => (r.session_info(), Some(r.session_info())),
            None => (SessionInfo::default(), None),
        };
        let persist = self.session_persist(&id, &config, restore).await?;
        let link = RetryPolicy::from_config(&base)
            .run(
                OP,
                &self.provider,
                || {
                    self.connector.open_link(
                        LinkRequest::new(id.as_str(), &base, &config, &self.metrics, &info)
                            .with_restored(restored.as_ref()),
                    )
                },
                |attempt, delay, e| {
                    tracing::warn!(attempt, code = %e.code, "opening the session's link failed, retrying in {delay:?}: {}", e.message);
                },
            )
            .await?;
        let vad = plan.make_vad()?;
        let turn = plan.make_turn_detector()?;
        let processors = plan.make_processors()?;
        let (link, media) = match link {
            Some(Link::Service(link)) => (Some(link), None),
            Some(Link::Media(media)) => (None, Some(media)),
            None => (None, None),
        };
        let (stt, remote, tts) = match (link, plan.pipeline_type) {
            (Some(link), _) => {
                let tts = link.speaker.or_else(|| plan.tts());
                let remote = Remote::Link {
                    input: link.input,
                    events: link.events,
                    hosts_stt: hosted.stt,
                    turns: self.caps.turns,
                };
                (None, Some(remote), tts)
            }
            (None, PipelineType::SttTts) => {
                let (tx, rx) = mpsc::channel(COMPONENT_CHANNEL);
                let stream = plan.open_stt(tx)?;
                (Some((stream, rx)), None, Some(plan.require_tts()?))
            }
            (None, PipelineType::S2s) => {
                let (tx, rx) = mpsc::channel(COMPONENT_CHANNEL);
                let stream = plan.open_s2s(tx)?;
                (None, Some(Remote::Model(stream, rx)), plan.tts())
            }
        };
        let (input_format, output_format) = (config.input_format, config.output_format);
        let converters = if PreparedConverters::costly(input_format, output_format) {
            tokio::task::spawn_blocking(move || {
                PreparedConverters::for_formats(input_format, output_format)
            })
            .await
            .unwrap_or_default()
        } else {
            PreparedConverters::for_formats(input_format, output_format)
        };
        let engine = Engine::new(EngineParts {
            session_id: id.to_string(),
            user_id: config.user_id.clone(),
            input_format: config.input_format,
            output_format: config.output_format,
            processors,
            vad,
            turn,
            stt,
            remote,
            tts,
            agent: config.agent.clone(),
            metrics: self.metrics.clone(),
            agent_timeout: base.timeout,
            retention: self.hooks().retention,
            media: media.is_some(),
            converters,
            interruption: plan.interruption.clone(),
            preemptive: plan.preemptive.clone(),
        })
        .map_err(|e| e.with_op(OP))?;
        plan.report_to(engine.event_sender(), self.metrics.clone());
        let history = persist.as_ref().and_then(|_| engine.watch_history());
        if let Some(r) = restore {
            engine.restore_history(r.messages());
        }
        let session = Arc::new(RuntimeSession {
            id,
            user_id: config.user_id,
            engine,
            backend: Arc::downgrade(self),
            metadata: RwLock::new(config.metadata),
            timeout: base.timeout,
            frames: AtomicU64::new(0),
            info,
            media: media.is_some(),
            persist,
            keep_record: AtomicBool::new(false),
        });
        if let (Some(mut history), Some(p)) = (history, self.persistence.load_full()) {
            // Each turn that joins the conversation is written, off the
            // session's task; ends with the session's task.
            let weak = Arc::downgrade(&session);
            tokio::spawn(async move {
                while history.changed().await.is_ok() {
                    let messages = history.borrow_and_update().clone();
                    let Some(session) = weak.upgrade() else {
                        return;
                    };
                    if let Some(sp) = &session.persist {
                        *sp.history.lock().unwrap_or_else(PoisonError::into_inner) = messages;
                    }
                    p.save(&session);
                }
            });
        }
        if let Some(media) = media {
            media::carry(&session, media)?;
        }
        Ok(session)
    }
}

#[async_trait]
impl VoiceBackend for RuntimeBackend {
    fn provider(&self) -> &str {
        &self.inner.provider
    }

    fn set_hooks(&self, hooks: Hooks) {
        *self
            .inner
            .hooks
            .write()
            .unwrap_or_else(PoisonError::into_inner) = hooks;
    }

    fn set_session_store(&self, store: Arc<dyn SessionStore>) {
        match persist::Persistence::new(store) {
            Ok(p) => self.inner.persistence.store(Some(Arc::new(p))),
            Err(e) => {
                tracing::error!(code = %e.code, "the session store is not used: {}", e.message)
            }
        }
    }

    #[tracing::instrument(name = "backend.resume_session", skip_all, fields(provider = %self.inner.provider, session_id = %id))]
    async fn resume_session(
        &self,
        id: &SessionId,
        token: &Secret,
    ) -> Result<Arc<dyn VoiceSession>> {
        let session = self.inner.resume(id, token).await?;
        Ok(session as Arc<dyn VoiceSession>)
    }

    #[tracing::instrument(name = "backend.start", skip_all, fields(provider = %self.inner.provider))]
    async fn start(&self) -> Result<()> {
        const OP: &str = "backend.start";
        let timer = self.inner.metrics.observe(Op::Start);
        let generation = *self.inner.lifecycle();
        let mut result = self.connect_with_retries(OP).await;
        {
            let lifecycle = self.inner.lifecycle();
            if *lifecycle != generation {
                // A `stop` came while connecting and has disconnected: this
                // start is over, and publishes nothing.
                result = Err(BackendError::new(
                    OP,
                    ErrorCode::ContextCanceled,
                    "the backend was stopped while it started",
                ));
            } else {
                // A failed (re)start accepts no new sessions.
                self.inner
                    .accepting
                    .store(result.is_ok(), Ordering::Release);
                self.inner.keep_records.store(false, Ordering::Release);
                self.inner.set_state(if result.is_ok() {
                    ConnectionState::Connected
                } else {
                    ConnectionState::Error
                });
            }
        }
        if result.is_ok()
            && let Some(p) = self.inner.persistence.load_full()
        {
            // The sessions kept before a restart come back; a store that
            // cannot be read now is retried by the writer task, and the
            // backend serves meanwhile (degraded).
            if let Err(e) = self.inner.restore(self.inner.config().timeout).await {
                tracing::warn!(code = %e.code, "restoring the kept sessions failed, retrying: {}", e.message);
                p.set_failing(Some(e.message.clone()));
                p.restore_due.store(true, Ordering::Release);
            }
            p.spawn_writer(Arc::downgrade(&self.inner));
        }
        timer.finish(&result);
        result
    }

    #[tracing::instrument(name = "backend.stop", skip_all, fields(provider = %self.inner.provider))]
    async fn stop(&self) -> Result<()> {
        let timer = self.inner.metrics.observe(Op::Stop);
        {
            let mut lifecycle = self.inner.lifecycle();
            *lifecycle += 1;
            self.inner.accepting.store(false, Ordering::Release);
            // The sessions stopped with the backend stay in the store.
            self.inner.keep_records.store(true, Ordering::Release);
        }
        let sessions = self.inner.sessions_snapshot();
        let mut set = tokio::task::JoinSet::new();
        for s in sessions {
            set.spawn(async move { s.stop().await });
        }
        let mut result = Ok(());
        while let Some(r) = set.join_next().await {
            if let Ok(Err(e)) = r {
                result = Err(e.with_op("backend.stop"));
            }
        }
        if let Some(p) = self.inner.persistence.load_full() {
            // What the sessions last changed is written, and their leases
            // let go of, before the backend says it has stopped.
            // A store that is away holds the stop up for at most 5 s.
            p.flush(
                self.inner
                    .config()
                    .timeout
                    .min(std::time::Duration::from_secs(5)),
            )
            .await;
        }
        self.inner.connector.disconnect().await;
        self.inner.set_state(ConnectionState::Disconnected);
        timer.finish(&result);
        result
    }

    #[tracing::instrument(name = "backend.create_session", skip_all, fields(provider = %self.inner.provider, user_id = %config.user_id))]
    async fn create_session(&self, config: SessionConfig) -> Result<Arc<dyn VoiceSession>> {
        const OP: &str = "backend.create_session";
        let timer = self.inner.metrics.observe(Op::CreateSession);
        let result = self
            .create_session_inner(config)
            .await
            .map_err(|e| e.with_op(OP));
        timer.finish(&result);
        result.map(|s| s as Arc<dyn VoiceSession>)
    }

    #[tracing::instrument(name = "backend.get_session", skip_all, fields(provider = %self.inner.provider, session_id = %id))]
    async fn get_session(&self, id: &SessionId) -> Result<Arc<dyn VoiceSession>> {
        let timer = self.inner.metrics.observe(Op::GetSession);
        let result = self
            .inner
            .sessions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
            .ok_or_else(|| Inner::session_not_found("backend.get_session", id));
        timer.finish(&result);
        result.map(|s| s as Arc<dyn VoiceSession>)
    }

    #[tracing::instrument(name = "backend.list_sessions", skip_all, fields(provider = %self.inner.provider))]
    async fn list_sessions(&self) -> Vec<Arc<dyn VoiceSession>> {
        let mut list = self.inner.sessions_snapshot();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list.into_iter()
            .map(|s| s as Arc<dyn VoiceSession>)
            .collect()
    }

    #[tracing::instrument(name = "backend.close_session", skip_all, fields(provider = %self.inner.provider, session_id = %id))]
    async fn close_session(&self, id: &SessionId) -> Result<()> {
        let timer = self.inner.metrics.observe(Op::CloseSession);
        let session = self
            .inner
            .sessions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned();
        let result = match session {
            Some(s) => s.stop().await,
            None => Err(Inner::session_not_found("backend.close_session", id)),
        };
        timer.finish(&result);
        result
    }

    #[tracing::instrument(name = "backend.health_check", skip_all, fields(provider = %self.inner.provider))]
    async fn health_check(&self) -> HealthStatus {
        let timer = self.inner.metrics.observe(Op::HealthCheck);
        let state = self.inner.state();
        let open = self.active_session_count();
        let cap = self.inner.capacity();
        let mut status = match state {
            ConnectionState::Connected => Health::Healthy,
            ConnectionState::Reconnecting | ConnectionState::Connecting => Health::Degraded,
            ConnectionState::Disconnected | ConnectionState::Error => Health::Unhealthy,
        };
        if status == Health::Healthy && open * 10 >= cap * 9 {
            status = Health::Degraded;
        }
        let store = self
            .inner
            .persistence
            .load_full()
            .map(|p| match p.failing() {
                Some(reason) => (
                    true,
                    format!("{}: failing, retrying: {reason}", p.store.kind()),
                ),
                None => (false, format!("{}: ok", p.store.kind())),
            });
        if status == Health::Healthy && store.as_ref().is_some_and(|(failing, _)| *failing) {
            status = Health::Degraded;
        }
        let mut health = HealthStatus::new(status)
            .with_detail("connection", state.as_str())
            .with_detail("sessions", format!("{open}/{cap}"))
            .with_detail("provider", self.inner.provider.clone());
        if let Some((_, detail)) = store {
            health.details.insert("store".into(), detail);
        }
        // The check itself fails (an error in the metrics) when the service
        // does not answer or answers with an error.
        let mut result: Result<()> = Ok(());
        if state == ConnectionState::Connected {
            let timeout = self.inner.config().timeout;
            match tokio::time::timeout(timeout, self.inner.connector.health()).await {
                Ok(Ok(details)) => health.details.extend(details),
                Ok(Err(e)) => {
                    health.status = Health::Unhealthy;
                    health.details.insert("service".into(), e.message.clone());
                    result = Err(e);
                }
                Err(_) => {
                    health.status = Health::Unhealthy;
                    let message =
                        format!("no answer within {}", humantime::format_duration(timeout));
                    health.details.insert("service".into(), message.clone());
                    result = Err(BackendError::new(
                        "backend.health_check",
                        ErrorCode::Timeout,
                        message,
                    ));
                }
            }
        }
        timer.finish(&result);
        health
    }

    fn connection_state(&self) -> ConnectionState {
        self.inner.state()
    }

    fn metrics(&self) -> Option<Arc<Metrics>> {
        Some(self.inner.metrics.clone())
    }

    fn active_session_count(&self) -> usize {
        self.inner
            .sessions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn config(&self) -> Arc<Config> {
        self.inner.config()
    }

    #[tracing::instrument(name = "backend.update_config", skip_all, fields(provider = %self.inner.provider))]
    async fn update_config(&self, config: Config) -> Result<()> {
        const OP: &str = "backend.update_config";
        let timer = self.inner.metrics.observe(Op::UpdateConfig);
        let result = (|| {
            config
                .validate_for(self.inner.connector.hosted_stages())
                .map_err(|e| e.with_op(OP))?;
            if config.provider != self.inner.provider {
                return Err(BackendError::invalid_config(
                    OP,
                    format!(
                        "provider cannot change from {:?} to {:?}; create a new backend instead",
                        self.inner.provider, config.provider
                    ),
                )
                .with_detail("provider", "differs from the running backend's"));
            }
            self.inner
                .connector
                .validate_config(&config)
                .map_err(|e| e.with_op(OP))?;
            check_components(
                self.inner.components,
                &config,
                self.inner.connector.hosted_stages(),
            )
            .map_err(|e| e.with_op(OP))?;
            let limiter = fallback_limiter(&config)?;
            // Last, once nothing else can refuse the update: the provider
            // takes the new config.
            self.inner
                .connector
                .reconfigure(&config)
                .map_err(|e| e.with_op(OP))?;
            // The config's lock is held while the limiter changes, so two
            // updates cannot leave one's limiter with the other's config.
            let mut current = self
                .inner
                .config
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            // The users' buckets stay as they are unless the limit changed:
            // an unrelated change must not hand everyone a full burst.
            if current.rate_limit_per_second != config.rate_limit_per_second
                || current.rate_limit_burst != config.rate_limit_burst
            {
                *self
                    .inner
                    .fallback_limiter
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Arc::new(limiter);
            }
            *current = Arc::new(config);
            Ok(())
        })();
        timer.finish(&result);
        result
    }
}

impl RuntimeBackend {
    async fn connect_with_retries(&self, op: &'static str) -> Result<()> {
        let config = self.inner.config();
        self.inner.set_state(ConnectionState::Connecting);
        let inner = &self.inner;
        // Retries of this first connection stay `Connecting` (`Reconnecting`
        // is for a connection that was lost).
        RetryPolicy::from_config(&config)
            .run(
                op,
                &inner.provider,
                || inner.connector.connect(&config),
                |attempt, delay, e| {
                    tracing::warn!(attempt, code = %e.code, "connect failed, retrying in {delay:?}: {}", e.message);
                },
            )
            .await
    }

    async fn create_session_inner(&self, config: SessionConfig) -> Result<Arc<RuntimeSession>> {
        const OP: &str = "backend.create_session";
        if !self.inner.accepting.load(Ordering::Acquire) {
            return Err(match self.inner.state() {
                ConnectionState::Connected => BackendError::new(
                    OP,
                    ErrorCode::ContextCanceled,
                    "the backend is stopping and accepts no new sessions",
                ),
                state => BackendError::new(
                    OP,
                    ErrorCode::ConnectionFailed,
                    format!("the backend is {state}; call start() before opening sessions"),
                ),
            });
        }
        config.validate()?;
        let principal = self
            .inner
            .authorize(&config, Operation::CreateSession)
            .await?;
        // The authenticated user is charged, not the `user_id` the client
        // claims: no one can spend another user's budget, or dodge their own
        // by claiming new ids. Without an auth hook, the claimed id is all
        // there is.
        let key = principal.as_ref().map_or(&config.user_id, |p| &p.user_id);
        self.inner.rate_limit(key).await?;
        let cap = self.inner.capacity();
        // Given back if anything below fails, or if this future is dropped
        // part-way (a caller's timeout): only a session in the table keeps it.
        let Some(place) = Reservation::take(&self.inner.open, cap) else {
            return Err(BackendError::new(
                OP,
                ErrorCode::SessionLimitExceeded,
                format!(
                    "the backend is at its capacity of {cap} sessions; close one or retry later"
                ),
            )
            .with_detail("capacity", cap.to_string()));
        };
        let session = self.inner.build_session(config, None).await?;
        {
            let mut sessions = self
                .inner
                .sessions
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            // `stop` turns `accepting` off before it looks at the table: a
            // session opened while it ran is refused here, under the same
            // lock, rather than left behind on a stopped backend.
            if !self.inner.accepting.load(Ordering::Acquire) {
                drop(sessions);
                return Err(BackendError::new(
                    OP,
                    ErrorCode::ContextCanceled,
                    "the backend stopped while the session was being opened",
                ));
            }
            // Counted before it can be seen (and closed) by anyone else, so
            // the gauge never dips below the table.
            self.inner.metrics.session_opened();
            sessions.insert(session.id.clone(), session.clone());
        }
        place.keep();
        if let Some(p) = self.inner.persistence.load_full() {
            p.save(&session);
        }
        Ok(session)
    }
}

/// A place under the backend's capacity (`Inner::open`), given back when
/// dropped unless [`Reservation::keep`] hands it to a session in the table.
struct Reservation<'a> {
    open: &'a AtomicUsize,
}

impl<'a> Reservation<'a> {
    fn take(open: &'a AtomicUsize, cap: usize) -> Option<Self> {
        if open.fetch_add(1, Ordering::AcqRel) >= cap {
            open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Reservation { open })
    }

    /// The session holds the place now; removing it gives the place back.
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests;
