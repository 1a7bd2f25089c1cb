//! `hsm-daemon`: see the library crate for what it does.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use cmk_hsm_daemon::{RawSettings, Settings, config::ROOT_KEY_ENV, dev};
use cmk_runtime::{init_logging, shutdown_signal};
use cmk_secret::SecretBytes;

#[derive(Parser)]
#[command(
    version,
    about = "Holds customer master keys and serves Import/Wrap/Unwrap/Destroy over mutual TLS"
)]
struct Cli {
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, short, env = "CMK_HSM_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: RawSettings,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run on loopback with a generated development CA and root key (not for production).
    Dev {
        /// Directory for the development CA, root key and keystore.
        #[arg(long, default_value = ".cmk-dev")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (settings, banner) = match settings(cli) {
        Ok(pair) => pair,
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
    let result = runtime.block_on(async move {
        if let Some(banner) = banner {
            eprintln!("{banner}");
        }
        cmk_hsm_daemon::run(settings, shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("hsm-daemon: {err}");
            ExitCode::FAILURE
        }
    }
}

fn settings(cli: Cli) -> Result<(Settings, Option<String>), Box<dyn std::error::Error>> {
    if let Some(Command::Dev { dir }) = cli.command {
        let settings = dev::prepare(&dir, cli.settings)?;
        let banner = dev::banner(&dir, &settings);
        return Ok((settings, Some(banner)));
    }
    let file = match &cli.config {
        Some(path) => RawSettings::from_file(path)?,
        None => RawSettings::default(),
    };
    let root_key_env =
        std::env::var_os(ROOT_KEY_ENV).map(|value| SecretBytes::new(value.into_encoded_bytes()));
    // The variable stays in this process's environment (removing it needs
    // `unsafe` under edition 2024), which is why the README prefers root_key_file.
    Ok((file.overlay(cli.settings).validate(root_key_env)?, None))
}
