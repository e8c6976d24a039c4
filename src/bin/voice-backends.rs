//! The `voice-backends` command-line tool: `serve`, `providers`, `schema`
//! and `validate`. Everything is in [`voice_backends::cli`]; this parses the
//! command line, runs it and exits with its status.

use std::process::ExitCode;

use clap::Parser;
use voice_backends::cli::{Cli, run};

fn main() -> ExitCode {
    ExitCode::from(run(Cli::parse()))
}
