//! [`Secret`]: a string that never shows itself; and the one rule by which
//! errors show text read from input ([`shown_in_error`]).

use std::borrow::Cow;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a [`Secret`] prints, serializes and reports as, wherever it appears.
pub const REDACTED: &str = "[redacted]";

/// An API key, secret or token.
///
/// `Debug`, `Display` and `Serialize` all write `[redacted]`; the value is read
/// only through [`Secret::expose`]. Deserializing accepts a plain string. A
/// config that was saved (and so redacted) and loaded again is rejected by
/// validation with a message saying the real value must be supplied.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value. Keep it out of logs, errors and spans.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the value is the redaction marker, i.e. it came from serialized
    /// output rather than from the real secret.
    pub fn is_redaction_marker(&self) -> bool {
        self.0 == REDACTED
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

impl JsonSchema for Secret {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Secret".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "writeOnly": true,
            "description": "A secret (API key, secret or token); never shown in logs or output."
        })
    }
}

/// Prefixes that start API keys and tokens of well-known services (Stripe,
/// OpenAI, Anthropic, GitHub, GitLab, Slack, AWS, Google), compared
/// case-sensitively at the start of a token.
const KEY_PREFIXES: [&str; 19] = [
    "sk_",
    "sk-",
    "pk_",
    "rk_",
    "whsec_",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "xoxb-",
    "xoxp-",
    "xoxa-",
    "xapp-",
    "AKIA",
    "ASIA",
    "AIza",
];

/// How many characters must follow a [`KEY_PREFIXES`] prefix for the token to
/// look like a key (`sk_live_4eC39H…`, not `pk_tts`).
const MIN_AFTER_PREFIX: usize = 8;

/// Whether `text`, read from input, looks like it holds a secret: whether
/// [`shown_in_error`] would cut it.
pub fn looks_secret(text: &str) -> bool {
    secret_cut(text).is_some()
}

/// How an error message shows `text` (a value, name or key read from input):
/// whole, or, when part of it looks secret, cut just before that part and
/// ended with `…`. Every error of the crate that quotes input goes through
/// this rule.
///
/// The text is cut at the first place where any of these starts:
///
/// - a URL's user name and password (`wss://bot:pw@host` is cut to `wss://…`);
/// - a token (text between white space, quotes and `,;:=()[]{}<>|/\`) that
///   starts with a well-known key prefix (`sk_`, `sk-`, `pk_`, `rk_`,
///   `whsec_`, `ghp_`, `github_pat_`, `glpat-`, `xoxb-`, `AKIA`, `AIza`, ...)
///   followed by 8 or more characters: the prefix is kept (`sk_…`);
/// - a JWT-shaped token (`eyJ…` with two dots);
/// - whatever follows a word (ASCII letters, digits and `_`) that names a
///   secret ([`ProviderSection::is_secret_key`](super::ProviderSection::is_secret_key):
///   `api_key`, `token`, ...) or is `bearer`: `Bearer abc` is cut to
///   `Bearer…`, `api_key: sk-1` to `api_key…`, `?token=abc` to `?token…`;
/// - a word that looks generated rather than chosen: 10 or more characters
///   with 3 or more digits, or with 6 or more changes between lower case,
///   upper case and digits (`Zq8Vw3Lp9Xr2Tn7`, `a3f9b2c4d5e6`; not
///   `s2s_provider_v2` or `maxConcurrentSessions`).
///
/// Short ordinary values (`pipcat`, `fast`, `300ms`, `api_key`) are shown
/// whole, so a message still says what was wrong. The cut keeps what comes
/// before the secret-looking part, so the reader can still tell which value
/// it was.
///
/// ```
/// use voice_backends::shown_in_error;
///
/// assert_eq!(shown_in_error("pipcat"), "pipcat");
/// assert_eq!(shown_in_error("sk_live_4eC39HqLyjWDarjtT1zdp7dc"), "sk_…");
/// assert_eq!(shown_in_error("Bearer abc.def"), "Bearer…");
/// assert_eq!(shown_in_error("wss://bot:pw@host/ws"), "wss://…");
/// ```
pub fn shown_in_error(text: &str) -> Cow<'_, str> {
    match secret_cut(text) {
        Some(at) => Cow::Owned(format!("{}…", &text[..at])),
        None => Cow::Borrowed(text),
    }
}

/// `text` shown by [`shown_in_error`], in double quotes with Rust's escapes
/// (as `{:?}` writes it): how messages quote a value.
pub(crate) fn quoted(text: &str) -> String {
    format!("{:?}", shown_in_error(text))
}

/// `message` with every piece it quotes (between `"` or `` ` ``) shown by
/// [`shown_in_error`]: parsers quote unknown keys and rejected values, which
/// may be secrets (or a damaged file may have filled with one).
pub(crate) fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find(['"', '`']) {
        let quote = rest[open..].chars().next().unwrap_or('"');
        out.push_str(&rest[..=open]);
        let body = &rest[open + 1..];
        // The closing quote; `\"` inside a double-quoted piece is escaped.
        let mut close = None;
        let mut escaped = false;
        for (i, c) in body.char_indices() {
            if c == quote && !escaped {
                close = Some(i);
                break;
            }
            escaped = quote == '"' && c == '\\' && !escaped;
        }
        let close = close.unwrap_or(body.len());
        out.push_str(&shown_in_error(&body[..close]));
        out.push_str(&body[close..(close + 1).min(body.len())]);
        rest = &body[(close + 1).min(body.len())..];
    }
    out.push_str(rest);
    out
}

/// Where [`shown_in_error`] cuts `text`, if anywhere.
fn secret_cut(text: &str) -> Option<usize> {
    let cut = credentials_cut(text);
    match token_cut(text) {
        Some(at) => Some(cut.map_or(at, |c| c.min(at))),
        None => cut,
    }
}

/// Just after the `://` of the first URL in `text` that has a user name
/// (and maybe a password): `scheme://user:password@host`.
fn credentials_cut(text: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(found) = text[from..].find("://") {
        let start = from + found + 3;
        let authority_end = text[start..]
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '@' | '"' | '\'' | '`') || c.is_whitespace()
            })
            .map_or(text.len(), |n| start + n);
        if text[authority_end..].starts_with('@') {
            return Some(start);
        }
        from = start;
    }
    None
}

/// Whether `c` ends a token (see [`shown_in_error`]).
fn ends_token(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '"' | '\''
                | '`'
                | ','
                | ';'
                | ':'
                | '='
                | '('
                | ')'
                | '['
                | ']'
                | '{'
                | '}'
                | '<'
                | '>'
                | '|'
                | '/'
                | '\\'
        )
}

/// The first cut made by a token or word rule of [`shown_in_error`].
fn token_cut(text: &str) -> Option<usize> {
    let mut at = 0;
    while let Some(offset) = text[at..].find(|c: char| !ends_token(c)) {
        let start = at + offset;
        let end = text[start..]
            .find(ends_token)
            .map_or(text.len(), |n| start + n);
        let token = &text[start..end];
        if let Some(prefix) = KEY_PREFIXES.iter().find(|p| {
            token
                .strip_prefix(**p)
                .is_some_and(|rest| rest.chars().count() >= MIN_AFTER_PREFIX)
        }) {
            return Some(start + prefix.len());
        }
        if looks_like_jwt(token) {
            return Some(start);
        }
        if let Some(cut) = word_cut(text, start, end) {
            return Some(cut);
        }
        at = end;
    }
    None
}

/// Whether `token` has the shape of a JSON Web Token: `eyJ` and three
/// dot-separated parts.
fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.len() >= 20 && token.matches('.').count() >= 2
}

/// The first cut made by a word rule of [`shown_in_error`] in the token
/// `text[start..end]`.
fn word_cut(text: &str, start: usize, end: usize) -> Option<usize> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut at = start;
    while let Some(offset) = text[at..end].find(is_word) {
        let word_start = at + offset;
        let word_end = text[word_start..end]
            .find(|c: char| !is_word(c))
            .map_or(end, |n| word_start + n);
        let word = &text[word_start..word_end];
        if looks_generated(word) {
            return Some(word_start);
        }
        let names_secret =
            super::ProviderSection::is_secret_key(word) || word.eq_ignore_ascii_case("bearer");
        if names_secret && word_end < text.len() {
            return Some(word_end);
        }
        at = word_end;
    }
    None
}

/// Whether a word (ASCII letters, digits and `_`) looks like a generated
/// secret rather than a name: at least 10 characters with 3 or more digits,
/// or with 6 or more changes between lower case, upper case and digits
/// (`Zq8Vw3Lp9Xr2Tn7`, `a3f9b2c4d5e6`; not `s2s_provider` or
/// `maxConcurrentSessions`).
fn looks_generated(word: &str) -> bool {
    #[derive(PartialEq, Clone, Copy)]
    enum Class {
        Lower,
        Upper,
        Digit,
        Other,
    }
    let class = |c: char| {
        if c.is_ascii_lowercase() {
            Class::Lower
        } else if c.is_ascii_uppercase() {
            Class::Upper
        } else if c.is_ascii_digit() {
            Class::Digit
        } else {
            Class::Other
        }
    };
    if word.len() < 10 {
        return false;
    }
    let digits = word.chars().filter(char::is_ascii_digit).count();
    let mut changes = 0;
    let mut previous = Class::Other;
    for c in word.chars().map(class) {
        if c != previous && c != Class::Other && previous != Class::Other {
            changes += 1;
        }
        previous = c;
    }
    digits >= 3 || changes >= 6
}

#[cfg(test)]
mod tests {
    use super::{looks_secret, redact_quoted, shown_in_error};

    #[test]
    fn ordinary_values_are_shown_whole() {
        for text in [
            "pipcat",
            "fast",
            "300ms",
            "1m 30s",
            "api_key",
            "api_key_2",
            "keyboard",
            "s2s_provider_v2",
            "maxConcurrentSessions",
            "noise_cancellation_provider",
            "pk_tts",
            "task_manager_queue",
            "sk-echo",
            "wss://bot.example.com:8443/ws?room=1",
            "300ms, region: eu",
            "é`x",
            "",
        ] {
            assert_eq!(shown_in_error(text), text);
            assert!(!looks_secret(text), "{text}");
        }
    }

    #[test]
    fn secret_looking_values_are_cut_before_the_secret() {
        let cases = [
            ("sk_live_abcdefghijklmnop", "sk_…"),
            ("sk-Zq8Vw3Lp9Xr2Tn7", "sk-…"),
            ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_…"),
            ("ghp_abcdefghijklmnopqrstuvwxyz0123456789", "ghp_…"),
            ("AKIAIOSFODNN7EXAMPLE", "AKIA…"),
            ("id sk_live_abcdefghijklmnop", "id sk_…"),
            ("Bearer abcdef", "Bearer…"),
            ("bearer", "bearer"),
            ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl", "…"),
            ("x eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.sig", "x …"),
            ("wss://bot:hunter2@example.com/ws", "wss://…"),
            ("https://user@host", "https://…"),
            ("wss://host/ws?token=abc&room=1", "wss://host/ws?token…"),
            ("auth_token: sk-Zq8Vw3", "auth_token…"),
            ("region: eu api_key: sk-1", "region: eu api_key…"),
            ("token sk-1", "token…"),
            ("id a3f9b2c4d5e6 x", "id …"),
            ("Zq8Vw3Lp9Xr2Tn7Ks4", "…"),
        ];
        for (text, shown) in cases {
            assert_eq!(shown_in_error(text), shown, "{text}");
            assert_eq!(looks_secret(text), shown != text, "{text}");
        }
    }

    #[test]
    fn quoted_pieces_of_a_message_are_cut_and_the_rest_kept() {
        let r = redact_quoted;
        assert_eq!(
            r("unknown field `auth_token: sk-9`, expected `user_id` or `auth_token`"),
            "unknown field `auth_token…`, expected `user_id` or `auth_token`"
        );
        assert_eq!(
            r(r#"invalid value: string "5ms api_key: sk-9", expected a duration"#),
            r#"invalid value: string "5ms api_key…", expected a duration"#
        );
        assert_eq!(
            r(r#"invalid type: string "sk_live_abcdefghijkl", expected u32"#),
            r#"invalid type: string "sk_…", expected u32"#
        );
        // An escaped quote does not end the piece.
        assert_eq!(
            r(r#"string "a \" token=sk-9 \" b" more"#),
            r#"string "a \" token…" more"#
        );
        // An unclosed quote runs to the end.
        assert_eq!(r("key `secret x"), "key `secret…");
        assert_eq!(r("no quotes, token: x"), "no quotes, token: x");
        assert_eq!(r("é`é`\"é"), "é`é`\"é");
    }
}
