//! What the server's integration tests share: a `local` echo backend behind
//! a running `Server`, a `tokio-tungstenite` client, hand-written HTTP/1.1
//! requests, and readers of the `/metrics` text.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use voice_backends::server::{Server, ServerConfig};
use voice_backends::{Config, PipelineType, VoiceBackend, registry};

/// How long anything may take on a loaded machine before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(30);
pub const RATE: u32 = 16_000;

pub fn echo_config() -> Config {
    let mut config = Config::new("local");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    config
}

pub fn server_config() -> ServerConfig {
    ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..ServerConfig::default()
    }
}

/// A server running on its own task, with the means to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub backend: Arc<dyn VoiceBackend>,
    pub shutdown: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<voice_backends::Result<()>>,
}

impl Running {
    pub async fn start(config: Config, server: ServerConfig) -> Running {
        let backend = registry().create("local", &config).await.unwrap();
        backend.start().await.unwrap();
        Running::with_backend(backend, server).await
    }

    pub async fn echo() -> Running {
        Running::start(echo_config(), server_config()).await
    }

    pub async fn with_backend(backend: Arc<dyn VoiceBackend>, server: ServerConfig) -> Running {
        let server = Server::bind(backend.clone(), server).await.unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0, "port 0 is replaced by the bound port");
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Running {
            addr,
            backend,
            shutdown: Some(tx),
            task,
        }
    }

    /// Triggers the shutdown and returns what `run` returned.
    pub async fn stop(mut self) -> voice_backends::Result<()> {
        let _ = self.shutdown.take().unwrap().send(());
        timeout(PATIENCE * 2, self.task)
            .await
            .expect("run returns after shutdown")
            .unwrap()
    }

    pub async fn wait_sessions(&self, n: usize) {
        let result = timeout(PATIENCE, async {
            while self.backend.active_session_count() != n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            result.is_ok(),
            "expected {n} sessions, have {}",
            self.backend.active_session_count()
        );
    }
}

/// What the client received.
#[derive(Debug)]
pub enum Got {
    Json(Value),
    Audio(usize),
    Close(u16, String),
    End(String),
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client: a writer, and a reader task forwarding everything.
pub struct Client {
    pub sink: SplitSink<Ws, Message>,
    pub rx: mpsc::UnboundedReceiver<Got>,
    pub reader: JoinHandle<()>,
    /// Every JSON message received so far, in order.
    pub seen: Vec<Value>,
    /// Bytes of binary audio received so far.
    pub audio_bytes: usize,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Client::connect_with(addr, &[]).await.unwrap()
    }

    pub async fn connect_with(
        addr: SocketAddr,
        headers: &[(&'static str, &str)],
    ) -> Result<Client, tungstenite::Error> {
        let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
        for (k, v) in headers {
            request
                .headers_mut()
                .insert(*k, HeaderValue::from_str(v).unwrap());
        }
        let (ws, _) = timeout(PATIENCE, tokio_tungstenite::connect_async(request))
            .await
            .expect("the handshake finishes")?;
        let (sink, mut stream) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let got = match stream.next().await {
                    Some(Ok(Message::Text(t))) => Got::Json(
                        serde_json::from_str(t.as_str())
                            .unwrap_or_else(|e| panic!("server text is JSON ({e}): {t}")),
                    ),
                    Some(Ok(Message::Binary(b))) => Got::Audio(b.len()),
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = frame
                            .map(|f| (u16::from(f.code), f.reason.as_str().to_owned()))
                            .unwrap_or((1005, String::new()));
                        let _ = tx.send(Got::Close(code, reason));
                        // Keep reading so the close answer goes out.
                        while let Some(Ok(_)) = stream.next().await {}
                        return;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => Got::End(e.to_string()),
                    None => Got::End("the stream ended".into()),
                };
                let end = matches!(got, Got::End(_));
                if tx.send(got).is_err() || end {
                    return;
                }
            }
        });
        Ok(Client {
            sink,
            rx,
            reader,
            seen: Vec::new(),
            audio_bytes: 0,
        })
    }

    pub async fn send(&mut self, message: Message) -> Result<(), tungstenite::Error> {
        timeout(PATIENCE, self.sink.send(message))
            .await
            .expect("sending does not hang")
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send(Message::text(value.to_string())).await.unwrap();
    }

    pub async fn send_raw_text(&mut self, text: &str) {
        self.send(Message::text(text)).await.unwrap();
    }

    pub async fn send_samples(&mut self, samples: &[i16]) {
        let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        self.send(Message::binary(bytes)).await.unwrap();
    }

    /// Sends `samples` as 20 ms frames in real time.
    pub async fn stream(&mut self, samples: &[i16]) {
        for chunk in samples.chunks((RATE / 50) as usize) {
            self.send_samples(chunk).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn start(&mut self, user: &str) -> Value {
        self.send_json(json!({"type": "start", "user_id": user, "sample_rate": RATE}))
            .await;
        self.wait_for("ready", |v| v["type"] == "ready").await
    }

    pub async fn next(&mut self) -> Got {
        let got = timeout(PATIENCE, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("nothing received in {PATIENCE:?}; saw {:?}", self.seen))
            .unwrap_or(Got::End("the reader stopped".into()));
        match &got {
            Got::Json(v) => self.seen.push(v.clone()),
            Got::Audio(n) => self.audio_bytes += n,
            _ => {}
        }
        got
    }

    /// Reads until a JSON message satisfies `pred`.
    pub async fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            match self.next().await {
                Got::Json(v) if pred(&v) => return v,
                Got::Json(_) | Got::Audio(_) => {}
                other => panic!("waiting for {what}, got {other:?}; saw {:?}", self.seen),
            }
        }
    }

    /// Reads until a binary message arrives.
    pub async fn wait_audio(&mut self) {
        loop {
            match self.next().await {
                Got::Audio(_) => return,
                Got::Json(_) => {}
                other => panic!("waiting for audio, got {other:?}; saw {:?}", self.seen),
            }
        }
    }

    /// Reads until the server's close frame.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.next().await {
                Got::Close(code, reason) => return (code, reason),
                Got::Json(_) | Got::Audio(_) => {}
                Got::End(e) => panic!("the connection ended without a close frame: {e}"),
            }
        }
    }

    pub fn saw(&self, pred: impl Fn(&Value) -> bool) -> bool {
        self.seen.iter().any(pred)
    }
}

pub fn is_state(v: &Value, from: &str, to: &str) -> bool {
    v["type"] == "state" && v["from"] == from && v["to"] == to
}

/// A plain HTTP/1.1 GET: the status and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("the response arrives")
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// The value of one series (`name{labels}`) in a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            (s == series).then(|| v.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

/// A session on the server still works: start, a text turn (the echo backend
/// has no agent, so an `agent_error` event comes back), stop, close 1000.
pub async fn assert_healthy_session(addr: SocketAddr, user: &str) {
    let mut c = Client::connect(addr).await;
    healthy_session(&mut c, user).await;
}

pub async fn healthy_session(c: &mut Client, user: &str) {
    c.start(user).await;
    c.send_json(json!({"type": "text", "text": "still there?"}))
        .await;
    c.wait_for("the agent error", |v| {
        v["type"] == "error" && v["code"] == "agent_error"
    })
    .await;
    c.send_json(json!({"type": "stop"})).await;
    assert_eq!(c.expect_close().await, (1000, "session stopped".into()));
    assert!(c.saw(|v| v["type"] == "closed"), "{:?}", c.seen);
}

/// Opens a connection, lets `misbehave` break the rules, and checks the close
/// code; then a healthy session on the same server.
pub async fn refused(
    server: &Running,
    code: u16,
    reason_has: &str,
    misbehave: impl AsyncFnOnce(&mut Client),
) -> String {
    let mut c = Client::connect(server.addr).await;
    misbehave(&mut c).await;
    let (got, reason) = c.expect_close().await;
    assert_eq!(got, code, "close code, reason {reason:?}");
    assert!(
        reason.contains(reason_has),
        "the reason {reason:?} says {reason_has:?}"
    );
    drop(c);
    assert_healthy_session(server.addr, "healthy").await;
    reason
}

/// The second half of [`healthy_session`], on a started session.
pub async fn healthy_session_started(c: &mut Client) {
    c.send_json(json!({"type": "text", "text": "still there?"}))
        .await;
    c.wait_for("the agent error", |v| {
        v["type"] == "error" && v["code"] == "agent_error"
    })
    .await;
    c.send_json(json!({"type": "stop"})).await;
    assert_eq!(c.expect_close().await, (1000, "session stopped".into()));
}

/// A connection attempt refused before the upgrade: the HTTP status and body.
pub async fn http_refusal(addr: SocketAddr, headers: &[(&'static str, &str)]) -> (u16, String) {
    let err = Client::connect_with(addr, headers)
        .await
        .err()
        .expect("the connection is refused");
    let tungstenite::Error::Http(response) = err else {
        panic!("expected an HTTP refusal, got {err}")
    };
    let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
    (response.status().as_u16(), body)
}

/// A frame written as-is, to break WebSocket framing on purpose.
pub fn raw_frame(data: &[u8], op: tungstenite::protocol::frame::coding::Data) -> Message {
    use tungstenite::protocol::frame::{Frame, coding::OpCode};
    Message::Frame(Frame::message(data.to_vec(), OpCode::Data(op), true))
}
