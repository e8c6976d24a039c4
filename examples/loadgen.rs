//! A WebSocket load generator for the server's `/ws` protocol.
//!
//! It opens `--sessions` WebSocket sessions (default 1000) on loopback and
//! has each stream real-time speech for `--seconds` (default 20), then reports
//! latency percentiles, CPU, memory and failures.
//!
//! ```sh
//! # against a server it starts in process (the local echo backend)
//! cargo run --release --example loadgen --features server,testing -- --sessions 1000 --seconds 20
//! # against a running `voice-backends serve`
//! cargo run --release --example loadgen --features server,testing -- --url ws://127.0.0.1:8089/ws --sessions 30
//! ```
//!
//! # What each client does
//!
//! Clients start staggered evenly over `--ramp` (default 2 s), so their 20 ms
//! frame deadlines are spread over the frame period rather than all falling
//! on the same millisecond. Each connects (with `TCP_NODELAY`), sends
//! `{"type":"start","sample_rate":16000}`, waits for `ready`, then writes one
//! binary message of 20 ms of PCM s16le mono 16 kHz audio every 20 ms, paced
//! by the clock (`sleep_until` of the frame's scheduled time, so a late frame
//! does not delay the next ones). The audio is [`signal::speech_like`]
//! utterances (`--speech-ms`, default 1000, plus 0-300 ms per utterance)
//! separated by `--pause-ms` (default 3000) of silence, over a -60 dBFS noise
//! floor; eight patterns (seeds) are shared by all clients. The echo reply is
//! the whole turn (pre-roll, speech and the endpointing silence, about 2 s)
//! played out in real time, so the pause is long enough for it to end before
//! the next utterance: a shorter one makes every turn a barge-in. At the end
//! it sends `{"type":"stop"}` and waits for the server's close.
//!
//! # What is measured
//!
//! - **send lateness**: for every frame, the time it was handed to the socket
//!   minus its scheduled time (how far the client, and the machine, fall
//!   behind real time).
//! - **echo round trip**: the built-in pipeline is deterministic (the same
//!   audio gives the same turns however fast it is pushed), so the generator
//!   runs the same VAD (`energy`) and turn detector (`silence`) with default
//!   options over its own audio and knows *which frame completes each turn*:
//!   the frame after which the server has heard enough silence to end the
//!   turn. The round trip of a turn is the time from writing that frame to
//!   receiving the first binary reply frame after it. The echo model answers
//!   at once, so this is transport in both directions plus the server's work
//!   for the frame, the turn and the first reply frame, with no audio-clock
//!   wait in it. It assumes the server runs the default `energy` and
//!   `silence` options (true in process; with `--url`, only if the served
//!   config keeps them), and long enough pauses that a reply is over before
//!   the next turn ends.
//! - **first_audio_ms**: the server's own `latency` event per turn (end of
//!   turn decided to first reply audio sent, measured inside the server).
//! - CPU time of the process from `/proc/self/stat` (utime + stime over
//!   wall time; 100 % is one core) and, in process, split between the
//!   server's and the clients' runtime threads (`/proc/self/task/*/stat`);
//!   RSS from `/proc/self/status` before the sessions, when all are
//!   connected, and at its peak, and the growth per session (in process it
//!   includes the clients' own memory, kept small with 8 KiB read buffers,
//!   so it is an upper bound for the server).
//! - sessions that failed (connect, handshake, unexpected close), turns
//!   predicted vs `turn_ended` events seen, turns without a reply, and
//!   barge-ins (`interrupted` events; there should be none).
//!
//! # Limits of the server it starts
//!
//! The in-process server runs the `local` provider (`echo`, `energy`,
//! `silence`) with `max_concurrent_sessions` raised to the session count and
//! the fallback rate limit raised, and its per-address limits
//! (`max_connections_per_ip`, `connections_per_second_per_ip`) raised, on a
//! tokio runtime of its own (`--server-threads`, default 2) separate from the
//! clients' (`--client-threads`, default 2; 1 runs them on one current-thread
//! runtime). Against `--url`, the server's
//! per-address limits apply (32 connections and 20 per second by default):
//! the clients then spread over source addresses 127.0.0.2, 127.0.0.3, ...
//! (`--source-ips`, default enough for 24 sessions each) and the ramp should
//! be long enough for the connection rate.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use voice_backends::pipeline::builtin::{
    EnergyVad, EnergyVadOptions, SilenceTurnDetector, SilenceTurnOptions,
};
use voice_backends::pipeline::{TurnDetector, TurnSignal, Vad};
use voice_backends::server::{Server, ServerConfig};
use voice_backends::testing::signal;
use voice_backends::{Config, PipelineType, registry};

const FRAME: Duration = Duration::from_millis(20);
const PATTERNS: u64 = 8;
const USAGE: &str = "usage: loadgen [--sessions N] [--seconds S] [--url ws://HOST:PORT/ws] \
[--ramp S] [--source-ips N] [--server-threads N] [--client-threads N] \
[--speech-ms MS] [--pause-ms MS]";

#[derive(Clone, Debug)]
struct Options {
    sessions: usize,
    seconds: f64,
    url: Option<String>,
    ramp: f64,
    source_ips: Option<usize>,
    server_threads: usize,
    client_threads: usize,
    speech_ms: u64,
    pause_ms: u64,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        sessions: 1000,
        seconds: 20.0,
        url: None,
        ramp: 2.0,
        source_ips: None,
        server_threads: 2,
        client_threads: 2,
        speech_ms: 1000,
        pause_ms: 3000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value:?}: {e}\n{USAGE}");
        match flag.as_str() {
            "--sessions" => o.sessions = value.parse().map_err(|e| bad(&e))?,
            "--seconds" => o.seconds = value.parse().map_err(|e| bad(&e))?,
            "--url" => o.url = Some(value),
            "--ramp" => o.ramp = value.parse().map_err(|e| bad(&e))?,
            "--source-ips" => o.source_ips = Some(value.parse().map_err(|e| bad(&e))?),
            "--server-threads" => o.server_threads = value.parse().map_err(|e| bad(&e))?,
            "--client-threads" => o.client_threads = value.parse().map_err(|e| bad(&e))?,
            "--speech-ms" => o.speech_ms = value.parse().map_err(|e| bad(&e))?,
            "--pause-ms" => o.pause_ms = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    if o.sessions == 0 || o.seconds <= 0.0 || o.ramp < 0.0 {
        return Err(format!(
            "--sessions and --seconds must be positive, --ramp not negative\n{USAGE}"
        ));
    }
    o.server_threads = o.server_threads.max(1);
    o.client_threads = o.client_threads.max(1);
    Ok(o)
}

/// One client audio pattern: its frames and the frames that complete a turn.
struct Pattern {
    frames: Vec<Bytes>,
    turn_end: Vec<bool>,
}

/// Speech-like utterances and pauses over a noise floor, and where the
/// default `energy` VAD and `silence` turn detector end each turn (mirroring
/// the engine: a turn ends on `TurnEnded` after `SpeechStarted`).
fn pattern(seed: u64, o: &Options) -> Pattern {
    let total = Duration::from_secs_f64(o.seconds);
    let wanted = signal::samples_in(total);
    let mut samples = signal::silence(Duration::from_millis(300));
    let mut k = 0u64;
    while samples.len() < wanted {
        let speech = o.speech_ms + (seed * 37 + k * 101) % 300;
        samples.extend(signal::utterance(
            Duration::from_millis(speech),
            Duration::from_millis(o.pause_ms),
            seed * 1000 + k,
        ));
        k += 1;
    }
    samples.truncate(wanted);
    let samples = signal::mix(&samples, &signal::noise(total, -60.0, seed));
    let frames = signal::frames(&samples, 20);

    let mut vad = EnergyVad::new(EnergyVadOptions::default());
    let mut turn = SilenceTurnDetector::new(SilenceTurnOptions::default());
    let mut in_speech = false;
    let mut turn_end = vec![false; frames.len()];
    for (i, frame) in frames.iter().enumerate() {
        let decision = vad.process(frame);
        match turn.update(&decision, frame.duration()) {
            TurnSignal::SpeechStarted => in_speech = true,
            TurnSignal::TurnEnded if in_speech => {
                in_speech = false;
                turn.reset();
                turn_end[i] = true;
            }
            _ => {}
        }
    }
    Pattern {
        frames: frames.into_iter().map(|f| f.into_data()).collect(),
        turn_end,
    }
}

#[derive(Debug, Default)]
struct Report {
    failure: Option<String>,
    connect: Option<Duration>,
    lateness_us: Vec<u32>,
    rtt_us: Vec<u32>,
    first_audio_ms: Vec<f32>,
    turns_predicted: usize,
    turns_observed: usize,
    interrupted: usize,
    errors: usize,
    reply_frames: usize,
    close_code: Option<u16>,
}

/// The clients' WebSocket buffers: 8 KiB of read buffer instead of
/// tungstenite's 128 KiB (replies are 640-byte frames), so the memory per
/// session measured in process is mostly the server's.
fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(8 * 1024)
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// One client session; see the module documentation.
#[allow(clippy::too_many_arguments)]
async fn client(
    index: usize,
    url: Arc<str>,
    addr: SocketAddr,
    source: Option<IpAddr>,
    pattern: Arc<Pattern>,
    start_at: Instant,
    seconds: f64,
    connected: Arc<AtomicUsize>,
) -> Report {
    let mut report = Report::default();
    tokio::time::sleep_until(start_at).await;
    let began = Instant::now();

    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    let stream = async {
        let socket = socket?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(stream)
    };
    let stream = match tokio::time::timeout(Duration::from_secs(10), stream).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            report.failure = Some(format!("connect: {e}"));
            return report;
        }
        Err(_) => {
            report.failure = Some("connect: timed out".into());
            return report;
        }
    };
    let ws = match tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async_with_config(&*url, stream, Some(client_ws_config())),
    )
    .await
    {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            report.failure = Some(format!("handshake: {e}"));
            return report;
        }
        Err(_) => {
            report.failure = Some("handshake: timed out".into());
            return report;
        }
    };
    let (mut sink, mut stream) = ws.split();
    let start = format!(r#"{{"type":"start","user_id":"load-{index}","sample_rate":16000}}"#);
    if let Err(e) = sink.send(Message::text(start)).await {
        report.failure = Some(format!("start: {e}"));
        return report;
    }
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(message) = stream.next().await {
            match message {
                Ok(Message::Text(t)) if t.as_str().contains(r#""type":"ready""#) => {
                    return Ok(());
                }
                Ok(Message::Close(frame)) => {
                    return Err(format!(
                        "closed before ready: {}",
                        frame.map_or("no reason".into(), |f| format!(
                            "{} {}",
                            u16::from(f.code),
                            f.reason
                        ))
                    ));
                }
                Ok(_) => {}
                Err(e) => return Err(format!("before ready: {e}")),
            }
        }
        Err("closed before ready".to_owned())
    })
    .await;
    match ready {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            report.failure = Some(e);
            return report;
        }
        Err(_) => {
            report.failure = Some("no ready within 10 s".into());
            return report;
        }
    }
    report.connect = Some(began.elapsed());
    connected.fetch_add(1, Ordering::Relaxed);

    // The turn whose completing frame was written last, and when.
    let pending: Mutex<Option<Instant>> = Mutex::new(None);
    let sending_done = AtomicBool::new(false);
    let t0 = Instant::now();
    let stop_at = t0 + Duration::from_secs_f64(seconds);

    let mut lateness = Vec::with_capacity(pattern.frames.len());
    let mut turns_predicted = 0usize;
    let send = async {
        let mut failure = None;
        for (i, frame) in pattern.frames.iter().enumerate() {
            let scheduled = t0 + FRAME * i as u32;
            if scheduled >= stop_at {
                break;
            }
            tokio::time::sleep_until(scheduled).await;
            let now = Instant::now();
            lateness.push(micros(now - scheduled));
            if pattern.turn_end[i] {
                turns_predicted += 1;
                *pending.lock().unwrap() = Some(now);
            }
            if let Err(e) = sink.send(Message::Binary(frame.clone())).await {
                failure = Some(format!("send: {e}"));
                break;
            }
        }
        if failure.is_none() {
            let _ = sink.send(Message::text(r#"{"type":"stop"}"#)).await;
        }
        sending_done.store(true, Ordering::Release);
        failure
    };

    let mut rtt = Vec::new();
    let mut first_audio = Vec::new();
    let (mut observed, mut interrupted, mut errors, mut replies) = (0, 0, 0, 0);
    let mut close_code = None;
    let receive = async {
        let give_up = stop_at + Duration::from_secs(15);
        loop {
            let message = match tokio::time::timeout_at(give_up, stream.next()).await {
                Err(_) => return Some("no close from the server within 15 s of stop".to_owned()),
                Ok(None) => {
                    return (!sending_done.load(Ordering::Acquire))
                        .then(|| "the connection ended early".to_owned());
                }
                Ok(Some(Err(e))) => return Some(format!("receive: {e}")),
                Ok(Some(Ok(m))) => m,
            };
            match message {
                Message::Binary(_) => {
                    replies += 1;
                    if let Some(sent) = pending.lock().unwrap().take() {
                        rtt.push(micros(sent.elapsed()));
                    }
                }
                Message::Text(text) => {
                    let Ok(event) = serde_json::from_str::<serde_json::Value>(text.as_str()) else {
                        continue;
                    };
                    match event["type"].as_str() {
                        Some("latency") => {
                            if let Some(ms) = event["first_audio_ms"].as_f64() {
                                first_audio.push(ms as f32);
                            }
                        }
                        Some("turn_ended") => observed += 1,
                        Some("interrupted") => interrupted += 1,
                        Some("error") => errors += 1,
                        _ => {}
                    }
                }
                Message::Close(frame) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    close_code = Some(code);
                    let early = !sending_done.load(Ordering::Acquire);
                    return (early || code != 1000)
                        .then(|| format!("closed with {code} (early: {early})"));
                }
                _ => {}
            }
        }
    };
    let (send_failure, receive_failure) = tokio::join!(send, receive);
    report.failure = send_failure.or(receive_failure);
    report.lateness_us = lateness;
    report.rtt_us = rtt;
    report.first_audio_ms = first_audio;
    report.turns_predicted = turns_predicted;
    report.turns_observed = observed;
    report.interrupted = interrupted;
    report.errors = errors;
    report.reply_frames = replies;
    report.close_code = close_code;
    report
}

/// User and system CPU seconds.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    user: f64,
    system: f64,
}

impl Cpu {
    fn total(self) -> f64 {
        self.user + self.system
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            user: self.user - before.user,
            system: self.system - before.system,
        }
    }
}

/// CPU time of the process, and of its threads by name prefix
/// (`vb-server`, `vb-client`, other), from /proc (clock ticks of 1/100 s,
/// Linux's USER_HZ).
fn cpu_seconds() -> (Cpu, BTreeMap<String, Cpu>) {
    fn ticks(stat: &str) -> Option<(String, Cpu)> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let name = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((
            name,
            Cpu {
                user: utime / 100.0,
                system: stime / 100.0,
            },
        ))
    }
    let total = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| ticks(&s))
        .map_or(Cpu::default(), |(_, t)| t);
    let mut by_group = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for entry in dir.flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let Some((name, t)) = ticks(&stat) {
                let group = if name.starts_with("vb-server") {
                    "server"
                } else if name.starts_with("vb-client") {
                    "clients"
                } else {
                    "other"
                };
                let sum = by_group.entry(group.to_owned()).or_insert(Cpu::default());
                sum.user += t.user;
                sum.system += t.system;
            }
        }
    }
    (total, by_group)
}

/// The resident set size of the process, in bytes.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// `p`-th percentile (0..=100) of sorted `values`.
fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary_us(name: &str, mut values: Vec<u32>) {
    values.sort_unstable();
    let ms = |v: u32| f64::from(v) / 1000.0;
    println!(
        "  {name:<28} n={:<8} p50={:>8.2} ms  p99={:>8.2} ms  max={:>8.2} ms",
        values.len(),
        ms(percentile(&values, 50.0)),
        ms(percentile(&values, 99.0)),
        ms(values.last().copied().unwrap_or(0)),
    );
}

struct InProcess {
    runtime: tokio::runtime::Runtime,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<voice_backends::Result<()>>,
}

fn start_server(o: &Options) -> Result<(InProcess, SocketAddr), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.server_threads)
        .thread_name("vb-server")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let sessions = o.sessions;
    let server = runtime.block_on(async move {
        let mut config = Config::new("local");
        config.pipeline_type = PipelineType::S2s;
        config.s2s_provider = Some("echo".into());
        config.vad_provider = Some("energy".into());
        config.turn_detection_provider = Some("silence".into());
        config.max_concurrent_sessions = u32::try_from(sessions + 16).unwrap_or(u32::MAX);
        config.rate_limit_per_second = 1e6;
        config.rate_limit_burst = 1_000_000;
        let backend = registry().create("local", &config).await?;
        backend.start().await?;
        let server_config = ServerConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            max_connections_per_ip: sessions + 16,
            connections_per_second_per_ip: 1e6,
            ..ServerConfig::default()
        };
        Server::bind(backend, server_config).await
    });
    let server = server.map_err(|e| e.to_string())?;
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = runtime.spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Ok((
        InProcess {
            runtime,
            stop,
            serving,
        },
        addr,
    ))
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };

    let patterns: Vec<Arc<Pattern>> = (0..PATTERNS).map(|s| Arc::new(pattern(s, &o))).collect();

    let (server, url, addr) = match &o.url {
        Some(url) => {
            let parsed = url::Url::parse(url).unwrap_or_else(|e| {
                eprintln!("--url {url:?}: {e}");
                std::process::exit(2);
            });
            let addr = parsed
                .socket_addrs(|| Some(80))
                .ok()
                .and_then(|a| a.into_iter().next())
                .unwrap_or_else(|| {
                    eprintln!("--url {url:?}: cannot resolve the host");
                    std::process::exit(2);
                });
            (None, url.clone(), addr)
        }
        None => {
            let (server, addr) = start_server(&o).unwrap_or_else(|e| {
                eprintln!("cannot start the in-process server: {e}");
                std::process::exit(1);
            });
            (Some(server), format!("ws://{addr}/ws"), addr)
        }
    };
    // Source addresses: spread over 127.0.0.2.. against an external loopback
    // server so its per-address limits hold.
    let source_ips = match o.source_ips {
        Some(n) => n,
        None if server.is_none() && addr.ip().is_loopback() && addr.is_ipv4() => {
            o.sessions.div_ceil(24)
        }
        None => 0,
    };
    let source = |i: usize| -> Option<IpAddr> {
        (source_ips > 0).then(|| {
            let n = (i % source_ips) as u32 + 2;
            IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | n))
        })
    };

    println!(
        "loadgen: {} sessions x {} s against {} ({}), ramp {} s, speech {}+0..300 ms / pause {} ms, \
         server threads {}, client threads {}, source addresses {}",
        o.sessions,
        o.seconds,
        url,
        if server.is_some() {
            "in process"
        } else {
            "external"
        },
        o.ramp,
        o.speech_ms,
        o.pause_ms,
        o.server_threads,
        o.client_threads,
        if source_ips == 0 {
            "default".to_owned()
        } else {
            source_ips.to_string()
        },
    );

    // One client thread: a current-thread runtime (on a thread of that
    // name), which avoids the work-stealing scheduler's cross-thread wakeups.
    let clients = if o.client_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(o.client_threads);
        b
    }
    .thread_name("vb-client")
    .enable_all()
    .build()
    .expect("the client runtime");

    let rss_before = rss_bytes();
    let (cpu_before, groups_before) = cpu_seconds();
    let wall = std::time::Instant::now();

    // Sample memory while the sessions run: the peak, and the value once
    // every session has connected.
    let connected = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let connected = connected.clone();
        let done = done.clone();
        let sessions = o.sessions;
        std::thread::spawn(move || {
            let (mut peak, mut at_connected) = (0u64, None);
            while !done.load(Ordering::Acquire) {
                let rss = rss_bytes();
                peak = peak.max(rss);
                if at_connected.is_none() && connected.load(Ordering::Relaxed) >= sessions {
                    at_connected = Some(rss);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (peak, at_connected)
        })
    };

    let url: Arc<str> = url.into();
    let run_clients = async {
        let base = Instant::now() + Duration::from_millis(200);
        let step = Duration::from_secs_f64(o.ramp / o.sessions as f64);
        let tasks: Vec<_> = (0..o.sessions)
            .map(|i| {
                tokio::spawn(client(
                    i,
                    url.clone(),
                    addr,
                    source(i),
                    patterns[i % patterns.len()].clone(),
                    base + step * i as u32,
                    o.seconds,
                    connected.clone(),
                ))
            })
            .collect();
        let mut reports = Vec::with_capacity(tasks.len());
        for t in tasks {
            reports.push(t.await.unwrap_or_else(|e| Report {
                failure: Some(format!("client task: {e}")),
                ..Report::default()
            }));
        }
        reports
    };
    let reports: Vec<Report> = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("vb-client-main".into())
            .spawn_scoped(scope, || clients.block_on(run_clients))
            .expect("the client thread")
            .join()
            .expect("the clients ran")
    });
    let wall = wall.elapsed();
    let (cpu_after, groups_after) = cpu_seconds();
    done.store(true, Ordering::Release);
    let (rss_peak, rss_connected) = sampler.join().unwrap_or((0, None));

    if let Some(server) = server {
        let _ = server.stop.send(());
        let stopped = server.runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), server.serving).await
        });
        match stopped {
            Ok(Ok(Ok(()))) => {}
            other => eprintln!("the in-process server did not stop cleanly: {other:?}"),
        }
    }

    // ---- report
    let ok = reports.iter().filter(|r| r.failure.is_none()).count();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for r in &reports {
        if let Some(f) = &r.failure {
            let key: String = f.chars().take(90).collect();
            *failures.entry(key).or_default() += 1;
        }
    }
    let sum = |f: fn(&Report) -> usize| reports.iter().map(f).sum::<usize>();
    let predicted = sum(|r| r.turns_predicted);
    let observed = sum(|r| r.turns_observed);
    let answered = sum(|r| r.rtt_us.len());

    println!("\nsessions: {} ok, {} failed", ok, o.sessions - ok);
    for (reason, n) in &failures {
        println!("  {n:>6} x {reason}");
    }
    let codes: BTreeMap<u16, usize> =
        reports
            .iter()
            .filter_map(|r| r.close_code)
            .fold(BTreeMap::new(), |mut m, c| {
                *m.entry(c).or_default() += 1;
                m
            });
    println!("  close codes: {codes:?}");
    println!(
        "turns: {predicted} predicted, {observed} turn_ended events, {answered} answered, \
         {} without reply, {} interrupted, {} error events, {} reply frames",
        predicted.saturating_sub(answered),
        sum(|r| r.interrupted),
        sum(|r| r.errors),
        sum(|r| r.reply_frames),
    );

    println!("latency:");
    summary_us(
        "connect + ready",
        reports
            .iter()
            .filter_map(|r| r.connect.map(micros))
            .collect(),
    );
    summary_us(
        "send lateness (per frame)",
        reports
            .iter()
            .flat_map(|r| r.lateness_us.iter().copied())
            .collect(),
    );
    summary_us(
        "echo round trip (per turn)",
        reports
            .iter()
            .flat_map(|r| r.rtt_us.iter().copied())
            .collect(),
    );
    summary_us(
        "server first_audio_ms",
        reports
            .iter()
            .flat_map(|r| r.first_audio_ms.iter().map(|&ms| (ms * 1000.0) as u32))
            .collect(),
    );

    let cpu = cpu_after.since(cpu_before);
    let secs = wall.as_secs_f64();
    println!(
        "cpu: {:.1} s ({:.1} user, {:.1} system) over {:.1} s wall = {:.0} % of one core ({} cores)",
        cpu.total(),
        cpu.user,
        cpu.system,
        secs,
        100.0 * cpu.total() / secs,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    for (group, after) in &groups_after {
        let used = after.since(groups_before.get(group).copied().unwrap_or_default());
        println!(
            "  {group:<8} {:.1} s ({:.1} user, {:.1} system) = {:.0} %",
            used.total(),
            used.user,
            used.system,
            100.0 * used.total() / secs
        );
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "memory: rss {:.1} MiB before, {} all connected, {:.1} MiB peak",
        mib(rss_before),
        rss_connected.map_or("never".to_owned(), |b| format!("{:.1} MiB", mib(b))),
        mib(rss_peak),
    );
    let per = |b: u64| b.saturating_sub(rss_before) as f64 / o.sessions.max(1) as f64 / 1024.0;
    println!(
        "  per session: {} KiB when all connected, {:.1} KiB at peak{}",
        rss_connected.map_or("-".to_owned(), |b| format!("{:.1}", per(b))),
        per(rss_peak),
        if o.url.is_none() {
            " (server and client together)"
        } else {
            " (client only)"
        },
    );
}
