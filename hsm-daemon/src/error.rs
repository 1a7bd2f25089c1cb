//! The daemon's one translation from errors to gRPC status codes.

use cmk_hsm_custody::{CustodyError, aws_kms::AwsError};
use tonic::{Code, Status, metadata::MetadataMap};
use tracing::error;

/// The response metadata that names the state of a key its owner disabled at
/// its provider (see `hsm.proto`).
pub const PROVIDER_KEY_STATE: &str = "cmk-provider-key-state";

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The custody backend refused or failed.
    #[error(transparent)]
    Custody(#[from] CustodyError),
    /// A request field is missing or out of bounds.
    #[error("{0}")]
    InvalidArgument(String),
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Self {
        let custody = match err {
            ServiceError::InvalidArgument(message) => return Status::invalid_argument(message),
            ServiceError::Custody(custody) => custody,
        };
        let code = match &custody {
            CustodyError::Import(_) | CustodyError::Input(_) | CustodyError::Authentication => {
                Code::InvalidArgument
            }
            CustodyError::UnknownKey(_) | CustodyError::DestroyedKey(_) => Code::NotFound,
            CustodyError::HandleInUse { .. } | CustodyError::NotTheDestroyedKey(_) => {
                Code::AlreadyExists
            }
            CustodyError::Unrecoverable(_) => Code::FailedPrecondition,
            CustodyError::Unavailable(_) => Code::Unavailable,
            CustodyError::Arn(_) => Code::InvalidArgument,
            CustodyError::Aws(aws) => match aws {
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
                    error!(error = %chain(&custody), "AWS KMS call failed");
                    Code::Internal
                }
            },
            CustodyError::ProviderKeyState { state, .. } => {
                let mut metadata = MetadataMap::new();
                // Tokens are fixed lower-case ASCII words.
                metadata.insert(
                    PROVIDER_KEY_STATE,
                    tonic::metadata::MetadataValue::from_static(state.token()),
                );
                return Status::with_metadata(
                    Code::FailedPrecondition,
                    custody.to_string(),
                    metadata,
                );
            }
            CustodyError::Unsupported(_) => Code::Unimplemented,
            CustodyError::DeviceCannot(_) => Code::FailedPrecondition,
            CustodyError::Storage { .. }
            | CustodyError::Corrupt { .. }
            | CustodyError::RootKeyMismatch { .. }
            | CustodyError::Crypto(_) => {
                // The caller learns only that it failed; the operator gets the chain.
                error!(error = %chain(&custody), "internal error");
                return Status::internal("internal error in the HSM daemon; see its log");
            }
        };
        Status::new(code, custody.to_string())
    }
}

pub use cmk_runtime::error_chain as chain;
