//! Who may call: only client identities on the allow-list (the control plane).
//!
//! The TLS layer has already checked that the client certificate chains to the
//! configured CA; this check then decides on the identity inside it. It runs in
//! front of every service, health and reflection included, so a caller that is
//! not allowed learns nothing but PERMISSION_DENIED.

use std::{collections::BTreeSet, sync::Arc};

use cmk_tls::PeerIdentity;
use tonic::{Request, Status};

use crate::error::{ServiceError, to_status};

/// The interceptor: admits allow-listed identities and records the identity in
/// the request extensions for the handlers' logs.
pub fn allow_list(
    allowed: Arc<BTreeSet<String>>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |mut request: Request<()>| {
        let Some(identity) = PeerIdentity::of_request(&request) else {
            return Err(to_status(ServiceError::NotAllowed(
                "the client certificate names no identity (no URI or DNS SAN, no common name)"
                    .into(),
            )));
        };
        if !allowed.contains(identity.as_str()) {
            tracing::warn!(%identity, "refused a client that is not on the allow-list");
            return Err(to_status(ServiceError::NotAllowed(format!(
                "client identity {identity} is not allowed to call the HSM daemon"
            ))));
        }
        request.extensions_mut().insert(identity);
        Ok(request)
    }
}

/// The identity the interceptor admitted.
pub fn caller<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<PeerIdentity>()
        .map(|identity| identity.to_string())
        .unwrap_or_default()
}
