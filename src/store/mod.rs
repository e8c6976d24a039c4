//! The session stores: where a backend keeps its active sessions
//! ([`SessionStore`]) so they survive a restart.
//!
//! - [`MemoryStore`]: in the process; survives a backend's restart within
//!   the process (and serves tests), not the process's.
//! - [`EmbeddedStore`]: an embedded database file (redb), what `serve` uses
//!   unless told otherwise; one process at a time.
//! - `RedisStore` (feature `redis`): Redis, for several instances sharing
//!   their sessions; a session created on one can be resumed on another.
//!
//! A backend takes one with
//! [`VoiceBackend::set_session_store`](crate::VoiceBackend::set_session_store)
//! before `start`:
//!
//! ```
//! use std::sync::Arc;
//! use voice_backends::store::MemoryStore;
//! use voice_backends::{Config, PipelineType, SessionConfig, registry};
//!
//! # async fn demo() -> voice_backends::Result<()> {
//! let mut config = Config::new("local");
//! config.pipeline_type = PipelineType::S2s;
//! config.s2s_provider = Some("echo".into());
//! let store = Arc::new(MemoryStore::new());
//! let backend = registry().create("local", &config).await?;
//! backend.set_session_store(store.clone());
//! backend.start().await?;
//! let session = backend.create_session(SessionConfig::new("alice")).await?;
//! // Stopped with its backend, the session is kept; the next start restores it.
//! backend.stop().await?;
//! backend.start().await?;
//! assert!(backend.get_session(session.id()).await.is_ok());
//! # Ok(()) }
//! ```

mod embedded;
mod memory;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
mod redis;

pub use crate::session::store::{
    DEFAULT_LEASE_TTL, Lease, SessionRecord, SessionStore, StoredInfo, StoredMessage,
};
pub use embedded::EmbeddedStore;
pub use memory::MemoryStore;
#[cfg(feature = "redis")]
pub use redis::RedisStore;
