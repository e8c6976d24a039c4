//! The session's life: stopping, dropping, audio sent straight out.

use super::*;

/// A second `stop` (a client's stop, then its disconnect) returns when the
/// session has ended, as the first does, not at once.
#[tokio::test(start_paused = true)]
async fn a_second_stop_waits_for_the_end_as_the_first_does() {
    let engine = Arc::new(stt_tts_engine(100));
    let mut events = engine.subscribe();
    let mut rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    speak(&engine, 4);
    rx.recv().await.expect("the reply plays");
    let first = tokio::spawn({
        let engine = engine.clone();
        async move { engine.stop(Duration::from_secs(10)).await }
    });
    tokio::task::yield_now().await;
    assert_eq!(engine.state(), PipelineState::Speaking);
    engine.stop(Duration::from_secs(10)).await.unwrap();
    // The 2 s reply played out, then the session closed.
    assert_eq!(engine.state(), PipelineState::Idle);
    next_event(&mut events, "the close", |e| *e == SessionEvent::Closed).await;
    first.await.unwrap().unwrap();
}

/// `send_audio` keeps its resampler between calls, and each call is
/// still converted on its own: the same clip twice gives the same audio
/// twice, as a fresh converter gives it.
#[tokio::test]
async fn send_audio_reuses_its_resampler_and_converts_each_call_whole() {
    let engine = stt_tts_engine(1);
    let mut rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    let from = AudioFormat::new(crate::audio::AudioEncoding::PcmS16Le, 44_100, 1);
    let samples: Vec<u8> = (0..4410i32)
        .flat_map(|i| (((i * 37) % 2000 - 1000) as i16).to_le_bytes())
        .collect();
    let clip = AudioFrame::new(from, samples).unwrap();
    let mut fresh = AudioConverter::new(from, INTERNAL_FORMAT).unwrap();
    let mut expected = fresh
        .convert(&clip)
        .unwrap()
        .map(|f| f.data().to_vec())
        .unwrap_or_default();
    expected.extend(
        fresh
            .flush()
            .unwrap()
            .map(|f| f.data().to_vec())
            .unwrap_or_default(),
    );
    for call in 0..2 {
        engine.send_audio(clip.clone()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the audio")
            .expect("the receiver is open");
        assert_eq!(got.format(), INTERNAL_FORMAT);
        assert_eq!(got.data().as_ref(), &expected[..], "call {call}");
    }
    assert!(
        engine.send_converter.lock().unwrap().is_some(),
        "the resampler is kept"
    );
    engine.stop(Duration::from_secs(1)).await.unwrap();
}

/// An engine dropped while running ends its task: the reply audio
/// receiver sees the end, and the session reports it closed.
#[tokio::test]
async fn a_running_engine_dropped_without_stop_ends_its_task() {
    let engine = stt_tts_engine(1);
    let mut events = engine.subscribe();
    let mut rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    next_event(&mut events, "listening", to(PipelineState::Listening)).await;
    drop(engine);
    let end = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
    assert!(matches!(end, Ok(None)), "the receiver ends");
    next_event(&mut events, "the close", |e| *e == SessionEvent::Closed).await;
}

/// `FirstByte`, but a frame whose first byte is 7 is silence that holds
/// the input path until the test lets it go.
struct HoldingVad {
    entered: std::sync::mpsc::Sender<()>,
    release: std::sync::mpsc::Receiver<()>,
}

impl Vad for HoldingVad {
    fn process(&mut self, audio: &AudioFrame) -> VadDecision {
        if audio.data().first() == Some(&7) {
            let _ = self.entered.send(());
            let _ = self.release.recv();
            return FirstByte.process(&frame(0));
        }
        FirstByte.process(audio)
    }
}

/// `stop` while another thread is in `process_audio` with the frame that
/// ends a turn: the turn is queued before the stop, so it is answered
/// before the session closes, and nothing follows `Closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_stop_during_the_frame_that_ends_a_turn_lets_the_turn_finish() {
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let (stt_events, stt_rx) = mpsc::channel(64);
    let engine = Arc::new(
        Engine::new(EngineParts {
            vad: Box::new(HoldingVad {
                entered: entered_tx,
                release: release_rx,
            }),
            tts: Some(Arc::new(FramesTts::numbered(2))),
            agent: Some(agent_fn(|turn| async move {
                Ok(AgentReply::text(format!("you said {}", turn.transcript)))
            })),
            ..parts(
                Box::new(CountingStt {
                    events: stt_events,
                    frames: 0,
                }),
                stt_rx,
            )
        })
        .unwrap(),
    );
    let mut events = engine.subscribe();
    let _rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    for byte in [9, 9, 9, 9, 0, 0] {
        engine.process_audio(frame(byte)).unwrap();
    }
    // The third silent frame ends the turn; the VAD holds it.
    let e = engine.clone();
    let ending = tokio::task::spawn_blocking(move || e.process_audio(frame(7)));
    tokio::task::spawn_blocking(move || entered.recv().unwrap())
        .await
        .unwrap();
    let e = engine.clone();
    let stopping = tokio::spawn(async move { e.stop(Duration::from_secs(5)).await });
    // Time for `stop` to get as far as it can while the frame is held.
    tokio::time::sleep(Duration::from_millis(200)).await;
    release.send(()).unwrap();
    ending.await.unwrap().unwrap();
    stopping.await.unwrap().unwrap();
    let mut seen = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(500), events.recv()).await {
        seen.push(e);
    }
    let closed = seen.iter().position(|e| *e == SessionEvent::Closed);
    assert_eq!(closed, Some(seen.len() - 1), "Closed comes last: {seen:?}");
    assert!(
        seen.iter()
            .any(|e| matches!(e, SessionEvent::AgentText { text } if text == "you said 7 frames")),
        "the turn was answered before the close: {seen:?}"
    );
}
