//! The stored text of each enumeration, for every SQL backend.
//!
//! These strings are the on-disk format: a variant may be added, but an
//! existing string never changes. Decoding a string this code does not know is
//! [`StoreError::Corrupt`], naming the column and the value, so that a row
//! written by a newer release or edited by hand is never misread. The column
//! is a `Display` so that its name is only formatted for an error.

use std::fmt::Display;

use cmk_control_plane_domain::{KekId, KeySource, KeyState, OrgId, ResourceId};

use crate::{IntentKind, JobState, StoreError};

pub(crate) fn key_source(source: KeySource) -> &'static str {
    match source {
        KeySource::Uploaded => "uploaded",
        KeySource::AwsKms => "aws_kms",
        KeySource::GenericDefault => "generic_default",
    }
}

pub(crate) fn parse_key_source(column: &dyn Display, text: &str) -> Result<KeySource, StoreError> {
    Ok(match text {
        "uploaded" => KeySource::Uploaded,
        "aws_kms" => KeySource::AwsKms,
        "generic_default" => KeySource::GenericDefault,
        _ => return Err(unknown(column, text)),
    })
}

pub(crate) fn key_state(state: KeyState) -> &'static str {
    match state {
        KeyState::Pending => "pending",
        KeyState::Active => "active",
        KeyState::Rotating => "rotating",
        KeyState::Deactivated => "deactivated",
        KeyState::Revoked => "revoked",
        KeyState::Deleted => "deleted",
        KeyState::Removed => "removed",
        KeyState::RevokedByProvider => "revoked_by_provider",
    }
}

pub(crate) fn parse_key_state(column: &dyn Display, text: &str) -> Result<KeyState, StoreError> {
    Ok(match text {
        "pending" => KeyState::Pending,
        "active" => KeyState::Active,
        "rotating" => KeyState::Rotating,
        "deactivated" => KeyState::Deactivated,
        "revoked" => KeyState::Revoked,
        "deleted" => KeyState::Deleted,
        "removed" => KeyState::Removed,
        "revoked_by_provider" => KeyState::RevokedByProvider,
        _ => return Err(unknown(column, text)),
    })
}

pub(crate) fn intent_kind(kind: IntentKind) -> &'static str {
    match kind {
        IntentKind::Import => "import",
        IntentKind::Destroy => "destroy",
    }
}

pub(crate) fn parse_intent_kind(
    column: &dyn Display,
    text: &str,
) -> Result<IntentKind, StoreError> {
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

pub(crate) fn parse_job_state(column: &dyn Display, text: &str) -> Result<JobState, StoreError> {
    Ok(match text {
        "running" => JobState::Running,
        "finished" => JobState::Finished,
        "superseded" => JobState::Superseded,
        _ => return Err(unknown(column, text)),
    })
}

/// An org id read back must still be one the service would accept.
pub(crate) fn parse_org(column: &dyn Display, text: &str) -> Result<OrgId, StoreError> {
    OrgId::parse(text).map_err(|why| StoreError::Corrupt(format!("{column} {text:?}: {why}")))
}

/// A KEK id read back must still be one the service would accept: it is
/// handed to callers, who rely on its form.
pub(crate) fn parse_kek_id(column: &dyn Display, text: &str) -> Result<KekId, StoreError> {
    KekId::parse(text).map_err(|why| StoreError::Corrupt(format!("{column} {text:?}: {why}")))
}

/// A resource name read back must still be one the service would accept.
pub(crate) fn parse_resource(column: &dyn Display, text: &str) -> Result<ResourceId, StoreError> {
    ResourceId::parse(text).map_err(|why| StoreError::Corrupt(format!("{column} {text:?}: {why}")))
}

/// Versions and sequence numbers are `u64` in Rust and signed 64-bit integers
/// in SQL; a negative one was not written by the store.
pub(crate) fn parse_unsigned(column: &dyn Display, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{column} is negative: {value}")))
}

/// A chain hash must be exactly 32 bytes.
pub(crate) fn parse_hash(column: &dyn Display, bytes: &[u8]) -> Result<[u8; 32], StoreError> {
    bytes.try_into().map_err(|_| {
        StoreError::Corrupt(format!(
            "{column} is {} bytes, not a 32-byte hash",
            bytes.len()
        ))
    })
}

fn unknown(column: &dyn Display, text: &str) -> StoreError {
    StoreError::Corrupt(format!("{column} has unknown value {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCES: [KeySource; 3] = [
        KeySource::Uploaded,
        KeySource::AwsKms,
        KeySource::GenericDefault,
    ];
    const STATES: [KeyState; 8] = [
        KeyState::Pending,
        KeyState::Active,
        KeyState::Rotating,
        KeyState::Deactivated,
        KeyState::Revoked,
        KeyState::Deleted,
        KeyState::Removed,
        KeyState::RevokedByProvider,
    ];
    const KINDS: [IntentKind; 2] = [IntentKind::Import, IntentKind::Destroy];
    const JOB_STATES: [JobState; 3] = [JobState::Running, JobState::Finished, JobState::Superseded];

    #[test]
    fn every_variant_round_trips_through_distinct_text() {
        let mut seen = std::collections::HashSet::new();
        for source in SOURCES {
            assert!(seen.insert(key_source(source)));
            assert_eq!(
                parse_key_source(&"c", key_source(source)).ok(),
                Some(source)
            );
        }
        seen.clear();
        for state in STATES {
            assert!(seen.insert(key_state(state)));
            assert_eq!(parse_key_state(&"c", key_state(state)).ok(), Some(state));
        }
        seen.clear();
        for kind in KINDS {
            assert!(seen.insert(intent_kind(kind)));
            assert_eq!(parse_intent_kind(&"c", intent_kind(kind)).ok(), Some(kind));
        }
        seen.clear();
        for state in JOB_STATES {
            assert!(seen.insert(job_state(state)));
            assert_eq!(parse_job_state(&"c", job_state(state)).ok(), Some(state));
        }
    }

    #[test]
    fn unknown_text_is_corruption_naming_column_and_value() {
        let Err(StoreError::Corrupt(message)) = parse_key_state(&"keys.state", "Active") else {
            panic!("a differently cased state must not decode");
        };
        assert_eq!(message, r#"keys.state has unknown value "Active""#);
        assert!(matches!(
            parse_org(&"audit.org", "no spaces allowed"),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            parse_kek_id(&"keks.kek_id", "kek-ABC"),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            parse_resource(&"keks.resource", ""),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            parse_job_state(&"rotation_jobs.state", "Running"),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            parse_unsigned(&"orgs.version", -1),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            parse_hash(&"audit.hash", &[0; 31]),
            Err(StoreError::Corrupt(_))
        ));
    }
}
