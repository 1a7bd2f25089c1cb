//! The control plane's one translation from errors to gRPC status codes.

use cmk_control_plane_domain::{KekId, KeyId, LifecycleError};
use cmk_control_plane_store::StoreError;
use tonic::{Code, Status};
use tracing::error;

use crate::{authz::Denied, envelope::EnvelopeError, hsm::HsmError};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A request field is missing, malformed or out of bounds.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller may not do this.
    #[error(transparent)]
    Denied(#[from] Denied),
    /// The lifecycle refuses the change.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// The HSM daemon refused or could not be reached.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// The metadata store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A wrapped content key or its context is refused.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The org never rotated a key.
    #[error("the organisation has no rotation job: no key was ever rotated away from")]
    NoRotation,
    /// The org has no KEK with this id.
    #[error("the organisation has no KEK {0}")]
    UnknownKek(KekId),
    /// The HSM daemon no longer holds a master key the org's records say it
    /// holds (destroyed, or a keystore restored from an older backup).
    #[error(
        "master key {key} is no longer held by the HSM daemon (it was destroyed there, or the \
         HSM's keystore was restored from an older backup): its KEKs cannot be used until the \
         key's original material is uploaded again, or the keystore restored"
    )]
    KeyMaterialGone {
        /// The org's key whose material is gone.
        key: KeyId,
    },
    /// The call needs a setting the operator has not made.
    #[error("{0}")]
    NotConfigured(&'static str),
    /// A fault inside the control plane or its data: never the caller's
    /// doing, so the caller learns only that it failed.
    #[error(transparent)]
    Internal(#[from] Internal),
}

/// What went wrong inside the control plane, for its log.
#[derive(Debug, thiserror::Error)]
pub enum Internal {
    /// A task the request waited for panicked or was cancelled.
    #[error("a background task failed")]
    TaskFailed(#[source] tokio::task::JoinError),
    /// A change names a key the service has no custody handle for.
    #[error("key {0} changed state, but no custody handle is known for it")]
    NoHandle(KeyId),
    /// A stored KEK names a key that cannot unwrap.
    #[error("KEK {kek} is wrapped by key {key}, which is neither active nor rotating")]
    KekKeyNotUsable {
        /// The KEK.
        kek: KekId,
        /// The key its row names.
        key: KeyId,
    },
    /// The HSM refuses a stored KEK's ciphertext: the row was altered
    /// outside the service.
    #[error("KEK {kek} does not unwrap")]
    KekDoesNotUnwrap {
        /// The KEK.
        kek: KekId,
        /// The HSM daemon's refusal.
        #[source]
        refusal: Status,
    },
    /// A stored KEK's row and ciphertext name different master keys.
    #[error("KEK {kek} is stored as wrapped by key {key}, but its ciphertext names another CMK")]
    KekHandleMismatch {
        /// The KEK.
        kek: KekId,
        /// The key its row names.
        key: KeyId,
    },
}

impl ServiceError {
    /// The status the caller gets: an exhaustive choice of code, and a message
    /// that never carries internal detail (that goes to the log).
    pub fn to_status(&self) -> Status {
        let code = match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::Denied(_) => Code::PermissionDenied,
            Self::Lifecycle(LifecycleError::UnknownKey(_)) => Code::NotFound,
            Self::Lifecycle(
                LifecycleError::AlreadyPresent { .. } | LifecycleError::DuplicateId(_),
            ) => Code::AlreadyExists,
            Self::Lifecycle(
                LifecycleError::InvalidTransition { .. }
                | LifecycleError::PendingExists { .. }
                | LifecycleError::MasterRevoked { .. }
                | LifecycleError::MasterRevokedByProvider { .. }
                | LifecycleError::PendingRevokedByProvider { .. }
                | LifecycleError::KeyRevokedByProvider { .. }
                | LifecycleError::ContentBlocked { .. }
                | LifecycleError::NoActiveKey
                | LifecycleError::RestoreWindowClosed { .. }
                | LifecycleError::NotDue { .. }
                | LifecycleError::GenericDefaultNotRevocable { .. }
                | LifecycleError::NotTheRemovedKey { .. }
                | LifecycleError::GenericAlreadyActive { .. }
                | LifecycleError::GenericNotMaster
                | LifecycleError::ByokOff,
            ) => Code::FailedPrecondition,
            Self::UnknownKek(_) | Self::NoRotation => Code::NotFound,
            Self::KeyMaterialGone { .. } | Self::NotConfigured(_) => Code::FailedPrecondition,
            Self::Envelope(
                EnvelopeError::Empty
                | EnvelopeError::UnsupportedVersion(_)
                | EnvelopeError::WrongLength { .. }
                | EnvelopeError::BadKekId
                | EnvelopeError::NotAuthentic
                | EnvelopeError::ContextTooLong { .. },
            ) => Code::InvalidArgument,
            // Lengths the service itself chose: a bug, not the caller's doing.
            Self::Envelope(
                EnvelopeError::KekLength { .. } | EnvelopeError::ContentKeyLength { .. },
            ) => return internal(),
            Self::Hsm(HsmError::Status(status)) => match status.code() {
                // The HSM's explanation of bad key material is for the admin.
                Code::InvalidArgument | Code::OutOfRange => return hsm_refused_key(status),
                // Sent by the daemon itself (a status tonic makes locally has
                // a source): a request over its message limit, which only the
                // caller's input can make.
                Code::ResourceExhausted if std::error::Error::source(status).is_none() => {
                    return hsm_refused_key(status);
                }
                // A key in AWS KMS the daemon cannot use (access denied,
                // disabled, scheduled for deletion): AWS's reason is for the
                // admin, who alone can change it.
                Code::FailedPrecondition => {
                    return Status::failed_precondition(format!(
                        "the HSM refused the key: {}",
                        status.message()
                    ));
                }
                // Sent by the daemon itself (tonic gives a status it makes
                // of a local connection failure a source): what it cannot
                // reach, such as an AWS region, helps the caller.
                Code::Unavailable if std::error::Error::source(status).is_none() => {
                    return Status::unavailable(format!(
                        "the HSM daemon cannot complete the call: {}; retry later",
                        status.message()
                    ));
                }
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                    return hsm_unavailable();
                }
                // What the daemon never answers for a caller's mistake: the
                // cause is in the log. (NOT_FOUND of a key the store holds
                // is named where the content path calls the daemon.)
                Code::Ok
                | Code::Unknown
                | Code::NotFound
                | Code::AlreadyExists
                | Code::PermissionDenied
                | Code::ResourceExhausted
                | Code::Aborted
                | Code::Unimplemented
                | Code::Internal
                | Code::DataLoss
                | Code::Unauthenticated => return internal(),
            },
            Self::Hsm(HsmError::Connect(_) | HsmError::Tls(_)) => return hsm_unavailable(),
            Self::Hsm(HsmError::Protocol(_))
            | Self::Store(StoreError::Corrupt(_))
            | Self::Internal(
                Internal::TaskFailed(_)
                | Internal::NoHandle(_)
                | Internal::KekKeyNotUsable { .. }
                | Internal::KekDoesNotUnwrap { .. }
                | Internal::KekHandleMismatch { .. },
            ) => {
                return internal();
            }
            Self::Store(StoreError::Unavailable(_)) => {
                return Status::unavailable("the metadata store is unavailable; retry later");
            }
            Self::Store(StoreError::KeyArnTaken) => Code::AlreadyExists,
            // Lost a race the caller can simply run again.
            Self::Store(
                StoreError::Conflict(_) | StoreError::IntentLost | StoreError::GenericKeyChanged,
            ) => Code::Aborted,
        };
        Status::new(code, self.to_string())
    }
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Self {
        let status = err.to_status();
        if matches!(status.code(), Code::Internal | Code::Unavailable) {
            error!(error = %chain(&err), code = ?status.code(), "request failed");
        }
        status
    }
}

fn hsm_refused_key(status: &Status) -> Status {
    Status::invalid_argument(format!("the HSM refused the key: {}", status.message()))
}

fn hsm_unavailable() -> Status {
    Status::unavailable("the HSM daemon is unavailable; retry later")
}

/// The caller learns only that it failed; the operator gets the whole chain.
fn internal() -> Status {
    Status::internal("internal error in the control plane; see its log")
}

pub use cmk_runtime::error_chain as chain;

#[cfg(test)]
mod tests {
    use super::*;

    /// A task that panicked is the service's fault: the caller must not be
    /// told to retry.
    #[tokio::test]
    async fn a_panicked_task_is_internal() {
        let panicked = tokio::spawn(async { panic!("a bug") })
            .await
            .expect_err("the task panicked");
        let status = ServiceError::from(Internal::TaskFailed(panicked)).to_status();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("a bug"), "{status:?}");
    }
}
