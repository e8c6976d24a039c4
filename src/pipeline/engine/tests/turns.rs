//! Turns and their final transcripts.

use super::*;
use crate::metrics::Op;
use crate::pipeline::link::Remote;
use crate::pipeline::{S2sEvent, S2sStream};

#[tokio::test]
async fn an_stt_turn_is_transcribed_answered_and_played_in_order() {
    let engine = stt_tts_engine(10);
    let mut events = engine.subscribe();
    let mut rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    speak(&engine, 7);
    let partial = next_event(&mut events, "a partial", |e| {
        matches!(
            e,
            SessionEvent::UserTranscript {
                is_final: false,
                ..
            }
        )
    })
    .await;
    assert_eq!(
        partial,
        SessionEvent::UserTranscript {
            text: "5 frames".into(),
            is_final: false
        }
    );
    let answer = next_event(&mut events, "the answer", |e| {
        matches!(e, SessionEvent::AgentText { .. })
    })
    .await;
    assert_eq!(
        answer,
        SessionEvent::AgentText {
            text: "you said 10 frames".into()
        }
    );
    let mut played = Vec::new();
    for _ in 0..10 {
        let f = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("reply audio")
            .expect("the receiver is open");
        played.push(f.data()[0]);
    }
    assert_eq!(played, (1..=10).collect::<Vec<u8>>());
    let SessionEvent::Latency(l) = next_event(&mut events, "the latency", |e| {
        matches!(e, SessionEvent::Latency(_))
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(l.turn, 1);
    assert!(l.stt.is_some() && l.agent.is_some() && l.tts_first_audio.is_some());
    next_event(&mut events, "listening again", to(PipelineState::Listening)).await;
    engine.stop(Duration::from_secs(2)).await.unwrap();
    next_event(&mut events, "the close", |e| *e == SessionEvent::Closed).await;
}

/// A speech service that cannot end a turn: the frame that ended it
/// reports the error, and the session listens again.
#[tokio::test]
async fn a_turn_the_stt_cannot_end_goes_back_to_listening() {
    let engine = engine_with(
        Some(Arc::new(FramesTts::numbered(3))),
        agent_fn(|_| async move { Ok(AgentReply::text("hi")) }),
        true,
    );
    let mut events = engine.subscribe();
    let _rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    for _ in 0..4 {
        engine.process_audio(frame(9)).unwrap();
    }
    engine.process_audio(frame(0)).unwrap();
    engine.process_audio(frame(0)).unwrap();
    let e = engine.process_audio(frame(0)).unwrap_err();
    assert_eq!(e.code, ErrorCode::ConnectionFailed, "{e}");
    assert_eq!(e.op, "session.process_audio");
    next_event(&mut events, "processing", to(PipelineState::Processing)).await;
    events_until_listening(&mut events).await;
    assert_eq!(engine.state(), PipelineState::Listening);
    engine.stop(Duration::from_secs(2)).await.unwrap();
}

/// Holds each turn's final transcript ("turn N") until the test sends it.
struct HeldStt {
    turns: usize,
    held: Arc<Mutex<VecDeque<String>>>,
}

impl SttStream for HeldStt {
    fn push_audio(&mut self, _: &AudioFrame) -> Result<()> {
        Ok(())
    }

    fn end_turn(&mut self) -> Result<()> {
        self.turns += 1;
        self.held
            .lock()
            .unwrap()
            .push_back(format!("turn {}", self.turns));
        Ok(())
    }
}

/// An engine whose STT holds its finals, and the means to send them.
fn held_engine(
    agent_timeout: Duration,
) -> (Engine, Arc<Mutex<VecDeque<String>>>, mpsc::Sender<SttEvent>) {
    let held = Arc::new(Mutex::new(VecDeque::new()));
    let (stt_events, stt_rx) = mpsc::channel(64);
    let engine = Engine::new(EngineParts {
        tts: Some(Arc::new(FramesTts::numbered(2))),
        agent: Some(agent_fn(|turn| async move {
            Ok(AgentReply::text(format!("you said {}", turn.transcript)))
        })),
        agent_timeout,
        ..parts(
            Box::new(HeldStt {
                turns: 0,
                held: held.clone(),
            }),
            stt_rx,
        )
    })
    .unwrap();
    (engine, held, stt_events)
}

async fn release(held: &Arc<Mutex<VecDeque<String>>>, stt: &mpsc::Sender<SttEvent>) {
    let text = held.lock().unwrap().pop_front().expect("a held final");
    stt.send(SttEvent::Final(text)).await.unwrap();
}

/// The agent's answers from now until the session has been listening,
/// with nothing more happening, for a while.
async fn answers_until_quiet(events: &mut SessionEvents) -> Vec<String> {
    let mut answers = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(300), events.recv()).await {
        if let SessionEvent::AgentText { text } = e {
            answers.push(text);
        }
    }
    answers
}

/// A spoken turn's transcript that comes after a text turn superseded it
/// is reported, but not answered: the text turn's reply stands.
#[tokio::test]
async fn a_late_transcript_does_not_replace_the_text_turn_after_it() {
    let (engine, held, stt) = held_engine(Duration::from_secs(5));
    let mut events = engine.subscribe();
    let _rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    speak(&engine, 4);
    next_event(&mut events, "processing", to(PipelineState::Processing)).await;
    engine.send_text("typed").unwrap();
    release(&held, &stt).await;
    let spoken = next_event(
        &mut events,
        "the spoken transcript",
        |e| matches!(e, SessionEvent::UserTranscript { text, .. } if text == "turn 1"),
    )
    .await;
    assert_eq!(
        spoken,
        SessionEvent::UserTranscript {
            text: "turn 1".into(),
            is_final: true
        }
    );
    assert_eq!(answers_until_quiet(&mut events).await, ["you said typed"]);
    engine.stop(Duration::from_secs(2)).await.unwrap();
}

/// The user cuts in on their own turn before its transcript came: the
/// next answer is to both parts, in order.
#[tokio::test]
async fn a_turn_cut_before_its_transcript_is_answered_with_the_next() {
    let (engine, held, stt) = held_engine(Duration::from_secs(5));
    let mut events = engine.subscribe();
    let _rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    speak(&engine, 4);
    next_event(&mut events, "processing", to(PipelineState::Processing)).await;
    // The user speaks again (a barge-in on the turn being processed).
    speak(&engine, 4);
    next_event(&mut events, "the cut", |e| {
        matches!(e, SessionEvent::Interrupted { .. })
    })
    .await;
    release(&held, &stt).await;
    release(&held, &stt).await;
    assert_eq!(
        answers_until_quiet(&mut events).await,
        ["you said turn 1 turn 2"]
    );
    engine.stop(Duration::from_secs(2)).await.unwrap();
}

/// A turn whose transcript never comes is given up on after the timeout,
/// with an error, and the session listens again.
#[tokio::test]
async fn a_transcript_that_never_comes_is_given_up_on() {
    let (engine, held, stt) = held_engine(Duration::from_millis(200));
    let mut events = engine.subscribe();
    let _rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    speak(&engine, 4);
    next_event(&mut events, "processing", to(PipelineState::Processing)).await;
    let seen = events_until_listening(&mut events).await;
    assert!(
        seen.iter().any(|e| matches!(e, SessionEvent::Error { code: ErrorCode::Timeout, message } if message.contains("no final transcript of turn 1"))),
        "{seen:?}"
    );
    assert_eq!(
        engine.metrics().snapshot().errors[&(Op::Turn, ErrorCode::Timeout)],
        1
    );
    // Its transcript, if it comes after all, is not answered.
    release(&held, &stt).await;
    assert!(answers_until_quiet(&mut events).await.is_empty());
    // The next turn is answered as usual.
    speak(&engine, 4);
    release(&held, &stt).await;
    assert_eq!(answers_until_quiet(&mut events).await, ["you said turn 2"]);
    engine.stop(Duration::from_secs(2)).await.unwrap();
}

/// A speech-to-speech model that answers at once: on the end of turn `n` it
/// queues, from inside `end_turn`, the turn's final transcript, `frames`
/// reply frames whose bytes are `n`, and the reply's end.
struct PromptModel {
    events: mpsc::Sender<S2sEvent>,
    turns: u8,
    frames: usize,
}

impl S2sStream for PromptModel {
    fn push_audio(&mut self, _: &AudioFrame) -> Result<()> {
        Ok(())
    }

    fn end_turn(&mut self) -> Result<()> {
        self.turns += 1;
        let n = self.turns;
        let _ = self.events.try_send(S2sEvent::UserTranscript {
            text: format!("turn {n}"),
            is_final: true,
        });
        for _ in 0..self.frames {
            let _ = self.events.try_send(S2sEvent::Audio(frame(n)));
        }
        let _ = self.events.try_send(S2sEvent::ReplyDone);
        Ok(())
    }

    fn interrupt(&mut self) {}
}

// On a busy machine a speech-to-speech model can answer the turn that barged
// in before the session task has seen the cut: the cut must take only the
// cut reply's audio, not the answer queued after the new turn's transcript.
// Here the task cannot run between the barge-in and the model's answer (one
// thread, and `process_audio` never yields), so the answer is always queued
// behind the cut.
#[tokio::test(flavor = "current_thread")]
async fn a_model_answer_queued_before_the_cut_is_seen_is_played() {
    let (events_tx, events_rx) = mpsc::channel(256);
    let model = PromptModel {
        events: events_tx,
        turns: 0,
        frames: 50,
    };
    let (_stt_tx, stt_rx) = mpsc::channel(1);
    let engine = Engine::new(EngineParts {
        stt: None,
        remote: Some(Remote::Model(Box::new(model), events_rx)),
        ..parts(Box::new(FailingStt), stt_rx)
    })
    .unwrap();
    let mut events = engine.subscribe();
    let mut rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    speak(&engine, 5);
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the first reply plays")
        .expect("the receiver is open");
    assert_eq!(first.data()[0], 1);
    // The user barges in and ends a second turn without the task running.
    speak(&engine, 5);
    let mut heard = Vec::new();
    let wait = async {
        while let Some(f) = rx.recv().await {
            heard.push(f.data()[0]);
            if heard.iter().filter(|&&b| b == 2).count() == 50 {
                return;
            }
        }
    };
    let played = tokio::time::timeout(Duration::from_secs(5), wait).await;
    let second = heard.iter().filter(|&&b| b == 2).count();
    assert!(
        played.is_ok(),
        "the answer to the turn that barged in was lost: {second} of its 50 frames played"
    );
    next_event(&mut events, "listening again", to(PipelineState::Listening)).await;
    engine.stop(Duration::from_secs(2)).await.unwrap();
}
