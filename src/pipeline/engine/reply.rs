//! The reply to a turn: the agent, then speech synthesis, as one future the
//! session task polls (and drops on a barge-in), and what it sends back.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use crate::agent::AgentTurn;
use crate::audio::AudioFrame;
use crate::error::{BackendError, ErrorCode, Result};
use crate::metrics::LatencyStage;
use crate::pipeline::events::SessionEvent;
use crate::pipeline::{INTERNAL_FORMAT, TextToSpeech};
use crate::session::PipelineState;

use super::latency::TurnClock;
use super::playout::{Playout, enqueue};
use super::shared::Shared;
use super::task::Task;

pub(super) enum ReplyMsg {
    AgentText(String, Duration),
    TtsStarted,
    Audio(AudioFrame),
}

pub(super) type ReplyFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

impl Task {
    /// Starts the reply to `text`, first handling what a reply it replaces
    /// had sent (the reply channel holds only the current reply's messages).
    pub(super) fn start_reply(&mut self, reply_rx: &mut mpsc::Receiver<ReplyMsg>, text: String) {
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
    pub(super) fn on_reply_msg(&mut self, msg: ReplyMsg) {
        on_reply_msg(&self.shared, &mut self.playout, &mut self.clock, msg);
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
        }
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
