//! Cartesia's text-to-speech socket (`/tts/websocket`): one connection
//! shared by every session of a backend (or of one `[components.cartesia]`
//! configuration), multiplexed by `context_id` ([`TtsSocket`]), and the
//! speaker that speaks one session's replies on it ([`Speaker`]).
//!
//! A reply is one context. Each piece of it (a streamed reply is cut into
//! sentences) goes out as a `continue: true` request followed by a flush;
//! the piece is spoken once its `flush_done` comes, and the next piece
//! continues the same context, so the voice keeps its prosody across
//! sentences. The context ends (`continue: false`) when the user's next turn
//! ends, when no piece follows within `tts.context_idle`, or when the
//! session ends; a barge-in cancels it (`{"context_id", "cancel": true}`).
//!
//! The socket connects when the backend starts (or at the first piece) and
//! again, under the retry policy, at the first piece after it was lost; a
//! piece whose connection drops before any of its audio came is sent once
//! more on a new connection, one that drops mid-audio fails the piece.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use super::CartesiaConfig;
use super::protocol::{
    self, GenerationRequest, OutputFormat, TTS_SAMPLE_RATES, TtsEvent, Voice, WireError,
};
use crate::audio::{AudioEncoding, AudioFormat, AudioFrame, FormatFollower};
use crate::error::{BackendError, ErrorCode, Result};
use crate::pipeline::TextToSpeech;
use crate::runtime::{Dial, LinkCounters, RetryPolicy, WsMessage, WsStream};

/// How messages name the service.
pub(super) const SERVICE: &str = "Cartesia's text-to-speech";

/// What the socket hands one context.
#[derive(Debug)]
enum CtxEvent {
    Audio(Vec<u8>),
    FlushDone,
    Done,
    Error(WireError),
    Lost(String),
}

#[derive(Default)]
struct Conn {
    /// Where requests go while a connection is up.
    out: Option<mpsc::UnboundedSender<WsMessage>>,
    /// Which connection this is (a lost one's task clears only its own).
    generation: u64,
    contexts: HashMap<String, mpsc::UnboundedSender<CtxEvent>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The shared text-to-speech socket: one connection, many contexts.
pub struct TtsSocket {
    dial: Dial,
    retry: RetryPolicy,
    write_timeout: Duration,
    counters: Arc<LinkCounters>,
    conn: Mutex<Conn>,
    connecting: tokio::sync::Mutex<()>,
    logged_malformed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for TtsSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtsSocket")
            .field("dial", &self.dial)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl TtsSocket {
    /// A socket that dials with `dial`, reconnects under `retry`, and gives
    /// up on a write Cartesia does not take within `write_timeout`; it
    /// counts in `counters`.
    pub fn new(
        dial: Dial,
        retry: RetryPolicy,
        write_timeout: Duration,
        counters: Arc<LinkCounters>,
    ) -> Arc<TtsSocket> {
        Arc::new(TtsSocket {
            dial,
            retry,
            write_timeout,
            counters,
            conn: Mutex::default(),
            connecting: tokio::sync::Mutex::new(()),
            logged_malformed: Default::default(),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a connection is up.
    pub fn is_connected(&self) -> bool {
        self.live().is_some()
    }

    fn live(&self) -> Option<mpsc::UnboundedSender<WsMessage>> {
        self.conn().out.clone().filter(|o| !o.is_closed())
    }

    /// Connects once, unless a connection is up (the backend's start, which
    /// the runtime retries).
    ///
    /// # Errors
    ///
    /// [`Dial::connect`]'s.
    pub async fn connect(self: &Arc<Self>) -> Result<()> {
        let _one = self.connecting.lock().await;
        if self.live().is_none() {
            let ws = self.dial.connect(SERVICE).await?;
            self.start(ws);
        }
        Ok(())
    }

    /// The connection's writer, connecting under the retry policy first
    /// when none is up.
    async fn ensure(self: &Arc<Self>) -> Result<mpsc::UnboundedSender<WsMessage>> {
        if let Some(out) = self.live() {
            return Ok(out);
        }
        let _one = self.connecting.lock().await;
        if let Some(out) = self.live() {
            return Ok(out);
        }
        let ws = self
            .retry
            .run(
                "cartesia.tts_connect",
                SERVICE,
                || self.dial.connect(SERVICE),
                |retry, delay, e| {
                    tracing::warn!(
                        retry,
                        "connecting to {SERVICE} failed, retrying in {delay:?}: {}",
                        e.message
                    );
                },
            )
            .await?;
        Ok(self.start(ws))
    }

    fn start(self: &Arc<Self>, ws: WsStream) -> mpsc::UnboundedSender<WsMessage> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut conn = self.conn();
        if conn.generation > 0 {
            self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        conn.generation += 1;
        conn.out = Some(tx.clone());
        let task = tokio::spawn(run(Arc::downgrade(self), ws, rx, conn.generation));
        if let Some(old) = conn.task.replace(task) {
            old.abort();
        }
        tx
    }

    /// Registers context `id` on the connection (connecting first if need
    /// be).
    async fn register(self: &Arc<Self>, id: String) -> Result<Registration> {
        for _ in 0..2 {
            let out = self.ensure().await?;
            let (tx, events) = mpsc::unbounded_channel();
            let mut conn = self.conn();
            // Lost between connecting and now: connect again.
            if conn.out.as_ref().is_some_and(|o| o.same_channel(&out)) && !out.is_closed() {
                conn.contexts.insert(id.clone(), tx);
                return Ok(Registration {
                    socket: self.clone(),
                    id,
                    out,
                    events,
                });
            }
        }
        Err(BackendError::new(
            "cartesia.tts",
            ErrorCode::ConnectionFailed,
            format!("{SERVICE} dropped each new connection at once"),
        ))
    }

    fn unregister(&self, id: &str) {
        self.conn().contexts.remove(id);
    }

    /// Closes the connection: contexts in flight hear it is lost.
    pub fn close(&self) {
        let generation = {
            let mut conn = self.conn();
            if let Some(task) = conn.task.take() {
                task.abort();
            }
            conn.generation
        };
        self.lost(generation, "the backend stopped");
    }

    fn lost(&self, generation: u64, cause: &str) {
        let mut conn = self.conn();
        if conn.generation != generation {
            return;
        }
        conn.out = None;
        for (_, tx) in conn.contexts.drain() {
            let _ = tx.send(CtxEvent::Lost(cause.to_owned()));
        }
    }

    fn route(&self, text: &str) {
        let event = match protocol::decode_tts(text) {
            Ok(e) => e,
            Err(what) => return self.malformed(&what),
        };
        let (id, event, last) = match event {
            TtsEvent::Chunk {
                context_id,
                audio,
                done,
            } => {
                if done {
                    self.deliver(&context_id, CtxEvent::Audio(audio), false);
                    (context_id, CtxEvent::Done, true)
                } else {
                    (context_id, CtxEvent::Audio(audio), false)
                }
            }
            TtsEvent::FlushDone { context_id, .. } => (context_id, CtxEvent::FlushDone, false),
            TtsEvent::Done { context_id } => (context_id, CtxEvent::Done, true),
            TtsEvent::Timestamps { .. } => return,
            TtsEvent::Error(e) => match e.context_id.clone() {
                Some(id) => (id, CtxEvent::Error(e), true),
                None => {
                    tracing::warn!("{SERVICE} reports an error: {}", e.describe());
                    return;
                }
            },
        };
        self.deliver(&id, event, last);
    }

    /// Hands `event` to context `id`; audio of a context that is gone
    /// (cancelled, ended) is dropped.
    fn deliver(&self, id: &str, event: CtxEvent, last: bool) {
        let mut conn = self.conn();
        if let Some(tx) = conn.contexts.get(id) {
            let _ = tx.send(event);
            if last {
                conn.contexts.remove(id);
            }
        }
    }

    fn malformed(&self, what: &str) {
        self.counters.malformed.fetch_add(1, Ordering::Relaxed);
        if !self.logged_malformed.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "skipping a message from {SERVICE}: {what} (further ones are only counted)"
            );
        }
    }
}

/// The connection's task: writes requests, routes what Cartesia says to
/// its contexts, and tells them when the connection is lost. Once the
/// socket and every context are gone, it writes what is still queued (a
/// last cancel) and closes.
async fn run(
    socket: Weak<TtsSocket>,
    mut ws: WsStream,
    mut out: mpsc::UnboundedReceiver<WsMessage>,
    generation: u64,
) {
    let Some((counters, write_timeout)) = socket
        .upgrade()
        .map(|s| (s.counters.clone(), s.write_timeout))
    else {
        return;
    };
    let cause = loop {
        tokio::select! {
            message = out.recv() => {
                let Some(message) = message else {
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    return;
                };
                match tokio::time::timeout(write_timeout, ws.send(message)).await {
                    Ok(Ok(())) => {
                        counters.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => break e.to_string(),
                    Err(_) => {
                        break format!(
                            "it took nothing for {}",
                            humantime::format_duration(write_timeout)
                        )
                    }
                }
            }
            message = ws.next() => match message {
                Some(Ok(WsMessage::Text(text))) => {
                    counters.received.fetch_add(1, Ordering::Relaxed);
                    let Some(s) = socket.upgrade() else { return };
                    s.route(text.as_str());
                }
                Some(Ok(WsMessage::Binary(b))) => {
                    counters.received.fetch_add(1, Ordering::Relaxed);
                    let Some(s) = socket.upgrade() else { return };
                    s.malformed(&format!("a {}-byte binary message (the service sends JSON text)", b.len()));
                }
                Some(Ok(WsMessage::Close(frame))) => {
                    break match frame {
                        Some(f) if !f.reason.is_empty() => {
                            format!("{SERVICE} closed the connection (code {}: {})", u16::from(f.code), f.reason)
                        }
                        Some(f) => format!("{SERVICE} closed the connection (code {})", u16::from(f.code)),
                        None => format!("{SERVICE} closed the connection"),
                    };
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break e.to_string(),
                None => break "the connection ended".to_owned(),
            },
        }
    };
    tracing::warn!("lost {SERVICE}: {cause}");
    if let Some(s) = socket.upgrade() {
        s.lost(generation, &cause);
    }
}

/// One context's place on the socket; dropping it forgets the context.
struct Registration {
    socket: Arc<TtsSocket>,
    id: String,
    out: mpsc::UnboundedSender<WsMessage>,
    events: mpsc::UnboundedReceiver<CtxEvent>,
}

impl Registration {
    fn send(&self, text: String) -> bool {
        self.out.send(WsMessage::Text(text.into())).is_ok()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.socket.unregister(&self.id);
    }
}

/// How a speaker's requests are made.
#[derive(Clone, Debug)]
pub struct VoiceSettings {
    /// `model_id`.
    pub model_id: String,
    /// The voice's id.
    pub voice_id: String,
    /// `language`, if set.
    pub language: Option<String>,
    /// The sample rate asked for when the session's own is not one
    /// Cartesia offers.
    pub sample_rate: u32,
    /// `max_buffer_delay_ms`, if set.
    pub max_buffer_delay_ms: Option<u32>,
    /// How long a reply's context stays open for its next piece.
    pub context_idle: Duration,
    /// How long a piece may wait for each of Cartesia's answers.
    pub reply_timeout: Duration,
}

struct Open {
    reg: Registration,
    rate: u32,
}

struct SpeakerState {
    socket: Arc<TtsSocket>,
    voice: Arc<VoiceSettings>,
    prefix: String,
    next: AtomicU64,
    /// The reply's context between two pieces.
    current: Mutex<Option<Open>>,
    /// Bumped by every piece and every end, so a pending idle close that
    /// finds it changed does nothing.
    epoch: AtomicU64,
}

impl SpeakerState {
    fn request(
        &self,
        context_id: &str,
        rate: u32,
        transcript: &str,
        more: bool,
        flush: bool,
    ) -> String {
        let v = &*self.voice;
        GenerationRequest {
            model_id: &v.model_id,
            transcript,
            voice: Voice {
                mode: "id",
                id: &v.voice_id,
            },
            output_format: OutputFormat::pcm16(rate),
            context_id,
            continue_: more,
            flush: flush.then_some(true),
            language: v.language.as_deref(),
            max_buffer_delay_ms: v.max_buffer_delay_ms,
        }
        .to_json()
    }

    fn take_current(&self) -> Option<Open> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Ends the reply's context, if one is open: no more input.
    fn end_reply(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let Some(open) = self.take_current() {
            let end = self.request(&open.reg.id, open.rate, "", false, false);
            open.reg.send(end);
        }
    }

    /// Cancels the reply's context, if one is open.
    fn cancel(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let Some(open) = self.take_current() {
            open.reg.send(protocol::cancel_request(&open.reg.id));
        }
    }

    async fn open_context(&self, rate: u32) -> Result<Open> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let reg = self.socket.register(format!("{}-{n}", self.prefix)).await?;
        Ok(Open { reg, rate })
    }
}

/// Speaks one session's replies on a shared [`TtsSocket`] (see the
/// [provider docs](crate::providers::cartesia)). It is the provider's
/// [`ServiceLink::speaker`](crate::runtime::ServiceLink::speaker) and what
/// the `cartesia` text-to-speech component makes for each session.
pub struct Speaker {
    state: Arc<SpeakerState>,
}

impl std::fmt::Debug for Speaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Speaker")
            .field("prefix", &self.state.prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for Speaker {
    fn drop(&mut self) {
        self.state.end_reply();
    }
}

impl Speaker {
    /// A speaker on `socket` whose context ids start with `prefix`.
    pub fn new(socket: Arc<TtsSocket>, voice: Arc<VoiceSettings>, prefix: String) -> Speaker {
        Speaker {
            state: Arc::new(SpeakerState {
                socket,
                voice,
                prefix,
                next: AtomicU64::new(0),
                current: Mutex::new(None),
                epoch: AtomicU64::new(0),
            }),
        }
    }

    /// The user's turn ended: the reply before it is over; its context ends.
    pub fn end_reply(&self) {
        self.state.end_reply();
    }

    /// The user barged in: the reply's context is cancelled.
    pub fn cancel(&self) {
        self.state.cancel();
    }

    /// Keeps `open` for the reply's next piece, ending it after
    /// `context_idle` without one.
    fn keep(&self, open: Open) {
        let epoch = self.state.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        *self
            .state
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(open);
        let state = self.state.clone();
        let idle = state.voice.context_idle;
        tokio::spawn(async move {
            tokio::time::sleep(idle).await;
            if state.epoch.load(Ordering::Acquire) == epoch {
                state.end_reply();
            }
        });
    }
}

/// A piece in flight: dropped before it is done (a barge-in drops the
/// reply), it cancels its context.
struct InFlight<'a> {
    open: Option<Open>,
    state: &'a SpeakerState,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            self.state.epoch.fetch_add(1, Ordering::AcqRel);
            open.reg.send(protocol::cancel_request(&open.reg.id));
        }
    }
}

/// How listening to a piece ended.
enum Heard {
    /// `flush_done`: the context may go on.
    Flushed,
    /// `done`: the context is over.
    Done,
    /// The session stopped taking audio.
    OutGone,
    /// Cartesia refused the piece.
    Refused(WireError),
    /// The connection dropped; whether audio had come.
    Lost { why: String, heard: bool },
    /// Nothing came in time.
    TimedOut,
    /// Audio that is not whole samples or cannot be converted.
    BadAudio(BackendError),
}

impl InFlight<'_> {
    async fn listen(
        &mut self,
        wire: AudioFormat,
        format: AudioFormat,
        out: &mpsc::Sender<AudioFrame>,
        patience: Duration,
    ) -> Heard {
        let Some(open) = self.open.as_mut() else {
            return Heard::Done;
        };
        let mut converter = FormatFollower::default();
        let mut odd: Option<u8> = None;
        let mut heard = false;
        loop {
            let event = match tokio::time::timeout(patience, open.reg.events.recv()).await {
                Err(_) => return Heard::TimedOut,
                Ok(None) => {
                    return Heard::Lost {
                        why: "the socket's task ended".into(),
                        heard,
                    };
                }
                Ok(Some(e)) => e,
            };
            match event {
                CtxEvent::Audio(bytes) => {
                    heard = true;
                    let mut data = Vec::with_capacity(bytes.len() + 1);
                    data.extend(odd.take());
                    data.extend_from_slice(&bytes);
                    if data.len() % 2 == 1 {
                        odd = data.pop();
                    }
                    if data.is_empty() {
                        continue;
                    }
                    let frame = match AudioFrame::new(wire, data)
                        .and_then(|f| converter.convert(f, format))
                    {
                        Ok(Some(f)) => f,
                        Ok(None) => continue,
                        Err(e) => return Heard::BadAudio(e),
                    };
                    if out.send(frame).await.is_err() {
                        return Heard::OutGone;
                    }
                }
                CtxEvent::FlushDone => return Heard::Flushed,
                CtxEvent::Done => return Heard::Done,
                CtxEvent::Error(e) => return Heard::Refused(e),
                CtxEvent::Lost(why) => return Heard::Lost { why, heard },
            }
        }
    }
}

#[async_trait]
impl TextToSpeech for Speaker {
    async fn synthesize(
        &self,
        text: &str,
        format: AudioFormat,
        out: &mpsc::Sender<AudioFrame>,
    ) -> Result<()> {
        const OP: &str = "cartesia.synthesize";
        let state = &*self.state;
        state.epoch.fetch_add(1, Ordering::AcqRel);
        let rate = if format.encoding == AudioEncoding::PcmS16Le
            && format.channels == 1
            && TTS_SAMPLE_RATES.contains(&format.sample_rate)
        {
            format.sample_rate
        } else {
            state.voice.sample_rate
        };
        let wire = AudioFormat::new(AudioEncoding::PcmS16Le, rate, 1);
        let mut reused = match state.take_current() {
            Some(open) if open.rate == rate => Some(open),
            Some(other) => {
                other
                    .reg
                    .send(state.request(&other.reg.id, other.rate, "", false, false));
                None
            }
            None => None,
        };
        let mut resent = false;
        loop {
            let open = match reused.take() {
                Some(open) => open,
                None => state.open_context(rate).await?,
            };
            let mut flight = InFlight {
                open: Some(open),
                state,
            };
            let sent = flight.open.as_ref().is_some_and(|o| {
                o.reg
                    .send(state.request(&o.reg.id, rate, text, true, false))
                    && o.reg.send(state.request(&o.reg.id, rate, "", true, true))
            });
            let heard = if sent {
                flight
                    .listen(wire, format, out, state.voice.reply_timeout)
                    .await
            } else {
                Heard::Lost {
                    why: "the connection was gone".into(),
                    heard: false,
                }
            };
            match heard {
                Heard::Flushed => {
                    if let Some(open) = flight.open.take() {
                        self.keep(open);
                    }
                    return Ok(());
                }
                Heard::Done => {
                    flight.open.take();
                    return Ok(());
                }
                Heard::OutGone => return Ok(()),
                Heard::Refused(e) => {
                    flight.open.take();
                    return Err(BackendError::new(
                        OP,
                        e.code(),
                        format!("{SERVICE} refused the reply: {}", e.describe()),
                    ));
                }
                Heard::Lost { heard: false, .. } if !resent => {
                    // Nothing of it was heard: once more on a new connection.
                    flight.open.take();
                    resent = true;
                }
                Heard::Lost { why, .. } => {
                    flight.open.take();
                    return Err(BackendError::new(
                        OP,
                        ErrorCode::ConnectionFailed,
                        format!("{SERVICE}'s connection dropped mid-reply: {why}"),
                    ));
                }
                Heard::TimedOut => {
                    return Err(BackendError::new(
                        OP,
                        ErrorCode::Timeout,
                        format!(
                            "{SERVICE} sent nothing for the reply within {}",
                            humantime::format_duration(state.voice.reply_timeout)
                        ),
                    ));
                }
                Heard::BadAudio(e) => {
                    return Err(BackendError::new(
                        OP,
                        ErrorCode::PipelineError,
                        format!("{SERVICE} sent audio that cannot be used: {}", e.message),
                    ));
                }
            }
        }
    }
}

/// The `cartesia` text-to-speech component (`tts_provider = "cartesia"`),
/// configured by `[components.cartesia]` (the shape of the provider's
/// `provider_config`). Each session gets a [`Speaker`]; sessions whose
/// options name the same endpoint, key and version share one socket.
#[derive(Default)]
pub struct CartesiaTts {
    counters: Arc<LinkCounters>,
    sockets: Mutex<HashMap<(String, String, String), Weak<TtsSocket>>>,
}

impl std::fmt::Debug for CartesiaTts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CartesiaTts").finish_non_exhaustive()
    }
}

impl CartesiaTts {
    /// The counters of every socket of the component.
    pub fn counters(&self) -> &LinkCounters {
        &self.counters
    }

    fn socket_for(&self, config: &CartesiaConfig) -> Arc<TtsSocket> {
        let key = (
            config.base_url.clone(),
            config.api_key.expose().to_owned(),
            config.version.clone(),
        );
        let mut sockets = self.sockets.lock().unwrap_or_else(PoisonError::into_inner);
        sockets.retain(|_, s| s.strong_count() > 0);
        if let Some(socket) = sockets.get(&key).and_then(Weak::upgrade) {
            return socket;
        }
        let retry = super::stt::COMPONENT_RETRY;
        let socket = TtsSocket::new(
            config.tts_dial(),
            retry,
            retry.timeout,
            self.counters.clone(),
        );
        sockets.insert(key, Arc::downgrade(&socket));
        socket
    }
}

#[async_trait]
impl TextToSpeech for CartesiaTts {
    async fn synthesize(
        &self,
        _text: &str,
        _format: AudioFormat,
        _out: &mpsc::Sender<AudioFrame>,
    ) -> Result<()> {
        Err(BackendError::invalid_config(
            "cartesia.synthesize",
            "the cartesia text-to-speech component speaks with its options: set [components.cartesia] (api_key, tts.voice_id)",
        ))
    }

    fn with_options(&self, options: &serde_json::Value) -> Result<Option<Arc<dyn TextToSpeech>>> {
        let config = CartesiaConfig::from_component_options(options)?;
        let voice =
            config.voice_settings(super::stt::COMPONENT_RETRY.timeout, "components.cartesia")?;
        let prefix = format!("vb-{:016x}", fastrand::u64(..));
        Ok(Some(Arc::new(Speaker::new(
            self.socket_for(&config),
            Arc::new(voice),
            prefix,
        ))))
    }
}
