//! Who may call: only client identities on the allow-list (the control plane).
//!
//! The TLS layer has already checked that the client certificate chains to the
//! configured CA and is not revoked; this check then reads the identity inside
//! it ([`IdentityRule`], the one rule both servers share) and decides on it. It
//! runs in front of every service, health and reflection included, so a caller
//! that is not allowed learns nothing but PERMISSION_DENIED.

use std::{collections::BTreeSet, sync::Arc};

use cmk_tls::{IdentityRule, PeerIdentity};
use tonic::{Request, Status};

use crate::error::{ServiceError, to_status};

/// The interceptor: admits allow-listed identities, read by `identities`,
/// and records the identity in the request extensions for the handlers' logs.
pub fn allow_list(
    allowed: Arc<BTreeSet<String>>,
    identities: IdentityRule,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |mut request: Request<()>| {
        // A certificate naming no single identity is refused (and logged) here.
        let identity = identities.admit(&mut request)?;
        if !allowed.contains(identity.as_str()) {
            tracing::warn!(%identity, "refused a client that is not on the allow-list");
            return Err(to_status(ServiceError::NotAllowed(format!(
                "client identity {identity} is not allowed to call the HSM daemon"
            ))));
        }
        Ok(request)
    }
}

/// The identity the interceptor admitted.
pub fn caller<T>(request: &Request<T>) -> String {
    PeerIdentity::of_request(request)
        .map(|identity| identity.to_string())
        .unwrap_or_default()
}
