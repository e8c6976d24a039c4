//! `"webrtc"`: voice activity detection by WebRTC's VAD (feature `webrtc-vad`).
//!
//! WebRTC's detector (through libfvad, built from C by the `webrtc-vad`
//! crate) models speech and noise with Gaussian mixtures over six frequency
//! bands and adapts them to the audio it hears: unlike the
//! [`energy`](crate::pipeline::builtin::EnergyVad) detector it tells a voice
//! from steady noise of the same level. It needs no model file and no
//! network.
//!
//! ```toml
//! vad_provider = "webrtc"
//!
//! [components.webrtc]
//! mode = 3          # 0 quality, 1 low bitrate, 2 aggressive, 3 very aggressive
//! frame = "20ms"    # 10ms, 20ms or 30ms: the blocks WebRTC judges
//! onset = "40ms"
//! hangover = "200ms"
//! ```
//!
//! # Frames
//!
//! WebRTC judges blocks of exactly 10, 20 or 30 ms of mono 16-bit audio at 8,
//! 16, 32 or 48 kHz. Frames of any length are buffered and cut into blocks
//! of [`WebrtcVadOptions::frame`]; what is left over waits for the next
//! frame, so the same audio gives the same decisions however it is cut.
//! Frames at one of those four rates are judged at their own rate; frames of
//! another rate, encoding or channel count are converted to 16 kHz mono
//! first. When the rate changes, the detector starts over at the new rate
//! (what was buffered at the old rate is dropped).
//!
//! # Decisions
//!
//! [`VadDecision::probability`] is the share of the blocks completed during
//! the frame that WebRTC calls speech (1.0 or 0.0 for 20 ms frames and
//! blocks); a frame that completes no block (shorter than the block) repeats
//! the last block's verdict. [`VadDecision::speech`] adds hysteresis on the
//! audio clock: speech starts once blocks have been voiced without a break
//! for [`WebrtcVadOptions::onset`] and ends once they have been unvoiced for
//! [`WebrtcVadOptions::hangover`]. During the hangover `speech` stays true
//! with probability 0, so the [`silence`](crate::pipeline::builtin::SilenceTurnDetector)
//! turn detector counts those frames as silence and the hangover adds no
//! endpointing latency. WebRTC itself keeps calling a few blocks voiced after
//! speech stops (its own hangover: up to 80-90 ms in mode 3, more in lower
//! modes); those blocks do count as speech.
//!
//! A decision lags the audio by up to one block (a block is judged once it
//! is complete); [`Vad::lookback`] covers that and the onset.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use webrtc_vad::{SampleRate, VadMode};

use crate::audio::{AudioEncoding, AudioFormat, AudioFrame, FormatFollower, level_dbfs};
use crate::error::Result;
use crate::pipeline::builtin::{OPTIONS_OP, OptionChecks, parse_options};
use crate::pipeline::{Vad, VadDecision, VadFactory};

/// The name the detector is registered under, and its options section.
pub const NAME: &str = "webrtc";

/// The level reported for a frame that could not be read: -100 dBFS.
const SILENCE_DB: f32 = -100.0;

/// Options of the [`WebrtcVad`] (`[components.webrtc]`); see the
/// [module documentation](self) for an example.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct WebrtcVadOptions {
    /// WebRTC's aggressiveness, 0 to 3: 0 "quality" (calls the most audio
    /// speech, misses the least), 1 "low bitrate", 2 "aggressive", 3 "very
    /// aggressive" (calls speech only when it is sure: the fewest false
    /// starts on noise). Default 3.
    pub mode: u8,
    /// The length of the blocks WebRTC judges: 10ms, 20ms or 30ms, default
    /// 20ms (the pipeline's frames). Shorter blocks decide sooner; longer
    /// ones see more of the voice per decision.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub frame: Duration,
    /// How long blocks must be voiced without a break before speech starts;
    /// at most 1s, default 40ms.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub onset: Duration,
    /// How long blocks must be unvoiced before speech ends; at most 5s,
    /// default 200ms (longer than the gaps inside and between words).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub hangover: Duration,
}

impl Default for WebrtcVadOptions {
    fn default() -> Self {
        WebrtcVadOptions {
            mode: 3,
            frame: Duration::from_millis(20),
            onset: Duration::from_millis(40),
            hangover: Duration::from_millis(200),
        }
    }
}

impl WebrtcVadOptions {
    /// Parses `[components.webrtc]` (`null` gives the defaults) and checks it.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::ErrorCode::InvalidConfig) (operation
    /// `component.options`) with one `details` entry per bad field, keyed
    /// `components.webrtc.<field>`; unknown keys are errors too.
    pub fn from_value(options: &serde_json::Value) -> Result<Self> {
        let options: WebrtcVadOptions = parse_options(OPTIONS_OP, NAME, options)?;
        options.validate()?;
        Ok(options)
    }

    /// Checks every range (see each field).
    ///
    /// # Errors
    ///
    /// As [`WebrtcVadOptions::from_value`].
    pub fn validate(&self) -> Result<()> {
        let mut checks = OptionChecks::new(NAME);
        checks.check(self.mode <= 3, "mode", || {
            format!(
                "{} is not a mode: 0 (quality), 1 (low bitrate), 2 (aggressive) or 3 \
                 (very aggressive)",
                self.mode
            )
        });
        let blocks = [10, 20, 30].map(Duration::from_millis);
        checks.check(blocks.contains(&self.frame), "frame", || {
            format!(
                "{} is not a block WebRTC judges: 10ms, 20ms or 30ms",
                humantime::format_duration(self.frame)
            )
        });
        checks.check(self.onset <= Duration::from_secs(1), "onset", || {
            format!("{:?} is longer than 1s", self.onset)
        });
        checks.check(self.hangover <= Duration::from_secs(5), "hangover", || {
            format!("{:?} is longer than 5s", self.hangover)
        });
        checks.finish()
    }

    fn vad_mode(&self) -> VadMode {
        match self.mode {
            0 => VadMode::Quality,
            1 => VadMode::LowBitrate,
            2 => VadMode::Aggressive,
            _ => VadMode::VeryAggressive,
        }
    }
}

/// A libfvad instance that may move between threads.
struct Fvad(webrtc_vad::Vad);

// SAFETY: `webrtc_vad::Vad` is `!Send` only because it holds a raw pointer
// (`*mut Fvad`). That pointer is the only handle to a block `fvad_new`
// mallocs (libfvad's `fvad.c`), freed once by `Drop`; every function the
// crate calls (`fvad_process`, `fvad_set_mode`, `fvad_set_sample_rate`,
// `fvad_reset`) reads and writes only that block (the C sources have no
// mutable globals or thread-local state: their statics are `const` tables).
// So the instance belongs to no thread, and moving its owner to another
// thread is sound. It is not `Sync` (every call takes `&mut self`).
unsafe impl Send for Fvad {}

impl Fvad {
    fn new(rate: u32, mode: VadMode) -> Fvad {
        Fvad(webrtc_vad::Vad::new_with_rate_and_mode(
            sample_rate(rate),
            mode,
        ))
    }
}

/// The WebRTC rate of `rate` (one of [`native_rate`]'s).
fn sample_rate(rate: u32) -> SampleRate {
    match rate {
        8_000 => SampleRate::Rate8kHz,
        32_000 => SampleRate::Rate32kHz,
        48_000 => SampleRate::Rate48kHz,
        _ => SampleRate::Rate16kHz,
    }
}

/// Whether WebRTC judges audio at `rate` as it is.
fn native_rate(rate: u32) -> bool {
    matches!(rate, 8_000 | 16_000 | 32_000 | 48_000)
}

/// WebRTC's voice activity detection with hysteresis; see the
/// [module documentation](self).
pub struct WebrtcVad {
    options: WebrtcVadOptions,
    vad: Fvad,
    /// The rate `vad` is set to.
    rate: u32,
    /// Samples waiting for a whole block.
    pending: Vec<i16>,
    /// Converts frames WebRTC cannot judge as they are.
    converter: FormatFollower,
    /// The last block's verdict.
    last_voiced: bool,
    speaking: bool,
    /// Unbroken voiced time while not speaking.
    above: Duration,
    /// Unbroken unvoiced time while speaking.
    below: Duration,
}

impl std::fmt::Debug for WebrtcVad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebrtcVad")
            .field("options", &self.options)
            .field("rate", &self.rate)
            .field("pending", &self.pending.len())
            .field("speaking", &self.speaking)
            .finish_non_exhaustive()
    }
}

impl WebrtcVad {
    /// A detector with `options` (assumed valid; see [`WebrtcVadOptions::validate`]),
    /// judging 16 kHz audio until a frame of another rate comes.
    pub fn new(options: WebrtcVadOptions) -> Self {
        WebrtcVad {
            vad: Fvad::new(16_000, options.vad_mode()),
            options,
            rate: 16_000,
            pending: Vec::new(),
            converter: FormatFollower::default(),
            last_voiced: false,
            speaking: false,
            above: Duration::ZERO,
            below: Duration::ZERO,
        }
    }

    /// Whether the detector is in speech (including the hangover).
    pub fn is_speaking(&self) -> bool {
        self.speaking
    }

    /// The options in use.
    pub fn options(&self) -> &WebrtcVadOptions {
        &self.options
    }

    /// The samples of `frame` as WebRTC can judge them (mono s16 at a native
    /// rate) and that rate; `None` when the frame cannot be read or a
    /// resampler is still filling.
    fn samples(&mut self, frame: &AudioFrame) -> Option<(Vec<i16>, u32)> {
        let format = frame.format();
        let rate = if native_rate(format.sample_rate) {
            format.sample_rate
        } else {
            16_000
        };
        let target = AudioFormat::new(AudioEncoding::PcmS16Le, rate, 1);
        let converted = self.converter.convert(frame.clone(), target).ok()??;
        let samples = converted
            .data()
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        Some((samples, rate))
    }

    /// Updates the hysteresis with one block's verdict.
    fn hysteresis(&mut self, voiced: bool, duration: Duration) {
        if self.speaking {
            if voiced {
                self.below = Duration::ZERO;
            } else {
                self.below += duration;
                if self.below >= self.options.hangover {
                    self.speaking = false;
                    self.below = Duration::ZERO;
                }
            }
        } else if voiced {
            self.above += duration;
            if self.above >= self.options.onset {
                self.speaking = true;
                self.above = Duration::ZERO;
            }
        } else {
            self.above = Duration::ZERO;
        }
    }
}

impl Default for WebrtcVad {
    fn default() -> Self {
        WebrtcVad::new(WebrtcVadOptions::default())
    }
}

impl Vad for WebrtcVad {
    fn lookback(&self) -> Duration {
        self.options.onset + self.options.frame
    }

    fn process(&mut self, frame: &AudioFrame) -> VadDecision {
        let Some((samples, rate)) = self.samples(frame) else {
            return VadDecision {
                speech: self.speaking,
                probability: if self.last_voiced { 1.0 } else { 0.0 },
                level_db: SILENCE_DB,
            };
        };
        let level_db = level_dbfs(&samples);
        if rate != self.rate {
            self.vad = Fvad::new(rate, self.options.vad_mode());
            self.rate = rate;
            self.pending.clear();
        }
        self.pending.extend_from_slice(&samples);
        let block = (rate as usize * self.options.frame.as_millis() as usize) / 1000;
        let (mut blocks, mut voiced) = (0u32, 0u32);
        let mut done = 0;
        while self.pending.len() - done >= block {
            // A block of a valid length at the instance's rate: libfvad
            // refuses nothing else, so an error is not expected; it is read
            // as unvoiced rather than trusted.
            let is_voice = self
                .vad
                .0
                .is_voice_segment(&self.pending[done..done + block])
                .unwrap_or(false);
            done += block;
            blocks += 1;
            voiced += u32::from(is_voice);
            self.last_voiced = is_voice;
            self.hysteresis(is_voice, self.options.frame);
        }
        self.pending.drain(..done);
        let probability = if blocks == 0 {
            if self.last_voiced { 1.0 } else { 0.0 }
        } else {
            voiced as f32 / blocks as f32
        };
        VadDecision {
            speech: self.speaking,
            probability,
            level_db,
        }
    }

    fn reset(&mut self) {
        *self = WebrtcVad::new(self.options.clone());
    }
}

/// Makes a [`WebrtcVad`] per session from `[components.webrtc]`.
#[derive(Clone, Copy, Debug, Default)]
pub struct WebrtcVadFactory;

impl VadFactory for WebrtcVadFactory {
    fn create(&self, options: &serde_json::Value) -> Result<Box<dyn Vad>> {
        Ok(Box::new(WebrtcVad::new(WebrtcVadOptions::from_value(
            options,
        )?)))
    }
}

crate::register_component!(vad, NAME, WebrtcVadFactory::default);
