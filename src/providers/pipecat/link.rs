//! One session's link to a Pipecat bot: a WebSocket carrying protobuf
//! frames, owned by one task that writes the user's audio and the agent's
//! text, reads the bot's audio, transcripts and RTVI messages, and
//! reconnects with backoff when the bot drops the connection.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::proto::{self, Inbound};
use super::rtvi::{self, RtviEvent};
use crate::audio::{AudioEncoding, AudioFormat, AudioFrame, FormatFollower};
use crate::backend::ConnectionState;
use crate::config::Secret;
use crate::error::{BackendError, ErrorCode, Result};
use crate::metrics::{DropReason, Metrics};
use crate::pipeline::{INTERNAL_FORMAT, S2sEvent, S2sStream, TextToSpeech};
use crate::runtime::{Handed, Link, LinkEvents, RetryPolicy};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A message waiting to go to the bot.
enum Outbound {
    /// The user's audio: stale once the bot was away, and dropped then.
    Audio(Vec<u8>),
    /// The text of the agent's reply `reply` for the bot to speak: still
    /// wanted after a reconnect while that reply is the one in flight.
    Text { reply: u64, frame: Vec<u8> },
}

impl Outbound {
    fn into_frame(self) -> Vec<u8> {
        match self {
            Outbound::Audio(frame) | Outbound::Text { frame, .. } => frame,
        }
    }
}

/// Frames waiting to go to the bot: about ten seconds of 20 ms audio, so a
/// burst faster than real time (buffered audio, a client catching up) gets
/// through whole while the bot reads it. Beyond it (a bot that reads slower
/// than real time for long, or a link that is reconnecting) new frames are
/// dropped and counted. At most about 330 KB per session.
const OUT_QUEUE: usize = 512;
/// Events waiting for the session's task. Audio beyond it is dropped and
/// counted; any other event waits for room ([`LinkEvents`]), holding the
/// link's reading of the bot until there is.
const EVENT_QUEUE: usize = 256;
/// How long opening a link waits for RTVI `bot-ready` after `client-ready`
/// (a bot without RTVI never sends it: the link opens anyway after this).
const BOT_READY_WAIT: Duration = Duration::from_secs(1);
/// How long closing the link may wait for the bot to take the close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// The largest message taken from the bot: 2 MiB is over 20 s of 48 kHz mono
/// audio in one frame, far more than a bot sends at once; a larger message
/// fails the link instead of being read into memory whole.
const MAX_BOT_MESSAGE: usize = 2 * 1024 * 1024;
/// What is kept of the messages a bot sends before `bot-ready`, in bytes;
/// later ones are dropped (and logged once).
const MAX_EARLY_BYTES: usize = 2 * 1024 * 1024;
/// How long a spoken reply may go without audio, once it started, before it
/// counts as finished even though the bot did not say it stopped speaking.
const REPLY_IDLE_END: Duration = Duration::from_secs(3);

/// Counts across every link of one backend, reported by its health check.
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// Messages written to bots.
    pub sent: AtomicU64,
    /// Messages read from bots.
    pub received: AtomicU64,
    /// Messages from bots that could not be decoded, and skipped.
    pub malformed: AtomicU64,
    /// User frames or reply audio dropped because a queue was full.
    pub dropped: AtomicU64,
    /// Times a link lost its bot and connected to it again.
    pub reconnects: AtomicU64,
    /// The backend's metrics, which count the drops too (set by the first
    /// link).
    pub metrics: std::sync::OnceLock<Arc<Metrics>>,
}

impl Counters {
    /// One user frame that did not go to the bot (its queue was full, or it
    /// went stale while the bot was away).
    fn dropped_input(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = self.metrics.get() {
            m.dropped(DropReason::InputOverflow, 1);
        }
    }

    /// One event or reply frame the session's side had no room for.
    fn dropped_output(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = self.metrics.get() {
            m.dropped(DropReason::OutputOverflow, 1);
        }
    }
}

/// Where and how one link connects.
#[derive(Clone)]
pub(super) struct Settings {
    /// The bot's URL for this session (may hold credentials: never logged).
    pub url: String,
    /// `host:port` of the URL, for messages.
    pub endpoint: String,
    /// Sent as `Authorization: Bearer ...`.
    pub auth_token: Option<Secret>,
    /// The bot's input sample rate.
    pub input_sample_rate: u32,
    /// Whether to send RTVI `client-ready` after connecting.
    pub client_ready: bool,
    /// Reconnection policy.
    pub retry: RetryPolicy,
    /// The session, for logs.
    pub session_id: String,
}

/// Connects to the bot once.
pub(super) async fn dial(settings: &Settings) -> Result<Ws> {
    const OP: &str = "pipecat.connect";
    // wss:// uses rustls with ring; an application that installed its own
    // provider keeps it (this then does nothing).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut request = settings.url.as_str().into_client_request().map_err(|e| {
        BackendError::invalid_config(OP, format!("the bot URL is not usable: {}", describe(&e)))
    })?;
    if let Some(token) = &settings.auth_token {
        let value = format!("Bearer {}", token.expose()).parse().map_err(|_| {
            BackendError::invalid_config(
                OP,
                "provider_config.auth_token holds characters an HTTP header cannot carry",
            )
        })?;
        request.headers_mut().insert("authorization", value);
    }
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_BOT_MESSAGE))
        .max_frame_size(Some(MAX_BOT_MESSAGE));
    let (ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
        .await
        .map_err(|e| {
            let code = match &e {
                tungstenite::Error::Http(r) if matches!(r.status().as_u16(), 401 | 403) => {
                    ErrorCode::AuthenticationFailed
                }
                tungstenite::Error::Url(_) => ErrorCode::InvalidConfig,
                _ => ErrorCode::ConnectionFailed,
            };
            BackendError::new(
                OP,
                code,
                format!(
                    "could not reach the Pipecat bot at {}: {}",
                    settings.endpoint,
                    describe(&e)
                ),
            )
        })?;
    Ok(ws)
}

/// An error's description without the URL (which may hold credentials).
fn describe(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Io(io) => io.to_string(),
        tungstenite::Error::Http(r) => format!("the bot answered HTTP {}", r.status()),
        tungstenite::Error::Url(u) => match u {
            tungstenite::error::UrlError::TlsFeatureNotEnabled => {
                "wss:// needs TLS, which this build does not include; use ws://".into()
            }
            other => other.to_string(),
        },
        other => other.to_string(),
    }
}

fn close_cause(frame: Option<&CloseFrame>) -> String {
    match frame {
        Some(f) if u16::from(f.code) == 1013 => format!(
            "the bot is busy with another client (close code 1013{}); a single-client \
             bot serves one session at a time: use a multi-client transport and url_template",
            if f.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", f.reason)
            }
        ),
        Some(f) => format!(
            "the bot closed the connection (code {}{})",
            u16::from(f.code),
            if f.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", f.reason)
            }
        ),
        None => "the bot closed the connection".into(),
    }
}

enum SpeakerMsg {
    Audio(AudioFrame),
    Done,
    Failed(String),
}

/// The spoken reply in flight: where the bot's audio goes while the bot
/// speaks the agent's text.
struct Sink {
    id: u64,
    format: AudioFormat,
    tx: mpsc::Sender<SpeakerMsg>,
    heard: bool,
}

struct Shared {
    counters: Arc<Counters>,
    sink: Mutex<Option<Sink>>,
    next_reply: AtomicU64,
    /// Set when the link is lost for good, with why.
    failed: Mutex<Option<String>>,
    is_failed: AtomicBool,
    reply_timeout: Duration,
}

impl Shared {
    fn sink(&self) -> std::sync::MutexGuard<'_, Option<Sink>> {
        self.sink.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lost(&self, op: &'static str) -> BackendError {
        let why = self
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "the link task ended".into());
        BackendError::new(
            op,
            ErrorCode::ConnectionFailed,
            format!("the session's link to the Pipecat bot is lost: {why}"),
        )
    }
}

/// Opens a session's link: connects (once; the runtime retries), says
/// `client-ready`, and starts the link's task.
pub(super) async fn open(
    settings: Settings,
    counters: Arc<Counters>,
    reply_timeout: Duration,
) -> Result<Link> {
    let mut ws = dial(&settings).await?;
    let mut early = Vec::new();
    if settings.client_ready {
        send_client_ready(&mut ws, &settings, &counters).await?;
        early = await_bot_ready(&mut ws, &settings, &counters).await?;
    }
    let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
    let (events_tx, events_rx) = LinkEvents::channel(EVENT_QUEUE);
    let shared = Arc::new(Shared {
        counters,
        sink: Mutex::new(None),
        next_reply: AtomicU64::new(1),
        failed: Mutex::new(None),
        is_failed: AtomicBool::new(false),
        reply_timeout,
    });
    let stream = PipecatStream {
        out: out_tx.clone(),
        shared: shared.clone(),
        rate: settings.input_sample_rate,
        converter: FormatFollower::default(),
    };
    let speaker = Speaker {
        out: out_tx,
        shared: shared.clone(),
    };
    let span = tracing::info_span!("pipecat.link", session_id = %settings.session_id);
    tokio::spawn(tracing::Instrument::instrument(
        LinkTask {
            settings,
            shared,
            events: events_tx,
            converter: FormatFollower::default(),
            logged_malformed: false,
            resend: Vec::new(),
        }
        .run(ws, out_rx, early),
        span,
    ));
    Ok(Link {
        stream: Box::new(stream),
        events: events_rx,
        speaker: Some(Arc::new(speaker)),
    })
}

/// Reads until the bot says `bot-ready` (or [`BOT_READY_WAIT`] passes), so a
/// bot that refuses the client (a single-client bot closing with 1013) fails
/// here, where the runtime retries and reports it. Messages that came first
/// are returned for the link to handle.
///
/// `bot-ready` and what is not kept count as received here; what is kept
/// counts when the link handles it.
async fn await_bot_ready(
    ws: &mut Ws,
    settings: &Settings,
    counters: &Counters,
) -> Result<Vec<Bytes>> {
    let mut early = Vec::new();
    let (mut early_bytes, mut dropped_early) = (0, false);
    let deadline = tokio::time::Instant::now() + BOT_READY_WAIT;
    let refused = |cause: String| {
        BackendError::new(
            "pipecat.connect",
            ErrorCode::ConnectionFailed,
            format!("the Pipecat bot at {}: {cause}", settings.endpoint),
        )
    };
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Ok(early),
            Ok(Some(Ok(Message::Binary(b)))) => {
                let ready = matches!(
                    proto::decode(b.clone()),
                    Ok(Inbound::Message(ref json))
                        if matches!(rtvi::parse(json), Ok(Some(RtviEvent::BotReady)))
                );
                if ready {
                    counters.received.fetch_add(1, Ordering::Relaxed);
                    return Ok(early);
                }
                if early_bytes + b.len() <= MAX_EARLY_BYTES {
                    early_bytes += b.len();
                    early.push(b);
                    continue;
                }
                counters.received.fetch_add(1, Ordering::Relaxed);
                if !dropped_early {
                    dropped_early = true;
                    tracing::warn!(
                        "the Pipecat bot sent more than {MAX_EARLY_BYTES} bytes before bot-ready; \
                         the rest of it is dropped"
                    );
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Err(refused(close_cause(frame.as_ref())));
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(refused(describe(&e))),
            Ok(None) => return Err(refused("the connection ended".into())),
        }
    }
}

async fn send_client_ready(ws: &mut Ws, settings: &Settings, counters: &Counters) -> Result<()> {
    let id = format!("{}-ready", settings.session_id);
    ws.send(Message::Binary(
        proto::encode_message(rtvi::client_ready(&id)).into(),
    ))
    .await
    .map_err(|e| {
        BackendError::new(
            "pipecat.connect",
            ErrorCode::ConnectionFailed,
            format!(
                "the Pipecat bot at {} dropped the connection at once: {}",
                settings.endpoint,
                describe(&e)
            ),
        )
    })?;
    counters.sent.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The user's audio to the bot.
struct PipecatStream {
    out: mpsc::Sender<Outbound>,
    shared: Arc<Shared>,
    rate: u32,
    converter: FormatFollower,
}

impl S2sStream for PipecatStream {
    fn push_audio(&mut self, frame: &AudioFrame) -> Result<()> {
        const OP: &str = "pipecat.push_audio";
        if self.shared.is_failed.load(Ordering::Acquire) {
            return Err(self.shared.lost(OP));
        }
        let to = AudioFormat::new(AudioEncoding::PcmS16Le, self.rate, 1);
        let pcm = match self.converter.convert(frame.clone(), to)? {
            Some(f) => f.into_data(),
            None => return Ok(()),
        };
        match self
            .out
            .try_send(Outbound::Audio(proto::encode_audio(pcm, self.rate, 1)))
        {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.counters.dropped_input();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.shared.lost(OP)),
        }
    }

    fn end_turn(&mut self) -> Result<()> {
        // The bot ends turns itself.
        Ok(())
    }

    fn interrupt(&mut self) {
        // The bot hears the barge-in in the audio it is sent and stops by
        // itself; the engine has already flushed what was queued here.
    }
}

/// Speaks the agent's text through the bot's TTS.
struct Speaker {
    out: mpsc::Sender<Outbound>,
    shared: Arc<Shared>,
}

/// Removes its reply's sink when the reply ends or is dropped (barge-in).
struct SinkGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for SinkGuard<'_> {
    fn drop(&mut self) {
        let mut sink = self.shared.sink();
        if sink.as_ref().is_some_and(|s| s.id == self.id) {
            *sink = None;
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
        const OP: &str = "pipecat.speak";
        if self.shared.is_failed.load(Ordering::Acquire) {
            return Err(self.shared.lost(OP));
        }
        let (tx, mut rx) = mpsc::channel(EVENT_QUEUE);
        let id = self.shared.next_reply.fetch_add(1, Ordering::Relaxed);
        *self.shared.sink() = Some(Sink {
            id,
            format,
            tx,
            heard: false,
        });
        let _guard = SinkGuard {
            shared: &self.shared,
            id,
        };
        let frame = proto::encode_text(text);
        self.out
            .send(Outbound::Text { reply: id, frame })
            .await
            .map_err(|_| self.shared.lost(OP))?;
        let mut heard = false;
        loop {
            let wait = if heard {
                REPLY_IDLE_END
            } else {
                self.shared.reply_timeout
            };
            match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(SpeakerMsg::Audio(frame))) => {
                    heard = true;
                    if out.send(frame).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(Some(SpeakerMsg::Done)) | Ok(None) => return Ok(()),
                Ok(Some(SpeakerMsg::Failed(why))) => {
                    return Err(BackendError::new(
                        OP,
                        ErrorCode::ConnectionFailed,
                        format!("the Pipecat bot's connection dropped mid-reply: {why}"),
                    ));
                }
                Err(_) if heard => return Ok(()),
                Err(_) => {
                    return Err(BackendError::new(
                        OP,
                        ErrorCode::Timeout,
                        format!(
                            "the Pipecat bot spoke no audio for the reply within timeout = {}",
                            humantime::format_duration(self.shared.reply_timeout)
                        ),
                    ));
                }
            }
        }
    }
}

/// Why the connection ended.
enum Ended {
    /// The session is gone: close and stop.
    SessionGone,
    /// The bot went away: reconnect.
    Lost(String),
}

struct LinkTask {
    settings: Settings,
    shared: Arc<Shared>,
    events: LinkEvents,
    /// Converts the bot's audio, keyed by (from, to).
    converter: FormatFollower,
    logged_malformed: bool,
    /// Replies' texts kept through a reconnect, written first on the new
    /// connection.
    resend: Vec<Vec<u8>>,
}

impl LinkTask {
    async fn run(mut self, mut ws: Ws, mut out: mpsc::Receiver<Outbound>, early: Vec<Bytes>) {
        for message in early {
            self.on_message(message).await;
        }
        loop {
            match self.serve(&mut ws, &mut out).await {
                Ended::SessionGone => {
                    let _ = tokio::time::timeout(CLOSE_WAIT, ws.close(None)).await;
                    return;
                }
                Ended::Lost(cause) => {
                    tracing::warn!(bot = %self.settings.endpoint, "lost the Pipecat bot: {cause}");
                    match self.reconnect(&cause, &mut out).await {
                        Some(new) => ws = new,
                        None => return,
                    }
                }
            }
        }
    }

    /// Carries messages both ways until one side ends.
    async fn serve(&mut self, ws: &mut Ws, out: &mut mpsc::Receiver<Outbound>) -> Ended {
        if !self.resend.is_empty() {
            let texts = std::mem::take(&mut self.resend);
            let write = async {
                let n = texts.len() as u64;
                for frame in texts {
                    ws.feed(Message::Binary(frame.into())).await?;
                }
                ws.flush().await?;
                Ok::<u64, tungstenite::Error>(n)
            };
            if let Err(ended) = Self::written(&self.shared, write).await {
                return ended;
            }
        }
        loop {
            tokio::select! {
                biased;
                () = self.events.closed() => return Ended::SessionGone,
                msg = ws.next() => match msg {
                    Some(Ok(Message::Binary(b))) => self.on_message(b).await,
                    Some(Ok(Message::Text(t))) => {
                        self.on_malformed(&format!("a {}-byte text message (the protobuf serializer sends binary)", t.len()));
                    }
                    Some(Ok(Message::Close(frame))) => return Ended::Lost(close_cause(frame.as_ref())),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Ended::Lost(describe(&e)),
                    None => return Ended::Lost("the connection ended".into()),
                },
                next = out.recv() => {
                    let Some(first) = next else { return Ended::SessionGone };
                    let write = async {
                        let mut batch = 1u64;
                        ws.feed(Message::Binary(first.into_frame().into())).await?;
                        while let Ok(more) = out.try_recv() {
                            batch += 1;
                            ws.feed(Message::Binary(more.into_frame().into())).await?;
                        }
                        ws.flush().await?;
                        Ok::<u64, tungstenite::Error>(batch)
                    };
                    if let Err(ended) = Self::written(&self.shared, write).await {
                        return ended;
                    }
                }
            }
        }
    }

    /// Waits for `write` (which yields how many messages it wrote) and counts
    /// what it wrote. A bot that stops reading (a stalled process) would hold
    /// the link, and the session's stop, for as long as TCP keeps trying: the
    /// write gets the reply timeout, then the bot counts as lost.
    async fn written(
        shared: &Shared,
        write: impl std::future::Future<Output = std::result::Result<u64, tungstenite::Error>>,
    ) -> std::result::Result<(), Ended> {
        let patience = shared.reply_timeout;
        match tokio::time::timeout(patience, write).await {
            Ok(Ok(n)) => {
                shared.counters.sent.fetch_add(n, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(e)) => Err(Ended::Lost(describe(&e))),
            Err(_) => Err(Ended::Lost(format!(
                "the bot took nothing for {}",
                humantime::format_duration(patience)
            ))),
        }
    }

    /// Reconnects under the retry policy; `None` when the session is gone
    /// or every attempt failed (then the session hears `Failed`).
    async fn reconnect(&mut self, cause: &str, out: &mut mpsc::Receiver<Outbound>) -> Option<Ws> {
        if let Some(sink) = self.shared.sink().take() {
            let _ = sink.tx.try_send(SpeakerMsg::Failed(cause.to_owned()));
        }
        self.emit(S2sEvent::Connection(ConnectionState::Reconnecting))
            .await;
        let (settings, counters) = (&self.settings, &self.shared.counters);
        let attempt = || async move {
            let mut ws = dial(settings).await?;
            if settings.client_ready {
                send_client_ready(&mut ws, settings, counters).await?;
                // What the bot said before it was ready is of no reply in flight.
                let early = await_bot_ready(&mut ws, settings, counters).await?;
                counters
                    .received
                    .fetch_add(early.len() as u64, Ordering::Relaxed);
            }
            Ok::<_, BackendError>(ws)
        };
        let outcome = tokio::select! {
            () = self.events.closed() => return None,
            r = settings.retry.run("pipecat.reconnect", "the Pipecat bot", attempt, |retry, delay, e| {
                tracing::warn!(retry, "reconnecting to the Pipecat bot failed, retrying in {delay:?}: {}", e.message);
            }) => r,
        };
        match outcome {
            Ok(ws) => {
                tracing::info!(bot = %self.settings.endpoint, "reconnected to the Pipecat bot");
                self.shared
                    .counters
                    .reconnects
                    .fetch_add(1, Ordering::Relaxed);
                // Audio queued while the bot was away is stale: drop it. The
                // text of the reply in flight (one the agent made while the
                // link was reconnecting) goes to the bot first; a text whose
                // reply already failed with the old connection is dropped.
                let current = self.shared.sink().as_ref().map(|s| s.id);
                while let Ok(message) = out.try_recv() {
                    match message {
                        Outbound::Audio(_) => self.shared.counters.dropped_input(),
                        Outbound::Text { reply, frame } if Some(reply) == current => {
                            self.resend.push(frame);
                        }
                        Outbound::Text { .. } => {}
                    }
                }
                self.emit(S2sEvent::Connection(ConnectionState::Connected))
                    .await;
                Some(ws)
            }
            Err(e) => {
                let why = format!("{cause}; {}", e.message);
                *self
                    .shared
                    .failed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(why.clone());
                self.shared.is_failed.store(true, Ordering::Release);
                let message = format!("lost the Pipecat bot at {}: {why}", self.settings.endpoint);
                self.emit(S2sEvent::Failed {
                    code: e.code,
                    message,
                })
                .await;
                None
            }
        }
    }

    fn on_malformed(&mut self, what: &str) {
        self.shared
            .counters
            .malformed
            .fetch_add(1, Ordering::Relaxed);
        if !self.logged_malformed {
            self.logged_malformed = true;
            tracing::warn!(bot = %self.settings.endpoint, "skipping a message from the Pipecat bot: {what} (further ones are only counted)");
        }
    }

    /// Hands `event` to the session's task ([`LinkEvents::send`]), counting
    /// dropped audio. A session that is gone is seen by `serve` next.
    async fn emit(&mut self, event: S2sEvent) {
        let handed = self.events.send(event).await;
        self.count(handed);
    }

    fn count(&self, handed: Handed) {
        if handed == Handed::Dropped {
            self.shared.counters.dropped_output();
        }
    }

    async fn on_message(&mut self, bytes: Bytes) {
        self.shared
            .counters
            .received
            .fetch_add(1, Ordering::Relaxed);
        match proto::decode(bytes) {
            Err(e) => self.on_malformed(&e.message),
            Ok(Inbound::Audio(frame)) => self.on_audio(frame),
            Ok(Inbound::Message(json)) => match rtvi::parse(&json) {
                Err(e) => self.on_malformed(&e.message),
                Ok(None) => {}
                Ok(Some(ev)) => self.on_rtvi(ev).await,
            },
            Ok(Inbound::Transcription { text, .. }) => {
                self.emit(S2sEvent::UserTranscript {
                    text,
                    is_final: true,
                })
                .await
            }
            Ok(Inbound::Text(text)) => {
                let speaking = self.shared.sink().is_some();
                if !speaking {
                    self.emit(S2sEvent::AgentText(text)).await;
                }
            }
            Ok(Inbound::Interruption) => self.on_interrupted().await,
        }
    }

    async fn on_rtvi(&mut self, ev: RtviEvent) {
        match ev {
            RtviEvent::UserTranscription { text, is_final } => {
                self.emit(S2sEvent::UserTranscript { text, is_final }).await
            }
            RtviEvent::BotText(text) => {
                // While the bot speaks the agent's text, the agent's text is
                // already in the session's events.
                let speaking = self.shared.sink().is_some();
                if !speaking {
                    self.emit(S2sEvent::AgentText(text)).await;
                }
            }
            RtviEvent::BotStoppedSpeaking => {
                let ended_unasked = {
                    let mut sink = self.shared.sink();
                    match sink.as_ref() {
                        Some(s) if s.heard => {
                            let _ = s.tx.try_send(SpeakerMsg::Done);
                            *sink = None;
                            false
                        }
                        // Not this reply's end: it has not started speaking yet.
                        Some(_) => false,
                        None => true,
                    }
                };
                if ended_unasked {
                    self.emit(S2sEvent::ReplyDone).await;
                }
            }
            RtviEvent::BotInterrupted => self.on_interrupted().await,
            RtviEvent::Error(message) => {
                tracing::warn!(bot = %self.settings.endpoint, "the Pipecat bot reports an error: {message}");
            }
            RtviEvent::BotReady
            | RtviEvent::BotStartedSpeaking
            | RtviEvent::UserStartedSpeaking
            | RtviEvent::UserStoppedSpeaking
            | RtviEvent::Other(_) => {}
        }
    }

    async fn on_interrupted(&mut self) {
        self.shared.sink().take();
        self.emit(S2sEvent::Interrupted).await;
    }

    fn on_audio(&mut self, frame: AudioFrame) {
        let mut sink = self.shared.sink();
        let to = sink.as_ref().map_or(INTERNAL_FORMAT, |s| s.format);
        let frame = match self.converter.convert(frame, to) {
            Ok(f) => f,
            Err(e) => {
                drop(sink);
                self.on_malformed(&format!("audio the client cannot take: {}", e.message));
                return;
            }
        };
        let Some(frame) = frame else { return };
        match sink.as_mut() {
            Some(s) => {
                s.heard = true;
                if s.tx.try_send(SpeakerMsg::Audio(frame)).is_err() {
                    self.shared.counters.dropped_output();
                }
            }
            None => {
                drop(sink);
                let handed = self.events.audio(frame);
                self.count(handed);
            }
        }
    }
}
