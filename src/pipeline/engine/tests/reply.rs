//! Replies: playout, barge-in, replies without audio, a failing agent.

use super::*;
use crate::metrics::{DropReason, Op};

/// Reply audio is handed out in real time: never late, never more than
/// `PLAYOUT_LEAD` ahead, and topped up several frames at a time.
#[tokio::test(start_paused = true)]
async fn playout_keeps_the_receiver_within_the_lead_and_hands_out_batches() {
    const FRAMES: usize = 30;
    let engine = stt_tts_engine(FRAMES);
    let mut rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    speak(&engine, 4);
    let mut received = Vec::new();
    for _ in 0..FRAMES {
        let f = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("reply audio")
            .expect("the receiver is open");
        received.push((Instant::now(), f.data()[0]));
    }
    let bytes: Vec<u8> = received.iter().map(|&(_, b)| b).collect();
    assert_eq!(bytes, (1..=FRAMES as u8).collect::<Vec<u8>>());
    let start = received[0].0;
    let frame = Duration::from_millis(20);
    for (k, &(at, _)) in received.iter().enumerate() {
        let due = start + frame * k as u32;
        assert!(at <= due, "frame {k} came {:?} after it was due", at - due);
        let handed_out_until = due + frame;
        assert!(
            handed_out_until - at <= PLAYOUT_LEAD,
            "frame {k}: {:?} handed out ahead, more than the lead",
            handed_out_until - at
        );
    }
    // Frames come in groups: each wake-up tops up to the lead.
    let mut times: Vec<Instant> = received.iter().map(|&(at, _)| at).collect();
    times.dedup();
    let per_wake = (PLAYOUT_LEAD - PLAYOUT_REFILL).as_millis() / frame.as_millis();
    assert!(per_wake >= 2);
    assert!(
        times.len() <= FRAMES.div_ceil(per_wake as usize) + 2,
        "{} hand-outs for {FRAMES} frames; expected about {per_wake} frames each",
        times.len()
    );
    // And only as fast as real time: the last frame is handed out about
    // when it is due, not at once.
    let last_due = start + frame * (FRAMES as u32 - 1);
    assert!(last_due - *times.last().unwrap() <= PLAYOUT_LEAD);
    engine.stop(Duration::from_secs(2)).await.unwrap();
}

/// A frame longer than the whole playout bound is dropped and counted, not
/// queued; the reply's other frames still play.
#[tokio::test(start_paused = true)]
async fn a_reply_frame_over_the_playout_bound_is_dropped_whole() {
    let ms = Duration::from_millis;
    let engine = engine_with_tts(Arc::new(FramesTts {
        durations: vec![ms(20), MAX_REPLY_AUDIO + ms(20), ms(20)],
    }));
    let metrics = engine.metrics.clone();
    let mut rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    speak(&engine, 4);
    let mut played = Vec::new();
    for _ in 0..2 {
        let f = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("reply audio")
            .expect("the receiver is open");
        played.push((f.data()[0], f.duration()));
    }
    assert_eq!(played, [(1, ms(20)), (3, ms(20))]);
    assert_eq!(
        metrics.snapshot().dropped.get(&DropReason::OutputOverflow),
        Some(&1)
    );
    engine.stop(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_cuts_a_tts_reply_and_the_next_turn_is_answered() {
    let engine = stt_tts_engine(200);
    let mut events = engine.subscribe();
    let mut rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    speak(&engine, 4);
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the reply starts playing")
        .expect("reply audio");
    next_event(&mut events, "speaking", to(PipelineState::Speaking)).await;
    // Barge in.
    engine.process_audio(frame(9)).unwrap();
    let cut = next_event(&mut events, "the interruption", |e| {
        matches!(e, SessionEvent::Interrupted { .. })
    })
    .await;
    assert_eq!(cut, SessionEvent::Interrupted { turn: 1 });
    next_event(&mut events, "listening", to(PipelineState::Listening)).await;
    // Nothing more of the cut reply plays.
    let mut leftover = 0;
    while tokio::time::timeout(Duration::from_millis(200), rx.recv())
        .await
        .is_ok_and(|f| f.is_some())
    {
        leftover += 1;
    }
    assert_eq!(leftover, 0, "frames of the cut reply played");
    // The turn that barged in (1 frame so far, then 5 more) is answered.
    speak(&engine, 5);
    let answer = next_event(&mut events, "the second answer", |e| {
        matches!(e, SessionEvent::AgentText { .. })
    })
    .await;
    assert_eq!(
        answer,
        SessionEvent::AgentText {
            text: "you said 9 frames".into()
        }
    );
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the second reply plays")
        .expect("reply audio");
    assert_eq!(first.data()[0], 1, "the second reply from its start");
    engine.stop(Duration::from_millis(100)).await.unwrap();
    next_event(&mut events, "the close", |e| *e == SessionEvent::Closed).await;
}

/// A turn answered without any audio goes back to listening, whatever
/// the reason, and the next turn is not taken for a barge-in.
#[tokio::test]
async fn a_turn_answered_without_audio_goes_back_to_listening() {
    let failing_agent = agent_fn(|_| async move {
        Err(BackendError::new(
            "agent",
            ErrorCode::AgentError,
            "the agent broke",
        ))
    });
    let echo_agent = || {
        agent_fn(
            |turn| async move { Ok(AgentReply::text(format!("you said {}", turn.transcript))) },
        )
    };
    let empty_agent = agent_fn(|_| async move { Ok(AgentReply::text("")) });
    let cases: Vec<(&str, Engine, Option<ErrorCode>)> = vec![
        (
            "agent error",
            engine_with(Some(Arc::new(FramesTts::numbered(3))), failing_agent, false),
            Some(ErrorCode::AgentError),
        ),
        (
            "tts error",
            engine_with(
                Some(Arc::new(SilentTts { fail: true })),
                echo_agent(),
                false,
            ),
            Some(ErrorCode::PipelineError),
        ),
        (
            "tts silent",
            engine_with(
                Some(Arc::new(SilentTts { fail: false })),
                echo_agent(),
                false,
            ),
            None,
        ),
        ("no tts", engine_with(None, echo_agent(), false), None),
        (
            "empty text",
            engine_with(Some(Arc::new(FramesTts::numbered(3))), empty_agent, false),
            None,
        ),
    ];
    for (case, engine, error) in cases {
        let mut events = engine.subscribe();
        let _rx = engine.take_receiver().unwrap();
        engine.start().unwrap();
        for turn in 1..=2 {
            speak(&engine, 4);
            next_event(&mut events, "processing", to(PipelineState::Processing)).await;
            let seen = events_until_listening(&mut events).await;
            assert_eq!(engine.state(), PipelineState::Listening, "{case}");
            let errors: Vec<ErrorCode> = seen
                .iter()
                .filter_map(|e| match e {
                    SessionEvent::Error { code, .. } => Some(*code),
                    _ => None,
                })
                .collect();
            assert_eq!(
                errors,
                Vec::from_iter(error),
                "{case}, turn {turn}: {seen:?}"
            );
            assert!(
                !seen
                    .iter()
                    .any(|e| matches!(e, SessionEvent::Interrupted { .. })),
                "{case}, turn {turn}: no reply was cut: {seen:?}"
            );
            // What the agent said comes before the state changes back.
            if error.is_none() {
                let text = seen
                    .iter()
                    .position(|e| matches!(e, SessionEvent::AgentText { .. }));
                assert_eq!(text, Some(seen.len() - 2), "{case}, turn {turn}: {seen:?}");
            }
        }
        // Each turn is a request of the `turn` operation, and its failure
        // one of its errors.
        let m = engine.metrics().snapshot();
        assert_eq!(m.requests[&Op::Turn], 2, "{case}");
        let turn_errors: u64 = m
            .errors
            .iter()
            .filter(|((op, _), _)| *op == Op::Turn)
            .map(|(_, n)| n)
            .sum();
        match error {
            Some(code) => {
                assert_eq!(m.errors[&(Op::Turn, code)], 2, "{case}");
                assert_eq!(turn_errors, 2, "{case}");
            }
            None => assert_eq!(turn_errors, 0, "{case}"),
        }
        engine.stop(Duration::from_secs(2)).await.unwrap();
    }
}

/// Audio sent to a receiver that is gone is not counted as sent.
#[tokio::test]
async fn audio_that_is_not_sent_is_not_counted() {
    let engine = stt_tts_engine(1);
    let rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    engine.send_audio(frame(3)).await.unwrap();
    assert_eq!(engine.metrics().snapshot().bytes_out, 640);
    drop(rx);
    assert!(engine.send_audio(frame(3)).await.is_err());
    assert_eq!(engine.metrics().snapshot().bytes_out, 640);
    engine.stop(Duration::from_secs(1)).await.unwrap();
}

/// A reply made while nobody holds the audio stream (its receiver handed
/// back) is dropped as unheard, not as an overflow; the next holder hears
/// the reply after.
#[tokio::test]
async fn a_reply_nobody_holds_the_stream_for_is_dropped_as_unheard() {
    let engine = stt_tts_engine(10);
    let mut events = engine.subscribe();
    drop(engine.take_receiver().unwrap());
    engine.start().unwrap();
    speak(&engine, 5);
    next_event(&mut events, "the answer", |e| {
        matches!(e, SessionEvent::AgentText { .. })
    })
    .await;
    next_event(&mut events, "the reply's end", to(PipelineState::Listening)).await;
    let dropped = engine.metrics().snapshot().dropped;
    assert_eq!(dropped.get(&DropReason::Unheard), Some(&10), "{dropped:?}");
    assert_eq!(dropped.get(&DropReason::OutputOverflow), Some(&0));
    let mut rx = engine.take_receiver().unwrap();
    speak(&engine, 5);
    let f = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the next reply plays")
        .expect("the receiver is open");
    assert_eq!(f.data()[0], 1);
    engine.stop(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn an_agent_that_panics_fails_its_turn_and_the_session_goes_on() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let agent = agent_fn(move |_turn| {
        let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                panic!("the agent's bug");
            }
            Ok(AgentReply::text("fine now"))
        }
    });
    let engine = engine_with(Some(Arc::new(FramesTts::numbered(3))), agent, false);
    let mut events = engine.subscribe();
    engine.start().unwrap();
    next_event(&mut events, "listening", to(PipelineState::Listening)).await;
    speak(&engine, 4);
    let seen = events_until_listening(&mut events).await;
    assert!(
        seen.iter().any(|e| matches!(
            e,
            SessionEvent::Error { code: ErrorCode::AgentError, message }
                if message.contains("panicked") && message.contains("the agent's bug")
        )),
        "{seen:?}"
    );
    // The next turn is answered.
    speak(&engine, 4);
    next_event(
        &mut events,
        "the second answer",
        |e| matches!(e, SessionEvent::AgentText { text, .. } if text == "fine now"),
    )
    .await;
}

/// A reply the user cuts joins the history as far as it was said: one whose
/// audio had started, marked interrupted; one cut before the agent
/// answered, not at all (the user's turn does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_reply_joins_the_history_as_far_as_it_was_said() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::<crate::agent::AgentTurn>::new()));
    let kept = seen.clone();
    let agent = agent_fn(move |turn| {
        let n = {
            let mut seen = kept.lock().unwrap();
            seen.push(turn);
            seen.len()
        };
        async move {
            if n == 2 {
                std::future::pending::<()>().await;
            }
            Ok(AgentReply::text(format!("answer {n}")))
        }
    });
    let engine = engine_with(Some(Arc::new(FramesTts::numbered(200))), agent, false);
    let mut events = engine.subscribe();
    let mut rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    // Turn 1: cut while its reply plays.
    speak(&engine, 4);
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the reply starts playing")
        .expect("reply audio");
    engine.process_audio(frame(9)).unwrap();
    next_event(&mut events, "the first cut", |e| {
        matches!(e, SessionEvent::Interrupted { .. })
    })
    .await;
    // Turn 2: cut while the agent thinks.
    speak(&engine, 4);
    let asked = async {
        while seen.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), asked)
        .await
        .expect("the agent is asked about turn 2");
    engine.process_audio(frame(9)).unwrap();
    next_event(&mut events, "the second cut", |e| {
        matches!(e, SessionEvent::Interrupted { .. })
    })
    .await;
    // Turn 3 sees both.
    speak(&engine, 4);
    next_event(&mut events, "the third answer", |e| {
        *e == SessionEvent::AgentText {
            text: "answer 3".into(),
        }
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen[2].history.to_vec(),
        [
            Message::user(seen[0].transcript.clone()),
            Message::agent_interrupted("answer 1"),
            Message::user(seen[1].transcript.clone()),
        ]
    );
    engine.stop(Duration::from_millis(100)).await.unwrap();
}

/// A reply that played to its end joins the history whole; one the agent
/// failed leaves the user's turn only.
#[tokio::test(start_paused = true)]
async fn a_reply_said_to_its_end_joins_the_history_whole() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::<crate::agent::AgentTurn>::new()));
    let kept = seen.clone();
    let agent = agent_fn(move |turn| {
        let n = {
            let mut seen = kept.lock().unwrap();
            seen.push(turn);
            seen.len()
        };
        async move {
            if n == 2 {
                return Err(BackendError::new("agent", ErrorCode::AgentError, "no"));
            }
            Ok(AgentReply::text(format!("answer {n}")))
        }
    });
    let engine = engine_with(Some(Arc::new(FramesTts::numbered(3))), agent, false);
    let mut events = engine.subscribe();
    let _rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    for _ in 0..3 {
        speak(&engine, 4);
        next_event(&mut events, "processing", to(PipelineState::Processing)).await;
        events_until_listening(&mut events).await;
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen[2].history.to_vec(),
        [
            Message::user(seen[0].transcript.clone()),
            Message::agent("answer 1"),
            Message::user(seen[1].transcript.clone()),
        ]
    );
    engine.stop(Duration::from_secs(1)).await.unwrap();
}
