//! Work that one replica at a time does — an org's rotation job, the timers —
//! runs under a lease in the store (docs/design.md, "Rotation jobs"): claimed before it starts,
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

use std::{
    collections::HashSet,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

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

/// This process's leases in `store`, held under one holder name.
pub struct Leases {
    store: Arc<dyn Store>,
    holder: String,
    ttl: Duration,
    /// Names this process has claimed and not yet given up, including those
    /// of work that was cancelled mid-way (a stopped task cannot run async
    /// code on its way out): [`Leases::release_all`] gives them up.
    held: Mutex<HashSet<String>>,
}

impl Leases {
    /// Leases of `store` held as `holder` for `ttl` at a time.
    pub fn new(store: Arc<dyn Store>, holder: String, ttl: Duration) -> Self {
        Self {
            store,
            holder,
            ttl,
            held: Mutex::default(),
        }
    }

    /// This process's name as a lease holder.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Runs `work` holding the lease `name`, renewing it every third of the
    /// TTL; the lease is given up when `work` ends.
    ///
    /// A renewal that is refused, or that keeps failing until the lease would
    /// have run out, stops `work` at its next await point: the work must be
    /// safe to stop anywhere (as it must be to survive a crash).
    pub async fn run<T>(
        &self,
        name: &str,
        work: impl Future<Output = T>,
    ) -> Result<Leased<T>, StoreError> {
        let (store, holder, ttl) = (&*self.store, self.holder.as_str(), self.ttl);
        let claimed = Instant::now();
        // Noted before the claim is sent: if this future is dropped while the
        // claim is in flight, the database may still grant it, and
        // `release_all` must then give it up. Releasing a lease that is not
        // ours changes nothing.
        self.held().insert(name.to_owned());
        match store.acquire_lease(name, holder, ttl).await {
            Ok(true) => {}
            Ok(false) => {
                self.held().remove(name);
                debug!(lease = name, "held by another replica");
                return Ok(Leased::Busy);
            }
            // Perhaps granted, perhaps not: left for `release_all`.
            Err(err) => return Err(err),
        }
        // By this process's clock, the lease runs out no earlier than `ttl`
        // after the claim was sent.
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
        self.release(name).await;
        Ok(outcome)
    }

    /// Gives up every lease this process still holds, for a clean stop:
    /// another replica, or this one restarted, takes the work over at once
    /// instead of when the leases run out. Call it once the leased work has
    /// been stopped.
    pub async fn release_all(&self) {
        let names: Vec<String> = self.held().iter().cloned().collect();
        for name in names {
            self.release(&name).await;
        }
    }

    async fn release(&self, name: &str) {
        match self.store.release_lease(name, &self.holder).await {
            Ok(()) => {
                self.held().remove(name);
            }
            // It runs out by itself.
            Err(err) => warn!(lease = name, error = %chain(&err), "cannot give up the lease"),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // The set is only inserted into and removed from: a panic elsewhere
        // cannot leave it inconsistent.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use cmk_control_plane_store::SqliteStore;

    use super::*;

    async fn store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
        let url = format!("sqlite://{}", dir.path().join("cmk.db").display());
        Arc::new(SqliteStore::open(&url).await.unwrap())
    }

    fn leases(store: &Arc<dyn Store>, holder: &str, ttl: Duration) -> Leases {
        Leases::new(store.clone(), holder.into(), ttl)
    }

    #[tokio::test]
    async fn work_runs_once_at_a_time_and_the_lease_is_given_up_after() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let ttl = Duration::from_secs(30);
        let (a, b) = (leases(&store, "a", ttl), leases(&store, "b", ttl));
        let inner = b.run("job", async { 1 });
        let outer = a.run("job", async {
            // While "a" works, "b" is turned away.
            matches!(inner.await.unwrap(), Leased::Busy)
        });
        assert!(matches!(outer.await.unwrap(), Leased::Done(true)));
        let after = b.run("job", async { 2 }).await;
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
        let outcome = leases(&store, "a", ttl).run("job", work).await.unwrap();
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
        let a = leases(&store, "a", ttl);
        let (outcome, ()) = tokio::join!(a.run("job", work), thief);
        assert!(matches!(outcome.unwrap(), Leased::Lost));
        assert!(!finished.load(Ordering::SeqCst), "the work was stopped");
        assert!(
            !store.acquire_lease("job", "a", ttl).await.unwrap(),
            "stopping gave up nothing that was not its own"
        );
    }

    #[tokio::test]
    async fn leases_of_cancelled_work_are_given_up_by_release_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let ttl = Duration::from_secs(60);
        let a = Arc::new(leases(&store, "a", ttl));
        let (started, running) = tokio::sync::oneshot::channel();
        let task = {
            let a = a.clone();
            tokio::spawn(async move {
                let work = async {
                    let _ = started.send(());
                    std::future::pending::<()>().await
                };
                a.run("job", work).await
            })
        };
        running.await.unwrap();
        task.abort();
        let _ = task.await;
        assert!(
            !store.acquire_lease("job", "b", ttl).await.unwrap(),
            "still held"
        );
        a.release_all().await;
        assert!(
            store.acquire_lease("job", "b", ttl).await.unwrap(),
            "given up"
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
