//! The input path: what [`Engine::process_audio`] runs for each frame, inline
//! on the caller's task (format conversion, processors, VAD, turn detection,
//! and handing the frame to STT or the S2S model), and a barge-in.

use std::collections::VecDeque;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::audio::{AudioFrame, FormatFollower};
use crate::error::{BackendError, ErrorCode, Result};
use crate::hooks::AudioProcessor;
use crate::metrics::DropReason;
use crate::pipeline::events::SessionEvent;
use crate::pipeline::{INTERNAL_FORMAT, SttStream, TurnDetector, TurnSignal, Vad, VadDecision};

use crate::pipeline::link::RemoteInput;

use super::Engine;
use super::interruption::{Decider, Phase, Step, TurnFate};
use super::shared::Control;

/// The input path's state, behind the session's lock.
///
/// Laid out in order (`repr(C)`), what every frame uses first, so a frame
/// touches as few cache lines as possible; the converter, rarely needed, is
/// boxed.
#[repr(C)]
pub(super) struct Input {
    pub(super) vad: Box<dyn Vad>,
    pub(super) turn: Box<dyn TurnDetector>,
    pub(super) remote: Option<RemoteInput>,
    pub(super) stt: Option<Box<dyn SttStream>>,
    pub(super) processors: Vec<Box<dyn AudioProcessor>>,
    pub(super) silence: Duration,
    pub(super) pre_roll_len: Duration,
    /// How much audio `pre_roll` keeps: [`PRE_ROLL`](super::PRE_ROLL) plus the VAD's and the
    /// turn detector's lookback.
    pub(super) pre_roll_limit: Duration,
    pub(super) pre_roll: VecDeque<AudioFrame>,
    pub(super) in_speech: bool,
    pub(super) remote_turns: bool,
    pub(super) converter: FormatFollower,
    /// Speech during a reply is being judged ([`Decider::deciding`] as of
    /// this path's last look): each frame is told to the decider.
    pub(super) deciding: bool,
    /// The remote is a speech-to-speech model: speech being judged is held
    /// back from it (in `held`) until it interrupts, and dropped if it does not.
    pub(super) holds_model_audio: bool,
    pub(super) held: Vec<AudioFrame>,
}

impl Engine {
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
        let signal = tracing::trace_span!("turn_detection").in_scope(|| {
            input.turn.observe(&frame);
            input.turn.update(&decision, duration)
        });
        if input.deciding {
            let now = self.shared.since_epoch(tokio::time::Instant::now());
            let step = self.shared.decider().voice(now, decision.speech, duration);
            self.take_step(input, step)?;
        }
        if input.remote_turns {
            return self.remote_turn_input(input, frame, signal);
        }
        match signal {
            TurnSignal::SpeechStarted => {
                self.speech_started(input)?;
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
                let fate = self.judged_turn_ended(input)?;
                if fate == TurnFate::Swallow {
                    return self.swallow_turn(input);
                }
                let turn = self.shared.turns.fetch_add(1, Ordering::AcqRel) + 1;
                // The session task must know of the turn before any reply to it
                // can arrive: mark it and queue the control message first.
                self.shared.replying.store(true, Ordering::Release);
                self.shared.metrics.turn();
                self.shared.emit(SessionEvent::TurnEnded { turn });
                let _ = self.shared.control.send(Control::TurnEnded {
                    turn,
                    endpointing: input.turn.endpointing().unwrap_or(input.silence),
                    deferred: fate == TurnFate::Defer,
                });
                input.turn.reset();
                let mut ended = Ok(());
                if let Some(stt) = input.stt.as_mut() {
                    ended = stt.end_turn();
                }
                if let (Ok(()), Some(remote)) = (&ended, input.remote.as_mut()) {
                    ended = remote.end_turn();
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
            TurnSignal::SpeechStarted => self.speech_started(input)?,
            TurnSignal::TurnEnded if input.in_speech => {
                input.in_speech = false;
                // The service decides what the speech was; locally it only
                // stops being judged.
                self.judged_turn_ended(input)?;
                input.turn.reset();
            }
            _ => {}
        }
        self.feed(input, &frame)
    }

    /// The user started speaking: reported, and a reply being produced or
    /// played is judged (cut at once with the interruption policy off).
    fn speech_started(&self, input: &mut Input) -> Result<()> {
        input.in_speech = true;
        self.shared.emit(SessionEvent::SpeechStarted);
        if self.shared.replying.load(Ordering::Acquire) {
            let step = {
                let mut decider = self.shared.decider();
                if !decider.policy().enabled {
                    drop(decider);
                    self.barge_in(input);
                    return Ok(());
                }
                decider.onset(input.turn.lookback())
            };
            input.deciding = true;
            self.take_step(input, step)?;
        }
        Ok(())
    }

    /// Acts on a step the decider took on the input path: a cut happens
    /// here at once (as a barge-in); the rest is the session task's.
    fn take_step(&self, input: &mut Input, step: Option<Step>) -> Result<()> {
        let Some(step) = step else {
            return Ok(());
        };
        match step {
            Step::Cut { .. } => {
                input.deciding = false;
                self.barge_in(input);
                // The speech is the user's turn: the model hears all of it.
                for f in std::mem::take(&mut input.held) {
                    self.feed_now(input, &f)?;
                }
            }
            step => {
                input.deciding = self.shared.decider().deciding();
                let _ = self.shared.control.send(Control::Interruption(step));
            }
        }
        Ok(())
    }

    /// The user's turn ended: what the decider makes of it (a turn like any
    /// other when nothing was being judged).
    fn judged_turn_ended(&self, input: &mut Input) -> Result<TurnFate> {
        if !input.deciding {
            return Ok(TurnFate::Answer);
        }
        let now = self.shared.since_epoch(tokio::time::Instant::now());
        let (step, fate) = {
            let mut decider: std::sync::MutexGuard<'_, Decider> = self.shared.decider();
            let judged = decider.turn_ended(now);
            input.deciding = decider.phase() == Phase::Paused;
            judged
        };
        self.take_step(input, step)?;
        Ok(fate)
    }

    /// Speech that did not interrupt ended: not a turn. What the model was
    /// kept from hearing is dropped; a recognizer's turn is closed so the
    /// speech does not run into the next turn, and its transcript is not
    /// answered.
    fn swallow_turn(&self, input: &mut Input) -> Result<()> {
        input.turn.reset();
        input.held.clear();
        let mut ended = Ok(false);
        if let Some(stt) = input.stt.as_mut() {
            ended = stt.end_turn().map(|()| true);
        } else if let Some(remote) = input.remote.as_mut()
            && !input.holds_model_audio
        {
            ended = remote.end_turn().map(|()| true);
        }
        match ended {
            Ok(true) => {
                let _ = self.shared.control.send(Control::Swallowed);
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => Err(e.with_op("session.process_audio")),
        }
    }

    fn feed(&self, input: &mut Input, frame: &AudioFrame) -> Result<()> {
        if input.deciding && input.holds_model_audio {
            input.held.push(frame.clone());
            return Ok(());
        }
        self.feed_now(input, frame)
    }

    fn feed_now(&self, input: &mut Input, frame: &AudioFrame) -> Result<()> {
        if let Some(stt) = input.stt.as_mut() {
            tracing::trace_span!("stt")
                .in_scope(|| stt.push_audio(frame))
                .map_err(|e| e.with_op("session.process_audio"))?;
        }
        if let Some(remote) = input.remote.as_mut() {
            tracing::trace_span!("s2s")
                .in_scope(|| remote.push_audio(frame))
                .map_err(|e| e.with_op("session.process_audio"))?;
        }
        Ok(())
    }

    pub(super) fn barge_in(&self, input: &mut Input) {
        // Flush at once, from here: the session task also drops its queue.
        self.shared.output.flush();
        if let Some(remote) = input.remote.as_mut() {
            remote.interrupt();
        }
        self.shared.replying.store(false, Ordering::Release);
        let turn = self.shared.turns.load(Ordering::Acquire);
        let _ = self.shared.control.send(Control::Interrupt { turn });
    }
}
