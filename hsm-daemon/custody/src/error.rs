//! Errors of the custody layer. The daemon maps each variant to one gRPC status
//! code in exactly one place; the messages here are written for the admin who
//! reads them and never contain secret bytes.

use std::{error::Error as StdError, fmt, io};

use crate::KeyHandle;

/// A boxed error of a backend's own, kept whole for the log's error chain.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

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
    /// A key stored before keys were bound, asked for its scope by a call
    /// that names no org to bind it to.
    #[error(
        "key {0} was stored before keys were bound to an org and is not bound yet; \
         a call naming its org binds it"
    )]
    Unbound(KeyHandle),
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
    /// The backend itself could not be reached (an HSM).
    #[error("key backend unavailable: {0}")]
    Unavailable(String),
    /// The service that holds the key outside this process (a cloud KMS)
    /// refused or failed; what that means for the caller is its
    /// [`ProviderError::kind`], the words are the provider's own.
    #[error(transparent)]
    Provider(ProviderError),
    /// The handle names a key that another backend sharing this one's handle
    /// namespace holds (the software keystore and AWS KMS share one): only
    /// that backend wraps and unwraps with it.
    #[error("key {0} is held by another backend: only that one wraps and unwraps with it")]
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
    /// An organisation id that is not 1 to 64 letters, digits, '.', '_' or '-'.
    #[error("org {0:?} is malformed: expected 1 to 64 letters, digits, '.', '_' or '-'")]
    Org(String),
}

/// A refusal or failure of the service that holds a key outside this process
/// (AWS KMS), in the one form the daemon maps to a status: a generic
/// [`ProviderErrorKind`], and the provider backend's own error for the words
/// and the chain. It displays as that error and has its sources.
#[derive(Debug)]
pub struct ProviderError {
    kind: ProviderErrorKind,
    error: BoxError,
}

impl ProviderError {
    /// `error`, of the provider backend's own type, classified as `kind`.
    pub fn new(kind: ProviderErrorKind, error: impl Into<BoxError>) -> Self {
        Self {
            kind,
            error: error.into(),
        }
    }

    /// What the failure means for the caller.
    pub fn kind(&self) -> ProviderErrorKind {
        self.kind
    }

    /// The provider backend's own error, when it is an `E`.
    pub fn downcast_ref<E: StdError + 'static>(&self) -> Option<&E> {
        self.error.downcast_ref()
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl StdError for ProviderError {
    // Transparent: the provider's error is this one, so the chain continues
    // with its sources rather than repeating it.
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.error.source()
    }
}

/// What a provider's refusal or failure means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderErrorKind {
    /// The provider could not be reached in time or failed on its side
    /// (every replica tried); a later attempt may succeed.
    Unavailable,
    /// The provider refused the ciphertext: made under another key or with
    /// other associated data, or altered. The provider's form of
    /// [`CustodyError::Authentication`].
    Authentication,
    /// A request the provider cannot take as it is (a malformed name, too
    /// long a plaintext).
    InvalidInput,
    /// The provider refuses this service the key: access denied, no
    /// credentials, a key that is not usable for this, or one gone or
    /// disabled as the provider answered a call.
    Refused,
    /// The key's owner made it unusable at the provider, in this state.
    KeyState(ProviderState),
    /// Any other failure of a provider call; its words are no secret.
    Other,
    /// A fault of this service's, not the provider's (a stored reference it
    /// cannot read): the caller learns only that it failed.
    Internal,
}

/// Why a key held by a provider cannot be used, as the provider reports its
/// state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderState {
    /// Disabled by its owner.
    Disabled,
    /// Scheduled for deletion.
    PendingDeletion,
    /// Its imported key material is missing or expired.
    PendingImport,
    /// The provider's store of it is disconnected.
    Unavailable,
    /// Deleted, or never where the reference says.
    NotFound,
}

impl ProviderState {
    /// A stable lower-case token naming the state. The control plane is
    /// told the state as `cmk.hsm.v1.ProviderKeyState` instead, which the
    /// daemon's status mapping chooses.
    pub fn token(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::PendingDeletion => "pending-deletion",
            Self::PendingImport => "pending-import",
            Self::Unavailable => "unavailable",
            Self::NotFound => "not-found",
        }
    }
}

impl fmt::Display for ProviderState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Disabled => "disabled",
            Self::PendingDeletion => "pending deletion",
            Self::PendingImport => "pending import",
            Self::Unavailable => "unavailable",
            Self::NotFound => "not found",
        })
    }
}

impl CustodyError {
    /// Whether this says a ciphertext does not authenticate, in custody's
    /// words ([`CustodyError::Authentication`]) or a provider's.
    pub fn is_authentication(&self) -> bool {
        match self {
            Self::Authentication => true,
            Self::Provider(provider) => provider.kind() == ProviderErrorKind::Authentication,
            _ => false,
        }
    }

    /// A storage error, with the path it happened on.
    pub(crate) fn storage(action: &'static str, path: &std::path::Path, source: io::Error) -> Self {
        Self::Storage {
            action,
            path: path.display().to_string(),
            source,
        }
    }
}
