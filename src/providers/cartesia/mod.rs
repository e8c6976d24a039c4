#![doc = include_str!("docs.md")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::audio::AudioFrame;
use crate::config::{Config, Secret, Violations};
use crate::error::{BackendError, Result};
use crate::provider::{Codec, HostedStages, ProviderCapabilities, TurnPolicy};
use crate::runtime::{
    Dial, Link, LinkCounters, LinkInput, LinkRequest, LinkSettings, Provider, RetryPolicy,
};

pub mod protocol;
mod stt;
mod tts;

pub use stt::CartesiaStt;
pub use tts::{CartesiaTts, Speaker, TtsSocket, VoiceSettings};

/// The provider's registered name, and the components'.
pub const NAME: &str = "cartesia";

/// The API version sent as `Cartesia-Version` unless `version` says
/// otherwise: the one Cartesia's Python SDK 4.2 sends.
pub const DEFAULT_VERSION: &str = "2026-08-14";

fn default_base_url() -> String {
    "wss://api.cartesia.ai".to_owned()
}

fn default_version() -> String {
    DEFAULT_VERSION.to_owned()
}

fn default_stt_model() -> String {
    "ink-whisper".to_owned()
}

fn default_stt_rate() -> u32 {
    16_000
}

fn default_tts_model() -> String {
    "sonic-3".to_owned()
}

fn default_tts_rate() -> u32 {
    24_000
}

fn default_context_idle() -> Duration {
    Duration::from_secs(2)
}

/// The `cartesia` provider's `provider_config`, and the options of the
/// `cartesia` speech-to-text and text-to-speech components
/// (`[components.cartesia]`).
///
/// ```toml
/// provider = "cartesia"
/// [provider_config]
/// api_key = "sk_car_..."
/// [provider_config.tts]
/// voice_id = "6ccbfb76-1fc6-48f7-b71d-91ac6298247b"
/// ```
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CartesiaConfig {
    /// The API key, sent as `Authorization: Bearer <api_key>`.
    pub api_key: Secret,
    /// Where both sockets are (`/stt/websocket` and `/tts/websocket` are
    /// added); default `wss://api.cartesia.ai`.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// The `Cartesia-Version` header; default [`DEFAULT_VERSION`].
    #[serde(default = "default_version")]
    pub version: String,
    /// Speech-to-text.
    #[serde(default)]
    pub stt: SttOptions,
    /// Text-to-speech.
    #[serde(default)]
    pub tts: TtsOptions,
}

/// Speech-to-text options (`stt`).
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SttOptions {
    /// The model; default `ink-whisper`.
    #[serde(default = "default_stt_model")]
    pub model: String,
    /// The language of the user's speech (ISO 639-1, e.g. `en`).
    pub language: Option<String>,
    /// The rate the user's audio is sent at, in Hz (8000..=48000, default
    /// 16000); the session's audio is resampled to it.
    #[serde(default = "default_stt_rate")]
    pub sample_rate: u32,
    /// What counts as silence for Cartesia's own endpointing (0..=1).
    pub min_volume: Option<f64>,
    /// The silence after which Cartesia finalizes a piece by itself, in
    /// seconds (the turn still ends with the local turn detector).
    pub max_silence_duration_secs: Option<f64>,
}

impl Default for SttOptions {
    fn default() -> Self {
        SttOptions {
            model: default_stt_model(),
            language: None,
            sample_rate: default_stt_rate(),
            min_volume: None,
            max_silence_duration_secs: None,
        }
    }
}

/// Text-to-speech options (`tts`).
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TtsOptions {
    /// The voice's id; required to speak.
    pub voice_id: Option<String>,
    /// The model; default `sonic-3`.
    #[serde(default = "default_tts_model")]
    pub model_id: String,
    /// The language to speak (e.g. `en`).
    pub language: Option<String>,
    /// The rate asked for when the session's own is not one Cartesia offers
    /// (8000, 16000, 22050, 24000, 44100, 48000; default 24000).
    #[serde(default = "default_tts_rate")]
    pub sample_rate: u32,
    /// How long Cartesia may buffer a reply's text before it speaks, in ms
    /// (0..=5000; Cartesia's default when unset).
    pub max_buffer_delay_ms: Option<u32>,
    /// How long a reply's context waits for its next piece before it is
    /// ended; default 2s.
    #[serde(default = "default_context_idle", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub context_idle: Duration,
}

impl Default for TtsOptions {
    fn default() -> Self {
        TtsOptions {
            voice_id: None,
            model_id: default_tts_model(),
            language: None,
            sample_rate: default_tts_rate(),
            max_buffer_delay_ms: None,
            context_idle: default_context_idle(),
        }
    }
}

impl std::fmt::Debug for CartesiaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CartesiaConfig")
            .field("api_key", &self.api_key)
            .field("base_url", &crate::config::redact_url(&self.base_url))
            .field("version", &self.version)
            .field("stt", &self.stt)
            .field("tts", &self.tts)
            .finish()
    }
}

impl CartesiaConfig {
    /// Parses and checks a component's options (`[components.cartesia]`).
    ///
    /// # Errors
    ///
    /// `InvalidConfig` naming each bad option.
    pub fn from_component_options(options: &serde_json::Value) -> Result<CartesiaConfig> {
        const OP: &str = "cartesia.component_options";
        if options.is_null() {
            return Err(BackendError::invalid_config(
                OP,
                "the cartesia components need [components.cartesia] with at least api_key",
            ));
        }
        let parsed: CartesiaConfig = serde_json::from_value(options.clone())
            .map_err(|e| BackendError::invalid_config(OP, format!("components.cartesia: {e}")))?;
        parsed.check("components.cartesia", OP)?;
        Ok(parsed)
    }

    /// The checks past parsing, each bad field named under `prefix`.
    fn check(&self, prefix: &str, op: &'static str) -> Result<()> {
        let mut v = Violations::new();
        let mut fail = |path: &str, message: String| v.push(format!("{prefix}.{path}"), message);
        if self.api_key.is_empty() {
            fail("api_key", "must be non-empty".into());
        }
        if let Err(m) = Dial::check_url(&self.base_url) {
            fail("base_url", m);
        }
        if self.version.trim().is_empty() {
            fail("version", "must be non-empty (e.g. 2026-08-14)".into());
        }
        if self.stt.model.trim().is_empty() {
            fail("stt.model", "must be non-empty".into());
        }
        if !(8_000..=48_000).contains(&self.stt.sample_rate) {
            fail(
                "stt.sample_rate",
                format!("{} is out of range 8000..=48000", self.stt.sample_rate),
            );
        }
        if let Some(m) = self.stt.min_volume
            && !(0.0..=1.0).contains(&m)
        {
            fail("stt.min_volume", format!("{m} is out of range 0..=1"));
        }
        if let Some(s) = self.stt.max_silence_duration_secs
            && !(s > 0.0 && s <= 60.0)
        {
            fail(
                "stt.max_silence_duration_secs",
                format!("{s} is out of range (0, 60]"),
            );
        }
        for (path, lang) in [
            ("stt.language", &self.stt.language),
            ("tts.language", &self.tts.language),
        ] {
            if lang.as_deref().is_some_and(|l| l.trim().is_empty()) {
                fail(path, "must be non-empty when set".into());
            }
        }
        if self
            .tts
            .voice_id
            .as_deref()
            .is_some_and(|id| id.trim().is_empty())
        {
            fail("tts.voice_id", "must be non-empty when set".into());
        }
        if self.tts.model_id.trim().is_empty() {
            fail("tts.model_id", "must be non-empty".into());
        }
        if !protocol::TTS_SAMPLE_RATES.contains(&self.tts.sample_rate) {
            fail(
                "tts.sample_rate",
                format!(
                    "{} is not one Cartesia offers (8000, 16000, 22050, 24000, 44100, 48000)",
                    self.tts.sample_rate
                ),
            );
        }
        if let Some(ms) = self.tts.max_buffer_delay_ms
            && ms > 5_000
        {
            fail(
                "tts.max_buffer_delay_ms",
                format!("{ms} is out of range 0..=5000"),
            );
        }
        if self.tts.context_idle.is_zero() || self.tts.context_idle > Duration::from_secs(60) {
            fail("tts.context_idle", "must be within (0s, 60s]".into());
        }
        v.into_result(op)
    }

    /// `dial` with the key and the version headers.
    fn headers(&self, mut dial: Dial) -> Dial {
        dial = dial.bearer(&self.api_key);
        dial.headers
            .push(("cartesia-version", Secret::new(self.version.clone())));
        dial
    }

    fn tts_dial(&self) -> Dial {
        self.headers(Dial::new(protocol::tts_url(&self.base_url)))
    }

    /// How a speaker's requests are made; `tts.voice_id` is required.
    fn voice_settings(&self, reply_timeout: Duration, prefix: &str) -> Result<VoiceSettings> {
        let voice_id = self.tts.voice_id.clone().ok_or_else(|| {
            BackendError::invalid_config(
                "cartesia.validate_config",
                format!("{prefix}.tts.voice_id: a voice is needed to speak (a Cartesia voice id)"),
            )
            .with_detail(format!("{prefix}.tts.voice_id"), "required")
        })?;
        Ok(VoiceSettings {
            model_id: self.tts.model_id.clone(),
            voice_id,
            language: self.tts.language.clone(),
            sample_rate: self.tts.sample_rate,
            max_buffer_delay_ms: self.tts.max_buffer_delay_ms,
            context_idle: self.tts.context_idle,
            reply_timeout,
        })
    }
}

/// Hears each session through Cartesia's speech-to-text socket and speaks
/// the agent's replies on a text-to-speech socket shared by the backend's
/// sessions. The local turn detector ends each turn.
#[derive(Debug)]
pub struct CartesiaProvider {
    config: CartesiaConfig,
    counters: Arc<LinkCounters>,
    tts: Arc<TtsSocket>,
    voice: Arc<VoiceSettings>,
}

impl CartesiaProvider {
    /// The backend's shared text-to-speech socket.
    pub fn tts_socket(&self) -> &Arc<TtsSocket> {
        &self.tts
    }
}

#[async_trait]
impl Provider for CartesiaProvider {
    const NAME: &'static str = NAME;
    type Config = CartesiaConfig;

    fn capabilities() -> ProviderCapabilities {
        ProviderCapabilities {
            min_latency: Duration::from_millis(90),
            codecs: vec![Codec::Pcm16],
            hosted_stages: HostedStages::STT_TTS,
            turns: TurnPolicy::Local,
            ..ProviderCapabilities::default()
        }
    }

    fn check(config: &CartesiaConfig) -> Result<()> {
        config.check("provider_config", "cartesia.validate_config")?;
        config
            .voice_settings(Duration::ZERO, "provider_config")
            .map(drop)
    }

    fn new(config: CartesiaConfig, backend: &Config) -> Result<Self> {
        let counters: Arc<LinkCounters> = Arc::default();
        let tts = TtsSocket::new(
            config.tts_dial(),
            RetryPolicy::from_config(backend),
            backend.timeout,
            counters.clone(),
        );
        let voice = Arc::new(config.voice_settings(backend.timeout, "provider_config")?);
        Ok(CartesiaProvider {
            config,
            counters,
            tts,
            voice,
        })
    }

    /// Opens the shared text-to-speech socket, so the first reply does not
    /// wait for it.
    async fn connect(&self, _config: &Config) -> Result<()> {
        self.tts.connect().await
    }

    async fn open_link(&self, request: LinkRequest<'_>) -> Result<Option<Link>> {
        let settings = LinkSettings::for_session(stt::dial(&self.config), &request);
        let link = stt::open(&self.config, settings, self.counters.clone()).await?;
        let Link::Service(mut link) = link else {
            return Ok(Some(link));
        };
        let speaker = Arc::new(Speaker::new(
            self.tts.clone(),
            self.voice.clone(),
            request.session_id.to_owned(),
        ));
        link.input = Box::new(TurnInput {
            inner: link.input,
            speaker: speaker.clone(),
        });
        link.speaker = Some(speaker);
        Ok(Some(Link::Service(link)))
    }

    async fn disconnect(&self) {
        self.tts.close();
    }

    async fn health(&self) -> Result<BTreeMap<String, String>> {
        let mut details = self.counters.health(NAME);
        details.insert(
            format!("{NAME}_tts_socket"),
            if self.tts.is_connected() {
                "connected"
            } else {
                "idle"
            }
            .to_owned(),
        );
        Ok(details)
    }
}

/// The session's input to the speech-to-text link, which also tells the
/// speaker where replies end: a turn's end closes the reply before it, a
/// barge-in cancels it.
struct TurnInput {
    inner: Box<dyn LinkInput>,
    speaker: Arc<Speaker>,
}

impl LinkInput for TurnInput {
    fn push_audio(&mut self, frame: &AudioFrame) -> Result<()> {
        self.inner.push_audio(frame)
    }

    fn end_turn(&mut self) -> Result<()> {
        self.speaker.end_reply();
        self.inner.end_turn()
    }

    fn cancel(&mut self) {
        self.speaker.cancel();
        self.inner.cancel();
    }
}

crate::register_provider!(CartesiaProvider);
crate::register_component!(stt, NAME, CartesiaStt::default);
crate::register_component!(tts, NAME, CartesiaTts::default);
