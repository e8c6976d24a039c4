//! The reply to a turn: the agent, then speech synthesis, as one future the
//! session task polls (and drops on a barge-in), and what it sends back; a
//! streamed reply is synthesized sentence by sentence as it comes. And the
//! session's conversation history, which each turn hands to the agent.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, PoisonError};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

#[cfg(doc)]
use crate::agent::Agent;
use crate::agent::{AgentTurn, DEFAULT_HISTORY_LIMIT, Message, Sentences};
use crate::audio::AudioFrame;
use crate::error::{BackendError, ErrorCode, Result};
use crate::hooks::{DataKind, DataRetentionHook};
use crate::metrics::{LatencyStage, Op};
use crate::pipeline::events::SessionEvent;
use crate::pipeline::{INTERNAL_FORMAT, S2sEvent, TextToSpeech};
use crate::session::{PipelineState, SessionId};

use super::playout::enqueue;
use super::shared::Shared;
use super::task::Task;

pub(super) enum ReplyMsg {
    /// The agent answered (a streamed reply: its first chunk came), this
    /// long after the turn was handed to it.
    Answered(Duration),
    /// What the agent said, for [`SessionEvent::AgentText`].
    AgentText(String),
    TtsStarted,
    /// A piece of the reply's text goes to synthesis; its audio follows.
    Piece(String),
    Audio(AudioFrame),
}

pub(super) type ReplyFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// The retention hook's answer for a turn ([`Exchange::retain`]).
const RETAIN_UNKNOWN: u8 = 0;
const RETAIN_KEEP: u8 = 1;
const RETAIN_REFUSED: u8 = 2;

/// The session's conversation as its agent sees it ([`AgentTurn::history`]):
/// kept by the session's task, per session. See the agent module's
/// documentation for what is kept.
pub(super) struct History {
    /// Kept messages, oldest first.
    messages: VecDeque<Message>,
    /// Messages kept at most (the agent's [`Agent::history_limit`] as of
    /// the last turn).
    limit: usize,
    /// The backend's data-retention hook, asked once per turn.
    hook: Option<Arc<dyn DataRetentionHook>>,
    /// The turn being answered, until it is over.
    open: Option<Exchange>,
    /// Where the conversation goes each time a turn joins it (the session
    /// store's copy).
    published: Option<tokio::sync::watch::Sender<Arc<[Message]>>>,
}

/// A turn being answered: what the user said and what of the reply was said.
struct Exchange {
    user: String,
    /// The retention hook's answer (`RETAIN_*`), stored by the reply.
    retain: Arc<AtomicU8>,
    /// The reply is spoken (there is speech synthesis).
    spoken: bool,
    /// The reply's text handed to synthesis, piece after piece.
    said: String,
    /// Each piece: the reply frames queued before its audio, and where it
    /// ends in `said`.
    pieces: Vec<(u64, usize)>,
    /// Reply frames queued for playout.
    frames: u64,
    /// What was sent as `AgentText`.
    text: Option<String>,
    /// The reply ended (all of it synthesized), or failed.
    done: bool,
    failed: bool,
}

impl History {
    pub(super) fn new(hook: Option<Arc<dyn DataRetentionHook>>) -> Self {
        History {
            messages: VecDeque::new(),
            limit: DEFAULT_HISTORY_LIMIT,
            hook,
            open: None,
            published: None,
        }
    }

    /// The history starting with `messages` (a restored session's), and
    /// publishing the conversation to `published` as turns join it.
    pub(super) fn restored(
        mut self,
        messages: Vec<Message>,
        published: Option<tokio::sync::watch::Sender<Arc<[Message]>>>,
    ) -> Self {
        self.messages = messages.into();
        self.published = published;
        self
    }

    /// The conversation before a new turn of `user`, at most `limit`
    /// messages, and the turn opened (unless nothing is kept), with the
    /// flag its retention answer goes to when the hook must be asked.
    fn begin(
        &mut self,
        limit: usize,
        user: &str,
        spoken: bool,
    ) -> (Arc<[Message]>, Option<Arc<AtomicU8>>) {
        let (before, retain) = self.prepare(limit);
        self.open_turn(user, spoken, retain.clone());
        (before, retain.filter(|_| self.hook.is_some()))
    }

    /// The conversation before a new turn, at most `limit` messages, and
    /// the flag the turn's retention answer goes to (`None` when nothing is
    /// kept), without opening the turn: a preemptive reply opens it
    /// ([`History::open_turn`]) only once it is used.
    pub(super) fn prepare(&mut self, limit: usize) -> (Arc<[Message]>, Option<Arc<AtomicU8>>) {
        self.limit = limit;
        self.trim();
        let before: Arc<[Message]> = self.messages.iter().cloned().collect();
        if limit == 0 {
            return (before, None);
        }
        let retain = Arc::new(AtomicU8::new(if self.hook.is_some() {
            RETAIN_UNKNOWN
        } else {
            RETAIN_KEEP
        }));
        (before, Some(retain))
    }

    /// Opens the turn of `user` being answered, its retention answer going
    /// to `retain` (from [`History::prepare`]; `None`: nothing is kept).
    pub(super) fn open_turn(&mut self, user: &str, spoken: bool, retain: Option<Arc<AtomicU8>>) {
        let Some(retain) = retain else { return };
        self.open = Some(Exchange {
            user: user.to_owned(),
            retain,
            spoken,
            said: String::new(),
            pieces: Vec::new(),
            frames: 0,
            text: None,
            done: false,
            failed: false,
        });
    }

    /// Whether the backend has a retention hook (it is asked per turn).
    pub(super) fn hook(&self) -> Option<Arc<dyn DataRetentionHook>> {
        self.hook.clone()
    }

    /// The reply in flight ended: in full, or with an error.
    pub(super) fn reply_over(&mut self, ok: bool) {
        if let Some(x) = self.open.as_mut() {
            x.done = true;
            x.failed = !ok;
        }
    }

    /// The turn being answered is over if its reply has ended and nothing
    /// of it is left to play: it joins the conversation now rather than when
    /// the next turn starts (the same messages either way), so the session
    /// store sees it.
    pub(super) fn close_if_done(&mut self) {
        if self.open.as_ref().is_some_and(|x| x.done) {
            self.close(0);
        }
    }

    /// The turn being answered is over, `unplayed` frames of its reply
    /// left unplayed (a cut one's), and joins the conversation if the
    /// retention hook allowed it.
    pub(super) fn close(&mut self, unplayed: usize) {
        let Some(x) = self.open.take() else {
            return;
        };
        if x.retain.load(Ordering::Acquire) != RETAIN_KEEP {
            return;
        }
        let reply = if !x.spoken || (x.done && !x.failed && unplayed == 0) {
            // All of it was said: sent as text, or spoken to the end.
            x.text.map(|t| (t, x.failed))
        } else {
            // The sentences whose audio started to reach the user.
            let played = x.frames.saturating_sub(unplayed as u64);
            x.pieces
                .iter()
                .rev()
                .find(|&&(before, _)| before < played)
                .map(|&(_, end)| (x.said[..end].to_owned(), true))
        };
        self.messages.push_back(Message::user(x.user));
        if let Some((text, cut)) = reply {
            let text = text.trim();
            if !text.is_empty() {
                self.messages.push_back(if cut {
                    Message::agent_interrupted(text)
                } else {
                    Message::agent(text)
                });
            }
        }
        self.trim();
        if let Some(tx) = &self.published {
            tx.send_replace(self.messages.iter().cloned().collect());
        }
    }

    fn trim(&mut self) {
        while self.messages.len() > self.limit {
            self.messages.pop_front();
        }
    }
}

impl Task {
    /// Starts the reply to `text`, first handling what a reply it replaces
    /// had sent (the reply channel holds only the current reply's messages).
    pub(super) fn start_reply(&mut self, reply_rx: &mut mpsc::Receiver<ReplyMsg>, text: String) {
        if self.reply.is_some() {
            while let Ok(msg) = reply_rx.try_recv() {
                self.on_reply_msg(msg);
            }
        }
        // The turn before is over (a reply in flight is dropped: it was
        // said as far as it got).
        self.history.close(0);
        self.reply = start_reply(
            &self.shared,
            &self.tts,
            &self.reply_tx,
            &mut self.history,
            self.clock.turn,
            text,
        );
        self.replies += 1;
        if self.reply.is_none() {
            self.reply_done = true;
        }
    }

    pub(super) fn on_reply_msg(&mut self, msg: ReplyMsg) {
        self.on_reply_msg_at(msg, Instant::now());
    }

    /// Handles what the reply sent at `at` (a preemptive reply's messages
    /// are held, and handled once it is used, with when they came).
    pub(super) fn on_reply_msg_at(&mut self, msg: ReplyMsg, at: Instant) {
        let shared = &*self.shared;
        let clock = &mut self.clock;
        match msg {
            ReplyMsg::Answered(took) => {
                clock.agent = Some(took);
                shared.metrics.turn_latency(LatencyStage::Agent, took);
            }
            ReplyMsg::AgentText(text) => {
                if let Some(x) = self.history.open.as_mut() {
                    x.text = Some(text.clone());
                }
                shared.emit(SessionEvent::AgentText { text });
            }
            ReplyMsg::TtsStarted => clock.tts_started = Some(at),
            ReplyMsg::Piece(text) => {
                if let Some(x) = self.history.open.as_mut() {
                    x.said.push_str(&text);
                    x.pieces.push((x.frames, x.said.len()));
                }
            }
            ReplyMsg::Audio(frame) => {
                if let (None, Some(t)) = (clock.tts_first_audio, clock.tts_started) {
                    let took = at.saturating_duration_since(t);
                    clock.tts_first_audio = Some(took);
                    shared.metrics.turn_latency(LatencyStage::Tts, took);
                }
                let queued = self.playout.pending.len();
                enqueue(shared, &mut self.playout, frame);
                if self.playout.pending.len() > queued
                    && let Some(x) = self.history.open.as_mut()
                {
                    x.frames += 1;
                }
            }
        }
    }

    /// The reply in flight ended with `result`: what it sent before ending
    /// is handled first, then the turn settles.
    pub(super) fn reply_ended(
        &mut self,
        result: Result<()>,
        reply_rx: &mut mpsc::Receiver<ReplyMsg>,
    ) {
        self.reply = None;
        self.reply_done = true;
        // What the reply sent before finishing is handled before anything else.
        while let Ok(msg) = reply_rx.try_recv() {
            self.on_reply_msg(msg);
        }
        self.history.reply_over(result.is_ok());
        if let Err(e) = result {
            self.shared.metrics.error(Op::Turn, e.code);
            self.shared.emit(SessionEvent::Error {
                code: e.code,
                message: e.message.clone(),
            });
            tracing::warn!(code = %e.code, "turn failed: {}", e.message);
        }
        self.settle_if_silent();
    }

    /// The user cut the reply (barge-in): the turn is over with what of
    /// its reply had been played. Before the playout is cleared.
    pub(super) fn reply_cut(&mut self) {
        self.history.close(self.playout.pending.len());
    }

    /// A speech-to-speech model or link event, before it is handled: the
    /// service cutting the reply being played (its user barged in there)
    /// ends the turn as a local barge-in does.
    pub(super) fn before_s2s(&mut self, ev: &S2sEvent) {
        if matches!(ev, S2sEvent::Interrupted)
            && (self.shared.replying.load(Ordering::Acquire) || !self.playout.pending.is_empty())
        {
            self.reply_cut();
        }
    }

    /// A turn's answer is over without any audio to play (an agent error or
    /// timeout, empty text, no speaker, a speaker that said nothing or
    /// failed): back to listening. With audio, the playout does it once the
    /// audio has played ([`Task::idle_at`]).
    pub(super) fn settle_if_silent(&mut self) {
        if !self.clock.first_audio_sent
            && self.playout.pending.is_empty()
            && self.shared.state() == PipelineState::Processing
        {
            self.shared.replying.store(false, Ordering::Release);
            self.shared.set_state(PipelineState::Listening);
            self.history.close_if_done();
        }
    }
}

/// The agent then TTS for one turn, as a future the session task can drop.
fn start_reply(
    shared: &Arc<Shared>,
    tts: &Option<Arc<dyn TextToSpeech>>,
    reply_tx: &mpsc::Sender<ReplyMsg>,
    history: &mut History,
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
    let (before, asked) = history.begin(agent.history_limit(), &transcript, tts.is_some());
    Some(reply_future(
        shared,
        agent,
        tts,
        reply_tx,
        before,
        asked.zip(history.hook.clone()),
        turn,
        transcript,
    ))
}

/// The agent then TTS answering `transcript` as turn `turn`, after the
/// conversation `before`; with `retention`, the hook is asked whether the
/// turn may be kept, its answer stored in the flag.
#[allow(clippy::too_many_arguments)]
pub(super) fn reply_future(
    shared: &Arc<Shared>,
    agent: Arc<dyn crate::agent::Agent>,
    tts: &Option<Arc<dyn TextToSpeech>>,
    reply_tx: &mpsc::Sender<ReplyMsg>,
    before: Arc<[Message]>,
    retention: Option<(Arc<AtomicU8>, Arc<dyn DataRetentionHook>)>,
    turn: u64,
    transcript: String,
) -> ReplyFuture {
    let tts = tts.clone();
    let tx = reply_tx.clone();
    let turn_input = AgentTurn::new(
        shared.session_id.clone(),
        shared.user_id.clone(),
        transcript,
        turn,
    )
    .with_history(before);
    // Whether the turn may be kept: asked while the agent answers, within
    // the agent's time; no answer (or a panic) keeps nothing.
    let retention = retention.map(|(retain, hook)| {
        let session = SessionId::new(shared.session_id.as_str());
        let limit = shared.agent_timeout;
        async move {
            let allowed = tokio::time::timeout(
                limit,
                unwound(hook.should_retain(&session, DataKind::Transcript)),
            )
            .await;
            let answer = if matches!(allowed, Ok(Ok(true))) {
                RETAIN_KEEP
            } else {
                RETAIN_REFUSED
            };
            retain.store(answer, Ordering::Release);
        }
    });
    let shared = shared.clone();
    let fut = async move {
        let started = Instant::now();
        let limit = shared.agent_timeout;
        let deadline = started + limit;
        let answer =
            unwound(agent.respond(turn_input)).instrument(tracing::info_span!("agent", turn));
        let mut reply = match tokio::time::timeout_at(deadline, answer).await {
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
            Err(_) => return Err(agent_timed_out(turn, limit)),
        };
        if let Some(chunks) = reply.take_stream() {
            let stream = Stream {
                tts,
                tx,
                turn,
                started,
                deadline,
                limit,
            };
            return stream.speak(std::mem::take(&mut reply.text), chunks).await;
        }
        let _ = tx.send(ReplyMsg::Answered(started.elapsed())).await;
        let _ = tx.send(ReplyMsg::AgentText(reply.text.clone())).await;
        // Empty text, or no synthesis configured (the reply is text only):
        // the session task goes back to listening once the text is out.
        if reply.text.is_empty() {
            return Ok(());
        }
        let Some(tts) = tts else {
            return Ok(());
        };
        let _ = tx.send(ReplyMsg::TtsStarted).await;
        let _ = tx.send(ReplyMsg::Piece(reply.text.clone())).await;
        synthesize(&tts, &reply.text, &tx, turn).await
    };
    // A panic in synthesis (or anywhere in the reply) fails the reply, not
    // the session's task.
    let fut = async move {
        let reply = async move {
            unwound(fut).await.unwrap_or_else(|panic| {
                Err(BackendError::new(
                    "session.reply",
                    ErrorCode::PipelineError,
                    format!("the reply panicked: {panic}"),
                ))
            })
        };
        match retention {
            Some(retention) => tokio::join!(retention, reply).1,
            None => reply.await,
        }
    };
    Box::pin(fut)
}

fn agent_timed_out(turn: u64, limit: Duration) -> BackendError {
    BackendError::new(
        "session.agent",
        ErrorCode::Timeout,
        format!(
            "the agent did not answer turn {turn} within timeout = {}",
            humantime::format_duration(limit)
        ),
    )
}

/// Synthesizes `text` (one piece of a reply), its audio going to the
/// session task in order.
async fn synthesize(
    tts: &Arc<dyn TextToSpeech>,
    text: &str,
    tx: &mpsc::Sender<ReplyMsg>,
    turn: u64,
) -> Result<()> {
    let (ftx, mut frx) = mpsc::channel::<AudioFrame>(16);
    let synth = async move {
        let r = tts.synthesize(text, INTERNAL_FORMAT, &ftx).await;
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
}

/// A streamed reply being spoken.
struct Stream {
    tts: Option<Arc<dyn TextToSpeech>>,
    tx: mpsc::Sender<ReplyMsg>,
    turn: u64,
    started: Instant,
    /// When the first chunk is due.
    deadline: Instant,
    limit: Duration,
}

impl Stream {
    /// Reads the reply's chunks (after `text`, said first), cutting them
    /// into sentences, while the sentences cut so far are synthesized in
    /// order. Dropped (a barge-in), it drops `chunks`.
    async fn speak(self, text: String, mut chunks: mpsc::Receiver<Result<String>>) -> Result<()> {
        let Stream {
            tts,
            tx,
            turn,
            started,
            deadline,
            limit,
        } = self;
        let (piece_tx, mut piece_rx) = mpsc::unbounded_channel::<String>();
        let reader_tx = tx.clone();
        // Ends with the error the stream ended with, if any, once every
        // piece before it is cut.
        let reader = async move {
            let first = if text.is_empty() {
                match tokio::time::timeout_at(deadline, chunks.recv()).await {
                    Ok(Some(Err(mut e))) => {
                        e.code = ErrorCode::AgentError;
                        return Err(e);
                    }
                    Ok(first) => first,
                    Err(_) => return Err(agent_timed_out(turn, limit)),
                }
            } else {
                Some(Ok(text))
            };
            let _ = reader_tx.send(ReplyMsg::Answered(started.elapsed())).await;
            let mut sentences = Sentences::default();
            let mut full = String::new();
            let mut next = first;
            loop {
                match next {
                    Some(Ok(chunk)) => {
                        full.push_str(&chunk);
                        sentences.push(&chunk, |piece| {
                            let _ = piece_tx.send(piece);
                        });
                    }
                    Some(Err(mut e)) => {
                        // What was cut into sentences is spoken; the
                        // unfinished one is not.
                        full.truncate(full.len() - sentences.pending().len());
                        if !full.trim().is_empty() {
                            let _ = reader_tx.send(ReplyMsg::AgentText(full)).await;
                        }
                        e.code = ErrorCode::AgentError;
                        return Ok(Some(e));
                    }
                    None => {
                        if let Some(piece) = sentences.finish() {
                            let _ = piece_tx.send(piece);
                        }
                        let _ = reader_tx.send(ReplyMsg::AgentText(full)).await;
                        return Ok(None);
                    }
                }
                next = chunks.recv().await;
            }
        };
        let speaker = async move {
            let Some(tts) = tts else {
                // A text-only reply: nothing to say aloud.
                while piece_rx.recv().await.is_some() {}
                return Ok(());
            };
            let mut first = true;
            while let Some(piece) = piece_rx.recv().await {
                if std::mem::take(&mut first) {
                    let _ = tx.send(ReplyMsg::TtsStarted).await;
                }
                let _ = tx.send(ReplyMsg::Piece(piece.clone())).await;
                synthesize(&tts, piece.trim(), &tx, turn).await?;
            }
            Ok(())
        };
        // A failing synthesis drops the reader (and the stream) at once.
        match tokio::try_join!(reader, speaker)? {
            (Some(e), ()) => Err(e),
            (None, ()) => Ok(()),
        }
    }
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
