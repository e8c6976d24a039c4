//! The session contract: one user's conversation with the agent.
//!
//! With it, the small value types a session shares with the backend that
//! made it: the [`events`] it emits and the state of a connection
//! ([`ConnectionState`]).

pub mod events;
pub mod store;

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::agent::Agent;
use crate::audio::AudioFrame;
use crate::config::Secret;
use crate::error::Result;

pub use events::{SessionEvent, SessionEvents, TurnLatency};

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

/// The state of a connection to a service: a backend's
/// ([`VoiceBackend::connection_state`](crate::backend::VoiceBackend::connection_state)),
/// or a session's link ([`SessionEvent::Connection`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    /// Not connected (before `start`, after `stop`).
    #[default]
    Disconnected,
    /// Connecting for the first time.
    Connecting,
    /// Connected and serving.
    Connected,
    /// The connection was lost and is being re-established with backoff.
    Reconnecting,
    /// Connecting failed for good (after `max_retries`).
    Error,
}

impl ConnectionState {
    /// The snake_case name, e.g. `"reconnecting"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Disconnected => "disconnected",
            ConnectionState::Connecting => "connecting",
            ConnectionState::Connected => "connected",
            ConnectionState::Reconnecting => "reconnecting",
            ConnectionState::Error => "error",
        }
    }
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
/// Active sessions persist when the backend has a session store
/// ([`VoiceBackend::set_session_store`](crate::backend::VoiceBackend::set_session_store))
/// and the data-retention hook allows
/// [`DataKind::SessionState`](crate::hooks::DataKind::SessionState); completed
/// sessions are ephemeral: closing a session (its `stop`, or the backend's
/// `close_session`) deletes its record. A backend's own `stop` keeps the
/// records of the sessions it stops, so the next `start` restores them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PersistenceStatus {
    /// Not kept: no store, the retention hook declined, or the session
    /// completed (it was closed and its record deleted).
    #[default]
    Ephemeral,
    /// A change is waiting to be written (the session was just opened or
    /// changed and the write has not finished yet).
    Pending,
    /// Written; a restart restores the session as of `saved_at`.
    Persisted {
        /// When the last write finished.
        saved_at: SystemTime,
    },
    /// The last write failed; the session goes on, the write is retried with
    /// backoff, and the backend's health is `degraded` until it succeeds.
    Failed {
        /// Why, without secrets.
        reason: String,
    },
}

/// A bounded channel for a session's outgoing audio whose queued frames can be
/// flushed from the sending side (barge-in discards reply audio at once, even
/// frames already handed to the channel), and which the sending side can end
/// while it still holds its sender ([`AudioSender::close`]: the session has
/// stopped).
pub fn audio_channel(capacity: usize) -> (AudioSender, AudioReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let state = Arc::new(ChannelState {
        epoch: AtomicU64::new(0),
        refusing: AtomicU8::new(0),
    });
    (
        AudioSender {
            tx,
            state: state.clone(),
        },
        AudioReceiver {
            rx: Some(rx),
            state,
            ending: false,
            home: None,
            returned: false,
        },
    )
}

/// What both ends of an [`audio_channel`] share.
#[derive(Debug)]
struct ChannelState {
    /// Bumped by [`AudioSender::flush`]: frames sent before are skipped.
    epoch: AtomicU64,
    /// Why frames are refused: [`CLOSED`], [`UNHEARD`] (one load per frame
    /// checks both).
    refusing: AtomicU8,
}

/// Set by [`AudioSender::close`] in [`ChannelState::refusing`]: the stream
/// has ended.
const CLOSED: u8 = 1;
/// Set in [`ChannelState::refusing`] while the receiver waits in its
/// [`AudioSlot`], handed back by its holder: nobody listens.
const UNHEARD: u8 = 2;

/// What an [`audio_channel`] carries.
#[derive(Debug)]
enum Queued {
    /// A frame, sent when [`ChannelState::epoch`] was this number.
    Frame(u64, AudioFrame),
    /// Sent by [`AudioSender::close`] to wake a receiver waiting for a frame.
    Closed,
}

/// The sending end of [`audio_channel`].
#[derive(Clone, Debug)]
pub struct AudioSender {
    tx: mpsc::Sender<Queued>,
    state: Arc<ChannelState>,
}

/// Why [`AudioSender::try_send`] did not queue a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum AudioSendError {
    /// The receiver is not keeping up and the channel is full.
    Full,
    /// The receiver is gone (or back in its [`AudioSlot`], nobody holding
    /// it), or the stream was closed.
    Closed,
}

impl AudioSender {
    /// Queues a frame without waiting.
    pub fn try_send(&self, frame: AudioFrame) -> std::result::Result<(), AudioSendError> {
        if self.state.refusing.load(Ordering::Acquire) != 0 {
            return Err(AudioSendError::Closed);
        }
        let epoch = self.state.epoch.load(Ordering::Acquire);
        self.tx
            .try_send(Queued::Frame(epoch, frame))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => AudioSendError::Full,
                mpsc::error::TrySendError::Closed(_) => AudioSendError::Closed,
            })
    }

    /// Queues a frame, waiting for room.
    pub async fn send(&self, frame: AudioFrame) -> std::result::Result<(), AudioSendError> {
        if self.state.refusing.load(Ordering::Acquire) != 0 {
            return Err(AudioSendError::Closed);
        }
        let epoch = self.state.epoch.load(Ordering::Acquire);
        self.tx
            .send(Queued::Frame(epoch, frame))
            .await
            .map_err(|_| AudioSendError::Closed)
    }

    /// Discards every frame queued so far: the receiver skips them.
    pub fn flush(&self) {
        self.state.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Ends the stream, though senders remain: the receiver hands out the
    /// frames already queued, then `None`; frames sent from now on are
    /// refused ([`AudioSendError::Closed`]). Closing twice does nothing more.
    pub fn close(&self) {
        if self.state.refusing.fetch_or(CLOSED, Ordering::AcqRel) & CLOSED == 0 {
            // Wakes a receiver waiting for a frame. A full channel needs no
            // wake-up: its receiver has frames to take, and sees the close
            // when it next asks for one.
            let _ = self.tx.try_send(Queued::Closed);
        }
    }

    /// Whether frames are refused: the receiver is gone (or back in its
    /// [`AudioSlot`], nobody holding it), or the stream was closed
    /// ([`AudioSender::close`]).
    pub fn is_closed(&self) -> bool {
        self.state.refusing.load(Ordering::Acquire) != 0 || self.tx.is_closed()
    }
}

/// The receiving end of a session's outgoing (reply) audio.
///
/// One taken from an [`AudioSlot`] (as
/// [`VoiceSession::receive_audio`] hands it out) goes back to the slot when
/// dropped, so it can be taken again; one of a bare [`audio_channel`] ends
/// the channel when dropped.
#[derive(Debug)]
pub struct AudioReceiver {
    /// Always set; taken only by `Drop`, to hand the channel back.
    rx: Option<mpsc::Receiver<Queued>>,
    state: Arc<ChannelState>,
    /// The stream was closed and the channel told so: it hands out what it
    /// holds, then ends.
    ending: bool,
    /// The slot it was taken from, which it returns to when dropped.
    home: Option<Weak<Mutex<Option<AudioReceiver>>>>,
    /// It came back to its slot from a holder: what is queued while it
    /// waits there is for nobody.
    returned: bool,
}

impl AudioReceiver {
    /// The next frame, or `None` once the session has stopped (or was
    /// dropped) and the frames queued before have been taken.
    pub async fn recv(&mut self) -> Option<AudioFrame> {
        loop {
            self.see_close();
            let queued = self.rx.as_mut()?.recv().await?;
            if let Some(frame) = self.fresh(queued) {
                return Some(frame);
            }
        }
    }

    /// A frame if one is ready now (`None` too once the stream has ended).
    pub fn try_recv(&mut self) -> Option<AudioFrame> {
        loop {
            self.see_close();
            let queued = self.rx.as_mut()?.try_recv().ok()?;
            if let Some(frame) = self.fresh(queued) {
                return Some(frame);
            }
        }
    }

    /// The frame in `queued`, unless it was flushed (or is the close's
    /// wake-up).
    fn fresh(&self, queued: Queued) -> Option<AudioFrame> {
        match queued {
            Queued::Frame(epoch, frame) if epoch == self.state.epoch.load(Ordering::Acquire) => {
                Some(frame)
            }
            _ => None,
        }
    }

    /// Once the stream was closed, closes the channel: it refuses new frames
    /// and ends after the ones it holds.
    fn see_close(&mut self) {
        if !self.ending
            && self.state.refusing.load(Ordering::Acquire) & CLOSED != 0
            && let Some(rx) = self.rx.as_mut()
        {
            rx.close();
            self.ending = true;
        }
    }

    /// Discards every frame queued now (frames that waited while nobody
    /// listened).
    fn discard_queued(&mut self) {
        while self.try_recv().is_some() {}
    }
}

impl Drop for AudioReceiver {
    /// Hands the channel back to the slot it was taken from, if the slot
    /// (its session) is still there.
    fn drop(&mut self) {
        let Some(slot) = self.home.take().and_then(|home| home.upgrade()) else {
            return;
        };
        let Some(rx) = self.rx.take() else { return };
        // Nobody listens from now on: frames are refused until the next
        // holder takes it, and what is queued was meant for the one that left.
        self.state.refusing.fetch_or(UNHEARD, Ordering::AcqRel);
        let mut back = AudioReceiver {
            rx: Some(rx),
            state: self.state.clone(),
            ending: self.ending,
            home: None,
            returned: true,
        };
        back.discard_queued();
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(back);
    }
}

/// Where a session keeps its reply audio stream ([`AudioReceiver`]) while
/// nobody holds it: one holder at a time takes it ([`AudioSlot::take`]), and
/// the receiver returns here when that holder drops it, for the next one (a
/// client that reconnects to the session).
///
/// Once a holder has handed the receiver back, nobody listens until the
/// next one takes it: the frames the session sends meanwhile are refused
/// ([`AudioSendError::Closed`]) rather than queued, so the session never
/// waits for a listener and holds no audio for one. Frames that were queued
/// for the holder that left are discarded. (The receiver put in the slot
/// first, by [`AudioSlot::new`], takes frames before anyone holds it, as a
/// bare channel does.)
///
/// ```
/// # use voice_backends::session::{AudioSlot, audio_channel};
/// let (_tx, rx) = audio_channel(8);
/// let slot = AudioSlot::new(rx);
/// let held = slot.take().expect("the first holder takes it");
/// assert!(slot.take().is_none(), "one holder at a time");
/// drop(held);
/// assert!(slot.take().is_some(), "dropped, it came back");
/// ```
#[derive(Debug)]
pub struct AudioSlot {
    parked: Arc<Mutex<Option<AudioReceiver>>>,
}

impl AudioSlot {
    /// A slot holding `receiver`.
    pub fn new(receiver: AudioReceiver) -> Self {
        AudioSlot {
            parked: Arc::new(Mutex::new(Some(receiver))),
        }
    }

    /// The receiver, unless someone holds it now. It returns to this slot
    /// when dropped (while the slot exists); what was queued for an earlier
    /// holder is discarded.
    pub fn take(&self) -> Option<AudioReceiver> {
        let mut receiver = self
            .parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        if receiver.returned {
            receiver.discard_queued();
            receiver
                .state
                .refusing
                .fetch_and(!UNHEARD, Ordering::AcqRel);
        }
        receiver.home = Some(Arc::downgrade(&self.parked));
        Some(receiver)
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
    /// There is one stream per session, and one holder of it at a time:
    /// while a receiver is held, further calls fail with `PipelineError`.
    /// The built-in runtime's sessions keep it in an [`AudioSlot`]: a
    /// receiver dropped while its session lives goes back to the session,
    /// and the next call takes it again (a client that reconnects picks up
    /// the reply audio; what was queued while nobody held it is discarded).
    /// The stream ends ([`AudioReceiver::recv`] gives `None`) once the
    /// session has stopped, however it was stopped, after the audio it
    /// already holds (a graceful stop's last reply); one taken after the
    /// stop ends at once.
    fn receive_audio(&self) -> Result<AudioReceiver>;

    /// Sends text in place of speech: it is treated as the user's final
    /// transcript of a turn (useful to test agent logic without audio).
    async fn send_text(&self, text: &str) -> Result<()>;

    /// Subscribes to the session's events (state changes, transcripts, agent
    /// text, interruptions, errors, per-turn latency). Each subscriber gets
    /// every event from now on; one that falls behind loses the oldest ones
    /// (counted in metrics) rather than slowing the session. When the
    /// session has a link to its provider's service (one that runs pipeline
    /// stages itself, as Pipecat does), the first event is the link's
    /// current state ([`SessionEvent::Connection`]),
    /// since the link connects when the session is created, before anyone
    /// can subscribe.
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

    /// What the provider published for the application about this session
    /// (a room, the user's join token, a server URL, a call id); empty by
    /// default.
    fn info(&self) -> SessionInfo {
        SessionInfo::default()
    }

    /// The token that lets this session's user take the session up again
    /// after a restart or on another instance sharing the session store
    /// ([`VoiceBackend::resume_session`](crate::backend::VoiceBackend::resume_session)):
    /// set when the session is persisted, `None` otherwise. Hand it to the
    /// session's own user only (`serve` puts it in `ready`); the store keeps
    /// only its hash.
    fn resume_token(&self) -> Option<Secret> {
        None
    }
}

/// Values a provider publishes on a session for the application: a room
/// name, the user's join token, a server URL, a call id. Cheap to clone
/// (every clone is the same table). Values marked secret
/// ([`SessionInfo::set_secret`]) show as `[redacted]` in `Debug` and in
/// [`SessionInfo::redacted`]; [`SessionInfo::get`] hands them out, for the
/// session's own client.
#[derive(Clone, Default)]
pub struct SessionInfo {
    values: Arc<std::sync::RwLock<BTreeMap<String, InfoValue>>>,
}

#[derive(Clone)]
enum InfoValue {
    Plain(String),
    Secret(Secret),
}

impl SessionInfo {
    /// Publishes `key` = `value`.
    pub fn set(&self, key: impl Into<String>, value: impl Into<String>) {
        self.write()
            .insert(key.into(), InfoValue::Plain(value.into()));
    }

    /// Publishes `key` = `value`, a secret (a join token).
    pub fn set_secret(&self, key: impl Into<String>, value: Secret) {
        self.write().insert(key.into(), InfoValue::Secret(value));
    }

    /// The value of `key`, secret or not.
    pub fn get(&self, key: &str) -> Option<String> {
        self.read().get(key).map(|v| match v {
            InfoValue::Plain(s) => s.clone(),
            InfoValue::Secret(s) => s.expose().to_owned(),
        })
    }

    /// Every value with whether it is secret, secrets exposed: what a
    /// session store keeps to give the provider back after a restart.
    pub fn entries(&self) -> Vec<(String, String, bool)> {
        self.read()
            .iter()
            .map(|(k, v)| match v {
                InfoValue::Plain(s) => (k.clone(), s.clone(), false),
                InfoValue::Secret(s) => (k.clone(), s.expose().to_owned(), true),
            })
            .collect()
    }

    /// Whether nothing is published.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Every value, secrets included: what the session's own client is
    /// given (`serve`'s `ready` message).
    pub fn exposed(&self) -> BTreeMap<String, String> {
        self.read()
            .keys()
            .filter_map(|k| Some((k.clone(), self.get(k)?)))
            .collect()
    }

    /// Every value, secrets as `[redacted]`: what logs may show.
    pub fn redacted(&self) -> BTreeMap<String, String> {
        self.read()
            .iter()
            .map(|(k, v)| {
                let shown = match v {
                    InfoValue::Plain(s) => s.clone(),
                    InfoValue::Secret(_) => crate::config::REDACTED.to_owned(),
                };
                (k.clone(), shown)
            })
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, InfoValue>> {
        self.values
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, InfoValue>> {
        self.values
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for SessionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.redacted()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::AudioFormat;
    use std::sync::atomic::AtomicBool;

    fn frame(byte: u8) -> AudioFrame {
        AudioFrame::new(AudioFormat::PCM16_16K_MONO, vec![byte; 640]).unwrap()
    }

    /// A closed stream hands out the frames queued before the close (not the
    /// flushed ones), then ends; frames sent after it are refused.
    #[tokio::test]
    async fn a_closed_stream_hands_out_what_it_holds_then_ends() {
        let (tx, mut rx) = audio_channel(8);
        tx.try_send(frame(1)).unwrap();
        tx.flush();
        tx.try_send(frame(2)).unwrap();
        tx.send(frame(3)).await.unwrap();
        tx.close();
        tx.close();
        assert!(tx.is_closed());
        assert_eq!(tx.try_send(frame(4)), Err(AudioSendError::Closed));
        assert_eq!(tx.send(frame(4)).await, Err(AudioSendError::Closed));
        assert_eq!(rx.recv().await.map(|f| f.data()[0]), Some(2));
        assert_eq!(rx.try_recv().map(|f| f.data()[0]), Some(3));
        assert!(rx.recv().await.is_none());
        assert!(rx.try_recv().is_none());
    }

    /// The close wakes a receiver waiting for a frame, even one whose `recv`
    /// future was polled once and dropped (a caller polling it by hand).
    #[tokio::test]
    async fn the_close_wakes_a_receiver_waiting_for_a_frame() {
        struct Flag(AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let (tx, mut rx) = audio_channel(8);
        let woken = Arc::new(Flag(AtomicBool::new(false)));
        let waker = std::task::Waker::from(woken.clone());
        let polled = std::pin::pin!(rx.recv()).poll(&mut Context::from_waker(&waker));
        assert!(polled.is_pending());
        tx.close();
        assert!(
            woken.0.load(Ordering::SeqCst),
            "the close woke the receiver"
        );
        assert!(rx.recv().await.is_none());

        let (tx, mut rx) = audio_channel(8);
        let waiting = tokio::spawn(async move { rx.recv().await.is_none() });
        tokio::task::yield_now().await;
        tx.close();
        assert!(waiting.await.unwrap(), "the waiting receiver ended");
    }

    /// A channel full at the close (no room for the wake-up) still ends once
    /// its frames are taken.
    #[tokio::test]
    async fn a_full_channel_ends_after_its_frames() {
        let (tx, mut rx) = audio_channel(1);
        tx.try_send(frame(1)).unwrap();
        assert_eq!(tx.try_send(frame(2)), Err(AudioSendError::Full));
        tx.close();
        assert_eq!(rx.recv().await.map(|f| f.data()[0]), Some(1));
        assert!(rx.recv().await.is_none());
    }

    /// A receiver taken from a slot goes back to it when dropped; the next
    /// holder gets what is sent from then on, not what waited for nobody;
    /// the stream still ends after a close; with the slot gone, dropping
    /// the receiver just ends it.
    #[tokio::test]
    async fn a_slot_hands_its_receiver_out_one_holder_at_a_time() {
        let (tx, rx) = audio_channel(4);
        tx.try_send(frame(1)).unwrap();
        let slot = AudioSlot::new(rx);
        let mut first = slot.take().unwrap();
        assert!(slot.take().is_none(), "held: not handed out twice");
        assert_eq!(first.recv().await.map(|f| f.data()[0]), Some(1));
        tx.try_send(frame(2)).unwrap();
        drop(first);
        // Nobody listens: frames are refused at once, never queued.
        assert!(tx.is_closed());
        assert_eq!(tx.try_send(frame(3)), Err(AudioSendError::Closed));
        assert_eq!(tx.send(frame(4)).await, Err(AudioSendError::Closed));
        let mut second = slot.take().expect("back in the slot");
        assert!(!tx.is_closed(), "heard again");
        assert!(
            second.try_recv().is_none(),
            "what was queued for the first is discarded"
        );
        tx.try_send(frame(8)).unwrap();
        assert_eq!(second.recv().await.map(|f| f.data()[0]), Some(8));
        drop(second);
        tx.close();
        let mut third = slot.take().unwrap();
        assert!(third.recv().await.is_none(), "closed: it ends");
        drop(slot);
        drop(third);
        assert!(tx.is_closed());
    }
}
