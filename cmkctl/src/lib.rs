//! `cmkctl`, the administrators' command-line client of the cmk control plane.
//!
//! Layout: `cli` defines the command line, `config` turns flags, environment and
//! the config file into validated connection settings, `client` holds the one
//! mutual-TLS channel and the one way calls are made, `commands` runs each command,
//! `output` renders results as tables or JSON, `wrap` wraps a master key locally and
//! `watch` follows a rotation job. `error` holds the error type and is the only
//! place that chooses an exit code.
//!
//! The modules depend on each other one way: `config` and `wrap` on none of
//! them, `error` on their error types, `cli` on `config` (the connection flags
//! it hands over) and `error` (the exit codes in `--help`), and the rest on
//! those.

#![forbid(unsafe_code)]

mod cli;
mod client;
mod commands;
mod config;
mod error;
mod output;
mod watch;
mod wrap;

use std::process::ExitCode;

use clap::Parser;

pub use error::{Error, Exit};

/// Parses the command line, runs the command and reports a failure as one line
/// on standard error. Usage errors exit through clap, with code 2.
pub fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)
        .and_then(|runtime| runtime.block_on(commands::run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cmkctl: {err}");
            ExitCode::from(err.exit().code())
        }
    }
}
