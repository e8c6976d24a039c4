#![cfg(feature = "testing")]
//! The `local` provider: the conformance suite, plus what only an in-process
//! echo pipeline can show (exact audio back, format conversion at the edges).

use std::time::Duration;

use voice_backends::pipeline::events::SessionEvent;
use voice_backends::testing::conformance::{Harness, expect_event, speak};
use voice_backends::testing::signal;
use voice_backends::{
    AudioEncoding, AudioFormat, Config, ErrorCode, PipelineType, SessionConfig, VoiceBackend,
    registry,
};

struct Local;

impl Harness for Local {
    fn config(&self) -> Config {
        let mut config = Config::new("local");
        config.pipeline_type = PipelineType::S2s;
        config.s2s_provider = Some("echo".into());
        config
    }
}

voice_backends::conformance_suite!(Local);

async fn echo_backend() -> std::sync::Arc<dyn VoiceBackend> {
    let backend = registry().create("local", &Local.config()).await.unwrap();
    backend.start().await.unwrap();
    backend
}

#[test]
fn local_is_registered_always() {
    let p = registry().get_provider("local").unwrap();
    assert_eq!(p.name(), "local");
    assert!(p.capabilities().speech_to_speech);
    assert!(
        p.config_schema()
            .schema
            .get("properties")
            .is_none_or(|p| p.as_object().unwrap().is_empty())
    );
}

#[tokio::test]
async fn unknown_components_and_provider_keys_are_invalid_config() {
    let mut config = Local.config();
    config.s2s_provider = Some("ecko".into());
    let err = registry().create("local", &config).await.err().unwrap();
    assert_eq!(err.code, ErrorCode::InvalidConfig);
    assert!(
        err.message.contains("ecko") && err.message.contains("echo"),
        "lists what exists: {err}"
    );
    assert!(err.details.contains_key("s2s_provider"), "{err}");

    let config = Config::from_toml_str(
        "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\n[provider_config]\nregion = \"eu\"\n",
    )
    .unwrap();
    let err = registry().create("local", &config).await.err().unwrap();
    assert_eq!(err.code, ErrorCode::InvalidConfig);
    assert!(err.details.contains_key("provider_config.region"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoken_turn_comes_back_sample_for_sample_with_its_events() {
    let backend = echo_backend().await;
    let session = backend
        .create_session(SessionConfig::new("u1"))
        .await
        .unwrap();
    let mut events = session.events();
    let mut rx = session.receive_audio().unwrap();
    session.start().await.unwrap();
    let speech = signal::speech_like(Duration::from_millis(800), 7);
    let mut audio = signal::silence(Duration::from_millis(300));
    audio.extend_from_slice(&speech);
    audio.extend(signal::silence(Duration::from_millis(900)));
    for f in signal::frames(&audio, 20) {
        session.process_audio(f).await.unwrap();
    }
    expect_event(&Local, &mut events, "speech start", |e| {
        matches!(e, SessionEvent::SpeechStarted)
    })
    .await;
    expect_event(&Local, &mut events, "turn end", |e| {
        matches!(e, SessionEvent::TurnEnded { turn: 1 })
    })
    .await;
    // The echo is the turn as heard: the speech, with pre-roll and trailing silence around it.
    let mut back = Vec::new();
    while let Ok(Some(f)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        back.extend(signal::samples_of([&f]));
    }
    let start = back
        .windows(speech.len().min(1600))
        .position(|w| w == &speech[..w.len()])
        .expect("the user's speech is in the echo, unaltered");
    assert_eq!(
        &back[start..start + speech.len()],
        &speech[..],
        "every sample of the turn comes back"
    );
    let latency = expect_event(&Local, &mut events, "latency", |e| {
        matches!(e, SessionEvent::Latency(_))
    })
    .await;
    let SessionEvent::Latency(l) = latency else {
        unreachable!()
    };
    assert_eq!(l.turn, 1);
    assert!(l.first_audio < Duration::from_secs(2), "{l:?}");
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_and_output_formats_are_converted_at_the_edges() {
    let backend = echo_backend().await;
    let input = AudioFormat::new(AudioEncoding::PcmF32Le, 48_000, 2);
    let output = AudioFormat::new(AudioEncoding::Mulaw, 8_000, 1);
    let session = backend
        .create_session(
            SessionConfig::new("fmt")
                .with_input_format(input)
                .with_output_format(output),
        )
        .await
        .unwrap();
    let mut events = session.events();
    let mut rx = session.receive_audio().unwrap();
    session.start().await.unwrap();
    // The same utterance as 48 kHz stereo float, 20 ms frames.
    let mono = signal::utterance(Duration::from_millis(700), Duration::from_millis(900), 3);
    let mut bytes = Vec::new();
    for s in &mono {
        let v = *s as f32 / 32768.0;
        for _ in 0..3 {
            for _ch in 0..2 {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    for chunk in bytes.chunks(input.bytes_for(Duration::from_millis(20))) {
        let frame = voice_backends::AudioFrame::new(input, chunk.to_vec()).unwrap();
        session.process_audio(frame).await.unwrap();
    }
    expect_event(&Local, &mut events, "turn end", |e| {
        matches!(e, SessionEvent::TurnEnded { .. })
    })
    .await;
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first.format(),
        output,
        "reply audio arrives in the session's output format"
    );
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_audio_is_a_clear_error_and_the_session_goes_on() {
    let backend = echo_backend().await;
    let session = backend
        .create_session(SessionConfig::new("u"))
        .await
        .unwrap();
    let other = backend
        .create_session(SessionConfig::new("v"))
        .await
        .unwrap();
    let mut other_events = other.events();
    let mut other_rx = other.receive_audio().unwrap();
    session.start().await.unwrap();
    other.start().await.unwrap();
    assert!(voice_backends::AudioFrame::new(AudioFormat::PCM16_16K_MONO, vec![0u8; 641]).is_err());
    let zero_rate = AudioFormat::new(AudioEncoding::PcmS16Le, 0, 1);
    assert!(voice_backends::AudioFrame::new(zero_rate, vec![0u8; 640]).is_err());
    // A mid-stream format change is converted, not refused.
    let f8k = voice_backends::AudioFrame::new(
        AudioFormat::new(AudioEncoding::PcmS16Le, 8_000, 1),
        vec![0u8; 320],
    )
    .unwrap();
    session.process_audio(f8k).await.unwrap();
    // The other session is untouched and works.
    speak(
        &*other,
        Duration::from_millis(600),
        Duration::from_millis(900),
        9,
        Duration::ZERO,
    )
    .await;
    expect_event(&Local, &mut other_events, "turn end", |e| {
        matches!(e, SessionEvent::TurnEnded { .. })
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_secs(5), other_rx.recv())
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(backend.active_session_count(), 2);
    backend.stop().await.unwrap();
}

/// The input path runs inline: `process_audio` has done its work when it
/// returns, and its future is a ready result (no allocation per frame).
#[tokio::test]
async fn process_audio_does_its_work_before_it_returns() {
    let backend = echo_backend().await;
    let session = backend
        .create_session(SessionConfig::new("u"))
        .await
        .unwrap();
    let mut events = session.events();
    session.start().await.unwrap();
    let mut audio = signal::silence(Duration::from_millis(500));
    audio.extend(signal::utterance(
        Duration::from_millis(600),
        Duration::ZERO,
        3,
    ));
    let mut frames = signal::frames(&audio, 20).into_iter();
    // Frames of speech until the VAD hears it, each future ready at once and
    // not awaited until after the event was looked for.
    let mut started = false;
    for frame in frames.by_ref() {
        let fut = session.process_audio(frame);
        assert_eq!(format!("{fut:?}"), "ProcessAudio::Ready");
        started = std::iter::from_fn(|| events.try_recv())
            .any(|e| matches!(e, SessionEvent::SpeechStarted));
        fut.await.unwrap();
        if started {
            break;
        }
    }
    assert!(started, "speech onset is reported by the call itself");
    // A stopped session's call fails, also at once.
    session.stop().await.unwrap();
    let fut = session.process_audio(frames.next().unwrap());
    assert_eq!(format!("{fut:?}"), "ProcessAudio::Ready");
    assert!(fut.await.is_err());
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_audio_is_taken_once_and_text_needs_an_agent() {
    let backend = echo_backend().await;
    let session = backend
        .create_session(SessionConfig::new("u"))
        .await
        .unwrap();
    let _rx = session.receive_audio().unwrap();
    let err = session.receive_audio().err().unwrap();
    assert_eq!(err.code, ErrorCode::PipelineError);
    assert_eq!(
        session.send_text("hi").await.err().unwrap().code,
        ErrorCode::PipelineError,
        "not started"
    );
    let mut events = session.events();
    session.start().await.unwrap();
    session.send_text("hi").await.unwrap();
    let e = expect_event(&Local, &mut events, "an agent error", |e| {
        matches!(e, SessionEvent::Error { .. })
    })
    .await;
    assert!(
        matches!(
            e,
            SessionEvent::Error {
                code: ErrorCode::AgentError,
                ..
            }
        ),
        "{e:?}"
    );
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_answers_times_out_and_the_session_goes_on() {
    let mut config = Local.config();
    config.timeout = Duration::from_secs(1);
    let backend = registry().create("local", &config).await.unwrap();
    backend.start().await.unwrap();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let agent = voice_backends::agent_fn(move |turn| {
        let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            if n == 0 {
                std::future::pending::<()>().await;
            }
            Ok(voice_backends::AgentReply::text(format!(
                "ok {}",
                turn.transcript
            )))
        }
    });
    let session = backend
        .create_session(SessionConfig::new("t").with_agent(agent))
        .await
        .unwrap();
    let mut events = session.events();
    session.start().await.unwrap();
    session.send_text("first").await.unwrap();
    let e = expect_event(&Local, &mut events, "a timeout", |e| {
        matches!(e, SessionEvent::Error { .. })
    })
    .await;
    assert!(
        matches!(
            e,
            SessionEvent::Error {
                code: ErrorCode::Timeout,
                ..
            }
        ),
        "{e:?}"
    );
    session.send_text("second").await.unwrap();
    let e = expect_event(&Local, &mut events, "the next answer", |e| {
        matches!(e, SessionEvent::AgentText { .. })
    })
    .await;
    assert_eq!(
        e,
        SessionEvent::AgentText {
            text: "ok second".into()
        }
    );
    backend.stop().await.unwrap();
}

#[tokio::test]
async fn options_for_the_default_components_are_accepted() {
    let config = Config::from_toml_str(
        "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\n\
         [components.silence]\nmin_endpointing_delay = \"300ms\"\n\
         [components.energy]\nthreshold_db = 12.0\n",
    )
    .expect("energy and silence are the defaults, so their options are in use");
    let backend = registry().create("local", &config).await.unwrap();
    backend.start().await.unwrap();
    backend.stop().await.unwrap();
    let err = Config::from_toml_str(
        "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\n[components.silense]\n",
    )
    .unwrap_err();
    assert!(err.details.contains_key("components.silense"), "{err}");
}

/// How a session is ended, in the tests of the end of its reply audio.
#[derive(Clone, Copy, Debug)]
enum Ending {
    /// `session.stop()`.
    SessionStop,
    /// `backend.close_session(id)`.
    CloseSession,
    /// `backend.stop()`.
    BackendStop,
}

/// Reads a session's reply audio in a task until the stream ends, ends the
/// session by `ending` while a spoken turn is answered and while the test
/// still holds the session, and checks that the reading task completes,
/// having had the turn's echo first (a graceful stop finishes the turn).
async fn the_reply_audio_ends_when(ending: Ending) {
    let backend = echo_backend().await;
    let session = backend
        .create_session(SessionConfig::new("listener"))
        .await
        .unwrap();
    let mut events = session.events();
    let mut rx = session.receive_audio().unwrap();
    session.start().await.unwrap();
    let reader = tokio::spawn(async move {
        let mut frames = 0usize;
        while rx.recv().await.is_some() {
            frames += 1;
        }
        frames
    });
    speak(
        &*session,
        Duration::from_millis(600),
        Duration::from_millis(900),
        3,
        Duration::ZERO,
    )
    .await;
    expect_event(&Local, &mut events, "turn end", |e| {
        matches!(e, SessionEvent::TurnEnded { turn: 1 })
    })
    .await;
    match ending {
        Ending::SessionStop => session.stop().await.unwrap(),
        Ending::CloseSession => backend.close_session(session.id()).await.unwrap(),
        Ending::BackendStop => backend.stop().await.unwrap(),
    }
    let frames = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .unwrap_or_else(|_| panic!("the reply audio did not end after {ending:?}"))
        .unwrap();
    assert!(
        frames > 0,
        "the turn's echo came before the end ({ending:?})"
    );
    // Held to here: the stream ended with the session, not with its last handle.
    drop(session);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reply_audio_ends_when_the_session_stops() {
    the_reply_audio_ends_when(Ending::SessionStop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reply_audio_ends_when_the_backend_closes_the_session() {
    the_reply_audio_ends_when(Ending::CloseSession).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reply_audio_ends_when_the_backend_stops() {
    the_reply_audio_ends_when(Ending::BackendStop).await;
}

/// Audio queued before the stop is still handed out, then the stream ends;
/// a stream taken after the stop (of a started session or of one never
/// started) ends at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_audio_queued_before_the_stop_is_delivered_then_the_stream_ends() {
    let backend = echo_backend().await;
    let session = backend
        .create_session(SessionConfig::new("late reader"))
        .await
        .unwrap();
    let mut rx = session.receive_audio().unwrap();
    session.start().await.unwrap();
    let prompt = signal::frames(&signal::speech_like(Duration::from_millis(60), 5), 20);
    for f in &prompt {
        session.send_audio(f.clone()).await.unwrap();
    }
    session.stop().await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut got = Vec::new();
        while let Some(f) = rx.recv().await {
            got.push(f);
        }
        got
    })
    .await
    .expect("the reply audio did not end after the stop");
    assert_eq!(
        signal::samples_of(&read),
        signal::samples_of(&prompt),
        "what was queued before the stop is handed out whole"
    );
    assert!(rx.try_recv().is_none());

    for started in [true, false] {
        let session = backend
            .create_session(SessionConfig::new("after the stop"))
            .await
            .unwrap();
        if started {
            session.start().await.unwrap();
        }
        session.stop().await.unwrap();
        let mut rx = session.receive_audio().unwrap();
        let end = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(
            matches!(end, Ok(None)),
            "a stream taken after the stop (started: {started}) ends at once"
        );
        assert!(rx.try_recv().is_none());
    }
    backend.stop().await.unwrap();
}
