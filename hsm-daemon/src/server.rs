//! Assembles and runs the daemon: custody backend, mutual TLS, allow-list,
//! HSM service, health, reflection and metrics.

use std::{future::Future, sync::Arc};

use cmk_hsm_aws_kms::{AwsKeys, AwsSettings};
use cmk_hsm_custody::{CustodyError, SoftwareCustody};
use cmk_hsm_pkcs11::Pkcs11Custody;
use cmk_proto::hsm::v1::hsm_service_server::HsmServiceServer;
use cmk_runtime::server::{self, GrpcServer, Timeouts};
use cmk_tls::ServerFiles;
use tokio::net::TcpListener;
use tonic::service::InterceptorLayer;
use tracing::info;

use crate::{
    authz,
    config::{Aws, CustodySettings, Settings},
    error::chain,
    keys::Keys,
    service::HsmApi,
};

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The keystore could not be opened.
    #[error("cannot open the keystore: {}", chain(.0))]
    Custody(#[from] CustodyError),
    /// What every cmk server can fail at: TLS, binding, serving.
    #[error(transparent)]
    Server(#[from] server::StartError),
}

/// Opens the configured custody backend and, beside the software keystore
/// (which keeps the references), the AWS KMS backend. Blocking.
fn open_keys(
    custody: CustodySettings,
    import_key_bits: cmk_hsm_custody::ImportKeyBits,
    aws: Aws,
) -> Result<Keys, CustodyError> {
    Ok(match custody {
        CustodySettings::Software {
            keystore_dir,
            root_key,
        } => {
            let keystore = Arc::new(SoftwareCustody::open(
                &keystore_dir,
                root_key,
                import_key_bits,
            )?);
            let settings = AwsSettings {
                endpoint: aws.endpoint,
                endpoint_for_region: aws.region_endpoints,
                ..AwsSettings::default()
            };
            let aws = AwsKeys::new(settings, aws.key_state_ttl, keystore.clone());
            Keys::new(keystore, Some(aws))
        }
        // The token holds no references to AWS KMS keys: adding one is
        // refused as unsupported.
        CustodySettings::Pkcs11(settings) => {
            Keys::new(Arc::new(Pkcs11Custody::open(&settings)?), None)
        }
    })
}

/// Binds `settings.listen` and serves until `shutdown` completes.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let listener = server::bind(settings.listen).await?;
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
        audit_public_key_file,
        custody,
        import_key_bits,
        allowed_clients,
        identities,
        tls,
        tls_client_crls,
        limits,
        connections,
        log_format: _,
        aws,
    } = settings;
    // Loaded first, so that bad TLS files are reported before the keystore
    // is opened; followed like the certificates, CRLs included.
    let tls = cmk_tls::watch_server(
        ServerFiles {
            tls,
            client_crls: tls_client_crls,
        },
        cmk_tls::RELOAD_INTERVAL,
    )
    .map_err(server::StartError::from)?;
    // Opening may generate the RSA import key, which takes a moment.
    let keys = tokio::task::spawn_blocking(move || open_keys(custody, import_key_bits, aws))
        .await
        .map_err(|panicked| server::StartError::Io(std::io::Error::other(panicked)))??;
    let keys = Arc::new(keys);
    let audit_key = keys
        .audit_public_key()
        .map_err(|err| server::StartError::Io(std::io::Error::other(err.to_string())))?;
    if let Some(path) = &audit_public_key_file {
        // Written whole or not at all: a verifier never reads half a key.
        let staged = path.with_extension("pem.tmp");
        std::fs::write(&staged, &audit_key.pem)
            .and_then(|()| std::fs::rename(&staged, path))
            .map_err(|err| {
                server::StartError::Io(std::io::Error::other(format!(
                    "audit_public_key_file {}: {err}",
                    path.display()
                )))
            })?;
    }

    let mut grpc = GrpcServer::new()?;
    grpc.add_service(
        HsmServiceServer::new(HsmApi::new(keys.clone(), limits))
            .max_decoding_message_size(limits.max_message_bytes)
            .max_encoding_message_size(limits.max_message_bytes),
    );
    let grpc = grpc.start(health_listen, metrics_listen).await?;

    let addr = listener.local_addr().map_err(server::StartError::Io)?;
    let public = keys.import_public_key();
    info!(
        listener = "grpc",
        %addr,
        import_key_id = %public.key_id,
        import_key_bits = public.bits,
        audit_key_id = %audit_key.key_id,
        "listening"
    );
    let timeouts = Timeouts {
        request: limits.request_timeout,
        handshake: limits.handshake_timeout,
    };
    // Every caller, whatever it asks for, must be on the allow-list.
    let allow_list =
        InterceptorLayer::new(authz::allow_list(Arc::new(allowed_clients), identities));
    grpc.serve(listener, tls, timeouts, connections, shutdown, allow_list)
        .await?;
    info!("stopped");
    Ok(())
}
