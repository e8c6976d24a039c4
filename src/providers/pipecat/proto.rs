//! Pipecat's wire format: one protobuf `pipecat.Frame` per WebSocket message
//! (package `pipecat`, `frames.proto` of Pipecat 1.x), written as prost types.
//!
//! | field | message | carries |
//! |---|---|---|
//! | `text` = 1 | `TextFrame { id, name, text }` | text for the bot's TTS |
//! | `audio` = 2 | `AudioRawFrame { id, name, audio, sample_rate, num_channels, pts? }` | PCM16 audio |
//! | `transcription` = 3 | `TranscriptionFrame { id, name, text, user_id, timestamp }` | a transcript |
//! | `message` = 4 | `MessageFrame { data }` | a JSON string (RTVI messages) |
//! | `interruption` = 5 | `InterruptionFrame { id, name }` | the bot was interrupted (newer bots only) |

use bytes::Bytes;
use prost::Message as _;

use crate::audio::{AudioEncoding, AudioFormat, AudioFrame};
use crate::error::{BackendError, ErrorCode, Result};

/// `pipecat.TextFrame`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TextFrame {
    /// Frame id (0 from clients).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Frame name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// The text.
    #[prost(string, tag = "3")]
    pub text: String,
}

/// `pipecat.AudioRawFrame`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AudioRawFrame {
    /// Frame id (0 from clients).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Frame name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// PCM s16le samples, interleaved.
    #[prost(bytes = "bytes", tag = "3")]
    pub audio: Bytes,
    /// Samples per second.
    #[prost(uint32, tag = "4")]
    pub sample_rate: u32,
    /// Channels.
    #[prost(uint32, tag = "5")]
    pub num_channels: u32,
    /// Presentation timestamp, nanoseconds.
    #[prost(uint64, optional, tag = "6")]
    pub pts: Option<u64>,
}

/// `pipecat.TranscriptionFrame`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TranscriptionFrame {
    /// Frame id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Frame name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// What was heard.
    #[prost(string, tag = "3")]
    pub text: String,
    /// Whose speech.
    #[prost(string, tag = "4")]
    pub user_id: String,
    /// When (ISO 8601).
    #[prost(string, tag = "5")]
    pub timestamp: String,
}

/// `pipecat.MessageFrame`: a JSON document as a string.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MessageFrame {
    /// The JSON text.
    #[prost(string, tag = "1")]
    pub data: String,
}

/// `pipecat.InterruptionFrame`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InterruptionFrame {
    /// Frame id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Frame name.
    #[prost(string, tag = "2")]
    pub name: String,
}

/// `pipecat.Frame`: exactly one of the frames above.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Frame {
    /// Which frame this is.
    #[prost(oneof = "Kind", tags = "1, 2, 3, 4, 5")]
    pub frame: Option<Kind>,
}

/// The `frame` oneof of [`Frame`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    /// Text for the bot's TTS.
    #[prost(message, tag = "1")]
    Text(TextFrame),
    /// Audio.
    #[prost(message, tag = "2")]
    Audio(AudioRawFrame),
    /// A transcript.
    #[prost(message, tag = "3")]
    Transcription(TranscriptionFrame),
    /// A JSON message (RTVI).
    #[prost(message, tag = "4")]
    Message(MessageFrame),
    /// The bot was interrupted.
    #[prost(message, tag = "5")]
    Interruption(InterruptionFrame),
}

/// Encodes user audio (PCM s16le) as a `pipecat.Frame` with id 0.
pub fn encode_audio(pcm: Bytes, sample_rate: u32, channels: u16) -> Vec<u8> {
    Frame {
        frame: Some(Kind::Audio(AudioRawFrame {
            audio: pcm,
            sample_rate,
            num_channels: u32::from(channels),
            ..AudioRawFrame::default()
        })),
    }
    .encode_to_vec()
}

/// Encodes text for the bot's TTS as a `pipecat.Frame` with id 0.
pub fn encode_text(text: &str) -> Vec<u8> {
    Frame {
        frame: Some(Kind::Text(TextFrame {
            text: text.to_owned(),
            ..TextFrame::default()
        })),
    }
    .encode_to_vec()
}

/// Encodes a JSON message (RTVI) as a `pipecat.Frame`.
pub fn encode_message(json: String) -> Vec<u8> {
    Frame {
        frame: Some(Kind::Message(MessageFrame { data: json })),
    }
    .encode_to_vec()
}

/// A frame from the bot, checked.
#[derive(Clone, Debug, PartialEq)]
pub enum Inbound {
    /// Reply audio, as a frame of its own format.
    Audio(AudioFrame),
    /// Text the bot sent as a text frame.
    Text(String),
    /// A transcript frame.
    Transcription {
        /// What was heard.
        text: String,
        /// Whose speech.
        user_id: String,
    },
    /// A JSON message (usually RTVI), still as text.
    Message(String),
    /// The bot was interrupted.
    Interruption,
}

fn malformed(message: String) -> BackendError {
    BackendError::new("pipecat.decode", ErrorCode::PipelineError, message)
}

/// Decodes one WebSocket message from the bot.
///
/// # Errors
///
/// `PipelineError` naming the problem: bytes that are not a `pipecat.Frame`,
/// an empty frame (no field of the oneof set, e.g. a type newer than this
/// decoder), or audio whose format or length does not hold up (zero or
/// absurd sample rate or channel count, a byte count that is not a whole
/// number of samples).
pub fn decode(bytes: Bytes) -> Result<Inbound> {
    let len = bytes.len();
    let frame = Frame::decode(bytes)
        .map_err(|e| malformed(format!("a {len}-byte message is not a pipecat.Frame: {e}")))?;
    match frame.frame {
        None => Err(malformed(format!(
            "a {len}-byte pipecat.Frame carries no frame this client knows"
        ))),
        Some(Kind::Audio(a)) => {
            let channels = u16::try_from(a.num_channels)
                .ok()
                .filter(|c| (1..=8).contains(c))
                .ok_or_else(|| {
                    malformed(format!(
                        "audio frame with {} channels (expected 1 to 8)",
                        a.num_channels
                    ))
                })?;
            if !(8_000..=192_000).contains(&a.sample_rate) {
                return Err(malformed(format!(
                    "audio frame at {} Hz (expected 8000 to 192000)",
                    a.sample_rate
                )));
            }
            let format = AudioFormat::new(AudioEncoding::PcmS16Le, a.sample_rate, channels);
            AudioFrame::new(format, a.audio)
                .map(Inbound::Audio)
                .map_err(|e| malformed(format!("audio frame: {}", e.message)))
        }
        Some(Kind::Text(t)) => Ok(Inbound::Text(t.text)),
        Some(Kind::Transcription(t)) => Ok(Inbound::Transcription {
            text: t.text,
            user_id: t.user_id,
        }),
        Some(Kind::Message(m)) => Ok(Inbound::Message(m.data)),
        Some(Kind::Interruption(_)) => Ok(Inbound::Interruption),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_round_trips_through_the_wire_format() {
        let pcm = Bytes::from(vec![1u8, 0, 2, 0, 3, 0, 4, 0]);
        let wire = encode_audio(pcm.clone(), 16_000, 1);
        let Inbound::Audio(frame) = decode(Bytes::from(wire)).unwrap() else {
            panic!("not audio")
        };
        assert_eq!(frame.format(), AudioFormat::PCM16_16K_MONO);
        assert_eq!(frame.data(), &pcm);
    }

    #[test]
    fn field_numbers_match_frames_proto() {
        // Frame.text (1) -> TextFrame.text (3) = "hi": 0a 04 1a 02 68 69.
        assert_eq!(encode_text("hi"), [0x0a, 0x04, 0x1a, 0x02, b'h', b'i']);
        // Frame.message (4) -> MessageFrame.data (1) = "{}": 22 04 0a 02 7b 7d.
        assert_eq!(
            encode_message("{}".into()),
            [0x22, 0x04, 0x0a, 0x02, b'{', b'}']
        );
        // Frame.interruption (5), empty: 2a 00.
        assert_eq!(
            decode(Bytes::from_static(&[0x2a, 0x00])).unwrap(),
            Inbound::Interruption
        );
    }

    #[test]
    fn bad_frames_are_errors_naming_the_problem() {
        let e = decode(Bytes::from_static(&[0xff, 0xff, 0xff])).unwrap_err();
        assert!(e.message.contains("not a pipecat.Frame"), "{}", e.message);
        let e = decode(Bytes::new()).unwrap_err();
        assert!(e.message.contains("carries no frame"), "{}", e.message);
        // Odd byte count for 16-bit audio.
        let wire = encode_audio(Bytes::from_static(&[1, 2, 3]), 16_000, 1);
        let e = decode(Bytes::from(wire)).unwrap_err();
        assert!(e.message.starts_with("audio frame"), "{}", e.message);
        let wire = encode_audio(Bytes::from_static(&[1, 2]), 0, 1);
        assert!(
            decode(Bytes::from(wire))
                .unwrap_err()
                .message
                .contains("0 Hz")
        );
    }
}
