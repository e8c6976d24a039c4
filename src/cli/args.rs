//! The clap argument structs of the commands, and their defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

/// The address `serve` listens on by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8089";

/// Options of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The backend config: a .toml, .yaml/.yml or .json file. Without it, the
    /// local echo backend (see `serve --help`).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Serve the spoken demo: offline speech recognition (PocketSphinx),
    /// the demo agent and offline speech synthesis (eSpeak NG) on the local
    /// backend, no account and no download (needs the `demo` feature). Not
    /// with --config: print its config with --print-config, edit it, and
    /// serve that with --config instead.
    #[arg(long, conflicts_with = "config")]
    pub demo: bool,
    /// Print the backend config that would be served (as TOML) and exit.
    #[arg(long)]
    pub print_config: bool,
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
    /// How long a session whose client's connection dropped (no close) runs
    /// on, waiting for the client's `resume`, e.g. `30s` (the default) or
    /// `2m`; `0s` stops it at once. Only sessions kept in a store (see
    /// --store) can be resumed.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub resume_window: Option<std::time::Duration>,
    /// Where active sessions are kept so they survive a restart: a file
    /// (an embedded database), `redis://HOST[:PORT][/DB]` (built with the
    /// `redis` feature; several instances share their sessions), `memory`
    /// (kept within this process only) or `none`. Default: the file
    /// `sessions-ADDR-PORT.redb` under `$XDG_DATA_HOME/voice-backends`
    /// (`~/.local/share/voice-backends`), one per listen address; `memory`
    /// with port 0, whose address changes on every run.
    #[arg(long, value_name = "STORE")]
    pub store: Option<String>,
    /// An agent for the sessions: `echo` answers each turn with the
    /// user's words and how many earlier messages it was given (to try the
    /// server, and its session store, without a model); `demo` is the demo
    /// agent (the time, the date, "repeat after me", "help"). Default: the
    /// demo agent without --config (it answers the page's typed text) and
    /// with --demo; none with --config (the backend's own pipeline answers).
    #[arg(long, value_name = "AGENT", value_parser = ["echo", "demo"])]
    pub agent: Option<String>,
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
