//! Validation of [`Config`] and [`SessionConfig`]: every rule, every violation at once.

use std::time::Duration;

use serde::Serialize;

use super::failover::{check_fallbacks, plain_fallbacks};
use super::secret::quoted;
use super::violations::Violations;
use super::{
    Config, MAX_LATENCY_TARGET, MAX_MAX_RETRIES, MAX_RETRY_DELAY, MAX_TIMEOUT, MIN_LATENCY_TARGET,
    MIN_RETRY_DELAY, MIN_TIMEOUT, PipelineOverride, PipelineType, ProcessorConfig, ProviderSection,
    REDACTED, SessionConfig, shown_in_error,
};
use crate::error::BackendError;

/// The pipeline a session runs: the backend's [`Config`] with the session's
/// [`PipelineOverride`] applied. Made by [`SessionConfig::resolve_pipeline`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedPipeline {
    /// The pipeline type in effect.
    pub pipeline_type: PipelineType,
    /// The speech-to-text component in effect (set whenever `pipeline_type` is `stt_tts`).
    pub stt_provider: Option<String>,
    /// The text-to-speech component in effect (set whenever `pipeline_type` is `stt_tts`).
    pub tts_provider: Option<String>,
    /// The speech-to-speech component in effect (set whenever `pipeline_type` is `s2s`).
    pub s2s_provider: Option<String>,
}

/// The fallback lists a session runs with: the backend's [`Config`] with the
/// session's [`PipelineOverride`] applied. Made by
/// [`SessionConfig::resolve_fallbacks`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResolvedFallbacks {
    /// The speech-to-text fallbacks in effect, in order.
    pub stt: Vec<String>,
    /// The text-to-speech fallbacks in effect, in order.
    pub tts: Vec<String>,
    /// The speech-to-speech fallbacks in effect, in order.
    pub s2s: Vec<String>,
}

fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

// The checks below are on the path of every `BackendRegistry::create`: the
// passing case is inlined and allocation-free, the failing case is cold.

#[inline]
fn check_duration(v: &mut Violations, path: &str, value: Duration, min: Duration, max: Duration) {
    if value < min || value > max {
        out_of_range(v, path, value, min, max);
    }
}

#[cold]
fn out_of_range(v: &mut Violations, path: &str, value: Duration, min: Duration, max: Duration) {
    {
        v.push(
            path,
            format!(
                "{} is out of range {}..={}",
                fmt_duration(value),
                fmt_duration(min),
                fmt_duration(max)
            ),
        );
    }
}

/// Checks a name (of a provider, component or processor): non-empty, no
/// surrounding whitespace.
#[inline]
fn check_name(v: &mut Violations, path: &str, name: &str) {
    let (Some(&first), Some(&last)) = (name.as_bytes().first(), name.as_bytes().last()) else {
        return bad_name(v, path, name);
    };
    // Whitespace at either end is ASCII (9..=13, 32) or part of a multi-byte char.
    let suspect = |b: u8| matches!(b, 9..=13 | 32) || b >= 0x80;
    if suspect(first) || suspect(last) {
        bad_name(v, path, name);
    }
}

#[cold]
fn bad_name(v: &mut Violations, path: &str, name: &str) {
    if name.trim() == name && !name.is_empty() {
        return;
    }
    if name.trim().is_empty() {
        v.push(path, "must be non-empty");
    } else {
        v.push(
            path,
            format!("{} has leading or trailing whitespace", quoted(name)),
        );
    }
}

/// The bytes [`plain_name`] accepts at either end of a name: ASCII other than
/// whitespace.
static PLAIN_EDGE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x80 {
        table[b] = !matches!(b, 9..=13 | 32);
        b += 1;
    }
    table
};

/// Whether [`check_name`] plainly passes `name`: non-empty, and ASCII other
/// than whitespace at both ends.
#[inline]
fn plain_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty() && PLAIN_EDGE[b[0] as usize] && PLAIN_EDGE[b[b.len() - 1] as usize]
}

/// Whether the redaction marker is anywhere in `value`, under any key.
fn holds_redaction_marker(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s == REDACTED,
        serde_json::Value::Object(map) => map.values().any(holds_redaction_marker),
        serde_json::Value::Array(items) => items.iter().any(holds_redaction_marker),
        _ => false,
    }
}

#[inline]
fn check_optional_name(v: &mut Violations, path: &str, name: Option<&str>) {
    if let Some(name) = name {
        check_name(v, path, name);
    }
}

/// Reports every secret-looking value (at any depth) that is the redaction marker.
fn check_redaction_markers(v: &mut Violations, path: &str, value: &serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                let child = format!("{path}.{}", shown_in_error(key));
                if ProviderSection::is_secret_key(key) && value.as_str() == Some(REDACTED) {
                    v.push(child, redaction_marker_message());
                } else {
                    check_redaction_markers(v, &child, value);
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_redaction_markers(v, &format!("{path}[{i}]"), item);
            }
        }
        _ => {}
    }
}

fn redaction_marker_message() -> String {
    format!("is the redaction marker {REDACTED:?}; supply the real secret")
}

/// Pipeline stages a provider's service runs itself.
///
/// A stage the service hosts needs no component in the config: a Pipecat bot
/// transcribes and speaks, so `provider = "pipecat"` needs neither
/// `stt_provider` nor `tts_provider`. The local engine still runs voice
/// activity detection (for barge-in) and calls the application's agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[non_exhaustive]
pub struct HostedStages {
    /// The service transcribes the user (and ends the user's turns).
    pub stt: bool,
    /// The service synthesizes the reply's speech.
    pub tts: bool,
}

impl HostedStages {
    /// Nothing hosted: the local engine runs every stage.
    pub const NONE: HostedStages = HostedStages {
        stt: false,
        tts: false,
    };
    /// Speech recognition and synthesis hosted by the service.
    pub const STT_TTS: HostedStages = HostedStages {
        stt: true,
        tts: true,
    };

    /// Whether the service hosts both ends of the pipeline, so no local
    /// STT, TTS or S2S component is needed whatever the `pipeline_type`.
    pub fn hosts_pipeline(self) -> bool {
        self.stt && self.tts
    }
}

/// The cross-field rules of a pipeline: the components its type needs.
fn check_pipeline(
    v: &mut Violations,
    prefix: &str,
    pipeline_type: PipelineType,
    stt: Option<&str>,
    tts: Option<&str>,
    s2s: Option<&str>,
    hosted: HostedStages,
) {
    if hosted.hosts_pipeline() {
        return;
    }
    match pipeline_type {
        PipelineType::SttTts => {
            // Neither named: most likely a first config that left the
            // pipeline at its default; say how to run one that needs neither.
            let hint = if stt.is_none() && tts.is_none() && !hosted.stt && !hosted.tts {
                " (stt_tts is the default pipeline_type; for a pipeline without \
                 speech-to-text and text-to-speech set pipeline_type = \"s2s\" \
                 and s2s_provider = \"echo\")"
            } else {
                ""
            };
            if stt.is_none() && !hosted.stt {
                v.push(
                    format!("{prefix}stt_provider"),
                    format!("pipeline_type = stt_tts requires stt_provider{hint}"),
                );
            }
            if tts.is_none() && !hosted.tts {
                v.push(
                    format!("{prefix}tts_provider"),
                    format!("pipeline_type = stt_tts requires tts_provider{hint}"),
                );
            }
        }
        PipelineType::S2s => {
            if s2s.is_none() {
                v.push(
                    format!("{prefix}s2s_provider"),
                    "pipeline_type = s2s requires s2s_provider",
                );
            }
        }
    }
}

fn check_override_names(v: &mut Violations, p: &PipelineOverride) {
    check_optional_name(v, "pipeline.stt_provider", p.stt_provider.as_deref());
    check_optional_name(v, "pipeline.tts_provider", p.tts_provider.as_deref());
    check_optional_name(v, "pipeline.s2s_provider", p.s2s_provider.as_deref());
}

/// The names of an override's fallback lists, well formed (the rest of their
/// rules depend on the backend's config: see `resolve_pipeline_for`).
fn check_override_fallback_names(v: &mut Violations, p: &PipelineOverride) {
    for (stage, list) in [
        ("stt", &p.stt_fallbacks),
        ("tts", &p.tts_fallbacks),
        ("s2s", &p.s2s_fallbacks),
    ] {
        for (i, name) in list.iter().flatten().enumerate() {
            check_name(v, &format!("pipeline.{stage}_fallbacks[{i}]"), name);
        }
    }
}

/// A session's fallback list for one stage: its own when it gives one,
/// else the base's without the session's primary (which may be one of them).
fn resolve_fallbacks(
    session: Option<&Vec<String>>,
    base: &[String],
    primary: Option<&str>,
) -> Vec<String> {
    match session {
        Some(list) => list.clone(),
        None => base
            .iter()
            .filter(|n| Some(n.as_str()) != primary)
            .cloned()
            .collect(),
    }
}

impl Config {
    /// Checks every rule and reports every violation at once.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::error::ErrorCode::InvalidConfig) (operation
    /// `config.validate`) whose message lists every violation and whose
    /// `details` hold one entry per field path; see [`Config::violations`].
    #[inline]
    pub fn validate(&self) -> Result<(), BackendError> {
        self.validate_for(HostedStages::NONE)
    }

    /// Like [`Config::validate`], for a provider whose service runs the
    /// `hosted` stages itself: those need no component in the config.
    #[inline]
    pub fn validate_for(&self, hosted: HostedStages) -> Result<(), BackendError> {
        // `validate` is on the path of every `BackendRegistry::create`: a config
        // that plainly keeps every rule costs a few comparisons and no
        // allocation. Anything else (including valid configs the quick check
        // cannot vouch for) takes the full check, which builds the messages.
        if self.plainly_valid(hosted) {
            Ok(())
        } else {
            self.validate_in_full(hosted)
        }
    }

    #[cold]
    #[inline(never)]
    fn validate_in_full(&self, hosted: HostedStages) -> Result<(), BackendError> {
        self.violations_for(hosted).into_result("config.validate")
    }

    /// Whether this config keeps every rule of [`Config::violations`], decided
    /// without allocating. May answer `false` for a valid config (a name that
    /// starts or ends with a non-ASCII character, a `[redacted]` value under a
    /// key that is not secret); never answers `true` for an invalid one.
    #[inline]
    fn plainly_valid(&self, hosted: HostedStages) -> bool {
        let names_ok = plain_name(&self.provider)
            && [
                &self.stt_provider,
                &self.tts_provider,
                &self.s2s_provider,
                &self.vad_provider,
                &self.turn_detection_provider,
                &self.noise_cancellation_provider,
            ]
            .into_iter()
            .all(|n| n.as_deref().is_none_or(plain_name));
        let pipeline_ok = hosted.hosts_pipeline()
            || match self.pipeline_type {
                PipelineType::SttTts => {
                    (hosted.stt || self.stt_provider.is_some())
                        && (hosted.tts || self.tts_provider.is_some())
                }
                PipelineType::S2s => self.s2s_provider.is_some(),
            };
        // Durations compared as nanoseconds in a u64: exact below 2^34 s
        // (about 544 years), and every bound is far below that, so a
        // duration beyond it is out of range anyway.
        let (latency, timeout, retry) = (self.latency_target, self.timeout, self.retry_delay);
        let exact = (latency.as_secs() | timeout.as_secs() | retry.as_secs()) < 1 << 34;
        let nanos = |d: Duration| {
            d.as_secs()
                .wrapping_mul(1_000_000_000)
                .wrapping_add(d.subsec_nanos() as u64)
        };
        let within = |d: Duration, min: Duration, max: Duration| {
            nanos(d).wrapping_sub(nanos(min)) <= nanos(max) - nanos(min)
        };
        // Positive and finite: as bits, 1 (the least subnormal) up to, not
        // including, infinity; zero, negatives and NaN fall outside.
        let rate = self.rate_limit_per_second.to_bits();
        let fallbacks_ok = plain_fallbacks(self.stt_provider.as_deref(), &self.stt_fallbacks)
            && plain_fallbacks(self.tts_provider.as_deref(), &self.tts_fallbacks)
            && plain_fallbacks(self.s2s_provider.as_deref(), &self.s2s_fallbacks)
            && self.failover.plainly_valid();
        names_ok
            && pipeline_ok
            && fallbacks_ok
            && exact
            && within(latency, MIN_LATENCY_TARGET, MAX_LATENCY_TARGET)
            && within(timeout, MIN_TIMEOUT, MAX_TIMEOUT)
            && nanos(latency) <= nanos(timeout)
            && self.max_retries <= MAX_MAX_RETRIES
            && within(retry, MIN_RETRY_DELAY, MAX_RETRY_DELAY)
            && self.max_concurrent_sessions >= 1
            && rate.wrapping_sub(1) < f64::INFINITY.to_bits() - 1
            && self.rate_limit_burst >= 1
            && (self.processors.is_empty() || self.plain_processors())
            && (self.components.is_empty() || self.plain_components())
            && (self.provider_config.0.is_empty()
                || !self.provider_config.0.values().any(holds_redaction_marker))
            && self.interruption.plainly_valid()
            && self.preemptive.plainly_valid()
    }

    /// Processors with plain, unique names and object options.
    fn plain_processors(&self) -> bool {
        self.processors.iter().enumerate().all(|(i, p)| {
            plain_name(&p.name)
                && p.options.is_object()
                && !self.processors[..i].iter().any(|q| q.name == p.name)
        })
    }

    /// Component options only for components in use, holding no redaction marker.
    fn plain_components(&self) -> bool {
        let uses = |name: &str| {
            [
                &self.stt_provider,
                &self.tts_provider,
                &self.s2s_provider,
                &self.noise_cancellation_provider,
            ]
            .into_iter()
            .any(|n| n.as_deref() == Some(name))
                || self
                    .vad_provider
                    .as_deref()
                    .unwrap_or(super::DEFAULT_VAD_PROVIDER)
                    == name
                || self
                    .turn_detection_provider
                    .as_deref()
                    .unwrap_or(super::DEFAULT_TURN_DETECTION_PROVIDER)
                    == name
                || self.processors.iter().any(|p| p.name == name)
                || self.fallbacks().any(|n| n == name)
        };
        self.components.iter().all(|(name, section)| {
            uses(name)
                && (section.is_empty() || !self.speaks_only(name))
                && !section.0.values().any(holds_redaction_marker)
        })
    }

    /// Whether `name` is used as the text-to-speech component and nothing
    /// else: such a component is given no options.
    fn speaks_only(&self, name: &str) -> bool {
        let is = |o: &Option<String>| o.as_deref() == Some(name);
        (is(&self.tts_provider) || self.tts_fallbacks.iter().any(|n| n == name))
            && !self
                .stt_fallbacks
                .iter()
                .chain(&self.s2s_fallbacks)
                .any(|n| n == name)
            && ![
                &self.stt_provider,
                &self.s2s_provider,
                &self.noise_cancellation_provider,
            ]
            .into_iter()
            .any(is)
            && self
                .vad_provider
                .as_deref()
                .unwrap_or(super::DEFAULT_VAD_PROVIDER)
                != name
            && self
                .turn_detection_provider
                .as_deref()
                .unwrap_or(super::DEFAULT_TURN_DETECTION_PROVIDER)
                != name
            && !self.processors.iter().any(|p| p.name == name)
    }

    /// Every rule this config breaks, each with its field path:
    ///
    /// - `provider` is non-empty, without surrounding whitespace;
    /// - `latency_target` is in 100ms..=5s, `timeout` in 1s..=5m,
    ///   `max_retries` in 0..=10, `retry_delay` in 100ms..=30s and
    ///   `max_concurrent_sessions` at least 1;
    /// - `pipeline_type = stt_tts` requires `stt_provider` and `tts_provider`,
    ///   `pipeline_type = s2s` requires `s2s_provider`;
    /// - `latency_target` does not exceed `timeout`;
    /// - component names, when set, are non-empty without surrounding whitespace;
    /// - processor names are non-empty and unique, their options an object;
    /// - no secret-looking `provider_config` value is the redaction marker
    ///   `[redacted]` (left there by saving a config).
    ///
    /// The pipeline rule assumes the local engine runs every stage; see
    /// [`Config::violations_for`] for a provider that hosts some.
    pub fn violations(&self) -> Violations {
        self.violations_for(HostedStages::NONE)
    }

    /// Every rule this config breaks whichever provider it names: all of
    /// [`Config::violations`] but the components the pipeline needs, which
    /// depend on the stages the provider hosts (`pipecat` needs no
    /// `stt_provider`; `local` does). Loading checks these;
    /// [`BackendRegistry::create`](crate::BackendRegistry::create) checks the
    /// rest with the provider's [`HostedStages`].
    pub fn violations_for_any_provider(&self) -> Violations {
        self.violations_for(HostedStages::STT_TTS)
    }

    /// Every rule this config breaks for a provider whose service runs the
    /// `hosted` stages itself (they need no component name).
    pub fn violations_for(&self, hosted: HostedStages) -> Violations {
        let mut v = Violations::new();

        check_name(&mut v, "provider", &self.provider);

        check_duration(
            &mut v,
            "latency_target",
            self.latency_target,
            MIN_LATENCY_TARGET,
            MAX_LATENCY_TARGET,
        );
        check_duration(&mut v, "timeout", self.timeout, MIN_TIMEOUT, MAX_TIMEOUT);
        if self.max_retries > MAX_MAX_RETRIES {
            v.push(
                "max_retries",
                format!("{} is out of range 0..={MAX_MAX_RETRIES}", self.max_retries),
            );
        }
        check_duration(
            &mut v,
            "retry_delay",
            self.retry_delay,
            MIN_RETRY_DELAY,
            MAX_RETRY_DELAY,
        );
        if self.max_concurrent_sessions < 1 {
            v.push(
                "max_concurrent_sessions",
                format!(
                    "{} is out of range; must be at least 1",
                    self.max_concurrent_sessions
                ),
            );
        }

        if !(self.rate_limit_per_second.is_finite() && self.rate_limit_per_second > 0.0) {
            v.push(
                "rate_limit_per_second",
                format!("{} must be a positive number", self.rate_limit_per_second),
            );
        }
        if self.rate_limit_burst < 1 {
            v.push("rate_limit_burst", "0 is out of range; must be at least 1");
        }

        check_pipeline(
            &mut v,
            "",
            self.pipeline_type,
            self.stt_provider.as_deref(),
            self.tts_provider.as_deref(),
            self.s2s_provider.as_deref(),
            hosted,
        );
        if self.latency_target > self.timeout {
            v.push(
                "latency_target",
                format!(
                    "{} exceeds timeout {}; it must not be longer than timeout",
                    fmt_duration(self.latency_target),
                    fmt_duration(self.timeout)
                ),
            );
        }

        check_fallbacks(
            &mut v,
            "",
            "stt",
            self.stt_provider.as_deref(),
            &self.stt_fallbacks,
        );
        check_fallbacks(
            &mut v,
            "",
            "tts",
            self.tts_provider.as_deref(),
            &self.tts_fallbacks,
        );
        check_fallbacks(
            &mut v,
            "",
            "s2s",
            self.s2s_provider.as_deref(),
            &self.s2s_fallbacks,
        );
        self.failover.check(&mut v);

        check_optional_name(&mut v, "stt_provider", self.stt_provider.as_deref());
        check_optional_name(&mut v, "tts_provider", self.tts_provider.as_deref());
        check_optional_name(&mut v, "s2s_provider", self.s2s_provider.as_deref());
        check_optional_name(&mut v, "vad_provider", self.vad_provider.as_deref());
        check_optional_name(
            &mut v,
            "turn_detection_provider",
            self.turn_detection_provider.as_deref(),
        );
        check_optional_name(
            &mut v,
            "noise_cancellation_provider",
            self.noise_cancellation_provider.as_deref(),
        );

        for (i, p) in self.processors.iter().enumerate() {
            let path = || format!("processors[{i}].name");
            check_name(&mut v, &path(), &p.name);
            if !p.name.trim().is_empty() {
                // Processor lists are short: a scan beats hashing here.
                if let Some(first) = self.processors[..i].iter().position(|q| q.name == p.name) {
                    v.push(
                        path(),
                        format!(
                            "duplicate processor name {} (also processors[{first}])",
                            quoted(&p.name)
                        ),
                    );
                }
            }
            if !p.options.is_object() {
                v.push(
                    format!("processors[{i}].options"),
                    "must be a table (an object of options)",
                );
            }
        }

        if !self.components.is_empty() {
            self.check_component_options(&mut v);
        }
        self.interruption.check(&mut v, "interruption.");
        self.preemptive.check(&mut v, "preemptive.");

        for (key, value) in &self.provider_config.0 {
            let path = || format!("provider_config.{}", shown_in_error(key));
            if ProviderSection::is_secret_key(key) && value.as_str() == Some(REDACTED) {
                v.push(path(), redaction_marker_message());
            } else if value.is_object() || value.is_array() {
                check_redaction_markers(&mut v, &path(), value);
            }
        }

        v
    }
}

impl Config {
    /// The options `[components.<name>]` gives component `name` (`null`
    /// when it gives none).
    pub fn component_options(&self, name: &str) -> serde_json::Value {
        self.components
            .get(name)
            .map(|s| serde_json::Value::Object(s.0.clone()))
            .unwrap_or(serde_json::Value::Null)
    }

    /// The options `processor` runs with: its own `options` when it has any
    /// ([`ProcessorConfig::has_inline_options`]), else its name's
    /// `[components.<name>]`.
    pub fn processor_options(&self, processor: &ProcessorConfig) -> serde_json::Value {
        if processor.has_inline_options() {
            processor.options.clone()
        } else {
            self.component_options(&processor.name)
        }
    }

    /// Every name of the fallback lists (`stt_fallbacks`, `tts_fallbacks`,
    /// `s2s_fallbacks`).
    fn fallbacks(&self) -> impl Iterator<Item = &str> {
        self.stt_fallbacks
            .iter()
            .chain(&self.tts_fallbacks)
            .chain(&self.s2s_fallbacks)
            .map(String::as_str)
    }

    /// The component names this config uses (pipeline stages and their
    /// fallbacks, VAD and turn detection, defaults included, noise
    /// cancellation and processors).
    pub fn component_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = [
            &self.stt_provider,
            &self.tts_provider,
            &self.s2s_provider,
            &self.noise_cancellation_provider,
        ]
        .into_iter()
        .filter_map(|n| n.as_deref())
        .chain([
            self.vad_provider
                .as_deref()
                .unwrap_or(super::DEFAULT_VAD_PROVIDER),
            self.turn_detection_provider
                .as_deref()
                .unwrap_or(super::DEFAULT_TURN_DETECTION_PROVIDER),
        ])
        .chain(self.processors.iter().map(|p| p.name.as_str()))
        .chain(self.fallbacks())
        .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    #[cold]
    fn check_component_options(&self, v: &mut Violations) {
        let used = self.component_names();
        for (name, section) in &self.components {
            let path = format!("components.{}", shown_in_error(name));
            if !used.contains(&name.as_str()) {
                let used = if used.is_empty() {
                    "none".to_owned()
                } else {
                    used.iter()
                        .map(|n| shown_in_error(n))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                v.push(
                    path.clone(),
                    format!(
                        "options for {}, which this config does not use (it uses: {used})",
                        quoted(name)
                    ),
                );
            } else if self.speaks_only(name) && !section.is_empty() {
                v.push(
                    path.clone(),
                    format!(
                        "options for {}, the text-to-speech component: text-to-speech \
                         components take no options, so these would be ignored",
                        quoted(name)
                    ),
                );
            }
            check_redaction_markers(v, &path, &serde_json::Value::Object(section.0.clone()));
        }
    }
}

impl SessionConfig {
    /// Checks every rule and reports every violation at once.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::error::ErrorCode::InvalidConfig) (operation
    /// `session_config.validate`) listing every violation; see
    /// [`SessionConfig::violations`].
    pub fn validate(&self) -> Result<(), BackendError> {
        self.violations().into_result("session_config.validate")
    }

    /// Every rule this session config breaks, each with its field path:
    ///
    /// - `user_id` is non-empty;
    /// - `connection_url`, when set, is a URL with scheme `ws`, `wss`, `http`
    ///   or `https` (messages never repeat the URL, which may hold credentials);
    /// - `auth_token`, when set, is non-empty and not the redaction marker;
    /// - the names in `pipeline`, when set, are non-empty without surrounding
    ///   whitespace.
    ///
    /// Whether the overridden pipeline has every component it needs depends on
    /// the backend's [`Config`]: see [`SessionConfig::resolve_pipeline`].
    pub fn violations(&self) -> Violations {
        let mut v = Violations::new();
        if self.user_id.trim().is_empty() {
            v.push("user_id", "must be non-empty");
        }
        if let Some(url) = &self.connection_url {
            match url::Url::parse(url) {
                Ok(parsed) => {
                    let scheme = parsed.scheme();
                    if !matches!(scheme, "ws" | "wss" | "http" | "https") {
                        // Without `://`, what parsed as the scheme may be a
                        // user name (`user:password@host`): not quoted.
                        let what = if url.contains("://") {
                            format!("scheme {} is not supported", quoted(scheme))
                        } else {
                            "has no scheme".to_owned()
                        };
                        v.push(
                            "connection_url",
                            format!("{what}; use ws, wss, http or https"),
                        );
                    }
                }
                Err(e) => v.push(
                    "connection_url",
                    format!("is not a valid URL ({e}); expected e.g. wss://host/path"),
                ),
            }
        }
        if let Some(token) = &self.auth_token {
            if token.is_empty() {
                v.push("auth_token", "must be non-empty when set");
            } else if token.is_redaction_marker() {
                v.push("auth_token", redaction_marker_message());
            }
        }
        if let Some(p) = &self.pipeline {
            check_override_names(&mut v, p);
            check_override_fallback_names(&mut v, p);
        }
        for (path, format) in [
            ("input_format", &self.input_format),
            ("output_format", &self.output_format),
        ] {
            if let Err(e) = format.validate() {
                v.push(path, e.into_fields().message);
            }
        }
        v
    }

    /// The pipeline this session runs on a backend configured by `base`: each
    /// field of [`SessionConfig::pipeline`] that is set replaces the base's.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::error::ErrorCode::InvalidConfig) (operation
    /// `session_config.resolve_pipeline`) when the merged pipeline lacks a
    /// component its type needs (`pipeline.s2s_provider` for `s2s`,
    /// `pipeline.stt_provider` and `pipeline.tts_provider` for `stt_tts`) or
    /// an overriding name is empty or padded with whitespace.
    pub fn resolve_pipeline(&self, base: &Config) -> Result<ResolvedPipeline, BackendError> {
        self.resolve_pipeline_for(base, HostedStages::NONE)
    }

    /// The fallback lists this session runs with on a backend configured by
    /// `base`: each list the session's [`PipelineOverride`] gives replaces
    /// the base's; a list it does not give is the base's, without the
    /// session's own primary component if that is in it. Checked by
    /// [`SessionConfig::resolve_pipeline`] (a given list: no name twice, none
    /// the primary, a primary to fall back from).
    pub fn resolve_fallbacks(&self, base: &Config) -> ResolvedFallbacks {
        let p = self.pipeline.as_ref();
        fn primary<'a>(set: Option<&'a String>, base: &'a Option<String>) -> Option<&'a str> {
            set.or(base.as_ref()).map(String::as_str)
        }
        ResolvedFallbacks {
            stt: resolve_fallbacks(
                p.and_then(|p| p.stt_fallbacks.as_ref()),
                &base.stt_fallbacks,
                primary(p.and_then(|p| p.stt_provider.as_ref()), &base.stt_provider),
            ),
            tts: resolve_fallbacks(
                p.and_then(|p| p.tts_fallbacks.as_ref()),
                &base.tts_fallbacks,
                primary(p.and_then(|p| p.tts_provider.as_ref()), &base.tts_provider),
            ),
            s2s: resolve_fallbacks(
                p.and_then(|p| p.s2s_fallbacks.as_ref()),
                &base.s2s_fallbacks,
                primary(p.and_then(|p| p.s2s_provider.as_ref()), &base.s2s_provider),
            ),
        }
    }

    /// Like [`SessionConfig::resolve_pipeline`], for a provider whose service
    /// runs the `hosted` stages itself.
    pub fn resolve_pipeline_for(
        &self,
        base: &Config,
        hosted: HostedStages,
    ) -> Result<ResolvedPipeline, BackendError> {
        let empty = PipelineOverride::default();
        let p = self.pipeline.as_ref().unwrap_or(&empty);
        let resolved = ResolvedPipeline {
            pipeline_type: p.pipeline_type.unwrap_or(base.pipeline_type),
            stt_provider: p.stt_provider.clone().or_else(|| base.stt_provider.clone()),
            tts_provider: p.tts_provider.clone().or_else(|| base.tts_provider.clone()),
            s2s_provider: p.s2s_provider.clone().or_else(|| base.s2s_provider.clone()),
        };
        let mut v = Violations::new();
        check_override_names(&mut v, p);
        let fallbacks = self.resolve_fallbacks(base);
        for (stage, primary, list, given) in [
            (
                "stt",
                &resolved.stt_provider,
                &fallbacks.stt,
                &p.stt_fallbacks,
            ),
            (
                "tts",
                &resolved.tts_provider,
                &fallbacks.tts,
                &p.tts_fallbacks,
            ),
            (
                "s2s",
                &resolved.s2s_provider,
                &fallbacks.s2s,
                &p.s2s_fallbacks,
            ),
        ] {
            // The base's own list was checked with the base.
            if given.is_some() {
                check_fallbacks(&mut v, "pipeline.", stage, primary.as_deref(), list);
            }
        }
        check_pipeline(
            &mut v,
            "pipeline.",
            resolved.pipeline_type,
            resolved.stt_provider.as_deref(),
            resolved.tts_provider.as_deref(),
            resolved.s2s_provider.as_deref(),
            hosted,
        );
        if let Some(o) = &p.interruption {
            o.apply(&base.interruption)
                .check(&mut v, "pipeline.interruption.");
        }
        if let Some(o) = &p.preemptive {
            o.apply(&base.preemptive)
                .check(&mut v, "pipeline.preemptive.");
        }
        v.into_result("session_config.resolve_pipeline")?;
        Ok(resolved)
    }
}
