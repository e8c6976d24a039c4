//! Audio conversion: s16/f32 scaling, G.711, channel mixing, band-limited
//! streaming resampling, the pass-through fast path, levels, and robustness
//! against arbitrary input.

use std::f64::consts::PI;
use std::time::Duration;

use voice_backends::ErrorCode;
use voice_backends::audio::{
    AudioConverter, AudioEncoding, AudioFormat, AudioFrame, FormatFollower, alaw_decode,
    alaw_encode, convert_frame, f32_to_i16, i16_to_f32, level_dbfs, mulaw_decode, mulaw_encode,
    to_i16_samples,
};

use AudioEncoding::{Alaw, Mulaw, PcmF32Le, PcmS16Le};

mod integer_ratios;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn format(encoding: AudioEncoding, rate: u32, channels: u16) -> AudioFormat {
    AudioFormat::new(encoding, rate, channels)
}

fn f32_frame(rate: u32, channels: u16, samples: &[f32]) -> AudioFrame {
    let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    AudioFrame::new(format(PcmF32Le, rate, channels), bytes).unwrap()
}

fn f32_samples(frame: &AudioFrame) -> Vec<f32> {
    assert_eq!(frame.format().encoding, PcmF32Le);
    frame
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn sine(rate: u32, freq: f64, amplitude: f64, frames: usize) -> Vec<f32> {
    (0..frames)
        .map(|i| (amplitude * (2.0 * PI * freq * i as f64 / rate as f64).sin()) as f32)
        .collect()
}

/// Resamples mono f32 `input` from `from` to `to` Hz, fed in frames of the
/// sizes in `chunks` (cycled), then flushed; returns all output samples.
fn resample(from: u32, to: u32, input: &[f32], chunks: &[usize]) -> Vec<f32> {
    let mut converter =
        AudioConverter::new(format(PcmF32Le, from, 1), format(PcmF32Le, to, 1)).unwrap();
    assert!(converter.resamples());
    let mut out = Vec::new();
    let mut rest = input;
    let mut sizes = chunks.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap()).min(rest.len());
        let (head, tail) = rest.split_at(n);
        rest = tail;
        if let Some(frame) = converter.convert(&f32_frame(from, 1, head)).unwrap() {
            assert_eq!(frame.format(), format(PcmF32Le, to, 1));
            out.extend(f32_samples(&frame));
        }
    }
    if let Some(frame) = converter.flush().unwrap() {
        out.extend(f32_samples(&frame));
    }
    out
}

/// 20 ms frames at `rate`.
fn frames_20ms(rate: u32) -> Vec<usize> {
    vec![rate as usize / 50]
}

/// A Hann-windowed signal, ready for [`Windowed::amplitude`].
struct Windowed {
    samples: Vec<f64>,
    gain: f64,
}

impl Windowed {
    fn new(x: &[f32]) -> Self {
        let n = x.len();
        let mut gain = 0.0;
        let samples = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let win = 0.5 - 0.5 * (2.0 * PI * i as f64 / (n - 1) as f64).cos();
                gain += win;
                v as f64 * win
            })
            .collect();
        Windowed { samples, gain }
    }

    /// Amplitude of the component at `freq` Hz (Goertzel filter), scaled so
    /// a sine of amplitude A measures A.
    fn amplitude(&self, rate: u32, freq: f64) -> f64 {
        let coeff = 2.0 * (2.0 * PI * freq / rate as f64).cos();
        let (mut s1, mut s2) = (0.0f64, 0.0f64);
        for &v in &self.samples {
            let s = v + coeff * s1 - s2;
            s2 = s1;
            s1 = s;
        }
        let power = (s1 * s1 + s2 * s2 - coeff * s1 * s2).max(0.0);
        2.0 * power.sqrt() / self.gain
    }
}

/// Amplitude of the component of `x` at `freq` Hz.
fn tone_amplitude(x: &[f32], rate: u32, freq: f64) -> f64 {
    Windowed::new(x).amplitude(rate, freq)
}

fn rms(x: &[f32]) -> f64 {
    (x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64).sqrt()
}

fn db(ratio: f64) -> f64 {
    20.0 * ratio.log10()
}

/// The middle of a signal: `margin` samples dropped at both ends (filter edges).
fn middle(x: &[f32], margin: usize) -> &[f32] {
    &x[margin..x.len() - margin]
}

fn expected_len(frames: usize, from: u32, to: u32) -> usize {
    (frames as u64 * to as u64).div_ceil(from as u64) as usize
}

/// The rate pairs of the brief, plus the reverse directions used in practice.
const RATE_PAIRS: [(u32, u32); 9] = [
    (16_000, 48_000),
    (48_000, 16_000),
    (8_000, 16_000),
    (16_000, 8_000),
    (16_000, 24_000),
    (44_100, 16_000),
    (44_100, 48_000),
    (48_000, 44_100),
    (48_000, 8_000),
];

// ---------------------------------------------------------------------------
// s16 <-> f32
// ---------------------------------------------------------------------------

#[test]
fn s16_to_f32_divides_by_32768() {
    assert_eq!(i16_to_f32(-32768), -1.0);
    assert_eq!(i16_to_f32(0), 0.0);
    assert_eq!(i16_to_f32(32767), 32767.0 / 32768.0);
    assert_eq!(i16_to_f32(16384), 0.5);
    assert_eq!(i16_to_f32(-1), -1.0 / 32768.0);

    let frame = AudioFrame::from_i16(16_000, 1, &[-32768, 0, 32767, 1]).unwrap();
    let out = convert_frame(&frame, format(PcmF32Le, 16_000, 1)).unwrap();
    assert_eq!(
        f32_samples(&out),
        [-1.0, 0.0, 32767.0 / 32768.0, 1.0 / 32768.0]
    );
}

#[test]
fn f32_to_s16_clamps_scales_and_rounds() {
    assert_eq!(f32_to_i16(-1.0), -32768);
    assert_eq!(f32_to_i16(0.0), 0);
    assert_eq!(f32_to_i16(-0.0), 0);
    assert_eq!(f32_to_i16(1.0), 32767, "+1.0 saturates at 32767");
    assert_eq!(f32_to_i16(32767.0 / 32768.0), 32767);
    assert_eq!(f32_to_i16(0.5), 16384);
    assert_eq!(f32_to_i16(-0.5), -16384);
    assert_eq!(f32_to_i16(1.5), 32767);
    assert_eq!(f32_to_i16(-7.0), -32768);
    assert_eq!(f32_to_i16(f32::INFINITY), 32767);
    assert_eq!(f32_to_i16(f32::NEG_INFINITY), -32768);
    assert_eq!(f32_to_i16(f32::NAN), 0);
    // Half a step rounds away from zero; less than half rounds toward it.
    assert_eq!(f32_to_i16(0.5 / 32768.0), 1);
    assert_eq!(f32_to_i16(-0.5 / 32768.0), -1);
    assert_eq!(f32_to_i16(0.49 / 32768.0), 0);
    assert_eq!(f32_to_i16(1.51 / 32768.0), 2);
    // Just under half a step (0.49999997 when scaled) rounds toward zero,
    // though in f32 the sum with 0.5 would round up to 1.
    let just_under = f32::from_bits((0.5f32 / 32768.0).to_bits() - 1);
    assert_eq!(f32_to_i16(just_under), 0);
    assert_eq!(f32_to_i16(-just_under), 0);
    // Every f32 from -1 to 1 in steps of a thousandth of a step agrees with
    // rounding half away from zero done in f64.
    for i in -32_768_000i32..=32_768_000 {
        if i % 7 != 0 {
            continue;
        }
        let x = i as f32 / 32_768_000.0;
        let want = (f64::from(x * 32768.0)).round().clamp(-32768.0, 32767.0) as i16;
        assert_eq!(f32_to_i16(x), want, "{x:e}");
    }

    let out = convert_frame(
        &f32_frame(16_000, 1, &[-1.0, 0.0, 1.0, 2.0, f32::NAN, -0.25]),
        format(PcmS16Le, 16_000, 1),
    )
    .unwrap();
    assert_eq!(to_i16_samples(&out), [-32768, 0, 32767, 32767, 0, -8192]);
}

/// `f32_to_i16` rounds in f32 without converting through f64 (so buffers of
/// it vectorise); across the whole float range, ties included, it gives what
/// the f64 definition gives.
#[test]
fn f32_to_s16_matches_its_f64_definition_across_the_float_range() {
    fn reference(sample: f32) -> i16 {
        let scaled = f64::from(sample.clamp(-1.0, 1.0) * 32768.0);
        (scaled + 0.5f64.copysign(scaled)) as i16
    }
    let mut checked = 0u64;
    for bits in (0..=u32::MAX).step_by(4_099) {
        let v = f32::from_bits(bits);
        assert_eq!(f32_to_i16(v), reference(v), "{v:e} ({bits:#x})");
        checked += 1;
    }
    // Every half-way point and its neighbours, where rounding differs.
    for k in -65_536i32..=65_536 {
        let tie = k as f32 / 65_536.0;
        for v in [tie, tie.next_up(), tie.next_down()] {
            assert_eq!(f32_to_i16(v), reference(v), "{v:e}");
            checked += 1;
        }
    }
    assert!(checked > 1_000_000);
}

#[test]
fn every_s16_value_survives_f32_and_back() {
    let all: Vec<i16> = (i16::MIN..=i16::MAX).collect();
    let frame = AudioFrame::from_i16(8_000, 1, &all).unwrap();
    let f = convert_frame(&frame, format(PcmF32Le, 8_000, 1)).unwrap();
    let back = convert_frame(&f, format(PcmS16Le, 8_000, 1)).unwrap();
    assert_eq!(to_i16_samples(&back), all);
    assert_eq!(back.data(), frame.data());
}

#[test]
fn f32_output_is_clamped_and_never_nan() {
    // f32 -> f32 with a channel change goes through the sanitiser.
    let out = convert_frame(
        &f32_frame(16_000, 1, &[2.0, -3.0, f32::NAN, f32::INFINITY, 0.25]),
        format(PcmF32Le, 16_000, 2),
    )
    .unwrap();
    assert_eq!(
        f32_samples(&out),
        [1.0, 1.0, -1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 0.25, 0.25]
    );
}

// ---------------------------------------------------------------------------
// G.711
// ---------------------------------------------------------------------------

#[test]
fn mulaw_decodes_known_code_points() {
    // ITU-T G.711 mu-law (on the 16-bit scale of the reference decoder).
    assert_eq!(mulaw_decode(0xFF), 0);
    assert_eq!(mulaw_decode(0x7F), 0);
    assert_eq!(mulaw_decode(0xFE), 8);
    assert_eq!(mulaw_decode(0x7E), -8);
    assert_eq!(mulaw_decode(0xF0), 120); // top of segment 0: 15 steps of 8
    assert_eq!(mulaw_decode(0xEF), 132); // bottom of segment 1
    assert_eq!(mulaw_decode(0xCF), 924);
    assert_eq!(mulaw_decode(0x8F), 16764); // bottom of segment 7
    assert_eq!(mulaw_decode(0x81), 31100);
    assert_eq!(mulaw_decode(0x80), 32124);
    assert_eq!(mulaw_decode(0x00), -32124);
    // Symmetry: flipping the sign bit negates.
    for code in 0..=0x7Fu8 {
        assert_eq!(
            mulaw_decode(code),
            -mulaw_decode(code | 0x80),
            "code {code:#04x}"
        );
    }
}

#[test]
fn alaw_decodes_known_code_points() {
    // ITU-T G.711 A-law (on the 16-bit scale of the reference decoder).
    assert_eq!(alaw_decode(0xD5), 8);
    assert_eq!(alaw_decode(0x55), -8);
    assert_eq!(alaw_decode(0xD4), 24);
    assert_eq!(alaw_decode(0xC5), 264); // bottom of segment 1
    assert_eq!(alaw_decode(0xE5), 1056); // bottom of segment 3
    assert_eq!(alaw_decode(0xAA), 32256);
    assert_eq!(alaw_decode(0x2A), -32256);
    for code in 0..=0x7Fu8 {
        assert_eq!(
            alaw_decode(code),
            -alaw_decode(code | 0x80),
            "code {code:#04x}"
        );
    }
}

#[test]
fn g711_encodes_known_values() {
    assert_eq!(mulaw_encode(0), 0xFF);
    assert_eq!(mulaw_encode(8), 0xFE);
    assert_eq!(mulaw_encode(-8), 0x7E);
    assert_eq!(mulaw_encode(32767), 0x80);
    assert_eq!(mulaw_encode(-32768), 0x00);
    assert_eq!(mulaw_encode(32124), 0x80);
    assert_eq!(alaw_encode(0), 0xD5);
    assert_eq!(alaw_encode(8), 0xD5);
    assert_eq!(alaw_encode(-8), 0x55);
    assert_eq!(alaw_encode(32767), 0xAA);
    assert_eq!(alaw_encode(-32768), 0x2A);
}

#[test]
fn every_g711_code_survives_decode_then_encode() {
    for code in 0..=255u8 {
        assert_eq!(alaw_encode(alaw_decode(code)), code, "A-law {code:#04x}");
        // 0x7F is mu-law's negative zero; zero encodes as 0xFF.
        let expected = if code == 0x7F { 0xFF } else { code };
        assert_eq!(
            mulaw_encode(mulaw_decode(code)),
            expected,
            "mu-law {code:#04x}"
        );
    }
}

/// Every 16-bit value encodes to one of the two reconstruction levels around
/// it: the G.711 quantisation error, never more.
fn assert_within_quantisation(name: &str, decode: fn(u8) -> i16, encode: fn(i16) -> u8) {
    let mut levels: Vec<i32> = (0..=255u8).map(|c| i32::from(decode(c))).collect();
    levels.sort_unstable();
    levels.dedup();
    let (lowest, highest) = (levels[0], *levels.last().unwrap());
    let mut worst = 0i32;
    for x in i16::MIN..=i16::MAX {
        let x32 = i32::from(x);
        let y = i32::from(decode(encode(x)));
        if x32 >= highest {
            assert_eq!(y, highest, "{name}: {x} clips to the top level");
            continue;
        }
        if x32 <= lowest {
            assert_eq!(y, lowest, "{name}: {x} clips to the bottom level");
            continue;
        }
        let above = levels.partition_point(|&l| l < x32);
        let hi = levels[above];
        let lo = if levels[above] == x32 {
            x32
        } else {
            levels[above - 1]
        };
        assert!(
            y == lo || y == hi,
            "{name}: {x} decoded as {y}, outside the levels {lo}..={hi} around it"
        );
        worst = worst.max((y - x32).abs());
    }
    // The largest step (top segment) is 1024 (mu-law) or 1024 (A-law).
    assert!(worst <= 1024, "{name}: worst error {worst}");
}

#[test]
fn g711_round_trip_is_within_quantisation_error() {
    assert_within_quantisation("mu-law", mulaw_decode, mulaw_encode);
    assert_within_quantisation("A-law", alaw_decode, alaw_encode);
    // Small values keep a small absolute error (segment 0 steps of 8 / 16).
    for x in -100i16..=100 {
        assert!((mulaw_decode(mulaw_encode(x)) - x).abs() <= 8, "mu-law {x}");
        assert!((alaw_decode(alaw_encode(x)) - x).abs() <= 16, "A-law {x}");
    }
}

#[test]
fn g711_frames_convert_through_the_tables() {
    let codes: Vec<u8> = (0..=255u8).collect();
    for (encoding, decode) in [(Mulaw, mulaw_decode as fn(u8) -> i16), (Alaw, alaw_decode)] {
        let frame = AudioFrame::new(format(encoding, 8_000, 1), codes.clone()).unwrap();
        let expected: Vec<i16> = codes.iter().map(|&c| decode(c)).collect();
        let pcm = convert_frame(&frame, format(PcmS16Le, 8_000, 1)).unwrap();
        assert_eq!(to_i16_samples(&pcm), expected);
        assert_eq!(to_i16_samples(&frame), expected);
    }
    let pcm = AudioFrame::from_i16(8_000, 1, &[0, 8, -8, 32767, -32768]).unwrap();
    let mu = convert_frame(&pcm, format(Mulaw, 8_000, 1)).unwrap();
    assert_eq!(&mu.data()[..], [0xFF, 0xFE, 0x7E, 0x80, 0x00]);
    let a = convert_frame(&pcm, format(Alaw, 8_000, 1)).unwrap();
    assert_eq!(&a.data()[..], [0xD5, 0xD5, 0x55, 0xAA, 0x2A]);
    // mu-law -> A-law directly, through 16-bit.
    let a2 = convert_frame(&mu, format(Alaw, 8_000, 1)).unwrap();
    let expected: Vec<u8> = mu
        .data()
        .iter()
        .map(|&c| alaw_encode(mulaw_decode(c)))
        .collect();
    assert_eq!(&a2.data()[..], expected);
}

// ---------------------------------------------------------------------------
// Channels
// ---------------------------------------------------------------------------

#[test]
fn stereo_to_mono_averages_each_frame() {
    let frame = AudioFrame::from_i16(
        16_000,
        2,
        &[
            100, 200, 100, 201, -100, -201, 32767, 32767, -32768, -32768, 1000, -1000,
        ],
    )
    .unwrap();
    let mono = convert_frame(&frame, format(PcmS16Le, 16_000, 1)).unwrap();
    // Halves round away from zero.
    assert_eq!(to_i16_samples(&mono), [150, 151, -151, 32767, -32768, 0]);
    assert_eq!(mono.sample_frames(), frame.sample_frames());
}

#[test]
fn mono_to_stereo_duplicates() {
    let frame = AudioFrame::from_i16(16_000, 1, &[1, -2, 32767, -32768]).unwrap();
    let stereo = convert_frame(&frame, format(PcmS16Le, 16_000, 2)).unwrap();
    assert_eq!(
        to_i16_samples(&stereo),
        [1, 1, -2, -2, 32767, 32767, -32768, -32768]
    );
    let three = convert_frame(&frame, format(PcmS16Le, 16_000, 3)).unwrap();
    assert_eq!(to_i16_samples(&three)[..6], [1, 1, 1, -2, -2, -2]);
}

#[test]
fn other_layouts_mix_to_mono_then_duplicate() {
    // 3 -> 2: average the three, copy to both.
    let frame = AudioFrame::from_i16(8_000, 3, &[30, 60, 90, -3, -6, -9]).unwrap();
    let two = convert_frame(&frame, format(PcmS16Le, 8_000, 2)).unwrap();
    assert_eq!(to_i16_samples(&two), [60, 60, -6, -6]);
    // 4 -> 1 in f32.
    let quad = f32_frame(8_000, 4, &[0.1, 0.2, 0.3, 0.4, -1.0, -1.0, 1.0, 1.0]);
    let mono = f32_samples(&convert_frame(&quad, format(PcmF32Le, 8_000, 1)).unwrap());
    assert!((mono[0] - 0.25).abs() < 1e-7, "{mono:?}");
    assert_eq!(mono[1], 0.0);
    // 2 -> 3 into mu-law.
    let stereo = AudioFrame::from_i16(8_000, 2, &[1000, 3000]).unwrap();
    let mu = convert_frame(&stereo, format(Mulaw, 8_000, 3)).unwrap();
    let code = mulaw_encode(2000);
    assert_eq!(&mu.data()[..], [code, code, code]);
}

#[test]
fn resampling_keeps_channels_apart_and_mixes_when_asked() {
    let frames = 4_800;
    let left = sine(48_000, 1_000.0, 0.5, frames);
    let interleaved: Vec<f32> = left.iter().flat_map(|&l| [l, 0.0]).collect();
    let from = format(PcmF32Le, 48_000, 2);

    let mut stereo = AudioConverter::new(from, format(PcmF32Le, 16_000, 2)).unwrap();
    let mut out = f32_samples(
        &stereo
            .convert(&f32_frame(48_000, 2, &interleaved))
            .unwrap()
            .unwrap(),
    );
    out.extend(f32_samples(&stereo.flush().unwrap().unwrap()));
    assert_eq!(out.len(), 2 * expected_len(frames, 48_000, 16_000));
    let l: Vec<f32> = out.iter().step_by(2).copied().collect();
    let r: Vec<f32> = out.iter().skip(1).step_by(2).copied().collect();
    assert!((tone_amplitude(middle(&l, 100), 16_000, 1_000.0) - 0.5).abs() < 0.005);
    assert!(
        r.iter().all(|&v| v == 0.0),
        "silent right channel stays silent"
    );

    let mut mono = AudioConverter::new(from, format(PcmF32Le, 16_000, 1)).unwrap();
    let mut m = f32_samples(
        &mono
            .convert(&f32_frame(48_000, 2, &interleaved))
            .unwrap()
            .unwrap(),
    );
    m.extend(f32_samples(&mono.flush().unwrap().unwrap()));
    assert_eq!(m.len(), expected_len(frames, 48_000, 16_000));
    // The average of a 0.5 sine and silence: a 0.25 sine.
    assert!((tone_amplitude(middle(&m, 100), 16_000, 1_000.0) - 0.25).abs() < 0.003);

    // Mono up to stereo while resampling: both channels identical.
    let mut up =
        AudioConverter::new(format(PcmF32Le, 16_000, 1), format(PcmF32Le, 48_000, 2)).unwrap();
    let s = f32_samples(
        &up.convert(&f32_frame(16_000, 1, &sine(16_000, 500.0, 0.5, 1600)))
            .unwrap()
            .unwrap(),
    );
    assert!(s.chunks_exact(2).all(|p| p[0] == p[1]));
    assert!(s.iter().any(|&v| v.abs() > 0.4));
}

// ---------------------------------------------------------------------------
// Resampling
// ---------------------------------------------------------------------------

#[test]
fn resampled_stream_length_matches_its_duration() {
    for (from, to) in RATE_PAIRS {
        // One second plus an odd remainder, fed in 20 ms frames.
        let frames = from as usize + 7;
        let out = resample(from, to, &vec![0.1; frames], &frames_20ms(from));
        assert_eq!(
            out.len(),
            expected_len(frames, from, to),
            "{from} -> {to}: {} output frames for {frames} input frames",
            out.len()
        );
    }
}

#[test]
fn a_1khz_tone_stays_a_1khz_tone() {
    for (from, to) in RATE_PAIRS {
        let input = sine(from, 1_000.0, 0.5, from as usize / 2);
        let out = resample(from, to, &input, &frames_20ms(from));
        let mid = Windowed::new(middle(&out, to as usize / 50));
        let at_1k = mid.amplitude(to, 1_000.0);
        assert!(
            (at_1k - 0.5).abs() < 0.001,
            "{from} -> {to}: 1 kHz amplitude {at_1k}"
        );
        // Scan the output band in 50 Hz steps: the peak is at 1 kHz and
        // everything 300 Hz or more away is far below it.
        let nyquist = to.min(from) as f64 / 2.0;
        let mut peak = (0.0, 0.0);
        let mut elsewhere: f64 = 0.0;
        let mut f = 100.0;
        while f < nyquist - 100.0 {
            let a = mid.amplitude(to, f);
            if a > peak.1 {
                peak = (f, a);
            }
            if (f - 1_000.0).abs() >= 300.0 {
                elsewhere = elsewhere.max(a);
            }
            f += 50.0;
        }
        assert_eq!(peak.0, 1_000.0, "{from} -> {to}: peak at {} Hz", peak.0);
        assert!(
            db(elsewhere / at_1k) < -80.0,
            "{from} -> {to}: strongest other component {:.1} dB",
            db(elsewhere / at_1k)
        );
    }
}

#[test]
fn resampled_output_is_time_aligned_with_the_input() {
    // Output sample j is the input signal at time j / rate_out. Exact phases
    // for these ratios: compare with the ideal sine sample by sample.
    for (from, to) in [
        (16_000, 48_000),
        (48_000, 16_000),
        (8_000, 16_000),
        (16_000, 8_000),
        (16_000, 24_000),
        (48_000, 8_000),
    ] {
        let input = sine(from, 1_000.0, 0.5, from as usize / 4);
        let out = resample(from, to, &input, &frames_20ms(from));
        let ideal = sine(to, 1_000.0, 0.5, out.len());
        let margin = to as usize / 50;
        let worst = (margin..out.len() - margin)
            .map(|j| (out[j] - ideal[j]).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 2e-3, "{from} -> {to}: worst error {worst}");
    }
    // 44.1 kHz pairs are aligned to within half an output sample.
    for (from, to) in [(44_100, 16_000), (44_100, 48_000), (48_000, 44_100)] {
        let input = sine(from, 1_000.0, 0.5, from as usize / 4);
        let out = resample(from, to, &input, &frames_20ms(from));
        let ideal = sine(to, 1_000.0, 0.5, out.len());
        let margin = to as usize / 50;
        let worst = (margin..out.len() - margin)
            .map(|j| (out[j] - ideal[j]).abs())
            .fold(0.0f32, f32::max);
        let half_sample = (0.5 * 2.0 * PI * 1_000.0 * 0.5 / to as f64) as f32;
        assert!(
            worst < half_sample + 2e-3,
            "{from} -> {to}: worst error {worst}"
        );
    }
}

#[test]
fn round_trip_16k_48k_16k_reproduces_the_signal() {
    let pcm: Vec<i16> = sine(16_000, 1_000.0, 0.5, 8_000)
        .iter()
        .map(|&v| f32_to_i16(v))
        .collect();
    let mut up =
        AudioConverter::new(AudioFormat::PCM16_16K_MONO, format(PcmS16Le, 48_000, 1)).unwrap();
    let mut down =
        AudioConverter::new(format(PcmS16Le, 48_000, 1), AudioFormat::PCM16_16K_MONO).unwrap();
    let mut back = Vec::new();
    for chunk in pcm.chunks(320) {
        let frame = AudioFrame::from_i16(16_000, 1, chunk).unwrap();
        if let Some(f48) = up.convert(&frame).unwrap()
            && let Some(f16) = down.convert(&f48).unwrap()
        {
            back.extend(to_i16_samples(&f16));
        }
    }
    if let Some(f48) = up.flush().unwrap()
        && let Some(f16) = down.convert(&f48).unwrap()
    {
        back.extend(to_i16_samples(&f16));
    }
    if let Some(f16) = down.flush().unwrap() {
        back.extend(to_i16_samples(&f16));
    }
    assert_eq!(back.len(), pcm.len());
    let worst = (320..pcm.len() - 320)
        .map(|i| (i32::from(back[i]) - i32::from(pcm[i])).abs())
        .max()
        .unwrap();
    // 4 LSB is -72 dB relative to the 0.5 full-scale tone.
    assert!(worst <= 4, "worst sample error {worst}");
}

#[test]
fn downsampling_is_band_limited() {
    // Tones above the output Nyquist frequency must not alias into the output:
    // 7 kHz at 48 kHz -> 8 kHz (would alias to 1 kHz), 10 and 12 kHz at
    // 48 kHz -> 16 kHz (6 and 4 kHz), 9 kHz at 44.1 kHz -> 16 kHz (7 kHz).
    for (from, to, tone) in [
        (48_000, 8_000, 7_000.0),
        (48_000, 8_000, 5_000.0),
        (48_000, 16_000, 10_000.0),
        (48_000, 16_000, 12_000.0),
        (44_100, 16_000, 9_000.0),
        (16_000, 8_000, 5_000.0),
    ] {
        let input = sine(from, tone, 0.5, from as usize / 2);
        let out = resample(from, to, &input, &frames_20ms(from));
        let level = db(rms(middle(&out, to as usize / 50)) / rms(&input));
        assert!(
            level < -80.0,
            "{from} -> {to}: a {tone} Hz tone comes out at {level:.1} dB"
        );
    }
    // In-band tones pass: 3 kHz at 48 kHz -> 8 kHz and 7 kHz at 48 -> 16 kHz.
    for (from, to, tone, max_loss_db) in [
        (48_000, 8_000, 3_000.0, 0.1),
        (48_000, 16_000, 6_000.0, 0.1),
        (48_000, 16_000, 7_000.0, 1.0),
    ] {
        let input = sine(from, tone, 0.5, from as usize / 2);
        let out = resample(from, to, &input, &frames_20ms(from));
        let level = db(tone_amplitude(middle(&out, to as usize / 50), to, tone) / 0.5);
        assert!(
            level > -max_loss_db,
            "{from} -> {to}: a {tone} Hz tone loses {level:.2} dB"
        );
    }
}

#[test]
fn upsampling_leaves_no_images() {
    // 7 kHz at 16 kHz -> 48 kHz: the spectral images at 9, 23 and 25 kHz must
    // be filtered out, leaving only the 7 kHz tone.
    let input = sine(16_000, 7_000.0, 0.5, 8_000);
    let out = resample(16_000, 48_000, &input, &frames_20ms(16_000));
    let mid = Windowed::new(middle(&out, 960));
    let tone = mid.amplitude(48_000, 7_000.0);
    assert!(tone > 0.45, "the 7 kHz tone itself passes: {tone}");
    for image in [9_000.0, 23_000.0, 25_000.0] {
        let level = db(mid.amplitude(48_000, image) / tone);
        assert!(level < -80.0, "image at {image} Hz: {level:.1} dB");
    }
}

#[test]
fn odd_frame_sizes_give_the_same_samples_as_one_big_frame() {
    // A speech-like signal: a few tones plus deterministic noise.
    let mut rng = Rng(0x5EED);
    for (from, to) in [
        (16_000, 48_000),
        (44_100, 16_000),
        (48_000, 16_000),
        (8_000, 16_000),
    ] {
        let frames = from as usize * 3 / 4;
        let input: Vec<f32> = (0..frames)
            .map(|i| {
                let t = i as f64 / from as f64;
                (0.3 * (2.0 * PI * 220.0 * t).sin()
                    + 0.2 * (2.0 * PI * 1_330.0 * t).sin()
                    + 0.1 * (rng.unit() - 0.5)) as f32
            })
            .collect();
        let whole = resample(from, to, &input, &[frames]);
        let odd = resample(from, to, &input, &[1, 7, 13, 160, 333, 641, 2, 1_500, 99]);
        assert_eq!(whole.len(), odd.len(), "{from} -> {to}");
        assert_eq!(whole.len(), expected_len(frames, from, to));
        let worst = whole
            .iter()
            .zip(&odd)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-6, "{from} -> {to}: streams differ by {worst}");
    }
}

#[test]
fn output_comes_while_streaming_not_only_at_flush() {
    let mut converter =
        AudioConverter::new(AudioFormat::PCM16_16K_MONO, format(PcmS16Le, 48_000, 1)).unwrap();
    let frame = AudioFrame::from_i16(16_000, 1, &[100; 320]).unwrap();
    let mut total = 0;
    for i in 0..10 {
        let out = converter.convert(&frame).unwrap();
        let n = out.map_or(0, |f| f.sample_frames());
        if i > 0 {
            // After the first frame, each 20 ms in gives 20 ms out (give or
            // take the one sample on the edge of the filter).
            assert!((959..=961).contains(&n), "frame {i}: {n} frames");
        }
        total += n;
    }
    // What is held back is the filter's delay, no more.
    let held = 10 * 960 - total;
    let latency_frames = (converter.latency().as_secs_f64() * 48_000.0).ceil() as usize;
    assert!(
        held <= latency_frames,
        "held {held}, latency {latency_frames}"
    );
    let tail = converter.flush().unwrap().unwrap();
    assert_eq!(tail.sample_frames(), held);
    // A flushed converter starts a new stream.
    assert!(converter.flush().unwrap().is_none());
    let again = converter
        .convert(&frame)
        .unwrap()
        .map_or(0, |f| f.sample_frames());
    assert!(again < 960, "a new stream fills the filter again ({again})");
}

#[test]
fn resampling_latency_is_a_few_milliseconds() {
    for (from, to) in RATE_PAIRS {
        let converter =
            AudioConverter::new(format(PcmS16Le, from, 1), format(PcmS16Le, to, 1)).unwrap();
        let latency = converter.latency();
        assert!(
            latency > Duration::from_millis(1) && latency <= Duration::from_millis(5),
            "{from} -> {to}: {latency:?}"
        );
    }
}

#[test]
fn g711_8k_to_pcm_16k() {
    // The telephony path: mu-law 8 kHz in, 16-bit 16 kHz out.
    let tone: Vec<u8> = sine(8_000, 1_000.0, 0.5, 4_000)
        .iter()
        .map(|&v| mulaw_encode(f32_to_i16(v)))
        .collect();
    let mut converter =
        AudioConverter::new(format(Mulaw, 8_000, 1), AudioFormat::PCM16_16K_MONO).unwrap();
    let mut out = Vec::new();
    for chunk in tone.chunks(160) {
        let frame = AudioFrame::new(format(Mulaw, 8_000, 1), chunk.to_vec()).unwrap();
        if let Some(f) = converter.convert(&frame).unwrap() {
            assert_eq!(f.format(), AudioFormat::PCM16_16K_MONO);
            out.extend(to_i16_samples(&f).iter().map(|&s| i16_to_f32(s)));
        }
    }
    out.extend(
        to_i16_samples(&converter.flush().unwrap().unwrap())
            .iter()
            .map(|&s| i16_to_f32(s)),
    );
    assert_eq!(out.len(), 8_000);
    let amplitude = tone_amplitude(middle(&out, 320), 16_000, 1_000.0);
    assert!((amplitude - 0.5).abs() < 0.01, "{amplitude}");
}

// ---------------------------------------------------------------------------
// Pass-through, errors
// ---------------------------------------------------------------------------

#[test]
fn same_format_returns_the_same_bytes() {
    for fmt in [
        AudioFormat::PCM16_16K_MONO,
        format(Mulaw, 8_000, 1),
        format(PcmF32Le, 48_000, 2),
    ] {
        let mut converter = AudioConverter::new(fmt, fmt).unwrap();
        assert!(converter.is_passthrough());
        assert!(!converter.resamples());
        assert_eq!(converter.latency(), Duration::ZERO);
        let frame = AudioFrame::new(fmt, vec![7u8; fmt.bytes_per_frame() * 160]).unwrap();
        let out = converter.convert(&frame).unwrap().unwrap();
        assert_eq!(out.data().as_ptr(), frame.data().as_ptr(), "zero-copy");
        assert_eq!(out, frame);
        assert!(converter.flush().unwrap().is_none());
        let same = convert_frame(&frame, fmt).unwrap();
        assert_eq!(same.data().as_ptr(), frame.data().as_ptr());
    }
}

#[test]
fn same_rate_conversion_makes_no_resampler() {
    let mut converter =
        AudioConverter::new(format(Mulaw, 8_000, 1), format(PcmS16Le, 8_000, 2)).unwrap();
    assert!(!converter.resamples());
    assert!(!converter.is_passthrough());
    assert_eq!(converter.latency(), Duration::ZERO);
    let frame = AudioFrame::new(format(Mulaw, 8_000, 1), vec![0x80u8; 161]).unwrap();
    let out = converter.convert(&frame).unwrap().unwrap();
    assert_eq!(out.format(), format(PcmS16Le, 8_000, 2));
    assert_eq!(out.sample_frames(), 161);
    assert!(to_i16_samples(&out).iter().all(|&s| s == 32124));
    assert!(converter.flush().unwrap().is_none());
}

#[test]
fn empty_frames_give_nothing() {
    for to in [
        AudioFormat::PCM16_16K_MONO,
        format(PcmS16Le, 48_000, 1),
        format(Alaw, 16_000, 1),
    ] {
        let mut converter = AudioConverter::new(AudioFormat::PCM16_16K_MONO, to).unwrap();
        let empty = AudioFrame::new(AudioFormat::PCM16_16K_MONO, Vec::new()).unwrap();
        assert!(converter.convert(&empty).unwrap().is_none());
        assert!(converter.flush().unwrap().is_none());
    }
}

#[test]
fn a_frame_of_another_format_is_a_pipeline_error_naming_both() {
    let mut converter =
        AudioConverter::new(AudioFormat::PCM16_16K_MONO, format(PcmS16Le, 48_000, 1)).unwrap();
    let wrong = AudioFrame::new(format(Mulaw, 8_000, 1), vec![0xFFu8; 160]).unwrap();
    let err = converter.convert(&wrong).unwrap_err();
    assert_eq!(err.code, ErrorCode::PipelineError);
    let message = err.to_string();
    assert!(message.contains("mulaw 8000 Hz x1"), "{message}");
    assert!(message.contains("pcm_s16_le 16000 Hz x1"), "{message}");
    // The pass-through path checks too.
    let mut same =
        AudioConverter::new(AudioFormat::PCM16_16K_MONO, AudioFormat::PCM16_16K_MONO).unwrap();
    let stereo = AudioFrame::new(format(PcmS16Le, 16_000, 2), vec![0u8; 8]).unwrap();
    let err = same.convert(&stereo).unwrap_err();
    assert_eq!(err.code, ErrorCode::PipelineError);
    assert!(err.to_string().contains("pcm_s16_le 16000 Hz x2"), "{err}");
}

#[test]
fn convert_frame_refuses_a_rate_change() {
    let frame = AudioFrame::from_i16(16_000, 1, &[0; 320]).unwrap();
    let err = convert_frame(&frame, format(PcmS16Le, 8_000, 1)).unwrap_err();
    assert_eq!(err.code, ErrorCode::PipelineError);
    assert!(err.message.contains("AudioConverter"), "{err}");
    assert!(err.message.contains("8000 Hz"), "{err}");
}

#[test]
fn invalid_formats_and_extreme_ratios_are_refused() {
    let ok = AudioFormat::PCM16_16K_MONO;
    for bad in [
        format(PcmS16Le, 0, 1),
        format(PcmS16Le, 16_000, 0),
        format(PcmS16Le, 500_000, 1),
    ] {
        assert_eq!(
            AudioConverter::new(ok, bad).unwrap_err().code,
            ErrorCode::PipelineError
        );
        assert_eq!(
            AudioConverter::new(bad, ok).unwrap_err().code,
            ErrorCode::PipelineError
        );
    }
    let frame = AudioFrame::from_i16(16_000, 1, &[0; 4]).unwrap();
    assert_eq!(
        convert_frame(&frame, format(PcmS16Le, 16_000, 0))
            .unwrap_err()
            .code,
        ErrorCode::PipelineError
    );
    let err =
        AudioConverter::new(format(PcmS16Le, 384_000, 1), format(PcmS16Le, 4_000, 1)).unwrap_err();
    assert_eq!(err.code, ErrorCode::PipelineError);
    assert!(err.message.contains("64:1"), "{err}");
    let err = AudioConverter::new(format(PcmS16Le, 16_000, 33), format(PcmS16Le, 48_000, 33))
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::PipelineError);
    assert!(err.message.contains("32 channels"), "{err}");
    // Mixing 33 channels down to mono resamples one channel: fine.
    assert!(AudioConverter::new(format(PcmS16Le, 16_000, 33), format(PcmS16Le, 48_000, 1)).is_ok());
    // 64:1 itself is fine.
    assert!(AudioConverter::new(format(PcmS16Le, 384_000, 1), format(PcmS16Le, 6_000, 1)).is_ok());
}

#[test]
fn converter_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<AudioConverter>();
}

// ---------------------------------------------------------------------------
// Helpers for other modules
// ---------------------------------------------------------------------------

#[test]
fn to_i16_samples_reads_every_encoding_interleaved() {
    let s16 = AudioFrame::from_i16(16_000, 2, &[1, -1, 300, -300]).unwrap();
    assert_eq!(to_i16_samples(&s16), [1, -1, 300, -300]);
    let f = f32_frame(16_000, 2, &[0.5, -0.5, 1.0, f32::NAN]);
    assert_eq!(to_i16_samples(&f), [16384, -16384, 32767, 0]);
    let mu = AudioFrame::new(format(Mulaw, 8_000, 2), vec![0xFF, 0x80, 0x00, 0xFE]).unwrap();
    assert_eq!(to_i16_samples(&mu), [0, 32124, -32124, 8]);
    let a = AudioFrame::new(format(Alaw, 8_000, 1), vec![0xD5, 0x55, 0xAA]).unwrap();
    assert_eq!(to_i16_samples(&a), [8, -8, 32256]);
    let empty = AudioFrame::new(format(Alaw, 8_000, 1), Vec::new()).unwrap();
    assert!(to_i16_samples(&empty).is_empty());
}

#[test]
fn level_dbfs_measures_rms_against_full_scale() {
    assert_eq!(level_dbfs(&[]), -100.0);
    assert_eq!(level_dbfs(&[0; 320]), -100.0);
    assert!(
        level_dbfs(&[-32768; 100]).abs() < 1e-4,
        "full-scale square is 0 dBFS"
    );
    let square_half: Vec<i16> = (0..100)
        .map(|i| if i % 2 == 0 { 16384 } else { -16384 })
        .collect();
    assert!((level_dbfs(&square_half) + 6.0206).abs() < 1e-3);
    let full_sine: Vec<i16> = sine(16_000, 1_000.0, 1.0, 1_600)
        .iter()
        .map(|&v| f32_to_i16(v))
        .collect();
    assert!(
        (level_dbfs(&full_sine) + 3.0103).abs() < 0.01,
        "{}",
        level_dbfs(&full_sine)
    );
    // One LSB of DC is about -90.3 dBFS; quieter is floored at -100.
    assert!((level_dbfs(&[1; 10]) + 90.309).abs() < 1e-2);
    assert!(level_dbfs(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]) >= -100.0);
}

// ---------------------------------------------------------------------------
// Robustness
// ---------------------------------------------------------------------------

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..n).map(|_| self.next() as u8).collect();
        // Plant float specials where they would land on an f32 boundary.
        if n >= 16 && self.below(2) == 0 {
            v[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
            v[4..8].copy_from_slice(&f32::INFINITY.to_le_bytes());
            v[8..12].copy_from_slice(&f32::MAX.to_le_bytes());
            v[12..16].copy_from_slice(&(-1e30f32).to_le_bytes());
        }
        v
    }
}

fn check_output(frame: &AudioFrame, to: AudioFormat) {
    assert_eq!(frame.format(), to);
    assert_eq!(frame.data().len() % to.bytes_per_frame(), 0);
    if to.encoding == PcmF32Le {
        for v in f32_samples(frame) {
            assert!(v.is_finite() && (-1.0..=1.0).contains(&v), "{v}");
        }
    }
    let _ = level_dbfs(&to_i16_samples(frame));
}

#[test]
fn arbitrary_input_never_panics() {
    const ENCODINGS: [AudioEncoding; 4] = [PcmS16Le, PcmF32Le, Mulaw, Alaw];
    const RATES: [u32; 8] = [8_000, 11_025, 16_000, 22_050, 24_000, 44_100, 48_000, 7_919];
    let mut rng = Rng(0xC0FFEE);
    for _ in 0..150 {
        let from = format(
            ENCODINGS[rng.below(4)],
            RATES[rng.below(RATES.len())],
            1 + rng.below(3) as u16,
        );
        let to = if rng.below(4) == 0 {
            from
        } else {
            format(
                ENCODINGS[rng.below(4)],
                if rng.below(2) == 0 {
                    from.sample_rate
                } else {
                    RATES[rng.below(RATES.len())]
                },
                1 + rng.below(3) as u16,
            )
        };
        // A raw length that may not fit the format: refused, never a panic.
        let raw_len = rng.below(700);
        let raw = rng.bytes(raw_len);
        let unit = from.bytes_per_frame();
        assert_eq!(
            AudioFrame::new(from, raw.clone()).is_ok(),
            raw.len().is_multiple_of(unit)
        );

        let mut converter = AudioConverter::new(from, to).unwrap();
        for _ in 0..3 {
            let len = rng.below(3_000) / unit * unit;
            let frame = AudioFrame::new(from, rng.bytes(len)).unwrap();
            let _ = level_dbfs(&to_i16_samples(&frame));
            if let Some(out) = converter.convert(&frame).unwrap() {
                if from == to {
                    assert_eq!(out.data().as_ptr(), frame.data().as_ptr());
                } else {
                    check_output(&out, to);
                }
            }
            if from == to {
                assert_eq!(convert_frame(&frame, to).unwrap(), frame);
            } else if from.sample_rate == to.sample_rate {
                check_output(&convert_frame(&frame, to).unwrap(), to);
            } else {
                assert!(convert_frame(&frame, to).is_err());
            }
        }
        if let Some(out) = converter.flush().unwrap() {
            check_output(&out, to);
        }
        let other = format(from.encoding, from.sample_rate, from.channels + 1);
        let wrong = AudioFrame::new(other, vec![0u8; other.bytes_per_frame()]).unwrap();
        assert!(converter.convert(&wrong).is_err());
    }
}

/// A `FormatFollower` keeps one converter while the formats stay the same
/// (so a resampled stream comes out as one converter makes it), hands frames
/// already in the target format back untouched, and follows a source or
/// target format that changes instead of failing.
#[test]
fn a_format_follower_keeps_its_converter_and_follows_changes() {
    let from = format(PcmF32Le, 48_000, 1);
    let to = format(PcmS16Le, 16_000, 1);
    let input = sine(48_000, 440.0, 0.5, 4_800);
    let frames: Vec<AudioFrame> = input.chunks(960).map(|c| f32_frame(48_000, 1, c)).collect();

    let mut one = AudioConverter::new(from, to).unwrap();
    let expected: Vec<u8> = frames
        .iter()
        .filter_map(|f| one.convert(f).unwrap())
        .flat_map(|f| f.data().to_vec())
        .collect();
    let mut follower = FormatFollower::default();
    let got: Vec<u8> = frames
        .iter()
        .filter_map(|f| follower.convert(f.clone(), to).unwrap())
        .flat_map(|f| f.data().to_vec())
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(got, expected, "one converter's state carried across frames");

    // Already in the target format: the resampler's last audio comes first,
    // then the frame's own bytes; after that, the same bytes come back.
    let same = AudioFrame::new(to, vec![1u8; 640]).unwrap();
    let back = follower.convert(same.clone(), to).unwrap().unwrap();
    assert!(back.data().len() > 640 && back.data().ends_with(same.data()));
    let again = follower.convert(same.clone(), to).unwrap().unwrap();
    assert_eq!(again.data().as_ptr(), same.data().as_ptr());

    // Another source format, then another target: converted, not refused.
    let mulaw = AudioFrame::new(format(Mulaw, 8_000, 1), vec![0xFFu8; 160]).unwrap();
    let out = follower.convert(mulaw, to).unwrap();
    assert!(out.is_none_or(|f| f.format() == to));
    let stereo = format(PcmS16Le, 16_000, 2);
    let out = follower.convert(same, stereo).unwrap().unwrap();
    assert_eq!(out.format(), stereo);
    assert_eq!(out.data().len(), 1280);
}

/// A stream whose format changes every frame makes at most
/// `MAX_CONVERTERS_PER_SECOND` converters in a second; frames that would need
/// another are refused, the ones the kept converter takes still convert.
#[test]
fn a_format_follower_makes_a_bounded_number_of_converters_a_second() {
    use voice_backends::audio::{FormatFollower, MAX_CONVERTERS_PER_SECOND};
    let mut follower = FormatFollower::default();
    let (mut converted, mut refused) = (0, 0);
    for i in 0..20 {
        let rate = if i % 2 == 0 { 24_000 } else { 48_000 };
        let frame = AudioFrame::from_i16(rate, 1, &vec![0i16; rate as usize / 50]).unwrap();
        match follower.convert(frame, AudioFormat::PCM16_16K_MONO) {
            Ok(_) => converted += 1,
            Err(e) => {
                assert_eq!(e.code, ErrorCode::PipelineError);
                assert!(e.message.contains("more than 4 times in a second"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!(MAX_CONVERTERS_PER_SECOND, 4);
    // Frames 0 to 3 make the 4; then every 24 kHz frame is refused and every
    // 48 kHz frame goes through the kept converter.
    assert_eq!((converted, refused), (12, 8));
    assert!(follower.holds(
        AudioFormat::new(AudioEncoding::PcmS16Le, 48_000, 1),
        AudioFormat::PCM16_16K_MONO
    ));
}

/// Samples of `frames` (s16 mono), all joined.
fn joined_samples(frames: impl IntoIterator<Item = Option<AudioFrame>>) -> Vec<i16> {
    frames
        .into_iter()
        .flatten()
        .flat_map(|f| {
            f.data()
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What a resampler still holds when the format changes comes out in front
/// of the next frame, not lost and not played later: 200 ms at 8 kHz, then
/// 200 ms already at 16 kHz, then 200 ms at 8 kHz again, give 600 ms at
/// 16 kHz in order, and `flush` ends the stream.
#[test]
fn a_format_follower_loses_nothing_when_the_format_changes() {
    use voice_backends::audio::FormatFollower;
    let to = AudioFormat::PCM16_16K_MONO;
    let mut follower = FormatFollower::default();
    let mut out = Vec::new();
    let frame = |rate: u32, value: i16| {
        AudioFrame::from_i16(rate, 1, &vec![value; rate as usize / 100]).unwrap()
    };
    for _ in 0..20 {
        out.push(follower.convert(frame(8_000, 1000), to).unwrap());
    }
    let first = joined_samples(out.drain(..)).len();
    for _ in 0..20 {
        out.push(follower.convert(frame(16_000, 2000), to).unwrap());
    }
    let second = joined_samples(out.drain(..));
    // The 8 kHz stream's last samples, then the 16 kHz frames as they are.
    assert_eq!(first + second.len(), 6400, "{first} + {}", second.len());
    let tail = 3200 - first;
    assert!(tail > 0, "the resampler held some audio");
    // (The filter rings a little against the zero padding at the very end.)
    assert!(
        second[..tail].iter().all(|&s| (400..=1200).contains(&s)),
        "{:?}",
        &second[..tail]
    );
    assert!(second[tail..].iter().all(|&s| s == 2000));
    for _ in 0..20 {
        out.push(follower.convert(frame(8_000, -1000), to).unwrap());
    }
    out.push(follower.flush(to).unwrap());
    let third = joined_samples(out.drain(..));
    assert_eq!(third.len(), 3200);
    // Nothing of the first stream is left to come out in the third.
    assert!(third.iter().all(|&s| s <= 0), "{:?}", &third[..80]);
    assert_eq!(
        follower.flush(to).unwrap(),
        None,
        "nothing is held after a flush"
    );
}

/// `reset` drops what the resampler holds: a cut stream's end never comes out.
#[test]
fn a_format_follower_reset_drops_the_held_audio() {
    use voice_backends::audio::FormatFollower;
    let to = AudioFormat::PCM16_16K_MONO;
    let mut follower = FormatFollower::default();
    let frame = AudioFrame::from_i16(8_000, 1, &[1000i16; 80]).unwrap();
    let mut first = Vec::new();
    for _ in 0..10 {
        first.push(follower.convert(frame.clone(), to).unwrap());
    }
    let heard = joined_samples(first).len();
    assert!(heard < 1600, "the resampler holds some audio");
    follower.reset();
    assert_eq!(follower.flush(to).unwrap(), None);
    let silence = AudioFrame::from_i16(16_000, 1, &[0i16; 160]).unwrap();
    let out = follower.convert(silence, to).unwrap().unwrap();
    assert_eq!(
        out.data().len(),
        320,
        "the frame alone, nothing in front of it"
    );
}
