#![cfg(all(feature = "server", feature = "testing"))]
//! The web page end to end in a real browser: headless Chromium, driven over
//! WebDriver (Debian's `chromedriver`), opens the page of the real server with
//! `?autostart=1`; its fake microphone plays a WAV file of speech-like
//! utterances, the page's AudioWorklet resamples it to 16 kHz and streams it to
//! the `local` echo backend, and the reply comes back and is scheduled for
//! playback. The test reads the page's `window.voiceTest` counters.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (`scripts/system-deps`
//! installs them). Without them the test is skipped, unless
//! `VOICE_BACKENDS_BROWSER_TESTS=1`, when it fails.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use voice_backends::server::{Server, ServerConfig};
use voice_backends::testing::signal;
use voice_backends::{Config, PipelineType, registry};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Set to `1` (as `scripts/test` does) to make a missing browser a failure.
const REQUIRE_VAR: &str = "VOICE_BACKENDS_BROWSER_TESTS";
/// How long a full turn may take to come back through the page. Generous: a
/// loaded 2-core machine starts Chromium slowly.
const TURN_TIMEOUT: Duration = Duration::from_secs(120);

/// A child process group (chromedriver and the browser it starts), killed on
/// drop, so a failing test leaves no browser behind.
struct ProcessGroup(Child);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // The group's id is the leader's pid (see `process_group(0)` below).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether the browser is installed (if not, the test is skipped, or fails
/// when `VOICE_BACKENDS_BROWSER_TESTS=1`).
fn browser_available() -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let how = "run scripts/system-deps to install Debian's chromium and chromium-driver \
               (or: apt-get install chromium chromium-driver)";
    if std::env::var(REQUIRE_VAR).as_deref() == Ok("1") {
        panic!(
            "{REQUIRE_VAR}=1 but {} missing: {how}",
            missing.join(" and ")
        );
    }
    eprintln!(
        "browser test skipped: {} missing ({how}; set {REQUIRE_VAR}=1 to make this a failure)",
        missing.join(" and ")
    );
    false
}

/// A 16-bit mono 16 kHz WAV file: a 44-byte header, then the samples.
fn write_wav(path: &Path, samples: &[i16]) {
    const RATE: u32 = signal::SAMPLE_RATE;
    let data_len = u32::try_from(samples.len() * 2).expect("a small WAV file");
    let mut wav = Vec::with_capacity(44 + samples.len() * 2);
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data_len).to_le_bytes());
    wav.extend_from_slice(b"WAVE");
    wav.extend_from_slice(b"fmt ");
    wav.extend_from_slice(&16u32.to_le_bytes()); // fmt chunk size
    wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
    wav.extend_from_slice(&1u16.to_le_bytes()); // mono
    wav.extend_from_slice(&RATE.to_le_bytes());
    wav.extend_from_slice(&(RATE * 2).to_le_bytes()); // bytes per second
    wav.extend_from_slice(&2u16.to_le_bytes()); // bytes per frame
    wav.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        wav.extend_from_slice(&s.to_le_bytes());
    }
    assert_eq!(wav.len(), 44 + samples.len() * 2);
    std::fs::write(path, wav).expect("write the WAV file");
}

/// A few utterances with pauses long enough to end each turn. Chromium loops
/// the file, so turns keep coming for as long as the page listens.
fn conversation() -> Vec<i16> {
    let mut audio = signal::silence(Duration::from_millis(500));
    for (seed, speech_ms) in [(11, 1200), (12, 900), (13, 1500)] {
        audio.extend(signal::utterance(
            Duration::from_millis(speech_ms),
            Duration::from_millis(2000),
            seed,
        ));
    }
    audio
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Starts chromedriver on a free port and waits until it accepts connections.
fn start_chromedriver(log: &Path) -> (ProcessGroup, u16) {
    use std::os::unix::process::CommandExt;
    let port = free_port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .arg(format!("--log-path={}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start chromedriver");
    let driver = ProcessGroup(child);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err() {
        assert!(
            Instant::now() < deadline,
            "chromedriver did not listen on port {port} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (driver, port)
}

fn chrome_capabilities(wav: &Path, profile: &Path) -> serde_json::Map<String, Value> {
    let args = [
        "--headless=new".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--disable-dev-shm-usage".to_owned(),
        "--disable-background-networking".to_owned(),
        "--disable-component-update".to_owned(),
        "--disable-sync".to_owned(),
        "--no-first-run".to_owned(),
        "--use-fake-ui-for-media-stream".to_owned(),
        "--use-fake-device-for-media-stream".to_owned(),
        format!("--use-file-for-fake-audio-capture={}", wav.display()),
        "--autoplay-policy=no-user-gesture-required".to_owned(),
        format!("--user-data-dir={}", profile.display()),
        "--window-size=1100,1400".to_owned(),
    ];
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({ "binary": CHROMIUM, "args": args }),
    );
    caps
}

/// The page's `window.voiceTest` counters (`Null` before the script ran).
async fn voice_test(client: &Client) -> Value {
    let raw = client
        .execute(
            "return window.voiceTest ? JSON.stringify(window.voiceTest) : null;",
            vec![],
        )
        .await
        .expect("read window.voiceTest");
    raw.as_str()
        .map(|s| serde_json::from_str(s).expect("voiceTest is JSON"))
        .unwrap_or(Value::Null)
}

/// The page's event log, for failure messages.
async fn page_log(client: &Client) -> String {
    client
        .execute(
            "const e = document.getElementById('events'); return e ? e.innerText : '';",
            vec![],
        )
        .await
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn count(t: &Value, event: &str) -> u64 {
    t["events"][event].as_u64().unwrap_or(0)
}

/// A full turn came back through the page.
fn full_turn(t: &Value) -> bool {
    t["ready"] == true
        && count(t, "turn_ended") > 0
        && count(t, "latency") > 0
        && t["states"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s == "speaking"))
        && t["replyFramesReceived"].as_u64().unwrap_or(0) > 0
        && t["replySamplesPlayed"].as_u64().unwrap_or(0) > 0
}

/// Polls the counters until `done` holds or `timeout` passes; the last value.
async fn wait_for(
    client: &Client,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> (bool, Value) {
    let deadline = Instant::now() + timeout;
    loop {
        let t = voice_test(client).await;
        if done(&t) {
            return (true, t);
        }
        if Instant::now() >= deadline {
            return (false, t);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Where the screenshot goes: `target/browser-test.png` of this crate.
fn screenshot_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-test.png")
}

/// Saves a screenshot of the page; failing to is only reported (the
/// counters, not the picture, decide the test).
async fn save_screenshot(client: &Client) {
    let path = screenshot_path();
    let saved = match client.screenshot().await {
        Ok(png) => path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, png))
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match saved {
        Ok(()) => eprintln!("screenshot: {}", path.display()),
        Err(e) => eprintln!("no screenshot: {e}"),
    }
}

/// Chromium (through chromedriver) with `samples` as its fake microphone,
/// on `url`. Dropping the guard kills chromedriver and the browser.
#[cfg(feature = "cli")]
struct Browser {
    client: Client,
    _driver: ProcessGroup,
    _dir: tempfile::TempDir,
}

#[cfg(feature = "cli")]
impl Browser {
    async fn open(samples: &[i16], url: &str) -> Browser {
        let dir = tempfile::tempdir().unwrap();
        let wav = dir.path().join("speech.wav");
        write_wav(&wav, samples);
        let profile = dir.path().join("profile");
        std::fs::create_dir(&profile).unwrap();
        let driver_log = dir.path().join("chromedriver.log");
        let (driver, port) = start_chromedriver(&driver_log);
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(chrome_capabilities(&wav, &profile));
        let client = builder
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| {
                let log = std::fs::read_to_string(&driver_log).unwrap_or_default();
                let tail: String = log.lines().rev().take(40).collect::<Vec<_>>().join("\n");
                panic!("could not start Chromium through chromedriver: {e}\nlast log lines (newest first):\n{tail}")
            });
        client.goto(url).await.expect("load the page");
        Browser {
            client,
            _driver: driver,
            _dir: dir,
        }
    }
}

/// The texts of the page's elements that match `selector`, in order.
async fn texts(client: &Client, selector: &str) -> Vec<String> {
    let raw = client
        .execute(
            "return JSON.stringify(Array.from(document.querySelectorAll(arguments[0]), e => e.textContent));",
            vec![json!(selector)],
        )
        .await
        .expect("read the page");
    serde_json::from_str(raw.as_str().expect("a JSON string")).expect("JSON")
}

/// The conversation as shown: `(class, text)` of each line.
#[cfg(feature = "cli")]
async fn conversation_lines(client: &Client) -> Vec<(String, String)> {
    let raw = client
        .execute(
            "return JSON.stringify(Array.from(document.querySelectorAll('#conversation li'), e => [e.className, e.textContent]));",
            vec![],
        )
        .await
        .expect("read the conversation");
    serde_json::from_str(raw.as_str().expect("a JSON string")).expect("JSON")
}

/// `voice-backends serve` (the binary, as a user runs it) on a free port
/// with `args`, killed on drop.
#[cfg(feature = "cli")]
struct Serve {
    child: Child,
    addr: SocketAddr,
}

#[cfg(feature = "cli")]
impl Serve {
    fn start(args: &[&str]) -> Serve {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(env!("CARGO_BIN_EXE_voice-backends"))
            .args(["serve", "--listen", "127.0.0.1:0", "--store", "none"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("serve starts");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let mut serve = Serve {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)),
        };
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("serve prints `listening on http://ADDR`");
        serve.addr = line
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("an address");
        serve
    }
}

#[cfg(feature = "cli")]
impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoken_turn_goes_round_trip_through_the_web_page() {
    if !browser_available() {
        return;
    }

    // The echo backend behind the real server, served as `voice-backends
    // serve` serves it: on worker threads.
    let mut config = Config::new("local");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".into());
    let backend = registry().create("local", &config).await.unwrap();
    backend.start().await.unwrap();
    let server = Server::bind(
        backend,
        ServerConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            workers: 2,
            ..ServerConfig::default()
        },
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));

    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("speech.wav");
    write_wav(&wav, &conversation());
    let profile = dir.path().join("profile");
    std::fs::create_dir(&profile).unwrap();
    let driver_log = dir.path().join("chromedriver.log");
    let (driver, port) = start_chromedriver(&driver_log);

    let mut builder = ClientBuilder::new(HttpConnector::new());
    builder.capabilities(chrome_capabilities(&wav, &profile));
    let client = builder
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .unwrap_or_else(|e| {
            let log = std::fs::read_to_string(&driver_log).unwrap_or_default();
            let tail: String = log.lines().rev().take(40).collect::<Vec<_>>().join("\n");
            panic!("could not start Chromium through chromedriver: {e}\nlast log lines (newest first):\n{tail}")
        });

    client
        .goto(&format!("http://{addr}/?autostart=1"))
        .await
        .expect("load the page");

    let (ok, t) = wait_for(&client, TURN_TIMEOUT, full_turn).await;
    // The page mid-conversation, for a person to look at.
    save_screenshot(&client).await;
    if !ok {
        panic!(
            "no full turn through the page within {TURN_TIMEOUT:?}\nvoiceTest: {t:#}\npage log:\n{}",
            page_log(&client).await
        );
    }

    assert_eq!(t["ready"], true, "{t:#}");
    assert!(
        t["sessionId"].as_str().is_some_and(|s| !s.is_empty()),
        "{t:#}"
    );
    assert!(t["framesSent"].as_u64().unwrap_or(0) > 0, "{t:#}");
    assert!(count(&t, "turn_ended") > 0, "{t:#}");
    assert!(
        t["states"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s == "speaking")),
        "{t:#}"
    );
    assert!(t["replyFramesReceived"].as_u64().unwrap_or(0) > 0, "{t:#}");
    assert!(t["replySamplesPlayed"].as_u64().unwrap_or(0) > 0, "{t:#}");
    assert!(count(&t, "latency") > 0, "{t:#}");
    let latency = &t["lastLatency"];
    assert!(latency["turn"].as_u64().unwrap_or(0) >= 1, "{t:#}");
    assert!(latency["first_audio_ms"].is_number(), "{t:#}");
    assert!(t["closed"].is_null(), "{t:#}");
    // The latency table: the echo has no STT, agent or synthesis (dashes),
    // and its first audio follows the turn's end within a fraction of a
    // millisecond, shown as such rather than as 0.0.
    let row = texts(&client, "#latency tr:first-child td").await;
    assert_eq!(row.len(), 6, "{row:?}");
    assert_eq!(row[2..5], ["—", "—", "—"], "{row:?}");
    let shown = client
        .execute(
            "return [arguments[0], 0.02, 0.004, 0.5, 3.25, 42.4, null]\
                .map(v => window.voiceTest.formatMs(v));",
            vec![latency["first_audio_ms"].clone()],
        )
        .await
        .expect("format milliseconds as the page does");
    assert_eq!(row[5], shown[0], "{latency}");
    assert_eq!(
        shown,
        json!([row[5], "0.02", "<0.01", "0.50", "3.3", "42", "—"]),
        "an echo's first audio within a millisecond reads as such, not 0.0"
    );

    // The Disconnect button sends `stop`; the server closes the socket.
    client
        .execute("document.getElementById('disconnect').click();", vec![])
        .await
        .expect("click Disconnect");
    let (closed, t) = wait_for(&client, Duration::from_secs(30), |t| !t["closed"].is_null()).await;
    assert!(closed, "the server did not close after stop: {t:#}");
    assert_eq!(t["closed"]["code"], 1000, "{t:#}");
    assert_eq!(t["ready"], false, "{t:#}");

    client.close().await.expect("end the WebDriver session");
    drop(driver);
    let _ = stop_server.send(());
    tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .expect("the server stops")
        .expect("the server task")
        .expect("the server runs cleanly");
}

/// Types `text` in the page's text box and presses Enter.
#[cfg(feature = "cli")]
async fn type_line(client: &Client, text: &str) {
    use fantoccini::Locator;
    let input = client
        .find(Locator::Css("#text"))
        .await
        .expect("the text box");
    input.send_keys(&format!("{text}\n")).await.expect("type");
}

/// The default `serve` (the echo backend) answers the page's text box with
/// the demo agent: each typed line shows once as the user's, its answer
/// once as the agent's, in order, and no error is shown. The agent is
/// given the conversation so far ("what did I say before").
#[cfg(feature = "cli")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_text_on_the_default_serve_is_answered_once_without_an_error() {
    if !browser_available() {
        return;
    }
    let serve = Serve::start(&[]);
    // A silent microphone: only typed turns.
    let silence = signal::silence(Duration::from_secs(2));
    let browser = Browser::open(&silence, &format!("http://{}/?autostart=1", serve.addr)).await;
    let client = &browser.client;
    let (ok, t) = wait_for(client, TURN_TIMEOUT, |t| t["ready"] == true).await;
    assert!(ok, "the session did not start: {t:#}");

    let lines = [
        ("repeat after me the quick brown fox", "the quick brown fox"),
        (
            "What did I say before?",
            "Before this, you said: repeat after me the quick brown fox",
        ),
    ];
    for (n, (typed, _)) in lines.iter().enumerate() {
        type_line(client, typed).await;
        let (ok, t) = wait_for(client, TURN_TIMEOUT, |t| {
            count(t, "agent_text") > n as u64 || count(t, "error") > 0
        })
        .await;
        assert!(
            ok && count(&t, "error") == 0,
            "no answer to {typed:?}: {t:#}\npage log:\n{}",
            page_log(client).await
        );
    }
    // Late duplicates would come within this.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let shown = conversation_lines(client).await;
    let expected: Vec<(String, String)> = lines
        .iter()
        .flat_map(|(typed, answer)| {
            [
                ("user".to_owned(), (*typed).to_owned()),
                ("agent".to_owned(), (*answer).to_owned()),
            ]
        })
        .collect();
    assert_eq!(shown, expected);
    let t = voice_test(client).await;
    assert_eq!(t["textsSent"], 2, "{t:#}");
    assert_eq!(count(&t, "error"), 0, "{t:#}");
    let errors = texts(client, "#events li.error").await;
    assert!(errors.is_empty(), "errors shown: {errors:?}");
    save_screenshot(client).await;
}

/// `text` spoken by the `espeak` component (a little faster than its
/// default, which PocketSphinx hears best), 16 kHz mono.
#[cfg(feature = "demo")]
async fn espeak(text: &str) -> Vec<i16> {
    use voice_backends::pipeline::INTERNAL_FORMAT;
    use voice_backends::pipeline::offline::espeak::{EspeakOptions, EspeakTts};
    use voice_backends::testing::components::synthesize;
    let tts = EspeakTts::new(EspeakOptions {
        rate: 200,
        ..EspeakOptions::default()
    })
    .expect("the espeak component");
    let frames = synthesize(&tts, text, INTERNAL_FORMAT)
        .await
        .expect("espeak speaks");
    signal::samples_of(&frames)
}

/// `serve --demo` holds a spoken exchange through the page: the fake
/// microphone says a sentence (spoken by the `espeak` component), the page
/// shows the user's transcript (PocketSphinx), the demo agent's answer to
/// it, and plays its spoken reply (eSpeak NG); the latency row has every
/// stage of the cascade. Which words PocketSphinx makes of eSpeak NG's
/// voice after the browser's capture, resampling and RNNoise varies from
/// run to run; that it hears a known sentence's words through a whole
/// session is `tests/offline_speech.rs`'s test.
#[cfg(all(feature = "cli", feature = "demo"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_demo_holds_a_spoken_exchange_through_the_page() {
    if !browser_available() {
        return;
    }
    let mut audio = signal::silence(Duration::from_millis(800));
    audio.extend(espeak("thank you very much").await);
    // Long enough for the reply to play before the file loops.
    audio.extend(signal::silence(Duration::from_secs(8)));
    let serve = Serve::start(&["--demo"]);
    let browser = Browser::open(&audio, &format!("http://{}/?autostart=1", serve.addr)).await;
    let client = &browser.client;

    // A final transcript with words, the demo agent's answer quoting it
    // ("You said: ..."), and its spoken reply played.
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(|s| s.trim().to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let exchange = |t: &Value| -> Option<(String, String)> {
        let answers = strings(&t["agentTexts"]);
        strings(&t["transcripts"])
            .into_iter()
            .filter(|said| !said.is_empty())
            .find_map(|said| {
                answers
                    .iter()
                    .find(|a| a.starts_with("You said: ") && a.contains(&said))
                    .map(|a| (said.clone(), a.clone()))
            })
    };
    let spoken_reply = |t: &Value| {
        exchange(t).is_some()
            && full_turn(t)
            && t["lastLatency"]["agent_ms"].is_number()
            && t["replySamplesPlayed"].as_u64().unwrap_or(0) > 8_000
    };
    let (ok, t) = wait_for(client, TURN_TIMEOUT, spoken_reply).await;
    save_screenshot(client).await;
    assert!(
        ok,
        "no spoken exchange within {TURN_TIMEOUT:?}\nvoiceTest: {t:#}\nconversation: {:?}\npage log:\n{}",
        conversation_lines(client).await,
        page_log(client).await
    );
    eprintln!("heard: {}", t["transcripts"]);
    let (said, answer) = exchange(&t).unwrap();
    let lines = conversation_lines(client).await;
    assert!(
        lines
            .iter()
            .any(|(class, text)| class == "user" && text.trim() == said)
            && lines
                .iter()
                .any(|(class, text)| class == "agent" && text.trim() == answer),
        "the page shows the exchange: {lines:?}"
    );
    assert!(
        t["replySamplesPlayed"].as_u64().unwrap_or(0) > 8_000,
        "{t:#}"
    );
    let latency = &t["lastLatency"];
    for stage in ["stt_ms", "agent_ms", "tts_first_audio_ms", "first_audio_ms"] {
        assert!(latency[stage].is_number(), "{stage}: {latency}");
    }
    assert_eq!(count(&t, "error"), 0, "{t:#}");
}
