//! The agent contract through the `local` backend: the conversation history
//! each turn carries (in order, bounded, filtered by the retention hook,
//! per session) and streamed replies (spoken as they come, cut by a
//! barge-in, ended by an error).
//!
//! Turns are text turns (`send_text`); replies are spoken by a speech
//! double registered here, which says each piece of text as a fixed number
//! of 20 ms frames and records what it was asked to say. No assertion is
//! about timing: where order matters, the test holds the agent's stream
//! back with a channel it controls.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};
use voice_backends::agent::{DEFAULT_HISTORY_LIMIT, Message, Role, with_history_limit};
use voice_backends::hooks::{DataKind, DataRetentionHook, Hooks};
use voice_backends::pipeline::events::{SessionEvent, SessionEvents};
use voice_backends::pipeline::{TextToSpeech, components};
use voice_backends::{
    Agent, AgentReply, AgentTurn, AudioFormat, AudioFrame, BackendError, Config, ErrorCode,
    PipelineState, PipelineType, Result, SessionConfig, SessionId, VoiceBackend, VoiceSession,
    agent_fn, registry,
};

const PATIENCE: Duration = Duration::from_secs(10);
/// Frames the speech double says each piece of text as (half a second).
const FRAMES_PER_PIECE: usize = 25;

/// Says each piece of text as `frames` frames of 20 ms whose bytes are the
/// piece's number (1, 2, ...), and records the pieces. "ok" (the streaming
/// agent's answer to later turns) is one frame, so that no test waits for
/// it to play.
struct Speech {
    frames: usize,
    said: Mutex<Vec<String>>,
    /// Pieces said to their end (every frame handed on).
    finished: watch::Sender<usize>,
}

impl Default for Speech {
    fn default() -> Self {
        Speech::saying(FRAMES_PER_PIECE)
    }
}

impl Speech {
    fn saying(frames: usize) -> Self {
        Speech {
            frames,
            said: Mutex::new(Vec::new()),
            finished: watch::Sender::new(0),
        }
    }

    fn said(&self) -> Vec<String> {
        self.said.lock().unwrap().clone()
    }
}

#[async_trait]
impl TextToSpeech for Speech {
    async fn synthesize(
        &self,
        text: &str,
        format: AudioFormat,
        out: &mpsc::Sender<AudioFrame>,
    ) -> Result<()> {
        let n = {
            let mut said = self.said.lock().unwrap();
            said.push(text.to_owned());
            said.len()
        };
        let frames = if text == "ok" { 1 } else { self.frames };
        for _ in 0..frames {
            let data = vec![n as u8; format.bytes_for(Duration::from_millis(20))];
            if out.send(AudioFrame::new(format, data)?).await.is_err() {
                return Ok(());
            }
        }
        self.finished.send_modify(|n| *n += 1);
        Ok(())
    }
}

/// A started `local` backend (the `echo` model; text turns only reach the
/// agent), speaking replies with a new speech double registered as
/// `speech` when given one.
async fn backend(speech: Option<(&str, Arc<Speech>)>) -> Arc<dyn VoiceBackend> {
    let mut config = Config::new("local");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    if let Some((name, speech)) = speech {
        components().tts.register(name, speech);
        config.tts_provider = Some(name.into());
    }
    let backend = registry().create("local", &config).await.unwrap();
    backend.start().await.unwrap();
    backend
}

async fn next_event(
    events: &mut SessionEvents,
    what: &str,
    mut wanted: impl FnMut(&SessionEvent) -> bool,
) -> SessionEvent {
    let wait = async {
        loop {
            match events.recv().await {
                Some(e) if wanted(&e) => return e,
                Some(_) => {}
                None => panic!("the session closed before {what}"),
            }
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("no {what} within {PATIENCE:?}"))
}

fn listening(e: &SessionEvent) -> bool {
    matches!(
        e,
        SessionEvent::State {
            to: PipelineState::Listening,
            ..
        }
    )
}

/// Sends `text` as a turn and waits for the agent's text and the session
/// to listen again; the agent's text.
async fn turn(session: &dyn VoiceSession, events: &mut SessionEvents, text: &str) -> String {
    session.send_text(text).await.unwrap();
    let SessionEvent::AgentText { text } = next_event(events, "the agent's text", |e| {
        matches!(e, SessionEvent::AgentText { .. })
    })
    .await
    else {
        unreachable!()
    };
    next_event(events, "listening again", listening).await;
    text
}

/// An agent answering "reply to <transcript>", keeping every turn it saw.
fn recording_agent() -> (Arc<dyn Agent>, Arc<Mutex<Vec<AgentTurn>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    let agent = agent_fn(move |turn: AgentTurn| {
        let text = format!("reply to {}", turn.transcript);
        kept.lock().unwrap().push(turn);
        async move { Ok(AgentReply::text(text)) }
    });
    (agent, seen)
}

/// The exchanges of `turns`, as history messages.
fn exchanges(turns: &[&str]) -> Vec<Message> {
    turns
        .iter()
        .flat_map(|t| [Message::user(*t), Message::agent(format!("reply to {t}"))])
        .collect()
}

/// The history each turn the agent saw carried.
fn histories(seen: &Mutex<Vec<AgentTurn>>) -> Vec<Vec<Message>> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|t| t.history.to_vec())
        .collect()
}

// ------------------------------------------------------------------ history

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_sees_the_previous_turns_in_order() {
    let backend = backend(None).await;
    let (agent, seen) = recording_agent();
    let s = backend
        .create_session(SessionConfig::new("u1").with_agent(agent))
        .await
        .unwrap();
    let mut events = s.events();
    s.start().await.unwrap();
    for t in ["one", "two", "three"] {
        assert_eq!(turn(&*s, &mut events, t).await, format!("reply to {t}"));
    }
    let h = histories(&seen);
    assert_eq!(h.len(), 3);
    assert!(h[0].is_empty(), "the first turn has no history: {:?}", h[0]);
    assert_eq!(h[1], exchanges(&["one"]));
    assert_eq!(h[2], exchanges(&["one", "two"]));
    assert_eq!(h[2][0].role, Role::User);
    assert_eq!(h[2][1].role, Role::Agent);
    assert!(h[2].iter().all(|m| !m.interrupted));
    let turns: Vec<u64> = seen.lock().unwrap().iter().map(|t| t.turn).collect();
    assert_eq!(turns, [1, 2, 3]);
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_is_bounded_and_keeps_the_newest() {
    const LIMIT: usize = 4;
    let backend = backend(None).await;
    let (agent, seen) = recording_agent();
    let s = backend
        .create_session(SessionConfig::new("u1").with_agent(with_history_limit(agent, LIMIT)))
        .await
        .unwrap();
    let mut events = s.events();
    s.start().await.unwrap();
    let names = ["t1", "t2", "t3", "t4", "t5", "t6"];
    for t in names {
        turn(&*s, &mut events, t).await;
    }
    let h = histories(&seen);
    // Turns 1 to 3 carry everything before them (0, 2 and 4 messages);
    // from then on the last four.
    assert_eq!(h[2], exchanges(&["t1", "t2"]));
    assert_eq!(h[3], exchanges(&["t2", "t3"]));
    assert_eq!(h[5], exchanges(&["t4", "t5"]));
    assert!(h.iter().all(|h| h.len() <= LIMIT));
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_bound_is_sixty_four_messages() {
    assert_eq!(DEFAULT_HISTORY_LIMIT, 64);
    let backend = backend(None).await;
    let (agent, seen) = recording_agent();
    assert_eq!(agent.history_limit(), DEFAULT_HISTORY_LIMIT);
    let s = backend
        .create_session(SessionConfig::new("u1").with_agent(agent))
        .await
        .unwrap();
    let mut events = s.events();
    s.start().await.unwrap();
    // 33 exchanges (66 messages) before the last turn.
    let names: Vec<String> = (1..=34).map(|i| format!("t{i}")).collect();
    for t in &names {
        turn(&*s, &mut events, t).await;
    }
    let last = histories(&seen).pop().unwrap();
    let expected: Vec<&str> = names[1..33].iter().map(String::as_str).collect();
    assert_eq!(last, exchanges(&expected));
    assert_eq!(last.len(), DEFAULT_HISTORY_LIMIT);
    backend.stop().await.unwrap();
}

/// Refuses while `refuse` is set; notes every question.
#[derive(Default)]
struct Retention {
    refuse: AtomicBool,
    asked: Mutex<Vec<(SessionId, DataKind)>>,
}

#[async_trait]
impl DataRetentionHook for Retention {
    async fn should_retain(&self, session: &SessionId, kind: DataKind) -> bool {
        self.asked.lock().unwrap().push((session.clone(), kind));
        !self.refuse.load(Ordering::SeqCst)
    }

    fn retention_period(&self, _: DataKind) -> Duration {
        Duration::from_secs(60)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_the_retention_hook_refuses_are_not_kept() {
    let backend = backend(None).await;
    let hook = Arc::new(Retention::default());
    backend.set_hooks(Hooks {
        retention: Some(hook.clone()),
        ..Hooks::default()
    });
    let (agent, seen) = recording_agent();
    let s = backend
        .create_session(SessionConfig::new("u1").with_agent(agent))
        .await
        .unwrap();
    let mut events = s.events();
    s.start().await.unwrap();
    turn(&*s, &mut events, "keep one").await;
    hook.refuse.store(true, Ordering::SeqCst);
    turn(&*s, &mut events, "my card number").await;
    hook.refuse.store(false, Ordering::SeqCst);
    turn(&*s, &mut events, "keep two").await;
    turn(&*s, &mut events, "what did I say?").await;
    let h = histories(&seen);
    assert_eq!(h[1], exchanges(&["keep one"]));
    assert_eq!(
        h[2],
        exchanges(&["keep one"]),
        "the refused turn is left out"
    );
    assert_eq!(h[3], exchanges(&["keep one", "keep two"]));
    // Asked once per turn, about this session's transcripts.
    let asked = hook.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 4, "{asked:?}");
    assert!(
        asked
            .iter()
            .all(|(id, kind)| id == s.id() && *kind == DataKind::Transcript),
        "{asked:?}"
    );
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_session_has_a_history_of_its_own() {
    let backend = backend(None).await;
    let (agent, seen) = recording_agent();
    let a = backend
        .create_session(SessionConfig::new("a").with_agent(agent.clone()))
        .await
        .unwrap();
    let b = backend
        .create_session(SessionConfig::new("b").with_agent(agent))
        .await
        .unwrap();
    let (mut ea, mut eb) = (a.events(), b.events());
    a.start().await.unwrap();
    b.start().await.unwrap();
    turn(&*a, &mut ea, "a1").await;
    turn(&*b, &mut eb, "b1").await;
    turn(&*a, &mut ea, "a2").await;
    turn(&*b, &mut eb, "b2").await;
    turn(&*a, &mut ea, "a3").await;
    let seen = seen.lock().unwrap().clone();
    let of = |session: &SessionId| -> Vec<Vec<Message>> {
        seen.iter()
            .filter(|t| t.session_id == session.as_str())
            .map(|t| t.history.to_vec())
            .collect()
    };
    let (ha, hb) = (of(a.id()), of(b.id()));
    assert_eq!(ha.len(), 3);
    assert_eq!(hb.len(), 2);
    assert_eq!(ha[1], exchanges(&["a1"]));
    assert_eq!(ha[2], exchanges(&["a1", "a2"]));
    assert!(hb[0].is_empty());
    assert_eq!(hb[1], exchanges(&["b1"]));
    backend.stop().await.unwrap();
}

// ---------------------------------------------------------------- streaming

/// What a streamed reply's producer is told by the test, and tells it.
struct Producer {
    /// Lets the producer go on after its first chunk.
    go: Mutex<Option<oneshot::Receiver<()>>>,
    /// The producer's last chunk went out.
    finished: AtomicBool,
    /// The producer saw its stream closed (the receiver dropped).
    closed: Mutex<Option<oneshot::Sender<()>>>,
}

impl Producer {
    fn new() -> (Arc<Producer>, oneshot::Sender<()>, oneshot::Receiver<()>) {
        let (go_tx, go_rx) = oneshot::channel();
        let (closed_tx, closed_rx) = oneshot::channel();
        let p = Arc::new(Producer {
            go: Mutex::new(Some(go_rx)),
            finished: AtomicBool::new(false),
            closed: Mutex::new(Some(closed_tx)),
        });
        (p, go_tx, closed_rx)
    }
}

/// How a streamed reply's producer goes on once the test lets it.
#[derive(Clone, Copy)]
enum Then {
    /// Sends this last chunk.
    Say(&'static str),
    /// Fails.
    Fail,
    /// Waits for its stream to close (never let go).
    WaitForClose,
}

/// An agent whose first turn streams `first`, then goes on as `then`
/// (held back by the test); later turns answer "ok" in one string. Every
/// turn it saw is kept.
fn streaming_agent(
    producer: Arc<Producer>,
    first: &'static str,
    then: Then,
) -> (Arc<dyn Agent>, Arc<Mutex<Vec<AgentTurn>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let agent = agent_fn(move |turn: AgentTurn| {
        kept.lock().unwrap().push(turn);
        let n = calls.fetch_add(1, Ordering::SeqCst);
        let producer = producer.clone();
        async move {
            if n > 0 {
                return Ok(AgentReply::text("ok"));
            }
            let (tx, reply) = AgentReply::channel(4);
            tokio::spawn(async move {
                tx.send(Ok(first.to_owned())).await.unwrap();
                if let Then::WaitForClose = then {
                    tx.closed().await;
                    let closed = producer.closed.lock().unwrap().take();
                    let _ = closed.unwrap().send(());
                    return;
                }
                let go = producer.go.lock().unwrap().take().unwrap();
                let _ = go.await;
                let last = match then {
                    Then::Say(text) => Ok(text.to_owned()),
                    _ => Err(BackendError::new(
                        "agent",
                        ErrorCode::AgentError,
                        "the model broke mid-reply",
                    )),
                };
                let _ = tx.send(last).await;
                producer.finished.store(true, Ordering::SeqCst);
            });
            Ok(reply)
        }
    });
    (agent, seen)
}

async fn recv_frame(rx: &mut voice_backends::AudioReceiver, what: &str) -> AudioFrame {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {PATIENCE:?}"))
        .unwrap_or_else(|| panic!("the audio stream ended before {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_reply_is_heard_before_the_agent_has_finished_it() {
    let speech = Arc::new(Speech::default());
    let backend = backend(Some(("agent-test-speech-stream", speech.clone()))).await;
    let (producer, go, _) = Producer::new();
    let (agent, seen) = streaming_agent(producer.clone(), "Hello there. ", Then::Say("Goodbye."));
    let s = backend
        .create_session(SessionConfig::new("u1").with_agent(agent))
        .await
        .unwrap();
    let mut events = s.events();
    let mut rx = s.receive_audio().unwrap();
    s.start().await.unwrap();
    s.send_text("hi").await.unwrap();
    // The first sentence is heard while the agent holds its last chunk.
    let first = recv_frame(&mut rx, "the first sentence's audio").await;
    assert_eq!(first.data()[0], 1);
    assert!(!producer.finished.load(Ordering::SeqCst));
    assert_eq!(speech.said(), ["Hello there."]);
    go.send(()).unwrap();
    let text = next_event(&mut events, "the agent's text", |e| {
        matches!(e, SessionEvent::AgentText { .. })
    })
    .await;
    assert_eq!(
        text,
        SessionEvent::AgentText {
            text: "Hello there. Goodbye.".into()
        },
        "the whole text, once, when the stream ends"
    );
    // Both sentences play, in order, whole.
    let mut bytes = vec![first.data()[0]];
    for _ in 1..2 * FRAMES_PER_PIECE {
        bytes.push(recv_frame(&mut rx, "the rest of the reply").await.data()[0]);
    }
    assert_eq!(bytes[..FRAMES_PER_PIECE], [1; FRAMES_PER_PIECE]);
    assert_eq!(bytes[FRAMES_PER_PIECE..], [2; FRAMES_PER_PIECE]);
    assert_eq!(speech.said(), ["Hello there.", "Goodbye."]);
    next_event(&mut events, "listening again", listening).await;
    turn(&*s, &mut events, "thanks").await;
    assert_eq!(
        histories(&seen)[1],
        [Message::user("hi"), Message::agent("Hello there. Goodbye.")]
    );
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_barge_in_stops_a_streamed_reply_and_closes_the_agents_stream() {
    // Five seconds a sentence: the first is still playing when the user
    // cuts in, the second (synthesized, queued) has not started, so only
    // the first was said.
    let speech = Arc::new(Speech::saying(250));
    let backend = backend(Some(("agent-test-speech-barge-in", speech.clone()))).await;
    let (producer, _go, closed) = Producer::new();
    let (agent, seen) = streaming_agent(
        producer,
        "First sentence. Second sentence. ",
        Then::WaitForClose,
    );
    let s = backend
        .create_session(SessionConfig::new("u1").with_agent(agent))
        .await
        .unwrap();
    let mut events = s.events();
    let mut rx = s.receive_audio().unwrap();
    s.start().await.unwrap();
    s.send_text("tell me a story").await.unwrap();
    recv_frame(&mut rx, "the reply's audio").await;
    // Both sentences are synthesized, so the second one's audio is queued
    // behind the first's (its frames went through to the session).
    tokio::time::timeout(PATIENCE, speech.finished.subscribe().wait_for(|&n| n >= 2))
        .await
        .expect("both sentences are synthesized")
        .unwrap();
    // The user cuts in with a new turn.
    s.send_text("stop").await.unwrap();
    next_event(&mut events, "the interruption", |e| {
        matches!(e, SessionEvent::Interrupted { .. })
    })
    .await;
    tokio::time::timeout(PATIENCE, closed)
        .await
        .expect("the agent's stream is closed by the barge-in")
        .expect("the producer saw it");
    // The next turn is answered, knowing what was said of the cut reply:
    // the sentence whose audio had started.
    next_event(&mut events, "the next answer", |e| {
        *e == SessionEvent::AgentText { text: "ok".into() }
    })
    .await;
    assert_eq!(
        histories(&seen)[1],
        [
            Message::user("tell me a story"),
            Message::agent_interrupted("First sentence.")
        ]
    );
    assert_eq!(speech.said()[0], "First sentence.");
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_mid_stream_is_an_agent_error_after_what_was_spoken() {
    let speech = Arc::new(Speech::default());
    let backend = backend(Some(("agent-test-speech-error", speech.clone()))).await;
    let (producer, go, _) = Producer::new();
    let (agent, seen) = streaming_agent(producer, "Part one. Part tw", Then::Fail);
    let s = backend
        .create_session(SessionConfig::new("u1").with_agent(agent))
        .await
        .unwrap();
    let mut events = s.events();
    let mut rx = s.receive_audio().unwrap();
    s.start().await.unwrap();
    s.send_text("go on").await.unwrap();
    let mut frames = vec![recv_frame(&mut rx, "the first part's audio").await];
    go.send(()).unwrap();
    let mut seen_events = Vec::new();
    let error = next_event(&mut events, "the agent error", |e| {
        seen_events.push(e.clone());
        matches!(e, SessionEvent::Error { .. })
    })
    .await;
    assert!(
        matches!(
            &error,
            SessionEvent::Error { code: ErrorCode::AgentError, message }
                if message.contains("the model broke mid-reply")
        ),
        "{error:?}"
    );
    assert!(
        seen_events.contains(&SessionEvent::AgentText {
            text: "Part one.".into()
        }),
        "what was spoken is the agent's text: {seen_events:?}"
    );
    // The spoken part stays: it plays to its end.
    while frames.len() < FRAMES_PER_PIECE {
        frames.push(recv_frame(&mut rx, "the rest of the first part").await);
    }
    assert!(frames.iter().all(|f| f.data()[0] == 1));
    let mut later = Vec::new();
    next_event(&mut events, "listening again", |e| {
        later.push(e.clone());
        listening(e)
    })
    .await;
    assert!(
        !later
            .iter()
            .any(|e| matches!(e, SessionEvent::Interrupted { .. })),
        "{later:?}"
    );
    // The unfinished sentence is not said.
    assert_eq!(speech.said(), ["Part one."]);
    turn(&*s, &mut events, "and?").await;
    assert_eq!(
        histories(&seen)[1],
        [
            Message::user("go on"),
            Message::agent_interrupted("Part one.")
        ]
    );
    backend.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_starts_times_out() {
    let mut config = Config::new("local");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    config.timeout = Duration::from_secs(1);
    let backend = registry().create("local", &config).await.unwrap();
    backend.start().await.unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    let agent = agent_fn(move |_turn| {
        let (tx, reply) = AgentReply::channel(1);
        // Held open, silent.
        keep.lock().unwrap().push(tx);
        async move { Ok(reply) }
    });
    let s = backend
        .create_session(SessionConfig::new("u1").with_agent(agent))
        .await
        .unwrap();
    let mut events = s.events();
    s.start().await.unwrap();
    s.send_text("hello?").await.unwrap();
    let e = next_event(&mut events, "the timeout", |e| {
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
    next_event(&mut events, "listening again", listening).await;
    assert!(
        held.lock().unwrap()[0].is_closed(),
        "the stream was dropped"
    );
    backend.stop().await.unwrap();
}
