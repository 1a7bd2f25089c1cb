//! Redacted `Debug` for the generated messages that carry secret bytes.
//!
//! The fields are destructured without `..`, so adding a field to one of these
//! messages breaks the build here until someone decides whether it is secret.

use std::fmt;

use crate::{
    control::v1::{DecryptResponse, GenerateDataKeyResponse},
    hsm::v1::{UnwrapResponse, WrapRequest},
};

struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {} bytes>", self.0)
    }
}

impl fmt::Debug for WrapRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let WrapRequest {
            key_handle,
            plaintext,
            associated_data,
            org,
        } = self;
        f.debug_struct("WrapRequest")
            .field("key_handle", key_handle)
            .field("plaintext", &Redacted(plaintext.len()))
            .field("associated_data", associated_data)
            .field("org", org)
            .finish()
    }
}

impl fmt::Debug for UnwrapResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let UnwrapResponse {
            plaintext,
            key_handle,
        } = self;
        f.debug_struct("UnwrapResponse")
            .field("plaintext", &Redacted(plaintext.len()))
            .field("key_handle", key_handle)
            .finish()
    }
}

impl fmt::Debug for GenerateDataKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let GenerateDataKeyResponse {
            plaintext,
            wrapped_key,
            kek_id,
        } = self;
        f.debug_struct("GenerateDataKeyResponse")
            .field("plaintext", &Redacted(plaintext.len()))
            .field(
                "wrapped_key",
                &format_args!("[{} bytes]", wrapped_key.len()),
            )
            .field("kek_id", kek_id)
            .finish()
    }
}

impl fmt::Debug for DecryptResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let DecryptResponse { plaintext, kek_id } = self;
        f.debug_struct("DecryptResponse")
            .field("plaintext", &Redacted(plaintext.len()))
            .field("kek_id", kek_id)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::v1::{BatchUnwrapResponse, UnwrapResult, unwrap_result};

    #[test]
    fn secret_fields_never_print() {
        let secret = vec![0xAB; 32];
        let request = WrapRequest {
            key_handle: "h".into(),
            plaintext: secret.clone(),
            associated_data: b"aad".to_vec(),
            org: "acme".into(),
        };
        let response = BatchUnwrapResponse {
            results: vec![UnwrapResult {
                result: Some(unwrap_result::Result::Ok(UnwrapResponse {
                    plaintext: secret,
                    key_handle: "h".into(),
                })),
            }],
        };
        let data_key = GenerateDataKeyResponse {
            plaintext: vec![0xAB; 32],
            wrapped_key: vec![1; 90],
            kek_id: "kek-1".into(),
        };
        let decrypted = DecryptResponse {
            plaintext: vec![0xAB; 32],
            kek_id: "kek-1".into(),
        };
        for printed in [
            format!("{request:?}"),
            format!("{response:?}"),
            format!("{data_key:?}"),
            format!("{decrypted:?}"),
        ] {
            assert!(printed.contains("<redacted 32 bytes>"), "{printed}");
            assert!(!printed.contains("171"), "{printed}"); // 0xAB in decimal
        }
    }
}
