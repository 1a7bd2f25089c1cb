//! What the SQL statements share: decoding rows into the store's types,
//! extending an audit chain, and the bookkeeping of KEK batches.

use std::collections::{BTreeMap, HashMap};

use cmk_control_plane_domain::{
    KeyId, KeyRecord, OrgId, Timestamp,
    audit::{self, AuditEvent, ChainedEvent},
};
use sqlx::{ColumnIndex, Decode, Row, Type, migrate::MigrateError};

use crate::{
    AwsArns, Column, Corruption, GenericKey, Intent, NewAuditEvent, OrgAwsKey, Rewrap, RotationJob,
    StoreError, StoredKek, StoredKey,
    codec::{self, KeyColumns},
};

/// The column types the store reads, from a row of any database it supports.
pub trait Columns {
    fn text(&self, name: &'static str) -> Result<&str, sqlx::Error>;
    fn optional_text(&self, name: &'static str) -> Result<Option<&str>, sqlx::Error>;
    fn int(&self, name: &'static str) -> Result<i64, sqlx::Error>;
    fn optional_int(&self, name: &'static str) -> Result<Option<i64>, sqlx::Error>;
    fn flag(&self, name: &'static str) -> Result<bool, sqlx::Error>;
    fn bytes(&self, name: &'static str) -> Result<&[u8], sqlx::Error>;
}

impl<R> Columns for R
where
    R: Row,
    for<'n> &'n str: ColumnIndex<R>,
    for<'r> &'r str: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> &'r [u8]: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
{
    fn text(&self, name: &'static str) -> Result<&str, sqlx::Error> {
        self.try_get(name)
    }

    fn optional_text(&self, name: &'static str) -> Result<Option<&str>, sqlx::Error> {
        self.try_get(name)
    }

    fn int(&self, name: &'static str) -> Result<i64, sqlx::Error> {
        self.try_get(name)
    }

    fn optional_int(&self, name: &'static str) -> Result<Option<i64>, sqlx::Error> {
        self.try_get(name)
    }

    fn flag(&self, name: &'static str) -> Result<bool, sqlx::Error> {
        self.try_get(name)
    }

    fn bytes(&self, name: &'static str) -> Result<&[u8], sqlx::Error> {
        self.try_get(name)
    }
}

/// The columns of one row of `table`, decoded with errors that name the column.
pub(crate) struct Cells<'r, R> {
    row: &'r R,
    table: &'static str,
}

impl<'r, R: Columns> Cells<'r, R> {
    pub(crate) fn new(row: &'r R, table: &'static str) -> Self {
        Self { row, table }
    }

    pub(crate) fn text(&self, name: &'static str) -> Result<&'r str, StoreError> {
        self.row.text(name).map_err(|e| self.corrupt(name, e))
    }

    pub(crate) fn string(&self, name: &'static str) -> Result<String, StoreError> {
        self.text(name).map(str::to_owned)
    }

    pub(crate) fn optional_string(&self, name: &'static str) -> Result<Option<String>, StoreError> {
        self.optional_text(name).map(|t| t.map(str::to_owned))
    }

    pub(crate) fn key_id(&self, name: &'static str) -> Result<KeyId, StoreError> {
        self.string(name).map(KeyId)
    }

    /// A signed integer as stored (a count or number the caller converts).
    pub(crate) fn int(&self, name: &'static str) -> Result<i64, StoreError> {
        self.row.int(name).map_err(|e| self.corrupt(name, e))
    }

    pub(crate) fn timestamp(&self, name: &'static str) -> Result<Timestamp, StoreError> {
        self.row
            .int(name)
            .map(Timestamp)
            .map_err(|e| self.corrupt(name, e))
    }

    pub(crate) fn optional_timestamp(
        &self,
        name: &'static str,
    ) -> Result<Option<Timestamp>, StoreError> {
        self.row
            .optional_int(name)
            .map(|t| t.map(Timestamp))
            .map_err(|e| self.corrupt(name, e))
    }

    pub(crate) fn flag(&self, name: &'static str) -> Result<bool, StoreError> {
        self.row.flag(name).map_err(|e| self.corrupt(name, e))
    }

    pub(crate) fn bytes(&self, name: &'static str) -> Result<Vec<u8>, StoreError> {
        self.row
            .bytes(name)
            .map(<[u8]>::to_vec)
            .map_err(|e| self.corrupt(name, e))
    }

    pub(crate) fn parse<T>(
        &self,
        name: &'static str,
        parse: fn(Column, &str) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        parse(self.column(name), self.text(name)?)
    }

    pub(crate) fn parse_optional<T>(
        &self,
        name: &'static str,
        parse: fn(Column, &str) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        self.optional_text(name)?
            .map(|text| parse(self.column(name), text))
            .transpose()
    }

    pub(crate) fn org(&self, name: &'static str) -> Result<OrgId, StoreError> {
        self.parse(name, codec::parse_org)
    }

    pub(crate) fn unsigned(&self, name: &'static str) -> Result<u64, StoreError> {
        let value = self.row.int(name).map_err(|e| self.corrupt(name, e))?;
        codec::parse_unsigned(self.column(name), value)
    }

    pub(crate) fn hash(&self, name: &'static str) -> Result<[u8; 32], StoreError> {
        let bytes = self.row.bytes(name).map_err(|e| self.corrupt(name, e))?;
        codec::parse_hash(self.column(name), bytes)
    }

    pub(crate) fn optional_text(&self, name: &'static str) -> Result<Option<&'r str>, StoreError> {
        self.row
            .optional_text(name)
            .map_err(|e| self.corrupt(name, e))
    }

    fn corrupt(&self, name: &'static str, source: sqlx::Error) -> StoreError {
        Corruption::Undecodable {
            column: self.column(name),
            source,
        }
        .into()
    }

    /// `table.column`; formatted only if an error names it, since every
    /// decoded value passes one to its parser.
    fn column(&self, name: &'static str) -> Column {
        Column {
            table: self.table,
            name,
        }
    }
}

pub(crate) fn decode_key(row: &impl Columns) -> Result<StoredKey, StoreError> {
    let cells = Cells::new(row, "keys");
    Ok(StoredKey {
        record: KeyRecord {
            id: cells.key_id("key_id")?,
            source: cells.parse("source", codec::parse_key_source)?,
            state: KeyColumns {
                state: cells.text("state")?,
                expires_at: cells.optional_timestamp("expires_at")?,
                needed: cells.flag("needed")?,
                before_provider_revocation: cells.optional_text("before_provider_revocation")?,
            }
            .decode("keys")?,
            check_value: cells.string("check_value")?,
            created_at: cells.timestamp("created_at")?,
            activated_at: cells.optional_timestamp("activated_at")?,
            revoked_at: cells.optional_timestamp("revoked_at")?,
        },
        handle: cells.string("handle")?,
        aws: decode_aws(&cells)?,
    })
}

/// The columns [`decode_key`] reads, for a `SELECT` of keys.
pub(crate) const KEY_COLUMNS: &str = "key_id, handle, source, state, check_value, created_at, \
     activated_at, revoked_at, expires_at, needed, before_provider_revocation, \
     aws_key_arn, aws_backup_key_arn, aws_role_arn";

/// A key row with its org (the column `org`).
pub(crate) fn decode_org_key(row: &impl Columns) -> Result<OrgAwsKey, StoreError> {
    Ok(OrgAwsKey {
        org: Cells::new(row, "keys").org("org")?,
        key: decode_key(row)?,
    })
}

fn decode_aws<R: Columns>(cells: &Cells<'_, R>) -> Result<Option<AwsArns>, StoreError> {
    let backup_key_arn = cells.optional_string("aws_backup_key_arn")?;
    let role_arn = cells.optional_string("aws_role_arn")?;
    match cells.optional_string("aws_key_arn")? {
        Some(key_arn) => Ok(Some(AwsArns {
            key_arn,
            backup_key_arn,
            role_arn,
        })),
        None if backup_key_arn.is_none() && role_arn.is_none() => Ok(None),
        None => Err(Corruption::MissingValue {
            column: Column {
                table: "keys",
                name: "aws_key_arn",
            },
            because: "the key has a backup key or role ARN",
        }
        .into()),
    }
}

/// The three ARN columns of `aws`, for binding.
pub(crate) fn aws_columns(aws: Option<&AwsArns>) -> [Option<&str>; 3] {
    match aws {
        None => [None; 3],
        Some(AwsArns {
            key_arn,
            backup_key_arn,
            role_arn,
        }) => [
            Some(key_arn.as_str()),
            backup_key_arn.as_deref(),
            role_arn.as_deref(),
        ],
    }
}

/// Decodes a row exactly as stored: the org is not parsed, so that
/// [`audit::verify`] can name a row that claims to be another org's.
pub(crate) fn decode_audit(row: &impl Columns) -> Result<ChainedEvent, StoreError> {
    let cells = Cells::new(row, "audit");
    Ok(ChainedEvent {
        event: AuditEvent {
            seq: cells.unsigned("seq")?,
            time: cells.timestamp("time")?,
            actor: cells.string("actor")?,
            org: cells.string("org")?,
            key: cells.optional_string("key")?,
            action: cells.string("action")?,
            result: cells.string("result")?,
        },
        prev_hash: cells.hash("prev_hash")?,
        hash: cells.hash("hash")?,
    })
}

pub(crate) fn decode_intent(row: &impl Columns) -> Result<Intent, StoreError> {
    let cells = Cells::new(row, "intents");
    Ok(Intent {
        handle: cells.string("handle")?,
        kind: cells.parse("kind", codec::parse_intent_kind)?,
        org: cells.parse_optional("org", codec::parse_org)?,
        created_at: cells.timestamp("created_at")?,
    })
}

pub(crate) fn decode_generic_key(
    row: &impl Columns,
    table: &'static str,
) -> Result<GenericKey, StoreError> {
    let cells = Cells::new(row, table);
    Ok(GenericKey {
        handle: cells.string("handle")?,
        check_value: cells.string("check_value")?,
        created_at: cells.timestamp("created_at")?,
    })
}

pub(crate) fn decode_kek(row: &impl Columns) -> Result<StoredKek, StoreError> {
    let cells = Cells::new(row, "keks");
    Ok(StoredKek {
        id: cells.parse("kek_id", codec::parse_kek_id)?,
        resource: cells.parse("resource", codec::parse_resource)?,
        key: cells.key_id("key_id")?,
        wrapped: cells.bytes("wrapped")?,
        created_at: cells.timestamp("created_at")?,
    })
}

/// A job without its `from` keys, which are stored in a table of their own
/// (see [`attach_from_keys`]).
pub(crate) fn decode_job(row: &impl Columns) -> Result<RotationJob, StoreError> {
    let cells = Cells::new(row, "rotation_jobs");
    Ok(RotationJob {
        org: cells.org("org")?,
        id: cells.unsigned("job")?,
        target: cells.key_id("target")?,
        from: Vec::new(),
        total: cells.unsigned("total")?,
        done: cells.unsigned("done")?,
        started_at: cells.timestamp("started_at")?,
        ended_at: cells.optional_timestamp("ended_at")?,
        state: cells.parse("state", codec::parse_job_state)?,
    })
}

/// One key of a job (the column `key_id`) from a row of `rotation_job_from`.
pub(crate) fn decode_from_key(row: &impl Columns) -> Result<KeyId, StoreError> {
    Cells::new(row, "rotation_job_from").key_id("key_id")
}

/// One `from` key of a job from a row of `rotation_job_from` (columns `org`,
/// `job`, `key_id`), for [`attach_from_keys`].
pub(crate) fn decode_job_from(row: &impl Columns) -> Result<(String, u64, KeyId), StoreError> {
    let cells = Cells::new(row, "rotation_job_from");
    Ok((
        cells.string("org")?,
        cells.unsigned("job")?,
        cells.key_id("key_id")?,
    ))
}

/// Gives each job its `from` keys: (org, job, key), each job's in order.
pub(crate) fn attach_from_keys(jobs: &mut [RotationJob], from: Vec<(String, u64, KeyId)>) {
    let mut from_of: HashMap<(String, u64), Vec<KeyId>> = HashMap::new();
    for (org, job, key) in from {
        from_of.entry((org, job)).or_default().push(key);
    }
    for job in jobs {
        job.from = from_of
            .remove(&(job.org.as_str().to_owned(), job.id))
            .unwrap_or_default();
    }
}

/// `events` chained after `head`, the org's newest stored event. The caller
/// must hold whatever lock keeps another writer from appending between its
/// read of the head and its insert of these.
pub(crate) fn chain_after(
    org: &OrgId,
    head: Option<ChainedEvent>,
    events: Vec<NewAuditEvent>,
) -> Result<Vec<ChainedEvent>, StoreError> {
    let mut chained: Vec<ChainedEvent> = Vec::with_capacity(events.len());
    for NewAuditEvent {
        time,
        actor,
        key,
        action,
        result,
    } in events
    {
        let prev = chained.last().or(head.as_ref());
        let seq =
            match prev {
                None => 1,
                Some(prev) => prev.event.seq.checked_add(1).ok_or_else(|| {
                    StoreError::Corrupt(Corruption::AuditSeqExhausted(org.clone()))
                })?,
            };
        let next = audit::chain(
            prev,
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
        chained.push(next);
    }
    Ok(chained)
}

/// Re-wraps grouped by (from, to) pair, pairs in the order they first appear,
/// so that a KEK named twice along a chain (k-1 → k-2, then k-2 → k-3) is
/// written in that order. Each group is one set-based update, whose count of
/// changed rows is exactly what moves from one key's count to the other's.
pub(crate) fn group_by_pair(rewraps: &[Rewrap]) -> Vec<((&KeyId, &KeyId), Vec<&Rewrap>)> {
    let mut pairs: Vec<((&KeyId, &KeyId), Vec<&Rewrap>)> = Vec::new();
    for rewrap in rewraps {
        let pair = (&rewrap.from, &rewrap.to);
        match pairs.iter_mut().find(|(p, _)| *p == pair) {
            Some((_, group)) => group.push(rewrap),
            None => pairs.push((pair, vec![rewrap])),
        }
    }
    pairs
}

/// How many of `keks` each key wraps, for `kek_counts`.
pub(crate) fn count_by_key(keks: &[StoredKek]) -> BTreeMap<&KeyId, u64> {
    let mut counts: BTreeMap<&KeyId, u64> = BTreeMap::new();
    for kek in keks {
        *counts.entry(&kek.key).or_default() += 1;
    }
    counts
}

/// A version, sequence number or count as SQL's signed 64-bit integer. Those
/// the store writes are reached by counting from 1, so one that does not fit
/// means the stored count is already at the limit.
pub(crate) fn sql_int(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| Corruption::CounterRange(value).into())
}

/// Errors that say a stored value does not decode, whichever the database.
pub(crate) fn is_decode_error(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. }
            | sqlx::Error::TypeNotFound { .. }
    )
}

/// A failed schema migration, with the backend's own translation `db` for
/// errors the database reported.
pub(crate) fn migrate_error(error: MigrateError, db: fn(sqlx::Error) -> StoreError) -> StoreError {
    match error {
        MigrateError::Execute(error) => db(error),
        // A migration this build does not know (a newer release wrote the
        // database) or an edited one: refuse to run on a schema we cannot
        // vouch for.
        other => StoreError::Unavailable(Box::new(other)),
    }
}
