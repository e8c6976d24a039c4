//! The application's agent: what answers a finished user turn.
//!
//! An agent is either an object implementing [`Agent`] or an async closure
//! wrapped with [`agent_fn`]. Sessions call it once per finished user turn
//! with the final transcript and stream its reply to the user.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;

/// One finished user turn, handed to the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentTurn {
    /// The session the turn belongs to.
    pub session_id: String,
    /// The user who spoke.
    pub user_id: String,
    /// The final transcript of the user's turn.
    pub transcript: String,
    /// The turn's number within the session, from 1.
    pub turn: u64,
}

impl AgentTurn {
    /// A turn with the given identifiers and transcript.
    pub fn new(
        session_id: impl Into<String>,
        user_id: impl Into<String>,
        transcript: impl Into<String>,
        turn: u64,
    ) -> Self {
        AgentTurn {
            session_id: session_id.into(),
            user_id: user_id.into(),
            transcript: transcript.into(),
            turn,
        }
    }
}

/// The agent's answer to a turn.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct AgentReply {
    /// What the agent says; an empty reply says nothing.
    pub text: String,
}

impl AgentReply {
    /// A reply that speaks `text`.
    pub fn text(text: impl Into<String>) -> Self {
        AgentReply { text: text.into() }
    }
}

impl From<String> for AgentReply {
    fn from(text: String) -> Self {
        AgentReply { text }
    }
}

impl From<&str> for AgentReply {
    fn from(text: &str) -> Self {
        AgentReply::text(text)
    }
}

/// The application's conversational logic (the specification's agent instance).
///
/// Errors returned here surface as [`crate::ErrorCode::AgentError`] events on the
/// session; they end the turn, not the session.
#[async_trait]
pub trait Agent: Send + Sync {
    /// Answers one finished user turn.
    async fn respond(&self, turn: AgentTurn) -> Result<AgentReply>;
}

/// An [`Agent`] made from an async closure (the specification's agent callback).
///
/// ```
/// use voice_backends::{agent_fn, AgentReply};
/// let agent = agent_fn(|turn| async move { Ok(AgentReply::text(format!("you said {}", turn.transcript))) });
/// # let _ = agent;
/// ```
pub fn agent_fn<F, Fut>(f: F) -> Arc<dyn Agent>
where
    F: Fn(AgentTurn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<AgentReply>> + Send + 'static,
{
    Arc::new(AgentFn(f))
}

struct AgentFn<F>(F);

#[async_trait]
impl<F, Fut> Agent for AgentFn<F>
where
    F: Fn(AgentTurn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<AgentReply>> + Send + 'static,
{
    async fn respond(&self, turn: AgentTurn) -> Result<AgentReply> {
        (self.0)(turn).await
    }
}

impl<F> fmt::Debug for AgentFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentFn")
    }
}
