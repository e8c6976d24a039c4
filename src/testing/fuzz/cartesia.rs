//! The `cartesia_message` target: what Cartesia's two sockets send
//! (`providers::cartesia::protocol::{decode_tts, decode_stt}`).

use super::targets::{Outcome, utf8};
use crate::providers::cartesia::protocol::{self, SttMessage, TtsEvent};

/// One text message of either Cartesia socket, decoded as both. A refusal
/// says why; a text-to-speech event decodes the same once written back as
/// Cartesia writes it, and a speech-to-text transcript keeps its text.
pub fn cartesia_message(data: &[u8]) -> Outcome {
    use base64::Engine as _;
    let text = match utf8(data) {
        Ok(text) => text,
        Err(outcome) => return outcome,
    };
    let stt = protocol::decode_stt(text);
    if let Err(why) = &stt {
        assert!(!why.trim().is_empty(), "an empty refusal of {text:?}");
    }
    if let Ok(SttMessage::Transcript {
        text: said,
        is_final,
    }) = &stt
    {
        let again = serde_json::json!({"type": "transcript", "text": said, "is_final": is_final});
        assert_eq!(
            protocol::decode_stt(&again.to_string()).as_ref(),
            Ok(stt.as_ref().expect("decoded")),
        );
    }
    let event = match protocol::decode_tts(text) {
        Ok(event) => event,
        Err(why) => {
            assert!(!why.trim().is_empty(), "an empty refusal of {text:?}");
            return Outcome::Rejected(why);
        }
    };
    let (kind, again) = match &event {
        TtsEvent::Chunk {
            context_id,
            audio,
            done,
        } => (
            "chunk",
            serde_json::json!({
                "type": "chunk", "context_id": context_id, "done": done,
                "data": base64::engine::general_purpose::STANDARD.encode(audio),
            }),
        ),
        TtsEvent::FlushDone {
            context_id,
            flush_id,
        } => (
            "flush_done",
            serde_json::json!({"type": "flush_done", "context_id": context_id, "flush_id": flush_id}),
        ),
        TtsEvent::Done { context_id } => (
            "done",
            serde_json::json!({"type": "done", "context_id": context_id}),
        ),
        TtsEvent::Timestamps { context_id } => (
            "timestamps",
            serde_json::json!({"type": "timestamps", "context_id": context_id}),
        ),
        TtsEvent::Error(e) => (
            "error",
            serde_json::json!({
                "type": "error", "context_id": e.context_id, "status_code": e.status_code,
                "error_code": e.error_code, "title": e.title, "message": e.message,
            }),
        ),
    };
    let same = protocol::decode_tts(&again.to_string())
        .unwrap_or_else(|e| panic!("{again} does not decode: {e}"));
    assert_eq!(same, event, "{again}");
    Outcome::Accepted(kind)
}

/// Seeds: one of each message of both sockets, and a few broken ones.
pub(super) fn cartesia_seeds() -> Vec<Vec<u8>> {
    [
        r#"{"type":"chunk","data":"AAEC/w==","done":false,"status_code":206,"step_time":1.5,"context_id":"sess_1-1","flush_id":1}"#,
        r#"{"type":"flush_done","done":false,"flush_done":true,"flush_id":1,"status_code":206,"context_id":"c"}"#,
        r#"{"type":"done","done":true,"status_code":206,"context_id":"c"}"#,
        r#"{"type":"timestamps","done":false,"status_code":206,"context_id":"c","word_timestamps":{"words":["Hi"],"start":[0],"end":[0.4]}}"#,
        r#"{"type":"error","done":true,"status_code":429,"title":"Too many","message":"slow down","error_code":"x","context_id":"c"}"#,
        r#"{"type":"transcript","is_final":true,"text":"Hello ","request_id":"r","duration":0.5}"#,
        r#"{"type":"flush_done","request_id":"r"}"#,
        r#"{"type":"done","request_id":"r"}"#,
        r#"{"type":"chunk","data":"!!","context_id":"c"}"#,
        r#"{"type":"mystery"}"#,
        "finalize",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Tokens of the two sockets' JSON.
#[rustfmt::skip]
pub(super) const CARTESIA_TOKENS: &[&str] = &[
    "\"type\"", "\"chunk\"", "\"flush_done\"", "\"done\"", "\"error\"", "\"transcript\"",
    "\"timestamps\"", "\"context_id\"", "\"data\"", "\"is_final\"", "\"text\"", "\"status_code\"",
    "\"flush_id\"", "429", "true", "null", "\"AA==\"",
];
