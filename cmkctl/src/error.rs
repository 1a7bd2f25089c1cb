//! Everything that can go wrong in `cmkctl`, the one line each is reported as, and
//! the exit code each one maps to ([`Error::exit`], the only place that chooses).

use std::{error::Error as _, io, path::PathBuf};

use tonic::Code;

use crate::{config::ConfigError, wrap::WrapError};

/// A failed command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection settings are missing or malformed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Wrapping a master key locally failed.
    #[error(transparent)]
    Wrap(#[from] WrapError),
    /// A file named on the command line could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    File {
        /// "read" or "write".
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A value on the command line is malformed.
    #[error("{0}")]
    Input(String),
    /// The TLS files could not be read.
    #[error(transparent)]
    Tls(#[from] cmk_tls::TlsError),
    /// The TLS files were read but are not a usable certificate, key or CA.
    #[error("invalid TLS files (--ca, --cert, --key): {}", chain(.0))]
    TlsSetup(#[source] tonic::transport::Error),
    /// No connection to the control plane: TCP or the TLS handshake failed.
    #[error("cannot reach {endpoint}: {}", chain(.source))]
    Unreachable {
        /// The endpoint as configured.
        endpoint: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The connection failed during a call (the status was made by the client, not
    /// sent by the server).
    #[error(
        "connection to {endpoint} failed during the call: {}; a control plane that does \
         not accept the client certificate (--cert) closes the connection like this",
        status_chain(.status)
    )]
    Interrupted {
        /// The endpoint as configured.
        endpoint: String,
        /// The status tonic made of the failure; its sources say why.
        status: tonic::Status,
    },
    /// The control plane answered with an error.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    /// `revoke` asked about a key that cannot be revoked now.
    #[error("key {key_id} is {}; only the active key can be revoked", .state.replace('_', " "))]
    NotRevocable {
        /// The key.
        key_id: String,
        /// Its state, lower case.
        state: &'static str,
    },
    /// `audit verify` found the hash chain broken.
    #[error("the audit chain is broken: {problem}")]
    AuditChainBroken {
        /// Where and how, as the control plane says.
        problem: String,
    },
    /// The user did not confirm at the prompt.
    #[error("aborted: {0}")]
    Aborted(String),
    /// The async runtime could not be started.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
    /// Writing the output failed (other than a closed pipe, which is not an error).
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

/// `cmkctl`'s exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The command succeeded.
    Success = 0,
    /// The control plane failed in another way (INTERNAL, …).
    ServerError = 1,
    /// Bad flags, an unreadable file, a bad config: nothing was sent.
    Usage = 2,
    /// The control plane could not be reached, or did not answer in time.
    Unreachable = 3,
    /// NOT_FOUND.
    NotFound = 4,
    /// PERMISSION_DENIED or UNAUTHENTICATED.
    Denied = 5,
    /// FAILED_PRECONDITION or ALREADY_EXISTS.
    Precondition = 6,
    /// INVALID_ARGUMENT.
    InvalidArgument = 7,
    /// `audit verify` found the chain broken.
    AuditChainBroken = 8,
    /// Aborted at a confirmation prompt.
    Aborted = 9,
}

impl Exit {
    /// Every exit code, in order.
    pub const ALL: [Exit; 10] = [
        Exit::Success,
        Exit::ServerError,
        Exit::Usage,
        Exit::Unreachable,
        Exit::NotFound,
        Exit::Denied,
        Exit::Precondition,
        Exit::InvalidArgument,
        Exit::AuditChainBroken,
        Exit::Aborted,
    ];

    /// The process exit status.
    pub fn code(self) -> u8 {
        self as u8
    }

    fn meaning(self) -> &'static str {
        match self {
            Exit::Success => "success",
            Exit::ServerError => "the control plane failed in another way (INTERNAL, …)",
            Exit::Usage => "usage or local error: bad flags, unreadable file, bad config",
            Exit::Unreachable => {
                "cannot reach the control plane (connect or TLS failure, UNAVAILABLE, \
                 DEADLINE_EXCEEDED)"
            }
            Exit::NotFound => "NOT_FOUND",
            Exit::Denied => "PERMISSION_DENIED or UNAUTHENTICATED",
            Exit::Precondition => "FAILED_PRECONDITION or ALREADY_EXISTS",
            Exit::InvalidArgument => "INVALID_ARGUMENT",
            Exit::AuditChainBroken => "the audit chain is broken",
            Exit::Aborted => "aborted at the confirmation prompt",
        }
    }
}

impl Error {
    /// The exit code this error ends `cmkctl` with.
    pub fn exit(&self) -> Exit {
        match self {
            Error::Config(_)
            | Error::Wrap(_)
            | Error::File { .. }
            | Error::Input(_)
            | Error::Tls(_)
            | Error::TlsSetup(_)
            | Error::Runtime(_)
            | Error::Output(_) => Exit::Usage,
            Error::Unreachable { .. } | Error::Interrupted { .. } => Exit::Unreachable,
            Error::NotRevocable { .. } => Exit::Precondition,
            Error::AuditChainBroken { .. } => Exit::AuditChainBroken,
            Error::Aborted(_) => Exit::Aborted,
            Error::Status(status) => match status.code() {
                Code::Unavailable | Code::DeadlineExceeded => Exit::Unreachable,
                Code::NotFound => Exit::NotFound,
                Code::PermissionDenied | Code::Unauthenticated => Exit::Denied,
                Code::FailedPrecondition | Code::AlreadyExists => Exit::Precondition,
                Code::InvalidArgument => Exit::InvalidArgument,
                Code::Ok
                | Code::Cancelled
                | Code::Unknown
                | Code::ResourceExhausted
                | Code::Aborted
                | Code::OutOfRange
                | Code::Unimplemented
                | Code::Internal
                | Code::DataLoss => Exit::ServerError,
            },
        }
    }
}

/// The exit-code table shown by `cmkctl --help`.
pub fn exit_codes_help() -> String {
    let mut text = String::from("Exit codes:\n");
    for exit in Exit::ALL {
        text.push_str(&format!("  {}  {}\n", exit.code(), exit.meaning()));
    }
    text
}

/// The canonical name of a gRPC status code, as in the gRPC specification.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `err` and its sources on one line, separated by ": ", without repeating a
/// message that a source already says.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(err) = next {
        let text = err.to_string();
        // hyper and tonic often wrap an error with a message that ends in, or just
        // repeats, the message of its source.
        if !text.is_empty() && parts.last().is_none_or(|last| !last.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// A client-made status's message and sources on one line.
fn status_chain(status: &tonic::Status) -> String {
    let causes = status.source().map(chain).unwrap_or_default();
    if causes.is_empty() || status.message().contains(&causes) {
        status.message().to_string()
    } else if causes.starts_with(status.message()) {
        causes
    } else {
        format!("{}: {causes}", status.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_documented_exit_codes() {
        let exit = |code| Error::Status(tonic::Status::new(code, "x")).exit().code();
        assert_eq!(exit(Code::Internal), 1);
        assert_eq!(exit(Code::Unknown), 1);
        assert_eq!(exit(Code::Unavailable), 3);
        assert_eq!(exit(Code::DeadlineExceeded), 3);
        assert_eq!(exit(Code::NotFound), 4);
        assert_eq!(exit(Code::PermissionDenied), 5);
        assert_eq!(exit(Code::Unauthenticated), 5);
        assert_eq!(exit(Code::FailedPrecondition), 6);
        assert_eq!(exit(Code::AlreadyExists), 6);
        assert_eq!(exit(Code::InvalidArgument), 7);
    }

    #[test]
    fn local_errors_map_to_their_own_exit_codes() {
        assert_eq!(Error::Input("bad".into()).exit().code(), 2);
        let not_revocable = Error::NotRevocable {
            key_id: "key-1".into(),
            state: "pending",
        };
        assert_eq!(not_revocable.exit().code(), 6);
        let broken = Error::AuditChainBroken {
            problem: "seq 3".into(),
        };
        assert_eq!(broken.exit().code(), 8);
        assert_eq!(Error::Aborted("no".into()).exit().code(), 9);
    }

    #[test]
    fn help_lists_every_exit_code_once() {
        let help = exit_codes_help();
        for exit in Exit::ALL {
            let line = format!("\n  {}  ", exit.code());
            assert_eq!(help.matches(&line).count(), 1, "{help}");
        }
    }

    #[test]
    fn a_status_is_one_line_with_its_canonical_code_name() {
        let status = tonic::Status::failed_precondition("key key-1 is pending; activate it first");
        assert_eq!(
            Error::Status(status).to_string(),
            "FAILED_PRECONDITION: key key-1 is pending; activate it first"
        );
    }

    #[test]
    fn chain_joins_sources_without_repeating_them() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] io::Error);
        let err = Outer(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        assert_eq!(chain(&err), "outer: connection refused");
    }

    #[test]
    fn a_client_made_status_is_a_broken_connection() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Transport(#[source] io::Error);
        let status = tonic::Status::from_error(Box::new(Transport(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "stream closed because of a broken pipe",
        ))));
        let err = Error::Interrupted {
            endpoint: "https://127.0.0.1:8443".into(),
            status,
        };
        assert_eq!(err.exit().code(), 3);
        let text = err.to_string();
        assert!(
            text.starts_with(
                "connection to https://127.0.0.1:8443 failed during the call: transport error: \
                 stream closed because of a broken pipe; "
            ),
            "{text}"
        );
    }
}
