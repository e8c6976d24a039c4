//! Turns: a turn's end as the session task handles it, its final transcript
//! (matched to it, in order), and a text turn.

use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::metrics::LatencyStage;
use crate::pipeline::events::SessionEvent;
use crate::pipeline::link::RemoteEvents;
use crate::pipeline::{S2sEvent, SttEvent};
use crate::session::PipelineState;

use super::interrupting::Deferred;
use super::interruption::Phase;
use super::latency::TurnClock;
use super::reply::ReplyMsg;
use super::shared::Control;
use super::task::Task;

/// Which final transcript belongs to which turn: each turn that ends asks the
/// STT stream for one, and they come in order.
#[derive(Default)]
pub(super) struct Finals {
    /// Whether there is a speech-to-text stream.
    pub(super) enabled: bool,
    /// Turns ended whose final transcript has not come yet.
    pub(super) pending: u32,
    /// How many of the first `pending` belong to turns already over: cut by
    /// a barge-in (the user went on speaking), superseded by a text turn, or
    /// given up on. They are reported but not answered by themselves.
    pub(super) stale: u32,
    /// Whether stale transcripts are carried into the next answered turn
    /// (after a barge-in: they are the start of what the user is saying).
    pub(super) carry: bool,
    /// The carried transcripts.
    pub(super) carried: String,
    /// When the final transcript of the last turn is due.
    pub(super) due: Option<Instant>,
}

impl Finals {
    /// Every transcript still to come belongs to a turn that is over.
    pub(super) fn supersede(&mut self, carry: bool) {
        self.stale = self.pending;
        self.carry = carry;
        if !carry {
            self.carried.clear();
        }
        self.due = None;
    }
}

impl Task {
    pub(super) fn on_control(
        &mut self,
        msg: Control,
        remote_events: &mut Option<RemoteEvents>,
        reply_rx: &mut mpsc::Receiver<ReplyMsg>,
    ) {
        let shared = &*self.shared;
        match msg {
            Control::TurnEnded {
                turn,
                endpointing,
                deferred,
            } => {
                if deferred && shared.decider().phase() == Phase::Paused {
                    // The reply is paused by this turn's speech: its final
                    // transcript decides whether it is answered.
                    self.deferred = Some(Deferred {
                        turn,
                        endpointing,
                        ended_at: Instant::now(),
                    });
                    if self.finals.enabled {
                        self.finals.pending += 1;
                        self.finals.due = Some(Instant::now() + shared.agent_timeout);
                    }
                    return;
                }
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
                self.preempt_turn_over();
                // Reply audio the S2S model had already queued is part of the
                // cut reply; what else it sent is handled after the cut. A
                // final transcript ends that: the model has heard the turn
                // that barged in, and what follows it (left queued, in order)
                // answers that turn (on a busy machine the model answers
                // before this task sees the cut).
                let mut kept = Vec::new();
                if let Some(rx) = remote_events.as_mut() {
                    while let Some(ev) = rx.try_recv() {
                        match ev {
                            S2sEvent::Audio(_) | S2sEvent::ReplyDone | S2sEvent::Interrupted => {}
                            ev @ S2sEvent::UserTranscript { is_final: true, .. } => {
                                kept.push(ev);
                                break;
                            }
                            other => kept.push(other),
                        }
                    }
                }
                self.reply_cut();
                let announce = self.paused_from.take().is_none();
                self.cut_reply(turn, reply_rx, announce);
                for ev in kept {
                    self.on_s2s(ev, reply_rx);
                }
            }
            Control::TurnFailed { turn } => {
                // No transcript will come for it.
                self.finals.pending = self.finals.pending.saturating_sub(1);
                self.finals.stale = self.finals.stale.min(self.finals.pending);
                self.finals.due = None;
                self.preempt_turn_over();
                if self.clock.turn == turn && self.reply.is_none() {
                    self.reply_done = true;
                    self.settle_if_silent();
                }
            }
            Control::Text(text) => {
                self.finals.supersede(false);
                self.preempt_turn_over();
                let shared = &*self.shared;
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
            Control::Swallowed => {
                // Its transcript, if one comes, is over already.
                if self.finals.enabled {
                    self.finals.pending += 1;
                    self.finals.stale += 1;
                }
            }
            Control::Interruption(step) => self.interruption_step(step, reply_rx),
            Control::Stop { deadline, done } => {
                self.stopping = Some((deadline, done));
            }
        }
    }

    pub(super) fn on_stt(&mut self, ev: SttEvent, reply_rx: &mut mpsc::Receiver<ReplyMsg>) {
        let shared = &*self.shared;
        match ev {
            SttEvent::Partial(text) => {
                let step = shared.decider().transcript(&text, false);
                if let Some(step) = step {
                    self.interruption_step(step, reply_rx);
                }
                self.preempt_partial(&text);
                let shared = &*self.shared;
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
                let text = if self.deferred.is_some() {
                    match self.deferred_final(text, reply_rx) {
                        Some(text) => text,
                        None => return,
                    }
                } else {
                    let step = shared.decider().transcript(&text, false);
                    if let Some(step) = step {
                        self.interruption_step(step, reply_rx);
                    }
                    text
                };
                let shared = &*self.shared;
                let finals = &mut self.finals;
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
                    self.preempt_turn_over();
                } else if shared.replying.load(Ordering::Acquire) {
                    // A preemptive reply on the same words is the reply.
                    if !self.preempt_final(&text, reply_rx) {
                        self.start_reply(reply_rx, text);
                    }
                } else {
                    self.preempt_turn_over();
                }
            }
        }
    }
}
