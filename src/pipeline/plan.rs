//! The pipeline plan: the component that fills each stage of a config's
//! pipeline, with its options.
//!
//! One walk over the components a config names, used everywhere they are
//! looked at, so no two places can disagree:
//!
//! - making a backend ([`RuntimeBackend::new`](crate::runtime::RuntimeBackend::new))
//!   and `voice-backends validate` check a config with [`Plan::check`]: every
//!   name is registered, and every component whose options can be checked
//!   without side effects accepts them;
//! - opening a session builds its [`Plan::for_session`] (the backend's
//!   config with the session's pipeline override) and makes the session's
//!   components from it.

use std::fmt;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};

use super::failover::{self, Candidate, FailoverReport, FailoverTts};
use super::{
    ComponentRegistries, ProcessorFactory, S2sEvent, S2sStream, SpeechToSpeech, SpeechToText,
    SttEvent, SttStream, TextToSpeech, TurnDetector, TurnDetectorFactory, Vad, VadFactory,
};
use crate::config::{
    Config, DEFAULT_TURN_DETECTION_PROVIDER, DEFAULT_VAD_PROVIDER, FailoverConfig, HostedStages,
    InterruptionConfig, PipelineType, PreemptiveConfig, SessionConfig,
};
use crate::error::{BackendError, ErrorCode, Result};
use crate::hooks::{AudioProcessor, sort_processors};
use crate::metrics::Metrics;
use crate::pipeline::events::SessionEvent;
use crate::registry::Registry;

/// A stage of the pipeline that a component fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Stage {
    /// Voice activity detection (`vad_provider`).
    Vad,
    /// Turn detection (`turn_detection_provider`).
    TurnDetection,
    /// Noise cancellation (`noise_cancellation_provider`), the first audio processor.
    NoiseCancellation,
    /// The custom audio processor at this index of `processors`.
    Processor(usize),
    /// Speech-to-text (`stt_provider`).
    Stt,
    /// Text-to-speech (`tts_provider`).
    Tts,
    /// Speech-to-speech (`s2s_provider`).
    S2s,
}

impl Stage {
    /// The field of a [`Config`] that names the stage's component, e.g.
    /// `vad_provider` or `processors[2].name`.
    pub fn field(self) -> String {
        match self {
            Stage::Vad => "vad_provider".to_owned(),
            Stage::TurnDetection => "turn_detection_provider".to_owned(),
            Stage::NoiseCancellation => "noise_cancellation_provider".to_owned(),
            Stage::Processor(i) => format!("processors[{i}].name"),
            Stage::Stt => "stt_provider".to_owned(),
            Stage::Tts => "tts_provider".to_owned(),
            Stage::S2s => "s2s_provider".to_owned(),
        }
    }
}

/// One stage's component: its name, the registered value, and its options.
pub struct Planned<T: ?Sized> {
    /// The stage it fills.
    pub stage: Stage,
    /// The name the config gives it.
    pub name: String,
    /// The registered component (for VAD, turn detection and processors,
    /// the factory that makes one per session).
    pub component: Arc<T>,
    /// Its options: `[components.<name>]` (or `null`), or a processor's own
    /// `options` when it has any.
    pub options: serde_json::Value,
    /// Where a processor runs: lower first (noise cancellation is `i32::MIN`);
    /// 0 for the other stages.
    pub order: i32,
    /// The options are a processor's own (`processors[i].options`).
    inline_options: bool,
}

impl<T: ?Sized> Planned<T> {
    /// Where the options come from in the config: `components.<name>`, or
    /// `processors[i].options` for a processor with options of its own.
    pub fn options_path(&self) -> String {
        match self.stage {
            Stage::Processor(i) if self.inline_options => format!("processors[{i}].options"),
            _ => format!("components.{}", self.name),
        }
    }
}

impl<T: ?Sized> fmt::Debug for Planned<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Planned")
            .field("stage", &self.stage)
            .field("name", &self.name)
            .field("order", &self.order)
            .finish_non_exhaustive()
    }
}

/// The components of a pipeline, each resolved to its registered value with
/// its options. See the [module docs](self).
#[derive(Debug)]
#[non_exhaustive]
pub struct Plan {
    /// The pipeline's type.
    pub pipeline_type: PipelineType,
    /// The stages the provider's service runs itself. A component named for
    /// one is resolved all the same; a session with a link to the service
    /// does not use it.
    pub hosted: HostedStages,
    /// Voice activity detection (the default when the config names none).
    pub vad: Planned<dyn VadFactory>,
    /// Turn detection (the default when the config names none).
    pub turn: Planned<dyn TurnDetectorFactory>,
    /// Noise cancellation, if any, then the custom processors in config order.
    pub processors: Vec<Planned<dyn ProcessorFactory>>,
    /// Speech-to-text, when named.
    pub stt: Option<Planned<dyn SpeechToText>>,
    /// Text-to-speech, when named: the component its options made
    /// ([`TextToSpeech::with_options`]).
    pub tts: Option<Planned<dyn TextToSpeech>>,
    /// Speech-to-speech, when named.
    pub s2s: Option<Planned<dyn SpeechToSpeech>>,
    /// The speech-to-text components to fall back to, in order
    /// (`stt_fallbacks`); see [`failover`].
    pub stt_fallbacks: Vec<Planned<dyn SpeechToText>>,
    /// The text-to-speech components to fall back to, in order
    /// (`tts_fallbacks`), each made from its options.
    pub tts_fallbacks: Vec<Planned<dyn TextToSpeech>>,
    /// The speech-to-speech components to fall back to, in order
    /// (`s2s_fallbacks`).
    pub s2s_fallbacks: Vec<Planned<dyn SpeechToSpeech>>,
    /// How the stages with fallbacks fail over (`[failover]`).
    pub failover: FailoverConfig,
    /// Where a session's failover wrappers report (see [`Plan::report_to`]).
    report: Arc<FailoverReport>,
    /// When user speech during a reply interrupts it: the config's
    /// `[interruption]`, with a session's `[pipeline.interruption]` changes
    /// in a session's plan.
    pub interruption: InterruptionConfig,
    /// Whether the agent starts on a stable partial transcript: the
    /// config's `[preemptive]`, with a session's `[pipeline.preemptive]`
    /// changes in a session's plan.
    pub preemptive: PreemptiveConfig,
}

/// What is wrong with one component of a plan.
#[derive(Debug)]
#[non_exhaustive]
pub struct PlanProblem {
    /// The stage.
    pub stage: Stage,
    /// The component's name, as the config gives it.
    pub name: String,
    /// The config field naming the component (`vad_provider`,
    /// `processors[1].name`; `pipeline.stt_provider` for a session's override).
    pub field: String,
    /// Where the problem is: [`PlanProblem::field`] for a name, the options'
    /// path ([`Planned::options_path`]) for options.
    pub path: String,
    /// What kind of problem.
    pub kind: PlanProblemKind,
    /// The error as the registry or the component gave it.
    pub error: BackendError,
}

/// The kinds of [`PlanProblem`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlanProblemKind {
    /// No component of the stage's kind is registered under the name.
    NotRegistered {
        /// The names that are registered for the stage, sorted.
        available: Vec<&'static str>,
    },
    /// The name is registered twice at link time, so it cannot be used.
    Duplicate,
    /// The component refused its options.
    Options,
}

/// Every problem found while planning a pipeline.
#[derive(Debug)]
pub struct PlanError {
    problems: Vec<PlanProblem>,
}

impl PlanError {
    /// The problems, in pipeline order (VAD, turn detection, noise
    /// cancellation, processors, STT, TTS, S2S).
    pub fn problems(&self) -> &[PlanProblem] {
        &self.problems
    }

    /// The problems, owned.
    pub fn into_problems(self) -> Vec<PlanProblem> {
        self.problems
    }

    /// One [`InvalidConfig`](ErrorCode::InvalidConfig) error of operation `op`
    /// with one detail per problem (its path: the error's message), and the
    /// message `pipeline components: PATH: MESSAGE; ...`.
    pub fn into_error(self, op: &'static str) -> BackendError {
        let mut e = BackendError::invalid_config(op, "pipeline components");
        for p in self.problems {
            e.push_detail(p.path, p.error.into_fields().message);
        }
        e.message = format!(
            "pipeline components: {}",
            e.details
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        e
    }
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("pipeline components: ")?;
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", p.path, p.error.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for PlanError {}

impl From<PlanError> for BackendError {
    fn from(e: PlanError) -> Self {
        e.into_error("pipeline.plan")
    }
}

/// The speech components a pipeline names, and the fields naming them.
struct Speech<'a> {
    pipeline_type: PipelineType,
    stt: Option<(&'a str, &'static str)>,
    tts: Option<(&'a str, &'static str)>,
    s2s: Option<(&'a str, &'static str)>,
    /// Each stage's fallback names, and the prefix of their field paths
    /// (`""`, or `"pipeline."` for a session's own list).
    fallbacks: [(Vec<String>, &'static str); 3],
}

impl<'a> Speech<'a> {
    fn of(config: &'a Config) -> Self {
        Speech {
            pipeline_type: config.pipeline_type,
            stt: config.stt_provider.as_deref().map(|n| (n, "stt_provider")),
            tts: config.tts_provider.as_deref().map(|n| (n, "tts_provider")),
            s2s: config.s2s_provider.as_deref().map(|n| (n, "s2s_provider")),
            fallbacks: [
                (config.stt_fallbacks.clone(), ""),
                (config.tts_fallbacks.clone(), ""),
                (config.s2s_fallbacks.clone(), ""),
            ],
        }
    }
}

/// Looks components up, noting what is wrong.
struct Planner<'a> {
    config: &'a Config,
    /// Also check the options of the components that can be checked without
    /// side effects.
    check: bool,
    problems: Vec<PlanProblem>,
}

impl Planner<'_> {
    fn find<T: ?Sized + Send + Sync + 'static>(
        &mut self,
        registry: &Registry<T>,
        stage: Stage,
        name: &str,
        field: impl FnOnce() -> String,
    ) -> Option<Arc<T>> {
        match registry.get(name) {
            Ok(component) => Some(component),
            Err(error) => {
                let kind = if error.code == ErrorCode::ProviderNotFound {
                    PlanProblemKind::NotRegistered {
                        available: registry.list(),
                    }
                } else {
                    PlanProblemKind::Duplicate
                };
                let field = field();
                self.problems.push(PlanProblem {
                    stage,
                    name: name.to_owned(),
                    path: field.clone(),
                    field,
                    kind,
                    error,
                });
                None
            }
        }
    }

    /// The component under `name` with its options from `[components.<name>]`.
    fn plan<T: ?Sized + Send + Sync + 'static>(
        &mut self,
        registry: &Registry<T>,
        stage: Stage,
        name: &str,
        field: impl FnOnce() -> String,
    ) -> Option<Planned<T>> {
        let component = self.find(registry, stage, name, field)?;
        Some(Planned {
            stage,
            name: name.to_owned(),
            component,
            options: self.config.component_options(name),
            order: 0,
            inline_options: false,
        })
    }

    /// The components of a fallback list (`{prefix}{stage}_fallbacks[i]`).
    fn plan_fallbacks<T: ?Sized + Send + Sync + 'static>(
        &mut self,
        registry: &Registry<T>,
        stage: Stage,
        (names, prefix): &(Vec<String>, &'static str),
    ) -> Vec<Planned<T>> {
        let list = stage.field().replace("_provider", "_fallbacks");
        names
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                self.plan(registry, stage, name, || format!("{prefix}{list}[{i}]"))
            })
            .collect()
    }

    /// Notes `result` as a problem with `planned`'s options.
    fn options<T: ?Sized>(&mut self, planned: &Planned<T>, result: Result<()>) {
        if let Err(error) = result {
            self.problems.push(PlanProblem {
                stage: planned.stage,
                name: planned.name.clone(),
                field: planned.stage.field(),
                path: planned.options_path(),
                kind: PlanProblemKind::Options,
                error,
            });
        }
    }

    fn run(
        mut self,
        speech: Speech<'_>,
        hosted: HostedStages,
        reg: &ComponentRegistries,
    ) -> std::result::Result<Plan, PlanError> {
        let config = self.config;
        let check = self.check;

        let vad_name = config.vad_provider.as_deref();
        let vad = self.plan(
            &reg.vad,
            Stage::Vad,
            vad_name.unwrap_or(DEFAULT_VAD_PROVIDER),
            || Stage::Vad.field(),
        );
        if check && let Some(v) = &vad {
            self.options(v, v.component.create(&v.options).map(drop));
        }

        let turn_name = config.turn_detection_provider.as_deref();
        let turn = self.plan(
            &reg.turn,
            Stage::TurnDetection,
            turn_name.unwrap_or(DEFAULT_TURN_DETECTION_PROVIDER),
            || Stage::TurnDetection.field(),
        );
        if check && let Some(t) = &turn {
            self.options(t, t.component.create(&t.options).map(drop));
        }

        let mut processors = Vec::new();
        if let Some(n) = config.noise_cancellation_provider.as_deref()
            && let Some(mut noise) = self.plan(&reg.processor, Stage::NoiseCancellation, n, || {
                Stage::NoiseCancellation.field()
            })
        {
            noise.order = i32::MIN;
            processors.push(noise);
        }
        for (i, p) in config.processors.iter().enumerate() {
            let stage = Stage::Processor(i);
            if let Some(component) = self.find(&reg.processor, stage, &p.name, || stage.field()) {
                processors.push(Planned {
                    stage,
                    name: p.name.clone(),
                    component,
                    options: config.processor_options(p),
                    order: p.order,
                    inline_options: p.has_inline_options(),
                });
            }
        }
        if check {
            for p in &processors {
                let made = p.component.create(&p.options, p.order).map(drop);
                self.options(p, made);
            }
        }

        let stt = speech
            .stt
            .and_then(|(name, field)| self.plan(&reg.stt, Stage::Stt, name, || field.to_owned()));
        if check
            && speech.pipeline_type == PipelineType::SttTts
            && let Some(s) = &stt
        {
            self.options(s, s.component.check_options(&s.options));
        }
        let tts = speech
            .tts
            .and_then(|(name, field)| self.plan(&reg.tts, Stage::Tts, name, || field.to_owned()))
            .and_then(|mut t| match t.component.with_options(&t.options) {
                Ok(made) => {
                    if let Some(made) = made {
                        t.component = made;
                    }
                    Some(t)
                }
                Err(e) => {
                    self.options(&t, Err(e));
                    None
                }
            });
        let s2s = speech
            .s2s
            .and_then(|(name, field)| self.plan(&reg.s2s, Stage::S2s, name, || field.to_owned()));
        if check
            && speech.pipeline_type == PipelineType::S2s
            && let Some(s) = &s2s
        {
            self.options(s, s.component.check_options(&s.options));
        }
        let [stt_names, tts_names, s2s_names] = &speech.fallbacks;
        let stt_fallbacks = self.plan_fallbacks(&reg.stt, Stage::Stt, stt_names);
        if check && speech.pipeline_type == PipelineType::SttTts {
            for s in &stt_fallbacks {
                self.options(s, s.component.check_options(&s.options));
            }
        }
        let tts_fallbacks = self
            .plan_fallbacks(&reg.tts, Stage::Tts, tts_names)
            .into_iter()
            .filter_map(|mut t| match t.component.with_options(&t.options) {
                Ok(made) => {
                    if let Some(made) = made {
                        t.component = made;
                    }
                    Some(t)
                }
                Err(e) => {
                    self.options(&t, Err(e));
                    None
                }
            })
            .collect();
        let s2s_fallbacks = self.plan_fallbacks(&reg.s2s, Stage::S2s, s2s_names);
        if check && speech.pipeline_type == PipelineType::S2s {
            for s in &s2s_fallbacks {
                self.options(s, s.component.check_options(&s.options));
            }
        }

        // Every lookup that failed noted a problem.
        match (vad, turn) {
            (Some(vad), Some(turn)) if self.problems.is_empty() => Ok(Plan {
                pipeline_type: speech.pipeline_type,
                hosted,
                vad,
                turn,
                processors,
                stt,
                tts,
                s2s,
                stt_fallbacks,
                tts_fallbacks,
                s2s_fallbacks,
                failover: config.failover,
                report: Arc::default(),
                interruption: config.interruption.clone(),
                preemptive: config.preemptive.clone(),
            }),
            _ => Err(PlanError {
                problems: self.problems,
            }),
        }
    }
}

impl Plan {
    /// The plan of a backend's `config`: every component it names (and the
    /// default VAD and turn detector when it names none) looked up in
    /// `registries`. Options are not checked; see [`Plan::check`].
    ///
    /// # Errors
    ///
    /// Every name that is not registered (listing the names that are), or is
    /// registered twice at link time.
    pub fn new(
        config: &Config,
        hosted: HostedStages,
        registries: &ComponentRegistries,
    ) -> std::result::Result<Plan, PlanError> {
        let planner = Planner {
            config,
            check: false,
            problems: Vec::new(),
        };
        planner.run(Speech::of(config), hosted, registries)
    }

    /// [`Plan::new`], and the options of each component that can be checked
    /// without side effects: VAD, turn detector and processors are made (and
    /// dropped), the speech-to-text or speech-to-speech component the
    /// pipeline type uses checks its options
    /// ([`SpeechToText::check_options`]) without opening a stream. (A
    /// text-to-speech component takes its options in [`Plan::new`] already:
    /// [`TextToSpeech::with_options`].) What a
    /// backend is made with, and what `voice-backends validate` reports.
    ///
    /// # Errors
    ///
    /// Every problem at once: names as for [`Plan::new`], and options each
    /// component refuses.
    pub fn check(
        config: &Config,
        hosted: HostedStages,
        registries: &ComponentRegistries,
    ) -> std::result::Result<Plan, PlanError> {
        let planner = Planner {
            config,
            check: true,
            problems: Vec::new(),
        };
        planner.run(Speech::of(config), hosted, registries)
    }

    /// The plan of one session on a backend configured by `base`: the
    /// session's pipeline override
    /// ([`SessionConfig::resolve_pipeline_for`]) applied to the base's
    /// speech components; VAD, turn detection and processors are the base's.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](ErrorCode::InvalidConfig): the merged pipeline lacks
    /// a component its type needs, or names one that is not registered
    /// (operation `pipeline.plan`, one detail per problem).
    pub fn for_session(
        base: &Config,
        session: &SessionConfig,
        hosted: HostedStages,
        registries: &ComponentRegistries,
    ) -> Result<Plan> {
        let resolved = session.resolve_pipeline_for(base, hosted)?;
        let overridden = session.pipeline.as_ref();
        let field = |set: bool, base_field: &'static str, session_field: &'static str| {
            if set { session_field } else { base_field }
        };
        let speech = Speech {
            pipeline_type: resolved.pipeline_type,
            stt: resolved.stt_provider.as_deref().map(|n| {
                let set = overridden.is_some_and(|p| p.stt_provider.is_some());
                (n, field(set, "stt_provider", "pipeline.stt_provider"))
            }),
            tts: resolved.tts_provider.as_deref().map(|n| {
                let set = overridden.is_some_and(|p| p.tts_provider.is_some());
                (n, field(set, "tts_provider", "pipeline.tts_provider"))
            }),
            s2s: resolved.s2s_provider.as_deref().map(|n| {
                let set = overridden.is_some_and(|p| p.s2s_provider.is_some());
                (n, field(set, "s2s_provider", "pipeline.s2s_provider"))
            }),
            fallbacks: {
                let fallbacks = session.resolve_fallbacks(base);
                let prefix = |set: bool| if set { "pipeline." } else { "" };
                [
                    (
                        fallbacks.stt,
                        prefix(overridden.is_some_and(|p| p.stt_fallbacks.is_some())),
                    ),
                    (
                        fallbacks.tts,
                        prefix(overridden.is_some_and(|p| p.tts_fallbacks.is_some())),
                    ),
                    (
                        fallbacks.s2s,
                        prefix(overridden.is_some_and(|p| p.s2s_fallbacks.is_some())),
                    ),
                ]
            },
        };
        let planner = Planner {
            config: base,
            check: false,
            problems: Vec::new(),
        };
        let mut plan = planner.run(speech, hosted, registries)?;
        if let Some(o) = overridden.and_then(|p| p.interruption.as_ref()) {
            plan.interruption = o.apply(&base.interruption);
        }
        if let Some(o) = overridden.and_then(|p| p.preemptive.as_ref()) {
            plan.preemptive = o.apply(&base.preemptive);
        }
        Ok(plan)
    }

    /// A voice activity detector for one session.
    ///
    /// # Errors
    ///
    /// The factory's, e.g. `InvalidConfig` for options it refuses.
    pub fn make_vad(&self) -> Result<Box<dyn Vad>> {
        self.vad.component.create(&self.vad.options)
    }

    /// A turn detector for one session.
    ///
    /// # Errors
    ///
    /// The factory's, e.g. `InvalidConfig` for options it refuses.
    pub fn make_turn_detector(&self) -> Result<Box<dyn TurnDetector>> {
        self.turn.component.create(&self.turn.options)
    }

    /// The audio processors for one session, noise cancellation included,
    /// sorted by order (lower first).
    ///
    /// # Errors
    ///
    /// The first factory's error.
    pub fn make_processors(&self) -> Result<Vec<Box<dyn AudioProcessor>>> {
        let mut made = self
            .processors
            .iter()
            .map(|p| p.component.create(&p.options, p.order))
            .collect::<Result<Vec<_>>>()?;
        sort_processors(&mut made);
        Ok(made)
    }

    /// Opens the speech-to-text stream of one session, its events to `events`.
    ///
    /// # Errors
    ///
    /// `PipelineError` when the plan has no speech-to-text component; the
    /// component's own errors.
    pub fn open_stt(&self, events: mpsc::Sender<SttEvent>) -> Result<Box<dyn SttStream>> {
        let stt = self.stt.as_ref().ok_or_else(|| missing("stt_provider"))?;
        if self.stt_fallbacks.is_empty() {
            return stt.component.open(&stt.options, events);
        }
        let list = candidates(stt, &self.stt_fallbacks);
        failover::open_stt(list, self.failover, self.report.clone(), events)
    }

    /// Opens the speech-to-speech stream of one session, its events to `events`.
    ///
    /// # Errors
    ///
    /// `PipelineError` when the plan has no speech-to-speech component; the
    /// component's own errors.
    pub fn open_s2s(&self, events: mpsc::Sender<S2sEvent>) -> Result<Box<dyn S2sStream>> {
        let s2s = self.s2s.as_ref().ok_or_else(|| missing("s2s_provider"))?;
        if self.s2s_fallbacks.is_empty() {
            return s2s.component.open(&s2s.options, events);
        }
        let list = candidates(s2s, &self.s2s_fallbacks);
        failover::open_s2s(list, self.failover, self.report.clone(), events)
    }

    /// The text-to-speech component, when the plan has one: with
    /// fallbacks, one session's [`FailoverTts`] over the list.
    pub fn tts(&self) -> Option<Arc<dyn TextToSpeech>> {
        let tts = self.tts.as_ref()?;
        if self.tts_fallbacks.is_empty() {
            return Some(Arc::clone(&tts.component));
        }
        let list = candidates(tts, &self.tts_fallbacks);
        Some(Arc::new(FailoverTts::new(
            list,
            self.failover,
            self.report.clone(),
        )))
    }

    /// Sends what this plan's failover wrappers report (which component
    /// served a turn, the switches) to a session's `events` and its
    /// backend's `metrics`. Called once the session's engine exists; until
    /// then they go to the log only.
    pub fn report_to(&self, events: broadcast::Sender<SessionEvent>, metrics: Arc<Metrics>) {
        self.report.attach(events, metrics);
    }

    /// The text-to-speech component the pipeline needs.
    ///
    /// # Errors
    ///
    /// `PipelineError` when the plan has none.
    pub fn require_tts(&self) -> Result<Arc<dyn TextToSpeech>> {
        self.tts().ok_or_else(|| missing("tts_provider"))
    }
}

/// A stage's list for its failover wrapper: the primary, then its fallbacks.
fn candidates<T: ?Sized>(primary: &Planned<T>, fallbacks: &[Planned<T>]) -> Vec<Candidate<T>> {
    std::iter::once(primary)
        .chain(fallbacks)
        .map(|p| {
            Candidate::new(
                p.stage,
                &p.name,
                Arc::clone(&p.component),
                p.options.clone(),
            )
        })
        .collect()
}

fn missing(field: &str) -> BackendError {
    BackendError::new(
        "pipeline.plan",
        ErrorCode::PipelineError,
        format!("the pipeline has no component for {field}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProcessorConfig;
    use crate::pipeline::components;

    fn echo() -> Config {
        let mut config = Config::new("local");
        config.pipeline_type = PipelineType::S2s;
        config.s2s_provider = Some("echo".into());
        config
    }

    #[test]
    fn a_plan_names_every_stage_with_defaults() {
        let plan = Plan::check(&echo(), HostedStages::NONE, components()).unwrap();
        assert_eq!(plan.vad.name, DEFAULT_VAD_PROVIDER);
        assert_eq!(plan.turn.name, DEFAULT_TURN_DETECTION_PROVIDER);
        assert_eq!(plan.s2s.as_ref().map(|s| s.name.as_str()), Some("echo"));
        assert!(plan.stt.is_none() && plan.tts.is_none());
        assert!(plan.processors.is_empty());
        assert!(plan.make_vad().is_ok() && plan.make_turn_detector().is_ok());
        assert_eq!(
            plan.open_stt(mpsc::channel(1).0).err().map(|e| e.code),
            Some(ErrorCode::PipelineError)
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_path_and_kind() {
        let mut config = echo();
        config.vad_provider = Some("nope".into());
        config.processors.push(ProcessorConfig {
            name: "missing".into(),
            order: 3,
            options: serde_json::json!({}),
        });
        config.components.insert(
            "silence".into(),
            crate::config::ProviderSection(
                serde_json::json!({ "min_speech": "1h" })
                    .as_object()
                    .cloned()
                    .unwrap(),
            ),
        );
        let e = Plan::check(&config, HostedStages::NONE, components()).unwrap_err();
        let found: Vec<(&str, &PlanProblemKind)> = e
            .problems()
            .iter()
            .map(|p| (p.path.as_str(), &p.kind))
            .collect();
        assert_eq!(found.len(), 3, "{e}");
        assert_eq!(found[0].0, "vad_provider");
        assert!(
            matches!(found[0].1, PlanProblemKind::NotRegistered { available } if available.contains(&"energy"))
        );
        assert_eq!(found[1], ("components.silence", &PlanProblemKind::Options));
        assert_eq!(found[2].0, "processors[0].name");
        // Names alone: the options are left to the session.
        let e = Plan::new(&config, HostedStages::NONE, components()).unwrap_err();
        assert_eq!(e.problems().len(), 2, "{e}");
        let error = e.into_error("backend.new");
        assert_eq!(error.code, ErrorCode::InvalidConfig);
        assert!(
            error.message.starts_with(
                "pipeline components: processors[0].name: no audio processor named \"missing\""
            ),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_session_plan_takes_the_override_and_names_its_fields() {
        let mut session = SessionConfig::new("u");
        session.pipeline = Some(crate::config::PipelineOverride {
            s2s_provider: Some("elsewhere".into()),
            ..Default::default()
        });
        let e = Plan::for_session(&echo(), &session, HostedStages::NONE, components()).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig);
        assert!(e.details.contains_key("pipeline.s2s_provider"), "{e}");
        let plan = Plan::for_session(
            &echo(),
            &SessionConfig::new("u"),
            HostedStages::NONE,
            components(),
        )
        .unwrap();
        assert!(plan.open_s2s(mpsc::channel(1).0).is_ok());
    }
}
