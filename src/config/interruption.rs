//! The interruption policy: when user speech during a reply counts as an
//! interruption, how the reply ducks while that is decided, and when a
//! reply cut by speech that said nothing resumes.
//!
//! The TOML and the rules are on [`InterruptionConfig`].

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Violations;

/// Default [`InterruptionConfig::min_duration`]: 500 ms (LiveKit Agents'
/// `min_interruption_duration`).
pub const DEFAULT_MIN_INTERRUPTION_DURATION: Duration = Duration::from_millis(500);
/// Largest allowed [`InterruptionConfig::min_duration`]: 10 s.
pub const MAX_MIN_INTERRUPTION_DURATION: Duration = Duration::from_secs(10);
/// Default [`InterruptionConfig::min_words`]: 0 (LiveKit Agents'
/// `min_interruption_words`).
pub const DEFAULT_MIN_INTERRUPTION_WORDS: u32 = 0;
/// Largest allowed [`InterruptionConfig::min_words`]: 50.
pub const MAX_MIN_INTERRUPTION_WORDS: u32 = 50;
/// Default [`InterruptionConfig::false_interruption_timeout`]: 2 s (LiveKit
/// Agents' `false_interruption_timeout`).
pub const DEFAULT_FALSE_INTERRUPTION_TIMEOUT: Duration = Duration::from_secs(2);
/// Smallest allowed [`InterruptionConfig::false_interruption_timeout`]: 100 ms.
pub const MIN_FALSE_INTERRUPTION_TIMEOUT: Duration = Duration::from_millis(100);
/// Largest allowed [`InterruptionConfig::false_interruption_timeout`]: 30 s.
pub const MAX_FALSE_INTERRUPTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`InterruptionConfig::duck_gain_db`]: -12 dB.
pub const DEFAULT_DUCK_GAIN_DB: i32 = -12;
/// Lowest allowed [`InterruptionConfig::duck_gain_db`]: -60 dB.
pub const MIN_DUCK_GAIN_DB: i32 = -60;
/// Default [`InterruptionConfig::language`]: `en`.
pub const DEFAULT_BACKCHANNEL_LANGUAGE: &str = "en";

/// The English backchannels: words and phrases that alone never interrupt a
/// reply (compared without case and punctuation).
pub const DEFAULT_ENGLISH_BACKCHANNELS: &[&str] = &[
    "yeah",
    "yes",
    "yep",
    "yup",
    "uh-huh",
    "uh huh",
    "mm-hmm",
    "mhm",
    "mm",
    "hmm",
    "uh",
    "um",
    "ok",
    "okay",
    "right",
    "sure",
    "alright",
    "all right",
    "i see",
    "got it",
    "oh",
    "ah",
    "cool",
    "nice",
    "great",
    "true",
    "exactly",
    "indeed",
];

/// How a reply sounds while user speech is being judged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Duck {
    /// Played on, lowered by [`InterruptionConfig::duck_gain_db`] (the default).
    #[default]
    Gain,
    /// Paused, and played on from where it stopped if the speech does not
    /// interrupt.
    Pause,
}

/// When user speech during a reply interrupts it (`[interruption]`, opt-in).
///
/// ```toml
/// [interruption]
/// enabled = true                       # opt in; false (the default): any speech onset cuts the reply at once
/// min_duration = "500ms"               # speech needed before it interrupts
/// min_words = 0                        # words needed too (when a transcript is available)
/// false_interruption_timeout = "2s"    # no words this long after the speech: resume
/// resume = true                        # resume a false interruption (false: stay cut)
/// duck = "gain"                        # "gain" (lowered by duck_gain_db) or "pause"
/// duck_gain_db = -12
/// language = "en"                      # which backchannel list applies
///
/// [interruption.backchannels]          # replaces a language's list
/// fr = ["oui", "ouais", "d'accord", "hum"]
///
/// [interruption.extra_backchannels]    # extends a language's list
/// en = ["yup", "for sure"]
/// ```
///
/// A session may override any of these under its pipeline override
/// (`[pipeline.interruption]`): what it sets replaces the backend's value.
///
/// Speech that starts while a reply is produced or played is judged:
///
/// 1. the reply ducks ([`Duck`]);
/// 2. once the speech has lasted `min_duration` (and, with a transcript,
///    said `min_words` words that are not all backchannels) it interrupts:
///    the reply stops where it is ([`SessionEvent::Interrupted`]), the rest
///    of it kept;
/// 3. if words come (the transcript holds a word that is not a
///    backchannel), the interruption stands and the rest is dropped; if none
///    come within `false_interruption_timeout` of the end of the speech (or
///    the turn's final transcript is empty or only backchannels), the reply
///    resumes where it stopped ([`SessionEvent::Resumed`]);
/// 4. speech that ends before it interrupts un-ducks the reply and is not
///    answered as a turn.
///
/// Without a transcript (a speech-to-speech model, a service that ends turns
/// itself), only the duration counts and an interruption always stands.
///
/// [`SessionEvent::Interrupted`]: crate::session::events::SessionEvent::Interrupted
/// [`SessionEvent::Resumed`]: crate::session::events::SessionEvent::Resumed
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InterruptionConfig {
    /// Whether speech is judged (default false: opt in). When false, any
    /// speech onset during a reply cuts it at once, for good (barge-in).
    #[serde(default)]
    pub enabled: bool,
    /// Speech needed before it interrupts (audio clock); 0..=10s, default 500ms.
    #[serde(default = "default_min_duration", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub min_duration: Duration,
    /// Words the transcript must hold before speech interrupts, when there
    /// is a transcript; 0..=50, default 0 (the duration alone decides).
    #[serde(default = "default_min_words")]
    pub min_words: u32,
    /// How long after the interrupting speech ends words may take to come
    /// before the interruption counts as false; 100ms..=30s, default 2s.
    #[serde(default = "default_false_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub false_interruption_timeout: Duration,
    /// Whether a false interruption resumes the reply where it stopped
    /// (default true); when false it stays cut.
    #[serde(default = "default_true")]
    pub resume: bool,
    /// How the reply sounds while speech is judged (default `gain`).
    #[serde(default)]
    pub duck: Duck,
    /// The gain of a ducked reply, in dB; -60..=0, default -12.
    #[serde(default = "default_duck_gain_db")]
    pub duck_gain_db: i32,
    /// The language whose backchannel list applies (default `en`).
    #[serde(default = "default_language")]
    pub language: String,
    /// Backchannel lists by language code, each replacing that language's
    /// list (English has [`DEFAULT_ENGLISH_BACKCHANNELS`], other languages
    /// none until given one).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub backchannels: BTreeMap<String, Vec<String>>,
    /// Backchannels added to a language's list, by language code.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_backchannels: BTreeMap<String, Vec<String>>,
}

impl Default for InterruptionConfig {
    fn default() -> Self {
        InterruptionConfig {
            enabled: false,
            min_duration: DEFAULT_MIN_INTERRUPTION_DURATION,
            min_words: DEFAULT_MIN_INTERRUPTION_WORDS,
            false_interruption_timeout: DEFAULT_FALSE_INTERRUPTION_TIMEOUT,
            resume: true,
            duck: Duck::Gain,
            duck_gain_db: DEFAULT_DUCK_GAIN_DB,
            language: DEFAULT_BACKCHANNEL_LANGUAGE.to_owned(),
            backchannels: BTreeMap::new(),
            extra_backchannels: BTreeMap::new(),
        }
    }
}

/// A session's changes to the backend's [`InterruptionConfig`]
/// (`[pipeline.interruption]`): each field set replaces the backend's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InterruptionOverride {
    /// Replaces [`InterruptionConfig::enabled`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Replaces [`InterruptionConfig::min_duration`].
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    #[schemars(with = "Option<String>")]
    pub min_duration: Option<Duration>,
    /// Replaces [`InterruptionConfig::min_words`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_words: Option<u32>,
    /// Replaces [`InterruptionConfig::false_interruption_timeout`].
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    #[schemars(with = "Option<String>")]
    pub false_interruption_timeout: Option<Duration>,
    /// Replaces [`InterruptionConfig::resume`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<bool>,
    /// Replaces [`InterruptionConfig::duck`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duck: Option<Duck>,
    /// Replaces [`InterruptionConfig::duck_gain_db`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duck_gain_db: Option<i32>,
    /// Replaces [`InterruptionConfig::language`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Lists replacing the backend's, by language code (the other languages
    /// keep the backend's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub backchannels: BTreeMap<String, Vec<String>>,
    /// Backchannels added, by language code, on top of the backend's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_backchannels: BTreeMap<String, Vec<String>>,
}

impl InterruptionOverride {
    /// `base` with this override's changes.
    pub fn apply(&self, base: &InterruptionConfig) -> InterruptionConfig {
        let mut out = base.clone();
        if let Some(v) = self.enabled {
            out.enabled = v;
        }
        if let Some(v) = self.min_duration {
            out.min_duration = v;
        }
        if let Some(v) = self.min_words {
            out.min_words = v;
        }
        if let Some(v) = self.false_interruption_timeout {
            out.false_interruption_timeout = v;
        }
        if let Some(v) = self.resume {
            out.resume = v;
        }
        if let Some(v) = self.duck {
            out.duck = v;
        }
        if let Some(v) = self.duck_gain_db {
            out.duck_gain_db = v;
        }
        if let Some(v) = &self.language {
            out.language = v.clone();
        }
        for (lang, list) in &self.backchannels {
            out.backchannels.insert(lang.clone(), list.clone());
        }
        for (lang, list) in &self.extra_backchannels {
            out.extra_backchannels
                .entry(lang.clone())
                .or_default()
                .extend(list.iter().cloned());
        }
        out
    }
}

impl InterruptionConfig {
    /// Whether this is the default policy (left out when a config is saved).
    pub fn is_default(&self) -> bool {
        *self == InterruptionConfig::default()
    }

    /// The backchannels of [`InterruptionConfig::language`]: its list
    /// (given, or the English default), then the extra ones.
    pub fn backchannel_list(&self) -> Vec<String> {
        let lang = self.language.as_str();
        let mut list: Vec<String> = match self.backchannels.get(lang) {
            Some(given) => given.clone(),
            None if lang.eq_ignore_ascii_case(DEFAULT_BACKCHANNEL_LANGUAGE) => {
                DEFAULT_ENGLISH_BACKCHANNELS
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect()
            }
            None => Vec::new(),
        };
        if let Some(extra) = self.extra_backchannels.get(lang) {
            list.extend(extra.iter().cloned());
        }
        list
    }

    /// Whether every value is in range, decided without allocating (the
    /// quick check of [`super::Config::validate`]).
    #[inline]
    pub(crate) fn plainly_valid(&self) -> bool {
        self.min_duration <= MAX_MIN_INTERRUPTION_DURATION
            && self.min_words <= MAX_MIN_INTERRUPTION_WORDS
            && self.false_interruption_timeout >= MIN_FALSE_INTERRUPTION_TIMEOUT
            && self.false_interruption_timeout <= MAX_FALSE_INTERRUPTION_TIMEOUT
            && (MIN_DUCK_GAIN_DB..=0).contains(&self.duck_gain_db)
            && !self.language.trim().is_empty()
            && self.backchannels.is_empty()
            && self.extra_backchannels.is_empty()
    }

    /// Every out-of-range value, each at `prefix` + its field
    /// (`interruption.min_duration`).
    pub(crate) fn check(&self, v: &mut Violations, prefix: &str) {
        let ms = |d: Duration| humantime::format_duration(d).to_string();
        if self.min_duration > MAX_MIN_INTERRUPTION_DURATION {
            v.push(
                format!("{prefix}min_duration"),
                format!(
                    "{} is out of range 0s..={}",
                    ms(self.min_duration),
                    ms(MAX_MIN_INTERRUPTION_DURATION)
                ),
            );
        }
        if self.min_words > MAX_MIN_INTERRUPTION_WORDS {
            v.push(
                format!("{prefix}min_words"),
                format!(
                    "{} is out of range 0..={MAX_MIN_INTERRUPTION_WORDS}",
                    self.min_words
                ),
            );
        }
        let t = self.false_interruption_timeout;
        if !(MIN_FALSE_INTERRUPTION_TIMEOUT..=MAX_FALSE_INTERRUPTION_TIMEOUT).contains(&t) {
            v.push(
                format!("{prefix}false_interruption_timeout"),
                format!(
                    "{} is out of range {}..={}",
                    ms(t),
                    ms(MIN_FALSE_INTERRUPTION_TIMEOUT),
                    ms(MAX_FALSE_INTERRUPTION_TIMEOUT)
                ),
            );
        }
        if !(MIN_DUCK_GAIN_DB..=0).contains(&self.duck_gain_db) {
            v.push(
                format!("{prefix}duck_gain_db"),
                format!(
                    "{} is out of range {MIN_DUCK_GAIN_DB}..=0 (dB)",
                    self.duck_gain_db
                ),
            );
        }
        if self.language.trim().is_empty() {
            v.push(
                format!("{prefix}language"),
                "must be a language code, such as \"en\"",
            );
        }
        for (key, lists) in [
            ("backchannels", &self.backchannels),
            ("extra_backchannels", &self.extra_backchannels),
        ] {
            for (lang, list) in lists {
                if lang.trim().is_empty() {
                    v.push(format!("{prefix}{key}"), "a language code is empty");
                }
                for (i, word) in list.iter().enumerate() {
                    if !word.chars().any(char::is_alphanumeric) {
                        v.push(
                            format!("{prefix}{key}.{lang}[{i}]"),
                            "must hold a word (letters or digits)",
                        );
                    }
                }
            }
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_min_duration() -> Duration {
    DEFAULT_MIN_INTERRUPTION_DURATION
}
fn default_min_words() -> u32 {
    DEFAULT_MIN_INTERRUPTION_WORDS
}
fn default_false_timeout() -> Duration {
    DEFAULT_FALSE_INTERRUPTION_TIMEOUT
}
fn default_duck_gain_db() -> i32 {
    DEFAULT_DUCK_GAIN_DB
}
fn default_language() -> String {
    DEFAULT_BACKCHANNEL_LANGUAGE.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn english_list_is_the_default_and_lists_replace_or_extend() {
        let mut c = InterruptionConfig::default();
        assert!(c.backchannel_list().iter().any(|w| w == "uh-huh"));
        c.extra_backchannels
            .insert("en".into(), vec!["yup yup".into()]);
        assert!(c.backchannel_list().iter().any(|w| w == "yup yup"));
        c.backchannels.insert("en".into(), vec!["da".into()]);
        assert_eq!(c.backchannel_list(), vec!["da", "yup yup"]);
        c.language = "fr".into();
        assert!(c.backchannel_list().is_empty());
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let c = InterruptionConfig {
            min_duration: Duration::from_secs(11),
            min_words: 51,
            false_interruption_timeout: Duration::from_millis(10),
            duck_gain_db: 3,
            language: " ".into(),
            backchannels: [("fr".to_owned(), vec!["…".to_owned()])].into(),
            ..InterruptionConfig::default()
        };
        assert!(!c.plainly_valid());
        let mut v = Violations::new();
        c.check(&mut v, "interruption.");
        let paths: Vec<&str> = v.iter().map(|x| x.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "interruption.min_duration",
                "interruption.min_words",
                "interruption.false_interruption_timeout",
                "interruption.duck_gain_db",
                "interruption.language",
                "interruption.backchannels.fr[0]",
            ]
        );
        let mut v = Violations::new();
        InterruptionConfig::default().check(&mut v, "interruption.");
        assert!(v.is_empty());
        assert!(InterruptionConfig::default().plainly_valid());
    }

    #[test]
    fn an_override_replaces_what_it_sets() {
        let base = InterruptionConfig::default();
        let o = InterruptionOverride {
            min_words: Some(2),
            duck: Some(Duck::Pause),
            extra_backchannels: [("en".to_owned(), vec!["yup".to_owned()])].into(),
            ..Default::default()
        };
        let c = o.apply(&base);
        assert_eq!(c.min_words, 2);
        assert_eq!(c.duck, Duck::Pause);
        assert_eq!(c.min_duration, base.min_duration);
        assert_eq!(c.extra_backchannels["en"], vec!["yup"]);
    }
}
