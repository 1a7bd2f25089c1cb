//! AWS KMS keys in custody ([`AwsKeys`], a [`Custody`] backend): a key
//! reference is admitted after a round trip, secrets are wrapped under it in
//! envelope version 2, and the owner's key state is watched through
//! DescribeKey.
//!
//! The references themselves are kept by the software keystore
//! ([`ReferenceStore`]), sealed under its root key like every CMK record: a
//! reference altered on disk would redirect secrets to someone else's key, so
//! it must not be changeable without the root key.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cmk_hsm_custody::{
    Custody, CustodyError, Destroyed, KeyCheckValue, KeyHandle, KeyInfo, KeyReference, KeyScope,
    OrgName, ProviderState, ReferenceStore, UnwrapItem, Unwrapped, WrapItem,
    envelope::{self, Sealed},
};
use cmk_secret::SecretBytes;
use futures_util::{StreamExt, stream};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::{
    AssumedRole, AwsError, AwsKeyRef, AwsKeyState, AwsKms, AwsKmsError, AwsSettings,
    EncryptionContext, ExternalId, KeyArn, MAX_BLOB_LEN, RoleArn, WrappedByAws,
};

/// The encryption context pair naming the org the key serves, in the clear
/// so that the customer's key policy can pin it
/// (`kms:EncryptionContext:cmk:org`).
pub const CONTEXT_ORG: &str = "cmk:org";
/// The encryption context pair naming the key reference.
pub const CONTEXT_HANDLE: &str = "cmk:key-handle";
/// The encryption context pair carrying the caller's associated data (hex): for
/// a KEK, the control plane's binding of the org and the KEK id.
pub const CONTEXT_ASSOCIATED_DATA: &str = "cmk:associated-data";

/// Domain separation of the check value of a key reference.
const CHECK_VALUE_LABEL: &[u8] = b"cmk aws-kms key\0";

/// How long a key's state in AWS KMS is trusted unless configured otherwise.
pub const DEFAULT_STATE_TTL: Duration = Duration::from_secs(30);

/// Items of a batch in flight at once: each is a network round trip.
const BATCH_CONCURRENCY: usize = 16;

/// The longest version 2 ciphertext: two KMS blobs of the largest size.
pub const MAX_CIPHERTEXT_LEN: usize = envelope::HEADER_LEN + 2 + 2 * (2 + MAX_BLOB_LEN);

/// The key's state when it is not usable; `None` when it is (or is in a
/// transient state KMS itself will judge).
pub(crate) fn provider_state(state: &AwsKeyState) -> Option<ProviderState> {
    match state {
        AwsKeyState::Enabled | AwsKeyState::Other(_) => None,
        AwsKeyState::Disabled => Some(ProviderState::Disabled),
        AwsKeyState::PendingDeletion => Some(ProviderState::PendingDeletion),
        AwsKeyState::PendingImport => Some(ProviderState::PendingImport),
        AwsKeyState::Unavailable => Some(ProviderState::Unavailable),
    }
}

/// What the owner of a key in AWS KMS can do about its state.
pub(crate) fn remedy(state: ProviderState) -> &'static str {
    match state {
        ProviderState::Disabled => "its owner disabled it; enable it in AWS KMS to use it again",
        ProviderState::PendingDeletion => {
            "its owner scheduled its deletion; cancel the deletion and enable it in AWS KMS \
             before the waiting period ends, or everything it protects is lost"
        }
        ProviderState::PendingImport => "its key material is missing or expired; import it again",
        ProviderState::Unavailable => "its custom key store is disconnected; reconnect it",
        ProviderState::NotFound => {
            "it no longer exists in that account and region, or this service may no longer \
             see it"
        }
    }
}

/// The check value of a key reference: the leftmost 5 bytes of
/// SHA-256("cmk aws-kms key\0" || primary key ARN). It identifies the key (the
/// same ARN added twice has the same value) without being a function of key
/// bytes, which the service never sees.
pub fn check_value(key: &AwsKeyRef) -> KeyCheckValue {
    let digest = Sha256::new()
        .chain_update(CHECK_VALUE_LABEL)
        .chain_update(key.primary().as_str())
        .finalize();
    let mut kcv = [0; KeyCheckValue::LEN];
    kcv.copy_from_slice(&digest[..KeyCheckValue::LEN]);
    KeyCheckValue::from_bytes(kcv)
}

/// The encryption context of a secret wrapped under the reference `handle` with
/// `associated_data`: KMS then refuses to decrypt it for any other reference or
/// associated data, and CloudTrail shows which reference and which binding
/// each call was for. With `org`, the org the key serves is a pair of its
/// own, which a key policy can require.
pub fn encryption_context(
    handle: &KeyHandle,
    org: Option<&OrgName>,
    associated_data: &[u8],
) -> Result<EncryptionContext, AwsKmsError> {
    let mut context =
        EncryptionContext::new(CONTEXT_HANDLE, handle.to_string()).map_err(AwsError::from)?;
    if let Some(org) = org {
        context = context
            .with(CONTEXT_ORG, org.as_str())
            .map_err(AwsError::from)?;
    }
    // KMS refuses an empty value; no pair and an empty one bind the same thing.
    if associated_data.is_empty() {
        return Ok(context);
    }
    Ok(context
        .with(CONTEXT_ASSOCIATED_DATA, hex::encode(associated_data))
        .map_err(AwsError::from)?)
}

/// The byte form of a key reference inside a sealed keystore record: four
/// length-prefixed (u16, big-endian) fields, the primary, backup and role
/// ARNs and the role's external id, an empty one meaning none. The keystore
/// keeps the primary as the reference's identity and the rest as its detail,
/// in these same bytes. References stored before external ids have the
/// first three fields only.
fn encode_reference(key: &AwsKeyRef) -> Vec<u8> {
    let fields = [
        key.primary().as_str(),
        key.backup().map_or("", KeyArn::as_str),
        key.role().map_or("", RoleArn::as_str),
        key.external_id().map_or("", ExternalId::as_str),
    ];
    let mut out = Vec::with_capacity(8 + fields.iter().map(|f| f.len()).sum::<usize>());
    for field in fields {
        // ARNs are bounded by MAX_ARN_LEN and external ids by
        // ExternalId::MAX_LEN, far below u16::MAX.
        let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    out
}

/// Reads what [`encode_reference`] wrote; `None` if it is not that, which for
/// a record that authenticated under the root key means a bug or a format from
/// a newer version.
fn decode_reference(mut bytes: &[u8]) -> Option<AwsKeyRef> {
    let mut fields = Vec::with_capacity(4);
    while !bytes.is_empty() && fields.len() < 4 {
        let (len, rest) = bytes.split_first_chunk::<2>()?;
        let (field, rest) = rest.split_at_checked(usize::from(u16::from_be_bytes(*len)))?;
        fields.push(std::str::from_utf8(field).ok()?);
        bytes = rest;
    }
    if !bytes.is_empty() || fields.len() < 3 {
        return None;
    }
    fn optional(text: &str) -> Option<&str> {
        (!text.is_empty()).then_some(text)
    }
    let primary = KeyArn::parse(fields[0]).ok()?;
    let backup = optional(fields[1]).map(KeyArn::parse).transpose().ok()?;
    let role = optional(fields[2]).map(RoleArn::parse).transpose().ok()?;
    let external_id = fields
        .get(3)
        .copied()
        .and_then(optional)
        .map(ExternalId::parse)
        .transpose()
        .ok()?;
    AwsKeyRef::new(primary, backup, role)
        .and_then(|key| key.with_external_id(external_id))
        .ok()
}

/// What the keystore keeps of `key`, serving `org`.
fn to_stored(key: &AwsKeyRef, org: &OrgName) -> KeyReference {
    let bytes = encode_reference(key);
    // The primary's length prefix and text come first (see `encode_reference`).
    let detail = bytes[2 + key.primary().as_str().len()..].to_vec();
    let stored = KeyReference::new(
        key.primary().as_str().to_owned(),
        detail,
        check_value(key),
        KeyScope::Org(org.clone()),
    );
    // An ARN is never empty and is bounded by MAX_ARN_LEN, far below u16::MAX.
    stored.expect("a key ARN is a valid reference identity")
}

/// The key reference the keystore kept; `None` if it is not one.
fn from_stored(stored: &KeyReference) -> Option<AwsKeyRef> {
    let identity = stored.identity().as_bytes();
    let len = u16::try_from(identity.len()).ok()?.to_be_bytes();
    decode_reference(&[&len[..], identity, stored.detail()].concat())
}

/// The AWS KMS backend: references kept in `store`, used through AWS KMS.
pub struct AwsKeys {
    kms: AwsKms,
    store: Arc<dyn ReferenceStore>,
    state_ttl: Duration,
    /// What DescribeKey last said about each primary key, and when; `None` for
    /// usable, or unknown because the region did not answer (the call itself
    /// then fails over or fails).
    states: Mutex<HashMap<KeyArn, (Instant, Option<ProviderState>)>>,
}

impl fmt::Debug for AwsKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKeys")
            .field("kms", &self.kms)
            .field("state_ttl", &self.state_ttl)
            .finish_non_exhaustive()
    }
}

impl AwsKeys {
    /// AWS KMS reached with `settings`, references kept in `store`; a key's
    /// state is looked up again once `state_ttl` old. Nothing is contacted
    /// until a key is used.
    pub fn new(settings: AwsSettings, state_ttl: Duration, store: Arc<dyn ReferenceStore>) -> Self {
        Self {
            kms: AwsKms::new(settings),
            store,
            state_ttl,
            states: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a reference to `key` into the keystore under `handle`, serving
    /// `org` alone, once an Encrypt and Decrypt round trip has shown the key
    /// can be used; durable once this returns `Ok`. The handle is refused as
    /// a key's would be ([`cmk_hsm_custody::MaterialCustody::import`]).
    pub async fn add(
        &self,
        handle: &KeyHandle,
        org: &OrgName,
        key: AwsKeyRef,
    ) -> Result<KeyInfo, CustodyError> {
        self.admit(&key, org).await?;
        self.store.add_reference(handle, to_stored(&key, org)).await
    }

    /// Brings the destroyed reference `handle` back, as
    /// [`cmk_hsm_custody::MaterialCustody::recover`] does a key: its primary
    /// key ARN must be the one given (backup and role may differ), and the key
    /// is checked as [`AwsKeys::add`] checks it.
    pub async fn recover(
        &self,
        handle: &KeyHandle,
        org: &OrgName,
        key: AwsKeyRef,
    ) -> Result<KeyInfo, CustodyError> {
        // Checked before AWS is asked anything, so that another key's ARN
        // costs no round trips; checked again when the reference is stored.
        self.store
            .check_recoverable(handle, key.primary().as_str())
            .await?;
        self.admit(&key, org).await?;
        let info = self
            .store
            .recover_reference(handle, to_stored(&key, org))
            .await?;
        info!(%handle, check_value = %info.check_value, "destroyed AWS KMS key reference recovered");
        Ok(info)
    }

    /// Whether `handle` names a live reference, so that this backend wraps
    /// under it. `false` for anything else — a key the keystore holds
    /// itself, an unknown or destroyed handle, a keystore that cannot be
    /// read — which the keystore answers for.
    pub async fn holds(&self, handle: &KeyHandle) -> bool {
        matches!(self.store.reference(handle).await, Ok(Some(_)))
    }

    /// The key `handle` refers to and the org it serves (`None` for a
    /// reference stored before keys were bound and not used since), or
    /// `None` when it names a key the keystore holds itself; unknown and
    /// destroyed handles are errors.
    async fn key(
        &self,
        handle: &KeyHandle,
    ) -> Result<Option<(AwsKeyRef, Option<OrgName>)>, AwsKmsError> {
        match self.store.reference(handle).await? {
            Some(stored) => {
                let org = stored.scope().and_then(KeyScope::org).cloned();
                from_stored(&stored)
                    .map(|key| Some((key, org)))
                    .ok_or(AwsKmsError::UnreadableReference(*handle))
            }
            None => Ok(None),
        }
    }

    /// Checks that the service can use `key` (and its backup).
    async fn admit(&self, key: &AwsKeyRef, org: &OrgName) -> Result<(), AwsKmsError> {
        self.kms.verify_access(key, Some(org)).await?;
        self.remember(key.primary(), None);
        Ok(())
    }

    /// Encrypts `plaintext` under the reference `handle` into an envelope
    /// version 2 ciphertext.
    async fn wrap_one(
        &self,
        handle: &KeyHandle,
        plaintext: &SecretBytes,
        associated_data: &[u8],
    ) -> Result<Vec<u8>, AwsKmsError> {
        let Some((key, org)) = self.key(handle).await? else {
            return Err(CustodyError::ExternalKey(*handle).into());
        };
        let context = encryption_context(handle, org.as_ref(), associated_data)?;
        self.check_usable(&key).await?;
        let wrapped = self
            .answered(&key, self.kms.encrypt(&key, plaintext, &context).await)
            .await?
            .with_org_in_context(org.is_some());
        Ok(envelope::wrap_aws(handle, &wrapped.to_bytes()))
    }

    /// Decrypts an envelope version 2 ciphertext made by
    /// [`AwsKeys::wrap_one`].
    async fn unwrap_one(
        &self,
        ciphertext: &[u8],
        associated_data: &[u8],
    ) -> Result<Unwrapped, AwsKmsError> {
        let sealed = envelope::read(ciphertext).map_err(CustodyError::from)?;
        let handle = sealed.handle();
        let (Sealed::Aws { body, .. }, Some((key, org))) = (sealed, self.key(&handle).await?)
        else {
            // The version byte does not match the kind of key it names (a
            // version 1 ciphertext, or one naming a key the keystore holds):
            // the ciphertext was altered.
            return Err(CustodyError::Authentication.into());
        };
        let wrapped = WrappedByAws::from_bytes(body)?;
        // Ciphertexts made before the reference was bound have no org pair.
        let org = org.filter(|_| wrapped.org_in_context());
        let context = encryption_context(&handle, org.as_ref(), associated_data)?;
        self.check_usable(&key).await?;
        let plaintext = self
            .answered(&key, self.kms.decrypt(&key, &wrapped, &context).await)
            .await?;
        Ok(Unwrapped { plaintext, handle })
    }

    /// Refuses a key whose owner disabled it or scheduled its deletion. Moto,
    /// like a KMS replica lagging behind, still encrypts with a disabled key:
    /// DescribeKey is what says whether the owner wants it used.
    async fn check_usable(&self, key: &AwsKeyRef) -> Result<(), AwsKmsError> {
        match self.state(key.primary(), key.assumed_role()).await {
            Some(state) => Err(AwsKmsError::ProviderKeyState {
                key: key.primary().clone(),
                state,
            }),
            None => Ok(()),
        }
    }

    /// Turns a refusal that may mean the key was just disabled into that
    /// state, looked up afresh.
    async fn answered<T>(
        &self,
        key: &AwsKeyRef,
        result: Result<T, AwsError>,
    ) -> Result<T, AwsKmsError> {
        match result {
            Err(err @ (AwsError::KeyDisabled { .. } | AwsError::NotFound { .. })) => {
                self.forget(key.primary());
                self.check_usable(key).await?;
                Err(err.into())
            }
            other => Ok(other?),
        }
    }

    async fn state(&self, key: &KeyArn, role: Option<&AssumedRole>) -> Option<ProviderState> {
        let cached = self
            .states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.state_ttl)
            .map(|(_, state)| *state);
        if let Some(state) = cached {
            return state;
        }
        let state = match self.kms.key_state(key, role).await {
            Ok(state) => provider_state(&state),
            Err(AwsError::NotFound { .. }) => Some(ProviderState::NotFound),
            Err(err) => {
                // Remembered as usable for the TTL as well, so a dead region
                // costs one slow DescribeKey per TTL, not one per call.
                debug!(%key, error = %err, "AWS KMS key state unknown; leaving it to the call");
                None
            }
        };
        if let Some(state) = state {
            warn!(%key, %state, "AWS KMS key is not usable: refusing to wrap or unwrap with it");
        }
        self.remember(key, state);
        state
    }

    fn remember(&self, key: &KeyArn, state: Option<ProviderState>) {
        self.states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone(), (Instant::now(), state));
    }

    fn forget(&self, key: &KeyArn) {
        self.states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }
}

/// AWS KMS as a custody backend for the references the keystore keeps: a
/// handle that names a key the keystore holds itself is
/// [`CustodyError::ExternalKey`] here, and a failure of AWS is a
/// [`CustodyError::Provider`] carrying the [`AwsKmsError`].
#[async_trait]
impl Custody for AwsKeys {
    async fn wrap(
        &self,
        handle: &KeyHandle,
        plaintext: &SecretBytes,
        associated_data: &[u8],
    ) -> Result<Vec<u8>, CustodyError> {
        Ok(self.wrap_one(handle, plaintext, associated_data).await?)
    }

    async fn unwrap(
        &self,
        ciphertext: &[u8],
        associated_data: &[u8],
    ) -> Result<Unwrapped, CustodyError> {
        Ok(self.unwrap_one(ciphertext, associated_data).await?)
    }

    /// Forgets the reference; the key in AWS is left as it is. Nothing is
    /// asked of AWS.
    async fn destroy(&self, handle: &KeyHandle) -> Result<Destroyed, CustodyError> {
        // A destroyed or unknown handle is the keystore's to answer for
        // (already destroyed, never issued); a live key of its own is not
        // this backend's to destroy.
        if let Ok(None) = self.store.reference(handle).await {
            return Err(CustodyError::ExternalKey(*handle));
        }
        self.store.destroy(handle).await
    }

    /// The scope the keystore keeps with the reference.
    async fn scope(
        &self,
        handle: &KeyHandle,
        claimant: Option<&OrgName>,
    ) -> Result<KeyScope, CustodyError> {
        self.store.scope(handle, claimant).await
    }

    /// Items run concurrently: each is a network round trip.
    async fn wrap_batch(&self, items: Vec<WrapItem>) -> Vec<Result<Vec<u8>, CustodyError>> {
        stream::iter(items)
            .map(|item| async move {
                Custody::wrap(self, &item.handle, &item.plaintext, &item.associated_data).await
            })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await
    }

    /// Items run concurrently: each is a network round trip.
    async fn unwrap_batch(&self, items: Vec<UnwrapItem>) -> Vec<Result<Unwrapped, CustodyError>> {
        stream::iter(items)
            .map(|item| async move {
                Custody::unwrap(self, &item.ciphertext, &item.associated_data).await
            })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: &str =
        "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    const BACKUP: &str =
        "arn:aws:kms:us-west-2:111122223333:key/mrk-0123456789abcdef0123456789abcdef";
    const ROLE: &str = "arn:aws:iam::111122223333:role/cmk/KeyUser";

    fn reference(backup: bool, role: bool) -> AwsKeyRef {
        AwsKeyRef::new(
            KeyArn::parse(PRIMARY).expect("valid"),
            backup.then(|| KeyArn::parse(BACKUP).expect("valid")),
            role.then(|| RoleArn::parse(ROLE).expect("valid")),
        )
        .expect("valid")
        .with_external_id(role.then(|| ExternalId::parse("cmk-org-7f3a").expect("valid")))
        .expect("valid")
    }

    fn org() -> OrgName {
        OrgName::parse("acme").expect("valid")
    }

    #[test]
    fn references_round_trip_through_their_record_form() {
        for (backup, role) in [(false, false), (true, false), (false, true), (true, true)] {
            let key = reference(backup, role);
            assert_eq!(decode_reference(&encode_reference(&key)), Some(key));
        }
    }

    #[test]
    fn references_stored_before_external_ids_still_read() {
        let key = reference(true, true);
        let bytes = encode_reference(&key);
        // Without the fourth field (its length prefix is the last two bytes
        // before the id).
        let id_field = 2 + "cmk-org-7f3a".len();
        let old = &bytes[..bytes.len() - id_field];
        let read = decode_reference(old).expect("three fields read");
        assert_eq!(read.role(), key.role());
        assert_eq!(read.external_id(), None);
    }

    #[test]
    fn an_external_id_needs_a_role_and_sts_syntax() {
        let id = ExternalId::parse("cmk-1").expect("valid");
        assert_eq!(
            reference(false, false).with_external_id(Some(id)),
            Err(crate::ArnError::ExternalIdWithoutRole)
        );
        for bad in ["", "x", "a b", "ä-id", &"a".repeat(1225)] {
            assert_eq!(
                ExternalId::parse(bad),
                Err(crate::ArnError::ExternalId),
                "{bad:?}"
            );
        }
        assert!(ExternalId::parse("+=,.@:/-_aZ09").is_ok());
    }

    #[test]
    fn malformed_record_forms_are_refused() {
        let good = encode_reference(&reference(true, true));
        // Cut right before the external id, it is a record of before external ids.
        let three_fields = good.len() - 2 - "cmk-org-7f3a".len();
        for cut in (0..good.len()).filter(|&cut| cut != three_fields) {
            assert_eq!(decode_reference(&good[..cut]), None, "cut at {cut}");
        }
        assert_eq!(decode_reference(&[good.as_slice(), b"x"].concat()), None);
        // A record naming the backup as its primary is not a valid reference.
        let same = encode_reference(&reference(false, false));
        let mut doubled = same[..2 + PRIMARY.len()].to_vec();
        doubled.extend_from_slice(&same[..2 + PRIMARY.len()]);
        doubled.extend_from_slice(&[0, 0]);
        assert_eq!(decode_reference(&doubled), None);
    }

    #[test]
    fn the_keystore_keeps_the_primary_as_identity_and_the_record_bytes_unchanged() {
        for (backup, role) in [(false, false), (true, false), (false, true), (true, true)] {
            let key = reference(backup, role);
            let stored = to_stored(&key, &org());
            assert_eq!(stored.identity(), PRIMARY);
            assert_eq!(stored.scope(), Some(&KeyScope::Org(org())));
            assert_eq!(stored.check_value(), check_value(&key));
            let len = u16::try_from(PRIMARY.len()).expect("short").to_be_bytes();
            assert_eq!(
                [&len[..], PRIMARY.as_bytes(), stored.detail()].concat(),
                encode_reference(&key)
            );
            assert_eq!(from_stored(&stored), Some(key));
        }
    }

    #[test]
    fn check_value_depends_on_the_primary_key_only() {
        let plain = check_value(&reference(false, false));
        assert_eq!(plain, check_value(&reference(true, true)));
        assert_eq!(plain.to_string().len(), 10);
        let other =
            AwsKeyRef::new(KeyArn::parse(BACKUP).expect("valid"), None, None).expect("valid");
        assert_ne!(plain, check_value(&other));
    }

    #[test]
    fn context_binds_handle_and_associated_data() {
        let handle = KeyHandle::random().expect("valid");
        let context = encryption_context(&handle, Some(&org()), b"org\0kek").expect("valid");
        let pairs: Vec<_> = context.iter().collect();
        let handle_text = handle.to_string();
        assert_eq!(
            pairs,
            [
                (CONTEXT_ASSOCIATED_DATA, "6f7267006b656b"),
                (CONTEXT_HANDLE, handle_text.as_str()),
                (CONTEXT_ORG, "acme"),
            ]
        );
        assert_eq!(
            encryption_context(&handle, None, b"")
                .expect("valid")
                .iter()
                .count(),
            1
        );
    }

    #[test]
    fn provider_states_have_stable_tokens() {
        assert_eq!(provider_state(&AwsKeyState::Enabled), None);
        assert_eq!(provider_state(&AwsKeyState::Other("Creating".into())), None);
        assert_eq!(
            provider_state(&AwsKeyState::PendingDeletion).map(ProviderState::token),
            Some("pending-deletion")
        );
        assert_eq!(
            provider_state(&AwsKeyState::Disabled).map(ProviderState::token),
            Some("disabled")
        );
    }
}
