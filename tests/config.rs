//! Integration tests of the config module through the public API only.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Deserialize;
use voice_backends::{
    AgentReply, BackendError, Config, ErrorCode, LogLevel, PipelineOverride, PipelineType,
    ProcessorConfig, REDACTED, ResolvedPipeline, Secret, SessionConfig, Transport, agent_fn,
    parse_provider_config,
};

const MINIMAL_S2S: &str = r#"
provider = "local"
pipeline_type = "s2s"
s2s_provider = "echo"
"#;

/// A valid s2s config with every other field at its default.
fn base() -> Config {
    let mut config = Config::new("local");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    config.validate().expect("base config is valid");
    config
}

fn paths(error: &BackendError) -> BTreeSet<String> {
    error.details.keys().cloned().collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// The field paths of every violation of `config`.
fn violation_paths(config: &Config) -> BTreeSet<String> {
    config.violations().iter().map(|v| v.path.clone()).collect()
}

/// The whole text of an error as a user could see it: Display, Debug and details.
fn everything(error: &BackendError) -> String {
    format!("{error}\n{error:?}\n{:?}", error.details)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn assert_invalid(error: &BackendError) {
    assert_eq!(error.code, ErrorCode::InvalidConfig, "{error}");
}

// ---------------------------------------------------------------- defaults

fn assert_defaults_except_pipeline(config: &Config) {
    assert_eq!(config.provider, "local");
    assert!(config.provider_config.is_empty());
    assert_eq!(config.stt_provider, None);
    assert_eq!(config.tts_provider, None);
    assert_eq!(config.vad_provider, None);
    assert_eq!(config.turn_detection_provider, None);
    assert_eq!(config.noise_cancellation_provider, None);
    assert_eq!(config.latency_target, ms(500));
    assert_eq!(config.timeout, Duration::from_secs(30));
    assert_eq!(config.max_retries, 3);
    assert_eq!(config.retry_delay, Duration::from_secs(1));
    assert_eq!(config.max_concurrent_sessions, 100);
    assert!(config.enable_tracing);
    assert!(config.enable_metrics);
    assert!(config.enable_logging);
    assert_eq!(config.log_level, LogLevel::Info);
    assert!(config.processors.is_empty());
}

#[test]
fn minimal_toml_gets_every_default() {
    let config = Config::from_toml_str(MINIMAL_S2S).unwrap();
    assert_defaults_except_pipeline(&config);
    assert_eq!(config.pipeline_type, PipelineType::S2s);
    assert_eq!(config.s2s_provider.as_deref(), Some("echo"));
    assert_eq!(config, base());
}

#[test]
fn config_new_gets_every_default_and_is_not_validated() {
    let config = Config::new("local");
    assert_defaults_except_pipeline(&config);
    assert_eq!(config.pipeline_type, PipelineType::SttTts);
    assert_eq!(config.s2s_provider, None);
    // The default stt_tts pipeline has no components yet.
    let error = config.validate().unwrap_err();
    assert_invalid(&error);
    assert_eq!(error.op, "config.validate");
    assert_eq!(paths(&error), set(&["stt_provider", "tts_provider"]));
}

#[test]
fn default_constants_match_the_defaults() {
    let config = Config::new("local");
    assert_eq!(
        config.latency_target,
        voice_backends::DEFAULT_LATENCY_TARGET
    );
    assert_eq!(config.timeout, voice_backends::DEFAULT_TIMEOUT);
    assert_eq!(config.max_retries, voice_backends::DEFAULT_MAX_RETRIES);
    assert_eq!(config.retry_delay, voice_backends::DEFAULT_RETRY_DELAY);
    assert_eq!(
        config.max_concurrent_sessions,
        voice_backends::DEFAULT_MAX_CONCURRENT_SESSIONS
    );
}

// ---------------------------------------------------------------- ranges

/// Checks a duration field: `min` and `max` accepted, 1ms outside either rejected.
fn check_duration_range(
    field: &str,
    set_field: fn(&mut Config, Duration),
    min: Duration,
    max: Duration,
) {
    for ok in [min, max] {
        let mut config = base();
        set_field(&mut config, ok);
        assert!(
            config.validate().is_ok(),
            "{field} = {ok:?} must be accepted: {:?}",
            config.violations()
        );
    }
    for bad in [min - ms(1), max + ms(1)] {
        let mut config = base();
        set_field(&mut config, bad);
        let error = config.validate().unwrap_err();
        assert_invalid(&error);
        assert_eq!(paths(&error), set(&[field]), "{field} = {bad:?}: {error}");
        assert!(error.details[field].contains("is out of range"), "{error}");
    }
}

#[test]
fn latency_target_range_edges() {
    check_duration_range(
        "latency_target",
        |c, d| c.latency_target = d,
        ms(100),
        Duration::from_secs(5),
    );
}

#[test]
fn timeout_range_edges() {
    check_duration_range(
        "timeout",
        |c, d| c.timeout = d,
        Duration::from_secs(1),
        Duration::from_secs(300),
    );
}

#[test]
fn retry_delay_range_edges() {
    check_duration_range(
        "retry_delay",
        |c, d| c.retry_delay = d,
        ms(100),
        Duration::from_secs(30),
    );
}

#[test]
fn max_retries_range_edges() {
    for ok in [0, 10] {
        let mut config = base();
        config.max_retries = ok;
        assert!(config.validate().is_ok(), "max_retries = {ok}");
    }
    let mut config = base();
    config.max_retries = 11;
    let error = config.validate().unwrap_err();
    assert_eq!(paths(&error), set(&["max_retries"]));
    assert_eq!(error.details["max_retries"], "11 is out of range 0..=10");
}

#[test]
fn max_concurrent_sessions_must_be_at_least_one() {
    let mut config = base();
    config.max_concurrent_sessions = 0;
    let error = config.validate().unwrap_err();
    assert_eq!(paths(&error), set(&["max_concurrent_sessions"]));
    for ok in [1, u32::MAX] {
        config.max_concurrent_sessions = ok;
        assert!(config.validate().is_ok(), "max_concurrent_sessions = {ok}");
    }
}

#[test]
fn range_messages_name_value_and_range_in_humantime() {
    let error = Config::from_toml_str(&format!(
        "{MINIMAL_S2S}latency_target = \"50ms\"\ntimeout = \"6m\""
    ))
    .unwrap_err();
    assert_invalid(&error);
    assert_eq!(
        error.details["latency_target"],
        "50ms is out of range 100ms..=5s"
    );
    assert_eq!(error.details["timeout"], "6m is out of range 1s..=5m");
    assert!(
        error
            .message
            .starts_with("2 config errors: latency_target: 50ms is out of range 100ms..=5s; "),
        "{}",
        error.message
    );
    assert!(
        error
            .message
            .contains("timeout: 6m is out of range 1s..=5m")
    );
}

// ---------------------------------------------------------------- cross-field rules

#[test]
fn a_config_naming_only_the_provider_says_how_to_run_without_stt_and_tts() {
    let error = Config::new("local").validate().unwrap_err();
    assert_eq!(paths(&error), set(&["stt_provider", "tts_provider"]));
    for field in ["stt_provider", "tts_provider"] {
        let message = &error.details[field];
        assert!(message.starts_with(&format!("pipeline_type = stt_tts requires {field}")));
        assert!(
            message.contains("pipeline_type = \"s2s\" and s2s_provider = \"echo\""),
            "{message}"
        );
    }
}

#[test]
fn stt_tts_requires_stt_and_tts_providers() {
    let mut config = Config::new("local");
    config.stt_provider = Some("whisper".into());
    let error = config.validate().unwrap_err();
    assert_eq!(paths(&error), set(&["tts_provider"]));
    assert_eq!(
        error.details["tts_provider"],
        "pipeline_type = stt_tts requires tts_provider"
    );

    let mut config = Config::new("local");
    config.tts_provider = Some("piper".into());
    let error = config.validate().unwrap_err();
    assert_eq!(paths(&error), set(&["stt_provider"]));
    assert_eq!(
        error.details["stt_provider"],
        "pipeline_type = stt_tts requires stt_provider"
    );

    config.stt_provider = Some("whisper".into());
    config.validate().unwrap();
}

#[test]
fn s2s_requires_s2s_provider() {
    let mut config = base();
    config.s2s_provider = None;
    let error = config.validate().unwrap_err();
    assert_eq!(paths(&error), set(&["s2s_provider"]));
    assert_eq!(
        error.details["s2s_provider"],
        "pipeline_type = s2s requires s2s_provider"
    );
}

#[test]
fn latency_target_must_not_exceed_timeout() {
    let mut config = base();
    config.latency_target = Duration::from_secs(5);
    config.timeout = Duration::from_secs(4);
    let error = config.validate().unwrap_err();
    assert_eq!(paths(&error), set(&["latency_target"]));
    assert!(
        error.details["latency_target"].contains("timeout"),
        "{error}"
    );

    config.timeout = Duration::from_secs(5);
    config
        .validate()
        .expect("latency_target == timeout is allowed");
}

#[test]
fn component_names_must_be_non_empty_without_whitespace() {
    type Setter = fn(&mut Config, Option<String>);
    let fields: [(&str, Setter); 6] = [
        ("stt_provider", |c, v| c.stt_provider = v),
        ("tts_provider", |c, v| c.tts_provider = v),
        ("s2s_provider", |c, v| c.s2s_provider = v),
        ("vad_provider", |c, v| c.vad_provider = v),
        ("turn_detection_provider", |c, v| {
            c.turn_detection_provider = v
        }),
        ("noise_cancellation_provider", |c, v| {
            c.noise_cancellation_provider = v
        }),
    ];
    for (field, set_field) in fields {
        for bad in ["", "  ", " silero", "silero\n"] {
            let mut config = base();
            config.stt_provider = Some("whisper".into());
            config.tts_provider = Some("piper".into());
            set_field(&mut config, Some(bad.to_owned()));
            assert_eq!(violation_paths(&config), set(&[field]), "{field} = {bad:?}");
        }
        let mut config = base();
        set_field(&mut config, Some("silero".into()));
        config.validate().unwrap();
    }
}

#[test]
fn provider_must_be_non_empty() {
    let mut config = base();
    config.provider = String::new();
    assert_eq!(violation_paths(&config), set(&["provider"]));
    let error =
        Config::from_toml_str("provider = \"\"\npipeline_type = \"s2s\"\ns2s_provider = \"e\"")
            .unwrap_err();
    assert_eq!(error.details["provider"], "must be non-empty");
}

#[test]
fn processor_names_non_empty_and_unique() {
    let config = Config::from_toml_str(&format!(
        "{MINIMAL_S2S}
[[processors]]
name = \"gain\"
[[processors]]
name = \"\"
[[processors]]
name = \"gain\"
order = 2
[[processors]]
name = \"denoise\"
"
    ));
    let error = config.unwrap_err();
    assert_eq!(
        paths(&error),
        set(&["processors[1].name", "processors[2].name"])
    );
    assert_eq!(error.details["processors[1].name"], "must be non-empty");
    assert_eq!(
        error.details["processors[2].name"],
        "duplicate processor name \"gain\" (also processors[0])"
    );
}

#[test]
fn validate_reports_every_violation_at_once() {
    let mut config = Config::new("");
    config.latency_target = ms(50);
    config.timeout = Duration::from_secs(600);
    config.max_retries = 11;
    config.retry_delay = ms(0);
    config.max_concurrent_sessions = 0;
    config.vad_provider = Some(" silero".into());
    config.processors = vec![
        ProcessorConfig {
            name: "gain".into(),
            order: 0,
            options: serde_json::json!({}),
        },
        ProcessorConfig {
            name: "gain".into(),
            order: 1,
            options: serde_json::json!({}),
        },
    ];
    config
        .provider_config
        .0
        .insert("api_key".into(), serde_json::json!(REDACTED));

    let expected = set(&[
        "provider",
        "latency_target",
        "timeout",
        "max_retries",
        "retry_delay",
        "max_concurrent_sessions",
        "stt_provider",
        "tts_provider",
        "vad_provider",
        "processors[1].name",
        "provider_config.api_key",
    ]);
    let violations = config.violations();
    assert_eq!(violations.len(), expected.len());
    assert_eq!(violation_paths(&config), expected);

    let error = config.validate().unwrap_err();
    assert_invalid(&error);
    assert_eq!(error.op, "config.validate");
    assert_eq!(paths(&error), expected);
    assert!(
        error.message.starts_with("11 config errors: "),
        "{}",
        error.message
    );
    for v in &violations {
        assert!(error.message.contains(&v.to_string()), "{} missing", v);
        assert_eq!(v.to_string(), format!("{}: {}", v.path, v.message));
    }
    // Display of Violations: one per line.
    assert_eq!(violations.to_string().lines().count(), expected.len());
    assert_eq!(violations.into_vec().len(), expected.len());
}

/// `validate` takes a shortcut for configs that plainly keep every rule; it
/// must agree with the full check (`violations`) on each rule's edges, and its
/// errors must be the full check's.
#[test]
fn validate_agrees_with_violations_on_every_rule_edge() {
    type Change = Box<dyn Fn(&mut Config)>;
    let processor = |name: &str, options: serde_json::Value| ProcessorConfig {
        name: name.into(),
        order: 0,
        options,
    };
    let mut changes: Vec<(String, Change)> = Vec::new();
    let mut add = |what: &str, change: Change| changes.push((what.to_owned(), change));
    add("nothing", Box::new(|_| {}));
    for (what, name) in [
        ("empty", ""),
        ("space", " local"),
        ("tab", "local\t"),
        ("newline", "\nlocal"),
        ("no-break space", "local\u{a0}"),
        ("non-ASCII, not space", "lokál"),
        ("non-ASCII first", "élan"),
        ("inner space", "lo cal"),
        ("one byte", "l"),
    ] {
        add(
            &format!("provider {what}"),
            Box::new(move |c| c.provider = name.to_owned()),
        );
        for field in 0..6 {
            add(
                &format!("component {field} {what}"),
                Box::new(move |c| {
                    c.stt_provider = Some("whisper".into());
                    c.tts_provider = Some("piper".into());
                    let value = Some(name.to_owned());
                    match field {
                        0 => c.stt_provider = value,
                        1 => c.tts_provider = value,
                        2 => c.s2s_provider = value,
                        3 => c.vad_provider = value,
                        4 => c.turn_detection_provider = value,
                        _ => c.noise_cancellation_provider = value,
                    }
                }),
            );
        }
    }
    type DurationField = fn(&mut Config) -> &mut Duration;
    let durations: [(&str, DurationField, u64, u64); 3] = [
        ("latency_target", |c| &mut c.latency_target, 100, 5_000),
        ("timeout", |c| &mut c.timeout, 1_000, 300_000),
        ("retry_delay", |c| &mut c.retry_delay, 100, 30_000),
    ];
    for (field, get, min, max) in durations {
        for value in [
            ms(0),
            Duration::from_nanos(1),
            ms(min) - Duration::from_nanos(1),
            ms(min),
            ms(min) + Duration::from_nanos(1),
            ms(max) - Duration::from_nanos(1),
            ms(max),
            ms(max) + Duration::from_nanos(1),
            Duration::from_secs((1 << 34) - 1),
            Duration::from_secs(1 << 34),
            Duration::from_secs(u64::MAX / 1_000_000_000 + 1),
            Duration::MAX,
        ] {
            add(
                &format!("{field} = {value:?}"),
                Box::new(move |c| {
                    // Keep latency_target <= timeout unless that is the point.
                    c.timeout = Duration::from_secs(300);
                    c.latency_target = ms(100);
                    *get(c) = value;
                }),
            );
        }
    }
    for (latency, timeout) in [(1_000, 1_000), (1_001, 1_000), (5_000, 4_999)] {
        add(
            &format!("latency_target {latency}ms, timeout {timeout}ms"),
            Box::new(move |c| {
                c.latency_target = ms(latency);
                c.timeout = ms(timeout);
            }),
        );
    }
    for retries in [0, 10, 11, u32::MAX] {
        add(
            &format!("max_retries {retries}"),
            Box::new(move |c| c.max_retries = retries),
        );
    }
    for sessions in [0, 1] {
        add(
            &format!("max_concurrent_sessions {sessions}"),
            Box::new(move |c| c.max_concurrent_sessions = sessions),
        );
    }
    for rate in [
        0.0,
        -0.0,
        -1.0,
        f64::from_bits(1),
        f64::MIN_POSITIVE,
        1.0,
        f64::MAX,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
    ] {
        add(
            &format!("rate_limit_per_second {rate}"),
            Box::new(move |c| c.rate_limit_per_second = rate),
        );
    }
    for burst in [0, 1] {
        add(
            &format!("rate_limit_burst {burst}"),
            Box::new(move |c| c.rate_limit_burst = burst),
        );
    }
    add(
        "stt_tts without components",
        Box::new(|c| c.pipeline_type = PipelineType::SttTts),
    );
    add(
        "stt_tts without tts",
        Box::new(|c| {
            c.pipeline_type = PipelineType::SttTts;
            c.stt_provider = Some("whisper".into());
        }),
    );
    add(
        "stt_tts complete",
        Box::new(|c| {
            c.pipeline_type = PipelineType::SttTts;
            c.stt_provider = Some("whisper".into());
            c.tts_provider = Some("piper".into());
        }),
    );
    add("s2s without s2s", Box::new(|c| c.s2s_provider = None));
    add(
        "processors plain",
        Box::new(move |c| {
            c.processors = vec![
                processor("gain", serde_json::json!({})),
                processor("denoise", serde_json::json!({ "level": 2 })),
            ]
        }),
    );
    add(
        "processors duplicated",
        Box::new(move |c| {
            c.processors = vec![
                processor("gain", serde_json::json!({})),
                processor("gain", serde_json::json!({})),
            ]
        }),
    );
    add(
        "processor with options not an object",
        Box::new(move |c| c.processors = vec![processor("gain", serde_json::json!([1]))]),
    );
    add(
        "processor with a padded name",
        Box::new(move |c| c.processors = vec![processor("gain ", serde_json::json!({}))]),
    );
    let section = |value: serde_json::Value| {
        voice_backends::ProviderSection(value.as_object().unwrap().clone())
    };
    for (what, component, options) in [
        ("used", "echo", serde_json::json!({ "pitch": 1 })),
        ("default vad", "energy", serde_json::json!({})),
        ("default turn detection", "silence", serde_json::json!({})),
        ("unused", "whisper", serde_json::json!({})),
        ("marker", "echo", serde_json::json!({ "api_key": REDACTED })),
        (
            "marker, not secret",
            "echo",
            serde_json::json!({ "note": REDACTED }),
        ),
    ] {
        let options = section(options);
        add(
            &format!("component options {what}"),
            Box::new(move |c| {
                c.components.insert(component.into(), options.clone());
            }),
        );
    }
    for (what, options) in [
        ("options", serde_json::json!({ "voice": "x" })),
        ("empty options", serde_json::json!({})),
    ] {
        let options = section(options);
        add(
            &format!("text-to-speech {what}"),
            Box::new(move |c| {
                c.pipeline_type = PipelineType::SttTts;
                c.stt_provider = Some("whisper".into());
                c.tts_provider = Some("piper".into());
                c.components.insert("piper".into(), options.clone());
            }),
        );
    }
    add(
        "component options for a processor",
        Box::new(move |c| {
            c.processors = vec![processor("gain", serde_json::json!({}))];
            c.components
                .insert("gain".into(), section(serde_json::json!({})));
        }),
    );
    for (what, value) in [
        (
            "plain",
            serde_json::json!({ "region": "eu", "api_key": "k" }),
        ),
        ("marker", serde_json::json!({ "api_key": REDACTED })),
        (
            "marker, not secret",
            serde_json::json!({ "note": REDACTED }),
        ),
        (
            "nested marker",
            serde_json::json!({ "auth": { "client_secret": REDACTED } }),
        ),
        (
            "marker in a list",
            serde_json::json!({ "keys": [{ "token": REDACTED }] }),
        ),
        (
            "nested plain",
            serde_json::json!({ "auth": { "client_secret": "s" }, "list": [1, "a"] }),
        ),
    ] {
        add(
            &format!("provider_config {what}"),
            Box::new(move |c| c.provider_config = section(value.clone())),
        );
    }

    let mut valid = 0;
    for (what, change) in &changes {
        let mut config = base();
        change(&mut config);
        let violations = config.violations();
        match config.validate() {
            Ok(()) => {
                assert!(
                    violations.is_empty(),
                    "{what}: validate passed {violations}"
                );
                valid += 1;
            }
            Err(error) => {
                let full = violations.into_error("config.validate");
                assert!(!full.details.is_empty(), "{what}: validate failed {error}");
                assert_eq!(
                    (error.op, error.code, &error.message, &error.details),
                    (full.op, full.code, &full.message, &full.details),
                    "{what}"
                );
            }
        }
    }
    // Both outcomes were exercised.
    assert!(valid > 20 && valid < changes.len() - 20, "{valid}");
}

#[test]
fn violations_into_error_keeps_every_entry() {
    let mut violations = voice_backends::Violations::default();
    assert!(violations.is_empty());
    violations.push("a", "first");
    violations.push("b", "second");
    violations.push("a", "third");
    assert_eq!(violations.len(), 3);
    assert_eq!(
        violations
            .iter()
            .map(|v| v.path.as_str())
            .collect::<Vec<_>>(),
        ["a", "b", "a"]
    );
    let error = violations.into_error("test.op");
    assert_eq!(error.op, "test.op");
    assert_eq!(error.code, ErrorCode::InvalidConfig);
    assert_eq!(
        error.message,
        "3 config errors: a: first; b: second; a: third"
    );
    assert_eq!(error.details["a"], "first; third");
    assert_eq!(error.details["b"], "second");
}

// ---------------------------------------------------------------- unknown keys

#[test]
fn unknown_top_level_key_rejected_in_toml_with_line_number() {
    let error =
        Config::from_toml_str(&format!("{MINIMAL_S2S}latency_targte = \"300ms\"\n")).unwrap_err();
    assert_invalid(&error);
    assert_eq!(error.op, "config.load");
    assert!(
        error.message.starts_with("invalid TOML: "),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("latency_targte"),
        "{}",
        error.message
    );
    // MINIMAL_S2S starts with a newline, then 3 lines: the typo is on line 5.
    assert!(error.message.contains("line 5"), "{}", error.message);
}

#[test]
fn unknown_processor_key_rejected_in_toml() {
    let error = Config::from_toml_str(&format!(
        "{MINIMAL_S2S}[[processors]]\nname = \"gain\"\nordre = 1\n"
    ))
    .unwrap_err();
    assert_invalid(&error);
    assert!(
        error.message.starts_with("invalid TOML: "),
        "{}",
        error.message
    );
    assert!(error.message.contains("ordre"), "{}", error.message);
    assert!(error.message.contains("line 7"), "{}", error.message);
}

#[test]
fn unknown_keys_rejected_in_yaml() {
    let top = "provider: local\npipeline_type: s2s\ns2s_provider: echo\nmax_retires: 2\n";
    let error = Config::from_yaml_str(top).unwrap_err();
    assert_invalid(&error);
    assert!(
        error.message.starts_with("invalid YAML: "),
        "{}",
        error.message
    );
    assert!(error.message.contains("max_retires"), "{}", error.message);
    assert!(error.message.contains("line 4"), "{}", error.message);

    let nested = "provider: local\npipeline_type: s2s\ns2s_provider: echo\nprocessors:\n  - name: gain\n    ordre: 1\n";
    let error = Config::from_yaml_str(nested).unwrap_err();
    assert!(
        error.message.starts_with("invalid YAML: "),
        "{}",
        error.message
    );
    assert!(error.message.contains("ordre"), "{}", error.message);
}

#[test]
fn unknown_keys_rejected_in_json() {
    let top =
        r#"{"provider": "local", "pipeline_type": "s2s", "s2s_provider": "echo", "tiemout": "3s"}"#;
    let error = Config::from_json_str(top).unwrap_err();
    assert_invalid(&error);
    assert!(
        error.message.starts_with("invalid JSON: "),
        "{}",
        error.message
    );
    assert!(error.message.contains("tiemout"), "{}", error.message);
    assert!(error.message.contains("line 1"), "{}", error.message);

    let nested = r#"{"provider": "local", "pipeline_type": "s2s", "s2s_provider": "echo",
        "processors": [{"name": "gain", "ordre": 1}]}"#;
    let error = Config::from_json_str(nested).unwrap_err();
    assert!(error.message.contains("ordre"), "{}", error.message);
}

#[test]
fn wrong_types_and_syntax_errors_are_invalid_config() {
    for (toml, needle) in [
        (
            format!("{MINIMAL_S2S}max_retries = \"many\""),
            "line 5, column 15: max_retries: ",
        ),
        (format!("{MINIMAL_S2S}timeout = \"soon\""), "line 5"),
        (format!("{MINIMAL_S2S}pipeline_type = \"s2"), "line"),
        ("pipeline_type = \"s2s\"".to_owned(), "provider"),
    ] {
        let error = Config::from_toml_str(&toml).unwrap_err();
        assert_invalid(&error);
        assert!(
            error.message.starts_with("invalid TOML: "),
            "{}",
            error.message
        );
        assert!(
            error.message.contains(needle),
            "{needle}: {}",
            error.message
        );
    }
    let error =
        Config::from_toml_str(&format!("{MINIMAL_S2S}pipeline_type = \"speech\"")).unwrap_err();
    assert_invalid(&error);
}

#[test]
fn parse_errors_name_key_path_and_position_in_every_format() {
    let toml = format!("{MINIMAL_S2S}[[processors]]\nname = \"gain\"\norder = \"first\"\n");
    let error = Config::from_toml_str(&toml).unwrap_err();
    assert!(
        error
            .message
            .starts_with("invalid TOML: line 7, column 9: processors[0].order: "),
        "{}",
        error.message
    );
    assert!(
        error.details.contains_key("processors[0].order"),
        "{error:?}"
    );

    let yaml = "provider: local\nprocessors:\n  - name: gain\n    order: first\n";
    let error = Config::from_yaml_str(yaml).unwrap_err();
    assert!(
        error
            .message
            .starts_with("invalid YAML: line 4, column 12: processors[0].order: "),
        "{}",
        error.message
    );

    let json =
        "{\"provider\": \"local\",\n \"processors\": [{\"name\": \"gain\", \"order\": \"first\"}]}";
    let error = Config::from_json_str(json).unwrap_err();
    // serde_json points just past the offending value.
    assert!(
        error
            .message
            .starts_with("invalid JSON: line 2, column 49: processors[0].order: "),
        "{}",
        error.message
    );
}

#[test]
fn parse_errors_never_echo_secret_values() {
    let error =
        Config::from_toml_str("provider = \"x\"\nprovider_config = \"sk-WHOLE-999\"").unwrap_err();
    assert!(error.message.contains("line 2"), "{}", error.message);
    assert!(!everything(&error).contains("sk-WHOLE-999"), "{error}");
    let error = Config::from_yaml_str("provider: x\nprovider_config: sk-WHOLE-999\n").unwrap_err();
    assert!(!everything(&error).contains("sk-WHOLE-999"), "{error}");
    let error =
        SessionConfig::from_json_str(r#"{"user_id": "u", "auth_token": 9990001}"#).unwrap_err();
    assert_eq!(paths(&error), set(&["auth_token"]));
    assert!(!everything(&error).contains("9990001"), "{error}");
}

/// A key given twice in the provider's section, a component's options or a
/// processor's options is an error in JSON and YAML, as in TOML, at any depth,
/// and the values are not shown.
#[test]
fn keys_given_twice_in_option_tables_are_errors_in_every_format() {
    let json = [
        r#"{"provider":"local","pipeline_type":"s2s","s2s_provider":"echo","provider_config":{"url":"ws://a/","url":"ws://b/"}}"#,
        r#"{"provider":"local","pipeline_type":"s2s","s2s_provider":"echo","provider_config":{"nested":{"api_key":"sk-DUP-1","api_key":"sk-DUP-2"}}}"#,
        r#"{"provider":"local","pipeline_type":"s2s","s2s_provider":"echo","components":{"silence":{"min_silence":"1s"},"silence":{}}}"#,
        r#"{"provider":"local","pipeline_type":"s2s","s2s_provider":"echo","processors":[{"name":"g","options":{"db":1,"db":2}}]}"#,
    ];
    for (text, twice) in json.iter().zip(["url", "api_key", "silence", "db"]) {
        let e = Config::from_json_str(text).unwrap_err();
        assert_invalid(&e);
        assert!(e.message.contains(&format!("`{twice}` given twice")), "{e}");
        assert!(!everything(&e).contains("sk-DUP"), "{e}");
    }
    let yaml = "provider: local\npipeline_type: s2s\ns2s_provider: echo\nprovider_config:\n  region: eu\n  region: us\n";
    let e = Config::from_yaml_str(yaml).unwrap_err();
    assert!(e.message.contains("`region` given twice"), "{e}");
    // Distinct keys are fine, and nested tables keep their values.
    let ok = Config::from_json_str(
        r#"{"provider":"local","pipeline_type":"s2s","s2s_provider":"echo","provider_config":{"a":{"b":[1,{"c":true}]},"d":null}}"#,
    )
    .unwrap();
    assert_eq!(
        serde_json::Value::Object(ok.provider_config.0),
        serde_json::json!({"a": {"b": [1, {"c": true}]}, "d": null})
    );
}

/// Options for the text-to-speech component would never reach it: an error.
#[test]
fn text_to_speech_options_are_refused() {
    let mut config = base();
    config.pipeline_type = PipelineType::SttTts;
    config.stt_provider = Some("whisper".into());
    config.tts_provider = Some("piper".into());
    config.components.insert(
        "piper".into(),
        serde_json::from_value(serde_json::json!({"voice": "amy"})).unwrap(),
    );
    assert_eq!(violation_paths(&config), set(&["components.piper"]));
    let e = config.validate().unwrap_err();
    assert!(
        e.details["components.piper"].contains("take no options"),
        "{e}"
    );
    // The same name as a processor too: its options go there.
    config.processors.push(ProcessorConfig {
        name: "piper".into(),
        order: 0,
        options: serde_json::json!({}),
    });
    assert!(
        violation_paths(&config).is_empty(),
        "{:?}",
        config.violations()
    );
}

/// Error columns count characters, whatever their size in bytes.
#[test]
fn json_error_columns_count_characters() {
    let ascii = Config::from_json_str(r#"{"provider": "abcd", "timeout": 5}"#).unwrap_err();
    let wide = Config::from_json_str(r#"{"provider": "ローカル", "timeout": 5}"#).unwrap_err();
    let column = |e: &BackendError| {
        let at = e.message.find("column ").expect("a column");
        e.message[at..].split(':').next().unwrap().to_owned()
    };
    assert_eq!(column(&ascii), column(&wide), "{ascii} / {wide}");
    let empty = Config::from_json_str("").unwrap_err();
    assert!(!empty.message.contains("column 0"), "{empty}");
}

#[test]
fn toml_error_does_not_quote_the_source_line() {
    // The parser's own rendering would print the offending line, secret included.
    let error = Config::from_toml_str(&format!("{MINIMAL_S2S}apikey = \"sk-live-TOPSECRET\"\n"))
        .unwrap_err();
    assert!(error.message.contains("apikey"), "{}", error.message);
    assert!(
        !everything(&error).contains("TOPSECRET"),
        "{}",
        everything(&error)
    );
}

// ---------------------------------------------------------------- formats

const FULL_TOML: &str = r#"
provider = "local"
pipeline_type = "stt_tts"
stt_provider = "whisper"
tts_provider = "piper"
vad_provider = "silero"
turn_detection_provider = "eou"
noise_cancellation_provider = "rnnoise"
latency_target = "500ms"
timeout = "1m 30s"
max_retries = 5
retry_delay = "30s"
max_concurrent_sessions = 7
enable_tracing = false
enable_metrics = true
enable_logging = false
log_level = "debug"

[provider_config]
region = "eu"
rate = 16000

[[processors]]
name = "gain"
order = 2
options = { db = 3 }

[[processors]]
name = "denoise"
"#;

const FULL_YAML: &str = r#"
provider: local
pipeline_type: stt_tts
stt_provider: whisper
tts_provider: piper
vad_provider: silero
turn_detection_provider: eou
noise_cancellation_provider: rnnoise
latency_target: 500ms
timeout: 1m 30s
max_retries: 5
retry_delay: 30s
max_concurrent_sessions: 7
enable_tracing: false
enable_metrics: true
enable_logging: false
log_level: debug
provider_config:
  region: eu
  rate: 16000
processors:
  - name: gain
    order: 2
    options:
      db: 3
  - name: denoise
"#;

const FULL_JSON: &str = r#"{
  "provider": "local",
  "pipeline_type": "stt_tts",
  "stt_provider": "whisper",
  "tts_provider": "piper",
  "vad_provider": "silero",
  "turn_detection_provider": "eou",
  "noise_cancellation_provider": "rnnoise",
  "latency_target": "500ms",
  "timeout": "1m 30s",
  "max_retries": 5,
  "retry_delay": "30s",
  "max_concurrent_sessions": 7,
  "enable_tracing": false,
  "enable_metrics": true,
  "enable_logging": false,
  "log_level": "debug",
  "provider_config": {"region": "eu", "rate": 16000},
  "processors": [
    {"name": "gain", "order": 2, "options": {"db": 3}},
    {"name": "denoise"}
  ]
}"#;

fn expected_full() -> Config {
    Config::builder("local")
        .pipeline_type(PipelineType::SttTts)
        .stt_provider("whisper")
        .tts_provider("piper")
        .vad_provider("silero")
        .turn_detection_provider("eou")
        .noise_cancellation_provider("rnnoise")
        .latency_target(ms(500))
        .timeout(Duration::from_secs(90))
        .max_retries(5)
        .retry_delay(Duration::from_secs(30))
        .max_concurrent_sessions(7)
        .enable_tracing(false)
        .enable_metrics(true)
        .enable_logging(false)
        .log_level(LogLevel::Debug)
        .provider_option("region", "eu")
        .provider_option("rate", 16000)
        .processor_config(ProcessorConfig {
            name: "gain".into(),
            order: 2,
            options: serde_json::json!({"db": 3}),
        })
        .processor("denoise", 0)
        .build()
        .unwrap()
}

#[test]
fn same_config_from_toml_yaml_and_json() {
    let from_toml = Config::from_toml_str(FULL_TOML).unwrap();
    let from_yaml = Config::from_yaml_str(FULL_YAML).unwrap();
    let from_json = Config::from_json_str(FULL_JSON).unwrap();
    assert_eq!(from_toml, expected_full());
    assert_eq!(from_yaml, from_toml);
    assert_eq!(from_json, from_toml);
    assert_eq!(from_toml.latency_target, ms(500));
    assert_eq!(from_toml.timeout, Duration::from_secs(90));
    assert_eq!(from_toml.retry_delay, Duration::from_secs(30));
}

#[test]
fn same_config_from_path_with_each_extension() {
    let dir = tempfile::tempdir().unwrap();
    for (file, text) in [
        ("c.toml", FULL_TOML),
        ("c.TOML", FULL_TOML),
        ("c.yaml", FULL_YAML),
        ("c.yml", FULL_YAML),
        ("c.json", FULL_JSON),
    ] {
        let path = dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        assert_eq!(Config::from_path(&path).unwrap(), expected_full(), "{file}");
    }
}

#[test]
fn from_path_errors() {
    let dir = tempfile::tempdir().unwrap();

    let ini = dir.path().join("c.ini");
    std::fs::write(&ini, FULL_TOML).unwrap();
    let error = Config::from_path(&ini).unwrap_err();
    assert_invalid(&error);
    assert!(error.message.contains("\"ini\""), "{}", error.message);
    assert!(
        error.message.contains("toml, yaml, yml, json"),
        "{}",
        error.message
    );

    let none = dir.path().join("config");
    std::fs::write(&none, FULL_TOML).unwrap();
    let error = Config::from_path(&none).unwrap_err();
    assert!(error.message.contains("no extension"), "{}", error.message);

    let missing = dir.path().join("missing.toml");
    let error = Config::from_path(&missing).unwrap_err();
    assert_invalid(&error);
    assert!(error.message.contains("missing.toml"), "{}", error.message);
    let source = std::error::Error::source(&error).expect("io error as source");
    assert!(source.downcast_ref::<std::io::Error>().is_some());

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, format!("{MINIMAL_S2S}extra = 1\n")).unwrap();
    let error = Config::from_path(&bad).unwrap_err();
    assert!(
        error.message.starts_with("invalid TOML: "),
        "{}",
        error.message
    );
    assert!(error.message.contains("bad.toml"), "{}", error.message);
    assert!(error.message.contains("extra"), "{}", error.message);

    let invalid = dir.path().join("invalid.yaml");
    std::fs::write(&invalid, "provider: local\nmax_retries: 20\n").unwrap();
    let error = Config::from_path(&invalid).unwrap_err();
    // The components the pipeline needs depend on the provider: creating
    // the backend checks them, not loading.
    assert_eq!(paths(&error), set(&["max_retries"]));
}

/// Why the `local` provider refuses to make a backend of `config`: an
/// `InvalidConfig` error.
async fn local_backend_error(config: &Config) -> BackendError {
    let Err(error) = voice_backends::registry().create("local", config).await else {
        panic!("the backend is refused");
    };
    assert_eq!(error.code, ErrorCode::InvalidConfig, "{error}");
    error
}

/// Options a component refuses fail the backend's creation, not every
/// session later.
#[tokio::test]
async fn component_options_are_checked_when_the_backend_is_made() {
    let config = Config::from_toml_str(
        "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\n\
         [components.silence]\nmin_speech = \"1h\"\n",
    )
    .unwrap();
    let error = local_backend_error(&config).await;
    assert_eq!(paths(&error), set(&["components.silence"]));
    assert!(error.message.contains("min_speech"), "{error}");

    // The speech-to-speech component's options too, without opening a stream.
    let config = Config::from_toml_str(
        "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\n\
         [components.echo]\nmax_turn = \"1h\"\n",
    )
    .unwrap();
    let error = local_backend_error(&config).await;
    assert_eq!(paths(&error), set(&["components.echo"]));
    assert!(error.message.contains("max_turn"), "{error}");
}

/// Loading checks what holds for any provider; the pipeline's components are
/// the provider's to require, when the backend is created.
#[tokio::test]
async fn loading_leaves_the_pipeline_components_to_the_provider() {
    let config = Config::from_toml_str("provider = \"local\"\n").unwrap();
    let error = local_backend_error(&config).await;
    assert_eq!(paths(&error), set(&["stt_provider", "tts_provider"]));
}

#[test]
fn saved_config_loads_back_equal() {
    let config = expected_full();
    let toml = config.to_toml_string().unwrap();
    assert_eq!(Config::from_toml_str(&toml).unwrap(), config, "{toml}");
    let json = config.to_json_string().unwrap();
    assert_eq!(Config::from_json_str(&json).unwrap(), config, "{json}");
    assert!(toml.contains("timeout = \"1m 30s\""), "{toml}");
}

// ---------------------------------------------------------------- secrets

#[test]
fn secret_never_shows_itself() {
    let secret = Secret::new("hunter2");
    assert_eq!(format!("{secret:?}"), REDACTED);
    assert_eq!(secret.to_string(), REDACTED);
    assert_eq!(
        serde_json::to_string(&secret).unwrap(),
        format!("\"{REDACTED}\"")
    );
    assert_eq!(secret.expose(), "hunter2");
    let back: Secret = serde_json::from_str("\"hunter2\"").unwrap();
    assert_eq!(back, secret);
}

fn config_with_secrets() -> Config {
    Config::builder("local")
        .pipeline_type(PipelineType::S2s)
        .s2s_provider("echo")
        .provider_option("api_key", "sk-APIKEY-111")
        .provider_option("token", "tok-TOKEN-222")
        .provider_option(
            "auth",
            serde_json::json!({"client_secret": "cs-NESTED-333"}),
        )
        .provider_option("region", "eu")
        .build()
        .unwrap()
}

const SECRETS: [&str; 3] = ["sk-APIKEY-111", "tok-TOKEN-222", "cs-NESTED-333"];

fn assert_no_secret(text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{secret} leaked in: {text}");
    }
}

#[test]
fn provider_secrets_absent_from_debug_and_saved_output() {
    let config = config_with_secrets();
    assert_eq!(config.provider_config.0["api_key"], "sk-APIKEY-111");

    let debug = format!("{config:?}");
    assert_no_secret(&debug);
    assert!(debug.contains(REDACTED) && debug.contains("eu"), "{debug}");

    let toml = config.to_toml_string().unwrap();
    assert_no_secret(&toml);
    assert!(toml.contains(REDACTED), "{toml}");

    let json = config.to_json_string().unwrap();
    assert_no_secret(&json);
    assert!(json.contains(REDACTED), "{json}");
}

/// Secrets in places whose key does not say so: under a secret key holding
/// an object, in URLs (user name, password, `token=` query values), under
/// `Authorization`, in processor options and in a session's connection URL.
#[test]
fn secrets_in_objects_urls_processors_and_session_urls_are_redacted() {
    let hidden = [
        "sk-NESTED-1",
        "pw-URL-2",
        "tk-QUERY-3",
        "ab-AUTHZ-4",
        "sk-PROC-5",
        "pw-PROC-6",
    ];
    let mut config = Config::builder("local")
        .pipeline_type(PipelineType::S2s)
        .s2s_provider("echo")
        .provider_option("api_keys", serde_json::json!({"openai": "sk-NESTED-1"}))
        .provider_option(
            "url",
            "wss://bob:pw-URL-2@bot.example/ws?token=tk-QUERY-3&room=7",
        )
        .provider_option(
            "headers",
            serde_json::json!({"Authorization": "Bearer ab-AUTHZ-4"}),
        )
        .build()
        .unwrap();
    config.processors.push(ProcessorConfig {
        name: "denoise".into(),
        order: 1,
        options: serde_json::json!({"api_key": "sk-PROC-5", "endpoint": "https://u:pw-PROC-6@x.example/"}),
    });
    let shown = [
        format!("{config:?}"),
        config.to_toml_string().unwrap(),
        config.to_json_string().unwrap(),
    ];
    for text in &shown {
        for secret in hidden {
            assert!(!text.contains(secret), "{secret} shows in:\n{text}");
        }
        // What is not secret stays readable.
        assert!(
            text.contains("bot.example") && text.contains("room=7"),
            "{text}"
        );
        assert!(
            text.contains("denoise") && text.contains("x.example"),
            "{text}"
        );
    }
    // The values themselves are kept.
    assert_eq!(
        config.provider_config.0["url"],
        "wss://bob:pw-URL-2@bot.example/ws?token=tk-QUERY-3&room=7"
    );

    let session = SessionConfig::new("u")
        .with_connection_url("wss://ann:pw-SESS-7@host.example/s?api_key=k-SESS-8&x=1");
    for text in [format!("{session:?}"), session.to_json_string().unwrap()] {
        assert!(
            !text.contains("pw-SESS-7") && !text.contains("k-SESS-8"),
            "{text}"
        );
        assert!(
            text.contains("host.example") && text.contains("x=1"),
            "{text}"
        );
    }
    assert!(session.connection_url.unwrap().contains("pw-SESS-7"));

    // A URL without a scheme: what parses as one may be a user name.
    let bad = SessionConfig::new("u").with_connection_url("apikey:s3cr3t-SCHEME@bot:8765/ws");
    let e = bad.violations().into_result("t").unwrap_err();
    assert!(
        !everything(&e).contains("s3cr3t") && !everything(&e).contains("apikey"),
        "{e}"
    );
}

#[test]
fn provider_secrets_absent_from_validation_errors() {
    let mut config = config_with_secrets();
    config.latency_target = ms(1);
    config.max_retries = 99;
    let error = config.validate().unwrap_err();
    assert_eq!(paths(&error), set(&["latency_target", "max_retries"]));
    assert_no_secret(&everything(&error));
    assert_no_secret(&config.violations().to_string());

    let built = Config::builder("local")
        .provider_option("api_key", "sk-APIKEY-111")
        .build()
        .unwrap_err();
    assert_no_secret(&everything(&built));
}

#[test]
fn redaction_marker_is_rejected() {
    // A saved (redacted) config cannot be loaded back without the real secrets.
    let toml = config_with_secrets().to_toml_string().unwrap();
    let error = Config::from_toml_str(&toml).unwrap_err();
    assert_invalid(&error);
    assert_eq!(
        paths(&error),
        set(&[
            "provider_config.api_key",
            "provider_config.token",
            "provider_config.auth.client_secret"
        ])
    );
    assert_eq!(
        error.details["provider_config.api_key"],
        "is the redaction marker \"[redacted]\"; supply the real secret"
    );

    // A non-secret key may hold the marker text.
    let mut config = base();
    config
        .provider_config
        .0
        .insert("greeting".into(), serde_json::json!(REDACTED));
    config.validate().unwrap();
}

#[test]
fn session_auth_token_is_redacted() {
    let session = SessionConfig::new("user-1").with_auth_token("bearer-SESSION-444");
    assert_eq!(
        session.auth_token.as_ref().unwrap().expose(),
        "bearer-SESSION-444"
    );
    let debug = format!("{session:?}");
    assert!(!debug.contains("SESSION-444"), "{debug}");
    let json = session.to_json_string().unwrap();
    assert!(!json.contains("SESSION-444"), "{json}");
    assert!(json.contains(REDACTED), "{json}");
    let serde = serde_json::to_string(&session).unwrap();
    assert!(!serde.contains("SESSION-444"), "{serde}");

    // Loading the saved form back is rejected: the marker is not a token.
    let error = SessionConfig::from_json_str(&json).unwrap_err();
    assert_eq!(paths(&error), set(&["auth_token"]));
    assert!(error.details["auth_token"].contains("redaction marker"));
}

// ---------------------------------------------------------------- session config

#[test]
fn session_config_rules() {
    SessionConfig::new("u").validate().unwrap();
    SessionConfig::new("u")
        .with_connection_url("wss://example.test/rtc?room=1")
        .validate()
        .unwrap();

    let session = SessionConfig::new("")
        .with_connection_url("ftp://alice:pw-URL-555@example.test/x")
        .with_auth_token("")
        .with_pipeline(PipelineOverride {
            stt_provider: Some(String::new()),
            ..PipelineOverride::default()
        });
    let error = session.validate().unwrap_err();
    assert_invalid(&error);
    assert_eq!(error.op, "session_config.validate");
    assert_eq!(
        paths(&error),
        set(&[
            "user_id",
            "connection_url",
            "auth_token",
            "pipeline.stt_provider"
        ])
    );
    assert!(
        error.details["connection_url"].contains("\"ftp\""),
        "{error}"
    );
    assert!(!everything(&error).contains("pw-URL-555"), "{error}");

    let error = SessionConfig::new("u")
        .with_connection_url("not a url")
        .validate()
        .unwrap_err();
    assert_eq!(paths(&error), set(&["connection_url"]));
}

#[test]
fn session_config_from_json() {
    let session = SessionConfig::from_json_str(
        r#"{"user_id": "u1", "transport": "webrtc", "connection_url": "https://h.test",
            "auth_token": "t", "pipeline": {"pipeline_type": "s2s", "s2s_provider": "echo"},
            "metadata": {"plan": "pro"}}"#,
    )
    .unwrap();
    assert_eq!(session.user_id, "u1");
    assert_eq!(session.transport, Transport::Webrtc);
    assert_eq!(session.auth_token.as_ref().unwrap().expose(), "t");
    assert_eq!(session.metadata["plan"], "pro");

    let error = SessionConfig::from_json_str(r#"{"user_id": "u1", "usr": "x"}"#).unwrap_err();
    assert_invalid(&error);
    assert!(
        error.message.starts_with("invalid JSON: "),
        "{}",
        error.message
    );
    assert!(error.message.contains("usr"), "{}", error.message);

    let error =
        SessionConfig::from_json_str(r#"{"user_id": "u1", "pipeline": {"s2s": "x"}}"#).unwrap_err();
    assert!(error.message.contains("s2s"), "{}", error.message);

    let error = SessionConfig::from_json_str(r#"{"user_id": ""}"#).unwrap_err();
    assert_eq!(paths(&error), set(&["user_id"]));
}

#[test]
fn session_builder_sets_every_field() {
    let agent = agent_fn(|_turn| async { Ok(AgentReply::text("hi")) });
    let session = SessionConfig::new("u1")
        .with_transport(Transport::Webrtc)
        .with_connection_url("wss://h.test/s")
        .with_auth_token(Secret::new("tok"))
        .with_pipeline(PipelineOverride {
            pipeline_type: Some(PipelineType::S2s),
            ..PipelineOverride::default()
        })
        .with_metadata("plan", "pro")
        .with_metadata("seats", 3)
        .with_agent(agent);
    assert_eq!(session.user_id, "u1");
    assert_eq!(session.transport, Transport::Webrtc);
    assert_eq!(session.connection_url.as_deref(), Some("wss://h.test/s"));
    assert_eq!(session.auth_token.as_ref().unwrap().expose(), "tok");
    assert_eq!(
        session.pipeline.as_ref().unwrap().pipeline_type,
        Some(PipelineType::S2s)
    );
    assert_eq!(session.metadata["plan"], "pro");
    assert_eq!(session.metadata["seats"], 3);
    assert!(session.agent.is_some());
    assert!(format!("{session:?}").contains("<agent>"));
    session.validate().unwrap();
    assert_eq!(SessionConfig::new("u").transport, Transport::Websocket);
}

// ---------------------------------------------------------------- resolve_pipeline

fn stt_tts_base() -> Config {
    Config::builder("local")
        .stt_provider("whisper")
        .tts_provider("piper")
        .build()
        .unwrap()
}

#[test]
fn resolve_pipeline_without_override_is_the_base() {
    let resolved = SessionConfig::new("u")
        .resolve_pipeline(&stt_tts_base())
        .unwrap();
    assert_eq!(
        resolved,
        ResolvedPipeline {
            pipeline_type: PipelineType::SttTts,
            stt_provider: Some("whisper".into()),
            tts_provider: Some("piper".into()),
            s2s_provider: None,
        }
    );
}

#[test]
fn resolve_pipeline_switch_to_s2s_needs_s2s_provider() {
    let to_s2s = PipelineOverride {
        pipeline_type: Some(PipelineType::S2s),
        ..PipelineOverride::default()
    };
    let error = SessionConfig::new("u")
        .with_pipeline(to_s2s.clone())
        .resolve_pipeline(&stt_tts_base())
        .unwrap_err();
    assert_invalid(&error);
    assert_eq!(error.op, "session_config.resolve_pipeline");
    assert_eq!(paths(&error), set(&["pipeline.s2s_provider"]));

    let resolved = SessionConfig::new("u")
        .with_pipeline(PipelineOverride {
            s2s_provider: Some("gpt-realtime".into()),
            ..to_s2s
        })
        .resolve_pipeline(&stt_tts_base())
        .unwrap();
    assert_eq!(
        resolved,
        ResolvedPipeline {
            pipeline_type: PipelineType::S2s,
            stt_provider: Some("whisper".into()),
            tts_provider: Some("piper".into()),
            s2s_provider: Some("gpt-realtime".into()),
        }
    );
}

#[test]
fn resolve_pipeline_switch_to_stt_tts_needs_both() {
    let error = SessionConfig::new("u")
        .with_pipeline(PipelineOverride {
            pipeline_type: Some(PipelineType::SttTts),
            stt_provider: Some("whisper".into()),
            ..PipelineOverride::default()
        })
        .resolve_pipeline(&base())
        .unwrap_err();
    assert_eq!(paths(&error), set(&["pipeline.tts_provider"]));

    // Overriding only a component keeps the base's type.
    let resolved = SessionConfig::new("u")
        .with_pipeline(PipelineOverride {
            tts_provider: Some("elevenlabs".into()),
            ..PipelineOverride::default()
        })
        .resolve_pipeline(&stt_tts_base())
        .unwrap();
    assert_eq!(resolved.tts_provider.as_deref(), Some("elevenlabs"));
    assert_eq!(resolved.stt_provider.as_deref(), Some("whisper"));
}

// ---------------------------------------------------------------- builder

#[test]
fn builder_chain_builds_a_validated_config() {
    let config = expected_full();
    assert_eq!(config.provider, "local");
    assert_eq!(config.stt_provider.as_deref(), Some("whisper"));
    assert_eq!(
        config.noise_cancellation_provider.as_deref(),
        Some("rnnoise")
    );
    assert_eq!(config.max_concurrent_sessions, 7);
    assert!(!config.enable_tracing);
    assert_eq!(config.log_level, LogLevel::Debug);
    assert_eq!(config.processors.len(), 2);
    assert_eq!(config.processors[1].name, "denoise");
    assert_eq!(config.provider_config.0["rate"], 16000);

    let mut section = serde_json::Map::new();
    section.insert("only".into(), serde_json::json!(true));
    let replaced = Config::builder("local")
        .pipeline_type(PipelineType::S2s)
        .s2s_provider("echo")
        .provider_option("dropped", 1)
        .provider_config(section)
        .build()
        .unwrap();
    assert_eq!(replaced.provider_config.0.len(), 1);
    assert_eq!(replaced.provider_config.0["only"], true);
}

#[test]
fn builder_reports_bad_fields() {
    let error = Config::builder("local")
        .pipeline_type(PipelineType::S2s)
        .s2s_provider("echo")
        .max_retries(11)
        .latency_target(ms(99))
        .build()
        .unwrap_err();
    assert_invalid(&error);
    assert_eq!(error.op, "config.build");
    assert_eq!(paths(&error), set(&["max_retries", "latency_target"]));

    // A provider option that cannot be serialized to JSON (non-string map keys).
    let unserializable: BTreeMap<Vec<u8>, u8> = BTreeMap::from([(vec![1], 1)]);
    let error = Config::builder("local")
        .pipeline_type(PipelineType::S2s)
        .s2s_provider("echo")
        .provider_option("weights", unserializable)
        .build()
        .unwrap_err();
    assert_eq!(paths(&error), set(&["provider_config.weights"]));
}

// ---------------------------------------------------------------- env

#[test]
fn env_overrides_every_kind_of_field() {
    let mut config = base();
    config
        .apply_env(
            "VB",
            vec![
                ("VB_PROVIDER", "pipecat"),
                ("VB_PIPELINE_TYPE", "stt_tts"),
                ("VB_STT_PROVIDER", "whisper"),
                ("VB_TTS_PROVIDER", "piper"),
                ("VB_S2S_PROVIDER", ""),
                ("VB_VAD_PROVIDER", "silero"),
                ("VB_LATENCY_TARGET", "250ms"),
                ("VB_TIMEOUT", "1m 30s"),
                ("VB_RETRY_DELAY", "2s"),
                ("VB_MAX_RETRIES", "5"),
                ("VB_MAX_CONCURRENT_SESSIONS", "8"),
                ("VB_ENABLE_METRICS", "false"),
                ("VB_ENABLE_TRACING", "false"),
                ("VB_LOG_LEVEL", "warn"),
                ("VB_PROCESSORS", r#"[{"name": "gain", "order": 1}]"#),
                ("VB_RATE_LIMIT_PER_SECOND", "2.5"),
                ("VB_RATE_LIMIT_BURST", "50"),
                ("VB_COMPONENTS", r#"{"silence": {"min_silence": "700ms"}}"#),
            ],
        )
        .unwrap();
    assert_eq!(config.provider, "pipecat");
    assert_eq!(config.pipeline_type, PipelineType::SttTts);
    assert_eq!(config.stt_provider.as_deref(), Some("whisper"));
    assert_eq!(config.tts_provider.as_deref(), Some("piper"));
    assert_eq!(config.s2s_provider, None);
    assert_eq!(config.vad_provider.as_deref(), Some("silero"));
    assert_eq!(config.latency_target, ms(250));
    assert_eq!(config.timeout, Duration::from_secs(90));
    assert_eq!(config.retry_delay, Duration::from_secs(2));
    assert_eq!(config.max_retries, 5);
    assert_eq!(config.max_concurrent_sessions, 8);
    assert!(!config.enable_metrics);
    assert!(!config.enable_tracing);
    assert!(config.enable_logging);
    assert_eq!(config.log_level, LogLevel::Warn);
    assert_eq!(config.processors.len(), 1);
    assert_eq!(config.processors[0].name, "gain");
    assert_eq!(config.rate_limit_per_second, 2.5);
    assert_eq!(config.rate_limit_burst, 50);
    assert_eq!(
        config.components["silence"].0["min_silence"],
        serde_json::json!("700ms")
    );
}

#[test]
fn env_prefix_must_be_able_to_match() {
    for (prefix, suggested) in [("vb", "\"VB\""), ("my-app", "\"MY_APP\""), ("9X", "\"9X\"")] {
        let e = base()
            .apply_env(prefix, [("VB_TIMEOUT", "10s")])
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig);
        assert!(e.message.contains("upper-case letters"), "{e}");
        assert!(e.message.contains(suggested), "{e}");
    }
    let mut config = base();
    config.apply_env("VB_", [("VB_TIMEOUT", "10s")]).unwrap();
    assert_eq!(config.timeout, Duration::from_secs(10));
}

#[test]
fn env_typo_is_rejected_and_config_unchanged() {
    let mut config = base();
    let error = config
        .apply_env(
            "VB",
            [
                ("VB_LATENCY_TARGTE", "250ms"),
                ("VB_MAX_RETRIES", "lots"),
                ("VB_ENABLE_METRICS", "yes"),
                ("VB_TIMEOUT", "2s"),
            ],
        )
        .unwrap_err();
    assert_invalid(&error);
    assert_eq!(error.op, "config.env");
    assert_eq!(
        paths(&error),
        set(&["VB_LATENCY_TARGTE", "VB_MAX_RETRIES", "VB_ENABLE_METRICS"])
    );
    let typo = &error.details["VB_LATENCY_TARGTE"];
    assert!(typo.contains("did you mean VB_LATENCY_TARGET"), "{typo}");
    assert!(typo.contains("VB_MAX_CONCURRENT_SESSIONS"), "{typo}");
    assert!(
        error.details["VB_MAX_RETRIES"].contains("\"lots\""),
        "{error}"
    );
    // Nothing was applied, not even the valid VB_TIMEOUT.
    assert_eq!(config, base());
}

#[test]
fn env_result_is_validated() {
    let mut config = base();
    let error = config
        .apply_env(
            "VB",
            [("VB_TIMEOUT", "10m"), ("VB_PIPELINE_TYPE", "stt_tts")],
        )
        .unwrap_err();
    assert_eq!(paths(&error), set(&["timeout"]));
    assert_eq!(config, base());
}

#[test]
fn env_secret_values_never_appear_in_errors() {
    let mut config = base();
    let error = config
        .apply_env(
            "VB",
            [
                ("VB_PROVIDER_CONFIG_API_KEY", "sk-ENV-TYPO-666"),
                ("VB_API_TOKEN", "tok-ENV-UNKNOWN-777"),
            ],
        )
        .unwrap_err();
    let text = everything(&error);
    assert!(
        !text.contains("ENV-TYPO-666") && !text.contains("ENV-UNKNOWN-777"),
        "{text}"
    );
    assert!(
        error.details["VB_PROVIDER_CONFIG_API_KEY"]
            .contains("did you mean VB_PROVIDER_CONFIG__API_KEY"),
        "{text}"
    );

    // A secret that is set fine, with another variable failing validation.
    let error = config
        .apply_env(
            "VB",
            [
                ("VB_PROVIDER_CONFIG__API_KEY", "sk-ENV-OK-888"),
                ("VB_MAX_RETRIES", "50"),
            ],
        )
        .unwrap_err();
    assert_eq!(paths(&error), set(&["max_retries"]));
    assert!(!everything(&error).contains("ENV-OK-888"));
}

#[test]
fn env_ignores_other_prefixes() {
    let mut config = base();
    config
        .apply_env(
            "VB",
            [
                ("OTHER_MAX_RETRIES", "9"),
                ("VBX_TIMEOUT", "nonsense"),
                ("VB", "x"),
                ("vb_max_retries", "9"),
                ("PATH", "/usr/bin"),
            ],
        )
        .unwrap();
    assert_eq!(config, base());

    // A trailing underscore on the prefix is optional.
    config.apply_env("VB_", [("VB_MAX_RETRIES", "2")]).unwrap();
    assert_eq!(config.max_retries, 2);
}

#[test]
fn env_provider_config_nesting() {
    let mut config = base();
    config
        .provider_config
        .0
        .insert("kept".into(), serde_json::json!("yes"));
    config
        .apply_env(
            "VB",
            [
                ("VB_PROVIDER_CONFIG__AUDIO__RATE", "8000"),
                ("VB_PROVIDER_CONFIG__API_KEY", "sk-live"),
                (
                    "VB_PROVIDER_CONFIG",
                    r#"{"region": "eu", "audio": {"rate": 16000, "channels": 1}}"#,
                ),
            ],
        )
        .unwrap();
    assert_eq!(
        serde_json::Value::Object(config.provider_config.0.clone()),
        serde_json::json!({
            "kept": "yes",
            "region": "eu",
            "audio": {"rate": "8000", "channels": 1},
            "api_key": "sk-live",
        })
    );

    let error = config
        .apply_env(
            "VB",
            [
                ("VB_PROVIDER_CONFIG", "[1, 2]"),
                ("VB_PROVIDER_CONFIG__REGION__ZONE", "a"),
                ("VB_PROVIDER_CONFIG__", "x"),
            ],
        )
        .unwrap_err();
    assert_eq!(
        paths(&error),
        set(&[
            "VB_PROVIDER_CONFIG",
            "VB_PROVIDER_CONFIG__REGION__ZONE",
            "VB_PROVIDER_CONFIG__"
        ])
    );
    let error = config
        .apply_env("VB", [("VB_PROVIDER_CONFIG", "{not json")])
        .unwrap_err();
    assert_eq!(paths(&error), set(&["VB_PROVIDER_CONFIG"]));
}

#[test]
fn from_env_vars_requires_provider() {
    let config = Config::from_env_vars(
        "APP",
        [
            ("APP_PROVIDER", "local"),
            ("APP_PIPELINE_TYPE", "s2s"),
            ("APP_S2S_PROVIDER", "echo"),
        ],
    )
    .unwrap();
    assert_eq!(config, base());

    let error = Config::from_env_vars("APP", [("APP_PIPELINE_TYPE", "s2s")]).unwrap_err();
    assert_invalid(&error);
    assert!(paths(&error).contains("APP_PROVIDER"), "{error}");

    let error = Config::from_env_vars("", [("X", "y")]).unwrap_err();
    assert_invalid(&error);
}

#[test]
fn only_from_env_and_apply_process_env_read_the_process_environment() {
    const PREFIX: &str = "VBTEST_PROCESS_ENV_7F3A";
    // SAFETY: no other test touches variables with this prefix, and nothing in
    // this test binary reads the environment through libc concurrently.
    unsafe {
        std::env::set_var(format!("{PREFIX}_PROVIDER"), "local");
        std::env::set_var(format!("{PREFIX}_PIPELINE_TYPE"), "s2s");
        std::env::set_var(format!("{PREFIX}_S2S_PROVIDER"), "echo");
        std::env::set_var(format!("{PREFIX}_MAX_RETRIES"), "7");
    }

    let mut config = base();
    config
        .apply_env(PREFIX, Vec::<(String, String)>::new())
        .unwrap();
    assert_eq!(config, base(), "apply_env must not read the process env");

    let from_env = Config::from_env(PREFIX).unwrap();
    assert_eq!(from_env.max_retries, 7);
    assert_eq!(from_env.s2s_provider.as_deref(), Some("echo"));

    config.apply_process_env(PREFIX).unwrap();
    assert_eq!(config.max_retries, 7);

    // Loading a file never reads it either.
    assert_eq!(Config::from_toml_str(MINIMAL_S2S).unwrap().max_retries, 3);
}

// ---------------------------------------------------------------- parse_provider_config

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct MyProviderConfig {
    region: String,
    api_key: String,
    #[serde(default)]
    rate: u32,
    #[serde(default)]
    audio: Option<MyAudio>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct MyAudio {
    channels: u8,
}

fn with_section(section: serde_json::Value) -> Config {
    let mut config = base();
    config.provider_config.0 = section.as_object().unwrap().clone();
    config
}

#[test]
fn parse_provider_config_good() {
    let config = with_section(serde_json::json!({
        "region": "eu", "api_key": "sk-1", "rate": 16000, "audio": {"channels": 2}
    }));
    let parsed: MyProviderConfig = parse_provider_config(&config).unwrap();
    assert_eq!(
        parsed,
        MyProviderConfig {
            region: "eu".into(),
            api_key: "sk-1".into(),
            rate: 16000,
            audio: Some(MyAudio { channels: 2 }),
        }
    );
}

#[test]
fn parse_provider_config_unknown_key() {
    let config = with_section(serde_json::json!({"region": "eu", "api_key": "k", "regoin": "us"}));
    let error = parse_provider_config::<MyProviderConfig>(&config).unwrap_err();
    assert_invalid(&error);
    assert_eq!(error.op, "provider.validate_config");
    assert_eq!(paths(&error), set(&["provider_config.regoin"]));
    assert!(error.message.contains("regoin"), "{}", error.message);

    let nested = with_section(serde_json::json!({
        "region": "eu", "api_key": "k", "audio": {"channels": 1, "chanels": 2}
    }));
    let error = parse_provider_config::<MyProviderConfig>(&nested).unwrap_err();
    assert_eq!(paths(&error), set(&["provider_config.audio.chanels"]));
}

#[test]
fn parse_provider_config_missing_and_wrong_type() {
    let missing = with_section(serde_json::json!({"api_key": "k"}));
    let error = parse_provider_config::<MyProviderConfig>(&missing).unwrap_err();
    assert_eq!(paths(&error), set(&["provider_config.region"]));

    let wrong = with_section(serde_json::json!({"region": "eu", "api_key": "k", "rate": "fast"}));
    let error = parse_provider_config::<MyProviderConfig>(&wrong).unwrap_err();
    assert_eq!(paths(&error), set(&["provider_config.rate"]));
    assert!(
        error.details["provider_config.rate"].contains("invalid type"),
        "{error}"
    );
}

#[test]
fn parse_provider_config_never_echoes_a_secret() {
    let config = with_section(serde_json::json!({"region": "eu", "api_key": 987654321}));
    let error = parse_provider_config::<MyProviderConfig>(&config).unwrap_err();
    assert_invalid(&error);
    assert_eq!(paths(&error), set(&["provider_config.api_key"]));
    assert_eq!(
        error.details["provider_config.api_key"],
        "invalid value (redacted)"
    );
    assert!(
        !everything(&error).contains("987654321"),
        "{}",
        everything(&error)
    );
}

// ---------------------------------------------------------------- damaged files

/// Any damage to a config file gives a config or an `InvalidConfig` error, and
/// no error ever shows a secret's value (nor any 5 characters of it).
mod damaged {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "sk-Zq8Vw3Lp9Xr2Tn7";

    fn toml_file() -> String {
        format!(
            "{MINIMAL_S2S}latency_target = \"300ms\"\n[provider_config]\nregion = \"eu\"\napi_key = \"{SECRET}\"\n"
        )
    }

    fn yaml_file() -> String {
        format!(
            "provider: local\npipeline_type: s2s\ns2s_provider: echo\nlatency_target: 300ms\nprovider_config:\n  region: eu\n  api_key: {SECRET}\n"
        )
    }

    fn json_file() -> String {
        format!(
            r#"{{"provider": "local", "pipeline_type": "s2s", "s2s_provider": "echo", "latency_target": "300ms", "provider_config": {{"region": "eu", "api_key": "{SECRET}"}}}}"#
        )
    }

    fn session_file() -> String {
        format!(r#"{{"user_id": "u-1", "auth_token": "{SECRET}", "metadata": {{"team": "a"}}}}"#)
    }

    /// One change to a file: at a position (a fraction of its length).
    #[derive(Clone, Debug)]
    enum Damage {
        Delete(f64),
        Insert(f64, char),
        Replace(f64, char),
        Truncate(f64),
    }

    fn damage() -> impl Strategy<Value = Damage> {
        // Characters that matter to the three syntaxes, and a few that do not.
        let ch = prop::sample::select(vec![
            '"', '\'', '=', ':', '{', '}', '[', ']', ',', '\n', ' ', '#', '\\', '-', 'x', '1', '.',
            'é', '\t',
        ]);
        let at = 0.0..1.0f64;
        prop_oneof![
            at.clone().prop_map(Damage::Delete),
            (at.clone(), ch.clone()).prop_map(|(a, c)| Damage::Insert(a, c)),
            (at.clone(), ch).prop_map(|(a, c)| Damage::Replace(a, c)),
            at.prop_map(Damage::Truncate),
        ]
    }

    fn apply(text: &str, damages: &[Damage]) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        let index = |chars: &Vec<char>, at: f64| ((chars.len() as f64) * at) as usize;
        for d in damages {
            match *d {
                Damage::Delete(at) if !chars.is_empty() => {
                    let i = index(&chars, at).min(chars.len() - 1);
                    chars.remove(i);
                }
                Damage::Insert(at, c) => {
                    let i = index(&chars, at).min(chars.len());
                    chars.insert(i, c);
                }
                Damage::Replace(at, c) if !chars.is_empty() => {
                    let i = index(&chars, at).min(chars.len() - 1);
                    chars[i] = c;
                }
                Damage::Truncate(at) => chars.truncate(index(&chars, at)),
                _ => {}
            }
        }
        chars.into_iter().collect()
    }

    /// The error's whole text shows no 5 characters of the secret.
    fn assert_hides_secret(error: &BackendError, damaged: &str) {
        let shown = everything(error);
        let chars: Vec<char> = SECRET.chars().collect();
        for window in chars.windows(5) {
            let piece: String = window.iter().collect();
            assert!(
                !shown.contains(&piece),
                "the error shows {piece:?} of the secret\nfile:\n{damaged}\nerror:\n{shown}"
            );
        }
    }

    fn check(
        damaged: &str,
        key: &str,
        load: impl Fn(&str) -> Result<(), BackendError>,
    ) -> Result<(), TestCaseError> {
        // A damaged key name no longer marks the value as a secret.
        prop_assume!(damaged.contains(key));
        if let Err(error) = load(damaged) {
            prop_assert_eq!(error.code, ErrorCode::InvalidConfig, "{}", error);
            prop_assert!(!error.message.is_empty());
            assert_hides_secret(&error, damaged);
        }
        Ok(())
    }

    /// 400 cases, or `PROPTEST_CASES` for a longer search; about a third of
    /// the damages hit the secret's key name and are set aside.
    fn config() -> ProptestConfig {
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(400);
        ProptestConfig {
            cases,
            max_global_rejects: cases.saturating_mul(2),
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn toml(damages in prop::collection::vec(damage(), 1..4)) {
            check(&apply(&toml_file(), &damages), "api_key", |t| Config::from_toml_str(t).map(drop))?;
        }

        #[test]
        fn yaml(damages in prop::collection::vec(damage(), 1..4)) {
            check(&apply(&yaml_file(), &damages), "api_key", |t| Config::from_yaml_str(t).map(drop))?;
        }

        #[test]
        fn json(damages in prop::collection::vec(damage(), 1..4)) {
            check(&apply(&json_file(), &damages), "api_key", |t| Config::from_json_str(t).map(drop))?;
        }

        #[test]
        fn session_json(damages in prop::collection::vec(damage(), 1..4)) {
            check(&apply(&session_file(), &damages), "auth_token", |t| {
                SessionConfig::from_json_str(t).map(drop)
            })?;
        }
    }

    /// A damaged file can run a secret key into its value, which is then read
    /// as one unknown key: the error names the key up to where it stops being
    /// a plain name.
    #[test]
    fn a_secret_key_run_into_its_value_is_cut_where_it_stops_being_a_name() {
        let session = format!(r#"{{"user_id": "u-1", "auth_token: {SECRET}", "metadata": {{"team"#);
        let error = SessionConfig::from_json_str(&session).unwrap_err();
        assert_hides_secret(&error, &session);
        assert!(
            error
                .message
                .contains("auth_token…: unknown field `auth_token…`"),
            "{error}"
        );

        let config = format!(
            r#"{{"provider": "local", "pipeline_type": "s2s", "s2s_provider": "echo", "api_key = {SECRET}": 1}}"#
        );
        let error = Config::from_json_str(&config).unwrap_err();
        assert_hides_secret(&error, &config);
        assert!(
            error.message.contains("unknown field `api_key…`"),
            "{error}"
        );

        let twice = format!(
            r#"{{"provider": "local", "pipeline_type": "s2s", "s2s_provider": "echo",
                "provider_config": {{"token {SECRET}": 1, "token {SECRET}": 2}}}}"#
        );
        let error = Config::from_json_str(&twice).unwrap_err();
        assert_hides_secret(&error, &twice);
        assert!(
            error.message.contains("key `token…` given twice"),
            "{error}"
        );

        // An unclosed quote in YAML swallows the lines below it into a value
        // the parser then quotes.
        let yaml = format!(
            "provider: local\npipeline_type: s2s\ns2s_provider: echo\nlatency_target: '00ms\nprovider_config:\n  region: eu\n  api_key: {SECRET}'\n"
        );
        let error = Config::from_yaml_str(&yaml).unwrap_err();
        assert_hides_secret(&error, &yaml);
        assert!(
            error
                .message
                .contains(r#"string "00ms provider_config: region: eu api_key…""#),
            "{error}"
        );

        // Damage can move a secret to where a key goes.
        let moved = format!(
            "provider: local\npipeline_type: s2s\ns2s_provider: echo\nprovider_config:\n  api_key:\n{SECRET}:\n"
        );
        let error = Config::from_yaml_str(&moved).unwrap_err();
        assert_hides_secret(&error, &moved);
        assert!(error.message.contains("unknown field `sk-…`"), "{error}");

        // Plain names are shown whole, secret-looking or not.
        let plain = r#"{"provider": "local", "pipeline_type": "s2s", "s2s_provider": "echo", "api_key_2": 1, "a b": 2}"#;
        let error = Config::from_json_str(plain).unwrap_err();
        assert!(
            error.message.contains("unknown field `api_key_2`"),
            "{error}"
        );
    }

    /// The undamaged files load, so the properties above start from valid input.
    #[test]
    fn undamaged_files_load() {
        for (name, text) in [
            ("toml", toml_file()),
            ("yaml", yaml_file()),
            ("json", json_file()),
        ] {
            let config = match name {
                "toml" => Config::from_toml_str(&text),
                "yaml" => Config::from_yaml_str(&text),
                _ => Config::from_json_str(&text),
            }
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(config.provider_config.0["api_key"], SECRET, "{name}");
            assert!(!format!("{config:?}").contains(SECRET), "{name}");
        }
        let session = SessionConfig::from_json_str(&session_file()).unwrap();
        assert_eq!(session.auth_token.unwrap().expose(), SECRET);
    }
}

// ---------------------------------------------------------------- secret-looking values in errors

/// Secret-looking values, each with the part of it no error may show.
const SECRET_LOOKING: [(&str, &str); 5] = [
    ("sk_live_abcdefghijklmnopqrstuvwx", "abcdefghijklmnop"),
    ("Bearer abcdefghijklmnopqrstu", "abcdefghijklmnopqrstu"),
    (
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
        "eyJhbGciOiJIUzI1NiJ9",
    ),
    ("wss://bot:hunter2hunter2@example.com/ws", "hunter2hunter2"),
    ("Zq8Vw3Lp9Xr2Tn7Ks4", "Zq8Vw3Lp9Xr2Tn7Ks4"),
];

/// `error`'s message, `Display` and `Debug` (details included) show neither
/// `value` nor its `hidden` part.
fn assert_hides(error: &BackendError, value: &str, hidden: &str) {
    for (what, shown) in [
        ("to_string", error.to_string()),
        ("Debug", format!("{error:?}")),
        ("message", error.message.clone()),
    ] {
        assert!(
            !shown.contains(value) && !shown.contains(hidden),
            "{what} shows the secret-looking {value:?}:\n{shown}"
        );
    }
}

#[test]
fn env_overlay_errors_never_quote_a_secret_looking_value() {
    for field in [
        "VB_LATENCY_TARGET",
        "VB_TIMEOUT",
        "VB_MAX_RETRIES",
        "VB_RATE_LIMIT_PER_SECOND",
        "VB_ENABLE_TRACING",
        "VB_LOG_LEVEL",
        "VB_PIPELINE_TYPE",
    ] {
        for (value, hidden) in SECRET_LOOKING {
            let error = base().apply_env("VB", [(field, value)]).unwrap_err();
            assert_invalid(&error);
            assert!(error.details.contains_key(field), "{error}");
            assert_hides(&error, value, hidden);
        }
        // A harmless wrong value is still quoted.
        let error = base().apply_env("VB", [(field, "fast")]).unwrap_err();
        assert!(error.message.contains("\"fast\""), "{error}");
    }

    // A duration whose unit is the secret: the parser's own message quotes it.
    let error = base()
        .apply_env("VB", [("VB_TIMEOUT", "5 sk_live_abcdefghijklmnop")])
        .unwrap_err();
    assert_hides(&error, "sk_live_abcdefghijklmnop", "abcdefghijklmnop");
    let error = base()
        .apply_env("VB", [("VB_TIMEOUT", "5 parsecs")])
        .unwrap_err();
    assert!(error.message.contains("\"5 parsecs\""), "{error}");
    assert!(error.message.contains("\"parsecs\""), "{error}");

    // Processors that do not parse are reported with serde's message, which
    // quotes what it met.
    for (value, hidden) in SECRET_LOOKING {
        let processors = serde_json::json!([{ "name": "x", value: 1 }]).to_string();
        let error = base()
            .apply_env("VB", [("VB_PROCESSORS", processors.as_str())])
            .unwrap_err();
        assert_hides(&error, value, hidden);
    }
    let error = base()
        .apply_env("VB", [("VB_PROCESSORS", r#"[{"name": "x", "ordr": 1}]"#)])
        .unwrap_err();
    assert!(error.message.contains("`ordr`"), "{error}");
}

#[test]
fn validation_errors_never_quote_a_secret_looking_name() {
    type Field = fn(&mut Config) -> &mut Option<String>;
    let fields: [(&str, Field); 6] = [
        ("stt_provider", |c| &mut c.stt_provider),
        ("tts_provider", |c| &mut c.tts_provider),
        ("s2s_provider", |c| &mut c.s2s_provider),
        ("vad_provider", |c| &mut c.vad_provider),
        ("turn_detection_provider", |c| {
            &mut c.turn_detection_provider
        }),
        ("noise_cancellation_provider", |c| {
            &mut c.noise_cancellation_provider
        }),
    ];
    for (value, hidden) in SECRET_LOOKING {
        // A name padded with whitespace is quoted to show the padding.
        let mut config = base();
        config.provider = format!(" {value}");
        let error = config.validate().unwrap_err();
        assert!(error.details.contains_key("provider"), "{error}");
        assert_hides(&error, value, hidden);
        for (path, field) in fields {
            let mut config = base();
            *field(&mut config) = Some(format!("{value} "));
            let error = config.validate().unwrap_err();
            assert!(error.details.contains_key(path), "{error}");
            assert_hides(&error, value, hidden);

            // Options for a component the config does not use list the
            // names it does use.
            let mut config = base();
            *field(&mut config) = Some(value.to_owned());
            config
                .components
                .insert("unused".into(), section(serde_json::json!({"x": 1})));
            let error = config.validate().unwrap_err();
            assert!(error.details.contains_key("components.unused"), "{error}");
            assert_hides(&error, value, hidden);
        }

        // Options under a secret-looking component name.
        let mut config = base();
        config
            .components
            .insert(value.to_owned(), section(serde_json::json!({"x": 1})));
        let error = config.validate().unwrap_err();
        assert_hides(&error, value, hidden);

        // A processor name given twice.
        let mut config = base();
        for _ in 0..2 {
            config.processors.push(ProcessorConfig {
                name: value.to_owned(),
                order: 0,
                options: serde_json::json!({}),
            });
        }
        let error = config.validate().unwrap_err();
        assert_hides(&error, value, hidden);

        // A session's pipeline override.
        let mut session = SessionConfig::new("u-1");
        session.pipeline = Some(PipelineOverride {
            s2s_provider: Some(format!(" {value}")),
            ..PipelineOverride::default()
        });
        let error = session.validate().unwrap_err();
        assert_hides(&error, value, hidden);
        let error = session.resolve_pipeline(&base()).unwrap_err();
        assert_hides(&error, value, hidden);
    }

    // Harmless names are still quoted whole.
    let mut config = base();
    config.s2s_provider = Some(" pipcat".into());
    let error = config.validate().unwrap_err();
    assert!(error.message.contains("\" pipcat\""), "{error}");
    let mut config = base();
    config
        .components
        .insert("pipcat".into(), section(serde_json::json!({"x": 1})));
    let error = config.validate().unwrap_err();
    assert!(error.message.contains("options for \"pipcat\""), "{error}");
    assert!(error.details.contains_key("components.pipcat"), "{error}");
}

fn section(value: serde_json::Value) -> voice_backends::ProviderSection {
    voice_backends::ProviderSection(value.as_object().unwrap().clone())
}

#[test]
fn parse_errors_never_quote_a_secret_looking_value() {
    for (value, hidden) in SECRET_LOOKING {
        let quoted = serde_json::to_string(value).unwrap();
        // A value of the wrong type, a duration that does not parse, and the
        // value where a key goes.
        let toml = [
            format!("{MINIMAL_S2S}max_retries = {quoted}\n"),
            format!("{MINIMAL_S2S}latency_target = {quoted}\n"),
            format!("{MINIMAL_S2S}{quoted} = 1\n"),
            format!("{MINIMAL_S2S}[provider_config]\n{quoted} = 1\n{quoted} = 2\n"),
        ];
        for text in &toml {
            let error = Config::from_toml_str(text).unwrap_err();
            assert_invalid(&error);
            assert_hides(&error, value, hidden);
        }
        let yaml_head = "provider: local\npipeline_type: s2s\ns2s_provider: echo\n";
        let yaml = [
            format!("{yaml_head}max_retries: {quoted}\n"),
            format!("{yaml_head}latency_target: {quoted}\n"),
            format!("{yaml_head}{quoted}: 1\n"),
            format!("{yaml_head}pipeline_type: {quoted}\n"),
        ];
        for text in &yaml {
            let error = Config::from_yaml_str(text).unwrap_err();
            assert_invalid(&error);
            assert_hides(&error, value, hidden);
        }
        let json_head = r#"{"provider": "local", "pipeline_type": "s2s", "s2s_provider": "echo""#;
        let json = [
            format!("{json_head}, \"max_retries\": {quoted}}}"),
            format!("{json_head}, \"latency_target\": {quoted}}}"),
            format!("{json_head}, {quoted}: 1}}"),
            format!("{json_head}, \"log_level\": {quoted}}}"),
        ];
        for text in &json {
            let error = Config::from_json_str(text).unwrap_err();
            assert_invalid(&error);
            assert_hides(&error, value, hidden);
        }
        let session = [
            format!(r#"{{"user_id": "u-1", "transport": {quoted}}}"#),
            format!(r#"{{"user_id": "u-1", {quoted}: 1}}"#),
        ];
        for text in &session {
            let error = SessionConfig::from_json_str(text).unwrap_err();
            assert_invalid(&error);
            assert_hides(&error, value, hidden);
        }
    }

    // Harmless wrong values and keys are still quoted.
    let error =
        Config::from_toml_str(&format!("{MINIMAL_S2S}max_retries = \"many\"\n")).unwrap_err();
    assert!(error.message.contains("\"many\""), "{error}");
    let error = Config::from_yaml_str(
        "provider: local\npipeline_type: s2s\ns2s_provider: echo\nlatency_target: soon\n",
    )
    .unwrap_err();
    assert!(error.message.contains("\"soon\""), "{error}");
    let error = Config::from_json_str(
        r#"{"provider": "local", "pipeline_type": "s2s", "s2s_provider": "echo", "regoin": 1}"#,
    )
    .unwrap_err();
    assert!(error.message.contains("`regoin`"), "{error}");
}

/// `voice-backends validate` quotes the registry's message for a name that
/// is not registered.
#[cfg(feature = "cli")]
#[test]
fn cli_validate_never_quotes_a_secret_looking_name() {
    use voice_backends::cli::{ConfigFormat, validate_str};

    let shown = |text: &str| {
        validate_str(text, ConfigFormat::Toml, "c.toml")
            .iter()
            .map(|d| format!("{d}\n{d:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let configs = |name: &str| {
        let name = serde_json::to_string(name).unwrap();
        [
            format!("provider = {name}\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\n"),
            format!("provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = {name}\n"),
            format!("provider = \"local\"\nstt_provider = {name}\ntts_provider = \"echo\"\n"),
            format!("provider = \"local\"\nstt_provider = \"echo\"\ntts_provider = {name}\n"),
            format!("{MINIMAL_S2S}vad_provider = {name}\n"),
            format!("{MINIMAL_S2S}turn_detection_provider = {name}\n"),
            format!("{MINIMAL_S2S}noise_cancellation_provider = {name}\n"),
            format!("{MINIMAL_S2S}[[processors]]\nname = {name}\n"),
        ]
    };
    for (value, hidden) in SECRET_LOOKING {
        for text in configs(value) {
            let out = shown(&text);
            assert!(out.contains("named"), "{text}\n{out}");
            assert!(
                !out.contains(value) && !out.contains(hidden),
                "{text}\n{out}"
            );
        }
    }
    for text in configs("pipcat") {
        let out = shown(&text);
        assert!(out.contains("named \"pipcat\""), "{text}\n{out}");
    }
}

// ---------------------------------------------------------------- nesting depth

use voice_backends::MAX_NESTING_DEPTH;

const YAML_HEAD: &str = "provider: local\npipeline_type: s2s\ns2s_provider: echo\n";

/// `error` refuses nesting past the limit, naming it and the line.
fn assert_too_deep(error: &BackendError, format: &str, line: usize) {
    assert_invalid(error);
    assert!(
        error
            .message
            .starts_with(&format!("invalid {format}: line {line}, column ")),
        "{error}"
    );
    assert!(
        error.message.contains(&format!(
            "nested deeper than the limit of {MAX_NESTING_DEPTH} levels"
        )),
        "{error}"
    );
}

#[test]
fn deeply_nested_yaml_is_refused_before_it_is_parsed() {
    let n = 40_000;
    // Flow style: unclosed, closed, and flow mappings.
    let error = Config::from_yaml_str(&format!("a: {}", "[".repeat(n))).unwrap_err();
    assert_too_deep(&error, "YAML", 1);
    let closed = format!(
        "{YAML_HEAD}provider_config:\n  a: {}{}\n",
        "[".repeat(n),
        "]".repeat(n)
    );
    assert_too_deep(&Config::from_yaml_str(&closed).unwrap_err(), "YAML", 5);
    let maps = format!("{YAML_HEAD}provider_config: {}1\n", "{a: ".repeat(n));
    assert_too_deep(&Config::from_yaml_str(&maps).unwrap_err(), "YAML", 4);
    // A flow collection over many lines: the one on line 6 is level 3.
    let lines = format!("{YAML_HEAD}provider_config:\n  a:\n{}", "  [\n".repeat(n));
    assert_too_deep(
        &Config::from_yaml_str(&lines).unwrap_err(),
        "YAML",
        6 + MAX_NESTING_DEPTH - 3 + 1,
    );

    // Block style: sequences on one line, and mappings by indentation.
    let error = Config::from_yaml_str(&format!("{}x\n", "- ".repeat(n))).unwrap_err();
    assert_too_deep(&error, "YAML", 1);
    let seqs = format!(
        "{YAML_HEAD}provider_config:\n  a:\n    {}x\n",
        "- ".repeat(n)
    );
    assert_too_deep(&Config::from_yaml_str(&seqs).unwrap_err(), "YAML", 6);
    let mut indented = format!("{YAML_HEAD}provider_config:\n");
    for i in 0..200 {
        indented.push_str(&format!("{}k{i}:\n", "  ".repeat(i + 1)));
    }
    // provider_config's map is level 2, so `k{i}` opens level i + 2.
    assert_too_deep(
        &Config::from_yaml_str(&indented).unwrap_err(),
        "YAML",
        5 + MAX_NESTING_DEPTH - 1,
    );
}

#[test]
fn deeply_nested_toml_and_json_are_refused_the_same_way() {
    let n = 40_000;
    let toml = format!("{MINIMAL_S2S}[provider_config]\na = {}", "[".repeat(n));
    assert_too_deep(&Config::from_toml_str(&toml).unwrap_err(), "TOML", 6);
    let tables = format!("{MINIMAL_S2S}[provider_config]\na = {}", "{ b = ".repeat(n));
    assert_too_deep(&Config::from_toml_str(&tables).unwrap_err(), "TOML", 6);
    let header = format!("{MINIMAL_S2S}[provider_config{}]\n", ".a".repeat(200));
    assert_too_deep(&Config::from_toml_str(&header).unwrap_err(), "TOML", 5);
    let dotted = format!(
        "{MINIMAL_S2S}[provider_config]\na{} = 1\n",
        ".a".repeat(200)
    );
    assert_too_deep(&Config::from_toml_str(&dotted).unwrap_err(), "TOML", 6);

    let json = format!(
        "{{\"provider\": \"local\",\n\"provider_config\": {{\"a\": {}",
        "[".repeat(n)
    );
    assert_too_deep(&Config::from_json_str(&json).unwrap_err(), "JSON", 2);
    let session = format!(
        "{{\"user_id\": \"u-1\", \"metadata\": {{\"a\": {}",
        "{\"b\": ".repeat(n)
    );
    let error = SessionConfig::from_json_str(&session).unwrap_err();
    assert_eq!(error.op, "session_config.load");
    assert_too_deep(&error, "JSON", 1);

    // The environment's JSON values too.
    let deep = format!("{{\"a\": {}", "[".repeat(n));
    let error = base()
        .apply_env("VB", [("VB_PROVIDER_CONFIG", deep.as_str())])
        .unwrap_err();
    assert!(
        error.details["VB_PROVIDER_CONFIG"].contains(&format!(
            "nested deeper than the limit of {MAX_NESTING_DEPTH} levels"
        )),
        "{error}"
    );
}

/// `voice-backends validate` refuses deep nesting before the parser sees it.
#[cfg(feature = "cli")]
#[test]
fn cli_validate_refuses_deep_nesting() {
    use voice_backends::cli::{ConfigFormat, validate_str};

    let yaml = format!("a: {}", "[".repeat(40_000));
    let found = validate_str(&yaml, ConfigFormat::Yaml, "deep.yaml");
    assert_eq!(found.len(), 1, "{found:?}");
    let shown = found[0].to_string();
    assert!(shown.starts_with("deep.yaml:1:"), "{shown}");
    assert!(
        shown.contains(&format!(
            "nested deeper than the limit of {MAX_NESTING_DEPTH} levels"
        )),
        "{shown}"
    );
}

#[test]
fn nesting_up_to_the_limit_loads() {
    // `provider_config` (and a session's `metadata`) is level 2, so `inner`
    // lists inside it reach the limit exactly.
    let inner = MAX_NESTING_DEPTH - 2;
    let depth_of = |value: &serde_json::Value| {
        let mut depth = 0;
        let mut at = value;
        while let Some(first) = at.as_array().and_then(|a| a.first()) {
            depth += 1;
            at = first;
        }
        depth
    };
    for extra in [0, 1] {
        let n = inner + extra;
        let yaml_flow = format!(
            "{YAML_HEAD}provider_config:\n  a: {}1{}\n",
            "[".repeat(n),
            "]".repeat(n)
        );
        let yaml_block = format!(
            "{YAML_HEAD}provider_config:\n  a:\n    {}1\n",
            "- ".repeat(n)
        );
        let toml = format!(
            "{MINIMAL_S2S}[provider_config]\na = {}1{}\n",
            "[".repeat(n),
            "]".repeat(n)
        );
        let json = format!(
            r#"{{"provider": "local", "pipeline_type": "s2s", "s2s_provider": "echo", "provider_config": {{"a": {}1{}}}}}"#,
            "[".repeat(n),
            "]".repeat(n)
        );
        let loaded = [
            Config::from_yaml_str(&yaml_flow),
            Config::from_yaml_str(&yaml_block),
            Config::from_toml_str(&toml),
            Config::from_json_str(&json),
        ];
        for result in loaded {
            match (extra, result) {
                (0, Ok(config)) => assert_eq!(depth_of(&config.provider_config.0["a"]), n),
                (0, Err(e)) => panic!("at the limit: {e}"),
                (_, Ok(_)) => panic!("past the limit, loaded"),
                (_, Err(e)) => assert!(
                    e.message.contains(&format!(
                        "nested deeper than the limit of {MAX_NESTING_DEPTH} levels"
                    )),
                    "{e}"
                ),
            }
        }
        let session = format!(
            r#"{{"user_id": "u-1", "metadata": {{"a": {}1{}}}}}"#,
            "[".repeat(n),
            "]".repeat(n)
        );
        assert_eq!(SessionConfig::from_json_str(&session).is_ok(), extra == 0);
    }

    // Mappings by indentation, to the limit.
    let mut indented = format!("{YAML_HEAD}provider_config:\n");
    for i in 0..=inner {
        let value = if i == inner { " 1" } else { "" };
        indented.push_str(&format!("{}k{i}:{value}\n", "  ".repeat(i + 1)));
    }
    let config = Config::from_yaml_str(&indented).unwrap();
    assert!(config.provider_config.0.contains_key("k0"));
}

#[test]
fn brackets_in_strings_comments_and_block_scalars_do_not_count() {
    let many = 500;
    let open = "[".repeat(many);
    let curly = "{".repeat(many);
    let dashes = "- ".repeat(many);

    let yaml = format!(
        "{YAML_HEAD}provider_config:\n  \
         double: \"{open}{curly}\"\n  \
         single: '{open} it''s {curly}'\n  \
         plain: x{open}{curly}\n  \
         # {open} {dashes}\n  \
         folded: >\n    {open}\n    {dashes}x\n\n    {curly}\n  \
         literal: |-\n    {curly}\n      {dashes}\n    {open}\n  \
         multi: \"a {open}\n    b {curly}\"\n  \
         list: [\"{open}\", '{curly}', \"]]]\", x, # {open}\n    ]\n  \
         after: [[1]]\n\
         latency_target: 300ms # {open}\n"
    );
    let config = Config::from_yaml_str(&yaml).unwrap_or_else(|e| panic!("{e}"));
    let section = &config.provider_config.0;
    assert_eq!(section["double"], format!("{open}{curly}"));
    assert_eq!(section["single"], format!("{open} it's {curly}"));
    assert_eq!(section["plain"], format!("x{open}{curly}"));
    assert_eq!(section["folded"], format!("{open} {dashes}x\n{curly}\n"));
    assert_eq!(section["literal"], format!("{curly}\n  {dashes}\n{open}"));
    assert_eq!(section["multi"], format!("a {open} b {curly}"));
    assert_eq!(section["list"][3], "x");
    assert_eq!(section["after"], serde_json::json!([[1]]));
    assert_eq!(config.latency_target, ms(300));

    let toml = format!(
        "{MINIMAL_S2S}[provider_config]\n\
         double = \"{open}\\\"{curly}\"\n\
         single = '{curly}'\n\
         multi = \"\"\"\n{open}\n{curly}\"\"\"\n\
         literal = '''{open}\n{curly}'''\n\
         # {open}\n\
         list = [\"{open}\", '{curly}', # {open}\n  \"]]]\"]\n\
         \"a.b[[\" = 1\n\
         [provider_config.\"x.y.z[[\"]\n\
         c = 1 # {open}\n"
    );
    let config = Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}"));
    let section = &config.provider_config.0;
    assert_eq!(section["double"], format!("{open}\"{curly}"));
    assert_eq!(section["multi"], format!("{open}\n{curly}"));
    assert_eq!(section["list"][2], "]]]");
    assert_eq!(section["x.y.z[["]["c"], 1);

    let json = format!(
        r#"{{"provider": "local", "pipeline_type": "s2s", "s2s_provider": "echo", "provider_config": {{"a": "{open}\"{curly}\\", "b": ["]]]", "{open}"]}}}}"#
    );
    let config = Config::from_json_str(&json).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.provider_config.0["a"], format!("{open}\"{curly}\\"));
}
