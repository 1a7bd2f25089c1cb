//! The gRPC adapter: turns `cmk.hsm.v1` messages into custody calls and back,
//! enforcing the request bounds on the way in. No decisions about keys are made
//! here.

use std::sync::Arc;

use cmk_hsm_custody::{
    Custody, CustodyError, Destroyed, IMPORT_ALGORITHM, KeyHandle, KeyInfo, KeyOrigin, UnwrapItem,
    Unwrapped, WrapItem,
    aws_kms::{ArnError, AwsKeyRef, KeyArn, RoleArn},
};
use cmk_proto::hsm::v1::{
    self as pb, hsm_service_server::HsmService, import_request, unwrap_result, wrap_result,
};
use cmk_secret::SecretBytes;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::{authz::caller, config::Limits, error::ServiceError};

/// The HSM service over one custody backend.
pub struct HsmApi {
    custody: Arc<dyn Custody>,
    limits: Limits,
}

impl HsmApi {
    /// Serves `custody` within `limits`.
    pub fn new(custody: Arc<dyn Custody>, limits: Limits) -> Self {
        Self { custody, limits }
    }

    fn check_len(&self, what: &str, len: usize, max: usize) -> Result<(), ServiceError> {
        if len > max {
            return Err(ServiceError::InvalidArgument(format!(
                "{what} is {len} bytes, over the limit of {max}"
            )));
        }
        Ok(())
    }

    fn check_batch(&self, len: usize) -> Result<(), ServiceError> {
        if len == 0 {
            return Err(ServiceError::InvalidArgument("batch has no items".into()));
        }
        if len > self.limits.max_batch_items {
            return Err(ServiceError::InvalidArgument(format!(
                "batch has {len} items, over the limit of {}",
                self.limits.max_batch_items
            )));
        }
        Ok(())
    }

    fn wrap_item(&self, request: pb::WrapRequest) -> Result<WrapItem, ServiceError> {
        let pb::WrapRequest {
            key_handle,
            plaintext,
            associated_data,
        } = request;
        let plaintext = SecretBytes::new(plaintext);
        let handle = key_handle
            .parse::<KeyHandle>()
            .map_err(CustodyError::from)?;
        if plaintext.is_empty() {
            return Err(CustodyError::Input(cmk_hsm_custody::InputError::EmptyPlaintext).into());
        }
        self.check_len(
            "plaintext",
            plaintext.len(),
            self.limits.max_plaintext_bytes,
        )?;
        self.check_len(
            "associated data",
            associated_data.len(),
            self.limits.max_associated_data_bytes,
        )?;
        Ok(WrapItem {
            handle,
            plaintext,
            associated_data,
        })
    }

    fn unwrap_item(&self, request: pb::UnwrapRequest) -> Result<UnwrapItem, ServiceError> {
        let pb::UnwrapRequest {
            ciphertext,
            associated_data,
        } = request;
        self.check_len(
            "associated data",
            associated_data.len(),
            self.limits.max_associated_data_bytes,
        )?;
        // A ciphertext longer than the largest possible Wrap output cannot be ours.
        let max = (cmk_hsm_custody::envelope::MIN_LEN + self.limits.max_plaintext_bytes)
            .max(cmk_hsm_custody::envelope::MAX_AWS_LEN);
        self.check_len("ciphertext", ciphertext.len(), max)?;
        Ok(UnwrapItem {
            ciphertext,
            associated_data,
        })
    }
}

#[tonic::async_trait]
impl HsmService for HsmApi {
    async fn get_import_public_key(
        &self,
        _request: Request<pb::GetImportPublicKeyRequest>,
    ) -> Result<Response<pb::GetImportPublicKeyResponse>, Status> {
        let public = self.custody.import_public_key();
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
        let pb::ImportRequest {
            source,
            import_key_id,
            key_handle,
            recover,
        } = request.into_inner();
        if recover && key_handle.is_empty() {
            return Err(ServiceError::InvalidArgument(
                "recover needs key_handle: the handle of the destroyed key to bring back".into(),
            )
            .into());
        }
        // The caller's handle, so it can record it before calling; else a fresh one.
        let handle = if key_handle.is_empty() {
            KeyHandle::random()
        } else {
            key_handle.parse::<KeyHandle>().map_err(CustodyError::from)
        }
        .map_err(ServiceError::from)?;
        let info = match source {
            Some(import_request::Source::WrappedKey(wrapped)) => {
                let current = &self.custody.import_public_key().key_id;
                // Checked before it is compared, so that only a well-formed id
                // is ever echoed back.
                if !import_key_id.is_empty()
                    && (import_key_id.len() != 64
                        || !import_key_id
                            .bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
                {
                    return Err(ServiceError::InvalidArgument(
                        "import_key_id must be empty or 64 lower-case hexadecimal characters"
                            .into(),
                    )
                    .into());
                }
                if !import_key_id.is_empty() && &import_key_id != current {
                    return Err(ServiceError::from(CustodyError::Import(
                        cmk_hsm_custody::ImportError::ImportKeyMismatch {
                            given: import_key_id,
                            current: current.clone(),
                        },
                    ))
                    .into());
                }
                match recover {
                    true => self.custody.recover(&handle, &wrapped).await,
                    false => self.custody.import(&handle, &wrapped).await,
                }
            }
            Some(import_request::Source::Generate(pb::Generate {})) if recover => {
                return Err(ServiceError::InvalidArgument(
                    "a generated key cannot be recovered: its material never left custody".into(),
                )
                .into());
            }
            Some(import_request::Source::Generate(pb::Generate {})) => {
                self.custody.generate(&handle).await
            }
            Some(import_request::Source::AwsKmsKey(key)) => {
                let key = aws_key_ref(key)?;
                info!(%caller, %handle, primary = %key.primary(),
                    backup = ?key.backup().map(KeyArn::as_str),
                    role = ?key.role().map(RoleArn::as_str),
                    "verifying access to an AWS KMS key");
                match recover {
                    true => self.custody.recover_aws_key(&handle, key).await,
                    false => self.custody.add_aws_key(&handle, key).await,
                }
            }
            None => {
                return Err(ServiceError::InvalidArgument(
                    "import request sets none of wrapped_key, generate and aws_kms_key".into(),
                )
                .into());
            }
        }
        .map_err(ServiceError::from)?;
        let KeyInfo {
            handle,
            check_value,
            origin,
        } = info;
        info!(%caller, %handle, %check_value, ?origin, recover, "key taken into custody");
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

    async fn wrap(
        &self,
        request: Request<pb::WrapRequest>,
    ) -> Result<Response<pb::WrapResponse>, Status> {
        let item = self.wrap_item(request.into_inner())?;
        let ciphertext = self
            .custody
            .wrap(&item.handle, &item.plaintext, &item.associated_data)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(pb::WrapResponse { ciphertext }))
    }

    async fn unwrap(
        &self,
        request: Request<pb::UnwrapRequest>,
    ) -> Result<Response<pb::UnwrapResponse>, Status> {
        let item = self.unwrap_item(request.into_inner())?;
        let out = self
            .custody
            .unwrap(&item.ciphertext, &item.associated_data)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(unwrapped(out)))
    }

    async fn batch_wrap(
        &self,
        request: Request<pb::BatchWrapRequest>,
    ) -> Result<Response<pb::BatchWrapResponse>, Status> {
        let pb::BatchWrapRequest { items } = request.into_inner();
        self.check_batch(items.len())?;
        let results = batch(
            items,
            |item| self.wrap_item(item),
            |valid| self.custody.wrap_batch(valid),
            |ct| pb::WrapResult {
                result: Some(wrap_result::Result::Ciphertext(ct)),
            },
            |err| pb::WrapResult {
                result: Some(wrap_result::Result::Error(item_error(err))),
            },
        )
        .await?;
        Ok(Response::new(pb::BatchWrapResponse { results }))
    }

    async fn batch_unwrap(
        &self,
        request: Request<pb::BatchUnwrapRequest>,
    ) -> Result<Response<pb::BatchUnwrapResponse>, Status> {
        let pb::BatchUnwrapRequest { items } = request.into_inner();
        self.check_batch(items.len())?;
        let results = batch(
            items,
            |item| self.unwrap_item(item),
            |valid| self.custody.unwrap_batch(valid),
            |out| pb::UnwrapResult {
                result: Some(unwrap_result::Result::Ok(unwrapped(out))),
            },
            |err| pb::UnwrapResult {
                result: Some(unwrap_result::Result::Error(item_error(err))),
            },
        )
        .await?;
        Ok(Response::new(pb::BatchUnwrapResponse { results }))
    }

    async fn destroy(
        &self,
        request: Request<pb::DestroyRequest>,
    ) -> Result<Response<pb::DestroyResponse>, Status> {
        let caller = caller(&request);
        let pb::DestroyRequest { key_handle } = request.into_inner();
        let handle = key_handle
            .parse::<KeyHandle>()
            .map_err(|e| ServiceError::from(CustodyError::from(e)))?;
        let outcome = self
            .custody
            .destroy(&handle)
            .await
            .map_err(ServiceError::from)?;
        info!(%caller, %handle, ?outcome, "key destroyed");
        Ok(Response::new(pb::DestroyResponse {
            already_destroyed: outcome == Destroyed::Already,
        }))
    }
}

/// The key reference of an import request, each malformed ARN named by its
/// field.
fn aws_key_ref(key: pb::AwsKmsKey) -> Result<AwsKeyRef, ServiceError> {
    let pb::AwsKmsKey {
        key_arn,
        backup_key_arn,
        role_arn,
    } = key;
    let invalid =
        |field: &str, err: ArnError| ServiceError::InvalidArgument(format!("{field}: {err}"));
    let primary = KeyArn::parse(&key_arn).map_err(|e| invalid("key_arn", e))?;
    let backup = (!backup_key_arn.is_empty())
        .then(|| KeyArn::parse(&backup_key_arn))
        .transpose()
        .map_err(|e| invalid("backup_key_arn", e))?;
    let role = (!role_arn.is_empty())
        .then(|| RoleArn::parse(&role_arn))
        .transpose()
        .map_err(|e| invalid("role_arn", e))?;
    Ok(AwsKeyRef::new(primary, backup, role).map_err(CustodyError::from)?)
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

fn item_error(err: ServiceError) -> pb::ItemError {
    let status = Status::from(err);
    pb::ItemError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

/// Runs one batch: items that fail validation get their error in place, the rest
/// go to the backend in one call, and the results are merged back in order.
async fn batch<Req, Item, Out, Res, Fut>(
    requests: Vec<Req>,
    validate: impl Fn(Req) -> Result<Item, ServiceError>,
    execute: impl FnOnce(Vec<Item>) -> Fut,
    ok: impl Fn(Out) -> Res,
    fail: impl Fn(ServiceError) -> Res,
) -> Result<Vec<Res>, Status>
where
    Fut: std::future::Future<Output = Vec<Result<Out, CustodyError>>>,
{
    let mut slots: Vec<Option<Res>> = Vec::with_capacity(requests.len());
    let mut valid = Vec::with_capacity(requests.len());
    for request in requests {
        match validate(request) {
            Ok(item) => {
                valid.push(item);
                slots.push(None);
            }
            Err(err) => slots.push(Some(fail(err))),
        }
    }
    let mut done = execute(valid).await.into_iter();
    slots
        .into_iter()
        .map(|slot| match slot {
            Some(failed) => Ok(failed),
            None => match done.next() {
                Some(Ok(out)) => Ok(ok(out)),
                Some(Err(err)) => Ok(fail(err.into())),
                None => Err(Status::internal(
                    "the backend returned too few batch results",
                )),
            },
        })
        .collect()
}
