//! The metric families' names and help texts, shared by the Prometheus
//! exposition and the OpenTelemetry instruments.

pub(super) const REQUESTS: (&str, &str) = (
    "backend_requests_total",
    "Backend operations started, by operation.",
);
pub(super) const ERRORS: (&str, &str) = (
    "backend_errors_total",
    "Backend operations failed, by operation and error code.",
);
pub(super) const LATENCY: (&str, &str) = (
    "backend_latency_seconds",
    "Duration of backend operations, in seconds.",
);
pub(super) const SESSIONS_ACTIVE: (&str, &str) =
    ("backend_sessions_active", "Sessions currently open.");
pub(super) const SESSIONS_TOTAL: (&str, &str) = ("backend_sessions_total", "Sessions opened.");
pub(super) const THROUGHPUT: (&str, &str) = (
    "backend_throughput_bytes",
    "Audio and data bytes received (in) and sent (out).",
);
pub(super) const TURN_LATENCY: (&str, &str) = (
    "pipeline_turn_latency_seconds",
    "Duration of the stages of a conversational turn, in seconds; endpointing is the silence waited before the turn was judged over, and first_audio runs from that decision to the first reply audio.",
);
pub(super) const DROPPED: (&str, &str) = (
    "pipeline_frames_dropped_total",
    "Frames dropped by the pipeline, by reason.",
);
pub(super) const INTERRUPTIONS: (&str, &str) = (
    "pipeline_interruptions_total",
    "Replies interrupted by the user.",
);
pub(super) const FALSE_INTERRUPTIONS: (&str, &str) = (
    "pipeline_false_interruptions_total",
    "Interruptions found false (no words, or only backchannels): the reply resumed, or stayed cut when resuming is off.",
);
pub(super) const PREEMPTIVE: (&str, &str) = (
    "pipeline_preemptive_replies_total",
    "Replies started on a stable partial transcript, by outcome: used (the final transcript matched) or dropped.",
);
pub(super) const TURNS: (&str, &str) = ("pipeline_turns_total", "Finished user turns.");
pub(super) const COMPONENT_SWITCHES: (&str, &str) = (
    "pipeline_component_switches_total",
    "Stages switched to another component of their fallback list, by stage, components and reason.",
);
pub(super) const COMPONENT_SERVED: (&str, &str) = (
    "pipeline_component_served_total",
    "Turns served by each component of a stage with a fallback list.",
);
