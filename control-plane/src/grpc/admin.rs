//! `cmk.control.v1.KeyAdminService`: an org's admins and read-only users.

use std::sync::Arc;

use cmk_proto::control::v1::{self as pb, key_admin_service_server::KeyAdminService};
use tonic::{Request, Response, Status};

use super::{
    Edge, Refusals,
    request::{KeyTarget, OrgOnly, SetByok, WatchFrom},
    response,
};
use crate::{
    authz::{LivePolicy, Permission},
    service::{
        AddAwsKey, AuditPage, AwsSetupRequest, KeyOp, KeyService, UploadKey, admin::byok_action,
    },
};

/// `KeyAdminService` over a [`KeyService`]. Every refusal is audited.
pub struct AdminApi {
    edge: Edge,
}

impl AdminApi {
    /// The adapter, authorising each call by the policy in force then.
    pub fn new(service: Arc<KeyService>, authz: impl Into<LivePolicy>) -> Self {
        Self {
            edge: Edge::new(service, authz, Refusals::Audited),
        }
    }

    async fn change(
        &self,
        request: Request<pb::KeyRequest>,
        op: KeyOp,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        let service = self.edge.service();
        self.edge
            .call(
                request,
                Permission::Manage,
                op.name(),
                |caller, KeyTarget { key }| async move {
                    service
                        .change(&caller, op, &key)
                        .await
                        .map(response::key_response)
                },
            )
            .await
    }
}

#[tonic::async_trait]
impl KeyAdminService for AdminApi {
    async fn get_import_public_key(
        &self,
        request: Request<pb::GetImportPublicKeyRequest>,
    ) -> Result<Response<pb::GetImportPublicKeyResponse>, Status> {
        let service = self.edge.service();
        self.edge
            .call(
                request,
                Permission::Read,
                "get import public key",
                |caller, OrgOnly| async move {
                    service
                        .import_public_key(&caller)
                        .await
                        .map(response::import_public_key)
                },
            )
            .await
    }

    async fn set_byok(
        &self,
        request: Request<pb::SetByokRequest>,
    ) -> Result<Response<pb::SetByokResponse>, Status> {
        let service = self.edge.service();
        let action = byok_action(request.get_ref().enabled);
        self.edge
            .call(
                request,
                Permission::Manage,
                action,
                |caller, SetByok { enabled }| async move {
                    service
                        .set_byok(&caller, enabled)
                        .await
                        .map(response::set_byok)
                },
            )
            .await
    }

    async fn upload_key(
        &self,
        request: Request<pb::UploadKeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        let service = self.edge.service();
        self.edge
            .call(
                request,
                Permission::Manage,
                "upload",
                |caller, upload: UploadKey| async move {
                    service
                        .upload(&caller, upload)
                        .await
                        .map(response::key_response)
                },
            )
            .await
    }

    async fn add_aws_key(
        &self,
        request: Request<pb::AddAwsKeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        let service = self.edge.service();
        self.edge
            .call(
                request,
                Permission::Manage,
                "add aws key",
                |caller, key: AddAwsKey| async move {
                    service
                        .add_aws_key(&caller, key)
                        .await
                        .map(response::key_response)
                },
            )
            .await
    }

    async fn get_aws_setup(
        &self,
        request: Request<pb::GetAwsSetupRequest>,
    ) -> Result<Response<pb::GetAwsSetupResponse>, Status> {
        let service = self.edge.service();
        self.edge
            .call(
                request,
                Permission::Manage,
                "get aws setup",
                |caller, setup: AwsSetupRequest| async move {
                    service
                        .aws_setup(&caller, setup)
                        .await
                        .map(response::aws_setup)
                },
            )
            .await
    }

    async fn activate_key(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        self.change(request, KeyOp::Activate).await
    }

    async fn cancel_key(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        self.change(request, KeyOp::Cancel).await
    }

    async fn revoke_key(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        self.change(request, KeyOp::Revoke).await
    }

    async fn reactivate_key(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        self.change(request, KeyOp::Reactivate).await
    }

    async fn delete_key(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        self.change(request, KeyOp::Delete).await
    }

    async fn restore_key(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        self.change(request, KeyOp::Restore).await
    }

    async fn get_key(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::KeyResponse>, Status> {
        let service = self.edge.service();
        self.edge
            .call(
                request,
                Permission::Read,
                "get key",
                |caller, KeyTarget { key }| async move {
                    service.get(&caller, &key).await.map(response::key_response)
                },
            )
            .await
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let service = self.edge.service();
        self.edge
            .call(request, Permission::Read, "list keys", |caller, OrgOnly| async move {
                service.list(&caller).await.map(response::list_keys)
            })
            .await
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let service = self.edge.service();
        self.edge
            .call(
                request,
                Permission::Read,
                "list audit events",
                |caller, page: AuditPage| async move {
                    let rows = service.audit_events(&caller, page).await?;
                    Ok(response::audit_events(rows, page))
                },
            )
            .await
    }

    type WatchEventsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::AuditEvent, Status>> + Send>>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let service = self.edge.service_arc();
        self.edge
            .call(
                request,
                Permission::Read,
                "watch audit events",
                |caller, WatchFrom { after_seq }| async move {
                    let events = service.watch_events(&caller, after_seq).await?;
                    let stream = tokio_stream::StreamExt::map(events, |row| {
                        row.map(response::audit_event).map_err(Status::from)
                    });
                    Ok(Box::pin(stream) as Self::WatchEventsStream)
                },
            )
            .await
    }

    async fn verify_audit_log(
        &self,
        request: Request<pb::VerifyAuditLogRequest>,
    ) -> Result<Response<pb::VerifyAuditLogResponse>, Status> {
        let service = self.edge.service();
        self.edge
            .call(
                request,
                Permission::Read,
                "verify audit log",
                |caller, OrgOnly| async move {
                    service
                        .verify_audit(&caller)
                        .await
                        .map(response::verify_audit)
                },
            )
            .await
    }

    async fn get_rotation(
        &self,
        request: Request<pb::GetRotationRequest>,
    ) -> Result<Response<pb::Rotation>, Status> {
        let service = self.edge.service();
        self.edge
            .call(request, Permission::Read, "get rotation", |caller, OrgOnly| async move {
                service.rotation(&caller).await.map(response::rotation)
            })
            .await
    }

    async fn preview_revocation(
        &self,
        request: Request<pb::KeyRequest>,
    ) -> Result<Response<pb::PreviewRevocationResponse>, Status> {
        let service = self.edge.service();
        self.edge
            .call(
                request,
                Permission::Read,
                "preview revocation",
                |caller, KeyTarget { key }| async move {
                    service
                        .preview_revocation(&caller, &key)
                        .await
                        .map(response::revocation_preview)
                },
            )
            .await
    }
}
