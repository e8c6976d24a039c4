#![cfg(all(feature = "server", feature = "testing"))]
//! The HTTP + WebSocket server over real sockets: a `local` echo backend
//! behind `Server`, driven by a `tokio-tungstenite` client and hand-written
//! HTTP/1.1 requests.

#[path = "support/server.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::{self, Message};
use voice_backends::server::ServerConfig;
use voice_backends::testing::signal;
use voice_backends::{
    AuthHook, BackendError, Config, ConnectionState, ErrorCode, Hooks, Operation, Principal,
    Secret, VoiceBackend, registry,
};

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoken_turn_end_to_end_with_barge_in_metrics_and_health() {
    let server = Running::echo().await;
    let mut c = Client::connect(server.addr).await;
    let ready = c.start("alice").await;
    assert_eq!(ready["sample_rate"], RATE);
    assert_eq!(ready["encoding"], "pcm_s16le");
    assert_eq!(ready["channels"], 1);
    let session_id = ready["session_id"].as_str().unwrap().to_owned();
    assert!(!session_id.is_empty());
    assert_eq!(server.backend.active_session_count(), 1);

    // Turn 1, in real time.
    let speech = Duration::from_millis(1200);
    let pause = Duration::from_millis(900);
    c.stream(&signal::utterance(speech, pause, 7)).await;
    c.wait_for("turn 1 to end", |v| {
        v["type"] == "turn_ended" && v["turn"] == 1
    })
    .await;
    let latency = c.wait_for("latency", |v| v["type"] == "latency").await;
    assert_eq!(latency["turn"], 1);
    assert!(
        latency["first_audio_ms"].as_f64().unwrap() >= 0.0,
        "{latency}"
    );
    c.wait_for("the reply to end", |v| is_state(v, "speaking", "listening"))
        .await;
    assert!(c.saw(|v| v["type"] == "speech_started"), "{:?}", c.seen);
    assert!(c.saw(|v| is_state(v, "idle", "listening")), "{:?}", c.seen);
    assert!(
        c.saw(|v| is_state(v, "listening", "processing")),
        "{:?}",
        c.seen
    );
    assert!(
        c.saw(|v| is_state(v, "processing", "speaking")),
        "{:?}",
        c.seen
    );
    let reply = Duration::from_secs_f64(c.audio_bytes as f64 / 2.0 / f64::from(RATE));
    assert!(
        reply >= speech - Duration::from_millis(60) && reply <= speech + pause,
        "the echo is about the spoken turn: {reply:?} for {speech:?} of speech"
    );

    // Turn 2; barge in while its reply arrives.
    c.stream(&signal::utterance(Duration::from_millis(2500), pause, 11))
        .await;
    c.wait_for("turn 2 to end", |v| {
        v["type"] == "turn_ended" && v["turn"] == 2
    })
    .await;
    c.wait_audio().await;
    c.stream(&signal::speech_like(Duration::from_millis(800), 77))
        .await;
    let interrupted = c
        .wait_for("the interruption", |v| v["type"] == "interrupted")
        .await;
    assert_eq!(interrupted["turn"], 2);

    // Metrics: the backend's and the server's.
    let (status, content_type, text) = http_get(server.addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert_eq!(
        metric(&text, "backend_sessions_total{provider=\"local\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "backend_sessions_active{provider=\"local\"}"),
        1.0
    );
    assert!(metric(&text, "pipeline_turns_total{provider=\"local\"}") >= 2.0);
    assert_eq!(
        metric(&text, "pipeline_interruptions_total{provider=\"local\"}"),
        1.0
    );
    assert!(
        metric(
            &text,
            "backend_throughput_bytes{provider=\"local\",direction=\"in\"}"
        ) > 100_000.0
    );
    assert_eq!(metric(&text, "server_connections_total"), 1.0);
    assert_eq!(metric(&text, "server_connections_active"), 1.0);
    assert!(metric(&text, "server_messages_total{direction=\"in\"}") > 200.0);
    assert!(metric(&text, "server_messages_total{direction=\"out\"}") > 50.0);
    assert_eq!(
        metric(&text, "server_connections_refused_total{reason=\"origin\"}"),
        0.0
    );

    // Health, and the web page's files.
    let (status, content_type, body) = http_get(server.addr, "/healthz").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "healthy", "{health}");
    let (status, content_type, _) = http_get(server.addr, "/").await;
    assert_eq!(
        (status, content_type.as_str()),
        (200, "text/html; charset=utf-8")
    );
    for path in ["/app.js", "/pcm-worklet.js"] {
        let (status, content_type, _) = http_get(server.addr, path).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            content_type.starts_with("text/javascript"),
            "{path}: {content_type}"
        );
    }

    // A graceful stop.
    c.send_json(json!({"type": "stop"})).await;
    assert_eq!(c.expect_close().await, (1000, "session stopped".into()));
    assert_eq!(
        c.seen.last().unwrap()["type"],
        "closed",
        "closed comes last"
    );
    server.wait_sessions(0).await;
    let (_, _, text) = http_get(server.addr, "/metrics").await;
    assert_eq!(
        metric(&text, "backend_sessions_active{provider=\"local\"}"),
        0.0
    );
    assert_eq!(metric(&text, "server_closes_total{code=\"1000\"}"), 1.0);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_reaches_the_session() {
    let server = Running::echo().await;
    let mut c = Client::connect(server.addr).await;
    c.start("texter").await;
    c.send_json(json!({"type": "text", "text": "hello there"}))
        .await;
    let transcript = c
        .wait_for("the transcript", |v| v["type"] == "user_transcript")
        .await;
    assert_eq!(transcript["text"], "hello there");
    assert_eq!(transcript["is_final"], true);
    // The echo backend has no agent: the turn ends with a documented error.
    let error = c.wait_for("the error", |v| v["type"] == "error").await;
    assert_eq!(error["code"], "agent_error", "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("agent"),
        "{error}"
    );
    c.send_json(json!({"type": "stop"})).await;
    assert_eq!(c.expect_close().await.0, 1000);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_close_with_1009() {
    let server = Running::start(
        echo_config(),
        ServerConfig {
            max_frame_bytes: 4096,
            ..server_config()
        },
    )
    .await;
    // Just over the limit.
    refused(&server, 1009, "too big", async |c| {
        c.start("big").await;
        c.send(Message::binary(vec![0u8; 4098])).await.unwrap();
    })
    .await;
    // Far over it (cut off as soon as the frame header is read).
    refused(&server, 1009, "too big", async |c| {
        c.start("huge").await;
        let _ = c.send(Message::binary(vec![0u8; 40_000])).await;
    })
    .await;
    // Before start, as text.
    refused(&server, 1009, "too big", async |c| {
        c.send_raw_text(&" ".repeat(5000)).await;
    })
    .await;
    server.wait_sessions(0).await;
    let (_, _, text) = http_get(server.addr, "/metrics").await;
    assert_eq!(metric(&text, "server_closes_total{code=\"1009\"}"), 3.0);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_with_1002() {
    let server = Running::echo().await;
    refused(&server, 1002, "invalid JSON", async |c| {
        c.start("a").await;
        c.send_raw_text("{this is not json").await;
    })
    .await;
    refused(&server, 1002, "unknown message type \"dance\"", async |c| {
        c.start("b").await;
        c.send_json(json!({"type": "dance"})).await;
    })
    .await;
    refused(&server, 1002, "binary message before start", async |c| {
        c.send_samples(&[0; 320]).await;
    })
    .await;
    refused(&server, 1002, "start sent twice", async |c| {
        c.start("c").await;
        c.send_json(json!({"type": "start", "user_id": "c", "sample_rate": RATE}))
            .await;
    })
    .await;
    refused(
        &server,
        1002,
        "sample_rate 96000 is not supported",
        async |c| {
            c.send_json(json!({"type": "start", "user_id": "d", "sample_rate": 96000}))
                .await;
        },
    )
    .await;
    refused(
        &server,
        1002,
        "sample_rate 47999 is not supported",
        async |c| {
            c.send_json(json!({"type": "start", "user_id": "d", "sample_rate": 47999}))
                .await;
        },
    )
    .await;
    refused(&server, 1002, "expected start first", async |c| {
        c.send_json(json!({"type": "text", "text": "hi"})).await;
    })
    .await;
    refused(&server, 1002, "user_id", async |c| {
        c.send_json(json!({"type": "start", "user_id": "", "sample_rate": RATE}))
            .await;
    })
    .await;
    server.wait_sessions(0).await;
    let (_, _, text) = http_get(server.addr, "/metrics").await;
    assert_eq!(metric(&text, "server_closes_total{code=\"1002\"}"), 8.0);
    assert_eq!(
        metric(
            &text,
            "server_connections_refused_total{reason=\"protocol\"}"
        ),
        5.0,
        "violations before a session are refusals"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_sample_rates_work_and_a_missing_start_times_out() {
    let server = Running::start(
        echo_config(),
        ServerConfig {
            start_timeout: Duration::from_millis(500),
            ..server_config()
        },
    )
    .await;
    refused(&server, 1002, "no start message within", async |_| {}).await;
    // 8 kHz in, 8 kHz out.
    let mut c = Client::connect(server.addr).await;
    c.send_json(json!({"type": "start", "user_id": "phone", "sample_rate": 8000}))
        .await;
    let ready = c.wait_for("ready", |v| v["type"] == "ready").await;
    assert_eq!(ready["sample_rate"], 8000);
    let speech: Vec<i16> =
        signal::utterance(Duration::from_millis(1000), Duration::from_millis(900), 3)
            .iter()
            .step_by(2)
            .copied()
            .collect();
    for chunk in speech.chunks(160) {
        c.send_samples(chunk).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.wait_for("the reply to end", |v| is_state(v, "speaking", "listening"))
        .await;
    let reply = c.audio_bytes as f64 / 2.0 / 8000.0;
    assert!(
        (0.8..=2.0).contains(&reply),
        "{reply} s of 8 kHz reply audio"
    );
    c.send_json(json!({"type": "stop"})).await;
    assert_eq!(c.expect_close().await.0, 1000);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_length_audio_closes_with_1003() {
    let server = Running::echo().await;
    refused(&server, 1003, "641 bytes", async |c| {
        c.start("odd").await;
        c.send(Message::binary(vec![0u8; 641])).await.unwrap();
    })
    .await;
    server.wait_sessions(0).await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_are_checked_before_the_upgrade() {
    let server = Running::echo().await;
    let addr = server.addr;
    let (status, body) = http_refusal(addr, &[("origin", "http://evil.example")]).await;
    assert_eq!(status, 403);
    assert!(body.contains("origin not allowed"), "{body}");
    // The server's own pages may connect, and so may non-browser clients.
    let own = format!("http://{addr}");
    let mut c = Client::connect_with(addr, &[("origin", own.as_str())])
        .await
        .unwrap();
    healthy_session(&mut c, "same-host").await;
    assert_healthy_session(addr, "no-origin").await;
    let (_, _, text) = http_get(addr, "/metrics").await;
    assert_eq!(
        metric(&text, "server_connections_refused_total{reason=\"origin\"}"),
        1.0
    );
    server.stop().await.unwrap();

    // An explicit list allows exactly its origins.
    let server = Running::start(
        echo_config(),
        ServerConfig {
            allowed_origins: vec!["http://app.example:3000".into()],
            ..server_config()
        },
    )
    .await;
    let own = format!("http://{}", server.addr);
    assert_eq!(
        http_refusal(server.addr, &[("origin", own.as_str())])
            .await
            .0,
        403
    );
    let mut c = Client::connect_with(server.addr, &[("origin", "http://app.example:3000")])
        .await
        .unwrap();
    healthy_session(&mut c, "listed").await;
    server.stop().await.unwrap();
}

/// Accepts exactly one token.
struct OneToken(&'static str);

#[async_trait]
impl AuthHook for OneToken {
    async fn authenticate(&self, token: Option<&Secret>) -> voice_backends::Result<Principal> {
        match token {
            Some(t) if t.expose() == self.0 => Ok(Principal::new("ok")),
            _ => Err(BackendError::new(
                "auth",
                ErrorCode::AuthenticationFailed,
                "unknown token",
            )),
        }
    }

    async fn authorize(&self, _: &Principal, _: Operation) -> voice_backends::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_go_to_the_auth_hook_and_never_into_reasons() {
    const GOOD: &str = "good-token-8c1f";
    const BAD: &str = "bad-token-77aa";
    let backend = registry().create("local", &echo_config()).await.unwrap();
    backend.start().await.unwrap();
    backend.set_hooks(Hooks {
        auth: Some(Arc::new(OneToken(GOOD))),
        ..Hooks::default()
    });
    let server = Running::with_backend(backend, server_config()).await;
    let addr = server.addr;

    for (header, start_token) in [(None, Some(BAD)), (None, None), (Some(GOOD), Some(BAD))] {
        let bearer = header.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&'static str, &str)> = bearer
            .iter()
            .map(|b| ("authorization", b.as_str()))
            .collect();
        let mut c = Client::connect_with(addr, &headers).await.unwrap();
        let mut start = json!({"type": "start", "user_id": "mallory", "sample_rate": RATE});
        if let Some(t) = start_token {
            start["token"] = json!(t);
        }
        c.send_json(start).await;
        let (code, reason) = c.expect_close().await;
        assert_eq!((code, reason.as_str()), (1008, "authentication failed"));
        assert!(!reason.contains(BAD) && !reason.contains(GOOD));
    }
    assert_eq!(server.backend.active_session_count(), 0);

    // The right token, in the start message or in the header.
    let mut c = Client::connect(addr).await;
    c.send_json(json!({"type": "start", "user_id": "alice", "sample_rate": RATE, "token": GOOD}))
        .await;
    c.wait_for("ready", |v| v["type"] == "ready").await;
    c.send_json(json!({"type": "stop"})).await;
    assert_eq!(c.expect_close().await.0, 1000);
    let bearer = format!("Bearer {GOOD}");
    let mut c = Client::connect_with(addr, &[("authorization", bearer.as_str())])
        .await
        .unwrap();
    healthy_session(&mut c, "bob").await;

    let (_, _, text) = http_get(addr, "/metrics").await;
    assert_eq!(
        metric(&text, "server_connections_refused_total{reason=\"auth\"}"),
        3.0
    );
    assert!(!text.contains(GOOD) && !text.contains(BAD));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backend_closes_with_1013() {
    let mut config = echo_config();
    config.max_concurrent_sessions = 1;
    let server = Running::start(config, server_config()).await;
    let mut first = Client::connect(server.addr).await;
    first.start("first").await;
    let mut second = Client::connect(server.addr).await;
    second
        .send_json(json!({"type": "start", "user_id": "second", "sample_rate": RATE}))
        .await;
    let (code, reason) = second.expect_close().await;
    assert_eq!(code, 1013, "{reason}");
    assert!(reason.contains("capacity"), "{reason}");
    // The first session is untouched; once it stops, there is room again.
    first
        .send_json(json!({"type": "text", "text": "are you there"}))
        .await;
    first
        .wait_for("the agent error", |v| v["type"] == "error")
        .await;
    first.send_json(json!({"type": "stop"})).await;
    assert_eq!(first.expect_close().await.0, 1000);
    server.wait_sessions(0).await;
    assert_healthy_session(server.addr, "third").await;
    let (_, _, text) = http_get(server.addr, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "server_connections_refused_total{reason=\"capacity\"}"
        ),
        1.0
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_messages_closes_with_1008() {
    let server = Running::start(
        echo_config(),
        ServerConfig {
            messages_per_second: 5.0,
            ..server_config()
        },
    )
    .await;
    refused(&server, 1008, "message rate exceeded", async |c| {
        c.start("flood").await;
        let silence = signal::silence(Duration::from_millis(20));
        for _ in 0..40 {
            if c.send(Message::binary(
                silence
                    .iter()
                    .flat_map(|s| s.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ))
            .await
            .is_err()
            {
                break;
            }
        }
    })
    .await;
    server.wait_sessions(0).await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_far_ahead_of_real_time_closes_with_1008() {
    let server = Running::start(
        echo_config(),
        ServerConfig {
            max_audio_ahead: Duration::from_secs(1),
            messages_per_second: 10_000.0,
            ..server_config()
        },
    )
    .await;
    let frame = |ms: u64| signal::silence(Duration::from_millis(ms));
    // 0.8 s at once, then real time: within the budget, and answered.
    let mut c = Client::connect(server.addr).await;
    c.start("catching-up").await;
    for _ in 0..40 {
        c.send_samples(&frame(20)).await;
    }
    c.stream(&signal::utterance(
        Duration::from_millis(1000),
        Duration::from_millis(900),
        5,
    ))
    .await;
    c.wait_for("the reply to end", |v| is_state(v, "speaking", "listening"))
        .await;
    c.send_json(json!({"type": "stop"})).await;
    assert_eq!(c.expect_close().await.0, 1000);
    // 3 s at once: closed once it is more than the budget ahead.
    let reason = refused(&server, 1008, "audio faster than real time", async |c| {
        c.start("flood").await;
        for _ in 0..150 {
            if c.send(Message::binary(vec![0u8; 640])).await.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(reason.contains("more than 1s ahead"), "{reason}");
    // One message of 2 s (at 8 kHz, 32,000 bytes) is over it at once.
    refused(&server, 1008, "audio faster than real time", async |c| {
        c.send_json(json!({"type": "start", "user_id": "big", "sample_rate": 8000}))
            .await;
        c.wait_for("ready", |v| v["type"] == "ready").await;
        c.send(Message::binary(vec![0u8; 32_000])).await.unwrap();
    })
    .await;
    server.wait_sessions(0).await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_connection_limits_refuse_with_429() {
    // At most one connection at a time from one address.
    let server = Running::start(
        echo_config(),
        ServerConfig {
            max_connections_per_ip: 1,
            ..server_config()
        },
    )
    .await;
    let mut first = Client::connect(server.addr).await;
    first.start("first").await;
    let err = http_refusal(server.addr, &[]).await;
    assert_eq!(err.0, 429);
    assert!(err.1.contains("too many connections"), "{}", err.1);
    healthy_session_started(&mut first).await;
    let (_, _, text) = http_get(server.addr, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "server_connections_refused_total{reason=\"capacity\"}"
        ),
        1.0
    );
    server.stop().await.unwrap();

    // New connections per second: 0.1 per second allows a burst of one.
    let server = Running::start(
        echo_config(),
        ServerConfig {
            connections_per_second_per_ip: 0.1,
            ..server_config()
        },
    )
    .await;
    let mut first = Client::connect(server.addr).await;
    first.start("first").await;
    let err = http_refusal(server.addr, &[]).await;
    assert_eq!(err.0, 429);
    assert!(err.1.contains("connection rate limit"), "{}", err.1);
    healthy_session_started(&mut first).await;
    let (_, _, text) = http_get(server.addr, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "server_connections_refused_total{reason=\"rate_limit\"}"
        ),
        1.0
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_mid_turn_leaves_no_session_behind() {
    let server = Running::echo().await;
    let mut c = Client::connect(server.addr).await;
    c.start("ghost").await;
    c.stream(&signal::utterance(
        Duration::from_millis(1500),
        Duration::from_millis(900),
        5,
    ))
    .await;
    c.wait_for("the turn to end", |v| v["type"] == "turn_ended")
        .await;
    c.wait_audio().await;
    assert_eq!(server.backend.active_session_count(), 1);
    // Gone without a close handshake.
    drop(c);
    server.wait_sessions(0).await;
    let result = timeout(PATIENCE, async {
        loop {
            let (_, _, text) = http_get(server.addr, "/metrics").await;
            if metric(&text, "server_connections_active") == 0.0 {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let text = result.expect("the connection is forgotten");
    assert_eq!(
        metric(&text, "backend_sessions_active{provider=\"local\"}"),
        0.0
    );
    assert_healthy_session(server.addr, "next").await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_turn_in_flight_finish_then_closes_with_1001() {
    let server = Running::echo().await;
    let addr = server.addr;
    let backend = server.backend.clone();
    let mut c = Client::connect(addr).await;
    c.start("late").await;
    // An idle client is closed too.
    let mut idle = Client::connect(addr).await;
    idle.start("idle").await;
    c.stream(&signal::utterance(
        Duration::from_millis(1500),
        Duration::from_millis(900),
        9,
    ))
    .await;
    c.wait_for("the turn to end", |v| v["type"] == "turn_ended")
        .await;
    let audio_before = c.audio_bytes;
    let run = tokio::spawn(server.stop());
    let (code, reason) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
    let reply = Duration::from_secs_f64((c.audio_bytes) as f64 / 2.0 / f64::from(RATE));
    assert!(
        reply >= Duration::from_millis(1400),
        "the whole reply arrived before the close: {reply:?} ({audio_before} bytes before shutdown)"
    );
    assert!(c.saw(|v| v["type"] == "latency"), "{:?}", c.seen);
    assert_eq!(c.seen.last().unwrap()["type"], "closed");
    assert_eq!(idle.expect_close().await.0, 1001);
    assert_stopped(run, &backend, addr).await;
}

/// The `local` backend, but `create_session` holds its session until the
/// gate opens, and `stop` only reports that it was called (so the server
/// reaches its closing phase while a session is still being made).
#[derive(Debug)]
struct Gated {
    inner: Arc<dyn VoiceBackend>,
    gate: Arc<tokio::sync::Semaphore>,
    entered: Arc<tokio::sync::Notify>,
    stop_called: Arc<tokio::sync::Notify>,
}

#[async_trait]
impl VoiceBackend for Gated {
    fn provider(&self) -> &str {
        self.inner.provider()
    }
    fn set_hooks(&self, hooks: Hooks) {
        self.inner.set_hooks(hooks)
    }
    async fn start(&self) -> voice_backends::Result<()> {
        self.inner.start().await
    }
    async fn stop(&self) -> voice_backends::Result<()> {
        self.stop_called.notify_one();
        Ok(())
    }
    async fn create_session(
        &self,
        config: voice_backends::SessionConfig,
    ) -> voice_backends::Result<Arc<dyn voice_backends::VoiceSession>> {
        self.entered.notify_one();
        let _pass = self.gate.acquire().await.expect("the gate stays open");
        self.inner.create_session(config).await
    }
    async fn get_session(
        &self,
        id: &voice_backends::SessionId,
    ) -> voice_backends::Result<Arc<dyn voice_backends::VoiceSession>> {
        self.inner.get_session(id).await
    }
    async fn list_sessions(&self) -> Vec<Arc<dyn voice_backends::VoiceSession>> {
        self.inner.list_sessions().await
    }
    async fn close_session(&self, id: &voice_backends::SessionId) -> voice_backends::Result<()> {
        self.inner.close_session(id).await
    }
    async fn health_check(&self) -> voice_backends::HealthStatus {
        self.inner.health_check().await
    }
    fn connection_state(&self) -> ConnectionState {
        self.inner.connection_state()
    }
    fn active_session_count(&self) -> usize {
        self.inner.active_session_count()
    }
    fn config(&self) -> Arc<Config> {
        self.inner.config()
    }
    async fn update_config(&self, config: Config) -> voice_backends::Result<()> {
        self.inner.update_config(config).await
    }
}

/// A session that is made only once the server has begun closing its
/// connections still gets its close frame at once (1001), rather than
/// waiting for a phase change that will never come and being dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_made_after_closing_began_is_closed_with_1001() {
    let inner = registry().create("local", &echo_config()).await.unwrap();
    inner.start().await.unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let entered = Arc::new(tokio::sync::Notify::new());
    let stop_called = Arc::new(tokio::sync::Notify::new());
    let backend = Arc::new(Gated {
        inner: inner.clone(),
        gate: gate.clone(),
        entered: entered.clone(),
        stop_called: stop_called.clone(),
    });
    let server = Running::with_backend(backend, server_config()).await;
    let mut c = Client::connect(server.addr).await;
    c.send_json(json!({"type": "start", "user_id": "late", "sample_rate": RATE}))
        .await;
    timeout(PATIENCE, entered.notified())
        .await
        .expect("the connection asks for its session");
    let run = tokio::spawn(server.stop());
    timeout(PATIENCE, stop_called.notified())
        .await
        .expect("the server stops the backend");
    // The server turns to closing right after the backend's stop returns.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.add_permits(1);
    let (code, reason) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
    timeout(PATIENCE, run)
        .await
        .expect("run returns")
        .unwrap()
        .expect("run returns Ok");
    inner.stop().await.unwrap();
}

/// An auth hook that lets everyone in and notes the thread it ran on: the
/// thread of the connection's task.
#[derive(Default)]
struct ThreadNames(std::sync::Mutex<Vec<String>>);

#[async_trait]
impl AuthHook for ThreadNames {
    async fn authenticate(&self, _: Option<&Secret>) -> voice_backends::Result<Principal> {
        let name = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned();
        self.0.lock().unwrap().push(name);
        Ok(Principal::new("ok"))
    }

    async fn authorize(&self, _: &Principal, _: Operation) -> voice_backends::Result<()> {
        Ok(())
    }
}

/// A turn longer than the shutdown deadline: the connections close at the
/// deadline, and the backend still stops (its sessions finish on their own
/// deadline) instead of being left half-stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_off_in_the_config_means_no_metrics_endpoint() {
    let mut config = echo_config();
    config.enable_metrics = false;
    let server = Running::start(config, server_config()).await;
    let (status, _, body) = http_get(server.addr, "/metrics").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("enable_metrics = false"), "{body}");
    assert_eq!(http_get(server.addr, "/healthz").await.0, 200);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_shutdown_deadline_the_backend_still_stops() {
    let server = Running::start(
        echo_config(),
        ServerConfig {
            shutdown_deadline: Duration::from_millis(200),
            ..server_config()
        },
    )
    .await;
    let (addr, backend) = (server.addr, server.backend.clone());
    let mut c = Client::connect(addr).await;
    c.start("long").await;
    c.stream(&signal::utterance(
        Duration::from_millis(1500),
        Duration::from_millis(900),
        9,
    ))
    .await;
    c.wait_for("the reply", |v| is_state(v, "processing", "speaking"))
        .await;
    let run = tokio::spawn(server.stop());
    assert_eq!(c.expect_close().await.0, 1001);
    timeout(PATIENCE, run)
        .await
        .expect("run returns")
        .unwrap()
        .expect("run returns Ok");
    // The reply (about 2.5 s) outlasts the deadline; the backend's stop goes
    // on until it has played out.
    timeout(PATIENCE, async {
        while backend.connection_state() != ConnectionState::Disconnected
            || backend.active_session_count() != 0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the backend stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_take_connections_in_turn_serve_turns_and_drain_on_shutdown() {
    let backend = registry().create("local", &echo_config()).await.unwrap();
    backend.start().await.unwrap();
    let threads = Arc::new(ThreadNames::default());
    backend.set_hooks(Hooks {
        auth: Some(threads.clone()),
        ..Hooks::default()
    });
    let config = ServerConfig {
        workers: 2,
        ..server_config()
    };
    let server = Running::with_backend(backend.clone(), config).await;
    let addr = server.addr;

    let mut clients = Vec::new();
    for user in ["a", "b", "c", "d"] {
        let mut c = Client::connect(addr).await;
        c.start(user).await;
        clients.push(c);
    }
    let mut names = threads.0.lock().unwrap().clone();
    names.sort();
    assert_eq!(
        names,
        ["vb-serve-0", "vb-serve-0", "vb-serve-1", "vb-serve-1"],
        "each connection's task runs on a worker, and equal workers take turns"
    );
    let (status, _, body) = http_get(addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");

    // The per-worker gauge counts open connections: four sessions, plus the
    // request that reads it once every earlier request's connection is gone.
    let (_, _, text) = http_get(addr, "/metrics").await;
    let workers = |text: &str| {
        [0, 1].map(|w| {
            metric(
                text,
                &format!("server_worker_connections{{worker=\"{w}\"}}"),
            )
        })
    };
    assert!(workers(&text).iter().all(|&n| n >= 2.0), "{text}");
    // Two sessions stop; their connections are no longer counted.
    for c in clients.drain(2..) {
        let mut c = c;
        c.send_json(json!({"type": "stop"})).await;
        assert_eq!(c.expect_close().await.0, 1000);
    }
    let settled = timeout(PATIENCE, async {
        loop {
            let (_, _, text) = http_get(addr, "/metrics").await;
            if workers(&text).iter().sum::<f64>() == 3.0 {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the gauge falls to the two sessions left and the request reading it");
    assert!(workers(&settled).iter().all(|&n| n >= 1.0), "{settled}");

    // A spoken turn on one worker while a session of the other talks too;
    // the shutdown comes while the first reply plays.
    let [first, second, ..] = &mut clients[..] else {
        unreachable!()
    };
    let speech = Duration::from_millis(1500);
    let pause = Duration::from_millis(900);
    let (one, two) = (
        signal::utterance(speech, pause, 9),
        signal::utterance(speech, pause, 10),
    );
    tokio::join!(first.stream(&one), second.stream(&two));
    for c in [&mut *first, &mut *second] {
        c.wait_for("the turn to end", |v| v["type"] == "turn_ended")
            .await;
    }
    let run = tokio::spawn(server.stop());
    for c in &mut clients {
        let (code, reason) = c.expect_close().await;
        assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
        assert_eq!(c.seen.last().unwrap()["type"], "closed");
    }
    for c in &clients[..2] {
        let reply = Duration::from_secs_f64(c.audio_bytes as f64 / 2.0 / f64::from(RATE));
        assert!(
            reply >= speech - Duration::from_millis(100),
            "the whole reply arrived before the close: {reply:?}"
        );
        assert!(c.saw(|v| v["type"] == "latency"), "{:?}", c.seen);
    }
    assert_stopped(run, &backend, addr).await;
}

/// Checks a shutdown's end: `run` returned `Ok`, no session is left and
/// nothing listens any more.
async fn assert_stopped(
    run: JoinHandle<voice_backends::Result<()>>,
    backend: &Arc<dyn VoiceBackend>,
    addr: SocketAddr,
) {
    timeout(PATIENCE * 2, run)
        .await
        .expect("run returns")
        .unwrap()
        .expect("run returns Ok");
    assert_eq!(backend.active_session_count(), 0);
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_run_closes_the_listener_and_ends_the_workers_connections() {
    for workers in [0, 2] {
        let config = ServerConfig {
            workers,
            ..server_config()
        };
        let server = Running::start(echo_config(), config).await;
        let mut c = Client::connect(server.addr).await;
        c.start("dropped").await;
        server.task.abort();
        let refused = timeout(PATIENCE, async {
            while TcpStream::connect(server.addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            refused.is_ok(),
            "{workers} workers: the listener closes with run"
        );
        if workers == 0 {
            // The session lives on, as a task of this runtime.
            healthy_session_started(&mut c).await;
            continue;
        }
        // The worker's runtime is shut down: the socket closes without a
        // close handshake.
        loop {
            match c.next().await {
                Got::End(_) => break,
                Got::Close(code, reason) => {
                    panic!("an orderly close ({code} {reason}) after a drop")
                }
                Got::Json(_) | Got::Audio(_) => {}
            }
        }
    }
}

/// Invalid UTF-8 in a text message before `start`: closed with 1007 and a
/// reason, and counted as a refusal (the connection never had a session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_message_that_is_not_utf8_is_closed_with_1007() {
    use tungstenite::protocol::frame::coding::Data;
    let server = Running::echo().await;
    let mut c = Client::connect(server.addr).await;
    c.send(raw_frame(&[0x7b, 0xff, 0xfe, 0x7d], Data::Text))
        .await
        .unwrap();
    let got = c.next().await;
    assert!(
        matches!(got, Got::Close(1007, ref reason) if reason.contains("UTF-8")),
        "{got:?}"
    );
    let (_, _, text) = http_get(server.addr, "/metrics").await;
    assert_eq!(metric(&text, "server_closes_total{code=\"1007\"}"), 1.0);
    assert_eq!(
        metric(
            &text,
            "server_connections_refused_total{reason=\"protocol\"}"
        ),
        1.0
    );
}

/// Broken framing mid-session (a continuation frame with nothing to
/// continue): closed with 1002 naming the problem, and the session is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_websocket_framing_mid_session_is_closed_with_1002() {
    use tungstenite::protocol::frame::coding::Data;
    let server = Running::echo().await;
    let mut c = Client::connect(server.addr).await;
    c.start("framing").await;
    c.send(raw_frame(&[0, 0], Data::Continue)).await.unwrap();
    let got = loop {
        match c.next().await {
            Got::Json(_) | Got::Audio(_) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(got, Got::Close(1002, ref reason) if reason.contains("WebSocket protocol error")),
        "{got:?}"
    );
    server.wait_sessions(0).await;
    let (_, _, text) = http_get(server.addr, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "server_connections_refused_total{reason=\"protocol\"}"
        ),
        0.0,
        "a connection that had a session is not a refusal"
    );
}

/// A message far over `max_frame_bytes` before `start` ends a connection
/// that never had a session: it counts as a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_message_before_start_counts_as_a_refusal() {
    let server = Running::start(
        echo_config(),
        ServerConfig {
            max_frame_bytes: 4096,
            ..server_config()
        },
    )
    .await;
    let mut c = Client::connect(server.addr).await;
    let _ = c.send(Message::text(" ".repeat(40_000))).await;
    let got = c.next().await;
    assert!(matches!(got, Got::Close(1009, _)), "{got:?}");
    let (_, _, text) = http_get(server.addr, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "server_connections_refused_total{reason=\"protocol\"}"
        ),
        1.0
    );
}

/// A connector that publishes a room and a join token on every session.
struct Publishing;

#[async_trait]
impl voice_backends::runtime::Connector for Publishing {
    fn provider(&self) -> &str {
        "local"
    }
    fn capabilities(&self) -> voice_backends::ProviderCapabilities {
        voice_backends::ProviderCapabilities::default()
    }
    fn validate_config(&self, _: &Config) -> voice_backends::Result<()> {
        Ok(())
    }
    async fn connect(&self, _: &Config) -> voice_backends::Result<()> {
        Ok(())
    }
    async fn open_link(
        &self,
        request: voice_backends::runtime::LinkRequest<'_>,
    ) -> voice_backends::Result<Option<voice_backends::runtime::Link>> {
        request
            .info
            .set("room", format!("room-{}", request.user_id));
        request
            .info
            .set_secret("token", Secret::new("join-token-of-the-user"));
        Ok(None)
    }
}

/// What the provider publishes reaches the session's client in `ready`, the
/// secret included, and `Debug` of the session's info redacts the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_carries_what_the_provider_published() {
    let backend: Arc<dyn VoiceBackend> = Arc::new(
        voice_backends::runtime::RuntimeBackend::new(Arc::new(Publishing), &echo_config()).unwrap(),
    );
    backend.start().await.unwrap();
    let server = Running::with_backend(backend.clone(), server_config()).await;
    let mut c = Client::connect(server.addr).await;
    let ready = c.start("ann").await;
    assert_eq!(ready["info"]["room"], "room-ann");
    assert_eq!(ready["info"]["token"], "join-token-of-the-user");
    let session = backend.list_sessions().await.pop().unwrap();
    let shown = format!("{:?}", session.info());
    assert!(
        shown.contains("room-ann") && !shown.contains("join-token"),
        "{shown}"
    );
    assert_eq!(
        session.info().get("token").as_deref(),
        Some("join-token-of-the-user")
    );
    // A provider that publishes nothing: no `info` in `ready`.
    drop(c);
    server.stop().await.unwrap();
    let server = Running::echo().await;
    let mut c = Client::connect(server.addr).await;
    let ready = c.start("bob").await;
    assert!(ready.get("info").is_none(), "{ready}");
    drop(c);
    server.stop().await.unwrap();
}
