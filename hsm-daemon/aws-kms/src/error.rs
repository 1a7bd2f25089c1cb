//! What went wrong in a call to AWS, sorted by what the caller must do about it,
//! and the one function that sorts an SDK error.
//!
//! The sorting decides failover: only [`AwsError::Unavailable`] means "the key's
//! region could not answer", and only it sends a decryption to the backup key.
//! Everything else is an answer — wrong ciphertext or context, access denied, key
//! disabled or gone — and trying another region would at best hide it.

use std::error::Error as StdError;
use std::fmt;

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sts::operation::assume_role::AssumeRoleError;

use cmk_hsm_custody::{CustodyError, KeyHandle, ProviderError, ProviderErrorKind, ProviderState};

use crate::arn::{ArnError, KeyArn};
use crate::client::AssumedRole;
use crate::context::ContextError;
use crate::keys::remedy;
use crate::wrapped::WrappedError;

/// A boxed underlying error, kept for the log's error chain.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What AWS said: its error code and message, as returned. Neither ever holds a
/// credential (requests are signed, not echoed) nor a plaintext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsDetail {
    /// AWS's error code (`NotFoundException`, `AccessDeniedException`, …), or a
    /// short name of a local failure (`timeout`, `connection`).
    pub code: String,
    /// AWS's message; may be empty (the emulator often sends none).
    pub message: String,
}

impl AwsDetail {
    fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for AwsDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{}: {}", self.code, self.message)
        }
    }
}

/// Why the AWS KMS backend ([`crate::AwsKeys`]) refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum AwsKmsError {
    /// The keystore that keeps the references refused or failed (an unknown
    /// or destroyed handle, a handle in use, storage).
    #[error(transparent)]
    Keystore(#[from] cmk_hsm_custody::CustodyError),
    /// A key reference names a malformed ARN.
    #[error(transparent)]
    Arn(#[from] ArnError),
    /// AWS KMS refused or failed a call on a referenced key.
    #[error(transparent)]
    Aws(#[from] AwsError),
    /// A version 2 ciphertext whose KMS part is malformed.
    #[error(transparent)]
    Ciphertext(#[from] WrappedError),
    /// The owner of a key in AWS KMS disabled it or scheduled its deletion
    /// (outside this service): nothing is wrapped or unwrapped with it until it
    /// is enabled again.
    #[error(
        "AWS KMS key {key} is {state} in AWS KMS, so it cannot be used: {}",
        remedy(*state)
    )]
    ProviderKeyState {
        /// The primary key of the reference.
        key: KeyArn,
        /// What DescribeKey reported.
        state: ProviderState,
    },
    /// The keystore holds a reference under the handle that this version
    /// cannot read, although it authenticated under the root key.
    #[error("the keystore's reference {0} is not one this version of the daemon reads")]
    UnreadableReference(KeyHandle),
}

/// The one translation into custody's words: the keystore's own refusals as
/// they are, everything of AWS's as a [`ProviderError`] that keeps this error
/// and says what it means for the caller.
impl From<AwsKmsError> for CustodyError {
    fn from(err: AwsKmsError) -> Self {
        let kind = match err {
            AwsKmsError::Keystore(custody) => return custody,
            AwsKmsError::Arn(_) => ProviderErrorKind::InvalidInput,
            // A KMS part that does not even parse was altered, as is one KMS
            // refuses.
            AwsKmsError::Ciphertext(_) => ProviderErrorKind::Authentication,
            AwsKmsError::ProviderKeyState { state, .. } => ProviderErrorKind::KeyState(state),
            AwsKmsError::UnreadableReference(_) => ProviderErrorKind::Internal,
            AwsKmsError::Aws(ref aws) => match aws {
                AwsError::Unavailable { .. } | AwsError::Failover { .. } => {
                    ProviderErrorKind::Unavailable
                }
                AwsError::InvalidCiphertext { .. } => ProviderErrorKind::Authentication,
                AwsError::PlaintextSize(_) | AwsError::Context(_) => {
                    ProviderErrorKind::InvalidInput
                }
                AwsError::AccessDenied { .. }
                | AwsError::KeyDisabled { .. }
                | AwsError::NotFound { .. }
                | AwsError::Unsuitable { .. }
                | AwsError::Credentials { .. } => ProviderErrorKind::Refused,
                AwsError::Other { .. } => ProviderErrorKind::Other,
            },
        };
        CustodyError::Provider(ProviderError::new(kind, err))
    }
}

/// Why a call through [`crate::AwsKms`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    /// The key's region did not answer in time, answered with a server-side
    /// failure, throttled past the retries, or reported the key temporarily
    /// unavailable. The only error a decryption fails over on.
    #[error("AWS KMS in {} is unavailable for key {key}: {detail}", key.region())]
    Unavailable {
        /// The key whose region failed.
        key: KeyArn,
        /// AWS's code and message, or the transport failure.
        detail: AwsDetail,
        /// The transport error, when there was no answer.
        #[source]
        source: Option<BoxError>,
    },
    /// AWS refused this service's identity (or the assumed role) access to the
    /// key, or refused to let it assume the role.
    #[error("AWS denied access to key {key}: {detail}")]
    AccessDenied {
        /// The key.
        key: KeyArn,
        /// AWS's code and message.
        detail: AwsDetail,
    },
    /// The key exists but cannot be used now: disabled, pending deletion, pending
    /// import.
    #[error("AWS KMS key {key} is not enabled: {detail}")]
    KeyDisabled {
        /// The key.
        key: KeyArn,
        /// AWS's code and message.
        detail: AwsDetail,
    },
    /// No such key (deleted, or never in this account and region).
    #[error("AWS KMS key {key} does not exist: {detail}")]
    NotFound {
        /// The key.
        key: KeyArn,
        /// AWS's code and message.
        detail: AwsDetail,
    },
    /// KMS refused to decrypt: the ciphertext was made under another key or with
    /// another encryption context, or was altered.
    #[error(
        "AWS KMS key {key} refused the ciphertext: it was made under another key or with another \
         encryption context, or was altered ({detail})"
    )]
    InvalidCiphertext {
        /// The key.
        key: KeyArn,
        /// AWS's code and message.
        detail: AwsDetail,
    },
    /// The key is not one this service can use: not a symmetric
    /// encrypt/decrypt key, or a test round trip came back different.
    #[error("AWS KMS key {key} cannot be used: {reason}")]
    Unsuitable {
        /// The key.
        key: KeyArn,
        /// What is wrong with it.
        reason: String,
    },
    /// No credentials could be found for this service's own identity.
    #[error("no AWS credentials for key {key}: {detail}")]
    Credentials {
        /// The key the call was for.
        key: KeyArn,
        /// What the credential providers reported.
        detail: AwsDetail,
    },
    /// The primary key's region was unavailable and the backup failed too.
    #[error("{primary}; the backup failed too: {backup}")]
    Failover {
        /// Why the primary failed ([`AwsError::Unavailable`]).
        primary: Box<AwsError>,
        /// Why the backup failed.
        backup: Box<AwsError>,
    },
    /// KMS encrypts 1 to 4096 bytes.
    #[error("plaintext is {0} bytes; AWS KMS encrypts 1 to 4096 bytes")]
    PlaintextSize(usize),
    /// An invalid encryption context.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// Any other failure of a KMS call.
    #[error("AWS KMS {operation} on key {key} failed: {detail}")]
    Other {
        /// The KMS operation.
        operation: &'static str,
        /// The key.
        key: KeyArn,
        /// AWS's code and message.
        detail: AwsDetail,
        /// The underlying error, when AWS sent no answer.
        #[source]
        source: Option<BoxError>,
    },
}

impl AwsError {
    /// Whether the key's region failed rather than answered: the one case in
    /// which the backup key is tried.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// Where a call went: for the error's wording and classification.
pub(crate) struct Call<'a> {
    pub operation: &'static str,
    pub key: &'a KeyArn,
    pub role: Option<&'a AssumedRole>,
}

/// The one translation of an SDK error into an [`AwsError`].
pub(crate) fn classify<E>(call: &Call<'_>, error: SdkError<E>) -> AwsError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    match error {
        SdkError::ServiceError(context) => {
            let status = context.raw().status().as_u16();
            let detail = AwsDetail::new(
                context.err().code().unwrap_or("UnknownError"),
                context.err().message().unwrap_or_default(),
            );
            by_code(call, detail, status)
        }
        SdkError::TimeoutError(_) => unavailable(call, "timeout", "no answer in time", error),
        SdkError::ResponseError(_) => {
            // An answer that is not KMS's protocol: a proxy's error page, a cut
            // connection. Another region may well answer properly.
            unavailable(call, "invalid-response", "unreadable response", error)
        }
        SdkError::DispatchFailure(ref failure) if failure.is_io() || failure.is_timeout() => {
            unavailable(call, "connection", "could not reach the endpoint", error)
        }
        SdkError::DispatchFailure(_) => match credentials_failure(call, &error) {
            // The chain of the STS or provider failure, for the log.
            Some(AwsError::Unavailable {
                key,
                detail,
                source: None,
            }) => AwsError::Unavailable {
                key,
                detail,
                source: error.into_source().ok(),
            },
            Some(classified) => classified,
            None => unavailable(call, "dispatch", "request could not be sent", error),
        },
        SdkError::ConstructionFailure(_) => AwsError::Other {
            operation: call.operation,
            key: call.key.clone(),
            detail: AwsDetail::new("construction", "the request could not be built"),
            source: error.into_source().ok(),
        },
        // SdkError is non-exhaustive.
        _ => AwsError::Other {
            operation: call.operation,
            key: call.key.clone(),
            detail: AwsDetail::new("unknown", "unrecognised SDK error"),
            source: error.into_source().ok(),
        },
    }
}

/// Sorts an answer of KMS or STS by its error code.
fn by_code(call: &Call<'_>, detail: AwsDetail, status: u16) -> AwsError {
    let key = call.key.clone();
    match detail.code.as_str() {
        "NotFoundException" => AwsError::NotFound { key, detail },
        "DisabledException" | "KMSInvalidStateException" => AwsError::KeyDisabled { key, detail },
        "InvalidCiphertextException" | "IncorrectKeyException" => {
            AwsError::InvalidCiphertext { key, detail }
        }
        "InvalidKeyUsageException" => AwsError::Unsuitable {
            key,
            reason: detail.to_string(),
        },
        // KMS's own refusals, STS's, and those of the signature check: the same
        // identity would be refused by the backup's account too, and if not,
        // the admin must fix the policy rather than have it hidden.
        "AccessDeniedException"
        | "AccessDenied"
        | "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "InvalidSignatureException"
        | "SignatureDoesNotMatch"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "ExpiredTokenException"
        | "ExpiredToken"
        | "InvalidGrantTokenException" => AwsError::AccessDenied { key, detail },
        // The region's trouble, not the key's: KMS's internal and dependency
        // failures, a key whose backing store is briefly out of reach,
        // throttling that outlasted the retries, and STS not enabled in the
        // key's region (relevant when a role is assumed there).
        "KMSInternalException"
        | "DependencyTimeoutException"
        | "KeyUnavailableException"
        | "ThrottlingException"
        | "Throttling"
        | "TooManyRequestsException"
        | "RequestLimitExceeded"
        | "ServiceUnavailable"
        | "ServiceUnavailableException"
        | "InternalFailure"
        | "InternalError"
        | "RequestTimeout"
        | "RequestTimeoutException"
        | "RegionDisabledException" => unavailable_detail(call, detail, None),
        _ if status >= 500 => unavailable_detail(call, detail, None),
        _ => AwsError::Other {
            operation: call.operation,
            key,
            detail,
            source: None,
        },
    }
}

/// A dispatch failure caused by credentials: the STS AssumeRole call of a role,
/// or the provider chain of this service's own identity.
fn credentials_failure<E>(call: &Call<'_>, error: &SdkError<E>) -> Option<AwsError>
where
    E: StdError + 'static,
{
    let mut cause: Option<&(dyn StdError + 'static)> = error.source();
    let mut credentials = None;
    while let Some(current) = cause {
        if let Some(assume) = current.downcast_ref::<SdkError<AssumeRoleError>>() {
            return Some(assume_role_failure(call, assume));
        }
        if credentials.is_none() {
            credentials = current.downcast_ref::<CredentialsError>();
        }
        cause = current.source();
    }
    let credentials = credentials?;
    let key = call.key.clone();
    Some(match credentials {
        // A provider that hung (IMDS, STS) is as good as an unreachable region.
        CredentialsError::ProviderTimedOut(_) => unavailable_detail(
            call,
            AwsDetail::new("credentials-timeout", "the credentials provider timed out"),
            None,
        ),
        other => AwsError::Credentials {
            key,
            detail: AwsDetail::new("credentials", chain_text(other)),
        },
    })
}

/// STS refused or could not be reached while assuming the role.
fn assume_role_failure(call: &Call<'_>, error: &SdkError<AssumeRoleError>) -> AwsError {
    let role = call
        .role
        .map_or_else(String::new, |role| format!(" of {role}"));
    match error {
        SdkError::ServiceError(context) => {
            let detail = AwsDetail::new(
                context.err().code().unwrap_or("UnknownError"),
                format!(
                    "STS AssumeRole{role}: {}",
                    context.err().message().unwrap_or_default()
                ),
            );
            by_code(call, detail, context.raw().status().as_u16())
        }
        _ => unavailable_detail(
            call,
            AwsDetail::new("sts", format!("STS AssumeRole{role} got no answer")),
            None,
        ),
    }
}

fn unavailable<E>(call: &Call<'_>, code: &str, message: &str, error: SdkError<E>) -> AwsError
where
    E: StdError + Send + Sync + 'static,
{
    unavailable_detail(
        call,
        AwsDetail::new(code, message),
        error.into_source().ok(),
    )
}

fn unavailable_detail(call: &Call<'_>, detail: AwsDetail, source: Option<BoxError>) -> AwsError {
    AwsError::Unavailable {
        key: call.key.clone(),
        detail,
        source,
    }
}

/// An error and its sources on one line. Credential providers name files,
/// profiles and endpoints here, never secrets.
fn chain_text(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(current) = cause {
        text.push_str(": ");
        text.push_str(&current.to_string());
        cause = current.source();
    }
    text.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(code: &str, status: u16) -> AwsError {
        let key = KeyArn::parse(
            "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        )
        .expect("valid");
        let call = Call {
            operation: "Decrypt",
            key: &key,
            role: None,
        };
        by_code(&call, AwsDetail::new(code, "AWS's words"), status)
    }

    #[test]
    fn only_a_failing_region_fails_over() {
        for code in [
            "KMSInternalException",
            "DependencyTimeoutException",
            "KeyUnavailableException",
            "ThrottlingException",
        ] {
            assert!(sorted(code, 400).is_unavailable(), "{code}");
        }
        assert!(sorted("SomethingNew", 503).is_unavailable());
        for code in [
            "InvalidCiphertextException",
            "IncorrectKeyException",
            "AccessDeniedException",
            "DisabledException",
            "KMSInvalidStateException",
            "NotFoundException",
            "SomethingNew",
        ] {
            assert!(!sorted(code, 400).is_unavailable(), "{code}");
        }
    }

    #[test]
    fn answers_are_sorted_by_what_the_caller_must_do() {
        assert!(matches!(
            sorted("NotFoundException", 400),
            AwsError::NotFound { .. }
        ));
        assert!(matches!(
            sorted("DisabledException", 400),
            AwsError::KeyDisabled { .. }
        ));
        assert!(matches!(
            sorted("KMSInvalidStateException", 400),
            AwsError::KeyDisabled { .. }
        ));
        assert!(matches!(
            sorted("IncorrectKeyException", 400),
            AwsError::InvalidCiphertext { .. }
        ));
        assert!(matches!(
            sorted("AccessDenied", 403),
            AwsError::AccessDenied { .. }
        ));
        assert!(matches!(
            sorted("InvalidKeyUsageException", 400),
            AwsError::Unsuitable { .. }
        ));
        assert!(matches!(
            sorted("InvalidArnException", 400),
            AwsError::Other { .. }
        ));
    }

    #[test]
    fn messages_carry_the_code_the_message_and_the_key() {
        let text = sorted("NotFoundException", 400).to_string();
        assert_eq!(
            text,
            "AWS KMS key arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab \
             does not exist: NotFoundException: AWS's words"
        );
        let text = sorted("KMSInternalException", 500).to_string();
        assert!(
            text.starts_with("AWS KMS in eu-west-1 is unavailable"),
            "{text}"
        );
        assert_eq!(
            AwsDetail::new("InvalidCiphertextException", "").to_string(),
            "InvalidCiphertextException"
        );
    }
}
