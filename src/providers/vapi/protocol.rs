//! Vapi's WebSocket transport on the link kit: binary messages are the
//! call's raw audio both ways, in the format the call was created with;
//! text messages are JSON.
//!
//! From Vapi (its client messages, bare or in a `{"message": {...}}`
//! envelope):
//!
//! | `type` | becomes |
//! |---|---|
//! | `transcript` (also `transcript[transcriptType="final"]`), `role` `user` | the user's transcript, partial or final (`transcriptType`) |
//! | `transcript`, `role` `assistant`, final | the assistant's text |
//! | `speech-update`, `role` `assistant`, `status` `stopped` | the end of what the assistant was saying |
//! | `user-interrupted` | the user cut the assistant short |
//! | `status-update`, `status` `ended` | the call ended (`endedReason`): the link closes without reconnecting |
//! | anything else (`conversation-update`, `hang`, `model-output`, `speech-update` started, ...) | nothing |
//!
//! To Vapi: the user's audio, `{"type":"say","content":...}` to speak an
//! agent's reply when the assistant's own model runs the call, and
//! `{"type":"end-call"}` when the session ends.

use serde_json::{Value, json};

use crate::audio::{AudioFormat, AudioFrame};
use crate::runtime::{WireEvent, WireProtocol, WsMessage};

/// One session's side of the transport socket.
#[derive(Debug)]
pub struct VapiProtocol {
    format: AudioFormat,
}

impl VapiProtocol {
    /// The protocol of a call whose audio is in `format`.
    pub fn new(format: AudioFormat) -> Self {
        VapiProtocol { format }
    }
}

/// What one JSON message from Vapi means.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VapiEvent {
    /// The user's words.
    UserTranscript {
        /// The text.
        text: String,
        /// Whether the transcriber is done with it.
        is_final: bool,
    },
    /// The assistant's words, final.
    AssistantText(String),
    /// The assistant stopped speaking.
    AssistantStopped,
    /// The user interrupted the assistant.
    UserInterrupted,
    /// The call ended, with Vapi's `endedReason` when it gave one.
    CallEnded(Option<String>),
    /// A message of no consequence to the session.
    Other,
}

/// Decodes one text message from Vapi.
///
/// # Errors
///
/// What is wrong with it: not JSON, not an object, no `type`, or a
/// transcript without its fields. The message's text is not repeated.
pub fn decode_event(text: &str) -> Result<VapiEvent, String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("a text message that is not JSON ({e})"))?;
    let Value::Object(mut object) = value else {
        return Err("a JSON message that is not an object".into());
    };
    // Client messages may come in an envelope, as on Vapi's server URL.
    if !object.contains_key("type")
        && let Some(Value::Object(inner)) = object.remove("message")
    {
        object = inner;
    }
    let kind = object
        .get("type")
        .and_then(Value::as_str)
        .ok_or("a JSON message without a string `type`")?;
    let str_field = |name: &str| object.get(name).and_then(Value::as_str);
    Ok(match kind {
        k if k == "transcript" || k.starts_with("transcript[") => {
            let role = str_field("role").ok_or("a transcript without a `role`")?;
            let text = str_field("transcript").ok_or("a transcript without its `transcript`")?;
            let is_final = match str_field("transcriptType") {
                Some("final") => true,
                Some("partial") => false,
                // The type names a final transcript when the field is left out.
                None if k.contains("final") => true,
                Some(other) => {
                    return Err(format!("a transcript of unknown transcriptType {other:?}"));
                }
                None => return Err("a transcript without a `transcriptType`".into()),
            };
            match role {
                "user" => VapiEvent::UserTranscript {
                    text: text.to_owned(),
                    is_final,
                },
                "assistant" if is_final => VapiEvent::AssistantText(text.to_owned()),
                _ => VapiEvent::Other,
            }
        }
        "speech-update" => match (str_field("role"), str_field("status")) {
            (Some("assistant"), Some("stopped")) => VapiEvent::AssistantStopped,
            _ => VapiEvent::Other,
        },
        "user-interrupted" => VapiEvent::UserInterrupted,
        "status-update" if str_field("status") == Some("ended") => {
            VapiEvent::CallEnded(str_field("endedReason").map(str::to_owned))
        }
        _ => VapiEvent::Other,
    })
}

/// `{"type":"say","content":text}`: the assistant says `text`.
pub fn say(text: &str) -> String {
    json!({ "type": "say", "content": text, "endCallAfterSpoken": false }).to_string()
}

/// `{"type":"end-call"}`: ends the call.
pub fn end_call() -> String {
    json!({ "type": "end-call" }).to_string()
}

impl WireProtocol for VapiProtocol {
    fn service(&self) -> &'static str {
        "Vapi"
    }

    fn input_format(&self) -> AudioFormat {
        self.format
    }

    fn encode_audio(&mut self, frame: AudioFrame) -> WsMessage {
        WsMessage::Binary(frame.into_data())
    }

    fn encode_reply(&mut self, text: &str) -> Vec<WsMessage> {
        vec![WsMessage::Text(say(text).into())]
    }

    fn farewell(&mut self) -> Vec<WsMessage> {
        vec![WsMessage::Text(end_call().into())]
    }

    fn decode(
        &mut self,
        message: WsMessage,
        out: &mut Vec<WireEvent>,
    ) -> std::result::Result<(), String> {
        match message {
            WsMessage::Binary(bytes) => {
                if bytes.is_empty() {
                    return Ok(());
                }
                let frame = AudioFrame::new(self.format, bytes)
                    .map_err(|e| format!("audio that is not whole samples: {}", e.message))?;
                out.push(WireEvent::Audio(frame));
            }
            WsMessage::Text(text) => match decode_event(&text)? {
                VapiEvent::UserTranscript { text, is_final } => {
                    out.push(WireEvent::UserTranscript { text, is_final });
                }
                VapiEvent::AssistantText(text) => out.push(WireEvent::ServiceText(text)),
                VapiEvent::AssistantStopped => out.push(WireEvent::SpeakingStopped),
                VapiEvent::UserInterrupted => out.push(WireEvent::Interrupted),
                VapiEvent::CallEnded(reason) => out.push(WireEvent::Ended(match reason {
                    Some(r) => format!("the call ended ({r})"),
                    None => "the call ended".into(),
                })),
                VapiEvent::Other => {}
            },
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::AudioEncoding;

    #[test]
    fn client_messages_decode_bare_or_in_an_envelope() {
        let partial =
            r#"{"type":"transcript","role":"user","transcriptType":"partial","transcript":"hel"}"#;
        assert_eq!(
            decode_event(partial).unwrap(),
            VapiEvent::UserTranscript {
                text: "hel".into(),
                is_final: false
            }
        );
        let wrapped = r#"{"message":{"type":"transcript[transcriptType=\"final\"]","role":"user","transcript":"hello"}}"#;
        assert_eq!(
            decode_event(wrapped).unwrap(),
            VapiEvent::UserTranscript {
                text: "hello".into(),
                is_final: true
            }
        );
        let said = r#"{"type":"transcript","role":"assistant","transcriptType":"final","transcript":"Hi!"}"#;
        assert_eq!(
            decode_event(said).unwrap(),
            VapiEvent::AssistantText("Hi!".into())
        );
        let stopped = r#"{"type":"speech-update","status":"stopped","role":"assistant","turn":2}"#;
        assert_eq!(decode_event(stopped).unwrap(), VapiEvent::AssistantStopped);
        let ended =
            r#"{"type":"status-update","status":"ended","endedReason":"customer-ended-call"}"#;
        assert_eq!(
            decode_event(ended).unwrap(),
            VapiEvent::CallEnded(Some("customer-ended-call".into()))
        );
        for quiet in [
            r#"{"type":"hang"}"#,
            r#"{"type":"conversation-update","messages":[]}"#,
            r#"{"type":"status-update","status":"in-progress"}"#,
            r#"{"type":"speech-update","status":"started","role":"user"}"#,
        ] {
            assert_eq!(decode_event(quiet).unwrap(), VapiEvent::Other, "{quiet}");
        }
    }

    #[test]
    fn broken_messages_say_what_is_wrong() {
        assert!(decode_event("{").unwrap_err().contains("not JSON"));
        assert!(decode_event("[1]").unwrap_err().contains("not an object"));
        assert!(
            decode_event(r#"{"role":"user"}"#)
                .unwrap_err()
                .contains("type")
        );
        assert!(
            decode_event(r#"{"type":"transcript","role":"user","transcriptType":"final"}"#)
                .unwrap_err()
                .contains("transcript")
        );
        let mut p = VapiProtocol::new(AudioFormat::new(AudioEncoding::PcmS16Le, 16_000, 1));
        let mut out = Vec::new();
        assert!(
            p.decode(WsMessage::Binary(vec![1, 2, 3].into()), &mut out)
                .is_err()
        );
        p.decode(WsMessage::Binary(vec![1, 2, 3, 4].into()), &mut out)
            .unwrap();
        assert!(matches!(out[..], [WireEvent::Audio(_)]));
    }
}
