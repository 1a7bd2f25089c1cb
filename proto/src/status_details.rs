//! Typed details of a gRPC status, written once here so that the HSM daemon
//! that sends them and the control plane that reads them agree byte for byte.
//!
//! The details travel as `grpc-status-details-bin`, which by gRPC convention
//! is a `google.rpc.Status` whose `details` are `Any` messages: a client that
//! knows nothing of cmk (grpcurl) still shows them, and a reader skips any
//! detail it does not know.

use prost::{Message, bytes::Bytes};
use prost_types::Any;
use tonic::Status;

use crate::hsm::v1::{ProviderKeyState, ProviderKeyUnusable};

/// `google.rpc.Status`, the conventional frame of the status details; only
/// its `details` are read here, the code and message being the status's own.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<Any>,
}

/// The details of a status refusing a key its provider made unusable, for
/// [`Status::with_details`] with the same `code` and `message`.
pub fn provider_key_unusable(code: tonic::Code, message: &str, state: ProviderKeyState) -> Bytes {
    let detail = ProviderKeyUnusable {
        state: state as i32,
    };
    let frame = RpcStatus {
        code: code as i32,
        message: message.to_owned(),
        details: vec![Any {
            type_url: <ProviderKeyUnusable as prost::Name>::type_url(),
            value: detail.encode_to_vec(),
        }],
    };
    Bytes::from(frame.encode_to_vec())
}

/// The provider's state carried by `status`, whatever its code; `None` when it
/// carries none, when the details do not decode, or when the state is one
/// this build does not know (a newer daemon's), so that a malformed or future
/// answer is read as "the provider said nothing".
pub fn provider_key_state(status: &Status) -> Option<ProviderKeyState> {
    let frame = RpcStatus::decode(status.details()).ok()?;
    frame
        .details
        .iter()
        .find_map(|any| any.to_msg::<ProviderKeyUnusable>().ok())
        .and_then(|detail| ProviderKeyState::try_from(detail.state).ok())
        .filter(|state| *state != ProviderKeyState::Unspecified)
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn refusal(state: i32) -> Status {
        let frame = RpcStatus {
            code: Code::FailedPrecondition as i32,
            message: String::new(),
            details: vec![Any {
                type_url: <ProviderKeyUnusable as prost::Name>::type_url(),
                value: ProviderKeyUnusable { state }.encode_to_vec(),
            }],
        };
        Status::with_details(Code::FailedPrecondition, "", frame.encode_to_vec().into())
    }

    #[test]
    fn every_state_round_trips() {
        for state in [
            ProviderKeyState::Disabled,
            ProviderKeyState::PendingDeletion,
            ProviderKeyState::PendingImport,
            ProviderKeyState::Unavailable,
            ProviderKeyState::NotFound,
        ] {
            let details = provider_key_unusable(Code::FailedPrecondition, "refused", state);
            let status = Status::with_details(Code::FailedPrecondition, "refused", details);
            assert_eq!(provider_key_state(&status), Some(state));
        }
    }

    #[test]
    fn unknown_unspecified_and_malformed_details_say_nothing() {
        assert_eq!(provider_key_state(&refusal(0)), None);
        assert_eq!(provider_key_state(&refusal(99)), None);
        assert_eq!(provider_key_state(&refusal(-1)), None);
        assert_eq!(
            provider_key_state(&Status::failed_precondition("no details")),
            None
        );
        let garbage = Status::with_details(
            Code::FailedPrecondition,
            "",
            Bytes::from_static(b"\xff\xff"),
        );
        assert_eq!(provider_key_state(&garbage), None);
        let other = RpcStatus {
            code: 9,
            message: String::new(),
            details: vec![Any {
                type_url: "type.googleapis.com/google.rpc.ErrorInfo".into(),
                value: ProviderKeyUnusable { state: 1 }.encode_to_vec(),
            }],
        };
        let other =
            Status::with_details(Code::FailedPrecondition, "", other.encode_to_vec().into());
        assert_eq!(provider_key_state(&other), None);
    }

    #[test]
    fn the_frame_is_a_google_rpc_status() {
        let details = provider_key_unusable(
            Code::FailedPrecondition,
            "key disabled",
            ProviderKeyState::Disabled,
        );
        let frame = RpcStatus::decode(details).expect("decodes");
        assert_eq!(frame.code, Code::FailedPrecondition as i32);
        assert_eq!(frame.message, "key disabled");
        assert_eq!(
            frame.details[0].type_url,
            "type.googleapis.com/cmk.hsm.v1.ProviderKeyUnusable"
        );
    }
}
