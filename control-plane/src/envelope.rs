//! The wire format of wrapped content keys, and the associated data that binds a
//! KEK wrapped by the HSM daemon to its org and id.
//!
//! A wrapped content key (CK) is self-describing and authenticated with the
//! caller's context as associated data. New content keys are written in format
//! 2; format 1, written before, is still read:
//!
//! ```text
//! format 2                                format 1
//! offset  length  field                   offset  length  field
//! 0       1       version (2)             0       1       version (1)
//! 1       36      KEK id                  1       36      KEK id
//! 37      32      random salt             37      12      random nonce
//! 69      32      AES-256-GCM ciphertext  49      32      AES-256-GCM ciphertext
//! 101     16      GCM tag                 81      16      GCM tag
//! ```
//!
//! The KEK id is ASCII, "kek-" and 32 lower-case hex characters, in clear so
//! that [`parse`] can name the KEK to fetch (and unwrap through the HSM daemon)
//! before anything is decrypted.
//!
//! Format 1 encrypts under the KEK itself with a random 96-bit nonce, so one
//! KEK may wrap at most 2^32 content keys (NIST SP 800-38D §8.3), and KEKs
//! live for ever (rotation re-wraps the same KEK bytes): a hot resource could
//! exhaust that budget. Format 2 encrypts each content key under a key of its
//! own, HKDF-SHA-256 of the KEK with the blob's random 256-bit salt (and the
//! KEK id as info), so no key ever encrypts twice and the all-zero nonce is
//! safe; two salts collide with probability about n²/2^257.
//!
//! The GCM associated data is a label naming the format, the header (version,
//! KEK id and, in format 2, the salt), the org id and the context, each
//! variable field length-prefixed, so that no two (org, context) pairs share
//! an encoding and no header byte can be changed without the tag failing. A
//! CK copied to another org, or opened with another context, does not
//! authenticate.

use std::fmt;

use aes_gcm::{
    Aes256Gcm, Nonce, Tag,
    aead::{AeadInOut, KeyInit},
};
use aws_lc_rs::hkdf;
use cmk_control_plane_domain::{KekId, OrgId};
use cmk_secret::SecretBytes;

/// The format version new content keys are written in.
pub const VERSION: u8 = 2;
/// Length of a content key: AES-256.
pub const CONTENT_KEY_LEN: usize = 32;
/// Length of a KEK: AES-256.
pub const KEK_LEN: usize = 32;
/// The longest context accepted as associated data.
pub const MAX_CONTEXT_BYTES: usize = 4096;
/// The longest wrapped content key of any version this build reads (a format
/// 2 key is exactly this long). Input longer than this can be refused unread.
pub const MAX_WRAPPED_CONTENT_KEY_BYTES: usize = Format::V2.wrapped_len();

const NONCE_LEN: usize = 12;
const SALT_LEN: usize = 32;
const TAG_LEN: usize = 16;

// The labels end in NUL and contain no other, so none is a prefix of another:
// a KEK's associated data can never be read as a CK's, nor one format's as
// the other's.
const CONTENT_KEY_LABEL_V1: &[u8] = b"cmk/content-key/v1\0";
const CONTENT_KEY_LABEL_V2: &[u8] = b"cmk/content-key/v2\0";
const KEK_LABEL: &[u8] = b"cmk/kek/v1\0";
/// HKDF info of a format 2 content key's own key, followed by the KEK id.
const KEY_INFO_V2: &[u8] = b"cmk/content-key/v2/key\0";

/// A format of wrapped content keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// Under the KEK itself, with a random nonce.
    V1,
    /// Under a key derived from the KEK and a random salt, one per content key.
    V2,
}

impl Format {
    fn of(version: u8) -> Option<Self> {
        match version {
            1 => Some(Self::V1),
            2 => Some(Self::V2),
            _ => None,
        }
    }

    const fn version(self) -> u8 {
        match self {
            Self::V1 => 1,
            Self::V2 => 2,
        }
    }

    /// Version, KEK id and what the format puts before the ciphertext.
    const fn header_len(self) -> usize {
        1 + KekId::LEN
            + match self {
                Self::V1 => NONCE_LEN,
                Self::V2 => SALT_LEN,
            }
    }

    const fn wrapped_len(self) -> usize {
        self.header_len() + CONTENT_KEY_LEN + TAG_LEN
    }

    fn label(self) -> &'static [u8] {
        match self {
            Self::V1 => CONTENT_KEY_LABEL_V1,
            Self::V2 => CONTENT_KEY_LABEL_V2,
        }
    }

    /// The cipher and nonce that encrypt the content key whose header (up to
    /// the ciphertext) is `header`, under `kek`.
    fn cipher(
        self,
        kek: &SecretBytes,
        header: &[u8],
    ) -> Result<(Aes256Gcm, [u8; NONCE_LEN]), EnvelopeError> {
        if kek.len() != KEK_LEN {
            return Err(EnvelopeError::KekLength { actual: kek.len() });
        }
        let after_id = &header[1 + KekId::LEN..];
        match self {
            Self::V1 => {
                let mut nonce = [0; NONCE_LEN];
                nonce.copy_from_slice(after_id);
                Ok((aes(kek)?, nonce))
            }
            Self::V2 => {
                let mut key = SecretBytes::zeroed(KEK_LEN);
                let info = [KEY_INFO_V2, &header[1..1 + KekId::LEN]];
                hkdf::Salt::new(hkdf::HKDF_SHA256, after_id)
                    .extract(kek.expose())
                    .expand(&info, hkdf::HKDF_SHA256)
                    .and_then(|okm| okm.fill(key.expose_mut()))
                    // SHA-256's output is the 32 bytes asked for.
                    .map_err(|_| EnvelopeError::KekLength { actual: kek.len() })?;
                // The key encrypts this one content key only.
                Ok((aes(&key)?, [0; NONCE_LEN]))
            }
        }
    }
}

/// Why a content key could not be wrapped or unwrapped. No variant carries key
/// bytes, so every message is safe to log and to return.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The caller sent no bytes.
    #[error("wrapped content key is empty")]
    Empty,
    /// The first byte names a format this build does not read.
    #[error("wrapped content key has format version {0}; only versions 1 and 2 are supported")]
    UnsupportedVersion(u8),
    /// Truncated or padded: not the length its version prescribes.
    #[error(
        "wrapped content key is {actual} bytes; format version {version} is exactly {expected}"
    )]
    WrongLength {
        /// The version it names.
        version: u8,
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
/// `context` as associated data, in format 2.
pub fn seal(
    org: &OrgId,
    kek_id: &KekId,
    kek: &SecretBytes,
    context: &[u8],
    content_key: &SecretBytes,
) -> Result<Vec<u8>, EnvelopeError> {
    seal_as(Format::V2, org, kek_id, kek, context, content_key)
}

fn seal_as(
    format: Format,
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
    let mut out = Vec::with_capacity(format.wrapped_len());
    out.push(format.version());
    out.extend_from_slice(kek_id.as_str().as_bytes());
    // The nonce (format 1) or the salt (format 2).
    let mut random = [0; SALT_LEN];
    let random = &mut random[..format.header_len() - out.len()];
    fill_random(random);
    out.extend_from_slice(random);
    let (cipher, nonce) = format.cipher(kek, &out)?;
    let aad = content_key_aad(format, &out, org, context);
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
    let format = Format::of(version).ok_or(EnvelopeError::UnsupportedVersion(version))?;
    if blob.len() != format.wrapped_len() {
        return Err(EnvelopeError::WrongLength {
            version,
            actual: blob.len(),
            expected: format.wrapped_len(),
        });
    }
    let (header, rest) = blob.split_at(format.header_len());
    // The length was checked above, so the split always succeeds.
    let (ciphertext, tag) = rest
        .split_first_chunk::<CONTENT_KEY_LEN>()
        .and_then(|(ciphertext, tag)| Some((ciphertext, <&[u8; TAG_LEN]>::try_from(tag).ok()?)))
        .ok_or(EnvelopeError::WrongLength {
            version,
            actual: blob.len(),
            expected: format.wrapped_len(),
        })?;
    let kek_id = std::str::from_utf8(&header[1..1 + KekId::LEN])
        .ok()
        .and_then(|id| KekId::parse(id).ok())
        .ok_or(EnvelopeError::BadKekId)?;
    Ok(WrappedContentKey {
        format,
        kek_id,
        header,
        ciphertext,
        tag,
    })
}

/// A wrapped content key whose shape has been checked, borrowed from the bytes
/// it was parsed from.
pub struct WrappedContentKey<'a> {
    format: Format,
    kek_id: KekId,
    header: &'a [u8],
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
        let (cipher, nonce) = self.format.cipher(kek, self.header)?;
        let aad = content_key_aad(self.format, self.header, org, context);
        let mut content_key = SecretBytes::copy_from(self.ciphertext);
        cipher
            .decrypt_inout_detached(
                &Nonce::from(nonce),
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
            .field("version", &self.format.version())
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

fn aes(key: &SecretBytes) -> Result<Aes256Gcm, EnvelopeError> {
    Aes256Gcm::new_from_slice(key.expose())
        .map_err(|_| EnvelopeError::KekLength { actual: key.len() })
}

fn content_key_aad(format: Format, header: &[u8], org: &OrgId, context: &[u8]) -> Vec<u8> {
    let label = format.label();
    // Format 1 binds version and KEK id (its nonce is GCM's own input); format
    // 2 the salt too.
    let header = match format {
        Format::V1 => &header[..1 + KekId::LEN],
        Format::V2 => header,
    };
    let mut aad =
        Vec::with_capacity(label.len() + header.len() + 2 * 8 + OrgId::MAX_LEN + context.len());
    aad.extend_from_slice(label);
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

    const FORMATS: [Format; 2] = [Format::V1, Format::V2];

    fn sealed_as(format: Format) -> (Vec<u8>, SecretBytes) {
        let ck = new_content_key();
        let blob = seal_as(format, &org("acme"), &kek_id(1), &kek(7), CONTEXT, &ck).unwrap();
        (blob, ck)
    }

    fn sealed() -> (Vec<u8>, SecretBytes) {
        sealed_as(Format::V2)
    }

    fn format() -> impl Strategy<Value = Format> {
        prop_oneof![Just(Format::V1), Just(Format::V2)]
    }

    #[test]
    fn round_trip() {
        let (blob, ck) = sealed();
        assert_eq!(blob.len(), MAX_WRAPPED_CONTENT_KEY_BYTES);
        assert_eq!(blob.len(), 117);
        assert_eq!(blob[0], VERSION);
        assert_eq!(&blob[1..37], kek_id(1).as_str().as_bytes());
        let wrapped = parse(&blob).unwrap();
        assert_eq!(wrapped.kek_id(), &kek_id(1));
        let opened = wrapped.open(&org("acme"), &kek(7), CONTEXT).unwrap();
        assert!(opened.ct_eq(&ck));
    }

    /// Format 1, as written before format 2: still read.
    #[test]
    fn format_1_still_opens() {
        let (blob, ck) = sealed_as(Format::V1);
        assert_eq!(blob.len(), 97);
        assert_eq!(blob[0], 1);
        let wrapped = parse(&blob).unwrap();
        assert_eq!(wrapped.kek_id(), &kek_id(1));
        assert!(
            wrapped
                .open(&org("acme"), &kek(7), CONTEXT)
                .unwrap()
                .ct_eq(&ck)
        );
        assert_eq!(
            format!("{wrapped:?}"),
            format!(
                "WrappedContentKey {{ version: 1, kek_id: KekId({:?}), .. }}",
                kek_id(1).as_str()
            )
        );
    }

    /// Format 2 decrypted by hand, from its definition in the module docs:
    /// HKDF-SHA-256 (RFC 5869, written out with HMAC here) of the KEK with the
    /// blob's salt and the labelled KEK id, then AES-256-GCM with a zero nonce.
    #[test]
    fn format_2_is_what_the_documentation_says() {
        use aws_lc_rs::hmac;
        let (blob, ck) = sealed();
        let (header, rest) = blob.split_at(69);
        let salt = &header[37..];
        let prk = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, salt), kek(7).expose());
        let mut info = KEY_INFO_V2.to_vec();
        info.extend_from_slice(kek_id(1).as_str().as_bytes());
        info.push(1);
        let okm = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, prk.as_ref()), &info);
        let mut aad = b"cmk/content-key/v2\0".to_vec();
        aad.extend_from_slice(header);
        aad.extend_from_slice(&4u64.to_be_bytes());
        aad.extend_from_slice(b"acme");
        aad.extend_from_slice(&(CONTEXT.len() as u64).to_be_bytes());
        aad.extend_from_slice(CONTEXT);
        let mut body = rest[..32].to_vec();
        Aes256Gcm::new_from_slice(okm.as_ref())
            .unwrap()
            .decrypt_inout_detached(
                &Nonce::from([0; 12]),
                &aad,
                body.as_mut_slice().into(),
                &Tag::from(<[u8; 16]>::try_from(&rest[32..]).unwrap()),
            )
            .unwrap();
        assert_eq!(body, ck.expose());
    }

    /// Each content key has a key of its own: the same content key sealed
    /// twice under one KEK shares no salt and no ciphertext.
    #[test]
    fn format_2_salts_and_keys_differ_per_content_key() {
        let ck = new_content_key();
        let a = seal(&org("acme"), &kek_id(1), &kek(7), CONTEXT, &ck).unwrap();
        let b = seal(&org("acme"), &kek_id(1), &kek(7), CONTEXT, &ck).unwrap();
        assert_ne!(a[37..69], b[37..69]);
        assert_ne!(a[69..101], b[69..101]);
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
        for format in FORMATS {
            every_bit_flip_of(format);
        }
    }

    fn every_bit_flip_of(format: Format) {
        let (blob, _) = sealed_as(format);
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
        assert_eq!(parse(&[]).unwrap_err(), EnvelopeError::Empty);
        for format in FORMATS {
            let (blob, _) = sealed_as(format);
            let version = format.version();
            for len in 1..blob.len() {
                assert_eq!(
                    parse(&blob[..len]).unwrap_err(),
                    EnvelopeError::WrongLength {
                        version,
                        actual: len,
                        expected: blob.len(),
                    }
                );
            }
            let mut longer = blob.clone();
            longer.push(0);
            assert_eq!(
                parse(&longer).unwrap_err(),
                EnvelopeError::WrongLength {
                    version,
                    actual: blob.len() + 1,
                    expected: blob.len(),
                }
            );
        }
    }

    #[test]
    fn another_context_org_or_kek_is_refused() {
        for format in FORMATS {
            another_context_org_or_kek_is_refused_in(format);
        }
    }

    fn another_context_org_or_kek_is_refused_in(format: Format) {
        let (blob, _) = sealed_as(format);
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
        for format in FORMATS {
            let (mut blob, _) = sealed_as(format);
            blob[1..37].copy_from_slice(kek_id(2).as_str().as_bytes());
            let wrapped = parse(&blob).unwrap();
            assert_eq!(wrapped.kek_id(), &kek_id(2));
            assert_eq!(
                wrapped.open(&org("acme"), &kek(7), CONTEXT).unwrap_err(),
                EnvelopeError::NotAuthentic
            );
        }
    }

    /// A format 1 blob relabelled as format 2 (or back) cannot open: the
    /// lengths differ, and were they made to match, the labels would.
    #[test]
    fn a_blob_relabelled_as_the_other_format_is_refused() {
        let (mut v1, _) = sealed_as(Format::V1);
        v1[0] = 2;
        assert!(matches!(
            parse(&v1),
            Err(EnvelopeError::WrongLength { version: 2, .. })
        ));
        let (mut v2, _) = sealed_as(Format::V2);
        v2[0] = 1;
        assert!(matches!(
            parse(&v2),
            Err(EnvelopeError::WrongLength { version: 1, .. })
        ));
    }

    #[test]
    fn unknown_versions_and_bad_kek_ids_are_named() {
        let (blob, _) = sealed();
        for version in [0, 3, 0xff] {
            let mut bad = blob.clone();
            bad[0] = version;
            assert_eq!(
                parse(&bad).unwrap_err(),
                EnvelopeError::UnsupportedVersion(version)
            );
        }
        assert_eq!(
            parse(&[3]).unwrap_err(),
            EnvelopeError::UnsupportedVersion(3)
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
        assert!(!a.starts_with(CONTENT_KEY_LABEL_V1) && !a.starts_with(CONTENT_KEY_LABEL_V2));
    }

    #[test]
    fn debug_and_errors_show_no_key_bytes() {
        let (blob, _) = sealed();
        let wrapped = parse(&blob).unwrap();
        let printed = format!("{wrapped:?}");
        assert_eq!(
            printed,
            format!(
                "WrappedContentKey {{ version: 2, kek_id: KekId({:?}), .. }}",
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
            format in format(),
            changes in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let (original, _) = sealed_as(format);
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
            format in format(),
            random in any::<[u8; SALT_LEN]>(),
            body in any::<[u8; CONTENT_KEY_LEN + TAG_LEN]>(),
        ) {
            let mut blob = vec![format.version()];
            blob.extend_from_slice(kek_id(1).as_str().as_bytes());
            blob.extend_from_slice(&random[..format.header_len() - blob.len()]);
            blob.extend_from_slice(&body);
            let wrapped = parse(&blob).unwrap();
            prop_assert_eq!(
                wrapped.open(&org("acme"), &kek(7), CONTEXT).unwrap_err(),
                EnvelopeError::NotAuthentic
            );
        }

        #[test]
        fn any_org_and_context_round_trip_and_bind(
            format in format(),
            name in "[A-Za-z0-9._-]{1,64}",
            context in proptest::collection::vec(any::<u8>(), 0..300),
            other in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let org = OrgId::parse(&name).unwrap();
            let ck = new_content_key();
            let blob = seal_as(format, &org, &kek_id(3), &kek(9), &context, &ck).unwrap();
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
