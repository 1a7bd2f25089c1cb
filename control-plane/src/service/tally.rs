//! The data path's audit: content-key calls (CreateKek, GenerateDataKey,
//! Decrypt, and their refusals after authorisation) counted per (org,
//! caller, KEK, operation, result, minute) in memory, and written to each
//! org's chained audit log as one row per count when flushed: at least every
//! [`FLUSH_INTERVAL`] and at a clean shutdown. A row reads, e.g., actor
//! `spiffe://…/service/acme`, key `kek-…`, action `generate data key ×1520`,
//! result `ok`, time the minute's start.
//!
//! Counting costs a hash-map update under a mutex per call; a row per call
//! would cost a database write per call, and the data path runs at tens of
//! thousands of calls per second. What a crash can lose is the counts not
//! flushed yet: at most one flush interval of calls, never a row already
//! written. Refusals of authorisation are audited one by one as before.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use cmk_control_plane_domain::{KekId, OrgId, Timestamp};
use cmk_control_plane_store::NewAuditEvent;
use tracing::{info, warn};

use super::KeyService;
use crate::{
    authz::Caller,
    error::{ServiceError, chain},
};

/// Longest a count stays in memory before it is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(10);

/// What one count is of.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Bucket {
    org: OrgId,
    minute: i64,
    actor: String,
    action: &'static str,
    kek: Option<String>,
    result: String,
}

/// Counts of content-key calls not yet written.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    counts: Mutex<HashMap<Bucket, u64>>,
}

impl Tally {
    fn add(&self, bucket: Bucket, count: u64) {
        *self
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(bucket)
            .or_insert(0) += count;
    }

    fn take(&self) -> HashMap<Bucket, u64> {
        std::mem::take(&mut *self.counts.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl KeyService {
    /// Counts one content-key call of `caller`: `action` on `kek` (when the
    /// call named one) that ended in `result`.
    pub(crate) fn tally(
        &self,
        caller: &Caller,
        action: &'static str,
        kek: Option<&KekId>,
        result: Result<(), &ServiceError>,
    ) {
        let now = self.clock.now().0;
        let bucket = Bucket {
            org: caller.org().clone(),
            minute: now - now.rem_euclid(60),
            actor: caller.identity().to_owned(),
            action,
            kek: kek.map(ToString::to_string),
            result: match result {
                Ok(()) => "ok".to_owned(),
                Err(err) => super::audit::refusal(err),
            },
        };
        self.tally.add(bucket, 1);
    }

    /// Writes every count into its org's audit log, an org's rows in one
    /// append; counts of orgs that are not enrolled go to the process log.
    /// Returns the rows written.
    pub async fn flush_tally(&self) -> usize {
        let mut counts: Vec<(Bucket, u64)> = self.tally.take().into_iter().collect();
        counts.sort();
        let mut written = 0;
        let mut rest = counts.as_slice();
        while let Some((first, _)) = rest.first() {
            let org = first.org.clone();
            let split = rest
                .iter()
                .position(|(b, _)| b.org != org)
                .unwrap_or(rest.len());
            let (this, next) = rest.split_at(split);
            rest = next;
            let events: Vec<NewAuditEvent> = this
                .iter()
                .map(|(bucket, count)| NewAuditEvent {
                    time: Timestamp(bucket.minute),
                    actor: bucket.actor.clone(),
                    key: bucket.kek.clone(),
                    action: format!("{} ×{count}", bucket.action),
                    result: bucket.result.clone(),
                })
                .collect();
            let stored = match self.store.load_org(&org).await {
                Ok(Some(_)) => self.store.append_audit(&org, events.clone()).await,
                Ok(None) => {
                    for event in &events {
                        self.metrics.refusals_unknown_org.inc();
                        info!(%org, actor = %event.actor, action = %event.action, result = %event.result,
                              "content-key calls for an organisation that does not exist");
                    }
                    continue;
                }
                Err(err) => Err(err),
            };
            match stored {
                Ok(()) => written += events.len(),
                Err(err) => {
                    // Kept, to be written with the next flush.
                    for (bucket, count) in this {
                        self.tally.add(bucket.clone(), *count);
                    }
                    warn!(error = %chain(&err), %org, "cannot write content-key counts yet; kept for the next flush");
                }
            }
        }
        written
    }
}
