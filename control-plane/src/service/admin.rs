//! What an org's admins do to its master keys: BYOK on and off, uploads and
//! keys in AWS KMS (which recover a removed key from its original material),
//! state changes, and the reads beside them.

use cmk_control_plane_domain::{
    Action, Command, KeyId, KeySource, KeyState, LifecycleError, OrgId, transition,
};
use cmk_control_plane_store::{AwsArns, StoreError, StoredKey, StoredOrg};
use tracing::info;

use super::{
    CONFLICT_RETRIES, KeyDetails, KeyService, KeyView, OrgView, Step, details,
    intents::{Intake, IntakeError},
    new_key_id,
};
use crate::{
    authz::Caller,
    error::ServiceError,
    hsm::{Admission, HsmError, ImportPublicKey, ImportedKey, random_handle},
};

/// Largest wrapped key accepted: an RSA-8192 ciphertext.
pub const MAX_WRAPPED_KEY_BYTES: usize = 1024;

/// Longest ARN accepted, AWS's own limit for a key ARN.
pub const MAX_ARN_BYTES: usize = 2048;

/// An upload of a key wrapped under the HSM daemon's import key, in bounds
/// before anything reaches the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadKey {
    wrapped_key: Vec<u8>,
    import_key_id: String,
    activate_now: bool,
}

impl UploadKey {
    /// The upload, if `wrapped_key` is not empty nor over
    /// [`MAX_WRAPPED_KEY_BYTES`] and `import_key_id` is empty or the 64
    /// hexadecimal characters GetImportPublicKey gives (kept in lower case).
    pub fn new(
        wrapped_key: Vec<u8>,
        import_key_id: &str,
        activate_now: bool,
    ) -> Result<Self, ServiceError> {
        if wrapped_key.is_empty() {
            return Err(ServiceError::InvalidArgument("wrapped_key is empty".into()));
        }
        if wrapped_key.len() > MAX_WRAPPED_KEY_BYTES {
            return Err(ServiceError::InvalidArgument(format!(
                "wrapped_key is {} bytes, over the limit of {MAX_WRAPPED_KEY_BYTES} (an RSA-8192 ciphertext)",
                wrapped_key.len()
            )));
        }
        // Never echoed: a malformed id says nothing the caller needs back.
        if !import_key_id.is_empty()
            && (import_key_id.len() != 64 || !import_key_id.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(ServiceError::InvalidArgument(
                "import_key_id must be empty or the 64 hexadecimal characters of the import key's id, \
                 as GetImportPublicKey returns it"
                    .into(),
            ));
        }
        Ok(Self {
            wrapped_key,
            import_key_id: import_key_id.to_ascii_lowercase(),
            activate_now,
        })
    }
}

/// A key that stays in AWS KMS, by ARN, with its ARNs in bounds before
/// anything reaches the HSM daemon; their syntax is the daemon's to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddAwsKey {
    arns: AwsArns,
    activate_now: bool,
}

impl AddAwsKey {
    /// The key as a request gives its ARNs: an empty backup key or role ARN
    /// means none; the key ARN must be there, and none may be over
    /// [`MAX_ARN_BYTES`].
    pub fn new(
        key_arn: String,
        backup_key_arn: String,
        role_arn: String,
        activate_now: bool,
    ) -> Result<Self, ServiceError> {
        let bounded = |field: &str, arn: String| {
            if arn.len() > MAX_ARN_BYTES {
                return Err(ServiceError::InvalidArgument(format!(
                    "{field} is {} bytes, over the limit of {MAX_ARN_BYTES}",
                    arn.len()
                )));
            }
            Ok(Some(arn).filter(|a| !a.is_empty()))
        };
        let key_arn = bounded("key_arn", key_arn)?.ok_or_else(|| {
            ServiceError::InvalidArgument(
                "key_arn: the key ARN is empty; name a key in AWS KMS by its ARN".into(),
            )
        })?;
        let arns = AwsArns {
            key_arn,
            backup_key_arn: bounded("backup_key_arn", backup_key_arn)?,
            role_arn: bounded("role_arn", role_arn)?,
        };
        Ok(Self { arns, activate_now })
    }
}

/// Where a key an admin adds comes from.
#[derive(Clone)]
enum NewKey {
    /// Uploaded, wrapped under the import key.
    Wrapped {
        wrapped_key: Vec<u8>,
        import_key_id: String,
    },
    /// A key that stays in AWS KMS, and the org's external id when a role is
    /// assumed to use it.
    Aws {
        arns: AwsArns,
        external_id: Option<String>,
    },
}

/// An admin's change to one existing key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyOp {
    /// Pending → active.
    Activate,
    /// Pending → removed.
    Cancel,
    /// Active → revoked.
    Revoke,
    /// Revoked → active.
    Reactivate,
    /// Revoked → deleted.
    Delete,
    /// Deleted → revoked.
    Restore,
}

impl KeyOp {
    /// Its name in the audit log.
    pub fn name(self) -> &'static str {
        match self {
            Self::Activate => "activate",
            Self::Cancel => "cancel",
            Self::Revoke => "revoke",
            Self::Reactivate => "reactivate",
            Self::Delete => "delete",
            Self::Restore => "restore",
        }
    }

    fn command(self, key: KeyId) -> Command {
        match self {
            Self::Activate => Command::Activate(key),
            Self::Cancel => Command::Cancel(key),
            Self::Revoke => Command::Revoke(key),
            Self::Reactivate => Command::Reactivate(key),
            Self::Delete => Command::Delete(key),
            Self::Restore => Command::Restore(key),
        }
    }
}

/// What revoking a key would make unreadable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevocationPreview {
    /// The key, as it is now.
    pub key: KeyDetails,
    /// Whether it can be revoked now.
    pub revocable: bool,
    /// KEKs (one per resource) that would become unreadable.
    pub keks_unreadable: u64,
    /// KEKs wrapped by the key itself.
    pub keks_wrapped_by_key: u64,
}

/// The audit log's name of switching BYOK on or off.
pub fn byok_action(enabled: bool) -> &'static str {
    if enabled { "byok on" } else { "byok off" }
}

impl KeyService {
    /// The HSM daemon's RSA import public key.
    pub async fn import_public_key(
        &self,
        caller: &Caller,
    ) -> Result<ImportPublicKey, ServiceError> {
        self.audited(caller, "get import public key", None, true, async {
            Ok(self.hsm.import_public_key().await?)
        })
        .await
    }

    /// Switches BYOK on or off; off makes the generic default key the master.
    pub async fn set_byok(&self, caller: &Caller, enabled: bool) -> Result<OrgView, ServiceError> {
        let action = byok_action(enabled);
        self.audited(caller, action, None, false, async {
            let org = caller.org();
            let _guard = self.lock(org).await;
            let mut attempt = 1;
            loop {
                match self.set_byok_once(caller, enabled, action).await {
                    // Renewed between the read and the commit: read it again.
                    Err(ServiceError::Store(StoreError::GenericKeyChanged))
                        if attempt < CONFLICT_RETRIES =>
                    {
                        attempt += 1;
                    }
                    result => return result,
                }
            }
        })
        .await
    }

    /// One attempt of [`KeyService::set_byok`], under the org's lock.
    async fn set_byok_once(
        &self,
        caller: &Caller,
        enabled: bool,
        action: &str,
    ) -> Result<OrgView, ServiceError> {
        let org = caller.org();
        let generic = match enabled {
            true => None,
            false => Some(self.ensure_generic().await?),
        };
        let plan = |_: &StoredOrg| {
            let Some(generic) = &generic else {
                return Ok(Step::command(Command::EnableByok));
            };
            Ok(Step {
                fresh_handle: Some(generic.handle.clone()),
                ..Step::command(Command::DisableByok {
                    id: new_key_id(),
                    check_value: generic.check_value.clone(),
                })
            })
        };
        self.apply(caller.identity(), org, action, None, plan)
            .await?;
        Ok(self.view(&self.settle_rotations(org).await?))
    }

    /// Takes a wrapped key into custody and adds it to the org, pending or
    /// active; the original key of a removed master key recovers it instead.
    pub async fn upload(
        &self,
        caller: &Caller,
        upload: UploadKey,
    ) -> Result<KeyView, ServiceError> {
        self.audited(caller, "upload", None, false, async {
            let UploadKey {
                wrapped_key,
                import_key_id,
                activate_now,
            } = upload;
            let new = NewKey::Wrapped {
                wrapped_key,
                import_key_id,
            };
            self.add_key(caller, "upload", new, activate_now).await
        })
        .await
    }

    /// Adds a key that stays in AWS KMS, pending or active, once the HSM
    /// daemon has checked that it can use it. As for an upload, BYOK must be
    /// on, and adding the key of a removed master key that is still needed
    /// recovers it.
    pub async fn add_aws_key(
        &self,
        caller: &Caller,
        key: AddAwsKey,
    ) -> Result<KeyView, ServiceError> {
        self.audited(caller, "add aws key", None, false, async {
            let AddAwsKey { arns, activate_now } = key;
            // With no role, the daemon's own identity uses the key.
            let external_id = match arns.role_arn {
                Some(_) => Some(self.external_id(caller.org()).await?),
                None => None,
            };
            let new = NewKey::Aws { arns, external_id };
            self.add_key(caller, "add aws key", new, activate_now).await
        })
        .await
    }

    /// Takes `new` into custody and adds it to the org: under the handle of
    /// the removed master key the org still needs, if custody proves `new` is
    /// that key's original material (a recovery), else under a fresh handle.
    async fn add_key(
        &self,
        caller: &Caller,
        action: &str,
        new: NewKey,
        activate_now: bool,
    ) -> Result<KeyView, ServiceError> {
        let org = caller.org();
        let _guard = self.lock(org).await;
        let stored = self.load_or_enrol(org).await?;
        // Checked before the HSM call too, so a refused key is not taken in.
        stored.domain().accepts_own_keys()?;
        if let Some(lost) = recovery_candidate(&stored, &new)
            && let Some(view) = self.recover(caller, action, lost, &new).await?
        {
            return Ok(view);
        }
        let handle = random_handle();
        let (source, aws) = match &new {
            NewKey::Wrapped { .. } => (KeySource::Uploaded, None),
            NewKey::Aws { arns, .. } => (KeySource::AwsKms, Some(arns.clone())),
        };
        let id = new_key_id();
        let commit = async |ImportedKey { check_value, .. }| {
            let plan = |_: &StoredOrg| {
                Ok(Step {
                    fresh_handle: Some(handle.clone()),
                    fresh_aws: aws.clone(),
                    import_intent: Some(handle.clone()),
                    ..Step::command(Command::Add {
                        id: id.clone(),
                        source,
                        check_value: check_value.clone(),
                        activate_now,
                    })
                })
            };
            let applied = self
                .apply(caller.identity(), org, action, None, plan)
                .await?;
            Ok(Intake::Kept(applied))
        };
        let call = self.take_in(org, &handle, Admission::New, new);
        let (stored, changes) = self
            .take_into_custody(&handle, Some(org), call, commit)
            .await?;
        let key = changes
            .iter()
            .find(|c| matches!(c.from, None | Some(KeyState::Removed)))
            .map_or(id.clone(), |c| c.key.clone());
        let stored = match activate_now {
            true => self.settle_rotations(org).await?,
            false => stored,
        };
        self.key_view(&stored, &key)
    }

    /// Asks custody to take `new` back under the handle of `lost`, a key
    /// removed while the org still needed it, and records the recovery:
    /// `None` when custody says `new` is other material (it is then an
    /// ordinary new key). Every KEK the key wrapped names its handle, so
    /// they all open again once it is reactivated.
    async fn recover(
        &self,
        caller: &Caller,
        action: &str,
        lost: StoredKey,
        new: &NewKey,
    ) -> Result<Option<KeyView>, ServiceError> {
        let org = caller.org();
        let handle = lost.handle;
        // A destroy of the removal still open would hold the handle's intent.
        self.discard(Some(org), &handle).await;
        let id = lost.record.id;
        let aws = match new {
            NewKey::Aws { arns, .. } => Some(arns.clone()),
            NewKey::Wrapped { .. } => None,
        };
        let commit = async |ImportedKey { check_value, .. }| {
            let plan = |_: &StoredOrg| {
                Ok(Step {
                    // The same handle; for AWS KMS, the backup and role ARNs
                    // as given now.
                    fresh_handle: Some(handle.clone()),
                    fresh_aws: aws.clone(),
                    import_intent: Some(handle.clone()),
                    ..Step::command(Command::Recover {
                        id: id.clone(),
                        check_value: check_value.clone(),
                    })
                })
            };
            let (stored, _) = self
                .apply(caller.identity(), org, action, Some(&id), plan)
                .await?;
            Ok(Intake::Kept(stored))
        };
        let call = self.take_in(org, &handle, Admission::Recover, new.clone());
        let stored = match self
            .take_into_custody(&handle, Some(org), call, commit)
            .await
        {
            Ok(stored) => stored,
            // Other material: custody keeps the key destroyed (what the call
            // did was discarded), and `new` is an ordinary new key.
            Err(IntakeError::Call(HsmError::Status(status)))
                if status.code() == tonic::Code::AlreadyExists =>
            {
                return Ok(None);
            }
            Err(err) => return Err(err.into()),
        };
        info!(%org, key = %id, "removed key recovered from its original material");
        self.key_view(&stored, &id).map(Some)
    }

    /// The HSM call that takes `new` in under `handle`, serving `org`. A
    /// role of an AWS key is assumed with the org's external id.
    async fn take_in(
        &self,
        org: &OrgId,
        handle: &str,
        admission: Admission,
        new: NewKey,
    ) -> Result<ImportedKey, HsmError> {
        match new {
            NewKey::Wrapped {
                wrapped_key,
                import_key_id,
            } => {
                self.hsm
                    .import(org, handle, admission, wrapped_key, import_key_id)
                    .await
            }
            NewKey::Aws { arns, external_id } => {
                self.hsm
                    .add_aws_key(org, handle, admission, &arns, external_id.as_deref())
                    .await
            }
        }
    }

    /// Changes the state of one key.
    pub async fn change(
        &self,
        caller: &Caller,
        op: KeyOp,
        key: &KeyId,
    ) -> Result<KeyView, ServiceError> {
        self.audited(caller, op.name(), Some(key), false, async {
            let org = caller.org();
            let _guard = self.lock(org).await;
            let plan = |_: &StoredOrg| Ok(Step::command(op.command(key.clone())));
            let (mut stored, _) = self
                .apply(caller.identity(), org, op.name(), Some(key), plan)
                .await?;
            if op == KeyOp::Activate {
                stored = self.settle_rotations(org).await?;
            }
            self.key_view(&stored, key)
        })
        .await
    }

    /// One key of the org. Like every read, it stores nothing for an org
    /// not enrolled yet, and sees it as enrolment would store it.
    pub async fn get(&self, caller: &Caller, key: &KeyId) -> Result<KeyView, ServiceError> {
        self.audited(caller, "get key", Some(key), true, async {
            self.key_view(&self.load_or_fresh(caller.org()).await?, key)
        })
        .await
    }

    /// Every listed key of the org (of an org not enrolled yet: the generic
    /// default key, BYOK off).
    pub async fn list(&self, caller: &Caller) -> Result<OrgView, ServiceError> {
        self.audited(caller, "list keys", None, true, async {
            Ok(self.view(&self.load_or_fresh(caller.org()).await?))
        })
        .await
    }

    /// What revoking `key` would make unreadable; changes nothing.
    pub async fn preview_revocation(
        &self,
        caller: &Caller,
        key: &KeyId,
    ) -> Result<RevocationPreview, ServiceError> {
        self.audited(caller, "preview revocation", Some(key), true, async {
            let org = caller.org();
            let stored = self.load_or_fresh(org).await?;
            let found = stored
                .keys
                .iter()
                .find(|k| &k.record.id == key)
                .map(details)
                .ok_or_else(|| LifecycleError::UnknownKey(key.clone()))?;
            // The lifecycle's own rule, so the preview cannot disagree with it.
            let revocable = transition(
                &found.record,
                Action::Revoke,
                self.clock.now(),
                &self.policy,
            )
            .is_ok();
            let counts = self.store.kek_counts(org).await?;
            let total: u64 = counts.iter().map(|(_, n)| n).sum();
            let own = counts.iter().find(|(k, _)| k == key).map_or(0, |(_, n)| *n);
            Ok(RevocationPreview {
                key: found,
                revocable,
                // Revoking the master blocks the whole org, KEKs still wrapped
                // by rotating keys included.
                keks_unreadable: if revocable { total } else { 0 },
                keks_wrapped_by_key: own,
            })
        })
        .await
    }
}

/// The org's removed master key that `new` might be the material of: one
/// removed while still needed, of the same kind (and for AWS KMS, the same
/// key ARN). Custody decides whether it is.
fn recovery_candidate(stored: &StoredOrg, new: &NewKey) -> Option<StoredKey> {
    stored
        .keys
        .iter()
        .find(|k| {
            k.record.state == KeyState::Lost
                && match (new, k.record.source, &k.aws) {
                    (NewKey::Wrapped { .. }, KeySource::Uploaded, _) => true,
                    (NewKey::Aws { arns, .. }, KeySource::AwsKms, Some(lost)) => {
                        lost.key_arn == arns.key_arn
                    }
                    _ => false,
                }
        })
        .cloned()
}
