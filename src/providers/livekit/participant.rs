//! The agent as a participant of one session's room: it joins (signal +
//! both peer connections), hears the user's microphone track (Opus -> PCM
//! into the session), publishes the session's reply as its own track (PCM
//! -> Opus, 20 ms RTP packets paced in real time), relays transcripts and
//! agent text on the data channel, rejoins after the signal connection or
//! ICE is lost (the backend's retry policy), and leaves when the session
//! ends.
//!
//! One task per session owns all of it; the session talks to it through
//! the [`MediaLink`] [`open`] returns.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use livekit_protocol as proto;
use proto::signal_request::Message as Request;
use proto::signal_response::Message as Response;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::RTCPeerConnectionState;

use super::opus::{OpusDecoder, OpusEncoder};
use super::rtc::{self, PcEvent, RtpWriter, Target, Transports};
use super::signal::{Opened, Signal, SignalEvent, Start};
use super::{JoinTarget, LiveKitConfig};
use crate::audio::AudioFrame;
use crate::backend::ConnectionState;
use crate::config::Secret;
use crate::error::{BackendError, ErrorCode, Result};
use crate::pipeline::events::SessionEvent;
use crate::runtime::{LinkEvent, LinkEvents, LinkRequest, MediaLink, RetryPolicy};

const OP: &str = "livekit.join";

/// User audio frames waiting for the session (about a second).
const AUDIO_IN_QUEUE: usize = 64;
/// Reply frames waiting for the encoder.
const AUDIO_OUT_QUEUE: usize = 64;
/// Session events waiting for the data channel.
const RELAY_QUEUE: usize = 64;
/// Link events waiting for the session.
const EVENT_QUEUE: usize = 16;
/// The most lost packets concealed at once; a longer gap is left silent.
const MAX_CONCEALED: u16 = 3;
/// One RTP packet of reply audio.
const PACKET: Duration = Duration::from_millis(20);
/// How long leaving the room and closing its connections may take.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// Data messages kept while the data channel opens; older ones are dropped.
const DATA_BACKLOG: usize = 64;

/// What a backend's LiveKit sessions counted, for its health details.
#[derive(Debug, Default)]
pub struct LiveKitCounters {
    joins: AtomicU64,
    rejoins: AtomicU64,
    malformed: AtomicU64,
    warned_malformed: AtomicBool,
    rtp_in: AtomicU64,
    rtp_out: AtomicU64,
    decode_errors: AtomicU64,
    concealed: AtomicU64,
    audio_dropped: AtomicU64,
    data_sent: AtomicU64,
    data_dropped: AtomicU64,
    candidate_errors: AtomicU64,
}

impl LiveKitCounters {
    /// Counts a signal message that was not a `SignalResponse` (logged
    /// once per backend).
    pub fn malformed_signal(&self, why: &str) {
        self.malformed.fetch_add(1, Ordering::Relaxed);
        if !self.warned_malformed.swap(true, Ordering::Relaxed) {
            tracing::warn!("a LiveKit signal message was skipped: {why}");
        }
    }

    /// Signal messages skipped as malformed.
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }

    /// Rooms joined, rejoins included.
    pub fn joins(&self) -> u64 {
        self.joins.load(Ordering::Relaxed)
    }

    /// Rejoins after a lost signal connection or ICE.
    pub fn rejoins(&self) -> u64 {
        self.rejoins.load(Ordering::Relaxed)
    }

    /// RTP packets of user audio decoded.
    pub fn rtp_in(&self) -> u64 {
        self.rtp_in.load(Ordering::Relaxed)
    }

    /// RTP packets of reply audio sent.
    pub fn rtp_out(&self) -> u64 {
        self.rtp_out.load(Ordering::Relaxed)
    }

    /// User audio packets Opus refused.
    pub fn decode_errors(&self) -> u64 {
        self.decode_errors.load(Ordering::Relaxed)
    }

    /// Data-channel messages sent (transcripts, agent text).
    pub fn data_sent(&self) -> u64 {
        self.data_sent.load(Ordering::Relaxed)
    }

    /// The counters as health details (`livekit.*`).
    pub fn health(&self) -> BTreeMap<String, String> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed).to_string();
        [
            ("joins", get(&self.joins)),
            ("rejoins", get(&self.rejoins)),
            ("malformed_signal", get(&self.malformed)),
            ("rtp_in", get(&self.rtp_in)),
            ("rtp_out", get(&self.rtp_out)),
            ("decode_errors", get(&self.decode_errors)),
            ("concealed", get(&self.concealed)),
            ("audio_dropped", get(&self.audio_dropped)),
            ("data_sent", get(&self.data_sent)),
            ("data_dropped", get(&self.data_dropped)),
            ("candidate_errors", get(&self.candidate_errors)),
        ]
        .into_iter()
        .map(|(k, v)| (format!("livekit.{k}"), v))
        .collect()
    }
}

/// Who is in the room and which tracks are whose, from the join and the
/// participant updates.
#[derive(Debug, Default)]
struct Roster {
    /// Track sid -> (participant identity, participant kind).
    tracks: HashMap<String, (String, i32)>,
}

impl Roster {
    fn update(&mut self, participants: &[proto::ParticipantInfo]) {
        for p in participants {
            let gone = p.state == proto::participant_info::State::Disconnected as i32;
            for t in &p.tracks {
                if gone {
                    self.tracks.remove(&t.sid);
                } else {
                    self.tracks
                        .insert(t.sid.clone(), (p.identity.clone(), p.kind));
                }
            }
        }
    }

    /// Whether the track `sid` is the user's: `user` names the user's
    /// identity; an empty `user` takes any participant that is not an agent.
    fn is_user(&self, sid: &str, user: &str) -> Option<bool> {
        let (identity, kind) = self.tracks.get(sid)?;
        Some(if user.is_empty() {
            *kind != proto::participant_info::Kind::Agent as i32
        } else {
            identity == user
        })
    }
}

/// What a session's participant owes the job it came from (worker mode):
/// a word when it ends, and an end when the server terminates the job.
/// Empty in direct mode.
#[derive(Default)]
pub(super) struct Lease {
    /// Called once when the participant is done: `None` when the session
    /// ended, the reason when the room was lost for good.
    pub on_end: Option<Box<dyn FnOnce(Option<String>) + Send>>,
    /// Resolves when the server terminates the job: the agent leaves.
    pub terminated: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

/// Opens a session's media link: joins the room now (so a refused token or
/// an unreachable server fails the session's creation), then hands the
/// room to a task that carries the session's media until it ends.
pub(super) async fn open(
    config: Arc<LiveKitConfig>,
    target: JoinTarget,
    request: &LinkRequest<'_>,
    counters: Arc<LiveKitCounters>,
    lease: Lease,
) -> Result<MediaLink> {
    let bind = config
        .rtc_bind
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    let (audio_tx, audio_in) = mpsc::channel(AUDIO_IN_QUEUE);
    let (audio_out, reply) = mpsc::channel(AUDIO_OUT_QUEUE);
    let (events, events_rx) = LinkEvents::channel(EVENT_QUEUE);
    let (relay_tx, relay) = if config.relay_text {
        let (tx, rx) = mpsc::channel(RELAY_QUEUE);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let mut participant = Participant {
        target,
        retry: request.retry,
        timeout: request.config.timeout,
        bind,
        audio_in: audio_tx,
        events,
        counters,
        roster: Arc::default(),
        config,
        session_id: request.session_id.to_owned(),
    };
    let mut output = Output {
        encoder: OpusEncoder::new(participant.config.opus_bitrate)?,
        outgoing: VecDeque::new(),
        pace: Instant::now(),
    };
    let live = participant.join().await?;
    let span = tracing::info_span!("livekit_participant", session_id = %request.session_id);
    let Lease { on_end, terminated } = lease;
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let failure = participant
                .run(live, &mut output, reply, relay, terminated)
                .await;
            if let Some(on_end) = on_end {
                on_end(failure);
            }
        },
        span,
    ));
    Ok(MediaLink {
        audio_in,
        audio_out,
        events: events_rx,
        session_events: relay_tx,
    })
}

struct Participant {
    config: Arc<LiveKitConfig>,
    target: JoinTarget,
    retry: RetryPolicy,
    timeout: Duration,
    bind: Vec<SocketAddr>,
    audio_in: mpsc::Sender<AudioFrame>,
    events: LinkEvents,
    counters: Arc<LiveKitCounters>,
    roster: Arc<Mutex<Roster>>,
    session_id: String,
}

/// The reply on its way out: the encoder and the packets waiting for their
/// time.
struct Output {
    encoder: OpusEncoder,
    /// Encoded reply packets and when each is due.
    outgoing: VecDeque<(Instant, Vec<u8>)>,
    /// When the next reply packet is due.
    pace: Instant,
}

/// One join of the room: its signal connection and peer connections.
struct Live {
    signal: Signal,
    transports: Transports,
    pc_events: mpsc::UnboundedReceiver<PcEvent>,
    sid: String,
    writer: RtpWriter,
    readers: Vec<JoinHandle<()>>,
    /// Whether the reliable data channel is open.
    data_open: bool,
    /// Resolves when the reliable data channel opens.
    data_opening: Option<JoinHandle<()>>,
    /// Data messages waiting for the channel to open.
    data_backlog: VecDeque<Vec<u8>>,
}

impl Live {
    /// Leaves (when `leave`) and closes the connections, within
    /// [`CLOSE_WAIT`].
    async fn close(self, leave: bool) {
        for reader in &self.readers {
            reader.abort();
        }
        if let Some(opening) = &self.data_opening {
            opening.abort();
        }
        let closing = async {
            if leave {
                self.signal.leave().await;
            }
            self.transports.close().await;
        };
        if tokio::time::timeout(CLOSE_WAIT, closing).await.is_err() {
            tracing::debug!("closing the room's connections took longer than {CLOSE_WAIT:?}");
        }
    }
}

/// Why serving a join stopped.
enum Stop {
    /// The session ended: leave.
    SessionGone,
    /// The signal connection or the media was lost: rejoin.
    Lost(String),
    /// The server removed the agent for good.
    Removed(String),
    /// The server terminated the session's job (worker mode): leave.
    Terminated,
}

impl Participant {
    /// Joins the room afresh: the signal connection, then both peer
    /// connections, then the reply track's `add_track`.
    async fn join(&self) -> Result<Live> {
        let (signal, opened) = Signal::connect(
            &self.target.url,
            &self.target.token,
            &Start::Join,
            self.timeout,
            self.counters.clone(),
        )
        .await?;
        let Opened::Joined(join) = opened else {
            return Err(BackendError::new(
                OP,
                ErrorCode::ConnectionFailed,
                "the LiveKit server answered a join with a resume",
            ));
        };
        let sid = join
            .participant
            .as_ref()
            .map(|p| p.sid.clone())
            .unwrap_or_default();
        self.roster
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .update(&join.other_participants);
        let (tx, pc_events) = mpsc::unbounded_channel();
        let transports = Transports::new(&sid, &join.ice_servers, &self.bind, tx).await?;
        let add = Request::AddTrack(proto::AddTrackRequest {
            cid: transports.track_id.clone(),
            name: "agent-voice".to_owned(),
            r#type: proto::TrackType::Audio as i32,
            source: proto::TrackSource::Microphone as i32,
            ..Default::default()
        });
        if !signal.send(add).await {
            transports.close().await;
            return Err(BackendError::new(
                OP,
                ErrorCode::ConnectionFailed,
                "the LiveKit signal connection closed right after the join",
            ));
        }
        self.counters.joins.fetch_add(1, Ordering::Relaxed);
        let writer = transports.rtp_writer(None);
        let data_opening = Some(tokio::spawn(rtc::opened(transports.reliable.clone())));
        tracing::debug!(room = %self.target.room, "joined the room");
        Ok(Live {
            signal,
            transports,
            pc_events,
            sid,
            writer,
            readers: Vec::new(),
            data_open: false,
            data_opening,
            data_backlog: VecDeque::new(),
        })
    }

    /// Carries the session's media until it ends, rejoining when the room
    /// is lost.
    /// Carries the session's media until it ends; `None` when the session
    /// ended, the reason when the room was lost for good.
    async fn run(
        &mut self,
        mut live: Live,
        output: &mut Output,
        mut reply: mpsc::Receiver<AudioFrame>,
        mut relay: Option<mpsc::Receiver<SessionEvent>>,
        mut terminated: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    ) -> Option<String> {
        loop {
            let stop = tokio::select! {
                stop = self.serve(&mut live, output, &mut reply, &mut relay) => stop,
                () = future_opt(&mut terminated) => Stop::Terminated,
            };
            match stop {
                Stop::SessionGone => {
                    live.close(true).await;
                    tracing::debug!(room = %self.target.room, "left the room");
                    return None;
                }
                Stop::Terminated => {
                    self.events
                        .send(LinkEvent::Failed {
                            code: ErrorCode::ContextCanceled,
                            message: "LiveKit terminated the session's job".to_owned(),
                        })
                        .await;
                    live.close(true).await;
                    return None;
                }
                Stop::Removed(why) => {
                    let why = format!("the agent was removed from the LiveKit room: {why}");
                    self.events
                        .send(LinkEvent::Failed {
                            code: ErrorCode::ConnectionFailed,
                            message: why.clone(),
                        })
                        .await;
                    live.close(false).await;
                    return Some(why);
                }
                Stop::Lost(why) => {
                    tracing::warn!(room = %self.target.room, "the LiveKit room was lost, rejoining: {why}");
                    live.close(false).await;
                    self.counters.rejoins.fetch_add(1, Ordering::Relaxed);
                    self.events
                        .send(LinkEvent::Connection(ConnectionState::Reconnecting))
                        .await;
                    let rejoined = tokio::select! {
                        r = self.retry.run(OP, "the LiveKit room", || self.join(), |attempt, delay, e| {
                            tracing::warn!(attempt, code = %e.code, "rejoining failed, retrying in {delay:?}: {}", e.message);
                        }) => r,
                        _ = self.events.closed() => return None,
                        () = future_opt(&mut terminated) => return None,
                    };
                    match rejoined {
                        Ok(new) => {
                            live = new;
                            // Reply audio made while the room was away is stale.
                            while reply.try_recv().is_ok() {}
                            output.outgoing.clear();
                            self.events
                                .send(LinkEvent::Connection(ConnectionState::Connected))
                                .await;
                        }
                        Err(e) => {
                            self.events
                                .send(LinkEvent::Failed {
                                    code: e.code,
                                    message: e.message.clone(),
                                })
                                .await;
                            return Some(e.message.clone());
                        }
                    }
                }
            }
        }
    }

    /// Serves one join until it stops.
    async fn serve(
        &mut self,
        live: &mut Live,
        output: &mut Output,
        reply: &mut mpsc::Receiver<AudioFrame>,
        relay: &mut Option<mpsc::Receiver<SessionEvent>>,
    ) -> Stop {
        loop {
            let next_due = output.outgoing.front().map(|(due, _)| *due);
            tokio::select! {
                event = live.signal.recv() => match event {
                    Some(SignalEvent::Message(message)) => {
                        if let Some(stop) = self.on_signal(live, *message).await {
                            return stop;
                        }
                    }
                    Some(SignalEvent::Closed(why)) => {
                        return Stop::Lost(format!("the signal connection ended: {why}"));
                    }
                    None => return Stop::Lost("the signal connection ended".into()),
                },
                event = live.pc_events.recv() => match event {
                    Some(PcEvent::Candidate(target, init)) => {
                        let Ok(json) = serde_json::to_string(&init) else { continue };
                        live.signal.send(Request::Trickle(proto::TrickleRequest {
                            candidate_init: json,
                            target: target.signal() as i32,
                            r#final: false,
                        })).await;
                    }
                    Some(PcEvent::State(target, RTCPeerConnectionState::Failed)) => {
                        return Stop::Lost(format!("the {target:?} connection's ICE failed"));
                    }
                    Some(PcEvent::State(..)) => {}
                    Some(PcEvent::Track(track)) => {
                        live.readers.push(tokio::spawn(read_user(
                            track,
                            self.roster.clone(),
                            self.target.user_identity.clone(),
                            self.audio_in.clone(),
                            self.counters.clone(),
                        )));
                    }
                    None => return Stop::Lost("the peer connections ended".into()),
                },
                frame = reply.recv() => match frame {
                    Some(frame) => output.encode(&frame),
                    None => return Stop::SessionGone,
                },
                () = sleep_until(next_due) => {
                    if let Some(stop) = output.send_due(live, &self.counters).await {
                        return stop;
                    }
                }
                event = recv_opt(relay) => match event {
                    Some(event) => self.relay(live, &event).await,
                    None => *relay = None,
                },
                _ = join_opt(&mut live.data_opening) => {
                    live.data_opening = None;
                    live.data_open = true;
                    while let Some(message) = live.data_backlog.pop_front() {
                        self.send_data(live, &message).await;
                    }
                }
                () = self.events.closed() => return Stop::SessionGone,
            }
        }
    }

    async fn on_signal(&mut self, live: &mut Live, message: Response) -> Option<Stop> {
        match message {
            Response::Offer(offer) => match live.transports.subscriber_answer(offer.sdp).await {
                Ok(sdp) => {
                    live.signal
                        .send(Request::Answer(proto::SessionDescription {
                            r#type: "answer".to_owned(),
                            sdp,
                            id: offer.id,
                            ..Default::default()
                        }))
                        .await;
                }
                Err(e) => return Some(Stop::Lost(e.message.clone())),
            },
            Response::Answer(answer) => {
                if let Err(e) = live.transports.publisher_answer(answer.sdp).await {
                    return Some(Stop::Lost(e.message.clone()));
                }
                if let Some(pt) = live.transports.opus_payload_type().await {
                    live.writer.set_payload_type(pt);
                }
            }
            Response::Trickle(trickle) => {
                let target = Target::from_signal(trickle.target);
                if let Err(e) = live
                    .transports
                    .add_candidate(target, &trickle.candidate_init)
                    .await
                {
                    self.counters
                        .candidate_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("a trickled candidate was skipped: {}", e.message);
                }
            }
            Response::TrackPublished(published) if published.cid == live.transports.track_id => {
                match live.transports.publisher_offer().await {
                    Ok(sdp) => {
                        live.signal
                            .send(Request::Offer(proto::SessionDescription {
                                r#type: "offer".to_owned(),
                                sdp,
                                ..Default::default()
                            }))
                            .await;
                    }
                    Err(e) => return Some(Stop::Lost(e.message.clone())),
                }
            }
            Response::Update(update) => {
                self.roster
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .update(&update.participants);
            }
            Response::RefreshToken(token) => {
                self.target.token = Secret::new(token);
            }
            Response::Leave(leave) => {
                let reason = leave.reason().as_str_name();
                return Some(
                    if leave.action() == proto::leave_request::Action::Disconnect
                        && !leave.can_reconnect
                    {
                        Stop::Removed(format!("the server sent leave ({reason})"))
                    } else {
                        Stop::Lost(format!("the server sent leave ({reason}), rejoin"))
                    },
                );
            }
            _ => {}
        }
        None
    }

    /// Publishes a transcript or agent text on the data channel.
    async fn relay(&self, live: &mut Live, event: &SessionEvent) {
        let payload = match event {
            SessionEvent::UserTranscript { text, is_final } => serde_json::json!({
                "type": "user_transcript", "text": text, "final": is_final,
                "session_id": self.session_id,
            }),
            SessionEvent::AgentText { text } => serde_json::json!({
                "type": "agent_text", "text": text, "session_id": self.session_id,
            }),
            _ => return,
        };
        // Reliable is the packet kind's default (0); the sender is named on
        // the packet, as LiveKit's newer SDKs do.
        let packet = proto::DataPacket {
            participant_identity: self.target.agent_identity.clone(),
            participant_sid: live.sid.clone(),
            value: Some(proto::data_packet::Value::User(proto::UserPacket {
                payload: payload.to_string().into_bytes(),
                topic: Some(self.config.data_topic.clone()),
                ..Default::default()
            })),
            ..Default::default()
        };
        use prost::Message as _;
        let message = packet.encode_to_vec();
        if live.data_open {
            self.send_data(live, &message).await;
        } else {
            if live.data_backlog.len() == DATA_BACKLOG {
                live.data_backlog.pop_front();
                self.counters.data_dropped.fetch_add(1, Ordering::Relaxed);
            }
            live.data_backlog.push_back(message);
        }
    }

    async fn send_data(&self, live: &Live, message: &[u8]) {
        match rtc::send_data(&live.transports.reliable, message).await {
            Ok(()) => self.counters.data_sent.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.counters.data_dropped.fetch_add(1, Ordering::Relaxed),
        };
    }
}

impl Output {
    /// Encodes a reply frame into paced packets.
    fn encode(&mut self, frame: &AudioFrame) {
        let now = Instant::now();
        let (outgoing, pace) = (&mut self.outgoing, &mut self.pace);
        let pushed = self.encoder.push(frame, |packet| {
            if *pace < now {
                *pace = now;
            }
            outgoing.push_back((*pace, packet.to_vec()));
            *pace += PACKET;
        });
        if let Err(e) = pushed {
            tracing::debug!("reply audio was not encoded: {}", e.message);
        }
    }

    /// Sends the packets that are due.
    async fn send_due(&mut self, live: &mut Live, counters: &LiveKitCounters) -> Option<Stop> {
        let now = Instant::now();
        while let Some((due, _)) = self.outgoing.front() {
            if *due > now {
                break;
            }
            let Some((due, packet)) = self.outgoing.pop_front() else {
                break;
            };
            match live.writer.write(&packet, due).await {
                Ok(()) => {
                    counters.rtp_out.fetch_add(1, Ordering::Relaxed);
                }
                // Before the publisher is negotiated the track is not bound:
                // the packet is dropped, as a muted track's would be.
                Err(_) if live.signal.is_closed() => {
                    return Some(Stop::Lost("the signal connection ended".into()));
                }
                Err(_) => {
                    counters.audio_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        None
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

async fn future_opt(
    future: &mut Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
) {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

async fn join_opt(handle: &mut Option<JoinHandle<()>>) {
    match handle {
        Some(handle) => {
            let _ = handle.await;
        }
        None => std::future::pending().await,
    }
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Reads a remote track: the user's microphone is decoded into the
/// session; anyone else's is ignored.
async fn read_user(
    track: Arc<dyn TrackRemote>,
    roster: Arc<Mutex<Roster>>,
    user: String,
    audio_in: mpsc::Sender<AudioFrame>,
    counters: Arc<LiveKitCounters>,
) {
    let sid = track.track_id().await.to_string();
    let Ok(mut decoder) = OpusDecoder::new() else {
        return;
    };
    let mut mine: Option<bool> = None;
    let mut last: Option<u16> = None;
    while let Some((sequence, payload)) = rtc::next_rtp(&track).await {
        if mine.is_none() {
            mine = roster
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_user(&sid, &user);
        }
        if mine != Some(true) {
            continue;
        }
        if let Some(last) = last {
            let step = sequence.wrapping_sub(last);
            if step == 0 || step > 0x8000 {
                continue; // a duplicate or a late packet
            }
            for _ in 1..step.min(MAX_CONCEALED + 1) {
                if let Ok(frame) = decoder.conceal() {
                    counters.concealed.fetch_add(1, Ordering::Relaxed);
                    if !hand_in(&audio_in, frame, &counters) {
                        return;
                    }
                }
            }
        }
        last = Some(sequence);
        match decoder.decode(&payload) {
            Ok(frame) => {
                counters.rtp_in.fetch_add(1, Ordering::Relaxed);
                if !hand_in(&audio_in, frame, &counters) {
                    return;
                }
            }
            Err(_) => {
                counters.decode_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Hands a frame to the session; `false` once the session is gone.
fn hand_in(
    audio_in: &mpsc::Sender<AudioFrame>,
    frame: AudioFrame,
    counters: &LiveKitCounters,
) -> bool {
    match audio_in.try_send(frame) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            counters.audio_dropped.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}
