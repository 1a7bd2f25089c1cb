//! Errors of the custody layer. The daemon maps each variant to one gRPC status
//! code in exactly one place; the messages here are written for the admin who
//! reads them and never contain secret bytes.

use std::io;

use crate::KeyHandle;

/// Why a custody operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CustodyError {
    /// The uploaded key could not be imported.
    #[error(transparent)]
    Import(#[from] ImportError),
    /// A request field is malformed (a handle, a ciphertext).
    #[error(transparent)]
    Input(#[from] InputError),
    /// AES-GCM authentication failed.
    #[error(
        "ciphertext does not authenticate: the associated data differs from the one it was \
         wrapped with, or the ciphertext was altered"
    )]
    Authentication,
    /// No key with this handle was ever stored here.
    #[error("no key with handle {0}")]
    UnknownKey(KeyHandle),
    /// The key existed and was destroyed.
    #[error("key {0} has been destroyed")]
    DestroyedKey(KeyHandle),
    /// The caller asked to store a key under a handle that is, or once was, in use.
    #[error(
        "key handle {handle} {}",
        if *destroyed {
            "was used by a destroyed key and is never reused"
        } else {
            "is already in use"
        }
    )]
    HandleInUse {
        /// The handle asked for.
        handle: KeyHandle,
        /// Whether it names a destroyed key rather than a live one.
        destroyed: bool,
    },
    /// A destroyed key's handle was asked to take back material other than
    /// the key it held: a destroyed handle comes back only with its own key.
    #[error(
        "key handle {0} belonged to a destroyed key whose material differs from the key given: \
         only the original key can be recovered under it"
    )]
    NotTheDestroyedKey(KeyHandle),
    /// The key was destroyed without a fingerprint of its material being kept,
    /// so no key can be proven to be it.
    #[error(
        "key {0} was destroyed before fingerprints of destroyed keys were kept: no key can be \
         proven to be it, so it cannot be recovered"
    )]
    Unrecoverable(KeyHandle),
    /// Reading or writing the keystore failed.
    #[error("keystore {action} failed for {path}")]
    Storage {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A keystore file failed to decrypt under the root key or is malformed.
    #[error("keystore file {path} is corrupt or sealed under another root key")]
    Corrupt {
        /// The file.
        path: String,
    },
    /// The root key is not the one the keystore was created with.
    #[error(
        "the root key does not open the keystore in {dir}: it was created with a different root key"
    )]
    RootKeyMismatch {
        /// The keystore directory.
        dir: String,
    },
    /// The backend itself could not be reached (an HSM, a cloud KMS).
    #[error("key backend unavailable: {0}")]
    Unavailable(String),
    /// The handle names a reference to a key held outside this backend (in
    /// AWS KMS): only the backend of that key wraps and unwraps with it.
    #[error("key {0} is held outside this keystore: its own backend wraps and unwraps with it")]
    ExternalKey(KeyHandle),
    /// The backend does not hold this kind of key.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The backend could do this, but the token or device it runs on cannot
    /// (a mechanism or parameter it lacks); the message names the limit.
    #[error("{0}")]
    DeviceCannot(&'static str),
    /// A cryptographic primitive failed where it cannot fail on valid input.
    #[error("internal cryptographic failure: {0}")]
    Crypto(&'static str),
}

/// Why an uploaded (RSA-OAEP-wrapped) key was refused. Nothing is stored for any of
/// these.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Zero bytes.
    #[error("wrapped key is empty")]
    Empty,
    /// Not the length of an RSA ciphertext under the import key.
    #[error(
        "wrapped key is {actual} bytes, but an RSA-{bits} OAEP ciphertext is exactly {expected} \
         bytes: encrypt under this service's current import public key"
    )]
    CiphertextLength {
        /// Bytes received.
        actual: usize,
        /// The modulus length in bytes.
        expected: usize,
        /// The modulus length in bits.
        bits: usize,
    },
    /// The caller named an import key that is not this daemon's.
    #[error(
        "wrapped key was made for import key {given}, but this service's import key is {current}: \
         download the current public key and wrap again"
    )]
    ImportKeyMismatch {
        /// The key id the caller sent.
        given: String,
        /// This daemon's key id.
        current: String,
    },
    /// A valid OAEP ciphertext, but with SHA-1 instead of SHA-256.
    #[error(
        "wrapped key uses RSA-OAEP with SHA-1; use SHA-256 with MGF1-SHA-256 (openssl pkeyutl \
         -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256)"
    )]
    OaepSha1,
    /// Not an RSA-OAEP SHA-256 ciphertext under the import key.
    #[error(
        "wrapped key is not an RSA-OAEP (SHA-256, MGF1-SHA-256) ciphertext for import key \
         {key_id}: it was encrypted under another public key, with other padding parameters, \
         or is corrupt"
    )]
    Undecryptable {
        /// This daemon's import key id.
        key_id: String,
    },
    /// Decrypted fine, but the key inside is not 32 bytes.
    #[error(
        "unwrapped key is {actual} bytes; a customer master key must be exactly 32 bytes (AES-256)"
    )]
    KeyLength {
        /// Bytes found inside.
        actual: usize,
    },
}

/// A malformed request field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    /// A key handle that is not 32 hex characters.
    #[error("key handle {0:?} is malformed: expected 32 lower-case hexadecimal characters")]
    KeyHandle(String),
    /// An empty wrap ciphertext.
    #[error("ciphertext is empty")]
    EmptyCiphertext,
    /// A wrap ciphertext of an unknown format version.
    #[error("ciphertext has format version {0}, but only versions 1 and 2 are supported")]
    CiphertextVersion(u8),
    /// Shorter than the fixed header and tag.
    #[error("ciphertext is truncated: {actual} bytes, at least {minimum} expected")]
    CiphertextTruncated {
        /// Bytes received.
        actual: usize,
        /// The shortest valid ciphertext.
        minimum: usize,
    },
    /// Nothing to wrap.
    #[error("plaintext is empty")]
    EmptyPlaintext,
}

impl CustodyError {
    /// A storage error, with the path it happened on.
    pub(crate) fn storage(action: &'static str, path: &std::path::Path, source: io::Error) -> Self {
        Self::Storage {
            action,
            path: path.display().to_string(),
            source,
        }
    }
}
