//! Custody intents: how material enters the HSM daemon's custody and how what
//! a crash or an outage left unfinished is completed.
//!
//! Material is only ever taken in one way ([`KeyService::take_into_custody`]):
//! record an import intent for a handle, call the daemon, and commit; the
//! commit resolves the intent, and anything that did not commit is destroyed,
//! at once or by [`KeyService::repair`].

use std::future::Future;

use cmk_control_plane_domain::OrgId;
use cmk_control_plane_store::{Intent, IntentKind, StoreError};
use tracing::{info, warn};

use super::KeyService;
use crate::{
    error::{ServiceError, chain},
    hsm::HsmError,
};

/// What committing material taken into custody did with it.
pub(crate) enum Intake<T> {
    /// The commit keeps it, and resolved its intent.
    Kept(T),
    /// The commit keeps other material (another replica's, which won a race):
    /// this is unused.
    Unused(T),
}

/// Why material was not taken into custody and kept.
#[derive(Debug)]
pub(crate) enum IntakeError {
    /// The HSM daemon refused or failed the call; nothing stays under the
    /// handle.
    Call(HsmError),
    /// Recording the intent, or the commit, failed.
    Service(ServiceError),
}

impl From<IntakeError> for ServiceError {
    fn from(err: IntakeError) -> Self {
        match err {
            IntakeError::Call(err) => err.into(),
            IntakeError::Service(err) => err,
        }
    }
}

impl KeyService {
    /// Takes material into custody under `handle`: records an import intent
    /// (of `org`, or of none for the shared generic key), runs `call`, the
    /// HSM call that takes the material in, and `commit` with its answer.
    ///
    /// The material is discarded when the call fails (whatever it did), when
    /// `commit` refuses before committing anything (a lifecycle or argument
    /// refusal), or when the commit keeps other material. Any other failure
    /// of `commit` may or may not have committed: the intent decides (the
    /// commit resolved it, or repair destroys the material).
    pub(crate) async fn take_into_custody<R, T, F>(
        &self,
        handle: &str,
        org: Option<&OrgId>,
        call: impl Future<Output = Result<R, HsmError>>,
        commit: impl FnOnce(R) -> F,
    ) -> Result<T, IntakeError>
    where
        F: Future<Output = Result<Intake<T>, ServiceError>>,
    {
        let intent = Intent {
            handle: handle.to_owned(),
            kind: IntentKind::Import,
            org: org.cloned(),
            created_at: self.clock.now(),
        };
        self.store
            .record_intent(intent)
            .await
            .map_err(|err| IntakeError::Service(err.into()))?;
        let taken = match call.await {
            Ok(taken) => taken,
            Err(err) => {
                self.discard(org, handle).await;
                return Err(IntakeError::Call(err));
            }
        };
        match commit(taken).await {
            Ok(Intake::Kept(kept)) => Ok(kept),
            Ok(Intake::Unused(value)) => {
                self.discard(org, handle).await;
                Ok(value)
            }
            // Refused before anything was committed: the material goes.
            Err(
                err @ (ServiceError::Lifecycle(_)
                | ServiceError::InvalidArgument(_)
                | ServiceError::Store(StoreError::KeyArnTaken)),
            ) => {
                self.discard(org, handle).await;
                Err(IntakeError::Service(err))
            }
            Err(err) => Err(IntakeError::Service(err)),
        }
    }

    /// Destroys `handle`'s material, `org`'s (or, for `None`, the shared
    /// generic default key's), and resolves its intent; on failure the intent
    /// stays for [`KeyService::repair`].
    pub(crate) async fn discard(&self, org: Option<&OrgId>, handle: &str) {
        match self.hsm.destroy(org, handle).await {
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
                self.discard(intent.org.as_ref(), &intent.handle).await;
            }
        }
        Ok(())
    }
}
