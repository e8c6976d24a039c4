//! Pipecat's wire protocol on the link kit: protobuf frames ([`proto`]) both
//! ways, RTVI messages ([`rtvi`]) inside them, `client-ready` as the greeting
//! and `bot-ready` as the sign the bot is ready.

use std::time::Duration;

use super::proto::{self, Inbound};
use super::rtvi::{self, RtviEvent};
use crate::audio::{AudioEncoding, AudioFormat, AudioFrame};
use crate::runtime::{WireEvent, WireProtocol, WsMessage};

/// How long opening a link waits for RTVI `bot-ready` after `client-ready`
/// (a bot without RTVI never sends it: the link opens anyway after this).
const BOT_READY_WAIT: Duration = Duration::from_secs(1);

/// One session's side of the protocol.
#[derive(Debug)]
pub(super) struct PipecatProtocol {
    /// The bot's input sample rate.
    pub(super) input_sample_rate: u32,
    /// Whether to send RTVI `client-ready` and wait for `bot-ready`.
    pub(super) client_ready: bool,
}

impl WireProtocol for PipecatProtocol {
    fn service(&self) -> &'static str {
        "the Pipecat bot"
    }

    fn input_format(&self) -> AudioFormat {
        AudioFormat::new(AudioEncoding::PcmS16Le, self.input_sample_rate, 1)
    }

    fn greeting(&mut self, session_id: &str) -> Vec<WsMessage> {
        if !self.client_ready {
            return Vec::new();
        }
        let ready = rtvi::client_ready(&format!("{session_id}-ready"));
        vec![WsMessage::Binary(proto::encode_message(ready).into())]
    }

    fn ready_wait(&self) -> Option<Duration> {
        self.client_ready.then_some(BOT_READY_WAIT)
    }

    fn encode_audio(&mut self, frame: AudioFrame) -> WsMessage {
        let (rate, channels) = (frame.format().sample_rate, frame.format().channels);
        WsMessage::Binary(proto::encode_audio(frame.into_data(), rate, channels).into())
    }

    fn encode_reply(&mut self, text: &str) -> Vec<WsMessage> {
        vec![WsMessage::Binary(proto::encode_text(text).into())]
    }

    fn decode(
        &mut self,
        message: WsMessage,
        out: &mut Vec<WireEvent>,
    ) -> std::result::Result<(), String> {
        let bytes = match message {
            WsMessage::Binary(b) => b,
            WsMessage::Text(t) => {
                return Err(format!(
                    "a {}-byte text message (the protobuf serializer sends binary)",
                    t.len()
                ));
            }
            _ => return Ok(()),
        };
        match proto::decode(bytes).map_err(|e| e.message.clone())? {
            Inbound::Audio(frame) => out.push(WireEvent::Audio(frame)),
            Inbound::Message(json) => {
                if let Some(event) = rtvi::parse(&json).map_err(|e| e.message.clone())? {
                    rtvi_event(event, out);
                }
            }
            Inbound::Transcription { text, .. } => out.push(WireEvent::UserTranscript {
                text,
                is_final: true,
            }),
            Inbound::Text(text) => out.push(WireEvent::ServiceText(text)),
            Inbound::Interruption => out.push(WireEvent::Interrupted),
        }
        Ok(())
    }

    fn close_cause(&self, code: u16, reason: &str) -> Option<String> {
        (code == 1013).then(|| {
            let reason = if reason.is_empty() {
                String::new()
            } else {
                format!(": {reason}")
            };
            format!(
                "the bot is busy with another client (close code 1013{reason}); a single-client \
                 bot serves one session at a time: use a multi-client transport and url_template"
            )
        })
    }
}

fn rtvi_event(event: RtviEvent, out: &mut Vec<WireEvent>) {
    out.push(match event {
        RtviEvent::BotReady => WireEvent::Ready,
        RtviEvent::UserTranscription { text, is_final } => {
            WireEvent::UserTranscript { text, is_final }
        }
        RtviEvent::BotText(text) => WireEvent::ServiceText(text),
        RtviEvent::BotStoppedSpeaking => WireEvent::SpeakingStopped,
        RtviEvent::BotInterrupted => WireEvent::Interrupted,
        RtviEvent::Error(message) => WireEvent::Error(message),
        RtviEvent::BotStartedSpeaking
        | RtviEvent::UserStartedSpeaking
        | RtviEvent::UserStoppedSpeaking
        | RtviEvent::Other(_) => return,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(message: WsMessage) -> std::result::Result<Vec<WireEvent>, String> {
        let mut protocol = PipecatProtocol {
            input_sample_rate: 16_000,
            client_ready: true,
        };
        let mut out = Vec::new();
        protocol.decode(message, &mut out).map(|()| out)
    }

    #[test]
    fn rtvi_inside_frames_becomes_wire_events() {
        let ready = r#"{"label":"rtvi-ai","type":"bot-ready","data":{}}"#;
        let events = decoded(WsMessage::Binary(
            proto::encode_message(ready.into()).into(),
        ))
        .unwrap();
        assert!(matches!(events[..], [WireEvent::Ready]));
        let stopped = r#"{"label":"rtvi-ai","type":"bot-stopped-speaking"}"#;
        let events = decoded(WsMessage::Binary(
            proto::encode_message(stopped.into()).into(),
        ))
        .unwrap();
        assert!(matches!(events[..], [WireEvent::SpeakingStopped]));
    }

    #[test]
    fn text_messages_and_broken_frames_are_malformed() {
        let e = decoded(WsMessage::Text("{}".into())).unwrap_err();
        assert!(e.contains("2-byte text message"), "{e}");
        assert!(decoded(WsMessage::Binary(vec![0xff, 0xff, 0xff].into())).is_err());
    }

    #[test]
    fn only_1013_gets_a_cause_of_its_own() {
        let p = PipecatProtocol {
            input_sample_rate: 16_000,
            client_ready: false,
        };
        assert!(p.close_cause(1013, "").unwrap().contains("single-client"));
        assert_eq!(p.close_cause(1000, "bye"), None);
        assert!(
            p.ready_wait().is_none(),
            "no bot-ready without client-ready"
        );
    }
}
