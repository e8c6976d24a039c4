//! Fuzzing of every decoder a client or a service can reach, on the stable
//! toolchain: the WebSocket protocol's client messages (feature `server`),
//! Pipecat frames and RTVI messages (feature `pipecat`), and the config
//! loaders.
//!
//! Each target is a function of raw bytes that panics when an invariant
//! breaks: a decoder never panics, refuses input with a typed error that says
//! something, and what it accepts survives re-encoding unchanged where there
//! is an encoder. [`run`] drives a target with a seed corpus and mutations
//! from a seeded PRNG (bit and byte flips, inserted, deleted and duplicated
//! ranges, splices, dictionary tokens, odd numbers, deep nesting, protobuf
//! varints), keeps the mutants that reach a new kind of outcome, catches
//! panics and writes each crashing or slow input to a file. It is not
//! coverage-guided: it finds what random mutation of well-formed input
//! finds. `examples/fuzz.rs` is its command line.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

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
const CLIENT_TOKENS: &[&str] = &[
    "\"type\"", "\"start\"", "\"text\"", "\"stop\"", "\"user_id\"", "\"sample_rate\"", "\"token\"",
    "16000", "48000", "11025",
];
#[cfg(feature = "pipecat")]
#[rustfmt::skip]
const PIPECAT_TOKENS: &[&str] = &[
    "\n", "\x12", "\x1a", "\"", "*", "\x08", "\x10", "\x18", "\x20", "\x28",
];
#[cfg(feature = "pipecat")]
#[rustfmt::skip]
const RTVI_TOKENS: &[&str] = &[
    "\"label\"", "\"rtvi-ai\"", "\"type\"", "\"data\"", "\"text\"", "\"final\"", "\"error\"",
    "\"message\"", "\"bot-ready\"", "\"user-transcription\"", "\"bot-tts-text\"",
    "\"error-response\"",
];
#[rustfmt::skip]
const SESSION_TOKENS: &[&str] = &[
    "\"user_id\"", "\"transport\"", "\"webrtc\"", "\"connection_url\"", "\"auth_token\"",
    "\"pipeline\"", "\"metadata\"", "\"input_format\"", "\"sample_rate\"", "\"channels\"",
    "\"encoding\"", "\"mulaw\"", "ws://", "wss://u:p@h", "?token=", "%00", "[redacted]",
];
const JSON_NESTS: &[(&str, &str)] = &[("[", "]"), ("{\"a\":", "}"), ("[{\"k\":", "}]")];
#[rustfmt::skip]
const CONFIG_TOKENS: &[&str] = &[
    "provider", "\"local\"", "\"pipecat\"", "pipeline_type", "s2s", "stt_tts", "stt_provider",
    "tts_provider", "s2s_provider", "vad_provider", "provider_config", "components", "processors",
    "name", "order", "options", "latency_target", "timeout", "retry_delay", "max_retries",
    "rate_limit_per_second", "rate_limit_burst", "log_level", "300ms", "1h 2m", "5m", "10s",
    "18446744073709551615s", "url", "url_template", "{session_id}", "{user_id}", "auth_token",
    "input_sample_rate", "client_ready", "api_key", "[redacted]", "ws://", "wss://u:p@h:1/",
];
#[rustfmt::skip]
const TOML_TOKENS: &[&str] = &[
    "provider", "\"local\"", "\"pipecat\"", "pipeline_type", "\"s2s\"", "s2s_provider", " = ",
    "[provider_config]", "[components.x]", "[[processors]]", "name", "options", "timeout",
    "\"10s\"", "latency_target", "rate_limit_per_second", "nan", "inf", "-inf", "'''", "\"\"\"",
    "1979-05-27T07:32:00Z", "url", "url_template", "auth_token", "a.b.c", "\\U0001F600",
];
#[rustfmt::skip]
const YAML_TOKENS: &[&str] = &[
    "provider: ", "local", "pipecat", "pipeline_type: ", "s2s", "s2s_provider: ", "echo",
    "provider_config:\n  ", "components:\n  x:\n    ", "processors:\n  - name: ", "timeout: ",
    "10s", "&a ", "*a", "<<: *a", "!!str ", "!!binary ", "!!float ", "? ", "---\n", "...\n",
    "|\n  ", ">-\n  ", "%YAML 1.2\n", "!<tag:yaml.org,2002:str> ", ".nan", ".inf", "~", "'",
];
/// Tokens every target's mutator may insert.
#[rustfmt::skip]
const COMMON_TOKENS: &[&str] = &[
    "{", "}", "[", "]", "\"", "\\\"", "\\u0000", "\\ud800", "\\uDFFF", "\0", ":", ",", "null",
    "true", "false", "\n", "\r\n", "\t", " ", "#", "=", "é", "😀", "\u{202e}", "\u{feff}",
];
#[rustfmt::skip]
const NUMBERS: &[&str] = &[
    "0", "-1", "1", "255", "65535", "4294967295", "4294967296", "-2147483649",
    "9223372036854775807", "18446744073709551615", "18446744073709551616", "-9223372036854775809",
    "1e308", "1e309", "-1e309", "5e-324", "1e-400", "-0", "0.1", "1.7976931348623157e308", "0x10",
    "1_000", "00", "1.", ".5", "NaN", "Infinity",
];

// --- targets ---------------------------------------------------------------

/// Checks a refusal: the expected code (and operation, when given) and a
/// message that says something.
fn refused(e: BackendError, op: Option<&str>, code: ErrorCode) -> Outcome {
    assert_eq!(e.code, code, "wrong code: {e}");
    if let Some(op) = op {
        assert_eq!(e.op, op, "wrong operation: {e}");
    }
    assert!(!e.message.trim().is_empty(), "empty message: {e:?}");
    Outcome::Rejected(e.message.clone())
}

fn utf8(data: &[u8]) -> Result<&str, Outcome> {
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

fn check_config(loaded: Result<Config, BackendError>) -> Outcome {
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

fn to_value(v: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(v).expect("serializes")
}

/// Equal values. serde_json is built with its `float_roundtrip` feature, so
/// a float it wrote reads back to the same bits (without it, some read up to
/// 2 ULP off: the inputs under `fuzz/corpus/` that found it are kept).
fn same(a: &serde_json::Value, b: &serde_json::Value) -> bool {
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

fn bytes_of(items: &[&str]) -> Vec<Vec<u8>> {
    items.iter().map(|s| s.as_bytes().to_vec()).collect()
}

#[cfg(feature = "server")]
fn client_message_seeds() -> Vec<Vec<u8>> {
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
fn pipecat_frame_seeds() -> Vec<Vec<u8>> {
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
fn rtvi_seeds() -> Vec<Vec<u8>> {
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
const TOML_CONFIGS: &[&str] = &[
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

fn config_toml_seeds() -> Vec<Vec<u8>> {
    bytes_of(TOML_CONFIGS)
}

fn config_values() -> impl Iterator<Item = serde_json::Value> {
    TOML_CONFIGS
        .iter()
        .map(|t| toml::from_str(t).expect("seed configs are TOML"))
}

fn config_yaml_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = config_values()
        .map(|v| serde_yaml_ng::to_string(&v).expect("YAML").into_bytes())
        .collect();
    seeds.push(b"base: &b\n  provider: local\n  s2s_provider: echo\n".to_vec());
    seeds
}

fn config_json_seeds() -> Vec<Vec<u8>> {
    config_values()
        .map(|v| serde_json::to_vec_pretty(&v).expect("JSON"))
        .collect()
}

fn session_config_seeds() -> Vec<Vec<u8>> {
    bytes_of(&[
        r#"{"user_id":"alice"}"#,
        r#"{"user_id":"bob","transport":"webrtc","connection_url":"wss://u:pw@example.com/x?token=abc&a=1","pipeline":{"pipeline_type":"s2s","s2s_provider":"echo"},"metadata":{"k":[1,2.5,{"a":null}],"b":true}}"#,
        r#"{"user_id":"c","auth_token":"t","input_format":{"encoding":"mulaw","sample_rate":8000,"channels":1},"output_format":{"encoding":"pcm_f32_le","sample_rate":48000,"channels":2}}"#,
        r#"{"user_id":"d","pipeline":{"pipeline_type":"stt_tts","stt_provider":"a","tts_provider":"b"}}"#,
    ])
}

// --- driver ----------------------------------------------------------------

/// How [`run`] runs a target.
#[derive(Clone, Debug)]
pub struct Options {
    /// Inputs to run, the seeds included.
    pub inputs: u64,
    /// The PRNG seed: the same seed runs the same inputs.
    pub seed: u64,
    /// Longest input made, in bytes.
    pub max_len: usize,
    /// Go on after a crash (each distinct panic is reported once).
    pub keep_going: bool,
    /// An input taking longer than this is reported as slow.
    pub slow: Duration,
    /// Where crashing and slow inputs are written (`None`: not written).
    pub artifacts: Option<PathBuf>,
    /// Extra seeds: every file of `<corpus>/<target name>/`, when it exists.
    pub corpus: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            inputs: 1_000_000,
            seed: 1,
            max_len: 4096,
            keep_going: false,
            slow: Duration::from_secs(1),
            artifacts: Some(std::env::temp_dir().join("voice-backends-fuzz")),
            corpus: None,
        }
    }
}

/// An input that panicked, or one that took longer than [`Options::slow`].
#[derive(Clone, Debug)]
pub struct Finding {
    /// The panic message and location, or how long the input took.
    pub message: String,
    /// The input.
    pub input: Vec<u8>,
    /// The file it was written to.
    pub path: Option<PathBuf>,
}

impl Finding {
    /// The first 200 bytes of the input, escaped.
    pub fn preview(&self) -> String {
        let end = self.input.len().min(200);
        let more = if end < self.input.len() { "..." } else { "" };
        format!("{}{more}", self.input[..end].escape_ascii())
    }
}

/// What a run of one target did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The target's name.
    pub target: &'static str,
    /// Inputs run, seeds included.
    pub inputs: u64,
    /// Inputs the decoder accepted.
    pub accepted: u64,
    /// Inputs the decoder refused.
    pub rejected: u64,
    /// Accepted inputs that were mutants (not seeds).
    pub mutants_accepted: u64,
    /// Refused inputs that were mutants.
    pub mutants_rejected: u64,
    /// Inputs kept at the end (seeds and kept mutants).
    pub corpus: usize,
    /// Each distinct panic, with the first input that raised it.
    pub crashes: Vec<Finding>,
    /// Inputs that panicked, the repeats of a known panic included.
    pub crashed_inputs: u64,
    /// Inputs slower than [`Options::slow`] (the first 10).
    pub slow: Vec<Finding>,
    /// The slowest input's time.
    pub slowest: Duration,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl Report {
    /// Inputs per second.
    pub fn rate(&self) -> f64 {
        self.inputs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A splitmix64 generator: small, fast and deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// FNV-1a, for naming files and telling outcomes apart.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

thread_local! {
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    static PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that, on a thread running a target, records
/// the message and location instead of printing them; on other threads it
/// calls the hook that was there before.
fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CAPTURING.with(Cell::get) {
                return previous(info);
            }
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            let at = info
                .location()
                .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
                .unwrap_or_default();
            PANIC.with(|p| *p.borrow_mut() = Some(format!("{message}{at}")));
        }));
    });
}

/// Runs one input: the outcome, or the panic's message and location.
pub fn run_one(target: &Target, input: &[u8]) -> Result<Outcome, String> {
    install_panic_hook();
    CAPTURING.with(|c| c.set(true));
    let result = catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    CAPTURING.with(|c| c.set(false));
    result.map_err(|_| {
        PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| "a panic".into())
    })
}

/// A short class of an outcome: refusals that differ only in numbers or
/// quoted text are one class.
fn class(outcome: &Outcome) -> u64 {
    match outcome {
        Outcome::Accepted(kind) => fnv(kind.as_bytes()),
        Outcome::Rejected(reason) => {
            let cut = reason.split(['"', '`', '\'']).next().unwrap_or("");
            let kept: Vec<u8> = cut
                .bytes()
                .filter(|b| !b.is_ascii_digit())
                .take(64)
                .collect();
            !fnv(&kept)
        }
    }
}

fn save(options: &Options, target: &str, what: &str, input: &[u8]) -> Option<PathBuf> {
    let dir = options.artifacts.as_ref()?.join(target);
    let path = dir.join(format!("{what}-{:016x}", fnv(input)));
    std::fs::create_dir_all(&dir).ok()?;
    std::fs::write(&path, input).ok()?;
    Some(path)
}

fn read_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    paths.sort();
    paths.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Mutants kept beyond the seeds, in each of the two pools.
const MAX_KEPT: usize = 1024;

/// Runs `target` for `options.inputs` inputs: first the seeds, then mutants.
/// Inputs are kept in two pools, accepted and refused: a mutant joins its
/// pool when its outcome is of a new kind (an accepted one also at random,
/// one in 16), and three parents in four come from the accepted pool, so
/// most mutants are near-misses of valid input. Stops at the first crash
/// unless `options.keep_going`.
pub fn run(target: &Target, options: &Options) -> Report {
    let mut rng = Rng(options.seed ^ fnv(target.name.as_bytes()));
    let mut seeds = (target.seeds)();
    if let Some(dir) = &options.corpus {
        seeds.extend(read_corpus(&dir.join(target.name)));
    }
    seeds.iter_mut().for_each(|s| s.truncate(options.max_len));
    if seeds.is_empty() {
        seeds.push(Vec::new());
    }
    // Accepted, refused; and how many seeds each holds (never replaced).
    let mut pools: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
    let mut fixed = [0, 0];
    let mut classes = HashSet::new();
    let mut crash_messages = HashSet::new();
    let mut report = Report {
        target: target.name,
        ..Report::default()
    };
    let start = Instant::now();
    while report.inputs < options.inputs {
        let seed = report.inputs < seeds.len() as u64;
        let input = if seed {
            seeds[report.inputs as usize].clone()
        } else {
            if report.inputs == seeds.len() as u64 {
                fixed = [pools[0].len(), pools[1].len()];
            }
            mutant(&mut rng, &pools, target, options.max_len)
        };
        report.inputs += 1;
        let began = Instant::now();
        let result = run_one(target, &input);
        let took = began.elapsed();
        report.slowest = report.slowest.max(took);
        if took > options.slow && report.slow.len() < 10 {
            report.slow.push(Finding {
                message: format!("took {took:.2?}"),
                path: save(options, target.name, "slow", &input),
                input: input.clone(),
            });
        }
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(message) => {
                report.crashed_inputs += 1;
                if crash_messages.insert(message.clone()) {
                    report.crashes.push(Finding {
                        message,
                        path: save(options, target.name, "crash", &input),
                        input,
                    });
                }
                if options.keep_going {
                    continue;
                }
                break;
            }
        };
        let accepted = matches!(outcome, Outcome::Accepted(_));
        report.accepted += u64::from(accepted);
        report.rejected += u64::from(!accepted);
        report.mutants_accepted += u64::from(accepted && !seed);
        report.mutants_rejected += u64::from(!accepted && !seed);
        let new = classes.insert(class(&outcome));
        let pool = usize::from(!accepted);
        if seed || new || (accepted && rng.below(16) == 0) {
            if seed || pools[pool].len() < fixed[pool] + MAX_KEPT {
                pools[pool].push(input);
            } else {
                let at = fixed[pool] + rng.below(MAX_KEPT);
                pools[pool][at] = input;
            }
        }
    }
    report.corpus = pools[0].len() + pools[1].len();
    report.elapsed = start.elapsed();
    report
}

// --- mutations -------------------------------------------------------------

/// A random entry of a random non-empty pool; of the accepted pool (the
/// first) three times in four.
fn pick_input<'a>(rng: &mut Rng, pools: &'a [Vec<Vec<u8>>; 2]) -> &'a Vec<u8> {
    static NOTHING: Vec<u8> = Vec::new();
    if pools.iter().all(Vec::is_empty) {
        return &NOTHING;
    }
    let pool = if pools[1].is_empty() || (!pools[0].is_empty() && rng.below(4) != 0) {
        &pools[0]
    } else {
        &pools[1]
    };
    rng.pick(pool)
}

/// A mutant of a pool entry: usually one mutation, sometimes up to eight;
/// never the entry itself.
fn mutant(rng: &mut Rng, pools: &[Vec<Vec<u8>>; 2], target: &Target, max_len: usize) -> Vec<u8> {
    let parent = pick_input(rng, pools);
    let mut data = parent.clone();
    loop {
        let count = if rng.below(4) == 0 {
            1 << rng.below(4)
        } else {
            1
        };
        for _ in 0..count {
            mutate(rng, &mut data, pools, target);
        }
        data.truncate(max_len);
        if data != *parent {
            return data;
        }
    }
}

/// A range `start..end` of `data`, at most `max` long.
fn range(rng: &mut Rng, len: usize, max: usize) -> (usize, usize) {
    let start = rng.below(len + 1);
    let end = start + rng.below((len - start).min(max) + 1);
    (start, end)
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

fn mutate(rng: &mut Rng, data: &mut Vec<u8>, pools: &[Vec<Vec<u8>>; 2], target: &Target) {
    let len = data.len();
    let at = rng.below(len + 1);
    match rng.below(if target.binary { 13 } else { 12 }) {
        0 if len > 0 => data[at.min(len - 1)] ^= 1 << rng.below(8),
        1 if len > 0 => {
            let random = rng.next() as u8;
            data[at.min(len - 1)] = *rng.pick(&[0, 0xff, 0x7f, 0x80, b'"', b'\\', random]);
        }
        2 => {
            let bytes: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.next() as u8).collect();
            data.splice(at..at, bytes);
        }
        3 => {
            let (s, e) = range(rng, len, 64);
            data.drain(s..e);
        }
        4 => {
            let (s, e) = range(rng, len, 256);
            let copy = data[s..e].to_vec();
            for _ in 0..1 + rng.below(4) {
                data.splice(at..at, copy.iter().copied());
            }
        }
        5 => {
            let (s, e) = range(rng, len, 64);
            let copy = data[s..e].to_vec();
            let to = rng.below(len - copy.len() + 1);
            data[to..to + copy.len()].copy_from_slice(&copy);
        }
        6 => {
            let other = pick_input(rng, pools);
            let from = rng.below(other.len() + 1);
            data.truncate(at);
            data.extend_from_slice(&other[from..]);
        }
        7 | 8 => {
            let tokens = if rng.below(3) == 0 {
                COMMON_TOKENS
            } else {
                target.tokens
            };
            if let Some(token) = tokens.get(rng.below(tokens.len())) {
                if rng.below(2) == 0 {
                    let (s, e) = range(rng, len, 8);
                    data.splice(s..e, token.bytes());
                } else {
                    data.splice(at..at, token.bytes());
                }
            }
        }
        9 => {
            // A number replaced by an odd one, or one inserted.
            let number = if rng.below(8) == 0 {
                "9".repeat(20 + rng.below(400))
            } else {
                (*rng.pick(NUMBERS)).to_owned()
            };
            let s = data[at..]
                .iter()
                .position(u8::is_ascii_digit)
                .map_or(at, |p| at + p);
            let e = data[s..]
                .iter()
                .position(|b| !b.is_ascii_digit() && !b".eE+-".contains(b))
                .map_or(data.len(), |p| s + p);
            data.splice(s..e, number.bytes());
        }
        10 => {
            // Nesting, a few hundred levels deep at most.
            if let Some((open, close)) = target.nests.get(rng.below(target.nests.len())) {
                let deep = rng.below(4) == 0;
                let depth = 1 + rng.below(if deep { 300 } else { 16 });
                let to = at + rng.below(len - at + 1);
                data.splice(to..to, close.repeat(depth).into_bytes());
                data.splice(at..at, open.repeat(depth).into_bytes());
            }
        }
        11 => data.truncate(at),
        12 => {
            // A protobuf varint: a field key, a length or a value, often huge.
            let value = match rng.below(6) {
                0 => u64::MAX,
                1 => u64::from(u32::MAX) + rng.below(3) as u64,
                2 => (rng.below(8) as u64 + 1) << 3 | rng.below(8) as u64,
                3 => (len as u64 + rng.below(3) as u64).saturating_sub(1),
                4 => 1 << rng.below(64),
                _ => rng.next() >> rng.below(64),
            };
            let mut bytes = varint(value);
            if rng.below(4) == 0 {
                bytes.pop();
                bytes.push(0x80);
            }
            let (s, e) = if rng.below(2) == 0 {
                (at, at)
            } else {
                // Over the varint starting at `at`.
                let end = data[at..]
                    .iter()
                    .position(|b| b & 0x80 == 0)
                    .map_or(len, |p| at + p + 1);
                (at, end)
            };
            data.splice(s..e, bytes);
        }
        _ => data.insert(at, rng.next() as u8),
    }
}
