//! LiveKit's signaling: a WebSocket to the server's `/rtc` carrying binary
//! protobuf `SignalRequest`s (client to server) and `SignalResponse`s
//! (server to client), the types of livekit/protocol's `livekit_rtc.proto`
//! ([`livekit_protocol`]).
//!
//! The sequence, for a client in dual peer connection mode (`/rtc`, the
//! path every LiveKit server has):
//!
//! 1. `GET /rtc?sdk=rust&protocol=..&auto_subscribe=1&adaptive_stream=0`
//!    upgraded to a WebSocket, the token in `Authorization: Bearer`; a
//!    resume adds `reconnect=1&sid=<participant sid>`.
//! 2. The server's first message: `join` (`JoinResponse`: room,
//!    participant, other participants, ICE servers, ping interval and
//!    timeout), or `reconnect` for a resume (a `leave` refuses it).
//! 3. Then, in any order: the server's subscriber `offer`s (the client
//!    `answer`s), `trickle`d candidates both ways, `add_track` ->
//!    `track_published`, the client's publisher `offer` -> `answer`,
//!    participant `update`s, `ping_req` -> `pong_resp` at the join's
//!    interval, and `leave` either way.
//!
//! [`Signal::connect`] dials and reads the first message; one task per
//! connection then writes what [`Signal::send`] queues, reads the server,
//! pings, and ends the connection when the server is silent past the
//! ping timeout. A message that is not a `SignalResponse` is counted and
//! skipped: the connection goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use livekit_protocol as proto;
use prost::Message as _;
use proto::signal_request::Message as Request;
use proto::signal_response::Message as Response;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::LiveKitCounters;
use crate::config::Secret;
use crate::error::{BackendError, ErrorCode, Result};
use crate::runtime::{Dial, WsMessage};

/// The signal protocol version the client speaks (LiveKit's client SDKs
/// send 16 and up; 16 has everything used here).
pub const PROTOCOL_VERSION: u32 = 16;

/// Requests waiting to go to the server.
const OUT_QUEUE: usize = 256;

/// The largest signal message read; SDP offers are a few KiB.
const MAX_MESSAGE: usize = 1024 * 1024;

/// Ping interval and timeout when the server gives none.
const DEFAULT_PING: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(15));

/// The `/rtc` URL for a server URL: `ws://` and `wss://` kept, `http://` and
/// `https://` read as them, `/rtc` appended to the path.
///
/// # Errors
///
/// What is wrong with `url`, without repeating it (it may hold
/// credentials).
pub fn rtc_url(url: &str) -> std::result::Result<url::Url, String> {
    let mut parsed = url::Url::parse(url).map_err(|e| format!("is not a valid URL ({e})"))?;
    let scheme = match parsed.scheme() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        other => {
            return Err(format!(
                "scheme {other:?} is not supported; use wss://, ws://, https:// or http://"
            ));
        }
    };
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    parsed
        .set_scheme(scheme)
        .map_err(|()| "cannot be turned into a WebSocket URL".to_owned())?;
    let path = format!("{}/rtc", parsed.path().trim_end_matches('/'));
    parsed.set_path(&path);
    parsed.set_query(None);
    parsed.set_fragment(None);
    Ok(parsed)
}

/// What a [`Signal`] hears.
#[derive(Debug)]
pub enum SignalEvent {
    /// A message from the server.
    Message(Box<Response>),
    /// The connection ended (the server closed it, it broke, or it was
    /// silent past the ping timeout); nothing follows.
    Closed(String),
}

/// One signal connection to `/rtc`.
pub struct Signal {
    out: mpsc::Sender<Outgoing>,
    events: mpsc::Receiver<SignalEvent>,
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signal").finish_non_exhaustive()
    }
}

enum Outgoing {
    Request(Request),
    /// Sends `leave` (if given), a close frame, and ends the connection.
    Close(Option<Request>),
}

/// How a connection starts: a fresh join, or a resume of a participant.
#[derive(Clone, Debug)]
pub enum Start {
    /// A fresh join.
    Join,
    /// A resume of the participant with this sid.
    Resume(String),
}

/// What the server answered first.
#[derive(Debug)]
pub enum Opened {
    /// A fresh join's `JoinResponse`.
    Joined(Box<proto::JoinResponse>),
    /// A resume's `ReconnectResponse`.
    Resumed(Box<proto::ReconnectResponse>),
}

impl Signal {
    /// Dials `url`'s `/rtc` with `token` and reads the server's first
    /// message, within `timeout`.
    ///
    /// # Errors
    ///
    /// `AuthenticationFailed` for a refused token (HTTP 401/403),
    /// `ConnectionFailed` when the server cannot be reached, closes, sends
    /// `leave` (a refused resume: join afresh), or sends something else
    /// first, `ConnectionTimeout` past `timeout`, `InvalidConfig` for a URL
    /// that cannot be used.
    pub async fn connect(
        url: &str,
        token: &Secret,
        start: &Start,
        timeout: Duration,
        counters: Arc<LiveKitCounters>,
    ) -> Result<(Signal, Opened)> {
        const OP: &str = "livekit.signal";
        let mut rtc = rtc_url(url)
            .map_err(|m| BackendError::invalid_config(OP, format!("the LiveKit URL {m}")))?;
        {
            let mut q = rtc.query_pairs_mut();
            q.append_pair("sdk", "rust")
                .append_pair("version", env!("CARGO_PKG_VERSION"))
                .append_pair("protocol", &PROTOCOL_VERSION.to_string())
                .append_pair("auto_subscribe", "1")
                .append_pair("adaptive_stream", "0");
            if let Start::Resume(sid) = start {
                q.append_pair("reconnect", "1").append_pair("sid", sid);
            }
        }
        let mut dial = Dial::new(rtc.to_string()).bearer(token);
        dial.max_message = MAX_MESSAGE;
        let attempt = async {
            let mut ws = dial.connect("the LiveKit server").await?;
            loop {
                let Some(frame) = ws.next().await else {
                    return Err(closed_early(OP, "closed the connection"));
                };
                let frame = frame.map_err(|e| closed_early(OP, &format!("failed ({e})")))?;
                let decoded = match decode(&frame) {
                    Decoded::Message(message) => Ok(*message),
                    other => Err(other),
                };
                match decoded {
                    Ok(Response::Join(join)) => {
                        return Ok((ws, Opened::Joined(Box::new(join))));
                    }
                    Ok(Response::Reconnect(r)) => {
                        return Ok((ws, Opened::Resumed(Box::new(r))));
                    }
                    Ok(Response::Leave(leave)) => {
                        return Err(BackendError::new(
                            OP,
                            ErrorCode::ConnectionFailed,
                            format!(
                                "the LiveKit server refused the participant (leave, reason {})",
                                leave.reason().as_str_name()
                            ),
                        ));
                    }
                    Ok(_) | Err(Decoded::Control) => {}
                    Err(Decoded::Malformed(why)) => {
                        counters.malformed_signal(&why);
                    }
                    Err(Decoded::Close) => {
                        return Err(closed_early(OP, "closed the connection"));
                    }
                    Err(Decoded::Message(_)) => {}
                }
            }
        };
        let (ws, opened) = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(BackendError::new(
                    OP,
                    ErrorCode::ConnectionTimeout,
                    format!(
                        "the LiveKit server did not answer the join within {}",
                        humantime::format_duration(timeout)
                    ),
                ));
            }
        };
        let (ping, ping_timeout) = match &opened {
            Opened::Joined(join) if join.ping_interval > 0 && join.ping_timeout > 0 => (
                Duration::from_secs(join.ping_interval as u64),
                Duration::from_secs(join.ping_timeout as u64),
            ),
            _ => DEFAULT_PING,
        };
        let (out, out_rx) = mpsc::channel(OUT_QUEUE);
        let (events_tx, events) = mpsc::channel(OUT_QUEUE);
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn(run(
            ws,
            out_rx,
            events_tx,
            ping,
            ping_timeout,
            counters,
            closed.clone(),
        ));
        Ok((
            Signal {
                out,
                events,
                closed,
            },
            opened,
        ))
    }

    /// Queues `request` for the server; `false` once the connection ended.
    pub async fn send(&self, request: Request) -> bool {
        self.out.send(Outgoing::Request(request)).await.is_ok()
    }

    /// The next thing heard; `None` after [`SignalEvent::Closed`].
    pub async fn recv(&mut self) -> Option<SignalEvent> {
        self.events.recv().await
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Leaves the room: sends `leave` (client initiated, no reconnect) and
    /// closes the connection, waiting at most a second for it to go.
    pub async fn leave(mut self) {
        let leave = Request::Leave(proto::LeaveRequest {
            can_reconnect: false,
            reason: proto::DisconnectReason::ClientInitiated as i32,
            action: proto::leave_request::Action::Disconnect as i32,
            ..Default::default()
        });
        if self.out.send(Outgoing::Close(Some(leave))).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while self.events.recv().await.is_some() {}
            })
            .await;
        }
    }
}

fn closed_early(op: &'static str, what: &str) -> BackendError {
    BackendError::new(
        op,
        ErrorCode::ConnectionFailed,
        format!("the LiveKit signal connection {what} before the join was answered"),
    )
}

enum Decoded {
    Message(Box<Response>),
    /// A ping, pong or empty message: nothing to hand on.
    Control,
    Close,
    Malformed(String),
}

/// Decodes one binary signal message: the `SignalResponse`'s message, or
/// `None` for a `SignalResponse` without one (nothing to hand on). The
/// connection's task reads every binary frame with it; public for the fuzz
/// target.
///
/// # Errors
///
/// Why the bytes are not a protobuf `SignalResponse`.
#[doc(hidden)]
pub fn decode_response(bytes: &[u8]) -> std::result::Result<Option<Response>, String> {
    proto::SignalResponse::decode(bytes)
        .map(|response| response.message)
        .map_err(|e| format!("not a SignalResponse ({e})"))
}

/// Reads one WebSocket frame as a `SignalResponse`.
fn decode(frame: &WsMessage) -> Decoded {
    match frame {
        WsMessage::Binary(bytes) => match decode_response(bytes.as_ref()) {
            Ok(Some(message)) => Decoded::Message(Box::new(message)),
            Ok(None) => Decoded::Control,
            Err(e) => Decoded::Malformed(e),
        },
        WsMessage::Text(text) => Decoded::Malformed(format!(
            "a text frame of {} bytes (LiveKit signals in binary protobuf)",
            text.len()
        )),
        WsMessage::Close(_) => Decoded::Close,
        _ => Decoded::Control,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The connection's task: writes, reads, pings, and reports the end.
async fn run(
    mut ws: crate::runtime::WsStream,
    mut out: mpsc::Receiver<Outgoing>,
    events: mpsc::Sender<SignalEvent>,
    ping: Duration,
    ping_timeout: Duration,
    counters: Arc<LiveKitCounters>,
    closed: Arc<AtomicBool>,
) {
    let mut ticker = tokio::time::interval_at(Instant::now() + ping, ping);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    let mut rtt = 0i64;
    let reason = loop {
        tokio::select! {
            outgoing = out.recv() => match outgoing {
                Some(Outgoing::Request(request)) => {
                    let bytes = proto::SignalRequest { message: Some(request) }.encode_to_vec();
                    if let Err(e) = ws.send(WsMessage::Binary(bytes.into())).await {
                        break format!("writing to the server failed: {e}");
                    }
                }
                Some(Outgoing::Close(leave)) => {
                    if let Some(leave) = leave {
                        let bytes = proto::SignalRequest { message: Some(leave) }.encode_to_vec();
                        let _ = ws.send(WsMessage::Binary(bytes.into())).await;
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    break "closed by the client".to_owned();
                }
                None => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    break "closed by the client".to_owned();
                }
            },
            frame = ws.next() => {
                let Some(frame) = frame else { break "the server closed the connection".to_owned() };
                let frame = match frame {
                    Ok(f) => f,
                    Err(e) => break format!("the connection failed: {e}"),
                };
                heard = Instant::now();
                match decode(&frame) {
                    Decoded::Message(message) => match *message {
                        Response::PongResp(pong) => {
                            rtt = (now_ms() - pong.last_ping_timestamp).max(0);
                        }
                        Response::Pong(_) => {}
                        message => {
                            if events.send(SignalEvent::Message(Box::new(message))).await.is_err() {
                                break "the participant is gone".to_owned();
                            }
                        }
                    },
                    Decoded::Control => {}
                    Decoded::Malformed(why) => counters.malformed_signal(&why),
                    Decoded::Close => break "the server closed the connection".to_owned(),
                }
            }
            _ = ticker.tick() => {
                if heard.elapsed() > ping_timeout {
                    break format!(
                        "the server was silent for more than the ping timeout ({})",
                        humantime::format_duration(ping_timeout)
                    );
                }
                let ping = proto::SignalRequest {
                    message: Some(Request::PingReq(proto::Ping { timestamp: now_ms(), rtt })),
                };
                if let Err(e) = ws.send(WsMessage::Binary(ping.encode_to_vec().into())).await {
                    break format!("writing to the server failed: {e}");
                }
            }
        }
    };
    closed.store(true, Ordering::Release);
    let _ = events.send(SignalEvent::Closed(reason)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rtc_urls_take_every_livekit_scheme() {
        assert_eq!(
            rtc_url("wss://x.livekit.cloud").unwrap().as_str(),
            "wss://x.livekit.cloud/rtc"
        );
        assert_eq!(
            rtc_url("http://127.0.0.1:7880/").unwrap().as_str(),
            "ws://127.0.0.1:7880/rtc"
        );
        assert_eq!(
            rtc_url("https://h/base?x=1").unwrap().as_str(),
            "wss://h/base/rtc"
        );
        assert!(rtc_url("ftp://h").unwrap_err().contains("ftp"));
        assert!(rtc_url("not a url").is_err());
    }

    #[test]
    fn frames_that_are_not_signal_responses_are_malformed() {
        let ok = proto::SignalResponse {
            message: Some(Response::PongResp(proto::Pong {
                last_ping_timestamp: 1,
                timestamp: 2,
            })),
        };
        assert!(matches!(
            decode(&WsMessage::Binary(ok.encode_to_vec().into())),
            Decoded::Message(m) if matches!(*m, Response::PongResp(_))
        ));
        assert!(matches!(
            decode(&WsMessage::Binary(vec![0xff, 0xff, 0xff].into())),
            Decoded::Malformed(_)
        ));
        assert!(matches!(
            decode(&WsMessage::Text("{}".into())),
            Decoded::Malformed(_)
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&WsMessage::Binary(bytes.into()));
        }
    }
}
