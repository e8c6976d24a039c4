//! The `livekit` provider's media path, per 20 ms frame of room audio:
//!
//! - `opus/decode` and `opus/encode`: one 20 ms packet of the user's audio
//!   decoded (48 kHz mono), one 20 ms reply frame encoded;
//! - `media_in/packet_to_pipeline`: what a user packet costs before the
//!   pipeline sees it: Opus decode plus the conversion to the pipeline's
//!   16 kHz (the session's converter);
//! - `media_out/frame_to_packet`: what a reply frame costs before it goes
//!   out as RTP: the conversion from the session's 16 kHz output to 48 kHz
//!   plus Opus encode;
//! - `sessions_per_core` (printed, not a criterion bench): N sessions' media
//!   work on one thread (a current-thread runtime), each a task that every
//!   20 ms decodes a user packet, converts it for the pipeline, converts a
//!   reply frame and encodes it; the lateness of each tick behind its
//!   schedule is the added lateness one core's load gives a session's media.
//!   Transport costs (SRTP, UDP, ICE keepalives, the webrtc-rs driver) are not
//!   in it.
//!
//! `cargo bench --features livekit --bench livekit`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use voice_backends::audio::{AudioConverter, AudioEncoding, AudioFormat, AudioFrame};
use voice_backends::providers::livekit::opus::{OpusDecoder, OpusEncoder, PCM_FORMAT};

const PIPELINE: AudioFormat = AudioFormat::new(AudioEncoding::PcmS16Le, 16_000, 1);

/// 20 ms of speech-band tones at `rate`.
fn frame_at(rate: u32, offset: usize) -> AudioFrame {
    let n = rate as usize / 50;
    let samples: Vec<i16> = (0..n)
        .map(|i| {
            let t = (i + offset) as f64 / f64::from(rate);
            let v = 0.3 * (2.0 * std::f64::consts::PI * 220.0 * t).sin()
                + 0.1 * (2.0 * std::f64::consts::PI * 1_800.0 * t).sin();
            (v * 32_767.0) as i16
        })
        .collect();
    AudioFrame::from_i16(rate, 1, &samples).unwrap()
}

/// One second of 20 ms Opus packets.
fn packets() -> Vec<Vec<u8>> {
    let mut encoder = OpusEncoder::new(32_000).unwrap();
    let mut out = Vec::new();
    for i in 0..50 {
        encoder
            .push(&frame_at(48_000, i * 960), |p| out.push(p.to_vec()))
            .unwrap();
    }
    out
}

fn opus(c: &mut Criterion) {
    let packets = packets();
    let mut decoder = OpusDecoder::new().unwrap();
    let mut i = 0;
    c.bench_function("opus/decode", |b| {
        b.iter(|| {
            i = (i + 1) % packets.len();
            black_box(decoder.decode(black_box(&packets[i])).unwrap())
        })
    });
    let frames: Vec<AudioFrame> = (0..50).map(|i| frame_at(48_000, i * 960)).collect();
    let mut encoder = OpusEncoder::new(32_000).unwrap();
    let mut j = 0;
    c.bench_function("opus/encode", |b| {
        b.iter(|| {
            j = (j + 1) % frames.len();
            encoder
                .push(black_box(&frames[j]), |p| {
                    black_box(p);
                })
                .unwrap()
        })
    });
}

fn media_path(c: &mut Criterion) {
    let packets = packets();
    let mut decoder = OpusDecoder::new().unwrap();
    let mut to_pipeline = AudioConverter::new(PCM_FORMAT, PIPELINE).unwrap();
    let mut i = 0;
    c.bench_function("media_in/packet_to_pipeline", |b| {
        b.iter(|| {
            i = (i + 1) % packets.len();
            let pcm = decoder.decode(&packets[i]).unwrap();
            black_box(to_pipeline.convert(&pcm).unwrap())
        })
    });
    let replies: Vec<AudioFrame> = (0..50).map(|i| frame_at(16_000, i * 320)).collect();
    let mut encoder = OpusEncoder::new(32_000).unwrap();
    let mut j = 0;
    c.bench_function("media_out/frame_to_packet", |b| {
        b.iter(|| {
            j = (j + 1) % replies.len();
            encoder
                .push(black_box(&replies[j]), |p| {
                    black_box(p);
                })
                .unwrap()
        })
    });
}

/// `n` sessions' media on one thread for `run`: the ticks' lateness,
/// sorted.
fn sessions_on_one_core(n: usize, run: Duration) -> Vec<Duration> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async move {
        let packets = std::sync::Arc::new(packets());
        let mut tasks = tokio::task::JoinSet::new();
        let start = tokio::time::Instant::now() + Duration::from_millis(50);
        for s in 0..n {
            let packets = packets.clone();
            // Sessions' ticks spread over the 20 ms, as real rooms' are.
            let first = start + Duration::from_micros((s as u64 * 20_000) / n as u64);
            tasks.spawn(async move {
                let mut decoder = OpusDecoder::new().unwrap();
                let mut to_pipeline = AudioConverter::new(PCM_FORMAT, PIPELINE).unwrap();
                let mut encoder = OpusEncoder::new(32_000).unwrap();
                let reply = frame_at(16_000, s);
                let mut late = Vec::new();
                let mut tick = tokio::time::interval_at(first, Duration::from_millis(20));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let ticks = (run.as_millis() / 20) as usize;
                for k in 0..ticks {
                    let due = tick.tick().await;
                    let pcm = decoder.decode(&packets[k % packets.len()]).unwrap();
                    black_box(to_pipeline.convert(&pcm).unwrap());
                    encoder
                        .push(&reply, |p| {
                            black_box(p);
                        })
                        .unwrap();
                    late.push(tokio::time::Instant::now().saturating_duration_since(due));
                }
                late
            });
        }
        let mut all = Vec::new();
        while let Some(r) = tasks.join_next().await {
            all.extend(r.unwrap());
        }
        all.sort();
        all
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn sessions_per_core(_: &mut Criterion) {
    let run = Duration::from_secs(5);
    for n in [100, 250, 500, 750] {
        let t = Instant::now();
        let late = sessions_on_one_core(n, run);
        println!(
            "sessions_per_core/{n}: lateness p50 {:?} p99 {:?} max {:?} ({} ticks in {:?})",
            percentile(&late, 0.5),
            percentile(&late, 0.99),
            late.last().copied().unwrap_or_default(),
            late.len(),
            t.elapsed(),
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = opus, media_path, sessions_per_core
}
criterion_main!(benches);
