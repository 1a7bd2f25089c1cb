//! The stored text of each enumeration, for every SQL backend.
//!
//! These strings are the on-disk format: a variant may be added, but an
//! existing string never changes. Decoding a string this code does not know is
//! [`StoreError::Corrupt`], naming the column and the value, so that a row
//! written by a newer release or edited by hand is never misread. The column
//! is a `Display` so that its name is only formatted for an error.

use cmk_control_plane_domain::{KekId, KeySource, KeyState, OrgId, Place, ResourceId, Timestamp};

use crate::{Column, Corruption, IntentKind, JobState, StoreError};

pub(crate) fn key_source(source: KeySource) -> &'static str {
    match source {
        KeySource::Uploaded => "uploaded",
        KeySource::AwsKms => "aws_kms",
        KeySource::GenericDefault => "generic_default",
    }
}

pub(crate) fn parse_key_source(column: Column, text: &str) -> Result<KeySource, StoreError> {
    Ok(match text {
        "uploaded" => KeySource::Uploaded,
        "aws_kms" => KeySource::AwsKms,
        "generic_default" => KeySource::GenericDefault,
        _ => return Err(unknown(column, text)),
    })
}

/// The `state` text of the states queries select by.
pub(crate) const DEACTIVATED: &str = "deactivated";
pub(crate) const DELETED: &str = "deleted";
pub(crate) const REMOVED: &str = "removed";

/// The `state` column's text for each kind of state; the data a state
/// carries is in columns of its own ([`KeyColumns`]).
pub(crate) fn key_state(state: KeyState) -> &'static str {
    match state {
        KeyState::Pending => "pending",
        KeyState::Active => "active",
        KeyState::Rotating => "rotating",
        KeyState::Deactivated { .. } => DEACTIVATED,
        KeyState::Revoked => "revoked",
        KeyState::Deleted { .. } => DELETED,
        KeyState::Removed | KeyState::Lost => REMOVED,
        KeyState::RevokedByProvider { .. } => "revoked_by_provider",
    }
}

/// A key's state as its four columns: the kind, when it is due for removal
/// (a deactivated key, also while its provider disables it; a deleted one),
/// whether a removed key is still needed, and the place of a key its
/// provider disabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct KeyColumns<'t> {
    pub(crate) state: &'t str,
    pub(crate) expires_at: Option<Timestamp>,
    pub(crate) needed: bool,
    pub(crate) before_provider_revocation: Option<&'t str>,
}

impl KeyColumns<'static> {
    pub(crate) fn of(state: KeyState) -> Self {
        let (expires_at, before) = match state {
            KeyState::Deactivated { remove_at } => (Some(remove_at), None),
            KeyState::Deleted { restore_until } => (Some(restore_until), None),
            KeyState::RevokedByProvider { was } => {
                let was = KeyState::from(was);
                (was.due(), Some(key_state(was)))
            }
            KeyState::Pending
            | KeyState::Active
            | KeyState::Rotating
            | KeyState::Revoked
            | KeyState::Removed
            | KeyState::Lost => (None, None),
        };
        Self {
            state: key_state(state),
            expires_at,
            needed: state == KeyState::Lost,
            before_provider_revocation: before,
        }
    }
}

impl KeyColumns<'_> {
    /// The state these columns hold; columns that contradict each other (a
    /// deactivated key with no removal time) are corruption.
    pub(crate) fn decode(self, table: &'static str) -> Result<KeyState, StoreError> {
        let column = |name| Column { table, name };
        let due = |because| {
            self.expires_at
                .ok_or(StoreError::Corrupt(Corruption::MissingValue {
                    column: column("expires_at"),
                    because,
                }))
        };
        let simple = |text: &str| -> Result<KeyState, StoreError> {
            Ok(match text {
                "pending" => KeyState::Pending,
                "active" => KeyState::Active,
                "rotating" => KeyState::Rotating,
                "deactivated" => KeyState::Deactivated {
                    remove_at: due("the key is deactivated")?,
                },
                "revoked" => KeyState::Revoked,
                "deleted" => KeyState::Deleted {
                    restore_until: due("the key is deleted")?,
                },
                "removed" if self.needed => KeyState::Lost,
                "removed" => KeyState::Removed,
                _ => return Err(unknown(column("state"), text)),
            })
        };
        if self.state != "revoked_by_provider" {
            return simple(self.state);
        }
        let before = self.before_provider_revocation.ok_or_else(|| {
            StoreError::Corrupt(Corruption::MissingValue {
                column: column("before_provider_revocation"),
                because: "the key is revoked by its provider",
            })
        })?;
        match Place::of(simple(before)?) {
            Some(was) => Ok(KeyState::RevokedByProvider { was }),
            None => Err(unknown(column("before_provider_revocation"), before)),
        }
    }
}

pub(crate) fn intent_kind(kind: IntentKind) -> &'static str {
    match kind {
        IntentKind::Import => "import",
        IntentKind::Destroy => "destroy",
    }
}

pub(crate) fn parse_intent_kind(column: Column, text: &str) -> Result<IntentKind, StoreError> {
    Ok(match text {
        "import" => IntentKind::Import,
        "destroy" => IntentKind::Destroy,
        _ => return Err(unknown(column, text)),
    })
}

pub(crate) fn job_state(state: JobState) -> &'static str {
    match state {
        JobState::Running => "running",
        JobState::Finished => "finished",
        JobState::Superseded => "superseded",
    }
}

pub(crate) fn parse_job_state(column: Column, text: &str) -> Result<JobState, StoreError> {
    Ok(match text {
        "running" => JobState::Running,
        "finished" => JobState::Finished,
        "superseded" => JobState::Superseded,
        _ => return Err(unknown(column, text)),
    })
}

/// An org id read back must still be one the service would accept.
pub(crate) fn parse_org(column: Column, text: &str) -> Result<OrgId, StoreError> {
    OrgId::parse(text).map_err(|why| invalid_id(column, text, why))
}

/// A KEK id read back must still be one the service would accept: it is
/// handed to callers, who rely on its form.
pub(crate) fn parse_kek_id(column: Column, text: &str) -> Result<KekId, StoreError> {
    KekId::parse(text).map_err(|why| invalid_id(column, text, why))
}

/// A resource name read back must still be one the service would accept.
pub(crate) fn parse_resource(column: Column, text: &str) -> Result<ResourceId, StoreError> {
    ResourceId::parse(text).map_err(|why| invalid_id(column, text, why))
}

/// Versions and sequence numbers are `u64` in Rust and signed 64-bit integers
/// in SQL; a negative one was not written by the store.
pub(crate) fn parse_unsigned(column: Column, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| Corruption::Negative { column, value }.into())
}

/// A chain hash must be exactly 32 bytes.
pub(crate) fn parse_hash(column: Column, bytes: &[u8]) -> Result<[u8; 32], StoreError> {
    bytes.try_into().map_err(|_| {
        Corruption::HashLength {
            column,
            len: bytes.len(),
        }
        .into()
    })
}

fn unknown(column: Column, text: &str) -> StoreError {
    Corruption::UnknownValue {
        column,
        value: text.to_owned(),
    }
    .into()
}

fn invalid_id(column: Column, text: &str, why: String) -> StoreError {
    Corruption::InvalidId {
        column,
        value: text.to_owned(),
        why,
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCES: [KeySource; 3] = [
        KeySource::Uploaded,
        KeySource::AwsKms,
        KeySource::GenericDefault,
    ];
    const STATES: [KeyState; 13] = [
        KeyState::Pending,
        KeyState::Active,
        KeyState::Rotating,
        KeyState::Deactivated {
            remove_at: Timestamp(7),
        },
        KeyState::Revoked,
        KeyState::Deleted {
            restore_until: Timestamp(8),
        },
        KeyState::Removed,
        KeyState::Lost,
        KeyState::RevokedByProvider {
            was: Place::Pending,
        },
        KeyState::RevokedByProvider { was: Place::Active },
        KeyState::RevokedByProvider {
            was: Place::Rotating,
        },
        KeyState::RevokedByProvider {
            was: Place::Deactivated {
                remove_at: Timestamp(9),
            },
        },
        KeyState::Revoked,
    ];

    fn c(name: &'static str) -> Column {
        Column { table: "t", name }
    }
    const KINDS: [IntentKind; 2] = [IntentKind::Import, IntentKind::Destroy];
    const JOB_STATES: [JobState; 3] = [JobState::Running, JobState::Finished, JobState::Superseded];

    #[test]
    fn every_variant_round_trips_through_distinct_text() {
        let mut seen = std::collections::HashSet::new();
        for source in SOURCES {
            assert!(seen.insert(key_source(source)));
            assert_eq!(
                parse_key_source(c("c"), key_source(source)).ok(),
                Some(source)
            );
        }
        let mut columns = std::collections::HashMap::new();
        for state in STATES {
            let stored = KeyColumns::of(state);
            assert_eq!(stored.decode("keys").ok(), Some(state), "{stored:?}");
            // Distinct states are distinct rows.
            if let Some(other) = columns.insert(stored, state) {
                assert_eq!(other, state);
            }
        }
        seen.clear();
        for kind in KINDS {
            assert!(seen.insert(intent_kind(kind)));
            assert_eq!(
                parse_intent_kind(c("c"), intent_kind(kind)).ok(),
                Some(kind)
            );
        }
        seen.clear();
        for state in JOB_STATES {
            assert!(seen.insert(job_state(state)));
            assert_eq!(parse_job_state(c("c"), job_state(state)).ok(), Some(state));
        }
    }

    #[test]
    fn unknown_text_is_corruption_naming_column_and_value() {
        let stored = |state, expires_at, before| KeyColumns {
            state,
            expires_at,
            needed: false,
            before_provider_revocation: before,
        };
        let Err(StoreError::Corrupt(corruption)) = stored("Active", None, None).decode("keys")
        else {
            panic!("a differently cased state must not decode");
        };
        assert_eq!(
            corruption.to_string(),
            r#"keys.state has unknown value "Active""#
        );
        // A state without the data it carries is corruption, not a default.
        for (state, before) in [
            ("deactivated", None),
            ("deleted", None),
            ("revoked_by_provider", None),
            ("revoked_by_provider", Some("deactivated")),
            ("revoked_by_provider", Some("revoked")),
        ] {
            assert!(
                matches!(
                    stored(state, None, before).decode("keys"),
                    Err(StoreError::Corrupt(_))
                ),
                "{state} {before:?}"
            );
        }
        assert!(matches!(
            parse_org(c("audit.org"), "no spaces allowed"),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            parse_kek_id(c("keks.kek_id"), "kek-ABC"),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            parse_resource(c("keks.resource"), ""),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            parse_job_state(c("rotation_jobs.state"), "Running"),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            parse_unsigned(c("orgs.version"), -1),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            parse_hash(c("audit.hash"), &[0; 31]),
            Err(StoreError::Corrupt(_))
        ));
    }
}
