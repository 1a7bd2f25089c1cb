//! [`Store`] on one SQLite database file.
//!
//! # Durability and concurrency
//!
//! The file is opened in WAL mode with `synchronous = FULL`: once a commit
//! returns, it survives a crash or a power loss, and readers never wait for the
//! writer. Every write runs in a `BEGIN IMMEDIATE` transaction, which takes the
//! write lock before reading anything: concurrent writers queue on the busy
//! timeout, and the second one then reads the first one's result (and so sees
//! the version conflict), instead of both reading under a shared lock and one
//! failing with `SQLITE_BUSY` when it tries to upgrade. A read of several
//! statements runs in one transaction so that it sees one snapshot.
//!
//! # Rotating many KEKs
//!
//! A rotation reads an org's KEKs a page at a time and rewrites each page in
//! one transaction, for up to millions of KEKs, so those paths are shaped by
//! measurement (see `0002_keks_and_rotations.sql` for the schema side):
//! re-wraps and seeded KEKs are written by multi-row statements, since a
//! statement costs a round trip to sqlx's connection thread that exceeded
//! SQLite's own work on a row; and the KEKs each key wraps are counted in a
//! table kept in step by those same transactions, rather than by an index
//! that every re-wrap would have to update.
//!
//! # Errors
//!
//! A value that does not decode — an unknown enumeration, a negative version,
//! a hash of the wrong length, a malformed database file — is
//! [`StoreError::Corrupt`]. Everything else the database reports (the file
//! cannot be opened, the lock was not granted within the busy timeout, the
//! pool has no free connection, a constraint refused the write) is
//! [`StoreError::Unavailable`] with the sqlx error as its source.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    str::FromStr,
    time::Duration,
};

use cmk_control_plane_domain::{
    KekId, KeyId, KeyRecord, KeyState, OrgId, Timestamp,
    audit::{self, AuditEvent, ChainedEvent},
};
use sqlx::{
    Decode, Row, Sqlite, SqliteConnection, Transaction, Type,
    error::DatabaseError,
    migrate::{MigrateError, Migrator},
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
        SqliteSynchronous,
    },
};

use crate::{
    Commit, GenericKey, Intent, IntentKind, JobState, NewAuditEvent, Rewrap, RotationChange,
    RotationJob, Store, StoreError, StoredKek, StoredKey, StoredOrg, codec,
};

/// How long a statement waits for another connection's lock before giving up
/// with `SQLITE_BUSY` (reported as [`StoreError::Unavailable`]).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a call waits for a free connection of the pool before the store
/// reports itself unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// SQLite has one writer at a time; a few connections let reads proceed
/// alongside it.
const MAX_CONNECTIONS: u32 = 4;

/// Rows sqlx's connection thread may read ahead of the caller (its default is
/// 50). A page of KEKs of a rotation (about 1000) then crosses between the
/// threads without the reader stopping to wait for the caller every 50 rows,
/// which measurably slowed reading pages.
const ROW_BUFFER: usize = 1024;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The metadata store on a SQLite database file. Cloning shares the
/// connection pool.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens the database at `url_or_path` — a `sqlite:` URL such as
    /// `sqlite:///var/lib/cmk/metadata.db`, or a plain file path — creating the
    /// file if it is missing and bringing its schema up to date.
    ///
    /// The journal mode, synchronous level, foreign keys, busy timeout and
    /// locking are always this store's own: a URL's `immutable=1`, which would
    /// turn off locking, is overridden.
    pub async fn open(url_or_path: &str) -> Result<Self, StoreError> {
        let options = if url_or_path.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url_or_path).map_err(db)?
        } else {
            // Not parsed as a URL, so a path may contain `?` or `%`.
            SqliteConnectOptions::new().filename(url_or_path)
        };
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            .immutable(false)
            .row_buffer_size(ROW_BUFFER);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(db)?;
        MIGRATOR.run(&pool).await.map_err(migrate)?;
        Ok(Self { pool })
    }

    /// Waits for calls in progress, then closes every connection, which
    /// checkpoints the write-ahead log into the database file. Calls made after
    /// this fail with [`StoreError::Unavailable`].
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Stores many KEKs of the org in one transaction, for seeding a database
    /// in tests and benchmarks: unlike [`Store::insert_kek`] there is no
    /// version check and no return of an existing KEK — a resource or id that
    /// is already stored fails the whole call — and nothing checks that each
    /// KEK's key is one of the org's. The org must exist.
    pub async fn insert_keks_unchecked(
        &self,
        org: &OrgId,
        keks: Vec<StoredKek>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        insert_kek_rows(&mut tx, org, keks).await?;
        tx.commit().await.map_err(db)
    }

    /// A write transaction holding the database's write lock from its start.
    /// Dropping it without committing rolls it back, so an early `?` return
    /// writes nothing.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(db)
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn load_org(&self, org: &OrgId) -> Result<Option<StoredOrg>, StoreError> {
        // One snapshot for the org row and its keys.
        let mut tx = self.pool.begin().await.map_err(db)?;
        let Some(row) = sqlx::query("SELECT byok, version FROM orgs WHERE org = ?1")
            .bind(org.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?
        else {
            return Ok(None);
        };
        let cells = Cells::new(&row, "orgs");
        let byok = cells.get("byok")?;
        let version = cells.unsigned("version")?;
        let keys = sqlx::query(
            "SELECT key_id, handle, source, state, check_value, created_at, activated_at, \
                    revoked_at, expires_at, needed, before_provider_revocation \
             FROM keys WHERE org = ?1 ORDER BY position",
        )
        .bind(org.as_str())
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?
        .iter()
        .map(decode_key)
        .collect::<Result<_, _>>()?;
        tx.commit().await.map_err(db)?;
        Ok(Some(StoredOrg {
            org: org.clone(),
            byok,
            version,
            keys,
        }))
    }

    async fn commit(&self, commit: Commit) -> Result<u64, StoreError> {
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
        } = commit;
        let mut tx = self.begin_write().await?;
        let version = match expected_version {
            None => {
                let created = sqlx::query(
                    "INSERT INTO orgs (org, byok, version) VALUES (?1, ?2, 1) \
                     ON CONFLICT (org) DO NOTHING",
                )
                .bind(org.as_str())
                .bind(byok)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                if created.rows_affected() == 0 {
                    return Err(StoreError::Conflict(org));
                }
                1
            }
            Some(expected) => {
                // A version whose successor SQLite cannot hold was never read
                // from it.
                let Some(next) = expected
                    .checked_add(1)
                    .filter(|&v| i64::try_from(v).is_ok())
                else {
                    return Err(StoreError::Conflict(org));
                };
                let updated = sqlx::query(
                    "UPDATE orgs SET version = ?1, byok = ?2 WHERE org = ?3 AND version = ?4",
                )
                .bind(sql_int(next)?)
                .bind(byok)
                .bind(org.as_str())
                .bind(sql_int(expected)?)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                if updated.rows_affected() == 0 {
                    return Err(StoreError::Conflict(org));
                }
                next
            }
        };
        // Holding the write lock, no re-wrap can add a reference after this.
        for key in &require_unreferenced {
            if wraps_any_kek(&mut tx, &org, key).await? {
                return Err(StoreError::Conflict(org));
            }
        }
        for key in &keys {
            upsert_key(&mut tx, &org, key).await?;
        }
        append_chained(&mut tx, &org, audit).await?;
        for intent in &add_intents {
            insert_intent(&mut tx, intent).await?;
        }
        for handle in &resolve_intents {
            delete_intent(&mut tx, handle).await?;
        }
        match rotation {
            None => {}
            Some(RotationChange::Start { target, from, at }) => {
                start_rotation(&mut tx, &org, &target, &from, at).await?;
            }
            Some(RotationChange::Finish { job, at }) => {
                finish_rotation(&mut tx, &org, job, at).await?;
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(version)
    }

    async fn append_audit(
        &self,
        org: &OrgId,
        events: Vec<NewAuditEvent>,
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        append_chained(&mut tx, org, events).await?;
        tx.commit().await.map_err(db)
    }

    async fn audit_events(
        &self,
        org: &OrgId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<ChainedEvent>, StoreError> {
        // No stored seq exceeds i64::MAX, so nothing follows a larger one.
        let Ok(after_seq) = i64::try_from(after_seq) else {
            return Ok(Vec::new());
        };
        sqlx::query(
            "SELECT org, seq, time, actor, key, action, result, prev_hash, hash \
             FROM audit WHERE org = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )
        .bind(org.as_str())
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(decode_audit)
        .collect()
    }

    async fn audited_orgs(&self) -> Result<Vec<OrgId>, StoreError> {
        sqlx::query("SELECT DISTINCT org FROM audit ORDER BY org")
            .fetch_all(&self.pool)
            .await
            .map_err(db)?
            .iter()
            .map(|row| Cells::new(row, "audit").org("org"))
            .collect()
    }

    async fn record_intent(&self, intent: Intent) -> Result<(), StoreError> {
        insert_intent(&mut *self.pool.acquire().await.map_err(db)?, &intent).await
    }

    async fn resolve_intent(&self, handle: &str) -> Result<(), StoreError> {
        delete_intent(&mut *self.pool.acquire().await.map_err(db)?, handle).await
    }

    async fn open_intents(&self) -> Result<Vec<Intent>, StoreError> {
        sqlx::query("SELECT handle, kind, org, created_at FROM intents ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await
            .map_err(db)?
            .iter()
            .map(decode_intent)
            .collect()
    }

    async fn generic_key(&self) -> Result<Option<GenericKey>, StoreError> {
        read_generic_key(&mut *self.pool.acquire().await.map_err(db)?).await
    }

    async fn put_generic_key(&self, key: GenericKey) -> Result<GenericKey, StoreError> {
        let GenericKey {
            handle,
            check_value,
            created_at,
        } = key;
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO generic_key (id, handle, check_value, created_at) VALUES (1, ?1, ?2, ?3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&handle)
        .bind(&check_value)
        .bind(created_at.0)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        // Just inserted if there was none.
        let stored = read_generic_key(&mut tx).await?.ok_or_else(|| {
            StoreError::Corrupt("generic_key: the stored key vanished within a transaction".into())
        })?;
        // Comparing handles rather than asking whether the insert happened also
        // covers a retry of a put whose reply was lost: the stored key's intent
        // must never stay open, or repair would destroy every org's default key.
        if stored.handle == handle {
            delete_intent(&mut tx, &handle).await?;
        }
        tx.commit().await.map_err(db)?;
        Ok(stored)
    }

    async fn orgs_with_expired_keys(&self, now: Timestamp) -> Result<Vec<OrgId>, StoreError> {
        sqlx::query(
            "SELECT DISTINCT org FROM keys \
             WHERE state IN (?1, ?2) AND expires_at <= ?3 ORDER BY org",
        )
        .bind(codec::key_state(KeyState::Deactivated))
        .bind(codec::key_state(KeyState::Deleted))
        .bind(now.0)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(|row| Cells::new(row, "keys").org("org"))
        .collect()
    }

    async fn renew_generic_key(
        &self,
        old_handle: &str,
        new: GenericKey,
    ) -> Result<GenericKey, StoreError> {
        let mut tx = self.begin_write().await?;
        let Some(mut stored) = read_generic_key(&mut tx).await? else {
            // The store never deletes the generic key, and the caller read
            // `old_handle` from it.
            return Err(StoreError::Corrupt(
                "generic_key: no generic default key is stored to renew".into(),
            ));
        };
        // Renewing a key to itself would retire the key in use, and a later
        // drop would destroy it.
        if stored.handle == old_handle && new.handle != old_handle {
            sqlx::query(
                "INSERT INTO retired_generic_keys (handle, check_value, created_at) \
                 VALUES (?1, ?2, ?3)",
            )
            .bind(&stored.handle)
            .bind(&stored.check_value)
            .bind(stored.created_at.0)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            sqlx::query(
                "UPDATE generic_key SET handle = ?1, check_value = ?2, created_at = ?3 \
                 WHERE id = 1",
            )
            .bind(&new.handle)
            .bind(&new.check_value)
            .bind(new.created_at.0)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            stored = new.clone();
        }
        // As in `put_generic_key`: a retry after a lost reply finds its own key
        // stored and must resolve its intent; a loser's intent stays open so
        // that repair destroys the unused material.
        if stored.handle == new.handle {
            delete_intent(&mut tx, &new.handle).await?;
        }
        tx.commit().await.map_err(db)?;
        Ok(stored)
    }

    async fn retired_generic_keys(&self) -> Result<Vec<GenericKey>, StoreError> {
        sqlx::query(
            "SELECT handle, check_value, created_at FROM retired_generic_keys \
             ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(|row| decode_generic_key(row, "retired_generic_keys"))
        .collect()
    }

    async fn drop_retired_generic_key(
        &self,
        handle: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        // The current generic key is checked too: destroying it would break
        // every org without BYOK, whatever the retired list says.
        let in_use: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM keys WHERE handle = ?1 AND state <> ?2) \
                 OR EXISTS (SELECT 1 FROM generic_key WHERE handle = ?1)",
        )
        .bind(handle)
        .bind(codec::key_state(KeyState::Removed))
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        if in_use {
            return Ok(false);
        }
        let dropped = sqlx::query("DELETE FROM retired_generic_keys WHERE handle = ?1")
            .bind(handle)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        if dropped.rows_affected() == 0 {
            return Ok(false);
        }
        insert_intent(
            &mut tx,
            &Intent {
                handle: handle.to_owned(),
                kind: IntentKind::Destroy,
                org: None,
                created_at: now,
            },
        )
        .await?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn orgs_using_handle(&self, handle: &str) -> Result<Vec<OrgId>, StoreError> {
        sqlx::query("SELECT DISTINCT org FROM keys WHERE handle = ?1 AND state <> ?2 ORDER BY org")
            .bind(handle)
            .bind(codec::key_state(KeyState::Removed))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?
            .iter()
            .map(|row| Cells::new(row, "keys").org("org"))
            .collect()
    }

    async fn insert_kek(
        &self,
        org: &OrgId,
        org_version: u64,
        kek: StoredKek,
        audit: Vec<NewAuditEvent>,
    ) -> Result<StoredKek, StoreError> {
        let mut tx = self.begin_write().await?;
        // The resource's KEK first: a retry whose reply was lost, or a caller
        // that raced another for the same resource, gets the stored KEK even
        // if the org has changed since; nothing is written in that case, so
        // the version does not matter.
        let existing = sqlx::query(
            "SELECT kek_id, resource, key_id, wrapped, created_at FROM keks \
             WHERE org = ?1 AND resource = ?2",
        )
        .bind(org.as_str())
        .bind(kek.resource.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        if let Some(row) = existing {
            return decode_kek(&row);
        }
        check_version(&mut tx, org, org_version).await?;
        insert_kek_rows(&mut tx, org, vec![kek.clone()]).await?;
        if !audit.is_empty() {
            append_chained(&mut tx, org, audit).await?;
        }
        tx.commit().await.map_err(db)?;
        Ok(kek)
    }

    async fn kek(&self, org: &OrgId, id: &KekId) -> Result<Option<StoredKek>, StoreError> {
        sqlx::query(
            "SELECT kek_id, resource, key_id, wrapped, created_at FROM keks \
             WHERE org = ?1 AND kek_id = ?2",
        )
        .bind(org.as_str())
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?
        .as_ref()
        .map(decode_kek)
        .transpose()
    }

    async fn kek_counts(&self, org: &OrgId) -> Result<Vec<(KeyId, u64)>, StoreError> {
        sqlx::query(
            "SELECT key_id, keks FROM kek_counts WHERE org = ?1 AND keks > 0 ORDER BY key_id",
        )
        .bind(org.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(|row| {
            let cells = Cells::new(row, "kek_counts");
            Ok((KeyId(cells.get("key_id")?), cells.unsigned("keks")?))
        })
        .collect()
    }

    async fn keks_not_wrapped_by(
        &self,
        org: &OrgId,
        target: &KeyId,
        after: Option<&KekId>,
        limit: u32,
    ) -> Result<Vec<StoredKek>, StoreError> {
        // Every KEK id is longer than the empty string, so "" starts at the
        // beginning; a plain bound (rather than `?3 IS NULL OR ...`) lets the
        // range start in the primary key instead of scanning the org from
        // its first KEK on every page.
        sqlx::query(
            "SELECT kek_id, resource, key_id, wrapped, created_at FROM keks \
             WHERE org = ?1 AND kek_id > ?2 AND key_id <> ?3 \
             ORDER BY kek_id LIMIT ?4",
        )
        .bind(org.as_str())
        .bind(after.map_or("", KekId::as_str))
        .bind(target.0.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(decode_kek)
        .collect()
    }

    async fn rewrap_keks(
        &self,
        org: &OrgId,
        org_version: u64,
        job: u64,
        rewraps: Vec<Rewrap>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        check_version(&mut tx, org, org_version).await?;
        let running: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM rotation_jobs WHERE org = ?1 AND job = ?2 AND state = ?3)",
        )
        .bind(org.as_str())
        // A job number SQLite cannot hold was never stored, so is not running.
        .bind(i64::try_from(job).unwrap_or(-1))
        .bind(codec::job_state(JobState::Running))
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        if !running {
            return Err(StoreError::Conflict(org.clone()));
        }
        let written = rewrite_keks(&mut tx, org, &rewraps).await?;
        sqlx::query("UPDATE rotation_jobs SET done = done + ?1 WHERE org = ?2 AND job = ?3")
            .bind(sql_int(written)?)
            .bind(org.as_str())
            .bind(sql_int(job)?)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(written)
    }

    async fn latest_rotation(&self, org: &OrgId) -> Result<Option<RotationJob>, StoreError> {
        // One snapshot for the job and its list of keys.
        let mut tx = self.pool.begin().await.map_err(db)?;
        let Some(row) = sqlx::query(
            "SELECT org, job, target, total, done, started_at, ended_at, state \
             FROM rotation_jobs WHERE org = ?1 ORDER BY job DESC LIMIT 1",
        )
        .bind(org.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?
        else {
            return Ok(None);
        };
        let mut job = decode_job(&row)?;
        job.from = sqlx::query(
            "SELECT key_id FROM rotation_job_from WHERE org = ?1 AND job = ?2 ORDER BY position",
        )
        .bind(org.as_str())
        .bind(sql_int(job.id)?)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?
        .iter()
        .map(|row| {
            Cells::new(row, "rotation_job_from")
                .get("key_id")
                .map(KeyId)
        })
        .collect::<Result<_, _>>()?;
        tx.commit().await.map_err(db)?;
        Ok(Some(job))
    }

    async fn running_rotations(&self) -> Result<Vec<RotationJob>, StoreError> {
        // One snapshot for the jobs and their lists of keys.
        let mut tx = self.pool.begin().await.map_err(db)?;
        let running = codec::job_state(JobState::Running);
        let mut jobs = sqlx::query(
            "SELECT org, job, target, total, done, started_at, ended_at, state \
             FROM rotation_jobs WHERE state = ?1 ORDER BY org",
        )
        .bind(running)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?
        .iter()
        .map(decode_job)
        .collect::<Result<Vec<_>, _>>()?;
        let from = sqlx::query(
            "SELECT f.org, f.job, f.key_id FROM rotation_job_from AS f \
             JOIN rotation_jobs AS j ON j.org = f.org AND j.job = f.job \
             WHERE j.state = ?1 ORDER BY f.org, f.job, f.position",
        )
        .bind(running)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        let mut from_of: HashMap<(String, u64), Vec<KeyId>> = HashMap::new();
        for row in &from {
            let cells = Cells::new(row, "rotation_job_from");
            from_of
                .entry((cells.get("org")?, cells.unsigned("job")?))
                .or_default()
                .push(KeyId(cells.get("key_id")?));
        }
        for job in &mut jobs {
            job.from = from_of
                .remove(&(job.org.as_str().to_owned(), job.id))
                .unwrap_or_default();
        }
        Ok(jobs)
    }
}

/// Inserts the key at the end of the org's order, or updates it in place.
async fn upsert_key(
    conn: &mut SqliteConnection,
    org: &OrgId,
    key: &StoredKey,
) -> Result<(), StoreError> {
    let StoredKey {
        record:
            KeyRecord {
                id,
                source,
                state,
                check_value,
                created_at,
                activated_at,
                revoked_at,
                expires_at,
                needed,
                before_provider_revocation,
            },
        handle,
    } = key;
    sqlx::query(
        "INSERT INTO keys (org, key_id, position, handle, source, state, check_value, \
                           created_at, activated_at, revoked_at, expires_at, needed, \
                           before_provider_revocation) \
         VALUES (?1, ?2, (SELECT coalesce(max(position), 0) + 1 FROM keys WHERE org = ?1), \
                 ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
         ON CONFLICT (org, key_id) DO UPDATE SET \
             handle = excluded.handle, source = excluded.source, state = excluded.state, \
             check_value = excluded.check_value, created_at = excluded.created_at, \
             activated_at = excluded.activated_at, revoked_at = excluded.revoked_at, \
             expires_at = excluded.expires_at, needed = excluded.needed, \
             before_provider_revocation = excluded.before_provider_revocation",
    )
    .bind(org.as_str())
    .bind(id.0.as_str())
    .bind(handle.as_str())
    .bind(codec::key_source(*source))
    .bind(codec::key_state(*state))
    .bind(check_value.as_str())
    .bind(created_at.0)
    .bind(activated_at.map(|t| t.0))
    .bind(revoked_at.map(|t| t.0))
    .bind(expires_at.map(|t| t.0))
    .bind(*needed)
    .bind(before_provider_revocation.map(codec::key_state))
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// Chains `events` after the org's newest stored event. The caller holds the
/// write lock, so nothing can be appended between reading the head and
/// inserting after it.
async fn append_chained(
    conn: &mut SqliteConnection,
    org: &OrgId,
    events: Vec<NewAuditEvent>,
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let head = sqlx::query(
        "SELECT org, seq, time, actor, key, action, result, prev_hash, hash \
         FROM audit WHERE org = ?1 ORDER BY seq DESC LIMIT 1",
    )
    .bind(org.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    let mut prev = head.as_ref().map(decode_audit).transpose()?;
    for NewAuditEvent {
        time,
        actor,
        key,
        action,
        result,
    } in events
    {
        let seq = match &prev {
            None => 1,
            Some(prev) => prev.event.seq.checked_add(1).ok_or_else(|| {
                StoreError::Corrupt(format!("audit.seq of org {org} is exhausted"))
            })?,
        };
        let next = audit::chain(
            prev.as_ref(),
            AuditEvent {
                seq,
                time,
                actor,
                org: org.as_str().to_owned(),
                key,
                action,
                result,
            },
        );
        let ChainedEvent {
            event,
            prev_hash,
            hash,
        } = &next;
        sqlx::query(
            "INSERT INTO audit (org, seq, time, actor, key, action, result, prev_hash, hash) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .bind(event.org.as_str())
        .bind(sql_int(event.seq)?)
        .bind(event.time.0)
        .bind(event.actor.as_str())
        .bind(event.key.as_deref())
        .bind(event.action.as_str())
        .bind(event.result.as_str())
        .bind(&prev_hash[..])
        .bind(&hash[..])
        .execute(&mut *conn)
        .await
        .map_err(db)?;
        prev = Some(next);
    }
    Ok(())
}

/// Records an intent; a handle that already has one is refused by the unique
/// constraint, because two calls under one handle would confuse the repair.
async fn insert_intent(conn: &mut SqliteConnection, intent: &Intent) -> Result<(), StoreError> {
    let Intent {
        handle,
        kind,
        org,
        created_at,
    } = intent;
    sqlx::query("INSERT INTO intents (handle, kind, org, created_at) VALUES (?1, ?2, ?3, ?4)")
        .bind(handle.as_str())
        .bind(codec::intent_kind(*kind))
        .bind(org.as_ref().map(OrgId::as_str))
        .bind(created_at.0)
        .execute(conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// Resolves an intent; resolving one that is not open is not an error, so a
/// repair that is interrupted can simply run again.
async fn delete_intent(conn: &mut SqliteConnection, handle: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM intents WHERE handle = ?1")
        .bind(handle)
        .execute(conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// Fails with [`StoreError::Conflict`] unless the org is at `version`.
async fn check_version(
    conn: &mut SqliteConnection,
    org: &OrgId,
    version: u64,
) -> Result<(), StoreError> {
    let stored: Option<i64> = sqlx::query_scalar("SELECT version FROM orgs WHERE org = ?1")
        .bind(org.as_str())
        .fetch_optional(conn)
        .await
        .map_err(db)?;
    // A version SQLite cannot hold was never read from it.
    if stored.is_none() || stored != i64::try_from(version).ok() {
        return Err(StoreError::Conflict(org.clone()));
    }
    Ok(())
}

/// Whether `key` wraps at least one KEK of the org.
async fn wraps_any_kek(
    conn: &mut SqliteConnection,
    org: &OrgId,
    key: &KeyId,
) -> Result<bool, StoreError> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM kek_counts WHERE org = ?1 AND key_id = ?2 AND keks > 0)",
    )
    .bind(org.as_str())
    .bind(key.0.as_str())
    .fetch_one(conn)
    .await
    .map_err(db)
}

/// Supersedes the org's running job, if any, and starts the next one, its
/// total counted now: the caller holds the write lock, so no KEK can be added
/// or re-wrapped between the count and the commit.
async fn start_rotation(
    conn: &mut SqliteConnection,
    org: &OrgId,
    target: &KeyId,
    from: &[KeyId],
    at: Timestamp,
) -> Result<(), StoreError> {
    let total: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(keks), 0) FROM kek_counts WHERE org = ?1 AND key_id <> ?2",
    )
    .bind(org.as_str())
    .bind(target.0.as_str())
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    sqlx::query("UPDATE rotation_jobs SET state = ?1, ended_at = ?2 WHERE org = ?3 AND state = ?4")
        .bind(codec::job_state(JobState::Superseded))
        .bind(at.0)
        .bind(org.as_str())
        .bind(codec::job_state(JobState::Running))
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    let job: i64 = sqlx::query_scalar(
        "INSERT INTO rotation_jobs (org, job, target, total, done, started_at, ended_at, state) \
         VALUES (?1, (SELECT coalesce(max(job), 0) + 1 FROM rotation_jobs WHERE org = ?1), \
                 ?2, ?3, 0, ?4, NULL, ?5) \
         RETURNING job",
    )
    .bind(org.as_str())
    .bind(target.0.as_str())
    .bind(total)
    .bind(at.0)
    .bind(codec::job_state(JobState::Running))
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    for (position, key) in (1i64..).zip(from) {
        sqlx::query(
            "INSERT INTO rotation_job_from (org, job, position, key_id) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(org.as_str())
        .bind(job)
        .bind(position)
        .bind(key.0.as_str())
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    Ok(())
}

/// Marks the org's job `job` finished; fails with [`StoreError::Conflict`]
/// unless it was running.
async fn finish_rotation(
    conn: &mut SqliteConnection,
    org: &OrgId,
    job: u64,
    at: Timestamp,
) -> Result<(), StoreError> {
    // A job number SQLite cannot hold was never stored, so is not running.
    let Ok(job) = i64::try_from(job) else {
        return Err(StoreError::Conflict(org.clone()));
    };
    let finished = sqlx::query(
        "UPDATE rotation_jobs SET state = ?1, ended_at = ?2 \
         WHERE org = ?3 AND job = ?4 AND state = ?5",
    )
    .bind(codec::job_state(JobState::Finished))
    .bind(at.0)
    .bind(org.as_str())
    .bind(job)
    .bind(codec::job_state(JobState::Running))
    .execute(conn)
    .await
    .map_err(db)?;
    if finished.rows_affected() == 0 {
        return Err(StoreError::Conflict(org.clone()));
    }
    Ok(())
}

/// Inserts KEKs of the org and counts them in `kek_counts`; an id or a
/// resource already stored fails the statement (and so the caller's
/// transaction).
async fn insert_kek_rows(
    conn: &mut SqliteConnection,
    org: &OrgId,
    mut keks: Vec<StoredKek>,
) -> Result<(), StoreError> {
    // In primary key order, each B-tree page is visited once per statement
    // rather than once per row.
    keks.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    let mut added: BTreeMap<&KeyId, u64> = BTreeMap::new();
    for chunk in keks.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO keks (org, kek_id, resource, key_id, wrapped, created_at) VALUES {}",
            placeholders(chunk.len(), 6)
        );
        let mut query = sqlx::query(&sql).persistent(chunk.len() == ROWS_PER_STATEMENT);
        for StoredKek {
            id,
            resource,
            key,
            wrapped,
            created_at,
        } in chunk
        {
            query = query
                .bind(org.as_str())
                .bind(id.as_str())
                .bind(resource.as_str())
                .bind(key.0.as_str())
                .bind(wrapped.as_slice())
                .bind(created_at.0);
            *added.entry(key).or_default() += 1;
        }
        query.execute(&mut *conn).await.map_err(db)?;
    }
    for (key, n) in added {
        add_to_count(conn, org, key, n).await?;
    }
    Ok(())
}

/// Writes each re-wrap whose KEK is still wrapped by its `from` key, moving
/// the written ones from their old key's count to their new key's; returns
/// how many were written.
///
/// Each (from, to) pair — usually a batch has one — is written by multi-row
/// statements, whose changed-row count is exactly what moves between the two
/// keys' counts. A statement costs a round trip to sqlx's connection thread,
/// which for single-row updates took longer than SQLite's work on the row.
async fn rewrite_keks(
    conn: &mut SqliteConnection,
    org: &OrgId,
    rewraps: &[Rewrap],
) -> Result<u64, StoreError> {
    // Pairs in the order they first appear, so that a KEK named twice along
    // a chain (k-1 → k-2, then k-2 → k-3) is written in that order.
    let mut pairs: Vec<((&KeyId, &KeyId), Vec<&Rewrap>)> = Vec::new();
    for rewrap in rewraps {
        let pair = (&rewrap.from, &rewrap.to);
        match pairs.iter_mut().find(|(p, _)| *p == pair) {
            Some((_, group)) => group.push(rewrap),
            None => pairs.push((pair, vec![rewrap])),
        }
    }
    let mut written = 0;
    for ((from, to), group) in pairs {
        let mut moved = 0;
        for chunk in group.chunks(ROWS_PER_STATEMENT) {
            // Parameters in the order they appear: the rows', then the
            // pair's and the org.
            let sql = format!(
                "WITH v (kek_id, wrapped) AS (VALUES {}) \
                 UPDATE keks SET key_id = ?, wrapped = v.wrapped FROM v \
                 WHERE keks.org = ? AND keks.kek_id = v.kek_id AND keks.key_id = ?",
                placeholders(chunk.len(), 2)
            );
            let mut query = sqlx::query(&sql).persistent(chunk.len() == ROWS_PER_STATEMENT);
            for rewrap in chunk {
                query = query
                    .bind(rewrap.kek.as_str())
                    .bind(rewrap.wrapped.as_slice());
            }
            moved += query
                .bind(to.0.as_str())
                .bind(org.as_str())
                .bind(from.0.as_str())
                .execute(&mut *conn)
                .await
                .map_err(db)?
                .rows_affected();
        }
        if moved > 0 && from != to {
            remove_from_count(conn, org, from, moved).await?;
            add_to_count(conn, org, to, moved).await?;
        }
        written += moved;
    }
    Ok(written)
}

/// Counts `n` more KEKs wrapped by `key`.
async fn add_to_count(
    conn: &mut SqliteConnection,
    org: &OrgId,
    key: &KeyId,
    n: u64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO kek_counts (org, key_id, keks) VALUES (?1, ?2, ?3) \
         ON CONFLICT (org, key_id) DO UPDATE SET keks = keks + excluded.keks",
    )
    .bind(org.as_str())
    .bind(key.0.as_str())
    .bind(sql_int(n)?)
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// Counts `n` fewer KEKs wrapped by `key`, which `n` KEKs were just re-wrapped
/// away from. A count that would go below zero, or is missing, disagrees with
/// the KEKs: the CHECK on the table, or the test here, aborts the write rather
/// than let a key look unused while KEKs need it.
async fn remove_from_count(
    conn: &mut SqliteConnection,
    org: &OrgId,
    key: &KeyId,
    n: u64,
) -> Result<(), StoreError> {
    let updated =
        sqlx::query("UPDATE kek_counts SET keks = keks - ?1 WHERE org = ?2 AND key_id = ?3")
            .bind(sql_int(n)?)
            .bind(org.as_str())
            .bind(key.0.as_str())
            .execute(conn)
            .await
            .map_err(db)?;
    if updated.rows_affected() != 1 {
        return Err(StoreError::Corrupt(format!(
            "kek_counts: org {org} has KEKs wrapped by {key} but no count for it"
        )));
    }
    Ok(())
}

/// How many rows one multi-row statement carries: well within SQLite's limit
/// of 32766 parameters, and large enough that the per-statement round trip no
/// longer shows. Only full chunks are kept prepared (their SQL is always the
/// same); a shorter last chunk is prepared for its one use.
const ROWS_PER_STATEMENT: usize = 500;

/// `(?, ?), (?, ?), ...`: `rows` groups of `per_row` parameters.
///
/// Anonymous parameters, bound in the order they appear: sqlx looks up the
/// name of every parameter of a statement, and SQLite finds a numbered one
/// (`?7`) by a linear search, which makes binding a statement of thousands of
/// numbered parameters quadratic.
fn placeholders(rows: usize, per_row: usize) -> String {
    let row = format!("({})", vec!["?"; per_row].join(", "));
    vec![row; rows].join(", ")
}

async fn read_generic_key(conn: &mut SqliteConnection) -> Result<Option<GenericKey>, StoreError> {
    sqlx::query("SELECT handle, check_value, created_at FROM generic_key WHERE id = 1")
        .fetch_optional(conn)
        .await
        .map_err(db)?
        .as_ref()
        .map(|row| decode_generic_key(row, "generic_key"))
        .transpose()
}

fn decode_key(row: &SqliteRow) -> Result<StoredKey, StoreError> {
    let cells = Cells::new(row, "keys");
    Ok(StoredKey {
        record: KeyRecord {
            id: KeyId(cells.get("key_id")?),
            source: cells.parse("source", codec::parse_key_source)?,
            state: cells.parse("state", codec::parse_key_state)?,
            check_value: cells.get("check_value")?,
            created_at: Timestamp(cells.get("created_at")?),
            activated_at: cells.get::<Option<i64>>("activated_at")?.map(Timestamp),
            revoked_at: cells.get::<Option<i64>>("revoked_at")?.map(Timestamp),
            expires_at: cells.get::<Option<i64>>("expires_at")?.map(Timestamp),
            needed: cells.get("needed")?,
            before_provider_revocation: cells
                .parse_optional("before_provider_revocation", codec::parse_key_state)?,
        },
        handle: cells.get("handle")?,
    })
}

/// Decodes a row exactly as stored: the org is not parsed, so that
/// [`audit::verify`] can name a row that claims to be another org's.
fn decode_audit(row: &SqliteRow) -> Result<ChainedEvent, StoreError> {
    let cells = Cells::new(row, "audit");
    Ok(ChainedEvent {
        event: AuditEvent {
            seq: cells.unsigned("seq")?,
            time: Timestamp(cells.get("time")?),
            actor: cells.get("actor")?,
            org: cells.get("org")?,
            key: cells.get("key")?,
            action: cells.get("action")?,
            result: cells.get("result")?,
        },
        prev_hash: cells.hash("prev_hash")?,
        hash: cells.hash("hash")?,
    })
}

fn decode_intent(row: &SqliteRow) -> Result<Intent, StoreError> {
    let cells = Cells::new(row, "intents");
    Ok(Intent {
        handle: cells.get("handle")?,
        kind: cells.parse("kind", codec::parse_intent_kind)?,
        org: cells.parse_optional("org", codec::parse_org)?,
        created_at: Timestamp(cells.get("created_at")?),
    })
}

fn decode_generic_key(row: &SqliteRow, table: &'static str) -> Result<GenericKey, StoreError> {
    let cells = Cells::new(row, table);
    Ok(GenericKey {
        handle: cells.get("handle")?,
        check_value: cells.get("check_value")?,
        created_at: Timestamp(cells.get("created_at")?),
    })
}

fn decode_kek(row: &SqliteRow) -> Result<StoredKek, StoreError> {
    let cells = Cells::new(row, "keks");
    Ok(StoredKek {
        id: cells.parse("kek_id", codec::parse_kek_id)?,
        resource: cells.parse("resource", codec::parse_resource)?,
        key: KeyId(cells.get("key_id")?),
        wrapped: cells.get("wrapped")?,
        created_at: Timestamp(cells.get("created_at")?),
    })
}

/// A job without its `from` keys, which are stored in a table of their own.
fn decode_job(row: &SqliteRow) -> Result<RotationJob, StoreError> {
    let cells = Cells::new(row, "rotation_jobs");
    Ok(RotationJob {
        org: cells.org("org")?,
        id: cells.unsigned("job")?,
        target: KeyId(cells.get("target")?),
        from: Vec::new(),
        total: cells.unsigned("total")?,
        done: cells.unsigned("done")?,
        started_at: Timestamp(cells.get("started_at")?),
        ended_at: cells.get::<Option<i64>>("ended_at")?.map(Timestamp),
        state: cells.parse("state", codec::parse_job_state)?,
    })
}

/// The columns of one row of `table`, decoded with errors that name the column.
struct Cells<'r> {
    row: &'r SqliteRow,
    table: &'static str,
}

impl<'r> Cells<'r> {
    fn new(row: &'r SqliteRow, table: &'static str) -> Self {
        Self { row, table }
    }

    fn get<T: Decode<'r, Sqlite> + Type<Sqlite>>(&self, name: &str) -> Result<T, StoreError> {
        self.row
            .try_get(name)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", self.column(name))))
    }

    fn parse<T>(
        &self,
        name: &str,
        parse: fn(&dyn fmt::Display, &str) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        parse(&self.column(name), self.get(name)?)
    }

    fn parse_optional<T>(
        &self,
        name: &str,
        parse: fn(&dyn fmt::Display, &str) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        self.get::<Option<&str>>(name)?
            .map(|text| parse(&self.column(name), text))
            .transpose()
    }

    fn org(&self, name: &str) -> Result<OrgId, StoreError> {
        self.parse(name, codec::parse_org)
    }

    fn unsigned(&self, name: &str) -> Result<u64, StoreError> {
        codec::parse_unsigned(&self.column(name), self.get(name)?)
    }

    fn hash(&self, name: &str) -> Result<[u8; 32], StoreError> {
        codec::parse_hash(&self.column(name), self.get(name)?)
    }

    /// `table.column`; formatted only if an error names it, since every
    /// decoded value passes one to its parser.
    fn column<'n>(&self, name: &'n str) -> Column<'n> {
        Column {
            table: self.table,
            name,
        }
    }
}

struct Column<'n> {
    table: &'static str,
    name: &'n str,
}

impl fmt::Display for Column<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.table, self.name)
    }
}

/// A version or sequence number as SQLite's signed integer. Those the store
/// writes are reached by counting from 1, so one that does not fit means the
/// stored count is already at the limit.
fn sql_int(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("counter {value} exceeds SQLite's integer range")))
}

/// Primary result codes (the low byte of an extended code) that mean the file
/// itself is damaged or is not a database.
const SQLITE_CORRUPT: i32 = 11;
const SQLITE_NOTADB: i32 = 26;

/// The one translation from sqlx's errors to the store's (see the module docs).
fn db(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => StoreError::Corrupt(error.to_string()),
        sqlx::Error::Database(e) if is_damaged_file(e.as_ref()) => {
            StoreError::Corrupt(error.to_string())
        }
        _ => StoreError::Unavailable(Box::new(error)),
    }
}

fn is_damaged_file(error: &dyn DatabaseError) -> bool {
    error
        .code()
        .and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| matches!(code & 0xff, SQLITE_CORRUPT | SQLITE_NOTADB))
}

fn migrate(error: MigrateError) -> StoreError {
    match error {
        MigrateError::Execute(error) => db(error),
        // A migration this build does not know (a newer release wrote the file)
        // or an edited one: refuse to run on a schema we cannot vouch for.
        other => StoreError::Unavailable(Box::new(other)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_connection_is_durable_and_enforces_foreign_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("m.db").to_str().unwrap())
            .await
            .unwrap();
        // Several connections, so that settings applied only to the first one
        // would show.
        let mut conns = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            conns.push(store.pool.acquire().await.unwrap());
        }
        for conn in &mut conns {
            let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            assert_eq!(journal, "wal");
            let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            assert_eq!(synchronous, 2, "synchronous = FULL");
            let foreign_keys: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            assert_eq!(foreign_keys, 1);
            let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            assert_eq!(busy, 5_000);
        }
    }

    #[tokio::test]
    async fn a_url_gets_the_same_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let url = format!("sqlite://{}?mode=rw&immutable=1", path.display());
        let store = SqliteStore::open(&url).await.unwrap();
        let mut conn = store.pool.acquire().await.unwrap();
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(journal, "wal");
        let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(synchronous, 2);
    }
}
