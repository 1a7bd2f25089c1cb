//! The control plane's client of the HSM daemon: mutual TLS, typed requests,
//! secrets received straight into [`SecretBytes`].

use std::{
    fmt,
    future::Future,
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use cmk_control_plane_domain::OrgId;
use cmk_control_plane_store::AwsArns;
use cmk_proto::hsm::v1::{
    self as pb, hsm_service_client::HsmServiceClient, import_request, unwrap_result, wrap_result,
};
use cmk_runtime::metrics::{LatencyHistograms, latency_histograms};
use cmk_secret::SecretBytes;
use cmk_tls::TlsFiles;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tracing::{info, warn};

use crate::metrics::{HsmCall, Metrics};

/// Why a call to the HSM daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// The client's TLS files could not be loaded.
    #[error(transparent)]
    Tls(#[from] cmk_tls::TlsError),
    /// The endpoint URI is malformed or the connection could not be set up.
    #[error("cannot connect to the HSM daemon: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The daemon answered with an error status.
    #[error("HSM daemon: {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// The daemon's answer is not what the protocol promises.
    #[error("HSM daemon sent a malformed response: {0}")]
    Protocol(&'static str),
}

/// What AWS KMS reports about a key the daemon refused to use, read from its
/// refusal by [`HsmError::provider_key_state`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderKeyState {
    /// Disabled by its owner.
    Disabled,
    /// Scheduled for deletion.
    PendingDeletion,
    /// Its imported key material is missing or expired.
    PendingImport,
    /// Its custom key store is disconnected.
    Unavailable,
    /// Deleted, or never there.
    NotFound,
}

impl ProviderKeyState {
    /// The state the daemon sent; `None` for the unspecified value, which no
    /// daemon sends.
    fn from_wire(state: pb::ProviderKeyState) -> Option<Self> {
        Some(match state {
            pb::ProviderKeyState::Unspecified => return None,
            pb::ProviderKeyState::Disabled => Self::Disabled,
            pb::ProviderKeyState::PendingDeletion => Self::PendingDeletion,
            pb::ProviderKeyState::PendingImport => Self::PendingImport,
            pb::ProviderKeyState::Unavailable => Self::Unavailable,
            pb::ProviderKeyState::NotFound => Self::NotFound,
        })
    }
}

impl fmt::Display for ProviderKeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Disabled => "disabled",
            Self::PendingDeletion => "pending deletion",
            Self::PendingImport => "pending import",
            Self::Unavailable => "unavailable",
            Self::NotFound => "not found",
        })
    }
}

impl HsmError {
    /// The state AWS KMS reports for the key, when the daemon refused a
    /// single-item call because its provider made the key unusable
    /// (`FAILED_PRECONDITION` with a `ProviderKeyUnusable` status detail).
    /// Batch items carry no details, so their refusals never say.
    pub fn provider_key_state(&self) -> Option<ProviderKeyState> {
        let Self::Status(status) = self else {
            return None;
        };
        if status.code() != tonic::Code::FailedPrecondition {
            return None;
        }
        ProviderKeyState::from_wire(cmk_proto::status_details::provider_key_state(status)?)
    }
}

/// A fresh key handle for [`HsmClient::import`] or [`HsmClient::generate`]: 16
/// bytes from the operating system's CSPRNG as 32 lower-case hex characters, the
/// form the daemon accepts. Random, so that no two callers, and no caller after a
/// crash, pick a handle the daemon has already used.
pub fn random_handle() -> String {
    let mut bytes = [0u8; 16];
    // AWS-LC's RAND_bytes aborts the process rather than return without filling
    // the buffer, so this error cannot occur.
    aws_lc_rs::rand::fill(&mut bytes).expect("AWS-LC RAND_bytes never fails without aborting");
    hex::encode(bytes)
}

/// Whether material goes under a fresh handle or back under the handle of
/// the destroyed key it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// A handle never used (see [`random_handle`]).
    New,
    /// The handle of a destroyed key whose original material this is: the
    /// daemon admits it only if its fingerprint is the one it kept, and
    /// answers `ALREADY_EXISTS` for other material.
    Recover,
}

/// The daemon's RSA import public key, under which an admin wraps a key to
/// upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportPublicKey {
    /// The key, a PEM "PUBLIC KEY" (X.509 SubjectPublicKeyInfo).
    pub public_key_pem: String,
    /// Lower-case hex SHA-256 of its DER SubjectPublicKeyInfo: what an
    /// upload names as the key it wrapped under.
    pub key_id: String,
    /// How to wrap under it (RSA-OAEP with SHA-256).
    pub algorithm: String,
    /// Its modulus size.
    pub modulus_bits: u32,
}

/// A CMK the daemon has taken into custody.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportedKey {
    /// Opaque reference to the CMK.
    pub handle: String,
    /// Non-secret fingerprint of the key bytes.
    pub check_value: String,
}

/// A secret recovered by Unwrap, with the CMK that had wrapped it.
#[derive(Debug)]
pub struct Unwrapped {
    /// The secret.
    pub plaintext: SecretBytes,
    /// The handle of the CMK named inside the ciphertext.
    pub handle: String,
}

/// A mutual-TLS client of `cmk.hsm.v1.HsmService`, over one daemon or
/// several that serve one custody (daemons on one PKCS#11 token). Cheap to
/// clone; clones share the connections.
///
/// With several daemons, calls take turns over the ones in service. A daemon
/// that cannot be reached, or answers `UNAVAILABLE`, is taken out of service
/// until a health check every [`PROBE_INTERVAL`] finds it up again (calls
/// still go to it when no daemon is in service), and every call but Import
/// is retried at once on the next daemon: they are safe to repeat (a Wrap's
/// ciphertext differs, a Destroy of a destroyed key says so). An Import is
/// not repeated, since the daemon that failed may still have stored the key:
/// its caller's intent record covers that, and the admin retries.
#[derive(Clone, Debug)]
pub struct HsmClient {
    /// The newest connection to each daemon, in the order of `daemons`:
    /// [`HsmClient::follow`] replaces them when the TLS files change; calls
    /// already made finish on the ones they started on.
    connections: watch::Receiver<Connections>,
    daemons: Arc<Daemons>,
    /// Every call's latency.
    calls: LatencyHistograms<HsmCall>,
}

type Connections = Arc<[Channel]>;

/// How often daemons out of service are checked, and how long a check may
/// take.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether a failed call may be sent again, to another daemon.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Repeating it is harmless.
    Safe,
    /// The daemon may have acted on it: report the failure.
    Never,
}

/// The daemons and whether each is in service.
#[derive(Debug)]
struct Daemons {
    endpoints: Vec<String>,
    out_of_service: Vec<AtomicBool>,
    /// Where the next call starts its turn.
    next: AtomicUsize,
}

impl Daemons {
    fn new(endpoints: Vec<String>) -> Self {
        Self {
            out_of_service: endpoints.iter().map(|_| AtomicBool::new(false)).collect(),
            endpoints,
            next: AtomicUsize::new(0),
        }
    }

    fn in_service(&self, i: usize) -> bool {
        !self.out_of_service[i].load(Ordering::Relaxed)
    }

    /// The order in which a call tries the daemons: those in service from
    /// the next in turn, then the others.
    fn order(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.endpoints.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let turn = move || (0..n).map(move |k| (first + k) % n);
        turn()
            .filter(|&i| self.in_service(i))
            .chain(turn().filter(|&i| !self.in_service(i)))
    }

    fn back(&self, i: usize) {
        if self.out_of_service[i].swap(false, Ordering::Relaxed) {
            info!(endpoint = %self.endpoints[i], "HSM daemon back in service");
        }
    }

    fn failed(&self, i: usize, method: &str, status: &tonic::Status) {
        // Logged once per outage; with one daemon there is nowhere else to go.
        if !self.out_of_service[i].swap(true, Ordering::Relaxed) && self.endpoints.len() > 1 {
            warn!(
                endpoint = %self.endpoints[i],
                method,
                code = ?status.code(),
                error = status.message(),
                "HSM daemon out of service until a health check passes; calls go to the others"
            );
        }
    }
}

/// Checks the daemons out of service every [`PROBE_INTERVAL`] and puts back
/// those whose health check passes, until the client is dropped.
fn probe(daemons: Weak<Daemons>, connections: watch::Receiver<Connections>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(daemons) = daemons.upgrade() else {
                return;
            };
            let channels = connections.borrow().clone();
            for (i, channel) in channels.iter().enumerate() {
                if daemons.in_service(i) {
                    continue;
                }
                let mut health = HealthClient::new(channel.clone());
                let check = health.check(HealthCheckRequest {
                    service: String::new(),
                });
                if let Ok(Ok(answer)) = tokio::time::timeout(PROBE_TIMEOUT, check).await
                    && answer.into_inner().status() == ServingStatus::Serving
                {
                    daemons.back(i);
                }
            }
        }
    });
}

/// Whether `status` says that the daemon could not be reached or could not
/// serve anything (its token out of reach), rather than refusing this
/// request: then another daemon may serve it.
fn unreachable(status: &tonic::Status) -> bool {
    // A status with a source was made on this side from a failed connection
    // (a reset stream, a connection closed mid-call); one the daemon sent has
    // none.
    status.code() == tonic::Code::Unavailable || std::error::Error::source(status).is_some()
}

impl HsmClient {
    /// Connects to `endpoint` (`https://host:port`), verifying the daemon's
    /// certificate for `server_name` and presenting the control plane's own.
    pub async fn connect(
        endpoint: &str,
        server_name: &str,
        tls: &TlsFiles,
    ) -> Result<Self, HsmError> {
        let channel = Self::endpoint(endpoint, server_name, tls)?
            .connect()
            .await?;
        Ok(Self::over(channel))
    }

    /// A client of the daemons at `endpoints` (each `https://host:port`, all
    /// serving one custody; at least one), verifying each daemon's
    /// certificate for `server_name` and presenting the control plane's own.
    /// It connects on first use and reconnects after a failure, so that a
    /// daemon that is down makes calls go elsewhere or fail (`UNAVAILABLE`)
    /// rather than the caller's start-up; and it re-reads the TLS files every
    /// `interval`: when they change (a renewed client certificate), later
    /// calls go over new connections that present the new certificate,
    /// without a restart and without failing a call. Files that cannot be
    /// used are refused with a warning, and the current connections stay.
    pub fn follow(
        endpoints: &[String],
        server_name: &str,
        tls: TlsFiles,
        interval: Duration,
    ) -> Result<Self, HsmError> {
        if endpoints.is_empty() {
            return Err(HsmError::Protocol("no HSM daemon endpoint"));
        }
        // Built once here so that a malformed endpoint fails the start with
        // its own error rather than as a TLS one.
        for endpoint in endpoints {
            Self::endpoint(endpoint, server_name, &tls)?;
        }
        let (targets, server_name) = (endpoints.to_vec(), server_name.to_owned());
        let connections = cmk_tls::watch_files(tls, interval, move |tls| {
            let config = cmk_tls::client_config(tls, &server_name)?;
            targets
                .iter()
                .map(|endpoint| {
                    let endpoint = Endpoint::from_shared(endpoint.clone())
                        .and_then(|e| e.tls_config(config.clone()))
                        .map_err(|e| cmk_tls::TlsError::Client(e.to_string()))?;
                    Ok(Self::tuned(endpoint).connect_lazy())
                })
                .collect::<Result<Connections, _>>()
        })?;
        let daemons = Arc::new(Daemons::new(endpoints.to_vec()));
        probe(Arc::downgrade(&daemons), connections.clone());
        Ok(Self {
            connections,
            daemons,
            calls: latency_histograms(),
        })
    }

    fn endpoint(endpoint: &str, server_name: &str, tls: &TlsFiles) -> Result<Endpoint, HsmError> {
        Ok(Self::tuned(
            Endpoint::from_shared(endpoint.to_owned())?
                .tls_config(cmk_tls::client_config(tls, server_name)?)?,
        ))
    }

    fn tuned(endpoint: Endpoint) -> Endpoint {
        endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
    }

    pub(crate) fn over(channel: Channel) -> Self {
        // No sender: this connection is the only one.
        let (_, connections) = watch::channel(Connections::from([channel]));
        Self {
            connections,
            daemons: Arc::new(Daemons::new(vec!["(channel)".into()])),
            calls: latency_histograms(),
        }
    }

    /// Records every call's latency in `metrics` (by default, in series
    /// of its own that nothing exposes).
    pub fn with_metrics(mut self, metrics: &Metrics) -> Self {
        self.calls = metrics.hsm_calls.clone();
        self
    }

    /// Runs the RPC `method` (`call`, on a connection) on the daemons in
    /// turn until one serves it (see [`HsmClient`]), and records its latency
    /// and outcome.
    async fn call<T, F, Fut>(
        &self,
        method: &'static str,
        retry: Retry,
        call: F,
    ) -> Result<T, HsmError>
    where
        F: Fn(HsmServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let start = Instant::now();
        let connections = self.connections.borrow().clone();
        let mut result = Err(HsmError::Protocol("no HSM daemon endpoint"));
        for i in self.daemons.order() {
            match call(Self::service(connections[i].clone())).await {
                Err(status) if unreachable(&status) => {
                    self.daemons.failed(i, method, &status);
                    result = Err(status.into());
                    if retry == Retry::Never {
                        break;
                    }
                }
                // An answer, or a refusal of the request itself that every
                // daemon would give.
                answer => {
                    self.daemons.back(i);
                    result = answer.map_err(HsmError::from);
                    break;
                }
            }
        }
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.calls
            .get_or_create(&HsmCall { method, outcome })
            .observe(start.elapsed().as_secs_f64());
        result
    }

    fn service(channel: Channel) -> HsmServiceClient<Channel> {
        HsmServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// The audit signing key's public half: SubjectPublicKeyInfo DER and id.
    pub async fn audit_public_key(&self) -> Result<(Vec<u8>, String), HsmError> {
        let pb::GetAuditPublicKeyResponse {
            public_key_pem,
            key_id,
            algorithm: _,
        } = self
            .call("GetAuditPublicKey", Retry::Safe, |mut daemon| async move {
                Ok(daemon
                    .get_audit_public_key(pb::GetAuditPublicKeyRequest {})
                    .await?
                    .into_inner())
            })
            .await?;
        let der = cmk_proto::checkpoint::public_key_der(&public_key_pem).ok_or(
            HsmError::Protocol("the audit public key is not a PUBLIC KEY PEM"),
        )?;
        if cmk_proto::checkpoint::key_id(&der) != key_id {
            return Err(HsmError::Protocol(
                "the audit public key's id is not the hash of the key",
            ));
        }
        Ok((der, key_id))
    }

    /// Has the daemon sign a checkpoint of `org`'s chain at `seq` with head
    /// `head`: its time, the signature and the signing key's id.
    pub async fn sign_checkpoint(
        &self,
        org: &OrgId,
        seq: u64,
        head: &[u8; 32],
    ) -> Result<(i64, Vec<u8>, String), HsmError> {
        let request = pb::SignCheckpointRequest {
            org: org.as_str().to_owned(),
            seq,
            head_hash: head.to_vec(),
        };
        let pb::SignCheckpointResponse {
            time,
            signature,
            key_id,
        } = self
            .call("SignCheckpoint", Retry::Safe, |mut daemon| {
                let request = request.clone();
                async move { Ok(daemon.sign_checkpoint(request).await?.into_inner()) }
            })
            .await?;
        Ok((time, signature, key_id))
    }

    /// The RSA import public key (PEM) and its key id.
    pub async fn import_public_key(&self) -> Result<ImportPublicKey, HsmError> {
        let pb::GetImportPublicKeyResponse {
            public_key_pem,
            key_id,
            algorithm,
            modulus_bits,
        } = self
            .call("GetImportPublicKey", Retry::Safe, |mut daemon| async move {
                Ok(daemon
                    .get_import_public_key(pb::GetImportPublicKeyRequest {})
                    .await?
                    .into_inner())
            })
            .await?;
        Ok(ImportPublicKey {
            public_key_pem,
            key_id,
            algorithm,
            modulus_bits,
        })
    }

    /// Imports an RSA-OAEP-wrapped CMK under `handle` (see [`random_handle`]).
    ///
    /// The daemon refuses a handle that is or ever was in use with
    /// `ALREADY_EXISTS`. Record the handle before calling, so that after a crash
    /// destroying it removes whatever this call stored. `NOT_FOUND` from that
    /// destroy means nothing is stored under the handle at that moment; an import
    /// the daemon is still processing can land afterwards.
    /// A non-empty `import_key_id` names the public key the caller wrapped
    /// under; the daemon refuses the call if it is not its own. The key serves
    /// `org` alone: the daemon refuses every later call naming another org.
    pub async fn import(
        &self,
        org: &OrgId,
        handle: &str,
        admission: Admission,
        wrapped_key: Vec<u8>,
        import_key_id: String,
    ) -> Result<ImportedKey, HsmError> {
        self.import_source(
            Some(org),
            handle,
            admission,
            import_request::Source::WrappedKey(wrapped_key),
            import_key_id,
        )
        .await
        .map(|(key, _)| key)
    }

    /// Has the daemon generate a CMK under `handle`, on the terms of
    /// [`HsmClient::import`], serving `org`, or every org when `None` (the
    /// generic default key).
    pub async fn generate(
        &self,
        org: Option<&OrgId>,
        handle: &str,
    ) -> Result<ImportedKey, HsmError> {
        self.import_source(
            org,
            handle,
            Admission::New,
            import_request::Source::Generate(pb::Generate {
                shared: org.is_none(),
            }),
            String::new(),
        )
        .await
        .map(|(key, _)| key)
    }

    /// Has the daemon reference the key in AWS KMS that `arns` name under
    /// `handle`, on the terms of [`HsmClient::import`]. The daemon first
    /// checks that it can use the key: a malformed ARN is refused with
    /// `INVALID_ARGUMENT`, a key it cannot use with `FAILED_PRECONDITION`
    /// and AWS's reason, AWS out of reach with `UNAVAILABLE`. The check value
    /// is a fingerprint of the key ARN, so adding one key twice gives the
    /// same value. The role, if any, is assumed with `external_id`, the
    /// org's own.
    pub async fn add_aws_key(
        &self,
        org: &OrgId,
        handle: &str,
        admission: Admission,
        arns: &AwsArns,
        external_id: Option<&str>,
    ) -> Result<ImportedKey, HsmError> {
        let AwsArns {
            key_arn,
            backup_key_arn,
            role_arn,
        } = arns;
        let source = import_request::Source::AwsKmsKey(pb::AwsKmsKey {
            key_arn: key_arn.clone(),
            backup_key_arn: backup_key_arn.clone().unwrap_or_default(),
            role_arn: role_arn.clone().unwrap_or_default(),
            external_id: external_id
                .filter(|_| role_arn.is_some())
                .unwrap_or_default()
                .to_owned(),
        });
        let (key, origin) = self
            .import_source(Some(org), handle, admission, source, String::new())
            .await?;
        // Key material stored under the handle would be wrapped under as if it
        // were the admin's AWS key.
        if origin != pb::KeyOrigin::AwsKms as i32 {
            return Err(HsmError::Protocol(
                "an AWS KMS key was stored as another kind of key",
            ));
        }
        Ok(key)
    }

    async fn import_source(
        &self,
        org: Option<&OrgId>,
        handle: &str,
        admission: Admission,
        source: import_request::Source,
        import_key_id: String,
    ) -> Result<(ImportedKey, i32), HsmError> {
        let request = pb::ImportRequest {
            source: Some(source),
            import_key_id,
            key_handle: handle.to_owned(),
            recover: admission == Admission::Recover,
            org: org.map(|org| org.as_str().to_owned()).unwrap_or_default(),
        };
        let pb::ImportResponse {
            key_handle,
            key_check_value,
            origin,
        } = self
            .call("Import", Retry::Never, |mut daemon| {
                let request = request.clone();
                async move { Ok(daemon.import(request).await?.into_inner()) }
            })
            .await?;
        // The caller has recorded `handle`; a key stored under any other name
        // would be one it cannot find again.
        if key_handle != handle {
            return Err(HsmError::Protocol(
                "the key was stored under another handle than the one requested",
            ));
        }
        let key = ImportedKey {
            handle: key_handle,
            check_value: key_check_value,
        };
        Ok((key, origin))
    }

    /// Wraps `plaintext` under the CMK `handle` for `org`: the daemon refuses
    /// a key that does not serve it.
    pub async fn wrap(
        &self,
        org: &OrgId,
        handle: &str,
        plaintext: &SecretBytes,
        associated_data: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let request = wrap_request(org, handle, plaintext, associated_data);
        self.call("Wrap", Retry::Safe, |mut daemon| {
            let request = request.clone();
            async move { Ok(daemon.wrap(request).await?.into_inner().ciphertext) }
        })
        .await
    }

    /// Unwraps a Wrap ciphertext for `org`, as [`HsmClient::wrap`].
    pub async fn unwrap(
        &self,
        org: &OrgId,
        ciphertext: &[u8],
        associated_data: &[u8],
    ) -> Result<Unwrapped, HsmError> {
        let request = pb::UnwrapRequest {
            ciphertext: ciphertext.to_vec(),
            associated_data: associated_data.to_vec(),
            org: org.as_str().to_owned(),
        };
        let pb::UnwrapResponse {
            plaintext,
            key_handle,
        } = self
            .call("Unwrap", Retry::Safe, |mut daemon| {
                let request = request.clone();
                async move { Ok(daemon.unwrap(request).await?.into_inner()) }
            })
            .await?;
        Ok(Unwrapped {
            plaintext: SecretBytes::new(plaintext),
            handle: key_handle,
        })
    }

    /// Wraps many secrets of `org` in one call; each item succeeds or fails
    /// on its own.
    pub async fn wrap_batch(
        &self,
        org: &OrgId,
        items: &[(&str, &SecretBytes, &[u8])],
    ) -> Result<Vec<Result<Vec<u8>, tonic::Status>>, HsmError> {
        let request = pb::BatchWrapRequest {
            items: items
                .iter()
                .map(|(handle, plaintext, aad)| wrap_request(org, handle, plaintext, aad))
                .collect(),
        };
        let results = self
            .call("BatchWrap", Retry::Safe, |mut daemon| {
                let request = request.clone();
                async move { Ok(daemon.batch_wrap(request).await?.into_inner().results) }
            })
            .await?;
        batch_results(results, items.len(), |r| match r.result? {
            wrap_result::Result::Ciphertext(ct) => Some(Ok(ct)),
            wrap_result::Result::Error(e) => Some(Err(item_status(e))),
        })
    }

    /// Unwraps many ciphertexts of `org` in one call; each item succeeds or
    /// fails on its own.
    pub async fn unwrap_batch(
        &self,
        org: &OrgId,
        items: &[(&[u8], &[u8])],
    ) -> Result<Vec<Result<Unwrapped, tonic::Status>>, HsmError> {
        let request = pb::BatchUnwrapRequest {
            items: items
                .iter()
                .map(|(ciphertext, aad)| pb::UnwrapRequest {
                    ciphertext: ciphertext.to_vec(),
                    associated_data: aad.to_vec(),
                    org: org.as_str().to_owned(),
                })
                .collect(),
        };
        let results = self
            .call("BatchUnwrap", Retry::Safe, |mut daemon| {
                let request = request.clone();
                async move { Ok(daemon.batch_unwrap(request).await?.into_inner().results) }
            })
            .await?;
        batch_results(results, items.len(), |r| match r.result? {
            unwrap_result::Result::Ok(out) => Some(Ok(Unwrapped {
                plaintext: SecretBytes::new(out.plaintext),
                handle: out.key_handle,
            })),
            unwrap_result::Result::Error(e) => Some(Err(item_status(e))),
        })
    }

    /// Destroys a CMK of `org` (`None` for the shared generic default key);
    /// `Ok(true)` when an earlier call had already destroyed it.
    pub async fn destroy(&self, org: Option<&OrgId>, handle: &str) -> Result<bool, HsmError> {
        let request = pb::DestroyRequest {
            key_handle: handle.to_owned(),
            org: org.map(|org| org.as_str().to_owned()).unwrap_or_default(),
        };
        self.call("Destroy", Retry::Safe, |mut daemon| {
            let request = request.clone();
            async move {
                Ok(daemon
                    .destroy(request)
                    .await?
                    .into_inner()
                    .already_destroyed)
            }
        })
        .await
    }
}

fn wrap_request(
    org: &OrgId,
    handle: &str,
    plaintext: &SecretBytes,
    associated_data: &[u8],
) -> pb::WrapRequest {
    pb::WrapRequest {
        key_handle: handle.to_owned(),
        // The request owns this copy until it is encoded; prost cannot zeroize it.
        plaintext: plaintext.expose().to_vec(),
        associated_data: associated_data.to_vec(),
        org: org.as_str().to_owned(),
    }
}

/// Checks a batch answer's shape (one result per item, none empty) and converts
/// each result with `convert`, which returns `None` for an empty one.
fn batch_results<R, T>(
    results: Vec<R>,
    expected: usize,
    convert: impl Fn(R) -> Option<Result<T, tonic::Status>>,
) -> Result<Vec<Result<T, tonic::Status>>, HsmError> {
    if results.len() != expected {
        return Err(HsmError::Protocol(
            "batch result count differs from request",
        ));
    }
    results
        .into_iter()
        .map(|r| convert(r).ok_or(HsmError::Protocol("empty batch result")))
        .collect()
}

fn item_status(error: pb::ItemError) -> tonic::Status {
    tonic::Status::new(tonic::Code::from_i32(error.code), error.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_handles_are_32_lower_case_hex_characters_and_differ() {
        let a = random_handle();
        assert_eq!(a.len(), 32, "{a}");
        assert!(
            a.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{a}"
        );
        assert_ne!(a, random_handle());
    }

    #[test]
    fn calls_take_turns_over_the_daemons_in_service_and_fall_back_on_the_others() {
        let daemons = Daemons::new(vec!["a".into(), "b".into(), "c".into()]);
        let order = || daemons.order().collect::<Vec<_>>();
        assert_eq!(order(), [0, 1, 2]);
        assert_eq!(order(), [1, 2, 0]);
        assert_eq!(order(), [2, 0, 1]);
        daemons.failed(1, "Wrap", &tonic::Status::unavailable("down"));
        assert_eq!(order(), [0, 2, 1]);
        assert_eq!(order(), [2, 0, 1]);
        assert_eq!(order(), [2, 0, 1]);
        daemons.failed(0, "Wrap", &tonic::Status::unavailable("down"));
        daemons.failed(2, "Wrap", &tonic::Status::unavailable("down"));
        // None in service: all are tried, still in turn.
        assert_eq!(order(), [0, 1, 2]);
        daemons.back(1);
        assert_eq!(order(), [1, 2, 0]);
    }

    #[tokio::test]
    async fn a_daemon_out_of_reach_is_told_from_a_refusal() {
        // Nothing listens on port 1: the connection is refused.
        let channel = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let Err(refused) = HsmClient::service(channel)
            .destroy(pb::DestroyRequest::default())
            .await
        else {
            panic!("nothing listens on port 1, yet Destroy succeeded");
        };
        assert!(unreachable(&refused), "{refused:?}");
        assert!(unreachable(&tonic::Status::unavailable(
            "token out of reach"
        )));
        for code in [
            tonic::Code::NotFound,
            tonic::Code::InvalidArgument,
            tonic::Code::FailedPrecondition,
            tonic::Code::AlreadyExists,
            tonic::Code::Internal,
            tonic::Code::Unknown,
        ] {
            assert!(
                !unreachable(&tonic::Status::new(code, "refused")),
                "{code:?}"
            );
        }
    }

    fn refusal(code: tonic::Code, state: Option<pb::ProviderKeyState>) -> HsmError {
        const MESSAGE: &str = "AWS KMS reports key arn:… Disabled";
        HsmError::Status(match state {
            Some(state) => tonic::Status::with_details(
                code,
                MESSAGE,
                cmk_proto::status_details::provider_key_unusable(code, MESSAGE, state),
            ),
            None => tonic::Status::new(code, MESSAGE),
        })
    }

    #[test]
    fn the_provider_state_is_read_from_a_failed_precondition_with_details() {
        use pb::ProviderKeyState as Wire;
        use tonic::Code;
        for (wire, state, shown) in [
            (Wire::Disabled, ProviderKeyState::Disabled, "disabled"),
            (
                Wire::PendingDeletion,
                ProviderKeyState::PendingDeletion,
                "pending deletion",
            ),
            (Wire::NotFound, ProviderKeyState::NotFound, "not found"),
            (
                Wire::PendingImport,
                ProviderKeyState::PendingImport,
                "pending import",
            ),
            (
                Wire::Unavailable,
                ProviderKeyState::Unavailable,
                "unavailable",
            ),
        ] {
            let read = refusal(Code::FailedPrecondition, Some(wire)).provider_key_state();
            assert_eq!(read, Some(state), "{wire:?}");
            assert_eq!(state.to_string(), shown);
        }
        // Any other code, or no (or an unspecified, or a malformed) state, says
        // nothing of the provider: the daemon or AWS may simply be out of reach.
        // (Unknown enum values are covered where they are decoded, in cmk-proto.)
        for error in [
            refusal(Code::FailedPrecondition, None),
            refusal(Code::Unavailable, Some(Wire::Disabled)),
            refusal(Code::InvalidArgument, Some(Wire::Disabled)),
            refusal(Code::FailedPrecondition, Some(Wire::Unspecified)),
            HsmError::Status(tonic::Status::with_details(
                Code::FailedPrecondition,
                "disabled",
                (&b"\xff\x01 not a google.rpc.Status"[..]).into(),
            )),
            HsmError::Protocol("x"),
        ] {
            assert_eq!(error.provider_key_state(), None, "{error}");
        }
    }
}
