#![cfg(all(feature = "livekit", feature = "testing"))]
//! The `livekit` provider's worker mode against an in-process `/agent`
//! endpoint (`tests/livekit_worker/server.rs`) that checks the worker's
//! token with LiveKit's own verifier and plays the server's side of the
//! protocol in `livekit_protocol`'s messages: registration, job offers
//! (accepted under capacity, refused when full), assignments, load reports,
//! terminations, pings, dropped connections and registering again,
//! malformed messages, stopping.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use livekit_protocol as proto;
use proptest::prelude::*;
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use voice_backends::providers::livekit::worker::{
    Dispatch, JobKind, Load, ServerEvent, Worker, WorkerOptions, WorkerState, agent_url,
    decode_server_message,
};
use voice_backends::runtime::{LinkRequest, RetryPolicy};
use voice_backends::session::SessionInfo;
use voice_backends::{Config, ErrorCode, Secret, SessionConfig};

#[path = "livekit_worker/server.rs"]
mod server;
use server::{AgentServer, Conn, WAIT};

use proto::server_message::Message as S;
use proto::worker_message::Message as W;

const KEY: &str = "APIworkerkey";
const SECRET: &str = "worker-secret-worker-secret-worker-secret";

fn options(url: &str) -> WorkerOptions {
    let mut o = WorkerOptions::new(url, Secret::new(KEY), Secret::new(SECRET));
    o.agent_name = "support".into();
    o.report_interval = Duration::from_millis(300);
    o.load_check_interval = Duration::from_millis(50);
    o.ping_interval = Duration::from_secs(1);
    o.ping_timeout = Duration::from_secs(3);
    o.assignment_timeout = Duration::from_secs(2);
    o.retry = RetryPolicy {
        max_retries: 3,
        retry_delay: Duration::from_millis(50),
        timeout: Duration::from_secs(2),
    };
    o
}

/// Sessions the application runs (what the worker's load reads).
#[derive(Clone, Default)]
struct Sessions(Arc<AtomicUsize>);

impl Sessions {
    fn load(
        &self,
        capacity: usize,
    ) -> Arc<dyn voice_backends::providers::livekit::worker::WorkerLoad> {
        let active = self.0.clone();
        Arc::new(move || Load {
            active: active.load(Ordering::SeqCst),
            capacity,
        })
    }
}

/// A worker started with `options`, registered as `AW_1`, and its
/// connection past the first load report.
async fn started(
    server: &mut AgentServer,
    options: WorkerOptions,
    capacity: usize,
) -> (Worker, Conn, Sessions) {
    let sessions = Sessions::default();
    let start = tokio::spawn(Worker::start(options, sessions.load(capacity)));
    let mut conn = server.next_conn().await;
    conn.register("AW_1").await;
    let worker = start.await.unwrap().expect("the worker starts");
    let first = conn.update_where(|_| true).await;
    assert_eq!(first.status, Some(proto::WorkerStatus::WsAvailable as i32));
    (worker, conn, sessions)
}

fn status(u: &proto::UpdateWorkerStatus) -> proto::WorkerStatus {
    proto::WorkerStatus::try_from(u.status.expect("a status")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_with_an_agent_token_and_reports_its_load() {
    let mut server = AgentServer::start(KEY, SECRET).await;
    let mut o = options(&server.url);
    o.namespace = Some("ns".into());
    o.kind = JobKind::Publisher;
    let shown = format!("{o:?}");
    assert!(!shown.contains(SECRET) && !shown.contains(KEY), "{shown}");
    let start = tokio::spawn(Worker::start(o, Sessions::default().load(4)));
    let mut conn = server.next_conn().await;
    // The token: issued by the key, signed with the secret (the verifier
    // checked both), the agent grant and nothing that joins a room.
    assert_eq!(conn.claims.iss, KEY);
    assert!(conn.claims.video.agent);
    assert!(!conn.claims.video.room_join && conn.claims.video.room.is_empty());
    assert!(conn.claims.exp > conn.claims.nbf);
    let request = conn.register("AW_1").await;
    assert_eq!(request.r#type, proto::JobType::JtPublisher as i32);
    assert_eq!(request.agent_name, "support");
    assert_eq!(request.namespace.as_deref(), Some("ns"));
    assert!(request.version.starts_with("voice-backends/"));
    assert_eq!(request.ping_interval, 1);
    let permissions = request.allowed_permissions.expect("permissions");
    assert!(permissions.can_publish && permissions.can_subscribe && permissions.can_publish_data);
    let worker = start.await.unwrap().expect("the worker starts");
    assert_eq!(worker.worker_id().as_deref(), Some("AW_1"));
    assert_eq!(worker.state(), WorkerState::Registered);
    let first = conn.update_where(|_| true).await;
    assert_eq!(status(&first), proto::WorkerStatus::WsAvailable);
    assert_eq!((first.load, first.job_count), (0.0, 0));
    // Nothing changes, yet the load is reported again every 300 ms.
    let t0 = tokio::time::Instant::now();
    for _ in 0..3 {
        let again = conn.update_where(|_| true).await;
        assert_eq!((again.load, again.job_count), (0.0, 0));
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let health = worker.health();
    assert_eq!(health["livekit_worker_state"], "registered");
    assert_eq!(health["livekit_worker_id"], "AW_1");
    assert_eq!(health["livekit_worker_registrations"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_are_accepted_under_capacity_and_refused_when_full() {
    let mut server = AgentServer::start(KEY, SECRET).await;
    let o = options(&server.url);
    let (worker, mut conn, sessions) = started(&mut server, o, 2).await;

    let a = conn.offer("J1", "room-1").await;
    assert!(a.available);
    assert_eq!(a.job_id, "J1");
    assert_eq!(a.participant_identity, "agent-J1");
    assert_eq!(a.participant_attributes["lk.agent_name"], "support");
    let u = conn.update_where(|u| u.load > 0.0).await;
    assert_eq!(
        (status(&u), u.load),
        (proto::WorkerStatus::WsAvailable, 0.5)
    );

    assert!(conn.offer("J2", "room-2").await.available);
    let u = conn.update_where(|u| u.load >= 1.0).await;
    assert_eq!(status(&u), proto::WorkerStatus::WsFull);
    // Two offers held, capacity 2: the third is refused.
    let refused = conn.offer("J3", "room-3").await;
    assert!(!refused.available);
    assert_eq!(refused.job_id, "J3");
    assert!(refused.participant_identity.is_empty());

    conn.assign("J1", "room-1", "server-minted-1", None).await;
    conn.assign(
        "J2",
        "room-2",
        "server-minted-2",
        Some("wss://media.example:7880"),
    )
    .await;
    let job1 = tokio::time::timeout(WAIT, worker.next_job())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job1.id, "J1");
    assert_eq!(job1.room, "room-1");
    assert_eq!(job1.identity, "agent-J1");
    assert_eq!(job1.token.expose(), "server-minted-1");
    assert_eq!(job1.url, server.url);
    assert_eq!(job1.participant.as_deref(), Some("user"));
    assert_eq!(job1.dispatch_id, "AD_J1");
    assert_eq!(job1.metadata, "meta-J1");
    assert!(!format!("{job1:?}").contains("server-minted"));
    // J1 runs, J2 waits to be taken: still full.
    let u = conn.update_where(|u| u.job_count == 2).await;
    assert_eq!((worker.running(), worker.queued()), (1, 1));
    assert_eq!(status(&u), proto::WorkerStatus::WsFull);
    assert!(!conn.offer("J4", "room-4").await.available);

    // The session of J1 ends: the server hears the job ended, the worker
    // has room again.
    drop(job1);
    let ended = conn.job_update().await;
    assert_eq!(ended.job_id, "J1");
    assert_eq!(ended.status, proto::JobStatus::JsSuccess as i32);
    let u = conn
        .update_where(|u| u.status == Some(proto::WorkerStatus::WsAvailable as i32))
        .await;
    assert_eq!((u.load, u.job_count), (0.5, 1));
    assert!(conn.offer("J5", "room-5").await.available);
    let job2 = worker.try_next_job().expect("J2 is queued");
    assert_eq!(job2.url, "wss://media.example:7880");
    job2.fail("the room could not be joined");
    let failed = conn.job_update().await;
    assert_eq!(
        (failed.job_id.as_str(), failed.status),
        ("J2", proto::JobStatus::JsFailed as i32)
    );
    assert_eq!(failed.error, "the room could not be joined");

    // Sessions the application runs count too: with two running and J5
    // held, the worker is full without any event, and says so.
    sessions.0.store(2, Ordering::SeqCst);
    conn.update_where(|u| u.status == Some(proto::WorkerStatus::WsFull as i32))
        .await;
    assert!(!conn.offer("J6", "room-6").await.available);
    let counters = worker.counters();
    assert_eq!(counters.offers_accepted.load(Ordering::SeqCst), 3);
    assert_eq!(counters.offers_refused.load(Ordering::SeqCst), 3);
    assert_eq!(counters.assignments.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminations_drop_queued_jobs_and_end_running_ones() {
    let mut server = AgentServer::start(KEY, SECRET).await;
    let o = options(&server.url);
    let (worker, mut conn, _) = started(&mut server, o, 4).await;
    for (id, room) in [("J1", "r1"), ("J2", "r2")] {
        assert!(conn.offer(id, room).await.available);
        conn.assign(id, room, "t", None).await;
    }
    let job1 = tokio::time::timeout(WAIT, worker.next_job())
        .await
        .unwrap()
        .unwrap();
    conn.update_where(|u| u.job_count == 2).await;

    // A queued job the server ends is never handed out.
    conn.terminate("J2").await;
    let ended = conn.job_update().await;
    assert_eq!(
        (ended.job_id.as_str(), ended.status),
        ("J2", proto::JobStatus::JsSuccess as i32)
    );
    assert_eq!(worker.queued(), 0);
    assert!(worker.try_next_job().is_none());

    // A running one is told, and ends when its session lets it go.
    assert!(!job1.is_terminated());
    conn.terminate("J1").await;
    tokio::time::timeout(WAIT, job1.terminated())
        .await
        .expect("J1 hears its termination");
    assert!(job1.is_terminated());
    drop(job1);
    assert_eq!(conn.job_update().await.job_id, "J1");
    assert_eq!(worker.counters().terminations.load(Ordering::SeqCst), 2);

    // An offer the server takes back: its late assignment is reported failed.
    assert!(conn.offer("J3", "r3").await.available);
    conn.terminate("J3").await;
    conn.assign("J3", "r3", "t", None).await;
    let failed = conn.job_update().await;
    assert_eq!(
        (failed.job_id.as_str(), failed.status),
        ("J3", proto::JobStatus::JsFailed as i32)
    );
    assert!(worker.try_next_job().is_none());
    assert_eq!(
        worker
            .counters()
            .assignments_unexpected
            .load(Ordering::SeqCst),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_offer_without_assignment_gives_its_place_back() {
    let mut server = AgentServer::start(KEY, SECRET).await;
    let mut o = options(&server.url);
    o.assignment_timeout = Duration::from_millis(300);
    let (worker, mut conn, _) = started(&mut server, o, 1).await;
    assert!(conn.offer("J1", "r1").await.available);
    assert!(!conn.offer("J2", "r2").await.available);
    conn.update_where(|u| {
        u.status == Some(proto::WorkerStatus::WsAvailable as i32) && u.load == 0.0
    })
    .await;
    assert!(conn.offer("J3", "r3").await.available);
    assert_eq!(
        worker
            .counters()
            .assignments_timed_out
            .load(Ordering::SeqCst),
        1
    );
    // J1's assignment, too late, is reported failed; J3's is queued.
    conn.assign("J1", "r1", "t", None).await;
    assert_eq!(
        conn.job_update().await.status,
        proto::JobStatus::JsFailed as i32
    );
    conn.assign("J3", "r3", "t", None).await;
    let job = tokio::time::timeout(WAIT, worker.next_job())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.id, "J3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_dialed_again_and_registered_again() {
    let mut server = AgentServer::start(KEY, SECRET).await;
    let o = options(&server.url);
    let (worker, mut conn, _) = started(&mut server, o, 4).await;
    assert!(conn.offer("J1", "r1").await.available);
    conn.assign("J1", "r1", "t", None).await;
    let job1 = tokio::time::timeout(WAIT, worker.next_job())
        .await
        .unwrap()
        .unwrap();
    // An offer accepted on the old connection is forgotten with it.
    assert!(conn.offer("J2", "r2").await.available);
    let mut state = worker.watch_state();
    drop(conn);

    let mut conn = server.next_conn().await;
    // A fresh token, verified again.
    assert!(conn.claims.video.agent);
    conn.register("AW_2").await;
    // The server hears of the job the worker still runs, then its load.
    let held = conn
        .recv_where(|m| match m {
            W::MigrateJob(m) => Some(m.job_ids),
            _ => None,
        })
        .await;
    assert_eq!(held, vec!["J1".to_owned()]);
    let u = conn.update_where(|_| true).await;
    assert_eq!((u.job_count, u.load), (1, 0.25));
    tokio::time::timeout(WAIT, state.wait_for(|s| *s == WorkerState::Registered))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(worker.worker_id().as_deref(), Some("AW_2"));
    let counters = worker.counters();
    assert_eq!(counters.messages.reconnects.load(Ordering::SeqCst), 1);
    assert_eq!(counters.registrations.load(Ordering::SeqCst), 2);
    // The job outlived the connection: its end reaches the new one.
    drop(job1);
    assert_eq!(conn.job_update().await.job_id, "J1");

    // A server draining the connection sends the worker to register again.
    conn.send(S::GoAway(proto::agent_http::GoAway {
        reason: "node draining".into(),
    }))
    .await;
    assert!(conn.closed_within(WAIT).await);
    let mut conn = server.next_conn().await;
    conn.register("AW_3").await;
    assert!(conn.offer("J9", "r9").await.available);
    assert_eq!(
        worker.counters().messages.reconnects.load(Ordering::SeqCst),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_are_answered_and_a_silent_server_is_left() {
    let mut server = AgentServer::start(KEY, SECRET).await;
    let mut o = options(&server.url);
    o.ping_interval = Duration::from_millis(200);
    o.ping_timeout = Duration::from_millis(800);
    let (worker, mut conn, _) = started(&mut server, o, 1).await;
    // Answered pings keep the connection for longer than the timeout.
    let t0 = tokio::time::Instant::now();
    let mut pings = 0;
    conn.pong = false;
    while t0.elapsed() < Duration::from_millis(1600) {
        if let W::Ping(ping) = conn.recv().await {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            assert!(
                (now - ping.timestamp).abs() < 1000,
                "a ping stamped {}",
                ping.timestamp
            );
            pings += 1;
            conn.send(S::Pong(proto::WorkerPong {
                last_timestamp: ping.timestamp,
                timestamp: now,
            }))
            .await;
        }
    }
    assert!(pings >= 5, "{pings} pings");
    assert!(server.conn_within(Duration::ZERO).await.is_none());
    // A server that goes silent is left and dialed again.
    let silent = conn;
    let mut conn = server.next_conn().await;
    conn.register("AW_2").await;
    drop(silent);
    // The first report on the new connection comes after it is counted.
    conn.update_where(|_| true).await;
    assert_eq!(
        worker.counters().messages.reconnects.load(Ordering::SeqCst),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_server_messages_are_counted_and_skipped() {
    let mut server = AgentServer::start(KEY, SECRET).await;
    let o = options(&server.url);
    let (worker, mut conn, _) = started(&mut server, o, 2).await;
    let mut no_room = server::job("J1", "r");
    no_room.room = None;
    let mut no_id = server::job("", "r");
    no_id.dispatch_id.clear();
    let bad: Vec<WsMessage> = vec![
        WsMessage::Binary(vec![0xff, 0xff, 0xff, 0xff].into()),
        WsMessage::Binary(vec![0x0a, 0x05, 0x01].into()),
        WsMessage::Text("{\"availability\": {}}".into()),
        WsMessage::Binary(proto::ServerMessage::default().encode_to_vec().into()),
        encode(S::Availability(proto::AvailabilityRequest {
            job: None,
            resuming: false,
        })),
        encode(S::Availability(proto::AvailabilityRequest {
            job: Some(no_room),
            resuming: false,
        })),
        encode(S::Availability(proto::AvailabilityRequest {
            job: Some(no_id),
            resuming: false,
        })),
        encode(S::Assignment(proto::JobAssignment {
            job: Some(server::job("J1", "r")),
            url: None,
            token: String::new(),
        })),
        encode(S::Assignment(proto::JobAssignment {
            job: Some(server::job("J1", "r")),
            url: Some("ftp://elsewhere".into()),
            token: "t".into(),
        })),
        encode(S::Termination(proto::JobTermination {
            job_id: String::new(),
        })),
        encode(S::Register(proto::RegisterWorkerResponse::default())),
    ];
    let n = bad.len() as u64;
    for frame in bad {
        conn.send_raw(frame).await;
    }
    // The worker skipped them all and still answers on the same connection.
    let a = conn.offer("J2", "r2").await;
    assert!(a.available);
    assert_eq!(
        worker.counters().messages.malformed.load(Ordering::SeqCst),
        n
    );
    assert_eq!(
        worker.health()["livekit_worker_messages_malformed"],
        n.to_string()
    );
    assert_eq!(worker.state(), WorkerState::Registered);
    assert!(worker.try_next_job().is_none());
    assert!(
        server
            .conn_within(Duration::from_millis(200))
            .await
            .is_none()
    );
}

fn encode(message: S) -> WsMessage {
    WsMessage::Binary(
        proto::ServerMessage {
            message: Some(message),
        }
        .encode_to_vec()
        .into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_fails_the_start_and_bad_options_are_named() {
    let server = AgentServer::start(KEY, SECRET).await;
    let mut o = options(&server.url);
    o.api_secret = Secret::new("not-the-secret-not-the-secret");
    let err = Worker::start(o, Sessions::default().load(1))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::AuthenticationFailed, "{err}");
    assert!(!err.to_string().contains("not-the-secret"), "{err}");
    assert_eq!(server.refused.load(Ordering::SeqCst), 1);

    let mut o = options("ftp://example.com");
    o.api_key = Secret::new(" ");
    o.ping_timeout = o.ping_interval;
    let err = Worker::start(o, Sessions::default().load(1))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidConfig);
    for field in ["url", "api_key", "ping_timeout"] {
        assert!(
            err.details.contains_key(field),
            "{field} missing from {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_gives_up_under_the_retry_policy_and_keeps_queued_jobs() {
    let mut server = AgentServer::start(KEY, SECRET).await;
    let mut o = options(&server.url);
    o.retry.max_retries = 2;
    let (worker, mut conn, _) = started(&mut server, o, 2).await;
    assert!(conn.offer("J1", "r1").await.available);
    conn.assign("J1", "r1", "t", None).await;
    conn.update_where(|u| u.job_count == 1).await;
    let mut state = worker.watch_state();
    server.shut();
    drop(conn);
    tokio::time::timeout(WAIT, state.wait_for(|s| *s == WorkerState::Failed))
        .await
        .expect("the worker gives up")
        .unwrap();
    let err = worker.failure().expect("why it failed");
    assert_eq!(err.code, ErrorCode::ConnectionFailed);
    assert!(err.message.contains("after 3 attempt(s)"), "{err}");
    // The job assigned before still joins its room; then there is none.
    assert_eq!(worker.next_job().await.expect("J1").id, "J1");
    assert!(
        tokio::time::timeout(WAIT, worker.next_job())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_reports_full_fails_queued_jobs_and_closes() {
    let mut server = AgentServer::start(KEY, SECRET).await;
    let o = options(&server.url);
    let (worker, mut conn, _) = started(&mut server, o, 2).await;
    assert!(conn.offer("J1", "r1").await.available);
    conn.assign("J1", "r1", "t", None).await;
    conn.update_where(|u| u.job_count == 1).await;
    let worker = Arc::new(worker);
    let waiting = tokio::spawn({
        let worker = worker.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            worker.stop().await;
        }
    });
    let failed = conn.job_update().await;
    assert_eq!(
        (failed.job_id.as_str(), failed.status),
        ("J1", proto::JobStatus::JsFailed as i32)
    );
    let u = conn.update_where(|_| true).await;
    assert_eq!(status(&u), proto::WorkerStatus::WsFull);
    assert!(conn.closed_within(WAIT).await);
    waiting.await.unwrap();
    assert_eq!(worker.state(), WorkerState::Stopped);
    assert!(worker.next_job().await.is_none());
    assert!(
        server
            .conn_within(Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_gives_each_session_one_job_and_ends_it_with_the_session() {
    let mut server = AgentServer::start(KEY, SECRET).await;
    let provider: voice_backends::providers::livekit::LiveKitConfig =
        serde_json::from_value(serde_json::json!({
            "url": server.url,
            "api_key": KEY,
            "api_secret": SECRET,
            "mode": "worker",
            "agent_name": "support",
        }))
        .unwrap();
    let mut backend = Config::new("livekit");
    backend.max_concurrent_sessions = 1;
    backend.timeout = Duration::from_secs(2);
    let dispatch = Arc::new(Dispatch::new(Arc::new(provider), &backend).unwrap());
    assert_eq!(dispatch.health()["livekit_worker_state"], "not_started");
    let start = tokio::spawn({
        let dispatch = dispatch.clone();
        async move { dispatch.start().await }
    });
    let mut conn = server.next_conn().await;
    assert_eq!(conn.register("AW_1").await.agent_name, "support");
    start.await.unwrap().unwrap();

    let metrics = Arc::new(voice_backends::metrics::Metrics::new("livekit"));
    let session = SessionConfig::new("ann");
    let info = SessionInfo::default();
    let request = LinkRequest::new("sess_1", &backend, &session, &metrics, &info);
    // No job yet: the claim waits half the timeout, then says so.
    let err = dispatch.claim(&request).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Timeout);

    assert!(conn.offer("J1", "room-1").await.available);
    conn.assign("J1", "room-1", "server-minted", None).await;
    let claim = dispatch.claim(&request).await.unwrap();
    assert_eq!(
        (claim.job_id.as_str(), claim.room.as_str()),
        ("J1", "room-1")
    );
    assert_eq!(claim.identity, "agent-J1");
    assert_eq!(claim.token.expose(), "server-minted");
    assert_eq!(info.get("room").as_deref(), Some("room-1"));
    assert_eq!(info.get("job_id").as_deref(), Some("J1"));
    // A retried open of the same session gets the same job; capacity 1 is
    // taken by it.
    assert_eq!(dispatch.claim(&request).await.unwrap().job_id, "J1");
    assert!(!conn.offer("J2", "room-2").await.available);
    // The job the session holds fills the worker (its load counts no
    // sessions of its own: the job is what counts), and is reported so.
    let u = conn.update_where(|_| true).await;
    assert_eq!(
        (status(&u), u.load, u.job_count),
        (proto::WorkerStatus::WsFull, 1.0, 1)
    );
    // The server ends the job: the session hears it.
    conn.terminate("J1").await;
    tokio::time::timeout(WAIT, dispatch.terminated("sess_1"))
        .await
        .unwrap();
    dispatch.release("sess_1", None);
    assert_eq!(conn.job_update().await.job_id, "J1");
    assert!(conn.offer("J3", "room-3").await.available);
    dispatch.stop().await;
    assert!(conn.closed_within(WAIT).await);
}

#[test]
fn the_agent_url_is_the_servers_websocket_with_agent_appended() {
    for (server, agent) in [
        ("wss://x.livekit.cloud", "wss://x.livekit.cloud/agent"),
        ("https://x.livekit.cloud/", "wss://x.livekit.cloud/agent"),
        ("http://127.0.0.1:7880", "ws://127.0.0.1:7880/agent"),
        ("ws://host:7880/lk/?a=b#c", "ws://host:7880/lk/agent"),
    ] {
        assert_eq!(agent_url(server).unwrap(), agent, "{server}");
    }
    for bad in ["ftp://host", "not a url", "wss://"] {
        assert!(agent_url(bad).is_err(), "{bad}");
    }
}

fn assignment(id: String, room: String, token: String, url: Option<String>) -> Vec<u8> {
    proto::ServerMessage {
        message: Some(S::Assignment(proto::JobAssignment {
            job: Some(server::job(&id, &room)),
            url,
            token,
        })),
    }
    .encode_to_vec()
}

proptest! {
    #[test]
    fn any_bytes_decode_or_are_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_server_message(&bytes);
    }

    #[test]
    fn a_damaged_assignment_never_panics(
        id in "[A-Za-z0-9_]{1,16}",
        cut in 0usize..200,
        flip in any::<u8>(),
    ) {
        let mut bytes = assignment(id, "room".into(), "token".into(), None);
        let at = cut % bytes.len();
        bytes[at] ^= flip;
        bytes.truncate(bytes.len() - cut % 7);
        let _ = decode_server_message(&bytes);
    }

    #[test]
    fn assignments_decode_to_what_was_sent(
        id in "[A-Za-z0-9_-]{1,24}",
        room in "[A-Za-z0-9 _.-]{1,64}",
        token in "[A-Za-z0-9._-]{1,200}",
        url in proptest::option::of(Just("wss://media.example".to_owned())),
    ) {
        match decode_server_message(&assignment(id.clone(), room.clone(), token.clone(), url.clone())) {
            Ok(ServerEvent::Assigned { job, token: t, url: u }) => {
                prop_assert_eq!(job.id, id);
                prop_assert_eq!(job.room, room);
                prop_assert_eq!(t.expose(), token.as_str());
                prop_assert_eq!(u, url);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn offers_without_a_room_or_id_are_refused(id in "[A-Za-z0-9]{0,8}", room in "[a-z]{0,8}") {
        let bytes = proto::ServerMessage {
            message: Some(S::Availability(proto::AvailabilityRequest {
                job: Some(server::job(&id, &room)),
                resuming: true,
            })),
        }
        .encode_to_vec();
        let decoded = decode_server_message(&bytes);
        if id.is_empty() || room.is_empty() {
            prop_assert!(decoded.is_err());
        } else {
            match decoded {
                Ok(ServerEvent::Offer { job, resuming }) => {
                    prop_assert!(resuming);
                    prop_assert_eq!(job.id, id);
                    prop_assert_eq!(job.participant.as_deref(), Some("user"));
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
