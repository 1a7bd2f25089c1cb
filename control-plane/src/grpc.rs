//! The gRPC adapters of `cmk.control.v1.KeyAdminService` and
//! `ContentKeyService`: parse the request, authorise the caller for the org it
//! names, call the service, convert back.

use std::sync::Arc;

use cmk_control_plane_domain::{KeyRecord, KeySource, KeyState, OrgId, Timestamp};
use cmk_control_plane_store::{AwsArns, JobState};
use cmk_proto::control::v1::{
    self as pb, content_key_service_server::ContentKeyService,
    key_admin_service_server::KeyAdminService,
};
use cmk_tls::PeerIdentity;
use tonic::{Request, Response, Status};

use crate::{
    authz::{AuthzPolicy, Caller, Permission},
    content::{DataKey, KekView, RevocationPreview},
    error::ServiceError,
    rotation::RotationView,
    service::{KeyDetails, KeyOp, KeyService, KeyView, MAX_AUDIT_PAGE, OrgView},
};

/// Default audit page.
const DEFAULT_AUDIT_PAGE: u32 = 100;

/// `KeyAdminService` over a [`KeyService`].
pub struct AdminApi {
    service: Arc<KeyService>,
    authz: Arc<AuthzPolicy>,
}

impl AdminApi {
    /// The adapter.
    pub fn new(service: Arc<KeyService>, authz: Arc<AuthzPolicy>) -> Self {
        Self { service, authz }
    }

    async fn authorize<T>(
        &self,
        request: &Request<T>,
        org_id: &str,
        key_id: Option<&str>,
        permission: Permission,
        action: &str,
    ) -> Result<Caller, Status> {
        authorize(
            &self.service,
            &self.authz,
            request,
            org_id,
            key_id,
            permission,
            action,
        )
        .await
    }

    async fn change(
        &self,
        request: Request<pb::KeyRequest>,
        op: KeyOp,
        action: &str,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        let caller = self
            .authorize(
                &request,
                &request.get_ref().org_id,
                Some(&request.get_ref().key_id),
                Permission::Manage,
                action,
            )
            .await?;
        let pb::KeyRequest { org_id: _, key_id } = request.into_inner();
        let view = self.service.change(&caller, op, &key_id).await?;
        Ok(Response::new(key_response(view)))
    }
}

#[tonic::async_trait]
impl KeyAdminService for AdminApi {
    async fn get_import_public_key(
        &self,
        request: Request<pb::GetImportPublicKeyRequest>,
    ) -> Result<Response<pb::GetImportPublicKeyResponse>, Status> {
        let caller = self
            .authorize(
                &request,
                &request.get_ref().org_id,
                None,
                Permission::Read,
                "get import public key",
            )
            .await?;
        let cmk_proto::hsm::v1::GetImportPublicKeyResponse {
            public_key_pem,
            key_id,
            algorithm,
            modulus_bits,
        } = self.service.import_public_key(&caller).await?;
        Ok(Response::new(pb::GetImportPublicKeyResponse {
            public_key_pem,
            key_id,
            algorithm,
            modulus_bits,
        }))
    }

    async fn set_byok(
        &self,
        request: Request<pb::SetByokRequest>,
    ) -> Result<Response<pb::SetByokResponse>, Status> {
        let action = match request.get_ref().enabled {
            true => "byok on",
            false => "byok off",
        };
        let caller = self
            .authorize(
                &request,
                &request.get_ref().org_id,
                None,
                Permission::Manage,
                action,
            )
            .await?;
        let pb::SetByokRequest { org_id: _, enabled } = request.into_inner();
        let OrgView {
            byok,
            active,
            rotation_due,
            keys: _,
        } = self.service.set_byok(&caller, enabled).await?;
        Ok(Response::new(pb::SetByokResponse {
            byok_enabled: byok,
            active_key: active.map(|k| key(k, rotation_due)),
        }))
    }

    async fn upload_key(
        &self,
        request: Request<pb::UploadKeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        let caller = self
            .authorize(
                &request,
                &request.get_ref().org_id,
                None,
                Permission::Manage,
                "upload",
            )
            .await?;
        let pb::UploadKeyRequest {
            org_id: _,
            wrapped_key,
            activate_now,
            import_key_id,
        } = request.into_inner();
        let view = self
            .service
            .upload(&caller, wrapped_key, import_key_id, activate_now)
            .await?;
        Ok(Response::new(key_response(view)))
    }

    async fn add_aws_key(
        &self,
        request: Request<pb::AddAwsKeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        let caller = self
            .authorize(
                &request,
                &request.get_ref().org_id,
                None,
                Permission::Manage,
                "add aws key",
            )
            .await?;
        let pb::AddAwsKeyRequest {
            org_id: _,
            key_arn,
            backup_key_arn,
            role_arn,
            activate_now,
        } = request.into_inner();
        let view = self
            .service
            .add_aws_key(&caller, key_arn, backup_key_arn, role_arn, activate_now)
            .await?;
        Ok(Response::new(key_response(view)))
    }

    async fn activate_key(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        self.change(request, KeyOp::Activate, "activate").await
    }

    async fn cancel_key(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        self.change(request, KeyOp::Cancel, "cancel").await
    }

    async fn revoke_key(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        self.change(request, KeyOp::Revoke, "revoke").await
    }

    async fn reactivate_key(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        self.change(request, KeyOp::Reactivate, "reactivate").await
    }

    async fn delete_key(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        self.change(request, KeyOp::Delete, "delete").await
    }

    async fn restore_key(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        self.change(request, KeyOp::Restore, "restore").await
    }

    async fn get_key(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        let caller = self
            .authorize(
                &request,
                &request.get_ref().org_id,
                Some(&request.get_ref().key_id),
                Permission::Read,
                "get key",
            )
            .await?;
        let pb::KeyRequest { org_id: _, key_id } = request.into_inner();
        let view = self.service.get(&caller, &key_id).await?;
        Ok(Response::new(key_response(view)))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let caller = self
            .authorize(
                &request,
                &request.get_ref().org_id,
                None,
                Permission::Read,
                "list keys",
            )
            .await?;
        let OrgView {
            byok,
            keys,
            active,
            rotation_due,
        } = self.service.list(&caller).await?;
        let due = |k: &KeyDetails| {
            rotation_due && active.as_ref().is_some_and(|a| a.record.id == k.record.id)
        };
        Ok(Response::new(pb::ListKeysResponse {
            keys: keys.iter().map(|k| key(k.clone(), due(k))).collect(),
            active_key_id: active.map(|k| k.record.id.0).unwrap_or_default(),
            byok_enabled: byok,
        }))
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let caller = self
            .authorize(
                &request,
                &request.get_ref().org_id,
                None,
                Permission::Read,
                "list audit events",
            )
            .await?;
        let pb::ListAuditEventsRequest {
            org_id: _,
            after_seq,
            page_size,
        } = request.into_inner();
        let limit = match page_size {
            0 => DEFAULT_AUDIT_PAGE,
            n => n.min(MAX_AUDIT_PAGE),
        };
        let rows = self.service.audit_events(&caller, after_seq, limit).await?;
        // A full page may have more behind it; a short one is the end.
        let next_after_seq = match rows.len() == limit as usize {
            true => rows.last().map_or(0, |r| r.event.seq),
            false => 0,
        };
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: rows
                .into_iter()
                .map(|row| pb::AuditEvent {
                    seq: row.event.seq,
                    time: Some(timestamp(row.event.time)),
                    actor: row.event.actor,
                    key_id: row.event.key.unwrap_or_default(),
                    action: row.event.action,
                    result: row.event.result,
                    hash: hex::encode(row.hash),
                })
                .collect(),
            next_after_seq,
        }))
    }

    async fn verify_audit_log(
        &self,
        request: Request<pb::VerifyAuditLogRequest>,
    ) -> Result<Response<pb::VerifyAuditLogResponse>, Status> {
        let caller = self
            .authorize(
                &request,
                &request.get_ref().org_id,
                None,
                Permission::Read,
                "verify audit log",
            )
            .await?;
        let check = self.service.verify_audit(&caller).await?;
        Ok(Response::new(pb::VerifyAuditLogResponse {
            intact: check.problem.is_none(),
            events: check.events,
            head_hash: hex::encode(check.head),
            problem: check.problem.map(|p| p.to_string()).unwrap_or_default(),
        }))
    }

    async fn get_rotation(
        &self,
        request: Request<pb::GetRotationRequest>,
    ) -> Result<Response<pb::Rotation>, Status> {
        let caller = self
            .authorize(
                &request,
                &request.get_ref().org_id,
                None,
                Permission::Read,
                "get rotation",
            )
            .await?;
        let view = self.service.rotation(&caller).await?;
        Ok(Response::new(rotation(view)))
    }

    async fn preview_revocation(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::PreviewRevocationResponse>, Status> {
        let caller = self
            .authorize(
                &request,
                &request.get_ref().org_id,
                Some(&request.get_ref().key_id),
                Permission::Read,
                "preview revocation",
            )
            .await?;
        let pb::KeyRequest { org_id: _, key_id } = request.into_inner();
        let RevocationPreview {
            key: record,
            revocable,
            keks_unreadable,
            keks_wrapped_by_key,
        } = self.service.preview_revocation(&caller, &key_id).await?;
        Ok(Response::new(pb::PreviewRevocationResponse {
            key: Some(key(record, false)),
            revocable,
            keks_unreadable,
            // One KEK per resource.
            resources_unreadable: keks_unreadable,
            keks_wrapped_by_key,
        }))
    }
}

/// `ContentKeyService` over a [`KeyService`], for internal services.
pub struct ContentKeyApi {
    service: Arc<KeyService>,
    authz: Arc<AuthzPolicy>,
}

impl ContentKeyApi {
    /// The adapter.
    pub fn new(service: Arc<KeyService>, authz: Arc<AuthzPolicy>) -> Self {
        Self { service, authz }
    }

    /// For the internal-service role. Refusals are audited: they are rare,
    /// unlike the calls themselves.
    async fn authorize<T>(
        &self,
        request: &Request<T>,
        org_id: &str,
        action: &str,
    ) -> Result<Caller, Status> {
        authorize(
            &self.service,
            &self.authz,
            request,
            org_id,
            None,
            Permission::UseKeys,
            action,
        )
        .await
    }
}

/// Parses the org id and checks the caller's role for it; a refusal is
/// audited in that org's log, with the key id the request named.
async fn authorize<T>(
    service: &KeyService,
    authz: &AuthzPolicy,
    request: &Request<T>,
    org_id: &str,
    key_id: Option<&str>,
    permission: Permission,
    action: &str,
) -> Result<Caller, Status> {
    let org = OrgId::parse(org_id).map_err(|e| Status::invalid_argument(format!("org_id: {e}")))?;
    let peer = PeerIdentity::of_request(request);
    match authz.authorize(peer.as_ref(), &org, permission) {
        Ok(caller) => Ok(caller),
        Err(denied) => {
            let status = ServiceError::from(denied).to_status();
            let identity = peer.as_ref().map_or("(no identity)", PeerIdentity::as_str);
            let result = format!("{:?}: {}", status.code(), status.message());
            service
                .record_refusal(identity, &org, action, key_id, result)
                .await;
            Err(status)
        }
    }
}

#[tonic::async_trait]
impl ContentKeyService for ContentKeyApi {
    async fn create_kek(
        &self,
        request: Request<pb::CreateKekRequest>,
    ) -> Result<Response<pb::CreateKekResponse>, Status> {
        let caller = self
            .authorize(&request, &request.get_ref().org_id, "create KEK")
            .await?;
        let pb::CreateKekRequest {
            org_id: _,
            resource,
        } = request.into_inner();
        let KekView {
            id,
            resource,
            key,
            created_at,
            created,
        } = self.service.create_kek(&caller, &resource).await?;
        Ok(Response::new(pb::CreateKekResponse {
            kek_id: id.as_str().to_owned(),
            resource: resource.as_str().to_owned(),
            key_id: key.0,
            created,
            created_at: Some(timestamp(created_at)),
        }))
    }

    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let caller = self
            .authorize(&request, &request.get_ref().org_id, "generate data key")
            .await?;
        let pb::GenerateDataKeyRequest {
            org_id: _,
            kek_id,
            context,
        } = request.into_inner();
        let DataKey {
            plaintext,
            wrapped,
            kek,
        } = self
            .service
            .generate_data_key(&caller, &kek_id, &context)
            .await?;
        Ok(Response::new(pb::GenerateDataKeyResponse {
            // The response owns this copy until it is encoded; prost cannot
            // zeroize it.
            plaintext: plaintext.expose().to_vec(),
            wrapped_key: wrapped,
            kek_id: kek.as_str().to_owned(),
        }))
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let caller = self
            .authorize(&request, &request.get_ref().org_id, "decrypt")
            .await?;
        let pb::DecryptRequest {
            org_id: _,
            wrapped_key,
            context,
        } = request.into_inner();
        let (plaintext, kek) = self
            .service
            .decrypt(&caller, &wrapped_key, &context)
            .await?;
        Ok(Response::new(pb::DecryptResponse {
            plaintext: plaintext.expose().to_vec(),
            kek_id: kek.as_str().to_owned(),
        }))
    }
}

fn rotation(view: RotationView) -> pb::Rotation {
    let RotationView {
        job,
        paused,
        rate_per_second,
        eta_seconds,
    } = view;
    let state = match (job.state, paused) {
        (JobState::Running, true) => pb::RotationState::Paused,
        (JobState::Running, false) => pb::RotationState::Running,
        (JobState::Finished, _) => pb::RotationState::Finished,
        (JobState::Superseded, _) => pb::RotationState::Superseded,
    };
    pb::Rotation {
        job_id: job.id,
        state: state.into(),
        target_key_id: job.target.0,
        from_key_ids: job.from.into_iter().map(|k| k.0).collect(),
        total: job.total,
        done: job.done,
        rate_per_second,
        eta_seconds,
        started_at: Some(timestamp(job.started_at)),
        ended_at: job.ended_at.map(timestamp),
    }
}

fn key_response(view: KeyView) -> pb::KeyResponse {
    let due = |k: &KeyDetails| {
        view.rotation_due
            && view
                .active
                .as_ref()
                .is_some_and(|a| a.record.id == k.record.id)
    };
    pb::KeyResponse {
        key: Some(key(view.key.clone(), due(&view.key))),
        active_key: view.active.clone().map(|k| key(k, view.rotation_due)),
    }
}

fn key(details: KeyDetails, rotation_due: bool) -> pb::Key {
    let KeyDetails { record, aws } = details;
    let KeyRecord {
        id,
        source,
        state,
        check_value,
        created_at,
        activated_at,
        revoked_at,
        expires_at,
        needed: _,
        before_provider_revocation: _,
    } = record;
    pb::Key {
        key_id: id.0,
        source: match source {
            KeySource::Uploaded => pb::KeySource::Uploaded,
            KeySource::AwsKms => pb::KeySource::AwsKms,
            KeySource::GenericDefault => pb::KeySource::GenericDefault,
        }
        .into(),
        state: match state {
            KeyState::Pending => pb::KeyState::Pending,
            KeyState::Active => pb::KeyState::Active,
            KeyState::Rotating => pb::KeyState::Rotating,
            KeyState::Deactivated => pb::KeyState::Deactivated,
            KeyState::Revoked => pb::KeyState::Revoked,
            KeyState::Deleted => pb::KeyState::Deleted,
            KeyState::Removed => pb::KeyState::Removed,
            KeyState::RevokedByProvider => pb::KeyState::RevokedByProvider,
        }
        .into(),
        key_check_value: check_value,
        created_at: Some(timestamp(created_at)),
        activated_at: activated_at.map(timestamp),
        revoked_at: revoked_at.map(timestamp),
        expires_at: expires_at.map(timestamp),
        rotation_due,
        aws: aws.map(|arns| {
            let AwsArns {
                key_arn,
                backup_key_arn,
                role_arn,
            } = arns;
            pb::AwsKey {
                key_arn,
                backup_key_arn: backup_key_arn.unwrap_or_default(),
                role_arn: role_arn.unwrap_or_default(),
            }
        }),
    }
}

fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.0,
        nanos: 0,
    }
}
