//! The session contract: one user's conversation with the agent.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::agent::Agent;
use crate::audio::AudioFrame;
use crate::error::Result;

/// A session's unique id.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(Arc<str>);

impl SessionId {
    /// Wraps an id.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        SessionId(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Borrow<str> for SessionId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for SessionId {
    fn from(id: &str) -> Self {
        SessionId(id.into())
    }
}

impl From<String> for SessionId {
    fn from(id: String) -> Self {
        SessionId(id.into())
    }
}

/// Where a session's pipeline is in the conversation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineState {
    /// Not started, or stopped.
    #[default]
    Idle,
    /// Waiting for, or hearing, the user.
    Listening,
    /// The user's turn ended; transcribing and asking the agent.
    Processing,
    /// The agent's reply is playing.
    Speaking,
    /// A stage failed; the session can be stopped or restarted.
    Error,
}

impl PipelineState {
    /// The snake_case name, e.g. `"speaking"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            PipelineState::Idle => "idle",
            PipelineState::Listening => "listening",
            PipelineState::Processing => "processing",
            PipelineState::Speaking => "speaking",
            PipelineState::Error => "error",
        }
    }
}

impl fmt::Display for PipelineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a session's state is kept so it survives a restart.
///
/// Active sessions persist (when a session store is configured and the
/// data-retention hook allows it); completed sessions are ephemeral.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PersistenceStatus {
    /// Not kept: no store, the retention hook declined, or the session completed.
    #[default]
    Ephemeral,
    /// A change is waiting to be written.
    Pending,
    /// Written; a restart restores the session.
    Persisted {
        /// When the last write finished.
        saved_at: SystemTime,
    },
    /// The last write failed; the session goes on and the next change retries.
    Failed {
        /// Why, without secrets.
        reason: String,
    },
}

/// The receiving end of a session's outgoing (reply) audio.
#[derive(Debug)]
pub struct AudioReceiver {
    rx: mpsc::Receiver<AudioFrame>,
}

impl AudioReceiver {
    /// Wraps the receiving half of a bounded channel.
    pub fn new(rx: mpsc::Receiver<AudioFrame>) -> Self {
        AudioReceiver { rx }
    }

    /// The next frame, or `None` once the session has stopped.
    pub async fn recv(&mut self) -> Option<AudioFrame> {
        self.rx.recv().await
    }

    /// A frame if one is ready now.
    pub fn try_recv(&mut self) -> Option<AudioFrame> {
        self.rx.try_recv().ok()
    }
}

/// One user's conversation with the agent, isolated from every other session.
#[async_trait]
pub trait VoiceSession: Send + Sync {
    /// The session's unique id.
    fn id(&self) -> &SessionId;

    /// The user the session belongs to.
    fn user_id(&self) -> &str;

    /// Starts the pipeline (and the provider's link for this session).
    async fn start(&self) -> Result<()>;

    /// Stops the session; an in-flight turn finishes first, within the timeout.
    async fn stop(&self) -> Result<()>;

    /// Feeds user audio into the pipeline.
    async fn process_audio(&self, frame: AudioFrame) -> Result<()>;

    /// Sends audio straight to the user (e.g. a prompt), bypassing the agent.
    async fn send_audio(&self, frame: AudioFrame) -> Result<()>;

    /// Takes the stream of audio going to the user (the agent's replies).
    ///
    /// There is one stream per session: a second call fails while the first
    /// receiver is alive.
    fn receive_audio(&self) -> Result<AudioReceiver>;

    /// Sets the agent that answers each finished user turn.
    fn set_agent(&self, agent: Arc<dyn Agent>);

    /// Where the pipeline is.
    fn state(&self) -> PipelineState;

    /// Whether the session's state is kept.
    fn persistence_status(&self) -> PersistenceStatus;

    /// The session's metadata.
    fn metadata(&self) -> BTreeMap<String, serde_json::Value>;

    /// Merges `metadata` into the session's metadata (a `null` value removes a key).
    async fn update_metadata(&self, metadata: BTreeMap<String, serde_json::Value>) -> Result<()>;
}
