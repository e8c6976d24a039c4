#![doc = include_str!("docs.md")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::config::{Config, Secret, Violations, parse_provider_config};
use crate::error::{BackendError, Result};
use crate::provider::{Codec, HostedStages, ProviderCapabilities, TurnPolicy};
use crate::runtime::{
    Dial, Endpoints, Link, LinkCounters, LinkRequest, LinkSettings, Provider, WebSocketLink,
};

pub mod proto;
mod protocol;
pub mod rtvi;

use protocol::PipecatProtocol;

/// The provider's registered name.
pub const NAME: &str = "pipecat";

const OP: &str = "pipecat.validate_config";

fn default_input_rate() -> u32 {
    16_000
}

fn yes() -> bool {
    true
}

/// The `pipecat` provider's `provider_config`.
///
/// Give exactly one of `url` (every session connects to the same bot URL:
/// Pipecat's single-client `WebsocketServerTransport`, or a multi-client
/// endpoint) and `url_template` (one URL per session: `{session_id}` and
/// `{user_id}` are replaced, percent-encoded but for letters, digits, `-`,
/// `_` and `~`; a `user_id` of `.` or `..`, which a URL reads as a path step
/// even encoded, is refused).
///
/// ```toml
/// provider = "pipecat"
/// [provider_config]
/// url_template = "ws://127.0.0.1:8765/ws?session={session_id}"
/// ```
///
/// `fallback_urls` lists equivalent bots tried in order when the first does
/// not answer, of the same kind as the first: URLs with `url`, templates
/// with `url_template`. Each session's link opens on the first that answers
/// and, when its connection drops, reconnects to the first that answers
/// again; `[failover]` `timeout` bounds each bot's handshake and
/// `probe_interval` is how long one that failed is tried last
/// ([`Endpoints`]).
///
/// ```toml
/// provider = "pipecat"
/// [provider_config]
/// url = "ws://bot-a:8765/"
/// fallback_urls = ["ws://bot-b:8765/"]
/// ```
///
/// `Debug` shows the URLs without their user names, passwords and
/// secret-looking query values.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipecatConfig {
    /// The bot's WebSocket URL (`ws://` or `wss://`), the same for every session.
    pub url: Option<String>,
    /// The bot's WebSocket URL per session, with `{session_id}` and/or `{user_id}`.
    pub url_template: Option<String>,
    /// Equivalent bots tried in order when the one before does not answer:
    /// URLs with `url`, templates with `url_template`. Empty by default.
    #[serde(default)]
    pub fallback_urls: Vec<String>,
    /// Sent as `Authorization: Bearer <token>` when connecting.
    ///
    /// tungstenite logs the whole handshake request, this header included,
    /// at `trace` level: keep the `tungstenite` target below `trace` in your
    /// subscriber (the `voice-backends` binary always does).
    pub auth_token: Option<Secret>,
    /// The bot's input sample rate in Hz (Pipecat's default 16000); user audio
    /// is resampled to it, because nothing resamples it on the bot's side.
    #[serde(default = "default_input_rate")]
    pub input_sample_rate: u32,
    /// Send RTVI `client-ready` after connecting (bots with RTVI wait for it
    /// before `bot-ready`).
    #[serde(default = "yes")]
    pub client_ready: bool,
}

impl std::fmt::Debug for PipecatConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::config::redact_url;
        f.debug_struct("PipecatConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field(
                "url_template",
                &self.url_template.as_deref().map(redact_url),
            )
            .field(
                "fallback_urls",
                &self
                    .fallback_urls
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("auth_token", &self.auth_token)
            .field("input_sample_rate", &self.input_sample_rate)
            .field("client_ready", &self.client_ready)
            .finish()
    }
}

impl PipecatConfig {
    /// Parses and checks `config.provider_config`.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` with one detail per bad field: unknown keys, neither or
    /// both of `url` and `url_template`, a URL that does not parse or is not
    /// `ws`/`wss`, a template without a placeholder, a fallback URL that is
    /// not `ws`/`wss` or repeats another (`fallback_urls[i]`), a sample rate
    /// outside 8000..=48000. URLs are never repeated in messages (they may
    /// hold credentials).
    pub fn from_config(config: &Config) -> Result<Self> {
        let parsed: PipecatConfig = parse_provider_config(config)?;
        parsed.check().map(|()| parsed)
    }

    /// The checks of [`PipecatConfig::from_config`] past parsing.
    fn check(&self) -> Result<()> {
        let parsed = self;
        let mut v = Violations::new();
        let mut fail = |path: &str, message: String| {
            v.push(format!("provider_config.{path}"), message);
        };
        match (&parsed.url, &parsed.url_template) {
            (None, None) => fail(
                "url",
                "set url (one bot URL for every session) or url_template (one per session)".into(),
            ),
            (Some(_), Some(_)) => fail(
                "url_template",
                "set either url or url_template, not both".into(),
            ),
            (Some(url), None) => {
                if let Err(m) = Dial::check_url(url) {
                    fail("url", m);
                }
            }
            (None, Some(t)) => {
                if !t.contains("{session_id}") && !t.contains("{user_id}") {
                    fail(
                        "url_template",
                        "has no {session_id} or {user_id} placeholder; use url for a fixed URL"
                            .into(),
                    );
                } else if let Err(m) = Dial::check_url(&Dial::render_template(t, "s", "u")) {
                    fail("url_template", m);
                }
            }
        }
        if let Some(first) = parsed.urls_for("s", "u").first() {
            let rest = &parsed.urls_for("s", "u")[1..];
            for (i, m) in Dial::check_fallback_urls(first, rest) {
                fail(&format!("fallback_urls[{i}]"), m);
            }
        }
        if !(8_000..=48_000).contains(&parsed.input_sample_rate) {
            fail(
                "input_sample_rate",
                format!("{} is out of range 8000..=48000", parsed.input_sample_rate),
            );
        }
        if parsed.auth_token.as_ref().is_some_and(Secret::is_empty) {
            fail("auth_token", "must be non-empty when set".into());
        }
        v.into_result(OP)
    }

    /// The URLs a session connects to, in order: `url` (or `url_template`
    /// rendered) and the fallbacks.
    fn urls_for(&self, session_id: &str, user_id: &str) -> Vec<String> {
        let first = match (&self.url, &self.url_template) {
            (_, Some(t)) => t,
            (Some(u), None) => u,
            (None, None) => return Vec::new(),
        };
        let render = |u: &String| match &self.url_template {
            Some(_) => Dial::render_template(u, session_id, user_id),
            None => u.clone(),
        };
        std::iter::once(first)
            .chain(&self.fallback_urls)
            .map(render)
            .collect()
    }

    /// The dials of a session, in order.
    fn dials_for(&self, session_id: &str, user_id: &str) -> Vec<Dial> {
        self.urls_for(session_id, user_id)
            .into_iter()
            .map(|url| {
                let dial = Dial::new(url);
                match &self.auth_token {
                    Some(token) => dial.bearer(token),
                    None => dial,
                }
            })
            .collect()
    }
}

/// Bridges each session to a Pipecat bot over its WebSocket transport.
#[derive(Debug)]
pub struct PipecatProvider {
    config: PipecatConfig,
    counters: Arc<LinkCounters>,
    /// The bots of `url` (or `url_template`) and `fallback_urls`.
    endpoints: Arc<Endpoints>,
}

#[async_trait]
impl Provider for PipecatProvider {
    const NAME: &'static str = NAME;
    type Config = PipecatConfig;

    fn capabilities() -> ProviderCapabilities {
        ProviderCapabilities {
            min_latency: Duration::from_millis(40),
            codecs: vec![Codec::Pcm16],
            hosted_stages: HostedStages::STT_TTS,
            turns: TurnPolicy::Service,
            ..ProviderCapabilities::default()
        }
    }

    fn check(config: &PipecatConfig) -> Result<()> {
        config.check()
    }

    fn new(config: PipecatConfig, full: &Config) -> Result<Self> {
        let urls = config.urls_for("s", "u");
        let endpoints = Endpoints::new(urls.iter().map(String::as_str), &full.failover);
        Ok(PipecatProvider {
            config,
            counters: Arc::default(),
            endpoints,
        })
    }

    /// With a fixed `url`, checks the bot's host (or, with `fallback_urls`,
    /// one of the bots' hosts) accepts TCP connections (a WebSocket handshake
    /// would take a single-client bot's one seat). With `url_template` there
    /// is nothing to check before a session.
    async fn connect(&self, _config: &Config) -> Result<()> {
        self.probe().await
    }

    async fn open_link(&self, request: LinkRequest<'_>) -> Result<Option<Link>> {
        // URL parsers read `.` and `..` as path steps even percent-encoded.
        let uses_user = self
            .config
            .url_template
            .as_deref()
            .is_some_and(|t| t.contains("{user_id}"));
        if uses_user && matches!(request.user_id, "." | "..") {
            return Err(BackendError::invalid_config(
                "pipecat.open_link",
                format!(
                    "user_id {:?} cannot go into url_template: a URL reads it as a path step",
                    request.user_id
                ),
            ));
        }
        let mut dials = self
            .config
            .dials_for(request.session_id, request.user_id)
            .into_iter();
        let Some(first) = dials.next() else {
            return Err(BackendError::invalid_config(
                "pipecat.open_link",
                "set url or url_template",
            ));
        };
        let settings = LinkSettings::for_session(first, &request).with_fallbacks(
            dials.collect(),
            &self.endpoints,
            Some(request.info),
        );
        let protocol = PipecatProtocol {
            input_sample_rate: self.config.input_sample_rate,
            client_ready: self.config.client_ready,
        };
        WebSocketLink::open(protocol, settings, self.counters.clone())
            .await
            .map(Some)
    }

    /// The link counters and, with `fallback_urls`, each bot's state
    /// ([`Endpoints::health`]); with a fixed `url`, fails when no bot
    /// accepts TCP connections.
    async fn health(&self) -> Result<BTreeMap<String, String>> {
        let mut details = self.counters.health(NAME);
        self.probe().await?;
        details.extend(self.endpoints.health(NAME));
        Ok(details)
    }
}

impl PipecatProvider {
    /// With a fixed `url`, a TCP probe of each bot; fine when one answers.
    async fn probe(&self) -> Result<()> {
        if self.config.url.is_none() {
            return Ok(());
        }
        let dials = self.config.dials_for("s", "u");
        self.endpoints.probe(&dials, "the Pipecat bot").await
    }
}

crate::register_provider!(PipecatProvider);
