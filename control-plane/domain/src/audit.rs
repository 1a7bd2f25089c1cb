//! The audit log's tamper evidence: one hash chain per organisation.
//!
//! Event `n` of an org stores `hash_n = SHA-256("cmk-audit-v1" ‖ hash_{n-1} ‖
//! encode(event_n))`, with `hash_0` of the first event chained to 32 zero bytes.
//! `encode` writes every field in a fixed order with a length prefix, so no two
//! different events encode alike. Changing any stored field, inserting,
//! reordering or deleting a row breaks the chain at that row, and [`verify`]
//! names it. Truncating the newest rows leaves a valid shorter chain; the head
//! hash each append returns is what an operator exports elsewhere (a log line, a
//! ticket) to detect that too.

use sha2::{Digest, Sha256};

use crate::Timestamp;

const DOMAIN: &[u8] = b"cmk-audit-v1";

/// The hash before an org's first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// One audited action: who did what to which key of which org, and how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    /// Position in the org's chain, from 1 with no gaps.
    pub seq: u64,
    /// When it happened.
    pub time: Timestamp,
    /// The caller's identity, or `service` for the service's own changes.
    pub actor: String,
    /// The organisation.
    pub org: String,
    /// The key concerned, if any.
    pub key: Option<String>,
    /// What was done (`upload`, `activate`, `revoke`, `state pending→active`, …).
    pub action: String,
    /// `ok`, or the gRPC code and message of the refusal.
    pub result: String,
}

/// An event with its place in the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainedEvent {
    /// The event.
    pub event: AuditEvent,
    /// The hash of the event before it (or [`GENESIS`]).
    pub prev_hash: [u8; 32],
    /// This event's hash.
    pub hash: [u8; 32],
}

/// Chains `event` after `prev` (the org's newest event, or `None` for its first);
/// `event.seq` must follow `prev`'s.
pub fn chain(prev: Option<&ChainedEvent>, event: AuditEvent) -> ChainedEvent {
    let prev_hash = prev.map_or(GENESIS, |p| p.hash);
    let hash = hash(&prev_hash, &event);
    ChainedEvent {
        event,
        prev_hash,
        hash,
    }
}

/// Where and how a chain is broken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A sequence number is missing or repeated: a row was deleted or inserted.
    #[error(
        "audit chain of org {org} breaks at seq {found}: expected seq {expected} (a row is missing or was inserted)"
    )]
    Gap {
        /// The org.
        org: String,
        /// The seq that should come next.
        expected: u64,
        /// The seq found.
        found: u64,
    },
    /// A row does not point at the hash of the row before it.
    #[error("audit chain of org {org} breaks at seq {seq}: it does not follow the row before it")]
    Link {
        /// The org.
        org: String,
        /// The row.
        seq: u64,
    },
    /// A row's contents no longer match its hash: it was changed.
    #[error(
        "audit chain of org {org} breaks at seq {seq}: the row was changed after it was written"
    )]
    Altered {
        /// The org.
        org: String,
        /// The row.
        seq: u64,
    },
    /// A row of another org in this org's chain.
    #[error("audit chain of org {org} contains seq {seq} of org {other}")]
    ForeignRow {
        /// The org being verified.
        org: String,
        /// The row.
        seq: u64,
        /// The org the row names.
        other: String,
    },
}

/// Checks one org's chain, rows in seq order from the first. Returns the head
/// hash (to compare with one exported earlier).
pub fn verify(org: &str, rows: &[ChainedEvent]) -> Result<[u8; 32], ChainError> {
    let mut verifier = Verifier::new(org);
    for row in rows {
        verifier.check(row)?;
    }
    Ok(verifier.head())
}

/// Checks a chain one row at a time, so that a chain of any length is
/// verified in the memory of one page of rows.
#[derive(Clone, Debug)]
pub struct Verifier {
    org: String,
    next_seq: u64,
    prev: [u8; 32],
}

impl Verifier {
    /// A verifier of `org`'s chain, expecting its first row.
    pub fn new(org: &str) -> Self {
        Self {
            org: org.to_owned(),
            next_seq: 1,
            prev: GENESIS,
        }
    }

    /// Checks the next row of the chain.
    pub fn check(&mut self, row: &ChainedEvent) -> Result<(), ChainError> {
        let org = &self.org;
        let seq = row.event.seq;
        if &row.event.org != org {
            return Err(ChainError::ForeignRow {
                org: org.clone(),
                seq,
                other: row.event.org.clone(),
            });
        }
        if seq != self.next_seq {
            return Err(ChainError::Gap {
                org: org.clone(),
                expected: self.next_seq,
                found: seq,
            });
        }
        if row.prev_hash != self.prev {
            return Err(ChainError::Link {
                org: org.clone(),
                seq,
            });
        }
        if hash(&row.prev_hash, &row.event) != row.hash {
            return Err(ChainError::Altered {
                org: org.clone(),
                seq,
            });
        }
        self.prev = row.hash;
        self.next_seq = seq.saturating_add(1);
        Ok(())
    }

    /// The hash of the last row checked (all zero before the first).
    pub fn head(&self) -> [u8; 32] {
        self.prev
    }
}

/// Lower-case hex of a chain hash, as stored and shown.
pub fn to_hex(hash: &[u8; 32]) -> String {
    hex::encode(hash)
}

fn hash(prev: &[u8; 32], event: &AuditEvent) -> [u8; 32] {
    let AuditEvent {
        seq,
        time,
        actor,
        org,
        key,
        action,
        result,
    } = event;
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(time.0.to_be_bytes());
    for field in [
        Some(actor.as_str()),
        Some(org.as_str()),
        key.as_deref(),
        Some(action.as_str()),
        Some(result.as_str()),
    ] {
        match field {
            // A tag byte keeps "no key" apart from an empty key id.
            None => h.update([0u8]),
            Some(text) => {
                h.update([1u8]);
                h.update((text.len() as u64).to_be_bytes());
                h.update(text.as_bytes());
            }
        }
    }
    h.finalize().into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(seq: u64, action: &str) -> AuditEvent {
        AuditEvent {
            seq,
            time: Timestamp(1_700_000_000 + seq as i64),
            actor: "spiffe://cmk.test/admin-a".into(),
            org: "org-a".into(),
            key: Some(format!("key-{seq}")),
            action: action.into(),
            result: "ok".into(),
        }
    }

    fn build(n: u64) -> Vec<ChainedEvent> {
        let mut rows: Vec<ChainedEvent> = Vec::new();
        for seq in 1..=n {
            let next = chain(rows.last(), event(seq, "activate"));
            rows.push(next);
        }
        rows
    }

    #[test]
    fn an_intact_chain_verifies_to_its_head() {
        let rows = build(5);
        assert_eq!(verify("org-a", &rows), Ok(rows[4].hash));
        assert_eq!(verify("org-a", &[]), Ok(GENESIS));
    }

    #[test]
    fn each_kind_of_tampering_is_named() {
        let rows = build(5);

        let mut changed = rows.clone();
        changed[2].event.result = "ok, honest".into();
        assert_eq!(
            verify("org-a", &changed),
            Err(ChainError::Altered {
                org: "org-a".into(),
                seq: 3
            })
        );

        let mut deleted = rows.clone();
        deleted.remove(1);
        assert_eq!(
            verify("org-a", &deleted),
            Err(ChainError::Gap {
                org: "org-a".into(),
                expected: 2,
                found: 3
            })
        );

        // Deleted and renumbered: the links give it away.
        let mut renumbered = rows.clone();
        renumbered.remove(1);
        for (i, row) in renumbered.iter_mut().enumerate() {
            row.event.seq = i as u64 + 1;
        }
        assert!(matches!(
            verify("org-a", &renumbered),
            Err(ChainError::Link { seq: 2, .. })
        ));

        // Whoever recomputes every hash after a change gets a chain that
        // verifies; only a head hash exported earlier shows the difference.
        let mut rewritten = rows.clone();
        rewritten[3].event.actor = "someone else".into();
        let head = verify("org-a", &rows).unwrap();
        let mut recomputed: Vec<ChainedEvent> = Vec::new();
        for row in rewritten {
            let next = chain(recomputed.last(), row.event);
            recomputed.push(next);
        }
        assert_ne!(
            verify("org-a", &recomputed).unwrap(),
            head,
            "a rewrite changes the head"
        );

        let mut foreign = rows.clone();
        foreign[0].event.org = "org-b".into();
        assert!(matches!(
            verify("org-a", &foreign),
            Err(ChainError::ForeignRow { seq: 1, .. })
        ));
    }

    #[test]
    fn no_key_and_an_empty_key_hash_differently() {
        let mut a = event(1, "x");
        a.key = None;
        let mut b = a.clone();
        b.key = Some(String::new());
        assert_ne!(chain(None, a).hash, chain(None, b).hash);
    }

    proptest! {
        #[test]
        fn any_single_field_change_is_detected(n in 1u64..8, target in any::<prop::sample::Index>(), field in 0usize..6, text in "[a-z]{1,8}") {
            let rows = build(n);
            let mut bad = rows.clone();
            let row = &mut bad[target.index(rows.len())].event;
            match field {
                0 => row.time = Timestamp(row.time.0 + 1),
                1 => row.actor.push_str(&text),
                2 => row.key = None,
                3 => row.action.push_str(&text),
                4 => row.result.push_str(&text),
                _ => row.key = Some(format!("{}{text}", row.key.clone().unwrap_or_default())),
            }
            prop_assert!(verify("org-a", &bad).is_err());
        }
    }
}
