//! The customer master key lifecycle of one organisation, with no I/O.
//!
//! [`transition`] is the one exhaustive function from (key record, action) to the
//! next record; every rule about a single key is in it. [`Org`] adds the rules
//! that span an org's keys — at most one pending, one active and one revoked key,
//! a key its provider disabled keeping the place it had; activation refused
//! while the master is revoked or disabled — and returns a new `Org`
//! rather than changing itself, so a refused command leaves nothing changed by
//! construction. The store persists what `Org` returns; the service calls the
//! HSM daemon for the effects a [`Change`] implies (destroying a removed key).

#![forbid(unsafe_code)]

pub mod audit;
mod lifecycle;
mod org;

use std::{fmt, time::Duration};

pub use lifecycle::transition;
pub use org::{Change, Command, Effect, Org, Outcome};

/// Seconds since the Unix epoch. The domain never reads a clock: callers pass
/// the time in, so tests can move it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The last second RFC 3339 can write (9999-12-31T23:59:59Z).
    const MAX_RFC3339: i64 = 253_402_300_799;

    /// `self` plus `duration` (saturating).
    pub fn plus(self, duration: Duration) -> Self {
        let secs = i64::try_from(duration.as_secs()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(secs))
    }
}

/// RFC 3339 UTC to the second (`2027-01-31T09:15:00Z`): how a time reaches a
/// person. Times outside 1970–9999, which no clock gives, are written as the
/// nearest end of that range.
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Both ends are in range, so neither the cast nor humantime can fail.
        let secs = self.0.clamp(0, Self::MAX_RFC3339) as u64;
        let time = std::time::UNIX_EPOCH + Duration::from_secs(secs);
        write!(f, "{}", humantime::format_rfc3339_seconds(time))
    }
}

/// Identifier of an organisation: 1 to 64 characters of `A-Z a-z 0-9 . _ -`,
/// so it is safe in a log line, a file name or a URL path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrgId(String);

impl OrgId {
    /// The longest accepted id.
    pub const MAX_LEN: usize = 64;

    /// Parses an org id, saying what is wrong with a bad one.
    pub fn parse(id: &str) -> Result<Self, String> {
        check_id("organisation id", id, Self::MAX_LEN).map(|()| Self(id.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks an identifier that ends up in log lines, audit rows and file names.
fn check_id(what: &str, id: &str, max_len: usize) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if id.len() > max_len {
        return Err(format!(
            "{what} is {} bytes, over the limit of {max_len}",
            id.len()
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "{what} may contain only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Identifier of one key of one org (not the HSM handle).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub String);

impl KeyId {
    /// The longest accepted id.
    pub const MAX_LEN: usize = 64;

    /// Parses a key id from a request, with the same rules as [`OrgId`].
    pub fn parse(id: &str) -> Result<Self, String> {
        check_id("key id", id, Self::MAX_LEN).map(|()| Self(id.to_owned()))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifier of a key-encryption key: `kek-` and 32 lower-case hex characters,
/// chosen by the service at random, so that an id never names a KEK of
/// another org.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KekId(String);

impl KekId {
    /// Length of every KEK id.
    pub const LEN: usize = 36;

    /// Parses a KEK id from a request or a wrapped content key.
    pub fn parse(id: &str) -> Result<Self, String> {
        let hex = id
            .strip_prefix("kek-")
            .ok_or_else(|| "KEK id must start with \"kek-\"".to_owned())?;
        if hex.len() != 32 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err("KEK id must be \"kek-\" and 32 lower-case hex characters".into());
        }
        Ok(Self(id.to_owned()))
    }

    /// A KEK id from 16 random bytes.
    pub fn from_random(bytes: [u8; 16]) -> Self {
        use std::fmt::Write;
        let mut id = String::with_capacity(Self::LEN);
        id.push_str("kek-");
        for b in bytes {
            // Writing to a String cannot fail.
            let _ = write!(id, "{b:02x}");
        }
        Self(id)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KekId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The resource a KEK protects (a space, a meeting): 1 to 128 characters of
/// `A-Z a-z 0-9 . _ - : /`, named by the internal service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceId(String);

impl ResourceId {
    /// The longest accepted resource name.
    pub const MAX_LEN: usize = 128;

    /// Parses a resource name from a request.
    pub fn parse(id: &str) -> Result<Self, String> {
        if id.is_empty() {
            return Err("resource is empty".into());
        }
        if id.len() > Self::MAX_LEN {
            return Err(format!(
                "resource is {} bytes, over the limit of {}",
                id.len(),
                Self::MAX_LEN
            ));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/'))
        {
            return Err(
                "resource may contain only letters, digits, '.', '_', '-', ':' and '/'".into(),
            );
        }
        Ok(Self(id.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a key's material lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeySource {
    /// Uploaded by the org (BYOK), held by the HSM daemon.
    Uploaded,
    /// A key in AWS KMS, referenced by ARN.
    AwsKms,
    /// The service's generic default key, shared by orgs without BYOK.
    GenericDefault,
}

/// Lifecycle state of one key (docs/design.md, "Key lifecycle"), with the
/// data that only that state has: a deactivated key knows when it is removed,
/// a deleted one until when it can be restored, one its provider disabled
/// which place it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// In custody, not yet used.
    Pending,
    /// Wraps every new KEK.
    Active,
    /// Still needed to unwrap KEKs not yet re-wrapped to the active key.
    Rotating,
    /// No longer used; removed once its retention ends.
    Deactivated {
        /// When its retention ends.
        remove_at: Timestamp,
    },
    /// Suspected compromise: nothing may be decrypted with it.
    Revoked,
    /// As revoked, and removed once the 30-day restore window ends.
    Deleted {
        /// The end of its restore window.
        restore_until: Timestamp,
    },
    /// Logical: destroyed in custody and no longer listed.
    Removed,
    /// Destroyed in custody while deleted: KEKs still need it, so the org
    /// stays blocked until custody takes the original material back
    /// ([`Action::Recover`]). Shown as "removed".
    Lost,
    /// An external key disabled or scheduled for deletion at its provider,
    /// holding the place of the state it came from.
    RevokedByProvider {
        /// The state it returns to when its provider enables it again.
        was: Place,
    },
}

impl KeyState {
    /// A key that blocks its org: revoked, deleted, or removed while still
    /// needed.
    pub fn blocks_org(self) -> bool {
        matches!(self, Self::Revoked | Self::Deleted { .. } | Self::Lost)
    }

    /// Destroyed in custody (removed, or lost).
    pub fn is_removed(self) -> bool {
        matches!(self, Self::Removed | Self::Lost)
    }

    /// When a deactivated or deleted key is due for removal.
    pub fn due(self) -> Option<Timestamp> {
        match self {
            Self::Deactivated { remove_at } => Some(remove_at),
            Self::Deleted { restore_until } => Some(restore_until),
            Self::Pending
            | Self::Active
            | Self::Rotating
            | Self::Revoked
            | Self::Removed
            | Self::Lost
            | Self::RevokedByProvider { .. } => None,
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Rotating => "rotating",
            Self::Deactivated { .. } => "deactivated",
            Self::Revoked => "revoked",
            Self::Deleted { .. } => "deleted",
            Self::Removed | Self::Lost => "removed",
            Self::RevokedByProvider { .. } => "revoked by provider",
        })
    }
}

/// The states an external key's provider can take it out of: the place it
/// keeps among the org's keys while disabled, and returns to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Place {
    /// It was pending.
    Pending,
    /// It was the master.
    Active,
    /// It was rotating.
    Rotating,
    /// It was deactivated (its retention pauses while disabled).
    Deactivated {
        /// When its retention ends.
        remove_at: Timestamp,
    },
}

impl Place {
    /// The place a key in `state` holds, if its provider can take it out of
    /// that state: a revoked, deleted or removed key is blocked or gone
    /// already, and a disabled one is disabled.
    pub fn of(state: KeyState) -> Option<Self> {
        match state {
            KeyState::Pending => Some(Self::Pending),
            KeyState::Active => Some(Self::Active),
            KeyState::Rotating => Some(Self::Rotating),
            KeyState::Deactivated { remove_at } => Some(Self::Deactivated { remove_at }),
            KeyState::Revoked
            | KeyState::Deleted { .. }
            | KeyState::Removed
            | KeyState::Lost
            | KeyState::RevokedByProvider { .. } => None,
        }
    }
}

impl From<Place> for KeyState {
    fn from(place: Place) -> Self {
        match place {
            Place::Pending => Self::Pending,
            Place::Active => Self::Active,
            Place::Rotating => Self::Rotating,
            Place::Deactivated { remove_at } => Self::Deactivated { remove_at },
        }
    }
}

/// Something that happens to one key, asked for by an admin or by the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Admin: pending → active.
    Activate,
    /// Service: active → rotating, because another key was activated.
    Supersede,
    /// Admin: pending → removed.
    Cancel,
    /// Service: rotating → deactivated (or removed, for keys the service does not
    /// hold), once no KEK references it.
    FinishRotation,
    /// Admin: active → revoked.
    Revoke,
    /// Admin: revoked → active.
    Reactivate,
    /// Admin: revoked → deleted.
    Delete,
    /// Admin: deleted → revoked, inside the restore window.
    Restore,
    /// Service: deactivated or deleted → removed, once its time is up.
    Expire,
    /// Admin, by uploading the same key again: removed while still needed → revoked.
    Recover,
    /// Service: the provider disabled the external key.
    ProviderDisable,
    /// Service: the provider enabled it again.
    ProviderEnable,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Activate => "activate",
            Self::Supersede => "supersede",
            Self::Cancel => "cancel",
            Self::FinishRotation => "finish the rotation of",
            Self::Revoke => "revoke",
            Self::Reactivate => "reactivate",
            Self::Delete => "delete",
            Self::Restore => "restore",
            Self::Expire => "remove",
            Self::Recover => "recover",
            Self::ProviderDisable => "record its provider disabling",
            Self::ProviderEnable => "record its provider enabling",
        })
    }
}

/// One key of an org, as the lifecycle sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    /// The key's id within the org.
    pub id: KeyId,
    /// Where its material lives.
    pub source: KeySource,
    /// Its state.
    pub state: KeyState,
    /// Non-secret fingerprint of the key material.
    pub check_value: String,
    /// When it was uploaded or added.
    pub created_at: Timestamp,
    /// When it last became active.
    pub activated_at: Option<Timestamp>,
    /// When it was last revoked.
    pub revoked_at: Option<Timestamp>,
}

impl KeyRecord {
    /// The state whose place the key holds among the org's keys: its own, or,
    /// for a key revoked by its provider, the state it returns to when
    /// enabled again. A pending or active key that its provider disabled
    /// still holds the org's one pending or active place.
    pub fn slot(&self) -> KeyState {
        match self.state {
            KeyState::RevokedByProvider { was } => was.into(),
            state => state,
        }
    }

    /// A new key in the pending state.
    pub fn pending(id: KeyId, source: KeySource, check_value: String, now: Timestamp) -> Self {
        Self {
            id,
            source,
            state: KeyState::Pending,
            check_value,
            created_at: now,
            activated_at: None,
            revoked_at: None,
        }
    }
}

/// Durations the lifecycle applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// How long a deactivated key is kept before removal.
    pub deactivated_retention: Duration,
    /// How long a deleted key can be restored (30 days).
    pub restore_window: Duration,
    /// How long a key may be the master before it is flagged "rotation due";
    /// the generic default key renews itself on this schedule.
    pub rotation_period: Duration,
}

impl Policy {
    /// Whether `key` has been the master for longer than the rotation period:
    /// only an active key can be due, and its age counts from its activation.
    pub fn rotation_due(&self, key: &KeyRecord, now: Timestamp) -> bool {
        key.state == KeyState::Active
            && key
                .activated_at
                .unwrap_or(key.created_at)
                .plus(self.rotation_period)
                <= now
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            deactivated_retention: Duration::from_secs(30 * 86_400),
            restore_window: Duration::from_secs(30 * 86_400),
            rotation_period: Duration::from_secs(365 * 86_400),
        }
    }
}

/// Why a lifecycle command was refused. Every variant is a precondition the
/// caller can read and act on, except [`LifecycleError::UnknownKey`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    /// The action is not allowed from the key's state.
    #[error("key {key} is {state}: cannot {action} it; {allowed}")]
    InvalidTransition {
        /// The key.
        key: KeyId,
        /// Its state.
        state: KeyState,
        /// What was asked.
        action: Action,
        /// What the state allows, in words.
        allowed: String,
    },
    /// A second pending key.
    #[error("key {pending} is already pending: activate or cancel it before adding another")]
    PendingExists {
        /// The pending key.
        pending: KeyId,
    },
    /// Activation while the master key is revoked, deleted or lost.
    #[error(
        "the organisation's master key {master} is {state}: {remedy} first, then rotate to a new key"
    )]
    MasterRevoked {
        /// The revoked master key.
        master: KeyId,
        /// Its state.
        state: &'static str,
        /// What to do.
        remedy: String,
    },
    /// Activation while the master key is disabled (or scheduled for deletion)
    /// in AWS KMS: it holds the active slot until it is enabled there again.
    #[error(
        "the organisation's master key {master} is disabled or scheduled for deletion in AWS KMS: \
         enable it there again (or cancel its deletion), then rotate to a new key"
    )]
    MasterRevokedByProvider {
        /// The master key its provider disabled.
        master: KeyId,
    },
    /// A new key while the pending key is disabled (or scheduled for deletion)
    /// in AWS KMS: it still holds the pending slot.
    #[error(
        "key {pending} is pending but disabled or scheduled for deletion in AWS KMS: enable it \
         there again and activate it, or cancel it, before adding another"
    )]
    PendingRevokedByProvider {
        /// The pending key its provider disabled.
        pending: KeyId,
    },
    /// A KEK wrapped by a rotating key that its provider disabled.
    #[error(
        "key {key} is disabled or scheduled for deletion in AWS KMS: the KEKs it still wraps \
         cannot be used until it is enabled there again (or its deletion cancelled)"
    )]
    KeyRevokedByProvider {
        /// The rotating key its provider disabled.
        key: KeyId,
    },
    /// A content-key call while the master key is revoked, deleted, lost or
    /// disabled at its provider.
    #[error(
        "the organisation's master key {master} is {state}: nothing can be encrypted or decrypted until you {remedy}"
    )]
    ContentBlocked {
        /// The revoked master key.
        master: KeyId,
        /// Its state.
        state: &'static str,
        /// What to do.
        remedy: String,
    },
    /// No key is active (cannot happen while the invariants hold).
    #[error("the organisation has no active master key")]
    NoActiveKey,
    /// Restore after the window.
    #[error("key {key} can no longer be restored: its restore window ended at {ended}")]
    RestoreWindowClosed {
        /// The key.
        key: KeyId,
        /// When the window ended.
        ended: Timestamp,
    },
    /// Removal before its time.
    #[error("key {key} is not due for removal until {due}")]
    NotDue {
        /// The key.
        key: KeyId,
        /// When it is due.
        due: Timestamp,
    },
    /// The generic default key is shared; an org cannot revoke it.
    #[error(
        "key {key} is the service's generic default key, which an organisation cannot revoke; \
         activate your own key first"
    )]
    GenericDefaultNotRevocable {
        /// The key.
        key: KeyId,
    },
    /// The uploaded key is already one of the org's keys.
    #[error("this key material is already key {existing} ({state}), check value {check_value}")]
    AlreadyPresent {
        /// The existing key.
        existing: KeyId,
        /// Its state.
        state: KeyState,
        /// The shared check value.
        check_value: String,
    },
    /// Material with a removed key's check value that custody did not take
    /// back as that key's: a check value is no proof of identity.
    #[error(
        "the key given has check value {check_value}, as removed key {removed} has, but the HSM \
         did not accept it as that key's original material; nothing was added"
    )]
    NotTheRemovedKey {
        /// The removed key.
        removed: KeyId,
        /// The check value of the material given.
        check_value: String,
    },
    /// BYOK off while the generic default key already is the master.
    #[error("the generic default key {key} is already the organisation's master key")]
    GenericAlreadyActive {
        /// The org's record of it.
        key: KeyId,
    },
    /// The generic default key can only be renewed where it is the master.
    #[error("the organisation's master key is not the generic default key")]
    GenericNotMaster,
    /// Bring-your-own-key is switched off for the org.
    #[error(
        "bring-your-own-key is switched off for this organisation: switch it on before uploading or activating a key of your own"
    )]
    ByokOff,
    /// A key id the org already uses.
    #[error("the organisation already has a key with id {0}")]
    DuplicateId(KeyId),
    /// No such key in this org.
    #[error("the organisation has no key {0}")]
    UnknownKey(KeyId),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn times_reach_people_as_rfc_3339() {
        assert_eq!(Timestamp(1_798_761_600).to_string(), "2027-01-01T00:00:00Z");
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(Timestamp(-5).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(Timestamp(i64::MAX).to_string(), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn ids_are_bounded_and_plain() {
        assert!(OrgId::parse("acme-corp_1.eu").is_ok());
        assert_eq!(OrgId::parse("").unwrap_err(), "organisation id is empty");
        assert!(
            OrgId::parse(&"a".repeat(65))
                .unwrap_err()
                .contains("65 bytes")
        );
        assert!(OrgId::parse("a/b").unwrap_err().contains("only letters"));
        assert!(KeyId::parse("key 1").unwrap_err().starts_with("key id"));
        assert!(KeyId::parse("\u{e9}").is_err());
    }

    #[test]
    fn kek_ids_are_random_hex_and_resources_are_plain() {
        let id = KekId::from_random([0xab; 16]);
        assert_eq!(id.as_str(), format!("kek-{}", "ab".repeat(16)));
        assert_eq!(KekId::parse(id.as_str()).unwrap(), id);
        assert!(KekId::parse("kek-AB").is_err());
        assert!(KekId::parse(&format!("kek-{}", "AB".repeat(16))).is_err());
        assert!(KekId::parse(&"a".repeat(36)).is_err());
        assert!(ResourceId::parse("space:42/meeting-7").is_ok());
        assert!(ResourceId::parse("").is_err());
        assert!(
            ResourceId::parse(&"r".repeat(129))
                .unwrap_err()
                .contains("129 bytes")
        );
        assert!(ResourceId::parse("a b").is_err());
    }

    #[test]
    fn only_an_active_key_past_the_period_is_due() {
        let policy = Policy::default();
        let year = 365 * 86_400;
        let mut key = KeyRecord::pending(
            KeyId("k".into()),
            KeySource::Uploaded,
            "AAAAAAAAAA".into(),
            Timestamp(0),
        );
        assert!(!policy.rotation_due(&key, Timestamp(2 * year)), "pending");
        key.state = KeyState::Active;
        key.activated_at = Some(Timestamp(100));
        assert!(!policy.rotation_due(&key, Timestamp(year + 99)));
        assert!(policy.rotation_due(&key, Timestamp(year + 100)));
        key.state = KeyState::Rotating;
        assert!(!policy.rotation_due(&key, Timestamp(2 * year)), "rotating");
    }
}
