//! The link kit's WebSocket service link: everything a provider whose service
//! speaks over a WebSocket needs, but its wire protocol.
//!
//! A provider implements [`WireProtocol`] (what to send first, how to encode
//! the user's audio and the agent's reply, how to decode what the service
//! says) and calls [`WebSocketLink::open`]. The kit dials (TLS on rustls with
//! ring, auth headers, a size limit on what it reads), keeps one task per
//! session that writes the user's audio and the agent's replies and reads the
//! service, applies the [`LinkEvents`] queue policy, bounds every write
//! (a service that stops reading is lost, not waited for), pings an idle
//! connection, reconnects with exponential backoff and full jitter (stale
//! audio dropped, the reply in flight sent again), counts what it sends,
//! reads, skips and drops ([`LinkCounters`], reported by health checks and
//! in the backend's metrics), and speaks the agent's replies through the
//! service (the speaker).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, http::HeaderValue};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::{
    Handed, Link, LinkEvent, LinkEvents, LinkInput, LinkRequest, RetryPolicy, ServiceLink,
};
use crate::audio::{AudioFormat, AudioFrame, FormatFollower};
use crate::backend::ConnectionState;
use crate::config::Secret;
use crate::error::{BackendError, ErrorCode, Result};
use crate::metrics::{DropReason, Metrics};
use crate::pipeline::{INTERNAL_FORMAT, TextToSpeech};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Messages waiting to go to the service: about ten seconds of 20 ms audio,
/// so a burst faster than real time gets through whole while the service
/// reads it. Beyond it new audio is dropped and counted.
const OUT_QUEUE: usize = 512;
/// Events waiting for the session's task ([`LinkEvents`]).
const EVENT_QUEUE: usize = 256;
/// How long closing the link may wait for the service to take the close.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// What is kept of the messages a service sends before it is ready, in
/// bytes; later ones are dropped (and logged once).
const MAX_EARLY_BYTES: usize = 2 * 1024 * 1024;
/// How long a spoken reply may go without audio, once it started, before it
/// counts as finished even though the service did not say it stopped.
const REPLY_IDLE_END: Duration = Duration::from_secs(3);

/// One thing a service said, as its [`WireProtocol`] decodes it.
#[derive(Debug)]
#[non_exhaustive]
pub enum WireEvent {
    /// The service is ready for the session: ends the wait of
    /// [`WireProtocol::ready_wait`] (ignored later).
    Ready,
    /// What the service heard the user say.
    UserTranscript {
        /// The text.
        text: String,
        /// Whether it is final.
        is_final: bool,
    },
    /// Text of a reply the service makes by itself (while it speaks the
    /// agent's reply, the agent's text is already in the session's events,
    /// and this is not repeated).
    ServiceText(String),
    /// Reply audio, in any format (the kit converts it).
    Audio(AudioFrame),
    /// The service stopped speaking: the reply it was speaking is done.
    SpeakingStopped,
    /// The service heard the user barge in and cut its reply short.
    Interrupted,
    /// The service reports an error; logged.
    Error(String),
}

/// A service's wire protocol over a WebSocket: all a provider writes for
/// its link. The link's task owns it, so it may keep state (a context id,
/// a sequence number) without locks.
pub trait WireProtocol: Send + 'static {
    /// How messages name the service, e.g. `"the Pipecat bot"`.
    fn service(&self) -> &'static str;

    /// The format the service takes the user's audio in; the kit converts
    /// to it before [`WireProtocol::encode_audio`].
    fn input_format(&self) -> AudioFormat;

    /// Messages to send as soon as the connection is open (each connect and
    /// reconnect), e.g. a session's settings or a `client-ready`.
    fn greeting(&mut self, session_id: &str) -> Vec<WsMessage> {
        let _ = session_id;
        Vec::new()
    }

    /// How long to wait, after the greeting, for the service to say it is
    /// ready ([`WireEvent::Ready`]); `None` (the default): no waiting. What
    /// comes before is kept for the link (up to 2 MiB); a close or an error
    /// meanwhile fails the connect, where the runtime retries and reports it.
    /// A service that never says it is ready is used once the wait is over.
    fn ready_wait(&self) -> Option<Duration> {
        None
    }

    /// Encodes one frame of the user's audio, in
    /// [`WireProtocol::input_format`].
    fn encode_audio(&mut self, frame: AudioFrame) -> WsMessage;

    /// Encodes the agent's reply, or the next piece of it, for the service
    /// to speak.
    fn encode_reply(&mut self, text: &str) -> Vec<WsMessage>;

    /// Encodes the end of the agent's reply; nothing by default.
    fn encode_reply_end(&mut self) -> Vec<WsMessage> {
        Vec::new()
    }

    /// Encodes a barge-in: the service should stop speaking. Nothing by
    /// default (the service hears it in the audio).
    fn encode_cancel(&mut self) -> Vec<WsMessage> {
        Vec::new()
    }

    /// Encodes the end of the user's turn, for a service whose turns the
    /// local turn detector ends ([`TurnPolicy::Local`](crate::provider::TurnPolicy::Local)).
    /// Nothing by default.
    fn encode_end_of_turn(&mut self) -> Vec<WsMessage> {
        Vec::new()
    }

    /// Decodes one message from the service into `out`; the error says what
    /// was wrong with it (the message is counted as malformed and skipped).
    /// Pings, pongs and closes never come here.
    ///
    /// # Errors
    ///
    /// A description of the malformed message, without secrets.
    fn decode(
        &mut self,
        message: WsMessage,
        out: &mut Vec<WireEvent>,
    ) -> std::result::Result<(), String>;

    /// Why a close frame with `code` and `reason` ended the connection, when
    /// the service gives its codes a meaning; `None` (the default) for the
    /// plain description.
    fn close_cause(&self, code: u16, reason: &str) -> Option<String> {
        let _ = (code, reason);
        None
    }
}

/// Where and how a link connects.
#[derive(Clone)]
pub struct Dial {
    /// The service's URL (`ws://` or `wss://`); may hold credentials, so it
    /// is never logged nor put in errors.
    pub url: String,
    /// `host:port` of the URL, for messages.
    pub endpoint: String,
    /// Headers sent with the upgrade request, e.g. `authorization` with
    /// `Bearer <token>`; values are secrets.
    pub headers: Vec<(&'static str, Secret)>,
    /// The largest message taken from the service; a larger one fails the
    /// connection instead of being read into memory whole.
    pub max_message: usize,
}

impl std::fmt::Debug for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dial")
            .field("endpoint", &self.endpoint)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            )
            .field("max_message", &self.max_message)
            .finish_non_exhaustive()
    }
}

impl Dial {
    /// A dial to `url` with no headers and a 2 MiB message limit.
    pub fn new(url: impl Into<String>) -> Dial {
        let url = url.into();
        Dial {
            endpoint: endpoint_of(&url),
            url,
            headers: Vec::new(),
            max_message: 2 * 1024 * 1024,
        }
    }

    /// Adds an `authorization: Bearer <token>` header.
    pub fn bearer(mut self, token: &Secret) -> Dial {
        self.headers.push((
            "authorization",
            Secret::new(format!("Bearer {}", token.expose())),
        ));
        self
    }

    /// Checks that `url` is a `ws://` or `wss://` URL with a host, for a
    /// provider's config check; the error says what is wrong without
    /// repeating the URL (it may hold credentials).
    ///
    /// # Errors
    ///
    /// What is wrong, e.g. `scheme "http" is not supported; use ws or wss`.
    pub fn check_url(url: &str) -> std::result::Result<(), String> {
        match url::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "ws" | "wss") && u.host_str().is_some() => Ok(()),
            Ok(u) if u.host_str().is_none() => {
                Err("has no host; expected e.g. ws://host:8765/".into())
            }
            // Without `://`, what parsed as the scheme may be a user name
            // (`user:password@host`): not quoted.
            Ok(u) if url.contains("://") => Err(format!(
                "scheme {:?} is not supported; use ws or wss",
                u.scheme()
            )),
            Ok(_) => Err("has no ws:// or wss:// scheme; expected e.g. ws://host:8765/".into()),
            Err(e) => Err(format!(
                "is not a valid URL ({e}); expected e.g. ws://host:8765/"
            )),
        }
    }

    /// `template` with `{session_id}` and `{user_id}` replaced, each
    /// percent-encoded but for letters, digits, `-`, `_` and `~`, so a value
    /// is one path segment or query value whatever it holds (`/`, `?`, `#`,
    /// `&`, spaces, dots). A provider refuses a `user_id` of `.` or `..`
    /// itself, which URL parsers read as a path step even encoded.
    pub fn render_template(template: &str, session_id: &str, user_id: &str) -> String {
        const VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'_')
            .remove(b'~');
        let encode = |v: &str| percent_encoding::utf8_percent_encode(v, VALUE).to_string();
        template
            .replace("{session_id}", &encode(session_id))
            .replace("{user_id}", &encode(user_id))
    }

    /// Opens and closes a TCP connection to the URL's host and port: a
    /// check that `service` is there which takes none of its WebSocket seats.
    ///
    /// # Errors
    ///
    /// `ConnectionFailed` naming the endpoint.
    pub async fn probe(&self, service: &str) -> Result<()> {
        TcpStream::connect(&self.endpoint)
            .await
            .map(drop)
            .map_err(|e| {
                BackendError::new(
                    "link.connect",
                    ErrorCode::ConnectionFailed,
                    format!(
                        "{service} at {} does not accept connections: {e}",
                        self.endpoint
                    ),
                )
            })
    }
}

/// `host:port` of a URL, for messages that must not repeat the URL.
pub fn endpoint_of(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}:{}",
            u.host_str().unwrap_or("?"),
            u.port_or_known_default().unwrap_or(0)
        ),
        Err(_) => "the configured URL".into(),
    }
}

/// How one session's link behaves.
#[derive(Clone, Debug)]
pub struct LinkSettings {
    /// Where to connect.
    pub dial: Dial,
    /// The session, for logs and [`WireProtocol::greeting`].
    pub session_id: String,
    /// How to reconnect when the service drops the connection.
    pub retry: RetryPolicy,
    /// How long a write may wait for the service to take it (a service that
    /// stops reading is lost), and how long a spoken reply may wait for its
    /// first audio.
    pub reply_timeout: Duration,
    /// Ping the service after this long without writing anything; `None`:
    /// never.
    pub keepalive: Option<Duration>,
    /// The backend's metrics, where the link's drops are counted too.
    pub metrics: Option<Arc<Metrics>>,
}

impl LinkSettings {
    /// Settings for the session of `request`, reaching its service through
    /// `dial`: the session's id, the request's retry policy, the config's
    /// `timeout` as the reply timeout, the backend's metrics, no keepalive.
    pub fn for_session(dial: Dial, request: &LinkRequest<'_>) -> LinkSettings {
        LinkSettings {
            dial,
            session_id: request.session_id.to_owned(),
            retry: request.retry,
            reply_timeout: request.config.timeout,
            keepalive: None,
            metrics: Some(request.metrics.clone()),
        }
    }
}

/// Counts across every link of one backend, reported by its health check
/// ([`LinkCounters::health`]) and, for drops, in its metrics.
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Messages written to the service.
    pub sent: AtomicU64,
    /// Messages read from the service.
    pub received: AtomicU64,
    /// Messages from the service that could not be decoded, and skipped.
    pub malformed: AtomicU64,
    /// User audio or reply audio dropped because a queue was full.
    pub dropped: AtomicU64,
    /// Times a link lost the service and connected to it again.
    pub reconnects: AtomicU64,
    metrics: OnceLock<Arc<Metrics>>,
}

impl LinkCounters {
    /// Counts drops in `metrics` too (the first call wins).
    pub fn use_metrics(&self, metrics: &Arc<Metrics>) {
        let _ = self.metrics.set(metrics.clone());
    }

    /// The counters as health details, named `{prefix}_messages_sent`,
    /// `_messages_received`, `_messages_malformed`, `_frames_dropped` and
    /// `_reconnects`.
    pub fn health(&self, prefix: &str) -> BTreeMap<String, String> {
        [
            ("messages_sent", &self.sent),
            ("messages_received", &self.received),
            ("messages_malformed", &self.malformed),
            ("frames_dropped", &self.dropped),
            ("reconnects", &self.reconnects),
        ]
        .into_iter()
        .map(|(name, n)| {
            (
                format!("{prefix}_{name}"),
                n.load(Ordering::Relaxed).to_string(),
            )
        })
        .collect()
    }

    /// One user frame that did not go to the service.
    fn dropped_input(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = self.metrics.get() {
            m.dropped(DropReason::InputOverflow, 1);
        }
    }

    /// One reply frame the session's side had no room for.
    fn dropped_output(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = self.metrics.get() {
            m.dropped(DropReason::OutputOverflow, 1);
        }
    }
}

/// A WebSocket link to a service: a provider writes its [`WireProtocol`],
/// and this dials (TLS, auth headers), keeps one task per session that
/// writes the user's audio and the agent's replies and reads the service,
/// applies the [`LinkEvents`] queue policy, bounds every write, pings an idle
/// connection, reconnects with exponential backoff and full jitter (stale
/// audio dropped, the reply in flight sent again), counts in
/// [`LinkCounters`], and speaks the agent's replies through the service.
#[derive(Debug)]
pub struct WebSocketLink;

impl WebSocketLink {
    /// Connects (once: the runtime retries opening a session's link), sends
    /// the greeting, waits for the service to be ready, and starts the
    /// link's task.
    ///
    /// # Errors
    ///
    /// `ConnectionFailed` when the service cannot be reached or refuses the
    /// session, `AuthenticationFailed` for an HTTP 401 or 403 answer,
    /// `InvalidConfig` for a URL or header that cannot be used. Messages name
    /// the endpoint, never the URL.
    pub async fn open<P: WireProtocol>(
        mut protocol: P,
        settings: LinkSettings,
        counters: Arc<LinkCounters>,
    ) -> Result<Link> {
        if let Some(metrics) = &settings.metrics {
            counters.use_metrics(metrics);
        }
        let (ws, early) = connect(&mut protocol, &settings, &counters).await?;
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (events_tx, events_rx) = LinkEvents::channel(EVENT_QUEUE);
        let shared = Arc::new(Shared {
            service: protocol.service(),
            counters,
            sink: Mutex::new(None),
            next_reply: AtomicU64::new(1),
            failed: Mutex::new(None),
            is_failed: AtomicBool::new(false),
            reply_timeout: settings.reply_timeout,
        });
        let input = Input {
            out: out_tx.clone(),
            shared: shared.clone(),
            format: protocol.input_format(),
            converter: FormatFollower::default(),
        };
        let speaker = Speaker {
            out: out_tx,
            shared: shared.clone(),
        };
        let span = tracing::info_span!("link", service = protocol.service(), session_id = %settings.session_id);
        let task = Task {
            protocol,
            settings,
            shared,
            events: events_tx,
            converter: FormatFollower::default(),
            logged_malformed: false,
            resend: Vec::new(),
            decoded: Vec::new(),
        };
        tokio::spawn(tracing::Instrument::instrument(
            task.run(ws, out_rx, early),
            span,
        ));
        Ok(Link::Service(ServiceLink {
            input: Box::new(input),
            events: events_rx,
            speaker: Some(Arc::new(speaker)),
        }))
    }
}

/// Dials once.
async fn dial(d: &Dial, service: &str) -> Result<Ws> {
    const OP: &str = "link.connect";
    // wss:// uses rustls with ring; an application that installed its own
    // provider keeps it (this then does nothing).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut request = d.url.as_str().into_client_request().map_err(|e| {
        BackendError::invalid_config(
            OP,
            format!("the URL of {service} is not usable: {}", describe(&e)),
        )
    })?;
    for (name, value) in &d.headers {
        let value = HeaderValue::from_str(value.expose()).map_err(|_| {
            BackendError::invalid_config(
                OP,
                format!("the {name} header for {service} holds characters a header cannot carry"),
            )
        })?;
        request.headers_mut().insert(*name, value);
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(d.max_message))
        .max_frame_size(Some(d.max_message));
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
                    "could not reach {service} at {}: {}",
                    d.endpoint,
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
        tungstenite::Error::Http(r) => format!("it answered HTTP {}", r.status()),
        tungstenite::Error::Url(tungstenite::error::UrlError::TlsFeatureNotEnabled) => {
            "wss:// needs TLS, which this build does not include; use ws://".into()
        }
        tungstenite::Error::Url(u) => u.to_string(),
        other => other.to_string(),
    }
}

/// Why a close frame ended the connection.
fn close_cause<P: WireProtocol>(protocol: &P, frame: Option<&CloseFrame>) -> String {
    let Some(f) = frame else {
        return format!("{} closed the connection", protocol.service());
    };
    let code = u16::from(f.code);
    if let Some(cause) = protocol.close_cause(code, &f.reason) {
        return cause;
    }
    let reason = if f.reason.is_empty() {
        String::new()
    } else {
        format!(": {}", f.reason)
    };
    format!(
        "{} closed the connection (code {code}{reason})",
        protocol.service()
    )
}

/// Dials, greets and waits for the service to be ready; what it said first
/// is returned for the link to handle.
async fn connect<P: WireProtocol>(
    protocol: &mut P,
    settings: &LinkSettings,
    counters: &LinkCounters,
) -> Result<(Ws, Vec<WsMessage>)> {
    let service = protocol.service();
    let mut ws = dial(&settings.dial, service).await?;
    let refused = |cause: String| {
        BackendError::new(
            "link.connect",
            ErrorCode::ConnectionFailed,
            format!("{service} at {}: {cause}", settings.dial.endpoint),
        )
    };
    let greeting = protocol.greeting(&settings.session_id);
    let greeted = greeting.len() as u64;
    for message in greeting {
        ws.feed(message).await.map_err(|e| {
            refused(format!(
                "it dropped the connection at once: {}",
                describe(&e)
            ))
        })?;
    }
    ws.flush().await.map_err(|e| {
        refused(format!(
            "it dropped the connection at once: {}",
            describe(&e)
        ))
    })?;
    counters.sent.fetch_add(greeted, Ordering::Relaxed);
    let Some(wait) = protocol.ready_wait() else {
        return Ok((ws, Vec::new()));
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut early = Vec::new();
    let (mut early_bytes, mut dropped_early) = (0, false);
    let mut decoded = Vec::new();
    loop {
        let message = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Ok((ws, early)),
            Ok(Some(Ok(WsMessage::Close(frame)))) => {
                return Err(refused(close_cause(protocol, frame.as_ref())));
            }
            Ok(Some(Ok(m @ (WsMessage::Text(_) | WsMessage::Binary(_))))) => m,
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(refused(describe(&e))),
            Ok(None) => return Err(refused("the connection ended".into())),
        };
        decoded.clear();
        let ready = protocol.decode(message.clone(), &mut decoded).is_ok()
            && decoded.iter().any(|e| matches!(e, WireEvent::Ready));
        if ready {
            counters.received.fetch_add(1, Ordering::Relaxed);
            return Ok((ws, early));
        }
        if early_bytes + message.len() <= MAX_EARLY_BYTES {
            early_bytes += message.len();
            early.push(message);
            continue;
        }
        counters.received.fetch_add(1, Ordering::Relaxed);
        if !dropped_early {
            dropped_early = true;
            tracing::warn!(
                "{service} sent more than {MAX_EARLY_BYTES} bytes before it was ready; the rest is dropped"
            );
        }
    }
}

/// A message waiting to go to the service, not yet encoded.
enum Outbound {
    /// The user's audio, in the protocol's input format: stale once the
    /// service was away, and dropped then.
    Audio(AudioFrame),
    /// Text of the agent's reply `reply`: still wanted after a reconnect
    /// while that reply is the one in flight.
    Reply { reply: u64, text: String },
    /// The end of the agent's reply `reply`.
    ReplyEnd { reply: u64 },
    /// The user barged in.
    Cancel,
    /// The user's turn ended.
    EndOfTurn,
}

enum SpeakerMsg {
    Audio(AudioFrame),
    Done,
    Failed(String),
}

/// The spoken reply in flight: where the service's audio goes while it
/// speaks the agent's text.
struct Sink {
    id: u64,
    format: AudioFormat,
    tx: mpsc::Sender<SpeakerMsg>,
    heard: bool,
}

struct Shared {
    service: &'static str,
    counters: Arc<LinkCounters>,
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
            format!("the session's link to {} is lost: {why}", self.service),
        )
    }
}

/// The user's audio and turn ends to the service.
struct Input {
    out: mpsc::Sender<Outbound>,
    shared: Arc<Shared>,
    format: AudioFormat,
    converter: FormatFollower,
}

impl Input {
    fn queue(&self, op: &'static str, message: Outbound) -> Result<()> {
        match self.out.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.counters.dropped_input();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.shared.lost(op)),
        }
    }
}

impl LinkInput for Input {
    fn push_audio(&mut self, frame: &AudioFrame) -> Result<()> {
        const OP: &str = "link.push_audio";
        if self.shared.is_failed.load(Ordering::Acquire) {
            return Err(self.shared.lost(OP));
        }
        match self.converter.convert(frame.clone(), self.format)? {
            Some(frame) => self.queue(OP, Outbound::Audio(frame)),
            None => Ok(()),
        }
    }

    fn end_turn(&mut self) -> Result<()> {
        self.queue("link.end_turn", Outbound::EndOfTurn)
    }

    fn cancel(&mut self) {
        // The reply in flight stops hearing the service (its sink goes);
        // the service is told if its protocol has a way to say it.
        self.shared.sink().take();
        let _ = self.out.try_send(Outbound::Cancel);
    }
}

/// Speaks the agent's text through the service.
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
        const OP: &str = "link.speak";
        let service = self.shared.service;
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
        for message in [
            Outbound::Reply {
                reply: id,
                text: text.to_owned(),
            },
            Outbound::ReplyEnd { reply: id },
        ] {
            self.out
                .send(message)
                .await
                .map_err(|_| self.shared.lost(OP))?;
        }
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
                        format!("{service}'s connection dropped mid-reply: {why}"),
                    ));
                }
                Err(_) if heard => return Ok(()),
                Err(_) => {
                    return Err(BackendError::new(
                        OP,
                        ErrorCode::Timeout,
                        format!(
                            "{service} spoke no audio for the reply within timeout = {}",
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
    /// The service went away: reconnect.
    Lost(String),
}

/// The link's task: owns the protocol and the connection.
struct Task<P> {
    protocol: P,
    settings: LinkSettings,
    shared: Arc<Shared>,
    events: LinkEvents,
    /// Converts the service's audio to where it goes.
    converter: FormatFollower,
    logged_malformed: bool,
    /// Messages of the reply in flight kept through a reconnect, written
    /// first on the new connection.
    resend: Vec<WsMessage>,
    /// What the last message decoded into (kept for its allocation).
    decoded: Vec<WireEvent>,
}

impl<P: WireProtocol> Task<P> {
    async fn run(mut self, mut ws: Ws, mut out: mpsc::Receiver<Outbound>, early: Vec<WsMessage>) {
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
                    tracing::warn!(endpoint = %self.settings.dial.endpoint, "lost {}: {cause}", self.protocol.service());
                    match self.reconnect(&cause, &mut out).await {
                        Some(new) => ws = new,
                        None => return,
                    }
                }
            }
        }
    }

    /// Encodes one outbound message.
    fn encode(&mut self, message: Outbound, into: &mut Vec<WsMessage>) {
        match message {
            Outbound::Audio(frame) => into.push(self.protocol.encode_audio(frame)),
            Outbound::Reply { text, .. } => into.extend(self.protocol.encode_reply(&text)),
            Outbound::ReplyEnd { .. } => into.extend(self.protocol.encode_reply_end()),
            Outbound::Cancel => into.extend(self.protocol.encode_cancel()),
            Outbound::EndOfTurn => into.extend(self.protocol.encode_end_of_turn()),
        }
    }

    /// Carries messages both ways until one side ends.
    async fn serve(&mut self, ws: &mut Ws, out: &mut mpsc::Receiver<Outbound>) -> Ended {
        if !self.resend.is_empty() {
            let batch = std::mem::take(&mut self.resend);
            if let Err(ended) = self.write(ws, batch).await {
                return ended;
            }
        }
        let keepalive = self.settings.keepalive;
        let idle = tokio::time::sleep(keepalive.unwrap_or(Duration::MAX));
        tokio::pin!(idle);
        loop {
            tokio::select! {
                biased;
                () = self.events.closed() => return Ended::SessionGone,
                msg = ws.next() => match msg {
                    Some(Ok(WsMessage::Close(frame))) => {
                        return Ended::Lost(close_cause(&self.protocol, frame.as_ref()));
                    }
                    Some(Ok(m @ (WsMessage::Text(_) | WsMessage::Binary(_)))) => self.on_message(m).await,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Ended::Lost(describe(&e)),
                    None => return Ended::Lost("the connection ended".into()),
                },
                next = out.recv() => {
                    let Some(first) = next else { return Ended::SessionGone };
                    let mut batch = Vec::new();
                    self.encode(first, &mut batch);
                    while let Ok(more) = out.try_recv() {
                        self.encode(more, &mut batch);
                    }
                    if let Err(ended) = self.write(ws, batch).await {
                        return ended;
                    }
                    if let Some(every) = keepalive {
                        idle.as_mut().reset(tokio::time::Instant::now() + every);
                    }
                }
                () = &mut idle, if keepalive.is_some() => {
                    if let Err(ended) = self.write(ws, vec![WsMessage::Ping(Default::default())]).await {
                        return ended;
                    }
                    if let Some(every) = keepalive {
                        idle.as_mut().reset(tokio::time::Instant::now() + every);
                    }
                }
            }
        }
    }

    /// Writes `batch` within the reply timeout and counts it. A service that
    /// stops reading (a stalled process) would hold the link, and the
    /// session's stop, for as long as TCP keeps trying: after the timeout it
    /// counts as lost.
    async fn write(
        &mut self,
        ws: &mut Ws,
        batch: Vec<WsMessage>,
    ) -> std::result::Result<(), Ended> {
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len() as u64;
        let write = async {
            for message in batch {
                ws.feed(message).await?;
            }
            ws.flush().await
        };
        let patience = self.shared.reply_timeout;
        match tokio::time::timeout(patience, write).await {
            Ok(Ok(())) => {
                self.shared.counters.sent.fetch_add(n, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(e)) => Err(Ended::Lost(describe(&e))),
            Err(_) => Err(Ended::Lost(format!(
                "it took nothing for {}",
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
        self.emit(LinkEvent::Connection(ConnectionState::Reconnecting))
            .await;
        let service = self.protocol.service();
        let retry = self.settings.retry;
        let outcome = {
            let (protocol, settings, counters) =
                (&mut self.protocol, &self.settings, &self.shared.counters);
            let protocol = tokio::sync::Mutex::new(protocol);
            let attempt = || async {
                let mut protocol = protocol.lock().await;
                let (ws, early) = connect(&mut **protocol, settings, counters).await?;
                // What the service said before it was ready is of no reply
                // in flight.
                counters
                    .received
                    .fetch_add(early.len() as u64, Ordering::Relaxed);
                Ok::<_, BackendError>(ws)
            };
            tokio::select! {
                () = self.events.closed() => return None,
                r = retry.run("link.reconnect", service, attempt, |retry, delay, e| {
                    tracing::warn!(retry, "reconnecting to {service} failed, retrying in {delay:?}: {}", e.message);
                }) => r,
            }
        };
        match outcome {
            Ok(ws) => {
                tracing::info!(endpoint = %self.settings.dial.endpoint, "reconnected to {service}");
                self.shared
                    .counters
                    .reconnects
                    .fetch_add(1, Ordering::Relaxed);
                // Audio queued while the service was away is stale: drop it.
                // The text of the reply in flight (one the agent made while
                // the link was reconnecting) goes first; a reply that already
                // failed with the old connection is dropped, as are barge-ins
                // and turn ends of the time away.
                let current = self.shared.sink().as_ref().map(|s| s.id);
                while let Ok(message) = out.try_recv() {
                    match message {
                        Outbound::Audio(_) => self.shared.counters.dropped_input(),
                        m @ (Outbound::Reply { reply, .. } | Outbound::ReplyEnd { reply })
                            if Some(reply) == current =>
                        {
                            let mut encoded = std::mem::take(&mut self.resend);
                            self.encode(m, &mut encoded);
                            self.resend = encoded;
                        }
                        _ => {}
                    }
                }
                self.emit(LinkEvent::Connection(ConnectionState::Connected))
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
                let message = format!("lost {service} at {}: {why}", self.settings.dial.endpoint);
                self.emit(LinkEvent::Failed {
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
            tracing::warn!(endpoint = %self.settings.dial.endpoint, "skipping a message from {}: {what} (further ones are only counted)", self.protocol.service());
        }
    }

    /// Hands `event` to the session's task ([`LinkEvents::send`]), counting
    /// dropped audio. A session that is gone is seen by `serve` next.
    async fn emit(&mut self, event: LinkEvent) {
        let handed = self.events.send(event).await;
        self.count(handed);
    }

    fn count(&self, handed: Handed) {
        if handed == Handed::Dropped {
            self.shared.counters.dropped_output();
        }
    }

    async fn on_message(&mut self, message: WsMessage) {
        self.shared
            .counters
            .received
            .fetch_add(1, Ordering::Relaxed);
        let mut decoded = std::mem::take(&mut self.decoded);
        decoded.clear();
        if let Err(what) = self.protocol.decode(message, &mut decoded) {
            self.on_malformed(&what);
        }
        for event in decoded.drain(..) {
            self.on_event(event).await;
        }
        self.decoded = decoded;
    }

    async fn on_event(&mut self, event: WireEvent) {
        match event {
            WireEvent::Ready => {}
            WireEvent::UserTranscript { text, is_final } => {
                self.emit(LinkEvent::UserTranscript { text, is_final })
                    .await;
            }
            WireEvent::ServiceText(text) => {
                // While the service speaks the agent's text, the agent's
                // text is already in the session's events.
                let speaking = self.shared.sink().is_some();
                if !speaking {
                    self.emit(LinkEvent::ServiceText(text)).await;
                }
            }
            WireEvent::Audio(frame) => self.on_audio(frame),
            WireEvent::SpeakingStopped => {
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
                    self.emit(LinkEvent::ReplyDone).await;
                }
            }
            WireEvent::Interrupted => {
                self.shared.sink().take();
                self.emit(LinkEvent::Interrupted).await;
            }
            WireEvent::Error(message) => {
                tracing::warn!(endpoint = %self.settings.dial.endpoint, "{} reports an error: {message}", self.protocol.service());
            }
        }
    }

    fn on_audio(&mut self, frame: AudioFrame) {
        let mut sink = self.shared.sink();
        let to = sink.as_ref().map_or(INTERNAL_FORMAT, |s| s.format);
        let frame = match self.converter.convert(frame, to) {
            Ok(f) => f,
            Err(e) => {
                drop(sink);
                self.on_malformed(&format!("audio that cannot be converted: {}", e.message));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_values_stay_one_path_segment_or_query_value() {
        let t = "ws://bot:8765/u/{user_id}/ws?session={session_id}";
        assert_eq!(
            Dial::render_template(t, "sess_1", "a b/c?d#e&f=g+h.i"),
            "ws://bot:8765/u/a%20b%2Fc%3Fd%23e%26f%3Dg%2Bh%2Ei/ws?session=sess_1"
        );
        assert_eq!(
            Dial::render_template(t, "s", "zoë"),
            "ws://bot:8765/u/zo%C3%AB/ws?session=s"
        );
        for user in ["a/../b", "%2e%2e", "...", "~x-y_z"] {
            let url = url::Url::parse(&Dial::render_template(t, "s", user)).unwrap();
            let segments: Vec<&str> = url.path_segments().unwrap().collect();
            assert_eq!(segments.len(), 3, "{user}: {url}");
            assert_eq!(segments[0], "u");
            assert_eq!(segments[2], "ws");
            let decoded = percent_encoding::percent_decode_str(segments[1])
                .decode_utf8()
                .unwrap();
            assert_eq!(decoded, user);
        }
    }
}
