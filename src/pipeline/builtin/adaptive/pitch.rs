//! A cheap fundamental-frequency (F0) estimator for voiced speech: YIN's
//! cumulative mean normalized difference on audio decimated to about 8 kHz.
//!
//! [`estimate_f0`] looks at a short window (40 ms is enough for voices down to
//! 70 Hz) and returns the F0 with YIN's aperiodicity (0 for a pure periodic
//! signal, towards 1 for noise), or `None` when the window is not periodic
//! enough to call voiced. The [`AdaptiveTurnDetector`](super::AdaptiveTurnDetector)
//! runs it only on frames the VAD calls speech.
//!
//! Reference: A. de Cheveigné and H. Kawahara, "YIN, a fundamental frequency
//! estimator for speech and music", JASA 111(4), 2002 (steps 2-5: difference
//! function, cumulative mean normalization, absolute threshold, parabolic
//! interpolation).

/// The lowest F0 searched, in Hz (low male voices).
pub const MIN_F0_HZ: f32 = 70.0;
/// The highest F0 searched, in Hz (children, high female voices).
pub const MAX_F0_HZ: f32 = 400.0;
/// YIN's absolute threshold: a window whose best normalized difference is
/// above it is not voiced.
pub const APERIODICITY_THRESHOLD: f32 = 0.2;

/// The rate the estimator works at: input is averaged down by an integer
/// factor to at least this rate (16 kHz -> 8 kHz).
const WORK_RATE: u32 = 8_000;

/// The F0 of a voiced window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pitch {
    /// The fundamental frequency in Hz.
    pub hz: f32,
    /// YIN's normalized difference at the chosen period, 0..=1: lower is
    /// more periodic.
    pub aperiodicity: f32,
}

/// Reusable work space for [`estimate_f0_with`] (no allocation per call once
/// it has grown to the window's size).
#[derive(Clone, Debug, Default)]
pub struct PitchScratch {
    x: Vec<f32>,
    d: Vec<f32>,
}

/// The F0 of `samples` (mono, `sample_rate` Hz) between [`MIN_F0_HZ`] and
/// [`MAX_F0_HZ`], or `None` when the window is unvoiced (noise, silence) or
/// too short (it needs one integration window, 20 ms, plus the longest
/// period, about 14 ms).
///
/// ```
/// use voice_backends::pipeline::builtin::adaptive::pitch::estimate_f0;
///
/// let tone: Vec<i16> = (0..640)
///     .map(|i| (8000.0 * (2.0 * std::f32::consts::PI * 150.0 * i as f32 / 16_000.0).sin()) as i16)
///     .collect();
/// let p = estimate_f0(&tone, 16_000).unwrap();
/// assert!((p.hz - 150.0).abs() < 1.5);
/// ```
pub fn estimate_f0(samples: &[i16], sample_rate: u32) -> Option<Pitch> {
    estimate_f0_with(&mut PitchScratch::default(), samples, sample_rate)
}

/// [`estimate_f0`] with caller-held work space.
pub fn estimate_f0_with(
    scratch: &mut PitchScratch,
    samples: &[i16],
    sample_rate: u32,
) -> Option<Pitch> {
    if sample_rate == 0 {
        return None;
    }
    let factor = (sample_rate / WORK_RATE).max(1) as usize;
    let rate = sample_rate as f32 / factor as f32;
    // Average `factor` samples: a crude low-pass that keeps F0 and the first
    // harmonics, which is all YIN needs.
    scratch.x.clear();
    scratch.x.extend(
        samples
            .chunks_exact(factor)
            .map(|c| c.iter().map(|&s| f32::from(s)).sum::<f32>() / factor as f32),
    );
    let x = &scratch.x;
    let min_lag = (rate / MAX_F0_HZ).floor().max(2.0) as usize;
    let max_lag = (rate / MIN_F0_HZ).ceil() as usize;
    // The integration window: 20 ms, or what the input leaves after the
    // longest lag.
    let window = ((rate * 0.020) as usize).min(x.len().saturating_sub(max_lag + 1));
    if window < (rate * 0.010) as usize {
        return None;
    }
    let energy: f32 = x[..window + max_lag].iter().map(|v| v * v).sum();
    if energy <= f32::EPSILON {
        return None;
    }
    // Step 2 and 3: difference function and its cumulative mean normalization.
    scratch.d.clear();
    scratch.d.resize(max_lag + 2, 1.0);
    let d = &mut scratch.d;
    let mut running = 0.0f32;
    for tau in 1..=max_lag + 1 {
        let mut sum = 0.0f32;
        for j in 0..window {
            let diff = x[j] - x[j + tau];
            sum += diff * diff;
        }
        running += sum;
        d[tau] = if running > 0.0 {
            sum * tau as f32 / running
        } else {
            1.0
        };
    }
    // Step 4: the first lag under the threshold, followed down to its local
    // minimum; failing that, no pitch.
    let mut tau = min_lag;
    let mut found = None;
    while tau <= max_lag {
        if d[tau] < APERIODICITY_THRESHOLD {
            while tau < max_lag && d[tau + 1] < d[tau] {
                tau += 1;
            }
            found = Some(tau);
            break;
        }
        tau += 1;
    }
    let tau = found?;
    // Step 5: parabolic interpolation around the minimum.
    let (a, b, c) = (d[tau - 1], d[tau], d[tau + 1]);
    let denom = a - 2.0 * b + c;
    let shift = if denom.abs() > f32::EPSILON {
        (0.5 * (a - c) / denom).clamp(-0.5, 0.5)
    } else {
        0.0
    };
    let hz = rate / (tau as f32 + shift);
    (MIN_F0_HZ * 0.95..=MAX_F0_HZ * 1.05)
        .contains(&hz)
        .then_some(Pitch {
            hz,
            aperiodicity: b.clamp(0.0, 1.0),
        })
}

/// The interval from `from_hz` to `to_hz` in semitones (positive when rising).
pub fn semitones(from_hz: f32, to_hz: f32) -> f32 {
    12.0 * (to_hz / from_hz).log2()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f32::consts::PI;

    fn tone(hz: f32, rate: u32, ms: u32, amplitude: f32) -> Vec<i16> {
        let n = (rate * ms / 1000) as usize;
        (0..n)
            .map(|i| (amplitude * (2.0 * PI * hz * i as f32 / rate as f32).sin()) as i16)
            .collect()
    }

    #[test]
    fn pure_tones_across_the_voice_range() {
        for hz in [75.0, 100.0, 130.0, 180.0, 220.0, 300.0, 380.0] {
            let p = estimate_f0(&tone(hz, 16_000, 40, 8000.0), 16_000)
                .unwrap_or_else(|| panic!("{hz} Hz is voiced"));
            assert!(
                (p.hz - hz).abs() / hz < 0.01,
                "{hz} Hz estimated as {}",
                p.hz
            );
            assert!(p.aperiodicity < 0.05, "{hz}: {p:?}");
        }
    }

    #[test]
    fn other_rates_and_quiet_tones() {
        let p = estimate_f0(&tone(200.0, 8_000, 40, 8000.0), 8_000).unwrap();
        assert!((p.hz - 200.0).abs() < 2.0, "{p:?}");
        let p = estimate_f0(&tone(120.0, 48_000, 40, 8000.0), 48_000).unwrap();
        assert!((p.hz - 120.0).abs() < 1.5, "{p:?}");
        // The level does not matter, only periodicity.
        let p = estimate_f0(&tone(160.0, 16_000, 40, 100.0), 16_000).unwrap();
        assert!((p.hz - 160.0).abs() < 1.6, "{p:?}");
    }

    #[test]
    fn a_harmonic_voice_gives_its_fundamental_not_a_harmonic() {
        let rate = 16_000;
        let f0 = 140.0;
        let v: Vec<i16> = (0..640)
            .map(|i| {
                let t = i as f32 / rate as f32;
                let s: f32 = (1..=20)
                    .map(|k| (2.0 * PI * f0 * k as f32 * t).sin() / k as f32)
                    .sum();
                (3000.0 * s) as i16
            })
            .collect();
        let p = estimate_f0(&v, rate).unwrap();
        assert!((p.hz - f0).abs() < 2.0, "{p:?}");
    }

    #[test]
    fn noise_silence_and_short_windows_are_unvoiced() {
        let mut state = 0x1234_5678u32;
        let noise: Vec<i16> = (0..640)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state as i16) / 4
            })
            .collect();
        assert_eq!(estimate_f0(&noise, 16_000), None);
        assert_eq!(estimate_f0(&[0; 640], 16_000), None);
        assert_eq!(estimate_f0(&tone(150.0, 16_000, 10, 8000.0), 16_000), None);
        assert_eq!(estimate_f0(&[], 16_000), None);
        assert_eq!(estimate_f0(&tone(150.0, 16_000, 40, 8000.0), 0), None);
    }

    #[test]
    fn semitone_intervals() {
        assert!((semitones(100.0, 200.0) - 12.0).abs() < 1e-4);
        assert!((semitones(200.0, 100.0) + 12.0).abs() < 1e-4);
        assert_eq!(semitones(150.0, 150.0), 0.0);
    }
}
