//! The session contract: one user's conversation with the agent.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::agent::Agent;
use crate::audio::AudioFrame;
use crate::error::Result;
use crate::pipeline::events::SessionEvents;

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

/// A bounded channel for a session's outgoing audio whose queued frames can be
/// flushed from the sending side (barge-in discards reply audio at once, even
/// frames already handed to the channel).
pub fn audio_channel(capacity: usize) -> (AudioSender, AudioReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let epoch = Arc::new(AtomicU64::new(0));
    (
        AudioSender {
            tx,
            epoch: epoch.clone(),
        },
        AudioReceiver { rx, epoch },
    )
}

/// The sending end of [`audio_channel`].
#[derive(Clone, Debug)]
pub struct AudioSender {
    tx: mpsc::Sender<(u64, AudioFrame)>,
    epoch: Arc<AtomicU64>,
}

/// Why [`AudioSender::try_send`] did not queue a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum AudioSendError {
    /// The receiver is not keeping up and the channel is full.
    Full,
    /// The receiver is gone.
    Closed,
}

impl AudioSender {
    /// Queues a frame without waiting.
    pub fn try_send(&self, frame: AudioFrame) -> std::result::Result<(), AudioSendError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        self.tx.try_send((epoch, frame)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => AudioSendError::Full,
            mpsc::error::TrySendError::Closed(_) => AudioSendError::Closed,
        })
    }

    /// Queues a frame, waiting for room.
    pub async fn send(&self, frame: AudioFrame) -> std::result::Result<(), AudioSendError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        self.tx
            .send((epoch, frame))
            .await
            .map_err(|_| AudioSendError::Closed)
    }

    /// Discards every frame queued so far: the receiver skips them.
    pub fn flush(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether the receiver is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The receiving end of a session's outgoing (reply) audio.
#[derive(Debug)]
pub struct AudioReceiver {
    rx: mpsc::Receiver<(u64, AudioFrame)>,
    epoch: Arc<AtomicU64>,
}

impl AudioReceiver {
    /// The next frame, or `None` once the session has stopped.
    pub async fn recv(&mut self) -> Option<AudioFrame> {
        loop {
            let (epoch, frame) = self.rx.recv().await?;
            if epoch == self.epoch.load(Ordering::Acquire) {
                return Some(frame);
            }
        }
    }

    /// A frame if one is ready now.
    pub fn try_recv(&mut self) -> Option<AudioFrame> {
        loop {
            let (epoch, frame) = self.rx.try_recv().ok()?;
            if epoch == self.epoch.load(Ordering::Acquire) {
                return Some(frame);
            }
        }
    }
}

/// The future of [`VoiceSession::process_audio`]: a result already known, or
/// a boxed future that finishes the work.
///
/// ```
/// # use voice_backends::session::ProcessAudio;
/// # async fn run() -> voice_backends::Result<()> {
/// // Done at once: nothing is allocated.
/// ProcessAudio::ready(Ok(())).await?;
/// // Work that waits.
/// ProcessAudio::new(async { Ok(()) }).await?;
/// # Ok(()) }
/// ```
#[must_use = "futures do nothing unless awaited"]
pub struct ProcessAudio<'a>(ProcessAudioInner<'a>);

enum ProcessAudioInner<'a> {
    Ready(Option<Result<()>>),
    Waiting(Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>),
}

impl<'a> ProcessAudio<'a> {
    /// A future that resolves to `result` at its first poll.
    pub fn ready(result: Result<()>) -> Self {
        ProcessAudio(ProcessAudioInner::Ready(Some(result)))
    }

    /// A future that runs `work`.
    pub fn new(work: impl Future<Output = Result<()>> + Send + 'a) -> Self {
        ProcessAudio(ProcessAudioInner::Waiting(Box::pin(work)))
    }
}

impl Future for ProcessAudio<'_> {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        match &mut self.get_mut().0 {
            ProcessAudioInner::Ready(result) => Poll::Ready(
                result
                    .take()
                    .expect("a ProcessAudio future polled after it finished"),
            ),
            ProcessAudioInner::Waiting(work) => work.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for ProcessAudio<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            ProcessAudioInner::Ready(_) => "ProcessAudio::Ready",
            ProcessAudioInner::Waiting(_) => "ProcessAudio::Waiting",
        })
    }
}

/// One user's conversation with the agent, isolated from every other session.
#[async_trait]
pub trait VoiceSession: Send + Sync + fmt::Debug {
    /// The session's unique id.
    fn id(&self) -> &SessionId;

    /// The user the session belongs to.
    fn user_id(&self) -> &str;

    /// Starts the pipeline (and the provider's link for this session).
    async fn start(&self) -> Result<()>;

    /// Stops the session; an in-flight turn finishes first, within the timeout.
    async fn stop(&self) -> Result<()>;

    /// Feeds user audio into the pipeline.
    ///
    /// Await the returned [`ProcessAudio`] like any `async fn`'s future. An
    /// implementation that is done at once (the built-in runtime runs the
    /// input path inline) returns [`ProcessAudio::ready`], which costs no
    /// allocation per frame; one that has to wait wraps its future with
    /// [`ProcessAudio::new`].
    fn process_audio(&self, frame: AudioFrame) -> ProcessAudio<'_>;

    /// Sends audio straight to the user (e.g. a prompt), bypassing the agent.
    async fn send_audio(&self, frame: AudioFrame) -> Result<()>;

    /// Takes the stream of audio going to the user (the agent's replies), in
    /// the session's output format.
    ///
    /// There is one stream per session: the first call takes it, later calls
    /// fail with `PipelineError`.
    fn receive_audio(&self) -> Result<AudioReceiver>;

    /// Sends text in place of speech: it is treated as the user's final
    /// transcript of a turn (useful to test agent logic without audio).
    async fn send_text(&self, text: &str) -> Result<()>;

    /// Subscribes to the session's events (state changes, transcripts, agent
    /// text, interruptions, errors, per-turn latency). Each subscriber gets
    /// every event from now on; one that falls behind loses the oldest ones
    /// (counted in metrics) rather than slowing the session.
    fn events(&self) -> SessionEvents;

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
