//! Every [`Store`](crate::Store) operation of more than one statement,
//! written once: the order of its statements, when it refuses, what it
//! returns. `sql_store.rs` provides the statements, as a [`Tx`], and chooses
//! the transaction — and so the locking — each operation runs in; the
//! operations here rely on that transaction keeping every other writer of
//! the org out between their first statement and their commit.

use cmk_control_plane_domain::{
    KeyId, KeyState, OrgId, ResourceId, Timestamp, audit::ChainedEvent,
};

use crate::{
    Commit, Corruption, GenericKey, Intent, IntentKind, NewAuditEvent, Rewrap, RotationChange,
    RotationJob, StoreError, StoredKek, StoredKey, StoredOrg, sql,
};

/// Whether a read of the generic key locks its row until the commit.
#[derive(Clone, Copy, Debug)]
pub enum Lock {
    /// No lock.
    None,
    /// Keeps a renewal (which locks the row for update) waiting until the
    /// reader commits.
    Share,
    /// Keeps every other writer of the row waiting until the reader commits.
    ForUpdate,
}

/// The statements of one transaction of a SQL backend. Each is one SQL
/// statement, or a few that do one thing (a multi-row write split into
/// chunks); none commits. Counters are the database's signed integers,
/// converted once here.
#[async_trait::async_trait]
pub(crate) trait Tx: Send + Sized {
    /// Commits the transaction. Dropping it instead rolls it back.
    async fn commit(self) -> Result<(), StoreError>;

    /// The org's BYOK flag and version.
    async fn org(&mut self, org: &OrgId) -> Result<Option<(bool, u64)>, StoreError>;
    /// Creates the org at version 1; `false` if it exists.
    async fn create_org(&mut self, org: &OrgId, byok: bool) -> Result<bool, StoreError>;
    /// Moves the org from version `expected` to `next`; `false` if it is not
    /// at `expected` (or does not exist).
    async fn advance_version(
        &mut self,
        org: &OrgId,
        expected: i64,
        next: i64,
        byok: bool,
    ) -> Result<bool, StoreError>;
    /// The org's version.
    async fn version(&mut self, org: &OrgId) -> Result<Option<i64>, StoreError>;

    /// The org's keys in the order they were added.
    async fn keys(&mut self, org: &OrgId) -> Result<Vec<StoredKey>, StoreError>;
    /// Inserts the key at the end of the org's order, or updates it in place.
    async fn upsert_key(&mut self, org: &OrgId, key: &StoredKey) -> Result<(), StoreError>;
    /// Whether an org other than `org` holds a key with AWS key ARN `arn`
    /// that is not removed (or removed but still needed); locks the ARN
    /// against other registrations until the transaction ends.
    async fn key_arn_taken(&mut self, org: &OrgId, arn: &str) -> Result<bool, StoreError>;

    /// The org's newest audit event.
    async fn audit_head(&mut self, org: &OrgId) -> Result<Option<ChainedEvent>, StoreError>;
    /// Inserts chained events, in order.
    async fn insert_audit(&mut self, events: &[ChainedEvent]) -> Result<(), StoreError>;

    /// Records an intent; a handle that already has one is refused by the
    /// unique constraint, because two calls under one handle would confuse
    /// the repair.
    async fn insert_intent(&mut self, intent: &Intent) -> Result<(), StoreError>;
    /// Resolves the open `Import` intents of `handles`, returning how many
    /// there were. One that repair claimed meanwhile (now a `Destroy`), or
    /// resolved, is not counted: its material is destroyed or being
    /// destroyed.
    async fn resolve_import_intents(&mut self, handles: &[String]) -> Result<u64, StoreError>;

    /// The org's newest rotation job, without its `from` keys.
    async fn latest_job(&mut self, org: &OrgId) -> Result<Option<RotationJob>, StoreError>;
    /// The keys a job rotates away from, in order.
    async fn job_from(&mut self, org: &OrgId, job: i64) -> Result<Vec<KeyId>, StoreError>;
    /// Every running job by org id, without its `from` keys.
    async fn running_jobs(&mut self) -> Result<Vec<RotationJob>, StoreError>;
    /// The `from` keys of every running job: (org, job, key), each job's in
    /// order.
    async fn running_jobs_from(&mut self) -> Result<Vec<(String, u64, KeyId)>, StoreError>;
    /// Marks the org's running job, if any, superseded at `at`.
    async fn supersede_running_job(&mut self, org: &OrgId, at: Timestamp)
    -> Result<(), StoreError>;
    /// Inserts the org's next job, running, and returns its number.
    async fn insert_job(
        &mut self,
        org: &OrgId,
        target: &KeyId,
        total: i64,
        at: Timestamp,
    ) -> Result<i64, StoreError>;
    /// Stores a job's `from` keys, in order.
    async fn insert_job_from(
        &mut self,
        org: &OrgId,
        job: i64,
        from: &[KeyId],
    ) -> Result<(), StoreError>;
    /// Marks the org's job finished at `at`; `false` unless it was running.
    async fn finish_job(
        &mut self,
        org: &OrgId,
        job: i64,
        at: Timestamp,
    ) -> Result<bool, StoreError>;
    /// Whether the org's job is running.
    async fn job_running(&mut self, org: &OrgId, job: i64) -> Result<bool, StoreError>;
    /// Adds `n` to the job's count of re-wrapped KEKs.
    async fn add_done(&mut self, org: &OrgId, job: i64, n: i64) -> Result<(), StoreError>;

    /// The org's KEK for `resource`.
    async fn kek_for_resource(
        &mut self,
        org: &OrgId,
        resource: &ResourceId,
    ) -> Result<Option<StoredKek>, StoreError>;
    /// Inserts KEKs of the org, without counting them; an id or a resource
    /// already stored fails the statement.
    async fn insert_keks(&mut self, org: &OrgId, keks: &[StoredKek]) -> Result<(), StoreError>;
    /// Writes the re-wraps of one (from, to) pair whose KEKs are still wrapped
    /// by `from`; returns how many it wrote.
    async fn rewrite_keks(
        &mut self,
        org: &OrgId,
        from: &KeyId,
        to: &KeyId,
        rewraps: &[&Rewrap],
    ) -> Result<u64, StoreError>;
    /// Whether any of `keys` wraps at least one KEK of the org, by their counts.
    async fn wraps_any_kek(&mut self, org: &OrgId, keys: &[KeyId]) -> Result<bool, StoreError>;
    /// How many KEKs of the org are not wrapped by `target`, by the counts.
    async fn keks_not_wrapped_by(&mut self, org: &OrgId, target: &KeyId)
    -> Result<i64, StoreError>;
    /// Counts `n` more KEKs wrapped by `key`.
    async fn add_to_count(&mut self, org: &OrgId, key: &KeyId, n: i64) -> Result<(), StoreError>;
    /// Counts `n` fewer KEKs wrapped by `key`; `false` if it has no count.
    async fn remove_from_count(
        &mut self,
        org: &OrgId,
        key: &KeyId,
        n: i64,
    ) -> Result<bool, StoreError>;

    /// The generic default key.
    async fn generic_key(&mut self, lock: Lock) -> Result<Option<GenericKey>, StoreError>;
    /// Stores the generic default key unless one is stored.
    async fn insert_generic_key_if_absent(&mut self, key: &GenericKey) -> Result<(), StoreError>;
    /// Replaces the stored generic default key.
    async fn replace_generic_key(&mut self, key: &GenericKey) -> Result<(), StoreError>;
    /// Adds a key to the retired generic default keys.
    async fn retire_generic_key(&mut self, key: &GenericKey) -> Result<(), StoreError>;
    /// Removes a retired generic default key; `false` if it was not there.
    async fn delete_retired_generic_key(&mut self, handle: &str) -> Result<bool, StoreError>;
    /// Whether the handle is the generic default key's, or a key record of
    /// any org in a state other than removed uses it.
    async fn handle_in_use(&mut self, handle: &str) -> Result<bool, StoreError>;
}

/// [`OrgStore::load_org`](crate::OrgStore::load_org): the org row and its keys
/// from one snapshot.
pub(crate) async fn load_org(
    mut tx: impl Tx,
    org: &OrgId,
) -> Result<Option<StoredOrg>, StoreError> {
    let Some((byok, version)) = tx.org(org).await? else {
        return Ok(None);
    };
    let keys = tx.keys(org).await?;
    tx.commit().await?;
    Ok(Some(StoredOrg {
        org: org.clone(),
        byok,
        version,
        keys,
    }))
}

/// [`OrgStore::commit`](crate::OrgStore::commit).
pub(crate) async fn commit(mut tx: impl Tx, commit: Commit) -> Result<u64, StoreError> {
    let Commit {
        org,
        expected_version,
        byok,
        keys,
        audit,
        add_intents,
        resolve_intents,
        rotation,
        require_unreferenced,
        uses_generic,
    } = commit;
    let version = match expected_version {
        None => {
            if !tx.create_org(&org, byok).await? {
                return Err(StoreError::Conflict(org));
            }
            1
        }
        Some(expected) => {
            // A version whose successor the database cannot hold was never
            // read from it.
            let Some(next) = expected
                .checked_add(1)
                .filter(|&v| i64::try_from(v).is_ok())
            else {
                return Err(StoreError::Conflict(org));
            };
            if !tx
                .advance_version(&org, sql::sql_int(expected)?, sql::sql_int(next)?, byok)
                .await?
            {
                return Err(StoreError::Conflict(org));
            }
            next
        }
    };
    // Locked against a renewal, so that a drop of the retired key (which
    // follows the renewal) sees this org's record of it.
    if let Some(handle) = &uses_generic {
        let current = tx.generic_key(Lock::Share).await?;
        if current.is_none_or(|k| &k.handle != handle) {
            return Err(StoreError::GenericKeyChanged);
        }
    }
    // With the org's other writers kept out, no re-wrap or new KEK can add
    // a reference after this.
    if tx.wraps_any_kek(&org, &require_unreferenced).await? {
        return Err(StoreError::Conflict(org));
    }
    // An AWS key serves one org: another org's use of it would make the
    // service encrypt and decrypt for that org under this org's key.
    for key in &keys {
        if let Some(aws) = &key.aws
            && key.record.state != KeyState::Removed
            && tx.key_arn_taken(&org, &aws.key_arn).await?
        {
            return Err(StoreError::KeyArnTaken);
        }
    }
    for key in &keys {
        tx.upsert_key(&org, key).await?;
    }
    append_chained(&mut tx, &org, audit).await?;
    for intent in &add_intents {
        tx.insert_intent(intent).await?;
    }
    // Material whose intent repair claimed is destroyed: a key committed
    // under it would be lost.
    if tx.resolve_import_intents(&resolve_intents).await? != resolve_intents.len() as u64 {
        return Err(StoreError::IntentLost);
    }
    match rotation {
        None => {}
        Some(RotationChange::Start { target, from, at }) => {
            start_rotation(&mut tx, &org, &target, &from, at).await?;
        }
        Some(RotationChange::Finish { job, at }) => {
            // A job number the database cannot hold was never stored, so is
            // not running.
            let finished = match i64::try_from(job) {
                Ok(job) => tx.finish_job(&org, job, at).await?,
                Err(_) => false,
            };
            if !finished {
                return Err(StoreError::Conflict(org));
            }
        }
    }
    tx.commit().await?;
    Ok(version)
}

/// [`AuditStore::append_audit`](crate::AuditStore::append_audit).
pub(crate) async fn append_audit(
    mut tx: impl Tx,
    org: &OrgId,
    events: Vec<NewAuditEvent>,
) -> Result<(), StoreError> {
    append_chained(&mut tx, org, events).await?;
    tx.commit().await
}

/// [`GenericKeyStore::put_generic_key`](crate::GenericKeyStore::put_generic_key).
pub(crate) async fn put_generic_key(
    mut tx: impl Tx,
    key: GenericKey,
) -> Result<GenericKey, StoreError> {
    let claimed = tx
        .resolve_import_intents(std::slice::from_ref(&key.handle))
        .await?
        == 1;
    let before = tx.generic_key(Lock::ForUpdate).await?;
    if before.is_none() && !claimed {
        // Repair claimed the material as abandoned and destroys it.
        return Err(StoreError::IntentLost);
    }
    tx.insert_generic_key_if_absent(&key).await?;
    // Just inserted if there was none.
    let stored = tx.generic_key(Lock::None).await?.ok_or_else(|| {
        StoreError::Corrupt(Corruption::MissingRow {
            table: "generic_key",
            what: "the generic default key just stored",
        })
    })?;
    // Another writer's key is stored: this one's intent stays open (the
    // transaction is dropped, undoing the resolve), so repair destroys the
    // unused material. A retry of a put whose reply was lost finds its own
    // key, its intent already resolved.
    if stored.handle != key.handle {
        return Ok(stored);
    }
    tx.commit().await?;
    Ok(stored)
}

/// [`GenericKeyStore::renew_generic_key`](crate::GenericKeyStore::renew_generic_key).
pub(crate) async fn renew_generic_key(
    mut tx: impl Tx,
    old_handle: &str,
    new: GenericKey,
) -> Result<GenericKey, StoreError> {
    // Locked, so that of two racing renewals the second reads the key the
    // first stored and loses.
    let Some(mut stored) = tx.generic_key(Lock::ForUpdate).await? else {
        // The store never deletes the generic key, and the caller read
        // `old_handle` from it.
        return Err(StoreError::Corrupt(Corruption::MissingRow {
            table: "generic_key",
            what: "the generic default key being renewed",
        }));
    };
    // Renewing a key to itself would retire the key in use, and a later
    // drop would destroy it.
    if stored.handle == old_handle && new.handle != old_handle {
        // As in `put_generic_key`: material repair claimed is being destroyed.
        if tx
            .resolve_import_intents(std::slice::from_ref(&new.handle))
            .await?
            != 1
        {
            return Err(StoreError::IntentLost);
        }
        tx.retire_generic_key(&stored).await?;
        tx.replace_generic_key(&new).await?;
        stored = new.clone();
    }
    // A retry after a lost reply finds its own key stored, its intent
    // resolved; a loser's intent stays open so that repair destroys the
    // unused material.
    tx.commit().await?;
    Ok(stored)
}

/// [`GenericKeyStore::drop_retired_generic_key`](crate::GenericKeyStore::drop_retired_generic_key).
pub(crate) async fn drop_retired_generic_key(
    mut tx: impl Tx,
    handle: &str,
    now: Timestamp,
) -> Result<bool, StoreError> {
    // The current generic key is checked too: destroying it would break
    // every org without BYOK, whatever the retired list says.
    if tx.handle_in_use(handle).await? {
        return Ok(false);
    }
    // Of two racing drops, the second finds no row.
    if !tx.delete_retired_generic_key(handle).await? {
        return Ok(false);
    }
    tx.insert_intent(&Intent {
        handle: handle.to_owned(),
        kind: IntentKind::Destroy,
        org: None,
        created_at: now,
    })
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// [`KekStore::insert_kek`](crate::KekStore::insert_kek).
pub(crate) async fn insert_kek(
    mut tx: impl Tx,
    org: &OrgId,
    org_version: u64,
    kek: StoredKek,
    audit: Vec<NewAuditEvent>,
) -> Result<StoredKek, StoreError> {
    // The resource's KEK first: a retry whose reply was lost, or a caller
    // that raced another for the same resource, gets the stored KEK even if
    // the org has changed since; nothing is written in that case, so the
    // version does not matter.
    if let Some(existing) = tx.kek_for_resource(org, &kek.resource).await? {
        return Ok(existing);
    }
    check_version(&mut tx, org, org_version).await?;
    insert_counted_keks(&mut tx, org, std::slice::from_ref(&kek)).await?;
    append_chained(&mut tx, org, audit).await?;
    tx.commit().await?;
    Ok(kek)
}

/// The backends' `insert_keks_unchecked`: KEKs and their counts, nothing else.
pub(crate) async fn insert_keks_unchecked(
    mut tx: impl Tx,
    org: &OrgId,
    keks: &[StoredKek],
) -> Result<(), StoreError> {
    insert_counted_keks(&mut tx, org, keks).await?;
    tx.commit().await
}

/// [`KekStore::rewrap_keks`](crate::KekStore::rewrap_keks).
pub(crate) async fn rewrap_keks(
    mut tx: impl Tx,
    org: &OrgId,
    org_version: u64,
    job: u64,
    rewraps: &[Rewrap],
) -> Result<u64, StoreError> {
    check_version(&mut tx, org, org_version).await?;
    // A job number the database cannot hold was never stored, so is not
    // running.
    let Ok(job) = i64::try_from(job) else {
        return Err(StoreError::Conflict(org.clone()));
    };
    if !tx.job_running(org, job).await? {
        return Err(StoreError::Conflict(org.clone()));
    }
    let mut written = 0;
    // Each (from, to) pair's count of written rows is exactly what moves
    // from one key's count to the other's.
    for ((from, to), group) in sql::group_by_pair(rewraps) {
        let moved = tx.rewrite_keks(org, from, to, &group).await?;
        if moved > 0 && from != to {
            let n = sql::sql_int(moved)?;
            // A count that would go below zero, or is missing, disagrees with
            // the KEKs: the CHECK on the table, or the test here, aborts the
            // write rather than let a key look unused while KEKs need it.
            if !tx.remove_from_count(org, from, n).await? {
                return Err(StoreError::Corrupt(Corruption::KekCountMissing {
                    org: org.clone(),
                    key: from.clone(),
                }));
            }
            tx.add_to_count(org, to, n).await?;
        }
        written += moved;
    }
    tx.add_done(org, job, sql::sql_int(written)?).await?;
    tx.commit().await?;
    Ok(written)
}

/// [`KekStore::latest_rotation`](crate::KekStore::latest_rotation): the job and
/// its keys from one snapshot.
pub(crate) async fn latest_rotation(
    mut tx: impl Tx,
    org: &OrgId,
) -> Result<Option<RotationJob>, StoreError> {
    let Some(mut job) = tx.latest_job(org).await? else {
        return Ok(None);
    };
    job.from = tx.job_from(org, sql::sql_int(job.id)?).await?;
    tx.commit().await?;
    Ok(Some(job))
}

/// [`KekStore::running_rotations`](crate::KekStore::running_rotations): the jobs
/// and their keys from one snapshot.
pub(crate) async fn running_rotations(mut tx: impl Tx) -> Result<Vec<RotationJob>, StoreError> {
    let mut jobs = tx.running_jobs().await?;
    let from = tx.running_jobs_from().await?;
    tx.commit().await?;
    sql::attach_from_keys(&mut jobs, from);
    Ok(jobs)
}

/// Chains `events` after the org's newest stored event. The transaction
/// keeps other writers of the org out, so nothing can be appended between
/// reading the head and inserting after it.
async fn append_chained(
    tx: &mut impl Tx,
    org: &OrgId,
    events: Vec<NewAuditEvent>,
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let head = tx.audit_head(org).await?;
    tx.insert_audit(&sql::chain_after(org, head, events)?).await
}

/// Fails with [`StoreError::Conflict`] unless the org is at `version`.
async fn check_version(tx: &mut impl Tx, org: &OrgId, version: u64) -> Result<(), StoreError> {
    let stored = tx.version(org).await?;
    // A version the database cannot hold was never read from it.
    if stored.is_none() || stored != i64::try_from(version).ok() {
        return Err(StoreError::Conflict(org.clone()));
    }
    Ok(())
}

/// Supersedes the org's running job, if any, and starts the next one, its
/// total counted now: no KEK can be added or re-wrapped between the count
/// and the commit.
async fn start_rotation(
    tx: &mut impl Tx,
    org: &OrgId,
    target: &KeyId,
    from: &[KeyId],
    at: Timestamp,
) -> Result<(), StoreError> {
    let total = tx.keks_not_wrapped_by(org, target).await?;
    tx.supersede_running_job(org, at).await?;
    let job = tx.insert_job(org, target, total, at).await?;
    tx.insert_job_from(org, job, from).await
}

/// Inserts KEKs of the org and counts them in `kek_counts`.
async fn insert_counted_keks(
    tx: &mut impl Tx,
    org: &OrgId,
    keks: &[StoredKek],
) -> Result<(), StoreError> {
    tx.insert_keks(org, keks).await?;
    for (key, n) in sql::count_by_key(keks) {
        tx.add_to_count(org, key, sql::sql_int(n)?).await?;
    }
    Ok(())
}

/// `duration` in whole milliseconds, as a lease's SQL arithmetic takes it,
/// capped at 2^52 (over 100 000 years) so that adding it to the clock cannot
/// overflow.
pub(crate) fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).map_or(1 << 52, |ms| ms.min(1 << 52))
}
