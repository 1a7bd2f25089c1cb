//! The one type for secret bytes in cmk: key material, root keys, PINs, cloud
//! credentials.
//!
//! [`SecretBytes`] is zeroized when dropped, prints only a placeholder and its
//! length through `Debug`, has no `Display`, `Serialize` or derived `PartialEq`,
//! compares in constant time, and is read only through [`SecretBytes::expose`], so
//! every place that touches a secret can be found with one search.

#![forbid(unsafe_code)]

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Secret bytes, wiped from memory on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// Takes ownership of `bytes`; the caller's buffer is moved, not copied.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// Copies `bytes` into a new secret. The caller remains responsible for wiping
    /// its own copy.
    pub fn copy_from(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    /// `len` zero bytes, to be filled in place through [`SecretBytes::expose_mut`].
    pub fn zeroed(len: usize) -> Self {
        Self(vec![0; len])
    }

    /// The secret itself. Every read of secret bytes goes through this method.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Mutable access, for filling a buffer in place (decryption, random bytes).
    pub fn expose_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }

    /// Number of secret bytes (not itself secret).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Shortens the secret to `len` bytes, wiping the bytes cut off.
    pub fn truncate(&mut self, len: usize) {
        if len < self.0.len() {
            self.0[len..].zeroize();
            self.0.truncate(len);
        }
    }

    /// Constant-time equality: the time taken depends on the lengths only.
    pub fn ct_eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<redacted {} bytes>)", self.0.len())
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

/// Accepts a secret from configuration without ever echoing it in an error.
impl<'de> serde::Deserialize<'de> for SecretBytes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut text = String::deserialize(deserializer)?;
        let secret = Self::copy_from(text.as_bytes());
        text.zeroize();
        Ok(secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_prints_only_the_length() {
        let secret = SecretBytes::new(b"hunter2-hunter2".to_vec());
        let printed = format!("{secret:?}");
        assert_eq!(printed, "SecretBytes(<redacted 15 bytes>)");
    }

    #[test]
    fn equality_is_by_content() {
        let a = SecretBytes::copy_from(&[1, 2, 3]);
        assert!(a.ct_eq(&SecretBytes::copy_from(&[1, 2, 3])));
        assert!(!a.ct_eq(&SecretBytes::copy_from(&[1, 2, 4])));
        assert!(!a.ct_eq(&SecretBytes::copy_from(&[1, 2])));
    }

    #[test]
    fn truncate_keeps_the_prefix() {
        let mut s = SecretBytes::copy_from(&[9, 8, 7, 6]);
        s.truncate(2);
        assert_eq!(s.expose(), &[9, 8]);
    }
}
