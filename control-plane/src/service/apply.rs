//! The change path: a plan computed from the org as stored, the domain's
//! transition, and one commit of the outcome with its audit events, custody
//! intents and rotation job.
//!
//! An org is enrolled (stored, with the generic default key as its master) by
//! its first change. Reads never enrol: before that first change they see the
//! org as its enrolment would store it ([`KeyService::load_or_fresh`]), under
//! the same key id, so that what a read shows stays true once the org is
//! enrolled.

use aws_lc_rs::digest;
use cmk_control_plane_domain::{
    Change, Command, Effect, KeyId, KeyState, Org, OrgId, Outcome, Timestamp,
};
use cmk_control_plane_store::{
    AwsArns, Commit, GenericKey, Intent, IntentKind, RotationChange, StoreError, StoredKey,
    StoredOrg,
};

use super::{CONFLICT_RETRIES, KeyService, SERVICE_ACTOR};
use crate::error::{Internal, ServiceError};

/// One change to an org, computed from the org as stored.
pub(crate) struct Step {
    /// What the domain is asked to do; `None` changes nothing but what the
    /// step itself carries (a finished job).
    pub(crate) command: Option<Command>,
    /// Custody handle of material taken in for this change: it belongs to the
    /// key the change adds or recovers.
    pub(crate) fresh_handle: Option<String>,
    /// The ARNs of an AWS key taken in under `fresh_handle`.
    pub(crate) fresh_aws: Option<AwsArns>,
    /// The import intent the commit resolves.
    pub(crate) import_intent: Option<String>,
    /// A rotation job the change ends (a job is started by the commit of any
    /// change that supersedes the active key).
    pub(crate) finish_job: Option<u64>,
}

impl Step {
    /// A step that runs `command` and brings nothing into custody.
    pub(crate) fn command(command: Command) -> Self {
        Self {
            command: Some(command),
            ..Self::nothing()
        }
    }

    /// A step that changes no key.
    pub(crate) fn nothing() -> Self {
        Self {
            command: None,
            fresh_handle: None,
            fresh_aws: None,
            import_intent: None,
            finish_job: None,
        }
    }
}

impl KeyService {
    /// Computes `plan` against the org as stored, lets the domain apply its
    /// command, and commits the outcome with its audit events and intents;
    /// recomputed if another writer got there first. Then carries out the
    /// effects the domain named that follow the commit (destroying removed
    /// keys' material, waking rotation jobs).
    pub(crate) async fn apply(
        &self,
        actor: &str,
        org: &OrgId,
        action: &str,
        key: Option<&KeyId>,
        plan: impl Fn(&StoredOrg) -> Result<Step, ServiceError>,
    ) -> Result<(StoredOrg, Vec<Change>), ServiceError> {
        for _ in 0..CONFLICT_RETRIES {
            let stored = match self.store.load_org(org).await? {
                Some(stored) => stored,
                None => {
                    // Tried first on the org as enrolment would store it, so
                    // that a write the domain refuses enrols nothing.
                    let fresh = self.load_or_fresh(org).await?;
                    if let Some(command) = plan(&fresh)?.command {
                        fresh
                            .domain()
                            .handle(command, self.clock.now(), &self.policy)?;
                    }
                    self.load_or_enrol(org).await?
                }
            };
            let now = self.clock.now();
            let step = plan(&stored)?;
            let current = stored.domain();
            let Outcome {
                org: next,
                changes,
                effects,
            } = match step.command {
                Some(command) => current.handle(command, now, &self.policy)?,
                None => Outcome {
                    org: current,
                    changes: Vec::new(),
                    effects: Vec::new(),
                },
            };
            let mut keys: Vec<StoredKey> = stored.keys.clone();
            let mut written: Vec<StoredKey> = Vec::new();
            for change in &changes {
                let record = next.key(&change.key)?.clone();
                let before = keys.iter().find(|k| k.record.id == change.key);
                let (handle, aws) = match (change.from, before, &step.fresh_handle) {
                    // A key this command added, or recovered under its own
                    // handle, from material the step took in.
                    (None | Some(KeyState::Lost), _, Some(handle)) if !change.to.is_removed() => {
                        (handle.clone(), step.fresh_aws.clone())
                    }
                    (_, Some(before), _) => (before.handle.clone(), before.aws.clone()),
                    (_, None, _) => return Err(Internal::NoHandle(change.key.clone()).into()),
                };
                let stored_key = StoredKey {
                    record,
                    handle,
                    aws,
                };
                match keys.iter_mut().find(|k| k.record.id == change.key) {
                    Some(slot) => *slot = stored_key.clone(),
                    None => keys.push(stored_key.clone()),
                }
                written.retain(|k| k.record.id != change.key);
                written.push(stored_key);
            }
            let handle_of = |id: &KeyId| {
                keys.iter()
                    .find(|k| &k.record.id == id)
                    .map(|k| k.handle.clone())
                    .ok_or_else(|| Internal::NoHandle(id.clone()))
            };
            let call_key = key
                .or_else(|| changes.first().map(|c| &c.key))
                .map(|k| k.0.clone());
            let mut events = vec![self.event(actor, call_key, action, now)];
            events.extend(changes.iter().map(|c| {
                let from = c.from.map_or("new".to_owned(), |s| s.to_string());
                self.event(
                    actor,
                    Some(c.key.0.clone()),
                    &format!("state {from} → {}", c.to),
                    now,
                )
            }));
            let mut rotation = step
                .finish_job
                .map(|job| RotationChange::Finish { job, at: now });
            let mut require_unreferenced = Vec::new();
            let mut uses_generic = None;
            let mut destroy = Vec::new();
            let mut wake = false;
            for effect in &effects {
                match effect {
                    // The job row is written with the change that supersedes
                    // the active key.
                    Effect::StartRotation { target, from } => {
                        events.push(self.event(
                            actor,
                            Some(target.0.clone()),
                            &format!(
                                "rotation started: re-wrapping the KEKs of {} to {}",
                                from.iter().map(|k| k.0.as_str()).collect::<Vec<_>>().join(", "),
                                target
                            ),
                            now,
                        ));
                        rotation = Some(RotationChange::Start {
                            target: target.clone(),
                            from: from.clone(),
                            at: now,
                        });
                    }
                    Effect::RequireNoKeks(key) => require_unreferenced.push(key.clone()),
                    Effect::UsesGeneric(key) => uses_generic = Some(handle_of(key)?),
                    Effect::Destroy(key) => destroy.push(handle_of(key)?),
                    Effect::ResumeRotation => wake = true,
                }
            }
            let commit = Commit {
                org: org.clone(),
                expected_version: Some(stored.version),
                byok: next.byok(),
                keys: written,
                audit: events,
                add_intents: destroy
                    .iter()
                    .map(|handle| Intent {
                        handle: handle.clone(),
                        kind: IntentKind::Destroy,
                        org: Some(org.clone()),
                        created_at: now,
                    })
                    .collect(),
                resolve_intents: step.import_intent.into_iter().collect(),
                rotation,
                require_unreferenced,
                uses_generic,
            };
            match self.store.commit(commit).await {
                Ok(version) => {
                    let stored = StoredOrg {
                        org: org.clone(),
                        byok: next.byok(),
                        version,
                        keys,
                    };
                    // Before the call returns: a revocation is in force for
                    // every later content-key call of this process.
                    self.remember_org_state(&stored);
                    if wake {
                        self.rotation_wake.notify_one();
                    }
                    for handle in &destroy {
                        self.discard(Some(org), handle).await;
                    }
                    // Every key-state change is vouched for by a signature at once.
                    self.checkpoint(org).await;
                    return Ok((stored, changes));
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(err) => return Err(err.into()),
            }
        }
        Err(StoreError::Conflict(org.clone()).into())
    }

    /// The org as stored; an org seen for the first time is enrolled with the
    /// generic default key as its master. For changes and the content-key
    /// path; admin reads use [`KeyService::load_or_fresh`].
    pub(crate) async fn load_or_enrol(&self, org: &OrgId) -> Result<StoredOrg, ServiceError> {
        loop {
            if let Some(stored) = self.store.load_org(org).await? {
                return Ok(stored);
            }
            let generic = self.ensure_generic().await?;
            let now = self.clock.now();
            let enrolled = enrolment(org, &generic, now);
            let commit = Commit {
                org: org.clone(),
                expected_version: None,
                byok: enrolled.byok,
                audit: enrolled
                    .keys
                    .iter()
                    .map(|key| {
                        self.event(
                            SERVICE_ACTOR,
                            Some(key.record.id.0.clone()),
                            "enrol: the generic default key is the master key",
                            now,
                        )
                    })
                    .collect(),
                keys: enrolled.keys,
                add_intents: Vec::new(),
                resolve_intents: Vec::new(),
                rotation: None,
                require_unreferenced: Vec::new(),
                uses_generic: Some(generic.handle),
            };
            match self.store.commit(commit).await {
                // Another writer enrolled it first: load theirs. Or the
                // generic key was renewed since it was read: read it again.
                Ok(_) | Err(StoreError::Conflict(_) | StoreError::GenericKeyChanged) => continue,
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// The org as stored, or, for an org not enrolled yet, the org as its
    /// enrolment would store it now: for reads, which never store an org.
    /// (A deployment's very first call may have the HSM daemon generate the
    /// generic default key, which every org shares; nothing of the org is
    /// written.)
    pub(crate) async fn load_or_fresh(&self, org: &OrgId) -> Result<StoredOrg, ServiceError> {
        if let Some(stored) = self.store.load_org(org).await? {
            return Ok(stored);
        }
        let generic = self.ensure_generic().await?;
        Ok(enrolment(org, &generic, self.clock.now()))
    }
}

/// What enrolling `org` at `now` stores: BYOK off, and `generic` as the
/// master key, under [`enrolment_key_id`].
fn enrolment(org: &OrgId, generic: &GenericKey, now: Timestamp) -> StoredOrg {
    let fresh = Org::new(
        enrolment_key_id(org, generic),
        generic.check_value.clone(),
        now,
    );
    StoredOrg {
        org: org.clone(),
        byok: fresh.byok(),
        // Not a version any commit makes: the enrolment's commit expects none.
        version: 0,
        keys: fresh
            .keys()
            .iter()
            .map(|record| StoredKey {
                record: record.clone(),
                handle: generic.handle.clone(),
                aws: None,
            })
            .collect(),
    }
}

/// The id of the generic default key in `org` as enrolled: derived from the
/// org and the generic key (its check value and creation time, never its
/// handle), so that a read before enrolment names the key as enrolment will.
/// Shaped like every other key id.
fn enrolment_key_id(org: &OrgId, generic: &GenericKey) -> KeyId {
    let mut hash = digest::Context::new(&digest::SHA256);
    hash.update(b"cmk enrolment key id\0");
    hash.update(org.as_str().as_bytes());
    hash.update(b"\0");
    hash.update(generic.check_value.as_bytes());
    hash.update(b"\0");
    hash.update(&generic.created_at.0.to_be_bytes());
    KeyId(format!("key-{}", &hex::encode(hash.finish())[..16]))
}
