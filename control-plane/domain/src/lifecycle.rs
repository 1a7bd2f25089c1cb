//! The transition function: every rule about a single key.

use crate::{Action, KeyRecord, KeySource, KeyState, LifecycleError, Place, Policy, Timestamp};

/// The record after `action`, or why `action` is not allowed now.
///
/// Matched action by action, with no catch-all: a new action does not build
/// until this function says from which states it is allowed.
pub fn transition(
    key: &KeyRecord,
    action: Action,
    now: Timestamp,
    policy: &Policy,
) -> Result<KeyRecord, LifecycleError> {
    use Action as A;
    use KeyState as S;
    let refuse = || LifecycleError::InvalidTransition {
        key: key.id.clone(),
        state: key.state,
        action,
        allowed: allowed(key),
    };
    let mut next = key.clone();
    match action {
        A::Activate | A::Reactivate => {
            if !matches!(
                (action, key.state),
                (A::Activate, S::Pending) | (A::Reactivate, S::Revoked)
            ) {
                return Err(refuse());
            }
            next.state = S::Active;
            next.activated_at = Some(now);
        }
        A::Cancel => {
            // A pending key could be cancelled before its provider disabled
            // it, and nothing has used it since.
            if !matches!(
                key.state,
                S::Pending
                    | S::RevokedByProvider {
                        was: Place::Pending
                    }
            ) {
                return Err(refuse());
            }
            next.state = S::Removed;
        }
        A::Supersede => {
            if key.state != S::Active {
                return Err(refuse());
            }
            next.state = S::Rotating;
        }
        A::Revoke => {
            if key.state != S::Active {
                return Err(refuse());
            }
            if key.source == KeySource::GenericDefault {
                return Err(LifecycleError::GenericDefaultNotRevocable {
                    key: key.id.clone(),
                });
            }
            next.state = S::Revoked;
            next.revoked_at = Some(now);
        }
        A::FinishRotation => {
            if key.state != S::Rotating {
                return Err(refuse());
            }
            next.state = match key.source {
                KeySource::Uploaded => S::Deactivated {
                    remove_at: now.plus(policy.deactivated_retention),
                },
                // Nothing of these is held by the service: they simply leave the list.
                KeySource::AwsKms | KeySource::GenericDefault => S::Removed,
            };
        }
        A::Delete => {
            if key.state != S::Revoked {
                return Err(refuse());
            }
            next.state = S::Deleted {
                restore_until: now.plus(policy.restore_window),
            };
        }
        A::Restore => {
            let S::Deleted { restore_until } = key.state else {
                return Err(refuse());
            };
            if now >= restore_until {
                return Err(LifecycleError::RestoreWindowClosed {
                    key: key.id.clone(),
                    ended: restore_until,
                });
            }
            next.state = S::Revoked;
        }
        A::Expire => {
            let Some(due) = key.state.due() else {
                return Err(refuse());
            };
            if now < due {
                return Err(LifecycleError::NotDue {
                    key: key.id.clone(),
                    due,
                });
            }
            // A deleted key may still wrap KEKs: the org stays blocked.
            next.state = match key.state.blocks_org() {
                true => S::Lost,
                false => S::Removed,
            };
        }
        A::Recover => {
            if key.state != S::Lost {
                return Err(refuse());
            }
            next.state = S::Revoked;
        }
        A::ProviderDisable => {
            if key.source != KeySource::AwsKms {
                return Err(refuse());
            }
            // Revoked, deleted or removed: blocked or gone already.
            let Some(was) = Place::of(key.state) else {
                return Err(refuse());
            };
            next.state = S::RevokedByProvider { was };
        }
        A::ProviderEnable => {
            let S::RevokedByProvider { was } = key.state else {
                return Err(refuse());
            };
            next.state = was.into();
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
        KeyState::Deactivated { .. } => {
            "a deactivated key is removed when its retention ends".into()
        }
        KeyState::Revoked => "a revoked key can be reactivated or deleted".into(),
        KeyState::Deleted { restore_until } => {
            format!("a deleted key can be restored until {restore_until}")
        }
        KeyState::Lost => {
            format!(
                "upload the original key (check value {}) again to recover it",
                key.check_value
            )
        }
        KeyState::Removed => "a removed key is gone".into(),
        KeyState::RevokedByProvider { was } => match was {
            Place::Pending => "a pending key disabled at its provider becomes pending again \
                               once enabled there, and can be cancelled meanwhile"
                .into(),
            Place::Active | Place::Rotating | Place::Deactivated { .. } => format!(
                "it becomes {} again once enabled at its provider",
                KeyState::from(was)
            ),
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
        assert_eq!(
            deleted.state,
            KeyState::Deleted {
                restore_until: Timestamp(100 + window)
            }
        );
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
        assert_eq!(
            removed.state,
            KeyState::Lost,
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
            (
                KeySource::Uploaded,
                KeyState::Deactivated {
                    remove_at: Timestamp(5).plus(policy.deactivated_retention),
                },
            ),
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
            KeyState::Deactivated {
                remove_at: Timestamp(99),
            },
        ] {
            let before = key(state, KeySource::AwsKms);
            let disabled = transition(&before, Action::ProviderDisable, Timestamp(1), &policy)
                .expect("disable");
            assert!(
                matches!(disabled.state, KeyState::RevokedByProvider { .. }),
                "{state}"
            );
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
        for state in [
            KeyState::Revoked,
            KeyState::Deleted {
                restore_until: Timestamp(9),
            },
            KeyState::Removed,
            KeyState::Lost,
        ] {
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
        assert_eq!(
            aws.state,
            KeyState::RevokedByProvider { was: Place::Active }
        );
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
