//! `serve`: the backend and server configs, logging set-up, the server's run
//! and its shutdown signals.
//!
//! # `serve --demo`
//!
//! A spoken conversation with no account and no download: the `local`
//! backend runs PocketSphinx speech recognition, the
//! [demo agent](crate::demo::DemoAgent) and eSpeak NG speech synthesis,
//! with WebRTC's voice activity detector and RNNoise denoising in front.
//! It needs the `demo` feature, and PocketSphinx needs its library and
//! English model to build (Debian, Ubuntu:
//! `sudo apt install libpocketsphinx-dev pocketsphinx-en-us`):
//!
//! ```text
//! cargo run --release --features cli,demo -- serve --demo
//! ```
//!
//! Open <http://127.0.0.1:8089>, press Connect, hold the button and say
//! "what time is it", "what day is it", "repeat after me ..." or "help".
//! The config it serves is [`DEMO_CONFIG`]; `serve --demo --print-config`
//! prints it, to copy, edit and serve with `--config` (which `--demo` does
//! not take).
//!
//! # The default agent
//!
//! Without `--config` (the echo backend) and with `--demo`, sessions get
//! the [demo agent](crate::demo::DemoAgent) unless `--agent` names
//! another: with the echo backend it answers the page's typed text (spoken
//! turns are echoed, as before). With `--config` sessions get an agent only
//! from `--agent`.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use crate::agent::{Agent, AgentReply, agent_fn};
use crate::backend::{ConnectionState, HealthStatus, VoiceBackend};
use crate::config::{Config, LogLevel, PipelineType, Secret, SessionConfig};
use crate::demo::DemoAgent;
use crate::error::{BackendError, ErrorCode, Result as VbResult};
use crate::hooks::Hooks;
use crate::registry::registry;
use crate::server::{Server, ServerConfig};
use crate::session::store::SessionStore;
use crate::session::{SessionId, VoiceSession};

use super::validate::{semantic_problems, validate_file};
use super::{Failure, ServeArgs, write_failed};

/// The default backend config of `serve`: the `local` provider with the
/// `echo` speech-to-speech model, `energy` VAD and `silence` turn detection.
/// It needs no keys and no models.
pub fn default_config() -> Config {
    let mut config = Config::new("local");
    config.pipeline_type = PipelineType::S2s;
    config.s2s_provider = Some("echo".to_owned());
    config.vad_provider = Some("energy".to_owned());
    config.turn_detection_provider = Some("silence".to_owned());
    config
}

/// The config of `serve --demo` (`serve --demo --print-config` prints it):
/// the `local` provider with PocketSphinx speech recognition, eSpeak NG
/// speech synthesis, WebRTC's voice activity detector, RNNoise denoising and
/// `silence` turn detection. Every component runs offline (feature `demo`).
pub const DEMO_CONFIG: &str = r#"# The spoken demo of voice-backends (`voice-backends serve --demo`): every
# component runs offline, with no account and no download. Serve an edited
# copy with `voice-backends serve --config demo.toml --agent demo` (a binary
# built with `--features cli,demo`).
provider = "local"
pipeline_type = "stt_tts"
# Speech recognition: CMU PocketSphinx with its US English model.
stt_provider = "pocketsphinx"
# Speech synthesis: eSpeak NG with its English voice built in.
tts_provider = "espeak"
# Speech or not, frame by frame: WebRTC's voice activity detector.
vad_provider = "webrtc"
# Background noise removed before anything listens: RNNoise.
noise_cancellation_provider = "denoise"
# A turn ends after a pause in the speech.
turn_detection_provider = "silence"
# The time the agent has to answer (it answers at once; recognition of a long
# turn on a slow machine takes longer).
timeout = "30s"

[components.silence]
# How long a pause ends a turn.
min_endpointing_delay = "700ms"
max_endpointing_delay = "3s"
# Shorter sounds (a click, a cough) are not a turn.
min_speech = "200ms"
"#;

/// The features `serve --demo` needs (all of them come with `demo`).
const DEMO_FEATURES: bool = cfg!(all(
    feature = "espeak",
    feature = "pocketsphinx",
    feature = "webrtc-vad",
    feature = "denoise"
));

/// What `serve --demo` says in a binary built without the `demo` feature.
pub const DEMO_NOT_BUILT: &str = "serve --demo needs the `demo` feature (offline speech \
    recognition and synthesis), and this binary was built without it: run \
    `cargo run --release --features cli,demo -- serve --demo`. PocketSphinx needs its \
    library and English model to build: `sudo apt install libpocketsphinx-dev \
    pocketsphinx-en-us` (Debian, Ubuntu)";

/// [`DEMO_CONFIG`] as a [`Config`].
pub fn demo_config() -> Config {
    // A constant, checked by a test: it always parses.
    Config::from_toml_str(DEMO_CONFIG).unwrap_or_else(|_| default_config())
}

/// The agent `serve` gives its sessions: `--agent`'s, else the
/// [demo agent](crate::demo::DemoAgent) with `--demo` or without
/// `--config`, else none.
pub fn serve_agent(args: &ServeArgs) -> Option<Arc<dyn Agent>> {
    match args.agent.as_deref() {
        Some("echo") => Some(echo_agent()),
        Some(_) => Some(Arc::new(DemoAgent::new())),
        None if args.demo || args.config.is_none() => Some(Arc::new(DemoAgent::new())),
        None => None,
    }
}

/// The backend config `serve` would use: the file of `--config` (or
/// [`DEMO_CONFIG`] with `--demo`, else [`default_config`]), with the
/// environment overlaid when `--env-prefix` is given.
///
/// # Errors
///
/// [`exit::FAILURE`] naming every invalid field.
///
/// [`exit::FAILURE`]: super::exit::FAILURE
pub fn serve_config(args: &ServeArgs) -> Result<Config, Failure> {
    let config = load_config(args)?;
    check_config(args, &config)?;
    Ok(config)
}

/// The config file, the demo's or the default, with the environment
/// overlaid; not checked against the registered components.
fn load_config(args: &ServeArgs) -> Result<Config, Failure> {
    let mut config = match &args.config {
        Some(path) => Config::from_path(path).map_err(|e| {
            file_failure(path).unwrap_or_else(|| {
                config_failure(
                    &format!("invalid config file {}", path.display()),
                    &e,
                    &format!(
                        "run `voice-backends validate {}` to see every error with its line",
                        path.display()
                    ),
                )
            })
        })?,
        None if args.demo => demo_config(),
        None => default_config(),
    };
    if let Some(prefix) = &args.env_prefix {
        config.apply_process_env(prefix).map_err(|e| {
            config_failure(
                &format!("invalid config after applying the {prefix}_* environment variables"),
                &e,
                &format!("fix or unset the {prefix}_* environment variables named above"),
            )
        })?;
    }
    Ok(config)
}

/// What `validate` checks beyond loading, for [`serve_config`].
fn check_config(args: &ServeArgs, config: &Config) -> Result<(), Failure> {
    // What `validate` checks beyond loading: the provider's own config and
    // the components and their options, so a backend whose every session
    // would fail is refused here, not served.
    let problems = semantic_problems(config);
    if !problems.is_empty() {
        if let (Some(path), None) = (&args.config, &args.env_prefix)
            && let Some(failure) = file_failure(path)
        {
            return Err(failure);
        }
        let noun = if problems.len() == 1 {
            "error"
        } else {
            "errors"
        };
        let mut message = format!("invalid config: {} {noun}", problems.len());
        for p in &problems {
            let path = p.path.as_deref().unwrap_or("config");
            message.push_str(&format!("\n  {path}: {}", p.message));
        }
        message.push_str(&match &args.config {
            Some(path) => format!(
                "\nrun `voice-backends validate {}` to see every error with its line",
                path.display()
            ),
            None => "\nfix the settings named above".to_owned(),
        });
        return Err(Failure::failed(message));
    }
    Ok(())
}

/// `serve --print-config`: the config `serve` would use, as TOML. The
/// demo's is printed as written, with its comments, unless the environment
/// changes it; secrets in a config file are printed redacted.
fn print_config(args: &ServeArgs, out: &mut dyn Write) -> Result<(), Failure> {
    let text = if args.demo && args.env_prefix.is_none() {
        DEMO_CONFIG.to_owned()
    } else {
        load_config(args)?
            .to_toml_string()
            .map_err(|e| Failure::failed(format!("cannot print the config: {}", e.message)))?
    };
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(write_failed)
}

/// Every problem `validate` finds in the config file at `path`, as one
/// failure listing them all with their lines (`None` when it finds none),
/// so that `serve` and `validate` report the same errors.
fn file_failure(path: &Path) -> Option<Failure> {
    let diagnostics = validate_file(path);
    if diagnostics.is_empty() {
        return None;
    }
    let n = diagnostics.len();
    let mut message = format!(
        "invalid config file {}: {n} {}",
        path.display(),
        if n == 1 { "error" } else { "errors" }
    );
    for d in &diagnostics {
        message.push_str(&format!("\n  {d}"));
    }
    message.push_str(&format!(
        "\nfix {} and check with `voice-backends validate {}`",
        if n == 1 { "it" } else { "them" },
        path.display()
    ));
    Some(Failure::failed(message))
}

/// A config error as a failure: `context` and one `  PATH: MESSAGE` line per
/// invalid field (or, for a parse error or an error without fields, the
/// error's own message, which has the position), then `hint`.
fn config_failure(context: &str, error: &BackendError, hint: &str) -> Failure {
    let details: Vec<_> = error
        .details
        .iter()
        .filter(|(path, _)| path.as_str() != "file")
        .collect();
    let parse_error = ["TOML", "YAML", "JSON"]
        .iter()
        .any(|f| error.message.starts_with(&format!("invalid {f}:")));
    let mut message = if details.is_empty() || parse_error {
        error.message.clone()
    } else {
        let noun = if details.len() == 1 {
            "error"
        } else {
            "errors"
        };
        let mut m = format!("{context}: {} {noun}", details.len());
        for (path, detail) in details {
            m.push_str(&format!("\n  {path}: {detail}"));
        }
        m
    };
    message.push_str(&format!("\n{hint}"));
    Failure::failed(message)
}

/// The server config of `serve`: [`ServerConfig::default`] with the command
/// line's `--listen`, `--workers`, `--allowed-origin`, `--allowed-host` and
/// `--max-frame-bytes`.
pub fn server_config(args: &ServeArgs) -> ServerConfig {
    let mut config = ServerConfig {
        listen: args.listen,
        ..ServerConfig::default()
    };
    if !args.allowed_origins.is_empty() {
        config.allowed_origins = args.allowed_origins.clone();
    }
    config.allowed_hosts = args.allowed_hosts.clone();
    if let Some(n) = args.max_frame_bytes {
        config.max_frame_bytes = n;
    }
    if let Some(window) = args.resume_window {
        config.resume_window = window;
    }
    config.workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .min(crate::server::MAX_WORKERS)
    });
    config
}

/// The log filter: `RUST_LOG` when it is set and parses, else the config's
/// `log_level`.
fn init_logging(config: &Config) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let rust_log = std::env::var("RUST_LOG").ok();
    let (layer, bad_rust_log) = log_layer(
        config,
        rust_log.as_deref(),
        std::io::stderr,
        std::io::stderr().is_terminal(),
    );
    let _ = tracing_subscriber::registry().with(layer).try_init();
    if let Some(e) = bad_rust_log {
        tracing::warn!(
            "RUST_LOG does not parse ({e}); logging at the config's level {}",
            level_name(config)
        );
    }
}

/// The level `config` logs at: its `log_level`, or `off` with
/// `enable_logging = false`.
fn level_name(config: &Config) -> &'static str {
    if !config.enable_logging {
        return "off";
    }
    match config.log_level {
        LogLevel::Trace => "trace",
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
    }
}

/// The binary's log layer, writing to `writer`, and why `rust_log` was set
/// aside when it does not parse.
///
/// - The level is the config's ([`level_name`]), unless `rust_log` (the
///   `RUST_LOG` variable) is set and parses.
/// - `enable_tracing = false`: events only, no spans (no context on lines).
/// - Never tungstenite's `trace` level, whatever the filter: it logs a client
///   handshake's whole request, the bot's `Authorization` header and URL
///   included.
fn log_layer<S, W>(
    config: &Config,
    rust_log: Option<&str>,
    writer: W,
    ansi: bool,
) -> (impl tracing_subscriber::Layer<S>, Option<String>)
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::{EnvFilter, Layer};

    let level = level_name(config);
    let mut bad_rust_log = None;
    let filter = match rust_log {
        Some(value) if !value.trim().is_empty() => match EnvFilter::try_new(value) {
            Ok(filter) => filter,
            Err(e) => {
                bad_rust_log = Some(format!("{e}"));
                EnvFilter::new(level)
            }
        },
        _ => EnvFilter::new(level),
    };
    let spans = config.enable_tracing;
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_filter(filter)
        .with_filter(tracing_subscriber::filter::filter_fn(move |meta| {
            let handshake_dump =
                meta.target().starts_with("tungstenite") && *meta.level() == tracing::Level::TRACE;
            !handshake_dump && (spans || meta.is_event())
        }));
    (layer, bad_rust_log)
}

/// `voice-backends serve`: builds, starts and serves the backend until
/// SIGTERM or Ctrl-C, then stops gracefully.
///
/// # Errors
///
/// [`exit::FAILURE`] for an invalid config, a backend that does not start, an
/// address that cannot be bound, or a server that stops with an error.
///
/// [`exit::FAILURE`]: super::exit::FAILURE
pub fn serve(args: &ServeArgs, out: &mut dyn Write) -> Result<(), Failure> {
    if args.print_config {
        return print_config(args, out);
    }
    if args.demo && !DEMO_FEATURES {
        return Err(Failure::failed(DEMO_NOT_BUILT));
    }
    let config = serve_config(args)?;
    init_logging(&config);
    let server_config = server_config(args);
    let store = store_choice(args)?;
    let agent = serve_agent(args);
    // With worker threads serving the connections, this runtime only starts
    // the backend, accepts connections and waits for the signal.
    let mut runtime = if server_config.workers == 0 {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = runtime
        .enable_all()
        .thread_name("voice-backends")
        .build()
        .map_err(|e| Failure::failed(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        let store = open_store(&store).await?;
        serve_with(config, server_config, store, agent, out, shutdown).await
    })
}

/// Where `serve` keeps its sessions (`--store`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreChoice {
    /// Nowhere: sessions are ephemeral.
    None,
    /// In the process ([`MemoryStore`](crate::store::MemoryStore)).
    Memory,
    /// An embedded database file ([`EmbeddedStore`](crate::store::EmbeddedStore)).
    File(PathBuf),
    /// Redis at this URL (`redis` feature).
    Redis(String),
}

/// The store `--store` names, or the default: the file
/// `sessions-ADDR-PORT.redb` in the data directory
/// (`$XDG_DATA_HOME/voice-backends`, else `~/.local/share/voice-backends`),
/// or `memory` when listening on port 0 (a new address each run: nothing
/// to come back to) or when there is no data directory.
///
/// # Errors
///
/// A `redis://` URL in a binary built without the `redis` feature.
pub fn store_choice(args: &ServeArgs) -> Result<StoreChoice, Failure> {
    match args.store.as_deref() {
        Some("none") => Ok(StoreChoice::None),
        Some("memory") => Ok(StoreChoice::Memory),
        Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
            if cfg!(feature = "redis") {
                Ok(StoreChoice::Redis(url.to_owned()))
            } else {
                Err(Failure::failed(
                    "--store redis://... needs the redis feature: build with \
                     `--features cli,redis`",
                ))
            }
        }
        Some(path) => Ok(StoreChoice::File(PathBuf::from(path))),
        None => Ok(default_store(
            args.listen,
            std::env::var_os("XDG_DATA_HOME").map(PathBuf::from),
            std::env::var_os("HOME").map(PathBuf::from),
        )),
    }
}

/// The default store of a server listening on `listen`.
fn default_store(
    listen: SocketAddr,
    xdg_data_home: Option<PathBuf>,
    home: Option<PathBuf>,
) -> StoreChoice {
    if listen.port() == 0 {
        return StoreChoice::Memory;
    }
    let dir = xdg_data_home
        .filter(|d| d.is_absolute())
        .or_else(|| home.map(|h| h.join(".local/share")));
    let Some(dir) = dir else {
        return StoreChoice::Memory;
    };
    let ip: String = listen
        .ip()
        .to_string()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    StoreChoice::File(
        dir.join("voice-backends")
            .join(format!("sessions-{ip}-{}.redb", listen.port())),
    )
}

/// Opens the chosen store.
///
/// # Errors
///
/// A file that cannot be opened (or another process holds), a Redis server
/// that cannot be reached.
pub async fn open_store(choice: &StoreChoice) -> Result<Option<Arc<dyn SessionStore>>, Failure> {
    match choice {
        StoreChoice::None => Ok(None),
        StoreChoice::Memory => Ok(Some(Arc::new(crate::store::MemoryStore::new()))),
        StoreChoice::File(path) => crate::store::EmbeddedStore::open(path)
            .map(|s| Some(Arc::new(s) as Arc<dyn SessionStore>))
            .map_err(|e| {
                Failure::failed(format!(
                    "{}; pass another --store (a file, memory or none)",
                    e.message
                ))
            }),
        #[cfg(feature = "redis")]
        StoreChoice::Redis(url) => crate::store::RedisStore::connect(url)
            .await
            .map(|s| Some(Arc::new(s) as Arc<dyn SessionStore>))
            .map_err(|e| Failure::failed(e.into_fields().message)),
        #[cfg(not(feature = "redis"))]
        StoreChoice::Redis(_) => Err(Failure::failed(
            "--store redis://... needs the redis feature",
        )),
    }
}

/// `--agent echo`: answers each turn with the user's words and the number
/// of earlier messages of the conversation it was given.
pub fn echo_agent() -> Arc<dyn Agent> {
    agent_fn(|turn| async move {
        Ok(AgentReply::text(format!(
            "you said: {} ({} earlier messages)",
            turn.transcript,
            turn.history.len()
        )))
    })
}

/// A backend whose sessions get `agent` when they have none: opened,
/// resumed, or restored by `start`.
struct WithAgent {
    inner: Arc<dyn VoiceBackend>,
    agent: Arc<dyn Agent>,
}

impl std::fmt::Debug for WithAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

#[async_trait]
impl VoiceBackend for WithAgent {
    fn provider(&self) -> &str {
        self.inner.provider()
    }
    fn set_hooks(&self, hooks: Hooks) {
        self.inner.set_hooks(hooks);
    }
    async fn start(&self) -> VbResult<()> {
        self.inner.start().await?;
        for session in self.inner.list_sessions().await {
            session.set_agent(self.agent.clone());
        }
        Ok(())
    }
    async fn stop(&self) -> VbResult<()> {
        self.inner.stop().await
    }
    async fn create_session(&self, mut config: SessionConfig) -> VbResult<Arc<dyn VoiceSession>> {
        if config.agent.is_none() {
            config.agent = Some(self.agent.clone());
        }
        self.inner.create_session(config).await
    }
    async fn get_session(&self, id: &SessionId) -> VbResult<Arc<dyn VoiceSession>> {
        self.inner.get_session(id).await
    }
    async fn list_sessions(&self) -> Vec<Arc<dyn VoiceSession>> {
        self.inner.list_sessions().await
    }
    async fn close_session(&self, id: &SessionId) -> VbResult<()> {
        self.inner.close_session(id).await
    }
    async fn health_check(&self) -> HealthStatus {
        self.inner.health_check().await
    }
    fn connection_state(&self) -> ConnectionState {
        self.inner.connection_state()
    }
    fn active_session_count(&self) -> usize {
        self.inner.active_session_count()
    }
    fn config(&self) -> Arc<Config> {
        self.inner.config()
    }
    async fn update_config(&self, config: Config) -> VbResult<()> {
        self.inner.update_config(config).await
    }
    fn metrics(&self) -> Option<Arc<crate::metrics::Metrics>> {
        self.inner.metrics()
    }
    fn set_session_store(&self, store: Arc<dyn SessionStore>) {
        self.inner.set_session_store(store);
    }
    async fn resume_session(
        &self,
        id: &SessionId,
        token: &Secret,
    ) -> VbResult<Arc<dyn VoiceSession>> {
        let session = self.inner.resume_session(id, token).await?;
        session.set_agent(self.agent.clone());
        Ok(session)
    }
}

/// Serves `config`'s backend on `server_config` until `shutdown` completes,
/// then stops gracefully. Writes `listening on http://ADDR` to `out` once the
/// socket is bound.
///
/// # Errors
///
/// As [`serve`].
pub async fn serve_until(
    config: Config,
    server_config: ServerConfig,
    out: &mut dyn Write,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Failure> {
    serve_with(config, server_config, None, None, out, shutdown).await
}

/// [`serve_until`] with the sessions kept in `store` (restored on start)
/// and, when `agent` is set, answered by it.
///
/// # Errors
///
/// As [`serve`].
pub async fn serve_with(
    config: Config,
    server_config: ServerConfig,
    store: Option<Arc<dyn SessionStore>>,
    agent: Option<Arc<dyn Agent>>,
    out: &mut dyn Write,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Failure> {
    server_config
        .validate()
        .map_err(|e| Failure::failed(format!("invalid server options: {}", e.message)))?;
    let mut backend: Arc<dyn VoiceBackend> = registry()
        .create(&config.provider, &config)
        .await
        .map_err(|e| {
            config_failure(
                "the backend could not be created",
                &e,
                "check the config with `voice-backends validate FILE` and the provider \
                 names with `voice-backends providers`",
            )
        })?;
    if let Some(agent) = agent {
        backend = Arc::new(WithAgent {
            inner: backend,
            agent,
        });
    }
    if let Some(store) = store {
        tracing::info!(store = ?store, "sessions are kept");
        backend.set_session_store(store);
    }
    backend.start().await.map_err(|e| {
        Failure::failed(format!(
            "the {} backend did not start: {}",
            config.provider, e.message
        ))
    })?;
    tracing::info!(provider = %config.provider, "backend started");

    let server = match Server::bind(Arc::clone(&backend), server_config).await {
        Ok(server) => server,
        Err(e) => {
            let _ = backend.stop().await;
            // The message names the address ("could not listen on ...").
            return Err(Failure::failed(if e.code == ErrorCode::ConnectionFailed {
                format!(
                    "{}; pick another address with --listen (port 0 picks a free one)",
                    e.message
                )
            } else {
                e.into_fields().message
            }));
        }
    };
    let addr = server.local_addr();
    writeln!(out, "listening on http://{addr}")
        .and_then(|()| out.flush())
        .map_err(write_failed)?;
    tracing::info!(%addr, "listening");

    server.run(shutdown).await.map_err(|e| {
        tracing::error!(error = %e, "the server stopped with an error");
        Failure::failed(format!("the server stopped with an error: {e}"))
    })?;
    tracing::info!("stopped gracefully");
    Ok(())
}

/// A future that completes on the first SIGTERM or Ctrl-C (SIGINT), logging
/// which; after it, a second signal exits the process at once with status
/// 130.
///
/// # Errors
///
/// [`exit::FAILURE`] if the signal handlers cannot be installed. Must be
/// called inside a tokio runtime.
///
/// [`exit::FAILURE`]: super::exit::FAILURE
fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static, Failure> {
    #[cfg(unix)]
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Failure::failed(format!("cannot handle SIGTERM: {e}")))?;
    Ok(async move {
        #[cfg(unix)]
        let which = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "Ctrl-C",
        };
        #[cfg(not(unix))]
        let which = {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        };
        tracing::info!(
            signal = which,
            "shutdown requested; stopping gracefully (send it again to exit at once)"
        );
        tokio::spawn(async move {
            #[cfg(unix)]
            tokio::select! {
                _ = terminate.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
            #[cfg(not(unix))]
            let _ = tokio::signal::ctrl_c().await;
            tracing::warn!("second signal: exiting without waiting for the graceful stop");
            std::process::exit(130);
        });
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{ConfigFormat, validate_str};

    /// What the binary's log layer writes for a few events, at `rust_log`.
    fn logged(config: &Config, rust_log: Option<&str>) -> String {
        use std::sync::Mutex;
        use tracing_subscriber::layer::SubscriberExt;

        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let (layer, bad) = log_layer(config, rust_log, move || writer.clone(), false);
        assert_eq!(bad, None);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("session", user = "u-7");
            let _entered = span.enter();
            tracing::trace!(
                target: "tungstenite::handshake::client",
                "Client handshake request: Authorization: Bearer sk-hidden-1"
            );
            tracing::debug!(target: "tungstenite::protocol", "received frame");
            tracing::trace!(target: "voice_backends::server", "trace line kept");
            tracing::info!(target: "voice_backends::server", "info line kept");
        });
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn tungstenite_trace_lines_are_never_logged_whatever_the_level() {
        let mut config = default_config();
        config.log_level = LogLevel::Trace;
        for rust_log in [None, Some("trace"), Some("tungstenite=trace")] {
            let out = logged(&config, rust_log);
            assert!(!out.contains("sk-hidden-1"), "{rust_log:?}: {out}");
            if rust_log != Some("tungstenite=trace") {
                assert!(out.contains("trace line kept"), "{rust_log:?}: {out}");
            }
            // tungstenite's other levels still come through.
            assert!(out.contains("received frame"), "{rust_log:?}: {out}");
        }
    }

    #[test]
    fn the_log_switches_silence_lines_and_spans() {
        let mut config = default_config();
        config.log_level = LogLevel::Info;
        let out = logged(&config, None);
        assert!(
            out.contains("info line kept") && out.contains("session"),
            "{out}"
        );
        assert!(!out.contains("trace line kept"), "{out}");

        config.enable_tracing = false;
        let out = logged(&config, None);
        assert!(
            out.contains("info line kept") && !out.contains("session"),
            "{out}"
        );

        config.enable_logging = false;
        assert_eq!(logged(&config, None), "");
        // RUST_LOG still asks for lines.
        assert!(logged(&config, Some("info")).contains("info line kept"));
    }

    fn serve_args(line: &[&str]) -> ServeArgs {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from(line).unwrap();
        let crate::cli::Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        args
    }

    #[test]
    fn the_demo_config_is_the_offline_cascade() {
        let config = demo_config();
        assert_eq!(config.provider, "local");
        assert_eq!(config.pipeline_type, PipelineType::SttTts);
        assert_eq!(config.stt_provider.as_deref(), Some("pocketsphinx"));
        assert_eq!(config.tts_provider.as_deref(), Some("espeak"));
        assert_eq!(config.vad_provider.as_deref(), Some("webrtc"));
        assert_eq!(
            config.noise_cancellation_provider.as_deref(),
            Some("denoise")
        );
        assert_eq!(config.turn_detection_provider.as_deref(), Some("silence"));
        assert!(config.components.contains_key("silence"));
        assert_eq!(
            Config::from_toml_str(DEMO_CONFIG).unwrap(),
            config,
            "the constant parses"
        );
        let args = serve_args(&["voice-backends", "serve", "--demo"]);
        if DEMO_FEATURES {
            // Its components and their options, as `validate` checks them.
            assert_eq!(
                validate_str(DEMO_CONFIG, ConfigFormat::Toml, "demo.toml"),
                []
            );
            assert_eq!(serve_config(&args).unwrap(), config);
        }
    }

    #[test]
    fn print_config_prints_what_would_be_served() {
        let mut out = Vec::new();
        let args = serve_args(&["voice-backends", "serve", "--demo", "--print-config"]);
        serve(&args, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), DEMO_CONFIG);

        let mut out = Vec::new();
        serve(
            &serve_args(&["voice-backends", "serve", "--print-config"]),
            &mut out,
        )
        .unwrap();
        let printed = Config::from_toml_str(std::str::from_utf8(&out).unwrap()).unwrap();
        assert_eq!(printed, default_config());
    }

    #[test]
    fn demo_without_its_feature_says_how_to_build_it_and_demo_takes_no_config() {
        let args = serve_args(&[
            "voice-backends",
            "serve",
            "--demo",
            "--listen",
            "127.0.0.1:0",
        ]);
        if !DEMO_FEATURES {
            let failure = serve(&args, &mut Vec::new()).unwrap_err();
            assert_eq!(failure.exit_code, crate::cli::exit::FAILURE);
            assert_eq!(failure.message, DEMO_NOT_BUILT);
        }
        for needed in [
            "cargo run --release --features cli,demo -- serve --demo",
            "apt install libpocketsphinx-dev pocketsphinx-en-us",
        ] {
            assert!(DEMO_NOT_BUILT.contains(needed), "{DEMO_NOT_BUILT}");
        }
        use clap::Parser;
        let both = crate::cli::Cli::try_parse_from([
            "voice-backends",
            "serve",
            "--demo",
            "--config",
            "x.toml",
        ])
        .unwrap_err();
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[tokio::test]
    async fn sessions_get_the_demo_agent_unless_a_config_or_agent_says_otherwise() {
        let said = |agent: Option<Arc<dyn Agent>>| async move {
            let turn = crate::agent::AgentTurn::new("s", "u", "repeat after me: hi there", 1);
            let mut reply = agent.expect("an agent").respond(turn).await.unwrap();
            let mut text = reply.text.clone();
            if let Some(mut chunks) = reply.take_stream() {
                while let Some(chunk) = chunks.recv().await {
                    text.push_str(&chunk.unwrap());
                }
            }
            text
        };
        let default = serve_args(&["voice-backends", "serve"]);
        assert_eq!(said(serve_agent(&default)).await, "hi there");
        let demo = serve_args(&["voice-backends", "serve", "--demo"]);
        assert_eq!(said(serve_agent(&demo)).await, "hi there");
        let echo = serve_args(&["voice-backends", "serve", "--demo", "--agent", "echo"]);
        assert_eq!(
            said(serve_agent(&echo)).await,
            "you said: repeat after me: hi there (0 earlier messages)"
        );
        let config = serve_args(&["voice-backends", "serve", "--config", "x.toml"]);
        assert!(serve_agent(&config).is_none());
        let config = serve_args(&["voice-backends", "serve", "-c", "x.toml", "--agent", "demo"]);
        assert_eq!(said(serve_agent(&config)).await, "hi there");
    }

    #[test]
    fn default_config_is_valid() {
        let config = default_config();
        assert!(config.validate().is_ok());
        let text = config.to_toml_string().unwrap();
        assert_eq!(validate_str(&text, ConfigFormat::Toml, "x.toml"), []);
    }
}
