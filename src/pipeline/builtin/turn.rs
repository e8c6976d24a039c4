//! `"silence"`: turn detection by the silence after speech, on the audio clock.
//!
//! The detector sees each frame's [`VadDecision`] and duration. A frame counts
//! as *speech* when the VAD says `speech` **and** its `probability` is at
//! least 0.5; frames a VAD holds in speech only through its hangover (low
//! probability, e.g. [`EnergyVad`](super::EnergyVad)'s) count as silence, so
//! the endpointing delay runs from the end of the actual speech and the VAD's
//! hangover adds no latency.
//!
//! * **Start.** Idle, or after a turn ended, the detector emits
//!   [`TurnSignal::SpeechStarted`] once speech has lasted
//!   [`SilenceTurnOptions::min_speech`] without a break (so a click neither
//!   starts a turn nor barges in on the agent). `SpeechStarted` therefore comes
//!   `min_speech` after the VAD's own onset.
//! * **End.** In a turn, silence is counted from the end of the last speech
//!   burst that lasted `min_speech` (shorter bursts, clicks, do not restart
//!   it). The turn ends ([`TurnSignal::TurnEnded`]) once silence reaches
//!   [`SilenceTurnOptions::min_endpointing_delay`] if the latest transcript
//!   hint ([`TurnDetector::hint_transcript`]) looks complete, that is, it ends
//!   with `.`, `?`, `!`, `…` or their full-width forms, or is empty, or no hint
//!   was given; otherwise once silence reaches
//!   [`SilenceTurnOptions::max_endpointing_delay`].
//!
//! The hint is forgotten when a turn ends and on [`TurnDetector::reset`].

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{OPTIONS_OP, OptionChecks, parse_options};
use crate::error::Result;
use crate::pipeline::{TurnDetector, TurnDetectorFactory, TurnSignal, VadDecision};

/// The name the detector is registered under, and its options section.
pub const NAME: &str = "silence";

/// The VAD probability from which a `speech` frame counts as speech.
const SPEECH_PROBABILITY: f32 = 0.5;

/// Options of the [`SilenceTurnDetector`] (`[components.silence]`).
///
/// ```toml
/// [components.silence]
/// min_endpointing_delay = "500ms"
/// max_endpointing_delay = "3s"
/// min_speech = "100ms"
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SilenceTurnOptions {
    /// Silence that ends a turn whose transcript hint looks complete (or when
    /// there is no hint); default 500ms, at most `max_endpointing_delay`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub min_endpointing_delay: Duration,
    /// Silence that ends a turn whose transcript hint looks unfinished; default
    /// 3s, at most 60s. Shorter than the 6 s some agent frameworks use: without
    /// a semantic model, a long wait mostly adds latency.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_endpointing_delay: Duration,
    /// The shortest unbroken speech that counts: shorter bursts (clicks, taps,
    /// coughs) neither start a turn nor extend one; default 100ms, at most 2s.
    /// A pause the VAD hears between syllables breaks a burst, so values much
    /// above a syllable's length (about 200 ms) may never start a turn on
    /// real speech. The engine keeps this much more audio from before a
    /// turn's start, so recognition still hears its beginning.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub min_speech: Duration,
}

impl Default for SilenceTurnOptions {
    fn default() -> Self {
        SilenceTurnOptions {
            min_endpointing_delay: Duration::from_millis(500),
            max_endpointing_delay: Duration::from_secs(3),
            min_speech: Duration::from_millis(100),
        }
    }
}

impl SilenceTurnOptions {
    /// Parses `[components.silence]` (`null` gives the defaults) and checks it.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::ErrorCode::InvalidConfig) with one `details`
    /// entry per bad field, keyed `components.silence.<field>`; unknown keys are
    /// errors too.
    pub fn from_value(options: &serde_json::Value) -> Result<Self> {
        let options: SilenceTurnOptions = parse_options(OPTIONS_OP, NAME, options)?;
        options.validate()?;
        Ok(options)
    }

    /// Checks the ranges and that `min_endpointing_delay <= max_endpointing_delay`
    /// (reported at `components.silence.min_endpointing_delay`).
    ///
    /// # Errors
    ///
    /// As [`SilenceTurnOptions::from_value`].
    pub fn validate(&self) -> Result<()> {
        let mut c = OptionChecks::new(NAME);
        c.check(
            self.min_endpointing_delay <= self.max_endpointing_delay,
            "min_endpointing_delay",
            || {
                format!(
                    "{} is longer than max_endpointing_delay ({})",
                    humantime::format_duration(self.min_endpointing_delay),
                    humantime::format_duration(self.max_endpointing_delay)
                )
            },
        );
        c.check(
            self.max_endpointing_delay <= Duration::from_secs(60),
            "max_endpointing_delay",
            || {
                format!(
                    "{} is longer than 60s",
                    humantime::format_duration(self.max_endpointing_delay)
                )
            },
        );
        c.check(
            self.min_speech <= Duration::from_secs(2),
            "min_speech",
            || {
                format!(
                    "{} is longer than 2s",
                    humantime::format_duration(self.min_speech)
                )
            },
        );
        c.finish()
    }
}

/// Whether a partial transcript reads like a finished sentence.
fn looks_complete(hint: &str) -> bool {
    let hint = hint.trim_end();
    hint.is_empty() || hint.ends_with(['.', '?', '!', '…', '。', '？', '！'])
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No turn in progress.
    Idle,
    /// The user has the turn.
    InTurn,
}

/// Silence-based turn detection; see the [module documentation](self).
#[derive(Clone, Debug)]
pub struct SilenceTurnDetector {
    options: SilenceTurnOptions,
    state: State,
    /// The current unbroken run of speech frames.
    burst: Duration,
    /// In a turn: time since the last speech burst of at least `min_speech`.
    silence: Duration,
    /// Whether the latest hint looks complete (true without one).
    hint_complete: bool,
    /// The silence that ended the last turn.
    ended_after: Duration,
}

impl SilenceTurnDetector {
    /// A detector with `options` (assumed valid; see [`SilenceTurnOptions::validate`]).
    pub fn new(options: SilenceTurnOptions) -> Self {
        SilenceTurnDetector {
            options,
            state: State::Idle,
            burst: Duration::ZERO,
            silence: Duration::ZERO,
            hint_complete: true,
            ended_after: Duration::ZERO,
        }
    }

    /// Whether a turn is in progress (between `SpeechStarted` and `TurnEnded`).
    pub fn in_turn(&self) -> bool {
        self.state == State::InTurn
    }

    /// The silence that would end the current turn, given the latest hint.
    pub fn endpointing_delay(&self) -> Duration {
        if self.hint_complete {
            self.options.min_endpointing_delay
        } else {
            self.options.max_endpointing_delay
        }
    }

    /// The options in use.
    pub fn options(&self) -> &SilenceTurnOptions {
        &self.options
    }
}

impl Default for SilenceTurnDetector {
    fn default() -> Self {
        SilenceTurnDetector::new(SilenceTurnOptions::default())
    }
}

impl TurnDetector for SilenceTurnDetector {
    fn lookback(&self) -> Duration {
        self.options.min_speech
    }

    fn update(&mut self, vad: &VadDecision, frame_duration: Duration) -> TurnSignal {
        let speech = vad.speech && vad.probability >= SPEECH_PROBABILITY;
        // The burst this frame broke off, if any.
        let broken = if speech {
            self.burst += frame_duration;
            Duration::ZERO
        } else {
            std::mem::take(&mut self.burst)
        };
        let confirmed = speech && self.burst >= self.options.min_speech;
        match self.state {
            State::Idle => {
                if confirmed {
                    self.state = State::InTurn;
                    self.silence = Duration::ZERO;
                    TurnSignal::SpeechStarted
                } else {
                    TurnSignal::Continue
                }
            }
            State::InTurn => {
                if confirmed {
                    self.silence = Duration::ZERO;
                    return TurnSignal::Continue;
                }
                if speech {
                    // A burst that may yet be speech: the turn does not end
                    // while it lasts (the user may be going on).
                    return TurnSignal::Continue;
                }
                // A burst shorter than `min_speech` was a click or a breath:
                // it counts as silence, with this frame.
                if broken < self.options.min_speech {
                    self.silence += broken;
                }
                self.silence += frame_duration;
                if self.silence >= self.endpointing_delay() {
                    self.state = State::Idle;
                    self.ended_after = self.silence;
                    self.silence = Duration::ZERO;
                    self.hint_complete = true;
                    TurnSignal::TurnEnded
                } else {
                    TurnSignal::Continue
                }
            }
        }
    }

    fn endpointing(&self) -> Option<Duration> {
        Some(self.ended_after)
    }

    fn hint_transcript(&mut self, partial: &str) {
        self.hint_complete = looks_complete(partial);
    }

    fn reset(&mut self) {
        *self = SilenceTurnDetector::new(self.options.clone());
    }
}

/// Makes a [`SilenceTurnDetector`] per session from `[components.silence]`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SilenceTurnFactory;

impl TurnDetectorFactory for SilenceTurnFactory {
    fn create(&self, options: &serde_json::Value) -> Result<Box<dyn TurnDetector>> {
        Ok(Box::new(SilenceTurnDetector::new(
            SilenceTurnOptions::from_value(options)?,
        )))
    }
}

crate::register_component!(turn, "silence", SilenceTurnFactory::default);

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Duration = Duration::from_millis(20);

    fn vad(speech: bool, probability: f32) -> VadDecision {
        VadDecision {
            speech,
            probability,
            level_db: if speech { -20.0 } else { -60.0 },
        }
    }

    fn run(d: &mut SilenceTurnDetector, decision: VadDecision, frames: usize) -> Vec<TurnSignal> {
        (0..frames).map(|_| d.update(&decision, FRAME)).collect()
    }

    fn count(signals: &[TurnSignal], s: TurnSignal) -> usize {
        signals.iter().filter(|&&x| x == s).count()
    }

    #[test]
    fn completeness_of_hints() {
        for done in [
            "",
            "  ",
            "Hello.",
            "Really?  ",
            "Stop!",
            "Well…",
            "好。",
            "何？",
        ] {
            assert!(looks_complete(done), "{done:?}");
        }
        for open in ["Hello", "I want to", "e.g", "3.5 and"] {
            assert!(!looks_complete(open), "{open:?}");
        }
    }

    #[test]
    fn speech_starts_after_min_speech_and_hangover_frames_are_silence() {
        let mut d = SilenceTurnDetector::default();
        let s = run(&mut d, vad(true, 0.9), 5);
        assert_eq!(s[..4], [TurnSignal::Continue; 4]);
        assert_eq!(s[4], TurnSignal::SpeechStarted);
        // Speech held by a VAD hangover (low probability) counts as silence:
        // 500 ms of it ends the turn.
        let s = run(&mut d, vad(true, 0.1), 25);
        assert_eq!(s[24], TurnSignal::TurnEnded);
        assert_eq!(count(&s, TurnSignal::TurnEnded), 1);
        assert!(!d.in_turn());
    }

    #[test]
    fn a_click_during_the_silence_does_not_restart_it() {
        let mut d = SilenceTurnDetector::default();
        run(&mut d, vad(true, 0.9), 10);
        let mut s = run(&mut d, vad(false, 0.0), 10);
        s.extend(run(&mut d, vad(true, 0.9), 2)); // 40 ms click
        s.extend(run(&mut d, vad(false, 0.0), 13));
        // 10 + 2 + 13 frames = 500 ms after the speech: the turn ends on time.
        assert_eq!(s.last(), Some(&TurnSignal::TurnEnded));
        assert_eq!(count(&s, TurnSignal::TurnEnded), 1);
    }

    #[test]
    fn real_speech_during_the_silence_restarts_it() {
        let mut d = SilenceTurnDetector::default();
        run(&mut d, vad(true, 0.9), 10);
        let mut s = run(&mut d, vad(false, 0.0), 20);
        s.extend(run(&mut d, vad(true, 0.9), 5));
        s.extend(run(&mut d, vad(false, 0.0), 24));
        assert_eq!(count(&s, TurnSignal::TurnEnded), 0);
        assert_eq!(d.update(&vad(false, 0.0), FRAME), TurnSignal::TurnEnded);
    }

    #[test]
    fn an_incomplete_hint_waits_for_the_max_delay_and_is_forgotten_after() {
        let mut d = SilenceTurnDetector::default();
        run(&mut d, vad(true, 0.9), 10);
        d.hint_transcript("I would like to");
        assert_eq!(d.endpointing_delay(), Duration::from_secs(3));
        let s = run(&mut d, vad(false, 0.0), 150);
        assert_eq!(s[..149], [TurnSignal::Continue; 149]);
        assert_eq!(s[149], TurnSignal::TurnEnded);
        assert_eq!(d.endpointing_delay(), Duration::from_millis(500));
    }

    #[test]
    fn a_hint_completing_late_ends_the_turn_at_once() {
        let mut d = SilenceTurnDetector::default();
        run(&mut d, vad(true, 0.9), 10);
        d.hint_transcript("I would like to");
        let s = run(&mut d, vad(false, 0.0), 40);
        assert_eq!(count(&s, TurnSignal::TurnEnded), 0);
        d.hint_transcript("I would like to go.");
        assert_eq!(d.update(&vad(false, 0.0), FRAME), TurnSignal::TurnEnded);
    }

    #[test]
    fn reset_forgets_the_turn_and_the_hint() {
        let mut d = SilenceTurnDetector::default();
        run(&mut d, vad(true, 0.9), 10);
        d.hint_transcript("and");
        d.reset();
        assert!(!d.in_turn());
        assert_eq!(d.endpointing_delay(), Duration::from_millis(500));
        assert_eq!(
            count(&run(&mut d, vad(false, 0.0), 100), TurnSignal::TurnEnded),
            0
        );
    }

    #[test]
    fn zero_min_speech_starts_on_the_first_speech_frame() {
        let mut d = SilenceTurnDetector::new(SilenceTurnOptions {
            min_speech: Duration::ZERO,
            ..Default::default()
        });
        assert_eq!(d.update(&vad(true, 0.9), FRAME), TurnSignal::SpeechStarted);
    }

    #[test]
    fn options_are_validated() {
        let e = SilenceTurnOptions::from_value(&serde_json::json!({
            "min_endpointing_delay": "4s", "min_speech": "3s"
        }))
        .unwrap_err();
        assert_eq!(e.code, crate::ErrorCode::InvalidConfig);
        assert!(
            e.details["components.silence.min_endpointing_delay"].contains("max_endpointing_delay"),
            "{e:?}"
        );
        assert!(e.details.contains_key("components.silence.min_speech"));
        let ok = SilenceTurnOptions::from_value(&serde_json::json!({
            "min_endpointing_delay": "1s", "max_endpointing_delay": "1s"
        }))
        .unwrap();
        assert_eq!(ok.min_endpointing_delay, ok.max_endpointing_delay);
    }
}
