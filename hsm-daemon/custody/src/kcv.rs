//! Computes key check values (see [`KeyCheckValue`] for the definition and why).

use aes::Aes256;
use cmac::{Cmac, KeyInit, Mac};
use cmk_secret::SecretBytes;

use crate::{CustodyError, KeyCheckValue};

/// The check value of the AES-256 key `key`.
pub(crate) fn check_value(key: &SecretBytes) -> Result<KeyCheckValue, CustodyError> {
    let mut mac = <Cmac<Aes256> as KeyInit>::new_from_slice(key.expose())
        .map_err(|_| CustodyError::Crypto("check value needs a 32-byte key"))?;
    mac.update(&[0u8; 16]);
    let tag = mac.finalize().into_bytes();
    let mut kcv = [0; KeyCheckValue::LEN];
    kcv.copy_from_slice(&tag[..KeyCheckValue::LEN]);
    Ok(KeyCheckValue::from_bytes(kcv))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expected value is what an admin gets with OpenSSL:
    /// `head -c16 /dev/zero | openssl mac -cipher AES-256-CBC -macopt hexkey:<key> CMAC`
    /// (leftmost 10 hex characters), for the AES-256 key of NIST SP 800-38B.
    #[test]
    fn matches_openssl_cmac() {
        let key = SecretBytes::new(
            hex::decode("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
                .expect("hex"),
        );
        assert_eq!(check_value(&key).expect("kcv").to_string(), "1A0B2DF267");
    }
}
