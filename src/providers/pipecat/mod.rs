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
    Dial, Link, LinkCounters, LinkRequest, LinkSettings, Provider, WebSocketLink,
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
/// `Debug` shows the URLs without their user names, passwords and
/// secret-looking query values.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipecatConfig {
    /// The bot's WebSocket URL (`ws://` or `wss://`), the same for every session.
    pub url: Option<String>,
    /// The bot's WebSocket URL per session, with `{session_id}` and/or `{user_id}`.
    pub url_template: Option<String>,
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
    /// `ws`/`wss`, a template without a placeholder, a sample rate outside
    /// 8000..=48000. URLs are never repeated in messages (they may hold
    /// credentials).
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

    /// The URL a session connects to.
    fn url_for(&self, session_id: &str, user_id: &str) -> String {
        match (&self.url, &self.url_template) {
            (_, Some(t)) => Dial::render_template(t, session_id, user_id),
            (Some(u), None) => u.clone(),
            (None, None) => String::new(),
        }
    }
}

/// Bridges each session to a Pipecat bot over its WebSocket transport.
#[derive(Debug)]
pub struct PipecatProvider {
    config: PipecatConfig,
    counters: Arc<LinkCounters>,
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

    fn new(config: PipecatConfig, _: &Config) -> Result<Self> {
        Ok(PipecatProvider {
            config,
            counters: Arc::default(),
        })
    }

    /// With a fixed `url`, checks the bot's host accepts TCP connections (a
    /// WebSocket handshake would take a single-client bot's one seat). With
    /// `url_template` there is nothing to check before a session.
    async fn connect(&self, _config: &Config) -> Result<()> {
        let Some(url) = &self.config.url else {
            return Ok(());
        };
        Dial::new(url.clone()).probe("the Pipecat bot").await
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
        let mut dial = Dial::new(self.config.url_for(request.session_id, request.user_id));
        if let Some(token) = &self.config.auth_token {
            dial = dial.bearer(token);
        }
        let settings = LinkSettings::for_session(dial, &request);
        let protocol = PipecatProtocol {
            input_sample_rate: self.config.input_sample_rate,
            client_ready: self.config.client_ready,
        };
        WebSocketLink::open(protocol, settings, self.counters.clone())
            .await
            .map(Some)
    }

    async fn health(&self) -> Result<BTreeMap<String, String>> {
        let details = self.counters.health(NAME);
        if let Some(url) = &self.config.url {
            Dial::new(url.clone()).probe("the Pipecat bot").await?;
        }
        Ok(details)
    }
}

crate::register_provider!(PipecatProvider);
