#![cfg(feature = "testing")]
//! Spans: every public operation of a backend and a session, and every stage
//! of the pipeline, opens one (the per-frame ones at `trace` level).
//!
//! A test binary of its own (not part of `tests/local.rs`): the spans are
//! seen through a thread-local subscriber, and `tracing` caches whether a
//! callsite is of interest process-wide, so other tests hitting the same
//! callsites at the same time hid some of them from it (seen when it ran
//! inside `tests/local.rs`).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::span::Attributes;
use tracing::{Id, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use voice_backends::pipeline::events::SessionEvent;
use voice_backends::testing::conformance::{Harness, expect_event, speak};
use voice_backends::{Config, PipelineType, SessionConfig, registry};

/// Notes the name of every span opened.
#[derive(Clone, Default)]
struct SpanNames(Arc<Mutex<BTreeSet<&'static str>>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for SpanNames {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        self.0.lock().unwrap().insert(attrs.metadata().name());
    }
}

struct Local;

impl Harness for Local {
    fn config(&self) -> Config {
        let mut config = Config::new("local");
        config.pipeline_type = PipelineType::S2s;
        config.s2s_provider = Some("echo".into());
        config
    }
}

/// One thread, so the session's own task runs under the same subscriber.
#[tokio::test(flavor = "current_thread")]
async fn every_public_operation_and_pipeline_stage_has_a_span() {
    let names = SpanNames::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(names.clone()));

    let backend = registry().create("local", &Local.config()).await.unwrap();
    backend.start().await.unwrap();
    let session = backend
        .create_session(SessionConfig::new("traced"))
        .await
        .unwrap();
    let mut events = session.events();
    let _audio = session.receive_audio().unwrap();
    session.start().await.unwrap();
    speak(
        &*session,
        Duration::from_millis(600),
        Duration::from_millis(800),
        3,
        Duration::ZERO,
    )
    .await;
    expect_event(&Local, &mut events, "the echo", |e| {
        matches!(e, SessionEvent::AgentText { .. })
    })
    .await;
    session.send_text("hello").await.unwrap();
    let frame = voice_backends::AudioFrame::from_i16(16_000, 1, &[0i16; 320]).unwrap();
    session.send_audio(frame).await.unwrap();
    session
        .update_metadata([("k".to_owned(), serde_json::json!(1))].into())
        .await
        .unwrap();
    backend.get_session(session.id()).await.unwrap();
    backend.list_sessions().await;
    backend.health_check().await;
    backend.update_config(Local.config()).await.unwrap();
    backend.close_session(session.id()).await.unwrap();
    backend.stop().await.unwrap();

    let seen = names.0.lock().unwrap().clone();
    let expected = [
        "backend.start",
        "backend.create_session",
        "backend.get_session",
        "backend.list_sessions",
        "backend.health_check",
        "backend.update_config",
        "backend.close_session",
        "backend.stop",
        "session.start",
        "session.receive_audio",
        "session.process_audio",
        "session.send_audio",
        "session.send_text",
        "session.update_metadata",
        "session.stop",
        "session",
        "vad",
        "turn_detection",
        "s2s",
    ];
    let missing: Vec<_> = expected.iter().filter(|n| !seen.contains(*n)).collect();
    assert!(missing.is_empty(), "no span for {missing:?}; saw {seen:?}");
}

/// The server's own operations: binding, serving, and its HTTP endpoints.
#[cfg(feature = "server")]
#[tokio::test(flavor = "current_thread")]
async fn the_server_and_its_endpoints_have_spans() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use voice_backends::server::{Server, ServerConfig};

    let names = SpanNames::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(names.clone()));

    let backend = registry().create("local", &Local.config()).await.unwrap();
    backend.start().await.unwrap();
    let config = ServerConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        ..ServerConfig::default()
    };
    let server = Server::bind(backend.clone(), config).await.unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    for path in ["/healthz", "/metrics"] {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{path}: {response}");
    }
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    backend.stop().await.unwrap();

    let seen = names.0.lock().unwrap().clone();
    for name in [
        "server.bind",
        "server.run",
        "server.healthz",
        "server.metrics",
    ] {
        assert!(seen.contains(name), "no span {name:?} among {seen:?}");
    }
}
