//! Whose key it is: every key in custody is bound, when it comes in, to the one
//! organisation it serves or to the scope every organisation shares (the
//! generic default key), and every use names the organisation it is for.
//!
//! The binding is stored with the key, in the same sealed record or token
//! object, so it survives restarts and is the same for every daemon on a
//! token. A call that names another organisation than the key's is refused
//! before the key is touched: a control plane that picked the wrong handle
//! (a bug, or a caller that got past it) cannot make one organisation's key
//! wrap or open another's secrets.
//!
//! The byte form, used by the keystore's records: `0` for shared; `1`, a
//! length byte and the organisation id for one organisation.

use std::fmt;

use crate::InputError;

/// An organisation id as the control plane writes it: 1 to 64 ASCII letters,
/// digits, `.`, `_` and `-`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrgName(String);

impl OrgName {
    /// The longest accepted id.
    pub const MAX_LEN: usize = 64;

    /// Parses an organisation id.
    pub fn parse(text: &str) -> Result<Self, InputError> {
        let valid = !text.is_empty()
            && text.len() <= Self::MAX_LEN
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        match valid {
            true => Ok(Self(text.to_owned())),
            false => Err(InputError::Org(text.chars().take(Self::MAX_LEN).collect())),
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrgName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for OrgName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OrgName({})", self.0)
    }
}

/// Whom a key serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyScope {
    /// Every organisation: the generic default key.
    Shared,
    /// One organisation.
    Org(OrgName),
}

const SHARED: u8 = 0;
const ORG: u8 = 1;

impl KeyScope {
    /// Whether a call for `org` may use a key of this scope.
    pub fn admits(&self, org: &OrgName) -> bool {
        match self {
            Self::Shared => true,
            Self::Org(owner) => owner == org,
        }
    }

    /// The organisation this scope is, if it is one.
    pub fn org(&self) -> Option<&OrgName> {
        match self {
            Self::Shared => None,
            Self::Org(org) => Some(org),
        }
    }

    /// The byte form (see the module's documentation).
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Self::Shared => vec![SHARED],
            Self::Org(org) => {
                let mut out = Vec::with_capacity(2 + org.0.len());
                out.push(ORG);
                // At most 64 bytes: the length fits in one.
                out.push(org.0.len() as u8);
                out.extend_from_slice(org.0.as_bytes());
                out
            }
        }
    }

    /// Reads the byte form; `None` if `bytes` are not exactly one scope.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        match bytes {
            [SHARED] => Some(Self::Shared),
            [ORG, len, org @ ..] if usize::from(*len) == org.len() => std::str::from_utf8(org)
                .ok()
                .and_then(|org| OrgName::parse(org).ok())
                .map(Self::Org),
            _ => None,
        }
    }
}

impl fmt::Display for KeyScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shared => f.write_str("shared"),
            Self::Org(org) => write!(f, "org:{org}"),
        }
    }
}

impl std::str::FromStr for KeyScope {
    type Err = ();

    /// Reads what `Display` writes.
    fn from_str(text: &str) -> Result<Self, ()> {
        match text.strip_prefix("org:") {
            Some(org) => OrgName::parse(org).map(Self::Org).map_err(|_| ()),
            None if text == "shared" => Ok(Self::Shared),
            None => Err(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn org(id: &str) -> OrgName {
        OrgName::parse(id).expect("valid org id")
    }

    #[test]
    fn an_org_key_admits_its_org_only_and_a_shared_key_every_org() {
        let acme = KeyScope::Org(org("acme"));
        assert!(acme.admits(&org("acme")));
        assert!(!acme.admits(&org("globex")));
        assert!(!acme.admits(&org("acme-2")));
        assert!(KeyScope::Shared.admits(&org("globex")));
    }

    #[test]
    fn org_ids_follow_the_control_planes_rules() {
        assert!(OrgName::parse("acme.eu_1-a").is_ok());
        assert!(OrgName::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "a b", "ä", "a/b", "a:b"] {
            assert!(OrgName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(OrgName::parse(&"a".repeat(65)).is_err());
    }

    #[test]
    fn malformed_bytes_are_no_scope() {
        for bad in [
            &[][..],
            &[0, 0],
            &[1],
            &[1, 0],
            &[1, 2, b'a'],
            &[1, 1, b'a', b'b'],
            &[1, 1, b' '],
            &[2],
        ] {
            assert_eq!(KeyScope::from_bytes(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn scopes_round_trip_in_both_forms(id in "[A-Za-z0-9._-]{1,64}", shared: bool) {
            let scope = if shared { KeyScope::Shared } else { KeyScope::Org(org(&id)) };
            prop_assert_eq!(KeyScope::from_bytes(&scope.to_bytes()), Some(scope.clone()));
            prop_assert_eq!(scope.to_string().parse::<KeyScope>(), Ok(scope));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
            let _ = KeyScope::from_bytes(&bytes);
        }
    }
}
