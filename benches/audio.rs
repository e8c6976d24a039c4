//! Cost of converting one 20 ms frame with a long-lived [`AudioConverter`],
//! as a session's audio path does for every frame: pass-through (same
//! format), s16 -> f32, mu-law decode at 8 kHz, 48 kHz stereo -> mono, and
//! resampling 16-bit mono between the common speech rates (48 <-> 16 kHz,
//! 8 <-> 16 kHz, 48 <-> 8 kHz, 48 <-> 24 kHz), each with the integer-ratio
//! polyphase filter the converter picks (`resample_*`) and with rubato's
//! windowed-sinc resampler it used before (`resample_sinc_*`), plus
//! 44.1 -> 16 kHz, which only the sinc resampler does.

use std::f64::consts::PI;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use voice_backends::audio::{
    AudioConverter, AudioEncoding, AudioFormat, AudioFrame, ResamplerKind, f32_to_i16, mulaw_encode,
};

/// 20 ms of a 440 Hz tone plus a little 3 kHz, as 16-bit samples.
fn tone(rate: u32, channels: u16) -> Vec<i16> {
    let frames = rate as usize / 50;
    (0..frames * channels as usize)
        .map(|i| {
            let t = (i / channels as usize) as f64 / rate as f64;
            let v = 0.4 * (2.0 * PI * 440.0 * t).sin() + 0.1 * (2.0 * PI * 3_000.0 * t).sin();
            f32_to_i16(v as f32)
        })
        .collect()
}

fn pcm16(rate: u32, channels: u16) -> AudioFrame {
    AudioFrame::from_i16(rate, channels, &tone(rate, channels)).unwrap()
}

fn bench_case(c: &mut Criterion, name: &str, frame: AudioFrame, to: AudioFormat) {
    bench_with(c, name, frame, to, ResamplerKind::Auto);
}

fn bench_with(
    c: &mut Criterion,
    name: &str,
    frame: AudioFrame,
    to: AudioFormat,
    kind: ResamplerKind,
) {
    let mut converter = AudioConverter::with_resampler(frame.format(), to, kind).unwrap();
    // Fill the resampler so every measured call produces output.
    for _ in 0..3 {
        converter.convert(&frame).unwrap();
    }
    c.bench_function(name, |b| {
        b.iter(|| black_box(converter.convert(black_box(&frame)).unwrap()))
    });
}

fn convert_20ms(c: &mut Criterion) {
    let s16 = |rate, channels| AudioFormat::new(AudioEncoding::PcmS16Le, rate, channels);

    bench_case(
        c,
        "convert_20ms/passthrough_s16_16k",
        pcm16(16_000, 1),
        s16(16_000, 1),
    );
    bench_case(
        c,
        "convert_20ms/s16_to_f32_16k",
        pcm16(16_000, 1),
        AudioFormat::new(AudioEncoding::PcmF32Le, 16_000, 1),
    );
    let mulaw = AudioFormat::new(AudioEncoding::Mulaw, 8_000, 1);
    let codes: Vec<u8> = tone(8_000, 1).into_iter().map(mulaw_encode).collect();
    bench_case(
        c,
        "convert_20ms/mulaw_decode_8k",
        AudioFrame::new(mulaw, codes).unwrap(),
        s16(8_000, 1),
    );
    for (from, to) in [
        (48_000, 16_000),
        (16_000, 48_000),
        (8_000, 16_000),
        (16_000, 8_000),
        (48_000, 8_000),
        (8_000, 48_000),
        (48_000, 24_000),
        (24_000, 48_000),
    ] {
        let (kin, kout) = (from / 1000, to / 1000);
        bench_case(
            c,
            &format!("convert_20ms/resample_{kin}k_to_{kout}k"),
            pcm16(from, 1),
            s16(to, 1),
        );
        bench_with(
            c,
            &format!("convert_20ms/resample_sinc_{kin}k_to_{kout}k"),
            pcm16(from, 1),
            s16(to, 1),
            ResamplerKind::Sinc,
        );
    }
    bench_case(
        c,
        "convert_20ms/resample_sinc_44k1_to_16k",
        pcm16(44_100, 1),
        s16(16_000, 1),
    );
    bench_case(
        c,
        "convert_20ms/stereo_to_mono_48k",
        pcm16(48_000, 2),
        s16(48_000, 1),
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = convert_20ms
}
criterion_main!(benches);
