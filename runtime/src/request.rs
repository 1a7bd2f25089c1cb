//! Request ids: the one value that ties a caller's report of a failed call to
//! the log lines the server wrote while handling it.
//!
//! A caller may choose the id (`x-request-id`), so that the same id can be
//! followed through several services; anything that does not look like an id
//! is replaced rather than logged, because the header is caller-controlled
//! text that would otherwise land verbatim in every log line of the request.

use std::fmt;

use http::HeaderValue;

/// The metadata key a request id travels in, both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The longest id a caller may choose; longer ones are replaced.
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// A request id: 1 to [`MAX_REQUEST_ID_LEN`] characters of `[A-Za-z0-9._-]`.
///
/// The gRPC metrics layer puts one in every request's extensions (so a
/// handler can read it from `tonic::Request::extensions`), in its
/// `x-request-id` metadata, and in the response headers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    /// The id a caller sent, if it is one.
    pub fn parse(value: &[u8]) -> Option<Self> {
        let valid = (1..=MAX_REQUEST_ID_LEN).contains(&value.len())
            && value
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return None;
        }
        // ASCII only, so this cannot fail.
        std::str::from_utf8(value)
            .ok()
            .map(|id| Self(id.to_owned()))
    }

    /// A fresh id: 16 random bytes in lower-case hex.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 16];
        if aws_lc_rs::rand::fill(&mut bytes).is_err() {
            // Only uniqueness matters here, not unpredictability, and a
            // failing generator must not fail the request it would label.
            static FALLBACK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = FALLBACK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            bytes[8..].copy_from_slice(&n.to_be_bytes());
        }
        Self(hex::encode(bytes))
    }

    /// The caller's id if it sent a valid one, otherwise a fresh one.
    pub fn from_header(value: Option<&HeaderValue>) -> Self {
        value
            .and_then(|value| Self::parse(value.as_bytes()))
            .unwrap_or_else(Self::generate)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as a header value.
    pub fn to_header_value(&self) -> HeaderValue {
        // Every constructor admits only `[A-Za-z0-9._-]`, all of which are
        // visible ASCII and so valid in a header.
        HeaderValue::from_str(&self.0).expect("request ids are visible ASCII")
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn accepts_short_plain_ids() {
        for id in ["a", "req-1", "A.b_c-D.9", &"x".repeat(MAX_REQUEST_ID_LEN)] {
            assert_eq!(RequestId::parse(id.as_bytes()).unwrap().as_str(), id);
        }
    }

    #[test]
    fn rejects_anything_else() {
        let too_long = "x".repeat(MAX_REQUEST_ID_LEN + 1);
        for id in [
            "",
            "has space",
            "new\nline",
            "quote\"",
            "slash/",
            "colon:",
            "ümlaut",
            &too_long,
        ] {
            assert_eq!(RequestId::parse(id.as_bytes()), None, "{id:?}");
        }
        assert_eq!(RequestId::parse(b"\xff"), None);
    }

    #[test]
    fn generated_ids_are_32_hex_digits_and_differ() {
        let a = RequestId::generate();
        let b = RequestId::generate();
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(RequestId::parse(a.as_str().as_bytes()).is_some());
        assert_ne!(a, b);
    }

    #[test]
    fn replaces_invalid_or_missing_headers() {
        let sent = HeaderValue::from_static("abc-123");
        assert_eq!(RequestId::from_header(Some(&sent)).as_str(), "abc-123");
        let bad = HeaderValue::from_static("a b");
        assert_eq!(RequestId::from_header(Some(&bad)).as_str().len(), 32);
        assert_eq!(RequestId::from_header(None).as_str().len(), 32);
        assert_eq!(
            RequestId::from_header(Some(&sent)).to_header_value(),
            "abc-123"
        );
    }
}
