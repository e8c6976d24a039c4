//! The speech-to-speech model's events: its transcripts and reply audio, a
//! remote service ending the user's turns, and the session's link.

use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::backend::ConnectionState;
use crate::metrics::Op;
use crate::pipeline::events::SessionEvent;
use crate::pipeline::{S2sEvent, SttEvent};
use crate::session::PipelineState;

use super::latency::TurnClock;
use super::playout::enqueue;
use super::reply::ReplyMsg;
use super::task::Task;

impl Task {
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

    pub(super) fn on_s2s(&mut self, ev: S2sEvent, reply_rx: &mut mpsc::Receiver<ReplyMsg>) {
        let shared = &*self.shared;
        match ev {
            S2sEvent::UserTranscript {
                text,
                is_final: true,
            } if shared.remote_turns => self.remote_turn_ended(text, reply_rx),
            // A link told of turn ends by the local detector: its transcripts
            // are matched to those turns, as an STT's are.
            S2sEvent::UserTranscript { text, is_final } if shared.link_finals => {
                let event = if is_final {
                    SttEvent::Final(text)
                } else {
                    SttEvent::Partial(text)
                };
                self.on_stt(event, reply_rx);
            }
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
                    let announce = self.paused_from.take().is_none();
                    self.cut_reply(turn, reply_rx, announce);
                } else {
                    self.cut = true;
                }
            }
            S2sEvent::Connection(state) => shared.connection(state),
            S2sEvent::EndpointSwitched { from, to, reason } => {
                shared.emit(SessionEvent::ComponentSwitched {
                    stage: crate::pipeline::link::ENDPOINT_STAGE.to_owned(),
                    from,
                    to,
                    reason,
                });
            }
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
}
