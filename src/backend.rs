//! The backend contract: one configured connection to a voice service that
//! opens isolated sessions.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Serialize, Serializer};

use crate::config::{Config, Secret, SessionConfig};
use crate::error::Result;
use crate::hooks::Hooks;
use crate::session::store::SessionStore;
use crate::session::{SessionId, VoiceSession};

/// The state of the backend's connection to its service; defined with the
/// session, whose link to the service reports the same states.
pub use crate::session::ConnectionState;

/// Overall health of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Everything works.
    Healthy,
    /// It works, with a problem worth attention (e.g. reconnecting, near capacity).
    Degraded,
    /// It does not work.
    Unhealthy,
}

impl Health {
    /// The snake_case name, e.g. `"degraded"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// The result of a health check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthStatus {
    /// The verdict.
    pub status: Health,
    /// What was checked and what was found, by check name.
    pub details: BTreeMap<String, String>,
    /// When the check ran.
    #[serde(serialize_with = "rfc3339")]
    pub last_check: SystemTime,
}

impl HealthStatus {
    /// A status with the given verdict and no details, checked now.
    pub fn new(status: Health) -> Self {
        HealthStatus {
            status,
            details: BTreeMap::new(),
            last_check: SystemTime::now(),
        }
    }

    /// Adds one detail.
    pub fn with_detail(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.details.insert(key.into(), value.into());
        self
    }

    /// Whether the verdict is [`Health::Healthy`].
    pub fn is_healthy(&self) -> bool {
        self.status == Health::Healthy
    }
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// A configured voice backend: it connects to its service and opens sessions.
///
/// Made by a [`crate::BackendProvider`] (usually through
/// [`crate::BackendRegistry::create`]). Every method is safe to call from many
/// tasks at once.
#[async_trait]
pub trait VoiceBackend: Send + Sync + fmt::Debug {
    /// The name of the provider that made this backend.
    fn provider(&self) -> &str;

    /// Sets the application's hooks (auth, rate limiting, data retention). They
    /// apply to operations from then on.
    fn set_hooks(&self, hooks: Hooks);

    /// Connects to the service and starts accepting sessions.
    async fn start(&self) -> Result<()>;

    /// Stops gracefully: refuses new sessions, lets in-flight turns finish within
    /// the configured timeout, then closes every session and the connection.
    async fn stop(&self) -> Result<()>;

    /// Opens a new, isolated session. It hears nothing until
    /// [`VoiceSession::start`] is called: call it, then feed
    /// [`VoiceSession::process_audio`], read [`VoiceSession::receive_audio`]
    /// and [`VoiceSession::events`] (`examples/quickstart.rs` does all of it).
    ///
    /// Fails with `SessionLimitExceeded` at capacity, `AuthenticationFailed` /
    /// `AuthorizationFailed` when the auth hook refuses, `RateLimitExceeded` when
    /// the rate limiter does, and `InvalidConfig` for a bad `config`.
    async fn create_session(&self, config: SessionConfig) -> Result<Arc<dyn VoiceSession>>;

    /// The session with the given id, or `SessionNotFound`.
    async fn get_session(&self, id: &SessionId) -> Result<Arc<dyn VoiceSession>>;

    /// Every open session.
    async fn list_sessions(&self) -> Vec<Arc<dyn VoiceSession>>;

    /// Stops and removes a session, or `SessionNotFound`.
    async fn close_session(&self, id: &SessionId) -> Result<()>;

    /// Checks the backend and its connection.
    async fn health_check(&self) -> HealthStatus;

    /// The state of the connection to the service.
    fn connection_state(&self) -> ConnectionState;

    /// How many sessions are open.
    fn active_session_count(&self) -> usize;

    /// The config in force.
    fn config(&self) -> Arc<Config>;

    /// Replaces the config after validating it; an invalid config changes nothing.
    async fn update_config(&self, config: Config) -> Result<()>;

    /// The backend's metrics, when it records them (the shared runtime does).
    fn metrics(&self) -> Option<Arc<crate::metrics::Metrics>> {
        None
    }

    /// Keeps the backend's active sessions in `store` from now on, so they
    /// survive a restart; set it before [`VoiceBackend::start`], which
    /// restores the sessions the store holds for this provider. See
    /// [`PersistenceStatus`](crate::session::PersistenceStatus). A backend
    /// that cannot persist sessions ignores it (the default), and its
    /// sessions stay `Ephemeral`.
    fn set_session_store(&self, store: Arc<dyn SessionStore>) {
        let _ = store;
    }

    /// Takes up session `id` again for its user, who proves it with the
    /// session's [`VoiceSession::resume_token`]: the session this backend
    /// runs, or one kept in its session store (written by this instance
    /// before a restart, or by another instance sharing the store), which
    /// this backend then runs, holding the session's lease.
    ///
    /// Fails with `SessionNotFound` (no such active session: closed, never
    /// opened, or no store), `AuthenticationFailed` (the token is not the
    /// session's), `ConnectionFailed` (another instance runs it now; retry
    /// once it let go of it) and `SessionLimitExceeded` at capacity.
    async fn resume_session(
        &self,
        id: &SessionId,
        token: &Secret,
    ) -> Result<Arc<dyn VoiceSession>> {
        let _ = token;
        Err(crate::error::BackendError::new(
            "backend.resume_session",
            crate::error::ErrorCode::SessionNotFound,
            format!("no session {id} to resume: this backend keeps no sessions"),
        ))
    }
}
