//! [`Store`](crate::Store) on a PostgreSQL database that several
//! control-plane replicas share: how it is connected to, and what
//! PostgreSQL does differently from SQLite (see `dialect.rs`). The
//! statements and operations are written once, for both SQL backends, in
//! `sql_store.rs` and `ops.rs`.
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

use cmk_control_plane_domain::{KeyId, OrgId, audit::ChainedEvent};
use sqlx::{
    PgConnection, Postgres,
    error::DatabaseError,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::{
    IntentKind, Rewrap, StoreError, StoredKek, codec,
    dialect::{Dialect, Stmt},
    ops::Lock,
    sql,
    sql_store::{SqlStore, db, migrate},
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// The first half of every org lock's key (the second is the hash of the org
/// id): an arbitrary constant, "cmko", that keeps these locks apart from any
/// other advisory lock taken in the database, such as sqlx's migration lock.
const ORG_LOCK_CLASS: i32 = 0x636d_6b6f;
/// The advisory-lock class of AWS key ARNs ("cmka").
const KEY_ARN_LOCK_CLASS: i32 = 0x636d_6b61;

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
pub type PgStore = SqlStore<Postgres>;

impl SqlStore<Postgres> {
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
        let connect = PgConnectOptions::from_str(url)
            .map_err(db::<Postgres>)?
            .options([
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
            .map_err(db::<Postgres>)?;
        MIGRATOR.run(&pool).await.map_err(migrate::<Postgres>)?;
        Ok(Self::new(pool))
    }
}

#[async_trait::async_trait]
impl Dialect for Postgres {
    /// The level is named, whatever the database's default (see the module
    /// docs).
    const BEGIN_WRITE: &'static str = "BEGIN ISOLATION LEVEL READ COMMITTED";
    const BEGIN_READ: &'static str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
    /// clock_timestamp(), not now(): the statement's time, not the
    /// transaction's start; read once, so that both uses agree.
    const ACQUIRE_LEASE: &'static str = "WITH now AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ms) \
         INSERT INTO leases (name, holder, expires_at) \
         SELECT $1, $2, now.ms + $3 FROM now \
         ON CONFLICT (name) DO UPDATE \
         SET holder = excluded.holder, expires_at = excluded.expires_at \
         WHERE leases.holder = excluded.holder \
            OR leases.expires_at <= (SELECT ms FROM now) \
         RETURNING holder";

    fn lock_clause(lock: Lock) -> &'static str {
        match lock {
            Lock::None => "",
            Lock::Share => " FOR SHARE",
            Lock::ForUpdate => " FOR UPDATE",
        }
    }

    fn is_damaged(error: &dyn DatabaseError) -> bool {
        error
            .code()
            .is_some_and(|code| matches!(&*code, DATA_CORRUPTED | INDEX_CORRUPTED))
    }

    async fn execute(conn: &mut PgConnection, stmt: &Stmt<'_>) -> Result<u64, sqlx::Error> {
        Ok(stmt.query().execute(conn).await?.rows_affected())
    }

    async fn fetch_optional(
        conn: &mut PgConnection,
        stmt: &Stmt<'_>,
    ) -> Result<Option<Self::Row>, sqlx::Error> {
        stmt.query().fetch_optional(conn).await
    }

    async fn fetch_all(
        conn: &mut PgConnection,
        stmt: &Stmt<'_>,
    ) -> Result<Vec<Self::Row>, sqlx::Error> {
        stmt.query().fetch_all(conn).await
    }

    /// The org's writer lock (see the module docs), hashed by the server
    /// rather than here, so that every replica computes the same key
    /// whatever its build.
    async fn lock_org(conn: &mut PgConnection, org: &OrgId) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(ORG_LOCK_CLASS)
            .bind(org.as_str())
            .execute(conn)
            .await
            .map_err(db::<Postgres>)?;
        Ok(())
    }

    async fn lock_key_arn(conn: &mut PgConnection, arn: &str) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(KEY_ARN_LOCK_CLASS)
            .bind(arn)
            .execute(conn)
            .await
            .map_err(db::<Postgres>)?;
        Ok(())
    }

    /// One statement, in seq order: the table's trigger checks each row
    /// against the one before it.
    async fn insert_audit(
        conn: &mut PgConnection,
        events: &[ChainedEvent],
    ) -> Result<(), StoreError> {
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
        .execute(conn)
        .await
        .map_err(db::<Postgres>)?;
        Ok(())
    }

    async fn resolve_import_intents(
        conn: &mut PgConnection,
        handles: &[String],
    ) -> Result<u64, StoreError> {
        if handles.is_empty() {
            return Ok(0);
        }
        // A row that repair claimed meanwhile is re-checked after its lock is
        // released, and no longer matches.
        let resolved = sqlx::query("DELETE FROM intents WHERE handle = ANY($1) AND kind = $2")
            .bind(handles)
            .bind(codec::intent_kind(IntentKind::Import))
            .execute(conn)
            .await
            .map_err(db::<Postgres>)?;
        Ok(resolved.rows_affected())
    }

    async fn insert_job_from(
        conn: &mut PgConnection,
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
        .execute(conn)
        .await
        .map_err(db::<Postgres>)?;
        Ok(())
    }

    async fn insert_keks(
        conn: &mut PgConnection,
        org: &OrgId,
        keks: &[StoredKek],
    ) -> Result<(), StoreError> {
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
            .execute(&mut *conn)
            .await
            .map_err(db::<Postgres>)?;
        }
        Ok(())
    }

    /// One statement however many re-wraps.
    async fn rewrite_keks(
        conn: &mut PgConnection,
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
        .execute(conn)
        .await
        .map_err(db::<Postgres>)?
        .rows_affected())
    }

    async fn wraps_any_kek(
        conn: &mut PgConnection,
        org: &OrgId,
        keys: &[KeyId],
    ) -> Result<bool, StoreError> {
        if keys.is_empty() {
            return Ok(false);
        }
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM kek_counts \
                            WHERE org = $1 AND key_id = ANY($2) AND keks > 0)",
        )
        .bind(org.as_str())
        .bind(keys.iter().map(|k| k.0.as_str()).collect::<Vec<_>>())
        .fetch_one(conn)
        .await
        .map_err(db::<Postgres>)
    }
}

/// SQLSTATEs by which PostgreSQL reports that stored data or an index is
/// damaged.
const DATA_CORRUPTED: &str = "XX001";
const INDEX_CORRUPTED: &str = "XX002";
