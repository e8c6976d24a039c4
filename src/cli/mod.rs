//! The `voice-backends` command-line tool (feature `cli`).
//!
//! The binary is a thin `main` around [`run`]; everything it does lives here so
//! it can be tested. Four commands:
//!
//! | command | what it does |
//! | --- | --- |
//! | `serve [--config FILE \| --demo] [--print-config] [--agent echo\|demo] [--listen ADDR] [--workers N] [--store STORE] [--env-prefix PREFIX] [--allowed-origin ORIGIN]... [--allowed-host HOST]... [--max-frame-bytes N]` | runs the HTTP + WebSocket [`Server`] in front of a backend (`--demo`: a spoken conversation with no account, see [`DEMO_CONFIG`]) |
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
//!
//! [`Server`]: crate::server::Server

use std::fmt;
use std::io::Write;

use clap::{Parser, Subcommand};

mod args;
mod locate;
mod providers;
mod serve;
mod validate;

pub use args::{DEFAULT_LISTEN, ProvidersArgs, SchemaArgs, ServeArgs, ValidateArgs};
pub use providers::{
    ProviderInfo, provider_infos, provider_schema, providers, providers_table, schema,
};
pub use serve::{
    DEMO_CONFIG, DEMO_NOT_BUILT, default_config, demo_config, serve, serve_agent, serve_config,
    serve_until, server_config,
};
pub use validate::{ConfigFormat, Diagnostic, validate, validate_file, validate_str};

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

/// The `voice-backends` command line.
#[derive(Debug, Parser)]
#[command(
    name = "voice-backends",
    version,
    about = "Run, inspect and check voice-backends providers and configs",
    long_about = "Run, inspect and check voice-backends providers and configs.\n\n\
        Start with `voice-backends serve`: with no config it runs the built-in \
        `local` backend (an echo speech-to-speech pipeline that needs no keys \
        and no models) on http://127.0.0.1:8089. `voice-backends serve --demo` (built \
        with `--features cli,demo`) holds a spoken conversation with a demo agent, \
        all offline.",
    after_help = "Exit status: 0 on success, 1 when the command fails (e.g. an invalid \
        config), 2 for a wrong command line (e.g. an unknown provider)."
)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands of the tool.
// Parsed once per run: the size of `serve`'s options costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP + WebSocket server in front of a backend.
    #[command(
        long_about = "Run the HTTP + WebSocket server in front of a backend.\n\n\
        The backend is built from --config, or without it from the default config: \
        provider \"local\", pipeline_type \"s2s\" with the \"echo\" model, \"energy\" \
        VAD and \"silence\" turn detection (no keys, no models); the demo agent \
        answers typed text. --demo serves the spoken demo instead: PocketSphinx speech \
        recognition, the demo agent and eSpeak NG speech synthesis, all offline (built \
        with `--features cli,demo`; --print-config prints its config). Once listening it \
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

/// The providers that come with a cargo feature of their own name.
const FEATURE_PROVIDERS: [&str; 5] = ["cartesia", "livekit", "pipecat", "vapi", "vocode"];

/// `message` (the registry's "no provider named ..." error for `name`),
/// followed, when `name` is one of this crate's providers that this binary
/// was built without, by which feature brings it in and how to build with it.
pub fn with_feature_hint(name: &str, message: String) -> String {
    feature_hint(
        name,
        crate::registry::registry().is_registered(name),
        message,
    )
}

fn feature_hint(name: &str, registered: bool, message: String) -> String {
    if registered || !FEATURE_PROVIDERS.contains(&name) {
        return message;
    }
    format!(
        "{message}; the `{name}` provider comes with the `{name}` feature: build with \
         `cargo build --release --features cli,{name}` (or `cargo install --path . --features cli,{name}`)"
    )
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

#[cfg(test)]
mod tests {
    use super::*;

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
            "--resume-window",
            "2m",
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
        assert_eq!(server.resume_window, std::time::Duration::from_secs(120));
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
        assert_eq!(
            server_config(&args).resume_window,
            crate::server::ServerConfig::default().resume_window
        );
        assert!(
            Cli::try_parse_from(["voice-backends", "serve", "--resume-window", "soon"]).is_err()
        );
        assert!(Cli::try_parse_from(["voice-backends", "serve", "--listen", "nope"]).is_err());
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn a_provider_built_without_its_feature_names_the_feature() {
        let hinted = feature_hint("pipecat", false, "no provider named \"pipecat\"".into());
        assert!(
            hinted.starts_with("no provider named \"pipecat\"; "),
            "{hinted}"
        );
        assert!(hinted.contains("`pipecat` feature"), "{hinted}");
        assert!(hinted.contains("--features cli,pipecat"), "{hinted}");
        // Built in, or not one of ours: the message alone.
        assert_eq!(feature_hint("pipecat", true, "m".into()), "m");
        assert_eq!(feature_hint("livekt", false, "m".into()), "m");
    }
}
