//! The TCP side of the server: accepting connections, the per-address limit
//! on connections not (yet) upgraded to a WebSocket, HTTP/1 with a timeout
//! on request headers and on idle keep-alive, and the WebSocket upgrade.
//!
//! The upgrade is made here rather than by axum's extractor so that the
//! upgraded connection's reads go through the [`FrameGuard`], which counts
//! every WebSocket frame against the connection's message rate.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::frames::{FrameCounter, FrameGuard};
use super::metrics::Dropped;
use super::workers::{Workers, wait_true_ref};
use super::{Shared, Tracker, burst_of};

/// A client's upgraded WebSocket: its reads go through the frame guard.
pub(super) type Socket = WebSocketStream<FrameGuard<TokioIo<hyper::upgrade::Upgraded>>>;

/// How long accepting pauses after it failed for want of resources (out of
/// file descriptors or memory): the listener stays ready meanwhile, and
/// trying again at once would only spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// The least time between two log lines about the same kind of trouble.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Connections from each address against a limit, and how many are open in
/// all (for the shutdown to wait on).
#[derive(Debug)]
pub(super) struct PerAddress {
    counts: Mutex<HashMap<IpAddr, usize>>,
    limit: usize,
    pub(super) tracker: Tracker,
}

impl PerAddress {
    pub(super) fn new(limit: usize) -> PerAddress {
        PerAddress {
            counts: Mutex::new(HashMap::new()),
            limit,
            tracker: Tracker::default(),
        }
    }
}

/// Which of the server's [`PerAddress`] counts a slot is of.
#[derive(Clone, Copy, Debug)]
pub(super) enum Kind {
    /// HTTP connections not upgraded (yet).
    Http,
    /// WebSocket connections.
    WebSocket,
}

fn counts_of(shared: &Shared, kind: Kind) -> &PerAddress {
    match kind {
        Kind::Http => &shared.http,
        Kind::WebSocket => &shared.websockets,
    }
}

/// One connection's claim on its address's slots of one kind, and on the
/// shutdown's count of that kind; released on drop.
pub(super) struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
    kind: Kind,
}

impl Slot {
    /// Takes a slot of `kind` for `ip`, or `None` when the address has all
    /// of its own.
    pub(super) fn take(shared: &Arc<Shared>, ip: IpAddr, kind: Kind) -> Option<Slot> {
        let of = counts_of(shared, kind);
        let mut counts = of.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(ip).or_insert(0);
        if *n >= of.limit {
            return None;
        }
        *n += 1;
        of.tracker.live.fetch_add(1, Ordering::AcqRel);
        Some(Slot {
            shared: shared.clone(),
            ip,
            kind,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let of = counts_of(&self.shared, self.kind);
        {
            let mut counts = of.counts.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = counts.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&self.ip);
                }
            }
        }
        if of.tracker.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            of.tracker.idle.notify_waiters();
        }
    }
}

/// Logs one kind of trouble at most once per [`LOG_EVERY`], with the count
/// of times it happened since the last line.
#[derive(Debug)]
struct Throttled {
    last: Option<Instant>,
    unlogged: u64,
}

impl Throttled {
    fn new() -> Throttled {
        Throttled {
            last: None,
            unlogged: 0,
        }
    }

    /// Counts one more; `Some(count)` when a line is due now.
    fn due(&mut self) -> Option<u64> {
        self.unlogged += 1;
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Whether a failed `accept` was about one connection (the client gave up
/// before it was accepted) rather than the listener or the process.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Where accepted connections are served.
pub(super) enum Serving {
    /// As tasks of the runtime that accepts them.
    Here,
    /// On the worker threads.
    Workers(Workers),
}

/// Accepts connections and serves each until `stop` turns `true`, then
/// waits until every HTTP connection has finished (upgraded WebSockets are
/// not waited for: the server closes them itself), and hands `serving` back:
/// the worker threads go on serving the WebSockets until it is dropped.
pub(super) async fn accept(
    listener: TcpListener,
    shared: Arc<Shared>,
    app: Router,
    mut serving: Serving,
    mut stop: watch::Receiver<bool>,
) -> Serving {
    let mut failing = Throttled::new();
    let mut over_limit = Throttled::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = wait_true_ref(&mut stop) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                shared.metrics.accept_failed();
                if let Some(times) = failing.due() {
                    tracing::warn!(
                        times,
                        "accepting connections failed: {e}; pausing {ACCEPT_PAUSE:?}"
                    );
                }
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_PAUSE) => continue,
                    () = wait_true_ref(&mut stop) => break,
                }
            }
        };
        let Some(slot) = Slot::take(&shared, peer.ip(), Kind::Http) else {
            shared.metrics.dropped(Dropped::AddressLimit);
            if let Some(times) = over_limit.due() {
                tracing::info!(
                    peer = %peer.ip(),
                    times,
                    "closed a connection: the address has {} HTTP connections open",
                    shared.config.max_http_connections_per_ip
                );
            }
            drop(tcp);
            continue;
        };
        super::real_time(&tcp);
        let stop = stop.clone();
        match &mut serving {
            Serving::Here => {
                tokio::spawn(serve_http(
                    shared.clone(),
                    app.clone(),
                    tcp,
                    peer,
                    slot,
                    stop,
                ));
            }
            Serving::Workers(workers) => {
                workers.serve(&shared, &app, tcp, peer, slot, stop);
            }
        }
    }
    drop(listener);
    shared.http.tracker.wait_idle().await;
    serving
}

/// Serves HTTP/1 on one connection until it closes, upgrades, or `stop`
/// turns `true` (then the request in flight is answered and it closes).
pub(super) async fn serve_http<I>(
    shared: Arc<Shared>,
    app: Router,
    io: I,
    peer: SocketAddr,
    slot: Slot,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let checking = shared.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        let refused = super::host_refusal(&checking, request.uri(), request.headers());
        request.extensions_mut().insert(ConnectInfo(peer));
        let mut app = app.clone();
        async move {
            match refused {
                Some(refusal) => Ok(refusal),
                None => tower_service::Service::call(&mut app, request).await,
            }
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Runs from the connection's start, and again whenever it waits for
        // the next request: an idle keep-alive connection closes with it.
        .header_read_timeout(shared.config.request_timeout)
        .keep_alive(true);
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        () = wait_true_ref(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = ended {
        if e.is_timeout() {
            shared.metrics.dropped(Dropped::RequestTimeout);
            tracing::debug!(peer = %peer.ip(), "closed an HTTP connection: {e}");
        } else {
            tracing::debug!(peer = %peer.ip(), "an HTTP connection ended: {e}");
        }
    }
    drop(slot);
}

/// A WebSocket upgrade request: checked, ready to be answered with 101.
pub(super) struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

/// Why a request to `/ws` is not a WebSocket upgrade.
#[derive(Debug)]
pub(super) struct NotAnUpgrade(StatusCode, &'static str);

impl IntoResponse for NotAnUpgrade {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

/// Whether the comma-separated header `name` has the token `token`.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = NotAnUpgrade;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Upgrade, NotAnUpgrade> {
        if parts.method != Method::GET {
            return Err(NotAnUpgrade(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket upgrade must be a GET request",
            ));
        }
        if !has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(NotAnUpgrade(
                StatusCode::BAD_REQUEST,
                "Connection header did not include 'upgrade'",
            ));
        }
        if !has_token(&parts.headers, header::UPGRADE, "websocket") {
            return Err(NotAnUpgrade(
                StatusCode::BAD_REQUEST,
                "`Upgrade` header did not include 'websocket'",
            ));
        }
        if parts
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(NotAnUpgrade(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Version` header did not include '13'",
            ));
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return Err(NotAnUpgrade(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Key` header missing",
            ));
        };
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err(NotAnUpgrade(
                StatusCode::UPGRADE_REQUIRED,
                "WebSocket request couldn't be upgraded since no upgrade state was present",
            ));
        };
        Ok(Upgrade { key, on_upgrade })
    }
}

impl Upgrade {
    /// Answers 101 and, once the connection is handed over, runs `serve` on
    /// the WebSocket (a task of its own).
    pub(super) fn accept<F, Fut>(self, shared: &Shared, serve: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // Messages up to twice the limit are read whole, so the 1009 close
        // is an orderly handshake; larger ones are cut off as soon as their
        // header says so.
        let hard_limit = shared.config.max_frame_bytes.saturating_mul(2);
        let config = WebSocketConfig::default()
            .max_message_size(Some(hard_limit))
            .max_frame_size(Some(hard_limit))
            // Audio frames are small (640 bytes for 20 ms at 16 kHz): the
            // 128 KiB default, zeroed before every read, dominated the
            // server's CPU under load, and 16 KiB was still 8 % of it.
            // Larger messages are still read whole, this much per read.
            .read_buffer_size(super::READ_BUFFER);
        let rate = shared.config.messages_per_second;
        let counter = FrameCounter::new(rate, burst_of(rate));
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!("the WebSocket upgrade failed: {e}");
                    return;
                }
            };
            let io = FrameGuard::new(TokioIo::new(upgraded), counter);
            let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            serve(socket).await;
        });
        let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(self.key.as_bytes())) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}

/// Binds a listening socket on `addr` whose accepted connections have a
/// kernel send buffer of `send_buffer` bytes (Linux doubles it for its own
/// bookkeeping), so a client that stops reading holds at most that much of
/// its reply in the kernel before the server's writes wait.
pub(super) fn listen(addr: SocketAddr, send_buffer: usize) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.set_send_buffer_size(u32::try_from(send_buffer).unwrap_or(u32::MAX))?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Raises the process's soft limit on open files to its hard limit, so a
/// server with many connections is not cut off at a low default (often
/// 1024) while the system allows more. Returns the limit now in force.
///
/// [`Server::bind`](super::Server::bind) does this; call it yourself to do
/// it earlier.
///
/// # Errors
///
/// The system call's error.
pub fn raise_open_files_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttled_logs_once_a_second_with_the_count() {
        let mut t = Throttled::new();
        assert_eq!(t.due(), Some(1));
        assert_eq!(t.due(), None);
        assert_eq!(t.due(), None);
        t.last = Some(Instant::now() - LOG_EVERY);
        assert_eq!(t.due(), Some(3));
    }

    #[test]
    fn connection_tokens_are_found_in_lists() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(has_token(&h, header::CONNECTION, "upgrade"));
        assert!(!has_token(&h, header::CONNECTION, "close"));
    }
}
