//! The transition function: every rule about a single key.

use crate::{Action, KeyRecord, KeySource, KeyState, LifecycleError, Policy, Timestamp};

/// The record after `action`, or why `action` is not allowed now.
pub fn transition(
    key: &KeyRecord,
    action: Action,
    now: Timestamp,
    policy: &Policy,
) -> Result<KeyRecord, LifecycleError> {
    use Action as A;
    use KeyState as S;
    let mut next = key.clone();
    match (key.state, action) {
        (S::Pending, A::Activate) | (S::Revoked, A::Reactivate) => {
            next.state = S::Active;
            next.activated_at = Some(now);
        }
        (S::Pending, A::Cancel) => next.state = S::Removed,
        (S::Active, A::Supersede) => next.state = S::Rotating,
        (S::Active, A::Revoke) => {
            if key.source == KeySource::GenericDefault {
                return Err(LifecycleError::GenericDefaultNotRevocable {
                    key: key.id.clone(),
                });
            }
            next.state = S::Revoked;
            next.revoked_at = Some(now);
        }
        (S::Rotating, A::FinishRotation) => match key.source {
            KeySource::Uploaded => {
                next.state = S::Deactivated;
                next.expires_at = Some(now.plus(policy.deactivated_retention));
            }
            // Nothing of these is held by the service: they simply leave the list.
            KeySource::AwsKms | KeySource::GenericDefault => next.state = S::Removed,
        },
        (S::Revoked, A::Delete) => {
            next.state = S::Deleted;
            next.expires_at = Some(now.plus(policy.restore_window));
        }
        (S::Deleted, A::Restore) => {
            let ends = key.expires_at.unwrap_or(now);
            if now >= ends {
                return Err(LifecycleError::RestoreWindowClosed {
                    key: key.id.clone(),
                    ended: ends,
                });
            }
            next.state = S::Revoked;
            next.expires_at = None;
        }
        (S::Deactivated | S::Deleted, A::Expire) => {
            let due = key.expires_at.unwrap_or(now);
            if now < due {
                return Err(LifecycleError::NotDue {
                    key: key.id.clone(),
                    due,
                });
            }
            next.needed = key.state == S::Deleted;
            next.state = S::Removed;
            next.expires_at = None;
        }
        (S::Removed, A::Recover) if key.needed => {
            next.state = S::Revoked;
            next.needed = false;
        }
        (S::Pending | S::Active | S::Rotating | S::Deactivated, A::ProviderDisable)
            if key.source == KeySource::AwsKms =>
        {
            next.before_provider_revocation = Some(key.state);
            next.state = S::RevokedByProvider;
        }
        (S::RevokedByProvider, A::ProviderEnable) => {
            next.state = key.slot();
            next.before_provider_revocation = None;
        }
        // A pending key could be cancelled before its provider disabled it,
        // and nothing has used it since.
        (S::RevokedByProvider, A::Cancel) if key.slot() == S::Pending => {
            next.state = S::Removed;
            next.before_provider_revocation = None;
        }
        (
            S::Pending
            | S::Active
            | S::Rotating
            | S::Deactivated
            | S::Revoked
            | S::Deleted
            | S::Removed
            | S::RevokedByProvider,
            _,
        ) => {
            return Err(LifecycleError::InvalidTransition {
                key: key.id.clone(),
                state: key.state,
                action,
                allowed: allowed(key),
            });
        }
    }
    Ok(next)
}

/// What an admin may do from the key's state, in words.
fn allowed(key: &KeyRecord) -> String {
    match key.state {
        KeyState::Pending => "a pending key can be activated or cancelled".into(),
        KeyState::Active if key.source == KeySource::GenericDefault => {
            "the generic default key is replaced by activating a key of your own".into()
        }
        KeyState::Active => {
            "an active key can be revoked, or replaced by activating a pending key".into()
        }
        KeyState::Rotating => {
            "a rotating key changes state by itself once every KEK is re-wrapped".into()
        }
        KeyState::Deactivated => "a deactivated key is removed when its retention ends".into(),
        KeyState::Revoked => "a revoked key can be reactivated or deleted".into(),
        KeyState::Deleted => match key.expires_at {
            Some(ends) => format!("a deleted key can be restored until {ends}"),
            None => "a deleted key can be restored".into(),
        },
        KeyState::Removed if key.needed => {
            format!(
                "upload the original key (check value {}) again to recover it",
                key.check_value
            )
        }
        KeyState::Removed => "a removed key is gone".into(),
        KeyState::RevokedByProvider => match key.slot() {
            KeyState::Pending => "a pending key disabled at its provider becomes pending again \
                                  once enabled there, and can be cancelled meanwhile"
                .into(),
            before => format!("it becomes {before} again once enabled at its provider"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyId;

    fn key(state: KeyState, source: KeySource) -> KeyRecord {
        KeyRecord {
            state,
            ..KeyRecord::pending(
                KeyId("k1".into()),
                source,
                "AB12CD34EF".into(),
                Timestamp(0),
            )
        }
    }

    #[test]
    fn every_refusal_says_what_is_allowed() {
        let policy = Policy::default();
        let err = transition(
            &key(KeyState::Rotating, KeySource::Uploaded),
            Action::Revoke,
            Timestamp(1),
            &policy,
        )
        .expect_err("revoke a rotating key");
        assert_eq!(
            err.to_string(),
            "key k1 is rotating: cannot revoke it; a rotating key changes state by itself once every KEK is re-wrapped"
        );
        let err = transition(
            &key(KeyState::Pending, KeySource::Uploaded),
            Action::Revoke,
            Timestamp(1),
            &policy,
        )
        .expect_err("revoke a pending key");
        assert!(
            err.to_string()
                .contains("a pending key can be activated or cancelled"),
            "{err}"
        );
    }

    #[test]
    fn restore_only_inside_the_window() {
        let policy = Policy::default();
        let revoked = key(KeyState::Revoked, KeySource::Uploaded);
        let deleted =
            transition(&revoked, Action::Delete, Timestamp(100), &policy).expect("delete");
        let window = policy.restore_window.as_secs() as i64;
        assert_eq!(deleted.expires_at, Some(Timestamp(100 + window)));
        let restored = transition(
            &deleted,
            Action::Restore,
            Timestamp(100 + window - 1),
            &policy,
        )
        .expect("restore");
        assert_eq!(restored.state, KeyState::Revoked);
        assert_eq!(
            transition(&deleted, Action::Restore, Timestamp(100 + window), &policy),
            Err(LifecycleError::RestoreWindowClosed {
                key: KeyId("k1".into()),
                ended: Timestamp(100 + window)
            })
        );
        assert!(matches!(
            transition(
                &deleted,
                Action::Expire,
                Timestamp(100 + window - 1),
                &policy
            ),
            Err(LifecycleError::NotDue { .. })
        ));
        let removed =
            transition(&deleted, Action::Expire, Timestamp(100 + window), &policy).expect("expire");
        assert!(
            removed.needed,
            "a key removed while deleted is still needed"
        );
        let recovered = transition(
            &removed,
            Action::Recover,
            Timestamp(100 + window + 5),
            &policy,
        )
        .expect("recover");
        assert_eq!(recovered.state, KeyState::Revoked);
    }

    #[test]
    fn rotated_off_keys_the_service_does_not_hold_leave_the_list() {
        let policy = Policy::default();
        for (source, expected) in [
            (KeySource::Uploaded, KeyState::Deactivated),
            (KeySource::AwsKms, KeyState::Removed),
            (KeySource::GenericDefault, KeyState::Removed),
        ] {
            let next = transition(
                &key(KeyState::Rotating, source),
                Action::FinishRotation,
                Timestamp(5),
                &policy,
            )
            .expect("finish");
            assert_eq!(next.state, expected, "{source:?}");
        }
    }

    #[test]
    fn a_key_revoked_by_its_provider_returns_to_the_state_it_came_from() {
        let policy = Policy::default();
        for state in [
            KeyState::Pending,
            KeyState::Active,
            KeyState::Rotating,
            KeyState::Deactivated,
        ] {
            let before = KeyRecord {
                expires_at: Some(Timestamp(99)),
                ..key(state, KeySource::AwsKms)
            };
            let disabled = transition(&before, Action::ProviderDisable, Timestamp(1), &policy)
                .expect("disable");
            assert_eq!(disabled.state, KeyState::RevokedByProvider, "{state}");
            assert_eq!(disabled.slot(), state, "it keeps its place");
            let again = transition(&disabled, Action::ProviderDisable, Timestamp(2), &policy)
                .expect_err("disabled twice");
            assert!(
                again.to_string().contains(&format!(
                    "cannot record its provider disabling it; {}",
                    match state {
                        KeyState::Pending => "a pending key disabled at its provider".to_owned(),
                        state => format!("it becomes {state} again once enabled at its provider"),
                    }
                )),
                "{again}"
            );
            let enabled = transition(&disabled, Action::ProviderEnable, Timestamp(3), &policy)
                .expect("enable");
            assert_eq!(enabled, before, "{state}: exactly as before");
        }
        // Only what the service still uses can be disabled: a revoked, deleted
        // or removed key is blocked or gone already.
        for state in [KeyState::Revoked, KeyState::Deleted, KeyState::Removed] {
            let err = transition(
                &key(state, KeySource::AwsKms),
                Action::ProviderDisable,
                Timestamp(1),
                &policy,
            )
            .expect_err("not from this state");
            assert!(
                matches!(err, LifecycleError::InvalidTransition { .. }),
                "{state}: {err}"
            );
        }
        for state in [KeyState::Pending, KeyState::Active] {
            assert!(
                transition(
                    &key(state, KeySource::AwsKms),
                    Action::ProviderEnable,
                    Timestamp(1),
                    &policy
                )
                .is_err(),
                "{state} is not disabled"
            );
        }
    }

    #[test]
    fn only_a_formerly_pending_key_revoked_by_its_provider_can_be_cancelled() {
        let policy = Policy::default();
        for (state, cancellable) in [
            (KeyState::Pending, true),
            (KeyState::Active, false),
            (KeyState::Rotating, false),
        ] {
            let disabled = transition(
                &key(state, KeySource::AwsKms),
                Action::ProviderDisable,
                Timestamp(1),
                &policy,
            )
            .expect("disable");
            let cancelled = transition(&disabled, Action::Cancel, Timestamp(2), &policy);
            assert_eq!(cancelled.is_ok(), cancellable, "{state}: {cancelled:?}");
            if let Ok(cancelled) = cancelled {
                assert_eq!(cancelled.state, KeyState::Removed);
                assert_eq!(cancelled.before_provider_revocation, None);
            }
            for action in [Action::Activate, Action::Revoke, Action::Delete] {
                assert!(
                    transition(&disabled, action, Timestamp(2), &policy).is_err(),
                    "{state}: {action}"
                );
            }
        }
    }

    #[test]
    fn only_external_keys_can_be_revoked_by_their_provider() {
        let policy = Policy::default();
        let aws = transition(
            &key(KeyState::Active, KeySource::AwsKms),
            Action::ProviderDisable,
            Timestamp(1),
            &policy,
        )
        .expect("disable");
        assert_eq!(aws.state, KeyState::RevokedByProvider);
        let back = transition(&aws, Action::ProviderEnable, Timestamp(2), &policy).expect("enable");
        assert_eq!(back.state, KeyState::Active);
        assert!(
            transition(
                &key(KeyState::Active, KeySource::Uploaded),
                Action::ProviderDisable,
                Timestamp(1),
                &policy
            )
            .is_err()
        );
    }
}
