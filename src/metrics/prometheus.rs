//! The Prometheus text exposition of [`MetricsSnapshot`]s.

use std::fmt::{self, Write as _};

use super::families::*;
use super::{HistogramSnapshot, MetricsSnapshot, PreemptiveOutcome};

pub(super) fn write_exposition(snapshots: &[MetricsSnapshot], out: &mut String) {
    header(out, REQUESTS, "counter");
    for s in snapshots {
        for (op, &value) in &s.requests {
            if value > 0 {
                let labels = [("provider", &*s.provider), ("operation", op.as_str())];
                sample(out, REQUESTS.0, "", &labels, value);
            }
        }
    }

    header(out, ERRORS, "counter");
    for s in snapshots {
        for (&(op, code), &value) in &s.errors {
            if value > 0 {
                let labels = [
                    ("provider", &*s.provider),
                    ("operation", op.as_str()),
                    ("code", code.as_str()),
                ];
                sample(out, ERRORS.0, "", &labels, value);
            }
        }
    }

    header(out, LATENCY, "histogram");
    for s in snapshots {
        for (op, h) in &s.latency {
            if h.count > 0 {
                let labels = [("provider", &*s.provider), ("operation", op.as_str())];
                histogram(out, LATENCY.0, &labels, h);
            }
        }
    }

    header(out, SESSIONS_ACTIVE, "gauge");
    for s in snapshots {
        let labels = [("provider", &*s.provider)];
        sample(out, SESSIONS_ACTIVE.0, "", &labels, s.sessions_active);
    }

    header(out, SESSIONS_TOTAL, "counter");
    for s in snapshots {
        let labels = [("provider", &*s.provider)];
        sample(out, SESSIONS_TOTAL.0, "", &labels, s.sessions_total);
    }

    header(out, THROUGHPUT, "counter");
    for s in snapshots {
        for (direction, value) in [("in", s.bytes_in), ("out", s.bytes_out)] {
            let labels = [("provider", &*s.provider), ("direction", direction)];
            sample(out, THROUGHPUT.0, "", &labels, value);
        }
    }

    header(out, TURN_LATENCY, "histogram");
    for s in snapshots {
        for (stage, h) in &s.turn_latency {
            if h.count > 0 {
                let labels = [("provider", &*s.provider), ("stage", stage.as_str())];
                histogram(out, TURN_LATENCY.0, &labels, h);
            }
        }
    }

    header(out, DROPPED, "counter");
    for s in snapshots {
        for (reason, &value) in &s.dropped {
            let labels = [("provider", &*s.provider), ("reason", reason.as_str())];
            sample(out, DROPPED.0, "", &labels, value);
        }
    }

    header(out, INTERRUPTIONS, "counter");
    for s in snapshots {
        let labels = [("provider", &*s.provider)];
        sample(out, INTERRUPTIONS.0, "", &labels, s.interruptions);
    }

    header(out, FALSE_INTERRUPTIONS, "counter");
    for s in snapshots {
        let labels = [("provider", &*s.provider)];
        sample(
            out,
            FALSE_INTERRUPTIONS.0,
            "",
            &labels,
            s.false_interruptions,
        );
    }

    header(out, PREEMPTIVE, "counter");
    for s in snapshots {
        for (outcome, value) in [
            (PreemptiveOutcome::Used, s.preemptive_used),
            (PreemptiveOutcome::Dropped, s.preemptive_dropped),
        ] {
            let labels = [("provider", &*s.provider), ("outcome", outcome.as_str())];
            sample(out, PREEMPTIVE.0, "", &labels, value);
        }
    }

    header(out, TURNS, "counter");
    for s in snapshots {
        let labels = [("provider", &*s.provider)];
        sample(out, TURNS.0, "", &labels, s.turns);
    }

    header(out, COMPONENT_SWITCHES, "counter");
    for s in snapshots {
        for ((stage, from, to, reason), &value) in &s.component_switches {
            let labels = [
                ("provider", &*s.provider),
                ("stage", stage.as_str()),
                ("from", from.as_str()),
                ("to", to.as_str()),
                ("reason", reason.as_str()),
            ];
            sample(out, COMPONENT_SWITCHES.0, "", &labels, value);
        }
    }

    header(out, COMPONENT_SERVED, "counter");
    for s in snapshots {
        for ((stage, component), &value) in &s.component_served {
            let labels = [
                ("provider", &*s.provider),
                ("stage", stage.as_str()),
                ("component", component.as_str()),
            ];
            sample(out, COMPONENT_SERVED.0, "", &labels, value);
        }
    }
}

/// `# HELP` and `# TYPE` lines. The help texts are constants without `\` or
/// newlines, so they need no escaping.
fn header(out: &mut String, (name, help): (&str, &str), kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One sample line: `name{labels} value`.
fn sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[(&str, &str)],
    value: impl fmt::Display,
) {
    sample_le(out, name, suffix, labels, None, value);
}

/// One sample line, with an `le` label last if given.
fn sample_le(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[(&str, &str)],
    le: Option<&dyn fmt::Display>,
    value: impl fmt::Display,
) {
    out.push_str(name);
    out.push_str(suffix);
    out.push('{');
    for (i, (key, value)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(key);
        out.push_str("=\"");
        escape_label_value(out, value);
        out.push('"');
    }
    if let Some(le) = le {
        // Bounds are numbers or `+Inf`: nothing to escape.
        let _ = write!(out, ",le=\"{le}\"");
    }
    let _ = writeln!(out, "}} {value}");
}

/// The `_bucket` (cumulative, with `le`), `_sum` and `_count` lines of one
/// histogram series.
fn histogram(out: &mut String, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
    for (bound, cumulative) in &h.buckets {
        sample_le(out, name, "_bucket", labels, Some(bound), cumulative);
    }
    sample_le(out, name, "_bucket", labels, Some(&"+Inf"), h.count);
    sample(out, name, "_sum", labels, h.sum);
    sample(out, name, "_count", labels, h.count);
}

/// Escapes a label value: `\` as `\\`, `"` as `\"`, newline as `\n`.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}
