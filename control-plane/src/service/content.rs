//! KEKs and content keys for the org's internal services (docs/api.md, the content-key API).
//!
//! A KEK is 32 random bytes made here, wrapped by the org's active CMK through
//! the HSM daemon (with the org and KEK id as associated data) and stored only
//! in that form. Content keys are made and opened here with the unwrapped KEK
//! (see [`crate::envelope`]), which is cached in memory.
//!
//! # Revocation
//!
//! Every call first consults the org's key state ([`OrgState`]): while the
//! master key is revoked, deleted, lost or disabled at its provider, nothing
//! is encrypted or decrypted, and a KEK wrapped by a rotating key that its
//! provider disabled is not unwrapped. A change committed by this process
//! replaces that state before its call returns, and empties the org's cache
//! entries when the org becomes blocked or a key becomes disabled; a change
//! committed by another replica is seen within `org_state_ttl`.
//! Content-key calls themselves are not audited (they are the data path, at
//! thousands per second); KEK creation and refused authorisation are.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use cmk_control_plane_domain::{
    KekId, KeyId, KeyState, LifecycleError, OrgId, ResourceId, Timestamp,
};
use cmk_control_plane_store::{NewAuditEvent, StoreError, StoredKek, StoredOrg};
use cmk_secret::SecretBytes;
use tonic::Code;
use tracing::debug;

use super::KeyService;
use crate::{
    authz::Caller,
    envelope::{self, EnvelopeError},
    error::{Internal, ServiceError},
    hsm::HsmError,
};

/// How often a KEK insert that lost a race with a change of the org's keys is
/// retried with the new active key.
const KEK_CONFLICT_RETRIES: usize = 5;

/// What a content key is bound to besides its org and KEK: the caller's
/// context, at most [`envelope::MAX_CONTEXT_BYTES`]. Not secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentContext(Vec<u8>);

impl ContentContext {
    /// The context, if it is within bounds.
    pub fn new(context: Vec<u8>) -> Result<Self, ServiceError> {
        if context.len() > envelope::MAX_CONTEXT_BYTES {
            return Err(EnvelopeError::ContextTooLong {
                actual: context.len(),
            }
            .into());
        }
        Ok(Self(context))
    }

    /// The context's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
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

impl OrgState {
    /// Whether the org is stored; one that is not was read as enrolment
    /// would store it, at version 0, which no commit makes.
    pub(crate) fn enrolled(&self) -> bool {
        self.version > 0
    }
}

/// A KEK as the internal service sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KekView {
    /// Its id.
    pub id: KekId,
    /// The resource it protects.
    pub resource: ResourceId,
    /// The CMK that wraps it now.
    pub key: KeyId,
    /// When it was created.
    pub created_at: Timestamp,
    /// Whether this call created it.
    pub created: bool,
}

/// A new content key.
#[derive(Debug)]
pub struct DataKey {
    /// The key itself.
    pub plaintext: SecretBytes,
    /// Wrapped by the KEK, bound to the org and the context.
    pub wrapped: Vec<u8>,
    /// The KEK.
    pub kek: KekId,
}

impl KeyService {
    /// The KEK of `resource`, created and wrapped by the active master key on
    /// first call.
    pub async fn create_kek(
        &self,
        caller: &Caller,
        resource: &ResourceId,
    ) -> Result<KekView, ServiceError> {
        let org = caller.org();
        let mut state = self.org_state(org).await?;
        if !state.enrolled() {
            // The first KEK is the first write: the org is enrolled now.
            state = self.remember_org_state(&self.load_or_enrol(org).await?);
        }
        for _ in 0..KEK_CONFLICT_RETRIES {
            let (master, handle) = state.master.clone()?;
            let id = KekId::from_random(random_bytes());
            let kek = envelope::new_content_key();
            let wrapped = self
                .hsm
                .wrap(org, &handle, &kek, &envelope::kek_associated_data(org, &id))
                .await
                .map_err(|err| material_gone(err, &master))?;
            let now = self.clock.now();
            let candidate = StoredKek {
                id: id.clone(),
                resource: resource.clone(),
                key: master.clone(),
                wrapped,
                created_at: now,
            };
            // Written with the KEK, and only if this call creates it.
            let event = NewAuditEvent {
                time: now,
                actor: caller.identity().to_owned(),
                key: Some(master.0.clone()),
                action: format!("create KEK {id} for resource {resource}"),
                result: "ok".to_owned(),
            };
            let stored = match self
                .store
                .insert_kek(org, state.version, candidate, vec![event])
                .await
            {
                Ok(stored) => stored,
                // The org's keys changed since the state was read: wrap
                // again under whatever is active now.
                Err(StoreError::Conflict(_)) => {
                    state = self.reload_org_state(org).await?;
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            let created = stored.id == id;
            if created {
                self.kek_cache.insert(org.clone(), id.clone(), kek);
            }
            return Ok(KekView {
                id: stored.id,
                resource: stored.resource,
                key: stored.key,
                created_at: stored.created_at,
                created,
            });
        }
        Err(StoreError::Conflict(org.clone()).into())
    }

    /// A new content key wrapped by the KEK `kek_id`, bound to `context`.
    pub async fn generate_data_key(
        &self,
        caller: &Caller,
        kek_id: &KekId,
        context: &ContentContext,
    ) -> Result<DataKey, ServiceError> {
        let org = caller.org();
        let kek = self
            .unwrapped_kek(org, kek_id)
            .await?
            .ok_or_else(|| ServiceError::UnknownKek(kek_id.clone()))?;
        let plaintext = envelope::new_content_key();
        let wrapped = envelope::seal(org, kek_id, &kek, context.as_bytes(), &plaintext)?;
        Ok(DataKey {
            plaintext,
            wrapped,
            kek: kek_id.clone(),
        })
    }

    /// The content key inside `wrapped`, if it was made by this org with
    /// `context`.
    pub async fn decrypt(
        &self,
        caller: &Caller,
        wrapped: &[u8],
        context: &ContentContext,
    ) -> Result<(SecretBytes, KekId), ServiceError> {
        let parsed = envelope::parse(wrapped)?;
        let org = caller.org();
        let Some(kek) = self.unwrapped_kek(org, parsed.kek_id()).await? else {
            // KEK ids are random: one the org does not have was made by
            // another org, or is forged.
            debug!(%org, kek = %parsed.kek_id(), "decrypt of a content key of an unknown KEK");
            return Err(EnvelopeError::NotAuthentic.into());
        };
        let plaintext = parsed.open(org, &kek, context.as_bytes())?;
        Ok((plaintext, parsed.kek_id().clone()))
    }

    /// The unwrapped KEK, from the cache or through the HSM daemon; `None` if
    /// the org has no such KEK. Refused while the org's content is blocked.
    async fn unwrapped_kek(
        &self,
        org: &OrgId,
        id: &KekId,
    ) -> Result<Option<Arc<SecretBytes>>, ServiceError> {
        let mut state = self.org_state(org).await?;
        state.master.clone()?;
        let cached = self.kek_cache.get(org, id);
        self.metrics.cache_lookup(cached.is_some());
        if let Some(kek) = cached {
            return Ok(Some(kek));
        }
        let Some(stored) = self.store.kek(org, id).await? else {
            return Ok(None);
        };
        // A KEK re-wrapped to a key activated after the state was read.
        if !state.unwrap_keys.contains_key(&stored.key) {
            state = self.reload_org_state(org).await?;
            state.master.clone()?;
        }
        state.check_unwrap_key(&stored.key)?;
        let expected =
            state
                .unwrap_keys
                .get(&stored.key)
                .ok_or_else(|| Internal::KekKeyNotUsable {
                    kek: id.clone(),
                    key: stored.key.clone(),
                })?;
        let unwrapped = self
            .hsm
            .unwrap(
                org,
                &stored.wrapped,
                &envelope::kek_associated_data(org, id),
            )
            .await
            .map_err(|err| match err {
                // The HSM's refusal of a stored KEK is not about the caller's
                // input: the row was altered outside the service.
                HsmError::Status(status)
                    if matches!(
                        status.code(),
                        Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted
                    ) =>
                {
                    Internal::KekDoesNotUnwrap {
                        kek: id.clone(),
                        refusal: status,
                    }
                    .into()
                }
                err => material_gone(err, &stored.key),
            })?;
        // The row names its key; the ciphertext names the handle. A mismatch
        // means the row was altered outside the service.
        if &unwrapped.handle != expected {
            return Err(Internal::KekHandleMismatch {
                kek: id.clone(),
                key: stored.key.clone(),
            }
            .into());
        }
        let kek = self
            .kek_cache
            .insert(org.clone(), id.clone(), unwrapped.plaintext);
        // A revocation, or the provider disabling the KEK's key, that landed
        // during the HSM call must not leave the KEK cached behind it.
        let latest = self.org_state(org).await?;
        if let Err(err) = latest
            .master
            .clone()
            .and(latest.check_unwrap_key(&stored.key))
        {
            self.kek_cache.invalidate_org(org);
            return Err(err.into());
        }
        Ok(Some(kek))
    }

    /// The org's key state, read again once older than `org_state_ttl`.
    pub(crate) async fn org_state(&self, org: &OrgId) -> Result<Arc<OrgState>, ServiceError> {
        let cached = self
            .org_states
            .lock()
            // The map holds no invariant a panicking holder could break.
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(org)
            .cloned();
        match cached {
            Some(state) if state.read_at.elapsed() < self.options.org_state_ttl => Ok(state),
            _ => self.reload_org_state(org).await,
        }
    }

    async fn reload_org_state(&self, org: &OrgId) -> Result<Arc<OrgState>, ServiceError> {
        // Reading never enrols: an org not stored yet has no KEK to use.
        let stored = self.load_or_fresh(org).await?;
        Ok(self.remember_org_state(&stored))
    }

    /// Replaces the org's key state with `stored`'s, and drops the org's
    /// cached KEKs if its content is now blocked, or a key its KEKs may be
    /// wrapped by was just disabled at its provider (the cache does not know
    /// which key wraps a KEK). A state older than the one held is ignored, so
    /// a slow reader cannot undo a revocation.
    pub(crate) fn remember_org_state(&self, stored: &StoredOrg) -> Arc<OrgState> {
        let state = Arc::new(org_state_of(stored));
        let mut states = self
            .org_states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (state, newly_blocked) = match states.get(&stored.org) {
            Some(held) if held.version > state.version => (held.clone(), false),
            held => {
                let newly_blocked = state
                    .provider_blocked
                    .iter()
                    .any(|k| !held.is_some_and(|h| h.provider_blocked.contains(k)));
                states.insert(stored.org.clone(), state.clone());
                (state, newly_blocked)
            }
        };
        drop(states);
        if state.master.is_err() || newly_blocked {
            self.kek_cache.invalidate_org(&stored.org);
        }
        state
    }
}

/// What content-key calls may use, from the org as stored.
pub(crate) fn org_state_of(stored: &StoredOrg) -> OrgState {
    let handle_of = |id: &KeyId| {
        stored
            .keys
            .iter()
            .find(|k| &k.record.id == id)
            .map(|k| k.handle.clone())
    };
    let org = stored.domain();
    let master = org.content_master().and_then(|k| {
        handle_of(&k.id)
            .map(|h| (k.id.clone(), h))
            .ok_or(cmk_control_plane_domain::LifecycleError::NoActiveKey)
    });
    OrgState {
        version: stored.version,
        read_at: Instant::now(),
        master,
        unwrap_keys: stored
            .keys
            .iter()
            .filter(|k| matches!(k.record.state, KeyState::Active | KeyState::Rotating))
            .map(|k| (k.record.id.clone(), k.handle.clone()))
            .collect(),
        provider_blocked: stored
            .keys
            .iter()
            .filter(|k| matches!(k.record.state, KeyState::RevokedByProvider { .. }))
            .filter(|k| matches!(k.record.slot(), KeyState::Active | KeyState::Rotating))
            .map(|k| k.record.id.clone())
            .collect(),
    }
}

impl OrgState {
    /// Refuses the KEKs of a key that its provider disabled, naming why,
    /// rather than as an unknown key.
    pub(crate) fn check_unwrap_key(&self, key: &KeyId) -> Result<(), LifecycleError> {
        match self.provider_blocked.contains(key) {
            true => Err(LifecycleError::KeyRevokedByProvider { key: key.clone() }),
            false => Ok(()),
        }
    }
}

fn random_bytes() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    // AWS-LC's RAND_bytes aborts the process rather than return without filling
    // the buffer, so this error cannot occur.
    aws_lc_rs::rand::fill(&mut bytes).expect("AWS-LC RAND_bytes never fails without aborting");
    bytes
}

/// The HSM daemon's `NOT_FOUND` for a key the org's records say it holds
/// (destroyed or unknown there) names the key and what to do, rather than
/// passing for an internal error; any other failure is as it is.
fn material_gone(err: HsmError, key: &KeyId) -> ServiceError {
    match err {
        HsmError::Status(status) if status.code() == Code::NotFound => {
            tracing::error!(%key, daemon = %status.message(),
                "the HSM daemon does not hold a key the store says it holds");
            ServiceError::KeyMaterialGone { key: key.clone() }
        }
        err => err.into(),
    }
}
