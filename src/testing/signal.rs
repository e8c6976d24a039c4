//! Deterministic test signals in the pipeline's internal format
//! ([`INTERNAL_FORMAT`]: 16 kHz mono 16-bit PCM).
//!
//! Every generator is a pure function of its arguments: the same duration and
//! seed give the same samples on every run (a small xorshift generator, no
//! global state), so tests built on them are reproducible. Durations are
//! rounded down to whole samples.
//!
//! ```
//! use std::time::Duration;
//! use voice_backends::testing::signal;
//!
//! let mut audio = signal::utterance(Duration::from_secs(1), Duration::from_millis(500), 7);
//! audio = signal::mix(&audio, &signal::noise(Duration::from_millis(1500), -45.0, 8));
//! let frames = signal::frames(&audio, 20);
//! assert_eq!(frames.len(), 75);
//! ```

use std::f64::consts::PI;
use std::time::Duration;

use crate::audio::AudioFrame;
use crate::pipeline::INTERNAL_FORMAT;

/// Samples per second of every signal here (that of [`INTERNAL_FORMAT`]).
pub const SAMPLE_RATE: u32 = INTERNAL_FORMAT.sample_rate;

/// The average level of [`speech_like`] audio: -20 dBFS RMS.
pub const SPEECH_LEVEL_DBFS: f32 = -20.0;

/// Samples in `duration` at [`SAMPLE_RATE`], rounded down.
pub fn samples_in(duration: Duration) -> usize {
    (duration.as_nanos() * u128::from(SAMPLE_RATE) / 1_000_000_000) as usize
}

/// How long `samples` samples play at [`SAMPLE_RATE`].
pub fn duration_of(samples: usize) -> Duration {
    Duration::from_nanos(samples as u64 * 1_000_000_000 / u64::from(SAMPLE_RATE))
}

/// A xorshift64* generator: tiny, fast, deterministic, not for cryptography.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // SplitMix64 of the seed: distinct seeds give unrelated streams, and
        // the state is never zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Roughly standard normal (a sum of four uniforms, rescaled).
    fn gaussian(&mut self) -> f64 {
        let sum: f64 = (0..4).map(|_| self.unit()).sum();
        (sum - 2.0) * 3f64.sqrt()
    }
}

/// Scales `signal` so its RMS is `level_dbfs` (full scale 32768) and rounds it
/// to saturated 16-bit samples. All-zero input stays silent.
fn to_level(signal: &[f64], level_dbfs: f32) -> Vec<i16> {
    let n = signal.len().max(1) as f64;
    let rms = (signal.iter().map(|x| x * x).sum::<f64>() / n).sqrt();
    if rms == 0.0 {
        return vec![0; signal.len()];
    }
    let gain = 32768.0 * 10f64.powf(f64::from(level_dbfs) / 20.0) / rms;
    signal
        .iter()
        .map(|x| (x * gain).round().clamp(-32768.0, 32767.0) as i16)
        .collect()
}

/// Speech-like audio: voiced syllables at about 4 per second, averaging
/// [`SPEECH_LEVEL_DBFS`] (-20 dBFS RMS over the whole duration).
///
/// Each syllable lasts 160-260 ms and is a harmonic series (harmonics up to
/// 4 kHz, falling 6 dB per octave) on a fundamental between 120 and 220 Hz
/// that glides up or down by up to 15 % (intonation), plus a little breath
/// noise (about -30 dB relative). Its envelope rises within about 10 ms of
/// the syllable's start and falls back to nothing at its end; syllables are
/// separated by 40-90 ms gaps of silence, the dips an energy VAD sees between
/// syllables. Audio starts with a syllable at sample 0 (so speech onset is
/// the start of the buffer); the last syllable is cut at `duration`.
///
/// The same `duration` and `seed` give the same samples.
pub fn speech_like(duration: Duration, seed: u64) -> Vec<i16> {
    let n = samples_in(duration);
    let sr = f64::from(SAMPLE_RATE);
    let mut rng = Rng::new(seed);
    let mut out = vec![0f64; n];
    let mut phase = 0f64;
    let mut start = 0usize;
    while start < n {
        let voiced = (rng.range(0.160, 0.260) * sr) as usize;
        let gap = (rng.range(0.040, 0.090) * sr) as usize;
        let f_start = rng.range(130.0, 210.0);
        let f_end = (f_start * rng.range(0.85, 1.15)).clamp(120.0, 220.0);
        for i in 0..voiced.min(n - start) {
            let t = i as f64 / voiced as f64;
            // sin^0.5: about -8 dB 10 ms in, full level mid-syllable, 0 at the ends.
            let envelope = (PI * t).sin().max(0.0).sqrt();
            let f0 = f_start + (f_end - f_start) * t;
            phase = (phase + 2.0 * PI * f0 / sr) % (2.0 * PI);
            let harmonics = (4000.0 / f0) as usize;
            let mut voice = 0.0;
            for k in 1..=harmonics {
                voice += (k as f64 * phase).sin() / k as f64;
            }
            let breath = 0.03 * rng.gaussian();
            out[start + i] = envelope * (voice + breath);
        }
        start += voiced + gap;
    }
    to_level(&out, SPEECH_LEVEL_DBFS)
}

/// Digital silence: `duration` of zero samples.
pub fn silence(duration: Duration) -> Vec<i16> {
    vec![0; samples_in(duration)]
}

/// Steady background noise: white, roughly Gaussian, with an RMS level of
/// exactly `level_dbfs` (full scale 32768, e.g. -45.0 for a quiet office).
/// The same arguments give the same samples.
pub fn noise(duration: Duration, level_dbfs: f32, seed: u64) -> Vec<i16> {
    let mut rng = Rng::new(seed ^ 0x6E_6F69_7365);
    let raw: Vec<f64> = (0..samples_in(duration)).map(|_| rng.gaussian()).collect();
    to_level(&raw, level_dbfs)
}

/// `speech` of [`speech_like`] audio followed by `pause` of [`silence`]:
/// one utterance and the quiet after it.
pub fn utterance(speech: Duration, pause: Duration, seed: u64) -> Vec<i16> {
    let mut out = speech_like(speech, seed);
    out.extend(silence(pause));
    out
}

/// The sample-wise sum of `a` and `b`, saturating at the 16-bit limits; as
/// long as the longer of the two (the shorter is padded with silence).
/// Mixing [`noise`] under [`speech_like`] gives speech in a noisy room.
pub fn mix(a: &[i16], b: &[i16]) -> Vec<i16> {
    let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    long.iter()
        .enumerate()
        .map(|(i, &x)| x.saturating_add(short.get(i).copied().unwrap_or(0)))
        .collect()
}

/// The RMS level of `samples` in dBFS (full scale 32768); `-inf` for silence
/// or no samples.
pub fn rms_dbfs(samples: &[i16]) -> f32 {
    if samples.is_empty() {
        return f32::NEG_INFINITY;
    }
    let sum: f64 = samples.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    let rms = (sum / samples.len() as f64).sqrt() / 32768.0;
    (20.0 * rms.log10()) as f32
}

/// `samples` cut into [`INTERNAL_FORMAT`] frames of `frame_ms` milliseconds
/// each (20 for the pipeline's usual frames); the last frame is shorter when
/// the samples do not divide evenly. No samples give no frames.
///
/// # Panics
///
/// If `frame_ms` is 0.
pub fn frames(samples: &[i16], frame_ms: u32) -> Vec<AudioFrame> {
    assert!(frame_ms > 0, "frames need a non-zero duration");
    let per_frame = (SAMPLE_RATE / 1000 * frame_ms) as usize;
    samples
        .chunks(per_frame)
        .map(|chunk| {
            AudioFrame::from_i16(SAMPLE_RATE, INTERNAL_FORMAT.channels, chunk)
                .expect("16-bit mono frames of a valid format")
        })
        .collect()
}

/// The samples of s16le `frames`, concatenated (the inverse of [`frames`]).
pub fn samples_of<'a>(frames: impl IntoIterator<Item = &'a AudioFrame>) -> Vec<i16> {
    frames
        .into_iter()
        .flat_map(|f| {
            f.data()
                .chunks_exact(2)
                .map(|p| i16::from_le_bytes([p[0], p[1]]))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn generators_are_deterministic_and_seeded() {
        assert_eq!(speech_like(SEC, 1), speech_like(SEC, 1));
        assert_ne!(speech_like(SEC, 1), speech_like(SEC, 2));
        assert_eq!(noise(SEC, -40.0, 3), noise(SEC, -40.0, 3));
        assert_ne!(noise(SEC, -40.0, 3), noise(SEC, -40.0, 4));
    }

    #[test]
    fn lengths_follow_the_duration() {
        assert_eq!(speech_like(Duration::from_millis(1234), 0).len(), 19_744);
        assert_eq!(silence(Duration::from_millis(20)), vec![0; 320]);
        assert_eq!(noise(Duration::from_millis(5), -40.0, 0).len(), 80);
        assert_eq!(utterance(SEC, Duration::from_millis(500), 0).len(), 24_000);
        assert!(speech_like(Duration::ZERO, 0).is_empty());
    }

    #[test]
    fn levels_are_as_documented() {
        for seed in 0..4 {
            let s = rms_dbfs(&speech_like(Duration::from_secs(2), seed));
            assert!((s - SPEECH_LEVEL_DBFS).abs() < 0.1, "{s}");
            let n = rms_dbfs(&noise(SEC, -45.0, seed));
            assert!((n + 45.0).abs() < 0.1, "{n}");
        }
        assert_eq!(rms_dbfs(&silence(SEC)), f32::NEG_INFINITY);
    }

    #[test]
    fn speech_has_syllable_dips_and_starts_at_once() {
        let s = speech_like(Duration::from_secs(3), 9);
        let levels: Vec<f32> = s.chunks(320).map(rms_dbfs).collect();
        // The first 20 ms frame is already loud.
        assert!(levels[0] > -35.0, "{}", levels[0]);
        // Between syllables, frames fall far below the speech level.
        let dips = levels.iter().filter(|&&l| l < -60.0).count();
        assert!((5..=40).contains(&dips), "{dips} dips");
        // And most frames are voiced.
        let loud = levels.iter().filter(|&&l| l > -30.0).count();
        assert!(loud > levels.len() * 2 / 3, "{loud} of {}", levels.len());
    }

    #[test]
    fn speech_energy_is_in_the_voice_band() {
        // The fundamental is 120-220 Hz: count zero crossings of a mid
        // syllable, which for a harmonic series with 1/k amplitudes track
        // roughly the fundamental's rate times a small factor.
        let s = speech_like(Duration::from_millis(120), 5);
        let mid = &s[800..1920];
        let crossings = mid.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count();
        let per_second = crossings as f64 / (mid.len() as f64 / 16_000.0);
        assert!((200.0..3000.0).contains(&per_second), "{per_second}");
    }

    #[test]
    fn mix_saturates_and_pads() {
        assert_eq!(mix(&[30_000, 1, -30_000], &[10_000]), [32_767, 1, -30_000]);
        assert_eq!(mix(&[1], &[2, 3]), [3, 3]);
    }

    #[test]
    fn frames_round_trip() {
        let s = speech_like(Duration::from_millis(1010), 3);
        let f = frames(&s, 20);
        assert_eq!(f.len(), 51);
        assert!(
            f[..50]
                .iter()
                .all(|f| f.duration() == Duration::from_millis(20))
        );
        assert_eq!(f[50].duration(), Duration::from_millis(10));
        assert!(f.iter().all(|f| f.format() == INTERNAL_FORMAT));
        assert_eq!(samples_of(&f), s);
        assert!(frames(&[], 20).is_empty());
    }

    #[test]
    fn duration_conversions() {
        assert_eq!(samples_in(Duration::from_millis(20)), 320);
        assert_eq!(duration_of(16_000), SEC);
    }
}
