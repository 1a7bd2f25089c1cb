//! What really differs between the SQL databases the store runs on, as a
//! trait that each backend implements for its sqlx driver: how a
//! transaction begins, how a read locks a row, how the database reports a
//! damaged file, and the statements that write a batch of rows (SQLite's
//! multi-row `VALUES` and per-row loops, PostgreSQL's arrays and `UNNEST`).
//! Everything else — each operation's SQL, its parameters, the decoding of
//! its rows — is written once, in `sql_store.rs`, as a [`Stmt`] that both
//! databases accept: `$N` parameters, `ON CONFLICT`, `RETURNING`, `CAST`.

use std::borrow::Cow;

use cmk_control_plane_domain::{KeyId, OrgId, audit::ChainedEvent};
use sqlx::{Database, Encode, Type, error::DatabaseError, query::Query};

use crate::{Rewrap, StoreError, StoredKek, ops::Lock, sql::Columns};

/// One backend's SQL, for its sqlx driver (implemented on `sqlx::Sqlite` and
/// `sqlx::Postgres`). Public only in name: the module is private, so no
/// other crate can implement it.
#[async_trait::async_trait]
pub trait Dialect: Database<Row: Columns> {
    /// Begins a transaction that writes.
    const BEGIN_WRITE: &'static str;
    /// Begins a read of several statements from one snapshot.
    const BEGIN_READ: &'static str;
    /// Claims the lease `$1` for holder `$2` until `$3` milliseconds from now
    /// by the database's clock, unless another holder's time has not run
    /// out; returns a row if `$2` holds it afterwards.
    const ACQUIRE_LEASE: &'static str;

    /// What follows a `SELECT` of one row to take `lock` on it.
    fn lock_clause(lock: Lock) -> &'static str;

    /// Whether the database reports its data or file itself damaged.
    fn is_damaged(error: &dyn DatabaseError) -> bool;

    /// Runs `stmt`, returning how many rows it changed.
    async fn execute(conn: &mut Self::Connection, stmt: &Stmt<'_>) -> Result<u64, sqlx::Error>;
    /// Runs `stmt`, returning its row if it has one.
    async fn fetch_optional(
        conn: &mut Self::Connection,
        stmt: &Stmt<'_>,
    ) -> Result<Option<Self::Row>, sqlx::Error>;
    /// Runs `stmt`, returning its rows.
    async fn fetch_all(
        conn: &mut Self::Connection,
        stmt: &Stmt<'_>,
    ) -> Result<Vec<Self::Row>, sqlx::Error>;

    /// Keeps every other writer of `org` out until the transaction ends.
    async fn lock_org(conn: &mut Self::Connection, org: &OrgId) -> Result<(), StoreError>;

    /// Keeps every other transaction that registers the AWS key `arn` out
    /// until this one ends, so that two orgs cannot both take it.
    async fn lock_key_arn(conn: &mut Self::Connection, arn: &str) -> Result<(), StoreError>;

    /// As [`Tx::insert_audit`](crate::ops::Tx::insert_audit).
    async fn insert_audit(
        conn: &mut Self::Connection,
        events: &[ChainedEvent],
    ) -> Result<(), StoreError>;
    /// As [`Tx::resolve_import_intents`](crate::ops::Tx::resolve_import_intents).
    async fn resolve_import_intents(
        conn: &mut Self::Connection,
        handles: &[String],
    ) -> Result<u64, StoreError>;
    /// As [`Tx::insert_job_from`](crate::ops::Tx::insert_job_from).
    async fn insert_job_from(
        conn: &mut Self::Connection,
        org: &OrgId,
        job: i64,
        from: &[KeyId],
    ) -> Result<(), StoreError>;
    /// As [`Tx::insert_keks`](crate::ops::Tx::insert_keks).
    async fn insert_keks(
        conn: &mut Self::Connection,
        org: &OrgId,
        keks: &[StoredKek],
    ) -> Result<(), StoreError>;
    /// As [`Tx::rewrite_keks`](crate::ops::Tx::rewrite_keks).
    async fn rewrite_keks(
        conn: &mut Self::Connection,
        org: &OrgId,
        from: &KeyId,
        to: &KeyId,
        rewraps: &[&Rewrap],
    ) -> Result<u64, StoreError>;
    /// As [`Tx::wraps_any_kek`](crate::ops::Tx::wraps_any_kek).
    async fn wraps_any_kek(
        conn: &mut Self::Connection,
        org: &OrgId,
        keys: &[KeyId],
    ) -> Result<bool, StoreError>;
}

/// A statement with its parameters, written once for every backend.
#[derive(Debug)]
pub struct Stmt<'a> {
    sql: Cow<'static, str>,
    params: Vec<Param<'a>>,
}

/// One parameter of a [`Stmt`]: the types the store binds.
#[derive(Clone, Copy, Debug)]
enum Param<'a> {
    Text(&'a str),
    OptionalText(Option<&'a str>),
    Int(i64),
    OptionalInt(Option<i64>),
    Flag(bool),
    Bytes(&'a [u8]),
}

impl<'a> Stmt<'a> {
    /// `sql` with no parameters bound yet.
    pub(crate) fn new(sql: impl Into<Cow<'static, str>>) -> Self {
        Self {
            sql: sql.into(),
            params: Vec::new(),
        }
    }

    pub(crate) fn text(self, value: &'a str) -> Self {
        self.with(Param::Text(value))
    }

    pub(crate) fn optional_text(self, value: Option<&'a str>) -> Self {
        self.with(Param::OptionalText(value))
    }

    pub(crate) fn int(self, value: i64) -> Self {
        self.with(Param::Int(value))
    }

    pub(crate) fn optional_int(self, value: Option<i64>) -> Self {
        self.with(Param::OptionalInt(value))
    }

    pub(crate) fn flag(self, value: bool) -> Self {
        self.with(Param::Flag(value))
    }

    pub(crate) fn bytes(self, value: &'a [u8]) -> Self {
        self.with(Param::Bytes(value))
    }

    fn with(mut self, param: Param<'a>) -> Self {
        self.params.push(param);
        self
    }

    /// The sqlx query, its parameters bound in order; prepared once per
    /// connection (sqlx caches statements by their text).
    pub(crate) fn query<'q, DB>(&'q self) -> Query<'q, DB, DB::Arguments<'q>>
    where
        DB: Database,
        &'q str: Encode<'q, DB> + Type<DB>,
        Option<&'q str>: Encode<'q, DB> + Type<DB>,
        i64: Encode<'q, DB> + Type<DB>,
        Option<i64>: Encode<'q, DB> + Type<DB>,
        bool: Encode<'q, DB> + Type<DB>,
        &'q [u8]: Encode<'q, DB> + Type<DB>,
    {
        self.params
            .iter()
            .fold(sqlx::query(&self.sql), |query, param| match *param {
                Param::Text(v) => query.bind(v),
                Param::OptionalText(v) => query.bind(v),
                Param::Int(v) => query.bind(v),
                Param::OptionalInt(v) => query.bind(v),
                Param::Flag(v) => query.bind(v),
                Param::Bytes(v) => query.bind(v),
            })
    }
}
