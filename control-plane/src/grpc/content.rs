//! `cmk.control.v1.ContentKeyService`: the org's internal services.

use std::sync::Arc;

use cmk_proto::control::v1::{self as pb, content_key_service_server::ContentKeyService};
use tonic::{Request, Response, Status};

use super::{
    Edge, Refusals,
    request::{CreateKek, Decrypt, GenerateDataKey},
    response,
};
use crate::{
    authz::{LivePolicy, Permission},
    service::KeyService,
};

/// `ContentKeyService` over a [`KeyService`], for internal services. Only
/// refused authorisation is audited: refusals are rare, unlike the calls
/// themselves.
pub struct ContentKeyApi {
    edge: Edge,
}

impl ContentKeyApi {
    /// The adapter, authorising each call by the policy in force then.
    pub fn new(service: Arc<KeyService>, authz: impl Into<LivePolicy>) -> Self {
        Self {
            edge: Edge::new(service, authz, Refusals::Tallied),
        }
    }
}

#[tonic::async_trait]
impl ContentKeyService for ContentKeyApi {
    async fn create_kek(
        &self,
        request: Request<pb::CreateKekRequest>,
    ) -> Result<Response<pb::CreateKekResponse>, Status> {
        let service = self.edge.service();
        self.edge
            .call(
                request,
                Permission::UseKeys,
                "create KEK",
                |caller, CreateKek { resource }| async move {
                    let made = service.create_kek(&caller, &resource).await;
                    let kek = made.as_ref().ok().map(|view| view.id.clone());
                    service.tally(&caller, "create KEK", kek.as_ref(), made.as_ref().map(drop));
                    made.map(response::create_kek)
                },
            )
            .await
    }

    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let service = self.edge.service();
        self.edge
            .call(
                request,
                Permission::UseKeys,
                "generate data key",
                |caller, GenerateDataKey { kek, context }| async move {
                    let made = service.generate_data_key(&caller, &kek, &context).await;
                    service.tally(
                        &caller,
                        "generate data key",
                        Some(&kek),
                        made.as_ref().map(drop),
                    );
                    made.map(response::generate_data_key)
                },
            )
            .await
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let service = self.edge.service();
        self.edge
            .call(
                request,
                Permission::UseKeys,
                "decrypt",
                |caller,
                 Decrypt {
                     wrapped_key,
                     context,
                 }| async move {
                    let opened = service.decrypt(&caller, &wrapped_key, &context).await;
                    let kek = opened.as_ref().ok().map(|(_, kek)| kek.clone());
                    service.tally(&caller, "decrypt", kek.as_ref(), opened.as_ref().map(drop));
                    opened.map(response::decrypt)
                },
            )
            .await
    }
}
