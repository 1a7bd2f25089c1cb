//! Every parser of bytes a caller controls, fed arbitrary input: it must answer
//! with an error, never panic, and never accept what it did not produce.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::OnceLock;

use cmk_hsm_custody::{
    ImportKey, ImportKeyBits, KeyHandle, RootKey,
    envelope::{self, SealingKey},
};
use cmk_secret::SecretBytes;
use proptest::prelude::*;

fn import_key() -> &'static ImportKey {
    static KEY: OnceLock<ImportKey> = OnceLock::new();
    KEY.get_or_init(|| ImportKey::generate(ImportKeyBits::Rsa3072).unwrap())
}

proptest! {
    #[test]
    fn envelope_rejects_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200), aad in proptest::collection::vec(any::<u8>(), 0..32)) {
        let key = SealingKey::new(&SecretBytes::new(vec![9; 32])).unwrap();
        if envelope::parse(&bytes).is_ok() {
            prop_assert!(envelope::unwrap(&key, &bytes, &aad).is_err());
        }
    }

    #[test]
    fn envelope_round_trips_and_detects_any_change(
        secret in proptest::collection::vec(any::<u8>(), 1..64),
        aad in proptest::collection::vec(any::<u8>(), 0..32),
        position in any::<prop::sample::Index>(),
        flip in 1u8..,
    ) {
        let key = SealingKey::new(&SecretBytes::new(vec![3; 32])).unwrap();
        let handle = KeyHandle::random().unwrap();
        let secret = SecretBytes::new(secret);
        let ct = envelope::wrap(&key, &handle, &secret, &aad).unwrap();
        prop_assert_eq!(envelope::parse(&ct), Ok(handle));
        prop_assert!(envelope::unwrap(&key, &ct, &aad).unwrap().ct_eq(&secret));
        let mut bad = ct.clone();
        bad[position.index(ct.len())] ^= flip;
        let accepted = envelope::parse(&bad).is_ok() && envelope::unwrap(&key, &bad, &aad).is_ok();
        prop_assert!(!accepted);
    }

    #[test]
    fn key_handles_parse_only_32_lower_hex(text in ".{0,40}") {
        if let Ok(handle) = text.parse::<KeyHandle>() {
            prop_assert_eq!(handle.to_string(), text);
        }
    }

    #[test]
    fn root_keys_parse_only_64_hex(text in proptest::collection::vec(any::<u8>(), 0..80)) {
        let _ = RootKey::from_hex(&SecretBytes::new(text));
    }
}

proptest! {
    // RSA decryption costs milliseconds: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn import_rejects_arbitrary_ciphertexts(bytes in proptest::collection::vec(any::<u8>(), 0..400), full_length in any::<bool>()) {
        let mut bytes = bytes;
        if full_length {
            bytes.resize(384, 0xA5);
        }
        prop_assert!(import_key().decrypt_cmk(&bytes).is_err());
    }
}
