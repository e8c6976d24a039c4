//! The `livekit` provider's media path, per 20 ms frame of room audio:
//!
//! - `opus/quality` (printed): each encoder mode (`voip`: SILK; `low_delay`:
//!   CELT) at its default bitrate (and CELT at SILK's 32 kb/s too) and
//!   complexities 10, 7, 5, 3, 1, 0, encoded and decoded, measured against
//!   the original: log-spectral distance over 50 Hz bins and over critical
//!   bands (100 Hz..7 kHz, 20 ms frames), segmental and plain SNR (SNR
//!   means little for SILK, which keeps how speech sounds, not its
//!   waveform), and the bitrate spent. On a synthetic voiced sound and, when
//!   `LIVEKIT_BENCH_SPEECH` names a 16-bit mono 16 kHz WAV, on that
//!   recording; `LIVEKIT_BENCH_DUMP=<dir>` writes the decoded audio as raw
//!   s16le for other tools (PESQ), `LIVEKIT_BENCH_BITRATE` overrides the
//!   bitrates. Then `opus/dtx`: how many of 100 frames after speech each
//!   mode leaves unsent, for digital silence and a -60 dBFS noise floor;
//! - `opus/encode_cost` (printed): libopus's encode cost by input rate,
//!   mode, bitrate and complexity, and the user's SILK decode
//!   (`opus/decode_cost`), in the thread's CPU time (other processes' load
//!   not counted);
//! - `opus/decode`: one 20 ms packet of the user's speech decoded straight
//!   to the pipeline's 16 kHz (libopus decodes at the rate asked for);
//! - `opus/encode/{mode}/complexity_N`: one 20 ms frame of 16 kHz reply
//!   speech encoded (at the mode's default bitrate, DTX on);
//! - `media_in/packet_to_pipeline`: what a user packet costs before the
//!   pipeline sees it (Opus decode to 16 kHz, nothing resampled);
//!   `media_in/dtx_frame`: what a DTX frame from a silent user costs (no
//!   decode: 20 ms of silence handed in);
//! - `media_out/frame_to_packet`: what a 16 kHz reply frame costs before it
//!   goes out as RTP (Opus encode with the provider's default settings);
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
//!   Each session encodes with the provider's default settings
//!   (`EncoderSettings::default()`) and decodes the user's SILK packets.
//!   Each wake's lateness behind its schedule is the added lateness one
//!   core's load gives a session's media; the bench prints p50, p99 and
//!   max per N, the thread's CPU use and time per wake, the time it waited
//!   for the CPU (other processes' load, which makes lateness too), and the
//!   most sessions with p99 under 10 ms. Transport costs (SRTP, UDP, ICE
//!   keepalives, the webrtc-rs driver) are not in it; `mix+rtp_udp` adds
//!   an RTP header and a UDP send (to a local socket) per reply packet,
//!   still without SRTP or the receive side. `mix_voip_c5` is the mix with
//!   the former default (SILK, complexity 5), `wakes_only` the mix's wakes
//!   without media work (the runtime's own cost).
//!
//! `taskset -c 1 cargo bench --features livekit --bench livekit` (pinned to
//! one core; the bench prints the CPUs it may run on).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use voice_backends::audio::{AudioFrame, to_i16_samples};
use voice_backends::providers::livekit::opus::{
    self, Encoded, EncoderSettings, FRAME_SAMPLES, OpusApplication, OpusDecoder, OpusEncoder,
    PCM_RATE,
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

fn settings(application: OpusApplication, complexity: u8) -> EncoderSettings {
    EncoderSettings {
        application,
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
    encode_all(user_client(), &speech_frames(50))
}

/// A comfort-noise update of a silent user's client: what a DTX encoder
/// sends now and then over silence.
fn comfort_noise_packet() -> Vec<u8> {
    let silence: Vec<AudioFrame> = (0..100).map(|_| opus::silence(1).unwrap()).collect();
    let mut encoder = OpusEncoder::new(user_client()).unwrap();
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

/// The user's client: a browser encodes speech with SILK (or hybrid),
/// whatever the agent's own encoder does; its packets are what the agent
/// decodes.
fn user_client() -> EncoderSettings {
    EncoderSettings {
        application: OpusApplication::Voip,
        ..EncoderSettings::default()
    }
}

/// An objective measure of coded speech against the original, over 20 ms
/// frames at 16 kHz, the decoded signal aligned at the codec's delay.
struct Quality {
    /// The delay found, in samples.
    lag: usize,
    /// Plain SNR (dB): meaningless for SILK, which does not keep the
    /// waveform, only what is heard.
    snr: f64,
    /// Segmental SNR (dB): each active frame's SNR, clamped to -10..35,
    /// averaged.
    seg_snr: f64,
    /// Log-spectral distance (dB): per active frame, the RMS over
    /// 100 Hz..7 kHz (50 Hz bins, Hann window) of the difference of the
    /// two power spectra in dB, each floored 40 dB under the original
    /// frame's peak (noise that far down is masked), averaged. 0 is
    /// identical.
    lsd: f64,
    /// The same over 18 critical bands (Bark, 100 Hz..7 kHz): the
    /// spectral envelope as heard, not the fine structure between
    /// harmonics.
    bark: f64,
    /// The bitrate of the packets sent (kb/s, silent frames sent as none).
    kbps: f64,
}

/// The delay (0..400 samples) at which `decoded` best matches `original`
/// (the largest normalized cross-correlation).
fn best_lag(original: &[i16], decoded: &[i16]) -> usize {
    let skip = 1_600; // past the codec's start-up
    let len = original.len().min(decoded.len()).saturating_sub(skip + 400);
    (0..400)
        .map(|lag| {
            let (mut xy, mut yy) = (0.0f64, 0.0f64);
            for i in skip..skip + len {
                let x = f64::from(original[i]);
                let y = f64::from(decoded[i + lag]);
                xy += x * y;
                yy += y * y;
            }
            (lag, xy / yy.max(1.0).sqrt())
        })
        .fold((0, f64::MIN), |best, c| if c.1 > best.1 { c } else { best })
        .0
}

/// Power spectra of 20 ms frames: bins 2..=140 (100 Hz..7 kHz at 50 Hz).
struct Spectrum {
    window: Vec<f64>,
    cos: Vec<f64>,
    sin: Vec<f64>,
}

const BINS: std::ops::RangeInclusive<usize> = 2..=140;

impl Spectrum {
    fn new() -> Self {
        let n = FRAME_SAMPLES;
        let window = (0..n)
            .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos())
            .collect();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for k in BINS {
            for i in 0..n {
                let w = 2.0 * std::f64::consts::PI * (k * i) as f64 / n as f64;
                cos.push(w.cos());
                sin.push(w.sin());
            }
        }
        Spectrum { window, cos, sin }
    }

    /// The power of each bin.
    fn power(&self, frame: &[i16]) -> Vec<f64> {
        let n = FRAME_SAMPLES;
        let x: Vec<f64> = frame
            .iter()
            .zip(&self.window)
            .map(|(&v, w)| f64::from(v) * w)
            .collect();
        (0..BINS.count())
            .map(|b| {
                let (c, s) = (&self.cos[b * n..][..n], &self.sin[b * n..][..n]);
                let re: f64 = x.iter().zip(c).map(|(v, c)| v * c).sum();
                let im: f64 = x.iter().zip(s).map(|(v, s)| v * s).sum();
                re * re + im * im
            })
            .collect()
    }
}

/// Critical band edges (Hz) from 100 Hz to 7 kHz (Zwicker's).
const BARK_EDGES: [f64; 19] = [
    100.0, 200.0, 300.0, 400.0, 510.0, 630.0, 770.0, 920.0, 1_080.0, 1_270.0, 1_480.0, 1_720.0,
    2_000.0, 2_320.0, 2_700.0, 3_150.0, 3_700.0, 4_400.0, 7_000.0,
];

/// The RMS difference in dB of two power spectra, each floored 40 dB
/// under `reference`'s peak.
fn log_distance(reference: &[f64], other: &[f64]) -> f64 {
    let floor = reference.iter().copied().fold(1.0, f64::max) * 1e-4;
    let sum: f64 = reference
        .iter()
        .zip(other)
        .map(|(a, b)| (10.0 * (a.max(floor) / b.max(floor)).log10()).powi(2))
        .sum();
    (sum / reference.len() as f64).sqrt()
}

/// Bin powers summed into the critical bands.
fn bark_bands(power: &[f64]) -> Vec<f64> {
    let first = *BINS.start();
    BARK_EDGES
        .windows(2)
        .map(|edge| {
            power
                .iter()
                .enumerate()
                .filter(|(i, _)| {
                    let hz = ((first + i) * PCM_RATE as usize / FRAME_SAMPLES) as f64;
                    (edge[0]..edge[1]).contains(&hz)
                })
                .map(|(_, p)| p)
                .sum()
        })
        .collect()
}

fn measure(original: &[i16], decoded: &[i16], bytes: usize) -> Quality {
    let lag = best_lag(original, decoded);
    let decoded = &decoded[lag..];
    let n = FRAME_SAMPLES;
    let frames = original.len().min(decoded.len()) / n;
    let energy = |f: &[i16]| f.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>();
    // Active frames: within 40 dB of the loudest, past the first 100 ms.
    let loudest = (0..frames)
        .map(|f| energy(&original[f * n..][..n]))
        .fold(0.0, f64::max);
    let active: Vec<usize> = (5..frames)
        .filter(|&f| energy(&original[f * n..][..n]) > loudest * 1e-4)
        .collect();
    let spectrum = Spectrum::new();
    let (mut signal, mut noise, mut seg, mut lsd, mut bark) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for &f in &active {
        let (o, d) = (&original[f * n..][..n], &decoded[f * n..][..n]);
        let e = energy(o);
        let err: f64 = o
            .iter()
            .zip(d)
            .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
            .sum();
        signal += e;
        noise += err;
        seg += (10.0 * (e / err.max(1.0)).log10()).clamp(-10.0, 35.0);
        let (po, pd) = (spectrum.power(o), spectrum.power(d));
        lsd += log_distance(&po, &pd);
        bark += log_distance(&bark_bands(&po), &bark_bands(&pd));
    }
    let count = active.len().max(1) as f64;
    Quality {
        lag,
        snr: 10.0 * (signal / noise.max(1.0)).log10(),
        seg_snr: seg / count,
        lsd: lsd / count,
        bark: bark / count,
        kbps: bytes as f64 * 8.0 / (original.len() as f64 / f64::from(PCM_RATE)) / 1000.0,
    }
}

/// `speech` (16 kHz) encoded with `settings` and decoded: its quality.
/// When `LIVEKIT_BENCH_DUMP` names a directory, the decoded audio is
/// written there as `<name>.s16` (raw 16 kHz s16le, for other tools).
fn quality(settings: EncoderSettings, speech: &[i16], name: &str) -> Quality {
    let frames: Vec<AudioFrame> = speech
        .chunks_exact(FRAME_SAMPLES)
        .map(|c| AudioFrame::from_i16(PCM_RATE, 1, c).unwrap())
        .collect();
    let mut encoder = OpusEncoder::new(settings).unwrap();
    let mut decoder = OpusDecoder::new().unwrap();
    let (mut decoded, mut bytes) = (Vec::new(), 0);
    for frame in &frames {
        encoder
            .push(frame, |e| match e {
                Encoded::Packet(p) => {
                    bytes += p.len();
                    decoded.extend(to_i16_samples(&decoder.decode(p).unwrap()));
                }
                Encoded::Silent => decoded.extend(std::iter::repeat_n(0, FRAME_SAMPLES)),
            })
            .unwrap();
    }
    let original: Vec<i16> = frames.iter().flat_map(to_i16_samples).collect();
    if let Ok(dir) = std::env::var("LIVEKIT_BENCH_DUMP") {
        let raw = |s: &[i16]| s.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        let _ = std::fs::write(format!("{dir}/{name}.s16"), raw(&decoded));
        let source = name.split('-').next().unwrap_or(name);
        let _ = std::fs::write(format!("{dir}/{source}-original.s16"), raw(&original));
    }
    measure(&original, &decoded, bytes)
}

/// A 16-bit mono 16 kHz WAV's samples (the optional recorded speech).
fn read_wav(path: &str) -> Option<Vec<i16>> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.get(..4)? != b"RIFF" || bytes.get(8..12)? != b"WAVE" {
        return None;
    }
    let mut at = 12;
    let mut format_ok = false;
    while at + 8 <= bytes.len() {
        let id = &bytes[at..at + 4];
        let size = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().ok()?) as usize;
        let body = bytes.get(at + 8..(at + 8 + size).min(bytes.len()))?;
        if id == b"fmt " && body.len() >= 16 {
            let channels = u16::from_le_bytes([body[2], body[3]]);
            let rate = u32::from_le_bytes(body[4..8].try_into().ok()?);
            let bits = u16::from_le_bytes([body[14], body[15]]);
            format_ok = channels == 1 && rate == PCM_RATE && bits == 16;
        }
        if id == b"data" {
            return format_ok.then(|| {
                body.chunks_exact(2)
                    .map(|b| i16::from_le_bytes([b[0], b[1]]))
                    .collect()
            });
        }
        at += 8 + size + (size & 1);
    }
    None
}

/// Each mode and complexity's quality on the synthetic speech and, when
/// `LIVEKIT_BENCH_SPEECH` names a 16-bit mono 16 kHz WAV, on that
/// recording; then whether each mode's DTX leaves silence unsent.
fn quality_matrix() {
    let mut sources = vec![("synthetic".to_owned(), speech(0, PCM_RATE as usize * 3))];
    if let Ok(path) = std::env::var("LIVEKIT_BENCH_SPEECH") {
        match read_wav(&path) {
            Some(samples) => sources.push((format!("recorded ({path})"), samples)),
            None => println!("opus/quality: {path} is not a 16-bit mono 16 kHz WAV; skipped"),
        }
    }
    let bitrate: Option<u32> = std::env::var("LIVEKIT_BENCH_BITRATE")
        .ok()
        .and_then(|b| b.parse().ok());
    let (voip, low_delay) = (OpusApplication::Voip, OpusApplication::LowDelay);
    // Each mode at its default bitrate, and CELT at SILK's too.
    let modes = [
        (voip, voip.default_bitrate()),
        (low_delay, voip.default_bitrate()),
        (low_delay, low_delay.default_bitrate()),
    ];
    for (index, (name, samples)) in sources.iter().enumerate() {
        println!("opus/quality on {name} speech (LSD, Bark SD: lower is better):");
        for (application, asked) in modes {
            let bitrate = bitrate.unwrap_or(asked);
            for complexity in [10u8, 7, 5, 3, 1, 0] {
                let q = quality(
                    EncoderSettings {
                        application,
                        complexity,
                        bitrate,
                        ..EncoderSettings::default()
                    },
                    samples,
                    &format!(
                        "{index}-{}-{}k-c{complexity}",
                        application.as_str(),
                        bitrate / 1000
                    ),
                );
                println!(
                    "opus/quality/{}/{}k/complexity_{complexity}: LSD {:.2} dB, Bark SD {:.2} dB, segSNR {:.1} dB, SNR {:.1} dB, {:.1} kb/s, delay {} samples",
                    application.as_str(),
                    bitrate / 1000,
                    q.lsd,
                    q.bark,
                    q.seg_snr,
                    q.snr,
                    q.kbps,
                    q.lag
                );
            }
        }
    }
    dtx_check();
}

/// Frames of 2 s after speech that DTX left unsent: digital silence, and
/// a quiet noise floor (-60 dBFS) as a recording's pause has.
fn dtx_check() {
    let talk = speech(0, PCM_RATE as usize / 2);
    let pause = PCM_RATE as usize * 2;
    let mut seed = 1u32;
    let quiet: Vec<i16> = (0..pause)
        .map(|_| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((seed >> 16) as i16) / 1_000
        })
        .collect();
    for application in [OpusApplication::Voip, OpusApplication::LowDelay] {
        for complexity in [10u8, 5, 0] {
            let settings = EncoderSettings {
                application,
                complexity,
                ..EncoderSettings::default()
            };
            let unsent = |tail: &[i16]| {
                let mut all = talk.clone();
                all.extend_from_slice(tail);
                let frame = AudioFrame::from_i16(PCM_RATE, 1, &all).unwrap();
                let mut encoder = OpusEncoder::new(settings).unwrap();
                let mut kinds = Vec::new();
                encoder
                    .push(&frame, |e| kinds.push(e == Encoded::Silent))
                    .unwrap();
                kinds[talk.len() / FRAME_SAMPLES..]
                    .iter()
                    .filter(|&&s| s)
                    .count()
            };
            println!(
                "opus/dtx/{}/complexity_{complexity}: of 100 frames after speech, unsent: digital silence {}, -60 dBFS noise {}",
                application.as_str(),
                unsent(&vec![0; pause]),
                unsent(&quiet),
            );
        }
    }
}

/// This thread's time on a CPU and time waiting for one (Linux's
/// schedstat), so costs can be read apart from other processes' load.
fn thread_times() -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let mut fields = stat.split_whitespace().map(|f| f.parse::<u64>().ok());
    let run = fields.next()??;
    let wait = fields.next()??;
    Some((Duration::from_nanos(run), Duration::from_nanos(wait)))
}

/// The CPU time `f` takes (wall time where schedstat is missing).
fn cpu_time(f: impl FnOnce()) -> Duration {
    let (t, before) = (Instant::now(), thread_times());
    f();
    match (before, thread_times()) {
        (Some((a, _)), Some((b, _))) => b.saturating_sub(a),
        _ => t.elapsed(),
    }
}

/// libopus's encode cost per 20 ms of the same speech by input rate,
/// application, bitrate and complexity (printed: the median of 3 runs of
/// 1000 frames, in this thread's CPU time, so other processes' load does
/// not count).
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
        for (app_name, app, bitrate) in [
            (
                "voip",
                Application::Voip,
                OpusApplication::Voip.default_bitrate(),
            ),
            ("lowdelay", Application::LowDelay, 32_000),
            (
                "lowdelay",
                Application::LowDelay,
                OpusApplication::LowDelay.default_bitrate(),
            ),
        ] {
            for complexity in [10u8, 7, 5, 3, 1, 0] {
                let mut enc = Encoder::new(rate, Channels::Mono, app).unwrap();
                enc.set_bitrate(Bitrate::BitsPerSecond(bitrate as i32))
                    .unwrap();
                enc.set_complexity(complexity).unwrap();
                let frames: Vec<&[i16]> = pcm.chunks_exact(frame).take(250).collect();
                // 1000 frames a run: the kernel accounts CPU time by its
                // tick (4 ms here), 4 us a frame.
                let mut runs: Vec<Duration> = (0..3)
                    .map(|_| {
                        cpu_time(|| {
                            for f in frames.iter().cycle().take(1_000) {
                                black_box(enc.encode(f, &mut out).unwrap());
                            }
                        }) / 1_000
                    })
                    .collect();
                runs.sort();
                println!(
                    "opus/encode_cost/{rate_name}/{app_name}/{}k/complexity_{complexity}: {:?} per 20 ms",
                    bitrate / 1000,
                    runs[1]
                );
            }
        }
    }
}

/// Whether the printed part `name` runs: no filter was given on the
/// command line, or `name` contains it (as criterion filters its own).
fn wanted(name: &str) -> bool {
    let filter = std::env::args().skip(1).rfind(|a| !a.starts_with('-'));
    filter.is_none_or(|f| name.contains(&f))
}

/// The decode of the user's (SILK) packets to 16 kHz, in CPU time as
/// [`encode_matrix`] measures.
fn decode_cost() {
    let packets = packets();
    let mut decoder = OpusDecoder::new().unwrap();
    let mut runs: Vec<Duration> = (0..3)
        .map(|_| {
            cpu_time(|| {
                for p in packets.iter().cycle().take(2_000) {
                    black_box(decoder.decode(p).unwrap());
                }
            }) / 2_000
        })
        .collect();
    runs.sort();
    println!("opus/decode_cost/16k/silk: {:?} per 20 ms", runs[1]);
}

fn opus(c: &mut Criterion) {
    if wanted("opus/quality") {
        quality_matrix();
    }
    if wanted("opus/encode_cost") {
        encode_matrix();
        decode_cost();
    }
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
    for (application, complexity) in [
        (OpusApplication::Voip, 5),
        (OpusApplication::LowDelay, 10),
        (OpusApplication::LowDelay, 5),
        (OpusApplication::LowDelay, 3),
    ] {
        let mut encoder = OpusEncoder::new(settings(application, complexity)).unwrap();
        let mut j = 0;
        let name = format!(
            "opus/encode/{}/complexity_{complexity}",
            application.as_str()
        );
        c.bench_function(&name, |b| {
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
    /// The mix's wakes with no media work: what the runtime itself costs.
    WakesOnly,
}

/// Slots of the mix's 5 s cycle: user 0..100, silence 100..125, agent
/// 125..225, silence 225..250.
const CYCLE: usize = 250;

/// What session work a slot holds: (decode a user packet, fill a DTX gap
/// of this many frames first, encode a reply frame).
fn work_in(load: Load, slot: usize) -> (bool, usize, bool) {
    if load == Load::Worst {
        return (true, 0, true);
    }
    // (WakesOnly wakes as the mix does; the task then skips the work.)
    let at = slot % CYCLE;
    let user = at < 100;
    let agent = (125..225).contains(&at);
    // A silent user's client sends a comfort-noise packet every 400 ms
    // (20 slots); the 19 frames before it were not sent.
    let noise = !user && at.is_multiple_of(20);
    (user || noise, if noise { 19 } else { 0 }, agent)
}

/// What a run of `n` sessions measured.
struct Run {
    /// Every wake's lateness, sorted.
    late: Vec<Duration>,
    /// This thread's CPU time and its time waiting for the CPU (other
    /// processes' load), when Linux says.
    cpu: Option<(Duration, Duration)>,
}

/// Where the reply's RTP packets go when the transport is modelled: a
/// local UDP socket nobody reads (the kernel drops what overflows it).
struct Wire {
    socket: std::net::UdpSocket,
    to: std::net::SocketAddr,
    _sink: std::net::UdpSocket,
}

impl Wire {
    fn new() -> Self {
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        Wire {
            to: sink.local_addr().unwrap(),
            socket,
            _sink: sink,
        }
    }

    /// One RTP packet (RFC 3550's 12-byte header, `payload`) sent.
    fn send(&self, buffer: &mut Vec<u8>, sequence: u16, timestamp: u32, payload: &[u8]) {
        buffer.clear();
        buffer.extend_from_slice(&[0x80, 111]);
        buffer.extend_from_slice(&sequence.to_be_bytes());
        buffer.extend_from_slice(&timestamp.to_be_bytes());
        buffer.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        buffer.extend_from_slice(payload);
        let _ = black_box(self.socket.send_to(buffer, self.to));
    }
}

/// `n` sessions' media on one thread for `run`, each encoding its reply
/// with `settings`; with `transport`, each reply packet also goes out as
/// RTP on a UDP socket.
fn sessions_on_one_core(
    n: usize,
    run: Duration,
    load: Load,
    settings: EncoderSettings,
    transport: bool,
) -> Run {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let before = thread_times();
    let late = rt.block_on(async move {
        let packets = std::sync::Arc::new(packets());
        let noise = std::sync::Arc::new(comfort_noise_packet());
        let replies = std::sync::Arc::new(speech_frames(50));
        let wire = std::sync::Arc::new(Wire::new());
        // The sessions' codecs are made before the clock starts: joining
        // is not the media's steady state.
        let mut codecs: Vec<(OpusDecoder, OpusEncoder)> = (0..n)
            .map(|_| {
                (
                    OpusDecoder::new().unwrap(),
                    OpusEncoder::new(settings).unwrap(),
                )
            })
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        let start = tokio::time::Instant::now() + Duration::from_millis(50);
        let slots = (run.as_millis() / 20) as usize;
        for s in 0..n {
            let (mut decoder, mut encoder) = codecs.pop().unwrap();
            let (packets, noise, replies) = (packets.clone(), noise.clone(), replies.clone());
            let wire = wire.clone();
            // Sessions' slots spread over the 20 ms, as real rooms' are;
            // their cycles spread over the 5 s.
            let first = start + Duration::from_micros((s as u64 * 20_000) / n as u64);
            let cycle_offset = (s * CYCLE) / n;
            tasks.spawn(async move {
                let mut late = Vec::with_capacity(slots);
                let mut buffer = Vec::with_capacity(1_500);
                let mut sequence = 0u16;
                for k in 0..slots {
                    let (decode, fill, encode) = work_in(load, k + cycle_offset);
                    if !decode && !encode {
                        continue; // nothing arrives, nothing is due: no wake
                    }
                    let due = first + Duration::from_millis(20 * k as u64);
                    tokio::time::sleep_until(due).await;
                    if load == Load::WakesOnly {
                        late.push(tokio::time::Instant::now().saturating_duration_since(due));
                        continue;
                    }
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
                                if let (true, Encoded::Packet(payload)) = (transport, p) {
                                    sequence = sequence.wrapping_add(1);
                                    let timestamp = (k as u32).wrapping_mul(opus::RTP_FRAME);
                                    wire.send(&mut buffer, sequence, timestamp, payload);
                                }
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
    });
    let cpu = match (before, thread_times()) {
        (Some((r0, w0)), Some((r1, w1))) => Some((r1.saturating_sub(r0), w1.saturating_sub(w0))),
        _ => None,
    };
    Run { late, cpu }
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
    if !wanted("sessions_per_core") {
        return;
    }
    let run = Duration::from_secs(5);
    let default = EncoderSettings::default();
    let old_default = EncoderSettings {
        application: OpusApplication::Voip,
        bitrate: OpusApplication::Voip.default_bitrate(),
        ..default
    };
    println!(
        "sessions_per_core: one current-thread runtime, CPUs allowed: {}; the reply encoded as \
         the provider's default ({default:?}), the user's packets SILK; transport costs \
         (SRTP, UDP, ICE, the webrtc-rs driver) are not in it but in `+rtp_udp` (RTP header and \
         a UDP send per reply packet; no SRTP, no receive side)",
        cpus()
    );
    let (mix, worst) = (Load::Mix, Load::Worst);
    for (name, load, settings, transport, counts) in [
        ("mix", mix, default, false, &[250, 500, 600, 750, 1000][..]),
        ("worst", worst, default, false, &[150, 200, 250, 350][..]),
        ("mix+rtp_udp", mix, default, true, &[500, 600][..]),
        ("mix_voip_c5", mix, old_default, false, &[250, 500][..]),
        ("wakes_only", Load::WakesOnly, default, false, &[500][..]),
    ] {
        let mut carried = 0;
        for &n in counts {
            let r = sessions_on_one_core(n, run, load, settings, transport);
            let p99 = percentile(&r.late, 0.99);
            let wakes = r.late.len().max(1) as u32;
            let cpu = r.cpu.map_or_else(
                || "no schedstat".to_owned(),
                |(cpu, waited)| {
                    format!(
                        "CPU {:.0} %, {:?} a wake; waited {:?} for the CPU (other load)",
                        cpu.as_secs_f64() * 100.0 / (run.as_secs_f64() + 0.05),
                        cpu / wakes,
                        waited,
                    )
                },
            );
            println!(
                "sessions_per_core/{name}/{n}: lateness p50 {:?} p99 {p99:?} max {:?} ({} wakes; {cpu})",
                percentile(&r.late, 0.5),
                r.late.last().copied().unwrap_or_default(),
                r.late.len(),
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
