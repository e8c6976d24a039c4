#![cfg(feature = "testing")]
//! The interruption policy through the `local` provider: a backchannel
//! during a reply does not interrupt it, a real interruption does, a
//! cough-like burst that says no words pauses the reply and resumes it
//! where it stopped, and with the policy off a barge-in cuts the reply at
//! once as it always has.
//!
//! The pipeline is `stt_tts` with two doubles of `testing::components`: a
//! scripted recognizer (each turn's partial and final transcripts come from
//! a script the test writes) and a speaker that says every reply as a ramp
//! of distinct samples, so the reply audio received can be compared sample
//! for sample with the whole reply. User speech is `testing::signal` test
//! speech through the default energy VAD and silence turn detector. No
//! assertion is about timing: the tests wait for events and samples with
//! generous deadlines.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use voice_backends::config::{Duck, InterruptionConfig, InterruptionOverride, PipelineOverride};
use voice_backends::pipeline::components;
use voice_backends::pipeline::events::{SessionEvent, SessionEvents};
use voice_backends::testing::components::{Said, ScriptedStt, TestTts};
use voice_backends::testing::conformance::{expect_event_within, wait_until};
use voice_backends::testing::signal;
use voice_backends::{
    AgentReply, Config, ErrorCode, PipelineState, SessionConfig, VoiceBackend, VoiceSession,
    agent_fn, registry,
};

const PATIENCE: Duration = Duration::from_secs(20);
const FRAME: Duration = Duration::from_millis(20);
const FRAME_SAMPLES: usize = 320;
/// Frames every reply is said in: 4 s.
const REPLY_FRAMES: usize = 200;

/// The speaker: every reply is [`REPLY_FRAMES`] frames of a ramp.
fn speaker() -> TestTts {
    TestTts::ramp(REPLY_FRAMES)
}

fn whole_reply() -> Vec<i16> {
    speaker().whole_reply("a long answer")
}

/// A started session with the doubles, `policy` as the backend's, and an
/// agent that records what it is asked; the transcripts it was asked, the
/// script, the events, and the reply audio as it arrives.
struct Talk {
    backend: Arc<dyn VoiceBackend>,
    session: Arc<dyn VoiceSession>,
    events: SessionEvents,
    asked: Arc<Mutex<Vec<String>>>,
    script: ScriptedStt,
    heard: Arc<Mutex<Vec<i16>>>,
}

async fn talk(
    name: &str,
    policy: InterruptionConfig,
    session_policy: Option<InterruptionOverride>,
) -> Talk {
    let script = ScriptedStt::new();
    let stt = format!("{name}-stt");
    let tts = format!("{name}-tts");
    components().stt.register(&stt, Arc::new(script.clone()));
    components().tts.register(&tts, Arc::new(speaker()));
    let mut config = Config::new("local");
    config.stt_provider = Some(stt);
    config.tts_provider = Some(tts);
    config.interruption = policy;
    let backend = registry().create("local", &config).await.unwrap();
    backend.start().await.unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    let agent = agent_fn(move |turn| {
        log.lock().unwrap().push(turn.transcript.clone());
        async move { Ok(AgentReply::text("a long answer")) }
    });
    let mut session_config = SessionConfig::new("u").with_agent(agent);
    if let Some(o) = session_policy {
        session_config.pipeline = Some(PipelineOverride {
            interruption: Some(o),
            ..Default::default()
        });
    }
    let session = backend.create_session(session_config).await.unwrap();
    let events = session.events();
    let mut rx = session.receive_audio().unwrap();
    session.start().await.unwrap();
    let heard = Arc::new(Mutex::new(Vec::new()));
    let into = heard.clone();
    tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            into.lock().unwrap().extend(signal::samples_of([&f]));
        }
    });
    Talk {
        backend,
        session,
        events,
        asked,
        script,
        heard,
    }
}

impl Talk {
    /// Says `speech` of test speech (seed `seed`), then `silence`, 20 ms
    /// frames `pace` apart (zero: as fast as they go).
    async fn say(&self, speech: Duration, silence: Duration, seed: u64, pace: Duration) {
        let mut audio = signal::speech_like(speech, seed);
        audio.extend(signal::silence(silence));
        for f in signal::frames(&audio, 20) {
            self.session.process_audio(f).await.unwrap();
            if pace.is_zero() {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(pace).await;
            }
        }
    }

    /// The first turn, "hello", whose reply starts playing.
    async fn first_turn(&mut self) {
        self.script.push(Said::new("hello"));
        self.say(
            Duration::from_millis(600),
            Duration::from_millis(1500),
            1,
            Duration::ZERO,
        )
        .await;
        let heard = self.heard.clone();
        wait_until(PATIENCE, "the reply starts playing", || {
            heard.lock().unwrap().len() >= FRAME_SAMPLES
        })
        .await;
    }

    fn heard(&self) -> Vec<i16> {
        self.heard.lock().unwrap().clone()
    }

    async fn expect(
        &mut self,
        what: &str,
        pred: impl FnMut(&SessionEvent) -> bool,
    ) -> SessionEvent {
        expect_event_within(PATIENCE, &mut self.events, what, pred).await
    }

    /// The events up to the first matching `pred` (included).
    async fn until(
        &mut self,
        what: &str,
        mut pred: impl FnMut(&SessionEvent) -> bool,
    ) -> Vec<SessionEvent> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) => {
                    let done = pred(&e);
                    seen.push(e);
                    if done {
                        return seen;
                    }
                }
                Ok(None) => panic!("the session closed before {what}; saw {seen:?}"),
                Err(_) => panic!("no {what} within {PATIENCE:?}; saw {seen:?}"),
            }
        }
    }

    /// Waits for the session to listen after its reply, collecting the
    /// events on the way.
    async fn until_listening(&mut self) -> Vec<SessionEvent> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) => {
                    let done = matches!(
                        e,
                        SessionEvent::State {
                            to: PipelineState::Listening,
                            ..
                        }
                    ) && self.session.state() == PipelineState::Listening
                        && self.heard.lock().unwrap().len() >= FRAME_SAMPLES;
                    seen.push(e);
                    if done {
                        return seen;
                    }
                }
                Ok(None) => panic!("the session closed"),
                Err(_) => panic!("the session did not go back to listening; saw {seen:?}"),
            }
        }
    }
}

/// The policy with its defaults, turned on (it is opt-in).
fn on() -> InterruptionConfig {
    InterruptionConfig {
        enabled: true,
        ..InterruptionConfig::default()
    }
}

fn ducked(v: i16, gain_db: i32) -> i16 {
    let gain = 10f32.powf(gain_db as f32 / 20.0);
    (f32::from(v) * gain).round().clamp(-32768.0, 32767.0) as i16
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backchannel_during_a_reply_ducks_it_and_does_not_interrupt() {
    // Longer than min_duration: only the words keep it from interrupting.
    let mut t = talk("bc", on(), None).await;
    t.first_turn().await;
    t.script
        .push(Said::new("uh-huh, yeah").partial(3, "uh-huh"));
    // At the pace of real speech, so the reply plays while it is judged.
    t.say(
        Duration::from_millis(900),
        Duration::from_millis(1200),
        7,
        FRAME,
    )
    .await;
    let events = t.until_listening().await;
    assert!(
        !events.iter().any(|e| matches!(
            e,
            SessionEvent::Interrupted { .. } | SessionEvent::TurnEnded { turn: 2 }
        )),
        "a backchannel is not an interruption nor a turn: {events:?}"
    );
    // Every sample of the reply came, in order: at full level, or ducked
    // (-12 dB) while the speech was judged.
    let whole = whole_reply();
    let heard = t.heard();
    assert_eq!(heard.len(), whole.len(), "the whole reply, nothing cut");
    let mut lowered = 0;
    for (i, (&h, &w)) in heard.iter().zip(&whole).enumerate() {
        if h != w {
            assert_eq!(
                h,
                ducked(w, -12),
                "sample {i}: neither the reply's nor ducked"
            );
            lowered += 1;
        }
    }
    assert!(lowered > 0, "the reply ducked while the speech was judged");
    assert_eq!(
        *t.asked.lock().unwrap(),
        ["hello"],
        "only the first turn is answered"
    );
    let m = t.session_metrics();
    assert_eq!(m.interruptions, 0);
    t.backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_with_words_interrupts_and_is_answered() {
    let mut t = talk("real", on(), None).await;
    t.first_turn().await;
    t.script
        .push(Said::new("wait, what about tuesday").partial(3, "wait"));
    // The partial "wait" does not end like a sentence: once the turn
    // detector has it as a hint, the turn ends only after its longest wait
    // (3 s by default).
    t.say(
        Duration::from_millis(900),
        Duration::from_millis(3500),
        8,
        Duration::ZERO,
    )
    .await;
    // The turn's end is told from the input path, the cut from the
    // session's task: either may come first. (The first turn's events are
    // still in the stream: its answer is not this one.)
    let mut second = false;
    let events = t
        .until("the answer to it", |e| {
            second |= matches!(e, SessionEvent::TurnEnded { turn: 2 });
            second && matches!(e, SessionEvent::AgentText { .. })
        })
        .await;
    assert!(
        events.contains(&SessionEvent::Interrupted { turn: 1 })
            && events.contains(&SessionEvent::TurnEnded { turn: 2 }),
        "{events:?}"
    );
    assert_eq!(
        *t.asked.lock().unwrap(),
        ["hello", "wait, what about tuesday"]
    );
    t.backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cough_pauses_the_reply_and_it_resumes_where_it_stopped() {
    // Any speech interrupts at once (no ducking); no words come of it.
    let policy = InterruptionConfig {
        min_duration: Duration::ZERO,
        ..on()
    };
    let mut t = talk("cough", policy, None).await;
    t.first_turn().await;
    t.script.push(Said::new(""));
    let before = t.heard().len();
    t.say(
        Duration::from_millis(200),
        Duration::from_millis(1200),
        9,
        Duration::ZERO,
    )
    .await;
    t.expect("the interruption", |e| {
        matches!(e, SessionEvent::Interrupted { turn: 1 })
    })
    .await;
    let resumed = t
        .expect("the resume", |e| {
            matches!(
                e,
                SessionEvent::Resumed { .. } | SessionEvent::AgentText { .. }
            )
        })
        .await;
    assert_eq!(resumed, SessionEvent::Resumed { turn: 1 });
    let events = t.until_listening().await;
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, SessionEvent::Interrupted { .. })),
        "{events:?}"
    );
    // What came before the cough and after it join into the whole reply.
    let heard = t.heard();
    let whole = whole_reply();
    assert!(before < whole.len(), "the cough came during the reply");
    assert_eq!(heard.len(), whole.len(), "nothing repeated or missing");
    assert!(heard == whole, "the reply's samples, in order");
    assert_eq!(*t.asked.lock().unwrap(), ["hello"]);
    let m = t.session_metrics();
    assert_eq!((m.interruptions, m.false_interruptions), (1, 1));
    t.backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_words_within_the_timeout_resume_the_reply_before_the_turn_ends() {
    // The session's own policy: pause while judging, a short timeout.
    let o = InterruptionOverride {
        min_duration: Some(Duration::from_millis(100)),
        false_interruption_timeout: Some(Duration::from_millis(300)),
        duck: Some(Duck::Pause),
        ..Default::default()
    };
    let mut t = talk("timeout", on(), Some(o)).await;
    t.first_turn().await;
    // A burst, then too little silence to end the turn: only the timeout
    // can decide.
    t.say(
        Duration::from_millis(300),
        Duration::from_millis(200),
        10,
        Duration::ZERO,
    )
    .await;
    t.expect("the interruption", |e| {
        matches!(e, SessionEvent::Interrupted { turn: 1 })
    })
    .await;
    t.expect("the resume", |e| {
        matches!(e, SessionEvent::Resumed { turn: 1 })
    })
    .await;
    t.until_listening().await;
    assert!(
        t.heard() == whole_reply(),
        "the whole reply, once, in order"
    );
    t.backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_policy_off_any_speech_cuts_the_reply_at_once() {
    let policy = InterruptionConfig {
        enabled: false,
        ..InterruptionConfig::default()
    };
    let mut t = talk("off", policy, None).await;
    t.first_turn().await;
    t.script.push(Said::new(""));
    // A burst shorter than any policy's default would let through.
    t.say(
        Duration::from_millis(200),
        Duration::from_millis(1200),
        11,
        Duration::ZERO,
    )
    .await;
    let events = t
        .until("the burst's empty transcript", |e| {
            matches!(e, SessionEvent::UserTranscript { text, is_final: true } if text.is_empty())
        })
        .await;
    assert!(
        events.contains(&SessionEvent::Interrupted { turn: 1 })
            && events.contains(&SessionEvent::TurnEnded { turn: 2 }),
        "{events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, SessionEvent::Resumed { .. })),
        "{events:?}"
    );
    // The reply is gone: it neither resumes nor plays to its end.
    let heard = t.heard().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = t.heard().len();
    assert!(
        later - heard <= 4 * FRAME_SAMPLES,
        "the cut reply played on"
    );
    assert!(later < whole_reply().len());
    assert_eq!(t.session_metrics().false_interruptions, 0);
    t.backend.stop().await.unwrap();
}

#[tokio::test]
async fn out_of_range_values_are_invalid_config_at_their_field() {
    let mut config = Config::new("local");
    config.pipeline_type = voice_backends::PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    config.interruption.duck_gain_db = 6;
    let e = registry().create("local", &config).await.err().unwrap();
    assert_eq!(e.code, ErrorCode::InvalidConfig);
    assert!(e.details.contains_key("interruption.duck_gain_db"), "{e}");

    config.interruption = InterruptionConfig::default();
    assert!(
        !config.interruption.enabled,
        "the policy is opt-in: barge-in by default"
    );
    let backend = registry().create("local", &config).await.unwrap();
    backend.start().await.unwrap();
    let mut session = SessionConfig::new("u");
    session.pipeline = Some(PipelineOverride {
        interruption: Some(InterruptionOverride {
            min_duration: Some(Duration::from_secs(60)),
            ..Default::default()
        }),
        ..Default::default()
    });
    let e = backend.create_session(session).await.err().unwrap();
    assert_eq!(e.code, ErrorCode::InvalidConfig);
    assert!(
        e.details.contains_key("pipeline.interruption.min_duration"),
        "{e}"
    );

    let toml = "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\n[interruption]\nmin_words = 2\nduck = \"pause\"\n[interruption.extra_backchannels]\nen = [\"yup\"]\n";
    let loaded = Config::from_toml_str(toml).unwrap();
    assert_eq!(loaded.interruption.min_words, 2);
    assert_eq!(loaded.interruption.duck, Duck::Pause);
    let unknown = Config::from_toml_str(&toml.replace("min_words", "min_wrods"));
    assert_eq!(unknown.err().unwrap().code, ErrorCode::InvalidConfig);
    backend.stop().await.unwrap();
}

impl Talk {
    fn session_metrics(&self) -> voice_backends::metrics::MetricsSnapshot {
        self.backend
            .metrics()
            .expect("the backend counts")
            .snapshot()
    }
}
