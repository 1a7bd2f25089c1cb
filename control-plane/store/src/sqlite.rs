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
    KeyId, KeyRecord, KeyState, OrgId, Timestamp,
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
    Commit, GenericKey, Intent, NewAuditEvent, Store, StoreError, StoredKey, StoredOrg, codec,
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
            .immutable(false);
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
        sqlx::query("SELECT handle, check_value, created_at FROM generic_key WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?
            .as_ref()
            .map(decode_generic_key)
            .transpose()
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
        let row =
            sqlx::query("SELECT handle, check_value, created_at FROM generic_key WHERE id = 1")
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
        let stored = decode_generic_key(&row)?;
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

fn decode_generic_key(row: &SqliteRow) -> Result<GenericKey, StoreError> {
    let cells = Cells::new(row, "generic_key");
    Ok(GenericKey {
        handle: cells.get("handle")?,
        check_value: cells.get("check_value")?,
        created_at: Timestamp(cells.get("created_at")?),
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
        parse: fn(&str, &str) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        parse(&self.column(name), self.get(name)?)
    }

    fn parse_optional<T>(
        &self,
        name: &str,
        parse: fn(&str, &str) -> Result<T, StoreError>,
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

    fn column(&self, name: &str) -> String {
        format!("{}.{name}", self.table)
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
