//! The engine's tests; the fixtures they share are here.

mod input;
mod reply;
mod session;
mod turns;

use super::*;
use crate::agent::{AgentReply, Message, agent_fn};
use crate::pipeline::{TurnSignal, VadDecision};

/// Speech when the frame's first byte is not zero.
struct FirstByte;

impl Vad for FirstByte {
    fn process(&mut self, frame: &AudioFrame) -> VadDecision {
        let speech = frame.data().first().is_some_and(|&b| b != 0);
        VadDecision {
            speech,
            probability: if speech { 1.0 } else { 0.0 },
            level_db: 0.0,
        }
    }
}

/// A turn starts with the first speech frame and ends on the third silent one.
#[derive(Default)]
struct ThreeSilent {
    in_turn: bool,
    silent: u32,
}

impl TurnDetector for ThreeSilent {
    fn update(&mut self, vad: &VadDecision, _: Duration) -> TurnSignal {
        if vad.speech {
            self.silent = 0;
            if !self.in_turn {
                self.in_turn = true;
                return TurnSignal::SpeechStarted;
            }
        } else if self.in_turn {
            self.silent += 1;
            if self.silent == 3 {
                self.in_turn = false;
                return TurnSignal::TurnEnded;
            }
        }
        TurnSignal::Continue
    }

    fn reset(&mut self) {
        self.silent = 0;
    }
}

/// Transcribes a turn as the number of frames it heard.
struct CountingStt {
    events: mpsc::Sender<SttEvent>,
    frames: usize,
}

impl SttStream for CountingStt {
    fn push_audio(&mut self, _: &AudioFrame) -> Result<()> {
        self.frames += 1;
        if self.frames.is_multiple_of(5) {
            let _ = self
                .events
                .try_send(SttEvent::Partial(format!("{} frames", self.frames)));
        }
        Ok(())
    }

    fn end_turn(&mut self) -> Result<()> {
        let n = std::mem::take(&mut self.frames);
        let _ = self.events.try_send(SttEvent::Final(format!("{n} frames")));
        Ok(())
    }
}

/// Hears audio, but cannot end a turn (its service is gone).
struct FailingStt;

impl SttStream for FailingStt {
    fn push_audio(&mut self, _: &AudioFrame) -> Result<()> {
        Ok(())
    }

    fn end_turn(&mut self) -> Result<()> {
        Err(BackendError::new(
            "stt.end_turn",
            ErrorCode::ConnectionFailed,
            "the STT service is gone",
        ))
    }
}

/// Says nothing: fails with `fail`, or succeeds without audio.
struct SilentTts {
    fail: bool,
}

#[async_trait::async_trait]
impl TextToSpeech for SilentTts {
    async fn synthesize(
        &self,
        _: &str,
        _: AudioFormat,
        _: &mpsc::Sender<AudioFrame>,
    ) -> Result<()> {
        if self.fail {
            Err(BackendError::new(
                "tts",
                ErrorCode::ConnectionFailed,
                "the TTS service is gone",
            ))
        } else {
            Ok(())
        }
    }
}

/// Says anything as one frame per duration, whose bytes are 1, 2, 3, ...
struct FramesTts {
    durations: Vec<Duration>,
}

impl FramesTts {
    /// `frames` frames of 20 ms.
    fn numbered(frames: usize) -> Self {
        FramesTts {
            durations: vec![Duration::from_millis(20); frames],
        }
    }
}

#[async_trait::async_trait]
impl TextToSpeech for FramesTts {
    async fn synthesize(
        &self,
        _text: &str,
        format: AudioFormat,
        out: &mpsc::Sender<AudioFrame>,
    ) -> Result<()> {
        for (i, &d) in self.durations.iter().enumerate() {
            let data = vec![(i % 250 + 1) as u8; format.bytes_for(d)];
            if out.send(AudioFrame::new(format, data)?).await.is_err() {
                break;
            }
        }
        Ok(())
    }
}

fn frame(byte: u8) -> AudioFrame {
    AudioFrame::new(INTERNAL_FORMAT, vec![byte; 640]).unwrap()
}

fn stt_tts_engine(tts_frames: usize) -> Engine {
    engine_with_tts(Arc::new(FramesTts::numbered(tts_frames)))
}

fn engine_with_tts(tts: Arc<dyn TextToSpeech>) -> Engine {
    engine_with(
        Some(tts),
        agent_fn(
            |turn| async move { Ok(AgentReply::text(format!("you said {}", turn.transcript))) },
        ),
        false,
    )
}

/// The parts of a test engine: `stt` and its events, the `FirstByte` VAD,
/// the `ThreeSilent` turn detector, no speaker and no agent, the
/// interruption policy off (override with struct update syntax).
fn parts(stt: Box<dyn SttStream>, events: mpsc::Receiver<SttEvent>) -> EngineParts {
    EngineParts {
        session_id: "s".into(),
        user_id: "u".into(),
        input_format: INTERNAL_FORMAT,
        output_format: INTERNAL_FORMAT,
        processors: Vec::new(),
        vad: Box::new(FirstByte),
        turn: Box::<ThreeSilent>::default(),
        stt: Some((stt, events)),
        remote: None,
        media: false,
        tts: None,
        agent: None,
        metrics: Arc::new(Metrics::new("test")),
        agent_timeout: Duration::from_secs(5),
        retention: None,
        converters: PreparedConverters::default(),
        // Speech onsets cut a reply at once: these tests are of the
        // barge-in itself (the policy's are in tests/interruptions.rs).
        interruption: crate::config::InterruptionConfig {
            enabled: false,
            ..Default::default()
        },
        preemptive: crate::config::PreemptiveConfig::default(),
    }
}

/// An STT + TTS engine with `tts` (or none), `agent`, and an STT that
/// refuses to end turns when `failing_stt`.
fn engine_with(
    tts: Option<Arc<dyn TextToSpeech>>,
    agent: Arc<dyn crate::agent::Agent>,
    failing_stt: bool,
) -> Engine {
    let (events, rx) = mpsc::channel(64);
    let stt: Box<dyn SttStream> = if failing_stt {
        Box::new(FailingStt)
    } else {
        Box::new(CountingStt { events, frames: 0 })
    };
    Engine::new(EngineParts {
        tts,
        agent: Some(agent),
        ..parts(stt, rx)
    })
    .unwrap()
}

/// A turn of `speech` frames then the three silent frames that end it.
fn speak(engine: &Engine, speech: usize) {
    for _ in 0..speech {
        engine.process_audio(frame(9)).unwrap();
    }
    for _ in 0..3 {
        engine.process_audio(frame(0)).unwrap();
    }
}

async fn next_event(
    events: &mut SessionEvents,
    what: &str,
    wanted: impl Fn(&SessionEvent) -> bool,
) -> SessionEvent {
    let wait = async {
        loop {
            let e = events.recv().await.expect("the session's events");
            if wanted(&e) {
                return e;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .unwrap_or_else(|_| panic!("no {what}"))
}

fn to(state: PipelineState) -> impl Fn(&SessionEvent) -> bool {
    move |e| matches!(e, SessionEvent::State { to, .. } if *to == state)
}

/// The events of one turn from its end up to the state going back to
/// listening (or a timeout's panic).
async fn events_until_listening(events: &mut SessionEvents) -> Vec<SessionEvent> {
    let mut seen = Vec::new();
    let wait = async {
        loop {
            let e = events.recv().await.expect("the session's events");
            let done = to(PipelineState::Listening)(&e);
            seen.push(e);
            if done {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .unwrap_or_else(|_| panic!("never back to listening; saw {seen:?}"));
    seen
}
