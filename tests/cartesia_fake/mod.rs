//! A fake of Cartesia's two WebSockets, built from Cartesia's documented
//! protocol and its official SDKs' models, bound to 127.0.0.1:0.
//!
//! - Handshake: `GET /stt/websocket?model=..&encoding=..&sample_rate=..` or
//!   `GET /tts/websocket`; `Authorization: Bearer <key>` (or `X-API-Key`)
//!   else HTTP 401; a `Cartesia-Version` date else HTTP 400; unknown paths
//!   404; statuses queued with [`FakeCartesia::refuse_next`] answer the next
//!   handshakes (e.g. 429).
//! - Speech-to-text: binary audio; `finalize` is answered by the turn's
//!   transcript as final pieces (`transcript`, `is_final: true`, text
//!   deltas) and `flush_done`; `close` (or the older `done`) by `done` and a
//!   close; partial transcripts while audio comes; other text by `error`.
//! - Text-to-speech: generation requests (checked field by field: an
//!   invalid one is answered by `error` 400) on contexts; each transcript is
//!   spoken as `chunk`s (base64 PCM s16le at the requested rate, 20 ms
//!   each, 40 ms of speech per character); `flush: true` is answered by
//!   `flush_done` once what came before is spoken, `continue: false` by
//!   `done`; a request on a context that ended is an `error`; `{context_id,
//!   cancel: true}` stops a context's audio at once; queued errors
//!   ([`FakeCartesia::fail_next_tts`]) answer the next generation request;
//!   [`FakeCartesia::drop_tts_after`] drops the connection mid-stream.
//!
//! Everything each side sent is kept, for the tests' assertions and for the
//! check against the official SDK's models.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

const TTS_RATES: [u64; 6] = [8_000, 16_000, 22_050, 24_000, 44_100, 48_000];
const TTS_ENCODINGS: [&str; 4] = ["pcm_f32le", "pcm_s16le", "pcm_mulaw", "pcm_alaw"];
const STT_ENCODINGS: [&str; 6] = [
    "pcm_s16le",
    "pcm_s32le",
    "pcm_f16le",
    "pcm_f32le",
    "pcm_mulaw",
    "pcm_alaw",
];
/// What the user says unless told otherwise (punctuated, as Cartesia's
/// models write it).
pub const HEARD: &str = "Hello there.";
/// Speech per character of a transcript.
const PER_CHAR: Duration = Duration::from_millis(40);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the fake heard and does; read by the tests.
#[derive(Default)]
pub struct State {
    key: String,
    /// Time between two chunks of one context.
    pub pace: Mutex<Duration>,
    pub stt_connections: AtomicUsize,
    pub tts_connections: AtomicUsize,
    /// Handshakes refused: (path, status).
    pub refused: Mutex<Vec<(String, u16)>>,
    refuse_next: Mutex<VecDeque<u16>>,
    /// The `Cartesia-Version` of each accepted connection.
    pub versions: Mutex<Vec<String>>,
    /// The query of each speech-to-text connection.
    pub stt_queries: Mutex<Vec<BTreeMap<String, String>>>,
    pub stt_audio_bytes: AtomicUsize,
    /// Text commands on the speech-to-text socket, in order.
    pub stt_commands: Mutex<Vec<String>>,
    /// What the user "said", one per finalize (default [`HEARD`]).
    heard: Mutex<VecDeque<String>>,
    /// Every JSON the client sent on the text-to-speech socket, with when.
    pub tts_requests: Mutex<Vec<(Instant, Value)>>,
    /// When each `finalize` came and each `flush_done` went out, in order.
    pub stt_times: Mutex<Vec<(Instant, &'static str)>>,
    /// When the first chunk of each context went out.
    pub first_chunks: Mutex<HashMap<String, Instant>>,
    /// Every JSON the fake sent: ("stt" | "tts", message).
    pub sent: Mutex<Vec<(&'static str, Value)>>,
    fail_next: Mutex<VecDeque<u16>>,
    drop_after: Mutex<Option<usize>>,
    stt_now: Mutex<Option<mpsc::UnboundedSender<Option<Message>>>>,
    tts_now: Mutex<Option<mpsc::UnboundedSender<Option<Message>>>>,
}

/// The fake; stops when dropped.
pub struct FakeCartesia {
    pub base_url: String,
    pub state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeCartesia {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeCartesia {
    /// Starts a fake that takes the API key `key`.
    pub async fn start(key: &str) -> FakeCartesia {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base_url = format!("ws://{}", listener.local_addr().expect("address"));
        let state = Arc::new(State {
            key: key.to_owned(),
            pace: Mutex::new(Duration::from_millis(2)),
            ..State::default()
        });
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    tokio::spawn(serve(tcp, state.clone()));
                }
            }
        });
        FakeCartesia {
            base_url,
            state,
            task,
        }
    }

    /// The next handshakes are answered with these HTTP statuses.
    pub fn refuse_next(&self, statuses: &[u16]) {
        lock(&self.state.refuse_next).extend(statuses);
    }

    /// The next generation requests are answered with `error`s of these statuses.
    pub fn fail_next_tts(&self, statuses: &[u16]) {
        lock(&self.state.fail_next).extend(statuses);
    }

    /// The text-to-speech connection drops after `chunks` more chunks.
    pub fn drop_tts_after(&self, chunks: usize) {
        *lock(&self.state.drop_after) = Some(chunks);
    }

    /// What the user says in the next turns.
    pub fn will_hear(&self, text: &str) {
        lock(&self.state.heard).push_back(text.to_owned());
    }

    /// Drops the speech-to-text connection now open, without a close frame.
    pub fn drop_stt(&self) {
        if let Some(tx) = lock(&self.state.stt_now).as_ref() {
            let _ = tx.send(None);
        }
    }

    /// Drops the text-to-speech connection now open.
    pub fn drop_tts(&self) {
        if let Some(tx) = lock(&self.state.tts_now).as_ref() {
            let _ = tx.send(None);
        }
    }

    /// Sends `text` on the speech-to-text connection now open.
    pub fn send_stt(&self, text: &str) {
        if let Some(tx) = lock(&self.state.stt_now).as_ref() {
            let _ = tx.send(Some(Message::Text(text.into())));
        }
    }

    /// The generation requests (not cancels) received, in order.
    pub fn generations(&self) -> Vec<Value> {
        lock(&self.state.tts_requests)
            .iter()
            .filter(|(_, v)| v.get("cancel").is_none())
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The contexts cancelled, in order.
    pub fn cancels(&self) -> Vec<String> {
        lock(&self.state.tts_requests)
            .iter()
            .filter(|(_, v)| v.get("cancel").is_some())
            .filter_map(|(_, v)| v["context_id"].as_str().map(str::to_owned))
            .collect()
    }

    /// The speech-to-text text commands received.
    pub fn stt_commands(&self) -> Vec<String> {
        lock(&self.state.stt_commands).clone()
    }

    /// Messages of `kind` the fake sent.
    pub fn sent_of(&self, kind: &str) -> Vec<Value> {
        lock(&self.state.sent)
            .iter()
            .filter(|(_, v)| v["type"] == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Everything captured, as the SDK model check reads it.
    pub fn capture(&self) -> Value {
        let sent = lock(&self.state.sent);
        json!({
            "client_tts": lock(&self.state.tts_requests).iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
            "client_stt_commands": self.stt_commands(),
            "stt_queries": *lock(&self.state.stt_queries),
            "server_tts": sent.iter().filter(|(k, _)| *k == "tts").map(|(_, v)| v.clone()).collect::<Vec<_>>(),
            "server_stt": sent.iter().filter(|(k, _)| *k == "stt").map(|(_, v)| v.clone()).collect::<Vec<_>>(),
        })
    }
}

fn refusal(status: u16) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(format!("refused with {status}")));
    *r.status_mut() = StatusCode::from_u16(status).expect("a status");
    r
}

fn is_date(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
}

async fn serve(tcp: tokio::net::TcpStream, state: Arc<State>) {
    // As a service does: small messages go out at once, not held for an ACK.
    let _ = tcp.set_nodelay(true);
    let mut path = String::new();
    let mut query = BTreeMap::new();
    // The shape tungstenite's handshake callback takes.
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        path = request.uri().path().to_owned();
        query = url::form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
        let h = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
        let status = if let Some(s) = lock(&state.refuse_next).pop_front() {
            s
        } else if h("authorization") != Some(&format!("Bearer {}", state.key))
            && h("x-api-key") != Some(state.key.as_str())
        {
            401
        } else if !h("cartesia-version").is_some_and(is_date) {
            400
        } else if path == "/stt/websocket" {
            let ok = query.get("model").is_some_and(|m| !m.is_empty())
                && query
                    .get("encoding")
                    .is_some_and(|e| STT_ENCODINGS.contains(&e.as_str()))
                && query
                    .get("sample_rate")
                    .is_some_and(|r| r.parse::<u32>().is_ok());
            if ok { 0 } else { 400 }
        } else if path == "/tts/websocket" {
            0
        } else {
            404
        };
        if status == 0 {
            lock(&state.versions).push(h("cartesia-version").unwrap_or_default().to_owned());
            Ok(response)
        } else {
            lock(&state.refused).push((path.clone(), status));
            Err(refusal(status))
        }
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
        return;
    };
    if path == "/stt/websocket" {
        state.stt_connections.fetch_add(1, Ordering::SeqCst);
        lock(&state.stt_queries).push(query);
        stt(ws, state).await;
    } else {
        state.tts_connections.fetch_add(1, Ordering::SeqCst);
        tts(ws, state).await;
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// The writer of one connection: what goes out, recorded; `None` drops it.
fn writer(
    ws: Ws,
    kind: &'static str,
    state: Arc<State>,
) -> (mpsc::UnboundedSender<Option<Message>>, Reader) {
    let (mut sink, stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Option<Message>>();
    let dropped = Arc::new(tokio::sync::Notify::new());
    let reader = Reader {
        stream,
        dropped: dropped.clone(),
    };
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let Some(m) = m else {
                // Dropped without a close frame: the reader lets go too.
                dropped.notify_one();
                return;
            };
            if let Message::Text(t) = &m
                && let Ok(v) = serde_json::from_str::<Value>(t.as_str())
            {
                lock(&state.sent).push((kind, v));
            }
            let close = m.is_close();
            if sink.send(m).await.is_err() || close {
                return;
            }
        }
    });
    (tx, reader)
}

/// The reading half of a connection; ends when the connection is dropped.
struct Reader {
    stream: futures_util::stream::SplitStream<Ws>,
    dropped: Arc<tokio::sync::Notify>,
}

impl Reader {
    async fn next(&mut self) -> Option<Message> {
        tokio::select! {
            m = self.stream.next() => m.and_then(Result::ok),
            () = self.dropped.notified() => None,
        }
    }
}

fn text(v: Value) -> Option<Message> {
    Some(Message::Text(v.to_string().into()))
}

async fn stt(ws: Ws, state: Arc<State>) {
    let (tx, mut stream) = writer(ws, "stt", state.clone());
    *lock(&state.stt_now) = Some(tx.clone());
    let request_id = format!("req-{}", fastrand::u32(..));
    let (mut since_final, mut since_partial) = (0usize, 0usize);
    while let Some(m) = stream.next().await {
        match m {
            Message::Binary(b) => {
                state.stt_audio_bytes.fetch_add(b.len(), Ordering::SeqCst);
                since_final += b.len();
                since_partial += b.len();
                // A partial every 300 ms of 16-bit audio at 16 kHz.
                if since_partial >= 9_600 {
                    since_partial = 0;
                    let so_far = lock(&state.heard)
                        .front()
                        .cloned()
                        .unwrap_or_else(|| HEARD.to_owned());
                    let _ = tx.send(text(json!({
                        "type": "transcript", "is_final": false, "text": so_far,
                        "request_id": request_id, "duration": 0.3,
                    })));
                }
            }
            Message::Text(t) => {
                let command = t.as_str().to_owned();
                if command == "finalize" {
                    lock(&state.stt_times).push((Instant::now(), "finalize"));
                }
                lock(&state.stt_commands).push(command.clone());
                match command.as_str() {
                    "finalize" | "close" | "done" => {
                        if since_final > 0 {
                            let said = lock(&state.heard)
                                .pop_front()
                                .unwrap_or_else(|| HEARD.to_owned());
                            // Two final pieces: deltas, spaces kept.
                            let cut = said.find(' ').map_or(said.len(), |i| i + 1);
                            for piece in [&said[..cut], &said[cut..]] {
                                if !piece.is_empty() {
                                    let _ = tx.send(text(json!({
                                        "type": "transcript", "is_final": true, "text": piece,
                                        "request_id": request_id, "duration": 0.5,
                                        "words": [{"words": [piece.trim()], "start": [0.0], "end": [0.4]}],
                                    })));
                                }
                            }
                        }
                        since_final = 0;
                        if command == "finalize" {
                            lock(&state.stt_times).push((Instant::now(), "flush_done"));
                            let _ = tx.send(text(
                                json!({"type": "flush_done", "request_id": request_id}),
                            ));
                        } else {
                            let _ =
                                tx.send(text(json!({"type": "done", "request_id": request_id})));
                            let _ = tx.send(Some(Message::Close(None)));
                            return;
                        }
                    }
                    other => {
                        let _ = tx.send(text(json!({
                            "type": "error", "status_code": 400, "title": "Invalid command",
                            "message": format!("unknown command {other:?}"), "request_id": request_id,
                        })));
                    }
                }
            }
            Message::Close(_) => return,
            _ => {}
        }
    }
}

/// One context's work, in order.
enum Work {
    Speak(String, u64),
    Flush,
    End,
}

struct Context {
    tx: mpsc::UnboundedSender<Work>,
    cancelled: Arc<AtomicBool>,
    ended: bool,
}

fn tts_error(context: Option<&str>, status: u16, title: &str, message: &str) -> Option<Message> {
    let mut v = json!({
        "type": "error", "done": true, "status_code": status, "title": title,
        "message": message, "error_code": format!("e{status}"), "request_id": "r",
    });
    if let Some(c) = context {
        v["context_id"] = c.into();
    }
    text(v)
}

/// What is wrong with a generation request, checked as Cartesia's models
/// define it.
fn invalid(v: &Value) -> Option<String> {
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    if s("context_id").is_none_or(str::is_empty) {
        return Some("context_id is required".into());
    }
    if s("model_id").is_none_or(str::is_empty) {
        return Some("model_id is required".into());
    }
    if s("transcript").is_none() {
        return Some("transcript is required".into());
    }
    let voice = &v["voice"];
    if voice["mode"] != "id" || voice["id"].as_str().is_none_or(str::is_empty) {
        return Some("voice must be {mode: \"id\", id}".into());
    }
    let f = &v["output_format"];
    if f["container"] != "raw"
        || !f["encoding"]
            .as_str()
            .is_some_and(|e| TTS_ENCODINGS.contains(&e))
        || !f["sample_rate"]
            .as_u64()
            .is_some_and(|r| TTS_RATES.contains(&r))
    {
        return Some("output_format must be raw with a known encoding and rate".into());
    }
    for k in ["continue", "flush", "add_timestamps"] {
        if v.get(k).is_some_and(|b| !b.is_boolean()) {
            return Some(format!("{k} must be a boolean"));
        }
    }
    if v.get("max_buffer_delay_ms")
        .is_some_and(|m| m.as_u64().is_none_or(|m| m > 5_000))
    {
        return Some("max_buffer_delay_ms must be 0..=5000".into());
    }
    None
}

async fn tts(ws: Ws, state: Arc<State>) {
    let (tx, mut stream) = writer(ws, "tts", state.clone());
    *lock(&state.tts_now) = Some(tx.clone());
    let mut contexts: HashMap<String, Context> = HashMap::new();
    // Contexts answered with a `fail_next_tts` error: the rest of their
    // requests (a flush the client sent before it read the error) are
    // dropped, so a failure meant for the next generation is not spent on
    // them.
    let mut failed: HashSet<String> = HashSet::new();
    while let Some(m) = stream.next().await {
        let Message::Text(t) = m else {
            if m.is_close() {
                return;
            }
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
            let _ = tx.send(tts_error(None, 400, "Invalid JSON", "not JSON"));
            continue;
        };
        lock(&state.tts_requests).push((Instant::now(), v.clone()));
        let id = v["context_id"].as_str().unwrap_or_default().to_owned();
        if v.get("cancel").is_some() {
            if v["cancel"] != true || id.is_empty() {
                let _ = tx.send(tts_error(
                    None,
                    400,
                    "Invalid request",
                    "cancel needs context_id",
                ));
            } else if let Some(c) = contexts.get_mut(&id) {
                c.cancelled.store(true, Ordering::SeqCst);
                c.ended = true;
            }
            continue;
        }
        if let Some(why) = invalid(&v) {
            let _ = tx.send(tts_error(
                Some(&id).filter(|i| !i.is_empty()).map(|i| i.as_str()),
                400,
                "Invalid request",
                &why,
            ));
            continue;
        }
        if failed.contains(&id) {
            continue;
        }
        if let Some(status) = lock(&state.fail_next).pop_front() {
            failed.insert(id.clone());
            let title = match status {
                401 => "Unauthorized",
                429 => "Too Many Requests",
                _ => "Error",
            };
            let _ = tx.send(tts_error(Some(&id), status, title, "refused by the fake"));
            continue;
        }
        let context = contexts.entry(id.clone()).or_insert_with(|| {
            let (wtx, wrx) = mpsc::unbounded_channel();
            let cancelled = Arc::new(AtomicBool::new(false));
            tokio::spawn(generate(
                id.clone(),
                wrx,
                cancelled.clone(),
                tx.clone(),
                state.clone(),
            ));
            Context {
                tx: wtx,
                cancelled,
                ended: false,
            }
        });
        if context.ended {
            let _ = tx.send(tts_error(
                Some(&id),
                400,
                "Context has closed",
                "no more input on this context",
            ));
            continue;
        }
        let transcript = v["transcript"].as_str().unwrap_or_default();
        let rate = v["output_format"]["sample_rate"].as_u64().unwrap_or(16_000);
        if !transcript.is_empty() {
            let _ = context.tx.send(Work::Speak(transcript.to_owned(), rate));
        }
        if v["flush"] == true {
            let _ = context.tx.send(Work::Flush);
        }
        if v["continue"] != true {
            context.ended = true;
            let _ = context.tx.send(Work::End);
        }
    }
}

/// Speaks one context's work in order, until it is cancelled.
async fn generate(
    id: String,
    mut work: mpsc::UnboundedReceiver<Work>,
    cancelled: Arc<AtomicBool>,
    tx: mpsc::UnboundedSender<Option<Message>>,
    state: Arc<State>,
) {
    let mut flush_id = 1u64;
    while let Some(w) = work.recv().await {
        if cancelled.load(Ordering::SeqCst) {
            return;
        }
        match w {
            Work::Speak(words, rate) => {
                let total = PER_CHAR * words.chars().count() as u32;
                let chunks = (total.as_millis() / 20).max(1);
                let per_chunk = (rate / 50) as usize;
                for n in 0..chunks {
                    if cancelled.load(Ordering::SeqCst) {
                        return;
                    }
                    let samples: Vec<u8> = (0..per_chunk)
                        .flat_map(|i| {
                            {
                                let t = (n as usize * per_chunk + i) as f32 / rate as f32;
                                ((t * 220.0 * std::f32::consts::TAU).sin() * 8_000.0) as i16
                            }
                            .to_le_bytes()
                        })
                        .collect();
                    lock(&state.first_chunks)
                        .entry(id.clone())
                        .or_insert_with(Instant::now);
                    let _ = tx.send(text(json!({
                        "type": "chunk", "context_id": id, "status_code": 206, "done": false,
                        "step_time": 1.0, "flush_id": flush_id,
                        "data": base64::engine::general_purpose::STANDARD.encode(&samples),
                    })));
                    let dropped = {
                        let mut after = lock(&state.drop_after);
                        match after.as_mut() {
                            Some(0) | Some(1) => {
                                *after = None;
                                true
                            }
                            Some(n) => {
                                *n -= 1;
                                false
                            }
                            None => false,
                        }
                    };
                    if dropped {
                        let _ = tx.send(None);
                        return;
                    }
                    let pace = *lock(&state.pace);
                    if !pace.is_zero() {
                        tokio::time::sleep(pace).await;
                    }
                }
            }
            Work::Flush => {
                let _ = tx.send(text(json!({
                    "type": "flush_done", "context_id": id, "status_code": 206,
                    "done": false, "flush_done": true, "flush_id": flush_id,
                })));
                flush_id += 1;
            }
            Work::End => {
                let _ = tx.send(text(json!({
                    "type": "done", "context_id": id, "status_code": 206, "done": true,
                })));
                return;
            }
        }
    }
}
