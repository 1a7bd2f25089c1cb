//! What the integration tests share: a health server behind the metrics
//! layer, and requests to it.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use cmk_runtime::metrics::GrpcMetrics;
use tokio::net::TcpListener;
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Channel, Server},
};
use tonic_health::{ServingStatus, pb::HealthCheckRequest};

/// Serves `grpc.health.v1.Health` (with `cmk.Test` serving) behind the
/// metrics layer until the returned sender is dropped.
pub async fn serve_health(metrics: &GrpcMetrics) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("cmk.Test", ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = Server::builder()
        .layer(metrics.layer())
        .add_service(service);
    tokio::spawn(async move {
        // Kept alive with the server: dropping the reporter ends `Watch`.
        let _reporter = reporter;
        router
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
    });
    (addr, stop)
}

/// A health check of `service`, sending `id` as its `x-request-id`.
pub fn with_id(service: &str, id: Option<&str>) -> Request<HealthCheckRequest> {
    let mut request = Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    if let Some(id) = id {
        request
            .metadata_mut()
            .insert("x-request-id", MetadataValue::try_from(id).unwrap());
    }
    request
}

/// A plaintext channel to `addr`.
pub async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}
