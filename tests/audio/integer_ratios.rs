//! The integer-ratio resampler (48 <-> 16 kHz, 8 <-> 16 kHz, 48 <-> 8 kHz,
//! 48 <-> 24 kHz, 16 <-> 24 kHz): its passband, its stopband (no aliases
//! when downsampling, no images when upsampling), its delay and alignment,
//! agreement with the windowed-sinc resampler, and streaming that gives the
//! same samples however the input is cut.

use proptest::prelude::*;
use voice_backends::audio::ResamplerKind;

use super::*;

/// Rate pairs the integer-ratio resampler takes.
const INTEGER_PAIRS: [(u32, u32); 10] = [
    (48_000, 16_000),
    (16_000, 48_000),
    (8_000, 16_000),
    (16_000, 8_000),
    (48_000, 8_000),
    (8_000, 48_000),
    (48_000, 24_000),
    (24_000, 48_000),
    (16_000, 24_000),
    (24_000, 16_000),
];

/// The passband is flat to within 0.1 dB up to this fraction of the lower
/// Nyquist frequency.
const PASSBAND_EDGE: f64 = 0.85;
/// Attenuation from the lower Nyquist frequency up, in dB.
const STOPBAND_DB: f64 = 80.0;

/// Resamples mono f32 `input` with the resampler `kind` picks, fed in frames
/// of the sizes in `chunks` (cycled), then flushed.
fn resample_with(
    kind: ResamplerKind,
    from: u32,
    to: u32,
    input: &[f32],
    chunks: &[usize],
) -> Vec<f32> {
    let mut converter =
        AudioConverter::with_resampler(format(PcmF32Le, from, 1), format(PcmF32Le, to, 1), kind)
            .unwrap();
    let mut out = Vec::new();
    let mut rest = input;
    let mut sizes = chunks.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap()).min(rest.len());
        let (head, tail) = rest.split_at(n);
        rest = tail;
        if let Some(frame) = converter.convert(&f32_frame(from, 1, head)).unwrap() {
            out.extend(f32_samples(&frame));
        }
    }
    if let Some(frame) = converter.flush().unwrap() {
        out.extend(f32_samples(&frame));
    }
    out
}

/// A speech-like test signal: a few tones below `top` Hz and a little noise
/// (unfiltered: it reaches the input's Nyquist frequency).
fn speechlike(rate: u32, frames: usize, top: f64, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    (0..frames)
        .map(|i| {
            let t = i as f64 / rate as f64;
            (0.3 * (2.0 * PI * 0.05 * top * t).sin()
                + 0.2 * (2.0 * PI * 0.37 * top * t).sin()
                + 0.1 * (2.0 * PI * 0.81 * top * t).sin()
                + 0.02 * (rng.unit() - 0.5)) as f32
        })
        .collect()
}

#[test]
fn the_passband_is_flat_to_a_tenth_of_a_db() {
    for (from, to) in INTEGER_PAIRS {
        let nyquist = from.min(to) as f64 / 2.0;
        for fraction in [0.02, 0.1, 0.25, 0.4, 0.55, 0.7, 0.8, PASSBAND_EDGE] {
            let tone = fraction * nyquist;
            let input = sine(from, tone, 0.5, from as usize / 4);
            let out = resample(from, to, &input, &frames_20ms(from));
            let level = db(tone_amplitude(middle(&out, to as usize / 50), to, tone) / 0.5);
            assert!(
                level.abs() <= 0.1,
                "{from} -> {to}: a {tone} Hz tone ({fraction} of the lower Nyquist \
                 frequency) comes out at {level:+.3} dB"
            );
        }
    }
}

#[test]
fn downsampling_attenuates_everything_above_the_output_nyquist_frequency() {
    for (from, to) in INTEGER_PAIRS.into_iter().filter(|(f, t)| f > t) {
        let nyquist = to as f64 / 2.0;
        for fraction in [1.005, 1.02, 1.05, 1.1, 1.2, 1.5, 2.0, 2.9, 5.9] {
            let tone = fraction * nyquist;
            if tone >= from as f64 / 2.0 {
                continue;
            }
            let input = sine(from, tone, 0.5, from as usize / 4);
            let out = resample(from, to, &input, &frames_20ms(from));
            // Everything that comes out is alias: measure all of it.
            let level = db(rms(middle(&out, to as usize / 50)) / rms(&input));
            assert!(
                level <= -STOPBAND_DB,
                "{from} -> {to}: a {tone} Hz tone ({fraction} of the output Nyquist \
                 frequency) aliases at {level:.1} dB"
            );
        }
    }
}

#[test]
fn upsampling_leaves_no_image_of_the_input_spectrum() {
    for (from, to) in INTEGER_PAIRS.into_iter().filter(|(f, t)| f < t) {
        for fraction in [0.1, 0.5, 0.8, PASSBAND_EDGE, 0.95] {
            let tone = fraction * from as f64 / 2.0;
            let input = sine(from, tone, 0.5, from as usize / 4);
            let out = resample(from, to, &input, &frames_20ms(from));
            let mid = Windowed::new(middle(&out, to as usize / 50));
            // Zero-stuffing puts images at k * from +- tone.
            let mut k = 1.0;
            while k * from as f64 - tone < to as f64 / 2.0 {
                for image in [k * from as f64 - tone, k * from as f64 + tone] {
                    if image >= to as f64 / 2.0 {
                        continue;
                    }
                    let level = db(mid.amplitude(to, image) / 0.5);
                    assert!(
                        level <= -STOPBAND_DB,
                        "{from} -> {to}: the image of {tone} Hz at {image} Hz is at {level:.1} dB"
                    );
                }
                k += 1.0;
            }
        }
    }
}

#[test]
fn streaming_gives_the_same_samples_as_one_frame_bit_for_bit() {
    for (from, to) in INTEGER_PAIRS {
        let frames = from as usize * 3 / 10 + 3;
        let input = speechlike(from, frames, from.min(to) as f64 / 2.0, 0x5EED);
        let whole = resample(from, to, &input, &[frames]);
        assert_eq!(whole.len(), expected_len(frames, from, to));
        for chunks in [
            frames_20ms(from),
            vec![1, 7, 13, 160, 333, 641, 2, 1_500, 99],
            vec![1],
            vec![3, 1, 2],
        ] {
            let cut = resample(from, to, &input, &chunks);
            assert_eq!(cut.len(), whole.len(), "{from} -> {to} in {chunks:?}");
            let first_difference = whole
                .iter()
                .zip(&cut)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(
                first_difference, None,
                "{from} -> {to} in frames of {chunks:?}: sample differs"
            );
        }
    }
}

/// The filter is centred 32 samples of the lower rate, less one sample at
/// the rate both rates divide, after its first tap: that is the latency.
#[test]
fn the_delay_is_just_under_32_samples_of_the_lower_rate_and_compensated() {
    for (from, to) in INTEGER_PAIRS {
        let converter =
            AudioConverter::new(format(PcmS16Le, from, 1), format(PcmS16Le, to, 1)).unwrap();
        let lcm = u64::from(from / gcd(from, to) * to);
        let centre = 32 * lcm / u64::from(from.min(to)) - 1;
        let expected = Duration::from_nanos((centre * 1_000_000_000).div_ceil(lcm));
        assert_eq!(converter.latency(), expected, "{from} -> {to}");
        let sinc = AudioConverter::with_resampler(
            format(PcmS16Le, from, 1),
            format(PcmS16Le, to, 1),
            ResamplerKind::Sinc,
        )
        .unwrap();
        assert!(
            converter.latency() <= sinc.latency(),
            "{from} -> {to}: {:?}, the sinc resampler's {:?}",
            converter.latency(),
            sinc.latency()
        );

        // An impulse comes out centred on its own time, symmetric about it
        // (linear phase, the filter's delay taken off): input sample n is at
        // output sample n * to / from.
        let g = gcd(from, to);
        let (up, down) = ((to / g) as usize, (from / g) as usize);
        let n = down * (from as usize / 100 / down);
        let centre = n * up / down;
        let mut input = vec![0.0f32; from as usize / 20];
        input[n] = 0.5;
        let out = resample(from, to, &input, &frames_20ms(from));
        let peak = (0..out.len())
            .max_by(|&a, &b| out[a].abs().total_cmp(&out[b].abs()))
            .unwrap();
        assert_eq!(peak, centre, "{from} -> {to}: the impulse's peak");
        for d in 1..40 {
            let (before, after) = (out[centre - d], out[centre + d]);
            assert!(
                (before - after).abs() <= 1e-6,
                "{from} -> {to}: {d} samples either side of the impulse: {before} vs {after}"
            );
        }
    }
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[test]
fn agrees_with_the_sinc_resampler_in_the_passband() {
    // Both are time-aligned with unit gain in the passband: on a signal below
    // 0.8 of the lower Nyquist frequency their outputs are the same signal.
    for (from, to) in INTEGER_PAIRS {
        let nyquist = from.min(to) as f64 / 2.0;
        let frames = from as usize / 4;
        let input: Vec<f32> = (0..frames)
            .map(|i| {
                let t = i as f64 / from as f64;
                (0.3 * (2.0 * PI * 0.05 * nyquist * t).sin()
                    + 0.2 * (2.0 * PI * 0.37 * nyquist * t).sin()
                    + 0.1 * (2.0 * PI * 0.79 * nyquist * t).sin()) as f32
            })
            .collect();
        let ours = resample_with(ResamplerKind::Auto, from, to, &input, &frames_20ms(from));
        let sinc = resample_with(ResamplerKind::Sinc, from, to, &input, &frames_20ms(from));
        assert_eq!(ours.len(), sinc.len());
        let margin = to as usize / 50;
        let worst = (margin..ours.len() - margin)
            .map(|j| (ours[j] - sinc[j]).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-3, "{from} -> {to}: outputs differ by {worst}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Any frame lengths, any samples (NaN and infinities included), one to
    /// three channels, s16 or f32: no panic, the whole stream comes out at
    /// its length, and f32 output stays finite and in range.
    #[test]
    fn any_input_resamples_to_the_stream_length(
        pair in 0..INTEGER_PAIRS.len(),
        channels in 1u16..=3,
        float_out in any::<bool>(),
        frames in prop::collection::vec(prop::collection::vec(any::<f32>(), 0..400), 0..8),
    ) {
        let (from, to) = INTEGER_PAIRS[pair];
        let out_format = format(if float_out { PcmF32Le } else { PcmS16Le }, to, channels);
        let mut converter =
            AudioConverter::new(format(PcmF32Le, from, channels), out_format).unwrap();
        let mut fed = 0usize;
        let mut got = 0usize;
        for samples in &frames {
            let whole = samples.len() / channels as usize * channels as usize;
            let frame = f32_frame(from, channels, &samples[..whole]);
            fed += frame.sample_frames();
            if let Some(out) = converter.convert(&frame).unwrap() {
                check_output(&out, out_format);
                got += out.sample_frames();
            }
        }
        if let Some(out) = converter.flush().unwrap() {
            check_output(&out, out_format);
            got += out.sample_frames();
        }
        prop_assert_eq!(got, expected_len(fed, from, to));
    }
}
