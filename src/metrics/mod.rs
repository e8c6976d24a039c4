//! Metrics of the shared runtime: one [`Metrics`] per backend, shared as
//! `Arc<Metrics>`, recorded with plain atomics and read as a
//! [`MetricsSnapshot`], as Prometheus text, or (with the `otel` feature) through
//! OpenTelemetry instruments.
//!
//! # Metric families
//!
//! Every family carries the `provider` label, the name given to
//! [`Metrics::new`].
//!
//! | name | type | labels |
//! |---|---|---|
//! | `backend_requests_total` | counter | `operation` |
//! | `backend_errors_total` | counter | `operation`, `code` |
//! | `backend_latency_seconds` | histogram | `operation` |
//! | `backend_sessions_active` | gauge | |
//! | `backend_sessions_total` | counter | |
//! | `backend_throughput_bytes` | counter | `direction` (`in`, `out`) |
//! | `pipeline_turn_latency_seconds` | histogram | `stage` (`endpointing`, `first_audio`, `stt`, `agent`, `tts`) |
//! | `pipeline_frames_dropped_total` | counter | `reason` |
//! | `pipeline_interruptions_total` | counter | |
//! | `pipeline_false_interruptions_total` | counter | |
//! | `pipeline_preemptive_replies_total` | counter | `outcome` (`used`, `dropped`) |
//! | `pipeline_turns_total` | counter | |
//! | `pipeline_component_switches_total` | counter | `stage`, `from`, `to`, `reason` |
//! | `pipeline_component_served_total` | counter | `stage`, `component` |
//!
//! The two `pipeline_component_*` families count the stages that have a
//! fallback list (`stt_fallbacks`, `tts_fallbacks`, `s2s_fallbacks`):
//! `stage` is `stt`, `tts` or `s2s`, the components are the names the config
//! gives, and `reason` is `error`, `timeout`, `down` or `recovered` (see
//! [`SwitchReason`](crate::session::events::SwitchReason)). `served` counts
//! the turns each component answered (for `tts`, each piece of a reply it
//! synthesized). A provider's connection with fallback endpoints
//! (`fallback_urls`) is counted too, as `stage` `provider`, its components
//! being the endpoints' `host:port` (the link kit's `Endpoints`). Their series are made when first counted, under a lock
//! (once per turn, never per frame); the other families are pre-allocated.
//!
//! `operation` is an [`Op`], `code` an [`ErrorCode`], `stage` a [`LatencyStage`]
//! and `reason` a [`DropReason`], each written with its `as_str` name. Both
//! histograms use the fixed bucket bounds of [`LATENCY_BUCKETS`]
//! (0.1 ms to 10 s).
//!
//! `process_audio` runs once per audio frame (50 times a second per session),
//! so the runtime counts every call and error but times only one call in
//! [`PROCESS_AUDIO_LATENCY_SAMPLE`] of each session (the first, then every
//! 64th): `backend_latency_seconds{operation="process_audio"}` has about
//! 1/64 of `backend_requests_total{operation="process_audio"}` observations,
//! and its quantiles and mean are those of the sample.
//!
//! # Cost
//!
//! Every label set is small and fixed, so every series is pre-allocated when
//! the [`Metrics`] is built: recording is one or two relaxed atomic additions,
//! with no lock, no map lookup and no allocation. Once
//! `Metrics::register_otel` (feature `otel`) has run, a latency is also recorded into an
//! OpenTelemetry histogram (see there).
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use voice_backends::metrics::{Metrics, Op};
//! use voice_backends::{BackendError, ErrorCode};
//!
//! let metrics = Arc::new(Metrics::new("local"));
//!
//! // One line per operation: request count, latency and error code.
//! let timer = metrics.observe(Op::CreateSession);
//! let result: voice_backends::Result<()> =
//!     Err(BackendError::new("backend.create_session", ErrorCode::SessionLimitExceeded, "full"));
//! timer.finish(&result);
//!
//! let snapshot = metrics.snapshot();
//! assert_eq!(snapshot.requests[&Op::CreateSession], 1);
//! assert_eq!(snapshot.errors[&(Op::CreateSession, ErrorCode::SessionLimitExceeded)], 1);
//!
//! let mut text = String::new();
//! metrics.render_prometheus(&mut text);
//! assert!(text.contains(
//!     r#"backend_requests_total{provider="local",operation="create_session"} 1"#
//! ));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{BackendError, ErrorCode};

/// A backend operation, the `operation` label of the `backend_*` metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Op {
    /// `VoiceBackend::start`.
    Start,
    /// `VoiceBackend::stop`.
    Stop,
    /// `VoiceBackend::create_session`.
    CreateSession,
    /// `VoiceBackend::get_session`.
    GetSession,
    /// `VoiceBackend::close_session`.
    CloseSession,
    /// `VoiceSession::process_audio`. Its latency is sampled; see
    /// [`PROCESS_AUDIO_LATENCY_SAMPLE`].
    ProcessAudio,
    /// `VoiceSession::send_audio`.
    SendAudio,
    /// Sending text into a session.
    SendText,
    /// `VoiceBackend::health_check`.
    HealthCheck,
    /// `VoiceBackend::update_config`.
    UpdateConfig,
    /// A conversational turn, counted as a request when it ends (as
    /// `pipeline_turns_total` counts it); its errors are those of its
    /// answer: the agent's error or timeout, a speech service that failed,
    /// a transcript that never came, a remote link lost. Its stages' times
    /// are in `pipeline_turn_latency_seconds`, not here.
    Turn,
}

impl Op {
    /// Every operation, in declaration order.
    pub const ALL: [Op; 11] = [
        Op::Start,
        Op::Stop,
        Op::CreateSession,
        Op::GetSession,
        Op::CloseSession,
        Op::ProcessAudio,
        Op::SendAudio,
        Op::SendText,
        Op::HealthCheck,
        Op::UpdateConfig,
        Op::Turn,
    ];

    /// The snake_case label value, e.g. `"create_session"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Stop => "stop",
            Op::CreateSession => "create_session",
            Op::GetSession => "get_session",
            Op::CloseSession => "close_session",
            Op::ProcessAudio => "process_audio",
            Op::SendAudio => "send_audio",
            Op::SendText => "send_text",
            Op::HealthCheck => "health_check",
            Op::UpdateConfig => "update_config",
            Op::Turn => "turn",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stage of a conversational turn, the `stage` label of
/// `pipeline_turn_latency_seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum LatencyStage {
    /// From the end-of-turn decision to the first audio of the reply sent to
    /// the user. The user waits `endpointing` more: from the end of their
    /// speech, the wait is `endpointing` plus this.
    FirstAudio,
    /// Speech-to-text: from the end-of-turn decision to the final transcript.
    Stt,
    /// The application's agent: from the transcript to its reply.
    Agent,
    /// Text-to-speech: from the reply text to its first audio.
    Tts,
    /// The silence waited before the turn was judged over (on the audio
    /// clock), counted from the end of the user's speech.
    Endpointing,
}

impl LatencyStage {
    /// Every stage, in declaration order.
    pub const ALL: [LatencyStage; 5] = [
        LatencyStage::FirstAudio,
        LatencyStage::Stt,
        LatencyStage::Agent,
        LatencyStage::Tts,
        LatencyStage::Endpointing,
    ];

    /// The snake_case label value, e.g. `"first_audio"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            LatencyStage::FirstAudio => "first_audio",
            LatencyStage::Stt => "stt",
            LatencyStage::Agent => "agent",
            LatencyStage::Endpointing => "endpointing",
            LatencyStage::Tts => "tts",
        }
    }
}

impl fmt::Display for LatencyStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What became of a preemptive reply, the `outcome` label of
/// `pipeline_preemptive_replies_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PreemptiveOutcome {
    /// The final transcript matched the partial: the reply was played.
    Used = 0,
    /// The final transcript differed (or the turn was cut or given up on):
    /// the reply was dropped unheard.
    Dropped = 1,
}

impl PreemptiveOutcome {
    /// The label value: `used` or `dropped`.
    pub const fn as_str(self) -> &'static str {
        match self {
            PreemptiveOutcome::Used => "used",
            PreemptiveOutcome::Dropped => "dropped",
        }
    }
}

/// Why the pipeline dropped frames, the `reason` label of
/// `pipeline_frames_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DropReason {
    /// The session's output audio queue was full.
    OutputOverflow,
    /// The session's event queue was full: a subscriber fell behind and
    /// missed events. Counted per subscriber, so an event two lagging
    /// subscribers both missed counts twice.
    EventOverflow,
    /// The session's input audio queue was full.
    InputOverflow,
    /// The input audio was malformed (wrong format, odd length, ...).
    InvalidAudio,
    /// Reply audio made while nobody held the session's audio stream (a
    /// server's client between a dropped connection and its resume), or
    /// after the stream closed.
    Unheard,
}

impl DropReason {
    /// Every reason, in declaration order.
    pub const ALL: [DropReason; 5] = [
        DropReason::OutputOverflow,
        DropReason::EventOverflow,
        DropReason::InputOverflow,
        DropReason::InvalidAudio,
        DropReason::Unheard,
    ];

    /// The snake_case label value, e.g. `"output_overflow"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::OutputOverflow => "output_overflow",
            DropReason::EventOverflow => "event_overflow",
            DropReason::InputOverflow => "input_overflow",
            DropReason::InvalidAudio => "invalid_audio",
            DropReason::Unheard => "unheard",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const OPS: usize = Op::ALL.len();
const CODES: usize = ErrorCode::ALL.len();
const STAGES: usize = LatencyStage::ALL.len();
const REASONS: usize = DropReason::ALL.len();

// Series are indexed by `value as usize`: check that every `ALL` lists its
// enum in declaration order.
const _: () = {
    let mut i = 0;
    while i < OPS {
        assert!(Op::ALL[i] as usize == i);
        i += 1;
    }
    let mut i = 0;
    while i < CODES {
        assert!(ErrorCode::ALL[i] as usize == i);
        i += 1;
    }
    let mut i = 0;
    while i < STAGES {
        assert!(LatencyStage::ALL[i] as usize == i);
        i += 1;
    }
    let mut i = 0;
    while i < REASONS {
        assert!(DropReason::ALL[i] as usize == i);
        i += 1;
    }
};

/// The runtime times one [`Op::ProcessAudio`] call in this many, per session
/// (every call is counted): reading the clock twice and recording a histogram
/// on every 20 ms frame would be a tenth of the frame's cost.
pub const PROCESS_AUDIO_LATENCY_SAMPLE: u64 = 64;

/// Upper bounds, in seconds, of the buckets of both latency histograms
/// (`backend_latency_seconds` and `pipeline_turn_latency_seconds`): a 1-2.5-5
/// progression from 0.1 ms to 10 s. Slower observations fall in the implicit
/// `+Inf` bucket only.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// [`LATENCY_BUCKETS`] in nanoseconds, for exact integer comparisons.
const BUCKET_NANOS: [u64; 16] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

const _: () = {
    let mut i = 0;
    while i < BUCKET_NANOS.len() {
        assert!(BUCKET_NANOS[i] as f64 / 1e9 == LATENCY_BUCKETS[i]);
        i += 1;
    }
};

/// The longest single observation added to a histogram's sum: one day. The sum
/// is kept in nanoseconds in a `u64`, and this keeps it from wrapping.
const MAX_OBSERVATION_NANOS: u64 = 86_400 * 1_000_000_000;

/// A latency histogram: one counter per bucket (not cumulative; the last one
/// is the overflow above 10 s) and the sum in nanoseconds. The count is the
/// total of the buckets, so `_count` always equals the `+Inf` bucket.
struct AtomicHistogram {
    buckets: [AtomicU64; BUCKET_NANOS.len() + 1],
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    fn new() -> Self {
        AtomicHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn record(&self, value: Duration) {
        let nanos = u64::try_from(value.as_nanos())
            .unwrap_or(u64::MAX)
            .min(MAX_OBSERVATION_NANOS);
        // The first bucket whose upper bound is >= the value (`le` is inclusive).
        let index = BUCKET_NANOS.partition_point(|&bound| bound < nanos);
        self.buckets[index].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    fn sum_seconds(&self) -> f64 {
        nanos_to_seconds(self.sum_nanos.load(Relaxed))
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(&bound, count)| {
                cumulative += count.load(Relaxed);
                (bound, cumulative)
            })
            .collect();
        let count = cumulative + self.buckets[BUCKET_NANOS.len()].load(Relaxed);
        HistogramSnapshot {
            buckets,
            count,
            sum: self.sum_seconds(),
        }
    }
}

fn nanos_to_seconds(nanos: u64) -> f64 {
    nanos as f64 / 1e9
}

fn counters<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

/// The metrics of one backend, keyed by its provider name.
///
/// Built once per backend and shared as `Arc<Metrics>`; every recording method
/// takes `&self` and is a relaxed atomic update, so any number of tasks and
/// threads record concurrently without locks.
pub struct Metrics {
    provider: Arc<str>,
    requests: [AtomicU64; OPS],
    errors: [[AtomicU64; CODES]; OPS],
    latency: [AtomicHistogram; OPS],
    sessions_active: AtomicI64,
    sessions_total: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    turn_latency: [AtomicHistogram; STAGES],
    dropped: [AtomicU64; REASONS],
    interruptions: AtomicU64,
    false_interruptions: AtomicU64,
    /// Preemptive replies used and dropped, in [`PreemptiveOutcome`] order.
    preemptive: [AtomicU64; 2],
    turns: AtomicU64,
    /// The `pipeline_component_*` series, made when first counted.
    components: std::sync::Mutex<ComponentCounts>,
    /// The OpenTelemetry histograms latencies are also recorded into, one
    /// set per [`Metrics::register_otel`] call; empty until then.
    #[cfg(feature = "otel")]
    otel: arc_swap::ArcSwap<Vec<Arc<otel::Histograms>>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Zeroed metrics for the backend of `provider`, the value of every
    /// series' `provider` label.
    pub fn new(provider: &str) -> Self {
        Metrics {
            provider: Arc::from(provider),
            requests: counters(),
            errors: std::array::from_fn(|_| counters()),
            latency: std::array::from_fn(|_| AtomicHistogram::new()),
            sessions_active: AtomicI64::new(0),
            sessions_total: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            turn_latency: std::array::from_fn(|_| AtomicHistogram::new()),
            dropped: counters(),
            interruptions: AtomicU64::new(0),
            false_interruptions: AtomicU64::new(0),
            preemptive: [AtomicU64::new(0), AtomicU64::new(0)],
            turns: AtomicU64::new(0),
            components: std::sync::Mutex::default(),
            #[cfg(feature = "otel")]
            otel: arc_swap::ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// The provider name given to [`Metrics::new`].
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// Counts one request of `op` (`backend_requests_total`).
    pub fn request(&self, op: Op) {
        self.requests[op as usize].fetch_add(1, Relaxed);
    }

    /// Counts one failure of `op` with `code` (`backend_errors_total`).
    pub fn error(&self, op: Op, code: ErrorCode) {
        self.errors[op as usize][code as usize].fetch_add(1, Relaxed);
    }

    /// Records how long one `op` took (`backend_latency_seconds`).
    ///
    /// Observations longer than a day add one day to the histogram's sum.
    pub fn latency(&self, op: Op, elapsed: Duration) {
        self.latency[op as usize].record(elapsed);
        #[cfg(feature = "otel")]
        self.otel_latency(op, elapsed);
    }

    /// Starts timing one `op`; [`OpTimer::finish`] then records the request,
    /// its latency and, on error, the error code.
    pub fn observe(&self, op: Op) -> OpTimer<'_> {
        OpTimer {
            metrics: self,
            op,
            start: Instant::now(),
            finished: false,
        }
    }

    /// A session opened: raises `backend_sessions_active` and counts it in
    /// `backend_sessions_total`.
    pub fn session_opened(&self) {
        self.sessions_active.fetch_add(1, Relaxed);
        self.sessions_total.fetch_add(1, Relaxed);
    }

    /// A session closed: lowers `backend_sessions_active`. Call it exactly once
    /// per [`Metrics::session_opened`]; the gauge is not clamped at zero, so a
    /// double close shows as a negative value.
    pub fn session_closed(&self) {
        self.sessions_active.fetch_sub(1, Relaxed);
    }

    /// Counts `n` bytes received from the user or the provider's service
    /// (`backend_throughput_bytes{direction="in"}`).
    pub fn bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Relaxed);
    }

    /// Counts `n` bytes sent to the user or the provider's service
    /// (`backend_throughput_bytes{direction="out"}`).
    pub fn bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Relaxed);
    }

    /// Records how long one stage of a turn took
    /// (`pipeline_turn_latency_seconds`).
    ///
    /// Observations longer than a day add one day to the histogram's sum.
    pub fn turn_latency(&self, stage: LatencyStage, elapsed: Duration) {
        self.turn_latency[stage as usize].record(elapsed);
        #[cfg(feature = "otel")]
        self.otel_turn_latency(stage, elapsed);
    }

    /// Counts `n` frames dropped for `reason` (`pipeline_frames_dropped_total`).
    pub fn dropped(&self, reason: DropReason, n: u64) {
        self.dropped[reason as usize].fetch_add(n, Relaxed);
    }

    /// Counts one reply interrupted by the user (`pipeline_interruptions_total`).
    pub fn interrupted(&self) {
        self.interruptions.fetch_add(1, Relaxed);
    }

    /// Counts one switch of `stage` (`stt`, `tts`, `s2s`, `provider`) from component
    /// `from` to `to`, for `reason` (`pipeline_component_switches_total`).
    pub fn component_switched(&self, stage: &str, from: &str, to: &str, reason: &str) {
        let mut c = self.components();
        let key = (stage.into(), from.into(), to.into(), reason.into());
        *c.switches.entry(key).or_default() += 1;
    }

    /// Counts one turn of `stage` served by `component`
    /// (`pipeline_component_served_total`).
    pub fn component_served(&self, stage: &str, component: &str) {
        let mut c = self.components();
        *c.served
            .entry((stage.into(), component.into()))
            .or_default() += 1;
    }

    fn components(&self) -> std::sync::MutexGuard<'_, ComponentCounts> {
        self.components
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one interruption found false: the speech that stopped a reply
    /// said no words, or only backchannels (`pipeline_false_interruptions_total`).
    pub fn false_interruption(&self) {
        self.false_interruptions.fetch_add(1, Relaxed);
    }

    /// Counts one preemptive reply, used or dropped
    /// (`pipeline_preemptive_replies_total{outcome}`).
    pub fn preemptive_reply(&self, outcome: PreemptiveOutcome) {
        self.preemptive[outcome as usize].fetch_add(1, Relaxed);
    }

    /// Counts one finished user turn (`pipeline_turns_total`).
    pub fn turn(&self) {
        self.turns.fetch_add(1, Relaxed);
        self.request(Op::Turn);
    }

    /// The current values, as plain data.
    ///
    /// Each value is read atomically, but the snapshot as a whole is not: a
    /// recording that races with it may show in one series and not yet in a
    /// related one (a request counted, its latency not yet). Histograms are
    /// always self-consistent in `count` and `buckets`.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let load = |c: &AtomicU64| c.load(Relaxed);
        // Locked once: a second lock in the same expression would wait on
        // the first forever.
        let components = self.components();
        MetricsSnapshot {
            provider: self.provider.to_string(),
            requests: Op::ALL
                .iter()
                .map(|&op| (op, load(&self.requests[op as usize])))
                .collect(),
            errors: Op::ALL
                .iter()
                .flat_map(|&op| {
                    ErrorCode::ALL.iter().map(move |&code| {
                        ((op, code), load(&self.errors[op as usize][code as usize]))
                    })
                })
                .collect(),
            latency: Op::ALL
                .iter()
                .map(|&op| (op, self.latency[op as usize].snapshot()))
                .collect(),
            sessions_active: self.sessions_active.load(Relaxed),
            sessions_total: load(&self.sessions_total),
            bytes_in: load(&self.bytes_in),
            bytes_out: load(&self.bytes_out),
            turn_latency: LatencyStage::ALL
                .iter()
                .map(|&stage| (stage, self.turn_latency[stage as usize].snapshot()))
                .collect(),
            dropped: DropReason::ALL
                .iter()
                .map(|&reason| (reason, load(&self.dropped[reason as usize])))
                .collect(),
            interruptions: load(&self.interruptions),
            false_interruptions: load(&self.false_interruptions),
            preemptive_used: load(&self.preemptive[PreemptiveOutcome::Used as usize]),
            preemptive_dropped: load(&self.preemptive[PreemptiveOutcome::Dropped as usize]),
            turns: load(&self.turns),
            component_switches: components.switches.clone(),
            component_served: components.served.clone(),
        }
    }

    /// Appends every metric family in the Prometheus text exposition format
    /// (version 0.0.4) to `out`.
    ///
    /// Each family gets its `# HELP` and `# TYPE` lines, even with no samples.
    /// Series without an operation, stage or error-code label (sessions,
    /// throughput, drops, interruptions, turns) are always written, zero
    /// included; series keyed by operation, error code or stage are written
    /// once they have a value, so an idle backend's output stays short.
    /// For several backends in one response use [`render_prometheus_all`],
    /// which writes each family's header once.
    pub fn render_prometheus(&self, out: &mut String) {
        write_exposition(&[self.snapshot()], out);
    }
}

/// The Prometheus text exposition of several backends' metrics, each family's
/// `# HELP` and `# TYPE` lines written once, followed by the samples of every
/// backend in the order given.
///
/// Give each provider once: two [`Metrics`] with the same provider name would
/// write duplicate series.
pub fn render_prometheus_all(metrics: &[&Metrics]) -> String {
    let snapshots: Vec<MetricsSnapshot> = metrics.iter().map(|m| m.snapshot()).collect();
    let mut out = String::new();
    write_exposition(&snapshots, &mut out);
    out
}

/// Times one backend operation; made by [`Metrics::observe`].
///
/// [`OpTimer::finish`] records the request, its latency and, on error, the
/// error's code. If the timer is dropped without being finished (the
/// operation's future was cancelled, or the code between `observe` and
/// `finish` panicked), the drop records the request and its latency with the
/// code [`ErrorCode::ContextCanceled`].
///
/// ```
/// # use voice_backends::metrics::{Metrics, Op};
/// # async fn start(_: &Metrics) -> voice_backends::Result<()> { Ok(()) }
/// # async fn demo(metrics: &Metrics) -> voice_backends::Result<()> {
/// let timer = metrics.observe(Op::Start);
/// let result = start(metrics).await;
/// timer.finish(&result);
/// result
/// # }
/// ```
#[must_use = "an OpTimer records the operation as cancelled unless `finish` is called"]
#[derive(Debug)]
pub struct OpTimer<'a> {
    metrics: &'a Metrics,
    op: Op,
    start: Instant,
    finished: bool,
}

impl OpTimer<'_> {
    /// The operation being timed.
    pub fn op(&self) -> Op {
        self.op
    }

    /// Records the operation's outcome: one request, its latency since
    /// [`Metrics::observe`], and the error's code if `result` is an error.
    pub fn finish<T>(self, result: &Result<T, BackendError>) {
        self.finish_with(result.as_ref().err().map(|e| e.code));
    }

    /// Like [`OpTimer::finish`] for outcomes that are not a
    /// `Result<_, BackendError>`: `None` for success, `Some(code)` for failure.
    pub fn finish_with(mut self, code: Option<ErrorCode>) {
        self.record(code);
    }

    fn record(&mut self, code: Option<ErrorCode>) {
        self.finished = true;
        let m = self.metrics;
        m.request(self.op);
        m.latency(self.op, self.start.elapsed());
        if let Some(code) = code {
            m.error(self.op, code);
        }
    }
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.record(Some(ErrorCode::ContextCanceled));
        }
    }
}

/// The values of one backend's metrics at one moment; see [`Metrics::snapshot`].
///
/// Every map holds every key (zero included), so indexing never panics:
/// `snapshot.requests[&Op::Start]`.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsSnapshot {
    /// The provider name, the `provider` label.
    pub provider: String,
    /// `backend_requests_total`, by operation.
    pub requests: BTreeMap<Op, u64>,
    /// `backend_errors_total`, by operation and error code.
    pub errors: BTreeMap<(Op, ErrorCode), u64>,
    /// `backend_latency_seconds`, by operation.
    pub latency: BTreeMap<Op, HistogramSnapshot>,
    /// `backend_sessions_active`.
    pub sessions_active: i64,
    /// `backend_sessions_total`.
    pub sessions_total: u64,
    /// `backend_throughput_bytes{direction="in"}`.
    pub bytes_in: u64,
    /// `backend_throughput_bytes{direction="out"}`.
    pub bytes_out: u64,
    /// `pipeline_turn_latency_seconds`, by stage.
    pub turn_latency: BTreeMap<LatencyStage, HistogramSnapshot>,
    /// `pipeline_frames_dropped_total`, by reason.
    pub dropped: BTreeMap<DropReason, u64>,
    /// `pipeline_interruptions_total`.
    pub interruptions: u64,
    /// `pipeline_false_interruptions_total`.
    pub false_interruptions: u64,
    /// `pipeline_preemptive_replies_total{outcome="used"}`.
    pub preemptive_used: u64,
    /// `pipeline_preemptive_replies_total{outcome="dropped"}`.
    pub preemptive_dropped: u64,
    /// `pipeline_turns_total`.
    pub turns: u64,
    /// `pipeline_component_switches_total`, by `(stage, from, to, reason)`:
    /// only the series counted so far.
    pub component_switches: BTreeMap<(String, String, String, String), u64>,
    /// `pipeline_component_served_total`, by `(stage, component)`: only the
    /// series counted so far.
    pub component_served: BTreeMap<(String, String), u64>,
}

/// The `pipeline_component_*` counters of one backend.
#[derive(Debug, Default)]
struct ComponentCounts {
    switches: BTreeMap<(String, String, String, String), u64>,
    served: BTreeMap<(String, String), u64>,
}

impl MetricsSnapshot {
    /// The errors of every operation and code, added up.
    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The values of one latency histogram.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations <= that bound)` for each bound
    /// of [`LATENCY_BUCKETS`], ascending and cumulative. The `+Inf` bucket is
    /// [`HistogramSnapshot::count`].
    pub buckets: Vec<(f64, u64)>,
    /// How many observations were made.
    pub count: u64,
    /// The sum of the observations, in seconds.
    pub sum: f64,
}

mod families;
#[cfg(feature = "otel")]
mod otel;
mod prometheus;

use prometheus::write_exposition;
