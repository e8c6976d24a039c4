//! What the interruption policy costs a real barge-in: how long the reply
//! keeps sounding after the user starts to talk over it, with the policy off
//! (any speech onset cuts the reply at once, the old barge-in) and on (the
//! reply ducks while the speech is judged, `duck = "pause"` or `duck =
//! "gain"` at -12 dB, then is cut once the speech has lasted `min_duration`,
//! 500 ms by default, and said words).
//!
//! Each trial is one session of the `local` provider, `stt_tts` with two
//! doubles of `testing::components`: a recognizer that hears "wait, stop there" three
//! frames into any turn, and a speaker that says every reply as 10 s of a
//! steady tone, so each reply frame received is either at full level or
//! ducked. A text turn starts the reply; the session's reply audio is read
//! as soon as it comes (real-time playout: the engine hands it out at most
//! 80 ms ahead of real time). The microphone is 20 ms frames pushed on a
//! tokio interval (wall clock, real time: one frame per 20 ms): silence,
//! then, at a random point 0.2 to 1.2 s into the reply, 3 s of
//! `testing::signal` test speech (longer than the window measured, so the
//! user's turn does not end within it). Every time is `std::time::Instant`
//! (the wall clock), measured from the *onset*: the instant the first speech
//! frame is handed to `process_audio`.
//!
//! Per trial, two ends, each on two clocks:
//!
//! * *full level ends*: the reply stops sounding at full level (policy off,
//!   and `pause`: its last frame at all; `gain`: its last frame before the
//!   first ducked one);
//! * *cut*: the reply's last frame at all (gone for good).
//!
//! *heard* is when that frame finishes playing on a listener that plays each
//! frame as it arrives, after the ones before it (start = max(arrival, end
//! of the previous frame), 20 ms long); it includes the audio already handed
//! out ahead at the onset, which no policy can take back. *recv* is when the
//! frame arrived from `receive_audio` (it can be before the onset: the frame
//! was handed out ahead). The table gives medians and 95th percentiles, and
//! the heard times' difference from the policy off, in ms and in 20 ms
//! frames. The load average (`/proc/loadavg`, as `uptime` shows it) is
//! printed before and after: the machine may be shared.
//!
//! Run with `cargo bench --features testing --bench interruption`; pass
//! `-- --trials N` to change the trials per configuration (default 50; a
//! trial takes about 2.2 s, the three configurations interleaved: about
//! 5.5 minutes in all).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;
use voice_backends::config::{Duck, InterruptionConfig};
use voice_backends::pipeline::components;
use voice_backends::pipeline::events::SessionEvent;
use voice_backends::testing::components::{Said, ScriptedStt, TestTts};
use voice_backends::testing::measure::{load_average, quantile};
use voice_backends::testing::signal;
use voice_backends::{AgentReply, Config, SessionConfig, VoiceBackend, agent_fn, registry};

const FRAME: Duration = Duration::from_millis(20);
/// Frames every reply is said in: 10 s.
const REPLY_FRAMES: usize = 500;
/// The reply tone's peak; a ducked frame (-12 dB: about a quarter) peaks
/// well under half of it.
const TONE: i16 = 16_000;
/// The user's speech: longer than the window, so the turn does not end in it.
const SPEECH: Duration = Duration::from_secs(3);
/// How long after the onset the reply audio is watched.
const WINDOW: Duration = Duration::from_millis(1500);
/// The onset comes this many frames into the reply, at random.
const ONSET_FRAMES: std::ops::RangeInclusive<u32> = 10..=60;

/// The configurations compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Off,
    Pause,
    Gain,
}

impl Setup {
    const ALL: [Setup; 3] = [Setup::Off, Setup::Pause, Setup::Gain];

    fn name(self) -> &'static str {
        match self {
            Setup::Off => "policy off",
            Setup::Pause => "on, duck=pause",
            Setup::Gain => "on, duck=gain -12 dB",
        }
    }

    fn policy(self) -> InterruptionConfig {
        let on = InterruptionConfig {
            enabled: true,
            ..InterruptionConfig::default()
        };
        match self {
            Setup::Off => InterruptionConfig {
                enabled: false,
                ..on
            },
            Setup::Pause => InterruptionConfig {
                duck: Duck::Pause,
                ..on
            },
            Setup::Gain => InterruptionConfig {
                duck: Duck::Gain,
                duck_gain_db: -12,
                ..on
            },
        }
    }
}

/// One reply frame received: when, and whether at full level.
#[derive(Clone, Copy)]
struct Got {
    at: Instant,
    full: bool,
    duration: Duration,
}

/// One trial's ends, in ms after the onset.
#[derive(Clone, Copy, Debug)]
struct Trial {
    full_heard: f64,
    full_recv: f64,
    cut_heard: f64,
    cut_recv: f64,
    /// The session's `SpeechStarted` and `Interrupted` events (policy off
    /// and `pause`: the cut; `gain`: the cut, after the ducking).
    speech_started: Option<f64>,
    interrupted: Option<f64>,
}

fn ms_after(t: Instant, onset: Instant) -> f64 {
    if t >= onset {
        (t - onset).as_secs_f64() * 1e3
    } else {
        -((onset - t).as_secs_f64() * 1e3)
    }
}

async fn trial(backend: &Arc<dyn VoiceBackend>, onset_after: u32, seed: u64) -> Trial {
    let agent = agent_fn(|_turn| async { Ok(AgentReply::text("a long answer")) });
    let session = backend
        .create_session(SessionConfig::new("bench").with_agent(agent))
        .await
        .unwrap();
    let mut events = session.events();
    let mut rx = session.receive_audio().unwrap();
    session.start().await.unwrap();

    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let into = got.clone();
    let receiver = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            let at = Instant::now();
            let peak = signal::samples_of([&f])
                .iter()
                .map(|s| s.unsigned_abs())
                .max()
                .unwrap_or(0);
            into.lock().unwrap().push(Got {
                at,
                full: peak > TONE.unsigned_abs() / 2,
                duration: f.duration(),
            });
        }
    });
    let seen: Arc<Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
    let into = seen.clone();
    let watcher = tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            let now = Instant::now();
            let mut seen = into.lock().unwrap();
            match e {
                SessionEvent::SpeechStarted if seen.0.is_none() => seen.0 = Some(now),
                SessionEvent::Interrupted { .. } if seen.1.is_none() => seen.1 = Some(now),
                _ => {}
            }
        }
    });

    session.send_text("hello").await.unwrap();
    let quiet = signal::frames(&signal::silence(FRAME), 20).remove(0);
    let speech = signal::frames(&signal::speech_like(SPEECH, seed), 20);
    let mut tick = tokio::time::interval(FRAME);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    // The microphone: silence until the reply has played `onset_after`
    // frames' worth of ticks, then speech, frame by frame in real time.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut into_reply = None;
    loop {
        tick.tick().await;
        assert!(Instant::now() < deadline, "the reply did not start");
        if into_reply.is_none() && !got.lock().unwrap().is_empty() {
            into_reply = Some(0);
        }
        if let Some(n) = into_reply.as_mut() {
            *n += 1;
            if *n >= onset_after {
                break;
            }
        }
        session.process_audio(quiet.clone()).await.unwrap();
    }
    let mut onset = None;
    for f in speech {
        tick.tick().await;
        let now = Instant::now();
        let onset = *onset.get_or_insert(now);
        session.process_audio(f).await.unwrap();
        if now - onset >= WINDOW {
            break;
        }
    }
    let onset = onset.unwrap();
    session.stop().await.unwrap();
    receiver.abort();
    watcher.abort();

    // The frames of the reply received up to the end of the window, on a
    // listener playing each as it comes.
    let got = got.lock().unwrap().clone();
    let mut end = None::<Instant>;
    let mut played = Vec::with_capacity(got.len());
    for g in got.iter().filter(|g| g.at < onset + WINDOW) {
        let start = end.map_or(g.at, |e| e.max(g.at));
        end = Some(start + g.duration);
        played.push((*g, start + g.duration));
    }
    let last = played.last().expect("reply audio came");
    // The last full-level frame before the first ducked one after the onset
    // (policy off and pause: no ducked frame, the last frame).
    let first_ducked = played.iter().position(|(g, _)| !g.full);
    let full = match first_ducked {
        Some(0) | None => played.iter().rev().find(|(g, _)| g.full),
        Some(i) => Some(&played[i - 1]),
    }
    .expect("full-level reply audio came");
    let (started, interrupted) = *seen.lock().unwrap();
    Trial {
        full_heard: ms_after(full.1, onset),
        full_recv: ms_after(full.0.at, onset),
        cut_heard: ms_after(last.1, onset),
        cut_recv: ms_after(last.0.at, onset),
        speech_started: started.map(|t| ms_after(t, onset)),
        interrupted: interrupted.map(|t| ms_after(t, onset)),
    }
}

const USAGE: &str = "usage: interruption [--trials N]";

fn trials_arg() -> usize {
    let mut trials = 50;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--trials" => match it.next().and_then(|v| v.parse().ok()) {
                Some(n) if n > 0 => trials = n,
                _ => {
                    eprintln!("--trials needs a positive count; {USAGE}");
                    std::process::exit(2);
                }
            },
            // Passed by `cargo bench`.
            "--bench" => {}
            other => eprintln!("ignoring argument {other:?}; {USAGE}"),
        }
    }
    trials
}

fn main() {
    let trials = trials_arg();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(trials));
}

async fn run(trials: usize) {
    // Words three frames into every turn, and the same at its end.
    let hears = Said::new("wait, stop there").partial(3, "wait, stop there");
    components()
        .stt
        .register("bench-hears", Arc::new(ScriptedStt::repeating(hears)));
    components()
        .tts
        .register("bench-tone", Arc::new(TestTts::tone(REPLY_FRAMES, TONE)));
    let mut backends = Vec::new();
    for setup in Setup::ALL {
        let mut config = Config::new("local");
        config.stt_provider = Some("bench-hears".into());
        config.tts_provider = Some("bench-tone".into());
        config.interruption = setup.policy();
        let backend = registry().create("local", &config).await.unwrap();
        backend.start().await.unwrap();
        backends.push(backend);
    }
    let load_before = load_average();
    println!(
        "interruption: {trials} trials per configuration, interleaved; load average {load_before}"
    );
    let mut rng = fastrand::Rng::with_seed(20);
    let mut results: Vec<Vec<Trial>> = vec![Vec::new(); Setup::ALL.len()];
    for i in 0..trials {
        // The same onset point and speech for every configuration.
        let onset_after = rng.u32(ONSET_FRAMES);
        let seed = rng.u64(..);
        for (k, backend) in backends.iter().enumerate() {
            results[k].push(trial(backend, onset_after, seed).await);
        }
        if (i + 1) % 10 == 0 {
            eprintln!("  {} / {trials}", i + 1);
        }
    }
    for backend in &backends {
        backend.stop().await.unwrap();
    }
    let load_after = load_average();

    let frames = |ms: f64| ms / FRAME.as_secs_f64() / 1e3;
    let col = |v: &[Trial], f: fn(&Trial) -> f64| -> (f64, f64) {
        let x: Vec<f64> = v.iter().map(f).collect();
        (quantile(&x, 0.5), quantile(&x, 0.95))
    };
    println!();
    println!("ms after the onset (the first speech frame handed to process_audio), p50 / p95:");
    println!(
        "{:<22} {:>15} {:>15} {:>15} {:>15} {:>13} {:>13}",
        "",
        "full end heard",
        "full end recv",
        "cut heard",
        "cut recv",
        "speech event",
        "interrupted"
    );
    for (setup, v) in Setup::ALL.iter().zip(&results) {
        let opt = |f: fn(&Trial) -> Option<f64>| -> String {
            let x: Vec<f64> = v.iter().filter_map(f).collect();
            if x.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.0} / {:.0}", quantile(&x, 0.5), quantile(&x, 0.95))
            }
        };
        let cell = |(a, b): (f64, f64)| format!("{a:.1} / {b:.1}");
        println!(
            "{:<22} {:>15} {:>15} {:>15} {:>15} {:>13} {:>13}",
            setup.name(),
            cell(col(v, |t| t.full_heard)),
            cell(col(v, |t| t.full_recv)),
            cell(col(v, |t| t.cut_heard)),
            cell(col(v, |t| t.cut_recv)),
            opt(|t| t.speech_started),
            opt(|t| t.interrupted),
        );
    }
    println!();
    println!("against the policy off (heard times; + is later), p50 / p95, ms (20 ms frames):");
    println!("{:<22} {:>28} {:>28}", "", "full level ends", "cut");
    let off = &results[0];
    for (setup, v) in Setup::ALL.iter().zip(&results).skip(1) {
        let diff = |f: fn(&Trial) -> f64| -> String {
            let (a50, a95) = col(v, f);
            let (b50, b95) = col(off, f);
            let (d50, d95) = (a50 - b50, a95 - b95);
            format!(
                "{d50:+.1} / {d95:+.1} ({:+.2} / {:+.2})",
                frames(d50),
                frames(d95)
            )
        };
        println!(
            "{:<22} {:>28} {:>28}",
            setup.name(),
            diff(|t| t.full_heard),
            diff(|t| t.cut_heard)
        );
    }
    println!();
    println!("load average: before {load_before}, after {load_after}");
}
