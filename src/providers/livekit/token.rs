//! LiveKit access tokens: minting the user's, the agent's and the admin
//! tokens the backend needs, and verifying tokens, with LiveKit's own
//! [`livekit_api::access_token`] types.
//!
//! A LiveKit access token is an HS256 JWT signed with the project's API
//! secret: `iss` is the API key, `sub` the participant's identity, `nbf` and
//! `exp` its validity, `name`, `kind`, `metadata` and `attributes` describe
//! the participant, and the `video` grant says what the bearer may do
//! (`roomJoin` + `room`, `canPublish`, `canSubscribe`, `canPublishData`,
//! `agent`, `hidden`, `roomCreate`, `roomList`, `roomAdmin`, ...).
//!
//! Every token is least-privilege:
//!
//! | token | grant |
//! |---|---|
//! | [`ApiKeys::user_token`] | `roomJoin` to one room, `canPublish`, `canSubscribe`, `canPublishData`; kind `standard`; nothing else (no admin, no other room, no metadata updates) |
//! | [`ApiKeys::agent_token`] | the same for the agent's room, plus `agent: true`, kind `agent`, `canUpdateOwnMetadata` (for its `lk.agent.state` attribute), optionally `hidden` |
//! | [`ApiKeys::admin_token`] | one [`AdminScope`]: `roomCreate` (create and delete rooms), `roomList`, or `roomAdmin` scoped to one room; no identity, no `roomJoin` |
//!
//! Keys and tokens never show: the secret is a [`Secret`], minted tokens are
//! returned as [`Secret`]s, and no error message quotes a token.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use livekit_api::access_token::{
    AccessToken, AccessTokenError, Claims, TokenVerifier, VideoGrants,
};

use crate::config::{Secret, shown_in_error};
use crate::error::{BackendError, ErrorCode, Result};

/// The `kind` claim of a token for an ordinary participant (LiveKit's
/// `ParticipantInfo.Kind` `STANDARD`).
pub const KIND_STANDARD: &str = "standard";

/// The `kind` claim of the agent's token (LiveKit's `ParticipantInfo.Kind`
/// `AGENT`).
pub const KIND_AGENT: &str = "agent";

/// How long a user's join token stays valid by default. A token is checked
/// when the participant connects; LiveKit refreshes the token of a connected
/// participant itself, so this only needs to cover the time between minting
/// and joining.
pub const DEFAULT_USER_TTL: Duration = Duration::from_secs(10 * 60);

/// How long the agent's join token stays valid by default. Mint a fresh one
/// for every connection attempt (it is cheap) rather than keeping one.
pub const DEFAULT_AGENT_TTL: Duration = Duration::from_secs(10 * 60);

/// How long an admin token for one RoomService call stays valid: long enough
/// for the request to arrive on a server whose clock is a little behind.
pub const ADMIN_TTL: Duration = Duration::from_secs(5 * 60);

/// The longest validity [`ApiKeys`] mints a token with.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// The clock skew LiveKit's verifiers accept on `nbf` and `exp` (the Go
/// server's and the Rust SDK's: one minute); [`ApiKeys::verify`] accepts the
/// same.
pub const LEEWAY: Duration = Duration::from_secs(60);

/// What an admin token is good for: one of the permission checks of LiveKit's
/// RoomService.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminScope {
    /// `roomCreate`: `CreateRoom` and `DeleteRoom` (LiveKit checks the same
    /// grant for both), on any room.
    CreateRooms,
    /// `roomList`: `ListRooms`.
    ListRooms,
    /// `roomAdmin` scoped to this room: `ListParticipants`, `GetParticipant`,
    /// `RemoveParticipant`, `SendData`, `UpdateRoomMetadata`, ... on this
    /// room only.
    Room(String),
}

/// Who a join token is for: the claims that describe the participant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Participant {
    /// `sub`: the participant's identity, unique in the room. Required.
    pub identity: String,
    /// `name`: the display name (empty: none).
    pub name: String,
    /// `metadata`: free-form text other participants see (empty: none).
    pub metadata: String,
    /// `attributes`: key/value pairs other participants see.
    pub attributes: BTreeMap<String, String>,
}

impl Participant {
    /// A participant with this identity and nothing else.
    pub fn new(identity: impl Into<String>) -> Self {
        Participant {
            identity: identity.into(),
            ..Participant::default()
        }
    }

    /// Sets the display name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, metadata: impl Into<String>) -> Self {
        self.metadata = metadata.into();
        self
    }

    /// Adds one attribute.
    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }
}

/// A LiveKit project's API key and secret: mints and verifies its access
/// tokens.
///
/// `Debug` shows the key (it is an identifier, sent in every token's `iss`)
/// and never the secret.
#[derive(Clone)]
pub struct ApiKeys {
    key: String,
    secret: Secret,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("key", &self.key)
            .field("secret", &self.secret)
            .finish()
    }
}

impl ApiKeys {
    /// Checks the key material and keeps it.
    ///
    /// # Errors
    ///
    /// `invalid_config` when the key or the secret is empty, has white space
    /// at either end, or the secret is the redaction marker of a saved config
    /// (the real secret must be supplied).
    pub fn new(key: impl Into<String>, secret: Secret) -> Result<Self> {
        const OP: &str = "livekit.api_keys";
        let key = key.into();
        if key.is_empty() {
            return Err(
                BackendError::invalid_config(OP, "the LiveKit API key is empty")
                    .with_detail("api_key", "must not be empty"),
            );
        }
        if key.trim() != key || key.chars().any(char::is_control) {
            return Err(BackendError::invalid_config(
                OP,
                format!(
                    "the LiveKit API key {:?} has white space or control characters",
                    shown_in_error(&key)
                ),
            )
            .with_detail("api_key", "has white space or control characters"));
        }
        if secret.is_empty() {
            return Err(
                BackendError::invalid_config(OP, "the LiveKit API secret is empty")
                    .with_detail("api_secret", "must not be empty"),
            );
        }
        if secret.is_redaction_marker() {
            return Err(BackendError::invalid_config(
                OP,
                "the LiveKit API secret is the redaction marker of a saved config; supply the real secret",
            )
            .with_detail("api_secret", "is [redacted]"));
        }
        if secret.expose().trim() != secret.expose() {
            return Err(BackendError::invalid_config(
                OP,
                "the LiveKit API secret has white space at either end (a copy-paste slip?)",
            )
            .with_detail("api_secret", "has white space at either end"));
        }
        Ok(ApiKeys { key, secret })
    }

    /// The API key (the `iss` of every token minted here).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The API secret.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// The user's token: joins `room` and nothing else.
    ///
    /// Grants `roomJoin` to `room` with `canPublish`, `canSubscribe` and
    /// `canPublishData`; kind `standard`. No admin grant, no other room, no
    /// `canUpdateOwnMetadata`, not `hidden`, not `agent`.
    ///
    /// # Errors
    ///
    /// `invalid_config` for an empty identity or room, or a `ttl` outside
    /// 1 s ..= [`MAX_TTL`].
    pub fn user_token(&self, room: &str, user: &Participant, ttl: Duration) -> Result<Secret> {
        const OP: &str = "livekit.user_token";
        let grants = VideoGrants {
            room_join: true,
            room: room.to_owned(),
            can_publish: Some(true),
            can_subscribe: Some(true),
            can_publish_data: Some(true),
            can_update_own_metadata: Some(false),
            ..VideoGrants::default()
        };
        self.join_token(OP, room, user, KIND_STANDARD, grants, ttl)
    }

    /// The agent's token: joins `room` as an agent participant.
    ///
    /// Grants `roomJoin` to `room` with `canPublish`, `canSubscribe`,
    /// `canPublishData`, `agent: true` and `canUpdateOwnMetadata` (so the
    /// agent can publish its state as the `lk.agent.state` attribute, as
    /// LiveKit Agents do); kind `agent`; `hidden` when asked (the agent then
    /// does not show in the room's participant list).
    ///
    /// # Errors
    ///
    /// `invalid_config` for an empty identity or room, or a `ttl` outside
    /// 1 s ..= [`MAX_TTL`].
    pub fn agent_token(
        &self,
        room: &str,
        agent: &Participant,
        hidden: bool,
        ttl: Duration,
    ) -> Result<Secret> {
        const OP: &str = "livekit.agent_token";
        let grants = VideoGrants {
            room_join: true,
            room: room.to_owned(),
            can_publish: Some(true),
            can_subscribe: Some(true),
            can_publish_data: Some(true),
            can_update_own_metadata: Some(true),
            agent: true,
            hidden,
            ..VideoGrants::default()
        };
        self.join_token(OP, room, agent, KIND_AGENT, grants, ttl)
    }

    /// A token for RoomService calls within `scope`, valid for `ttl`
    /// ([`ADMIN_TTL`] is meant for one call).
    ///
    /// # Errors
    ///
    /// `invalid_config` for an empty room in [`AdminScope::Room`] or a `ttl`
    /// outside 1 s ..= [`MAX_TTL`].
    pub fn admin_token(&self, scope: &AdminScope, ttl: Duration) -> Result<Secret> {
        const OP: &str = "livekit.admin_token";
        check_ttl(OP, ttl)?;
        let grants = match scope {
            AdminScope::CreateRooms => VideoGrants {
                room_create: true,
                ..VideoGrants::default()
            },
            AdminScope::ListRooms => VideoGrants {
                room_list: true,
                ..VideoGrants::default()
            },
            AdminScope::Room(room) => {
                check_room(OP, room)?;
                VideoGrants {
                    room_admin: true,
                    room: room.clone(),
                    ..VideoGrants::default()
                }
            }
        };
        let token = AccessToken::with_api_key(&self.key, self.secret.expose())
            .with_ttl(ttl)
            .with_grants(grants);
        sign(OP, token)
    }

    /// Verifies `token`: signed with this secret (HS256), issued for this
    /// key, and valid now (with [`LEEWAY`] on `nbf` and `exp`). Returns its
    /// claims.
    ///
    /// # Errors
    ///
    /// `authentication_failed` naming why: not a JWT, issued for another
    /// key, expired, not yet valid, or a signature that does not verify with
    /// this secret. The token itself is never quoted.
    pub fn verify(&self, token: &str) -> Result<Claims> {
        const OP: &str = "livekit.verify_token";
        let verifier = TokenVerifier::with_api_key(&self.key, self.secret.expose());
        match verifier.verify(token) {
            Ok(claims) => Ok(claims),
            Err(_) => Err(self.why_rejected(OP, token)),
        }
    }

    /// Why [`TokenVerifier`] refused `token`, read from its unverified
    /// claims: the checks of `exp`, `nbf` and `iss` that fail whatever the
    /// signature, and otherwise the signature.
    fn why_rejected(&self, op: &'static str, token: &str) -> BackendError {
        let fail =
            |message: String| BackendError::new(op, ErrorCode::AuthenticationFailed, message);
        let Ok(claims) = Claims::from_unverified(token) else {
            return fail("the LiveKit access token is not a JWT with LiveKit's claims".into());
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let leeway = LEEWAY.as_secs();
        if (claims.exp as u64).saturating_add(leeway) < now {
            return fail(format!(
                "the LiveKit access token expired {} s ago",
                now - claims.exp as u64
            ));
        }
        if (claims.nbf as u64) > now.saturating_add(leeway) {
            return fail(format!(
                "the LiveKit access token is not valid for another {} s",
                claims.nbf as u64 - now
            ));
        }
        if claims.iss != self.key {
            return fail(format!(
                "the LiveKit access token was issued for API key {:?}, not {:?}",
                shown_in_error(&claims.iss),
                shown_in_error(&self.key)
            ));
        }
        fail(
            "the LiveKit access token's signature does not verify (HS256) with this API secret"
                .into(),
        )
    }

    fn join_token(
        &self,
        op: &'static str,
        room: &str,
        who: &Participant,
        kind: &str,
        grants: VideoGrants,
        ttl: Duration,
    ) -> Result<Secret> {
        check_ttl(op, ttl)?;
        check_room(op, room)?;
        if who.identity.is_empty() {
            return Err(BackendError::invalid_config(
                op,
                "a LiveKit join token needs a participant identity",
            )
            .with_detail("identity", "must not be empty"));
        }
        let mut token = AccessToken::with_api_key(&self.key, self.secret.expose())
            .with_ttl(ttl)
            .with_identity(&who.identity)
            .with_kind(kind)
            .with_grants(grants);
        if !who.name.is_empty() {
            token = token.with_name(&who.name);
        }
        if !who.metadata.is_empty() {
            token = token.with_metadata(&who.metadata);
        }
        if !who.attributes.is_empty() {
            token = token.with_attributes(who.attributes.clone());
        }
        sign(op, token)
    }
}

/// Checks a token lifetime: whole seconds from 1 s to [`MAX_TTL`].
///
/// # Errors
///
/// `invalid_config` naming the bound that was crossed.
pub fn check_ttl(op: &'static str, ttl: Duration) -> Result<()> {
    if ttl < Duration::from_secs(1) {
        return Err(BackendError::invalid_config(
            op,
            format!("a LiveKit token lifetime must be at least 1 s (JWT times are whole seconds); got {ttl:?}"),
        )
        .with_detail("token_ttl", "at least 1s"));
    }
    if ttl > MAX_TTL {
        return Err(BackendError::invalid_config(
            op,
            format!(
                "a LiveKit token lifetime must be at most {} days; got {ttl:?}",
                MAX_TTL.as_secs() / 86_400
            ),
        )
        .with_detail("token_ttl", "at most 7d"));
    }
    Ok(())
}

fn check_room(op: &'static str, room: &str) -> Result<()> {
    if room.is_empty() {
        return Err(BackendError::invalid_config(
            op,
            "a LiveKit token scoped to a room needs its name",
        )
        .with_detail("room", "must not be empty"));
    }
    Ok(())
}

/// Signs `token`; the SDK's errors become `invalid_config` (they only come
/// from key material or claims it refuses).
fn sign(op: &'static str, token: AccessToken) -> Result<Secret> {
    token.to_jwt().map(Secret::new).map_err(|e| {
        let why = match &e {
            AccessTokenError::InvalidKeys => "the API key or secret is empty".to_owned(),
            AccessTokenError::InvalidClaims(claims) => (*claims).to_owned(),
            AccessTokenError::InvalidEnv(_) => "the environment's keys are unusable".to_owned(),
            AccessTokenError::Encoding(_) => "the JWT could not be encoded".to_owned(),
        };
        BackendError::invalid_config(op, format!("LiveKit token not minted: {why}"))
    })
}
