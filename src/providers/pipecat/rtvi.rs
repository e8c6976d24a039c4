//! RTVI messages: the JSON a Pipecat bot sends inside `message` frames
//! (`{"label": "rtvi-ai", "type": "...", "data": {...}}`), and the ones this
//! client sends.

use serde::Deserialize;
use serde_json::Value;

use crate::error::{BackendError, ErrorCode, Result};

/// The label every RTVI message carries.
pub const LABEL: &str = "rtvi-ai";

/// The RTVI protocol version this client speaks (Pipecat 1.14's).
pub const PROTOCOL_VERSION: &str = "2.2.0";

/// What an RTVI message from the bot says, as far as the bridge cares.
#[derive(Clone, Debug, PartialEq)]
pub enum RtviEvent {
    /// The bot is ready (after `client-ready`).
    BotReady,
    /// The bot heard the user start speaking.
    UserStartedSpeaking,
    /// The bot heard the user stop speaking.
    UserStoppedSpeaking,
    /// A transcript of the user.
    UserTranscription {
        /// What was heard.
        text: String,
        /// Whether the turn's transcript is final.
        is_final: bool,
    },
    /// Text the bot is saying (its own LLM's or TTS's text).
    BotText(String),
    /// The bot started speaking.
    BotStartedSpeaking,
    /// The bot stopped speaking (its reply finished playing, or was cut).
    BotStoppedSpeaking,
    /// The bot's reply was interrupted.
    BotInterrupted,
    /// The bot reports an error.
    Error(String),
    /// Another RTVI message type, not used by the bridge.
    Other(String),
}

#[derive(Deserialize)]
struct Envelope {
    label: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    data: Value,
}

fn malformed(message: String) -> BackendError {
    BackendError::new("pipecat.rtvi", ErrorCode::PipelineError, message)
}

fn text_of(data: &Value) -> Option<String> {
    data.get("text").and_then(Value::as_str).map(str::to_owned)
}

/// Parses a `message` frame's JSON. `Ok(None)` for JSON that is not an RTVI
/// message (another label): the bridge skips it.
///
/// # Errors
///
/// `PipelineError` for text that is not a JSON object, an RTVI message with
/// no `type`, or a known type missing what it must carry (a transcription
/// without `text`).
pub fn parse(json: &str) -> Result<Option<RtviEvent>> {
    let env: Envelope = serde_json::from_str(json)
        .map_err(|e| malformed(format!("message frame is not a JSON object: {e}")))?;
    if env.label.as_deref() != Some(LABEL) {
        return Ok(None);
    }
    let kind = env
        .kind
        .ok_or_else(|| malformed("RTVI message without a type".into()))?;
    let need_text = |what: &str| {
        text_of(&env.data)
            .ok_or_else(|| malformed(format!("RTVI {what} message without data.text")))
    };
    Ok(Some(match kind.as_str() {
        "bot-ready" => RtviEvent::BotReady,
        "user-started-speaking" => RtviEvent::UserStartedSpeaking,
        "user-stopped-speaking" => RtviEvent::UserStoppedSpeaking,
        "user-transcription" => RtviEvent::UserTranscription {
            text: need_text("user-transcription")?,
            is_final: env
                .data
                .get("final")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        },
        "bot-tts-text" => RtviEvent::BotText(need_text("bot-tts-text")?),
        "bot-started-speaking" => RtviEvent::BotStartedSpeaking,
        "bot-stopped-speaking" => RtviEvent::BotStoppedSpeaking,
        "bot-interrupted" => RtviEvent::BotInterrupted,
        "error" | "error-response" => RtviEvent::Error(
            env.data
                .get("error")
                .or_else(|| env.data.get("message"))
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                .unwrap_or_else(|| "the bot reported an error".into()),
        ),
        _ => RtviEvent::Other(kind),
    }))
}

/// The `client-ready` message a client sends once connected.
pub fn client_ready(id: &str) -> String {
    serde_json::json!({
        "label": LABEL,
        "type": "client-ready",
        "id": id,
        "data": {
            "version": PROTOCOL_VERSION,
            "about": {
                "library": env!("CARGO_PKG_NAME"),
                "library_version": env!("CARGO_PKG_VERSION"),
            },
        },
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_messages_parse() {
        let t = r#"{"label":"rtvi-ai","type":"user-transcription","data":{"text":"hi","user_id":"u","timestamp":"t","final":true}}"#;
        assert_eq!(
            parse(t).unwrap(),
            Some(RtviEvent::UserTranscription {
                text: "hi".into(),
                is_final: true
            })
        );
        let s = r#"{"label":"rtvi-ai","type":"bot-stopped-speaking"}"#;
        assert_eq!(parse(s).unwrap(), Some(RtviEvent::BotStoppedSpeaking));
        let o = r#"{"label":"rtvi-ai","type":"metrics","data":{}}"#;
        assert_eq!(parse(o).unwrap(), Some(RtviEvent::Other("metrics".into())));
    }

    #[test]
    fn other_labels_are_skipped_and_garbage_is_an_error() {
        assert_eq!(parse(r#"{"label":"app","type":"x"}"#).unwrap(), None);
        assert!(
            parse("not json")
                .unwrap_err()
                .message
                .contains("not a JSON object")
        );
        let e = parse(r#"{"label":"rtvi-ai","type":"user-transcription","data":{}}"#).unwrap_err();
        assert!(e.message.contains("data.text"), "{}", e.message);
    }

    #[test]
    fn client_ready_is_an_rtvi_message() {
        let v: Value = serde_json::from_str(&client_ready("1")).unwrap();
        assert_eq!(v["label"], LABEL);
        assert_eq!(v["type"], "client-ready");
    }
}
