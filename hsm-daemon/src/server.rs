//! Assembles and runs the daemon: custody backend, mutual TLS, allow-list,
//! HSM service, health, reflection and metrics.

use std::{future::Future, net::SocketAddr, sync::Arc};

use cmk_hsm_custody::{Custody, CustodyError, SoftwareCustody, aws_kms::AwsSettings};
use cmk_hsm_pkcs11::Pkcs11Custody;
use cmk_proto::hsm::v1::hsm_service_server::HsmServiceServer;
use cmk_runtime::{
    malformed::MalformedRequestLayer,
    metrics::{GrpcMetrics, serve_metrics},
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tonic::{service::InterceptorLayer, transport::Server};
use tracing::info;

use crate::{
    authz,
    config::{Aws, CustodySettings, Settings},
    error::chain,
    service::HsmApi,
};

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The keystore could not be opened.
    #[error("cannot open the keystore: {}", chain(.0))]
    Custody(#[from] CustodyError),
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
    Metrics(#[from] cmk_runtime::metrics::DescriptorSetError),
}

/// Opens the configured custody backend. Blocking.
fn open_custody(
    custody: CustodySettings,
    import_key_bits: cmk_hsm_custody::ImportKeyBits,
    aws: Aws,
) -> Result<Arc<dyn Custody>, CustodyError> {
    Ok(match custody {
        CustodySettings::Software {
            keystore_dir,
            root_key,
        } => Arc::new(
            SoftwareCustody::open(&keystore_dir, root_key, import_key_bits)?.with_aws(
                AwsSettings {
                    endpoint: aws.endpoint,
                    endpoint_for_region: aws.region_endpoints,
                    ..AwsSettings::default()
                },
                aws.key_state_ttl,
            ),
        ),
        // The token holds no references to AWS KMS keys: adding one is
        // refused as unsupported.
        CustodySettings::Pkcs11(settings) => Arc::new(Pkcs11Custody::open(&settings)?),
    })
}

/// Binds `settings.listen` and serves until `shutdown` completes.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let listener = cmk_tls::bind(settings.listen).await?;
    serve(settings, listener, shutdown).await
}

/// Serves on an already bound `listener` until `shutdown` completes. In-flight
/// requests then get at most one request timeout to finish; a client that keeps
/// an idle connection open cannot hold the process up beyond that.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let Settings {
        listen: _,
        health_listen,
        metrics_listen,
        custody,
        import_key_bits,
        allowed_clients,
        tls,
        limits,
        log_format: _,
        aws,
    } = settings;
    let tls_config = cmk_tls::watch_server_config(tls, cmk_tls::RELOAD_INTERVAL)?;
    // Opening may generate the RSA import key, which takes a moment.
    let custody = tokio::task::spawn_blocking(move || open_custody(custody, import_key_bits, aws))
        .await
        .map_err(std::io::Error::other)??;

    let mut registry = Registry::default();
    let grpc_metrics =
        GrpcMetrics::register_server(&mut registry, &[cmk_proto::FILE_DESCRIPTOR_SET])?;
    // Dropped (and stopped) when serving ends.
    let _metrics = serve_metrics(metrics_listen, Arc::new(registry)).await?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<HsmServiceServer<HsmApi>>().await;
    // Dropped (and stopped) when serving ends.
    let _probes = cmk_runtime::health_probes(
        health_listen,
        tonic::service::Routes::new(health_service.clone()),
    )
    .await?;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(cmk_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("cmk.hsm.v1.HsmService")
            .with_service_name("grpc.health.v1.Health")
    };
    let hsm = HsmServiceServer::new(HsmApi::new(custody.clone(), limits))
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);

    let addr: SocketAddr = listener.local_addr()?;
    let public = custody.import_public_key();
    info!(%addr, import_key_id = %public.key_id, import_key_bits = public.bits, "listening");
    let incoming = cmk_tls::incoming(listener, tls_config, limits.handshake_timeout);
    let router = Server::builder()
        .timeout(limits.request_timeout)
        // Outermost, so that refused callers are counted and logged too.
        .layer(grpc_metrics.layer())
        // Inside the metrics, so that they count the codes sent.
        .layer(MalformedRequestLayer)
        .layer(InterceptorLayer::new(authz::allow_list(Arc::new(
            allowed_clients,
        ))))
        .add_service(hsm)
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    let served = cmk_runtime::serve_with_grace(shutdown, limits.request_timeout, |signal| {
        router.serve_with_incoming_shutdown(incoming, signal)
    })
    .await;
    served?;
    info!("stopped");
    Ok(())
}
