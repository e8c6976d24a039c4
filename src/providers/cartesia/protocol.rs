//! Cartesia's wire messages, both sockets: what we send (text-to-speech
//! generation and cancel requests, the speech-to-text commands and the
//! socket URLs) and what we accept (text-to-speech responses,
//! speech-to-text events), with the one mapping of Cartesia's error statuses
//! to [`ErrorCode`]s.
//!
//! Every decoder here takes untrusted text and answers a typed value or a
//! description of what was wrong; none panics.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;

/// The sample rates Cartesia's raw text-to-speech output takes.
pub const TTS_SAMPLE_RATES: [u32; 6] = [8_000, 16_000, 22_050, 24_000, 44_100, 48_000];

/// The speech-to-text command that finishes the transcript of the audio sent
/// so far; Cartesia answers `flush_done`.
pub const FINALIZE: &str = "finalize";
/// The speech-to-text command that finishes what was sent and ends the
/// session; Cartesia answers `done` and closes.
pub const CLOSE: &str = "close";

/// The voice of a generation request: always by id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Voice<'a> {
    /// `"id"`.
    pub mode: &'static str,
    /// The voice's id.
    pub id: &'a str,
}

/// The output format of a generation request: raw PCM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct OutputFormat {
    /// `"raw"`.
    pub container: &'static str,
    /// `"pcm_s16le"`.
    pub encoding: &'static str,
    /// One of [`TTS_SAMPLE_RATES`].
    pub sample_rate: u32,
}

impl OutputFormat {
    /// Raw PCM s16le at `sample_rate`.
    pub fn pcm16(sample_rate: u32) -> OutputFormat {
        OutputFormat {
            container: "raw",
            encoding: "pcm_s16le",
            sample_rate,
        }
    }
}

/// A text-to-speech generation request (Cartesia's `GenerationRequest`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GenerationRequest<'a> {
    /// The model, e.g. `sonic-3`.
    pub model_id: &'a str,
    /// The text to speak (empty for a flush or the end of a context).
    pub transcript: &'a str,
    /// The voice.
    pub voice: Voice<'a>,
    /// The audio format of the answer.
    pub output_format: OutputFormat,
    /// The context the request belongs to.
    pub context_id: &'a str,
    /// Whether more requests follow on this context.
    #[serde(rename = "continue")]
    pub continue_: bool,
    /// Generates what the context holds now, answered by `flush_done`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush: Option<bool>,
    /// The language to speak.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<&'a str>,
    /// How long Cartesia may buffer text before generating, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_buffer_delay_ms: Option<u32>,
}

impl GenerationRequest<'_> {
    /// The request as a JSON text.
    pub fn to_json(&self) -> String {
        // A struct of strings, numbers and booleans always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// `{"context_id": ..., "cancel": true}`: no more audio for the context.
pub fn cancel_request(context_id: &str) -> String {
    serde_json::json!({ "context_id": context_id, "cancel": true }).to_string()
}

/// What the text-to-speech socket says.
#[derive(Clone, Debug, PartialEq)]
pub enum TtsEvent {
    /// Audio of a context, decoded from base64.
    Chunk {
        /// The context.
        context_id: String,
        /// PCM bytes in the requested format.
        audio: Vec<u8>,
        /// Whether this is the context's last chunk.
        done: bool,
    },
    /// Everything sent on the context before a flush has been generated.
    FlushDone {
        /// The context.
        context_id: String,
        /// The flush's number.
        flush_id: Option<u64>,
    },
    /// The context is finished.
    Done {
        /// The context.
        context_id: String,
    },
    /// Word or phoneme timestamps (not used).
    Timestamps {
        /// The context.
        context_id: String,
    },
    /// An error, for one context or the socket.
    Error(WireError),
}

/// An `error` message of either socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WireError {
    /// The context it is about (text-to-speech), if any.
    pub context_id: Option<String>,
    /// The HTTP-like status, e.g. 429.
    pub status_code: Option<u16>,
    /// Cartesia's machine-readable code.
    pub error_code: Option<String>,
    /// The title.
    pub title: Option<String>,
    /// The message.
    pub message: Option<String>,
}

impl WireError {
    /// Our code for it ([`error_code`]).
    pub fn code(&self) -> ErrorCode {
        error_code(self.status_code)
    }

    /// `title: message (status N, code C)`, from what it has.
    pub fn describe(&self) -> String {
        let mut text = match (&self.title, &self.message) {
            (Some(t), Some(m)) => format!("{t}: {m}"),
            (Some(t), None) => t.clone(),
            (None, Some(m)) => m.clone(),
            (None, None) => "an error without a message".to_owned(),
        };
        let mut extra = Vec::new();
        if let Some(s) = self.status_code {
            extra.push(format!("status {s}"));
        }
        if let Some(c) = &self.error_code {
            extra.push(format!("code {c}"));
        }
        if !extra.is_empty() {
            text.push_str(&format!(" ({})", extra.join(", ")));
        }
        text
    }
}

/// The one mapping of Cartesia's statuses (an `error` message's
/// `status_code`, or an HTTP answer to the upgrade) to our codes: 401 and
/// 403 `AuthenticationFailed`, 429 `RateLimitExceeded` (retryable: too many
/// contexts or sockets at once), 408 and 504 `Timeout`, other 5xx
/// `ConnectionFailed` (retryable), 400, 404 and 422 `InvalidConfig` (a voice,
/// model or format Cartesia refuses), anything else `PipelineError`.
pub fn error_code(status: Option<u16>) -> ErrorCode {
    match status {
        Some(401 | 403) => ErrorCode::AuthenticationFailed,
        Some(429) => ErrorCode::RateLimitExceeded,
        Some(408 | 504) => ErrorCode::Timeout,
        Some(500..=599) => ErrorCode::ConnectionFailed,
        Some(400 | 404 | 422) => ErrorCode::InvalidConfig,
        _ => ErrorCode::PipelineError,
    }
}

/// The fields of any message, as read.
#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    kind: Option<String>,
    context_id: Option<String>,
    data: Option<String>,
    done: Option<bool>,
    flush_id: Option<u64>,
    // Speech-to-text.
    is_final: Option<bool>,
    text: Option<String>,
    // Errors.
    status_code: Option<u16>,
    error_code: Option<String>,
    title: Option<String>,
    message: Option<String>,
}

fn parse(text: &str) -> Result<Raw, String> {
    let raw: Raw = serde_json::from_str(text).map_err(|e| format!("not a JSON message: {e}"))?;
    if raw.kind.is_none() {
        return Err("a message without a type".into());
    }
    Ok(raw)
}

fn error_of(raw: Raw) -> WireError {
    WireError {
        context_id: raw.context_id,
        status_code: raw.status_code,
        error_code: raw.error_code,
        title: raw.title,
        message: raw.message,
    }
}

/// Decodes one text message of the text-to-speech socket.
///
/// # Errors
///
/// What is wrong with it: not JSON, no type or an unknown one, a chunk
/// without a context or with data that is not base64.
pub fn decode_tts(text: &str) -> Result<TtsEvent, String> {
    let raw = parse(text)?;
    let kind = raw.kind.clone().unwrap_or_default();
    if kind == "error" {
        return Ok(TtsEvent::Error(error_of(raw)));
    }
    let context_id = raw
        .context_id
        .ok_or_else(|| format!("a {kind:?} message without a context_id"))?;
    Ok(match kind.as_str() {
        "chunk" => {
            let data = raw.data.ok_or("a chunk without data")?;
            let audio = base64::engine::general_purpose::STANDARD
                .decode(data.as_bytes())
                .map_err(|e| format!("a chunk whose data is not base64: {e}"))?;
            TtsEvent::Chunk {
                context_id,
                audio,
                done: raw.done.unwrap_or(false),
            }
        }
        "flush_done" => TtsEvent::FlushDone {
            context_id,
            flush_id: raw.flush_id,
        },
        "done" => TtsEvent::Done { context_id },
        "timestamps" | "phoneme_timestamps" => TtsEvent::Timestamps { context_id },
        other => return Err(format!("unknown message type {other:?}")),
    })
}

/// What the speech-to-text socket says.
#[derive(Clone, Debug, PartialEq)]
pub enum SttMessage {
    /// A piece of transcript: `text` is what was heard since the last final
    /// piece.
    Transcript {
        /// The text (a delta, spaces kept).
        text: String,
        /// Whether the piece is final.
        is_final: bool,
    },
    /// Everything sent before `finalize` has been transcribed.
    FlushDone,
    /// The session is over (the answer to `close`).
    Done,
    /// An error.
    Error(WireError),
}

/// Decodes one text message of the speech-to-text socket.
///
/// # Errors
///
/// What is wrong with it: not JSON, no type or an unknown one, a transcript
/// without text.
pub fn decode_stt(text: &str) -> Result<SttMessage, String> {
    let raw = parse(text)?;
    Ok(match raw.kind.as_deref().unwrap_or_default() {
        "transcript" => SttMessage::Transcript {
            text: raw.text.ok_or("a transcript without text")?,
            is_final: raw.is_final.unwrap_or(false),
        },
        "flush_done" => SttMessage::FlushDone,
        "done" => SttMessage::Done,
        "error" => SttMessage::Error(error_of(raw)),
        other => return Err(format!("unknown message type {other:?}")),
    })
}

/// A user's turn as Cartesia's transcript pieces build it: the final pieces
/// since the last `flush_done`, joined as sent (Cartesia's deltas carry
/// their own spaces).
#[derive(Clone, Debug, Default)]
pub struct TurnText {
    finals: String,
}

/// What one speech-to-text message means for the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Heard {
    /// The turn so far, provisional.
    Partial(String),
    /// The turn's transcript, once `finalize` was answered.
    Final(String),
}

impl TurnText {
    /// Takes one message's transcript piece or `flush_done`.
    pub fn take(&mut self, message: &SttMessage) -> Option<Heard> {
        match message {
            SttMessage::Transcript { text, is_final } => {
                let so_far = format!("{}{text}", self.finals);
                if *is_final {
                    self.finals.push_str(text);
                }
                let so_far = so_far.trim();
                (!so_far.is_empty()).then(|| Heard::Partial(so_far.to_owned()))
            }
            SttMessage::FlushDone => {
                let text = std::mem::take(&mut self.finals);
                Some(Heard::Final(text.trim().to_owned()))
            }
            SttMessage::Done | SttMessage::Error(_) => None,
        }
    }
}

/// The speech-to-text socket's URL: `{base}/stt/websocket` with the model,
/// the audio's encoding and rate, and the optional settings as query values.
pub fn stt_url(
    base: &str,
    model: &str,
    sample_rate: u32,
    language: Option<&str>,
    min_volume: Option<f64>,
    max_silence_duration_secs: Option<f64>,
) -> String {
    let mut url = format!("{}/stt/websocket", base.trim_end_matches('/'));
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("model", model);
    query.append_pair("encoding", "pcm_s16le");
    query.append_pair("sample_rate", &sample_rate.to_string());
    if let Some(l) = language {
        query.append_pair("language", l);
    }
    if let Some(v) = min_volume {
        query.append_pair("min_volume", &v.to_string());
    }
    if let Some(s) = max_silence_duration_secs {
        query.append_pair("max_silence_duration_secs", &s.to_string());
    }
    url.push('?');
    url.push_str(&query.finish());
    url
}

/// The text-to-speech socket's URL: `{base}/tts/websocket`.
pub fn tts_url(base: &str) -> String {
    format!("{}/tts/websocket", base.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generation_request_has_the_fields_cartesia_names() {
        let r = GenerationRequest {
            model_id: "sonic-3",
            transcript: "Hi.",
            voice: Voice {
                mode: "id",
                id: "v1",
            },
            output_format: OutputFormat::pcm16(16_000),
            context_id: "c1",
            continue_: true,
            flush: None,
            language: Some("en"),
            max_buffer_delay_ms: None,
        };
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["continue"], true);
        assert_eq!(v["voice"]["mode"], "id");
        assert_eq!(v["output_format"]["container"], "raw");
        assert_eq!(v["output_format"]["sample_rate"], 16_000);
        assert!(v.get("flush").is_none() && v.get("max_buffer_delay_ms").is_none());
        let c: serde_json::Value = serde_json::from_str(&cancel_request("c1")).unwrap();
        assert_eq!(c, serde_json::json!({"context_id": "c1", "cancel": true}));
    }

    #[test]
    fn responses_decode_and_errors_map() {
        let e = decode_tts(r#"{"type":"chunk","data":"AAEC","done":false,"status_code":206,"step_time":1.5,"context_id":"c"}"#).unwrap();
        assert_eq!(
            e,
            TtsEvent::Chunk {
                context_id: "c".into(),
                audio: vec![0, 1, 2],
                done: false
            }
        );
        let e = decode_tts(r#"{"type":"error","status_code":429,"title":"Too many","message":"slow down","done":true}"#).unwrap();
        let TtsEvent::Error(w) = e else { panic!() };
        assert_eq!(w.code(), ErrorCode::RateLimitExceeded);
        assert!(w.code().is_retryable());
        assert_eq!(w.describe(), "Too many: slow down (status 429)");
        assert_eq!(error_code(Some(401)), ErrorCode::AuthenticationFailed);
        assert!(decode_tts(r#"{"type":"chunk","data":"!!","context_id":"c"}"#).is_err());
        assert!(decode_tts(r#"{"type":"chunk","data":"AA=="}"#).is_err());
        assert!(decode_tts(r#"{"type":"mystery","context_id":"c"}"#).is_err());
    }

    #[test]
    fn a_turn_is_the_final_pieces_until_flush_done() {
        let mut turn = TurnText::default();
        let piece = |t: &str, f: bool| SttMessage::Transcript {
            text: t.into(),
            is_final: f,
        };
        assert_eq!(
            turn.take(&piece("hel", false)),
            Some(Heard::Partial("hel".into()))
        );
        assert_eq!(
            turn.take(&piece("hello ", true)),
            Some(Heard::Partial("hello".into()))
        );
        assert_eq!(
            turn.take(&piece("there", true)),
            Some(Heard::Partial("hello there".into()))
        );
        assert_eq!(
            turn.take(&SttMessage::FlushDone),
            Some(Heard::Final("hello there".into()))
        );
        assert_eq!(
            turn.take(&SttMessage::FlushDone),
            Some(Heard::Final(String::new()))
        );
    }

    #[test]
    fn the_stt_url_carries_the_settings() {
        let u = stt_url(
            "wss://api.cartesia.ai/",
            "ink-whisper",
            16_000,
            Some("en"),
            None,
            Some(0.5),
        );
        assert_eq!(
            u,
            "wss://api.cartesia.ai/stt/websocket?model=ink-whisper&encoding=pcm_s16le&sample_rate=16000&language=en&max_silence_duration_secs=0.5"
        );
        assert_eq!(tts_url("ws://h:1"), "ws://h:1/tts/websocket");
    }
}
