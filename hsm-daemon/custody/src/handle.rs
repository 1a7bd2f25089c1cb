//! Key handles and key check values: the two non-secret names of a CMK.

use std::{fmt, str::FromStr};

use crate::InputError;

/// Opaque reference to a CMK in custody: 16 random bytes, written as 32 lower-case
/// hex characters. Parsing is the only way to make one from outside, so a
/// `KeyHandle` in hand is always well-formed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHandle([u8; KeyHandle::LEN]);

impl KeyHandle {
    /// Length in bytes.
    pub const LEN: usize = 16;

    /// A fresh random handle.
    pub fn random() -> Result<Self, crate::CustodyError> {
        let mut bytes = [0; Self::LEN];
        crate::fill_random(&mut bytes)?;
        Ok(Self(bytes))
    }

    /// The raw bytes, as embedded in a wrap ciphertext.
    pub fn as_bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }

    /// A handle from the raw bytes of a wrap ciphertext.
    pub fn from_bytes(bytes: [u8; Self::LEN]) -> Self {
        Self(bytes)
    }
}

impl FromStr for KeyHandle {
    type Err = InputError;

    fn from_str(text: &str) -> Result<Self, InputError> {
        let malformed = || InputError::KeyHandle(text.chars().take(64).collect());
        if text.len() != 2 * Self::LEN || text.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(malformed());
        }
        let mut bytes = [0; Self::LEN];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| malformed())?;
        Ok(Self(bytes))
    }
}

impl fmt::Display for KeyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHandle({self})")
    }
}

/// A short, non-secret fingerprint of a CMK's bytes, so that an admin can tell keys
/// apart and recognise a key uploaded again.
///
/// It is the leftmost 5 bytes of AES-CMAC(key, 16 zero bytes), the CMAC-based
/// check value of ANSI X9.24-1:2017, shown as 10 upper-case hex characters. The
/// legacy check value — AES-ECB of a zero block — is deliberately not used: for a
/// key used with AES-GCM that block is GHASH's hash subkey H, and revealing any of
/// it weakens GCM's authentication.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyCheckValue([u8; KeyCheckValue::LEN]);

impl KeyCheckValue {
    /// Length in bytes.
    pub const LEN: usize = 5;

    /// A check value from its bytes, for a backend that defines its own
    /// (a reference to a key held elsewhere, whose bytes it never sees).
    pub fn from_bytes(bytes: [u8; Self::LEN]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }
}

impl fmt::Display for KeyCheckValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode_upper(self.0))
    }
}

impl fmt::Debug for KeyCheckValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyCheckValue({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_round_trips_through_text() {
        let handle = KeyHandle::random().expect("rng");
        let text = handle.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<KeyHandle>(), Ok(handle));
    }

    #[test]
    fn malformed_handles_are_refused() {
        for bad in [
            "",
            "abc",
            "0123456789abcdef0123456789abcdeg",
            "0123456789ABCDEF0123456789ABCDEF",
            "0123456789abcdef0123456789abcdef00",
        ] {
            assert!(bad.parse::<KeyHandle>().is_err(), "{bad:?} parsed");
        }
    }
}
