//! The daemon's one translation from errors to gRPC status codes.

use cmk_hsm_custody::CustodyError;
use tonic::{Code, Status};
use tracing::error;

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
            CustodyError::HandleInUse { .. } => Code::AlreadyExists,
            CustodyError::Unavailable(_) => Code::Unavailable,
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
