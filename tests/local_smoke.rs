#![cfg(feature = "testing")]
//! Temporary smoke test of the local provider's echo turn.

use std::time::Duration;

use voice_backends::pipeline::events::SessionEvent;
use voice_backends::testing::signal;
use voice_backends::{Config, PipelineType, SessionConfig, registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_turn() {
    let mut config = Config::new("local");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    let backend = registry().create("local", &config).await.unwrap();
    backend.start().await.unwrap();
    let session = backend.create_session(SessionConfig::new("u1")).await.unwrap();
    let mut events = session.events();
    let mut rx = session.receive_audio().unwrap();
    session.start().await.unwrap();
    let audio = signal::utterance(Duration::from_millis(800), Duration::from_millis(900), 7);
    for f in signal::frames(&audio, 20) {
        session.process_audio(f).await.unwrap();
    }
    let mut got = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Some(f)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        got += f.sample_frames();
        if got >= 16000 * 8 / 10 { break; }
    }
    let mut seen = Vec::new();
    while let Some(e) = events.try_recv() { seen.push(e); }
    println!("{seen:#?}");
    assert!(got >= 16000 * 8 / 10, "got {got} samples");
    assert!(seen.iter().any(|e| matches!(e, SessionEvent::Latency(_))));
    backend.stop().await.unwrap();
}
