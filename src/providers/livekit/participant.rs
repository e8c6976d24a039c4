//! The agent as a participant of one session's room: it joins (signal +
//! both peer connections), hears the user's microphone track (Opus -> PCM
//! into the session), publishes the session's reply as its own track (PCM
//! -> Opus, 20 ms RTP packets paced in real time, nothing while the
//! agent is silent), relays transcripts and agent text on the data channel,
//! resumes after the signal connection alone is lost (LiveKit's
//! `reconnect=1`: same peer connections, same track) and rejoins when a
//! resume is refused or ICE is lost (the backend's retry policy), and leaves
//! when the session ends.
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
use webrtc::peer_connection::RTCPeerConnectionState;

use super::media::{Output, read_user};
use super::opus::OpusEncoder;
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
/// How long leaving the room and closing its connections may take.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// Data messages kept while the data channel opens; older ones are dropped.
const DATA_BACKLOG: usize = 64;

/// A resume of the signal connection under way.
type Resuming =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(Signal, Opened)>> + Send>>;

/// What a backend's LiveKit sessions counted, for its health details.
#[derive(Debug, Default)]
pub struct LiveKitCounters {
    pub(super) joins: AtomicU64,
    pub(super) rejoins: AtomicU64,
    pub(super) resumes: AtomicU64,
    pub(super) resume_failures: AtomicU64,
    pub(super) malformed: AtomicU64,
    pub(super) warned_malformed: AtomicBool,
    pub(super) rtp_in: AtomicU64,
    pub(super) rtp_out: AtomicU64,
    pub(super) decode_errors: AtomicU64,
    pub(super) concealed: AtomicU64,
    pub(super) dtx_skipped: AtomicU64,
    pub(super) dtx_filled: AtomicU64,
    pub(super) dtx_silent: AtomicU64,
    pub(super) audio_dropped: AtomicU64,
    pub(super) data_sent: AtomicU64,
    pub(super) data_dropped: AtomicU64,
    pub(super) candidate_errors: AtomicU64,
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

    /// Full rejoins: after lost ICE, or a resume the server refused.
    pub fn rejoins(&self) -> u64 {
        self.rejoins.load(Ordering::Relaxed)
    }

    /// Resumes of the signal connection the server accepted (the peer
    /// connections and the track kept).
    pub fn resumes(&self) -> u64 {
        self.resumes.load(Ordering::Relaxed)
    }

    /// Resumes that failed or were refused (a full rejoin followed).
    pub fn resume_failures(&self) -> u64 {
        self.resume_failures.load(Ordering::Relaxed)
    }

    /// The user's DTX frames (TOC only) not decoded: silence was handed in.
    pub fn dtx_skipped(&self) -> u64 {
        self.dtx_skipped.load(Ordering::Relaxed)
    }

    /// 20 ms frames of silence handed in for gaps in the user's RTP time
    /// (the user's client sent nothing while silent).
    pub fn dtx_filled(&self) -> u64 {
        self.dtx_filled.load(Ordering::Relaxed)
    }

    /// Reply frames libopus found silent and not sent (DTX).
    pub fn dtx_silent(&self) -> u64 {
        self.dtx_silent.load(Ordering::Relaxed)
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
            ("resumes", get(&self.resumes)),
            ("resume_failures", get(&self.resume_failures)),
            ("malformed_signal", get(&self.malformed)),
            ("rtp_in", get(&self.rtp_in)),
            ("rtp_out", get(&self.rtp_out)),
            ("decode_errors", get(&self.decode_errors)),
            ("concealed", get(&self.concealed)),
            ("dtx_skipped", get(&self.dtx_skipped)),
            ("dtx_filled", get(&self.dtx_filled)),
            ("dtx_silent", get(&self.dtx_silent)),
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
pub(super) struct Roster {
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
    pub(super) fn is_user(&self, sid: &str, user: &str) -> Option<bool> {
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
    let mut output = Output::new(
        OpusEncoder::new(participant.config.encoder_settings())?,
        participant.counters.clone(),
    );
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

/// One join of the room: its signal connection and peer connections.
struct Live {
    signal: Signal,
    transports: Transports,
    pc_events: mpsc::UnboundedReceiver<PcEvent>,
    sid: String,
    writer: RtpWriter,
    readers: Vec<JoinHandle<()>>,
    /// The reply track as the server published it.
    published: Option<proto::TrackInfo>,
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
    /// The media was lost: rejoin.
    Lost(String),
    /// A resume failed or was refused (the session heard `Reconnecting`
    /// already): rejoin.
    ResumeFailed(String),
    /// The signal connection alone was lost, or the server asked for a
    /// resume: resume (handled while serving, never returned by it).
    SignalLost(String),
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
            published: None,
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
            let stop_kind = if matches!(stop, Stop::ResumeFailed(_)) {
                StopKind::Announced
            } else {
                StopKind::Fresh
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
                Stop::Lost(why) | Stop::ResumeFailed(why) | Stop::SignalLost(why) => {
                    tracing::warn!(room = %self.target.room, "the LiveKit room was lost, rejoining: {why}");
                    live.close(false).await;
                    self.counters.rejoins.fetch_add(1, Ordering::Relaxed);
                    if !matches!(stop_kind, StopKind::Announced) {
                        self.events
                            .send(LinkEvent::Connection(ConnectionState::Reconnecting))
                            .await;
                    }
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
                            output.clear();
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

    /// Serves one join until it stops. A lost signal connection is
    /// resumed meanwhile: the media goes on over the peer connections, the
    /// candidates gathered wait for the new connection.
    async fn serve(
        &mut self,
        live: &mut Live,
        output: &mut Output,
        reply: &mut mpsc::Receiver<AudioFrame>,
        relay: &mut Option<mpsc::Receiver<SessionEvent>>,
    ) -> Stop {
        let mut resuming: Option<Resuming> = None;
        let mut held: Vec<Request> = Vec::new();
        loop {
            let next_due = output.next_due();
            let flush_due = output.flush_due();
            tokio::select! {
                event = live.signal.recv(), if resuming.is_none() => {
                    let lost = match event {
                        Some(SignalEvent::Message(message)) => {
                            match self.on_signal(live, *message).await {
                                None => continue,
                                Some(Stop::SignalLost(why)) => why,
                                Some(stop) => return stop,
                            }
                        }
                        Some(SignalEvent::Closed(why)) => {
                            format!("the signal connection ended: {why}")
                        }
                        None => "the signal connection ended".into(),
                    };
                    tracing::info!(room = %self.target.room, "resuming the LiveKit signal connection: {lost}");
                    self.events
                        .send(LinkEvent::Connection(ConnectionState::Reconnecting))
                        .await;
                    resuming = Some(self.resume(live));
                }
                resumed = future_opt(&mut resuming) => {
                    resuming = None;
                    if let Some(stop) = self.resumed(live, resumed, &mut held).await {
                        return stop;
                    }
                }
                event = live.pc_events.recv() => match event {
                    Some(PcEvent::Candidate(target, init)) => {
                        let Ok(json) = serde_json::to_string(&init) else { continue };
                        let trickle = Request::Trickle(proto::TrickleRequest {
                            candidate_init: json,
                            target: target.signal() as i32,
                            r#final: false,
                        });
                        if resuming.is_some() {
                            held.push(trickle);
                        } else {
                            live.signal.send(trickle).await;
                        }
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
                    // Before the publisher is negotiated the track is not
                    // bound: its packets are dropped, as a muted track's
                    // would be. After the signal connection ended (and no
                    // resume is under way), a failed write is the room lost.
                    let lost_if_unbound = live.signal.is_closed() && resuming.is_none();
                    if output.send_due(&mut live.writer, lost_if_unbound).await {
                        return Stop::Lost("the signal connection ended".into());
                    }
                }
                () = sleep_until(flush_due) => output.flush(),
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

    /// Dials `/rtc` again with `reconnect=1` and the participant's sid
    /// (LiveKit's resume), without holding the participant.
    fn resume(&self, live: &Live) -> Resuming {
        let url = self.target.url.clone();
        let token = self.target.token.clone();
        let start = Start::Resume(live.sid.clone());
        let (timeout, counters) = (self.timeout, self.counters.clone());
        Box::pin(async move { Signal::connect(&url, &token, &start, timeout, counters).await })
    }

    /// Takes a resume's outcome: the new signal connection in place of the
    /// old (the server told of the agent's state, the held candidates
    /// sent), or the stop that makes the agent join afresh.
    async fn resumed(
        &mut self,
        live: &mut Live,
        outcome: Result<(Signal, Opened)>,
        held: &mut Vec<Request>,
    ) -> Option<Stop> {
        let failed = |why: String| {
            self.counters
                .resume_failures
                .fetch_add(1, Ordering::Relaxed);
            Some(Stop::ResumeFailed(why))
        };
        match outcome {
            Ok((signal, Opened::Resumed(_))) => {
                live.signal = signal;
                let sync = self.sync_state(live).await;
                live.signal.send(Request::SyncState(sync)).await;
                for request in held.drain(..) {
                    live.signal.send(request).await;
                }
                self.counters.resumes.fetch_add(1, Ordering::Relaxed);
                tracing::info!(room = %self.target.room, "resumed the LiveKit signal connection");
                self.events
                    .send(LinkEvent::Connection(ConnectionState::Connected))
                    .await;
                None
            }
            Ok((signal, Opened::Joined(_))) => {
                // A participant the server made afresh: not the one whose
                // media is up. It leaves; the agent joins properly.
                signal.leave().await;
                failed("the LiveKit server answered a resume with a fresh join".into())
            }
            Err(e) => failed(format!("the resume failed: {}", e.message)),
        }
    }

    /// What the agent has, for the server to line its side up after a
    /// resume (LiveKit's `SyncState`): the subscriber's last offer and
    /// answer, the published track, subscriptions as auto-subscribe left
    /// them.
    async fn sync_state(&self, live: &Live) -> proto::SyncState {
        let (offer, answer) = live.transports.subscriber_descriptions().await;
        let description = |kind: &str, sdp: String| proto::SessionDescription {
            r#type: kind.to_owned(),
            sdp,
            ..Default::default()
        };
        proto::SyncState {
            answer: answer.map(|sdp| description("answer", sdp)),
            offer: offer.map(|sdp| description("offer", sdp)),
            subscription: Some(proto::UpdateSubscription {
                subscribe: false,
                ..Default::default()
            }),
            publish_tracks: live
                .published
                .iter()
                .map(|track| proto::TrackPublishedResponse {
                    cid: live.transports.track_id.clone(),
                    track: Some(track.clone()),
                })
                .collect(),
            ..Default::default()
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
                live.published = published.track;
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
                use proto::leave_request::Action;
                let reason = leave.reason().as_str_name();
                return Some(match leave.action() {
                    Action::Disconnect if !leave.can_reconnect => {
                        Stop::Removed(format!("the server sent leave ({reason})"))
                    }
                    Action::Resume => {
                        Stop::SignalLost(format!("the server sent leave ({reason}), resume"))
                    }
                    _ => Stop::Lost(format!("the server sent leave ({reason}), rejoin")),
                });
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

/// Whether a stop was already announced to the session.
enum StopKind {
    /// The session heard `Reconnecting` already (a failed resume).
    Announced,
    /// Nothing said yet.
    Fresh,
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

async fn future_opt<T>(
    future: &mut Option<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>>,
) -> T {
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
