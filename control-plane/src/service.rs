//! The control plane's operations on an organisation's master keys: the domain
//! decides, the HSM daemon holds the material, the store records the outcome.
//!
//! Every change runs under the org's lock, is computed by the domain from the
//! org as stored, and is committed in one transaction together with its audit
//! events and custody intents (see `cmk_control_plane_store` for how intents
//! make HSM calls repairable). A refused change commits nothing and is audited
//! with its refusal.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use cmk_control_plane_domain::{
    Action, Change, Command, KeyId, KeyRecord, KeySource, KeyState, LifecycleError, Org, OrgId,
    Policy, Timestamp,
    audit::{self, ChainedEvent},
    transition,
};
use cmk_control_plane_store::{
    AwsArns, Commit, GenericKey, Intent, IntentKind, NewAuditEvent, OrgAwsKey, RotationChange,
    Store, StoreError, StoredKey, StoredOrg,
};
use cmk_proto::hsm::v1 as hsm_pb;
use tracing::{debug, info, warn};

use crate::lease::{Leases, replica_id};
use crate::metrics::Metrics;
use crate::{
    authz::Caller,
    clock::Clock,
    envelope,
    error::{ServiceError, chain},
    hsm::{Admission, HsmClient, HsmError, ImportedKey, random_handle},
    kek_cache::KekCache,
};

/// The actor recorded for changes the service makes by itself.
pub const SERVICE_ACTOR: &str = "service";

/// How often a commit that lost a race with another writer is recomputed.
const CONFLICT_RETRIES: usize = 5;

/// Largest audit page.
pub const MAX_AUDIT_PAGE: u32 = 1000;

/// Largest wrapped key accepted: an RSA-8192 ciphertext.
pub const MAX_WRAPPED_KEY_BYTES: usize = 1024;

/// Longest ARN accepted, AWS's own limit for a key ARN.
pub const MAX_ARN_BYTES: usize = 2048;

/// Associated data of the provider health check's probe, so that its
/// ciphertext can never pass for a KEK's.
const PROVIDER_PROBE_AAD: &[u8] = b"cmk provider health check";

/// One key as an admin sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyDetails {
    /// Its lifecycle record.
    pub record: KeyRecord,
    /// For a key in AWS KMS, the ARNs it was added with.
    pub aws: Option<AwsArns>,
}

/// An org's keys as an admin sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrgView {
    /// Whether bring-your-own-key is on.
    pub byok: bool,
    /// Every key that is not removed, plus a removed key the org still needs.
    pub keys: Vec<KeyDetails>,
    /// The key that wraps new KEKs; `None` while the master key is revoked.
    pub active: Option<KeyDetails>,
    /// The active key has been the master for longer than the rotation policy.
    pub rotation_due: bool,
}

/// One key, beside the org's active key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyView {
    /// The key.
    pub key: KeyDetails,
    /// The org's active key.
    pub active: Option<KeyDetails>,
    /// The active key has been the master for longer than the rotation policy.
    pub rotation_due: bool,
}

/// Where a key an admin adds comes from.
enum NewKey {
    /// Uploaded, wrapped under the import key.
    Wrapped {
        wrapped_key: Vec<u8>,
        import_key_id: String,
    },
    /// A key that stays in AWS KMS.
    Aws(AwsArns),
}

/// Tunables of the key service beside the lifecycle policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceOptions {
    /// How long an import may still be in flight at the HSM daemon (its
    /// request timeout, with margin): an unresolved import intent younger than
    /// that is left alone by repair.
    pub intent_grace: Duration,
    /// Most unwrapped KEKs held in memory.
    pub kek_cache_entries: usize,
    /// How long an unwrapped KEK stays in memory.
    pub kek_cache_ttl: Duration,
    /// How long an org's key state is trusted before it is read again, so a
    /// revocation made through another replica takes effect within this time
    /// (one made through this process takes effect before its call returns).
    pub org_state_ttl: Duration,
    /// KEKs re-wrapped per HSM batch call and store transaction.
    pub rotation_batch: u32,
    /// How long a replica's claim on a rotation job or on the timers lasts
    /// unless renewed (every third of it): how soon another replica takes
    /// over from one that died.
    pub lease_ttl: Duration,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            intent_grace: Duration::from_secs(60),
            kek_cache_entries: 100_000,
            kek_cache_ttl: Duration::from_secs(300),
            org_state_ttl: Duration::from_secs(1),
            rotation_batch: 1000,
            lease_ttl: Duration::from_secs(6),
        }
    }
}

/// The outcome of checking an org's audit chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditCheck {
    /// Events checked.
    pub events: u64,
    /// Hash of the newest event (all zero for an empty log).
    pub head: [u8; 32],
    /// Where the chain breaks, if it does.
    pub problem: Option<audit::ChainError>,
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
    fn name(self) -> &'static str {
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

/// One change to an org, computed from the org as stored.
pub(crate) struct Step {
    pub(crate) command: Option<Command>,
    pub(crate) byok: bool,
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
    /// Keys that must wrap no KEK when the change commits.
    pub(crate) require_unreferenced: Vec<KeyId>,
}

/// What content-key calls of one org may use, as last read from the store.
#[derive(Debug)]
pub(crate) struct OrgState {
    /// The org's version it was read at.
    pub(crate) version: u64,
    /// When it was read.
    pub(crate) read_at: Instant,
    /// The key that wraps new KEKs (id and handle), or why the org's content
    /// is blocked.
    pub(crate) master: Result<(KeyId, String), LifecycleError>,
    /// Keys that may unwrap KEKs (active and rotating) by id, with their handles.
    pub(crate) unwrap_keys: HashMap<KeyId, String>,
    /// Active or rotating keys that their provider disabled: the KEKs they
    /// wrap cannot be unwrapped until it enables them again.
    pub(crate) provider_blocked: HashSet<KeyId>,
}

/// The control plane's key operations.
pub struct KeyService {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) hsm: HsmClient,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) policy: Policy,
    pub(crate) options: ServiceOptions,
    pub(crate) kek_cache: KekCache,
    pub(crate) org_states: Mutex<HashMap<OrgId, Arc<OrgState>>>,
    /// Woken when a change starts a rotation job.
    pub(crate) rotation_wake: tokio::sync::Notify,
    /// The work this process does under a lease (see [`crate::lease`]).
    pub(crate) leases: Leases,
    /// What this process measures.
    pub(crate) metrics: Metrics,
    org_locks: Mutex<HashMap<OrgId, Arc<tokio::sync::Mutex<()>>>>,
    generic_lock: tokio::sync::Mutex<()>,
}

impl KeyService {
    /// A service over `store` and `hsm`.
    pub fn new(
        store: Arc<dyn Store>,
        hsm: HsmClient,
        clock: Arc<dyn Clock>,
        policy: Policy,
        options: ServiceOptions,
    ) -> Self {
        let leases = Leases::new(store.clone(), replica_id(), options.lease_ttl);
        Self {
            store,
            hsm,
            clock,
            policy,
            options,
            kek_cache: KekCache::new(options.kek_cache_entries, options.kek_cache_ttl),
            org_states: Mutex::default(),
            rotation_wake: tokio::sync::Notify::new(),
            leases,
            metrics: Metrics::default(),
            org_locks: Mutex::default(),
            generic_lock: tokio::sync::Mutex::const_new(()),
        }
    }

    /// Records this service's measures in `metrics` (by default, in series
    /// of its own that nothing exposes); its HSM client records its calls
    /// there too.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.hsm = self.hsm.with_metrics(&metrics);
        self.metrics = metrics;
        self
    }

    /// This process's name in the leases it holds.
    pub fn replica(&self) -> &str {
        self.leases.holder()
    }

    /// Gives up the leases of work this process was doing, once that work
    /// has been stopped (see [`Leases::release_all`]).
    pub async fn release_leases(&self) {
        self.leases.release_all().await;
    }

    /// The HSM daemon's RSA import public key.
    pub async fn import_public_key(
        &self,
        caller: &Caller,
    ) -> Result<hsm_pb::GetImportPublicKeyResponse, ServiceError> {
        self.audited(caller, "get import public key", None, true, async {
            Ok(self.hsm.import_public_key().await?)
        })
        .await
    }

    /// Switches BYOK on or off; off makes the generic default key the master.
    pub async fn set_byok(&self, caller: &Caller, enabled: bool) -> Result<OrgView, ServiceError> {
        let action = if enabled { "byok on" } else { "byok off" };
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
        let plan = |stored: &StoredOrg| {
            let Some(generic) = &generic else {
                return Ok(Step::settings(true));
            };
            let generic_active = stored.keys.iter().any(|k| {
                k.record.state == KeyState::Active && k.record.source == KeySource::GenericDefault
            });
            Ok(Step {
                command: (!generic_active).then(|| Command::UseGenericDefault {
                    id: new_key_id(),
                    check_value: generic.check_value.clone(),
                }),
                fresh_handle: Some(generic.handle.clone()),
                ..Step::settings(false)
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
        wrapped_key: Vec<u8>,
        import_key_id: String,
        activate_now: bool,
    ) -> Result<KeyView, ServiceError> {
        self.audited(caller, "upload", None, false, async {
            let import_key_id = check_upload(&wrapped_key, &import_key_id)?;
            let new = NewKey::Wrapped {
                wrapped_key,
                import_key_id,
            };
            self.add_key(caller, "upload", new, activate_now).await
        })
        .await
    }

    /// Adds a key that stays in AWS KMS, by ARN, pending or active, once the
    /// HSM daemon has checked that it can use it; an empty backup key or role
    /// ARN means none. As for an upload, BYOK must be on, and adding the key
    /// of a removed master key that is still needed recovers it.
    pub async fn add_aws_key(
        &self,
        caller: &Caller,
        key_arn: String,
        backup_key_arn: String,
        role_arn: String,
        activate_now: bool,
    ) -> Result<KeyView, ServiceError> {
        self.audited(caller, "add aws key", None, false, async {
            let arns = aws_arns(key_arn, backup_key_arn, role_arn)?;
            self.add_key(caller, "add aws key", NewKey::Aws(arns), activate_now)
                .await
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
        if !stored.byok {
            return Err(LifecycleError::ByokOff.into());
        }
        if let Some(lost) = recovery_candidate(&stored, &new)
            && let Some(view) = self.recover(caller, action, lost, &new).await?
        {
            return Ok(view);
        }
        let handle = random_handle();
        self.store
            .record_intent(Intent {
                handle: handle.clone(),
                kind: IntentKind::Import,
                org: Some(org.clone()),
                created_at: self.clock.now(),
            })
            .await?;
        let (source, aws, imported) = match new {
            NewKey::Wrapped {
                wrapped_key,
                import_key_id,
            } => {
                let imported = self
                    .hsm
                    .import(&handle, Admission::New, wrapped_key, import_key_id)
                    .await;
                (KeySource::Uploaded, None, imported)
            }
            NewKey::Aws(arns) => {
                let imported = self.hsm.add_aws_key(&handle, Admission::New, &arns).await;
                (KeySource::AwsKms, Some(arns), imported)
            }
        };
        let ImportedKey { check_value, .. } = match imported {
            Ok(imported) => imported,
            Err(err) => {
                self.discard(&handle).await;
                return Err(err.into());
            }
        };
        let id = new_key_id();
        let plan = |stored: &StoredOrg| {
            if !stored.byok {
                return Err(LifecycleError::ByokOff.into());
            }
            Ok(Step {
                command: Some(Command::Add {
                    id: id.clone(),
                    source,
                    check_value: check_value.clone(),
                    activate_now,
                }),
                fresh_handle: Some(handle.clone()),
                fresh_aws: aws.clone(),
                import_intent: Some(handle.clone()),
                ..Step::settings(true)
            })
        };
        let (stored, changes) = match self.apply(caller.identity(), org, action, None, plan).await {
            Ok(applied) => applied,
            // Refused before anything was committed: the material goes.
            Err(err @ (ServiceError::Lifecycle(_) | ServiceError::InvalidArgument(_))) => {
                self.discard(&handle).await;
                return Err(err);
            }
            // The commit may or may not have happened; the intent decides
            // (it was resolved by the commit, or repair destroys the material).
            Err(err) => return Err(err),
        };
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
        self.discard(&handle).await;
        self.store
            .record_intent(Intent {
                handle: handle.clone(),
                kind: IntentKind::Import,
                org: Some(org.clone()),
                created_at: self.clock.now(),
            })
            .await?;
        let recovered = match new {
            NewKey::Wrapped {
                wrapped_key,
                import_key_id,
            } => {
                self.hsm
                    .import(
                        &handle,
                        Admission::Recover,
                        wrapped_key.clone(),
                        import_key_id.clone(),
                    )
                    .await
            }
            NewKey::Aws(arns) => {
                self.hsm
                    .add_aws_key(&handle, Admission::Recover, arns)
                    .await
            }
        };
        let check_value = match recovered {
            Ok(ImportedKey { check_value, .. }) => check_value,
            Err(err) => {
                // Whatever the call did, the key must stay destroyed until a
                // recovery commits.
                self.discard(&handle).await;
                return match err {
                    HsmError::Status(status) if status.code() == tonic::Code::AlreadyExists => {
                        Ok(None)
                    }
                    err => Err(err.into()),
                };
            }
        };
        let id = lost.record.id;
        let aws = match new {
            NewKey::Aws(arns) => Some(arns.clone()),
            NewKey::Wrapped { .. } => None,
        };
        let plan = |stored: &StoredOrg| {
            if !stored.byok {
                return Err(LifecycleError::ByokOff.into());
            }
            Ok(Step {
                command: Some(Command::Recover {
                    id: id.clone(),
                    check_value: check_value.clone(),
                }),
                // The same handle; for AWS KMS, the backup and role ARNs as
                // given now.
                fresh_handle: Some(handle.clone()),
                fresh_aws: aws.clone(),
                import_intent: Some(handle.clone()),
                ..Step::settings(true)
            })
        };
        let stored = match self
            .apply(caller.identity(), org, action, Some(&id), plan)
            .await
        {
            Ok((stored, _)) => stored,
            Err(err @ (ServiceError::Lifecycle(_) | ServiceError::InvalidArgument(_))) => {
                self.discard(&handle).await;
                return Err(err);
            }
            // As for a new key: the intent decides.
            Err(err) => return Err(err),
        };
        info!(%org, key = %id, "removed key recovered from its original material");
        self.key_view(&stored, &id).map(Some)
    }

    /// Changes the state of one key.
    pub async fn change(
        &self,
        caller: &Caller,
        op: KeyOp,
        key_id: &str,
    ) -> Result<KeyView, ServiceError> {
        let key = match parse_key_id(key_id) {
            Ok(key) => key,
            Err(err) => return self.refuse(caller, op.name(), err).await,
        };
        self.audited(caller, op.name(), Some(&key), false, async {
            let org = caller.org();
            let _guard = self.lock(org).await;
            let plan = |stored: &StoredOrg| {
                if op == KeyOp::Activate && !stored.byok {
                    return Err(LifecycleError::ByokOff.into());
                }
                Ok(Step {
                    command: Some(op.command(key.clone())),
                    ..Step::settings(stored.byok)
                })
            };
            let (mut stored, _) = self
                .apply(caller.identity(), org, op.name(), Some(&key), plan)
                .await?;
            if op == KeyOp::Activate {
                stored = self.settle_rotations(org).await?;
            }
            self.key_view(&stored, &key)
        })
        .await
    }

    /// One key of the org.
    pub async fn get(&self, caller: &Caller, key_id: &str) -> Result<KeyView, ServiceError> {
        let key = match parse_key_id(key_id) {
            Ok(key) => key,
            Err(err) => return self.refuse(caller, "get key", err).await,
        };
        self.audited(caller, "get key", Some(&key), true, async {
            self.key_view(&self.load_or_enrol(caller.org()).await?, &key)
        })
        .await
    }

    /// Every listed key of the org.
    pub async fn list(&self, caller: &Caller) -> Result<OrgView, ServiceError> {
        self.audited(caller, "list keys", None, true, async {
            Ok(self.view(&self.load_or_enrol(caller.org()).await?))
        })
        .await
    }

    /// A page of the org's audit log.
    pub async fn audit_events(
        &self,
        caller: &Caller,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<ChainedEvent>, ServiceError> {
        self.audited(caller, "list audit events", None, true, async {
            Ok(self
                .store
                .audit_events(caller.org(), after_seq, limit.clamp(1, MAX_AUDIT_PAGE))
                .await?)
        })
        .await
    }

    /// Checks the org's audit chain.
    pub async fn verify_audit(&self, caller: &Caller) -> Result<AuditCheck, ServiceError> {
        // Audited after the check, so the check covers everything before it.
        let check = check_audit_chain(self.store.as_ref(), caller.org()).await;
        self.audited(caller, "verify audit log", None, true, async { Ok(check?) })
            .await
    }

    /// Records a call refused before it reached an operation (authorisation);
    /// `key_id` as the request named it, kept if it is a well-formed id.
    pub async fn record_refusal(
        &self,
        identity: &str,
        org: &OrgId,
        action: &str,
        key_id: Option<&str>,
        result: String,
    ) {
        let event = NewAuditEvent {
            time: self.clock.now(),
            actor: identity.to_owned(),
            key: key_id.and_then(|k| KeyId::parse(k).ok()).map(|k| k.0),
            action: action.to_owned(),
            result,
        };
        if let Err(err) = self.store.append_audit(org, vec![event]).await {
            warn!(error = %chain(&err), %org, action, "cannot audit a refused call");
        }
    }

    /// Removes every deactivated or deleted key whose time is up, destroying it
    /// in the HSM.
    pub async fn expire_due(&self) -> Result<(), ServiceError> {
        for org in self.store.orgs_with_expired_keys(self.clock.now()).await? {
            let _guard = self.lock(&org).await;
            let plan = |stored: &StoredOrg| {
                Ok(Step {
                    command: Some(Command::ExpireDue),
                    ..Step::settings(stored.byok)
                })
            };
            let (_, changes) = self
                .apply(SERVICE_ACTOR, &org, "remove expired keys", None, plan)
                .await?;
            info!(%org, removed = changes.len(), "expired keys removed");
        }
        Ok(())
    }

    /// Completes the custody calls a crash or an HSM outage left unfinished:
    /// destroys material of imports that never committed (once older than the
    /// grace period, so an import still in flight is not raced) and retries
    /// destroys of removed keys.
    ///
    /// An abandoned import is claimed before its material is destroyed, so
    /// that a commit of it still under way (a slow import, another replica,
    /// a clock that runs ahead) either wins and keeps the key, or finds the
    /// intent claimed and commits nothing.
    pub async fn repair(&self) -> Result<(), ServiceError> {
        let now = self.clock.now();
        for intent in self.store.open_intents().await? {
            let abandoned = intent.kind == IntentKind::Import
                && intent.created_at.plus(self.options.intent_grace) <= now;
            if abandoned && !self.store.claim_abandoned_import(&intent.handle).await? {
                // Committed (or claimed by another replica) since it was read.
                continue;
            }
            if intent.kind == IntentKind::Destroy || abandoned {
                info!(handle = %intent.handle, kind = ?intent.kind, "repairing an unfinished custody call");
                self.discard(&intent.handle).await;
            }
        }
        Ok(())
    }

    /// The provider health check: asks the HSM daemon to use every key in AWS
    /// KMS that is not removed, with a probe `Wrap` of fresh random bytes.
    /// A key AWS reports unusable (disabled, scheduled for deletion, gone)
    /// becomes revoked by its provider, and one that works again returns to
    /// the state it came from; each change is audited with what AWS reported.
    /// A key whose state cannot be learned (the daemon or AWS out of reach)
    /// is left as it is. Errors of one key are logged and do not stop the
    /// others.
    pub async fn check_providers(&self) -> Result<(), ServiceError> {
        for OrgAwsKey { org, key } in self.store.aws_keys().await? {
            let record = &key.record;
            let now = self.clock.now();
            let may = |action| transition(record, action, now, &self.policy).is_ok();
            let (may_disable, may_enable) =
                (may(Action::ProviderDisable), may(Action::ProviderEnable));
            // Revoked or deleted by the admin: blocked already, and the
            // lifecycle has no provider state for it.
            if !may_disable && !may_enable {
                continue;
            }
            let probe = self
                .hsm
                .wrap(
                    &key.handle,
                    &envelope::new_content_key(),
                    PROVIDER_PROBE_AAD,
                )
                .await;
            let (command, action) = match probe {
                Ok(_) if may_enable => (
                    Command::ProviderEnable(record.id.clone()),
                    "aws kms reports the key enabled".to_owned(),
                ),
                Ok(_) => continue,
                Err(err) => match err.provider_key_state() {
                    Some(state) if may_disable => (
                        Command::ProviderDisable(record.id.clone()),
                        format!("aws kms reports the key {state}"),
                    ),
                    Some(_) => continue,
                    None => {
                        warn!(%org, key = %record.id, error = %chain(&err),
                              "cannot learn the AWS KMS key's state; left as it is");
                        continue;
                    }
                },
            };
            let _guard = self.lock(&org).await;
            let plan = |stored: &StoredOrg| {
                Ok(Step {
                    command: Some(command.clone()),
                    ..Step::settings(stored.byok)
                })
            };
            match self
                .apply(SERVICE_ACTOR, &org, &action, Some(&record.id), plan)
                .await
            {
                Ok(_) => info!(%org, key = %record.id, "{action}"),
                // The key changed state since it was read; the next check
                // looks again.
                Err(ServiceError::Lifecycle(err)) => {
                    debug!(%org, key = %record.id, error = %err, "provider change no longer applies");
                }
                Err(err) => {
                    warn!(%org, key = %record.id, error = %chain(&err),
                          "cannot record the AWS KMS key's state; will retry");
                }
            }
        }
        Ok(())
    }

    /// Audits and returns a refusal found before the operation started.
    pub(crate) async fn refuse<T>(
        &self,
        caller: &Caller,
        action: &str,
        err: ServiceError,
    ) -> Result<T, ServiceError> {
        self.audited(caller, action, None, false, async { Err(err) })
            .await
    }

    /// Runs `op`, and audits its refusal, or its success if it is a read
    /// (a successful change is audited inside its own commit).
    pub(crate) async fn audited<T>(
        &self,
        caller: &Caller,
        action: &str,
        key: Option<&KeyId>,
        read: bool,
        op: impl Future<Output = Result<T, ServiceError>>,
    ) -> Result<T, ServiceError> {
        let result = op.await;
        let outcome = match &result {
            Ok(_) if !read => return result,
            Ok(_) => "ok".to_owned(),
            Err(err) => refusal(err),
        };
        let event = NewAuditEvent {
            time: self.clock.now(),
            actor: caller.identity().to_owned(),
            key: key.map(|k| k.0.clone()),
            action: action.to_owned(),
            result: outcome,
        };
        match self.store.append_audit(caller.org(), vec![event]).await {
            // A read that cannot be audited is not served.
            Err(err) if result.is_ok() => Err(err.into()),
            Err(err) => {
                warn!(error = %chain(&err), org = %caller.org(), action, "cannot audit a refused call");
                result
            }
            Ok(()) => result,
        }
    }

    /// Computes `plan` against the org as stored, lets the domain apply its
    /// command, and commits the outcome with its audit events and intents;
    /// recomputed if another writer got there first. Destroys the material of
    /// keys the change removed once the commit is durable.
    pub(crate) async fn apply(
        &self,
        actor: &str,
        org: &OrgId,
        action: &str,
        key: Option<&KeyId>,
        plan: impl Fn(&StoredOrg) -> Result<Step, ServiceError>,
    ) -> Result<(StoredOrg, Vec<Change>), ServiceError> {
        for _ in 0..CONFLICT_RETRIES {
            let stored = self.load_or_enrol(org).await?;
            let now = self.clock.now();
            let step = plan(&stored)?;
            let current = Org::from_records(stored.keys.iter().map(|k| k.record.clone()).collect());
            let (next, changes) = match step.command {
                Some(command) => current.handle(command, now, &self.policy)?,
                None => (current, Vec::new()),
            };
            let mut keys: Vec<StoredKey> = stored.keys.clone();
            let mut written = Vec::new();
            let mut destroy = Vec::new();
            let mut uses_generic = None;
            for change in &changes {
                let record = next.key(&change.key)?.clone();
                let fresh = matches!(change.from, None | Some(KeyState::Removed))
                    && change.to != KeyState::Removed;
                let (handle, aws) = match (&step.fresh_handle, fresh) {
                    (Some(handle), true) => (handle.clone(), step.fresh_aws.clone()),
                    // `keys` already holds a key this command added.
                    _ => keys
                        .iter()
                        .find(|k| k.record.id == change.key)
                        .map(|k| (k.handle.clone(), k.aws.clone()))
                        .ok_or_else(|| {
                            StoreError::Corrupt(format!("key {} has no handle", change.key))
                        })?,
                };
                // The org's new record of the shared generic key: the commit
                // checks that it was not renewed (and the old one dropped)
                // since it was read.
                if change.from.is_none() && record.source == KeySource::GenericDefault {
                    uses_generic = Some(handle.clone());
                }
                // The generic default key is shared: removing an org's record of it
                // destroys nothing.
                if change.to == KeyState::Removed && record.source != KeySource::GenericDefault {
                    destroy.push(handle.clone());
                }
                let stored_key = StoredKey {
                    record,
                    handle,
                    aws,
                };
                match keys.iter_mut().find(|k| k.record.id == change.key) {
                    Some(slot) => *slot = stored_key.clone(),
                    None => keys.push(stored_key.clone()),
                }
                written.retain(|k: &StoredKey| k.record.id != change.key);
                written.push(stored_key);
            }
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
            // Superseding the active key starts a job that re-wraps every KEK
            // to the new one; the job row is written with the change.
            let superseded = changes
                .iter()
                .any(|c| c.from == Some(KeyState::Active) && c.to == KeyState::Rotating);
            let rotation = match (superseded, next.active(), step.finish_job) {
                (true, Some(target), _) => {
                    let from: Vec<KeyId> = next
                        .keys()
                        .iter()
                        .filter(|k| k.state == KeyState::Rotating)
                        .map(|k| k.id.clone())
                        .collect();
                    events.push(self.event(
                        actor,
                        Some(target.id.0.clone()),
                        &format!(
                            "rotation started: re-wrapping the KEKs of {} to {}",
                            from.iter().map(|k| k.0.as_str()).collect::<Vec<_>>().join(", "),
                            target.id
                        ),
                        now,
                    ));
                    Some(RotationChange::Start {
                        target: target.id.clone(),
                        from,
                        at: now,
                    })
                }
                (_, _, Some(job)) => Some(RotationChange::Finish { job, at: now }),
                _ => None,
            };
            let started = matches!(rotation, Some(RotationChange::Start { .. }));
            let commit = Commit {
                org: org.clone(),
                expected_version: Some(stored.version),
                byok: step.byok,
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
                require_unreferenced: step.require_unreferenced,
                uses_generic,
            };
            match self.store.commit(commit).await {
                Ok(version) => {
                    let stored = StoredOrg {
                        org: org.clone(),
                        byok: step.byok,
                        version,
                        keys,
                    };
                    // Before the call returns: a revocation is in force for
                    // every later content-key call of this process.
                    self.remember_org_state(&stored);
                    // A new job, or a paused one that can continue: the
                    // master is back, or a key whose KEKs it waited for.
                    if started
                        || changes.iter().any(|c| {
                            c.to == KeyState::Active || c.from == Some(KeyState::RevokedByProvider)
                        })
                    {
                        self.rotation_wake.notify_one();
                    }
                    for handle in &destroy {
                        self.discard(handle).await;
                    }
                    return Ok((stored, changes));
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(err) => return Err(err.into()),
            }
        }
        Err(StoreError::Conflict(org.clone()).into())
    }

    /// The org as stored; an org seen for the first time is enrolled with the
    /// generic default key as its master.
    pub(crate) async fn load_or_enrol(&self, org: &OrgId) -> Result<StoredOrg, ServiceError> {
        loop {
            if let Some(stored) = self.store.load_org(org).await? {
                return Ok(stored);
            }
            let generic = self.ensure_generic().await?;
            let now = self.clock.now();
            let record = Org::new(new_key_id(), generic.check_value.clone(), now)
                .keys()
                .first()
                .cloned()
                .ok_or_else(|| StoreError::Corrupt("a new org has no key".into()))?;
            let commit = Commit {
                org: org.clone(),
                expected_version: None,
                byok: false,
                audit: vec![self.event(
                    SERVICE_ACTOR,
                    Some(record.id.0.clone()),
                    "enrol: the generic default key is the master key",
                    now,
                )],
                keys: vec![StoredKey {
                    record,
                    handle: generic.handle.clone(),
                    aws: None,
                }],
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

    /// The generic default key, generated in the HSM on first need.
    pub(crate) async fn ensure_generic(&self) -> Result<GenericKey, ServiceError> {
        if let Some(key) = self.store.generic_key().await? {
            return Ok(key);
        }
        let _guard = self.generic_lock.lock().await;
        if let Some(key) = self.store.generic_key().await? {
            return Ok(key);
        }
        let handle = random_handle();
        let now = self.clock.now();
        self.store
            .record_intent(Intent {
                handle: handle.clone(),
                kind: IntentKind::Import,
                org: None,
                created_at: now,
            })
            .await?;
        let generated = match self.hsm.generate(&handle).await {
            Ok(generated) => generated,
            Err(err) => {
                self.discard(&handle).await;
                return Err(err.into());
            }
        };
        let stored = self
            .store
            .put_generic_key(GenericKey {
                handle: handle.clone(),
                check_value: generated.check_value,
                created_at: now,
            })
            .await?;
        if stored.handle == handle {
            info!(check_value = %stored.check_value, "generated the generic default key");
        } else {
            // Another replica won the race; ours is unused.
            self.discard(&handle).await;
        }
        Ok(stored)
    }

    /// Destroys `handle`'s material and resolves its intent; on failure the
    /// intent stays for [`KeyService::repair`].
    pub(crate) async fn discard(&self, handle: &str) {
        match self.hsm.destroy(handle).await {
            Ok(_) => {}
            // Never imported (the call failed before it reached custody).
            Err(HsmError::Status(status)) if status.code() == tonic::Code::NotFound => {}
            Err(err) => {
                warn!(error = %chain(&err), handle, "cannot destroy key material yet; will retry");
                return;
            }
        }
        if let Err(err) = self.store.resolve_intent(handle).await {
            warn!(error = %chain(&err), handle, "cannot resolve a custody intent; will retry");
        }
    }

    pub(crate) async fn lock(&self, org: &OrgId) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .org_locks
            .lock()
            // The map holds no invariant a panicking holder could break.
            .unwrap_or_else(PoisonError::into_inner)
            .entry(org.clone())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    pub(crate) fn event(
        &self,
        actor: &str,
        key: Option<String>,
        action: &str,
        time: Timestamp,
    ) -> NewAuditEvent {
        NewAuditEvent {
            time,
            actor: actor.to_owned(),
            key,
            action: action.to_owned(),
            result: "ok".to_owned(),
        }
    }
}

impl Step {
    /// A step that changes no key, only the BYOK setting (or nothing).
    pub(crate) fn settings(byok: bool) -> Self {
        Self {
            command: None,
            byok,
            fresh_handle: None,
            fresh_aws: None,
            import_intent: None,
            finish_job: None,
            require_unreferenced: Vec::new(),
        }
    }
}

/// Reads the whole audit chain of `org` and checks it.
pub async fn check_audit_chain(store: &dyn Store, org: &OrgId) -> Result<AuditCheck, StoreError> {
    let mut rows = Vec::new();
    loop {
        let after = rows.last().map_or(0, |r: &ChainedEvent| r.event.seq);
        let page = store.audit_events(org, after, MAX_AUDIT_PAGE).await?;
        if page.is_empty() {
            break;
        }
        rows.extend(page);
    }
    let events = rows.len() as u64;
    Ok(match audit::verify(org.as_str(), &rows) {
        Ok(head) => AuditCheck {
            events,
            head,
            problem: None,
        },
        Err(problem) => AuditCheck {
            events,
            head: rows.last().map_or(audit::GENESIS, |r| r.hash),
            problem: Some(problem),
        },
    })
}

/// How a refusal reads in the audit log: the gRPC code and message the caller got.
fn refusal(err: &ServiceError) -> String {
    let status = err.to_status();
    format!("{:?}: {}", status.code(), status.message())
}

fn parse_key_id(key_id: &str) -> Result<KeyId, ServiceError> {
    KeyId::parse(key_id).map_err(|e| ServiceError::InvalidArgument(format!("key_id: {e}")))
}

/// The org's removed master key that `new` might be the material of: one
/// removed while still needed, of the same kind (and for AWS KMS, the same
/// key ARN). Custody decides whether it is.
fn recovery_candidate(stored: &StoredOrg, new: &NewKey) -> Option<StoredKey> {
    stored
        .keys
        .iter()
        .find(|k| {
            k.record.state == KeyState::Removed
                && k.record.needed
                && match (new, k.record.source, &k.aws) {
                    (NewKey::Wrapped { .. }, KeySource::Uploaded, _) => true,
                    (NewKey::Aws(arns), KeySource::AwsKms, Some(lost)) => {
                        lost.key_arn == arns.key_arn
                    }
                    _ => false,
                }
        })
        .cloned()
}

/// Bounds the upload's fields before anything reaches the HSM; the import key
/// id (empty, or the 64 hexadecimal characters GetImportPublicKey gives) in
/// lower case.
fn check_upload(wrapped_key: &[u8], import_key_id: &str) -> Result<String, ServiceError> {
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
    Ok(import_key_id.to_ascii_lowercase())
}

/// The ARNs of an AWS key as the request gives them (empty for none), bounded
/// before anything reaches the HSM; their syntax is the daemon's to check.
fn aws_arns(
    key_arn: String,
    backup_key_arn: String,
    role_arn: String,
) -> Result<AwsArns, ServiceError> {
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
    Ok(AwsArns {
        key_arn,
        backup_key_arn: bounded("backup_key_arn", backup_key_arn)?,
        role_arn: bounded("role_arn", role_arn)?,
    })
}

pub(crate) fn new_key_id() -> KeyId {
    KeyId(format!("key-{}", &random_handle()[..16]))
}

impl KeyService {
    pub(crate) fn view(&self, stored: &StoredOrg) -> OrgView {
        let active = active(stored);
        OrgView {
            byok: stored.byok,
            keys: stored
                .keys
                .iter()
                .filter(|k| k.record.state != KeyState::Removed || k.record.needed)
                .map(details)
                .collect(),
            rotation_due: self.rotation_due(active.as_ref()),
            active,
        }
    }

    pub(crate) fn key_view(
        &self,
        stored: &StoredOrg,
        key: &KeyId,
    ) -> Result<KeyView, ServiceError> {
        let found = stored
            .keys
            .iter()
            .find(|k| &k.record.id == key)
            .map(details)
            .ok_or_else(|| LifecycleError::UnknownKey(key.clone()))?;
        let active = active(stored);
        Ok(KeyView {
            key: found,
            rotation_due: self.rotation_due(active.as_ref()),
            active,
        })
    }

    fn rotation_due(&self, active: Option<&KeyDetails>) -> bool {
        active.is_some_and(|k| self.policy.rotation_due(&k.record, self.clock.now()))
    }
}

fn active(stored: &StoredOrg) -> Option<KeyDetails> {
    stored
        .keys
        .iter()
        .find(|k| k.record.state == KeyState::Active)
        .map(details)
}

/// What an admin may see of a stored key: not its custody handle.
pub(crate) fn details(key: &StoredKey) -> KeyDetails {
    KeyDetails {
        record: key.record.clone(),
        aws: key.aws.clone(),
    }
}
