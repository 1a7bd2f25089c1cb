//! The daemon's one translation from errors to gRPC status codes: [`to_status`].

use cmk_hsm_aws_kms::{AwsError, AwsKmsError, ProviderState};
use cmk_hsm_custody::CustodyError;
use cmk_proto::{hsm::v1 as pb, status_details::provider_key_unusable};
use tonic::{Code, Status};
use tracing::error;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The custody backend refused or failed.
    #[error(transparent)]
    Custody(#[from] CustodyError),
    /// The AWS KMS backend refused or failed.
    #[error(transparent)]
    AwsKms(#[from] AwsKmsError),
    /// A request field is missing or out of bounds.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller is not on the allow-list.
    #[error("{0}")]
    NotAllowed(String),
    /// The custody backend answered a batch with fewer results than items.
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
        ServiceError::Custody(custody) => custody_status(custody),
        ServiceError::AwsKms(aws) => aws_kms_status(aws),
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
        CustodyError::Unrecoverable(_) => Code::FailedPrecondition,
        CustodyError::Unavailable(_) => Code::Unavailable,
        CustodyError::Unsupported(_) => Code::Unimplemented,
        CustodyError::DeviceCannot(_) => Code::FailedPrecondition,
        // The daemon sends every reference to its own backend, so reaching
        // custody with one is a bug of the daemon's, not the caller's.
        CustodyError::ExternalKey(_)
        | CustodyError::Storage { .. }
        | CustodyError::Corrupt { .. }
        | CustodyError::RootKeyMismatch { .. }
        | CustodyError::Crypto(_) => return internal(&err),
    };
    Status::new(code, err.to_string())
}

fn aws_kms_status(err: AwsKmsError) -> Status {
    let code = match err {
        AwsKmsError::Keystore(custody) => return custody_status(custody),
        AwsKmsError::Arn(_) | AwsKmsError::Ciphertext(_) => Code::InvalidArgument,
        AwsKmsError::ProviderKeyState { state, .. } => {
            let code = Code::FailedPrecondition;
            let message = err.to_string();
            let details = provider_key_unusable(code, &message, wire_state(state));
            return Status::with_details(code, message, details);
        }
        AwsKmsError::UnreadableReference(_) => return internal(&err),
        AwsKmsError::Aws(ref aws) => match aws {
            AwsError::Unavailable { .. } | AwsError::Failover { .. } => Code::Unavailable,
            AwsError::InvalidCiphertext { .. }
            | AwsError::PlaintextSize(_)
            | AwsError::Context(_) => Code::InvalidArgument,
            AwsError::AccessDenied { .. }
            | AwsError::KeyDisabled { .. }
            | AwsError::NotFound { .. }
            | AwsError::Unsuitable { .. }
            | AwsError::Credentials { .. } => Code::FailedPrecondition,
            // AWS's own words are no secret: the caller gets them, and the
            // operator the whole chain.
            AwsError::Other { .. } => {
                error!(error = %chain(&err), "AWS KMS call failed");
                Code::Internal
            }
        },
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
    use cmk_hsm_aws_kms::KeyArn;
    use cmk_proto::status_details::provider_key_state;

    use super::*;

    #[test]
    fn a_provider_refusal_carries_its_state_in_the_status_details() {
        let key = KeyArn::parse(
            "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        )
        .expect("valid");
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
                AwsKmsError::ProviderKeyState {
                    key: key.clone(),
                    state,
                }
                .into(),
            );
            assert_eq!(status.code(), Code::FailedPrecondition);
            assert!(status.message().contains(&state.to_string()), "{status:?}");
            assert_eq!(provider_key_state(&status), Some(wire));
        }
        let other = to_status(
            CustodyError::Unrecoverable(cmk_hsm_custody::KeyHandle::from_bytes([0; 16])).into(),
        );
        assert_eq!(other.code(), Code::FailedPrecondition);
        assert_eq!(provider_key_state(&other), None);
    }
}
