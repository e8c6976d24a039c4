//! The runtime's metrics: recording, snapshots, the Prometheus text exposition
//! (parsed back, not matched as whole strings) and, with the `otel` feature,
//! the OpenTelemetry instruments.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use voice_backends::metrics::{
    DropReason, LATENCY_BUCKETS, LatencyStage, Metrics, Op, render_prometheus_all,
};
use voice_backends::{BackendError, ErrorCode};

// ---------------------------------------------------------------------------
// A small parser for the Prometheus text format.

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Default)]
struct Exposition {
    /// `(name, help)` in order of appearance.
    helps: Vec<(String, String)>,
    /// `(name, type)` in order of appearance.
    types: Vec<(String, String)>,
    samples: Vec<Sample>,
    /// For each sample, the family (last `# TYPE`) it was written under.
    family_of_sample: Vec<String>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        assert!(text.ends_with('\n'), "exposition ends with a newline");
        let mut exp = Exposition::default();
        for line in text.lines() {
            assert!(!line.is_empty(), "no blank lines");
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                exp.helps.push((name.to_owned(), help.to_owned()));
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(
                    ["counter", "gauge", "histogram"].contains(&kind),
                    "type {kind}"
                );
                exp.types.push((name.to_owned(), kind.to_owned()));
            } else {
                assert!(!line.starts_with('#'), "unexpected comment {line:?}");
                let sample = parse_sample(line);
                let family = exp
                    .types
                    .last()
                    .expect("sample after a TYPE line")
                    .0
                    .clone();
                exp.family_of_sample.push(family);
                exp.samples.push(sample);
            }
        }
        exp
    }

    /// The value of the one sample with exactly this name and label set.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == wanted)
            .collect();
        assert!(found.len() <= 1, "duplicate series {name} {labels:?}");
        found.first().map(|s| s.value)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }

    fn with_name(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    fn type_of(&self, name: &str) -> &str {
        let found: Vec<&(String, String)> = self.types.iter().filter(|t| t.0 == name).collect();
        assert_eq!(found.len(), 1, "one TYPE line for {name}");
        &found[0].1
    }
}

fn parse_sample(line: &str) -> Sample {
    let open = line.find('{').expect("every series has labels");
    let name = line[..open].to_owned();
    assert!(
        name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "metric name {name:?}"
    );
    let mut labels = BTreeMap::new();
    let mut chars = line[open + 1..].char_indices().peekable();
    let rest_start;
    loop {
        // key
        let mut key = String::new();
        loop {
            let (_, c) = chars.next().expect("label key");
            if c == '=' {
                break;
            }
            key.push(c);
        }
        assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "opening quote");
        let mut value = String::new();
        loop {
            let (_, c) = chars.next().expect("label value");
            match c {
                '\\' => match chars.next().expect("escape").1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    other => panic!("bad escape \\{other}"),
                },
                '"' => break,
                '\n' => panic!("raw newline in label value"),
                c => value.push(c),
            }
        }
        assert!(labels.insert(key, value).is_none(), "duplicate label");
        match chars.next().expect("after label").1 {
            ',' => continue,
            '}' => {
                rest_start = chars.next().expect("space").0;
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let rest = &line[open + 1 + rest_start..];
    let value_text = rest.strip_prefix(' ').expect("space before value");
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        t => t.parse().unwrap_or_else(|_| panic!("value {t:?}")),
    };
    Sample {
        name,
        labels,
        value,
    }
}

fn render(metrics: &Metrics) -> Exposition {
    let mut text = String::new();
    metrics.render_prometheus(&mut text);
    Exposition::parse(&text)
}

fn err(code: ErrorCode) -> voice_backends::Result<()> {
    Err(BackendError::new("test", code, "failed"))
}

const FAMILIES: [(&str, &str); 14] = [
    ("backend_requests_total", "counter"),
    ("backend_errors_total", "counter"),
    ("backend_latency_seconds", "histogram"),
    ("backend_sessions_active", "gauge"),
    ("backend_sessions_total", "counter"),
    ("backend_throughput_bytes", "counter"),
    ("pipeline_turn_latency_seconds", "histogram"),
    ("pipeline_frames_dropped_total", "counter"),
    ("pipeline_interruptions_total", "counter"),
    ("pipeline_false_interruptions_total", "counter"),
    ("pipeline_preemptive_replies_total", "counter"),
    ("pipeline_turns_total", "counter"),
    ("pipeline_component_switches_total", "counter"),
    ("pipeline_component_served_total", "counter"),
];

// ---------------------------------------------------------------------------

#[test]
fn label_names_of_the_enums() {
    let ops: Vec<&str> = Op::ALL.iter().map(|o| o.as_str()).collect();
    assert_eq!(
        ops,
        [
            "start",
            "stop",
            "create_session",
            "get_session",
            "close_session",
            "process_audio",
            "send_audio",
            "send_text",
            "health_check",
            "update_config",
            "turn",
        ]
    );
    let stages: Vec<&str> = LatencyStage::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(
        stages,
        ["first_audio", "stt", "agent", "tts", "endpointing"]
    );
    let reasons: Vec<&str> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "output_overflow",
            "event_overflow",
            "input_overflow",
            "invalid_audio",
            "unheard"
        ]
    );
    assert_eq!(Op::CreateSession.to_string(), "create_session");
    assert_eq!(LatencyStage::FirstAudio.to_string(), "first_audio");
    assert_eq!(DropReason::InvalidAudio.to_string(), "invalid_audio");
}

#[test]
fn every_recording_call_is_in_the_snapshot_and_the_text() {
    let m = Metrics::new("local");
    assert_eq!(m.provider(), "local");

    m.request(Op::Start);
    m.request(Op::SendText);
    m.request(Op::SendText);
    m.error(Op::SendText, ErrorCode::Timeout);
    m.error(Op::CreateSession, ErrorCode::SessionLimitExceeded);
    m.latency(Op::ProcessAudio, Duration::from_millis(3));
    m.session_opened();
    m.session_opened();
    m.session_closed();
    m.bytes_in(640);
    m.bytes_in(320);
    m.bytes_out(1000);
    m.turn_latency(LatencyStage::FirstAudio, Duration::from_millis(420));
    m.turn_latency(LatencyStage::Stt, Duration::from_millis(150));
    m.turn_latency(LatencyStage::Agent, Duration::from_millis(200));
    m.turn_latency(LatencyStage::Tts, Duration::from_millis(70));
    m.dropped(DropReason::OutputOverflow, 3);
    m.dropped(DropReason::EventOverflow, 2);
    m.dropped(DropReason::InputOverflow, 1);
    m.dropped(DropReason::InvalidAudio, 4);
    m.interrupted();
    m.turn();
    m.turn();

    let s = m.snapshot();
    assert_eq!(s.provider, "local");
    assert_eq!(s.requests.len(), Op::ALL.len());
    assert_eq!(s.requests[&Op::Start], 1);
    assert_eq!(s.requests[&Op::SendText], 2);
    assert_eq!(s.requests[&Op::Stop], 0);
    assert_eq!(s.errors.len(), Op::ALL.len() * ErrorCode::ALL.len());
    assert_eq!(s.errors[&(Op::SendText, ErrorCode::Timeout)], 1);
    assert_eq!(
        s.errors[&(Op::CreateSession, ErrorCode::SessionLimitExceeded)],
        1
    );
    assert_eq!(s.errors_total(), 2);
    assert_eq!(s.latency[&Op::ProcessAudio].count, 1);
    assert!((s.latency[&Op::ProcessAudio].sum - 0.003).abs() < 1e-12);
    assert_eq!(s.latency[&Op::Start].count, 0);
    assert_eq!(s.sessions_active, 1);
    assert_eq!(s.sessions_total, 2);
    assert_eq!(s.bytes_in, 960);
    assert_eq!(s.bytes_out, 1000);
    for (stage, secs) in [
        (LatencyStage::FirstAudio, 0.42),
        (LatencyStage::Stt, 0.15),
        (LatencyStage::Agent, 0.2),
        (LatencyStage::Tts, 0.07),
    ] {
        assert_eq!(s.turn_latency[&stage].count, 1, "{stage}");
        assert!((s.turn_latency[&stage].sum - secs).abs() < 1e-12, "{stage}");
    }
    assert_eq!(s.dropped[&DropReason::OutputOverflow], 3);
    assert_eq!(s.dropped[&DropReason::EventOverflow], 2);
    assert_eq!(s.dropped[&DropReason::InputOverflow], 1);
    assert_eq!(s.dropped[&DropReason::InvalidAudio], 4);
    assert_eq!(s.interruptions, 1);
    assert_eq!(s.turns, 2);

    let e = render(&m);
    for (name, kind) in FAMILIES {
        assert_eq!(e.type_of(name), kind);
        assert_eq!(e.helps.iter().filter(|h| h.0 == name).count(), 1);
    }
    let p = ("provider", "local");
    assert_eq!(
        e.value("backend_requests_total", &[p, ("operation", "start")]),
        1.0
    );
    assert_eq!(
        e.value("backend_requests_total", &[p, ("operation", "send_text")]),
        2.0
    );
    assert_eq!(
        e.value(
            "backend_errors_total",
            &[p, ("operation", "send_text"), ("code", "timeout")]
        ),
        1.0
    );
    assert_eq!(
        e.value(
            "backend_errors_total",
            &[
                p,
                ("operation", "create_session"),
                ("code", "session_limit_exceeded")
            ]
        ),
        1.0
    );
    assert_eq!(
        e.value(
            "backend_latency_seconds_count",
            &[p, ("operation", "process_audio")]
        ),
        1.0
    );
    assert!(
        (e.value(
            "backend_latency_seconds_sum",
            &[p, ("operation", "process_audio")]
        ) - 0.003)
            .abs()
            < 1e-12
    );
    assert_eq!(e.value("backend_sessions_active", &[p]), 1.0);
    assert_eq!(e.value("backend_sessions_total", &[p]), 2.0);
    assert_eq!(
        e.value("backend_throughput_bytes", &[p, ("direction", "in")]),
        960.0
    );
    assert_eq!(
        e.value("backend_throughput_bytes", &[p, ("direction", "out")]),
        1000.0
    );
    for stage in ["first_audio", "stt", "agent", "tts"] {
        assert_eq!(
            e.value(
                "pipeline_turn_latency_seconds_count",
                &[p, ("stage", stage)]
            ),
            1.0
        );
    }
    assert!(
        (e.value(
            "pipeline_turn_latency_seconds_sum",
            &[p, ("stage", "first_audio")]
        ) - 0.42)
            .abs()
            < 1e-12
    );
    for (reason, n) in [
        ("output_overflow", 3.0),
        ("event_overflow", 2.0),
        ("input_overflow", 1.0),
        ("invalid_audio", 4.0),
    ] {
        assert_eq!(
            e.value("pipeline_frames_dropped_total", &[p, ("reason", reason)]),
            n
        );
    }
    assert_eq!(e.value("pipeline_interruptions_total", &[p]), 1.0);
    assert_eq!(e.value("pipeline_turns_total", &[p]), 2.0);

    // Untouched operations write no series; every sample is under its family.
    assert_eq!(
        e.get("backend_requests_total", &[p, ("operation", "stop")]),
        None
    );
    assert_eq!(e.with_name("backend_errors_total").len(), 2);
    for (sample, family) in e.samples.iter().zip(&e.family_of_sample) {
        let base = sample
            .name
            .strip_suffix("_bucket")
            .or_else(|| sample.name.strip_suffix("_sum"))
            .or_else(|| sample.name.strip_suffix("_count"))
            .filter(|base| e.types.iter().any(|t| t.0 == *base && t.1 == "histogram"))
            .unwrap_or(&sample.name);
        assert_eq!(base, family, "{sample:?}");
    }
}

#[test]
fn an_idle_backend_writes_every_header_and_the_unlabelled_series() {
    let m = Metrics::new("idle");
    let e = render(&m);
    let names: Vec<&str> = e.types.iter().map(|t| t.0.as_str()).collect();
    let expected: Vec<&str> = FAMILIES.iter().map(|f| f.0).collect();
    assert_eq!(names, expected);
    let help_names: Vec<&str> = e.helps.iter().map(|h| h.0.as_str()).collect();
    assert_eq!(help_names, expected);
    assert!(e.with_name("backend_requests_total").is_empty());
    assert!(e.with_name("backend_errors_total").is_empty());
    assert!(e.with_name("backend_latency_seconds_bucket").is_empty());
    assert!(
        e.with_name("pipeline_turn_latency_seconds_count")
            .is_empty()
    );
    let p = ("provider", "idle");
    assert_eq!(e.value("backend_sessions_active", &[p]), 0.0);
    assert_eq!(e.value("backend_sessions_total", &[p]), 0.0);
    assert_eq!(
        e.value("backend_throughput_bytes", &[p, ("direction", "in")]),
        0.0
    );
    assert_eq!(
        e.with_name("pipeline_frames_dropped_total").len(),
        DropReason::ALL.len()
    );
    assert_eq!(e.value("pipeline_turns_total", &[p]), 0.0);
}

#[test]
fn histogram_buckets_are_cumulative_with_count_and_sum() {
    let m = Metrics::new("h");
    let observations = [
        Duration::from_micros(50),     // <= 0.0001
        Duration::from_micros(100),    // exactly 0.0001: `le` is inclusive
        Duration::from_micros(101),    // <= 0.00025
        Duration::from_millis(3),      // <= 0.005
        Duration::from_millis(3),      // <= 0.005
        Duration::from_secs(1),        // exactly 1
        Duration::from_secs(10),       // exactly 10, the last bound
        Duration::from_secs(20),       // +Inf only
        Duration::from_nanos(1),       // <= 0.0001
        Duration::from_millis(10_001), // +Inf only
    ];
    for d in observations {
        m.latency(Op::HealthCheck, d);
    }
    let total: f64 = observations.iter().map(Duration::as_secs_f64).sum();

    let h = &m.snapshot().latency[&Op::HealthCheck];
    assert_eq!(h.count, observations.len() as u64);
    assert!((h.sum - total).abs() < 1e-9, "{} vs {total}", h.sum);
    let bounds: Vec<f64> = h.buckets.iter().map(|b| b.0).collect();
    assert_eq!(bounds, LATENCY_BUCKETS);
    let expected_cumulative = |bound: f64| {
        observations
            .iter()
            .filter(|d| d.as_secs_f64() <= bound)
            .count() as u64
    };
    for &(bound, cumulative) in &h.buckets {
        assert_eq!(cumulative, expected_cumulative(bound), "le={bound}");
    }
    assert_eq!(h.buckets[0].1, 3);
    assert_eq!(h.buckets.last().unwrap().1, 8);

    let e = render(&m);
    let buckets = e.with_name("backend_latency_seconds_bucket");
    assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1);
    let mut previous = 0.0;
    for (i, b) in buckets.iter().enumerate() {
        assert_eq!(b.labels["provider"], "h");
        assert_eq!(b.labels["operation"], "health_check");
        assert_eq!(b.labels.len(), 3);
        let le = &b.labels["le"];
        if i < LATENCY_BUCKETS.len() {
            let bound: f64 = le.parse().unwrap();
            assert_eq!(bound, LATENCY_BUCKETS[i]);
            assert_eq!(b.value, expected_cumulative(bound) as f64, "le={le}");
        } else {
            assert_eq!(le, "+Inf");
        }
        assert!(b.value >= previous, "cumulative");
        previous = b.value;
    }
    let labels = [("provider", "h"), ("operation", "health_check")];
    let count = e.value("backend_latency_seconds_count", &labels);
    assert_eq!(count, observations.len() as f64);
    assert_eq!(count, buckets.last().unwrap().value, "+Inf equals _count");
    let sum = e.value("backend_latency_seconds_sum", &labels);
    assert!((sum - total).abs() < 1e-9, "{sum} vs {total}");
    // The bucket bounds are written in plain decimal.
    let les: Vec<&str> = buckets.iter().map(|b| b.labels["le"].as_str()).collect();
    assert_eq!(&les[..4], ["0.0001", "0.00025", "0.0005", "0.001"]);
    assert_eq!(&les[12..], ["1", "2.5", "5", "10", "+Inf"]);
}

#[test]
fn turn_latency_histograms_are_per_stage() {
    let m = Metrics::new("t");
    m.turn_latency(LatencyStage::FirstAudio, Duration::from_millis(300));
    m.turn_latency(LatencyStage::FirstAudio, Duration::from_millis(700));
    m.turn_latency(LatencyStage::Tts, Duration::from_millis(40));
    let e = render(&m);
    let first = [("provider", "t"), ("stage", "first_audio")];
    assert_eq!(e.value("pipeline_turn_latency_seconds_count", &first), 2.0);
    assert!((e.value("pipeline_turn_latency_seconds_sum", &first) - 1.0).abs() < 1e-12);
    let bucket = |le: &str| {
        e.value(
            "pipeline_turn_latency_seconds_bucket",
            &[first[0], first[1], ("le", le)],
        )
    };
    assert_eq!(bucket("0.25"), 0.0);
    assert_eq!(bucket("0.5"), 1.0);
    assert_eq!(bucket("1"), 2.0);
    assert_eq!(bucket("+Inf"), 2.0);
    let tts = [("provider", "t"), ("stage", "tts")];
    assert_eq!(e.value("pipeline_turn_latency_seconds_count", &tts), 1.0);
    assert_eq!(
        e.get(
            "pipeline_turn_latency_seconds_count",
            &[("provider", "t"), ("stage", "stt")]
        ),
        None
    );
}

#[test]
fn label_values_are_escaped() {
    let name = "we\"ird\\pro\nvider";
    let m = Metrics::new(name);
    m.request(Op::Start);
    m.latency(Op::Start, Duration::from_millis(1));
    let mut text = String::new();
    m.render_prometheus(&mut text);
    // No raw newline inside a label: every line is a comment or a whole sample.
    assert!(text.contains(r#"provider="we\"ird\\pro\nvider""#), "{text}");
    let e = Exposition::parse(&text);
    assert!(!e.samples.is_empty());
    for s in &e.samples {
        assert_eq!(s.labels["provider"], name, "{s:?}");
    }
    assert_eq!(
        e.value(
            "backend_requests_total",
            &[("provider", name), ("operation", "start")]
        ),
        1.0
    );
}

#[test]
fn concurrent_recording_loses_no_counts() {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 10_000;
    let m = Arc::new(Metrics::new("busy"));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let m = Arc::clone(&m);
            std::thread::spawn(move || {
                for i in 0..PER_THREAD {
                    m.request(Op::ProcessAudio);
                    m.error(Op::ProcessAudio, ErrorCode::PipelineError);
                    m.latency(Op::ProcessAudio, Duration::from_micros(t * 1000 + i % 7));
                    m.session_opened();
                    m.bytes_in(3);
                    m.bytes_out(5);
                    m.dropped(DropReason::InputOverflow, 2);
                    m.turn_latency(LatencyStage::Agent, Duration::from_millis(1));
                    m.interrupted();
                    m.turn();
                    m.session_closed();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let n = THREADS * PER_THREAD;
    let s = m.snapshot();
    assert_eq!(s.requests[&Op::ProcessAudio], n);
    assert_eq!(s.errors[&(Op::ProcessAudio, ErrorCode::PipelineError)], n);
    assert_eq!(s.errors_total(), n);
    assert_eq!(s.latency[&Op::ProcessAudio].count, n);
    let expected_sum_micros: u64 = (0..THREADS)
        .map(|t| (0..PER_THREAD).map(|i| t * 1000 + i % 7).sum::<u64>())
        .sum();
    assert!((s.latency[&Op::ProcessAudio].sum - expected_sum_micros as f64 / 1e6).abs() < 1e-6);
    assert_eq!(s.sessions_active, 0);
    assert_eq!(s.sessions_total, n);
    assert_eq!(s.bytes_in, 3 * n);
    assert_eq!(s.bytes_out, 5 * n);
    assert_eq!(s.dropped[&DropReason::InputOverflow], 2 * n);
    assert_eq!(s.turn_latency[&LatencyStage::Agent].count, n);
    assert_eq!(s.interruptions, n);
    assert_eq!(s.turns, n);

    let e = render(&m);
    let p = ("provider", "busy");
    assert_eq!(
        e.value(
            "backend_requests_total",
            &[p, ("operation", "process_audio")]
        ),
        n as f64
    );
    assert_eq!(
        e.value(
            "backend_latency_seconds_bucket",
            &[p, ("operation", "process_audio"), ("le", "+Inf")]
        ),
        n as f64
    );
}

#[test]
fn the_sessions_gauge_goes_up_and_down() {
    let m = Metrics::new("g");
    let active = |m: &Metrics| render(m).value("backend_sessions_active", &[("provider", "g")]);
    assert_eq!(active(&m), 0.0);
    for _ in 0..3 {
        m.session_opened();
    }
    assert_eq!(m.snapshot().sessions_active, 3);
    assert_eq!(active(&m), 3.0);
    m.session_closed();
    m.session_closed();
    assert_eq!(m.snapshot().sessions_active, 1);
    assert_eq!(active(&m), 1.0);
    m.session_opened();
    m.session_closed();
    m.session_closed();
    let s = m.snapshot();
    assert_eq!(s.sessions_active, 0);
    assert_eq!(s.sessions_total, 4, "the total only grows");
    assert_eq!(active(&m), 0.0);
}

#[tokio::test(start_paused = true)]
async fn op_timer_records_request_latency_and_error_code() {
    let m = Metrics::new("timer");

    let timer = m.observe(Op::CreateSession);
    assert_eq!(timer.op(), Op::CreateSession);
    tokio::time::sleep(Duration::from_millis(5)).await;
    timer.finish(&Ok::<_, BackendError>(42));

    let timer = m.observe(Op::CreateSession);
    tokio::time::sleep(Duration::from_millis(20)).await;
    timer.finish(&err(ErrorCode::SessionLimitExceeded));

    let timer = m.observe(Op::HealthCheck);
    timer.finish_with(Some(ErrorCode::ConnectionFailed));
    let timer = m.observe(Op::HealthCheck);
    timer.finish_with(None);

    // Dropped unfinished (a cancelled operation): counted as context_canceled.
    let slow = async {
        let timer = m.observe(Op::SendAudio);
        tokio::time::sleep(Duration::from_secs(60)).await;
        timer.finish(&Ok::<_, BackendError>(()));
    };
    let cancelled = tokio::time::timeout(Duration::from_millis(100), slow).await;
    assert!(cancelled.is_err());

    let s = m.snapshot();
    assert_eq!(s.requests[&Op::CreateSession], 2);
    assert_eq!(
        s.errors[&(Op::CreateSession, ErrorCode::SessionLimitExceeded)],
        1
    );
    let create = &s.latency[&Op::CreateSession];
    assert_eq!(create.count, 2);
    assert!((create.sum - 0.025).abs() < 1e-9, "{}", create.sum);
    assert_eq!(s.requests[&Op::HealthCheck], 2);
    assert_eq!(s.errors[&(Op::HealthCheck, ErrorCode::ConnectionFailed)], 1);
    assert_eq!(s.requests[&Op::SendAudio], 1);
    assert_eq!(s.errors[&(Op::SendAudio, ErrorCode::ContextCanceled)], 1);
    assert!((s.latency[&Op::SendAudio].sum - 0.1).abs() < 1e-9);
    assert_eq!(s.errors_total(), 3);
}

#[test]
fn render_all_writes_each_family_once_for_several_backends() {
    let a = Metrics::new("alpha");
    let b = Metrics::new("beta");
    a.request(Op::Start);
    b.request(Op::Start);
    b.request(Op::Start);
    a.latency(Op::Start, Duration::from_millis(2));
    b.latency(Op::Start, Duration::from_millis(4));
    b.error(Op::Start, ErrorCode::ConnectionFailed);
    a.session_opened();

    let text = render_prometheus_all(&[&a, &b]);
    let e = Exposition::parse(&text);
    let names: Vec<&str> = e.types.iter().map(|t| t.0.as_str()).collect();
    let expected: Vec<&str> = FAMILIES.iter().map(|f| f.0).collect();
    assert_eq!(names, expected, "each TYPE once, in order");
    let help_names: Vec<&str> = e.helps.iter().map(|h| h.0.as_str()).collect();
    assert_eq!(help_names, expected, "each HELP once, in order");
    for (name, kind) in FAMILIES {
        assert_eq!(e.type_of(name), kind);
    }

    let start = ("operation", "start");
    assert_eq!(
        e.value("backend_requests_total", &[("provider", "alpha"), start]),
        1.0
    );
    assert_eq!(
        e.value("backend_requests_total", &[("provider", "beta"), start]),
        2.0
    );
    assert_eq!(
        e.get(
            "backend_errors_total",
            &[("provider", "alpha"), start, ("code", "connection_failed")]
        ),
        None
    );
    assert_eq!(
        e.value(
            "backend_errors_total",
            &[("provider", "beta"), start, ("code", "connection_failed")]
        ),
        1.0
    );
    assert_eq!(
        e.value(
            "backend_latency_seconds_count",
            &[("provider", "alpha"), start]
        ),
        1.0
    );
    assert!(
        (e.value(
            "backend_latency_seconds_sum",
            &[("provider", "beta"), start]
        ) - 0.004)
            .abs()
            < 1e-12
    );
    assert_eq!(
        e.value("backend_sessions_active", &[("provider", "alpha")]),
        1.0
    );
    assert_eq!(
        e.value("backend_sessions_active", &[("provider", "beta")]),
        0.0
    );
    // Within a family, alpha's samples come before beta's.
    let providers: Vec<&str> = e
        .with_name("backend_sessions_total")
        .iter()
        .map(|s| s.labels["provider"].as_str())
        .collect();
    assert_eq!(providers, ["alpha", "beta"]);

    // One backend alone renders the same samples as its own exposition.
    let single = render(&a);
    let alpha_in_all: Vec<&Sample> = e
        .samples
        .iter()
        .filter(|s| s.labels["provider"] == "alpha")
        .collect();
    let single_samples: Vec<&Sample> = single.samples.iter().collect();
    assert_eq!(alpha_in_all, single_samples);

    assert_eq!(
        render_prometheus_all(&[]).lines().count(),
        2 * FAMILIES.len()
    );
}

#[cfg(feature = "otel")]
mod otel {
    //! The OpenTelemetry instruments, read back through the SDK's manual reader.

    use std::sync::Arc;
    use std::time::Duration;

    use opentelemetry::KeyValue;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
    use opentelemetry_sdk::metrics::reader::MetricReader;
    use opentelemetry_sdk::metrics::{
        InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
    };
    use voice_backends::ErrorCode;
    use voice_backends::metrics::{DropReason, LATENCY_BUCKETS, LatencyStage, Metrics, Op};

    /// A `ManualReader` the test can keep a handle to after giving it to the
    /// provider.
    #[derive(Clone, Debug)]
    struct SharedReader(Arc<ManualReader>);

    impl MetricReader for SharedReader {
        fn register_pipeline(&self, pipeline: std::sync::Weak<Pipeline>) {
            self.0.register_pipeline(pipeline)
        }
        fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
            self.0.collect(rm)
        }
        fn force_flush(&self) -> OTelSdkResult {
            self.0.force_flush()
        }
        fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
            self.0.shutdown_with_timeout(timeout)
        }
        fn temporality(&self, kind: InstrumentKind) -> Temporality {
            self.0.temporality(kind)
        }
    }

    /// `(metric name, sorted attributes) -> value`, every value as f64. A
    /// histogram's point is given as `<name>_count`, `<name>_sum` and
    /// `<name>_bucket`s (`le` attribute, not cumulative, `+Inf` last).
    type Points = Vec<(String, Vec<(String, String)>, f64)>;

    fn collect(reader: &SharedReader) -> Points {
        let mut rm = ResourceMetrics::default();
        reader.collect(&mut rm).unwrap();
        let mut points = Points::new();
        let attrs = |it: &mut dyn Iterator<Item = &KeyValue>| {
            let mut v: Vec<(String, String)> = it
                .map(|kv| (kv.key.to_string(), kv.value.to_string()))
                .collect();
            v.sort();
            v
        };
        for scope in rm.scope_metrics() {
            for metric in scope.metrics() {
                let name = metric.name().to_owned();
                match metric.data() {
                    AggregatedMetrics::U64(MetricData::Sum(sum)) => {
                        assert!(sum.is_monotonic(), "{name}");
                        for dp in sum.data_points() {
                            let a = attrs(&mut dp.attributes());
                            points.push((name.clone(), a, dp.value() as f64));
                        }
                    }
                    AggregatedMetrics::F64(MetricData::Sum(sum)) => {
                        assert!(sum.is_monotonic(), "{name}");
                        for dp in sum.data_points() {
                            let a = attrs(&mut dp.attributes());
                            points.push((name.clone(), a, dp.value()));
                        }
                    }
                    AggregatedMetrics::I64(MetricData::Sum(sum)) => {
                        assert!(!sum.is_monotonic(), "{name} is an up-down counter");
                        for dp in sum.data_points() {
                            let a = attrs(&mut dp.attributes());
                            points.push((name.clone(), a, dp.value() as f64));
                        }
                    }
                    AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                        assert_eq!(metric.unit(), "s", "{name}");
                        for dp in h.data_points() {
                            let a = attrs(&mut dp.attributes());
                            points.push((format!("{name}_count"), a.clone(), dp.count() as f64));
                            points.push((format!("{name}_sum"), a.clone(), dp.sum()));
                            let bounds: Vec<f64> = dp.bounds().collect();
                            assert_eq!(bounds, LATENCY_BUCKETS, "{name}");
                            let les = bounds
                                .iter()
                                .map(|b| b.to_string())
                                .chain(["+Inf".to_owned()]);
                            for (le, n) in les.zip(dp.bucket_counts()) {
                                let mut a = a.clone();
                                a.push(("le".to_owned(), le));
                                a.sort();
                                points.push((format!("{name}_bucket"), a, n as f64));
                            }
                        }
                    }
                    other => panic!("{name}: unexpected data {other:?}"),
                }
            }
        }
        points
    }

    fn value(points: &Points, name: &str, attrs: &[(&str, &str)]) -> Option<f64> {
        let mut wanted: Vec<(String, String)> = attrs
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        wanted.sort();
        let found: Vec<f64> = points
            .iter()
            .filter(|p| p.0 == name && p.1 == wanted)
            .map(|p| p.2)
            .collect();
        assert!(found.len() <= 1, "duplicate point {name} {attrs:?}");
        found.first().copied()
    }

    #[test]
    fn instruments_report_the_atomics_at_collection_time() {
        let reader = SharedReader(Arc::new(ManualReader::builder().build()));
        let provider = SdkMeterProvider::builder()
            .with_reader(reader.clone())
            .build();
        let meter = provider.meter("voice-backends-test");

        let m = Arc::new(Metrics::new("local"));
        // Counted before registration: the counters report it (they read the
        // atomics), the histograms do not (they see what is recorded later).
        m.request(Op::Stop);
        m.latency(Op::Stop, Duration::from_millis(5));
        m.register_otel(&meter);

        // Recorded after registration: read at collection time.
        m.request(Op::Start);
        m.request(Op::Start);
        m.error(Op::Start, ErrorCode::ConnectionTimeout);
        m.latency(Op::Start, Duration::from_millis(250));
        m.latency(Op::Start, Duration::from_millis(750));
        m.session_opened();
        m.session_opened();
        m.session_closed();
        m.bytes_in(100);
        m.bytes_out(40);
        m.turn_latency(LatencyStage::FirstAudio, Duration::from_millis(500));
        m.dropped(DropReason::EventOverflow, 7);
        m.interrupted();
        m.turn();
        m.turn();
        m.turn();

        let points = collect(&reader);
        let p = ("provider", "local");
        let start = ("operation", "start");
        let v = |name: &str, attrs: &[(&str, &str)]| {
            value(&points, name, attrs).unwrap_or_else(|| panic!("{name} {attrs:?}: {points:?}"))
        };
        assert_eq!(v("backend_requests_total", &[p, start]), 2.0);
        assert_eq!(
            v(
                "backend_errors_total",
                &[p, start, ("code", "connection_timeout")]
            ),
            1.0
        );
        assert_eq!(v("backend_latency_seconds_count", &[p, start]), 2.0);
        assert!((v("backend_latency_seconds_sum", &[p, start]) - 1.0).abs() < 1e-12);
        // 250 ms falls in the bucket up to 0.25 s (bounds are inclusive), 750 ms
        // in the one up to 1 s; every other bucket is empty.
        let bucket = |le: &str| v("backend_latency_seconds_bucket", &[p, start, ("le", le)]);
        assert_eq!(bucket("0.25"), 1.0);
        assert_eq!(bucket("1"), 1.0);
        let filled: f64 = LATENCY_BUCKETS
            .iter()
            .map(|b| bucket(&b.to_string()))
            .chain([bucket("+Inf")])
            .sum();
        assert_eq!(filled, 2.0);
        // The same buckets as the Prometheus exposition's (cumulative there).
        let snapshot = &m.snapshot().latency[&Op::Start];
        let mut cumulative = 0.0;
        for (bound, count) in &snapshot.buckets {
            cumulative += bucket(&bound.to_string());
            assert_eq!(cumulative, *count as f64, "le {bound}");
        }
        assert_eq!(
            v("backend_requests_total", &[p, ("operation", "stop")]),
            1.0
        );
        assert_eq!(
            value(
                &points,
                "backend_latency_seconds_count",
                &[p, ("operation", "stop")]
            ),
            None
        );
        assert_eq!(v("backend_sessions_active", &[p]), 1.0);
        assert_eq!(v("backend_sessions_total", &[p]), 2.0);
        assert_eq!(
            v("backend_throughput_bytes", &[p, ("direction", "in")]),
            100.0
        );
        assert_eq!(
            v("backend_throughput_bytes", &[p, ("direction", "out")]),
            40.0
        );
        let first = ("stage", "first_audio");
        assert_eq!(v("pipeline_turn_latency_seconds_count", &[p, first]), 1.0);
        assert!((v("pipeline_turn_latency_seconds_sum", &[p, first]) - 0.5).abs() < 1e-12);
        assert_eq!(
            v(
                "pipeline_turn_latency_seconds_bucket",
                &[p, first, ("le", "0.5")]
            ),
            1.0
        );
        assert_eq!(
            v(
                "pipeline_frames_dropped_total",
                &[p, ("reason", "event_overflow")]
            ),
            7.0
        );
        assert_eq!(
            v(
                "pipeline_frames_dropped_total",
                &[p, ("reason", "invalid_audio")]
            ),
            0.0
        );
        assert_eq!(v("pipeline_interruptions_total", &[p]), 1.0);
        assert_eq!(v("pipeline_turns_total", &[p]), 3.0);

        // Later recordings show in the next collection.
        m.turn();
        m.session_closed();
        let points = collect(&reader);
        assert_eq!(value(&points, "pipeline_turns_total", &[p]), Some(4.0));
        assert_eq!(value(&points, "backend_sessions_active", &[p]), Some(0.0));

        // Once the metrics are gone, their callbacks observe nothing.
        drop(m);
        let points = collect(&reader);
        assert_eq!(value(&points, "pipeline_turns_total", &[p]), None);
        provider.shutdown().unwrap();
    }

    #[test]
    fn each_meter_registered_gets_every_latency_once() {
        let readers = [
            SharedReader(Arc::new(ManualReader::builder().build())),
            SharedReader(Arc::new(ManualReader::builder().build())),
        ];
        let providers = readers
            .clone()
            .map(|reader| SdkMeterProvider::builder().with_reader(reader).build());
        let m = Arc::new(Metrics::new("local"));
        for provider in &providers {
            m.register_otel(&provider.meter("voice-backends-test"));
        }
        m.latency(Op::CreateSession, Duration::from_millis(3));
        m.turn_latency(LatencyStage::Agent, Duration::from_millis(40));
        let p = ("provider", "local");
        for reader in &readers {
            let points = collect(reader);
            let count = |name: &str, attrs: &[(&str, &str)]| value(&points, name, attrs);
            assert_eq!(
                count(
                    "backend_latency_seconds_count",
                    &[p, ("operation", "create_session")]
                ),
                Some(1.0)
            );
            assert_eq!(
                count(
                    "pipeline_turn_latency_seconds_bucket",
                    &[p, ("stage", "agent"), ("le", "0.05")]
                ),
                Some(1.0)
            );
        }
        for provider in providers {
            provider.shutdown().unwrap();
        }
    }

    #[test]
    fn registration_runs_against_the_global_noop_meter() {
        let m = Arc::new(Metrics::new("noop"));
        m.register_otel(&opentelemetry::global::meter("voice-backends-test"));
        m.request(Op::Stop);
        assert_eq!(m.snapshot().requests[&Op::Stop], 1);
    }
}
