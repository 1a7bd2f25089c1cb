//! `control-plane`: see the library crate for what it does.

use std::process::ExitCode;

use clap::Parser;
use cmk_control_plane::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::VerifyAudit(verify)) = cli.command() {
        return verify.main();
    }
    let settings = match cli.settings() {
        Ok(settings) => settings,
        Err(err) => return cmk_runtime::refuse_settings("control-plane", err),
    };
    cmk_runtime::serve_until_signal("control-plane", settings.log_format, |shutdown| {
        cmk_control_plane::run(settings, shutdown)
    })
}
