//! Protocol buffer packages of cmk and the tonic code generated from them at build
//! time.
//!
//! Every message that carries secret bytes has a hand-written [`Debug`] that prints
//! only their length, so a `{:?}` in a log line cannot leak a key.

#![allow(missing_docs)] // generated code documents itself from the .proto comments

pub mod checkpoint;
pub mod codec;
mod redact;
pub mod status_details;

/// The HSM daemon's API (`cmk.hsm.v1`).
pub mod hsm {
    pub mod v1 {
        tonic::include_proto!("cmk.hsm.v1");
    }
}

/// The control plane's API (`cmk.control.v1`).
pub mod control {
    pub mod v1 {
        tonic::include_proto!("cmk.control.v1");
    }
}

/// A bare echo service: the baseline the benchmark measures the content-key
/// API against, over the same mutual TLS (`cmk.bench.v1`).
pub mod bench {
    pub mod v1 {
        tonic::include_proto!("cmk.bench.v1");
    }
}

/// Encoded `FileDescriptorSet` of every package, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cmk_descriptor");
