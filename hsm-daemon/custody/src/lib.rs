//! Custody of customer master keys (CMKs): the traits the HSM daemon's backends
//! implement, the types they speak in, and the software keystore.
//!
//! Two traits, because backends differ in how a key comes in but not in what is
//! done with it once it is there:
//!
//! - [`Custody`]: what every backend does with the keys it holds — wrap, unwrap,
//!   destroy, and their batches. The software keystore, a PKCS#11 token and AWS
//!   KMS (`cmk-hsm-aws-kms`) each implement it.
//! - [`MaterialCustody`]: what only a backend that holds key material does — take
//!   a CMK in (uploaded RSA-OAEP-wrapped under the daemon's import key, or
//!   generated inside) and recover a destroyed one from its original bytes. The
//!   software keystore and a PKCS#11 token. A key in AWS KMS instead enters by
//!   reference, through that backend's own methods.
//!
//! A CMK is 32 bytes (AES-256). It enters a backend once and never leaves it:
//! neither trait has a method that returns CMK bytes. What leaves is a
//! [`KeyHandle`] (an opaque reference), a [`KeyCheckValue`] (a non-secret
//! fingerprint), and ciphertexts.
//!
//! The software keystore keeps sealed references to keys in AWS KMS beside its
//! own CMKs ([`ReferenceStore`]), so that one handle namespace covers both; a
//! failure of the service that holds such a key reaches the daemon in a generic
//! form, [`ProviderError`], classified by [`ProviderErrorKind`].
//!
//! The ciphertext format of `wrap` is defined once, in [`envelope`], and shared by
//! every backend that runs AES-256-GCM itself.

#![forbid(unsafe_code)]

mod atomic;
#[cfg(feature = "contract")]
pub mod contract;
pub mod envelope;
mod error;
mod handle;
mod import_key;
mod kcv;
mod reference;
mod scope;
mod software;

use async_trait::async_trait;
use cmk_secret::SecretBytes;

pub use error::{
    BoxError, CustodyError, ImportError, InputError, ProviderError, ProviderErrorKind,
    ProviderState,
};
pub use handle::{KeyCheckValue, KeyHandle};
pub use import_key::{IMPORT_ALGORITHM, ImportKey, ImportKeyBits, ImportPublicKey};
pub use reference::{KeyReference, ReferenceStore};
pub use scope::{KeyScope, OrgName};
pub use software::{RootKey, SoftwareCustody};

/// Length of a CMK: AES-256.
pub const CMK_LEN: usize = 32;

// Defined here rather than in `handle` so that the one way to make a check
// value outside this crate sits beside the trait that returns it.
impl KeyCheckValue {
    /// The check value of a key this process cannot read (one inside an HSM),
    /// from the AES-CMAC tag the HSM computed of 16 zero bytes under it: its
    /// leftmost [`KeyCheckValue::LEN`] bytes, as [`KeyCheckValue`] defines.
    /// `None` for a tag shorter than that.
    pub fn from_cmac_of_zero_block(tag: &[u8]) -> Option<Self> {
        let mut kcv = [0; KeyCheckValue::LEN];
        kcv.copy_from_slice(tag.get(..KeyCheckValue::LEN)?);
        Some(Self::from_bytes(kcv))
    }
}

/// Fills `buf` from the operating system's CSPRNG (through aws-lc).
pub fn fill_random(buf: &mut [u8]) -> Result<(), CustodyError> {
    aws_lc_rs::rand::fill(buf).map_err(|_| CustodyError::Crypto("random number generator failed"))
}

/// How a CMK came into custody.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyOrigin {
    /// Uploaded by a customer, RSA-OAEP-wrapped under the import key.
    Imported,
    /// Generated inside the daemon.
    Generated,
    /// A reference to a key that stays in AWS KMS.
    AwsKms,
}

/// What a backend says about a CMK it has just taken into custody.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    /// The reference to use in `wrap` and `destroy`: the one the caller chose.
    pub handle: KeyHandle,
    /// Fingerprint of the key bytes.
    pub check_value: KeyCheckValue,
    /// Uploaded or generated.
    pub origin: KeyOrigin,
}

/// A secret recovered by `unwrap`, with the CMK that had protected it.
#[derive(Debug)]
pub struct Unwrapped {
    /// The secret.
    pub plaintext: SecretBytes,
    /// The CMK named in the ciphertext.
    pub handle: KeyHandle,
}

/// Whether `destroy` found the key still present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destroyed {
    /// The key existed and is now gone.
    Now,
    /// An earlier call had already destroyed it.
    Already,
}

/// One item of a batch wrap.
#[derive(Debug)]
pub struct WrapItem {
    /// The CMK to wrap under.
    pub handle: KeyHandle,
    /// The secret to protect.
    pub plaintext: SecretBytes,
    /// Bound to the ciphertext.
    pub associated_data: Vec<u8>,
}

/// One item of a batch unwrap.
#[derive(Debug)]
pub struct UnwrapItem {
    /// A `wrap` ciphertext.
    pub ciphertext: Vec<u8>,
    /// The associated data given to `wrap`.
    pub associated_data: Vec<u8>,
}

/// What every backend does with the keys it holds: the software keystore, a
/// PKCS#11 token, AWS KMS. Implementations never return CMK bytes and leave
/// nothing changed when a call fails.
///
/// How a key comes in differs: see [`MaterialCustody`] for backends that hold
/// its material. Several backends may share one handle namespace (the software
/// keystore and AWS KMS do); asked to use a key that another of them holds,
/// a backend refuses with [`CustodyError::ExternalKey`].
#[async_trait]
pub trait Custody: Send + Sync + 'static {
    /// Encrypts `plaintext` under the CMK `handle`, binding `associated_data`.
    async fn wrap(
        &self,
        handle: &KeyHandle,
        plaintext: &SecretBytes,
        associated_data: &[u8],
    ) -> Result<Vec<u8>, CustodyError>;

    /// Decrypts a `wrap` ciphertext; the CMK is the one named inside it.
    async fn unwrap(
        &self,
        ciphertext: &[u8],
        associated_data: &[u8],
    ) -> Result<Unwrapped, CustodyError>;

    /// Destroys the CMK irreversibly (for a reference to a key held elsewhere:
    /// forgets it, leaving the key where it is). Destroying it again reports
    /// [`Destroyed::Already`]; a handle never issued is
    /// [`CustodyError::UnknownKey`].
    async fn destroy(&self, handle: &KeyHandle) -> Result<Destroyed, CustodyError>;

    /// The scope the key `handle` serves, as bound when it came in: the
    /// caller refuses a call for any organisation it does not admit, before
    /// the key is used. A destroyed or unknown handle is an error as for
    /// [`Custody::wrap`].
    ///
    /// A key stored before keys were bound gets its scope now, durably and
    /// once: a generated one is [`KeyScope::Shared`] (the generic default key
    /// was the only key generated then), any other is bound to `claimant`,
    /// the organisation of the first call that uses it; without a claimant
    /// such a key is [`CustodyError::Unbound`] and stays unbound.
    async fn scope(
        &self,
        handle: &KeyHandle,
        claimant: Option<&OrgName>,
    ) -> Result<KeyScope, CustodyError>;

    /// Wraps many items; each succeeds or fails on its own, results in order.
    async fn wrap_batch(&self, items: Vec<WrapItem>) -> Vec<Result<Vec<u8>, CustodyError>> {
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            results.push(
                self.wrap(&item.handle, &item.plaintext, &item.associated_data)
                    .await,
            );
        }
        results
    }

    /// Unwraps many items; each succeeds or fails on its own, results in order.
    async fn unwrap_batch(&self, items: Vec<UnwrapItem>) -> Vec<Result<Unwrapped, CustodyError>> {
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            results.push(self.unwrap(&item.ciphertext, &item.associated_data).await);
        }
        results
    }
}

/// A backend that holds its keys' material, and so can take a CMK in from its
/// bytes or make one: the software keystore, a PKCS#11 token.
#[async_trait]
pub trait MaterialCustody: Custody {
    /// The RSA public key customers wrap their CMK under.
    fn import_public_key(&self) -> &ImportPublicKey;

    /// The public half of the audit signing key, an ECDSA P-256 key the
    /// backend holds beside its CMKs: the uncompressed point, 65 bytes.
    fn audit_public_key(&self) -> &[u8];

    /// Signs `message` with the audit signing key: ECDSA P-256 over its
    /// SHA-256, as the 64-byte `r ‖ s`. The daemon passes only checkpoint
    /// structures it builds itself; nothing else reaches this key.
    async fn sign_audit(&self, message: &[u8]) -> Result<Vec<u8>, CustodyError>;

    /// Takes an RSA-OAEP (SHA-256, MGF1-SHA-256) ciphertext of a 32-byte CMK into
    /// custody under `handle`. Once this returns `Ok`, the key survives a crash of
    /// the process.
    ///
    /// The caller chooses the handle so that it can record it before the call and
    /// find what was stored after a crash. A handle is never reused: one that names
    /// a live or a destroyed key is refused with [`CustodyError::HandleInUse`], even
    /// when two calls race for it.
    ///
    /// The key serves `scope` from then on ([`Custody::scope`]).
    async fn import(
        &self,
        handle: &KeyHandle,
        scope: &KeyScope,
        wrapped_key: &[u8],
    ) -> Result<KeyInfo, CustodyError>;

    /// Brings a destroyed key back under its own `handle`, from an RSA-OAEP
    /// ciphertext of its original 32 bytes (as for [`MaterialCustody::import`]),
    /// so that everything it wrapped opens again. Durable once this returns `Ok`.
    ///
    /// Destroying a key keeps a full-strength fingerprint of its material (an
    /// HMAC-SHA-256 under a secret of the backend's, never the 40-bit check
    /// value); only material with that fingerprint is admitted, anything else
    /// is [`CustodyError::NotTheDestroyedKey`]. A handle never issued is
    /// [`CustodyError::UnknownKey`]; a live one is accepted again with its own
    /// material (a retry) and refused as in use otherwise.
    async fn recover(
        &self,
        handle: &KeyHandle,
        scope: &KeyScope,
        wrapped_key: &[u8],
    ) -> Result<KeyInfo, CustodyError>;

    /// Generates a CMK inside the backend under `handle`, durable once this returns
    /// `Ok`, serving `scope`. The handle is refused as in
    /// [`MaterialCustody::import`].
    async fn generate(&self, handle: &KeyHandle, scope: &KeyScope)
    -> Result<KeyInfo, CustodyError>;
}
