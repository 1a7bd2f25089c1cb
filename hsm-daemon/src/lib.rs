//! The HSM daemon: the only cmk process that holds customer master keys.
//!
//! It serves `cmk.hsm.v1.HsmService` (Import, Wrap, Unwrap, their batch forms,
//! Destroy, and the RSA import public key), gRPC health and server reflection,
//! over mutual TLS, to allow-listed client identities only. Keys are held by a
//! [`cmk_hsm_custody::Custody`] backend, or stay in AWS KMS behind
//! [`cmk_hsm_aws_kms::AwsKeys`]; [`keys::Keys`] composes the two. No RPC
//! returns a key.
//!
//! `main.rs` only parses the command line ([`Cli`]) and calls [`run`]; [`run`]
//! and [`serve`] are what tests call too. The server around the HSM service
//! (TLS, health, reflection, metrics, stopping) is `cmk_runtime::server`'s.

#![forbid(unsafe_code)]

mod authz;
mod cli;
pub mod config;
mod error;
pub mod keys;
mod request;
mod server;
mod service;

pub use cli::Cli;
pub use config::{ConfigError, Limits, LogFormat, RawSettings, Settings};
pub use error::ServiceError;
pub use request::{Admission, Destroy, ForOrg, Import, Source};
pub use server::{StartError, run, serve};
