//! The HSM daemon's AWS KMS backend: a customer's CMK stays in AWS KMS,
//! referenced by key ARN, and secrets are wrapped by KMS Encrypt and unwrapped
//! by KMS Decrypt under an encryption context that binds what they are for.
//!
//! [`AwsKeys`] is the backend, a [`cmk_hsm_custody::Custody`] of its own: it
//! wraps, unwraps and destroys (forgets) through that trait like every other
//! backend. A key enters by reference, not by its material, so it does not
//! implement [`cmk_hsm_custody::MaterialCustody`]: its inherent
//! [`AwsKeys::add`] and [`AwsKeys::recover`] admit a key reference after a
//! round trip and keep it in a [`cmk_hsm_custody::ReferenceStore`] (the
//! software keystore). The daemon puts it beside its custody backend and sends
//! it every handle it [holds](AwsKeys::holds) and every version 2 ciphertext.
//!
//! Its errors leave it in custody's words: the keystore's refusals as they
//! are, and everything of AWS's as a [`cmk_hsm_custody::CustodyError::Provider`]
//! that carries the [`AwsKmsError`] (for the message and the chain) and a
//! generic [`cmk_hsm_custody::ProviderErrorKind`] (for the status), the one
//! translation being `From<AwsKmsError> for CustodyError`. What AWS said, and
//! the state names' remedies, stay here.
//!
//! # Design
//!
//! - **Key ARNs only.** [`KeyArn`] refuses aliases: an alias can be repointed by
//!   whoever controls the account, and a secret wrapped under one key must never
//!   quietly be sent to another. Every call goes to the region in the key's ARN;
//!   there is no default region.
//! - **Backup key, wrapped twice.** With a backup configured, [`AwsKms::encrypt`]
//!   encrypts under both keys and keeps both ciphertexts ([`WrappedByAws`]). The
//!   backup is an independent key (normally in another region), not a
//!   multi-region replica that decrypts the primary's ciphertext: that works the
//!   same in AWS, and also against the emulator, which cannot decrypt a replica's
//!   ciphertext. If either encryption fails, the whole call fails: a secret
//!   without its backup ciphertext would silently lose the failover.
//! - **Failover on the region, not on the answer.** [`AwsKms::decrypt`] tries the
//!   backup only when the primary's region could not answer
//!   ([`AwsError::Unavailable`]: no connection, timeouts, throttling past the
//!   retries, KMS internal errors, a key briefly unavailable). An answer — wrong
//!   ciphertext or context, access denied, key disabled, key not found — is
//!   returned as it is: the backup would hide a revocation or a tampering.
//! - **Bounded time.** Standard retry mode, 3 attempts; connect 3 s, attempt 5 s,
//!   call 15 s ([`AwsSettings`]): a dead region costs at most 15 s before the
//!   backup is tried.
//! - **Roles.** With a role, credentials come from STS AssumeRole in the key's own
//!   region (a failed region does not take the backup's credentials down with
//!   it), cached by each client and renewed 30–60 s before they expire. Every
//!   AssumeRole sends the org's own external id ([`ExternalId`]), which the
//!   role's trust policy requires: one org cannot have the service assume
//!   another org's role.
//! - **References sealed like keys.** The software keystore keeps each key
//!   reference (primary, backup and role ARNs) in a record sealed under its root
//!   key, beside the CMKs it holds, in one handle namespace: a reference altered
//!   on disk would send secrets to another key. The primary key ARN is the
//!   reference's identity, what a recovery must present again. Destroying a
//!   reference (the keystore's `destroy`) forgets it; the key in AWS is left as
//!   it is.
//! - **Envelope version 2.** A secret wrapped under a reference is the
//!   reference's handle and the KMS ciphertexts ([`WrappedByAws`]); the
//!   encryption context binds the handle, the org the key serves (`cmk:org`,
//!   in the clear so that the customer's key policy can require it) and the
//!   caller's associated data ([`encryption_context`]), which for a KEK binds
//!   the org and the KEK id.
//! - **The owner's word is DescribeKey.** Before a wrap or unwrap the key's
//!   state is looked up (cached for a configurable time): a key its owner
//!   disabled or scheduled for deletion is refused with
//!   [`AwsKmsError::ProviderKeyState`], naming the state, even where
//!   Encrypt would still answer (as an emulator does).
//! - **No destruction.** Nothing here deletes, disables or schedules the deletion
//!   of a key. The customer owns it; "destroy" in this service forgets the ARN.
//! - **Secrets.** Plaintexts are [`cmk_secret::SecretBytes`]; a decrypted
//!   plaintext moves from the SDK's buffer into one without a copy. The SDK's
//!   own request and response bodies cannot be wiped from here. Nothing logs a
//!   plaintext or a credential; errors carry AWS's error code and message.

#![forbid(unsafe_code)]

mod arn;
mod client;
mod context;
#[cfg(feature = "emulator")]
pub mod emulator;
mod error;
mod keys;
mod wrapped;

pub use arn::{ArnError, KeyArn, MAX_ARN_LEN, Partition, RoleArn};
pub use client::{
    AssumedRole, AwsCredentials, AwsKeyRef, AwsKeyState, AwsKms, AwsSettings, ExternalId,
    MAX_PLAINTEXT_LEN, ROLE_SESSION_NAME,
};
pub use cmk_hsm_custody::ProviderState;
pub use context::{ContextError, EncryptionContext, MAX_CONTEXT_BYTES};
pub use error::{AwsDetail, AwsError, AwsKmsError, BoxError};
pub use keys::{
    AwsKeys, CONTEXT_ASSOCIATED_DATA, CONTEXT_HANDLE, CONTEXT_ORG, DEFAULT_STATE_TTL,
    MAX_CIPHERTEXT_LEN, check_value, encryption_context,
};
pub use wrapped::{MAX_BLOB_LEN, WrappedByAws, WrappedError};
