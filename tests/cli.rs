//! The `voice-backends` binary, run as a user would: `providers`, `schema`,
//! `validate` and `serve` (with a real socket and a real SIGTERM).
#![cfg(feature = "cli")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_voice-backends");

/// Runs the binary with `args` and no `VBT_*` or `RUST_LOG` in its environment.
fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes `text` to `name` in a fresh temporary directory.
fn temp_file(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("the file is written");
    (dir, path)
}

fn validate(name: &str, text: &str) -> (Output, String) {
    let (_dir, path) = temp_file(name, text);
    let out = run(&["validate", path.to_str().unwrap()]);
    (out, path.display().to_string())
}

/// The lines of `validate`'s output, with the file name replaced by `F`.
fn diagnostics(out: &Output, file: &str) -> Vec<String> {
    stdout(out)
        .lines()
        .map(|l| l.replacen(file, "F", 1))
        .collect()
}

/// Asserts that some line starts with `prefix` (e.g. `F:4:1: latency_target: `).
fn assert_line(lines: &[String], prefix: &str) {
    assert!(
        lines.iter().any(|l| l.starts_with(prefix)),
        "no line starts with {prefix:?} in:\n{}",
        lines.join("\n")
    );
}

// --- providers ---------------------------------------------------------------

#[test]
fn providers_prints_an_aligned_table() {
    let out = run(&["providers"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    let header = lines[0];
    for column in [
        "name",
        "s2s",
        "multi-user",
        "persistence",
        "custom auth",
        "custom rate limit",
        "service limit",
        "min latency",
        "codecs",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let local = lines
        .iter()
        .find(|l| l.starts_with("local "))
        .expect("a row for local");
    // Aligned: the s2s cell of `local` starts under the `s2s` header.
    let at = header.find("s2s").unwrap();
    assert_eq!(&local[at..at + 3], "yes", "{text}");
    assert!(local.contains("none") && local.contains("20ms") && local.contains("pcm16"));
}

#[test]
fn providers_json_lists_capabilities() {
    let out = run(&["providers", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let local = json
        .as_array()
        .expect("an array")
        .iter()
        .find(|p| p["name"] == "local")
        .expect("local is listed");
    let caps = &local["capabilities"];
    assert_eq!(caps["speech_to_speech"], true);
    assert_eq!(caps["max_concurrent_sessions"], 0);
    assert_eq!(caps["min_latency"], "20ms");
    assert!(caps["codecs"].as_array().unwrap().contains(&"pcm16".into()));
}

// --- schema --------------------------------------------------------------------

#[test]
fn schema_prints_the_providers_json_schema() {
    let out = run(&["schema", "local"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(schema.is_object());
    assert_eq!(schema["type"], "object");
    assert!(
        schema["$schema"]
            .as_str()
            .unwrap()
            .contains("json-schema.org")
    );
    // Pretty-printed.
    assert!(stdout(&out).lines().count() > 3);
}

#[test]
fn schema_of_an_unknown_provider_lists_the_known_ones() {
    let out = run(&["schema", "livekt"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("\"livekt\""), "{err}");
    let available = err
        .split("available: ")
        .nth(1)
        .expect("lists what is available");
    assert!(
        available
            .split([',', ' ', '\n'])
            .any(|name| name == "local"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

// --- validate -------------------------------------------------------------------

const GOOD_TOML: &str = r#"provider = "local"
pipeline_type = "s2s"
s2s_provider = "echo"
turn_detection_provider = "silence"
latency_target = "300ms"

[components.silence]
min_endpointing_delay = "400ms"
"#;

const GOOD_YAML: &str = "provider: local\n\
pipeline_type: s2s\n\
s2s_provider: echo\n\
vad_provider: energy\n\
components:\n\
\x20 energy:\n\
\x20   threshold_db: 12\n";

const GOOD_JSON: &str = r#"{
  "provider": "local",
  "pipeline_type": "s2s",
  "s2s_provider": "echo",
  "timeout": "10s"
}"#;

#[test]
fn valid_files_are_ok_in_every_format() {
    for (name, text) in [
        ("good.toml", GOOD_TOML),
        ("good.yaml", GOOD_YAML),
        ("good.yml", GOOD_YAML),
        ("good.json", GOOD_JSON),
    ] {
        let (out, file) = validate(name, text);
        assert!(
            out.status.success(),
            "{name}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        assert_eq!(stdout(&out), format!("{file}: ok\n"));
    }
}

const BAD_TOML: &str = r#"provider = "local"
pipeline_type = "s2s"
s2s_provider = "echo"
latency_target = "50ms"
vad_provider = "nope"
max_retries = 11
turn_detection_provider = "silence"

[provider_config]
region = "eu"

[[processors]]
name = "ghost"

[components.silence]
min_endpointing_delay = "5s"
max_endpointing_delay = "1s"
"#;

#[test]
fn toml_errors_have_paths_and_lines() {
    let (out, file) = validate("bad.toml", BAD_TOML);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let lines = diagnostics(&out, &file);
    assert_line(
        &lines,
        "F:4:1: latency_target: 50ms is out of range 100ms..=5s",
    );
    assert_line(
        &lines,
        "F:5:1: vad_provider: no vad component named \"nope\"",
    );
    assert_line(&lines, "F:6:1: max_retries: 11 is out of range 0..=10");
    assert_line(
        &lines,
        "F:10:1: provider_config.region: unknown field `region`",
    );
    assert_line(
        &lines,
        "F:13:1: processors[0].name: no audio processor named \"ghost\"",
    );
    assert_line(
        &lines,
        "F:16:1: components.silence.min_endpointing_delay: 5s is longer than max_endpointing_delay",
    );
    assert_eq!(lines.len(), 6, "{}", lines.join("\n"));
    // In file order.
    let numbers: Vec<usize> = lines
        .iter()
        .map(|l| l.split(':').nth(1).unwrap().parse().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|w| w[0] <= w[1]), "{numbers:?}");
    assert!(stderr(&out).contains("6 config errors"), "{}", stderr(&out));
}

#[test]
fn toml_missing_keys_and_parse_errors_are_reported() {
    // A key the pipeline needs is missing: no line to point at.
    let (out, file) = validate(
        "missing.toml",
        "provider = \"local\"\npipeline_type = \"s2s\"\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let lines = diagnostics(&out, &file);
    assert_eq!(
        lines,
        ["F: s2s_provider: pipeline_type = s2s requires s2s_provider"]
    );

    // A value of the wrong type: the parser's position.
    let (out, file) = validate(
        "type.toml",
        "provider = \"local\"\npipeline_type = \"s2s\"\ntimeout = 5\n",
    );
    assert_eq!(out.status.code(), Some(1));
    assert_line(&diagnostics(&out, &file), "F:3:11: timeout: invalid TOML: ");

    // An unknown key.
    let (out, file) = validate("unknown.toml", "provider = \"local\"\n\nlatency = \"1s\"\n");
    assert_eq!(out.status.code(), Some(1));
    assert_line(
        &diagnostics(&out, &file),
        "F:3:1: latency: invalid TOML: unknown field `latency`",
    );

    // Bad syntax.
    let (out, file) = validate("syntax.toml", "provider = \"local\"\npipeline_type = \n");
    assert_eq!(out.status.code(), Some(1));
    let lines = diagnostics(&out, &file);
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("F:2:"), "{lines:?}");
}

const BAD_YAML: &str = "provider: local\n\
pipeline_type: s2s\n\
latency_target: 50ms\n\
processors:\n\
\x20 - name: ghost\n\
provider_config:\n\
\x20 region: eu\n\
components:\n\
\x20 silence:\n\
\x20   min_speech: 1h\n\
turn_detection_provider: silence\n";

#[test]
fn yaml_errors_have_paths_and_best_effort_lines() {
    let (out, file) = validate("bad.yaml", BAD_YAML);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let lines = diagnostics(&out, &file);
    assert_line(&lines, "F:3:1: latency_target: 50ms is out of range");
    assert_line(
        &lines,
        "F:5:5: processors[0].name: no audio processor named \"ghost\"",
    );
    assert_line(
        &lines,
        "F:7:3: provider_config.region: unknown field `region`",
    );
    assert_line(
        &lines,
        "F:10:5: components.silence.min_speech: 1h is longer than 2s",
    );
    assert_line(
        &lines,
        "F: s2s_provider: pipeline_type = s2s requires s2s_provider",
    );
    assert_eq!(lines.len(), 5, "{}", lines.join("\n"));

    // A parse error carries the parser's position.
    let (out, file) = validate("syntax.yml", "provider: local\ntimeout: [1\n");
    assert_eq!(out.status.code(), Some(1));
    let lines = diagnostics(&out, &file);
    assert!(lines[0].starts_with("F:2:"), "{lines:?}");
}

const BAD_JSON: &str = r#"{
  "provider": "nowhere",
  "pipeline_type": "s2s",
  "s2s_provider": "echo",
  "timeout": "1s",
  "latency_target": "2s",
  "components": {"echo": {"max_turn": "1h"}}
}"#;

#[test]
fn json_errors_have_paths_and_lines() {
    let (out, file) = validate("bad.json", BAD_JSON);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let lines = diagnostics(&out, &file);
    assert_line(
        &lines,
        "F:2:3: provider: no provider named \"nowhere\" is registered; available: ",
    );
    assert!(
        lines.iter().any(|l| l.starts_with("F:2:3: ")
            && l.split("available: ")
                .nth(1)
                .is_some_and(|a| a.split(", ").any(|n| n == "local"))),
        "{}",
        lines.join("\n")
    );
    assert_line(&lines, "F:6:3: latency_target: 2s exceeds timeout 1s");
    assert_line(
        &lines,
        "F:7:27: components.echo.max_turn: 1h is outside 20ms..=10m",
    );
    assert_eq!(lines.len(), 3, "{}", lines.join("\n"));

    let (out, file) = validate(
        "unknown.json",
        "{\"provider\": \"local\",\n \"pipeline_typ\": \"s2s\"}",
    );
    assert_eq!(out.status.code(), Some(1));
    assert_line(
        &diagnostics(&out, &file),
        "F:2:15: pipeline_typ: invalid JSON: unknown field `pipeline_typ`",
    );
}

#[test]
fn validate_reports_unreadable_and_unsupported_files() {
    let out = run(&["validate", "/nonexistent/config.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("cannot read the file"),
        "{}",
        stdout(&out)
    );

    let (out, _) = validate("config.ini", "provider = local");
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("use .toml, .yaml, .yml or .json"));
}

// --- help and usage -------------------------------------------------------------

#[test]
fn every_command_has_help() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["providers", "--help"],
        &["schema", "--help"],
        &["validate", "--help"],
    ] {
        let out = run(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).contains("Usage: voice-backends"), "{args:?}");
    }
    assert!(stdout(&run(&["serve", "--help"])).contains("--env-prefix"));
    assert!(stdout(&run(&["--help"])).contains("validate"));
}

#[test]
fn usage_errors_exit_2_and_say_what_to_fix() {
    let out = run(&["serve", "--listen", "not-an-address"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--listen"), "{}", stderr(&out));
    let out = run(&["schema"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("PROVIDER"), "{}", stderr(&out));
}

#[test]
fn out_of_range_server_options_exit_1_before_anything_starts() {
    let out = run(&["serve", "--listen", "127.0.0.1:0", "--workers", "5000"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("invalid server options: workers must be at most 1024, got 5000"),
        "{err}"
    );
    assert!(!err.contains("backend started"), "{err}");
    assert!(stdout(&out).is_empty(), "nothing listened");
}

// --- serve -----------------------------------------------------------------------

/// A running `serve`, killed if the test fails before it stops.
struct Serve {
    child: Child,
    addr: SocketAddr,
    stderr: mpsc::Receiver<String>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `serve` on a free port and waits for its `listening on` line.
fn start_serve(extra: &[&str], env: &[(&str, &str)]) -> Serve {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    // Drain stderr on a thread so the child never blocks on a full pipe.
    let mut err = child.stderr.take().unwrap();
    let (err_tx, err_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        let _ = err_tx.send(text);
    });
    let out = child.stdout.take().unwrap();
    let (line_tx, line_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = line_tx.send(line);
        }
        for _ in lines {}
    });
    let mut serve = Serve {
        child,
        addr: "127.0.0.1:1".parse().unwrap(),
        stderr: err_rx,
    };
    let line = match line_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(line) => line,
        Err(_) => {
            let _ = serve.child.kill();
            let log = serve.stderr.recv_timeout(Duration::from_secs(5));
            panic!("no `listening on` line; stderr: {log:?}");
        }
    };
    let addr = line
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    serve.addr = addr.parse().expect("a socket address");
    assert_ne!(serve.addr.port(), 0, "the real bound port is printed");
    serve
}

/// `GET path` over a raw HTTP/1.1 connection: the status code and body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// Waits up to `limit` for the child to exit.
fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "serve did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_answers_health_checks_and_stops_gracefully_on_sigterm() {
    let mut serve = start_serve(&[], &[]);
    let (status, _body) = http_get(serve.addr, "/healthz");
    assert_eq!(status, 200);

    sigterm(serve.child.id());
    let status = wait_exit(&mut serve.child, Duration::from_secs(30));
    let log = serve
        .stderr
        .recv_timeout(Duration::from_secs(10))
        .expect("stderr");
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("stopped gracefully"), "{log}");
}

/// Serves the config file `name` holding `text` (with `env`), checks it is
/// healthy, stops it with SIGTERM and returns its log once it exited 0.
fn serve_and_stop(name: &str, text: &str, env: &[(&str, &str)]) -> String {
    let (_dir, path) = temp_file(name, text);
    let mut serve = start_serve(&["--config", path.to_str().unwrap()], env);
    assert_eq!(http_get(serve.addr, "/healthz").0, 200);
    sigterm(serve.child.id());
    let status = wait_exit(&mut serve.child, Duration::from_secs(30));
    let log = serve.stderr.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{log}");
    log
}

#[test]
fn serve_runs_a_config_file_at_its_log_level() {
    // An empty RUST_LOG leaves the level to the config.
    let log = serve_and_stop(
        "serve.yaml",
        "provider: local\npipeline_type: s2s\ns2s_provider: echo\nlog_level: warn\n",
        &[("RUST_LOG", "")],
    );
    // At `warn`, the info-level lifecycle lines are not logged.
    assert!(!log.contains("stopped gracefully"), "{log}");
    assert!(!log.contains("INFO"), "{log}");
}

/// The README's `pipecat` config: the bot hosts STT and TTS, so it names no
/// components, and both `validate` and `serve` take it.
#[cfg(feature = "pipecat")]
#[test]
fn the_readme_pipecat_config_validates_and_serves() {
    let text = "provider = \"pipecat\"\nmax_retries = 3\nretry_delay = \"500ms\"\n\n\
                [provider_config]\n\
                url_template = \"ws://127.0.0.1:8765/ws?session={session_id}\"\n\
                input_sample_rate = 16000\n";
    let (out, _) = validate("pipecat.toml", text);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let (_dir, path) = temp_file("pipecat.toml", text);
    let mut serve = start_serve(&["--config", path.to_str().unwrap()], &[]);
    let (status, body) = http_get(serve.addr, "/healthz");
    assert!(body.contains("pipecat"), "{status} {body}");
    sigterm(serve.child.id());
    let status = wait_exit(&mut serve.child, Duration::from_secs(30));
    let log = serve.stderr.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{log}");
}

/// A component option `validate` refuses would fail every session: `serve`
/// refuses it too, before starting anything.
#[test]
fn serve_refuses_component_options_validate_refuses() {
    let text = "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\n\
                [components.silence]\nmin_speech = \"1h\"\n";
    let (_dir, path) = temp_file("bad-options.toml", text);
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    // Were it served, it would not exit: kill it then (on drop of the guard).
    let status = {
        struct Kill<'a>(&'a mut Child);
        impl Drop for Kill<'_> {
            fn drop(&mut self) {
                let _ = self.0.kill();
            }
        }
        let guard = Kill(&mut child);
        wait_exit(guard.0, Duration::from_secs(30))
    };
    let out = child.wait_with_output().expect("output");
    assert_eq!(status.code(), Some(1));
    assert!(stdout(&out).is_empty(), "never listened: {}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("components.silence.min_speech"), "{err}");
    assert!(err.contains("voice-backends validate"), "{err}");
}

/// `enable_logging = false`: the binary logs nothing (RUST_LOG unset), and
/// still serves and stops gracefully.
#[test]
fn serve_with_logging_off_logs_nothing() {
    let log = serve_and_stop(
        "quiet.toml",
        "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\nenable_logging = false\n",
        &[("RUST_LOG", "")],
    );
    assert!(log.trim().is_empty(), "logged: {log}");
}

/// `enable_tracing = false`: the log lines come without span context.
#[test]
fn serve_with_tracing_off_logs_lines_without_span_context() {
    let log_of = |tracing: bool| {
        serve_and_stop(
            "spans.toml",
            &format!(
                "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\nenable_tracing = {tracing}\n"
            ),
            &[],
        )
    };
    let with = log_of(true);
    assert!(with.contains("backend.start{provider=local}: "), "{with}");
    let without = log_of(false);
    assert!(without.contains("connection state"), "{without}");
    assert!(!without.contains("backend.start{"), "{without}");
}

#[test]
fn serve_refuses_an_invalid_environment_overlay() {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--env-prefix", "VBT"])
        .env("VBT_LATENCY_TARGET", "50ms")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("latency_target"), "{err}");
    assert!(err.contains("VBT_"), "{err}");
    assert!(out.stdout.is_empty(), "nothing listened");
}

#[test]
fn serve_applies_a_valid_environment_overlay_only_when_asked() {
    // Without --env-prefix the variable is ignored, so this starts.
    let mut serve = start_serve(&[], &[("VBT_LATENCY_TARGET", "50ms")]);
    sigterm(serve.child.id());
    assert!(wait_exit(&mut serve.child, Duration::from_secs(30)).success());
}

#[test]
fn serve_refuses_an_invalid_config_file() {
    let (_dir, path) = temp_file("bad.toml", BAD_TOML);
    let out = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--config",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("latency_target"), "{err}");
    assert!(err.contains("voice-backends validate"), "{err}");
    // Every error `validate` lists, with its line, not only the first kind.
    assert!(err.contains("6 errors"), "{err}");
    for found in [
        ":4:1: latency_target",
        ":5:1: vad_provider",
        "provider_config.region",
        "processors[0].name",
        "components.silence.min_endpointing_delay",
    ] {
        assert!(err.contains(found), "{found}: {err}");
    }
}

#[test]
fn serve_reports_an_address_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(&["serve", "--listen", &addr]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    // Named once, with what to do.
    assert_eq!(err.matches(&addr).count(), 1, "{err}");
    assert!(
        err.contains(&format!("could not listen on {addr}: ")),
        "{err}"
    );
    assert!(err.contains("pick another address with --listen"), "{err}");
    assert!(stdout(&out).is_empty(), "nothing listened");
}

/// With logging on, a session's log lines (written from worker threads) must
/// not stall the server: after a session ran a turn, health checks still
/// answer and SIGTERM still stops it.
#[test]
fn serve_keeps_serving_while_sessions_log() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let mut serve = start_serve(&[], &[("RUST_LOG", "debug")]);
    let addr = serve.addr;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .expect("the WebSocket opens");
        ws.send(Message::Text(
            r#"{"type":"start","user_id":"logger","sample_rate":16000}"#.into(),
        ))
        .await
        .unwrap();
        ws.send(Message::Text(r#"{"type":"text","text":"hello"}"#.into()))
            .await
            .unwrap();
        // The text turn is answered: its transcript comes back as an event.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let msg = tokio::time::timeout_at(deadline, ws.next())
                .await
                .expect("the session answers in time")
                .expect("the session stays open")
                .unwrap();
            if let Message::Text(t) = msg
                && t.contains("user_transcript")
            {
                break;
            }
        }
        ws.close(None).await.unwrap();
    });
    let (status, _) = http_get(addr, "/healthz");
    assert_eq!(status, 200, "health checks still answer");
    sigterm(serve.child.id());
    let status = wait_exit(&mut serve.child, Duration::from_secs(30));
    assert!(status.success(), "exit {status:?}");
}

/// The default `serve` (the echo backend) answers typed text with the demo
/// agent, over the WebSocket: an `agent_text`, no `agent_error`.
#[test]
fn serve_answers_typed_text_by_default() {
    use tokio_tungstenite::tungstenite::{Message, connect};
    let serve = start_serve(&["--store", "none"], &[]);
    let (mut ws, _) = connect(format!("ws://{}/ws", serve.addr)).expect("the WebSocket opens");
    if let tokio_tungstenite::tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    let next = |ws: &mut tokio_tungstenite::tungstenite::WebSocket<_>| loop {
        match ws.read().expect("a message in time") {
            Message::Text(t) => {
                break serde_json::from_str::<serde_json::Value>(&t).expect("JSON");
            }
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    };
    let start = r#"{"type":"start","user_id":"u","sample_rate":16000}"#;
    ws.send(Message::Text(start.into())).unwrap();
    assert_eq!(next(&mut ws)["type"], "ready");
    let text = r#"{"type":"text","text":"repeat after me: hello there"}"#;
    ws.send(Message::Text(text.into())).unwrap();
    loop {
        let event = next(&mut ws);
        assert_ne!(event["type"], "error", "{event}");
        if event["type"] == "agent_text" {
            assert_eq!(event["text"], "hello there");
            break;
        }
    }
}
