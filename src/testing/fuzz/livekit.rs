//! The LiveKit targets: `livekit_signal`, what the server sends on the
//! signal WebSocket (`providers::livekit::signal::decode_response`), and
//! `livekit_agent_message`, what it sends a worker on `/agent`
//! (`providers::livekit::worker::decode_server_message`).

use livekit_protocol as proto;
use prost::Message as _;
use proto::signal_response::Message as Response;

use super::targets::Outcome;
use crate::providers::livekit::signal::decode_response;
use crate::providers::livekit::worker::{JobInfo, ServerEvent, decode_server_message};

/// One binary message of the signal socket. A refusal says why; a decoded
/// message encodes to as many bytes and decodes the same once written back
/// (a float that is NaN is equal to nothing, so with one only its size is
/// compared).
pub fn livekit_signal(data: &[u8]) -> Outcome {
    let message = match decode_response(data) {
        Ok(Some(message)) => message,
        Ok(None) => return Outcome::Accepted("empty"),
        Err(why) => {
            assert!(!why.trim().is_empty(), "an empty refusal");
            return Outcome::Rejected(why);
        }
    };
    let again = proto::SignalResponse {
        message: Some(message.clone()),
    }
    .encode_to_vec();
    let same = decode_response(&again)
        .unwrap_or_else(|e| panic!("a re-encoded {message:?} does not decode: {e}"))
        .expect("a re-encoded message has its message");
    assert_eq!(same.encoded_len(), message.encoded_len(), "{message:?}");
    if !format!("{message:?}").contains("NaN") {
        assert_eq!(same, message);
    }
    Outcome::Accepted(signal_kind(&message))
}

fn signal_kind(message: &Response) -> &'static str {
    match message {
        Response::Join(_) => "join",
        Response::Answer(_) => "answer",
        Response::Offer(_) => "offer",
        Response::Trickle(_) => "trickle",
        Response::Update(_) => "update",
        Response::TrackPublished(_) => "track_published",
        Response::Leave(_) => "leave",
        Response::Reconnect(_) => "reconnect",
        Response::PongResp(_) => "pong_resp",
        Response::Pong(_) => "pong",
        Response::RefreshToken(_) => "refresh_token",
        _ => "other",
    }
}

/// Seeds: the server's messages a client handles, and garbage.
pub(super) fn livekit_signal_seeds() -> Vec<Vec<u8>> {
    let participant = proto::ParticipantInfo {
        sid: "PA_agent".into(),
        identity: "agent".into(),
        ..Default::default()
    };
    let join = proto::JoinResponse {
        room: Some(proto::Room {
            sid: "RM_1".into(),
            name: "room".into(),
            ..Default::default()
        }),
        participant: Some(participant.clone()),
        other_participants: vec![proto::ParticipantInfo {
            identity: "alice".into(),
            ..participant
        }],
        ice_servers: vec![proto::IceServer {
            urls: vec!["stun:stun.example.com:3478".into()],
            ..Default::default()
        }],
        ping_interval: 5,
        ping_timeout: 15,
        ..Default::default()
    };
    let sdp = |kind: &str| proto::SessionDescription {
        r#type: kind.into(),
        sdp:
            "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
                .into(),
        id: 1,
        mid_to_track_id: [("0".to_owned(), "TR_a".to_owned())].into(),
    };
    let messages = [
        Response::Join(join),
        Response::Offer(sdp("offer")),
        Response::Answer(sdp("answer")),
        Response::Trickle(proto::TrickleRequest {
            candidate_init: r#"{"candidate":"candidate:1 1 udp 2130706431 10.0.0.1 50000 typ host","sdpMid":"0","sdpMLineIndex":0}"#.into(),
            target: proto::SignalTarget::Subscriber as i32,
            r#final: false,
        }),
        Response::PongResp(proto::Pong {
            last_ping_timestamp: 1_700_000_000_000,
            timestamp: 1_700_000_000_005,
        }),
        Response::Leave(proto::LeaveRequest {
            can_reconnect: true,
            reason: proto::DisconnectReason::ServerShutdown as i32,
            ..Default::default()
        }),
    ];
    let mut seeds: Vec<Vec<u8>> = messages
        .into_iter()
        .map(|m| proto::SignalResponse { message: Some(m) }.encode_to_vec())
        .collect();
    seeds.extend([
        Vec::new(),
        b"\x0a\xff\xff\xff\xff\x0f".to_vec(),
        b"\x0a\x05\x0a\x03".to_vec(),
        b"{\"join\":{}}".to_vec(),
    ]);
    seeds
}

/// One binary message of the `/agent` socket. A refusal says why; an event
/// decodes the same once written back as the server writes it.
pub fn livekit_agent_message(data: &[u8]) -> Outcome {
    use proto::server_message::Message as M;
    let event = match decode_server_message(data) {
        Ok(event) => event,
        Err(why) => {
            assert!(!why.trim().is_empty(), "an empty refusal");
            return Outcome::Rejected(why);
        }
    };
    let (kind, again) = match &event {
        ServerEvent::Registered { worker_id } => (
            "registered",
            M::Register(proto::RegisterWorkerResponse {
                worker_id: worker_id.clone(),
                ..Default::default()
            }),
        ),
        ServerEvent::Offer { job, resuming } => (
            "offer",
            M::Availability(proto::AvailabilityRequest {
                job: Some(job_of(job)),
                resuming: *resuming,
            }),
        ),
        ServerEvent::Assigned { job, token, url } => (
            "assigned",
            M::Assignment(proto::JobAssignment {
                job: Some(job_of(job)),
                url: url.clone(),
                token: token.expose().to_owned(),
            }),
        ),
        ServerEvent::Terminated { job_id } => (
            "terminated",
            M::Termination(proto::JobTermination {
                job_id: job_id.clone(),
            }),
        ),
        ServerEvent::Pong { last_timestamp } => (
            "pong",
            M::Pong(proto::WorkerPong {
                last_timestamp: *last_timestamp,
                timestamp: 0,
            }),
        ),
        ServerEvent::GoAway { reason } => (
            "go_away",
            M::GoAway(proto::agent_http::GoAway {
                reason: reason.clone(),
            }),
        ),
    };
    let bytes = proto::ServerMessage {
        message: Some(again),
    }
    .encode_to_vec();
    let same = decode_server_message(&bytes)
        .unwrap_or_else(|e| panic!("the re-encoded {event:?} does not decode: {e}"));
    assert_eq!(flat(&same), flat(&event));
    Outcome::Accepted(kind)
}

fn job_of(job: &JobInfo) -> proto::Job {
    proto::Job {
        id: job.id.clone(),
        dispatch_id: job.dispatch_id.clone(),
        room: Some(proto::Room {
            name: job.room.clone(),
            ..Default::default()
        }),
        participant: job
            .participant
            .as_ref()
            .map(|identity| proto::ParticipantInfo {
                identity: identity.clone(),
                ..Default::default()
            }),
        metadata: job.metadata.clone(),
        agent_name: job.agent_name.clone(),
        ..Default::default()
    }
}

/// An event as comparable values, the token exposed.
fn flat(event: &ServerEvent) -> (Option<JobInfo>, Vec<String>) {
    match event {
        ServerEvent::Registered { worker_id } => {
            (None, vec!["registered".into(), worker_id.clone()])
        }
        ServerEvent::Offer { job, resuming } => (
            Some(job.clone()),
            vec!["offer".into(), resuming.to_string()],
        ),
        ServerEvent::Assigned { job, token, url } => (
            Some(job.clone()),
            vec![
                "assigned".into(),
                token.expose().to_owned(),
                format!("{url:?}"),
            ],
        ),
        ServerEvent::Terminated { job_id } => (None, vec!["terminated".into(), job_id.clone()]),
        ServerEvent::Pong { last_timestamp } => {
            (None, vec!["pong".into(), last_timestamp.to_string()])
        }
        ServerEvent::GoAway { reason } => (None, vec!["go_away".into(), reason.clone()]),
    }
}

/// Seeds: each message of the server, and a few broken ones.
pub(super) fn livekit_agent_message_seeds() -> Vec<Vec<u8>> {
    use proto::server_message::Message as M;
    let job = proto::Job {
        id: "AJ_1".into(),
        dispatch_id: "AD_1".into(),
        r#type: proto::JobType::JtRoom as i32,
        room: Some(proto::Room {
            sid: "RM_1".into(),
            name: "room".into(),
            ..Default::default()
        }),
        participant: Some(proto::ParticipantInfo {
            identity: "alice".into(),
            ..Default::default()
        }),
        metadata: "{\"k\":1}".into(),
        agent_name: "agent".into(),
        ..Default::default()
    };
    let messages = [
        M::Register(proto::RegisterWorkerResponse {
            worker_id: "AW_1".into(),
            server_info: Some(proto::ServerInfo {
                version: "1.9.0".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        M::Availability(proto::AvailabilityRequest {
            job: Some(job.clone()),
            resuming: false,
        }),
        M::Assignment(proto::JobAssignment {
            job: Some(job.clone()),
            url: Some("wss://lk.example.com".into()),
            token: "eyJhbGciOiJIUzI1NiJ9.e30.x".into(),
        }),
        M::Termination(proto::JobTermination {
            job_id: "AJ_1".into(),
        }),
        M::Pong(proto::WorkerPong {
            last_timestamp: 1_700_000_000_000,
            timestamp: 1_700_000_000_004,
        }),
        M::GoAway(proto::agent_http::GoAway {
            reason: "draining".into(),
        }),
        M::Assignment(proto::JobAssignment {
            job: Some(job),
            url: Some("ftp://nowhere".into()),
            token: String::new(),
        }),
    ];
    let mut seeds: Vec<Vec<u8>> = messages
        .into_iter()
        .map(|m| proto::ServerMessage { message: Some(m) }.encode_to_vec())
        .collect();
    seeds.extend([Vec::new(), b"\x0a\x00".to_vec(), b"\x12\x02\x0a".to_vec()]);
    seeds
}

/// Protobuf keys (field 1..7, each wire type used) and lengths.
#[rustfmt::skip]
pub(super) const LIVEKIT_TOKENS: &[&str] = &[
    "\x08", "\x0a", "\x10", "\x12", "\x18", "\x1a", "\x20", "\x22", "\x28", "\x2a", "\x32", "\x3a",
    "\x42", "\x4a", "\x52", "\x5a", "\x62", "\x6a", "\x72", "\x7a", "\x0d", "\x11", "\x15",
    "\x00", "\x01", "\x7f", "room", "AJ_1", "wss://", "http://", "offer", "answer",
];

/// Length-delimited field 1 (and 2) opened and left for the mutator to fill.
pub(super) const PROTO_NESTS: &[(&str, &str)] =
    &[("\x0a\x7f", ""), ("\x12\x7f", ""), ("\x1a\x7f", "")];
