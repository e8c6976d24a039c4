//! The WebSocket protocol of `/ws`: client messages, the `ready` answer and
//! close codes. The README's protocol section documents the same thing for
//! client authors.

use serde::{Deserialize, Serialize};

use crate::audio::AudioEncoding;
use crate::config::{ProviderSection, Secret};

/// Normal closure: the session stopped.
pub(super) const NORMAL: u16 = 1000;
/// The server is shutting down.
pub(super) const GOING_AWAY: u16 = 1001;
/// The client broke the protocol.
pub(super) const PROTOCOL: u16 = 1002;
/// The client sent audio the server cannot take.
pub(super) const UNSUPPORTED: u16 = 1003;
/// A text message whose payload is not valid UTF-8.
pub(super) const INVALID_PAYLOAD: u16 = 1007;
/// Refused: origin, authentication, authorization or message rate.
pub(super) const POLICY: u16 = 1008;
/// A message was larger than `max_frame_bytes`.
pub(super) const TOO_BIG: u16 = 1009;
/// Something failed inside the server.
pub(super) const INTERNAL: u16 = 1011;
/// At capacity or rate limited: try again later.
pub(super) const TRY_AGAIN: u16 = 1013;

/// The accepted `sample_rate`s: the usual rates from 8 to 48 kHz. An odd
/// rate would cost a resampler with a large filter table (10 ms to make at
/// 47,999 Hz) for no client's benefit.
pub(super) const SAMPLE_RATES: [u32; 9] = [
    8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000,
];
/// The longest accepted `user_id`, in characters.
pub(super) const MAX_USER_ID_CHARS: usize = 128;

/// The most keys a `start` message's `metadata` may have.
pub(super) const MAX_METADATA_KEYS: usize = 32;
/// The most bytes a `start` message's `metadata` may take, as JSON.
pub(super) const MAX_METADATA_BYTES: usize = 4 * 1024;

/// A close frame's reason holds at most 123 bytes (125 minus the code).
const MAX_REASON_BYTES: usize = 123;

/// The body of a `start` message (its `type` removed).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Start {
    pub(crate) user_id: String,
    pub(crate) sample_rate: u32,
    #[serde(default)]
    pub(crate) token: Option<Secret>,
    /// Kept with the session (and in the session store).
    #[serde(default)]
    pub(crate) metadata: serde_json::Map<String, serde_json::Value>,
    /// How the audio is encoded, both ways.
    #[serde(default)]
    pub(crate) encoding: WireEncoding,
}

/// The encodings of a session's audio on the WebSocket (`encoding` in
/// `start` and `resume`), mono at the session's `sample_rate` both ways.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub(crate) enum WireEncoding {
    /// PCM signed 16-bit little-endian (the default).
    #[default]
    #[serde(rename = "pcm_s16le")]
    PcmS16le,
    /// G.711 mu-law, one byte a sample (telephone gateways, North America and Japan).
    #[serde(rename = "mulaw")]
    Mulaw,
    /// G.711 A-law, one byte a sample (telephone gateways elsewhere).
    #[serde(rename = "alaw")]
    Alaw,
}

impl WireEncoding {
    /// The crate's encoding.
    pub(crate) fn encoding(self) -> AudioEncoding {
        match self {
            WireEncoding::PcmS16le => AudioEncoding::PcmS16Le,
            WireEncoding::Mulaw => AudioEncoding::Mulaw,
            WireEncoding::Alaw => AudioEncoding::Alaw,
        }
    }

    /// Its name on the wire, as `ready` says it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            WireEncoding::PcmS16le => "pcm_s16le",
            WireEncoding::Mulaw => "mulaw",
            WireEncoding::Alaw => "alaw",
        }
    }
}

/// The body of a `resume` message: take up a session again (after the
/// connection dropped, the server restarted, or on another instance sharing
/// the session store).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Resume {
    pub(crate) session_id: String,
    /// The `resume_token` of the session's `ready`.
    pub(crate) resume_token: Secret,
    /// The rate of the audio the client sends and gets: the session's.
    pub(crate) sample_rate: u32,
    /// The encoding of the audio the client sends and gets: the session's.
    #[serde(default)]
    pub(crate) encoding: WireEncoding,
}

/// The body of a `text` message.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Text {
    text: String,
}

/// The body of a `stop` message.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Stop {}

/// A text message from the client.
pub(crate) enum ClientMessage {
    /// Open the session.
    Start(Start),
    /// Take up a session again.
    Resume(Resume),
    /// Text in place of speech.
    Text(String),
    /// Stop the session gracefully.
    Stop,
}

impl ClientMessage {
    /// Parses a client text message; the error is a close reason for 1002.
    pub(crate) fn parse(text: &str) -> Result<ClientMessage, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let serde_json::Value::Object(mut object) = value else {
            return Err("a message must be a JSON object with a \"type\"".into());
        };
        let kind = match object.remove("type") {
            Some(serde_json::Value::String(kind)) => kind,
            Some(_) => return Err("\"type\" must be a string".into()),
            None => return Err("the message has no \"type\"".into()),
        };
        // Errors quote wrongly typed values: never a token's.
        if kind == "start"
            && object
                .get("token")
                .is_some_and(|t| !t.is_string() && !t.is_null())
        {
            return Err("bad start message: token must be a string".into());
        }
        if kind == "resume" && object.get("resume_token").is_some_and(|t| !t.is_string()) {
            return Err("bad resume message: resume_token must be a string".into());
        }
        let body = serde_json::Value::Object(object);
        let field_error = |e: serde_json::Error| {
            format!(
                "bad {kind} message: {}",
                ProviderSection::redact_quoted(&e.to_string())
            )
        };
        match kind.as_str() {
            "start" => serde_json::from_value::<Start>(body)
                .map(ClientMessage::Start)
                .map_err(field_error),
            "text" => serde_json::from_value::<Text>(body)
                .map(|t| ClientMessage::Text(t.text))
                .map_err(field_error),
            "stop" => serde_json::from_value::<Stop>(body)
                .map(|_| ClientMessage::Stop)
                .map_err(field_error),
            "resume" => serde_json::from_value::<Resume>(body)
                .map(ClientMessage::Resume)
                .map_err(field_error),
            other => Err(format!(
                "unknown message type {:?} (expected start, resume, text or stop)",
                shorten(other, 40)
            )),
        }
    }
}

impl Start {
    /// Checks the fields; the error is a close reason for 1002.
    pub(crate) fn check(&self) -> Result<(), String> {
        if !SAMPLE_RATES.contains(&self.sample_rate) {
            return Err(format!(
                "sample_rate {} is not supported; use one of 8000, 11025, 12000, 16000, \
                 22050, 24000, 32000, 44100, 48000",
                self.sample_rate
            ));
        }
        if self.user_id.trim().is_empty() {
            return Err("user_id must be non-empty".into());
        }
        if self.user_id.chars().count() > MAX_USER_ID_CHARS {
            return Err(format!(
                "user_id is longer than {MAX_USER_ID_CHARS} characters"
            ));
        }
        if self.user_id.chars().any(char::is_control) {
            return Err("user_id has control characters".into());
        }
        if self.metadata.len() > MAX_METADATA_KEYS {
            return Err(format!("metadata has more than {MAX_METADATA_KEYS} keys"));
        }
        let bytes = serde_json::to_vec(&self.metadata).map_or(0, |v| v.len());
        if bytes > MAX_METADATA_BYTES {
            return Err(format!(
                "metadata takes {bytes} bytes as JSON, more than {MAX_METADATA_BYTES}"
            ));
        }
        Ok(())
    }
}

impl Resume {
    /// Checks the fields; the error is a close reason for 1002.
    pub(crate) fn check(&self) -> Result<(), String> {
        if !SAMPLE_RATES.contains(&self.sample_rate) {
            return Err(format!(
                "sample_rate {} is not supported; use the session's",
                self.sample_rate
            ));
        }
        if self.session_id.is_empty()
            || self.session_id.len() > 64
            || !self
                .session_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err("session_id is not a session id".into());
        }
        Ok(())
    }
}

/// The server's answer to `start`.
#[derive(Serialize)]
pub(super) struct Ready<'a> {
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    pub(super) session_id: &'a str,
    pub(super) sample_rate: u32,
    pub(super) encoding: &'static str,
    pub(super) channels: u16,
    /// What the provider published for the session's client
    /// ([`VoiceSession::info`](crate::session::VoiceSession::info)): a room,
    /// a join token, a call id. Left out when empty.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub(super) info: std::collections::BTreeMap<String, String>,
    /// The token a `resume` of this session needs, when the server keeps
    /// sessions (a session store): for this client only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) resume_token: Option<String>,
    /// The session was taken up again (`resume`), not opened.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(super) resumed: bool,
    /// The session's metadata. Left out when empty.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub(super) metadata: std::collections::BTreeMap<String, serde_json::Value>,
}

impl<'a> Ready<'a> {
    /// `ready` for a session of mono `encoding` at `sample_rate`.
    pub(super) fn new(session_id: &'a str, sample_rate: u32, encoding: WireEncoding) -> Self {
        Ready {
            kind: "ready",
            session_id,
            sample_rate,
            encoding: encoding.name(),
            channels: 1,
            info: std::collections::BTreeMap::new(),
            resume_token: None,
            resumed: false,
            metadata: std::collections::BTreeMap::new(),
        }
    }
}

/// `text` cut to at most `max` characters, with `...` when cut.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_owned(),
    }
}

/// `reason` cut to fit a close frame (123 bytes), on a character boundary.
pub(crate) fn close_reason(reason: &str) -> String {
    if reason.len() <= MAX_REASON_BYTES {
        return reason.to_owned();
    }
    let mut end = MAX_REASON_BYTES - 3;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &reason[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_message() {
        let ClientMessage::Start(s) = ClientMessage::parse(
            r#"{"type":"start","user_id":"alice","sample_rate":16000,"token":"t"}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (s.user_id.as_str(), s.sample_rate, s.token.unwrap().expose()),
            ("alice", 16000, "t")
        );
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"text","text":"hi"}"#),
            Ok(ClientMessage::Text(t)) if t == "hi"
        ));
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"stop"}"#),
            Ok(ClientMessage::Stop)
        ));
    }

    #[test]
    fn start_and_resume_take_an_encoding() {
        let start = |json: &str| match ClientMessage::parse(json) {
            Ok(ClientMessage::Start(s)) => Ok(s.encoding),
            Ok(_) => panic!("not a start"),
            Err(e) => Err(e),
        };
        let base = r#"{"type":"start","user_id":"a","sample_rate":8000"#;
        assert_eq!(start(&format!("{base}}}")), Ok(WireEncoding::PcmS16le));
        for (name, e) in [
            ("pcm_s16le", WireEncoding::PcmS16le),
            ("mulaw", WireEncoding::Mulaw),
            ("alaw", WireEncoding::Alaw),
        ] {
            assert_eq!(start(&format!(r#"{base},"encoding":"{name}"}}"#)), Ok(e));
            assert_eq!(e.name(), name);
        }
        let e = start(&format!(r#"{base},"encoding":"opus"}}"#)).unwrap_err();
        assert!(e.contains("opus") && e.contains("mulaw"), "{e}");
        let resume = ClientMessage::parse(
            r#"{"type":"resume","session_id":"s","resume_token":"t","sample_rate":8000,"encoding":"alaw"}"#,
        );
        assert!(matches!(resume, Ok(ClientMessage::Resume(r)) if r.encoding == WireEncoding::Alaw));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let err = |s| ClientMessage::parse(s).err().unwrap();
        assert!(err("{nope").starts_with("invalid JSON"));
        assert!(err("[1]").contains("object"));
        assert!(err(r#"{"user_id":"a"}"#).contains("no \"type\""));
        assert!(err(r#"{"type":"dance"}"#).contains("unknown message type \"dance\""));
        assert!(err(r#"{"type":"start","user_id":"a"}"#).contains("sample_rate"));
        assert!(err(r#"{"type":"stop","now":true}"#).contains("unknown field"));
        let e = err(r#"{"type":"start","user_id":"a","sample_rate":16000,"token":987654}"#);
        assert!(
            e.contains("token must be a string") && !e.contains("987654"),
            "{e}"
        );
    }

    #[test]
    fn start_fields_are_checked() {
        let start = |user: &str, rate| Start {
            user_id: user.into(),
            sample_rate: rate,
            token: None,
            metadata: serde_json::Map::new(),
            encoding: WireEncoding::default(),
        };
        for rate in SAMPLE_RATES {
            assert!(start("a", rate).check().is_ok(), "{rate}");
        }
        for rate in [0, 7_999, 8_001, 44_101, 47_999, 48_001, 96_000] {
            let e = start("a", rate).check().unwrap_err();
            assert!(
                e.contains(&format!("sample_rate {rate} is not supported")),
                "{e}"
            );
            assert!(e.contains("44100"), "{e}");
            assert!(close_reason(&e) == e, "fits a close frame: {e}");
        }
        assert!(start(" ", 16_000).check().is_err());
        assert!(start("a\nb", 16_000).check().is_err());
        assert!(start(&"x".repeat(129), 16_000).check().is_err());
    }

    #[test]
    fn reasons_fit_a_close_frame() {
        assert_eq!(close_reason("short"), "short");
        let long = "é".repeat(100);
        let r = close_reason(&long);
        assert!(r.len() <= MAX_REASON_BYTES && r.ends_with("..."), "{r}");
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;
        use serde_json::{Value, json};

        const TOKEN: &str = "tok-Qm4Rv8Zx2Lw6";

        fn value() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                (-1e12..1e12f64).prop_map(Value::from),
                "[a-z \\n]{0,12}".prop_map(Value::from),
                Just(json!([16000, "x"])),
                Just(json!({"a": 1})),
            ]
        }

        proptest! {
            /// A `start` message with a token and any other fields, of any
            /// type, parses and checks or fails with a reason that fits a
            /// close frame and never shows the token.
            #[test]
            fn start_errors_never_show_the_token(
                user_id in prop::option::of(value()),
                sample_rate in prop::option::of(prop_oneof![
                    (0u32..100_000).prop_map(Value::from),
                    value(),
                ]),
                // A short key, or a token key run into its value.
                extra in prop::option::of((
                    prop_oneof![
                        "[a-z_]{1,8}",
                        Just(format!("token: {TOKEN}")),
                        Just(format!("token{TOKEN}")),
                    ],
                    value(),
                )),
                token_first in any::<bool>(),
            ) {
                let mut object = serde_json::Map::new();
                object.insert("type".into(), json!("start"));
                if token_first {
                    object.insert("token".into(), json!(TOKEN));
                }
                if let Some(v) = user_id {
                    object.insert("user_id".into(), v);
                }
                if let Some(v) = sample_rate {
                    object.insert("sample_rate".into(), v);
                }
                if let Some((k, v)) = extra {
                    object.entry(k).or_insert(v);
                }
                if !token_first {
                    object.insert("token".into(), json!(TOKEN));
                }
                let text = Value::Object(object).to_string();
                let reason = match ClientMessage::parse(&text) {
                    Ok(ClientMessage::Start(s)) => {
                        prop_assert_eq!(s.token.as_ref().map(|t| t.expose()), Some(TOKEN));
                        s.check().err()
                    }
                    Ok(_) => return Err(TestCaseError::fail("not a start message")),
                    Err(reason) => Some(reason),
                };
                if let Some(reason) = reason {
                    prop_assert!(!reason.contains(TOKEN), "{}", reason);
                    let cut = close_reason(&reason);
                    prop_assert!(cut.len() <= MAX_REASON_BYTES);
                    prop_assert!(!cut.is_empty());
                }
            }

            /// A `resume` message with any fields, of any type, parses and
            /// checks or fails with a reason that fits a close frame and
            /// never shows the resume token.
            #[test]
            fn resume_errors_never_show_the_token(
                session_id in prop::option::of(prop_oneof![
                    "[a-z_0-9]{0,70}".prop_map(Value::from),
                    value(),
                ]),
                sample_rate in prop::option::of(prop_oneof![
                    (0u32..100_000).prop_map(Value::from),
                    value(),
                ]),
                token in prop_oneof![
                    Just(json!(TOKEN)),
                    Just(json!(987_654_321)),
                    Just(json!([TOKEN])),
                    Just(json!({"t": TOKEN})),
                ],
                extra in prop::option::of(("[a-z_]{1,8}", value())),
            ) {
                let mut object = serde_json::Map::new();
                object.insert("type".into(), json!("resume"));
                object.insert("resume_token".into(), token);
                if let Some(v) = session_id {
                    object.insert("session_id".into(), v);
                }
                if let Some(v) = sample_rate {
                    object.insert("sample_rate".into(), v);
                }
                if let Some((k, v)) = extra {
                    object.entry(k).or_insert(v);
                }
                let text = Value::Object(object).to_string();
                let reason = match ClientMessage::parse(&text) {
                    Ok(ClientMessage::Resume(r)) => {
                        prop_assert_eq!(r.resume_token.expose(), TOKEN);
                        r.check().err()
                    }
                    Ok(_) => return Err(TestCaseError::fail("not a resume message")),
                    Err(reason) => Some(reason),
                };
                if let Some(reason) = reason {
                    prop_assert!(!reason.contains(TOKEN), "{}", reason);
                    prop_assert!(!reason.contains("987654321"), "{}", reason);
                    prop_assert!(close_reason(&reason).len() <= MAX_REASON_BYTES);
                }
            }

            /// Any text at all gives a message or a reason, never a panic.
            #[test]
            fn any_text_gives_a_message_or_a_reason(text in "\\PC{0,200}") {
                if let Err(reason) = ClientMessage::parse(&text) {
                    prop_assert!(!reason.is_empty());
                    prop_assert!(close_reason(&reason).len() <= MAX_REASON_BYTES);
                }
            }
        }
    }
}
