//! `hsm-daemon`: see the library crate for what it does.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use cmk_hsm_daemon::{RawSettings, Settings, config::ROOT_KEY_ENV};
use cmk_runtime::{init_logging, shutdown_signal};
use cmk_secret::SecretBytes;

#[derive(Parser)]
#[command(
    version,
    about = "Holds customer master keys and serves Import/Wrap/Unwrap/Destroy over mutual TLS"
)]
struct Cli {
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, short, env = "CMK_HSM_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: RawSettings,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match settings(cli) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("hsm-daemon: {err}");
            return ExitCode::from(2);
        }
    };
    init_logging(settings.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("hsm-daemon: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cmk_hsm_daemon::run(settings, shutdown_signal()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("hsm-daemon: {err}");
            ExitCode::FAILURE
        }
    }
}

fn settings(cli: Cli) -> Result<Settings, Box<dyn std::error::Error>> {
    let file = match &cli.config {
        Some(path) => RawSettings::from_file(path)?,
        None => RawSettings::default(),
    };
    let root_key_env =
        std::env::var_os(ROOT_KEY_ENV).map(|value| SecretBytes::new(value.into_encoded_bytes()));
    // The variable stays in this process's environment (removing it needs
    // `unsafe` under edition 2024), which is why docs/design.md prefers root_key_file.
    Ok(file.overlay(cli.settings).validate(root_key_env)?)
}
