//! The session's side of a link: the user's audio and turn ends to the
//! service ([`Input`]), and the speaker that speaks the agent's replies
//! through it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::*;
use crate::audio::{AudioFormat, AudioFrame, FormatFollower};
use crate::error::{BackendError, ErrorCode, Result};
use crate::pipeline::TextToSpeech;

/// A message waiting to go to the service, not yet encoded.
pub(super) enum Outbound {
    /// The user's audio, in the protocol's input format: stale once the
    /// service was away, and dropped then.
    Audio(AudioFrame),
    /// Text of the agent's reply `reply`: still wanted after a reconnect
    /// while that reply is the one in flight.
    Reply { reply: u64, text: String },
    /// The end of the agent's reply `reply`.
    ReplyEnd { reply: u64 },
    /// The user barged in.
    Cancel,
    /// The user's turn ended.
    EndOfTurn,
}

pub(super) enum SpeakerMsg {
    Audio(AudioFrame),
    Done,
    Failed(String),
}

/// The spoken reply in flight: where the service's audio goes while it
/// speaks the agent's text.
pub(super) struct Sink {
    pub(super) id: u64,
    pub(super) format: AudioFormat,
    pub(super) tx: mpsc::Sender<SpeakerMsg>,
    pub(super) heard: bool,
}

pub(super) struct Shared {
    pub(super) service: &'static str,
    pub(super) counters: Arc<LinkCounters>,
    pub(super) sink: Mutex<Option<Sink>>,
    pub(super) next_reply: AtomicU64,
    /// Set when the link is lost for good, with why.
    pub(super) failed: Mutex<Option<String>>,
    pub(super) is_failed: AtomicBool,
    pub(super) reply_timeout: Duration,
}

impl Shared {
    pub(super) fn sink(&self) -> std::sync::MutexGuard<'_, Option<Sink>> {
        self.sink.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn lost(&self, op: &'static str) -> BackendError {
        let why = self
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "the link task ended".into());
        BackendError::new(
            op,
            ErrorCode::ConnectionFailed,
            format!("the session's link to {} is lost: {why}", self.service),
        )
    }
}

/// The user's audio and turn ends to the service.
pub(super) struct Input {
    pub(super) out: mpsc::Sender<Outbound>,
    pub(super) shared: Arc<Shared>,
    pub(super) format: AudioFormat,
    pub(super) converter: FormatFollower,
}

impl Input {
    pub(super) fn queue(&self, op: &'static str, message: Outbound) -> Result<()> {
        match self.out.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.counters.dropped_input();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.shared.lost(op)),
        }
    }
}

impl LinkInput for Input {
    fn push_audio(&mut self, frame: &AudioFrame) -> Result<()> {
        const OP: &str = "link.push_audio";
        if self.shared.is_failed.load(Ordering::Acquire) {
            return Err(self.shared.lost(OP));
        }
        match self.converter.convert(frame.clone(), self.format)? {
            Some(frame) => self.queue(OP, Outbound::Audio(frame)),
            None => Ok(()),
        }
    }

    fn end_turn(&mut self) -> Result<()> {
        self.queue("link.end_turn", Outbound::EndOfTurn)
    }

    fn cancel(&mut self) {
        // The reply in flight stops hearing the service (its sink goes);
        // the service is told if its protocol has a way to say it.
        self.shared.sink().take();
        let _ = self.out.try_send(Outbound::Cancel);
    }
}

/// Speaks the agent's text through the service.
pub(super) struct Speaker {
    pub(super) out: mpsc::Sender<Outbound>,
    pub(super) shared: Arc<Shared>,
}

/// Removes its reply's sink when the reply ends or is dropped (barge-in).
pub(super) struct SinkGuard<'a> {
    pub(super) shared: &'a Shared,
    pub(super) id: u64,
}

impl Drop for SinkGuard<'_> {
    fn drop(&mut self) {
        let mut sink = self.shared.sink();
        if sink.as_ref().is_some_and(|s| s.id == self.id) {
            *sink = None;
        }
    }
}

#[async_trait]
impl TextToSpeech for Speaker {
    async fn synthesize(
        &self,
        text: &str,
        format: AudioFormat,
        out: &mpsc::Sender<AudioFrame>,
    ) -> Result<()> {
        const OP: &str = "link.speak";
        let service = self.shared.service;
        if self.shared.is_failed.load(Ordering::Acquire) {
            return Err(self.shared.lost(OP));
        }
        let (tx, mut rx) = mpsc::channel(EVENT_QUEUE);
        let id = self.shared.next_reply.fetch_add(1, Ordering::Relaxed);
        *self.shared.sink() = Some(Sink {
            id,
            format,
            tx,
            heard: false,
        });
        let _guard = SinkGuard {
            shared: &self.shared,
            id,
        };
        for message in [
            Outbound::Reply {
                reply: id,
                text: text.to_owned(),
            },
            Outbound::ReplyEnd { reply: id },
        ] {
            self.out
                .send(message)
                .await
                .map_err(|_| self.shared.lost(OP))?;
        }
        let mut heard = false;
        loop {
            let wait = if heard {
                REPLY_IDLE_END
            } else {
                self.shared.reply_timeout
            };
            match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(SpeakerMsg::Audio(frame))) => {
                    heard = true;
                    if out.send(frame).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(Some(SpeakerMsg::Done)) | Ok(None) => return Ok(()),
                Ok(Some(SpeakerMsg::Failed(why))) => {
                    return Err(BackendError::new(
                        OP,
                        ErrorCode::ConnectionFailed,
                        format!("{service}'s connection dropped mid-reply: {why}"),
                    ));
                }
                Err(_) if heard => return Ok(()),
                Err(_) => {
                    return Err(BackendError::new(
                        OP,
                        ErrorCode::Timeout,
                        format!(
                            "{service} spoke no audio for the reply within timeout = {}",
                            humantime::format_duration(self.shared.reply_timeout)
                        ),
                    ));
                }
            }
        }
    }
}
