//! The rules that span an organisation's keys.

use crate::{
    Action, KeyId, KeyRecord, KeySource, KeyState, LifecycleError, Policy, Timestamp, transition,
};

/// A request to change an org's keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// A key was taken into custody (uploaded, or an external key added).
    Add {
        /// Id for the new key.
        id: KeyId,
        /// Where it lives.
        source: KeySource,
        /// Its check value.
        check_value: String,
        /// Activate at once instead of leaving it pending.
        activate_now: bool,
    },
    /// The custody backend took a removed key's original material back under
    /// the key's own handle, having matched it against the fingerprint it kept
    /// when it destroyed the key: removed while still needed → revoked.
    Recover {
        /// The removed key.
        id: KeyId,
        /// The check value custody reported for the material taken back.
        check_value: String,
    },
    /// Switch bring-your-own-key on: the org may add and activate keys of
    /// its own.
    EnableByok,
    /// Switch it off: the generic default key becomes the master again,
    /// unless it is already.
    DisableByok {
        /// Id for the org's new record of the generic default key.
        id: KeyId,
        /// The generic default key's check value.
        check_value: String,
    },
    /// The generic default key was renewed: the org's record of the new
    /// material becomes the master, the old one rotates. Only while the old
    /// generic default key is the master.
    RenewGeneric {
        /// Id for the org's record of the new generic default key.
        id: KeyId,
        /// The new material's check value.
        check_value: String,
    },
    /// Pending → active; the active key starts rotating.
    Activate(KeyId),
    /// Pending → removed.
    Cancel(KeyId),
    /// Active → revoked.
    Revoke(KeyId),
    /// Revoked → active.
    Reactivate(KeyId),
    /// Revoked → deleted.
    Delete(KeyId),
    /// Deleted → revoked.
    Restore(KeyId),
    /// Rotating → deactivated (or removed), reported by the rotation job.
    FinishRotation(KeyId),
    /// An external key's provider reports it disabled or scheduled for
    /// deletion: → revoked by provider, keeping its place.
    ProviderDisable(KeyId),
    /// Its provider reports it usable again: back to the state it came from.
    ProviderEnable(KeyId),
    /// Remove every deactivated or deleted key whose time is up.
    ExpireDue,
}

/// One key's change of state, for the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The key.
    pub key: KeyId,
    /// Its state before; `None` for a key the command added.
    pub from: Option<KeyState>,
    /// Its state after.
    pub to: KeyState,
}

/// What the service must do for a command beside storing the new org: the
/// conditions its commit checks, and what it starts or undoes in custody.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Record a rotation job, in the same commit, that re-wraps every KEK of
    /// `from` to `target`: the active key was superseded.
    StartRotation {
        /// The new active key.
        target: KeyId,
        /// Every rotating key.
        from: Vec<KeyId>,
    },
    /// Commit only if `key` wraps no KEK: a rotation finishes only once every
    /// KEK it wrapped has been re-wrapped.
    RequireNoKeks(KeyId),
    /// Commit only if the shared generic default key that `key` records is
    /// still the current one (it is renewed service-wide).
    UsesGeneric(KeyId),
    /// Destroy `key`'s material in custody once the commit is durable. Never
    /// for the shared generic default key, which other orgs still use.
    Destroy(KeyId),
    /// Rotation jobs that waited can go on: the master is usable again, or a
    /// rotating key whose KEKs the job could not open.
    ResumeRotation,
}

/// The result of a command: the new org, what changed, and what must happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The org after the command.
    pub org: Org,
    /// Each key's change of state, in order.
    pub changes: Vec<Change>,
    /// What the service must do, in order.
    pub effects: Vec<Effect>,
}

/// All keys of one organisation, and whether it brings its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Org {
    byok: bool,
    keys: Vec<KeyRecord>,
}

impl Org {
    /// A new org whose master key is the generic default key.
    pub fn new(generic_id: KeyId, generic_check_value: String, now: Timestamp) -> Self {
        let mut generic = KeyRecord::pending(
            generic_id,
            KeySource::GenericDefault,
            generic_check_value,
            now,
        );
        generic.state = KeyState::Active;
        generic.activated_at = Some(now);
        Self {
            byok: false,
            keys: vec![generic],
        }
    }

    /// An org as stored. The caller vouches that the records came from this
    /// module; [`Org::check_invariants`] says whether they still hold.
    pub fn from_records(byok: bool, keys: Vec<KeyRecord>) -> Self {
        Self { byok, keys }
    }

    /// Whether bring-your-own-key is on.
    pub fn byok(&self) -> bool {
        self.byok
    }

    /// Whether the org may add, recover or activate keys of its own: only
    /// with bring-your-own-key on.
    pub fn accepts_own_keys(&self) -> Result<(), LifecycleError> {
        match self.byok {
            true => Ok(()),
            false => Err(LifecycleError::ByokOff),
        }
    }

    /// Every key, removed ones included, oldest first.
    pub fn keys(&self) -> &[KeyRecord] {
        &self.keys
    }

    /// The key that wraps new KEKs, if the master is not revoked.
    pub fn active(&self) -> Option<&KeyRecord> {
        self.in_state(KeyState::Active)
    }

    /// The key that wraps new KEKs, or why the org's KEKs and content keys
    /// cannot be used at all: while the master key is revoked, deleted, lost
    /// or disabled at its provider, nothing of the org may be encrypted or
    /// decrypted (README.md, "Key lifecycle").
    pub fn content_master(&self) -> Result<&KeyRecord, LifecycleError> {
        if let Some(master) = self.revoked_master() {
            let (state, remedy) = match master.state {
                KeyState::Deleted { .. } => ("deleted", "restore and reactivate it".to_owned()),
                KeyState::Lost => (
                    "removed",
                    format!(
                        "upload the original key (check value {}) again and reactivate it",
                        master.check_value
                    ),
                ),
                _ => ("revoked", "reactivate it".to_owned()),
            };
            return Err(LifecycleError::ContentBlocked {
                master: master.id.clone(),
                state,
                remedy,
            });
        }
        if let Some(master) = self.provider_revoked(KeyState::Active) {
            return Err(LifecycleError::ContentBlocked {
                master: master.id.clone(),
                state: "revoked by its provider (disabled or pending deletion in AWS KMS)",
                remedy: "enable the key in AWS KMS again, or cancel its deletion".to_owned(),
            });
        }
        self.active().ok_or(LifecycleError::NoActiveKey)
    }

    /// A key by id.
    pub fn key(&self, id: &KeyId) -> Result<&KeyRecord, LifecycleError> {
        self.keys
            .iter()
            .find(|k| &k.id == id)
            .ok_or_else(|| LifecycleError::UnknownKey(id.clone()))
    }

    /// The org after `command`, with the changes it made and what the
    /// service must do about them; or why it is refused, in which case
    /// nothing changed.
    pub fn handle(
        &self,
        command: Command,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<Outcome, LifecycleError> {
        let mut next = Working {
            org: self.clone(),
            changes: Vec::new(),
            effects: Vec::new(),
            now,
            policy,
        };
        match command {
            Command::Add {
                id,
                source,
                check_value,
                activate_now,
            } => {
                next.require_byok()?;
                if let Some(existing) = self.keys.iter().find(|k| k.check_value == check_value) {
                    match existing.state {
                        // Custody alone can prove material is a lost key's
                        // (`Recover`); a check value is 40 bits, no proof.
                        KeyState::Lost => {
                            return Err(LifecycleError::NotTheRemovedKey {
                                removed: existing.id.clone(),
                                check_value,
                            });
                        }
                        KeyState::Removed => {}
                        state => {
                            return Err(LifecycleError::AlreadyPresent {
                                existing: existing.id.clone(),
                                state,
                                check_value,
                            });
                        }
                    }
                }
                next.add(id.clone(), source, check_value)?;
                if activate_now {
                    next.activate(&id)?;
                }
            }
            Command::Recover { id, check_value } => {
                next.require_byok()?;
                let removed = self.key(&id)?;
                // Custody matched the full fingerprint; a different check value
                // would mean it took back some other key.
                if removed.check_value != check_value {
                    return Err(LifecycleError::NotTheRemovedKey {
                        removed: id,
                        check_value,
                    });
                }
                next.apply(&id, Action::Recover)?;
            }
            Command::EnableByok => next.org.byok = true,
            Command::DisableByok { id, check_value } => {
                next.org.byok = false;
                let generic_active = self
                    .active()
                    .is_some_and(|k| k.source == KeySource::GenericDefault);
                if !generic_active {
                    // A pending key of the org's own stays pending (it can be
                    // cancelled); the generic record is pending only within
                    // this command.
                    next.add_beside_pending(id.clone(), KeySource::GenericDefault, check_value)?;
                    next.activate(&id)?;
                }
            }
            Command::RenewGeneric { id, check_value } => {
                match self.active() {
                    Some(active)
                        if active.source == KeySource::GenericDefault
                            && active.check_value != check_value => {}
                    Some(active) if active.source == KeySource::GenericDefault => {
                        return Err(LifecycleError::GenericAlreadyActive {
                            key: active.id.clone(),
                        });
                    }
                    _ => return Err(LifecycleError::GenericNotMaster),
                }
                next.add_beside_pending(id.clone(), KeySource::GenericDefault, check_value)?;
                next.activate(&id)?;
            }
            Command::Activate(id) => {
                // With BYOK off only the generic default key is activated, and
                // by the commands above.
                next.require_byok()?;
                next.activate(&id)?;
            }
            Command::Cancel(id) => next.apply(&id, Action::Cancel)?,
            Command::Revoke(id) => next.apply(&id, Action::Revoke)?,
            Command::Reactivate(id) => next.apply(&id, Action::Reactivate)?,
            Command::Delete(id) => next.apply(&id, Action::Delete)?,
            Command::Restore(id) => next.apply(&id, Action::Restore)?,
            Command::FinishRotation(id) => {
                next.apply(&id, Action::FinishRotation)?;
                next.effects.push(Effect::RequireNoKeks(id));
            }
            Command::ProviderDisable(id) => next.apply(&id, Action::ProviderDisable)?,
            Command::ProviderEnable(id) => next.apply(&id, Action::ProviderEnable)?,
            Command::ExpireDue => {
                let due: Vec<KeyId> = self
                    .keys
                    .iter()
                    .filter(|k| k.state.due().is_some_and(|t| t <= now))
                    .map(|k| k.id.clone())
                    .collect();
                for id in due {
                    next.apply(&id, Action::Expire)?;
                }
            }
        }
        Ok(next.finish())
    }

    /// The org-wide invariants: at most one pending, one active, and one revoked
    /// (revoked, deleted, or removed while needed) key; never an active key
    /// beside a revoked one. A key revoked by its provider counts where it
    /// came from ([`KeyRecord::slot`]).
    pub fn check_invariants(&self) -> Result<(), String> {
        let count =
            |pred: &dyn Fn(&KeyRecord) -> bool| self.keys.iter().filter(|k| pred(k)).count();
        let pending = count(&|k| k.slot() == KeyState::Pending);
        let active = count(&|k| k.slot() == KeyState::Active);
        let revoked = count(&|k| is_revoked_master(k));
        if pending > 1 || active > 1 || revoked > 1 || (active > 0 && revoked > 0) {
            return Err(format!(
                "{pending} pending, {active} active, {revoked} revoked keys: {:?}",
                self.keys
                    .iter()
                    .map(|k| (&k.id.0, k.state))
                    .collect::<Vec<_>>()
            ));
        }
        Ok(())
    }

    fn in_state(&self, state: KeyState) -> Option<&KeyRecord> {
        self.keys.iter().find(|k| k.state == state)
    }

    fn revoked_master(&self) -> Option<&KeyRecord> {
        self.keys.iter().find(|k| is_revoked_master(k))
    }

    /// The key revoked by its provider that holds the place of `slot`.
    fn provider_revoked(&self, slot: KeyState) -> Option<&KeyRecord> {
        self.keys
            .iter()
            .find(|k| matches!(k.state, KeyState::RevokedByProvider { .. }) && k.slot() == slot)
    }
}

/// A key that blocks the org: revoked, deleted, or removed while still needed.
fn is_revoked_master(key: &KeyRecord) -> bool {
    key.state.blocks_org()
}

/// An org being changed by one command.
struct Working<'a> {
    org: Org,
    changes: Vec<Change>,
    effects: Vec<Effect>,
    now: Timestamp,
    policy: &'a Policy,
}

impl Working<'_> {
    /// The outcome, with the effects that follow from the changes.
    fn finish(self) -> Outcome {
        let Self {
            org,
            changes,
            mut effects,
            ..
        } = self;
        let source = |id: &KeyId| org.key(id).map(|k| k.source).ok();
        for change in &changes {
            let generic = source(&change.key) == Some(KeySource::GenericDefault);
            if change.from.is_none() && generic {
                effects.push(Effect::UsesGeneric(change.key.clone()));
            }
            // The generic default key is shared: removing an org's record of
            // it destroys nothing.
            if change.to.is_removed() && !generic {
                effects.push(Effect::Destroy(change.key.clone()));
            }
        }
        let superseded = changes
            .iter()
            .any(|c| c.from == Some(KeyState::Active) && c.to == KeyState::Rotating);
        if let (true, Some(target)) = (superseded, org.active()) {
            effects.push(Effect::StartRotation {
                target: target.id.clone(),
                from: org
                    .keys
                    .iter()
                    .filter(|k| k.state == KeyState::Rotating)
                    .map(|k| k.id.clone())
                    .collect(),
            });
        }
        // A new job, or a paused one that can continue: the master is back,
        // or a key whose KEKs it waited for.
        if superseded
            || changes.iter().any(|c| {
                c.to == KeyState::Active
                    || matches!(c.from, Some(KeyState::RevokedByProvider { .. }))
            })
        {
            effects.push(Effect::ResumeRotation);
        }
        Outcome {
            org,
            changes,
            effects,
        }
    }

    fn require_byok(&self) -> Result<(), LifecycleError> {
        self.org.accepts_own_keys()
    }

    fn apply(&mut self, id: &KeyId, action: Action) -> Result<(), LifecycleError> {
        let index = self
            .org
            .keys
            .iter()
            .position(|k| &k.id == id)
            .ok_or_else(|| LifecycleError::UnknownKey(id.clone()))?;
        let key = &self.org.keys[index];
        let next = transition(key, action, self.now, self.policy)?;
        self.changes.push(Change {
            key: id.clone(),
            from: Some(key.state),
            to: next.state,
        });
        self.org.keys[index] = next;
        Ok(())
    }

    fn add(
        &mut self,
        id: KeyId,
        source: KeySource,
        check_value: String,
    ) -> Result<(), LifecycleError> {
        if let Some(pending) = self.org.in_state(KeyState::Pending) {
            return Err(LifecycleError::PendingExists {
                pending: pending.id.clone(),
            });
        }
        if let Some(pending) = self.org.provider_revoked(KeyState::Pending) {
            return Err(LifecycleError::PendingRevokedByProvider {
                pending: pending.id.clone(),
            });
        }
        self.add_beside_pending(id, source, check_value)
    }

    fn add_beside_pending(
        &mut self,
        id: KeyId,
        source: KeySource,
        check_value: String,
    ) -> Result<(), LifecycleError> {
        if self.org.keys.iter().any(|k| k.id == id) {
            return Err(LifecycleError::DuplicateId(id));
        }
        self.changes.push(Change {
            key: id.clone(),
            from: None,
            to: KeyState::Pending,
        });
        self.org
            .keys
            .push(KeyRecord::pending(id, source, check_value, self.now));
        Ok(())
    }

    /// Pending → active, the previous active key → rotating.
    fn activate(&mut self, id: &KeyId) -> Result<(), LifecycleError> {
        // An unknown key is NOT_FOUND whatever the state of the org.
        self.org.key(id)?;
        // Checked before the blocked master below, whose message would tell
        // the admin to do something only AWS KMS can.
        if let Some(master) = self.org.provider_revoked(KeyState::Active) {
            return Err(LifecycleError::MasterRevokedByProvider {
                master: master.id.clone(),
            });
        }
        if let Err(LifecycleError::ContentBlocked {
            master,
            state,
            remedy,
        }) = self.org.content_master()
        {
            return Err(LifecycleError::MasterRevoked {
                master,
                state,
                remedy,
            });
        }
        // Check the target first: a refused activation must not supersede anything.
        transition(self.org.key(id)?, Action::Activate, self.now, self.policy)?;
        if let Some(previous) = self.org.active().map(|k| k.id.clone()) {
            self.apply(&previous, Action::Supersede)?;
        }
        self.apply(id, Action::Activate)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::Place;
    use proptest::prelude::*;

    /// `handle`, for tests that look at the org and its changes only.
    trait Run {
        fn run(
            &self,
            command: Command,
            now: Timestamp,
            policy: &Policy,
        ) -> Result<(Org, Vec<Change>), LifecycleError>;
    }

    impl Run for Org {
        fn run(
            &self,
            command: Command,
            now: Timestamp,
            policy: &Policy,
        ) -> Result<(Org, Vec<Change>), LifecycleError> {
            self.handle(command, now, policy)
                .map(|outcome| (outcome.org, outcome.changes))
        }
    }

    fn id(n: &str) -> KeyId {
        KeyId(n.into())
    }

    /// A new org that has switched BYOK on.
    fn org() -> Org {
        Org::new(id("generic"), "GEN0000000".into(), Timestamp(0))
            .run(Command::EnableByok, Timestamp(0), &Policy::default())
            .unwrap()
            .0
    }

    fn state(org: &Org, key: &str) -> KeyState {
        org.key(&id(key)).expect("key").state
    }

    fn add(key: &str, kcv: &str, activate_now: bool) -> Command {
        Command::Add {
            id: id(key),
            source: KeySource::Uploaded,
            check_value: kcv.into(),
            activate_now,
        }
    }

    /// The seed's flow: upload → activate later → activate → revoke → reactivate
    /// → upload a second key → activate → the first finishes rotating → deleted
    /// after retention... as far as the lifecycle goes.
    #[test]
    fn the_walk_through() {
        let p = Policy::default();
        let t = Timestamp;
        let (o, _) = org().run(add("a", "AAAAAAAAAA", false), t(1), &p).unwrap();
        assert_eq!(state(&o, "a"), KeyState::Pending);
        let (o, changes) = o.run(Command::Activate(id("a")), t(2), &p).unwrap();
        assert_eq!(
            changes,
            vec![
                Change {
                    key: id("generic"),
                    from: Some(KeyState::Active),
                    to: KeyState::Rotating
                },
                Change {
                    key: id("a"),
                    from: Some(KeyState::Pending),
                    to: KeyState::Active
                },
            ]
        );
        let (o, _) = o
            .run(Command::FinishRotation(id("generic")), t(3), &p)
            .unwrap();
        assert_eq!(
            state(&o, "generic"),
            KeyState::Removed,
            "the generic key just leaves the list"
        );
        let (o, _) = o.run(Command::Revoke(id("a")), t(4), &p).unwrap();
        assert!(o.active().is_none());
        let err = o.run(add("b", "BBBBBBBBBB", true), t(5), &p).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the organisation's master key a is revoked: reactivate it first, then rotate to a new key"
        );
        let (o, _) = o.run(Command::Reactivate(id("a")), t(6), &p).unwrap();
        let (o, _) = o.run(add("b", "BBBBBBBBBB", false), t(7), &p).unwrap();
        let (o, _) = o.run(Command::Activate(id("b")), t(8), &p).unwrap();
        assert_eq!(state(&o, "a"), KeyState::Rotating);
        let (o, _) = o.run(Command::FinishRotation(id("a")), t(9), &p).unwrap();
        let due = t(9).plus(p.deactivated_retention);
        assert_eq!(
            state(&o, "a"),
            KeyState::Deactivated { remove_at: due },
            "it knows when it goes"
        );
        let (same, changes) = o.run(Command::ExpireDue, Timestamp(due.0 - 1), &p).unwrap();
        assert!(changes.is_empty());
        assert_eq!(same, o);
        let (o, changes) = o.run(Command::ExpireDue, due, &p).unwrap();
        assert_eq!(
            changes,
            vec![Change {
                key: id("a"),
                from: Some(KeyState::Deactivated { remove_at: due }),
                to: KeyState::Removed
            }]
        );
        assert_eq!(o.active().map(|k| k.id.clone()), Some(id("b")));
    }

    /// The service learns what to do from the outcome, not from the changes.
    #[test]
    fn each_command_says_what_the_service_must_do() {
        let p = Policy::default();
        let effects = |o: &Org, c: Command, t: i64| o.handle(c, Timestamp(t), &p).unwrap();
        let added = effects(&org(), add("a", "AAAAAAAAAA", false), 1);
        assert!(added.effects.is_empty(), "{:?}", added.effects);
        let activated = effects(&added.org, Command::Activate(id("a")), 2);
        assert_eq!(
            activated.effects,
            vec![
                Effect::StartRotation {
                    target: id("a"),
                    from: vec![id("generic")]
                },
                Effect::ResumeRotation
            ]
        );
        // The generic default key leaves the list, and stays in custody.
        let finished = effects(&activated.org, Command::FinishRotation(id("generic")), 3);
        assert_eq!(finished.effects, vec![Effect::RequireNoKeks(id("generic"))]);
        let off = effects(
            &finished.org,
            Command::DisableByok {
                id: id("g2"),
                check_value: "GEN0000000".into(),
            },
            4,
        );
        assert_eq!(
            off.effects,
            vec![
                Effect::UsesGeneric(id("g2")),
                Effect::StartRotation {
                    target: id("g2"),
                    from: vec![id("a")]
                },
                Effect::ResumeRotation
            ]
        );
        let done = effects(&off.org, Command::FinishRotation(id("a")), 5);
        let gone = effects(&done.org, Command::ExpireDue, 5 + 31 * 86_400);
        assert_eq!(gone.effects, vec![Effect::Destroy(id("a"))]);
    }

    #[test]
    fn illegal_commands_are_refused_with_what_is_allowed() {
        let p = Policy::default();
        let (o, _) = org()
            .run(add("a", "AAAAAAAAAA", false), Timestamp(1), &p)
            .unwrap();
        assert_eq!(
            o.run(add("b", "BBBBBBBBBB", false), Timestamp(2), &p)
                .unwrap_err(),
            LifecycleError::PendingExists { pending: id("a") }
        );
        assert!(matches!(
            o.run(add("c", "AAAAAAAAAA", false), Timestamp(2), &p)
                .unwrap_err(),
            LifecycleError::AlreadyPresent { .. }
        ));
        assert!(matches!(
            o.run(Command::Revoke(id("a")), Timestamp(2), &p)
                .unwrap_err(),
            LifecycleError::InvalidTransition {
                state: KeyState::Pending,
                action: Action::Revoke,
                ..
            }
        ));
        assert!(matches!(
            o.run(Command::Revoke(id("generic")), Timestamp(2), &p)
                .unwrap_err(),
            LifecycleError::GenericDefaultNotRevocable { .. }
        ));
        assert_eq!(
            o.run(Command::Restore(id("nope")), Timestamp(2), &p)
                .unwrap_err(),
            LifecycleError::UnknownKey(id("nope"))
        );
    }

    #[test]
    fn content_is_blocked_while_the_master_is_revoked_deleted_or_lost() {
        let p = Policy::default();
        assert_eq!(org().content_master().unwrap().id, id("generic"));
        let (o, _) = org()
            .run(add("a", "AAAAAAAAAA", true), Timestamp(1), &p)
            .unwrap();
        assert_eq!(o.content_master().unwrap().id, id("a"));
        let (o, _) = o.run(Command::Revoke(id("a")), Timestamp(2), &p).unwrap();
        let err = o.content_master().unwrap_err();
        assert_eq!(
            err.to_string(),
            "the organisation's master key a is revoked: nothing can be encrypted or \
             decrypted until you reactivate it"
        );
        let (o, _) = o.run(Command::Delete(id("a")), Timestamp(3), &p).unwrap();
        assert!(
            o.content_master()
                .unwrap_err()
                .to_string()
                .contains("is deleted")
        );
        let (o, _) = o.run(Command::Restore(id("a")), Timestamp(4), &p).unwrap();
        let (o, _) = o
            .run(Command::Reactivate(id("a")), Timestamp(5), &p)
            .unwrap();
        assert_eq!(o.content_master().unwrap().id, id("a"));
    }

    #[test]
    fn a_renewed_generic_default_key_replaces_the_old_one_only_where_it_is_the_master() {
        let p = Policy::default();
        let renew = |kcv: &str| Command::RenewGeneric {
            id: id("generic-2"),
            check_value: kcv.into(),
        };
        assert!(matches!(
            org().run(renew("GEN0000000"), Timestamp(1), &p),
            Err(LifecycleError::GenericAlreadyActive { .. })
        ));
        let (o, changes) = org().run(renew("GEN1111111"), Timestamp(1), &p).unwrap();
        assert_eq!(state(&o, "generic"), KeyState::Rotating);
        assert_eq!(state(&o, "generic-2"), KeyState::Active);
        assert_eq!(changes.len(), 3, "{changes:?}");
        let (own, _) = org()
            .run(add("a", "AAAAAAAAAA", true), Timestamp(1), &p)
            .unwrap();
        assert_eq!(
            own.run(renew("GEN1111111"), Timestamp(2), &p).unwrap_err(),
            LifecycleError::GenericNotMaster
        );
    }

    #[test]
    fn byok_off_rotates_back_to_the_generic_default_key() {
        let p = Policy::default();
        let generic = || Command::DisableByok {
            id: id("generic-2"),
            check_value: "GEN0000000".into(),
        };
        // Already the master: only the setting changes.
        let (off, changes) = org().run(generic(), Timestamp(1), &p).unwrap();
        assert!(changes.is_empty(), "{changes:?}");
        assert!(!off.byok());
        assert_eq!(
            off.run(add("a", "AAAAAAAAAA", true), Timestamp(1), &p)
                .unwrap_err(),
            LifecycleError::ByokOff
        );
        let (o, _) = org()
            .run(add("a", "AAAAAAAAAA", true), Timestamp(1), &p)
            .unwrap();
        let (o, _) = o
            .run(add("b", "BBBBBBBBBB", false), Timestamp(2), &p)
            .unwrap();
        let (o, _) = o.run(generic(), Timestamp(3), &p).unwrap();
        assert_eq!(state(&o, "a"), KeyState::Rotating);
        assert_eq!(state(&o, "b"), KeyState::Pending, "a pending key stays");
        assert_eq!(
            o.active().map(|k| k.source),
            Some(KeySource::GenericDefault)
        );
        o.check_invariants().unwrap();
    }

    #[test]
    fn an_unknown_key_is_unknown_even_while_the_master_is_revoked() {
        let p = Policy::default();
        let (o, _) = org()
            .run(add("a", "AAAAAAAAAA", true), Timestamp(1), &p)
            .unwrap();
        let (o, _) = o.run(Command::Revoke(id("a")), Timestamp(2), &p).unwrap();
        assert_eq!(
            o.run(Command::Activate(id("nope")), Timestamp(3), &p)
                .unwrap_err(),
            LifecycleError::UnknownKey(id("nope"))
        );
    }

    #[test]
    fn a_removed_deleted_key_blocks_the_org_until_uploaded_again() {
        let p = Policy::default();
        let (o, _) = org()
            .run(add("a", "AAAAAAAAAA", true), Timestamp(1), &p)
            .unwrap();
        let (o, _) = o.run(Command::Revoke(id("a")), Timestamp(2), &p).unwrap();
        let (o, _) = o.run(Command::Delete(id("a")), Timestamp(3), &p).unwrap();
        let gone = Timestamp(3).plus(p.restore_window);
        let (o, _) = o.run(Command::ExpireDue, gone, &p).unwrap();
        assert_eq!(state(&o, "a"), KeyState::Lost, "removed, and still needed");
        assert_eq!(state(&o, "a").to_string(), "removed");
        let err = o.run(add("b", "BBBBBBBBBB", true), gone, &p).unwrap_err();
        assert!(
            err.to_string()
                .contains("upload the original key (check value AAAAAAAAAA) again"),
            "{err}"
        );
        // The same check value proves nothing: only custody, which matched
        // the full fingerprint, says the material is the removed key's.
        let err = o.run(add("a2", "AAAAAAAAAA", false), gone, &p).unwrap_err();
        assert_eq!(
            err,
            LifecycleError::NotTheRemovedKey {
                removed: id("a"),
                check_value: "AAAAAAAAAA".into()
            }
        );
        let recover = |kcv: &str| Command::Recover {
            id: id("a"),
            check_value: kcv.into(),
        };
        assert!(matches!(
            o.run(recover("BBBBBBBBBB"), gone, &p),
            Err(LifecycleError::NotTheRemovedKey { .. })
        ));
        let (o, changes) = o.run(recover("AAAAAAAAAA"), gone, &p).unwrap();
        assert_eq!(
            changes,
            vec![Change {
                key: id("a"),
                from: Some(KeyState::Lost),
                to: KeyState::Revoked
            }]
        );
        let (o, _) = o.run(Command::Reactivate(id("a")), gone, &p).unwrap();
        assert_eq!(o.active().map(|k| k.id.clone()), Some(id("a")));
    }

    fn add_aws(key: &str, kcv: &str, activate_now: bool) -> Command {
        Command::Add {
            id: id(key),
            source: KeySource::AwsKms,
            check_value: kcv.into(),
            activate_now,
        }
    }

    /// An org whose master is the AWS key `a`, with `b` (AWS) pending.
    fn aws_org(p: &Policy) -> Org {
        let (o, _) = org()
            .run(add_aws("a", "AAAAAAAAAA", true), Timestamp(1), p)
            .unwrap();
        let (o, _) = o
            .run(add_aws("b", "BBBBBBBBBB", false), Timestamp(2), p)
            .unwrap();
        o
    }

    #[test]
    fn a_master_revoked_by_its_provider_blocks_the_org_until_enabled_again() {
        let p = Policy::default();
        let o = aws_org(&p);
        let (o, changes) = o
            .run(Command::ProviderDisable(id("a")), Timestamp(3), &p)
            .unwrap();
        assert_eq!(
            changes,
            vec![Change {
                key: id("a"),
                from: Some(KeyState::Active),
                to: KeyState::RevokedByProvider { was: Place::Active }
            }]
        );
        o.check_invariants().unwrap();
        assert!(o.active().is_none());
        assert_eq!(
            o.content_master().unwrap_err().to_string(),
            "the organisation's master key a is revoked by its provider (disabled or pending \
             deletion in AWS KMS): nothing can be encrypted or decrypted until you enable the \
             key in AWS KMS again, or cancel its deletion"
        );
        // It still holds the active place: nothing else can take it.
        let refused = o
            .run(Command::Activate(id("b")), Timestamp(4), &p)
            .unwrap_err();
        assert_eq!(
            refused,
            LifecycleError::MasterRevokedByProvider { master: id("a") }
        );
        assert!(
            refused.to_string().contains("enable it there again"),
            "{refused}"
        );
        let byok_off = Command::DisableByok {
            id: id("g2"),
            check_value: "GEN0000000".into(),
        };
        assert_eq!(
            o.run(byok_off, Timestamp(4), &p).unwrap_err(),
            LifecycleError::MasterRevokedByProvider { master: id("a") }
        );
        assert!(matches!(
            o.run(Command::Revoke(id("a")), Timestamp(4), &p),
            Err(LifecycleError::InvalidTransition { .. })
        ));
        let (o, changes) = o
            .run(Command::ProviderEnable(id("a")), Timestamp(5), &p)
            .unwrap();
        assert_eq!(
            changes,
            vec![Change {
                key: id("a"),
                from: Some(KeyState::RevokedByProvider { was: Place::Active }),
                to: KeyState::Active
            }]
        );
        assert_eq!(o.content_master().unwrap().id, id("a"));
        let (o, _) = o.run(Command::Activate(id("b")), Timestamp(6), &p).unwrap();
        assert_eq!(state(&o, "a"), KeyState::Rotating);
        o.check_invariants().unwrap();
    }

    #[test]
    fn a_pending_key_revoked_by_its_provider_holds_the_pending_place() {
        let p = Policy::default();
        let (o, _) = aws_org(&p)
            .run(Command::ProviderDisable(id("b")), Timestamp(3), &p)
            .unwrap();
        o.check_invariants().unwrap();
        assert_eq!(o.content_master().unwrap().id, id("a"), "the master works");
        let refused = o
            .run(add("c", "CCCCCCCCCC", false), Timestamp(4), &p)
            .unwrap_err();
        assert_eq!(
            refused,
            LifecycleError::PendingRevokedByProvider { pending: id("b") }
        );
        assert!(refused.to_string().contains("or cancel it"), "{refused}");
        assert!(matches!(
            o.run(Command::Activate(id("b")), Timestamp(4), &p),
            Err(LifecycleError::InvalidTransition { .. })
        ));
        // Cancelled while disabled: it goes, and frees the place.
        let (cancelled, changes) = o.run(Command::Cancel(id("b")), Timestamp(5), &p).unwrap();
        assert_eq!(changes[0].to, KeyState::Removed);
        let (cancelled, _) = cancelled
            .run(add("c", "CCCCCCCCCC", false), Timestamp(6), &p)
            .unwrap();
        cancelled.check_invariants().unwrap();
        // Or enabled again: pending as before.
        let (o, _) = o
            .run(Command::ProviderEnable(id("b")), Timestamp(5), &p)
            .unwrap();
        assert_eq!(state(&o, "b"), KeyState::Pending);
    }

    #[test]
    fn a_rotating_key_revoked_by_its_provider_does_not_block_the_master() {
        let p = Policy::default();
        let (o, _) = aws_org(&p)
            .run(Command::Activate(id("b")), Timestamp(3), &p)
            .unwrap();
        let (o, _) = o
            .run(Command::ProviderDisable(id("a")), Timestamp(4), &p)
            .unwrap();
        assert_eq!(o.key(&id("a")).unwrap().slot(), KeyState::Rotating);
        assert_eq!(o.content_master().unwrap().id, id("b"));
        assert!(matches!(
            o.run(Command::FinishRotation(id("a")), Timestamp(5), &p),
            Err(LifecycleError::InvalidTransition { .. })
        ));
        let (o, _) = o
            .run(add("c", "CCCCCCCCCC", true), Timestamp(5), &p)
            .unwrap();
        assert_eq!(state(&o, "b"), KeyState::Rotating);
        o.check_invariants().unwrap();
        let (o, _) = o
            .run(Command::ProviderEnable(id("a")), Timestamp(6), &p)
            .unwrap();
        assert_eq!(state(&o, "a"), KeyState::Rotating);
        let (o, changes) = o
            .run(Command::FinishRotation(id("a")), Timestamp(7), &p)
            .unwrap();
        assert_eq!(
            changes[0].to,
            KeyState::Removed,
            "an AWS key leaves the list"
        );
        o.check_invariants().unwrap();
    }

    #[test]
    fn only_keys_at_an_external_provider_are_revoked_by_it() {
        let p = Policy::default();
        let (o, _) = org()
            .run(add("a", "AAAAAAAAAA", true), Timestamp(1), &p)
            .unwrap();
        for key in ["a", "generic"] {
            assert!(matches!(
                o.run(Command::ProviderDisable(id(key)), Timestamp(2), &p),
                Err(LifecycleError::InvalidTransition { .. })
            ));
        }
        assert_eq!(
            o.run(Command::ProviderEnable(id("nope")), Timestamp(2), &p)
                .unwrap_err(),
            LifecycleError::UnknownKey(id("nope"))
        );
    }

    fn command() -> impl Strategy<Value = Command> {
        let key = prop_oneof![
            Just("generic"),
            Just("k0"),
            Just("k1"),
            Just("k2"),
            Just("k3")
        ]
        .prop_map(id);
        let kcv = prop_oneof![
            Just("AAAAAAAAAA"),
            Just("BBBBBBBBBB"),
            Just("CCCCCCCCCC"),
            Just("DDDDDDDDDD")
        ];
        prop_oneof![
            (
                key.clone(),
                kcv.clone(),
                any::<bool>(),
                prop_oneof![Just(KeySource::Uploaded), Just(KeySource::AwsKms)]
            )
                .prop_map(|(id, kcv, activate_now, source)| Command::Add {
                    id,
                    source,
                    check_value: kcv.into(),
                    activate_now
                }),
            key.clone().prop_map(|k| Command::DisableByok {
                id: KeyId(format!("g-{k}")),
                check_value: "GEN0000000".into()
            }),
            (
                key.clone(),
                prop_oneof![Just("GEN0000000"), Just("GEN1111111")]
            )
                .prop_map(|(k, kcv)| Command::RenewGeneric {
                    id: KeyId(format!("r-{k}")),
                    check_value: kcv.into()
                }),
            (key.clone(), kcv).prop_map(|(id, kcv)| Command::Recover {
                id,
                check_value: kcv.into()
            }),
            key.clone().prop_map(Command::Activate),
            key.clone().prop_map(Command::Cancel),
            key.clone().prop_map(Command::Revoke),
            key.clone().prop_map(Command::Reactivate),
            key.clone().prop_map(Command::Delete),
            key.clone().prop_map(Command::Restore),
            key.clone().prop_map(Command::FinishRotation),
            key.clone().prop_map(Command::ProviderDisable),
            key.prop_map(Command::ProviderEnable),
            Just(Command::ExpireDue),
            Just(Command::EnableByok),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn any_sequence_keeps_the_invariants(steps in proptest::collection::vec((command(), 0i64..40 * 86_400), 1..40)) {
            let policy = Policy::default();
            let mut org = org();
            let mut now = Timestamp(0);
            for (command, advance) in steps {
                now = Timestamp(now.0 + advance);
                match org.handle(command.clone(), now, &policy) {
                    Ok(Outcome { org: next, changes, effects }) => {
                        // Custody destroys exactly what left the list and is not shared.
                        let destroyed: Vec<_> = effects.iter().filter_map(|e| match e {
                            Effect::Destroy(key) => Some(key.clone()),
                            _ => None,
                        }).collect();
                        let removed: Vec<_> = changes.iter()
                            .filter(|c| c.to.is_removed() && next.key(&c.key).unwrap().source != KeySource::GenericDefault)
                            .map(|c| c.key.clone()).collect();
                        prop_assert_eq!(destroyed, removed);
                        // A job starts exactly when the master is superseded, towards the new master.
                        let started = effects.iter().find_map(|e| match e {
                            Effect::StartRotation { target, .. } => Some(target.clone()),
                            _ => None,
                        });
                        let superseded = changes.iter().any(|c| c.to == KeyState::Rotating && c.from == Some(KeyState::Active));
                        prop_assert_eq!(started.is_some(), superseded);
                        if let Some(target) = started {
                            prop_assert_eq!(Some(target), next.active().map(|k| k.id.clone()));
                        }
                        prop_assert!(next.check_invariants().is_ok(), "{command:?}: {:?}", next.check_invariants());
                        // The provider enabling a key it just disabled undoes it exactly.
                        if let Command::ProviderDisable(key) = &command {
                            let (undone, _) = next
                                .run(Command::ProviderEnable(key.clone()), now, &policy)
                                .unwrap();
                            prop_assert_eq!(&undone, &org);
                        }
                        // A master disabled at its provider blocks content, and
                        // no other key can take its place.
                        if next.keys().iter().any(|k| k.state == KeyState::RevokedByProvider { was: Place::Active }) {
                            prop_assert!(next.content_master().is_err());
                            prop_assert!(next.active().is_none());
                        }
                        // Each key ends in the state its last change names.
                        for change in &changes {
                            let last = changes.iter().rev().find(|c| c.key == change.key).unwrap();
                            prop_assert_eq!(next.key(&change.key).unwrap().state, last.to);
                        }
                        let ids: std::collections::BTreeSet<_> = next.keys().iter().map(|k| &k.id).collect();
                        prop_assert_eq!(ids.len(), next.keys().len(), "key ids are unique");
                        // Removed is final, except for a recovery by custody.
                        for before in org.keys().iter().filter(|k| k.state.is_removed()) {
                            let after = next.key(&before.id).unwrap();
                            prop_assert!(after.state == before.state || (before.state == KeyState::Lost && after.state == KeyState::Revoked));
                        }
                        org = next;
                    }
                    // A refusal returns no org at all, so nothing can have changed.
                    Err(err) => prop_assert!(!err.to_string().is_empty()),
                }
            }
        }
    }
}
