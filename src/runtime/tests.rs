//! Unit tests of the runtime backend.

use std::time::Duration;

use super::*;
use crate::audio::{AudioEncoding, AudioFormat};
use crate::config::PipelineType;

/// The `local` provider's connector: nothing to connect to.
struct LocalConnector;

#[async_trait]
impl Connector for LocalConnector {
    fn provider(&self) -> &str {
        "local"
    }

    fn capabilities(&self) -> ProviderCapabilities {
        ProviderCapabilities::default()
    }

    fn validate_config(&self, _: &Config) -> Result<()> {
        Ok(())
    }

    async fn connect(&self, _: &Config) -> Result<()> {
        Ok(())
    }
}

async fn echo_backend() -> RuntimeBackend {
    let mut config = Config::new("local");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    let backend = RuntimeBackend::new(Arc::new(LocalConnector), &config).unwrap();
    backend.start().await.unwrap();
    backend
}

fn cd_quality(user: &str) -> SessionConfig {
    let cd = AudioFormat::new(AudioEncoding::PcmS16Le, 44_100, 1);
    SessionConfig::new(user)
        .with_input_format(cd)
        .with_output_format(cd)
}

/// A creation dropped part-way (a caller's timeout) gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_creation_gives_its_place_back() {
    let mut config = Config::new("local");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    config.max_concurrent_sessions = 1;
    let backend = RuntimeBackend::new(Arc::new(LocalConnector), &config).unwrap();
    backend.start().await.unwrap();
    // A 44.1 kHz session waits for its resamplers: cut off there.
    let cut = tokio::time::timeout(
        Duration::ZERO,
        backend.create_session_inner(cd_quality("cut")),
    )
    .await;
    assert!(cut.is_err(), "the creation was still waiting");
    backend
        .create_session(SessionConfig::new("next"))
        .await
        .expect("the one place is free again");
    backend.stop().await.unwrap();
}

/// A session being opened while the backend stops is refused, not left
/// behind on the stopped backend.
// One thread: the creation runs up to its wait for the resamplers before
// `stop` starts.
#[tokio::test]
async fn a_session_opened_while_the_backend_stops_is_not_left_behind() {
    let backend = Arc::new(echo_backend().await);
    let creating = tokio::spawn({
        let backend = backend.clone();
        async move { backend.create_session_inner(cd_quality("late")).await }
    });
    tokio::task::yield_now().await;
    backend.stop().await.unwrap();
    match creating.await.unwrap() {
        Err(e) => assert_eq!(e.code, ErrorCode::ContextCanceled, "{e}"),
        // Done before `stop` looked: then `stop` stopped it.
        Ok(s) => assert_eq!(s.state(), crate::session::PipelineState::Idle),
    }
    assert_eq!(backend.active_session_count(), 0);
    assert!(backend.list_sessions().await.is_empty());
}

/// A session at another rate gets its resamplers when it is created (on a
/// blocking thread), not on its first frame of audio or reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_at_another_rate_gets_its_converters_up_front() {
    let backend = echo_backend().await;
    let cd = AudioFormat::new(AudioEncoding::PcmS16Le, 44_100, 1);
    let phone = AudioFormat::new(AudioEncoding::Mulaw, 8_000, 1);
    let session = backend
        .create_session_inner(
            SessionConfig::new("u")
                .with_input_format(cd)
                .with_output_format(phone),
        )
        .await
        .unwrap();
    assert_eq!(session.engine.holds_converters(cd, phone), (true, true));
    // The internal format needs none.
    let plain = backend
        .create_session_inner(SessionConfig::new("v"))
        .await
        .unwrap();
    assert_eq!(
        plain.engine.holds_converters(
            crate::pipeline::INTERNAL_FORMAT,
            crate::pipeline::INTERNAL_FORMAT
        ),
        (false, false)
    );
    backend.stop().await.unwrap();
}
