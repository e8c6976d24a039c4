#![doc = include_str!("docs.md")]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::sync::mpsc;
use url::Url;

use crate::audio::{AudioEncoding, AudioFormat};
use crate::config::{Config, Secret, Violations};
use crate::error::{BackendError, Result};
use crate::provider::{Codec, HostedStages, ProviderCapabilities, TurnPolicy};
use crate::runtime::callbacks::{CallbackConfig, CallbackRoute, CallbackServer};
use crate::runtime::{
    Dial, Link, LinkCounters, LinkEvent, LinkRequest, LinkSettings, Provider, WebSocketLink,
};

pub mod call;
pub mod llm;
pub mod protocol;

use call::{CallApi, CustomLlm};
use protocol::VapiProtocol;

/// The provider's registered name.
pub const NAME: &str = "vapi";

/// Vapi's API.
pub const DEFAULT_BASE_URL: &str = "https://api.vapi.ai";

/// The model name sent with the custom-LLM model by default.
pub const DEFAULT_CUSTOM_LLM_MODEL: &str = "voice-backends-agent";

const OP: &str = "vapi.validate_config";

/// Events passed on from the link to the session (see `hold_while_linked`).
const EVENT_QUEUE: usize = 64;

/// The format of the call's audio on the transport socket (raw, mono).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VapiAudioFormat {
    /// 16-bit signed little-endian PCM (Vapi's default).
    #[default]
    PcmS16le,
    /// G.711 mu-law, 8 bits per sample.
    Mulaw,
}

impl VapiAudioFormat {
    /// The name on the wire (`audioFormat.format`).
    pub fn wire_name(self) -> &'static str {
        match self {
            VapiAudioFormat::PcmS16le => "pcm_s16le",
            VapiAudioFormat::Mulaw => "mulaw",
        }
    }

    fn encoding(self) -> AudioEncoding {
        match self {
            VapiAudioFormat::PcmS16le => AudioEncoding::PcmS16Le,
            VapiAudioFormat::Mulaw => AudioEncoding::Mulaw,
        }
    }

    /// Vapi's default sample rate for the format.
    fn default_rate(self) -> u32 {
        match self {
            VapiAudioFormat::PcmS16le => 16_000,
            VapiAudioFormat::Mulaw => 8_000,
        }
    }
}

fn default_base_url() -> String {
    DEFAULT_BASE_URL.to_owned()
}

fn default_model() -> String {
    DEFAULT_CUSTOM_LLM_MODEL.to_owned()
}

fn default_callback_addr() -> String {
    "127.0.0.1:0".to_owned()
}

fn yes() -> bool {
    true
}

/// The `vapi` provider's `provider_config`.
///
/// Give exactly one of `assistant_id` (a saved assistant) and `assistant`
/// (a transient assistant, Vapi's `CreateAssistantDTO` as JSON).
///
/// ```toml
/// provider = "vapi"
/// [provider_config]
/// api_key = "${VAPI_PRIVATE_KEY}"
/// assistant_id = "5b0a4a08-133c-4146-9315-0984f8c6be80"
/// public_url = "https://voice.example.com"   # where Vapi reaches the custom LLM
/// ```
///
/// `Debug` shows no key, and URLs without credentials.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VapiConfig {
    /// The private API key, sent as `Authorization: Bearer` to Vapi's API.
    pub api_key: Secret,
    /// Vapi's API (`https://api.vapi.ai`).
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// A saved assistant's id.
    pub assistant_id: Option<String>,
    /// A transient assistant (Vapi's `CreateAssistantDTO`), as a JSON object.
    #[schemars(with = "Option<BTreeMap<String, serde_json::Value>>")]
    pub assistant: Option<serde_json::Value>,
    /// Overrides of the assistant for every call (Vapi's
    /// `assistantOverrides`), as a JSON object.
    #[schemars(with = "Option<BTreeMap<String, serde_json::Value>>")]
    pub assistant_overrides: Option<serde_json::Value>,
    /// The audio format on the transport socket: `pcm_s16le` (default) or
    /// `mulaw`.
    #[serde(default)]
    pub audio_format: VapiAudioFormat,
    /// The sample rate on the transport socket, 8000..=48000; default 16000
    /// for `pcm_s16le`, 8000 for `mulaw`.
    pub sample_rate: Option<u32>,
    /// Serve the session's agent (when the session has one when it is
    /// created) to Vapi as the call's custom LLM; default `true`. When
    /// `false`, or without an agent, the assistant's own model answers.
    #[serde(default = "yes")]
    pub custom_llm: bool,
    /// The model name sent with the custom-LLM model.
    #[serde(default = "default_model")]
    pub custom_llm_model: String,
    /// Where the custom-LLM endpoint listens (`host:port`); default
    /// `127.0.0.1:0`.
    #[serde(default = "default_callback_addr")]
    pub callback_addr: String,
    /// The URL Vapi reaches the custom-LLM endpoint by (a proxy or tunnel
    /// in front of `callback_addr`), `http` or `https`; default
    /// `http://{callback_addr}`, which Vapi's cloud cannot reach.
    pub public_url: Option<String>,
    /// Ask Vapi for the call's control URL (`monitorPlan.controlEnabled`),
    /// published as the session's `control_url`; default `true`.
    #[serde(default = "yes")]
    pub control_url: bool,
}

impl std::fmt::Debug for VapiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::config::redact_url;
        f.debug_struct("VapiConfig")
            .field("api_key", &self.api_key)
            .field("base_url", &redact_url(&self.base_url))
            .field("assistant_id", &self.assistant_id)
            .field("assistant", &self.assistant.as_ref().map(|_| "{..}"))
            .field(
                "assistant_overrides",
                &self.assistant_overrides.as_ref().map(|_| "{..}"),
            )
            .field("audio_format", &self.audio_format)
            .field("sample_rate", &self.sample_rate)
            .field("custom_llm", &self.custom_llm)
            .field("custom_llm_model", &self.custom_llm_model)
            .field("callback_addr", &self.callback_addr)
            .field("public_url", &self.public_url.as_deref().map(redact_url))
            .field("control_url", &self.control_url)
            .finish()
    }
}

impl VapiConfig {
    /// The checks past parsing: one detail per bad field.
    fn check(&self) -> Result<()> {
        let mut v = Violations::new();
        let mut fail = |path: &str, message: String| {
            v.push(format!("provider_config.{path}"), message);
        };
        if self.api_key.is_empty() {
            fail("api_key", "must be non-empty".into());
        }
        if let Err(m) = call::check_base_url(&self.base_url) {
            fail("base_url", m);
        }
        match (&self.assistant_id, &self.assistant) {
            (None, None) => fail(
                "assistant_id",
                "set assistant_id (a saved assistant) or assistant (a transient one)".into(),
            ),
            (Some(_), Some(_)) => fail(
                "assistant",
                "set either assistant_id or assistant, not both".into(),
            ),
            (Some(id), None) if id.trim().is_empty() => {
                fail("assistant_id", "must be non-empty".into())
            }
            (None, Some(a)) if !a.is_object() => {
                fail("assistant", "must be a JSON object (an assistant)".into())
            }
            _ => {}
        }
        if self
            .assistant_overrides
            .as_ref()
            .is_some_and(|o| !o.is_object())
        {
            fail(
                "assistant_overrides",
                "must be a JSON object (assistant overrides)".into(),
            );
        }
        if let Some(rate) = self.sample_rate
            && !(8_000..=48_000).contains(&rate)
        {
            fail(
                "sample_rate",
                format!("{rate} is out of range 8000..=48000"),
            );
        }
        if self.custom_llm_model.trim().is_empty() {
            fail("custom_llm_model", "must be non-empty".into());
        }
        if self.callback_addr.parse::<SocketAddr>().is_err() {
            fail(
                "callback_addr",
                "is not a socket address; expected e.g. 127.0.0.1:0 or 0.0.0.0:8088".into(),
            );
        }
        if let Some(url) = &self.public_url {
            match Url::parse(url) {
                Ok(u)
                    if matches!(u.scheme(), "http" | "https")
                        && u.host_str().is_some()
                        && u.username().is_empty()
                        && u.password().is_none()
                        && u.query().is_none()
                        && u.fragment().is_none() => {}
                Ok(_) => fail(
                    "public_url",
                    "must be an http or https URL with a host, without credentials, query or fragment"
                        .into(),
                ),
                Err(e) => fail("public_url", format!("is not a valid URL ({e})")),
            }
        }
        v.into_result(OP)
    }

    /// The transport socket's audio format.
    pub fn wire_format(&self) -> AudioFormat {
        let rate = self
            .sample_rate
            .unwrap_or_else(|| self.audio_format.default_rate());
        AudioFormat::new(self.audio_format.encoding(), rate, 1)
    }
}

/// Callback servers on fixed ports, by listening address and public URL,
/// shared by the provider values of one backend (an `update_config` makes a
/// new value while sessions of the old one still answer on the old server's
/// routes, and the port can be bound only once).
type ServerKey = (SocketAddr, Option<String>);

fn servers() -> &'static Mutex<HashMap<ServerKey, Weak<CallbackServer>>> {
    static SERVERS: std::sync::OnceLock<Mutex<HashMap<ServerKey, Weak<CallbackServer>>>> =
        std::sync::OnceLock::new();
    SERVERS.get_or_init(Default::default)
}

/// Vapi calls over Vapi's WebSocket transport, one call per session, with
/// the session's agent served as the call's custom LLM.
#[derive(Debug)]
pub struct VapiProvider {
    config: VapiConfig,
    api: CallApi,
    counters: Arc<LinkCounters>,
    server: tokio::sync::Mutex<Option<Arc<CallbackServer>>>,
}

impl VapiProvider {
    /// The callback server the custom-LLM routes live on: bound when the
    /// first session needs it, shared with other provider values with the
    /// same address and public URL.
    async fn callback_server(&self) -> Result<Arc<CallbackServer>> {
        let mut held = self.server.lock().await;
        if let Some(server) = held.as_ref() {
            return Ok(server.clone());
        }
        let addr: SocketAddr = self.config.callback_addr.parse().map_err(|_| {
            BackendError::invalid_config("vapi.open_link", "callback_addr is not a socket address")
        })?;
        // A fixed port can be bound once: provider values of one backend
        // (before and after an `update_config`) share its server. A free
        // port (0) gets a server of its own.
        let key = (addr, self.config.public_url.clone());
        let shared = (addr.port() != 0)
            .then(|| {
                servers()
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&key)
                    .and_then(Weak::upgrade)
            })
            .flatten();
        let server = match shared {
            Some(server) => server,
            None => {
                let public_url = match &self.config.public_url {
                    Some(u) => Some(Url::parse(u).map_err(|e| {
                        BackendError::invalid_config(
                            "vapi.open_link",
                            format!("public_url is not a valid URL ({e})"),
                        )
                    })?),
                    None => None,
                };
                let server = Arc::new(
                    CallbackServer::bind_with(CallbackConfig {
                        addr,
                        public_url,
                        ..CallbackConfig::default()
                    })
                    .await?,
                );
                if addr.port() != 0 {
                    servers()
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(key, Arc::downgrade(&server));
                }
                server
            }
        };
        *held = Some(server.clone());
        Ok(server)
    }
}

#[async_trait]
impl Provider for VapiProvider {
    const NAME: &'static str = NAME;
    type Config = VapiConfig;

    fn capabilities() -> ProviderCapabilities {
        ProviderCapabilities {
            min_latency: Duration::from_millis(300),
            codecs: vec![Codec::Pcm16, Codec::Mulaw],
            hosted_stages: HostedStages::STT_TTS,
            turns: TurnPolicy::Service,
            ..ProviderCapabilities::default()
        }
    }

    fn check(config: &VapiConfig) -> Result<()> {
        config.check()
    }

    fn new(config: VapiConfig, backend: &Config) -> Result<Self> {
        let api = CallApi::new(&config.base_url, config.api_key.clone(), backend.timeout)?;
        Ok(VapiProvider {
            config,
            api,
            counters: Arc::default(),
            server: tokio::sync::Mutex::new(None),
        })
    }

    /// Checks Vapi's API host accepts connections (no call is made).
    async fn connect(&self, _config: &Config) -> Result<()> {
        self.api.probe().await
    }

    async fn open_link(&self, request: LinkRequest<'_>) -> Result<Option<Link>> {
        let agent = request
            .session
            .agent
            .clone()
            .filter(|_| self.config.custom_llm);
        // The session's events, relayed while the custom-LLM route is held:
        // the route answers only while the session takes them.
        let (relay_tx, relay_rx) = mpsc::channel(EVENT_QUEUE);
        let route = match &agent {
            Some(agent) => {
                let server = self.callback_server().await?;
                let relay = relay_tx.downgrade();
                let route = llm::register(
                    &server,
                    llm::Endpoint {
                        agent: agent.clone(),
                        session_id: request.session_id.to_owned(),
                        user_id: request.user_id.to_owned(),
                        timeout: request.config.timeout,
                        model: self.config.custom_llm_model.clone(),
                    },
                    move || relay.upgrade().is_some_and(|tx| !tx.is_closed()),
                )?;
                Some((server, route))
            }
            None => None,
        };
        let custom = route.as_ref().map(|(_, route)| CustomLlm {
            url: route.url().as_str(),
            secret: route.secret(),
            model: &self.config.custom_llm_model,
        });
        let format = self.config.wire_format();
        let body = call::call_body(&self.config, format, custom.as_ref());
        let created = self.api.create(&body).await?;
        request.info.set("call_id", created.id.clone());
        if let Some(control) = &created.control_url {
            request.info.set_secret("control_url", control.clone());
        }
        let mut dial = Dial::new(created.websocket_url.expose().to_owned());
        if self.api.same_host(created.websocket_url.expose()) {
            dial = dial.bearer(&self.config.api_key);
        }
        let mut settings = LinkSettings::for_session(dial, &request);
        settings.keepalive = Some(Duration::from_secs(15));
        let protocol = VapiProtocol::new(format);
        let link = match WebSocketLink::open(protocol, settings, self.counters.clone()).await {
            Ok(link) => link,
            Err(e) => {
                // The call exists at Vapi: end it rather than leave it to
                // its silence timeout.
                if let Some(control) = created.control_url {
                    self.api.end_call_later(control);
                }
                return Err(e);
            }
        };
        let Link::Service(mut service) = link else {
            return Ok(Some(link));
        };
        if let Some(held) = route {
            // Vapi asks the agent itself: the session's engine only relays.
            service.speaker = None;
            service.events = hold_while_linked(service.events, held, relay_tx, relay_rx);
        }
        Ok(Some(Link::Service(service)))
    }

    async fn health(&self) -> Result<BTreeMap<String, String>> {
        let details = self.counters.health(NAME);
        self.api.probe().await?;
        Ok(details)
    }
}

/// The link's events, passed on (over `tx` to `rx`, the channel the route
/// watches: it answers 404 once the session stops taking events) by a task
/// that holds the session's custom-LLM route (and the server it is on) for
/// as long as the link lives: until the session stops taking events or the
/// link ends (a hang-up), after which the route is gone.
fn hold_while_linked(
    mut events: mpsc::Receiver<LinkEvent>,
    held: (Arc<CallbackServer>, CallbackRoute),
    tx: mpsc::Sender<LinkEvent>,
    rx: mpsc::Receiver<LinkEvent>,
) -> mpsc::Receiver<LinkEvent> {
    tokio::spawn(async move {
        let _held = held;
        loop {
            let event = tokio::select! {
                () = tx.closed() => return,
                event = events.recv() => event,
            };
            let Some(event) = event else { return };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    rx
}

crate::register_provider!(VapiProvider);
