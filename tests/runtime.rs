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

/// Fails `failures` times with `code`, then connects, until attempt
/// `fails_from` (counted from 0), from which it fails again; or hangs when
/// `hang`. Each attempt takes `delay`.
struct Flaky {
    failures: u32,
    fails_from: u32,
    delay: Duration,
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
            fails_from: u32::MAX,
            delay: Duration::ZERO,
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
        tokio::time::sleep(self.delay).await;
        if n < self.failures || n >= self.fails_from {
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
async fn retries_with_jittered_doubling_backoff_then_connects() {
    let connector = Arc::new(Flaky::new(2, ErrorCode::ConnectionFailed));
    let backend = RuntimeBackend::new(connector.clone(), &config()).unwrap();
    backend.start().await.unwrap();
    assert_eq!(backend.connection_state(), ConnectionState::Connected);
    let at = connector.at.lock().unwrap().clone();
    assert_eq!(at.len(), 3);
    // Full jitter: each delay is drawn from zero to the doubled bound.
    assert!(
        at[1] - at[0] <= Duration::from_millis(100),
        "{:?}",
        at[1] - at[0]
    );
    assert!(
        at[2] - at[1] <= Duration::from_millis(200),
        "the bound doubles: {:?}",
        at[2] - at[1]
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
    // Two attempts of 2 s each, and a jittered delay of at most 100 ms.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(4)
            && took <= Duration::from_secs(4) + Duration::from_millis(100),
        "{took:?}"
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

/// Lifecycle races, rate-limit state and hook error codes.
mod lifecycle_and_limits {
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use voice_backends::hooks::{
        AuthHook, Hooks, Operation, Principal, RateLimiter, TokenBucketLimiter,
    };
    use voice_backends::runtime::RuntimeBackend;
    use voice_backends::{
        AgentReply, BackendError, Config, ConnectionState, ErrorCode, PipelineType, SessionConfig,
        VoiceBackend, agent_fn, registry,
    };

    use super::Flaky;

    fn local() -> Config {
        let mut c = Config::new("local");
        c.pipeline_type = PipelineType::S2s;
        c.s2s_provider = Some("echo".into());
        c
    }

    /// A config update that leaves the rate limit alone (here: only `timeout`)
    /// keeps every user's bucket: nobody gets a fresh burst.
    #[tokio::test]
    async fn a_config_update_that_keeps_the_rate_limit_keeps_the_buckets() {
        let mut c = local();
        c.rate_limit_burst = 1;
        c.rate_limit_per_second = 0.001;
        let b = registry().create("local", &c).await.unwrap();
        b.start().await.unwrap();
        b.create_session(SessionConfig::new("u")).await.unwrap();
        let e = b
            .create_session(SessionConfig::new("u"))
            .await
            .err()
            .unwrap();
        assert_eq!(e.code, ErrorCode::RateLimitExceeded);
        let mut c2 = (*b.config()).clone();
        c2.timeout = Duration::from_secs(12);
        b.update_config(c2).await.unwrap();
        let r = b.create_session(SessionConfig::new("u")).await;
        assert_eq!(
            r.err().map(|e| e.code),
            Some(ErrorCode::RateLimitExceeded),
            "changing the timeout gave user u a fresh burst"
        );
    }

    /// A call with an older `now` (a caller that read the clock before waiting
    /// for the shard lock) does not move the bucket's time back, so no interval
    /// is refilled twice.
    #[tokio::test(start_paused = true)]
    async fn a_call_with_an_older_clock_reading_refills_nothing_twice() {
        let l = TokenBucketLimiter::new(1.0, 1).unwrap();
        let t0 = tokio::time::Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        assert!(l.try_take_at("k", 1, t0).is_ok());
        assert!(l.try_take_at("k", 1, t1).is_ok()); // refilled 1 over 1 s
        let _ = l.try_take_at("k", 1, t0); // a late caller with an older clock reading: refused
        // Still t1: burst 1 + 1 s * 1/s = 2 units at most in [t0, t1].
        assert!(
            l.try_take_at("k", 1, t1).is_err(),
            "a third unit within 1 s at rate 1/s, burst 1"
        );
    }

    /// A cost above the burst can never be granted: the wait is `Duration::MAX`.
    #[tokio::test(start_paused = true)]
    async fn a_cost_above_the_burst_is_refused_for_good() {
        let l = TokenBucketLimiter::new(1.0, 2).unwrap();
        let now = tokio::time::Instant::now();
        // Never granted, so no finite wait is promised.
        assert_eq!(l.try_take_at("k", 5, now), Err(Duration::MAX));
        let later = now + Duration::from_secs(1000);
        assert_eq!(l.try_take_at("k", 5, later), Err(Duration::MAX));
        // What the burst allows is still granted.
        assert_eq!(l.try_take_at("k", 2, later), Ok(()));
    }

    /// A `close_session` whose caller gives up (a timeout) while a turn is in
    /// flight: the stop goes on, and the session leaves the table once it ended,
    /// freeing its place of the capacity.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_close_whose_caller_gives_up_still_frees_the_place() {
        let mut c = local();
        c.max_concurrent_sessions = 1;
        let b = registry().create("local", &c).await.unwrap();
        b.start().await.unwrap();
        let agent = agent_fn(|_t| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(AgentReply::text("late"))
        });
        let s = b
            .create_session(SessionConfig::new("u").with_agent(agent))
            .await
            .unwrap();
        s.start().await.unwrap();
        s.send_text("hi").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = tokio::time::timeout(Duration::from_millis(20), b.close_session(s.id())).await;
        // The turn (300 ms) and the stop end soon after; the session then
        // leaves the table. Without the fix it stays there for good.
        let left = tokio::time::timeout(Duration::from_secs(20), async {
            while b.active_session_count() != 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(left.is_ok(), "a stopped session is still counted");
        assert_eq!(
            s.state(),
            voice_backends::PipelineState::Idle,
            "the session did stop"
        );
        b.create_session(SessionConfig::new("v"))
            .await
            .expect("the only place is taken by a stopped session");
    }

    /// A second `start` that fails leaves the backend in `Error`, accepting no sessions.
    #[tokio::test]
    async fn a_failed_restart_accepts_no_sessions() {
        let mut c = local();
        c.provider = "flaky".into();
        // The first start connects; a second one is refused for good.
        let connector = Flaky {
            fails_from: 1,
            ..Flaky::new(0, ErrorCode::AuthenticationFailed)
        };
        let b = RuntimeBackend::new(Arc::new(connector), &c).unwrap();
        b.start().await.unwrap();
        assert!(b.start().await.is_err());
        assert_eq!(b.connection_state(), ConnectionState::Error);
        let r = b.create_session(SessionConfig::new("u")).await;
        assert_eq!(
            r.err().map(|e| e.code),
            Some(ErrorCode::ConnectionFailed),
            "a session opened on a backend in the Error state"
        );
    }

    /// A `stop` while `start` connects wins: `start` fails with
    /// `ContextCanceled` and the backend stays disconnected.
    #[tokio::test]
    async fn a_stop_during_start_wins() {
        let mut c = local();
        c.provider = "flaky".into();
        let connector = Flaky {
            delay: Duration::from_millis(200),
            ..Flaky::new(0, ErrorCode::ConnectionFailed)
        };
        let b = Arc::new(RuntimeBackend::new(Arc::new(connector), &c).unwrap());
        let starting = tokio::spawn({
            let b = b.clone();
            async move { b.start().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        b.stop().await.unwrap();
        assert_eq!(b.connection_state(), ConnectionState::Disconnected);
        let started = starting.await.unwrap();
        assert_eq!(
            started.as_ref().err().map(|e| e.code),
            Some(ErrorCode::ContextCanceled)
        );
        assert!(
            started.is_err() && b.connection_state() == ConnectionState::Disconnected,
            "start() overrode a stop() that returned first: {started:?}, {}",
            b.connection_state()
        );
    }

    struct FlakyAuth;
    #[async_trait]
    impl AuthHook for FlakyAuth {
        async fn authenticate(
            &self,
            _t: Option<&voice_backends::Secret>,
        ) -> voice_backends::Result<Principal> {
            Err(BackendError::new(
                "idp",
                ErrorCode::Timeout,
                "identity provider did not answer",
            ))
        }
        async fn authorize(&self, _p: &Principal, _o: Operation) -> voice_backends::Result<()> {
            Ok(())
        }
    }
    struct DownLimiter;
    #[async_trait]
    impl RateLimiter for DownLimiter {
        async fn check(&self, _k: &str) -> voice_backends::Result<()> {
            Err(BackendError::new(
                "redis",
                ErrorCode::ConnectionFailed,
                "redis unreachable",
            ))
        }
    }

    /// A hook that cannot answer (its service timed out or is down) keeps its
    /// error code; a refusal is re-coded as the hook's kind of refusal.
    #[tokio::test]
    async fn hook_outages_keep_their_codes() {
        let b = registry().create("local", &local()).await.unwrap();
        b.start().await.unwrap();
        b.set_hooks(Hooks {
            auth: Some(Arc::new(FlakyAuth)),
            ..Hooks::default()
        });
        let e = b
            .create_session(SessionConfig::new("u").with_auth_token("t"))
            .await
            .err()
            .unwrap();
        let auth_code = e.code;
        b.set_hooks(Hooks {
            rate_limiter: Some(Arc::new(DownLimiter)),
            ..Hooks::default()
        });
        let e = b
            .create_session(SessionConfig::new("u"))
            .await
            .err()
            .unwrap();
        assert_eq!(
            (auth_code, e.code),
            (ErrorCode::Timeout, ErrorCode::ConnectionFailed),
            "an IdP timeout reported as a (non-retryable) bad token; a limiter outage as the user's rate limit (without retry_after_ms: {:?})",
            e.details
        );
    }
}

/// The connection state of a session's link, as a subscriber hears it.
mod link_state {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use async_trait::async_trait;
    use voice_backends::pipeline::events::{SessionEvent, SessionEvents};
    use voice_backends::pipeline::link::{LinkEvent, LinkInput};
    use voice_backends::runtime::{
        Connector, Link, LinkEvents, LinkRequest, RuntimeBackend, ServiceLink,
    };
    use voice_backends::{
        AudioFrame, Config, ConnectionState, ErrorCode, PipelineState, ProviderCapabilities,
        SessionConfig, VoiceBackend, registry,
    };

    /// A link that takes the user's audio and says nothing by itself.
    struct Mute;

    impl LinkInput for Mute {
        fn push_audio(&mut self, _: &AudioFrame) -> voice_backends::Result<()> {
            Ok(())
        }
        fn end_turn(&mut self) -> voice_backends::Result<()> {
            Ok(())
        }
        fn cancel(&mut self) {}
    }

    /// A connector whose sessions get a [`Mute`] link; the test speaks for
    /// the link through the sender of its events (`link`).
    #[derive(Default)]
    struct Linked {
        link: Mutex<Option<LinkEvents>>,
    }

    #[async_trait]
    impl Connector for Linked {
        fn provider(&self) -> &str {
            "linked"
        }
        fn capabilities(&self) -> ProviderCapabilities {
            ProviderCapabilities::default()
        }
        fn validate_config(&self, _: &Config) -> voice_backends::Result<()> {
            Ok(())
        }
        async fn connect(&self, _: &Config) -> voice_backends::Result<()> {
            Ok(())
        }
        async fn open_link(&self, _: LinkRequest<'_>) -> voice_backends::Result<Option<Link>> {
            let (events, rx) = LinkEvents::channel(16);
            *self.link.lock().unwrap() = Some(events);
            Ok(Some(Link::Service(ServiceLink {
                input: Box::new(Mute),
                events: rx,
                speaker: None,
            })))
        }
    }

    impl Linked {
        fn events(&self) -> LinkEvents {
            self.link
                .lock()
                .unwrap()
                .clone()
                .expect("a link was opened")
        }
    }

    fn config(provider: &str) -> Config {
        let mut c = Config::new(provider);
        c.pipeline_type = voice_backends::PipelineType::S2s;
        c.s2s_provider = Some("echo".into());
        c
    }

    fn connection(state: ConnectionState) -> SessionEvent {
        SessionEvent::Connection { state }
    }

    /// The next event that satisfies `wanted`, within 5 s.
    async fn next(
        events: &mut SessionEvents,
        wanted: impl Fn(&SessionEvent) -> bool,
    ) -> SessionEvent {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let e = events.recv().await.expect("the session's events go on");
                if wanted(&e) {
                    return e;
                }
            }
        })
        .await
        .expect("the event came in time")
    }

    fn is_connection(e: &SessionEvent) -> bool {
        matches!(e, SessionEvent::Connection { .. })
    }

    /// The link connects when the session is created, before anyone could
    /// subscribe: each subscriber hears the link's state as of its
    /// subscription first, then every change. A session without a link (the
    /// `local` provider) hears no such event.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscriber_hears_the_links_state_first_then_its_changes() {
        let connector = Arc::new(Linked::default());
        let backend = RuntimeBackend::new(connector.clone(), &config("linked")).unwrap();
        backend.start().await.unwrap();
        let session = backend
            .create_session(SessionConfig::new("u"))
            .await
            .unwrap();
        let mut first = session.events();
        assert_eq!(
            first.try_recv(),
            Some(connection(ConnectionState::Connected))
        );
        assert_eq!(first.try_recv(), None, "the state once, then live events");
        session.start().await.unwrap();
        assert_eq!(
            first.recv().await,
            Some(SessionEvent::State {
                from: PipelineState::Idle,
                to: PipelineState::Listening
            })
        );

        let link = connector.events();
        link.send(LinkEvent::Connection(ConnectionState::Reconnecting))
            .await;
        assert_eq!(
            next(&mut first, is_connection).await,
            connection(ConnectionState::Reconnecting)
        );
        let mut second = session.events();
        assert_eq!(
            second.try_recv(),
            Some(connection(ConnectionState::Reconnecting))
        );
        link.send(LinkEvent::Connection(ConnectionState::Connected))
            .await;
        for events in [&mut first, &mut second] {
            assert_eq!(
                next(events, is_connection).await,
                connection(ConnectionState::Connected)
            );
        }
        link.send(LinkEvent::Failed {
            code: ErrorCode::ConnectionFailed,
            message: "gone".into(),
        })
        .await;
        assert_eq!(
            next(&mut first, is_connection).await,
            connection(ConnectionState::Error)
        );
        assert_eq!(
            session.events().try_recv(),
            Some(connection(ConnectionState::Error))
        );

        // The link closes with the session.
        session.stop().await.unwrap();
        assert_eq!(
            next(&mut first, is_connection).await,
            connection(ConnectionState::Disconnected)
        );
        assert_eq!(first.recv().await, Some(SessionEvent::Closed));
        assert_eq!(
            session.events().try_recv(),
            Some(connection(ConnectionState::Disconnected))
        );
        backend.stop().await.unwrap();

        let local = registry().create("local", &config("local")).await.unwrap();
        local.start().await.unwrap();
        let session = local.create_session(SessionConfig::new("u")).await.unwrap();
        let mut events = session.events();
        assert_eq!(events.try_recv(), None, "no link, no connection state");
        session.start().await.unwrap();
        session.stop().await.unwrap();
        while let Some(e) = events.try_recv() {
            assert!(!is_connection(&e), "{e:?}");
        }
        local.stop().await.unwrap();
    }

    /// Subscribing while the link's state keeps changing: each subscriber's
    /// first state is followed by the change after it, never by the same
    /// state again (a change counted twice) nor by a later one (a change
    /// lost). The link alternates between two states, so each next
    /// connection event a subscriber hears must differ from the one before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_while_subscribing_is_neither_lost_nor_repeated() {
        let connector = Arc::new(Linked::default());
        let backend = RuntimeBackend::new(connector.clone(), &config("linked")).unwrap();
        backend.start().await.unwrap();
        let session = backend
            .create_session(SessionConfig::new("u"))
            .await
            .unwrap();
        session.start().await.unwrap();
        let link = connector.events();
        let flapping = tokio::spawn(async move {
            for i in 0..20_000 {
                let state = if i % 2 == 0 {
                    ConnectionState::Reconnecting
                } else {
                    ConnectionState::Connected
                };
                link.send(LinkEvent::Connection(state)).await;
                if i % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
        let mut checked = 0;
        while !flapping.is_finished() {
            let mut events = session.events();
            let Some(SessionEvent::Connection { state }) = events.try_recv() else {
                panic!("a subscription starts with the link's state");
            };
            let mut heard = vec![state];
            while heard.len() < 3 {
                match tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
                    Ok(Some(SessionEvent::Connection { state })) => heard.push(state),
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
            if events.lost() > 0 {
                continue;
            }
            for pair in heard.windows(2) {
                assert_ne!(pair[0], pair[1], "a change lost or repeated: {heard:?}");
            }
            checked += usize::from(heard.len() >= 2);
        }
        flapping.await.unwrap();
        assert!(checked > 0, "no subscriber overlapped a change");
        backend.stop().await.unwrap();
    }
}
