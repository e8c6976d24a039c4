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
//! Clients start staggered evenly over `--ramp`, so their 20 ms frame
//! deadlines are spread over the frame period rather than all falling on the
//! same millisecond, and their turns are spread over the turn cycle as
//! independent callers' would be. The default ramp is one mean turn cycle
//! (`--speech-ms` + 150 + `--pause-ms`, 4.15 s): with a shorter one the
//! sessions' turns fall in step, and at one point of every cycle nearly
//! all of them are being answered at once (with a 2 s ramp the p99 round
//! trip at 1,000 sessions was about twice the one with a 4.15 s ramp). Each
//! connects (with `TCP_NODELAY`), does the
//! WebSocket upgrade, sends
//! `{"type":"start","user_id":"load-<n>","sample_rate":16000}`, waits for
//! `ready`, then writes one binary message of 20 ms of PCM s16le mono 16 kHz
//! audio every 20 ms, on the clock (a late frame does not delay the next
//! ones). The audio is [`signal::speech_like`] utterances (`--speech-ms`,
//! default 1000, plus 0-300 ms per utterance) separated by `--pause-ms`
//! (default 3000) of silence, over a -60 dBFS noise floor; eight patterns
//! (seeds) are shared by all clients. The echo reply is the whole turn
//! (pre-roll, speech and the endpointing silence, about 2 s) played out in
//! real time, so the pause is long enough for it to end before the next
//! utterance: a shorter one makes every turn a barge-in. At the end it sends
//! `{"type":"stop"}` and waits for the server's close, which it answers.
//!
//! # Keeping the clients cheap
//!
//! The clients share the machine with the server, so they do as little as
//! possible per frame. The WebSocket client is a minimal one of its own
//! (RFC 6455 framing; the handshake's accept key is checked): the audio
//! frames are encoded and masked once, up front, and a frame is one
//! non-blocking `write` of those bytes. Sending is one task for all sessions,
//! on one timer: a session's frames fall on a 1 ms grid (its first frame on
//! the first tick after its `ready`), and the task wakes once per tick and
//! writes the frames due at it. Each session has one task that connects and
//! then only reads (woken when the server sends), looking at the `type` of
//! text events without parsing the JSON (except the `latency` event's
//! `first_audio_ms`). The clients run on `--client-threads` threads (default
//! 2), each a current-thread runtime with a sender of its own and every
//! other session: no work-stealing scheduler, and as many threads as the
//! in-process server has, so that on a busy machine the clients get their
//! share of the CPU (with one thread they fall behind first).
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
//! - **reply lateness**: every reply is played as a client would play it,
//!   from the arrival of its first frame on, each frame after the one
//!   before in real time. For every reply frame, how long after its playing
//!   time it arrived (0 when in time): a frame late here is a gap in the
//!   reply audio of a client without a jitter buffer. The server hands reply
//!   audio out up to 80 ms ahead and tops it up when 20 ms of it is left to
//!   play, so a frame comes late only when a top-up, or its way to the
//!   client, is more than about 20 ms late.
//! - **first_audio_ms**: the server's own `latency` event per turn (end of
//!   turn decided to first reply audio sent, measured inside the server).
//! - CPU time of the process from `/proc/self/stat` (utime + stime over
//!   wall time; 100 % is one core) and, in process, split between the
//!   server's and the clients' runtime threads (`/proc/self/task/*/stat`),
//!   each group with the time its threads were runnable but waited for a
//!   CPU (`schedstat`: on a machine the clients share with the server, the
//!   part of the latency that is neither's work), and the machine's steal
//!   time (`/proc/stat`: on a virtual machine, time its CPUs were taken
//!   away by the host); RSS from `/proc/self/status` before the sessions, when all are
//!   connected, and at its peak, and the growth per session (in process it
//!   includes the clients' own memory, a task and a 2 KiB read buffer each,
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
//! threads of its own, separate from the clients' (and with the binary's
//! allocator, mimalloc): `--server-threads`
//! (default 2) workers, each a runtime of its own serving the connections
//! handed to it ([`ServerConfig::workers`], as `voice-backends serve` runs
//! by default), or with `--server-runtime shared` one work-stealing runtime
//! of that many threads serving them all. Against `--url`, the server's per-address limits apply (32
//! connections and 20 per second by default): the clients then spread over
//! source addresses 127.0.0.2, 127.0.0.3, ... (`--source-ips`, default
//! enough for 24 sessions each) and the ramp should be long enough for the
//! connection rate.

/// The allocator of the `voice-backends` binary, so that the in-process
/// server runs as `voice-backends serve` does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use voice_backends::pipeline::builtin::{
    EnergyVad, EnergyVadOptions, SilenceTurnDetector, SilenceTurnOptions,
};
use voice_backends::pipeline::{TurnDetector, TurnSignal, Vad};
use voice_backends::server::{Server, ServerConfig};
use voice_backends::testing::signal;
use voice_backends::{Config, PipelineType, registry};

/// The frame period, in grid ticks (milliseconds).
const FRAME_TICKS: u64 = 20;
const TICK: Duration = Duration::from_millis(1);
const PATTERNS: u64 = 8;
/// Playing time of one byte of reply audio (PCM s16le mono at 16 kHz, the
/// rate every client announces), in nanoseconds.
const NANOS_PER_REPLY_BYTE: u64 = 1_000_000_000 / (16_000 * 2);
/// How much a session reads from its socket at once.
const READ_CHUNK: usize = 2048;
/// How long a session waits for the server's close after `stop`.
const STOP_WAIT: Duration = Duration::from_secs(15);
const USAGE: &str = "usage: loadgen [--sessions N] [--seconds S] [--url ws://HOST:PORT/ws] \
[--ramp S] [--source-ips N] [--server-threads N] [--server-runtime workers|shared] \
[--client-threads N] [--speech-ms MS] [--pause-ms MS]";

#[derive(Clone, Debug)]
struct Options {
    sessions: usize,
    seconds: f64,
    url: Option<String>,
    ramp: f64,
    source_ips: Option<usize>,
    server_threads: usize,
    /// Serve on `server_threads` workers (true) or on one shared runtime.
    server_workers: bool,
    client_threads: usize,
    speech_ms: u64,
    pause_ms: u64,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        sessions: 1000,
        seconds: 20.0,
        url: None,
        ramp: f64::NAN,
        source_ips: None,
        server_threads: 2,
        server_workers: true,
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
            "--server-runtime" => {
                o.server_workers = match value.as_str() {
                    "workers" => true,
                    "shared" => false,
                    _ => return Err(bad(&"expected workers or shared")),
                }
            }
            "--client-threads" => o.client_threads = value.parse().map_err(|e| bad(&e))?,
            "--speech-ms" => o.speech_ms = value.parse().map_err(|e| bad(&e))?,
            "--pause-ms" => o.pause_ms = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    if o.ramp.is_nan() {
        // One mean turn cycle (see the module documentation).
        o.ramp = (o.speech_ms + 150 + o.pause_ms) as f64 / 1000.0;
    }
    if o.sessions == 0 || o.seconds <= 0.0 || !(0.0..=3600.0).contains(&o.ramp) {
        return Err(format!(
            "--sessions and --seconds must be positive, --ramp 0 to 3600 seconds\n{USAGE}"
        ));
    }
    o.server_threads = o.server_threads.max(1);
    o.client_threads = o.client_threads.max(1);
    Ok(o)
}

// ---- the wire: a minimal RFC 6455 client

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
/// The masking key of every client frame. RFC 6455 wants unpredictable keys
/// (against proxy cache poisoning, not an issue on loopback); a fixed one lets
/// the audio be encoded once for every session.
const MASK: [u8; 4] = [0x3a, 0x91, 0x5c, 0xe7];
/// The largest server message the clients accept.
const MAX_MESSAGE: usize = 1 << 20;

/// Appends one final, masked client frame.
fn encode_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(payload.len() + 14);
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(0x80 | 126);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
}

fn encoded(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(opcode, payload, &mut out);
    out
}

/// One complete server frame at the start of `buf`: its opcode and where its
/// payload is, or `None` while it is incomplete.
fn parse_frame(buf: &[u8]) -> Result<Option<(u8, std::ops::Range<usize>)>, String> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b1 & 0x80 != 0 {
        return Err("a masked frame from the server".into());
    }
    let (len, at) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (usize::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let len = u64::from_be_bytes(b.try_into().expect("8 bytes"));
                (usize::try_from(len).unwrap_or(usize::MAX), 10)
            }
            None => return Ok(None),
        },
        n => (usize::from(n), 2),
    };
    if len > MAX_MESSAGE {
        return Err(format!("a {len}-byte message from the server"));
    }
    Ok((buf.len() >= at + len).then(|| (b0 & 0x0f, at..at + len)))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A close frame's payload as "code reason".
fn close_text(payload: &[u8]) -> String {
    match payload {
        [a, b, reason @ ..] => format!(
            "{} {}",
            u16::from_be_bytes([*a, *b]),
            String::from_utf8_lossy(reason)
        ),
        _ => "no reason".into(),
    }
}

/// Where to connect and what to ask for.
struct Target {
    addr: SocketAddr,
    /// The `Host` header.
    host: String,
    /// The request target (path and query).
    path: String,
}

impl Target {
    fn new(url: &str, addr: SocketAddr) -> Result<Target, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("--url {url:?}: {e}"))?;
        let host = match (parsed.host_str(), parsed.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => return Err(format!("--url {url:?}: no host")),
        };
        let path = match parsed.query() {
            Some(q) => format!("{}?{q}", parsed.path()),
            None => parsed.path().to_owned(),
        };
        Ok(Target { addr, host, path })
    }
}

/// The WebSocket upgrade: the request, then the `101` response with the
/// right accept key. The server sends nothing more before `start`.
async fn handshake(stream: &mut TcpStream, target: &Target) -> Result<(), String> {
    const KEY: &str = "bG9hZGdlbi1rZXktMDAwMA==";
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.path, target.host
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = Vec::with_capacity(512);
    let end = loop {
        if stream
            .read_buf(&mut response)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("the connection closed during the handshake".into());
        }
        if let Some(end) = find(&response, b"\r\n\r\n") {
            break end;
        }
        if response.len() > 16 * 1024 {
            return Err("a response header over 16 KiB".into());
        }
    };
    let head = String::from_utf8_lossy(&response[..end]);
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("101") {
        return Err(format!("HTTP error: {status}"));
    }
    let accept = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-accept")
            .then(|| value.trim().to_owned())
    });
    if accept.as_deref() != Some(derive_accept_key(KEY.as_bytes()).as_str()) {
        return Err("a wrong Sec-WebSocket-Accept".into());
    }
    if response.len() > end + 4 {
        return Err("data after the handshake response".into());
    }
    Ok(())
}

// ---- the audio

/// One client audio pattern: its frames, encoded, and the frames that
/// complete a turn.
struct Pattern {
    frames: Vec<Vec<u8>>,
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
        frames: frames
            .into_iter()
            .map(|f| encoded(OP_BINARY, &f.into_data()))
            .collect(),
        turn_end,
    }
}

// ---- the sessions

/// A session's socket's writing half, shared by its reading task and the
/// sender.
struct Link {
    stream: OwnedWriteHalf,
    /// When the last turn-completing frame was written, in nanoseconds since
    /// the run's epoch, plus one; 0 once a reply frame has answered it.
    pending_turn: AtomicU64,
    /// The sender has written `stop` (or given up).
    sending_done: AtomicBool,
    /// When it did, in nanoseconds since the run's epoch.
    done_at: AtomicU64,
    /// The reader is done: the connection is closing or gone.
    closed: AtomicBool,
}

/// One session's results: what its own task saw, and the turns the sender
/// predicted.
#[derive(Debug, Default)]
struct Report {
    failure: Option<String>,
    connect: Option<Duration>,
    turns_predicted: usize,
    rtt_us: Vec<u32>,
    /// Per reply frame after a turn, how late it came for real-time playout.
    reply_late_us: Vec<u32>,
    first_audio_ms: Vec<f32>,
    turns_observed: usize,
    interrupted: usize,
    errors: usize,
    reply_frames: usize,
    close_code: Option<u16>,
}

/// What the sender did for one session.
#[derive(Debug, Default)]
struct Sent {
    failure: Option<String>,
    turns_predicted: usize,
}

/// A session that is ready to stream, for the sender.
struct Joined {
    index: usize,
    link: Arc<Link>,
    pattern: Arc<Pattern>,
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX - 1)) as u64
}

/// Connects, upgrades, sends `start` and waits for `ready`; the socket and
/// what was read after `ready`.
async fn open(
    index: usize,
    target: &Target,
    source: Option<IpAddr>,
) -> Result<(TcpStream, Vec<u8>), String> {
    const WAIT: Duration = Duration::from_secs(10);
    let stream = async {
        let socket = match target.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(target.addr).await?;
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(stream)
    };
    let mut stream = match tokio::time::timeout(WAIT, stream).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Err(_) => return Err("connect: timed out".into()),
    };
    match tokio::time::timeout(WAIT, handshake(&mut stream, target)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("handshake: {e}")),
        Err(_) => return Err("handshake: timed out".into()),
    }
    let start = format!(r#"{{"type":"start","user_id":"load-{index}","sample_rate":16000}}"#);
    stream
        .write_all(&encoded(OP_TEXT, start.as_bytes()))
        .await
        .map_err(|e| format!("start: {e}"))?;
    let mut buf = Vec::with_capacity(READ_CHUNK);
    let ready = async {
        loop {
            while let Some((opcode, payload)) = parse_frame(&buf)? {
                let end = payload.end;
                match opcode {
                    OP_TEXT if find(&buf[payload.clone()], br#""type":"ready""#).is_some() => {
                        buf.drain(..end);
                        return Ok(());
                    }
                    OP_CLOSE => {
                        return Err(format!(
                            "closed before ready: {}",
                            close_text(&buf[payload])
                        ));
                    }
                    _ => {
                        buf.drain(..end);
                    }
                }
            }
            buf.reserve(READ_CHUNK);
            match stream.read_buf(&mut buf).await {
                Ok(0) => return Err("closed before ready".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(format!("before ready: {e}")),
            }
        }
    };
    match tokio::time::timeout(WAIT, ready).await {
        Ok(Ok(())) => Ok((stream, buf)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no ready within 10 s".into()),
    }
}

/// One session's task: opens the session, hands it to the sender, then reads
/// what the server sends until its close.
#[allow(clippy::too_many_arguments)]
async fn session(
    index: usize,
    target: Arc<Target>,
    source: Option<IpAddr>,
    pattern: Arc<Pattern>,
    start_at: Instant,
    seconds: f64,
    epoch: Instant,
    sender: mpsc::UnboundedSender<Option<Joined>>,
    connected: Arc<AtomicUsize>,
) -> Report {
    let mut report = Report::default();
    tokio::time::sleep_until(start_at.into()).await;
    let began = Instant::now();
    let (socket, buf) = match open(index, &target, source).await {
        Ok(opened) => opened,
        Err(e) => {
            report.failure = Some(e);
            let _ = sender.send(None);
            return report;
        }
    };
    report.connect = Some(began.elapsed());
    connected.fetch_add(1, Ordering::Relaxed);
    // The reading half is polled for reading only: a short read then clears
    // its readiness, with no further read that would find nothing.
    let (read, stream) = socket.into_split();
    let link = Arc::new(Link {
        stream,
        pending_turn: AtomicU64::new(0),
        sending_done: AtomicBool::new(false),
        done_at: AtomicU64::new(0),
        closed: AtomicBool::new(false),
    });
    let _ = sender.send(Some(Joined {
        index,
        link: link.clone(),
        pattern,
    }));
    // The close should come within 15 s of `stop`, written `seconds` from
    // now (or later, when the machine is busy).
    let first_check = Instant::now() + Duration::from_secs_f64(seconds) + STOP_WAIT;
    report.failure = receive(&link, read, buf, first_check, epoch, &mut report).await;
    link.closed.store(true, Ordering::Release);
    report
}

/// Reads until the server's close (answered) or the end of the connection;
/// the failure, if any. It gives up `STOP_WAIT` after `stop` was written,
/// checking from `first_check` on.
async fn receive(
    link: &Link,
    mut read: OwnedReadHalf,
    mut buf: Vec<u8>,
    first_check: Instant,
    epoch: Instant,
    report: &mut Report,
) -> Option<String> {
    let give_up = tokio::time::sleep_until(first_check.into());
    tokio::pin!(give_up);
    // When the next reply frame is due for playout (ns since `epoch`), once
    // a reply has begun.
    let mut due: Option<u64> = None;
    loop {
        let mut consumed = 0;
        loop {
            let (opcode, payload) = match parse_frame(&buf[consumed..]) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return Some(format!("receive: {e}")),
            };
            let payload = consumed + payload.start..consumed + payload.end;
            consumed = payload.end;
            match opcode {
                OP_BINARY => {
                    report.reply_frames += 1;
                    let now = nanos(epoch.elapsed());
                    let sent = link.pending_turn.swap(0, Ordering::AcqRel);
                    if sent != 0 {
                        let rtt = Duration::from_nanos(now.saturating_sub(sent - 1));
                        report.rtt_us.push(micros(rtt));
                        // A new reply: played from its first frame's arrival on.
                        due = Some(now);
                    }
                    if let Some(due) = &mut due {
                        let late = Duration::from_nanos(now.saturating_sub(*due));
                        report.reply_late_us.push(micros(late));
                        *due += (payload.end - payload.start) as u64 * NANOS_PER_REPLY_BYTE;
                    }
                }
                OP_TEXT => event(&buf[payload], report),
                OP_CLOSE => {
                    let code = match buf[payload.clone()] {
                        [a, b, ..] => u16::from_be_bytes([a, b]),
                        _ => 1005,
                    };
                    report.close_code = Some(code);
                    // Answer the close with its code, best effort.
                    let code_bytes = &buf[payload.start..payload.end.min(payload.start + 2)];
                    let _ = link.stream.try_write(&encoded(OP_CLOSE, code_bytes));
                    let early = !link.sending_done.load(Ordering::Acquire);
                    return (early || code != 1000)
                        .then(|| format!("closed with {code} (early: {early})"));
                }
                OP_PING => {
                    let _ = link.stream.try_write(&encoded(OP_PONG, &buf[payload]));
                }
                OP_CONTINUATION | OP_PONG => {}
                other => return Some(format!("receive: unknown opcode {other}")),
            }
        }
        if consumed > 0 {
            buf.drain(..consumed);
        }
        buf.reserve(READ_CHUNK);
        tokio::select! {
            biased;
            read = read.read_buf(&mut buf) => match read {
                Ok(0) => {
                    return (!link.sending_done.load(Ordering::Acquire))
                        .then(|| "the connection ended early".to_owned());
                }
                Ok(_) => {}
                Err(e) => return Some(format!("receive: {e}")),
            },
            () = &mut give_up => {
                let check = if link.sending_done.load(Ordering::Acquire) {
                    let done_at = epoch + Duration::from_nanos(link.done_at.load(Ordering::Acquire));
                    done_at + STOP_WAIT
                } else {
                    Instant::now() + Duration::from_secs(1)
                };
                if check <= Instant::now() {
                    return Some("no close from the server within 15 s of stop".to_owned());
                }
                give_up.as_mut().reset(check.into());
            }
        }
    }
}

/// Counts one text event by its `type`, without parsing the JSON (but the
/// `latency` event's `first_audio_ms`).
fn event(text: &[u8], report: &mut Report) {
    let Some(rest) = text.strip_prefix(br#"{"type":""#) else {
        return;
    };
    let kind = &rest[..rest.iter().position(|&b| b == b'"').unwrap_or(rest.len())];
    match kind {
        b"latency" => {
            const FIELD: &[u8] = br#""first_audio_ms":"#;
            if let Some(at) = find(rest, FIELD) {
                let value = &rest[at + FIELD.len()..];
                let end = value
                    .iter()
                    .position(|&b| b == b',' || b == b'}')
                    .unwrap_or(value.len());
                if let Some(ms) = std::str::from_utf8(&value[..end])
                    .ok()
                    .and_then(|v| v.trim().parse::<f32>().ok())
                {
                    report.first_audio_ms.push(ms);
                }
            }
        }
        b"turn_ended" => report.turns_observed += 1,
        b"interrupted" => report.interrupted += 1,
        b"error" => report.errors += 1,
        _ => {}
    }
}

/// Send lateness: 10 µs buckets up to 100 ms, then 1 ms buckets up to 100 s.
struct Histogram {
    buckets: Vec<u32>,
    n: u64,
    max_us: u32,
}

impl Histogram {
    const FINE_US: u32 = 100_000;

    fn new() -> Histogram {
        Histogram {
            buckets: vec![0; 10_000 + 100_000],
            n: 0,
            max_us: 0,
        }
    }

    fn bucket(us: u32) -> usize {
        if us < Self::FINE_US {
            (us / 10) as usize
        } else {
            10_000 + ((us - Self::FINE_US) / 1000) as usize
        }
    }

    /// The largest value of bucket `i`.
    fn upper(i: usize) -> u32 {
        let i = i as u32;
        if i < 10_000 {
            (i + 1) * 10
        } else {
            Self::FINE_US + (i - 10_000 + 1) * 1000
        }
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.n += other.n;
        self.max_us = self.max_us.max(other.max_us);
    }

    fn record(&mut self, us: u32) {
        let i = Self::bucket(us).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
        self.n += 1;
        self.max_us = self.max_us.max(us);
    }

    /// The upper bound of the bucket holding the `p`-th percentile.
    fn percentile(&self, p: f64) -> u32 {
        if self.n == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.n as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, &count) in self.buckets.iter().enumerate() {
            seen += u64::from(count);
            if seen >= rank {
                return Self::upper(i).min(self.max_us);
            }
        }
        self.max_us
    }
}

/// A session the sender streams to.
struct Streaming {
    index: usize,
    link: Arc<Link>,
    pattern: Arc<Pattern>,
    /// The grid tick of its first frame.
    first_tick: u64,
    /// Bytes the socket did not take yet.
    unsent: Vec<u8>,
    /// `stop` is written (or queued in `unsent`).
    stopped: bool,
}

/// Writes `bytes` after what `unsent` still holds; `Err` when the socket failed.
fn write(stream: &OwnedWriteHalf, unsent: &mut Vec<u8>, bytes: &[u8]) -> std::io::Result<()> {
    if !unsent.is_empty() {
        unsent.extend_from_slice(bytes);
        return flush(stream, unsent);
    }
    match stream.try_write(bytes) {
        Ok(n) => unsent.extend_from_slice(&bytes[n..]),
        Err(e) if e.kind() == ErrorKind::WouldBlock => unsent.extend_from_slice(bytes),
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Writes what `unsent` holds, as far as the socket takes it.
fn flush(stream: &OwnedWriteHalf, unsent: &mut Vec<u8>) -> std::io::Result<()> {
    while !unsent.is_empty() {
        match stream.try_write(unsent) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => drop(unsent.drain(..n)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Streaming {
    fn new(j: Joined, first_tick: u64) -> Streaming {
        Streaming {
            index: j.index,
            link: j.link,
            pattern: j.pattern,
            first_tick,
            unsent: Vec::new(),
            stopped: false,
        }
    }

    fn done(&self, epoch: Instant) {
        self.link
            .done_at
            .store(nanos(epoch.elapsed()), Ordering::Release);
        self.link.sending_done.store(true, Ordering::Release);
    }

    /// Its part at grid tick `tick`: the frame due, then `stop` after the
    /// last (or what the socket did not take yet). `true` once it is done.
    fn at_tick(
        &mut self,
        tick: u64,
        epoch: Instant,
        lateness: &mut Histogram,
        sent: &mut Sent,
        stop: &[u8],
    ) -> bool {
        if self.link.closed.load(Ordering::Acquire) {
            return true;
        }
        let stream = &self.link.stream;
        let result = if self.stopped {
            flush(stream, &mut self.unsent)
        } else {
            let k = ((tick - self.first_tick) / FRAME_TICKS) as usize;
            let now = Instant::now();
            let scheduled = epoch + TICK * tick as u32;
            lateness.record(micros(now.saturating_duration_since(scheduled)));
            if self.pattern.turn_end[k] {
                sent.turns_predicted += 1;
                self.link
                    .pending_turn
                    .store(nanos(now - epoch) + 1, Ordering::Release);
            }
            let mut result = write(stream, &mut self.unsent, &self.pattern.frames[k]);
            if result.is_ok() && k + 1 == self.pattern.frames.len() {
                self.stopped = true;
                result = write(stream, &mut self.unsent, stop);
            }
            result
        };
        match result {
            Ok(()) if self.stopped && self.unsent.is_empty() => {
                self.done(epoch);
                true
            }
            Ok(()) => false,
            Err(e) => {
                sent.failure = Some(format!("send: {e}"));
                self.done(epoch);
                true
            }
        }
    }
}

/// A client thread's sender: one task, one timer, for the `expected`
/// sessions of the thread (of `sessions` in all). Sessions join as they
/// become ready; a session's frames are due every `FRAME_TICKS` grid ticks
/// from the first tick after it joined, and at each tick the sender writes
/// the frames due. Returns what it did per session (by session index) and
/// the send lateness.
async fn send_all(
    sessions: usize,
    expected: usize,
    epoch: Instant,
    mut joins: mpsc::UnboundedReceiver<Option<Joined>>,
) -> (Vec<Sent>, Histogram) {
    let stop = encoded(OP_TEXT, br#"{"type":"stop"}"#);
    let mut sent: Vec<Sent> = (0..sessions).map(|_| Sent::default()).collect();
    let mut lateness = Histogram::new();
    // Sessions by their frames' tick modulo FRAME_TICKS.
    let mut slots: Vec<Vec<Streaming>> = (0..FRAME_TICKS).map(|_| Vec::new()).collect();
    let mut awaited = expected;
    let mut streaming = 0usize;
    let tick_of =
        |at: Instant| -> u64 { (at.saturating_duration_since(epoch).as_micros() / 1000) as u64 };
    let mut next_tick = tick_of(Instant::now()) + 1;
    loop {
        let mut joined = Vec::new();
        while let Ok(j) = joins.try_recv() {
            joined.push(j);
        }
        if joined.is_empty() && streaming == 0 && awaited > 0 {
            // Nothing to send: wait for a session.
            match joins.recv().await {
                Some(j) => joined.push(j),
                None => awaited = 0,
            }
            next_tick = next_tick.max(tick_of(Instant::now()) + 1);
        }
        for j in joined {
            awaited = awaited.saturating_sub(1);
            if let Some(j) = j {
                // Its first frame on the first tick not served yet.
                let first_tick = next_tick.max(tick_of(Instant::now()) + 1);
                slots[(first_tick % FRAME_TICKS) as usize].push(Streaming::new(j, first_tick));
                streaming += 1;
            }
        }
        if streaming == 0 {
            if awaited == 0 {
                break;
            }
            continue;
        }
        // Serve the ticks that are due, in order. Behind time (the machine
        // is busy), yield between ticks so the sessions' tasks read what the
        // server sent meanwhile: replies left unread would stall the server's
        // writes, and with them its reading of the frames sent here.
        let now_tick = tick_of(Instant::now());
        if next_tick <= now_tick {
            let slot = &mut slots[(next_tick % FRAME_TICKS) as usize];
            let served = !slot.is_empty();
            let mut i = 0;
            while i < slot.len() {
                let s = &mut slot[i];
                if s.first_tick <= next_tick
                    && s.at_tick(next_tick, epoch, &mut lateness, &mut sent[s.index], &stop)
                {
                    slot.swap_remove(i);
                    streaming -= 1;
                } else {
                    i += 1;
                }
            }
            next_tick += 1;
            if next_tick <= now_tick {
                if served {
                    tokio::task::yield_now().await;
                }
                continue;
            }
        }
        // Sleep to the next tick that has sessions.
        let mut wake = next_tick;
        for _ in 0..FRAME_TICKS {
            if !slots[(wake % FRAME_TICKS) as usize].is_empty() {
                break;
            }
            wake += 1;
        }
        tokio::time::sleep_until((epoch + TICK * wake as u32).into()).await;
    }
    (sent, lateness)
}

/// User and system CPU seconds, and seconds spent runnable but waiting for
/// a CPU (threads only: the process's total leaves it at 0).
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    user: f64,
    system: f64,
    waited: f64,
}

impl Cpu {
    fn total(self) -> f64 {
        self.user + self.system
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            user: self.user - before.user,
            system: self.system - before.system,
            waited: self.waited - before.waited,
        }
    }

    fn add(&mut self, other: Cpu) {
        self.user += other.user;
        self.system += other.system;
        self.waited += other.waited;
    }
}

/// Seconds a thread has waited on a run queue, from its `schedstat` file
/// (time on the CPU, time runnable but waiting, in nanoseconds; time
/// slices). 0 where the kernel keeps no scheduler statistics.
fn run_queue_wait(schedstat: &str) -> f64 {
    schedstat
        .split_whitespace()
        .nth(1)
        .and_then(|ns| ns.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

/// A thread's or process's name and CPU time from its `stat` file (clock
/// ticks of 1/100 s, Linux's USER_HZ).
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
            waited: 0.0,
        },
    ))
}

/// The CPU time of the calling thread.
fn thread_cpu() -> Cpu {
    let mut cpu = std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|s| ticks(&s))
        .map_or(Cpu::default(), |(_, t)| t);
    cpu.waited =
        std::fs::read_to_string("/proc/thread-self/schedstat").map_or(0.0, |s| run_queue_wait(&s));
    cpu
}

/// CPU time of the process, and of its threads by name prefix
/// (`vb-serve` for the server's `vb-server` and `vb-serve-N`, `vb-client`,
/// other), from /proc. Threads that have ended are in the total only.
fn cpu_seconds() -> (Cpu, BTreeMap<String, Cpu>) {
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
            if let Some((name, mut t)) = ticks(&stat) {
                t.waited = std::fs::read_to_string(entry.path().join("schedstat"))
                    .map_or(0.0, |s| run_queue_wait(&s));
                let group = if name.starts_with("vb-serve") {
                    "server"
                } else if name.starts_with("vb-client") {
                    "clients"
                } else {
                    "other"
                };
                by_group
                    .entry(group.to_owned())
                    .or_insert(Cpu::default())
                    .add(t);
            }
        }
    }
    (total, by_group)
}

/// Seconds the hypervisor has run something else while the machine's
/// virtual CPUs had work (`steal` in `/proc/stat`, all CPUs together); 0 on
/// bare metal.
fn steal_seconds() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let cpu = s.lines().find(|l| l.starts_with("cpu "))?;
            cpu.split_whitespace().nth(8)?.parse::<f64>().ok()
        })
        .map_or(0.0, |ticks| ticks / 100.0)
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
    // With workers, this runtime only starts the backend and accepts.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(if o.server_workers {
            1
        } else {
            o.server_threads
        })
        .thread_name("vb-server")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let sessions = o.sessions;
    let workers = if o.server_workers {
        o.server_threads
    } else {
        0
    };
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
            workers,
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
         server threads {} ({}), client threads {}, source addresses {}",
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
        if o.server_workers {
            "workers"
        } else {
            "shared runtime"
        },
        o.client_threads,
        if source_ips == 0 {
            "default".to_owned()
        } else {
            source_ips.to_string()
        },
    );

    let rss_before = rss_bytes();
    let (cpu_before, groups_before) = cpu_seconds();
    let steal_before = steal_seconds();
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

    let target = Arc::new(Target::new(&url, addr).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    }));
    // The clients: a current-thread runtime on each client thread, each
    // with a sender of its own and every `client_threads`-th session.
    let epoch = Instant::now();
    let base = epoch + Duration::from_millis(200);
    let step = Duration::from_secs_f64(o.ramp / o.sessions as f64);
    let threads = o.client_threads;
    let run_clients = |t: usize| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a client runtime");
        let before = thread_cpu();
        let done = runtime.block_on(async {
            let mine: Vec<usize> = (t..o.sessions).step_by(threads).collect();
            let (joins, joined) = mpsc::unbounded_channel();
            let sender = tokio::spawn(send_all(o.sessions, mine.len(), epoch, joined));
            let tasks: Vec<_> = mine
                .iter()
                .map(|&i| {
                    let task = tokio::spawn(session(
                        i,
                        target.clone(),
                        source(i),
                        patterns[i % patterns.len()].clone(),
                        base + step * i as u32,
                        o.seconds,
                        epoch,
                        joins.clone(),
                        connected.clone(),
                    ));
                    (i, task)
                })
                .collect();
            drop(joins);
            let mut reports = Vec::with_capacity(tasks.len());
            for (i, task) in tasks {
                let report = task.await.unwrap_or_else(|e| Report {
                    failure: Some(format!("client task: {e}")),
                    ..Report::default()
                });
                reports.push((i, report));
            }
            let (mut sent, lateness) = sender.await.expect("the sender task");
            for (i, report) in &mut reports {
                let sent = std::mem::take(&mut sent[*i]);
                report.turns_predicted = sent.turns_predicted;
                if sent.failure.is_some() {
                    report.failure = sent.failure;
                }
            }
            (reports, lateness)
        });
        (done, thread_cpu().since(before))
    };
    // The client threads end before the CPU is read: each reports its own.
    let run_clients = &run_clients;
    let finished: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                std::thread::Builder::new()
                    .name(format!("vb-client-{t}"))
                    .spawn_scoped(scope, move || run_clients(t))
                    .expect("a client thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("the clients ran"))
            .collect()
    });
    let mut reports: Vec<Report> = (0..o.sessions).map(|_| Report::default()).collect();
    let mut lateness = Histogram::new();
    let mut clients_cpu = Cpu::default();
    for ((mine, late), cpu) in finished {
        for (i, report) in mine {
            reports[i] = report;
        }
        lateness.merge(&late);
        clients_cpu.add(cpu);
    }
    let wall = wall.elapsed();
    let (cpu_after, mut groups_after) = cpu_seconds();
    let stolen = steal_seconds() - steal_before;
    groups_after
        .entry("clients".to_owned())
        .or_default()
        .add(clients_cpu);
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
    let ms = |v: u32| f64::from(v) / 1000.0;
    println!(
        "  {:<28} n={:<8} p50={:>8.2} ms  p99={:>8.2} ms  max={:>8.2} ms",
        "send lateness (per frame)",
        lateness.n,
        ms(lateness.percentile(50.0)),
        ms(lateness.percentile(99.0)),
        ms(lateness.max_us),
    );
    summary_us(
        "echo round trip (per turn)",
        reports
            .iter()
            .flat_map(|r| r.rtt_us.iter().copied())
            .collect(),
    );
    let reply_late: Vec<u32> = reports
        .iter()
        .flat_map(|r| r.reply_late_us.iter().copied())
        .collect();
    let late_frames = reply_late.iter().filter(|&&us| us > 0).count();
    let late_20 = reply_late.iter().filter(|&&us| us > 20_000).count();
    summary_us("reply lateness (per frame)", reply_late);
    println!("    late for playout: {late_frames} frames; more than 20 ms late: {late_20}");
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
            "  {group:<8} {:.1} s ({:.1} user, {:.1} system) = {:.0} %; waited {:.1} s for a CPU",
            used.total(),
            used.user,
            used.system,
            100.0 * used.total() / secs,
            used.waited,
        );
    }
    println!("  stolen   {stolen:.2} s: the hypervisor ran other work on this machine's CPUs");
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
