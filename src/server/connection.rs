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

use super::frames::{Bucket, FrameViolation};
use super::http::{Slot, Socket};
use super::metrics::{Dropped, Refusal};
use super::protocol::{self, ClientMessage, Ready, Resume, Start};
use super::{Phase, Shared};
use crate::audio::{AudioFormat, AudioFrame};
use crate::config::{Secret, SessionConfig};
use crate::error::{BackendError, ErrorCode, Result};
use crate::pipeline::events::{SessionEvent, SessionEvents};
use crate::session::{AudioReceiver, SessionId, VoiceSession};
use crate::wake::InputMarks;
use tokio_tungstenite::tungstenite::Error as WsError;

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

/// Stops the session when the connection ends without it having closed
/// (client gone, task dropped): its in-flight turn finishes, then it is removed.
struct SessionGuard {
    session: Option<Arc<dyn VoiceSession>>,
}

impl SessionGuard {
    /// The session closed by itself: nothing to stop.
    fn closed(&mut self) {
        self.session = None;
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = session.stop().await {
                    tracing::warn!(session_id = %session.id(), code = %e.code, "stopping a session: {}", e.message);
                }
            });
        }
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
    };
    let end = conn.run(header_token).await;
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
}

/// What a message from the client amounts to, once size and rate are checked.
enum Incoming {
    Text(String),
    Binary(Bytes),
    /// A control message (ping, pong): nothing to do.
    Nothing,
}

impl Conn {
    async fn run(&mut self, header_token: Option<Secret>) -> End {
        let opening = match self.await_start().await {
            Ok(opening) => opening,
            Err(end) => return end,
        };
        if *self.phase.borrow() != Phase::Running {
            return End::refuse(
                protocol::GOING_AWAY,
                "server shutting down",
                Refusal::Shutdown,
            );
        }
        let span = tracing::Span::current();
        let (session, format, wire, resume_token, resumed) = match opening {
            Opening::Start(start) => {
                let format = AudioFormat::new(start.encoding.encoding(), start.sample_rate, 1);
                span.record("user_id", start.user_id.as_str());
                let mut config = SessionConfig::new(start.user_id)
                    .with_input_format(format)
                    .with_output_format(format);
                config.metadata = start.metadata.into_iter().collect();
                // The start message's token wins over the header's.
                config.auth_token = start.token.filter(|t| !t.is_empty()).or(header_token);
                let session = match self.shared.backend.create_session(config).await {
                    Ok(session) => session,
                    Err(e) => return refused_by_backend(e),
                };
                let token = session.resume_token();
                (session, format, start.encoding, token, false)
            }
            Opening::Resume(resume) => {
                let format = AudioFormat::new(resume.encoding.encoding(), resume.sample_rate, 1);
                let id = SessionId::new(resume.session_id.as_str());
                let session = match self
                    .shared
                    .backend
                    .resume_session(&id, &resume.resume_token)
                    .await
                {
                    Ok(session) => session,
                    Err(e) => return refused_resume(e),
                };
                span.record("user_id", session.user_id());
                tracing::info!(session_id = %id, "session resumed");
                (
                    session,
                    format,
                    resume.encoding,
                    Some(resume.resume_token),
                    true,
                )
            }
        };
        span.record("session_id", session.id().as_str());
        // A resumed session another connection still holds is not stopped
        // when this one is refused.
        let mut guard = SessionGuard {
            session: (!resumed).then(|| session.clone()),
        };
        let events = session.events();
        let audio = match session.receive_audio() {
            Ok(audio) => audio,
            Err(_) if resumed => {
                return End::refuse(
                    protocol::POLICY,
                    "resume refused: the session is attached to another connection",
                    Refusal::Protocol,
                );
            }
            Err(e) => return internal(&e, Refusal::Error),
        };
        guard.session = Some(session.clone());
        if let Err(e) = session.start().await {
            return internal(&e, Refusal::Error);
        }
        let mut ready = Ready::new(session.id().as_str(), format.sample_rate, wire);
        // The session's own client is given what the provider published,
        // its secrets (a join token) included, and its resume token; logs
        // never see them.
        ready.info = session.info().exposed();
        ready.resume_token = resume_token.map(|t| t.expose().to_owned());
        ready.resumed = resumed;
        ready.metadata = session.metadata();
        let ready = serde_json::to_string(&ready).unwrap_or_default();
        if let Err(gone) = self.send(Message::Text(ready.into())).await {
            return gone.into();
        }
        tracing::info!(sample_rate = format.sample_rate, "session started");
        self.session_loop(&session, &mut guard, events, audio, format)
            .await
    }

    /// Waits for the client's `start` (or `resume`), within `start_timeout`.
    async fn await_start(&mut self) -> std::result::Result<Opening, End> {
        let timeout = self.shared.config.start_timeout;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            if *self.phase.borrow_and_update() != Phase::Running {
                return Err(End::refuse(
                    protocol::GOING_AWAY,
                    "server shutting down",
                    Refusal::Shutdown,
                ));
            }
            let received = tokio::select! {
                _ = &mut deadline => {
                    return Err(End::refuse(
                        protocol::PROTOCOL,
                        format!("no start message within {}", humantime::format_duration(timeout)),
                        Refusal::StartTimeout,
                    ));
                }
                _ = self.phase.changed() => continue,
                received = self.socket.next() => received,
            };
            let text = match self.incoming(received).await {
                Ok(Incoming::Nothing) => continue,
                Ok(Incoming::Binary(_)) => {
                    return Err(End::refuse(
                        protocol::PROTOCOL,
                        "binary message before start: send {\"type\":\"start\",...} first",
                        Refusal::Protocol,
                    ));
                }
                Ok(Incoming::Text(text)) => text,
                Err(End::Close {
                    code,
                    reason,
                    refusal: None,
                }) => {
                    let refusal = if code == protocol::POLICY {
                        Refusal::RateLimit
                    } else {
                        Refusal::Protocol
                    };
                    return Err(End::refuse(code, reason, refusal));
                }
                Err(End::Broken {
                    code,
                    reason,
                    refusal: None,
                }) => {
                    let refusal = if code == protocol::POLICY {
                        Refusal::RateLimit
                    } else {
                        Refusal::Protocol
                    };
                    return Err(End::Broken {
                        code,
                        reason,
                        refusal: Some(refusal),
                    });
                }
                Err(end) => return Err(end),
            };
            return match ClientMessage::parse(&text) {
                Ok(ClientMessage::Start(start)) => match start.check() {
                    Ok(()) => Ok(Opening::Start(start)),
                    Err(reason) => Err(End::refuse(
                        protocol::PROTOCOL,
                        format!("bad start message: {reason}"),
                        Refusal::Protocol,
                    )),
                },
                Ok(ClientMessage::Resume(resume)) => match resume.check() {
                    Ok(()) => Ok(Opening::Resume(resume)),
                    Err(reason) => Err(End::refuse(
                        protocol::PROTOCOL,
                        format!("bad resume message: {reason}"),
                        Refusal::Protocol,
                    )),
                },
                Ok(ClientMessage::Text(_)) => Err(End::refuse(
                    protocol::PROTOCOL,
                    "expected start first, got text",
                    Refusal::Protocol,
                )),
                Ok(ClientMessage::Stop) => Err(End::refuse(
                    protocol::PROTOCOL,
                    "expected start first, got stop",
                    Refusal::Protocol,
                )),
                Err(reason) => Err(End::refuse(protocol::PROTOCOL, reason, Refusal::Protocol)),
            };
        }
    }

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

    async fn session_loop(
        &mut self,
        session: &Arc<dyn VoiceSession>,
        guard: &mut SessionGuard,
        events: SessionEvents,
        mut audio: AudioReceiver,
        format: AudioFormat,
    ) -> End {
        // Whether client audio and text still go to the session: not after
        // the client's `stop`, nor while the server drains.
        let phase = *self.phase.borrow_and_update();
        let mut input_open = phase == Phase::Running;
        let mut stop_requested = false;
        // Whether the session's reply audio may still bring frames.
        let mut audio_open = true;
        let mut stopper: Option<JoinHandle<Result<()>>> = None;
        // A run of failed inputs is reported to the client once.
        let mut failing = false;
        // The inputs that wait on a registration of their own (a phase
        // change, the next event) are futures kept across wake-ups. They and
        // the stop task are polled only when their own waker has fired (see
        // `Inputs`); reply audio and the socket on every wake-up.
        let mut phase_change = pin!(phase_change_of(self.phase.clone()));
        let mut next = pin!(next_event(events));
        if phase == Phase::Closing {
            // The last phase: no change of it will come to wait for.
            if let Err(gone) = self.finish(next.as_mut(), &mut audio).await {
                return gone.into();
            }
            return End::close(protocol::GOING_AWAY, "server shutting down");
        }
        // A session whose client sends nothing for `idle_timeout` is closed.
        // The timer is set again only when it fires, for the time left after
        // the last message heard.
        let idle_timeout = self.shared.config.idle_timeout;
        let mut last_heard = Instant::now();
        let mut idle = pin!(tokio::time::sleep(idle_timeout));
        // Every input starts marked.
        let inputs = Inputs::new(PHASE | STOPPER | EVENTS | IDLE);
        let mut registered: Option<Waker> = None;
        // Messages are queued as inputs are handled and written once nothing
        // more is ready (`Woke::Flush`): a turn's events and the reply audio
        // that comes with them go out in one write, not one each.
        let mut unflushed = false;
        loop {
            let woke = std::future::poll_fn(|cx| {
                if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    inputs.register(cx.waker());
                    registered = Some(cx.waker().clone());
                }
                let mut due = inputs.take();
                if stopper.is_none() {
                    // Marked from the start; marked again when it is spawned.
                    due &= !STOPPER;
                }
                let mut poll = |input: u8, f: &mut dyn FnMut(&mut Context<'_>) -> Poll<Woke>| {
                    if due & input == 0 {
                        return Poll::Pending;
                    }
                    due &= !input;
                    let woke = f(&mut Context::from_waker(inputs.waker(input)));
                    if woke.is_ready() {
                        // The input may have more; those not polled yet are still due.
                        inputs.mark(due | input);
                    }
                    woke
                };
                if let Poll::Ready(w) = poll(PHASE, &mut |cx| {
                    phase_change
                        .as_mut()
                        .poll(cx)
                        .map(|(rx, p)| Woke::Phase(rx, p))
                }) {
                    return Poll::Ready(w);
                }
                if let Some(task) = stopper.as_mut()
                    && let Poll::Ready(w) = poll(STOPPER, &mut |cx| {
                        Pin::new(&mut *task).poll(cx).map(Woke::Stopped)
                    })
                {
                    return Poll::Ready(w);
                }
                if let Poll::Ready(w) = poll(EVENTS, &mut |cx| {
                    next.as_mut().poll(cx).map(|(rx, e)| Woke::Event(rx, e))
                }) {
                    return Poll::Ready(w);
                }
                if let Poll::Ready(w) =
                    poll(IDLE, &mut |cx| idle.as_mut().poll(cx).map(|()| Woke::Idle))
                {
                    return Poll::Ready(w);
                }
                // Reply audio and the socket wake the task directly: they are
                // the frequent ones, and cheap to poll.
                if audio_open && let Poll::Ready(frame) = pin!(audio.recv()).poll(cx) {
                    inputs.mark(due);
                    return Poll::Ready(Woke::Audio(frame));
                }
                let received = self.socket.poll_next_unpin(cx).map(Woke::Received);
                if received.is_ready() {
                    inputs.mark(due);
                    return received;
                }
                // Everything that was ready is handled: what it queued goes
                // out now, in one write.
                if unflushed {
                    inputs.mark(due);
                    return Poll::Ready(Woke::Flush);
                }
                Poll::Pending
            })
            .await;
            match woke {
                Woke::Idle => {
                    let heard = last_heard + idle_timeout;
                    if Instant::now() >= heard {
                        return End::close(
                            protocol::POLICY,
                            format!(
                                "idle: no audio or message for {}",
                                humantime::format_duration(idle_timeout)
                            ),
                        );
                    }
                    idle.as_mut().reset(heard);
                }
                Woke::Phase(rx, phase) => match phase {
                    Phase::Running => phase_change.set(phase_change_of(rx)),
                    Phase::Draining => {
                        input_open = false;
                        phase_change.set(phase_change_of(rx));
                    }
                    Phase::Closing => {
                        if let Err(gone) = self.finish(next.as_mut(), &mut audio).await {
                            return gone.into();
                        }
                        return End::close(protocol::GOING_AWAY, "server shutting down");
                    }
                },
                Woke::Event(events, event) => {
                    next.set(next_event(events));
                    match event {
                        Some(SessionEvent::Closed) | None => {
                            guard.closed();
                            if let Err(gone) = self.finish(next.as_mut(), &mut audio).await {
                                return gone.into();
                            }
                            return self.session_closed(stop_requested);
                        }
                        Some(event) => {
                            if let Err(gone) = self.feed_event(&event).await {
                                return gone.into();
                            }
                            unflushed = true;
                        }
                    }
                }
                Woke::Audio(Some(frame)) => {
                    if let Err(gone) = self.feed_audio(frame, &mut audio).await {
                        return gone.into();
                    }
                    unflushed = true;
                }
                // The session's reply audio ended before the session did (a
                // session of the application's own may do that): no more
                // polling it, the `Closed` event ends the connection.
                Woke::Audio(None) => audio_open = false,
                Woke::Flush => {
                    if let Err(gone) = self.flush().await {
                        return gone.into();
                    }
                    unflushed = false;
                }
                Woke::Stopped(done) => {
                    let done = done.unwrap_or_else(|e| {
                        Err(BackendError::new(
                            "server.stop_session",
                            ErrorCode::PipelineError,
                            format!("the stop task failed: {e}"),
                        ))
                    });
                    if let Err(e) = done {
                        tracing::warn!(code = %e.code, "stopping the session: {}", e.message);
                    }
                    // `stop` returns once the session has closed: its last
                    // events are waiting in `events`.
                    guard.closed();
                    if let Err(gone) = self.finish(next.as_mut(), &mut audio).await {
                        return gone.into();
                    }
                    return self.session_closed(true);
                }
                Woke::Received(received) => {
                    let payload = match self.incoming(received).await {
                        Ok(p) => p,
                        Err(end) => return end,
                    };
                    if !matches!(payload, Incoming::Nothing) {
                        last_heard = Instant::now();
                    }
                    let outcome = match payload {
                        Incoming::Nothing => Ok(()),
                        Incoming::Binary(data) => {
                            let unit = format.bytes_per_frame();
                            if !data.len().is_multiple_of(unit) {
                                return End::close(
                                    protocol::UNSUPPORTED,
                                    format!(
                                        "bad audio: {} bytes is not a whole number of 16-bit samples",
                                        data.len()
                                    ),
                                );
                            }
                            let seconds =
                                data.len() as f64 / (unit as f64 * f64::from(format.sample_rate));
                            if !self.audio_budget.take_at(seconds, Instant::now()) {
                                return End::close(
                                    protocol::POLICY,
                                    format!(
                                        "audio faster than real time: more than {} ahead",
                                        humantime::format_duration(
                                            self.shared.config.max_audio_ahead
                                        )
                                    ),
                                );
                            }
                            if !input_open || data.is_empty() {
                                continue;
                            }
                            match AudioFrame::new(format, data) {
                                Ok(frame) => session.process_audio(frame).await,
                                Err(e) => Err(e),
                            }
                        }
                        Incoming::Text(text) => match ClientMessage::parse(&text) {
                            Err(reason) => return End::close(protocol::PROTOCOL, reason),
                            Ok(ClientMessage::Start(_) | ClientMessage::Resume(_)) => {
                                return End::close(
                                    protocol::PROTOCOL,
                                    "start sent twice: the session has already started",
                                );
                            }
                            Ok(ClientMessage::Text(text)) if input_open => {
                                session.send_text(&text).await
                            }
                            Ok(ClientMessage::Text(_)) => Ok(()),
                            Ok(ClientMessage::Stop) => {
                                if !stop_requested {
                                    stop_requested = true;
                                    input_open = false;
                                    tracing::info!("the client stops the session");
                                    let session = session.clone();
                                    stopper =
                                        Some(tokio::spawn(async move { session.stop().await }));
                                    inputs.mark(STOPPER);
                                }
                                Ok(())
                            }
                        },
                    };
                    match outcome {
                        Ok(()) => failing = false,
                        Err(_) if !input_open || *self.phase.borrow() != Phase::Running => {}
                        Err(e) => {
                            if !failing {
                                failing = true;
                                tracing::debug!(code = %e.code, "client input failed: {}", e.message);
                                let event = SessionEvent::Error {
                                    code: e.code,
                                    message: e.into_fields().message,
                                };
                                if let Err(gone) = self.feed_event(&event).await {
                                    return gone.into();
                                }
                                unflushed = true;
                            }
                        }
                    }
                }
            }
        }
    }

    /// How a closed session's connection ends.
    fn session_closed(&self, stop_requested: bool) -> End {
        if *self.phase.borrow() != Phase::Running {
            End::close(protocol::GOING_AWAY, "server shutting down")
        } else if stop_requested {
            End::close(protocol::NORMAL, "session stopped")
        } else {
            End::close(protocol::NORMAL, "session closed")
        }
    }

    /// Sends what the session still has for the client (reply audio first,
    /// then events), then `closed`. `next` is the pending wait for the next
    /// event: whatever it can take now is sent.
    async fn finish<F>(
        &mut self,
        next: Pin<&mut F>,
        audio: &mut AudioReceiver,
    ) -> std::result::Result<(), Gone>
    where
        F: Future<Output = (SessionEvents, Option<SessionEvent>)>,
    {
        while let Some(frame) = audio.try_recv() {
            self.send(Message::Binary(frame.into_data())).await?;
        }
        let ready = next.poll(&mut Context::from_waker(Waker::noop()));
        if let Poll::Ready((mut events, mut event)) = ready {
            while let Some(e) = event {
                if e == SessionEvent::Closed {
                    break;
                }
                self.send_event(&e).await?;
                event = events.try_recv();
            }
        }
        self.send_event(&SessionEvent::Closed).await
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

/// What woke the session loop.
enum Woke {
    /// The idle timer fired.
    Idle,
    Phase(watch::Receiver<Phase>, Phase),
    Stopped(std::result::Result<Result<()>, tokio::task::JoinError>),
    Event(SessionEvents, Option<SessionEvent>),
    Audio(Option<AudioFrame>),
    Received(Option<std::result::Result<Message, WsError>>),
    /// Nothing else is ready and messages wait in the write buffer.
    Flush,
}

/// The session loop's rarely woken inputs, one bit each.
const PHASE: u8 = 1;
const STOPPER: u8 = 1 << 1;
const EVENTS: u8 = 1 << 2;
const IDLE: u8 = 1 << 3;

/// Which of the session loop's rare inputs (a phase change, the stop task,
/// session events, the idle timer) may have something: each is polled with a waker of its
/// own, which marks it and wakes the task, so the frequent wake-ups (client
/// audio, reply audio) do not poll them. Polling them costs locks: the event
/// channel's and the phase's waiter lists.
type Inputs = InputMarks<4>;

/// The next phase change: the receiver back, and the new phase (`Closing`
/// when the server is gone).
async fn phase_change_of(mut rx: watch::Receiver<Phase>) -> (watch::Receiver<Phase>, Phase) {
    let phase = match rx.changed().await {
        Ok(()) => *rx.borrow_and_update(),
        Err(_) => Phase::Closing,
    };
    (rx, phase)
}

/// The next session event, with the subscription back.
async fn next_event(mut events: SessionEvents) -> (SessionEvents, Option<SessionEvent>) {
    let event = events.recv().await;
    (events, event)
}

/// What opens a connection's session.
enum Opening {
    Start(Start),
    Resume(Resume),
}

/// How a refused `resume` ends the connection. The token is never quoted.
fn refused_resume(e: BackendError) -> End {
    match e.code {
        ErrorCode::AuthenticationFailed => {
            tracing::info!(code = %e.code, "resume refused");
            End::refuse(
                protocol::POLICY,
                "resume refused: the resume token is not this session's",
                Refusal::Auth,
            )
        }
        ErrorCode::SessionNotFound => End::refuse(
            protocol::POLICY,
            "resume refused: no such active session (closed, or never opened)",
            Refusal::Protocol,
        ),
        ErrorCode::ConnectionFailed | ErrorCode::ConnectionTimeout => {
            tracing::info!(code = %e.code, "resume refused: {}", e.message);
            End::refuse(
                protocol::TRY_AGAIN,
                "resume refused: the session runs elsewhere or the session store is away; try again later",
                Refusal::Capacity,
            )
        }
        _ => refused_by_backend(e),
    }
}

/// How a refused `create_session` ends the connection.
fn refused_by_backend(e: BackendError) -> End {
    // Auth errors come from the application's hook: log the code only.
    match e.code {
        ErrorCode::AuthenticationFailed => {
            tracing::info!(code = %e.code, "session refused");
            End::refuse(protocol::POLICY, "authentication failed", Refusal::Auth)
        }
        ErrorCode::AuthorizationFailed => {
            tracing::info!(code = %e.code, "session refused");
            End::refuse(
                protocol::POLICY,
                "authorization failed: this user may not open a session",
                Refusal::Auth,
            )
        }
        ErrorCode::SessionLimitExceeded => End::refuse(
            protocol::TRY_AGAIN,
            "server at capacity: no session is available; try again later",
            Refusal::Capacity,
        ),
        ErrorCode::RateLimitExceeded => {
            let retry = e
                .details
                .get("retry_after_ms")
                .map(|ms| format!("; retry in {ms} ms"))
                .unwrap_or_default();
            End::refuse(
                protocol::TRY_AGAIN,
                format!("session rate limit exceeded{retry}"),
                Refusal::RateLimit,
            )
        }
        ErrorCode::InvalidConfig => End::refuse(
            protocol::PROTOCOL,
            format!("start refused: {}", e.message),
            Refusal::Protocol,
        ),
        ErrorCode::ContextCanceled => End::refuse(
            protocol::GOING_AWAY,
            "server shutting down",
            Refusal::Shutdown,
        ),
        _ => internal(&e, Refusal::Error),
    }
}

fn internal(e: &BackendError, refusal: Refusal) -> End {
    tracing::warn!(code = %e.code, op = e.op, "session failed: {}", e.message);
    End::refuse(
        protocol::INTERNAL,
        format!("internal error: could not open a session ({})", e.code),
        refusal,
    )
}
