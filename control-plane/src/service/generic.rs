//! The generic default key: one key the HSM daemon generates, shared by every
//! org without BYOK as its master, renewed once older than the rotation
//! period.

use cmk_control_plane_domain::{Command, KeyState, OrgId, Timestamp};
use cmk_control_plane_store::{GenericKey, StoredOrg};
use tracing::info;

use super::{KeyService, SERVICE_ACTOR, Step, intents::Intake, new_key_id};
use crate::{
    error::ServiceError,
    hsm::{ImportedKey, random_handle},
};

impl KeyService {
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
        let commit = async |generated: ImportedKey| {
            let stored = self
                .store
                .put_generic_key(GenericKey {
                    handle: handle.clone(),
                    check_value: generated.check_value,
                    created_at: now,
                })
                .await?;
            if stored.handle != handle {
                // Another replica won the race; ours is unused.
                return Ok(Intake::Unused(stored));
            }
            info!(check_value = %stored.check_value, "generated the generic default key");
            Ok(Intake::Kept(stored))
        };
        let generate = self.hsm.generate(None, &handle);
        Ok(self
            .take_into_custody(&handle, None, generate, commit)
            .await?)
    }

    /// Renews the generic default key once it is older than the rotation
    /// period, moves every org whose master it is onto the new material, and
    /// destroys retired material no org's key uses any more.
    pub async fn renew_generic(&self) -> Result<(), ServiceError> {
        let now = self.clock.now();
        if let Some(current) = self.store.generic_key().await?
            && current.created_at.plus(self.policy.rotation_period) <= now
        {
            self.generate_successor(&current, now).await?;
        }
        let Some(current) = self.store.generic_key().await? else {
            return Ok(());
        };
        for retired in self.store.retired_generic_keys().await? {
            for org in self.store.orgs_using_handle(&retired.handle).await? {
                self.move_to_generic(&org, &retired, &current).await?;
            }
            if self
                .store
                .drop_retired_generic_key(&retired.handle, self.clock.now())
                .await?
            {
                info!(check_value = %retired.check_value, "retired generic default key destroyed");
                self.discard(None, &retired.handle).await;
            }
        }
        Ok(())
    }

    async fn generate_successor(
        &self,
        current: &GenericKey,
        now: Timestamp,
    ) -> Result<(), ServiceError> {
        let handle = random_handle();
        let commit = async |generated: ImportedKey| {
            let stored = self
                .store
                .renew_generic_key(
                    &current.handle,
                    GenericKey {
                        handle: handle.clone(),
                        check_value: generated.check_value,
                        created_at: now,
                    },
                )
                .await?;
            if stored.handle != handle {
                // Another replica renewed it first; ours is unused.
                return Ok(Intake::Unused(()));
            }
            info!(old = %current.check_value, new = %stored.check_value,
                  "renewed the generic default key");
            Ok(Intake::Kept(()))
        };
        let generate = self.hsm.generate(None, &handle);
        Ok(self
            .take_into_custody(&handle, None, generate, commit)
            .await?)
    }

    /// Where `retired` is the org's master, the org's record of `current`
    /// becomes the master and the old one rotates.
    async fn move_to_generic(
        &self,
        org: &OrgId,
        retired: &GenericKey,
        current: &GenericKey,
    ) -> Result<(), ServiceError> {
        let _guard = self.lock(org).await;
        let master_is_retired = |stored: &StoredOrg| {
            stored
                .keys
                .iter()
                .any(|k| k.record.state == KeyState::Active && k.handle == retired.handle)
        };
        // An org only rotating away from the retired key needs nothing here.
        if !master_is_retired(&self.load_or_enrol(org).await?) {
            return Ok(());
        }
        let plan = |stored: &StoredOrg| {
            Ok(Step {
                command: master_is_retired(stored).then(|| Command::RenewGeneric {
                    id: new_key_id(),
                    check_value: current.check_value.clone(),
                }),
                fresh_handle: Some(current.handle.clone()),
                ..Step::nothing()
            })
        };
        self.apply(
            SERVICE_ACTOR,
            org,
            "renew the generic default key",
            None,
            plan,
        )
        .await?;
        self.settle_rotations(org).await?;
        Ok(())
    }
}
