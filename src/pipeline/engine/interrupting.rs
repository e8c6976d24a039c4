//! The session task's side of interruptions: what the reply does as the
//! decider ([`super::interruption`]) moves on. A pause stops releasing the
//! reply's audio and keeps the rest of it ([`SessionEvent::Interrupted`]);
//! a resume releases it again from where it stopped
//! ([`SessionEvent::Resumed`]); a cut drops it as a barge-in does; a turn
//! that ended while the reply was paused waits for its final transcript.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::metrics::LatencyStage;
use crate::pipeline::events::SessionEvent;
use crate::session::PipelineState;

use super::interruption::{Phase, Step};
use super::latency::TurnClock;
use super::reply::ReplyMsg;
use super::task::Task;

/// A turn that ended while the reply was paused by its speech: started
/// only if its final transcript confirms the interruption.
pub(super) struct Deferred {
    pub(super) turn: u64,
    pub(super) endpointing: Duration,
    pub(super) ended_at: Instant,
}

impl Task {
    /// Takes a step of the decider (from the input path or this task).
    pub(super) fn interruption_step(
        &mut self,
        step: Step,
        reply_rx: &mut mpsc::Receiver<ReplyMsg>,
    ) {
        let phase = self.shared.decider().phase();
        match step {
            // Ducking shows in the playout ([`Task::may_release`] and the
            // gain of each frame released); nothing else to do.
            Step::Duck | Step::Unduck => {}
            // The task's loop arms its timer for the new deadline
            // ([`Task::interruption_due`]) once this step is taken.
            Step::Quiet => {}
            Step::Pause if phase == Phase::Paused && self.paused_from.is_none() => {
                let shared = &*self.shared;
                self.paused_from = Some(shared.state());
                shared.metrics.interrupted();
                shared.emit(SessionEvent::Interrupted {
                    turn: self.clock.turn,
                });
                shared.set_state(PipelineState::Listening);
            }
            Step::Pause => {}
            Step::Resume => self.resume_reply(),
            Step::Cut { false_interruption } => {
                let supersede = self.deferred.is_none();
                self.cut_judged(false_interruption, supersede, reply_rx);
            }
        }
    }

    /// The decider cut the reply for good (it may have been paused); with
    /// `supersede`, transcripts still to come belong to turns that are over
    /// (as for a barge-in).
    fn cut_judged(
        &mut self,
        false_interruption: bool,
        supersede: bool,
        reply_rx: &mut mpsc::Receiver<ReplyMsg>,
    ) {
        if false_interruption {
            self.shared.metrics.false_interruption();
        }
        if supersede {
            self.finals.supersede(true);
        }
        let announce = self.paused_from.take().is_none();
        self.reply_cut();
        self.shared.replying.store(false, Ordering::Release);
        let turn = self.clock.turn;
        self.cut_reply(turn, reply_rx, announce);
    }

    /// A false interruption: the reply plays on from where it stopped.
    fn resume_reply(&mut self) {
        let Some(before) = self.paused_from.take() else {
            return;
        };
        let shared = &*self.shared;
        shared.metrics.false_interruption();
        self.playout.play_end = self.playout.play_end.max(Instant::now());
        shared.emit(SessionEvent::Resumed {
            turn: self.clock.turn,
        });
        shared.set_state(before);
    }

    /// The decider's false-interruption deadline, on the tokio clock.
    pub(super) fn interruption_due(&self) -> Option<Instant> {
        self.shared.decider().due().map(|d| self.shared.epoch + d)
    }

    /// The final transcript of a turn that ended while the reply was
    /// paused. Returns the transcript when the turn is to be answered (the
    /// interruption stands: the reply is cut and the turn started), `None`
    /// when it is not (the reply resumed, or stays cut without words).
    pub(super) fn deferred_final(
        &mut self,
        text: String,
        reply_rx: &mut mpsc::Receiver<ReplyMsg>,
    ) -> Option<String> {
        let deferred = self.deferred.take()?;
        let step = self.shared.decider().transcript(&text, true);
        match step {
            Some(Step::Resume) => {
                self.finals.due = None;
                self.shared.emit(SessionEvent::UserTranscript {
                    text,
                    is_final: true,
                });
                self.resume_reply();
                None
            }
            Some(Step::Cut {
                false_interruption: true,
            }) => {
                self.finals.due = None;
                self.shared.emit(SessionEvent::UserTranscript {
                    text,
                    is_final: true,
                });
                self.cut_judged(true, false, reply_rx);
                None
            }
            other => {
                if other.is_some_and(|s| matches!(s, Step::Cut { .. })) {
                    self.cut_judged(false, false, reply_rx);
                }
                self.start_deferred(deferred);
                Some(text)
            }
        }
    }

    /// A deferred turn's final transcript never came: the interruption is
    /// false (no words).
    pub(super) fn deferred_gave_up(&mut self, reply_rx: &mut mpsc::Receiver<ReplyMsg>) {
        if self.deferred.take().is_none() {
            return;
        }
        let step = self.shared.decider().transcript("", true);
        if let Some(step) = step {
            self.interruption_step(step, reply_rx);
        }
    }

    /// The deferred turn is answered after all: as if it had just ended.
    fn start_deferred(&mut self, d: Deferred) {
        let shared = &*self.shared;
        self.clock = TurnClock {
            turn: d.turn,
            ended_at: Some(d.ended_at),
            endpointing: d.endpointing,
            ..TurnClock::default()
        };
        self.reply_done = false;
        shared
            .metrics
            .turn_latency(LatencyStage::Endpointing, d.endpointing);
        shared.replying.store(true, Ordering::Release);
        shared.set_state(PipelineState::Processing);
    }
}
