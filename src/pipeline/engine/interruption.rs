//! Whether user speech during a reply interrupts it: a pure state machine
//! ([`Decider`]) fed the speech's frames, its transcripts, the end of the
//! user's turn and the time, and answering with what the reply should do
//! ([`Step`]). The engine runs it (see `input.rs` and `task.rs`); nothing
//! here waits or touches audio.
//!
//! A candidate interruption starts at a speech onset during a reply:
//!
//! ```text
//!            onset                 enough speech (and words, if asked)
//!   Quiet ──────────> Ducked ───────────────────────────────┬──> Confirmed (cut for good)
//!     ^                 │  enough speech, no words yet,     │
//!     │   turn ended    │  a transcript to wait for         │ words
//!     ├─────────────────┘  v                                │
//!     │               Paused (the reply stopped, kept) ─────┘
//!     │  no words in time, or a final of backchannels
//!     └──────────────────── (Resume; Confirmed when resume = false)
//! ```
//!
//! Speech durations are on the audio clock (the frames' durations); the
//! false-interruption timeout is on the caller's clock (`now`, any
//! monotonic time).

use std::time::Duration;

use crate::config::{Duck, InterruptionConfig};

/// The policy the machine applies, made once per session from its
/// [`InterruptionConfig`].
#[derive(Clone, Debug)]
pub(crate) struct Policy {
    pub(crate) enabled: bool,
    pub(crate) min_duration: Duration,
    pub(crate) min_words: u32,
    pub(crate) false_timeout: Duration,
    pub(crate) resume: bool,
    /// The gain (linear) a ducked reply plays at; `None`: it pauses.
    pub(crate) duck_gain: Option<f32>,
    /// The backchannel phrases, each as its normalized words.
    backchannels: Vec<Vec<String>>,
}

impl Policy {
    pub(crate) fn new(config: &InterruptionConfig) -> Policy {
        Policy {
            enabled: config.enabled,
            min_duration: config.min_duration,
            min_words: config.min_words,
            false_timeout: config.false_interruption_timeout,
            resume: config.resume,
            duck_gain: match config.duck {
                Duck::Gain => Some(10f32.powf(config.duck_gain_db as f32 / 20.0)),
                Duck::Pause => None,
            },
            backchannels: config
                .backchannel_list()
                .iter()
                .map(|p| words(p))
                .filter(|w| !w.is_empty())
                .collect(),
        }
    }

    /// What a transcript says, for the decision.
    pub(crate) fn hear(&self, text: &str) -> Heard {
        let w = words(text);
        if w.is_empty() {
            Heard::Nothing
        } else if self.only_backchannels(&w) {
            Heard::Backchannel
        } else {
            Heard::Words(w.len() as u32)
        }
    }

    /// Whether `w` (not empty) is a run of backchannel phrases.
    fn only_backchannels(&self, w: &[String]) -> bool {
        // reach[i]: the first i words are whole phrases.
        let mut reach = vec![false; w.len() + 1];
        reach[0] = true;
        for i in 0..w.len() {
            if !reach[i] {
                continue;
            }
            for p in &self.backchannels {
                if w[i..].starts_with(p) {
                    reach[i + p.len()] = true;
                }
            }
        }
        reach[w.len()]
    }
}

/// The words of `text`: lower case, split at spaces and hyphens, without
/// the punctuation around them; pieces without a letter or digit dropped.
pub(crate) fn words(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || c == '-' || c == '\u{2010}')
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| w.chars().any(char::is_alphanumeric))
        .collect()
}

/// What the latest transcript of the candidate's speech holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Heard {
    /// No transcript yet, or an empty one.
    Nothing,
    /// Backchannels only ("yeah", "uh-huh").
    Backchannel,
    /// This many words, not all backchannels.
    Words(u32),
}

/// Where the candidate interruption is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// No candidate.
    Quiet,
    /// Speech during the reply, being judged; the reply ducks.
    Ducked,
    /// The speech interrupted: the reply stopped where it was, its rest
    /// kept, until words confirm it or their absence resumes it.
    Paused,
    /// The reply is cut for good; the speech is the user's turn.
    Confirmed,
}

/// What the reply should do after an input to the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Lower (or pause) the reply while the speech is judged.
    Duck,
    /// The speech did not interrupt: the reply plays on as before.
    Unduck,
    /// The speech interrupted: stop the reply where it is, keep its rest.
    Pause,
    /// The paused reply's speech stopped: the false-interruption deadline
    /// ([`Decider::due`]) is set, and whoever keeps the time must look at it.
    Quiet,
    /// Play the reply on from where it stopped (a false interruption).
    Resume,
    /// Cut the reply for good (from any phase); `false_interruption`: it was
    /// paused and no words came, but the policy does not resume.
    Cut { false_interruption: bool },
}

/// What becomes of the user's turn that ends during a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TurnFate {
    /// A turn like any other: answered.
    Answer,
    /// Speech that did not interrupt (a cough, a backchannel): not a turn.
    Swallow,
    /// The reply is paused: the turn's final transcript decides (words: it
    /// is answered and the reply cut; none: the reply resumes).
    Defer,
}

/// The state machine; see the [module documentation](self).
#[derive(Debug)]
pub(crate) struct Decider {
    policy: Policy,
    /// Whether the speech will be transcribed (an STT stage, or a link's
    /// transcripts): words can confirm an interruption or its absence
    /// resume the reply. Without, the duration alone decides and an
    /// interruption is confirmed at once.
    transcribed: bool,
    phase: Phase,
    /// Speech heard in the candidate (audio clock).
    speech: Duration,
    speaking: bool,
    /// When the speech last stopped (caller's clock), while it is stopped.
    quiet_since: Option<Duration>,
    heard: Heard,
    /// The candidate's turn has ended: its final transcript decides.
    turn_over: bool,
}

impl Decider {
    pub(crate) fn new(policy: Policy, transcribed: bool) -> Decider {
        Decider {
            policy,
            transcribed,
            phase: Phase::Quiet,
            speech: Duration::ZERO,
            speaking: false,
            quiet_since: None,
            heard: Heard::Nothing,
            turn_over: false,
        }
    }

    pub(crate) fn policy(&self) -> &Policy {
        &self.policy
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the reply's audio is held back (paused, or ducked by pausing).
    pub(crate) fn holds_audio(&self) -> bool {
        self.phase == Phase::Paused
            || (self.phase == Phase::Ducked && self.policy.duck_gain.is_none())
    }

    /// The gain reply audio plays at now (1 when not ducked).
    pub(crate) fn gain(&self) -> f32 {
        match (self.phase, self.policy.duck_gain) {
            (Phase::Ducked, Some(g)) => g,
            _ => 1.0,
        }
    }

    /// Whether a candidate is being judged (frames and transcripts matter).
    pub(crate) fn deciding(&self) -> bool {
        matches!(self.phase, Phase::Ducked | Phase::Paused)
    }

    /// The user started speaking while a reply is in flight; `already` is
    /// the speech heard before the onset was reported (the turn detector's
    /// lookback). Policy off: [`Step::Cut`] at once.
    pub(crate) fn onset(&mut self, already: Duration) -> Option<Step> {
        if !self.policy.enabled {
            self.phase = Phase::Confirmed;
            return Some(Step::Cut {
                false_interruption: false,
            });
        }
        match self.phase {
            Phase::Quiet | Phase::Confirmed => {
                self.phase = Phase::Ducked;
                self.speech = already;
                self.speaking = true;
                self.quiet_since = None;
                self.heard = Heard::Nothing;
                self.turn_over = false;
                Some(self.judge().unwrap_or(Step::Duck))
            }
            Phase::Ducked | Phase::Paused => {
                // More speech in the same candidate (a new turn while the
                // reply waits on the last one's words).
                self.speaking = true;
                self.quiet_since = None;
                self.turn_over = false;
                self.judge()
            }
        }
    }

    /// One frame of the candidate's audio: speech or not, `frame` long, at `now`.
    pub(crate) fn voice(&mut self, now: Duration, speech: bool, frame: Duration) -> Option<Step> {
        if !self.deciding() {
            return None;
        }
        if speech {
            self.speech += frame;
            self.speaking = true;
            self.quiet_since = None;
        } else if self.speaking {
            self.speaking = false;
            self.quiet_since = Some(now);
            if let Some(step) = self.judge() {
                return Some(step);
            }
            return self.due().map(|_| Step::Quiet);
        }
        self.judge()
    }

    /// A transcript of the candidate's speech (partial or final).
    pub(crate) fn transcript(&mut self, text: &str, is_final: bool) -> Option<Step> {
        if !self.deciding() {
            return None;
        }
        self.heard = self.policy.hear(text);
        if let Some(step) = self.judge() {
            return Some(step);
        }
        if is_final && self.turn_over && self.phase == Phase::Paused {
            // The turn said nothing that interrupts.
            return Some(self.false_interruption());
        }
        None
    }

    /// The user's turn ended at `now`.
    pub(crate) fn turn_ended(&mut self, now: Duration) -> (Option<Step>, TurnFate) {
        match self.phase {
            Phase::Quiet => (None, TurnFate::Answer),
            Phase::Confirmed => {
                self.phase = Phase::Quiet;
                (None, TurnFate::Answer)
            }
            Phase::Ducked => {
                self.phase = Phase::Quiet;
                (Some(Step::Unduck), TurnFate::Swallow)
            }
            Phase::Paused => {
                self.turn_over = true;
                if self.speaking {
                    self.speaking = false;
                    self.quiet_since = Some(now);
                }
                (None, TurnFate::Defer)
            }
        }
    }

    /// When the reply resumes unless words come: the false-interruption
    /// deadline, while paused with the speech over and no final awaited.
    pub(crate) fn due(&self) -> Option<Duration> {
        if self.phase != Phase::Paused || self.turn_over {
            return None;
        }
        self.quiet_since.map(|t| t + self.policy.false_timeout)
    }

    /// The time is `now`: a false interruption once [`Decider::due`] passed.
    pub(crate) fn tick(&mut self, now: Duration) -> Option<Step> {
        match self.due() {
            Some(due) if due <= now => Some(self.false_interruption()),
            _ => None,
        }
    }

    /// The reply is over (played out, cut, replaced): no candidate.
    pub(crate) fn reset(&mut self) {
        self.phase = Phase::Quiet;
        self.turn_over = false;
    }

    fn false_interruption(&mut self) -> Step {
        self.turn_over = false;
        if self.policy.resume {
            self.phase = Phase::Quiet;
            Step::Resume
        } else {
            self.phase = Phase::Confirmed;
            Step::Cut {
                false_interruption: true,
            }
        }
    }

    /// Moves on when the speech heard so far decides; the step, if any.
    fn judge(&mut self) -> Option<Step> {
        let p = &self.policy;
        let long_enough = self.speech >= p.min_duration;
        let words_enough = match self.heard {
            Heard::Words(n) => n >= p.min_words.max(1),
            _ => false,
        };
        match self.phase {
            Phase::Ducked if long_enough && words_enough => self.confirm(),
            Phase::Ducked if long_enough && !self.transcribed => self.confirm(),
            Phase::Ducked if long_enough && p.min_words == 0 && self.heard == Heard::Nothing => {
                self.phase = Phase::Paused;
                Some(Step::Pause)
            }
            Phase::Paused if words_enough => self.confirm(),
            _ => None,
        }
    }

    fn confirm(&mut self) -> Option<Step> {
        self.phase = Phase::Confirmed;
        Some(Step::Cut {
            false_interruption: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FRAME: Duration = Duration::from_millis(20);

    fn policy(min_ms: u64, min_words: u32, resume: bool, pause: bool) -> Policy {
        Policy::new(&InterruptionConfig {
            enabled: true,
            min_duration: Duration::from_millis(min_ms),
            min_words,
            resume,
            duck: if pause { Duck::Pause } else { Duck::Gain },
            ..InterruptionConfig::default()
        })
    }

    #[test]
    fn backchannels_are_recognized_whole_and_in_runs() {
        let p = policy(500, 0, true, false);
        assert_eq!(p.hear("Yeah."), Heard::Backchannel);
        assert_eq!(p.hear("uh-huh, okay"), Heard::Backchannel);
        assert_eq!(p.hear("uh huh"), Heard::Backchannel);
        assert_eq!(p.hear("all right, yeah"), Heard::Backchannel);
        assert_eq!(p.hear("yeah but wait"), Heard::Words(3));
        assert_eq!(p.hear("stop"), Heard::Words(1));
        assert_eq!(p.hear(" ... "), Heard::Nothing);
        assert_eq!(words("Mm-hmm, RIGHT!"), ["mm", "hmm", "right"]);
    }

    #[test]
    fn a_short_burst_ducks_and_is_swallowed() {
        let mut d = Decider::new(policy(500, 0, true, false), true);
        assert_eq!(d.onset(Duration::ZERO), Some(Step::Duck));
        for _ in 0..10 {
            assert_eq!(d.voice(Duration::ZERO, true, FRAME), None);
        }
        assert_eq!(
            d.turn_ended(Duration::ZERO),
            (Some(Step::Unduck), TurnFate::Swallow)
        );
        assert_eq!(d.phase(), Phase::Quiet);
    }

    #[test]
    fn no_words_within_the_timeout_resumes_and_a_final_of_backchannels_at_once() {
        let mut d = Decider::new(policy(100, 0, true, false), true);
        assert_eq!(d.onset(Duration::ZERO), Some(Step::Duck));
        let mut steps = Vec::new();
        for i in 0..6 {
            steps.extend(d.voice(FRAME * i, true, FRAME));
        }
        assert_eq!(steps, [Step::Pause]);
        assert_eq!(
            d.voice(Duration::from_millis(200), false, FRAME),
            Some(Step::Quiet),
            "the clock starts: the task must arm its timer"
        );
        assert_eq!(d.voice(Duration::from_millis(220), false, FRAME), None);
        assert_eq!(d.due(), Some(Duration::from_millis(2200)));
        assert_eq!(d.tick(Duration::from_millis(2199)), None);
        assert_eq!(d.tick(Duration::from_millis(2200)), Some(Step::Resume));

        let mut d = Decider::new(policy(0, 0, true, false), true);
        assert_eq!(d.onset(Duration::ZERO), Some(Step::Pause));
        assert_eq!(d.turn_ended(Duration::ZERO), (None, TurnFate::Defer));
        assert_eq!(d.due(), None, "the final is awaited");
        assert_eq!(d.transcript("mm-hmm", false), None);
        assert_eq!(d.transcript("mm-hmm", true), Some(Step::Resume));
    }

    #[test]
    fn without_a_transcript_the_duration_decides_for_good() {
        let mut d = Decider::new(policy(0, 3, true, false), false);
        assert_eq!(
            d.onset(Duration::ZERO),
            Some(Step::Cut {
                false_interruption: false
            })
        );
        let mut d = Decider::new(
            Policy {
                enabled: false,
                ..policy(500, 0, true, false)
            },
            true,
        );
        assert_eq!(
            d.onset(Duration::ZERO),
            Some(Step::Cut {
                false_interruption: false
            })
        );
    }

    /// An input to the machine, for the properties.
    #[derive(Clone, Debug)]
    enum Op {
        Onset,
        Voice(bool),
        Transcript(u8, bool),
        TurnEnded,
        Wait(u16),
    }

    const TEXTS: [&str; 6] = [
        "yeah",
        "uh-huh okay",
        "",
        "stop",
        "wait a second",
        "no no no no",
    ];

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => Just(Op::Onset),
            6 => any::<bool>().prop_map(Op::Voice),
            2 => (0..TEXTS.len() as u8, any::<bool>()).prop_map(|(t, f)| Op::Transcript(t, f)),
            1 => Just(Op::TurnEnded),
            1 => (0u16..3000).prop_map(Op::Wait),
        ]
    }

    /// Runs `ops` (a reply in flight throughout), returning each op's steps.
    fn run(d: &mut Decider, ops: &[Op], mut check: impl FnMut(&Decider, &Op, Option<Step>)) {
        let mut now = Duration::ZERO;
        for op in ops {
            let step = match op {
                Op::Onset => d.onset(Duration::ZERO),
                Op::Voice(s) => {
                    now += FRAME;
                    d.voice(now, *s, FRAME)
                }
                Op::Transcript(t, f) => d.transcript(TEXTS[*t as usize], *f),
                Op::TurnEnded => d.turn_ended(now).0,
                Op::Wait(ms) => {
                    now += Duration::from_millis(*ms as u64);
                    d.tick(now)
                }
            };
            check(d, op, step);
        }
    }

    proptest! {
        /// Speech whose transcripts are only backchannels (or nothing)
        /// never loses the reply, and once a backchannel is heard, never
        /// stops it either.
        #[test]
        fn backchannels_alone_never_interrupt(
            ops in proptest::collection::vec(op(), 1..80),
            min_ms in 0u64..800,
            min_words in 0u32..3,
        ) {
            let ops: Vec<Op> = ops
                .into_iter()
                .map(|o| match o {
                    Op::Transcript(t, f) => Op::Transcript(t % 3, f),
                    o => o,
                })
                .collect();
            let mut d = Decider::new(policy(min_ms, min_words, true, false), true);
            let mut heard_backchannel = false;
            run(&mut d, &ops, |_, op, step| {
                match op {
                    // A new candidate: nothing heard of it yet.
                    Op::Onset if matches!(step, Some(Step::Duck | Step::Pause)) => {
                        heard_backchannel = false;
                    }
                    Op::Transcript(t, _) => heard_backchannel = *t < 2,
                    _ => {}
                }
                assert!(
                    !matches!(step, Some(Step::Cut { false_interruption: false })),
                    "{op:?} cut the reply for good"
                );
                if heard_backchannel && matches!(op, Op::Voice(_)) {
                    assert_ne!(step, Some(Step::Pause), "paused after a backchannel");
                }
            });
        }

        /// Once the speech is long enough and has said enough words (not
        /// backchannels), the reply is cut for good.
        #[test]
        fn enough_speech_and_words_always_interrupt(
            ops in proptest::collection::vec(op(), 1..80),
            min_ms in 0u64..800,
            min_words in 0u32..4,
            transcribed in any::<bool>(),
        ) {
            let mut d = Decider::new(policy(min_ms, min_words, true, false), transcribed);
            let min = Duration::from_millis(min_ms);
            run(&mut d, &ops, |d, op, _| {
                if d.deciding() {
                    let words_ok = match d.heard {
                        Heard::Words(n) => n >= min_words.max(1),
                        _ => false,
                    };
                    let transcript_ok = words_ok || (!transcribed);
                    assert!(
                        !(d.speech >= min && transcript_ok),
                        "{op:?}: {:?} of speech and {:?} heard, still {:?}",
                        d.speech, d.heard, d.phase()
                    );
                }
            });
        }

        /// A resume comes only after a pause that nothing confirmed, and
        /// the reply's frames, released while not held and dropped on a
        /// cut, come out in order with none repeated or skipped.
        #[test]
        fn resumes_follow_unconfirmed_pauses_and_audio_joins(
            ops in proptest::collection::vec(op(), 1..120),
            min_ms in 0u64..300,
            min_words in 0u32..3,
            resume in any::<bool>(),
            pause in any::<bool>(),
        ) {
            let mut d = Decider::new(policy(min_ms, min_words, resume, pause), true);
            let reply: Vec<u32> = (0..200).collect();
            let mut next = 0usize;
            let mut out: Vec<u32> = Vec::new();
            let mut paused = false;
            let mut gone = false;
            run(&mut d, &ops, |d, op, step| {
                match step {
                    Some(Step::Pause) => {
                        assert!(!paused, "{op:?}: paused twice");
                        paused = true;
                    }
                    Some(Step::Resume) => {
                        assert!(paused, "{op:?}: resumed without a pause");
                        paused = false;
                    }
                    Some(Step::Cut { false_interruption }) => {
                        assert!(!false_interruption || (paused && !resume));
                        paused = false;
                        gone = true;
                    }
                    _ => {}
                }
                // One frame of playout per input, unless held.
                if !gone && !d.holds_audio() && next < reply.len() {
                    out.push(reply[next]);
                    next += 1;
                }
            });
            prop_assert_eq!(&out[..], &reply[..out.len()]);
        }
    }
}
