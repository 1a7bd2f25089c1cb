//! The gRPC edge of `cmk.control.v1`: [`AdminApi`] (`KeyAdminService`) and
//! [`ContentKeyApi`] (`ContentKeyService`), thin adapters over
//! [`KeyService`].
//!
//! Every RPC goes through one path, [`Edge::call`]: read the org the request
//! names, authorise the caller for it (a refusal is audited in that org's
//! log), read the rest of the request into typed values ([`request`]), call
//! the service, convert its answer ([`response`]). Every error becomes a
//! status in one place, [`ServiceError::to_status`].

use std::{future::Future, sync::Arc};

use cmk_control_plane_domain::{KeyId, OrgId};
use cmk_tls::PeerIdentity;
use tonic::{Request, Response, Status};

use crate::{
    authz::{Caller, LivePolicy, Permission},
    error::ServiceError,
    service::KeyService,
};

pub mod admin;
pub mod content;
mod request;
mod response;

pub use admin::AdminApi;
pub use content::ContentKeyApi;

use request::Scoped;

/// Which refusals an API records in the org's audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusals {
    /// Every one: an admin's refused call is part of the org's history.
    Audited,
    /// Refused authorisation one by one; every other call, served or
    /// refused, counted per minute into the audit log
    /// ([`crate::service::tally`]): the content-key API is the data path, at
    /// thousands of calls per second.
    Tallied,
}

/// What every RPC of one API shares: the service, the authorisation
/// policy in force (read again by every request), and which refusals it
/// audits.
pub(crate) struct Edge {
    service: Arc<KeyService>,
    authz: LivePolicy,
    refusals: Refusals,
}

impl Edge {
    pub(crate) fn new(
        service: Arc<KeyService>,
        authz: impl Into<LivePolicy>,
        refusals: Refusals,
    ) -> Self {
        Self {
            service,
            authz: authz.into(),
            refusals,
        }
    }

    /// Serves one RPC: authorises the caller for `permission` on the org the
    /// request names, reads the request into `T`, and runs `op`; `action` is
    /// the call's name in the audit log.
    pub(crate) async fn call<P, T, R, F>(
        &self,
        request: Request<P>,
        permission: Permission,
        action: &'static str,
        op: impl FnOnce(Caller, T) -> F,
    ) -> Result<Response<R>, Status>
    where
        P: Scoped,
        T: TryFrom<P, Error = ServiceError>,
        F: Future<Output = Result<R, ServiceError>>,
    {
        let caller = self.authorize(&request, permission, action).await?;
        let typed = self.typed(&caller, action, request.into_inner()).await?;
        Ok(Response::new(op(caller, typed).await?))
    }

    /// The service the RPCs call.
    pub(crate) fn service(&self) -> &KeyService {
        &self.service
    }

    /// The service, for a call whose answer outlives the request (a stream).
    pub(crate) fn service_arc(&self) -> Arc<KeyService> {
        self.service.clone()
    }

    /// Parses the org id and checks the caller's role for it; a refusal is
    /// audited in that org's log, with the key id the request named.
    async fn authorize<P: Scoped>(
        &self,
        request: &Request<P>,
        permission: Permission,
        action: &str,
    ) -> Result<Caller, ServiceError> {
        let message = request.get_ref();
        let org = OrgId::parse(message.org_id())
            .map_err(|e| ServiceError::InvalidArgument(format!("org_id: {e}")))?;
        let peer = PeerIdentity::of_request(request);
        match self.authz.authorize(peer.as_ref(), &org, permission) {
            Ok(caller) => Ok(caller),
            Err(denied) => {
                let err = ServiceError::from(denied);
                let identity = peer.as_ref().map_or("(no identity)", PeerIdentity::as_str);
                let key = message.key_id().and_then(|k| KeyId::parse(k).ok());
                self.service
                    .record_refusal(identity, &org, action, key.as_ref(), &err)
                    .await;
                Err(err)
            }
        }
    }

    /// The rest of `message` as typed values, for an authorised `caller`;
    /// a refusal is audited as `action`'s if this API audits every refusal.
    pub(crate) async fn typed<P, T>(
        &self,
        caller: &Caller,
        action: &'static str,
        message: P,
    ) -> Result<T, ServiceError>
    where
        T: TryFrom<P, Error = ServiceError>,
    {
        match T::try_from(message) {
            Ok(typed) => Ok(typed),
            Err(err) if self.refusals == Refusals::Audited => {
                self.service.refuse(caller, action, err).await
            }
            Err(err) => {
                self.service.tally(caller, action, None, Err(&err));
                Err(err)
            }
        }
    }
}
