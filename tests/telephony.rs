#![cfg(feature = "testing")]
//! Telephone audio end to end: 8 kHz G.711 mu-law in, the pipeline at
//! 16 kHz, the reply out as 8 kHz mu-law, through the `local` provider's API
//! and (with the `server` feature) through `serve`'s WebSocket as a phone
//! gateway drives it (binary mu-law, 20 ms = 160 bytes).
//!
//! The `echo` speech-to-speech component answers each turn with the audio it
//! heard, so the reply can be checked against what was sent: its format, its
//! length against what the pipeline heard, and its content (decoded here with
//! G.711's reference mu-law expansion, aligned with the input and compared by
//! correlation and by 20 ms envelope). A wrong rate, a wrong companding law
//! or a missing resampling step fails these checks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use voice_backends::audio::{AudioConverter, convert_frame};
use voice_backends::hooks::AudioProcessor;
use voice_backends::pipeline::events::SessionEvent;
use voice_backends::pipeline::{INTERNAL_FORMAT, ProcessorFactory};
use voice_backends::testing::signal;
use voice_backends::{
    AudioEncoding, AudioFormat, AudioFrame, Config, ErrorCode, PipelineState, PipelineType,
    ProcessorConfig, SessionConfig, VoiceBackend, VoiceSession, registry,
};

/// How long anything may take on a loaded machine before a test fails.
const PATIENCE: Duration = Duration::from_secs(30);
/// 8 kHz mono mu-law, as telephone networks carry it.
const PHONE: AudioFormat = AudioFormat::new(AudioEncoding::Mulaw, 8_000, 1);
/// One 20 ms telephone frame: 160 bytes.
const PHONE_FRAME: usize = 160;

// ---------------------------------------------------------------------------
// A probe processor: records what the pipeline itself is given.

/// Frames each probe saw, by its `tap` option.
static TAPS: Mutex<BTreeMap<String, Vec<AudioFrame>>> = Mutex::new(BTreeMap::new());

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeOptions {
    tap: String,
}

struct Probe {
    tap: String,
    order: i32,
}

impl AudioProcessor for Probe {
    fn name(&self) -> &str {
        "telephony-probe"
    }

    fn order(&self) -> i32 {
        self.order
    }

    fn process(&mut self, frame: AudioFrame) -> voice_backends::Result<AudioFrame> {
        TAPS.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(self.tap.clone())
            .or_default()
            .push(frame.clone());
        Ok(frame)
    }
}

#[derive(Default)]
struct ProbeFactory;

impl ProcessorFactory for ProbeFactory {
    fn create(
        &self,
        options: &serde_json::Value,
        order: i32,
    ) -> voice_backends::Result<Box<dyn AudioProcessor>> {
        let options: ProbeOptions = serde_json::from_value(options.clone()).map_err(|e| {
            voice_backends::BackendError::new(
                "telephony-probe",
                ErrorCode::InvalidConfig,
                format!("bad probe options: {e}"),
            )
        })?;
        Ok(Box::new(Probe {
            tap: options.tap,
            order,
        }))
    }
}

voice_backends::register_component!(processor, "telephony-probe", ProbeFactory::default);

fn tapped(tap: &str) -> Vec<AudioFrame> {
    TAPS.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(tap)
        .cloned()
        .unwrap_or_default()
}

/// The `local` echo backend, with a probe on the pipeline's input named `tap`.
async fn echo_backend(tap: &str) -> Arc<dyn VoiceBackend> {
    let mut config = Config::new("local");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    config.processors.push(ProcessorConfig {
        name: "telephony-probe".into(),
        order: 0,
        options: serde_json::json!({ "tap": tap }),
    });
    let backend = registry().create("local", &config).await.unwrap();
    backend.start().await.unwrap();
    backend
}

// ---------------------------------------------------------------------------
// G.711 and signal helpers, independent of the crate's codec.

/// G.711 mu-law expansion as the ITU reference (`ulaw2linear` of Sun's
/// `g711.c`) does it; written out here so a fault in the crate's codec
/// cannot cancel out.
fn mulaw_expand(code: u8) -> i16 {
    let u = !code;
    let t = ((i32::from(u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4);
    (if u & 0x80 != 0 { 0x84 - t } else { t - 0x84 }) as i16
}

fn expand_all(bytes: &[u8]) -> Vec<i16> {
    bytes.iter().map(|&b| mulaw_expand(b)).collect()
}

/// `samples` (16 kHz PCM, the test signals' rate) as a telephone line
/// carries them: resampled to 8 kHz by the crate's converter (whole), then
/// companded to mu-law by the crate's same-rate conversion (the sample path
/// the session's output does not take, so a fault in that one cannot hide
/// in the input too).
fn to_phone(samples: &[i16]) -> Vec<u8> {
    let pcm8 = AudioFormat::new(AudioEncoding::PcmS16Le, 8_000, 1);
    let mut c = AudioConverter::new(INTERNAL_FORMAT, pcm8).unwrap();
    let frame = AudioFrame::from_i16(16_000, 1, samples).unwrap();
    let mut out = Vec::new();
    for f in [c.convert(&frame).unwrap(), c.flush().unwrap()]
        .into_iter()
        .flatten()
    {
        let f = convert_frame(&f, PHONE).unwrap();
        assert_eq!(f.format(), PHONE);
        out.extend_from_slice(f.data());
    }
    out
}

/// A call's audio: `lead` of silence, `speech` of speech-like audio, then
/// `pause` of silence, at 16 kHz.
fn call_audio(lead: Duration, speech: Duration, pause: Duration, seed: u64) -> Vec<i16> {
    let mut audio = signal::silence(lead);
    audio.extend(signal::utterance(speech, pause, seed));
    audio
}

/// Index of the first sample louder than `level`.
fn onset(samples: &[i16], level: i16) -> Option<usize> {
    samples.iter().position(|s| s.unsigned_abs() > level as u16)
}

fn rms(samples: &[i16]) -> f64 {
    let n = samples.len().max(1) as f64;
    (samples.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / n).sqrt()
}

/// Normalised correlation of `a` with `b` (equal lengths).
fn correlation(a: &[i16], b: &[i16]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1.0)
}

/// Checks that `reply` (8 kHz, decoded) carries `heard` (the 8 kHz input
/// the caller sent, decoded): the speech in `heard` starting at `speech_at`
/// and lasting `speech_len` samples is found in `reply` with correlation at
/// least 0.95, each 20 ms of it within 1.5 dB of the input's level, the
/// whole within 1 dB. Returns where in `reply` the speech starts.
fn assert_carries(reply: &[i16], heard: &[i16], speech_at: usize, speech_len: usize) -> usize {
    let speech = &heard[speech_at..speech_at + speech_len];
    // Where the reply's speech starts, roughly, then the best lag near it.
    let rough = onset(reply, 300).expect("the reply has speech in it");
    let from = rough.saturating_sub(64);
    let mut best = (0usize, f64::MIN);
    for start in from..=rough + 64 {
        if start + speech_len > reply.len() {
            break;
        }
        let c = correlation(&reply[start..start + speech_len], speech);
        if c > best.1 {
            best = (start, c);
        }
    }
    let (start, corr) = best;
    assert!(
        corr >= 0.95,
        "the reply is the caller's speech: correlation {corr:.3} at best (reply from sample \
         {start}); a wrong rate or companding law gives far less"
    );
    let got = &reply[start..start + speech_len];
    let level = 20.0 * (rms(got) / rms(speech)).log10();
    assert!(
        level.abs() <= 1.0,
        "the reply is as loud as the speech: {level:+.2} dB"
    );
    let window = 160; // 20 ms at 8 kHz
    for (i, (g, s)) in got.chunks(window).zip(speech.chunks(window)).enumerate() {
        if g.len() < window || rms(s) < 100.0 {
            continue; // the gaps between syllables: compared by correlation only
        }
        let d = 20.0 * (rms(g) / rms(s)).log10();
        assert!(
            d.abs() <= 1.5,
            "20 ms window {i} of the speech: the reply is {d:+.2} dB off the input"
        );
    }
    start
}

/// The milliseconds in the echo's final transcript, `"<n> ms of audio"`:
/// how much audio the pipeline heard in the turn, counted at its own rate.
fn heard_ms(event: &SessionEvent) -> u64 {
    let SessionEvent::UserTranscript { text, .. } = event else {
        panic!("not a transcript: {event:?}")
    };
    text.strip_suffix(" ms of audio")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the echo's transcript: {text:?}"))
}

/// Sends `bytes` of mu-law to `session` in frames of `sizes` bytes (cycling).
async fn send_phone(session: &dyn VoiceSession, bytes: &[u8], sizes: &[usize]) {
    let mut at = 0;
    for &n in sizes.iter().cycle() {
        if at >= bytes.len() {
            break;
        }
        let end = (at + n).min(bytes.len());
        let frame = AudioFrame::new(PHONE, bytes[at..end].to_vec()).unwrap();
        session.process_audio(frame).await.unwrap();
        at = end;
    }
}

/// Runs one spoken turn of a mu-law call through `session` and returns the
/// reply's frames and what the pipeline heard (ms) by the echo's count.
async fn phone_turn(
    session: &dyn VoiceSession,
    events: &mut voice_backends::session::SessionEvents,
    rx: &mut voice_backends::AudioReceiver,
    bytes: &[u8],
    sizes: &[usize],
    turn: u64,
) -> (Vec<AudioFrame>, u64) {
    send_phone(session, bytes, sizes).await;
    // The reply is read as it plays, as a caller hears it (a receiver that
    // falls more than its queue behind loses audio).
    let (mut frames, mut heard, mut ended) = (Vec::new(), None, false);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        tokio::select! {
            biased;
            f = rx.recv() => frames.push(f.expect("the reply audio goes on")),
            e = tokio::time::timeout_at(deadline, events.recv()) => {
                let e = e.expect("the turn is answered in time").expect("the session goes on");
                match e {
                    SessionEvent::TurnEnded { turn: t } => {
                        assert_eq!(t, turn);
                        ended = true;
                    }
                    SessionEvent::UserTranscript { is_final: true, .. } => heard = Some(heard_ms(&e)),
                    SessionEvent::State {
                        from: PipelineState::Speaking,
                        to: PipelineState::Listening,
                    } if ended => break,
                    SessionEvent::Error { .. } => panic!("turn {turn}: {e:?}"),
                    _ => {}
                }
            }
        }
    }
    // The reply is all handed out (its resampler's tail too) once the
    // session listens again.
    while let Some(f) = rx.try_recv() {
        frames.push(f);
    }
    (frames, heard.expect("the echo's transcript"))
}

// ---------------------------------------------------------------------------
// Through the local provider's API.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mulaw_call_is_heard_at_16_khz_and_answered_in_8_khz_mulaw() {
    const TAP: &str = "api";
    let backend = echo_backend(TAP).await;
    let session = backend
        .create_session(
            SessionConfig::new("caller")
                .with_input_format(PHONE)
                .with_output_format(PHONE),
        )
        .await
        .unwrap();
    let mut events = session.events();
    let mut rx = session.receive_audio().unwrap();
    session.start().await.unwrap();

    let (lead, pause) = (Duration::from_millis(300), Duration::from_millis(1000));
    let mut sent_8k = Vec::new();
    for (turn, (speech_ms, seed)) in [(1200u64, 21u64), (900, 22)].into_iter().enumerate() {
        let turn = turn as u64 + 1;
        let speech = Duration::from_millis(speech_ms);
        let bytes = to_phone(&call_audio(lead, speech, pause, seed));
        assert_eq!(bytes.len(), 8 * (300 + speech_ms as usize + 1000));
        let (frames, heard) = phone_turn(
            &*session,
            &mut events,
            &mut rx,
            &bytes,
            &[PHONE_FRAME],
            turn,
        )
        .await;
        sent_8k.extend_from_slice(&bytes);

        // Every reply frame is 8 kHz mono mu-law.
        assert!(!frames.is_empty(), "turn {turn} was answered");
        for f in &frames {
            assert_eq!(f.format(), PHONE, "turn {turn}: every reply frame");
        }
        let reply_bytes: Vec<u8> = frames.iter().flat_map(|f| f.data().to_vec()).collect();
        // As long as what the pipeline heard (counted by the echo at 16 kHz),
        // to within the milliseconds the count rounds down.
        let reply_ms = reply_bytes.len() as f64 / 8.0;
        assert!(
            (reply_ms - heard as f64).abs() <= 2.0,
            "turn {turn}: {reply_ms} ms of reply for {heard} ms heard"
        );
        // The turn as heard is the speech with some of the silence around it.
        assert!(
            heard >= speech_ms && heard <= speech_ms + 300 + 1000,
            "turn {turn}: heard {heard} ms for {speech_ms} ms of speech"
        );
        let heard_8k = expand_all(&bytes);
        let speech_at = onset(&heard_8k, 0).unwrap();
        // Within the resampler's filter (32 samples each side at 8 kHz) of 300 ms.
        assert!(speech_at.abs_diff(8 * 300) <= 32, "{speech_at}");
        let speech_len = 8 * speech_ms as usize - 16;
        assert_carries(&expand_all(&reply_bytes), &heard_8k, speech_at, speech_len);
    }

    // What the pipeline itself was given: 16 kHz mono PCM, the input at twice
    // the rate, in time with it.
    let pipeline = tapped(TAP);
    assert!(pipeline.iter().all(|f| f.format() == INTERNAL_FORMAT));
    let at_16k = signal::samples_of(&pipeline);
    let sent_ms = sent_8k.len() as f64 / 8.0;
    let seen_ms = at_16k.len() as f64 / 16.0;
    assert!(
        seen_ms <= sent_ms && sent_ms - seen_ms <= 5.0,
        "the pipeline heard {seen_ms} ms of the {sent_ms} ms sent (less at most the \
         resampler's delay)"
    );
    let onset_16k = onset(&at_16k, 300).unwrap() as f64 / 16.0;
    let onset_8k = onset(&expand_all(&sent_8k), 300).unwrap() as f64 / 8.0;
    assert!(
        (onset_16k - onset_8k).abs() <= 1.0,
        "speech starts at {onset_16k} ms in the pipeline, {onset_8k} ms on the line"
    );
    session.stop().await.unwrap();
    backend.stop().await.unwrap();
}

/// A gateway does not always cut 20 ms frames: any number of bytes is a whole
/// number of mu-law samples, and the call sounds the same however it is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mulaw_cut_into_odd_and_partial_frames_is_heard_the_same() {
    let audio = call_audio(
        Duration::from_millis(200),
        Duration::from_millis(1000),
        Duration::from_millis(1000),
        31,
    );
    let bytes = to_phone(&audio);
    let mut heard = Vec::new();
    for (tap, sizes) in [
        ("cut-20ms", &[PHONE_FRAME][..]),
        ("cut-odd", &[1, 7, 159, 161, 333, 80, 3][..]),
    ] {
        let backend = echo_backend(tap).await;
        let session = backend
            .create_session(
                SessionConfig::new(tap)
                    .with_input_format(PHONE)
                    .with_output_format(PHONE),
            )
            .await
            .unwrap();
        let mut events = session.events();
        let mut rx = session.receive_audio().unwrap();
        session.start().await.unwrap();
        // An empty frame is no audio, not an error.
        session
            .process_audio(AudioFrame::new(PHONE, Vec::new()).unwrap())
            .await
            .unwrap();
        let (frames, _) = phone_turn(&*session, &mut events, &mut rx, &bytes, sizes, 1).await;
        assert!(frames.iter().all(|f| f.format() == PHONE));
        let reply: Vec<u8> = frames.iter().flat_map(|f| f.data().to_vec()).collect();
        let line = expand_all(&bytes);
        let at = onset(&line, 0).unwrap();
        assert_carries(&expand_all(&reply), &line, at, 8 * 1000 - 16);
        heard.push(signal::samples_of(&tapped(tap)));
        session.stop().await.unwrap();
        backend.stop().await.unwrap();
    }
    // The pipeline's input is the same samples, bit for bit, however the
    // line was cut (up to the resampler's tail the odd cut's last frame may
    // leave inside).
    let n = heard[0].len().min(heard[1].len());
    assert!(heard[0].len().abs_diff(heard[1].len()) <= 16 * 5);
    assert_eq!(heard[0][..n], heard[1][..n]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_call_gets_no_turn_and_no_reply() {
    let backend = echo_backend("silent").await;
    let session = backend
        .create_session(
            SessionConfig::new("silent")
                .with_input_format(PHONE)
                .with_output_format(PHONE),
        )
        .await
        .unwrap();
    let mut events = session.events();
    let mut rx = session.receive_audio().unwrap();
    session.start().await.unwrap();
    // Three seconds of the line's idle codes: mu-law's two zeros (0xFF and
    // 0x7F), alternating as a line's sign bit may.
    let idle: Vec<u8> = (0..8 * 3000)
        .map(|i| if i % 2 == 0 { 0xFF } else { 0x7F })
        .collect();
    send_phone(&*session, &idle, &[PHONE_FRAME]).await;
    let heard = signal::samples_of(&tapped("silent"));
    assert!(heard.len() >= 16 * 2990, "the pipeline heard the call");
    assert!(heard.iter().all(|&s| s == 0), "idle codes are silence");
    session.stop().await.unwrap();
    let mut seen = Vec::new();
    while let Some(e) = events.try_recv() {
        seen.push(e);
    }
    assert!(
        !seen.iter().any(|e| matches!(
            e,
            SessionEvent::SpeechStarted
                | SessionEvent::TurnEnded { .. }
                | SessionEvent::Error { .. }
        )),
        "no speech, no turn, no error in a silent call: {seen:?}"
    );
    let mut reply = 0;
    while let Ok(Some(_)) = tokio::time::timeout(PATIENCE, rx.recv()).await {
        reply += 1;
    }
    assert_eq!(reply, 0, "no reply audio to silence");
    backend.stop().await.unwrap();
}

/// A call whose audio changes format mid-call is converted (the pipeline
/// follows it), and one that changes format every frame is refused with a
/// typed error naming the problem, without ending the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_change_mid_call_is_followed_or_refused_with_a_typed_error() {
    let backend = echo_backend("change").await;
    let session = backend
        .create_session(
            SessionConfig::new("change")
                .with_input_format(PHONE)
                .with_output_format(PHONE),
        )
        .await
        .unwrap();
    let mut events = session.events();
    let mut rx = session.receive_audio().unwrap();
    session.start().await.unwrap();
    let alaw = AudioFormat::new(AudioEncoding::Alaw, 8_000, 1);
    let pcm8 = AudioFormat::new(AudioEncoding::PcmS16Le, 8_000, 1);
    let pcm48 = AudioFormat::new(AudioEncoding::PcmS16Le, 48_000, 1);
    let silent = |format: AudioFormat| {
        AudioFrame::new(
            format,
            vec![0u8; format.bytes_for(Duration::from_millis(20))],
        )
        .unwrap()
    };
    // Flipping format every frame: at most a few converters a second, then a
    // typed refusal.
    let mut refused = None;
    for i in 0..12 {
        let f = silent([PHONE, alaw, pcm8, pcm48][i % 4]);
        if let Err(e) = session.process_audio(f).await {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("a format changing every frame is refused");
    assert_eq!(e.code, ErrorCode::PipelineError);
    assert_eq!(e.op, "session.process_audio");
    assert!(e.message.contains("format changed"), "{e}");
    // A frame claiming an impossible format never gets that far.
    let bad = AudioFrame::new(
        AudioFormat::new(AudioEncoding::Mulaw, 0, 1),
        vec![0xFF; 160],
    );
    assert_eq!(bad.unwrap_err().code, ErrorCode::PipelineError);

    // After the second is over, the call goes on in its own format and is
    // answered in it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let speech = Duration::from_millis(800);
    let bytes = to_phone(&call_audio(
        Duration::from_millis(300),
        speech,
        Duration::from_millis(1000),
        41,
    ));
    let (frames, _) = phone_turn(&*session, &mut events, &mut rx, &bytes, &[PHONE_FRAME], 1).await;
    assert!(frames.iter().all(|f| f.format() == PHONE));
    let reply: Vec<u8> = frames.iter().flat_map(|f| f.data().to_vec()).collect();
    let line = expand_all(&bytes);
    let at = onset(&line, 0).unwrap();
    assert_carries(&expand_all(&reply), &line, at, 8 * 800 - 16);
    session.stop().await.unwrap();
    backend.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Through `serve`'s WebSocket, as a telephone gateway drives it.

#[cfg(feature = "server")]
mod gateway {
    use std::net::SocketAddr;

    use futures_util::{SinkExt, StreamExt};
    use serde_json::{Value, json};
    use tokio::time::timeout;
    use tokio_tungstenite::tungstenite::Message;
    use voice_backends::server::{Server, ServerConfig};

    use super::*;

    type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    async fn serve(tap: &str) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let backend = echo_backend(tap).await;
        let server = Server::bind(
            backend,
            ServerConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                ..ServerConfig::default()
            },
        )
        .await
        .unwrap();
        let addr = server.local_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    async fn connect(addr: SocketAddr) -> Ws {
        timeout(
            PATIENCE,
            tokio_tungstenite::connect_async(format!("ws://{addr}/ws")),
        )
        .await
        .unwrap()
        .unwrap()
        .0
    }

    enum Got {
        Json(Value),
        Audio(Vec<u8>),
        Close(u16, String),
    }

    async fn next(ws: &mut Ws) -> Got {
        loop {
            let m = timeout(PATIENCE, ws.next())
                .await
                .expect("the server answers")
                .expect("the connection is open")
                .expect("no WebSocket error");
            return match m {
                Message::Text(t) => Got::Json(serde_json::from_str(t.as_str()).unwrap()),
                Message::Binary(b) => Got::Audio(b.to_vec()),
                Message::Close(f) => {
                    let f = f.expect("a close frame with a code");
                    Got::Close(u16::from(f.code), f.reason.as_str().to_owned())
                }
                _ => continue,
            };
        }
    }

    async fn start(ws: &mut Ws, encoding: &str) -> Value {
        let start = json!({"type": "start", "user_id": "gateway", "sample_rate": 8000,
                           "encoding": encoding});
        ws.send(Message::text(start.to_string())).await.unwrap();
        loop {
            match next(ws).await {
                Got::Json(v) if v["type"] == "ready" => return v,
                Got::Json(_) | Got::Audio(_) => {}
                Got::Close(code, reason) => panic!("closed {code}: {reason}"),
            }
        }
    }

    /// Streams `bytes` in binary messages of `sizes` bytes (cycling), 20 ms
    /// apart as a gateway sends them, then reads until the turn's reply has
    /// ended, returning the reply's bytes and the milliseconds the echo heard.
    async fn call_turn(ws: &mut Ws, bytes: &[u8], sizes: &[usize]) -> (Vec<u8>, u64) {
        let mut at = 0;
        for &n in sizes.iter().cycle() {
            if at >= bytes.len() {
                break;
            }
            let end = (at + n).min(bytes.len());
            ws.send(Message::binary(bytes[at..end].to_vec()))
                .await
                .unwrap();
            at = end;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (mut reply, mut heard, mut listening) = (Vec::new(), None, false);
        // Events and audio are two streams: the reply has ended when the
        // session listens again and all the audio the echo owes has come.
        while !(listening && heard.is_some_and(|ms: u64| reply.len() as u64 >= ms * 8)) {
            match next(ws).await {
                Got::Audio(b) => reply.extend(b),
                Got::Json(v) if v["type"] == "user_transcript" => {
                    let text = v["text"].as_str().unwrap();
                    heard = Some(text.strip_suffix(" ms of audio").unwrap().parse().unwrap());
                }
                Got::Json(v) if v["type"] == "state" && v["from"] == "speaking" => {
                    listening = true;
                }
                Got::Json(v) if v["type"] == "error" => panic!("error: {v}"),
                Got::Json(_) => {}
                Got::Close(code, reason) => panic!("closed {code}: {reason}"),
            }
        }
        (reply, heard.unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gateway_call_in_8_khz_mulaw_is_answered_in_kind() {
        let (addr, _stop) = serve("ws").await;
        let mut ws = connect(addr).await;
        let ready = start(&mut ws, "mulaw").await;
        assert_eq!(ready["encoding"], "mulaw");
        assert_eq!(ready["sample_rate"], 8000);
        assert_eq!(ready["channels"], 1);
        let speech_ms = 1200;
        let bytes = to_phone(&call_audio(
            Duration::from_millis(300),
            Duration::from_millis(speech_ms),
            Duration::from_millis(1000),
            51,
        ));
        let (reply, heard) = call_turn(&mut ws, &bytes, &[PHONE_FRAME]).await;
        // One byte a sample at 8 kHz: as long as what the echo heard.
        let reply_ms = reply.len() as f64 / 8.0;
        assert!(
            (reply_ms - heard as f64).abs() <= 2.0,
            "{reply_ms} ms of reply for {heard} ms heard"
        );
        let line = expand_all(&bytes);
        let at = onset(&line, 0).unwrap();
        assert_carries(&expand_all(&reply), &line, at, 8 * speech_ms as usize - 16);
        // The pipeline heard it at 16 kHz.
        assert!(tapped("ws").iter().all(|f| f.format() == INTERNAL_FORMAT));

        // Odd sizes are whole mu-law samples: a second turn cut oddly.
        let bytes = to_phone(&call_audio(
            Duration::from_millis(300),
            Duration::from_millis(900),
            Duration::from_millis(1000),
            52,
        ));
        let (reply, _) = call_turn(&mut ws, &bytes, &[161, 159, 1, 319]).await;
        let line = expand_all(&bytes);
        let at = onset(&line, 0).unwrap();
        assert_carries(&expand_all(&reply), &line, at, 8 * 900 - 16);

        // A format change mid-call: a second start is refused with 1002.
        let again = json!({"type": "start", "user_id": "gateway", "sample_rate": 16000});
        ws.send(Message::text(again.to_string())).await.unwrap();
        loop {
            match next(&mut ws).await {
                Got::Close(code, reason) => {
                    assert_eq!(code, 1002, "{reason}");
                    assert!(reason.contains("start sent twice"), "{reason}");
                    break;
                }
                Got::Json(_) | Got::Audio(_) => {}
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unknown_encoding_and_odd_pcm_bytes_are_refused_by_name() {
        let (addr, _stop) = serve("ws-refusals").await;
        let mut ws = connect(addr).await;
        let start = json!({"type": "start", "user_id": "g", "sample_rate": 8000,
                           "encoding": "opus"});
        ws.send(Message::text(start.to_string())).await.unwrap();
        match next(&mut ws).await {
            Got::Close(code, reason) => {
                assert_eq!(code, 1002);
                assert!(
                    reason.contains("opus") && reason.contains("mulaw"),
                    "{reason}"
                );
            }
            _ => panic!("an unknown encoding is refused"),
        }
        // PCM needs whole 16-bit samples; the same 161 bytes are fine in mu-law.
        let mut ws = connect(addr).await;
        start_and_send(&mut ws, "pcm_s16le", 161).await;
        loop {
            match next(&mut ws).await {
                Got::Close(code, reason) => {
                    assert_eq!(code, 1003, "{reason}");
                    assert!(reason.contains("161 bytes"), "{reason}");
                    break;
                }
                Got::Json(_) | Got::Audio(_) => {}
            }
        }
        let mut ws = connect(addr).await;
        start_and_send(&mut ws, "mulaw", 161).await;
        ws.send(Message::text(r#"{"type":"stop"}"#)).await.unwrap();
        loop {
            match next(&mut ws).await {
                Got::Close(code, reason) => {
                    assert_eq!(code, 1000, "{reason}");
                    break;
                }
                Got::Json(v) => assert_ne!(v["type"], "error", "{v}"),
                Got::Audio(_) => {}
            }
        }
    }

    async fn start_and_send(ws: &mut Ws, encoding: &str, bytes: usize) {
        let ready = start(ws, encoding).await;
        assert_eq!(ready["encoding"], encoding);
        ws.send(Message::binary(vec![0xFFu8; bytes])).await.unwrap();
    }
}
