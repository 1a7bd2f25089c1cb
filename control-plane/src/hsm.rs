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

/// The response metadata in which the daemon names the state AWS KMS reports
/// for a key it refused to use.
pub const PROVIDER_KEY_STATE: &str = "cmk-provider-key-state";

/// What AWS KMS reports about a key the daemon refused to use, read from its
/// refusal by [`HsmError::provider_key_state`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProviderKeyState {
    /// Disabled by its owner.
    Disabled,
    /// Scheduled for deletion.
    PendingDeletion,
    /// Deleted, or never there.
    NotFound,
    /// Another state that makes the key unusable, lower case with hyphens
    /// (`pending-import`, `unavailable`, …).
    Other(String),
}

impl ProviderKeyState {
    /// Longest state name accepted from the daemon.
    const MAX_LEN: usize = 64;

    /// Parses the metadata value; `None` for anything but a short lower-case
    /// word with hyphens, which no daemon sends.
    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "disabled" => Self::Disabled,
            "pending-deletion" => Self::PendingDeletion,
            "not-found" => Self::NotFound,
            other
                if !other.is_empty()
                    && other.len() <= Self::MAX_LEN
                    && other
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
            {
                Self::Other(other.to_owned())
            }
            _ => return None,
        })
    }
}

impl fmt::Display for ProviderKeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Disabled => f.write_str("disabled"),
            Self::PendingDeletion => f.write_str("pending deletion"),
            Self::NotFound => f.write_str("not found"),
            Self::Other(state) => f.write_str(&state.replace('-', " ")),
        }
    }
}

impl HsmError {
    /// The state AWS KMS reports for the key, when the daemon refused a
    /// single-item call because its provider made the key unusable
    /// (`FAILED_PRECONDITION` with [`PROVIDER_KEY_STATE`] metadata). Batch
    /// items carry no metadata, so their refusals never say.
    pub fn provider_key_state(&self) -> Option<ProviderKeyState> {
        let Self::Status(status) = self else {
            return None;
        };
        if status.code() != tonic::Code::FailedPrecondition {
            return None;
        }
        let value = status.metadata().get(PROVIDER_KEY_STATE)?.to_str().ok()?;
        ProviderKeyState::parse(value)
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
    pub async fn import_public_key(&self) -> Result<pb::GetImportPublicKeyResponse, HsmError> {
        self.timed("GetImportPublicKey", async {
            Ok(self
                .client()
                .get_import_public_key(pb::GetImportPublicKeyRequest {})
                .await?
                .into_inner())
        })
        .await
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

    fn refusal(code: tonic::Code, state: Option<&str>) -> HsmError {
        let mut status = tonic::Status::new(code, "AWS KMS reports key arn:… Disabled");
        if let Some(state) = state {
            let value = state.parse().expect("ASCII metadata value");
            status.metadata_mut().insert(PROVIDER_KEY_STATE, value);
        }
        HsmError::Status(status)
    }

    #[test]
    fn the_provider_state_is_read_from_a_failed_precondition_with_metadata() {
        use tonic::Code;
        for (value, state, shown) in [
            ("disabled", ProviderKeyState::Disabled, "disabled"),
            (
                "pending-deletion",
                ProviderKeyState::PendingDeletion,
                "pending deletion",
            ),
            ("not-found", ProviderKeyState::NotFound, "not found"),
            (
                "pending-import",
                ProviderKeyState::Other("pending-import".into()),
                "pending import",
            ),
        ] {
            let read = refusal(Code::FailedPrecondition, Some(value)).provider_key_state();
            assert_eq!(read.as_ref(), Some(&state), "{value}");
            assert_eq!(state.to_string(), shown);
        }
        // Any other code, or no (or a malformed) state, says nothing of the
        // provider: the daemon or AWS may simply be out of reach.
        for error in [
            refusal(Code::FailedPrecondition, None),
            refusal(Code::Unavailable, Some("disabled")),
            refusal(Code::InvalidArgument, Some("disabled")),
            refusal(Code::FailedPrecondition, Some("")),
            refusal(Code::FailedPrecondition, Some("Disabled")),
            refusal(Code::FailedPrecondition, Some("dis abled")),
            refusal(Code::FailedPrecondition, Some(&"x".repeat(65))),
            HsmError::Protocol("x"),
        ] {
            assert_eq!(error.provider_key_state(), None, "{error}");
        }
    }
}
