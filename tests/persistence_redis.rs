//! The Redis session store against a real `redis-server` (Debian's), started
//! by each test on a free loopback port in a temp dir: `serve` crashed and
//! restarted on Redis, a session resumed on another instance, lease
//! exclusivity, a wrong token refused, Redis going away and coming back, and
//! no transcript byte in Redis with a refusing retention hook.
//!
//! The server binary: `VOICE_BACKENDS_REDIS_SERVER` (set by `scripts/test`),
//! else `redis-server` on the PATH; without either, each test prints
//! `skipped: ...` and returns.
#![cfg(feature = "redis")]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;
use voice_backends::agent::{AgentReply, agent_fn};
use voice_backends::hooks::{DataKind, DataRetentionHook, Hooks};
use voice_backends::runtime::{Connector, RuntimeBackend};
use voice_backends::store::{RedisStore, SessionStore};
use voice_backends::{
    Config, ErrorCode, Health, PersistenceStatus, PipelineType, ProviderCapabilities,
    SessionConfig, SessionId, VoiceBackend,
};

#[cfg(feature = "cli")]
mod persistence_support;

/// The `redis-server` binary, or `None` (the test is skipped).
fn redis_server() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("VOICE_BACKENDS_REDIS_SERVER") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "VOICE_BACKENDS_REDIS_SERVER={} is not a file",
            path.display()
        );
        return Some(path);
    }
    let on_path = std::env::var_os("PATH")?;
    std::env::split_paths(&on_path)
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
}

/// A `redis-server` of the test's own, killed when dropped.
struct Redis {
    binary: PathBuf,
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    /// Starts one on a free port, or `None` (skipped) without the binary.
    fn start(test: &str) -> Option<Redis> {
        let Some(binary) = redis_server() else {
            println!(
                "skipped: {test} needs redis-server (install Debian's redis-server or set \
                 VOICE_BACKENDS_REDIS_SERVER)"
            );
            return None;
        };
        // A free port: bound here, then handed over.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Redis {
            binary,
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.up();
        Some(redis)
    }

    /// (Re)starts the server on its port and directory; what it had written
    /// (append-only file, fsync on every write) comes back.
    fn up(&mut self) {
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--daemonize", "no", "--protected-mode", "yes"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut c) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGKILL): the store is gone.
    fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Every key with its value(s), as bytes.
    fn dump(&self) -> Vec<(String, Vec<u8>)> {
        let mut c = redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
        keys.into_iter()
            .map(|k| {
                let kind: String = redis::cmd("TYPE").arg(&k).query(&mut c).unwrap();
                let bytes = match kind.as_str() {
                    "string" => redis::cmd("GET").arg(&k).query(&mut c).unwrap(),
                    "set" => {
                        let members: Vec<Vec<u8>> =
                            redis::cmd("SMEMBERS").arg(&k).query(&mut c).unwrap();
                        members.concat()
                    }
                    other => panic!("unexpected {other} key {k}"),
                };
                (k, bytes)
            })
            .collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.down();
    }
}

/// A connector with nothing to connect to.
struct Nothing;

#[async_trait]
impl Connector for Nothing {
    fn provider(&self) -> &str {
        "nothing"
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
}

async fn backend(redis: &Redis, ttl: Duration) -> RuntimeBackend {
    let mut config = Config::new("nothing");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    config.timeout = Duration::from_secs(1);
    let backend = RuntimeBackend::new(Arc::new(Nothing), &config).unwrap();
    let store = RedisStore::connect_with(&redis.url(), "vb:", Duration::from_millis(500))
        .await
        .unwrap()
        .with_lease_ttl(ttl);
    backend.set_session_store(Arc::new(store));
    backend
}

fn session_config(user: &str) -> SessionConfig {
    let mut c = SessionConfig::new(user).with_agent(agent_fn(|turn| async move {
        Ok(AgentReply::text(format!(
            "reply to {} after {}",
            turn.transcript,
            turn.history.len()
        )))
    }));
    c.metadata.insert("user".into(), json!(user));
    c
}

async fn eventually<F: FnMut() -> Fut, Fut: Future<Output = bool>>(what: &str, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Of many instances taking one lease at once, exactly one gets it; the
/// holder renews it, the others get it once it expired, and only the holder
/// releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_instance_takes_a_lease() {
    let Some(redis) = Redis::start("exactly_one_instance_takes_a_lease") else {
        return;
    };
    let mut stores = Vec::new();
    for _ in 0..8 {
        stores.push(Arc::new(RedisStore::connect(&redis.url()).await.unwrap()));
    }
    let id = SessionId::new("sess_race");
    let ttl = Duration::from_millis(400);
    for round in 0..5 {
        let id = SessionId::new(format!("sess_race_{round}"));
        let mut tasks = Vec::new();
        for (n, store) in stores.iter().enumerate() {
            let (store, id) = (store.clone(), id.clone());
            tasks.push(tokio::spawn(async move {
                store.acquire(&id, &format!("owner{n}"), ttl).await.unwrap()
            }));
        }
        let mut granted = 0;
        for t in tasks {
            granted += usize::from(t.await.unwrap());
        }
        assert_eq!(granted, 1, "round {round}");
    }
    assert!(stores[0].acquire(&id, "a", ttl).await.unwrap());
    assert!(!stores[1].acquire(&id, "b", ttl).await.unwrap());
    assert!(stores[0].acquire(&id, "a", ttl).await.unwrap(), "renewed");
    stores[1].release(&id, "b").await.unwrap();
    assert!(
        !stores[1].acquire(&id, "b", ttl).await.unwrap(),
        "not b's to release"
    );
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert!(stores[1].acquire(&id, "b", ttl).await.unwrap(), "expired");
    stores[1].release(&id, "b").await.unwrap();
    assert!(stores[2].acquire(&id, "c", ttl).await.unwrap(), "released");
}

/// Backends sharing Redis: a session opened on A is refused on B while A
/// runs it (and to a wrong token), taken up by B once A is gone (its lease
/// expired) with its metadata and history; of several backends racing for
/// it, exactly one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_to_another_instance_once_its_lease_expires() {
    let Some(redis) = Redis::start("a_session_moves_to_another_instance_once_its_lease_expires")
    else {
        return;
    };
    let ttl = Duration::from_millis(600);
    let b = backend(&redis, ttl).await;
    b.start().await.unwrap();
    let a = backend(&redis, ttl).await;
    a.start().await.unwrap();
    let s = a.create_session(session_config("alice")).await.unwrap();
    s.start().await.unwrap();
    let mut events = s.events();
    s.send_text("hello").await.unwrap();
    while !matches!(
        events.recv().await,
        Some(voice_backends::SessionEvent::AgentText { .. })
    ) {}
    let (id, token) = (s.id().clone(), s.resume_token().unwrap());
    eventually("the turn is in redis", || async {
        let store = RedisStore::connect(&redis.url()).await.unwrap();
        store
            .load(&id)
            .await
            .unwrap()
            .is_some_and(|r| r.history.len() == 2)
    })
    .await;
    let busy = b.resume_session(&id, &token).await.unwrap_err();
    assert_eq!(busy.code, ErrorCode::ConnectionFailed, "{busy}");
    let wrong = b
        .resume_session(&id, &voice_backends::Secret::new("a".repeat(64)))
        .await
        .unwrap_err();
    assert_eq!(wrong.code, ErrorCode::AuthenticationFailed);
    // A is gone without a word (no stop, no release): its lease runs out.
    drop(s);
    drop(events);
    drop(a);
    let mut racers = vec![Arc::new(b)];
    for _ in 0..3 {
        let c = backend(&redis, ttl).await;
        c.start().await.unwrap();
        racers.push(Arc::new(c));
    }
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let mut tasks = Vec::new();
    for r in &racers {
        let (r, id, token) = (r.clone(), id.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            r.resume_session(&id, &token).await.map(|s| s.metadata())
        }));
    }
    let mut wins = Vec::new();
    for t in tasks {
        if let Ok(metadata) = t.await.unwrap() {
            wins.push(metadata);
        }
    }
    assert_eq!(wins.len(), 1, "exactly one instance runs the session");
    assert_eq!(wins[0]["user"], json!("alice"));
    let running: Vec<_> = racers
        .iter()
        .filter(|r| r.active_session_count() == 1)
        .collect();
    assert_eq!(running.len(), 1);
    let moved = running[0].get_session(&id).await.unwrap();
    moved.set_agent(agent_fn(|turn| async move {
        Ok(AgentReply::text(format!("after {}", turn.history.len())))
    }));
    moved.start().await.unwrap();
    let mut events = moved.events();
    moved.send_text("again").await.unwrap();
    loop {
        if let Some(voice_backends::SessionEvent::AgentText { text }) = events.recv().await {
            assert_eq!(text, "after 2", "the history came along");
            break;
        }
    }
    for r in racers {
        r.stop().await.unwrap();
    }
}

/// Redis going away mid-session and coming back: the session goes on,
/// health is degraded meanwhile, and the record catches up. A backend
/// started while Redis is away starts (degraded) and restores the kept
/// sessions once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_and_coming_back() {
    let Some(mut redis) = Redis::start("redis_going_away_and_coming_back") else {
        return;
    };
    let ttl = Duration::from_millis(500);
    let a = backend(&redis, ttl).await;
    a.start().await.unwrap();
    let s = a.create_session(session_config("bob")).await.unwrap();
    s.start().await.unwrap();
    let id = s.id().clone();
    eventually("persisted", || async {
        matches!(s.persistence_status(), PersistenceStatus::Persisted { .. })
    })
    .await;

    redis.down();
    s.update_metadata(BTreeMap::from([("while".into(), json!("away"))]))
        .await
        .unwrap();
    s.send_text("during").await.unwrap();
    eventually("the write fails", || async {
        matches!(s.persistence_status(), PersistenceStatus::Failed { .. })
    })
    .await;
    assert_eq!(a.health_check().await.status, Health::Degraded);
    let frame = voice_backends::AudioFrame::from_i16(16_000, 1, &[0i16; 320]).unwrap();
    s.process_audio(frame).await.unwrap();
    assert_eq!(a.active_session_count(), 1, "the session goes on");

    redis.up();
    eventually("the record catches up", || async {
        let Ok(store) = RedisStore::connect(&redis.url()).await else {
            return false;
        };
        store.load(&id).await.ok().flatten().is_some_and(|r| {
            r.metadata.get("while") == Some(&json!("away")) && r.history.len() == 2
        })
    })
    .await;
    eventually("healthy again", || async {
        a.health_check().await.status == Health::Healthy
    })
    .await;
    a.stop().await.unwrap();

    // Away at start.
    let b = backend(&redis, ttl).await;
    redis.down();
    b.start().await.expect("starts without its store");
    assert_eq!(b.health_check().await.status, Health::Degraded);
    assert!(b.get_session(&id).await.is_err());
    redis.up();
    eventually("restored once redis is back", || async {
        b.get_session(&id).await.is_ok()
    })
    .await;
    assert_eq!(
        b.get_session(&id).await.unwrap().metadata()["while"],
        json!("away")
    );
    b.stop().await.unwrap();
}

struct NoTranscripts(AtomicBool);

#[async_trait]
impl DataRetentionHook for NoTranscripts {
    async fn should_retain(&self, _: &SessionId, kind: DataKind) -> bool {
        self.0.store(true, Ordering::SeqCst);
        kind != DataKind::Transcript
    }
    fn retention_period(&self, _: DataKind) -> Duration {
        Duration::from_secs(60)
    }
}

/// With a hook that refuses transcripts, no key of Redis holds a byte of
/// what was said; without it, they do (the check can see them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_transcript_reaches_redis_when_the_hook_refuses() {
    let Some(redis) = Redis::start("no_transcript_reaches_redis_when_the_hook_refuses") else {
        return;
    };
    for refuse in [false, true] {
        let a = backend(&redis, Duration::from_secs(5)).await;
        let hook = Arc::new(NoTranscripts(AtomicBool::new(false)));
        if refuse {
            a.set_hooks(Hooks {
                retention: Some(hook.clone()),
                ..Hooks::default()
            });
        }
        a.start().await.unwrap();
        let s = a.create_session(session_config("carol")).await.unwrap();
        s.start().await.unwrap();
        let mut events = s.events();
        let said = format!("TRANSCRIPT-{refuse}-9931");
        s.send_text(&said).await.unwrap();
        while !matches!(
            events.recv().await,
            Some(voice_backends::SessionEvent::AgentText { .. })
        ) {}
        s.update_metadata(BTreeMap::from([("done".into(), json!(refuse))]))
            .await
            .unwrap();
        eventually("written", || async {
            redis.dump().iter().any(|(k, v)| {
                k.starts_with("vb:session:")
                    && String::from_utf8_lossy(v).contains(&format!("\"done\":{refuse}"))
            })
        })
        .await;
        let found = redis
            .dump()
            .iter()
            .any(|(_, v)| String::from_utf8_lossy(v).contains(&said));
        assert_eq!(found, !refuse, "transcript in redis: {found}");
        if refuse {
            assert!(hook.0.load(Ordering::SeqCst));
        }
        a.stop().await.unwrap();
    }
}

/// `serve` on Redis, two instances: sessions opened on A; A crashes
/// (`kill -9`); the users resume on B (refused while A's leases last, then
/// taken up) with their metadata and history; a closed session and a wrong
/// token are refused.
#[cfg(feature = "cli")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_sessions_resume_on_another_instance_after_a_crash() {
    use persistence_support::{resume, say, start, start_serve, stop};
    const BIN: &str = env!("CARGO_BIN_EXE_voice-backends");
    let Some(redis) = Redis::start("serve_sessions_resume_on_another_instance_after_a_crash")
    else {
        return;
    };
    let url = redis.url();
    let args = ["--store", url.as_str(), "--agent", "echo"];
    let a = start_serve(BIN, "127.0.0.1:0", &args);
    let b = start_serve(BIN, "127.0.0.1:0", &args);
    let mut sessions = Vec::new();
    for n in 0..3 {
        let (mut ws, ready) = start(a.addr, &format!("u{n}"), json!({"n": n})).await;
        let id = ready["session_id"].as_str().unwrap().to_owned();
        let token = ready["resume_token"].as_str().unwrap().to_owned();
        for t in 0..=n {
            say(&mut ws, &format!("t{t}")).await;
        }
        sessions.push((id, token, ws));
    }
    let (closed_id, closed_token, closed_ws) = sessions.pop().unwrap();
    stop(closed_ws).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // While A runs them, B refuses to.
    let busy = resume(b.addr, &sessions[0].0, &sessions[0].1)
        .await
        .unwrap_err();
    assert_eq!(busy.0, 1013, "{busy:?}");
    a.crash();
    let mut open = Vec::new();
    for (n, (id, token, _)) in sessions.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(40);
        let (mut ws, ready) = loop {
            match resume(b.addr, id, token).await {
                Ok(r) => break r,
                // A's lease has not expired yet.
                Err((1013, _)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("session {n} not resumed on B: {e:?}"),
            }
        };
        assert_eq!(ready["resumed"], true);
        assert_eq!(ready["metadata"], json!({"n": n}));
        let answer = say(&mut ws, "on b").await;
        assert_eq!(
            answer,
            format!("you said: on b ({} earlier messages)", 2 * (n + 1))
        );
        open.push(ws);
    }
    let gone = resume(b.addr, &closed_id, &closed_token).await.unwrap_err();
    assert_eq!(gone.0, 1008, "{gone:?}");
    let wrong = resume(b.addr, &sessions[0].0, &"0".repeat(64))
        .await
        .unwrap_err();
    assert_eq!(wrong.0, 1008, "{wrong:?}");
    b.crash();
}
