//! The cmk control plane: organisations' master-key metadata and lifecycle,
//! the admin API, authorisation and the audit log. It never holds key
//! material: the HSM daemon does, behind [`hsm::HsmClient`].

#![forbid(unsafe_code)]

pub mod authz;
pub mod clock;
pub mod config;
pub mod content;
pub mod envelope;
pub mod error;
pub mod grpc;
pub mod hsm;
pub mod kek_cache;
pub mod lease;
pub mod metrics;
pub mod rotation;
pub mod server;
pub mod service;

#[cfg(test)]
mod aws_tests;

pub use config::{LogFormat, RawSettings, Settings};
pub use server::{StartError, run, serve};
