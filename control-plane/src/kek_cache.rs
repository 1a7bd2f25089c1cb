//! Unwrapped KEKs, kept in memory so that most content-key operations need no
//! round trip to the HSM daemon.
//!
//! The cache holds at most `capacity` KEKs, each for a fixed TTL from when it was
//! inserted; when full, the oldest inserted goes first. Because the TTL is fixed,
//! insertion order is also expiry order, so one queue serves both eviction and
//! expiry. The queue is cleaned lazily: an entry replaced, invalidated or expired
//! leaves a stale slot behind, recognised by its generation number, so that a
//! re-inserted KEK is never evicted by the slot of its earlier insertion.
//!
//! KEKs are handed out as `Arc<SecretBytes>`: a hit copies no key bytes, and the
//! bytes are wiped when the last holder lets go — the cache on eviction, expiry
//! or invalidation, a caller when its request ends.
//!
//! Entries are keyed by org and KEK id together, so a KEK id presented by one org
//! never hits a KEK cached for another.
//!
//! The cache does not decide whether a KEK may be used. [`KekCache::invalidate_org`]
//! drops an org's KEKs when its master key is revoked, but an HSM unwrap that
//! started before the revocation can still insert after it; callers check the
//! org's key state before serving from the cache.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use cmk_control_plane_domain::{KekId, OrgId};
use cmk_secret::SecretBytes;

/// A bounded, expiring, thread-safe cache of unwrapped KEKs.
pub struct KekCache {
    capacity: usize,
    ttl: Duration,
    inner: Mutex<Inner>,
}

/// Counters of a [`KekCache`] since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that found nothing, or only an expired entry.
    pub misses: u64,
    /// KEKs held now.
    pub entries: usize,
}

impl KekCache {
    /// A cache of at most `capacity` KEKs, each kept for `ttl` after insertion.
    /// A capacity of zero caches nothing.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            capacity,
            ttl,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The KEK `kek` of `org`, if cached and not expired.
    pub fn get(&self, org: &OrgId, kek: &KekId) -> Option<Arc<SecretBytes>> {
        self.get_at(org, kek, Instant::now())
    }

    /// Caches `key` as the KEK `kek` of `org`, replacing (and restarting the TTL
    /// of) any entry already there, and evicting the oldest entry if full. Returns
    /// the key, shared with the cache.
    pub fn insert(&self, org: OrgId, kek: KekId, key: SecretBytes) -> Arc<SecretBytes> {
        self.insert_at(org, kek, key, Instant::now())
    }

    /// Drops the KEK `kek` of `org`, saying whether it was cached.
    pub fn invalidate(&self, org: &OrgId, kek: &KekId) -> bool {
        self.lock().remove(org, kek).is_some()
    }

    /// Drops every KEK of `org` at once (its master key was revoked), returning how
    /// many were cached.
    pub fn invalidate_org(&self, org: &OrgId) -> usize {
        let mut inner = self.lock();
        let dropped = inner.orgs.remove(org).map_or(0, |keks| keks.len());
        inner.len -= dropped;
        dropped
    }

    /// Number of KEKs held, not counting expired ones.
    pub fn len(&self) -> usize {
        self.len_at(Instant::now())
    }

    /// Whether no KEK is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hits and misses so far, and the KEKs held now.
    pub fn stats(&self) -> CacheStats {
        self.stats_at(Instant::now())
    }

    pub(crate) fn get_at(
        &self,
        org: &OrgId,
        kek: &KekId,
        now: Instant,
    ) -> Option<Arc<SecretBytes>> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.purge_expired(now);
        let found = match inner.orgs.get(org).and_then(|keks| keks.get(kek)) {
            Some(entry) if !entry.expired(now) => Some(Arc::clone(&entry.key)),
            Some(_) => {
                // Possible only when callers' clocks were read out of order just
                // before they took the lock.
                inner.remove(org, kek);
                None
            }
            None => None,
        };
        if found.is_some() {
            inner.hits = inner.hits.saturating_add(1);
        } else {
            inner.misses = inner.misses.saturating_add(1);
        }
        found
    }

    pub(crate) fn insert_at(
        &self,
        org: OrgId,
        kek: KekId,
        key: SecretBytes,
        now: Instant,
    ) -> Arc<SecretBytes> {
        let key = Arc::new(key);
        if self.capacity == 0 {
            return key;
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.purge_expired(now);
        inner.remove(&org, &kek);
        while inner.len >= self.capacity && inner.evict_oldest() {}

        let generation = inner.next_generation;
        inner.next_generation += 1;
        inner.order.push_back(Slot {
            org: org.clone(),
            kek: kek.clone(),
            generation,
        });
        inner.orgs.entry(org).or_default().insert(
            kek,
            Entry {
                key: Arc::clone(&key),
                // A TTL too long for the clock to represent never expires.
                expires_at: now.checked_add(self.ttl),
                generation,
            },
        );
        inner.len += 1;
        // Stale slots are left behind by replacement, expiry on lookup and
        // invalidation; without this, re-inserting one KEK forever would grow the
        // queue forever. Compacting only past twice the capacity keeps it amortised
        // O(1) per insert.
        if inner.order.len() > 2 * self.capacity {
            inner.compact();
        }
        key
    }

    pub(crate) fn len_at(&self, now: Instant) -> usize {
        let mut inner = self.lock();
        inner.purge_expired(now);
        inner.len
    }

    pub(crate) fn stats_at(&self, now: Instant) -> CacheStats {
        let mut inner = self.lock();
        inner.purge_expired(now);
        CacheStats {
            hits: inner.hits,
            misses: inner.misses,
            entries: inner.len,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing done while holding the lock can panic (it moves entries between
        // std collections; allocation failure aborts), so a poisoned lock still
        // guards a consistent cache.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for KekCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KekCache")
            .field("capacity", &self.capacity)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    orgs: HashMap<OrgId, HashMap<KekId, Entry>>,
    /// Every entry's slot, oldest insertion first, among stale slots whose
    /// generation no longer matches an entry.
    order: VecDeque<Slot>,
    /// Entries in `orgs`, summed over orgs.
    len: usize,
    next_generation: u64,
    hits: u64,
    misses: u64,
}

struct Entry {
    key: Arc<SecretBytes>,
    /// `None`: never.
    expires_at: Option<Instant>,
    generation: u64,
}

impl Entry {
    fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

struct Slot {
    org: OrgId,
    kek: KekId,
    generation: u64,
}

impl Inner {
    fn live(&self, slot: &Slot) -> Option<&Entry> {
        live(&self.orgs, slot)
    }

    fn remove(&mut self, org: &OrgId, kek: &KekId) -> Option<Entry> {
        let keks = self.orgs.get_mut(org)?;
        let entry = keks.remove(kek)?;
        if keks.is_empty() {
            self.orgs.remove(org);
        }
        self.len -= 1;
        Some(entry)
    }

    /// Drops expired entries, which are all at the front of the queue.
    fn purge_expired(&mut self, now: Instant) {
        while let Some(slot) = self.order.front() {
            match self.live(slot) {
                Some(entry) if !entry.expired(now) => break,
                Some(_) => {
                    if let Some(slot) = self.order.pop_front() {
                        self.remove(&slot.org, &slot.kek);
                    }
                }
                None => {
                    self.order.pop_front();
                }
            }
        }
    }

    /// Drops the oldest live entry; false if there is none.
    fn evict_oldest(&mut self) -> bool {
        while let Some(slot) = self.order.pop_front() {
            if self.live(&slot).is_some() {
                self.remove(&slot.org, &slot.kek);
                return true;
            }
        }
        false
    }

    fn compact(&mut self) {
        let orgs = &self.orgs;
        self.order.retain(|slot| live(orgs, slot).is_some());
    }
}

fn live<'a>(orgs: &'a HashMap<OrgId, HashMap<KekId, Entry>>, slot: &Slot) -> Option<&'a Entry> {
    orgs.get(&slot.org)
        .and_then(|keks| keks.get(&slot.kek))
        .filter(|entry| entry.generation == slot.generation)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    fn org(i: usize) -> OrgId {
        OrgId::parse(&format!("org-{i}")).unwrap()
    }

    fn kek(i: usize) -> KekId {
        KekId::from_random([u8::try_from(i).unwrap(); 16])
    }

    fn key(value: u64) -> SecretBytes {
        SecretBytes::new(value.to_be_bytes().to_vec())
    }

    fn value(key: &SecretBytes) -> u64 {
        u64::from_be_bytes(key.expose().try_into().unwrap())
    }

    #[test]
    fn a_hit_returns_the_inserted_key_and_counts() {
        let cache = KekCache::new(4, TTL);
        let t = Instant::now();
        assert!(cache.get_at(&org(0), &kek(0), t).is_none());
        let inserted = cache.insert_at(org(0), kek(0), key(7), t);
        let hit = cache.get_at(&org(0), &kek(0), t).unwrap();
        assert!(
            Arc::ptr_eq(&inserted, &hit),
            "a hit shares, not copies, the key"
        );
        assert_eq!(value(&hit), 7);
        assert!(
            cache.get_at(&org(1), &kek(0), t).is_none(),
            "keyed by org too"
        );
        assert_eq!(
            cache.stats_at(t),
            CacheStats {
                hits: 1,
                misses: 2,
                entries: 1
            }
        );
    }

    #[test]
    fn capacity_bound_holds_and_the_oldest_goes_first() {
        let cache = KekCache::new(3, TTL);
        let t = Instant::now();
        for i in 0..3 {
            cache.insert_at(org(0), kek(i), key(i as u64), t);
        }
        // A hit does not make an entry younger: eviction is by insertion.
        assert!(cache.get_at(&org(0), &kek(0), t).is_some());
        cache.insert_at(org(1), kek(3), key(3), t);
        assert_eq!(cache.len_at(t), 3);
        assert!(cache.get_at(&org(0), &kek(0), t).is_none());
        for i in 4..10 {
            cache.insert_at(org(0), kek(i), key(i as u64), t);
            assert_eq!(cache.len_at(t), 3);
        }
        let held: Vec<_> = (0..10)
            .filter(|&i| cache.get_at(&org(0), &kek(i), t).is_some())
            .collect();
        assert_eq!(held, [7, 8, 9]);
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let cache = KekCache::new(4, TTL);
        let t = Instant::now();
        cache.insert_at(org(0), kek(0), key(0), t);
        cache.insert_at(org(0), kek(1), key(1), t + Duration::from_secs(5));
        let just_before = t + TTL - Duration::from_nanos(1);
        assert!(cache.get_at(&org(0), &kek(0), just_before).is_some());
        assert_eq!(cache.len_at(t + TTL), 1);
        assert!(cache.get_at(&org(0), &kek(0), t + TTL).is_none());
        assert!(cache.get_at(&org(0), &kek(1), t + TTL).is_some());
        assert!(
            cache
                .get_at(&org(0), &kek(1), t + TTL + Duration::from_secs(5))
                .is_none()
        );
        assert_eq!(cache.len_at(t + 2 * TTL), 0);
        assert_eq!(cache.stats_at(t + 2 * TTL).misses, 2);
    }

    #[test]
    fn an_evicted_key_is_released_by_the_cache() {
        let cache = KekCache::new(1, TTL);
        let t = Instant::now();
        let first = cache.insert_at(org(0), kek(0), key(0), t);
        assert_eq!(Arc::strong_count(&first), 2);
        cache.insert_at(org(0), kek(1), key(1), t);
        // Only the caller's handle is left: dropping it wipes the bytes.
        assert_eq!(Arc::strong_count(&first), 1);
    }

    #[test]
    fn invalidate_org_drops_only_that_org() {
        let cache = KekCache::new(10, TTL);
        let t = Instant::now();
        for i in 0..6 {
            cache.insert_at(org(i % 2), kek(i), key(i as u64), t);
        }
        assert_eq!(cache.invalidate_org(&org(0)), 3);
        assert_eq!(cache.invalidate_org(&org(0)), 0);
        assert_eq!(cache.len_at(t), 3);
        for i in 0..6 {
            assert_eq!(cache.get_at(&org(i % 2), &kek(i), t).is_some(), i % 2 == 1);
        }
        assert!(cache.invalidate(&org(1), &kek(1)));
        assert!(!cache.invalidate(&org(1), &kek(1)));
        assert_eq!(cache.len_at(t), 2);
    }

    #[test]
    fn a_reinserted_key_is_replaced_and_not_evicted_by_its_old_slot() {
        let cache = KekCache::new(3, TTL);
        let t = Instant::now();
        cache.insert_at(org(0), kek(0), key(0), t);
        cache.insert_at(org(0), kek(1), key(1), t);
        cache.insert_at(org(0), kek(2), key(2), t);
        let later = t + Duration::from_secs(5);
        cache.insert_at(org(0), kek(0), key(100), later);
        assert_eq!(cache.len_at(later), 3);
        cache.insert_at(org(0), kek(3), key(3), later);
        assert!(
            cache.get_at(&org(0), &kek(1), later).is_none(),
            "kek 1 is now the oldest"
        );
        assert_eq!(value(&cache.get_at(&org(0), &kek(0), later).unwrap()), 100);
        // The TTL restarted with the re-insertion.
        assert!(cache.get_at(&org(0), &kek(0), t + TTL).is_some());
        assert!(cache.get_at(&org(0), &kek(2), t + TTL).is_none());
    }

    #[test]
    fn reinserting_forever_keeps_the_queue_bounded() {
        let cache = KekCache::new(2, TTL);
        let t = Instant::now();
        for i in 0..1000 {
            cache.insert_at(org(0), kek(i % 3), key(i as u64), t);
            assert!(cache.lock().order.len() <= 2 * 2);
        }
        assert_eq!(cache.len_at(t), 2);
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let cache = KekCache::new(0, TTL);
        let handed = cache.insert(org(0), kek(0), key(5));
        assert_eq!(value(&handed), 5);
        assert!(cache.get(&org(0), &kek(0)).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn an_unrepresentable_ttl_never_expires() {
        let cache = KekCache::new(1, Duration::MAX);
        let t = Instant::now();
        cache.insert_at(org(0), kek(0), key(0), t);
        assert!(
            cache
                .get_at(&org(0), &kek(0), t + Duration::from_secs(1 << 40))
                .is_some()
        );
    }

    #[test]
    fn concurrent_use_keeps_the_bound() {
        let cache = KekCache::new(8, TTL);
        std::thread::scope(|scope| {
            for thread in 0..8 {
                let cache = &cache;
                scope.spawn(move || {
                    for i in 0..500 {
                        let (o, k) = (org((thread + i) % 3), kek(i % 20));
                        if cache.get(&o, &k).is_none() {
                            cache.insert(o, k, key(i as u64));
                        }
                        if i % 97 == 0 {
                            cache.invalidate_org(&org(thread % 3));
                        }
                        assert!(cache.len() <= 8);
                    }
                });
            }
        });
        let stats = cache.stats();
        assert_eq!(stats.hits + stats.misses, 8 * 500);
        assert!(stats.entries <= 8);
    }

    #[test]
    fn debug_prints_no_keys() {
        let cache = KekCache::new(2, TTL);
        cache.insert(org(0), kek(0), key(0x4142_4344_4546_4748));
        assert_eq!(
            format!("{cache:?}"),
            "KekCache { capacity: 2, ttl: 10s, .. }"
        );
    }

    #[derive(Clone, Debug)]
    enum Op {
        Get(usize, usize),
        Insert(usize, usize),
        InvalidateOrg(usize),
        Invalidate(usize, usize),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..3usize, 0..4usize).prop_map(|(o, k)| Op::Get(o, k)),
            3 => (0..3usize, 0..4usize).prop_map(|(o, k)| Op::Insert(o, k)),
            1 => (0..3usize).prop_map(Op::InvalidateOrg),
            1 => (0..3usize, 0..4usize).prop_map(|(o, k)| Op::Invalidate(o, k)),
            2 => (0..6000u64).prop_map(Op::Advance),
        ]
    }

    /// The cache's behaviour, written as plainly as possible: entries oldest first.
    struct Model {
        capacity: usize,
        entries: Vec<(usize, usize, u64, Instant)>,
        hits: u64,
        misses: u64,
    }

    impl Model {
        fn expire(&mut self, now: Instant) {
            self.entries.retain(|e| now < e.3 + TTL);
        }

        fn position(&self, o: usize, k: usize) -> Option<usize> {
            self.entries.iter().position(|e| (e.0, e.1) == (o, k))
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn behaves_like_the_model(capacity in 0..5usize, ops in proptest::collection::vec(op(), 1..80)) {
            let cache = KekCache::new(capacity, TTL);
            let mut model = Model { capacity, entries: Vec::new(), hits: 0, misses: 0 };
            let mut now = Instant::now();
            for (n, op) in ops.into_iter().enumerate() {
                let stamp = n as u64;
                model.expire(now);
                match op {
                    Op::Get(o, k) => {
                        let got = cache.get_at(&org(o), &kek(k), now).map(|key| value(&key));
                        let want = model.position(o, k).map(|i| model.entries[i].2);
                        if want.is_some() { model.hits += 1 } else { model.misses += 1 }
                        prop_assert_eq!(got, want);
                    }
                    Op::Insert(o, k) => {
                        let handed = cache.insert_at(org(o), kek(k), key(stamp), now);
                        prop_assert_eq!(value(&handed), stamp);
                        if model.capacity > 0 {
                            if let Some(i) = model.position(o, k) {
                                model.entries.remove(i);
                            }
                            if model.entries.len() == model.capacity {
                                model.entries.remove(0);
                            }
                            model.entries.push((o, k, stamp, now));
                        }
                    }
                    Op::InvalidateOrg(o) => {
                        let before = model.entries.len();
                        model.entries.retain(|e| e.0 != o);
                        prop_assert_eq!(cache.invalidate_org(&org(o)), before - model.entries.len());
                    }
                    Op::Invalidate(o, k) => {
                        let want = model.position(o, k).map(|i| model.entries.remove(i)).is_some();
                        prop_assert_eq!(cache.invalidate(&org(o), &kek(k)), want);
                    }
                    Op::Advance(ms) => now += Duration::from_millis(ms),
                }
                model.expire(now);
                prop_assert_eq!(
                    cache.stats_at(now),
                    CacheStats { hits: model.hits, misses: model.misses, entries: model.entries.len() }
                );
                prop_assert!(cache.lock().order.len() <= 2 * capacity);
            }
        }
    }
}
