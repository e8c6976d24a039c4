//! A fake Vapi on 127.0.0.1, built from Vapi's documented protocol: the
//! REST API's `POST /call` (bearer key, the documented body, a `Call` with
//! `transport.websocketCallUrl` and `monitor.controlUrl`), the call's
//! WebSocket transport on the same host (raw audio both ways, JSON client
//! messages from Vapi, `say` / `end-call` from the client), the control URL,
//! and an assistant: it hears the user's turns in the audio (energy, counted
//! in samples, not wall time), calls the call's custom LLM the way Vapi's
//! OpenAI client does (`POST {url}/chat/completions`, `stream: true`,
//! `Authorization: Bearer <credential>`) and speaks what streams back as it
//! comes; without a custom LLM its own model answers `I heard: <words>`.
//!
//! Everything it sends and is sent is kept for the tests, which also check
//! it against the official SDK's models.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message as Ws, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An answer the fake gives to the next `POST /call`s instead of a call.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<u64>,
}

/// What the test tells a call's socket to do.
#[derive(Debug)]
pub enum Command {
    /// Send this message.
    Send(Ws),
    /// Drop the connection without a close frame (the call goes on).
    Drop,
    /// Hang up: `status-update` ended with this reason, then close.
    HangUp(String),
}

/// One custom-LLM exchange, as the fake saw it.
#[derive(Clone, Debug, Default)]
pub struct LlmExchange {
    /// The request body sent.
    pub request: Value,
    /// The HTTP status.
    pub status: u16,
    /// The `Content-Type` answered.
    pub content_type: String,
    /// The `data:` payloads of the answer, in order (`[DONE]` included).
    pub events: Vec<String>,
    /// The text the chunks carried.
    pub text: String,
    /// Whether the stream ended with `[DONE]`.
    pub done: bool,
}

/// One call.
pub struct Call {
    pub id: String,
    pub body: Value,
    pub custom_llm: Option<(String, String, String)>,
    pub format: String,
    pub rate: u32,
    pub connections: AtomicUsize,
    pub audio_bytes: AtomicUsize,
    pub ended: Mutex<Option<String>>,
    /// Text messages the client sent on the socket, and to the control URL.
    pub client_messages: Mutex<Vec<Value>>,
    pub control_messages: Mutex<Vec<Value>>,
    /// JSON messages the fake sent on the socket.
    pub sent: Mutex<Vec<Value>>,
    pub exchanges: Mutex<Vec<LlmExchange>>,
    /// The conversation as Vapi keeps it (OpenAI messages).
    conversation: Mutex<Vec<Value>>,
    socket: Mutex<Option<mpsc::UnboundedSender<Command>>>,
    turns: AtomicUsize,
    /// Set while the assistant speaks; cleared to cut it.
    speaking: Arc<AtomicBool>,
    speech: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Call {
    pub fn ended(&self) -> Option<String> {
        lock(&self.ended).clone()
    }

    pub fn exchanges(&self) -> Vec<LlmExchange> {
        lock(&self.exchanges).clone()
    }

    pub fn client_messages(&self) -> Vec<Value> {
        lock(&self.client_messages).clone()
    }

    pub fn sent(&self) -> Vec<Value> {
        lock(&self.sent).clone()
    }

    /// Tells the call's socket, if one is open, to do `command`.
    pub fn command(&self, command: Command) -> bool {
        lock(&self.socket)
            .as_ref()
            .is_some_and(|tx| tx.send(command).is_ok())
    }
}

#[derive(Default)]
struct Shared {
    key: String,
    base: String,
    refusals: Mutex<VecDeque<Refusal>>,
    posts: AtomicUsize,
    bodies: Mutex<Vec<Value>>,
    calls: Mutex<HashMap<String, Arc<Call>>>,
    order: Mutex<Vec<Arc<Call>>>,
    next: AtomicUsize,
    /// When set, calls point their socket here instead of at the fake.
    socket_override: Mutex<Option<String>>,
    http: Option<reqwest::Client>,
}

/// The fake; it serves until dropped.
pub struct FakeVapi {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeVapi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeVapi {
    /// Starts a fake whose private key is `key`, on the current runtime.
    pub async fn start(key: &str) -> FakeVapi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            key: key.to_owned(),
            base: format!("http://{addr}"),
            http: Some(reqwest::Client::new()),
            ..Shared::default()
        });
        let app = Router::new()
            .route("/call", post(create_call))
            .route("/{id}/transport", get(transport))
            .route("/{id}/control", post(control))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeVapi { shared, addr, task }
    }

    /// The API's base URL.
    pub fn base_url(&self) -> String {
        self.shared.base.clone()
    }

    /// The next `POST /call`s get these answers, in order.
    pub fn refuse(&self, refusal: Refusal) {
        lock(&self.shared.refusals).push_back(refusal);
    }

    /// Calls point their socket at `url` (another fake service) from now on.
    pub fn set_socket_url(&self, url: Option<String>) {
        *lock(&self.shared.socket_override) = url;
    }

    /// `POST /call`s received, refused ones included.
    pub fn posts(&self) -> usize {
        self.shared.posts.load(Ordering::SeqCst)
    }

    /// Every `POST /call` body received, in order.
    pub fn bodies(&self) -> Vec<Value> {
        lock(&self.shared.bodies).clone()
    }

    /// The calls created, in order.
    pub fn calls(&self) -> Vec<Arc<Call>> {
        lock(&self.shared.order).clone()
    }

    /// The call `id`.
    pub fn call(&self, id: &str) -> Option<Arc<Call>> {
        lock(&self.shared.calls).get(id).cloned()
    }
}

fn vapi_error(status: StatusCode, messages: Vec<String>) -> Response {
    let reason = status.canonical_reason().unwrap_or("Error");
    (
        status,
        axum::Json(json!({ "message": messages, "error": reason, "statusCode": status.as_u16() })),
    )
        .into_response()
}

/// What is wrong with a `POST /call` body for a WebSocket call, per Vapi's
/// documentation.
fn body_problems(body: &Value) -> Vec<String> {
    let mut wrong = Vec::new();
    let Some(object) = body.as_object() else {
        return vec!["the body must be an object".into()];
    };
    match (object.get("assistantId"), object.get("assistant")) {
        (Some(Value::String(_)), None) | (None, Some(Value::Object(_))) => {}
        _ => wrong.push("exactly one of assistantId (a string) and assistant (an object)".into()),
    }
    for phone in ["phoneNumber", "phoneNumberId", "customer"] {
        if object.contains_key(phone) {
            wrong.push(format!(
                "{phone} is not permitted with the websocket transport"
            ));
        }
    }
    let transport = object.get("transport");
    if transport.and_then(|t| t.get("provider")) != Some(&json!("vapi.websocket")) {
        wrong.push("transport.provider must be vapi.websocket".into());
    }
    match transport.and_then(|t| t.get("audioFormat")) {
        Some(f) => {
            if !matches!(
                f.get("format").and_then(Value::as_str),
                Some("pcm_s16le" | "mulaw")
            ) {
                wrong.push("transport.audioFormat.format must be pcm_s16le or mulaw".into());
            }
            if f.get("container") != Some(&json!("raw")) {
                wrong.push("transport.audioFormat.container must be raw".into());
            }
            if !f.get("sampleRate").is_some_and(Value::is_u64) {
                wrong.push("transport.audioFormat.sampleRate must be an integer".into());
            }
        }
        None => wrong.push("transport.audioFormat is missing".into()),
    }
    if let Some(model) = body.pointer("/assistantOverrides/model")
        && model.get("provider") == Some(&json!("custom-llm"))
    {
        if !model.get("url").is_some_and(Value::is_string) {
            wrong.push("model.url must be a string".into());
        }
        if !model.get("model").is_some_and(Value::is_string) {
            wrong.push("model.model must be a string".into());
        }
    }
    wrong
}

async fn create_call(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    shared.posts.fetch_add(1, Ordering::SeqCst);
    let given = headers.get("authorization").and_then(|v| v.to_str().ok());
    if given != Some(&format!("Bearer {}", shared.key)) {
        return vapi_error(
            StatusCode::UNAUTHORIZED,
            vec!["Invalid Key. Hot tip, you may be using the private key instead of the public key, or vice versa.".into()],
        );
    }
    if let Some(refusal) = lock(&shared.refusals).pop_front() {
        let mut response = (
            StatusCode::from_u16(refusal.status).unwrap(),
            axum::Json(refusal.body),
        )
            .into_response();
        if let Some(secs) = refusal.retry_after {
            response
                .headers_mut()
                .insert("retry-after", secs.to_string().parse().unwrap());
        }
        return response;
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return vapi_error(StatusCode::BAD_REQUEST, vec!["the body is not JSON".into()]);
    };
    lock(&shared.bodies).push(body.clone());
    let wrong = body_problems(&body);
    if !wrong.is_empty() {
        return vapi_error(StatusCode::BAD_REQUEST, wrong);
    }
    let n = shared.next.fetch_add(1, Ordering::SeqCst);
    let id = format!("7420f27a-30fd-4f49-a995-{n:012}");
    let overrides = body.get("assistantOverrides");
    let custom_llm = overrides
        .and_then(|o| o.get("model"))
        .filter(|m| m.get("provider") == Some(&json!("custom-llm")))
        .map(|m| {
            let key = overrides
                .and_then(|o| o.get("credentials"))
                .and_then(Value::as_array)
                .and_then(|list| {
                    list.iter()
                        .find(|c| c.get("provider") == Some(&json!("custom-llm")))
                })
                .and_then(|c| c.get("apiKey"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            (
                m["url"].as_str().unwrap_or_default().to_owned(),
                m["model"].as_str().unwrap_or_default().to_owned(),
                key,
            )
        });
    let system: Vec<Value> = overrides
        .and_then(|o| o.pointer("/model/messages"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let format = &body["transport"]["audioFormat"];
    let call = Arc::new(Call {
        id: id.clone(),
        body: body.clone(),
        custom_llm,
        format: format["format"].as_str().unwrap_or_default().to_owned(),
        rate: format["sampleRate"].as_u64().unwrap_or(16_000) as u32,
        connections: AtomicUsize::new(0),
        audio_bytes: AtomicUsize::new(0),
        ended: Mutex::new(None),
        client_messages: Mutex::default(),
        control_messages: Mutex::default(),
        sent: Mutex::default(),
        exchanges: Mutex::default(),
        conversation: Mutex::new(system),
        socket: Mutex::new(None),
        turns: AtomicUsize::new(0),
        speaking: Arc::new(AtomicBool::new(false)),
        speech: Mutex::new(None),
    });
    lock(&shared.calls).insert(id.clone(), call.clone());
    lock(&shared.order).push(call);
    let host = shared.base.trim_start_matches("http://");
    let socket = lock(&shared.socket_override)
        .clone()
        .unwrap_or_else(|| format!("ws://{host}/{id}/transport"));
    let mut answer = json!({
        "id": id,
        "orgId": "eb166faa-7145-46ef-8044-589b47ae3b56",
        "type": "vapi.websocketCall",
        "createdAt": "2024-09-10T11:14:12.339Z",
        "updatedAt": "2024-09-10T11:14:12.339Z",
        "cost": 0,
        "status": "queued",
        "transport": { "provider": "vapi.websocket", "websocketCallUrl": socket },
    });
    if let Some(a) = body.get("assistantId") {
        answer["assistantId"] = a.clone();
    }
    if body.pointer("/assistantOverrides/monitorPlan/controlEnabled") == Some(&json!(true)) {
        answer["monitor"] = json!({
            "listenUrl": format!("ws://{host}/{id}/listen"),
            "controlUrl": format!("{}/{id}/control", shared.base),
        });
    }
    (StatusCode::CREATED, axum::Json(answer)).into_response()
}

async fn control(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    axum::Json(message): axum::Json<Value>,
) -> Response {
    let Some(call) = lock(&shared.calls).get(&id).cloned() else {
        return vapi_error(StatusCode::NOT_FOUND, vec!["no such call".into()]);
    };
    lock(&call.control_messages).push(message.clone());
    if message.get("type") == Some(&json!("end-call")) {
        lock(&call.ended).get_or_insert_with(|| "control-end-call".into());
        call.command(Command::HangUp("assistant-ended-call".into()));
    }
    StatusCode::OK.into_response()
}

async fn transport(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let Some(call) = lock(&shared.calls).get(&id).cloned() else {
        return vapi_error(StatusCode::NOT_FOUND, vec!["no such call".into()]);
    };
    if call.ended().is_some() {
        return vapi_error(StatusCode::NOT_FOUND, vec!["the call has ended".into()]);
    }
    let http = shared.http.clone().unwrap();
    upgrade.on_upgrade(move |socket| run_socket(socket, call, http))
}

/// Energy of 16-bit samples decoded from the call's format.
fn samples(format: &str, bytes: &[u8]) -> Vec<i16> {
    match format {
        "mulaw" => bytes.iter().map(|b| mulaw_decode(*b)).collect(),
        _ => bytes
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect(),
    }
}

fn mulaw_decode(byte: u8) -> i16 {
    let b = !byte;
    let sign = b & 0x80;
    let exponent = (b >> 4) & 0x07;
    let mantissa = b & 0x0f;
    let magnitude = ((i32::from(mantissa) << 3) + 0x84) << exponent;
    let value = magnitude - 0x84;
    (if sign != 0 { -value } else { value }) as i16
}

fn mulaw_encode(sample: i16) -> u8 {
    let mut s = i32::from(sample);
    let sign = if s < 0 { 0x80 } else { 0 };
    if s < 0 {
        s = -s;
    }
    s = (s + 0x84).min(0x7fff);
    let mut exponent = 7;
    while exponent > 0 && s & (0x4000 >> (7 - exponent)) == 0 {
        exponent -= 1;
    }
    let mantissa = (s >> (exponent + 3)) & 0x0f;
    !(sign | (exponent << 4) | mantissa) as u8
}

/// 20 ms of a tone in the call's format.
fn tone_frame(format: &str, rate: u32, n: usize) -> Vec<u8> {
    let count = rate as usize / 50;
    let pcm: Vec<i16> = (0..count)
        .map(|i| {
            let t = (n * count + i) as f32 / rate as f32;
            (f32::sin(t * 2.0 * std::f32::consts::PI * 220.0) * 8000.0) as i16
        })
        .collect();
    match format {
        "mulaw" => pcm.into_iter().map(mulaw_encode).collect(),
        _ => pcm.iter().flat_map(|s| s.to_le_bytes()).collect(),
    }
}

/// The fake transcriber's turn detection, in samples.
struct Ear {
    rate: u32,
    speech: usize,
    silence: usize,
}

impl Ear {
    /// Hears one chunk; `Some(true)` when speech starts, `Some(false)` when
    /// an utterance ends.
    fn hear(&mut self, pcm: &[i16]) -> Option<bool> {
        let window = (self.rate / 50) as usize;
        let mut said = None;
        for chunk in pcm.chunks(window.max(1)) {
            let energy =
                chunk.iter().map(|s| f64::from(*s).powi(2)).sum::<f64>() / chunk.len() as f64;
            if energy.sqrt() > 300.0 {
                if self.speech == 0 {
                    said = Some(true);
                }
                self.speech += chunk.len();
                self.silence = 0;
            } else if self.speech > 0 {
                self.silence += chunk.len();
                // 400 ms of silence after 200 ms of speech ends a turn.
                if self.silence >= self.rate as usize * 2 / 5 {
                    let long_enough = self.speech >= self.rate as usize / 5;
                    self.speech = 0;
                    self.silence = 0;
                    if long_enough {
                        said = Some(false);
                    }
                }
            }
        }
        said
    }
}

type Out = mpsc::UnboundedSender<Ws>;

fn send_json(call: &Call, out: &Out, value: Value) {
    lock(&call.sent).push(value.clone());
    let _ = out.send(Ws::Text(value.to_string().into()));
}

async fn run_socket(socket: WebSocket, call: Arc<Call>, http: reqwest::Client) {
    use futures_util::{SinkExt, StreamExt};
    call.connections.fetch_add(1, Ordering::SeqCst);
    let (mut sink, mut stream) = socket.split();
    let (commands_tx, mut commands) = mpsc::unbounded_channel();
    *lock(&call.socket) = Some(commands_tx);
    let (out, mut out_rx) = mpsc::unbounded_channel::<Ws>();
    send_json(
        &call,
        &out,
        json!({ "type": "status-update", "status": "in-progress" }),
    );
    let mut ear = Ear {
        rate: call.rate,
        speech: 0,
        silence: 0,
    };
    loop {
        tokio::select! {
            Some(message) = out_rx.recv() => {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
            command = commands.recv() => match command {
                Some(Command::Send(m)) => {
                    if sink.send(m).await.is_err() {
                        break;
                    }
                }
                Some(Command::Drop) | None => {
                    stop_speaking(&call);
                    *lock(&call.socket) = None;
                    return;
                }
                Some(Command::HangUp(reason)) => {
                    stop_speaking(&call);
                    lock(&call.ended).get_or_insert_with(|| reason.clone());
                    let ended = json!({ "type": "status-update", "status": "ended", "endedReason": reason });
                    lock(&call.sent).push(ended.clone());
                    let _ = sink.send(Ws::Text(ended.to_string().into())).await;
                    let _ = sink.close().await;
                    break;
                }
            },
            message = stream.next() => {
                let Some(Ok(message)) = message else { break };
                match message {
                    Ws::Binary(bytes) => {
                        call.audio_bytes.fetch_add(bytes.len(), Ordering::SeqCst);
                        match ear.hear(&samples(&call.format, &bytes)) {
                            Some(true) => {
                                send_json(&call, &out, json!({ "type": "speech-update", "status": "started", "role": "user", "turn": call.turns.load(Ordering::SeqCst) }));
                                if call.speaking.load(Ordering::SeqCst) {
                                    stop_speaking(&call);
                                    send_json(&call, &out, json!({ "type": "user-interrupted" }));
                                }
                            }
                            Some(false) => {
                                let n = call.turns.fetch_add(1, Ordering::SeqCst) + 1;
                                let words = format!("words number {n}");
                                send_json(&call, &out, json!({ "type": "transcript", "role": "user", "transcriptType": "partial", "transcript": "words" }));
                                send_json(&call, &out, json!({ "type": "transcript", "role": "user", "transcriptType": "final", "transcript": words }));
                                send_json(&call, &out, json!({ "type": "speech-update", "status": "stopped", "role": "user", "turn": n }));
                                answer(&call, &out, &http, words);
                            }
                            None => {}
                        }
                    }
                    Ws::Text(text) => {
                        let Ok(value) = serde_json::from_str::<Value>(&text) else { continue };
                        lock(&call.client_messages).push(value.clone());
                        match value.get("type").and_then(Value::as_str) {
                            Some("say") => {
                                let content = value["content"].as_str().unwrap_or_default().to_owned();
                                speak_text(&call, &out, content);
                            }
                            Some("end-call" | "hangup") => {
                                stop_speaking(&call);
                                lock(&call.ended).get_or_insert_with(|| "customer-ended-call".into());
                                let ended = json!({ "type": "status-update", "status": "ended", "endedReason": "customer-ended-call" });
                                lock(&call.sent).push(ended.clone());
                                let _ = sink.send(Ws::Text(ended.to_string().into())).await;
                                let _ = sink.close().await;
                                break;
                            }
                            _ => {}
                        }
                    }
                    Ws::Close(_) => break,
                    _ => {}
                }
            }
        }
    }
    stop_speaking(&call);
    *lock(&call.socket) = None;
}

fn stop_speaking(call: &Call) {
    call.speaking.store(false, Ordering::SeqCst);
    if let Some(task) = lock(&call.speech).take() {
        task.abort();
    }
}

/// The assistant speaks `text` (the `say` path): 300 ms of tone per word.
fn speak_text(call: &Arc<Call>, out: &Out, text: String) {
    stop_speaking(call);
    let (call2, out) = (call.clone(), out.clone());
    call.speaking.store(true, Ordering::SeqCst);
    let task = tokio::spawn(async move {
        send_json(
            &call2,
            &out,
            json!({ "type": "speech-update", "status": "started", "role": "assistant" }),
        );
        let words = text.split_whitespace().count().max(1);
        play(&call2, &out, words * 15).await;
        finish_speaking(&call2, &out, &text);
    });
    *lock(&call.speech) = Some(task);
}

/// Sends `frames` 20 ms frames of tone, paced at four times real time.
async fn play(call: &Call, out: &Out, frames: usize) {
    for n in 0..frames {
        if !call.speaking.load(Ordering::SeqCst) {
            return;
        }
        let _ = out.send(Ws::Binary(tone_frame(&call.format, call.rate, n).into()));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn finish_speaking(call: &Call, out: &Out, text: &str) {
    call.speaking.store(false, Ordering::SeqCst);
    send_json(
        call,
        out,
        json!({ "type": "transcript", "role": "assistant", "transcriptType": "final", "transcript": text }),
    );
    send_json(
        call,
        out,
        json!({ "type": "speech-update", "status": "stopped", "role": "assistant" }),
    );
    lock(&call.conversation).push(json!({ "role": "assistant", "content": text }));
    let conversation = lock(&call.conversation).clone();
    send_json(
        call,
        out,
        json!({ "type": "conversation-update", "messages": [], "messagesOpenAIFormatted": conversation }),
    );
}

/// The assistant answers the user's turn: through the custom LLM when the
/// call has one, else with its own model.
fn answer(call: &Arc<Call>, out: &Out, http: &reqwest::Client, words: String) {
    lock(&call.conversation).push(json!({ "role": "user", "content": words }));
    let Some((url, model, key)) = call.custom_llm.clone() else {
        speak_text(call, out, format!("I heard: {words}"));
        return;
    };
    stop_speaking(call);
    let (call2, out, http) = (call.clone(), out.clone(), http.clone());
    call.speaking.store(true, Ordering::SeqCst);
    let task = tokio::spawn(async move {
        let messages = lock(&call2.conversation).clone();
        let request = json!({
            "model": model,
            "messages": messages,
            "temperature": 0,
            "stream": true,
            "max_tokens": 250,
            "call": { "id": call2.id, "type": "vapi.websocketCall" },
            "metadata": {},
        });
        let index = {
            let mut all = lock(&call2.exchanges);
            all.push(LlmExchange {
                request: request.clone(),
                ..LlmExchange::default()
            });
            all.len() - 1
        };
        let url = format!("{}/chat/completions", url.trim_end_matches('/'));
        let sent = http.post(url).bearer_auth(&key).json(&request).send().await;
        let mut response = match sent {
            Ok(r) => r,
            Err(_) => {
                call2.speaking.store(false, Ordering::SeqCst);
                return;
            }
        };
        {
            let mut all = lock(&call2.exchanges);
            all[index].status = response.status().as_u16();
            all[index].content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
        }
        if !response.status().is_success() {
            call2.speaking.store(false, Ordering::SeqCst);
            return;
        }
        send_json(
            &call2,
            &out,
            json!({ "type": "speech-update", "status": "started", "role": "assistant" }),
        );
        let mut buffer = String::new();
        let mut text = String::new();
        let mut frame = 0;
        while let Ok(Some(bytes)) = response.chunk().await {
            buffer.push_str(&String::from_utf8_lossy(&bytes));
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                let mut pieces = Vec::new();
                {
                    let mut all = lock(&call2.exchanges);
                    for line in event.lines() {
                        let Some(data) = line.strip_prefix("data: ") else {
                            continue;
                        };
                        all[index].events.push(data.to_owned());
                        if data == "[DONE]" {
                            all[index].done = true;
                            continue;
                        }
                        let piece = serde_json::from_str::<Value>(data)
                            .ok()
                            .and_then(|v| {
                                v.pointer("/choices/0/delta/content")
                                    .and_then(Value::as_str)
                                    .map(str::to_owned)
                            })
                            .unwrap_or_default();
                        all[index].text.push_str(&piece);
                        pieces.push(piece);
                    }
                }
                for piece in pieces.into_iter().filter(|p| !p.is_empty()) {
                    text.push_str(&piece);
                    // Speaks each piece as it comes: 300 ms of tone a word.
                    let words = piece.split_whitespace().count().max(1);
                    for _ in 0..words * 15 {
                        if !call2.speaking.load(Ordering::SeqCst) {
                            return;
                        }
                        let _ = out.send(Ws::Binary(
                            tone_frame(&call2.format, call2.rate, frame).into(),
                        ));
                        frame += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
        if call2.speaking.load(Ordering::SeqCst) {
            finish_speaking(&call2, &out, &text);
        }
    });
    *lock(&call.speech) = Some(task);
}
