//! Reply audio paced out to the user: queued, handed to the receiver at most
//! [`PLAYOUT_LEAD`] ahead of real time, and dropped at once on a barge-in.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::audio::{AudioEncoding, AudioFrame, FormatFollower};
use crate::metrics::DropReason;
use crate::metrics::LatencyStage;
use crate::pipeline::events::{SessionEvent, TurnLatency};
use crate::session::{AudioSendError, PipelineState};

use super::latency::TurnClock;
use super::reply::ReplyMsg;
use super::shared::Shared;
use super::task::Task;
use super::{MAX_REPLY_AUDIO, PLAYOUT_LEAD, PLAYOUT_REFILL};

pub(super) struct Playout {
    pub(super) pending: VecDeque<AudioFrame>,
    pub(super) pending_len: Duration,
    /// When the audio handed out so far finishes playing.
    pub(super) play_end: Instant,
    pub(super) converter: FormatFollower,
}

impl Task {
    /// When queued reply audio is next due for release, if any: when what was
    /// handed out is down to [`PLAYOUT_REFILL`].
    pub(super) fn release_at(&self) -> Option<Instant> {
        (!self.playout.pending.is_empty() && !self.shared.decider().holds_audio()).then(|| {
            self.playout
                .play_end
                .checked_sub(PLAYOUT_REFILL)
                .unwrap_or_else(Instant::now)
        })
    }

    /// Whether the next queued frame may go out at `now`: what was handed out
    /// plays for less than [`PLAYOUT_LEAD`] more.
    pub(super) fn may_release(&self, now: Instant) -> bool {
        !self.playout.pending.is_empty()
            && self.playout.play_end < now + PLAYOUT_LEAD
            && !self.shared.decider().holds_audio()
    }

    /// When the reply being played ends and the session goes back to
    /// listening, once nothing more of it can come.
    pub(super) fn idle_at(&self) -> Option<Instant> {
        (self.playout.pending.is_empty()
            && self.reply_done
            && self.reply.is_none()
            && self.shared.state() == PipelineState::Speaking
            && self.paused_from.is_none())
        .then_some(self.playout.play_end)
    }
    /// Drops the reply in flight and everything queued of it, and listens;
    /// `announce`: emits [`SessionEvent::Interrupted`] and counts it (not
    /// when the reply was paused by an interruption, already announced).
    pub(super) fn cut_reply(
        &mut self,
        turn: u64,
        reply_rx: &mut mpsc::Receiver<ReplyMsg>,
        announce: bool,
    ) {
        let shared = &*self.shared;
        // Again, from the task: a frame it released after the input path's
        // flush (before this message reached it) is dropped too.
        shared.output.flush();
        self.playout.converter.reset();
        self.reply = None;
        while reply_rx.try_recv().is_ok() {}
        self.playout.pending.clear();
        self.playout.pending_len = Duration::ZERO;
        self.playout.play_end = Instant::now();
        self.reply_done = true;
        self.cut = true;
        self.paused_from = None;
        shared.decider().reset();
        if announce {
            shared.metrics.interrupted();
            shared.emit(SessionEvent::Interrupted { turn });
        }
        shared.set_state(PipelineState::Listening);
    }
}

pub(super) fn enqueue(shared: &Shared, playout: &mut Playout, frame: AudioFrame) {
    // Counted with the frame, so one huge frame cannot overshoot the bound.
    if playout.pending_len + frame.duration() > MAX_REPLY_AUDIO {
        shared.metrics.dropped(DropReason::OutputOverflow, 1);
        return;
    }
    if playout.pending.is_empty() {
        let now = Instant::now();
        if playout.play_end < now {
            playout.play_end = now;
        }
    }
    playout.pending_len += frame.duration();
    playout.pending.push_back(frame);
}

/// Hands reply audio to the receiver without waiting, counting it as sent
/// or as dropped: the receiver's queue full, or nobody holding it. Whether
/// it went out.
pub(super) fn send_out(shared: &Shared, frame: AudioFrame) -> bool {
    let bytes = frame.data().len() as u64;
    match shared.output.try_send(frame) {
        Ok(()) => {
            shared.metrics.bytes_out(bytes);
            true
        }
        Err(e) => {
            let reason = match e {
                AudioSendError::Full => DropReason::OutputOverflow,
                AudioSendError::Closed => DropReason::Unheard,
            };
            shared.metrics.dropped(reason, 1);
            false
        }
    }
}

/// Hands the next queued reply frame to the receiver (`now` is the time).
pub(super) fn release(shared: &Shared, playout: &mut Playout, clock: &mut TurnClock, now: Instant) {
    let Some(frame) = playout.pending.pop_front() else {
        return;
    };
    playout.pending_len = playout.pending_len.saturating_sub(frame.duration());
    playout.play_end = playout.play_end.max(now) + frame.duration();
    // Ducked while user speech is judged.
    let gain = shared.decider().gain();
    let frame = if gain < 1.0 && frame.format().encoding == AudioEncoding::PcmS16Le {
        scaled(frame, gain)
    } else {
        frame
    };
    // A frame that cannot be converted is dropped and reported; the reply
    // still counts as started, so the session goes back to listening after it.
    let out = match playout.converter.convert(frame, shared.output_format) {
        Ok(f) => f,
        Err(e) => {
            shared.metrics.dropped(DropReason::InvalidAudio, 1);
            shared.emit(SessionEvent::Error {
                code: e.code,
                message: e.into_fields().message,
            });
            None
        }
    };
    let sent = out.is_some_and(|out| send_out(shared, out));
    if !clock.first_audio_sent {
        clock.first_audio_sent = true;
        shared.set_state(PipelineState::Speaking);
    }
    // The turn's latency runs to the first audio that actually went out.
    if sent && !clock.latency_reported {
        clock.latency_reported = true;
        if let Some(t) = clock.ended_at {
            let first_audio = t.elapsed();
            shared
                .metrics
                .turn_latency(LatencyStage::FirstAudio, first_audio);
            shared.emit(SessionEvent::Latency(TurnLatency {
                turn: clock.turn,
                endpointing: clock.endpointing,
                stt: clock.stt,
                agent: clock.agent,
                tts_first_audio: clock.tts_first_audio,
                first_audio,
                preemptive: clock.preemptive,
            }));
        }
    }
}

/// `frame` (the pipeline's format, PCM s16le) with every sample times `gain`.
fn scaled(frame: AudioFrame, gain: f32) -> AudioFrame {
    let format = frame.format();
    let data: Vec<u8> = frame
        .data()
        .chunks_exact(2)
        .flat_map(|b| {
            let v = f32::from(i16::from_le_bytes([b[0], b[1]])) * gain;
            (v.round().clamp(-32768.0, 32767.0) as i16).to_le_bytes()
        })
        .collect();
    AudioFrame::new(format, data).unwrap_or(frame)
}
