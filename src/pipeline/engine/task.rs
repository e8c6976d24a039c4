//! The session's task: everything that waits, in one loop ([`run`]).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::audio::{AudioConverter, FormatFollower};
use crate::error::{ErrorCode, Result};
use crate::hooks::DataRetentionHook;
use crate::metrics::Op;
use crate::pipeline::events::SessionEvent;
use crate::pipeline::link::RemoteEvents;
use crate::pipeline::{S2sEvent, SttEvent, TextToSpeech};
use crate::session::PipelineState;
use crate::wake::InputMarks;

use super::interrupting::Deferred;
use super::latency::TurnClock;
use super::playout::{Playout, release, send_out};
use super::preemptive::Preemptive;
use super::reply::{History, ReplyFuture, ReplyMsg};
use super::shared::{Control, Finish, Shared};
use super::turns::Finals;

pub(super) struct TaskParts {
    pub(super) control: mpsc::UnboundedReceiver<Control>,
    pub(super) stt_events: Option<mpsc::Receiver<SttEvent>>,
    pub(super) remote_events: Option<RemoteEvents>,
    pub(super) tts: Option<Arc<dyn TextToSpeech>>,
    pub(super) output_converter: Option<AudioConverter>,
    /// The data-retention hook, asked before a turn joins the history.
    pub(super) retention: Option<Arc<dyn DataRetentionHook>>,
    /// The conversation to start with (a restored session's).
    pub(super) history: Vec<crate::agent::Message>,
    /// Where the conversation goes each time a turn joins it.
    pub(super) history_tx: Option<tokio::sync::watch::Sender<Arc<[crate::agent::Message]>>>,
    /// When the agent starts on a stable partial transcript.
    pub(super) preemptive: crate::config::PreemptiveConfig,
}

/// The session task's inputs, one bit each in its [`Inputs`].
const IN_CONTROL: u8 = 1;
const IN_STT: u8 = 1 << 1;
const IN_S2S: u8 = 1 << 2;
const IN_REPLY: u8 = 1 << 3;
const IN_REPLY_MSG: u8 = 1 << 4;
const IN_PREEMPT: u8 = 1 << 5;
const IN_PREEMPT_MSG: u8 = 1 << 6;
const INPUTS: usize = 7;

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
    /// The preemptive reply held ended, or sent something.
    Preempt(Result<()>),
    PreemptMsg(ReplyMsg),
    Timer,
}

/// Events taken from a component's channel in one go, once the session task
/// is awake, before it looks at its other inputs again (a control message
/// waiting stops the batch early: it goes first, as it always has).
const EVENT_BATCH: usize = 64;

/// The session task's state, apart from the channels it waits on.
pub(super) struct Task {
    pub(super) shared: Arc<Shared>,
    pub(super) tts: Option<Arc<dyn TextToSpeech>>,
    pub(super) reply_tx: mpsc::Sender<ReplyMsg>,
    /// The agent/TTS reply in flight; only it sends on `reply_tx`.
    pub(super) reply: Option<ReplyFuture>,
    /// Replies started so far (each new one is polled at once).
    pub(super) replies: u64,
    pub(super) reply_done: bool,
    pub(super) clock: TurnClock,
    pub(super) playout: Playout,
    pub(super) stopping: Option<(Instant, oneshot::Sender<()>)>,
    /// A remote service's reply was cut: its audio still arriving is dropped
    /// until the service ends that reply or the user's next turn ends.
    pub(super) cut: bool,
    /// The speech-to-text stream's final transcripts, matched to turns.
    pub(super) finals: Finals,
    /// The conversation so far, for the agent.
    pub(super) history: History,
    /// The reply is paused by speech that interrupted it (the state it was
    /// in before), until the interruption is confirmed or found false.
    pub(super) paused_from: Option<PipelineState>,
    /// A turn that ended while the reply was paused, waiting for its final
    /// transcript.
    pub(super) deferred: Option<Deferred>,
    /// Replies started on a stable partial transcript, held until the
    /// final transcript.
    pub(super) preemptive: Preemptive,
}

impl Task {
    /// The nearest of the task's deadlines: release, idle, the final
    /// transcript and stop.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let stop_at = self.stopping.as_ref().map(|(d, _)| *d);
        [
            self.release_at(),
            self.idle_at(),
            self.finals.due,
            stop_at,
            self.interruption_due(),
            self.preemptive.due(),
        ]
        .into_iter()
        .flatten()
        .min()
    }
    /// The timer fired: tops the reply audio handed out up to the lead
    /// (stopping early for a waiting control message, which goes first), then
    /// goes back to listening if the reply has finished playing. Returns
    /// whether the stop deadline has passed.
    fn on_timer(&mut self, inputs: &Inputs, reply_rx: &mut mpsc::Receiver<ReplyMsg>) -> bool {
        let now = Instant::now();
        let step = self.shared.decider().tick(self.shared.since_epoch(now));
        if let Some(step) = step {
            self.interruption_step(step, reply_rx);
        }
        if self.finals.due.is_some_and(|due| due <= now) {
            // The transcript never came: the turn is given up on (a turn
            // that paused the reply said nothing, then).
            self.deferred_gave_up(reply_rx);
            self.finals.supersede(false);
            self.preempt_turn_over();
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
        self.preempt_if_stable(now);
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
            self.shared.decider().reset();
            self.shared.set_state(PipelineState::Listening);
            self.history.close_if_done();
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
pub(super) async fn run(shared: Arc<Shared>, parts: TaskParts) {
    let TaskParts {
        mut control,
        mut stt_events,
        mut remote_events,
        tts,
        output_converter,
        retention,
        history,
        history_tx,
        preemptive,
    } = parts;
    let _finish = Finish(shared.clone());
    let shared_link_finals = shared.link_finals;
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
            enabled: stt_events.is_some() || shared_link_finals,
            ..Finals::default()
        },
        history: History::new(retention).restored(history, history_tx),
        paused_from: None,
        deferred: None,
        preemptive: Preemptive::new(preemptive),
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
            if let Some(rx) = remote_events.as_mut()
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
            if let Some(a) = task.preemptive.attempt.as_mut() {
                if let Some(reply) = a.reply.as_mut()
                    && let Some(result) = inputs.poll(IN_PREEMPT, |cx| reply.as_mut().poll(cx))
                {
                    return Poll::Ready(Woke::Preempt(result));
                }
                if let Some(Some(msg)) = inputs.poll(IN_PREEMPT_MSG, |cx| a.rx.poll_recv(cx)) {
                    return Poll::Ready(Woke::PreemptMsg(msg));
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
        let preempts = task.preemptive.started;
        match woke {
            Woke::Control(Some(msg)) => task.on_control(msg, &mut remote_events, &mut reply_rx),
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
                task.before_s2s(&ev);
                task.on_s2s(ev, &mut reply_rx);
                for _ in 1..EVENT_BATCH {
                    let Some(rx) = remote_events.as_mut() else {
                        break;
                    };
                    if inputs.marked(IN_CONTROL) {
                        break;
                    }
                    match rx.try_recv() {
                        Some(ev) => {
                            task.before_s2s(&ev);
                            task.on_s2s(ev, &mut reply_rx);
                        }
                        None => break,
                    }
                }
            }
            Woke::S2s(None) => remote_events = None,
            Woke::Reply(result) => task.reply_ended(result, &mut reply_rx),
            Woke::ReplyMsg(msg) => task.on_reply_msg(msg),
            Woke::Preempt(result) => {
                if let Some(a) = task.preemptive.attempt.as_mut() {
                    a.ended(result);
                }
            }
            Woke::PreemptMsg(msg) => {
                if let Some(a) = task.preemptive.attempt.as_mut() {
                    a.hold(msg);
                }
            }
            Woke::Timer => {
                armed = None;
                if task.on_timer(&inputs, &mut reply_rx) {
                    break;
                }
            }
        }
        if task.replies != replies {
            // A new reply: poll it (and its channel) at once.
            inputs.mark(IN_REPLY | IN_REPLY_MSG);
        }
        if task.preemptive.started != preempts {
            inputs.mark(IN_PREEMPT | IN_PREEMPT_MSG);
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
