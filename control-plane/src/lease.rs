//! Work that one replica at a time does — an org's rotation job, the timers —
//! runs under a lease in the store (SPEC §8): claimed before it starts,
//! renewed while it runs, given up when it ends. A replica that dies stops
//! renewing, and another claims the lease once its time runs out.
//!
//! The lease saves duplicate work; it does not keep the data right. A
//! replica that stalls past its lease (a long pause, a partition from the
//! database) may still be finishing a step when another takes over, so every
//! write of leased work is one that is safe to race: a re-wrap is written
//! only if the KEK is still wrapped by the key it was read under, the timers'
//! changes are version-checked commits, and custody calls are bracketed by
//! intents.

use std::{future::Future, time::Duration};

use cmk_control_plane_store::{Store, StoreError};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::chain;

/// This process's name as a lease holder: the host name (a pod's name on
/// Kubernetes), the process id and a random suffix, so that an operator
/// reading the `leases` table can tell which replica holds what, and a
/// restarted process with a recycled pid is still someone else.
pub fn replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into());
    let mut suffix = [0u8; 4];
    // AWS-LC's RAND_bytes aborts rather than fail, so this cannot fail.
    aws_lc_rs::rand::fill(&mut suffix).expect("AWS-LC RAND_bytes never fails without aborting");
    format!("{host}:{}:{}", std::process::id(), hex::encode(suffix))
}

/// How a leased piece of work ended.
#[derive(Debug)]
pub enum Leased<T> {
    /// It ran to the end under the lease.
    Done(T),
    /// Another replica holds the lease; nothing was run.
    Busy,
    /// The lease could not be renewed in time, so the work was stopped where
    /// it was (another replica may be doing it now).
    Lost,
}

/// Runs `work` holding the lease `name` as `holder`, renewing it every third
/// of `ttl`; the lease is given up when `work` ends.
///
/// A renewal that is refused, or that keeps failing until the lease would
/// have run out, stops `work` at its next await point: the work must be
/// safe to stop anywhere (as it must be to survive a crash).
pub async fn with_lease<T>(
    store: &dyn Store,
    holder: &str,
    name: &str,
    ttl: Duration,
    work: impl Future<Output = T>,
) -> Result<Leased<T>, StoreError> {
    let claimed = Instant::now();
    if !store.acquire_lease(name, holder, ttl).await? {
        debug!(lease = name, "held by another replica");
        return Ok(Leased::Busy);
    }
    // By this process's clock, the lease runs out no earlier than `ttl` after
    // the claim was sent.
    let mut held_until = claimed + ttl;
    let every = ttl / 3;
    let mut renewals = tokio::time::interval_at(claimed + every, every);
    renewals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(work);
    let outcome = loop {
        tokio::select! {
            out = &mut work => break Leased::Done(out),
            _ = renewals.tick() => {
                let sent = Instant::now();
                match store.acquire_lease(name, holder, ttl).await {
                    Ok(true) => held_until = sent + ttl,
                    Ok(false) => {
                        warn!(lease = name, "lease taken over by another replica; stopping this work");
                        break Leased::Lost;
                    }
                    Err(err) if Instant::now() + every >= held_until => {
                        warn!(lease = name, error = %chain(&err),
                              "cannot renew the lease before it runs out; stopping this work");
                        break Leased::Lost;
                    }
                    Err(err) => {
                        warn!(lease = name, error = %chain(&err), "cannot renew the lease; will retry");
                    }
                }
            }
        }
    };
    if let Err(err) = store.release_lease(name, holder).await {
        // It runs out by itself.
        warn!(lease = name, error = %chain(&err), "cannot give up the lease");
    }
    Ok(outcome)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use cmk_control_plane_store::SqliteStore;

    use super::*;

    async fn store(dir: &tempfile::TempDir) -> SqliteStore {
        let url = format!("sqlite://{}", dir.path().join("cmk.db").display());
        SqliteStore::open(&url).await.unwrap()
    }

    #[tokio::test]
    async fn work_runs_once_at_a_time_and_the_lease_is_given_up_after() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let ttl = Duration::from_secs(30);
        let inner = with_lease(&store, "b", "job", ttl, async { 1 });
        let outer = with_lease(&store, "a", "job", ttl, async {
            // While "a" works, "b" is turned away.
            matches!(inner.await.unwrap(), Leased::Busy)
        });
        assert!(matches!(outer.await.unwrap(), Leased::Done(true)));
        let after = with_lease(&store, "b", "job", ttl, async { 2 }).await;
        assert!(matches!(after.unwrap(), Leased::Done(2)));
    }

    #[tokio::test]
    async fn long_work_keeps_its_lease_by_renewing_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let ttl = Duration::from_millis(600);
        let work = async {
            tokio::time::sleep(ttl * 3).await;
            // Long past the first claim's time, the lease is still ours.
            store.acquire_lease("job", "b", ttl).await.unwrap()
        };
        let outcome = with_lease(&store, "a", "job", ttl, work).await.unwrap();
        assert!(matches!(outcome, Leased::Done(false)));
    }

    #[tokio::test]
    async fn work_whose_lease_is_taken_over_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let ttl = Duration::from_millis(900);
        let finished = Arc::new(AtomicBool::new(false));
        let work = {
            let finished = finished.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                finished.store(true, Ordering::SeqCst);
            }
        };
        let thief = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            // As if "a" had stalled: its lease is gone and "b" holds it.
            store.release_lease("job", "a").await.unwrap();
            assert!(store.acquire_lease("job", "b", ttl * 10).await.unwrap());
        };
        let (outcome, ()) = tokio::join!(with_lease(&store, "a", "job", ttl, work), thief);
        assert!(matches!(outcome.unwrap(), Leased::Lost));
        assert!(!finished.load(Ordering::SeqCst), "the work was stopped");
        assert!(
            !store.acquire_lease("job", "a", ttl).await.unwrap(),
            "stopping gave up nothing that was not its own"
        );
    }

    #[test]
    fn replica_ids_name_the_host_and_process_and_differ() {
        let (a, b) = (replica_id(), replica_id());
        assert_ne!(a, b);
        let pid = format!(":{}:", std::process::id());
        assert!(a.contains(&pid), "{a}");
    }
}
