//! The session store contract: where a backend keeps its active sessions so
//! they survive a restart, and how several instances sharing one store agree
//! on who runs a session (leases).
//!
//! The runtime writes a [`SessionRecord`] per active session off the audio
//! path (coalesced per session, retried while the store fails), deletes it
//! when the session is closed, and on `start` restores the records it finds.
//! The implementations live in [`crate::store`] (in memory, an embedded
//! database on disk, Redis with the `redis` feature).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::agent::{Message, Role};
use crate::config::SessionConfig;
use crate::error::{BackendError, ErrorCode, Result};
use crate::session::{PipelineState, SessionId, SessionInfo};

/// A kept [`Message`] of a session's conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// `true` for the user's messages, `false` for the agent's.
    pub user: bool,
    /// What was said.
    pub text: String,
    /// The agent's reply did not finish.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
}

impl From<&Message> for StoredMessage {
    fn from(m: &Message) -> Self {
        StoredMessage {
            user: m.role == Role::User,
            text: m.text.clone(),
            interrupted: m.interrupted,
        }
    }
}

impl From<&StoredMessage> for Message {
    fn from(m: &StoredMessage) -> Self {
        match (m.user, m.interrupted) {
            (true, _) => Message::user(m.text.clone()),
            (false, false) => Message::agent(m.text.clone()),
            (false, true) => Message::agent_interrupted(m.text.clone()),
        }
    }
}

/// A value the provider published on the session ([`SessionInfo`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredInfo {
    /// The value.
    pub value: String,
    /// It was published as a secret (a join token): restored as one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secret: bool,
}

impl fmt::Debug for StoredInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.secret {
            f.write_str(crate::config::REDACTED)
        } else {
            fmt::Debug::fmt(&self.value, f)
        }
    }
}

/// What a store keeps of one active session: enough to bring it back after
/// a restart, on this instance or another.
///
/// The conversation holds only what the backend's data-retention hook let
/// into the session's history; a session whose hook refuses
/// [`DataKind::SessionState`](crate::hooks::DataKind::SessionState) has no
/// record at all, and one that refuses
/// [`DataKind::Metadata`](crate::hooks::DataKind::Metadata) is kept without
/// its metadata. The user's auth token is never kept, and the resume token
/// only as its SHA-256.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The session's id.
    pub id: SessionId,
    /// The provider of the backend that runs it: a backend restores only its
    /// own provider's sessions.
    pub provider: String,
    /// The session's user.
    pub user_id: String,
    /// The session's config, without its auth token, agent and metadata.
    pub config: SessionConfig,
    /// The session's metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// Where the pipeline was at the last write.
    pub state: PipelineState,
    /// The conversation so far, oldest first.
    #[serde(default)]
    pub history: Vec<StoredMessage>,
    /// What the provider published on the session (a room, a call id): its
    /// connector gets it back to re-attach
    /// ([`LinkRequest::restored`](crate::runtime::LinkRequest::restored)).
    #[serde(default)]
    pub info: BTreeMap<String, StoredInfo>,
    /// The SHA-256 of the session's resume token, in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_token_sha256: Option<String>,
    /// Bumped by every write of this session by its backend.
    pub revision: u64,
    /// When the record was written, in milliseconds since the Unix epoch.
    pub saved_at_ms: u64,
}

impl SessionRecord {
    /// The record as bytes (JSON), as the stores keep it.
    pub fn to_bytes(&self) -> Vec<u8> {
        // A record holds strings, numbers and JSON values only: it always
        // serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A record from [`SessionRecord::to_bytes`]'s bytes.
    ///
    /// # Errors
    ///
    /// `PipelineError` naming what is wrong, for bytes that are not a record.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| {
            BackendError::new(
                "store.decode",
                ErrorCode::PipelineError,
                format!("a stored session record is damaged: {e}"),
            )
        })
    }

    /// The provider's published values as a [`SessionInfo`].
    pub fn session_info(&self) -> SessionInfo {
        let info = SessionInfo::default();
        for (k, v) in &self.info {
            if v.secret {
                info.set_secret(k.clone(), crate::config::Secret::new(v.value.clone()));
            } else {
                info.set(k.clone(), v.value.clone());
            }
        }
        info
    }

    /// The kept conversation as [`Message`]s.
    pub fn messages(&self) -> Vec<Message> {
        self.history.iter().map(Message::from).collect()
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where a backend keeps its active sessions ([`SessionRecord`]s) and the
/// leases that say which instance runs each.
///
/// Every method may fail (a store that went away): the runtime reports it in
/// the backend's health and retries, and never ends a session for it. Calls
/// are made from the runtime's persistence task, never from the audio path.
#[async_trait]
pub trait SessionStore: Send + Sync + fmt::Debug {
    /// A short name of the kind of store (`memory`, `embedded`, `redis`), for
    /// health details and logs.
    fn kind(&self) -> &str;

    /// Writes (creates or replaces) `record`.
    async fn save(&self, record: &SessionRecord) -> Result<()>;

    /// The record of session `id`, if there is one.
    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>>;

    /// Deletes the record of session `id` (nothing if there is none).
    async fn delete(&self, id: &SessionId) -> Result<()>;

    /// Every record of `provider`'s sessions.
    async fn list(&self, provider: &str) -> Result<Vec<SessionRecord>>;

    /// Takes the lease on session `id` for `owner` for `ttl`: granted when
    /// no one holds it, its holder's lease expired, or `owner` holds it
    /// already (then it is renewed). Of several owners asking at once,
    /// exactly one is granted.
    async fn acquire(&self, id: &SessionId, owner: &str, ttl: Duration) -> Result<bool>;

    /// Gives up `owner`'s lease on session `id` (nothing if another holds it).
    async fn release(&self, id: &SessionId, owner: &str) -> Result<()>;

    /// How long a lease lasts unless renewed ([`DEFAULT_LEASE_TTL`] by
    /// default). A backend renews the leases of its sessions every third of
    /// it; after a crash, another instance can take a session up once it has
    /// passed.
    fn lease_ttl(&self) -> Duration {
        DEFAULT_LEASE_TTL
    }
}

/// How long a lease lasts unless renewed, by default.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);

/// A lease as the in-process stores keep it: holder and expiry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Who holds it.
    pub owner: String,
    /// When it expires, in milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

impl Lease {
    /// Whether `owner` may take this lease at `now_ms`: it expired, or is
    /// `owner`'s already.
    pub fn grants(&self, owner: &str, now_ms: u64) -> bool {
        self.owner == owner || self.expires_ms <= now_ms
    }
}
