//! `"energy"`: voice activity detection by frame energy over an adaptive noise floor.
//!
//! Each frame's RMS level (dBFS) is compared with a running estimate of the
//! background noise level, the *noise floor*:
//!
//! * The floor is measured at the start: during the first
//!   [`EnergyVadOptions::calibration`] of audio (default 100 ms) it is the
//!   level of the quietest frame so far, so a session that starts in a noisy
//!   room does not take the room for speech. (With `calibration = "0s"` it
//!   starts at [`EnergyVadOptions::initial_floor_db`] instead.)
//! * Then it follows quieter frames quickly (a 40 ms time constant) and
//!   louder ones slowly (at most [`EnergyVadOptions::floor_rise_db_per_s`]), so
//!   it tracks the quietest recent level: the noise between words, not the
//!   words.
//! * A frame is *above threshold* when its level exceeds both the floor plus
//!   [`EnergyVadOptions::threshold_db`] and the absolute
//!   [`EnergyVadOptions::min_level_db`].
//! * Hysteresis turns that into speech: speech starts once frames have been
//!   above threshold without a break for [`EnergyVadOptions::onset`], and ends
//!   once they have been below it for [`EnergyVadOptions::hangover`], so the
//!   short dips between syllables and words do not end speech.
//!
//! Time is the audio clock: the durations of the frames given, never wall time.
//!
//! When the background gets louder (say a fan starts), the floor needs
//! `(new noise - threshold_db - old floor) / floor_rise_db_per_s` of audio to
//! catch up; until then the noise may be taken for speech. Speech in the very
//! first frames of the audio (during calibration) is taken for the background
//! until a pause between syllables pulls the floor down, a few hundred
//! milliseconds at most.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{OPTIONS_OP, OptionChecks, parse_options};
use crate::audio::{AudioEncoding, AudioFrame};
use crate::error::Result;
use crate::pipeline::{Vad, VadDecision, VadFactory};

/// The name the detector is registered under, and its options section.
pub const NAME: &str = "energy";

/// The level reported for a frame of digital silence (and the lowest level
/// the noise floor goes to): -100 dBFS.
pub const SILENCE_DB: f32 = -100.0;

/// How fast the floor follows quieter frames: the time constant of its fall.
const FLOOR_FALL_TAU_S: f32 = 0.040;

/// The width, in dB, of the logistic curve mapping the margin above the
/// threshold to [`VadDecision::probability`].
const PROBABILITY_SLOPE_DB: f32 = 3.0;

/// Options of the [`EnergyVad`] (`[components.energy]`).
///
/// ```toml
/// [components.energy]
/// threshold_db = 9.0
/// min_level_db = -50.0
/// calibration = "100ms"
/// initial_floor_db = -60.0
/// floor_rise_db_per_s = 4.0
/// onset = "40ms"
/// hangover = "200ms"
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EnergyVadOptions {
    /// How far above the noise floor a frame must be to count, in dB;
    /// above 0 and at most 60, default 9.
    pub threshold_db: f32,
    /// The absolute level a frame must exceed to count, in dBFS, whatever the
    /// floor; -100..=0, default -50 (quiet rooms do not make every breath speech).
    pub min_level_db: f32,
    /// How much audio at the start (and after [`Vad::reset`]) measures the
    /// noise floor: the floor is the quietest frame's level until then. At
    /// most 2s, default 100ms; `"0s"` starts from `initial_floor_db` instead.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub calibration: Duration,
    /// The noise floor at the start and after [`Vad::reset`] when
    /// `calibration` is 0, in dBFS; -100..=0, default -60.
    pub initial_floor_db: f32,
    /// The fastest the noise floor rises towards louder frames, in dB per
    /// second of audio; above 0 and at most 100, default 4. Higher adapts to
    /// new background noise sooner but mistakes long unbroken speech for noise
    /// sooner.
    pub floor_rise_db_per_s: f32,
    /// How long frames must stay above threshold, without a break, before
    /// speech starts; at most 1s, default 40ms (two 20 ms frames: a single
    /// click is not speech, and speech is reported 40 ms after it starts).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub onset: Duration,
    /// How long frames must stay below threshold before speech ends; at most
    /// 5s, default 200ms (longer than the gaps inside and between words).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub hangover: Duration,
}

impl Default for EnergyVadOptions {
    fn default() -> Self {
        EnergyVadOptions {
            threshold_db: 9.0,
            min_level_db: -50.0,
            calibration: Duration::from_millis(100),
            initial_floor_db: -60.0,
            floor_rise_db_per_s: 4.0,
            onset: Duration::from_millis(40),
            hangover: Duration::from_millis(200),
        }
    }
}

impl EnergyVadOptions {
    /// Parses `[components.energy]` (`null` gives the defaults) and checks every range.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::ErrorCode::InvalidConfig) with one `details`
    /// entry per bad field, keyed `components.energy.<field>`; unknown keys are
    /// errors too.
    pub fn from_value(options: &serde_json::Value) -> Result<Self> {
        let options: EnergyVadOptions = parse_options(OPTIONS_OP, NAME, options)?;
        options.validate()?;
        Ok(options)
    }

    /// Checks every range (see each field).
    ///
    /// # Errors
    ///
    /// As [`EnergyVadOptions::from_value`].
    pub fn validate(&self) -> Result<()> {
        let mut c = OptionChecks::new(NAME);
        c.check(
            self.threshold_db > 0.0 && self.threshold_db <= 60.0,
            "threshold_db",
            || format!("{} is outside (0, 60] dB", self.threshold_db),
        );
        c.check(
            (SILENCE_DB..=0.0).contains(&self.min_level_db),
            "min_level_db",
            || format!("{} is outside -100..=0 dBFS", self.min_level_db),
        );
        c.check(
            (SILENCE_DB..=0.0).contains(&self.initial_floor_db),
            "initial_floor_db",
            || format!("{} is outside -100..=0 dBFS", self.initial_floor_db),
        );
        c.check(
            self.floor_rise_db_per_s > 0.0 && self.floor_rise_db_per_s <= 100.0,
            "floor_rise_db_per_s",
            || format!("{} is outside (0, 100] dB/s", self.floor_rise_db_per_s),
        );
        c.check(
            self.calibration <= Duration::from_secs(2),
            "calibration",
            || format!("{:?} is longer than 2s", self.calibration),
        );
        c.check(self.onset <= Duration::from_secs(1), "onset", || {
            format!("{:?} is longer than 1s", self.onset)
        });
        c.check(self.hangover <= Duration::from_secs(5), "hangover", || {
            format!("{:?} is longer than 5s", self.hangover)
        });
        c.finish()
    }
}

/// Energy-based voice activity detection with an adaptive noise floor; see
/// the [module documentation](self).
///
/// It reads PCM s16le frames (any rate or channel count: the level is the RMS
/// of all samples). A frame of another encoding is reported as silence.
///
/// [`VadDecision::speech`] is the state after hysteresis;
/// [`VadDecision::probability`] judges the frame alone: a logistic function of
/// how far the frame is above its threshold (the stricter of floor plus
/// `threshold_db` and `min_level_db`), 0.5 at the threshold, about 0.9 six dB
/// above it. During the hangover `speech` stays true while `probability` is low.
#[derive(Clone, Debug)]
pub struct EnergyVad {
    options: EnergyVadOptions,
    floor_db: f32,
    /// Audio seen so far, up to the end of calibration.
    calibrated: Duration,
    speaking: bool,
    /// Unbroken time above threshold while not speaking.
    above: Duration,
    /// Unbroken time below threshold while speaking.
    below: Duration,
}

impl EnergyVad {
    /// A detector with `options` (assumed valid; see [`EnergyVadOptions::validate`]).
    pub fn new(options: EnergyVadOptions) -> Self {
        EnergyVad {
            floor_db: options.initial_floor_db,
            calibrated: Duration::ZERO,
            options,
            speaking: false,
            above: Duration::ZERO,
            below: Duration::ZERO,
        }
    }

    /// The current noise floor estimate, in dBFS.
    pub fn noise_floor_db(&self) -> f32 {
        self.floor_db
    }

    /// Whether the detector is in speech (including the hangover).
    pub fn is_speaking(&self) -> bool {
        self.speaking
    }

    /// The options in use.
    pub fn options(&self) -> &EnergyVadOptions {
        &self.options
    }

    /// Moves the floor towards `level_db` over `dt` of audio.
    fn track_floor(&mut self, level_db: f32, dt: f32) {
        let diff = level_db - self.floor_db;
        if diff < 0.0 {
            self.floor_db += diff * (1.0 - (-dt / FLOOR_FALL_TAU_S).exp());
        } else {
            self.floor_db += diff.min(self.options.floor_rise_db_per_s * dt);
        }
        self.floor_db = self.floor_db.max(SILENCE_DB);
    }
}

impl Default for EnergyVad {
    fn default() -> Self {
        EnergyVad::new(EnergyVadOptions::default())
    }
}

/// The sum of the squares of s16le `bytes`' samples, exactly.
///
/// Integer arithmetic, so the loop vectorises (an `f64` sum cannot be
/// reordered). Samples are taken in pairs: the sum of two squares is at most
/// 2^31 and fits a `u32` (so the pair compiles to one multiply-add of 16-bit
/// lanes), and the sum is kept in `u64`, exact for any frame shorter than
/// 2^33 samples.
fn s16le_sum_of_squares(bytes: &[u8]) -> u64 {
    let square = |lo: u8, hi: u8| {
        let x = i32::from(i16::from_le_bytes([lo, hi]));
        x * x
    };
    let mut pairs = bytes.chunks_exact(4);
    let mut sum = 0u64;
    for p in &mut pairs {
        // Wrapping: 2^30 + 2^30 overflows `i32` but not `u32`.
        sum += u64::from(square(p[0], p[1]).wrapping_add(square(p[2], p[3])) as u32);
    }
    if let [lo, hi, ..] = *pairs.remainder() {
        sum += u64::from(square(lo, hi) as u32);
    }
    sum
}

/// The RMS level of s16le `bytes` in dBFS (full scale is 32768), at least [`SILENCE_DB`].
fn s16le_level_db(bytes: &[u8]) -> f32 {
    let n = bytes.len() / 2;
    let sum = s16le_sum_of_squares(bytes);
    if n == 0 || sum == 0 {
        return SILENCE_DB;
    }
    // The sum converts to f64 exactly (below 2^53 for frames under 2^23
    // samples), so the level is the one an f64 sum of squares gives.
    let rms = (sum as f64 / n as f64).sqrt() / 32768.0;
    ((20.0 * rms.log10()) as f32).max(SILENCE_DB)
}

fn logistic(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl Vad for EnergyVad {
    fn lookback(&self) -> Duration {
        self.options.onset
    }

    fn process(&mut self, frame: &AudioFrame) -> VadDecision {
        let duration = frame.duration();
        let level_db = if frame.format().encoding == AudioEncoding::PcmS16Le {
            s16le_level_db(frame.data())
        } else {
            SILENCE_DB
        };
        if duration.is_zero() {
            return VadDecision {
                speech: self.speaking,
                probability: 0.0,
                level_db,
            };
        }

        let calibrating = self.calibrated < self.options.calibration;
        if calibrating {
            self.floor_db = if self.calibrated.is_zero() {
                level_db
            } else {
                self.floor_db.min(level_db)
            };
            self.calibrated += duration;
        }
        let threshold = (self.floor_db + self.options.threshold_db).max(self.options.min_level_db);
        let margin = level_db - threshold;
        let is_above = margin > 0.0;
        if self.speaking {
            if is_above {
                self.below = Duration::ZERO;
            } else {
                self.below += duration;
                if self.below >= self.options.hangover {
                    self.speaking = false;
                    self.below = Duration::ZERO;
                }
            }
        } else if is_above {
            self.above += duration;
            if self.above >= self.options.onset {
                self.speaking = true;
                self.above = Duration::ZERO;
            }
        } else {
            self.above = Duration::ZERO;
        }
        if !calibrating {
            self.track_floor(level_db, duration.as_secs_f32());
        }

        VadDecision {
            speech: self.speaking,
            probability: logistic(margin / PROBABILITY_SLOPE_DB).clamp(0.0, 1.0),
            level_db,
        }
    }

    fn reset(&mut self) {
        *self = EnergyVad::new(self.options.clone());
    }
}

/// Makes an [`EnergyVad`] per session from `[components.energy]`.
#[derive(Clone, Copy, Debug, Default)]
pub struct EnergyVadFactory;

impl VadFactory for EnergyVadFactory {
    fn create(&self, options: &serde_json::Value) -> Result<Box<dyn Vad>> {
        Ok(Box::new(EnergyVad::new(EnergyVadOptions::from_value(
            options,
        )?)))
    }
}

crate::register_component!(vad, "energy", EnergyVadFactory::default);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::INTERNAL_FORMAT;
    use crate::pipeline::builtin::s16le_samples;

    fn frame(samples: &[i16]) -> AudioFrame {
        AudioFrame::from_i16(
            INTERNAL_FORMAT.sample_rate,
            INTERNAL_FORMAT.channels,
            samples,
        )
        .unwrap()
    }

    /// A 20 ms square wave whose RMS is `level_db` dBFS.
    fn square(level_db: f32) -> AudioFrame {
        let amp = (32768.0 * 10f32.powf(level_db / 20.0)).round() as i16;
        let samples: Vec<i16> = (0..320)
            .map(|i| if (i / 8) % 2 == 0 { amp } else { -amp })
            .collect();
        frame(&samples)
    }

    #[test]
    fn level_of_full_scale_square_is_zero_db_and_silence_is_the_floor() {
        let full: Vec<u8> = [i16::MAX, i16::MIN]
            .repeat(160)
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        assert!(s16le_level_db(&full).abs() < 0.01);
        assert_eq!(s16le_level_db(&[0; 640]), SILENCE_DB);
        assert_eq!(s16le_level_db(&[]), SILENCE_DB);
        assert!((s16le_level_db(square(-20.0).data()) + 20.0).abs() < 0.05);
    }

    /// The level as it was computed before the integer sum: f64 throughout.
    fn f64_level_db(bytes: &[u8]) -> f32 {
        let mut sum = 0.0f64;
        let mut n = 0usize;
        for s in s16le_samples(bytes) {
            let x = f64::from(s);
            sum += x * x;
            n += 1;
        }
        if n == 0 || sum == 0.0 {
            return SILENCE_DB;
        }
        let rms = (sum / n as f64).sqrt() / 32768.0;
        ((20.0 * rms.log10()) as f32).max(SILENCE_DB)
    }

    #[test]
    fn the_integer_level_equals_the_f64_level_bit_for_bit() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let extremes: Vec<u8> = [i16::MIN, i16::MAX, i16::MIN, 0, 1, -1]
            .repeat(200)
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        // Two full-scale negative samples in one pair: the largest pair sum.
        let full_scale: Vec<u8> = [i16::MIN; 321]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let mut cases = vec![extremes, full_scale, vec![0x80; 641], vec![1, 0, 3]];
        for len in [2usize, 320, 640, 1920, 7] {
            for shift in [0u32, 4, 8, 12, 15] {
                let bytes: Vec<u8> = (0..len / 2)
                    .flat_map(|_| (((next() >> 40) as i16) >> shift).to_le_bytes())
                    .collect();
                cases.push(bytes);
            }
        }
        for bytes in &cases {
            assert_eq!(
                s16le_level_db(bytes).to_bits(),
                f64_level_db(bytes).to_bits(),
                "{} bytes",
                bytes.len()
            );
        }
    }

    #[test]
    fn floor_falls_fast_and_rises_at_the_configured_rate() {
        let mut vad = EnergyVad::default();
        // About -80 dBFS: below the -60 initial floor, which follows within ~200 ms.
        let quiet = square(-80.0);
        let quiet_db = s16le_level_db(quiet.data());
        for _ in 0..10 {
            vad.process(&quiet);
        }
        let floor = vad.noise_floor_db();
        assert!((floor - quiet_db).abs() < 0.5, "{floor} vs {quiet_db}");
        // -40 dBFS for one second: the floor rises by the rise rate, 4 dB.
        for _ in 0..50 {
            vad.process(&square(-40.0));
        }
        let risen = vad.noise_floor_db();
        assert!((risen - floor - 4.0).abs() < 0.01, "{risen} from {floor}");
    }

    #[test]
    fn onset_and_hangover_are_counted_in_audio_time() {
        let mut vad = EnergyVad::default();
        for _ in 0..20 {
            assert!(!vad.process(&frame(&[0; 320])).speech);
        }
        // Onset 40 ms: the first loud frame is not speech yet, the second is.
        let d = vad.process(&square(-20.0));
        assert!(!d.speech && d.probability > 0.99);
        assert!(vad.process(&square(-20.0)).speech);
        // Hangover 200 ms: ten quiet frames; speech ends on the tenth.
        for i in 1..=10 {
            let d = vad.process(&frame(&[0; 320]));
            assert!(d.probability < 0.01);
            assert_eq!(d.speech, i < 10, "quiet frame {i}");
        }
    }

    #[test]
    fn a_break_restarts_the_onset() {
        let mut vad = EnergyVad::default();
        for _ in 0..10 {
            vad.process(&frame(&[0; 320]));
        }
        for _ in 0..5 {
            assert!(!vad.process(&square(-20.0)).speech);
            assert!(!vad.process(&frame(&[0; 320])).speech);
        }
    }

    #[test]
    fn min_level_gates_quiet_rooms() {
        let mut vad = EnergyVad::default();
        for _ in 0..20 {
            vad.process(&frame(&[0; 320]));
        }
        // -55 dBFS is far above a silent floor but under min_level_db.
        for _ in 0..10 {
            let d = vad.process(&square(-55.0));
            assert!(!d.speech && d.probability < 0.5);
        }
    }

    #[test]
    fn probability_is_half_at_threshold_and_monotonic() {
        let mut last = 0.0;
        for db in [-45.0f32, -42.0, -41.0, -40.0, -35.0, -20.0] {
            let mut vad = EnergyVad::new(EnergyVadOptions {
                initial_floor_db: -50.0,
                calibration: Duration::ZERO,
                ..Default::default()
            });
            let p = vad.process(&square(db)).probability;
            assert!(p > last, "{db}: {p} <= {last}");
            if db == -41.0 {
                assert!((p - 0.5).abs() < 0.05, "{p}");
            }
            last = p;
        }
    }

    #[test]
    fn calibration_measures_the_floor_from_the_quietest_frame() {
        let mut vad = EnergyVad::default();
        // A room at -45 dBFS: measured at once, never speech.
        let d = vad.process(&square(-45.0));
        assert!(!d.speech && d.probability < 0.1);
        assert!((vad.noise_floor_db() - d.level_db).abs() < 1e-3);
        // A quieter frame within the 100 ms lowers it; a louder one does not raise it.
        vad.process(&square(-50.0));
        vad.process(&square(-40.0));
        assert!(
            (vad.noise_floor_db() + 50.0).abs() < 0.1,
            "{}",
            vad.noise_floor_db()
        );
        // Without calibration the floor starts at initial_floor_db and -45 is speech.
        let mut raw = EnergyVad::new(EnergyVadOptions {
            calibration: Duration::ZERO,
            ..Default::default()
        });
        raw.process(&square(-45.0));
        assert!(raw.process(&square(-45.0)).speech);
    }

    #[test]
    fn reset_restores_the_initial_floor() {
        let mut vad = EnergyVad::default();
        for _ in 0..10 {
            vad.process(&frame(&[0; 320]));
        }
        for _ in 0..20 {
            vad.process(&square(-20.0));
        }
        assert!(vad.is_speaking());
        vad.reset();
        assert!(!vad.is_speaking());
        assert_eq!(vad.noise_floor_db(), -60.0);
        // And calibrates again: a loud first frame is taken for the background.
        assert!(!vad.process(&square(-20.0)).speech);
        assert!(!vad.process(&square(-20.0)).speech);
    }

    #[test]
    fn other_encodings_are_silence() {
        let f32_frame = AudioFrame::new(
            crate::audio::AudioFormat::new(AudioEncoding::PcmF32Le, 16_000, 1),
            vec![0x40u8; 1280],
        )
        .unwrap();
        let mut vad = EnergyVad::default();
        for _ in 0..5 {
            let d = vad.process(&f32_frame);
            assert!(!d.speech);
            assert_eq!(d.level_db, SILENCE_DB);
        }
    }

    #[test]
    fn options_parse_with_defaults_and_humantime_durations() {
        let o = EnergyVadOptions::from_value(&serde_json::Value::Null).unwrap();
        assert_eq!(o, EnergyVadOptions::default());
        let o = EnergyVadOptions::from_value(&serde_json::json!({
            "onset": "60ms", "hangover": "1s", "threshold_db": 12
        }))
        .unwrap();
        assert_eq!(o.onset, Duration::from_millis(60));
        assert_eq!(o.hangover, Duration::from_secs(1));
        assert_eq!(o.threshold_db, 12.0);
        assert_eq!(o.min_level_db, -50.0);
    }

    #[test]
    fn every_bad_range_is_reported() {
        let e = EnergyVadOptions::from_value(&serde_json::json!({
            "threshold_db": 0, "min_level_db": 3, "initial_floor_db": -200,
            "floor_rise_db_per_s": -1, "onset": "2s", "hangover": "6s",
            "calibration": "3s"
        }))
        .unwrap_err();
        assert_eq!(e.code, crate::ErrorCode::InvalidConfig);
        let keys: Vec<&str> = e.details.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "components.energy.calibration",
                "components.energy.floor_rise_db_per_s",
                "components.energy.hangover",
                "components.energy.initial_floor_db",
                "components.energy.min_level_db",
                "components.energy.onset",
                "components.energy.threshold_db",
            ]
        );
    }

    #[test]
    fn non_object_options_are_rejected() {
        let e = EnergyVadOptions::from_value(&serde_json::json!([1])).unwrap_err();
        assert_eq!(e.code, crate::ErrorCode::InvalidConfig);
        assert!(e.details.contains_key("components.energy"), "{e:?}");
    }
}
