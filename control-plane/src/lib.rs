//! The cmk control plane: organisations' master-key metadata and lifecycle,
//! the admin API, authorisation and the audit log. It never holds key
//! material: the HSM daemon does, behind [`hsm::HsmClient`].
//!
//! `main.rs` only parses the command line ([`cli::Cli`]) and calls [`run`], or
//! [`verify::VerifyAudit`]; [`run`] and [`serve`] are what tests call too. The
//! server around the services (TLS, health, reflection, metrics, stopping) is
//! `cmk_runtime::server`'s.

#![forbid(unsafe_code)]

pub mod authz;
pub mod cli;
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
pub mod verify;

#[cfg(test)]
mod aws_tests;

pub use config::{LogFormat, RawSettings, Settings};
pub use server::{StartError, run, serve};
