//! The cmk control plane: org key metadata, the key lifecycle, rotation jobs, the
//! audit log, admin and internal-service APIs, and authorisation. It never holds
//! CMK bytes; everything that needs a CMK goes through the HSM daemon.
//!
//! So far this crate holds [`hsm::HsmClient`], its mutual-TLS client of the HSM
//! daemon.

#![forbid(unsafe_code)]

pub mod hsm;
