//! References to keys that stay outside custody (in AWS KMS), kept by a
//! keystore beside the keys it holds, in one handle namespace.
//!
//! The keystore seals a reference as it seals a key — a reference altered on
//! disk would send secrets to someone else's key — but does not use it: the
//! backend that understands it (`cmk-hsm-aws-kms`) reads it back and does the
//! wrapping. The keystore only needs the reference's identity, the part a
//! recovery must present again, to fingerprint it when it is destroyed.

use std::sync::Arc;

use async_trait::async_trait;

#[cfg(doc)]
use crate::MaterialCustody;
use crate::{Custody, CustodyError, KeyCheckValue, KeyHandle, KeyInfo, KeyScope};

/// A reference to a key held elsewhere, as a keystore keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyReference {
    identity: String,
    detail: Vec<u8>,
    check_value: KeyCheckValue,
    /// `None` only for a reference stored before keys were bound, until its
    /// first use binds it.
    scope: Option<KeyScope>,
}

impl KeyReference {
    /// The reference to the key named `identity` (for AWS KMS, the primary
    /// key ARN), with the rest of it (`detail`) in the backend's own
    /// encoding, serving `scope`. `None` for an empty identity or one longer
    /// than a length prefix of 16 bits can say.
    pub fn new(
        identity: String,
        detail: Vec<u8>,
        check_value: KeyCheckValue,
        scope: KeyScope,
    ) -> Option<Self> {
        Self::stored(identity, detail, check_value, Some(scope))
    }

    /// A reference as a keystore read it back, unbound if it was stored
    /// before keys were bound.
    pub(crate) fn stored(
        identity: String,
        detail: Vec<u8>,
        check_value: KeyCheckValue,
        scope: Option<KeyScope>,
    ) -> Option<Self> {
        (!identity.is_empty() && u16::try_from(identity.len()).is_ok()).then_some(Self {
            identity,
            detail,
            check_value,
            scope,
        })
    }

    /// Whom the referenced key serves; `None` only for a reference stored
    /// before keys were bound and not used since (see [`Custody::scope`]).
    pub fn scope(&self) -> Option<&KeyScope> {
        self.scope.as_ref()
    }

    /// The name of the key referenced: what a destroyed reference's
    /// fingerprint is of, so what a recovery must present again.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The rest of the reference, as the backend encoded it.
    pub fn detail(&self) -> &[u8] {
        &self.detail
    }

    /// The reference's non-secret fingerprint, chosen by its backend.
    pub fn check_value(&self) -> KeyCheckValue {
        self.check_value
    }
}

/// A custody backend that also keeps [`KeyReference`]s under its handles:
/// the software keystore. Storing one follows the rules of
/// [`MaterialCustody::import`] and [`MaterialCustody::recover`]; its `wrap`
/// and `unwrap` refuse a reference with [`CustodyError::ExternalKey`], and
/// its `destroy` forgets one.
#[async_trait]
pub trait ReferenceStore: Custody {
    /// Stores `reference` under the unused `handle`, durable once this
    /// returns `Ok`; the handle is refused as in [`MaterialCustody::import`].
    async fn add_reference(
        &self,
        handle: &KeyHandle,
        reference: KeyReference,
    ) -> Result<KeyInfo, CustodyError>;

    /// Whether a reference to `identity` may come back under `handle`, as
    /// [`MaterialCustody::recover`] decides for a key; nothing is stored. Lets a
    /// backend refuse before it contacts the referenced key.
    async fn check_recoverable(
        &self,
        handle: &KeyHandle,
        identity: &str,
    ) -> Result<(), CustodyError>;

    /// Brings a destroyed reference back under its own `handle`, as
    /// [`MaterialCustody::recover`] does a key.
    async fn recover_reference(
        &self,
        handle: &KeyHandle,
        reference: KeyReference,
    ) -> Result<KeyInfo, CustodyError>;

    /// The reference `handle` names, or `None` when it names a key held
    /// here; a destroyed or unknown handle is an error as for
    /// [`Custody::wrap`].
    async fn reference(
        &self,
        handle: &KeyHandle,
    ) -> Result<Option<Arc<KeyReference>>, CustodyError>;
}
