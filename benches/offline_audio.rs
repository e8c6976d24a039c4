//! Cost per 20 ms frame of the 16 kHz pipeline's offline audio components:
//! WebRTC's VAD (`vad = "webrtc"`, 20 ms and 10 ms blocks), the `energy`
//! VAD beside it for scale, and RNNoise noise suppression (`denoise`: the
//! resampling to 48 kHz and back, two RNNoise blocks, the mix).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use voice_backends::audio::AudioFrame;
use voice_backends::hooks::AudioProcessor;
use voice_backends::pipeline::Vad;
use voice_backends::pipeline::builtin::EnergyVad;
use voice_backends::pipeline::offline::denoise::{DenoiseOptions, Denoiser};
use voice_backends::pipeline::offline::webrtc_vad::{WebrtcVad, WebrtcVadOptions};

/// Two seconds of a voiced, noisy signal (a 150 Hz buzz with harmonics, in
/// white noise) as 20 ms frames, so the components work on varied audio.
fn frames() -> Vec<AudioFrame> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let samples: Vec<i16> = (0..32_000)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let t = i as f64 / 16_000.0;
            let voice: f64 = (1..20)
                .map(|k| (2.0 * std::f64::consts::PI * 150.0 * k as f64 * t).sin() / k as f64)
                .sum();
            let noise = (state % 2001) as f64 / 1000.0 - 1.0;
            (3000.0 * voice + 600.0 * noise) as i16
        })
        .collect();
    samples
        .chunks(320)
        .map(|c| AudioFrame::from_i16(16_000, 1, c).unwrap())
        .collect()
}

fn bench_vad(c: &mut Criterion, name: &str, mut vad: impl Vad, frames: &[AudioFrame]) {
    let mut i = 0;
    c.bench_function(name, |b| {
        b.iter(|| {
            i = (i + 1) % frames.len();
            black_box(vad.process(black_box(&frames[i])))
        })
    });
}

fn per_frame(c: &mut Criterion) {
    let frames = frames();
    bench_vad(c, "vad_webrtc_20ms_blocks", WebrtcVad::default(), &frames);
    let ten = WebrtcVadOptions {
        frame: Duration::from_millis(10),
        ..Default::default()
    };
    bench_vad(c, "vad_webrtc_10ms_blocks", WebrtcVad::new(ten), &frames);
    bench_vad(c, "vad_energy", EnergyVad::default(), &frames);

    let mut denoiser = Denoiser::new(DenoiseOptions::default(), 0).unwrap();
    let mut i = 0;
    c.bench_function("denoise_20ms", |b| {
        b.iter(|| {
            i = (i + 1) % frames.len();
            black_box(denoiser.process(black_box(frames[i].clone())).unwrap())
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = per_frame
}
criterion_main!(benches);
