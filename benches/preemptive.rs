//! What a preemptive reply (`[preemptive]`) gains: the time from the end of
//! the user's turn to the first frame of the reply's audio, with preemptive
//! replies off, and on with `stable_for` 200 ms and 400 ms (the default)
//! (`min_words` 2, the default), over the same scripted conversation.
//!
//! Each configuration is one long session of the `local` provider,
//! `stt_tts`, with the doubles of `testing::components`: a scripted
//! recognizer whose partial transcripts grow word by word while the user
//! speaks, at the pace of the speech (a word about every 200 ms), and stand
//! complete (the whole sentence, with its full stop) from a few frames
//! before the speech ends; its final transcript, sent when the
//! turn ends, has the same words in most turns and another last word in
//! [`DIFFERING`] of them (seeded), where the preemptive reply must be
//! dropped. The agent answers after a first-token delay drawn per turn,
//! uniformly and seeded, from [`AGENT_DELAY`] (the same for both
//! configurations); the speaker waits [`TTS_FIRST_AUDIO`] before its first
//! frame and says each reply as [`REPLY_FRAMES`] 20 ms frames. The
//! microphone is `testing::signal` test speech (a little over 200 ms a word)
//! then silence, 20 ms frames pushed on a tokio interval (wall clock, real
//! time), through the default energy VAD and silence turn detector (the
//! complete sentence lets it end the turn after 500 ms of silence). Turns
//! of the two configurations are interleaved.
//!
//! A partial that stands for `stable_for` mid-sentence (with 200 ms, the
//! gap between two words is as long) starts an attempt on a prefix of the
//! sentence; the next word drops it (counted as dropped) and is watched in
//! turn, up to `max_attempts` (default 3) attempts a turn, which prefixes
//! use up. 400 ms is longer than the gaps between words: one attempt a
//! turn.
//!
//! Per turn, two measures of end of turn -> first reply audio:
//!
//! * *engine*: the turn's latency event, `first_audio` (end of turn, as the
//!   session task saw it, to the first reply frame it sent);
//! * *wall*: from the `TurnEnded` event's arrival to the first reply frame's
//!   arrival from `receive_audio` (`std::time::Instant`).
//!
//! The table gives medians and 95th percentiles over all turns, and for the
//! setup with preemptive replies on, over the turns whose reply was used
//! and those whose reply was dropped; the counts of used and dropped
//! replies (`pipeline_preemptive_replies_total`) and the gain the latency
//! event reports (`preemptive`: how much earlier the agent was started than
//! the final transcript came). The recognizer's final comes at the turn's
//! end, with no delay of its own: with a real recognizer's, the gain would
//! be larger by it. Speed is printed, never asserted. The load average
//! (`/proc/loadavg`, as `uptime` shows it) is printed before and after.
//!
//! Run with `cargo bench --features testing --bench preemptive`; pass
//! `-- --turns N` to change the turns per configuration (default 40, about
//! 3.5 s a turn: about 7 minutes in all).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;
use voice_backends::config::{DEFAULT_PREEMPTIVE_STABLE_FOR, PreemptiveConfig};
use voice_backends::pipeline::components;
use voice_backends::pipeline::events::{SessionEvent, TurnLatency};
use voice_backends::testing::components::{Said, ScriptedStt, TestTts};
use voice_backends::testing::measure::{load_average, quantile};
use voice_backends::testing::signal;
use voice_backends::{
    AgentReply, Config, PipelineState, SessionConfig, VoiceBackend, VoiceSession, agent_fn,
    registry,
};

const FRAME: Duration = Duration::from_millis(20);
/// Frames every reply is said in: 200 ms.
const REPLY_FRAMES: usize = 10;
/// The speaker's time to first audio.
const TTS_FIRST_AUDIO: Duration = Duration::from_millis(100);
/// The agent's first-token delay, in ms: uniform over this range, seeded.
const AGENT_DELAY: std::ops::RangeInclusive<u64> = 150..=400;
/// The share of turns whose final transcript differs from the partial.
const DIFFERING: f64 = 0.2;
/// Speech per word of a sentence.
const PER_WORD: Duration = Duration::from_millis(220);
/// Silence after the speech: the turn ends 500 ms into it, the reply
/// plays within it.
const PAUSE: Duration = Duration::from_millis(1500);
/// The complete partial stands from this many frames before the speech
/// ends.
const COMPLETE_BEFORE_END: usize = 3;
/// How long to wait for a turn's reply.
const PATIENCE: Duration = Duration::from_secs(20);

/// What the users say.
const SENTENCES: [&str; 8] = [
    "Book a table for two tonight.",
    "What time do you open tomorrow?",
    "Can I bring my dog along?",
    "Please move it to eight instead.",
    "Is there parking near the restaurant?",
    "Do you have a vegetarian menu?",
    "I would like the window seat.",
    "Could you send me the address?",
];

/// One scripted turn, the same for both configurations.
struct Turn {
    said: Said,
    speech: Duration,
    seed: u64,
    agent_delay: Duration,
    differs: bool,
}

/// `turns` turns of [`SENTENCES`], seeded.
fn conversation(turns: usize, seed: u64) -> Vec<Turn> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..turns)
        .map(|_| {
            let sentence = SENTENCES[rng.usize(..SENTENCES.len())];
            let words: Vec<&str> = sentence.split(' ').collect();
            let speech = PER_WORD * words.len() as u32 + Duration::from_millis(rng.u64(0..=200));
            let frames = (speech.as_millis() / FRAME.as_millis()) as usize;
            // The partials grow a word at a time; the whole sentence stands
            // from a few frames before the end of the speech.
            let complete_at = frames - COMPLETE_BEFORE_END;
            let differs = rng.f64() < DIFFERING;
            let last = if differs {
                let mut other = words[..words.len() - 1].join(" ");
                other.push_str(" please.");
                other
            } else {
                sentence.to_lowercase()
            };
            let mut said = Said::new(last);
            for k in 1..words.len() {
                let at = (k * complete_at / words.len()).max(1);
                said = said.partial(at, words[..k].join(" "));
            }
            said = said.partial(complete_at, sentence);
            Turn {
                said,
                speech,
                seed: rng.u64(..),
                agent_delay: Duration::from_millis(rng.u64(AGENT_DELAY)),
                differs,
            }
        })
        .collect()
}

/// The configurations compared: off, and on with `stable_for` this long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Off,
    On(Duration),
}

impl Setup {
    const ALL: [Setup; 3] = [
        Setup::Off,
        Setup::On(Duration::from_millis(200)),
        Setup::On(DEFAULT_PREEMPTIVE_STABLE_FOR),
    ];

    fn name(self) -> String {
        match self {
            Setup::Off => "preemptive off".to_owned(),
            Setup::On(d) => format!("on, stable_for {}", humantime::format_duration(d)),
        }
    }

    fn policy(self) -> PreemptiveConfig {
        match self {
            Setup::Off => PreemptiveConfig::default(),
            Setup::On(stable_for) => PreemptiveConfig {
                enabled: true,
                stable_for,
                ..PreemptiveConfig::default()
            },
        }
    }
}

/// One configuration's session, with what it has sent so far.
struct Line {
    backend: Arc<dyn VoiceBackend>,
    session: Arc<dyn VoiceSession>,
    script: ScriptedStt,
    /// The next agent call's first-token delay, in ms.
    agent_delay: Arc<AtomicU64>,
    events: Arc<Mutex<Vec<(Instant, SessionEvent)>>>,
    audio: Arc<Mutex<Vec<Instant>>>,
}

async fn line(k: usize, setup: Setup) -> Line {
    let script = ScriptedStt::new();
    let stt = format!("bench-pre-stt-{k}");
    let tts = format!("bench-pre-tts-{k}");
    components().stt.register(&stt, Arc::new(script.clone()));
    let speaker = TestTts::tagged(REPLY_FRAMES).with_first_audio_delay(TTS_FIRST_AUDIO);
    components().tts.register(&tts, Arc::new(speaker));
    let mut config = Config::new("local");
    config.stt_provider = Some(stt);
    config.tts_provider = Some(tts);
    config.preemptive = setup.policy();
    let backend = registry().create("local", &config).await.unwrap();
    backend.start().await.unwrap();

    let agent_delay = Arc::new(AtomicU64::new(0));
    let delay = agent_delay.clone();
    let agent = agent_fn(move |turn| {
        let wait = Duration::from_millis(delay.load(Ordering::Relaxed));
        async move {
            tokio::time::sleep(wait).await;
            Ok(AgentReply::text(format!("you said {}", turn.transcript)))
        }
    });
    let session = backend
        .create_session(SessionConfig::new("bench").with_agent(agent))
        .await
        .unwrap();
    let mut rx_events = session.events();
    let mut rx_audio = session.receive_audio().unwrap();
    session.start().await.unwrap();
    let events: Arc<Mutex<Vec<(Instant, SessionEvent)>>> = Arc::default();
    let into = events.clone();
    tokio::spawn(async move {
        while let Some(e) = rx_events.recv().await {
            into.lock().unwrap().push((Instant::now(), e));
        }
    });
    let audio: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let into = audio.clone();
    tokio::spawn(async move {
        while rx_audio.recv().await.is_some() {
            into.lock().unwrap().push(Instant::now());
        }
    });
    Line {
        backend,
        session,
        script,
        agent_delay,
        events,
        audio,
    }
}

/// One turn's measures, in ms.
#[derive(Clone, Copy, Debug)]
struct Measured {
    engine: f64,
    wall: f64,
    gain: Option<f64>,
    differs: bool,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn signed_ms(from: Instant, to: Instant) -> f64 {
    if to >= from {
        ms(to - from)
    } else {
        -ms(from - to)
    }
}

impl Line {
    /// Says `turn` in real time and waits for its reply to have played.
    async fn turn(&self, turn: &Turn) -> Measured {
        self.script.push(turn.said.clone());
        self.agent_delay
            .store(turn.agent_delay.as_millis() as u64, Ordering::Relaxed);
        let events_from = self.events.lock().unwrap().len();
        let audio_from = self.audio.lock().unwrap().len();
        let mut samples = signal::speech_like(turn.speech, turn.seed);
        samples.extend(signal::silence(PAUSE));
        let mut tick = tokio::time::interval(FRAME);
        tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
        for f in signal::frames(&samples, 20) {
            tick.tick().await;
            self.session.process_audio(f).await.unwrap();
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            let latency = self.events.lock().unwrap()[events_from..]
                .iter()
                .find_map(|(_, e)| match e {
                    SessionEvent::Latency(l) => Some(l.clone()),
                    _ => None,
                });
            let heard = self.audio.lock().unwrap().len() - audio_from;
            if let Some(latency) = latency
                && heard >= REPLY_FRAMES
                && self.session.state() == PipelineState::Listening
            {
                return self.measured(&latency, events_from, audio_from, turn.differs);
            }
            assert!(
                Instant::now() < deadline,
                "no whole reply within {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn measured(
        &self,
        latency: &TurnLatency,
        events_from: usize,
        audio_from: usize,
        differs: bool,
    ) -> Measured {
        let ended = self.events.lock().unwrap()[events_from..]
            .iter()
            .find_map(|(at, e)| matches!(e, SessionEvent::TurnEnded { .. }).then_some(*at))
            .expect("the turn ended");
        let first = self.audio.lock().unwrap()[audio_from];
        Measured {
            engine: ms(latency.first_audio),
            wall: signed_ms(ended, first),
            gain: latency.preemptive.map(ms),
            differs,
        }
    }

    /// `(used, dropped)` preemptive replies counted.
    fn counted(&self) -> (u64, u64) {
        let m = self
            .backend
            .metrics()
            .expect("the backend counts")
            .snapshot();
        (m.preemptive_used, m.preemptive_dropped)
    }
}

const USAGE: &str = "usage: preemptive [--turns N]";

fn turns_arg() -> usize {
    let mut turns = 40;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--turns" => match it.next().and_then(|v| v.parse().ok()) {
                Some(n) if n > 0 => turns = n,
                _ => {
                    eprintln!("--turns needs a positive count; {USAGE}");
                    std::process::exit(2);
                }
            },
            // Passed by `cargo bench`.
            "--bench" => {}
            other => eprintln!("ignoring argument {other:?}; {USAGE}"),
        }
    }
    turns
}

fn main() {
    let turns = turns_arg();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(turns));
}

/// `p50 / p95` of `values`, or `-` for none.
fn cell(values: &[f64]) -> String {
    if values.is_empty() {
        "-".to_owned()
    } else {
        format!(
            "{:.1} / {:.1}",
            quantile(values, 0.5),
            quantile(values, 0.95)
        )
    }
}

async fn run(turns: usize) {
    let script = conversation(turns, 20);
    let mut lines = Vec::new();
    for (k, setup) in Setup::ALL.into_iter().enumerate() {
        lines.push(line(k, setup).await);
    }
    let load_before = load_average();
    println!(
        "preemptive: {turns} turns per configuration, interleaved; agent first token {}-{} ms, \
         TTS first audio {} ms; load average {load_before}",
        AGENT_DELAY.start(),
        AGENT_DELAY.end(),
        TTS_FIRST_AUDIO.as_millis()
    );
    let mut results: Vec<Vec<Measured>> = vec![Vec::new(); Setup::ALL.len()];
    for (i, turn) in script.iter().enumerate() {
        for (k, line) in lines.iter().enumerate() {
            results[k].push(line.turn(turn).await);
        }
        if (i + 1) % 10 == 0 {
            eprintln!("  {} / {turns}", i + 1);
        }
    }
    let counted: Vec<(u64, u64)> = lines.iter().map(Line::counted).collect();
    for line in &lines {
        line.session.stop().await.unwrap();
        line.backend.stop().await.unwrap();
    }
    let load_after = load_average();

    let differing = script.iter().filter(|t| t.differs).count();
    println!();
    println!(
        "end of user turn -> first reply audio frame, ms, p50 / p95 ({differing} of {turns} finals \
         differ from the partial):"
    );
    println!(
        "{:<32} {:>5} {:>15} {:>15} {:>6} {:>8} {:>15}",
        "", "turns", "engine", "wall", "used", "dropped", "gain (event)"
    );
    for ((setup, v), (used, dropped)) in Setup::ALL.iter().zip(&results).zip(&counted) {
        let rows: Vec<(String, Vec<&Measured>)> = match setup {
            Setup::Off => vec![(setup.name(), v.iter().collect())],
            Setup::On(_) => vec![
                (setup.name(), v.iter().collect()),
                (
                    "  turns with a reply used".to_owned(),
                    v.iter().filter(|m| m.gain.is_some()).collect(),
                ),
                (
                    "  turns answered on the final".to_owned(),
                    v.iter().filter(|m| m.gain.is_none()).collect(),
                ),
            ],
        };
        for (n, (name, m)) in rows.iter().enumerate() {
            let engine: Vec<f64> = m.iter().map(|m| m.engine).collect();
            let wall: Vec<f64> = m.iter().map(|m| m.wall).collect();
            let gain: Vec<f64> = m.iter().filter_map(|m| m.gain).collect();
            let (used, dropped) = if n == 0 {
                (used.to_string(), dropped.to_string())
            } else {
                (String::new(), String::new())
            };
            println!(
                "{:<32} {:>5} {:>15} {:>15} {:>6} {:>8} {:>15}",
                name,
                m.len(),
                cell(&engine),
                cell(&wall),
                used,
                dropped,
                cell(&gain)
            );
        }
    }
    let median = |v: &[Measured], f: fn(&Measured) -> f64| {
        quantile(&v.iter().map(f).collect::<Vec<_>>(), 0.5)
    };
    let same: Vec<Vec<Measured>> = results
        .iter()
        .map(|v| v.iter().filter(|m| !m.differs).copied().collect())
        .collect();
    println!();
    println!(
        "median gain against preemptive off (+ is sooner), ms, engine / wall: all turns; turns \
         whose final has the partial's words"
    );
    for (k, setup) in Setup::ALL.iter().enumerate().skip(1) {
        let gain =
            |v: &[Vec<Measured>], f: fn(&Measured) -> f64| median(&v[0], f) - median(&v[k], f);
        println!(
            "{:<32} {:+.0} / {:+.0}; {:+.0} / {:+.0}",
            setup.name(),
            gain(&results, |m| m.engine),
            gain(&results, |m| m.wall),
            gain(&same, |m| m.engine),
            gain(&same, |m| m.wall),
        );
    }
    println!("load average: before {load_before}, after {load_after}");
}
