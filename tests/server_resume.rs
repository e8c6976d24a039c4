#![cfg(all(feature = "server", feature = "testing"))]
//! The server's resume window: a client whose connection drops without a
//! close comes back with `resume` and takes its live session up again; past
//! the window the session is stopped and a resume refused; one connection
//! holds a session at a time; a clean close has no window.

#[path = "support/server.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use voice_backends::server::ServerConfig;
use voice_backends::store::MemoryStore;
use voice_backends::testing::signal;
use voice_backends::{SessionId, registry};

use support::*;

/// A `local` echo backend keeping its sessions in a memory store (so they
/// have resume tokens), behind a server with resume window `window`.
async fn store_server(window: Duration) -> Running {
    let backend = registry().create("local", &echo_config()).await.unwrap();
    backend.set_session_store(Arc::new(MemoryStore::new()));
    backend.start().await.unwrap();
    let config = ServerConfig {
        resume_window: window,
        ..server_config()
    };
    Running::with_backend(backend, config).await
}

/// A session started on a new connection: the client, its id and its
/// resume token.
async fn started(server: &Running, user: &str) -> (Client, String, String) {
    let mut c = Client::connect(server.addr).await;
    let ready = c.start(user).await;
    let id = ready["session_id"].as_str().unwrap().to_owned();
    let token = ready["resume_token"]
        .as_str()
        .expect("a store-kept session has a resume token")
        .to_owned();
    (c, id, token)
}

/// One spoken turn, in real time, up to the reply's first audio; `turn` is
/// the number the session gives it.
async fn speak_turn(c: &mut Client, turn: u64, seed: u64) {
    c.stream(&signal::utterance(
        Duration::from_millis(1000),
        Duration::from_millis(900),
        seed,
    ))
    .await;
    c.wait_for("the turn to end", |v| {
        v["type"] == "turn_ended" && v["turn"] == turn
    })
    .await;
    c.wait_audio().await;
}

/// What a `resume` got: the client and its `ready`, or the close.
async fn resume(server: &Running, id: &str, token: &str) -> Result<(Client, Value), (u16, String)> {
    let mut c = Client::connect(server.addr).await;
    c.send_json(
        json!({"type": "resume", "session_id": id, "resume_token": token, "sample_rate": RATE}),
    )
    .await;
    match c.next().await {
        Got::Json(v) if v["type"] == "ready" => Ok((c, v)),
        Got::Close(code, reason) => Err((code, reason)),
        other => panic!("resume: unexpected {other:?}"),
    }
}

/// A `resume` that may come before the server has noticed the old
/// connection's end (the session still attached to it): tried again until
/// it is not refused for that.
async fn resume_after_drop(
    server: &Running,
    id: &str,
    token: &str,
) -> Result<(Client, Value), (u16, String)> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match resume(server, id, token).await {
            Err((_, reason))
                if reason.contains("attached to another connection")
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

async fn metrics_text(server: &Running) -> String {
    http_get(server.addr, "/metrics").await.2
}

/// Waits until the `/metrics` series `series` reads `value`.
async fn wait_metric(server: &Running, series: &str, value: f64) -> String {
    let waited = timeout(PATIENCE, async {
        loop {
            let text = metrics_text(server).await;
            if metric(&text, series) == value {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    waited.unwrap_or_else(|_| panic!("{series} never read {value}"))
}

/// The client's TCP connection drops mid-reply, without a close frame: the
/// session runs on; a resume within the window takes it up (`resumed`), and
/// its next turn is answered with reply audio on the new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_resumes_its_live_session_within_the_window() {
    let server = store_server(Duration::from_secs(60)).await;
    let (mut c, id, token) = started(&server, "blip").await;
    speak_turn(&mut c, 1, 3).await;
    // Gone without a close frame, the reply still playing.
    drop(c);
    let (mut c, ready) = resume_after_drop(&server, &id, &token)
        .await
        .unwrap_or_else(|e| panic!("the resume within the window was refused: {e:?}"));
    assert_eq!(ready["resumed"], true, "{ready}");
    assert_eq!(ready["session_id"], id.as_str());
    assert_eq!(ready["resume_token"], token.as_str());
    assert_eq!(server.backend.active_session_count(), 1);
    // The same live session: its next turn is its second.
    let before = c.audio_bytes;
    speak_turn(&mut c, 2, 5).await;
    assert!(c.audio_bytes > before, "reply audio on the new connection");
    let text = metrics_text(&server).await;
    assert_eq!(metric(&text, "server_resumes_total"), 1.0);
    assert_eq!(metric(&text, "server_sessions_detached_total"), 1.0);
    assert_eq!(metric(&text, "server_sessions_detached"), 0.0);
    assert_eq!(metric(&text, "server_resume_windows_expired_total"), 0.0);
    c.send_json(json!({"type": "stop"})).await;
    assert_eq!(c.expect_close().await, (1000, "session stopped".into()));
    server.wait_sessions(0).await;
    server.stop().await.unwrap();
}

/// Past the window the detached session is stopped and gone; a resume is
/// refused and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_window_the_session_is_stopped_and_a_resume_refused() {
    let server = store_server(Duration::from_secs(2)).await;
    let (c, id, token) = started(&server, "late").await;
    drop(c);
    wait_metric(&server, "server_sessions_detached", 1.0).await;
    assert_eq!(
        server.backend.active_session_count(),
        1,
        "detached, not stopped"
    );
    let text = wait_metric(&server, "server_resume_windows_expired_total", 1.0).await;
    assert_eq!(metric(&text, "server_sessions_detached"), 0.0);
    server.wait_sessions(0).await;
    assert!(
        server
            .backend
            .get_session(&SessionId::new(id.as_str()))
            .await
            .is_err()
    );
    let (code, reason) = resume(&server, &id, &token).await.map(|_| ()).unwrap_err();
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("resume window"), "{reason}");
    assert_eq!(
        metric(&metrics_text(&server).await, "server_resumes_total"),
        0.0
    );
    server.stop().await.unwrap();
}

/// While one connection holds the session, a second one's resume is
/// refused and the first goes on; once the first has dropped, a resume
/// takes the session up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_holds_a_session_at_a_time() {
    let server = store_server(Duration::from_secs(60)).await;
    let (mut first, id, token) = started(&server, "twice").await;
    let (code, reason) = resume(&server, &id, &token).await.map(|_| ()).unwrap_err();
    assert_eq!(code, 1008, "{reason}");
    assert!(
        reason.contains("attached to another connection"),
        "{reason}"
    );
    speak_turn(&mut first, 1, 7).await;
    drop(first);
    let (mut second, ready) = resume_after_drop(&server, &id, &token).await.unwrap();
    assert_eq!(ready["resumed"], true);
    let (code, _) = resume(&server, &id, &token).await.map(|_| ()).unwrap_err();
    assert_eq!(code, 1008, "the second holder refuses a third");
    speak_turn(&mut second, 2, 9).await;
    server.stop().await.unwrap();
}

/// A clean close (a close frame) and `stop` end the session at once: no
/// window, and nothing left to resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_close_stops_the_session_at_once() {
    // A window longer than the test's patience: a session kept for it would
    // fail the waits below.
    let server = store_server(PATIENCE * 4).await;
    let (mut c, id, token) = started(&server, "polite").await;
    timeout(PATIENCE, c.sink.send(Message::Close(None)))
        .await
        .unwrap()
        .unwrap();
    server.wait_sessions(0).await;
    let (code, reason) = resume(&server, &id, &token).await.map(|_| ()).unwrap_err();
    assert_eq!(code, 1008);
    assert!(
        reason.contains("no such active session") || reason.contains("has ended"),
        "{reason}"
    );

    let (mut c, id, token) = started(&server, "stopper").await;
    c.send_json(json!({"type": "stop"})).await;
    assert_eq!(c.expect_close().await, (1000, "session stopped".into()));
    server.wait_sessions(0).await;
    assert!(resume(&server, &id, &token).await.is_err());
    let text = metrics_text(&server).await;
    assert_eq!(metric(&text, "server_sessions_detached_total"), 0.0);
    server.stop().await.unwrap();
}

/// Shutdown stops a session in its resume window with the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_detached_sessions() {
    let server = store_server(PATIENCE * 4).await;
    let (c, _, _) = started(&server, "parked").await;
    drop(c);
    wait_metric(&server, "server_sessions_detached", 1.0).await;
    let backend = server.backend.clone();
    assert_eq!(backend.active_session_count(), 1);
    server.stop().await.unwrap();
    assert_eq!(backend.active_session_count(), 0);
}
