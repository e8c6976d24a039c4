#![cfg(feature = "callbacks")]
//! Inbound callbacks over real loopback sockets: a `CallbackServer`, routes
//! with their handlers, and hand-written HTTP/1.1 requests.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use voice_backends::runtime::callbacks::{
    CallbackConfig, CallbackRequest, CallbackResponse, CallbackRoute, CallbackServer, StatusCode,
};
use voice_backends::{BackendError, ErrorCode};

/// Only guards against a hang; no test depends on how long anything takes.
async fn guard<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 20 s"))
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    /// The body, chunked transfer coding removed.
    body: String,
    /// Whether a chunked body ended with its last chunk.
    complete: bool,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// Parses a whole HTTP/1.1 response.
fn parse(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response head: {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let (body, complete) = if chunked {
        dechunk(rest)
    } else {
        (rest.to_owned(), true)
    };
    Reply {
        status: status.parse().unwrap(),
        headers,
        body,
        complete,
    }
}

/// The data of a chunked body, and whether its last (empty) chunk came.
fn dechunk(mut rest: &str) -> (String, bool) {
    let mut body = String::new();
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return (body, false);
        };
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            return (body, false);
        };
        if size == 0 {
            return (body, true);
        }
        if after.len() < size {
            body.push_str(after);
            return (body, false);
        }
        body.push_str(&after[..size]);
        rest = after[size..].strip_prefix("\r\n").unwrap_or("");
    }
}

/// Writes a request (with `Connection: close` and the body's length) and
/// returns the open connection.
async fn send(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(body).await.unwrap();
    tcp
}

/// Everything until the server closes (or cuts) the connection.
async fn read_all(tcp: &mut TcpStream, raw: &mut Vec<u8>) {
    guard("reading the response", async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
}

/// Reads until `raw` holds `needle`.
async fn read_until(tcp: &mut TcpStream, raw: &mut Vec<u8>, needle: &str) {
    guard(&format!("waiting for {needle:?}"), async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(raw).contains(needle) {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before {needle:?}: {:?}",
                String::from_utf8_lossy(raw)
            );
            raw.extend_from_slice(&buf[..n]);
        }
    })
    .await;
}

async fn call(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut tcp = send(addr, method, target, headers, body.as_bytes()).await;
    let mut raw = Vec::new();
    read_all(&mut tcp, &mut raw).await;
    parse(&raw)
}

/// The target (path and query) of a route's URL, plus `suffix`.
fn target(route: &CallbackRoute, suffix: &str) -> String {
    format!("{}{suffix}", route.url().path())
}

fn bearer(route: &CallbackRoute) -> String {
    format!("Bearer {}", route.secret().expose())
}

/// A call with the route's secret in the `Authorization` header.
async fn authorized(addr: SocketAddr, route: &CallbackRoute, suffix: &str, body: &str) -> Reply {
    let auth = bearer(route);
    call(
        addr,
        "POST",
        &target(route, suffix),
        &[("Authorization", &auth)],
        body,
    )
    .await
}

/// A handler that answers what it got, counting its calls.
fn echo(
    calls: Arc<AtomicUsize>,
) -> impl Fn(CallbackRequest) -> std::future::Ready<voice_backends::Result<CallbackResponse>>
+ Send
+ Sync
+ 'static {
    move |request: CallbackRequest| {
        calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(CallbackResponse::json(json!({
            "session_id": request.session_id.as_str(),
            "method": request.method.as_str(),
            "path": request.path,
            "query": request.query,
            "authorization": request.headers.contains_key("authorization"),
            "x_custom": request.headers.get("x-custom").and_then(|v| v.to_str().ok()),
            "body": request.body,
        }))))
    }
}

async fn server() -> CallbackServer {
    CallbackServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_call_reaches_its_routes_handler_and_gets_its_answer() {
    let server = server().await;
    let addr = server.local_addr();
    assert!(addr.ip().is_loopback());
    assert_eq!(
        server.base_url().as_str(),
        format!("http://{addr}/"),
        "the default base URL is the listener's"
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let route = server.register("sess_a", echo(calls.clone())).unwrap();
    let url = route.url().as_str();
    assert!(
        url.starts_with(&format!("http://{addr}/callbacks/")),
        "{url}"
    );
    assert!(
        !url.contains("sess_a"),
        "the URL does not carry the session id"
    );

    let auth = bearer(&route);
    let reply = call(
        addr,
        "POST",
        &target(&route, "/chat/completions?model=x&n=2"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
            ("X-Custom", "kept"),
        ],
        r#"{"messages":[{"role":"user","content":"hello"}]}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(
        reply.json(),
        json!({
            "session_id": "sess_a",
            "method": "POST",
            "path": "/chat/completions",
            "query": [["model", "x"], ["n", "2"]],
            "authorization": false,
            "x_custom": "kept",
            "body": {"messages": [{"role": "user", "content": "hello"}]},
        })
    );
    // The route's URL itself is the path `/`; an empty body is `null`.
    let reply = authorized(addr, &route, "", "").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["path"], "/");
    assert_eq!(reply.json()["body"], Value::Null);
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // A handler's own status is kept.
    let created = server
        .register("sess_b", |_| async {
            Ok(CallbackResponse::json_with_status(
                StatusCode::CREATED,
                json!({"ok": true}),
            ))
        })
        .unwrap();
    let reply = authorized(addr, &created, "", "{}").await;
    assert_eq!(reply.status, 201);
    assert_eq!(reply.json(), json!({"ok": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_arrives_event_by_event() {
    let server = server().await;
    let (tx, rx) = mpsc::channel::<String>(4);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let route = server
        .register("sess_sse", move |_request: CallbackRequest| {
            let rx = rx.lock().unwrap().take();
            async move {
                let rx = rx.expect("called once");
                Ok(CallbackResponse::sse_channel(rx))
            }
        })
        .unwrap();
    let auth = bearer(&route);
    let mut tcp = send(
        server.local_addr(),
        "POST",
        &target(&route, "/chat/completions"),
        &[("Authorization", &auth)],
        br#"{"stream":true}"#,
    )
    .await;
    let mut raw = Vec::new();

    tx.send("first".into()).await.unwrap();
    read_until(&mut tcp, &mut raw, "data: first\n\n").await;
    // The first event came while the handler has not produced the rest.
    let so_far = String::from_utf8_lossy(&raw).into_owned();
    assert!(
        so_far.contains("content-type: text/event-stream"),
        "{so_far}"
    );
    assert!(!so_far.contains("second"), "{so_far}");

    tx.send("second\nline two".into()).await.unwrap();
    read_until(&mut tcp, &mut raw, "data: line two\n\n").await;
    tx.send("[DONE]".into()).await.unwrap();
    drop(tx);
    read_all(&mut tcp, &mut raw).await;
    let reply = parse(&raw);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("cache-control"), Some("no-cache"));
    assert!(reply.complete, "the stream ended properly: {reply:?}");
    assert_eq!(
        reply.body,
        "data: first\n\ndata: second\ndata: line two\n\ndata: [DONE]\n\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_panics_is_cut_not_ended() {
    let server = server().await;
    let (tx, rx) = mpsc::channel::<String>(4);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let route = server
        .register("sess_p", move |_| {
            let rx = rx.lock().unwrap().take();
            async move {
                let events =
                    futures_util::stream::unfold(rx.expect("called once"), |mut rx| async move {
                        rx.recv().await.map(|event| (event, rx))
                    })
                    .map(|event| {
                        assert!(event != "boom", "the stream's own panic");
                        event
                    });
                Ok(CallbackResponse::sse(events))
            }
        })
        .unwrap();
    let auth = bearer(&route);
    let mut tcp = send(
        server.local_addr(),
        "POST",
        &target(&route, ""),
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    let mut raw = Vec::new();
    tx.send("one".into()).await.unwrap();
    read_until(&mut tcp, &mut raw, "data: one\n\n").await;
    tx.send("boom".into()).await.unwrap();
    read_all(&mut tcp, &mut raw).await;
    let reply = parse(&raw);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "data: one\n\n");
    assert!(!reply.complete, "no final chunk after a panic: {reply:?}");
    // The server goes on.
    let fine = server
        .register("sess_f", echo(Arc::new(AtomicUsize::new(0))))
        .unwrap();
    let reply = authorized(server.local_addr(), &fine, "", "{}").await;
    assert_eq!(reply.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_is_refused_with_401() {
    let server = server().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let route = server.register("sess_a", echo(calls.clone())).unwrap();
    let secret = route.secret().expose().to_owned();
    let mut near = secret.clone();
    near.replace_range(63..64, if secret.ends_with('0') { "1" } else { "0" });
    for auth in [
        "Bearer wrong".to_owned(),
        format!("Bearer {near}"),
        format!("Bearer {}", &secret[..63]),
        format!("Bearer {secret}0"),
        format!("Basic {secret}"),
    ] {
        let reply = call(
            server.local_addr(),
            "POST",
            &target(&route, ""),
            &[("Authorization", &auth)],
            "{}",
        )
        .await;
        assert_eq!(reply.status, 401, "{auth}: {reply:?}");
        assert_eq!(reply.error_code(), "authentication_failed");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        assert!(!reply.body.contains(&secret));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_is_refused_with_401() {
    let server = server().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let route = server.register("sess_a", echo(calls.clone())).unwrap();
    for suffix in ["", "/chat/completions", "?token=", "?other=1"] {
        let reply = call(
            server.local_addr(),
            "POST",
            &target(&route, suffix),
            &[],
            "{}",
        )
        .await;
        assert_eq!(reply.status, 401, "{suffix}: {reply:?}");
        assert_eq!(reply.error_code(), "authentication_failed");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secret_may_come_as_a_query_token() {
    let server = server().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let route = server.register("sess_q", echo(calls.clone())).unwrap();
    let with_token = route.url_with_token();
    let with_token = url::Url::parse(with_token.expose()).unwrap();
    let reply = call(
        server.local_addr(),
        "POST",
        &format!("{}?{}&x=1", with_token.path(), with_token.query().unwrap()),
        &[],
        r#"{"text":"hi"}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let got = reply.json();
    assert_eq!(got["body"], json!({"text": "hi"}));
    assert_eq!(
        got["query"],
        json!([["x", "1"]]),
        "the token is not handed on"
    );
    // A wrong query token is refused like a wrong header.
    let reply = call(
        server.local_addr(),
        "POST",
        &target(&route, "?token=nope"),
        &[],
        "{}",
    )
    .await;
    assert_eq!(reply.status, 401);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_route_is_404_whatever_the_credentials() {
    let server = server().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let route = server.register("sess_a", echo(calls.clone())).unwrap();
    let auth = bearer(&route);
    let addr = server.local_addr();
    for path in [
        "/callbacks/00000000000000000000000000000000",
        "/callbacks/00000000000000000000000000000000/chat/completions",
        "/callbacks/",
        "/callbacks",
        "/",
        "/sess_a",
        "/callbacks/sess_a",
    ] {
        for headers in [&[][..], &[("Authorization", auth.as_str())][..]] {
            let reply = call(addr, "POST", path, headers, "{}").await;
            assert_eq!(reply.status, 404, "{path} {headers:?}: {reply:?}");
            assert_eq!(reply.error_code(), "not_found");
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_refused_with_413() {
    // Declared too large: refused before a byte of it is read.
    let server = server().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let route = server.register("sess_a", echo(calls.clone())).unwrap();
    let auth = bearer(&route);
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: {}\r\n\r\n",
        target(&route, ""),
        (1 << 20) + 1
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    read_all(&mut tcp, &mut raw).await;
    let reply = parse(&raw);
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(reply.error_code(), "payload_too_large");

    // Exactly the limit is accepted (a JSON string padded with spaces).
    let mut body = String::from("\"x\"");
    body.push_str(&" ".repeat((1 << 20) - body.len()));
    let reply = authorized(server.local_addr(), &route, "", &body).await;
    assert_eq!(reply.status, 200, "{reply:?}");

    // Chunked, with no length declared: refused once it grows past the limit.
    let config = CallbackConfig {
        max_body_bytes: 1024,
        ..CallbackConfig::default()
    };
    let small = CallbackServer::bind_with(config).await.unwrap();
    let route = small.register("sess_b", echo(calls.clone())).unwrap();
    let auth = bearer(&route);
    let mut tcp = TcpStream::connect(small.local_addr()).await.unwrap();
    let chunk = format!("320\r\n\"{}\"\r\n", "a".repeat(798));
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}",
        target(&route, ""),
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    read_all(&mut tcp, &mut raw).await;
    let reply = parse(&raw);
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "only the call at the limit ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_refused_with_400_naming_the_problem() {
    let server = server().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let route = server.register("sess_a", echo(calls.clone())).unwrap();
    for (body, problem) in [
        (r#"{"text": "hi""#, "EOF while parsing"),
        ("{text}", "key must be a string"),
        ("hello", "expected value"),
        (r#"{"a":1} x"#, "trailing characters"),
    ] {
        let reply = authorized(server.local_addr(), &route, "", body).await;
        assert_eq!(reply.status, 400, "{body}: {reply:?}");
        assert_eq!(reply.error_code(), "invalid_json");
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.contains("not valid JSON"), "{message}");
        assert!(message.contains(problem), "{message}");
        assert!(message.contains("line 1 column"), "{message}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_error_is_502_with_its_code_and_message() {
    let server = server().await;
    let route = server
        .register("sess_e", |_| async {
            Err(BackendError::new(
                "agent.reply",
                ErrorCode::AgentError,
                "the agent has no answer",
            ))
        })
        .unwrap();
    let reply = authorized(server.local_addr(), &route, "/chat/completions", "{}").await;
    assert_eq!(reply.status, 502, "{reply:?}");
    assert_eq!(
        reply.json(),
        json!({"error": {"code": "agent_error", "message": "the agent has no answer"}})
    );
    let timeout = server
        .register("sess_t", |_| async {
            Err(BackendError::new(
                "agent.reply",
                ErrorCode::Timeout,
                "too slow",
            ))
        })
        .unwrap();
    let reply = authorized(server.local_addr(), &timeout, "", "{}").await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.error_code(), "timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_gives_500_and_the_server_goes_on() {
    let server = server().await;
    let in_future = server
        .register("sess_p", |_| async {
            panic!("the handler's future panics");
        })
        .unwrap();
    let when_called = server
        .register(
            "sess_q",
            |_| -> std::future::Ready<voice_backends::Result<CallbackResponse>> {
                panic!("the handler panics when called")
            },
        )
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let fine = server.register("sess_f", echo(calls.clone())).unwrap();
    for route in [&in_future, &when_called, &in_future] {
        let reply = authorized(server.local_addr(), route, "", "{}").await;
        assert_eq!(reply.status, 500, "{reply:?}");
        assert_eq!(reply.error_code(), "internal_error");
    }
    let reply = authorized(server.local_addr(), &fine, "", "{}").await;
    assert_eq!(reply.status, 200, "a later call works: {reply:?}");

    // And on the same keep-alive connection.
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    for route in [&in_future, &fine] {
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: 2\r\n\r\n{{}}",
            target(route, ""),
            bearer(route),
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
    }
    let mut raw = Vec::new();
    read_until(&mut tcp, &mut raw, "\"sess_f\"").await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 500"), "{text}");
    assert!(text.contains("HTTP/1.1 200"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routes_are_isolated() {
    let server = server().await;
    let (a_calls, b_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let a = server.register("sess_a", echo(a_calls.clone())).unwrap();
    let b = server.register("sess_b", echo(b_calls.clone())).unwrap();
    assert_ne!(a.url(), b.url());
    assert_ne!(a.secret(), b.secret());
    let addr = server.local_addr();

    // A's secret does not open B, by header or by query.
    let a_auth = bearer(&a);
    let reply = call(
        addr,
        "POST",
        &target(&b, ""),
        &[("Authorization", &a_auth)],
        "{}",
    )
    .await;
    assert_eq!(reply.status, 401);
    let reply = call(
        addr,
        "POST",
        &target(&b, &format!("?token={}", a.secret().expose())),
        &[],
        "{}",
    )
    .await;
    assert_eq!(reply.status, 401);
    assert_eq!(b_calls.load(Ordering::SeqCst), 0);
    assert_eq!(a_calls.load(Ordering::SeqCst), 0);

    // Each secret opens its own route, which reaches its own session.
    let reply = authorized(addr, &a, "", "{}").await;
    assert_eq!(reply.json()["session_id"], "sess_a");
    let reply = authorized(addr, &b, "", "{}").await;
    assert_eq!(reply.json()["session_id"], "sess_b");
    assert_eq!(a_calls.load(Ordering::SeqCst), 1);
    assert_eq!(b_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_route_makes_it_404() {
    let server = server().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let route = server.register("sess_a", echo(calls.clone())).unwrap();
    let other = server.register("sess_b", echo(calls.clone())).unwrap();
    assert_eq!(server.route_count(), 2);
    let (path, auth) = (target(&route, ""), bearer(&route));
    let reply = call(
        server.local_addr(),
        "POST",
        &path,
        &[("Authorization", &auth)],
        "{}",
    )
    .await;
    assert_eq!(reply.status, 200);

    drop(route);
    assert_eq!(server.route_count(), 1);
    let reply = call(
        server.local_addr(),
        "POST",
        &path,
        &[("Authorization", &auth)],
        "{}",
    )
    .await;
    assert_eq!(reply.status, 404, "{reply:?}");
    assert_eq!(reply.error_code(), "not_found");
    // The other route is untouched.
    let reply = authorized(server.local_addr(), &other, "", "{}").await;
    assert_eq!(reply.status, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_secret_never_shows_in_debug() {
    let server = server().await;
    let route = server
        .register("sess_a", echo(Arc::new(AtomicUsize::new(0))))
        .unwrap();
    let secret = route.secret().expose().to_owned();
    assert_eq!(secret.len(), 64, "256 bits in hex");
    assert!(secret.bytes().all(|c| c.is_ascii_hexdigit()));
    let shown = format!("{route:?}");
    assert!(!shown.contains(&secret), "{shown}");
    assert!(shown.contains("[redacted]"), "{shown}");
    assert!(shown.contains(route.url().as_str()), "{shown}");
    for shown in [
        format!("{:?}", route.url_with_token()),
        format!("{}", route.url_with_token()),
        format!("{}", route.secret()),
        format!("{server:?}"),
    ] {
        assert!(!shown.contains(&secret), "{shown}");
    }
    assert!(
        route
            .url_with_token()
            .expose()
            .ends_with(&format!("?token={secret}")),
        "the token URL carries it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_use_the_public_url_and_shutdown_closes_the_listener() {
    let config = CallbackConfig {
        public_url: Some("https://voice.example.com/vb/".parse().unwrap()),
        ..CallbackConfig::default()
    };
    let server = CallbackServer::bind_with(config).await.unwrap();
    let route = server
        .register("sess_a", echo(Arc::new(AtomicUsize::new(0))))
        .unwrap();
    let url = route.url().as_str().to_owned();
    assert!(
        url.starts_with("https://voice.example.com/vb/callbacks/"),
        "{url}"
    );
    let id = url.rsplit('/').next().unwrap().to_owned();
    assert_eq!(id.len(), 32, "128 bits in hex");
    // The server serves the route at its root.
    let reply = call(
        server.local_addr(),
        "POST",
        &format!("/callbacks/{id}"),
        &[("Authorization", &bearer(&route))],
        "{}",
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");

    let config = CallbackConfig {
        public_url: Some("ftp://host".parse().unwrap()),
        ..CallbackConfig::default()
    };
    let refused = CallbackServer::bind_with(config).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::InvalidConfig);

    let addr = server.local_addr();
    guard("shutdown", server.shutdown()).await;
    assert!(TcpStream::connect(addr).await.is_err(), "nothing listens");
    drop(route);
}

/// What one span recorded: its name and fields, or an event's fields.
#[derive(Clone, Debug, Default)]
struct Seen {
    name: &'static str,
    fields: Vec<(String, String)>,
}

/// Notes every span (with its fields, recorded late or not) and event.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Seen>>>);

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
}

impl<S> tracing_subscriber::Layer<S> for Recorder
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut seen = Seen {
            name: attrs.metadata().name(),
            fields: vec![("id".to_owned(), id.into_u64().to_string())],
        };
        attrs.record(&mut Fields(&mut seen.fields));
        self.0.lock().unwrap().push(seen);
    }

    fn on_record(
        &self,
        id: &tracing::Id,
        values: &tracing::span::Record<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut spans = self.0.lock().unwrap();
        let key = id.into_u64().to_string();
        if let Some(seen) = spans.iter_mut().rev().find(|s| {
            s.fields
                .first()
                .is_some_and(|(k, v)| k == "id" && *v == key)
        }) {
            values.record(&mut Fields(&mut seen.fields));
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut seen = Seen {
            name: event.metadata().name(),
            fields: Vec::new(),
        };
        event.record(&mut Fields(&mut seen.fields));
        self.0.lock().unwrap().push(seen);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_has_a_span_without_secret_headers_or_body() {
    use tracing_subscriber::layer::SubscriberExt as _;
    // Process-wide: the requests are served on the runtime's worker threads.
    // The other tests of this binary record into it too, harmlessly.
    let recorder = Recorder::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(recorder.clone()))
        .expect("the only test that sets a subscriber");

    let server = server().await;
    let route = server
        .register("sess_traced", |request: CallbackRequest| async move {
            if request.body["fail"] == true {
                return Err(BackendError::new(
                    "agent.reply",
                    ErrorCode::AgentError,
                    "no reply",
                ));
            }
            Ok(CallbackResponse::json(json!({"ok": true})))
        })
        .unwrap();
    let secret = route.secret().expose().to_owned();
    let auth = bearer(&route);
    let addr = server.local_addr();
    let body = r#"{"text":"body-text-not-logged"}"#;
    let headers = [
        ("Authorization", auth.as_str()),
        ("X-Private", "header-not-logged"),
    ];
    assert_eq!(
        call(addr, "POST", &target(&route, "/turn"), &headers, body)
            .await
            .status,
        200
    );
    let failing = r#"{"fail":true,"text":"body-text-not-logged"}"#;
    assert_eq!(
        call(addr, "POST", &target(&route, "/turn"), &headers, failing)
            .await
            .status,
        502
    );
    let bad = format!("{}?token={secret}x", target(&route, "/turn"));
    assert_eq!(call(addr, "POST", &bad, &[], body).await.status, 401);

    let seen = recorder.0.lock().unwrap().clone();
    let ours: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.name == "callbacks.request")
        .filter(|s| {
            s.fields
                .iter()
                .any(|(k, v)| k == "session_id" && v == "\"sess_traced\"")
        })
        .collect();
    let statuses: Vec<&str> = ours
        .iter()
        .filter_map(|s| s.fields.iter().find(|(k, _)| k == "status"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(statuses, ["200", "502", "401"], "{ours:#?}");
    for s in &ours {
        assert!(
            s.fields
                .iter()
                .any(|(k, v)| k == "path" && v == "\"/turn\""),
            "{s:?}"
        );
        assert!(
            s.fields.iter().any(|(k, v)| k == "method" && v == "POST"),
            "{s:?}"
        );
    }
    for s in &seen {
        for (_, value) in &s.fields {
            for hidden in [secret.as_str(), "body-text-not-logged", "header-not-logged"] {
                assert!(!value.contains(hidden), "{s:?} shows {hidden}");
            }
        }
    }
}
