//! Rotation jobs: re-wrap every KEK of an org to its active key (docs/design.md, "Rotation jobs").
//!
//! A job is a row written in the same transaction as the activation that
//! supersedes the old key; the work it stands for is not a list but a query
//! ("KEKs of the org not wrapped by the target"), so it is resumable by
//! construction. Each batch is read, unwrapped and wrapped through the HSM
//! daemon's batch RPCs, then written in one transaction that changes a KEK only
//! if it is still wrapped by the key it was read under, and only if the org's
//! keys have not changed meanwhile. A crash at any point leaves every KEK
//! wrapped by either its old key, which stays in custody while it is rotating,
//! or the target: none is lost and none is wrapped by a key that is gone.
//!
//! A rotating key becomes deactivated only in a commit that counts, inside its
//! transaction, that no KEK references it any more; the count is in the audit
//! event. While the master key is revoked the job waits; a newer activation
//! supersedes it with a job towards the newer key. KEKs wrapped by a rotating
//! key that its provider disabled wait too, and the job with them: that key
//! still holds its rotating place, and its KEKs move once it is enabled again.

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use cmk_control_plane_domain::{Command, KeyId, KeyState, OrgId, Timestamp};
use cmk_control_plane_store::{JobState, Rewrap, RotationJob, StoreError, StoredKek, StoredOrg};
use cmk_secret::SecretBytes;
use prometheus_client::metrics::counter::Counter;
use tracing::{info, warn};

use super::{KeyService, SERVICE_ACTOR, Step, content::org_state_of};
use crate::{
    authz::Caller,
    envelope,
    error::{Internal, ServiceError, chain},
    lease::Leased,
    metrics::ActiveRotation,
};

/// A rotation job with what the caller needs to follow it.
#[derive(Clone, Debug, PartialEq)]
pub struct RotationView {
    /// The job as stored.
    pub job: RotationJob,
    /// Running, but waiting for the master key to be reactivated.
    pub paused: bool,
    /// KEKs re-wrapped per second since the job started.
    pub rate_per_second: f64,
    /// Estimated seconds to completion; 0 unless running.
    pub eta_seconds: u64,
}

/// What a pass works under until a write reports a conflict.
struct Epoch {
    /// The org's version the writes expect.
    version: u64,
    /// The running job.
    job: u64,
    /// Its target (the active key) and the target's handle.
    target: KeyId,
    target_handle: String,
    /// Keys that may have wrapped a KEK, with their handles.
    unwrap_keys: HashMap<KeyId, String>,
    /// Rotating keys disabled at their provider: their KEKs wait.
    provider_blocked: HashSet<KeyId>,
}

/// A batch's store write, running while the next batch is prepared.
struct Write {
    attempted: u64,
    task: tokio::task::JoinHandle<Result<u64, StoreError>>,
}

impl Write {
    /// Waits for the write and counts what it wrote in `rewrapped`; `true`
    /// if some rows were skipped because they had changed since they were
    /// read.
    async fn finish(self, rewrapped: &Counter) -> Result<bool, ServiceError> {
        let written = self.task.await.map_err(Internal::TaskFailed)??;
        rewrapped.inc_by(written);
        Ok(written < self.attempted)
    }
}

/// Where one pass over an org's KEKs ended.
enum Pass {
    /// Every KEK is wrapped by the target.
    Complete,
    /// The job is not running, or the master is revoked: nothing to do now.
    Idle,
    /// Some KEKs could not be re-wrapped; retried at the next tick.
    Failures(u64),
    /// The other KEKs are re-wrapped; these wait for their key's provider to
    /// enable it again.
    Waiting(u64),
}

impl KeyService {
    /// The org's most recent rotation job and its progress.
    pub async fn rotation(&self, caller: &Caller) -> Result<RotationView, ServiceError> {
        self.audited(caller, "get rotation", None, true, async {
            let org = caller.org();
            let job = self
                .store
                .latest_rotation(org)
                .await?
                .ok_or(ServiceError::NoRotation)?;
            let state = self.org_state(org).await?;
            let blocked = state.master.is_err() || !state.provider_blocked.is_empty();
            Ok(progress(job, blocked, self.clock.now()))
        })
        .await
    }

    /// Works every running rotation job that no other replica is working
    /// until it is complete or cannot progress now; each under its org's
    /// lease, so that one replica works a job at a time. Errors of one org
    /// are logged and do not stop the others.
    pub async fn run_rotations(&self) -> Result<(), ServiceError> {
        for job in self.store.running_rotations().await? {
            let lease = format!("rotation/{}", job.org);
            let work = async {
                let _active = ActiveRotation::start(&self.metrics.rotations_active);
                self.rotate(&job.org).await
            };
            let outcome = self.leases.run(&lease, work).await;
            match outcome {
                Ok(Leased::Done(Ok(()))) | Ok(Leased::Busy) | Ok(Leased::Lost) => {}
                Ok(Leased::Done(Err(err))) => {
                    warn!(org = %job.org, job = job.id, error = %chain(&err), "rotation stopped; will retry");
                }
                Err(err) => {
                    warn!(org = %job.org, job = job.id, error = %chain(&err), "cannot claim the rotation job; will retry");
                }
            }
        }
        Ok(())
    }

    /// Waits until a change starts a rotation job, or `timeout` passes.
    pub async fn rotation_started(&self, timeout: std::time::Duration) {
        let _ = tokio::time::timeout(timeout, self.rotation_wake.notified()).await;
    }

    /// Re-wraps the org's KEKs to its active key, then retires the keys no KEK
    /// references any more.
    async fn rotate(&self, org: &OrgId) -> Result<(), ServiceError> {
        match self.rewrap_pass(org).await? {
            Pass::Complete => {
                let _guard = self.lock(org).await;
                self.settle_rotations(org).await?;
            }
            Pass::Idle => {}
            Pass::Failures(n) => {
                self.metrics.rewrap_failures.inc_by(n);
                warn!(%org, failed = n, "some KEKs could not be re-wrapped; will retry");
            }
            Pass::Waiting(n) => {
                info!(%org, waiting = n,
                      "rotation waits: KEKs wrapped by a key disabled in AWS KMS move once it is enabled again");
            }
        }
        Ok(())
    }

    /// One pass over the org's KEKs not wrapped by the job's target.
    ///
    /// The store write of each batch overlaps the read and the HSM calls of
    /// the next: their rows are disjoint (the next batch starts after the last
    /// id of this one), and every write re-checks the org's version and the
    /// job, so a write that lost a race fails whole and the pass starts over
    /// under the new state.
    async fn rewrap_pass(&self, org: &OrgId) -> Result<Pass, ServiceError> {
        let mut epoch: Option<Epoch> = None;
        let mut in_flight: Option<Write> = None;
        let mut after = None;
        let mut failed = 0u64;
        let mut waiting = 0u64;
        // Rows skipped because they changed under us are picked up by one more
        // pass from the start.
        let mut skipped = false;
        let mut last_report = Instant::now();
        loop {
            let current = match &epoch {
                Some(current) => current,
                None => match self.epoch(org).await? {
                    Some(current) => epoch.insert(current),
                    None => return Ok(Pass::Idle),
                },
            };
            let batch = self
                .store
                .keks_not_wrapped_by(
                    org,
                    &current.target,
                    after.as_ref(),
                    self.options.rotation_batch,
                )
                .await?;
            let rewraps = match batch.last() {
                Some(_) => Some(
                    self.rewrap_batch(org, current, &batch, &mut failed, &mut waiting)
                        .await?,
                ),
                None => None,
            };
            if let Some(write) = in_flight.take() {
                match write.finish(&self.metrics.keks_rewrapped).await {
                    Ok(short) => skipped |= short,
                    // The org's keys changed (revoked, or a newer activation)
                    // or the job ended: start over under the new state.
                    Err(ServiceError::Store(StoreError::Conflict(_))) => {
                        epoch = None;
                        after = None;
                        waiting = 0;
                        continue;
                    }
                    Err(err) => return Err(err),
                }
            }
            let (Some(last), Some(rewraps)) = (batch.last(), rewraps) else {
                if failed > 0 {
                    return Ok(Pass::Failures(failed));
                }
                if std::mem::take(&mut skipped) {
                    after = None;
                    waiting = 0;
                    continue;
                }
                if waiting > 0 {
                    return Ok(Pass::Waiting(waiting));
                }
                return Ok(Pass::Complete);
            };
            after = Some(last.id.clone());
            let attempted = rewraps.len() as u64;
            let store = self.store.clone();
            let (org_id, version, job) = (org.clone(), current.version, current.job);
            in_flight = Some(Write {
                attempted,
                task: tokio::spawn(async move {
                    store.rewrap_keks(&org_id, version, job, rewraps).await
                }),
            });
            if last_report.elapsed().as_secs() >= 5 {
                last_report = Instant::now();
                if let Some(job) = self.store.latest_rotation(org).await? {
                    info!(%org, job = job.id, done = job.done, total = job.total, "rotation progress");
                }
            }
        }
    }

    /// The org's running job and the state it works under, or `None` when
    /// there is nothing to do now.
    async fn epoch(&self, org: &OrgId) -> Result<Option<Epoch>, ServiceError> {
        let stored = self.load_or_enrol(org).await?;
        let Some(job) = self
            .store
            .latest_rotation(org)
            .await?
            .filter(|j| j.state == JobState::Running)
        else {
            return Ok(None);
        };
        let state = org_state_of(&stored);
        let (target, target_handle) = match state.master.clone() {
            Ok(master) => master,
            Err(err) => {
                info!(%org, job = job.id, reason = %err, "rotation waits: the master key is blocked");
                return Ok(None);
            }
        };
        if target != job.target {
            warn!(%org, job = job.id, target = %job.target, active = %target,
                  "rotation job's target is not the active key; waiting for a newer job");
            return Ok(None);
        }
        Ok(Some(Epoch {
            version: stored.version,
            job: job.id,
            target,
            target_handle,
            unwrap_keys: state.unwrap_keys,
            provider_blocked: state.provider_blocked,
        }))
    }

    /// Unwraps `batch` and wraps it under the target through the HSM daemon;
    /// KEKs that fail either step are counted in `failed`, those of a key
    /// disabled at its provider in `waiting` (without asking the daemon), and
    /// all of them left as they are.
    async fn rewrap_batch(
        &self,
        org: &OrgId,
        epoch: &Epoch,
        batch: &[StoredKek],
        failed: &mut u64,
        waiting: &mut u64,
    ) -> Result<Vec<Rewrap>, ServiceError> {
        let (blocked, batch): (Vec<&StoredKek>, Vec<&StoredKek>) = batch
            .iter()
            .partition(|k| epoch.provider_blocked.contains(&k.key));
        *waiting += blocked.len() as u64;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let aads: Vec<Vec<u8>> = batch
            .iter()
            .map(|k| envelope::kek_associated_data(org, &k.id))
            .collect();
        let items: Vec<(&[u8], &[u8])> = batch
            .iter()
            .zip(&aads)
            .map(|(k, aad)| (k.wrapped.as_slice(), aad.as_slice()))
            .collect();
        let unwrapped = self.hsm.unwrap_batch(org, &items).await?;
        let mut plain: Vec<(usize, SecretBytes)> = Vec::with_capacity(batch.len());
        for (i, (kek, result)) in batch.iter().zip(unwrapped).enumerate() {
            match result {
                Ok(u) if epoch.unwrap_keys.get(&kek.key) == Some(&u.handle) => {
                    plain.push((i, u.plaintext));
                }
                Ok(_) => {
                    *failed += 1;
                    warn!(%org, kek = %kek.id, key = %kek.key,
                          "KEK's ciphertext names another CMK than its row; left as it is");
                }
                Err(status) => {
                    *failed += 1;
                    warn!(%org, kek = %kek.id, key = %kek.key, code = ?status.code(),
                          message = status.message(), "cannot unwrap KEK; left as it is");
                }
            }
        }
        let wrap_items: Vec<(&str, &SecretBytes, &[u8])> = plain
            .iter()
            .map(|(i, p)| (epoch.target_handle.as_str(), p, aads[*i].as_slice()))
            .collect();
        let wrapped = match wrap_items.is_empty() {
            true => Vec::new(),
            false => self.hsm.wrap_batch(org, &wrap_items).await?,
        };
        let mut rewraps = Vec::with_capacity(plain.len());
        for ((i, _), result) in plain.iter().zip(wrapped) {
            let kek = batch[*i];
            match result {
                Ok(ciphertext) => rewraps.push(Rewrap {
                    kek: kek.id.clone(),
                    from: kek.key.clone(),
                    to: epoch.target.clone(),
                    wrapped: ciphertext,
                }),
                Err(status) => {
                    *failed += 1;
                    warn!(%org, kek = %kek.id, code = ?status.code(),
                          message = status.message(), "cannot wrap KEK under the target key");
                }
            }
        }
        Ok(rewraps)
    }

    /// Under the org's lock: moves every rotating key that no KEK references
    /// any more out of rotation (the commit counts again), and ends the running
    /// job once no rotating key is left. Returns the org as stored.
    pub(crate) async fn settle_rotations(&self, org: &OrgId) -> Result<StoredOrg, ServiceError> {
        let counts: HashMap<KeyId, u64> = self.store.kek_counts(org).await?.into_iter().collect();
        let mut stored = self.load_or_enrol(org).await?;
        let idle: Vec<KeyId> = stored
            .keys
            .iter()
            .filter(|k| k.record.state == KeyState::Rotating)
            .filter(|k| counts.get(&k.record.id).copied().unwrap_or(0) == 0)
            .map(|k| k.record.id.clone())
            .collect();
        for key in idle {
            // The domain requires that the key wraps no KEK when it commits.
            let plan = |_: &StoredOrg| Ok(Step::command(Command::FinishRotation(key.clone())));
            let action = format!("rotation finished for key {key}: 0 KEKs wrapped by it (counted)");
            (stored, _) = self
                .apply(SERVICE_ACTOR, org, &action, Some(&key), plan)
                .await?;
        }
        // A rotating key disabled at its provider still needs the job.
        let rotating = stored
            .keys
            .iter()
            .any(|k| k.record.slot() == KeyState::Rotating);
        let running = self
            .store
            .latest_rotation(org)
            .await?
            .filter(|j| j.state == JobState::Running);
        if let (false, Some(job)) = (rotating, running) {
            let plan = |_: &StoredOrg| {
                Ok(Step {
                    finish_job: Some(job.id),
                    ..Step::nothing()
                })
            };
            let action = format!(
                "rotation job {} finished: {} of {} KEKs re-wrapped to {}",
                job.id, job.done, job.total, job.target
            );
            (stored, _) = self
                .apply(SERVICE_ACTOR, org, &action, Some(&job.target), plan)
                .await?;
            info!(%org, job = job.id, done = job.done, total = job.total, "rotation finished");
        }
        Ok(stored)
    }
}

/// Progress figures of `job` at `now`.
fn progress(job: RotationJob, blocked: bool, now: Timestamp) -> RotationView {
    let running = job.state == JobState::Running;
    let end = job.ended_at.unwrap_or(now);
    let elapsed = (end.0 - job.started_at.0).max(1) as f64;
    let rate = job.done as f64 / elapsed;
    let remaining = job.total.saturating_sub(job.done);
    let eta_seconds = match (running && !blocked, rate > 0.0) {
        (true, true) => (remaining as f64 / rate).ceil() as u64,
        _ => 0,
    };
    RotationView {
        paused: running && blocked,
        rate_per_second: rate,
        eta_seconds,
        job,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(total: u64, done: u64, state: JobState) -> RotationJob {
        RotationJob {
            org: OrgId::parse("acme").expect("valid"),
            id: 1,
            target: KeyId("key-b".into()),
            from: vec![KeyId("key-a".into())],
            total,
            done,
            started_at: Timestamp(1000),
            ended_at: None,
            state,
        }
    }

    #[test]
    fn progress_reports_rate_and_eta_only_while_running() {
        let view = progress(job(1000, 250, JobState::Running), false, Timestamp(1010));
        assert_eq!(view.rate_per_second, 25.0);
        assert_eq!(view.eta_seconds, 30);
        assert!(!view.paused);

        let paused = progress(job(1000, 250, JobState::Running), true, Timestamp(1010));
        assert!(paused.paused);
        assert_eq!(paused.eta_seconds, 0, "no estimate while revoked");

        let mut finished = job(1000, 1000, JobState::Finished);
        finished.ended_at = Some(Timestamp(1020));
        let view = progress(finished, false, Timestamp(5000));
        assert_eq!(
            view.rate_per_second, 50.0,
            "rate over the job's own duration"
        );
        assert_eq!(view.eta_seconds, 0);

        let fresh = progress(job(10, 0, JobState::Running), false, Timestamp(1000));
        assert_eq!(fresh.rate_per_second, 0.0);
        assert_eq!(fresh.eta_seconds, 0, "no estimate before any progress");
    }
}
