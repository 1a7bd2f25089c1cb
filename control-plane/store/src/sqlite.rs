//! [`Store`](crate::Store) on one SQLite database file: how the file is
//! opened, and what SQLite does differently from PostgreSQL (see
//! `dialect.rs`). The statements and operations are written once, for both
//! SQL backends, in `sql_store.rs` and `ops.rs`.
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

use cmk_control_plane_domain::{KeyId, OrgId, audit::ChainedEvent};
use sqlx::{
    Sqlite, SqliteConnection,
    error::DatabaseError,
    migrate::Migrator,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use crate::{
    IntentKind, Rewrap, StoreError, StoredKek, codec,
    dialect::{Dialect, Stmt},
    ops::Lock,
    sql,
    sql_store::{SqlStore, db, migrate},
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
pub type SqliteStore = SqlStore<Sqlite>;

impl SqlStore<Sqlite> {
    /// Opens the database at `url_or_path` — a `sqlite:` URL such as
    /// `sqlite:///var/lib/cmk/metadata.db`, or a plain file path — creating the
    /// file if it is missing and bringing its schema up to date.
    ///
    /// The journal mode, synchronous level, foreign keys, busy timeout and
    /// locking are always this store's own: a URL's `immutable=1`, which would
    /// turn off locking, is overridden.
    pub async fn open(url_or_path: &str) -> Result<Self, StoreError> {
        let options = if url_or_path.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url_or_path).map_err(db::<Sqlite>)?
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
            .map_err(db::<Sqlite>)?;
        MIGRATOR.run(&pool).await.map_err(migrate::<Sqlite>)?;
        Ok(Self::new(pool))
    }
}

#[async_trait::async_trait]
impl Dialect for Sqlite {
    /// Takes the write lock before reading anything (see the module docs).
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    const BEGIN_READ: &'static str = "BEGIN";
    /// 'now' is the same for every use within one statement. The database's
    /// clock in milliseconds since the Unix epoch: the Julian day number of
    /// 1970-01-01 is 2440587.5.
    const ACQUIRE_LEASE: &'static str = "INSERT INTO leases (name, holder, expires_at) \
         VALUES ($1, $2, CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) + $3) \
         ON CONFLICT (name) DO UPDATE \
         SET holder = excluded.holder, expires_at = excluded.expires_at \
         WHERE leases.holder = excluded.holder \
            OR leases.expires_at <= CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) \
         RETURNING holder";

    /// None: a write transaction already holds the database's write lock.
    fn lock_clause(_lock: Lock) -> &'static str {
        ""
    }

    fn is_damaged(error: &dyn DatabaseError) -> bool {
        error
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, SQLITE_CORRUPT | SQLITE_NOTADB))
    }

    async fn execute(conn: &mut SqliteConnection, stmt: &Stmt<'_>) -> Result<u64, sqlx::Error> {
        Ok(stmt.query().execute(conn).await?.rows_affected())
    }

    async fn fetch_optional(
        conn: &mut SqliteConnection,
        stmt: &Stmt<'_>,
    ) -> Result<Option<Self::Row>, sqlx::Error> {
        stmt.query().fetch_optional(conn).await
    }

    async fn fetch_all(
        conn: &mut SqliteConnection,
        stmt: &Stmt<'_>,
    ) -> Result<Vec<Self::Row>, sqlx::Error> {
        stmt.query().fetch_all(conn).await
    }

    /// Nothing to take: every write transaction holds the database's one
    /// write lock from its `BEGIN IMMEDIATE`.
    async fn lock_org(_conn: &mut SqliteConnection, _org: &OrgId) -> Result<(), StoreError> {
        Ok(())
    }

    /// `BEGIN IMMEDIATE` already keeps every other writer out.
    async fn lock_key_arn(_conn: &mut SqliteConnection, _arn: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn insert_audit(
        conn: &mut SqliteConnection,
        events: &[ChainedEvent],
    ) -> Result<(), StoreError> {
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
            .execute(&mut *conn)
            .await
            .map_err(db::<Sqlite>)?;
        }
        Ok(())
    }

    async fn resolve_import_intents(
        conn: &mut SqliteConnection,
        handles: &[String],
    ) -> Result<u64, StoreError> {
        let mut resolved = 0;
        for handle in handles {
            resolved += sqlx::query("DELETE FROM intents WHERE handle = ?1 AND kind = ?2")
                .bind(handle)
                .bind(codec::intent_kind(IntentKind::Import))
                .execute(&mut *conn)
                .await
                .map_err(db::<Sqlite>)?
                .rows_affected();
        }
        Ok(resolved)
    }

    async fn insert_job_from(
        conn: &mut SqliteConnection,
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
            .execute(&mut *conn)
            .await
            .map_err(db::<Sqlite>)?;
        }
        Ok(())
    }

    async fn insert_keks(
        conn: &mut SqliteConnection,
        org: &OrgId,
        keks: &[StoredKek],
    ) -> Result<(), StoreError> {
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
            query.execute(&mut *conn).await.map_err(db::<Sqlite>)?;
        }
        Ok(())
    }

    /// Multi-row statements: a statement costs a round trip to sqlx's
    /// connection thread, which for single-row updates took longer than
    /// SQLite's work on the row.
    async fn rewrite_keks(
        conn: &mut SqliteConnection,
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
                .execute(&mut *conn)
                .await
                .map_err(db::<Sqlite>)?
                .rows_affected();
        }
        Ok(moved)
    }

    async fn wraps_any_kek(
        conn: &mut SqliteConnection,
        org: &OrgId,
        keys: &[KeyId],
    ) -> Result<bool, StoreError> {
        for key in keys {
            let wraps: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM kek_counts \
                                WHERE org = ?1 AND key_id = ?2 AND keks > 0)",
            )
            .bind(org.as_str())
            .bind(key.0.as_str())
            .fetch_one(&mut *conn)
            .await
            .map_err(db::<Sqlite>)?;
            if wraps {
                return Ok(true);
            }
        }
        Ok(false)
    }
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
            conns.push(store.pool().acquire().await.unwrap());
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
        let mut conn = store.pool().acquire().await.unwrap();
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
