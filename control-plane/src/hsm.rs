//! The control plane's client of the HSM daemon: mutual TLS, typed requests,
//! secrets received straight into [`SecretBytes`].

use std::{
    fmt,
    future::Future,
    time::{Duration, Instant},
};

use cmk_control_plane_store::AwsArns;
use cmk_proto::hsm::v1::{
    self as pb, hsm_service_client::HsmServiceClient, import_request, unwrap_result, wrap_result,
};
use cmk_runtime::metrics::{LatencyHistograms, latency_histograms};
use cmk_secret::SecretBytes;
use cmk_tls::TlsFiles;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

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

/// A mutual-TLS client of `cmk.hsm.v1.HsmService`. Cheap to clone; clones share
/// one HTTP/2 connection.
#[derive(Clone, Debug)]
pub struct HsmClient {
    /// The newest connection: [`HsmClient::follow`] replaces it when the TLS
    /// files change; calls already made finish on the one they started on.
    inner: watch::Receiver<HsmServiceClient<Channel>>,
    /// Every call's latency.
    calls: LatencyHistograms<HsmCall>,
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

    /// As [`HsmClient::connect`], but connects on first use and reconnects after
    /// a failure, so that a daemon that is down makes calls fail (`UNAVAILABLE`)
    /// rather than the caller's start-up.
    pub fn connect_lazy(
        endpoint: &str,
        server_name: &str,
        tls: &TlsFiles,
    ) -> Result<Self, HsmError> {
        Ok(Self::over(
            Self::endpoint(endpoint, server_name, tls)?.connect_lazy(),
        ))
    }

    /// As [`HsmClient::connect_lazy`], and re-reads the TLS files every
    /// `interval`: when they change (a renewed client certificate), later
    /// calls go over a new connection that presents the new certificate,
    /// without a restart and without failing a call. Files that cannot be
    /// used are refused with a warning, and the current connection stays.
    pub fn follow(
        endpoint: &str,
        server_name: &str,
        tls: TlsFiles,
        interval: Duration,
    ) -> Result<Self, HsmError> {
        // Built once here so that a malformed endpoint fails the start with
        // its own error rather than as a TLS one.
        Self::endpoint(endpoint, server_name, &tls)?;
        let (endpoint, server_name) = (endpoint.to_owned(), server_name.to_owned());
        let inner = cmk_tls::watch_files(tls, interval, move |tls| {
            let endpoint = Endpoint::from_shared(endpoint.clone())
                .map_err(|e| cmk_tls::TlsError::Client(e.to_string()))?
                .tls_config(cmk_tls::client_config(tls, &server_name)?)
                .map_err(|e| cmk_tls::TlsError::Client(e.to_string()))?;
            Ok(Self::service(Self::tuned(endpoint).connect_lazy()))
        })?;
        Ok(Self {
            inner,
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
        let (_, inner) = watch::channel(Self::service(channel));
        Self {
            inner,
            calls: latency_histograms(),
        }
    }

    /// Records every call's latency in `metrics` (by default, in series
    /// of its own that nothing exposes).
    pub fn with_metrics(mut self, metrics: &Metrics) -> Self {
        self.calls = metrics.hsm_calls.clone();
        self
    }

    /// Runs `call`, the RPC `method`, and records its latency and outcome.
    async fn timed<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<T, HsmError>>,
    ) -> Result<T, HsmError> {
        let start = Instant::now();
        let result = call.await;
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

    /// The current connection.
    fn client(&self) -> HsmServiceClient<Channel> {
        self.inner.borrow().clone()
    }

    /// The RSA import public key (PEM) and its key id.
    pub async fn import_public_key(&self) -> Result<ImportPublicKey, HsmError> {
        let pb::GetImportPublicKeyResponse {
            public_key_pem,
            key_id,
            algorithm,
            modulus_bits,
        } = self
            .timed("GetImportPublicKey", async {
                Ok(self
                    .client()
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
    /// under; the daemon refuses the call if it is not its own.
    pub async fn import(
        &self,
        handle: &str,
        admission: Admission,
        wrapped_key: Vec<u8>,
        import_key_id: String,
    ) -> Result<ImportedKey, HsmError> {
        self.import_source(
            handle,
            admission,
            import_request::Source::WrappedKey(wrapped_key),
            import_key_id,
        )
        .await
        .map(|(key, _)| key)
    }

    /// Has the daemon generate a CMK under `handle`, on the terms of
    /// [`HsmClient::import`].
    pub async fn generate(&self, handle: &str) -> Result<ImportedKey, HsmError> {
        self.import_source(
            handle,
            Admission::New,
            import_request::Source::Generate(pb::Generate {}),
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
    /// same value.
    pub async fn add_aws_key(
        &self,
        handle: &str,
        admission: Admission,
        arns: &AwsArns,
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
        });
        let (key, origin) = self
            .import_source(handle, admission, source, String::new())
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
        };
        let pb::ImportResponse {
            key_handle,
            key_check_value,
            origin,
        } = self
            .timed("Import", async {
                Ok(self.client().import(request).await?.into_inner())
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

    /// Wraps `plaintext` under the CMK `handle`.
    pub async fn wrap(
        &self,
        handle: &str,
        plaintext: &SecretBytes,
        associated_data: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let request = wrap_request(handle, plaintext, associated_data);
        self.timed("Wrap", async {
            Ok(self.client().wrap(request).await?.into_inner().ciphertext)
        })
        .await
    }

    /// Unwraps a Wrap ciphertext.
    pub async fn unwrap(
        &self,
        ciphertext: &[u8],
        associated_data: &[u8],
    ) -> Result<Unwrapped, HsmError> {
        let request = pb::UnwrapRequest {
            ciphertext: ciphertext.to_vec(),
            associated_data: associated_data.to_vec(),
        };
        let pb::UnwrapResponse {
            plaintext,
            key_handle,
        } = self
            .timed("Unwrap", async {
                Ok(self.client().unwrap(request).await?.into_inner())
            })
            .await?;
        Ok(Unwrapped {
            plaintext: SecretBytes::new(plaintext),
            handle: key_handle,
        })
    }

    /// Wraps many secrets in one call; each item succeeds or fails on its own.
    pub async fn wrap_batch(
        &self,
        items: &[(&str, &SecretBytes, &[u8])],
    ) -> Result<Vec<Result<Vec<u8>, tonic::Status>>, HsmError> {
        let request = pb::BatchWrapRequest {
            items: items
                .iter()
                .map(|(handle, plaintext, aad)| wrap_request(handle, plaintext, aad))
                .collect(),
        };
        let results = self
            .timed("BatchWrap", async {
                Ok(self
                    .client()
                    .batch_wrap(request)
                    .await?
                    .into_inner()
                    .results)
            })
            .await?;
        batch_results(results, items.len(), |r| match r.result? {
            wrap_result::Result::Ciphertext(ct) => Some(Ok(ct)),
            wrap_result::Result::Error(e) => Some(Err(item_status(e))),
        })
    }

    /// Unwraps many ciphertexts in one call; each item succeeds or fails on its own.
    pub async fn unwrap_batch(
        &self,
        items: &[(&[u8], &[u8])],
    ) -> Result<Vec<Result<Unwrapped, tonic::Status>>, HsmError> {
        let request = pb::BatchUnwrapRequest {
            items: items
                .iter()
                .map(|(ciphertext, aad)| pb::UnwrapRequest {
                    ciphertext: ciphertext.to_vec(),
                    associated_data: aad.to_vec(),
                })
                .collect(),
        };
        let results = self
            .timed("BatchUnwrap", async {
                Ok(self
                    .client()
                    .batch_unwrap(request)
                    .await?
                    .into_inner()
                    .results)
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

    /// Destroys a CMK; `Ok(true)` when an earlier call had already destroyed it.
    pub async fn destroy(&self, handle: &str) -> Result<bool, HsmError> {
        let request = pb::DestroyRequest {
            key_handle: handle.to_owned(),
        };
        self.timed("Destroy", async {
            Ok(self
                .client()
                .destroy(request)
                .await?
                .into_inner()
                .already_destroyed)
        })
        .await
    }
}

fn wrap_request(handle: &str, plaintext: &SecretBytes, associated_data: &[u8]) -> pb::WrapRequest {
    pb::WrapRequest {
        key_handle: handle.to_owned(),
        // The request owns this copy until it is encoded; prost cannot zeroize it.
        plaintext: plaintext.expose().to_vec(),
        associated_data: associated_data.to_vec(),
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
