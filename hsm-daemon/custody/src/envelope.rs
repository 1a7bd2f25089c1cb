//! The self-describing ciphertext of `wrap`, and the AES-256-GCM sealing it (and the
//! keystore's at-rest sealing) is built on.
//!
//! Version 1, a secret sealed under a CMK the daemon holds:
//!
//! ```text
//! offset  length  field
//! 0       1       format version (1)
//! 1       16      key handle of the CMK
//! 17      12      random nonce
//! 29      n       AES-256-GCM ciphertext of the n-byte secret
//! 29+n    16      GCM tag
//! ```
//!
//! The GCM associated data is the 17-byte header followed by the caller's
//! associated data, so neither the version nor the handle can be changed without
//! the tag failing. Nonces are random: under one CMK, stay well below 2^32 wraps
//! (NIST SP 800-38D §8.3); KEK re-wrapping on rotation is far below that.
//!
//! Version 2, a secret encrypted by AWS KMS under a key the daemon references:
//!
//! ```text
//! offset  length  field
//! 0       1       format version (2)
//! 1       16      key handle of the AWS key reference
//! 17      …       the KMS ciphertexts (`cmk_hsm_aws_kms::WrappedByAws`)
//! ```
//!
//! KMS authenticates its ciphertexts; the handle and the caller's associated
//! data are bound through the encryption context (see `cmk_hsm_aws_kms`).
//! This crate reads only the header; the body is the aws-kms backend's.

use aes_gcm::{
    Aes256Gcm, Nonce, Tag,
    aead::{AeadInOut, KeyInit},
};
use cmk_secret::SecretBytes;

use crate::{CustodyError, InputError, KeyHandle};

/// The format of a secret sealed under a CMK the daemon holds.
pub const VERSION: u8 = 1;
/// The format of a secret encrypted by AWS KMS.
pub const VERSION_AWS: u8 = 2;
/// Version byte plus key handle.
pub const HEADER_LEN: usize = 1 + KeyHandle::LEN;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// The shortest valid version 1 ciphertext (an empty secret).
pub const MIN_LEN: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;
/// The shortest version 2 body: version, flags and one length-prefixed byte.
const MIN_AWS_BODY: usize = 5;

/// What the header of a `wrap` ciphertext says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sealed<'a> {
    /// Version 1, under the CMK `handle`.
    Local(KeyHandle),
    /// Version 2, under the AWS key reference `handle`.
    Aws {
        /// The reference.
        handle: KeyHandle,
        /// The KMS ciphertexts, still to be decoded.
        body: &'a [u8],
    },
}

impl Sealed<'_> {
    /// The key named in the header.
    pub fn handle(&self) -> KeyHandle {
        match self {
            Self::Local(handle) | Self::Aws { handle, .. } => *handle,
        }
    }
}

/// An AES-256-GCM key, expanded once and wiped when dropped.
pub struct SealingKey(Aes256Gcm);

impl SealingKey {
    /// Expands a 32-byte key.
    pub fn new(key: &SecretBytes) -> Result<Self, CustodyError> {
        Aes256Gcm::new_from_slice(key.expose())
            .map(Self)
            .map_err(|_| CustodyError::Crypto("AES-256-GCM needs a 32-byte key"))
    }

    /// `prefix || nonce || ciphertext || tag`, authenticating `prefix || aad`.
    pub fn seal(
        &self,
        prefix: &[u8],
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CustodyError> {
        let mut nonce = [0; NONCE_LEN];
        crate::fill_random(&mut nonce)?;
        // Sized up front and encrypted in place: a growing Vec would leave a copy
        // of the plaintext behind in the allocation it moved away from.
        let mut out = Vec::with_capacity(prefix.len() + NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(prefix);
        out.extend_from_slice(&nonce);
        let body = out.len();
        out.extend_from_slice(plaintext);
        let full_aad = [prefix, aad].concat();
        let tag = self
            .0
            .encrypt_inout_detached(&Nonce::from(nonce), &full_aad, (&mut out[body..]).into())
            .map_err(|_| CustodyError::Crypto("AES-GCM encryption failed"))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Opens what [`SealingKey::seal`] made with the same `prefix` (already checked
    /// by the caller to be the first `prefix_len` bytes of `sealed`).
    pub fn open(
        &self,
        sealed: &[u8],
        prefix_len: usize,
        aad: &[u8],
    ) -> Result<SecretBytes, CustodyError> {
        if sealed.len() < prefix_len + NONCE_LEN + TAG_LEN {
            return Err(CustodyError::Authentication);
        }
        let (prefix, rest) = sealed.split_at(prefix_len);
        let (nonce, rest) = rest.split_at(NONCE_LEN);
        let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
        let nonce = Nonce::try_from(nonce).map_err(|_| CustodyError::Authentication)?;
        let tag = <Tag>::try_from(tag).map_err(|_| CustodyError::Authentication)?;
        let full_aad = [prefix, aad].concat();
        let mut plaintext = SecretBytes::copy_from(body);
        self.0
            .decrypt_inout_detached(&nonce, &full_aad, plaintext.expose_mut().into(), &tag)
            .map_err(|_| CustodyError::Authentication)?;
        Ok(plaintext)
    }
}

/// Encrypts `plaintext` under `key` (the CMK `handle`) into the v1 format.
pub fn wrap(
    key: &SealingKey,
    handle: &KeyHandle,
    plaintext: &SecretBytes,
    aad: &[u8],
) -> Result<Vec<u8>, CustodyError> {
    key.seal(&header(handle), plaintext.expose(), aad)
}

/// Reads the key handle out of a ciphertext of either version, checking its
/// shape only.
pub fn parse(ciphertext: &[u8]) -> Result<KeyHandle, InputError> {
    read(ciphertext).map(|sealed| sealed.handle())
}

/// Reads the header of a ciphertext of either version, checking its shape only.
pub fn read(ciphertext: &[u8]) -> Result<Sealed<'_>, InputError> {
    let Some(&version) = ciphertext.first() else {
        return Err(InputError::EmptyCiphertext);
    };
    let minimum = match version {
        VERSION => MIN_LEN,
        VERSION_AWS => HEADER_LEN + MIN_AWS_BODY,
        other => return Err(InputError::CiphertextVersion(other)),
    };
    if ciphertext.len() < minimum {
        return Err(InputError::CiphertextTruncated {
            actual: ciphertext.len(),
            minimum,
        });
    }
    let mut handle = [0; KeyHandle::LEN];
    handle.copy_from_slice(&ciphertext[1..HEADER_LEN]);
    let handle = KeyHandle::from_bytes(handle);
    Ok(match version {
        VERSION => Sealed::Local(handle),
        _ => Sealed::Aws {
            handle,
            body: &ciphertext[HEADER_LEN..],
        },
    })
}

/// A version 2 ciphertext: `body` (the KMS ciphertexts) under the AWS key
/// reference `handle`.
pub fn wrap_aws(handle: &KeyHandle, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(VERSION_AWS);
    out.extend_from_slice(handle.as_bytes());
    out.extend_from_slice(body);
    out
}

/// Decrypts a v1 ciphertext already [`parse`]d, with the CMK it names.
pub fn unwrap(
    key: &SealingKey,
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<SecretBytes, CustodyError> {
    key.open(ciphertext, HEADER_LEN, aad)
}

fn header(handle: &KeyHandle) -> [u8; HEADER_LEN] {
    let mut header = [0; HEADER_LEN];
    header[0] = VERSION;
    header[1..].copy_from_slice(handle.as_bytes());
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SealingKey {
        SealingKey::new(&SecretBytes::new(vec![7; 32])).expect("key")
    }

    #[test]
    fn round_trip_and_every_single_byte_change_is_detected() {
        let key = key();
        let handle = KeyHandle::random().expect("rng");
        let secret = SecretBytes::new(vec![42; 32]);
        let ct = wrap(&key, &handle, &secret, b"org-1/kek-1").expect("wrap");
        assert_eq!(ct.len(), MIN_LEN + 32);
        assert_eq!(parse(&ct), Ok(handle));
        let pt = unwrap(&key, &ct, b"org-1/kek-1").expect("unwrap");
        assert!(pt.ct_eq(&secret));

        assert!(matches!(
            unwrap(&key, &ct, b"org-1/kek-2"),
            Err(CustodyError::Authentication)
        ));
        for i in 0..ct.len() {
            let mut bad = ct.clone();
            bad[i] ^= 0x01;
            let rejected = match parse(&bad) {
                Err(_) => true,
                Ok(_) => unwrap(&key, &bad, b"org-1/kek-1").is_err(),
            };
            assert!(rejected, "flip of byte {i} went unnoticed");
        }
    }

    #[test]
    fn version_2_names_its_handle_and_keeps_its_body() {
        let handle = KeyHandle::random().expect("rng");
        let ct = wrap_aws(&handle, b"\x01\x00\x00\x01z");
        assert_eq!(
            read(&ct),
            Ok(Sealed::Aws {
                handle,
                body: b"\x01\x00\x00\x01z"
            })
        );
    }

    #[test]
    fn malformed_ciphertexts_are_named() {
        assert_eq!(parse(&[]), Err(InputError::EmptyCiphertext));
        assert_eq!(parse(&[3; 80]), Err(InputError::CiphertextVersion(3)));
        assert_eq!(
            parse(&[2; 21]),
            Err(InputError::CiphertextTruncated {
                actual: 21,
                minimum: HEADER_LEN + MIN_AWS_BODY
            })
        );
        assert_eq!(
            parse(&[1; 20]),
            Err(InputError::CiphertextTruncated {
                actual: 20,
                minimum: MIN_LEN
            })
        );
    }
}
