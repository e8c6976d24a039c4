//! A session's media in the room: the user's track decoded into the
//! session ([`read_user`]: lost packets concealed, DTX frames and gaps
//! handed in as silence without decoding), and the reply encoded and paced
//! out as RTP ([`Output`]: nothing sent while the agent is silent, RTP time
//! jumping over the gap).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use webrtc::media_stream::track_remote::TrackRemote;

use super::opus::{self, Encoded, OpusDecoder, OpusEncoder, RTP_FRAME};
use super::participant::{LiveKitCounters, Roster};
use super::rtc::{self, RtpWriter};
use crate::audio::AudioFrame;

/// The most lost packets concealed at once; a longer gap is left silent.
const MAX_CONCEALED: u16 = 3;
/// One RTP packet of reply audio.
const PACKET: Duration = Duration::from_millis(20);
/// The longest gap in the user's audio (DTX, a muted microphone) handed to
/// the session as silence: past the longest turn-ending silence.
const MAX_GAP_FRAMES: u32 = 250;
/// A reply frame due this far behind the wall clock still follows the one
/// before without a gap (the reply came a little late); further behind, the
/// RTP timestamp jumps over the pause.
const LATE_TOLERANCE: Duration = Duration::from_millis(40);
/// A partial reply frame waits this long for the rest before it is padded
/// and sent (the reply has ended).
const FLUSH_AFTER: Duration = Duration::from_millis(100);

/// The reply on its way out: the encoder and the packets waiting for their
/// time.
pub(super) struct Output {
    encoder: OpusEncoder,
    /// Encoded reply packets waiting for their time.
    outgoing: VecDeque<OutPacket>,
    /// When the next reply frame is due.
    pace: Instant,
    /// Frames since the last packet queued that were not sent (DTX, the
    /// pause before a reply).
    skipped: u32,
    /// When the last reply frame came.
    last_frame: Instant,
    counters: Arc<LiveKitCounters>,
}

/// One reply packet waiting.
struct OutPacket {
    due: Instant,
    /// 20 ms frames since the packet before it (1: none skipped).
    frames: u32,
    payload: Vec<u8>,
}

impl Output {
    /// An output encoding with `encoder`, counting in `counters`.
    pub(super) fn new(encoder: OpusEncoder, counters: Arc<LiveKitCounters>) -> Self {
        Output {
            encoder,
            outgoing: VecDeque::new(),
            pace: Instant::now(),
            skipped: 0,
            last_frame: Instant::now(),
            counters,
        }
    }

    /// When the next packet is due, if one waits.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.outgoing.front().map(|p| p.due)
    }

    /// Drops the packets waiting (stale after a rejoin).
    pub(super) fn clear(&mut self) {
        self.outgoing.clear();
        self.skipped = 0;
    }

    /// Encodes a reply frame into paced packets.
    pub(super) fn encode(&mut self, frame: &AudioFrame) {
        self.last_frame = Instant::now();
        let (encoder, mut take) = self.taker();
        if let Err(e) = encoder.push(frame, &mut take) {
            tracing::debug!("reply audio was not encoded: {}", e.message);
        }
    }

    /// When a partial frame waiting should be sent: the reply stopped.
    pub(super) fn flush_due(&self) -> Option<Instant> {
        (self.encoder.pending() > 0).then(|| self.last_frame + FLUSH_AFTER)
    }

    /// Pads and encodes the partial frame waiting (the end of a reply).
    pub(super) fn flush(&mut self) {
        let (encoder, mut take) = self.taker();
        if let Err(e) = encoder.flush(&mut take) {
            tracing::debug!("the reply's tail was not encoded: {}", e.message);
        }
    }

    /// The encoder, and what takes its frames: each one due 20 ms after the
    /// one before (or now, when the reply came late); a packet is queued,
    /// a silent frame (DTX) only moves the time on.
    fn taker(&mut self) -> (&mut OpusEncoder, impl FnMut(Encoded<'_>) + '_) {
        let now = Instant::now();
        let (outgoing, pace, skipped, counters) = (
            &mut self.outgoing,
            &mut self.pace,
            &mut self.skipped,
            &self.counters,
        );
        let take = move |encoded: Encoded<'_>| {
            if *pace < now {
                let behind = now - *pace;
                if behind > LATE_TOLERANCE {
                    // A pause (the silence before this reply): the RTP
                    // time goes over it.
                    let frames = behind.as_micros().div_ceil(PACKET.as_micros());
                    *skipped = skipped.saturating_add(u32::try_from(frames).unwrap_or(u32::MAX));
                }
                *pace = now;
            }
            match encoded {
                Encoded::Packet(payload) => {
                    outgoing.push_back(OutPacket {
                        due: *pace,
                        frames: skipped.saturating_add(1),
                        payload: payload.to_vec(),
                    });
                    *skipped = 0;
                }
                Encoded::Silent => {
                    counters.dtx_silent.fetch_add(1, Ordering::Relaxed);
                    *skipped = skipped.saturating_add(1);
                }
            }
            *pace += PACKET;
        };
        (&mut self.encoder, take)
    }

    /// Sends the packets that are due on `writer`; `true` when a write
    /// failed and `lost_if_unbound` says that means the room is lost
    /// (otherwise the packet is dropped and counted).
    pub(super) async fn send_due(&mut self, writer: &mut RtpWriter, lost_if_unbound: bool) -> bool {
        let now = Instant::now();
        while let Some(next) = self.outgoing.front() {
            if next.due > now {
                break;
            }
            let Some(packet) = self.outgoing.pop_front() else {
                break;
            };
            match writer.write(&packet.payload, packet.frames).await {
                Ok(()) => {
                    self.counters.rtp_out.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) if lost_if_unbound => return true,
                Err(_) => {
                    self.counters.audio_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        false
    }
}

/// Reads a remote track: the user's microphone is decoded into the
/// session; anyone else's is ignored.
pub(super) async fn read_user(
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
    // The last packet's sequence number and timestamp.
    let mut last: Option<(u16, u32)> = None;
    while let Some(rtp) = rtc::next_rtp(&track).await {
        if mine.is_none() {
            mine = roster
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_user(&sid, &user);
        }
        if mine != Some(true) {
            continue;
        }
        if let Some((last_sequence, last_timestamp)) = last {
            let step = rtp.sequence.wrapping_sub(last_sequence);
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
            // Time the packets do not account for: the user's client sent
            // nothing while silent (DTX). The session hears the silence, so
            // its clock (and the turn's end) goes on.
            let expected = last_timestamp.wrapping_add(u32::from(step) * RTP_FRAME);
            let gap = rtp.timestamp.wrapping_sub(expected) / RTP_FRAME;
            if (1..=MAX_GAP_FRAMES * 40).contains(&gap) {
                let frames = gap.min(MAX_GAP_FRAMES);
                if let Ok(silence) = opus::silence(frames as usize) {
                    counters
                        .dtx_filled
                        .fetch_add(u64::from(frames), Ordering::Relaxed);
                    if !hand_in(&audio_in, silence, &counters) {
                        return;
                    }
                }
            }
        }
        last = Some((rtp.sequence, rtp.timestamp));
        if opus::is_dtx(&rtp.payload) {
            // A TOC-only frame: silence, nothing to decode.
            counters.dtx_skipped.fetch_add(1, Ordering::Relaxed);
            if let Ok(silence) = opus::silence(1)
                && !hand_in(&audio_in, silence, &counters)
            {
                return;
            }
            continue;
        }
        match decoder.decode(&rtp.payload) {
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
