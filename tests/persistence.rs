//! Persistence of active sessions in a session store, in process: what a
//! record holds, that writes stay off the audio path and coalesce, that a
//! failing store degrades health and is retried without ending sessions,
//! that closing deletes, that `start` restores (the provider re-attaching
//! with what it had published), resume tokens, leases, and retention.
//! The embedded store and `serve` are tested at the end of the file (a
//! `kill -9` of a real `serve`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;
use voice_backends::agent::{AgentReply, agent_fn};
use voice_backends::hooks::{DataKind, DataRetentionHook, Hooks};
use voice_backends::runtime::{Connector, Link, LinkRequest, RuntimeBackend};
use voice_backends::store::{EmbeddedStore, MemoryStore, SessionRecord, SessionStore};
use voice_backends::{
    Config, ErrorCode, Health, PersistenceStatus, PipelineType, ProviderCapabilities, Secret,
    SessionConfig, SessionId, VoiceBackend, VoiceSession,
};

/// A connector with nothing to connect to that publishes a "room" on each
/// new session and records what it is given back on a restored one.
#[derive(Default)]
struct Rooms {
    restored: Mutex<Vec<BTreeMap<String, String>>>,
}

#[async_trait]
impl Connector for Rooms {
    fn provider(&self) -> &str {
        "rooms"
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
    async fn open_link(&self, request: LinkRequest<'_>) -> voice_backends::Result<Option<Link>> {
        match request.restored {
            Some(info) => self.restored.lock().unwrap().push(info.exposed()),
            None => {
                request
                    .info
                    .set("room", format!("room-of-{}", request.session_id));
                request
                    .info
                    .set_secret("join_token", Secret::new("jt-Zq8Vw3Lp9Xr2Tn7"));
            }
        }
        Ok(None)
    }
}

fn config() -> Config {
    let mut config = Config::new("rooms");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    config.timeout = Duration::from_secs(2);
    config
}

fn backend_with(store: Arc<dyn SessionStore>, rooms: Arc<Rooms>) -> RuntimeBackend {
    let backend = RuntimeBackend::new(rooms, &config()).unwrap();
    backend.set_session_store(store);
    backend
}

/// An agent whose reply says how much history it was given.
fn agent() -> Arc<dyn voice_backends::Agent> {
    agent_fn(|turn| async move {
        Ok(AgentReply::text(format!(
            "reply to {} after {} messages",
            turn.transcript,
            turn.history.len()
        )))
    })
}

fn session_config(user: &str, n: u32) -> SessionConfig {
    let mut c = SessionConfig::new(user).with_agent(agent());
    c.metadata.insert("n".into(), json!(n));
    c.metadata.insert("plan".into(), json!("gold"));
    c
}

/// Waits for `f` to hold, for at most five seconds.
async fn eventually<F: FnMut() -> Fut, Fut: Future<Output = bool>>(what: &str, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn record(store: &dyn SessionStore, id: &SessionId) -> Option<SessionRecord> {
    store.load(id).await.unwrap()
}

/// Sends `text` as a turn and waits until the store's record holds
/// `messages` messages.
async fn turn(
    store: &dyn SessionStore,
    session: &Arc<dyn VoiceSession>,
    text: &str,
    messages: usize,
) {
    session.send_text(text).await.unwrap();
    eventually("the turn is written", || async {
        record(store, session.id())
            .await
            .is_some_and(|r| r.history.len() == messages)
    })
    .await;
}

/// What a record of an active session holds, and that the resume token is
/// kept only as its hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_session_has_a_record_with_all_it_needs() {
    let store = Arc::new(MemoryStore::new());
    let backend = backend_with(store.clone(), Arc::default());
    backend.start().await.unwrap();
    let session = backend
        .create_session(session_config("alice", 1))
        .await
        .unwrap();
    session.start().await.unwrap();
    turn(&*store, &session, "hello", 2).await;
    turn(&*store, &session, "again", 4).await;
    let r = record(&*store, session.id()).await.unwrap();
    assert_eq!(r.id, *session.id());
    assert_eq!(
        (r.user_id.as_str(), r.provider.as_str()),
        ("alice", "rooms")
    );
    assert_eq!(r.metadata["plan"], json!("gold"));
    let texts: Vec<_> = r
        .history
        .iter()
        .map(|m| (m.user, m.text.as_str()))
        .collect();
    assert_eq!(
        texts,
        [
            (true, "hello"),
            (false, "reply to hello after 0 messages"),
            (true, "again"),
            (false, "reply to again after 2 messages"),
        ]
    );
    assert_eq!(r.info["room"].value, format!("room-of-{}", session.id()));
    assert!(r.info["join_token"].secret);
    assert!(r.config.auth_token.is_none() && r.config.metadata.is_empty());
    let token = session
        .resume_token()
        .expect("a persisted session has a resume token");
    let raw = String::from_utf8(store.raw().concat()).unwrap();
    assert!(
        !raw.contains(token.expose()),
        "only the token's hash is kept"
    );
    assert!(r.resume_token_sha256.is_some());
    eventually("persisted", || async {
        matches!(
            session.persistence_status(),
            PersistenceStatus::Persisted { .. }
        )
    })
    .await;
    // A metadata update is written too.
    session
        .update_metadata(BTreeMap::from([("plan".into(), json!("silver"))]))
        .await
        .unwrap();
    eventually("the metadata update is written", || async {
        record(&*store, session.id()).await.unwrap().metadata["plan"] == json!("silver")
    })
    .await;
    let health = backend.health_check().await;
    assert_eq!(health.status, Health::Healthy, "{health:?}");
    assert_eq!(health.details["store"], "memory: ok");
    backend.stop().await.unwrap();
}

/// Without a store, sessions are ephemeral and have no resume token.
#[tokio::test]
async fn without_a_store_sessions_are_ephemeral() {
    let backend = RuntimeBackend::new(Arc::new(Rooms::default()), &config()).unwrap();
    backend.start().await.unwrap();
    let session = backend
        .create_session(SessionConfig::new("u"))
        .await
        .unwrap();
    assert_eq!(session.persistence_status(), PersistenceStatus::Ephemeral);
    assert!(session.resume_token().is_none());
    assert!(!backend.health_check().await.details.contains_key("store"));
    backend.stop().await.unwrap();
}

/// Closing a session deletes its record; the session reports `Ephemeral`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_deletes_the_record() {
    let store = Arc::new(MemoryStore::new());
    let backend = backend_with(store.clone(), Arc::default());
    backend.start().await.unwrap();
    let a = backend
        .create_session(session_config("a", 1))
        .await
        .unwrap();
    let b = backend
        .create_session(session_config("b", 2))
        .await
        .unwrap();
    eventually("both written", || async {
        record(&*store, a.id()).await.is_some() && record(&*store, b.id()).await.is_some()
    })
    .await;
    backend.close_session(a.id()).await.unwrap();
    b.stop().await.unwrap();
    eventually("both deleted", || async {
        record(&*store, a.id()).await.is_none() && record(&*store, b.id()).await.is_none()
    })
    .await;
    assert_eq!(a.persistence_status(), PersistenceStatus::Ephemeral);
    backend.stop().await.unwrap();
}

/// A backend that went away without stopping (its sessions' leases left to
/// expire) is replaced: the new one's `start` restores every active session
/// with its metadata and history, the provider re-attaching with what it
/// had published, and the conversation goes on from there; closed sessions
/// do not come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_restores_active_sessions_and_not_closed_ones() {
    let store = Arc::new(MemoryStore::new().with_lease_ttl(Duration::from_millis(300)));
    let first = backend_with(store.clone(), Arc::default());
    first.start().await.unwrap();
    let mut kept = Vec::new();
    for n in 0..3 {
        let s = first
            .create_session(session_config(&format!("user{n}"), n))
            .await
            .unwrap();
        s.start().await.unwrap();
        turn(&*store, &s, &format!("first of {n}"), 2).await;
        kept.push((s.id().clone(), s.resume_token().unwrap()));
    }
    let closed = first
        .create_session(session_config("gone", 9))
        .await
        .unwrap();
    eventually("written", || async {
        record(&*store, closed.id()).await.is_some()
    })
    .await;
    closed.stop().await.unwrap();
    eventually("deleted", || async {
        record(&*store, closed.id()).await.is_none()
    })
    .await;
    // The first backend "crashes": it is dropped without stopping (its
    // sessions never closed); its leases run out.
    drop(first);
    tokio::time::sleep(Duration::from_millis(400)).await;

    let rooms = Arc::new(Rooms::default());
    let second = backend_with(store.clone(), rooms.clone());
    second.start().await.unwrap();
    assert_eq!(second.active_session_count(), 3);
    assert!(second.get_session(closed.id()).await.is_err());
    let mut restored_rooms: Vec<String> = rooms
        .restored
        .lock()
        .unwrap()
        .iter()
        .map(|i| {
            assert_eq!(i["join_token"], "jt-Zq8Vw3Lp9Xr2Tn7");
            i["room"].clone()
        })
        .collect();
    restored_rooms.sort();
    let mut expected: Vec<String> = kept.iter().map(|(id, _)| format!("room-of-{id}")).collect();
    expected.sort();
    assert_eq!(restored_rooms, expected, "each provider link re-attached");
    for (n, (id, _)) in kept.iter().enumerate() {
        let s = second.get_session(id).await.unwrap();
        assert_eq!(s.user_id(), format!("user{n}"));
        assert_eq!(s.metadata()["n"], json!(n));
        assert_eq!(s.info().get("room").unwrap(), format!("room-of-{id}"));
        // It goes on with its history: the agent sees the two messages.
        s.set_agent(agent());
        s.start().await.unwrap();
        turn(&*store, &s, "back", 4).await;
        let r = record(&*store, id).await.unwrap();
        assert_eq!(r.history[0].text, format!("first of {n}"));
        assert_eq!(r.history[3].text, "reply to back after 2 messages");
    }
    second.stop().await.unwrap();
}

/// A backend's own `stop` keeps its sessions' records and lets go of their
/// leases: the next `start` restores them at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_backend_restores_its_sessions_on_start() {
    let store = Arc::new(MemoryStore::new());
    let backend = backend_with(store.clone(), Arc::default());
    backend.start().await.unwrap();
    let s = backend
        .create_session(session_config("a", 1))
        .await
        .unwrap();
    let id = s.id().clone();
    backend.stop().await.unwrap();
    assert!(record(&*store, &id).await.is_some(), "kept");
    backend.start().await.unwrap();
    let back = backend.get_session(&id).await.unwrap();
    assert_eq!(back.metadata()["plan"], json!("gold"));
    backend.stop().await.unwrap();
}

/// A store that takes its time (or counts its writes).
#[derive(Debug)]
struct Slow {
    inner: MemoryStore,
    delay: Mutex<Duration>,
    saves: AtomicUsize,
}

#[async_trait]
impl SessionStore for Slow {
    fn kind(&self) -> &str {
        "slow"
    }
    async fn save(&self, record: &SessionRecord) -> voice_backends::Result<()> {
        let delay = *self.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        self.saves.fetch_add(1, Ordering::SeqCst);
        self.inner.save(record).await
    }
    async fn load(&self, id: &SessionId) -> voice_backends::Result<Option<SessionRecord>> {
        self.inner.load(id).await
    }
    async fn delete(&self, id: &SessionId) -> voice_backends::Result<()> {
        self.inner.delete(id).await
    }
    async fn list(&self, provider: &str) -> voice_backends::Result<Vec<SessionRecord>> {
        self.inner.list(provider).await
    }
    async fn acquire(
        &self,
        id: &SessionId,
        owner: &str,
        ttl: Duration,
    ) -> voice_backends::Result<bool> {
        self.inner.acquire(id, owner, ttl).await
    }
    async fn release(&self, id: &SessionId, owner: &str) -> voice_backends::Result<()> {
        self.inner.release(id, owner).await
    }
}

/// A store that takes a second per write delays no frame, no text turn and
/// no metadata update, and the changes made meanwhile coalesce into one
/// write with the latest state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_delays_nothing_and_writes_coalesce() {
    let store = Arc::new(Slow {
        inner: MemoryStore::new(),
        delay: Mutex::new(Duration::from_secs(1)),
        saves: AtomicUsize::new(0),
    });
    let backend = backend_with(store.clone(), Arc::default());
    backend.start().await.unwrap();
    let t = Instant::now();
    let session = backend
        .create_session(session_config("a", 1))
        .await
        .unwrap();
    session.start().await.unwrap();
    let frame = voice_backends::AudioFrame::from_i16(16_000, 1, &[0i16; 320]).unwrap();
    for n in 0..50 {
        session.process_audio(frame.clone()).await.unwrap();
        session
            .update_metadata(BTreeMap::from([("n".into(), json!(n))]))
            .await
            .unwrap();
    }
    session.send_text("hi").await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "nothing waited for the store: {:?}",
        t.elapsed()
    );
    assert_eq!(session.persistence_status(), PersistenceStatus::Pending);
    eventually("the latest state is written", || async {
        store
            .inner
            .load(session.id())
            .await
            .unwrap()
            .is_some_and(|r| r.metadata["n"] == json!(49) && r.history.len() == 2)
    })
    .await;
    let saves = store.saves.load(Ordering::SeqCst);
    assert!(saves <= 4, "52 changes coalesced into {saves} writes");
    *store.delay.lock().unwrap() = Duration::ZERO;
    backend.stop().await.unwrap();
}

/// A store that goes away mid-session: the session goes on (frames, turns),
/// health turns degraded and the session says why its writes fail; once the
/// store is back the writes are retried, the record catches up and health
/// recovers. Closing while it is away deletes the record once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_degrades_health_and_is_retried() {
    let store = Arc::new(MemoryStore::new());
    let backend = backend_with(store.clone(), Arc::default());
    backend.start().await.unwrap();
    let session = backend
        .create_session(session_config("a", 1))
        .await
        .unwrap();
    session.start().await.unwrap();
    // Others closed while the store is away: their deletes come before or
    // after the session's write in the writer's batch, and the session says
    // its write failed either way.
    let mut others = Vec::new();
    for n in 2..10 {
        others.push(
            backend
                .create_session(session_config("b", n))
                .await
                .unwrap(),
        );
    }
    turn(&*store, &session, "before", 2).await;
    for other in &others {
        eventually("other written", || async {
            record(&*store, other.id()).await.is_some()
        })
        .await;
    }

    store.set_available(false);
    session.send_text("during").await.unwrap();
    for other in &others {
        other.stop().await.unwrap();
    }
    eventually("the write fails", || async {
        matches!(
            session.persistence_status(),
            PersistenceStatus::Failed { .. }
        )
    })
    .await;
    let PersistenceStatus::Failed { reason } = session.persistence_status() else {
        unreachable!()
    };
    assert!(reason.contains("unavailable"), "{reason}");
    let health = backend.health_check().await;
    assert_eq!(health.status, Health::Degraded, "{health:?}");
    assert!(health.details["store"].contains("failing"), "{health:?}");
    // The session goes on.
    let frame = voice_backends::AudioFrame::from_i16(16_000, 1, &[0i16; 320]).unwrap();
    session.process_audio(frame).await.unwrap();
    assert_eq!(backend.active_session_count(), 1);

    store.set_available(true);
    eventually("the record catches up", || async {
        record(&*store, session.id())
            .await
            .is_some_and(|r| r.history.len() == 4)
    })
    .await;
    for other in &others {
        eventually("the closed ones are deleted", || async {
            record(&*store, other.id()).await.is_none()
        })
        .await;
    }
    eventually("persisted again", || async {
        matches!(
            session.persistence_status(),
            PersistenceStatus::Persisted { .. }
        )
    })
    .await;
    assert_eq!(backend.health_check().await.status, Health::Healthy);
    backend.stop().await.unwrap();
}

/// A store unavailable at `start`: the backend starts and serves, degraded;
/// once the store is back, the kept sessions are restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_unavailable_at_start_is_retried() {
    let store = Arc::new(MemoryStore::new());
    let first = backend_with(store.clone(), Arc::default());
    first.start().await.unwrap();
    let kept = first.create_session(session_config("a", 1)).await.unwrap();
    let id = kept.id().clone();
    first.stop().await.unwrap();

    store.set_available(false);
    let second = backend_with(store.clone(), Arc::default());
    second.start().await.expect("starts without its store");
    let health = second.health_check().await;
    assert_eq!(health.status, Health::Degraded, "{health:?}");
    let fresh = second
        .create_session(SessionConfig::new("new"))
        .await
        .unwrap();
    assert!(second.get_session(&id).await.is_err());

    store.set_available(true);
    eventually("restored once the store is back", || async {
        second.get_session(&id).await.is_ok()
    })
    .await;
    eventually("the new session is written", || async {
        record(&*store, fresh.id()).await.is_some()
    })
    .await;
    assert_eq!(
        second.get_session(&id).await.unwrap().metadata()["n"],
        json!(1)
    );
    eventually("healthy", || async {
        second.health_check().await.status == Health::Healthy
    })
    .await;
    second.stop().await.unwrap();
}

/// Resuming: the running session with its token; a wrong token refused;
/// another backend sharing the store takes up a session its first backend
/// let go of, with its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_needs_the_sessions_token() {
    let store = Arc::new(MemoryStore::new());
    let a = backend_with(store.clone(), Arc::default());
    let b = backend_with(store.clone(), Arc::default());
    b.start().await.unwrap();
    a.start().await.unwrap();
    let s = a.create_session(session_config("alice", 1)).await.unwrap();
    s.start().await.unwrap();
    turn(&*store, &s, "on a", 2).await;
    let token = s.resume_token().unwrap();
    let here = a.resume_session(s.id(), &token).await.unwrap();
    assert_eq!(here.id(), s.id());
    let wrong = a
        .resume_session(s.id(), &Secret::new("0".repeat(64)))
        .await
        .unwrap_err();
    assert_eq!(wrong.code, ErrorCode::AuthenticationFailed);
    // While a runs it, b may not.
    let busy = b.resume_session(s.id(), &token).await.unwrap_err();
    assert_eq!(busy.code, ErrorCode::ConnectionFailed, "{busy}");
    let wrong = b
        .resume_session(s.id(), &Secret::new("nope"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code, ErrorCode::AuthenticationFailed);
    a.stop().await.unwrap();
    let moved = b.resume_session(s.id(), &token).await.unwrap();
    assert_eq!(moved.metadata()["plan"], json!("gold"));
    moved.set_agent(agent());
    moved.start().await.unwrap();
    turn(&*store, &moved, "on b", 4).await;
    assert_eq!(
        record(&*store, s.id()).await.unwrap().history[3].text,
        "reply to on b after 2 messages"
    );
    let unknown = b
        .resume_session(&SessionId::new("sess_nope"), &token)
        .await
        .unwrap_err();
    assert_eq!(unknown.code, ErrorCode::SessionNotFound);
    b.stop().await.unwrap();
}

/// Several backends racing to resume one session: exactly one runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_backend_wins_a_resume_race() {
    let store = Arc::new(MemoryStore::new());
    let a = backend_with(store.clone(), Arc::default());
    a.start().await.unwrap();
    let s = a.create_session(session_config("alice", 1)).await.unwrap();
    let (id, token) = (s.id().clone(), s.resume_token().unwrap());
    a.stop().await.unwrap();
    let mut racers = Vec::new();
    for _ in 0..6 {
        let b = Arc::new(backend_with(store.clone(), Arc::default()));
        b.start().await.unwrap_or_else(|e| panic!("{e}"));
        racers.push(b);
    }
    // The first to start took it up already; the others must not.
    let running: usize = racers.iter().map(|b| b.active_session_count()).sum();
    assert_eq!(running, 1, "restored by exactly one");
    let mut tasks = Vec::new();
    for b in &racers {
        let (b, id, token) = (b.clone(), id.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            b.resume_session(&id, &token).await.is_ok()
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1, "exactly one resume wins");
    for b in racers {
        b.stop().await.unwrap();
    }
}

/// A retention hook that refuses some kinds of data.
struct Refuse {
    kinds: Vec<DataKind>,
    asked: AtomicBool,
}

#[async_trait]
impl DataRetentionHook for Refuse {
    async fn should_retain(&self, _: &SessionId, kind: DataKind) -> bool {
        self.asked.store(true, Ordering::SeqCst);
        !self.kinds.contains(&kind)
    }
    fn retention_period(&self, _: DataKind) -> Duration {
        Duration::from_secs(3600)
    }
}

/// With a hook that refuses transcripts, no transcript byte reaches the
/// store (the record is there, with metadata and without history); with
/// one that refuses session state, nothing is written at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_retention_hook_keeps_transcripts_out_of_the_store() {
    let store = Arc::new(MemoryStore::new());
    let backend = backend_with(store.clone(), Arc::default());
    let hook = Arc::new(Refuse {
        kinds: vec![DataKind::Transcript],
        asked: AtomicBool::new(false),
    });
    backend.set_hooks(Hooks {
        retention: Some(hook.clone()),
        ..Hooks::default()
    });
    backend.start().await.unwrap();
    let session = backend
        .create_session(session_config("a", 1))
        .await
        .unwrap();
    session.start().await.unwrap();
    let mut events = session.events();
    session.send_text("SECRET-TRANSCRIPT-4711").await.unwrap();
    // The reply was given (so the turn happened), then a metadata change
    // forces another write.
    loop {
        if let Some(voice_backends::SessionEvent::AgentText { .. }) = events.recv().await {
            break;
        }
    }
    session
        .update_metadata(BTreeMap::from([("after".into(), json!(true))]))
        .await
        .unwrap();
    eventually("written", || async {
        record(&*store, session.id())
            .await
            .is_some_and(|r| r.metadata.contains_key("after"))
    })
    .await;
    let raw = String::from_utf8(store.raw().concat()).unwrap();
    assert!(!raw.contains("SECRET-TRANSCRIPT-4711"), "{raw}");
    assert!(!raw.contains("reply to"), "{raw}");
    assert!(hook.asked.load(Ordering::SeqCst));
    backend.stop().await.unwrap();

    let store = Arc::new(MemoryStore::new());
    let backend = backend_with(store.clone(), Arc::default());
    backend.set_hooks(Hooks {
        retention: Some(Arc::new(Refuse {
            kinds: vec![DataKind::SessionState],
            asked: AtomicBool::new(false),
        })),
        ..Hooks::default()
    });
    backend.start().await.unwrap();
    let session = backend
        .create_session(session_config("a", 1))
        .await
        .unwrap();
    session.start().await.unwrap();
    session.send_text("hello").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(session.persistence_status(), PersistenceStatus::Ephemeral);
    assert!(session.resume_token().is_none());
    assert!(store.raw().is_empty());
    backend.stop().await.unwrap();
}

/// The embedded store keeps records in its file across a reopen, lists by
/// provider, and grants a lease to one owner at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_keeps_records_and_leases() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/sessions.redb");
    let store = Arc::new(EmbeddedStore::open(&path).unwrap());
    let backend = backend_with(store.clone(), Arc::default());
    backend.start().await.unwrap();
    let s = backend
        .create_session(session_config("a", 7))
        .await
        .unwrap();
    s.start().await.unwrap();
    turn(&*store, &s, "hello", 2).await;
    let id = s.id().clone();
    backend.stop().await.unwrap();
    drop(backend);
    drop(store);
    // Opened again once the backend's writer let go of it (at once)...
    let t = Instant::now();
    let store = loop {
        match EmbeddedStore::open(&path) {
            Ok(store) => break store,
            Err(e) => assert!(t.elapsed() < Duration::from_secs(2), "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // ...and a second open while it is held is refused.
    let twice = EmbeddedStore::open(&path).unwrap_err();
    assert_eq!(twice.code, ErrorCode::ConnectionFailed, "{twice}");
    let r = store.load(&id).await.unwrap().unwrap();
    assert_eq!(r.metadata["n"], json!(7));
    assert_eq!(r.history.len(), 2);
    assert_eq!(store.list("rooms").await.unwrap().len(), 1);
    assert!(store.list("other").await.unwrap().is_empty());
    let ttl = Duration::from_millis(200);
    assert!(store.acquire(&id, "x", ttl).await.unwrap());
    assert!(!store.acquire(&id, "y", ttl).await.unwrap());
    assert!(
        store.acquire(&id, "x", ttl).await.unwrap(),
        "renewed by its owner"
    );
    store.release(&id, "y").await.unwrap();
    assert!(
        !store.acquire(&id, "y", ttl).await.unwrap(),
        "only the owner releases"
    );
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    assert!(
        store.acquire(&id, "y", ttl).await.unwrap(),
        "an expired lease is free"
    );
    store.delete(&id).await.unwrap();
    assert!(store.load(&id).await.unwrap().is_none());
}

#[cfg(feature = "cli")]
mod persistence_support;

/// `serve` with the embedded store, crashed: N sessions with metadata and
/// turns, one of them closed before the crash, `kill -9`, `serve` again on
/// the same store: every active session resumes with its metadata and its
/// conversation (the agent is given the earlier messages), the closed one
/// does not, nor does a wrong token.
#[cfg(feature = "cli")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_restores_its_sessions_after_a_crash() {
    use persistence_support::{resume, say, start, start_serve, stop};
    const BIN: &str = env!("CARGO_BIN_EXE_voice-backends");
    const N: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions.redb");
    let store = path.to_str().unwrap();
    let args = ["--store", store, "--agent", "echo"];
    let serve = start_serve(BIN, "127.0.0.1:0", &args);
    let mut sessions = Vec::new();
    for n in 0..N {
        let (mut ws, ready) = start(
            serve.addr,
            &format!("user{n}"),
            json!({"n": n, "tier": "gold"}),
        )
        .await;
        let id = ready["session_id"].as_str().unwrap().to_owned();
        let token = ready["resume_token"]
            .as_str()
            .expect("a resume token")
            .to_owned();
        assert_eq!(token.len(), 64);
        for turn in 0..=n {
            let answer = say(&mut ws, &format!("turn {turn} of {n}")).await;
            assert_eq!(
                answer,
                format!(
                    "you said: turn {turn} of {n} ({} earlier messages)",
                    2 * turn
                )
            );
        }
        sessions.push((id, token, ws));
    }
    let (closed_id, closed_token, closed_ws) = sessions.pop().unwrap();
    stop(closed_ws).await;
    // The last turn's write is under way off the session path.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    serve.crash();

    let serve = start_serve(BIN, "127.0.0.1:0", &args);
    // Held open: a session whose client closes its connection is stopped.
    let mut open = Vec::new();
    for (n, (id, token, _old)) in sessions.iter().enumerate() {
        let (mut ws, ready) = resume(serve.addr, id, token)
            .await
            .unwrap_or_else(|e| panic!("session {n} not back: {e:?}"));
        assert_eq!(ready["resumed"], true);
        assert_eq!(ready["session_id"], id.as_str());
        assert_eq!(ready["metadata"], json!({"n": n, "tier": "gold"}));
        let answer = say(&mut ws, "after the crash").await;
        let before = 2 * (n + 1);
        assert_eq!(
            answer,
            format!("you said: after the crash ({before} earlier messages)")
        );
        open.push(ws);
    }
    let refused = resume(serve.addr, &closed_id, &closed_token)
        .await
        .unwrap_err();
    assert_eq!(refused.0, 1008, "{refused:?}");
    assert!(refused.1.contains("no such active session"), "{refused:?}");
    let (id, _, _) = &sessions[0];
    let wrong = resume(serve.addr, id, &"f".repeat(64)).await.unwrap_err();
    assert_eq!(wrong.0, 1008);
    assert!(wrong.1.contains("not this session's"), "{wrong:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    serve.crash();

    // The store's file holds what was said, in order.
    let store = EmbeddedStore::open(&path).unwrap();
    let records = store.list("local").await.unwrap();
    assert_eq!(records.len(), N - 1);
    for r in &records {
        let n = r.metadata["n"].as_u64().unwrap() as usize;
        let user: Vec<&str> = r
            .history
            .iter()
            .filter(|m| m.user)
            .map(|m| m.text.as_str())
            .collect();
        let mut expected: Vec<String> = (0..=n).map(|t| format!("turn {t} of {n}")).collect();
        expected.push("after the crash".into());
        assert_eq!(user, expected);
    }
}

/// `serve` stopped gracefully (SIGTERM) keeps its active sessions: started
/// again on the same store, a client resumes with its history.
#[cfg(all(feature = "cli", unix))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_keeps_its_sessions_over_a_graceful_restart() {
    use persistence_support::{resume, say, start, start_serve};
    const BIN: &str = env!("CARGO_BIN_EXE_voice-backends");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions.redb");
    let args = ["--store", path.to_str().unwrap(), "--agent", "echo"];
    let mut serve = start_serve(BIN, "127.0.0.1:0", &args);
    let (mut ws, ready) = start(serve.addr, "dana", json!({"k": "v"})).await;
    let id = ready["session_id"].as_str().unwrap().to_owned();
    let token = ready["resume_token"].as_str().unwrap().to_owned();
    say(&mut ws, "before the restart").await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &serve.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while serve.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "serve did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(ws);
    let serve = start_serve(BIN, "127.0.0.1:0", &args);
    let (mut ws, ready) = resume(serve.addr, &id, &token)
        .await
        .unwrap_or_else(|e| panic!("not kept over the restart: {e:?}"));
    assert_eq!(ready["metadata"], json!({"k": "v"}));
    assert_eq!(
        say(&mut ws, "after").await,
        "you said: after (2 earlier messages)"
    );
}

/// A store whose writes wait while `held` is set.
#[derive(Debug, Default)]
struct HeldStore {
    inner: MemoryStore,
    held: AtomicBool,
}

#[async_trait]
impl SessionStore for HeldStore {
    fn kind(&self) -> &str {
        "held"
    }
    async fn save(&self, record: &SessionRecord) -> voice_backends::Result<()> {
        while self.held.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.inner.save(record).await
    }
    async fn load(&self, id: &SessionId) -> voice_backends::Result<Option<SessionRecord>> {
        self.inner.load(id).await
    }
    async fn delete(&self, id: &SessionId) -> voice_backends::Result<()> {
        self.inner.delete(id).await
    }
    async fn list(&self, provider: &str) -> voice_backends::Result<Vec<SessionRecord>> {
        self.inner.list(provider).await
    }
    async fn acquire(
        &self,
        id: &SessionId,
        owner: &str,
        ttl: Duration,
    ) -> voice_backends::Result<bool> {
        self.inner.acquire(id, owner, ttl).await
    }
    async fn release(&self, id: &SessionId, owner: &str) -> voice_backends::Result<()> {
        self.inner.release(id, owner).await
    }
}

/// A session stopped with its backend before the writer got to its record
/// (the writer was busy with another's): its record is still written, so
/// the next start restores it with its metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stopped_before_its_first_write_is_still_kept() {
    let store = Arc::new(HeldStore::default());
    let first = backend_with(store.clone(), Arc::default());
    first.start().await.unwrap();
    store.held.store(true, Ordering::Release);
    let busy = first.create_session(session_config("a", 1)).await.unwrap();
    // The writer takes up the first record and waits in the store...
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...while a second session is made and the backend stops.
    let late = first.create_session(session_config("b", 2)).await.unwrap();
    let store2 = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        store2.held.store(false, Ordering::Release);
    });
    first.stop().await.unwrap();

    let second = backend_with(store.clone(), Arc::default());
    second.start().await.unwrap();
    for (id, n) in [(busy.id(), 1), (late.id(), 2)] {
        let s = second.get_session(id).await.expect("restored");
        assert_eq!(s.metadata()["n"], json!(n));
    }
    second.stop().await.unwrap();
}
