//! What both cmk binaries share at start and stop: reading the configuration
//! file, the log format, logging, shutdown signals, the end of `main`, and
//! errors on one line; the gRPC server around their services ([`server`]);
//! and while they run: Prometheus metrics and request ids ([`metrics`],
//! [`request`]), and the codes of requests a server cannot read
//! ([`malformed`]).

#![forbid(unsafe_code)]

pub mod in_flight;
pub mod malformed;
pub mod metrics;
pub mod request;
pub mod server;

use std::{fmt::Display, future::Future, io::IsTerminal, path::Path, process::ExitCode};

use serde::de::DeserializeOwned;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl LogFormat {
    /// Parses the `log_format` setting (`text` when unset).
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value {
            None | Some("text") => Ok(Self::Text),
            Some("json") => Ok(Self::Json),
            Some(other) => Err(format!("log_format: {other:?} is not text or json")),
        }
    }
}

/// Reads a TOML configuration file into `T` (whose unknown keys should be
/// errors: `#[serde(deny_unknown_fields)]`); the error names the file.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

/// Logs to stderr in `format`, filtered by `CMK_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
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

/// Completes on Ctrl-C or SIGTERM (what Kubernetes sends).
pub async fn shutdown_signal() {
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

/// The exit status of a server whose settings are refused, after saying why
/// on stderr as `program: err`.
pub fn refuse_settings(program: &str, err: impl Display) -> ExitCode {
    eprintln!("{program}: {err}");
    ExitCode::from(2)
}

/// The rest of a server's `main` once its settings are valid: logs in
/// `log_format`, runs `run` on a multi-threaded runtime with
/// [`shutdown_signal`] as its stop signal, and reports a failure on stderr
/// and in the log as `program: err`.
pub fn serve_until_signal<F, E>(
    program: &str,
    log_format: LogFormat,
    run: impl FnOnce(server::StopSignal) -> F,
) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: Display,
{
    init_logging(log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{program}: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Box::pin(shutdown_signal()))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("{program}: {err}");
            ExitCode::FAILURE
        }
    }
}

/// An error and all its sources on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn log_formats() {
        assert_eq!(LogFormat::parse(None), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some("json")), Ok(LogFormat::Json));
        assert!(
            LogFormat::parse(Some("xml"))
                .unwrap_err()
                .contains("\"xml\"")
        );
    }

    #[test]
    fn chains_read_outermost_first() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("cannot open the store")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let err = Outer(std::io::Error::other("disk full"));
        assert_eq!(error_chain(&err), "cannot open the store: disk full");
    }
}
