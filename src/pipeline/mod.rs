//! Pipeline components and the per-session engine.
//!
//! A session's pipeline runs at one internal format,
//! [`INTERNAL_FORMAT`] (16 kHz mono PCM s16le); input and output are converted
//! at the edges. Incoming frames go through the audio processors (noise
//! cancellation first, then custom processors by `order`), then voice activity
//! detection ([`Vad`]), then turn detection ([`TurnDetector`]) and into
//! speech-to-text ([`SpeechToText`]) or a speech-to-speech model
//! ([`SpeechToSpeech`]). At the end of a turn the application's agent answers
//! and its reply streams through text-to-speech ([`TextToSpeech`]).
//!
//! Components are resolved by the names in [`crate::Config`] (`stt_provider`,
//! `tts_provider`, `s2s_provider`, `vad_provider`, `turn_detection_provider`,
//! `noise_cancellation_provider`, `processors[].name`) through the same
//! [`Registry`] mechanism as providers. Built-in components register
//! themselves with [`register_component!`](crate::register_component); an
//! application registers its own at run time with
//! [`components()`]`.stt.register(...)` and friends. Options for a component
//! come from `[components.<name>]` in the config. A config's components are
//! looked up once, into a [`Plan`]: backends, sessions and `validate` all use
//! it.

pub mod builtin;
pub mod engine;
pub mod events;
pub mod failover;
pub mod link;
#[cfg(any(
    feature = "denoise",
    feature = "espeak",
    feature = "pocketsphinx",
    feature = "webrtc-vad"
))]
pub mod offline;
pub mod plan;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::audio::{AudioFormat, AudioFrame};
use crate::error::Result;
use crate::hooks::AudioProcessor;
use crate::registry::{Registry, StaticEntry};

pub use plan::{Plan, PlanError, PlanProblem, PlanProblemKind, Planned, Stage};

/// The format every pipeline stage works in: 16 kHz mono PCM s16le.
pub const INTERNAL_FORMAT: AudioFormat = AudioFormat::PCM16_16K_MONO;

/// What voice activity detection says about one frame.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VadDecision {
    /// Whether the frame holds speech.
    pub speech: bool,
    /// Confidence that it does, 0.0..=1.0.
    pub probability: f32,
    /// The frame's level in dBFS (0 is full scale; silence is very negative).
    pub level_db: f32,
}

/// Voice activity detection for one session (stateful, one per session).
pub trait Vad: Send {
    /// Classifies one frame in [`INTERNAL_FORMAT`].
    fn process(&mut self, frame: &AudioFrame) -> VadDecision;
    /// Forgets adaptive state (e.g. after a long pause).
    fn reset(&mut self) {}
    /// How much speech this VAD hears before it says so (an onset it waits
    /// out): the engine keeps that much more audio from before the frame
    /// that starts a turn, so recognition hears the turn's first syllable.
    /// Zero by default.
    fn lookback(&self) -> Duration {
        Duration::ZERO
    }
}

/// What turn detection concluded after a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TurnSignal {
    /// Nothing changed.
    Continue,
    /// The user started speaking (the start of a turn, or a barge-in while the agent speaks).
    SpeechStarted,
    /// The user's turn is over: the agent should answer.
    TurnEnded,
}

/// Turn detection for one session (stateful, one per session).
///
/// It sees every frame's [`VadDecision`] and the frame's duration, so it runs
/// on the audio clock: the same audio gives the same turns however fast it is
/// pushed.
pub trait TurnDetector: Send {
    /// Updates the detector with one frame's decision.
    fn update(&mut self, vad: &VadDecision, frame_duration: Duration) -> TurnSignal;
    /// The frame whose decision the next [`TurnDetector::update`] gets, in
    /// [`INTERNAL_FORMAT`], after the audio processors: for detectors that
    /// listen to the audio itself (its pitch, its loudness), not only to the
    /// VAD. Called once per frame, just before `update`. The default ignores
    /// it.
    fn observe(&mut self, _frame: &AudioFrame) {}
    /// The latest partial transcript, for detectors that judge completeness.
    fn hint_transcript(&mut self, _partial: &str) {}
    /// Right after [`TurnDetector::update`] returned
    /// [`TurnSignal::TurnEnded`]: the silence this detector waited before
    /// ending the turn, reported as the turn's endpointing latency. The
    /// default, `None`, has the engine count the silence since the VAD's last
    /// speech frame, which undercounts a detector that treats some of those
    /// frames (a VAD's hangover, short bursts) as silence.
    fn endpointing(&self) -> Option<Duration> {
        None
    }
    /// How much speech this detector hears before it starts a turn (a
    /// minimum length of speech it waits out); see [`Vad::lookback`]. Zero
    /// by default.
    fn lookback(&self) -> Duration {
        Duration::ZERO
    }
    /// Starts over (after a turn ends or the session restarts).
    fn reset(&mut self);
}

/// Makes a [`Vad`] per session.
pub trait VadFactory: Send + Sync {
    /// A detector configured from `options` (`[components.<name>]`, or `null`).
    fn create(&self, options: &serde_json::Value) -> Result<Box<dyn Vad>>;
}

/// Makes a [`TurnDetector`] per session.
pub trait TurnDetectorFactory: Send + Sync {
    /// A detector configured from `options` (`[components.<name>]`, or `null`).
    fn create(&self, options: &serde_json::Value) -> Result<Box<dyn TurnDetector>>;
}

/// Makes an [`AudioProcessor`] per session (custom processors and noise filters).
pub trait ProcessorFactory: Send + Sync {
    /// A processor configured from `options`, running at `order`.
    fn create(&self, options: &serde_json::Value, order: i32) -> Result<Box<dyn AudioProcessor>>;
}

/// An event of a speech-to-text stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SttEvent {
    /// A provisional transcript of the turn so far.
    Partial(String),
    /// The final transcript of the turn (after [`SttStream::end_turn`]).
    Final(String),
}

/// One session's streaming speech-to-text.
pub trait SttStream: Send {
    /// Feeds one frame in [`INTERNAL_FORMAT`]. Must not block: remote
    /// implementations queue the frame for their own task.
    fn push_audio(&mut self, frame: &AudioFrame) -> Result<()>;
    /// The user's turn ended: emit [`SttEvent::Final`] for it.
    fn end_turn(&mut self) -> Result<()>;
}

/// A speech-to-text service.
#[async_trait]
pub trait SpeechToText: Send + Sync {
    /// Opens a stream for one session; its events go to `events`.
    fn open(
        &self,
        options: &serde_json::Value,
        events: mpsc::Sender<SttEvent>,
    ) -> Result<Box<dyn SttStream>>;

    /// Checks `options` (`[components.<name>]`, or `null`) without opening
    /// anything: called once when a backend is made, so options it would
    /// refuse fail there, not in every session. The default accepts any
    /// options (they are then checked by [`SpeechToText::open`] only).
    ///
    /// # Errors
    ///
    /// `InvalidConfig` naming the option that is wrong.
    fn check_options(&self, options: &serde_json::Value) -> Result<()> {
        let _ = options;
        Ok(())
    }

    /// Whether the service answers, for the health probe of a component
    /// marked down after it failed a turn (see
    /// [`FailoverConfig`](crate::config::FailoverConfig)): called with the
    /// component's options, before the probe's tiny recognition. The
    /// default says yes; a component with a cheap status call of its own
    /// (an HTTP health endpoint) makes it here.
    ///
    /// # Errors
    ///
    /// Why the service cannot serve now (e.g. `ConnectionFailed`).
    async fn health(&self, options: &serde_json::Value) -> Result<()> {
        let _ = options;
        Ok(())
    }
}

/// A text-to-speech service.
#[async_trait]
pub trait TextToSpeech: Send + Sync {
    /// Synthesizes `text` into frames of `format`, sending each to `out` as soon
    /// as it is ready. Cancelled by dropping the future (barge-in does).
    async fn synthesize(
        &self,
        text: &str,
        format: AudioFormat,
        out: &mpsc::Sender<AudioFrame>,
    ) -> Result<()>;

    /// The component a pipeline uses given its options (`[components.<name>]`,
    /// or `null`): called when a config is checked and once per session's
    /// plan, so it must not connect to anything. `None` (the default) uses
    /// this component as it is, whatever the options; a component that takes
    /// options (a voice, a key) returns one made from them.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` naming the option that is wrong.
    fn with_options(&self, options: &serde_json::Value) -> Result<Option<Arc<dyn TextToSpeech>>> {
        let _ = options;
        Ok(None)
    }

    /// Whether the service answers, for the health probe of a component
    /// marked down after it failed a turn (see
    /// [`FailoverConfig`](crate::config::FailoverConfig)): called with the
    /// component's options, before the probe's tiny synthesis. The
    /// default says yes; a component with a cheap status call of its own
    /// (an HTTP health endpoint) makes it here.
    ///
    /// # Errors
    ///
    /// Why the service cannot serve now (e.g. `ConnectionFailed`).
    async fn health(&self, options: &serde_json::Value) -> Result<()> {
        let _ = options;
        Ok(())
    }
}

/// An event of a speech-to-speech stream.
#[derive(Clone, Debug, PartialEq)]
pub enum S2sEvent {
    /// What the model heard.
    UserTranscript {
        /// The text.
        text: String,
        /// Whether it is final.
        is_final: bool,
    },
    /// What the model says, as text.
    AgentText(String),
    /// Reply audio in [`INTERNAL_FORMAT`].
    Audio(AudioFrame),
    /// The reply to the last turn is complete.
    ReplyDone,
    /// The service cut its reply short (the user barged in on its side):
    /// reply audio still queued is dropped.
    Interrupted,
    /// The connection to a remote service changed state (e.g.
    /// `Reconnecting` after it dropped, `Connected` once back).
    Connection(crate::backend::ConnectionState),
    /// The connection to a remote service is lost for good: the session can
    /// no longer hear or speak.
    Failed {
        /// Why, e.g. `ConnectionFailed`.
        code: crate::error::ErrorCode,
        /// What happened, with the cause.
        message: String,
    },
    /// The session's link to a remote service is now served by another of
    /// its provider's equivalent endpoints (a provider's `fallback_urls`):
    /// reported as [`SessionEvent::ComponentSwitched`] with the stage
    /// `provider`.
    ///
    /// [`SessionEvent::ComponentSwitched`]: crate::session::events::SessionEvent::ComponentSwitched
    EndpointSwitched {
        /// The endpoint (`host:port`) that served before.
        from: String,
        /// The endpoint serving now.
        to: String,
        /// Why.
        reason: crate::session::events::SwitchReason,
    },
}

/// One session's speech-to-speech model.
pub trait S2sStream: Send {
    /// Feeds one user frame in [`INTERNAL_FORMAT`]; must not block.
    fn push_audio(&mut self, frame: &AudioFrame) -> Result<()>;
    /// The user's turn ended: reply to it.
    fn end_turn(&mut self) -> Result<()>;
    /// The user barged in: stop the current reply.
    fn interrupt(&mut self);
}

/// A speech-to-speech service.
#[async_trait]
pub trait SpeechToSpeech: Send + Sync {
    /// Opens a stream for one session; its events go to `events`.
    fn open(
        &self,
        options: &serde_json::Value,
        events: mpsc::Sender<S2sEvent>,
    ) -> Result<Box<dyn S2sStream>>;

    /// Checks `options` without opening anything, as
    /// [`SpeechToText::check_options`] does. The default accepts any options.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` naming the option that is wrong.
    fn check_options(&self, options: &serde_json::Value) -> Result<()> {
        let _ = options;
        Ok(())
    }

    /// Whether the service answers, for the health probe of a component
    /// marked down after it failed a turn (see
    /// [`FailoverConfig`](crate::config::FailoverConfig)): called with the
    /// component's options, before the probe opens a session. The
    /// default says yes; a component with a cheap status call of its own
    /// (an HTTP health endpoint) makes it here.
    ///
    /// # Errors
    ///
    /// Why the service cannot serve now (e.g. `ConnectionFailed`).
    async fn health(&self, options: &serde_json::Value) -> Result<()> {
        let _ = options;
        Ok(())
    }
}

/// Link-time registration of a speech-to-text component.
pub type SttEntry = StaticEntry<dyn SpeechToText>;
/// Link-time registration of a text-to-speech component.
pub type TtsEntry = StaticEntry<dyn TextToSpeech>;
/// Link-time registration of a speech-to-speech component.
pub type S2sEntry = StaticEntry<dyn SpeechToSpeech>;
/// Link-time registration of a VAD component.
pub type VadEntry = StaticEntry<dyn VadFactory>;
/// Link-time registration of a turn detection component.
pub type TurnEntry = StaticEntry<dyn TurnDetectorFactory>;
/// Link-time registration of an audio processor (or noise filter) component.
pub type ProcessorEntry = StaticEntry<dyn ProcessorFactory>;

#[doc(hidden)]
pub mod slices {
    //! The link-time slices behind [`register_component!`](crate::register_component).
    use super::*;

    #[linkme::distributed_slice]
    pub static STT: [SttEntry];
    #[linkme::distributed_slice]
    pub static TTS: [TtsEntry];
    #[linkme::distributed_slice]
    pub static S2S: [S2sEntry];
    #[linkme::distributed_slice]
    pub static VAD: [VadEntry];
    #[linkme::distributed_slice]
    pub static TURN: [TurnEntry];
    #[linkme::distributed_slice]
    pub static PROCESSOR: [ProcessorEntry];
}

/// Every kind of pipeline component, each in its own [`Registry`].
#[derive(Debug)]
pub struct ComponentRegistries {
    /// Speech-to-text services (`stt_provider`).
    pub stt: Registry<dyn SpeechToText>,
    /// Text-to-speech services (`tts_provider`).
    pub tts: Registry<dyn TextToSpeech>,
    /// Speech-to-speech services (`s2s_provider`).
    pub s2s: Registry<dyn SpeechToSpeech>,
    /// Voice activity detectors (`vad_provider`).
    pub vad: Registry<dyn VadFactory>,
    /// Turn detectors (`turn_detection_provider`).
    pub turn: Registry<dyn TurnDetectorFactory>,
    /// Audio processors and noise filters (`processors[].name`, `noise_cancellation_provider`).
    pub processor: Registry<dyn ProcessorFactory>,
}

impl ComponentRegistries {
    /// Independent registries holding every component registered at link time.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        ComponentRegistries {
            stt: Registry::from_static("stt component", &slices::STT),
            tts: Registry::from_static("tts component", &slices::TTS),
            s2s: Registry::from_static("s2s component", &slices::S2S),
            vad: Registry::from_static("vad component", &slices::VAD),
            turn: Registry::from_static("turn detection component", &slices::TURN),
            processor: Registry::from_static("audio processor", &slices::PROCESSOR),
        }
    }
}

/// The process-wide component registries, made on first use.
pub fn components() -> &'static ComponentRegistries {
    static COMPONENTS: OnceLock<ComponentRegistries> = OnceLock::new();
    COMPONENTS.get_or_init(|| {
        let c = ComponentRegistries::new();
        for dups in [
            c.stt.duplicates(),
            c.tts.duplicates(),
            c.s2s.duplicates(),
            c.vad.duplicates(),
            c.turn.duplicates(),
            c.processor.duplicates(),
        ] {
            for dup in dups {
                tracing::error!(target: "voice_backends::registry", "component {dup}");
            }
        }
        c
    })
}

/// Registers a pipeline component at link time.
///
/// The first argument is the kind: `stt`, `tts`, `s2s`, `vad`, `turn` or
/// `processor`; then the name and a function returning the component value
/// (for `vad`, `turn` and `processor`, the factory).
///
/// ```no_run
/// use voice_backends::pipeline::builtin::EnergyVadFactory;
///
/// // At module level: the built-in energy VAD under a name of your own (a
/// // second registration of a name that is taken makes that name unusable).
/// voice_backends::register_component!(vad, "my-energy", EnergyVadFactory::default);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! register_component {
    (stt, $name:expr, $ctor:expr $(,)?) => {
        $crate::__register_component!(STT, dyn $crate::pipeline::SpeechToText, $name, $ctor);
    };
    (tts, $name:expr, $ctor:expr $(,)?) => {
        $crate::__register_component!(TTS, dyn $crate::pipeline::TextToSpeech, $name, $ctor);
    };
    (s2s, $name:expr, $ctor:expr $(,)?) => {
        $crate::__register_component!(S2S, dyn $crate::pipeline::SpeechToSpeech, $name, $ctor);
    };
    (vad, $name:expr, $ctor:expr $(,)?) => {
        $crate::__register_component!(VAD, dyn $crate::pipeline::VadFactory, $name, $ctor);
    };
    (turn, $name:expr, $ctor:expr $(,)?) => {
        $crate::__register_component!(
            TURN,
            dyn $crate::pipeline::TurnDetectorFactory,
            $name,
            $ctor
        );
    };
    (processor, $name:expr, $ctor:expr $(,)?) => {
        $crate::__register_component!(
            PROCESSOR,
            dyn $crate::pipeline::ProcessorFactory,
            $name,
            $ctor
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __register_component {
    ($slice:ident, $ty:ty, $name:expr, $ctor:expr) => {
        const _: () = {
            #[$crate::__private::linkme::distributed_slice($crate::pipeline::slices::$slice)]
            #[linkme(crate = $crate::__private::linkme)]
            static __VOICE_BACKENDS_COMPONENT: $crate::registry::StaticEntry<$ty> =
                $crate::registry::StaticEntry {
                    name: $name,
                    module: ::core::module_path!(),
                    constructor: || -> ::std::sync::Arc<$ty> { ::std::sync::Arc::new(($ctor)()) },
                };
        };
    };
}

/// Shorthand used by component factories: the options object, or an empty one for `null`.
pub fn options_or_empty(options: &serde_json::Value) -> serde_json::Value {
    if options.is_null() {
        serde_json::Value::Object(serde_json::Map::new())
    } else {
        options.clone()
    }
}
