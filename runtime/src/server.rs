//! What every cmk gRPC server is made of besides its own services, written
//! once: the listen addresses and their validation, mutual TLS on the main
//! port, the shared layers (request ids and metrics, then the codes of
//! malformed requests), gRPC health and server reflection (v1, and v1alpha
//! for grpcio clients), the optional plaintext health-probe and metrics
//! listeners, and a graceful stop.
//!
//! A binary opens what it serves (keystore, metadata store), adds its
//! services to a [`GrpcServer`], [starts](GrpcServer::start) the listeners
//! beside the main port and [serves](Started::serve) until its shutdown
//! signal; why any of that fails is a [`StartError`], which the binary wraps
//! with the failures of its own backends.

use std::time::Duration;
use std::{convert::Infallible, future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tonic::{
    body::Body,
    codegen::{Bytes, StdError},
    server::NamedService,
    service::{Routes, RoutesBuilder},
    transport::Server,
};
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    in_flight::{InFlight, InFlightLayer},
    malformed::{MalformedRequestLayer, MalformedRequestService},
    metrics::{DescriptorSetError, GrpcMetrics, GrpcMetricsService, MetricsServer, serve_metrics},
};

/// Why a server could not start, or stopped with an error, for reasons every
/// cmk server shares; each binary wraps it with its own backends' failures.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS material could not be loaded.
    #[error("{0}")]
    Tls(#[from] cmk_tls::TlsError),
    /// Binding or serving failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC metrics could not learn the server's methods.
    #[error("metrics: {0}")]
    Metrics(#[from] DescriptorSetError),
}

/// Where a server listens: the mutual-TLS port, and the optional plaintext
/// health-probe and metrics ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddrs {
    /// The mutual-TLS gRPC port.
    pub listen: SocketAddr,
    /// gRPC health only, in plaintext (for Kubernetes probes); off when `None`.
    pub health: Option<SocketAddr>,
    /// Prometheus metrics at `/metrics`, in plaintext; off when `None`.
    pub metrics: Option<SocketAddr>,
}

impl ListenAddrs {
    /// Validates the `listen` (default `127.0.0.1:default_port`),
    /// `health_listen` and `metrics_listen` settings. Each one that does not
    /// parse adds a problem naming it to `errors`, so that every bad setting
    /// is reported together; its value is then a placeholder.
    pub fn validate(
        listen: Option<&str>,
        health: Option<&str>,
        metrics: Option<&str>,
        default_port: u16,
        errors: &mut Vec<String>,
    ) -> Self {
        let listen = match listen {
            Some(addr) => addr.parse::<SocketAddr>(),
            None => Ok(SocketAddr::from(([127, 0, 0, 1], default_port))),
        }
        .unwrap_or_else(|e| {
            errors.push(format!(
                "listen: {e} (expected host:port, e.g. 0.0.0.0:{default_port})"
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        let mut optional = |name: &str, value: Option<&str>, example: &str| {
            optional_addr(name, value, example).unwrap_or_else(|e| {
                errors.push(e);
                None
            })
        };
        Self {
            listen,
            health: optional("health_listen", health, "0.0.0.0:8081"),
            metrics: optional("metrics_listen", metrics, "0.0.0.0:9090"),
        }
    }
}

/// An optional `host:port` setting: `None` when unset; an error naming the
/// setting and showing `example` when it does not parse.
fn optional_addr(
    name: &str,
    value: Option<&str>,
    example: &str,
) -> Result<Option<SocketAddr>, String> {
    value
        .map(|addr| {
            addr.parse()
                .map_err(|e| format!("{name}: {e} (expected host:port, e.g. {example})"))
        })
        .transpose()
}

/// Binds the mutual-TLS port.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    Ok(cmk_tls::bind(addr).await?)
}

/// The server's TLS configuration, reloaded when its files change.
pub type TlsConfig = tokio::sync::watch::Receiver<Arc<rustls::ServerConfig>>;

/// How long a server waits on its callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// The longest a request may take; also the grace period in-flight
    /// requests get when the server stops.
    pub request: Duration,
    /// The longest a TLS handshake may take.
    pub handshake: Duration,
}

/// What a server lets callers hold before and after they are authenticated:
/// connections, handshakes, streams and requests in flight, and how long an
/// idle or old connection lives. Every bound refuses what is beyond it
/// (closed at accept, `REFUSED_STREAM`, `RESOURCE_EXHAUSTED`) rather than
/// queue it without limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once, handshakes included.
    pub max_connections: usize,
    /// Handshakes doing cryptography at once (a connection takes one only
    /// once its ClientHello has arrived).
    pub max_handshakes: usize,
    /// HTTP/2 streams, so calls in flight, per connection.
    pub max_concurrent_streams: u32,
    /// Requests in flight over all connections.
    pub max_in_flight: usize,
    /// HTTP/2 keepalive: a ping this often, and a peer that does not answer
    /// within as long again is dropped.
    pub keepalive: Duration,
    /// A connection older than this is asked to close (HTTP/2 GOAWAY) and
    /// gets the request timeout to finish its calls: a certificate revoked or
    /// a CA rotated reaches connections opened before within this bound.
    pub max_connection_age: Duration,
}

/// [`ConnectionLimits`] as configured: `None` takes the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)] // Each is the field of ConnectionLimits it names.
pub struct RawConnectionLimits {
    pub max_connections: Option<u64>,
    pub max_handshakes: Option<u64>,
    pub max_concurrent_streams: Option<u64>,
    pub max_in_flight: Option<u64>,
    pub keepalive_secs: Option<u64>,
    pub max_connection_age_secs: Option<u64>,
}

impl ConnectionLimits {
    /// The limits `raw` sets, each out of its range reported in `errors`
    /// by its setting's name.
    pub fn validate(raw: RawConnectionLimits, errors: &mut Vec<String>) -> Self {
        let mut bounded = |name: &str, value: Option<u64>, default: u64, max: u64| {
            let v = value.unwrap_or(default);
            if v == 0 || v > max {
                errors.push(format!("{name}: {v} is out of range 1..={max}"));
            }
            v
        };
        let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        Self {
            max_connections: size(bounded(
                "max_connections",
                raw.max_connections,
                4096,
                1_000_000,
            )),
            max_handshakes: size(bounded("max_handshakes", raw.max_handshakes, 64, 4096)),
            max_concurrent_streams: u32::try_from(bounded(
                "max_concurrent_streams",
                raw.max_concurrent_streams,
                128,
                10_000,
            ))
            .unwrap_or(u32::MAX),
            max_in_flight: size(bounded("max_in_flight", raw.max_in_flight, 2048, 1_000_000)),
            keepalive: Duration::from_secs(bounded("keepalive_secs", raw.keepalive_secs, 60, 3600)),
            max_connection_age: Duration::from_secs(bounded(
                "max_connection_age_secs",
                raw.max_connection_age_secs,
                3600,
                7 * 86_400,
            )),
        }
    }

    /// The accept side of these limits, with `handshake_timeout`.
    pub fn accept(&self, handshake_timeout: Duration) -> cmk_tls::AcceptLimits {
        cmk_tls::AcceptLimits {
            handshake_timeout,
            max_connections: self.max_connections,
            max_handshakes: self.max_handshakes,
        }
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::validate(RawConnectionLimits::default(), &mut Vec::new())
    }
}

/// A cmk gRPC server being assembled: its metrics registry and its own
/// services. Health and reflection are added for every service when it
/// [starts](Self::start).
#[derive(Debug)]
pub struct GrpcServer {
    registry: Registry,
    metrics: GrpcMetrics,
    routes: RoutesBuilder,
    names: Vec<&'static str>,
}

impl GrpcServer {
    /// A server of `cmk.*` services, its gRPC request metrics registered.
    pub fn new() -> Result<Self, StartError> {
        let mut registry = Registry::default();
        let metrics =
            GrpcMetrics::register_server(&mut registry, &[cmk_proto::FILE_DESCRIPTOR_SET])?;
        Ok(Self {
            registry,
            metrics,
            routes: RoutesBuilder::default(),
            names: Vec::new(),
        })
    }

    /// The metrics registry, for the binary's own metrics.
    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Adds `service`; health reports it serving and reflection describes it.
    pub fn add_service<S>(&mut self, service: S) -> &mut Self
    where
        S: Service<http::Request<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.routes.add_service(service);
        self.names.push(S::NAME);
        self
    }

    /// Reports every service serving, adds health and reflection, and starts
    /// the plaintext listeners, `health` for probes and `metrics` (each when
    /// configured); they stop when the returned server does.
    pub async fn start(
        self,
        health: Option<SocketAddr>,
        metrics_listen: Option<SocketAddr>,
    ) -> Result<Started, StartError> {
        let Self {
            registry,
            metrics,
            mut routes,
            names,
        } = self;
        let metrics_server = serve_metrics(metrics_listen, Arc::new(registry)).await?;

        let (reporter, health_service) = tonic_health::server::health_reporter();
        for name in &names {
            reporter
                .set_service_status(*name, tonic_health::ServingStatus::Serving)
                .await;
        }
        let probes = health_probes(health, Routes::new(health_service.clone())).await?;
        let reflection = || {
            names
                .iter()
                .fold(
                    tonic_reflection::server::Builder::configure()
                        .register_encoded_file_descriptor_set(cmk_proto::FILE_DESCRIPTOR_SET)
                        .register_encoded_file_descriptor_set(
                            tonic_health::pb::FILE_DESCRIPTOR_SET,
                        ),
                    |builder, name| builder.with_service_name(*name),
                )
                .with_service_name("grpc.health.v1.Health")
        };
        routes
            .add_service(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?);
        Ok(Started {
            metrics,
            routes: routes.routes(),
            _health: reporter,
            _metrics_server: metrics_server,
            _probes: probes,
        })
    }
}

/// A server whose health-probe and metrics listeners are up, ready to serve
/// its main port.
#[derive(Debug)]
pub struct Started {
    metrics: GrpcMetrics,
    routes: Routes,
    // Held while serving; the listeners stop when dropped.
    _health: tonic_health::server::HealthReporter,
    _metrics_server: Option<MetricsServer>,
    _probes: Option<HealthProbes>,
}

/// The service a server's layers make of its routes, given the binary's own
/// `L` innermost.
type Layered<L> =
    GrpcMetricsService<MalformedRequestService<<L as Layer<InFlight<Routes>>>::Service>>;

impl Started {
    /// Serves the routes over mutual TLS on `listener` until `shutdown`
    /// completes; in-flight requests then get at most one request timeout to
    /// finish, so that a client that keeps an idle connection open cannot
    /// hold the process up beyond that.
    ///
    /// Every request passes the metrics layer (request ids, counts,
    /// latencies; outermost, so that requests refused inside are counted and
    /// logged too), then the malformed-request layer (inside the metrics, so
    /// that they count the codes sent), then `layer`, the binary's own (an
    /// allow-list, say; `tower_layer::Identity` for none), then the bound on
    /// requests in flight: a caller refused by `layer` never takes one of its
    /// permits, so strangers cannot use up the capacity of those allowed.
    /// Connections are held to `limits` from the TCP accept on.
    pub async fn serve<L, ResBody>(
        self,
        listener: TcpListener,
        tls: TlsConfig,
        timeouts: Timeouts,
        limits: ConnectionLimits,
        shutdown: impl Future<Output = ()> + Send + 'static,
        layer: L,
    ) -> Result<(), StartError>
    where
        L: Layer<InFlight<Routes>> + Clone,
        Layered<L>: Service<http::Request<Body>, Response = http::Response<ResBody>>
            + Clone
            + Send
            + 'static,
        <Layered<L> as Service<http::Request<Body>>>::Future: Send,
        <Layered<L> as Service<http::Request<Body>>>::Error: Into<StdError> + Send + 'static,
        ResBody: http_body::Body<Data = Bytes> + Send + 'static,
        ResBody::Error: Into<StdError>,
    {
        let incoming = cmk_tls::incoming(listener, tls, limits.accept(timeouts.handshake));
        let router = Server::builder()
            .timeout(timeouts.request)
            .max_concurrent_streams(limits.max_concurrent_streams)
            .http2_keepalive_interval(Some(limits.keepalive))
            .http2_keepalive_timeout(Some(limits.keepalive))
            .max_connection_age(limits.max_connection_age)
            .max_connection_age_grace(timeouts.request)
            .layer(self.metrics.layer())
            .layer(MalformedRequestLayer)
            .layer(layer)
            .layer(InFlightLayer::new(limits.max_in_flight))
            .add_routes(self.routes);
        serve_with_grace(shutdown, timeouts.request, |signal| {
            router.serve_with_incoming_shutdown(incoming, signal)
        })
        .await?;
        Ok(())
    }
}

/// The signal a server stops accepting connections on.
pub type StopSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs the server `serve` builds around a [`StopSignal`] that fires when
/// `shutdown` completes. Requests in flight then get `grace` to finish: a
/// client that keeps an idle connection open cannot hold the process up
/// beyond that.
async fn serve_with_grace<S, E>(
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
async fn health_probes(
    addr: Option<SocketAddr>,
    health: Routes,
) -> std::io::Result<Option<HealthProbes>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tracing::info!(
        listener = "health",
        addr = %local,
        "health probes (plaintext, gRPC health only)"
    );
    let task = tokio::spawn(async move {
        let served = Server::builder()
            .add_routes(health)
            .serve_with_incoming(incoming)
            .await;
        if let Err(err) = served {
            tracing::error!(%err, "the health probe listener stopped");
        }
    });
    Ok(Some(HealthProbes { task }))
}

/// The running health-probe listener; stops when dropped.
#[derive(Debug)]
struct HealthProbes {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HealthProbes {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_default_and_name_every_bad_one() {
        let defaults = ConnectionLimits::default();
        assert_eq!(defaults.max_connections, 4096);
        assert_eq!(defaults.max_handshakes, 64);
        assert_eq!(defaults.max_concurrent_streams, 128);
        assert_eq!(defaults.max_in_flight, 2048);
        assert_eq!(defaults.keepalive, Duration::from_secs(60));
        assert_eq!(defaults.max_connection_age, Duration::from_secs(3600));
        let mut errors = Vec::new();
        let raw = RawConnectionLimits {
            max_connections: Some(0),
            max_handshakes: Some(5000),
            max_concurrent_streams: Some(10_001),
            max_in_flight: Some(0),
            keepalive_secs: Some(3601),
            max_connection_age_secs: Some(0),
        };
        ConnectionLimits::validate(raw, &mut errors);
        assert_eq!(
            errors,
            [
                "max_connections: 0 is out of range 1..=1000000",
                "max_handshakes: 5000 is out of range 1..=4096",
                "max_concurrent_streams: 10001 is out of range 1..=10000",
                "max_in_flight: 0 is out of range 1..=1000000",
                "keepalive_secs: 3601 is out of range 1..=3600",
                "max_connection_age_secs: 0 is out of range 1..=604800",
            ]
        );
    }

    #[test]
    fn listen_addresses_default_and_name_every_bad_one() {
        let mut errors = Vec::new();
        let addrs = ListenAddrs::validate(None, None, Some("0.0.0.0:9090"), 7443, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(addrs.listen, SocketAddr::from(([127, 0, 0, 1], 7443)));
        assert_eq!(addrs.health, None);
        assert_eq!(addrs.metrics, Some(SocketAddr::from(([0, 0, 0, 0], 9090))));

        ListenAddrs::validate(Some("nowhere"), Some("x"), Some("y"), 8443, &mut errors);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].starts_with("listen: invalid socket address"));
        assert!(errors[0].ends_with("(expected host:port, e.g. 0.0.0.0:8443)"));
        assert!(errors[1].starts_with("health_listen: "));
        assert!(errors[2].starts_with("metrics_listen: "));
    }
}
