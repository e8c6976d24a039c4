#![cfg(all(feature = "livekit", feature = "server"))]
//! LiveKit's RoomService client (`providers::livekit::rooms`) against an
//! in-process Twirp server bound to 127.0.0.1:0 that plays LiveKit's side as
//! livekit-server does it: its auth middleware (an empty 401 for a header
//! that is not `Bearer`, a token it cannot parse, an unknown key or a
//! signature that does not verify; no header: no grants), the permission
//! checks of each method (`roomCreate` for CreateRoom and DeleteRoom,
//! `roomList` for ListRooms, `roomAdmin` for the request's room for the
//! rest, refused as Twirp `unauthenticated` "permissions denied"), request
//! bodies decoded with `livekit_protocol`'s types, and Twirp JSON errors.
//! Tokens are verified with the SDK's own `TokenVerifier`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use livekit_api::access_token::{Claims, TokenVerifier, VideoGrants};
use livekit_protocol as proto;
use proptest::prelude::*;
use prost::Message;
use voice_backends::ErrorCode;
use voice_backends::config::Secret;
use voice_backends::providers::livekit::rooms::{RoomOptions, RoomService, code_for_twirp};
use voice_backends::providers::livekit::token::{ADMIN_TTL, ApiKeys};

const KEY: &str = "APIrooms";
const SECRET: &str = "rooms-secret-rooms-secret-rooms-secret";

/// One request the fake server received.
#[derive(Clone, Debug)]
struct Call {
    method: String,
    content_type: String,
    /// The verified token's claims (`None`: no Authorization header).
    claims: Option<Claims>,
    body: Vec<u8>,
}

/// An answer the test scripts for every request: status and body, in which
/// `{TOKEN}` is replaced by the bearer token the request carried.
#[derive(Clone, Debug)]
struct Scripted {
    status: u16,
    body: Vec<u8>,
}

#[derive(Default)]
struct Fake {
    rooms: Mutex<BTreeMap<String, proto::Room>>,
    participants: Mutex<BTreeMap<String, Vec<proto::ParticipantInfo>>>,
    data: Mutex<Vec<proto::SendDataRequest>>,
    calls: Mutex<Vec<Call>>,
    /// Requests refused by the auth middleware.
    refused: Mutex<usize>,
    scripted: Mutex<Option<Scripted>>,
    /// Take requests and never answer them.
    hang: Mutex<bool>,
}

struct Server {
    fake: Arc<Fake>,
    addr: SocketAddr,
}

impl Server {
    async fn start() -> Server {
        let fake = Arc::new(Fake::default());
        let app = Router::new()
            .route("/twirp/livekit.RoomService/{method}", post(handle))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Server { fake, addr }
    }

    fn service(&self, secret: &str) -> RoomService {
        let keys = ApiKeys::new(KEY, Secret::new(secret)).unwrap();
        RoomService::new(
            &format!("http://{}", self.addr),
            keys,
            Duration::from_secs(5),
        )
        .unwrap()
    }

    fn calls(&self) -> Vec<Call> {
        self.fake.calls.lock().unwrap().clone()
    }

    fn last(&self) -> Call {
        self.calls().pop().expect("a call arrived")
    }

    fn script(&self, status: u16, body: impl Into<Vec<u8>>) {
        *self.fake.scripted.lock().unwrap() = Some(Scripted {
            status,
            body: body.into(),
        });
    }

    fn add_participant(&self, room: &str, identity: &str) {
        self.fake
            .participants
            .lock()
            .unwrap()
            .entry(room.into())
            .or_default()
            .push(proto::ParticipantInfo {
                identity: identity.into(),
                sid: format!("PA_{identity}"),
                ..Default::default()
            });
    }
}

fn twirp(status: StatusCode, code: &str, msg: &str) -> Response {
    let body = serde_json::json!({"code": code, "msg": msg}).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn permissions_denied() -> Response {
    // livekit-server's twirpAuthError(ErrPermissionDenied).
    twirp(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "permissions denied",
    )
}

fn proto_ok(message: impl Message) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/protobuf")],
        message.encode_to_vec(),
    )
        .into_response()
}

fn decode<M: Message + Default>(body: &[u8]) -> Option<M> {
    M::decode(body).ok()
}

fn malformed() -> Response {
    twirp(
        StatusCode::BAD_REQUEST,
        "malformed",
        "the body is not the method's protobuf message",
    )
}

fn not_found(msg: &str) -> Response {
    twirp(StatusCode::NOT_FOUND, "not_found", msg)
}

/// LiveKit's EnsureAdminPermission: `roomAdmin` for exactly this room.
fn may_admin(claims: &Option<Claims>, room: &str) -> bool {
    claims
        .as_ref()
        .is_some_and(|c| c.video.room_admin && c.video.room == room)
}

async fn handle(
    State(fake): State<Arc<Fake>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    if let Some(scripted) = fake.scripted.lock().unwrap().clone() {
        let token = bearer
            .as_deref()
            .and_then(|b| b.strip_prefix("Bearer "))
            .unwrap_or_default();
        let body = match std::str::from_utf8(&scripted.body) {
            Ok(text) if text.contains("{TOKEN}") => text.replace("{TOKEN}", token).into_bytes(),
            _ => scripted.body,
        };
        return (StatusCode::from_u16(scripted.status).unwrap(), body).into_response();
    }
    if *fake.hang.lock().unwrap() {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }

    // livekit-server's APIKeyAuthMiddleware: failures are a 401 with no body.
    let refuse = || {
        *fake.refused.lock().unwrap() += 1;
        StatusCode::UNAUTHORIZED.into_response()
    };
    let claims = match bearer {
        None => None,
        Some(value) => {
            let Some(token) = value.strip_prefix("Bearer ") else {
                return refuse();
            };
            let Ok(unverified) = Claims::from_unverified(token) else {
                return refuse();
            };
            if unverified.iss != KEY {
                return refuse();
            }
            match TokenVerifier::with_api_key(KEY, SECRET).verify(token) {
                Ok(claims) => Some(claims),
                Err(_) => return refuse(),
            }
        }
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    fake.calls.lock().unwrap().push(Call {
        method: method.clone(),
        content_type: content_type.clone(),
        claims: claims.clone(),
        body: body.to_vec(),
    });
    if content_type != "application/protobuf" {
        return twirp(
            StatusCode::NOT_FOUND,
            "bad_route",
            &format!("unexpected Content-Type: {content_type:?}"),
        );
    }
    let body = body.as_ref();
    match method.as_str() {
        "CreateRoom" => create_room(&fake, &claims, body),
        "DeleteRoom" => delete_room(&fake, &claims, body),
        "ListRooms" => list_rooms(&fake, &claims, body),
        "ListParticipants" => list_participants(&fake, &claims, body),
        "RemoveParticipant" => remove_participant(&fake, &claims, body),
        "SendData" => send_data(&fake, &claims, body),
        other => twirp(
            StatusCode::NOT_FOUND,
            "bad_route",
            &format!("no handler for path \"/twirp/livekit.RoomService/{other}\""),
        ),
    }
}

/// LiveKit's EnsureCreatePermission.
fn may_create(claims: &Option<Claims>) -> bool {
    claims.as_ref().is_some_and(|c| c.video.room_create)
}

/// LiveKit's EnsureListPermission.
fn may_list(claims: &Option<Claims>) -> bool {
    claims.as_ref().is_some_and(|c| c.video.room_list)
}

fn create_room(fake: &Fake, claims: &Option<Claims>, body: &[u8]) -> Response {
    if !may_create(claims) {
        return permissions_denied();
    }
    let Some(req) = decode::<proto::CreateRoomRequest>(body) else {
        return malformed();
    };
    let room = proto::Room {
        sid: format!("RM_{}", req.name),
        name: req.name.clone(),
        empty_timeout: req.empty_timeout,
        departure_timeout: req.departure_timeout,
        max_participants: req.max_participants,
        metadata: req.metadata.clone(),
        creation_time: 1_700_000_000,
        ..Default::default()
    };
    let mut rooms = fake.rooms.lock().unwrap();
    proto_ok(rooms.entry(req.name).or_insert(room).clone())
}

fn delete_room(fake: &Fake, claims: &Option<Claims>, body: &[u8]) -> Response {
    if !may_create(claims) {
        return permissions_denied();
    }
    let Some(req) = decode::<proto::DeleteRoomRequest>(body) else {
        return malformed();
    };
    match fake.rooms.lock().unwrap().remove(&req.room) {
        Some(_) => proto_ok(proto::DeleteRoomResponse {}),
        None => not_found("requested room does not exist"),
    }
}

fn list_rooms(fake: &Fake, claims: &Option<Claims>, body: &[u8]) -> Response {
    if !may_list(claims) {
        return permissions_denied();
    }
    let Some(req) = decode::<proto::ListRoomsRequest>(body) else {
        return malformed();
    };
    let rooms = fake
        .rooms
        .lock()
        .unwrap()
        .values()
        .filter(|r| req.names.is_empty() || req.names.contains(&r.name))
        .cloned()
        .collect();
    proto_ok(proto::ListRoomsResponse { rooms })
}

fn list_participants(fake: &Fake, claims: &Option<Claims>, body: &[u8]) -> Response {
    let Some(req) = decode::<proto::ListParticipantsRequest>(body) else {
        return malformed();
    };
    if !may_admin(claims, &req.room) {
        return permissions_denied();
    }
    let participants = fake
        .participants
        .lock()
        .unwrap()
        .get(&req.room)
        .cloned()
        .unwrap_or_default();
    proto_ok(proto::ListParticipantsResponse { participants })
}

fn remove_participant(fake: &Fake, claims: &Option<Claims>, body: &[u8]) -> Response {
    let Some(req) = decode::<proto::RoomParticipantIdentity>(body) else {
        return malformed();
    };
    if !may_admin(claims, &req.room) {
        return permissions_denied();
    }
    let mut all = fake.participants.lock().unwrap();
    let people = all.entry(req.room).or_default();
    match people.iter().position(|p| p.identity == req.identity) {
        Some(i) => {
            people.remove(i);
            proto_ok(proto::RemoveParticipantResponse {})
        }
        None => not_found("participant does not exist"),
    }
}

fn send_data(fake: &Fake, claims: &Option<Claims>, body: &[u8]) -> Response {
    let Some(req) = decode::<proto::SendDataRequest>(body) else {
        return malformed();
    };
    if !may_admin(claims, &req.room) {
        return permissions_denied();
    }
    if !req.nonce.is_empty() && req.nonce.len() != 16 {
        return twirp(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "nonce should be 16-bytes or not present",
        );
    }
    fake.data.lock().unwrap().push(req);
    proto_ok(proto::SendDataResponse {})
}

fn admin_grants(room: &str) -> VideoGrants {
    VideoGrants {
        room_admin: true,
        room: room.into(),
        ..VideoGrants::default()
    }
}

/// The claims of the last call: a token with exactly `grants`, no identity,
/// valid for [`ADMIN_TTL`].
fn assert_token(call: &Call, grants: VideoGrants) {
    let claims = call.claims.as_ref().expect("the call carried a token");
    assert_eq!(claims.iss, KEY);
    assert_eq!(claims.video, grants, "{}", call.method);
    assert_eq!(claims.sub, "");
    assert_eq!((claims.exp - claims.nbf) as u64, ADMIN_TTL.as_secs());
}

// ---------------------------------------------------------------------------
// Each operation: path, token, body, answer

#[tokio::test]
async fn create_room_sends_the_options_with_a_room_create_token() {
    let server = Server::start().await;
    let svc = server.service(SECRET);
    let options = RoomOptions {
        name: "support-7".into(),
        empty_timeout: Duration::from_secs(120),
        departure_timeout: Duration::from_secs(15),
        max_participants: 3,
        metadata: r#"{"topic":"billing"}"#.into(),
    };
    let room = svc.create_room(&options).await.unwrap();
    assert_eq!(room.name, "support-7");
    assert_eq!(room.sid, "RM_support-7");

    let call = server.last();
    assert_eq!(call.method, "CreateRoom");
    assert_eq!(call.content_type, "application/protobuf");
    assert_token(
        &call,
        VideoGrants {
            room_create: true,
            ..VideoGrants::default()
        },
    );
    let req = proto::CreateRoomRequest::decode(call.body.as_slice()).unwrap();
    assert_eq!(req.name, "support-7");
    assert_eq!(req.empty_timeout, 120);
    assert_eq!(req.departure_timeout, 15);
    assert_eq!(req.max_participants, 3);
    assert_eq!(req.metadata, r#"{"topic":"billing"}"#);
    assert!(server.fake.rooms.lock().unwrap().contains_key("support-7"));
}

#[tokio::test]
async fn list_and_delete_rooms_with_their_own_grants() {
    let server = Server::start().await;
    // A ws:// URL, as LiveKit's URLs are given, is spoken as http://.
    let svc = RoomService::new(
        &format!("ws://{}/", server.addr),
        ApiKeys::new(KEY, Secret::new(SECRET)).unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    for name in ["a", "b", "c"] {
        svc.create_room(&RoomOptions::new(name)).await.unwrap();
    }
    let all = svc.list_rooms(&[]).await.unwrap();
    assert_eq!(
        all.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    let call = server.last();
    assert_eq!(call.method, "ListRooms");
    assert_token(
        &call,
        VideoGrants {
            room_list: true,
            ..VideoGrants::default()
        },
    );
    let some = svc.list_rooms(&["b".into(), "z".into()]).await.unwrap();
    assert_eq!(some.len(), 1);
    let req = proto::ListRoomsRequest::decode(server.last().body.as_slice()).unwrap();
    assert_eq!(req.names, ["b", "z"]);

    svc.delete_room("b").await.unwrap();
    let call = server.last();
    assert_eq!(call.method, "DeleteRoom");
    assert_token(
        &call,
        VideoGrants {
            room_create: true,
            ..VideoGrants::default()
        },
    );
    assert_eq!(
        proto::DeleteRoomRequest::decode(call.body.as_slice())
            .unwrap()
            .room,
        "b"
    );
    assert!(!server.fake.rooms.lock().unwrap().contains_key("b"));

    // Deleting it again: LiveKit's not_found.
    let e = svc.delete_room("b").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::SessionNotFound, "{e}");
    assert!(e.message.contains("requested room does not exist"), "{e}");
    assert!(!e.is_retryable());
}

#[tokio::test]
async fn participants_are_listed_and_removed_with_a_token_for_that_room_only() {
    let server = Server::start().await;
    let svc = server.service(SECRET);
    server.add_participant("room-a", "user-1");
    server.add_participant("room-a", "agent");
    server.add_participant("room-b", "other");

    let people = svc.list_participants("room-a").await.unwrap();
    assert_eq!(
        people
            .iter()
            .map(|p| p.identity.as_str())
            .collect::<Vec<_>>(),
        ["user-1", "agent"]
    );
    let call = server.last();
    assert_eq!(call.method, "ListParticipants");
    assert_token(&call, admin_grants("room-a"));
    assert_eq!(
        proto::ListParticipantsRequest::decode(call.body.as_slice())
            .unwrap()
            .room,
        "room-a"
    );

    svc.remove_participant("room-a", "user-1").await.unwrap();
    let call = server.last();
    assert_eq!(call.method, "RemoveParticipant");
    assert_token(&call, admin_grants("room-a"));
    let req = proto::RoomParticipantIdentity::decode(call.body.as_slice()).unwrap();
    assert_eq!(
        (req.room.as_str(), req.identity.as_str()),
        ("room-a", "user-1")
    );
    assert_eq!(svc.list_participants("room-a").await.unwrap().len(), 1);
    // room-b was not touched, and its token would not have been good for it.
    assert_eq!(svc.list_participants("room-b").await.unwrap().len(), 1);

    let e = svc
        .remove_participant("room-a", "user-1")
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::SessionNotFound, "{e}");
}

#[tokio::test]
async fn send_data_reaches_the_room_on_its_topic() {
    let server = Server::start().await;
    let svc = server.service(SECRET);
    svc.send_data(
        "room-a",
        br#"{"type":"transcript","text":"hi"}"#.to_vec(),
        Some("lk.transcription"),
        &["user-1".into()],
    )
    .await
    .unwrap();
    let call = server.last();
    assert_eq!(call.method, "SendData");
    assert_token(&call, admin_grants("room-a"));
    let sent = server.fake.data.lock().unwrap().pop().unwrap();
    assert_eq!(sent.room, "room-a");
    assert_eq!(sent.data, br#"{"type":"transcript","text":"hi"}"#);
    assert_eq!(sent.topic.as_deref(), Some("lk.transcription"));
    assert_eq!(sent.destination_identities, ["user-1"]);
    assert_eq!(sent.kind, proto::data_packet::Kind::Reliable as i32);
    assert_eq!(sent.nonce.len(), 16);
}

// ---------------------------------------------------------------------------
// Errors

#[tokio::test]
async fn a_wrong_secret_is_authentication_failed_from_livekits_empty_401() {
    let server = Server::start().await;
    let svc = server.service("not-the-secret-not-the-secret");
    let e = svc.create_room(&RoomOptions::new("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthenticationFailed, "{e}");
    assert!(!e.is_retryable());
    assert!(e.message.contains("API key and secret"), "{e}");
    assert_eq!(*server.fake.refused.lock().unwrap(), 1);
    assert!(server.calls().is_empty());
}

/// Each Twirp code as livekit-server sends it (HTTP status per the Twirp
/// spec), and the crate's code it becomes.
#[tokio::test]
async fn twirp_errors_map_to_the_crates_codes() {
    let server = Server::start().await;
    let svc = server.service(SECRET);
    let cases: &[(u16, &str, &str, ErrorCode)] = &[
        (
            401,
            "unauthenticated",
            "invalid token",
            ErrorCode::AuthenticationFailed,
        ),
        (
            401,
            "unauthenticated",
            "permissions denied",
            ErrorCode::AuthorizationFailed,
        ),
        (
            403,
            "permission_denied",
            "no",
            ErrorCode::AuthorizationFailed,
        ),
        (
            404,
            "not_found",
            "requested room does not exist",
            ErrorCode::SessionNotFound,
        ),
        (
            429,
            "resource_exhausted",
            "slow down",
            ErrorCode::RateLimitExceeded,
        ),
        (
            408,
            "deadline_exceeded",
            "late",
            ErrorCode::ConnectionTimeout,
        ),
        (503, "unavailable", "draining", ErrorCode::ConnectionFailed),
        (
            500,
            "internal",
            "could not lock room",
            ErrorCode::ConnectionFailed,
        ),
        (500, "unknown", "?", ErrorCode::ConnectionFailed),
        (409, "aborted", "conflict", ErrorCode::ConnectionFailed),
        (
            400,
            "invalid_argument",
            "name length exceeds limits",
            ErrorCode::InvalidConfig,
        ),
        (400, "malformed", "bad body", ErrorCode::InvalidConfig),
        (404, "bad_route", "no handler", ErrorCode::InvalidConfig),
        (501, "unimplemented", "no", ErrorCode::InvalidConfig),
        (408, "canceled", "gone", ErrorCode::ContextCanceled),
        (
            500,
            "a_code_from_the_future",
            "?",
            ErrorCode::ConnectionFailed,
        ),
    ];
    for &(status, code, msg, want) in cases {
        server.script(
            status,
            serde_json::json!({"code": code, "msg": msg}).to_string(),
        );
        let e = svc.list_rooms(&[]).await.unwrap_err();
        assert_eq!(e.code, want, "{code} {msg}: {e}");
        assert_eq!(code_for_twirp(code, msg), want);
        assert_eq!(
            e.is_retryable(),
            matches!(
                want,
                ErrorCode::RateLimitExceeded
                    | ErrorCode::ConnectionFailed
                    | ErrorCode::ConnectionTimeout
            )
        );
        assert!(e.message.contains(msg), "{e}");
        assert_eq!(e.details.get("twirp_code").map(String::as_str), Some(code));
        assert_eq!(e.op, "livekit.list_rooms");
    }
}

#[tokio::test]
async fn error_pages_that_are_not_twirp_are_connection_failed_and_retryable() {
    let server = Server::start().await;
    let svc = server.service(SECRET);
    for (status, body) in [
        (502, "<html><body>502 Bad Gateway</body></html>"),
        (500, r#"{"error":"not twirp"}"#),
        (503, "   "),
    ] {
        server.script(status, body);
        let e = svc.list_rooms(&[]).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::ConnectionFailed, "{status} {body}: {e}");
        assert!(e.is_retryable());
    }
    // A 200 whose body is not the method's protobuf.
    server.script(200, vec![0xff, 0xff, 0xff]);
    let e = svc.list_rooms(&[]).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::ConnectionFailed, "{e}");
    assert!(e.message.contains("not the protobuf"), "{e}");
}

#[tokio::test]
async fn a_message_echoing_the_token_does_not_repeat_it() {
    let server = Server::start().await;
    let svc = server.service(SECRET);
    // Older livekit-servers answered "invalid token: <token>, error: ...".
    server.script(
        401,
        r#"{"code":"unauthenticated","msg":"invalid token: {TOKEN}, error: go-jose/go-jose: error in cryptographic primitive"}"#,
    );
    let e = svc.list_rooms(&[]).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthenticationFailed);
    assert!(e.message.contains("invalid token"), "{e}");
    assert!(!format!("{e} {e:?}").contains("eyJ"), "{e}");
}

#[tokio::test]
async fn an_unanswered_call_times_out_and_a_closed_port_fails_to_connect() {
    let server = Server::start().await;
    *server.fake.hang.lock().unwrap() = true;
    let svc = RoomService::new(
        &format!("http://{}", server.addr),
        ApiKeys::new(KEY, Secret::new(SECRET)).unwrap(),
        Duration::from_millis(300),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let e = svc.list_rooms(&[]).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::ConnectionTimeout, "{e}");
    assert!(e.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(5));

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let svc = RoomService::new(
        &format!("http://{closed}"),
        ApiKeys::new(KEY, Secret::new(SECRET)).unwrap(),
        Duration::from_secs(2),
    )
    .unwrap();
    let e = svc.list_rooms(&[]).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::ConnectionFailed, "{e}");
    assert!(e.is_retryable());
}

#[test]
fn bad_urls_names_and_options_are_invalid_config() {
    let keys = || ApiKeys::new(KEY, Secret::new(SECRET)).unwrap();
    let second = Duration::from_secs(1);
    for url in [
        "",
        "livekit.example.com",
        "ftp://livekit.example.com",
        "wss://user:pw@livekit.example.com",
        "wss://livekit.example.com/rtc",
        "wss://livekit.example.com/?token=abc",
        "http://",
    ] {
        let e = RoomService::new(url, keys(), second).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig, "{url:?}");
        assert!(!e.message.contains("pw@"), "{e}");
    }
    let e = RoomService::new("wss://livekit.example.com", keys(), Duration::ZERO).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidConfig);
    let svc = RoomService::new("wss://livekit.example.com/", keys(), second).unwrap();
    assert_eq!(svc.url(), "wss://livekit.example.com");
    assert!(!format!("{svc:?}").contains(SECRET));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Refused before any request is made (the host does not exist).
        let too_long = RoomOptions {
            empty_timeout: Duration::from_secs(u64::from(u32::MAX) + 1),
            ..RoomOptions::new("a")
        };
        for e in [
            svc.create_room(&RoomOptions::new("")).await.unwrap_err(),
            svc.create_room(&too_long).await.unwrap_err(),
            svc.delete_room("").await.unwrap_err(),
            svc.list_participants("").await.unwrap_err(),
            svc.remove_participant("a", "").await.unwrap_err(),
            svc.send_data("", vec![], None, &[]).await.unwrap_err(),
        ] {
            assert_eq!(e.code, ErrorCode::InvalidConfig, "{e}");
        }
    });
}

// ---------------------------------------------------------------------------
// Arbitrary answers never panic and never show the token

fn any_answer() -> impl Strategy<Value = (u16, Vec<u8>)> {
    let codes = prop_oneof![
        Just("unauthenticated".to_owned()),
        Just("not_found".to_owned()),
        Just("resource_exhausted".to_owned()),
        Just("internal".to_owned()),
        ".{0,40}",
    ];
    let twirp_body = (codes, ".{0,300}", any::<bool>()).prop_map(|(code, msg, echo)| {
        let msg = if echo {
            format!("{msg} {{TOKEN}}")
        } else {
            msg
        };
        serde_json::json!({"code": code, "msg": msg})
            .to_string()
            .into_bytes()
    });
    let bytes = prop::collection::vec(any::<u8>(), 0..512);
    let echo = Just(b"invalid token: {TOKEN}".to_vec());
    (
        prop_oneof![300u16..=599, Just(401u16), Just(200u16)],
        prop_oneof![twirp_body, bytes, echo],
    )
}

#[test]
fn arbitrary_answers_map_to_a_code_without_panicking_or_showing_the_token() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(Server::start());
    let svc = server.service(SECRET);
    let config = ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |((status, body) in any_answer())| {
        server.script(status, body);
        let result = rt.block_on(svc.list_rooms(&[]));
        match result {
            // A 200 whose bytes happen to decode as ListRoomsResponse.
            Ok(_) => prop_assert_eq!(status, 200),
            Err(e) => {
                prop_assert!(ErrorCode::ALL.contains(&e.code));
                prop_assert!(status != 200 || e.code == ErrorCode::ConnectionFailed);
                let shown = format!("{e} {e:?}");
                prop_assert!(!shown.contains("eyJ"), "{}", shown);
                prop_assert!(!shown.contains(SECRET));
                prop_assert!(e.message.chars().count() < 1000);
            }
        }
    });
}
