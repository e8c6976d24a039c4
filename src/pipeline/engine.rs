//! The per-session engine: streaming end to end.
//!
//! The input path runs inline in [`Engine::process_audio`], on the caller's
//! task, under a per-session lock: format conversion, processors, VAD, turn
//! detection, and handing the frame to STT or the S2S model. No frame waits in
//! a queue on the way in. Everything that waits (the final transcript, the
//! agent, TTS, paced playout to the user) runs on the session's own task, so
//! the next user audio is listened to while a reply is produced and played.
//!
//! # Buffers and overflow
//!
//! - Input: none; `process_audio` does the work before it returns.
//! - Pre-roll: the last 200 ms before speech onset, so STT and S2S hear the
//!   start of the first word (VAD decides a little late); fixed size.
//! - Reply audio waits in the session's playout queue, bounded by
//!   `max_reply_audio` (60 s); beyond it the newest frames are dropped and
//!   counted (`pipeline_frames_dropped_total{reason="output_overflow"}`).
//! - Playout hands frames to the [`AudioReceiver`] paced in real time, at most
//!   [`PLAYOUT_LEAD`] ahead; if the application does not read them and the
//!   channel is full, frames are dropped and counted the same way.
//! - Events go to a broadcast ring of [`EVENT_CAPACITY`]; a subscriber that
//!   falls behind loses the oldest (counted as `event_overflow`).
//!
//! # Barge-in
//!
//! User speech while a reply is being produced or played cancels it at once:
//! the agent/TTS future is dropped, the playout queue is cleared, frames
//! already handed to the receiver are flushed, the S2S model is told to stop,
//! and [`SessionEvent::Interrupted`] is emitted.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument;

use crate::agent::{Agent, AgentTurn};
use crate::audio::{AudioConverter, AudioFormat, AudioFrame};
use crate::error::{BackendError, ErrorCode, Result};
use crate::hooks::AudioProcessor;
use crate::metrics::{DropReason, LatencyStage, Metrics};
use crate::pipeline::events::{SessionEvent, SessionEvents, TurnLatency};
use crate::pipeline::{
    INTERNAL_FORMAT, S2sEvent, S2sStream, SttEvent, SttStream, TextToSpeech, TurnDetector,
    TurnSignal, Vad, VadDecision,
};
use crate::session::{AudioReceiver, AudioSender, PipelineState, audio_channel};

/// How far ahead of real time reply audio is handed to the receiver.
pub const PLAYOUT_LEAD: Duration = Duration::from_millis(60);
/// Events kept for a subscriber that falls behind.
pub const EVENT_CAPACITY: usize = 256;
/// Reply audio queued for playout at most.
pub const MAX_REPLY_AUDIO: Duration = Duration::from_secs(60);
/// Audio kept from before speech onset.
pub const PRE_ROLL: Duration = Duration::from_millis(200);
/// Frames the output channel holds (about a second of 20 ms frames).
const OUTPUT_CHANNEL_FRAMES: usize = 64;

/// Everything a session's engine is made of, resolved from config by the runtime.
pub struct EngineParts {
    /// The session's id, for events and spans.
    pub session_id: String,
    /// The session's user.
    pub user_id: String,
    /// Format of audio given to `process_audio` (converted to the internal format).
    pub input_format: AudioFormat,
    /// Format of audio handed to the receiver.
    pub output_format: AudioFormat,
    /// Processors in run order.
    pub processors: Vec<Box<dyn AudioProcessor>>,
    /// Voice activity detection.
    pub vad: Box<dyn Vad>,
    /// Turn detection.
    pub turn: Box<dyn TurnDetector>,
    /// Speech recognition: the stream and its events (stt_tts pipelines).
    pub stt: Option<(Box<dyn SttStream>, mpsc::Receiver<SttEvent>)>,
    /// Speech-to-speech: the stream and its events (s2s pipelines).
    pub s2s: Option<(Box<dyn S2sStream>, mpsc::Receiver<S2sEvent>)>,
    /// Speech synthesis for agent replies.
    pub tts: Option<Arc<dyn TextToSpeech>>,
    /// The application's agent, if set up front.
    pub agent: Option<Arc<dyn Agent>>,
    /// Where counts and latencies go.
    pub metrics: Arc<Metrics>,
    /// How long the agent may take to answer a turn.
    pub agent_timeout: Duration,
}

enum Control {
    TurnEnded {
        turn: u64,
        endpointing: Duration,
    },
    Interrupt {
        turn: u64,
    },
    Text(String),
    Stop {
        deadline: Instant,
        done: oneshot::Sender<()>,
    },
}

/// The input path's state, behind the session's lock.
struct Input {
    converter: Option<(AudioFormat, AudioConverter)>,
    processors: Vec<Box<dyn AudioProcessor>>,
    vad: Box<dyn Vad>,
    turn: Box<dyn TurnDetector>,
    stt: Option<Box<dyn SttStream>>,
    s2s: Option<Box<dyn S2sStream>>,
    in_speech: bool,
    silence: Duration,
    pre_roll: VecDeque<AudioFrame>,
    pre_roll_len: Duration,
}

struct Shared {
    session_id: String,
    user_id: String,
    state: AtomicU8,
    events: broadcast::Sender<SessionEvent>,
    control: mpsc::UnboundedSender<Control>,
    output: AudioSender,
    output_format: AudioFormat,
    agent: RwLock<Option<Arc<dyn Agent>>>,
    metrics: Arc<Metrics>,
    agent_timeout: Duration,
    /// Turns so far, spoken or sent as text.
    turns: AtomicU64,
    /// A reply (agent, TTS or S2S audio) is being produced or played.
    replying: AtomicBool,
    accepting: AtomicBool,
}

/// One session's pipeline.
pub struct Engine {
    shared: Arc<Shared>,
    input: Mutex<Input>,
    receiver: Mutex<Option<AudioReceiver>>,
    task: Mutex<Option<TaskParts>>,
}

struct TaskParts {
    control: mpsc::UnboundedReceiver<Control>,
    stt_events: Option<mpsc::Receiver<SttEvent>>,
    s2s_events: Option<mpsc::Receiver<S2sEvent>>,
    tts: Option<Arc<dyn TextToSpeech>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("session_id", &self.shared.session_id)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

fn state_from(v: u8) -> PipelineState {
    match v {
        1 => PipelineState::Listening,
        2 => PipelineState::Processing,
        3 => PipelineState::Speaking,
        4 => PipelineState::Error,
        _ => PipelineState::Idle,
    }
}

fn state_code(s: PipelineState) -> u8 {
    match s {
        PipelineState::Idle => 0,
        PipelineState::Listening => 1,
        PipelineState::Processing => 2,
        PipelineState::Speaking => 3,
        PipelineState::Error => 4,
    }
}

impl Shared {
    fn emit(&self, event: SessionEvent) {
        // No subscriber is fine: events are not kept for later.
        let _ = self.events.send(event);
    }

    fn set_state(&self, to: PipelineState) {
        let from = state_from(self.state.swap(state_code(to), Ordering::AcqRel));
        if from != to {
            self.emit(SessionEvent::State { from, to });
        }
    }

    fn state(&self) -> PipelineState {
        state_from(self.state.load(Ordering::Acquire))
    }
}

impl Engine {
    /// Builds a session's engine. Nothing runs until [`Engine::start`].
    pub fn new(parts: EngineParts) -> Result<Engine> {
        parts.input_format.validate()?;
        parts.output_format.validate()?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (output, receiver) = audio_channel(OUTPUT_CHANNEL_FRAMES);
        let (stt, stt_events) = match parts.stt {
            Some((s, rx)) => (Some(s), Some(rx)),
            None => (None, None),
        };
        let (s2s, s2s_events) = match parts.s2s {
            Some((s, rx)) => (Some(s), Some(rx)),
            None => (None, None),
        };
        let shared = Arc::new(Shared {
            session_id: parts.session_id,
            user_id: parts.user_id,
            state: AtomicU8::new(state_code(PipelineState::Idle)),
            events,
            control: control_tx,
            output,
            output_format: parts.output_format,
            agent: RwLock::new(parts.agent),
            metrics: parts.metrics,
            agent_timeout: parts.agent_timeout,
            turns: AtomicU64::new(0),
            replying: AtomicBool::new(false),
            accepting: AtomicBool::new(false),
        });
        Ok(Engine {
            shared,
            input: Mutex::new(Input {
                converter: None,
                processors: parts.processors,
                vad: parts.vad,
                turn: parts.turn,
                stt,
                s2s,
                in_speech: false,
                silence: Duration::ZERO,
                pre_roll: VecDeque::new(),
                pre_roll_len: Duration::ZERO,
            }),
            receiver: Mutex::new(Some(receiver)),
            task: Mutex::new(Some(TaskParts {
                control: control_rx,
                stt_events,
                s2s_events,
                tts: parts.tts,
            })),
        })
    }

    /// Starts the session's task; the session listens from now on. Must be
    /// called inside a tokio runtime. Starting twice is an error.
    pub fn start(&self) -> Result<()> {
        let parts = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| {
                BackendError::new(
                    "session.start",
                    ErrorCode::PipelineError,
                    "the session was already started (a stopped session cannot restart)",
                )
            })?;
        let shared = self.shared.clone();
        shared.accepting.store(true, Ordering::Release);
        shared.set_state(PipelineState::Listening);
        let span = tracing::info_span!("session", session_id = %shared.session_id);
        tokio::spawn(run(shared, parts).instrument(span));
        Ok(())
    }

    /// The pipeline's state.
    pub fn state(&self) -> PipelineState {
        self.shared.state()
    }

    /// A new subscription to the session's events.
    pub fn subscribe(&self) -> SessionEvents {
        SessionEvents::new(
            self.shared.events.subscribe(),
            Some(self.shared.metrics.clone()),
        )
    }

    /// Takes the session's output audio stream (once).
    pub fn take_receiver(&self) -> Result<AudioReceiver> {
        self.receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| {
                BackendError::new(
                    "session.receive_audio",
                    ErrorCode::PipelineError,
                    "the session's audio stream was already taken; keep the first receiver",
                )
            })
    }

    /// Sets the agent answering each turn.
    pub fn set_agent(&self, agent: Arc<dyn Agent>) {
        *self
            .shared
            .agent
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(agent);
    }

    fn check_accepting(&self, op: &'static str) -> Result<()> {
        if self.shared.accepting.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(BackendError::new(
                op,
                ErrorCode::PipelineError,
                match self.state() {
                    PipelineState::Idle => "the session is not started",
                    _ => "the session is stopping",
                },
            ))
        }
    }

    /// Runs one frame of user audio through the input path.
    pub fn process_audio(&self, frame: AudioFrame) -> Result<()> {
        const OP: &str = "session.process_audio";
        self.check_accepting(OP)?;
        self.shared.metrics.bytes_in(frame.data().len() as u64);
        let mut input = self.input.lock().unwrap_or_else(PoisonError::into_inner);
        let input = &mut *input;
        let frame = if frame.format() == INTERNAL_FORMAT {
            frame
        } else {
            let format = frame.format();
            let converter = match &mut input.converter {
                Some((f, c)) if *f == format => c,
                slot => {
                    let c =
                        AudioConverter::new(format, INTERNAL_FORMAT).map_err(|e| e.with_op(OP))?;
                    &mut slot.insert((format, c)).1
                }
            };
            match converter.convert(&frame).map_err(|e| {
                self.shared.metrics.dropped(DropReason::InvalidAudio, 1);
                e.with_op(OP)
            })? {
                Some(f) => f,
                None => return Ok(()),
            }
        };
        let mut frame = frame;
        for p in input.processors.iter_mut() {
            frame = match p.process(frame) {
                Ok(f) => f,
                Err(e) => {
                    self.shared.metrics.dropped(DropReason::InvalidAudio, 1);
                    let e = e.with_op(OP);
                    self.shared.emit(SessionEvent::Error {
                        code: e.code,
                        message: format!("processor {:?}: {}", p.name(), e.message),
                    });
                    return Err(e);
                }
            };
        }
        let decision: VadDecision = input.vad.process(&frame);
        let duration = frame.duration();
        if decision.speech {
            input.silence = Duration::ZERO;
        } else {
            input.silence += duration;
        }
        let signal = input.turn.update(&decision, duration);
        match signal {
            TurnSignal::SpeechStarted => {
                input.in_speech = true;
                self.shared.emit(SessionEvent::SpeechStarted);
                if self.shared.replying.load(Ordering::Acquire) {
                    self.barge_in(input);
                }
                // Hand over the pre-roll so recognition hears the onset.
                let pre: Vec<AudioFrame> = input.pre_roll.drain(..).collect();
                input.pre_roll_len = Duration::ZERO;
                for f in &pre {
                    self.feed(input, f)?;
                }
                self.feed(input, &frame)?;
            }
            TurnSignal::TurnEnded if input.in_speech => {
                self.feed(input, &frame)?;
                input.in_speech = false;
                let turn = self.shared.turns.fetch_add(1, Ordering::AcqRel) + 1;
                // The session task must know of the turn before any reply to it
                // can arrive: mark it and queue the control message first.
                self.shared.replying.store(true, Ordering::Release);
                self.shared.metrics.turn();
                self.shared.emit(SessionEvent::TurnEnded { turn });
                let _ = self.shared.control.send(Control::TurnEnded {
                    turn,
                    endpointing: input.silence,
                });
                input.turn.reset();
                if let Some(stt) = input.stt.as_mut() {
                    stt.end_turn().map_err(|e| e.with_op(OP))?;
                }
                if let Some(s2s) = input.s2s.as_mut() {
                    s2s.end_turn().map_err(|e| e.with_op(OP))?;
                }
            }
            _ if input.in_speech => self.feed(input, &frame)?,
            _ => {
                input.pre_roll_len += duration;
                input.pre_roll.push_back(frame);
                while input.pre_roll_len > PRE_ROLL {
                    match input.pre_roll.pop_front() {
                        Some(old) => input.pre_roll_len -= old.duration(),
                        None => break,
                    }
                }
            }
        }
        Ok(())
    }

    fn feed(&self, input: &mut Input, frame: &AudioFrame) -> Result<()> {
        if let Some(stt) = input.stt.as_mut() {
            stt.push_audio(frame)
                .map_err(|e| e.with_op("session.process_audio"))?;
        }
        if let Some(s2s) = input.s2s.as_mut() {
            s2s.push_audio(frame)
                .map_err(|e| e.with_op("session.process_audio"))?;
        }
        Ok(())
    }

    fn barge_in(&self, input: &mut Input) {
        // Flush at once, from here: the session task also drops its queue.
        self.shared.output.flush();
        if let Some(s2s) = input.s2s.as_mut() {
            s2s.interrupt();
        }
        self.shared.replying.store(false, Ordering::Release);
        let turn = self.shared.turns.load(Ordering::Acquire);
        let _ = self.shared.control.send(Control::Interrupt { turn });
    }

    /// Sends audio straight to the user, bypassing the agent.
    pub async fn send_audio(&self, frame: AudioFrame) -> Result<()> {
        self.check_accepting("session.send_audio")?;
        let frame = to_format(&frame, self.shared.output_format)
            .map_err(|e| e.with_op("session.send_audio"))?;
        self.shared.metrics.bytes_out(frame.data().len() as u64);
        self.shared.output.send(frame).await.map_err(|_| {
            BackendError::new(
                "session.send_audio",
                ErrorCode::PipelineError,
                "the session's audio receiver is gone",
            )
        })
    }

    /// Treats `text` as the user's final transcript of a new turn.
    pub fn send_text(&self, text: &str) -> Result<()> {
        self.check_accepting("session.send_text")?;
        if self.shared.replying.load(Ordering::Acquire) {
            let mut input = self.input.lock().unwrap_or_else(PoisonError::into_inner);
            self.barge_in(&mut input);
        }
        self.shared.replying.store(true, Ordering::Release);
        let _ = self.shared.control.send(Control::Text(text.to_owned()));
        Ok(())
    }

    /// Stops: refuses new input, lets a reply in flight finish within
    /// `deadline`, then closes the session's task.
    pub async fn stop(&self, deadline: Duration) -> Result<()> {
        if !self.shared.accepting.swap(false, Ordering::AcqRel) {
            if self
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some()
            {
                // Never started: nothing runs.
                self.shared.set_state(PipelineState::Idle);
                self.shared.emit(SessionEvent::Closed);
            }
            return Ok(());
        }
        let (done, wait) = oneshot::channel();
        let _ = self.shared.control.send(Control::Stop {
            deadline: Instant::now() + deadline,
            done,
        });
        // The task ends by the deadline; a little slack for the final events.
        match tokio::time::timeout(deadline + Duration::from_secs(1), wait).await {
            Ok(_) => Ok(()),
            Err(_) => Err(BackendError::new(
                "session.stop",
                ErrorCode::Timeout,
                format!("the session did not stop within {deadline:?}"),
            )),
        }
    }
}

fn to_format(frame: &AudioFrame, to: AudioFormat) -> Result<AudioFrame> {
    if frame.format() == to {
        return Ok(frame.clone());
    }
    if frame.format().sample_rate == to.sample_rate {
        return crate::audio::convert_frame(frame, to);
    }
    let mut c = AudioConverter::new(frame.format(), to)?;
    let head = c.convert(frame)?;
    let tail = c.flush()?;
    let mut data = Vec::new();
    for f in head.iter().chain(tail.iter()) {
        data.extend_from_slice(f.data());
    }
    AudioFrame::new(to, data)
}

/// What the session task knows about the turn being answered.
#[derive(Default)]
struct TurnClock {
    turn: u64,
    ended_at: Option<Instant>,
    endpointing: Duration,
    stt: Option<Duration>,
    agent: Option<Duration>,
    tts_started: Option<Instant>,
    tts_first_audio: Option<Duration>,
    first_audio_sent: bool,
}

enum ReplyMsg {
    AgentText(String, Duration),
    TtsStarted,
    Audio(AudioFrame),
}

type ReplyFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

struct Playout {
    pending: VecDeque<AudioFrame>,
    pending_len: Duration,
    /// When the audio handed out so far finishes playing.
    play_end: Instant,
    converter: Option<AudioConverter>,
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn run_opt(fut: &mut Option<ReplyFuture>) -> Result<()> {
    match fut {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn run(shared: Arc<Shared>, parts: TaskParts) {
    let TaskParts {
        mut control,
        mut stt_events,
        mut s2s_events,
        tts,
    } = parts;
    let (reply_tx, mut reply_rx) = mpsc::channel::<ReplyMsg>(32);
    let mut reply: Option<ReplyFuture> = None;
    let mut reply_done = true;
    let mut clock = TurnClock::default();
    let mut playout = Playout {
        pending: VecDeque::new(),
        pending_len: Duration::ZERO,
        play_end: Instant::now(),
        converter: None,
    };
    let mut stopping: Option<(Instant, oneshot::Sender<()>)> = None;

    loop {
        let now = Instant::now();
        let release_at = (!playout.pending.is_empty())
            .then(|| playout.play_end.checked_sub(PLAYOUT_LEAD).unwrap_or(now));
        let speaking = shared.state() == PipelineState::Speaking;
        let idle_at = (speaking && playout.pending.is_empty() && reply_done && reply.is_none())
            .then_some(playout.play_end);
        let stop_at = stopping.as_ref().map(|(d, _)| *d);

        tokio::select! {
            biased;
            msg = control.recv() => match msg {
                Some(Control::TurnEnded { turn, endpointing }) => {
                    clock = TurnClock {
                        turn,
                        ended_at: Some(Instant::now()),
                        endpointing,
                        ..TurnClock::default()
                    };
                    reply_done = false;
                    shared.set_state(PipelineState::Processing);
                }
                Some(Control::Interrupt { turn }) => {
                    reply = None;
                    while reply_rx.try_recv().is_ok() {}
                    // Reply audio the S2S model had already queued is part of the cut reply.
                    if let Some(rx) = s2s_events.as_mut() {
                        while let Ok(ev) = rx.try_recv() {
                            match ev {
                                S2sEvent::UserTranscript { text, is_final } => {
                                    shared.emit(SessionEvent::UserTranscript { text, is_final })
                                }
                                S2sEvent::AgentText(text) => shared.emit(SessionEvent::AgentText { text }),
                                S2sEvent::Audio(_) | S2sEvent::ReplyDone => {}
                            }
                        }
                    }
                    playout.pending.clear();
                    playout.pending_len = Duration::ZERO;
                    playout.play_end = Instant::now();
                    reply_done = true;
                    shared.metrics.interrupted();
                    shared.emit(SessionEvent::Interrupted { turn });
                    shared.set_state(PipelineState::Listening);
                }
                Some(Control::Text(text)) => {
                    clock = TurnClock {
                        turn: shared.turns.fetch_add(1, Ordering::AcqRel) + 1,
                        ended_at: Some(Instant::now()),
                        ..TurnClock::default()
                    };
                    shared.metrics.turn();
                    shared.emit(SessionEvent::UserTranscript { text: text.clone(), is_final: true });
                    shared.set_state(PipelineState::Processing);
                    reply_done = false;
                    reply = start_reply(&shared, &tts, &reply_tx, clock.turn, text);
                    if reply.is_none() {
                        reply_done = true;
                    }
                }
                Some(Control::Stop { deadline, done }) => {
                    stopping = Some((deadline, done));
                }
                None => break,
            },
            ev = recv_opt(&mut stt_events) => match ev {
                Some(SttEvent::Partial(text)) => {
                    shared.emit(SessionEvent::UserTranscript { text, is_final: false });
                }
                Some(SttEvent::Final(text)) => {
                    if let Some(t) = clock.ended_at {
                        clock.stt = Some(t.elapsed());
                        shared.metrics.turn_latency(LatencyStage::Stt, t.elapsed());
                    }
                    shared.emit(SessionEvent::UserTranscript { text: text.clone(), is_final: true });
                    if text.trim().is_empty() {
                        // Nothing was recognised: no turn to answer.
                        shared.replying.store(false, Ordering::Release);
                        reply_done = true;
                        shared.set_state(PipelineState::Listening);
                    } else if shared.replying.load(Ordering::Acquire) {
                        reply = start_reply(&shared, &tts, &reply_tx, clock.turn, text);
                        if reply.is_none() {
                            reply_done = true;
                        }
                    }
                }
                None => stt_events = None,
            },
            ev = recv_opt(&mut s2s_events) => match ev {
                Some(S2sEvent::UserTranscript { text, is_final }) => {
                    shared.emit(SessionEvent::UserTranscript { text, is_final });
                }
                Some(S2sEvent::AgentText(text)) => shared.emit(SessionEvent::AgentText { text }),
                Some(S2sEvent::Audio(frame)) => {
                    if shared.replying.load(Ordering::Acquire) {
                        enqueue(&shared, &mut playout, frame);
                    }
                }
                Some(S2sEvent::ReplyDone) => {
                    reply_done = true;
                    if !clock.first_audio_sent && playout.pending.is_empty() {
                        // Nothing to say: back to listening.
                        shared.replying.store(false, Ordering::Release);
                        if shared.state() == PipelineState::Processing {
                            shared.set_state(PipelineState::Listening);
                        }
                    }
                }
                None => s2s_events = None,
            },
            result = run_opt(&mut reply) => {
                reply = None;
                reply_done = true;
                // What the reply sent before finishing is handled before anything else.
                while let Ok(msg) = reply_rx.try_recv() {
                    on_reply_msg(&shared, &mut playout, &mut clock, msg);
                }
                if let Err(e) = result {
                    shared.emit(SessionEvent::Error { code: e.code, message: e.message.clone() });
                    tracing::warn!(code = %e.code, "turn failed: {}", e.message);
                }
            },
            Some(msg) = reply_rx.recv() => on_reply_msg(&shared, &mut playout, &mut clock, msg),
            _ = sleep_until_opt(release_at) => {
                release(&shared, &mut playout, &mut clock);
            },
            _ = sleep_until_opt(idle_at) => {
                shared.replying.store(false, Ordering::Release);
                shared.set_state(PipelineState::Listening);
            },
            _ = sleep_until_opt(stop_at) => break,
        }

        let in_flight = reply.is_some()
            || !playout.pending.is_empty()
            || matches!(
                shared.state(),
                PipelineState::Processing | PipelineState::Speaking
            );
        if stopping.is_some() && !in_flight {
            break;
        }
    }
    drop(reply);
    shared.set_state(PipelineState::Idle);
    shared.emit(SessionEvent::Closed);
    if let Some((_, done)) = stopping {
        let _ = done.send(());
    }
}

fn on_reply_msg(shared: &Shared, playout: &mut Playout, clock: &mut TurnClock, msg: ReplyMsg) {
    match msg {
        ReplyMsg::AgentText(text, took) => {
            clock.agent = Some(took);
            shared.metrics.turn_latency(LatencyStage::Agent, took);
            shared.emit(SessionEvent::AgentText { text });
        }
        ReplyMsg::TtsStarted => clock.tts_started = Some(Instant::now()),
        ReplyMsg::Audio(frame) => {
            if let (None, Some(t)) = (clock.tts_first_audio, clock.tts_started) {
                clock.tts_first_audio = Some(t.elapsed());
                shared.metrics.turn_latency(LatencyStage::Tts, t.elapsed());
            }
            enqueue(shared, playout, frame);
        }
    }
}

fn enqueue(shared: &Shared, playout: &mut Playout, frame: AudioFrame) {
    if playout.pending_len >= MAX_REPLY_AUDIO {
        shared.metrics.dropped(DropReason::OutputOverflow, 1);
        return;
    }
    if playout.pending.is_empty() && playout.play_end < Instant::now() {
        playout.play_end = Instant::now();
    }
    playout.pending_len += frame.duration();
    playout.pending.push_back(frame);
}

fn release(shared: &Shared, playout: &mut Playout, clock: &mut TurnClock) {
    let Some(frame) = playout.pending.pop_front() else {
        return;
    };
    playout.pending_len = playout.pending_len.saturating_sub(frame.duration());
    let now = Instant::now();
    playout.play_end = playout.play_end.max(now) + frame.duration();
    let out = if frame.format() == shared.output_format {
        Some(frame)
    } else {
        let converter = match &mut playout.converter {
            Some(c) => c,
            slot => match AudioConverter::new(frame.format(), shared.output_format) {
                Ok(c) => slot.insert(c),
                Err(e) => {
                    shared.emit(SessionEvent::Error {
                        code: e.code,
                        message: e.message,
                    });
                    return;
                }
            },
        };
        match converter.convert(&frame) {
            Ok(f) => f,
            Err(e) => {
                shared.metrics.dropped(DropReason::InvalidAudio, 1);
                shared.emit(SessionEvent::Error {
                    code: e.code,
                    message: e.message,
                });
                None
            }
        }
    };
    if let Some(out) = out {
        let bytes = out.data().len() as u64;
        match shared.output.try_send(out) {
            Ok(()) => shared.metrics.bytes_out(bytes),
            Err(_) => shared.metrics.dropped(DropReason::OutputOverflow, 1),
        }
    }
    if !clock.first_audio_sent {
        clock.first_audio_sent = true;
        shared.set_state(PipelineState::Speaking);
        if let Some(t) = clock.ended_at {
            let first_audio = t.elapsed();
            shared
                .metrics
                .turn_latency(LatencyStage::FirstAudio, first_audio);
            shared.emit(SessionEvent::Latency(TurnLatency {
                turn: clock.turn,
                endpointing: clock.endpointing,
                stt: clock.stt,
                agent: clock.agent,
                tts_first_audio: clock.tts_first_audio,
                first_audio,
            }));
        }
    }
}

/// The agent then TTS for one turn, as a future the session task can drop.
fn start_reply(
    shared: &Arc<Shared>,
    tts: &Option<Arc<dyn TextToSpeech>>,
    reply_tx: &mpsc::Sender<ReplyMsg>,
    turn: u64,
    transcript: String,
) -> Option<ReplyFuture> {
    let agent = shared
        .agent
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let Some(agent) = agent else {
        shared.emit(SessionEvent::Error {
            code: ErrorCode::AgentError,
            message:
                "no agent is set for this session: call set_agent or use SessionConfig::with_agent"
                    .into(),
        });
        shared.replying.store(false, Ordering::Release);
        shared.set_state(PipelineState::Listening);
        return None;
    };
    let tts = tts.clone();
    let tx = reply_tx.clone();
    let turn_input = AgentTurn::new(
        shared.session_id.clone(),
        shared.user_id.clone(),
        transcript,
        turn,
    );
    let shared = shared.clone();
    let fut = async move {
        let started = Instant::now();
        let limit = shared.agent_timeout;
        let answer = agent
            .respond(turn_input)
            .instrument(tracing::info_span!("agent", turn));
        let reply = match tokio::time::timeout(limit, answer).await {
            Ok(r) => r.map_err(|mut e| {
                e.code = ErrorCode::AgentError;
                e
            })?,
            Err(_) => {
                shared.replying.store(false, Ordering::Release);
                shared.set_state(PipelineState::Listening);
                return Err(BackendError::new(
                    "session.agent",
                    ErrorCode::Timeout,
                    format!(
                        "the agent did not answer turn {turn} within timeout = {}",
                        humantime::format_duration(limit)
                    ),
                ));
            }
        };
        let _ = tx
            .send(ReplyMsg::AgentText(reply.text.clone(), started.elapsed()))
            .await;
        if reply.text.is_empty() {
            shared.replying.store(false, Ordering::Release);
            shared.set_state(PipelineState::Listening);
            return Ok(());
        }
        let Some(tts) = tts else {
            // No synthesis configured: the reply is text only.
            shared.replying.store(false, Ordering::Release);
            shared.set_state(PipelineState::Listening);
            return Ok(());
        };
        let _ = tx.send(ReplyMsg::TtsStarted).await;
        let (ftx, mut frx) = mpsc::channel::<AudioFrame>(16);
        let synth = async move {
            let r = tts.synthesize(&reply.text, INTERNAL_FORMAT, &ftx).await;
            drop(ftx);
            r
        };
        let forward = async {
            while let Some(frame) = frx.recv().await {
                if tx.send(ReplyMsg::Audio(frame)).await.is_err() {
                    break;
                }
            }
        };
        let (r, ()) = tokio::join!(synth.instrument(tracing::info_span!("tts", turn)), forward);
        r.map_err(|mut e| {
            if e.code != ErrorCode::Timeout {
                e.code = ErrorCode::PipelineError;
            }
            e
        })
    };
    Some(Box::pin(fut))
}
