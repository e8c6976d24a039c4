//! One WebSocket connection: the `start` handshake, then the session's audio,
//! text and events both ways until the session or the connection ends.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use super::detached::{Claim, Detached};
use super::frames::{Bucket, FrameViolation};
use super::http::{Slot, Socket};
use super::metrics::{Dropped, Refusal};
use super::protocol::{self, ClientMessage, Ready, Resume, Start};
use super::{Phase, Shared};
use crate::audio::{AudioFormat, AudioFrame};
use crate::config::{Secret, SessionConfig};
use crate::error::{BackendError, ErrorCode, Result};
use crate::pipeline::events::{SessionEvent, SessionEvents};
use crate::session::{AudioReceiver, PipelineState, SessionId, VoiceSession};
use crate::wake::InputMarks;
use tokio_tungstenite::tungstenite::Error as WsError;

// The `start` handshake and its refusals,
mod opening;
// and the session's audio, text and events both ways.
mod session_loop;

/// The blocks received audio is copied to: six 20 ms frames at 16 kHz.
const AUDIO_BLOCK: usize = 4 * 1024;
/// How long the server waits for a client to take its close frame, and for
/// the client's answer to it.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// At most this many reply audio frames that are ready together are queued
/// at once (playout hands out three 20 ms frames at a time).
const AUDIO_BATCH: usize = 8;
/// How long a connection whose reading side failed is kept open after its
/// close frame, so the client can read the frame before the socket goes.
const LINGER: Duration = Duration::from_secs(1);

/// How a connection ends.
enum End {
    /// Send a close frame and wait for the client's answer. `refusal` is set
    /// when the connection ends without ever having had a session.
    Close {
        code: u16,
        reason: String,
        refusal: Option<Refusal>,
    },
    /// The reading side failed (a message far over the limit, broken
    /// WebSocket framing): send a close frame, best effort, and let the
    /// socket go. `refusal` as for `Close`.
    Broken {
        code: u16,
        reason: String,
        refusal: Option<Refusal>,
    },
    /// The client answered the server's close frame or sent its own: the
    /// handshake is done.
    ClientClosed,
    /// The client went away without a close frame, or stopped reading:
    /// nothing more to send.
    Gone(Gone),
}

impl End {
    fn close(code: u16, reason: impl Into<String>) -> End {
        End::Close {
            code,
            reason: reason.into(),
            refusal: None,
        }
    }

    fn refuse(code: u16, reason: impl Into<String>, refusal: Refusal) -> End {
        End::Close {
            code,
            reason: reason.into(),
            refusal: Some(refusal),
        }
    }
}

/// Why nothing more can be sent to the client.
#[derive(Clone, Copy, Debug)]
enum Gone {
    /// The client went away without a close frame (reset or closed TCP), or
    /// a write failed.
    Vanished,
    /// The client took nothing for `send_timeout`: it stopped reading.
    NotReading,
}

impl From<Gone> for End {
    fn from(gone: Gone) -> End {
        End::Gone(gone)
    }
}

/// What becomes of the connection's session when the connection ends
/// without it having closed: detached into its resume window when the
/// client went away from a session it can resume ([`SessionGuard::release`]),
/// else stopped (its in-flight turn finishes, then it is removed), as it is
/// when the connection's task is dropped.
#[derive(Default)]
struct SessionGuard {
    session: Option<Arc<dyn VoiceSession>>,
    /// The session's reply audio, held until the session is detached or
    /// stopped: while it is held, a `resume` is refused (the session being
    /// attached), so none takes the session up before it is detached.
    audio: Option<AudioReceiver>,
    /// The client was given `ready` with a resume token.
    resumable: bool,
}

impl SessionGuard {
    /// The session closed by itself: nothing to stop.
    fn closed(&mut self) {
        self.session = None;
    }

    /// The connection ended (`gone`: without a close): detaches the session
    /// into its resume window if it may wait for one, stops it otherwise.
    fn release(&mut self, shared: &Arc<Shared>, gone: bool) {
        let Some(session) = self.session.take() else {
            return;
        };
        let window = shared.config.resume_window;
        let wait =
            gone && self.resumable && !window.is_zero() && *shared.phase.borrow() == Phase::Running;
        let session = if wait {
            match Detached::detach(shared, session) {
                Ok(()) => {
                    tracing::info!(
                        "client gone: the session waits {} for a resume",
                        humantime::format_duration(window)
                    );
                    // Back to the session, for the connection that resumes it.
                    self.audio = None;
                    return;
                }
                Err(session) => session,
            }
        } else {
            session
        };
        if self.resumable {
            Detached::stop(shared, session);
        } else {
            stop_later(session);
        }
        // Handed back once a resume would find the session ending.
        self.audio = None;
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            stop_later(session);
        }
    }
}

/// Stops `session` on a task of its own (when there is a runtime to run it).
fn stop_later(session: Arc<dyn VoiceSession>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            if let Err(e) = session.stop().await {
                tracing::warn!(session_id = %session.id(), code = %e.code, "stopping a session: {}", e.message);
            }
        });
    }
}

/// Serves one upgraded WebSocket until it ends.
pub(super) async fn serve(
    shared: Arc<Shared>,
    socket: Socket,
    header_token: Option<Secret>,
    slot: Slot,
) {
    shared.metrics.connection_opened();
    let mut conn = Conn {
        // Seconds of audio: one per second, up to `max_audio_ahead` ahead.
        audio_budget: Bucket::new(1.0, shared.config.max_audio_ahead.as_secs_f64()),
        phase: shared.phase.subscribe(),
        shared: shared.clone(),
        socket,
        audio: BytesMut::new(),
        guard: SessionGuard::default(),
    };
    let end = conn.run(header_token).await;
    conn.guard.release(&shared, matches!(end, End::Gone(_)));
    if let End::Close {
        refusal: Some(r), ..
    }
    | End::Broken {
        refusal: Some(r), ..
    } = &end
    {
        shared.metrics.refused(*r);
    }
    let gone = match &end {
        End::Gone(gone) => Some(*gone),
        _ => None,
    };
    match end {
        End::Close { code, reason, .. } => conn.close(code, &reason).await,
        End::Broken { code, reason, .. } => {
            conn.send_close(code, &reason).await;
            tokio::time::sleep(LINGER).await;
        }
        End::ClientClosed => {}
        End::Gone(Gone::Vanished) => tracing::debug!("client gone"),
        End::Gone(Gone::NotReading) => tracing::info!(
            "closing: the client took nothing for {}: it stopped reading",
            humantime::format_duration(shared.config.send_timeout)
        ),
    }
    shared.metrics.connection_closed();
    // The address's slot is free before the connection is counted as gone,
    // so whoever reads the count can connect again.
    drop(slot);
    match gone {
        Some(Gone::Vanished) => shared.metrics.vanished(),
        Some(Gone::NotReading) => shared.metrics.dropped(Dropped::NotReading),
        None => {}
    }
}

struct Conn {
    shared: Arc<Shared>,
    socket: Socket,
    /// The audio the client may still send ahead of real time, in seconds.
    audio_budget: Bucket,
    phase: watch::Receiver<Phase>,
    /// Where received audio is copied to; see [`Conn::own`].
    audio: BytesMut,
    /// The session, once there is one.
    guard: SessionGuard,
}

/// What a message from the client amounts to, once size and rate are checked.
enum Incoming {
    Text(String),
    Binary(Bytes),
    /// A control message (ping, pong): nothing to do.
    Nothing,
}

impl Conn {
    /// Checks one received message: the connection's end (client gone, too
    /// big), or what it carries. The message rate is checked as its frames
    /// arrive, by the [`FrameGuard`](super::frames::FrameGuard).
    async fn incoming(
        &mut self,
        received: Option<std::result::Result<Message, WsError>>,
    ) -> std::result::Result<Incoming, End> {
        let message = match received {
            None => return Err(Gone::Vanished.into()),
            Some(Err(e)) => return Err(self.read_error(&e)),
            Some(Ok(m)) => m,
        };
        let size = match &message {
            Message::Close(_) => {
                self.finish_close_handshake().await;
                return Err(End::ClientClosed);
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                return Ok(Incoming::Nothing);
            }
            Message::Text(t) => t.len(),
            Message::Binary(b) => b.len(),
        };
        self.shared.metrics.message_in();
        let max = self.shared.config.max_frame_bytes;
        if size > max {
            return Err(End::close(
                protocol::TOO_BIG,
                format!("message too big: {size} bytes, at most {max} allowed"),
            ));
        }
        Ok(match message {
            Message::Text(t) => Incoming::Text(t.as_str().to_owned()),
            Message::Binary(b) => Incoming::Binary(self.own(&b)),
            _ => Incoming::Nothing,
        })
    }

    /// A copy of received audio. The received bytes are a slice of the
    /// socket's read buffer, which the session may hold on to for a whole
    /// turn (the echo model does), and while it is shared the next read has
    /// to allocate a new buffer rather than reuse it. The copies are slices
    /// of blocks of [`AUDIO_BLOCK`] bytes: one allocation per block, none
    /// per frame.
    fn own(&mut self, data: &[u8]) -> Bytes {
        if self.audio.capacity() < data.len() {
            // Takes the block back if no frame holds it any more.
            self.audio.reserve(data.len().max(AUDIO_BLOCK));
        }
        self.audio.extend_from_slice(data);
        self.audio.split().freeze()
    }

    /// How a failed read ends the connection: a message over the limit or
    /// broken WebSocket framing gets a close frame saying so; a socket that
    /// failed gets nothing more.
    fn read_error(&self, e: &WsError) -> End {
        use tokio_tungstenite::tungstenite::error::ProtocolError;
        let broken = |code, reason: String| End::Broken {
            code,
            reason,
            refusal: None,
        };
        let too_big = || {
            broken(
                protocol::TOO_BIG,
                format!(
                    "message too big: at most {} bytes allowed",
                    self.shared.config.max_frame_bytes
                ),
            )
        };
        match e {
            WsError::Capacity(_) => too_big(),
            // The client closed or reset TCP without a close frame: gone, not
            // refused.
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)
            | WsError::ConnectionClosed
            | WsError::AlreadyClosed => Gone::Vanished.into(),
            WsError::Protocol(p) => {
                broken(protocol::PROTOCOL, format!("WebSocket protocol error: {p}"))
            }
            WsError::Utf8(_) => broken(
                protocol::INVALID_PAYLOAD,
                "a text message that is not valid UTF-8".into(),
            ),
            WsError::Io(io) => match FrameViolation::of(io) {
                Some(violation) => broken(protocol::POLICY, violation.to_string()),
                None => {
                    tracing::debug!("reading from the client failed: {io}");
                    Gone::Vanished.into()
                }
            },
            other => {
                tracing::debug!("reading from the client failed: {other}");
                Gone::Vanished.into()
            }
        }
    }

    async fn send_event(&mut self, event: &SessionEvent) -> std::result::Result<(), Gone> {
        self.feed_event(event).await?;
        self.flush().await
    }

    /// Queues `event` in the socket's write buffer (see [`Conn::flush`]).
    async fn feed_event(&mut self, event: &SessionEvent) -> std::result::Result<(), Gone> {
        match serde_json::to_string(event) {
            Ok(json) => self.feed(Message::Text(json.into())).await,
            Err(e) => {
                tracing::warn!("an event did not serialize: {e}");
                Ok(())
            }
        }
    }

    /// Queues `first` and the reply frames ready behind it (up to
    /// [`AUDIO_BATCH`] in all) as binary messages (see [`Conn::flush`]).
    async fn feed_audio(
        &mut self,
        first: AudioFrame,
        audio: &mut AudioReceiver,
    ) -> std::result::Result<(), Gone> {
        self.feed(Message::Binary(first.into_data())).await?;
        for _ in 1..AUDIO_BATCH {
            let Some(frame) = audio.try_recv() else { break };
            self.feed(Message::Binary(frame.into_data())).await?;
        }
        Ok(())
    }

    /// Queues `message` in the socket's write buffer. It is written by the
    /// next [`Conn::flush`] (or sooner, if the buffer fills up).
    async fn feed(&mut self, message: Message) -> std::result::Result<(), Gone> {
        match tokio::time::timeout(self.shared.config.send_timeout, self.socket.feed(message)).await
        {
            Ok(Ok(())) => {
                self.shared.metrics.message_out();
                Ok(())
            }
            Ok(Err(_)) => Err(Gone::Vanished),
            Err(_) => Err(Gone::NotReading),
        }
    }

    /// Writes every queued message to the socket.
    async fn flush(&mut self) -> std::result::Result<(), Gone> {
        match tokio::time::timeout(self.shared.config.send_timeout, self.socket.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Gone::Vanished),
            Err(_) => Err(Gone::NotReading),
        }
    }

    async fn send(&mut self, message: Message) -> std::result::Result<(), Gone> {
        self.feed(message).await?;
        self.flush().await
    }

    /// Sends a close frame; `false` if it could not be sent.
    async fn send_close(&mut self, code: u16, reason: &str) -> bool {
        let reason = protocol::close_reason(reason);
        if code == protocol::NORMAL || code == protocol::GOING_AWAY {
            tracing::info!(code, "closing: {reason}");
        } else {
            tracing::info!(code, "refusing: {reason}");
        }
        // Counted before the frame goes out, so a client that reads the close
        // and then the metrics finds it counted.
        self.shared.metrics.closed_with(code);
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.into(),
        };
        matches!(
            tokio::time::timeout(CLOSE_WAIT, self.socket.send(Message::Close(Some(frame)))).await,
            Ok(Ok(()))
        )
    }

    /// Closes with `code` and `reason`, then waits for the client's answer
    /// (discarding whatever it sent before).
    async fn close(&mut self, code: u16, reason: &str) {
        if self.send_close(code, reason).await {
            self.finish_close_handshake().await;
        }
    }

    /// Reads until the socket ends (the close answer is sent on the way).
    async fn finish_close_handshake(&mut self) {
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while let Some(Ok(_)) = self.socket.next().await {}
        })
        .await;
    }
}
