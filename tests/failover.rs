#![cfg(feature = "testing")]
//! Failover of the speech components: a failing or hanging component hands
//! the very turn to the next of its fallback list, the session and the
//! metrics say which served, and the failed one is back once its health
//! probe passes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use voice_backends::audio::{AudioFormat, AudioFrame};
use voice_backends::config::FailoverConfig;
use voice_backends::pipeline::events::SessionEvent;
use voice_backends::pipeline::failover::is_down;
use voice_backends::pipeline::{
    INTERNAL_FORMAT, S2sEvent, S2sStream, SpeechToSpeech, SpeechToText, Stage, SttEvent, SttStream,
    TextToSpeech, components,
};
use voice_backends::session::events::SwitchReason;
use voice_backends::testing::conformance::{expect_event_within, speak, wait_until};
use voice_backends::{
    AgentReply, BackendError, Config, ErrorCode, PipelineType, SessionConfig, VoiceBackend,
    VoiceSession, agent_fn, registry,
};

const PATIENCE: Duration = Duration::from_secs(20);

fn failed(what: &str) -> BackendError {
    BackendError::new(
        "test",
        ErrorCode::ConnectionFailed,
        format!("{what} is down"),
    )
}

/// A recognizer whose transcript names it and counts the frames it heard;
/// while `broken`, ending a turn fails.
struct TestStt {
    name: &'static str,
    broken: Arc<AtomicBool>,
    turns_refused: Arc<AtomicUsize>,
}

struct TestSttStream {
    name: &'static str,
    broken: Arc<AtomicBool>,
    turns_refused: Arc<AtomicUsize>,
    frames: usize,
    events: mpsc::Sender<SttEvent>,
}

impl SpeechToText for TestStt {
    fn open(
        &self,
        _: &serde_json::Value,
        events: mpsc::Sender<SttEvent>,
    ) -> voice_backends::Result<Box<dyn SttStream>> {
        Ok(Box::new(TestSttStream {
            name: self.name,
            broken: self.broken.clone(),
            turns_refused: self.turns_refused.clone(),
            frames: 0,
            events,
        }))
    }
}

impl SttStream for TestSttStream {
    fn push_audio(&mut self, _: &AudioFrame) -> voice_backends::Result<()> {
        self.frames += 1;
        Ok(())
    }
    fn end_turn(&mut self) -> voice_backends::Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            self.turns_refused.fetch_add(1, Ordering::SeqCst);
            return Err(failed(self.name));
        }
        let text = format!("{} heard {}", self.name, self.frames);
        self.frames = 0;
        let _ = self.events.try_send(SttEvent::Final(text));
        Ok(())
    }
}

/// A synthesizer sending three frames of `level`; while `hang`, it never
/// sends anything.
struct TestTts {
    level: i16,
    hang: Arc<AtomicBool>,
}

#[async_trait]
impl TextToSpeech for TestTts {
    async fn synthesize(
        &self,
        _: &str,
        format: AudioFormat,
        out: &mpsc::Sender<AudioFrame>,
    ) -> voice_backends::Result<()> {
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        for _ in 0..3 {
            let samples = vec![self.level; format.sample_rate as usize / 50];
            let frame = AudioFrame::from_i16(format.sample_rate, format.channels, &samples)?;
            let _ = out.send(frame).await;
        }
        Ok(())
    }
}

/// A speech-to-speech model answering each turn with its name; while
/// `broken`, ending a turn fails.
struct TestS2s {
    name: &'static str,
    broken: Arc<AtomicBool>,
}

struct TestS2sStream {
    name: &'static str,
    broken: Arc<AtomicBool>,
    frames: usize,
    events: mpsc::Sender<S2sEvent>,
}

impl SpeechToSpeech for TestS2s {
    fn open(
        &self,
        _: &serde_json::Value,
        events: mpsc::Sender<S2sEvent>,
    ) -> voice_backends::Result<Box<dyn S2sStream>> {
        Ok(Box::new(TestS2sStream {
            name: self.name,
            broken: self.broken.clone(),
            frames: 0,
            events,
        }))
    }
}

impl S2sStream for TestS2sStream {
    fn push_audio(&mut self, _: &AudioFrame) -> voice_backends::Result<()> {
        self.frames += 1;
        Ok(())
    }
    fn end_turn(&mut self) -> voice_backends::Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(failed(self.name));
        }
        let text = format!("{} heard {}", self.name, self.frames);
        self.frames = 0;
        let _ = self.events.try_send(S2sEvent::AgentText(text));
        let _ = self.events.try_send(S2sEvent::ReplyDone);
        Ok(())
    }
    fn interrupt(&mut self) {}
}

fn flag(v: bool) -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(v))
}

fn quick_failover(timeout: Duration) -> FailoverConfig {
    FailoverConfig {
        timeout,
        probe_interval: Duration::from_millis(50),
        max_probe_interval: Duration::from_millis(200),
    }
}

async fn session(backend: &Arc<dyn VoiceBackend>) -> Arc<dyn VoiceSession> {
    let agent =
        agent_fn(
            |turn| async move { Ok(AgentReply::text(format!("you said {}", turn.transcript))) },
        );
    let s = backend
        .create_session(SessionConfig::new("u").with_agent(agent))
        .await
        .expect("session");
    s.start().await.expect("start");
    s
}

fn switched(stage: &str, from: &str, to: &str, reason: SwitchReason) -> SessionEvent {
    SessionEvent::ComponentSwitched {
        stage: stage.into(),
        from: from.into(),
        to: to.into(),
        reason,
    }
}

/// The frames of 600 ms of speech: what the recognizer must hear at least.
const SPEECH: Duration = Duration::from_millis(600);

fn frames_heard(text: &str) -> usize {
    text.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_stt_hands_the_same_turn_to_the_next_and_comes_back_after_its_probe() {
    let broken = flag(true);
    let refused = Arc::new(AtomicUsize::new(0));
    let c = components();
    let _a = c.stt.register_scoped(
        "fo-stt-a",
        Arc::new(TestStt {
            name: "fo-stt-a",
            broken: broken.clone(),
            turns_refused: refused.clone(),
        }),
    );
    let _b = c.stt.register_scoped(
        "fo-stt-b",
        Arc::new(TestStt {
            name: "fo-stt-b",
            broken: flag(false),
            turns_refused: Arc::default(),
        }),
    );
    let _t = c.tts.register_scoped(
        "fo-stt-voice",
        Arc::new(TestTts {
            level: 1000,
            hang: flag(false),
        }),
    );
    let config = Config::builder("local")
        .stt_provider("fo-stt-a")
        .stt_fallbacks(["fo-stt-b"])
        .tts_provider("fo-stt-voice")
        .failover(quick_failover(Duration::from_secs(5)))
        .build()
        .unwrap();
    let backend = registry().create("local", &config).await.unwrap();
    backend.start().await.unwrap();
    let s = session(&backend).await;
    let mut events = s.events();

    speak(&*s, SPEECH, Duration::from_secs(1), 1, Duration::ZERO).await;
    let e = expect_event_within(PATIENCE, &mut events, "the switch to b", |e| {
        matches!(e, SessionEvent::ComponentSwitched { .. })
    })
    .await;
    assert_eq!(
        e,
        switched("stt", "fo-stt-a", "fo-stt-b", SwitchReason::Error)
    );
    // The very turn is transcribed by b, from all of its audio, and answered.
    let SessionEvent::AgentText { text } =
        expect_event_within(PATIENCE, &mut events, "the reply", |e| {
            matches!(e, SessionEvent::AgentText { .. })
        })
        .await
    else {
        unreachable!()
    };
    assert!(text.starts_with("you said fo-stt-b heard"), "{text}");
    assert!(
        frames_heard(&text) >= SPEECH.as_millis() as usize / 20,
        "{text}"
    );
    assert_eq!(refused.load(Ordering::SeqCst), 1);

    // Back once its probe passes, for the next turn.
    broken.store(false, Ordering::SeqCst);
    wait_until(PATIENCE, "the probe brings a back", || {
        !is_down(Stage::Stt, "fo-stt-a")
    })
    .await;
    speak(&*s, SPEECH, Duration::from_secs(1), 2, Duration::ZERO).await;
    let e = expect_event_within(PATIENCE, &mut events, "the switch back", |e| {
        matches!(e, SessionEvent::ComponentSwitched { .. })
    })
    .await;
    assert_eq!(
        e,
        switched("stt", "fo-stt-b", "fo-stt-a", SwitchReason::Recovered)
    );
    let SessionEvent::AgentText { text } =
        expect_event_within(PATIENCE, &mut events, "the second reply", |e| {
            matches!(e, SessionEvent::AgentText { .. })
        })
        .await
    else {
        unreachable!()
    };
    assert!(text.starts_with("you said fo-stt-a heard"), "{text}");

    let m = backend.metrics().unwrap().snapshot();
    let key = |a: &str, b: &str, c: &str, d: &str| (a.into(), b.into(), c.into(), d.into());
    assert_eq!(
        m.component_switches
            .get(&key("stt", "fo-stt-a", "fo-stt-b", "error")),
        Some(&1)
    );
    assert_eq!(
        m.component_switches
            .get(&key("stt", "fo-stt-b", "fo-stt-a", "recovered")),
        Some(&1)
    );
    assert_eq!(
        m.component_served.get(&("stt".into(), "fo-stt-b".into())),
        Some(&1)
    );
    assert_eq!(
        m.component_served.get(&("stt".into(), "fo-stt-a".into())),
        Some(&1)
    );
    let mut text = String::new();
    backend.metrics().unwrap().render_prometheus(&mut text);
    assert!(
        text.contains(r#"pipeline_component_switches_total{provider="local",stage="stt",from="fo-stt-a",to="fo-stt-b",reason="error"} 1"#),
        "{text}"
    );
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_tts_times_out_and_the_next_speaks_the_same_reply() {
    let c = components();
    let _s = c.stt.register_scoped(
        "fo-tts-ears",
        Arc::new(TestStt {
            name: "fo-tts-ears",
            broken: flag(false),
            turns_refused: Arc::default(),
        }),
    );
    let _a = c.tts.register_scoped(
        "fo-tts-a",
        Arc::new(TestTts {
            level: 1000,
            hang: flag(true),
        }),
    );
    let _b = c.tts.register_scoped(
        "fo-tts-b",
        Arc::new(TestTts {
            level: 2000,
            hang: flag(false),
        }),
    );
    let config = Config::builder("local")
        .stt_provider("fo-tts-ears")
        .tts_provider("fo-tts-a")
        .tts_fallbacks(["fo-tts-b"])
        .failover(FailoverConfig {
            probe_interval: Duration::from_secs(60),
            max_probe_interval: Duration::from_secs(60),
            ..quick_failover(Duration::from_millis(300))
        })
        .build()
        .unwrap();
    let backend = registry().create("local", &config).await.unwrap();
    backend.start().await.unwrap();
    let s = session(&backend).await;
    let mut events = s.events();
    let mut audio = s.receive_audio().unwrap();

    speak(&*s, SPEECH, Duration::from_secs(1), 3, Duration::ZERO).await;
    let e = expect_event_within(PATIENCE, &mut events, "the switch to b", |e| {
        matches!(e, SessionEvent::ComponentSwitched { .. })
    })
    .await;
    assert_eq!(
        e,
        switched("tts", "fo-tts-a", "fo-tts-b", SwitchReason::Timeout)
    );
    // The reply of that very turn is heard, in b's voice.
    let frame = tokio::time::timeout(PATIENCE, audio.recv())
        .await
        .expect("reply audio")
        .expect("reply audio");
    assert_eq!(frame.format(), INTERNAL_FORMAT);
    let first = i16::from_le_bytes([frame.data()[0], frame.data()[1]]);
    assert_eq!(first, 2000);
    assert!(is_down(Stage::Tts, "fo-tts-a"));
    let m = backend.metrics().unwrap().snapshot();
    assert_eq!(
        m.component_served.get(&("tts".into(), "fo-tts-b".into())),
        Some(&1)
    );
    assert_eq!(
        m.component_served.get(&("tts".into(), "fo-tts-a".into())),
        None
    );

    // A second session of the backend sees the outage once: it goes
    // straight to b, saying a is down.
    let s2 = session(&backend).await;
    let mut events2 = s2.events();
    speak(&*s2, SPEECH, Duration::from_secs(1), 4, Duration::ZERO).await;
    let e = expect_event_within(PATIENCE, &mut events2, "the second session's switch", |e| {
        matches!(e, SessionEvent::ComponentSwitched { .. })
    })
    .await;
    assert_eq!(
        e,
        switched("tts", "fo-tts-a", "fo-tts-b", SwitchReason::Down)
    );
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_s2s_model_hands_the_turn_to_the_next() {
    let broken = flag(false);
    let c = components();
    let _a = c.s2s.register_scoped(
        "fo-s2s-a",
        Arc::new(TestS2s {
            name: "fo-s2s-a",
            broken: broken.clone(),
        }),
    );
    let _b = c.s2s.register_scoped(
        "fo-s2s-b",
        Arc::new(TestS2s {
            name: "fo-s2s-b",
            broken: flag(false),
        }),
    );
    let config = Config::builder("local")
        .pipeline_type(PipelineType::S2s)
        .s2s_provider("fo-s2s-a")
        .s2s_fallbacks(["fo-s2s-b"])
        .failover(quick_failover(Duration::from_secs(5)))
        .build()
        .unwrap();
    let backend = registry().create("local", &config).await.unwrap();
    backend.start().await.unwrap();
    let s = session(&backend).await;
    let mut events = s.events();
    // Down after the session opened it: the turn's end fails.
    broken.store(true, Ordering::SeqCst);
    speak(&*s, SPEECH, Duration::from_secs(1), 5, Duration::ZERO).await;
    let SessionEvent::AgentText { text } =
        expect_event_within(PATIENCE, &mut events, "the reply", |e| {
            matches!(e, SessionEvent::AgentText { .. })
        })
        .await
    else {
        unreachable!()
    };
    assert!(text.starts_with("fo-s2s-b heard"), "{text}");
    assert!(
        frames_heard(&text) >= SPEECH.as_millis() as usize / 20,
        "{text}"
    );
    let m = backend.metrics().unwrap().snapshot();
    let key = (
        "s2s".into(),
        "fo-s2s-a".into(),
        "fo-s2s-b".into(),
        "error".into(),
    );
    assert_eq!(m.component_switches.get(&key), Some(&1));
    backend.stop().await.unwrap();
}

fn details_of(e: &BackendError) -> Vec<String> {
    e.details.keys().cloned().collect()
}

#[tokio::test]
async fn fallback_lists_are_checked_with_their_field_paths() {
    // A name not registered, at its index.
    let config = Config::builder("local")
        .stt_provider("fo-cfg-none")
        .tts_provider("fo-cfg-none")
        .tts_fallbacks(["fo-cfg-none-either", "fo-cfg-missing"])
        .build();
    // Names are looked up when the backend is made, not when the config is built.
    let config = config.unwrap();
    let e = registry().create("local", &config).await.err().unwrap();
    assert_eq!(e.code, ErrorCode::InvalidConfig);
    let details = details_of(&e);
    assert!(details.contains(&"tts_fallbacks[1]".to_owned()), "{e}");
    assert!(details.contains(&"tts_fallbacks[0]".to_owned()), "{e}");

    // Repeats and a list without its primary.
    let e = Config::builder("local")
        .pipeline_type(PipelineType::S2s)
        .s2s_provider("echo")
        .stt_fallbacks(["x"])
        .s2s_fallbacks(["echo", "y", "y"])
        .build()
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidConfig);
    let details = details_of(&e);
    for path in ["stt_fallbacks", "s2s_fallbacks[0]", "s2s_fallbacks[2]"] {
        assert!(details.contains(&path.to_owned()), "{path}: {e}");
    }
    assert!(!details.contains(&"s2s_fallbacks[1]".to_owned()), "{e}");

    // Out-of-range failover settings.
    let e = Config::from_toml_str(
        "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\n\
         [failover]\ntimeout = \"10ms\"\nprobe_interval = \"2s\"\nmax_probe_interval = \"1s\"\n",
    )
    .unwrap_err();
    let details = details_of(&e);
    assert!(details.contains(&"failover.timeout".to_owned()), "{e}");
    assert!(
        details.contains(&"failover.max_probe_interval".to_owned()),
        "{e}"
    );
    // Unknown keys refused.
    let e = Config::from_toml_str(
        "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\n\
         [failover]\ntimeuot = \"1s\"\n",
    )
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidConfig);

    // A session's own list is checked against the registry at its path.
    let config = Config::builder("local")
        .pipeline_type(PipelineType::S2s)
        .s2s_provider("echo")
        .build()
        .unwrap();
    let backend = registry().create("local", &config).await.unwrap();
    backend.start().await.unwrap();
    let session = SessionConfig::new("u").with_pipeline(voice_backends::PipelineOverride {
        s2s_fallbacks: Some(vec!["fo-cfg-nowhere".into()]),
        ..Default::default()
    });
    let e = backend.create_session(session).await.err().unwrap();
    assert_eq!(e.code, ErrorCode::InvalidConfig);
    assert!(
        details_of(&e).contains(&"pipeline.s2s_fallbacks[0]".to_owned()),
        "{e}"
    );
    backend.stop().await.unwrap();

    // The schema shows the lists and the section.
    let schema = serde_json::to_string(&schemars::schema_for!(Config)).unwrap();
    for key in [
        "stt_fallbacks",
        "tts_fallbacks",
        "s2s_fallbacks",
        "probe_interval",
    ] {
        assert!(schema.contains(key), "{key}");
    }
}
