//! `hsm-daemon`: see the library crate for what it does.

use std::process::ExitCode;

use clap::Parser;
use cmk_hsm_daemon::Cli;

fn main() -> ExitCode {
    let settings = match Cli::parse().settings() {
        Ok(settings) => settings,
        Err(err) => return cmk_runtime::refuse_settings("hsm-daemon", err),
    };
    cmk_runtime::serve_until_signal("hsm-daemon", settings.log_format, |shutdown| {
        cmk_hsm_daemon::run(settings, shutdown)
    })
}
