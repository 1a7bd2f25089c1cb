//! The gRPC adapter: converts each `cmk.hsm.v1` request into its typed request
//! (see [`crate::request`]), hands it to [`Keys`], and converts the result
//! back. No decisions about keys are made here; errors become a status in
//! [`crate::error::to_status`] only.

use std::sync::Arc;

use cmk_hsm_aws_kms::{ExternalId, KeyArn, RoleArn};
use cmk_hsm_custody::{
    Destroyed, IMPORT_ALGORITHM, KeyInfo, KeyOrigin, OrgName, UnwrapItem, Unwrapped, WrapItem,
};
use cmk_proto::hsm::v1::{self as pb, hsm_service_server::HsmService, unwrap_result, wrap_result};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::{
    authz::caller,
    config::Limits,
    error::{ServiceError, to_status},
    keys::Keys,
    request::{
        Admission, BatchUnwrap, BatchWrap, Bounded, Destroy, ForOrg, Import, SignCheckpoint, Source,
    },
};

/// The audit signing key's algorithm, as GetAuditPublicKey names it.
pub const AUDIT_ALGORITHM: &str = "ECDSA_P256_SHA256";

/// The HSM service over the daemon's keys.
pub struct HsmApi {
    keys: Arc<Keys>,
    limits: Limits,
}

impl HsmApi {
    /// Serves `keys` within `limits`.
    pub fn new(keys: Arc<Keys>, limits: Limits) -> Self {
        Self { keys, limits }
    }
}

#[tonic::async_trait]
impl HsmService for HsmApi {
    async fn get_import_public_key(
        &self,
        _request: Request<pb::GetImportPublicKeyRequest>,
    ) -> Result<Response<pb::GetImportPublicKeyResponse>, Status> {
        let public = self.keys.import_public_key();
        Ok(Response::new(pb::GetImportPublicKeyResponse {
            public_key_pem: public.pem.clone(),
            key_id: public.key_id.clone(),
            algorithm: IMPORT_ALGORITHM.to_owned(),
            modulus_bits: public.bits,
        }))
    }

    async fn import(
        &self,
        request: Request<pb::ImportRequest>,
    ) -> Result<Response<pb::ImportResponse>, Status> {
        let caller = caller(&request);
        let import = Import::try_from(request.into_inner())?;
        let recover = import.admission == Admission::Recover;
        let scope = import.scope.clone();
        if let Source::AwsKms(key) = &import.source {
            info!(%caller, handle = ?import.handle, %scope, primary = %key.primary(),
                backup = ?key.backup().map(KeyArn::as_str),
                role = ?key.role().map(RoleArn::as_str),
                external_id = ?key.external_id().map(ExternalId::as_str),
                "verifying access to an AWS KMS key");
        }
        let KeyInfo {
            handle,
            check_value,
            origin,
        } = self.keys.import(import).await?;
        info!(%caller, %handle, %check_value, ?origin, %scope, recover, "key taken into custody");
        Ok(Response::new(pb::ImportResponse {
            key_handle: handle.to_string(),
            key_check_value: check_value.to_string(),
            origin: match origin {
                KeyOrigin::Imported => pb::KeyOrigin::Imported,
                KeyOrigin::Generated => pb::KeyOrigin::Generated,
                KeyOrigin::AwsKms => pb::KeyOrigin::AwsKms,
            } as i32,
        }))
    }

    async fn get_audit_public_key(
        &self,
        _request: Request<pb::GetAuditPublicKeyRequest>,
    ) -> Result<Response<pb::GetAuditPublicKeyResponse>, Status> {
        let key = self.keys.audit_public_key()?;
        Ok(Response::new(pb::GetAuditPublicKeyResponse {
            public_key_pem: key.pem.clone(),
            key_id: key.key_id.clone(),
            algorithm: AUDIT_ALGORITHM.to_owned(),
        }))
    }

    async fn sign_checkpoint(
        &self,
        request: Request<pb::SignCheckpointRequest>,
    ) -> Result<Response<pb::SignCheckpointResponse>, Status> {
        let SignCheckpoint { org, seq, head } = SignCheckpoint::try_from(request.into_inner())?;
        let signed = self.keys.sign_checkpoint(&org, seq, head).await?;
        Ok(Response::new(pb::SignCheckpointResponse {
            time: signed.time,
            signature: signed.signature,
            key_id: signed.key_id,
        }))
    }

    async fn wrap(
        &self,
        request: Request<pb::WrapRequest>,
    ) -> Result<Response<pb::WrapResponse>, Status> {
        let item = ForOrg::<WrapItem>::try_from(Bounded(request.into_inner(), &self.limits))?;
        let ciphertext = self.keys.wrap(&item).await?;
        Ok(Response::new(pb::WrapResponse { ciphertext }))
    }

    async fn unwrap(
        &self,
        request: Request<pb::UnwrapRequest>,
    ) -> Result<Response<pb::UnwrapResponse>, Status> {
        let item = ForOrg::<UnwrapItem>::try_from(Bounded(request.into_inner(), &self.limits))?;
        let out = self.keys.unwrap(&item).await?;
        Ok(Response::new(unwrapped(out)))
    }

    async fn batch_wrap(
        &self,
        request: Request<pb::BatchWrapRequest>,
    ) -> Result<Response<pb::BatchWrapResponse>, Status> {
        let BatchWrap(items) = BatchWrap::try_from(Bounded(request.into_inner(), &self.limits))?;
        let results = self
            .keys
            .wrap_batch(items)
            .await?
            .into_iter()
            .map(|result| pb::WrapResult {
                result: Some(match result {
                    Ok(ciphertext) => wrap_result::Result::Ciphertext(ciphertext),
                    Err(err) => wrap_result::Result::Error(item_error(err)),
                }),
            })
            .collect();
        Ok(Response::new(pb::BatchWrapResponse { results }))
    }

    async fn batch_unwrap(
        &self,
        request: Request<pb::BatchUnwrapRequest>,
    ) -> Result<Response<pb::BatchUnwrapResponse>, Status> {
        let BatchUnwrap(items) =
            BatchUnwrap::try_from(Bounded(request.into_inner(), &self.limits))?;
        let results = self
            .keys
            .unwrap_batch(items)
            .await?
            .into_iter()
            .map(|result| pb::UnwrapResult {
                result: Some(match result {
                    Ok(out) => unwrap_result::Result::Ok(unwrapped(out)),
                    Err(err) => unwrap_result::Result::Error(item_error(err)),
                }),
            })
            .collect();
        Ok(Response::new(pb::BatchUnwrapResponse { results }))
    }

    async fn destroy(
        &self,
        request: Request<pb::DestroyRequest>,
    ) -> Result<Response<pb::DestroyResponse>, Status> {
        let caller = caller(&request);
        let destroy = Destroy::try_from(request.into_inner())?;
        let outcome = self.keys.destroy(&destroy).await?;
        info!(%caller, handle = %destroy.handle, org = ?destroy.org.as_ref().map(OrgName::as_str),
            ?outcome, "key destroyed");
        Ok(Response::new(pb::DestroyResponse {
            already_destroyed: outcome == Destroyed::Already,
        }))
    }
}

fn unwrapped(out: Unwrapped) -> pb::UnwrapResponse {
    let Unwrapped { plaintext, handle } = out;
    pb::UnwrapResponse {
        // The response message owns its copy from here; prost cannot zeroize it,
        // so it lives only until it is encoded onto the wire.
        plaintext: plaintext.expose().to_vec(),
        key_handle: handle.to_string(),
    }
}

/// A batch item's failure: the code and message the single-item RPC would
/// have answered with.
fn item_error(err: ServiceError) -> pb::ItemError {
    let status = to_status(err);
    pb::ItemError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}
