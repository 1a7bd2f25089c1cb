//! The store on a SQL database, written once for every [`Dialect`]: the SQL
//! of each statement, the transaction each operation runs in, and the one
//! translation from sqlx's errors to the store's. What an operation of
//! several statements does with them is in `ops.rs`; what differs between
//! the databases is in `sqlite.rs` and `postgres.rs`.
//!
//! Each operation runs in one of three transactions, begun by the dialect's
//! statements: a *read* of several statements from one snapshot; a *write*
//! that is no org's (intents on their own, the generic default key, leases);
//! and an *org's write*, which first keeps every other writer of the org out
//! ([`Dialect::lock_org`]), so that its reads (the version, the audit
//! chain's head, the KEK counts) stay true until it commits.

use std::time::Duration;

use cmk_control_plane_domain::{
    KekId, KeyId, KeyRecord, OrgId, ResourceId, Timestamp, audit::ChainedEvent,
};
use sqlx::{Pool, Transaction, migrate::MigrateError};

use crate::{
    AuditStore, Commit, Corruption, GenericKey, GenericKeyStore, Intent, IntentKind, IntentStore,
    JobState, KekStore, LeaseStore, NewAuditEvent, OrgAwsKey, OrgStore, Rewrap, RotationJob,
    StoreError, StoredCheckpoint, StoredKek, StoredKey, StoredOrg,
    codec::{self, KeyColumns},
    dialect::{Dialect, Stmt},
    ops::{self, Lock, Tx},
    sql::{
        self, Cells, KEY_COLUMNS, decode_audit, decode_generic_key, decode_intent, decode_job,
        decode_kek, decode_key, decode_org_key,
    },
};

/// The metadata store on a database of the dialect `D`: [`SqliteStore`]
/// or [`PgStore`]. Cloning shares the connection pool.
///
/// [`SqliteStore`]: crate::SqliteStore
/// [`PgStore`]: crate::PgStore
#[derive(Debug)]
pub struct SqlStore<D: Dialect> {
    pool: Pool<D>,
}

impl<D: Dialect> Clone for SqlStore<D> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
        }
    }
}

impl<D: Dialect> SqlStore<D> {
    /// The store on `pool`, whose schema is up to date.
    pub(crate) fn new(pool: Pool<D>) -> Self {
        Self { pool }
    }

    /// The connection pool.
    #[cfg(test)]
    pub(crate) fn pool(&self) -> &Pool<D> {
        &self.pool
    }

    /// Waits for calls in progress, then closes every connection (for
    /// SQLite, which checkpoints the write-ahead log into the database
    /// file). Calls made after this fail with [`StoreError::Unavailable`].
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Stores many KEKs of the org in one transaction, for seeding a database
    /// in tests and benchmarks: unlike [`KekStore::insert_kek`] there is no
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

    /// A write transaction that keeps every other writer of `org` out until
    /// it ends. Dropping it without committing rolls it back, so an early
    /// `?` return writes nothing.
    async fn begin_org_write(&self, org: &OrgId) -> Result<SqlTx<D>, StoreError> {
        let mut tx = self.begin_write().await?;
        D::lock_org(&mut tx.0, org).await?;
        Ok(tx)
    }

    /// A write transaction that is no org's.
    async fn begin_write(&self) -> Result<SqlTx<D>, StoreError> {
        self.pool
            .begin_with(D::BEGIN_WRITE)
            .await
            .map(SqlTx)
            .map_err(db::<D>)
    }

    /// A read of several statements from one snapshot.
    async fn begin_read(&self) -> Result<SqlTx<D>, StoreError> {
        self.pool
            .begin_with(D::BEGIN_READ)
            .await
            .map(SqlTx)
            .map_err(db::<D>)
    }

    /// Runs `stmt` on a connection of the pool, outside any transaction.
    async fn execute(&self, stmt: Stmt<'_>) -> Result<u64, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db::<D>)?;
        D::execute(&mut conn, &stmt).await.map_err(db::<D>)
    }

    async fn fetch_optional(&self, stmt: Stmt<'_>) -> Result<Option<D::Row>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db::<D>)?;
        D::fetch_optional(&mut conn, &stmt).await.map_err(db::<D>)
    }

    async fn fetch_all(&self, stmt: Stmt<'_>) -> Result<Vec<D::Row>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db::<D>)?;
        D::fetch_all(&mut conn, &stmt).await.map_err(db::<D>)
    }
}

/// The columns of an audit row, as `decode_audit` reads them.
const AUDIT_COLUMNS: &str = "org, seq, time, actor, key, action, result, prev_hash, hash";

/// The newest audit row of `org`.
fn read_audit_head(org: &OrgId) -> Stmt<'_> {
    Stmt::new(format!(
        "SELECT {AUDIT_COLUMNS} FROM audit WHERE org = $1 ORDER BY seq DESC LIMIT 1"
    ))
    .text(org.as_str())
}

#[async_trait::async_trait]
impl<D: Dialect> OrgStore for SqlStore<D> {
    async fn load_org(&self, org: &OrgId) -> Result<Option<StoredOrg>, StoreError> {
        ops::load_org(self.begin_read().await?, org).await
    }

    async fn commit(&self, commit: Commit) -> Result<u64, StoreError> {
        ops::commit(self.begin_org_write(&commit.org).await?, commit).await
    }

    async fn orgs_with_expired_keys(&self, now: Timestamp) -> Result<Vec<OrgId>, StoreError> {
        self.fetch_all(
            Stmt::new(
                "SELECT DISTINCT org FROM keys \
                 WHERE state IN ($1, $2) AND expires_at <= $3 ORDER BY org",
            )
            .text(codec::DEACTIVATED)
            .text(codec::DELETED)
            .int(now.0),
        )
        .await?
        .iter()
        .map(|row| Cells::new(row, "keys").org("org"))
        .collect()
    }

    async fn aws_keys(&self) -> Result<Vec<OrgAwsKey>, StoreError> {
        self.fetch_all(
            Stmt::new(format!(
                "SELECT org, {KEY_COLUMNS} FROM keys \
                 WHERE aws_key_arn IS NOT NULL AND state <> $1 ORDER BY org, position"
            ))
            .text(codec::REMOVED),
        )
        .await?
        .iter()
        .map(decode_org_key)
        .collect()
    }

    async fn aws_external_id(
        &self,
        org: &OrgId,
        fresh: &str,
        now: Timestamp,
    ) -> Result<String, StoreError> {
        self.execute(
            Stmt::new(
                "INSERT INTO aws_external_ids (org, external_id, created_at) \
                 VALUES ($1, $2, $3) ON CONFLICT (org) DO NOTHING",
            )
            .text(org.as_str())
            .text(fresh)
            .int(now.0),
        )
        .await?;
        let row = self
            .fetch_optional(
                Stmt::new("SELECT external_id FROM aws_external_ids WHERE org = $1")
                    .text(org.as_str()),
            )
            .await?
            .ok_or(StoreError::Corrupt(Corruption::MissingRow {
                table: "aws_external_ids",
                what: "the org's external id, just written,",
            }))?;
        Cells::new(&row, "aws_external_ids").string("external_id")
    }
}

#[async_trait::async_trait]
impl<D: Dialect> AuditStore for SqlStore<D> {
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
        self.fetch_all(
            Stmt::new(format!(
                "SELECT {AUDIT_COLUMNS} FROM audit WHERE org = $1 AND seq > $2 ORDER BY seq LIMIT $3"
            ))
            .text(org.as_str())
            .int(after_seq)
            .int(i64::from(limit)),
        )
        .await?
        .iter()
        .map(decode_audit)
        .collect()
    }

    async fn audited_orgs(&self) -> Result<Vec<OrgId>, StoreError> {
        self.fetch_all(Stmt::new("SELECT DISTINCT org FROM audit ORDER BY org"))
            .await?
            .iter()
            .map(|row| Cells::new(row, "audit").org("org"))
            .collect()
    }

    async fn audit_head(&self, org: &OrgId) -> Result<Option<ChainedEvent>, StoreError> {
        self.fetch_optional(read_audit_head(org))
            .await?
            .as_ref()
            .map(decode_audit)
            .transpose()
    }

    async fn put_checkpoint(&self, checkpoint: &StoredCheckpoint) -> Result<(), StoreError> {
        self.execute(
            Stmt::new(
                "INSERT INTO audit_checkpoints (org, seq, head, time, key_id, signature) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (org, seq) DO NOTHING",
            )
            .text(checkpoint.org.as_str())
            .int(sql::sql_int(checkpoint.seq)?)
            .bytes(&checkpoint.head)
            .int(checkpoint.time.0)
            .text(&checkpoint.key_id)
            .bytes(&checkpoint.signature),
        )
        .await
        .map(drop)
    }

    async fn checkpoints(
        &self,
        org: &OrgId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredCheckpoint>, StoreError> {
        let Ok(after_seq) = i64::try_from(after_seq) else {
            return Ok(Vec::new());
        };
        self.fetch_all(
            Stmt::new(
                "SELECT org, seq, head, time, key_id, signature FROM audit_checkpoints \
                 WHERE org = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            )
            .text(org.as_str())
            .int(after_seq)
            .int(i64::from(limit)),
        )
        .await?
        .iter()
        .map(|row| {
            let cells = Cells::new(row, "audit_checkpoints");
            Ok(StoredCheckpoint {
                org: cells.org("org")?,
                seq: cells.unsigned("seq")?,
                head: cells.hash("head")?,
                time: cells.timestamp("time")?,
                key_id: cells.string("key_id")?,
                signature: cells.bytes("signature")?,
            })
        })
        .collect()
    }

    async fn orgs_needing_checkpoint(&self) -> Result<Vec<OrgId>, StoreError> {
        self.fetch_all(Stmt::new(
            "SELECT a.org FROM (SELECT org, MAX(seq) AS newest FROM audit GROUP BY org) a \
             LEFT JOIN (SELECT org, MAX(seq) AS covered FROM audit_checkpoints GROUP BY org) c \
             ON c.org = a.org WHERE c.covered IS NULL OR c.covered < a.newest ORDER BY a.org",
        ))
        .await?
        .iter()
        .map(|row| Cells::new(row, "audit").org("org"))
        .collect()
    }
}

#[async_trait::async_trait]
impl<D: Dialect> IntentStore for SqlStore<D> {
    async fn record_intent(&self, intent: Intent) -> Result<(), StoreError> {
        self.execute(insert_intent(&intent)).await.map(drop)
    }

    async fn resolve_intent(&self, handle: &str) -> Result<(), StoreError> {
        self.execute(Stmt::new("DELETE FROM intents WHERE handle = $1").text(handle))
            .await
            .map(drop)
    }

    async fn open_intents(&self) -> Result<Vec<Intent>, StoreError> {
        self.fetch_all(Stmt::new(
            "SELECT handle, kind, org, created_at FROM intents ORDER BY created_at, id",
        ))
        .await?
        .iter()
        .map(decode_intent)
        .collect()
    }

    async fn claim_abandoned_import(&self, handle: &str) -> Result<bool, StoreError> {
        let claimed = self
            .execute(
                Stmt::new("UPDATE intents SET kind = $1 WHERE handle = $2 AND kind = $3")
                    .text(codec::intent_kind(IntentKind::Destroy))
                    .text(handle)
                    .text(codec::intent_kind(IntentKind::Import)),
            )
            .await?;
        Ok(claimed == 1)
    }
}

#[async_trait::async_trait]
impl<D: Dialect> GenericKeyStore for SqlStore<D> {
    async fn generic_key(&self) -> Result<Option<GenericKey>, StoreError> {
        self.fetch_optional(read_generic_key::<D>(Lock::None))
            .await?
            .as_ref()
            .map(|row| decode_generic_key(row, "generic_key"))
            .transpose()
    }

    async fn put_generic_key(&self, key: GenericKey) -> Result<GenericKey, StoreError> {
        ops::put_generic_key(self.begin_write().await?, key).await
    }

    async fn renew_generic_key(
        &self,
        old_handle: &str,
        new: GenericKey,
    ) -> Result<GenericKey, StoreError> {
        ops::renew_generic_key(self.begin_write().await?, old_handle, new).await
    }

    async fn retired_generic_keys(&self) -> Result<Vec<GenericKey>, StoreError> {
        self.fetch_all(Stmt::new(
            "SELECT handle, check_value, created_at FROM retired_generic_keys \
             ORDER BY created_at, id",
        ))
        .await?
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
        self.fetch_all(
            Stmt::new(
                "SELECT DISTINCT org FROM keys WHERE handle = $1 AND state <> $2 ORDER BY org",
            )
            .text(handle)
            .text(codec::REMOVED),
        )
        .await?
        .iter()
        .map(|row| Cells::new(row, "keys").org("org"))
        .collect()
    }
}

#[async_trait::async_trait]
impl<D: Dialect> KekStore for SqlStore<D> {
    async fn insert_kek(
        &self,
        org: &OrgId,
        org_version: u64,
        kek: StoredKek,
        audit: Vec<NewAuditEvent>,
    ) -> Result<StoredKek, StoreError> {
        let tx = self.begin_org_write(org).await?;
        ops::insert_kek(tx, org, org_version, kek, audit).await
    }

    async fn kek(&self, org: &OrgId, id: &KekId) -> Result<Option<StoredKek>, StoreError> {
        self.fetch_optional(
            Stmt::new(
                "SELECT kek_id, resource, key_id, wrapped, created_at FROM keks \
                 WHERE org = $1 AND kek_id = $2",
            )
            .text(org.as_str())
            .text(id.as_str()),
        )
        .await?
        .as_ref()
        .map(decode_kek)
        .transpose()
    }

    async fn kek_counts(&self, org: &OrgId) -> Result<Vec<(KeyId, u64)>, StoreError> {
        self.fetch_all(
            Stmt::new(
                "SELECT key_id, keks FROM kek_counts WHERE org = $1 AND keks > 0 ORDER BY key_id",
            )
            .text(org.as_str()),
        )
        .await?
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
        // beginning; a plain bound (rather than `$2 IS NULL OR ...`) lets the
        // range start in the primary key instead of scanning the org from
        // its first KEK on every page.
        self.fetch_all(
            Stmt::new(
                "SELECT kek_id, resource, key_id, wrapped, created_at FROM keks \
                 WHERE org = $1 AND kek_id > $2 AND key_id <> $3 \
                 ORDER BY kek_id LIMIT $4",
            )
            .text(org.as_str())
            .text(after.map_or("", KekId::as_str))
            .text(target.0.as_str())
            .int(i64::from(limit)),
        )
        .await?
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
        let tx = self.begin_org_write(org).await?;
        ops::rewrap_keks(tx, org, org_version, job, &rewraps).await
    }

    async fn latest_rotation(&self, org: &OrgId) -> Result<Option<RotationJob>, StoreError> {
        ops::latest_rotation(self.begin_read().await?, org).await
    }

    async fn running_rotations(&self) -> Result<Vec<RotationJob>, StoreError> {
        ops::running_rotations(self.begin_read().await?).await
    }
}

#[async_trait::async_trait]
impl<D: Dialect> LeaseStore for SqlStore<D> {
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        // In a write transaction: for SQLite, a lone upsert would read under
        // a shared lock and could fail with SQLITE_BUSY_SNAPSHOT when it
        // upgrades, which the busy timeout does not retry; for PostgreSQL,
        // racing inserts of a free lease meet on the primary key and the
        // losers re-check the WHERE against the winner's row, which READ
        // COMMITTED does (a stricter level would fail them instead).
        let mut tx = self.begin_write().await?;
        let granted = tx
            .fetch_optional(
                Stmt::new(D::ACQUIRE_LEASE)
                    .text(name)
                    .text(holder)
                    .int(ops::millis(ttl)),
            )
            .await?
            .is_some();
        tx.commit().await?;
        Ok(granted)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        // In a write transaction for the reason `acquire_lease` gives.
        let mut tx = self.begin_write().await?;
        tx.execute(
            Stmt::new("DELETE FROM leases WHERE name = $1 AND holder = $2")
                .text(name)
                .text(holder),
        )
        .await?;
        tx.commit().await
    }
}

/// One transaction; see [`SqlStore::begin_org_write`] for the lock an
/// org's write holds.
pub(crate) struct SqlTx<D: Dialect>(Transaction<'static, D>);

impl<D: Dialect> SqlTx<D> {
    async fn execute(&mut self, stmt: Stmt<'_>) -> Result<u64, StoreError> {
        D::execute(&mut self.0, &stmt).await.map_err(db::<D>)
    }

    async fn fetch_optional(&mut self, stmt: Stmt<'_>) -> Result<Option<D::Row>, StoreError> {
        D::fetch_optional(&mut self.0, &stmt).await.map_err(db::<D>)
    }

    async fn fetch_all(&mut self, stmt: Stmt<'_>) -> Result<Vec<D::Row>, StoreError> {
        D::fetch_all(&mut self.0, &stmt).await.map_err(db::<D>)
    }

    /// A statement whose one row has the one column `value`.
    async fn fetch_int(&mut self, stmt: Stmt<'_>, table: &'static str) -> Result<i64, StoreError> {
        let row = self.fetch_one(stmt, table).await?;
        Cells::new(&row, table).int("value")
    }

    /// A statement whose one row has the one column `value`, a truth value.
    async fn fetch_flag(
        &mut self,
        stmt: Stmt<'_>,
        table: &'static str,
    ) -> Result<bool, StoreError> {
        let row = self.fetch_one(stmt, table).await?;
        Cells::new(&row, table).flag("value")
    }

    async fn fetch_one(
        &mut self,
        stmt: Stmt<'_>,
        table: &'static str,
    ) -> Result<D::Row, StoreError> {
        self.fetch_optional(stmt)
            .await?
            .ok_or(StoreError::Corrupt(Corruption::MissingRow {
                table,
                what: "the row a query of one row reads",
            }))
    }
}

#[async_trait::async_trait]
impl<D: Dialect> Tx for SqlTx<D> {
    async fn commit(self) -> Result<(), StoreError> {
        self.0.commit().await.map_err(db::<D>)
    }

    async fn org(&mut self, org: &OrgId) -> Result<Option<(bool, u64)>, StoreError> {
        self.fetch_optional(
            Stmt::new("SELECT byok, version FROM orgs WHERE org = $1").text(org.as_str()),
        )
        .await?
        .map(|row| {
            let cells = Cells::new(&row, "orgs");
            Ok((cells.flag("byok")?, cells.unsigned("version")?))
        })
        .transpose()
    }

    async fn create_org(&mut self, org: &OrgId, byok: bool) -> Result<bool, StoreError> {
        let created = self
            .execute(
                Stmt::new(
                    "INSERT INTO orgs (org, byok, version) VALUES ($1, $2, 1) \
                     ON CONFLICT (org) DO NOTHING",
                )
                .text(org.as_str())
                .flag(byok),
            )
            .await?;
        Ok(created == 1)
    }

    async fn advance_version(
        &mut self,
        org: &OrgId,
        expected: i64,
        next: i64,
        byok: bool,
    ) -> Result<bool, StoreError> {
        let updated = self
            .execute(
                Stmt::new(
                    "UPDATE orgs SET version = $1, byok = $2 WHERE org = $3 AND version = $4",
                )
                .int(next)
                .flag(byok)
                .text(org.as_str())
                .int(expected),
            )
            .await?;
        Ok(updated == 1)
    }

    async fn version(&mut self, org: &OrgId) -> Result<Option<i64>, StoreError> {
        self.fetch_optional(
            Stmt::new("SELECT version AS value FROM orgs WHERE org = $1").text(org.as_str()),
        )
        .await?
        .map(|row| Cells::new(&row, "orgs").int("value"))
        .transpose()
    }

    async fn keys(&mut self, org: &OrgId) -> Result<Vec<StoredKey>, StoreError> {
        self.fetch_all(
            Stmt::new(format!(
                "SELECT {KEY_COLUMNS} FROM keys WHERE org = $1 ORDER BY position"
            ))
            .text(org.as_str()),
        )
        .await?
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
                },
            handle,
            aws,
        } = key;
        let [aws_key_arn, aws_backup_key_arn, aws_role_arn] = sql::aws_columns(aws.as_ref());
        let KeyColumns {
            state,
            expires_at,
            needed,
            before_provider_revocation,
        } = KeyColumns::of(*state);
        self.execute(
            Stmt::new(
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
            .text(org.as_str())
            .text(id.0.as_str())
            .text(handle.as_str())
            .text(codec::key_source(*source))
            .text(state)
            .text(check_value.as_str())
            .int(created_at.0)
            .optional_int(activated_at.map(|t| t.0))
            .optional_int(revoked_at.map(|t| t.0))
            .optional_int(expires_at.map(|t| t.0))
            .flag(needed)
            .optional_text(before_provider_revocation)
            .optional_text(aws_key_arn)
            .optional_text(aws_backup_key_arn)
            .optional_text(aws_role_arn),
        )
        .await?;
        Ok(())
    }

    async fn audit_head(&mut self, org: &OrgId) -> Result<Option<ChainedEvent>, StoreError> {
        self.fetch_optional(read_audit_head(org))
            .await?
            .as_ref()
            .map(decode_audit)
            .transpose()
    }

    async fn insert_audit(&mut self, events: &[ChainedEvent]) -> Result<(), StoreError> {
        D::insert_audit(&mut self.0, events).await
    }

    async fn insert_intent(&mut self, intent: &Intent) -> Result<(), StoreError> {
        self.execute(insert_intent(intent)).await.map(drop)
    }

    async fn resolve_import_intents(&mut self, handles: &[String]) -> Result<u64, StoreError> {
        D::resolve_import_intents(&mut self.0, handles).await
    }

    async fn latest_job(&mut self, org: &OrgId) -> Result<Option<RotationJob>, StoreError> {
        self.fetch_optional(
            Stmt::new(
                "SELECT org, job, target, total, done, started_at, ended_at, state \
                 FROM rotation_jobs WHERE org = $1 ORDER BY job DESC LIMIT 1",
            )
            .text(org.as_str()),
        )
        .await?
        .as_ref()
        .map(decode_job)
        .transpose()
    }

    async fn job_from(&mut self, org: &OrgId, job: i64) -> Result<Vec<KeyId>, StoreError> {
        self.fetch_all(
            Stmt::new(
                "SELECT key_id FROM rotation_job_from \
                 WHERE org = $1 AND job = $2 ORDER BY position",
            )
            .text(org.as_str())
            .int(job),
        )
        .await?
        .iter()
        .map(sql::decode_from_key)
        .collect()
    }

    async fn running_jobs(&mut self) -> Result<Vec<RotationJob>, StoreError> {
        self.fetch_all(
            Stmt::new(
                "SELECT org, job, target, total, done, started_at, ended_at, state \
                 FROM rotation_jobs WHERE state = $1 ORDER BY org",
            )
            .text(codec::job_state(JobState::Running)),
        )
        .await?
        .iter()
        .map(decode_job)
        .collect()
    }

    async fn running_jobs_from(&mut self) -> Result<Vec<(String, u64, KeyId)>, StoreError> {
        self.fetch_all(
            Stmt::new(
                "SELECT f.org, f.job, f.key_id FROM rotation_job_from AS f \
                 JOIN rotation_jobs AS j ON j.org = f.org AND j.job = f.job \
                 WHERE j.state = $1 ORDER BY f.org, f.job, f.position",
            )
            .text(codec::job_state(JobState::Running)),
        )
        .await?
        .iter()
        .map(sql::decode_job_from)
        .collect()
    }

    async fn supersede_running_job(
        &mut self,
        org: &OrgId,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        self.execute(
            Stmt::new(
                "UPDATE rotation_jobs SET state = $1, ended_at = $2 WHERE org = $3 AND state = $4",
            )
            .text(codec::job_state(JobState::Superseded))
            .int(at.0)
            .text(org.as_str())
            .text(codec::job_state(JobState::Running)),
        )
        .await?;
        Ok(())
    }

    async fn insert_job(
        &mut self,
        org: &OrgId,
        target: &KeyId,
        total: i64,
        at: Timestamp,
    ) -> Result<i64, StoreError> {
        self.fetch_int(
            Stmt::new(
                "INSERT INTO rotation_jobs \
                     (org, job, target, total, done, started_at, ended_at, state) \
                 VALUES ($1, (SELECT coalesce(max(job), 0) + 1 FROM rotation_jobs WHERE org = $1), \
                         $2, $3, 0, $4, NULL, $5) \
                 RETURNING job AS value",
            )
            .text(org.as_str())
            .text(target.0.as_str())
            .int(total)
            .int(at.0)
            .text(codec::job_state(JobState::Running)),
            "rotation_jobs",
        )
        .await
    }

    async fn insert_job_from(
        &mut self,
        org: &OrgId,
        job: i64,
        from: &[KeyId],
    ) -> Result<(), StoreError> {
        D::insert_job_from(&mut self.0, org, job, from).await
    }

    async fn finish_job(
        &mut self,
        org: &OrgId,
        job: i64,
        at: Timestamp,
    ) -> Result<bool, StoreError> {
        let finished = self
            .execute(
                Stmt::new(
                    "UPDATE rotation_jobs SET state = $1, ended_at = $2 \
                     WHERE org = $3 AND job = $4 AND state = $5",
                )
                .text(codec::job_state(JobState::Finished))
                .int(at.0)
                .text(org.as_str())
                .int(job)
                .text(codec::job_state(JobState::Running)),
            )
            .await?;
        Ok(finished == 1)
    }

    async fn job_running(&mut self, org: &OrgId, job: i64) -> Result<bool, StoreError> {
        self.fetch_flag(
            Stmt::new(
                "SELECT EXISTS (SELECT 1 FROM rotation_jobs \
                                WHERE org = $1 AND job = $2 AND state = $3) AS value",
            )
            .text(org.as_str())
            .int(job)
            .text(codec::job_state(JobState::Running)),
            "rotation_jobs",
        )
        .await
    }

    async fn add_done(&mut self, org: &OrgId, job: i64, n: i64) -> Result<(), StoreError> {
        self.execute(
            Stmt::new("UPDATE rotation_jobs SET done = done + $1 WHERE org = $2 AND job = $3")
                .int(n)
                .text(org.as_str())
                .int(job),
        )
        .await?;
        Ok(())
    }

    /// Read under the org's lock, so a racing insert for the resource has
    /// either committed (and is found) or not begun.
    async fn kek_for_resource(
        &mut self,
        org: &OrgId,
        resource: &ResourceId,
    ) -> Result<Option<StoredKek>, StoreError> {
        self.fetch_optional(
            Stmt::new(
                "SELECT kek_id, resource, key_id, wrapped, created_at FROM keks \
                 WHERE org = $1 AND resource = $2",
            )
            .text(org.as_str())
            .text(resource.as_str()),
        )
        .await?
        .as_ref()
        .map(decode_kek)
        .transpose()
    }

    async fn insert_keks(&mut self, org: &OrgId, keks: &[StoredKek]) -> Result<(), StoreError> {
        D::insert_keks(&mut self.0, org, keks).await
    }

    async fn rewrite_keks(
        &mut self,
        org: &OrgId,
        from: &KeyId,
        to: &KeyId,
        rewraps: &[&Rewrap],
    ) -> Result<u64, StoreError> {
        D::rewrite_keks(&mut self.0, org, from, to, rewraps).await
    }

    async fn key_arn_taken(&mut self, org: &OrgId, arn: &str) -> Result<bool, StoreError> {
        D::lock_key_arn(&mut self.0, arn).await?;
        self.fetch_flag(
            Stmt::new(
                "SELECT EXISTS (SELECT 1 FROM keys WHERE aws_key_arn = $1 AND org <> $2 \
                                AND (state <> $3 OR needed)) AS value",
            )
            .text(arn)
            .text(org.as_str())
            .text(codec::REMOVED),
            "keys",
        )
        .await
    }

    async fn wraps_any_kek(&mut self, org: &OrgId, keys: &[KeyId]) -> Result<bool, StoreError> {
        D::wraps_any_kek(&mut self.0, org, keys).await
    }

    async fn keks_not_wrapped_by(
        &mut self,
        org: &OrgId,
        target: &KeyId,
    ) -> Result<i64, StoreError> {
        // PostgreSQL's `sum` of bigint is numeric; the cast brings it back to
        // the column's type (and would fail, rather than wrap, past its range).
        self.fetch_int(
            Stmt::new(
                "SELECT CAST(coalesce(sum(keks), 0) AS BIGINT) AS value FROM kek_counts \
                 WHERE org = $1 AND key_id <> $2",
            )
            .text(org.as_str())
            .text(target.0.as_str()),
            "kek_counts",
        )
        .await
    }

    async fn add_to_count(&mut self, org: &OrgId, key: &KeyId, n: i64) -> Result<(), StoreError> {
        self.execute(
            Stmt::new(
                "INSERT INTO kek_counts (org, key_id, keks) VALUES ($1, $2, $3) \
                 ON CONFLICT (org, key_id) DO UPDATE SET keks = kek_counts.keks + excluded.keks",
            )
            .text(org.as_str())
            .text(key.0.as_str())
            .int(n),
        )
        .await?;
        Ok(())
    }

    async fn remove_from_count(
        &mut self,
        org: &OrgId,
        key: &KeyId,
        n: i64,
    ) -> Result<bool, StoreError> {
        let updated = self
            .execute(
                Stmt::new("UPDATE kek_counts SET keks = keks - $1 WHERE org = $2 AND key_id = $3")
                    .int(n)
                    .text(org.as_str())
                    .text(key.0.as_str()),
            )
            .await?;
        Ok(updated == 1)
    }

    async fn generic_key(&mut self, lock: Lock) -> Result<Option<GenericKey>, StoreError> {
        self.fetch_optional(read_generic_key::<D>(lock))
            .await?
            .as_ref()
            .map(|row| decode_generic_key(row, "generic_key"))
            .transpose()
    }

    /// A racing insert waits for the winner's row to commit, then inserts
    /// nothing.
    async fn insert_generic_key_if_absent(&mut self, key: &GenericKey) -> Result<(), StoreError> {
        self.execute(
            Stmt::new(
                "INSERT INTO generic_key (id, handle, check_value, created_at) \
                 VALUES (1, $1, $2, $3) ON CONFLICT (id) DO NOTHING",
            )
            .text(&key.handle)
            .text(&key.check_value)
            .int(key.created_at.0),
        )
        .await?;
        Ok(())
    }

    async fn replace_generic_key(&mut self, key: &GenericKey) -> Result<(), StoreError> {
        self.execute(
            Stmt::new(
                "UPDATE generic_key SET handle = $1, check_value = $2, created_at = $3 \
                 WHERE id = 1",
            )
            .text(&key.handle)
            .text(&key.check_value)
            .int(key.created_at.0),
        )
        .await?;
        Ok(())
    }

    async fn retire_generic_key(&mut self, key: &GenericKey) -> Result<(), StoreError> {
        self.execute(
            Stmt::new(
                "INSERT INTO retired_generic_keys (handle, check_value, created_at) \
                 VALUES ($1, $2, $3)",
            )
            .text(&key.handle)
            .text(&key.check_value)
            .int(key.created_at.0),
        )
        .await?;
        Ok(())
    }

    /// A racing delete of the same key waits for this one's commit and then
    /// finds no row.
    async fn delete_retired_generic_key(&mut self, handle: &str) -> Result<bool, StoreError> {
        let deleted = self
            .execute(Stmt::new("DELETE FROM retired_generic_keys WHERE handle = $1").text(handle))
            .await?;
        Ok(deleted == 1)
    }

    /// No lock covers every org here: on PostgreSQL, a key record committed
    /// after this read is ordered after the caller's drop, as it would be
    /// had it waited for SQLite's write lock.
    async fn handle_in_use(&mut self, handle: &str) -> Result<bool, StoreError> {
        self.fetch_flag(
            Stmt::new(
                "SELECT (EXISTS (SELECT 1 FROM keys WHERE handle = $1 AND state <> $2) \
                         OR EXISTS (SELECT 1 FROM generic_key WHERE handle = $1)) AS value",
            )
            .text(handle)
            .text(codec::REMOVED),
            "keys",
        )
        .await
    }
}

/// Records `intent`; see [`Tx::insert_intent`].
fn insert_intent(intent: &Intent) -> Stmt<'_> {
    let Intent {
        handle,
        kind,
        org,
        created_at,
    } = intent;
    Stmt::new("INSERT INTO intents (handle, kind, org, created_at) VALUES ($1, $2, $3, $4)")
        .text(handle)
        .text(codec::intent_kind(*kind))
        .optional_text(org.as_ref().map(OrgId::as_str))
        .int(created_at.0)
}

/// Reads the generic default key, taking `lock` on its row where the
/// database has row locks (SQLite's write transactions hold the whole
/// database's write lock already).
fn read_generic_key<D: Dialect>(lock: Lock) -> Stmt<'static> {
    Stmt::new(format!(
        "SELECT handle, check_value, created_at FROM generic_key WHERE id = 1{}",
        D::lock_clause(lock)
    ))
}

/// The one translation from sqlx's errors to the store's: a value that does
/// not decode, or data the database reports damaged, is
/// [`StoreError::Corrupt`]; everything else the database reports (it cannot
/// be reached, a lock was not granted in time, the pool has no free
/// connection, a constraint refused the write) is
/// [`StoreError::Unavailable`] with the sqlx error as its source.
pub(crate) fn db<D: Dialect>(error: sqlx::Error) -> StoreError {
    match &error {
        _ if sql::is_decode_error(&error) => Corruption::Damaged(error).into(),
        sqlx::Error::Database(e) if D::is_damaged(e.as_ref()) => Corruption::Damaged(error).into(),
        _ => StoreError::Unavailable(Box::new(error)),
    }
}

/// A failed schema migration of a `D` database.
pub(crate) fn migrate<D: Dialect>(error: MigrateError) -> StoreError {
    sql::migrate_error(error, db::<D>)
}
