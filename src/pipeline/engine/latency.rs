//! What a turn's latency is made of, as the session task measures it (the
//! turn's [`SessionEvent::Latency`] goes out with its first audio).

use std::time::Duration;

use tokio::time::Instant;

#[cfg(doc)]
use crate::pipeline::events::SessionEvent;

/// What the session task knows about the turn being answered.
#[derive(Default)]
pub(super) struct TurnClock {
    pub(super) turn: u64,
    pub(super) ended_at: Option<Instant>,
    pub(super) endpointing: Duration,
    pub(super) stt: Option<Duration>,
    pub(super) agent: Option<Duration>,
    pub(super) tts_started: Option<Instant>,
    /// The turn's `Latency` event is out (its first audio went to the user).
    pub(super) latency_reported: bool,
    pub(super) tts_first_audio: Option<Duration>,
    pub(super) first_audio_sent: bool,
    /// The turn is answered by a preemptive reply started this long before
    /// its final transcript came.
    pub(super) preemptive: Option<Duration>,
}
