//! The state shared between the session's handle ([`Engine`](super::Engine))
//! and its task: the control messages, events, the pipeline's state and the
//! link's.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::agent::Agent;
use crate::audio::AudioFormat;
use crate::backend::ConnectionState;
use crate::metrics::Metrics;
use crate::pipeline::events::SessionEvent;
use crate::session::{AudioSender, PipelineState};

use super::interruption::{Decider, Step};

pub(super) enum Control {
    TurnEnded {
        turn: u64,
        endpointing: Duration,
        /// The turn ended while the reply was paused by its speech: its
        /// final transcript decides whether it is answered
        /// ([`TurnFate::Defer`](super::interruption::TurnFate::Defer)).
        deferred: bool,
    },
    /// Speech that did not interrupt ended as a turn of its own: not
    /// answered; its final transcript (if one comes) is not either.
    Swallowed,
    /// The interruption decision moved on (a step taken on the input path).
    Interruption(Step),
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

pub(super) struct Shared {
    pub(super) session_id: String,
    pub(super) user_id: String,
    pub(super) state: AtomicU8,
    pub(super) events: broadcast::Sender<SessionEvent>,
    pub(super) control: mpsc::UnboundedSender<Control>,
    pub(super) output: AudioSender,
    pub(super) output_format: AudioFormat,
    pub(super) agent: RwLock<Option<Arc<dyn Agent>>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) agent_timeout: Duration,
    /// Turns so far, spoken or sent as text.
    pub(super) turns: AtomicU64,
    /// A reply (agent, TTS or S2S audio) is being produced or played.
    pub(super) replying: AtomicBool,
    /// The S2S stream is a remote service that ends turns itself.
    pub(super) remote_turns: bool,
    /// The link's transcripts are matched to locally ended turns, as an
    /// STT's are (a link whose turns the local detector ends).
    pub(super) link_finals: bool,
    /// Set once the session has ended (its task finished, or it was stopped
    /// before it started), for every `stop` caller to wait on.
    pub(super) finished: watch::Sender<bool>,
    /// The state of the session's link to its provider's service (`None`
    /// without one). Held while a [`SessionEvent::Connection`] is published
    /// and while a subscriber subscribes, so a new subscriber starts from
    /// the state as of its subscription and hears every change after it.
    pub(super) link: Mutex<Option<ConnectionState>>,
    /// The latest partial transcript not yet shown to the turn detector
    /// (`hint_ready` says there is one, so a frame checks one flag).
    pub(super) hint: Mutex<Option<String>>,
    pub(super) hint_ready: AtomicBool,
    /// Whether user speech during a reply interrupts it: used by the input
    /// path (speech) and the session's task (transcripts, time, playout).
    pub(super) decider: Mutex<Decider>,
    /// The clock the decider's times count from.
    pub(super) epoch: Instant,
}

impl Shared {
    /// The decider, locked (briefly: it only computes).
    pub(super) fn decider(&self) -> std::sync::MutexGuard<'_, Decider> {
        self.decider.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `at` on the decider's clock.
    pub(super) fn since_epoch(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.epoch)
    }

    /// Keeps `partial` for the turn detector, which sees it with the next frame.
    pub(super) fn hint(&self, partial: &str) {
        let mut hint = self.hint.lock().unwrap_or_else(PoisonError::into_inner);
        *hint = Some(partial.to_owned());
        self.hint_ready.store(true, Ordering::Release);
    }

    /// The partial transcript kept since the last frame, if any.
    pub(super) fn take_hint(&self) -> Option<String> {
        if !self.hint_ready.load(Ordering::Acquire) {
            return None;
        }
        let mut hint = self.hint.lock().unwrap_or_else(PoisonError::into_inner);
        self.hint_ready.store(false, Ordering::Release);
        hint.take()
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

pub(super) fn state_code(s: PipelineState) -> u8 {
    match s {
        PipelineState::Idle => 0,
        PipelineState::Listening => 1,
        PipelineState::Processing => 2,
        PipelineState::Speaking => 3,
        PipelineState::Error => 4,
    }
}

impl Shared {
    pub(super) fn emit(&self, event: SessionEvent) {
        // No subscriber is fine: events are not kept for later.
        let _ = self.events.send(event);
    }

    pub(super) fn set_state(&self, to: PipelineState) {
        let from = state_from(self.state.swap(state_code(to), Ordering::AcqRel));
        if from != to {
            self.emit(SessionEvent::State { from, to });
        }
    }

    pub(super) fn state(&self) -> PipelineState {
        state_from(self.state.load(Ordering::Acquire))
    }

    /// Publishes the link's new state (kept for later subscribers when the
    /// session has a link).
    pub(super) fn connection(&self, state: ConnectionState) {
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
    pub(super) fn finish(&self) {
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
pub(super) struct Finish(pub(super) Arc<Shared>);

impl Drop for Finish {
    fn drop(&mut self) {
        self.0.finish();
    }
}
