//! The targets: one function per decoder, its seeds and its tokens.

use crate::config::{Config, SessionConfig};
use crate::error::{BackendError, ErrorCode};
use crate::provider::{BackendProvider, HostedStages};

/// What a target made of one input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Decoded; the name says what it decoded to.
    Accepted(&'static str),
    /// Refused, with the decoder's reason.
    Rejected(String),
}

/// One fuzz target: a decoder behind a function of raw bytes, with what the
/// mutator needs to make inputs for it.
#[derive(Clone, Copy)]
pub struct Target {
    /// The name the command line takes.
    pub name: &'static str,
    /// Decodes one input and checks the invariants; panics when one breaks.
    pub run: fn(&[u8]) -> Outcome,
    /// Well-formed (and a few malformed) inputs to start from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Tokens of the format, inserted by the mutator.
    pub tokens: &'static [&'static str],
    /// Opening and closing tokens nested by the mutator.
    pub nests: &'static [(&'static str, &'static str)],
    /// Whether the format is binary (protobuf): adds varint mutations.
    pub binary: bool,
}

/// Every target built in, in a fixed order.
pub fn targets() -> Vec<Target> {
    let mut all = Vec::new();
    #[cfg(feature = "server")]
    all.push(Target {
        name: "client_message",
        run: client_message,
        seeds: client_message_seeds,
        tokens: CLIENT_TOKENS,
        nests: JSON_NESTS,
        binary: false,
    });
    #[cfg(feature = "pipecat")]
    {
        all.push(Target {
            name: "pipecat_frame",
            run: pipecat_frame,
            seeds: pipecat_frame_seeds,
            tokens: PIPECAT_TOKENS,
            nests: &[("\x22\x7f", ""), ("\x0a\x7f", "")],
            binary: true,
        });
        all.push(Target {
            name: "rtvi",
            run: rtvi,
            seeds: rtvi_seeds,
            tokens: RTVI_TOKENS,
            nests: JSON_NESTS,
            binary: false,
        });
    }
    #[cfg(feature = "cartesia")]
    all.push(Target {
        name: "cartesia_message",
        run: super::cartesia::cartesia_message,
        seeds: super::cartesia::cartesia_seeds,
        tokens: super::cartesia::CARTESIA_TOKENS,
        nests: JSON_NESTS,
        binary: false,
    });
    #[cfg(feature = "livekit")]
    {
        all.push(Target {
            name: "livekit_signal",
            run: super::livekit::livekit_signal,
            seeds: super::livekit::livekit_signal_seeds,
            tokens: super::livekit::LIVEKIT_TOKENS,
            nests: super::livekit::PROTO_NESTS,
            binary: true,
        });
        all.push(Target {
            name: "livekit_agent_message",
            run: super::livekit::livekit_agent_message,
            seeds: super::livekit::livekit_agent_message_seeds,
            tokens: super::livekit::LIVEKIT_TOKENS,
            nests: super::livekit::PROTO_NESTS,
            binary: true,
        });
    }
    #[cfg(feature = "vapi")]
    all.push(Target {
        name: "vapi_message",
        run: super::vapi::vapi_message,
        seeds: super::vapi::vapi_seeds,
        tokens: super::vapi::VAPI_TOKENS,
        nests: JSON_NESTS,
        binary: false,
    });
    #[cfg(feature = "vocode")]
    all.push(Target {
        name: "vocode_message",
        run: super::vocode::vocode_message,
        seeds: super::vocode::vocode_seeds,
        tokens: super::vocode::VOCODE_TOKENS,
        nests: JSON_NESTS,
        binary: false,
    });
    for (name, run) in [
        ("config_toml", config_toml as fn(&[u8]) -> Outcome),
        ("config_yaml", config_yaml),
        ("config_json", config_json),
    ] {
        all.push(Target {
            name,
            run,
            seeds: match name {
                "config_toml" => config_toml_seeds,
                "config_yaml" => config_yaml_seeds,
                _ => config_json_seeds,
            },
            tokens: match name {
                "config_toml" => TOML_TOKENS,
                "config_yaml" => YAML_TOKENS,
                _ => CONFIG_TOKENS,
            },
            nests: match name {
                "config_toml" => &[("[", "]"), ("{a=", "}"), ("[[", "]]")],
                "config_yaml" => &[("[", "]"), ("{a: ", "}"), ("- ", ""), ("\n ", "")],
                _ => JSON_NESTS,
            },
            binary: false,
        });
    }
    all.push(Target {
        name: "session_config_json",
        run: session_config_json,
        seeds: session_config_seeds,
        tokens: SESSION_TOKENS,
        nests: JSON_NESTS,
        binary: false,
    });
    all
}

#[cfg(feature = "server")]
#[rustfmt::skip]
pub(super) const CLIENT_TOKENS: &[&str] = &[
    "\"type\"", "\"start\"", "\"text\"", "\"stop\"", "\"user_id\"", "\"sample_rate\"", "\"token\"",
    "16000", "48000", "11025",
];
#[cfg(feature = "pipecat")]
#[rustfmt::skip]
pub(super) const PIPECAT_TOKENS: &[&str] = &[
    "\n", "\x12", "\x1a", "\"", "*", "\x08", "\x10", "\x18", "\x20", "\x28",
];
#[cfg(feature = "pipecat")]
#[rustfmt::skip]
pub(super) const RTVI_TOKENS: &[&str] = &[
    "\"label\"", "\"rtvi-ai\"", "\"type\"", "\"data\"", "\"text\"", "\"final\"", "\"error\"",
    "\"message\"", "\"bot-ready\"", "\"user-transcription\"", "\"bot-tts-text\"",
    "\"error-response\"",
];
#[rustfmt::skip]
pub(super) const SESSION_TOKENS: &[&str] = &[
    "\"user_id\"", "\"transport\"", "\"webrtc\"", "\"connection_url\"", "\"auth_token\"",
    "\"pipeline\"", "\"metadata\"", "\"input_format\"", "\"sample_rate\"", "\"channels\"",
    "\"encoding\"", "\"mulaw\"", "ws://", "wss://u:p@h", "?token=", "%00", "[redacted]",
];
pub(super) const JSON_NESTS: &[(&str, &str)] = &[("[", "]"), ("{\"a\":", "}"), ("[{\"k\":", "}]")];
#[rustfmt::skip]
pub(super) const CONFIG_TOKENS: &[&str] = &[
    "provider", "\"local\"", "\"pipecat\"", "pipeline_type", "s2s", "stt_tts", "stt_provider",
    "tts_provider", "s2s_provider", "vad_provider", "provider_config", "components", "processors",
    "name", "order", "options", "latency_target", "timeout", "retry_delay", "max_retries",
    "rate_limit_per_second", "rate_limit_burst", "log_level", "300ms", "1h 2m", "5m", "10s",
    "18446744073709551615s", "url", "url_template", "{session_id}", "{user_id}", "auth_token",
    "input_sample_rate", "client_ready", "api_key", "[redacted]", "ws://", "wss://u:p@h:1/",
];
#[rustfmt::skip]
pub(super) const TOML_TOKENS: &[&str] = &[
    "provider", "\"local\"", "\"pipecat\"", "pipeline_type", "\"s2s\"", "s2s_provider", " = ",
    "[provider_config]", "[components.x]", "[[processors]]", "name", "options", "timeout",
    "\"10s\"", "latency_target", "rate_limit_per_second", "nan", "inf", "-inf", "'''", "\"\"\"",
    "1979-05-27T07:32:00Z", "url", "url_template", "auth_token", "a.b.c", "\\U0001F600",
];
#[rustfmt::skip]
pub(super) const YAML_TOKENS: &[&str] = &[
    "provider: ", "local", "pipecat", "pipeline_type: ", "s2s", "s2s_provider: ", "echo",
    "provider_config:\n  ", "components:\n  x:\n    ", "processors:\n  - name: ", "timeout: ",
    "10s", "&a ", "*a", "<<: *a", "!!str ", "!!binary ", "!!float ", "? ", "---\n", "...\n",
    "|\n  ", ">-\n  ", "%YAML 1.2\n", "!<tag:yaml.org,2002:str> ", ".nan", ".inf", "~", "'",
];
/// Tokens every target's mutator may insert.
#[rustfmt::skip]
pub(super) const COMMON_TOKENS: &[&str] = &[
    "{", "}", "[", "]", "\"", "\\\"", "\\u0000", "\\ud800", "\\uDFFF", "\0", ":", ",", "null",
    "true", "false", "\n", "\r\n", "\t", " ", "#", "=", "é", "😀", "\u{202e}", "\u{feff}",
];
#[rustfmt::skip]
pub(super) const NUMBERS: &[&str] = &[
    "0", "-1", "1", "255", "65535", "4294967295", "4294967296", "-2147483649",
    "9223372036854775807", "18446744073709551615", "18446744073709551616", "-9223372036854775809",
    "1e308", "1e309", "-1e309", "5e-324", "1e-400", "-0", "0.1", "1.7976931348623157e308", "0x10",
    "1_000", "00", "1.", ".5", "NaN", "Infinity",
];

// --- targets ---------------------------------------------------------------

/// Checks a refusal: the expected code (and operation, when given) and a
/// message that says something.
pub(super) fn refused(e: BackendError, op: Option<&str>, code: ErrorCode) -> Outcome {
    assert_eq!(e.code, code, "wrong code: {e}");
    if let Some(op) = op {
        assert_eq!(e.op, op, "wrong operation: {e}");
    }
    assert!(!e.message.trim().is_empty(), "empty message: {e:?}");
    Outcome::Rejected(e.message.clone())
}

pub(super) fn utf8(data: &[u8]) -> Result<&str, Outcome> {
    std::str::from_utf8(data).map_err(|_| Outcome::Rejected("not UTF-8".into()))
}

/// A WebSocket message from a client (`server::protocol`): a text message,
/// or a binary one tried as text when it is UTF-8. Refusals are close reasons
/// that fit a close frame; an accepted `start` or `text` parses the same once
/// re-serialized.
#[cfg(feature = "server")]
pub fn client_message(data: &[u8]) -> Outcome {
    use crate::server::protocol::{ClientMessage, close_reason};
    let text = match utf8(data) {
        Ok(text) => text,
        Err(outcome) => return outcome,
    };
    let reason = |reason: String| {
        assert!(!reason.trim().is_empty(), "empty close reason");
        let cut = close_reason(&format!("bad start message: {reason}"));
        assert!(!cut.is_empty() && cut.len() <= 123, "{cut:?}");
        Outcome::Rejected(reason)
    };
    match ClientMessage::parse(text) {
        Err(e) => reason(e),
        Ok(ClientMessage::Start(start)) => {
            let token = start.token.as_ref().map(|t| t.expose().to_owned());
            let again = serde_json::json!({"type": "start", "user_id": start.user_id,
                "sample_rate": start.sample_rate, "token": token})
            .to_string();
            let Ok(ClientMessage::Start(same)) = ClientMessage::parse(&again) else {
                panic!("re-serialized start does not parse: {again}");
            };
            assert_eq!(
                (
                    &same.user_id,
                    same.sample_rate,
                    same.token.as_ref().map(|t| t.expose())
                ),
                (&start.user_id, start.sample_rate, token.as_deref())
            );
            match start.check() {
                Ok(()) => Outcome::Accepted("start"),
                Err(e) => reason(e),
            }
        }
        Ok(ClientMessage::Text(t)) => {
            let again = serde_json::json!({"type": "text", "text": t}).to_string();
            let Ok(ClientMessage::Text(same)) = ClientMessage::parse(&again) else {
                panic!("re-serialized text does not parse: {again}");
            };
            assert_eq!(same, t);
            Outcome::Accepted("text")
        }
        Ok(ClientMessage::Stop) => Outcome::Accepted("stop"),
        Ok(ClientMessage::Resume(resume)) => match resume.check() {
            Ok(()) => Outcome::Accepted("resume"),
            Err(e) => reason(e),
        },
    }
}

/// A WebSocket message from a Pipecat bot (`pipecat::proto::decode`); a
/// `message` frame's JSON goes on to [`rtvi`], as the bridge does. What
/// decodes re-encodes to a frame that decodes the same.
#[cfg(feature = "pipecat")]
pub fn pipecat_frame(data: &[u8]) -> Outcome {
    use crate::providers::pipecat::proto::{self, Frame, Inbound, Kind, TranscriptionFrame};
    use prost::Message as _;
    let inbound = match proto::decode(bytes::Bytes::copy_from_slice(data)) {
        Ok(inbound) => inbound,
        Err(e) => return refused(e, Some("pipecat.decode"), ErrorCode::PipelineError),
    };
    let (wire, kind) = match &inbound {
        Inbound::Audio(frame) => {
            let f = frame.format();
            assert!((8_000..=192_000).contains(&f.sample_rate) && (1..=8).contains(&f.channels));
            let wire = proto::encode_audio(frame.data().clone(), f.sample_rate, f.channels);
            (wire, "audio")
        }
        Inbound::Text(text) => (proto::encode_text(text), "text"),
        Inbound::Message(json) => {
            let _ = rtvi(json.as_bytes());
            (proto::encode_message(json.clone()), "message")
        }
        Inbound::Transcription { text, user_id } => {
            let frame = TranscriptionFrame {
                text: text.clone(),
                user_id: user_id.clone(),
                ..TranscriptionFrame::default()
            };
            let wire = Frame {
                frame: Some(Kind::Transcription(frame)),
            };
            (wire.encode_to_vec(), "transcription")
        }
        Inbound::Interruption => (vec![0x2a, 0x00], "interruption"),
    };
    let again = proto::decode(wire.into()).expect("a re-encoded frame decodes");
    assert_eq!(again, inbound, "re-encoding changed the frame");
    Outcome::Accepted(kind)
}

/// The JSON of an RTVI message (`pipecat::rtvi::parse`). An event parses the
/// same from a message written back from it.
#[cfg(feature = "pipecat")]
pub fn rtvi(data: &[u8]) -> Outcome {
    use crate::providers::pipecat::rtvi::{LABEL, RtviEvent, parse};
    let text = match utf8(data) {
        Ok(text) => text,
        Err(outcome) => return outcome,
    };
    let event = match parse(text) {
        Ok(Some(event)) => event,
        Ok(None) => return Outcome::Accepted("not rtvi"),
        Err(e) => return refused(e, Some("pipecat.rtvi"), ErrorCode::PipelineError),
    };
    let (kind, data) = match &event {
        RtviEvent::BotReady => ("bot-ready", serde_json::json!({})),
        RtviEvent::UserStartedSpeaking => ("user-started-speaking", serde_json::json!({})),
        RtviEvent::UserStoppedSpeaking => ("user-stopped-speaking", serde_json::json!({})),
        RtviEvent::UserTranscription { text, is_final } => (
            "user-transcription",
            serde_json::json!({"text": text, "final": is_final}),
        ),
        RtviEvent::BotText(text) => ("bot-tts-text", serde_json::json!({ "text": text })),
        RtviEvent::BotStartedSpeaking => ("bot-started-speaking", serde_json::json!({})),
        RtviEvent::BotStoppedSpeaking => ("bot-stopped-speaking", serde_json::json!({})),
        RtviEvent::BotInterrupted => ("bot-interrupted", serde_json::json!({})),
        RtviEvent::Error(message) => ("error", serde_json::json!({ "error": message })),
        RtviEvent::Other(kind) => (kind.as_str(), serde_json::json!({})),
    };
    let again = serde_json::json!({"label": LABEL, "type": kind, "data": data}).to_string();
    let same = parse(&again).unwrap_or_else(|e| panic!("{again} does not parse: {e}"));
    assert_eq!(same.as_ref(), Some(&event), "{again}");
    Outcome::Accepted("rtvi")
}

/// `Config::from_toml_str`; see [`config_json`].
pub fn config_toml(data: &[u8]) -> Outcome {
    utf8(data).map_or_else(|o| o, |t| check_config(Config::from_toml_str(t)))
}

/// `Config::from_yaml_str`; see [`config_json`].
pub fn config_yaml(data: &[u8]) -> Outcome {
    utf8(data).map_or_else(|o| o, |t| check_config(Config::from_yaml_str(t)))
}

/// `Config::from_json_str`. A loaded config: `validate_for` agrees with
/// `violations_for` (its quick path with its full check), the provider it
/// names checks its `provider_config` with a typed error, and one saved as
/// JSON or TOML loads back equal (a float read back from JSON may differ in
/// its last bits) unless saving redacted something.
pub fn config_json(data: &[u8]) -> Outcome {
    utf8(data).map_or_else(|o| o, |t| check_config(Config::from_json_str(t)))
}

pub(super) fn check_config(loaded: Result<Config, BackendError>) -> Outcome {
    let config = match loaded {
        Ok(config) => config,
        Err(e) => return refused(e, Some("config.load"), ErrorCode::InvalidConfig),
    };
    let mut valid = true;
    for hosted in [HostedStages::NONE, HostedStages::STT_TTS] {
        let quick = config.validate_for(hosted);
        let full = config.violations_for(hosted);
        assert_eq!(
            quick.is_ok(),
            full.is_empty(),
            "{hosted:?}: {quick:?} / {full}"
        );
        if let Err(e) = quick {
            refused(e, Some("config.validate"), ErrorCode::InvalidConfig);
            valid = false;
        }
    }
    let provider: Option<Box<dyn BackendProvider>> = match config.provider.as_str() {
        "local" => Some(Box::new(crate::runtime::Registered::<
            crate::providers::local::LocalProvider,
        >::new())),
        #[cfg(feature = "pipecat")]
        "pipecat" => Some(Box::new(crate::runtime::Registered::<
            crate::providers::pipecat::PipecatProvider,
        >::new())),
        _ => None,
    };
    if let Some(Err(e)) = provider.map(|p| p.validate_config(&config)) {
        refused(e, None, ErrorCode::InvalidConfig);
        valid = false;
    }
    let json = config
        .to_json_string()
        .expect("a loaded config saves as JSON");
    if !json.contains("redacted") {
        let again = Config::from_json_str(&json)
            .unwrap_or_else(|e| panic!("saved JSON does not load: {e}\n{json}"));
        assert!(
            same(&to_value(&again), &to_value(&config)),
            "JSON round trip changed the config:\n{json}"
        );
        if let Ok(toml) = config.to_toml_string() {
            let again = Config::from_toml_str(&toml)
                .unwrap_or_else(|e| panic!("saved TOML does not load: {e}\n{toml}"));
            assert!(
                again == config,
                "TOML round trip changed the config:\n{toml}"
            );
        }
    }
    Outcome::Accepted(if valid { "valid" } else { "loaded" })
}

pub(super) fn to_value(v: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(v).expect("serializes")
}

/// Equal values. serde_json is built with its `float_roundtrip` feature, so
/// a float it wrote reads back to the same bits (without it, some read up to
/// 2 ULP off: the inputs under `fuzz/corpus/` that found it are kept).
pub(super) fn same(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    a == b
}

/// `SessionConfig::from_json_str`. A loaded session config validates, saves
/// as JSON that loads back the same (unless it
/// has an `auth_token`, which saving redacts), and resolves against a
/// backend config with a typed result.
pub fn session_config_json(data: &[u8]) -> Outcome {
    let text = match utf8(data) {
        Ok(text) => text,
        Err(outcome) => return outcome,
    };
    let session = match SessionConfig::from_json_str(text) {
        Ok(session) => session,
        Err(e) => return refused(e, Some("session_config.load"), ErrorCode::InvalidConfig),
    };
    session
        .validate()
        .expect("a loaded session config validates");
    let json = session.to_json_string().expect("a session config saves");
    if session.auth_token.is_none() {
        let again = SessionConfig::from_json_str(&json)
            .unwrap_or_else(|e| panic!("saved JSON does not load: {e}\n{json}"));
        assert!(
            same(&to_value(&again), &to_value(&session)),
            "JSON round trip changed the session config:\n{json}"
        );
    }
    let mut base = Config::new("local");
    base.pipeline_type = crate::config::PipelineType::S2s;
    base.s2s_provider = Some("echo".into());
    match session.resolve_pipeline(&base) {
        Ok(_) => Outcome::Accepted("resolved"),
        Err(e) => {
            refused(e, None, ErrorCode::InvalidConfig);
            Outcome::Accepted("unresolved")
        }
    }
}

// --- seeds -----------------------------------------------------------------

pub(super) fn bytes_of(items: &[&str]) -> Vec<Vec<u8>> {
    items.iter().map(|s| s.as_bytes().to_vec()).collect()
}

#[cfg(feature = "server")]
pub(super) fn client_message_seeds() -> Vec<Vec<u8>> {
    bytes_of(&[
        r#"{"type":"start","user_id":"alice","sample_rate":16000}"#,
        r#"{"type":"start","user_id":"bob","sample_rate":48000,"token":"tok-123"}"#,
        r#"{"type":"start","user_id":"c","sample_rate":8000,"token":null}"#,
        r#"{"type":"text","text":"hello there"}"#,
        r#"{"type":"stop"}"#,
        r#"{"type":"start","user_id":"é😀","sample_rate":44100}"#,
        r#"{"type":"dance"}"#,
    ])
}

#[cfg(feature = "pipecat")]
pub(super) fn pipecat_frame_seeds() -> Vec<Vec<u8>> {
    use crate::providers::pipecat::proto::{self, Frame, InterruptionFrame, Kind};
    use crate::providers::pipecat::rtvi;
    use prost::Message as _;
    let pcm = bytes::Bytes::from_static(&[1, 0, 2, 0, 3, 0, 4, 0]);
    let transcription = Frame {
        frame: Some(Kind::Transcription(proto::TranscriptionFrame {
            id: 7,
            name: "t".into(),
            text: "hi".into(),
            user_id: "u".into(),
            timestamp: "2024-01-01T00:00:00Z".into(),
        })),
    };
    let interruption = Frame {
        frame: Some(Kind::Interruption(InterruptionFrame {
            id: 3,
            name: "i".into(),
        })),
    };
    let mut seeds = vec![
        proto::encode_audio(pcm.clone(), 16_000, 1),
        proto::encode_audio(pcm, 48_000, 2),
        proto::encode_text("hello"),
        transcription.encode_to_vec(),
        interruption.encode_to_vec(),
    ];
    seeds.extend(
        rtvi_seeds()
            .into_iter()
            .take(3)
            .map(|json| proto::encode_message(String::from_utf8(json).expect("seeds are UTF-8"))),
    );
    seeds.push(proto::encode_message(rtvi::client_ready("1")));
    seeds
}

#[cfg(feature = "pipecat")]
pub(super) fn rtvi_seeds() -> Vec<Vec<u8>> {
    bytes_of(&[
        r#"{"label":"rtvi-ai","type":"user-transcription","data":{"text":"hi","user_id":"u","final":true}}"#,
        r#"{"label":"rtvi-ai","type":"bot-tts-text","data":{"text":"hello"}}"#,
        r#"{"label":"rtvi-ai","type":"error","data":{"error":"boom","fatal":false}}"#,
        r#"{"label":"rtvi-ai","type":"bot-ready","id":"1","data":{"version":"2.2.0"}}"#,
        r#"{"label":"rtvi-ai","type":"bot-stopped-speaking"}"#,
        r#"{"label":"rtvi-ai","type":"metrics","data":{"ttfb":[{"value":0.2}]}}"#,
        r#"{"label":"other","type":"x"}"#,
    ])
}

/// Configs in TOML, the source of the YAML and JSON seeds too.
pub(super) const TOML_CONFIGS: &[&str] = &[
    "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\n",
    r#"provider = "local"
pipeline_type = "stt_tts"
stt_provider = "whisper"
tts_provider = "piper"
vad_provider = "energy"
turn_detection_provider = "silence"
latency_target = "300ms"
timeout = "10s"
max_retries = 2
retry_delay = "500ms"
max_concurrent_sessions = 10
enable_tracing = false
log_level = "debug"
rate_limit_per_second = 2.5
rate_limit_burst = 5

[[processors]]
name = "gain"
order = 1
options = { db = 3, curve = [1, 2.5, "x"] }

[components.silence]
ms = 600
"#,
    r#"provider = "pipecat"
timeout = "1m 30s"

[provider_config]
url_template = "wss://bot.example.com/ws?session={session_id}&user={user_id}"
auth_token = "tok-123"
input_sample_rate = 16000
client_ready = true
"#,
    "provider = \"pipecat\"\n[provider_config]\nurl = \"ws://127.0.0.1:8765/ws\"\n",
    "provider = \"local\"\npipeline_type = \"s2s\"\n",
];

pub(super) fn config_toml_seeds() -> Vec<Vec<u8>> {
    bytes_of(TOML_CONFIGS)
}

pub(super) fn config_values() -> impl Iterator<Item = serde_json::Value> {
    TOML_CONFIGS
        .iter()
        .map(|t| toml::from_str(t).expect("seed configs are TOML"))
}

pub(super) fn config_yaml_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = config_values()
        .map(|v| serde_yaml_ng::to_string(&v).expect("YAML").into_bytes())
        .collect();
    seeds.push(b"base: &b\n  provider: local\n  s2s_provider: echo\n".to_vec());
    seeds
}

pub(super) fn config_json_seeds() -> Vec<Vec<u8>> {
    config_values()
        .map(|v| serde_json::to_vec_pretty(&v).expect("JSON"))
        .collect()
}

pub(super) fn session_config_seeds() -> Vec<Vec<u8>> {
    bytes_of(&[
        r#"{"user_id":"alice"}"#,
        r#"{"user_id":"bob","transport":"webrtc","connection_url":"wss://u:pw@example.com/x?token=abc&a=1","pipeline":{"pipeline_type":"s2s","s2s_provider":"echo"},"metadata":{"k":[1,2.5,{"a":null}],"b":true}}"#,
        r#"{"user_id":"c","auth_token":"t","input_format":{"encoding":"mulaw","sample_rate":8000,"channels":1},"output_format":{"encoding":"pcm_f32_le","sample_rate":48000,"channels":2}}"#,
        r#"{"user_id":"d","pipeline":{"pipeline_type":"stt_tts","stt_provider":"a","tts_provider":"b"}}"#,
    ])
}

// --- driver ----------------------------------------------------------------
