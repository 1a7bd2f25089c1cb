//! The KMS encryption context: the non-secret pairs a ciphertext is bound to.

use std::collections::{BTreeMap, HashMap};

/// KMS's limit on an encryption context: the bytes of every key and value together.
pub const MAX_CONTEXT_BYTES: usize = 8192;

/// Non-secret string pairs that KMS binds to a ciphertext as additional
/// authenticated data: decryption succeeds only with exactly the same pairs. The
/// caller binds what the ciphertext is for (the org and the KEK id), so that a
/// ciphertext of one KEK cannot be passed off as another's.
///
/// Never empty, keys unique and non-empty, at most [`MAX_CONTEXT_BYTES`] in all;
/// ordered, so that it prints the same way every time. AWS records the context in
/// CloudTrail in the clear: it must never hold a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptionContext {
    pairs: BTreeMap<String, String>,
    bytes: usize,
}

/// Why an encryption context was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// A key of zero length.
    #[error("encryption context keys must not be empty")]
    EmptyKey,
    /// A value of zero length, which KMS refuses.
    #[error("encryption context value for {0:?} is empty")]
    EmptyValue(String),
    /// The same key twice.
    #[error("encryption context key {0:?} is given twice")]
    DuplicateKey(String),
    /// More than KMS accepts.
    #[error("encryption context would be {0} bytes; KMS accepts at most {MAX_CONTEXT_BYTES}")]
    TooLarge(usize),
}

impl EncryptionContext {
    /// A context of one pair; add more with [`EncryptionContext::with`].
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Result<Self, ContextError> {
        Self {
            pairs: BTreeMap::new(),
            bytes: 0,
        }
        .with(key, value)
    }

    /// This context and one more pair.
    pub fn with(
        mut self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self, ContextError> {
        let (key, value) = (key.into(), value.into());
        if key.is_empty() {
            return Err(ContextError::EmptyKey);
        }
        if value.is_empty() {
            return Err(ContextError::EmptyValue(bounded(&key)));
        }
        let bytes = self.bytes + key.len() + value.len();
        if bytes > MAX_CONTEXT_BYTES {
            return Err(ContextError::TooLarge(bytes));
        }
        if self.pairs.contains_key(&key) {
            return Err(ContextError::DuplicateKey(bounded(&key)));
        }
        self.pairs.insert(key, value);
        self.bytes = bytes;
        Ok(self)
    }

    /// The pairs, ordered by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The pairs in the form the SDK takes.
    pub(crate) fn to_sdk(&self) -> HashMap<String, String> {
        self.pairs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// A key for an error message, cut short: the message stays readable whatever
/// the caller passed.
fn bounded(key: &str) -> String {
    key.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_kept_in_key_order() {
        let context = EncryptionContext::new("cmk:org", "org-1")
            .and_then(|c| c.with("cmk:kek", "kek-7"))
            .expect("valid");
        let pairs: Vec<_> = context.iter().collect();
        assert_eq!(pairs, [("cmk:kek", "kek-7"), ("cmk:org", "org-1")]);
    }

    #[test]
    fn empty_and_duplicate_keys_are_refused() {
        assert_eq!(EncryptionContext::new("", "v"), Err(ContextError::EmptyKey));
        assert_eq!(
            EncryptionContext::new("k", ""),
            Err(ContextError::EmptyValue("k".into()))
        );
        let context = EncryptionContext::new("k", "v").expect("valid");
        assert_eq!(
            context.with("k", "w"),
            Err(ContextError::DuplicateKey("k".into()))
        );
    }

    #[test]
    fn the_size_limit_counts_every_key_and_value() {
        let full = EncryptionContext::new("a", "x".repeat(MAX_CONTEXT_BYTES - 1)).expect("fits");
        assert_eq!(
            full.with("b", "y"),
            Err(ContextError::TooLarge(MAX_CONTEXT_BYTES + 2))
        );
        assert_eq!(
            EncryptionContext::new("a", "x".repeat(MAX_CONTEXT_BYTES)),
            Err(ContextError::TooLarge(MAX_CONTEXT_BYTES + 1))
        );
    }
}
