//! The control plane's metadata store.
//!
//! [`Store`] is deliberately narrow: load one org, commit one org's change
//! atomically (its keys, its settings, its audit events and its custody
//! intents together), read the audit log, and keep the intents that make HSM
//! calls repairable after a crash. It is the sum of one trait per role —
//! [`OrgStore`], [`AuditStore`], [`IntentStore`], [`GenericKeyStore`],
//! [`KekStore`] and [`LeaseStore`] — so that code which needs one role can
//! say so. Every implementation passes the same contract tests, one module
//! per role: [`SqliteStore`] on one database file, and [`PgStore`] on a
//! PostgreSQL database that several replicas can share.
//!
//! # One SQL store, two dialects
//!
//! Both are a [`SqlStore`]: each statement is written once (`sql_store.rs`),
//! each operation of several statements once (`ops.rs`), and what really
//! differs between the databases — how a transaction begins and locks, how a
//! batch of rows is written, how a damaged file is reported — is each
//! backend's `Dialect` (`sqlite.rs`, `postgres.rs`).
//!
//! # Crash repair: intents
//!
//! An HSM call and a database write cannot share a transaction, so each call
//! that creates or destroys custody material is bracketed by an [`Intent`]
//! keyed by the HSM handle, which the control plane chooses before the call:
//!
//! - **import/generate**: record an `Import` intent, call the HSM, then commit
//!   the new key *and* resolve the intent in one transaction. An `Import` intent
//!   left open longer than an import can take belongs to a call that never
//!   committed: repair first *claims* it (turns it into a `Destroy` intent, see
//!   [`IntentStore::claim_abandoned_import`]), then destroys the handle
//!   (idempotently) and resolves the intent. A commit resolves only an intent
//!   still open as an import, so of a slow import's commit and repair (another
//!   replica, a skewed clock) exactly one wins: the key is kept, or its
//!   material destroyed and the commit refused, never both.
//! - **removal**: commit the key's `Removed` state *and* a `Destroy` intent in
//!   one transaction, call HSM `Destroy`, then resolve the intent. Open
//!   `Destroy` intents are retried until the HSM confirms.
//!
//! The generic default key follows the import pattern through
//! [`GenericKeyStore::put_generic_key`]; when two instances generate one at once, the
//! loser's `Import` intent stays open and its unused material is destroyed by
//! the same repair.

#![forbid(unsafe_code)]

mod codec;
#[cfg(feature = "contract")]
pub mod contract;
mod dialect;
mod ops;
pub mod postgres;
mod sql;
mod sql_store;
pub mod sqlite;
#[cfg(feature = "contract")]
pub mod testdb;

use std::{sync::Arc, time::Duration};

use cmk_control_plane_domain::{
    KekId, KeyId, KeyRecord, Org, OrgId, ResourceId, Timestamp, audit::ChainedEvent,
};

pub use postgres::{PgStore, PgStoreOptions};
pub use sql_store::SqlStore;
pub use sqlite::SqliteStore;

/// One key of an org with the custody handle that holds its material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredKey {
    /// The lifecycle record.
    pub record: KeyRecord,
    /// The HSM daemon's handle (32 lower-case hex); the generic default key's
    /// records of every org share one.
    pub handle: String,
    /// For a key that stays in AWS KMS, the ARNs it was added with.
    pub aws: Option<AwsArns>,
}

/// Where a key in AWS KMS is, as the admin named it. Not secret: ARNs name
/// keys and roles, they grant nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsArns {
    /// The key every KEK is wrapped under.
    pub key_arn: String,
    /// A key (normally in another region) used when the primary's region fails.
    pub backup_key_arn: Option<String>,
    /// An IAM role the HSM daemon assumes to use the keys.
    pub role_arn: Option<String>,
}

/// A key in AWS KMS that is not removed, with its org.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrgAwsKey {
    /// The org.
    pub org: OrgId,
    /// The key; its `aws` is always set.
    pub key: StoredKey,
}

/// An org as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredOrg {
    /// The org.
    pub org: OrgId,
    /// Whether bring-your-own-key is switched on.
    pub byok: bool,
    /// Incremented by every commit; a commit names the version it read.
    pub version: u64,
    /// Every key, removed ones included, in the order they were added.
    pub keys: Vec<StoredKey>,
}

impl StoredOrg {
    /// The org as the lifecycle sees it.
    pub fn domain(&self) -> Org {
        Org::from_records(
            self.byok,
            self.keys.iter().map(|k| k.record.clone()).collect(),
        )
    }
}

/// An audit event before the store gives it a place in the org's chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewAuditEvent {
    /// When it happened.
    pub time: Timestamp,
    /// The caller's identity, or `service`.
    pub actor: String,
    /// The key concerned, if any.
    pub key: Option<String>,
    /// What was done.
    pub action: String,
    /// `ok`, or the code and message of the refusal.
    pub result: String,
}

/// What a custody call bracketed by an intent does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntentKind {
    /// Material is being imported or generated under the handle.
    Import,
    /// The handle's material must be destroyed.
    Destroy,
}

/// A custody call that may not have completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intent {
    /// The HSM handle (unique).
    pub handle: String,
    /// What the call does.
    pub kind: IntentKind,
    /// The org it is for; `None` for the service's own keys.
    pub org: Option<OrgId>,
    /// When it was recorded.
    pub created_at: Timestamp,
}

/// The service's generic default key, shared by every org without BYOK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenericKey {
    /// Its HSM handle.
    pub handle: String,
    /// Its check value.
    pub check_value: String,
    /// When it was generated.
    pub created_at: Timestamp,
}

/// A key-encryption key as stored: always wrapped by one of its org's CMKs.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredKek {
    /// Its id (unique across orgs: chosen at random).
    pub id: KekId,
    /// The resource it protects; one KEK per resource and org.
    pub resource: ResourceId,
    /// The CMK that wraps it.
    pub key: KeyId,
    /// The HSM daemon's Wrap ciphertext of the KEK (not secret, but opaque).
    pub wrapped: Vec<u8>,
    /// When it was created.
    pub created_at: Timestamp,
}

impl std::fmt::Debug for StoredKek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKek")
            .field("id", &self.id)
            .field("resource", &self.resource)
            .field("key", &self.key)
            .field("wrapped", &format_args!("[{} bytes]", self.wrapped.len()))
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// One KEK re-wrapped by a rotation job.
#[derive(Clone, PartialEq, Eq)]
pub struct Rewrap {
    /// The KEK.
    pub kek: KekId,
    /// The CMK it was wrapped by when read; the write happens only if it still is.
    pub from: KeyId,
    /// The CMK that wraps it now.
    pub to: KeyId,
    /// The new ciphertext.
    pub wrapped: Vec<u8>,
}

impl std::fmt::Debug for Rewrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewrap")
            .field("kek", &self.kek)
            .field("from", &self.from)
            .field("to", &self.to)
            .field("wrapped", &format_args!("[{} bytes]", self.wrapped.len()))
            .finish()
    }
}

/// Where a rotation job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Re-wrapping KEKs (or waiting: while the master is revoked it cannot wrap).
    Running,
    /// Every KEK is wrapped by the target and every key it rotated away from
    /// has left the rotating state.
    Finished,
    /// A newer activation started a job with another target, which took over.
    Superseded,
}

/// A rotation job: re-wrap every KEK of the org that is not wrapped by
/// `target` to `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RotationJob {
    /// The org.
    pub org: OrgId,
    /// Numbered from 1 within the org.
    pub id: u64,
    /// The key every KEK is re-wrapped to (the active key when the job started).
    pub target: KeyId,
    /// The rotating keys when the job started.
    pub from: Vec<KeyId>,
    /// KEKs not wrapped by `target` when the job started.
    pub total: u64,
    /// KEKs re-wrapped so far.
    pub done: u64,
    /// When it started.
    pub started_at: Timestamp,
    /// When it finished or was superseded.
    pub ended_at: Option<Timestamp>,
    /// Where it is.
    pub state: JobState,
}

/// A rotation job started or ended by a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RotationChange {
    /// Start a job towards `target` (the org's new active key), counting its
    /// total in the same transaction; a running job of the org is superseded
    /// (`ended_at` = `at`).
    Start {
        /// The new active key.
        target: KeyId,
        /// The rotating keys.
        from: Vec<KeyId>,
        /// Now.
        at: Timestamp,
    },
    /// The org's running job finished (`ended_at` = `at`).
    Finish {
        /// The job.
        job: u64,
        /// Now.
        at: Timestamp,
    },
}

/// One org's change, written all or nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// The org.
    pub org: OrgId,
    /// The version the change was computed from; `None` creates the org and
    /// fails with [`StoreError::Conflict`] if it exists.
    pub expected_version: Option<u64>,
    /// BYOK on or off after the change.
    pub byok: bool,
    /// Keys inserted or updated (matched by org and key id).
    pub keys: Vec<StoredKey>,
    /// Events appended to the org's audit chain, in order.
    pub audit: Vec<NewAuditEvent>,
    /// Intents recorded with the change; as with [`IntentStore::record_intent`], a
    /// handle that already has an open intent fails the whole commit.
    pub add_intents: Vec<Intent>,
    /// Handles whose `Import` intents the change resolves: the material
    /// imported under them becomes the org's. If one is no longer open (repair
    /// claimed it as abandoned and destroys its material), the commit fails
    /// with [`StoreError::IntentLost`] and writes nothing.
    pub resolve_intents: Vec<String>,
    /// A rotation job the change starts or ends.
    pub rotation: Option<RotationChange>,
    /// Keys that must wrap no KEK when the change commits (a rotating key
    /// becoming deactivated), counted inside the transaction; if one still
    /// does, the commit fails with [`StoreError::Conflict`] and writes nothing.
    pub require_unreferenced: Vec<KeyId>,
    /// The generic default key's handle, when the change gives the org a new
    /// record of it: the commit fails with [`StoreError::GenericKeyChanged`]
    /// unless it is still the current generic key, read under a lock that a
    /// renewal waits for. Otherwise a retired key could be dropped (and
    /// destroyed) between the caller's read and this commit.
    pub uses_generic: Option<String>,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer changed the org since it was read; reload and retry.
    #[error("organisation {0} was changed concurrently")]
    Conflict(OrgId),
    /// The database cannot be reached or refused the operation.
    #[error("metadata store unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Stored data does not decode (a bug, or tampering outside the service).
    #[error("stored data is corrupt: {0}")]
    Corrupt(Corruption),
    /// The import the change would keep took longer than repair waits for an
    /// import to finish; repair claimed it as abandoned and destroys its
    /// material, so nothing was committed.
    #[error(
        "the key import took too long to complete and was abandoned; nothing was stored: try again"
    )]
    IntentLost,
    /// The generic default key was renewed since the caller read it.
    #[error("the generic default key was renewed meanwhile; read it again")]
    GenericKeyChanged,
    /// The AWS KMS key is another organisation's: a key serves one org.
    #[error(
        "this AWS KMS key is registered by another organisation; a key in AWS KMS can serve \
         only one organisation"
    )]
    KeyArnTaken,
}

/// A column of a table, as corruption names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Column {
    /// The table.
    pub table: &'static str,
    /// The column.
    pub name: &'static str,
}

impl std::fmt::Display for Column {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.table, self.name)
    }
}

/// What is wrong with stored data: the store never wrote it so, so a bug or
/// a hand outside the service did.
#[derive(Debug, thiserror::Error)]
pub enum Corruption {
    /// An enumeration's text this release does not know.
    #[error("{column} has unknown value {value:?}")]
    UnknownValue {
        /// Where.
        column: Column,
        /// The text found.
        value: String,
    },
    /// An id the service would not accept.
    #[error("{column} {value:?}: {why}")]
    InvalidId {
        /// Where.
        column: Column,
        /// The text found.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A negative version, sequence number or count.
    #[error("{column} is negative: {value}")]
    Negative {
        /// Where.
        column: Column,
        /// The value found.
        value: i64,
    },
    /// A chain hash of the wrong length.
    #[error("{column} is {len} bytes, not a 32-byte hash")]
    HashLength {
        /// Where.
        column: Column,
        /// Its length.
        len: usize,
    },
    /// A value the rest of the row requires is missing.
    #[error("{column} is missing, but {because}")]
    MissingValue {
        /// Where.
        column: Column,
        /// Why it must be there.
        because: &'static str,
    },
    /// A value of the wrong SQL type, or a column the row lacks.
    #[error("{column}: {source}")]
    Undecodable {
        /// Where.
        column: Column,
        /// What the database driver said.
        #[source]
        source: sqlx::Error,
    },
    /// The database reports a value it cannot decode, or damaged pages.
    #[error("the database reports damaged data")]
    Damaged(#[source] sqlx::Error),
    /// A row that must exist is missing.
    #[error("{table}: {what} is missing")]
    MissingRow {
        /// The table.
        table: &'static str,
        /// Which row.
        what: &'static str,
    },
    /// An org's audit sequence reached the integer limit.
    #[error("audit.seq of org {0} is exhausted")]
    AuditSeqExhausted(OrgId),
    /// A counter beyond SQL's signed 64-bit range.
    #[error("counter {0} exceeds the database's integer range")]
    CounterRange(u64),
    /// KEKs wrapped by a key whose count is missing or too small.
    #[error("kek_counts: org {org} has KEKs wrapped by {key} but no count for them")]
    KekCountMissing {
        /// The org.
        org: OrgId,
        /// The wrapping key.
        key: KeyId,
    },
}

impl From<Corruption> for StoreError {
    fn from(corruption: Corruption) -> Self {
        Self::Corrupt(corruption)
    }
}

/// The control plane's metadata store: every role below, as one object.
///
/// Callers hold an `Arc<dyn Store>`; an implementation implements the role
/// traits and gets this one for free.
pub trait Store:
    OrgStore + AuditStore + IntentStore + GenericKeyStore + KekStore + LeaseStore + 'static
{
}

impl<T> Store for T where
    T: OrgStore + AuditStore + IntentStore + GenericKeyStore + KekStore + LeaseStore + 'static
{
}

/// An org's keys and settings: loading an org and committing its changes
/// atomically, and the store-wide questions the lifecycle asks about keys.
#[async_trait::async_trait]
pub trait OrgStore: Send + Sync {
    /// The org, or `None` if it was never enrolled.
    async fn load_org(&self, org: &OrgId) -> Result<Option<StoredOrg>, StoreError>;

    /// Applies `commit` atomically and returns the org's new version.
    async fn commit(&self, commit: Commit) -> Result<u64, StoreError>;

    /// Orgs with a deactivated or deleted key whose `expires_at <= now`, each
    /// once, in id order.
    async fn orgs_with_expired_keys(&self, now: Timestamp) -> Result<Vec<OrgId>, StoreError>;

    /// Every key with AWS ARNs in a state other than removed, by org id, each
    /// org's in the order they were added: what the provider health check
    /// asks the HSM daemon about.
    async fn aws_keys(&self) -> Result<Vec<OrgAwsKey>, StoreError>;

    /// The org's external id for AWS: the one stored, or `fresh`, stored now
    /// when there is none yet (racing callers all get the first one stored).
    /// Stored apart from the org's state: it neither enrols the org nor
    /// changes its version.
    async fn aws_external_id(
        &self,
        org: &OrgId,
        fresh: &str,
        now: Timestamp,
    ) -> Result<String, StoreError>;
}

/// Each org's hash-chained audit log.
#[async_trait::async_trait]
pub trait AuditStore: Send + Sync {
    /// Appends events that change no state (reads, refusals) to the org's chain.
    async fn append_audit(&self, org: &OrgId, events: Vec<NewAuditEvent>)
    -> Result<(), StoreError>;

    /// Up to `limit` events of the org with `seq > after_seq`, oldest first.
    async fn audit_events(
        &self,
        org: &OrgId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<ChainedEvent>, StoreError>;

    /// Every org that has an audit chain, for verification, in id order.
    async fn audited_orgs(&self) -> Result<Vec<OrgId>, StoreError>;

    /// The org's newest event.
    async fn audit_head(&self, org: &OrgId) -> Result<Option<ChainedEvent>, StoreError>;

    /// Stores a signed checkpoint; one already stored for the same seq is
    /// kept (the first signature of a head stands).
    async fn put_checkpoint(&self, checkpoint: &StoredCheckpoint) -> Result<(), StoreError>;

    /// Up to `limit` checkpoints of the org with `seq > after_seq`, oldest first.
    async fn checkpoints(
        &self,
        org: &OrgId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredCheckpoint>, StoreError>;

    /// Orgs whose newest event no checkpoint covers yet, in id order.
    async fn orgs_needing_checkpoint(&self) -> Result<Vec<OrgId>, StoreError>;
}

/// A signed checkpoint of an org's audit chain (see `cmk_proto::checkpoint`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCheckpoint {
    /// The org.
    pub org: OrgId,
    /// The seq of the newest event it covers.
    pub seq: u64,
    /// That event's hash.
    pub head: [u8; 32],
    /// When the HSM daemon signed it, by its clock.
    pub time: Timestamp,
    /// The id of the key that signed it.
    pub key_id: String,
    /// ECDSA P-256 `r ‖ s`.
    pub signature: Vec<u8>,
}

/// The intents that make custody calls repairable after a crash (see the
/// crate docs).
#[async_trait::async_trait]
pub trait IntentStore: Send + Sync {
    /// Records an intent on its own (before an import). A handle that already
    /// has an open intent is refused ([`StoreError::Unavailable`]): handles are
    /// chosen at random, so a repeat is a bug that repair must not paper over.
    async fn record_intent(&self, intent: Intent) -> Result<(), StoreError>;

    /// Resolves an intent on its own (after a destroy, or an import that failed).
    /// Resolving a handle with no open intent succeeds and changes nothing, so
    /// an interrupted repair can run again.
    async fn resolve_intent(&self, handle: &str) -> Result<(), StoreError>;

    /// Every open intent, oldest first (by `created_at`, then in the order
    /// recorded).
    async fn open_intents(&self) -> Result<Vec<Intent>, StoreError>;

    /// Turns the open `Import` intent of `handle` into a `Destroy` intent,
    /// for repair to destroy material whose import was abandoned; `false` if
    /// it is not open as an import any more (its commit resolved it, or
    /// another replica claimed it). After this, no commit can keep the
    /// material ([`Commit::resolve_intents`]).
    async fn claim_abandoned_import(&self, handle: &str) -> Result<bool, StoreError>;
}

/// The service's generic default key: stored once, renewed, and its retired
/// predecessors dropped once no org uses them.
#[async_trait::async_trait]
pub trait GenericKeyStore: Send + Sync {
    /// The generic default key, if generated.
    async fn generic_key(&self) -> Result<Option<GenericKey>, StoreError>;

    /// Stores the generic default key and resolves its import intent, unless
    /// one is already stored; returns the one that is.
    ///
    /// When another key is already stored, the given handle's `Import` intent
    /// is deliberately left open: that material is unused, and start-up repair
    /// destroys it. Putting the stored key again resolves its intent, so a
    /// retry after a lost reply is harmless.
    async fn put_generic_key(&self, key: GenericKey) -> Result<GenericKey, StoreError>;

    /// Replaces the generic default key `old_handle` with `new` (resolving the
    /// new key's import intent) and keeps the old one as retired, unless the
    /// stored key is no longer `old_handle`; returns the key stored afterwards.
    async fn renew_generic_key(
        &self,
        old_handle: &str,
        new: GenericKey,
    ) -> Result<GenericKey, StoreError>;

    /// Generic default keys replaced by a renewal whose material is not yet
    /// destroyed, oldest first.
    async fn retired_generic_keys(&self) -> Result<Vec<GenericKey>, StoreError>;

    /// Forgets a retired generic default key and records a `Destroy` intent for
    /// it, in one transaction, if no key record of any org in a state other
    /// than removed still uses its handle; returns whether it did.
    async fn drop_retired_generic_key(
        &self,
        handle: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError>;

    /// Orgs with a key record in a state other than removed that uses
    /// `handle`, each once, in id order.
    async fn orgs_using_handle(&self, handle: &str) -> Result<Vec<OrgId>, StoreError>;
}

/// Key-encryption keys, the CMKs that wrap them, and the rotation jobs that
/// re-wrap them.
#[async_trait::async_trait]
pub trait KekStore: Send + Sync {
    /// Stores a new KEK wrapped by the org's active key, with `audit` appended
    /// to the org's chain in the same transaction, unless the org already has
    /// a KEK for its resource (then nothing is written); returns the one stored
    /// for the resource. Fails with [`StoreError::Conflict`], writing nothing,
    /// if the org's version is no longer `org_version` (its keys changed since
    /// the caller chose the wrapping key).
    async fn insert_kek(
        &self,
        org: &OrgId,
        org_version: u64,
        kek: StoredKek,
        audit: Vec<NewAuditEvent>,
    ) -> Result<StoredKek, StoreError>;

    /// One KEK of the org.
    async fn kek(&self, org: &OrgId, id: &KekId) -> Result<Option<StoredKek>, StoreError>;

    /// How many KEKs each of the org's keys wraps; keys that wrap none are
    /// absent. In key id order.
    async fn kek_counts(&self, org: &OrgId) -> Result<Vec<(KeyId, u64)>, StoreError>;

    /// Up to `limit` KEKs of the org not wrapped by `target`, with ids after
    /// `after`, in id order.
    async fn keks_not_wrapped_by(
        &self,
        org: &OrgId,
        target: &KeyId,
        after: Option<&KekId>,
        limit: u32,
    ) -> Result<Vec<StoredKek>, StoreError>;

    /// Writes re-wrapped KEKs in one transaction, each only if it is still
    /// wrapped by its `from` key, and adds the number written to the org's
    /// running job `job`; returns that number. Fails with
    /// [`StoreError::Conflict`], writing nothing, if the org's version is no
    /// longer `org_version` or `job` is no longer running.
    async fn rewrap_keks(
        &self,
        org: &OrgId,
        org_version: u64,
        job: u64,
        rewraps: Vec<Rewrap>,
    ) -> Result<u64, StoreError>;

    /// The org's most recent rotation job.
    async fn latest_rotation(&self, org: &OrgId) -> Result<Option<RotationJob>, StoreError>;

    /// Every running rotation job, by org id.
    async fn running_rotations(&self) -> Result<Vec<RotationJob>, StoreError>;
}

/// Leases that keep replicas from doing the same work at once.
#[async_trait::async_trait]
pub trait LeaseStore: Send + Sync {
    /// Claims the lease `name` for `holder` until `ttl` from now by the
    /// database's clock, if no one holds it, its holder's time has run out,
    /// or `holder` holds it already (which renews it); returns whether
    /// `holder` holds it now. Of callers racing for a free lease, exactly
    /// one gets it.
    ///
    /// A lease keeps replicas from doing the same work at once; it is not
    /// what keeps the data right. A holder that stalls past its expiry may
    /// still be working when another takes over, so every write that work
    /// makes must be safe to race (as [`KekStore::rewrap_keks`] is).
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Gives up the lease `name` if `holder` holds it (expired or not);
    /// otherwise changes nothing.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;
}

/// Opens the store `url` names — `sqlite://path` (or `sqlite:path`) or
/// `postgres://…` (or `postgresql://…`) — and brings its schema up to date.
/// `options` apply to a PostgreSQL store; SQLite's pool is fixed (see
/// [`SqliteStore`]).
pub async fn open(url: &str, options: PgStoreOptions) -> Result<Arc<dyn Store>, StoreError> {
    match Backend::of(url) {
        Some(Backend::Sqlite) => Ok(Arc::new(SqliteStore::open(url).await?)),
        Some(Backend::Postgres) => Ok(Arc::new(PgStore::open_with(url, options).await?)),
        None => Err(StoreError::Unavailable(
            format!(
                "{:?} is neither a sqlite:// nor a postgres:// URL",
                redact_url(url)
            )
            .into(),
        )),
    }
}

/// Which implementation a store URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite:`
    Sqlite,
    /// `postgres:` or `postgresql:`
    Postgres,
}

impl Backend {
    /// The backend of `url` by its scheme, or `None` for any other.
    pub fn of(url: &str) -> Option<Self> {
        let scheme = url.split_once(':')?.0;
        match scheme.to_ascii_lowercase().as_str() {
            "sqlite" => Some(Self::Sqlite),
            "postgres" | "postgresql" => Some(Self::Postgres),
            _ => None,
        }
    }
}

/// `url` with any password replaced by `***`, for messages and logs: a
/// PostgreSQL URL may carry one, in its user info
/// (`postgres://user:secret@host/db`) or as libpq's `password` parameter.
pub fn redact_url(url: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((userinfo, host)) if userinfo.contains(':') => {
                    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                    format!("{scheme}://{user}:***@{host}{path}")
                }
                _ => base.to_owned(),
            }
        }
        None => base.to_owned(),
    };
    if query.is_empty() {
        return base;
    }
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => p.to_owned(),
        })
        .collect();
    format!("{base}?{}", params.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_backend() {
        assert_eq!(
            Backend::of("sqlite:///var/lib/cmk.db"),
            Some(Backend::Sqlite)
        );
        assert_eq!(Backend::of("sqlite:cmk.db"), Some(Backend::Sqlite));
        assert_eq!(Backend::of("postgres://db/cmk"), Some(Backend::Postgres));
        assert_eq!(Backend::of("PostgreSQL://db/cmk"), Some(Backend::Postgres));
        assert_eq!(Backend::of("mysql://db/cmk"), None);
        assert_eq!(Backend::of("/var/lib/cmk.db"), None);
    }

    #[test]
    fn passwords_are_redacted_wherever_the_url_carries_them() {
        for (url, shown) in [
            (
                "postgres://cmk:s3cr3t@db:5432/cmk",
                "postgres://cmk:***@db:5432/cmk",
            ),
            (
                "postgres://cmk:p@ss@db/cmk?sslmode=verify-full",
                "postgres://cmk:***@db/cmk?sslmode=verify-full",
            ),
            (
                "postgres://db/cmk?user=cmk&password=s3cr3t",
                "postgres://db/cmk?user=cmk&password=***",
            ),
            ("postgres://cmk@db/cmk", "postgres://cmk@db/cmk"),
            ("sqlite:///var/lib/cmk.db", "sqlite:///var/lib/cmk.db"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
    }
}
