//! The preemptive reply (`[preemptive]`, opt-in): the agent starts on a
//! stable partial transcript, before the turn's final transcript comes, and
//! what it produces is held until the final decides.
//!
//! - While the user's turn is open and nothing is being answered, each
//!   partial's words (without case and punctuation) are watched: once the
//!   same words have stood for `stable_for` (and hold `min_words` words), an
//!   [`Attempt`] starts: the agent answers the partial, then synthesis, as
//!   any reply, but on a channel of its own. What it sends (its text, its
//!   audio) is held in the attempt, in order, with when it came: nothing is
//!   emitted, queued for playout or added to the history.
//! - The turn's final transcript (with what was carried into it) decides:
//!   the same words, and the attempt becomes the reply in flight (its
//!   channel becomes the session task's reply channel, the turn opens in the
//!   history, what was held is handled as if it had just come, and it goes
//!   on streaming); other words, and it is dropped (the future with it, as a
//!   barge-in drops a reply) and the final is answered as usual.
//! - A partial with other words drops the attempt at once (`dropped`) and
//!   is watched in turn: a turn may start up to `max_attempts` attempts,
//!   one at a time; past that it is answered on its final transcript.
//!   A barge-in, a text turn, a turn given up on or failed drop it too.
//!
//! The turn's latency event carries the gain: from the attempt's start to
//! the final transcript's arrival.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::PreemptiveConfig;
use crate::error::Result;
use crate::metrics::PreemptiveOutcome;
use crate::session::PipelineState;

use super::interruption::words;
use super::reply::{ReplyFuture, ReplyMsg, reply_future};
use super::task::Task;

/// The reply channel's size, as the session task's own.
const CHANNEL: usize = 32;

/// The session's preemptive replies: the policy, the partial being watched
/// and the attempt in flight.
pub(super) struct Preemptive {
    policy: PreemptiveConfig,
    /// The latest partial's words (joined by spaces), its text, and since
    /// when those words have stood.
    candidate: Option<(String, String, Instant)>,
    /// Attempts this turn has started.
    tries: u32,
    /// The attempt in flight, held until the final transcript.
    pub(super) attempt: Option<Attempt>,
    /// Attempts started so far (each new one is polled at once).
    pub(super) started: u64,
}

/// A reply started on a partial transcript, held.
pub(super) struct Attempt {
    /// The partial's words, joined by spaces.
    words: String,
    started_at: Instant,
    /// The reply; `None` once it has ended (with `result`).
    pub(super) reply: Option<ReplyFuture>,
    result: Option<Result<()>>,
    tx: mpsc::Sender<ReplyMsg>,
    pub(super) rx: mpsc::Receiver<ReplyMsg>,
    /// What the reply sent, and when.
    held: Vec<(Instant, ReplyMsg)>,
    /// Where the turn's retention answer goes (`None`: nothing is kept).
    retain: Option<Arc<AtomicU8>>,
}

impl Attempt {
    /// The reply sent `msg`: held.
    pub(super) fn hold(&mut self, msg: ReplyMsg) {
        self.held.push((Instant::now(), msg));
    }

    /// The reply ended: what it sent before is held, then its result.
    pub(super) fn ended(&mut self, result: Result<()>) {
        self.reply = None;
        while let Ok(msg) = self.rx.try_recv() {
            self.hold(msg);
        }
        self.result = Some(result);
    }
}

/// `text`'s words, lower-cased without punctuation, joined by spaces.
fn normalized(text: &str) -> String {
    words(text).join(" ")
}

impl Preemptive {
    pub(super) fn new(policy: PreemptiveConfig) -> Self {
        Preemptive {
            policy,
            candidate: None,
            tries: 0,
            attempt: None,
            started: 0,
        }
    }

    /// When the partial being watched has stood long enough.
    pub(super) fn due(&self) -> Option<Instant> {
        if self.spent() || self.attempt.is_some() {
            return None;
        }
        self.candidate
            .as_ref()
            .map(|(_, _, since)| *since + self.policy.stable_for)
    }

    /// This turn has started all the attempts it may.
    fn spent(&self) -> bool {
        self.tries >= self.policy.max_attempts
    }
}

impl Task {
    /// Whether the session is between replies, listening to a turn that has
    /// not ended: a partial now belongs to a turn nothing answers yet.
    fn may_preempt(&self) -> bool {
        let p = &self.preemptive;
        p.policy.enabled
            && !p.spent()
            && p.attempt.is_none()
            && self.finals.enabled
            && self.finals.pending == 0
            && self.finals.carried.is_empty()
            && self.reply.is_none()
            && self.deferred.is_none()
            && self.paused_from.is_none()
            && self.playout.pending.is_empty()
            && !self.shared.replying.load(Ordering::Acquire)
            && self.shared.state() == PipelineState::Listening
    }

    /// A partial transcript came: watched for stability (an attempt starts
    /// at once with `stable_for = 0`), or an attempt on other words is
    /// dropped.
    pub(super) fn preempt_partial(&mut self, text: &str) {
        let heard = normalized(text);
        if let Some(a) = &self.preemptive.attempt {
            if a.words == heard {
                return;
            }
            // The user said more (or something else): the new words are
            // watched for the turn's next attempt, if it has one left.
            self.drop_attempt();
        }
        if !self.may_preempt() {
            return;
        }
        let now = Instant::now();
        let words = heard.split(' ').filter(|w| !w.is_empty()).count();
        if words < self.preemptive.policy.min_words as usize {
            self.preemptive.candidate = None;
            return;
        }
        match &mut self.preemptive.candidate {
            // The same words: they stand on (the latest text is asked).
            Some((w, t, _)) if *w == heard => *t = text.to_owned(),
            _ => self.preemptive.candidate = Some((heard, text.to_owned(), now)),
        }
        if self.preemptive.policy.stable_for == Duration::ZERO {
            self.preempt_if_stable(now);
        }
    }

    /// The timer fired: starts the attempt if the watched partial has stood
    /// for `stable_for`, and the session still waits for its turn to end.
    pub(super) fn preempt_if_stable(&mut self, now: Instant) {
        if self.preemptive.due().is_none_or(|due| due > now) {
            return;
        }
        if !self.may_preempt() {
            self.preemptive.candidate = None;
            return;
        }
        let Some((heard, text, _)) = self.preemptive.candidate.take() else {
            return;
        };
        let agent = self
            .shared
            .agent
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(agent) = agent else {
            // Nothing to ask: the final transcript reports it.
            return;
        };
        self.preemptive.tries += 1;
        // The turn before is over: what a reply started now would do.
        self.history.close(0);
        let (before, retain) = self.history.prepare(agent.history_limit());
        let asked = retain.clone().zip(self.history.hook());
        let (tx, rx) = mpsc::channel(CHANNEL);
        // The turn this partial belongs to, once it ends.
        let turn = self.shared.turns.load(Ordering::Acquire) + 1;
        let reply = reply_future(
            &self.shared,
            agent,
            &self.tts,
            &tx,
            before,
            asked,
            turn,
            text,
        );
        tracing::debug!(turn, "preemptive reply started");
        self.preemptive.attempt = Some(Attempt {
            words: heard,
            started_at: now,
            reply: Some(reply),
            result: None,
            tx,
            rx,
            held: Vec::new(),
            retain,
        });
        self.preemptive.started += 1;
    }

    /// Drops the attempt in flight, unheard (counted as `dropped`).
    pub(super) fn drop_attempt(&mut self) {
        if self.preemptive.attempt.take().is_some() {
            self.shared
                .metrics
                .preemptive_reply(PreemptiveOutcome::Dropped);
        }
    }

    /// The turn is over (answered, cut, given up on): the next one may have
    /// its attempt; an attempt still held is dropped.
    pub(super) fn preempt_turn_over(&mut self) {
        self.drop_attempt();
        self.preemptive.tries = 0;
        self.preemptive.candidate = None;
    }

    /// The turn's final transcript came, to be answered as `text`: the
    /// attempt becomes the reply if its words are the same (true), or is
    /// dropped (false: the caller starts the reply).
    pub(super) fn preempt_final(
        &mut self,
        text: &str,
        reply_rx: &mut mpsc::Receiver<ReplyMsg>,
    ) -> bool {
        let attempt = self.preemptive.attempt.take();
        self.preemptive.tries = 0;
        self.preemptive.candidate = None;
        let Some(mut a) = attempt else {
            return false;
        };
        if a.words != normalized(text) {
            self.shared
                .metrics
                .preemptive_reply(PreemptiveOutcome::Dropped);
            return false;
        }
        self.shared
            .metrics
            .preemptive_reply(PreemptiveOutcome::Used);
        let now = Instant::now();
        self.clock.preemptive = Some(now.saturating_duration_since(a.started_at));
        if self.reply.is_some() {
            while let Ok(msg) = reply_rx.try_recv() {
                self.on_reply_msg(msg);
            }
        }
        self.history.close(0);
        self.history
            .open_turn(text, self.tts.is_some(), a.retain.take());
        // The attempt's channel is the reply channel from now on.
        std::mem::swap(&mut self.reply_tx, &mut a.tx);
        std::mem::swap(reply_rx, &mut a.rx);
        self.reply = a.reply.take();
        self.replies += 1;
        for (at, msg) in std::mem::take(&mut a.held) {
            self.on_reply_msg_at(msg, at);
        }
        if let Some(result) = a.result.take() {
            self.reply_ended(result, reply_rx);
        }
        true
    }
}
