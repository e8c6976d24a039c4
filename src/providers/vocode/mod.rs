#![doc = include_str!("docs.md")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::sync::{OnceCell, mpsc};

use crate::audio::{AudioFormat, AudioFrame};
use crate::config::{Config, Secret, Violations};
use crate::error::{BackendError, ErrorCode, Result};
use crate::pipeline::TextToSpeech;
use crate::provider::{Codec, HostedStages, ProviderCapabilities, TurnPolicy};
use crate::runtime::{
    Dial, Endpoints, Handed, Link, LinkCounters, LinkEvent, LinkEvents, LinkRequest, LinkSettings,
    Provider, ServiceLink, WebSocketLink,
};

mod hook;
pub mod protocol;

use hook::{Conversation, Hook, HookSettings, Registration};
use protocol::{Answers, AudioSettings, Encoding, VocodeProtocol};

/// The provider's registered name.
pub const NAME: &str = "vocode";

const OP: &str = "vocode.validate_config";
/// Events waiting for the session's task.
const EVENT_QUEUE: usize = 256;
/// Vocode's REST agent gives up on a call after 15 s (and then ends the
/// conversation); an answer must come before.
const MAX_ANSWER_TIMEOUT: Duration = Duration::from_secs(14);

fn default_rate() -> u32 {
    16_000
}

fn default_route() -> String {
    NAME.into()
}

fn default_answer_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Who answers the caller on the Vocode server's side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentSide {
    /// The application's agent: the server's agent is Vocode's REST
    /// user-implemented agent posting to this backend's agent hook
    /// (`agent_hook`). The server's calls are the user's turns.
    #[default]
    Application,
    /// The server's own agent (an LLM agent configured in the server): the
    /// server's human transcripts are the user's turns, and its replies are
    /// relayed.
    Server,
}

/// Where the Vocode server's REST agent reaches the application's agent.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentHookConfig {
    /// The address the hook listens on, e.g. `127.0.0.1:8790`; the server's
    /// REST agent is configured with
    /// `http://{listen or public_url}/callbacks/{route}?token={secret}`.
    #[schemars(with = "String")]
    pub listen: SocketAddr,
    /// The URL the Vocode server reaches the hook by, when not
    /// `http://{listen}` (a proxy in front); `http` or `https`, without
    /// query or credentials.
    pub public_url: Option<String>,
    /// The route's name, the last path segment: 1 to 64 letters, digits,
    /// `-` or `_`. Default `vocode`.
    #[serde(default = "default_route")]
    pub route: String,
    /// The secret the server presents (as `?token=`, Vocode's REST agent
    /// sets no headers); at least 16 characters.
    pub secret: Secret,
    /// How long a call waits for the agent's reply before it is answered
    /// with no text (the conversation goes on); 1s..=14s (Vocode gives up
    /// after 15 s and ends the conversation), default 10s.
    #[serde(default = "default_answer_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub answer_timeout: Duration,
}

impl std::fmt::Debug for AgentHookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHookConfig")
            .field("listen", &self.listen)
            .field(
                "public_url",
                &self.public_url.as_deref().map(crate::config::redact_url),
            )
            .field("route", &self.route)
            .field("secret", &self.secret)
            .field("answer_timeout", &self.answer_timeout)
            .finish()
    }
}

/// The `vocode` provider's `provider_config`.
///
/// ```toml
/// provider = "vocode"
/// [provider_config]
/// url = "ws://127.0.0.1:3000/conversation"
/// [provider_config.agent_hook]
/// listen = "127.0.0.1:8790"
/// secret = "a-long-random-secret-for-the-hook"
/// ```
///
/// `fallback_urls` lists equivalent servers tried in order when the one
/// before does not answer (each configured with the same agent hook): each
/// session's link opens on the first that answers and, when its connection
/// drops, reconnects to the first that answers again; `[failover]`
/// `timeout` bounds each server's handshake and `probe_interval` is how long
/// one that failed is tried last ([`Endpoints`]).
///
/// `Debug` shows the URL without user names, passwords and secret-looking
/// query values, and no secret.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VocodeConfig {
    /// The server's conversation WebSocket (`ws://` or `wss://`), e.g.
    /// `ws://host:3000/conversation` for a `ConversationRouter` mounted at
    /// the root.
    pub url: String,
    /// Equivalent servers' conversation WebSockets, tried in order when the
    /// one before does not answer. Empty by default.
    #[serde(default)]
    pub fallback_urls: Vec<String>,
    /// Sent as `Authorization: Bearer <token>` when connecting (for a proxy
    /// in front of the server; Vocode's router itself checks nothing).
    pub auth_token: Option<Secret>,
    /// Who answers the caller: `application` (default; needs `agent_hook`)
    /// or `server`.
    #[serde(default)]
    pub agent: AgentSide,
    /// Where the server's REST agent calls the application's agent; needed
    /// when `agent = "application"`.
    pub agent_hook: Option<AgentHookConfig>,
    /// The rate of the caller's audio sent to the server, in Hz; default
    /// 16000. The server's transcriber takes what it is told.
    #[serde(default = "default_rate")]
    pub input_sample_rate: u32,
    /// The encoding of the caller's audio: `linear16` (default) or `mulaw`
    /// (8000 Hz only).
    #[serde(default)]
    pub input_encoding: Encoding,
    /// `downsampling` of Vocode's input audio config, passed on.
    pub downsampling: Option<u32>,
    /// The rate the server speaks at, in Hz; default 16000 (always
    /// `linear16`).
    #[serde(default = "default_rate")]
    pub output_sample_rate: u32,
}

impl std::fmt::Debug for VocodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VocodeConfig")
            .field("url", &crate::config::redact_url(&self.url))
            .field(
                "fallback_urls",
                &self
                    .fallback_urls
                    .iter()
                    .map(|u| crate::config::redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("auth_token", &self.auth_token)
            .field("agent", &self.agent)
            .field("agent_hook", &self.agent_hook)
            .field("input_sample_rate", &self.input_sample_rate)
            .field("input_encoding", &self.input_encoding)
            .field("downsampling", &self.downsampling)
            .field("output_sample_rate", &self.output_sample_rate)
            .finish()
    }
}

impl VocodeConfig {
    /// The checks past parsing: one detail per bad field.
    fn check(&self) -> Result<()> {
        let mut v = Violations::new();
        let mut fail = |path: &str, message: String| {
            v.push(format!("provider_config.{path}"), message);
        };
        if let Err(m) = Dial::check_url(&self.url) {
            fail("url", m);
        }
        for (i, m) in Dial::check_fallback_urls(&self.url, &self.fallback_urls) {
            fail(&format!("fallback_urls[{i}]"), m);
        }
        if self.auth_token.as_ref().is_some_and(Secret::is_empty) {
            fail("auth_token", "must be non-empty when set".into());
        }
        for (name, rate) in [
            ("input_sample_rate", self.input_sample_rate),
            ("output_sample_rate", self.output_sample_rate),
        ] {
            if !(8_000..=48_000).contains(&rate) {
                fail(name, format!("{rate} is out of range 8000..=48000"));
            }
        }
        if self.input_encoding == Encoding::Mulaw && self.input_sample_rate != 8_000 {
            fail(
                "input_encoding",
                format!(
                    "mulaw is 8000 Hz on Vocode's side; input_sample_rate is {}",
                    self.input_sample_rate
                ),
            );
        }
        if self.downsampling == Some(0) {
            fail("downsampling", "must be at least 1 when set".into());
        }
        match (&self.agent, &self.agent_hook) {
            (AgentSide::Application, None) => fail(
                "agent_hook",
                "is needed when agent = \"application\" (the server's REST agent calls it); \
                 set agent = \"server\" for a server that answers by itself"
                    .into(),
            ),
            (AgentSide::Server, Some(_)) => fail(
                "agent_hook",
                "is not used when agent = \"server\"; remove it or set agent = \"application\""
                    .into(),
            ),
            _ => {}
        }
        if let Some(h) = &self.agent_hook {
            let route_ok = !h.route.is_empty()
                && h.route.len() <= 64
                && h.route
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !route_ok {
                fail(
                    "agent_hook.route",
                    "must be 1 to 64 letters, digits, - or _".into(),
                );
            }
            if h.secret.expose().chars().count() < 16 {
                fail("agent_hook.secret", "must be at least 16 characters".into());
            }
            if let Some(u) = &h.public_url
                && let Err(m) = public_url(u)
            {
                fail("agent_hook.public_url", m);
            }
            if !(Duration::from_secs(1)..=MAX_ANSWER_TIMEOUT).contains(&h.answer_timeout) {
                fail(
                    "agent_hook.answer_timeout",
                    format!(
                        "{} is out of range 1s..=14s (Vocode's REST agent gives up after 15 s)",
                        humantime::format_duration(h.answer_timeout)
                    ),
                );
            }
        }
        v.into_result(OP)
    }

    /// The servers' dials, in order: `url`, then `fallback_urls`.
    fn dials(&self) -> Vec<Dial> {
        std::iter::once(&self.url)
            .chain(&self.fallback_urls)
            .map(|url| {
                let dial = Dial::new(url.clone());
                match &self.auth_token {
                    Some(token) => dial.bearer(token),
                    None => dial,
                }
            })
            .collect()
    }

    fn audio(&self) -> AudioSettings {
        let bytes_per_sample = self.input_encoding.audio_encoding().bytes_per_sample() as u32;
        AudioSettings {
            input_sample_rate: self.input_sample_rate,
            input_encoding: self.input_encoding,
            // 20 ms, the frames the link sends.
            chunk_size: self.input_sample_rate / 50 * bytes_per_sample,
            downsampling: self.downsampling,
            output_sample_rate: self.output_sample_rate,
        }
    }

    fn hook_settings(&self) -> Option<HookSettings> {
        let h = self.agent_hook.as_ref()?;
        Some(HookSettings {
            listen: h.listen,
            public_url: h.public_url.as_deref().and_then(|u| public_url(u).ok()),
            route: h.route.clone(),
            secret: h.secret.clone(),
            answer_timeout: h.answer_timeout,
        })
    }
}

/// `text` as the hook's public URL; the error does not repeat it.
fn public_url(text: &str) -> std::result::Result<url::Url, String> {
    let u = url::Url::parse(text).map_err(|e| format!("is not a valid URL ({e})"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err("must be an http or https URL with a host".into());
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("must not hold a user name or password".into());
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    Ok(u)
}

/// A new conversation id: `vb-` and 128 random bits in hex.
fn conversation_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| {
        BackendError::new(
            "vocode.open_link",
            ErrorCode::PipelineError,
            format!("the operating system gave no random bytes: {e}"),
        )
    })?;
    let mut id = String::from("vb-");
    for b in bytes {
        id.push_str(&format!("{b:02x}"));
    }
    Ok(id)
}

/// Bridges each session to a self-hosted Vocode conversation server; with
/// `agent = "application"`, serves the server's REST agent calls from the
/// session's agent.
#[derive(Debug)]
pub struct VocodeProvider {
    config: VocodeConfig,
    counters: Arc<LinkCounters>,
    /// The servers of `url` and `fallback_urls`.
    endpoints: Arc<Endpoints>,
    hook: OnceCell<Arc<Hook>>,
}

impl VocodeProvider {
    async fn hook(&self) -> Result<Option<&Arc<Hook>>> {
        let Some(settings) = self.config.hook_settings() else {
            return Ok(None);
        };
        self.hook
            .get_or_try_init(|| Hook::bind(&settings))
            .await
            .map(Some)
    }
}

#[async_trait]
impl Provider for VocodeProvider {
    const NAME: &'static str = NAME;
    type Config = VocodeConfig;

    fn capabilities() -> ProviderCapabilities {
        ProviderCapabilities {
            min_latency: Duration::from_millis(100),
            codecs: vec![Codec::Pcm16, Codec::Mulaw],
            hosted_stages: HostedStages::STT_TTS,
            turns: TurnPolicy::Service,
            ..ProviderCapabilities::default()
        }
    }

    fn check(config: &VocodeConfig) -> Result<()> {
        config.check()
    }

    fn new(config: VocodeConfig, full: &Config) -> Result<Self> {
        let urls = std::iter::once(&config.url).chain(&config.fallback_urls);
        let endpoints = Endpoints::new(urls.map(String::as_str), &full.failover);
        Ok(VocodeProvider {
            config,
            counters: Arc::default(),
            endpoints,
            hook: OnceCell::new(),
        })
    }

    /// Binds the agent hook (so the server can call it from the first
    /// session on) and checks the server (with `fallback_urls`, one of the
    /// servers) accepts TCP connections.
    async fn connect(&self, _config: &Config) -> Result<()> {
        self.hook().await?;
        self.probe().await
    }

    async fn open_link(&self, request: LinkRequest<'_>) -> Result<Option<Link>> {
        let mut dials = self.config.dials().into_iter();
        let first = dials
            .next()
            .unwrap_or_else(|| Dial::new(self.config.url.clone()));
        let settings = LinkSettings::for_session(first, &request).with_fallbacks(
            dials.collect(),
            &self.endpoints,
            Some(request.info),
        );
        let conversation_id = conversation_id()?;
        let audio = self.config.audio();
        let Some(hook) = self.hook().await? else {
            let protocol = VocodeProtocol {
                audio,
                conversation_id,
                answers: Answers::Server,
                conversation: None,
            };
            let link = WebSocketLink::open(protocol, settings, self.counters.clone()).await?;
            // The server answers by itself: nothing speaks through it.
            return Ok(Some(match link {
                Link::Service(mut l) => {
                    l.speaker = None;
                    Link::Service(l)
                }
                other => other,
            }));
        };
        let (events, merged) = LinkEvents::channel(EVENT_QUEUE);
        let answer_timeout = self
            .config
            .agent_hook
            .as_ref()
            .map_or_else(default_answer_timeout, |h| h.answer_timeout);
        let conversation = Arc::new(Conversation::new(events.clone(), answer_timeout));
        let registration = hook.register(&conversation_id, conversation.clone())?;
        let protocol = VocodeProtocol {
            audio,
            conversation_id,
            answers: Answers::Application,
            conversation: Some(conversation.clone()),
        };
        let link = WebSocketLink::open(protocol, settings, self.counters.clone()).await?;
        let Link::Service(ServiceLink {
            input,
            events: from_link,
            speaker,
        }) = link
        else {
            return Err(BackendError::new(
                "vocode.open_link",
                ErrorCode::PipelineError,
                "the link kit made a media link for a service link",
            ));
        };
        tokio::spawn(forward(
            from_link,
            events,
            registration,
            self.counters.clone(),
        ));
        Ok(Some(Link::Service(ServiceLink {
            input,
            events: merged,
            speaker: speaker.map(|inner| {
                Arc::new(Speaker {
                    inner,
                    conversation,
                }) as Arc<dyn TextToSpeech>
            }),
        })))
    }

    /// The link counters, the agent hook's, and, with `fallback_urls`, each
    /// server's state ([`Endpoints::health`]); fails when no server accepts
    /// TCP connections.
    async fn health(&self) -> Result<BTreeMap<String, String>> {
        let mut details = self.counters.health(NAME);
        if let Some(hook) = self.hook.get() {
            let c = &hook.counters;
            for (name, n) in [
                ("agent_calls", &c.calls),
                ("agent_calls_answered", &c.answered),
                ("agent_calls_unanswered", &c.unanswered),
                ("agent_calls_malformed", &c.malformed),
                ("agent_calls_unknown_conversation", &c.unknown_conversation),
            ] {
                details.insert(
                    format!("{NAME}_{name}"),
                    n.load(Ordering::Relaxed).to_string(),
                );
            }
            details.insert(
                format!("{NAME}_conversations"),
                hook.conversations().to_string(),
            );
            details.insert(format!("{NAME}_agent_hook"), hook.url().to_string());
        }
        self.probe().await?;
        details.extend(self.endpoints.health(NAME));
        Ok(details)
    }
}

impl VocodeProvider {
    /// A TCP probe of each server; fine when one answers.
    async fn probe(&self) -> Result<()> {
        let dials = self.config.dials();
        self.endpoints.probe(&dials, "the Vocode server").await
    }
}

/// Moves the link's events to the session's queue, where the agent hook's
/// calls arrive too, until the session is gone; the conversation stays
/// registered on the hook as long.
async fn forward(
    mut from_link: mpsc::Receiver<LinkEvent>,
    to_session: LinkEvents,
    registration: Registration,
    counters: Arc<LinkCounters>,
) {
    let mut link_open = true;
    loop {
        tokio::select! {
            () = to_session.closed() => break,
            event = from_link.recv(), if link_open => match event {
                Some(event) => match to_session.send(event).await {
                    Handed::SessionGone => break,
                    Handed::Dropped => {
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Handed::Queued => {}
                },
                // The link failed for good (the session heard why); calls
                // still reach the session until it ends.
                None => link_open = false,
            },
        }
    }
    drop(registration);
}

/// Speaks the agent's reply by answering the server's call that asked for
/// it (the link hands the text over and relays the server's audio).
struct Speaker {
    inner: Arc<dyn TextToSpeech>,
    conversation: Arc<Conversation>,
}

#[async_trait]
impl TextToSpeech for Speaker {
    async fn synthesize(
        &self,
        text: &str,
        format: AudioFormat,
        out: &mpsc::Sender<AudioFrame>,
    ) -> Result<()> {
        if !self.conversation.waiting() {
            return Err(BackendError::new(
                "vocode.speak",
                ErrorCode::PipelineError,
                "the Vocode server asked for no answer: its REST agent takes one answer per \
                 caller turn, so a text turn's reply, or a streamed reply past its first \
                 sentence, cannot be spoken",
            ));
        }
        self.inner.synthesize(text, format, out).await
    }
}

crate::register_provider!(VocodeProvider);
