//! Inbound callbacks: an HTTP endpoint, owned by the backend, through which a
//! provider's service calls one session's handler.
//!
//! Some services call the application rather than being called by it: one
//! posts the user's text to a URL and expects the reply, another calls an
//! OpenAI-compatible `POST …/chat/completions` and reads the reply streamed
//! as Server-Sent Events. A provider for such a service binds one
//! [`CallbackServer`] (lazily, when its first session needs it, or
//! explicitly), [`registers`](CallbackServer::register) a handler for each
//! session, and gives the service the route's [`url`](CallbackRoute::url)
//! and [`secret`](CallbackRoute::secret). Nothing here knows any provider's
//! protocol: a handler gets the request ([`CallbackRequest`]: method, the
//! path after the route, query, headers and JSON body) and answers JSON or a
//! stream of events ([`CallbackResponse`]).
//!
//! # Routes and secrets
//!
//! A route's URL is `{base_url}/callbacks/{route_id}` (the service may add
//! a path after it, e.g. `/chat/completions`, which the handler sees as
//! [`CallbackRequest::path`]). The route id is 128 random bits, not the
//! session id, and every route has its own secret of 256 random bits, both
//! from the operating system's CSPRNG and written in hex. The service must
//! present the secret as `Authorization: Bearer <secret>`; for a service
//! that cannot set headers, `?token=<secret>` is accepted too (a request is
//! let in when either matches). The query form puts the secret in the URL,
//! where proxies' access logs, tracing of the calling service and browser
//! history may keep it: prefer the header, and use
//! [`CallbackRoute::url_with_token`] only for services that need it. The
//! comparison takes the same time whatever the presented value, and the
//! secret is a [`Secret`]: redacted in `Debug` and `Display`, never logged.
//! The `Authorization` header and `token` parameters are not handed to the
//! handler.
//!
//! Dropping the [`CallbackRoute`] unregisters it: a session that holds its
//! route takes it along when it ends. Dropping the [`CallbackServer`] (or
//! [`CallbackServer::shutdown`]) closes the listener.
//!
//! # Answers
//!
//! Errors are JSON, `{"error":{"code":"...","message":"..."}}`:
//!
//! | status | code | when |
//! |---|---|---|
//! | 404 | `not_found` | no route has the id (never registered, or dropped), or the path is not under `/callbacks/`; the same answer whatever the credentials |
//! | 401 | `authentication_failed` | the route exists but no presented secret matches it (missing or wrong: the same answer) |
//! | 413 | `payload_too_large` | the body is larger than [`CallbackConfig::max_body_bytes`] (1 MiB by default) |
//! | 400 | `invalid_json` | the body is not JSON; the message says where the syntax broke |
//! | 400 | `invalid_request` | the body could not be read |
//! | 502 | the handler's [`ErrorCode`] | the handler returned a [`BackendError`]; its message is passed on |
//! | 500 | `internal_error` | the handler panicked (the server goes on serving) |
//!
//! An unknown route answers 404 even without credentials, while a known
//! route with bad credentials answers 401: the difference only tells a
//! caller whether a route id it already holds is live, and route ids are as
//! unguessable as secrets. To the service, a 404 means its session's route
//! is gone (the session ended).
//!
//! An empty body is handed over as JSON `null`; the `Content-Type` is not
//! checked. The secret is checked before the body is read, so an
//! unauthenticated caller cannot make the server buffer a body.
//!
//! # Example
//!
//! ```no_run
//! use voice_backends::runtime::callbacks::{CallbackRequest, CallbackResponse, CallbackServer};
//!
//! # async fn demo() -> voice_backends::Result<()> {
//! let server = CallbackServer::bind("127.0.0.1:0".parse().unwrap()).await?;
//! let route = server.register("sess_1", |request: CallbackRequest| async move {
//!     if request.path == "/chat/completions" {
//!         // Stream the reply as it is produced.
//!         let (tx, rx) = tokio::sync::mpsc::channel(16);
//!         tokio::spawn(async move {
//!             let _ = tx.send(r#"{"choices":[{"delta":{"content":"Hi"}}]}"#.into()).await;
//!             let _ = tx.send("[DONE]".into()).await;
//!         });
//!         Ok(CallbackResponse::sse_channel(rx))
//!     } else {
//!         Ok(CallbackResponse::json(serde_json::json!({ "text": "Hi" })))
//!     }
//! })?;
//! // Configure the service with these two; the route lives as long as `route`.
//! let (url, secret) = (route.url().clone(), route.secret().clone());
//! # drop((url, secret));
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, doc(cfg(feature = "callbacks")))]

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use url::Url;

use crate::config::Secret;

use crate::error::{BackendError, ErrorCode, Result};
use crate::session::SessionId;
/// The `http` types of requests and answers, re-exported.
mod serve;

use serve::*;

pub use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};

/// The largest request body accepted by default: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// The path segment under which every route lives: `/callbacks/{route_id}`.
const PREFIX: &str = "/callbacks/";
/// Random bytes in a route id (128 bits).
const ROUTE_ID_BYTES: usize = 16;
/// Random bytes in a route's secret (256 bits).
const SECRET_BYTES: usize = 32;
/// The query parameter that may carry the secret.
const TOKEN_PARAM: &str = "token";
/// How long accepting pauses after it failed for want of resources.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// How a [`CallbackServer`] listens and what it accepts.
#[derive(Clone, Debug)]
pub struct CallbackConfig {
    /// The address to listen on; default `127.0.0.1:0` (loopback, a free
    /// port). Listen on another address only when the service must reach
    /// the server from elsewhere, ideally behind a TLS-terminating proxy.
    pub addr: SocketAddr,
    /// The URL the service reaches the server by (e.g. a proxy or tunnel in
    /// front of it, `https://voice.example.com`), used for
    /// [`CallbackServer::base_url`] and every route's URL; default `None`:
    /// `http://{local_addr}`. A path in it is kept in the routes' URLs, and
    /// whatever is in front must strip it: the server itself serves
    /// `/callbacks/…` at its root. It must be `http` or `https`, without
    /// user name, password, query or fragment.
    pub public_url: Option<Url>,
    /// The largest request body accepted, in bytes; larger ones are refused
    /// with 413. Default [`DEFAULT_MAX_BODY_BYTES`] (1 MiB).
    pub max_body_bytes: usize,
    /// How long a connection may take to send a request's headers, and stay
    /// idle between requests; default 30 s.
    pub header_timeout: Duration,
    /// How long the requests in flight (and event streams) may go on after
    /// the server is shut down, before their connections are cut; default 5 s.
    pub shutdown_grace: Duration,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        CallbackConfig {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            public_url: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            header_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// A request of the service to one route, as its handler gets it.
#[derive(Debug)]
#[non_exhaustive]
pub struct CallbackRequest {
    /// The session the route was registered for.
    pub session_id: SessionId,
    /// The request's method.
    pub method: Method,
    /// The path after the route's URL, as sent (not percent-decoded),
    /// starting with `/`: `/chat/completions`, or `/` for the route's URL
    /// itself.
    pub path: String,
    /// The query parameters, decoded, in order, without `token`.
    pub query: Vec<(String, String)>,
    /// The request's headers, without `Authorization`.
    pub headers: HeaderMap,
    /// The body, parsed as JSON; `null` when it is empty.
    pub body: serde_json::Value,
}

impl CallbackRequest {
    /// A request with no query and no headers, e.g. to test a handler.
    pub fn new(
        session_id: impl Into<SessionId>,
        method: Method,
        path: impl Into<String>,
        body: serde_json::Value,
    ) -> Self {
        CallbackRequest {
            session_id: session_id.into(),
            method,
            path: path.into(),
            query: Vec::new(),
            headers: HeaderMap::new(),
            body,
        }
    }
}

/// A handler's answer: JSON, or a stream of Server-Sent Events.
pub struct CallbackResponse {
    kind: Kind,
}

enum Kind {
    Json {
        status: StatusCode,
        body: serde_json::Value,
    },
    Events(BoxStream<'static, String>),
}

impl fmt::Debug for CallbackResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Json { status, body } => f
                .debug_struct("CallbackResponse::Json")
                .field("status", status)
                .field("body", body)
                .finish(),
            Kind::Events(_) => f.write_str("CallbackResponse::Events(..)"),
        }
    }
}

impl CallbackResponse {
    /// `body` as JSON, with status 200.
    pub fn json(body: serde_json::Value) -> Self {
        Self::json_with_status(StatusCode::OK, body)
    }

    /// `body` as JSON, with `status`. A 204 or 304 is sent without a body;
    /// an informational (1xx) status is not an answer and gives a 500.
    pub fn json_with_status(status: StatusCode, body: serde_json::Value) -> Self {
        CallbackResponse {
            kind: Kind::Json { status, body },
        }
    }

    /// A `text/event-stream` answer (status 200) with one event per item of
    /// `events`, sent as soon as it is produced: the item is the event's
    /// data (`data: <item>`, one `data:` line per line of it). The answer
    /// ends when the stream does. Should the stream panic, the connection is
    /// cut without the end of the answer, so the service sees it broken
    /// rather than complete.
    pub fn sse<S>(events: S) -> Self
    where
        S: Stream<Item = String> + Send + 'static,
    {
        CallbackResponse {
            kind: Kind::Events(events.boxed()),
        }
    }

    /// Like [`CallbackResponse::sse`], the events being what the handler
    /// (or a task it started) sends into the channel; the answer ends when
    /// every sender is dropped.
    pub fn sse_channel(events: mpsc::Receiver<String>) -> Self {
        Self::sse(futures_util::stream::unfold(events, |mut rx| async move {
            rx.recv().await.map(|event| (event, rx))
        }))
    }

    /// The status the answer starts with.
    pub fn status(&self) -> StatusCode {
        match &self.kind {
            Kind::Json { status, .. } => *status,
            Kind::Events(_) => StatusCode::OK,
        }
    }

    /// The JSON body, unless the answer is a stream of events.
    pub fn json_body(&self) -> Option<&serde_json::Value> {
        match &self.kind {
            Kind::Json { body, .. } => Some(body),
            Kind::Events(_) => None,
        }
    }
}

/// A route's handler, as the server keeps it.
pub type CallbackHandler =
    Arc<dyn Fn(CallbackRequest) -> BoxFuture<'static, Result<CallbackResponse>> + Send + Sync>;

/// A registered route.
struct Entry {
    session_id: SessionId,
    secret: Secret,
    handler: CallbackHandler,
}

/// What the server and its connections share.
struct Shared {
    routes: RwLock<HashMap<String, Arc<Entry>>>,
    max_body_bytes: usize,
}

impl Shared {
    fn route(&self, id: &str) -> Option<Arc<Entry>> {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }
}

/// An HTTP/1 server through which services call sessions' handlers.
///
/// Bound with [`CallbackServer::bind`] or [`CallbackServer::bind_with`];
/// it serves on tasks of the Tokio runtime it was bound in until it is
/// dropped or [shut down](CallbackServer::shutdown). Share it between
/// sessions (e.g. in an `Arc`, or a `tokio::sync::OnceCell` to bind it when
/// the first session needs it).
pub struct CallbackServer {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    base_url: Url,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for CallbackServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let routes = self
            .shared
            .routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("CallbackServer")
            .field("local_addr", &self.local_addr)
            .field("base_url", &self.base_url.as_str())
            .field("routes", &routes)
            .finish_non_exhaustive()
    }
}

impl CallbackServer {
    /// Binds a server on `addr` (port 0 picks a free port), with the
    /// defaults of [`CallbackConfig`] otherwise.
    pub async fn bind(addr: SocketAddr) -> Result<CallbackServer> {
        Self::bind_with(CallbackConfig {
            addr,
            ..CallbackConfig::default()
        })
        .await
    }

    /// Binds a server as `config` says.
    pub async fn bind_with(config: CallbackConfig) -> Result<CallbackServer> {
        const OP: &str = "callbacks.bind";
        let public = config
            .public_url
            .as_ref()
            .map(|url| check_public_url(url).map_err(|e| e.with_op(OP)))
            .transpose()?;
        let listener = TcpListener::bind(config.addr).await.map_err(|e| {
            BackendError::new(
                OP,
                ErrorCode::ConnectionFailed,
                format!("could not listen on {}: {e}", config.addr),
            )
            .with_source(e)
        })?;
        let local_addr = listener.local_addr().map_err(|e| {
            BackendError::new(
                OP,
                ErrorCode::ConnectionFailed,
                format!("the listener has no local address: {e}"),
            )
            .with_source(e)
        })?;
        let base_url = match public {
            Some(url) => url,
            None => Url::parse(&format!("http://{local_addr}")).map_err(|e| {
                BackendError::new(
                    OP,
                    ErrorCode::InvalidConfig,
                    format!("no URL for {local_addr}: {e}"),
                )
            })?,
        };
        let shared = Arc::new(Shared {
            routes: RwLock::new(HashMap::new()),
            max_body_bytes: config.max_body_bytes,
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept(
            listener,
            shared.clone(),
            stopped,
            config.header_timeout,
            config.shutdown_grace,
        ));
        tracing::debug!(%local_addr, "callback server listening");
        Ok(CallbackServer {
            shared,
            local_addr,
            base_url,
            stop,
            task: Some(task),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The URL the routes' URLs start with: [`CallbackConfig::public_url`],
    /// or `http://{local_addr}`.
    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// How many routes are registered.
    pub fn route_count(&self) -> usize {
        self.shared
            .routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Registers `handler` for the session `session_id` under a new route,
    /// with a new secret. The route answers until the returned
    /// [`CallbackRoute`] is dropped. A session may hold several routes.
    ///
    /// Fails only when the operating system gives no random bytes.
    pub fn register<F, Fut>(
        &self,
        session_id: impl Into<SessionId>,
        handler: F,
    ) -> Result<CallbackRoute>
    where
        F: Fn(CallbackRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<CallbackResponse>> + Send + 'static,
    {
        let handler: CallbackHandler = Arc::new(move |request| handler(request).boxed());
        self.register_boxed(session_id.into(), handler)
    }

    /// [`CallbackServer::register`] with a handler already boxed.
    pub fn register_boxed(
        &self,
        session_id: SessionId,
        handler: CallbackHandler,
    ) -> Result<CallbackRoute> {
        const OP: &str = "callbacks.register";
        let secret = Secret::new(random_hex(SECRET_BYTES).map_err(|e| e.with_op(OP))?);
        let entry = Arc::new(Entry {
            session_id: session_id.clone(),
            secret: secret.clone(),
            handler,
        });
        let id = loop {
            let id = random_hex(ROUTE_ID_BYTES).map_err(|e| e.with_op(OP))?;
            let mut routes = self
                .shared
                .routes
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if let std::collections::hash_map::Entry::Vacant(place) = routes.entry(id.clone()) {
                place.insert(entry);
                break id;
            }
        };
        let url = route_url(&self.base_url, &id).map_err(|e| e.with_op(OP))?;
        Ok(CallbackRoute {
            id,
            url,
            secret,
            session_id,
            routes: Arc::downgrade(&self.shared),
        })
    }

    /// Registers `handler` under a route id and secret the caller chooses,
    /// for a service whose callback URL is configured once rather than
    /// handed over per session (e.g. one URL in the service's own
    /// configuration, the handler telling sessions apart by the request).
    /// The route answers until the returned [`CallbackRoute`] is dropped.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` when `route_id` is not 1 to 64 letters, digits, `-`
    /// or `_`, when `secret` is shorter than 16 characters, or when a
    /// route with that id is registered already.
    pub fn register_named(
        &self,
        route_id: &str,
        secret: Secret,
        session_id: impl Into<SessionId>,
        handler: CallbackHandler,
    ) -> Result<CallbackRoute> {
        const OP: &str = "callbacks.register";
        if route_id.is_empty()
            || route_id.len() > 64
            || !route_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(BackendError::invalid_config(
                OP,
                format!("route id {route_id:?} must be 1 to 64 letters, digits, - or _"),
            ));
        }
        if secret.expose().chars().count() < 16 {
            return Err(BackendError::invalid_config(
                OP,
                "a route's secret must be at least 16 characters",
            ));
        }
        let session_id = session_id.into();
        let entry = Arc::new(Entry {
            session_id: session_id.clone(),
            secret: secret.clone(),
            handler,
        });
        {
            let mut routes = self
                .shared
                .routes
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            match routes.entry(route_id.to_owned()) {
                std::collections::hash_map::Entry::Vacant(place) => {
                    place.insert(entry);
                }
                std::collections::hash_map::Entry::Occupied(_) => {
                    return Err(BackendError::invalid_config(
                        OP,
                        format!("route id {route_id:?} is registered already"),
                    ));
                }
            }
        }
        let url = match route_url(&self.base_url, route_id) {
            Ok(url) => url,
            Err(e) => {
                self.shared
                    .routes
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(route_id);
                return Err(e.with_op(OP));
            }
        };
        Ok(CallbackRoute {
            id: route_id.to_owned(),
            url,
            secret,
            session_id,
            routes: Arc::downgrade(&self.shared),
        })
    }

    /// Stops accepting connections and waits until the listener is closed
    /// and the requests in flight have finished (up to
    /// [`CallbackConfig::shutdown_grace`], after which their connections
    /// are cut). Dropping the server does the same without waiting.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for CallbackServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A session's route on a [`CallbackServer`]; dropping it unregisters the
/// route (its URL answers 404 from then on).
///
/// `Debug` shows the URL and session, never the secret.
pub struct CallbackRoute {
    id: String,
    url: Url,
    secret: Secret,
    session_id: SessionId,
    routes: Weak<Shared>,
}

impl fmt::Debug for CallbackRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallbackRoute")
            .field("url", &self.url.as_str())
            .field("session_id", &self.session_id)
            .field("secret", &self.secret)
            .finish()
    }
}

impl CallbackRoute {
    /// The route's URL, `{base_url}/callbacks/{route_id}`; the service may
    /// append a path to it.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The secret the service must present, as `Authorization: Bearer
    /// <secret>` (or `?token=<secret>`).
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// The URL with `?token=<secret>`, for a service that cannot set
    /// headers. It holds the secret, so it is a [`Secret`] too; mind that
    /// URLs end up in access logs (see the [module docs](self)).
    pub fn url_with_token(&self) -> Secret {
        let mut url = self.url.clone();
        url.query_pairs_mut()
            .append_pair(TOKEN_PARAM, self.secret.expose());
        Secret::new(String::from(url))
    }

    /// The session the route was registered for.
    pub fn session_id(&self) -> &SessionId {
        &self.session_id
    }
}

impl Drop for CallbackRoute {
    fn drop(&mut self) {
        if let Some(shared) = self.routes.upgrade() {
            shared
                .routes
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn named_routes_are_checked_and_unique_while_registered() {
        let server = CallbackServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let handler: CallbackHandler =
            Arc::new(|_| async { Ok(CallbackResponse::json(serde_json::Value::Null)) }.boxed());
        let secret = Secret::new("0123456789abcdef");
        let route = server
            .register_named("vocode", secret.clone(), "s", handler.clone())
            .unwrap();
        assert_eq!(route.url().path(), "/callbacks/vocode");
        let taken = server
            .register_named("vocode", secret.clone(), "s", handler.clone())
            .unwrap_err();
        assert_eq!(taken.code, ErrorCode::InvalidConfig);
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            assert!(
                server
                    .register_named(bad, secret.clone(), "s", handler.clone())
                    .is_err(),
                "{bad:?}"
            );
        }
        let short = server
            .register_named("other", Secret::new("short"), "s", handler.clone())
            .unwrap_err();
        assert!(!short.to_string().contains("short\""), "{short}");
        drop(route);
        assert_eq!(server.route_count(), 0);
        server
            .register_named("vocode", secret, "s", handler)
            .expect("free again once dropped");
    }

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        let secret = Secret::new("0123456789abcdef");
        assert!(secret_matches(b"0123456789abcdef", &secret));
        assert!(!secret_matches(b"0123456789abcdeF", &secret));
        assert!(!secret_matches(b"0123456789abcde", &secret));
        assert!(!secret_matches(b"0123456789abcdef0", &secret));
        assert!(!secret_matches(b"", &secret));
    }

    #[test]
    fn ids_and_secrets_are_long_random_hex() {
        let a = random_hex(SECRET_BYTES).unwrap();
        let b = random_hex(SECRET_BYTES).unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_eq!(random_hex(ROUTE_ID_BYTES).unwrap().len(), 32);
        assert_eq!(hex(&[0x00, 0x9f, 0xff]), "009fff");
    }

    #[test]
    fn paths_split_into_route_and_rest() {
        assert_eq!(split_path("/callbacks/abc"), Some(("abc", "/")));
        assert_eq!(split_path("/callbacks/abc/"), Some(("abc", "/")));
        assert_eq!(
            split_path("/callbacks/abc/chat/completions"),
            Some(("abc", "/chat/completions"))
        );
        assert_eq!(split_path("/callbacks/"), None);
        assert_eq!(split_path("/callbacks//x"), None);
        assert_eq!(split_path("/other/abc"), None);
        assert_eq!(split_path("/"), None);
    }

    #[test]
    fn bearer_tokens_are_read_whatever_the_scheme_case() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer"), None);
        assert_eq!(bearer_token(b""), None);
    }

    #[test]
    fn events_have_a_data_line_per_line() {
        assert_eq!(event("x"), "data: x\n\n");
        assert_eq!(event("a\nb\r\nc"), "data: a\ndata: b\ndata: c\n\n");
        assert_eq!(event(""), "data: \n\n");
    }

    #[test]
    fn public_urls_are_checked() {
        for bad in [
            "ftp://host",
            "https://user:pw@host",
            "https://host/?a=1",
            "https://host/#x",
        ] {
            assert!(
                check_public_url(&Url::parse(bad).unwrap()).is_err(),
                "{bad}"
            );
        }
        let base = Url::parse("https://voice.example.com/vb/").unwrap();
        assert!(check_public_url(&base).is_ok());
        assert_eq!(
            route_url(&base, "ab12").unwrap().as_str(),
            "https://voice.example.com/vb/callbacks/ab12"
        );
    }
}
