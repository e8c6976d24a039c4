//! The pipeline's side of a session's link to its provider's service: what
//! the engine sends the service ([`LinkInput`]) and what it hears back
//! ([`LinkEvent`]). The link kit that makes links is the runtime's
//! ([`crate::runtime::Link`]).

use tokio::sync::mpsc;

use super::{S2sEvent, S2sStream};
use crate::audio::AudioFrame;
use crate::backend::ConnectionState;
use crate::error::{ErrorCode, Result};
use crate::provider::TurnPolicy;

/// The `stage` under which a link's endpoints are counted in
/// `pipeline_component_switches_total` and `pipeline_component_served_total`
/// (the `component` label is the endpoint's name) and reported in
/// [`SessionEvent::ComponentSwitched`](crate::session::events::SessionEvent::ComponentSwitched).
pub const ENDPOINT_STAGE: &str = "provider";

/// What a [`ServiceLink`](crate::runtime::ServiceLink)'s service says, in the session's terms.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum LinkEvent {
    /// What the service heard the user say. With
    /// [`TurnPolicy::Service`], a final
    /// transcript ends the user's turn.
    UserTranscript {
        /// The text.
        text: String,
        /// Whether it is final.
        is_final: bool,
    },
    /// Text of a reply the service makes by itself.
    ServiceText(String),
    /// Reply audio the service speaks by itself, in any format.
    Audio(AudioFrame),
    /// The service's reply is complete.
    ReplyDone,
    /// The service cut its reply short (the user barged in on its side):
    /// reply audio still queued is dropped.
    Interrupted,
    /// The link's connection changed state (`Reconnecting` after it
    /// dropped, `Connected` once back).
    Connection(ConnectionState),
    /// The link is lost for good: the session can no longer hear or speak.
    Failed {
        /// Why, e.g. `ConnectionFailed`.
        code: ErrorCode,
        /// What happened, with the cause.
        message: String,
    },
    /// The link is now connected to another of the service's equivalent
    /// endpoints (see [`S2sEvent::EndpointSwitched`]).
    EndpointSwitched {
        /// The endpoint (`host:port`) that served before.
        from: String,
        /// The endpoint serving now.
        to: String,
        /// Why.
        reason: crate::session::events::SwitchReason,
    },
}

/// What the session sends a [`ServiceLink`](crate::runtime::ServiceLink)'s service. Called from the
/// session's input path: nothing here may block.
pub trait LinkInput: Send {
    /// One frame of the user's audio, in the pipeline's internal format.
    fn push_audio(&mut self, frame: &AudioFrame) -> Result<()>;
    /// The local turn detector ended the user's turn
    /// ([`TurnPolicy::Local`]): the
    /// service should finish its transcript.
    fn end_turn(&mut self) -> Result<()>;
    /// The user barged in: the service should stop its reply.
    fn cancel(&mut self);
}

/// What the engine talks to besides its local components: a
/// speech-to-speech model, or a session's link to a service that hosts
/// pipeline stages.
pub enum Remote {
    /// A speech-to-speech model (`s2s` pipelines): the stream and its events.
    Model(Box<dyn S2sStream>, mpsc::Receiver<S2sEvent>),
    /// A link to a service.
    Link {
        /// What goes to the service.
        input: Box<dyn LinkInput>,
        /// What the service says.
        events: mpsc::Receiver<LinkEvent>,
        /// Whether the service transcribes (hosts STT).
        hosts_stt: bool,
        /// Who ends the user's turn when it does.
        turns: TurnPolicy,
    },
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Remote::Model(..) => f.write_str("Remote::Model"),
            Remote::Link {
                hosts_stt, turns, ..
            } => f
                .debug_struct("Remote::Link")
                .field("hosts_stt", hosts_stt)
                .field("turns", turns)
                .finish_non_exhaustive(),
        }
    }
}

impl From<LinkEvent> for S2sEvent {
    fn from(event: LinkEvent) -> S2sEvent {
        match event {
            LinkEvent::UserTranscript { text, is_final } => {
                S2sEvent::UserTranscript { text, is_final }
            }
            LinkEvent::ServiceText(text) => S2sEvent::AgentText(text),
            LinkEvent::Audio(frame) => S2sEvent::Audio(frame),
            LinkEvent::ReplyDone => S2sEvent::ReplyDone,
            LinkEvent::Interrupted => S2sEvent::Interrupted,
            LinkEvent::Connection(state) => S2sEvent::Connection(state),
            LinkEvent::Failed { code, message } => S2sEvent::Failed { code, message },
            LinkEvent::EndpointSwitched { from, to, reason } => {
                S2sEvent::EndpointSwitched { from, to, reason }
            }
        }
    }
}

/// The engine's input side of a [`Remote`].
pub(crate) enum RemoteInput {
    /// A speech-to-speech model: hears the turn's audio, answers at its end.
    Model(Box<dyn S2sStream>),
    /// A link whose service ends turns: hears every frame.
    ServiceTurns(Box<dyn LinkInput>),
    /// A link told of turn ends by the local turn detector (or hosting no
    /// STT): hears the turn's audio.
    LocalTurns(Box<dyn LinkInput>),
}

impl RemoteInput {
    pub(crate) fn push_audio(&mut self, frame: &AudioFrame) -> Result<()> {
        match self {
            RemoteInput::Model(s) => s.push_audio(frame),
            RemoteInput::ServiceTurns(l) | RemoteInput::LocalTurns(l) => l.push_audio(frame),
        }
    }

    pub(crate) fn end_turn(&mut self) -> Result<()> {
        match self {
            RemoteInput::Model(s) => s.end_turn(),
            RemoteInput::ServiceTurns(_) => Ok(()),
            RemoteInput::LocalTurns(l) => l.end_turn(),
        }
    }

    pub(crate) fn interrupt(&mut self) {
        match self {
            RemoteInput::Model(s) => s.interrupt(),
            RemoteInput::ServiceTurns(l) | RemoteInput::LocalTurns(l) => l.cancel(),
        }
    }
}

/// The engine's event side of a [`Remote`].
pub(crate) enum RemoteEvents {
    Model(mpsc::Receiver<S2sEvent>),
    Link(mpsc::Receiver<LinkEvent>),
}

impl RemoteEvents {
    pub(crate) fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S2sEvent>> {
        match self {
            RemoteEvents::Model(rx) => rx.poll_recv(cx),
            RemoteEvents::Link(rx) => rx.poll_recv(cx).map(|e| e.map(S2sEvent::from)),
        }
    }

    pub(crate) fn try_recv(&mut self) -> Option<S2sEvent> {
        match self {
            RemoteEvents::Model(rx) => rx.try_recv().ok(),
            RemoteEvents::Link(rx) => rx.try_recv().ok().map(S2sEvent::from),
        }
    }
}

impl Remote {
    /// The engine's two sides of it, and how turns go: whether the remote
    /// ends turns, and whether its transcripts are matched to locally ended
    /// turns (as an STT's are).
    pub(crate) fn split(self) -> (RemoteInput, RemoteEvents, bool, bool) {
        match self {
            Remote::Model(s, rx) => (RemoteInput::Model(s), RemoteEvents::Model(rx), false, false),
            Remote::Link {
                input,
                events,
                hosts_stt,
                turns,
            } => {
                let remote_turns = hosts_stt && turns == TurnPolicy::Service;
                let input = if remote_turns {
                    RemoteInput::ServiceTurns(input)
                } else {
                    RemoteInput::LocalTurns(input)
                };
                (
                    input,
                    RemoteEvents::Link(events),
                    remote_turns,
                    hosts_stt && !remote_turns,
                )
            }
        }
    }
}
