//! The link conformance suite: the behaviour every provider built on the
//! link kit's [`WebSocketLink`](crate::runtime::WebSocketLink) must show,
//! checked against an in-process fake of its service ([`FakeService`],
//! bound to 127.0.0.1:0).
//!
//! A provider's tests describe the service's side of its wire protocol with
//! a [`FakeWire`] (how the service says a transcript, audio, the end of a
//! reply, and what the client's messages are) and run
//! [`link_conformance`]:
//!
//! - audio both ways: the user's audio reaches the service, the service's
//!   audio reaches the session;
//! - transcripts: the service's transcript reaches the session's events
//!   (and ends the turn, by the service's or the local detector's turn
//!   policy);
//! - the agent's reply spoken: the application's agent answers the turn and
//!   its text goes to the service, whose audio comes back as the reply;
//! - barge-in cancels: the service's interruption cuts the reply, and a
//!   local barge-in reaches the service when the protocol can say it;
//! - drop and reconnect: a dropped connection is made again, with
//!   `reconnecting` then `connected` on the session's events;
//! - malformed messages are skipped and counted in the health details;
//! - an auth failure (HTTP 401) fails the session with
//!   `authentication_failed`;
//! - for a provider with fallback endpoints
//!   ([`LinkHarness::config_with_fallbacks`]), failover of the link: a
//!   primary that refuses, or does not answer the handshake within
//!   `failover.timeout`, leaves the session to the next endpoint, whose
//!   reply reaches it; a primary lost mid-session is failed over by the
//!   reconnect; a primary back (found by the health check) serves the next
//!   sessions; which endpoint serves is in the session's info, the health
//!   details and the component metrics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

use crate::agent::{AgentReply, agent_fn};
use crate::audio::AudioFrame;
use crate::backend::{ConnectionState, VoiceBackend};
use crate::config::{Config, SessionConfig};
use crate::error::ErrorCode;
use crate::pipeline::events::{SessionEvent, SessionEvents};
use crate::provider::TurnPolicy;
use crate::registry::registry;
use crate::runtime::WsMessage;
use crate::session::VoiceSession;
use crate::session::events::SwitchReason;
use crate::testing::conformance::expect_event_within;
use crate::testing::signal;

/// What a client message is, as the fake service reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientSaid {
    /// The client's greeting: the service answers with
    /// [`FakeWire::ready`].
    Greeting,
    /// User audio, this many bytes of it.
    Audio(usize),
    /// The agent's reply text (or a piece of it) to speak.
    Reply(String),
    /// The end of the agent's reply.
    ReplyEnd,
    /// The user barged in.
    Cancel,
    /// The user's turn ended.
    EndOfTurn,
    /// Anything else.
    Other,
}

/// The service's side of a provider's wire protocol, for the fake.
pub trait FakeWire: Send + Sync + 'static {
    /// What a client message is.
    fn client_said(&self, message: &WsMessage) -> ClientSaid;
    /// What the service sends in answer to the greeting (a ready message);
    /// nothing by default.
    fn ready(&self) -> Vec<WsMessage> {
        Vec::new()
    }
    /// A transcript of the user.
    fn transcript(&self, text: &str, is_final: bool) -> WsMessage;
    /// Reply audio: PCM s16le mono samples at `rate`.
    fn audio(&self, samples: &[i16], rate: u32) -> WsMessage;
    /// The end of the reply the service was speaking.
    fn reply_done(&self) -> Vec<WsMessage>;
    /// The service cut its reply short.
    fn interrupted(&self) -> Vec<WsMessage>;
    /// A message the client cannot decode.
    fn malformed(&self) -> WsMessage;
    /// Whether the protocol tells the service of a barge-in
    /// ([`ClientSaid::Cancel`]).
    fn has_cancel(&self) -> bool {
        false
    }
}

/// What the fake service heard and does.
#[derive(Default)]
struct State {
    connections: AtomicUsize,
    audio_bytes: AtomicUsize,
    cancels: AtomicUsize,
    turn_ends: AtomicUsize,
    replies: Mutex<Vec<String>>,
    /// Commands for the connection now open.
    current: Mutex<Option<mpsc::UnboundedSender<Command>>>,
}

enum Command {
    Send(WsMessage),
    Drop,
}

/// A fake service on 127.0.0.1: accepts WebSocket connections (with an
/// `authorization: Bearer <token>` header when it requires one, else HTTP
/// 401), reads the client's messages through its [`FakeWire`], answers the
/// greeting, speaks each reply it is given (a few frames of audio, then the
/// end of the reply), and sends what the test tells it to.
pub struct FakeService {
    url: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The sample rate of the fake's reply audio.
const REPLY_RATE: u32 = 16_000;

impl FakeService {
    /// Starts the fake; `token`, when set, is required.
    pub async fn start(wire: impl FakeWire, token: Option<&str>) -> FakeService {
        FakeService::start_on(wire, token, 0).await
    }

    /// Starts the fake on 127.0.0.1:`port` (0: any free port), e.g. again
    /// where a fake that was dropped listened; waits up to ten seconds for
    /// the port to be free.
    pub async fn start_on(wire: impl FakeWire, token: Option<&str>, port: u16) -> FakeService {
        let deadline = Instant::now() + PATIENCE;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("bind 127.0.0.1:{port}: {e}"),
            }
        };
        let url = format!("ws://{}/", listener.local_addr().expect("local address"));
        let state = Arc::new(State::default());
        let wire = Arc::new(wire);
        let token = token.map(|t| format!("Bearer {t}"));
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    tokio::spawn(serve(tcp, wire.clone(), state.clone(), token.clone()));
                }
            }
        });
        FakeService { url, state, task }
    }

    /// The service's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Bytes of user audio heard so far.
    pub fn audio_bytes(&self) -> usize {
        self.state.audio_bytes.load(Ordering::SeqCst)
    }

    /// Barge-ins the client told of.
    pub fn cancels(&self) -> usize {
        self.state.cancels.load(Ordering::SeqCst)
    }

    /// Turn ends the client told of.
    pub fn turn_ends(&self) -> usize {
        self.state.turn_ends.load(Ordering::SeqCst)
    }

    /// The reply texts the client asked the service to speak.
    pub fn replies(&self) -> Vec<String> {
        self.state
            .replies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sends `message` on the connection now open.
    pub fn send(&self, message: WsMessage) {
        self.command(Command::Send(message));
    }

    /// Drops the connection now open, without a close frame.
    pub fn drop_connection(&self) {
        self.command(Command::Drop);
    }

    /// Stops the service as a crash would: it stops listening (connecting
    /// is refused from then on), then the connection now open drops.
    pub async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
        self.drop_connection();
    }

    fn command(&self, command: Command) {
        let current = self
            .state
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let sender = current.as_ref().expect("a client is connected");
        let _ = sender.send(command);
    }
}

async fn serve<W: FakeWire>(
    tcp: tokio::net::TcpStream,
    wire: Arc<W>,
    state: Arc<State>,
    token: Option<String>,
) {
    // The shape tungstenite's handshake callback takes.
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        let given = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match &token {
            Some(t) if given != Some(t.as_str()) => {
                let mut refusal = ErrorResponse::new(Some("no entry".into()));
                *refusal.status_mut() = StatusCode::UNAUTHORIZED;
                Err(refusal)
            }
            _ => Ok(response),
        }
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
        return;
    };
    state.connections.fetch_add(1, Ordering::SeqCst);
    let (tx, mut commands) = mpsc::unbounded_channel();
    *state.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Send(m)) => {
                    if ws.send(m).await.is_err() {
                        return;
                    }
                }
                Some(Command::Drop) | None => return,
            },
            message = ws.next() => {
                let Some(Ok(message)) = message else { return };
                if message.is_close() || message.is_ping() || message.is_pong() {
                    continue;
                }
                let mut out = Vec::new();
                match wire.client_said(&message) {
                    ClientSaid::Greeting => out = wire.ready(),
                    ClientSaid::Audio(n) => {
                        state.audio_bytes.fetch_add(n, Ordering::SeqCst);
                    }
                    ClientSaid::Reply(text) => {
                        state
                            .replies
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(text);
                        // Speaks it: 2 s of audio, then the reply's end.
                        let speech = signal::speech_like(Duration::from_millis(20), 9);
                        for _ in 0..100 {
                            out.push(wire.audio(&speech, REPLY_RATE));
                        }
                        out.extend(wire.reply_done());
                    }
                    ClientSaid::Cancel => {
                        state.cancels.fetch_add(1, Ordering::SeqCst);
                    }
                    ClientSaid::EndOfTurn => {
                        state.turn_ends.fetch_add(1, Ordering::SeqCst);
                        out.push(wire.transcript("the user's words", true));
                    }
                    ClientSaid::ReplyEnd | ClientSaid::Other => {}
                }
                for m in out {
                    if ws.send(m).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// How the suite makes the provider's config for a fake service.
pub trait LinkHarness: Send + Sync {
    /// The fake's side of the wire.
    type Wire: FakeWire + Clone;
    /// The wire.
    fn wire(&self) -> Self::Wire;
    /// A config of the provider under test for the service at `url`, with
    /// `token` as its credential when given.
    fn config(&self, url: &str, token: Option<&str>) -> Config;
    /// A config of the provider under test for equivalent services at
    /// `urls`, in order of preference (the first as its primary, the rest as
    /// its fallback endpoints), with `token` as their credential when
    /// given; `None` (the default) when the provider has no fallback
    /// endpoints, and the failover checks are skipped.
    fn config_with_fallbacks(&self, urls: &[&str], token: Option<&str>) -> Option<Config> {
        let _ = (urls, token);
        None
    }
}

const PATIENCE: Duration = Duration::from_secs(10);

async fn next_event(
    events: &mut SessionEvents,
    what: &str,
    pred: impl FnMut(&SessionEvent) -> bool,
) -> SessionEvent {
    expect_event_within(PATIENCE, events, what, pred).await
}

async fn wait_until(what: &str, done: impl FnMut() -> bool) {
    crate::testing::conformance::wait_until(PATIENCE, what, done).await
}

async fn backend_for(
    h: &impl LinkHarness,
    url: &str,
    token: Option<&str>,
) -> Arc<dyn VoiceBackend> {
    let config = h.config(url, token);
    let backend = registry()
        .create(&config.provider.clone(), &config)
        .await
        .expect("the harness's config makes a backend");
    backend.start().await.expect("the backend starts");
    backend
}

/// Speaks one utterance to the session in real time (20 ms frames).
async fn utter(session: &dyn VoiceSession) {
    let audio = signal::utterance(Duration::from_millis(600), Duration::from_millis(900), 3);
    for frame in signal::frames(&audio, 20) {
        session
            .process_audio(frame)
            .await
            .expect("process_audio accepts 20 ms frames");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs every check of the link conformance suite against fakes of the
/// harness's service. Panics with what the provider did wrong.
pub async fn link_conformance(h: &impl LinkHarness) {
    let wire = h.wire();
    let service = FakeService::start(wire.clone(), Some("secret-token")).await;
    let backend = backend_for(h, service.url(), Some("secret-token")).await;
    let turns = registry()
        .get_provider(backend.provider())
        .expect("the provider is registered")
        .capabilities()
        .turns;
    let session = backend
        .create_session(SessionConfig::new("ann"))
        .await
        .expect("a session opens a link to the fake service");
    let mut events = session.events();
    let mut reply_audio = session.receive_audio().expect("the reply audio stream");
    session.set_agent(agent_fn(|turn| {
        let answer = format!("you said: {}", turn.transcript);
        async move { Ok(AgentReply::text(answer)) }
    }));
    session.start().await.expect("the session starts");
    assert_eq!(service.connections(), 1, "one connection per session");

    // Audio both ways: the user's audio reaches the service.
    utter(&*session).await;
    wait_until("the service hears the user's audio", || {
        service.audio_bytes() > 0
    })
    .await;

    // Transcripts, and the agent's reply spoken through the service.
    if turns == TurnPolicy::Service {
        service.send(wire.transcript("hello th", false));
        service.send(wire.transcript("hello there", true));
    } else {
        wait_until("the local turn end reaches the service", || {
            service.turn_ends() > 0
        })
        .await;
    }
    let heard = next_event(&mut events, "the final transcript", |e| {
        matches!(e, SessionEvent::UserTranscript { is_final: true, .. })
    })
    .await;
    let SessionEvent::UserTranscript { text, .. } = heard else {
        unreachable!()
    };
    next_event(
        &mut events,
        "the agent's text",
        |e| matches!(e, SessionEvent::AgentText { text: t } if *t == format!("you said: {text}")),
    )
    .await;
    wait_until("the reply goes to the service", || {
        !service.replies().is_empty()
    })
    .await;
    assert_eq!(service.replies()[0], format!("you said: {text}"));
    let frame: AudioFrame = timeout(PATIENCE, reply_audio.recv())
        .await
        .expect("the service's audio reaches the session")
        .expect("the reply stream is open");
    assert!(!frame.data().is_empty());
    next_event(&mut events, "the end of the reply", |e| {
        matches!(e, SessionEvent::State { to, .. } if *to == crate::session::PipelineState::Listening)
    })
    .await;

    // Barge-in: the service's interruption cuts the reply it is speaking.
    session
        .send_text("tell me more")
        .await
        .expect("a text turn");
    wait_until("the second reply", || service.replies().len() >= 2).await;
    timeout(PATIENCE, reply_audio.recv())
        .await
        .expect("the second reply's audio")
        .expect("the reply stream is open");
    for m in wire.interrupted() {
        service.send(m);
    }
    next_event(&mut events, "the interruption", |e| {
        matches!(e, SessionEvent::Interrupted { .. })
    })
    .await;
    if wire.has_cancel() {
        // A local barge-in during a reply is told to the service.
        session.send_text("and more").await.expect("a text turn");
        wait_until("the third reply", || service.replies().len() >= 3).await;
        timeout(PATIENCE, reply_audio.recv())
            .await
            .expect("the third reply's audio")
            .expect("the reply stream is open");
        session.send_text("stop").await.expect("a barge-in by text");
        wait_until("the service hears the barge-in", || service.cancels() > 0).await;
    }

    // Malformed messages are skipped and counted.
    service.send(wire.malformed());
    let counter = format!("{}_messages_malformed", backend.provider());
    let deadline = Instant::now() + PATIENCE;
    loop {
        let health = backend.health_check().await;
        let n: u64 = health
            .details
            .get(&counter)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("health details have {counter}: {:?}", health.details));
        if n >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the malformed message is counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Drop and reconnect.
    service.drop_connection();
    next_event(&mut events, "reconnecting", |e| {
        matches!(
            e,
            SessionEvent::Connection {
                state: ConnectionState::Reconnecting
            }
        )
    })
    .await;
    next_event(&mut events, "connected again", |e| {
        matches!(
            e,
            SessionEvent::Connection {
                state: ConnectionState::Connected
            }
        )
    })
    .await;
    assert_eq!(service.connections(), 2);
    let before = service.audio_bytes();
    utter(&*session).await;
    wait_until("audio flows after the reconnect", || {
        service.audio_bytes() > before
    })
    .await;
    session.stop().await.expect("the session stops");
    backend.stop().await.expect("the backend stops");

    // An auth failure is named as one.
    let backend = backend_for(h, service.url(), Some("wrong-token")).await;
    let Err(err) = backend.create_session(SessionConfig::new("bob")).await else {
        panic!("a refused credential fails the session");
    };
    assert_eq!(err.code, ErrorCode::AuthenticationFailed, "{err}");
    assert!(
        !err.to_string().contains("wrong-token"),
        "the credential stays out of the error: {err}"
    );
    backend.stop().await.expect("the backend stops");

    failover_conformance(h).await;
}

/// A `ws://` URL on a loopback port where nothing listens (bound, then let
/// go): connecting is refused.
async fn refusing_url() -> (String, u16) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("local address").port();
    (format!("ws://127.0.0.1:{port}/"), port)
}

/// The `host:port` a session's info names as its endpoint, the way the
/// link kit names it.
fn endpoint_name(url: &str) -> String {
    crate::runtime::endpoint_of(url)
}

/// A backend for the services at `urls` (with fallbacks), or `None` when
/// the provider has none.
async fn failover_backend(h: &impl LinkHarness, urls: &[&str]) -> Option<Arc<dyn VoiceBackend>> {
    let mut config = h.config_with_fallbacks(urls, None)?;
    // A primary that failed is tried last for a moment only, and a
    // handshake that does not come is given up quickly.
    config.failover.timeout = Duration::from_millis(500);
    config.failover.probe_interval = Duration::from_millis(300);
    let backend = registry()
        .create(&config.provider.clone(), &config)
        .await
        .expect("the harness's config with fallbacks makes a backend");
    backend
        .start()
        .await
        .expect("the backend starts while one endpoint answers");
    Some(backend)
}

/// One turn of `session`, served by `service`: the user's turn (the
/// service's final transcript, or the local detector's turn end), the
/// agent's reply spoken by `service`, its audio back.
async fn turn_served_by(
    h: &impl LinkHarness,
    service: &FakeService,
    session: &dyn VoiceSession,
    events: &mut SessionEvents,
    audio: &mut crate::session::AudioReceiver,
) {
    let wire = h.wire();
    let turns = registry()
        .get_provider(&h.config(service.url(), None).provider)
        .expect("the provider is registered")
        .capabilities()
        .turns;
    let replies = service.replies().len();
    if turns == TurnPolicy::Service {
        service.send(wire.transcript("are you there", true));
    } else {
        utter(session).await;
    }
    next_event(
        events,
        "the agent's reply to the turn",
        |e| matches!(e, SessionEvent::AgentText { text } if text.starts_with("you said")),
    )
    .await;
    wait_until("the reply goes to the serving endpoint", || {
        service.replies().len() > replies
    })
    .await;
    timeout(PATIENCE, audio.recv())
        .await
        .expect("the serving endpoint's reply audio reaches the session")
        .expect("the reply stream is open");
}

async fn health_detail(backend: &dyn VoiceBackend, key: &str) -> String {
    let health = backend.health_check().await;
    let prefixed = format!("{}_{key}", backend.provider());
    health
        .details
        .get(&prefixed)
        .cloned()
        .unwrap_or_else(|| panic!("health details have {prefixed}: {:?}", health.details))
}

fn switches(backend: &dyn VoiceBackend, from: &str, to: &str) -> Vec<String> {
    let metrics = backend.metrics().expect("the backend has metrics");
    metrics
        .snapshot()
        .component_switches
        .keys()
        .filter(|(stage, f, t, _)| stage == crate::runtime::ENDPOINT_STAGE && f == from && t == to)
        .map(|(_, _, _, reason)| reason.clone())
        .collect()
}

async fn failover_session(
    backend: &dyn VoiceBackend,
    user: &str,
) -> (
    Arc<dyn VoiceSession>,
    SessionEvents,
    crate::session::AudioReceiver,
) {
    let session = backend
        .create_session(SessionConfig::new(user))
        .await
        .expect("a session opens on an endpoint that answers");
    let events = session.events();
    let audio = session.receive_audio().expect("the reply audio stream");
    session.set_agent(agent_fn(|turn| {
        let answer = format!("you said: {}", turn.transcript);
        async move { Ok(AgentReply::text(answer)) }
    }));
    session.start().await.expect("the session starts");
    (session, events, audio)
}

/// Waits for the session's event saying its link moved from endpoint
/// `from` to `to`, for one of `why` (a primary refused by this link, or
/// passed over as down after another's failure).
async fn switched(events: &mut SessionEvents, from: &str, to: &str, why: &[SwitchReason]) {
    let what = format!("the session's switch from {from} to {to} ({why:?})");
    next_event(events, &what, |e| {
        matches!(
            e,
            SessionEvent::ComponentSwitched { stage, from: f, to: t, reason }
                if stage == crate::runtime::ENDPOINT_STAGE && f == from && t == to && why.contains(reason)
        )
    })
    .await;
}

fn served_by(session: &dyn VoiceSession) -> Option<String> {
    session.info().get(crate::runtime::ENDPOINT_INFO_KEY)
}

/// The failover checks of [`link_conformance`], for a provider with
/// fallback endpoints.
async fn failover_conformance(h: &impl LinkHarness) {
    let wire = h.wire();
    // A primary that refuses: the session opens on the fallback, which
    // serves its turn.
    let (primary_url, primary_port) = refusing_url().await;
    let fallback = FakeService::start(wire.clone(), None).await;
    let Some(backend) = failover_backend(h, &[&primary_url, fallback.url()]).await else {
        return;
    };
    let (primary, second) = (endpoint_name(&primary_url), endpoint_name(fallback.url()));
    let (session, mut events, mut audio) = failover_session(&*backend, "fay").await;
    switched(
        &mut events,
        &primary,
        &second,
        &[SwitchReason::Error, SwitchReason::Down],
    )
    .await;
    assert_eq!(fallback.connections(), 1, "the fallback serves the session");
    assert_eq!(served_by(&*session).as_deref(), Some(second.as_str()));
    turn_served_by(h, &fallback, &*session, &mut events, &mut audio).await;
    assert_eq!(health_detail(&*backend, "endpoint_0").await, primary);
    assert_eq!(health_detail(&*backend, "endpoint_0_state").await, "down");
    assert_eq!(health_detail(&*backend, "endpoint_1_state").await, "up");
    assert_eq!(health_detail(&*backend, "endpoint_active").await, second);
    let why = switches(&*backend, &primary, &second);
    assert!(
        why.iter().any(|r| r == "error" || r == "down"),
        "pipeline_component_switches_total{{stage=\"provider\"}} counts the switch: {why:?}"
    );
    session.stop().await.expect("the session stops");

    // The primary comes back: the health check finds it, the next session
    // is served by it.
    let primary_service = FakeService::start_on(wire.clone(), None, primary_port).await;
    assert_eq!(health_detail(&*backend, "endpoint_0_state").await, "up");
    let (session, mut events, mut audio) = failover_session(&*backend, "gus").await;
    assert_eq!(primary_service.connections(), 1, "the primary serves again");
    assert_eq!(served_by(&*session).as_deref(), Some(primary.as_str()));
    assert!(
        switches(&*backend, &second, &primary).contains(&"recovered".to_owned()),
        "the switch back is counted as recovered"
    );

    // The primary is lost mid-session: the reconnect fails over, and the
    // next turn is served by the fallback.
    primary_service.kill().await;
    next_event(&mut events, "reconnecting", |e| {
        matches!(
            e,
            SessionEvent::Connection {
                state: ConnectionState::Reconnecting
            }
        )
    })
    .await;
    next_event(&mut events, "connected to the fallback", |e| {
        matches!(
            e,
            SessionEvent::Connection {
                state: ConnectionState::Connected
            }
        )
    })
    .await;
    switched(&mut events, &primary, &second, &[SwitchReason::Error]).await;
    assert_eq!(
        fallback.connections(),
        2,
        "the reconnect goes to the fallback"
    );
    assert_eq!(served_by(&*session).as_deref(), Some(second.as_str()));
    turn_served_by(h, &fallback, &*session, &mut events, &mut audio).await;
    let served = backend
        .metrics()
        .expect("the backend has metrics")
        .snapshot()
        .component_served;
    let key = (crate::runtime::ENDPOINT_STAGE.to_owned(), second.clone());
    assert!(
        served.get(&key).copied().unwrap_or(0) >= 2,
        "pipeline_component_served_total counts the fallback's turns: {served:?}"
    );
    session.stop().await.expect("the session stops");
    backend.stop().await.expect("the backend stops");

    // A primary that takes the connection but never answers the handshake:
    // given up after failover.timeout, the fallback serves.
    let silent = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let silent_url = format!("ws://{}/", silent.local_addr().expect("local address"));
    let backend = failover_backend(h, &[&silent_url, fallback.url()])
        .await
        .expect("the provider has fallbacks");
    let (session, mut events, mut audio) = failover_session(&*backend, "hal").await;
    switched(
        &mut events,
        &endpoint_name(&silent_url),
        &second,
        &[SwitchReason::Timeout],
    )
    .await;
    assert_eq!(served_by(&*session).as_deref(), Some(second.as_str()));
    turn_served_by(h, &fallback, &*session, &mut events, &mut audio).await;
    let why = switches(&*backend, &endpoint_name(&silent_url), &second);
    assert_eq!(why, ["timeout"], "the switch is counted as a timeout");
    session.stop().await.expect("the session stops");
    backend.stop().await.expect("the backend stops");
    drop(silent);
}
