//! A soak run: thousands of sessions with turns, barge-ins and reconnects,
//! then a check that the process's memory comes back once they are closed.
//!
//! ```sh
//! cargo run --release --example soak --features server,testing -- --sessions 5000
//! ```
//!
//! It runs a `local` backend (energy VAD, silence turns, the `echo`
//! speech-to-speech component, sessions kept in a memory store) behind an
//! in-process `serve` on loopback, and drives `--sessions` sessions (default
//! 5000), at most `--concurrency` at once (default 200):
//!
//! - **Through the API** (most sessions): `create_session`, `start`, then
//!   `--turns` spoken turns (default 3) pushed as fast as the input path takes
//!   them, each answered by the echo and played out in real time. One turn in
//!   each session is barged in on: the next utterance starts while the reply
//!   plays, and the session reports the interruption. Every other session
//!   talks as a telephone line does (8 kHz mu-law in and out, resampled to
//!   and from the pipeline's 16 kHz). Sessions end in turn by
//!   `VoiceSession::stop`, by `VoiceBackend::close_session`, and by being
//!   stopped in the middle of a reply.
//! - **Through `serve`'s WebSocket** (one session in `--serve-every`, default
//!   5): a client starts a session (8 kHz mu-law, as a phone gateway does),
//!   speaks a turn and, while the reply plays, drops its connection without a
//!   close frame. It reconnects at once with `resume` and the session's
//!   resume token, within the server's resume window (30 s): the session
//!   ran on while detached, and the server takes it up again (`ready` with
//!   `resumed`). Until the server has noticed the old connection's end it
//!   refuses, the session being still attached; the client tries again 20 ms
//!   later (counted as retries). A client refused for another reason starts
//!   a new session. It then speaks its remaining turns, barging in on one,
//!   and ends with `stop`.
//!
//! Memory is read before, during and after: resident memory (`VmRSS` of
//! `/proc/self/status`) and the heap the process holds (bytes allocated and
//! not freed, counted by this program's allocator, mimalloc wrapped with two
//! counters). The **baseline** is taken after `--warmup` sessions (default
//! 300) of the same mix have run and closed, so that pools, caches and the
//! runtime's threads are in it; the **peak** is the highest sample (every
//! 100 ms) during the run; the **end** is taken after every session has
//! closed, the backend reports none active, and `--settle` seconds (default
//! 5) have passed. The run fails (exit status 1) when the end's heap exceeds
//! the baseline's by more than `--heap-margin-kib` (default 1024 KiB) or its
//! resident memory by more than `--rss-margin-mib` (default 16 MiB), when a
//! session failed, or when the backend or the server still holds sessions
//! or connections.
//!
//! Resident memory is the figure users watch but a coarse one (the
//! allocator keeps freed pages for reuse, and returns them at its own pace);
//! the heap count is exact, so a leak of a few hundred bytes per session
//! (500 KiB over 5,000 sessions) shows in it.

#[cfg(all(feature = "server", feature = "testing"))]
mod soak {
    use std::alloc::{GlobalAlloc, Layout};
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use futures_util::{SinkExt, StreamExt};
    use serde_json::{Value, json};
    use tokio::sync::Semaphore;
    use tokio::time::timeout;
    use tokio_tungstenite::tungstenite::Message;
    use voice_backends::audio::AudioConverter;
    use voice_backends::pipeline::INTERNAL_FORMAT;
    use voice_backends::server::{Server, ServerConfig};
    use voice_backends::session::SessionEvents;
    use voice_backends::testing::signal;
    use voice_backends::{
        AudioEncoding, AudioFormat, AudioFrame, AudioReceiver, Config, PipelineState, PipelineType,
        SessionConfig, SessionEvent, VoiceBackend, registry,
    };

    /// mimalloc, counting the bytes it holds for the program and its calls.
    pub struct Counting;

    static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
    static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

    // SAFETY: every call goes to mimalloc with the same arguments; the
    // counters are only arithmetic on the side.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { mimalloc::MiMalloc.alloc(layout) };
            if !p.is_null() {
                LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
                ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) };
            if !p.is_null() {
                LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
                ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) };
            LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let p = unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
            }
            p
        }
    }

    const USAGE: &str = "usage: soak [--sessions N] [--concurrency N] [--turns N] \
        [--serve-every N (0: none through serve)] [--warmup N] [--settle SECONDS] \
        [--heap-margin-kib N] [--rss-margin-mib N]";

    /// How long any one wait may take before the session counts as failed.
    const PATIENCE: Duration = Duration::from_secs(30);
    /// How many times a resume refused because the session is still
    /// attached (to the dropped connection) is tried again, 20 ms apart.
    const RESUME_TRIES: u32 = 100;
    /// 8 kHz mono mu-law, a telephone line's audio.
    const PHONE: AudioFormat = AudioFormat::new(AudioEncoding::Mulaw, 8_000, 1);
    /// Speech of one utterance, and the silence that ends the turn after it.
    const SPEECH: Duration = Duration::from_millis(400);
    const PAUSE: Duration = Duration::from_millis(700);

    struct Options {
        sessions: usize,
        concurrency: usize,
        turns: u64,
        serve_every: usize,
        warmup: usize,
        settle: f64,
        heap_margin_kib: i64,
        rss_margin_mib: i64,
    }

    fn parse_args() -> Result<Options, String> {
        let mut o = Options {
            sessions: 5000,
            concurrency: 200,
            turns: 3,
            serve_every: 5,
            warmup: 300,
            settle: 5.0,
            heap_margin_kib: 1024,
            rss_margin_mib: 16,
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
                "--concurrency" => o.concurrency = value.parse().map_err(|e| bad(&e))?,
                "--turns" => o.turns = value.parse().map_err(|e| bad(&e))?,
                "--serve-every" => o.serve_every = value.parse().map_err(|e| bad(&e))?,
                "--warmup" => o.warmup = value.parse().map_err(|e| bad(&e))?,
                "--settle" => o.settle = value.parse().map_err(|e| bad(&e))?,
                "--heap-margin-kib" => o.heap_margin_kib = value.parse().map_err(|e| bad(&e))?,
                "--rss-margin-mib" => o.rss_margin_mib = value.parse().map_err(|e| bad(&e))?,
                _ => return Err(format!("unknown option {flag}\n{USAGE}")),
            }
        }
        if o.sessions == 0
            || o.concurrency == 0
            || o.turns < 2
            || !(0.0..=600.0).contains(&o.settle)
        {
            return Err(format!(
                "--sessions and --concurrency must be positive, --turns at least 2 (one is \
                 barged in on), --settle 0 to 600 seconds\n{USAGE}"
            ));
        }
        Ok(o)
    }

    /// Resident memory in bytes (`VmRSS` of `/proc/self/status`).
    fn rss_bytes() -> i64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
            })
            .map_or(0, |kib| kib * 1024)
    }

    #[derive(Clone, Copy)]
    struct Sample {
        rss: i64,
        heap: i64,
    }

    fn sample() -> Sample {
        Sample {
            rss: rss_bytes(),
            heap: LIVE_BYTES.load(Ordering::Relaxed),
        }
    }

    fn mib(bytes: i64) -> f64 {
        bytes as f64 / (1024.0 * 1024.0)
    }

    /// What the sessions did, counted.
    #[derive(Default)]
    struct Counts {
        sessions: AtomicU64,
        turns: AtomicU64,
        barge_ins: AtomicU64,
        /// Barge-ins that came too late: the reply had already ended.
        barge_missed: AtomicU64,
        drops: AtomicU64,
        resumed: AtomicU64,
        /// Resumes tried again: the server had not yet noticed the drop.
        resume_retries: AtomicU64,
        resume_refused: AtomicU64,
        failed: AtomicU64,
    }

    /// One utterance (speech then the pause that ends the turn), in `format`,
    /// as 20 ms frames.
    fn utterance(seed: u64, format: AudioFormat) -> Vec<AudioFrame> {
        let pcm = signal::utterance(SPEECH, PAUSE, seed);
        let frames = signal::frames(&pcm, 20);
        if format == INTERNAL_FORMAT {
            return frames;
        }
        let mut c = AudioConverter::new(INTERNAL_FORMAT, format).expect("a known conversion");
        let mut out: Vec<AudioFrame> = frames
            .iter()
            .filter_map(|f| c.convert(f).expect("converts"))
            .collect();
        out.extend(c.flush().expect("flushes"));
        out
    }

    /// Audio shared by every session: utterances in both formats.
    struct Audio {
        pcm: Vec<Vec<AudioFrame>>,
        phone: Vec<Vec<AudioFrame>>,
    }

    impl Audio {
        fn new() -> Audio {
            Audio {
                pcm: (0..4).map(|s| utterance(s, INTERNAL_FORMAT)).collect(),
                phone: (0..4).map(|s| utterance(s, PHONE)).collect(),
            }
        }
    }

    async fn wait_event(
        events: &mut SessionEvents,
        what: &str,
        mut pred: impl FnMut(&SessionEvent) -> bool,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(e)) if pred(&e) => return Ok(()),
                Ok(Some(SessionEvent::Error { code, message })) => {
                    return Err(format!("{what}: error {code}: {message}"));
                }
                Ok(Some(_)) => {}
                Ok(None) => return Err(format!("the session closed before {what}")),
                Err(_) => return Err(format!("no {what} within {PATIENCE:?}")),
            }
        }
    }

    fn back_to_listening(e: &SessionEvent) -> bool {
        matches!(
            e,
            SessionEvent::State {
                to: PipelineState::Listening,
                ..
            }
        )
    }

    /// A session through the API: turns, one barged in on, and an ending.
    async fn api_session(
        backend: Arc<dyn VoiceBackend>,
        audio: Arc<Audio>,
        n: usize,
        turns: u64,
        counts: Arc<Counts>,
    ) -> Result<(), String> {
        let phone = n % 2 == 1;
        let format = if phone { PHONE } else { INTERNAL_FORMAT };
        let utterances = if phone { &audio.phone } else { &audio.pcm };
        let session = backend
            .create_session(
                SessionConfig::new(format!("soak-{n}"))
                    .with_input_format(format)
                    .with_output_format(format),
            )
            .await
            .map_err(|e| format!("create_session: {e}"))?;
        let mut events = session.events();
        let mut rx: AudioReceiver = session.receive_audio().map_err(|e| e.to_string())?;
        session.start().await.map_err(|e| e.to_string())?;
        let barge_turn = 1 + (n as u64 % (turns - 1));
        for turn in 1..=turns {
            for f in &utterances[(n + turn as usize) % utterances.len()] {
                session
                    .process_audio(f.clone())
                    .await
                    .map_err(|e| format!("process_audio: {e}"))?;
            }
            let mut interrupted = false;
            wait_event(&mut events, "the turn's end", |e| {
                if matches!(e, SessionEvent::Interrupted { turn: t } if *t == turn - 1) {
                    interrupted = true;
                }
                matches!(e, SessionEvent::TurnEnded { turn: t } if *t == turn)
            })
            .await?;
            counts.turns.fetch_add(1, Ordering::Relaxed);
            if turn == barge_turn + 1 {
                let seen = if interrupted {
                    &counts.barge_ins
                } else {
                    &counts.barge_missed
                };
                seen.fetch_add(1, Ordering::Relaxed);
            }
            // The reply's first audio.
            timeout(PATIENCE, rx.recv())
                .await
                .map_err(|_| format!("no reply audio to turn {turn} of {turns}"))?
                .ok_or("the reply audio ended")?;
            if turn == barge_turn {
                // The next utterance starts while this reply plays: a barge-in.
                continue;
            }
            if turn == turns && n % 3 == 2 {
                // Ended in the middle of its last reply.
                break;
            }
            wait_event(&mut events, "the reply's end", back_to_listening).await?;
            while rx.try_recv().is_some() {}
        }
        match n % 3 {
            0 => session.stop().await.map_err(|e| format!("stop: {e}"))?,
            _ => backend
                .close_session(session.id())
                .await
                .map_err(|e| format!("close_session: {e}"))?,
        }
        // What is left is read to the end of the stream, as an application does.
        while let Ok(Some(_)) = timeout(PATIENCE, rx.recv()).await {}
        Ok(())
    }

    type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    async fn ws_next(ws: &mut Ws) -> Result<Message, String> {
        loop {
            match timeout(PATIENCE, ws.next()).await {
                Err(_) => return Err(format!("nothing from the server in {PATIENCE:?}")),
                Ok(None) => return Err("the server closed the stream".into()),
                Ok(Some(Err(e))) => return Err(format!("WebSocket: {e}")),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {}
                Ok(Some(Ok(m))) => return Ok(m),
            }
        }
    }

    /// Reads until a JSON message satisfies `pred` (binary audio skipped).
    async fn ws_wait(
        ws: &mut Ws,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        loop {
            match ws_next(ws).await? {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
                    if pred(&v) {
                        return Ok(v);
                    }
                    if v["type"] == "error" {
                        return Err(format!("{what}: {v}"));
                    }
                }
                Message::Close(f) => return Err(format!("{what}: closed {f:?}")),
                _ => {}
            }
        }
    }

    async fn ws_speak(ws: &mut Ws, frames: &[AudioFrame]) -> Result<(), String> {
        for f in frames {
            ws.send(Message::binary(f.data().clone()))
                .await
                .map_err(|e| format!("send: {e}"))?;
        }
        Ok(())
    }

    async fn connect(addr: SocketAddr) -> Result<Ws, String> {
        let (ws, _) = timeout(
            PATIENCE,
            tokio_tungstenite::connect_async(format!("ws://{addr}/ws")),
        )
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
        Ok(ws)
    }

    async fn ws_start(ws: &mut Ws, n: usize) -> Result<Value, String> {
        let start = json!({"type": "start", "user_id": format!("gateway-{n}"),
                           "sample_rate": 8000, "encoding": "mulaw"});
        ws.send(Message::text(start.to_string()))
            .await
            .map_err(|e| e.to_string())?;
        ws_wait(ws, "ready", |v| v["type"] == "ready").await
    }

    /// A session through `serve`: a turn, a dropped connection and a
    /// reconnect with `resume`, more turns with a barge-in, `stop`.
    async fn serve_session(
        addr: SocketAddr,
        audio: Arc<Audio>,
        n: usize,
        turns: u64,
        counts: Arc<Counts>,
    ) -> Result<(), String> {
        let mut ws = connect(addr).await?;
        let ready = ws_start(&mut ws, n).await?;
        let id = ready["session_id"]
            .as_str()
            .ok_or("no session id")?
            .to_owned();
        let token = ready["resume_token"]
            .as_str()
            .ok_or("no resume token (the backend keeps no sessions)")?
            .to_owned();
        ws_speak(&mut ws, &audio.phone[n % 4]).await?;
        ws_wait(&mut ws, "turn 1's end", |v| v["type"] == "turn_ended").await?;
        counts.turns.fetch_add(1, Ordering::Relaxed);
        // The reply plays; the line drops without a close frame.
        loop {
            if let Message::Binary(_) = ws_next(&mut ws).await? {
                break;
            }
        }
        drop(ws);
        counts.drops.fetch_add(1, Ordering::Relaxed);
        // Back at once with `resume`, within the server's resume window. The
        // server may not have noticed the old connection's end yet (the
        // session is still attached to it): then it is tried again shortly.
        let resume = json!({"type": "resume", "session_id": id, "resume_token": token,
                            "sample_rate": 8000, "encoding": "mulaw"});
        let mut tries = 0;
        let (mut ws, turn_base) = loop {
            let mut ws = connect(addr).await?;
            ws.send(Message::text(resume.to_string()))
                .await
                .map_err(|e| e.to_string())?;
            match ws_next(&mut ws).await? {
                Message::Text(t) if t.as_str().contains("\"ready\"") => {
                    let ready: Value =
                        serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
                    if ready["resumed"] != true {
                        return Err(format!("resume: ready without resumed: {ready}"));
                    }
                    counts.resumed.fetch_add(1, Ordering::Relaxed);
                    break (ws, 1);
                }
                Message::Close(Some(f))
                    if u16::from(f.code) == 1008
                        && f.reason.contains("attached to another connection")
                        && tries < RESUME_TRIES =>
                {
                    tries += 1;
                    counts.resume_retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Message::Close(Some(f)) if u16::from(f.code) == 1008 => {
                    counts.resume_refused.fetch_add(1, Ordering::Relaxed);
                    if counts.resume_refused.load(Ordering::Relaxed) <= 3 {
                        eprintln!("session {n}: resume refused: {}", f.reason);
                    }
                    let mut ws = connect(addr).await?;
                    ws_start(&mut ws, n).await?;
                    break (ws, 0);
                }
                other => return Err(format!("resume: unexpected {other:?}")),
            }
        };
        // With three turns or more, the third barges in on the second's reply.
        for turn in 2..=turns {
            ws_speak(&mut ws, &audio.phone[(n + turn as usize) % 4]).await?;
            let number = turn - 1 + turn_base;
            let mut interrupted = false;
            loop {
                let v = ws_wait(&mut ws, "the turn's end", |v| {
                    v["type"] == "turn_ended" || v["type"] == "interrupted"
                })
                .await?;
                if v["type"] == "interrupted" {
                    interrupted = true;
                } else if v["turn"] == number {
                    break;
                }
            }
            counts.turns.fetch_add(1, Ordering::Relaxed);
            if turn == 3 {
                let seen = if interrupted {
                    &counts.barge_ins
                } else {
                    &counts.barge_missed
                };
                seen.fetch_add(1, Ordering::Relaxed);
            }
            if turn == 2 && turns > 2 {
                // Speak over the reply, from its first audio.
                loop {
                    if let Message::Binary(_) = ws_next(&mut ws).await? {
                        break;
                    }
                }
                continue;
            }
            ws_wait(&mut ws, "the reply's end", |v| {
                v["type"] == "state" && v["from"] == "speaking"
            })
            .await?;
        }
        ws.send(Message::text(r#"{"type":"stop"}"#))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match ws_next(&mut ws).await {
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        Ok(())
    }

    /// Runs `count` sessions, numbered from `first`, at most `concurrency` at once.
    async fn run_sessions(
        backend: &Arc<dyn VoiceBackend>,
        addr: SocketAddr,
        audio: &Arc<Audio>,
        o: &Options,
        first: usize,
        count: usize,
        counts: &Arc<Counts>,
    ) {
        let gate = Arc::new(Semaphore::new(o.concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        for n in first..first + count {
            let permit = gate.clone().acquire_owned().await.expect("never closed");
            let (backend, audio, counts) = (backend.clone(), audio.clone(), counts.clone());
            let turns = o.turns;
            let through_serve = o.serve_every > 0 && n % o.serve_every == 0;
            tasks.spawn(async move {
                let result = if through_serve {
                    serve_session(addr, audio, n, turns, counts.clone()).await
                } else {
                    api_session(backend, audio, n, turns, counts.clone()).await
                };
                counts.sessions.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = result
                    && counts.failed.fetch_add(1, Ordering::Relaxed) < 10
                {
                    eprintln!("session {n} failed: {e}");
                }
                drop(permit);
            });
            // Reap finished tasks as we go, so the set stays small.
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn settled(backend: &Arc<dyn VoiceBackend>, settle: Duration) -> usize {
        let deadline = Instant::now() + PATIENCE;
        while backend.active_session_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(settle).await;
        backend.active_session_count()
    }

    async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    }

    pub async fn main() -> i32 {
        let o = match parse_args() {
            Ok(o) => o,
            Err(e) => {
                eprintln!("{e}");
                return 2;
            }
        };
        let mut config = Config::new("local");
        config.pipeline_type = PipelineType::S2s;
        config.s2s_provider = Some("echo".into());
        config.max_concurrent_sessions = u32::try_from(o.concurrency * 2)
            .unwrap_or(u32::MAX)
            .max(100);
        let backend = registry()
            .create("local", &config)
            .await
            .expect("a local backend");
        backend.set_session_store(Arc::new(voice_backends::store::MemoryStore::new()));
        backend.start().await.expect("starts");
        let server = Server::bind(
            backend.clone(),
            ServerConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                max_connections_per_ip: o.concurrency * 4,
                max_http_connections_per_ip: o.concurrency * 4,
                connections_per_second_per_ip: 1e6,
                ..ServerConfig::default()
            },
        )
        .await
        .expect("binds");
        let addr = server.local_addr();
        let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        let audio = Arc::new(Audio::new());
        let counts = Arc::new(Counts::default());

        let started = Instant::now();
        run_sessions(&backend, addr, &audio, &o, 0, o.warmup, &counts).await;
        let warm_left = settled(&backend, Duration::from_secs_f64(o.settle)).await;
        let baseline = sample();
        let warm_failed = counts.failed.load(Ordering::Relaxed);
        println!(
            "baseline after {} warm-up sessions ({:.0} s): RSS {:.1} MiB, heap {:.2} MiB \
             ({warm_left} sessions active)",
            o.warmup,
            started.elapsed().as_secs_f64(),
            mib(baseline.rss),
            mib(baseline.heap)
        );

        let peak = Arc::new((AtomicI64::new(baseline.rss), AtomicI64::new(baseline.heap)));
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (peak, sampling) = (peak.clone(), sampling.clone());
            tokio::spawn(async move {
                while sampling.load(Ordering::Relaxed) {
                    let s = sample();
                    peak.0.fetch_max(s.rss, Ordering::Relaxed);
                    peak.1.fetch_max(s.heap, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let run_started = Instant::now();
        let allocations_before = ALLOCATIONS.load(Ordering::Relaxed);
        run_sessions(&backend, addr, &audio, &o, o.warmup, o.sessions, &counts).await;
        let run_time = run_started.elapsed();
        sampling.store(false, Ordering::Relaxed);
        let _ = sampler.await;
        let left = settled(&backend, Duration::from_secs_f64(o.settle)).await;
        let connections = metric(addr, "server_connections_active").await;
        let end = sample();
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations_before;

        let c = &counts;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let failed = load(&c.failed) - warm_failed;
        println!(
            "{} sessions in {:.0} s ({} at once at most; {} through serve): {} turns, {} with \
             a barge-in seen before the turn's end ({} seen after it, or after the reply had ended), \
             {} replies interrupted (the backend's count), {} dropped connections ({} resumed, {} resumes tried \
             again while the drop went unnoticed, {} refused and restarted), {failed} failed",
            o.sessions,
            run_time.as_secs_f64(),
            o.concurrency,
            if o.serve_every == 0 {
                0
            } else {
                (o.warmup..o.warmup + o.sessions)
                    .filter(|n| n % o.serve_every == 0)
                    .count()
            },
            load(&c.turns),
            load(&c.barge_ins),
            load(&c.barge_missed),
            backend.metrics().map_or(0, |m| m.snapshot().interruptions),
            load(&c.drops),
            load(&c.resumed),
            load(&c.resume_retries),
            load(&c.resume_refused),
        );
        println!(
            "server: {} sessions detached, {} resumes taken, {} resume windows expired",
            metric(addr, "server_sessions_detached_total")
                .await
                .unwrap_or(-1.0),
            metric(addr, "server_resumes_total").await.unwrap_or(-1.0),
            metric(addr, "server_resume_windows_expired_total")
                .await
                .unwrap_or(-1.0),
        );
        let (peak_rss, peak_heap) = (
            peak.0.load(Ordering::Relaxed),
            peak.1.load(Ordering::Relaxed),
        );
        println!("                 RSS MiB   heap MiB");
        println!(
            "baseline      {:>10.1} {:>10.2}",
            mib(baseline.rss),
            mib(baseline.heap)
        );
        println!(
            "peak          {:>10.1} {:>10.2}",
            mib(peak_rss),
            mib(peak_heap)
        );
        println!(
            "end ({:.0} s after) {:>5.1} {:>10.2}",
            o.settle,
            mib(end.rss),
            mib(end.heap)
        );
        let (rss_growth, heap_growth) = (end.rss - baseline.rss, end.heap - baseline.heap);
        println!(
            "end - baseline: RSS {:+.1} MiB (margin {} MiB), heap {:+.1} KiB (margin {} KiB), \
             {:.0} bytes of heap per session; {allocations} allocations during the run",
            mib(rss_growth),
            o.rss_margin_mib,
            heap_growth as f64 / 1024.0,
            o.heap_margin_kib,
            heap_growth as f64 / o.sessions as f64,
        );
        println!(
            "active after close: {left} sessions, {} server connections",
            connections.map_or("?".into(), |c| c.to_string())
        );

        let _ = stop_server.send(());
        let _ = timeout(PATIENCE, serving).await;
        let _ = backend.stop().await;

        let mut status = 0;
        if heap_growth > o.heap_margin_kib * 1024 {
            eprintln!("FAIL: the heap did not come back to its baseline");
            status = 1;
        }
        if rss_growth > o.rss_margin_mib * 1024 * 1024 {
            eprintln!("FAIL: resident memory did not come back to its baseline");
            status = 1;
        }
        if failed > 0 || warm_failed > 0 {
            eprintln!("FAIL: {} sessions failed", failed + warm_failed);
            status = 1;
        }
        if left > 0 || connections.is_some_and(|c| c > 0.0) {
            eprintln!("FAIL: sessions or connections still open after the close");
            status = 1;
        }
        if status == 0 {
            println!("ok: memory came back");
        }
        status
    }
}

#[cfg(all(feature = "server", feature = "testing"))]
#[global_allocator]
static ALLOCATOR: soak::Counting = soak::Counting;

#[cfg(all(feature = "server", feature = "testing"))]
fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let status = runtime.block_on(soak::main());
    drop(runtime);
    std::process::exit(status);
}

#[cfg(not(all(feature = "server", feature = "testing")))]
fn main() {
    eprintln!("the soak needs the server and testing features: --features server,testing");
    std::process::exit(2);
}
