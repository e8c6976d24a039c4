//! Links: a session's live connection to a provider's service, and the
//! link kit providers build theirs with.
//!
//! A [`Connector`](super::Connector) opens one [`Link`] per session, of one
//! of two kinds:
//!
//! - a [`ServiceLink`], to a service that runs pipeline stages itself (a
//!   Pipecat bot transcribes and speaks): the session's engine streams the
//!   user's audio over it instead of into local components ([`LinkInput`]),
//!   takes transcripts, reply audio and interruptions from it
//!   ([`LinkEvent`]), and, when the application supplied an agent, hands the
//!   agent's reply back to the service to be spoken (the speaker). Who ends
//!   the user's turn is the provider's [`TurnPolicy`]: the service, or the
//!   local turn detector, which then tells the service
//!   ([`LinkInput::end_turn`]).
//! - a [`MediaLink`], to a service that only carries the session's media (a
//!   LiveKit room): the user's audio comes from it, the reply goes to it, and
//!   the whole pipeline runs in process.
//!
//! The kit: [`LinkEvents`] (the one queue policy for a link's events),
//! [`RetryPolicy`] (exponential backoff with full jitter) and, with the
//! `link-websocket` feature, [`WebSocketLink`]: a provider whose service
//! speaks over a WebSocket writes only its [`WireProtocol`].
//!
//! [`TurnPolicy`]: crate::provider::TurnPolicy

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::audio::AudioFrame;
use crate::config::{Config, SessionConfig};
use crate::error::{BackendError, ErrorCode, Result};
use crate::pipeline::TextToSpeech;
pub use crate::pipeline::link::{LinkEvent, LinkInput};
use crate::session::SessionInfo;
use crate::session::events::SessionEvent;

#[cfg(feature = "link-websocket")]
mod websocket;
#[cfg(feature = "link-websocket")]
pub use websocket::{
    Dial, ENDPOINT_INFO_KEY, ENDPOINT_STAGE, Endpoints, Fallbacks, LinkCounters, LinkSettings,
    WebSocketLink, WireEvent, WireProtocol, WsMessage, WsStream, endpoint_of,
};

/// What became of an event handed to [`LinkEvents`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handed {
    /// Queued for the session's task.
    Queued,
    /// Audio dropped: the queue was full. The link counts it.
    Dropped,
    /// The session is gone: the link may end.
    SessionGone,
}

/// The sending side of a [`Link`]'s events, made with its receiver by
/// [`LinkEvents::channel`].
///
/// One policy for every provider's link: audio that finds the queue full is
/// dropped (the session's task fell behind, or has not started yet, and stale
/// audio is worth less than a link that keeps reading its service); every
/// other event (a transcript, the end of a reply, a connection change) waits
/// for room, since losing it would lose a turn.
#[derive(Clone, Debug)]
pub struct LinkEvents {
    tx: mpsc::Sender<LinkEvent>,
}

impl LinkEvents {
    /// A queue of `capacity` events: the sender for the link's task, the
    /// receiver for [`ServiceLink::events`].
    pub fn channel(capacity: usize) -> (LinkEvents, mpsc::Receiver<LinkEvent>) {
        let (tx, rx) = mpsc::channel(capacity);
        (LinkEvents { tx }, rx)
    }

    /// Hands over `event`: audio without waiting (dropped when the queue is
    /// full), anything else once there is room.
    pub async fn send(&self, event: LinkEvent) -> Handed {
        match event {
            LinkEvent::Audio(frame) => self.audio(frame),
            event => match self.tx.send(event).await {
                Ok(()) => Handed::Queued,
                Err(_) => Handed::SessionGone,
            },
        }
    }

    /// Hands over reply audio without waiting: dropped when the queue is full.
    pub fn audio(&self, frame: AudioFrame) -> Handed {
        match self.tx.try_send(LinkEvent::Audio(frame)) {
            Ok(()) => Handed::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => Handed::Dropped,
            Err(mpsc::error::TrySendError::Closed(_)) => Handed::SessionGone,
        }
    }

    /// Resolves once the session is gone (its receiver dropped).
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// How a link (or a connector) retries: `max_retries` retries after the
/// first attempt, each bounded by `timeout`, with exponential backoff and
/// full jitter: before retry `n` it waits a time drawn evenly between zero
/// and `retry_delay` × 2ⁿ⁻¹ (at most a minute), so that the links of a
/// service that dropped them all do not come back in lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// The delay before the first retry.
    pub retry_delay: Duration,
    /// The longest one attempt may take.
    pub timeout: Duration,
}

/// The longest delay between two attempts.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

impl RetryPolicy {
    /// The policy a config asks for (`max_retries`, `retry_delay`, `timeout`).
    pub fn from_config(config: &Config) -> Self {
        RetryPolicy {
            max_retries: config.max_retries,
            retry_delay: config.retry_delay,
            timeout: config.timeout,
        }
    }

    /// The longest delay before retry number `retry` (counted from 1):
    /// `retry_delay` doubled `retry - 1` times, at most a minute.
    pub fn delay(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(16);
        self.retry_delay
            .saturating_mul(1 << doublings)
            .min(MAX_RETRY_DELAY)
    }

    /// The delay before retry number `retry` with full jitter: drawn evenly
    /// from zero to [`RetryPolicy::delay`].
    pub fn jittered(&self, retry: u32) -> Duration {
        self.delay(retry).mul_f64(fastrand::f64())
    }

    /// Runs `attempt` until it succeeds: each try bounded by `timeout`,
    /// retryable errors retried after [`RetryPolicy::delay`] (`on_retry`
    /// hears of each: retry number, delay, error), other errors returned at
    /// once. The runtime connects and opens links with it; a link reconnects
    /// with it.
    ///
    /// # Errors
    ///
    /// The last error, as `ConnectionFailed` (or the code of a
    /// non-retryable cause) saying `could not connect to {service} after N
    /// attempt(s)`, with the detail `attempts` and the cause as source.
    pub async fn run<T, F, Fut>(
        &self,
        op: &'static str,
        service: &str,
        mut attempt: F,
        mut on_retry: impl FnMut(u32, Duration, &BackendError),
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut retries = 0u32;
        loop {
            let outcome = match tokio::time::timeout(self.timeout, attempt()).await {
                Ok(r) => r,
                Err(_) => Err(BackendError::new(
                    op,
                    ErrorCode::ConnectionTimeout,
                    format!(
                        "connecting took longer than timeout = {}",
                        humantime::format_duration(self.timeout)
                    ),
                )),
            };
            match outcome {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && retries < self.max_retries => {
                    retries += 1;
                    let delay = self.jittered(retries);
                    on_retry(retries, delay, &e);
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    let attempts = retries + 1;
                    let code = if e.is_retryable() {
                        ErrorCode::ConnectionFailed
                    } else {
                        e.code
                    };
                    return Err(BackendError::new(
                        op,
                        code,
                        format!(
                            "could not connect to {service} after {attempts} attempt(s): {}",
                            e.message
                        ),
                    )
                    .with_detail("attempts", attempts.to_string())
                    .with_source(e));
                }
            }
        }
    }
}

/// What a connector is told when it opens a session's link.
#[derive(Clone, Copy)]
#[non_exhaustive]
pub struct LinkRequest<'a> {
    /// The session's id.
    pub session_id: &'a str,
    /// The session's user.
    pub user_id: &'a str,
    /// The backend's config.
    pub config: &'a Config,
    /// The session's own config: its transport, `connection_url`, metadata
    /// and audio formats.
    pub session: &'a SessionConfig,
    /// How to retry when the link drops during the session.
    pub retry: RetryPolicy,
    /// The backend's metrics: a link counts there what it drops
    /// ([`Metrics::dropped`](crate::metrics::Metrics::dropped)), e.g. user
    /// audio the service cannot take fast enough.
    pub metrics: &'a Arc<crate::metrics::Metrics>,
    /// Where the provider publishes what the application needs to know of
    /// the session (a room, the user's join token, a server URL, a call
    /// id): [`VoiceSession::info`](crate::session::VoiceSession::info) and
    /// `serve`'s `ready` message carry it.
    pub info: &'a SessionInfo,
    /// The session is being restored (after a restart, or on another
    /// instance sharing the session store): what the provider had published
    /// on it before (a room, a call id), to re-attach to rather than start
    /// anew. `info` starts with the same values. `None` for a new session.
    pub restored: Option<&'a SessionInfo>,
}

impl<'a> LinkRequest<'a> {
    /// A request for the session `session_id` of `session`'s user.
    pub fn new(
        session_id: &'a str,
        config: &'a Config,
        session: &'a SessionConfig,
        metrics: &'a Arc<crate::metrics::Metrics>,
        info: &'a SessionInfo,
    ) -> Self {
        LinkRequest {
            session_id,
            user_id: &session.user_id,
            config,
            session,
            retry: RetryPolicy::from_config(config),
            metrics,
            info,
            restored: None,
        }
    }

    /// The same request, for a session restored with `info` as its provider
    /// had published it ([`LinkRequest::restored`]).
    pub fn with_restored(mut self, info: Option<&'a SessionInfo>) -> Self {
        self.restored = info;
        self
    }

    /// The session's metadata.
    pub fn metadata(&self) -> &'a BTreeMap<String, serde_json::Value> {
        &self.session.metadata
    }
}

impl fmt::Debug for LinkRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkRequest")
            .field("session_id", &self.session_id)
            .field("user_id", &self.user_id)
            .field("transport", &self.session.transport)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// A session's open link to the provider's service: to a service that runs
/// pipeline stages itself ([`ServiceLink`]), or to one that only carries the
/// session's media ([`MediaLink`]).
#[derive(Debug)]
pub enum Link {
    /// The service runs pipeline stages itself.
    Service(ServiceLink),
    /// The service carries the session's media; the pipeline runs in
    /// process.
    Media(MediaLink),
}

/// A link to a service that runs pipeline stages (STT and TTS, maybe the
/// LLM) itself.
///
/// - `input` takes every frame of the user's audio (in the pipeline's
///   internal format) once the session runs, the end of each user turn when
///   the local turn detector ends turns, and barge-ins;
/// - `events` brings what the service says: transcripts, its own reply text
///   and audio, the end of a reply, interruptions and the link's connection
///   state;
/// - `speaker`, when set, speaks the application agent's replies through
///   the service. With an agent set on the session, each final transcript
///   goes to the agent and its reply to `speaker`; without one, the service
///   answers by itself and its audio is relayed.
pub struct ServiceLink {
    /// What goes to the service.
    pub input: Box<dyn LinkInput>,
    /// What the service sends back.
    pub events: mpsc::Receiver<LinkEvent>,
    /// Speaks the agent's replies through the service.
    pub speaker: Option<Arc<dyn TextToSpeech>>,
}

impl fmt::Debug for ServiceLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceLink")
            .field("speaker", &self.speaker.is_some())
            .finish_non_exhaustive()
    }
}

/// A link that carries the session's media: the user's audio comes in from
/// the service (a participant's track in a room), the session's reply audio
/// goes out to it, and the runtime runs the whole pipeline in process
/// between them. The application reads the session's events as with any
/// session; its reply audio goes to the link, not to
/// [`VoiceSession::receive_audio`](crate::session::VoiceSession::receive_audio).
pub struct MediaLink {
    /// The user's audio, in any format (the session converts it).
    pub audio_in: mpsc::Receiver<AudioFrame>,
    /// Where the session's reply audio goes, in the session's output format.
    pub audio_out: mpsc::Sender<AudioFrame>,
    /// The link's connection changes and failure ([`LinkEvent::Connection`],
    /// [`LinkEvent::Failed`]; other events are ignored).
    pub events: mpsc::Receiver<LinkEvent>,
    /// Where the session's own events go, when the service relays them (a
    /// room's data channel carrying transcripts and agent text): every
    /// [`SessionEvent`] the session emits, in order, up to its
    /// [`SessionEvent::Closed`], after which the sender is dropped. A
    /// sender that falls behind loses events (counted as
    /// [`DropReason::EventOverflow`](crate::metrics::DropReason::EventOverflow)),
    /// never holding the session up. `None`: nothing is relayed.
    pub session_events: Option<mpsc::Sender<SessionEvent>>,
}

impl fmt::Debug for MediaLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MediaLink")
            .field("session_events", &self.session_events.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn silence() -> AudioFrame {
        AudioFrame::new(crate::pipeline::INTERNAL_FORMAT, vec![0u8; 640]).unwrap()
    }

    #[tokio::test]
    async fn audio_is_dropped_when_full_and_other_events_wait_for_room() {
        let (events, mut rx) = LinkEvents::channel(2);
        assert_eq!(events.audio(silence()), Handed::Queued);
        assert_eq!(
            events.send(LinkEvent::Audio(silence())).await,
            Handed::Queued
        );
        assert_eq!(events.audio(silence()), Handed::Dropped);
        assert_eq!(
            events.send(LinkEvent::Audio(silence())).await,
            Handed::Dropped
        );
        // A transcript waits until the session's task takes something.
        let sender = events.clone();
        let transcript = tokio::spawn(async move {
            sender
                .send(LinkEvent::UserTranscript {
                    text: "hello".into(),
                    is_final: true,
                })
                .await
        });
        tokio::task::yield_now().await;
        assert!(!transcript.is_finished(), "it waits for room");
        assert!(matches!(rx.recv().await, Some(LinkEvent::Audio(_))));
        assert_eq!(transcript.await.unwrap(), Handed::Queued);
        assert!(matches!(rx.recv().await, Some(LinkEvent::Audio(_))));
        assert!(matches!(
            rx.recv().await,
            Some(LinkEvent::UserTranscript { ref text, .. }) if text == "hello"
        ));
        drop(rx);
        assert_eq!(events.audio(silence()), Handed::SessionGone);
        assert_eq!(events.send(LinkEvent::ReplyDone).await, Handed::SessionGone);
        events.closed().await;
    }

    #[test]
    fn jittered_delays_spread_over_zero_to_the_bound() {
        let p = RetryPolicy {
            max_retries: 20,
            retry_delay: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
        };
        for retry in [1, 3, 20] {
            let bound = p.delay(retry);
            let draws: Vec<Duration> = (0..2000).map(|_| p.jittered(retry)).collect();
            assert!(draws.iter().all(|d| *d <= bound), "retry {retry}");
            // Spread over the whole range, not bunched (lockstep) at one point.
            let low = draws.iter().filter(|d| **d < bound / 4).count();
            let high = draws.iter().filter(|d| **d > bound * 3 / 4).count();
            assert!(
                low > 300 && high > 300,
                "retry {retry}: {low} low, {high} high"
            );
        }
    }

    #[test]
    fn delays_double_from_retry_delay_up_to_a_minute() {
        let p = RetryPolicy {
            max_retries: 20,
            retry_delay: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(p.delay(1), Duration::from_millis(100));
        assert_eq!(p.delay(2), Duration::from_millis(200));
        assert_eq!(p.delay(4), Duration::from_millis(800));
        assert_eq!(p.delay(20), MAX_RETRY_DELAY);
    }
}
