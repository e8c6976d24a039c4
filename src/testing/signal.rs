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

/// Where a pause of a [`RecordedTurn`] falls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PauseKind {
    /// Inside a sentence, after a phrase that goes on (a breath, a
    /// hesitation): the turn is not over.
    MidSentence,
    /// Between two sentences of the same turn: the turn is not over, but the
    /// sentence before it ended like a finished one.
    BetweenSentences,
    /// After the turn's last sentence: the turn is over.
    TurnEnd,
}

/// How a phrase's pitch behaves at a mid-sentence pause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boundary {
    /// Level: within a semitone of the phrase's line.
    Level,
    /// A continuation rise of 1.5-4 semitones.
    Rising,
    /// Level or rising, at random (half each).
    Mixed,
}

/// One sentence of a [`TurnPlan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SentencePlan {
    /// Phrases in the sentence (at least 1), separated by mid-sentence pauses.
    pub phrases: usize,
    /// A question (its end rises) rather than a statement (its end falls).
    pub question: bool,
}

/// What [`recorded_style_turn`] says: the sentences of a turn and its pauses.
#[derive(Clone, Debug, PartialEq)]
pub struct TurnPlan {
    /// Silence before the first syllable.
    pub lead: Duration,
    /// The sentences, in order (at least one).
    pub sentences: Vec<SentencePlan>,
    /// The range each mid-sentence pause is drawn from (uniform).
    pub mid_pause: (Duration, Duration),
    /// The range each pause between sentences is drawn from (uniform).
    pub sentence_pause: (Duration, Duration),
    /// The silence after the last sentence.
    pub end_pause: Duration,
    /// The pitch at mid-sentence pauses.
    pub boundary: Boundary,
}

impl TurnPlan {
    /// One statement of `phrases` phrases, 300 ms of lead silence, pauses of
    /// 150-700 ms inside it, level or rising at random, and `end_pause` after it.
    pub fn statement(phrases: usize, end_pause: Duration) -> Self {
        TurnPlan {
            lead: Duration::from_millis(300),
            sentences: vec![SentencePlan {
                phrases,
                question: false,
            }],
            mid_pause: (Duration::from_millis(150), Duration::from_millis(700)),
            sentence_pause: (Duration::from_millis(300), Duration::from_millis(700)),
            end_pause,
            boundary: Boundary::Mixed,
        }
    }

    /// A turn as conversations have them, drawn from `seed`: one sentence
    /// (70 %) or two, each of 1-3 phrases, a question one time in eight;
    /// pauses of 150-700 ms inside sentences and 300-700 ms between them,
    /// level or rising at random; `end_pause` after the turn.
    pub fn random(seed: u64, end_pause: Duration) -> Self {
        let mut rng = Rng::new(seed ^ 0x7475_726E);
        let count = if rng.unit() < 0.7 { 1 } else { 2 };
        let sentences = (0..count)
            .map(|_| SentencePlan {
                phrases: 1 + (rng.unit() * 3.0) as usize,
                question: rng.unit() < 0.125,
            })
            .collect();
        TurnPlan {
            sentences,
            ..TurnPlan::statement(1, end_pause)
        }
    }
}

/// A pause of a [`RecordedTurn`], in samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pause {
    /// The first silent sample: the end of the speech before the pause.
    pub start: usize,
    /// How many samples the pause lasts.
    pub len: usize,
    /// Where it falls.
    pub kind: PauseKind,
}

/// Audio of [`recorded_style_turn`] with where its pauses are.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedTurn {
    /// The audio in [`INTERNAL_FORMAT`].
    pub samples: Vec<i16>,
    /// Every pause after speech, in order (the lead silence is not one).
    pub pauses: Vec<Pause>,
}

impl RecordedTurn {
    /// Appends `other`, shifting its pauses.
    pub fn append(&mut self, other: RecordedTurn) {
        let offset = self.samples.len();
        self.samples.extend(other.samples);
        self.pauses.extend(other.pauses.into_iter().map(|p| Pause {
            start: p.start + offset,
            ..p
        }));
    }
}

/// One voiced syllable to render: duration, pitch (Hz) and gain (dB) at its
/// start and end.
struct Syllable {
    len: usize,
    f0: (f64, f64),
    gain_db: (f64, f64),
}

/// Recorded-style speech: a turn of sentences with the prosody real speech
/// has at its pauses, from `plan`, drawn from `seed`. **Synthetic**: no
/// recording is involved, and nothing here is a voice's spectrum beyond a
/// harmonic source; what it models is the timing, pitch and energy that turn
/// detection listens to:
///
/// * **Syllables** of 140-240 ms, 3-7 per phrase, voiced: a harmonic source
///   (amplitudes falling 2.5 dB per harmonic) on an F0 contour, with a little
///   breath noise, under a `sin^0.5` envelope. Between syllables, gaps of
///   30-90 ms, a third of them holding an unvoiced fricative (white noise,
///   differenced, about 15 dB under the vowels).
/// * **Pitch.** A speaker's base F0 of 95-220 Hz; within a phrase the line
///   declines by 1 semitone per second, each phrase starting half a semitone
///   lower than the last; one syllable in three carries an accent (1.5-3
///   semitones up), the others wander by up to ±0.7 semitones.
/// * **Phrase ends.** Every phrase's last syllable is lengthened by 40 %
///   (pre-boundary lengthening, so duration does not give the ending away).
///   A statement's last two syllables fall 4-7 semitones to the speaker's
///   floor and 8-12 dB in energy; a question's last syllable rises 4-8
///   semitones; a phrase before a mid-sentence pause stays level (within a
///   semitone) or rises 1.5-4 semitones (a continuation rise), by
///   [`TurnPlan::boundary`], losing at most 3 dB.
/// * **Pauses** of digital silence: the lead, mid-sentence and
///   between-sentence pauses drawn from the plan's ranges, the end pause.
///
/// The speech (everything but the pauses) averages [`SPEECH_LEVEL_DBFS`] RMS.
/// The same plan and seed give the same samples.
pub fn recorded_style_turn(plan: &TurnPlan, seed: u64) -> RecordedTurn {
    let sr = f64::from(SAMPLE_RATE);
    let mut rng = Rng::new(seed ^ 0x7072_6F73);
    let base = rng.range(95.0, 220.0);
    let st = |hz: f64, semis: f64| hz * 2f64.powf(semis / 12.0);
    let ms = |rng: &mut Rng, lo: f64, hi: f64| (rng.range(lo, hi) / 1000.0 * sr) as usize;
    let draw = |rng: &mut Rng, (lo, hi): (Duration, Duration)| {
        let (lo, hi) = (lo.as_secs_f64(), hi.as_secs_f64().max(lo.as_secs_f64()));
        (rng.range(lo, hi + f64::EPSILON) * sr) as usize
    };
    // The timeline: (syllable or silence or fricative) segments in order.
    enum Part {
        Voiced(Syllable),
        Gap { len: usize, fricative: usize },
        Pause(usize, Option<PauseKind>),
    }
    let mut parts = vec![Part::Pause(samples_in(plan.lead), None)];
    for (si, sentence) in plan.sentences.iter().enumerate() {
        let phrases = sentence.phrases.max(1);
        for p in 0..phrases {
            let last_phrase = p + 1 == phrases;
            let syllables = 3 + (rng.unit() * 5.0) as usize;
            let start_line = st(base, 2.0 - 0.5 * p as f64);
            let mut t = 0.0f64;
            for k in 0..syllables {
                let last = k + 1 == syllables;
                let penult = k + 2 == syllables;
                let mut len = ms(&mut rng, 140.0, 240.0);
                if last {
                    len = len * 7 / 5;
                }
                let line = st(start_line, -t);
                let accent = if rng.unit() < 1.0 / 3.0 {
                    rng.range(1.5, 3.0)
                } else {
                    rng.range(-0.7, 0.7)
                };
                let glide = rng.range(-0.5, 0.5);
                let level = rng.range(-2.0, 2.0);
                let mut f0 = (st(line, accent), st(line, accent + glide));
                let mut gain = (level, level);
                if last_phrase && !sentence.question {
                    // The final fall, over the last two syllables, to the floor.
                    let fall = rng.range(4.0, 7.0);
                    if penult {
                        f0 = (st(line, 0.5), st(line, -fall * 0.4));
                        gain = (-1.0, -4.0);
                    } else if last {
                        f0 = (st(line, -fall * 0.45), st(line, -fall));
                        gain = (-4.5, rng.range(-12.0, -8.0));
                    }
                } else if last && last_phrase {
                    let rise = rng.range(4.0, 8.0);
                    f0 = (line, st(line, rise));
                    gain = (0.0, -1.0);
                } else if last {
                    let rising = match plan.boundary {
                        Boundary::Level => false,
                        Boundary::Rising => true,
                        Boundary::Mixed => rng.unit() < 0.5,
                    };
                    let end = if rising {
                        rng.range(1.5, 4.0)
                    } else {
                        rng.range(-0.5, 0.5)
                    };
                    f0 = (st(line, rng.range(-0.3, 0.3)), st(line, end));
                    gain = (level.min(0.0), rng.range(-3.0, 0.0));
                }
                parts.push(Part::Voiced(Syllable {
                    len,
                    f0,
                    gain_db: gain,
                }));
                t += len as f64 / sr;
                if !last {
                    let gap = ms(&mut rng, 30.0, 90.0);
                    let fricative = if rng.unit() < 1.0 / 3.0 {
                        gap.min(ms(&mut rng, 40.0, 70.0))
                    } else {
                        0
                    };
                    t += gap as f64 / sr;
                    parts.push(Part::Gap {
                        len: gap,
                        fricative,
                    });
                }
            }
            let pause = if !last_phrase {
                (draw(&mut rng, plan.mid_pause), PauseKind::MidSentence)
            } else if si + 1 < plan.sentences.len() {
                (
                    draw(&mut rng, plan.sentence_pause),
                    PauseKind::BetweenSentences,
                )
            } else {
                (samples_in(plan.end_pause), PauseKind::TurnEnd)
            };
            parts.push(Part::Pause(pause.0, Some(pause.1)));
        }
    }
    // Render.
    let total: usize = parts
        .iter()
        .map(|p| match p {
            Part::Voiced(s) => s.len,
            Part::Gap { len, .. } | Part::Pause(len, _) => *len,
        })
        .sum();
    let mut out = vec![0f64; total];
    let mut pauses = Vec::new();
    let mut at = 0usize;
    let mut phase = 0f64;
    let a = 0.75f64; // harmonic k has amplitude a^k: -2.5 dB per harmonic
    let mut speech_energy = 0f64;
    let mut speech_samples = 0usize;
    for part in &parts {
        match part {
            Part::Voiced(s) => {
                let (ls, le) = (s.f0.0.ln(), s.f0.1.ln());
                for i in 0..s.len {
                    let t = i as f64 / s.len as f64;
                    let envelope = (PI * t).sin().max(0.0).sqrt();
                    let f0 = (ls + (le - ls) * t).exp();
                    let gain = 10f64.powf((s.gain_db.0 + (s.gain_db.1 - s.gain_db.0) * t) / 20.0);
                    phase = (phase + 2.0 * PI * f0 / sr) % (2.0 * PI);
                    // sum over k >= 1 of a^k sin(k phase), in closed form.
                    let voice = a * phase.sin() / (1.0 - 2.0 * a * phase.cos() + a * a);
                    let breath = 0.05 * rng.gaussian();
                    let v = gain * envelope * (voice + breath);
                    speech_energy += v * v;
                    out[at + i] = v;
                }
                speech_samples += s.len;
                at += s.len;
            }
            Part::Gap { len, fricative } => {
                let offset = (len - fricative) / 2;
                let mut prev = 0.0;
                for i in 0..*fricative {
                    let t = i as f64 / *fricative as f64;
                    let n = rng.gaussian();
                    let v = 0.35 * (PI * t).sin() * (n - prev);
                    prev = n;
                    speech_energy += v * v;
                    out[at + offset + i] = v;
                }
                speech_samples += len;
                at += len;
            }
            Part::Pause(len, kind) => {
                if let Some(kind) = kind {
                    pauses.push(Pause {
                        start: at,
                        len: *len,
                        kind: *kind,
                    });
                }
                at += len;
            }
        }
    }
    let rms = (speech_energy / speech_samples.max(1) as f64).sqrt();
    let gain = if rms > 0.0 {
        32768.0 * 10f64.powf(f64::from(SPEECH_LEVEL_DBFS) / 20.0) / rms
    } else {
        0.0
    };
    let samples = out
        .iter()
        .map(|x| (x * gain).round().clamp(-32768.0, 32767.0) as i16)
        .collect();
    RecordedTurn { samples, pauses }
}

/// `turns` turns of [`TurnPlan::random`] back to back (each with its 300 ms
/// lead and followed by `end_pause` of silence), all drawn from `seed`; each
/// turn draws its own voice (base F0), as if speakers took turns.
pub fn recorded_style_conversation(turns: usize, end_pause: Duration, seed: u64) -> RecordedTurn {
    let mut all = RecordedTurn {
        samples: Vec::new(),
        pauses: Vec::new(),
    };
    for t in 0..turns as u64 {
        let turn_seed = seed.wrapping_mul(1_000_003).wrapping_add(t);
        all.append(recorded_style_turn(
            &TurnPlan::random(turn_seed, end_pause),
            turn_seed,
        ));
    }
    all
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

    fn voiced_tones(samples: &[i16]) -> Vec<f32> {
        use crate::pipeline::builtin::adaptive::pitch::estimate_f0;
        samples
            .chunks_exact(640)
            .filter_map(|w| estimate_f0(w, SAMPLE_RATE))
            .map(|p| 12.0 * (p.hz / 100.0).log2())
            .collect()
    }

    fn median(mut v: Vec<f32>) -> f32 {
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    }

    #[test]
    fn recorded_turns_are_deterministic_and_annotated() {
        let plan = TurnPlan::statement(3, Duration::from_millis(800));
        let t = recorded_style_turn(&plan, 4);
        assert_eq!(t, recorded_style_turn(&plan, 4));
        assert_ne!(t.samples, recorded_style_turn(&plan, 5).samples);
        let kinds: Vec<PauseKind> = t.pauses.iter().map(|p| p.kind).collect();
        assert_eq!(
            kinds,
            [
                PauseKind::MidSentence,
                PauseKind::MidSentence,
                PauseKind::TurnEnd
            ]
        );
        for p in &t.pauses {
            assert!(t.samples[p.start..p.start + p.len].iter().all(|&s| s == 0));
            // Speech right before each pause.
            assert!(rms_dbfs(&t.samples[p.start - 1600..p.start]) > -40.0);
        }
        for p in &t.pauses[..2] {
            assert!((2400..=11_200).contains(&p.len), "150-700 ms: {p:?}");
        }
        assert_eq!(t.pauses[2].len, 12_800);
        assert_eq!(t.pauses[2].start + t.pauses[2].len, t.samples.len());
        // The lead silence.
        assert!(t.samples[..4800].iter().all(|&s| s == 0));
        // Speech at the documented level.
        let mut speech = Vec::new();
        let mut at = 4800;
        for p in &t.pauses {
            speech.extend_from_slice(&t.samples[at..p.start]);
            at = p.start + p.len;
        }
        assert!((rms_dbfs(&speech) - SPEECH_LEVEL_DBFS).abs() < 0.5);
        // Conversations join turns and shift their pauses.
        let c = recorded_style_conversation(3, Duration::from_secs(1), 9);
        assert_eq!(
            c.pauses
                .iter()
                .filter(|p| p.kind == PauseKind::TurnEnd)
                .count(),
            3
        );
        assert!(c.pauses.windows(2).all(|w| w[0].start < w[1].start));
    }

    #[test]
    fn statements_end_low_and_mid_sentence_pauses_do_not() {
        for seed in 0..6 {
            let plan = TurnPlan {
                boundary: Boundary::Level,
                ..TurnPlan::statement(2, Duration::from_millis(500))
            };
            let t = recorded_style_turn(&plan, seed);
            let (mid, end) = (t.pauses[0], t.pauses[1]);
            let all = median(voiced_tones(&t.samples));
            // The last 240 ms before each pause.
            let before = |p: Pause| median(voiced_tones(&t.samples[p.start - 3840..p.start]));
            let at_mid = before(mid) - all;
            let at_end = before(end) - all;
            assert!(at_mid.abs() < 1.5, "seed {seed}: level pause {at_mid} st");
            assert!(at_end < -2.5, "seed {seed}: final fall {at_end} st");
            let level = |p: Pause| rms_dbfs(&t.samples[p.start - 3840..p.start]);
            assert!(
                level(end) < level(mid) - 3.0,
                "seed {seed}: the end is quieter"
            );
        }
        let rising = TurnPlan {
            boundary: Boundary::Rising,
            ..TurnPlan::statement(2, Duration::from_millis(500))
        };
        let t = recorded_style_turn(&rising, 1);
        let p = t.pauses[0];
        // The last 120 ms against the 120 ms before: still rising.
        let rise = median(voiced_tones(&t.samples[p.start - 1920..p.start]))
            - median(voiced_tones(&t.samples[p.start - 3840..p.start - 1920]));
        assert!(rise > 0.3, "a continuation rise: {rise} st");
    }

    #[test]
    fn duration_conversions() {
        assert_eq!(samples_in(Duration::from_millis(20)), 320);
        assert_eq!(duration_of(16_000), SEC);
    }
}
