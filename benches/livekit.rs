//! The `livekit` provider's media path, per 20 ms frame of room audio:
//!
//! - `opus/decode`: one 20 ms packet of the user's speech decoded straight
//!   to the pipeline's 16 kHz (libopus decodes at the rate asked for);
//! - `opus/encode/complexity_{10,5,3}`: one 20 ms frame of 16 kHz reply
//!   speech encoded (`Application::Voip`, 32 kb/s, DTX) at each complexity;
//!   the first run also prints each complexity's quality (the decoded
//!   signal's SNR against the original, aligned for the codec's delay);
//! - `media_in/packet_to_pipeline`: what a user packet costs before the
//!   pipeline sees it (Opus decode to 16 kHz, nothing resampled);
//!   `media_in/dtx_frame`: what a DTX frame from a silent user costs (no
//!   decode: 20 ms of silence handed in);
//! - `media_out/frame_to_packet`: what a 16 kHz reply frame costs before it
//!   goes out as RTP (Opus encode at the default complexity);
//! - `sessions_per_core` (printed, not a criterion bench): N sessions' media
//!   work on one thread (a current-thread runtime), each session a task
//!   that wakes only when it has work, as the participant does: a user
//!   packet to decode, a reply frame to encode. Two loads:
//!   - `mix`: in a 5 s cycle the user talks 2 s (40 %), the agent replies
//!     2 s (40 %), 1 s is silence; a silent user's client sends DTX (a
//!     comfort-noise packet every 400 ms, decoded, and the gap filled with
//!     silence), a silent agent sends nothing; the sessions' cycles are
//!     spread over the 5 s;
//!   - `worst`: everyone talking all the time: every session decodes a
//!     user packet and encodes a reply frame every 20 ms.
//!
//!   Each wake's lateness behind its schedule is the added lateness one
//!   core's load gives a session's media; the bench prints p50, p99 and
//!   max per N, and the most sessions with p99 under 10 ms. Transport
//!   costs (SRTP, UDP, ICE keepalives, the webrtc-rs driver) are not in it.
//!
//! `taskset -c 1 cargo bench --features livekit --bench livekit` (pinned to
//! one core; the bench prints the CPUs it may run on).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use voice_backends::audio::{AudioFrame, to_i16_samples};
use voice_backends::providers::livekit::opus::{
    self, Encoded, EncoderSettings, FRAME_SAMPLES, OpusDecoder, OpusEncoder, PCM_RATE,
};

/// `n` samples of a speech-like signal at 16 kHz from sample `offset`: a
/// voiced sound (a 140 Hz pitch with vibrato and its harmonics under a
/// formant-like slope), its level moving like syllables.
fn speech(offset: usize, n: usize) -> Vec<i16> {
    let rate = f64::from(PCM_RATE);
    (offset..offset + n)
        .map(|i| {
            let t = i as f64 / rate;
            let pitch = 140.0 * (1.0 + 0.05 * (2.0 * std::f64::consts::PI * 3.0 * t).sin());
            let phase = 2.0 * std::f64::consts::PI * pitch * t;
            let voiced: f64 = (1..=20)
                .map(|h| {
                    let hz = pitch * f64::from(h);
                    let formant = (-((hz - 700.0) / 500.0).powi(2)).exp()
                        + 0.5 * (-((hz - 1_800.0) / 600.0).powi(2)).exp();
                    (0.05 + formant) * (phase * f64::from(h)).sin() / f64::from(h).sqrt()
                })
                .sum();
            let syllable = 0.55 + 0.45 * (2.0 * std::f64::consts::PI * 4.0 * t).sin();
            (voiced * syllable * 6_000.0).clamp(-32_000.0, 32_000.0) as i16
        })
        .collect()
}

/// 20 ms frames of speech, `count` of them.
fn speech_frames(count: usize) -> Vec<AudioFrame> {
    (0..count)
        .map(|i| {
            AudioFrame::from_i16(PCM_RATE, 1, &speech(i * FRAME_SAMPLES, FRAME_SAMPLES)).unwrap()
        })
        .collect()
}

fn settings(complexity: u8) -> EncoderSettings {
    EncoderSettings {
        complexity,
        ..EncoderSettings::default()
    }
}

/// Encodes `frames`; the packets sent.
fn encode_all(settings: EncoderSettings, frames: &[AudioFrame]) -> Vec<Vec<u8>> {
    let mut encoder = OpusEncoder::new(settings).unwrap();
    let mut out = Vec::new();
    for frame in frames {
        encoder
            .push(frame, |e| {
                if let Encoded::Packet(p) = e {
                    out.push(p.to_vec());
                }
            })
            .unwrap();
    }
    out
}

/// One second of 20 ms Opus packets of speech.
fn packets() -> Vec<Vec<u8>> {
    encode_all(EncoderSettings::default(), &speech_frames(50))
}

/// A comfort-noise update of a silent user's client: what a DTX encoder
/// sends now and then over silence.
fn comfort_noise_packet() -> Vec<u8> {
    let silence: Vec<AudioFrame> = (0..100).map(|_| opus::silence(1).unwrap()).collect();
    let mut encoder = OpusEncoder::new(EncoderSettings::default()).unwrap();
    let mut sent = Vec::new();
    for frame in &speech_frames(10) {
        encoder.push(frame, |_| {}).unwrap();
    }
    for frame in &silence {
        encoder
            .push(frame, |e| {
                if let Encoded::Packet(p) = e {
                    sent.push(p.to_vec());
                }
            })
            .unwrap();
    }
    sent.pop().unwrap_or_else(|| vec![0x08, 0x0b, 0xe4])
}

/// The decoded signal's SNR (dB) against the original, at the lag (the
/// codec's delay) that fits best.
fn snr_db(original: &[i16], decoded: &[i16]) -> f64 {
    let skip = 1_600; // past the codec's start-up
    let len = original.len().min(decoded.len()).saturating_sub(skip + 400);
    (0..400)
        .map(|lag| {
            let (mut signal, mut noise) = (0.0f64, 0.0f64);
            for i in skip..skip + len {
                let s = f64::from(original[i]);
                let d = f64::from(decoded[i + lag]);
                signal += s * s;
                noise += (s - d) * (s - d);
            }
            10.0 * (signal / noise.max(1.0)).log10()
        })
        .fold(f64::MIN, f64::max)
}

fn quality(complexity: u8) -> (f64, f64) {
    let frames = speech_frames(150);
    let original: Vec<i16> = frames.iter().flat_map(to_i16_samples).collect();
    let packets = encode_all(settings(complexity), &frames);
    let bytes: usize = packets.iter().map(Vec::len).sum();
    let mut decoder = OpusDecoder::new().unwrap();
    let decoded: Vec<i16> = packets
        .iter()
        .flat_map(|p| to_i16_samples(&decoder.decode(p).unwrap()))
        .collect();
    let kbps = bytes as f64 * 8.0 / (packets.len() as f64 * 0.02) / 1000.0;
    (snr_db(&original, &decoded), kbps)
}

/// libopus's encode cost per 20 ms of the same speech by input rate,
/// application and complexity (printed: the median of 5 runs of 250
/// frames), with the SNR of what decodes.
fn encode_matrix() {
    use audiopus::coder::Encoder;
    use audiopus::{Application, Bitrate, Channels, SampleRate};
    let speech16: Vec<i16> = speech(0, PCM_RATE as usize * 5);
    // The same speech at 48 kHz: each sample held three times, then
    // smoothed (good enough for a cost comparison).
    let speech48: Vec<i16> = speech16
        .iter()
        .flat_map(|&v| [v, v, v])
        .collect::<Vec<_>>()
        .windows(3)
        .map(|w| ((i32::from(w[0]) + i32::from(w[1]) + i32::from(w[2])) / 3) as i16)
        .collect();
    let mut out = vec![0u8; 4000];
    for (rate_name, rate, pcm, frame) in [
        ("16k", SampleRate::Hz16000, &speech16, 320usize),
        ("48k", SampleRate::Hz48000, &speech48, 960usize),
    ] {
        for (app_name, app) in [
            ("voip", Application::Voip),
            ("lowdelay", Application::LowDelay),
        ] {
            for complexity in [10u8, 5, 3, 1, 0] {
                let mut enc = Encoder::new(rate, Channels::Mono, app).unwrap();
                enc.set_bitrate(Bitrate::BitsPerSecond(32_000)).unwrap();
                enc.set_complexity(complexity).unwrap();
                let frames: Vec<&[i16]> = pcm.chunks_exact(frame).take(250).collect();
                let mut runs: Vec<Duration> = (0..5)
                    .map(|_| {
                        let t = Instant::now();
                        for f in &frames {
                            black_box(enc.encode(f, &mut out).unwrap());
                        }
                        t.elapsed() / frames.len() as u32
                    })
                    .collect();
                runs.sort();
                println!(
                    "opus/encode_cost/{rate_name}/{app_name}/complexity_{complexity}: {:?} per 20 ms",
                    runs[2]
                );
            }
        }
    }
}

fn opus(c: &mut Criterion) {
    encode_matrix();
    let packets = packets();
    let mut decoder = OpusDecoder::new().unwrap();
    let mut i = 0;
    c.bench_function("opus/decode", |b| {
        b.iter(|| {
            i = (i + 1) % packets.len();
            black_box(decoder.decode(black_box(&packets[i])).unwrap())
        })
    });
    let frames = speech_frames(50);
    for complexity in [10, 5, 3] {
        let (snr, kbps) = quality(complexity);
        println!("opus/quality/complexity_{complexity}: SNR {snr:.1} dB at {kbps:.1} kb/s");
        let mut encoder = OpusEncoder::new(settings(complexity)).unwrap();
        let mut j = 0;
        c.bench_function(&format!("opus/encode/complexity_{complexity}"), |b| {
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
}

fn media_path(c: &mut Criterion) {
    let packets = packets();
    let mut decoder = OpusDecoder::new().unwrap();
    let mut i = 0;
    c.bench_function("media_in/packet_to_pipeline", |b| {
        b.iter(|| {
            i = (i + 1) % packets.len();
            black_box(decoder.decode(&packets[i]).unwrap())
        })
    });
    let dtx = [0x08u8];
    c.bench_function("media_in/dtx_frame", |b| {
        b.iter(|| {
            if opus::is_dtx(black_box(&dtx)) {
                black_box(opus::silence(1).unwrap());
            }
        })
    });
    let replies = speech_frames(50);
    let mut encoder = OpusEncoder::new(EncoderSettings::default()).unwrap();
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

/// What one session does in a 20 ms slot.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    /// The realistic mix (see the module's docs).
    Mix,
    /// Everyone talking all the time.
    Worst,
}

/// Slots of the mix's 5 s cycle: user 0..100, silence 100..125, agent
/// 125..225, silence 225..250.
const CYCLE: usize = 250;

/// What session work a slot holds: (decode a user packet, fill a DTX gap
/// of this many frames first, encode a reply frame).
fn work(load: Load, slot: usize) -> (bool, usize, bool) {
    if load == Load::Worst {
        return (true, 0, true);
    }
    let at = slot % CYCLE;
    let user = at < 100;
    let agent = (125..225).contains(&at);
    // A silent user's client sends a comfort-noise packet every 400 ms
    // (20 slots); the 19 frames before it were not sent.
    let noise = !user && at.is_multiple_of(20);
    (user || noise, if noise { 19 } else { 0 }, agent)
}

/// `n` sessions' media on one thread for `run`: every wake's lateness,
/// sorted.
fn sessions_on_one_core(n: usize, run: Duration, load: Load) -> Vec<Duration> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async move {
        let packets = std::sync::Arc::new(packets());
        let noise = std::sync::Arc::new(comfort_noise_packet());
        let replies = std::sync::Arc::new(speech_frames(50));
        let mut tasks = tokio::task::JoinSet::new();
        let start = tokio::time::Instant::now() + Duration::from_millis(50);
        let slots = (run.as_millis() / 20) as usize;
        for s in 0..n {
            let (packets, noise, replies) = (packets.clone(), noise.clone(), replies.clone());
            // Sessions' slots spread over the 20 ms, as real rooms' are;
            // their cycles spread over the 5 s.
            let first = start + Duration::from_micros((s as u64 * 20_000) / n as u64);
            let cycle_offset = (s * CYCLE) / n;
            tasks.spawn(async move {
                let mut decoder = OpusDecoder::new().unwrap();
                let mut encoder = OpusEncoder::new(EncoderSettings::default()).unwrap();
                let mut late = Vec::with_capacity(slots);
                for k in 0..slots {
                    let (decode, fill, encode) = work(load, k + cycle_offset);
                    if !decode && !encode {
                        continue; // nothing arrives, nothing is due: no wake
                    }
                    let due = first + Duration::from_millis(20 * k as u64);
                    tokio::time::sleep_until(due).await;
                    if fill > 0 {
                        black_box(opus::silence(fill).unwrap());
                    }
                    if decode {
                        let packet = if fill > 0 {
                            &noise[..]
                        } else {
                            &packets[k % packets.len()][..]
                        };
                        black_box(decoder.decode(packet).unwrap());
                    }
                    if encode {
                        encoder
                            .push(&replies[k % replies.len()], |p| {
                                black_box(p);
                            })
                            .unwrap();
                    }
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

fn cpus() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Cpus_allowed_list"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "?".into())
}

fn sessions_per_core(_: &mut Criterion) {
    let run = Duration::from_secs(5);
    println!(
        "sessions_per_core: one current-thread runtime, CPUs allowed: {}",
        cpus()
    );
    for (name, load, counts) in [
        ("mix", Load::Mix, &[250, 500, 750, 1000, 1500][..]),
        ("worst", Load::Worst, &[100, 150, 200, 250, 300][..]),
    ] {
        let mut carried = 0;
        for &n in counts {
            let t = Instant::now();
            let late = sessions_on_one_core(n, run, load);
            let p99 = percentile(&late, 0.99);
            println!(
                "sessions_per_core/{name}/{n}: lateness p50 {:?} p99 {p99:?} max {:?} ({} wakes in {:?})",
                percentile(&late, 0.5),
                late.last().copied().unwrap_or_default(),
                late.len(),
                t.elapsed(),
            );
            if p99 < Duration::from_millis(10) {
                carried = carried.max(n);
            }
        }
        println!("sessions_per_core/{name}: {carried} sessions at p99 < 10 ms (of those tried)");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = opus, media_path, sessions_per_core
}
criterion_main!(benches);
