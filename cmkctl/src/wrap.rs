//! Wrapping a master key for upload, locally: RSA-OAEP with SHA-256 and
//! MGF1-SHA-256 and no label under the import public key — byte for byte what
//! `openssl pkeyutl -encrypt -pubin -pkeyopt rsa_padding_mode:oaep -pkeyopt
//! rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256` produces, so either tool can be
//! used.
//!
//! The customer keeps the master key: `--generate` writes it to a new file readable
//! only by its owner, and it is never printed. Only its check value is shown.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use cmk_secret::SecretBytes;
use rsa::{
    Oaep, RsaPublicKey,
    pkcs8::{DecodePublicKey, EncodePublicKey},
    rand_core::{OsRng, RngCore},
    traits::PublicKeyParts,
};
use sha2::{Digest, Sha256};

/// Length of a master key: AES-256.
pub const MASTER_KEY_LEN: usize = 32;

/// The smallest import key accepted, in modulus bits.
pub const MIN_MODULUS_BITS: usize = 3072;

/// Why a key could not be wrapped.
#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which input.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The public key file holds no RSA public key.
    #[error(
        "{path} is not an RSA public key in PEM (-----BEGIN PUBLIC KEY-----, as `cmkctl \
         public-key` writes it): {reason}"
    )]
    PublicKey {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The public key is too small to protect a master key.
    #[error(
        "public key {path} is RSA-{bits}; a master key is only wrapped under RSA-3072 or larger"
    )]
    WeakPublicKey {
        /// The file.
        path: PathBuf,
        /// Its modulus size.
        bits: usize,
    },
    /// The key file does not hold exactly 32 bytes.
    #[error(
        "key file {path} is {len} bytes; a master key must be exactly 32 raw bytes (AES-256){hint}"
    )]
    KeyLength {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
        /// A guess at what went wrong, or nothing.
        hint: &'static str,
    },
    /// `--generate` names a file that is already there.
    #[error("{path} already exists; --generate writes a new key file and never replaces one")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// `--out` is the master key's own file.
    #[error("--out {path} is the master key file itself; refusing to overwrite the key")]
    OutIsKey {
        /// The file.
        path: PathBuf,
    },
    /// A file could not be written.
    #[error("cannot write {what} {path}: {source}")]
    Write {
        /// Which output.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The operating system's random number generator failed.
    #[error("the random number generator failed: {0}")]
    Random(#[source] rsa::rand_core::Error),
    /// RSA encryption failed.
    #[error("RSA-OAEP encryption failed: {0}")]
    Encrypt(#[source] rsa::Error),
}

/// An RSA public key of at least [`MIN_MODULUS_BITS`] to wrap master keys under.
#[derive(Clone, Debug)]
pub struct ImportPublicKey {
    key: RsaPublicKey,
    key_id: String,
}

impl ImportPublicKey {
    /// Parses a PEM SubjectPublicKeyInfo, refusing keys under RSA-3072.
    pub fn from_pem(pem: &str, path: &Path) -> Result<Self, WrapError> {
        let key =
            RsaPublicKey::from_public_key_pem(pem.trim()).map_err(|err| WrapError::PublicKey {
                path: path.to_path_buf(),
                reason: err.to_string(),
            })?;
        let bits = key.size() * 8;
        if bits < MIN_MODULUS_BITS {
            return Err(WrapError::WeakPublicKey {
                path: path.to_path_buf(),
                bits,
            });
        }
        // The control plane names its key by the SHA-256 of the DER encoding, which
        // is unique, so re-encoding yields the same bytes it hashed.
        let der = key
            .to_public_key_der()
            .map_err(|err| WrapError::PublicKey {
                path: path.to_path_buf(),
                reason: err.to_string(),
            })?;
        let key_id = hex::encode(Sha256::digest(der.as_bytes()));
        Ok(Self { key, key_id })
    }

    /// Reads and parses a PEM file.
    pub fn read(path: &Path) -> Result<Self, WrapError> {
        let pem = fs::read_to_string(path).map_err(|source| WrapError::Read {
            what: "public key",
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_pem(&pem, path)
    }

    /// The key's id as the control plane reports it: hex SHA-256 of the DER.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Modulus size in bits.
    pub fn bits(&self) -> usize {
        self.key.size() * 8
    }

    /// RSA-OAEP (SHA-256, MGF1-SHA-256, no label) of the master key.
    pub fn wrap(&self, key: &MasterKey) -> Result<Vec<u8>, WrapError> {
        // `Oaep::new` uses the one digest for both the label hash and MGF1.
        self.key
            .encrypt(&mut OsRng, Oaep::new::<Sha256>(), key.0.expose())
            .map_err(WrapError::Encrypt)
    }
}

/// Exactly 32 secret bytes: zeroized on drop, never printed (`SecretBytes`'s
/// `Debug` shows only the length).
#[derive(Debug)]
pub struct MasterKey(SecretBytes);

impl MasterKey {
    /// Takes `bytes` if there are exactly 32 of them.
    pub fn new(bytes: SecretBytes, path: &Path) -> Result<Self, WrapError> {
        if bytes.len() != MASTER_KEY_LEN {
            let hex_text = matches!(bytes.len(), 64 | 65)
                && bytes.expose()[..64].iter().all(u8::is_ascii_hexdigit);
            return Err(WrapError::KeyLength {
                path: path.to_path_buf(),
                len: bytes.len(),
                hint: if hex_text {
                    "; it looks like hex text: convert it with `xxd -r -p`"
                } else {
                    ""
                },
            });
        }
        Ok(Self(bytes))
    }

    /// Reads a key file of exactly 32 raw bytes.
    pub fn read(path: &Path) -> Result<Self, WrapError> {
        let bytes = fs::read(path).map_err(|source| WrapError::Read {
            what: "key file",
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(SecretBytes::new(bytes), path)
    }

    /// 32 bytes from the operating system's random number generator.
    pub fn generate() -> Result<Self, WrapError> {
        let mut bytes = SecretBytes::zeroed(MASTER_KEY_LEN);
        OsRng
            .try_fill_bytes(bytes.expose_mut())
            .map_err(WrapError::Random)?;
        Ok(Self(bytes))
    }

    /// Writes the key to `path`, which must not exist yet, readable only by its owner.
    pub fn create_file(&self, path: &Path) -> Result<(), WrapError> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => WrapError::Exists {
                    path: path.to_path_buf(),
                },
                _ => WrapError::Write {
                    what: "key file",
                    path: path.to_path_buf(),
                    source,
                },
            })?;
        file.write_all(self.0.expose())
            .and_then(|()| file.sync_all())
            .map_err(|source| WrapError::Write {
                what: "key file",
                path: path.to_path_buf(),
                source,
            })
    }

    /// The check value: the leftmost 5 bytes of AES-CMAC over a zero block, in
    /// upper-case hex, as the control plane shows it after upload.
    pub fn check_value(&self) -> String {
        use aes::Aes256;
        use cmac::{Cmac, KeyInit, Mac};
        // A MasterKey is exactly 32 bytes (checked in `new`), an AES-256 key.
        let mut mac = <Cmac<Aes256> as KeyInit>::new_from_slice(self.0.expose())
            .expect("a master key is 32 bytes");
        mac.update(&[0u8; 16]);
        hex::encode_upper(&mac.finalize().into_bytes()[..5])
    }
}

/// Where the master key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// An existing key file.
    File(PathBuf),
    /// A new key, saved to this new file.
    Generate(PathBuf),
}

impl KeySource {
    fn path(&self) -> &Path {
        match self {
            KeySource::File(path) | KeySource::Generate(path) => path,
        }
    }
}

/// What `wrap` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wrapped {
    /// The public key's id.
    pub import_key_id: String,
    /// Its modulus size.
    pub modulus_bits: usize,
    /// Length of the ciphertext written.
    pub wrapped_bytes: usize,
    /// The master key's check value.
    pub key_check_value: String,
}

/// Wraps the master key from `source` under the public key in `public_key` and
/// writes the ciphertext to `out`. Everything is checked before any file is
/// written.
pub fn wrap_to_file(
    public_key: &Path,
    source: &KeySource,
    out: &Path,
) -> Result<Wrapped, WrapError> {
    let public = ImportPublicKey::read(public_key)?;
    if same_file(out, source.path()) {
        return Err(WrapError::OutIsKey {
            path: out.to_path_buf(),
        });
    }
    let key = match source {
        KeySource::File(path) => MasterKey::read(path)?,
        KeySource::Generate(path) => {
            if path.exists() {
                return Err(WrapError::Exists { path: path.clone() });
            }
            MasterKey::generate()?
        }
    };
    let wrapped = public.wrap(&key)?;
    if let KeySource::Generate(path) = source {
        key.create_file(path)?;
    }
    fs::write(out, &wrapped).map_err(|source| WrapError::Write {
        what: "wrapped key",
        path: out.to_path_buf(),
        source,
    })?;
    Ok(Wrapped {
        import_key_id: public.key_id().to_string(),
        modulus_bits: public.bits(),
        wrapped_bytes: wrapped.len(),
        key_check_value: key.check_value(),
    })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt, process::Command, sync::OnceLock};

    use rsa::{
        RsaPrivateKey,
        pkcs8::{EncodePrivateKey, LineEnding},
    };

    use super::*;

    /// One RSA-3072 key for the whole test binary: generating it takes a while.
    fn private_key() -> &'static RsaPrivateKey {
        static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
        KEY.get_or_init(|| RsaPrivateKey::new(&mut OsRng, 3072).expect("RSA-3072 key"))
    }

    fn public_pem(key: &RsaPrivateKey) -> String {
        key.to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("PEM")
    }

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            let files = Self {
                dir: tempfile::tempdir().expect("tempdir"),
            };
            fs::write(files.path("pub.pem"), public_pem(private_key())).expect("write");
            files
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
    }

    #[test]
    fn the_private_key_unwraps_the_32_bytes() {
        let files = Files::new();
        let cmk: Vec<u8> = (0..32).collect();
        fs::write(files.path("cmk.bin"), &cmk).expect("write");
        let wrapped = wrap_to_file(
            &files.path("pub.pem"),
            &KeySource::File(files.path("cmk.bin")),
            &files.path("cmk.wrapped"),
        )
        .expect("wrap");
        assert_eq!(wrapped.modulus_bits, 3072);
        assert_eq!(wrapped.wrapped_bytes, 384);

        let ciphertext = fs::read(files.path("cmk.wrapped")).expect("read");
        let plaintext = private_key()
            .decrypt(Oaep::new::<Sha256>(), &ciphertext)
            .expect("OAEP-SHA-256 decrypts");
        assert_eq!(plaintext, cmk);
    }

    #[test]
    fn openssl_unwraps_what_cmkctl_wraps() {
        let files = Files::new();
        let pem = private_key().to_pkcs8_pem(LineEnding::LF).expect("PEM");
        fs::write(files.path("priv.pem"), pem.as_bytes()).expect("write");
        let wrapped = wrap_to_file(
            &files.path("pub.pem"),
            &KeySource::Generate(files.path("cmk.bin")),
            &files.path("cmk.wrapped"),
        )
        .expect("wrap");

        let output = Command::new("openssl")
            .args(["pkeyutl", "-decrypt", "-inkey"])
            .arg(files.path("priv.pem"))
            .arg("-in")
            .arg(files.path("cmk.wrapped"))
            .args([
                "-pkeyopt",
                "rsa_padding_mode:oaep",
                "-pkeyopt",
                "rsa_oaep_md:sha256",
                "-pkeyopt",
                "rsa_mgf1_md:sha256",
            ])
            .output()
            .expect("the openssl CLI is installed");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            output.stdout,
            fs::read(files.path("cmk.bin")).expect("read")
        );

        // The key id is what `openssl pkey -pubin -outform DER | sha256sum` says.
        let der = Command::new("openssl")
            .args(["pkey", "-pubin", "-outform", "DER", "-in"])
            .arg(files.path("pub.pem"))
            .output()
            .expect("openssl");
        assert!(der.status.success());
        assert_eq!(
            wrapped.import_key_id,
            hex::encode(Sha256::digest(&der.stdout))
        );

        // The check value is what the openssl command of docs/api.md says.
        fs::write(files.path("zero.bin"), [0u8; 16]).expect("write");
        let mac = Command::new("openssl")
            .args(["mac", "-cipher", "AES-256-CBC", "-macopt"])
            .arg(format!(
                "hexkey:{}",
                hex::encode(fs::read(files.path("cmk.bin")).expect("read"))
            ))
            .arg("-in")
            .arg(files.path("zero.bin"))
            .arg("CMAC")
            .output()
            .expect("openssl");
        assert!(
            mac.status.success(),
            "{}",
            String::from_utf8_lossy(&mac.stderr)
        );
        let expected = String::from_utf8(mac.stdout).expect("hex");
        assert_eq!(
            wrapped.key_check_value,
            expected.trim()[..10].to_uppercase()
        );
    }

    #[test]
    fn check_value_matches_the_nist_vector() {
        let key = MasterKey::new(
            SecretBytes::new(
                hex::decode("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
                    .expect("hex"),
            ),
            Path::new("k"),
        )
        .expect("32 bytes");
        assert_eq!(key.check_value(), "1A0B2DF267");
    }

    #[test]
    fn a_31_byte_key_file_is_refused() {
        let files = Files::new();
        fs::write(files.path("short.bin"), [7u8; 31]).expect("write");
        let err = wrap_to_file(
            &files.path("pub.pem"),
            &KeySource::File(files.path("short.bin")),
            &files.path("out"),
        )
        .expect_err("31 bytes");
        assert!(matches!(err, WrapError::KeyLength { len: 31, .. }), "{err}");
        assert!(err.to_string().contains("exactly 32 raw bytes"), "{err}");
        assert!(!files.path("out").exists());
    }

    #[test]
    fn a_hex_key_file_gets_a_hint() {
        let files = Files::new();
        fs::write(files.path("hex.txt"), format!("{}\n", "ab".repeat(32))).expect("write");
        let err = MasterKey::read(&files.path("hex.txt")).expect_err("hex");
        assert!(err.to_string().contains("xxd -r -p"), "{err}");
    }

    #[test]
    fn a_2048_bit_public_key_is_refused() {
        let files = Files::new();
        let small = RsaPrivateKey::new(&mut OsRng, 2048).expect("RSA-2048 key");
        fs::write(files.path("small.pem"), public_pem(&small)).expect("write");
        let err = wrap_to_file(
            &files.path("small.pem"),
            &KeySource::Generate(files.path("cmk.bin")),
            &files.path("out"),
        )
        .expect_err("2048 bits");
        assert!(
            matches!(err, WrapError::WeakPublicKey { bits: 2048, .. }),
            "{err}"
        );
        assert!(!files.path("cmk.bin").exists(), "no key generated");
    }

    #[test]
    fn generate_creates_an_owner_only_file_and_refuses_an_existing_one() {
        let files = Files::new();
        let wrapped = wrap_to_file(
            &files.path("pub.pem"),
            &KeySource::Generate(files.path("cmk.bin")),
            &files.path("cmk.wrapped"),
        )
        .expect("wrap");
        let meta = fs::metadata(files.path("cmk.bin")).expect("key file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let key = MasterKey::read(&files.path("cmk.bin")).expect("read back");
        assert_eq!(wrapped.key_check_value, key.check_value());

        let before = fs::read(files.path("cmk.bin")).expect("read");
        let err = wrap_to_file(
            &files.path("pub.pem"),
            &KeySource::Generate(files.path("cmk.bin")),
            &files.path("other.wrapped"),
        )
        .expect_err("exists");
        assert!(matches!(err, WrapError::Exists { .. }), "{err}");
        assert_eq!(fs::read(files.path("cmk.bin")).expect("read"), before);
        assert!(!files.path("other.wrapped").exists());
    }

    #[test]
    fn out_may_not_be_the_key_file() {
        let files = Files::new();
        fs::write(files.path("cmk.bin"), [1u8; 32]).expect("write");
        let err = wrap_to_file(
            &files.path("pub.pem"),
            &KeySource::File(files.path("cmk.bin")),
            &files.dir.path().join(".").join("cmk.bin"),
        )
        .expect_err("same file");
        assert!(matches!(err, WrapError::OutIsKey { .. }), "{err}");
        assert_eq!(fs::read(files.path("cmk.bin")).expect("read"), [1u8; 32]);
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let key = MasterKey::new(SecretBytes::new(vec![0xAB; 32]), Path::new("k")).expect("key");
        let text = format!("{key:?}");
        assert_eq!(text, "MasterKey(SecretBytes(<redacted 32 bytes>))");
    }
}
