#![cfg(all(feature = "server", feature = "testing"))]
//! The server's limits against clients that try to hold it: frames outside
//! the message rate, sessions that say nothing, clients that stop reading,
//! TCP connections that never upgrade, names an attacker points at the
//! server (DNS rebinding), and clients that vanish without a close frame.

#[path = "support/server.rs"]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::{Bytes, Message};
use voice_backends::server::ServerConfig;
use voice_backends::testing::signal;

use support::*;

/// A frame of a message in pieces: the first (`first`) or a continuation.
fn piece(data: &[u8], first: bool, fin: bool) -> Message {
    let op = if first { Data::Binary } else { Data::Continue };
    Message::Frame(Frame::message(data.to_vec(), OpCode::Data(op), fin))
}

/// The server's metrics text.
async fn metrics(addr: SocketAddr) -> String {
    http_get(addr, "/metrics").await.2
}

/// Waits until the series has `value`; the text of the metrics then.
async fn wait_metric(addr: SocketAddr, series: &str, value: f64) -> String {
    let found = timeout(PATIENCE, async {
        loop {
            let text = metrics(addr).await;
            if metric(&text, series) == value {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    match found {
        Ok(text) => text,
        Err(_) => panic!(
            "{series} never became {value}; metrics:\n{}",
            metrics(addr).await
        ),
    }
}

/// Whether the server closes `tcp` (end of stream or reset) within
/// `PATIENCE`, discarding whatever it sends first.
async fn closed_by_server(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    timeout(PATIENCE, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pongs_and_the_pieces_of_a_message_count_against_the_message_rate() {
    let server = Running::start(
        echo_config(),
        ServerConfig {
            messages_per_second: 5.0,
            ..server_config()
        },
    )
    .await;
    // Empty pongs: never seen as messages, but frames all the same.
    refused(&server, 1008, "message rate exceeded", async |c| {
        c.start("pongs").await;
        for _ in 0..40 {
            if c.send(Message::Pong(Bytes::new())).await.is_err() {
                break;
            }
        }
    })
    .await;
    // The empty pieces of a message that never ends.
    refused(&server, 1008, "message rate exceeded", async |c| {
        c.start("pieces").await;
        if c.send(piece(b"ab", true, false)).await.is_err() {
            return;
        }
        for _ in 0..40 {
            if c.send(piece(b"", false, false)).await.is_err() {
                break;
            }
        }
    })
    .await;
    // Before `start` too, where it is a refusal of the connection.
    refused(&server, 1008, "message rate exceeded", async |c| {
        for _ in 0..40 {
            if c.send(Message::Ping(Bytes::new())).await.is_err() {
                break;
            }
        }
    })
    .await;
    server.wait_sessions(0).await;
    let text = metrics(server.addr).await;
    assert_eq!(
        metric(
            &text,
            "server_connections_refused_total{reason=\"rate_limit\"}"
        ),
        1.0
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_in_pieces_is_bounded_in_pieces_and_time() {
    let server = Running::start(
        echo_config(),
        ServerConfig {
            messages_per_second: 10_000.0,
            ..server_config()
        },
    )
    .await;
    refused(&server, 1008, "too many pieces", async |c| {
        c.start("many").await;
        c.send(piece(b"ab", true, false)).await.unwrap();
        for _ in 0..100 {
            if c.send(piece(b"cd", false, false)).await.is_err() {
                break;
            }
        }
    })
    .await;
    let reason = refused(&server, 1008, "not whole within", async |c| {
        c.start("slow").await;
        c.send(piece(b"ab", true, false)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5_300)).await;
        let _ = c.send(piece(b"cd", false, true)).await;
    })
    .await;
    assert!(reason.contains("5s"), "{reason}");
    // A message in a few pieces, whole in time, is a message like any other.
    let mut c = Client::connect(server.addr).await;
    c.start("pieces").await;
    let text = br#"{"type":"text","text":"in pieces"}"#;
    let (a, rest) = text.split_at(10);
    let (b, d) = rest.split_at(10);
    for (i, part) in [a, b, d].into_iter().enumerate() {
        let op = if i == 0 { Data::Text } else { Data::Continue };
        c.send(Message::Frame(Frame::message(
            part.to_vec(),
            OpCode::Data(op),
            i == 2,
        )))
        .await
        .unwrap();
    }
    c.wait_for("the transcript", |v| {
        v["type"] == "user_transcript" && v["text"] == "in pieces"
    })
    .await;
    c.send_json(json!({"type": "stop"})).await;
    assert_eq!(c.expect_close().await.0, 1000);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_says_nothing_is_closed_once_idle() {
    let server = Running::start(
        echo_config(),
        ServerConfig {
            idle_timeout: Duration::from_millis(1_500),
            ..server_config()
        },
    )
    .await;
    // Audio keeps a session alive past the idle time; pings do not.
    let mut talking = Client::connect(server.addr).await;
    talking.start("talking").await;
    let mut silent = Client::connect(server.addr).await;
    silent.start("silent").await;
    let frame = signal::silence(Duration::from_millis(20));
    for i in 0..150 {
        talking.send_samples(&frame).await;
        if i % 15 == 0 {
            let _ = silent.send(Message::Ping(Bytes::new())).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, reason) = silent.expect_close().await;
    assert_eq!(code, 1008, "{reason}");
    assert!(
        reason.contains("idle: no audio or message for 1s 500ms"),
        "{reason}"
    );
    // The talking session is still there.
    talking.send_json(json!({"type": "stop"})).await;
    assert_eq!(
        talking.expect_close().await,
        (1000, "session stopped".into())
    );
    server.wait_sessions(0).await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_and_its_session_stopped() {
    let server = Running::start(
        echo_config(),
        ServerConfig {
            send_timeout: Duration::from_secs(1),
            send_buffer_bytes: 4096,
            ..server_config()
        },
    )
    .await;
    // A client with a small receive buffer, which reads `ready` and then
    // nothing more while it goes on talking.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let request = format!("ws://{}/ws", server.addr)
        .into_client_request()
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
    ws.send(Message::text(
        json!({"type": "start", "user_id": "deaf", "sample_rate": RATE}).to_string(),
    ))
    .await
    .unwrap();
    let mut ready = false;
    while !ready {
        use futures_util::StreamExt;
        let next = timeout(PATIENCE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        ready = matches!(&next, Message::Text(t) if t.as_str().contains("\"ready\""));
    }
    let speech = signal::utterance(Duration::from_millis(1_500), Duration::from_millis(900), 5);
    let bytes: Vec<Vec<u8>> = speech
        .chunks((RATE / 50) as usize)
        .map(|c| c.iter().flat_map(|s| s.to_le_bytes()).collect())
        .collect();
    let gone = timeout(PATIENCE, async {
        'talking: loop {
            for frame in &bytes {
                let sent = timeout(
                    Duration::from_secs(2),
                    ws.send(Message::binary(frame.clone())),
                )
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    break 'talking;
                }
                if server.backend.active_session_count() == 0 {
                    break 'talking;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
    .await;
    assert!(
        gone.is_ok(),
        "the server kept the client that stopped reading"
    );
    server.wait_sessions(0).await;
    let text = wait_metric(
        server.addr,
        "server_connections_dropped_total{reason=\"not_reading\"}",
        1.0,
    )
    .await;
    assert_eq!(metric(&text, "server_connections_active"), 0.0);
    assert_healthy_session(server.addr, "reader").await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_no_request_or_idle_after_one_time_out() {
    let server = Running::start(
        echo_config(),
        ServerConfig {
            request_timeout: Duration::from_millis(500),
            ..server_config()
        },
    )
    .await;
    // Nothing at all.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // Half a request.
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    // A whole request, then an idle keep-alive connection.
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    for (what, tcp) in [
        ("silent", &mut silent),
        ("slow", &mut slow),
        ("idle", &mut idle),
    ] {
        assert!(closed_by_server(tcp).await, "the {what} connection stays");
    }
    let text = metrics(server.addr).await;
    assert_eq!(
        metric(
            &text,
            "server_connections_dropped_total{reason=\"request_timeout\"}"
        ),
        3.0
    );
    // A WebSocket lives past the request timeout.
    let mut c = Client::connect(server.addr).await;
    c.start("past").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    healthy_session_started(&mut c).await;
    server.stop().await.unwrap();
}

/// A TCP connection to `server` from the loopback address `from`.
async fn connect_from(from: [u8; 4], server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(server).await.unwrap()
}

/// A GET of `/healthz` on `tcp`: the status.
async fn healthz_on(tcp: &mut TcpStream) -> u16 {
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    timeout(PATIENCE, tcp.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    response.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_before_the_upgrade_are_limited_per_address() {
    let server = Running::start(
        echo_config(),
        ServerConfig {
            max_http_connections_per_ip: 2,
            ..server_config()
        },
    )
    .await;
    let held = [
        connect_from([127, 0, 0, 2], server.addr).await,
        connect_from([127, 0, 0, 2], server.addr).await,
    ];
    // The third from that address is closed at once.
    let mut third = connect_from([127, 0, 0, 2], server.addr).await;
    assert!(closed_by_server(&mut third).await);
    // Others are served.
    assert_eq!(
        healthz_on(&mut connect_from([127, 0, 0, 3], server.addr).await).await,
        200
    );
    let text = metrics(server.addr).await;
    assert_eq!(
        metric(
            &text,
            "server_connections_dropped_total{reason=\"address_limit\"}"
        ),
        1.0
    );
    // Upgraded connections no longer count against it: three sessions from
    // one address with a limit of two.
    let mut sessions = Vec::new();
    for user in ["a", "b", "c"] {
        let mut c = Client::connect(server.addr).await;
        c.start(user).await;
        sessions.push(c);
    }
    // Closing the held connections frees their address's slots.
    drop(held);
    let freed = timeout(PATIENCE, async {
        loop {
            let mut tcp = connect_from([127, 0, 0, 2], server.addr).await;
            let _ = tcp
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .await;
            let mut response = Vec::new();
            let _ = tcp.read_to_end(&mut response).await;
            if response.starts_with(b"HTTP/1.1 200") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(freed.is_ok(), "the address's slots were not freed");
    for c in &mut sessions {
        healthy_session_started(c).await;
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_an_attacker_points_at_a_loopback_server_are_refused() {
    let server = Running::echo().await;
    let port = server.addr.port();
    let rebound = format!("rebind.example:{port}");
    let origin = format!("http://rebind.example:{port}");
    let (status, body) =
        http_refusal(server.addr, &[("host", &rebound), ("origin", &origin)]).await;
    assert_eq!(status, 403);
    assert!(body.contains("host not allowed: rebind.example"), "{body}");
    // Every route, not only the WebSocket.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {rebound}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut response = String::new();
    timeout(PATIENCE, tcp.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");
    // Loopback names and addresses pass.
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let origin = format!("http://{host}");
        let mut c = Client::connect_with(server.addr, &[("host", &host), ("origin", &origin)])
            .await
            .unwrap();
        healthy_session(&mut c, "local").await;
    }
    let text = metrics(server.addr).await;
    assert_eq!(
        metric(&text, "server_connections_refused_total{reason=\"host\"}"),
        1.0
    );
    server.stop().await.unwrap();

    // A name the server is meant to be reached by, listed.
    let server = Running::start(
        echo_config(),
        ServerConfig {
            allowed_hosts: vec!["rebind.example".into()],
            ..server_config()
        },
    )
    .await;
    let port = server.addr.port();
    let host = format!("rebind.example:{port}");
    let mut c = Client::connect_with(server.addr, &[("host", &host)])
        .await
        .unwrap();
    healthy_session(&mut c, "listed").await;
    let (status, _) = http_refusal(server.addr, &[("host", &format!("localhost:{port}"))]).await;
    assert_eq!(status, 403, "only the listed names");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_vanish_are_counted_as_gone_not_refused() {
    let server = Running::echo().await;
    // Before `start`, and after it: the TCP connection closes without a
    // WebSocket close frame.
    let before = Client::connect(server.addr).await;
    let mut after = Client::connect(server.addr).await;
    after.start("ghost").await;
    wait_metric(server.addr, "server_connections_active", 2.0).await;
    drop(before);
    drop(after);
    let text = wait_metric(server.addr, "server_connections_vanished_total", 2.0).await;
    server.wait_sessions(0).await;
    for series in [
        "server_closes_total{code=\"1002\"}",
        "server_connections_refused_total{reason=\"protocol\"}",
    ] {
        assert_eq!(metric(&text, series), 0.0, "{series}");
    }
    // Their slots are free at once: a limit of one connection per address
    // takes a new one as soon as the old is gone.
    server.stop().await.unwrap();
    let server = Running::start(
        echo_config(),
        ServerConfig {
            max_connections_per_ip: 1,
            ..server_config()
        },
    )
    .await;
    let mut first = Client::connect(server.addr).await;
    first.start("first").await;
    drop(first);
    wait_metric(server.addr, "server_connections_vanished_total", 1.0).await;
    assert_healthy_session(server.addr, "second").await;
    server.stop().await.unwrap();
}
