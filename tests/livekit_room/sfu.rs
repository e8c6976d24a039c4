//! The SFU side of the test room: per participant a subscriber peer
//! connection (the server offers the user's track and its data channels) and
//! a publisher peer connection (the server answers the agent's offer and
//! receives its track and data channels), over webrtc-rs on 127.0.0.1 with a
//! UDP switch that can black-hole the media path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audiopus::coder::{Decoder, Encoder};
use audiopus::packet::Packet;
use audiopus::{Application, Channels, MutSignals, SampleRate};
use livekit_api::access_token::Claims;
use livekit_protocol as proto;
use prost::Message as _;
use tokio::sync::mpsc;
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::media_stream::MediaStreamTrack;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState, RTCSessionDescription, Registry, register_default_interceptors,
};

use super::udp_switch::SwitchRuntime;
use super::{AgentRtp, MicFrame, Shared, USER_IDENTITY, USER_SID, USER_TRACK_SID};

/// Opus payload type in the default media engine (both sides use it).
const OPUS_PT: u8 = 111;
/// SSRC of the user's track towards a participant.
const USER_SSRC: u32 = 0x5EED_0001;

/// What goes out on a participant's signal socket.
#[derive(Debug, Clone)]
pub(crate) enum Out {
    /// A `SignalResponse`.
    Signal(Box<proto::signal_response::Message>),
    /// Raw bytes (fault injection).
    Binary(Vec<u8>),
}

/// Which channel a data packet came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    /// `_reliable`.
    Reliable,
    /// `_lossy`.
    Lossy,
    /// Any other label.
    Other,
}

/// One data packet the agent sent.
#[derive(Debug, Clone)]
pub struct AgentData {
    /// The channel it came on.
    pub kind: DataKind,
    /// The sender's identity as it filled in `participant_identity`.
    pub participant_identity: String,
    /// `destination_identities`.
    pub destination_identities: Vec<String>,
    /// The `user` packet's topic, if it is one.
    pub topic: Option<String>,
    /// The `user` packet's payload (empty for other packet kinds).
    pub payload: Vec<u8>,
    /// The whole packet.
    pub packet: proto::DataPacket,
    /// When it arrived.
    pub at: Instant,
}

/// Trickled candidates wait until their description has gone out.
#[derive(Default)]
struct CandidateGate {
    inner: Mutex<(bool, Vec<proto::signal_response::Message>)>,
}

impl CandidateGate {
    fn push(&self, out: &mpsc::UnboundedSender<Out>, msg: proto::signal_response::Message) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 {
            let _ = out.send(Out::Signal(Box::new(msg)));
        } else {
            g.1.push(msg);
        }
    }

    fn open(&self, out: &mpsc::UnboundedSender<Out>) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = true;
        for msg in g.1.drain(..) {
            let _ = out.send(Out::Signal(Box::new(msg)));
        }
    }
}

/// Events of one SFU-side peer connection.
struct PcHandler {
    shared: Arc<Shared>,
    target: proto::SignalTarget,
    out: mpsc::UnboundedSender<Out>,
    gate: Arc<CandidateGate>,
    connected: Arc<AtomicBool>,
    state: Arc<Mutex<RTCPeerConnectionState>>,
    /// Agent track cid by the track ids it may carry (publisher only).
    tracks: Arc<Mutex<HashMap<String, proto::TrackInfo>>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for PcHandler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        let Ok(init) = event.candidate.to_json() else {
            return;
        };
        let json = serde_json::json!({
            "candidate": init.candidate,
            "sdpMid": init.sdp_mid,
            "sdpMLineIndex": init.sdp_mline_index,
            "usernameFragment": init.username_fragment,
        });
        self.gate.push(
            &self.out,
            proto::signal_response::Message::Trickle(proto::TrickleRequest {
                candidate_init: json.to_string(),
                target: self.target as i32,
                r#final: false,
            }),
        );
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
        self.connected.store(
            state == RTCPeerConnectionState::Connected,
            Ordering::Release,
        );
    }

    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let label = dc.label().await.unwrap_or_default();
            let kind = match label.as_str() {
                "_reliable" => DataKind::Reliable,
                "_lossy" => DataKind::Lossy,
                _ => DataKind::Other,
            };
            while let Some(event) = dc.poll().await {
                match event {
                    DataChannelEvent::OnMessage(msg) => {
                        record_data(&shared, kind, &msg.data);
                    }
                    DataChannelEvent::OnClose => break,
                    _ => {}
                }
            }
        });
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let shared = self.shared.clone();
        let tracks = self.tracks.clone();
        tokio::spawn(async move {
            let id = track.track_id().await;
            let stream = track.stream_id().await;
            {
                let tracks = tracks.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(info) = tracks.get(&id).or_else(|| tracks.get(&stream)) {
                    let mut info = info.clone();
                    info.mime_type = "audio/opus".into();
                    shared.with(|s| {
                        if let Some(t) = s.published.iter_mut().find(|t| t.sid == info.sid) {
                            t.mime_type = info.mime_type.clone();
                        }
                    });
                }
            }
            let mut decoder = Decoder::new(SampleRate::Hz48000, Channels::Mono).ok();
            let mut pcm = vec![0i16; 5760];
            while let Some(event) = track.poll().await {
                match event {
                    TrackRemoteEvent::OnRtpPacket(pkt) => {
                        let payload = pkt.payload.to_vec();
                        let voiced = decoder
                            .as_mut()
                            .and_then(|d| decode_one(d, &payload, &mut pcm))
                            .map(|n| super::rms(&pcm[..n]) > super::VOICED_RMS)
                            .unwrap_or(false);
                        let rtp = AgentRtp {
                            ssrc: pkt.header.ssrc,
                            seq: pkt.header.sequence_number,
                            timestamp: pkt.header.timestamp,
                            marker: pkt.header.marker,
                            payload,
                            at: Instant::now(),
                            voiced,
                        };
                        shared.with(|s| {
                            s.counters.agent_rtp_packets += 1;
                            s.agent_rtp.push(rtp);
                        });
                    }
                    TrackRemoteEvent::OnEnded => break,
                    _ => {}
                }
            }
        });
    }
}

fn record_data(shared: &Shared, kind: DataKind, bytes: &[u8]) {
    match proto::DataPacket::decode(bytes) {
        Ok(packet) => {
            let (topic, payload) = match &packet.value {
                Some(proto::data_packet::Value::User(user)) => {
                    (user.topic.clone(), user.payload.clone())
                }
                _ => (None, Vec::new()),
            };
            let data = AgentData {
                kind,
                participant_identity: packet.participant_identity.clone(),
                destination_identities: packet.destination_identities.clone(),
                topic,
                payload,
                packet,
                at: Instant::now(),
            };
            shared.with(|s| {
                s.counters.data_packets += 1;
                s.agent_data.push(data);
            });
        }
        Err(_) => shared.count(|c| c.malformed_data += 1),
    }
}

fn decode_one(decoder: &mut Decoder, payload: &[u8], pcm: &mut [i16]) -> Option<usize> {
    let packet = Packet::try_from(payload).ok()?;
    let out = MutSignals::try_from(pcm).ok()?;
    decoder.decode(Some(packet), out, false).ok()
}

fn sample_rate(rate: u32) -> Option<SampleRate> {
    Some(match rate {
        8_000 => SampleRate::Hz8000,
        12_000 => SampleRate::Hz12000,
        16_000 => SampleRate::Hz16000,
        24_000 => SampleRate::Hz24000,
        48_000 => SampleRate::Hz48000,
        _ => return None,
    })
}

/// Decodes the agent's packets at `rate`: in arrival order, a fresh decoder
/// per SSRC, gaps in RTP time (48 kHz clock) filled with silence (at most
/// 10 s each).
pub(crate) fn decode_agent_audio(packets: &[AgentRtp], rate: u32) -> super::AgentAudio {
    let mut audio = super::AgentAudio {
        rate,
        ..Default::default()
    };
    let Some(sr) = sample_rate(rate) else {
        return audio;
    };
    let mut pcm = vec![0i16; (rate as usize) * 120 / 1000];
    let mut current: Option<(u32, Decoder, u32)> = None; // ssrc, decoder, next expected timestamp
    for p in packets {
        let fresh = current.as_ref().is_none_or(|(ssrc, _, _)| *ssrc != p.ssrc);
        if fresh {
            let Ok(d) = Decoder::new(sr, Channels::Mono) else {
                return audio;
            };
            current = Some((p.ssrc, d, p.timestamp));
        }
        let Some((_, decoder, next_ts)) = current.as_mut() else {
            continue;
        };
        let gap = p.timestamp.wrapping_sub(*next_ts);
        if gap > 0 && gap < 48_000 * 10 {
            let fill = (u64::from(gap) * u64::from(rate) / 48_000) as usize;
            audio.samples.extend(std::iter::repeat_n(0, fill));
        }
        match decode_one(decoder, &p.payload, &mut pcm) {
            Some(n) => {
                audio.samples.extend_from_slice(&pcm[..n]);
                audio.packets += 1;
                *next_ts = p
                    .timestamp
                    .wrapping_add((n as u64 * 48_000 / u64::from(rate)) as u32);
            }
            None => audio.undecodable += 1,
        }
    }
    audio
}

/// One participant (the agent) with its two peer connections.
pub(crate) struct Participant {
    pub sid: String,
    pub identity: String,
    pub claims: Claims,
    pub info: proto::ParticipantInfo,
    shared: Arc<Shared>,
    out_tx: mpsc::UnboundedSender<Out>,
    pub out_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Out>>,
    conn: Mutex<Option<tokio::task::AbortHandle>>,
    subscriber: Arc<dyn PeerConnection>,
    publisher: Arc<dyn PeerConnection>,
    sub_gate: Arc<CandidateGate>,
    pub_gate: Arc<CandidateGate>,
    sub_connected: Arc<AtomicBool>,
    pub_connected: Arc<AtomicBool>,
    ice_killed: Arc<AtomicBool>,
    gone: AtomicBool,
    user_track: Mutex<Option<Arc<TrackLocalStaticRTP>>>,
    user_sender: Mutex<Option<Arc<dyn webrtc::rtp_transceiver::RtpSender>>>,
    user_clock: Mutex<RtpClock>,
    sub_reliable: Mutex<Option<Arc<dyn DataChannel>>>,
    sub_reliable_open: Arc<AtomicBool>,
    tracks: Arc<Mutex<HashMap<String, proto::TrackInfo>>>,
    /// Candidates trickled before their connection had a remote description
    /// (subscriber, publisher), added once it has one.
    early_candidates: Mutex<(Vec<RTCIceCandidateInit>, Vec<RTCIceCandidateInit>)>,
    offer_id: AtomicU32,
    negotiation: tokio::sync::Mutex<()>,
}

impl Participant {
    /// Makes a participant and its two peer connections.
    pub async fn create(
        shared: Arc<Shared>,
        sid: String,
        claims: Claims,
    ) -> Result<Arc<Participant>, String> {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let ice_killed = Arc::new(AtomicBool::new(false));
        let tracks = Arc::new(Mutex::new(HashMap::new()));
        let sub_gate = Arc::new(CandidateGate::default());
        let pub_gate = Arc::new(CandidateGate::default());
        let sub_connected = Arc::new(AtomicBool::new(false));
        let pub_connected = Arc::new(AtomicBool::new(false));
        let handler = |target, gate: &Arc<CandidateGate>, connected: &Arc<AtomicBool>| {
            Arc::new(PcHandler {
                shared: shared.clone(),
                target,
                out: out_tx.clone(),
                gate: gate.clone(),
                connected: connected.clone(),
                state: Arc::new(Mutex::new(RTCPeerConnectionState::New)),
                tracks: tracks.clone(),
            })
        };
        let subscriber = new_pc(
            handler(proto::SignalTarget::Subscriber, &sub_gate, &sub_connected),
            ice_killed.clone(),
        )
        .await?;
        let publisher = new_pc(
            handler(proto::SignalTarget::Publisher, &pub_gate, &pub_connected),
            ice_killed.clone(),
        )
        .await?;
        let video = &claims.video;
        let kind = match claims.kind.as_str() {
            "agent" => proto::participant_info::Kind::Agent,
            "ingress" => proto::participant_info::Kind::Ingress,
            "egress" => proto::participant_info::Kind::Egress,
            "sip" => proto::participant_info::Kind::Sip,
            _ if video.agent => proto::participant_info::Kind::Agent,
            _ => proto::participant_info::Kind::Standard,
        };
        let now = unix_ms();
        let info = proto::ParticipantInfo {
            sid: sid.clone(),
            identity: claims.sub.clone(),
            state: proto::participant_info::State::Joined as i32,
            metadata: claims.metadata.clone(),
            joined_at: now / 1000,
            joined_at_ms: now,
            name: claims.name.clone(),
            version: 1,
            permission: Some(proto::ParticipantPermission {
                can_subscribe: video.can_subscribe.unwrap_or(true),
                can_publish: video.can_publish.unwrap_or(true),
                can_publish_data: video.can_publish_data.unwrap_or(true),
                hidden: video.hidden,
                #[allow(deprecated)]
                agent: video.agent,
                ..Default::default()
            }),
            kind: kind as i32,
            attributes: claims.attributes.clone(),
            ..Default::default()
        };
        Ok(Arc::new(Participant {
            sid,
            identity: claims.sub.clone(),
            claims,
            info,
            shared,
            out_tx,
            out_rx: tokio::sync::Mutex::new(out_rx),
            conn: Mutex::new(None),
            subscriber,
            publisher,
            sub_gate,
            pub_gate,
            sub_connected,
            pub_connected,
            ice_killed,
            gone: AtomicBool::new(false),
            user_track: Mutex::new(None),
            user_sender: Mutex::new(None),
            user_clock: Mutex::new(RtpClock::new()),
            sub_reliable: Mutex::new(None),
            sub_reliable_open: Arc::new(AtomicBool::new(false)),
            tracks,
            early_candidates: Mutex::new((Vec::new(), Vec::new())),
            offer_id: AtomicU32::new(0),
            negotiation: tokio::sync::Mutex::new(()),
        }))
    }

    /// Queues a message for the signal socket (sent when one is attached).
    pub fn send(&self, msg: proto::signal_response::Message) {
        let _ = self.out_tx.send(Out::Signal(Box::new(msg)));
    }

    /// Queues `out` if a signal socket is attached now.
    pub fn send_raw(&self, out: Out) -> bool {
        let attached = self
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|h| !h.is_finished());
        attached && self.out_tx.send(out).is_ok()
    }

    /// Records the task serving the current signal socket, aborting the
    /// previous one.
    pub fn attach(&self, handle: tokio::task::AbortHandle) {
        if let Some(old) = self
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(handle)
        {
            old.abort();
        }
    }

    /// Aborts the current signal socket; true if one was attached.
    pub fn drop_signal(&self) -> bool {
        match self.conn.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(h) if !h.is_finished() => {
                h.abort();
                true
            }
            _ => false,
        }
    }

    /// Cuts the media path.
    pub fn kill_ice(&self) {
        self.ice_killed.store(true, Ordering::Release);
    }

    /// Whether this participant can be resumed.
    pub fn resumable(&self) -> bool {
        !self.gone.load(Ordering::Acquire) && !self.ice_killed.load(Ordering::Acquire)
    }

    /// Subscribed to the user's track with connected media.
    pub fn media_ready(&self) -> bool {
        self.resumable()
            && self.sub_connected.load(Ordering::Acquire)
            && self
                .user_track
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
    }

    /// Closes everything.
    pub fn shutdown(&self) {
        self.gone.store(true, Ordering::Release);
        self.drop_signal();
        let (s, p) = (self.subscriber.clone(), self.publisher.clone());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime left: the connections go with it
        };
        runtime.spawn(async move {
            let _ = s.close().await;
            let _ = p.close().await;
        });
    }

    /// Adds the server's data channels and, if `subscribe`, the user's
    /// track to the subscriber connection, and sends the offer.
    pub async fn start_subscriber(&self, subscribe: bool) -> Result<(), String> {
        let reliable = self
            .subscriber
            .create_data_channel(
                "_reliable",
                Some(RTCDataChannelInit {
                    ordered: true,
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| format!("create _reliable: {e}"))?;
        let lossy = self
            .subscriber
            .create_data_channel(
                "_lossy",
                Some(RTCDataChannelInit {
                    ordered: false,
                    max_retransmits: Some(0),
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| format!("create _lossy: {e}"))?;
        for (dc, open) in [
            (reliable.clone(), Some(self.sub_reliable_open.clone())),
            (lossy, None),
        ] {
            let shared = self.shared.clone();
            tokio::spawn(async move {
                while let Some(event) = dc.poll().await {
                    match event {
                        DataChannelEvent::OnOpen => {
                            if let Some(open) = &open {
                                open.store(true, Ordering::Release);
                            }
                        }
                        DataChannelEvent::OnMessage(msg) => {
                            record_data(&shared, DataKind::Other, &msg.data);
                        }
                        DataChannelEvent::OnClose => break,
                        _ => {}
                    }
                }
            });
        }
        *self.sub_reliable.lock().unwrap_or_else(|e| e.into_inner()) = Some(reliable);
        if subscribe {
            self.add_user_track().await?;
        }
        self.offer_subscriber().await
    }

    async fn add_user_track(&self) -> Result<(), String> {
        if self
            .user_track
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return Ok(());
        }
        // The webrtc crate keeps `rtc`'s parameter types unexported; their
        // values come from the constructor's own signature.
        let mut codings = fifth_arg_default(MediaStreamTrack::new);
        codings.push(Default::default());
        codings[0].rtp_coding_parameters.ssrc = Some(USER_SSRC);
        codings[0].codec.mime_type = "audio/opus".to_owned();
        codings[0].codec.clock_rate = 48_000;
        codings[0].codec.channels = 2;
        codings[0].codec.sdp_fmtp_line = "minptime=10;useinbandfec=1".to_owned();
        let track = MediaStreamTrack::new(
            format!("{USER_SID}|{USER_TRACK_SID}"),
            USER_TRACK_SID.to_owned(),
            "microphone".to_owned(),
            "audio".into(),
            codings,
        );
        let track = Arc::new(TrackLocalStaticRTP::new(track));
        let sender = self
            .subscriber
            .add_track(track.clone() as Arc<dyn TrackLocal>)
            .await
            .map_err(|e| format!("add the user's track: {e}"))?;
        *self.user_sender.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender);
        *self.user_track.lock().unwrap_or_else(|e| e.into_inner()) = Some(track);
        Ok(())
    }

    /// Subscribes to or unsubscribes from the user's track and renegotiates.
    pub async fn set_user_subscription(&self, subscribe: bool) -> Result<(), String> {
        let had = self
            .user_track
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if subscribe == had {
            return Ok(());
        }
        if subscribe {
            self.add_user_track().await?;
        } else {
            self.user_track
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let sender = self
                .user_sender
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(sender) = sender {
                self.subscriber
                    .remove_track(&sender)
                    .await
                    .map_err(|e| format!("remove the user's track: {e}"))?;
            }
        }
        self.offer_subscriber().await
    }

    /// Creates and sends a subscriber offer (after the last one is answered).
    async fn offer_subscriber(&self) -> Result<(), String> {
        let _one = self.negotiation.lock().await;
        for _ in 0..500 {
            if self.subscriber.pending_local_description().await.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let offer = self
            .subscriber
            .create_offer(None)
            .await
            .map_err(|e| format!("subscriber offer: {e}"))?;
        self.subscriber
            .set_local_description(offer)
            .await
            .map_err(|e| format!("subscriber local description: {e}"))?;
        let sdp = self
            .subscriber
            .local_description()
            .await
            .map(|d| d.sdp)
            .ok_or("no subscriber local description")?;
        let id = self.offer_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.send(proto::signal_response::Message::Offer(
            proto::SessionDescription {
                r#type: "offer".into(),
                sdp,
                id,
                mid_to_track_id: Default::default(),
            },
        ));
        self.shared.count(|c| c.subscriber_offers += 1);
        self.sub_gate.open(&self.out_tx);
        Ok(())
    }

    /// Applies the client's answer to the subscriber offer.
    pub async fn subscriber_answer(&self, sdp: String) -> Result<(), String> {
        let answer = RTCSessionDescription::answer(sdp).map_err(|e| format!("answer: {e}"))?;
        self.subscriber
            .set_remote_description(answer)
            .await
            .map_err(|e| format!("subscriber remote description: {e}"))?;
        self.add_early_candidates(proto::SignalTarget::Subscriber)
            .await
    }

    async fn add_early_candidates(&self, target: proto::SignalTarget) -> Result<(), String> {
        let early = {
            let mut early = self
                .early_candidates
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match target {
                proto::SignalTarget::Subscriber => std::mem::take(&mut early.0),
                proto::SignalTarget::Publisher => std::mem::take(&mut early.1),
            }
        };
        let pc = match target {
            proto::SignalTarget::Subscriber => &self.subscriber,
            proto::SignalTarget::Publisher => &self.publisher,
        };
        for init in early {
            pc.add_ice_candidate(init)
                .await
                .map_err(|e| format!("add candidate: {e}"))?;
        }
        Ok(())
    }

    /// Answers the client's publisher offer.
    pub async fn publisher_offer(&self, sd: proto::SessionDescription) -> Result<(), String> {
        let offer = RTCSessionDescription::offer(sd.sdp).map_err(|e| format!("offer: {e}"))?;
        self.publisher
            .set_remote_description(offer)
            .await
            .map_err(|e| format!("publisher remote description: {e}"))?;
        self.add_early_candidates(proto::SignalTarget::Publisher)
            .await?;
        let answer = self
            .publisher
            .create_answer(None)
            .await
            .map_err(|e| format!("publisher answer: {e}"))?;
        self.publisher
            .set_local_description(answer)
            .await
            .map_err(|e| format!("publisher local description: {e}"))?;
        let sdp = self
            .publisher
            .local_description()
            .await
            .map(|d| d.sdp)
            .ok_or("no publisher local description")?;
        self.send(proto::signal_response::Message::Answer(
            proto::SessionDescription {
                r#type: "answer".into(),
                sdp,
                id: sd.id,
                mid_to_track_id: Default::default(),
            },
        ));
        self.pub_gate.open(&self.out_tx);
        Ok(())
    }

    /// Adds a trickled candidate to the connection it targets.
    pub async fn trickle(&self, t: &proto::TrickleRequest) -> Result<(), String> {
        let init: RTCIceCandidateInit = serde_json::from_str(&t.candidate_init)
            .map_err(|e| format!("candidateInit is not an RTCIceCandidateInit: {e}"))?;
        if init.candidate.is_empty() {
            return Ok(()); // end of candidates
        }
        let subscriber = t.target == proto::SignalTarget::Subscriber as i32;
        let pc = if subscriber {
            &self.subscriber
        } else {
            &self.publisher
        };
        if pc.remote_description().await.is_none() {
            // Kept until the description arrives, as LiveKit's transport does.
            let mut early = self
                .early_candidates
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if subscriber {
                early.0.push(init);
            } else {
                early.1.push(init);
            }
            return Ok(());
        }
        pc.add_ice_candidate(init)
            .await
            .map_err(|e| format!("add candidate: {e}"))
    }

    /// Records an `add_track` and returns the published track.
    pub fn add_track(&self, req: &proto::AddTrackRequest) -> proto::TrackInfo {
        let sid = self.shared.next_id("TR_");
        let info = proto::TrackInfo {
            sid,
            r#type: req.r#type,
            name: req.name.clone(),
            muted: req.muted,
            source: req.source,
            stream: req.stream.clone(),
            encryption: req.encryption,
            audio_features: req.audio_features.clone(),
            ..Default::default()
        };
        self.tracks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.cid.clone(), info.clone());
        info
    }

    /// Sends the user's data packet on the reliable subscriber channel.
    pub async fn send_user_data(&self, topic: &str, payload: &[u8]) -> bool {
        if !self.sub_reliable_open.load(Ordering::Acquire) {
            return false;
        }
        let Some(dc) = self
            .sub_reliable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return false;
        };
        #[allow(deprecated)]
        let packet = proto::DataPacket {
            kind: proto::data_packet::Kind::Reliable as i32,
            participant_identity: USER_IDENTITY.into(),
            participant_sid: USER_SID.into(),
            value: Some(proto::data_packet::Value::User(proto::UserPacket {
                participant_sid: USER_SID.into(),
                participant_identity: USER_IDENTITY.into(),
                payload: payload.to_vec(),
                topic: Some(topic.into()),
                ..Default::default()
            })),
            ..Default::default()
        };
        let bytes = packet.encode_to_vec();
        dc.send(bytes::BytesMut::from(&bytes[..])).await.is_ok()
    }

    /// Writes one Opus frame on the user's track, if subscribed.
    async fn write_user_frame(&self, opus: &[u8], marker: bool) {
        if !self.media_ready() {
            return;
        }
        let Some(track) = self
            .user_track
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return;
        };
        let (seq, timestamp) = {
            let mut clock = self.user_clock.lock().unwrap_or_else(|e| e.into_inner());
            clock.next()
        };
        let mut packet = second_arg_default(<TrackLocalStaticRTP as TrackLocal>::write_rtp);
        packet.header.version = 2;
        packet.header.payload_type = OPUS_PT;
        packet.header.sequence_number = seq;
        packet.header.timestamp = timestamp;
        packet.header.ssrc = USER_SSRC;
        packet.header.marker = marker;
        packet.payload = bytes::Bytes::copy_from_slice(opus);
        let _ = track.write_rtp(packet).await;
    }
}

/// The user's microphone: every 20 ms one queued frame (or Opus silence),
/// encoded and written to every subscribed participant.
pub(crate) async fn run_mic(shared: Arc<Shared>) {
    let mut encoders: HashMap<u32, Encoder> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = vec![0u8; 4000];
    let mut talking = false;
    loop {
        tick.tick().await;
        let frame = shared
            .mic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        let frame = match frame {
            Some(f) => f,
            None if shared.options.mic_silence || shared.options.mic_dtx => MicFrame {
                rate: 48_000,
                pcm: vec![0; 960],
                done: None,
            },
            None => {
                talking = false;
                continue;
            }
        };
        let Some(sr) = sample_rate(frame.rate) else {
            continue;
        };
        if let std::collections::hash_map::Entry::Vacant(v) = encoders.entry(frame.rate) {
            match Encoder::new(sr, Channels::Mono, Application::Voip) {
                Ok(mut e) => {
                    if shared.options.mic_dtx && e.set_dtx(true).is_err() {
                        continue;
                    }
                    v.insert(e);
                }
                Err(_) => continue,
            }
        }
        let Some(encoder) = encoders.get(&frame.rate) else {
            continue;
        };
        let Ok(n) = encoder.encode(&frame.pcm, &mut out) else {
            continue;
        };
        if shared.options.mic_dtx && n <= 2 && !shared.options.mic_sends_dtx_frames {
            // A DTX frame: not sent; the next one sent starts a talkspurt.
            shared.count(|c| c.mic_dtx_skipped += 1);
            talking = false;
            if let Some(done) = frame.done {
                let _ = done.send(());
            }
            continue;
        }
        // The first frame after a quiet stretch starts a talkspurt.
        let marker = !talking;
        talking = true;
        let participants = shared.with(|s| s.participants.clone());
        for p in participants {
            p.write_user_frame(&out[..n], marker).await;
        }
        if let Some(done) = frame.done {
            let _ = done.send(());
        }
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `Default` of a constructor's fifth parameter.
fn fifth_arg_default<A, B, C, D, E: Default, R>(_f: fn(A, B, C, D, E) -> R) -> E {
    E::default()
}

/// `Default` of a method's second parameter.
fn second_arg_default<A, B: Default, R>(_f: fn(A, B) -> R) -> B {
    B::default()
}

/// RTP sequence numbers and 48 kHz timestamps of the user's track: the
/// timestamp follows the wall clock, so quiet stretches advance it.
struct RtpClock {
    start: Instant,
    seq: u16,
    base: u32,
    last: Option<u32>,
}

impl RtpClock {
    fn new() -> Self {
        RtpClock {
            start: Instant::now(),
            seq: fastrand::u16(..),
            base: fastrand::u32(..),
            last: None,
        }
    }

    fn next(&mut self) -> (u16, u32) {
        let elapsed = (self.start.elapsed().as_micros() * 48 / 1000) as u64;
        let mut ts = self.base.wrapping_add(((elapsed / 960) * 960) as u32);
        if let Some(last) = self.last
            && (ts.wrapping_sub(last) < 960 || ts.wrapping_sub(last) > u32::MAX / 2)
        {
            ts = last.wrapping_add(960);
        }
        self.last = Some(ts);
        self.seq = self.seq.wrapping_add(1);
        (self.seq, ts)
    }
}

async fn new_pc(
    handler: Arc<PcHandler>,
    killed: Arc<AtomicBool>,
) -> Result<Arc<dyn PeerConnection>, String> {
    let mut media = MediaEngine::default();
    media
        .register_default_codecs()
        .map_err(|e| format!("codecs: {e}"))?;
    let registry = register_default_interceptors(Registry::new(), &mut media)
        .map_err(|e| format!("interceptors: {e}"))?;
    let inner = webrtc::runtime::default_runtime().ok_or("no webrtc runtime")?;
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media)
        .with_interceptor_registry(registry)
        .with_handler(handler)
        .with_runtime(Arc::new(SwitchRuntime::new(inner, killed)))
        .with_udp_addrs(vec!["127.0.0.1:0".to_owned()])
        .build()
        .await
        .map_err(|e| format!("peer connection: {e}"))?;
    Ok(Arc::new(pc))
}
