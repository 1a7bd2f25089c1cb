//! What both cmk binaries share at start and stop: reading the configuration
//! file, the log format, logging, shutdown signals, and errors on one line;
//! and while they run: Prometheus metrics and request ids ([`metrics`],
//! [`request`]), and the codes of requests a server cannot read
//! ([`malformed`]).

#![forbid(unsafe_code)]

pub mod malformed;
pub mod metrics;
pub mod request;

use std::{future::Future, io::IsTerminal, path::Path, pin::Pin, sync::Arc, time::Duration};

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

/// An optional `host:port` setting: `None` when unset; an error naming the
/// setting and showing `example` when it does not parse.
pub fn optional_addr(
    name: &str,
    value: Option<&str>,
    example: &str,
) -> Result<Option<std::net::SocketAddr>, String> {
    value
        .map(|addr| {
            addr.parse()
                .map_err(|e| format!("{name}: {e} (expected host:port, e.g. {example})"))
        })
        .transpose()
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

/// The signal a server stops accepting connections on.
pub type StopSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs the server `serve` builds around a [`StopSignal`] that fires when
/// `shutdown` completes. Requests in flight then get `grace` to finish: a
/// client that keeps an idle connection open cannot hold the process up
/// beyond that.
pub async fn serve_with_grace<S, E>(
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    serve: impl FnOnce(StopSignal) -> S,
) -> Result<(), E>
where
    S: Future<Output = Result<(), E>>,
{
    let stopping = Arc::new(tokio::sync::Notify::new());
    let signal = {
        let stopping = stopping.clone();
        Box::pin(async move {
            shutdown.await;
            tracing::info!("stopping: no new connections, finishing requests in flight");
            stopping.notify_one();
        })
    };
    tokio::select! {
        served = serve(signal) => served,
        () = async {
            stopping.notified().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("connections still open after the grace period; stopping anyway");
            Ok(())
        }
    }
}

/// Serves `health` (the gRPC health service, sharing the status of the
/// server it reports on) alone and in plaintext on `addr`, when one is
/// configured, until the returned guard is dropped.
///
/// Kubernetes' native gRPC probes cannot present a client certificate, so
/// they cannot reach the mutual-TLS port; this port answers
/// `grpc.health.v1.Health` and nothing else, so it tells a caller only whether
/// the process is serving.
pub async fn health_probes(
    addr: Option<std::net::SocketAddr>,
    health: tonic::service::Routes,
) -> std::io::Result<Option<HealthProbes>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tracing::info!(addr = %local, "health probes (plaintext, gRPC health only)");
    let task = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_routes(health)
            .serve_with_incoming(incoming)
            .await;
        if let Err(err) = served {
            tracing::error!(%err, "the health probe listener stopped");
        }
    });
    Ok(Some(HealthProbes { addr: local, task }))
}

/// The running health-probe listener; stops when dropped.
#[derive(Debug)]
pub struct HealthProbes {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HealthProbes {
    fn drop(&mut self) {
        self.task.abort();
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
