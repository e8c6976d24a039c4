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
//!   `max_reply_audio` (60 s); a frame that would take it beyond is dropped
//!   and counted (`pipeline_frames_dropped_total{reason="output_overflow"}`).
//! - Playout hands frames to the [`AudioReceiver`] paced in real time, at most
//!   [`PLAYOUT_LEAD`] ahead: once what was handed out has no more than
//!   [`PLAYOUT_REFILL`] left to play, it is topped up to the lead in one go
//!   (three 20 ms frames per wake-up, not one). If the application does not
//!   read them and the channel is full, frames are dropped and counted the
//!   same way.
//! - Events go to a broadcast ring of [`EVENT_CAPACITY`] (64) events, shared
//!   by every subscriber: a subscriber more than 64 events behind loses the
//!   oldest ones (counted as `event_overflow`, and in [`SessionEvents::lost`]).
//!   A turn makes about ten events (speech started, turn ended, state changes,
//!   transcript, agent text, latency), so that is several turns of slack; the
//!   ring costs about 7 KiB per session.
//!
//! # The session task
//!
//! One tokio task per session waits on: control messages from the input
//! path, the STT or S2S component's events, the agent/TTS reply in flight
//! (and its messages, while there is one), and a single timer. Each channel
//! and the reply are polled with a waker of their own that marks them before
//! waking the task, so a wake-up polls only the inputs that have something
//! new, in priority order: control messages (such as a barge-in) always go
//! first, the timer last. The timer is set to the nearest deadline (the next
//! reply frame's release, the end of playout, the stop deadline) and moved
//! only when that deadline changes; when it fires, the reply audio handed
//! out is topped up to the lead at once. A wake-up for component events handles up to 64
//! that are ready, stopping early when a control message is waiting.
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
use std::task::{Poll, Waker};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::agent::{Agent, AgentTurn};
use crate::audio::{AudioConverter, AudioFormat, AudioFrame, FormatFollower};
use crate::backend::ConnectionState;
use crate::error::{BackendError, ErrorCode, Result};
use crate::hooks::AudioProcessor;
use crate::metrics::{DropReason, LatencyStage, Metrics, Op};
use crate::pipeline::events::{SessionEvent, SessionEvents, TurnLatency};
use crate::pipeline::{
    INTERNAL_FORMAT, S2sEvent, S2sStream, SttEvent, SttStream, TextToSpeech, TurnDetector,
    TurnSignal, Vad, VadDecision,
};
use crate::session::{AudioReceiver, AudioSender, PipelineState, audio_channel};
use crate::wake::InputMarks;

/// How far ahead of real time reply audio is handed to the receiver.
pub const PLAYOUT_LEAD: Duration = Duration::from_millis(80);

/// Reply audio is topped up (to [`PLAYOUT_LEAD`]) once what was handed to the
/// receiver has this much or less left to play. The gap between the two is
/// how much is handed out per wake-up of the session task; what is left is
/// the slack for that wake-up being late.
pub const PLAYOUT_REFILL: Duration = Duration::from_millis(20);
/// Events kept for a subscriber that falls behind; see the
/// [module documentation](self#buffers-and-overflow).
pub const EVENT_CAPACITY: usize = 64;
/// Reply audio queued for playout at most.
pub const MAX_REPLY_AUDIO: Duration = Duration::from_secs(60);
/// Audio kept from before speech onset, on top of what the VAD and the turn
/// detector hear before they report it ([`Vad::lookback`],
/// [`TurnDetector::lookback`]).
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
    /// `s2s` is a remote service that hears every frame and ends the user's
    /// turns itself (a final transcript from it ends a turn). Local VAD and
    /// turn detection still run, for barge-in.
    pub remote_turns: bool,
    /// `s2s` is a session's link to its provider's service
    /// ([`crate::runtime::Link`]), connected when the engine is made. The
    /// engine then keeps the link's state from its
    /// [`S2sEvent::Connection`] events, and each new subscriber hears that
    /// state first ([`Engine::subscribe`]).
    pub link: bool,
    /// Converters made beforehand, used when their formats match: from
    /// `input_format` to the internal format, and from the internal format to
    /// `output_format`. A resampler between unrelated rates (44.1 kHz and
    /// 16 kHz) takes milliseconds to make, so the runtime makes them on a
    /// blocking thread rather than on the first frame. `None`: made when first
    /// needed.
    pub converters: PreparedConverters,
}

/// Converters for [`EngineParts::converters`].
#[derive(Debug, Default)]
pub struct PreparedConverters {
    /// From the session's input format to the internal format.
    pub input: Option<AudioConverter>,
    /// From the internal format to the session's output format.
    pub output: Option<AudioConverter>,
}

impl PreparedConverters {
    /// Makes the converters a session with these formats needs (none for the
    /// internal format). A format that cannot be converted gets none here; its
    /// first frame reports the error.
    pub fn for_formats(input: AudioFormat, output: AudioFormat) -> Self {
        let make = |from: AudioFormat, to: AudioFormat| {
            (from != to)
                .then(|| AudioConverter::new(from, to).ok())
                .flatten()
        };
        PreparedConverters {
            input: make(input, INTERNAL_FORMAT),
            output: make(INTERNAL_FORMAT, output),
        }
    }

    /// Whether making them takes long enough to do off the async threads:
    /// when a rate changes (a resampler's filter table is computed).
    pub fn costly(input: AudioFormat, output: AudioFormat) -> bool {
        input.sample_rate != INTERNAL_FORMAT.sample_rate
            || output.sample_rate != INTERNAL_FORMAT.sample_rate
    }
}

enum Control {
    TurnEnded {
        turn: u64,
        endpointing: Duration,
    },
    Interrupt {
        turn: u64,
    },
    /// The speech service refused to end turn `turn`: no transcript or
    /// reply will come for it.
    TurnFailed {
        turn: u64,
    },
    Text(String),
    Stop {
        deadline: Instant,
        done: oneshot::Sender<()>,
    },
}

/// The input path's state, behind the session's lock.
///
/// Laid out in order (`repr(C)`), what every frame uses first, so a frame
/// touches as few cache lines as possible; the converter, rarely needed, is
/// boxed.
#[repr(C)]
struct Input {
    vad: Box<dyn Vad>,
    turn: Box<dyn TurnDetector>,
    s2s: Option<Box<dyn S2sStream>>,
    stt: Option<Box<dyn SttStream>>,
    processors: Vec<Box<dyn AudioProcessor>>,
    silence: Duration,
    pre_roll_len: Duration,
    /// How much audio `pre_roll` keeps: [`PRE_ROLL`] plus the VAD's and the
    /// turn detector's lookback.
    pre_roll_limit: Duration,
    pre_roll: VecDeque<AudioFrame>,
    in_speech: bool,
    remote_turns: bool,
    converter: FormatFollower,
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
    /// The S2S stream is a remote service that ends turns itself.
    remote_turns: bool,
    /// Set once the session has ended (its task finished, or it was stopped
    /// before it started), for every `stop` caller to wait on.
    finished: watch::Sender<bool>,
    /// The state of the session's link to its provider's service (`None`
    /// without one). Held while a [`SessionEvent::Connection`] is published
    /// and while a subscriber subscribes, so a new subscriber starts from
    /// the state as of its subscription and hears every change after it.
    link: Mutex<Option<ConnectionState>>,
    /// The latest partial transcript not yet shown to the turn detector
    /// (`hint_ready` says there is one, so a frame checks one flag).
    hint: Mutex<Option<String>>,
    hint_ready: AtomicBool,
}

impl Shared {
    /// Keeps `partial` for the turn detector, which sees it with the next frame.
    fn hint(&self, partial: &str) {
        let mut hint = self.hint.lock().unwrap_or_else(PoisonError::into_inner);
        *hint = Some(partial.to_owned());
        self.hint_ready.store(true, Ordering::Release);
    }

    /// The partial transcript kept since the last frame, if any.
    fn take_hint(&self) -> Option<String> {
        if !self.hint_ready.load(Ordering::Acquire) {
            return None;
        }
        let mut hint = self.hint.lock().unwrap_or_else(PoisonError::into_inner);
        self.hint_ready.store(false, Ordering::Release);
        hint.take()
    }
}

/// One session's pipeline.
///
/// Laid out in order (`repr(C)`): what `process_audio` uses first, so a frame
/// touches as few cache lines as possible (the session task's state is in
/// `shared`, which a frame reads only when a turn starts or ends).
#[repr(C)]
pub struct Engine {
    accepting: AtomicBool,
    metrics: Arc<Metrics>,
    input: Mutex<Input>,
    shared: Arc<Shared>,
    receiver: Mutex<Option<AudioReceiver>>,
    task: Mutex<Option<TaskParts>>,
    /// The converter `send_audio` used last, kept for the next call in the
    /// same format (a resampler's filter table takes milliseconds to make).
    send_converter: Mutex<Option<AudioConverter>>,
}

struct TaskParts {
    control: mpsc::UnboundedReceiver<Control>,
    stt_events: Option<mpsc::Receiver<SttEvent>>,
    s2s_events: Option<mpsc::Receiver<S2sEvent>>,
    tts: Option<Arc<dyn TextToSpeech>>,
    output_converter: Option<AudioConverter>,
}

impl Drop for Engine {
    /// An engine dropped while running (without [`Engine::stop`]) stops at
    /// once: its task would otherwise wait for input forever, holding the
    /// session's audio receiver open.
    fn drop(&mut self) {
        if self.accepting.swap(false, Ordering::AcqRel) {
            let (done, _) = oneshot::channel();
            let _ = self.shared.control.send(Control::Stop {
                deadline: Instant::now(),
                done,
            });
        }
    }
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

    /// Publishes the link's new state (kept for later subscribers when the
    /// session has a link).
    fn connection(&self, state: ConnectionState) {
        let mut link = self.link.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(current) = link.as_mut() {
            *current = state;
        }
        self.emit(SessionEvent::Connection { state });
    }

    /// The session has ended: back to idle, its link (if any) disconnected,
    /// the reply audio stream closed (the receiver hands out what it holds,
    /// then ends), [`SessionEvent::Closed`], and every `stop` caller told.
    /// Once only: later calls do nothing.
    fn finish(&self) {
        if *self.finished.borrow() {
            return;
        }
        self.set_state(PipelineState::Idle);
        let linked = self
            .link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|s| s != ConnectionState::Disconnected);
        if linked {
            // The link's events are no longer read: it closes.
            self.connection(ConnectionState::Disconnected);
        }
        self.output.close();
        self.emit(SessionEvent::Closed);
        self.finished.send_replace(true);
    }
}

/// Finishes the session ([`Shared::finish`]) when the session's task ends,
/// however it ends: had the task panicked, or had its runtime shut down, the
/// reply audio would otherwise never end and `stop` would wait in vain.
struct Finish(Arc<Shared>);

impl Drop for Finish {
    fn drop(&mut self) {
        self.0.finish();
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
            metrics: parts.metrics.clone(),
            agent_timeout: parts.agent_timeout,
            turns: AtomicU64::new(0),
            replying: AtomicBool::new(false),
            remote_turns: parts.remote_turns,
            finished: watch::Sender::new(false),
            link: Mutex::new(parts.link.then_some(ConnectionState::Connected)),
            hint: Mutex::new(None),
            hint_ready: AtomicBool::new(false),
        });
        let pre_roll_limit = PRE_ROLL + parts.vad.lookback() + parts.turn.lookback();
        Ok(Engine {
            accepting: AtomicBool::new(false),
            metrics: parts.metrics,
            input: Mutex::new(Input {
                vad: parts.vad,
                turn: parts.turn,
                s2s,
                stt,
                processors: parts.processors,
                silence: Duration::ZERO,
                pre_roll_len: Duration::ZERO,
                pre_roll_limit,
                pre_roll: VecDeque::new(),
                in_speech: false,
                remote_turns: parts.remote_turns,
                converter: FormatFollower::from(parts.converters.input),
            }),
            shared,
            receiver: Mutex::new(Some(receiver)),
            send_converter: Mutex::new(None),
            task: Mutex::new(Some(TaskParts {
                control: control_rx,
                stt_events,
                s2s_events,
                tts: parts.tts,
                output_converter: parts.converters.output,
            })),
        })
    }

    /// Whether the engine holds its input and its output converter (made
    /// beforehand or by a frame) for formats `input` and `output`.
    #[cfg(test)]
    pub(crate) fn holds_converters(&self, input: AudioFormat, output: AudioFormat) -> (bool, bool) {
        let input_held = self
            .input
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .converter
            .holds(input, INTERNAL_FORMAT);
        let output_held = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(|t| t.output_converter.as_ref())
            .is_some_and(|c| c.input_format() == INTERNAL_FORMAT && c.output_format() == output);
        (input_held, output_held)
    }

    /// Starts the session's task; the session listens from now on. Must be
    /// called inside a tokio runtime. Starting twice is an error.
    pub fn start(&self) -> Result<()> {
        // Taking the parts and accepting are one step under the lock, so a
        // `stop` sees either a session that never started or a running one.
        let parts = {
            let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
            let parts = task.take().ok_or_else(|| {
                BackendError::new(
                    "session.start",
                    ErrorCode::PipelineError,
                    "the session was already started (a stopped session cannot restart)",
                )
            })?;
            self.accepting.store(true, Ordering::Release);
            parts
        };
        let shared = self.shared.clone();
        shared.set_state(PipelineState::Listening);
        let span = tracing::info_span!("session", session_id = %shared.session_id);
        tokio::spawn(run(shared, parts).instrument(span));
        Ok(())
    }

    /// The pipeline's state.
    pub fn state(&self) -> PipelineState {
        self.shared.state()
    }

    /// A new subscription to the session's events. With a link, its first
    /// event is the link's state ([`SessionEvent::Connection`]) as of the
    /// subscription: a link connects when the session is created, before
    /// anyone could subscribe.
    pub fn subscribe(&self) -> SessionEvents {
        // Under the lock that publishing a change of the link takes: a change
        // is either in the state read here or among the events received.
        let link = self
            .shared
            .link
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let events = SessionEvents::new(
            self.shared.events.subscribe(),
            Some(self.shared.metrics.clone()),
        );
        match *link {
            Some(state) => events.starting_with(SessionEvent::Connection { state }),
            None => events,
        }
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
        if self.accepting.load(Ordering::Acquire) {
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

    /// The metrics this engine counts into (its backend's).
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Runs one frame of user audio through the input path.
    pub fn process_audio(&self, frame: AudioFrame) -> Result<()> {
        const OP: &str = "session.process_audio";
        self.check_accepting(OP)?;
        let mut input = self.input.lock().unwrap_or_else(PoisonError::into_inner);
        // Again under the lock `stop` takes to refuse input: a turn this frame
        // ends is queued before `stop`'s message, or not at all.
        self.check_accepting(OP)?;
        self.metrics.bytes_in(frame.data().len() as u64);
        let input = &mut *input;
        let frame = match input.converter.convert(frame, INTERNAL_FORMAT) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => {
                self.metrics.dropped(DropReason::InvalidAudio, 1);
                return Err(e.with_op(OP));
            }
        };
        let mut frame = frame;
        for p in input.processors.iter_mut() {
            let failed = match p.process(frame) {
                Ok(f) if f.format() == INTERNAL_FORMAT => {
                    frame = f;
                    continue;
                }
                Ok(f) => BackendError::new(
                    OP,
                    ErrorCode::PipelineError,
                    format!(
                        "processor {:?} returned {:?} audio; processors must return the \
                         pipeline's format, {:?}",
                        p.name(),
                        f.format(),
                        INTERNAL_FORMAT
                    ),
                ),
                Err(e) => BackendError::new(
                    OP,
                    ErrorCode::PipelineError,
                    format!("processor {:?}: {}", p.name(), e.message),
                )
                .with_source(e),
            };
            self.metrics.dropped(DropReason::InvalidAudio, 1);
            self.shared.emit(SessionEvent::Error {
                code: failed.code,
                message: failed.message.clone(),
            });
            return Err(failed);
        }
        let decision: VadDecision =
            tracing::trace_span!("vad").in_scope(|| input.vad.process(&frame));
        let duration = frame.duration();
        if decision.speech {
            input.silence = Duration::ZERO;
        } else {
            input.silence += duration;
        }
        // The latest partial transcript, for detectors that judge whether the
        // user sounds finished; only within a turn (a late partial of the
        // last one is dropped).
        if let Some(partial) = self.shared.take_hint()
            && input.in_speech
        {
            input.turn.hint_transcript(&partial);
        }
        let signal = tracing::trace_span!("turn_detection")
            .in_scope(|| input.turn.update(&decision, duration));
        if input.remote_turns {
            return self.remote_turn_input(input, frame, signal);
        }
        match signal {
            TurnSignal::SpeechStarted => {
                self.speech_started(input);
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
                    endpointing: input.turn.endpointing().unwrap_or(input.silence),
                });
                input.turn.reset();
                let mut ended = Ok(());
                if let Some(stt) = input.stt.as_mut() {
                    ended = stt.end_turn();
                }
                if let (Ok(()), Some(s2s)) = (&ended, input.s2s.as_mut()) {
                    ended = s2s.end_turn();
                }
                if let Err(e) = ended {
                    // Nothing will answer this turn: back to listening.
                    let _ = self.shared.control.send(Control::TurnFailed { turn });
                    return Err(e.with_op(OP));
                }
            }
            _ if input.in_speech => self.feed(input, &frame)?,
            _ => {
                input.pre_roll_len += duration;
                input.pre_roll.push_back(frame);
                while input.pre_roll_len > input.pre_roll_limit {
                    match input.pre_roll.pop_front() {
                        Some(old) => input.pre_roll_len -= old.duration(),
                        None => break,
                    }
                }
            }
        }
        Ok(())
    }

    /// The input path's end when a remote service ends turns: it hears every
    /// frame; locally, speech onsets still barge in on a reply.
    fn remote_turn_input(
        &self,
        input: &mut Input,
        frame: AudioFrame,
        signal: TurnSignal,
    ) -> Result<()> {
        match signal {
            TurnSignal::SpeechStarted => self.speech_started(input),
            TurnSignal::TurnEnded if input.in_speech => {
                input.in_speech = false;
                input.turn.reset();
            }
            _ => {}
        }
        self.feed(input, &frame)
    }

    /// The user started speaking: reported, and a reply being produced or
    /// played is cut.
    fn speech_started(&self, input: &mut Input) {
        input.in_speech = true;
        self.shared.emit(SessionEvent::SpeechStarted);
        if self.shared.replying.load(Ordering::Acquire) {
            self.barge_in(input);
        }
    }

    fn feed(&self, input: &mut Input, frame: &AudioFrame) -> Result<()> {
        if let Some(stt) = input.stt.as_mut() {
            tracing::trace_span!("stt")
                .in_scope(|| stt.push_audio(frame))
                .map_err(|e| e.with_op("session.process_audio"))?;
        }
        if let Some(s2s) = input.s2s.as_mut() {
            tracing::trace_span!("s2s")
                .in_scope(|| s2s.push_audio(frame))
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
        let frame = self
            .to_output_format(&frame)
            .map_err(|e| e.with_op("session.send_audio"))?;
        let bytes = frame.data().len() as u64;
        self.shared.output.send(frame).await.map_err(|_| {
            BackendError::new(
                "session.send_audio",
                ErrorCode::PipelineError,
                "the session's audio receiver is gone",
            )
        })?;
        self.shared.metrics.bytes_out(bytes);
        Ok(())
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

    /// Turns `true` once the session has ended (its task finished, or it
    /// was stopped before it started).
    pub fn ended(&self) -> watch::Receiver<bool> {
        self.shared.finished.subscribe()
    }

    /// Stops: refuses new input, lets a reply in flight finish within
    /// `deadline`, then closes the session's task.
    pub async fn stop(&self, deadline: Duration) -> Result<()> {
        let running = {
            let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
            // Under the input lock too: a frame being processed finishes first
            // (see `process_audio`).
            let accepting = {
                let _input = self.input.lock().unwrap_or_else(PoisonError::into_inner);
                self.accepting.swap(false, Ordering::AcqRel)
            };
            if accepting {
                true
            } else {
                if task.take().is_some() {
                    // Never started: nothing runs, and it cannot start any more.
                    self.shared.finish();
                }
                false
            }
        };
        // The task ends by the deadline; a little slack for the final events.
        let patience = deadline + Duration::from_secs(1);
        let ended = if running {
            let (done, wait) = oneshot::channel();
            let _ = self.shared.control.send(Control::Stop {
                deadline: Instant::now() + deadline,
                done,
            });
            tokio::time::timeout(patience, wait).await.is_ok()
        } else {
            // Stopping already (another caller asked first), or stopped:
            // wait for the end as that caller does.
            let mut finished = self.shared.finished.subscribe();
            tokio::time::timeout(patience, finished.wait_for(|&f| f))
                .await
                .is_ok()
        };
        if ended {
            Ok(())
        } else {
            Err(BackendError::new(
                "session.stop",
                ErrorCode::Timeout,
                format!("the session did not stop within {deadline:?}"),
            ))
        }
    }
}

impl Engine {
    /// `frame` in the session's output format, converted on its own (the
    /// resampler is flushed: each call is a whole piece of audio).
    fn to_output_format(&self, frame: &AudioFrame) -> Result<AudioFrame> {
        let to = self.shared.output_format;
        if frame.format() == to {
            return Ok(frame.clone());
        }
        if frame.format().sample_rate == to.sample_rate {
            return crate::audio::convert_frame(frame, to);
        }
        let mut kept = self
            .send_converter
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let c = match kept.as_mut() {
            Some(c) if c.input_format() == frame.format() && c.output_format() == to => c,
            _ => kept.insert(AudioConverter::new(frame.format(), to)?),
        };
        let head = c.convert(frame);
        // Flushed whatever happened: the next call starts a new stream.
        let tail = c.flush();
        match crate::audio::join(head?, tail?)? {
            Some(out) => Ok(out),
            None => AudioFrame::new(to, Vec::new()),
        }
    }
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
    /// The turn's `Latency` event is out (its first audio went to the user).
    latency_reported: bool,
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
    converter: FormatFollower,
}

/// The session task's inputs, one bit each in its [`Inputs`].
const IN_CONTROL: u8 = 1;
const IN_STT: u8 = 1 << 1;
const IN_S2S: u8 = 1 << 2;
const IN_REPLY: u8 = 1 << 3;
const IN_REPLY_MSG: u8 = 1 << 4;
const INPUTS: usize = 5;

/// The session task polls only the inputs that have something new: each (a
/// channel, the reply future) is polled with a waker of its own that marks
/// it, and polled again only once marked or while it keeps returning items
/// (see [`InputMarks`]).
type Inputs = InputMarks<INPUTS>;

/// What the session task woke for.
enum Woke {
    Control(Option<Control>),
    Stt(Option<SttEvent>),
    S2s(Option<S2sEvent>),
    Reply(Result<()>),
    ReplyMsg(ReplyMsg),
    Timer,
}

/// Events taken from a component's channel in one go, once the session task
/// is awake, before it looks at its other inputs again (a control message
/// waiting stops the batch early: it goes first, as it always has).
const EVENT_BATCH: usize = 64;

/// The session task's state, apart from the channels it waits on.
struct Task {
    shared: Arc<Shared>,
    tts: Option<Arc<dyn TextToSpeech>>,
    reply_tx: mpsc::Sender<ReplyMsg>,
    /// The agent/TTS reply in flight; only it sends on `reply_tx`.
    reply: Option<ReplyFuture>,
    /// Replies started so far (each new one is polled at once).
    replies: u64,
    reply_done: bool,
    clock: TurnClock,
    playout: Playout,
    stopping: Option<(Instant, oneshot::Sender<()>)>,
    /// A remote service's reply was cut: its audio still arriving is dropped
    /// until the service ends that reply or the user's next turn ends.
    cut: bool,
    /// The speech-to-text stream's final transcripts, matched to turns.
    finals: Finals,
}

/// Which final transcript belongs to which turn: each turn that ends asks the
/// STT stream for one, and they come in order.
#[derive(Default)]
struct Finals {
    /// Whether there is a speech-to-text stream.
    enabled: bool,
    /// Turns ended whose final transcript has not come yet.
    pending: u32,
    /// How many of the first `pending` belong to turns already over: cut by
    /// a barge-in (the user went on speaking), superseded by a text turn, or
    /// given up on. They are reported but not answered by themselves.
    stale: u32,
    /// Whether stale transcripts are carried into the next answered turn
    /// (after a barge-in: they are the start of what the user is saying).
    carry: bool,
    /// The carried transcripts.
    carried: String,
    /// When the final transcript of the last turn is due.
    due: Option<Instant>,
}

impl Finals {
    /// Every transcript still to come belongs to a turn that is over.
    fn supersede(&mut self, carry: bool) {
        self.stale = self.pending;
        self.carry = carry;
        if !carry {
            self.carried.clear();
        }
        self.due = None;
    }
}

impl Task {
    /// When queued reply audio is next due for release, if any: when what was
    /// handed out is down to [`PLAYOUT_REFILL`].
    fn release_at(&self) -> Option<Instant> {
        (!self.playout.pending.is_empty()).then(|| {
            self.playout
                .play_end
                .checked_sub(PLAYOUT_REFILL)
                .unwrap_or_else(Instant::now)
        })
    }

    /// Whether the next queued frame may go out at `now`: what was handed out
    /// plays for less than [`PLAYOUT_LEAD`] more.
    fn may_release(&self, now: Instant) -> bool {
        !self.playout.pending.is_empty() && self.playout.play_end < now + PLAYOUT_LEAD
    }

    /// When the reply being played ends and the session goes back to
    /// listening, once nothing more of it can come.
    fn idle_at(&self) -> Option<Instant> {
        (self.playout.pending.is_empty()
            && self.reply_done
            && self.reply.is_none()
            && self.shared.state() == PipelineState::Speaking)
            .then_some(self.playout.play_end)
    }

    /// The nearest of the task's deadlines: release, idle, the final
    /// transcript and stop.
    fn next_deadline(&self) -> Option<Instant> {
        let stop_at = self.stopping.as_ref().map(|(d, _)| *d);
        [self.release_at(), self.idle_at(), self.finals.due, stop_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// Starts the reply to `text`, first handling what a reply it replaces
    /// had sent (the reply channel holds only the current reply's messages).
    fn start_reply(&mut self, reply_rx: &mut mpsc::Receiver<ReplyMsg>, text: String) {
        if self.reply.is_some() {
            while let Ok(msg) = reply_rx.try_recv() {
                self.on_reply_msg(msg);
            }
        }
        self.reply = start_reply(
            &self.shared,
            &self.tts,
            &self.reply_tx,
            self.clock.turn,
            text,
        );
        self.replies += 1;
        if self.reply.is_none() {
            self.reply_done = true;
        }
    }

    fn on_control(
        &mut self,
        msg: Control,
        s2s_events: &mut Option<mpsc::Receiver<S2sEvent>>,
        reply_rx: &mut mpsc::Receiver<ReplyMsg>,
    ) {
        let shared = &*self.shared;
        match msg {
            Control::TurnEnded { turn, endpointing } => {
                self.clock = TurnClock {
                    turn,
                    ended_at: Some(Instant::now()),
                    endpointing,
                    ..TurnClock::default()
                };
                self.reply_done = false;
                shared
                    .metrics
                    .turn_latency(LatencyStage::Endpointing, endpointing);
                shared.set_state(PipelineState::Processing);
                if self.finals.enabled {
                    self.finals.pending += 1;
                    self.finals.due = Some(Instant::now() + shared.agent_timeout);
                }
            }
            Control::Interrupt { turn } => {
                self.finals.supersede(true);
                // Reply audio the S2S model had already queued is part of the
                // cut reply; what else it sent is handled after the cut.
                let mut kept = Vec::new();
                if let Some(rx) = s2s_events.as_mut() {
                    while let Ok(ev) = rx.try_recv() {
                        match ev {
                            S2sEvent::Audio(_) | S2sEvent::ReplyDone | S2sEvent::Interrupted => {}
                            other => kept.push(other),
                        }
                    }
                }
                self.cut_reply(turn, reply_rx);
                for ev in kept {
                    self.on_s2s(ev, reply_rx);
                }
            }
            Control::TurnFailed { turn } => {
                // No transcript will come for it.
                self.finals.pending = self.finals.pending.saturating_sub(1);
                self.finals.stale = self.finals.stale.min(self.finals.pending);
                self.finals.due = None;
                if self.clock.turn == turn && self.reply.is_none() {
                    self.reply_done = true;
                    self.settle_if_silent();
                }
            }
            Control::Text(text) => {
                self.finals.supersede(false);
                self.clock = TurnClock {
                    turn: shared.turns.fetch_add(1, Ordering::AcqRel) + 1,
                    ended_at: Some(Instant::now()),
                    ..TurnClock::default()
                };
                shared.metrics.turn();
                shared.emit(SessionEvent::UserTranscript {
                    text: text.clone(),
                    is_final: true,
                });
                shared.set_state(PipelineState::Processing);
                self.reply_done = false;
                self.start_reply(reply_rx, text);
            }
            Control::Stop { deadline, done } => {
                self.stopping = Some((deadline, done));
            }
        }
    }

    fn on_stt(&mut self, ev: SttEvent, reply_rx: &mut mpsc::Receiver<ReplyMsg>) {
        let shared = &*self.shared;
        match ev {
            SttEvent::Partial(text) => {
                shared.hint(&text);
                shared.emit(SessionEvent::UserTranscript {
                    text,
                    is_final: false,
                });
            }
            SttEvent::Final(text) => {
                let finals = &mut self.finals;
                finals.pending = finals.pending.saturating_sub(1);
                if finals.stale > 0 {
                    // The transcript of a turn that is over.
                    finals.stale -= 1;
                    if finals.carry && !text.trim().is_empty() {
                        if !finals.carried.is_empty() {
                            finals.carried.push(' ');
                        }
                        finals.carried.push_str(text.trim());
                    }
                    shared.emit(SessionEvent::UserTranscript {
                        text,
                        is_final: true,
                    });
                    return;
                }
                finals.due = None;
                let carried = std::mem::take(&mut finals.carried);
                if let Some(t) = self.clock.ended_at {
                    self.clock.stt = Some(t.elapsed());
                    shared.metrics.turn_latency(LatencyStage::Stt, t.elapsed());
                }
                shared.emit(SessionEvent::UserTranscript {
                    text: text.clone(),
                    is_final: true,
                });
                // What the user said before cutting in on their own turn
                // comes first.
                let text = match (carried.is_empty(), text.trim().is_empty()) {
                    (true, _) => text,
                    (false, true) => carried,
                    (false, false) => format!("{carried} {}", text.trim()),
                };
                if text.trim().is_empty() {
                    // Nothing was recognised: no turn to answer.
                    shared.replying.store(false, Ordering::Release);
                    self.reply_done = true;
                    shared.set_state(PipelineState::Listening);
                } else if shared.replying.load(Ordering::Acquire) {
                    self.start_reply(reply_rx, text);
                }
            }
        }
    }

    /// Drops the reply in flight and everything queued of it, and listens.
    fn cut_reply(&mut self, turn: u64, reply_rx: &mut mpsc::Receiver<ReplyMsg>) {
        let shared = &*self.shared;
        // Again, from the task: a frame it released after the input path's
        // flush (before this message reached it) is dropped too.
        shared.output.flush();
        self.playout.converter.reset();
        self.reply = None;
        while reply_rx.try_recv().is_ok() {}
        self.playout.pending.clear();
        self.playout.pending_len = Duration::ZERO;
        self.playout.play_end = Instant::now();
        self.reply_done = true;
        self.cut = true;
        shared.metrics.interrupted();
        shared.emit(SessionEvent::Interrupted { turn });
        shared.set_state(PipelineState::Listening);
    }

    /// A remote service's final transcript: the user's turn ended there.
    /// With an agent and a speaker, the agent answers and the service speaks
    /// the reply; otherwise the service answers by itself.
    fn remote_turn_ended(&mut self, text: String, reply_rx: &mut mpsc::Receiver<ReplyMsg>) {
        let shared = &*self.shared;
        let turn = shared.turns.fetch_add(1, Ordering::AcqRel) + 1;
        shared.metrics.turn();
        shared.emit(SessionEvent::TurnEnded { turn });
        self.clock = TurnClock {
            turn,
            ended_at: Some(Instant::now()),
            ..TurnClock::default()
        };
        self.cut = false;
        let empty = text.trim().is_empty();
        shared.emit(SessionEvent::UserTranscript {
            text: text.clone(),
            is_final: true,
        });
        if empty {
            return;
        }
        shared.replying.store(true, Ordering::Release);
        self.reply_done = false;
        shared.set_state(PipelineState::Processing);
        let has_agent = shared
            .agent
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        if has_agent && self.tts.is_some() {
            self.start_reply(reply_rx, text);
        }
    }

    fn on_s2s(&mut self, ev: S2sEvent, reply_rx: &mut mpsc::Receiver<ReplyMsg>) {
        let shared = &*self.shared;
        match ev {
            S2sEvent::UserTranscript {
                text,
                is_final: true,
            } if shared.remote_turns => self.remote_turn_ended(text, reply_rx),
            S2sEvent::UserTranscript { text, is_final } => {
                if !is_final {
                    shared.hint(&text);
                }
                shared.emit(SessionEvent::UserTranscript { text, is_final });
            }
            S2sEvent::AgentText(text) => shared.emit(SessionEvent::AgentText { text }),
            S2sEvent::Audio(frame) if shared.remote_turns => {
                // The service speaks when it has something to say (a greeting
                // included), except for the rest of a reply that was cut.
                if !self.cut {
                    if !shared.replying.swap(true, Ordering::AcqRel) {
                        self.reply_done = false;
                    }
                    enqueue(shared, &mut self.playout, frame);
                }
            }
            S2sEvent::Audio(frame) => {
                if shared.replying.load(Ordering::Acquire) {
                    enqueue(shared, &mut self.playout, frame);
                }
            }
            S2sEvent::Interrupted => {
                let speaking = shared.replying.swap(false, Ordering::AcqRel)
                    || !self.playout.pending.is_empty();
                if speaking {
                    shared.output.flush();
                    let turn = shared.turns.load(Ordering::Acquire);
                    self.cut_reply(turn, reply_rx);
                } else {
                    self.cut = true;
                }
            }
            S2sEvent::Connection(state) => shared.connection(state),
            S2sEvent::Failed { code, message } => {
                tracing::error!(code = %code, "the session's link failed: {message}");
                shared.metrics.error(Op::Turn, code);
                shared.emit(SessionEvent::Error { code, message });
                shared.connection(ConnectionState::Error);
                shared.set_state(PipelineState::Error);
            }
            S2sEvent::ReplyDone => {
                self.cut = false;
                self.reply_done = true;
                if !self.clock.first_audio_sent && self.playout.pending.is_empty() {
                    // Nothing to say: back to listening.
                    shared.replying.store(false, Ordering::Release);
                    if shared.state() == PipelineState::Processing {
                        shared.set_state(PipelineState::Listening);
                    }
                }
            }
        }
    }

    fn on_reply_msg(&mut self, msg: ReplyMsg) {
        on_reply_msg(&self.shared, &mut self.playout, &mut self.clock, msg);
    }

    /// A turn's answer is over without any audio to play (an agent error or
    /// timeout, empty text, no speaker, a speaker that said nothing or
    /// failed): back to listening. With audio, the playout does it once the
    /// audio has played ([`Task::idle_at`]).
    fn settle_if_silent(&mut self) {
        if !self.clock.first_audio_sent
            && self.playout.pending.is_empty()
            && self.shared.state() == PipelineState::Processing
        {
            self.shared.replying.store(false, Ordering::Release);
            self.shared.set_state(PipelineState::Listening);
        }
    }

    /// The timer fired: tops the reply audio handed out up to the lead
    /// (stopping early for a waiting control message, which goes first), then
    /// goes back to listening if the reply has finished playing. Returns
    /// whether the stop deadline has passed.
    fn on_timer(&mut self, inputs: &Inputs) -> bool {
        let now = Instant::now();
        if self.finals.due.is_some_and(|due| due <= now) {
            // The transcript never came: the turn is given up on.
            self.finals.supersede(false);
            if self.reply.is_none() && self.shared.state() == PipelineState::Processing {
                self.shared.metrics.error(Op::Turn, ErrorCode::Timeout);
                self.shared.emit(SessionEvent::Error {
                    code: ErrorCode::Timeout,
                    message: format!(
                        "no final transcript of turn {} within timeout = {}",
                        self.clock.turn,
                        humantime::format_duration(self.shared.agent_timeout)
                    ),
                });
                self.reply_done = true;
                self.settle_if_silent();
            }
        }
        while self.may_release(now) {
            release(&self.shared, &mut self.playout, &mut self.clock, now);
            if inputs.marked(IN_CONTROL) {
                return false;
            }
        }
        if self.idle_at().is_some_and(|at| at <= now) {
            // The reply's last few milliseconds, still in its resampler.
            if let Ok(Some(tail)) = self.playout.converter.flush(self.shared.output_format) {
                send_out(&self.shared, tail);
            }
            self.shared.replying.store(false, Ordering::Release);
            self.shared.set_state(PipelineState::Listening);
        }
        self.stopping.as_ref().is_some_and(|(d, _)| *d <= now)
    }
}

/// The session's task: everything that waits. It wakes for a control message,
/// an STT or S2S event, progress of the reply in flight, or its one timer,
/// which is set to the nearest deadline (the next reply frame's release, the
/// end of the reply's playout, the stop deadline) and moved only when that
/// changes. Inputs are checked in that order, so a control message (a
/// barge-in) always goes first.
async fn run(shared: Arc<Shared>, parts: TaskParts) {
    let TaskParts {
        mut control,
        mut stt_events,
        mut s2s_events,
        tts,
        output_converter,
    } = parts;
    let _finish = Finish(shared.clone());
    let (reply_tx, mut reply_rx) = mpsc::channel::<ReplyMsg>(32);
    let mut task = Task {
        shared,
        tts,
        reply_tx,
        reply: None,
        replies: 0,
        reply_done: true,
        clock: TurnClock::default(),
        playout: Playout {
            pending: VecDeque::new(),
            pending_len: Duration::ZERO,
            play_end: Instant::now(),
            converter: FormatFollower::from(output_converter),
        },
        stopping: None,
        cut: false,
        finals: Finals {
            enabled: stt_events.is_some(),
            ..Finals::default()
        },
    };
    // Every input marked, so each is polled (and registers) once.
    let inputs = Inputs::new((1 << INPUTS) - 1);
    let timer = tokio::time::sleep_until(Instant::now());
    tokio::pin!(timer);
    // The deadline the timer is set to; `None` while it is not set (or fired).
    let mut armed: Option<Instant> = None;
    // The task waker the inputs' wakers wake (kept to skip re-registering it).
    let mut registered: Option<Waker> = None;

    loop {
        let deadline = task.next_deadline();
        if deadline != armed {
            if let Some(at) = deadline {
                timer.as_mut().reset(at);
            }
            armed = deadline;
        }

        let woke = std::future::poll_fn(|cx| {
            if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                inputs.register(cx.waker());
                registered = Some(cx.waker().clone());
            }
            if let Some(msg) = inputs.poll(IN_CONTROL, |cx| control.poll_recv(cx)) {
                return Poll::Ready(Woke::Control(msg));
            }
            if let Some(rx) = stt_events.as_mut()
                && let Some(ev) = inputs.poll(IN_STT, |cx| rx.poll_recv(cx))
            {
                return Poll::Ready(Woke::Stt(ev));
            }
            if let Some(rx) = s2s_events.as_mut()
                && let Some(ev) = inputs.poll(IN_S2S, |cx| rx.poll_recv(cx))
            {
                return Poll::Ready(Woke::S2s(ev));
            }
            if let Some(reply) = task.reply.as_mut() {
                if let Some(result) = inputs.poll(IN_REPLY, |cx| reply.as_mut().poll(cx)) {
                    return Poll::Ready(Woke::Reply(result));
                }
                // Only the reply in flight sends here; what it sent is
                // drained when it ends or is replaced.
                if let Some(Some(msg)) = inputs.poll(IN_REPLY_MSG, |cx| reply_rx.poll_recv(cx)) {
                    return Poll::Ready(Woke::ReplyMsg(msg));
                }
            }
            // The timer lives in this task's own state: cheaper to poll every
            // time, with the task's waker, than to mark.
            if armed.is_some() && timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Woke::Timer);
            }
            Poll::Pending
        })
        .await;

        let replies = task.replies;
        match woke {
            Woke::Control(Some(msg)) => task.on_control(msg, &mut s2s_events, &mut reply_rx),
            Woke::Control(None) => break,
            Woke::Stt(Some(ev)) => {
                task.on_stt(ev, &mut reply_rx);
                for _ in 1..EVENT_BATCH {
                    let Some(rx) = stt_events.as_mut() else { break };
                    if inputs.marked(IN_CONTROL) {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(ev) => task.on_stt(ev, &mut reply_rx),
                        Err(_) => break,
                    }
                }
            }
            Woke::Stt(None) => stt_events = None,
            Woke::S2s(Some(ev)) => {
                task.on_s2s(ev, &mut reply_rx);
                for _ in 1..EVENT_BATCH {
                    let Some(rx) = s2s_events.as_mut() else { break };
                    if inputs.marked(IN_CONTROL) {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(ev) => task.on_s2s(ev, &mut reply_rx),
                        Err(_) => break,
                    }
                }
            }
            Woke::S2s(None) => s2s_events = None,
            Woke::Reply(result) => {
                task.reply = None;
                task.reply_done = true;
                // What the reply sent before finishing is handled before anything else.
                while let Ok(msg) = reply_rx.try_recv() {
                    task.on_reply_msg(msg);
                }
                if let Err(e) = result {
                    task.shared.metrics.error(Op::Turn, e.code);
                    task.shared.emit(SessionEvent::Error {
                        code: e.code,
                        message: e.message.clone(),
                    });
                    tracing::warn!(code = %e.code, "turn failed: {}", e.message);
                }
                task.settle_if_silent();
            }
            Woke::ReplyMsg(msg) => task.on_reply_msg(msg),
            Woke::Timer => {
                armed = None;
                if task.on_timer(&inputs) {
                    break;
                }
            }
        }
        if task.replies != replies {
            // A new reply: poll it (and its channel) at once.
            inputs.mark(IN_REPLY | IN_REPLY_MSG);
        }

        let in_flight = task.reply.is_some()
            || !task.playout.pending.is_empty()
            || matches!(
                task.shared.state(),
                PipelineState::Processing | PipelineState::Speaking
            );
        if task.stopping.is_some() && !in_flight {
            break;
        }
    }
    let Task {
        shared,
        reply,
        stopping,
        ..
    } = task;
    drop(reply);
    shared.finish();
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
    // Counted with the frame, so one huge frame cannot overshoot the bound.
    if playout.pending_len + frame.duration() > MAX_REPLY_AUDIO {
        shared.metrics.dropped(DropReason::OutputOverflow, 1);
        return;
    }
    if playout.pending.is_empty() {
        let now = Instant::now();
        if playout.play_end < now {
            playout.play_end = now;
        }
    }
    playout.pending_len += frame.duration();
    playout.pending.push_back(frame);
}

/// Hands reply audio to the receiver without waiting, counting it as sent
/// or, when the receiver's queue is full, as dropped. Whether it went out.
fn send_out(shared: &Shared, frame: AudioFrame) -> bool {
    let bytes = frame.data().len() as u64;
    match shared.output.try_send(frame) {
        Ok(()) => {
            shared.metrics.bytes_out(bytes);
            true
        }
        Err(_) => {
            shared.metrics.dropped(DropReason::OutputOverflow, 1);
            false
        }
    }
}

/// Hands the next queued reply frame to the receiver (`now` is the time).
fn release(shared: &Shared, playout: &mut Playout, clock: &mut TurnClock, now: Instant) {
    let Some(frame) = playout.pending.pop_front() else {
        return;
    };
    playout.pending_len = playout.pending_len.saturating_sub(frame.duration());
    playout.play_end = playout.play_end.max(now) + frame.duration();
    // A frame that cannot be converted is dropped and reported; the reply
    // still counts as started, so the session goes back to listening after it.
    let out = match playout.converter.convert(frame, shared.output_format) {
        Ok(f) => f,
        Err(e) => {
            shared.metrics.dropped(DropReason::InvalidAudio, 1);
            shared.emit(SessionEvent::Error {
                code: e.code,
                message: e.into_fields().message,
            });
            None
        }
    };
    let sent = out.is_some_and(|out| send_out(shared, out));
    if !clock.first_audio_sent {
        clock.first_audio_sent = true;
        shared.set_state(PipelineState::Speaking);
    }
    // The turn's latency runs to the first audio that actually went out.
    if sent && !clock.latency_reported {
        clock.latency_reported = true;
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
        let answer =
            unwound(agent.respond(turn_input)).instrument(tracing::info_span!("agent", turn));
        let reply = match tokio::time::timeout(limit, answer).await {
            Ok(Ok(r)) => r.map_err(|mut e| {
                e.code = ErrorCode::AgentError;
                e
            })?,
            Ok(Err(panic)) => {
                return Err(BackendError::new(
                    "session.agent",
                    ErrorCode::AgentError,
                    format!("the agent panicked answering turn {turn}: {panic}"),
                ));
            }
            Err(_) => {
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
        // Empty text, or no synthesis configured (the reply is text only):
        // the session task goes back to listening once the text is out.
        if reply.text.is_empty() {
            return Ok(());
        }
        let Some(tts) = tts else {
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
    // A panic in synthesis (or anywhere in the reply) fails the reply, not
    // the session's task.
    let fut = async move {
        unwound(fut).await.unwrap_or_else(|panic| {
            Err(BackendError::new(
                "session.reply",
                ErrorCode::PipelineError,
                format!("the reply panicked: {panic}"),
            ))
        })
    };
    Some(Box::pin(fut))
}

/// Runs `fut`, turning a panic while it is polled into `Err` with the
/// panic's message, so an application's agent or component that panics
/// fails its reply instead of the session's task. (The panic hook still
/// reports it as usual.)
async fn unwound<F: Future>(fut: F) -> std::result::Result<F::Output, String> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned()))),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{AgentReply, agent_fn};

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
            agent_fn(|turn| async move {
                Ok(AgentReply::text(format!("you said {}", turn.transcript)))
            }),
            false,
        )
    }

    /// The parts of a test engine: `stt` and its events, the `FirstByte` VAD,
    /// the `ThreeSilent` turn detector, no speaker and no agent (override
    /// with struct update syntax).
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
            s2s: None,
            tts: None,
            agent: None,
            metrics: Arc::new(Metrics::new("test")),
            agent_timeout: Duration::from_secs(5),
            remote_turns: false,
            link: false,
            converters: PreparedConverters::default(),
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
        while let Ok(Some(e)) =
            tokio::time::timeout(Duration::from_millis(300), events.recv()).await
        {
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
        while let Ok(Some(e)) =
            tokio::time::timeout(Duration::from_millis(500), events.recv()).await
        {
            seen.push(e);
        }
        let closed = seen.iter().position(|e| *e == SessionEvent::Closed);
        assert_eq!(closed, Some(seen.len() - 1), "Closed comes last: {seen:?}");
        assert!(
            seen.iter().any(
                |e| matches!(e, SessionEvent::AgentText { text } if text == "you said 7 frames")
            ),
            "the turn was answered before the close: {seen:?}"
        );
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
}
