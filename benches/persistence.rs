//! The cost of keeping sessions in a session store, on the session path.
//!
//! - `create/{none,memory,embedded,redis}`: `create_session` on a started
//!   `local` backend (echo S2S) without a store and with each store (the
//!   session is closed after each, untimed). The store's first write happens
//!   on the backend's writer task, not in `create_session`.
//! - `write/{memory,embedded,redis}`: one record write (`SessionStore::save`
//!   of a session with 8 messages of history and metadata): what each turn
//!   costs the writer task, off the session path. The embedded store
//!   commits durably (fsync) on every write.
//! - `turn/{none,embedded}`: a text turn, `send_text` to the agent's
//!   `AgentText` event, on a session without a store and on one whose every
//!   turn is written to the embedded store.
//! - `frame/{none,embedded}`: `process_audio` of one 20 ms frame on a
//!   started session without and with the embedded store: the per-frame
//!   cost, which persistence must not change.
//!
//! Redis: `VOICE_BACKENDS_REDIS_SERVER` or `redis-server` on the PATH,
//! started on a free loopback port (no disk); without it the `redis` cases
//! are left out (said on stderr). Build with `--features testing,redis` for
//! them.
//!
//! Run: `cargo bench --features testing,redis --bench persistence`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use voice_backends::agent::{AgentReply, Message, agent_fn};
use voice_backends::store::{
    EmbeddedStore, MemoryStore, SessionRecord, SessionStore, StoredMessage,
};
use voice_backends::{
    AudioFrame, Config, PipelineType, SessionConfig, SessionEvent, SessionId, VoiceBackend,
    registry,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

async fn backend(store: Option<Arc<dyn SessionStore>>) -> Arc<dyn VoiceBackend> {
    let mut config = Config::new("local");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    config.max_concurrent_sessions = 10_000;
    // Sessions are opened back to back: no rate limit in the way.
    config.rate_limit_per_second = 1e9;
    config.rate_limit_burst = u32::MAX;
    let backend = registry().create("local", &config).await.unwrap();
    if let Some(store) = store {
        backend.set_session_store(store);
    }
    backend.start().await.unwrap();
    backend
}

fn session_config() -> SessionConfig {
    let mut c = SessionConfig::new("bench").with_agent(agent_fn(|turn| async move {
        Ok(AgentReply::text(format!("you said {}", turn.transcript)))
    }));
    c.metadata.insert("plan".into(), json!("gold"));
    c.metadata.insert("locale".into(), json!("en-GB"));
    c
}

/// A redis-server of the bench's own, killed when dropped.
#[cfg(feature = "redis")]
struct Redis(std::process::Child, String);

#[cfg(feature = "redis")]
impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(feature = "redis")]
fn start_redis(dir: &std::path::Path) -> Option<Redis> {
    let binary = std::env::var_os("VOICE_BACKENDS_REDIS_SERVER")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join("redis-server"))
                .find(|p| p.is_file())
        })?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let url = format!("redis://127.0.0.1:{port}/");
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(Redis(child, url));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// The stores measured, by name.
fn stores(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
) -> Vec<(&'static str, Arc<dyn SessionStore>)> {
    #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
    let mut stores: Vec<(&'static str, Arc<dyn SessionStore>)> = vec![
        ("memory", Arc::new(MemoryStore::new())),
        (
            "embedded",
            Arc::new(EmbeddedStore::open(dir.join("bench.redb")).unwrap()),
        ),
    ];
    #[cfg(feature = "redis")]
    {
        match REDIS.get_or_init(|| start_redis(dir)) {
            Some(redis) => {
                let store = rt
                    .block_on(voice_backends::store::RedisStore::connect(&redis.1))
                    .unwrap();
                stores.push(("redis", Arc::new(store)));
            }
            None => eprintln!("redis cases left out: no redis-server"),
        }
    }
    #[cfg(not(feature = "redis"))]
    {
        let _ = rt;
        eprintln!("redis cases left out: built without the redis feature");
    }
    stores
}

#[cfg(feature = "redis")]
static REDIS: std::sync::OnceLock<Option<Redis>> = std::sync::OnceLock::new();

/// A record of a session 4 turns in.
fn record() -> SessionRecord {
    let history: Vec<StoredMessage> = (0..8)
        .map(|n| {
            let m = if n % 2 == 0 {
                Message::user(format!("what the user said in turn {n}, a sentence or two"))
            } else {
                Message::agent(format!(
                    "what the agent answered to turn {n}, a little longer than that"
                ))
            };
            StoredMessage::from(&m)
        })
        .collect();
    let mut config = SessionConfig::new("bench");
    config.agent = None;
    SessionRecord {
        id: SessionId::new("sess_bench"),
        provider: "local".into(),
        user_id: "bench".into(),
        config,
        metadata: [("plan".to_owned(), json!("gold"))].into_iter().collect(),
        state: voice_backends::PipelineState::Listening,
        history,
        info: Default::default(),
        resume_token_sha256: Some("ab".repeat(32)),
        revision: 1,
        saved_at_ms: 0,
    }
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let stores = stores(&rt, dir.path());

    let mut group = c.benchmark_group("create");
    let mut cases: Vec<(&str, Option<Arc<dyn SessionStore>>)> = vec![("none", None)];
    cases.extend(stores.iter().map(|(n, s)| (*n, Some(s.clone()))));
    for (name, store) in &cases {
        let backend = rt.block_on(backend(store.clone()));
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        let t = Instant::now();
                        let s = backend.create_session(session_config()).await.unwrap();
                        spent += t.elapsed();
                        backend.close_session(s.id()).await.unwrap();
                    }
                    spent
                })
            })
        });
        rt.block_on(backend.stop()).unwrap();
    }
    group.finish();

    let mut group = c.benchmark_group("write");
    let record = record();
    for (name, store) in &stores {
        group.bench_function(*name, |b| {
            b.iter(|| rt.block_on(store.save(black_box(&record))).unwrap())
        });
    }
    group.finish();

    let embedded = stores
        .iter()
        .find(|(n, _)| *n == "embedded")
        .map(|(_, s)| s.clone());
    let mut group = c.benchmark_group("turn");
    for (name, store) in [("none", None), ("embedded", embedded.clone())] {
        let backend = rt.block_on(backend(store));
        let session = rt
            .block_on(backend.create_session(session_config()))
            .unwrap();
        rt.block_on(session.start()).unwrap();
        let mut events = session.events();
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    session.send_text("hello there").await.unwrap();
                    while !matches!(events.recv().await, Some(SessionEvent::AgentText { .. })) {}
                })
            })
        });
        rt.block_on(backend.stop()).unwrap();
    }
    group.finish();

    let mut group = c.benchmark_group("frame");
    let frame = AudioFrame::from_i16(16_000, 1, &[0i16; 320]).unwrap();
    for (name, store) in [("none", None), ("embedded", embedded)] {
        let backend = rt.block_on(backend(store));
        let session = rt
            .block_on(backend.create_session(session_config()))
            .unwrap();
        rt.block_on(session.start()).unwrap();
        let mut audio = session.receive_audio().unwrap();
        rt.spawn(async move { while audio.recv().await.is_some() {} });
        group.bench_function(name, |b| {
            b.iter(|| rt.block_on(session.process_audio(black_box(frame.clone()))))
        });
        rt.block_on(backend.stop()).unwrap();
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
