//! The input path: turn detection, endpointing, processors.

use super::*;
use crate::metrics::LatencyStage;

/// Partial transcripts reach the turn detector: with the silence
/// detector, a partial that sounds unfinished ("10 frames", no full stop)
/// holds the turn open for `max_endpointing_delay` instead of ending it
/// after `min_endpointing_delay`.
#[tokio::test]
async fn partial_transcripts_reach_the_turn_detector() {
    use crate::pipeline::builtin::turn::{SilenceTurnDetector, SilenceTurnOptions};
    let options = SilenceTurnOptions::default();
    let (min, max) = (options.min_endpointing_delay, options.max_endpointing_delay);
    let (stt_events, stt_rx) = mpsc::channel(64);
    let engine = Engine::new(EngineParts {
        turn: Box::new(SilenceTurnDetector::new(options)),
        ..parts(
            Box::new(CountingStt {
                events: stt_events,
                frames: 0,
            }),
            stt_rx,
        )
    })
    .unwrap();
    let mut events = engine.subscribe();
    let _rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    for _ in 0..10 {
        engine.process_audio(frame(9)).unwrap();
    }
    next_event(&mut events, "a partial", |e| {
        matches!(
            e,
            SessionEvent::UserTranscript {
                is_final: false,
                ..
            }
        )
    })
    .await;
    let frame_len = frame(0).duration();
    let mut silence = Duration::ZERO;
    let ended = loop {
        engine.process_audio(frame(0)).unwrap();
        silence += frame_len;
        let mut ended = false;
        while let Some(e) = events.try_recv() {
            ended |= matches!(e, SessionEvent::TurnEnded { .. });
        }
        if ended || silence > max {
            break silence;
        }
    };
    assert!(
        ended > min,
        "the turn ended after {ended:?}, the delay for a finished sentence"
    );
    assert_eq!(
        ended, max,
        "the turn ends after the delay for an unfinished one"
    );
    engine.stop(Duration::from_secs(2)).await.unwrap();
}

/// Speech at byte 9, a VAD's hangover at byte 5 (speech, but below the
/// probability the silence detector counts), silence at 0.
struct WithHangover;

impl Vad for WithHangover {
    fn process(&mut self, frame: &AudioFrame) -> VadDecision {
        let (speech, probability) = match frame.data().first() {
            Some(9) => (true, 1.0),
            Some(5) => (true, 0.3),
            _ => (false, 0.0),
        };
        VadDecision {
            speech,
            probability,
            level_db: 0.0,
        }
    }
}

/// Transcribes every turn as "done." at once.
struct PlainStt {
    events: mpsc::Sender<SttEvent>,
}

impl SttStream for PlainStt {
    fn push_audio(&mut self, _: &AudioFrame) -> Result<()> {
        Ok(())
    }

    fn end_turn(&mut self) -> Result<()> {
        let _ = self.events.try_send(SttEvent::Final("done.".into()));
        Ok(())
    }
}

/// The turn's endpointing latency is the silence the turn detector
/// waited, a VAD hangover included.
#[tokio::test]
async fn endpointing_is_the_silence_the_detector_waited() {
    use crate::pipeline::builtin::turn::{SilenceTurnDetector, SilenceTurnOptions};
    let options = SilenceTurnOptions::default();
    let min = options.min_endpointing_delay;
    let (stt_events, stt_rx) = mpsc::channel(64);
    let engine = Engine::new(EngineParts {
        vad: Box::new(WithHangover),
        turn: Box::new(SilenceTurnDetector::new(options)),
        tts: Some(Arc::new(FramesTts::numbered(2))),
        agent: Some(agent_fn(|_| async move { Ok(AgentReply::text("ok.")) })),
        // Full stops: the turn ends after the shorter delay.
        ..parts(Box::new(PlainStt { events: stt_events }), stt_rx)
    })
    .unwrap();
    let mut events = engine.subscribe();
    let _rx = engine.take_receiver().unwrap();
    engine.start().unwrap();
    for byte in [9; 10].into_iter().chain([5; 8]).chain([0; 40]) {
        engine.process_audio(frame(byte)).unwrap();
    }
    let SessionEvent::Latency(l) = next_event(&mut events, "the latency", |e| {
        matches!(e, SessionEvent::Latency(_))
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(l.endpointing, min, "{l:?}");
    let m = engine.metrics().snapshot();
    let waited = &m.turn_latency[&LatencyStage::Endpointing];
    assert_eq!((waited.count, waited.sum), (1, min.as_secs_f64()));
    engine.stop(Duration::from_secs(2)).await.unwrap();
}

/// A processor that fails with a code of its own choosing.
struct FailingProcessor(ErrorCode);

impl crate::hooks::AudioProcessor for FailingProcessor {
    fn name(&self) -> &str {
        "denoise"
    }
    fn order(&self) -> i32 {
        0
    }
    fn process(&mut self, _: AudioFrame) -> Result<AudioFrame> {
        Err(BackendError::new("denoise", self.0, "the model broke"))
    }
}

#[tokio::test]
async fn a_processor_error_is_a_pipeline_error_naming_the_processor() {
    let (tx, rx) = mpsc::channel(64);
    let engine = Engine::new(EngineParts {
        processors: vec![Box::new(FailingProcessor(ErrorCode::InvalidConfig))],
        agent: None,
        ..parts(
            Box::new(CountingStt {
                events: tx,
                frames: 0,
            }),
            rx,
        )
    })
    .unwrap();
    let mut events = engine.subscribe();
    engine.start().unwrap();
    let e = engine.process_audio(frame(9)).unwrap_err();
    assert_eq!(e.code, ErrorCode::PipelineError);
    assert!(e.message.contains("\"denoise\": the model broke"), "{e}");
    let cause = std::error::Error::source(&e).expect("the processor's error as the source");
    assert!(cause.to_string().contains("invalid_config"), "{cause}");
    let event = next_event(&mut events, "error", |e| {
        matches!(e, SessionEvent::Error { .. })
    })
    .await;
    assert!(
        matches!(event, SessionEvent::Error { code: ErrorCode::PipelineError, ref message } if message.contains("denoise")),
        "{event:?}"
    );
}

/// Hands back every frame at 48 kHz (three copies of each sample).
struct To48k;

impl crate::hooks::AudioProcessor for To48k {
    fn name(&self) -> &str {
        "upsample"
    }
    fn order(&self) -> i32 {
        0
    }
    fn process(&mut self, f: AudioFrame) -> Result<AudioFrame> {
        let format = AudioFormat::new(crate::audio::AudioEncoding::PcmS16Le, 48_000, 1);
        let data: Vec<u8> = f.data().chunks(2).flat_map(|s| s.repeat(3)).collect();
        AudioFrame::new(format, data)
    }
}

/// Notes the format of every frame it is given.
struct FormatsStt(Arc<Mutex<Vec<AudioFormat>>>);

impl SttStream for FormatsStt {
    fn push_audio(&mut self, f: &AudioFrame) -> Result<()> {
        self.0.lock().unwrap().push(f.format());
        Ok(())
    }
    fn end_turn(&mut self) -> Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_processor_that_changes_the_format_fails_and_feeds_nothing_on() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (_tx, rx) = mpsc::channel(64);
    let engine = Engine::new(EngineParts {
        processors: vec![Box::new(To48k)],
        ..parts(Box::new(FormatsStt(seen.clone())), rx)
    })
    .unwrap();
    engine.start().unwrap();
    for _ in 0..3 {
        let e = engine.process_audio(frame(9)).unwrap_err();
        assert_eq!(e.code, ErrorCode::PipelineError);
        assert!(
            e.message.contains("\"upsample\"") && e.message.contains("48000"),
            "{e}"
        );
    }
    assert_eq!(*seen.lock().unwrap(), Vec::<AudioFormat>::new());
}
