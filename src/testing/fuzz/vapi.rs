//! The `vapi_message` target: the JSON events of Vapi's transport socket
//! (`providers::vapi::protocol::decode_event`).

use super::targets::{Outcome, utf8};
use crate::providers::vapi::protocol::{VapiEvent, decode_event};

/// One text message of the transport socket. A refusal says why; an event
/// that matters decodes the same once written back as Vapi writes it, bare
/// and in a `{"message": ...}` envelope.
pub fn vapi_message(data: &[u8]) -> Outcome {
    let text = match utf8(data) {
        Ok(text) => text,
        Err(outcome) => return outcome,
    };
    let event = match decode_event(text) {
        Ok(event) => event,
        Err(why) => {
            assert!(!why.trim().is_empty(), "an empty refusal of {text:?}");
            return Outcome::Rejected(why);
        }
    };
    let (kind, again) = match &event {
        VapiEvent::UserTranscript { text, is_final } => (
            "user_transcript",
            serde_json::json!({
                "type": "transcript", "role": "user", "transcript": text,
                "transcriptType": if *is_final { "final" } else { "partial" },
            }),
        ),
        VapiEvent::AssistantText(text) => (
            "assistant_text",
            serde_json::json!({
                "type": "transcript", "role": "assistant", "transcriptType": "final",
                "transcript": text,
            }),
        ),
        VapiEvent::AssistantStopped => (
            "assistant_stopped",
            serde_json::json!({"type": "speech-update", "role": "assistant", "status": "stopped"}),
        ),
        VapiEvent::UserInterrupted => (
            "user_interrupted",
            serde_json::json!({"type": "user-interrupted"}),
        ),
        VapiEvent::CallEnded(reason) => (
            "call_ended",
            serde_json::json!({"type": "status-update", "status": "ended", "endedReason": reason}),
        ),
        VapiEvent::Other => return Outcome::Accepted("other"),
    };
    for again in [again.clone(), serde_json::json!({ "message": again })] {
        let same = decode_event(&again.to_string())
            .unwrap_or_else(|e| panic!("{again} does not decode: {e}"));
        assert_eq!(same, event, "{again}");
    }
    Outcome::Accepted(kind)
}

/// Seeds: each event, bare and in an envelope, and a few broken ones.
pub(super) fn vapi_seeds() -> Vec<Vec<u8>> {
    super::targets::bytes_of(&[
        r#"{"type":"transcript","role":"user","transcriptType":"partial","transcript":"hel"}"#,
        r#"{"message":{"type":"transcript[transcriptType=\"final\"]","role":"user","transcript":"hello"}}"#,
        r#"{"type":"transcript","role":"assistant","transcriptType":"final","transcript":"Hi, how can I help?"}"#,
        r#"{"type":"speech-update","role":"assistant","status":"stopped","turn":1}"#,
        r#"{"type":"speech-update","role":"assistant","status":"started"}"#,
        r#"{"type":"user-interrupted"}"#,
        r#"{"type":"status-update","status":"ended","endedReason":"customer-ended-call"}"#,
        r#"{"message":{"type":"conversation-update","messages":[{"role":"user","message":"hi"}]}}"#,
        r#"{"type":"transcript","role":"user","transcriptType":"sideways","transcript":"x"}"#,
        r#"{"type":"transcript","role":"user"}"#,
        r#"{"type":7}"#,
        "[1,2]",
        "hang",
    ])
}

/// Tokens of Vapi's client messages.
#[rustfmt::skip]
pub(super) const VAPI_TOKENS: &[&str] = &[
    "\"type\"", "\"message\"", "\"transcript\"", "\"transcript[transcriptType=\\\"final\\\"]\"",
    "\"role\"", "\"user\"", "\"assistant\"", "\"transcriptType\"", "\"final\"", "\"partial\"",
    "\"speech-update\"", "\"status\"", "\"stopped\"", "\"user-interrupted\"", "\"status-update\"",
    "\"ended\"", "\"endedReason\"",
];
