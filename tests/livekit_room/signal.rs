//! The room's `/rtc` signal server: HTTP on a TCP listener, token checks,
//! the WebSocket upgrade, and the `SignalRequest` / `SignalResponse`
//! exchange of one participant.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use livekit_api::access_token::{Claims, TokenVerifier};
use livekit_protocol as proto;
use prost::Message as _;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::sfu::{Out, Participant};
use super::{JoinRecord, Refusal, Shared, TokenPlace, USER_IDENTITY, USER_SID, USER_TRACK_SID};

/// Accepts connections until the room is dropped.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(handle(stream, shared.clone()));
    }
}

/// An HTTP request head, read without consuming it (so the WebSocket
/// handshake can read it again).
struct Head {
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
}

async fn peek_head(stream: &TcpStream) -> Option<Head> {
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    let n = loop {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break n;
        }
        if n == buf.len() || Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let text = String::from_utf8_lossy(&buf[..n]);
    let mut lines = text.split("\r\n");
    let request = lines.next()?;
    let mut parts = request.split(' ');
    let _method = parts.next()?;
    let target = parts.next()?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect();
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(Head {
        path: path.to_owned(),
        query,
        headers,
    })
}

fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_encoding::percent_decode_str(&s)
        .decode_utf8_lossy()
        .into_owned()
}

async fn respond(mut stream: TcpStream, status: u16, reason: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Checks the token as LiveKit's `/rtc` does; the error is the 401 body.
fn authorize(shared: &Shared, head: &Head) -> Result<(Claims, TokenPlace), String> {
    let (token, place) = if let Some(auth) = head.headers.get("authorization") {
        let token = auth
            .strip_prefix("Bearer ")
            .ok_or("authorization header is not a Bearer token")?;
        (token.to_owned(), TokenPlace::Header)
    } else if let Some(token) = head.query.get("access_token") {
        (token.clone(), TokenPlace::Query)
    } else {
        return Err("no authorization token".into());
    };
    let verifier = TokenVerifier::with_api_key(&shared.options.api_key, &shared.options.api_secret);
    let claims = verifier
        .verify(&token)
        .map_err(|e| format!("invalid token: {e}"))?;
    if !claims.video.room_join {
        return Err("no permissions to access the room: roomJoin not granted".into());
    }
    if claims.video.room != shared.options.room_name {
        return Err(format!(
            "no permissions to access the room: token is for room {:?}",
            claims.video.room
        ));
    }
    if claims.sub.is_empty() {
        return Err("identity cannot be empty".into());
    }
    Ok((claims, place))
}

async fn handle(stream: TcpStream, shared: Arc<Shared>) {
    let Some(head) = peek_head(&stream).await else {
        return;
    };
    let path = head.path.trim_end_matches('/').to_owned();
    let refuse = |status: u16, reason: String| {
        shared.with(|s| {
            s.counters.refused += 1;
            s.refusals.push(Refusal {
                status,
                reason,
                path: head.path.clone(),
            });
        });
    };
    match path.as_str() {
        "/rtc/validate" => match authorize(&shared, &head) {
            Ok(_) => respond(stream, 200, "OK", "success").await,
            Err(why) => {
                refuse(401, why.clone());
                respond(stream, 401, "Unauthorized", &why).await;
            }
        },
        "/rtc" => match authorize(&shared, &head) {
            Ok((claims, place)) => {
                let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                    refuse(400, "not a WebSocket upgrade".into());
                    return;
                };
                join(ws, shared.clone(), head, claims, place).await;
            }
            Err(why) => {
                refuse(401, why.clone());
                respond(stream, 401, "Unauthorized", &why).await;
            }
        },
        _ => {
            refuse(404, format!("no such path {path}"));
            respond(stream, 404, "Not Found", "404 page not found").await;
        }
    }
}

type Ws = WebSocketStream<TcpStream>;

async fn send_ws(ws: &mut Ws, msg: proto::signal_response::Message) -> bool {
    let bytes = proto::SignalResponse { message: Some(msg) }.encode_to_vec();
    ws.send(WsMessage::Binary(bytes.into())).await.is_ok()
}

fn leave(
    reason: proto::DisconnectReason,
    action: proto::leave_request::Action,
) -> proto::signal_response::Message {
    proto::signal_response::Message::Leave(proto::LeaveRequest {
        can_reconnect: action != proto::leave_request::Action::Disconnect,
        reason: reason as i32,
        action: action as i32,
        regions: None,
    })
}

/// A new WebSocket: resume or join, then serve it.
async fn join(mut ws: Ws, shared: Arc<Shared>, head: Head, claims: Claims, place: TokenPlace) {
    let reconnect = head
        .query
        .get("reconnect")
        .is_some_and(|v| v == "1" || v == "true");
    let auto_subscribe = head
        .query
        .get("auto_subscribe")
        .is_none_or(|v| v != "0" && v != "false");
    let mut record = JoinRecord {
        identity: claims.sub.clone(),
        name: claims.name.clone(),
        kind: claims.kind.clone(),
        metadata: claims.metadata.clone(),
        attributes: claims.attributes.clone(),
        grants: claims.video.clone(),
        participant_sid: String::new(),
        reconnect,
        resumed: false,
        query: head.query.clone(),
        token_place: place,
        at: Instant::now(),
    };

    if reconnect {
        let sid = head.query.get("sid").cloned().unwrap_or_default();
        let found = shared.with(|s| {
            s.participants
                .iter()
                .find(|p| (p.sid == sid || sid.is_empty()) && p.identity == claims.sub)
                .cloned()
        });
        match found {
            Some(p)
                if p.resumable()
                    && !shared
                        .refuse_resumes
                        .load(std::sync::atomic::Ordering::Acquire) =>
            {
                record.participant_sid = p.sid.clone();
                record.resumed = true;
                shared.with(|s| {
                    s.counters.resumes += 1;
                    s.joins.push(record);
                });
                let response =
                    proto::signal_response::Message::Reconnect(proto::ReconnectResponse {
                        ice_servers: Vec::new(),
                        client_configuration: None,
                        server_info: Some(server_info()),
                        last_message_seq: 0,
                    });
                if send_ws(&mut ws, response).await {
                    run(ws, shared, p).await;
                }
            }
            other => {
                // The participant is gone (left, replaced, or its media
                // failed): tell the client to join afresh, as LiveKit does.
                if let Some(p) = other {
                    shared.with(|s| s.participants.retain(|q| !Arc::ptr_eq(q, &p)));
                    p.shutdown();
                }
                record.participant_sid = sid;
                shared.with(|s| {
                    s.counters.resumes_refused += 1;
                    s.joins.push(record);
                });
                let _ = send_ws(
                    &mut ws,
                    leave(
                        proto::DisconnectReason::StateMismatch,
                        proto::leave_request::Action::Reconnect,
                    ),
                )
                .await;
                let _ = ws.close(None).await;
            }
        }
        return;
    }

    // A fresh join replaces a participant with the same identity.
    let replaced = shared.with(|s| {
        let (old, keep): (Vec<_>, Vec<_>) = s
            .participants
            .drain(..)
            .partition(|p| p.identity == claims.sub);
        s.participants = keep;
        old
    });
    for old in replaced {
        old.send(leave(
            proto::DisconnectReason::DuplicateIdentity,
            proto::leave_request::Action::Disconnect,
        ));
        let old = old.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            old.shutdown();
        });
    }

    let sid = shared.next_id("PA_");
    let participant = match Participant::create(shared.clone(), sid.clone(), claims).await {
        Ok(p) => p,
        Err(why) => {
            let _ = send_ws(
                &mut ws,
                leave(
                    proto::DisconnectReason::JoinFailure,
                    proto::leave_request::Action::Disconnect,
                ),
            )
            .await;
            shared.with(|s| {
                s.refusals.push(Refusal {
                    status: 500,
                    reason: why,
                    path: head.path.clone(),
                })
            });
            return;
        }
    };
    record.participant_sid = sid;
    let join = join_response(&shared, &participant);
    shared.with(|s| {
        s.counters.joins += 1;
        s.joins.push(record);
        s.participants.push(participant.clone());
    });
    if !send_ws(&mut ws, proto::signal_response::Message::Join(join)).await {
        return;
    }
    let p = participant.clone();
    tokio::spawn(async move {
        if let Err(why) = p.start_subscriber(auto_subscribe).await {
            eprintln!("livekit test room: subscriber negotiation failed: {why}");
        }
    });
    run(ws, shared, participant).await;
}

fn server_info() -> proto::ServerInfo {
    proto::ServerInfo {
        edition: proto::server_info::Edition::Standard as i32,
        version: "1.8.0".into(),
        protocol: 16,
        region: "local".into(),
        node_id: "ND_testroom".into(),
        ..Default::default()
    }
}

fn join_response(shared: &Shared, participant: &Participant) -> proto::JoinResponse {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
        - shared.created.elapsed().as_secs() as i64;
    let others = shared.with(|s| s.participants.len()) as u32;
    let user = proto::ParticipantInfo {
        sid: USER_SID.into(),
        identity: USER_IDENTITY.into(),
        state: proto::participant_info::State::Active as i32,
        name: "User".into(),
        version: 1,
        is_publisher: true,
        kind: proto::participant_info::Kind::Standard as i32,
        permission: Some(proto::ParticipantPermission {
            can_subscribe: true,
            can_publish: true,
            can_publish_data: true,
            ..Default::default()
        }),
        tracks: vec![proto::TrackInfo {
            sid: USER_TRACK_SID.into(),
            r#type: proto::TrackType::Audio as i32,
            name: "microphone".into(),
            source: proto::TrackSource::Microphone as i32,
            mime_type: "audio/opus".into(),
            mid: String::new(),
            stream: "camera".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    proto::JoinResponse {
        room: Some(proto::Room {
            sid: shared.room_sid.clone(),
            name: shared.options.room_name.clone(),
            empty_timeout: 300,
            departure_timeout: 20,
            creation_time: created,
            creation_time_ms: created * 1000,
            num_participants: others + 2,
            num_publishers: 1,
            ..Default::default()
        }),
        participant: Some(participant.info.clone()),
        other_participants: vec![user],
        server_version: "1.8.0".into(),
        ice_servers: Vec::new(),
        subscriber_primary: true,
        server_region: "local".into(),
        ping_timeout: shared.options.ping_timeout,
        ping_interval: shared.options.ping_interval,
        server_info: Some(server_info()),
        ..Default::default()
    }
}

/// Serves one participant's socket until it closes, is aborted, or the
/// participant leaves.
async fn run(ws: Ws, shared: Arc<Shared>, participant: Arc<Participant>) {
    let p = participant.clone();
    let task = tokio::spawn(async move { serve_socket(ws, shared, p).await });
    participant.attach(task.abort_handle());
    let _ = task.await;
}

async fn serve_socket(mut ws: Ws, shared: Arc<Shared>, p: Arc<Participant>) {
    let mut out = p.out_rx.lock().await;
    loop {
        tokio::select! {
            msg = out.recv() => {
                let Some(msg) = msg else { return };
                let frame = match msg {
                    Out::Signal(m) => WsMessage::Binary(
                        proto::SignalResponse { message: Some(*m) }.encode_to_vec().into(),
                    ),
                    Out::Binary(b) => WsMessage::Binary(b.into()),
                };
                if ws.send(frame).await.is_err() {
                    return;
                }
            }
            frame = ws.next() => {
                let request = match frame {
                    Some(Ok(WsMessage::Binary(b))) => proto::SignalRequest::decode(b.as_ref()).ok(),
                    Some(Ok(WsMessage::Text(t))) => serde_json::from_str::<proto::SignalRequest>(t.as_str()).ok(),
                    Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => continue,
                };
                let Some(message) = request.and_then(|r| r.message) else {
                    shared.count(|c| c.malformed_requests += 1);
                    continue;
                };
                if !handle_request(&shared, &p, message).await {
                    let _ = ws.close(None).await;
                    return;
                }
            }
        }
    }
}

/// Handles one request; false ends the connection.
async fn handle_request(
    shared: &Arc<Shared>,
    p: &Arc<Participant>,
    message: proto::signal_request::Message,
) -> bool {
    use proto::signal_request::Message as Req;
    use proto::signal_response::Message as Resp;
    match message {
        Req::Offer(sd) => {
            shared.count(|c| c.publisher_offers += 1);
            if let Err(why) = p.publisher_offer(sd).await {
                eprintln!("livekit test room: publisher offer: {why}");
            }
        }
        Req::Answer(sd) => {
            shared.count(|c| c.subscriber_answers += 1);
            if let Err(why) = p.subscriber_answer(sd.sdp).await {
                eprintln!("livekit test room: subscriber answer: {why}");
            }
        }
        Req::Trickle(t) => {
            shared.count(|c| c.trickles += 1);
            if let Err(why) = p.trickle(&t).await {
                eprintln!("livekit test room: trickle: {why}");
            }
        }
        Req::AddTrack(req) => {
            if p.claims.video.can_publish == Some(false) {
                eprintln!("livekit test room: add_track without canPublish ignored");
                return true;
            }
            let track = p.add_track(&req);
            shared.with(|s| {
                s.counters.tracks_published += 1;
                s.published.push(track.clone());
            });
            p.send(Resp::TrackPublished(proto::TrackPublishedResponse {
                cid: req.cid,
                track: Some(track),
            }));
        }
        Req::PingReq(ping) => {
            shared.count(|c| c.pings += 1);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            p.send(Resp::PongResp(proto::Pong {
                last_ping_timestamp: ping.timestamp,
                timestamp: now,
            }));
        }
        Req::Ping(t) => {
            shared.count(|c| c.pings += 1);
            p.send(Resp::Pong(t));
        }
        Req::Subscription(sub) if sub.track_sids.iter().any(|t| t == USER_TRACK_SID) => {
            let p = p.clone();
            tokio::spawn(async move {
                if let Err(why) = p.set_user_subscription(sub.subscribe).await {
                    eprintln!("livekit test room: subscription: {why}");
                }
            });
        }
        Req::SyncState(_) => {
            shared.count(|c| c.sync_states += 1);
        }
        Req::Leave(_) => {
            shared.with(|s| {
                s.counters.leaves += 1;
                s.participants.retain(|q| !Arc::ptr_eq(q, p));
            });
            let p = p.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                p.shutdown();
            });
            return false;
        }
        _ => {}
    }
    true
}
