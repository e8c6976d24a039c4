//! The shared runtime around a connector double: connection retries with
//! backoff, timeouts, health, and the connection state machine.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use voice_backends::runtime::{Connector, RuntimeBackend};
use voice_backends::{
    BackendError, Config, ConnectionState, ErrorCode, Health, PipelineType, ProviderCapabilities,
    SessionConfig, VoiceBackend,
};

/// Fails `failures` times with `code`, then connects; or hangs when `hang`.
struct Flaky {
    failures: u32,
    code: ErrorCode,
    hang: bool,
    attempts: AtomicU32,
    at: Mutex<Vec<Instant>>,
    unhealthy: bool,
    cap: u32,
}

impl Flaky {
    fn new(failures: u32, code: ErrorCode) -> Self {
        Flaky {
            failures,
            code,
            hang: false,
            attempts: AtomicU32::new(0),
            at: Mutex::new(Vec::new()),
            unhealthy: false,
            cap: 0,
        }
    }
}

#[async_trait]
impl Connector for Flaky {
    fn provider(&self) -> &str {
        "flaky"
    }
    fn capabilities(&self) -> ProviderCapabilities {
        let mut c = ProviderCapabilities::default();
        c.max_concurrent_sessions = self.cap;
        c
    }
    fn validate_config(&self, config: &Config) -> voice_backends::Result<()> {
        if config.provider_config.0.contains_key("forbidden") {
            return Err(BackendError::invalid_config("flaky", "forbidden key")
                .with_detail("provider_config.forbidden", "not allowed"));
        }
        Ok(())
    }
    async fn connect(&self, _config: &Config) -> voice_backends::Result<()> {
        self.at.lock().unwrap().push(Instant::now());
        let n = self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.hang {
            std::future::pending::<()>().await;
        }
        if n < self.failures {
            Err(BackendError::new(
                "flaky.connect",
                self.code,
                format!("attempt {n} refused"),
            ))
        } else {
            Ok(())
        }
    }
    async fn health(&self) -> voice_backends::Result<BTreeMap<String, String>> {
        if self.unhealthy {
            Err(BackendError::new(
                "flaky.health",
                ErrorCode::ConnectionFailed,
                "service down",
            ))
        } else {
            Ok(BTreeMap::from([("service".to_owned(), "up".to_owned())]))
        }
    }
}

fn config() -> Config {
    let mut c = Config::new("flaky");
    c.pipeline_type = PipelineType::S2s;
    c.s2s_provider = Some("echo".into());
    c.retry_delay = Duration::from_millis(100);
    c.max_retries = 3;
    c
}

#[tokio::test(start_paused = true)]
async fn retries_with_doubling_backoff_then_connects() {
    let connector = Arc::new(Flaky::new(2, ErrorCode::ConnectionFailed));
    let backend = RuntimeBackend::new(connector.clone(), &config()).unwrap();
    backend.start().await.unwrap();
    assert_eq!(backend.connection_state(), ConnectionState::Connected);
    let at = connector.at.lock().unwrap().clone();
    assert_eq!(at.len(), 3);
    assert_eq!(at[1] - at[0], Duration::from_millis(100));
    assert_eq!(
        at[2] - at[1],
        Duration::from_millis(200),
        "the delay doubles"
    );
    let snap = backend.metrics().unwrap().snapshot();
    assert!(
        snap.errors_total() == 0,
        "a start that succeeded is not an error"
    );
}

#[tokio::test(start_paused = true)]
async fn gives_up_after_max_retries_with_the_cause() {
    let connector = Arc::new(Flaky::new(100, ErrorCode::ConnectionTimeout));
    let backend = RuntimeBackend::new(connector.clone(), &config()).unwrap();
    let err = backend.start().await.unwrap_err();
    assert_eq!(err.code, ErrorCode::ConnectionFailed);
    assert_eq!(
        connector.attempts.load(Ordering::SeqCst),
        4,
        "first try plus max_retries"
    );
    assert_eq!(err.details["attempts"], "4");
    assert!(
        err.message.contains("attempt 3 refused"),
        "names the last cause: {err}"
    );
    assert!(std::error::Error::source(&err).is_some());
    assert_eq!(backend.connection_state(), ConnectionState::Error);
    assert_eq!(backend.health_check().await.status, Health::Unhealthy);
}

#[tokio::test(start_paused = true)]
async fn a_non_retryable_error_stops_at_once() {
    let connector = Arc::new(Flaky::new(100, ErrorCode::AuthenticationFailed));
    let backend = RuntimeBackend::new(connector.clone(), &config()).unwrap();
    let err = backend.start().await.unwrap_err();
    assert_eq!(err.code, ErrorCode::AuthenticationFailed);
    assert_eq!(connector.attempts.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hanging_connect_times_out_on_each_attempt() {
    let mut flaky = Flaky::new(0, ErrorCode::ConnectionFailed);
    flaky.hang = true;
    let connector = Arc::new(flaky);
    let mut c = config();
    c.timeout = Duration::from_secs(2);
    c.max_retries = 1;
    let backend = RuntimeBackend::new(connector.clone(), &c).unwrap();
    let started = Instant::now();
    let err = backend.start().await.unwrap_err();
    assert_eq!(err.code, ErrorCode::ConnectionFailed);
    assert!(err.message.contains("timeout"), "{err}");
    assert_eq!(connector.attempts.load(Ordering::SeqCst), 2);
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(4) + Duration::from_millis(100)
    );
}

#[tokio::test]
async fn health_reports_the_service_and_capacity() {
    let mut flaky = Flaky::new(0, ErrorCode::ConnectionFailed);
    flaky.cap = 2;
    let connector = Arc::new(flaky);
    let backend = RuntimeBackend::new(connector, &config()).unwrap();
    assert_eq!(
        backend.capacity(),
        2,
        "the provider's cap is below the config's"
    );
    backend.start().await.unwrap();
    let h = backend.health_check().await;
    assert_eq!(h.status, Health::Healthy);
    assert_eq!(h.details["service"], "up");
    assert_eq!(h.details["sessions"], "0/2");
    backend
        .create_session(SessionConfig::new("a"))
        .await
        .unwrap();
    backend
        .create_session(SessionConfig::new("b"))
        .await
        .unwrap();
    let h = backend.health_check().await;
    assert_eq!(h.status, Health::Degraded, "full: {h:?}");
    let err = backend
        .create_session(SessionConfig::new("c"))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::SessionLimitExceeded);
    backend.stop().await.unwrap();

    let mut flaky = Flaky::new(0, ErrorCode::ConnectionFailed);
    flaky.unhealthy = true;
    let backend = RuntimeBackend::new(Arc::new(flaky), &config()).unwrap();
    backend.start().await.unwrap();
    let h = backend.health_check().await;
    assert_eq!(h.status, Health::Unhealthy);
    assert_eq!(h.details["service"], "service down");
    // A failed check is an error of the health_check operation.
    let m = backend.metrics().unwrap().snapshot();
    assert_eq!(m.requests[&voice_backends::metrics::Op::HealthCheck], 1);
    assert_eq!(
        m.errors[&(
            voice_backends::metrics::Op::HealthCheck,
            ErrorCode::ConnectionFailed
        )],
        1
    );
}

#[tokio::test]
async fn construction_and_updates_run_the_connectors_validation() {
    let mut bad = config();
    bad.provider_config
        .0
        .insert("forbidden".into(), serde_json::json!(1));
    let err = RuntimeBackend::new(Arc::new(Flaky::new(0, ErrorCode::ConnectionFailed)), &bad)
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidConfig);
    let backend = RuntimeBackend::new(
        Arc::new(Flaky::new(0, ErrorCode::ConnectionFailed)),
        &config(),
    )
    .unwrap();
    let err = backend.update_config(bad).await.unwrap_err();
    assert!(
        err.details.contains_key("provider_config.forbidden"),
        "{err}"
    );
    let mut other = config();
    other.provider = "someone-else".into();
    let err = backend.update_config(other).await.unwrap_err();
    assert!(err.details.contains_key("provider"), "{err}");
    assert_eq!(backend.config().provider, "flaky");
}

#[tokio::test]
async fn metrics_count_operations_and_errors() {
    let backend = RuntimeBackend::new(
        Arc::new(Flaky::new(0, ErrorCode::ConnectionFailed)),
        &config(),
    )
    .unwrap();
    backend.start().await.unwrap();
    let s = backend
        .create_session(SessionConfig::new("m"))
        .await
        .unwrap();
    let _ = backend.get_session(&"nope".into()).await;
    backend.close_session(s.id()).await.unwrap();
    let mut text = String::new();
    backend.metrics().unwrap().render_prometheus(&mut text);
    for needle in [
        "backend_requests_total{provider=\"flaky\",operation=\"create_session\"} 1",
        "backend_errors_total{provider=\"flaky\",operation=\"get_session\",code=\"session_not_found\"} 1",
        "backend_sessions_total{provider=\"flaky\"} 1",
        "backend_sessions_active{provider=\"flaky\"} 0",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}
