//! Vocode's wire protocol (vocode 0.1.113): the conversation WebSocket of a
//! self-hosted server (`vocode.streaming.client_backend.conversation`) and
//! the REST user-implemented agent's call (`RESTfulAgentInput` /
//! `RESTfulAgentOutput`).
//!
//! | client → server | server → client |
//! |---|---|
//! | `websocket_audio_config_start` first | `websocket_ready` once the conversation runs |
//! | `websocket_audio` {data: base64 audio} | `websocket_audio` {data: base64 WAV: a 44-byte header per chunk} |
//! | `websocket_stop` ends the conversation | `websocket_transcript` {text, sender `human`/`bot`, timestamp} |
//!
//! The server's REST agent posts `{"conversation_id", "human_input"}` and
//! takes `{"type":"restful_agent_text","response":"..."}` or
//! `{"type":"restful_agent_end"}`.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::hook::Conversation;
use crate::audio::{AudioEncoding, AudioFormat, AudioFrame};
use crate::runtime::{WireEvent, WireProtocol, WsMessage};

/// How long opening a link waits for `websocket_ready` (the server sends it
/// once its transcriber and agent have started).
const READY_WAIT: Duration = Duration::from_secs(5);

/// An audio encoding of Vocode's `AudioEncoding`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// 16-bit little-endian PCM (`linear16`).
    #[default]
    Linear16,
    /// G.711 mu-law (`mulaw`), 8 kHz only on Vocode's side.
    Mulaw,
}

impl Encoding {
    /// The name on the wire.
    pub fn wire_name(self) -> &'static str {
        match self {
            Encoding::Linear16 => "linear16",
            Encoding::Mulaw => "mulaw",
        }
    }

    /// The crate's encoding.
    pub fn audio_encoding(self) -> AudioEncoding {
        match self {
            Encoding::Linear16 => AudioEncoding::PcmS16Le,
            Encoding::Mulaw => AudioEncoding::Mulaw,
        }
    }
}

/// What a conversation's audio is on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AudioSettings {
    /// The caller's audio: its rate in Hz.
    pub input_sample_rate: u32,
    /// The caller's audio: its encoding.
    pub input_encoding: Encoding,
    /// `chunk_size` of the input audio config, in bytes.
    pub chunk_size: u32,
    /// `downsampling` of the input audio config.
    pub downsampling: Option<u32>,
    /// The server's audio: its rate in Hz (always `linear16`: the server
    /// wraps its chunks in WAV headers, which Vocode writes for linear16
    /// only).
    pub output_sample_rate: u32,
}

impl AudioSettings {
    /// The format the caller's audio is sent in.
    pub fn input_format(&self) -> AudioFormat {
        AudioFormat::new(
            self.input_encoding.audio_encoding(),
            self.input_sample_rate,
            1,
        )
    }

    /// The format of the server's audio when a chunk has no WAV header.
    pub fn output_format(&self) -> AudioFormat {
        AudioFormat::new(AudioEncoding::PcmS16Le, self.output_sample_rate, 1)
    }
}

/// The first message: `websocket_audio_config_start`, asking for the
/// transcript events.
pub fn audio_config_start(audio: &AudioSettings, conversation_id: &str) -> String {
    let mut input = json!({
        "sampling_rate": audio.input_sample_rate,
        "audio_encoding": audio.input_encoding.wire_name(),
        "chunk_size": audio.chunk_size,
    });
    if let Some(d) = audio.downsampling {
        input["downsampling"] = json!(d);
    }
    json!({
        "type": "websocket_audio_config_start",
        "input_audio_config": input,
        "output_audio_config": {
            "sampling_rate": audio.output_sample_rate,
            "audio_encoding": "linear16",
        },
        "conversation_id": conversation_id,
        "subscribe_transcript": true,
    })
    .to_string()
}

/// A `websocket_audio` message carrying `bytes`.
pub fn audio_message(bytes: &[u8]) -> String {
    json!({"type": "websocket_audio", "data": BASE64.encode(bytes)}).to_string()
}

/// `websocket_stop`: the conversation ends.
pub fn stop_message() -> String {
    json!({"type": "websocket_stop"}).to_string()
}

/// Who a transcript is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// The caller.
    Human,
    /// The server's voice.
    Bot,
}

/// One message of the server, decoded.
#[derive(Debug)]
pub enum ServerMessage {
    /// `websocket_ready`.
    Ready,
    /// `websocket_audio`, its WAV header stripped.
    Audio(AudioFrame),
    /// `websocket_transcript`.
    Transcript {
        /// What was said.
        text: String,
        /// By whom.
        sender: Sender,
        /// When, in seconds since the epoch.
        timestamp: f64,
    },
    /// `websocket_stop`.
    Stop,
}

fn field<'a>(v: &'a Value, name: &str, kind: &str) -> Result<&'a Value, String> {
    v.get(name)
        .ok_or_else(|| format!("a {kind} message without {name:?}"))
}

fn string<'a>(v: &'a Value, name: &str, kind: &str) -> Result<&'a str, String> {
    field(v, name, kind)?
        .as_str()
        .ok_or_else(|| format!("{kind}'s {name:?} is not a string"))
}

/// Decodes one text message of the server; audio without a WAV header is
/// taken as `raw_format`. The error says what is wrong, never repeating
/// the message.
///
/// # Errors
///
/// Not JSON, no or an unknown `type`, a missing or mistyped field, audio
/// that is not base64 or not whole samples, a WAV header that is cut short
/// or not PCM.
pub fn parse_server_message(text: &str, raw_format: AudioFormat) -> Result<ServerMessage, String> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| format!("a text message that is not JSON ({e})"))?;
    if !v.is_object() {
        return Err("a JSON message that is not an object".into());
    }
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .ok_or("a message without a string \"type\"")?;
    match kind {
        "websocket_ready" => Ok(ServerMessage::Ready),
        "websocket_stop" => Ok(ServerMessage::Stop),
        "websocket_audio" => {
            let data = string(&v, "data", kind)?;
            let bytes = BASE64
                .decode(data)
                .map_err(|e| format!("websocket_audio's data is not base64 ({e})"))?;
            let wav = wav_payload(&bytes)?;
            let format = wav.format.unwrap_or(raw_format);
            AudioFrame::new(format, bytes[wav.start..wav.end].to_vec())
                .map(ServerMessage::Audio)
                .map_err(|e| format!("websocket_audio's audio: {}", e.message))
        }
        "websocket_transcript" => {
            let text = string(&v, "text", kind)?.to_owned();
            let sender = match string(&v, "sender", kind)? {
                "human" => Sender::Human,
                "bot" => Sender::Bot,
                other => {
                    return Err(format!(
                        "websocket_transcript's sender {:?} is neither human nor bot",
                        truncate(other)
                    ));
                }
            };
            let timestamp = field(&v, "timestamp", kind)?
                .as_f64()
                .ok_or("websocket_transcript's \"timestamp\" is not a number")?;
            Ok(ServerMessage::Transcript {
                text,
                sender,
                timestamp,
            })
        }
        other => Err(format!("an unknown message type {:?}", truncate(other))),
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

/// Where the samples of a chunk are, and their format when it has a WAV
/// header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WavPayload {
    /// The format the header gives; `None` for a chunk without a header.
    pub format: Option<AudioFormat>,
    /// The first byte of the samples.
    pub start: usize,
    /// One past the last byte of the samples.
    pub end: usize,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Finds the samples in one chunk of the server's audio: after the WAV
/// header Vocode puts on each chunk (`RIFF`…`WAVE`, a `fmt ` and a `data`
/// chunk: 44 bytes as Python's `wave` writes it, other chunks skipped), or
/// the whole chunk when it does not start with `RIFF`. A `data` size past
/// the end (a streaming writer's placeholder) is cut to what is there.
///
/// # Errors
///
/// A header cut short, without `fmt ` before `data`, or whose format is not
/// 16-bit PCM or 8-bit mu-law.
pub fn wav_payload(bytes: &[u8]) -> Result<WavPayload, String> {
    if !bytes.starts_with(b"RIFF") {
        return Ok(WavPayload {
            format: None,
            start: 0,
            end: bytes.len(),
        });
    }
    if bytes.len() < 12 || &bytes[8..12] != b"WAVE" {
        return Err("audio with a RIFF header that is not WAVE".into());
    }
    let mut at = 12usize;
    let mut format = None;
    loop {
        if bytes.len() < at + 8 {
            return Err("a WAV header without a data chunk".into());
        }
        let id = &bytes[at..at + 4];
        let size = u32_at(bytes, at + 4) as usize;
        let body = at + 8;
        if id == b"data" {
            let Some(format) = format else {
                return Err("a WAV data chunk before its fmt chunk".into());
            };
            let end = body.saturating_add(size).min(bytes.len());
            return Ok(WavPayload {
                format: Some(format),
                start: body,
                end,
            });
        }
        if id == b"fmt " {
            if size < 16 || bytes.len() < body + 16 {
                return Err("a WAV fmt chunk cut short".into());
            }
            let tag = u16_at(bytes, body);
            let channels = u16_at(bytes, body + 2);
            let rate = u32_at(bytes, body + 4);
            let bits = u16_at(bytes, body + 14);
            let encoding = match (tag, bits) {
                (1, 16) => AudioEncoding::PcmS16Le,
                (7, 8) => AudioEncoding::Mulaw,
                _ => {
                    return Err(format!(
                        "WAV audio of format {tag} with {bits} bits (expected 16-bit PCM)"
                    ));
                }
            };
            if channels == 0 || rate == 0 {
                return Err(format!("WAV audio of {channels} channel(s) at {rate} Hz"));
            }
            format = Some(AudioFormat::new(encoding, rate, channels));
        }
        // Chunks are padded to an even size.
        at = body
            .checked_add(size + (size & 1))
            .ok_or("a WAV chunk size past the end")?;
    }
}

/// A call of the server's REST agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentCall {
    /// The conversation the call is for (ours: the session's).
    pub conversation_id: String,
    /// What the caller said.
    pub human_input: String,
}

/// Reads a call of the server's REST agent (`RESTfulAgentInput`).
///
/// # Errors
///
/// A body that is not an object with string `conversation_id` and
/// `human_input`.
pub fn parse_agent_call(body: &Value) -> Result<AgentCall, String> {
    if !body.is_object() {
        return Err("the agent call's body is not a JSON object".into());
    }
    let get = |name: &str| {
        body.get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("the agent call has no string {name:?}"))
    };
    Ok(AgentCall {
        conversation_id: get("conversation_id")?,
        human_input: get("human_input")?,
    })
}

/// The agent's answer: `RESTfulAgentText`.
pub fn agent_text(response: &str) -> Value {
    json!({"type": "restful_agent_text", "response": response})
}

/// The end of the conversation: `RESTfulAgentEnd`.
pub fn agent_end() -> Value {
    json!({"type": "restful_agent_end"})
}

/// Who answers the caller on the server's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Answers {
    /// The application's agent, through the agent hook: the caller's turns
    /// arrive as agent calls, not from the socket's human transcripts.
    Application,
    /// The server's own agent: the socket's human transcripts are the turns.
    Server,
}

/// One session's side of the conversation socket.
pub(super) struct VocodeProtocol {
    pub(super) audio: AudioSettings,
    pub(super) conversation_id: String,
    pub(super) answers: Answers,
    /// The session's conversation on the agent hook (application mode).
    pub(super) conversation: Option<std::sync::Arc<Conversation>>,
}

impl WireProtocol for VocodeProtocol {
    fn service(&self) -> &'static str {
        "the Vocode server"
    }

    fn input_format(&self) -> AudioFormat {
        self.audio.input_format()
    }

    fn greeting(&mut self, _session_id: &str) -> Vec<WsMessage> {
        vec![WsMessage::Text(
            audio_config_start(&self.audio, &self.conversation_id).into(),
        )]
    }

    fn ready_wait(&self) -> Option<Duration> {
        Some(READY_WAIT)
    }

    fn encode_audio(&mut self, frame: AudioFrame) -> WsMessage {
        WsMessage::Text(audio_message(frame.data()).into())
    }

    /// The reply goes to the agent call waiting for it, not over the socket.
    fn encode_reply(&mut self, text: &str) -> Vec<WsMessage> {
        if let Some(conversation) = &self.conversation
            && !conversation.answer(text)
        {
            tracing::warn!("the Vocode server asked for no answer; the reply is not spoken");
        }
        Vec::new()
    }

    /// `websocket_stop`: the server ends the conversation (without it,
    /// Vocode's router leaves the conversation's workers running).
    fn farewell(&mut self) -> Vec<WsMessage> {
        vec![WsMessage::Text(stop_message().into())]
    }

    fn decode(
        &mut self,
        message: WsMessage,
        out: &mut Vec<WireEvent>,
    ) -> std::result::Result<(), String> {
        let text = match message {
            WsMessage::Text(t) => t,
            WsMessage::Binary(b) => {
                return Err(format!(
                    "a {}-byte binary message (the server sends JSON text)",
                    b.len()
                ));
            }
            _ => return Ok(()),
        };
        match parse_server_message(&text, self.audio.output_format())? {
            ServerMessage::Ready => out.push(WireEvent::Ready),
            ServerMessage::Audio(frame) => {
                if !frame.is_empty() {
                    out.push(WireEvent::Audio(frame));
                }
            }
            ServerMessage::Transcript {
                text,
                sender: Sender::Human,
                ..
            } => {
                // With the application answering, the agent call carries
                // the same text, and is the turn.
                if self.answers == Answers::Server && !text.trim().is_empty() {
                    out.push(WireEvent::UserTranscript {
                        text,
                        is_final: true,
                    });
                }
            }
            ServerMessage::Transcript {
                text,
                sender: Sender::Bot,
                ..
            } => {
                // Sent once the server has spoken the whole utterance.
                if !text.trim().is_empty() {
                    out.push(WireEvent::ServiceText(text));
                }
                out.push(WireEvent::SpeakingStopped);
            }
            ServerMessage::Stop => {
                out.push(WireEvent::Error("the server sent websocket_stop".into()))
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(rate: u32, samples: &[i16]) -> Vec<u8> {
        let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut b = Vec::new();
        b.extend_from_slice(b"RIFF");
        b.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
        b.extend_from_slice(b"WAVEfmt ");
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&rate.to_le_bytes());
        b.extend_from_slice(&(rate * 2).to_le_bytes());
        b.extend_from_slice(&2u16.to_le_bytes());
        b.extend_from_slice(&16u16.to_le_bytes());
        b.extend_from_slice(b"data");
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(&data);
        b
    }

    #[test]
    fn the_wav_header_is_stripped_and_gives_the_format() {
        let chunk = wav(24_000, &[1, -2, 3]);
        let p = wav_payload(&chunk).unwrap();
        assert_eq!((p.start, p.end), (44, 50));
        assert_eq!(
            p.format,
            Some(AudioFormat::new(AudioEncoding::PcmS16Le, 24_000, 1))
        );
        let raw = [1u8, 2, 3, 4];
        assert_eq!(
            wav_payload(&raw).unwrap(),
            WavPayload {
                format: None,
                start: 0,
                end: 4
            }
        );
        assert!(wav_payload(&chunk[..30]).is_err());
    }
}
