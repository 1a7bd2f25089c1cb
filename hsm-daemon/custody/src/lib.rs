//! Custody of customer master keys (CMKs): the [`Custody`] trait that every backend
//! of the HSM daemon implements, the types it speaks in, and the software keystore.
//!
//! A CMK is 32 bytes (AES-256). It enters a backend once — RSA-OAEP-wrapped under
//! the daemon's import key, or generated inside — and never leaves it: the trait
//! has no method that returns CMK bytes. What leaves is a [`KeyHandle`] (an opaque
//! reference), a [`KeyCheckValue`] (a non-secret fingerprint), and ciphertexts.
//!
//! Keys that stay in AWS KMS are the `cmk-hsm-aws-kms` backend's; the software
//! keystore keeps sealed references to them beside its own CMKs
//! ([`ReferenceStore`]), so that one handle namespace covers both.
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
mod software;

use async_trait::async_trait;
use cmk_secret::SecretBytes;

pub use error::{CustodyError, ImportError, InputError};
pub use handle::{KeyCheckValue, KeyHandle};
pub use import_key::{IMPORT_ALGORITHM, ImportKey, ImportKeyBits, ImportPublicKey};
pub use reference::{KeyReference, ReferenceStore};
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

/// A place where CMKs are kept: the software keystore, a PKCS#11 token.
/// Implementations never return CMK bytes and leave nothing changed when a call
/// fails.
#[async_trait]
pub trait Custody: Send + Sync + 'static {
    /// The RSA public key customers wrap their CMK under.
    fn import_public_key(&self) -> &ImportPublicKey;

    /// Takes an RSA-OAEP (SHA-256, MGF1-SHA-256) ciphertext of a 32-byte CMK into
    /// custody under `handle`. Once this returns `Ok`, the key survives a crash of
    /// the process.
    ///
    /// The caller chooses the handle so that it can record it before the call and
    /// find what was stored after a crash. A handle is never reused: one that names
    /// a live or a destroyed key is refused with [`CustodyError::HandleInUse`], even
    /// when two calls race for it.
    async fn import(&self, handle: &KeyHandle, wrapped_key: &[u8])
    -> Result<KeyInfo, CustodyError>;

    /// Brings a destroyed key back under its own `handle`, from an RSA-OAEP
    /// ciphertext of its original 32 bytes (as for [`Custody::import`]), so that
    /// everything it wrapped opens again. Durable once this returns `Ok`.
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
        wrapped_key: &[u8],
    ) -> Result<KeyInfo, CustodyError>;

    /// Generates a CMK inside the backend under `handle`, durable once this returns
    /// `Ok`. The handle is refused as in [`Custody::import`].
    async fn generate(&self, handle: &KeyHandle) -> Result<KeyInfo, CustodyError>;

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

    /// Destroys the CMK irreversibly (for an AWS key reference: forgets it,
    /// leaving the key in AWS as it is). Destroying it again reports
    /// [`Destroyed::Already`]; a handle this backend never issued is
    /// [`CustodyError::UnknownKey`].
    async fn destroy(&self, handle: &KeyHandle) -> Result<Destroyed, CustodyError>;

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
