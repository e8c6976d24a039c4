//! Failover of the speech components: how long a component may take before
//! the next of its fallback list takes the turn, and how often one marked
//! down is probed.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Violations;

/// Default [`FailoverConfig::timeout`]: 3 s.
pub const DEFAULT_FAILOVER_TIMEOUT: Duration = Duration::from_secs(3);
/// Smallest allowed [`FailoverConfig::timeout`]: 50 ms.
pub const MIN_FAILOVER_TIMEOUT: Duration = Duration::from_millis(50);
/// Largest allowed [`FailoverConfig::timeout`]: 60 s.
pub const MAX_FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`FailoverConfig::probe_interval`]: 5 s.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Default [`FailoverConfig::max_probe_interval`]: 60 s.
pub const DEFAULT_MAX_PROBE_INTERVAL: Duration = Duration::from_secs(60);
/// Smallest allowed probe interval: 10 ms.
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// Largest allowed probe interval: 1 h.
pub const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(3600);

/// How the speech components fail over (`[failover]`), for the stages with a
/// fallback list (`stt_fallbacks`, `tts_fallbacks`, `s2s_fallbacks`).
///
/// A component that errors, or gives no result within `timeout` (the final
/// transcript after the user's turn ended, the first audio of a synthesis, the
/// first reply of a speech-to-speech model), hands the turn to the next one of
/// its list and is marked down. A component marked down is probed after
/// `probe_interval` (its `health` check, then a tiny recognition or
/// synthesis); each failed probe doubles the wait, up to
/// `max_probe_interval`. Once a probe passes, turns go to it again.
///
/// A provider's connection with fallback endpoints (`fallback_urls` of
/// `pipecat` and `vocode`) fails over by the same section: `timeout` bounds
/// each endpoint's handshake, and an endpoint that failed is tried last for
/// `probe_interval` (then first again, or as soon as the backend's health
/// check finds it answering).
///
/// ```toml
/// stt_provider = "cloud-stt"
/// stt_fallbacks = ["pocketsphinx"]
///
/// [failover]
/// timeout = "2s"
/// probe_interval = "5s"
/// max_probe_interval = "1m"
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverConfig {
    /// How long a component may take to give its first result before the
    /// next takes the turn; 50ms..=60s, default 3s.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Wait before the first health probe of a component marked down;
    /// 10ms..=1h, default 5s.
    #[serde(default = "default_probe_interval", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub probe_interval: Duration,
    /// The longest wait between probes (each failed probe doubles the wait);
    /// at least `probe_interval`, at most 1h; default 60s.
    #[serde(default = "default_max_probe_interval", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_probe_interval: Duration,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            timeout: DEFAULT_FAILOVER_TIMEOUT,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            max_probe_interval: DEFAULT_MAX_PROBE_INTERVAL,
        }
    }
}

impl FailoverConfig {
    /// Whether every value is the default (the section is then not written).
    pub fn is_default(&self) -> bool {
        *self == FailoverConfig::default()
    }

    /// Every rule this section breaks, with paths under `failover.`.
    pub(crate) fn check(&self, v: &mut Violations) {
        let range = |v: &mut Violations, path: &str, d: Duration, min: Duration, max: Duration| {
            if d < min || d > max {
                v.push(
                    path,
                    format!(
                        "{} is out of range {}..={}",
                        humantime::format_duration(d),
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                );
            }
        };
        range(
            v,
            "failover.timeout",
            self.timeout,
            MIN_FAILOVER_TIMEOUT,
            MAX_FAILOVER_TIMEOUT,
        );
        range(
            v,
            "failover.probe_interval",
            self.probe_interval,
            MIN_PROBE_INTERVAL,
            MAX_PROBE_INTERVAL,
        );
        range(
            v,
            "failover.max_probe_interval",
            self.max_probe_interval,
            MIN_PROBE_INTERVAL,
            MAX_PROBE_INTERVAL,
        );
        if self.max_probe_interval < self.probe_interval {
            v.push(
                "failover.max_probe_interval",
                format!(
                    "{} is shorter than probe_interval {}",
                    humantime::format_duration(self.max_probe_interval),
                    humantime::format_duration(self.probe_interval)
                ),
            );
        }
    }

    /// Whether [`FailoverConfig::check`] finds nothing, without allocating.
    pub(crate) fn plainly_valid(&self) -> bool {
        let within = |d: Duration, min: Duration, max: Duration| d >= min && d <= max;
        within(self.timeout, MIN_FAILOVER_TIMEOUT, MAX_FAILOVER_TIMEOUT)
            && within(self.probe_interval, MIN_PROBE_INTERVAL, MAX_PROBE_INTERVAL)
            && within(
                self.max_probe_interval,
                MIN_PROBE_INTERVAL,
                MAX_PROBE_INTERVAL,
            )
            && self.max_probe_interval >= self.probe_interval
    }
}

/// Checks one stage's fallback list: names well formed, none repeated (nor
/// the primary), and a primary to fall back from. `prefix` is `""` for a
/// backend's config, `"pipeline."` for a session's override; `stage` is
/// `stt`, `tts` or `s2s`.
pub(crate) fn check_fallbacks(
    v: &mut Violations,
    prefix: &str,
    stage: &str,
    primary: Option<&str>,
    fallbacks: &[String],
) {
    if fallbacks.is_empty() {
        return;
    }
    if primary.is_none() {
        v.push(
            format!("{prefix}{stage}_fallbacks"),
            format!("a fallback list needs {stage}_provider, the component it falls back from"),
        );
    }
    for (i, name) in fallbacks.iter().enumerate() {
        let path = format!("{prefix}{stage}_fallbacks[{i}]");
        if name.trim().is_empty() {
            v.push(path, "must be non-empty");
            continue;
        }
        if name.trim() != name {
            v.push(
                path,
                format!(
                    "{} has leading or trailing whitespace",
                    super::secret::quoted(name)
                ),
            );
            continue;
        }
        let shown = super::secret::quoted(name);
        if primary == Some(name.as_str()) {
            v.push(path, format!("{shown} is {stage}_provider already"));
        } else if let Some(first) = fallbacks[..i].iter().position(|n| n == name) {
            v.push(
                path,
                format!("{shown} is listed twice (also {stage}_fallbacks[{first}])"),
            );
        }
    }
}

/// Whether [`check_fallbacks`] finds nothing, without allocating.
pub(crate) fn plain_fallbacks(primary: Option<&str>, fallbacks: &[String]) -> bool {
    fallbacks.is_empty()
        || (primary.is_some()
            && fallbacks.iter().enumerate().all(|(i, n)| {
                !n.is_empty()
                    && n.trim() == n
                    && primary != Some(n.as_str())
                    && !fallbacks[..i].contains(n)
            }))
}

fn default_timeout() -> Duration {
    DEFAULT_FAILOVER_TIMEOUT
}
fn default_probe_interval() -> Duration {
    DEFAULT_PROBE_INTERVAL
}
fn default_max_probe_interval() -> Duration {
    DEFAULT_MAX_PROBE_INTERVAL
}
