//! Endpointing: how long each turn detector waits at the end of a turn, and
//! how many pauses inside a turn it takes for the end, over seeded
//! recorded-style conversations ([`signal::recorded_style_conversation`]:
//! synthetic speech with the pitch and energy real speech has at its pauses,
//! under -60 dBFS of noise), each frame through the `energy` VAD as a session
//! does; then the per-frame cost of the detectors (criterion).
//!
//! The table counts on the audio clock (20 ms frames), not wall time:
//!
//! * *wait*: from the end of a turn's last speech to the frame that ended it
//!   (median and 95th percentile over turns the detector ended during the
//!   turn's final pause);
//! * *mid cut*: mid-sentence pauses (150-700 ms, level or rising pitch) the
//!   detector took for the end of the turn;
//! * *between cut*: pauses between two sentences of one turn (300-700 ms,
//!   after a falling sentence end) taken for the end;
//! * *missed*: turns not ended within their final pause (1.5 s).
//!
//! Run with `cargo bench --features testing --bench endpointing`; set
//! `ENDPOINTING_CONVERSATIONS` to change the count (default 200, 3 turns each).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group};
use voice_backends::audio::AudioFrame;
use voice_backends::pipeline::builtin::adaptive::contour::Ending;
use voice_backends::pipeline::builtin::adaptive::pitch;
use voice_backends::pipeline::builtin::{
    AdaptiveTurnDetector, AdaptiveTurnOptions, EnergyVad, SilenceTurnDetector, SilenceTurnOptions,
};
use voice_backends::pipeline::{TurnDetector, TurnSignal, Vad};
use voice_backends::testing::signal::{self, PauseKind, RecordedTurn};

const FRAME_MS: u32 = 20;
const SAMPLES_PER_FRAME: usize = 320;

/// One conversation's audio, framed, with its pauses.
struct Conversation {
    frames: Vec<AudioFrame>,
    recording: RecordedTurn,
}

fn conversation(seed: u64) -> Conversation {
    let mut recording = signal::recorded_style_conversation(3, Duration::from_millis(1500), seed);
    let noise = signal::noise(
        signal::duration_of(recording.samples.len()),
        -60.0,
        seed ^ 0xA5A5,
    );
    recording.samples = signal::mix(&recording.samples, &noise);
    Conversation {
        frames: signal::frames(&recording.samples, FRAME_MS),
        recording,
    }
}

/// What one detector did over the conversations.
#[derive(Default)]
struct Tally {
    waits_ms: Vec<u64>,
    mid: (usize, usize),
    between: (usize, usize),
    missed: usize,
    /// For the adaptive detector: how each pause kind was read.
    readings: Vec<(PauseKind, Ending)>,
}

/// Runs `detector` over `c`, adding to `tally`; `read` gives the detector's
/// reading of the pause in progress, if it has one.
fn run<D: TurnDetector + ?Sized>(
    c: &Conversation,
    detector: &mut D,
    read: impl Fn(&D) -> Option<Ending>,
    tally: &mut Tally,
) {
    let mut vad = EnergyVad::default();
    let mut ends = Vec::new(); // sample index at the end of the frame that ended a turn
    let mut readings = Vec::new(); // (sample index, reading) at each pause's first reading
    let mut reading = None;
    for (i, f) in c.frames.iter().enumerate() {
        let decision = vad.process(f);
        detector.observe(f);
        let signal = detector.update(&decision, f.duration());
        let end = (i + 1) * SAMPLES_PER_FRAME;
        let now = read(detector);
        if let (Some(r), None) = (now, reading) {
            readings.push((end, r));
        }
        reading = now;
        if signal == TurnSignal::TurnEnded {
            ends.push(end);
        }
    }
    for p in &c.recording.pauses {
        let (from, to) = (p.start, p.start + p.len);
        let ended = ends.iter().find(|&&e| e > from && e <= to);
        match p.kind {
            PauseKind::MidSentence => {
                tally.mid.1 += 1;
                tally.mid.0 += usize::from(ended.is_some());
            }
            PauseKind::BetweenSentences => {
                tally.between.1 += 1;
                tally.between.0 += usize::from(ended.is_some());
            }
            PauseKind::TurnEnd => match ended {
                Some(e) => tally.waits_ms.push(((e - from) / 16) as u64),
                None => tally.missed += 1,
            },
        }
        // The reading made within the first 200 ms of this pause.
        if let Some((_, r)) = readings
            .iter()
            .find(|(at, _)| *at > from && *at <= from + 3200)
        {
            tally.readings.push((p.kind, *r));
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn silence(ms: u64) -> Box<SilenceTurnDetector> {
    Box::new(SilenceTurnDetector::new(SilenceTurnOptions {
        min_endpointing_delay: Duration::from_millis(ms),
        ..Default::default()
    }))
}

fn table() {
    let count: u64 = std::env::var("ENDPOINTING_CONVERSATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let conversations: Vec<Conversation> = (0..count).map(conversation).collect();
    let silences = [500u64, 400, 300, 200];
    let mut tallies: Vec<(String, Tally)> = Vec::new();
    let mut tally = Tally::default();
    for c in &conversations {
        let mut d = AdaptiveTurnDetector::new(AdaptiveTurnOptions::default());
        run(c, &mut d, |d| d.reading().map(|r| r.ending), &mut tally);
    }
    tallies.push(("adaptive (defaults)".into(), tally));
    for ms in silences {
        let mut tally = Tally::default();
        for c in &conversations {
            run(c, silence(ms).as_mut(), |_| None, &mut tally);
        }
        tallies.push((format!("silence {ms}ms"), tally));
    }
    println!(
        "\nendpointing over {count} recorded-style conversations (3 turns each, 20 ms frames, energy VAD, -60 dBFS noise)\n"
    );
    println!(
        "{:<22} {:>6} {:>12} {:>10} {:>16} {:>16} {:>7}",
        "detector", "turns", "median wait", "p95 wait", "mid cut", "between cut", "missed"
    );
    for (name, tally) in &mut tallies {
        tally.waits_ms.sort_unstable();
        let pct = |(cut, of): (usize, usize)| {
            format!("{cut}/{of} {:>5.1}%", 100.0 * cut as f64 / of.max(1) as f64)
        };
        println!(
            "{:<22} {:>6} {:>9} ms {:>7} ms {:>16} {:>16} {:>7}",
            name,
            tally.waits_ms.len() + tally.missed,
            percentile(&tally.waits_ms, 0.5),
            percentile(&tally.waits_ms, 0.95),
            pct(tally.mid),
            pct(tally.between),
            tally.missed
        );
    }
    let adaptive_readings = std::mem::take(&mut tallies[0].1.readings);
    println!("\nadaptive: how pauses were read (finished / continuing / unknown)");
    for kind in [
        PauseKind::MidSentence,
        PauseKind::BetweenSentences,
        PauseKind::TurnEnd,
    ] {
        let of = |e: Ending| {
            adaptive_readings
                .iter()
                .filter(|(k, r)| *k == kind && *r == e)
                .count()
        };
        println!(
            "  {:<18} {:>5} / {:>5} / {:>5}",
            format!("{kind:?}"),
            of(Ending::Finished),
            of(Ending::Continuing),
            of(Ending::Unknown)
        );
    }
    println!();
}

fn per_frame(c: &mut Criterion) {
    let conv = conversation(1);
    let frames = &conv.frames[..500.min(conv.frames.len())];
    let mut vad = EnergyVad::default();
    let decisions: Vec<_> = frames.iter().map(|f| vad.process(f)).collect();
    let mut group = c.benchmark_group("turn_detector_per_frame");
    group.bench_function("adaptive", |b| {
        let mut d = AdaptiveTurnDetector::default();
        let mut i = 0;
        b.iter(|| {
            let f = &frames[i % frames.len()];
            d.observe(f);
            black_box(d.update(&decisions[i % frames.len()], f.duration()));
            i += 1;
        });
    });
    group.bench_function("silence", |b| {
        let mut d = SilenceTurnDetector::default();
        let mut i = 0;
        b.iter(|| {
            let f = &frames[i % frames.len()];
            black_box(d.update(&decisions[i % frames.len()], f.duration()));
            i += 1;
        });
    });
    let window = signal::samples_of(&frames[100..102]);
    group.bench_function("pitch_estimate_40ms", |b| {
        let mut scratch = pitch::PitchScratch::default();
        b.iter(|| black_box(pitch::estimate_f0_with(&mut scratch, &window, 16_000)));
    });
    group.finish();
}

criterion_group!(benches, per_frame);

fn main() {
    table();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
