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
//!    (`sample_rate` one of the usual rates, 8000 to 48000; an optional
//!    `encoding`, `pcm_s16le` by default, or G.711 `mulaw` or `alaw` as
//!    telephone gateways send it, applies both ways). The token may
//!    instead come in the upgrade request's `Authorization: Bearer <token>`
//!    header; the start message's token wins, unless it is empty. It is given to the backend's auth hook.
//!    An optional `metadata` object is kept with the session. Instead of
//!    `start`, `{"type":"resume","session_id":"...","resume_token":"...","sample_rate":16000}`
//!    takes up a session with the token its `ready` gave: one whose client
//!    went away without a close less than
//!    [`resume_window`](ServerConfig::resume_window) ago (30 s by default;
//!    the session ran on meanwhile), or one kept in the backend's session
//!    store (after a restart, or on another instance sharing it). A resume
//!    is refused (1008) while another connection holds the session (the
//!    server may not have noticed the old connection's end yet: try again),
//!    and once the window has ended.
//! 2. The server answers
//!    `{"type":"ready","session_id":"...","sample_rate":16000,"encoding":"pcm_s16le","channels":1}`,
//!    with the session's `resume_token` when it is kept in a store, and
//!    `"resumed":true` after a `resume`.
//! 3. The client streams binary messages of mono audio in its `encoding`
//!    at its `sample_rate` (any whole number of samples), may send
//!    `{"type":"text","text":"..."}` in place of speech, and ends with
//!    `{"type":"stop"}` (the turn in flight finishes, then close 1000).
//! 4. The server sends every [`SessionEvent`](crate::pipeline::events::SessionEvent)
//!    as JSON text (`{"type":"state",...}`, `speech_started`, `turn_ended`,
//!    `user_transcript`, `agent_text`, `interrupted`, `latency`, `error`,
//!    `connection`, `closed`) and the reply audio as binary messages, mono in the
//!    client's `encoding` at its `sample_rate`.
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

mod checks;
mod config;
mod connection;
mod detached;
mod frames;
mod http;
mod metrics;
pub(crate) mod protocol;
mod workers;

pub use config::ServerConfig;
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
use crate::error::{BackendError, ErrorCode, Result};
use crate::hooks::TokenBucketLimiter;
use crate::session::VoiceSession;

use checks::{bearer_token, check_host, check_origin};
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

/// How long the server waits for connections to finish their close
/// handshakes, and for HTTP requests in flight, once shutting down.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

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
    /// Sessions in their resume window.
    detached: detached::Detached,
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
                detached: detached::Detached::default(),
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
        // Sessions in their resume window wait no more: the backend's stop
        // ends them with the others, and what is left is stopped below.
        let detached = shared.detached.close(&shared.metrics);
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
        stop_detached(detached).await;
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

/// Stops the sessions that were in their resume window when shutdown began
/// (those the backend's stop has not ended already), within [`CLOSE_GRACE`].
async fn stop_detached(sessions: Vec<Arc<dyn VoiceSession>>) {
    if sessions.is_empty() {
        return;
    }
    let stopping = futures_util::future::join_all(sessions.iter().map(|s| s.stop()));
    match tokio::time::timeout(CLOSE_GRACE, stopping).await {
        Ok(results) => {
            for (session, result) in sessions.iter().zip(results) {
                if let Err(e) = result {
                    tracing::warn!(session_id = %session.id(), code = %e.code, "stopping a detached session: {}", e.message);
                }
            }
        }
        Err(_) => tracing::warn!(
            detached = sessions.len(),
            "sessions in their resume window did not stop within {CLOSE_GRACE:?}"
        ),
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
