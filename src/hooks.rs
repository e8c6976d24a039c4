//! Hooks an application plugs into a backend: authentication, rate limiting,
//! data retention and custom audio processing.
//!
//! Providers that bring their own auth or rate limiting say so in their
//! [`crate::ProviderCapabilities`]; the rest use the application's hooks and,
//! for rate limiting, the framework's fallback [`TokenBucketLimiter`].

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::audio::AudioFrame;
use crate::config::Secret;
use crate::error::{BackendError, ErrorCode, Result};
use crate::session::SessionId;

/// Who the caller is, as established by an [`AuthHook`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Principal {
    /// The authenticated user's id.
    pub user_id: String,
    /// Roles or scopes granted to the user.
    pub roles: Vec<String>,
}

impl Principal {
    /// A principal with no roles.
    pub fn new(user_id: impl Into<String>) -> Self {
        Principal {
            user_id: user_id.into(),
            roles: Vec::new(),
        }
    }

    /// Whether the principal holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// An operation a caller asks to perform, for authorization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// Open a session.
    CreateSession,
    /// Read a session.
    GetSession,
    /// Close a session.
    CloseSession,
    /// Stream audio into a session.
    ProcessAudio,
    /// Change the backend's config.
    UpdateConfig,
}

impl Operation {
    /// The snake_case name, e.g. `"create_session"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Operation::CreateSession => "create_session",
            Operation::GetSession => "get_session",
            Operation::CloseSession => "close_session",
            Operation::ProcessAudio => "process_audio",
            Operation::UpdateConfig => "update_config",
        }
    }
}

/// Authentication and authorization of callers.
#[async_trait]
pub trait AuthHook: Send + Sync {
    /// Checks a token; `AuthenticationFailed` when it is missing or not accepted.
    /// The token must never appear in the error.
    async fn authenticate(&self, token: Option<&Secret>) -> Result<Principal>;

    /// Checks that `principal` may perform `operation`; `AuthorizationFailed` if not.
    async fn authorize(&self, principal: &Principal, operation: Operation) -> Result<()>;
}

/// Rate limiting by key (a user id, a client address, ...).
///
/// The runtime checks it once per session creation, keyed by the auth hook's
/// authenticated [`Principal::user_id`] when there is an auth hook, otherwise
/// by the session's claimed `user_id`.
#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Takes one unit for `key`, or fails with `RateLimitExceeded` whose
    /// `details["retry_after_ms"]` says when to try again.
    async fn check(&self, key: &str) -> Result<()>;
}

/// What kind of data a session would keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DataKind {
    /// The session's state, so it survives a restart.
    SessionState,
    /// User and agent audio.
    Audio,
    /// Transcripts and agent text.
    Transcript,
    /// Session metadata.
    Metadata,
}

/// Decides what a backend may keep, and for how long. Consulted before
/// anything is stored.
#[async_trait]
pub trait DataRetentionHook: Send + Sync {
    /// Whether `kind` of data of `session` may be kept at all.
    async fn should_retain(&self, session: &SessionId, kind: DataKind) -> bool;

    /// How long kept data of `kind` may live.
    fn retention_period(&self, kind: DataKind) -> Duration;
}

/// The hooks an application plugs into a backend; see
/// [`crate::VoiceBackend::set_hooks`]. Every hook is optional.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Authenticates and authorizes session creation: the runtime calls it
    /// with [`Operation::CreateSession`] and the session config's token. (The
    /// other [`Operation`]s are for an application's own checks: the
    /// operations on a session already made take no token.)
    pub auth: Option<std::sync::Arc<dyn AuthHook>>,
    /// Replaces the framework's fallback rate limiter.
    pub rate_limiter: Option<std::sync::Arc<dyn RateLimiter>>,
    /// Decides what may be kept and for how long. A session asks it once
    /// per turn answered by the application's agent, with
    /// [`DataKind::Transcript`], whether the turn may join the conversation
    /// history the agent sees in later turns
    /// ([`AgentTurn::history`](crate::agent::AgentTurn::history)): a turn it
    /// refuses, or has not allowed by the time the turn is over (it is asked
    /// while the agent answers, and given the session's `timeout`), is left
    /// out. Sessions take the hook set when they are created. The session
    /// store asks it too, when a session opens: a refused
    /// [`DataKind::SessionState`] means the session is not kept at all, a
    /// refused [`DataKind::Metadata`] that its metadata is not written, and
    /// refused transcripts never reach the store.
    pub retention: Option<std::sync::Arc<dyn DataRetentionHook>>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("auth", &self.auth.is_some())
            .field("rate_limiter", &self.rate_limiter.is_some())
            .field("retention", &self.retention.is_some())
            .finish()
    }
}

/// A custom audio processor, run on every incoming frame before VAD.
///
/// Each session gets its own instance, so `process` takes `&mut self` and may
/// keep state. Processors run in ascending [`AudioProcessor::order`]; see
/// [`sort_processors`].
pub trait AudioProcessor: Send {
    /// The processor's name, for logs and metrics.
    fn name(&self) -> &str;

    /// Where it runs: lower runs first.
    fn order(&self) -> i32;

    /// Transforms one frame, in the pipeline's format
    /// ([`INTERNAL_FORMAT`](crate::pipeline::INTERNAL_FORMAT)), and returns it
    /// in that format. An error, or a frame in another format, drops the
    /// frame and is reported as a `PipelineError` (the event and
    /// `process_audio`'s error, with the processor's error as its source);
    /// the session goes on.
    fn process(&mut self, frame: AudioFrame) -> Result<AudioFrame>;
}

/// Sorts processors into run order: ascending `order`, ties kept in the order given.
pub fn sort_processors(processors: &mut [Box<dyn AudioProcessor>]) {
    processors.sort_by_key(|p| p.order());
}

const SHARDS: usize = 16;

/// The framework's fallback rate limiter: a token bucket per key.
///
/// Each key may take up to `burst` units at once and `rate` units per second on
/// average. Memory is bounded: about `max_keys` buckets are kept (the keys
/// are spread over 16 shards, each holding `max_keys / 16` rounded up); beyond that,
/// buckets that have refilled completely (idle keys) are dropped first, then the
/// fullest ones.
pub struct TokenBucketLimiter {
    rate: f64,
    burst: f64,
    max_keys_per_shard: usize,
    shards: [Mutex<HashMap<Box<str>, Bucket>>; SHARDS],
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucketLimiter {
    /// Default bound on tracked keys.
    pub const DEFAULT_MAX_KEYS: usize = 100_000;

    /// A limiter allowing `rate` units per second per key, `burst` at once.
    ///
    /// Fails with `InvalidConfig` unless `rate` is finite and positive and
    /// `burst` is at least 1.
    pub fn new(rate: f64, burst: u32) -> Result<Self> {
        Self::with_max_keys(rate, burst, Self::DEFAULT_MAX_KEYS)
    }

    /// Like [`TokenBucketLimiter::new`], with a bound on tracked keys.
    pub fn with_max_keys(rate: f64, burst: u32, max_keys: usize) -> Result<Self> {
        if !rate.is_finite() || rate <= 0.0 {
            return Err(BackendError::invalid_config(
                "rate_limiter.new",
                format!("rate must be a positive number of units per second, got {rate}"),
            ));
        }
        if burst == 0 {
            return Err(BackendError::invalid_config(
                "rate_limiter.new",
                "burst must be at least 1",
            ));
        }
        Ok(TokenBucketLimiter {
            rate,
            burst: burst as f64,
            max_keys_per_shard: max_keys.div_ceil(SHARDS).max(1),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        })
    }

    /// Takes `cost` units for `key` at `now`; on refusal, how long until they
    /// are available. A cost above the burst is never granted: its wait is
    /// `Duration::MAX`. Calls may come with a `now` a little older than an
    /// earlier call's (callers read the clock before taking the lock); the
    /// time between is refilled once.
    pub fn try_take_at(
        &self,
        key: &str,
        cost: u32,
        now: Instant,
    ) -> std::result::Result<(), Duration> {
        let cost = cost as f64;
        let mut shard = self.shards[shard_of(key)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !shard.contains_key(key) && shard.len() >= self.max_keys_per_shard {
            self.evict(&mut shard, now);
        }
        let bucket = shard.entry(key.into()).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.updated = bucket.updated.max(now);
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            Ok(())
        } else if cost > self.burst {
            Err(Duration::MAX)
        } else {
            // A tiny rate can make the wait longer than a `Duration` holds.
            let missing = cost - bucket.tokens;
            Err(Duration::try_from_secs_f64(missing / self.rate).unwrap_or(Duration::MAX))
        }
    }

    /// How many keys are tracked.
    pub fn tracked_keys(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    fn evict(&self, shard: &mut HashMap<Box<str>, Bucket>, now: Instant) {
        let level = |b: &Bucket| {
            b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * self.rate
        };
        shard.retain(|_, b| level(b) < self.burst);
        while shard.len() >= self.max_keys_per_shard {
            let fullest = shard
                .iter()
                .max_by(|a, b| level(a.1).total_cmp(&level(b.1)))
                .map(|(k, _)| k.clone());
            match fullest {
                Some(k) => {
                    shard.remove(&k);
                }
                None => break,
            }
        }
    }
}

fn shard_of(key: &str) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

impl fmt::Debug for TokenBucketLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBucketLimiter")
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .field("max_keys", &(self.max_keys_per_shard * SHARDS))
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl RateLimiter for TokenBucketLimiter {
    async fn check(&self, key: &str) -> Result<()> {
        self.try_take_at(key, 1, Instant::now()).map_err(|wait| {
            BackendError::new(
                "rate_limiter.check",
                ErrorCode::RateLimitExceeded,
                format!(
                    "rate limit of {} per second (burst {}) exceeded; retry in {} ms",
                    self.rate,
                    self.burst,
                    wait.as_millis().max(1)
                ),
            )
            .with_detail("retry_after_ms", wait.as_millis().max(1).to_string())
        })
    }
}
