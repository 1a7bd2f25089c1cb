//! What the timers change by themselves: keys whose time is up are removed,
//! and keys in AWS KMS follow the state AWS reports for them.

use cmk_control_plane_domain::{Action, Command, transition};
use cmk_control_plane_store::{OrgAwsKey, StoredOrg};
use tracing::{debug, info, warn};

use super::{KeyService, SERVICE_ACTOR, Step};
use crate::{
    envelope,
    error::{ServiceError, chain},
};

/// Associated data of the provider health check's probe, so that its
/// ciphertext can never pass for a KEK's.
const PROVIDER_PROBE_AAD: &[u8] = b"cmk provider health check";

impl KeyService {
    /// Removes every deactivated or deleted key whose time is up, destroying it
    /// in the HSM.
    pub async fn expire_due(&self) -> Result<(), ServiceError> {
        for org in self.store.orgs_with_expired_keys(self.clock.now()).await? {
            let _guard = self.lock(&org).await;
            let plan = |_: &StoredOrg| Ok(Step::command(Command::ExpireDue));
            let (_, changes) = self
                .apply(SERVICE_ACTOR, &org, "remove expired keys", None, plan)
                .await?;
            info!(%org, removed = changes.len(), "expired keys removed");
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
                    &org,
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
            let plan = |_: &StoredOrg| Ok(Step::command(command.clone()));
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
}
