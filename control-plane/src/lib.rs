//! The cmk control plane: organisations' master-key metadata and lifecycle,
//! the admin API, authorisation and the audit log. It never holds key
//! material: the HSM daemon does, behind [`hsm::HsmClient`].
//!
//! `main.rs` only parses the command line ([`cli::Cli`]) and calls [`run`], or
//! [`verify::VerifyAudit`]; [`run`] and [`serve`] are what tests call too. The
//! server around the services (TLS, health, reflection, metrics, stopping) is
//! `cmk_runtime::server`'s.
//!
//! A request crosses three layers, each with one job:
//!
//! - [`grpc`]: the edge. One path for every RPC reads the org, authorises
//!   the caller ([`authz`]), audits a refusal, and reads the request into
//!   typed values (`grpc/request.rs`) before the service sees it; answers are
//!   converted back in `grpc/response.rs`.
//! - [`service`]: [`service::KeyService`], the operations themselves, split by
//!   what they serve (admin, content keys, rotation, the generic key, custody
//!   intents, the timers' changes). It takes typed requests and the domain's
//!   ids, never a protobuf message.
//! - [`hsm`], the store and the domain crate below it.
//!
//! Errors of every layer meet in [`error::ServiceError`], whose
//! [`to_status`](error::ServiceError::to_status) is the one place a status is
//! chosen.

#![forbid(unsafe_code)]

pub mod authz;
pub mod cli;
pub mod clock;
pub mod config;
pub mod envelope;
pub mod error;
pub mod grpc;
pub mod hsm;
pub mod kek_cache;
pub mod lease;
pub mod metrics;
pub mod server;
pub mod service;
pub mod verify;

#[cfg(test)]
mod aws_tests;

pub use config::{LogFormat, RawSettings, Settings};
pub use server::{StartError, run, serve};
