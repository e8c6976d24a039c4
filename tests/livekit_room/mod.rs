//! An in-process LiveKit room for tests: the signaling server (`/rtc`) and a
//! webrtc-rs peer playing the SFU, so the `livekit` provider can be tested
//! without a LiveKit server.
//!
//! It speaks LiveKit's own protocol (livekit/protocol `livekit_rtc.proto`,
//! `livekit_models.proto`, through the `livekit_protocol` prost types), as a
//! LiveKit server does for a client in dual peer connection mode:
//!
//! - `GET /rtc` upgrades to a WebSocket carrying binary `SignalRequest` /
//!   `SignalResponse` frames (text frames are read as their JSON form). The
//!   token comes from `Authorization: Bearer <jwt>` or the `access_token`
//!   query parameter and is checked with `livekit_api`'s `TokenVerifier`
//!   (HS256 signed with the API secret, `iss` = API key, `nbf`/`exp`), and must
//!   carry `video.roomJoin` for this room and an identity; otherwise the
//!   upgrade is answered `401 Unauthorized` like LiveKit's. `GET /rtc/validate`
//!   answers the same check over plain HTTP; `/rtc/v1` (single peer
//!   connection mode) answers 404, so clients fall back to `/rtc` as they do
//!   with servers without it.
//! - A fresh join gets `SignalResponse{join}` (room, participant, the "user"
//!   in `other_participants` with its microphone track, no ICE servers,
//!   `subscriber_primary: true`, `ping_interval`/`ping_timeout`), then the
//!   server's subscriber `offer` (the user's Opus track when
//!   `auto_subscribe` is on, and the server's `_reliable`/`_lossy` data
//!   channels). The client `answer`s; ICE candidates trickle both ways as
//!   `trickle{candidateInit: JSON, target}`.
//! - `add_track` gets `track_published`; a publisher `offer` gets the
//!   server's `answer`; `ping_req` gets `pong_resp` (and the old `ping` gets
//!   `pong`); `subscription` subscribes or unsubscribes the user's track and
//!   renegotiates; `leave` ends the participant.
//! - A reconnect (`reconnect=1&sid=PA_...`) of a live participant resumes it:
//!   `SignalResponse{reconnect}` on the new socket, the same peer
//!   connections. If the participant is gone (its media was killed, or it
//!   left) the reconnect is answered with `leave{canReconnect, action:
//!   RECONNECT}` so the client does a full join; [`TestRoom::refuse_resumes`]
//!   makes it refuse every resume that way (the participant is dropped, as
//!   a server that lost its state would). A resumed client's `sync_state`
//!   is counted. A fresh join with an
//!   identity already in the room replaces the old participant (it gets
//!   `leave{reason: DUPLICATE_IDENTITY}`).
//! - Data: the agent's `DataPacket`s arrive on the data channels it opens on
//!   its publisher connection (`_reliable`, `_lossy`); the user's go to the
//!   agent on the server's subscriber channel `_reliable`.
//!
//! # Test API
//!
//! ```ignore
//! let room = TestRoom::start("APIkey", "secret").await;      // 127.0.0.1:0
//! room.url();                  // "ws://127.0.0.1:PORT" (what `LIVEKIT_URL` would be)
//! room.room_name();            // "test-room" (`TestRoom::start_with` picks another)
//! room.user_token();           // a token for the room's user identity (for apps that need one)
//!
//! // ... the agent joins (e.g. the provider's `create_session`) ...
//! room.wait_for_agent(Duration::from_secs(10)).await?; // subscribed + media connected
//! room.joins();                // every accepted join: identity, name, kind, grants, query
//! room.refusals();             // every refused /rtc: status and why
//!
//! room.user_says(&pcm_16k, 16_000).await?;   // Opus at 20 ms frames, real time
//! let reply = room.wait_agent_turn(Duration::from_secs(10)).await; // speech, then quiet
//! reply.duration(); reply.voiced(); reply.rms(); reply.tone_level(440.0);
//! room.agent_audio(48_000);    // everything the agent published so far, decoded
//! room.clear_agent_audio();
//! room.agent_data();           // the agent's data packets: topic, payload, kind
//! room.user_sends_data("lk.chat", b"hi").await?;
//!
//! room.drop_signal();          // abort the agent's signal socket (no close frame)
//! room.refuse_resumes(true);   // answer every reconnect=1 with leave{RECONNECT}
//! room.kill_ice();             // black-hole the SFU's UDP: ICE to the agent fails
//! room.send_malformed();       // bytes that are not a SignalResponse
//! room.counters();             // joins, resumes, leaves, pings, offers, malformed, ...
//! ```
//!
//! Limits: one room, one simulated "user" (not a second WebRTC client: the
//! SFU side sends its track itself), audio only, no simulcast or video, no
//! TURN/STUN (host candidates on 127.0.0.1), no single peer connection mode,
//! no RoomService and no `/agent` worker endpoint here.

#![allow(dead_code)]

mod sfu;
mod signal;
mod udp_switch;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livekit_api::access_token::{AccessToken, VideoGrants};
use livekit_protocol as proto;
use tokio::sync::oneshot;

#[allow(unused_imports)]
pub use sfu::{AgentData, DataKind};

/// The room's simulated user (the participant whose microphone the agent
/// hears).
pub const USER_IDENTITY: &str = "user";
/// The user's participant sid.
pub const USER_SID: &str = "PA_user0000001";
/// The sid of the user's microphone track.
pub const USER_TRACK_SID: &str = "TR_usermic0001";

/// Settings of a [`TestRoom`].
#[derive(Debug, Clone)]
pub struct RoomOptions {
    /// The API key tokens must be issued by.
    pub api_key: String,
    /// The secret tokens must be signed with.
    pub api_secret: String,
    /// The only room name tokens may join.
    pub room_name: String,
    /// `JoinResponse.ping_interval`, seconds.
    pub ping_interval: i32,
    /// `JoinResponse.ping_timeout`, seconds.
    pub ping_timeout: i32,
    /// Send Opus silence frames while the user says nothing (an open
    /// microphone without DTX); otherwise the user's track is quiet between
    /// utterances.
    pub mic_silence: bool,
    /// The user's client runs Opus DTX, as browsers do: its encoder has
    /// DTX on, and the TOC-only frames it makes over silence are not sent
    /// (a comfort-noise update goes out now and then; RTP time jumps over
    /// the rest). Silence is encoded even without `mic_silence`.
    pub mic_dtx: bool,
    /// With `mic_dtx`, send the TOC-only DTX frames too (a client that
    /// does).
    pub mic_sends_dtx_frames: bool,
}

impl RoomOptions {
    /// Defaults for a key and secret: room `test-room`, pings every 5 s with
    /// a 15 s timeout, an open microphone.
    pub fn new(api_key: &str, api_secret: &str) -> Self {
        RoomOptions {
            api_key: api_key.to_owned(),
            api_secret: api_secret.to_owned(),
            room_name: "test-room".to_owned(),
            ping_interval: 5,
            ping_timeout: 15,
            mic_silence: true,
            mic_dtx: false,
            mic_sends_dtx_frames: false,
        }
    }
}

/// Why a room operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomError(pub String);

impl std::fmt::Display for RoomError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RoomError {}

/// How the token reached `/rtc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenPlace {
    /// `Authorization: Bearer <token>`.
    Header,
    /// The `access_token` query parameter.
    Query,
}

/// One accepted `/rtc` connection.
#[derive(Debug, Clone)]
pub struct JoinRecord {
    /// The token's `sub`.
    pub identity: String,
    /// The token's `name`.
    pub name: String,
    /// The token's `kind` (`agent` for agents).
    pub kind: String,
    /// The token's `metadata`.
    pub metadata: String,
    /// The token's attributes.
    pub attributes: HashMap<String, String>,
    /// The token's video grant.
    pub grants: VideoGrants,
    /// The participant sid given (or resumed).
    pub participant_sid: String,
    /// `reconnect=1`: a resume attempt.
    pub reconnect: bool,
    /// Whether the resume was accepted (`false` for fresh joins).
    pub resumed: bool,
    /// Every query parameter (`auto_subscribe`, `sdk`, `protocol`, ...).
    pub query: HashMap<String, String>,
    /// Where the token was.
    pub token_place: TokenPlace,
    /// When.
    pub at: Instant,
}

/// One refused `/rtc` or `/rtc/validate` request.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The HTTP status sent (401 for token problems).
    pub status: u16,
    /// Why, as sent in the body.
    pub reason: String,
    /// The request path.
    pub path: String,
}

/// What happened on the signal connections so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Fresh joins accepted (`SignalResponse{join}` sent).
    pub joins: u64,
    /// Resumes accepted (`SignalResponse{reconnect}` sent).
    pub resumes: u64,
    /// Resumes refused with `leave{action: RECONNECT}`.
    pub resumes_refused: u64,
    /// `sync_state` requests received (a resumed client's state).
    pub sync_states: u64,
    /// User frames the microphone did not send (DTX).
    pub mic_dtx_skipped: u64,
    /// Connections refused (401/404).
    pub refused: u64,
    /// `leave` requests received.
    pub leaves: u64,
    /// `ping_req` and `ping` requests received.
    pub pings: u64,
    /// Publisher offers answered.
    pub publisher_offers: u64,
    /// Subscriber offers sent.
    pub subscriber_offers: u64,
    /// Subscriber answers received.
    pub subscriber_answers: u64,
    /// Trickled candidates received.
    pub trickles: u64,
    /// `add_track` requests answered with `track_published`.
    pub tracks_published: u64,
    /// Client frames that were not a `SignalRequest`.
    pub malformed_requests: u64,
    /// Malformed frames sent by [`TestRoom::send_malformed`].
    pub malformed_sent: u64,
    /// Signal sockets dropped by [`TestRoom::drop_signal`].
    pub signal_drops: u64,
    /// Participants whose media [`TestRoom::kill_ice`] cut.
    pub ice_kills: u64,
    /// Agent data packets received (valid `DataPacket`s).
    pub data_packets: u64,
    /// Data channel messages that were not a `DataPacket`.
    pub malformed_data: u64,
    /// Agent RTP packets received.
    pub agent_rtp_packets: u64,
}

/// One RTP packet of the agent's audio.
#[derive(Debug, Clone)]
pub(crate) struct AgentRtp {
    pub ssrc: u32,
    pub seq: u16,
    pub timestamp: u32,
    pub marker: bool,
    pub payload: Vec<u8>,
    pub at: Instant,
    /// Decoded on arrival, its RMS was above [`VOICED_RMS`].
    pub voiced: bool,
}

/// Agent audio, decoded from its Opus track.
#[derive(Debug, Clone, Default)]
pub struct AgentAudio {
    /// Sample rate of `samples`.
    pub rate: u32,
    /// Mono PCM, gaps in RTP time filled with silence.
    pub samples: Vec<i16>,
    /// RTP packets decoded.
    pub packets: usize,
    /// Packets Opus refused to decode.
    pub undecodable: usize,
}

/// A 20 ms frame is voiced when its RMS is above this (about -50 dBFS).
pub const VOICED_RMS: f64 = 100.0;

impl AgentAudio {
    /// Length of `samples`.
    pub fn duration(&self) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(self.samples.len() as f64 / f64::from(self.rate))
    }

    /// Total length of the 20 ms frames whose RMS is above [`VOICED_RMS`].
    pub fn voiced(&self) -> Duration {
        let frame = (self.rate / 50).max(1) as usize;
        let n = self
            .samples
            .chunks(frame)
            .filter(|c| rms(c) > VOICED_RMS)
            .count();
        Duration::from_millis(20 * n as u64)
    }

    /// RMS of the whole signal.
    pub fn rms(&self) -> f64 {
        rms(&self.samples)
    }

    /// The voiced part only: from the first to the last voiced frame.
    pub fn trimmed(&self) -> &[i16] {
        let frame = (self.rate / 50).max(1) as usize;
        let chunks: Vec<&[i16]> = self.samples.chunks(frame).collect();
        let first = chunks.iter().position(|c| rms(c) > VOICED_RMS);
        let last = chunks.iter().rposition(|c| rms(c) > VOICED_RMS);
        match (first, last) {
            (Some(a), Some(b)) => {
                &self.samples[a * frame..((b + 1) * frame).min(self.samples.len())]
            }
            _ => &[],
        }
    }

    /// Amplitude of the `freq` Hz component of the voiced part (Goertzel),
    /// relative to the voiced part's RMS: about 1.41 for a pure tone at
    /// `freq`, near 0 when absent.
    pub fn tone_level(&self, freq: f64) -> f64 {
        let x = self.trimmed();
        let r = rms(x);
        if x.is_empty() || r == 0.0 {
            return 0.0;
        }
        goertzel(x, self.rate, freq) / r
    }
}

/// RMS of PCM samples.
pub fn rms(x: &[i16]) -> f64 {
    if x.is_empty() {
        return 0.0;
    }
    let sum: f64 = x.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    (sum / x.len() as f64).sqrt()
}

/// Amplitude of the `freq` component of `x` at `rate` (Goertzel).
pub fn goertzel(x: &[i16], rate: u32, freq: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / f64::from(rate);
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &v in x {
        let s = f64::from(v) + coeff * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    2.0 * power.max(0.0).sqrt() / x.len() as f64
}

/// A sine tone as PCM (for `user_says`).
pub fn tone(freq: f64, rate: u32, duration: Duration, amplitude: i16) -> Vec<i16> {
    let n = (duration.as_secs_f64() * f64::from(rate)) as usize;
    (0..n)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            (f64::from(amplitude) * (2.0 * std::f64::consts::PI * freq * t).sin()) as i16
        })
        .collect()
}

/// One 20 ms frame queued for the user's microphone.
pub(crate) struct MicFrame {
    pub rate: u32,
    pub pcm: Vec<i16>,
    pub done: Option<oneshot::Sender<()>>,
}

/// State shared by the signal server, the SFU peers and the test.
pub(crate) struct Shared {
    pub options: RoomOptions,
    pub room_sid: String,
    pub created: Instant,
    pub state: Mutex<State>,
    pub mic: Mutex<VecDeque<MicFrame>>,
    pub next_id: AtomicU64,
    /// Refuse every resume (see [`TestRoom::refuse_resumes`]).
    pub refuse_resumes: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
pub(crate) struct State {
    pub counters: Counters,
    pub joins: Vec<JoinRecord>,
    pub refusals: Vec<Refusal>,
    pub participants: Vec<Arc<sfu::Participant>>,
    pub agent_rtp: Vec<AgentRtp>,
    pub agent_data: Vec<AgentData>,
    pub published: Vec<proto::TrackInfo>,
}

impl Shared {
    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state)
    }

    pub fn count(&self, f: impl FnOnce(&mut Counters)) {
        self.with(|s| f(&mut s.counters));
    }

    pub fn next_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}{n:012}")
    }
}

/// The room: a `/rtc` server and the SFU, on 127.0.0.1.
pub struct TestRoom {
    shared: Arc<Shared>,
    addr: std::net::SocketAddr,
    server: tokio::task::JoinHandle<()>,
    mic: tokio::task::JoinHandle<()>,
}

impl Drop for TestRoom {
    fn drop(&mut self) {
        self.server.abort();
        self.mic.abort();
        for p in self.shared.with(|s| std::mem::take(&mut s.participants)) {
            p.shutdown();
        }
    }
}

impl TestRoom {
    /// Starts a room `test-room` for this key and secret on 127.0.0.1:0.
    pub async fn start(api_key: &str, api_secret: &str) -> TestRoom {
        TestRoom::start_with(RoomOptions::new(api_key, api_secret)).await
    }

    /// Starts a room with these options on 127.0.0.1:0.
    pub async fn start_with(options: RoomOptions) -> TestRoom {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the room's signal port");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            options,
            room_sid: "RM_testroom0001".to_owned(),
            created: Instant::now(),
            state: Mutex::new(State::default()),
            mic: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(1),
            refuse_resumes: std::sync::atomic::AtomicBool::new(false),
        });
        let server = tokio::spawn(signal::serve(listener, shared.clone()));
        let mic = tokio::spawn(sfu::run_mic(shared.clone()));
        TestRoom {
            shared,
            addr,
            server,
            mic,
        }
    }

    /// The server URL a client is given: `ws://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// The same server as `http://` (what RoomService URLs look like).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The room name tokens must name.
    pub fn room_name(&self) -> &str {
        &self.shared.options.room_name
    }

    /// Mints a token with this room's key: `identity`, the given grants
    /// (`room_join` and `room` are filled in when unset), one hour.
    pub fn token(&self, identity: &str, grants: VideoGrants) -> String {
        let mut grants = grants;
        if grants.room.is_empty() {
            grants.room = self.room_name().to_owned();
            grants.room_join = true;
        }
        AccessToken::with_api_key(
            &self.shared.options.api_key,
            &self.shared.options.api_secret,
        )
        .with_identity(identity)
        .with_grants(grants)
        .to_jwt()
        .expect("mint a token")
    }

    /// A token for the simulated user.
    pub fn user_token(&self) -> String {
        self.token(USER_IDENTITY, VideoGrants::default())
    }

    /// Every accepted `/rtc` connection, in order.
    pub fn joins(&self) -> Vec<JoinRecord> {
        self.shared.with(|s| s.joins.clone())
    }

    /// Every refused request, in order.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.shared.with(|s| s.refusals.clone())
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        self.shared.with(|s| s.counters.clone())
    }

    /// Identities of the participants in the room now (not the user).
    pub fn participants(&self) -> Vec<String> {
        self.shared
            .with(|s| s.participants.iter().map(|p| p.identity.clone()).collect())
    }

    /// Tracks the agent published (`add_track` answered).
    pub fn agent_tracks(&self) -> Vec<proto::TrackInfo> {
        self.shared.with(|s| s.published.clone())
    }

    /// Waits until `f` holds, checking every 10 ms; false at `timeout`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&TestRoom) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if f(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until a participant is subscribed to the user's track over a
    /// connected subscriber peer connection (media can reach it); returns
    /// its identity.
    pub async fn wait_for_agent(&self, timeout: Duration) -> Result<String, RoomError> {
        let mut found = None;
        let ok = self
            .wait_until(timeout, |room| {
                found = room
                    .shared
                    .with(|s| s.participants.iter().find(|p| p.media_ready()).cloned())
                    .map(|p| p.identity.clone());
                found.is_some()
            })
            .await;
        match (ok, found) {
            (true, Some(identity)) => Ok(identity),
            _ => Err(RoomError(format!(
                "no participant subscribed with connected media within {timeout:?} (joins: {}, counters: {:?})",
                self.joins().len(),
                self.counters()
            ))),
        }
    }

    /// The user says `pcm` (mono, at `rate`: 8, 12, 16, 24 or 48 kHz): it is
    /// Opus-encoded in 20 ms frames (a short last frame is padded with
    /// silence) and sent on the user's track in real time. Waits up to 10 s
    /// for a subscribed agent with connected media, then until the last
    /// frame is sent.
    pub async fn user_says(&self, pcm: &[i16], rate: u32) -> Result<(), RoomError> {
        if ![8_000, 12_000, 16_000, 24_000, 48_000].contains(&rate) {
            return Err(RoomError(format!(
                "Opus takes 8/12/16/24/48 kHz, not {rate}"
            )));
        }
        self.wait_for_agent(Duration::from_secs(10)).await?;
        let frame = (rate / 50) as usize;
        let (tx, rx) = oneshot::channel();
        {
            let mut mic = self.shared.mic.lock().unwrap_or_else(|e| e.into_inner());
            let chunks: Vec<&[i16]> = pcm.chunks(frame).collect();
            let last = chunks.len().saturating_sub(1);
            let mut tx = Some(tx);
            for (i, chunk) in chunks.into_iter().enumerate() {
                let mut pcm = chunk.to_vec();
                pcm.resize(frame, 0);
                let done = if i == last { tx.take() } else { None };
                mic.push_back(MicFrame { rate, pcm, done });
            }
            if let Some(tx) = tx {
                let _ = tx.send(());
            }
        }
        let budget = Duration::from_millis(20 * (pcm.len() / frame) as u64 + 5_000);
        match tokio::time::timeout(budget, rx).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(RoomError("the user's audio was not sent in time".into())),
        }
    }

    /// Sends a `DataPacket{user{payload, topic}}` from the user to every
    /// participant, on the server's reliable subscriber channel.
    pub async fn user_sends_data(&self, topic: &str, payload: &[u8]) -> Result<(), RoomError> {
        self.wait_for_agent(Duration::from_secs(10)).await?;
        let participants = self.shared.with(|s| s.participants.clone());
        let mut sent = 0;
        for p in participants {
            if p.send_user_data(topic, payload).await {
                sent += 1;
            }
        }
        if sent == 0 {
            return Err(RoomError("no participant had an open data channel".into()));
        }
        Ok(())
    }

    /// Everything the agent published so far, decoded at `rate` (8, 12, 16,
    /// 24 or 48 kHz).
    pub fn agent_audio(&self, rate: u32) -> AgentAudio {
        let packets = self.shared.with(|s| s.agent_rtp.clone());
        sfu::decode_agent_audio(&packets, rate)
    }

    /// The agent's RTP packets so far: (ssrc, sequence, timestamp, marker,
    /// voiced), in arrival order.
    pub fn agent_packets(&self) -> Vec<(u32, u16, u32, bool, bool)> {
        self.shared.with(|s| {
            s.agent_rtp
                .iter()
                .map(|p| (p.ssrc, p.seq, p.timestamp, p.marker, p.voiced))
                .collect()
        })
    }

    /// Forgets the agent audio received so far.
    pub fn clear_agent_audio(&self) {
        self.shared.with(|s| s.agent_rtp.clear());
    }

    /// Waits for one reply: voiced agent audio, then `quiet` of no voiced
    /// frames (or no packets). Returns what arrived (at 48 kHz), which may
    /// be unvoiced if `timeout` passes first.
    pub async fn wait_agent_turn(&self, timeout: Duration) -> AgentAudio {
        self.wait_agent_turn_with(timeout, Duration::from_millis(600))
            .await
    }

    /// [`wait_agent_turn`](Self::wait_agent_turn) with a chosen `quiet`.
    pub async fn wait_agent_turn_with(&self, timeout: Duration, quiet: Duration) -> AgentAudio {
        let deadline = Instant::now() + timeout;
        loop {
            let (packets, last_voiced_at) = self.shared.with(|s| {
                let last = s.agent_rtp.iter().rev().find(|p| p.voiced).map(|p| p.at);
                (s.agent_rtp.len(), last)
            });
            if let Some(at) = last_voiced_at
                && at.elapsed() >= quiet
                && packets > 0
            {
                let audio = self.agent_audio(48_000);
                if audio.voiced() > Duration::ZERO {
                    return audio;
                }
            }
            if Instant::now() >= deadline {
                return self.agent_audio(48_000);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The agent's data packets so far.
    pub fn agent_data(&self) -> Vec<AgentData> {
        self.shared.with(|s| s.agent_data.clone())
    }

    /// Waits until at least `count` data packets arrived; returns them all.
    pub async fn wait_agent_data(&self, count: usize, timeout: Duration) -> Vec<AgentData> {
        self.wait_until(timeout, |room| room.agent_data().len() >= count)
            .await;
        self.agent_data()
    }

    /// Aborts the signal socket of every participant (the TCP connection is
    /// dropped with no close frame); the participants stay, so a
    /// `reconnect=1` resumes them. Returns how many sockets were dropped.
    pub fn drop_signal(&self) -> usize {
        let participants = self.shared.with(|s| s.participants.clone());
        let n = participants.iter().filter(|p| p.drop_signal()).count();
        self.shared.count(|c| c.signal_drops += n as u64);
        n
    }

    /// Refuses (`true`) or accepts again (`false`) every resume: a
    /// `reconnect=1` is answered with `leave{action: RECONNECT}` and the
    /// participant is dropped, so the client must join afresh.
    pub fn refuse_resumes(&self, refuse: bool) {
        self.shared.refuse_resumes.store(refuse, Ordering::Release);
    }

    /// Black-holes the SFU side's UDP for every participant (nothing sent,
    /// everything received dropped), so their ICE fails; such a participant
    /// can no longer resume (a reconnect gets `leave{action: RECONNECT}`).
    /// Returns how many participants were cut.
    pub fn kill_ice(&self) -> usize {
        let participants = self.shared.with(|s| s.participants.clone());
        for p in &participants {
            p.kill_ice();
        }
        self.shared
            .count(|c| c.ice_kills += participants.len() as u64);
        participants.len()
    }

    /// Sends each participant's signal socket a binary frame that is not a
    /// `SignalResponse`. Returns how many were sent.
    pub fn send_malformed(&self) -> usize {
        let participants = self.shared.with(|s| s.participants.clone());
        let n = participants
            .iter()
            .filter(|p| p.send_raw(sfu::Out::Binary(vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x0a])))
            .count();
        self.shared.count(|c| c.malformed_sent += n as u64);
        n
    }

    /// Sends `message` to every participant's signal socket (e.g. a server
    /// `leave`). Returns how many participants it was queued for.
    pub fn send_signal(&self, message: proto::signal_response::Message) -> usize {
        let participants = self.shared.with(|s| s.participants.clone());
        participants
            .iter()
            .filter(|p| p.send_raw(sfu::Out::Signal(Box::new(message.clone()))))
            .count()
    }
}
