//! The conformance suite: one set of behaviour tests every provider's backend
//! must pass, gated on what the provider can do.
//!
//! A provider's tests describe how to make its backend with a [`Harness`] and
//! expand [`conformance_suite!`](crate::conformance_suite) once:
//!
//! ```no_run
//! use voice_backends::{Config, PipelineType};
//!
//! struct Local;
//! impl voice_backends::testing::conformance::Harness for Local {
//!     fn config(&self) -> Config {
//!         let mut config = Config::new("local");
//!         config.pipeline_type = PipelineType::S2s;
//!         config.s2s_provider = Some("echo".into());
//!         config
//!     }
//! }
//! voice_backends::conformance_suite!(Local);
//! # fn main() {}
//! ```
//!
//! Each check is also a plain `async fn` taking the harness, for providers
//! that need their own test attributes. Checks panic with a message saying
//! what the backend did wrong.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::{Instant, timeout};

use crate::agent::{AgentReply, agent_fn};
use crate::backend::{ConnectionState, Health, VoiceBackend};
use crate::config::{Config, SessionConfig};
use crate::error::{BackendError, ErrorCode, Result};
use crate::hooks::{AuthHook, Hooks, Operation, Principal, RateLimiter};
use crate::pipeline::events::{SessionEvent, SessionEvents};
use crate::registry::registry;
use crate::session::{PipelineState, SessionId, VoiceSession};
use crate::testing::signal;

/// How to make the backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A valid config for the provider under test.
    fn config(&self) -> Config;

    /// Makes a backend from `config`; by default through the global registry.
    async fn backend(&self, config: Config) -> Result<Arc<dyn VoiceBackend>> {
        registry().create(&config.provider.clone(), &config).await
    }

    /// Whether user audio makes turns and reply audio (VAD, turn detection and
    /// a speaking pipeline). Gates the audio checks.
    fn audio_turns(&self) -> bool {
        true
    }

    /// Whether text sent with `send_text` reaches the application's agent.
    fn text_turns(&self) -> bool {
        true
    }

    /// How long a check waits for an expected event.
    fn patience(&self) -> Duration {
        Duration::from_secs(10)
    }

    /// Whether the provider's service can be had here; `Err` says why not,
    /// and [`conformance_suite!`](crate::conformance_suite)'s tests print it
    /// and pass without running (a provider whose service needs something
    /// the machine may lack, such as a Python venv for a real bot).
    fn available(&self) -> std::result::Result<(), String> {
        Ok(())
    }
}

async fn started(h: &dyn Harness, config: Config) -> Arc<dyn VoiceBackend> {
    let backend = h
        .backend(config)
        .await
        .expect("the harness's config makes a backend");
    backend.start().await.expect("the backend starts");
    backend
}

/// Waits for the first event matching `pred`, failing after the harness's patience.
pub async fn expect_event(
    h: &dyn Harness,
    events: &mut SessionEvents,
    what: &str,
    pred: impl FnMut(&SessionEvent) -> bool,
) -> SessionEvent {
    expect_event_within(h.patience(), events, what, pred).await
}

/// Waits for the first event matching `pred`, failing after `patience`.
pub async fn expect_event_within(
    patience: Duration,
    events: &mut SessionEvents,
    what: &str,
    mut pred: impl FnMut(&SessionEvent) -> bool,
) -> SessionEvent {
    let deadline = Instant::now() + patience;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(e)) if pred(&e) => return e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the session closed before {what}"),
            Err(_) => panic!("no {what} within {patience:?}"),
        }
    }
}

/// Polls `done` every 10 ms until it holds, failing after `patience`
/// (for state a test can only look at, such as a fake service's counters).
pub async fn wait_until(patience: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + patience;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {patience:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Streams one utterance (`speech` then `pause` of silence) as 20 ms frames,
/// `pace` apart (zero pushes as fast as possible).
pub async fn speak(
    session: &dyn VoiceSession,
    speech: Duration,
    pause: Duration,
    seed: u64,
    pace: Duration,
) {
    let audio = signal::utterance(speech, pause, seed);
    for frame in signal::frames(&audio, 20) {
        session
            .process_audio(frame)
            .await
            .expect("process_audio accepts 20 ms frames");
        if pace.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(pace).await;
        }
    }
}

fn code_of<T>(r: Result<T>) -> ErrorCode {
    match r {
        Ok(_) => panic!("expected an error, the call succeeded"),
        Err(e) => e.code,
    }
}

/// Start, health, stop, and what is refused outside the started state.
pub async fn lifecycle(h: &dyn Harness) {
    let backend = h.backend(h.config()).await.expect("backend");
    assert_eq!(backend.connection_state(), ConnectionState::Disconnected);
    assert_eq!(backend.health_check().await.status, Health::Unhealthy);
    let refused = backend.create_session(SessionConfig::new("early")).await;
    assert_eq!(
        code_of(refused),
        ErrorCode::ConnectionFailed,
        "sessions before start"
    );

    backend.start().await.expect("start");
    assert_eq!(backend.connection_state(), ConnectionState::Connected);
    let health = backend.health_check().await;
    assert_eq!(health.status, Health::Healthy, "{health:?}");
    assert!(health.details.contains_key("sessions"), "{health:?}");

    let s = backend
        .create_session(SessionConfig::new("u"))
        .await
        .expect("session");
    s.start().await.expect("session start");
    assert_eq!(s.state(), PipelineState::Listening);

    backend.stop().await.expect("stop");
    assert_eq!(backend.connection_state(), ConnectionState::Disconnected);
    assert_eq!(
        backend.active_session_count(),
        0,
        "stop closes every session"
    );
    assert_eq!(s.state(), PipelineState::Idle);
    let refused = backend.create_session(SessionConfig::new("late")).await;
    assert!(refused.is_err(), "a stopped backend opens no sessions");
}

/// Create, get, list, metadata, close; ids are unique.
pub async fn session_crud(h: &dyn Harness) {
    let backend = started(h, h.config()).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let s = backend
            .create_session(SessionConfig::new(format!("user-{i}")).with_metadata("n", i))
            .await
            .expect("session");
        assert_eq!(s.user_id(), format!("user-{i}"));
        ids.push(s.id().clone());
    }
    let unique: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "session ids are unique");
    assert_eq!(backend.active_session_count(), 20);
    assert_eq!(backend.list_sessions().await.len(), 20);

    let s = backend.get_session(&ids[3]).await.expect("get");
    assert_eq!(s.id(), &ids[3]);
    assert_eq!(s.metadata().get("n"), Some(&serde_json::json!(3)));
    let mut update = BTreeMap::new();
    update.insert("n".to_owned(), serde_json::Value::Null);
    update.insert("topic".to_owned(), serde_json::json!("billing"));
    s.update_metadata(update).await.expect("metadata");
    let md = backend.get_session(&ids[3]).await.unwrap().metadata();
    assert_eq!(md.get("topic"), Some(&serde_json::json!("billing")));
    assert!(!md.contains_key("n"), "a null value removes the key");

    backend.close_session(&ids[3]).await.expect("close");
    assert_eq!(
        code_of(backend.get_session(&ids[3]).await),
        ErrorCode::SessionNotFound
    );
    assert_eq!(
        code_of(backend.close_session(&ids[3]).await),
        ErrorCode::SessionNotFound
    );
    assert_eq!(backend.active_session_count(), 19);
    assert!(
        !backend
            .list_sessions()
            .await
            .iter()
            .any(|s| s.id() == &ids[3])
    );

    // A session stopped directly leaves the table too.
    let s = backend.get_session(&ids[4]).await.unwrap();
    s.start().await.unwrap();
    s.stop().await.unwrap();
    assert_eq!(
        code_of(backend.get_session(&ids[4]).await),
        ErrorCode::SessionNotFound
    );
    backend.stop().await.unwrap();
}

/// The session cap holds, under concurrency too, and closing frees a slot.
pub async fn capacity(h: &dyn Harness) {
    let mut config = h.config();
    config.max_concurrent_sessions = 3;
    let backend = started(h, config.clone()).await;
    let mut open = Vec::new();
    for i in 0..3 {
        open.push(
            backend
                .create_session(SessionConfig::new(format!("c{i}")))
                .await
                .unwrap(),
        );
    }
    let err = backend
        .create_session(SessionConfig::new("c3"))
        .await
        .expect_err("a fourth session is refused");
    assert_eq!(err.code, ErrorCode::SessionLimitExceeded);
    assert!(err.is_retryable());
    backend.close_session(open[0].id()).await.unwrap();
    backend
        .create_session(SessionConfig::new("c4"))
        .await
        .expect("closing a session frees its slot");
    backend.stop().await.unwrap();

    config.max_concurrent_sessions = 5;
    config.rate_limit_burst = 100;
    let backend = started(h, config).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let b = backend.clone();
        tasks.spawn(async move { b.create_session(SessionConfig::new(format!("r{i}"))).await });
    }
    let (mut ok, mut full) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(_) => ok += 1,
            Err(e) if e.code == ErrorCode::SessionLimitExceeded => full += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(
        (ok, full),
        (5, 15),
        "exactly the capacity is granted under a race"
    );
    assert_eq!(backend.active_session_count(), 5);
    backend.stop().await.unwrap();
}

/// Many concurrent sessions, each with its own agent and input: no session
/// sees another's turns, text or audio.
pub async fn isolation(h: &dyn Harness) {
    const N: usize = 16;
    let mut config = h.config();
    config.max_concurrent_sessions = N as u32;
    config.rate_limit_burst = 100;
    let backend = started(h, config).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let backend = backend.clone();
        let audio = h.audio_turns();
        let text = h.text_turns();
        let patience = h.patience();
        tasks.spawn(async move {
            let tag = format!("session-{i}");
            let tag2 = tag.clone();
            let agent = agent_fn(move |turn| {
                let tag = tag2.clone();
                async move { Ok(AgentReply::text(format!("{tag} heard {}", turn.transcript))) }
            });
            let s = backend
                .create_session(SessionConfig::new(format!("user-{i}")).with_agent(agent))
                .await
                .unwrap();
            let mut events = s.events();
            // Only for audio turns: a media-link session's reply goes to its
            // service, and it refuses `receive_audio`.
            let mut rx = audio.then(|| s.receive_audio().unwrap());
            s.start().await.unwrap();
            let h = PatienceOnly(patience);
            if text {
                s.send_text(&format!("hello from {tag}")).await.unwrap();
                let e = expect_event(&h, &mut events, "the agent's text", |e| {
                    matches!(e, SessionEvent::AgentText { .. })
                })
                .await;
                let SessionEvent::AgentText { text } = e else {
                    unreachable!()
                };
                assert_eq!(text, format!("{tag} heard hello from {tag}"), "cross-talk");
            }
            if audio {
                speak(
                    &*s,
                    Duration::from_millis(600),
                    Duration::from_millis(1000),
                    1000 + i as u64,
                    Duration::ZERO,
                )
                .await;
                expect_event(&h, &mut events, "the end of the spoken turn", |e| {
                    matches!(e, SessionEvent::TurnEnded { .. })
                })
                .await;
                let rx = rx.as_mut().expect("taken for audio turns");
                let first = timeout(patience, rx.recv())
                    .await
                    .expect("reply audio in time")
                    .expect("reply audio");
                assert!(!first.is_empty());
            }
            // Nothing addressed to another session ever shows up here.
            while let Some(e) = events.try_recv() {
                if let SessionEvent::AgentText { text } = e
                    && let Some(at) = text.find("session-")
                {
                    assert!(
                        text[at..].starts_with(&format!("{tag} ")),
                        "cross-talk: {text}"
                    );
                }
            }
            s.id().clone()
        });
    }
    let mut ids = Vec::new();
    while let Some(r) = tasks.join_next().await {
        ids.push(r.expect("every session behaves"));
    }
    assert_eq!(ids.len(), N);
    backend.stop().await.unwrap();
}

struct PatienceOnly(Duration);

impl Harness for PatienceOnly {
    fn config(&self) -> Config {
        unreachable!("only patience is asked of this harness")
    }
    fn patience(&self) -> Duration {
        self.0
    }
}

/// User speech while the reply plays cancels it at once.
pub async fn barge_in(h: &dyn Harness) {
    if !h.audio_turns() {
        return;
    }
    let backend = started(h, h.config()).await;
    let agent = agent_fn(|turn| async move {
        Ok(AgentReply::text(format!(
            "a long answer to {} that takes a while to say, so that the user can interrupt it",
            turn.transcript
        )))
    });
    let s = backend
        .create_session(SessionConfig::new("talker").with_agent(agent))
        .await
        .unwrap();
    let mut events = s.events();
    let mut rx = s.receive_audio().unwrap();
    s.start().await.unwrap();
    speak(
        &*s,
        Duration::from_millis(2500),
        Duration::from_millis(900),
        42,
        Duration::ZERO,
    )
    .await;
    timeout(h.patience(), rx.recv())
        .await
        .expect("the reply starts playing")
        .expect("reply audio");
    expect_event(h, &mut events, "the speaking state", |e| {
        matches!(
            e,
            SessionEvent::State {
                to: PipelineState::Speaking,
                ..
            }
        )
    })
    .await;
    // Barge in, at real-time pace, until the session reports the interruption.
    let interrupt = signal::speech_like(Duration::from_millis(600), 77);
    for frame in signal::frames(&interrupt, 20) {
        s.process_audio(frame).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    expect_event(h, &mut events, "the interruption", |e| {
        matches!(e, SessionEvent::Interrupted { .. })
    })
    .await;
    assert_ne!(
        s.state(),
        PipelineState::Speaking,
        "no longer speaking after barge-in"
    );
    // The cut reply is flushed: nothing of it arrives any more.
    let mut leftover = 0;
    while timeout(Duration::from_millis(300), rx.recv())
        .await
        .is_ok_and(|f| f.is_some())
    {
        leftover += 1;
    }
    assert!(
        leftover <= 3,
        "{leftover} frames of the interrupted reply still played"
    );
    backend.stop().await.unwrap();
}

/// Stopping the backend lets a turn in flight finish, then closes.
pub async fn graceful_shutdown(h: &dyn Harness) {
    if !h.text_turns() {
        return;
    }
    let backend = started(h, h.config()).await;
    let answered = Arc::new(AtomicUsize::new(0));
    let counter = answered.clone();
    let agent = agent_fn(move |turn| {
        let counter = counter.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(AgentReply::text(format!(
                "late answer to {}",
                turn.transcript
            )))
        }
    });
    let s = backend
        .create_session(SessionConfig::new("slow").with_agent(agent))
        .await
        .unwrap();
    let mut events = s.events();
    s.start().await.unwrap();
    s.send_text("are you there").await.unwrap();
    expect_event(h, &mut events, "processing", |e| {
        matches!(
            e,
            SessionEvent::State {
                to: PipelineState::Processing,
                ..
            }
        )
    })
    .await;
    let b = backend.clone();
    let stopping = tokio::spawn(async move { b.stop().await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let refused = backend
        .create_session(SessionConfig::new("latecomer"))
        .await;
    assert!(refused.is_err(), "no new sessions while stopping");
    let text = expect_event(h, &mut events, "the in-flight answer", |e| {
        matches!(e, SessionEvent::AgentText { .. })
    })
    .await;
    assert_eq!(
        text,
        SessionEvent::AgentText {
            text: "late answer to are you there".into()
        }
    );
    expect_event(h, &mut events, "the close", |e| {
        matches!(e, SessionEvent::Closed)
    })
    .await;
    stopping.await.unwrap().expect("stop succeeds");
    assert_eq!(answered.load(Ordering::SeqCst), 1);
    assert_eq!(backend.connection_state(), ConnectionState::Disconnected);
}

struct Gate {
    token: &'static str,
    allow: bool,
}

#[async_trait]
impl AuthHook for Gate {
    async fn authenticate(&self, token: Option<&crate::config::Secret>) -> Result<Principal> {
        match token {
            Some(t) if t.expose() == self.token => Ok(Principal::new("ok")),
            _ => Err(BackendError::new(
                "auth",
                ErrorCode::AuthenticationFailed,
                "token not accepted",
            )),
        }
    }
    async fn authorize(&self, _p: &Principal, _op: Operation) -> Result<()> {
        if self.allow {
            Ok(())
        } else {
            Err(BackendError::new(
                "auth",
                ErrorCode::AuthorizationFailed,
                "not allowed",
            ))
        }
    }
}

struct Refuse;

#[async_trait]
impl RateLimiter for Refuse {
    async fn check(&self, _key: &str) -> Result<()> {
        Err(BackendError::new(
            "limiter",
            ErrorCode::RateLimitExceeded,
            "slow down",
        ))
    }
}

/// Each failure has its code; invalid input changes nothing.
pub async fn error_codes(h: &dyn Harness) {
    let backend = started(h, h.config()).await;
    let ghost = SessionId::from("sess_does_not_exist");
    assert_eq!(
        code_of(backend.get_session(&ghost).await),
        ErrorCode::SessionNotFound
    );
    assert_eq!(
        code_of(backend.close_session(&ghost).await),
        ErrorCode::SessionNotFound
    );
    assert_eq!(
        code_of(backend.create_session(SessionConfig::new("")).await),
        ErrorCode::InvalidConfig
    );

    let before = backend.config();
    let mut bad = (*before).clone();
    bad.max_retries = 99;
    let err = backend.update_config(bad).await.expect_err("refused");
    assert_eq!(err.code, ErrorCode::InvalidConfig);
    assert!(err.details.contains_key("max_retries"), "{err}");
    assert_eq!(
        *backend.config(),
        *before,
        "an invalid update changes nothing"
    );
    let mut good = (*before).clone();
    good.timeout = Duration::from_secs(12);
    backend
        .update_config(good)
        .await
        .expect("a valid update applies");
    assert_eq!(backend.config().timeout, Duration::from_secs(12));

    backend.set_hooks(Hooks {
        auth: Some(Arc::new(Gate {
            token: "letmein",
            allow: true,
        })),
        ..Hooks::default()
    });
    assert_eq!(
        code_of(backend.create_session(SessionConfig::new("a")).await),
        ErrorCode::AuthenticationFailed
    );
    let err = backend
        .create_session(SessionConfig::new("a").with_auth_token("wrong-token-value"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code, ErrorCode::AuthenticationFailed);
    assert!(
        !err.to_string().contains("wrong-token-value"),
        "tokens stay out of errors"
    );
    backend
        .create_session(SessionConfig::new("a").with_auth_token("letmein"))
        .await
        .expect("the right token opens a session");
    backend.set_hooks(Hooks {
        auth: Some(Arc::new(Gate {
            token: "letmein",
            allow: false,
        })),
        ..Hooks::default()
    });
    assert_eq!(
        code_of(
            backend
                .create_session(SessionConfig::new("a").with_auth_token("letmein"))
                .await
        ),
        ErrorCode::AuthorizationFailed
    );
    backend.set_hooks(Hooks {
        rate_limiter: Some(Arc::new(Refuse)),
        ..Hooks::default()
    });
    let err = backend
        .create_session(SessionConfig::new("b"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code, ErrorCode::RateLimitExceeded);
    assert!(err.is_retryable());
    backend.stop().await.unwrap();
}

/// The framework's fallback limiter applies to providers without their own.
pub async fn fallback_rate_limit(h: &dyn Harness) {
    let mut config = h.config();
    config.rate_limit_burst = 2;
    config.rate_limit_per_second = 0.5;
    let backend = started(h, config).await;
    for _ in 0..2 {
        backend
            .create_session(SessionConfig::new("same-user"))
            .await
            .unwrap();
    }
    let err = backend
        .create_session(SessionConfig::new("same-user"))
        .await
        .expect_err("the third creation within the burst is limited");
    assert_eq!(err.code, ErrorCode::RateLimitExceeded);
    assert!(err.details.contains_key("retry_after_ms"), "{err}");
    backend
        .create_session(SessionConfig::new("other-user"))
        .await
        .expect("limits are per user");
    // With an auth hook, the authenticated user is charged (the gate's
    // principal is "ok"), whatever `user_id` the session claims.
    backend.set_hooks(Hooks {
        auth: Some(Arc::new(Gate {
            token: "letmein",
            allow: true,
        })),
        ..Hooks::default()
    });
    for claimed in ["same-user", "claimed-2"] {
        backend
            .create_session(SessionConfig::new(claimed).with_auth_token("letmein"))
            .await
            .unwrap_or_else(|e| panic!("{claimed}, charged to the principal: {e}"));
    }
    let err = backend
        .create_session(SessionConfig::new("claimed-3").with_auth_token("letmein"))
        .await
        .expect_err("a new claimed user_id does not escape the principal's limit");
    assert_eq!(err.code, ErrorCode::RateLimitExceeded);
    backend.stop().await.unwrap();
}

/// Expands to one `#[tokio::test]` per conformance check, each against a
/// fresh harness built by the given expression.
#[macro_export]
macro_rules! conformance_suite {
    ($harness:expr) => {
        $crate::conformance_suite!(@one conformance_lifecycle, lifecycle, $harness);
        $crate::conformance_suite!(@one conformance_session_crud, session_crud, $harness);
        $crate::conformance_suite!(@one conformance_capacity, capacity, $harness);
        $crate::conformance_suite!(@one conformance_isolation, isolation, $harness);
        $crate::conformance_suite!(@one conformance_barge_in, barge_in, $harness);
        $crate::conformance_suite!(@one conformance_graceful_shutdown, graceful_shutdown, $harness);
        $crate::conformance_suite!(@one conformance_error_codes, error_codes, $harness);
        $crate::conformance_suite!(@one conformance_fallback_rate_limit, fallback_rate_limit, $harness);
    };
    (@one $test:ident, $check:ident, $harness:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            let harness = $harness;
            if let Err(why) = $crate::testing::conformance::Harness::available(&harness) {
                eprintln!("skipped: {why}");
                return;
            }
            $crate::testing::conformance::$check(&harness).await;
        }
    };
}
