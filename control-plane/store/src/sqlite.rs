//! [`Store`] on one SQLite database file: SQLite's statements, and the
//! transaction each operation runs in. What an operation does with them is
//! written once, for both SQL backends, in `ops.rs`.
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

use std::{str::FromStr, time::Duration};

use cmk_control_plane_domain::{
    KekId, KeyId, KeyRecord, KeyState, OrgId, ResourceId, Timestamp, audit::ChainedEvent,
};
use sqlx::{
    Sqlite, SqliteConnection, Transaction,
    error::DatabaseError,
    migrate::{MigrateError, Migrator},
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
};

use crate::{
    Commit, GenericKey, Intent, IntentKind, JobState, NewAuditEvent, OrgAwsKey, Rewrap,
    RotationJob, Store, StoreError, StoredKek, StoredKey, StoredOrg, codec,
    ops::{self, Lock, Tx},
    sql::{
        self, Cells, KEY_COLUMNS, decode_audit, decode_generic_key, decode_intent, decode_job,
        decode_kek, decode_key, decode_org_key,
    },
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
        ops::insert_keks_unchecked(self.begin_write().await?, org, &keks).await
    }

    /// A write transaction holding the database's write lock from its start.
    /// Dropping it without committing rolls it back, so an early `?` return
    /// writes nothing.
    async fn begin_write(&self) -> Result<SqliteTx, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map(SqliteTx)
            .map_err(db)
    }

    /// A read of several statements from one snapshot.
    async fn begin_read(&self) -> Result<SqliteTx, StoreError> {
        self.pool.begin().await.map(SqliteTx).map_err(db)
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn load_org(&self, org: &OrgId) -> Result<Option<StoredOrg>, StoreError> {
        ops::load_org(self.begin_read().await?, org).await
    }

    async fn commit(&self, commit: Commit) -> Result<u64, StoreError> {
        ops::commit(self.begin_write().await?, commit).await
    }

    async fn append_audit(
        &self,
        org: &OrgId,
        events: Vec<NewAuditEvent>,
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        ops::append_audit(self.begin_write().await?, org, events).await
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

    async fn claim_abandoned_import(&self, handle: &str) -> Result<bool, StoreError> {
        let claimed = sqlx::query("UPDATE intents SET kind = ?1 WHERE handle = ?2 AND kind = ?3")
            .bind(codec::intent_kind(IntentKind::Destroy))
            .bind(handle)
            .bind(codec::intent_kind(IntentKind::Import))
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(claimed.rows_affected() == 1)
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
        ops::put_generic_key(self.begin_write().await?, key).await
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
        ops::renew_generic_key(self.begin_write().await?, old_handle, new).await
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
        ops::drop_retired_generic_key(self.begin_write().await?, handle, now).await
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

    async fn aws_keys(&self) -> Result<Vec<OrgAwsKey>, StoreError> {
        sqlx::query(&format!(
            "SELECT org, {KEY_COLUMNS} FROM keys \
             WHERE aws_key_arn IS NOT NULL AND state <> ?1 ORDER BY org, position"
        ))
        .bind(codec::key_state(KeyState::Removed))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .iter()
        .map(decode_org_key)
        .collect()
    }

    async fn insert_kek(
        &self,
        org: &OrgId,
        org_version: u64,
        kek: StoredKek,
        audit: Vec<NewAuditEvent>,
    ) -> Result<StoredKek, StoreError> {
        ops::insert_kek(self.begin_write().await?, org, org_version, kek, audit).await
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
            Ok((cells.key_id("key_id")?, cells.unsigned("keks")?))
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
        ops::rewrap_keks(self.begin_write().await?, org, org_version, job, &rewraps).await
    }

    async fn latest_rotation(&self, org: &OrgId) -> Result<Option<RotationJob>, StoreError> {
        ops::latest_rotation(self.begin_read().await?, org).await
    }

    async fn running_rotations(&self) -> Result<Vec<RotationJob>, StoreError> {
        ops::running_rotations(self.begin_read().await?).await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        // In a write transaction: a lone UPSERT would read under a shared
        // lock and could fail with SQLITE_BUSY_SNAPSHOT when it upgrades,
        // which the busy timeout does not retry.
        let mut tx = self.begin_write().await?;
        // 'now' is the same for every use within one statement.
        let granted = sqlx::query(&format!(
            "INSERT INTO leases (name, holder, expires_at) \
             VALUES (?1, ?2, {NOW_MILLIS} + ?3) \
             ON CONFLICT (name) DO UPDATE \
             SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at <= {NOW_MILLIS} \
             RETURNING holder"
        ))
        .bind(name)
        .bind(holder)
        .bind(ops::millis(ttl))
        .fetch_optional(&mut *tx.0)
        .await
        .map_err(db)?
        .is_some();
        tx.commit().await?;
        Ok(granted)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM leases WHERE name = ?1 AND holder = ?2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }
}

/// The database's clock in milliseconds since the Unix epoch (the Julian
/// day number of 1970-01-01 is 2440587.5).
const NOW_MILLIS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

/// One transaction on the database file; see [`SqliteStore::begin_write`]
/// for the lock a write holds.
struct SqliteTx(Transaction<'static, Sqlite>);

#[async_trait::async_trait]
impl Tx for SqliteTx {
    async fn commit(self) -> Result<(), StoreError> {
        self.0.commit().await.map_err(db)
    }

    async fn org(&mut self, org: &OrgId) -> Result<Option<(bool, u64)>, StoreError> {
        sqlx::query("SELECT byok, version FROM orgs WHERE org = ?1")
            .bind(org.as_str())
            .fetch_optional(&mut *self.0)
            .await
            .map_err(db)?
            .map(|row| {
                let cells = Cells::new(&row, "orgs");
                Ok((cells.flag("byok")?, cells.unsigned("version")?))
            })
            .transpose()
    }

    async fn create_org(&mut self, org: &OrgId, byok: bool) -> Result<bool, StoreError> {
        let created = sqlx::query(
            "INSERT INTO orgs (org, byok, version) VALUES (?1, ?2, 1) \
             ON CONFLICT (org) DO NOTHING",
        )
        .bind(org.as_str())
        .bind(byok)
        .execute(&mut *self.0)
        .await
        .map_err(db)?;
        Ok(created.rows_affected() == 1)
    }

    async fn advance_version(
        &mut self,
        org: &OrgId,
        expected: i64,
        next: i64,
        byok: bool,
    ) -> Result<bool, StoreError> {
        let updated =
            sqlx::query("UPDATE orgs SET version = ?1, byok = ?2 WHERE org = ?3 AND version = ?4")
                .bind(next)
                .bind(byok)
                .bind(org.as_str())
                .bind(expected)
                .execute(&mut *self.0)
                .await
                .map_err(db)?;
        Ok(updated.rows_affected() == 1)
    }

    async fn version(&mut self, org: &OrgId) -> Result<Option<i64>, StoreError> {
        sqlx::query_scalar("SELECT version FROM orgs WHERE org = ?1")
            .bind(org.as_str())
            .fetch_optional(&mut *self.0)
            .await
            .map_err(db)
    }

    async fn keys(&mut self, org: &OrgId) -> Result<Vec<StoredKey>, StoreError> {
        sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE org = ?1 ORDER BY position"
        ))
        .bind(org.as_str())
        .fetch_all(&mut *self.0)
        .await
        .map_err(db)?
        .iter()
        .map(decode_key)
        .collect()
    }

    async fn upsert_key(&mut self, org: &OrgId, key: &StoredKey) -> Result<(), StoreError> {
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
            aws,
        } = key;
        let [aws_key_arn, aws_backup_key_arn, aws_role_arn] = sql::aws_columns(aws.as_ref());
        sqlx::query(
            "INSERT INTO keys (org, key_id, position, handle, source, state, check_value, \
                               created_at, activated_at, revoked_at, expires_at, needed, \
                               before_provider_revocation, aws_key_arn, aws_backup_key_arn, \
                               aws_role_arn) \
             VALUES (?1, ?2, (SELECT coalesce(max(position), 0) + 1 FROM keys WHERE org = ?1), \
                     ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
             ON CONFLICT (org, key_id) DO UPDATE SET \
                 handle = excluded.handle, source = excluded.source, state = excluded.state, \
                 check_value = excluded.check_value, created_at = excluded.created_at, \
                 activated_at = excluded.activated_at, revoked_at = excluded.revoked_at, \
                 expires_at = excluded.expires_at, needed = excluded.needed, \
                 before_provider_revocation = excluded.before_provider_revocation, \
                 aws_key_arn = excluded.aws_key_arn, \
                 aws_backup_key_arn = excluded.aws_backup_key_arn, \
                 aws_role_arn = excluded.aws_role_arn",
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
        .bind(aws_key_arn)
        .bind(aws_backup_key_arn)
        .bind(aws_role_arn)
        .execute(&mut *self.0)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn audit_head(&mut self, org: &OrgId) -> Result<Option<ChainedEvent>, StoreError> {
        sqlx::query(
            "SELECT org, seq, time, actor, key, action, result, prev_hash, hash \
             FROM audit WHERE org = ?1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(org.as_str())
        .fetch_optional(&mut *self.0)
        .await
        .map_err(db)?
        .as_ref()
        .map(decode_audit)
        .transpose()
    }

    async fn insert_audit(&mut self, events: &[ChainedEvent]) -> Result<(), StoreError> {
        for ChainedEvent {
            event,
            prev_hash,
            hash,
        } in events
        {
            sqlx::query(
                "INSERT INTO audit (org, seq, time, actor, key, action, result, prev_hash, hash) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .bind(event.org.as_str())
            .bind(sql::sql_int(event.seq)?)
            .bind(event.time.0)
            .bind(event.actor.as_str())
            .bind(event.key.as_deref())
            .bind(event.action.as_str())
            .bind(event.result.as_str())
            .bind(&prev_hash[..])
            .bind(&hash[..])
            .execute(&mut *self.0)
            .await
            .map_err(db)?;
        }
        Ok(())
    }

    async fn insert_intent(&mut self, intent: &Intent) -> Result<(), StoreError> {
        insert_intent(&mut self.0, intent).await
    }

    async fn resolve_import_intents(&mut self, handles: &[String]) -> Result<u64, StoreError> {
        let mut resolved = 0;
        for handle in handles {
            resolved += sqlx::query("DELETE FROM intents WHERE handle = ?1 AND kind = ?2")
                .bind(handle)
                .bind(codec::intent_kind(IntentKind::Import))
                .execute(&mut *self.0)
                .await
                .map_err(db)?
                .rows_affected();
        }
        Ok(resolved)
    }

    async fn latest_job(&mut self, org: &OrgId) -> Result<Option<RotationJob>, StoreError> {
        sqlx::query(
            "SELECT org, job, target, total, done, started_at, ended_at, state \
             FROM rotation_jobs WHERE org = ?1 ORDER BY job DESC LIMIT 1",
        )
        .bind(org.as_str())
        .fetch_optional(&mut *self.0)
        .await
        .map_err(db)?
        .as_ref()
        .map(decode_job)
        .transpose()
    }

    async fn job_from(&mut self, org: &OrgId, job: i64) -> Result<Vec<KeyId>, StoreError> {
        sqlx::query(
            "SELECT key_id FROM rotation_job_from WHERE org = ?1 AND job = ?2 ORDER BY position",
        )
        .bind(org.as_str())
        .bind(job)
        .fetch_all(&mut *self.0)
        .await
        .map_err(db)?
        .iter()
        .map(sql::decode_from_key)
        .collect()
    }

    async fn running_jobs(&mut self) -> Result<Vec<RotationJob>, StoreError> {
        sqlx::query(
            "SELECT org, job, target, total, done, started_at, ended_at, state \
             FROM rotation_jobs WHERE state = ?1 ORDER BY org",
        )
        .bind(codec::job_state(JobState::Running))
        .fetch_all(&mut *self.0)
        .await
        .map_err(db)?
        .iter()
        .map(decode_job)
        .collect()
    }

    async fn running_jobs_from(&mut self) -> Result<Vec<(String, u64, KeyId)>, StoreError> {
        sqlx::query(
            "SELECT f.org, f.job, f.key_id FROM rotation_job_from AS f \
             JOIN rotation_jobs AS j ON j.org = f.org AND j.job = f.job \
             WHERE j.state = ?1 ORDER BY f.org, f.job, f.position",
        )
        .bind(codec::job_state(JobState::Running))
        .fetch_all(&mut *self.0)
        .await
        .map_err(db)?
        .iter()
        .map(sql::decode_job_from)
        .collect()
    }

    async fn supersede_running_job(
        &mut self,
        org: &OrgId,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE rotation_jobs SET state = ?1, ended_at = ?2 WHERE org = ?3 AND state = ?4",
        )
        .bind(codec::job_state(JobState::Superseded))
        .bind(at.0)
        .bind(org.as_str())
        .bind(codec::job_state(JobState::Running))
        .execute(&mut *self.0)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn insert_job(
        &mut self,
        org: &OrgId,
        target: &KeyId,
        total: i64,
        at: Timestamp,
    ) -> Result<i64, StoreError> {
        sqlx::query_scalar(
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
        .fetch_one(&mut *self.0)
        .await
        .map_err(db)
    }

    async fn insert_job_from(
        &mut self,
        org: &OrgId,
        job: i64,
        from: &[KeyId],
    ) -> Result<(), StoreError> {
        for (position, key) in (1i64..).zip(from) {
            sqlx::query(
                "INSERT INTO rotation_job_from (org, job, position, key_id) \
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .bind(org.as_str())
            .bind(job)
            .bind(position)
            .bind(key.0.as_str())
            .execute(&mut *self.0)
            .await
            .map_err(db)?;
        }
        Ok(())
    }

    async fn finish_job(
        &mut self,
        org: &OrgId,
        job: i64,
        at: Timestamp,
    ) -> Result<bool, StoreError> {
        let finished = sqlx::query(
            "UPDATE rotation_jobs SET state = ?1, ended_at = ?2 \
             WHERE org = ?3 AND job = ?4 AND state = ?5",
        )
        .bind(codec::job_state(JobState::Finished))
        .bind(at.0)
        .bind(org.as_str())
        .bind(job)
        .bind(codec::job_state(JobState::Running))
        .execute(&mut *self.0)
        .await
        .map_err(db)?;
        Ok(finished.rows_affected() == 1)
    }

    async fn job_running(&mut self, org: &OrgId, job: i64) -> Result<bool, StoreError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM rotation_jobs WHERE org = ?1 AND job = ?2 AND state = ?3)",
        )
        .bind(org.as_str())
        .bind(job)
        .bind(codec::job_state(JobState::Running))
        .fetch_one(&mut *self.0)
        .await
        .map_err(db)
    }

    async fn add_done(&mut self, org: &OrgId, job: i64, n: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE rotation_jobs SET done = done + ?1 WHERE org = ?2 AND job = ?3")
            .bind(n)
            .bind(org.as_str())
            .bind(job)
            .execute(&mut *self.0)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn kek_for_resource(
        &mut self,
        org: &OrgId,
        resource: &ResourceId,
    ) -> Result<Option<StoredKek>, StoreError> {
        sqlx::query(
            "SELECT kek_id, resource, key_id, wrapped, created_at FROM keks \
             WHERE org = ?1 AND resource = ?2",
        )
        .bind(org.as_str())
        .bind(resource.as_str())
        .fetch_optional(&mut *self.0)
        .await
        .map_err(db)?
        .as_ref()
        .map(decode_kek)
        .transpose()
    }

    async fn insert_keks(&mut self, org: &OrgId, keks: &[StoredKek]) -> Result<(), StoreError> {
        // In primary key order, each B-tree page is visited once per statement
        // rather than once per row.
        let mut keks: Vec<&StoredKek> = keks.iter().collect();
        keks.sort_unstable_by(|a, b| a.id.cmp(&b.id));
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
            }
            query.execute(&mut *self.0).await.map_err(db)?;
        }
        Ok(())
    }

    /// Multi-row statements: a statement costs a round trip to sqlx's
    /// connection thread, which for single-row updates took longer than
    /// SQLite's work on the row.
    async fn rewrite_keks(
        &mut self,
        org: &OrgId,
        from: &KeyId,
        to: &KeyId,
        rewraps: &[&Rewrap],
    ) -> Result<u64, StoreError> {
        let mut moved = 0;
        for chunk in rewraps.chunks(ROWS_PER_STATEMENT) {
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
                .execute(&mut *self.0)
                .await
                .map_err(db)?
                .rows_affected();
        }
        Ok(moved)
    }

    async fn wraps_any_kek(&mut self, org: &OrgId, keys: &[KeyId]) -> Result<bool, StoreError> {
        for key in keys {
            let wraps: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM kek_counts \
                                WHERE org = ?1 AND key_id = ?2 AND keks > 0)",
            )
            .bind(org.as_str())
            .bind(key.0.as_str())
            .fetch_one(&mut *self.0)
            .await
            .map_err(db)?;
            if wraps {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn keks_not_wrapped_by(
        &mut self,
        org: &OrgId,
        target: &KeyId,
    ) -> Result<i64, StoreError> {
        sqlx::query_scalar(
            "SELECT coalesce(sum(keks), 0) FROM kek_counts WHERE org = ?1 AND key_id <> ?2",
        )
        .bind(org.as_str())
        .bind(target.0.as_str())
        .fetch_one(&mut *self.0)
        .await
        .map_err(db)
    }

    async fn add_to_count(&mut self, org: &OrgId, key: &KeyId, n: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO kek_counts (org, key_id, keks) VALUES (?1, ?2, ?3) \
             ON CONFLICT (org, key_id) DO UPDATE SET keks = keks + excluded.keks",
        )
        .bind(org.as_str())
        .bind(key.0.as_str())
        .bind(n)
        .execute(&mut *self.0)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn remove_from_count(
        &mut self,
        org: &OrgId,
        key: &KeyId,
        n: i64,
    ) -> Result<bool, StoreError> {
        let updated =
            sqlx::query("UPDATE kek_counts SET keks = keks - ?1 WHERE org = ?2 AND key_id = ?3")
                .bind(n)
                .bind(org.as_str())
                .bind(key.0.as_str())
                .execute(&mut *self.0)
                .await
                .map_err(db)?;
        Ok(updated.rows_affected() == 1)
    }

    /// Unlocked whatever `lock` says: a write transaction already holds the
    /// database's write lock.
    async fn generic_key(&mut self, _lock: Lock) -> Result<Option<GenericKey>, StoreError> {
        read_generic_key(&mut self.0).await
    }

    async fn insert_generic_key_if_absent(&mut self, key: &GenericKey) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO generic_key (id, handle, check_value, created_at) VALUES (1, ?1, ?2, ?3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&key.handle)
        .bind(&key.check_value)
        .bind(key.created_at.0)
        .execute(&mut *self.0)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn replace_generic_key(&mut self, key: &GenericKey) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE generic_key SET handle = ?1, check_value = ?2, created_at = ?3 WHERE id = 1",
        )
        .bind(&key.handle)
        .bind(&key.check_value)
        .bind(key.created_at.0)
        .execute(&mut *self.0)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn retire_generic_key(&mut self, key: &GenericKey) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO retired_generic_keys (handle, check_value, created_at) \
             VALUES (?1, ?2, ?3)",
        )
        .bind(&key.handle)
        .bind(&key.check_value)
        .bind(key.created_at.0)
        .execute(&mut *self.0)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn delete_retired_generic_key(&mut self, handle: &str) -> Result<bool, StoreError> {
        let deleted = sqlx::query("DELETE FROM retired_generic_keys WHERE handle = ?1")
            .bind(handle)
            .execute(&mut *self.0)
            .await
            .map_err(db)?;
        Ok(deleted.rows_affected() == 1)
    }

    async fn handle_in_use(&mut self, handle: &str) -> Result<bool, StoreError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM keys WHERE handle = ?1 AND state <> ?2) \
                 OR EXISTS (SELECT 1 FROM generic_key WHERE handle = ?1)",
        )
        .bind(handle)
        .bind(codec::key_state(KeyState::Removed))
        .fetch_one(&mut *self.0)
        .await
        .map_err(db)
    }
}

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

async fn delete_intent(conn: &mut SqliteConnection, handle: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM intents WHERE handle = ?1")
        .bind(handle)
        .execute(conn)
        .await
        .map_err(db)?;
    Ok(())
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

/// Primary result codes (the low byte of an extended code) that mean the file
/// itself is damaged or is not a database.
const SQLITE_CORRUPT: i32 = 11;
const SQLITE_NOTADB: i32 = 26;

/// The one translation from sqlx's errors to the store's (see the module docs).
fn db(error: sqlx::Error) -> StoreError {
    match &error {
        _ if sql::is_decode_error(&error) => StoreError::Corrupt(error.to_string()),
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
    sql::migrate_error(error, db)
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
