//! The daemon's one translation from errors to gRPC status codes: [`to_status`].

use cmk_hsm_custody::{CustodyError, ProviderError, ProviderErrorKind, ProviderState};
use cmk_proto::{hsm::v1 as pb, status_details::provider_key_unusable};
use tonic::{Code, Status};
use tracing::error;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A custody backend (the keystore, a PKCS#11 token, AWS KMS) refused or
    /// failed.
    #[error(transparent)]
    Custody(#[from] CustodyError),
    /// A request field is missing or out of bounds.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller is not on the allow-list.
    #[error("{0}")]
    NotAllowed(String),
    /// The call names another org than the one the key serves.
    #[error("key {handle} does not serve org {org}")]
    OtherOrg {
        /// The key.
        handle: cmk_hsm_custody::KeyHandle,
        /// The org the call named.
        org: cmk_hsm_custody::OrgName,
    },
    /// A custody backend answered a batch with fewer results than items.
    #[error("the backend returned too few batch results")]
    BatchResults,
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Self {
        to_status(err)
    }
}

/// The status a failed request is answered with. Internal failures are logged
/// with their whole chain and answered with a generic message.
pub fn to_status(err: ServiceError) -> Status {
    match err {
        ServiceError::InvalidArgument(message) => Status::invalid_argument(message),
        ServiceError::NotAllowed(message) => Status::permission_denied(message),
        err @ ServiceError::OtherOrg { .. } => Status::permission_denied(err.to_string()),
        ServiceError::Custody(custody) => custody_status(custody),
        err @ ServiceError::BatchResults => internal(&err),
    }
}

fn custody_status(err: CustodyError) -> Status {
    let code = match &err {
        CustodyError::Import(_) | CustodyError::Input(_) | CustodyError::Authentication => {
            Code::InvalidArgument
        }
        CustodyError::UnknownKey(_) | CustodyError::DestroyedKey(_) => Code::NotFound,
        CustodyError::HandleInUse { .. } | CustodyError::NotTheDestroyedKey(_) => {
            Code::AlreadyExists
        }
        CustodyError::Unrecoverable(_) | CustodyError::Unbound(_) => Code::FailedPrecondition,
        CustodyError::Unavailable(_) => Code::Unavailable,
        CustodyError::Unsupported(_) => Code::Unimplemented,
        CustodyError::DeviceCannot(_) => Code::FailedPrecondition,
        CustodyError::Provider(provider) => return provider_status(provider),
        // The daemon sends every handle to the backend that holds it, so
        // reaching another with one is a bug of the daemon's, not the caller's.
        CustodyError::ExternalKey(_)
        | CustodyError::Storage { .. }
        | CustodyError::Corrupt { .. }
        | CustodyError::RootKeyMismatch { .. }
        | CustodyError::Crypto(_) => return internal(&err),
    };
    Status::new(code, err.to_string())
}

/// The status of a key provider's (AWS KMS's) refusal or failure, in its own
/// words: they are no secret.
fn provider_status(err: &ProviderError) -> Status {
    let code = match err.kind() {
        ProviderErrorKind::Unavailable => Code::Unavailable,
        ProviderErrorKind::Authentication | ProviderErrorKind::InvalidInput => {
            Code::InvalidArgument
        }
        ProviderErrorKind::Refused => Code::FailedPrecondition,
        ProviderErrorKind::KeyState(state) => {
            let code = Code::FailedPrecondition;
            let message = err.to_string();
            let details = provider_key_unusable(code, &message, wire_state(state));
            return Status::with_details(code, message, details);
        }
        // The caller gets the provider's words, and the operator the whole
        // chain.
        ProviderErrorKind::Other => {
            error!(error = %chain(err), "key provider call failed");
            Code::Internal
        }
        ProviderErrorKind::Internal => return internal(err),
    };
    Status::new(code, err.to_string())
}

/// The caller learns only that it failed; the operator gets the chain.
fn internal(err: &dyn std::error::Error) -> Status {
    error!(error = %chain(err), "internal error");
    Status::internal("internal error in the HSM daemon; see its log")
}

/// The wire form of a provider's key state.
fn wire_state(state: ProviderState) -> pb::ProviderKeyState {
    match state {
        ProviderState::Disabled => pb::ProviderKeyState::Disabled,
        ProviderState::PendingDeletion => pb::ProviderKeyState::PendingDeletion,
        ProviderState::PendingImport => pb::ProviderKeyState::PendingImport,
        ProviderState::Unavailable => pb::ProviderKeyState::Unavailable,
        ProviderState::NotFound => pb::ProviderKeyState::NotFound,
    }
}

pub use cmk_runtime::error_chain as chain;

#[cfg(test)]
mod tests {
    use cmk_hsm_aws_kms::{
        AwsDetail, AwsError, AwsKmsError, ContextError, KeyArn, WrappedByAws, WrappedError,
    };
    use cmk_hsm_custody::KeyHandle;
    use cmk_proto::status_details::provider_key_state;

    use super::*;

    fn arn() -> KeyArn {
        KeyArn::parse("arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab")
            .expect("valid")
    }

    fn detail() -> AwsDetail {
        AwsDetail {
            code: "SomeException".into(),
            message: "AWS's words".into(),
        }
    }

    fn wrapped_error() -> WrappedError {
        WrappedByAws::from_bytes(&[]).expect_err("empty")
    }

    #[test]
    fn a_provider_refusal_carries_its_state_in_the_status_details() {
        for (state, wire) in [
            (ProviderState::Disabled, pb::ProviderKeyState::Disabled),
            (
                ProviderState::PendingDeletion,
                pb::ProviderKeyState::PendingDeletion,
            ),
            (
                ProviderState::PendingImport,
                pb::ProviderKeyState::PendingImport,
            ),
            (
                ProviderState::Unavailable,
                pb::ProviderKeyState::Unavailable,
            ),
            (ProviderState::NotFound, pb::ProviderKeyState::NotFound),
        ] {
            let status = to_status(
                CustodyError::from(AwsKmsError::ProviderKeyState { key: arn(), state }).into(),
            );
            assert_eq!(status.code(), Code::FailedPrecondition);
            assert!(status.message().contains(&state.to_string()), "{status:?}");
            assert_eq!(provider_key_state(&status), Some(wire));
        }
        let other = to_status(CustodyError::Unrecoverable(KeyHandle::from_bytes([0; 16])).into());
        assert_eq!(other.code(), Code::FailedPrecondition);
        assert_eq!(provider_key_state(&other), None);
    }

    /// Every error of the AWS KMS backend reaches the caller, through
    /// custody's generic form, with the code it had when the daemon mapped
    /// the backend's own error, and in the backend's own words (or the
    /// generic internal message).
    #[test]
    fn aws_errors_keep_their_codes_and_words() {
        let internal = "internal error in the HSM daemon; see its log";
        let unavailable = || AwsError::Unavailable {
            key: arn(),
            detail: detail(),
            source: None,
        };
        let cases: Vec<(AwsKmsError, Code, bool)> = vec![
            (
                CustodyError::UnknownKey(KeyHandle::from_bytes([1; 16])).into(),
                Code::NotFound,
                true,
            ),
            (
                KeyArn::parse("alias/x").expect_err("an alias").into(),
                Code::InvalidArgument,
                true,
            ),
            (wrapped_error().into(), Code::InvalidArgument, true),
            (
                AwsKmsError::UnreadableReference(KeyHandle::from_bytes([2; 16])),
                Code::Internal,
                false,
            ),
            (unavailable().into(), Code::Unavailable, true),
            (
                AwsError::Failover {
                    primary: Box::new(unavailable()),
                    backup: Box::new(unavailable()),
                }
                .into(),
                Code::Unavailable,
                true,
            ),
            (
                AwsError::InvalidCiphertext {
                    key: arn(),
                    detail: detail(),
                }
                .into(),
                Code::InvalidArgument,
                true,
            ),
            (
                AwsError::PlaintextSize(5000).into(),
                Code::InvalidArgument,
                true,
            ),
            (
                AwsError::Context(ContextError::EmptyKey).into(),
                Code::InvalidArgument,
                true,
            ),
            (
                AwsError::AccessDenied {
                    key: arn(),
                    detail: detail(),
                }
                .into(),
                Code::FailedPrecondition,
                true,
            ),
            (
                AwsError::KeyDisabled {
                    key: arn(),
                    detail: detail(),
                }
                .into(),
                Code::FailedPrecondition,
                true,
            ),
            (
                AwsError::NotFound {
                    key: arn(),
                    detail: detail(),
                }
                .into(),
                Code::FailedPrecondition,
                true,
            ),
            (
                AwsError::Unsuitable {
                    key: arn(),
                    reason: "not symmetric".into(),
                }
                .into(),
                Code::FailedPrecondition,
                true,
            ),
            (
                AwsError::Credentials {
                    key: arn(),
                    detail: detail(),
                }
                .into(),
                Code::FailedPrecondition,
                true,
            ),
            (
                AwsError::Other {
                    operation: "Decrypt",
                    key: arn(),
                    detail: detail(),
                    source: None,
                }
                .into(),
                Code::Internal,
                true,
            ),
            (
                AwsKmsError::ProviderKeyState {
                    key: arn(),
                    state: ProviderState::Disabled,
                },
                Code::FailedPrecondition,
                true,
            ),
        ];
        for (err, code, own_words) in cases {
            let words = err.to_string();
            let status = to_status(CustodyError::from(err).into());
            assert_eq!(status.code(), code, "{words}");
            let message = if own_words { words.as_str() } else { internal };
            assert_eq!(status.message(), message);
        }
    }
}
