//! Serving the callback routes: accepting connections, HTTP/1 with a header
//! timeout, finding the route, checking its secret, reading the body,
//! calling the handler and writing its answer (JSON or Server-Sent Events).

use std::convert::Infallible;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Response, header};
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, Stream, StreamExt};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;
use url::Url;

use crate::config::Secret;

/// The `http` types of requests and answers, re-exported.
use super::*;
use crate::error::{BackendError, ErrorCode, Result};

/// `n` bytes from the operating system's CSPRNG, in lower-case hex.
pub(super) fn random_hex(n: usize) -> Result<String> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).map_err(|e| {
        BackendError::new(
            "callbacks.random",
            ErrorCode::PipelineError,
            format!("the operating system gave no random bytes: {e}"),
        )
    })?;
    Ok(hex(&bytes))
}

pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Whether `presented` is `secret`, in a time that does not depend on where
/// they differ.
pub(super) fn secret_matches(presented: &[u8], secret: &Secret) -> bool {
    presented.ct_eq(secret.expose().as_bytes()).into()
}

pub(super) fn check_public_url(url: &Url) -> Result<Url> {
    let refuse = |why: &str| {
        Err(BackendError::new(
            "callbacks.bind",
            ErrorCode::InvalidConfig,
            format!("public_url {why}"),
        ))
    };
    if !matches!(url.scheme(), "http" | "https") {
        return refuse("must be an http or https URL");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return refuse("must not hold a user name or password");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return refuse("must not have a query or fragment");
    }
    if url.cannot_be_a_base() || url.host().is_none() {
        return refuse("must name a host");
    }
    Ok(url.clone())
}

pub(super) fn route_url(base: &Url, id: &str) -> Result<Url> {
    let text = format!("{}{PREFIX}{id}", base.as_str().trim_end_matches('/'));
    Url::parse(&text).map_err(|e| {
        BackendError::new(
            "callbacks.register",
            ErrorCode::InvalidConfig,
            format!("no route URL under the base URL: {e}"),
        )
    })
}

/// Accepts connections until `stop` turns `true` (or its sender is gone),
/// then lets the connections finish their requests for up to `grace`.
pub(super) async fn accept(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    header_timeout: Duration,
    grace: Duration,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    connections.spawn(serve_connection(
                        shared.clone(),
                        tcp,
                        stop.clone(),
                        header_timeout,
                    ));
                }
                Err(e) if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) => {}
                Err(e) => {
                    tracing::warn!("callback server: accepting failed: {e}; pausing {ACCEPT_PAUSE:?}");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                }
            },
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    // Dropping the set cuts the connections still open.
}

/// Resolves once `stop` turns `true` or its sender is gone.
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Serves HTTP/1 on one connection until it closes or `stop` turns `true`
/// (then the request in flight is answered and it closes).
pub(super) async fn serve_connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    mut stop: watch::Receiver<bool>,
    header_timeout: Duration,
) {
    let _ = tcp.set_nodelay(true);
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, request).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        () = stopped(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!("callback server: a connection ended: {e}");
    }
}

/// Answers one request, in a `callbacks.request` span.
pub(super) async fn handle(
    shared: Arc<Shared>,
    request: hyper::Request<Incoming>,
) -> Response<Body> {
    let span = tracing::info_span!(
        "callbacks.request",
        method = %request.method(),
        session_id = tracing::field::Empty,
        path = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    async move {
        let response = answer(&shared, request).await;
        let status = response.status();
        tracing::Span::current().record("status", status.as_u16());
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), "callback request failed");
        } else {
            tracing::debug!(status = status.as_u16(), "callback request answered");
        }
        response
    }
    .instrument(span)
    .await
}

pub(super) async fn answer(shared: &Shared, request: hyper::Request<Incoming>) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let Some((route_id, path)) = split_path(parts.uri.path()) else {
        return not_found();
    };
    let Some(entry) = shared.route(route_id) else {
        return not_found();
    };
    let span = tracing::Span::current();
    span.record("session_id", entry.session_id.as_str());
    span.record("path", path);
    let path = path.to_owned();

    let mut tokens = Vec::new();
    let mut query = Vec::new();
    for (key, value) in url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes()) {
        if key == TOKEN_PARAM {
            tokens.push(value);
        } else {
            query.push((key.into_owned(), value.into_owned()));
        }
    }
    let bearer = parts
        .headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| bearer_token(v.as_bytes()))
        .collect::<Vec<_>>();
    // Every presented value is compared: none is skipped on an early match.
    let authorized = bearer
        .iter()
        .map(|b| secret_matches(b, &entry.secret))
        .chain(
            tokens
                .iter()
                .map(|t| secret_matches(t.as_bytes(), &entry.secret)),
        )
        .fold(false, |any, ok| any | ok);
    if !authorized {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            ErrorCode::AuthenticationFailed.as_str(),
            "missing or wrong credentials: send the route's secret as `Authorization: Bearer <secret>` (or `?token=<secret>`)",
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    parts.headers.remove(header::AUTHORIZATION);

    let limit = shared.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large(limit);
    }
    let bytes = match read_body(Body::new(body), limit).await {
        Ok(bytes) => bytes,
        Err(BodyError::TooLarge) => return too_large(limit),
        Err(BodyError::Read(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("the request body could not be read: {e}"),
            );
        }
    };
    let body = if bytes.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Null
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(body) => body,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    &format!("the request body is not valid JSON: {e}"),
                );
            }
        }
    };

    let request = CallbackRequest {
        session_id: entry.session_id.clone(),
        method: parts.method,
        path,
        query,
        headers: parts.headers,
        body,
    };
    match call(&entry.handler, request).await {
        Some(Ok(response)) => into_http(response),
        Some(Err(e)) => {
            tracing::warn!(code = %e.code, "the callback handler failed: {}", e.message);
            error(StatusCode::BAD_GATEWAY, e.code.as_str(), &e.message)
        }
        None => {
            tracing::error!("the callback handler panicked");
            internal_error()
        }
    }
}

/// Runs the handler; `None` if it panicked (when called or while running).
pub(super) async fn call(
    handler: &CallbackHandler,
    request: CallbackRequest,
) -> Option<Result<CallbackResponse>> {
    let future = std::panic::catch_unwind(AssertUnwindSafe(|| handler(request))).ok()?;
    AssertUnwindSafe(future).catch_unwind().await.ok()
}

/// The route id and the path after it, if `path` is under `/callbacks/`.
pub(super) fn split_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix(PREFIX)?;
    let (id, after) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, "/"),
    };
    (!id.is_empty()).then_some((id, after))
}

/// The token of an `Authorization: Bearer <token>` value (the scheme in any
/// case).
pub(super) fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if value.len() < SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    Some(value[SCHEME.len()..].trim_ascii())
}

pub(super) enum BodyError {
    TooLarge,
    Read(axum::Error),
}

/// The whole body, refused as soon as it grows past `limit`.
pub(super) async fn read_body(body: Body, limit: usize) -> std::result::Result<Vec<u8>, BodyError> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(BodyError::Read)?;
        if bytes.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

pub(super) fn into_http(response: CallbackResponse) -> Response<Body> {
    match response.kind {
        Kind::Json { status, .. } if status.is_informational() => {
            tracing::error!(
                status = status.as_u16(),
                "the callback handler answered an informational status"
            );
            internal_error()
        }
        Kind::Json { status, .. }
            if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED =>
        {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = status;
            response
        }
        Kind::Json { status, body } => json(status, &body),
        Kind::Events(events) => {
            let mut response = Response::new(Body::from_stream(Events {
                inner: Some(events),
            }));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            // Asks proxies in front (nginx) not to hold events back.
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
            response
        }
    }
}

/// A handler's events as `text/event-stream` bytes; a panic of the stream
/// ends it with an error, which cuts the connection.
pub(super) struct Events {
    inner: Option<BoxStream<'static, String>>,
}

impl Stream for Events {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll_next_unpin(cx))) {
            Ok(Poll::Ready(Some(data))) => Poll::Ready(Some(Ok(event(&data)))),
            Ok(Poll::Ready(None)) => {
                self.inner = None;
                Poll::Ready(None)
            }
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => {
                self.inner = None;
                tracing::error!("the callback handler's event stream panicked");
                Poll::Ready(Some(Err(io::Error::other("the event stream panicked"))))
            }
        }
    }
}

/// One Server-Sent Event: a `data:` line per line of `data`, then a blank
/// line.
pub(super) fn event(data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 8);
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line.strip_suffix('\r').unwrap_or(line));
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

pub(super) fn json(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub(super) fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(
        status,
        &serde_json::json!({ "error": { "code": code, "message": message } }),
    )
}

pub(super) fn not_found() -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no callback route here; its session may have ended",
    )
}

pub(super) fn too_large(limit: usize) -> Response<Body> {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        &format!("the request body is larger than {limit} bytes"),
    )
}

pub(super) fn internal_error() -> Response<Body> {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "the callback handler failed unexpectedly",
    )
}
