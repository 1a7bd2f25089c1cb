//! Signed checkpoints of each org's audit chain, and the verification that
//! uses them.
//!
//! A hash chain alone proves only that its rows agree with each other: whoever
//! can write the database can rewrite rows and recompute every hash, or cut
//! off the newest rows, and the chain still verifies. So the control plane has
//! the HSM daemon sign checkpoints — (org, seq, head hash, the daemon's time)
//! under its audit signing key, which never leaves custody — and keeps them
//! apart from the rows: after every key-state change, at most every
//! maintenance interval for every org with events not yet covered, and at a
//! clean shutdown. Verification then checks each checkpoint's signature and
//! that the row at its seq is the one it signed; a checkpoint that counts
//! rows that are gone shows the cut.
//!
//! What checkpoints cannot show: rows cut off after the newest checkpoint
//! (at most one interval of events), or rows and checkpoints deleted
//! together; the export of checkpoints to write-once storage closes the
//! second.

use std::fmt;

use cmk_control_plane_domain::{OrgId, Timestamp, audit::ChainedEvent};
use cmk_control_plane_store::{Store, StoreError, StoredCheckpoint};
use cmk_proto::checkpoint::{self, Checkpoint};
use tracing::{info, warn};

use super::KeyService;
use crate::error::ServiceError;

/// Checkpoints read per page while verifying.
const CHECKPOINT_PAGE: u32 = 1000;

/// The public keys checkpoints may be signed with: id and
/// SubjectPublicKeyInfo DER.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditKeys(Vec<(String, Vec<u8>)>);

impl AuditKeys {
    /// The keys given as SubjectPublicKeyInfo DER.
    pub fn new(ders: impl IntoIterator<Item = Vec<u8>>) -> Self {
        Self(
            ders.into_iter()
                .map(|der| (checkpoint::key_id(&der), der))
                .collect(),
        )
    }

    fn get(&self, key_id: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(id, _)| id == key_id)
            .map(|(_, der)| der.as_slice())
    }
}

/// What is wrong with an org's checkpoints.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointProblem {
    /// Signed by a key that is not the daemon's audit key.
    #[error(
        "checkpoint at seq {seq} is signed by key {key_id}, which is not the audit signing key"
    )]
    UnknownKey {
        /// The checkpoint's seq.
        seq: u64,
        /// The key it names.
        key_id: String,
    },
    /// The signature does not verify: the checkpoint was forged or changed.
    #[error(
        "checkpoint at seq {seq} has a signature that does not verify: it was forged or changed"
    )]
    BadSignature {
        /// The checkpoint's seq.
        seq: u64,
    },
    /// The row at the checkpoint's seq is not the one it signed.
    #[error(
        "the event at seq {seq} differs from the one the checkpoint signed at {time} vouches for: rows up to it were rewritten"
    )]
    Rewritten {
        /// The seq.
        seq: u64,
        /// When the checkpoint was signed.
        time: Timestamp,
    },
    /// A checkpoint counts more events than the chain has.
    #[error(
        "the chain ends at seq {last}, but the checkpoint signed at {time} counts {seq} events: rows were cut off"
    )]
    CutOff {
        /// The chain's newest seq.
        last: u64,
        /// The checkpoint's seq.
        seq: u64,
        /// When it was signed.
        time: Timestamp,
    },
}

/// Checks the checkpoints of one org against its rows as they stream by.
pub(crate) struct CheckpointCheck<'a> {
    store: &'a dyn Store,
    org: &'a OrgId,
    keys: &'a AuditKeys,
    pending: std::collections::VecDeque<StoredCheckpoint>,
    after: u64,
    exhausted: bool,
    /// Checkpoints checked.
    pub(crate) checked: u64,
    /// The newest seq a verified checkpoint covers.
    pub(crate) covered_through: u64,
}

impl<'a> CheckpointCheck<'a> {
    pub(crate) fn new(store: &'a dyn Store, org: &'a OrgId, keys: &'a AuditKeys) -> Self {
        Self {
            store,
            org,
            keys,
            pending: Default::default(),
            after: 0,
            exhausted: false,
            checked: 0,
            covered_through: 0,
        }
    }

    async fn next(&mut self) -> Result<Option<&StoredCheckpoint>, StoreError> {
        if self.pending.is_empty() && !self.exhausted {
            let page = self
                .store
                .checkpoints(self.org, self.after, CHECKPOINT_PAGE)
                .await?;
            self.exhausted = page.len() < CHECKPOINT_PAGE as usize;
            if let Some(last) = page.last() {
                self.after = last.seq;
            }
            self.pending.extend(page);
        }
        Ok(self.pending.front())
    }

    /// Checks every checkpoint at `row`'s seq against it.
    pub(crate) async fn row(
        &mut self,
        row: &ChainedEvent,
    ) -> Result<Result<(), CheckpointProblem>, StoreError> {
        let seq = row.event.seq;
        while let Some(next) = self.next().await? {
            if next.seq > seq {
                break;
            }
            let Some(stored) = self.pending.pop_front() else {
                break;
            };
            if let Err(problem) = self.verify(&stored) {
                return Ok(Err(problem));
            }
            // A checkpoint at a seq the chain skipped is checked when the
            // chain's own gap is reported; here only exact matches count.
            if stored.seq == seq && stored.head != row.hash {
                return Ok(Err(CheckpointProblem::Rewritten {
                    seq,
                    time: stored.time,
                }));
            }
            self.checked += 1;
            self.covered_through = stored.seq;
        }
        Ok(Ok(()))
    }

    /// After the last row (seq `last`): a checkpoint beyond it counts rows
    /// that are gone.
    pub(crate) async fn end(
        &mut self,
        last: u64,
    ) -> Result<Result<(), CheckpointProblem>, StoreError> {
        if let Some(next) = self.next().await?.cloned() {
            if let Err(problem) = self.verify(&next) {
                return Ok(Err(problem));
            }
            return Ok(Err(CheckpointProblem::CutOff {
                last,
                seq: next.seq,
                time: next.time,
            }));
        }
        Ok(Ok(()))
    }

    fn verify(&self, stored: &StoredCheckpoint) -> Result<(), CheckpointProblem> {
        let Some(key) = self.keys.get(&stored.key_id) else {
            return Err(CheckpointProblem::UnknownKey {
                seq: stored.seq,
                key_id: stored.key_id.clone(),
            });
        };
        let signed = Checkpoint {
            org: stored.org.as_str().to_owned(),
            seq: stored.seq,
            head: stored.head,
            time: stored.time.0,
        };
        match signed.verify(key, &stored.signature) {
            true => Ok(()),
            false => Err(CheckpointProblem::BadSignature { seq: stored.seq }),
        }
    }
}

/// A JSON-lines file every signed checkpoint is appended to, for a log
/// shipper to carry to write-once storage: one object per line,
/// `{"type":"checkpoint","org":…,"seq":…,"head":hex,"time":unix seconds,
/// "key_id":…,"signature":hex}`, written whole and synced before the next.
#[derive(Debug)]
pub struct CheckpointExport {
    file: std::sync::Mutex<std::fs::File>,
}

impl CheckpointExport {
    /// Opens (creates) `path` for appending.
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(Self {
            file: std::sync::Mutex::new(file),
        })
    }

    fn append(&self, checkpoint: &StoredCheckpoint) -> std::io::Result<()> {
        use std::io::Write;
        let mut line = serde_json::json!({
            "type": "checkpoint",
            "org": checkpoint.org.as_str(),
            "seq": checkpoint.seq,
            "head": hex::encode(checkpoint.head),
            "time": checkpoint.time.0,
            "key_id": checkpoint.key_id,
            "signature": hex::encode(&checkpoint.signature),
        })
        .to_string();
        line.push('\n');
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        file.write_all(line.as_bytes())?;
        file.sync_data()
    }
}

impl fmt::Display for AuditKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.0.iter().map(|(id, _)| id.as_str()).collect();
        f.write_str(&ids.join(", "))
    }
}

impl KeyService {
    /// The daemon's audit public key, fetched once.
    pub(crate) async fn audit_keys(&self) -> Result<AuditKeys, ServiceError> {
        let keys = self
            .audit_keys
            .get_or_try_init(|| async {
                let (der, _) = self.hsm.audit_public_key().await?;
                Ok::<_, ServiceError>(AuditKeys::new([der]))
            })
            .await?;
        Ok(keys.clone())
    }

    /// Has the daemon sign a checkpoint of the org's newest event, unless
    /// one covers it already. Best effort: a failure is logged, and the next
    /// maintenance run tries again.
    pub async fn checkpoint(&self, org: &OrgId) {
        if let Err(err) = self.try_checkpoint(org).await {
            warn!(%org, error = %crate::error::chain(&err),
                "cannot checkpoint the audit chain yet; the next maintenance run tries again");
        }
    }

    async fn try_checkpoint(&self, org: &OrgId) -> Result<(), ServiceError> {
        let Some(head) = self.store.audit_head(org).await? else {
            return Ok(());
        };
        let seq = head.event.seq;
        let covered = self
            .store
            .checkpoints(org, seq.saturating_sub(1), 1)
            .await?;
        if covered.first().is_some_and(|c| c.seq >= seq) {
            return Ok(());
        }
        let (time, signature, key_id) = self.hsm.sign_checkpoint(org, seq, &head.hash).await?;
        let checkpoint = StoredCheckpoint {
            org: org.clone(),
            seq,
            head: head.hash,
            time: Timestamp(time),
            key_id,
            signature,
        };
        self.store.put_checkpoint(&checkpoint).await?;
        if let Some(export) = &self.checkpoint_export {
            // Stored already: a failed export is logged, and the checkpoint
            // stays verifiable from the store.
            if let Err(err) = export.append(&checkpoint) {
                warn!(%org, seq, error = %err, "cannot export a signed checkpoint");
            }
        }
        Ok(())
    }

    /// Checkpoints every org with events no checkpoint covers: what the
    /// timers run each interval, and a clean shutdown once more.
    pub async fn checkpoint_all(&self) -> Result<usize, ServiceError> {
        let orgs = self.store.orgs_needing_checkpoint().await?;
        for org in &orgs {
            self.checkpoint(org).await;
        }
        if !orgs.is_empty() {
            info!(orgs = orgs.len(), "audit chains checkpointed");
        }
        Ok(orgs.len())
    }
}
