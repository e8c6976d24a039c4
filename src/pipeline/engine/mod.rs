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
//! # Preemptive replies
//!
//! With `[preemptive]` on, the agent starts on a partial transcript that
//! stood unchanged long enough, and its reply is held until the turn's final
//! transcript: used if the words match, dropped unheard otherwise; see
//! `preemptive.rs` and [`crate::config::PreemptiveConfig`].
//!
//! # Barge-in
//!
//! User speech while a reply is being produced or played cancels it at once:
//! the agent/TTS future is dropped, the playout queue is cleared, frames
//! already handed to the receiver are flushed, the S2S model is told to stop,
//! and [`SessionEvent::Interrupted`] is emitted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::agent::{Agent, Message};
use crate::audio::{AudioConverter, AudioFormat, AudioFrame, FormatFollower};
use crate::backend::ConnectionState;
use crate::error::{BackendError, ErrorCode, Result};
use crate::hooks::AudioProcessor;
use crate::metrics::Metrics;
use crate::pipeline::events::{SessionEvent, SessionEvents};
use crate::pipeline::link::Remote;
use crate::pipeline::{INTERNAL_FORMAT, SttEvent, SttStream, TextToSpeech, TurnDetector, Vad};
use crate::session::{AudioReceiver, AudioSlot, PipelineState, audio_channel};

// Where each part of the engine is (the handle, `Engine`, is here):
// the state the handle shares with the session's task,
mod shared;
// the input path `process_audio` runs,
mod input;
// the session's task and its loop,
mod task;
// turn ends and the transcripts that belong to them,
mod turns;
// the reply to a turn (the agent, then synthesis),
mod reply;
// reply audio paced out to the user, and cutting it (barge-in),
mod playout;
// the speech-to-speech model's and the link's events,
mod s2s;
// what a turn's latency is made of,
mod latency;
// whether user speech during a reply interrupts it (a pure state machine),
pub(crate) mod interruption;
// and what the reply does as that is decided.
mod interrupting;
// replies started on a stable partial transcript, held until the final.
mod preemptive;
#[cfg(test)]
mod tests;

use input::Input;
use interruption::{Decider, Policy};
use shared::{Control, Shared, state_code};
use task::{TaskParts, run};

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
    /// A speech-to-speech model (s2s pipelines), or the session's link to
    /// its provider's service ([`Remote`]). With a link, the engine keeps
    /// the link's state from its connection events, and each new subscriber
    /// hears that state first ([`Engine::subscribe`]); with a service that
    /// ends turns itself (a final transcript from it ends a turn), local VAD
    /// and turn detection still run, for barge-in; with the local turn
    /// detector ending turns, the service is told
    /// ([`LinkInput::end_turn`](crate::pipeline::link::LinkInput::end_turn))
    /// and its transcripts are matched to the turns as an STT's are.
    pub remote: Option<Remote>,
    /// The session's media goes through a media link
    /// ([`crate::runtime::MediaLink`]): the engine keeps its state for new
    /// subscribers, as for a [`Remote::Link`].
    pub media: bool,
    /// Speech synthesis for agent replies.
    pub tts: Option<Arc<dyn TextToSpeech>>,
    /// The application's agent, if set up front.
    pub agent: Option<Arc<dyn Agent>>,
    /// Where counts and latencies go.
    pub metrics: Arc<Metrics>,
    /// How long the agent may take to answer a turn.
    pub agent_timeout: Duration,
    /// The backend's data-retention hook ([`crate::hooks::Hooks::retention`]):
    /// asked once per turn whether the turn may join the conversation
    /// history the agent sees ([`crate::agent::AgentTurn::history`]).
    /// `None` keeps every turn.
    pub retention: Option<Arc<dyn crate::hooks::DataRetentionHook>>,
    /// Converters made beforehand, used when their formats match: from
    /// `input_format` to the internal format, and from the internal format to
    /// `output_format`. A resampler between unrelated rates (44.1 kHz and
    /// 16 kHz) takes milliseconds to make, so the runtime makes them on a
    /// blocking thread rather than on the first frame. `None`: made when first
    /// needed.
    pub converters: PreparedConverters,
    /// When user speech during a reply interrupts it
    /// ([`Plan::interruption`](crate::pipeline::plan::Plan::interruption)).
    pub interruption: crate::config::InterruptionConfig,
    /// Whether the agent starts on a stable partial transcript
    /// ([`Plan::preemptive`](crate::pipeline::plan::Plan::preemptive)).
    pub preemptive: crate::config::PreemptiveConfig,
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
    /// The reply audio stream, between its holders.
    receiver: AudioSlot,
    task: Mutex<Option<TaskParts>>,
    /// The converter `send_audio` used last, kept for the next call in the
    /// same format (a resampler's filter table takes milliseconds to make).
    send_converter: Mutex<Option<AudioConverter>>,
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
        let linked = parts.media || matches!(parts.remote, Some(Remote::Link { .. }));
        // A speech-to-speech model hears the speech being judged only once
        // it interrupts (what it hears, it answers).
        let holds_model_audio = matches!(parts.remote, Some(Remote::Model(..)));
        let (remote, remote_events, remote_turns, link_finals) = match parts.remote {
            Some(r) => {
                let (input, events, remote_turns, finals) = r.split();
                (Some(input), Some(events), remote_turns, finals)
            }
            None => (None, None, false, false),
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
            remote_turns,
            link_finals,
            finished: watch::Sender::new(false),
            link: Mutex::new(linked.then_some(ConnectionState::Connected)),
            hint: Mutex::new(None),
            hint_ready: AtomicBool::new(false),
            decider: Mutex::new(Decider::new(
                Policy::new(&parts.interruption),
                // Words come from an STT stage or the link's transcripts
                // matched to local turns.
                stt.is_some() || link_finals,
            )),
            epoch: Instant::now(),
        });
        let pre_roll_limit = PRE_ROLL + parts.vad.lookback() + parts.turn.lookback();
        Ok(Engine {
            accepting: AtomicBool::new(false),
            metrics: parts.metrics,
            input: Mutex::new(Input {
                vad: parts.vad,
                turn: parts.turn,
                remote,
                stt,
                processors: parts.processors,
                silence: Duration::ZERO,
                pre_roll_len: Duration::ZERO,
                pre_roll_limit,
                pre_roll: VecDeque::new(),
                in_speech: false,
                remote_turns,
                converter: FormatFollower::from(parts.converters.input),
                deciding: false,
                holds_model_audio,
                held: Vec::new(),
            }),
            shared,
            receiver: AudioSlot::new(receiver),
            send_converter: Mutex::new(None),
            task: Mutex::new(Some(TaskParts {
                control: control_rx,
                stt_events,
                remote_events,
                tts: parts.tts,
                output_converter: parts.converters.output,
                retention: parts.retention,
                history: Vec::new(),
                history_tx: None,
                preemptive: parts.preemptive,
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

    /// A sender of the session's events, for parts reporting on their own (failover).
    pub fn event_sender(&self) -> broadcast::Sender<SessionEvent> {
        self.shared.events.clone()
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

    /// A change of the session's media link: kept for new subscribers and
    /// told to the current ones ([`SessionEvent::Connection`]).
    pub fn link_state(&self, state: ConnectionState) {
        self.shared.connection(state);
    }

    /// The session's media link is lost for good: the session reports the
    /// error and goes to the error state, as for a lost service link.
    pub fn link_failed(&self, code: crate::error::ErrorCode, message: String) {
        tracing::error!(code = %code, "the session's link failed: {message}");
        self.shared.metrics.error(crate::metrics::Op::Turn, code);
        self.shared.emit(SessionEvent::Error { code, message });
        self.shared.connection(ConnectionState::Error);
        self.shared.set_state(PipelineState::Error);
    }

    /// Starts the session's conversation with `messages` (a restored
    /// session's, oldest first), before the session starts; nothing once it
    /// has.
    pub fn restore_history(&self, messages: Vec<Message>) {
        if let Some(task) = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            task.history = messages;
        }
    }

    /// The conversation each time it changes (a turn joined it), for the
    /// session store; `None` once the session has started. Nothing is sent
    /// on the audio path: the session's task sends it as a turn closes.
    pub fn watch_history(&self) -> Option<watch::Receiver<Arc<[Message]>>> {
        let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        let task = task.as_mut()?;
        let tx = task
            .history_tx
            .get_or_insert_with(|| watch::Sender::new(Arc::from([])));
        Some(tx.subscribe())
    }

    /// Takes the session's output audio stream, unless a receiver taken
    /// before is still held; dropped while the session lives, a receiver
    /// comes back for the next call (see [`AudioSlot`]).
    pub fn take_receiver(&self) -> Result<AudioReceiver> {
        self.receiver.take().ok_or_else(|| {
            BackendError::new(
                "session.receive_audio",
                ErrorCode::PipelineError,
                "the session's audio stream is held by another receiver; drop that one to take it again",
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
