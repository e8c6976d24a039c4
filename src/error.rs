//! The crate's one error type.
//!
//! Every fallible operation returns [`BackendError`]: the operation that failed
//! (`op`), a machine-readable [`ErrorCode`], a human message that says what to fix,
//! optional `details` (for example one entry per invalid config field) and an
//! optional underlying `source`.
//!
//! Messages and details never carry secrets: config validation names the field,
//! never a secret's value, and [`crate::Secret`] renders as `[redacted]`.

use std::collections::BTreeMap;
use std::fmt;

/// Shorthand for results whose error is [`BackendError`].
pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// The boxed source error carried by [`BackendError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong, in one of the 13 codes of the specification.
///
/// [`ErrorCode::as_str`] gives the stable snake_case name used on the wire, in
/// metrics labels and in logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The configuration is malformed or violates a rule; `details` lists every field.
    InvalidConfig,
    /// No provider (or pipeline component) is registered under the requested name.
    ProviderNotFound,
    /// A connection to the provider's service could not be made or was lost.
    ConnectionFailed,
    /// Connecting to the provider's service took longer than allowed.
    ConnectionTimeout,
    /// No session with the given id exists on this backend.
    SessionNotFound,
    /// The backend is at its session capacity.
    SessionLimitExceeded,
    /// The caller exceeded its rate limit; try again later.
    RateLimitExceeded,
    /// The caller's credentials were missing or not accepted.
    AuthenticationFailed,
    /// The caller is known but not allowed to perform the operation.
    AuthorizationFailed,
    /// A pipeline stage (audio, VAD, STT, TTS, S2S, ...) failed.
    PipelineError,
    /// The application's agent failed to produce a reply.
    AgentError,
    /// An operation did not finish within its deadline.
    Timeout,
    /// The operation was cancelled by its caller or by shutdown.
    ContextCanceled,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::InvalidConfig,
        ErrorCode::ProviderNotFound,
        ErrorCode::ConnectionFailed,
        ErrorCode::ConnectionTimeout,
        ErrorCode::SessionNotFound,
        ErrorCode::SessionLimitExceeded,
        ErrorCode::RateLimitExceeded,
        ErrorCode::AuthenticationFailed,
        ErrorCode::AuthorizationFailed,
        ErrorCode::PipelineError,
        ErrorCode::AgentError,
        ErrorCode::Timeout,
        ErrorCode::ContextCanceled,
    ];

    /// The stable snake_case name of the code, e.g. `"invalid_config"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidConfig => "invalid_config",
            ErrorCode::ProviderNotFound => "provider_not_found",
            ErrorCode::ConnectionFailed => "connection_failed",
            ErrorCode::ConnectionTimeout => "connection_timeout",
            ErrorCode::SessionNotFound => "session_not_found",
            ErrorCode::SessionLimitExceeded => "session_limit_exceeded",
            ErrorCode::RateLimitExceeded => "rate_limit_exceeded",
            ErrorCode::AuthenticationFailed => "authentication_failed",
            ErrorCode::AuthorizationFailed => "authorization_failed",
            ErrorCode::PipelineError => "pipeline_error",
            ErrorCode::AgentError => "agent_error",
            ErrorCode::Timeout => "timeout",
            ErrorCode::ContextCanceled => "context_canceled",
        }
    }

    /// Parses a snake_case name produced by [`ErrorCode::as_str`].
    pub fn from_name(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Whether retrying the same operation later may succeed.
    ///
    /// Transient conditions (a lost or slow connection, a full backend, a rate
    /// limit, a deadline) are retryable. Mistakes of the caller (bad config,
    /// unknown provider or session, refused credentials), pipeline and agent
    /// failures, and cancellation are not: repeating the call unchanged would
    /// fail the same way.
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::ConnectionFailed
                | ErrorCode::ConnectionTimeout
                | ErrorCode::SessionLimitExceeded
                | ErrorCode::RateLimitExceeded
                | ErrorCode::Timeout
        )
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of every fallible operation in the crate.
///
/// `Display` reads `op: code: message`, e.g.
/// `registry.create: provider_not_found: no provider named "livekt"; available: local, pipecat`.
///
/// The fields ([`ErrorFields`]: `op`, `code`, `message`, `details`,
/// `source`) are read and written through the error itself (`err.code`,
/// `err.message.push_str(..)`); they live behind one pointer so that a
/// `Result` of this crate is no wider than its `Ok` value plus a word, which
/// keeps the success path of hot calls (`process_audio`, `registry.create`)
/// free of copying a large error slot around.
pub struct BackendError(Box<ErrorFields>);

/// The fields of a [`BackendError`], reached through it by `Deref`.
///
/// Build one with a struct literal and turn it into an error with `.into()`,
/// or take an error apart with [`BackendError::into_fields`].
#[derive(Debug)]
pub struct ErrorFields {
    /// The operation that failed, e.g. `"registry.create"` or `"session.process_audio"`.
    pub op: &'static str,
    /// What went wrong.
    pub code: ErrorCode,
    /// What happened and, where possible, what to do about it.
    pub message: String,
    /// Structured context: for `InvalidConfig`, one entry per field path.
    pub details: BTreeMap<String, String>,
    /// The underlying cause, if any.
    pub source: Option<BoxError>,
}

impl std::ops::Deref for BackendError {
    type Target = ErrorFields;
    #[inline]
    fn deref(&self) -> &ErrorFields {
        &self.0
    }
}

impl std::ops::DerefMut for BackendError {
    #[inline]
    fn deref_mut(&mut self) -> &mut ErrorFields {
        &mut self.0
    }
}

impl fmt::Debug for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendError")
            .field("op", &self.op)
            .field("code", &self.code)
            .field("message", &self.message)
            .field("details", &self.details)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.op, self.code, self.message)
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl BackendError {
    /// The fields, by value (to move the message or details out).
    pub fn into_fields(self) -> ErrorFields {
        *self.0
    }
}

impl From<BackendError> for ErrorFields {
    fn from(e: BackendError) -> Self {
        *e.0
    }
}

impl From<ErrorFields> for BackendError {
    fn from(fields: ErrorFields) -> Self {
        BackendError(Box::new(fields))
    }
}

impl BackendError {
    /// A new error with no details and no source.
    pub fn new(op: &'static str, code: ErrorCode, message: impl Into<String>) -> Self {
        BackendError(Box::new(ErrorFields {
            op,
            code,
            message: message.into(),
            details: BTreeMap::new(),
            source: None,
        }))
    }

    /// Adds (or extends) one detail entry; a second value for the same key is
    /// appended after `"; "`.
    pub fn with_detail(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.push_detail(key, value);
        self
    }

    /// Adds the underlying cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Replaces the operation name, keeping everything else.
    pub fn with_op(mut self, op: &'static str) -> Self {
        self.op = op;
        self
    }

    /// Adds (or extends) one detail entry in place.
    pub fn push_detail(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let value = value.into();
        self.details
            .entry(key.into())
            .and_modify(|v| {
                v.push_str("; ");
                v.push_str(&value);
            })
            .or_insert(value);
    }

    /// Whether retrying may succeed; see [`ErrorCode::is_retryable`].
    pub fn is_retryable(&self) -> bool {
        self.code.is_retryable()
    }

    /// Shorthand for an [`ErrorCode::InvalidConfig`] error.
    pub fn invalid_config(op: &'static str, message: impl Into<String>) -> Self {
        BackendError::new(op, ErrorCode::InvalidConfig, message)
    }
}
