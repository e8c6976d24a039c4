//! The OpenTelemetry instruments of [`Metrics::register_otel`].

use std::borrow::Cow;
use std::sync::{Arc, Weak};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{AsyncInstrument, Histogram, Meter};

use super::families::{
    DROPPED, ERRORS, FALSE_INTERRUPTIONS, INTERRUPTIONS, LATENCY, PREEMPTIVE, REQUESTS,
    SESSIONS_ACTIVE, SESSIONS_TOTAL, THROUGHPUT, TURN_LATENCY, TURNS,
};
use super::{
    DropReason, LATENCY_BUCKETS, LatencyStage, MAX_OBSERVATION_NANOS, Metrics, Op, Relaxed,
};
use crate::error::ErrorCode;

/// The two latency histograms of one [`Metrics::register_otel`] call,
/// with the attribute sets of every series made in advance.
pub(super) struct Histograms {
    latency: Histogram<f64>,
    turn_latency: Histogram<f64>,
    by_op: Vec<[KeyValue; 2]>,
    by_stage: Vec<[KeyValue; 2]>,
}

/// Seconds, with the same one-day cap as the atomic histograms' sum.
fn seconds(elapsed: Duration) -> f64 {
    elapsed
        .min(Duration::from_nanos(MAX_OBSERVATION_NANOS))
        .as_secs_f64()
}

impl Metrics {
    /// Registers this backend's metrics with an OpenTelemetry `meter`.
    ///
    /// Names and attributes are those of the Prometheus exposition
    /// (see the [module docs](crate::metrics)):
    ///
    /// - Counters become observable counters and
    ///   `backend_sessions_active` an observable up-down counter. Their
    ///   callbacks read the same atomics at collection time, so they
    ///   report everything counted since the `Metrics` was made, and
    ///   counting costs nothing extra. Series keyed by operation or
    ///   error code are observed once they are non-zero.
    /// - The two latency families become OpenTelemetry histograms
    ///   (`f64`, unit `s`) with the bucket bounds of
    ///   [`LATENCY_BUCKETS`]. The OpenTelemetry API has no observable
    ///   histogram, so each latency is also recorded into them as it is
    ///   observed: they hold what was observed after this call, and a
    ///   latency costs one histogram update per registration on top of
    ///   the atomics (latencies are per operation and per turn, and
    ///   `process_audio`'s are sampled, so this is not per frame).
    ///
    /// The callbacks hold a weak reference: once the last `Arc` of this
    /// `Metrics` is dropped they observe nothing. Register each `Metrics`
    /// once per meter; a second registration would report every value
    /// twice.
    #[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
    pub fn register_otel(self: &Arc<Self>, meter: &Meter) {
        let weak = Arc::downgrade(self);
        let provider = KeyValue::new("provider", Arc::clone(&self.provider));
        let by_op: Vec<[KeyValue; 2]> = Op::ALL
            .iter()
            .map(|op| [provider.clone(), KeyValue::new("operation", op.as_str())])
            .collect();
        let by_stage: Vec<[KeyValue; 2]> = LatencyStage::ALL
            .iter()
            .map(|stage| [provider.clone(), KeyValue::new("stage", stage.as_str())])
            .collect();

        let attrs = by_op.clone();
        u64_counter(meter, &weak, REQUESTS, None, move |m, obs| {
            for (i, attrs) in attrs.iter().enumerate() {
                let value = m.requests[i].load(Relaxed);
                if value > 0 {
                    obs.observe(value, attrs);
                }
            }
        });

        let attrs: Vec<Vec<[KeyValue; 3]>> = Op::ALL
            .iter()
            .map(|op| {
                ErrorCode::ALL
                    .iter()
                    .map(|code| {
                        [
                            provider.clone(),
                            KeyValue::new("operation", op.as_str()),
                            KeyValue::new("code", code.as_str()),
                        ]
                    })
                    .collect()
            })
            .collect();
        u64_counter(meter, &weak, ERRORS, None, move |m, obs| {
            for (per_op, attrs) in m.errors.iter().zip(&attrs) {
                for (counter, attrs) in per_op.iter().zip(attrs) {
                    let value = counter.load(Relaxed);
                    if value > 0 {
                        obs.observe(value, attrs);
                    }
                }
            }
        });

        let latency = histogram(meter, LATENCY);

        let attrs = [provider.clone()];
        let w = weak.clone();
        let _ = meter
            .i64_observable_up_down_counter(SESSIONS_ACTIVE.0)
            .with_description(SESSIONS_ACTIVE.1)
            .with_callback(move |obs| {
                if let Some(m) = w.upgrade() {
                    obs.observe(m.sessions_active.load(Relaxed), &attrs);
                }
            })
            .build();

        let attrs = [provider.clone()];
        u64_counter(meter, &weak, SESSIONS_TOTAL, None, move |m, obs| {
            obs.observe(m.sessions_total.load(Relaxed), &attrs);
        });

        let attrs = [
            [provider.clone(), KeyValue::new("direction", "in")],
            [provider.clone(), KeyValue::new("direction", "out")],
        ];
        u64_counter(meter, &weak, THROUGHPUT, Some("By"), move |m, obs| {
            obs.observe(m.bytes_in.load(Relaxed), &attrs[0]);
            obs.observe(m.bytes_out.load(Relaxed), &attrs[1]);
        });

        let turn_latency = histogram(meter, TURN_LATENCY);

        let attrs: Vec<[KeyValue; 2]> = DropReason::ALL
            .iter()
            .map(|reason| [provider.clone(), KeyValue::new("reason", reason.as_str())])
            .collect();
        u64_counter(meter, &weak, DROPPED, None, move |m, obs| {
            for (counter, attrs) in m.dropped.iter().zip(&attrs) {
                obs.observe(counter.load(Relaxed), attrs);
            }
        });

        let attrs = [provider.clone()];
        u64_counter(meter, &weak, INTERRUPTIONS, None, move |m, obs| {
            obs.observe(m.interruptions.load(Relaxed), &attrs);
        });

        let attrs = [provider.clone()];
        u64_counter(meter, &weak, FALSE_INTERRUPTIONS, None, move |m, obs| {
            obs.observe(m.false_interruptions.load(Relaxed), &attrs);
        });

        let attrs = [
            [provider.clone(), KeyValue::new("outcome", "used")],
            [provider.clone(), KeyValue::new("outcome", "dropped")],
        ];
        u64_counter(meter, &weak, PREEMPTIVE, None, move |m, obs| {
            obs.observe(m.preemptive[0].load(Relaxed), &attrs[0]);
            obs.observe(m.preemptive[1].load(Relaxed), &attrs[1]);
        });

        let attrs = [provider];
        u64_counter(meter, &weak, TURNS, None, move |m, obs| {
            obs.observe(m.turns.load(Relaxed), &attrs);
        });

        let histograms = Arc::new(Histograms {
            latency,
            turn_latency,
            by_op,
            by_stage,
        });
        self.otel.rcu(|current| {
            let mut next = Vec::with_capacity(current.len() + 1);
            next.extend(current.iter().map(Arc::clone));
            next.push(Arc::clone(&histograms));
            next
        });
    }

    #[inline]
    pub(super) fn otel_latency(&self, op: Op, elapsed: Duration) {
        let sets = self.otel.load();
        for h in sets.iter() {
            h.latency.record(seconds(elapsed), &h.by_op[op as usize]);
        }
    }

    #[inline]
    pub(super) fn otel_turn_latency(&self, stage: LatencyStage, elapsed: Duration) {
        let sets = self.otel.load();
        for h in sets.iter() {
            h.turn_latency
                .record(seconds(elapsed), &h.by_stage[stage as usize]);
        }
    }
}

/// An observable `u64` counter whose callback runs while the metrics live.
fn u64_counter<N, H, F>(
    meter: &Meter,
    weak: &Weak<Metrics>,
    (name, help): (N, H),
    unit: Option<&'static str>,
    observe: F,
) where
    N: Into<Cow<'static, str>>,
    H: Into<Cow<'static, str>>,
    F: Fn(&Metrics, &dyn AsyncInstrument<u64>) + Send + Sync + 'static,
{
    let weak = weak.clone();
    let mut builder = meter
        .u64_observable_counter(name)
        .with_description(help)
        .with_callback(move |obs| {
            if let Some(m) = weak.upgrade() {
                observe(&m, obs);
            }
        });
    if let Some(unit) = unit {
        builder = builder.with_unit(unit);
    }
    let _ = builder.build();
}

/// A latency histogram with the bucket bounds of the Prometheus exposition.
fn histogram(meter: &Meter, (name, help): (&'static str, &'static str)) -> Histogram<f64> {
    meter
        .f64_histogram(name)
        .with_description(help)
        .with_unit("s")
        .with_boundaries(LATENCY_BUCKETS.to_vec())
        .build()
}
