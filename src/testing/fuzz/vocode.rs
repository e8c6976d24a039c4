//! The `vocode_message` target: what a Vocode server sends on the
//! conversation socket (`providers::vocode::protocol::parse_server_message`,
//! its audio through `wav_payload`).

use super::targets::{Outcome, utf8};
use crate::audio::{AudioEncoding, AudioFormat};
use crate::providers::vocode::protocol::{
    Sender, ServerMessage, audio_message, parse_server_message, wav_payload,
};

/// The format of audio without a WAV header.
const RAW: AudioFormat = AudioFormat {
    encoding: AudioEncoding::PcmS16Le,
    sample_rate: 16_000,
    channels: 1,
};

/// One text message of the conversation socket (and the input's bytes as
/// one audio chunk, whose samples, when found, lie within it). A refusal
/// says why; a message decodes the same once written back: audio with a
/// WAV header as Python's `wave` writes it, and without one when it is in
/// the raw format.
pub fn vocode_message(data: &[u8]) -> Outcome {
    if let Ok(wav) = wav_payload(data) {
        assert!(wav.start <= wav.end && wav.end <= data.len(), "{wav:?}");
    }
    let text = match utf8(data) {
        Ok(text) => text,
        Err(outcome) => return outcome,
    };
    let message = match parse_server_message(text, RAW) {
        Ok(message) => message,
        Err(why) => {
            assert!(!why.trim().is_empty(), "an empty refusal of {text:?}");
            return Outcome::Rejected(why);
        }
    };
    match &message {
        ServerMessage::Ready => {
            same_kind(r#"{"type":"websocket_ready"}"#, "ready");
            Outcome::Accepted("ready")
        }
        ServerMessage::Stop => {
            same_kind(r#"{"type":"websocket_stop"}"#, "stop");
            Outcome::Accepted("stop")
        }
        ServerMessage::Audio(frame) => {
            let (format, samples) = (frame.format(), frame.data().as_ref());
            let mut again = vec![audio_message(&wav(format, samples))];
            if format == RAW && !samples.starts_with(b"RIFF") {
                again.push(audio_message(samples));
            }
            for again in again {
                match parse_server_message(&again, RAW) {
                    Ok(ServerMessage::Audio(same)) => {
                        assert_eq!(same.format(), format, "{again}");
                        assert_eq!(same.data().as_ref(), samples, "{again}");
                    }
                    other => panic!("{again} decodes as {other:?}"),
                }
            }
            Outcome::Accepted(if frame.is_empty() {
                "empty_audio"
            } else {
                "audio"
            })
        }
        ServerMessage::Transcript {
            text,
            sender,
            timestamp,
        } => {
            let again = serde_json::json!({
                "type": "websocket_transcript", "text": text, "timestamp": timestamp,
                "sender": match sender { Sender::Human => "human", Sender::Bot => "bot" },
            })
            .to_string();
            match parse_server_message(&again, RAW) {
                Ok(ServerMessage::Transcript {
                    text: t,
                    sender: s,
                    timestamp: at,
                }) => assert_eq!((&t, s, at.to_bits()), (text, *sender, timestamp.to_bits())),
                other => panic!("{again} decodes as {other:?}"),
            }
            Outcome::Accepted("transcript")
        }
    }
}

fn same_kind(again: &str, kind: &str) {
    let same = parse_server_message(again, RAW);
    assert!(
        matches!(
            (&same, kind),
            (Ok(ServerMessage::Ready), "ready") | (Ok(ServerMessage::Stop), "stop")
        ),
        "{again} decodes as {same:?}"
    );
}

/// A chunk with the 44-byte header Python's `wave` writes.
fn wav(format: AudioFormat, samples: &[u8]) -> Vec<u8> {
    let (tag, bits): (u16, u16) = match format.encoding {
        AudioEncoding::Mulaw => (7, 8),
        _ => (1, 16),
    };
    let align = u32::from(format.channels) * u32::from(bits / 8);
    let mut out = Vec::with_capacity(44 + samples.len());
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + samples.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&format.channels.to_le_bytes());
    out.extend_from_slice(&format.sample_rate.to_le_bytes());
    out.extend_from_slice(&(format.sample_rate.wrapping_mul(align)).to_le_bytes());
    out.extend_from_slice(&(align as u16).to_le_bytes());
    out.extend_from_slice(&bits.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(samples.len() as u32).to_le_bytes());
    out.extend_from_slice(samples);
    out
}

/// Seeds: each message of the server, audio with and without a header, and
/// a few broken ones.
pub(super) fn vocode_seeds() -> Vec<Vec<u8>> {
    let pcm = [1u8, 0, 2, 0, 0xff, 0x7f, 0, 0x80];
    let mulaw = AudioFormat {
        encoding: AudioEncoding::Mulaw,
        sample_rate: 8_000,
        channels: 1,
    };
    let stereo = AudioFormat {
        sample_rate: 24_000,
        channels: 2,
        ..RAW
    };
    let mut cut = wav(RAW, &pcm);
    cut.truncate(30);
    let mut seeds: Vec<Vec<u8>> = [
        r#"{"type":"websocket_ready"}"#,
        r#"{"type":"websocket_stop"}"#,
        r#"{"type":"websocket_transcript","text":"Hello there","sender":"human","timestamp":1700000000.25}"#,
        r#"{"type":"websocket_transcript","text":"Hi!","sender":"bot","timestamp":1700000001}"#,
        r#"{"type":"websocket_transcript","text":"?","sender":"robot","timestamp":1}"#,
        r#"{"type":"websocket_audio","data":"not base64!"}"#,
        r#"{"type":"websocket_audio_config_start"}"#,
        r#"{"type":1}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    seeds.extend(
        [
            wav(RAW, &pcm),
            wav(mulaw, &[0xff, 0x7f, 0x00]),
            wav(stereo, &pcm),
            pcm.to_vec(),
            cut,
        ]
        .iter()
        .map(|chunk| audio_message(chunk).into_bytes()),
    );
    seeds.push(wav(RAW, &pcm));
    seeds
}

/// Tokens of the conversation socket's JSON, and of WAV headers in base64.
#[rustfmt::skip]
pub(super) const VOCODE_TOKENS: &[&str] = &[
    "\"type\"", "\"websocket_ready\"", "\"websocket_stop\"", "\"websocket_audio\"",
    "\"websocket_transcript\"", "\"data\"", "\"text\"", "\"sender\"", "\"human\"", "\"bot\"",
    "\"timestamp\"", "UklGR", "V0FWRW", "Zm10I", "ZGF0Y", "AAAA", "////", "=", "==", "RIFF",
    "WAVE", "fmt ", "data",
];
