//! The RSA key customers wrap their CMK under before uploading it.
//!
//! Decryption is aws-lc-rs's constant-time RSA-OAEP. The `rsa` crate is used only
//! for public-key work (PEM encoding): every released version of it has an
//! unfixed timing side channel in private-key operations (RUSTSEC-2023-0071,
//! "Marvin"), which would let a caller who can time `Import` recover CMKs.

use aws_lc_rs::{
    encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der},
    rsa::{
        KeySize, OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey,
        PrivateDecryptingKey,
    },
};
use cmk_secret::SecretBytes;
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey, LineEnding};
use sha2::{Digest, Sha256};

use crate::{CMK_LEN, CustodyError, ImportError};

/// The one import algorithm, named as AWS KMS names it.
pub const IMPORT_ALGORITHM: &str = "RSAES_OAEP_SHA_256";

/// Modulus size of a newly generated import key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImportKeyBits {
    /// RSA-3072 (128-bit security), the default.
    #[default]
    Rsa3072,
    /// RSA-4096.
    Rsa4096,
}

impl ImportKeyBits {
    /// From a bit count; only 3072 and 4096 are offered.
    pub fn from_bits(bits: u32) -> Option<Self> {
        match bits {
            3072 => Some(Self::Rsa3072),
            4096 => Some(Self::Rsa4096),
            _ => None,
        }
    }

    /// The bit count.
    pub fn bits(self) -> u32 {
        match self {
            Self::Rsa3072 => 3072,
            Self::Rsa4096 => 4096,
        }
    }
}

/// The public half, as handed to customers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportPublicKey {
    /// PEM `PUBLIC KEY` (SubjectPublicKeyInfo).
    pub pem: String,
    /// Lower-case hex SHA-256 of the DER SubjectPublicKeyInfo; reproducible with
    /// `openssl pkey -pubin -in pub.pem -outform DER | sha256sum`.
    pub key_id: String,
    /// Modulus size.
    pub bits: u32,
}

/// The RSA import key pair.
pub struct ImportKey {
    // Kept beside its OAEP view, which cannot hand it back for PKCS#8 encoding.
    key: PrivateDecryptingKey,
    private: OaepPrivateDecryptingKey,
    public: ImportPublicKey,
}

impl std::fmt::Debug for ImportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl ImportKey {
    /// Generates a new key pair.
    pub fn generate(bits: ImportKeyBits) -> Result<Self, CustodyError> {
        let size = match bits {
            ImportKeyBits::Rsa3072 => KeySize::Rsa3072,
            ImportKeyBits::Rsa4096 => KeySize::Rsa4096,
        };
        let private = PrivateDecryptingKey::generate(size)
            .map_err(|_| CustodyError::Crypto("RSA key generation failed"))?;
        Self::new(private)
    }

    /// Loads a key pair from its PKCS#8 DER encoding.
    pub fn from_pkcs8(der: &SecretBytes) -> Result<Self, CustodyError> {
        let private = PrivateDecryptingKey::from_pkcs8(der.expose())
            .map_err(|_| CustodyError::Crypto("stored import key is not a valid RSA key"))?;
        Self::new(private)
    }

    fn new(private: PrivateDecryptingKey) -> Result<Self, CustodyError> {
        let spki = AsDer::<PublicKeyX509Der>::as_der(&private.public_key())
            .map_err(|_| CustodyError::Crypto("cannot encode the import public key"))?;
        let pem = rsa::RsaPublicKey::from_public_key_der(spki.as_ref())
            .and_then(|key| key.to_public_key_pem(LineEnding::LF))
            .map_err(|_| CustodyError::Crypto("cannot encode the import public key"))?;
        let public = ImportPublicKey {
            pem,
            key_id: hex::encode(Sha256::digest(spki.as_ref())),
            bits: u32::try_from(private.key_size_bits())
                .map_err(|_| CustodyError::Crypto("RSA modulus size out of range"))?,
        };
        let oaep = OaepPrivateDecryptingKey::new(private.clone())
            .map_err(|_| CustodyError::Crypto("RSA key unusable for OAEP"))?;
        Ok(Self {
            key: private,
            private: oaep,
            public,
        })
    }

    /// The PKCS#8 DER encoding of the private key, for sealing at rest.
    pub fn to_pkcs8(&self) -> Result<SecretBytes, CustodyError> {
        // `Pkcs8V1Der` wipes its own buffer when dropped; the copy is a SecretBytes.
        let der = AsDer::<Pkcs8V1Der>::as_der(&self.key)
            .map_err(|_| CustodyError::Crypto("cannot encode the import key"))?;
        Ok(SecretBytes::copy_from(der.as_ref()))
    }

    /// The public half.
    pub fn public(&self) -> &ImportPublicKey {
        &self.public
    }

    /// Recovers the 32-byte CMK from an RSA-OAEP (SHA-256, MGF1-SHA-256)
    /// ciphertext, or says precisely why not.
    ///
    /// A ciphertext that fails with SHA-256 is tried once more with SHA-1, the
    /// OpenSSL default and the most common mistake, so that the admin is told to
    /// fix the padding parameters. This reveals only whether a ciphertext is valid
    /// SHA-1 OAEP, which — like the SHA-256 validity any import reveals — an
    /// IND-CCA2-secure scheme tolerates; both decryptions are constant-time.
    pub fn decrypt_cmk(&self, wrapped: &[u8]) -> Result<SecretBytes, ImportError> {
        let expected = self.private.key_size_bytes();
        if wrapped.is_empty() {
            return Err(ImportError::Empty);
        }
        if wrapped.len() != expected {
            return Err(ImportError::CiphertextLength {
                actual: wrapped.len(),
                expected,
                bits: self.private.key_size_bits(),
            });
        }
        let mut out = SecretBytes::zeroed(self.private.min_output_size());
        if let Ok(plain) =
            self.private
                .decrypt(&OAEP_SHA256_MGF1SHA256, wrapped, out.expose_mut(), None)
        {
            let len = plain.len();
            out.truncate(len);
            return if len == CMK_LEN {
                Ok(out)
            } else {
                Err(ImportError::KeyLength { actual: len })
            };
        }
        let mut probe = SecretBytes::zeroed(self.private.min_output_size());
        if self
            .private
            .decrypt(&OAEP_SHA1_MGF1SHA1, wrapped, probe.expose_mut(), None)
            .is_ok()
        {
            return Err(ImportError::OaepSha1);
        }
        Err(ImportError::Undecryptable {
            key_id: self.public.key_id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::{Oaep, RsaPublicKey};

    fn encrypt(public: &ImportPublicKey, oaep: Oaep, plaintext: &[u8]) -> Vec<u8> {
        let key = RsaPublicKey::from_public_key_pem(&public.pem).expect("pem");
        key.encrypt(&mut rsa::rand_core::OsRng, oaep, plaintext)
            .expect("encrypt")
    }

    #[cfg(feature = "contract")]
    #[test]
    fn decrypts_and_diagnoses() {
        let key = ImportKey::generate(ImportKeyBits::Rsa3072).expect("keygen");
        assert_eq!(key.public().bits, 3072);
        let sha256 = || Oaep::new::<Sha256>();

        let cmk = [0x5A; 32];
        let ok = key
            .decrypt_cmk(&encrypt(key.public(), sha256(), &cmk))
            .expect("decrypt");
        assert_eq!(ok.expose(), &cmk);

        for len in [31, 33] {
            let err = key
                .decrypt_cmk(&encrypt(key.public(), sha256(), &vec![1; len]))
                .expect_err("wrong length");
            assert!(matches!(err, ImportError::KeyLength { actual } if actual == len));
        }
        let sha1 = Oaep::new::<sha1::Sha1>();
        assert!(matches!(
            key.decrypt_cmk(&encrypt(key.public(), sha1, &cmk)),
            Err(ImportError::OaepSha1)
        ));
        assert!(matches!(key.decrypt_cmk(&[]), Err(ImportError::Empty)));
        assert!(matches!(
            key.decrypt_cmk(&[7; 384]),
            Err(ImportError::Undecryptable { .. })
        ));
        let other = ImportKey::generate(ImportKeyBits::Rsa3072).expect("keygen");
        assert!(matches!(
            key.decrypt_cmk(&encrypt(other.public(), sha256(), &cmk)),
            Err(ImportError::Undecryptable { .. })
        ));
    }

    #[test]
    fn survives_pkcs8_round_trip() {
        let key = ImportKey::generate(ImportKeyBits::Rsa3072).expect("keygen");
        let again = ImportKey::from_pkcs8(&key.to_pkcs8().expect("der")).expect("load");
        assert_eq!(again.public(), key.public());
    }
}
