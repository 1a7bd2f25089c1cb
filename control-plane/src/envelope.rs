//! The wire format of wrapped content keys, and the associated data that binds a
//! KEK wrapped by the HSM daemon to its org and id.
//!
//! A wrapped content key (CK) is self-describing and authenticated with the
//! caller's context as associated data:
//!
//! ```text
//! offset  length  field
//! 0       1       format version (1)
//! 1       36      KEK id, ASCII: "kek-" and 32 lower-case hex characters
//! 37      12      random nonce
//! 49      32      AES-256-GCM ciphertext of the content key
//! 81      16      GCM tag
//! ```
//!
//! The GCM associated data is a label, the 37-byte header, the org id and the
//! context, each variable field length-prefixed, so that no two (org, context)
//! pairs share an encoding and neither the version nor the KEK id can be changed
//! without the tag failing. A CK copied to another org, or opened with another
//! context, does not authenticate.
//!
//! The KEK id is in clear so that [`parse`] can name the KEK to fetch (and
//! unwrap through the HSM daemon) before anything is decrypted. Nonces are
//! random: stay well below 2^32 wraps under one KEK (NIST SP 800-38D §8.3).

use std::fmt;

use aes_gcm::{
    Aes256Gcm, Nonce, Tag,
    aead::{AeadInOut, KeyInit},
};
use cmk_control_plane_domain::{KekId, OrgId};
use cmk_secret::SecretBytes;

/// The only format version of a wrapped content key.
pub const VERSION: u8 = 1;
/// Length of a content key: AES-256.
pub const CONTENT_KEY_LEN: usize = 32;
/// Length of a KEK: AES-256.
pub const KEK_LEN: usize = 32;
/// The longest context accepted as associated data.
pub const MAX_CONTEXT_BYTES: usize = 4096;
/// The longest wrapped content key of any version this build reads; a version 1
/// key is exactly this long. Input longer than this can be refused unread.
pub const MAX_WRAPPED_CONTENT_KEY_BYTES: usize = WRAPPED_LEN;

const HEADER_LEN: usize = 1 + KekId::LEN;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const WRAPPED_LEN: usize = HEADER_LEN + NONCE_LEN + CONTENT_KEY_LEN + TAG_LEN;

// Both labels end in NUL and contain no other, so neither is a prefix of the
// other: a KEK's associated data can never be read as a CK's.
const CONTENT_KEY_LABEL: &[u8] = b"cmk/content-key/v1\0";
const KEK_LABEL: &[u8] = b"cmk/kek/v1\0";

/// Why a content key could not be wrapped or unwrapped. No variant carries key
/// bytes, so every message is safe to log and to return.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The caller sent no bytes.
    #[error("wrapped content key is empty")]
    Empty,
    /// The first byte names a format this build does not read.
    #[error("wrapped content key has format version {0}; only version {VERSION} is supported")]
    UnsupportedVersion(u8),
    /// Truncated or padded: not the length its version prescribes.
    #[error(
        "wrapped content key is {actual} bytes; format version {VERSION} is exactly {expected}"
    )]
    WrongLength {
        /// Bytes received.
        actual: usize,
        /// Bytes the format has.
        expected: usize,
    },
    /// The header's KEK id is not `kek-` and 32 lower-case hex characters.
    #[error("wrapped content key does not name a valid KEK id")]
    BadKekId,
    /// The tag does not verify under the KEK with this org and context.
    #[error(
        "wrapped content key does not authenticate: tampered with, wrapped for another \
         organisation, or opened with another context"
    )]
    NotAuthentic,
    /// The caller's context is over [`MAX_CONTEXT_BYTES`].
    #[error("context is {actual} bytes, over the limit of {MAX_CONTEXT_BYTES}")]
    ContextTooLong {
        /// Bytes received.
        actual: usize,
    },
    /// The service's fault, not the caller's: a KEK that is not an AES-256 key.
    #[error("KEK is {actual} bytes; AES-256 needs {KEK_LEN}")]
    KekLength {
        /// Bytes of the KEK given.
        actual: usize,
    },
    /// The service's fault, not the caller's: a content key of the wrong size.
    #[error("content key is {actual} bytes; it must be {CONTENT_KEY_LEN}")]
    ContentKeyLength {
        /// Bytes of the content key given.
        actual: usize,
    },
}

/// The associated data for the HSM daemon's wrap and unwrap of a KEK: the KEK is
/// bound to its org and its id, so a wrapped KEK copied to another org's row, or
/// to another KEK row of the same org, does not unwrap.
pub fn kek_associated_data(org: &OrgId, kek: &KekId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(KEK_LABEL.len() + 2 * 8 + OrgId::MAX_LEN + KekId::LEN);
    aad.extend_from_slice(KEK_LABEL);
    push_field(&mut aad, org.as_str().as_bytes());
    push_field(&mut aad, kek.as_str().as_bytes());
    aad
}

/// A fresh random content key.
pub fn new_content_key() -> SecretBytes {
    let mut key = SecretBytes::zeroed(CONTENT_KEY_LEN);
    fill_random(key.expose_mut());
    key
}

/// Wraps `content_key` under `kek` (whose id is `kek_id`) for `org`, with
/// `context` as associated data: the version 1 format above.
pub fn seal(
    org: &OrgId,
    kek_id: &KekId,
    kek: &SecretBytes,
    context: &[u8],
    content_key: &SecretBytes,
) -> Result<Vec<u8>, EnvelopeError> {
    check_context(context)?;
    if content_key.len() != CONTENT_KEY_LEN {
        return Err(EnvelopeError::ContentKeyLength {
            actual: content_key.len(),
        });
    }
    let cipher = cipher(kek)?;
    let mut nonce = [0; NONCE_LEN];
    fill_random(&mut nonce);

    let mut out = Vec::with_capacity(WRAPPED_LEN);
    out.push(VERSION);
    out.extend_from_slice(kek_id.as_str().as_bytes());
    let aad = content_key_aad(&out, org, context);
    out.extend_from_slice(&nonce);
    // Encrypted in a secret buffer, so that were encryption to fail and unwind,
    // no copy of the content key would outlive it.
    let mut body = SecretBytes::copy_from(content_key.expose());
    let tag = cipher
        .encrypt_inout_detached(&Nonce::from(nonce), &aad, body.expose_mut().into())
        // GCM refuses only plaintexts over 2^36 bytes; a content key is 32.
        .expect("AES-256-GCM encrypts any 32-byte plaintext");
    out.extend_from_slice(body.expose());
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Reads the header of a wrapped content key, checking its shape only: nothing
/// is decrypted or authenticated until [`WrappedContentKey::open`].
pub fn parse(blob: &[u8]) -> Result<WrappedContentKey<'_>, EnvelopeError> {
    let Some(&version) = blob.first() else {
        return Err(EnvelopeError::Empty);
    };
    if version != VERSION {
        return Err(EnvelopeError::UnsupportedVersion(version));
    }
    let Some((header, nonce, ciphertext, tag)) = split(blob) else {
        return Err(EnvelopeError::WrongLength {
            actual: blob.len(),
            expected: WRAPPED_LEN,
        });
    };
    let kek_id = std::str::from_utf8(&header[1..])
        .ok()
        .and_then(|id| KekId::parse(id).ok())
        .ok_or(EnvelopeError::BadKekId)?;
    Ok(WrappedContentKey {
        kek_id,
        header,
        nonce,
        ciphertext,
        tag,
    })
}

type Fields<'a> = (
    &'a [u8; HEADER_LEN],
    &'a [u8; NONCE_LEN],
    &'a [u8; CONTENT_KEY_LEN],
    &'a [u8; TAG_LEN],
);

/// The fields of a version 1 blob, or `None` if it is not exactly their length.
fn split(blob: &[u8]) -> Option<Fields<'_>> {
    let (header, rest) = blob.split_first_chunk()?;
    let (nonce, rest) = rest.split_first_chunk()?;
    let (ciphertext, tag) = rest.split_first_chunk()?;
    Some((header, nonce, ciphertext, tag.try_into().ok()?))
}

/// A wrapped content key whose shape has been checked, borrowed from the bytes
/// it was parsed from.
pub struct WrappedContentKey<'a> {
    kek_id: KekId,
    header: &'a [u8; HEADER_LEN],
    nonce: &'a [u8; NONCE_LEN],
    ciphertext: &'a [u8; CONTENT_KEY_LEN],
    tag: &'a [u8; TAG_LEN],
}

impl WrappedContentKey<'_> {
    /// The KEK this content key is wrapped under; fetch it before opening.
    pub fn kek_id(&self) -> &KekId {
        &self.kek_id
    }

    /// Unwraps the content key with the KEK [`Self::kek_id`] names, for `org`
    /// and `context`.
    pub fn open(
        &self,
        org: &OrgId,
        kek: &SecretBytes,
        context: &[u8],
    ) -> Result<SecretBytes, EnvelopeError> {
        check_context(context)?;
        let cipher = cipher(kek)?;
        let aad = content_key_aad(self.header, org, context);
        let mut content_key = SecretBytes::copy_from(self.ciphertext);
        cipher
            .decrypt_inout_detached(
                &Nonce::from(*self.nonce),
                &aad,
                content_key.expose_mut().into(),
                &Tag::from(*self.tag),
            )
            .map_err(|_| EnvelopeError::NotAuthentic)?;
        Ok(content_key)
    }
}

impl fmt::Debug for WrappedContentKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedContentKey")
            .field("version", &VERSION)
            .field("kek_id", &self.kek_id)
            .finish_non_exhaustive()
    }
}

fn check_context(context: &[u8]) -> Result<(), EnvelopeError> {
    if context.len() > MAX_CONTEXT_BYTES {
        return Err(EnvelopeError::ContextTooLong {
            actual: context.len(),
        });
    }
    Ok(())
}

fn cipher(kek: &SecretBytes) -> Result<Aes256Gcm, EnvelopeError> {
    Aes256Gcm::new_from_slice(kek.expose())
        .map_err(|_| EnvelopeError::KekLength { actual: kek.len() })
}

fn content_key_aad(header: &[u8], org: &OrgId, context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(
        CONTENT_KEY_LABEL.len() + HEADER_LEN + 2 * 8 + OrgId::MAX_LEN + context.len(),
    );
    aad.extend_from_slice(CONTENT_KEY_LABEL);
    aad.extend_from_slice(header);
    push_field(&mut aad, org.as_str().as_bytes());
    push_field(&mut aad, context);
    aad
}

/// Appends `field` with its length as 8 big-endian bytes in front.
fn push_field(out: &mut Vec<u8>, field: &[u8]) {
    // usize is at most 64 bits wide on every target Rust supports: lossless.
    out.extend_from_slice(&(field.len() as u64).to_be_bytes());
    out.extend_from_slice(field);
}

fn fill_random(buf: &mut [u8]) {
    // AWS-LC's RAND_bytes aborts the process rather than return without filling
    // the buffer, so this error cannot occur.
    aws_lc_rs::rand::fill(buf).expect("AWS-LC RAND_bytes never fails without aborting");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn org(name: &str) -> OrgId {
        OrgId::parse(name).unwrap()
    }

    fn kek_id(byte: u8) -> KekId {
        KekId::from_random([byte; 16])
    }

    fn kek(byte: u8) -> SecretBytes {
        SecretBytes::new(vec![byte; KEK_LEN])
    }

    const CONTEXT: &[u8] = b"space:42/meeting-7";

    fn sealed() -> (Vec<u8>, SecretBytes) {
        let ck = new_content_key();
        let blob = seal(&org("acme"), &kek_id(1), &kek(7), CONTEXT, &ck).unwrap();
        (blob, ck)
    }

    #[test]
    fn round_trip() {
        let (blob, ck) = sealed();
        assert_eq!(blob.len(), MAX_WRAPPED_CONTENT_KEY_BYTES);
        assert_eq!(blob[0], VERSION);
        assert_eq!(&blob[1..HEADER_LEN], kek_id(1).as_str().as_bytes());
        let wrapped = parse(&blob).unwrap();
        assert_eq!(wrapped.kek_id(), &kek_id(1));
        let opened = wrapped.open(&org("acme"), &kek(7), CONTEXT).unwrap();
        assert!(opened.ct_eq(&ck));
    }

    #[test]
    fn empty_context_and_longest_context_round_trip() {
        let ck = new_content_key();
        for context in [&[][..], &[0xa5; MAX_CONTEXT_BYTES][..]] {
            let blob = seal(&org("acme"), &kek_id(1), &kek(7), context, &ck).unwrap();
            let opened = parse(&blob)
                .unwrap()
                .open(&org("acme"), &kek(7), context)
                .unwrap();
            assert!(opened.ct_eq(&ck));
        }
    }

    #[test]
    fn each_seal_uses_a_fresh_nonce() {
        let ck = new_content_key();
        let a = seal(&org("acme"), &kek_id(1), &kek(7), CONTEXT, &ck).unwrap();
        let b = seal(&org("acme"), &kek_id(1), &kek(7), CONTEXT, &ck).unwrap();
        assert_ne!(a, b);
        assert!(!new_content_key().ct_eq(&new_content_key()));
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let (blob, _) = sealed();
        for i in 0..blob.len() {
            for bit in 0..8 {
                let mut bad = blob.clone();
                bad[i] ^= 1 << bit;
                let result = parse(&bad).and_then(|w| w.open(&org("acme"), &kek(7), CONTEXT));
                assert!(
                    result.is_err(),
                    "flip of bit {bit} of byte {i} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn truncation_at_every_length_and_extension_are_refused() {
        let (blob, _) = sealed();
        assert_eq!(parse(&[]).unwrap_err(), EnvelopeError::Empty);
        for len in 1..blob.len() {
            assert_eq!(
                parse(&blob[..len]).unwrap_err(),
                EnvelopeError::WrongLength {
                    actual: len,
                    expected: WRAPPED_LEN
                }
            );
        }
        let mut longer = blob.clone();
        longer.push(0);
        assert!(matches!(
            parse(&longer),
            Err(EnvelopeError::WrongLength { actual: 98, .. })
        ));
    }

    #[test]
    fn another_context_org_or_kek_is_refused() {
        let (blob, _) = sealed();
        let wrapped = parse(&blob).unwrap();
        let refused = [
            wrapped.open(&org("acme"), &kek(7), b"space:42/meeting-8"),
            wrapped.open(&org("acme"), &kek(7), b""),
            wrapped.open(&org("acme2"), &kek(7), CONTEXT),
            wrapped.open(&org("acme"), &kek(8), CONTEXT),
        ];
        for result in refused {
            assert_eq!(result.unwrap_err(), EnvelopeError::NotAuthentic);
        }
    }

    #[test]
    fn org_and_context_cannot_trade_bytes() {
        // Without length prefixes ("ab", "c") and ("a", "bc") would share an encoding.
        let ck = new_content_key();
        let blob = seal(&org("ab"), &kek_id(1), &kek(7), b"c", &ck).unwrap();
        let wrapped = parse(&blob).unwrap();
        assert_eq!(
            wrapped.open(&org("a"), &kek(7), b"bc").unwrap_err(),
            EnvelopeError::NotAuthentic
        );
    }

    #[test]
    fn a_header_naming_another_kek_is_refused_even_with_the_right_key() {
        let (mut blob, _) = sealed();
        blob[1..HEADER_LEN].copy_from_slice(kek_id(2).as_str().as_bytes());
        let wrapped = parse(&blob).unwrap();
        assert_eq!(wrapped.kek_id(), &kek_id(2));
        assert_eq!(
            wrapped.open(&org("acme"), &kek(7), CONTEXT).unwrap_err(),
            EnvelopeError::NotAuthentic
        );
    }

    #[test]
    fn unknown_versions_and_bad_kek_ids_are_named() {
        let (blob, _) = sealed();
        for version in [0, 2, 0xff] {
            let mut bad = blob.clone();
            bad[0] = version;
            assert_eq!(
                parse(&bad).unwrap_err(),
                EnvelopeError::UnsupportedVersion(version)
            );
        }
        assert_eq!(
            parse(&[2]).unwrap_err(),
            EnvelopeError::UnsupportedVersion(2)
        );
        for (at, byte) in [(1, b'K'), (5, b'A'), (20, 0xff), (36, b'g')] {
            let mut bad = blob.clone();
            bad[at] = byte;
            assert_eq!(
                parse(&bad).unwrap_err(),
                EnvelopeError::BadKekId,
                "byte {at}"
            );
        }
    }

    #[test]
    fn oversized_context_and_wrong_key_sizes_are_refused() {
        let ck = new_content_key();
        let long = vec![0; MAX_CONTEXT_BYTES + 1];
        assert_eq!(
            seal(&org("acme"), &kek_id(1), &kek(7), &long, &ck).unwrap_err(),
            EnvelopeError::ContextTooLong {
                actual: MAX_CONTEXT_BYTES + 1
            }
        );
        assert_eq!(
            seal(
                &org("acme"),
                &kek_id(1),
                &SecretBytes::zeroed(16),
                CONTEXT,
                &ck
            )
            .unwrap_err(),
            EnvelopeError::KekLength { actual: 16 }
        );
        assert_eq!(
            seal(
                &org("acme"),
                &kek_id(1),
                &kek(7),
                CONTEXT,
                &SecretBytes::zeroed(31)
            )
            .unwrap_err(),
            EnvelopeError::ContentKeyLength { actual: 31 }
        );
        let (blob, _) = sealed();
        let wrapped = parse(&blob).unwrap();
        assert_eq!(
            wrapped.open(&org("acme"), &kek(7), &long).unwrap_err(),
            EnvelopeError::ContextTooLong {
                actual: MAX_CONTEXT_BYTES + 1
            }
        );
        assert_eq!(
            wrapped
                .open(&org("acme"), &SecretBytes::zeroed(33), CONTEXT)
                .unwrap_err(),
            EnvelopeError::KekLength { actual: 33 }
        );
    }

    #[test]
    fn kek_associated_data_binds_org_and_id_unambiguously() {
        let a = kek_associated_data(&org("acme"), &kek_id(1));
        assert_eq!(a, kek_associated_data(&org("acme"), &kek_id(1)));
        assert_ne!(a, kek_associated_data(&org("acme2"), &kek_id(1)));
        assert_ne!(a, kek_associated_data(&org("acme"), &kek_id(2)));
        assert!(a.starts_with(KEK_LABEL));
        assert!(!a.starts_with(CONTENT_KEY_LABEL));
    }

    #[test]
    fn debug_and_errors_show_no_key_bytes() {
        let (blob, _) = sealed();
        let wrapped = parse(&blob).unwrap();
        let printed = format!("{wrapped:?}");
        assert_eq!(
            printed,
            format!(
                "WrappedContentKey {{ version: 1, kek_id: KekId({:?}), .. }}",
                kek_id(1).as_str()
            )
        );
        let message = wrapped
            .open(&org("acme"), &kek(8), CONTEXT)
            .unwrap_err()
            .to_string();
        assert!(message.contains("does not authenticate"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(wrapped) = parse(&bytes) {
                prop_assert!(wrapped.open(&org("acme"), &kek(7), CONTEXT).is_err());
            }
        }

        #[test]
        fn any_changes_to_a_real_blob_are_refused(
            changes in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let (original, _) = sealed();
            let mut blob = original.clone();
            for (at, xor) in changes {
                let at = at.index(blob.len());
                blob[at] ^= xor;
            }
            if truncate {
                blob.truncate(cut.index(blob.len()));
            }
            // Two changes to one byte can cancel out.
            prop_assume!(blob != original);
            let result = parse(&blob).and_then(|w| w.open(&org("acme"), &kek(7), CONTEXT));
            prop_assert!(result.is_err());
        }

        #[test]
        fn well_shaped_forgeries_never_open(
            nonce in any::<[u8; NONCE_LEN]>(),
            body in any::<[u8; CONTENT_KEY_LEN + TAG_LEN]>(),
        ) {
            let mut blob = vec![VERSION];
            blob.extend_from_slice(kek_id(1).as_str().as_bytes());
            blob.extend_from_slice(&nonce);
            blob.extend_from_slice(&body);
            let wrapped = parse(&blob).unwrap();
            prop_assert_eq!(
                wrapped.open(&org("acme"), &kek(7), CONTEXT).unwrap_err(),
                EnvelopeError::NotAuthentic
            );
        }

        #[test]
        fn any_org_and_context_round_trip_and_bind(
            name in "[A-Za-z0-9._-]{1,64}",
            context in proptest::collection::vec(any::<u8>(), 0..300),
            other in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let org = OrgId::parse(&name).unwrap();
            let ck = new_content_key();
            let blob = seal(&org, &kek_id(3), &kek(9), &context, &ck).unwrap();
            let wrapped = parse(&blob).unwrap();
            prop_assert!(wrapped.open(&org, &kek(9), &context).unwrap().ct_eq(&ck));
            if other != context {
                prop_assert_eq!(
                    wrapped.open(&org, &kek(9), &other).unwrap_err(),
                    EnvelopeError::NotAuthentic
                );
            }
        }
    }
}
