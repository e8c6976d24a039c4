//! Backend and session configuration.
//!
//! [`Config`] configures a backend; [`SessionConfig`] configures one session.
//! Both are serde types loadable from TOML, YAML and JSON, with durations
//! written like `500ms` or `30s`. Unknown keys are errors, so a misspelled key is
//! reported rather than ignored. [`Config::validate`] reports every violation at
//! once, each with its field path.
//!
//! The provider-specific section, [`Config::provider_config`], is kept as JSON
//! here and validated by the provider against its own typed config (see
//! [`crate::BackendProvider::validate_config`] and [`crate::parse_provider_config`]).

mod builder;
mod depth;
mod env;
mod failover;
mod interruption;
mod load;
mod preemptive;
mod secret;
mod validate;
mod violations;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::agent::Agent;

#[cfg(feature = "cli")]
pub(crate) use depth::nesting_exceeded;

pub use builder::ConfigBuilder;
pub use failover::{
    DEFAULT_FAILOVER_TIMEOUT, DEFAULT_MAX_PROBE_INTERVAL, DEFAULT_PROBE_INTERVAL, FailoverConfig,
    MAX_FAILOVER_TIMEOUT, MAX_PROBE_INTERVAL, MIN_FAILOVER_TIMEOUT, MIN_PROBE_INTERVAL,
};
pub use interruption::{
    DEFAULT_BACKCHANNEL_LANGUAGE, DEFAULT_DUCK_GAIN_DB, DEFAULT_ENGLISH_BACKCHANNELS,
    DEFAULT_FALSE_INTERRUPTION_TIMEOUT, DEFAULT_MIN_INTERRUPTION_DURATION,
    DEFAULT_MIN_INTERRUPTION_WORDS, Duck, InterruptionConfig, InterruptionOverride,
    MAX_FALSE_INTERRUPTION_TIMEOUT, MAX_MIN_INTERRUPTION_DURATION, MAX_MIN_INTERRUPTION_WORDS,
    MIN_DUCK_GAIN_DB, MIN_FALSE_INTERRUPTION_TIMEOUT,
};
pub use load::parse_provider_config;
pub use preemptive::{
    DEFAULT_PREEMPTIVE_MAX_ATTEMPTS, DEFAULT_PREEMPTIVE_MIN_WORDS, DEFAULT_PREEMPTIVE_STABLE_FOR,
    MAX_PREEMPTIVE_MAX_ATTEMPTS, MAX_PREEMPTIVE_MIN_WORDS, MAX_PREEMPTIVE_STABLE_FOR,
    PreemptiveConfig, PreemptiveOverride,
};
pub use secret::{REDACTED, Secret, looks_secret, shown_in_error};
pub use validate::{HostedStages, ResolvedFallbacks, ResolvedPipeline};
pub use violations::{Violation, Violations};

/// The VAD a session uses when [`Config::vad_provider`] is unset.
pub const DEFAULT_VAD_PROVIDER: &str = "energy";
/// The turn detector a session uses when [`Config::turn_detection_provider`] is unset.
pub const DEFAULT_TURN_DETECTION_PROVIDER: &str = "silence";
/// Default [`Config::latency_target`]: 500 ms.
pub const DEFAULT_LATENCY_TARGET: Duration = Duration::from_millis(500);
/// Smallest allowed [`Config::latency_target`]: 100 ms.
pub const MIN_LATENCY_TARGET: Duration = Duration::from_millis(100);
/// Largest allowed [`Config::latency_target`]: 5 s.
pub const MAX_LATENCY_TARGET: Duration = Duration::from_secs(5);
/// Default [`Config::timeout`]: 30 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Smallest allowed [`Config::timeout`]: 1 s.
pub const MIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest allowed [`Config::timeout`]: 5 min.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// Default [`Config::max_retries`]: 3.
pub const DEFAULT_MAX_RETRIES: u32 = 3;
/// Largest allowed [`Config::max_retries`]: 10.
pub const MAX_MAX_RETRIES: u32 = 10;
/// Default [`Config::retry_delay`]: 1 s.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Smallest allowed [`Config::retry_delay`]: 100 ms.
pub const MIN_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Largest allowed [`Config::retry_delay`]: 30 s.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// Default [`Config::rate_limit_per_second`]: 10.
pub const DEFAULT_RATE_LIMIT_PER_SECOND: f64 = 10.0;
/// Default [`Config::rate_limit_burst`]: 20.
pub const DEFAULT_RATE_LIMIT_BURST: u32 = 20;
/// Default [`Config::max_concurrent_sessions`]: 100.
pub const DEFAULT_MAX_CONCURRENT_SESSIONS: u32 = 100;
/// How deeply config text may nest tables and lists: 64 levels, the document
/// itself being level 1 (`provider_config` is level 2, a list in it level 3).
///
/// Loading a [`Config`] (TOML, YAML or JSON), a [`SessionConfig`], or a JSON
/// value of [`Config::apply_env`] refuses deeper text with
/// [`InvalidConfig`](crate::error::ErrorCode::InvalidConfig) (`invalid YAML:
/// line L, column C: nested deeper than the limit of 64 levels of tables and
/// lists`) before any parser reads it: the YAML parser takes time quadratic in
/// the depth, and the parsers' own recursion limits (all deeper than this
/// one) give messages of their own. Real configs nest a few levels.
pub const MAX_NESTING_DEPTH: usize = 64;

/// How a session turns user speech into a reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PipelineType {
    /// Speech-to-text, then the agent, then text-to-speech. Needs `stt_provider`
    /// and `tts_provider`.
    #[default]
    SttTts,
    /// A speech-to-speech model. Needs `s2s_provider`.
    S2s,
}

impl PipelineType {
    /// The name used in config files: `stt_tts` or `s2s`.
    pub const fn as_str(self) -> &'static str {
        match self {
            PipelineType::SttTts => "stt_tts",
            PipelineType::S2s => "s2s",
        }
    }
}

impl fmt::Display for PipelineType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How much the crate logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    /// Everything, including per-frame detail.
    Trace,
    /// Diagnostic detail.
    Debug,
    /// Lifecycle events (the default).
    #[default]
    Info,
    /// Problems that were handled.
    Warn,
    /// Failures only.
    Error,
}

/// A custom audio processor to run on every incoming frame, by name.
///
/// `Debug` and `Serialize` redact its options as [`ProviderSection`]'s.
#[derive(Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessorConfig {
    /// The registered name of the processor.
    pub name: String,
    /// Where it runs: lower `order` runs first; equal orders keep config order.
    #[serde(default)]
    pub order: i32,
    /// Processor-specific options.
    #[serde(
        default = "empty_object",
        skip_serializing_if = "is_empty_object",
        deserialize_with = "strict::value"
    )]
    #[schemars(with = "BTreeMap<String, serde_json::Value>")]
    pub options: serde_json::Value,
}

/// The options as `Debug` and `Serialize` show them.
#[derive(Serialize)]
struct ShownProcessor<'a> {
    name: &'a str,
    order: i32,
    #[serde(skip_serializing_if = "is_empty_object")]
    options: serde_json::Value,
}

impl ProcessorConfig {
    /// Whether it gives options of its own (a non-empty `options` table),
    /// which then replace `[components.<name>]`.
    pub fn has_inline_options(&self) -> bool {
        self.options.as_object().is_some_and(|o| !o.is_empty())
    }

    fn shown(&self) -> ShownProcessor<'_> {
        ShownProcessor {
            name: &self.name,
            order: self.order,
            options: redact_value(&self.options),
        }
    }
}

impl fmt::Debug for ProcessorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self.shown();
        f.debug_struct("ProcessorConfig")
            .field("name", &shown.name)
            .field("order", &shown.order)
            .field("options", &shown.options)
            .finish()
    }
}

impl Serialize for ProcessorConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.shown().serialize(serializer)
    }
}

/// `value` with every secret in it replaced: the whole value under a
/// secret-looking key ([`ProviderSection::is_secret_key`]), at any depth, and
/// in URLs the user name, password and secret-looking query values
/// ([`redact_url`]).
fn redact_value(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let v = if ProviderSection::is_secret_key(k) {
                        Value::String(REDACTED.to_owned())
                    } else {
                        redact_value(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(redact_value).collect()),
        Value::String(text) => Value::String(redact_url(text).into_owned()),
        other => other.clone(),
    }
}

/// `text` with, if it is a URL, its user name and password and the values of
/// secret-looking query parameters replaced by `redacted`
/// (`wss://redacted:redacted@bot/ws?token=redacted&room=1`). Other text is
/// returned as it is.
pub fn redact_url(text: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    const HIDDEN: &str = "redacted";
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let Ok(mut url) = url::Url::parse(text) else {
        return Cow::Borrowed(text);
    };
    let mut changed = false;
    if !url.username().is_empty() {
        changed |= url.set_username(HIDDEN).is_ok();
    }
    if url.password().is_some() {
        changed |= url.set_password(Some(HIDDEN)).is_ok();
    }
    if url
        .query_pairs()
        .any(|(k, _)| ProviderSection::is_secret_key(&k))
    {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if ProviderSection::is_secret_key(&k) {
                    HIDDEN.to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
        changed = true;
    }
    if changed {
        Cow::Owned(url.to_string())
    } else {
        Cow::Borrowed(text)
    }
}

/// The provider-specific section of a [`Config`], as a JSON object.
///
/// It is checked by the provider against its own typed config. Until then its
/// values are untyped, so `Debug` and `Serialize` redact every value (an
/// object or list too) whose key looks secret (it contains `key`, `secret`,
/// `token`, `password`, `passwd`, `credential` or `authorization`, in any
/// case), and in URLs the user name, password and secret-looking query
/// values ([`redact_url`]).
///
/// A key given twice, at any depth, is an error in every format (TOML refuses
/// it anyway; JSON and YAML parsers would keep the last).
#[derive(Clone, Default, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct ProviderSection(pub serde_json::Map<String, serde_json::Value>);

impl<'de> Deserialize<'de> for ProviderSection {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match strict::value(deserializer)? {
            serde_json::Value::Object(map) => Ok(ProviderSection(map)),
            other => Err(serde::de::Error::custom(format!(
                "expected a table of options, found {}",
                strict::kind(&other)
            ))),
        }
    }
}

/// Deserializing JSON-like values that refuse a key given twice.
mod strict {
    use std::fmt;

    use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Number, Value};

    /// A value, refusing duplicate keys at any depth.
    pub(super) fn value<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }

    /// A component options map, refusing a component named twice.
    pub(super) fn sections<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<std::collections::BTreeMap<String, super::ProviderSection>, D::Error> {
        struct Sections;
        impl<'de> Visitor<'de> for Sections {
            type Value = std::collections::BTreeMap<String, super::ProviderSection>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of components, each a table of options")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = std::collections::BTreeMap::new();
                while let Some(name) = map.next_key::<String>()? {
                    if out.contains_key(&name) {
                        return Err(de::Error::custom(format!(
                            "component `{}` given twice",
                            super::ProviderSection::shown_key(&name)
                        )));
                    }
                    let section = map.next_value::<super::ProviderSection>()?;
                    out.insert(name, section);
                }
                Ok(out)
            }
        }
        deserializer.deserialize_map(Sections)
    }

    /// What kind of value `v` is, for messages that must not quote it.
    pub(super) fn kind(v: &Value) -> &'static str {
        match v {
            Value::Null => "nothing",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "a list",
            Value::Object(_) => "a table",
        }
    }

    struct StrictVisitor;

    struct Strict(Value);

    impl<'de> de::Deserialize<'de> for Strict {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_any(StrictVisitor).map(Strict)
        }
    }

    impl<'de> Visitor<'de> for StrictVisitor {
        type Value = Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a value")
        }
        fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
            Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
        }
        fn visit_str<E>(self, v: &str) -> Result<Value, E> {
            Ok(Value::String(v.to_owned()))
        }
        fn visit_string<E>(self, v: String) -> Result<Value, E> {
            Ok(Value::String(v))
        }
        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_none<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(StrictVisitor)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut items = Vec::new();
            while let Some(Strict(v)) = seq.next_element()? {
                items.push(v);
            }
            Ok(Value::Array(items))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut out = Map::new();
            while let Some(key) = map.next_key::<String>()? {
                if out.contains_key(&key) {
                    return Err(de::Error::custom(format!(
                        "key `{}` given twice",
                        super::ProviderSection::shown_key(&key)
                    )));
                }
                let Strict(v) = map.next_value()?;
                out.insert(key, v);
            }
            Ok(Value::Object(out))
        }
    }
}

impl ProviderSection {
    /// Whether a key of the section names a secret, so its value is redacted.
    pub fn is_secret_key(key: &str) -> bool {
        let k = key.to_ascii_lowercase();
        [
            "key",
            "secret",
            "token",
            "password",
            "passwd",
            "credential",
            "authorization",
        ]
        .iter()
        .any(|w| k.contains(w))
    }

    /// How a key (or other text) read from input is shown in errors: by
    /// the crate's one rule, [`shown_in_error`]. A damaged file can run a
    /// secret key into its value (`"auth_token: sk-…"` read as one key),
    /// swallow it into another value with an unclosed quote, or move the value
    /// to where a key goes.
    pub(crate) fn shown_key(key: &str) -> std::borrow::Cow<'_, str> {
        shown_in_error(key)
    }

    /// `message` with every piece it quotes (between `"` or `` ` ``) shown by
    /// [`shown_in_error`]: parsers quote unknown keys and rejected values,
    /// which damage can fill with a secret.
    pub(crate) fn redact_quoted(message: &str) -> String {
        secret::redact_quoted(message)
    }

    /// A copy with every secret-looking value (at any depth) replaced by
    /// `[redacted]`, and the secrets in URLs by `redacted`.
    pub fn redacted(&self) -> serde_json::Map<String, serde_json::Value> {
        match redact_value(&serde_json::Value::Object(self.0.clone())) {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("an object stays an object"),
        }
    }

    /// Whether the section has no keys.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for ProviderSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl Serialize for ProviderSection {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.redacted().serialize(serializer)
    }
}

/// The configuration of a backend.
///
/// Build one in code with [`Config::builder`], or load it with
/// [`Config::from_toml_str`], [`Config::from_yaml_str`], [`Config::from_json_str`] or
/// [`Config::from_path`]. Loading never reads the environment; overlaying
/// environment variables is the explicit [`Config::apply_env`] / [`Config::from_env`].
///
/// ```toml
/// provider = "local"
/// pipeline_type = "s2s"
/// s2s_provider = "echo"
/// latency_target = "300ms"
/// timeout = "10s"
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The registered name of the provider, e.g. `"local"` or `"pipecat"`.
    pub provider: String,
    /// The provider-specific section, validated by the provider.
    #[serde(default, skip_serializing_if = "ProviderSection::is_empty")]
    pub provider_config: ProviderSection,
    /// `stt_tts` (the default) or `s2s`.
    #[serde(default)]
    pub pipeline_type: PipelineType,
    /// Speech-to-text component, required by `stt_tts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stt_provider: Option<String>,
    /// Text-to-speech component, required by `stt_tts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tts_provider: Option<String>,
    /// Speech-to-speech component, required by `s2s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s2s_provider: Option<String>,
    /// Speech-to-text components to fall back to, in order, when
    /// `stt_provider` fails or times out (see [`FailoverConfig`]); each a
    /// registered component, none repeated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stt_fallbacks: Vec<String>,
    /// Text-to-speech components to fall back to, in order, when
    /// `tts_provider` fails or times out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tts_fallbacks: Vec<String>,
    /// Speech-to-speech components to fall back to, in order, when
    /// `s2s_provider` fails or times out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub s2s_fallbacks: Vec<String>,
    /// How components fail over to their fallbacks (`[failover]`).
    #[serde(default, skip_serializing_if = "FailoverConfig::is_default")]
    pub failover: FailoverConfig,
    /// Voice activity detection component (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vad_provider: Option<String>,
    /// Turn detection component (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_detection_provider: Option<String>,
    /// Noise cancellation component (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_cancellation_provider: Option<String>,
    /// The end-of-speech to first-reply-audio latency to aim for; 100ms..=5s, default 500ms.
    #[serde(default = "default_latency_target", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub latency_target: Duration,
    /// Deadline of one operation (connect, turn, shutdown); 1s..=5m, default 30s.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Connection attempts after the first; 0..=10, default 3.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Delay before the first retry, doubled after each; 100ms..=30s, default 1s.
    #[serde(default = "default_retry_delay", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub retry_delay: Duration,
    /// Sessions open at once on the backend; at least 1, default 100.
    #[serde(default = "default_max_concurrent_sessions")]
    pub max_concurrent_sessions: u32,
    /// Whether spans are recorded (default true). The `voice-backends`
    /// binary records none when false: its log lines then carry no session
    /// or connection context. In a program of your own, the `tracing`
    /// subscriber you install decides.
    #[serde(default = "default_true")]
    pub enable_tracing: bool,
    /// Whether metrics are exposed (default true): when false, the server's
    /// `/metrics` answers 404. The backend still counts (a few atomic adds
    /// per operation), and [`Metrics`](crate::metrics::Metrics)'s
    /// `register_otel` (feature `otel`) is yours to call or not.
    #[serde(default = "default_true")]
    pub enable_metrics: bool,
    /// Whether the `voice-backends` binary logs (default true): when false it
    /// logs nothing, unless `RUST_LOG` asks for it. In a program of your own,
    /// the `tracing` subscriber you install decides.
    #[serde(default = "default_true")]
    pub enable_logging: bool,
    /// Log level (default `info`).
    #[serde(default)]
    pub log_level: LogLevel,
    /// Custom audio processors, run in ascending `order`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processors: Vec<ProcessorConfig>,
    /// Fallback rate limit (for providers without their own): session
    /// creations per second per user, on average; default 10. The user is
    /// the auth hook's authenticated principal when there is an auth hook,
    /// otherwise the session's `user_id`.
    #[serde(default = "default_rate_limit_per_second")]
    pub rate_limit_per_second: f64,
    /// Fallback rate limit: session creations per user at once; default 20.
    #[serde(default = "default_rate_limit_burst")]
    pub rate_limit_burst: u32,
    /// Options of pipeline components, by component name (`[components.silence]`).
    /// Values whose key looks secret are redacted like `provider_config`'s.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "strict::sections"
    )]
    pub components: BTreeMap<String, ProviderSection>,
    /// When user speech during a reply interrupts it (`[interruption]`); see
    /// [`InterruptionConfig`].
    #[serde(default, skip_serializing_if = "InterruptionConfig::is_default")]
    pub interruption: InterruptionConfig,
    /// Whether the agent starts on a stable partial transcript
    /// (`[preemptive]`, off by default); see [`PreemptiveConfig`]. The agent
    /// is called twice for a turn whose preemptive reply is dropped.
    #[serde(default, skip_serializing_if = "PreemptiveConfig::is_default")]
    pub preemptive: PreemptiveConfig,
}

/// The transport a session's user connects over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// WebRTC (e.g. a LiveKit room).
    Webrtc,
    /// A WebSocket (the default).
    #[default]
    Websocket,
}

/// A per-session override of the backend's pipeline.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineOverride {
    /// Replaces [`Config::pipeline_type`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_type: Option<PipelineType>,
    /// Changes to [`Config::interruption`] for this session
    /// (`[pipeline.interruption]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interruption: Option<InterruptionOverride>,
    /// Changes to [`Config::preemptive`] for this session
    /// (`[pipeline.preemptive]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preemptive: Option<PreemptiveOverride>,
    /// Replaces [`Config::stt_provider`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stt_provider: Option<String>,
    /// Replaces [`Config::tts_provider`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tts_provider: Option<String>,
    /// Replaces [`Config::s2s_provider`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s2s_provider: Option<String>,
    /// Replaces [`Config::stt_fallbacks`]. When unset, the backend's list
    /// applies, without the session's `stt_provider` if it is in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stt_fallbacks: Option<Vec<String>>,
    /// Replaces [`Config::tts_fallbacks`], as for `stt_fallbacks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tts_fallbacks: Option<Vec<String>>,
    /// Replaces [`Config::s2s_fallbacks`], as for `stt_fallbacks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s2s_fallbacks: Option<Vec<String>>,
}

/// The configuration of one session.
///
/// The agent is set in code (it is not part of the serialized form).
#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// The user the session belongs to; required, non-empty.
    pub user_id: String,
    /// `websocket` (the default) or `webrtc`.
    #[serde(default)]
    pub transport: Transport,
    /// Where the provider should connect this session, if it needs one
    /// (`ws`, `wss`, `http` or `https`). `Debug` and the saved form show it
    /// without its user name, password and secret-looking query values.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_redacted_url"
    )]
    pub connection_url: Option<String>,
    /// The token given to the backend's auth hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_token: Option<Secret>,
    /// Overrides of the backend's pipeline for this session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineOverride>,
    /// Free-form metadata kept with the session.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// The format of audio the application sends (default 16 kHz mono PCM s16le);
    /// it is converted to the pipeline's format at the edge.
    #[serde(default = "default_audio_format")]
    #[schemars(skip)]
    pub input_format: crate::audio::AudioFormat,
    /// The format of audio the application receives (default 16 kHz mono PCM s16le).
    #[serde(default = "default_audio_format")]
    #[schemars(skip)]
    pub output_format: crate::audio::AudioFormat,
    /// The application's agent for this session.
    #[serde(skip)]
    #[schemars(skip)]
    pub agent: Option<Arc<dyn Agent>>,
}

impl fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("user_id", &self.user_id)
            .field("transport", &self.transport)
            .field(
                "connection_url",
                &self.connection_url.as_deref().map(redact_url),
            )
            .field("auth_token", &self.auth_token)
            .field("pipeline", &self.pipeline)
            .field("metadata", &self.metadata)
            .field("input_format", &self.input_format)
            .field("output_format", &self.output_format)
            .field("agent", &self.agent.as_ref().map(|_| "<agent>"))
            .finish()
    }
}

fn serialize_redacted_url<S: serde::Serializer>(
    url: &Option<String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    url.as_deref().map(redact_url).serialize(serializer)
}

fn default_audio_format() -> crate::audio::AudioFormat {
    crate::audio::AudioFormat::PCM16_16K_MONO
}
fn default_latency_target() -> Duration {
    DEFAULT_LATENCY_TARGET
}
fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}
fn default_max_retries() -> u32 {
    DEFAULT_MAX_RETRIES
}
fn default_retry_delay() -> Duration {
    DEFAULT_RETRY_DELAY
}
fn default_max_concurrent_sessions() -> u32 {
    DEFAULT_MAX_CONCURRENT_SESSIONS
}
fn default_rate_limit_per_second() -> f64 {
    DEFAULT_RATE_LIMIT_PER_SECOND
}
fn default_rate_limit_burst() -> u32 {
    DEFAULT_RATE_LIMIT_BURST
}
fn default_true() -> bool {
    true
}
fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}
fn is_empty_object(v: &serde_json::Value) -> bool {
    v.as_object().is_some_and(|m| m.is_empty())
}

#[cfg(test)]
mod tests {
    use super::ProviderSection;

    #[test]
    fn keys_are_shown_by_the_one_rule() {
        let shown = |k| ProviderSection::shown_key(k).into_owned();
        assert_eq!(shown("auth_token: sk-Zq8Vw3"), "auth_token…");
        assert_eq!(shown("sk-Zq8Vw3Lp9Xr2Tn7"), "sk-…");
        assert_eq!(shown("api_key"), "api_key");
        assert_eq!(
            ProviderSection::redact_quoted("unknown field `sk_live_abcdefghijkl`"),
            "unknown field `sk_…`"
        );
    }
}
