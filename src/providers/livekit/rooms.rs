//! LiveKit's RoomService: creating, listing and deleting rooms, listing and
//! removing participants, and sending data to a room.
//!
//! RoomService is Twirp: `POST /twirp/livekit.RoomService/<Method>` with a
//! protobuf body and `Authorization: Bearer <token>`; errors come back as
//! JSON `{"code", "msg"}`. The calls go through LiveKit's own client,
//! [`livekit_api::services::room::RoomClient`], each with a fresh admin token
//! from [`ApiKeys::admin_token`] scoped to what that method needs
//! ([`AdminScope`]) and valid for [`ADMIN_TTL`].
//!
//! # Errors
//!
//! Every failure is a [`BackendError`] whose code is chosen in one place,
//! [`code_for_twirp`] (for Twirp errors) and `service_error` (for the rest):
//!
//! | what LiveKit (or the network) answered | code | retryable |
//! |---|---|---|
//! | `unauthenticated` (401), or a non-200 answer with an empty body (LiveKit's auth check answers a wrong key, a wrong secret or an expired token this way) | `authentication_failed` | no |
//! | `unauthenticated` with LiveKit's message `permissions denied` (the token's grants do not cover the call), `permission_denied` (403) | `authorization_failed` | no |
//! | `not_found` (404: no such room or participant) | `session_not_found` | no |
//! | `resource_exhausted` (429) | `rate_limit_exceeded` | yes |
//! | `deadline_exceeded` (408), or no answer within the request timeout | `connection_timeout` | yes |
//! | `unavailable`, `internal`, `unknown`, `dataloss` (5xx), `aborted`, an unknown code, a non-Twirp error page, a connection refused or lost, an answer that is not the method's protobuf | `connection_failed` | yes |
//! | `invalid_argument`, `malformed`, `out_of_range`, `failed_precondition`, `already_exists` (4xx), `bad_route` (404: the URL is not a LiveKit server), `unimplemented` (501: the server does not have the method) | `invalid_config` | no |
//! | `canceled` | `context_canceled` | no |
//!
//! Messages quote LiveKit's `msg` cut by [`shown_in_error`] (so a token it
//! echoes is not repeated) and never the token sent.

use std::time::Duration;

use livekit_api::services::room::{CreateRoomOptions, RoomClient, SendDataOptions};
use livekit_api::services::{ServerError, ServiceError};
use livekit_protocol as proto;

use super::token::{ADMIN_TTL, AdminScope, ApiKeys};
use crate::config::shown_in_error;
use crate::error::{BackendError, ErrorCode, Result};

/// The longest Twirp `msg` an error message quotes, in characters.
const MAX_QUOTED: usize = 200;

/// What [`RoomService::create_room`] creates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoomOptions {
    /// The room's name (unique in the project). Required.
    pub name: String,
    /// How long the room stays open with nobody in it, in whole seconds
    /// (zero: the server's default, 5 minutes on a stock LiveKit).
    pub empty_timeout: Duration,
    /// How long the room stays open after the last participant left, in
    /// whole seconds (zero: the server's default).
    pub departure_timeout: Duration,
    /// The most participants the room admits (zero: no limit).
    pub max_participants: u32,
    /// The room's metadata, visible to every participant.
    pub metadata: String,
}

impl RoomOptions {
    /// A room with this name and the server's defaults.
    pub fn new(name: impl Into<String>) -> Self {
        RoomOptions {
            name: name.into(),
            ..RoomOptions::default()
        }
    }
}

/// A RoomService client for one LiveKit server.
///
/// Cheap to clone; `Debug` shows the server URL and the API key, never the
/// secret.
#[derive(Clone, Debug)]
pub struct RoomService {
    url: String,
    keys: ApiKeys,
    timeout: Duration,
}

impl RoomService {
    /// A client for the server at `url` (`ws://`, `wss://`, `http://` or
    /// `https://`, as LiveKit's URLs are given; `ws` is spoken as `http`),
    /// authenticating with `keys`, giving each request `timeout` to be
    /// answered.
    ///
    /// # Errors
    ///
    /// `invalid_config` for a URL that is not one of those schemes with a
    /// host, or that has a user name, password, path, query or fragment
    /// (RoomService lives at the root), or a zero timeout.
    pub fn new(url: &str, keys: ApiKeys, timeout: Duration) -> Result<Self> {
        const OP: &str = "livekit.room_service";
        let bad = |why: &str| {
            BackendError::invalid_config(
                OP,
                format!("the LiveKit URL {:?} {why}", shown_in_error(url)),
            )
            .with_detail("url", why.to_owned())
        };
        let parsed = url::Url::parse(url).map_err(|_| bad("is not a URL"))?;
        if !matches!(parsed.scheme(), "ws" | "wss" | "http" | "https") {
            return Err(bad("must start with ws://, wss://, http:// or https://"));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(bad("has no host"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(bad("must not carry a user name or password"));
        }
        if !matches!(parsed.path(), "" | "/")
            || parsed.query().is_some()
            || parsed.fragment().is_some()
        {
            return Err(bad(
                "must be the server's root (no path, query or fragment): RoomService is at /twirp",
            ));
        }
        if timeout.is_zero() {
            return Err(BackendError::invalid_config(
                OP,
                "the RoomService request timeout is zero",
            )
            .with_detail("timeout", "must be more than zero"));
        }
        let mut base = parsed;
        base.set_path("");
        Ok(RoomService {
            url: base.as_str().trim_end_matches('/').to_owned(),
            keys,
            timeout,
        })
    }

    /// The server's URL as requests use it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `CreateRoom`: creates the room (LiveKit returns the existing room when
    /// one of that name is open). Token: `roomCreate`.
    ///
    /// # Errors
    ///
    /// `invalid_config` for an empty name or a timeout past `u32::MAX`
    /// seconds; otherwise as in the [module docs](self).
    pub async fn create_room(&self, room: &RoomOptions) -> Result<proto::Room> {
        const OP: &str = "livekit.create_room";
        check_name(OP, "room", &room.name)?;
        let options = CreateRoomOptions {
            empty_timeout: seconds(OP, "empty_timeout", room.empty_timeout)?,
            departure_timeout: seconds(OP, "departure_timeout", room.departure_timeout)?,
            max_participants: room.max_participants,
            metadata: room.metadata.clone(),
            ..CreateRoomOptions::default()
        };
        let client = self.client(OP, &AdminScope::CreateRooms)?;
        client
            .create_room(&room.name, options)
            .await
            .map_err(|e| service_error(OP, "CreateRoom", e))
    }

    /// `DeleteRoom`: closes the room, disconnecting everyone in it. Token:
    /// `roomCreate` (LiveKit checks that grant for deleting).
    ///
    /// # Errors
    ///
    /// `session_not_found` when no such room is open; otherwise as in the
    /// [module docs](self).
    pub async fn delete_room(&self, name: &str) -> Result<()> {
        const OP: &str = "livekit.delete_room";
        check_name(OP, "room", name)?;
        let client = self.client(OP, &AdminScope::CreateRooms)?;
        client
            .delete_room(name)
            .await
            .map_err(|e| service_error(OP, "DeleteRoom", e))
    }

    /// `ListRooms`: the open rooms, only those named when `names` is not
    /// empty. Token: `roomList`.
    ///
    /// # Errors
    ///
    /// As in the [module docs](self).
    pub async fn list_rooms(&self, names: &[String]) -> Result<Vec<proto::Room>> {
        const OP: &str = "livekit.list_rooms";
        let client = self.client(OP, &AdminScope::ListRooms)?;
        client
            .list_rooms(names.to_vec())
            .await
            .map_err(|e| service_error(OP, "ListRooms", e))
    }

    /// `ListParticipants`: who is in the room. Token: `roomAdmin` for this
    /// room only.
    ///
    /// # Errors
    ///
    /// As in the [module docs](self).
    pub async fn list_participants(&self, room: &str) -> Result<Vec<proto::ParticipantInfo>> {
        const OP: &str = "livekit.list_participants";
        check_name(OP, "room", room)?;
        let client = self.client(OP, &AdminScope::Room(room.to_owned()))?;
        client
            .list_participants(room)
            .await
            .map_err(|e| service_error(OP, "ListParticipants", e))
    }

    /// `RemoveParticipant`: disconnects `identity` from the room. Token:
    /// `roomAdmin` for this room only.
    ///
    /// # Errors
    ///
    /// `session_not_found` when no such participant is in the room;
    /// otherwise as in the [module docs](self).
    pub async fn remove_participant(&self, room: &str, identity: &str) -> Result<()> {
        const OP: &str = "livekit.remove_participant";
        check_name(OP, "room", room)?;
        check_name(OP, "identity", identity)?;
        let client = self.client(OP, &AdminScope::Room(room.to_owned()))?;
        client
            .remove_participant(room, identity)
            .await
            .map_err(|e| service_error(OP, "RemoveParticipant", e))
    }

    /// `SendData`: a reliable data packet to the room, on `topic` if given,
    /// to the participants named in `to` (everyone when empty). Token:
    /// `roomAdmin` for this room only.
    ///
    /// # Errors
    ///
    /// As in the [module docs](self).
    pub async fn send_data(
        &self,
        room: &str,
        data: Vec<u8>,
        topic: Option<&str>,
        to: &[String],
    ) -> Result<()> {
        const OP: &str = "livekit.send_data";
        check_name(OP, "room", room)?;
        let options = SendDataOptions {
            kind: proto::data_packet::Kind::Reliable,
            destination_identities: to.to_vec(),
            topic: topic.map(str::to_owned),
            ..SendDataOptions::default()
        };
        let client = self.client(OP, &AdminScope::Room(room.to_owned()))?;
        client
            .send_data(room, data, options)
            .await
            .map_err(|e| service_error(OP, "SendData", e))
    }

    /// LiveKit's client for one call, carrying a token for `scope`.
    fn client(&self, op: &'static str, scope: &AdminScope) -> Result<RoomClient> {
        let token = self
            .keys
            .admin_token(scope, ADMIN_TTL)
            .map_err(|e| e.with_op(op))?;
        Ok(RoomClient::with_token(&self.url, token.expose()).with_request_timeout(self.timeout))
    }
}

fn check_name(op: &'static str, what: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(
            BackendError::invalid_config(op, format!("the {what} name is empty"))
                .with_detail(what, "must not be empty"),
        );
    }
    Ok(())
}

/// `d` in whole seconds as RoomService's `uint32` fields take it.
fn seconds(op: &'static str, field: &'static str, d: Duration) -> Result<u32> {
    u32::try_from(d.as_secs()).map_err(|_| {
        BackendError::invalid_config(op, format!("{field} is longer than u32::MAX seconds"))
            .with_detail(field, "at most 4294967295 s")
    })
}

/// The crate's code for a Twirp error `code` (and LiveKit's `msg`, which
/// tells a grant that falls short from a token that is refused): the table
/// in the [module docs](self).
pub fn code_for_twirp(code: &str, msg: &str) -> ErrorCode {
    match code {
        "unauthenticated" if msg.trim().eq_ignore_ascii_case("permissions denied") => {
            ErrorCode::AuthorizationFailed
        }
        "unauthenticated" => ErrorCode::AuthenticationFailed,
        "permission_denied" => ErrorCode::AuthorizationFailed,
        "not_found" => ErrorCode::SessionNotFound,
        "resource_exhausted" => ErrorCode::RateLimitExceeded,
        "deadline_exceeded" => ErrorCode::ConnectionTimeout,
        "canceled" => ErrorCode::ContextCanceled,
        "invalid_argument"
        | "malformed"
        | "out_of_range"
        | "failed_precondition"
        | "already_exists"
        | "bad_route"
        | "unimplemented" => ErrorCode::InvalidConfig,
        // unavailable, internal, unknown, dataloss, aborted and codes this
        // table does not know: the server's trouble, worth another try.
        _ => ErrorCode::ConnectionFailed,
    }
}

/// `text` cut for an error message: secret-looking parts and anything past
/// [`MAX_QUOTED`] characters left out.
fn quote(text: &str) -> String {
    let shown = shown_in_error(text);
    match shown.char_indices().nth(MAX_QUOTED) {
        Some((at, _)) => format!("{:?}…", &shown[..at]),
        None => format!("{shown:?}"),
    }
}

/// One failed call as a [`BackendError`]: the table in the
/// [module docs](self).
fn service_error(op: &'static str, method: &str, e: ServiceError) -> BackendError {
    let call = format!("RoomService.{method}");
    match e {
        ServiceError::Twirp(ServerError::Twirp(twirp)) => {
            let code = code_for_twirp(&twirp.code, &twirp.msg);
            let hint = match code {
                ErrorCode::AuthenticationFailed => {
                    ": check the API key and secret, and this machine's clock"
                }
                ErrorCode::AuthorizationFailed => ": the token's grants do not cover the call",
                ErrorCode::InvalidConfig if twirp.code == "bad_route" => {
                    ": is the URL a LiveKit server?"
                }
                _ => "",
            };
            BackendError::new(
                op,
                code,
                format!(
                    "LiveKit refused {call}: {} {}{hint}",
                    quote(&twirp.code),
                    quote(&twirp.msg)
                ),
            )
            .with_detail("twirp_code", shown_in_error(&twirp.code).into_owned())
        }
        ServiceError::Twirp(ServerError::Request(err)) => {
            if err.is_timeout() {
                BackendError::new(
                    op,
                    ErrorCode::ConnectionTimeout,
                    format!("LiveKit did not answer {call} in time"),
                )
            } else if err.is_connect() {
                BackendError::new(
                    op,
                    ErrorCode::ConnectionFailed,
                    format!("could not connect to LiveKit for {call}"),
                )
                .with_source(err)
            } else if err.is_decode() && empty_json(&err) {
                BackendError::new(
                    op,
                    ErrorCode::AuthenticationFailed,
                    format!(
                        "LiveKit refused {call} with an empty error answer, as its auth check \
                         answers a wrong API key or secret, a malformed or an expired token: \
                         check the API key and secret, and this machine's clock"
                    ),
                )
            } else if err.is_decode() {
                BackendError::new(
                    op,
                    ErrorCode::ConnectionFailed,
                    format!(
                        "{call} failed with an answer that is not a Twirp error (a proxy's page?)"
                    ),
                )
            } else {
                BackendError::new(
                    op,
                    ErrorCode::ConnectionFailed,
                    format!("{call} failed on the way to or from LiveKit"),
                )
                .with_source(err)
            }
        }
        ServiceError::Twirp(ServerError::Prost(err)) => BackendError::new(
            op,
            ErrorCode::ConnectionFailed,
            format!("LiveKit's answer to {call} is not the protobuf message it should be"),
        )
        .with_source(err),
        ServiceError::Twirp(ServerError::Url(_)) => BackendError::invalid_config(
            op,
            format!("the LiveKit URL could not be used for {call}"),
        ),
        ServiceError::AccessToken(_) | ServiceError::Env(_) => {
            BackendError::invalid_config(op, format!("no token could be made for {call}"))
        }
    }
}

/// Whether a decode error came from an empty body: JSON ended before its
/// first character.
fn empty_json(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(json) = e.downcast_ref::<serde_json::Error>() {
            return json.is_eof() && json.line() == 1 && json.column() == 0;
        }
        source = e.source();
    }
    false
}
