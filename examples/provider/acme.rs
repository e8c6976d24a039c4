//! The `acme` provider: everything a provider whose service speaks over a
//! WebSocket writes. Acme's speech service transcribes the user's audio and
//! speaks the agent's replies; the local turn detector ends the user's turns
//! and tells the service, which then sends its final transcript.
//!
//! The wire protocol: binary messages are PCM s16le mono audio both ways,
//! text messages are JSON.
//!
//! | client → service | service → client |
//! |---|---|
//! | `{"type":"hello","session":"..."}` | `{"type":"ready"}` |
//! | binary: the user's audio | `{"type":"transcript","text":"...","final":true}` |
//! | `{"type":"end_of_turn"}` | binary: reply audio |
//! | `{"type":"speak","text":"..."}`, `{"type":"speak_end"}` | `{"type":"done"}` |
//! | `{"type":"cancel"}` | `{"type":"interrupted"}`, `{"type":"error","message":"..."}` |

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use voice_backends::config::Violations;
use voice_backends::runtime::{
    Dial, Link, LinkCounters, LinkRequest, LinkSettings, Provider, WebSocketLink, WireEvent,
    WireProtocol, WsMessage,
};
use voice_backends::{
    AudioEncoding, AudioFormat, AudioFrame, Codec, Config, HostedStages, ProviderCapabilities,
    Result, Secret, TurnPolicy,
};

/// Acme's `provider_config`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The service's WebSocket URL (`ws://` or `wss://`).
    pub url: String,
    /// Sent as `Authorization: Bearer <api_key>`.
    pub api_key: Option<Secret>,
    /// The sample rate the service takes and speaks, in Hz.
    #[serde(default = "default_rate")]
    pub sample_rate: u32,
}

fn default_rate() -> u32 {
    16_000
}

/// The provider: made from the typed config by the runtime, once per backend
/// and again on each `update_config`.
#[derive(Debug)]
pub struct AcmeProvider {
    config: AcmeConfig,
    counters: Arc<LinkCounters>,
}

#[async_trait]
impl Provider for AcmeProvider {
    const NAME: &'static str = "acme";
    type Config = AcmeConfig;

    fn capabilities() -> ProviderCapabilities {
        let mut caps = ProviderCapabilities::default();
        caps.min_latency = Duration::from_millis(60);
        caps.codecs = vec![Codec::Pcm16];
        caps.hosted_stages = HostedStages::STT_TTS;
        caps.turns = TurnPolicy::Local;
        caps
    }

    fn check(config: &AcmeConfig) -> Result<()> {
        let mut v = Violations::new();
        if let Err(why) = Dial::check_url(&config.url) {
            v.push("provider_config.url", why);
        }
        if !(8_000..=48_000).contains(&config.sample_rate) {
            v.push(
                "provider_config.sample_rate",
                format!("{} is out of range 8000..=48000", config.sample_rate),
            );
        }
        v.into_result("acme.validate_config")
    }

    fn new(config: AcmeConfig, _: &Config) -> Result<Self> {
        Ok(AcmeProvider {
            config,
            counters: Arc::default(),
        })
    }

    async fn open_link(&self, request: LinkRequest<'_>) -> Result<Option<Link>> {
        let mut dial = Dial::new(self.config.url.clone());
        if let Some(key) = &self.config.api_key {
            dial = dial.bearer(key);
        }
        let mut settings = LinkSettings::for_session(dial, &request);
        settings.keepalive = Some(Duration::from_secs(15));
        // What the application may want to know of the session.
        request.info.set("acme_session", request.session_id);
        let protocol = AcmeProtocol {
            rate: self.config.sample_rate,
        };
        let link = WebSocketLink::open(protocol, settings, self.counters.clone()).await?;
        Ok(Some(link))
    }

    async fn health(&self) -> Result<BTreeMap<String, String>> {
        Ok(self.counters.health(Self::NAME))
    }
}

/// Acme's wire protocol, as the link kit asks for it.
#[derive(Debug)]
pub struct AcmeProtocol {
    rate: u32,
}

fn text(value: Value) -> WsMessage {
    WsMessage::Text(value.to_string().into())
}

impl WireProtocol for AcmeProtocol {
    fn service(&self) -> &'static str {
        "the Acme speech service"
    }

    fn input_format(&self) -> AudioFormat {
        AudioFormat::new(AudioEncoding::PcmS16Le, self.rate, 1)
    }

    fn greeting(&mut self, session_id: &str) -> Vec<WsMessage> {
        vec![text(json!({"type": "hello", "session": session_id}))]
    }

    fn ready_wait(&self) -> Option<Duration> {
        Some(Duration::from_secs(2))
    }

    fn encode_audio(&mut self, frame: AudioFrame) -> WsMessage {
        WsMessage::Binary(frame.into_data())
    }

    fn encode_reply(&mut self, reply: &str) -> Vec<WsMessage> {
        vec![text(json!({"type": "speak", "text": reply}))]
    }

    fn encode_reply_end(&mut self) -> Vec<WsMessage> {
        vec![text(json!({"type": "speak_end"}))]
    }

    fn encode_cancel(&mut self) -> Vec<WsMessage> {
        vec![text(json!({"type": "cancel"}))]
    }

    fn encode_end_of_turn(&mut self) -> Vec<WsMessage> {
        vec![text(json!({"type": "end_of_turn"}))]
    }

    fn decode(
        &mut self,
        message: WsMessage,
        out: &mut Vec<WireEvent>,
    ) -> std::result::Result<(), String> {
        let json = match message {
            WsMessage::Binary(pcm) => {
                let format = AudioFormat::new(AudioEncoding::PcmS16Le, self.rate, 1);
                let frame = AudioFrame::new(format, pcm).map_err(|e| e.message.clone())?;
                out.push(WireEvent::Audio(frame));
                return Ok(());
            }
            WsMessage::Text(t) => t,
            _ => return Ok(()),
        };
        let value: Value =
            serde_json::from_str(json.as_str()).map_err(|e| format!("not JSON: {e}"))?;
        let field = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
        match field("type").as_deref() {
            Some("ready") => out.push(WireEvent::Ready),
            Some("transcript") => out.push(WireEvent::UserTranscript {
                text: field("text").ok_or("a transcript without text")?,
                is_final: value.get("final").and_then(Value::as_bool).unwrap_or(false),
            }),
            Some("done") => out.push(WireEvent::SpeakingStopped),
            Some("interrupted") => out.push(WireEvent::Interrupted),
            Some("error") => out.push(WireEvent::Error(field("message").unwrap_or_default())),
            Some(other) => return Err(format!("unknown message type {other:?}")),
            None => return Err("a message without a type".into()),
        }
        Ok(())
    }
}

voice_backends::register_provider!(AcmeProvider);
