//! The ciphertexts of one secret under an AWS key reference, and their byte form.
//!
//! Format version 1, all lengths big-endian:
//!
//! ```text
//! version: u8 = 1
//! flags:   u8        bit 0: a backup ciphertext follows; bit 1: the
//!                    encryption context holds the key's org (`cmk:org`),
//!                    as everything wrapped since keys were bound does;
//!                    other bits zero
//! len:     u16       1..=6144
//! primary: [u8; len] the KMS ciphertext blob under the primary key
//! (len: u16, backup: [u8; len])   only when flag bit 0 is set
//! ```
//!
//! Nothing may follow. The KMS blobs are opaque: KMS authenticates them, and a
//! tampered blob fails at Decrypt. This format only has to be decoded without
//! panicking, allocating more than its input, or accepting trailing bytes.

use std::fmt;

/// KMS's limit on a ciphertext blob.
pub const MAX_BLOB_LEN: usize = 6144;

const VERSION: u8 = 1;
const FLAG_BACKUP: u8 = 0b1;
const FLAG_ORG_CONTEXT: u8 = 0b10;

/// What KMS Encrypt returned for one secret: the ciphertext under the primary
/// key and, when a backup key is configured, the ciphertext under the backup.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedByAws {
    primary: Vec<u8>,
    backup: Option<Vec<u8>>,
    org_in_context: bool,
}

/// Why bytes are not a [`WrappedByAws`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WrappedError {
    /// Zero bytes.
    #[error("AWS KMS ciphertext is empty")]
    Empty,
    /// A format version this code does not know.
    #[error("AWS KMS ciphertext has format version {0}, but only version {VERSION} is supported")]
    Version(u8),
    /// Flag bits this code does not know.
    #[error("AWS KMS ciphertext has unknown flags {0:#04x}")]
    Flags(u8),
    /// The bytes end inside a field.
    #[error("AWS KMS ciphertext is truncated")]
    Truncated,
    /// A blob of zero length or longer than KMS produces.
    #[error("AWS KMS ciphertext blob of {0} bytes; KMS blobs are 1 to {MAX_BLOB_LEN} bytes")]
    BlobLength(usize),
    /// Bytes after the last field.
    #[error("AWS KMS ciphertext has {0} unexpected trailing bytes")]
    Trailing(usize),
}

impl WrappedByAws {
    /// Checks the blobs' lengths against KMS's.
    pub fn new(primary: Vec<u8>, backup: Option<Vec<u8>>) -> Result<Self, WrappedError> {
        for blob in std::iter::once(&primary).chain(&backup) {
            if blob.is_empty() || blob.len() > MAX_BLOB_LEN {
                return Err(WrappedError::BlobLength(blob.len()));
            }
        }
        Ok(Self {
            primary,
            backup,
            org_in_context: false,
        })
    }

    /// The same, marked as encrypted under a context that names the key's
    /// org, which decryption must then present again. The flag only says
    /// which context to present: KMS authenticates the context, so clearing
    /// or setting it makes the ciphertext fail to decrypt, never open under a
    /// weaker binding.
    pub fn with_org_in_context(mut self, org_in_context: bool) -> Self {
        self.org_in_context = org_in_context;
        self
    }

    /// Whether the encryption context names the key's org.
    pub fn org_in_context(&self) -> bool {
        self.org_in_context
    }

    /// The ciphertext under the primary key.
    pub fn primary(&self) -> &[u8] {
        &self.primary
    }

    /// The ciphertext under the backup key, if one was configured at wrap time.
    pub fn backup(&self) -> Option<&[u8]> {
        self.backup.as_deref()
    }

    /// The version 1 byte form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let backup_len = self.backup.as_ref().map_or(0, |b| 2 + b.len());
        let mut out = Vec::with_capacity(4 + self.primary.len() + backup_len);
        out.push(VERSION);
        let mut flags = 0;
        if self.backup.is_some() {
            flags |= FLAG_BACKUP;
        }
        if self.org_in_context {
            flags |= FLAG_ORG_CONTEXT;
        }
        out.push(flags);
        for blob in std::iter::once(&self.primary).chain(&self.backup) {
            // `new` bounded every blob by MAX_BLOB_LEN, which fits in a u16.
            let len = u16::try_from(blob.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(blob);
        }
        out
    }

    /// Decodes untrusted bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WrappedError> {
        let (&version, rest) = bytes.split_first().ok_or(WrappedError::Empty)?;
        if version != VERSION {
            return Err(WrappedError::Version(version));
        }
        let (&flags, mut rest) = rest.split_first().ok_or(WrappedError::Truncated)?;
        if flags & !(FLAG_BACKUP | FLAG_ORG_CONTEXT) != 0 {
            return Err(WrappedError::Flags(flags));
        }
        let primary = take_blob(&mut rest)?;
        let backup = if flags & FLAG_BACKUP != 0 {
            Some(take_blob(&mut rest)?)
        } else {
            None
        };
        if !rest.is_empty() {
            return Err(WrappedError::Trailing(rest.len()));
        }
        Ok(Self {
            primary,
            backup,
            org_in_context: flags & FLAG_ORG_CONTEXT != 0,
        })
    }
}

/// Reads one length-prefixed blob off the front of `rest`.
fn take_blob(rest: &mut &[u8]) -> Result<Vec<u8>, WrappedError> {
    let (len, tail) = rest
        .split_first_chunk::<2>()
        .ok_or(WrappedError::Truncated)?;
    let len = usize::from(u16::from_be_bytes(*len));
    if len == 0 || len > MAX_BLOB_LEN {
        return Err(WrappedError::BlobLength(len));
    }
    let (blob, tail) = tail.split_at_checked(len).ok_or(WrappedError::Truncated)?;
    *rest = tail;
    Ok(blob.to_vec())
}

/// The blobs are not secret, but long and meaningless to a reader: only their
/// lengths are printed.
impl fmt::Debug for WrappedByAws {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedByAws")
            .field("primary_len", &self.primary.len())
            .field("backup_len", &self.backup.as_ref().map(Vec::len))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn wrapped(primary: &[u8], backup: Option<&[u8]>) -> WrappedByAws {
        WrappedByAws::new(primary.to_vec(), backup.map(<[u8]>::to_vec)).expect("valid lengths")
    }

    #[test]
    fn the_byte_form_is_as_documented() {
        assert_eq!(wrapped(&[7, 8], None).to_bytes(), [1, 0, 0, 2, 7, 8]);
        assert_eq!(
            wrapped(&[7], Some(&[9, 9, 9])).to_bytes(),
            [1, 1, 0, 1, 7, 0, 3, 9, 9, 9]
        );
        let bound = wrapped(&[7], Some(&[9])).with_org_in_context(true);
        assert_eq!(bound.to_bytes(), [1, 3, 0, 1, 7, 0, 1, 9]);
        assert_eq!(WrappedByAws::from_bytes(&bound.to_bytes()), Ok(bound));
    }

    #[test]
    fn malformed_bytes_are_refused_with_the_reason() {
        let cases: &[(&[u8], WrappedError)] = &[
            (&[], WrappedError::Empty),
            (&[2, 0, 0, 1, 7], WrappedError::Version(2)),
            (&[1], WrappedError::Truncated),
            (&[1, 4, 0, 1, 7], WrappedError::Flags(4)),
            (&[1, 0, 0], WrappedError::Truncated),
            (&[1, 0, 0, 0], WrappedError::BlobLength(0)),
            (&[1, 0, 0x18, 0x01], WrappedError::BlobLength(6145)),
            (&[1, 0, 0, 2, 7], WrappedError::Truncated),
            (&[1, 1, 0, 1, 7], WrappedError::Truncated),
            (&[1, 1, 0, 1, 7, 0, 2, 1], WrappedError::Truncated),
            (&[1, 0, 0, 1, 7, 0], WrappedError::Trailing(1)),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                WrappedByAws::from_bytes(bytes).as_ref(),
                Err(expected),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn blob_lengths_are_bounded_at_construction() {
        assert_eq!(
            WrappedByAws::new(vec![], None),
            Err(WrappedError::BlobLength(0))
        );
        assert_eq!(
            WrappedByAws::new(vec![1], Some(vec![0; MAX_BLOB_LEN + 1])),
            Err(WrappedError::BlobLength(MAX_BLOB_LEN + 1))
        );
        let longest = wrapped(&[5; MAX_BLOB_LEN], Some(&[6; MAX_BLOB_LEN]));
        assert_eq!(WrappedByAws::from_bytes(&longest.to_bytes()), Ok(longest));
    }

    #[test]
    fn debug_prints_lengths_only() {
        let printed = format!("{:?}", wrapped(&[0xAB; 3], Some(&[0xCD; 5])));
        assert_eq!(
            printed,
            "WrappedByAws { primary_len: 3, backup_len: Some(5) }"
        );
    }

    proptest! {
        #[test]
        fn the_byte_form_round_trips(
            primary in prop::collection::vec(any::<u8>(), 1..300),
            backup in prop::option::of(prop::collection::vec(any::<u8>(), 1..300)),
        ) {
            let value = WrappedByAws::new(primary, backup).expect("valid lengths");
            prop_assert_eq!(WrappedByAws::from_bytes(&value.to_bytes()), Ok(value));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(value) = WrappedByAws::from_bytes(&bytes) {
                // Whatever decodes is canonical: it encodes back to the same bytes.
                prop_assert_eq!(value.to_bytes(), bytes);
            }
        }

        #[test]
        fn mutated_valid_bytes_never_panic(
            primary in prop::collection::vec(any::<u8>(), 1..64),
            backup in prop::option::of(prop::collection::vec(any::<u8>(), 1..64)),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = WrappedByAws::new(primary, backup).expect("valid").to_bytes();
            for (at, value) in flips {
                let at = at.index(bytes.len());
                bytes[at] = value;
            }
            let cut = cut.index(bytes.len() + 1);
            let _ = WrappedByAws::from_bytes(&bytes[..cut]);
            let _ = WrappedByAws::from_bytes(&bytes);
        }
    }
}
