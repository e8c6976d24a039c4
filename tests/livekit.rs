#![cfg(all(feature = "livekit", feature = "testing"))]
//! The `livekit` provider against an in-process LiveKit room (`/rtc`
//! signaling and a webrtc-rs peer playing the SFU, with a simulated user):
//! a whole spoken turn through real WebRTC media and Opus, the session's
//! info, text on the data channel, resuming after the signal connection is
//! lost (and rejoining when the resume is refused or ICE is lost), a user
//! and an agent that send nothing while silent (DTX), a malformed signal
//! message, leaving on close, and the
//! backend conformance suite. The last test runs against a real LiveKit
//! server when `LIVEKIT_URL`, `LIVEKIT_API_KEY` and `LIVEKIT_API_SECRET` are
//! set (`cargo test --features livekit,testing --test livekit -- --ignored`).

#[path = "livekit_worker/server.rs"]
#[allow(dead_code, clippy::result_large_err)]
mod agent_server;
#[path = "livekit_room/mod.rs"]
mod livekit_room;

use std::sync::Arc;
use std::time::Duration;

use livekit_api::access_token::TokenVerifier;
use livekit_room::{TestRoom, USER_IDENTITY};
use voice_backends::pipeline::events::SessionEvent;
use voice_backends::testing::conformance::{Harness, expect_event_within};
use voice_backends::{
    AgentReply, Config, ConnectionState, ErrorCode, PipelineType, SessionConfig, VoiceBackend,
    agent_fn, registry,
};

const KEY: &str = "APIlivekittest";
const SECRET: &str = "a-test-secret-of-some-length-0123456789";
const PATIENCE: Duration = Duration::from_secs(15);

/// A config whose sessions join `room` (the echo pipeline: the reply is
/// the user's own turn).
fn config_for(url: &str, room: &str, secret: &str) -> Config {
    let mut config = Config::new("livekit");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    config.max_retries = 3;
    config.retry_delay = Duration::from_millis(200);
    config.timeout = Duration::from_secs(10);
    config.provider_config = section(serde_json::json!({
        "url": url,
        "api_key": KEY,
        "api_secret": secret,
        "room_template": room,
        "create_room": {"enabled": false},
        "rtc_bind": ["127.0.0.1:0"],
        "data_topic": "test.transcript",
    }));
    config
}

fn section(value: serde_json::Value) -> voice_backends::config::ProviderSection {
    match value {
        serde_json::Value::Object(map) => voice_backends::config::ProviderSection(map),
        _ => unreachable!("a provider_config is a table"),
    }
}

fn config(room: &TestRoom) -> Config {
    config_for(&room.url(), room.room_name(), SECRET)
}

async fn backend(config: &Config) -> Arc<dyn VoiceBackend> {
    let backend = registry()
        .create("livekit", config)
        .await
        .expect("the config makes a backend");
    backend.start().await.expect("the backend starts");
    backend
}

fn health(details: &std::collections::BTreeMap<String, String>, key: &str) -> u64 {
    details
        .get(&format!("livekit.{key}"))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("livekit.{key} in {details:?}"))
}

/// The user says a 440 Hz tone for `ms`; the echo comes back on the
/// agent's track: as long (within a frame or two and the pipeline's
/// pre-roll), and the same tone.
async fn one_turn(room: &TestRoom, backend: &dyn VoiceBackend, ms: u64) {
    room.clear_agent_audio();
    // A pause first: the session's voice activity detector takes the level
    // of its first 100 ms of audio for the room's background.
    let mut pcm = vec![0i16; 16_000 * 4 / 10];
    pcm.extend(livekit_room::tone(
        440.0,
        16_000,
        Duration::from_millis(ms),
        8_000,
    ));
    room.user_says(&pcm, 16_000).await.expect("the user speaks");
    // The reply ends with most of a second without voice (a busy machine
    // may pause the paced packets for a moment, never that long).
    let reply = room
        .wait_agent_turn_with(PATIENCE, Duration::from_millis(800))
        .await;
    let voiced = reply.voiced();
    assert!(
        voiced >= Duration::from_millis(ms - 60) && voiced <= Duration::from_millis(ms + 400),
        "the reply's voiced length {voiced:?} is the turn's ({ms} ms); the agent: {:?}; the room: {:?}",
        backend.health_check().await.details,
        room.counters(),
    );
    // The voiced frames only: a moment the busy machine paused the packets
    // is silence in RTP time, not part of the tone.
    let frame = reply.rate as usize / 50;
    let voiced_samples: Vec<i16> = reply
        .samples
        .chunks_exact(frame)
        .filter(|f| livekit_room::rms(f) > livekit_room::VOICED_RMS)
        .flatten()
        .copied()
        .collect();
    let level = livekit_room::rms(&voiced_samples).max(1.0);
    let tone = livekit_room::goertzel(&voiced_samples, reply.rate, 440.0) / level;
    let other = livekit_room::goertzel(&voiced_samples, reply.rate, 1_000.0) / level;
    assert!(
        tone > 1.0 && other < 0.2,
        "the reply is the user's 440 Hz tone (level {tone:.2} at 440 Hz, {other:.2} at 1 kHz)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_turn_goes_through_the_room_with_real_media() {
    let room = TestRoom::start(KEY, SECRET).await;
    let backend = backend(&config(&room)).await;
    let session = backend
        .create_session(SessionConfig::new(USER_IDENTITY))
        .await
        .expect("the agent joins the room");

    // What the application hands its user.
    let info = session.info();
    assert_eq!(info.get("room").as_deref(), Some(room.room_name()));
    assert_eq!(info.get("url"), Some(room.url()));
    assert_eq!(info.get("identity").as_deref(), Some(USER_IDENTITY));
    let token = info.get("token").expect("the user's join token");
    assert_eq!(info.redacted()["token"], "[redacted]");
    let claims = TokenVerifier::with_api_key(KEY, SECRET)
        .verify(&token)
        .expect("the user's token is signed with the API secret");
    assert_eq!(claims.sub, USER_IDENTITY);
    assert!(claims.video.room_join && claims.video.room == room.room_name());
    assert!(!claims.video.agent && !claims.video.room_admin && !claims.video.room_create);

    // The agent joined as an agent, with the token in the header.
    let agent = room
        .wait_for_agent(PATIENCE)
        .await
        .expect("the agent subscribes to the user's track");
    let joined = room.joins();
    let join = joined.iter().find(|j| j.identity == agent).unwrap();
    assert!(join.grants.agent, "the agent's token says agent: true");
    assert_eq!(join.kind, "agent");
    assert_eq!(join.token_place, livekit_room::TokenPlace::Header);
    assert_eq!(
        join.query.get("auto_subscribe").map(String::as_str),
        Some("1")
    );
    assert_eq!(
        room.agent_tracks().len(),
        1,
        "the agent published its track"
    );

    session.start().await.unwrap();
    one_turn(&room, &*backend, 700).await;
    // A second turn in the same session.
    one_turn(&room, &*backend, 500).await;

    let details = backend.health_check().await.details;
    assert!(health(&details, "rtp_in") > 50, "{details:?}");
    assert!(health(&details, "rtp_out") > 40, "{details:?}");
    assert_eq!(health(&details, "decode_errors"), 0);
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_text_goes_out_on_the_data_channel_topic() {
    let room = TestRoom::start(KEY, SECRET).await;
    let backend = backend(&config(&room)).await;
    let agent =
        agent_fn(
            |turn| async move { Ok(AgentReply::text(format!("you said {}", turn.transcript))) },
        );
    let session = backend
        .create_session(SessionConfig::new(USER_IDENTITY).with_agent(agent))
        .await
        .unwrap();
    room.wait_for_agent(PATIENCE).await.unwrap();
    session.start().await.unwrap();
    session.send_text("ping").await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let text = loop {
        let data = room.agent_data();
        let found = data.iter().find_map(|d| {
            let v: serde_json::Value = serde_json::from_slice(&d.payload).ok()?;
            (v["type"] == "agent_text").then(|| (d.clone(), v))
        });
        if let Some(found) = found {
            break found;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "no agent text on the data channel: {data:?}; the agent: {:?}; the room: {:?}",
                backend.health_check().await.details,
                room.counters()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (packet, json) = text;
    assert_eq!(packet.topic.as_deref(), Some("test.transcript"));
    assert_eq!(json["text"], "you said ping");
    assert_eq!(json["session_id"], session.id().as_str());
    assert_eq!(packet.kind, livekit_room::DataKind::Reliable);
    assert!(packet.participant_identity.starts_with("agent-"));
    backend.stop().await.unwrap();
}

/// Waits for the session to report `state` for its link.
async fn link_state(
    events: &mut voice_backends::session::events::SessionEvents,
    state: ConnectionState,
    within: Duration,
) {
    expect_event_within(
        within,
        events,
        &format!("the link {state:?}"),
        |e| matches!(e, SessionEvent::Connection { state: s } if *s == state),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_signal_connection_is_resumed_and_the_reply_keeps_flowing() {
    let room = TestRoom::start(KEY, SECRET).await;
    let backend = backend(&config(&room)).await;
    let session = backend
        .create_session(SessionConfig::new(USER_IDENTITY))
        .await
        .unwrap();
    let mut events = session.events();
    room.wait_for_agent(PATIENCE).await.unwrap();
    session.start().await.unwrap();

    // A long turn; the signal connection drops while its echo is playing.
    room.clear_agent_audio();
    let mut pcm = vec![0i16; 16_000 * 4 / 10];
    pcm.extend(livekit_room::tone(
        440.0,
        16_000,
        Duration::from_millis(2_000),
        8_000,
    ));
    room.user_says(&pcm, 16_000).await.expect("the user speaks");
    let playing = room
        .wait_until(PATIENCE, |r| {
            r.agent_packets().iter().filter(|p| p.4).count() >= 10
        })
        .await;
    assert!(playing, "the reply started: {:?}", room.counters());
    assert_eq!(room.drop_signal(), 1);
    link_state(&mut events, ConnectionState::Reconnecting, PATIENCE).await;
    link_state(&mut events, ConnectionState::Connected, PATIENCE).await;

    // The whole reply arrived, on the one track, with no rejoin.
    let reply = room
        .wait_agent_turn_with(PATIENCE, Duration::from_millis(800))
        .await;
    let voiced = reply.voiced();
    assert!(
        voiced >= Duration::from_millis(1_940),
        "the reply went on across the resume: {voiced:?} voiced; the room: {:?}",
        room.counters()
    );
    let ssrcs: std::collections::BTreeSet<u32> = room.agent_packets().iter().map(|p| p.0).collect();
    assert_eq!(ssrcs.len(), 1, "one stream, never re-published: {ssrcs:?}");
    let counters = room.counters();
    assert_eq!(
        (counters.joins, counters.resumes, counters.tracks_published),
        (1, 1, 1),
        "{counters:?}"
    );
    assert_eq!(
        counters.sync_states, 1,
        "the agent told its state: {counters:?}"
    );
    let details = backend.health_check().await.details;
    assert_eq!(health(&details, "resumes"), 1, "{details:?}");
    assert_eq!(health(&details, "rejoins"), 0, "{details:?}");
    assert_eq!(health(&details, "joins"), 1, "{details:?}");

    // The new signal connection is the one the agent reads.
    assert_eq!(room.send_malformed(), 1);
    let heard = async {
        while health(&backend.health_check().await.details, "malformed_signal") != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, heard)
        .await
        .expect("the resumed signal connection is read");
    one_turn(&room, &*backend, 500).await;
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_resume_falls_back_to_a_full_rejoin() {
    let room = TestRoom::start(KEY, SECRET).await;
    let backend = backend(&config(&room)).await;
    let session = backend
        .create_session(SessionConfig::new(USER_IDENTITY))
        .await
        .unwrap();
    let mut events = session.events();
    room.wait_for_agent(PATIENCE).await.unwrap();
    session.start().await.unwrap();
    one_turn(&room, &*backend, 500).await;

    room.refuse_resumes(true);
    assert_eq!(room.drop_signal(), 1);
    link_state(&mut events, ConnectionState::Reconnecting, PATIENCE).await;
    link_state(&mut events, ConnectionState::Connected, PATIENCE).await;
    room.wait_for_agent(PATIENCE).await.unwrap();
    one_turn(&room, &*backend, 500).await;
    let counters = room.counters();
    assert_eq!(
        (counters.resumes, counters.resumes_refused, counters.joins),
        (0, 1, 2),
        "{counters:?}"
    );
    let details = backend.health_check().await.details;
    assert_eq!(health(&details, "resume_failures"), 1, "{details:?}");
    assert_eq!(health(&details, "rejoins"), 1, "{details:?}");
    assert_eq!(health(&details, "joins"), 2, "{details:?}");
    backend.stop().await.unwrap();
}

/// A user whose client sends DTX while silent: the gaps reach the session
/// as silence (so the turn ends), and nothing of them is decoded.
async fn dtx_user(send_dtx_frames: bool) -> std::collections::BTreeMap<String, String> {
    let mut options = livekit_room::RoomOptions::new(KEY, SECRET);
    options.mic_dtx = true;
    options.mic_sends_dtx_frames = send_dtx_frames;
    let room = TestRoom::start_with(options).await;
    let backend = backend(&config(&room)).await;
    let session = backend
        .create_session(SessionConfig::new(USER_IDENTITY))
        .await
        .unwrap();
    room.wait_for_agent(PATIENCE).await.unwrap();
    session.start().await.unwrap();
    one_turn(&room, &*backend, 600).await;
    let details = backend.health_check().await.details;
    backend.stop().await.unwrap();
    details
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_sending_nothing_while_silent_is_heard_and_the_gaps_are_silence() {
    let details = dtx_user(false).await;
    assert!(
        health(&details, "dtx_filled") > 20,
        "the silences were handed in: {details:?}"
    );
    assert_eq!(health(&details, "decode_errors"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_dtx_frames_are_not_decoded() {
    let details = dtx_user(true).await;
    assert!(
        health(&details, "dtx_skipped") > 20,
        "the DTX frames were skipped: {details:?}"
    );
    assert_eq!(health(&details, "decode_errors"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_sends_nothing_between_replies_and_marks_each_spurt() {
    let room = TestRoom::start(KEY, SECRET).await;
    let backend = backend(&config(&room)).await;
    let session = backend
        .create_session(SessionConfig::new(USER_IDENTITY))
        .await
        .unwrap();
    room.wait_for_agent(PATIENCE).await.unwrap();
    session.start().await.unwrap();
    room.clear_agent_audio();
    one_turn(&room, &*backend, 500).await;
    let first = room.agent_packets();
    one_turn(&room, &*backend, 500).await;
    let both = {
        let mut all = first.clone();
        all.extend(room.agent_packets());
        all
    };
    // Between the replies the user spoke for most of a second: no packets
    // then, and the second reply's first packet jumps over that time with
    // the marker set.
    let last_of_first = first.last().copied().expect("the first reply's packets");
    let first_of_second = both[first.len()];
    assert!(first_of_second.3, "the second spurt is marked");
    let jump = first_of_second.2.wrapping_sub(last_of_first.2);
    assert!(
        jump >= 48 * 900,
        "the RTP time went over the pause: {jump} samples at 48 kHz"
    );
    assert_eq!(
        first_of_second.1,
        last_of_first.1.wrapping_add(1),
        "sequence numbers run on"
    );
    // Within a reply, packets follow each other 960 apart unless DTX
    // left frames out, which the marker says.
    for pair in both.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b.2.wrapping_sub(a.2) != 960 {
            assert!(b.3, "a jump without the marker: {a:?} -> {b:?}");
        }
    }
    let details = backend.health_check().await.details;
    // Only the replies were sent: the pause, about 1.3 s, had none.
    let sent = health(&details, "rtp_out");
    assert!(sent < 120, "{sent} packets for two half-second replies");
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_ice_is_rejoined_and_the_session_goes_on() {
    let room = TestRoom::start(KEY, SECRET).await;
    let backend = backend(&config(&room)).await;
    let session = backend
        .create_session(SessionConfig::new(USER_IDENTITY))
        .await
        .unwrap();
    let mut events = session.events();
    room.wait_for_agent(PATIENCE).await.unwrap();
    session.start().await.unwrap();

    assert_eq!(room.kill_ice(), 1);
    // ICE fails after its timeout (8 s without traffic), then the agent rejoins.
    link_state(
        &mut events,
        ConnectionState::Reconnecting,
        Duration::from_secs(30),
    )
    .await;
    link_state(&mut events, ConnectionState::Connected, PATIENCE).await;
    room.wait_for_agent(PATIENCE).await.unwrap();
    one_turn(&room, &*backend, 500).await;
    let details = backend.health_check().await.details;
    assert!(health(&details, "rejoins") >= 1, "{details:?}");
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_signal_message_is_counted_and_the_session_goes_on() {
    let room = TestRoom::start(KEY, SECRET).await;
    let backend = backend(&config(&room)).await;
    let session = backend
        .create_session(SessionConfig::new(USER_IDENTITY))
        .await
        .unwrap();
    let mut events = session.events();
    room.wait_for_agent(PATIENCE).await.unwrap();
    session.start().await.unwrap();
    assert_eq!(room.send_malformed(), 1);
    let counted = async {
        loop {
            if health(&backend.health_check().await.details, "malformed_signal") == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, counted)
        .await
        .expect("the malformed message is counted");
    one_turn(&room, &*backend, 500).await;
    let details = backend.health_check().await.details;
    assert_eq!(
        health(&details, "rejoins"),
        0,
        "the connection was kept: {details:?}"
    );
    while let Some(e) = events.try_recv() {
        assert!(
            !matches!(
                e,
                SessionEvent::Connection {
                    state: ConnectionState::Reconnecting
                } | SessionEvent::Error { .. }
            ),
            "{e:?}"
        );
    }
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_session_leaves_the_room() {
    let room = TestRoom::start(KEY, SECRET).await;
    let backend = backend(&config(&room)).await;
    let session = backend
        .create_session(SessionConfig::new(USER_IDENTITY))
        .await
        .unwrap();
    let agent = room.wait_for_agent(PATIENCE).await.unwrap();
    assert!(room.participants().contains(&agent));
    backend.close_session(session.id()).await.unwrap();
    let left = room
        .wait_until(PATIENCE, |r| {
            r.counters().leaves == 1 && !r.participants().contains(&agent)
        })
        .await;
    assert!(left, "the agent sent leave: {:?}", room.counters());
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_signed_with_the_wrong_secret_is_refused() {
    let room = TestRoom::start(KEY, SECRET).await;
    let mut config = config_for(
        &room.url(),
        room.room_name(),
        "not-the-secret-of-this-project-000",
    );
    config.max_retries = 0;
    let backend = backend(&config).await;
    let err = backend
        .create_session(SessionConfig::new(USER_IDENTITY))
        .await
        .expect_err("the room refuses the agent's token");
    assert_eq!(err.code, ErrorCode::AuthenticationFailed, "{err}");
    assert!(!err.to_string().contains("not-the-secret"), "{err}");
    assert_eq!(room.refusals().first().map(|r| r.status), Some(401));
    assert!(room.joins().is_empty());
    backend.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Worker mode: LiveKit's dispatch assigns the job, the session joins its room.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_mode_takes_the_assigned_job_and_joins_its_room() {
    use livekit_api::access_token::VideoGrants;
    let room = TestRoom::start(KEY, SECRET).await;
    let mut agents = agent_server::AgentServer::start(KEY, SECRET).await;
    let mut config = config_for(&agents.url, "unused-{session_id}", SECRET);
    config.max_concurrent_sessions = 1;
    config
        .provider_config
        .0
        .insert("mode".into(), serde_json::json!("worker"));
    config
        .provider_config
        .0
        .insert("agent_name".into(), serde_json::json!("support"));
    let backend = registry().create("livekit", &config).await.unwrap();
    let starting = tokio::spawn({
        let backend = backend.clone();
        async move { backend.start().await }
    });
    let mut conn = agents.next_conn().await;
    let registration = conn.register("W_test").await;
    assert_eq!(registration.agent_name, "support");
    starting.await.unwrap().expect("the worker registered");

    // Under capacity, the offer is taken; the assignment carries the room's
    // own server and a token the server minted.
    let offered = conn.offer("J1", room.room_name()).await;
    assert!(offered.available, "{offered:?}");
    let token = room.token(
        "agent-J1",
        VideoGrants {
            agent: true,
            can_publish: Some(true),
            can_subscribe: Some(true),
            can_publish_data: Some(true),
            ..VideoGrants::default()
        },
    );
    conn.assign("J1", room.room_name(), &token, Some(&room.url()))
        .await;
    let session = backend
        .create_session(SessionConfig::new(USER_IDENTITY))
        .await
        .expect("the session takes the assigned job");
    assert_eq!(
        session.info().get("room").as_deref(),
        Some(room.room_name())
    );
    assert_eq!(session.info().get("job_id").as_deref(), Some("J1"));
    let agent = room.wait_for_agent(PATIENCE).await.unwrap();
    assert_eq!(agent, "agent-J1", "the agent joins with the job's token");
    session.start().await.unwrap();
    one_turn(&room, &*backend, 500).await;

    // Full (one session of one): the next offer is refused.
    let refused = conn.offer("J2", room.room_name()).await;
    assert!(!refused.available, "{refused:?}");

    // The session ends: the job is reported done and the agent leaves.
    backend.close_session(session.id()).await.unwrap();
    let update = conn.job_update().await;
    assert_eq!(update.job_id, "J1");
    assert_eq!(
        update.status,
        livekit_protocol::JobStatus::JsSuccess as i32,
        "{update:?}"
    );
    assert!(
        room.wait_until(PATIENCE, |r| !r.participants().contains(&agent))
            .await
    );

    // A job the server terminates: the agent leaves, the session hears why.
    let offered = conn.offer("J3", room.room_name()).await;
    assert!(offered.available, "a slot is free again: {offered:?}");
    let token = room.token(
        "agent-J3",
        VideoGrants {
            agent: true,
            ..VideoGrants::default()
        },
    );
    conn.assign("J3", room.room_name(), &token, Some(&room.url()))
        .await;
    let session = backend
        .create_session(SessionConfig::new(USER_IDENTITY))
        .await
        .unwrap();
    let mut events = session.events();
    room.wait_for_agent(PATIENCE).await.unwrap();
    conn.terminate("J3").await;
    expect_event_within(PATIENCE, &mut events, "the job's end", |e| {
        matches!(
            e,
            SessionEvent::Error {
                code: ErrorCode::ContextCanceled,
                ..
            }
        )
    })
    .await;
    assert!(
        room.wait_until(PATIENCE, |r| !r
            .participants()
            .iter()
            .any(|p| p == "agent-J3"))
            .await,
        "the agent left the terminated job's room"
    );
    backend.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// The backend conformance suite, each check with a room of its own.

/// Sessions of every check join one test room (any user id); the room
/// lives as long as the harness.
struct Room {
    room: TestRoom,
}

impl Harness for Room {
    fn config(&self) -> Config {
        config(&self.room)
    }

    /// The reply audio of a media-link session goes to the room, not to
    /// `receive_audio`: the audio checks are this file's own tests.
    fn audio_turns(&self) -> bool {
        false
    }

    fn patience(&self) -> Duration {
        PATIENCE
    }
}

fn room_harness() -> Room {
    let room = tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(TestRoom::start(KEY, SECRET))
    });
    Room { room }
}

voice_backends::conformance_suite!(room_harness());

// ---------------------------------------------------------------------------
// A real LiveKit server.

/// Against a real LiveKit server (`livekit-server --dev` or LiveKit Cloud):
/// the agent creates a room, joins it and leaves on close; the room is
/// deleted afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a LiveKit server: set LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET"]
async fn against_a_real_livekit_server() {
    let (Ok(url), Ok(key), Ok(secret)) = (
        std::env::var("LIVEKIT_URL"),
        std::env::var("LIVEKIT_API_KEY"),
        std::env::var("LIVEKIT_API_SECRET"),
    ) else {
        eprintln!("skipped: set LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET");
        return;
    };
    let mut config = Config::new("livekit");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    config.provider_config = section(serde_json::json!({
        "url": url, "api_key": key, "api_secret": secret,
        "room_template": "voice-backends-e2e-{session_id}",
    }));
    let backend = backend(&config).await;
    let session = backend
        .create_session(SessionConfig::new("e2e-user"))
        .await
        .expect("the agent creates and joins a room");
    let room = session.info().get("room").expect("the room's name");
    let keys = voice_backends::providers::livekit::token::ApiKeys::new(
        key.clone(),
        voice_backends::Secret::new(secret.clone()),
    )
    .unwrap();
    let rooms = voice_backends::providers::livekit::rooms::RoomService::new(
        &url,
        keys,
        Duration::from_secs(10),
    )
    .unwrap();
    let participants = rooms.list_participants(&room).await.unwrap();
    assert!(
        participants
            .iter()
            .any(|p| p.identity.starts_with("agent-")),
        "the agent is in the room: {participants:?}"
    );
    backend.close_session(session.id()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let participants = rooms.list_participants(&room).await.unwrap_or_default();
    assert!(
        !participants
            .iter()
            .any(|p| p.identity.starts_with("agent-")),
        "the agent left: {participants:?}"
    );
    let _ = rooms.delete_room(&room).await;
    backend.stop().await.unwrap();
}
