//! The agent's two WebRTC peer connections in a room (LiveKit's dual peer
//! connection mode): the **publisher**, which the agent offers, carrying its
//! reply track and its data channels (`_reliable`, `_lossy`); and the
//! **subscriber**, which the server offers, carrying the other
//! participants' tracks (the user's microphone). Built on webrtc-rs.
//!
//! What the connections report (gathered candidates, state changes, remote
//! tracks) comes out of one channel of [`PcEvent`]s, tagged with the
//! connection it is about, for the participant's task to act on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use livekit_protocol as proto;
use tokio::sync::mpsc;
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::media_stream::MediaStreamTrack;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCIceServer, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState, RTCSessionDescription, Registry, SettingEngineBuilder,
    register_default_interceptors,
};
use webrtc::rtp_transceiver::RtpSender;

use crate::error::{BackendError, ErrorCode, Result};

const OP: &str = "livekit.rtc";

/// The payload type most offers give Opus; used until the negotiated one
/// is known.
const OPUS_PT: u8 = 111;

/// ICE: a connection is `disconnected` after this long without traffic...
const ICE_DISCONNECTED: Duration = Duration::from_secs(3);
/// ...and `failed` after this long, when the agent rejoins.
const ICE_FAILED: Duration = Duration::from_secs(8);
/// Keepalives while the media is idle.
const ICE_KEEPALIVE: Duration = Duration::from_secs(1);

/// The label of the reliable data channel (LiveKit's name).
pub const RELIABLE: &str = "_reliable";
/// The label of the lossy data channel (LiveKit's name).
pub const LOSSY: &str = "_lossy";

/// Which of the two connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The agent's own offers: its track and data channels.
    Publisher,
    /// The server's offers: the other participants' tracks.
    Subscriber,
}

impl Target {
    /// LiveKit's `SignalTarget` for it.
    pub fn signal(self) -> proto::SignalTarget {
        match self {
            Target::Publisher => proto::SignalTarget::Publisher,
            Target::Subscriber => proto::SignalTarget::Subscriber,
        }
    }

    /// The target a `SignalTarget` names.
    pub fn from_signal(target: i32) -> Target {
        if target == proto::SignalTarget::Subscriber as i32 {
            Target::Subscriber
        } else {
            Target::Publisher
        }
    }
}

/// What a connection reports.
pub enum PcEvent {
    /// A local ICE candidate to trickle to the server.
    Candidate(Target, RTCIceCandidateInit),
    /// The connection's state changed.
    State(Target, RTCPeerConnectionState),
    /// A remote track arrived on the subscriber.
    Track(Arc<dyn TrackRemote>),
}

struct Handler {
    target: Target,
    tx: mpsc::UnboundedSender<PcEvent>,
}

#[async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(init) = event.candidate.to_json() {
            let _ = self.tx.send(PcEvent::Candidate(self.target, init));
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.tx.send(PcEvent::State(self.target, state));
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if self.target == Target::Subscriber {
            let _ = self.tx.send(PcEvent::Track(track));
        }
    }
}

fn rtc_error(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::new(OP, ErrorCode::ConnectionFailed, format!("{what}: {e}"))
}

/// `Default` of a function's fifth parameter: webrtc-rs keeps the `rtc`
/// crate's parameter types unexported, so their values are made from the
/// signature that takes them.
fn fifth_default<A, B, C, D, E: Default, R>(_: fn(A, B, C, D, E) -> R) -> E {
    E::default()
}

/// `Default` of the packet type a track's `write_rtp` takes (see
/// [`fifth_default`]).
fn packet_default<'a, P: Default, R>(_: fn(&'a TrackLocalStaticRTP, P) -> R) -> P {
    P::default()
}

/// The agent's publisher and subscriber connections, its reply track and
/// its reliable data channel.
pub struct Transports {
    /// The publisher connection.
    pub publisher: Arc<dyn PeerConnection>,
    /// The subscriber connection.
    pub subscriber: Arc<dyn PeerConnection>,
    /// The reliable data channel (`_reliable`) on the publisher.
    pub reliable: Arc<dyn DataChannel>,
    track: Arc<TrackLocalStaticRTP>,
    sender: Arc<dyn RtpSender>,
    ssrc: u32,
    /// The reply track's id: the `cid` of its `add_track`.
    pub track_id: String,
}

impl std::fmt::Debug for Transports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transports")
            .field("track_id", &self.track_id)
            .finish_non_exhaustive()
    }
}

async fn connection(
    target: Target,
    ice_servers: &[proto::IceServer],
    bind: &[SocketAddr],
    tx: mpsc::UnboundedSender<PcEvent>,
) -> Result<Arc<dyn PeerConnection>> {
    let mut media = MediaEngine::default();
    media
        .register_default_codecs()
        .map_err(|e| rtc_error("registering codecs", e))?;
    let registry = register_default_interceptors(Registry::new(), &mut media)
        .map_err(|e| rtc_error("registering interceptors", e))?;
    let servers = ice_servers
        .iter()
        .map(|s| RTCIceServer {
            urls: s.urls.clone(),
            username: s.username.clone(),
            credential: s.credential.clone(),
        })
        .collect();
    let settings = SettingEngineBuilder::new()
        .with_ice_timeouts(
            Some(ICE_DISCONNECTED),
            Some(ICE_FAILED),
            Some(ICE_KEEPALIVE),
        )
        .build();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(
            RTCConfigurationBuilder::new()
                .with_ice_servers(servers)
                .build(),
        )
        .with_media_engine(media)
        .with_interceptor_registry(registry)
        .with_setting_engine(settings)
        .with_handler(Arc::new(Handler { target, tx }))
        .with_udp_addrs(bind.to_vec())
        .build()
        .await
        .map_err(|e| rtc_error("creating a peer connection", e))?;
    Ok(Arc::new(pc))
}

impl Transports {
    /// Both connections, with the reply track (Opus, 48 kHz) added to the
    /// publisher and its data channels opened, for a participant `sid`.
    ///
    /// # Errors
    ///
    /// `ConnectionFailed` when webrtc-rs cannot make them (e.g. no address
    /// to bind).
    pub async fn new(
        sid: &str,
        ice_servers: &[proto::IceServer],
        bind: &[SocketAddr],
        tx: mpsc::UnboundedSender<PcEvent>,
    ) -> Result<Transports> {
        let publisher = connection(Target::Publisher, ice_servers, bind, tx.clone()).await?;
        let subscriber = match connection(Target::Subscriber, ice_servers, bind, tx).await {
            Ok(s) => s,
            Err(e) => {
                let _ = publisher.close().await;
                return Err(e);
            }
        };
        let ssrc = fastrand::u32(1..);
        let track_id = format!("TR_agent{:08x}", fastrand::u32(..));
        let mut codings = fifth_default(MediaStreamTrack::new);
        codings.push(Default::default());
        codings[0].rtp_coding_parameters.ssrc = Some(ssrc);
        codings[0].codec.mime_type = "audio/opus".to_owned();
        codings[0].codec.clock_rate = 48_000;
        codings[0].codec.channels = 2;
        codings[0].codec.sdp_fmtp_line = "minptime=10;useinbandfec=1".to_owned();
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            format!("{sid}|{track_id}"),
            track_id.clone(),
            "agent-voice".to_owned(),
            "audio".into(),
            codings,
        )));
        let built = async {
            let sender = publisher
                .add_track(track.clone() as Arc<dyn TrackLocal>)
                .await
                .map_err(|e| rtc_error("adding the reply track", e))?;
            let reliable = publisher
                .create_data_channel(
                    RELIABLE,
                    Some(RTCDataChannelInit {
                        ordered: true,
                        ..Default::default()
                    }),
                )
                .await
                .map_err(|e| rtc_error("opening the reliable data channel", e))?;
            publisher
                .create_data_channel(
                    LOSSY,
                    Some(RTCDataChannelInit {
                        ordered: false,
                        max_retransmits: Some(0),
                        ..Default::default()
                    }),
                )
                .await
                .map_err(|e| rtc_error("opening the lossy data channel", e))?;
            Ok::<_, BackendError>((sender, reliable))
        };
        match built.await {
            Ok((sender, reliable)) => Ok(Transports {
                publisher,
                subscriber,
                reliable,
                track,
                sender,
                ssrc,
                track_id,
            }),
            Err(e) => {
                let _ = publisher.close().await;
                let _ = subscriber.close().await;
                Err(e)
            }
        }
    }

    /// The connection `target` names.
    pub fn pc(&self, target: Target) -> &Arc<dyn PeerConnection> {
        match target {
            Target::Publisher => &self.publisher,
            Target::Subscriber => &self.subscriber,
        }
    }

    /// Creates the publisher's offer and sets it as its local description;
    /// returns the SDP.
    ///
    /// # Errors
    ///
    /// `ConnectionFailed` from webrtc-rs.
    pub async fn publisher_offer(&self) -> Result<String> {
        let offer = self
            .publisher
            .create_offer(None)
            .await
            .map_err(|e| rtc_error("creating the publisher offer", e))?;
        let sdp = offer.sdp.clone();
        self.publisher
            .set_local_description(offer)
            .await
            .map_err(|e| rtc_error("setting the publisher offer", e))?;
        Ok(sdp)
    }

    /// Sets the server's answer to the publisher's offer.
    ///
    /// # Errors
    ///
    /// `ConnectionFailed` for an SDP webrtc-rs refuses.
    pub async fn publisher_answer(&self, sdp: String) -> Result<()> {
        let answer =
            RTCSessionDescription::answer(sdp).map_err(|e| rtc_error("the server's answer", e))?;
        self.publisher
            .set_remote_description(answer)
            .await
            .map_err(|e| rtc_error("setting the server's answer", e))
    }

    /// Answers the server's subscriber offer; returns the answer's SDP.
    ///
    /// # Errors
    ///
    /// `ConnectionFailed` for an SDP webrtc-rs refuses.
    pub async fn subscriber_answer(&self, sdp: String) -> Result<String> {
        let offer =
            RTCSessionDescription::offer(sdp).map_err(|e| rtc_error("the server's offer", e))?;
        self.subscriber
            .set_remote_description(offer)
            .await
            .map_err(|e| rtc_error("setting the server's offer", e))?;
        let answer = self
            .subscriber
            .create_answer(None)
            .await
            .map_err(|e| rtc_error("answering the server's offer", e))?;
        let sdp = answer.sdp.clone();
        self.subscriber
            .set_local_description(answer)
            .await
            .map_err(|e| rtc_error("setting the subscriber answer", e))?;
        Ok(sdp)
    }

    /// The subscriber's current remote offer and local answer, as SDP
    /// (for a resume's `SyncState`).
    pub async fn subscriber_descriptions(&self) -> (Option<String>, Option<String>) {
        let offer = self.subscriber.remote_description().await.map(|d| d.sdp);
        let answer = self.subscriber.local_description().await.map(|d| d.sdp);
        (offer, answer)
    }

    /// Adds a candidate the server trickled (`candidate_init`, the JSON of
    /// an `RTCIceCandidateInit`) to `target`.
    ///
    /// # Errors
    ///
    /// `ConnectionFailed` for JSON that is not a candidate, or one webrtc-rs
    /// refuses.
    pub async fn add_candidate(&self, target: Target, candidate_init: &str) -> Result<()> {
        let init: RTCIceCandidateInit = serde_json::from_str(candidate_init)
            .map_err(|e| rtc_error("a trickled candidate is not an RTCIceCandidateInit", e))?;
        self.pc(target)
            .add_ice_candidate(init)
            .await
            .map_err(|e| rtc_error("adding a trickled candidate", e))
    }

    /// The payload type negotiated for Opus on the reply track, once the
    /// server answered.
    pub async fn opus_payload_type(&self) -> Option<u8> {
        let params = self.sender.get_parameters().await.ok()?;
        params
            .rtp_parameters
            .codecs
            .iter()
            .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case("audio/opus"))
            .map(|c| c.payload_type)
    }

    /// A sender of RTP packets on the reply track.
    pub fn rtp_writer(&self, payload_type: Option<u8>) -> RtpWriter {
        RtpWriter {
            track: self.track.clone(),
            ssrc: self.ssrc,
            payload_type: payload_type.unwrap_or(OPUS_PT),
            header: Header {
                sequence: fastrand::u16(..),
                timestamp: fastrand::u32(..),
                started: false,
            },
        }
    }

    /// Closes both connections.
    pub async fn close(&self) {
        let _ = self.reliable.close().await;
        let _ = self.publisher.close().await;
        let _ = self.subscriber.close().await;
    }
}

/// Packetizes the reply's Opus packets as RTP (RFC 7587): one 20 ms packet
/// each, sequence numbers one apart, timestamps on the 48 kHz clock, 960 a
/// frame. Frames not sent (DTX, the pause before a reply) are jumped over
/// in RTP time; the first packet after such a gap has the marker bit, as
/// the first of a talk spurt (RFC 3551 4.1, RFC 7587 4.1).
pub struct RtpWriter {
    track: Arc<TrackLocalStaticRTP>,
    ssrc: u32,
    payload_type: u8,
    header: Header,
}

/// The sequence number, timestamp and marker of a stream's packets.
#[derive(Debug)]
struct Header {
    sequence: u16,
    timestamp: u32,
    /// Whether a packet was sent yet (the first one is marked).
    started: bool,
}

impl Header {
    /// The next packet's sequence number, timestamp and marker, `frames`
    /// 20 ms frames after the one before (1: none skipped).
    fn next(&mut self, frames: u32) -> (u16, u32, bool) {
        let marker = !self.started || frames > 1;
        if self.started {
            self.timestamp = self
                .timestamp
                .wrapping_add(frames.max(1).wrapping_mul(PACKET_SAMPLES));
        } else {
            self.sequence = self.sequence.wrapping_sub(1);
        }
        self.started = true;
        self.sequence = self.sequence.wrapping_add(1);
        (self.sequence, self.timestamp, marker)
    }
}

impl std::fmt::Debug for RtpWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtpWriter")
            .field("payload_type", &self.payload_type)
            .finish_non_exhaustive()
    }
}

/// Samples in a 20 ms packet at Opus's 48 kHz RTP clock.
const PACKET_SAMPLES: u32 = 960;

impl RtpWriter {
    /// Sets the negotiated payload type.
    pub fn set_payload_type(&mut self, pt: u8) {
        self.payload_type = pt;
    }

    /// Sends one 20 ms Opus packet, `frames` frames after the one before
    /// (more than one: the frames between were not sent).
    ///
    /// # Errors
    ///
    /// `ConnectionFailed` when the track is not bound (before negotiation,
    /// after close) or the connection is gone.
    pub async fn write(&mut self, opus: &[u8], frames: u32) -> Result<()> {
        let (sequence, timestamp, marker) = self.header.next(frames);
        let mut packet = packet_default(<TrackLocalStaticRTP as TrackLocal>::write_rtp);
        packet.header.version = 2;
        packet.header.marker = marker;
        packet.header.payload_type = self.payload_type;
        packet.header.sequence_number = sequence;
        packet.header.timestamp = timestamp;
        packet.header.ssrc = self.ssrc;
        packet.payload = bytes::Bytes::copy_from_slice(opus);
        self.track
            .write_rtp(packet)
            .await
            .map_err(|e| rtc_error("sending reply audio", e))
    }
}

/// One RTP packet of a remote track: what the reader needs of it.
#[derive(Debug)]
pub struct RtpIn {
    /// The sequence number.
    pub sequence: u16,
    /// The timestamp (48 kHz for Opus).
    pub timestamp: u32,
    /// The Opus payload.
    pub payload: bytes::Bytes,
}

/// The next RTP packet of a remote track; `None` once the track ended.
pub async fn next_rtp(track: &Arc<dyn TrackRemote>) -> Option<RtpIn> {
    loop {
        match track.poll().await? {
            TrackRemoteEvent::OnRtpPacket(packet) => {
                return Some(RtpIn {
                    sequence: packet.header.sequence_number,
                    timestamp: packet.header.timestamp,
                    payload: packet.payload,
                });
            }
            TrackRemoteEvent::OnEnded => return None,
            _ => {}
        }
    }
}

/// Resolves once `channel` is open; never when it closes first.
pub async fn opened(channel: Arc<dyn DataChannel>) {
    while let Some(event) = channel.poll().await {
        if matches!(event, DataChannelEvent::OnOpen) {
            return;
        }
    }
    std::future::pending().await
}

/// Sends `payload` on a data channel.
///
/// # Errors
///
/// `ConnectionFailed` when the channel is not open.
pub async fn send_data(channel: &Arc<dyn DataChannel>, payload: &[u8]) -> Result<()> {
    channel
        .send(BytesMut::from(payload))
        .await
        .map_err(|e| rtc_error("sending on the data channel", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_jump_over_the_frames_not_sent_and_mark_the_spurt() {
        let (ts0, seq0) = (u32::MAX - 1_000, 0);
        let h = |frames: Vec<u32>| {
            let mut w = Header {
                sequence: seq0,
                timestamp: ts0,
                started: false,
            };
            let mut out = Vec::new();
            for f in frames {
                out.push(w.next(f));
            }
            out
        };
        let got = h(vec![1, 1, 1, 3, 1, 50]);
        assert_eq!(got[0], (0, ts0, true), "the first packet starts a spurt");
        assert_eq!(got[1], (1, ts0.wrapping_add(960), false));
        assert_eq!(got[2], (2, ts0.wrapping_add(1_920), false));
        assert_eq!(
            got[3],
            (3, ts0.wrapping_add(1_920 + 3 * 960), true),
            "two frames not sent: the timestamp jumps, the marker is set"
        );
        assert_eq!(got[4], (4, ts0.wrapping_add(5 * 960 + 960), false));
        assert_eq!(got[5].1, ts0.wrapping_add(6 * 960 + 50 * 960));
        assert!(got[5].2);
    }
}
