#![cfg(all(feature = "cartesia", feature = "testing"))]
//! The `cartesia` provider and the `cartesia` STT and TTS components against
//! a faithful fake of Cartesia's two WebSockets (`tests/cartesia_fake/`,
//! bound to 127.0.0.1:0). The JSON both sides sent is checked against the
//! official Cartesia Python SDK's models when `VOICE_BACKENDS_CARTESIA_PYTHON`
//! names a venv with it (`./scripts/venv cartesia
//! tests/cartesia_py/requirements.txt`); without it that one test prints why
//! and passes without running.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use voice_backends::pipeline::events::{SessionEvent, SessionEvents};
use voice_backends::pipeline::{SttEvent, TextToSpeech, components};
use voice_backends::providers::cartesia::protocol;
use voice_backends::testing::conformance::{Harness, expect_event_within, speak};
use voice_backends::{
    AgentReply, AudioFormat, Config, ConnectionState, ErrorCode, PipelineType, SessionConfig,
    VoiceBackend, VoiceSession, agent_fn, registry,
};

#[path = "cartesia_fake/mod.rs"]
mod cartesia_fake;
use cartesia_fake::FakeCartesia;

const KEY: &str = "sk_car_test_key_0123456789";
const VOICE: &str = "6ccbfb76-1fc6-48f7-b71d-91ac6298247b";
const PATIENCE: Duration = Duration::from_secs(10);

fn options(base_url: &str, key: &str) -> Value {
    json!({
        "api_key": key,
        "base_url": base_url,
        "tts": { "voice_id": VOICE, "language": "en", "context_idle": "500ms" },
        "stt": { "language": "en" },
    })
}

fn config(base_url: &str, key: &str) -> Config {
    let mut config = Config::new("cartesia");
    config.max_retries = 2;
    config.retry_delay = Duration::from_millis(100);
    config.timeout = Duration::from_secs(5);
    config.provider_config.0 = options(base_url, key).as_object().cloned().unwrap();
    config
}

async fn backend(base_url: &str, key: &str) -> Arc<dyn VoiceBackend> {
    let config = config(base_url, key);
    let backend = registry()
        .create("cartesia", &config)
        .await
        .expect("backend");
    backend.start().await.expect("start");
    backend
}

async fn event(
    events: &mut SessionEvents,
    what: &str,
    pred: impl FnMut(&SessionEvent) -> bool,
) -> SessionEvent {
    expect_event_within(PATIENCE, events, what, pred).await
}

async fn until(what: &str, done: impl FnMut() -> bool) {
    voice_backends::testing::conformance::wait_until(PATIENCE, what, done).await
}

async fn utter(session: &dyn VoiceSession, seed: u64) {
    speak(
        session,
        Duration::from_millis(700),
        Duration::from_millis(900),
        seed,
        Duration::from_millis(2),
    )
    .await;
}

// ---------------------------------------------------------------------------
// The backend conformance suite, against one fake on a runtime of its own

fn shared_fake() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let fake = FakeCartesia::start(KEY).await;
                tx.send(fake.base_url.clone()).expect("send");
                std::future::pending::<()>().await;
            });
        });
        rx.recv().expect("the fake starts")
    })
}

struct Cartesia;

impl Harness for Cartesia {
    fn config(&self) -> Config {
        config(shared_fake(), KEY)
    }
}

mod conformance {
    use super::*;
    voice_backends::conformance_suite!(Cartesia);
}

// ---------------------------------------------------------------------------
// Turns

/// A streamed reply: the first sentence goes to Cartesia while the agent is
/// still writing; every piece continues one context, each followed by a
/// flush; the context ends once the reply is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_reply_is_spoken_on_one_context_before_the_agent_finishes() {
    let fake = FakeCartesia::start(KEY).await;
    let backend = backend(&fake.base_url, KEY).await;
    let finished: Arc<Mutex<Option<Instant>>> = Arc::default();
    let agent = agent_fn({
        let finished = finished.clone();
        move |turn| {
            let finished = finished.clone();
            async move {
                let (tx, reply) = AgentReply::channel(8);
                tokio::spawn(async move {
                    let _ = tx.send(Ok(format!("You said: {} ", turn.transcript))).await;
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    let _ = tx.send(Ok("Here is more. ".into())).await;
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    let _ = tx.send(Ok("The end.".into())).await;
                    *finished.lock().unwrap() = Some(Instant::now());
                });
                Ok(reply)
            }
        }
    });
    let session = backend
        .create_session(SessionConfig::new("ann").with_agent(agent))
        .await
        .expect("session");
    let mut events = session.events();
    let mut audio = session.receive_audio().unwrap();
    session.start().await.unwrap();
    utter(&*session, 3).await;

    let heard = event(&mut events, "the final transcript", |e| {
        matches!(e, SessionEvent::UserTranscript { is_final: true, .. })
    })
    .await;
    assert!(
        matches!(&heard, SessionEvent::UserTranscript { text, .. } if text == "Hello there."),
        "the turn's final pieces joined at flush_done: {heard:?}"
    );
    assert_eq!(
        fake.stt_commands(),
        ["finalize"],
        "the local turn end finalizes"
    );
    timeout(PATIENCE, audio.recv())
        .await
        .expect("reply audio")
        .unwrap();
    until("the whole reply reaches Cartesia", || {
        fake.generations()
            .iter()
            .any(|g| g["transcript"] == "The end.")
    })
    .await;
    let first_request = fake.state.tts_requests.lock().unwrap()[0].0;
    let done = finished.lock().unwrap().expect("the agent finished");
    assert!(
        first_request < done,
        "the first sentence left {:?} before the agent finished",
        done - first_request
    );
    let generations = fake.generations();
    let spoken: Vec<&Value> = generations
        .iter()
        .filter(|g| g["transcript"] != "")
        .collect();
    let texts: Vec<&str> = spoken
        .iter()
        .map(|g| g["transcript"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["You said: Hello there.", "Here is more.", "The end."]
    );
    let context = spoken[0]["context_id"].clone();
    assert!(
        spoken
            .iter()
            .all(|g| g["context_id"] == context && g["continue"] == true),
        "one context, continued: {spoken:?}"
    );
    let flushes = || {
        fake.generations()
            .iter()
            .filter(|g| g["flush"] == true && g["context_id"] == context)
            .count()
    };
    until("each piece is flushed", || flushes() >= 3).await;
    assert_eq!(flushes(), 3, "one flush per piece");
    assert_eq!(spoken[0]["voice"], json!({"mode": "id", "id": VOICE}));
    assert_eq!(spoken[0]["output_format"]["sample_rate"], 16_000);
    // The reply ends; its context is closed (continue: false) once idle.
    event(&mut events, "listening again", |e| {
        matches!(
            e,
            SessionEvent::State {
                to: voice_backends::PipelineState::Listening,
                ..
            }
        )
    })
    .await;
    until("the context is closed", || {
        fake.generations()
            .iter()
            .any(|g| g["context_id"] == context && g["continue"] == false)
    })
    .await;
    assert!(fake.cancels().is_empty());
    session.stop().await.unwrap();
    until("close on the speech-to-text socket", || {
        fake.stt_commands().last().map(String::as_str) == Some("close")
    })
    .await;
    until("done answers close", || !fake.sent_of("done").is_empty()).await;
    backend.stop().await.unwrap();
}

/// A backend's sessions each have their speech-to-text socket and share
/// one text-to-speech socket, their contexts named after them; every
/// connection carries the key and the version headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_share_one_tts_socket() {
    let fake = FakeCartesia::start(KEY).await;
    let backend = backend(&fake.base_url, KEY).await;
    let mut sessions = Vec::new();
    for user in ["gus", "hal", "ida"] {
        let agent = agent_fn(move |_| async move { Ok(AgentReply::text(format!("Hi {user}."))) });
        let s = backend
            .create_session(SessionConfig::new(user).with_agent(agent))
            .await
            .unwrap();
        s.start().await.unwrap();
        sessions.push(s);
    }
    for s in &sessions {
        s.send_text("hello").await.unwrap();
    }
    until("three replies", || {
        fake.generations()
            .iter()
            .filter(|g| g["transcript"] != "")
            .count()
            == 3
    })
    .await;
    let connections =
        |n: &std::sync::atomic::AtomicUsize| n.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        connections(&fake.state.tts_connections),
        1,
        "one shared socket"
    );
    assert_eq!(
        connections(&fake.state.stt_connections),
        3,
        "one per session"
    );
    for s in &sessions {
        let user = s.user_id().to_owned();
        let reply = fake
            .generations()
            .into_iter()
            .find(|g| g["transcript"] == format!("Hi {user}."))
            .expect("the session's reply");
        assert!(
            reply["context_id"]
                .as_str()
                .unwrap()
                .starts_with(s.id().as_str()),
            "{reply}"
        );
    }
    let versions = fake.state.versions.lock().unwrap().clone();
    assert_eq!(versions.len(), 4);
    assert!(
        versions
            .iter()
            .all(|v| v == voice_backends::providers::cartesia::DEFAULT_VERSION)
    );
    backend.stop().await.unwrap();
}

/// User speech during the reply cancels its context on the shared socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_cancels_the_context_mid_stream() {
    let fake = FakeCartesia::start(KEY).await;
    // Cartesia speaks slower than it is played: chunks keep coming.
    *fake.state.pace.lock().unwrap() = Duration::from_millis(15);
    let backend = backend(&fake.base_url, KEY).await;
    let agent = agent_fn(|_| async {
        Ok(AgentReply::text(
            "a long answer that takes a good while to say, so that there is time to cut in on it and stop it",
        ))
    });
    let session = backend
        .create_session(SessionConfig::new("bea").with_agent(agent))
        .await
        .unwrap();
    let mut events = session.events();
    let mut audio = session.receive_audio().unwrap();
    session.start().await.unwrap();
    utter(&*session, 5).await;
    timeout(PATIENCE, audio.recv())
        .await
        .expect("reply audio")
        .unwrap();
    let context = fake.generations()[0]["context_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let interrupt = voice_backends::testing::signal::speech_like(Duration::from_millis(600), 77);
    for frame in voice_backends::testing::signal::frames(&interrupt, 20) {
        session.process_audio(frame).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    event(&mut events, "the interruption", |e| {
        matches!(e, SessionEvent::Interrupted { .. })
    })
    .await;
    until("the context is cancelled", || {
        fake.cancels() == [context.clone()]
    })
    .await;
    let chunks = || {
        fake.sent_of("chunk")
            .iter()
            .filter(|c| c["context_id"] == context)
            .count()
    };
    let at_cancel = chunks();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(chunks() <= at_cancel + 1, "audio stops after the cancel");
    assert!(
        fake.sent_of("done")
            .iter()
            .all(|d| d["context_id"] != context),
        "a cancelled context is not finished"
    );
    backend.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Failures

/// The shared socket drops mid-stream: the piece fails, the next one
/// reconnects; a drop before any audio is retried unseen; a dropped
/// speech-to-text socket reconnects with the session told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_sockets_reconnect() {
    let fake = FakeCartesia::start(KEY).await;
    let tts = tts_component(&fake.base_url, KEY);
    let (tx, mut rx) = mpsc::channel(1024);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    fake.drop_tts_after(3);
    let err = tts
        .synthesize(
            "A sentence long enough to be cut.",
            AudioFormat::PCM16_16K_MONO,
            &tx,
        )
        .await
        .expect_err("the socket dropped mid-reply");
    assert_eq!(err.code, ErrorCode::ConnectionFailed, "{err}");
    assert!(err.message.contains("mid-reply"), "{err}");
    tts.synthesize("Again.", AudioFormat::PCM16_16K_MONO, &tx)
        .await
        .expect("the next piece reconnects");
    assert_eq!(
        fake.state
            .tts_connections
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    // Dropped while idle: the next piece connects again.
    fake.drop_tts();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tts.synthesize("Once more.", AudioFormat::PCM16_16K_MONO, &tx)
        .await
        .expect("a lost idle socket is made again");
    assert_eq!(
        fake.state
            .tts_connections
            .load(std::sync::atomic::Ordering::SeqCst),
        3
    );
    drop(tx);
    drain.await.unwrap();

    let backend = backend(&fake.base_url, KEY).await;
    let session = backend
        .create_session(SessionConfig::new("cy"))
        .await
        .unwrap();
    let mut events = session.events();
    session.start().await.unwrap();
    fake.drop_stt();
    event(&mut events, "reconnecting", |e| {
        matches!(
            e,
            SessionEvent::Connection {
                state: ConnectionState::Reconnecting
            }
        )
    })
    .await;
    event(&mut events, "connected", |e| {
        matches!(
            e,
            SessionEvent::Connection {
                state: ConnectionState::Connected
            }
        )
    })
    .await;
    assert_eq!(
        fake.state
            .stt_connections
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    let before = fake
        .state
        .stt_audio_bytes
        .load(std::sync::atomic::Ordering::SeqCst);
    utter(&*session, 9).await;
    assert!(
        fake.state
            .stt_audio_bytes
            .load(std::sync::atomic::Ordering::SeqCst)
            > before
    );
    backend.stop().await.unwrap();
}

fn tts_component(base_url: &str, key: &str) -> Arc<dyn TextToSpeech> {
    components()
        .tts
        .get("cartesia")
        .expect("the tts component is registered")
        .with_options(&options(base_url, key))
        .expect("options")
        .expect("a speaker for the options")
}

/// 401 is authentication_failed; 429 is rate_limit_exceeded and retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_map_to_codes() {
    let fake = FakeCartesia::start(KEY).await;
    let (tx, mut rx) = mpsc::channel(1024);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });

    // Text-to-speech: a wrong key at the handshake, then error frames.
    let wrong = tts_component(&fake.base_url, "sk_car_wrong_key_987654321");
    let err = wrong
        .synthesize("Hi.", AudioFormat::PCM16_16K_MONO, &tx)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::AuthenticationFailed, "{err}");
    assert!(
        !format!("{err:?}").contains("wrong_key"),
        "no key in errors: {err:?}"
    );
    let tts = tts_component(&fake.base_url, KEY);
    fake.fail_next_tts(&[429]);
    let err = tts
        .synthesize("Hi.", AudioFormat::PCM16_16K_MONO, &tx)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::RateLimitExceeded, "{err}");
    assert!(err.is_retryable());
    fake.fail_next_tts(&[401]);
    let err = tts
        .synthesize("Hi.", AudioFormat::PCM16_16K_MONO, &tx)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::AuthenticationFailed, "{err}");
    tts.synthesize("Hi.", AudioFormat::PCM16_16K_MONO, &tx)
        .await
        .expect("then it speaks");
    // The handshake answering 429 is retried, then succeeds.
    fake.drop_tts();
    tokio::time::sleep(Duration::from_millis(50)).await;
    fake.refuse_next(&[429]);
    tts.synthesize("Hi.", AudioFormat::PCM16_16K_MONO, &tx)
        .await
        .expect("429 is retried");
    assert!(
        fake.state
            .refused
            .lock()
            .unwrap()
            .contains(&("/tts/websocket".into(), 429))
    );

    // Speech-to-text: the session's link.
    let refused = backend(&fake.base_url, KEY).await;
    fake.refuse_next(&[429, 429, 429]);
    let err = refused
        .create_session(SessionConfig::new("dee"))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::ConnectionFailed, "{err}");
    let cause = std::error::Error::source(&err)
        .and_then(|s| s.downcast_ref::<voice_backends::BackendError>())
        .expect("the cause");
    assert_eq!(cause.code, ErrorCode::RateLimitExceeded, "{cause}");
    assert_eq!(
        err.details.get("attempts").map(String::as_str),
        Some("3"),
        "{err}"
    );
    refused.stop().await.unwrap();

    let config = config(&fake.base_url, "sk_car_wrong_key_987654321");
    let wrong = registry().create("cartesia", &config).await.unwrap();
    assert_eq!(
        wrong.start().await.unwrap_err().code,
        ErrorCode::AuthenticationFailed,
        "the shared socket is refused at start"
    );
}

/// Bad config is refused before anything connects, naming the field.
#[tokio::test]
async fn bad_config_is_refused_by_field() {
    let mut bad = config("http://example.com", KEY);
    bad.provider_config
        .0
        .insert("tts".into(), json!({"sample_rate": 11025}));
    let err = registry().create("cartesia", &bad).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidConfig);
    for field in [
        "provider_config.base_url",
        "provider_config.tts.sample_rate",
    ] {
        assert!(err.details.contains_key(field), "{field}: {err}");
    }
    let mut no_voice = config("ws://127.0.0.1:9", KEY);
    no_voice.provider_config.0.insert("tts".into(), json!({}));
    let err = registry().create("cartesia", &no_voice).await.unwrap_err();
    assert!(
        err.details.contains_key("provider_config.tts.voice_id"),
        "{err}"
    );
    assert!(!format!("{err} {err:?}").contains(KEY), "no key in errors");
    let mut typo = config("ws://127.0.0.1:9", KEY);
    typo.provider_config.0.insert("voice".into(), json!("x"));
    assert_eq!(
        registry().create("cartesia", &typo).await.unwrap_err().code,
        ErrorCode::InvalidConfig
    );
    // A local backend naming the components without options.
    let mut local = Config::new("local");
    local.pipeline_type = PipelineType::SttTts;
    local.stt_provider = Some("cartesia".into());
    local.tts_provider = Some("cartesia".into());
    let err = registry().create("local", &local).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidConfig);
    assert!(err.details.contains_key("components.cartesia"), "{err}");
}

// ---------------------------------------------------------------------------
// The components in a local backend

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_components_serve_a_local_backend() {
    let fake = FakeCartesia::start(KEY).await;
    let mut config = Config::new("local");
    config.pipeline_type = PipelineType::SttTts;
    config.stt_provider = Some("cartesia".into());
    config.tts_provider = Some("cartesia".into());
    config.components.insert(
        "cartesia".into(),
        voice_backends::config::ProviderSection(
            options(&fake.base_url, KEY).as_object().cloned().unwrap(),
        ),
    );
    let backend = registry()
        .create("local", &config)
        .await
        .expect("a local backend");
    backend.start().await.unwrap();
    let agent =
        agent_fn(|turn| async move { Ok(AgentReply::text(format!("Heard: {}", turn.transcript))) });
    let session = backend
        .create_session(SessionConfig::new("eve").with_agent(agent))
        .await
        .unwrap();
    let mut events = session.events();
    let mut audio = session.receive_audio().unwrap();
    session.start().await.unwrap();
    fake.will_hear("Good morning.");
    utter(&*session, 11).await;
    event(&mut events, "the final transcript", |e| {
        matches!(e, SessionEvent::UserTranscript { is_final: true, text } if text == "Good morning.")
    })
    .await;
    timeout(PATIENCE, audio.recv())
        .await
        .expect("reply audio")
        .unwrap();
    assert_eq!(fake.generations()[0]["transcript"], "Heard: Good morning.");
    assert_eq!(fake.stt_commands()[0], "finalize");
    session.stop().await.unwrap();
    backend.stop().await.unwrap();
}

/// The component's stream alone: audio, finalize, the final transcript.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stt_component_finalizes_each_turn() {
    let fake = FakeCartesia::start(KEY).await;
    let stt = components().stt.get("cartesia").unwrap();
    stt.check_options(&options(&fake.base_url, KEY)).unwrap();
    assert_eq!(
        stt.check_options(&json!({"api_key": ""})).unwrap_err().code,
        ErrorCode::InvalidConfig
    );
    let (tx, mut rx) = mpsc::channel(64);
    let mut stream = stt.open(&options(&fake.base_url, KEY), tx).unwrap();
    let audio = voice_backends::testing::signal::speech_like(Duration::from_millis(400), 1);
    for frame in voice_backends::testing::signal::frames(&audio, 20) {
        stream.push_audio(&frame).unwrap();
    }
    until("the audio arrives", || {
        fake.state
            .stt_audio_bytes
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 12_800
    })
    .await;
    stream.end_turn().unwrap();
    let mut finals = Vec::new();
    while let Ok(Some(e)) = timeout(PATIENCE, rx.recv()).await {
        if let SttEvent::Final(text) = e {
            finals.push(text);
            break;
        }
    }
    assert_eq!(finals, ["Hello there."]);
    drop(stream);
    until("close", || fake.stt_commands() == ["finalize", "close"]).await;
}

// ---------------------------------------------------------------------------
// Against the official SDK's models

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_both_sides_send_fits_the_sdk_models() {
    let Some(python) = std::env::var_os("VOICE_BACKENDS_CARTESIA_PYTHON") else {
        eprintln!(
            "skipped: set VOICE_BACKENDS_CARTESIA_PYTHON to the python of `./scripts/venv cartesia tests/cartesia_py/requirements.txt` to check the JSON against Cartesia's SDK"
        );
        return;
    };
    let fake = FakeCartesia::start(KEY).await;
    let mut config = config(&fake.base_url, KEY);
    config.provider_config.0.insert(
        "stt".into(),
        json!({"language": "en", "min_volume": 0.2, "max_silence_duration_secs": 0.8}),
    );
    config.provider_config.0.insert(
        "tts".into(),
        json!({"voice_id": VOICE, "language": "en", "max_buffer_delay_ms": 200, "context_idle": "300ms"}),
    );
    let backend = registry().create("cartesia", &config).await.unwrap();
    backend.start().await.unwrap();
    let agent = agent_fn(|_| async {
        let (tx, reply) = AgentReply::channel(4);
        tokio::spawn(async move {
            let _ = tx.send(Ok("One. ".into())).await;
            let _ = tx
                .send(Ok("Two, and a longer third part to cut into.".into()))
                .await;
        });
        Ok(reply)
    });
    let session = backend
        .create_session(SessionConfig::new("fay").with_agent(agent))
        .await
        .unwrap();
    let mut audio = session.receive_audio().unwrap();
    session.start().await.unwrap();
    utter(&*session, 13).await;
    timeout(PATIENCE, audio.recv()).await.unwrap().unwrap();
    until("a continued context ends", || {
        fake.generations().iter().any(|g| g["continue"] == false)
    })
    .await;
    // A cancel, error frames and an unknown command.
    let tts = tts_component(&fake.base_url, KEY);
    let (tx, mut rx) = mpsc::channel(4);
    let cut = tokio::spawn(async move {
        tts.synthesize(
            "Cut me off halfway please.",
            AudioFormat::PCM16_16K_MONO,
            &tx,
        )
        .await
    });
    rx.recv().await.unwrap();
    cut.abort();
    let _ = cut.await;
    until("the cancel", || !fake.cancels().is_empty()).await;
    fake.fail_next_tts(&[429]);
    let tts = tts_component(&fake.base_url, KEY);
    let (tx, _rx) = mpsc::channel(64);
    tts.synthesize("x", AudioFormat::PCM16_16K_MONO, &tx)
        .await
        .unwrap_err();
    fake.send_stt("");
    session.stop().await.unwrap();
    until("done", || !fake.sent_of("done").is_empty()).await;
    backend.stop().await.unwrap();

    let capture = fake.capture();
    for (what, n) in [
        ("client_tts", 6),
        ("server_tts", 5),
        ("server_stt", 3),
        ("stt_queries", 1),
    ] {
        assert!(
            capture[what].as_array().unwrap().len() >= n,
            "{what}: {capture}"
        );
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), capture.to_string()).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/cartesia_py/check_models.py"
    );
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(file.path())
        .output()
        .expect("the venv's python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(", 0 problems"), "{stdout}");
}

// ---------------------------------------------------------------------------
// Decoders

mod decoders {
    use proptest::prelude::*;

    use super::protocol::{self, Heard, SttMessage, TtsEvent, TurnText};

    proptest! {
        #[test]
        fn no_input_panics_and_refusals_say_why(text in ".{0,300}") {
            if let Err(why) = protocol::decode_tts(&text) {
                prop_assert!(!why.is_empty());
            }
            if let Err(why) = protocol::decode_stt(&text) {
                prop_assert!(!why.is_empty());
            }
        }

        #[test]
        fn json_like_input_never_panics(
            kind in prop::sample::select(vec!["chunk", "flush_done", "done", "error", "timestamps", "transcript", "x"]),
            fields in prop::collection::vec((".{0,12}", prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                ".{0,20}".prop_map(serde_json::Value::from),
            ]), 0..6),
        ) {
            let mut v = serde_json::json!({"type": kind});
            for (k, x) in fields {
                v[k] = x;
            }
            let _ = protocol::decode_tts(&v.to_string());
            let _ = protocol::decode_stt(&v.to_string());
        }

        #[test]
        fn chunks_carry_their_audio_exactly(audio in prop::collection::vec(any::<u8>(), 0..2000), id in "[a-z0-9-]{1,40}", done in any::<bool>()) {
            use base64::Engine as _;
            let message = serde_json::json!({
                "type": "chunk", "context_id": id, "done": done, "status_code": 206,
                "step_time": 1.0, "data": base64::engine::general_purpose::STANDARD.encode(&audio),
            });
            prop_assert_eq!(
                protocol::decode_tts(&message.to_string()).unwrap(),
                TtsEvent::Chunk { context_id: id, audio, done }
            );
        }

        #[test]
        fn a_turn_is_its_final_pieces_joined(pieces in prop::collection::vec(("[a-z ]{0,10}", any::<bool>()), 0..12)) {
            let mut turn = TurnText::default();
            let mut expected = String::new();
            for (text, is_final) in &pieces {
                let m = serde_json::json!({"type": "transcript", "text": text, "is_final": is_final, "request_id": "r"});
                let decoded = protocol::decode_stt(&m.to_string()).unwrap();
                if let Some(Heard::Final(_)) = turn.take(&decoded) {
                    prop_assert!(false, "a transcript piece does not end the turn");
                }
                if *is_final {
                    expected.push_str(text);
                }
            }
            prop_assert_eq!(turn.take(&SttMessage::FlushDone), Some(Heard::Final(expected.trim().to_owned())));
            prop_assert_eq!(turn.take(&SttMessage::FlushDone), Some(Heard::Final(String::new())));
        }

        #[test]
        fn requests_survive_json(transcript in ".{0,200}", id in ".{1,40}", more in any::<bool>()) {
            let r = protocol::GenerationRequest {
                model_id: "sonic-3",
                transcript: &transcript,
                voice: protocol::Voice { mode: "id", id: "v" },
                output_format: protocol::OutputFormat::pcm16(24_000),
                context_id: &id,
                continue_: more,
                flush: None,
                language: None,
                max_buffer_delay_ms: None,
            };
            let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
            prop_assert_eq!(v["transcript"].as_str(), Some(transcript.as_str()));
            prop_assert_eq!(v["context_id"].as_str(), Some(id.as_str()));
            prop_assert_eq!(v["continue"].as_bool(), Some(more));
            let c: serde_json::Value = serde_json::from_str(&protocol::cancel_request(&id)).unwrap();
            prop_assert_eq!(c["context_id"].as_str(), Some(id.as_str()));
        }
    }
}

/// The `cartesia_message` fuzz target for 20,000 inputs: no crash, and the
/// mutants reach both sides of the decoders.
#[test]
fn the_fuzz_target_finds_no_crash() {
    use voice_backends::testing::fuzz;
    let target = *fuzz::targets()
        .iter()
        .find(|t| t.name == "cartesia_message")
        .expect("the target is registered");
    let report = fuzz::run(
        &target,
        &fuzz::Options {
            inputs: 20_000,
            seed: 0xca57,
            artifacts: Some(std::env::temp_dir().join("voice-backends-fuzz-cartesia")),
            ..fuzz::Options::default()
        },
    );
    assert!(
        report.crashes.is_empty(),
        "{:?}",
        report
            .crashes
            .iter()
            .map(|c| &c.message)
            .collect::<Vec<_>>()
    );
    assert!(report.mutants_accepted > 0 && report.mutants_rejected > 0);
}
