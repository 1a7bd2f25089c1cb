//! Signed audit checkpoints: the one byte form the HSM daemon signs and every
//! verifier checks, so that the daemon signs only checkpoints it builds itself.
//!
//! A checkpoint says "org `org`'s audit chain had `seq` events, the newest
//! with hash `head`, at `time`" (the daemon's own clock). Its signed bytes:
//!
//! ```text
//! "cmk-audit-checkpoint-v1\0"
//! u16 BE length ‖ org (UTF-8)
//! u64 BE seq
//! 32-byte head hash
//! i64 BE time (Unix seconds)
//! ```
//!
//! The signature is ECDSA P-256 with SHA-256, as the fixed 64-byte `r ‖ s`;
//! the key is named by its id, the hex SHA-256 of its SubjectPublicKeyInfo
//! DER. ECDSA P-256 rather than Ed25519 because every PKCS#11 token does it
//! (`CKM_ECDSA` over the SHA-256 digest gives the same 64 bytes).

use aws_lc_rs::{
    digest,
    signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey},
};

const DOMAIN: &[u8] = b"cmk-audit-checkpoint-v1\0";

/// Length of a head hash.
pub const HASH_LEN: usize = 32;
/// Length of a signature: `r ‖ s`.
pub const SIGNATURE_LEN: usize = 64;
/// The longest org id a checkpoint names.
pub const MAX_ORG_LEN: usize = 64;

/// What a checkpoint states.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The organisation whose chain it is.
    pub org: String,
    /// How many events the chain had: the seq of its newest.
    pub seq: u64,
    /// The newest event's hash.
    pub head: [u8; HASH_LEN],
    /// When the daemon signed it, Unix seconds by its clock.
    pub time: i64,
}

impl Checkpoint {
    /// The bytes that are signed.
    pub fn to_signed_bytes(&self) -> Vec<u8> {
        let org = self.org.as_bytes();
        let mut out = Vec::with_capacity(DOMAIN.len() + 2 + org.len() + 8 + HASH_LEN + 8);
        out.extend_from_slice(DOMAIN);
        // Org ids are at most MAX_ORG_LEN bytes; the prefix is checked on use.
        out.extend_from_slice(&u16::try_from(org.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(org);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(&self.time.to_be_bytes());
        out
    }

    /// Whether `signature` is this checkpoint's under the public key
    /// `public_key` (SubjectPublicKeyInfo DER or the uncompressed point).
    pub fn verify(&self, public_key: &[u8], signature: &[u8]) -> bool {
        if self.org.len() > MAX_ORG_LEN || signature.len() != SIGNATURE_LEN {
            return false;
        }
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point(public_key))
            .verify(&self.to_signed_bytes(), signature)
            .is_ok()
    }
}

/// The id of a public key: hex SHA-256 of its SubjectPublicKeyInfo DER.
pub fn key_id(public_key_der: &[u8]) -> String {
    digest::digest(&digest::SHA256, public_key_der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The DER prefix of a P-256 SubjectPublicKeyInfo with an uncompressed point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The uncompressed point of a P-256 public key given as SubjectPublicKeyInfo
/// DER (what aws-lc-rs verifies with); anything else as it is.
fn point(public_key: &[u8]) -> &[u8] {
    public_key
        .strip_prefix(&P256_SPKI_PREFIX[..])
        .unwrap_or(public_key)
}

/// A P-256 public key's SubjectPublicKeyInfo DER from its uncompressed point
/// (65 bytes, `04 ‖ x ‖ y`); `None` for anything else.
pub fn spki_from_point(point: &[u8]) -> Option<Vec<u8>> {
    (point.len() == 65 && point[0] == 4).then(|| [&P256_SPKI_PREFIX[..], point].concat())
}

/// PEM of a SubjectPublicKeyInfo DER.
pub fn public_key_pem(der: &[u8]) -> String {
    pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, der).unwrap_or_default()
}

/// The DER inside a `PUBLIC KEY` PEM; `None` if it is not one.
pub fn public_key_der(pem: &str) -> Option<Vec<u8>> {
    match pem_rfc7468::decode_vec(pem.trim().as_bytes()) {
        Ok(("PUBLIC KEY", der)) => Some(der),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use aws_lc_rs::{
        rand::SystemRandom,
        signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair},
    };

    use super::*;

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            org: "acme".into(),
            seq: 42,
            head: [7; HASH_LEN],
            time: 1_700_000_000,
        }
    }

    #[test]
    fn the_signed_bytes_are_as_documented() {
        let bytes = checkpoint().to_signed_bytes();
        let mut expected = b"cmk-audit-checkpoint-v1\0".to_vec();
        expected.extend_from_slice(&[0, 4]);
        expected.extend_from_slice(b"acme");
        expected.extend_from_slice(&42u64.to_be_bytes());
        expected.extend_from_slice(&[7; 32]);
        expected.extend_from_slice(&1_700_000_000i64.to_be_bytes());
        assert_eq!(bytes, expected);
    }

    #[test]
    fn a_signature_verifies_for_its_checkpoint_and_key_only() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let der = spki_from_point(pair.public_key().as_ref()).unwrap();
        let signed = checkpoint();
        let signature = pair.sign(&rng, &signed.to_signed_bytes()).unwrap();
        assert!(signed.verify(&der, signature.as_ref()));
        assert!(signed.verify(pair.public_key().as_ref(), signature.as_ref()));
        for changed in [
            Checkpoint {
                seq: 41,
                ..checkpoint()
            },
            Checkpoint {
                org: "acmf".into(),
                ..checkpoint()
            },
            Checkpoint {
                head: [8; 32],
                ..checkpoint()
            },
            Checkpoint {
                time: 1,
                ..checkpoint()
            },
        ] {
            assert!(!changed.verify(&der, signature.as_ref()), "{changed:?}");
        }
        let other = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let other =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, other.as_ref()).unwrap();
        assert!(!signed.verify(other.public_key().as_ref(), signature.as_ref()));
        assert!(!signed.verify(&der, &signature.as_ref()[..63]));
    }

    #[test]
    fn pem_round_trips() {
        for len in [1, 2, 3, 64, 91, 200] {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            assert_eq!(public_key_der(&public_key_pem(&der)), Some(der));
        }
        assert_eq!(public_key_der("not pem"), None);
        assert_eq!(key_id(b"").len(), 64);
    }
}
