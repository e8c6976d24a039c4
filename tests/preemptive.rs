#![cfg(feature = "testing")]
//! Preemptive replies (`[preemptive]`) through the `local` provider: the
//! agent starts on a stable partial transcript; its reply is used when the
//! final transcript has the same words, and never heard otherwise; off by
//! default.
//!
//! The pipeline is `stt_tts` with two doubles of `testing::components`: a
//! scripted recognizer (each turn's partial transcripts come after given
//! numbers of frames, its final one when the turn ends) and a speaker that
//! says a reply as frames whose every sample is a tag of the reply's text,
//! so the audio received tells which reply it was. The agent records what it is
//! asked. User speech is `testing::signal` test speech, paced in real time,
//! through the default energy VAD and silence turn detector. No assertion
//! is about timing: the tests wait for events with generous deadlines.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use voice_backends::config::{PipelineOverride, PreemptiveConfig, PreemptiveOverride};
use voice_backends::pipeline::components;
use voice_backends::pipeline::events::{SessionEvent, SessionEvents};
use voice_backends::testing::components::{Said, ScriptedStt, TestTts, tag};
use voice_backends::testing::signal;
use voice_backends::{
    AgentReply, Config, PipelineState, Role, SessionConfig, VoiceBackend, VoiceSession, agent_fn,
    registry,
};

const PATIENCE: Duration = Duration::from_secs(20);
const FRAME: Duration = Duration::from_millis(20);
const FRAME_SAMPLES: usize = 320;
/// Frames every reply is said in: 0.5 s.
const REPLY_FRAMES: usize = 25;

fn answer(transcript: &str) -> String {
    format!("you said {transcript}")
}

/// A started session with the doubles; the transcripts its agent was
/// asked, the script, the events and the reply audio as it arrives.
struct Talk {
    backend: Arc<dyn VoiceBackend>,
    session: Arc<dyn VoiceSession>,
    events: SessionEvents,
    asked: Arc<Mutex<Vec<String>>>,
    /// The conversation the agent was given with each call, as
    /// `"user: ..."` and `"agent: ..."`.
    histories: Arc<Mutex<Vec<Vec<String>>>>,
    script: ScriptedStt,
    heard: Arc<Mutex<Vec<i16>>>,
}

async fn talk(
    name: &str,
    policy: Option<PreemptiveConfig>,
    session_policy: Option<PreemptiveOverride>,
) -> Talk {
    let script = ScriptedStt::new();
    let stt = format!("{name}-stt");
    let tts = format!("{name}-tts");
    components().stt.register(&stt, Arc::new(script.clone()));
    components()
        .tts
        .register(&tts, Arc::new(TestTts::tagged(REPLY_FRAMES)));
    let mut config = Config::new("local");
    config.stt_provider = Some(stt);
    config.tts_provider = Some(tts);
    if let Some(policy) = policy {
        config.preemptive = policy;
    }
    let backend = registry().create("local", &config).await.unwrap();
    backend.start().await.unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    let histories = Arc::new(Mutex::new(Vec::new()));
    let seen = histories.clone();
    let agent = agent_fn(move |turn| {
        log.lock().unwrap().push(turn.transcript.clone());
        seen.lock().unwrap().push(
            turn.history
                .iter()
                .map(|m| match m.role {
                    Role::User => format!("user: {}", m.text),
                    Role::Agent => format!("agent: {}", m.text),
                })
                .collect(),
        );
        async move { Ok(AgentReply::text(answer(&turn.transcript))) }
    });
    let mut session_config = SessionConfig::new("u").with_agent(agent);
    if let Some(o) = session_policy {
        session_config.pipeline = Some(PipelineOverride {
            preemptive: Some(o),
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
        histories,
        script,
        heard,
    }
}

fn on(stable_for: Duration) -> PreemptiveConfig {
    PreemptiveConfig {
        enabled: true,
        stable_for,
        min_words: 2,
        ..PreemptiveConfig::default()
    }
}

impl Talk {
    /// One turn: the script's `said`, 600 ms of test speech then 1.5 s of
    /// silence (the turn ends after 500 ms of it: the last partial of each
    /// script ends a sentence), paced in real time; then
    /// the events until the reply has played and the session listens.
    async fn turn(&mut self, said: Said) -> Vec<SessionEvent> {
        self.script.push(said);
        let mut audio = signal::speech_like(Duration::from_millis(600), 1);
        audio.extend(signal::silence(Duration::from_millis(1500)));
        for f in signal::frames(&audio, 20) {
            self.session.process_audio(f).await.unwrap();
            tokio::time::sleep(FRAME).await;
        }
        self.until_listening().await
    }

    /// The events until the session listens again after a turn ended and
    /// its reply's whole audio came.
    async fn until_listening(&mut self) -> Vec<SessionEvent> {
        let mut seen = Vec::new();
        let mut ended = false;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) => {
                    ended |= matches!(e, SessionEvent::TurnEnded { .. });
                    let done = ended
                        && matches!(
                            e,
                            SessionEvent::State {
                                to: PipelineState::Listening,
                                ..
                            }
                        )
                        && self.session.state() == PipelineState::Listening
                        && self.heard.lock().unwrap().len() >= REPLY_FRAMES * FRAME_SAMPLES;
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

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }

    fn heard(&self) -> Vec<i16> {
        self.heard.lock().unwrap().clone()
    }

    /// `(used, dropped)` preemptive replies counted.
    fn counted(&self) -> (u64, u64) {
        let m = self
            .backend
            .metrics()
            .expect("the backend counts")
            .snapshot();
        (m.preemptive_used, m.preemptive_dropped)
    }

    async fn close(self) {
        self.session.stop().await.unwrap();
        self.backend.stop().await.unwrap();
    }
}

fn agent_texts(events: &[SessionEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::AgentText { text } => Some(text.clone()),
            _ => None,
        })
        .collect()
}

fn latencies(events: &[SessionEvent]) -> Vec<voice_backends::pipeline::events::TurnLatency> {
    events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Latency(l) => Some(l.clone()),
            _ => None,
        })
        .collect()
}

/// Every sample heard is the reply to `transcript`'s, and its whole audio
/// came, once.
fn only_reply_to(heard: &[i16], transcript: &str) {
    let want = tag(&answer(transcript));
    assert_eq!(
        heard.len(),
        REPLY_FRAMES * FRAME_SAMPLES,
        "one whole reply was heard"
    );
    assert!(
        heard.iter().all(|&s| s == want),
        "every sample heard is of the reply to {transcript:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stable_partial_that_the_final_confirms_is_answered_once_and_played() {
    let mut t = talk("pre-used", Some(on(Duration::from_millis(60))), None).await;
    let events = t
        .turn(
            Said::new("book a table.")
                .partial(3, "Book a")
                .partial(8, "Book a table.")
                .partial(12, "Book a table!"),
        )
        .await;
    // Asked once, with the partial's text, before the final came.
    assert_eq!(t.asked(), vec!["Book a table!"]);
    assert_eq!(agent_texts(&events), vec![answer("Book a table!")]);
    only_reply_to(&t.heard(), "Book a table!");
    // The reply's text came after the final transcript, not before.
    let final_at = events
        .iter()
        .position(|e| matches!(e, SessionEvent::UserTranscript { is_final: true, .. }))
        .expect("the final transcript");
    let text_at = events
        .iter()
        .position(|e| matches!(e, SessionEvent::AgentText { .. }))
        .unwrap();
    assert!(text_at > final_at, "held until the final: {events:?}");
    let l = latencies(&events);
    assert_eq!(l.len(), 1, "{events:?}");
    let gain = l[0].preemptive.expect("the latency shows the gain");
    assert!(gain > Duration::ZERO);
    let json = serde_json::to_value(SessionEvent::Latency(l[0].clone())).unwrap();
    assert!(json["preemptive_ms"].as_f64().unwrap() > 0.0, "{json}");
    assert_eq!(t.counted(), (1, 0));
    t.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_that_differs_drops_the_preemptive_reply_unheard() {
    let mut t = talk("pre-dropped", Some(on(Duration::from_millis(60))), None).await;
    let events = t
        .turn(Said::new("Book a taxi.").partial(3, "Book a table."))
        .await;
    // The partial was answered (held), then the final.
    assert_eq!(t.asked(), vec!["Book a table.", "Book a taxi."]);
    assert_eq!(agent_texts(&events), vec![answer("Book a taxi.")]);
    only_reply_to(&t.heard(), "Book a taxi.");
    let l = latencies(&events);
    assert_eq!(l.len(), 1, "{events:?}");
    assert_eq!(l[0].preemptive, None);
    assert_eq!(t.counted(), (0, 1));

    // The next turn may have its own attempt: used this time.
    t.heard.lock().unwrap().clear();
    let events = t
        .turn(Said::new("what time?").partial(3, "What time?"))
        .await;
    assert_eq!(
        t.asked(),
        vec!["Book a table.", "Book a taxi.", "What time?"]
    );
    assert_eq!(agent_texts(&events), vec![answer("What time?")]);
    only_reply_to(&t.heard(), "What time?");
    assert_eq!(t.counted(), (1, 1));
    // The dropped reply never joined the conversation; the used one did,
    // after the final transcript's text.
    t.heard.lock().unwrap().clear();
    t.turn(Said::new("Thanks.")).await;
    let histories = t.histories.lock().unwrap().clone();
    assert_eq!(
        histories[2],
        vec!["user: Book a taxi.", "agent: you said Book a taxi."]
    );
    assert_eq!(
        histories[3],
        vec![
            "user: Book a taxi.",
            "agent: you said Book a taxi.",
            "user: what time?",
            "agent: you said What time?",
        ]
    );
    t.close().await;
}

/// A turn whose first partial ("Book a") is answered at once and whose
/// second has more words, under `policy`: the session, and the turn's
/// events once the final's reply has played. The final's reply is heard,
/// whole, whether or not an attempt was used.
async fn book_a_table(name: &str, policy: PreemptiveConfig) -> (Talk, Vec<SessionEvent>) {
    let mut t = talk(name, Some(policy), None).await;
    let events = t
        .turn(
            Said::new("Book a table for two.")
                .partial(3, "Book a")
                .partial(20, "Book a table for two."),
        )
        .await;
    // The agent may not have been asked "Book a" yet when that attempt was
    // dropped: a session task that comes to both partials at once drops it
    // unpolled. Either way the final asks nothing more than the last words.
    let asked = t.asked();
    assert!(
        asked == ["Book a", "Book a table for two."] || asked == ["Book a table for two."],
        "{asked:?}"
    );
    assert_eq!(agent_texts(&events), vec![answer("Book a table for two.")]);
    only_reply_to(&t.heard(), "Book a table for two.");
    (t, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_with_other_words_drops_the_attempt_and_the_next_is_used() {
    // The user says more: the turn's second attempt starts on it, and the
    // final confirms it.
    let (t, events) = book_a_table("pre-changed", on(Duration::ZERO)).await;
    assert_eq!(t.counted(), (1, 1));
    let latency = latencies(&events);
    assert!(
        latency.iter().any(|l| l.preemptive.is_some()),
        "the used attempt's gain is in the latency event: {latency:?}"
    );
    t.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_attempts_the_final_is_answered() {
    // One attempt a turn: the second partial is not tried.
    let one = PreemptiveConfig {
        max_attempts: 1,
        ..on(Duration::ZERO)
    };
    let (t, events) = book_a_table("pre-once", one).await;
    assert_eq!(t.counted(), (0, 1));
    assert!(latencies(&events).iter().all(|l| l.preemptive.is_none()));
    t.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_by_default_the_agent_is_asked_on_the_final_only() {
    let mut t = talk("pre-off", None, None).await;
    let events = t
        .turn(
            Said::new("book a table.")
                .partial(3, "Book a table.")
                .partial(8, "Book a table."),
        )
        .await;
    assert_eq!(t.asked(), vec!["book a table."]);
    only_reply_to(&t.heard(), "book a table.");
    let l = latencies(&events);
    assert_eq!(l.len(), 1, "{events:?}");
    assert_eq!(l[0].preemptive, None);
    assert_eq!(t.counted(), (0, 0));
    t.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_turns_it_on_in_its_pipeline_override() {
    let mut t = talk(
        "pre-session",
        None,
        Some(PreemptiveOverride {
            enabled: Some(true),
            stable_for: Some(Duration::ZERO),
            ..Default::default()
        }),
    )
    .await;
    let events = t
        .turn(Said::new("book a table").partial(3, "Book a table."))
        .await;
    assert_eq!(t.asked(), vec!["Book a table."]);
    only_reply_to(&t.heard(), "Book a table.");
    assert!(latencies(&events)[0].preemptive.is_some());
    t.close().await;
}
