#![cfg(all(feature = "pipecat", feature = "testing"))]
//! The `pipecat` provider against a real Pipecat bot (`tests/pipecat_bot/bot.py`:
//! Pipecat's own WebSocket transports and protobuf serializer, with stand-in
//! STT and TTS so no keys are needed).
//!
//! The bot runs from the venv `scripts/pipecat-venv` makes; `./scripts/test`
//! makes it and sets `VOICE_BACKENDS_PIPECAT_PYTHON`. Without that variable
//! these tests print why and pass without running (so `cargo test` works on a
//! machine without the venv); with it set, a bot that does not start fails them.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::timeout;
use voice_backends::pipeline::events::{SessionEvent, SessionEvents};
use voice_backends::testing::conformance::{Harness, expect_event, speak};
use voice_backends::testing::signal;
use voice_backends::{
    AgentReply, AudioEncoding, AudioFormat, Config, ConnectionState, ErrorCode, SessionConfig,
    VoiceBackend, VoiceSession, agent_fn, registry,
};

// ---------------------------------------------------------------------------
// The bot

#[path = "pipecat_bot/launch.rs"]
mod launch;
use launch::{Bot, Transport, python};

macro_rules! require_bot {
    () => {
        if python().is_none() {
            eprintln!(
                "skipped: set VOICE_BACKENDS_PIPECAT_PYTHON (./scripts/test does) to run against a real Pipecat bot"
            );
            return;
        }
    };
}

/// One multi-client bot (no LLM: agent mode) shared by the tests that need no
/// bot of their own.
fn shared_bot() -> &'static str {
    static BOT: OnceLock<Bot> = OnceLock::new();
    &BOT.get_or_init(|| Bot::start(Transport::FastApi, 0, false))
        .url
}

fn config_for_template(base: &str) -> Config {
    let mut config = Config::new("pipecat");
    config.max_retries = 2;
    config.retry_delay = Duration::from_millis(200);
    config.timeout = Duration::from_secs(10);
    config.provider_config.0.insert(
        "url_template".into(),
        format!("{base}?session={{session_id}}").into(),
    );
    config
}

fn config_for_url(url: &str) -> Config {
    let mut config = Config::new("pipecat");
    config.max_retries = 2;
    config.retry_delay = Duration::from_millis(200);
    config.timeout = Duration::from_secs(10);
    config
        .provider_config
        .0
        .insert("url".into(), url.to_owned().into());
    config
}

// ---------------------------------------------------------------------------
// The conformance suite, against the shared multi-client bot

struct Pipecat;

impl Harness for Pipecat {
    fn config(&self) -> Config {
        config_for_template(shared_bot())
    }

    fn patience(&self) -> Duration {
        Duration::from_secs(20)
    }

    fn available(&self) -> Result<(), String> {
        match python() {
            Some(_) => Ok(()),
            None => Err("set VOICE_BACKENDS_PIPECAT_PYTHON (./scripts/test does) to run against a real Pipecat bot".into()),
        }
    }
}

mod conformance {
    use super::*;
    voice_backends::conformance_suite!(Pipecat);
}

// ---------------------------------------------------------------------------
// The link conformance suite, against a fake of the bot's side of the wire

mod link {
    use voice_backends::providers::pipecat::{proto, rtvi};
    use voice_backends::runtime::WsMessage;
    use voice_backends::testing::link::{ClientSaid, FakeWire, LinkHarness, link_conformance};

    use super::*;

    /// A Pipecat bot's side: protobuf frames with RTVI messages inside.
    #[derive(Clone)]
    struct PipecatWire;

    fn rtvi_message(kind: &str, data: serde_json::Value) -> WsMessage {
        let json = serde_json::json!({"label": "rtvi-ai", "type": kind, "data": data});
        WsMessage::Binary(proto::encode_message(json.to_string()).into())
    }

    impl FakeWire for PipecatWire {
        fn client_said(&self, message: &WsMessage) -> ClientSaid {
            let WsMessage::Binary(bytes) = message else {
                return ClientSaid::Other;
            };
            match proto::decode(bytes.clone()) {
                Ok(proto::Inbound::Audio(frame)) => ClientSaid::Audio(frame.data().len()),
                Ok(proto::Inbound::Text(text)) => ClientSaid::Reply(text),
                Ok(proto::Inbound::Message(json)) if json.contains("client-ready") => {
                    ClientSaid::Greeting
                }
                _ => ClientSaid::Other,
            }
        }

        fn ready(&self) -> Vec<WsMessage> {
            vec![rtvi_message("bot-ready", serde_json::json!({}))]
        }

        fn transcript(&self, text: &str, is_final: bool) -> WsMessage {
            rtvi_message(
                "user-transcription",
                serde_json::json!({"text": text, "final": is_final}),
            )
        }

        fn audio(&self, samples: &[i16], rate: u32) -> WsMessage {
            let pcm: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
            WsMessage::Binary(proto::encode_audio(pcm.into(), rate, 1).into())
        }

        fn reply_done(&self) -> Vec<WsMessage> {
            vec![rtvi_message("bot-stopped-speaking", serde_json::json!({}))]
        }

        fn interrupted(&self) -> Vec<WsMessage> {
            vec![rtvi_message("bot-interrupted", serde_json::json!({}))]
        }

        fn malformed(&self) -> WsMessage {
            WsMessage::Binary(vec![0xff, 0xff, 0xff].into())
        }
    }

    struct PipecatLink;

    impl LinkHarness for PipecatLink {
        type Wire = PipecatWire;

        fn wire(&self) -> PipecatWire {
            PipecatWire
        }

        fn config(&self, url: &str, token: Option<&str>) -> Config {
            let mut config = config_for_url(url);
            if let Some(token) = token {
                config
                    .provider_config
                    .0
                    .insert("auth_token".into(), token.into());
            }
            config
        }

        fn config_with_fallbacks(&self, urls: &[&str], token: Option<&str>) -> Option<Config> {
            let (first, rest) = urls.split_first().unwrap_or((&"ws://127.0.0.1:1/", &[]));
            let mut config = self.config(first, token);
            config.provider_config.0.insert(
                "fallback_urls".into(),
                rest.iter()
                    .map(|u| u.to_string())
                    .collect::<Vec<_>>()
                    .into(),
            );
            Some(config)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_link_conforms() {
        link_conformance(&PipecatLink).await;
        // The fake's rtvi messages are the ones the provider parses.
        assert!(matches!(
            rtvi::parse(r#"{"label":"rtvi-ai","type":"bot-ready"}"#),
            Ok(Some(rtvi::RtviEvent::BotReady))
        ));
    }
}

// ---------------------------------------------------------------------------
// Turns

async fn started(config: Config) -> Arc<dyn VoiceBackend> {
    let backend = registry().create("pipecat", &config).await.unwrap();
    backend.start().await.unwrap();
    backend
}

async fn final_transcript(events: &mut SessionEvents) -> String {
    let e = expect_event(&Pipecat, events, "the bot's final transcript", |e| {
        matches!(e, SessionEvent::UserTranscript { is_final: true, .. })
    })
    .await;
    let SessionEvent::UserTranscript { text, .. } = e else {
        unreachable!()
    };
    text
}

async fn agent_text(events: &mut SessionEvents) -> String {
    let e = expect_event(&Pipecat, events, "the agent's text", |e| {
        matches!(e, SessionEvent::AgentText { .. })
    })
    .await;
    let SessionEvent::AgentText { text } = e else {
        unreachable!()
    };
    text
}

/// "heard 600 ms of speech" -> 600.
fn heard_ms(transcript: &str) -> u64 {
    transcript
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a stand-in transcript: {transcript:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoken_turn_goes_through_the_application_agent_and_back() {
    require_bot!();
    let backend = started(config_for_template(shared_bot())).await;
    let (asked_tx, mut asked_rx) = tokio::sync::mpsc::unbounded_channel();
    let agent = agent_fn(move |turn| {
        let asked = asked_tx.clone();
        async move {
            let _ = asked.send(turn.transcript.clone());
            Ok(AgentReply::text(format!(
                "the agent answers {}",
                turn.transcript
            )))
        }
    });
    // The application hears 48 kHz stereo f32: converted at the edge.
    let output = AudioFormat::new(AudioEncoding::PcmF32Le, 48_000, 2);
    let mut session_config = SessionConfig::new("caller").with_agent(agent);
    session_config.output_format = output;
    let s = backend.create_session(session_config).await.unwrap();
    let mut events = s.events();
    let mut rx = s.receive_audio().unwrap();
    s.start().await.unwrap();

    speak(
        &*s,
        Duration::from_millis(800),
        Duration::from_millis(700),
        3,
        Duration::ZERO,
    )
    .await;
    let transcript = final_transcript(&mut events).await;
    assert!(
        (700..=900).contains(&heard_ms(&transcript)),
        "the bot heard our 800 ms: {transcript}"
    );
    let asked = timeout(Duration::from_secs(10), asked_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(asked, transcript, "the agent got the bot's transcript");
    assert_eq!(
        agent_text(&mut events).await,
        format!("the agent answers {transcript}")
    );
    // The bot spoke the agent's reply; it reaches us in our format.
    let first = timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.format(), output);
    let mut audio = first.duration();
    while let Ok(Some(f)) = timeout(Duration::from_millis(800), rx.recv()).await {
        assert_eq!(f.format(), output);
        audio += f.duration();
    }
    // The stand-in TTS speaks 80 ms per word (at least 200 ms).
    let words = format!("the agent answers {transcript}")
        .split_whitespace()
        .count() as u32;
    let expected = Duration::from_millis(80) * words;
    assert!(
        audio + Duration::from_millis(120) >= expected
            && audio <= expected + Duration::from_millis(200),
        "reply audio {audio:?}, expected about {expected:?}"
    );
    let e = expect_event(&Pipecat, &mut events, "the turn's latency", |e| {
        matches!(e, SessionEvent::Latency(_))
    })
    .await;
    let SessionEvent::Latency(l) = e else {
        unreachable!()
    };
    assert!(l.agent.is_some() && l.tts_first_audio.is_some(), "{l:?}");
    expect_event(&Pipecat, &mut events, "back to listening", |e| {
        matches!(
            e,
            SessionEvent::State {
                to: voice_backends::PipelineState::Listening,
                ..
            }
        )
    })
    .await;
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_faster_than_real_time_reaches_the_bot_whole() {
    require_bot!();
    let backend = started(config_for_template(shared_bot())).await;
    let s = backend
        .create_session(SessionConfig::new("burst"))
        .await
        .unwrap();
    let mut events = s.events();
    s.start().await.unwrap();
    // 5 s of speech and 1 s of silence (300 frames), pushed at once.
    speak(
        &*s,
        Duration::from_secs(5),
        Duration::from_secs(1),
        11,
        Duration::ZERO,
    )
    .await;
    let transcript = final_transcript(&mut events).await;
    assert!(
        heard_ms(&transcript).abs_diff(5000) <= 60,
        "the bot heard all of it: {transcript}"
    );
    let health = backend.health_check().await;
    assert_eq!(
        health
            .details
            .get("pipecat_frames_dropped")
            .map(String::as_str),
        Some("0"),
        "{health:?}"
    );
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_agent_the_bots_own_llm_answers_and_is_relayed() {
    require_bot!();
    let bot = Bot::start(Transport::FastApi, 0, true);
    let backend = started(config_for_template(&bot.url)).await;
    let s = backend
        .create_session(SessionConfig::new("relay"))
        .await
        .unwrap();
    let mut events = s.events();
    let mut rx = s.receive_audio().unwrap();
    s.start().await.unwrap();
    speak(
        &*s,
        Duration::from_millis(500),
        Duration::from_millis(700),
        9,
        Duration::ZERO,
    )
    .await;
    // The bot ends the turn: the turn's end, then its final transcript.
    expect_event(&Pipecat, &mut events, "the turn's end", |e| {
        matches!(e, SessionEvent::TurnEnded { .. })
    })
    .await;
    let transcript = final_transcript(&mut events).await;
    assert_eq!(
        agent_text(&mut events).await,
        format!("you said: {transcript}")
    );
    let first = timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.format(), AudioFormat::PCM16_16K_MONO);
    assert!(
        signal::rms_dbfs(&signal::samples_of([&first])) > -40.0,
        "the bot's tone, not silence"
    );
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sessions_share_the_multi_client_bot_without_cross_talk() {
    require_bot!();
    const N: usize = 12;
    let mut config = config_for_template(shared_bot());
    config.max_concurrent_sessions = N as u32;
    config.rate_limit_burst = 100;
    let backend = started(config).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let backend = backend.clone();
        tasks.spawn(async move {
            let agent = agent_fn(move |turn| async move {
                Ok(AgentReply::text(format!(
                    "session {i}: {}",
                    turn.transcript
                )))
            });
            let s = backend
                .create_session(SessionConfig::new(format!("user-{i}")).with_agent(agent))
                .await
                .unwrap();
            let mut events = s.events();
            let mut rx = s.receive_audio().unwrap();
            s.start().await.unwrap();
            // Each session says something of its own length.
            let speech = Duration::from_millis(400 + 100 * i as u64);
            speak(
                &*s,
                speech,
                Duration::from_millis(700),
                i as u64,
                Duration::from_millis(2),
            )
            .await;
            let transcript = final_transcript(&mut events).await;
            let heard = heard_ms(&transcript);
            assert!(
                heard.abs_diff(speech.as_millis() as u64) <= 100,
                "session {i} said {speech:?}, its transcript is {transcript:?}"
            );
            assert_eq!(
                agent_text(&mut events).await,
                format!("session {i}: {transcript}")
            );
            timeout(Duration::from_secs(20), rx.recv())
                .await
                .expect("reply audio in time")
                .expect("reply audio");
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("every session gets its own turn back");
    }
    backend.stop().await.unwrap();
}

/// The link to the bot connects inside `create_session`, before the
/// application can subscribe: a subscriber hears the link's state first (so
/// the first connect is seen), then the session's own events; the link
/// closes with the session, and a subscriber after that hears so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_hears_the_links_state_first() {
    require_bot!();
    let backend = started(config_for_template(shared_bot())).await;
    let s = backend
        .create_session(SessionConfig::new("subscriber"))
        .await
        .unwrap();
    let mut events = s.events();
    let connected = SessionEvent::Connection {
        state: ConnectionState::Connected,
    };
    assert_eq!(events.try_recv(), Some(connected));
    s.start().await.unwrap();
    assert_eq!(
        timeout(Duration::from_secs(5), events.recv()).await,
        Ok(Some(SessionEvent::State {
            from: voice_backends::PipelineState::Idle,
            to: voice_backends::PipelineState::Listening,
        })),
        "the state once, then the session's events"
    );
    s.stop().await.unwrap();
    let disconnected = SessionEvent::Connection {
        state: ConnectionState::Disconnected,
    };
    expect_event(&Pipecat, &mut events, "the link closing", |e| {
        *e == disconnected
    })
    .await;
    assert_eq!(s.events().try_recv(), Some(disconnected));
    backend.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// The bot goes away

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_killed_and_restarted_mid_session_is_reconnected_and_the_session_goes_on() {
    require_bot!();
    let mut bot = Bot::start(Transport::Server, 0, false);
    let port = bot.port();
    let mut config = config_for_url(&bot.url);
    config.max_retries = 8;
    config.retry_delay = Duration::from_millis(250);
    let backend = started(config).await;
    let agent =
        agent_fn(|turn| async move { Ok(AgentReply::text(format!("ok {}", turn.transcript))) });
    let s = backend
        .create_session(SessionConfig::new("survivor").with_agent(agent))
        .await
        .unwrap();
    let mut events = s.events();
    let mut rx = s.receive_audio().unwrap();
    s.start().await.unwrap();
    s.send_text("before the crash").await.unwrap();
    timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();

    bot.kill();
    expect_event(&Pipecat, &mut events, "Reconnecting", |e| {
        *e == SessionEvent::Connection {
            state: ConnectionState::Reconnecting,
        }
    })
    .await;
    let _bot = Bot::start(Transport::Server, port, false);
    expect_event(&Pipecat, &mut events, "Connected again", |e| {
        *e == SessionEvent::Connection {
            state: ConnectionState::Connected,
        }
    })
    .await;
    // Drain what was left of the first reply, then a full spoken turn works.
    while timeout(Duration::from_millis(300), rx.recv())
        .await
        .is_ok_and(|f| f.is_some())
    {}
    speak(
        &*s,
        Duration::from_millis(600),
        Duration::from_millis(700),
        5,
        Duration::ZERO,
    )
    .await;
    let transcript = final_transcript(&mut events).await;
    assert!(transcript.starts_with("heard "), "{transcript}");
    timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("reply audio after the reconnect")
        .expect("reply audio");
    backend.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Failover to another bot

/// A free port on 127.0.0.1 (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The bot serving a session, as its info names it (`host:port`).
fn served_by(s: &dyn VoiceSession) -> String {
    s.info()
        .get(voice_backends::runtime::ENDPOINT_INFO_KEY)
        .unwrap_or_default()
}

/// One spoken turn through the application agent: the bot's transcript, the
/// agent's reply spoken by the bot, its audio back.
async fn spoken_turn(
    s: &dyn VoiceSession,
    events: &mut SessionEvents,
    rx: &mut voice_backends::AudioReceiver,
) {
    // Drain what is left of an earlier reply.
    while timeout(Duration::from_millis(300), rx.recv())
        .await
        .is_ok_and(|f| f.is_some())
    {}
    speak(
        s,
        Duration::from_millis(600),
        Duration::from_millis(700),
        5,
        Duration::ZERO,
    )
    .await;
    let transcript = final_transcript(events).await;
    assert!(transcript.starts_with("heard "), "{transcript}");
    timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("reply audio from the serving bot")
        .expect("reply audio");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_primary_bot_falls_over_to_the_fallback_and_back_and_over_again_mid_session() {
    require_bot!();
    // The primary bot is not running yet.
    let port = free_port();
    let primary_url = format!("ws://127.0.0.1:{port}/ws");
    let fallback = Bot::start(Transport::FastApi, 0, false);
    let mut config = config_for_url(&primary_url);
    config.provider_config.0.insert(
        "fallback_urls".into(),
        serde_json::json!([fallback.url.clone()]),
    );
    config.failover.probe_interval = Duration::from_millis(500);
    let backend = started(config).await;
    let agent =
        || agent_fn(|turn| async move { Ok(AgentReply::text(format!("ok {}", turn.transcript))) });
    let primary = format!("127.0.0.1:{port}");
    let second = voice_backends::runtime::endpoint_of(&fallback.url);

    // The session is served by the fallback bot, turn and reply.
    let s = backend
        .create_session(SessionConfig::new("first").with_agent(agent()))
        .await
        .expect("the fallback bot takes the session");
    let mut events = s.events();
    let mut rx = s.receive_audio().unwrap();
    s.start().await.unwrap();
    assert_eq!(served_by(&*s), second);
    spoken_turn(&*s, &mut events, &mut rx).await;
    let health = backend.health_check().await.details;
    assert_eq!(health["pipecat_endpoint_0_state"], "down", "{health:?}");
    assert_eq!(health["pipecat_endpoint_1_state"], "up", "{health:?}");
    s.stop().await.unwrap();

    // The primary bot comes up: the health check finds it, and the next
    // session is served by it.
    let mut primary_bot = Bot::start(Transport::FastApi, port, false);
    let health = backend.health_check().await.details;
    assert_eq!(health["pipecat_endpoint_0_state"], "up", "{health:?}");
    let s = backend
        .create_session(SessionConfig::new("second").with_agent(agent()))
        .await
        .unwrap();
    let mut events = s.events();
    let mut rx = s.receive_audio().unwrap();
    s.start().await.unwrap();
    assert_eq!(served_by(&*s), primary);
    spoken_turn(&*s, &mut events, &mut rx).await;

    // The primary bot dies mid-session: the reconnect falls over to the
    // fallback bot, and the next turn's reply comes from it.
    primary_bot.kill();
    expect_event(&Pipecat, &mut events, "Reconnecting", |e| {
        *e == SessionEvent::Connection {
            state: ConnectionState::Reconnecting,
        }
    })
    .await;
    expect_event(&Pipecat, &mut events, "Connected to the fallback", |e| {
        *e == SessionEvent::Connection {
            state: ConnectionState::Connected,
        }
    })
    .await;
    assert_eq!(served_by(&*s), second);
    spoken_turn(&*s, &mut events, &mut rx).await;
    let snapshot = backend.metrics().unwrap().snapshot();
    let switches: Vec<_> = snapshot
        .component_switches
        .keys()
        .filter(|k| k.0 == "provider")
        .map(|(_, from, to, why)| format!("{from}->{to}:{why}"))
        .collect();
    assert!(
        switches.contains(&format!("{second}->{primary}:recovered"))
            && switches.contains(&format!("{primary}->{second}:error")),
        "{switches:?}"
    );
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_that_stays_away_fails_the_session_with_connection_failed_and_the_cause() {
    require_bot!();
    let mut bot = Bot::start(Transport::Server, 0, false);
    let mut config = config_for_url(&bot.url);
    config.max_retries = 2;
    config.retry_delay = Duration::from_millis(100);
    let backend = started(config).await;
    let s = backend
        .create_session(SessionConfig::new("orphan"))
        .await
        .unwrap();
    let mut events = s.events();
    s.start().await.unwrap();
    bot.kill();
    let e = expect_event(&Pipecat, &mut events, "the link's failure", |e| {
        matches!(e, SessionEvent::Error { .. })
    })
    .await;
    let SessionEvent::Error { code, message } = e else {
        unreachable!()
    };
    assert_eq!(code, ErrorCode::ConnectionFailed);
    // One attempt at once, then max_retries = 2 retries.
    assert!(message.contains("after 3 attempt(s)"), "{message}");
    let frame = signal::frames(&signal::silence(Duration::from_millis(20)), 20).remove(0);
    let err = s.process_audio(frame).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::ConnectionFailed);
    assert!(err.message.contains("lost"), "{err}");
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_bot_fails_start_and_session_creation_clearly() {
    require_bot!();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = config_for_url(&format!("ws://127.0.0.1:{port}/"));
    config.max_retries = 1;
    config.retry_delay = Duration::from_millis(100);
    let backend = registry().create("pipecat", &config).await.unwrap();
    let err = backend.start().await.unwrap_err();
    assert_eq!(err.code, ErrorCode::ConnectionFailed);
    assert!(err.message.contains(&format!("127.0.0.1:{port}")), "{err}");

    let mut config = config_for_template(&format!("ws://127.0.0.1:{port}/ws"));
    config.max_retries = 1;
    config.retry_delay = Duration::from_millis(100);
    let backend = started(config).await;
    let err = backend
        .create_session(SessionConfig::new("nobody"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code, ErrorCode::ConnectionFailed);
    assert_eq!(err.details.get("attempts").map(String::as_str), Some("2"));

    // wss:// is supported (rustls): the same refusal, not a missing feature.
    let mut config = config_for_template(&format!("wss://127.0.0.1:{port}/ws"));
    config.max_retries = 0;
    let backend = started(config).await;
    let err = backend
        .create_session(SessionConfig::new("nobody"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code, ErrorCode::ConnectionFailed);
    assert!(!err.message.contains("TLS"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_client_bot_refuses_a_second_session_with_a_clear_error() {
    require_bot!();
    let bot = Bot::start(Transport::Server, 0, false);
    let mut config = config_for_url(&bot.url);
    config.max_retries = 1;
    config.retry_delay = Duration::from_millis(100);
    let backend = started(config).await;
    let first = backend
        .create_session(SessionConfig::new("first"))
        .await
        .unwrap();
    let err = backend
        .create_session(SessionConfig::new("second"))
        .await
        .expect_err("the bot has one seat");
    assert_eq!(err.code, ErrorCode::ConnectionFailed);
    assert!(
        err.message.contains("1013") && err.message.contains("url_template"),
        "says why and what to do: {err}"
    );
    // The first session is undisturbed.
    let mut events = first.events();
    first.start().await.unwrap();
    speak(
        &*first,
        Duration::from_millis(500),
        Duration::from_millis(700),
        4,
        Duration::ZERO,
    )
    .await;
    final_transcript(&mut events).await;
    backend.stop().await.unwrap();
}

/// An RTVI message as the bot's serializer frames it.
fn rtvi(json: &str) -> tokio_tungstenite::tungstenite::Message {
    use voice_backends::providers::pipecat::proto;
    tokio_tungstenite::tungstenite::Message::Binary(proto::encode_message(json.to_owned()).into())
}

/// RTVI `bot-ready`.
fn bot_ready() -> tokio_tungstenite::tungstenite::Message {
    rtvi(r#"{"label":"rtvi-ai","type":"bot-ready","id":"x","data":{}}"#)
}

/// RTVI final `user-transcription` of `text`.
fn final_transcription(text: &str) -> tokio_tungstenite::tungstenite::Message {
    rtvi(&format!(
        r#"{{"label":"rtvi-ai","type":"user-transcription","data":{{"text":"{text}","user_id":"","timestamp":"t","final":true}}}}"#
    ))
}

/// A fake bot speaking the wire protocol badly, then well: it sends what
/// `frames` holds once a client connects, and keeps the connection open.
async fn scripted_bot(frames: Vec<tokio_tungstenite::tungstenite::Message>) -> String {
    scripted_bots(vec![frames]).await
}

/// [`scripted_bot`] with a script per connection, in order; connections after
/// the last script get none.
async fn scripted_bots(scripts: Vec<Vec<tokio_tungstenite::tungstenite::Message>>) -> String {
    use futures_util::{SinkExt, StreamExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut scripts = scripts.into_iter();
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            // Health probes connect without a handshake: skip them.
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                continue;
            };
            let frames = scripts.next().unwrap_or_default();
            tokio::spawn(async move {
                // Wait for client-ready, then play the script.
                let _ = ws.next().await;
                for f in frames {
                    if ws.send(f).await.is_err() {
                        return;
                    }
                }
                while ws.next().await.is_some() {}
            });
        }
    });
    format!("ws://{addr}/")
}

/// A backend on the scripted bot at `url`, and a started session of `user`
/// with its events. The bot never answers the turn its transcript starts: a
/// short timeout bounds how long the graceful stop waits for it.
async fn scripted_session(
    url: &str,
    user: &str,
) -> (Arc<dyn VoiceBackend>, Arc<dyn VoiceSession>, SessionEvents) {
    let mut config = config_for_url(url);
    config.timeout = Duration::from_secs(1);
    let backend = started(config).await;
    let session = backend
        .create_session(SessionConfig::new(user))
        .await
        .unwrap();
    let events = session.events();
    session.start().await.unwrap();
    (backend, session, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_fails_the_link_which_reconnects() {
    use tokio_tungstenite::tungstenite::Message;
    use voice_backends::providers::pipecat::proto;
    let ready = bot_ready();
    // 3 MiB of audio in one message: over 90 s at 16 kHz.
    let huge = Message::Binary(proto::encode_audio(vec![0u8; 3 << 20].into(), 16_000, 1).into());
    let after = final_transcription("after the big one");
    let url = scripted_bots(vec![vec![ready.clone(), huge], vec![ready, after]]).await;
    let (backend, _session, mut events) = scripted_session(&url, "big").await;
    expect_event(&Pipecat, &mut events, "the link reconnecting", |e| {
        matches!(
            e,
            SessionEvent::Connection {
                state: ConnectionState::Reconnecting
            }
        )
    })
    .await;
    assert_eq!(final_transcript(&mut events).await, "after the big one");
    let health = backend.health_check().await;
    assert_eq!(
        health.details.get("pipecat_reconnects").map(String::as_str),
        Some("1"),
        "{health:?}"
    );
    backend.stop().await.unwrap();
}

/// A reply the agent makes while the link is reconnecting goes to the bot
/// once it is back: the first connection drops after 300 ms, the second takes
/// 900 ms to say `bot-ready` (a restarting bot) and reports the texts it is
/// given to speak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_made_while_the_link_reconnects_reaches_the_bot() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use voice_backends::providers::pipecat::proto::{self, Inbound};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (spoken_tx, mut spoken) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut connection = 0;
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                continue;
            };
            connection += 1;
            let (first, spoken_tx) = (connection == 1, spoken_tx.clone());
            tokio::spawn(async move {
                let _ = ws.next().await; // client-ready
                if first {
                    ws.send(bot_ready()).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let _ = ws.close(None).await;
                    return;
                }
                let (mut write, mut read) = ws.split();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(900)).await;
                    let _ = write.send(bot_ready()).await;
                    std::future::pending::<()>().await;
                    drop(write);
                });
                while let Some(Ok(m)) = read.next().await {
                    if let Message::Binary(b) = m
                        && let Ok(Inbound::Text(t)) = proto::decode(b)
                    {
                        let _ = spoken_tx.send(t);
                    }
                }
            });
        }
    });
    let mut config = config_for_url(&format!("ws://{addr}/"));
    config.max_retries = 3;
    config.retry_delay = Duration::from_millis(200);
    config.timeout = Duration::from_secs(4);
    let backend = started(config).await;
    let agent =
        agent_fn(
            |turn| async move { Ok(AgentReply::text(format!("reply to {}", turn.transcript))) },
        );
    let session = backend
        .create_session(SessionConfig::new("typist").with_agent(agent))
        .await
        .unwrap();
    let mut events = session.events();
    session.start().await.unwrap();
    let state = |wanted: ConnectionState| move |e: &SessionEvent| matches!(e, SessionEvent::Connection { state } if *state == wanted);
    expect_event(
        &Pipecat,
        &mut events,
        "reconnecting",
        state(ConnectionState::Reconnecting),
    )
    .await;
    session.send_text("typed meanwhile").await.unwrap();
    expect_event(
        &Pipecat,
        &mut events,
        "connected",
        state(ConnectionState::Connected),
    )
    .await;
    let got = timeout(Duration::from_secs(3), spoken.recv()).await;
    assert_eq!(
        got.ok().flatten().as_deref(),
        Some("reply to typed meanwhile"),
        "{:?}",
        backend.health_check().await
    );
    let health = backend.health_check().await;
    assert_eq!(
        health.details.get("pipecat_reconnects").map(String::as_str),
        Some("1")
    );
    // Each connection's bot-ready, read while connecting, counts as received.
    assert_eq!(
        health
            .details
            .get("pipecat_messages_received")
            .map(String::as_str),
        Some("2")
    );
    backend.stop().await.unwrap();
}

/// A transcript the bot sends behind more audio than the session's event
/// queue holds, before the application starts the session (a bot greeting
/// on connect), still reaches the session: only audio is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transcript_behind_more_audio_than_the_queue_holds_is_not_lost() {
    use tokio_tungstenite::tungstenite::Message;
    use voice_backends::providers::pipecat::proto;
    let mut script = vec![bot_ready()];
    for _ in 0..300 {
        let audio = proto::encode_audio(vec![0u8; 640].into(), 16_000, 1);
        script.push(Message::Binary(audio.into()));
    }
    script.push(final_transcription("hello behind the greeting"));
    let url = scripted_bot(script).await;
    let mut config = config_for_url(&url);
    config.timeout = Duration::from_secs(1);
    let backend = started(config).await;
    let session = backend
        .create_session(SessionConfig::new("late"))
        .await
        .unwrap();
    let mut events = session.events();
    tokio::time::sleep(Duration::from_millis(500)).await;
    session.start().await.unwrap();
    assert_eq!(
        final_transcript(&mut events).await,
        "hello behind the greeting"
    );
    let health = backend.health_check().await;
    let dropped: u64 = health.details["pipecat_frames_dropped"].parse().unwrap();
    assert!(
        dropped > 0,
        "the audio beyond the queue is dropped: {health:?}"
    );
    backend.stop().await.unwrap();
}

/// A bot that says it is ready, then reads nothing more (a stalled process).
async fn deaf_bot() -> String {
    use futures_util::{SinkExt, StreamExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let _ = ws.next().await;
                let _ = ws.send(bot_ready()).await;
                // Hold the connection, read nothing.
                std::future::pending::<()>().await;
                drop(ws);
            });
        }
    });
    format!("ws://{addr}/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_that_stops_reading_loses_the_link_after_the_timeout() {
    let url = deaf_bot().await;
    let (backend, session, mut events) = scripted_session(&url, "deaf").await;
    // Audio until the socket's buffers are full and the link stalls; after
    // the timeout (1 s) it is given up and reopened.
    let frame = signal::silence(Duration::from_millis(20));
    let reconnecting = |e: &SessionEvent| {
        matches!(
            e,
            SessionEvent::Connection {
                state: ConnectionState::Reconnecting
            }
        )
    };
    let feed = async {
        loop {
            for _ in 0..256 {
                let f = voice_backends::AudioFrame::from_i16(16_000, 1, &frame).unwrap();
                let _ = session.process_audio(f).await;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let seen = timeout(Duration::from_secs(30), async {
        tokio::select! {
            () = feed => unreachable!(),
            e = expect_event(&Pipecat, &mut events, "the link reconnecting", reconnecting) => e,
        }
    })
    .await;
    assert!(seen.is_ok(), "the stalled link was given up");
    // The bot takes the new connection (it reads again until its buffers
    // fill): the reconnect counts once it is made.
    expect_event(&Pipecat, &mut events, "the link connected again", |e| {
        matches!(
            e,
            SessionEvent::Connection {
                state: ConnectionState::Connected
            }
        )
    })
    .await;
    // Nothing is fed any more, so nothing more is dropped.
    let metrics = backend.metrics().expect("the backend's metrics").snapshot();
    let health = backend.health_check().await;
    assert_eq!(
        health.details.get("pipecat_reconnects").map(String::as_str),
        Some("1"),
        "{health:?}"
    );
    // The audio the stalled link could not take is in the backend's metrics
    // (pipeline_frames_dropped_total{reason="input_overflow"}) as well.
    let dropped: u64 = health.details["pipecat_frames_dropped"].parse().unwrap();
    let input_overflow = metrics.dropped[&voice_backends::metrics::DropReason::InputOverflow];
    assert!(input_overflow > 0, "{health:?}");
    assert!(input_overflow <= dropped, "{input_overflow} > {dropped}");
    backend.stop().await.unwrap();
}

/// A bot whose audio changes format every frame would make a resampler per
/// frame: after 4 in a second, the frames that need another are skipped
/// (counted as malformed), and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_changing_format_every_frame_is_skipped_past_four_resamplers_a_second() {
    use tokio_tungstenite::tungstenite::Message;
    use voice_backends::providers::pipecat::proto;
    let mut script = vec![bot_ready()];
    for i in 0..20 {
        // Neither is the session's 16 kHz: each needs a resampler.
        let rate = if i % 2 == 0 { 24_000 } else { 48_000 };
        let bytes = vec![0u8; (rate / 50 * 2) as usize];
        script.push(Message::Binary(
            proto::encode_audio(bytes.into(), rate, 1).into(),
        ));
    }
    script.push(final_transcription("still here"));
    let url = scripted_bot(script).await;
    let (backend, _session, mut events) = scripted_session(&url, "wobbly").await;
    assert_eq!(final_transcript(&mut events).await, "still here");
    // Frames 0 to 3 make the 4 resamplers; the one kept is then for 48 kHz,
    // and each 24 kHz frame after (4, 6, ..., 18) would need another.
    let health = backend.health_check().await;
    assert_eq!(
        health
            .details
            .get("pipecat_messages_malformed")
            .map(String::as_str),
        Some("8"),
        "{health:?}"
    );
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dot_user_id_never_becomes_a_path_step_of_a_template_url() {
    let ready = bot_ready();
    let bot = scripted_bots(vec![vec![ready]]).await;
    let mut config = Config::new("pipecat");
    config.timeout = Duration::from_secs(1);
    config.max_retries = 0;
    config
        .provider_config
        .0
        .insert("url_template".into(), format!("{bot}u/{{user_id}}").into());
    let backend = started(config).await;
    for user in [".", ".."] {
        let err = match backend.create_session(SessionConfig::new(user)).await {
            Err(e) => e,
            Ok(s) => s.start().await.unwrap_err(),
        };
        assert_eq!(err.code, ErrorCode::InvalidConfig, "{user}: {err}");
        assert!(err.message.contains("path step"), "{user}: {err}");
    }
    // Dots among other characters are one segment, and connect.
    let s = backend
        .create_session(SessionConfig::new("a.b.."))
        .await
        .unwrap();
    s.start().await.unwrap();
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_and_json_are_counted_and_skipped_and_the_session_goes_on() {
    use tokio_tungstenite::tungstenite::Message;
    use voice_backends::providers::pipecat::proto;
    let url = scripted_bot(vec![
        bot_ready(),
        Message::Binary(vec![0xff, 0xff, 0xff].into()),
        Message::Binary(Vec::new().into()),
        Message::Text("not protobuf".into()),
        rtvi("{not json"),
        rtvi(r#"{"label":"rtvi-ai"}"#),
        rtvi(r#"{"label":"rtvi-ai","type":"user-transcription","data":{}}"#),
        Message::Binary(proto::encode_audio(vec![1u8, 2, 3].into(), 24_000, 1).into()),
        rtvi(r#"{"label":"someone-else","type":"anything"}"#),
        final_transcription("still here"),
    ])
    .await;
    let (backend, _session, mut events) = scripted_session(&url, "tough").await;
    assert_eq!(final_transcript(&mut events).await, "still here");
    let health = backend.health_check().await;
    assert_eq!(
        health
            .details
            .get("pipecat_messages_malformed")
            .map(String::as_str),
        Some("7"),
        "{health:?}"
    );
    backend.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Config

#[test]
fn config_errors_name_the_field_and_never_echo_secrets() {
    let p = registry().get_provider("pipecat").unwrap();
    let mut config = Config::new("pipecat");
    let err = p.validate_config(&config).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidConfig);
    assert!(err.details.contains_key("provider_config.url"), "{err}");

    config
        .provider_config
        .0
        .insert("url".into(), "http://bot:1/".into());
    config
        .provider_config
        .0
        .insert("url_template".into(), "ws://bot/{session_id}".into());
    let err = p.validate_config(&config).unwrap_err();
    assert!(
        err.details.contains_key("provider_config.url_template"),
        "{err}"
    );

    config.provider_config.0.remove("url_template");
    let err = p.validate_config(&config).unwrap_err();
    assert!(err.message.contains("scheme \"http\""), "{err}");

    let mut config = config_for_url("ws://127.0.0.1:9/");
    config
        .provider_config
        .0
        .insert("auth_token".into(), "hunter2-secret".into());
    config
        .provider_config
        .0
        .insert("input_sample_rate".into(), 4000.into());
    let err = p.validate_config(&config).unwrap_err();
    assert!(
        err.details
            .contains_key("provider_config.input_sample_rate"),
        "{err}"
    );
    assert!(!format!("{err} {err:?} {config:?}").contains("hunter2"));

    // Fallback URLs: each checked, named by its index, never echoed.
    let mut config = config_for_url("ws://127.0.0.1:9/?token=hunter2");
    config.provider_config.0.insert(
        "fallback_urls".into(),
        serde_json::json!([
            "ws://127.0.0.1:10/?token=hunter2",
            "http://user:hunter2@bot:1/",
            "ws://127.0.0.1:9/?token=hunter2",
            "ws://127.0.0.1:10/?token=hunter2",
        ]),
    );
    let err = p.validate_config(&config).unwrap_err();
    assert!(
        !err.details.contains_key("provider_config.fallback_urls[0]"),
        "{err}"
    );
    assert!(
        err.details["provider_config.fallback_urls[1]"].contains("scheme \"http\""),
        "{err}"
    );
    assert!(
        err.details["provider_config.fallback_urls[2]"].contains("repeats the first URL"),
        "{err}"
    );
    assert!(
        err.details["provider_config.fallback_urls[3]"].contains("repeats entry 0"),
        "{err}"
    );
    assert!(!format!("{err} {err:?} {config:?}").contains("hunter2"));
    // A config without fallback_urls stays valid, and one with them too.
    config.provider_config.0.insert(
        "fallback_urls".into(),
        serde_json::json!(["wss://bot-b/?token=hunter2"]),
    );
    p.validate_config(&config).unwrap();
    let parsed = voice_backends::providers::pipecat::PipecatConfig::from_config(&config).unwrap();
    let shown = format!("{parsed:?}");
    assert!(
        shown.contains("bot-b") && !shown.contains("hunter2"),
        "{shown}"
    );

    let schema = p.config_schema();
    for key in [
        "url",
        "url_template",
        "fallback_urls",
        "auth_token",
        "input_sample_rate",
        "client_ready",
    ] {
        assert!(schema.has_property(key), "schema lists {key}");
    }
}

#[tokio::test]
async fn the_bot_hosts_stt_and_tts_so_no_components_are_needed() {
    let config = config_for_url("ws://127.0.0.1:9/");
    assert!(
        config.validate().is_err(),
        "a local pipeline would need components"
    );
    let backend = registry().create("pipecat", &config).await.unwrap();
    assert_eq!(backend.provider(), "pipecat");
}

// ---------------------------------------------------------------------------
// Protocol decoding on arbitrary input

mod decoding {
    use bytes::Bytes;
    use proptest::prelude::*;
    use voice_backends::providers::pipecat::{proto, rtvi};

    proptest! {
        #[test]
        fn arbitrary_bytes_decode_to_a_frame_or_an_error(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            // Never a panic; audio that decodes is whole samples at a sane rate.
            if let Ok(proto::Inbound::Audio(f)) = proto::decode(Bytes::from(data)) {
                prop_assert_eq!(f.data().len() % f.format().bytes_per_frame(), 0);
                prop_assert!((8_000..=192_000).contains(&f.format().sample_rate));
            }
        }

        #[test]
        fn text_that_is_not_a_json_object_is_a_pipeline_error(text in ".{0,200}") {
            let is_object = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text).is_ok();
            match rtvi::parse(&text) {
                Err(e) => {
                    prop_assert_eq!(e.code, voice_backends::ErrorCode::PipelineError);
                    prop_assert!(e.message.starts_with("message frame is not a JSON object") || is_object, "{}", e);
                }
                Ok(_) => prop_assert!(is_object, "{:?} parsed", text),
            }
        }

        #[test]
        fn rtvi_messages_parse_to_their_event_or_name_what_is_missing(
            rtvi_label in any::<bool>(),
            kind in prop::option::of(prop_oneof![
                Just("user-transcription".to_owned()),
                Just("bot-tts-text".to_owned()),
                Just("bot-ready".to_owned()),
                Just("bot-interrupted".to_owned()),
                Just("error".to_owned()),
                "x-[a-z-]{1,10}",
            ]),
            text in prop::option::of(".{0,40}"),
            is_final in prop::option::of(any::<bool>()),
        ) {
            let mut data = serde_json::Map::new();
            if let Some(t) = &text {
                data.insert("text".into(), t.clone().into());
            }
            if let Some(f) = is_final {
                data.insert("final".into(), f.into());
            }
            let mut message = serde_json::json!({
                "label": if rtvi_label { rtvi::LABEL } else { "other" },
                "data": data,
            });
            if let Some(k) = &kind {
                message["type"] = k.clone().into();
            }
            let parsed = rtvi::parse(&message.to_string());
            let missing = |what: &str| -> Result<(), TestCaseError> {
                let e = parsed.as_ref().expect_err("a message missing a field is refused");
                prop_assert_eq!(e.code, voice_backends::ErrorCode::PipelineError);
                prop_assert!(e.message.contains(what), "{}", e);
                Ok(())
            };
            match (rtvi_label, kind.as_deref(), &text) {
                (false, _, _) => prop_assert_eq!(parsed.unwrap(), None),
                (true, None, _) => missing("without a type")?,
                (true, Some("user-transcription"), Some(t)) => prop_assert_eq!(
                    parsed.unwrap(),
                    Some(rtvi::RtviEvent::UserTranscription { text: t.clone(), is_final: is_final.unwrap_or(false) })
                ),
                (true, Some("bot-tts-text"), Some(t)) => {
                    prop_assert_eq!(parsed.unwrap(), Some(rtvi::RtviEvent::BotText(t.clone())))
                }
                (true, Some(k @ ("user-transcription" | "bot-tts-text")), None) => {
                    missing(&format!("RTVI {k} message without data.text"))?
                }
                (true, Some("bot-ready"), _) => prop_assert_eq!(parsed.unwrap(), Some(rtvi::RtviEvent::BotReady)),
                (true, Some("bot-interrupted"), _) => {
                    prop_assert_eq!(parsed.unwrap(), Some(rtvi::RtviEvent::BotInterrupted))
                }
                (true, Some("error"), _) => prop_assert_eq!(
                    parsed.unwrap(),
                    Some(rtvi::RtviEvent::Error("the bot reported an error".into()))
                ),
                (true, Some(other), _) => {
                    prop_assert_eq!(parsed.unwrap(), Some(rtvi::RtviEvent::Other(other.to_owned())))
                }
            }
        }

        #[test]
        fn audio_survives_the_wire(samples in proptest::collection::vec(any::<i16>(), 0..800), rate in 8_000u32..=48_000) {
            let pcm: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
            let wire = proto::encode_audio(Bytes::from(pcm.clone()), rate, 1);
            match proto::decode(Bytes::from(wire)).unwrap() {
                proto::Inbound::Audio(f) => {
                    prop_assert_eq!(f.format().sample_rate, rate);
                    prop_assert_eq!(f.data().as_ref(), &pcm[..]);
                }
                other => prop_assert!(false, "decoded as {:?}", other),
            }
        }

        #[test]
        fn text_survives_the_wire(text in ".{0,100}") {
            let wire = proto::encode_text(&text);
            prop_assert_eq!(proto::decode(Bytes::from(wire)).unwrap(), proto::Inbound::Text(text));
        }

        #[test]
        fn truncated_frames_are_errors(text in ".{1,60}", cut in 0usize..64) {
            let wire = proto::encode_message(rtvi::client_ready(&text));
            let cut = cut.min(wire.len() - 1);
            prop_assert!(proto::decode(Bytes::copy_from_slice(&wire[..cut])).is_err());
        }
    }
}
