//! What the persistence tests share: `serve` as a child process (killed
//! with SIGKILL, as a crash), and a WebSocket client of its protocol.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// A running `serve`, killed (SIGKILL) when dropped.
pub struct Serve {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr: mpsc::Receiver<String>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// `kill -9`: no graceful anything.
    pub fn crash(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().unwrap();
    }
}

/// Starts `bin serve --listen ADDR` with `extra` arguments and waits for its
/// `listening on` line.
pub fn start_serve(bin: &str, listen: &str, extra: &[&str]) -> Serve {
    let mut child = Command::new(bin)
        .args(["serve", "--listen", listen])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let mut err = child.stderr.take().unwrap();
    let (err_tx, err_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        let _ = err_tx.send(text);
    });
    let out = child.stdout.take().unwrap();
    let (line_tx, line_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = line_tx.send(line);
        }
        for _ in lines {}
    });
    let mut serve = Serve {
        child,
        addr: "127.0.0.1:1".parse().unwrap(),
        stderr: err_rx,
    };
    let Ok(line) = line_rx.recv_timeout(Duration::from_secs(60)) else {
        let _ = serve.child.kill();
        let log = serve.stderr.recv_timeout(Duration::from_secs(5));
        panic!("no `listening on` line; stderr: {log:?}");
    };
    let addr = line
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    serve.addr = addr.parse().unwrap();
    serve
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket and sends `first`; the server's `ready`, or the code
/// and reason of the close that refused it.
pub async fn open(addr: SocketAddr, first: Value) -> Result<(Ws, Value), (u16, String)> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("connects");
    ws.send(Message::Text(first.to_string().into()))
        .await
        .unwrap();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("an answer in time");
        match message {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "ready" {
                    return Ok((ws, v));
                }
            }
            Some(Ok(Message::Close(Some(frame)))) => {
                return Err((u16::from(frame.code), frame.reason.to_string()));
            }
            Some(Ok(_)) => {}
            other => panic!("connection ended without a close frame: {other:?}"),
        }
    }
}

/// Starts a session of `user` with `metadata`.
pub async fn start(addr: SocketAddr, user: &str, metadata: Value) -> (Ws, Value) {
    open(
        addr,
        json!({"type": "start", "user_id": user, "sample_rate": 16000, "metadata": metadata}),
    )
    .await
    .unwrap_or_else(|e| panic!("start refused: {e:?}"))
}

/// Resumes session `id` with `token`.
pub async fn resume(addr: SocketAddr, id: &str, token: &str) -> Result<(Ws, Value), (u16, String)> {
    open(
        addr,
        json!({"type": "resume", "session_id": id, "resume_token": token, "sample_rate": 16000}),
    )
    .await
}

/// Sends `text` as a turn; the agent's answer.
pub async fn say(ws: &mut Ws, text: &str) -> String {
    ws.send(Message::Text(
        json!({"type": "text", "text": text}).to_string().into(),
    ))
    .await
    .unwrap();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("an answer in time");
        match message {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "agent_text" {
                    return v["text"].as_str().unwrap().to_owned();
                }
                assert_ne!(v["type"], "error", "{v}");
            }
            Some(Ok(_)) => {}
            other => panic!("no answer: {other:?}"),
        }
    }
}

/// Sends `stop` and waits for the session to close.
pub async fn stop(mut ws: Ws) {
    ws.send(Message::Text(json!({"type": "stop"}).to_string().into()))
        .await
        .unwrap();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
        if let Message::Close(_) = m {
            break;
        }
    }
}
