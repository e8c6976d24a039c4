//! The events a session emits.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::broadcast;

use super::{ConnectionState, PipelineState};
use crate::error::ErrorCode;
use crate::metrics::{DropReason, Metrics};

/// How long one turn took, stage by stage (wall time).
///
/// Times start when the pipeline decided the user's turn was over (after
/// `endpointing` of silence, measured on the audio clock). Serialized with
/// each duration as a number of milliseconds (`first_audio_ms`, ...), the
/// unset ones as `null`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TurnLatency {
    /// The turn's number within the session, from 1.
    pub turn: u64,
    /// Silence waited before deciding the turn was over (audio clock).
    pub endpointing: Duration,
    /// End of turn to the final transcript.
    pub stt: Option<Duration>,
    /// The agent's time to answer.
    pub agent: Option<Duration>,
    /// From the start of synthesis to its first audio.
    pub tts_first_audio: Option<Duration>,
    /// End of turn to the first reply audio sent to the user.
    pub first_audio: Duration,
    /// The turn was answered by a preemptive reply (`[preemptive]`): how
    /// much earlier the agent was started, on a stable partial transcript,
    /// than the final transcript arrived (the time gained). `None` for a
    /// turn answered on its final transcript.
    pub preemptive: Option<Duration>,
}

impl Serialize for TurnLatency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mut st = s.serialize_struct("TurnLatency", 7)?;
        st.serialize_field("turn", &self.turn)?;
        st.serialize_field("endpointing_ms", &ms(self.endpointing))?;
        st.serialize_field("stt_ms", &self.stt.map(ms))?;
        st.serialize_field("agent_ms", &self.agent.map(ms))?;
        st.serialize_field("tts_first_audio_ms", &self.tts_first_audio.map(ms))?;
        st.serialize_field("first_audio_ms", &ms(self.first_audio))?;
        st.serialize_field("preemptive_ms", &self.preemptive.map(ms))?;
        st.end()
    }
}

/// Something that happened in a session.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum SessionEvent {
    /// The pipeline moved from one state to another.
    State {
        /// The state before.
        from: PipelineState,
        /// The state now.
        to: PipelineState,
    },
    /// The user started speaking.
    SpeechStarted,
    /// The user's turn ended (the pipeline will answer).
    TurnEnded {
        /// The turn's number, from 1.
        turn: u64,
    },
    /// What the user said: partial while speaking, then final.
    UserTranscript {
        /// The text.
        text: String,
        /// Whether this is the turn's final transcript.
        is_final: bool,
    },
    /// What the agent answers.
    AgentText {
        /// The text.
        text: String,
    },
    /// The user barged in: the reply stopped. With the interruption
    /// policy on ([`InterruptionConfig`](crate::config::InterruptionConfig)),
    /// the rest of the reply is kept until words confirm the interruption
    /// (then it is dropped) or none come ([`SessionEvent::Resumed`]); with
    /// it off, or without a transcript to wait for, it is dropped at once.
    Interrupted {
        /// The turn whose reply was cut.
        turn: u64,
    },
    /// The interruption of a reply was false (the speech said no words, or
    /// only backchannels such as "uh-huh"): the reply plays on from where
    /// it stopped, nothing of it repeated or skipped.
    Resumed {
        /// The turn whose reply resumed.
        turn: u64,
    },
    /// A turn's latency, once its first reply audio went out.
    Latency(TurnLatency),
    /// A failure that ended a turn, not the session.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// What happened.
        message: String,
    },
    /// The session's link to its provider's service changed state (only
    /// providers whose service runs pipeline stages have one). A new
    /// subscription to a session with a link starts with this event, carrying
    /// the link's state at the time (the link connects while the session is
    /// created); the link closes with the session (`Disconnected`, just
    /// before [`SessionEvent::Closed`]).
    Connection {
        /// The link's state now.
        state: ConnectionState,
    },
    /// A stage of the pipeline is now served by another component of its
    /// fallback list (`stt_fallbacks`, `tts_fallbacks`, `s2s_fallbacks`):
    /// emitted the first time a turn is served by `to` after being served by
    /// `from`, both when a component fails over and when it is switched back
    /// after its health check passed.
    ComponentSwitched {
        /// The stage: `stt`, `tts` or `s2s`; `provider` for the session's
        /// link moving to another of its provider's endpoints
        /// (`fallback_urls`), `from` and `to` then being endpoint names
        /// (`host:port`).
        stage: String,
        /// The component that served before.
        from: String,
        /// The component serving now.
        to: String,
        /// Why.
        reason: SwitchReason,
    },
    /// The session closed; no more events follow.
    Closed,
}

/// Why a stage switched components ([`SessionEvent::ComponentSwitched`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SwitchReason {
    /// The component failed this turn (an error, or its stream ended).
    Error,
    /// The component gave no result within `failover.timeout`.
    Timeout,
    /// The component is marked down (it failed for another session of the
    /// process, and its health check has not passed since).
    Down,
    /// The component is back: its health check passed, and it comes first
    /// in the list.
    Recovered,
}

impl SwitchReason {
    /// The snake_case name, e.g. `"timeout"` (the `reason` label of
    /// `pipeline_component_switches_total`).
    pub const fn as_str(self) -> &'static str {
        match self {
            SwitchReason::Error => "error",
            SwitchReason::Timeout => "timeout",
            SwitchReason::Down => "down",
            SwitchReason::Recovered => "recovered",
        }
    }
}

impl std::fmt::Display for SwitchReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A subscription to a session's events; see [`crate::VoiceSession::events`].
#[derive(Debug)]
pub struct SessionEvents {
    /// Handed out before anything from `rx`: a state as of the subscription.
    first: Option<SessionEvent>,
    rx: broadcast::Receiver<SessionEvent>,
    metrics: Option<Arc<Metrics>>,
    lost: u64,
}

impl SessionEvents {
    /// A subscription reading `rx`, counting lost events in `metrics`.
    pub fn new(rx: broadcast::Receiver<SessionEvent>, metrics: Option<Arc<Metrics>>) -> Self {
        SessionEvents {
            first: None,
            rx,
            metrics,
            lost: 0,
        }
    }

    /// The subscription with `event` handed out first, before what `rx`
    /// brings: how a subscriber learns a state set before it subscribed (the
    /// session link's connection).
    pub(crate) fn starting_with(mut self, event: SessionEvent) -> Self {
        self.first = Some(event);
        self
    }

    /// The next event, or `None` after [`SessionEvent::Closed`] has been read
    /// and the session is gone.
    pub async fn recv(&mut self) -> Option<SessionEvent> {
        if let Some(event) = self.first.take() {
            return Some(event);
        }
        loop {
            match self.rx.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(n)) => self.record_lost(n),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// An event if one is ready now.
    pub fn try_recv(&mut self) -> Option<SessionEvent> {
        if let Some(event) = self.first.take() {
            return Some(event);
        }
        loop {
            match self.rx.try_recv() {
                Ok(event) => return Some(event),
                Err(broadcast::error::TryRecvError::Lagged(n)) => self.record_lost(n),
                Err(_) => return None,
            }
        }
    }

    /// How many events this subscriber lost by falling behind.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    fn record_lost(&mut self, n: u64) {
        self.lost += n;
        if let Some(m) = &self.metrics {
            m.dropped(DropReason::EventOverflow, n);
        }
    }
}
