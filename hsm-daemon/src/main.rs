//! `hsm-daemon`: see the library crate for what it does.

use std::{io::IsTerminal, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use cmk_hsm_daemon::{LogFormat, RawSettings, Settings, config::ROOT_KEY_ENV, dev};
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CMK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::error!(%err, "cannot listen for SIGTERM; stop with Ctrl-C");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
