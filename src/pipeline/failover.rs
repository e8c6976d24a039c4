//! Failover of the speech components: a stage with a fallback list
//! (`stt_fallbacks`, `tts_fallbacks`, `s2s_fallbacks`) is served by a wrapper
//! over the ordered list, so one provider's outage does not end the turn.
//!
//! ```toml
//! stt_provider = "cloud-stt"
//! stt_fallbacks = ["pocketsphinx"]
//! tts_provider = "cloud-tts"
//! tts_fallbacks = ["espeak"]
//!
//! [failover]
//! timeout = "2s"          # first result: final transcript, first audio, first reply
//! probe_interval = "5s"   # first health probe of a component marked down
//! max_probe_interval = "1m"
//! ```
//!
//! # Within the turn
//!
//! - **Speech-to-text.** The wrapper keeps the audio of the turns whose final
//!   transcript has not come yet. When the component errors (on a frame, at
//!   the end of the turn, or its stream ends), or gives no final transcript
//!   within `failover.timeout` of the end of the turn, the next component is
//!   opened and hears that audio again, turn ends included: nothing the user
//!   said is lost, and the transcript of the very turn comes from the next.
//! - **Text-to-speech.** Each piece the engine hands over (a sentence of a
//!   streamed reply, or the whole reply) is synthesized again **from its
//!   start** by the next component when the component errors, or sends no
//!   audio for `failover.timeout` (before its first frame or between two).
//!   A component that fails before its first audio (the usual outage: a
//!   refused connection, no answer) repeats nothing; one that fails half-way
//!   through a sentence has the user hear that sentence's start again, in
//!   the next voice.
//! - **Speech-to-speech.** As for speech-to-text: the audio of the turns not
//!   yet answered is replayed to the next model when the model errors (its
//!   `Failed` event, its stream ending) or gives no reply within
//!   `failover.timeout` of the end of the turn. A model that fails half-way
//!   through its reply has the next reply to the turn from its start.
//!
//! Every component of the list is tried at most once per turn, components
//! marked down last; when all fail, the session gets a
//! [`SessionEvent::Error`] and the next turn starts over.
//!
//! # Health
//!
//! A component that failed is marked down, once for the whole process (per
//! stage, name and options: every backend and session using it sees one
//! outage once): turns go to the next component without waiting for it.
//! After `failover.probe_interval` it is probed: its
//! [`health`](super::SpeechToText::health) method, then a tiny recognition
//! (a few frames of silence and a final transcript), a tiny synthesis (audio
//! for "ok"), or, for speech-to-speech, a stream that opens. Each failed
//! probe doubles the wait, up to `failover.max_probe_interval`. Once a probe
//! passes, the component takes turns again, first in its list.
//!
//! # What is reported
//!
//! Each session says which component served it: a
//! [`SessionEvent::ComponentSwitched`] when a turn is served by another
//! component than the last one (failing over, or back once recovered), and
//! the backend's `pipeline_component_switches_total{stage,from,to,reason}`
//! and `pipeline_component_served_total{stage,component}`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use super::plan::Stage;
use super::{
    INTERNAL_FORMAT, S2sEvent, S2sStream, SpeechToSpeech, SpeechToText, SttEvent, SttStream,
    TextToSpeech,
};
use crate::audio::{AudioFormat, AudioFrame};
use crate::config::FailoverConfig;
use crate::error::{BackendError, ErrorCode, Result};
use crate::metrics::Metrics;
use crate::pipeline::events::SessionEvent;
use crate::session::events::SwitchReason;

/// Capacity of the channel between a wrapped component and its wrapper.
const CHANNEL: usize = 256;
/// The most turn audio a speech-to-text or speech-to-speech wrapper keeps
/// for a replay; older frames are dropped (a turn longer than this loses
/// its start if its component fails).
pub const MAX_REPLAY_AUDIO: Duration = Duration::from_secs(120);

fn label(stage: Stage) -> &'static str {
    match stage {
        Stage::Stt => "stt",
        Stage::Tts => "tts",
        Stage::S2s => "s2s",
        _ => "other",
    }
}

// ---------------------------------------------------------------------------
// Health, shared by the process

type ProbeFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;
type Probe = Arc<dyn Fn() -> ProbeFuture + Send + Sync>;

/// Whether one component (by stage, name and options) is up, and its probe.
struct Health {
    stage: Stage,
    name: String,
    up: AtomicBool,
    state: Mutex<HealthState>,
}

#[derive(Default)]
struct HealthState {
    /// A probe task runs.
    probing: bool,
    /// What the probe runs, and its settings (from the config that marked
    /// the component down).
    probe: Option<(Probe, FailoverConfig)>,
}

type HealthKey = (Stage, String, String);

fn health_table() -> &'static Mutex<HashMap<HealthKey, Arc<Health>>> {
    static TABLE: OnceLock<Mutex<HashMap<HealthKey, Arc<Health>>>> = OnceLock::new();
    TABLE.get_or_init(Mutex::default)
}

fn health_of(stage: Stage, name: &str, options: &serde_json::Value) -> Arc<Health> {
    let key = (stage, name.to_owned(), options.to_string());
    let mut table = health_table()
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    table
        .entry(key)
        .or_insert_with(|| {
            Arc::new(Health {
                stage,
                name: name.to_owned(),
                up: AtomicBool::new(true),
                state: Mutex::default(),
            })
        })
        .clone()
}

/// Whether the component `name` of `stage` (with any options) is marked down
/// in this process: it failed a turn and no health probe has passed since.
pub fn is_down(stage: Stage, name: &str) -> bool {
    health_table()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .any(|h| h.stage == stage && h.name == name && !h.up.load(Ordering::Acquire))
}

impl Health {
    fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the component down and makes sure it is probed.
    fn mark_down(self: &Arc<Self>, probe: Probe, settings: FailoverConfig) {
        let mut state = self.lock();
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                stage = label(self.stage),
                component = %self.name,
                "component marked down; probing it every {:?} (doubling)",
                settings.probe_interval
            );
        }
        state.probe = Some((probe, settings));
        self.start_probe(&mut state);
    }

    /// Starts the probe task if the component is down and none runs (one
    /// whose runtime ended is started again).
    fn ensure_probe(self: &Arc<Self>) {
        if !self.is_up() {
            let mut state = self.lock();
            self.start_probe(&mut state);
        }
    }

    fn start_probe(self: &Arc<Self>, state: &mut HealthState) {
        if state.probing {
            return;
        }
        let Some((probe, settings)) = state.probe.clone() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        state.probing = true;
        runtime.spawn(probe_loop(self.clone(), probe, settings));
    }
}

/// Resets `probing` however the probe task ends (its runtime may shut down).
struct Probing(Arc<Health>);

impl Drop for Probing {
    fn drop(&mut self) {
        self.0.lock().probing = false;
    }
}

async fn probe_loop(health: Arc<Health>, probe: Probe, settings: FailoverConfig) {
    let guard = Probing(health);
    let health = &guard.0;
    let mut wait = settings.probe_interval;
    loop {
        tokio::time::sleep(wait).await;
        let outcome = match tokio::time::timeout(settings.timeout, probe()).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::new(
                "pipeline.failover",
                ErrorCode::Timeout,
                format!("no answer within {:?}", settings.timeout),
            )),
        };
        match outcome {
            Ok(()) => {
                let mut state = health.lock();
                health.up.store(true, Ordering::Release);
                state.probing = false;
                tracing::info!(
                    stage = label(health.stage),
                    component = %health.name,
                    "component back up: its health probe passed"
                );
                return;
            }
            Err(e) => {
                wait = (wait * 2).min(settings.max_probe_interval);
                tracing::debug!(
                    stage = label(health.stage),
                    component = %health.name,
                    "health probe failed, next in {wait:?}: {}",
                    e.message
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Reporting, per session

/// Where a session's failover wrappers report: its events and its backend's
/// metrics, attached once the session's engine exists
/// ([`Plan::report_to`](super::Plan::report_to)). Until then (and for a
/// plan only checked) reports go to the log only.
#[derive(Debug, Default)]
pub struct FailoverReport {
    sink: OnceLock<(broadcast::Sender<SessionEvent>, Arc<Metrics>)>,
}

impl FailoverReport {
    /// Sends this session's reports to `events` and `metrics` (the first
    /// call wins).
    pub fn attach(&self, events: broadcast::Sender<SessionEvent>, metrics: Arc<Metrics>) {
        let _ = self.sink.set((events, metrics));
    }

    fn switched(&self, stage: Stage, from: &str, to: &str, reason: SwitchReason) {
        let stage = label(stage);
        tracing::info!(stage, from, to, %reason, "the stage is served by another component");
        if let Some((events, metrics)) = self.sink.get() {
            metrics.component_switched(stage, from, to, reason.as_str());
            let _ = events.send(SessionEvent::ComponentSwitched {
                stage: stage.to_owned(),
                from: from.to_owned(),
                to: to.to_owned(),
                reason,
            });
        }
    }

    fn served(&self, stage: Stage, component: &str) {
        if let Some((_, metrics)) = self.sink.get() {
            metrics.component_served(label(stage), component);
        }
    }

    fn failed(&self, message: String) {
        tracing::error!("{message}");
        if let Some((events, _)) = self.sink.get() {
            let _ = events.send(SessionEvent::Error {
                code: ErrorCode::PipelineError,
                message,
            });
        }
    }
}

// ---------------------------------------------------------------------------
// The list and who served

/// One component of a stage's list, with its options and its health.
pub struct Candidate<T: ?Sized> {
    name: String,
    component: Arc<T>,
    options: serde_json::Value,
    health: Arc<Health>,
}

impl<T: ?Sized> Candidate<T> {
    /// The component `name` of `stage` with its `options`.
    pub fn new(stage: Stage, name: &str, component: Arc<T>, options: serde_json::Value) -> Self {
        Candidate {
            health: health_of(stage, name, &options),
            name: name.to_owned(),
            component,
            options,
        }
    }
}

impl<T: ?Sized> std::fmt::Debug for Candidate<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Candidate")
            .field("name", &self.name)
            .field("up", &self.health.is_up())
            .finish_non_exhaustive()
    }
}

/// The order to try a list in: the components up, in list order, then the
/// ones down (their probes restarted if they stopped).
fn order<T: ?Sized>(list: &[Candidate<T>]) -> Vec<usize> {
    let (mut up, down): (Vec<usize>, Vec<usize>) =
        (0..list.len()).partition(|&i| list[i].health.is_up());
    for &i in &down {
        list[i].health.ensure_probe();
    }
    up.extend(down);
    up
}

/// Which component served the session's last turn, and why others did not
/// serve this one.
struct Served {
    stage: Stage,
    current: usize,
    reasons: Vec<Option<SwitchReason>>,
}

impl Served {
    fn new(stage: Stage, len: usize) -> Self {
        Served {
            stage,
            current: 0,
            reasons: vec![None; len],
        }
    }

    fn failed(&mut self, i: usize, reason: SwitchReason) {
        self.reasons[i] = Some(reason);
    }

    /// The turn was served by `i`: reported, and the reasons start over.
    fn by<T: ?Sized>(&mut self, i: usize, list: &[Candidate<T>], report: &FailoverReport) {
        if i != self.current {
            let reason = if i < self.current {
                SwitchReason::Recovered
            } else {
                self.reasons[self.current].unwrap_or(SwitchReason::Down)
            };
            report.switched(self.stage, &list[self.current].name, &list[i].name, reason);
            self.current = i;
        }
        report.served(self.stage, &list[i].name);
        self.reasons.fill(None);
    }
}

fn stage_error(stage: Stage, what: &str, failures: &[String]) -> BackendError {
    BackendError::new(
        "pipeline.failover",
        ErrorCode::PipelineError,
        format!(
            "every {} component {what}: {}",
            label(stage),
            failures.join("; ")
        ),
    )
}

// ---------------------------------------------------------------------------
// Probes

fn stt_probe(c: &Candidate<dyn SpeechToText>) -> Probe {
    let (component, options) = (c.component.clone(), c.options.clone());
    Arc::new(move || {
        let (component, options) = (component.clone(), options.clone());
        Box::pin(async move {
            component.health(&options).await?;
            let (tx, mut rx) = mpsc::channel(CHANNEL);
            let mut stream = component.open(&options, tx)?;
            let silence = AudioFrame::new(
                INTERNAL_FORMAT,
                vec![0u8; INTERNAL_FORMAT.bytes_for(Duration::from_millis(20))],
            )?;
            for _ in 0..10 {
                stream.push_audio(&silence)?;
            }
            stream.end_turn()?;
            loop {
                match rx.recv().await {
                    Some(SttEvent::Final(_)) => return Ok(()),
                    Some(SttEvent::Partial(_)) => {}
                    None => return Err(closed("the probe's stream")),
                }
            }
        })
    })
}

fn tts_probe(c: &Candidate<dyn TextToSpeech>) -> Probe {
    let (component, options) = (c.component.clone(), c.options.clone());
    Arc::new(move || {
        let (component, options) = (component.clone(), options.clone());
        Box::pin(async move {
            component.health(&options).await?;
            let (tx, mut rx) = mpsc::channel(CHANNEL);
            let synth = component.synthesize("ok", INTERNAL_FORMAT, &tx);
            tokio::select! {
                biased;
                Some(_) = rx.recv() => Ok(()),
                r = synth => {
                    r?;
                    rx.try_recv().map(drop).map_err(|_| closed("the probe's synthesis (no audio)"))
                }
            }
        })
    })
}

fn s2s_probe(c: &Candidate<dyn SpeechToSpeech>) -> Probe {
    let (component, options) = (c.component.clone(), c.options.clone());
    Arc::new(move || {
        let (component, options) = (component.clone(), options.clone());
        Box::pin(async move {
            component.health(&options).await?;
            let (tx, _rx) = mpsc::channel(CHANNEL);
            component.open(&options, tx).map(drop)
        })
    })
}

fn closed(what: &str) -> BackendError {
    BackendError::new(
        "pipeline.failover",
        ErrorCode::PipelineError,
        format!("{what} ended"),
    )
}

// ---------------------------------------------------------------------------
// Speech-to-text and speech-to-speech: a supervising task per session

/// A frame or a turn's end, kept for a replay.
enum Item {
    Frame(AudioFrame),
    End,
}

/// What the session sends its wrapper's task.
enum Cmd {
    Audio(AudioFrame),
    EndTurn,
    Interrupt,
}

/// The audio of the turns not yet answered, for a replay.
#[derive(Default)]
struct Replay {
    items: VecDeque<Item>,
    audio: Duration,
    /// Turns ended and not yet answered.
    pending: usize,
}

impl Replay {
    fn frame(&mut self, frame: &AudioFrame) {
        self.audio += frame.duration();
        self.items.push_back(Item::Frame(frame.clone()));
        while self.audio > MAX_REPLAY_AUDIO {
            match self.items.iter().position(|i| matches!(i, Item::Frame(_))) {
                Some(at) => {
                    if let Some(Item::Frame(f)) = self.items.remove(at) {
                        self.audio = self.audio.saturating_sub(f.duration());
                    }
                }
                None => break,
            }
        }
    }

    fn end(&mut self) {
        self.items.push_back(Item::End);
        self.pending += 1;
    }

    /// The oldest pending turn is answered (or given up): its audio goes.
    fn answered(&mut self) {
        if self.pending == 0 {
            return;
        }
        while let Some(item) = self.items.pop_front() {
            match item {
                Item::Frame(f) => self.audio = self.audio.saturating_sub(f.duration()),
                Item::End => break,
            }
        }
        self.pending -= 1;
    }

    /// Every ended turn is done with (a barge-in cut the reply).
    fn all_answered(&mut self) {
        while self.pending > 0 {
            self.answered();
        }
    }
}

/// What a supervised stream kind does: open, feed, and say what its events mean.
trait Supervised: Send + 'static {
    type Component: ?Sized + Send + Sync + 'static;
    type Stream: ?Sized + Send;
    type Event: Send + 'static;
    const STAGE: Stage;
    fn open(
        c: &Candidate<Self::Component>,
        tx: mpsc::Sender<Self::Event>,
    ) -> Result<Box<Self::Stream>>;
    fn push(stream: &mut Self::Stream, frame: &AudioFrame) -> Result<()>;
    fn end_turn(stream: &mut Self::Stream) -> Result<()>;
    fn interrupt(stream: &mut Self::Stream);
    fn probe(c: &Candidate<Self::Component>) -> Probe;
    /// What an event means for the turn.
    fn meaning(event: &Self::Event) -> Meaning;
    /// The event that tells the session it can no longer be served.
    fn lost(message: String) -> Option<Self::Event>;
}

/// What an event of a wrapped stream means.
enum Meaning {
    /// Nothing for the turn (a partial, a connection change): passed on.
    Other,
    /// The answer to the oldest pending turn has begun (a reply's first
    /// text or audio): passed on.
    Began,
    /// The oldest pending turn is answered (a final transcript, a reply
    /// done): passed on.
    Answered,
    /// The component failed: not passed on.
    Failed(String),
}

struct SttKind;

impl Supervised for SttKind {
    type Component = dyn SpeechToText;
    type Stream = dyn SttStream;
    type Event = SttEvent;
    const STAGE: Stage = Stage::Stt;
    fn open(
        c: &Candidate<dyn SpeechToText>,
        tx: mpsc::Sender<SttEvent>,
    ) -> Result<Box<dyn SttStream>> {
        c.component.open(&c.options, tx)
    }
    fn push(stream: &mut (dyn SttStream + 'static), frame: &AudioFrame) -> Result<()> {
        stream.push_audio(frame)
    }
    fn end_turn(stream: &mut (dyn SttStream + 'static)) -> Result<()> {
        stream.end_turn()
    }
    fn interrupt(_: &mut (dyn SttStream + 'static)) {}
    fn probe(c: &Candidate<dyn SpeechToText>) -> Probe {
        stt_probe(c)
    }
    fn meaning(event: &SttEvent) -> Meaning {
        match event {
            SttEvent::Partial(_) => Meaning::Other,
            SttEvent::Final(_) => Meaning::Answered,
        }
    }
    fn lost(_: String) -> Option<SttEvent> {
        None
    }
}

struct S2sKind;

impl Supervised for S2sKind {
    type Component = dyn SpeechToSpeech;
    type Stream = dyn S2sStream;
    type Event = S2sEvent;
    const STAGE: Stage = Stage::S2s;
    fn open(
        c: &Candidate<dyn SpeechToSpeech>,
        tx: mpsc::Sender<S2sEvent>,
    ) -> Result<Box<dyn S2sStream>> {
        c.component.open(&c.options, tx)
    }
    fn push(stream: &mut (dyn S2sStream + 'static), frame: &AudioFrame) -> Result<()> {
        stream.push_audio(frame)
    }
    fn end_turn(stream: &mut (dyn S2sStream + 'static)) -> Result<()> {
        stream.end_turn()
    }
    fn interrupt(stream: &mut (dyn S2sStream + 'static)) {
        stream.interrupt();
    }
    fn probe(c: &Candidate<dyn SpeechToSpeech>) -> Probe {
        s2s_probe(c)
    }
    fn meaning(event: &S2sEvent) -> Meaning {
        match event {
            S2sEvent::AgentText(_) | S2sEvent::Audio(_) => Meaning::Began,
            S2sEvent::ReplyDone => Meaning::Answered,
            S2sEvent::Failed { code, message } => Meaning::Failed(format!("{code}: {message}")),
            _ => Meaning::Other,
        }
    }
    fn lost(message: String) -> Option<S2sEvent> {
        Some(S2sEvent::Failed {
            code: ErrorCode::PipelineError,
            message,
        })
    }
}

/// The task behind a wrapped speech-to-text or speech-to-speech stream.
struct Supervisor<K: Supervised> {
    list: Arc<[Candidate<K::Component>]>,
    settings: FailoverConfig,
    report: Arc<FailoverReport>,
    out: mpsc::Sender<K::Event>,
    active: usize,
    stream: Option<Box<K::Stream>>,
    rx: mpsc::Receiver<K::Event>,
    replay: Replay,
    /// The answer to the oldest pending turn has begun.
    began: bool,
    deadline: Option<Instant>,
    tried: Vec<bool>,
    failures: Vec<String>,
    served: Served,
}

impl<K: Supervised> Supervisor<K> {
    fn new(
        list: Arc<[Candidate<K::Component>]>,
        settings: FailoverConfig,
        report: Arc<FailoverReport>,
        out: mpsc::Sender<K::Event>,
    ) -> Self {
        let n = list.len();
        Supervisor {
            list,
            settings,
            report,
            out,
            active: 0,
            stream: None,
            rx: mpsc::channel(1).1,
            replay: Replay::default(),
            began: false,
            deadline: None,
            tried: vec![false; n],
            failures: Vec::new(),
            served: Served::new(K::STAGE, n),
        }
    }

    /// Notes that component `i` failed: marked down, not tried again this turn.
    fn note_failure(&mut self, i: usize, reason: SwitchReason, message: &str) {
        let c = &self.list[i];
        tracing::warn!(
            stage = label(K::STAGE),
            component = %c.name,
            %reason,
            "component failed the turn, trying the next: {message}"
        );
        c.health.mark_down(K::probe(c), self.settings);
        self.served.failed(i, reason);
        self.tried[i] = true;
        self.failures
            .push(format!("{} ({reason}: {message})", c.name));
    }

    /// Opens the first component not yet tried and replays the turns not
    /// yet answered into it. False when every one has been tried.
    fn open_next(&mut self) -> bool {
        for i in order(&self.list) {
            if self.tried[i] {
                continue;
            }
            let (tx, rx) = mpsc::channel(CHANNEL);
            let mut stream = match K::open(&self.list[i], tx) {
                Ok(s) => s,
                Err(e) => {
                    self.note_failure(i, SwitchReason::Error, &e.message);
                    continue;
                }
            };
            let replayed = self.replay.items.iter().try_for_each(|item| match item {
                Item::Frame(f) => K::push(&mut stream, f),
                Item::End => K::end_turn(&mut stream),
            });
            if let Err(e) = replayed {
                self.note_failure(i, SwitchReason::Error, &e.message);
                continue;
            }
            self.active = i;
            self.stream = Some(stream);
            self.rx = rx;
            self.began = false;
            if self.replay.pending > 0 {
                self.deadline = Some(Instant::now() + self.settings.timeout);
            }
            return true;
        }
        false
    }

    /// The active component failed: the next takes over, or, when every
    /// one failed, the oldest pending turn is given up.
    fn fail(&mut self, reason: SwitchReason, message: &str) {
        self.note_failure(self.active, reason, message);
        self.stream = None;
        self.deadline = None;
        if self.open_next() {
            return;
        }
        let message = stage_error(K::STAGE, "failed the turn", &self.failures)
            .message
            .clone();
        self.report.failed(message.clone());
        if let Some(lost) = K::lost(message) {
            let _ = self.out.try_send(lost);
        }
        if self.replay.pending > 0 {
            self.replay.answered();
        } else {
            self.replay = Replay::default();
        }
        self.tried.fill(false);
        self.failures.clear();
        if !self.open_next() {
            // Tried again at the next turn's end.
            self.tried.fill(false);
            self.failures.clear();
        }
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Audio(frame) => {
                // A new turn starts: one ahead of the active component in
                // the list that is up again takes it.
                if self.replay.pending == 0
                    && self.replay.items.is_empty()
                    && self.list[..self.active].iter().any(|c| c.health.is_up())
                {
                    let active = self.active;
                    self.stream = None;
                    self.tried.fill(false);
                    if !self.open_next() {
                        self.tried.fill(false);
                    }
                    if self.stream.is_none() {
                        self.active = active;
                    }
                }
                self.replay.frame(&frame);
                if let Some(stream) = self.stream.as_mut()
                    && let Err(e) = K::push(stream, &frame)
                {
                    self.fail(SwitchReason::Error, &e.message);
                }
            }
            Cmd::EndTurn => {
                self.replay.end();
                match self.stream.as_mut() {
                    Some(stream) => {
                        if self.deadline.is_none() {
                            self.deadline = Some(Instant::now() + self.settings.timeout);
                        }
                        if let Err(e) = K::end_turn(stream) {
                            self.fail(SwitchReason::Error, &e.message);
                        }
                    }
                    None => {
                        if !self.open_next() {
                            let message = stage_error(K::STAGE, "is unavailable", &self.failures)
                                .message
                                .clone();
                            self.report.failed(message);
                            self.replay = Replay::default();
                            self.tried.fill(false);
                            self.failures.clear();
                        }
                    }
                }
            }
            Cmd::Interrupt => {
                if let Some(stream) = self.stream.as_mut() {
                    K::interrupt(stream);
                }
                self.replay.all_answered();
                self.deadline = None;
                self.began = false;
            }
        }
    }

    async fn on_event(&mut self, event: Option<K::Event>) {
        let Some(event) = event else {
            self.fail(SwitchReason::Error, "its stream ended");
            return;
        };
        match K::meaning(&event) {
            Meaning::Failed(message) => {
                self.fail(SwitchReason::Error, &message);
                return;
            }
            Meaning::Other => {}
            Meaning::Began => {
                if self.replay.pending > 0 && !self.began {
                    self.began = true;
                    self.deadline = None;
                    self.served.by(self.active, &self.list, &self.report);
                    self.tried.fill(false);
                    self.failures.clear();
                }
            }
            Meaning::Answered => {
                if self.replay.pending > 0 {
                    if !self.began {
                        self.served.by(self.active, &self.list, &self.report);
                    }
                    self.replay.answered();
                    self.began = false;
                    self.tried.fill(false);
                    self.failures.clear();
                    self.deadline =
                        (self.replay.pending > 0).then(|| Instant::now() + self.settings.timeout);
                }
            }
        }
        let _ = self.out.send(event).await;
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        enum Woke<E> {
            Cmd(Option<Cmd>),
            Event(Option<E>),
            Timeout,
        }
        loop {
            let deadline = self.deadline;
            let listening = self.stream.is_some();
            let woke = tokio::select! {
                biased;
                cmd = cmds.recv() => Woke::Cmd(cmd),
                event = self.rx.recv(), if listening => Woke::Event(event),
                () = sleep_until(deadline), if deadline.is_some() => Woke::Timeout,
            };
            match woke {
                Woke::Cmd(None) => return,
                Woke::Cmd(Some(cmd)) => self.on_cmd(cmd),
                Woke::Event(event) => self.on_event(event).await,
                Woke::Timeout => {
                    let timeout = self.settings.timeout;
                    self.fail(
                        SwitchReason::Timeout,
                        &format!("no result within failover.timeout = {timeout:?}"),
                    );
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Opens the supervisor of `list` and spawns its task.
fn supervise<K: Supervised>(
    list: Arc<[Candidate<K::Component>]>,
    settings: FailoverConfig,
    report: Arc<FailoverReport>,
    out: mpsc::Sender<K::Event>,
) -> Result<mpsc::UnboundedSender<Cmd>> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
        BackendError::new(
            "pipeline.failover",
            ErrorCode::PipelineError,
            "a component with fallbacks is opened inside a tokio runtime",
        )
    })?;
    let mut sup = Supervisor::<K>::new(list, settings, report, out);
    if !sup.open_next() {
        return Err(stage_error(K::STAGE, "failed to open", &sup.failures));
    }
    sup.tried.fill(false);
    sup.failures.clear();
    let (tx, rx) = mpsc::unbounded_channel();
    runtime.spawn(sup.run(rx));
    Ok(tx)
}

fn gone() -> BackendError {
    BackendError::new(
        "pipeline.failover",
        ErrorCode::PipelineError,
        "the component's failover task ended",
    )
}

/// A session's speech-to-text stream over a fallback list.
struct FailoverSttStream(mpsc::UnboundedSender<Cmd>);

impl SttStream for FailoverSttStream {
    fn push_audio(&mut self, frame: &AudioFrame) -> Result<()> {
        self.0.send(Cmd::Audio(frame.clone())).map_err(|_| gone())
    }
    fn end_turn(&mut self) -> Result<()> {
        self.0.send(Cmd::EndTurn).map_err(|_| gone())
    }
}

/// A session's speech-to-speech stream over a fallback list.
struct FailoverS2sStream(mpsc::UnboundedSender<Cmd>);

impl S2sStream for FailoverS2sStream {
    fn push_audio(&mut self, frame: &AudioFrame) -> Result<()> {
        self.0.send(Cmd::Audio(frame.clone())).map_err(|_| gone())
    }
    fn end_turn(&mut self) -> Result<()> {
        self.0.send(Cmd::EndTurn).map_err(|_| gone())
    }
    fn interrupt(&mut self) {
        let _ = self.0.send(Cmd::Interrupt);
    }
}

/// Opens one session's speech-to-text over `list` (the primary first), its
/// events to `events`. Must be called inside a tokio runtime.
///
/// # Errors
///
/// `PipelineError` when no component of the list opens.
pub fn open_stt(
    list: Vec<Candidate<dyn SpeechToText>>,
    settings: FailoverConfig,
    report: Arc<FailoverReport>,
    events: mpsc::Sender<SttEvent>,
) -> Result<Box<dyn SttStream>> {
    let tx = supervise::<SttKind>(list.into(), settings, report, events)?;
    Ok(Box::new(FailoverSttStream(tx)))
}

/// Opens one session's speech-to-speech model over `list` (the primary
/// first), its events to `events`. Must be called inside a tokio runtime.
///
/// # Errors
///
/// `PipelineError` when no component of the list opens.
pub fn open_s2s(
    list: Vec<Candidate<dyn SpeechToSpeech>>,
    settings: FailoverConfig,
    report: Arc<FailoverReport>,
    events: mpsc::Sender<S2sEvent>,
) -> Result<Box<dyn S2sStream>> {
    let tx = supervise::<S2sKind>(list.into(), settings, report, events)?;
    Ok(Box::new(FailoverS2sStream(tx)))
}

// ---------------------------------------------------------------------------
// Text-to-speech

/// One session's text-to-speech over a fallback list (the primary first).
pub struct FailoverTts {
    list: Vec<Candidate<dyn TextToSpeech>>,
    settings: FailoverConfig,
    report: Arc<FailoverReport>,
    served: Mutex<Served>,
}

impl std::fmt::Debug for FailoverTts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailoverTts")
            .field("list", &self.list)
            .finish_non_exhaustive()
    }
}

impl FailoverTts {
    /// The wrapper over `list`, reporting to `report`.
    pub fn new(
        list: Vec<Candidate<dyn TextToSpeech>>,
        settings: FailoverConfig,
        report: Arc<FailoverReport>,
    ) -> Self {
        let n = list.len();
        FailoverTts {
            list,
            settings,
            report,
            served: Mutex::new(Served::new(Stage::Tts, n)),
        }
    }

    fn served(&self) -> std::sync::MutexGuard<'_, Served> {
        self.served.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs one synthesis, passing its audio on: an error, or no audio for
/// `timeout`, fails it.
async fn synthesize_one(
    c: &Candidate<dyn TextToSpeech>,
    text: &str,
    format: AudioFormat,
    out: &mpsc::Sender<AudioFrame>,
    timeout: Duration,
) -> std::result::Result<(), (SwitchReason, String)> {
    let (tx, mut rx) = mpsc::channel(16);
    let synth = c.component.synthesize(text, format, &tx);
    tokio::pin!(synth);
    let mut deadline = Instant::now() + timeout;
    loop {
        tokio::select! {
            biased;
            Some(frame) = rx.recv() => {
                if out.send(frame).await.is_err() {
                    // The reply is no longer wanted.
                    return Ok(());
                }
                deadline = Instant::now() + timeout;
            }
            r = &mut synth => {
                while let Ok(frame) = rx.try_recv() {
                    if out.send(frame).await.is_err() {
                        return Ok(());
                    }
                }
                return r.map_err(|e| (SwitchReason::Error, e.message.clone()));
            }
            () = tokio::time::sleep_until(deadline) => {
                return Err((
                    SwitchReason::Timeout,
                    format!("no audio within failover.timeout = {timeout:?}"),
                ));
            }
        }
    }
}

#[async_trait]
impl TextToSpeech for FailoverTts {
    async fn synthesize(
        &self,
        text: &str,
        format: AudioFormat,
        out: &mpsc::Sender<AudioFrame>,
    ) -> Result<()> {
        let mut failures = Vec::new();
        for i in order(&self.list) {
            let c = &self.list[i];
            match synthesize_one(c, text, format, out, self.settings.timeout).await {
                Ok(()) => {
                    self.served().by(i, &self.list, &self.report);
                    return Ok(());
                }
                Err((reason, message)) => {
                    tracing::warn!(
                        stage = "tts",
                        component = %c.name,
                        %reason,
                        "component failed the reply, synthesizing it again with the next: {message}"
                    );
                    c.health.mark_down(tts_probe(c), self.settings);
                    self.served().failed(i, reason);
                    failures.push(format!("{} ({reason}: {message})", c.name));
                }
            }
        }
        Err(stage_error(Stage::Tts, "failed the reply", &failures))
    }

    async fn health(&self, options: &serde_json::Value) -> Result<()> {
        let _ = options;
        if self.list.iter().any(|c| c.health.is_up()) {
            Ok(())
        } else {
            Err(stage_error(Stage::Tts, "is down", &[]))
        }
    }
}
