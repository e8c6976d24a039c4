#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]

pub mod agent;
pub mod audio;
pub mod backend;
#[cfg(feature = "cli")]
#[cfg_attr(docsrs, doc(cfg(feature = "cli")))]
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod hooks;
pub mod metrics;
pub mod pipeline;
pub mod provider;
pub mod providers;
pub mod registry;
pub mod runtime;
#[cfg(feature = "server")]
#[cfg_attr(docsrs, doc(cfg(feature = "server")))]
pub mod server;
pub mod session;
pub mod store;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
mod wake;

pub use agent::{
    Agent, AgentReply, AgentTurn, DEFAULT_HISTORY_LIMIT, Message, Role, agent_fn,
    with_history_limit,
};
pub use audio::{AudioEncoding, AudioFormat, AudioFrame};
pub use backend::{ConnectionState, Health, HealthStatus, VoiceBackend};
pub use config::*;
pub use error::{BackendError, ErrorCode, ErrorFields, Result};
pub use hooks::{
    AudioProcessor, AuthHook, DataKind, DataRetentionHook, Hooks, Operation, Principal,
    RateLimiter, TokenBucketLimiter,
};
pub use pipeline::events::SessionEvent;
pub use provider::{
    BackendProvider, Codec, ConfigSchema, HostedStages, ProviderCapabilities, TurnPolicy,
};
pub use registry::{
    BackendRegistry, DuplicateEntry, ProviderEntry, Registry, new_backend, registry,
};
pub use session::{
    AudioReceiver, PersistenceStatus, PipelineState, ProcessAudio, SessionId, VoiceSession,
};

#[doc(hidden)]
pub mod __private {
    //! Re-exports used by the crate's macros; not part of the public API.
    pub use linkme;
}
