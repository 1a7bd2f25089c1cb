//! The control plane's operations on an organisation's master keys: the domain
//! decides, the HSM daemon holds the material, the store records the outcome.
//!
//! Every change runs under the org's lock, is computed by the domain from the
//! org as stored ([`apply`]), and is committed in one transaction together
//! with its audit events and custody intents (see `cmk_control_plane_store`
//! for how intents make HSM calls repairable, and [`intents`] for the one
//! path by which material enters custody). A refused change commits nothing
//! and is audited with its refusal ([`audit`]).
//!
//! The service takes typed requests ([`UploadKey`], [`AddAwsKey`],
//! [`AuditPage`], [`ContentContext`], the domain's ids), which only a checked
//! constructor makes: the gRPC edge (`crate::grpc`) builds them, and nothing
//! here sees a protobuf message.
//!
//! | module | what |
//! |---|---|
//! | [`admin`] | BYOK, uploads and keys in AWS KMS (and the recovery of a removed key), state changes |
//! | [`audit`] | reads audited, refusals audited, the audit page and chain check |
//! | [`content`] | KEKs and content keys for internal services, the org's key state they check |
//! | [`rotation`] | rotation jobs: re-wrapping every KEK to the active key |
//! | [`generic`] | the generic default key, and its renewal |
//! | [`intents`] | custody intents: record, call the HSM, then resolve or discard; repair |
//! | [`maintenance`] | what the timers change: expired keys, the provider health check |
//! | [`apply`] | the change path: a plan, the domain's transition, one commit |

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use cmk_control_plane_domain::{KeyId, KeyRecord, KeyState, OrgId, Policy, Timestamp};
use cmk_control_plane_store::{AwsArns, NewAuditEvent, Store, StoredKey, StoredOrg};

use crate::{
    clock::Clock,
    error::ServiceError,
    hsm::{HsmClient, random_handle},
    kek_cache::KekCache,
    lease::{Leases, replica_id},
    metrics::Metrics,
};

pub mod admin;
pub mod apply;
pub mod audit;
pub mod aws;
pub mod checkpoints;
pub mod content;
pub mod generic;
pub mod intents;
pub mod maintenance;
pub mod rotation;
pub mod tally;

pub use admin::{
    AddAwsKey, KeyOp, MAX_ARN_BYTES, MAX_WRAPPED_KEY_BYTES, RevocationPreview, UploadKey,
};
pub use audit::{
    AuditCheck, AuditPage, AuditProblem, DEFAULT_AUDIT_PAGE, MAX_AUDIT_PAGE, check_audit_chain,
};
pub use aws::{AwsSetup, AwsSetupRequest, MAX_SETUP_KEY_ARNS};
pub use checkpoints::{AuditKeys, CheckpointProblem};
pub use content::{ContentContext, DataKey, KekView};
pub use rotation::RotationView;

pub(crate) use apply::Step;
pub(crate) use content::OrgState;

/// The actor recorded for changes the service makes by itself.
pub const SERVICE_ACTOR: &str = "service";

/// How often a commit that lost a race with another writer is recomputed.
const CONFLICT_RETRIES: usize = 5;

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
    /// The HSM daemon's AWS principal, which an org's role must trust.
    pub(crate) aws_principal: Option<String>,
    /// The daemon's audit public key, fetched once.
    pub(crate) audit_keys: tokio::sync::OnceCell<checkpoints::AuditKeys>,
    /// Where signed checkpoints are exported, if anywhere.
    pub(crate) checkpoint_export: Option<checkpoints::CheckpointExport>,
    /// Content-key calls counted, not yet written to the audit log.
    pub(crate) tally: tally::Tally,
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
            aws_principal: None,
            audit_keys: tokio::sync::OnceCell::new(),
            tally: tally::Tally::default(),
            checkpoint_export: None,
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

    /// Names `principal` (the HSM daemon's AWS identity) to orgs setting up
    /// a role for the service.
    pub fn with_aws_principal(mut self, principal: Option<String>) -> Self {
        self.aws_principal = principal;
        self
    }

    /// Appends every signed checkpoint this process stores to `export`.
    pub fn with_checkpoint_export(mut self, export: Option<checkpoints::CheckpointExport>) -> Self {
        self.checkpoint_export = export;
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

    pub(crate) fn view(&self, stored: &StoredOrg) -> OrgView {
        let active = active(stored);
        OrgView {
            byok: stored.byok,
            keys: stored
                .keys
                .iter()
                .filter(|k| k.record.state != KeyState::Removed)
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
            .ok_or_else(|| cmk_control_plane_domain::LifecycleError::UnknownKey(key.clone()))?;
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

pub(crate) fn new_key_id() -> KeyId {
    KeyId(format!("key-{}", &random_handle()[..16]))
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
