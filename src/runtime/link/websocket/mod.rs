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
//! service (the speaker). A service with several equivalent endpoints is
//! failed over ([`Endpoints`], [`LinkSettings::with_fallbacks`]): each
//! connect and reconnect takes the first endpoint that answers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use tokio_tungstenite::tungstenite::Message as WsMessage;

mod connect;
mod endpoints;
mod session;
mod task;

use endpoints::connect_any;
pub use endpoints::{ENDPOINT_INFO_KEY, ENDPOINT_STAGE, Endpoints, Fallbacks};
use session::{Input, Shared, Speaker};
use task::Task;

use super::{
    Handed, Link, LinkEvent, LinkEvents, LinkInput, LinkRequest, RetryPolicy, ServiceLink,
};
use crate::audio::{AudioFormat, AudioFrame, FormatFollower};
use crate::config::Secret;
use crate::error::{BackendError, ErrorCode, Result};
use crate::metrics::{DropReason, Metrics};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket connection [`Dial::connect`] made.
pub type WsStream = Ws;

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
    /// The service ended the session for good (a call hung up on its side),
    /// with why: the link closes without reconnecting, and the session hears
    /// [`LinkEvent::Failed`] with `ConnectionFailed` and the cause.
    Ended(String),
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

    /// Messages to send when the session ends, before the connection is
    /// closed (e.g. a `close` command after which the service finishes what
    /// it was doing and closes). When there are any, the link waits up to a
    /// second for the service to close. Nothing by default.
    fn farewell(&mut self) -> Vec<WsMessage> {
        Vec::new()
    }

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

    /// Checks the fallback URLs `rest` of a provider's config, which come
    /// after `first`: each must pass [`Dial::check_url`] and differ from
    /// every URL before it. Returns `(index in rest, what is wrong)` for
    /// each bad one, without repeating URLs (they may hold credentials).
    pub fn check_fallback_urls(first: &str, rest: &[String]) -> Vec<(usize, String)> {
        let mut bad = Vec::new();
        for (i, url) in rest.iter().enumerate() {
            if let Err(m) = Dial::check_url(url) {
                bad.push((i, m));
            } else if url == first {
                bad.push((i, "repeats the first URL".into()));
            } else if let Some(j) = rest[..i].iter().position(|u| u == url) {
                bad.push((i, format!("repeats entry {j}")));
            }
        }
        bad
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

    /// Dials once, with the headers and the message size limit, for a
    /// connection a provider keeps itself (one shared by a backend's
    /// sessions); a session's link dials with [`WebSocketLink::open`].
    ///
    /// # Errors
    ///
    /// `AuthenticationFailed` for an HTTP 401 or 403 answer,
    /// `RateLimitExceeded` for 429, `InvalidConfig` for a URL or header that
    /// cannot be used, `ConnectionFailed` otherwise. Messages name the
    /// endpoint, never the URL.
    pub async fn connect(&self, service: &str) -> Result<WsStream> {
        connect::dial(self, service).await
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
    /// Equivalent endpoints tried after `dial` when it does not answer
    /// ([`LinkSettings::with_fallbacks`]); `None`: `dial` only.
    pub fallbacks: Option<Fallbacks>,
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
            fallbacks: None,
        }
    }

    /// The same settings with `dials` as the endpoints after
    /// [`LinkSettings::dial`], in order of preference, failing over as
    /// `endpoints` (made once per backend from all of them, `dial` first)
    /// says; the session's `info` publishes the endpoint serving it
    /// ([`ENDPOINT_INFO_KEY`]). Without `dials`, nothing changes.
    ///
    /// Each connect, and each reconnect of a live link, takes the first
    /// endpoint that answers: see [`Endpoints`] for the order and the switch
    /// back to the primary.
    pub fn with_fallbacks(
        mut self,
        dials: Vec<Dial>,
        endpoints: &Arc<Endpoints>,
        info: Option<&crate::session::SessionInfo>,
    ) -> LinkSettings {
        self.fallbacks = (!dials.is_empty()).then(|| Fallbacks {
            dials,
            endpoints: endpoints.clone(),
            info: info.cloned(),
        });
        self
    }

    /// Endpoint `i`: `dial` first, then the fallbacks.
    fn dial_at(&self, i: usize) -> Option<&Dial> {
        match (i, &self.fallbacks) {
            (0, _) => Some(&self.dial),
            (i, Some(f)) => f.dials.get(i - 1),
            (_, None) => None,
        }
    }

    /// The name of endpoint `i`, for logs: its `host:port`.
    fn endpoint_name(&self, i: usize) -> &str {
        match &self.fallbacks {
            Some(f) => f.endpoints.name(i),
            None => &self.dial.endpoint,
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
    /// Connects (once: the runtime retries opening a session's link; with
    /// fallbacks, to the first endpoint that answers), sends the greeting,
    /// waits for the service to be ready, and starts the link's task.
    ///
    /// # Errors
    ///
    /// `ConnectionFailed` when the service cannot be reached or refuses the
    /// session, `AuthenticationFailed` for an HTTP 401 or 403 answer,
    /// `RateLimitExceeded` for 429, `InvalidConfig` for a URL or header that cannot be used. Messages name
    /// the endpoint, never the URL.
    pub async fn open<P: WireProtocol>(
        mut protocol: P,
        settings: LinkSettings,
        counters: Arc<LinkCounters>,
    ) -> Result<Link> {
        if let Some(metrics) = &settings.metrics {
            counters.use_metrics(metrics);
        }
        let connected = connect_any(&mut protocol, &settings, &counters).await?;
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (events_tx, events_rx) = LinkEvents::channel(EVENT_QUEUE);
        // Opened on a fallback: the session's first event says so (the
        // queue is new, so there is room).
        if let Some(reason) = connected.switch_from(0) {
            let _ = events_tx
                .send(LinkEvent::EndpointSwitched {
                    from: settings.endpoint_name(0).to_owned(),
                    to: settings.endpoint_name(connected.endpoint).to_owned(),
                    reason,
                })
                .await;
        }
        let endpoints::Connected {
            ws,
            early,
            endpoint,
            ..
        } = connected;
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
            ended: None,
            endpoint,
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
