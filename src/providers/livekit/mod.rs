#![doc = include_str!("docs.md")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::config::{Config, Secret, Violations};
use crate::error::{BackendError, Result};
use crate::provider::{Codec, HostedStages, ProviderCapabilities};
use crate::runtime::{Link, LinkRequest, Provider};

mod media;
pub mod opus;
mod participant;
pub mod rooms;
mod rtc;
pub mod signal;
pub mod token;
pub mod worker;

pub use participant::LiveKitCounters;

/// The provider's registered name.
pub const NAME: &str = "livekit";

const OP: &str = "livekit.validate_config";

/// The room name template used when none is configured.
pub const DEFAULT_ROOM_TEMPLATE: &str = "voice-{session_id}";

/// The data-channel topic transcripts and agent text go out on when none
/// is configured.
pub const DEFAULT_DATA_TOPIC: &str = "voice-backends.transcript";

fn default_room_template() -> String {
    DEFAULT_ROOM_TEMPLATE.to_owned()
}

fn default_agent_identity() -> String {
    "agent-{session_id}".to_owned()
}

fn default_agent_display_name() -> String {
    "Agent".to_owned()
}

fn default_token_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_data_topic() -> String {
    DEFAULT_DATA_TOPIC.to_owned()
}

fn default_complexity() -> u8 {
    opus::DEFAULT_COMPLEXITY
}

fn default_bind() -> Vec<String> {
    vec!["0.0.0.0:0".to_owned()]
}

fn yes() -> bool {
    true
}

/// How the agent comes to a room.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// `create_session` creates (or finds) the room itself and joins it.
    #[default]
    Direct,
    /// The backend registers as an agent worker with the server's `/agent`
    /// endpoint; `create_session` takes the next job LiveKit dispatched to
    /// it and joins that room with the token the server minted.
    Worker,
}

/// Options for rooms the backend creates (direct mode).
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRoomOptions {
    /// Create the room through RoomService before joining (default true);
    /// when false, the room is created by the first participant to join,
    /// with the server's defaults.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Seconds the room stays open with nobody in it (0: the server's
    /// default).
    #[serde(default)]
    pub empty_timeout: u32,
    /// Seconds the room stays open after the last participant left (0: the
    /// server's default).
    #[serde(default)]
    pub departure_timeout: u32,
    /// Participants at most (0: no limit).
    #[serde(default)]
    pub max_participants: u32,
    /// The room's metadata.
    #[serde(default)]
    pub metadata: String,
}

impl Default for CreateRoomOptions {
    fn default() -> Self {
        CreateRoomOptions {
            enabled: true,
            empty_timeout: 0,
            departure_timeout: 0,
            max_participants: 0,
            metadata: String::new(),
        }
    }
}

/// The `livekit` provider's `provider_config`.
///
/// ```toml
/// provider = "livekit"
/// [provider_config]
/// url = "wss://my-project.livekit.cloud"
/// api_key = "APIxxxxxxxx"
/// api_secret = "${LIVEKIT_API_SECRET}"
/// room_template = "support-{user_id}-{session_id}"
/// ```
///
/// `Debug` shows the URL without credentials and the secret redacted.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LiveKitConfig {
    /// The LiveKit server: `wss://` / `ws://` (or `https://` / `http://`,
    /// read as the same host's WebSocket).
    pub url: String,
    /// The API key (a token's issuer).
    pub api_key: String,
    /// The API secret that signs tokens.
    pub api_secret: Secret,
    /// The room of a session: `{session_id}` and `{user_id}` are replaced
    /// (default `voice-{session_id}`).
    #[serde(default = "default_room_template")]
    pub room_template: String,
    /// A session metadata key whose string value, when present, names the
    /// room instead of `room_template` (e.g. `"room"`).
    #[serde(default)]
    pub room_metadata_key: Option<String>,
    /// Options for rooms the backend creates (direct mode).
    #[serde(default)]
    pub create_room: CreateRoomOptions,
    /// The agent participant's identity in each room: `{session_id}` is
    /// replaced (default `agent-{session_id}`, so two sessions' agents in
    /// one room do not replace each other).
    #[serde(default = "default_agent_identity")]
    pub agent_identity: String,
    /// The agent participant's display name.
    #[serde(default = "default_agent_display_name")]
    pub agent_display_name: String,
    /// How long the tokens the backend mints are valid (default 1h).
    #[serde(default = "default_token_ttl", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub token_ttl: Duration,
    /// The data-channel topic the session's transcripts and agent text are
    /// published on (reliable, as JSON).
    #[serde(default = "default_data_topic")]
    pub data_topic: String,
    /// `direct` (default) or `worker`.
    #[serde(default)]
    pub mode: Mode,
    /// The agent name the worker registers (worker mode): LiveKit
    /// dispatches jobs for this name. Empty: automatic dispatch.
    #[serde(default)]
    pub agent_name: String,
    /// Which Opus coder encodes the reply: `"low_delay"` (default; CELT,
    /// the transform coder) or `"voip"` (SILK, the speech coder, the only
    /// one with in-band FEC). Each at its default bitrate, the two score
    /// alike on recorded speech; `low_delay` costs well under half of
    /// `voip`'s CPU per frame, which is what lets one core carry 500
    /// sessions (see the provider's docs).
    #[serde(default)]
    pub opus_application: opus::OpusApplication,
    /// The reply track's Opus bitrate in bits per second, 6000..=510000
    /// (default: 40000 for `low_delay`, 32000 for `voip`).
    #[serde(default)]
    pub opus_bitrate: Option<u32>,
    /// The reply encoder's complexity, 0..=10 (default 5): higher costs
    /// more CPU per packet for a little more quality; 5 keeps speech's
    /// quality at about half of 10's cost.
    #[serde(default = "default_complexity")]
    pub opus_complexity: u8,
    /// In-band forward error correction on the reply track (default
    /// false): each packet carries a coarse copy of the one before, for
    /// listeners on lossy networks, at some of the bitrate's cost. Only
    /// SILK has it: `true` needs `opus_application = "voip"`.
    #[serde(default)]
    pub opus_fec: bool,
    /// Discontinuous transmission (default true): reply frames libopus
    /// finds silent are not sent, and nothing is sent between replies.
    #[serde(default = "yes")]
    pub opus_dtx: bool,
    /// Local UDP addresses for the WebRTC media (default `0.0.0.0:0`:
    /// every interface but loopback, ephemeral ports).
    #[serde(default = "default_bind")]
    pub rtc_bind: Vec<String>,
    /// Publish transcripts and agent text on the data channel (default
    /// true).
    #[serde(default = "yes")]
    pub relay_text: bool,
}

impl std::fmt::Debug for LiveKitConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveKitConfig")
            .field("url", &crate::config::redact_url(&self.url))
            .field("api_key", &self.api_key)
            .field("api_secret", &self.api_secret)
            .field("room_template", &self.room_template)
            .field("room_metadata_key", &self.room_metadata_key)
            .field("create_room", &self.create_room)
            .field("agent_identity", &self.agent_identity)
            .field("agent_display_name", &self.agent_display_name)
            .field("token_ttl", &self.token_ttl)
            .field("data_topic", &self.data_topic)
            .field("mode", &self.mode)
            .field("agent_name", &self.agent_name)
            .field("opus_application", &self.opus_application)
            .field("opus_bitrate", &self.opus_bitrate)
            .field("opus_complexity", &self.opus_complexity)
            .field("opus_fec", &self.opus_fec)
            .field("opus_dtx", &self.opus_dtx)
            .field("rtc_bind", &self.rtc_bind)
            .field("relay_text", &self.relay_text)
            .finish()
    }
}

/// Whether `name` is a room name LiveKit takes: 1..=256 bytes, no control
/// characters, no `/`.
fn room_name_ok(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("the room name is empty".into());
    }
    if name.len() > 256 {
        return Err(format!(
            "the room name is {} bytes (at most 256)",
            name.len()
        ));
    }
    if name.chars().any(|c| c.is_control() || c == '/') {
        return Err("the room name has a control character or '/'".into());
    }
    Ok(())
}

impl LiveKitConfig {
    /// The reply encoder's settings.
    pub fn encoder_settings(&self) -> opus::EncoderSettings {
        opus::EncoderSettings {
            application: self.opus_application,
            bitrate: self
                .opus_bitrate
                .unwrap_or(self.opus_application.default_bitrate()),
            complexity: self.opus_complexity,
            fec: self.opus_fec,
            dtx: self.opus_dtx,
        }
    }

    /// The checks past parsing, every bad field named.
    fn check(&self) -> Result<()> {
        let mut v = Violations::new();
        let mut fail = |path: &str, message: String| {
            v.push(format!("provider_config.{path}"), message);
        };
        if let Err(m) = signal::rtc_url(&self.url) {
            fail("url", m);
        }
        // The key and the secret are checked apart, so both are named when
        // both are bad.
        let key_alone = token::ApiKeys::new(self.api_key.clone(), Secret::new("s"));
        let secret_alone = token::ApiKeys::new("k", self.api_secret.clone());
        for e in [key_alone.err(), secret_alone.err()].into_iter().flatten() {
            for (field, why) in &e.details {
                fail(field, why.clone());
            }
        }
        if let Err(m) = room_name_ok(&render(&self.room_template, "s", "u")) {
            fail("room_template", m);
        }
        if self
            .room_metadata_key
            .as_deref()
            .is_some_and(|k| k.trim().is_empty())
        {
            fail("room_metadata_key", "must be non-empty when set".into());
        }
        if self.agent_identity.trim().is_empty() {
            fail("agent_identity", "must be non-empty".into());
        }
        if !(Duration::from_secs(60)..=token::MAX_TTL).contains(&self.token_ttl) {
            fail("token_ttl", "must be between 1m and 24h".into());
        }
        if self.data_topic.is_empty() {
            fail("data_topic", "must be non-empty".into());
        }
        if let Some(bitrate) = self.opus_bitrate
            && !(6_000..=510_000).contains(&bitrate)
        {
            fail(
                "opus_bitrate",
                format!("{bitrate} is out of range 6000..=510000"),
            );
        }
        if self.opus_fec && self.opus_application != opus::OpusApplication::Voip {
            fail(
                "opus_fec",
                format!(
                    "in-band FEC exists only in SILK: it needs opus_application = \"voip\" (it is \"{}\")",
                    self.opus_application.as_str()
                ),
            );
        }
        if self.opus_complexity > opus::MAX_COMPLEXITY {
            fail(
                "opus_complexity",
                format!(
                    "{} is out of range 0..={}",
                    self.opus_complexity,
                    opus::MAX_COMPLEXITY
                ),
            );
        }
        if self.rtc_bind.is_empty() {
            fail("rtc_bind", "needs at least one address".into());
        }
        for (i, addr) in self.rtc_bind.iter().enumerate() {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                fail(
                    &format!("rtc_bind[{i}]"),
                    format!("{addr:?} is not an ip:port address"),
                );
            }
        }
        v.into_result(OP)
    }

    /// The room a session joins: the metadata's value under
    /// `room_metadata_key` when it is a string, otherwise `room_template`
    /// rendered.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` when the name is not one LiveKit takes.
    pub fn room_for(
        &self,
        session_id: &str,
        user_id: &str,
        metadata: &BTreeMap<String, serde_json::Value>,
    ) -> Result<String> {
        let from_metadata = self
            .room_metadata_key
            .as_deref()
            .and_then(|k| metadata.get(k))
            .and_then(|v| v.as_str());
        let name = match from_metadata {
            Some(name) => name.to_owned(),
            None => render(&self.room_template, session_id, user_id),
        };
        room_name_ok(&name).map_err(|m| {
            BackendError::invalid_config("livekit.room", format!("the session's room: {m}"))
        })?;
        Ok(name)
    }
}

/// `template` with `{session_id}` and `{user_id}` replaced.
fn render(template: &str, session_id: &str, user_id: &str) -> String {
    template
        .replace("{session_id}", session_id)
        .replace("{user_id}", user_id)
}

/// LiveKit rooms: the agent joins each session's room as a participant,
/// hears the user's microphone track and publishes its reply as a track.
#[derive(Debug)]
pub struct LiveKitProvider {
    config: Arc<LiveKitConfig>,
    keys: token::ApiKeys,
    rooms: rooms::RoomService,
    counters: Arc<LiveKitCounters>,
    /// Worker mode's jobs; `None` in direct mode.
    dispatch: Option<Arc<worker::Dispatch>>,
}

impl LiveKitProvider {
    /// The provider's counters (malformed signal messages, reconnects,
    /// packets), shared by its sessions.
    pub fn counters(&self) -> &Arc<LiveKitCounters> {
        &self.counters
    }
}

#[async_trait]
impl Provider for LiveKitProvider {
    const NAME: &'static str = NAME;
    type Config = LiveKitConfig;

    fn capabilities() -> ProviderCapabilities {
        ProviderCapabilities {
            multi_user: true,
            min_latency: Duration::from_millis(20),
            codecs: vec![Codec::Opus, Codec::Pcm16],
            hosted_stages: HostedStages::NONE,
            ..ProviderCapabilities::default()
        }
    }

    fn check(config: &LiveKitConfig) -> Result<()> {
        config.check()
    }

    fn new(config: LiveKitConfig, backend: &Config) -> Result<Self> {
        let keys = token::ApiKeys::new(config.api_key.clone(), config.api_secret.clone())?;
        let rooms = rooms::RoomService::new(&config.url, keys.clone(), backend.timeout)?;
        let config = Arc::new(config);
        let dispatch = match config.mode {
            Mode::Direct => None,
            Mode::Worker => Some(Arc::new(worker::Dispatch::new(config.clone(), backend)?)),
        };
        Ok(LiveKitProvider {
            config,
            keys,
            rooms,
            counters: Arc::default(),
            dispatch,
        })
    }

    /// Worker mode: registers the worker with the server's `/agent`
    /// endpoint (the runtime retries under the backend's policy). Direct
    /// mode has nothing to connect before a session.
    async fn connect(&self, _config: &Config) -> Result<()> {
        match &self.dispatch {
            Some(dispatch) => dispatch.start().await,
            None => Ok(()),
        }
    }

    async fn open_link(&self, request: LinkRequest<'_>) -> Result<Option<Link>> {
        let Some(dispatch) = &self.dispatch else {
            let target = self.direct_target(&request).await?;
            let link = participant::open(
                self.config.clone(),
                target,
                &request,
                self.counters.clone(),
                participant::Lease::default(),
            )
            .await?;
            return Ok(Some(Link::Media(link)));
        };
        // Worker mode: the session is the next job LiveKit assigned; the
        // job ends (done, or failed with the reason) with the session.
        let claim = dispatch.claim(&request).await?;
        let session_id = request.session_id.to_owned();
        let (done, terminated) = (dispatch.clone(), dispatch.clone());
        let lease = participant::Lease {
            on_end: Some(Box::new(move |failure: Option<String>| {
                done.release(&session_id, failure.as_deref());
            })),
            terminated: Some(Box::pin({
                let session_id = request.session_id.to_owned();
                async move { terminated.terminated(&session_id).await }
            })),
        };
        match participant::open(
            self.config.clone(),
            claim.into(),
            &request,
            self.counters.clone(),
            lease,
        )
        .await
        {
            Ok(link) => Ok(Some(Link::Media(link))),
            Err(e) => {
                dispatch.release(request.session_id, Some(&e.message));
                Err(e)
            }
        }
    }

    async fn disconnect(&self) {
        if let Some(dispatch) = &self.dispatch {
            dispatch.stop().await;
        }
    }

    async fn health(&self) -> Result<BTreeMap<String, String>> {
        let mut details = self.counters.health();
        if let Some(dispatch) = &self.dispatch {
            details.extend(dispatch.health());
        }
        Ok(details)
    }
}

/// Where a session's agent goes: the room, the token it joins with, and
/// the user's identity in it.
#[derive(Clone)]
pub(crate) struct JoinTarget {
    /// The room's name.
    pub room: String,
    /// The agent's join token.
    pub token: Secret,
    /// The user the agent listens to (empty: any participant that is not
    /// an agent).
    pub user_identity: String,
    /// The agent's own identity.
    pub agent_identity: String,
    /// The server's WebSocket URL (a job may name another than the config's).
    pub url: String,
}

impl LiveKitProvider {
    /// The agent's token for `room`, as `identity`.
    fn agent_token(&self, room: &str, identity: &str) -> Result<Secret> {
        let agent =
            token::Participant::new(identity).with_name(self.config.agent_display_name.clone());
        self.keys
            .agent_token(room, &agent, false, self.config.token_ttl)
    }

    /// Direct mode: the room named by the config, created when asked, and a
    /// token the backend mints for the agent.
    async fn direct_target(&self, request: &LinkRequest<'_>) -> Result<JoinTarget> {
        let config = &self.config;
        let room = config.room_for(request.session_id, request.user_id, request.metadata())?;
        if config.create_room.enabled {
            let options = &config.create_room;
            self.rooms
                .create_room(&rooms::RoomOptions {
                    name: room.clone(),
                    empty_timeout: Duration::from_secs(options.empty_timeout.into()),
                    departure_timeout: Duration::from_secs(options.departure_timeout.into()),
                    max_participants: options.max_participants,
                    metadata: options.metadata.clone(),
                })
                .await?;
        }
        let user = token::Participant::new(request.user_id).with_name(request.user_id);
        let user_token = self.keys.user_token(&room, &user, config.token_ttl)?;
        publish_info(request, config, &room, user_token);
        let agent_identity = render(&config.agent_identity, request.session_id, request.user_id);
        Ok(JoinTarget {
            token: self.agent_token(&room, &agent_identity)?,
            agent_identity,
            room,
            user_identity: request.user_id.to_owned(),
            url: config.url.clone(),
        })
    }
}

/// Publishes what the application hands its user: the room, the user's
/// join token and the server URL.
pub(crate) fn publish_info(
    request: &LinkRequest<'_>,
    config: &LiveKitConfig,
    room: &str,
    user_token: Secret,
) {
    request.info.set("room", room);
    request.info.set("url", config.url.clone());
    request.info.set("identity", request.user_id);
    request.info.set_secret("token", user_token);
}

crate::register_provider!(LiveKitProvider);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn config(extra: serde_json::Value) -> Result<LiveKitConfig> {
        let mut base = serde_json::json!({
            "url": "wss://example.livekit.cloud",
            "api_key": "APIkey",
            "api_secret": "s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t",
        });
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        let mut c = Config::new(NAME);
        c.provider_config = crate::config::ProviderSection(base.as_object().unwrap().clone());
        let typed: LiveKitConfig = crate::config::parse_provider_config(&c)?;
        typed.check().map(|()| typed)
    }

    #[test]
    fn defaults_fill_everything_but_the_server_and_keys() {
        let c = config(serde_json::json!({})).unwrap();
        assert_eq!(c.room_template, DEFAULT_ROOM_TEMPLATE);
        assert_eq!(c.mode, Mode::Direct);
        assert!(c.create_room.enabled);
        assert_eq!(c.token_ttl, Duration::from_secs(3600));
        assert_eq!(c.data_topic, DEFAULT_DATA_TOPIC);
        assert_eq!(c.agent_identity, "agent-{session_id}");
        assert_eq!(c.rtc_bind, vec!["0.0.0.0:0"]);
        assert_eq!(c.encoder_settings(), opus::EncoderSettings::default());
        assert_eq!(c.opus_application, opus::OpusApplication::LowDelay);
        assert_eq!(c.encoder_settings().bitrate, 40_000);
    }

    #[test]
    fn the_opus_application_is_read_and_sets_its_own_default_bitrate() {
        let c = config(serde_json::json!({"opus_application": "voip"})).unwrap();
        assert_eq!(c.opus_application, opus::OpusApplication::Voip);
        assert_eq!(
            c.encoder_settings().application,
            opus::OpusApplication::Voip
        );
        assert_eq!(c.encoder_settings().bitrate, 32_000);
        let c = config(serde_json::json!({
            "opus_application": "low_delay",
            "opus_bitrate": 24000,
        }))
        .unwrap();
        assert_eq!(c.encoder_settings().bitrate, 24_000);
        assert!(format!("{c:?}").contains("opus_application: LowDelay"));
    }

    #[test]
    fn a_bad_opus_application_is_named_with_the_allowed_values() {
        for bad in [serde_json::json!("celt"), serde_json::json!(3)] {
            let err = config(serde_json::json!({"opus_application": bad})).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidConfig);
            assert!(
                err.details.contains_key("provider_config.opus_application"),
                "{err}"
            );
            if bad.is_string() {
                let shown = err.to_string();
                assert!(
                    shown.contains("voip") && shown.contains("low_delay"),
                    "{shown}"
                );
            }
            assert!(!err.to_string().contains("s3cr3t"));
        }
    }

    #[test]
    fn fec_needs_the_voip_application() {
        let err = config(serde_json::json!({"opus_fec": true})).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidConfig);
        let why = &err.details["provider_config.opus_fec"];
        assert!(why.contains("voip"), "{why}");
        let c = config(serde_json::json!({"opus_fec": true, "opus_application": "voip"}));
        assert!(c.unwrap().encoder_settings().fec);
    }

    #[test]
    fn every_bad_field_is_named_once() {
        let err = config(serde_json::json!({
            "url": "ftp://x",
            "api_key": " ",
            "api_secret": "",
            "room_template": "a/{session_id}",
            "token_ttl": "5s",
            "opus_bitrate": 1,
            "opus_complexity": 11,
            "rtc_bind": ["nowhere"],
        }))
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidConfig);
        for field in [
            "url",
            "api_key",
            "api_secret",
            "room_template",
            "token_ttl",
            "opus_bitrate",
            "opus_complexity",
            "rtc_bind[0]",
        ] {
            assert!(
                err.details
                    .contains_key(&format!("provider_config.{field}")),
                "{field} missing from {err}"
            );
        }
        assert!(!err.to_string().contains("s3cr3t"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = config(serde_json::json!({"room_tempalte": "x"})).unwrap_err();
        assert!(err.to_string().contains("room_tempalte"), "{err}");
    }

    #[test]
    fn the_room_comes_from_metadata_or_the_template() {
        let c = config(serde_json::json!({
            "room_template": "r-{user_id}-{session_id}",
            "room_metadata_key": "room",
        }))
        .unwrap();
        let mut meta = BTreeMap::new();
        assert_eq!(c.room_for("s1", "ann", &meta).unwrap(), "r-ann-s1");
        meta.insert("room".into(), serde_json::json!("front-desk"));
        assert_eq!(c.room_for("s1", "ann", &meta).unwrap(), "front-desk");
        meta.insert("room".into(), serde_json::json!("a/b"));
        let err = c.room_for("s1", "ann", &meta).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidConfig);
        // A user id that would make a bad name is refused, not sent.
        meta.clear();
        assert!(c.room_for("s1", "x/y", &meta).is_err());
    }

    #[test]
    fn debug_hides_the_secret() {
        let c = config(serde_json::json!({})).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("APIkey"));
    }

    #[test]
    fn capabilities_say_multi_user_opus_and_no_hosted_stage() {
        let caps = LiveKitProvider::capabilities();
        assert!(caps.multi_user);
        assert!(caps.codecs.contains(&Codec::Opus) && caps.codecs.contains(&Codec::Pcm16));
        assert_eq!(caps.hosted_stages, HostedStages::NONE);
    }
}
