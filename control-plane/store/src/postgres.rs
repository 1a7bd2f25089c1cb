//! [`Store`] on a PostgreSQL database that several control-plane replicas
//! share: PostgreSQL's statements, and the transaction each operation runs
//! in. What an operation does with them is written once, for both SQL
//! backends, in `ops.rs`.
//!
//! # Concurrency
//!
//! Every transaction that writes an org's rows — the org itself, its keys,
//! its audit chain, its KEKs and their counts, its rotation jobs — first
//! takes that org's *writer lock*, a transaction-scoped advisory lock keyed
//! by the org id, and runs at READ COMMITTED. That is SQLite's single writer
//! narrowed to one org, across every replica:
//!
//! - The lock is on a name rather than on the org's row because some writes
//!   have no row to lock: a refused call on an org that was never enrolled
//!   is still audited, and two replicas may create one org at once.
//! - READ COMMITTED gives each statement a fresh snapshot, so everything read
//!   after the lock is granted includes what the previous holder committed:
//!   the version compare-and-set, the audit chain's head, the KEK counts that
//!   `require_unreferenced` and a job's total are checked against, whether a
//!   job is running. REPEATABLE READ or SERIALIZABLE would take their
//!   snapshot before waiting for the lock and read the state the previous
//!   holder replaced (failing, at best, with a serialisation error to be
//!   retried), so the level is named on every `BEGIN`, whatever the
//!   database's default.
//! - A transaction takes at most one org lock, so org locks cannot deadlock.
//!   The lock goes with COMMIT or ROLLBACK, or with the session if a
//!   replica's connection drops; `idle_in_transaction_session_timeout` ends
//!   the session of a replica that stopped mid-transaction without its
//!   connection closing, and `lock_timeout` bounds every wait (SQLite's busy
//!   timeout), after which the call reports the store unavailable.
//! - Writes that are no org's — intents on their own, the generic default
//!   key — rely on unique constraints and on the `generic_key` row's lock.
//!
//! A read of several statements runs in a READ ONLY REPEATABLE READ
//! transaction so that it sees one snapshot; a read-only transaction never
//! fails with a serialisation error at that level.
//!
//! # Batches
//!
//! A batch of rows — re-wraps, seeded KEKs, the events of one commit — is
//! bound as one array per column and expanded with `UNNEST`, so that it is one
//! statement whose text does not depend on its size, prepared once per
//! connection, instead of a statement of thousands of parameters.
//!
//! # Errors
//!
//! A value that does not decode — an unknown enumeration, a negative version,
//! a hash of the wrong length — and data or an index that PostgreSQL itself
//! reports damaged are [`StoreError::Corrupt`]. Everything else the database
//! reports (it cannot be reached, a lock was not granted in time, the pool
//! has no free connection, a constraint refused the write) is
//! [`StoreError::Unavailable`] with the sqlx error as its source.

use std::{str::FromStr, time::Duration};

use cmk_control_plane_domain::{
    KekId, KeyId, KeyRecord, KeyState, OrgId, ResourceId, Timestamp, audit::ChainedEvent,
};
use sqlx::{
    PgConnection, Postgres, Transaction,
    error::DatabaseError,
    migrate::{MigrateError, Migrator},
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
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

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// The first half of every org lock's key (the second is the hash of the org
/// id): an arbitrary constant, "cmko", that keeps these locks apart from any
/// other advisory lock taken in the database, such as sqlx's migration lock.
const ORG_LOCK_CLASS: i32 = 0x636d_6b6f;

/// How long a statement waits for a lock — an org's writer lock, a row —
/// before failing (reported as [`StoreError::Unavailable`]).
const LOCK_TIMEOUT: &str = "5s";

/// How long a session may sit in an open transaction without sending a
/// statement before the server ends it and releases its locks. The store
/// never pauses inside a transaction, so only a stalled replica reaches it.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "60s";

/// KEKs per `INSERT` when seeding: a statement's arrays stay a few hundred
/// kilobytes however many KEKs are seeded.
const ROWS_PER_STATEMENT: usize = 1000;

/// How a [`PgStore`] uses the database server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgStoreOptions {
    /// Connections this replica may hold open. Every replica has its own
    /// pool, so the server must accept this many times the replicas.
    pub max_connections: u32,
    /// How long a call waits for a free connection before the store reports
    /// itself unavailable.
    pub acquire_timeout: Duration,
}

impl Default for PgStoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(10),
        }
    }
}

/// The metadata store on a PostgreSQL database, which any number of replicas
/// may share. Cloning shares the connection pool.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host/db`,
    /// with any of libpq's parameters) with the default
    /// [`PgStoreOptions`], and brings its schema up to date.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, PgStoreOptions::default()).await
    }

    /// As [`PgStore::open`], with `options`.
    ///
    /// The lock and idle-transaction timeouts are always this store's own,
    /// whatever the URL's `options` parameter sets. Replicas starting at once
    /// may all run the migrations: sqlx serialises them with a lock of its own.
    pub async fn open_with(url: &str, options: PgStoreOptions) -> Result<Self, StoreError> {
        let PgStoreOptions {
            max_connections,
            acquire_timeout,
        } = options;
        // Appended after the URL's own options, so these win.
        let connect = PgConnectOptions::from_str(url).map_err(db)?.options([
            ("lock_timeout", LOCK_TIMEOUT),
            (
                "idle_in_transaction_session_timeout",
                IDLE_IN_TRANSACTION_TIMEOUT,
            ),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(db)?;
        MIGRATOR.run(&pool).await.map_err(migrate)?;
        Ok(Self { pool })
    }

    /// Waits for calls in progress, then closes every connection. Calls made
    /// after this fail with [`StoreError::Unavailable`].
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
        ops::insert_keks_unchecked(self.begin_org_write(org).await?, org, &keks).await
    }

    /// A write transaction holding `org`'s writer lock (see the module docs).
    /// Dropping it without committing rolls it back, so an early `?` return
    /// writes nothing.
    async fn begin_org_write(&self, org: &OrgId) -> Result<PgTx, StoreError> {
        let mut tx = self.begin_write().await?;
        // Hashed by the server rather than here, so that every replica
        // computes the same key whatever its build.
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(ORG_LOCK_CLASS)
            .bind(org.as_str())
            .execute(&mut *tx.0)
            .await
            .map_err(db)?;
        Ok(tx)
    }

    /// A write transaction that is no org's.
    async fn begin_write(&self) -> Result<PgTx, StoreError> {
        self.pool
            .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await
            .map(PgTx)
            .map_err(db)
    }

    /// A read of several statements from one snapshot.
    async fn begin_read(&self) -> Result<PgTx, StoreError> {
        self.pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map(PgTx)
            .map_err(db)
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    async fn load_org(&self, org: &OrgId) -> Result<Option<StoredOrg>, StoreError> {
        ops::load_org(self.begin_read().await?, org).await
    }

    async fn commit(&self, commit: Commit) -> Result<u64, StoreError> {
        ops::commit(self.begin_org_write(&commit.org).await?, commit).await
    }

    async fn append_audit(
        &self,
        org: &OrgId,
        events: Vec<NewAuditEvent>,
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        ops::append_audit(self.begin_org_write(org).await?, org, events).await
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
             FROM audit WHERE org = $1 AND seq > $2 ORDER BY seq LIMIT $3",
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
        let handles = [handle.to_owned()];
        delete_intents(&mut *self.pool.acquire().await.map_err(db)?, &handles).await
    }

    async fn claim_abandoned_import(&self, handle: &str) -> Result<bool, StoreError> {
        let claimed = sqlx::query("UPDATE intents SET kind = $1 WHERE handle = $2 AND kind = $3")
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
        read_generic_key(&mut *self.pool.acquire().await.map_err(db)?, Lock::None).await
    }

    async fn put_generic_key(&self, key: GenericKey) -> Result<GenericKey, StoreError> {
        ops::put_generic_key(self.begin_write().await?, key).await
    }

    async fn orgs_with_expired_keys(&self, now: Timestamp) -> Result<Vec<OrgId>, StoreError> {
        sqlx::query(
            "SELECT DISTINCT org FROM keys \
             WHERE state IN ($1, $2) AND expires_at <= $3 ORDER BY org",
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
        sqlx::query("SELECT DISTINCT org FROM keys WHERE handle = $1 AND state <> $2 ORDER BY org")
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
             WHERE aws_key_arn IS NOT NULL AND state <> $1 ORDER BY org, position"
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
        ops::insert_kek(
            self.begin_org_write(org).await?,
            org,
            org_version,
            kek,
            audit,
        )
        .await
    }

    async fn kek(&self, org: &OrgId, id: &KekId) -> Result<Option<StoredKek>, StoreError> {
        sqlx::query(
            "SELECT kek_id, resource, key_id, wrapped, created_at FROM keks \
             WHERE org = $1 AND kek_id = $2",
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
            "SELECT key_id, keks FROM kek_counts WHERE org = $1 AND keks > 0 ORDER BY key_id",
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
        // beginning, and a plain bound lets the scan start inside the primary
        // key instead of at the org's first KEK on every page.
        sqlx::query(
            "SELECT kek_id, resource, key_id, wrapped, created_at FROM keks \
             WHERE org = $1 AND kek_id > $2 AND key_id <> $3 \
             ORDER BY kek_id LIMIT $4",
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
        ops::rewrap_keks(
            self.begin_org_write(org).await?,
            org,
            org_version,
            job,
            &rewraps,
        )
        .await
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
        // Racing inserts of a free lease meet on the primary key: one
        // inserts, the others wait for it and then evaluate the WHERE against
        // its row, which is unexpired and not theirs. That re-check is READ
        // COMMITTED's; at a stricter default level the losers would fail with
        // a serialisation error instead, so the level is named here too.
        // clock_timestamp(), not now(): the statement's time, not the
        // transaction's start.
        let mut tx = self.begin_write().await?;
        let granted = sqlx::query(
            "WITH now AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ms) \
             INSERT INTO leases (name, holder, expires_at) \
             SELECT $1, $2, now.ms + $3 FROM now \
             ON CONFLICT (name) DO UPDATE \
             SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder \
                OR leases.expires_at <= (SELECT ms FROM now) \
             RETURNING holder",
        )
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
        // READ COMMITTED for the reason `acquire_lease` gives.
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&mut *tx.0)
            .await
            .map_err(db)?;
        tx.commit().await
    }
}

/// One transaction on the database; see [`PgStore::begin_org_write`] for
/// the lock an org's write holds.
struct PgTx(Transaction<'static, Postgres>);

#[async_trait::async_trait]
impl Tx for PgTx {
    async fn commit(self) -> Result<(), StoreError> {
        self.0.commit().await.map_err(db)
    }

    async fn org(&mut self, org: &OrgId) -> Result<Option<(bool, u64)>, StoreError> {
        sqlx::query("SELECT byok, version FROM orgs WHERE org = $1")
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
            "INSERT INTO orgs (org, byok, version) VALUES ($1, $2, 1) \
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
            sqlx::query("UPDATE orgs SET version = $1, byok = $2 WHERE org = $3 AND version = $4")
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
        sqlx::query_scalar("SELECT version FROM orgs WHERE org = $1")
            .bind(org.as_str())
            .fetch_optional(&mut *self.0)
            .await
            .map_err(db)
    }

    async fn keys(&mut self, org: &OrgId) -> Result<Vec<StoredKey>, StoreError> {
        sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE org = $1 ORDER BY position"
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
             VALUES ($1, $2, (SELECT coalesce(max(position), 0) + 1 FROM keys WHERE org = $1), \
                     $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
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
             FROM audit WHERE org = $1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(org.as_str())
        .fetch_optional(&mut *self.0)
        .await
        .map_err(db)?
        .as_ref()
        .map(decode_audit)
        .transpose()
    }

    /// One statement, in seq order: the table's trigger checks each row
    /// against the one before it.
    async fn insert_audit(&mut self, events: &[ChainedEvent]) -> Result<(), StoreError> {
        let column = || events.iter().map(|c| &c.event);
        sqlx::query(
            "INSERT INTO audit (org, seq, time, actor, key, action, result, prev_hash, hash) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::text[], \
                                  $5::text[], $6::text[], $7::text[], $8::bytea[], $9::bytea[]) \
                  AS e (org, seq, time, actor, key, action, result, prev_hash, hash) \
             ORDER BY e.seq",
        )
        .bind(column().map(|e| e.org.as_str()).collect::<Vec<_>>())
        .bind(
            column()
                .map(|e| sql::sql_int(e.seq))
                .collect::<Result<Vec<_>, _>>()?,
        )
        .bind(column().map(|e| e.time.0).collect::<Vec<_>>())
        .bind(column().map(|e| e.actor.as_str()).collect::<Vec<_>>())
        .bind(column().map(|e| e.key.as_deref()).collect::<Vec<_>>())
        .bind(column().map(|e| e.action.as_str()).collect::<Vec<_>>())
        .bind(column().map(|e| e.result.as_str()).collect::<Vec<_>>())
        .bind(events.iter().map(|c| &c.prev_hash[..]).collect::<Vec<_>>())
        .bind(events.iter().map(|c| &c.hash[..]).collect::<Vec<_>>())
        .execute(&mut *self.0)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn insert_intent(&mut self, intent: &Intent) -> Result<(), StoreError> {
        insert_intent(&mut self.0, intent).await
    }

    async fn resolve_import_intents(&mut self, handles: &[String]) -> Result<u64, StoreError> {
        if handles.is_empty() {
            return Ok(0);
        }
        // A row that repair claimed meanwhile is re-checked after its lock is
        // released, and no longer matches.
        let resolved = sqlx::query("DELETE FROM intents WHERE handle = ANY($1) AND kind = $2")
            .bind(handles)
            .bind(codec::intent_kind(IntentKind::Import))
            .execute(&mut *self.0)
            .await
            .map_err(db)?;
        Ok(resolved.rows_affected())
    }

    async fn latest_job(&mut self, org: &OrgId) -> Result<Option<RotationJob>, StoreError> {
        sqlx::query(
            "SELECT org, job, target, total, done, started_at, ended_at, state \
             FROM rotation_jobs WHERE org = $1 ORDER BY job DESC LIMIT 1",
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
            "SELECT key_id FROM rotation_job_from WHERE org = $1 AND job = $2 ORDER BY position",
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
             FROM rotation_jobs WHERE state = $1 ORDER BY org",
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
             WHERE j.state = $1 ORDER BY f.org, f.job, f.position",
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
            "UPDATE rotation_jobs SET state = $1, ended_at = $2 WHERE org = $3 AND state = $4",
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
             VALUES ($1, (SELECT coalesce(max(job), 0) + 1 FROM rotation_jobs WHERE org = $1), \
                     $2, $3, 0, $4, NULL, $5) \
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
        sqlx::query(
            "INSERT INTO rotation_job_from (org, job, position, key_id) \
             SELECT $1, $2, f.position, f.key_id \
             FROM UNNEST($3::text[]) WITH ORDINALITY AS f (key_id, position)",
        )
        .bind(org.as_str())
        .bind(job)
        .bind(from.iter().map(|k| k.0.as_str()).collect::<Vec<_>>())
        .execute(&mut *self.0)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn finish_job(
        &mut self,
        org: &OrgId,
        job: i64,
        at: Timestamp,
    ) -> Result<bool, StoreError> {
        let finished = sqlx::query(
            "UPDATE rotation_jobs SET state = $1, ended_at = $2 \
             WHERE org = $3 AND job = $4 AND state = $5",
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
            "SELECT EXISTS (SELECT 1 FROM rotation_jobs WHERE org = $1 AND job = $2 AND state = $3)",
        )
        .bind(org.as_str())
        .bind(job)
        .bind(codec::job_state(JobState::Running))
        .fetch_one(&mut *self.0)
        .await
        .map_err(db)
    }

    async fn add_done(&mut self, org: &OrgId, job: i64, n: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE rotation_jobs SET done = done + $1 WHERE org = $2 AND job = $3")
            .bind(n)
            .bind(org.as_str())
            .bind(job)
            .execute(&mut *self.0)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Read under the org's lock, so a racing insert for the resource has
    /// either committed (and is found) or not begun.
    async fn kek_for_resource(
        &mut self,
        org: &OrgId,
        resource: &ResourceId,
    ) -> Result<Option<StoredKek>, StoreError> {
        sqlx::query(
            "SELECT kek_id, resource, key_id, wrapped, created_at FROM keks \
             WHERE org = $1 AND resource = $2",
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
        for chunk in keks.chunks(ROWS_PER_STATEMENT) {
            sqlx::query(
                "INSERT INTO keks (org, kek_id, resource, key_id, wrapped, created_at) \
                 SELECT $1, k.kek_id, k.resource, k.key_id, k.wrapped, k.created_at \
                 FROM UNNEST($2::text[], $3::text[], $4::text[], $5::bytea[], $6::bigint[]) \
                      AS k (kek_id, resource, key_id, wrapped, created_at)",
            )
            .bind(org.as_str())
            .bind(chunk.iter().map(|k| k.id.as_str()).collect::<Vec<_>>())
            .bind(
                chunk
                    .iter()
                    .map(|k| k.resource.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(chunk.iter().map(|k| k.key.0.as_str()).collect::<Vec<_>>())
            .bind(
                chunk
                    .iter()
                    .map(|k| k.wrapped.as_slice())
                    .collect::<Vec<_>>(),
            )
            .bind(chunk.iter().map(|k| k.created_at.0).collect::<Vec<_>>())
            .execute(&mut *self.0)
            .await
            .map_err(db)?;
        }
        Ok(())
    }

    /// One statement however many re-wraps.
    async fn rewrite_keks(
        &mut self,
        org: &OrgId,
        from: &KeyId,
        to: &KeyId,
        rewraps: &[&Rewrap],
    ) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE keks SET key_id = $1, wrapped = v.wrapped \
             FROM UNNEST($2::text[], $3::bytea[]) AS v (kek_id, wrapped) \
             WHERE keks.org = $4 AND keks.kek_id = v.kek_id AND keks.key_id = $5",
        )
        .bind(to.0.as_str())
        .bind(rewraps.iter().map(|r| r.kek.as_str()).collect::<Vec<_>>())
        .bind(
            rewraps
                .iter()
                .map(|r| r.wrapped.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(org.as_str())
        .bind(from.0.as_str())
        .execute(&mut *self.0)
        .await
        .map_err(db)?
        .rows_affected())
    }

    async fn wraps_any_kek(&mut self, org: &OrgId, keys: &[KeyId]) -> Result<bool, StoreError> {
        if keys.is_empty() {
            return Ok(false);
        }
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM kek_counts \
                            WHERE org = $1 AND key_id = ANY($2) AND keks > 0)",
        )
        .bind(org.as_str())
        .bind(keys.iter().map(|k| k.0.as_str()).collect::<Vec<_>>())
        .fetch_one(&mut *self.0)
        .await
        .map_err(db)
    }

    async fn keks_not_wrapped_by(
        &mut self,
        org: &OrgId,
        target: &KeyId,
    ) -> Result<i64, StoreError> {
        // `sum` of bigint is numeric; the cast brings it back to the column's
        // type (and would fail, rather than wrap, past its range).
        sqlx::query_scalar(
            "SELECT coalesce(sum(keks), 0)::bigint FROM kek_counts \
             WHERE org = $1 AND key_id <> $2",
        )
        .bind(org.as_str())
        .bind(target.0.as_str())
        .fetch_one(&mut *self.0)
        .await
        .map_err(db)
    }

    async fn add_to_count(&mut self, org: &OrgId, key: &KeyId, n: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO kek_counts (org, key_id, keks) VALUES ($1, $2, $3) \
             ON CONFLICT (org, key_id) DO UPDATE SET keks = kek_counts.keks + excluded.keks",
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
            sqlx::query("UPDATE kek_counts SET keks = keks - $1 WHERE org = $2 AND key_id = $3")
                .bind(n)
                .bind(org.as_str())
                .bind(key.0.as_str())
                .execute(&mut *self.0)
                .await
                .map_err(db)?;
        Ok(updated.rows_affected() == 1)
    }

    async fn generic_key(&mut self, lock: Lock) -> Result<Option<GenericKey>, StoreError> {
        read_generic_key(&mut self.0, lock).await
    }

    /// A racing insert waits for the winner's row to commit, then inserts
    /// nothing.
    async fn insert_generic_key_if_absent(&mut self, key: &GenericKey) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO generic_key (id, handle, check_value, created_at) VALUES (1, $1, $2, $3) \
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
            "UPDATE generic_key SET handle = $1, check_value = $2, created_at = $3 WHERE id = 1",
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
             VALUES ($1, $2, $3)",
        )
        .bind(&key.handle)
        .bind(&key.check_value)
        .bind(key.created_at.0)
        .execute(&mut *self.0)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// A racing delete of the same key waits for this one's commit and then
    /// finds no row.
    async fn delete_retired_generic_key(&mut self, handle: &str) -> Result<bool, StoreError> {
        let deleted = sqlx::query("DELETE FROM retired_generic_keys WHERE handle = $1")
            .bind(handle)
            .execute(&mut *self.0)
            .await
            .map_err(db)?;
        Ok(deleted.rows_affected() == 1)
    }

    /// No lock covers every org here: a key record committed after this read
    /// is ordered after the caller's drop, as it would be had it waited for
    /// SQLite's write lock.
    async fn handle_in_use(&mut self, handle: &str) -> Result<bool, StoreError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM keys WHERE handle = $1 AND state <> $2) \
                 OR EXISTS (SELECT 1 FROM generic_key WHERE handle = $1)",
        )
        .bind(handle)
        .bind(codec::key_state(KeyState::Removed))
        .fetch_one(&mut *self.0)
        .await
        .map_err(db)
    }
}

async fn insert_intent(conn: &mut PgConnection, intent: &Intent) -> Result<(), StoreError> {
    let Intent {
        handle,
        kind,
        org,
        created_at,
    } = intent;
    sqlx::query("INSERT INTO intents (handle, kind, org, created_at) VALUES ($1, $2, $3, $4)")
        .bind(handle.as_str())
        .bind(codec::intent_kind(*kind))
        .bind(org.as_ref().map(OrgId::as_str))
        .bind(created_at.0)
        .execute(conn)
        .await
        .map_err(db)?;
    Ok(())
}

async fn delete_intents(conn: &mut PgConnection, handles: &[String]) -> Result<(), StoreError> {
    if handles.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM intents WHERE handle = ANY($1)")
        .bind(handles)
        .execute(conn)
        .await
        .map_err(db)?;
    Ok(())
}

async fn read_generic_key(
    conn: &mut PgConnection,
    lock: Lock,
) -> Result<Option<GenericKey>, StoreError> {
    let query = match lock {
        Lock::None => "SELECT handle, check_value, created_at FROM generic_key WHERE id = 1",
        Lock::Share => {
            "SELECT handle, check_value, created_at FROM generic_key WHERE id = 1 FOR SHARE"
        }
        Lock::ForUpdate => {
            "SELECT handle, check_value, created_at FROM generic_key WHERE id = 1 FOR UPDATE"
        }
    };
    sqlx::query(query)
        .fetch_optional(conn)
        .await
        .map_err(db)?
        .as_ref()
        .map(|row| decode_generic_key(row, "generic_key"))
        .transpose()
}

/// SQLSTATEs by which PostgreSQL reports that stored data or an index is
/// damaged.
const DATA_CORRUPTED: &str = "XX001";
const INDEX_CORRUPTED: &str = "XX002";

/// The one translation from sqlx's errors to the store's (see the module docs).
fn db(error: sqlx::Error) -> StoreError {
    match &error {
        _ if sql::is_decode_error(&error) => StoreError::Corrupt(error.to_string()),
        sqlx::Error::Database(e) if is_damaged(e.as_ref()) => {
            StoreError::Corrupt(error.to_string())
        }
        _ => StoreError::Unavailable(Box::new(error)),
    }
}

fn is_damaged(error: &dyn DatabaseError) -> bool {
    error
        .code()
        .is_some_and(|code| matches!(&*code, DATA_CORRUPTED | INDEX_CORRUPTED))
}

fn migrate(error: MigrateError) -> StoreError {
    sql::migrate_error(error, db)
}
