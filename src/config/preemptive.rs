//! The preemptive reply (`[preemptive]`, opt-in): see [`PreemptiveConfig`].

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Violations;

/// Default [`PreemptiveConfig::stable_for`]: 400 ms, longer than the pause
/// between two words of running speech, so that a partial that grows a word
/// at a time does not start attempts on every prefix of the sentence (in
/// `benches/preemptive.rs`, 200 ms had 3 of 40 replies used, 400 ms 34).
pub const DEFAULT_PREEMPTIVE_STABLE_FOR: Duration = Duration::from_millis(400);
/// Largest allowed [`PreemptiveConfig::stable_for`]: 5 s.
pub const MAX_PREEMPTIVE_STABLE_FOR: Duration = Duration::from_secs(5);
/// Default [`PreemptiveConfig::min_words`]: 2.
pub const DEFAULT_PREEMPTIVE_MIN_WORDS: u32 = 2;
/// Largest allowed [`PreemptiveConfig::min_words`]: 50.
pub const MAX_PREEMPTIVE_MIN_WORDS: u32 = 50;
/// Default [`PreemptiveConfig::max_attempts`]: 3.
pub const DEFAULT_PREEMPTIVE_MAX_ATTEMPTS: u32 = 3;
/// Largest allowed [`PreemptiveConfig::max_attempts`]: 10.
pub const MAX_PREEMPTIVE_MAX_ATTEMPTS: u32 = 10;

/// The preemptive reply (opt-in): the agent starts answering a turn on a
/// stable partial transcript, before the turn's final transcript comes.
///
/// ```toml
/// [preemptive]
/// enabled = true        # default false
/// stable_for = "400ms"  # how long a partial's words must stay unchanged
/// min_words = 2         # words a partial must hold before it is used
/// max_attempts = 3      # preemptive replies a turn may start
/// ```
///
/// A session may override any of these under its pipeline override
/// (`[pipeline.preemptive]` of a [`SessionConfig`](super::SessionConfig)):
/// what it sets replaces the backend's value, the rest is the backend's.
///
/// What happens to a preemptive reply:
///
/// - while the user's turn is still open (no reply in flight), once a
///   partial transcript's words (compared without case and punctuation) have
///   stayed the same for `stable_for` and hold at least `min_words` words,
///   the agent is asked to answer that partial, and its reply is produced
///   (text, then speech synthesis) but **held**: no `agent_text` event, no
///   audio to the user, nothing added to the conversation history.
///   The agent is asked with the text of the latest partial with those
///   words;
/// - when the turn's final transcript comes and its words equal the
///   partial's, what was held is released at once and the reply carries on
///   streaming as any reply does (the turn joins the conversation history
///   under the final transcript's text); the turn's latency event then holds
///   `preemptive` (`preemptive_ms`): how much earlier the agent was started
///   than the final transcript arrived;
/// - otherwise (the final differs, or is empty) the preemptive reply is
///   dropped, as a barge-in drops a reply, and the turn is answered on its
///   final transcript as usual;
/// - a partial whose words differ from the ones being answered drops the
///   attempt at once (the user said more), and the new words are watched
///   in turn: a turn may start up to `max_attempts` preemptive replies, one
///   at a time (partials that grow a word at a time stand about as long as
///   the pause between two words, so the first stable partial is often a
///   prefix of the sentence); past that, the turn is answered on its final
///   transcript;
/// - a barge-in, a text turn or a turn given up on drops it too.
///
/// Outcomes are counted in `pipeline_preemptive_replies_total{outcome="used"}`
/// and `{outcome="dropped"}`.
///
/// **The agent is called more than once for a turn whose preemptive reply
/// is dropped** (once per attempt, once with the final transcript): an
/// agent with side effects (a booking, a payment, a tool call that changes
/// something) sees both calls. Leave this off for such agents, or make their
/// side effects wait for the reply to be used. Speech synthesis is also
/// spent on a dropped reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PreemptiveConfig {
    /// Whether preemptive replies are made (default false). Note that the
    /// agent is called twice for a turn whose preemptive reply is dropped.
    #[serde(default)]
    pub enabled: bool,
    /// How long a partial transcript's words must stay unchanged before the
    /// agent is started on it (session task's clock); 0..=5s, default 400ms.
    /// 0 starts on the first partial that holds `min_words` words.
    #[serde(default = "default_stable_for", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub stable_for: Duration,
    /// Words a partial must hold before the agent is started on it;
    /// 1..=50, default 2.
    #[serde(default = "default_min_words")]
    pub min_words: u32,
    /// Preemptive replies one turn may start, one after another as its
    /// partials change; 1..=10, default 3. Each dropped one is an agent
    /// call (and synthesis) spent.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

impl Default for PreemptiveConfig {
    fn default() -> Self {
        PreemptiveConfig {
            enabled: false,
            stable_for: DEFAULT_PREEMPTIVE_STABLE_FOR,
            min_words: DEFAULT_PREEMPTIVE_MIN_WORDS,
            max_attempts: DEFAULT_PREEMPTIVE_MAX_ATTEMPTS,
        }
    }
}

/// A session's changes to [`PreemptiveConfig`] (`[pipeline.preemptive]`):
/// each field set replaces the backend's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PreemptiveOverride {
    /// Replaces [`PreemptiveConfig::enabled`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Replaces [`PreemptiveConfig::stable_for`].
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    #[schemars(with = "Option<String>")]
    pub stable_for: Option<Duration>,
    /// Replaces [`PreemptiveConfig::min_words`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_words: Option<u32>,
    /// Replaces [`PreemptiveConfig::max_attempts`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

impl PreemptiveOverride {
    /// `base` with this override's changes.
    pub fn apply(&self, base: &PreemptiveConfig) -> PreemptiveConfig {
        let mut out = base.clone();
        if let Some(v) = self.enabled {
            out.enabled = v;
        }
        if let Some(v) = self.stable_for {
            out.stable_for = v;
        }
        if let Some(v) = self.min_words {
            out.min_words = v;
        }
        if let Some(v) = self.max_attempts {
            out.max_attempts = v;
        }
        out
    }
}

impl PreemptiveConfig {
    /// Whether this is the default (off) policy.
    pub fn is_default(&self) -> bool {
        *self == PreemptiveConfig::default()
    }

    /// Whether [`PreemptiveConfig::check`] would find nothing wrong.
    #[inline]
    pub(crate) fn plainly_valid(&self) -> bool {
        self.stable_for <= MAX_PREEMPTIVE_STABLE_FOR
            && (1..=MAX_PREEMPTIVE_MIN_WORDS).contains(&self.min_words)
            && (1..=MAX_PREEMPTIVE_MAX_ATTEMPTS).contains(&self.max_attempts)
    }

    /// Reports what is out of range, at `{prefix}{field}`.
    pub(crate) fn check(&self, v: &mut Violations, prefix: &str) {
        if self.stable_for > MAX_PREEMPTIVE_STABLE_FOR {
            v.push(
                format!("{prefix}stable_for"),
                format!(
                    "{} is out of range 0s..={}",
                    humantime::format_duration(self.stable_for),
                    humantime::format_duration(MAX_PREEMPTIVE_STABLE_FOR)
                ),
            );
        }
        if !(1..=MAX_PREEMPTIVE_MIN_WORDS).contains(&self.min_words) {
            v.push(
                format!("{prefix}min_words"),
                format!(
                    "{} is out of range 1..={MAX_PREEMPTIVE_MIN_WORDS}",
                    self.min_words
                ),
            );
        }
        if !(1..=MAX_PREEMPTIVE_MAX_ATTEMPTS).contains(&self.max_attempts) {
            v.push(
                format!("{prefix}max_attempts"),
                format!(
                    "{} is out of range 1..={MAX_PREEMPTIVE_MAX_ATTEMPTS}",
                    self.max_attempts
                ),
            );
        }
    }
}

fn default_stable_for() -> Duration {
    DEFAULT_PREEMPTIVE_STABLE_FOR
}
fn default_min_words() -> u32 {
    DEFAULT_PREEMPTIVE_MIN_WORDS
}
fn default_max_attempts() -> u32 {
    DEFAULT_PREEMPTIVE_MAX_ATTEMPTS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, PipelineOverride, SessionConfig};

    fn violations(c: &PreemptiveConfig) -> Vec<String> {
        let mut v = Violations::new();
        c.check(&mut v, "preemptive.");
        v.iter().map(|x| x.path.clone()).collect()
    }

    #[test]
    fn off_by_default_and_the_default_is_valid() {
        let c = PreemptiveConfig::default();
        assert!(!c.enabled);
        assert!(c.is_default());
        assert!(c.plainly_valid());
        assert!(violations(&c).is_empty());
        let parsed: PreemptiveConfig = toml::from_str("").unwrap();
        assert_eq!(parsed, c);
    }

    #[test]
    fn out_of_range_fields_are_reported_at_their_paths() {
        let c = PreemptiveConfig {
            enabled: true,
            stable_for: Duration::from_secs(6),
            min_words: 0,
            max_attempts: 0,
        };
        assert!(!c.plainly_valid());
        assert_eq!(
            violations(&c),
            vec![
                "preemptive.stable_for",
                "preemptive.min_words",
                "preemptive.max_attempts"
            ]
        );
        let c = PreemptiveConfig {
            max_attempts: MAX_PREEMPTIVE_MAX_ATTEMPTS + 1,
            ..PreemptiveConfig::default()
        };
        assert!(!c.plainly_valid());
        assert_eq!(violations(&c), vec!["preemptive.max_attempts"]);
        let c = PreemptiveConfig {
            min_words: MAX_PREEMPTIVE_MIN_WORDS + 1,
            ..PreemptiveConfig::default()
        };
        assert_eq!(violations(&c), vec!["preemptive.min_words"]);
        let c = PreemptiveConfig {
            stable_for: Duration::ZERO,
            min_words: MAX_PREEMPTIVE_MIN_WORDS,
            ..PreemptiveConfig::default()
        };
        assert!(c.plainly_valid());
        assert!(violations(&c).is_empty());
    }

    #[test]
    fn the_config_and_a_session_override_are_validated() {
        let mut config = Config::new("local");
        config.preemptive.min_words = 0;
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("preemptive.min_words"), "{err}");

        let config = Config::new("local");
        let mut session = SessionConfig::new("u");
        session.pipeline = Some(PipelineOverride {
            preemptive: Some(PreemptiveOverride {
                enabled: Some(true),
                stable_for: Some(Duration::from_secs(60)),
                ..Default::default()
            }),
            ..Default::default()
        });
        let err = session.resolve_pipeline(&config).unwrap_err();
        assert!(
            err.to_string().contains("pipeline.preemptive.stable_for"),
            "{err}"
        );
    }

    #[test]
    fn toml_sections_parse_and_overrides_apply() {
        let c: PreemptiveConfig =
            toml::from_str("enabled = true\nstable_for = \"350ms\"\nmin_words = 3").unwrap();
        assert_eq!(
            c,
            PreemptiveConfig {
                enabled: true,
                stable_for: Duration::from_millis(350),
                min_words: 3,
                max_attempts: DEFAULT_PREEMPTIVE_MAX_ATTEMPTS,
            }
        );
        assert!(toml::from_str::<PreemptiveConfig>("stable = \"1s\"").is_err());
        let o = PreemptiveOverride {
            min_words: Some(1),
            ..Default::default()
        };
        let applied = o.apply(&c);
        assert_eq!(applied.min_words, 1);
        assert_eq!(applied.stable_for, Duration::from_millis(350));
        assert!(applied.enabled);
    }

    #[test]
    fn an_environment_variable_replaces_the_section() {
        let c = Config::from_env_vars(
            "VB",
            [
                ("VB_PROVIDER", "local"),
                (
                    "VB_PREEMPTIVE",
                    r#"{"enabled": true, "stable_for": "300ms"}"#,
                ),
            ],
        )
        .unwrap();
        assert!(c.preemptive.enabled);
        assert_eq!(c.preemptive.stable_for, Duration::from_millis(300));
        assert_eq!(c.preemptive.min_words, DEFAULT_PREEMPTIVE_MIN_WORDS);
        let err = Config::from_env_vars(
            "VB",
            [
                ("VB_PROVIDER", "local"),
                ("VB_PREEMPTIVE", r#"{"min_words": 0}"#),
            ],
        )
        .unwrap_err();
        assert!(err.to_string().contains("preemptive.min_words"), "{err}");
    }
}
