//! `"adaptive"`: turn detection that waits less after speech that ends like a
//! finished sentence and longer after a pause mid-sentence.
//!
//! It runs the same state machine as [`silence`](super::turn) (a frame is
//! speech when the VAD says `speech` with probability at least 0.5; a turn
//! starts after [`AdaptiveTurnOptions::min_speech`] of unbroken speech; in a
//! turn the silence is counted from the end of the last burst that long), but
//! the silence that ends the turn depends on how the speech before it ended:
//!
//! * It listens to the audio ([`TurnDetector::observe`]): for each speech
//!   frame, its level and, when voiced, its fundamental frequency (F0,
//!   [`pitch::estimate_f0`], YIN on the last 40 ms; only frames the VAD calls
//!   speech are analysed).
//! * When a pause starts, it compares the last
//!   [`AdaptiveTurnOptions::window`] of speech (about the last syllable) with
//!   the speech of the 2 s before ([`contour::measure`]): its median pitch
//!   with theirs, in semitones, and its peak level with their usual peaks, in
//!   dB. Ending at least [`AdaptiveTurnOptions::pitch_fall_semitones`] lower
//!   **and** at least [`AdaptiveTurnOptions::energy_fall_db`] quieter is how
//!   statements end (the final fall): the turn ends after
//!   [`AdaptiveTurnOptions::min_wait`]. Level or rising pitch,
//!   or energy that holds, is how speakers pause mid-sentence (a breath, a
//!   hesitation, a continuation rise): it waits
//!   [`AdaptiveTurnOptions::max_wait`]. Too little voiced speech to tell waits
//!   [`AdaptiveTurnOptions::neutral_wait`].
//! * A transcript hint ([`TurnDetector::hint_transcript`]) overrides the
//!   prosody when it is decisive ([`contour::transcript_cue`]): one that ends
//!   like a sentence (`.`, `?`, `!`) waits `min_wait`; one that trails off
//!   (a comma, `...`, a filler such as "um" or "so", a conjunction such as
//!   "and" or "because", an article or preposition) waits `max_wait`. Words
//!   without punctuation leave the decision to the prosody.
//!
//! The wait is re-read on every frame of the pause, so a hint that arrives
//! mid-pause applies at once. The hint and the contour are forgotten when a
//! turn ends and on [`TurnDetector::reset`].
//!
//! Limits: a yes/no question ends with a rise, which without a transcript
//! sounds like a continuation (it waits `max_wait`); two sentences in one turn
//! with a pause longer than `min_wait` between them are two turns. Without
//! [`TurnDetector::observe`] (a caller driving the detector with VAD
//! decisions only) every pause waits `neutral_wait`, like `silence`.
//!
//! ```toml
//! turn_detection_provider = "adaptive"
//!
//! [components.adaptive]
//! min_wait = "200ms"
//! neutral_wait = "500ms"
//! max_wait = "1s"
//! ```

pub mod contour;
pub mod pitch;

use std::collections::VecDeque;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{OPTIONS_OP, OptionChecks, parse_options};
use crate::audio::AudioFrame;
use crate::error::Result;
use crate::pipeline::{TurnDetector, TurnDetectorFactory, TurnSignal, VadDecision};
use contour::{Contour, Ending, Observation, TranscriptCue};
use pitch::PitchScratch;

/// The name the detector is registered under, and its options section.
pub const NAME: &str = "adaptive";

/// The VAD probability from which a `speech` frame counts as speech.
const SPEECH_PROBABILITY: f32 = 0.5;

/// How much audio the pitch estimate of a frame looks at (the frame and
/// what came before it).
const PITCH_WINDOW: Duration = Duration::from_millis(40);

/// The longest history kept, whatever the window.
const MAX_HISTORY: Duration = Duration::from_secs(2);

/// Options of the [`AdaptiveTurnDetector`] (`[components.adaptive]`).
///
/// ```toml
/// [components.adaptive]
/// min_wait = "200ms"
/// neutral_wait = "500ms"
/// max_wait = "1s"
/// window = "200ms"
/// pitch_fall_semitones = 2.0
/// energy_fall_db = 3.0
/// min_speech = "100ms"
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveTurnOptions {
    /// The silence that ends a turn whose speech ended like a finished
    /// sentence (falling pitch and energy, or a transcript ending in `.`,
    /// `?`, `!`); default 200ms, at most `neutral_wait`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub min_wait: Duration,
    /// The silence that ends a turn when neither the prosody nor the
    /// transcript tells (too little voiced speech); default 500ms (as
    /// `silence`), between `min_wait` and `max_wait`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub neutral_wait: Duration,
    /// The silence that ends a turn whose speech paused mid-sentence (level or
    /// rising pitch, energy that holds, a transcript ending in a filler or a
    /// conjunction); default 1s, at most 60s. Hesitations longer than this
    /// are taken for the end of the turn.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_wait: Duration,
    /// How much speech at the end of a stretch is compared with the speech
    /// before it; default 200ms (about the last syllable), 60ms..=1s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub window: Duration,
    /// How much lower the pitch in the window must be than before it, in
    /// semitones, to sound finished; default 2, above 0 and at most 24.
    pub pitch_fall_semitones: f32,
    /// How much quieter the window's peak must be than the usual peaks, in
    /// dB, to sound finished; default 3, 0..=40 (0: not louder).
    pub energy_fall_db: f32,
    /// The shortest unbroken speech that counts (as in `silence`); default
    /// 100ms, at most 2s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub min_speech: Duration,
}

impl Default for AdaptiveTurnOptions {
    fn default() -> Self {
        AdaptiveTurnOptions {
            min_wait: Duration::from_millis(200),
            neutral_wait: Duration::from_millis(500),
            max_wait: Duration::from_secs(1),
            window: Duration::from_millis(200),
            pitch_fall_semitones: 2.0,
            energy_fall_db: 3.0,
            min_speech: Duration::from_millis(100),
        }
    }
}

impl AdaptiveTurnOptions {
    /// Parses `[components.adaptive]` (`null` gives the defaults) and checks it.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::ErrorCode::InvalidConfig) with one `details`
    /// entry per bad field, keyed `components.adaptive.<field>`; unknown keys
    /// are errors too.
    pub fn from_value(options: &serde_json::Value) -> Result<Self> {
        let options: AdaptiveTurnOptions = parse_options(OPTIONS_OP, NAME, options)?;
        options.validate()?;
        Ok(options)
    }

    /// Checks every range (see each field) and that
    /// `min_wait <= neutral_wait <= max_wait` (a violation is reported at the
    /// shorter of the two).
    ///
    /// # Errors
    ///
    /// As [`AdaptiveTurnOptions::from_value`].
    pub fn validate(&self) -> Result<()> {
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        let mut c = OptionChecks::new(NAME);
        c.check(self.min_wait <= self.neutral_wait, "min_wait", || {
            format!(
                "{} is longer than neutral_wait ({})",
                fmt(self.min_wait),
                fmt(self.neutral_wait)
            )
        });
        c.check(self.min_wait <= self.max_wait, "min_wait", || {
            format!(
                "{} is longer than max_wait ({})",
                fmt(self.min_wait),
                fmt(self.max_wait)
            )
        });
        c.check(self.neutral_wait <= self.max_wait, "neutral_wait", || {
            format!(
                "{} is longer than max_wait ({})",
                fmt(self.neutral_wait),
                fmt(self.max_wait)
            )
        });
        c.check(self.max_wait <= Duration::from_secs(60), "max_wait", || {
            format!("{} is longer than 60s", fmt(self.max_wait))
        });
        c.check(
            (Duration::from_millis(60)..=Duration::from_secs(1)).contains(&self.window),
            "window",
            || format!("{} is outside 60ms..=1s", fmt(self.window)),
        );
        c.check(
            self.pitch_fall_semitones > 0.0 && self.pitch_fall_semitones <= 24.0,
            "pitch_fall_semitones",
            || format!("{} is outside (0, 24]", self.pitch_fall_semitones),
        );
        c.check(
            (0.0..=40.0).contains(&self.energy_fall_db),
            "energy_fall_db",
            || format!("{} is outside 0..=40", self.energy_fall_db),
        );
        c.check(
            self.min_speech <= Duration::from_secs(2),
            "min_speech",
            || format!("{} is longer than 2s", fmt(self.min_speech)),
        );
        c.finish()
    }
}

/// Why the detector waits what it waits: its reading of the current pause.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reading {
    /// The contour of the speech before the pause.
    pub contour: Contour,
    /// What the contour says.
    pub ending: Ending,
    /// What the latest transcript hint says.
    pub transcript: TranscriptCue,
    /// The silence that ends the turn, given both.
    pub wait: Duration,
}

/// The audio of the frame last given to [`TurnDetector::observe`].
#[derive(Clone, Debug, Default)]
struct Observed {
    level_db: f32,
    /// Whether `observe` ran for the frame `update` is about to see.
    fresh: bool,
}

/// Adaptive turn detection; see the [module documentation](self).
#[derive(Clone, Debug)]
pub struct AdaptiveTurnDetector {
    options: AdaptiveTurnOptions,
    in_turn: bool,
    /// The audio clock: the end of the last frame updated.
    clock: Duration,
    /// The current unbroken run of speech frames.
    burst: Duration,
    /// In a turn: time since the last speech burst of at least `min_speech`.
    silence: Duration,
    transcript: TranscriptCue,
    /// The reading of the current pause, made at its first frame.
    reading: Option<Reading>,
    ended_after: Duration,
    /// The last [`PITCH_WINDOW`] of samples, newest last, and their rate.
    recent: VecDeque<i16>,
    rate: u32,
    observed: Observed,
    history: Vec<Observation>,
    scratch: PitchScratch,
}

impl AdaptiveTurnDetector {
    /// A detector with `options` (assumed valid; see [`AdaptiveTurnOptions::validate`]).
    pub fn new(options: AdaptiveTurnOptions) -> Self {
        AdaptiveTurnDetector {
            options,
            in_turn: false,
            clock: Duration::ZERO,
            burst: Duration::ZERO,
            silence: Duration::ZERO,
            transcript: TranscriptCue::Neutral,
            reading: None,
            ended_after: Duration::ZERO,
            recent: VecDeque::new(),
            rate: 0,
            observed: Observed::default(),
            history: Vec::new(),
            scratch: PitchScratch::default(),
        }
    }

    /// The options in use.
    pub fn options(&self) -> &AdaptiveTurnOptions {
        &self.options
    }

    /// Whether a turn is in progress (between `SpeechStarted` and `TurnEnded`).
    pub fn in_turn(&self) -> bool {
        self.in_turn
    }

    /// The reading of the pause in progress: `None` in speech or outside a turn.
    pub fn reading(&self) -> Option<Reading> {
        self.reading
    }

    /// The silence a pause with `ending` and `transcript` waits.
    fn wait_for(&self, ending: Ending, transcript: TranscriptCue) -> Duration {
        match (transcript, ending) {
            (TranscriptCue::Complete, _) => self.options.min_wait,
            (TranscriptCue::Unfinished, _) => self.options.max_wait,
            (TranscriptCue::Neutral, Ending::Finished) => self.options.min_wait,
            (TranscriptCue::Neutral, Ending::Continuing) => self.options.max_wait,
            (TranscriptCue::Neutral, Ending::Unknown) => self.options.neutral_wait,
        }
    }

    /// The reading of a pause starting now.
    fn read_pause(&self) -> Reading {
        let contour = contour::measure(&self.history, self.options.window);
        let ending = contour::classify(
            &contour,
            self.options.pitch_fall_semitones,
            self.options.energy_fall_db,
        );
        Reading {
            contour,
            ending,
            transcript: self.transcript,
            wait: self.wait_for(ending, self.transcript),
        }
    }

    /// Records the frame just updated as speech, with its pitch.
    fn record_speech(&mut self) {
        if !std::mem::take(&mut self.observed.fresh) {
            return;
        }
        let (front, back) = self.recent.as_slices();
        let f0 = if front.is_empty() {
            pitch::estimate_f0_with(&mut self.scratch, back, self.rate)
        } else {
            let window: Vec<i16> = front.iter().chain(back).copied().collect();
            pitch::estimate_f0_with(&mut self.scratch, &window, self.rate)
        };
        self.history.push(Observation {
            at: self.clock,
            level_db: self.observed.level_db,
            f0_hz: f0.map(|p| p.hz),
        });
        let keep_from = self
            .clock
            .saturating_sub(MAX_HISTORY.max(self.options.window));
        let stale = self.history.partition_point(|o| o.at < keep_from);
        if stale > 0 {
            self.history.drain(..stale);
        }
    }
}

impl Default for AdaptiveTurnDetector {
    fn default() -> Self {
        AdaptiveTurnDetector::new(AdaptiveTurnOptions::default())
    }
}

impl TurnDetector for AdaptiveTurnDetector {
    fn lookback(&self) -> Duration {
        self.options.min_speech
    }

    fn observe(&mut self, frame: &AudioFrame) {
        let format = frame.format();
        if format.channels != 1 || format.encoding != crate::audio::AudioEncoding::PcmS16Le {
            return;
        }
        if format.sample_rate != self.rate {
            self.rate = format.sample_rate;
            self.recent.clear();
        }
        let keep = (u64::from(self.rate) * PITCH_WINDOW.as_millis() as u64 / 1000) as usize;
        let mut energy = 0f64;
        let mut count = 0usize;
        for pair in frame.data().chunks_exact(2) {
            let s = i16::from_le_bytes([pair[0], pair[1]]);
            energy += f64::from(s) * f64::from(s);
            count += 1;
            if self.recent.len() == keep {
                self.recent.pop_front();
            }
            self.recent.push_back(s);
        }
        let rms = (energy / count.max(1) as f64).sqrt() / 32768.0;
        self.observed = Observed {
            level_db: if rms > 0.0 {
                (20.0 * rms.log10()) as f32
            } else {
                super::vad::SILENCE_DB
            },
            fresh: count > 0,
        };
    }

    fn update(&mut self, vad: &VadDecision, frame_duration: Duration) -> TurnSignal {
        self.clock += frame_duration;
        let speech = vad.speech && vad.probability >= SPEECH_PROBABILITY;
        let broken = if speech {
            self.burst += frame_duration;
            self.record_speech();
            Duration::ZERO
        } else {
            self.observed.fresh = false;
            std::mem::take(&mut self.burst)
        };
        let confirmed = speech && self.burst >= self.options.min_speech;
        if !self.in_turn {
            if confirmed {
                self.in_turn = true;
                self.silence = Duration::ZERO;
                return TurnSignal::SpeechStarted;
            }
            return TurnSignal::Continue;
        }
        if confirmed {
            self.silence = Duration::ZERO;
            self.reading = None;
            return TurnSignal::Continue;
        }
        if speech {
            return TurnSignal::Continue;
        }
        if broken < self.options.min_speech {
            self.silence += broken;
        }
        self.silence += frame_duration;
        let mut reading = match self.reading {
            Some(r) => r,
            None => self.read_pause(),
        };
        if reading.transcript != self.transcript {
            reading.transcript = self.transcript;
            reading.wait = self.wait_for(reading.ending, self.transcript);
        }
        self.reading = Some(reading);
        if self.silence >= reading.wait {
            self.ended_after = self.silence;
            let ended_after = self.silence;
            self.reset();
            self.ended_after = ended_after;
            TurnSignal::TurnEnded
        } else {
            TurnSignal::Continue
        }
    }

    fn endpointing(&self) -> Option<Duration> {
        Some(self.ended_after)
    }

    fn hint_transcript(&mut self, partial: &str) {
        self.transcript = contour::transcript_cue(partial);
    }

    fn reset(&mut self) {
        let clock = self.clock;
        *self = AdaptiveTurnDetector {
            recent: std::mem::take(&mut self.recent),
            rate: self.rate,
            scratch: std::mem::take(&mut self.scratch),
            ..AdaptiveTurnDetector::new(self.options.clone())
        };
        self.clock = clock;
    }
}

/// Makes an [`AdaptiveTurnDetector`] per session from `[components.adaptive]`.
#[derive(Clone, Copy, Debug, Default)]
pub struct AdaptiveTurnFactory;

impl TurnDetectorFactory for AdaptiveTurnFactory {
    fn create(&self, options: &serde_json::Value) -> Result<Box<dyn TurnDetector>> {
        Ok(Box::new(AdaptiveTurnDetector::new(
            AdaptiveTurnOptions::from_value(options)?,
        )))
    }
}

crate::register_component!(turn, "adaptive", AdaptiveTurnFactory::default);
