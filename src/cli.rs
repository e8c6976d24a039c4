//! The `voice-backends` command-line tool (feature `cli`).
//!
//! The binary is a thin `main` around [`run`]; everything it does lives here so
//! it can be tested. Four commands:
//!
//! | command | what it does |
//! | --- | --- |
//! | `serve [--config FILE] [--listen ADDR] [--workers N] [--env-prefix PREFIX] [--allowed-origin ORIGIN]... [--max-frame-bytes N]` | runs the HTTP + WebSocket [`Server`] in front of a backend |
//! | `providers [--json]` | lists the compiled-in providers and their capabilities |
//! | `schema PROVIDER` | prints a provider's `provider_config` JSON Schema |
//! | `validate FILE` | checks a config file and reports every error with its field path and line |
//!
//! Exit statuses: [`exit::SUCCESS`] (0), [`exit::FAILURE`] (1: the command
//! ran and found or hit a problem, e.g. an invalid config) and [`exit::USAGE`]
//! (2: the command line itself is wrong, e.g. an unknown provider or option).
//!
//! # `validate`'s line numbers
//!
//! Every problem is printed as `FILE:LINE:COL: PATH: MESSAGE`, or
//! `FILE: PATH: MESSAGE` when no position is known:
//!
//! - syntax and type errors carry the parser's own position in every format;
//! - TOML: every semantic error (a value out of range, an unknown component,
//!   a bad `provider_config` or `[components.<name>]` key, ...) is mapped to
//!   the key it names through the `toml` crate's spanned parse, so the
//!   position is exact. A key that is missing (e.g. `s2s_provider` required
//!   by `pipeline_type = "s2s"`) points at its closest written parent, or has
//!   no position at top level;
//! - JSON: a small scanner finds the key (or array element) of each path; as
//!   exact as for TOML;
//! - YAML: best effort, by indentation. Block mappings and `- ` sequences
//!   (indented or not) are followed; flow collections (`{...}`, `[...]`),
//!   anchors and aliases, multi-line keys and multi-document files are not:
//!   a path through them points at the deepest key found, or has no position.
//!
//! Line and column count from 1; columns count characters.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::backend::VoiceBackend;
use crate::config::{Config, LogLevel, PipelineType};
use crate::error::{BackendError, ErrorCode};
use crate::provider::ProviderCapabilities;
use crate::registry::registry;
use crate::server::{Server, ServerConfig};

/// The exit statuses of the tool.
pub mod exit {
    /// The command did what was asked (for `validate`: the file is valid).
    pub const SUCCESS: u8 = 0;
    /// The command ran and failed: an invalid config, a backend or server
    /// that could not start, a server that stopped with an error.
    pub const FAILURE: u8 = 1;
    /// The command line is wrong: an unknown command, option or provider.
    pub const USAGE: u8 = 2;
}

/// The address `serve` listens on by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8089";

/// The `voice-backends` command line.
#[derive(Debug, Parser)]
#[command(
    name = "voice-backends",
    version,
    about = "Run, inspect and check voice-backends providers and configs",
    long_about = "Run, inspect and check voice-backends providers and configs.\n\n\
        Start with `voice-backends serve`: with no config it runs the built-in \
        `local` backend (an echo speech-to-speech pipeline that needs no keys \
        and no models) on http://127.0.0.1:8089.",
    after_help = "Exit status: 0 on success, 1 when the command fails (e.g. an invalid \
        config), 2 for a wrong command line (e.g. an unknown provider)."
)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands of the tool.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP + WebSocket server in front of a backend.
    #[command(
        long_about = "Run the HTTP + WebSocket server in front of a backend.\n\n\
        The backend is built from --config, or without it from the default config: \
        provider \"local\", pipeline_type \"s2s\" with the \"echo\" model, \"energy\" \
        VAD and \"silence\" turn detection (no keys, no models). Once listening it \
        prints one line, `listening on http://ADDR`, to standard output; logs go to \
        standard error at RUST_LOG's level, or else the config's log_level.\n\n\
        SIGTERM or Ctrl-C stops it gracefully: it stops accepting connections, lets \
        in-flight turns finish, closes every WebSocket with status 1001 and exits 0. \
        A second signal exits at once."
    )]
    Serve(ServeArgs),
    /// List the compiled-in providers and their capabilities.
    Providers(ProvidersArgs),
    /// Print a provider's config (`provider_config`) JSON Schema.
    Schema(SchemaArgs),
    /// Check a config file; report every error with its field path and line.
    #[command(long_about = "Check a config file and report every error at once.\n\n\
        The file is parsed by its extension (.toml, .yaml/.yml or .json) and checked \
        by the generic rules, by the provider's own validation (provider_config keys) \
        and against the registered pipeline components (their names and their \
        [components.<name>] options). Each error is printed as \
        FILE:LINE:COL: PATH: MESSAGE (FILE: PATH: MESSAGE when no position is known). \
        Exits 1 when there is any error, else prints `FILE: ok` and exits 0.")]
    Validate(ValidateArgs),
}

/// Options of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The backend config: a .toml, .yaml/.yml or .json file. Without it, the
    /// local echo backend (see `serve --help`).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The address to listen on; port 0 picks a free port (the line printed at
    /// start says which).
    #[arg(long, short = 'l', value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Overlay the environment variables `{PREFIX}_{FIELD}` on the config,
    /// e.g. `--env-prefix VB` reads VB_LATENCY_TARGET=300ms. Nothing is read
    /// from the environment without it.
    #[arg(long, value_name = "PREFIX")]
    pub env_prefix: Option<String>,
    /// A browser origin allowed to open WebSockets (repeat for several), e.g.
    /// `https://app.example.com`. Without any, only pages served by this
    /// server's own host may.
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,
    /// A host name the server may be reached by (repeat for several), e.g.
    /// `voice.example.com`, `.example.com` for a domain and its subdomains,
    /// or `*` for any. Requests whose `Host` names another are refused
    /// (against DNS rebinding). Without any: loopback names and IP addresses
    /// when listening on loopback, any host otherwise.
    #[arg(long = "allowed-host", value_name = "HOST")]
    pub allowed_hosts: Vec<String>,
    /// The largest WebSocket message accepted, in bytes (default: the
    /// server's).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(usize))]
    pub max_frame_bytes: Option<usize>,
    /// Threads serving the connections (default: one per core, at most
    /// 1024). Each serves the connections handed to it, with their sessions;
    /// 0 serves them all on one shared, work-stealing runtime instead.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(usize))]
    pub workers: Option<usize>,
}

/// Options of `providers`.
#[derive(Debug, Clone, Args)]
pub struct ProvidersArgs {
    /// Print JSON (an array of `{"name", "capabilities"}`) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Options of `schema`.
#[derive(Debug, Clone, Args)]
pub struct SchemaArgs {
    /// The provider's registered name, e.g. `local` (see `voice-backends providers`).
    #[arg(value_name = "PROVIDER")]
    pub provider: String,
}

/// Options of `validate`.
#[derive(Debug, Clone, Args)]
pub struct ValidateArgs {
    /// The config file to check: .toml, .yaml/.yml or .json.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// Why a command failed: the message to print (after `error: `) and the exit
/// status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The exit status, one of [`exit`]'s.
    pub exit_code: u8,
    /// What went wrong and what to do about it.
    pub message: String,
}

impl Failure {
    /// A failure with status [`exit::FAILURE`].
    pub fn failed(message: impl Into<String>) -> Self {
        Failure {
            exit_code: exit::FAILURE,
            message: message.into(),
        }
    }

    /// A failure with status [`exit::USAGE`].
    pub fn usage(message: impl Into<String>) -> Self {
        Failure {
            exit_code: exit::USAGE,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// An I/O error writing the output, as a [`Failure`].
fn write_failed(e: std::io::Error) -> Failure {
    Failure::failed(format!("cannot write the output: {e}"))
}

/// Runs `cli` with the process's standard output and error; returns the exit
/// status.
pub fn run(cli: Cli) -> u8 {
    // Unlocked handles: `serve` runs for the life of the process, and its
    // log lines go to stderr from the runtime's threads, which would wait
    // for a lock held here forever.
    run_with(cli, &mut std::io::stdout(), &mut std::io::stderr())
}

/// Runs `cli`, writing its output to `out`; a failure is written to `err` as
/// `error: MESSAGE`. Returns the exit status.
pub fn run_with(cli: Cli, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let result = match cli.command {
        Command::Serve(args) => serve(&args, out),
        Command::Providers(args) => providers(&args, out),
        Command::Schema(args) => schema(&args, out),
        Command::Validate(args) => validate(&args, out),
    };
    match result {
        Ok(()) => exit::SUCCESS,
        Err(failure) => {
            let _ = writeln!(err, "error: {}", failure.message);
            let _ = err.flush();
            failure.exit_code
        }
    }
}

// ---------------------------------------------------------------------------
// providers

/// One provider as `providers --json` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProviderInfo {
    /// The registered name.
    pub name: String,
    /// What it can do.
    pub capabilities: ProviderCapabilities,
}

/// Every compiled-in provider (of the global [`registry()`]), sorted by name.
///
/// # Errors
///
/// The registry's error for a name registered twice at link time.
pub fn provider_infos() -> Result<Vec<ProviderInfo>, BackendError> {
    registry()
        .list_providers()
        .into_iter()
        .map(|name| {
            let provider = registry().get_provider(name)?;
            Ok(ProviderInfo {
                name: name.to_owned(),
                capabilities: provider.capabilities(),
            })
        })
        .collect()
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// `providers` as an aligned text table, one provider a row, with a header.
pub fn providers_table(infos: &[ProviderInfo]) -> String {
    let header = [
        "name",
        "s2s",
        "multi-user",
        "persistence",
        "custom auth",
        "custom rate limit",
        "max sessions",
        "min latency",
        "codecs",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for info in infos {
        let c = &info.capabilities;
        let codecs = c
            .codecs
            .iter()
            .map(|codec| {
                serde_json::to_value(codec)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| format!("{codec:?}"))
            })
            .collect::<Vec<_>>()
            .join(", ");
        rows.push(vec![
            info.name.clone(),
            yes_no(c.speech_to_speech).to_owned(),
            yes_no(c.multi_user).to_owned(),
            yes_no(c.session_persistence).to_owned(),
            yes_no(c.custom_auth).to_owned(),
            yes_no(c.custom_rate_limiting).to_owned(),
            if c.max_concurrent_sessions == 0 {
                "unlimited".to_owned()
            } else {
                c.max_concurrent_sessions.to_string()
            },
            humantime::format_duration(c.min_latency).to_string(),
            if codecs.is_empty() {
                "-".to_owned()
            } else {
                codecs
            },
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut table = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        table.push_str(line.trim_end());
        table.push('\n');
    }
    table
}

/// `voice-backends providers [--json]`.
///
/// # Errors
///
/// [`exit::FAILURE`] if a provider cannot be listed or the output not written.
pub fn providers(args: &ProvidersArgs, out: &mut dyn Write) -> Result<(), Failure> {
    let infos = provider_infos().map_err(|e| Failure::failed(e.into_fields().message))?;
    if args.json {
        let json = serde_json::to_string_pretty(&infos)
            .map_err(|e| Failure::failed(format!("cannot write JSON: {e}")))?;
        writeln!(out, "{json}").map_err(write_failed)?;
    } else {
        write!(out, "{}", providers_table(&infos)).map_err(write_failed)?;
    }
    out.flush().map_err(write_failed)
}

// ---------------------------------------------------------------------------
// schema

/// The JSON Schema of `provider`'s `provider_config`.
///
/// # Errors
///
/// [`exit::USAGE`] with the registry's message (which lists the available
/// providers) for an unknown name.
pub fn provider_schema(provider: &str) -> Result<serde_json::Value, Failure> {
    let provider = registry()
        .get_provider(provider)
        .map_err(|e| Failure::usage(e.into_fields().message))?;
    Ok(provider.config_schema().schema)
}

/// `voice-backends schema PROVIDER`: the schema, pretty-printed.
///
/// # Errors
///
/// As [`provider_schema`].
pub fn schema(args: &SchemaArgs, out: &mut dyn Write) -> Result<(), Failure> {
    let schema = provider_schema(&args.provider)?;
    let text = serde_json::to_string_pretty(&schema)
        .map_err(|e| Failure::failed(format!("cannot write JSON: {e}")))?;
    writeln!(out, "{text}").map_err(write_failed)?;
    out.flush().map_err(write_failed)
}

// ---------------------------------------------------------------------------
// validate

/// The file formats a config can be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigFormat {
    /// `.toml`
    Toml,
    /// `.yaml` or `.yml`
    Yaml,
    /// `.json`
    Json,
}

impl ConfigFormat {
    /// The format given by `path`'s extension (in any case), as
    /// [`Config::from_path`] reads it.
    pub fn from_path(path: &Path) -> Option<ConfigFormat> {
        let extension = path.extension()?.to_string_lossy().to_ascii_lowercase();
        match extension.as_str() {
            "toml" => Some(ConfigFormat::Toml),
            "yaml" | "yml" => Some(ConfigFormat::Yaml),
            "json" => Some(ConfigFormat::Json),
            _ => None,
        }
    }

    /// `TOML`, `YAML` or `JSON`.
    pub fn name(self) -> &'static str {
        match self {
            ConfigFormat::Toml => "TOML",
            ConfigFormat::Yaml => "YAML",
            ConfigFormat::Json => "JSON",
        }
    }
}

/// One problem `validate` found.
///
/// `Display` is `FILE:LINE:COL: PATH: MESSAGE`, leaving out the position and
/// the path when they are unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, as named on the command line.
    pub file: String,
    /// Line and column (from 1) of the offending key or value, when known.
    pub position: Option<(usize, usize)>,
    /// The field path, e.g. `latency_target` or `components.silence.min_speech`.
    pub path: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        f.write_str(": ")?;
        if let Some(path) = &self.path {
            write!(f, "{path}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// `voice-backends validate FILE`: prints every problem, or `FILE: ok`.
///
/// # Errors
///
/// [`exit::FAILURE`] when the file has any problem (each printed to `out`).
pub fn validate(args: &ValidateArgs, out: &mut dyn Write) -> Result<(), Failure> {
    let file = args.file.display().to_string();
    let diagnostics = validate_file(&args.file);
    for d in &diagnostics {
        writeln!(out, "{d}").map_err(write_failed)?;
    }
    if diagnostics.is_empty() {
        writeln!(out, "{file}: ok").map_err(write_failed)?;
    }
    out.flush().map_err(write_failed)?;
    match diagnostics.len() {
        0 => Ok(()),
        n => Err(Failure::failed(format!(
            "{file}: {n} config {}; fix {} and run validate again",
            if n == 1 { "error" } else { "errors" },
            if n == 1 { "it" } else { "them" },
        ))),
    }
}

/// Every problem of the config file at `path` (empty when it is valid); an
/// unreadable file or an unsupported extension is one problem.
pub fn validate_file(path: &Path) -> Vec<Diagnostic> {
    let file = path.display().to_string();
    let whole = |message: String| {
        vec![Diagnostic {
            file: file.clone(),
            position: None,
            path: None,
            message,
        }]
    };
    let Some(format) = ConfigFormat::from_path(path) else {
        let found = match path.extension() {
            Some(ext) => format!("extension {:?}", ext.to_string_lossy()),
            None => "no extension".to_owned(),
        };
        return whole(format!(
            "unsupported config file ({found}); use .toml, .yaml, .yml or .json"
        ));
    };
    match std::fs::read_to_string(path) {
        Ok(text) => validate_str(&text, format, &file),
        Err(e) => whole(format!("cannot read the file: {e}")),
    }
}

/// Every problem of `text`, a config in `format`, reported as being in
/// `file`, in the order they appear in the file (problems without a position
/// last).
///
/// A file that does not parse (bad syntax, an unknown key, a value of the
/// wrong type) has exactly one problem, the first the parser met. A file that
/// parses is checked by [`Config::violations_for`] the stages its provider
/// hosts, by its provider's
/// [`crate::BackendProvider::validate_config`], and against the registered pipeline
/// components: every name must be registered, and the options of each
/// VAD, turn detector, audio processor, speech-to-text and speech-to-speech
/// component in use must be accepted by it.
pub fn validate_str(text: &str, format: ConfigFormat, file: &str) -> Vec<Diagnostic> {
    let parsed: Result<Config, ()> = match format {
        // Too deep for the parsers: the loader refuses it (see `MAX_NESTING_DEPTH`).
        _ if crate::config::nesting_exceeded(text, format.name()) => Err(()),
        ConfigFormat::Toml => toml::from_str(text).map_err(|_| ()),
        ConfigFormat::Yaml => serde_yaml_ng::from_str(text).map_err(|_| ()),
        ConfigFormat::Json => serde_json::from_str(text).map_err(|_| ()),
    };
    let problems = match parsed {
        Ok(config) => semantic_problems(&config),
        Err(()) => vec![parse_problem(text, format)],
    };
    let mut diagnostics: Vec<Diagnostic> = problems
        .into_iter()
        .map(|p| {
            let position = p.position.or_else(|| {
                p.path
                    .as_deref()
                    .and_then(|path| locate(text, format, path))
            });
            Diagnostic {
                file: file.to_owned(),
                position,
                path: p.path,
                message: p.message,
            }
        })
        .collect();
    // In file order; those without a position last, in the order found.
    diagnostics.sort_by_key(|d| (d.position.is_none(), d.position));
    diagnostics
}

/// A problem before its file and position are known.
struct Problem {
    position: Option<(usize, usize)>,
    path: Option<String>,
    message: String,
}

impl Problem {
    fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            position: None,
            path: Some(path.into()),
            message: message.into(),
        }
    }
}

/// The parse error of `text`, taken from the crate's loader so its message
/// is the same (and as careful with secrets) as [`Config::from_path`]'s.
fn parse_problem(text: &str, format: ConfigFormat) -> Problem {
    let result = match format {
        ConfigFormat::Toml => Config::from_toml_str(text),
        ConfigFormat::Yaml => Config::from_yaml_str(text),
        ConfigFormat::Json => Config::from_json_str(text),
    };
    let error = match result {
        Err(e) => e,
        Ok(_) => {
            return Problem {
                position: None,
                path: None,
                message: format!("does not parse as {}", format.name()),
            };
        }
    };
    // `invalid FORMAT: [line L, column C: ][PATH: ]MESSAGE`, with a detail
    // PATH -> MESSAGE when there is a path.
    let prefix = format!("invalid {}: ", format.name());
    let rest = error
        .message
        .strip_prefix(&prefix)
        .unwrap_or(&error.message);
    let (position, rest) = split_position(rest);
    match error.details.iter().find(|(key, _)| key.as_str() != "file") {
        Some((path, message)) => Problem {
            position,
            path: Some(path.clone()),
            message: format!("invalid {}: {message}", format.name()),
        },
        None => Problem {
            position,
            path: None,
            message: format!("invalid {}: {rest}", format.name()),
        },
    }
}

/// Splits `line L, column C: ` off the front of `message`.
fn split_position(message: &str) -> (Option<(usize, usize)>, &str) {
    let parse = || {
        let rest = message.strip_prefix("line ")?;
        let (line, rest) = rest.split_once(", column ")?;
        let (column, rest) = rest.split_once(": ")?;
        Some(((line.parse().ok()?, column.parse().ok()?), rest))
    };
    match parse() {
        Some((position, rest)) => (Some(position), rest),
        None => (None, message),
    }
}

/// Every semantic problem of a config that parsed.
fn semantic_problems(config: &Config) -> Vec<Problem> {
    // Stages the provider's service runs need no component in the config.
    let hosted = registry()
        .get_provider(&config.provider)
        .map(|p| p.hosted_stages())
        .unwrap_or_default();
    let mut problems: Vec<Problem> = config
        .violations_for(hosted)
        .into_iter()
        .map(|v| Problem::at(v.path, v.message))
        .collect();
    let flagged: BTreeSet<String> = problems.iter().filter_map(|p| p.path.clone()).collect();

    if !flagged.contains("provider") {
        match registry().get_provider(&config.provider) {
            Err(e) => problems.push(Problem::at("provider", quoted_input(e))),
            Ok(provider) => {
                if let Err(e) = provider.validate_config(config) {
                    push_error(&mut problems, "provider_config", e);
                }
            }
        }
    }
    component_problems(config, &flagged, &mut problems);
    problems
}

/// The message of a registry error about a name the config gives, the name
/// shown as every config error shows input (cut where it looks secret; see
/// [`crate::shown_in_error`]).
fn quoted_input(error: BackendError) -> String {
    crate::config::ProviderSection::redact_quoted(&error.into_fields().message)
}

/// Adds `error` as one problem per detail (keyed by field path), or as one
/// problem at `fallback` when it has none.
fn push_error(problems: &mut Vec<Problem>, fallback: &str, error: BackendError) {
    let error = error.into_fields();
    let details: Vec<_> = error
        .details
        .into_iter()
        .filter(|(key, _)| key != "file")
        .collect();
    if details.is_empty() {
        problems.push(Problem::at(fallback, error.message));
    } else {
        for (path, message) in details {
            problems.push(Problem::at(path, message));
        }
    }
}

/// Checks every component the config names against the global component
/// registries: the name is registered and accepts its options.
fn component_problems(config: &Config, flagged: &BTreeSet<String>, problems: &mut Vec<Problem>) {
    use crate::pipeline::components;
    use crate::runtime::{DEFAULT_TURN_DETECTOR, DEFAULT_VAD};

    let reg = components();
    let options = |name: &str| config.component_options(name);
    // Components whose options were already reported: one report per name.
    let mut checked: BTreeSet<String> = BTreeSet::new();
    let mut options_checked = |name: &str| checked.insert(name.to_owned());

    // Opening speech streams may spawn tasks: give them a runtime that never
    // runs them (shut down right after), so nothing connects anywhere. It is
    // shut down in the background: dropping a runtime blocks, which panics
    // when the caller runs on a runtime of its own.
    struct Idle(Option<tokio::runtime::Runtime>);
    impl Drop for Idle {
        fn drop(&mut self) {
            if let Some(runtime) = self.0.take() {
                runtime.shutdown_background();
            }
        }
    }
    let runtime = Idle(tokio::runtime::Builder::new_current_thread().build().ok());
    let _guard = runtime.0.as_ref().map(tokio::runtime::Runtime::enter);

    let vad = config.vad_provider.as_deref();
    let vad_path = "vad_provider";
    if !flagged.contains(vad_path) {
        let name = vad.unwrap_or(DEFAULT_VAD);
        match reg.vad.get(name) {
            Err(e) => problems.push(Problem::at(vad_path, quoted_input(e))),
            Ok(factory) => {
                if options_checked(name)
                    && let Err(e) = factory.create(&options(name))
                {
                    push_error(problems, &format!("components.{name}"), e);
                }
            }
        }
    }

    let turn_path = "turn_detection_provider";
    if !flagged.contains(turn_path) {
        let name = config
            .turn_detection_provider
            .as_deref()
            .unwrap_or(DEFAULT_TURN_DETECTOR);
        match reg.turn.get(name) {
            Err(e) => problems.push(Problem::at(turn_path, quoted_input(e))),
            Ok(factory) => {
                if options_checked(name)
                    && let Err(e) = factory.create(&options(name))
                {
                    push_error(problems, &format!("components.{name}"), e);
                }
            }
        }
    }

    let noise_path = "noise_cancellation_provider";
    if let Some(name) = config.noise_cancellation_provider.as_deref()
        && !flagged.contains(noise_path)
    {
        match reg.processor.get(name) {
            Err(e) => problems.push(Problem::at(noise_path, quoted_input(e))),
            Ok(factory) => {
                if options_checked(name)
                    && let Err(e) = factory.create(&options(name), i32::MIN)
                {
                    push_error(problems, &format!("components.{name}"), e);
                }
            }
        }
    }

    for (i, p) in config.processors.iter().enumerate() {
        let path = format!("processors[{i}].name");
        if flagged.contains(&path) {
            continue;
        }
        match reg.processor.get(&p.name) {
            Err(e) => problems.push(Problem::at(path, quoted_input(e))),
            Ok(factory) => {
                let inline = p.has_inline_options();
                let opts = config.processor_options(p);
                let fallback = if inline {
                    format!("processors[{i}].options")
                } else {
                    format!("components.{}", p.name)
                };
                if (inline || options_checked(&p.name))
                    && let Err(e) = factory.create(&opts, p.order)
                {
                    push_error(problems, &fallback, e);
                }
            }
        }
    }

    let stt_path = "stt_provider";
    if let Some(name) = config.stt_provider.as_deref()
        && !flagged.contains(stt_path)
    {
        match reg.stt.get(name) {
            Err(e) => problems.push(Problem::at(stt_path, quoted_input(e))),
            Ok(stt) => {
                if config.pipeline_type == PipelineType::SttTts && options_checked(name) {
                    let (tx, _rx) = tokio::sync::mpsc::channel(1);
                    if let Err(e) = stt.open(&options(name), tx) {
                        push_error(problems, &format!("components.{name}"), e);
                    }
                }
            }
        }
    }

    let tts_path = "tts_provider";
    if let Some(name) = config.tts_provider.as_deref()
        && !flagged.contains(tts_path)
        && let Err(e) = reg.tts.get(name)
    {
        problems.push(Problem::at(tts_path, quoted_input(e)));
    }

    let s2s_path = "s2s_provider";
    if let Some(name) = config.s2s_provider.as_deref()
        && !flagged.contains(s2s_path)
    {
        match reg.s2s.get(name) {
            Err(e) => problems.push(Problem::at(s2s_path, quoted_input(e))),
            Ok(s2s) => {
                if config.pipeline_type == PipelineType::S2s && options_checked(name) {
                    let (tx, _rx) = tokio::sync::mpsc::channel(1);
                    if let Err(e) = s2s.open(&options(name), tx) {
                        push_error(problems, &format!("components.{name}"), e);
                    }
                }
            }
        }
    }
}

/// One step of a field path: a key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// `a.b[2].c` as `[Key(a), Key(b), Index(2), Key(c)]`.
fn segments(path: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key.to_owned()));
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let Some(end) = inner.find(']') else { break };
            match inner[..end].parse() {
                Ok(i) => out.push(Segment::Index(i)),
                Err(_) => return out,
            }
            rest = &inner[end + 1..];
        }
    }
    out
}

/// Where `path` is written in `text`: line and column (from 1) of its key,
/// or of the closest parent that is written. See the module documentation
/// for how exact each format is.
fn locate(text: &str, format: ConfigFormat, path: &str) -> Option<(usize, usize)> {
    let segments = segments(path);
    if segments.is_empty() {
        return None;
    }
    match format {
        ConfigFormat::Toml => toml_offset(text, &segments).map(|o| line_column(text, o)),
        ConfigFormat::Json => json_offset(text, &segments).map(|o| line_column(text, o)),
        ConfigFormat::Yaml => yaml_position(text, &segments),
    }
}

/// Line and column (from 1; the column in characters) of byte `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

/// The byte offset of the deepest written step of `segments` in a TOML
/// document, from the `toml` crate's spanned parse.
fn toml_offset(text: &str, segments: &[Segment]) -> Option<usize> {
    use toml::de::{DeTable, DeValue};

    let root = DeTable::parse(text).ok()?;
    let mut best = None;
    let mut current: Option<&toml::Spanned<DeValue<'_>>> = None;
    for segment in segments {
        match segment {
            Segment::Key(key) => {
                let table = match current {
                    None => root.get_ref(),
                    Some(value) => match value.get_ref() {
                        DeValue::Table(table) => table,
                        _ => break,
                    },
                };
                let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref() == key) else {
                    break;
                };
                best = Some(k.span().start);
                current = Some(v);
            }
            Segment::Index(i) => {
                let Some(DeValue::Array(items)) = current.map(toml::Spanned::get_ref) else {
                    break;
                };
                let Some(item) = items.get(*i) else { break };
                best = Some(item.span().start);
                current = Some(item);
            }
        }
    }
    best
}

/// A forward-only scanner over JSON text that finds where keys are written.
struct JsonScanner<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl JsonScanner<'_> {
    fn skip_whitespace(&mut self) {
        while self
            .bytes
            .get(self.at)
            .is_some_and(|b| b.is_ascii_whitespace())
        {
            self.at += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        self.skip_whitespace();
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// A string token (the scanner at its opening quote), decoded.
    fn string(&mut self) -> Option<String> {
        self.skip_whitespace();
        if self.peek()? != b'"' {
            return None;
        }
        self.at += 1;
        let start = self.at;
        let mut escaped = false;
        loop {
            let b = self.peek()?;
            self.at += 1;
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => break,
                _ => {}
            }
        }
        let raw = std::str::from_utf8(&self.bytes[start - 1..self.at]).ok()?;
        serde_json::from_str(raw).ok()
    }

    /// Skips one value of any kind.
    fn skip_value(&mut self) -> Option<()> {
        self.skip_whitespace();
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.at += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.at += 1;
                }
            }
            _ => {
                while self
                    .peek()
                    .is_some_and(|b| !matches!(b, b',' | b'}' | b']') && !b.is_ascii_whitespace())
                {
                    self.at += 1;
                }
                Some(())
            }
        }
    }
}

/// The byte offset of the deepest written step of `segments` in a JSON
/// document: the key's opening quote, or an array element's first byte.
fn json_offset(text: &str, segments: &[Segment]) -> Option<usize> {
    let mut s = JsonScanner {
        bytes: text.as_bytes(),
        at: 0,
    };
    let mut best = None;
    'path: for segment in segments {
        match segment {
            Segment::Key(key) => {
                if s.expect(b'{').is_none() {
                    break;
                }
                loop {
                    s.skip_whitespace();
                    if s.peek() == Some(b'}') {
                        break 'path;
                    }
                    let start = s.at;
                    let Some(name) = s.string() else {
                        break 'path;
                    };
                    if s.expect(b':').is_none() {
                        break 'path;
                    }
                    if name == *key {
                        best = Some(start);
                        continue 'path;
                    }
                    if s.skip_value().is_none() {
                        break 'path;
                    }
                    if s.expect(b',').is_none() {
                        break 'path;
                    }
                }
            }
            Segment::Index(i) => {
                if s.expect(b'[').is_none() {
                    break;
                }
                for _ in 0..*i {
                    if s.skip_value().is_none() || s.expect(b',').is_none() {
                        break 'path;
                    }
                }
                s.skip_whitespace();
                if matches!(s.peek(), None | Some(b']')) {
                    break;
                }
                best = Some(s.at);
            }
        }
    }
    best
}

/// One line of a YAML document, as the indentation scanner sees it.
struct YamlLine<'a> {
    /// Spaces before the first character.
    indent: usize,
    /// Indent of the first key on the line: past any `- ` sequence markers.
    key_indent: usize,
    /// The text at `key_indent`.
    content: &'a str,
    /// Whether the line starts a sequence item (`- ...`).
    item: bool,
}

fn yaml_line(line: &str) -> Option<YamlLine<'_>> {
    let trimmed = line.trim_start_matches(' ');
    if trimmed.trim().is_empty() || trimmed.starts_with('#') || trimmed.starts_with("---") {
        return None;
    }
    let indent = line.len() - trimmed.len();
    let mut key_indent = indent;
    let mut content = trimmed;
    let item = content == "-" || content.starts_with("- ");
    while content == "-" || content.starts_with("- ") {
        let after = content[1..].trim_start_matches(' ');
        key_indent += content.len() - after.len();
        content = after;
    }
    Some(YamlLine {
        indent,
        key_indent,
        content,
        item,
    })
}

/// Whether `content` is the mapping key `key` (plain or quoted) followed by `:`.
fn yaml_key_is(content: &str, key: &str) -> bool {
    [key.to_owned(), format!("\"{key}\""), format!("'{key}'")]
        .iter()
        .any(|k| {
            content.strip_prefix(k.as_str()).is_some_and(|rest| {
                rest == ":" || rest.starts_with(": ") || rest.starts_with(":\t")
            })
        })
}

/// Line and column of the deepest written step of `segments` in a YAML
/// document, followed by indentation (block style only; best effort).
fn yaml_position(text: &str, segments: &[Segment]) -> Option<(usize, usize)> {
    let lines: Vec<Option<YamlLine<'_>>> = text.lines().map(yaml_line).collect();
    // The block being searched: lines [start, end) whose keys are indented
    // more than `parent` (`None` at the top level).
    let (mut start, mut end) = (0, lines.len());
    let mut parent: Option<usize> = None;
    let mut best = None;
    for segment in segments {
        let deeper = |indent: usize| parent.is_none_or(|p| indent > p);
        match segment {
            Segment::Key(key) => {
                let block = (start..end)
                    .filter_map(|i| lines[i].as_ref())
                    .map(|l| l.key_indent)
                    .filter(|&k| deeper(k))
                    .min();
                let Some(level) = block else { break };
                let found = (start..end).find(|&i| {
                    lines[i]
                        .as_ref()
                        .is_some_and(|l| l.key_indent == level && yaml_key_is(l.content, key))
                });
                let Some(at) = found else { break };
                best = Some((at + 1, level + 1));
                // Its children: the lines after it indented more, or `- `
                // items at its own indent (an indentless sequence).
                let next = (at + 1..end)
                    .find(|&i| {
                        lines[i]
                            .as_ref()
                            .is_some_and(|l| l.indent < level || (l.indent == level && !l.item))
                    })
                    .unwrap_or(end);
                (start, end) = (at + 1, next);
                parent = Some(level);
            }
            Segment::Index(index) => {
                let items: Vec<usize> = (start..end)
                    .filter(|&i| lines[i].as_ref().is_some_and(|l| l.item))
                    .collect();
                let Some(level) = items
                    .iter()
                    .map(|&i| lines[i].as_ref().map(|l| l.indent))
                    .min()
                else {
                    break;
                };
                let items: Vec<usize> = items
                    .into_iter()
                    .filter(|&i| lines[i].as_ref().map(|l| l.indent) == level)
                    .collect();
                let Some(&at) = items.get(*index) else { break };
                let level = level.unwrap_or(0);
                best = Some((at + 1, level + 1));
                let next = items.get(index + 1).copied().unwrap_or(end);
                (start, end) = (at, next);
                parent = Some(level);
            }
        }
    }
    best
}

// ---------------------------------------------------------------------------
// serve

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

/// The backend config `serve` would use: the file of `--config` (or
/// [`default_config`]), with the environment overlaid when `--env-prefix` is
/// given.
///
/// # Errors
///
/// [`exit::FAILURE`] naming every invalid field.
pub fn serve_config(args: &ServeArgs) -> Result<Config, Failure> {
    let mut config = match &args.config {
        Some(path) => Config::from_path(path).map_err(|e| {
            config_failure(
                &format!("invalid config file {}", path.display()),
                &e,
                &format!(
                    "run `voice-backends validate {}` to see every error with its line",
                    path.display()
                ),
            )
        })?,
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
    // What `validate` checks beyond loading: the provider's own config and
    // the components and their options, so a backend whose every session
    // would fail is refused here, not served.
    let problems = semantic_problems(&config);
    if !problems.is_empty() {
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
    Ok(config)
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
pub fn serve(args: &ServeArgs, out: &mut dyn Write) -> Result<(), Failure> {
    let config = serve_config(args)?;
    init_logging(&config);
    let server_config = server_config(args);
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
        serve_until(config, server_config, out, shutdown).await
    })
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
    server_config
        .validate()
        .map_err(|e| Failure::failed(format!("invalid server options: {}", e.message)))?;
    let backend: Arc<dyn VoiceBackend> = registry()
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

    /// The checks make a runtime of their own for the components they open;
    /// called from async code, they must not panic dropping it.
    #[tokio::test]
    async fn validation_runs_from_async_code() {
        let valid = "provider = \"local\"\npipeline_type = \"s2s\"\ns2s_provider = \"echo\"\n";
        assert!(validate_str(valid, ConfigFormat::Toml, "ok.toml").is_empty());
        let unknown = valid.replace("\"echo\"", "\"no-such-model\"");
        let found = validate_str(&unknown, ConfigFormat::Toml, "bad.toml");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].to_string().contains("s2s_provider"), "{found:?}");
    }

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

    fn seg(path: &str) -> Vec<Segment> {
        segments(path)
    }

    #[test]
    fn paths_split_into_keys_and_indices() {
        use Segment::{Index, Key};
        assert_eq!(
            seg("processors[2].name"),
            [Key("processors".into()), Index(2), Key("name".into())]
        );
        assert_eq!(seg("latency_target"), [Key("latency_target".into())]);
        assert_eq!(
            seg("a.b[0][1]"),
            [Key("a".into()), Key("b".into()), Index(0), Index(1)]
        );
    }

    const TOML: &str = "provider = \"local\"\n\
        pipeline_type = \"s2s\"\n\
        s2s_provider = \"echo\"\n\
        latency_target = \"50ms\"\n\
        \n\
        [[processors]]\n\
        name = \"a\"\n\
        \n\
        [[processors]]\n\
        name = \"b\"\n\
        \n\
        [components.silence]\n\
        min_speech = \"9s\"\n";

    #[test]
    fn toml_keys_are_located() {
        let at = |p| locate(TOML, ConfigFormat::Toml, p);
        assert_eq!(at("latency_target"), Some((4, 1)));
        assert_eq!(at("processors[1].name"), Some((10, 1)));
        assert_eq!(at("components.silence.min_speech"), Some((13, 1)));
        // Missing: the closest written parent, or nothing.
        assert_eq!(at("components.silence.nope"), at("components.silence"));
        assert_eq!(at("stt_provider"), None);
    }

    const JSON: &str = r#"{
  "provider": "local",
  "latency_target": "50ms",
  "processors": [
    {"name": "a"},
    {"name": "b", "options": {"x": [1, {"y": "}"}]}}
  ],
  "components": {"silence": {"min_speech": "9s"}}
}"#;

    #[test]
    fn json_keys_are_located() {
        let at = |p| locate(JSON, ConfigFormat::Json, p);
        assert_eq!(at("latency_target"), Some((3, 3)));
        assert_eq!(at("processors[1].name"), Some((6, 6)));
        assert_eq!(at("processors[1].options.x[1].y"), Some((6, 41)));
        assert_eq!(at("components.silence.min_speech"), Some((8, 30)));
        assert_eq!(at("nope"), None);
    }

    const YAML: &str = "provider: local\n\
        # a comment\n\
        latency_target: 50ms\n\
        processors:\n\
        - name: a\n\
        - name: b\n\
        \x20 options:\n\
        \x20   level: 3\n\
        components:\n\
        \x20 silence:\n\
        \x20   min_speech: 9s\n\
        \x20 energy:\n\
        \x20   threshold_db: 1\n";

    #[test]
    fn yaml_keys_are_located() {
        let at = |p| locate(YAML, ConfigFormat::Yaml, p);
        assert_eq!(at("latency_target"), Some((3, 1)));
        assert_eq!(at("processors[0].name"), Some((5, 3)));
        assert_eq!(at("processors[1].name"), Some((6, 3)));
        assert_eq!(at("processors[1].options.level"), Some((8, 5)));
        assert_eq!(at("components.silence.min_speech"), Some((11, 5)));
        assert_eq!(at("components.energy.threshold_db"), Some((13, 5)));
        assert_eq!(at("components.energy.nope"), Some((12, 3)));
        assert_eq!(at("stt_provider"), None);
    }

    #[test]
    fn positions_split_off_messages() {
        assert_eq!(
            split_position("line 3, column 7: timeout: bad"),
            (Some((3, 7)), "timeout: bad")
        );
        assert_eq!(split_position("no position"), (None, "no position"));
    }

    #[test]
    fn diagnostics_display_with_and_without_position() {
        let mut d = Diagnostic {
            file: "c.toml".into(),
            position: Some((4, 1)),
            path: Some("timeout".into()),
            message: "bad".into(),
        };
        assert_eq!(d.to_string(), "c.toml:4:1: timeout: bad");
        d.position = None;
        d.path = None;
        assert_eq!(d.to_string(), "c.toml: bad");
    }

    #[test]
    fn default_config_is_valid() {
        let config = default_config();
        assert!(config.validate().is_ok());
        let text = config.to_toml_string().unwrap();
        assert_eq!(validate_str(&text, ConfigFormat::Toml, "x.toml"), []);
    }

    #[cfg(feature = "pipecat")]
    #[test]
    fn a_provider_hosting_stt_and_tts_needs_no_components() {
        let pipecat = "provider = \"pipecat\"\n[provider_config]\nurl = \"ws://127.0.0.1:8765/\"\n";
        assert_eq!(validate_str(pipecat, ConfigFormat::Toml, "p.toml"), []);
        let local = "provider = \"local\"\n";
        let problems = validate_str(local, ConfigFormat::Toml, "l.toml");
        assert!(
            problems
                .iter()
                .any(|d| d.to_string().contains("requires stt_provider")),
            "{problems:?}"
        );
    }

    #[test]
    fn table_is_aligned() {
        let infos = provider_infos().unwrap();
        let table = providers_table(&infos);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("name"));
        let column = lines[0].find("s2s").unwrap();
        for line in &lines[1..] {
            let cell = &line[column..column + 3];
            assert!(cell == "yes" || cell == "no ", "{cell:?} in {line:?}");
        }
        let local = lines.iter().find(|l| l.starts_with("local")).unwrap();
        assert_eq!(&local[column..column + 3], "yes");
    }

    #[test]
    fn command_line_parses() {
        let cli = Cli::try_parse_from([
            "voice-backends",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--allowed-origin",
            "http://a",
            "--allowed-origin",
            "http://b",
            "--allowed-host",
            "voice.example.com",
            "--max-frame-bytes",
            "4096",
            "--workers",
            "3",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.allowed_origins, ["http://a", "http://b"]);
        let server = server_config(&args);
        assert_eq!(server.listen.port(), 0);
        assert_eq!(server.max_frame_bytes, 4096);
        assert_eq!(server.workers, 3);
        assert_eq!(server.allowed_hosts, ["voice.example.com"]);
        let Command::Serve(args) = Cli::try_parse_from(["voice-backends", "serve"])
            .unwrap()
            .command
        else {
            panic!("not serve")
        };
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(
            server_config(&args).workers,
            cores,
            "one worker per core by default"
        );
        assert!(Cli::try_parse_from(["voice-backends", "serve", "--listen", "nope"]).is_err());
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
