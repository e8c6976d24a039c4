#![cfg(all(feature = "livekit", feature = "testing"))]
//! The test LiveKit room (`tests/livekit_room/`) against a minimal LiveKit
//! client written here with webrtc-rs: it joins over `/rtc`, answers the
//! subscriber offer, publishes an Opus track (`add_track`, then the
//! publisher offer), sends data packets, pings, and reconnects.

#[path = "livekit_room/mod.rs"]
mod livekit_room;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audiopus::coder::{Decoder, Encoder};
use audiopus::packet::Packet;
use audiopus::{Application, Channels, MutSignals, SampleRate};
use futures_util::{SinkExt, StreamExt};
use livekit_api::access_token::{AccessToken, VideoGrants};
use livekit_protocol as proto;
use livekit_room::{DataKind, RoomOptions, TestRoom, USER_IDENTITY, USER_TRACK_SID};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
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

const KEY: &str = "APIkeyTest";
const SECRET: &str = "a-secret-of-at-least-32-characters-long";

fn agent_token(room: &TestRoom, identity: &str) -> String {
    AccessToken::with_api_key(KEY, SECRET)
        .with_identity(identity)
        .with_name("Agent")
        .with_kind("agent")
        .with_grants(VideoGrants {
            room_join: true,
            room: room.room_name().to_owned(),
            can_publish: Some(true),
            can_subscribe: Some(true),
            can_publish_data: Some(true),
            agent: true,
            ..Default::default()
        })
        .to_jwt()
        .unwrap()
}

// ---------------------------------------------------------------------------
// A bare signal connection

/// What the client's reader saw.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Incoming {
    Signal(proto::signal_response::Message),
    /// A binary frame that is not a `SignalResponse`.
    Undecodable(Vec<u8>),
    /// The socket ended; `true` if with a close frame.
    Ended(bool),
}

struct Signal {
    tx: mpsc::UnboundedSender<WsMessage>,
    rx: mpsc::UnboundedReceiver<Incoming>,
}

impl Signal {
    /// Connects to `/rtc` with the token in the header (or the query).
    async fn connect(url: &str, token: &str, header: bool, query: &str) -> Result<Signal, u16> {
        let mut target = format!("{url}/rtc?sdk=rust&protocol=16&auto_subscribe=1{query}");
        if !header {
            target.push_str(&format!("&access_token={token}"));
        }
        let mut request = target.into_client_request().unwrap();
        if header {
            request
                .headers_mut()
                .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        }
        let ws = match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                return Err(response.status().as_u16());
            }
            Err(e) => panic!("connect: {e}"),
        };
        let (mut sink, mut stream) = ws.split();
        let (tx, mut out) = mpsc::unbounded_channel::<WsMessage>();
        let (events, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = out.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            loop {
                let incoming = match stream.next().await {
                    Some(Ok(WsMessage::Binary(b))) => {
                        match proto::SignalResponse::decode(b.as_ref()) {
                            Ok(proto::SignalResponse { message: Some(m) }) => Incoming::Signal(m),
                            _ => Incoming::Undecodable(b.to_vec()),
                        }
                    }
                    Some(Ok(WsMessage::Close(_))) => Incoming::Ended(true),
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => Incoming::Ended(false),
                };
                let end = matches!(incoming, Incoming::Ended(_));
                if events.send(incoming).is_err() || end {
                    break;
                }
            }
        });
        Ok(Signal { tx, rx })
    }

    fn send(&self, m: proto::signal_request::Message) {
        let bytes = proto::SignalRequest { message: Some(m) }.encode_to_vec();
        let _ = self.tx.send(WsMessage::Binary(bytes.into()));
    }

    async fn next(&mut self) -> Incoming {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("a signal message within 10 s")
            .expect("reader alive")
    }

    /// The next `SignalResponse` matching `f`, skipping others.
    async fn expect<T>(
        &mut self,
        mut f: impl FnMut(proto::signal_response::Message) -> Option<T>,
    ) -> T {
        loop {
            match self.next().await {
                Incoming::Signal(m) => {
                    if let Some(t) = f(m) {
                        return t;
                    }
                }
                other => panic!("expected a signal message, got {other:?}"),
            }
        }
    }

    async fn ping(&mut self) -> i64 {
        let ts = 1_234_567;
        self.send(proto::signal_request::Message::PingReq(proto::Ping {
            timestamp: ts,
            rtt: 0,
        }));
        self.expect(|m| match m {
            proto::signal_response::Message::PongResp(p) => Some(p.last_ping_timestamp),
            _ => None,
        })
        .await
    }
}

// ---------------------------------------------------------------------------
// A minimal media client

struct ClientHandler {
    target: proto::SignalTarget,
    signal: mpsc::UnboundedSender<WsMessage>,
    connected: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    user_opus: Arc<Mutex<Vec<Vec<u8>>>>,
    user_data: Arc<Mutex<Vec<proto::DataPacket>>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for ClientHandler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        let init = event.candidate.to_json().unwrap();
        let request = proto::SignalRequest {
            message: Some(proto::signal_request::Message::Trickle(
                proto::TrickleRequest {
                    candidate_init: serde_json::to_string(&init).unwrap(),
                    target: self.target as i32,
                    r#final: false,
                },
            )),
        };
        let _ = self
            .signal
            .send(WsMessage::Binary(request.encode_to_vec().into()));
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.connected.store(
            state == RTCPeerConnectionState::Connected,
            Ordering::Release,
        );
        if matches!(
            state,
            RTCPeerConnectionState::Failed | RTCPeerConnectionState::Disconnected
        ) {
            self.failed.store(true, Ordering::Release);
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let sink = self.user_opus.clone();
        assert_eq!(
            track.track_id().await,
            USER_TRACK_SID,
            "the user's track id is its sid"
        );
        tokio::spawn(async move {
            while let Some(event) = track.poll().await {
                match event {
                    TrackRemoteEvent::OnRtpPacket(pkt) => {
                        sink.lock().unwrap().push(pkt.payload.to_vec())
                    }
                    TrackRemoteEvent::OnEnded => break,
                    _ => {}
                }
            }
        });
    }

    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        let sink = self.user_data.clone();
        tokio::spawn(async move {
            while let Some(event) = dc.poll().await {
                match event {
                    DataChannelEvent::OnMessage(m) => {
                        if let Ok(p) = proto::DataPacket::decode(m.data.as_ref()) {
                            sink.lock().unwrap().push(p);
                        }
                    }
                    DataChannelEvent::OnClose => break,
                    _ => {}
                }
            }
        });
    }
}

async fn client_pc(handler: ClientHandler) -> Arc<dyn PeerConnection> {
    let mut media = MediaEngine::default();
    media.register_default_codecs().unwrap();
    let registry = register_default_interceptors(Registry::new(), &mut media).unwrap();
    Arc::new(
        PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .with_handler(Arc::new(handler))
            .with_udp_addrs(vec!["127.0.0.1:0".to_owned()])
            .build()
            .await
            .unwrap(),
    )
}

/// `Default` of a function's fifth parameter (the webrtc crate does not
/// export `rtc`'s parameter types).
fn fifth_arg_default<A, B, C, D, E: Default, R>(_f: fn(A, B, C, D, E) -> R) -> E {
    E::default()
}

fn second_arg_default<A, B: Default, R>(_f: fn(A, B) -> R) -> B {
    B::default()
}

struct Client {
    join: proto::JoinResponse,
    signal_tx: mpsc::UnboundedSender<WsMessage>,
    others: mpsc::UnboundedReceiver<Incoming>,
    publisher: Arc<dyn PeerConnection>,
    subscriber: Arc<dyn PeerConnection>,
    pub_connected: Arc<AtomicBool>,
    sub_connected: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    track: Arc<TrackLocalStaticRTP>,
    reliable: Arc<dyn DataChannel>,
    reliable_open: Arc<AtomicBool>,
    user_opus: Arc<Mutex<Vec<Vec<u8>>>>,
    user_data: Arc<Mutex<Vec<proto::DataPacket>>>,
    published: proto::TrackInfo,
}

const AGENT_SSRC: u32 = 0x0A6E_0001;

impl Client {
    /// Joins, answers the subscriber offer, publishes an Opus track.
    async fn join(room: &TestRoom, identity: &str) -> Client {
        let mut signal = Signal::connect(&room.url(), &agent_token(room, identity), true, "")
            .await
            .expect("join accepted");
        let join = signal
            .expect(|m| match m {
                proto::signal_response::Message::Join(j) => Some(j),
                _ => None,
            })
            .await;
        let (pub_connected, sub_connected, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let user_opus = Arc::new(Mutex::new(Vec::new()));
        let user_data = Arc::new(Mutex::new(Vec::new()));
        let handler = |target, connected: &Arc<AtomicBool>| ClientHandler {
            target,
            signal: signal.tx.clone(),
            connected: connected.clone(),
            failed: failed.clone(),
            user_opus: user_opus.clone(),
            user_data: user_data.clone(),
        };
        let publisher = client_pc(handler(proto::SignalTarget::Publisher, &pub_connected)).await;
        let subscriber = client_pc(handler(proto::SignalTarget::Subscriber, &sub_connected)).await;

        let reliable = publisher
            .create_data_channel(
                "_reliable",
                Some(RTCDataChannelInit {
                    ordered: true,
                    ..Default::default()
                }),
            )
            .await
            .unwrap();
        let _lossy = publisher
            .create_data_channel(
                "_lossy",
                Some(RTCDataChannelInit {
                    ordered: false,
                    max_retransmits: Some(0),
                    ..Default::default()
                }),
            )
            .await
            .unwrap();
        let reliable_open = Arc::new(AtomicBool::new(false));
        {
            let (dc, open) = (reliable.clone(), reliable_open.clone());
            tokio::spawn(async move {
                while let Some(e) = dc.poll().await {
                    match e {
                        DataChannelEvent::OnOpen => open.store(true, Ordering::Release),
                        DataChannelEvent::OnClose => break,
                        _ => {}
                    }
                }
            });
        }

        let mut codings = fifth_arg_default(MediaStreamTrack::new);
        codings.push(Default::default());
        codings[0].rtp_coding_parameters.ssrc = Some(AGENT_SSRC);
        codings[0].codec.mime_type = "audio/opus".to_owned();
        codings[0].codec.clock_rate = 48_000;
        codings[0].codec.channels = 2;
        codings[0].codec.sdp_fmtp_line = "minptime=10;useinbandfec=1".to_owned();
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            "agent-stream".to_owned(),
            "agent-mic".to_owned(),
            "agent".to_owned(),
            "audio".into(),
            codings,
        )));
        publisher
            .add_track(track.clone() as Arc<dyn TrackLocal>)
            .await
            .unwrap();
        signal.send(proto::signal_request::Message::AddTrack(
            proto::AddTrackRequest {
                cid: "agent-mic".into(),
                name: "agent".into(),
                r#type: proto::TrackType::Audio as i32,
                source: proto::TrackSource::Microphone as i32,
                ..Default::default()
            },
        ));

        // Drive the exchange: the subscriber offer may come before or after
        // track_published.
        let mut published = None;
        let mut answered = false;
        let mut offered = false;
        let mut have_pub_answer = false;
        let (others_tx, others) = mpsc::unbounded_channel();
        while !(answered && have_pub_answer) {
            match signal.next().await {
                Incoming::Signal(proto::signal_response::Message::Offer(sd)) => {
                    subscriber
                        .set_remote_description(RTCSessionDescription::offer(sd.sdp).unwrap())
                        .await
                        .unwrap();
                    let answer = subscriber.create_answer(None).await.unwrap();
                    subscriber.set_local_description(answer).await.unwrap();
                    let sdp = subscriber.local_description().await.unwrap().sdp;
                    signal.send(proto::signal_request::Message::Answer(
                        proto::SessionDescription {
                            r#type: "answer".into(),
                            sdp,
                            id: sd.id,
                            ..Default::default()
                        },
                    ));
                    answered = true;
                }
                Incoming::Signal(proto::signal_response::Message::TrackPublished(tp)) => {
                    assert_eq!(tp.cid, "agent-mic");
                    published = tp.track;
                    let offer = publisher.create_offer(None).await.unwrap();
                    publisher.set_local_description(offer).await.unwrap();
                    let sdp = publisher.local_description().await.unwrap().sdp;
                    signal.send(proto::signal_request::Message::Offer(
                        proto::SessionDescription {
                            r#type: "offer".into(),
                            sdp,
                            id: 1,
                            ..Default::default()
                        },
                    ));
                    offered = true;
                }
                Incoming::Signal(proto::signal_response::Message::Answer(sd)) => {
                    assert!(offered, "an answer only after our offer");
                    publisher
                        .set_remote_description(RTCSessionDescription::answer(sd.sdp).unwrap())
                        .await
                        .unwrap();
                    have_pub_answer = true;
                }
                Incoming::Signal(proto::signal_response::Message::Trickle(t)) => {
                    let init: RTCIceCandidateInit =
                        serde_json::from_str(&t.candidate_init).unwrap();
                    let pc = if t.target == proto::SignalTarget::Subscriber as i32 {
                        &subscriber
                    } else {
                        &publisher
                    };
                    pc.add_ice_candidate(init).await.unwrap();
                }
                other => panic!("unexpected during join: {other:?}"),
            }
        }
        // Afterwards: trickles are applied, everything else goes to the test.
        let (sub, publ) = (subscriber.clone(), publisher.clone());
        tokio::spawn(async move {
            while let Some(incoming) = signal.rx.recv().await {
                if let Incoming::Signal(proto::signal_response::Message::Trickle(t)) = &incoming {
                    let init: RTCIceCandidateInit =
                        serde_json::from_str(&t.candidate_init).unwrap();
                    let pc = if t.target == proto::SignalTarget::Subscriber as i32 {
                        &sub
                    } else {
                        &publ
                    };
                    let _ = pc.add_ice_candidate(init).await;
                    continue;
                }
                if others_tx.send(incoming).is_err() {
                    break;
                }
            }
        });
        Client {
            join,
            signal_tx: signal.tx,
            others,
            publisher,
            subscriber,
            pub_connected,
            sub_connected,
            failed,
            track,
            reliable,
            reliable_open,
            user_opus,
            user_data,
            published: published.expect("track_published"),
        }
    }

    fn send(&self, m: proto::signal_request::Message) {
        let bytes = proto::SignalRequest { message: Some(m) }.encode_to_vec();
        let _ = self.signal_tx.send(WsMessage::Binary(bytes.into()));
    }

    async fn wait(&self, what: &str, f: impl Fn(&Client) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Publishes `pcm` (48 kHz) as Opus, paced in real time.
    async fn say(&self, pcm: &[i16]) {
        let encoder = Encoder::new(SampleRate::Hz48000, Channels::Mono, Application::Voip).unwrap();
        let mut out = vec![0u8; 4000];
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let (mut seq, mut ts) = (100u16, 5_000u32);
        for frame in pcm.chunks(960) {
            let mut f = frame.to_vec();
            f.resize(960, 0);
            let n = encoder.encode(&f, &mut out).unwrap();
            tick.tick().await;
            let mut packet = second_arg_default(<TrackLocalStaticRTP as TrackLocal>::write_rtp);
            packet.header.version = 2;
            packet.header.payload_type = 111;
            packet.header.sequence_number = seq;
            packet.header.timestamp = ts;
            packet.header.ssrc = AGENT_SSRC;
            packet.payload = bytes::Bytes::copy_from_slice(&out[..n]);
            self.track.write_rtp(packet).await.unwrap();
            seq = seq.wrapping_add(1);
            ts = ts.wrapping_add(960);
        }
    }

    /// The user's audio received so far, decoded at 48 kHz.
    fn user_pcm(&self) -> Vec<i16> {
        let mut decoder = Decoder::new(SampleRate::Hz48000, Channels::Mono).unwrap();
        let mut pcm = vec![0i16; 5760];
        let mut all = Vec::new();
        for p in self.user_opus.lock().unwrap().iter() {
            let n = decoder
                .decode(
                    Some(Packet::try_from(&p[..]).unwrap()),
                    MutSignals::try_from(&mut pcm[..]).unwrap(),
                    false,
                )
                .unwrap();
            all.extend_from_slice(&pcm[..n]);
        }
        all
    }

    async fn close(&self) {
        let _ = self.publisher.close().await;
        let _ = self.subscriber.close().await;
    }
}

fn dominant_ratio(x: &[i16], rate: u32, want: f64, other: f64) -> (f64, f64) {
    let r = livekit_room::rms(x);
    (
        livekit_room::goertzel(x, rate, want) / r,
        livekit_room::goertzel(x, rate, other) / r,
    )
}

// ---------------------------------------------------------------------------
// Tests

/// A whole exchange over real WebRTC: the user's Opus tone reaches the
/// client, the client's published tone comes back decoded with its length
/// and pitch, data packets go both ways, pings are answered, and the join is
/// recorded with its grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_and_data_flow_both_ways() {
    let room = TestRoom::start(KEY, SECRET).await;
    let client = Client::join(&room, "agent-1").await;

    // The join response describes the room as LiveKit does.
    let join = &client.join;
    assert_eq!(join.room.as_ref().unwrap().name, room.room_name());
    assert!(join.subscriber_primary);
    assert_eq!(join.participant.as_ref().unwrap().identity, "agent-1");
    assert_eq!(
        join.participant.as_ref().unwrap().kind,
        proto::participant_info::Kind::Agent as i32
    );
    assert_eq!(join.other_participants.len(), 1);
    assert_eq!(join.other_participants[0].identity, USER_IDENTITY);
    assert_eq!(join.other_participants[0].tracks[0].sid, USER_TRACK_SID);
    assert!(join.ping_interval > 0 && join.ping_timeout > join.ping_interval);
    assert!(client.published.sid.starts_with("TR_"));

    let identity = room.wait_for_agent(Duration::from_secs(15)).await.unwrap();
    assert_eq!(identity, "agent-1");
    client
        .wait("both peer connections", |c| {
            c.pub_connected.load(Ordering::Acquire) && c.sub_connected.load(Ordering::Acquire)
        })
        .await;

    // User -> client: 1 s of 300 Hz at 16 kHz.
    let said = livekit_room::tone(300.0, 16_000, Duration::from_secs(1), 8_000);
    room.user_says(&said, 16_000).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let heard = client.user_pcm();
    let voiced: Vec<i16> = heard
        .chunks(960)
        .filter(|c| livekit_room::rms(c) > livekit_room::VOICED_RMS)
        .flatten()
        .copied()
        .collect();
    let secs = voiced.len() as f64 / 48_000.0;
    assert!(
        (0.9..=1.1).contains(&secs),
        "the client heard {secs} s of the user's 1 s tone"
    );
    let (at_300, at_440) = dominant_ratio(&voiced, 48_000, 300.0, 440.0);
    assert!(
        at_300 > 1.2 && at_440 < 0.1,
        "user tone levels: 300 Hz {at_300}, 440 Hz {at_440}"
    );

    // Client -> room: 1.2 s of 440 Hz at 48 kHz.
    room.clear_agent_audio();
    let reply = livekit_room::tone(440.0, 48_000, Duration::from_millis(1200), 8_000);
    client.say(&reply).await;
    let audio = room.wait_agent_turn(Duration::from_secs(10)).await;
    let voiced = audio.voiced().as_secs_f64();
    assert!(
        (1.1..=1.3).contains(&voiced),
        "the room heard {voiced} s of the agent's 1.2 s tone"
    );
    assert!(
        audio.tone_level(440.0) > 1.2,
        "440 Hz level {}",
        audio.tone_level(440.0)
    );
    assert!(
        audio.tone_level(300.0) < 0.1,
        "300 Hz level {}",
        audio.tone_level(300.0)
    );
    assert_eq!(audio.undecodable, 0);
    let at_16k = room.agent_audio(16_000);
    assert!((at_16k.voiced().as_secs_f64() - voiced).abs() < 0.05);
    let tracks = room.agent_tracks();
    assert_eq!(tracks.len(), 1);
    assert_eq!(
        tracks[0].mime_type, "audio/opus",
        "the track was matched to the published cid"
    );

    // Client -> room data on `_reliable`.
    client
        .wait("the reliable channel", |c| {
            c.reliable_open.load(Ordering::Acquire)
        })
        .await;
    let packet = proto::DataPacket {
        participant_identity: "agent-1".into(),
        value: Some(proto::data_packet::Value::User(proto::UserPacket {
            payload: b"{\"text\":\"hello\"}".to_vec(),
            topic: Some("lk.transcription".into()),
            ..Default::default()
        })),
        ..Default::default()
    };
    client
        .reliable
        .send(bytes::BytesMut::from(&packet.encode_to_vec()[..]))
        .await
        .unwrap();
    client
        .reliable
        .send(bytes::BytesMut::from(&b"\xff\xff\xff"[..]))
        .await
        .unwrap();
    let data = room.wait_agent_data(1, Duration::from_secs(5)).await;
    assert_eq!(data.len(), 1);
    assert_eq!(data[0].topic.as_deref(), Some("lk.transcription"));
    assert_eq!(data[0].payload, b"{\"text\":\"hello\"}");
    assert_eq!(data[0].kind, DataKind::Reliable);
    assert_eq!(data[0].participant_identity, "agent-1");
    assert!(
        room.wait_until(Duration::from_secs(5), |r| r.counters().malformed_data == 1)
            .await
    );

    // Room (user) -> client data on the subscriber channel.
    room.user_sends_data("lk.chat", b"hi agent").await.unwrap();
    client
        .wait("the user's data", |c| {
            !c.user_data.lock().unwrap().is_empty()
        })
        .await;
    let got = client.user_data.lock().unwrap()[0].clone();
    assert_eq!(got.participant_identity, USER_IDENTITY);
    match got.value {
        Some(proto::data_packet::Value::User(u)) => {
            assert_eq!(u.payload, b"hi agent");
            assert_eq!(u.topic.as_deref(), Some("lk.chat"));
        }
        other => panic!("expected a user packet, got {other:?}"),
    }

    // Ping.
    client.send(proto::signal_request::Message::PingReq(proto::Ping {
        timestamp: 42,
        rtt: 0,
    }));
    let mut client = client;
    let pong = loop {
        match tokio::time::timeout(Duration::from_secs(5), client.others.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Incoming::Signal(proto::signal_response::Message::PongResp(p)) => break p,
            _ => continue,
        }
    };
    assert_eq!(pong.last_ping_timestamp, 42);

    let c = room.counters();
    assert_eq!(
        (
            c.joins,
            c.pings,
            c.publisher_offers,
            c.subscriber_answers,
            c.tracks_published
        ),
        (1, 1, 1, 1, 1)
    );
    assert!(c.trickles > 0, "the client's candidates trickled");
    let joins = room.joins();
    assert_eq!(joins.len(), 1);
    assert_eq!(joins[0].identity, "agent-1");
    assert_eq!(joins[0].kind, "agent");
    assert!(joins[0].grants.agent && joins[0].grants.room_join);
    assert_eq!(joins[0].token_place, livekit_room::TokenPlace::Header);
    assert_eq!(
        joins[0].query.get("auto_subscribe").map(String::as_str),
        Some("1")
    );

    // Leave.
    client.send(proto::signal_request::Message::Leave(
        proto::LeaveRequest::default(),
    ));
    assert!(
        room.wait_until(Duration::from_secs(5), |r| r.participants().is_empty())
            .await
    );
    assert_eq!(room.counters().leaves, 1);
    client.close().await;
}

/// Tokens are checked like LiveKit's: signature, issuer, expiry, roomJoin,
/// room and identity; header or query; `/rtc/validate` and `/rtc/v1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked() {
    let room = TestRoom::start(KEY, SECRET).await;
    let url = room.url();
    let grants = |room_name: &str, join: bool| VideoGrants {
        room_join: join,
        room: room_name.to_owned(),
        ..Default::default()
    };
    let mint = |key: &str, secret: &str, g: VideoGrants, identity: &str| {
        AccessToken::with_api_key(key, secret)
            .with_identity(identity)
            .with_grants(g)
            .to_jwt()
            .unwrap()
    };
    let cases = [
        (
            "wrong secret",
            mint(
                KEY,
                "another-secret-of-32-characters-xx",
                grants("test-room", true),
                "a",
            ),
        ),
        (
            "wrong key",
            mint("APIother", SECRET, grants("test-room", true), "a"),
        ),
        (
            "wrong room",
            mint(KEY, SECRET, grants("other-room", true), "a"),
        ),
        (
            "no roomJoin",
            mint(KEY, SECRET, grants("test-room", false), "a"),
        ),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (what, token) in &cases {
        let status = Signal::connect(&url, token, true, "").await.err();
        assert_eq!(status, Some(401), "{what} must be refused with 401");
    }
    assert_eq!(
        Signal::connect(&url, "", false, "").await.err(),
        Some(401),
        "no token"
    );
    assert_eq!(room.refusals().len(), cases.len() + 1);
    assert!(room.refusals().iter().all(|r| r.status == 401));
    assert_eq!(room.counters().joins, 0);

    // The same token works in the header and in the query.
    let good = room.token("someone", VideoGrants::default());
    let mut by_header = Signal::connect(&url, &good, true, "").await.unwrap();
    by_header
        .expect(|m| matches!(m, proto::signal_response::Message::Join(_)).then_some(()))
        .await;
    let mut by_query = Signal::connect(&url, &good, false, "").await.unwrap();
    by_query
        .expect(|m| matches!(m, proto::signal_response::Message::Join(_)).then_some(()))
        .await;
    // The second join with the same identity replaced the first.
    by_header
        .expect(|m| match m {
            proto::signal_response::Message::Leave(l) => {
                assert_eq!(l.reason, proto::DisconnectReason::DuplicateIdentity as i32);
                Some(())
            }
            _ => None,
        })
        .await;
    let places: Vec<_> = room.joins().iter().map(|j| j.token_place).collect();
    assert_eq!(
        places,
        [
            livekit_room::TokenPlace::Header,
            livekit_room::TokenPlace::Query
        ]
    );

    // /rtc/validate and /rtc/v1 over plain HTTP.
    let addr = url.trim_start_matches("ws://").to_owned();
    let ok = http_get(&addr, &format!("/rtc/validate?access_token={good}")).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let bad = http_get(&addr, "/rtc/validate?access_token=nope").await;
    assert!(bad.starts_with("HTTP/1.1 401"), "{bad}");
    let v1 = http_get(&addr, &format!("/rtc/v1?access_token={good}")).await;
    assert!(v1.starts_with("HTTP/1.1 404"), "{v1}");
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// A dropped signal socket ends without a close frame; a reconnect with
/// `reconnect=1&sid=` resumes the same participant, and the resumed socket
/// still answers pings. Malformed frames go both ways without ending it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_drop_resumes_and_malformed_frames_are_counted() {
    let room = TestRoom::start(KEY, SECRET).await;
    let token = agent_token(&room, "agent-2");
    let mut signal = Signal::connect(&room.url(), &token, true, "")
        .await
        .unwrap();
    let join = signal
        .expect(|m| match m {
            proto::signal_response::Message::Join(j) => Some(j),
            _ => None,
        })
        .await;
    let sid = join.participant.unwrap().sid;
    assert_eq!(signal.ping().await, 1_234_567);

    // Malformed both ways.
    assert_eq!(room.send_malformed(), 1);
    loop {
        match signal.next().await {
            Incoming::Undecodable(bytes) => {
                assert!(proto::SignalResponse::decode(&bytes[..]).is_err());
                break;
            }
            Incoming::Signal(_) => continue,
            Incoming::Ended(_) => panic!("the socket ended"),
        }
    }
    let _ = signal
        .tx
        .send(WsMessage::Binary(vec![0xff, 0x01, 0x02].into()));
    let _ = signal.tx.send(WsMessage::Text("{not json".into()));
    assert_eq!(
        signal.ping().await,
        1_234_567,
        "the room still answers after malformed frames"
    );
    assert_eq!(room.counters().malformed_requests, 2);

    // Drop: the socket ends with no close frame.
    assert_eq!(room.drop_signal(), 1);
    loop {
        match signal.next().await {
            Incoming::Ended(close_frame) => {
                assert!(!close_frame, "dropped abruptly, not closed");
                break;
            }
            _ => continue,
        }
    }
    // Resume.
    let mut resumed = Signal::connect(
        &room.url(),
        &token,
        true,
        &format!("&reconnect=1&sid={sid}"),
    )
    .await
    .unwrap();
    resumed
        .expect(|m| matches!(m, proto::signal_response::Message::Reconnect(_)).then_some(()))
        .await;
    assert_eq!(resumed.ping().await, 1_234_567);
    let c = room.counters();
    assert_eq!((c.joins, c.resumes, c.signal_drops), (1, 1, 1));
    let joins = room.joins();
    assert!(joins[1].reconnect && joins[1].resumed && joins[1].participant_sid == sid);

    // A resume of an unknown sid is told to rejoin.
    let mut stale = Signal::connect(&room.url(), &token, true, "&reconnect=1&sid=PA_unknown")
        .await
        .unwrap();
    let leave = stale
        .expect(|m| match m {
            proto::signal_response::Message::Leave(l) => Some(l),
            _ => None,
        })
        .await;
    assert_eq!(leave.action, proto::leave_request::Action::Reconnect as i32);
    assert!(leave.can_reconnect);
}

/// `kill_ice` stops the media path: the client's connections fail, its
/// resume is refused with `leave{action: RECONNECT}`, and a fresh join gets
/// working media again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_ice_fails_media_and_a_fresh_join_recovers() {
    let room = TestRoom::start(KEY, SECRET).await;
    let client = Client::join(&room, "agent-3").await;
    room.wait_for_agent(Duration::from_secs(15)).await.unwrap();
    assert_eq!(room.kill_ice(), 1);
    let deadline = Instant::now() + Duration::from_secs(40);
    while !client.failed.load(Ordering::Acquire) {
        assert!(
            Instant::now() < deadline,
            "the client's ICE did not fail after kill_ice"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        room.wait_for_agent(Duration::from_millis(200))
            .await
            .is_err(),
        "killed media is not ready"
    );
    let sid = client.join.participant.as_ref().unwrap().sid.clone();
    let token = agent_token(&room, "agent-3");
    let mut resume = Signal::connect(
        &room.url(),
        &token,
        true,
        &format!("&reconnect=1&sid={sid}"),
    )
    .await
    .unwrap();
    let leave = resume
        .expect(|m| match m {
            proto::signal_response::Message::Leave(l) => Some(l),
            _ => None,
        })
        .await;
    assert_eq!(leave.action, proto::leave_request::Action::Reconnect as i32);
    client.close().await;

    let again = Client::join(&room, "agent-3").await;
    room.wait_for_agent(Duration::from_secs(15)).await.unwrap();
    room.user_says(
        &livekit_room::tone(300.0, 48_000, Duration::from_millis(400), 8_000),
        48_000,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let heard = again.user_pcm();
    assert!(
        livekit_room::rms(&heard) > 1_000.0,
        "media flows after the fresh join"
    );
    let c = room.counters();
    assert_eq!((c.joins, c.resumes_refused, c.ice_kills), (2, 1, 1));
    again.close().await;
}

/// The room can be started with other options.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_reach_the_join_response() {
    let mut options = RoomOptions::new(KEY, SECRET);
    options.room_name = "other".into();
    options.ping_interval = 2;
    options.ping_timeout = 6;
    let room = TestRoom::start_with(options).await;
    let token = room.token("x", VideoGrants::default());
    let mut s = Signal::connect(&room.url(), &token, true, "")
        .await
        .unwrap();
    let join = s
        .expect(|m| match m {
            proto::signal_response::Message::Join(j) => Some(j),
            _ => None,
        })
        .await;
    assert_eq!(join.room.unwrap().name, "other");
    assert_eq!((join.ping_interval, join.ping_timeout), (2, 6));
}

/// LiveKit's official Python client (`livekit` from PyPI, with its own
/// native WebRTC) as the agent: it joins, subscribes to the user's track and
/// hears the user's tone, publishes a tone the room decodes, and data goes
/// both ways. Runs when `VOICE_BACKENDS_LIVEKIT_RTC_PYTHON` names the venv
/// python (`./scripts/venv livekit-rtc tests/livekit_room/py/requirements.txt`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_client_is_served() {
    let Some(python) = std::env::var_os("VOICE_BACKENDS_LIVEKIT_RTC_PYTHON") else {
        eprintln!(
            "skipped: set VOICE_BACKENDS_LIVEKIT_RTC_PYTHON to a venv made by ./scripts/venv livekit-rtc tests/livekit_room/py/requirements.txt"
        );
        return;
    };
    let room = TestRoom::start(KEY, SECRET).await;
    let token = agent_token(&room, "py-agent");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/livekit_room/py/agent.py"
    );
    let child = std::process::Command::new(python)
        .arg(script)
        .arg(room.url())
        .arg(&token)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the Python client");
    let pid = child.id();
    let guard = KillOnDrop(pid);

    room.wait_for_agent(Duration::from_secs(30)).await.unwrap();
    let said = livekit_room::tone(300.0, 16_000, Duration::from_secs(1), 8_000);
    room.user_says(&said, 16_000).await.unwrap();
    let audio = room.wait_agent_turn(Duration::from_secs(20)).await;
    let data = room.wait_agent_data(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    room.user_sends_data("test.done", b"bye").await.unwrap();

    let output = tokio::time::timeout(
        Duration::from_secs(40),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("the Python client finished")
    .unwrap()
    .unwrap();
    std::mem::forget(guard);
    assert!(output.status.success(), "the Python client failed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("bad report {stdout:?}: {e}"));
    eprintln!("python client: {report}");

    // What the official client saw of the room.
    assert_eq!(
        report["remote_participants"],
        serde_json::json!([USER_IDENTITY])
    );
    assert_eq!(
        report["events"]["track_subscribed"][0]["sid"],
        USER_TRACK_SID
    );
    assert_eq!(
        report["events"]["track_subscribed"][0]["participant"],
        USER_IDENTITY
    );
    let voiced = report["voiced_seconds"].as_f64().unwrap();
    // The native client's jitter buffer may stretch or conceal under load,
    // so its length is loose; the pitch is the content check.
    assert!(
        (0.8..=1.5).contains(&voiced),
        "the client heard {voiced} s of the 1 s tone"
    );
    assert!(report["level_300"].as_f64().unwrap() > 1.2, "{report}");
    assert!(report["level_440"].as_f64().unwrap() < 0.1, "{report}");
    let user_data = &report["events"]["data"][0];
    assert_eq!(user_data["topic"], "test.done");
    assert_eq!(user_data["from"], USER_IDENTITY);

    // What the room got from it.
    let voiced = audio.voiced().as_secs_f64();
    assert!(
        (1.1..=1.3).contains(&voiced),
        "the room heard {voiced} s of the client's 1.2 s tone"
    );
    assert!(
        audio.tone_level(440.0) > 1.2,
        "440 Hz level {}",
        audio.tone_level(440.0)
    );
    let tracks = room.agent_tracks();
    assert_eq!(report["published_sid"], tracks[0].sid.as_str());
    assert_eq!(tracks[0].source, proto::TrackSource::Microphone as i32);
    let hello = data
        .iter()
        .find(|d| d.topic.as_deref() == Some("lk.transcription"))
        .expect("the client's data");
    assert_eq!(hello.payload, br#"{"text": "hello from python"}"#);
    assert_eq!(hello.kind, DataKind::Reliable);

    // Its join and leave.
    let joins = room.joins();
    assert_eq!(joins[0].identity, "py-agent");
    assert!(joins[0].query.contains_key("sdk") && joins[0].query.contains_key("protocol"));
    assert!(
        room.wait_until(Duration::from_secs(5), |r| r.counters().leaves == 1)
            .await
    );
}

/// Kills a child process (by its id) if the test fails before it exits.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.0.to_string())
            .status();
    }
}
