//! Assembles and runs the control plane: store, HSM client, key service,
//! timers, mutual TLS, admin API, health, reflection and metrics.

use std::{future::Future, sync::Arc, time::Duration};

use cmk_control_plane_store::{PgStoreOptions, StoreError};
use cmk_proto::control::v1::{
    content_key_service_server::ContentKeyServiceServer,
    key_admin_service_server::KeyAdminServiceServer,
};
use cmk_runtime::server::{self, GrpcServer, Timeouts};
use cmk_tls::ServerFiles;
use tokio::net::TcpListener;
use tonic::{Request, service::InterceptorLayer};
use tracing::{info, warn};

use crate::{
    authz::{LivePolicy, POLICY_POLL_INTERVAL},
    clock::{Clock, SystemClock},
    config::Settings,
    error::chain,
    grpc::{AdminApi, ContentKeyApi},
    hsm::{HsmClient, HsmError},
    metrics::Metrics,
    service::{KeyService, ServiceOptions, checkpoints::CheckpointExport, tally},
};

/// Largest response: a full audit page with room to spare.
const RESPONSE_LIMIT: usize = 4 << 20;

/// Why the control plane could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The metadata store could not be opened.
    #[error("cannot open the metadata store: {}", chain(.0))]
    Store(#[from] StoreError),
    /// The HSM client could not be set up.
    #[error("HSM daemon client: {}", chain(.0))]
    Hsm(#[from] HsmError),
    /// What every cmk server can fail at: TLS, binding, serving.
    #[error(transparent)]
    Server(#[from] server::StartError),
}

/// Binds `settings.listen` and serves on the system clock until `shutdown`
/// completes.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let listener = server::bind(settings.listen).await?;
    serve(settings, Arc::new(SystemClock), listener, shutdown).await
}

/// Serves on an already bound `listener`, reading time from `clock`, until
/// `shutdown` completes; in-flight requests then get one request timeout to
/// finish.
pub async fn serve(
    settings: Settings,
    clock: Arc<dyn Clock>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let Settings {
        listen: _,
        health_listen,
        metrics_listen,
        tls,
        tls_client_crls,
        identities,
        hsm,
        aws_principal_arn,
        audit_export_file,
        database,
        store,
        authz,
        lifecycle,
        keys,
        maintenance_interval,
        limits,
        connections,
        log_format: _,
    } = settings;
    // Loaded first, so that bad TLS files are reported before the store is
    // opened; followed like the certificates, CRLs included.
    let tls = cmk_tls::watch_server(
        ServerFiles {
            tls,
            client_crls: tls_client_crls,
        },
        cmk_tls::RELOAD_INTERVAL,
    )
    .map_err(server::StartError::from)?;
    let pg = PgStoreOptions {
        max_connections: store.max_connections,
        ..PgStoreOptions::default()
    };
    let lease_ttl = store.lease_ttl;
    let store = cmk_control_plane_store::open(&database.0, pg).await?;
    // Connected on first use, so that the control plane starts, serves reads and
    // reports UNAVAILABLE for key operations while the HSM daemon is down.
    // Follows its TLS files as the server's certificate does.
    let hsm_client = HsmClient::follow(
        &hsm.endpoints,
        &hsm.server_name,
        hsm.tls.clone(),
        cmk_tls::RELOAD_INTERVAL,
    )?;
    let options = ServiceOptions {
        // An import may still be running at the daemon for up to its request
        // timeout; ours bounds that from this side.
        intent_grace: limits.request_timeout * 2,
        kek_cache_entries: keys.kek_cache_entries,
        kek_cache_ttl: keys.kek_cache_ttl,
        rotation_batch: keys.rotation_batch,
        lease_ttl,
        ..ServiceOptions::default()
    };
    let mut grpc = GrpcServer::new()?;
    let metrics = Metrics::register(grpc.registry());
    // Follows the policy file: re-read on SIGHUP and every poll interval,
    // and held to the identity rule start-up checked it against.
    let authz = LivePolicy::follow(
        authz,
        POLICY_POLL_INTERVAL,
        metrics.clone(),
        move |policy| {
            let problems = policy.unmatchable_grants(identities);
            match problems.is_empty() {
                true => Ok(()),
                false => Err(problems.join("; ")),
            }
        },
    );
    let export = audit_export_file
        .as_deref()
        .map(CheckpointExport::open)
        .transpose()
        .map_err(server::StartError::Io)?;
    let service = Arc::new(
        KeyService::new(store, hsm_client, clock, lifecycle, options)
            .with_metrics(metrics)
            .with_aws_principal(aws_principal_arn)
            .with_checkpoint_export(export),
    );
    info!(replica = service.replica(), %database, "metadata store open");

    // Requests are bounded by the configured limit; responses by what the
    // service returns (a page of up to 1000 audit events is ~200 KiB).
    let max_response = RESPONSE_LIMIT.max(limits.max_message_bytes);
    grpc.add_service(
        KeyAdminServiceServer::new(AdminApi::new(service.clone(), authz.clone()))
            .max_decoding_message_size(limits.max_message_bytes)
            .max_encoding_message_size(max_response),
    )
    .add_service(
        ContentKeyServiceServer::new(ContentKeyApi::new(service.clone(), authz))
            .max_decoding_message_size(limits.max_message_bytes)
            .max_encoding_message_size(max_response),
    );
    let grpc = grpc.start(health_listen, metrics_listen).await?;

    let addr = listener.local_addr().map_err(server::StartError::Io)?;
    let timers = tokio::spawn(maintain(service.clone(), maintenance_interval));
    // Often enough that a job whose replica died is taken over within
    // seconds of its lease running out.
    let poll = maintenance_interval.min(lease_ttl / 2);
    let rotations = tokio::spawn(rotate(service.clone(), poll));
    let tallies = tokio::spawn(flush_tallies(service.clone()));

    info!(listener = "grpc", %addr, hsm = %hsm.endpoints.join(","), "listening");
    let timeouts = Timeouts {
        request: limits.request_timeout,
        handshake: limits.handshake_timeout,
    };
    // Every caller's identity is read from its certificate, by the rule
    // both servers share, before any service sees the request; a certificate
    // that names none is refused here. Each method then checks the
    // permission it needs for that identity.
    let identify = InterceptorLayer::new(move |mut request: Request<()>| {
        identities.admit(&mut request)?;
        Ok(request)
    });
    let served = grpc
        .serve(listener, tls, timeouts, connections, shutdown, identify)
        .await;
    timers.abort();
    rotations.abort();
    tallies.abort();
    // Once both have stopped, what they held can be taken over at once.
    let _ = tokio::join!(timers, rotations, tallies);
    // A clean stop writes every content-key call it counted, and leaves
    // every event under a signed checkpoint.
    service.flush_tally().await;
    if let Err(err) = service.checkpoint_all().await {
        warn!(error = %chain(&err), "checkpointing audit chains at shutdown failed");
    }
    service.release_leases().await;
    info!("stopped");
    Ok(served?)
}

/// The timers: repair unfinished custody calls, remove keys whose time is up,
/// renew the generic default key, check that keys in AWS KMS are still
/// usable there, checkpoint every audit chain with events not yet covered. The first run is at start-up. Each run
/// holds the `timers` lease, so that replicas take turns rather than run
/// them at once; a replica that finds the lease held skips its run.
async fn maintain(service: Arc<KeyService>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let run = async {
            if let Err(err) = service.repair().await {
                warn!(error = %chain(&err), "repair of custody intents failed; will retry");
            }
            if let Err(err) = service.expire_due().await {
                warn!(error = %chain(&err), "removing expired keys failed; will retry");
            }
            if let Err(err) = service.renew_generic().await {
                warn!(error = %chain(&err), "renewing the generic default key failed; will retry");
            }
            if let Err(err) = service.check_providers().await {
                warn!(error = %chain(&err), "checking keys in AWS KMS failed; will retry");
            }
            if let Err(err) = service.checkpoint_all().await {
                warn!(error = %chain(&err), "checkpointing audit chains failed; will retry");
            }
        };
        if let Err(err) = service.leases.run("timers", run).await {
            warn!(error = %chain(&err), "cannot claim the timers; will retry");
        }
    }
}

/// Writes the content-key calls counted since the last run into the audit
/// log, every [`tally::FLUSH_INTERVAL`]; each replica writes its own counts.
async fn flush_tallies(service: Arc<KeyService>) {
    let mut ticks = tokio::time::interval(tally::FLUSH_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        service.flush_tally().await;
    }
}

/// The rotation worker: resumes running jobs at start-up, then works them
/// whenever a change starts one, and at every maintenance interval (a job that
/// waited for a reactivation, or for the HSM daemon, continues then).
async fn rotate(service: Arc<KeyService>, interval: Duration) {
    loop {
        if let Err(err) = service.run_rotations().await {
            warn!(error = %chain(&err), "rotation jobs could not be read; will retry");
        }
        service.rotation_started(interval).await;
    }
}
