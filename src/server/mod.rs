//! The HTTP + WebSocket front door: one WebSocket per voice session, a web
//! page to talk to the agent from a browser, `/healthz` and `/metrics`.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the web page (`index.html`), with `/app.js` and `/pcm-worklet.js` |
//! | `GET /healthz` | [`VoiceBackend::health_check`] as JSON; 200 when healthy or degraded, 503 when unhealthy |
//! | `GET /metrics` | Prometheus text: the backend's metrics and the server's own |
//! | `GET /ws` | one WebSocket per session (the protocol below) |
//!
//! # The WebSocket protocol
//!
//! 1. The client's first message is text:
//!    `{"type":"start","user_id":"alice","sample_rate":16000,"token":"optional"}`
//!    (`sample_rate` one of the usual rates, 8000 to 48000). The token may
//!    instead come in the upgrade request's `Authorization: Bearer <token>`
//!    header; the start message's token wins, unless it is empty. It is given to the backend's auth hook.
//! 2. The server answers
//!    `{"type":"ready","session_id":"...","sample_rate":16000,"encoding":"pcm_s16le","channels":1}`.
//! 3. The client streams binary messages of PCM s16le mono audio at its
//!    `sample_rate` (any whole number of samples), may send
//!    `{"type":"text","text":"..."}` in place of speech, and ends with
//!    `{"type":"stop"}` (the turn in flight finishes, then close 1000).
//! 4. The server sends every [`SessionEvent`](crate::pipeline::events::SessionEvent)
//!    as JSON text (`{"type":"state",...}`, `speech_started`, `turn_ended`,
//!    `user_transcript`, `agent_text`, `interrupted`, `latency`, `error`,
//!    `connection`, `closed`) and the reply audio as binary messages, PCM s16le mono at the
//!    client's `sample_rate`.
//!
//! Every refusal closes with a code and a human reason: 1002 protocol
//! violation, 1003 bad audio, 1007 text that is not UTF-8, 1008 auth,
//! message rate or audio faster than real time, 1009 message too big, 1011
//! internal error, 1013
//! capacity or rate limit (try again later), 1001 shutting down, 1000
//! normal. Origin and per-address connection
//! limits are checked before the upgrade and refused with HTTP 403 and 429.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use voice_backends::server::{Server, ServerConfig};
//! use voice_backends::{Config, PipelineType, registry};
//!
//! # async fn demo() -> voice_backends::Result<()> {
//! let mut config = Config::new("local");
//! config.pipeline_type = PipelineType::S2s;
//! config.s2s_provider = Some("echo".into());
//! let backend = registry().create("local", &config).await?;
//! backend.start().await?;
//! let server = Server::bind(backend, ServerConfig::default()).await?;
//! println!("listening on http://{}", server.local_addr());
//! server
//!     .run(async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     })
//!     .await
//! # }
//! ```

/// `impl AsyncWrite` for a wrapper whose writes go to its field `$field`
/// untouched (the wrappers of the server's connections change reads only).
macro_rules! write_through {
    (impl[$($g:tt)*] $ty:ty, $field:ident) => {
        impl<$($g)*> tokio::io::AsyncWrite for $ty {
            #[inline]
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write(cx, buf)
            }

            #[inline]
            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }

            #[inline]
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_shutdown(cx)
            }
        }
    };
}
use write_through;

mod connection;
mod frames;
mod http;
mod metrics;
pub(crate) mod protocol;
mod workers;

pub use http::raise_open_files_limit;
pub use workers::MAX_WORKERS;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::backend::{Health, VoiceBackend};
use crate::config::Secret;
use crate::error::{BackendError, ErrorCode, Result};
use crate::hooks::TokenBucketLimiter;

use http::{Kind, PerAddress, Serving, Slot, Upgrade};
use metrics::{Refusal, ServerMetrics};
use workers::Workers;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const PCM_WORKLET_JS: &str = include_str!("assets/pcm-worklet.js");

/// A WebSocket's read buffer, and the most it reads at once: three 20 ms
/// frames at 16 kHz. tungstenite zeroes what is left of it before every read,
/// so larger costs more per frame (memory touched per frame: the buffers of
/// a thousand connections do not stay in cache); smaller means more reads
/// when frames queue up.
const READ_BUFFER: usize = 2 * 1024;

/// The least [`ServerConfig::max_audio_ahead`].
const MIN_AUDIO_AHEAD: Duration = Duration::from_millis(100);

/// The least [`ServerConfig::send_buffer_bytes`].
const MIN_SEND_BUFFER: usize = 4 * 1024;

/// How long the server waits for connections to finish their close
/// handshakes, and for HTTP requests in flight, once shutting down.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How the server listens and what it allows.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The address to listen on (port 0 picks a free port); default
    /// `127.0.0.1:8089`.
    pub listen: SocketAddr,
    /// Exact origins (`scheme://host[:port]`, e.g. `"http://localhost:8089"`)
    /// whose pages may open WebSockets. Empty (the default): only pages of the
    /// same host, whose `Origin` host and port equal the `Host` header.
    /// Clients that send no `Origin` (not browsers) are always allowed.
    /// Each is checked to be written as browsers send it (no default port,
    /// path or wildcard), or it could never match.
    pub allowed_origins: Vec<String>,
    /// The largest WebSocket message accepted, in bytes; larger ones close
    /// the connection with 1009. Default 64 KiB.
    pub max_frame_bytes: usize,
    /// Host names the server may be reached by: the `Host` header of every
    /// request must name one (its port is not compared), or the request is
    /// refused with 403, so that a page of another site whose name an
    /// attacker points at this server's address (DNS rebinding) cannot use
    /// it. An entry is a name (`voice.example.com`), an IP address
    /// (`192.0.2.7`, `[2001:db8::7]`), a domain with its subdomains
    /// (`.example.com`), or `*` for any host. Requests without a `Host`
    /// header are allowed (browsers always send one).
    ///
    /// Empty (the default): when the server listens on a loopback address,
    /// `localhost`, names ending in `.localhost`, and IP addresses; on any
    /// other address, any host (list the server's names when it is reachable
    /// from other machines).
    pub allowed_hosts: Vec<String>,
    /// WebSocket connections open at once from one IP address; default 32.
    pub max_connections_per_ip: usize,
    /// HTTP connections not (yet) upgraded to a WebSocket open at once from
    /// one IP address: requests for the page, `/healthz` or `/metrics`, idle
    /// keep-alive connections, upgrades under way; default 16. A connection
    /// beyond is closed as soon as it is accepted.
    pub max_http_connections_per_ip: usize,
    /// How long an HTTP connection may take to send a request's headers,
    /// counted from when it opens and again from the end of each response
    /// (so it is also how long an idle keep-alive connection is kept);
    /// default 10 s.
    pub request_timeout: Duration,
    /// How long a started session may go without a message from its client
    /// (binary audio or text; pings and pongs do not count) before it is
    /// closed with 1008 `idle: ...`; default 60 s.
    pub idle_timeout: Duration,
    /// How long the server waits for a client to take what it sends (reply
    /// audio and events): a write that cannot complete in this time (the
    /// client stopped reading and the buffers between are full) closes the
    /// connection and stops its session; default 10 s.
    pub send_timeout: Duration,
    /// The kernel send buffer of each connection, in bytes (Linux doubles
    /// it): with the socket's own write buffer, how much of its reply a
    /// client that stops reading holds before the server's writes wait (and
    /// [`send_timeout`](Self::send_timeout) starts to run); default 256 KiB,
    /// at least 4 KiB. The reply's audio at 48 kHz is 96 KB per second.
    pub send_buffer_bytes: usize,
    /// New WebSocket connections per second from one IP address, on average;
    /// default 20. Bursts of twice as many are allowed.
    pub connections_per_second_per_ip: f64,
    /// Client messages per second on one connection, on average; default
    /// 200. Bursts of twice as many are allowed; beyond, close 1008.
    pub messages_per_second: f64,
    /// How far ahead of real time a client's audio may run. Audio is taken
    /// at one second of it per second, plus up to this much more at once (a
    /// client catching up after a network stall, a recording sent whole);
    /// audio beyond closes the connection with 1008, so that no client makes
    /// its worker process audio faster than real time for long. Default
    /// 10 s; at least 100 ms.
    pub max_audio_ahead: Duration,
    /// How long a new connection has to send `start`; default 10 s.
    pub start_timeout: Duration,
    /// How long in-flight turns may take to finish on shutdown; default 10 s.
    pub shutdown_deadline: Duration,
    /// Threads that serve the connections, each a runtime of its own
    /// (threads `vb-serve-0`, `vb-serve-1`, ...), at most 1024. A new
    /// connection goes to the worker serving the fewest (the gauge
    /// `server_worker_connections`), and everything of a connection (its
    /// session and the session's timers and components) stays on that
    /// thread, so no wake-up crosses threads and no task moves between
    /// cores. One per core is the fastest way to serve many sessions.
    ///
    /// 0 (the default): connections are served on the runtime that calls
    /// [`Server::run`], where its scheduler puts them.
    ///
    /// The workers end with `run`: dropping its future before it completes
    /// ends them at once, with the connections they serve. (With 0, the
    /// listener closes then too, but connections already upgraded to
    /// WebSockets go on as tasks of the caller's runtime.)
    pub workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8089)),
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            max_frame_bytes: 64 * 1024,
            max_connections_per_ip: 32,
            max_http_connections_per_ip: 16,
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(10),
            send_buffer_bytes: 256 * 1024,
            connections_per_second_per_ip: 20.0,
            messages_per_second: 200.0,
            max_audio_ahead: Duration::from_secs(10),
            start_timeout: Duration::from_secs(10),
            shutdown_deadline: Duration::from_secs(10),
            workers: 0,
        }
    }
}

impl ServerConfig {
    /// Checks the options; [`Server::bind`] does too.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` naming the first option out of range: an allowed
    /// origin that no browser would send, an allowed host that is not a
    /// host name, a `max_frame_bytes` under 256, no connections per address,
    /// a rate that is not a positive number, more than 1024 `workers`, a
    /// `max_audio_ahead` under 100 ms, a zero timeout, or a
    /// `send_buffer_bytes` under 4 KiB.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "server.bind";
        let rate_ok = |r: f64| r.is_finite() && r > 0.0;
        if self.max_frame_bytes < 256 {
            return Err(BackendError::invalid_config(
                OP,
                format!(
                    "max_frame_bytes must be at least 256, got {}",
                    self.max_frame_bytes
                ),
            ));
        }
        if self.max_connections_per_ip == 0 {
            return Err(BackendError::invalid_config(
                OP,
                "max_connections_per_ip must be at least 1",
            ));
        }
        if self.max_http_connections_per_ip == 0 {
            return Err(BackendError::invalid_config(
                OP,
                "max_http_connections_per_ip must be at least 1",
            ));
        }
        if self.send_buffer_bytes < MIN_SEND_BUFFER {
            return Err(BackendError::invalid_config(
                OP,
                format!(
                    "send_buffer_bytes must be at least {MIN_SEND_BUFFER}, got {}",
                    self.send_buffer_bytes
                ),
            ));
        }
        for host in &self.allowed_hosts {
            check_allowed_host(host).map_err(|why| BackendError::invalid_config(OP, why))?;
        }
        if !rate_ok(self.connections_per_second_per_ip) {
            return Err(BackendError::invalid_config(
                OP,
                format!(
                    "connections_per_second_per_ip must be a positive number, got {}",
                    self.connections_per_second_per_ip
                ),
            ));
        }
        if !rate_ok(self.messages_per_second) {
            return Err(BackendError::invalid_config(
                OP,
                format!(
                    "messages_per_second must be a positive number, got {}",
                    self.messages_per_second
                ),
            ));
        }
        if self.workers > workers::MAX_WORKERS {
            return Err(BackendError::invalid_config(
                OP,
                format!(
                    "workers must be at most {}, got {}",
                    workers::MAX_WORKERS,
                    self.workers
                ),
            ));
        }
        for origin in &self.allowed_origins {
            check_allowed_origin(origin).map_err(|why| BackendError::invalid_config(OP, why))?;
        }
        if self.max_audio_ahead < MIN_AUDIO_AHEAD {
            return Err(BackendError::invalid_config(
                OP,
                format!(
                    "max_audio_ahead must be at least 100ms, got {}",
                    humantime::format_duration(self.max_audio_ahead)
                ),
            ));
        }
        for (name, timeout) in [
            ("start_timeout", self.start_timeout),
            ("request_timeout", self.request_timeout),
            ("idle_timeout", self.idle_timeout),
            ("send_timeout", self.send_timeout),
        ] {
            if timeout.is_zero() {
                return Err(BackendError::invalid_config(
                    OP,
                    format!("{name} must be more than zero"),
                ));
            }
        }
        Ok(())
    }
}

/// That `origin` is written as browsers send `Origin` (`scheme://host[:port]`,
/// no default port, path or wildcard), so it can match one.
fn check_allowed_origin(origin: &str) -> std::result::Result<(), String> {
    let trimmed = origin.trim_end_matches('/');
    let bad = |how: String| format!("allowed origin {origin:?} {how}");
    let url = url::Url::parse(trimmed).map_err(|_| {
        bad("is not an origin; write scheme://host[:port], e.g. https://app.example.com".into())
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad("is not an http or https origin".into()));
    }
    let canonical = url.origin().ascii_serialization();
    if canonical.eq_ignore_ascii_case(trimmed) {
        Ok(())
    } else {
        Err(bad(format!(
            "never matches: browsers send it as {canonical:?} (no default port, path or query)"
        )))
    }
}

/// That `entry` of [`ServerConfig::allowed_hosts`] can match a `Host`: `*`,
/// a host name or IP address without port, or `.` and a domain.
fn check_allowed_host(entry: &str) -> std::result::Result<(), String> {
    let bad = || {
        format!(
            "allowed host {entry:?} is not a host: write a name (voice.example.com), an IP \
             address, .example.com for a domain and its subdomains, or * for any host"
        )
    };
    if entry == "*" {
        return Ok(());
    }
    if entry.contains('*') {
        return Err(bad());
    }
    let name = entry.strip_prefix('.').unwrap_or(entry);
    // Written as the host alone: no port (not even the default one, which
    // parsing drops), no path.
    let alone = |host: &url::Host<String>| host.to_string().eq_ignore_ascii_case(name);
    match parse_host(name) {
        Some((host @ url::Host::Domain(_), None)) if alone(&host) => Ok(()),
        Some((host, None)) if !entry.starts_with('.') && alone(&host) => Ok(()),
        _ => Err(bad()),
    }
}

/// The host and port of a `Host` header's value (`name[:port]`,
/// `[v6]:port`), lowercased; `None` when it is not one.
fn parse_host(value: &str) -> Option<(url::Host<String>, Option<u16>)> {
    if value.is_empty() || value.contains(['/', '@', '?', '#', '\\', ' ']) {
        return None;
    }
    let url = url::Url::parse(&format!("http://{value}/")).ok()?;
    Some((url.host()?.to_owned(), url.port()))
}

/// Whether a request's `Host` names the server as
/// [`ServerConfig::allowed_hosts`] allows; the error is the reason.
fn check_host(
    allowed: &[String],
    local: SocketAddr,
    headers: &HeaderMap,
) -> std::result::Result<(), String> {
    let Some(value) = headers.get(header::HOST) else {
        return Ok(());
    };
    let shown = || {
        String::from_utf8_lossy(value.as_bytes())
            .chars()
            .take(100)
            .collect::<String>()
    };
    let refused = || Err(format!("host not allowed: {}", shown()));
    let Some((host, _)) = value.to_str().ok().and_then(parse_host) else {
        return refused();
    };
    let ok = if allowed.is_empty() {
        !local.ip().is_loopback()
            || match &host {
                url::Host::Domain(name) => name == "localhost" || name.ends_with(".localhost"),
                url::Host::Ipv4(_) | url::Host::Ipv6(_) => true,
            }
    } else {
        allowed.iter().any(|entry| {
            if entry == "*" {
                return true;
            }
            match (entry.strip_prefix('.'), &host) {
                (Some(domain), url::Host::Domain(name)) => {
                    let domain = domain.to_ascii_lowercase();
                    *name == domain
                        || name
                            .strip_suffix(domain.as_str())
                            .is_some_and(|sub| sub.ends_with('.'))
                }
                (Some(_), _) => false,
                (None, _) => parse_host(entry).is_some_and(|(listed, _)| listed == host),
            }
        })
    };
    if ok { Ok(()) } else { refused() }
}

/// Twice `rate`, as a whole burst of at least 1.
fn burst_of(rate: f64) -> u32 {
    (rate * 2.0).ceil().clamp(1.0, u32::MAX as f64) as u32
}

/// Where the server is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Serving.
    Running,
    /// Shutting down: no new sessions; sessions finish their turns.
    Draining,
    /// Shutting down: close every remaining WebSocket now.
    Closing,
}

/// Counts live WebSocket connections so shutdown can wait for them.
#[derive(Debug, Default)]
pub(super) struct Tracker {
    pub(super) live: AtomicUsize,
    pub(super) idle: Notify,
}

impl Tracker {
    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.live.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Everything the handlers share.
struct Shared {
    backend: Arc<dyn VoiceBackend>,
    config: ServerConfig,
    metrics: ServerMetrics,
    connection_rate: TokenBucketLimiter,
    /// The server's address, to know whether it listens on loopback.
    local_addr: SocketAddr,
    /// HTTP connections not upgraded, per address.
    http: PerAddress,
    /// WebSocket connections, per address.
    websockets: PerAddress,
    phase: watch::Sender<Phase>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("backend", &self.backend.provider())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The HTTP + WebSocket server of one backend; see the [module docs](self).
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds the listener of `config.listen` (port 0 picks a free port) and
    /// prepares to serve `backend`, which should be started. Nothing is served
    /// until [`Server::run`].
    ///
    /// # Errors
    ///
    /// `InvalidConfig` for a bad `config`; `ConnectionFailed` when the address
    /// cannot be bound.
    #[tracing::instrument(name = "server.bind", skip_all, fields(listen = %config.listen))]
    pub async fn bind(backend: Arc<dyn VoiceBackend>, config: ServerConfig) -> Result<Server> {
        config.validate()?;
        let connection_rate = TokenBucketLimiter::new(
            config.connections_per_second_per_ip,
            burst_of(config.connections_per_second_per_ip),
        )?;
        match raise_open_files_limit() {
            Ok(limit) => tracing::debug!(limit, "open files limit"),
            Err(e) => tracing::debug!("could not raise the open files limit: {e}"),
        }
        let listener = http::listen(config.listen, config.send_buffer_bytes).map_err(|e| {
            BackendError::new(
                "server.bind",
                ErrorCode::ConnectionFailed,
                format!("could not listen on {}: {e}", config.listen),
            )
            .with_source(e)
        })?;
        let local_addr = listener.local_addr().map_err(|e| {
            BackendError::new(
                "server.bind",
                ErrorCode::ConnectionFailed,
                format!("the listener has no local address: {e}"),
            )
            .with_source(e)
        })?;
        let (phase, _) = watch::channel(Phase::Running);
        let metrics = ServerMetrics::with_workers(config.workers);
        Ok(Server {
            listener,
            local_addr,
            shared: Arc::new(Shared {
                backend,
                metrics,
                connection_rate,
                local_addr,
                http: PerAddress::new(config.max_http_connections_per_ip),
                websockets: PerAddress::new(config.max_connections_per_ip),
                config,
                phase,
            }),
        })
    }

    /// The address the server listens on (with the port picked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully: stops
    /// accepting connections and sessions, calls the backend's
    /// [`stop`](VoiceBackend::stop) so in-flight turns finish (bounded by
    /// [`ServerConfig::shutdown_deadline`]) and their audio and events still
    /// reach the clients, closes the remaining WebSockets with 1001 "server
    /// shutting down", and returns `Ok`. The backend is stopped afterwards.
    ///
    /// # Errors
    ///
    /// `ConnectionFailed` if serving fails before `shutdown` resolves.
    #[tracing::instrument(name = "server.run", skip_all, fields(addr = %self.local_addr))]
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let Server {
            listener,
            local_addr,
            shared,
        } = self;
        let app = router(shared.clone());
        let (stop_accepting, accepting_stopped) = watch::channel(false);
        // The server's own task, and the worker threads when there are any:
        // they are dropped (ending whatever still runs on them) only once
        // every connection has closed or the close grace is over.
        let serving = if shared.config.workers == 0 {
            Serving::Here
        } else {
            Serving::Workers(Workers::start(shared.config.workers).map_err(|e| {
                BackendError::new(
                    "server.run",
                    ErrorCode::ConnectionFailed,
                    format!("could not start the server's worker threads: {e}"),
                )
                .with_source(e)
            })?)
        };
        // The acceptor, and the worker threads when there are any: they are
        // dropped (ending whatever still runs on them) only once every
        // connection has closed or the close grace is over.
        let mut serving = tokio::spawn(http::accept(
            listener,
            shared.clone(),
            app,
            serving,
            accepting_stopped,
        ));
        tracing::info!(%local_addr, provider = shared.backend.provider(), "serving");

        tokio::pin!(shutdown);
        tokio::select! {
            _ = &mut shutdown => {}
            ended = &mut serving => {
                shared.phase.send_replace(Phase::Closing);
                let message = match ended {
                    Ok(_) => "the server stopped on its own".to_owned(),
                    Err(e) => format!("the serving task failed: {e}"),
                };
                return Err(BackendError::new("server.run", ErrorCode::ConnectionFailed, message));
            }
        }

        let started = Instant::now();
        let deadline = shared.config.shutdown_deadline;
        tracing::info!(
            sessions = shared.backend.active_session_count(),
            "shutting down; in-flight turns have {deadline:?}"
        );
        shared.phase.send_replace(Phase::Draining);
        stop_accepting.send_replace(true);
        // On a task of its own: past the deadline the connections close, and
        // the backend's stop goes on to its end (its sessions' own deadlines)
        // rather than being cut off half-way.
        let stopping = tokio::spawn({
            let backend = shared.backend.clone();
            async move { backend.stop().await }
        });
        match tokio::time::timeout(deadline, stopping).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(code = %e.code, "backend stop: {}", e.message),
            Ok(Err(e)) => tracing::warn!("backend stop failed: {e}"),
            Err(_) => tracing::warn!(
                "in-flight turns did not finish within {deadline:?}; the backend goes on stopping"
            ),
        }
        shared.phase.send_replace(Phase::Closing);
        if tokio::time::timeout(CLOSE_GRACE, shared.websockets.tracker.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                open = shared.websockets.tracker.live.load(Ordering::Acquire),
                "WebSocket connections did not close in time; dropping them"
            );
        }
        // The acceptor returns once its HTTP connections have finished, with
        // the worker threads, which end when dropped here (aborting it drops
        // them too), with whatever they still serve.
        match tokio::time::timeout(CLOSE_GRACE, &mut serving).await {
            Ok(served) => drop(served),
            Err(_) => {
                tracing::warn!("HTTP requests were still in flight; dropping them");
                serving.abort();
                let _ = serving.await;
            }
        }
        tracing::info!(took = ?started.elapsed(), "stopped");
        Ok(())
    }
}

/// Sets up an accepted connection for real-time audio: small writes are not
/// held back (no Nagle delay).
pub(super) fn real_time(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/app.js", get(|| async { javascript(APP_JS) }))
        .route(
            "/pcm-worklet.js",
            get(|| async { javascript(PCM_WORKLET_JS) }),
        )
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/ws", get(websocket))
        .with_state(shared)
}

fn javascript(body: &'static str) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/javascript; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

#[tracing::instrument(name = "server.healthz", skip_all)]
async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    let health = shared.backend.health_check().await;
    let status = match health.status {
        Health::Healthy | Health::Degraded => StatusCode::OK,
        Health::Unhealthy => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, axum::Json(health)).into_response()
}

#[tracing::instrument(name = "server.metrics", skip_all)]
async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    if !shared.backend.config().enable_metrics {
        return (
            StatusCode::NOT_FOUND,
            "metrics are off: the backend's config has enable_metrics = false\n",
        )
            .into_response();
    }
    let mut text = match shared.backend.metrics() {
        Some(m) => crate::metrics::render_prometheus_all(&[&m]),
        None => String::new(),
    };
    shared.metrics.render(&mut text);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// A refusal before the upgrade: an HTTP status with a plain-text reason.
fn refuse(shared: &Shared, reason: Refusal, status: StatusCode, message: String) -> Response {
    shared.metrics.refused(reason);
    tracing::info!(reason = ?reason, "refused a WebSocket: {message}");
    let mut response = (status, message).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

async fn websocket(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: Upgrade,
) -> Response {
    shared.metrics.connection_attempt();
    if *shared.phase.borrow() != Phase::Running {
        return refuse(
            &shared,
            Refusal::Shutdown,
            StatusCode::SERVICE_UNAVAILABLE,
            "server shutting down".into(),
        );
    }
    if let Err(message) = check_origin(&shared.config.allowed_origins, &headers) {
        return refuse(&shared, Refusal::Origin, StatusCode::FORBIDDEN, message);
    }
    let ip = peer.ip();
    if let Err(wait) = shared
        .connection_rate
        .try_take_at(&ip.to_string(), 1, Instant::now())
    {
        return refuse(
            &shared,
            Refusal::RateLimit,
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "connection rate limit exceeded ({} per second per address); retry in {} ms",
                shared.config.connections_per_second_per_ip,
                wait.as_millis().max(1)
            ),
        );
    }
    let Some(slot) = Slot::take(&shared, ip, Kind::WebSocket) else {
        return refuse(
            &shared,
            Refusal::Capacity,
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many connections from your address (at most {})",
                shared.config.max_connections_per_ip
            ),
        );
    };
    let header_token = bearer_token(&headers);
    let span = tracing::info_span!(
        "server.connection",
        peer = %ip,
        session_id = tracing::field::Empty,
        user_id = tracing::field::Empty,
    );
    let serving = shared.clone();
    upgrade.accept(&shared, move |socket| {
        connection::serve(serving, socket, header_token, slot).instrument(span)
    })
}

/// The refusal (403) of a request whose `Host` the server may not be reached
/// by ([`ServerConfig::allowed_hosts`]); `None` when it may.
fn host_refusal(shared: &Shared, uri: &axum::http::Uri, headers: &HeaderMap) -> Option<Response> {
    let message = check_host(&shared.config.allowed_hosts, shared.local_addr, headers).err()?;
    if uri.path() == "/ws" {
        shared.metrics.connection_attempt();
        return Some(refuse(
            shared,
            Refusal::Host,
            StatusCode::FORBIDDEN,
            message,
        ));
    }
    tracing::debug!("refused a request: {message}");
    Some((StatusCode::FORBIDDEN, message).into_response())
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer_token(headers: &HeaderMap) -> Option<Secret> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| Secret::new(token))
}

/// Whether the request's `Origin` may open a WebSocket; the error is the reason.
fn check_origin(allowed: &[String], headers: &HeaderMap) -> std::result::Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let Ok(origin) = origin.to_str() else {
        return Err("origin not allowed: the Origin header is not valid text".into());
    };
    let shown = || origin.chars().take(100).collect::<String>();
    if !allowed.is_empty() {
        return if allowed
            .iter()
            .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
        {
            Ok(())
        } else {
            Err(format!("origin not allowed: {}", shown()))
        };
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if same_host(origin, host) {
        Ok(())
    } else {
        Err(format!(
            "origin not allowed: {} is not this server's host",
            shown()
        ))
    }
}

/// Whether `origin` (`scheme://host[:port]`) names the same host and port as
/// the `Host` header `host` (whose missing port is the scheme's default).
fn same_host(origin: &str, host: &str) -> bool {
    let Ok(origin) = url::Url::parse(origin) else {
        return false;
    };
    if host.is_empty() || host.contains(['/', '@', '?', '#']) {
        return false;
    }
    let Ok(host) = url::Url::parse(&format!("{}://{host}", origin.scheme())) else {
        return false;
    };
    origin.host().is_some()
        && origin.host() == host.host()
        && origin.port_or_known_default() == host.port_or_known_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn same_host_origins_and_no_origin_pass_by_default() {
        let ok = |o: &str, h: &str| check_origin(&[], &headers(&[("origin", o), ("host", h)]));
        assert!(check_origin(&[], &headers(&[("host", "x:1")])).is_ok());
        assert!(ok("http://localhost:8089", "localhost:8089").is_ok());
        assert!(ok("http://LOCALHOST:8089", "localhost:8089").is_ok());
        assert!(ok("https://example.com", "example.com").is_ok());
        assert!(ok("https://example.com", "example.com:443").is_ok());
        assert!(ok("http://[::1]:8089", "[::1]:8089").is_ok());
        assert!(ok("http://localhost:8089", "localhost:8090").is_err());
        assert!(ok("http://evil.example", "localhost:8089").is_err());
        assert!(ok("null", "localhost:8089").is_err());
        assert!(ok("http://localhost:8089", "").is_err());
        assert!(ok("http://a.com", "a.com@b.com").is_err());
    }

    #[test]
    fn listed_origins_are_exact() {
        let allowed = vec!["http://app.example:3000".to_owned()];
        let h = |o: &str| headers(&[("origin", o), ("host", "api.example")]);
        assert!(check_origin(&allowed, &h("http://app.example:3000")).is_ok());
        assert!(check_origin(&allowed, &h("http://app.example")).is_err());
        assert!(check_origin(&allowed, &headers(&[("host", "api.example")])).is_ok());
    }

    #[test]
    fn hosts_are_checked_against_rebinding() {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 8089));
        let anywhere = SocketAddr::from(([0, 0, 0, 0], 8089));
        let check = |allowed: &[&str], local, host: &str| {
            let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
            check_host(&allowed, local, &headers(&[("host", host)]))
        };
        // Bound to loopback: loopback names and IP addresses only.
        for ok in [
            "localhost:8089",
            "LOCALHOST",
            "app.localhost:8089",
            "127.0.0.1:8089",
            "[::1]:8089",
            "10.1.2.3",
        ] {
            assert!(check(&[], loopback, ok).is_ok(), "{ok}");
        }
        for bad in [
            "rebind.example:18089",
            "localhost.example.com",
            "evillocalhost",
            "a@localhost",
            "",
        ] {
            let e = check(&[], loopback, bad).unwrap_err();
            assert!(e.starts_with("host not allowed"), "{e}");
        }
        assert!(check_host(&[], loopback, &headers(&[])).is_ok());
        // Bound elsewhere with nothing listed: any host.
        assert!(check(&[], anywhere, "rebind.example:18089").is_ok());
        // Listed hosts, names and domains.
        let listed = [
            "voice.example.com",
            ".example.org",
            "192.0.2.7",
            "[2001:db8::7]",
        ];
        for ok in [
            "voice.example.com:443",
            "VOICE.example.com",
            "example.org",
            "a.b.example.org",
            "192.0.2.7:8089",
            "[2001:db8::7]:1",
        ] {
            assert!(check(&listed, anywhere, ok).is_ok(), "{ok}");
            assert!(check(&listed, loopback, ok).is_ok(), "{ok}");
        }
        for bad in ["example.com", "badexample.org", "localhost", "192.0.2.8"] {
            assert!(check(&listed, loopback, bad).is_err(), "{bad}");
        }
        assert!(check(&["*"], loopback, "rebind.example").is_ok());
        // Entries are checked.
        for good in [
            "*",
            "voice.example.com",
            ".example.com",
            "192.0.2.7",
            "[::1]",
        ] {
            assert!(check_allowed_host(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "http://a.com",
            "a.com:80",
            "a.com/x",
            ".192.0.2.7",
            "*.example.com",
        ] {
            let e = check_allowed_host(bad).unwrap_err();
            assert!(e.contains("is not a host"), "{e}");
        }
    }

    #[test]
    fn bearer_tokens() {
        let t = |v: &str| {
            bearer_token(&headers(&[("authorization", v)])).map(|s| s.expose().to_owned())
        };
        assert_eq!(t("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(t("bearer  abc ").as_deref(), Some("abc"));
        assert_eq!(t("Basic abc"), None);
        assert_eq!(t("Bearer "), None);
    }

    #[test]
    fn config_is_checked() {
        assert!(ServerConfig::default().validate().is_ok());
        for bad in [
            ServerConfig {
                max_frame_bytes: 10,
                ..ServerConfig::default()
            },
            ServerConfig {
                messages_per_second: f64::NAN,
                ..ServerConfig::default()
            },
            ServerConfig {
                connections_per_second_per_ip: 0.0,
                ..ServerConfig::default()
            },
            ServerConfig {
                max_connections_per_ip: 0,
                ..ServerConfig::default()
            },
            ServerConfig {
                workers: workers::MAX_WORKERS + 1,
                ..ServerConfig::default()
            },
            ServerConfig {
                max_audio_ahead: Duration::from_millis(99),
                ..ServerConfig::default()
            },
        ] {
            assert_eq!(bad.validate().unwrap_err().code, ErrorCode::InvalidConfig);
        }
        for origin in [
            "*",
            "app.example.com",
            "https://app.example.com:443",
            "https://app.example.com/page",
            "ftp://files.example.com",
        ] {
            let bad = ServerConfig {
                allowed_origins: vec![origin.into()],
                ..ServerConfig::default()
            };
            let e = bad.validate().unwrap_err();
            assert!(e.message.contains(origin), "{e}");
        }
        let e = ServerConfig {
            allowed_origins: vec!["https://app.example.com:443".into()],
            ..ServerConfig::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.message.contains("\"https://app.example.com\""), "{e}");
        for good in [
            "https://app.example.com",
            "http://localhost:8089/",
            "HTTPS://App.Example.com",
        ] {
            let config = ServerConfig {
                allowed_origins: vec![good.into()],
                ..ServerConfig::default()
            };
            assert!(config.validate().is_ok(), "{good}");
        }
        for workers in [0, 1, workers::MAX_WORKERS] {
            let config = ServerConfig {
                workers,
                ..ServerConfig::default()
            };
            assert!(config.validate().is_ok(), "{workers} workers");
        }
        let just_enough = ServerConfig {
            max_audio_ahead: MIN_AUDIO_AHEAD,
            ..ServerConfig::default()
        };
        assert!(just_enough.validate().is_ok());
        let too_many = ServerConfig {
            workers: 5000,
            ..ServerConfig::default()
        };
        let e = too_many.validate().unwrap_err();
        assert!(
            e.message.contains("workers must be at most 1024, got 5000"),
            "{e}"
        );
        assert_eq!(burst_of(200.0), 400);
        assert_eq!(burst_of(0.1), 1);
    }
}
