//! The behaviour every [`Store`] implementation must show, written once and
//! run against each (SQLite, PostgreSQL).
//!
//! Each check panics with a message naming what broke. The checks use orgs and
//! handles of their own and look only at those in store-wide lists, so they can
//! share one store; [`all`] needs a store nothing else has used, because there
//! is only one generic default key. [`two_instances`] races writers through
//! two instances on one database, as replicas do. Enabled by the `contract`
//! feature, which only test builds turn on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use cmk_control_plane_domain::{
    KekId, KeyId, KeyRecord, KeySource, KeyState, OrgId, ResourceId, Timestamp,
    audit::{self, ChainError, ChainedEvent},
};

use crate::{
    AwsArns, Commit, GenericKey, Intent, IntentKind, JobState, NewAuditEvent, OrgAwsKey, Rewrap,
    RotationChange, RotationJob, Store, StoreError, StoredKek, StoredKey, StoredOrg,
};

/// Runs every check of this module against `store`, which must be empty.
pub async fn all(store: &dyn Store) {
    unknown_org_loads_as_none(store).await;
    create_and_load_round_trip_every_field(store).await;
    stale_versions_conflict_and_write_nothing(store).await;
    a_failed_commit_writes_nothing(store).await;
    audit_chains_across_commits_and_appends(store).await;
    audit_events_page_in_order(store).await;
    concurrent_appends_all_land_in_one_chain(store).await;
    intents_are_recorded_resolved_and_listed_oldest_first(store).await;
    commits_record_and_resolve_intents(store).await;
    generic_key_is_stored_once(store).await;
    a_generic_key_renewed_and_dropped_meanwhile_is_not_taken(store).await;
    material_repair_claimed_is_never_committed(store).await;
    orgs_with_expired_keys_are_found(store).await;
    keks_are_stored_once_per_resource(store).await;
    kek_counts_count_each_keys_keks(store).await;
    pages_of_keks_not_wrapped_by_a_key_cover_each_once(store).await;
    rotation_jobs_start_supersede_and_finish(store).await;
    rewraps_apply_only_where_the_key_is_unchanged(store).await;
    rewraps_conflict_on_a_stale_version_or_a_job_not_running(store).await;
    keys_still_wrapping_keks_cannot_be_required_unreferenced(store).await;
    orgs_using_a_handle_are_found(store).await;
    aws_keys_not_removed_are_listed_with_their_org(store).await;
    generic_key_is_renewed_and_the_old_one_dropped_once_unused(store).await;
    leases_have_one_holder_until_released_or_expired(store).await;
}

/// An org id the check owns.
pub fn org_id(name: &str) -> OrgId {
    OrgId::parse(&format!("contract-{name}")).expect("valid org id")
}

/// A handle (32 lower-case hex) the check owns: `check` tells the checks apart.
pub fn handle(check: u32, n: u32) -> String {
    format!("{check:016x}{n:016x}")
}

/// A pending uploaded key with no optional field set.
pub fn key(id: &str, handle: String) -> StoredKey {
    StoredKey {
        record: KeyRecord::pending(
            KeyId(id.into()),
            KeySource::Uploaded,
            format!("kcv-{id}"),
            Timestamp(1_700_000_000),
        ),
        handle,
        aws: None,
    }
}

/// A pending key in AWS KMS whose ARNs name `id`, with a backup key and a
/// role when `full`.
pub fn aws_key(id: &str, handle: String, full: bool) -> StoredKey {
    let mut key = key(id, handle);
    key.record.source = KeySource::AwsKms;
    key.aws = Some(AwsArns {
        key_arn: format!("arn:aws:kms:eu-west-1:111122223333:key/{id}"),
        backup_key_arn: full.then(|| format!("arn:aws:kms:eu-central-1:111122223333:key/{id}")),
        role_arn: full.then(|| "arn:aws:iam::111122223333:role/cmk-ünïcode".to_owned()),
    });
    key
}

/// A key in `state` expiring at `expires_at`.
pub fn key_in(
    id: &str,
    handle: String,
    state: KeyState,
    expires_at: Option<Timestamp>,
) -> StoredKey {
    let mut key = key(id, handle);
    key.record.state = state;
    key.record.expires_at = expires_at;
    key
}

/// An audit event of a service change.
pub fn event(action: &str) -> NewAuditEvent {
    NewAuditEvent {
        time: Timestamp(1_700_000_100),
        actor: "service".into(),
        key: None,
        action: action.into(),
        result: "ok".into(),
    }
}

/// A commit of `keys` and `audit` and nothing else.
pub fn commit(
    org: &OrgId,
    expected_version: Option<u64>,
    keys: Vec<StoredKey>,
    audit: Vec<NewAuditEvent>,
) -> Commit {
    Commit {
        org: org.clone(),
        expected_version,
        byok: true,
        keys,
        audit,
        add_intents: Vec::new(),
        resolve_intents: Vec::new(),
        rotation: None,
        require_unreferenced: Vec::new(),
        uses_generic: None,
    }
}

/// An intent recorded at `created_at`.
pub fn intent(handle: String, kind: IntentKind, org: Option<&OrgId>, created_at: i64) -> Intent {
    Intent {
        handle,
        kind,
        org: org.cloned(),
        created_at: Timestamp(created_at),
    }
}

/// The org's whole audit chain.
pub async fn chain_of(store: &dyn Store, org: &OrgId) -> Vec<ChainedEvent> {
    store
        .audit_events(org, 0, u32::MAX)
        .await
        .expect("audit_events")
}

/// The open intents whose handles are among `handles`, in the store's order.
pub async fn open_among(store: &dyn Store, handles: &[impl AsRef<str>]) -> Vec<Intent> {
    store
        .open_intents()
        .await
        .expect("open_intents")
        .into_iter()
        .filter(|i| handles.iter().any(|h| h.as_ref() == i.handle))
        .collect()
}

/// A KEK id the check owns: `check` tells the checks apart.
pub fn kek_id(check: u32, n: u32) -> KekId {
    let mut bytes = [0; 16];
    bytes[..4].copy_from_slice(&check.to_be_bytes());
    bytes[12..].copy_from_slice(&n.to_be_bytes());
    KekId::from_random(bytes)
}

/// KEK `n` of the check, for `resource`, wrapped by `key`.
pub fn kek(check: u32, n: u32, resource: &str, key: &str) -> StoredKek {
    StoredKek {
        id: kek_id(check, n),
        resource: ResourceId::parse(resource).expect("valid resource"),
        key: KeyId(key.into()),
        // Distinct per KEK and per wrapping key, so a lost or misplaced write shows.
        wrapped: format!("wrapped {check}/{n} by {key}").into_bytes(),
        created_at: Timestamp(1_700_000_000 + i64::from(n)),
    }
}

/// `kek` re-wrapped from its key to `to`.
pub fn rewrap(kek: &StoredKek, to: &str) -> Rewrap {
    Rewrap {
        kek: kek.id.clone(),
        from: kek.key.clone(),
        to: KeyId(to.into()),
        wrapped: format!("{} re-wrapped by {to}", kek.id).into_bytes(),
    }
}

/// `kek` as `rewrap` leaves it.
pub fn rewrapped(kek: &StoredKek, rewrap: &Rewrap) -> StoredKek {
    StoredKek {
        key: rewrap.to.clone(),
        wrapped: rewrap.wrapped.clone(),
        ..kek.clone()
    }
}

/// A commit that starts a rotation job towards `target`.
pub fn start_rotation(org: &OrgId, version: u64, target: &str, from: &[&str], at: i64) -> Commit {
    Commit {
        rotation: Some(RotationChange::Start {
            target: KeyId(target.into()),
            from: from.iter().map(|k| KeyId((*k).into())).collect(),
            at: Timestamp(at),
        }),
        ..commit(
            org,
            Some(version),
            Vec::new(),
            vec![event("rotation started")],
        )
    }
}

/// A commit that finishes the org's job `job`.
pub fn finish_rotation(org: &OrgId, version: u64, job: u64, at: i64) -> Commit {
    Commit {
        rotation: Some(RotationChange::Finish {
            job,
            at: Timestamp(at),
        }),
        ..commit(
            org,
            Some(version),
            Vec::new(),
            vec![event("rotation finished")],
        )
    }
}

/// Creates an org with `keys` (id and state), each with a handle of the
/// check's own; returns its version.
pub async fn org_with_keys(
    store: &dyn Store,
    check: u32,
    org: &OrgId,
    keys: &[(&str, KeyState)],
) -> u64 {
    let keys = (0u32..)
        .zip(keys)
        .map(|(n, (id, state))| key_in(id, handle(check, 1000 + n), *state, None))
        .collect();
    store
        .commit(commit(org, None, keys, Vec::new()))
        .await
        .expect("create org")
}

/// Every KEK of the org not wrapped by `target`, paged through `limit` at a time.
pub async fn all_not_wrapped_by(
    store: &dyn Store,
    org: &OrgId,
    target: &str,
    limit: u32,
) -> Vec<StoredKek> {
    let target = KeyId(target.into());
    let mut all: Vec<StoredKek> = Vec::new();
    loop {
        let after = all.last().map(|k| k.id.clone());
        let page = store
            .keks_not_wrapped_by(org, &target, after.as_ref(), limit)
            .await
            .expect("keks_not_wrapped_by");
        assert!(page.len() <= limit as usize, "a page holds at most `limit`");
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

/// An org never committed loads as `None` and has no audit events.
pub async fn unknown_org_loads_as_none(store: &dyn Store) {
    let org = org_id("unknown");
    assert_eq!(store.load_org(&org).await.expect("load_org"), None);
    assert!(chain_of(store, &org).await.is_empty());
}

/// Every field of every state and source reads back as written, keys in the
/// order added; an update keeps a key's place.
pub async fn create_and_load_round_trip_every_field(store: &dyn Store) {
    const CHECK: u32 = 1;
    let org = org_id("round-trip");
    let states = [
        KeyState::Pending,
        KeyState::Active,
        KeyState::Rotating,
        KeyState::Deactivated,
        KeyState::Revoked,
        KeyState::Deleted,
        KeyState::Removed,
        KeyState::RevokedByProvider,
    ];
    let sources = [
        KeySource::Uploaded,
        KeySource::AwsKms,
        KeySource::GenericDefault,
    ];
    // Ids deliberately out of lexical order: keys come back in the order added.
    let ids = ["k-7", "k-2", "k-5", "k-0", "k-6", "k-1", "k-4", "k-3"];
    let keys: Vec<StoredKey> = (0u32..)
        .zip(ids.iter().zip(states))
        .map(|(i, (id, state))| {
            let n = i64::from(i);
            let some_when = |offset: i64| (i % 2 == 0).then_some(Timestamp(1_700_000_000 + offset));
            StoredKey {
                record: KeyRecord {
                    id: KeyId((*id).into()),
                    source: sources[i as usize % sources.len()],
                    state,
                    check_value: format!("{:06x}", 0xa1b2c3 + n),
                    // The extremes of the range survive too.
                    created_at: Timestamp(match i {
                        0 => i64::MIN,
                        1 => -1,
                        2 => 0,
                        _ => 1_600_000_000 + n,
                    }),
                    activated_at: some_when(n),
                    revoked_at: (i % 3 == 0).then_some(Timestamp(1_700_000_500 + n)),
                    expires_at: if i == 3 {
                        Some(Timestamp(i64::MAX))
                    } else {
                        some_when(86_400 + n)
                    },
                    needed: state == KeyState::Removed,
                    before_provider_revocation: (state == KeyState::RevokedByProvider)
                        .then_some(KeyState::Rotating),
                },
                handle: handle(CHECK, i),
                // Every shape: none, the key alone, all three, and a role
                // without a backup key.
                aws: match i % 4 {
                    0 => None,
                    1 => aws_key(id, String::new(), false).aws,
                    2 => aws_key(id, String::new(), true).aws,
                    _ => aws_key(id, String::new(), true).aws.map(|arns| AwsArns {
                        backup_key_arn: None,
                        ..arns
                    }),
                },
            }
        })
        .collect();

    let mut created = commit(&org, None, keys.clone(), Vec::new());
    created.byok = true;
    assert_eq!(store.commit(created).await.expect("create"), 1);
    let expected = StoredOrg {
        org: org.clone(),
        byok: true,
        version: 1,
        keys: keys.clone(),
    };
    assert_eq!(
        store.load_org(&org).await.expect("load_org"),
        Some(expected.clone()),
        "every field of every key reads back as written, in insertion order"
    );

    // An update keeps the key's place, a new key goes last, BYOK follows the commit.
    let mut updated = keys[1].clone();
    updated.record.state = KeyState::RevokedByProvider;
    updated.record.before_provider_revocation = Some(KeyState::Active);
    updated.record.activated_at = None;
    updated.record.revoked_at = Some(Timestamp(1_800_000_000));
    updated.record.needed = true;
    updated.handle = handle(CHECK, 100);
    updated.aws = aws_key("k-renamed", String::new(), false).aws;
    let added = key("k-00", handle(CHECK, 101));
    let mut change = commit(
        &org,
        Some(1),
        vec![added.clone(), updated.clone()],
        Vec::new(),
    );
    change.byok = false;
    assert_eq!(store.commit(change).await.expect("update"), 2);
    let mut keys_now = keys.clone();
    keys_now[1] = updated;
    keys_now.push(added);
    assert_eq!(
        store.load_org(&org).await.expect("load_org"),
        Some(StoredOrg {
            org: org.clone(),
            byok: false,
            version: 2,
            keys: keys_now.clone(),
        })
    );

    // A commit of no keys still takes a version and leaves the keys alone.
    assert_eq!(
        store
            .commit(commit(&org, Some(2), Vec::new(), Vec::new()))
            .await
            .expect("empty commit"),
        3
    );
    let loaded = store.load_org(&org).await.expect("load_org").expect("org");
    assert_eq!((loaded.version, loaded.keys), (3, keys_now));
}

/// A create of an existing org, and a commit naming any version but the
/// current one, fail with `Conflict` and write none of their parts.
pub async fn stale_versions_conflict_and_write_nothing(store: &dyn Store) {
    const CHECK: u32 = 2;
    let org = org_id("conflict");
    store
        .commit(commit(
            &org,
            None,
            vec![key("a", handle(CHECK, 1))],
            vec![event("create")],
        ))
        .await
        .expect("create");
    let open = handle(CHECK, 2);
    let added = handle(CHECK, 3);
    store
        .record_intent(intent(open.clone(), IntentKind::Import, Some(&org), 10))
        .await
        .expect("record_intent");
    let before = store.load_org(&org).await.expect("load_org");
    let chain_before = chain_of(store, &org).await;

    // Everything a commit can carry, so that any part written despite the
    // conflict shows.
    let conflicting = |expected| {
        let mut changed = key_in("a", handle(CHECK, 4), KeyState::Active, None);
        changed.record.activated_at = Some(Timestamp(5));
        Commit {
            byok: false,
            add_intents: vec![intent(added.clone(), IntentKind::Destroy, Some(&org), 11)],
            resolve_intents: vec![open.clone()],
            rotation: Some(RotationChange::Start {
                target: KeyId("a".into()),
                from: Vec::new(),
                at: Timestamp(5),
            }),
            ..commit(
                &org,
                expected,
                vec![changed, key("b", handle(CHECK, 5))],
                vec![event("conflicting")],
            )
        }
    };
    for expected in [None, Some(0), Some(2), Some(u64::MAX)] {
        match store.commit(conflicting(expected)).await {
            Err(StoreError::Conflict(conflicting)) => assert_eq!(conflicting, org),
            other => panic!("commit expecting {expected:?} at version 1: {other:?}"),
        }
        assert_eq!(store.load_org(&org).await.expect("load_org"), before);
        assert_eq!(chain_of(store, &org).await, chain_before);
        assert_eq!(
            open_among(store, &[&open, &added]).await,
            vec![intent(open.clone(), IntentKind::Import, Some(&org), 10)],
            "intents are untouched by a conflicting commit"
        );
        assert_eq!(
            store.latest_rotation(&org).await.expect("latest_rotation"),
            None,
            "no rotation job is started by a conflicting commit"
        );
    }

    assert_eq!(
        store.commit(conflicting(Some(1))).await.expect("current"),
        2
    );
    assert!(
        matches!(
            store.commit(conflicting(Some(1))).await,
            Err(StoreError::Conflict(_))
        ),
        "the version read before another commit is stale"
    );
    assert_eq!(open_among(store, &[&open]).await, Vec::<Intent>::new());
    store.resolve_intent(&added).await.expect("resolve_intent");

    // An org that does not exist has no version to match.
    let never = org_id("conflict-never");
    assert!(matches!(
        store
            .commit(commit(
                &never,
                Some(1),
                vec![key("a", handle(CHECK, 6))],
                vec![event("x")]
            ))
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.load_org(&never).await.expect("load_org"), None);
    assert!(chain_of(store, &never).await.is_empty());
}

/// A commit whose last part fails leaves its earlier parts unwritten.
pub async fn a_failed_commit_writes_nothing(store: &dyn Store) {
    const CHECK: u32 = 3;
    let org = org_id("atomic");
    store
        .commit(commit(
            &org,
            None,
            vec![key("a", handle(CHECK, 1))],
            vec![event("create")],
        ))
        .await
        .expect("create");
    let taken = handle(CHECK, 2);
    store
        .record_intent(intent(taken.clone(), IntentKind::Import, None, 1))
        .await
        .expect("record_intent");
    let before = store.load_org(&org).await.expect("load_org");
    let chain_before = chain_of(store, &org).await;

    // The last part of the commit fails (the handle already has an intent).
    let failing = Commit {
        add_intents: vec![intent(taken.clone(), IntentKind::Destroy, Some(&org), 2)],
        rotation: Some(RotationChange::Start {
            target: KeyId("a".into()),
            from: Vec::new(),
            at: Timestamp(2),
        }),
        ..commit(
            &org,
            Some(1),
            vec![key_in("a", handle(CHECK, 1), KeyState::Removed, None)],
            vec![event("remove")],
        )
    };
    assert!(store.commit(failing).await.is_err());
    assert_eq!(store.load_org(&org).await.expect("load_org"), before);
    assert_eq!(chain_of(store, &org).await, chain_before);
    assert_eq!(
        open_among(store, &[&taken]).await,
        vec![intent(taken.clone(), IntentKind::Import, None, 1)]
    );
    assert_eq!(
        store.latest_rotation(&org).await.expect("latest_rotation"),
        None
    );
    store.resolve_intent(&taken).await.expect("resolve_intent");
}

/// Commits and appends extend one chain per org, counted from 1, which the
/// domain's `verify` accepts; an org never enrolled is audited too.
pub async fn audit_chains_across_commits_and_appends(store: &dyn Store) {
    const CHECK: u32 = 4;
    let org = org_id("audit");
    let other = org_id("audit-other");
    let refused = NewAuditEvent {
        time: Timestamp(1_700_000_001),
        actor: "spiffe://cmk.test/admin-a".into(),
        key: None,
        action: "get_keys".into(),
        result: "NOT_FOUND: organisation contract-audit is not enrolled".into(),
    };
    let upload = NewAuditEvent {
        time: Timestamp(1_700_000_002),
        actor: "spiffe://cmk.test/admin-a".into(),
        key: Some("k-1".into()),
        action: "upload".into(),
        result: "ok".into(),
    };
    let empty_key = NewAuditEvent {
        key: Some(String::new()),
        ..event("state pending→active")
    };

    // A refused call on an org that was never enrolled is still audited.
    store
        .append_audit(&org, vec![refused.clone()])
        .await
        .expect("append to an unknown org");
    assert_eq!(store.load_org(&org).await.expect("load_org"), None);
    store
        .commit(commit(
            &org,
            None,
            vec![key("k-1", handle(CHECK, 1))],
            vec![upload.clone(), empty_key.clone()],
        ))
        .await
        .expect("create");
    store
        .append_audit(&org, vec![event("get_keys"), event("list_audit")])
        .await
        .expect("append");
    store
        .append_audit(&org, Vec::new())
        .await
        .expect("append nothing");
    store
        .commit(commit(&org, Some(1), Vec::new(), vec![event("set_byok")]))
        .await
        .expect("commit");
    store
        .append_audit(&other, vec![event("get_keys")])
        .await
        .expect("append to another org");

    let sent = [
        refused,
        upload,
        empty_key,
        event("get_keys"),
        event("list_audit"),
        event("set_byok"),
    ];
    let rows = chain_of(store, &org).await;
    assert_eq!(rows.len(), sent.len());
    let mut prev = audit::GENESIS;
    for ((seq, row), sent) in (1u64..).zip(&rows).zip(&sent) {
        let event = &row.event;
        assert_eq!(event.seq, seq, "seq counts from 1 without gaps");
        assert_eq!(event.org, org.as_str());
        assert_eq!(
            (
                event.time,
                &event.actor,
                &event.key,
                &event.action,
                &event.result
            ),
            (
                sent.time,
                &sent.actor,
                &sent.key,
                &sent.action,
                &sent.result
            ),
            "seq {seq} reads back as sent"
        );
        assert_eq!(row.prev_hash, prev, "seq {seq} links to the row before it");
        prev = row.hash;
    }
    assert_eq!(
        audit::verify(org.as_str(), &rows),
        Ok(prev),
        "the domain accepts the stored chain"
    );

    let others = chain_of(store, &other).await;
    assert_eq!(others.len(), 1, "each org has a chain of its own");
    assert_eq!(others[0].event.seq, 1);
    assert_eq!(others[0].prev_hash, audit::GENESIS);
    assert!(audit::verify(other.as_str(), &others).is_ok());

    let audited = store.audited_orgs().await.expect("audited_orgs");
    assert!(audited.contains(&org) && audited.contains(&other));
    assert!(
        audited.windows(2).all(|w| w[0] < w[1]),
        "audited orgs are listed once each, in id order: {audited:?}"
    );
}

/// `audit_events` pages through a chain oldest first.
pub async fn audit_events_page_in_order(store: &dyn Store) {
    let org = org_id("paging");
    let events: Vec<NewAuditEvent> = (0..7).map(|i| event(&format!("read {i}"))).collect();
    store
        .append_audit(&org, events[..4].to_vec())
        .await
        .expect("append");
    store
        .append_audit(&org, events[4..].to_vec())
        .await
        .expect("append");
    let all = chain_of(store, &org).await;
    assert_eq!(all.len(), 7);

    let mut paged = Vec::new();
    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        let page = store.audit_events(&org, after, 3).await.expect("page");
        let Some(last) = page.last() else { break };
        after = last.event.seq;
        pages.push(page.iter().map(|r| r.event.seq).collect::<Vec<_>>());
        paged.extend(page);
    }
    assert_eq!(pages, vec![vec![1, 2, 3], vec![4, 5, 6], vec![7]]);
    assert_eq!(paged, all, "pages join up to the whole chain");
    assert!(
        store
            .audit_events(&org, 0, 0)
            .await
            .expect("limit 0")
            .is_empty()
    );
    assert!(
        store
            .audit_events(&org, 7, 10)
            .await
            .expect("past the end")
            .is_empty()
    );
    assert!(
        store
            .audit_events(&org, u64::MAX, 10)
            .await
            .expect("far past the end")
            .is_empty()
    );
    assert_eq!(
        store.audit_events(&org, 5, 10).await.expect("tail"),
        all[5..].to_vec()
    );
}

/// Appends racing on one org all succeed, each event exactly once, in one
/// unbroken chain: an append must not read the chain's head and then lose the
/// race to insert after it.
pub async fn concurrent_appends_all_land_in_one_chain(store: &dyn Store) {
    const PER_WRITER: usize = 5;
    let org = org_id("concurrent-appends");
    let writer = |name: &'static str| {
        let org = org.clone();
        async move {
            for i in 0..PER_WRITER {
                store
                    .append_audit(&org, vec![event(&format!("{name} {i}"))])
                    .await
                    .unwrap_or_else(|e| panic!("append {name} {i}: {e:?}"));
            }
        }
    };
    tokio::join!(writer("a"), writer("b"), writer("c"), writer("d"));

    let rows = chain_of(store, &org).await;
    assert!(audit::verify(org.as_str(), &rows).is_ok());
    let mut actions: Vec<&str> = rows.iter().map(|r| r.event.action.as_str()).collect();
    actions.sort_unstable();
    let mut expected: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .flat_map(|name| (0..PER_WRITER).map(move |i| format!("{name} {i}")))
        .collect();
    expected.sort_unstable();
    assert_eq!(actions, expected);
}

/// Intents are listed oldest first; a duplicate handle is refused; resolving
/// is idempotent.
pub async fn intents_are_recorded_resolved_and_listed_oldest_first(store: &dyn Store) {
    const CHECK: u32 = 5;
    let org = org_id("intents");
    let [h1, h2, h3, h4] = [1, 2, 3, 4].map(|n| handle(CHECK, n));
    let mine = [&h1, &h2, &h3, &h4];
    let i1 = intent(h1.clone(), IntentKind::Import, Some(&org), 300);
    let i2 = intent(h2.clone(), IntentKind::Destroy, None, 100);
    // Recorded after i1 in the same second: after it in the list.
    let i3 = intent(h3.clone(), IntentKind::Import, None, 300);
    let i4 = intent(h4.clone(), IntentKind::Destroy, Some(&org), 200);
    for i in [&i1, &i2, &i3, &i4] {
        store.record_intent(i.clone()).await.expect("record_intent");
    }
    assert_eq!(
        open_among(store, &mine).await,
        vec![i2.clone(), i4.clone(), i1.clone(), i3.clone()],
        "oldest first; ties in the order recorded"
    );
    let everything = store.open_intents().await.expect("open_intents");
    assert!(
        everything
            .windows(2)
            .all(|w| w[0].created_at <= w[1].created_at)
    );

    assert!(
        store
            .record_intent(intent(h1.clone(), IntentKind::Destroy, None, 400))
            .await
            .is_err(),
        "a second intent for an open handle is refused"
    );
    store.resolve_intent(&h4).await.expect("resolve_intent");
    store
        .resolve_intent(&h4)
        .await
        .expect("resolving again changes nothing");
    store
        .resolve_intent(&handle(CHECK, 99))
        .await
        .expect("resolving a handle never recorded changes nothing");
    assert_eq!(
        open_among(store, &mine).await,
        vec![i2, i1, i3],
        "the refused duplicate left the first intent as it was"
    );
    for h in [&h1, &h2, &h3] {
        store.resolve_intent(h).await.expect("resolve_intent");
    }
    assert!(open_among(store, &mine).await.is_empty());
}

/// A commit records and resolves intents with its change.
pub async fn commits_record_and_resolve_intents(store: &dyn Store) {
    const CHECK: u32 = 6;
    let org = org_id("commit-intents");
    let material = handle(CHECK, 1);
    let unrelated = handle(CHECK, 2);

    // Import: intent, HSM call, then the key and the resolution together.
    store
        .record_intent(intent(material.clone(), IntentKind::Import, Some(&org), 1))
        .await
        .expect("record_intent");
    store
        .record_intent(intent(unrelated.clone(), IntentKind::Import, None, 1))
        .await
        .expect("record_intent");
    let imported = Commit {
        resolve_intents: vec![material.clone()],
        ..commit(
            &org,
            None,
            vec![key("k", material.clone())],
            vec![event("upload")],
        )
    };
    store.commit(imported).await.expect("create");
    assert_eq!(
        open_among(store, &[&material, &unrelated]).await,
        vec![intent(unrelated.clone(), IntentKind::Import, None, 1)],
        "only the named intent is resolved"
    );

    // Removal: the state and the destroy intent together.
    let removed = Commit {
        add_intents: vec![intent(material.clone(), IntentKind::Destroy, Some(&org), 2)],
        ..commit(
            &org,
            Some(1),
            vec![key_in("k", material.clone(), KeyState::Removed, None)],
            vec![event("remove")],
        )
    };
    store.commit(removed).await.expect("remove");
    assert_eq!(
        open_among(store, &[&material]).await,
        vec![intent(material.clone(), IntentKind::Destroy, Some(&org), 2)]
    );
    store
        .resolve_intent(&material)
        .await
        .expect("resolve_intent");
    store
        .resolve_intent(&unrelated)
        .await
        .expect("resolve_intent");
    assert!(open_among(store, &[&material, &unrelated]).await.is_empty());
}

/// The first generic key stored stays; a loser's import intent stays open.
/// Needs a store with no generic key.
pub async fn generic_key_is_stored_once(store: &dyn Store) {
    const CHECK: u32 = 7;
    assert_eq!(
        store.generic_key().await.expect("generic_key"),
        None,
        "this check needs a store with no generic key"
    );
    let first = GenericKey {
        handle: handle(CHECK, 1),
        check_value: "a1b2c3".into(),
        created_at: Timestamp(1_700_000_000),
    };
    let second = GenericKey {
        handle: handle(CHECK, 2),
        check_value: "d4e5f6".into(),
        created_at: Timestamp(1_700_000_001),
    };
    for k in [&first, &second] {
        store
            .record_intent(intent(k.handle.clone(), IntentKind::Import, None, 1))
            .await
            .expect("record_intent");
    }

    // Material that repair claimed as abandoned is being destroyed: it never
    // becomes every org's default key.
    let abandoned = GenericKey {
        handle: handle(CHECK, 3),
        check_value: "a0a0a0".into(),
        created_at: Timestamp(1_700_000_000),
    };
    store
        .record_intent(intent(
            abandoned.handle.clone(),
            IntentKind::Import,
            None,
            1,
        ))
        .await
        .expect("record_intent");
    assert!(
        store
            .claim_abandoned_import(&abandoned.handle)
            .await
            .expect("claim")
    );
    assert!(matches!(
        store.put_generic_key(abandoned.clone()).await,
        Err(StoreError::IntentLost)
    ));
    assert_eq!(store.generic_key().await.expect("generic_key"), None);
    store
        .resolve_intent(&abandoned.handle)
        .await
        .expect("resolve_intent");

    assert_eq!(
        store.put_generic_key(first.clone()).await.expect("put"),
        first
    );
    assert_eq!(
        store.generic_key().await.expect("generic_key"),
        Some(first.clone())
    );
    assert_eq!(
        open_among(store, &[&first.handle]).await,
        Vec::new(),
        "storing the key resolves its import intent"
    );

    assert_eq!(
        store.put_generic_key(second.clone()).await.expect("put"),
        first,
        "the key already stored wins"
    );
    assert_eq!(
        store.generic_key().await.expect("generic_key"),
        Some(first.clone())
    );
    assert_eq!(
        open_among(store, &[&second.handle]).await,
        vec![intent(second.handle.clone(), IntentKind::Import, None, 1)],
        "the losing key's intent stays open, so repair destroys its material"
    );

    assert_eq!(
        store
            .put_generic_key(first.clone())
            .await
            .expect("put again"),
        first,
        "a retried put is harmless"
    );
    store
        .resolve_intent(&second.handle)
        .await
        .expect("resolve_intent");
}

/// The race of an org taking the generic key it read (BYOK off, enrolment)
/// with a renewal and the drop of the key it read: forced here in the order
/// that loses the key, read → renew → drop → commit. The commit is refused,
/// so no org ends up with KEKs under destroyed material; committed with the
/// current key, the org keeps it from being dropped after the next renewal.
/// Needs a store whose generic key no org uses.
pub async fn a_generic_key_renewed_and_dropped_meanwhile_is_not_taken(store: &dyn Store) {
    const CHECK: u32 = 21;
    let read = store
        .generic_key()
        .await
        .expect("generic_key")
        .expect("this check needs a store with a generic key");
    let renewed = GenericKey {
        handle: handle(CHECK, 1),
        check_value: "212121".into(),
        created_at: Timestamp(read.created_at.0 + 10),
    };
    let newest = GenericKey {
        handle: handle(CHECK, 2),
        check_value: "222222".into(),
        created_at: Timestamp(read.created_at.0 + 20),
    };
    for k in [&renewed, &newest] {
        store
            .record_intent(intent(k.handle.clone(), IntentKind::Import, None, 1))
            .await
            .expect("record_intent");
    }
    store
        .renew_generic_key(&read.handle, renewed.clone())
        .await
        .expect("renew");
    assert!(
        store
            .drop_retired_generic_key(&read.handle, Timestamp(1))
            .await
            .expect("drop"),
        "this check needs a generic key no org uses"
    );

    let org = org_id("generic-race");
    let record = |handle: &str| {
        let mut user = key_in("k-generic", handle.to_owned(), KeyState::Active, None);
        user.record.source = KeySource::GenericDefault;
        Commit {
            uses_generic: Some(handle.to_owned()),
            ..commit(&org, None, vec![user], vec![event("enrol")])
        }
    };
    assert!(
        matches!(
            store.commit(record(&read.handle)).await,
            Err(StoreError::GenericKeyChanged)
        ),
        "a commit cannot take a generic key renewed since it was read"
    );
    assert_eq!(store.load_org(&org).await.expect("load_org"), None);
    assert!(chain_of(store, &org).await.is_empty());

    store
        .commit(record(&renewed.handle))
        .await
        .expect("commit with the current generic key");
    store
        .renew_generic_key(&renewed.handle, newest.clone())
        .await
        .expect("renew again");
    assert!(
        !store
            .drop_retired_generic_key(&renewed.handle, Timestamp(2))
            .await
            .expect("drop"),
        "a retired key an org took is kept"
    );
    store
        .resolve_intent(&read.handle)
        .await
        .expect("resolve_intent");
}

/// The race of a slow import's commit with repair (another replica, or a
/// clock that runs ahead, finds its intent older than the grace period):
/// whichever claims the intent first wins, so material is either kept by a
/// key or destroyed, never both.
pub async fn material_repair_claimed_is_never_committed(store: &dyn Store) {
    const CHECK: u32 = 22;
    let org = org_id("repair-race");
    let slow = handle(CHECK, 1);
    store
        .record_intent(intent(slow.clone(), IntentKind::Import, Some(&org), 1))
        .await
        .expect("record_intent");
    assert!(store.claim_abandoned_import(&slow).await.expect("claim"));
    assert!(
        !store
            .claim_abandoned_import(&slow)
            .await
            .expect("claim again"),
        "one repair claims it"
    );
    assert_eq!(
        open_among(store, &[&slow]).await,
        vec![intent(slow.clone(), IntentKind::Destroy, Some(&org), 1)],
        "claimed: its material is to be destroyed"
    );
    let keep = |handle: &str| Commit {
        resolve_intents: vec![handle.to_owned()],
        ..commit(
            &org,
            None,
            vec![key("k", handle.to_owned())],
            vec![event("upload")],
        )
    };
    assert!(
        matches!(store.commit(keep(&slow)).await, Err(StoreError::IntentLost)),
        "a key under claimed material is not committed"
    );
    assert_eq!(store.load_org(&org).await.expect("load_org"), None);
    assert_eq!(open_among(store, &[&slow]).await.len(), 1);

    // The other order: the commit resolves the intent first, and repair
    // finds nothing to claim.
    let fast = handle(CHECK, 2);
    store
        .record_intent(intent(fast.clone(), IntentKind::Import, Some(&org), 1))
        .await
        .expect("record_intent");
    store.commit(keep(&fast)).await.expect("commit");
    assert!(!store.claim_abandoned_import(&fast).await.expect("claim"));
    assert!(open_among(store, &[&fast]).await.is_empty());

    // A renewal to claimed material is refused, and changes nothing.
    let current = store
        .generic_key()
        .await
        .expect("generic_key")
        .expect("this check needs a store with a generic key");
    let abandoned = GenericKey {
        handle: handle(CHECK, 3),
        check_value: "232323".into(),
        created_at: Timestamp(current.created_at.0 + 1),
    };
    store
        .record_intent(intent(
            abandoned.handle.clone(),
            IntentKind::Import,
            None,
            1,
        ))
        .await
        .expect("record_intent");
    assert!(
        store
            .claim_abandoned_import(&abandoned.handle)
            .await
            .expect("claim")
    );
    assert!(matches!(
        store
            .renew_generic_key(&current.handle, abandoned.clone())
            .await,
        Err(StoreError::IntentLost)
    ));
    assert_eq!(
        store.generic_key().await.expect("generic_key"),
        Some(current)
    );
    for h in [&slow, &abandoned.handle] {
        store.resolve_intent(h).await.expect("resolve_intent");
    }
}

/// Only orgs with a deactivated or deleted key due by `now` are listed, once.
pub async fn orgs_with_expired_keys_are_found(store: &dyn Store) {
    const CHECK: u32 = 8;
    let now = Timestamp(1_800_000_000);
    let at = |offset: i64| Some(Timestamp(now.0 + offset));
    let cases = [
        ("due-deactivated", vec![(KeyState::Deactivated, at(-1))]),
        ("due-deleted-now", vec![(KeyState::Deleted, at(0))]),
        ("not-yet", vec![(KeyState::Deactivated, at(1))]),
        ("revoked", vec![(KeyState::Revoked, at(-100))]),
        ("removed", vec![(KeyState::Removed, at(-100))]),
        ("no-expiry", vec![(KeyState::Deactivated, None)]),
        (
            "due-twice",
            vec![(KeyState::Deactivated, at(-5)), (KeyState::Deleted, at(-6))],
        ),
    ];
    let mut n = 0;
    for (name, keys) in cases {
        let keys = keys
            .into_iter()
            .map(|(state, expires_at)| {
                n += 1;
                key_in(&format!("k-{n}"), handle(CHECK, n), state, expires_at)
            })
            .collect();
        store
            .commit(commit(
                &org_id(&format!("expiry-{name}")),
                None,
                keys,
                Vec::new(),
            ))
            .await
            .expect("create");
    }

    let found = store
        .orgs_with_expired_keys(now)
        .await
        .expect("orgs_with_expired_keys");
    assert!(
        found.windows(2).all(|w| w[0] < w[1]),
        "each org once, in id order: {found:?}"
    );
    let prefix = org_id("expiry-").as_str().to_owned();
    let mine: Vec<OrgId> = found
        .into_iter()
        .filter(|o| o.as_str().starts_with(&prefix))
        .collect();
    assert_eq!(
        mine,
        vec![
            org_id("expiry-due-deactivated"),
            org_id("expiry-due-deleted-now"),
            org_id("expiry-due-twice"),
        ]
    );
}

/// A KEK is stored once per resource and org: inserting another for the same
/// resource returns the stored one; a stale org version is refused and
/// writes nothing.
pub async fn keks_are_stored_once_per_resource(store: &dyn Store) {
    const CHECK: u32 = 9;
    let org = org_id("keks");
    let other = org_id("keks-other");
    let version = org_with_keys(
        store,
        CHECK,
        &org,
        &[("k-a", KeyState::Active), ("k-b", KeyState::Pending)],
    )
    .await;
    org_with_keys(store, CHECK, &other, &[("k-a", KeyState::Active)]).await;

    let first = kek(CHECK, 1, "space:1/meeting-1", "k-a");
    async fn created(store: &dyn Store, org: &OrgId) -> usize {
        store
            .audit_events(org, 0, 1000)
            .await
            .expect("audit_events")
            .into_iter()
            .filter(|e| e.event.action.starts_with("create KEK"))
            .count()
    }
    let before = created(store, &org).await;
    assert_eq!(
        store
            .insert_kek(&org, version, first.clone(), vec![event("create KEK 1")])
            .await
            .expect("insert_kek"),
        first
    );
    assert_eq!(
        created(store, &org).await,
        before + 1,
        "audited with the KEK"
    );
    assert_eq!(
        store.kek(&org, &first.id).await.expect("kek"),
        Some(first.clone()),
        "every field reads back as written"
    );

    // Another KEK for the same resource (a racing caller, or a retry that
    // drew a new id): the stored one is returned and nothing is written.
    let same_resource = kek(CHECK, 2, "space:1/meeting-1", "k-b");
    assert_eq!(
        store
            .insert_kek(
                &org,
                version,
                same_resource.clone(),
                vec![event("create KEK 2")]
            )
            .await
            .expect("insert_kek again"),
        first
    );
    assert_eq!(
        created(store, &org).await,
        before + 1,
        "nothing written, not even the event"
    );
    assert_eq!(store.kek(&org, &same_resource.id).await.expect("kek"), None);

    // The org's keys change: a KEK wrapped by the key chosen before is refused.
    let version = store
        .commit(commit(&org, Some(version), Vec::new(), Vec::new()))
        .await
        .expect("commit");
    let late = kek(CHECK, 3, "space:1/meeting-2", "k-a");
    for stale in [version - 1, version + 1, u64::MAX] {
        match store
            .insert_kek(&org, stale, late.clone(), Vec::new())
            .await
        {
            Err(StoreError::Conflict(conflicting)) => assert_eq!(conflicting, org),
            other => panic!("insert_kek at version {stale} of {version}: {other:?}"),
        }
        assert_eq!(store.kek(&org, &late.id).await.expect("kek"), None);
    }
    // Nothing would be written for a resource that has its KEK, so even a
    // stale version gets it back: a retry after a lost reply is harmless.
    assert_eq!(
        store
            .insert_kek(&org, version - 1, same_resource.clone(), Vec::new())
            .await
            .expect("insert_kek of a stored resource at a stale version"),
        first
    );
    assert_eq!(
        store
            .insert_kek(&org, version, late.clone(), Vec::new())
            .await
            .expect("insert_kek at the current version"),
        late
    );

    // KEKs belong to their org: another org neither sees them nor shares
    // their resources.
    assert_eq!(store.kek(&other, &first.id).await.expect("kek"), None);
    let others = kek(CHECK, 4, "space:1/meeting-1", "k-a");
    assert_eq!(
        store
            .insert_kek(&other, 1, others.clone(), Vec::new())
            .await
            .expect("insert_kek in another org"),
        others
    );
    assert_eq!(
        store.kek(&org, &kek_id(CHECK, 99)).await.expect("kek"),
        None
    );

    // An org that does not exist has no version to match.
    let never = org_id("keks-never");
    assert!(matches!(
        store
            .insert_kek(&never, 1, kek(CHECK, 5, "space:2", "k-a"), Vec::new())
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.kek(&never, &kek_id(CHECK, 5)).await.expect("kek"),
        None
    );
}

/// `kek_counts` lists each key that wraps a KEK, with how many, in key id order.
pub async fn kek_counts_count_each_keys_keks(store: &dyn Store) {
    const CHECK: u32 = 10;
    let org = org_id("kek-counts");
    let version = org_with_keys(
        store,
        CHECK,
        &org,
        &[
            ("k-b", KeyState::Active),
            ("k-a", KeyState::Rotating),
            ("k-c", KeyState::Pending),
        ],
    )
    .await;
    assert!(store.kek_counts(&org).await.expect("kek_counts").is_empty());
    // Inserted in an order that is not the key order.
    for (n, key) in (1..).zip(["k-b", "k-a", "k-b", "k-b", "k-a"]) {
        store
            .insert_kek(
                &org,
                version,
                kek(CHECK, n, &format!("r-{n}"), key),
                Vec::new(),
            )
            .await
            .expect("insert_kek");
    }
    assert_eq!(
        store.kek_counts(&org).await.expect("kek_counts"),
        vec![(KeyId("k-a".into()), 2), (KeyId("k-b".into()), 3)],
        "keys that wrap nothing are absent"
    );
    assert!(
        store
            .kek_counts(&org_id("kek-counts-never"))
            .await
            .expect("kek_counts of an unknown org")
            .is_empty()
    );
}

/// Paging through the KEKs not wrapped by a key yields each of them exactly
/// once, in id order, and nothing of another org.
pub async fn pages_of_keks_not_wrapped_by_a_key_cover_each_once(store: &dyn Store) {
    const CHECK: u32 = 11;
    let org = org_id("kek-pages");
    let other = org_id("kek-pages-other");
    let keys = [
        ("k-new", KeyState::Active),
        ("k-old", KeyState::Rotating),
        ("k-older", KeyState::Rotating),
    ];
    let version = org_with_keys(store, CHECK, &org, &keys).await;
    let other_version = org_with_keys(store, CHECK, &other, &keys).await;
    // Ids inserted out of order, wrapped by a mix of keys; all even, so that
    // the other org's odd ones fall between them.
    let mut expected = Vec::new();
    for n in [7, 3, 11, 1, 9, 4, 12, 2, 8, 5, 10, 6] {
        let key = match n % 3 {
            0 => "k-new",
            1 => "k-old",
            _ => "k-older",
        };
        let kek = kek(CHECK, 2 * n, &format!("space:{n}"), key);
        store
            .insert_kek(&org, version, kek.clone(), Vec::new())
            .await
            .expect("insert_kek");
        if key != "k-new" {
            expected.push(kek);
        }
    }
    for n in [1, 9, 25] {
        store
            .insert_kek(
                &other,
                other_version,
                kek(CHECK, n, "space:1", "k-old"),
                Vec::new(),
            )
            .await
            .expect("insert_kek");
    }
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(expected.len(), 8);

    for limit in [1, 3, 8, 100] {
        assert_eq!(
            all_not_wrapped_by(store, &org, "k-new", limit).await,
            expected,
            "pages of {limit}"
        );
    }
    assert!(
        store
            .keks_not_wrapped_by(&org, &KeyId("k-new".into()), None, 0)
            .await
            .expect("limit 0")
            .is_empty()
    );
    assert_eq!(
        store
            .keks_not_wrapped_by(&org, &KeyId("k-new".into()), Some(&expected[5].id), 2)
            .await
            .expect("page after an id"),
        expected[6..8].to_vec()
    );
    // `after` need not be a KEK that matches, or one that exists.
    assert_eq!(
        store
            .keks_not_wrapped_by(&org, &KeyId("k-new".into()), Some(&kek_id(CHECK, 6)), 100)
            .await
            .expect("page after a KEK wrapped by the target")
            .first()
            .map(|k| k.id.clone()),
        Some(kek_id(CHECK, 8))
    );
    assert!(
        store
            .keks_not_wrapped_by(
                &org,
                &KeyId("k-new".into()),
                Some(&KekId::from_random([0xff; 16])),
                100
            )
            .await
            .expect("page after every id")
            .is_empty()
    );
    // A key the org does not have wraps nothing, so every KEK is listed.
    assert_eq!(all_not_wrapped_by(store, &org, "k-none", 5).await.len(), 12);
}

/// Starting a job counts the KEKs not wrapped by its target and supersedes
/// the org's running job; only the running job can be finished.
pub async fn rotation_jobs_start_supersede_and_finish(store: &dyn Store) {
    const CHECK: u32 = 12;
    let org = org_id("rotation-jobs");
    let mut version = org_with_keys(
        store,
        CHECK,
        &org,
        &[
            ("k-1", KeyState::Active),
            ("k-2", KeyState::Pending),
            ("k-3", KeyState::Pending),
        ],
    )
    .await;
    assert_eq!(
        store.latest_rotation(&org).await.expect("latest_rotation"),
        None
    );
    for n in 1..=5 {
        let key = if n <= 3 { "k-1" } else { "k-2" };
        store
            .insert_kek(
                &org,
                version,
                kek(CHECK, n, &format!("r-{n}"), key),
                Vec::new(),
            )
            .await
            .expect("insert_kek");
    }

    version = store
        .commit(start_rotation(&org, version, "k-2", &["k-1"], 100))
        .await
        .expect("start");
    let first = RotationJob {
        org: org.clone(),
        id: 1,
        target: KeyId("k-2".into()),
        from: vec![KeyId("k-1".into())],
        total: 3,
        done: 0,
        started_at: Timestamp(100),
        ended_at: None,
        state: JobState::Running,
    };
    assert_eq!(
        store.latest_rotation(&org).await.expect("latest_rotation"),
        Some(first.clone()),
        "the total counts the KEKs not wrapped by the target"
    );
    assert!(
        running_of(store, &org).await == vec![first.clone()],
        "a started job is running"
    );

    // A newer activation supersedes it.
    version = store
        .commit(start_rotation(&org, version, "k-3", &["k-2", "k-1"], 200))
        .await
        .expect("start again");
    let second = RotationJob {
        id: 2,
        target: KeyId("k-3".into()),
        from: vec![KeyId("k-2".into()), KeyId("k-1".into())],
        total: 5,
        started_at: Timestamp(200),
        ..first.clone()
    };
    assert_eq!(
        store.latest_rotation(&org).await.expect("latest_rotation"),
        Some(second.clone())
    );
    assert_eq!(running_of(store, &org).await, vec![second.clone()]);

    // Only the running job can finish; a refused finish writes nothing.
    let before = store.load_org(&org).await.expect("load_org");
    let chain_before = chain_of(store, &org).await;
    for job in [1, 3, u64::MAX] {
        match store.commit(finish_rotation(&org, version, job, 300)).await {
            Err(StoreError::Conflict(conflicting)) => assert_eq!(conflicting, org),
            other => panic!("finishing job {job}: {other:?}"),
        }
        assert_eq!(store.load_org(&org).await.expect("load_org"), before);
        assert_eq!(chain_of(store, &org).await, chain_before);
        assert_eq!(
            store.latest_rotation(&org).await.expect("latest_rotation"),
            Some(second.clone())
        );
    }
    version = store
        .commit(finish_rotation(&org, version, 2, 300))
        .await
        .expect("finish");
    let finished = RotationJob {
        state: JobState::Finished,
        ended_at: Some(Timestamp(300)),
        ..second.clone()
    };
    assert_eq!(
        store.latest_rotation(&org).await.expect("latest_rotation"),
        Some(finished)
    );
    assert!(running_of(store, &org).await.is_empty());
    assert!(
        matches!(
            store.commit(finish_rotation(&org, version, 2, 400)).await,
            Err(StoreError::Conflict(_))
        ),
        "a finished job cannot finish again"
    );

    // Numbering goes on after a finished job, and a start with no KEK to
    // re-wrap still makes a job (with nothing to do).
    let empty = org_id("rotation-jobs-empty");
    let empty_version = org_with_keys(
        store,
        CHECK,
        &empty,
        &[("k-1", KeyState::Active), ("k-2", KeyState::Pending)],
    )
    .await;
    store
        .commit(start_rotation(&empty, empty_version, "k-2", &[], 500))
        .await
        .expect("start without KEKs");
    store
        .commit(start_rotation(&org, version, "k-1", &["k-3"], 600))
        .await
        .expect("start after finishing");
    let third = store
        .latest_rotation(&org)
        .await
        .expect("latest_rotation")
        .expect("a job");
    assert_eq!((third.id, third.total, third.from.len()), (3, 2, 1));
    let empty_job = store
        .latest_rotation(&empty)
        .await
        .expect("latest_rotation")
        .expect("a job");
    assert_eq!((empty_job.id, empty_job.total), (1, 0));
    assert!(empty_job.from.is_empty());

    // Running jobs are listed by org id.
    let running = store.running_rotations().await.expect("running_rotations");
    assert!(
        running.windows(2).all(|w| w[0].org < w[1].org),
        "one running job per org, in org id order: {running:?}"
    );
    let mine: Vec<&RotationJob> = running
        .iter()
        .filter(|j| j.org == org || j.org == empty)
        .collect();
    assert_eq!(mine, vec![&third, &empty_job]);
}

/// The org's running jobs among all running ones.
async fn running_of(store: &dyn Store, org: &OrgId) -> Vec<RotationJob> {
    store
        .running_rotations()
        .await
        .expect("running_rotations")
        .into_iter()
        .filter(|j| &j.org == org)
        .collect()
}

/// A re-wrap is written only if the KEK is still wrapped by the key it was
/// read under, and only written ones are counted in the job's progress.
pub async fn rewraps_apply_only_where_the_key_is_unchanged(store: &dyn Store) {
    const CHECK: u32 = 13;
    let org = org_id("rewrap-cas");
    let mut version = org_with_keys(
        store,
        CHECK,
        &org,
        &[
            ("k-old", KeyState::Active),
            ("k-new", KeyState::Pending),
            ("k-other", KeyState::Pending),
        ],
    )
    .await;
    let keks: Vec<StoredKek> = (1..=6)
        .map(|n| kek(CHECK, n, &format!("r-{n}"), "k-old"))
        .collect();
    for kek in &keks {
        store
            .insert_kek(&org, version, kek.clone(), Vec::new())
            .await
            .expect("insert_kek");
    }
    version = store
        .commit(start_rotation(&org, version, "k-new", &["k-old"], 10))
        .await
        .expect("start");

    // Read under k-old; meanwhile KEK 2 was re-wrapped elsewhere to k-other.
    let raced = rewrap(&keks[1], "k-other");
    assert_eq!(
        store
            .rewrap_keks(&org, version, 1, vec![raced.clone()])
            .await
            .expect("rewrap"),
        1
    );
    let batch: Vec<Rewrap> = keks[..4].iter().map(|k| rewrap(k, "k-new")).collect();
    let mut with_unknown = batch.clone();
    with_unknown.push(Rewrap {
        kek: kek_id(CHECK, 99),
        ..rewrap(&keks[0], "k-new")
    });
    assert_eq!(
        store
            .rewrap_keks(&org, version, 1, with_unknown)
            .await
            .expect("rewrap"),
        3,
        "a KEK no longer wrapped by `from`, and one that does not exist, are skipped"
    );
    for (i, kek) in keks[..4].iter().enumerate() {
        let expected = if i == 1 {
            rewrapped(kek, &raced)
        } else {
            rewrapped(kek, &batch[i])
        };
        assert_eq!(
            store.kek(&org, &kek.id).await.expect("kek"),
            Some(expected),
            "KEK {i}"
        );
    }
    assert_eq!(
        store.kek(&org, &kek_id(CHECK, 99)).await.expect("kek"),
        None
    );

    // Repeating the batch (a retry after a lost reply) writes and counts nothing.
    assert_eq!(
        store
            .rewrap_keks(&org, version, 1, batch.clone())
            .await
            .expect("rewrap again"),
        0
    );
    assert_eq!(
        store
            .rewrap_keks(&org, version, 1, Vec::new())
            .await
            .expect("rewrap nothing"),
        0
    );
    let job = store
        .latest_rotation(&org)
        .await
        .expect("latest_rotation")
        .expect("job");
    assert_eq!((job.total, job.done), (6, 4));
    assert_eq!(
        store.kek_counts(&org).await.expect("kek_counts"),
        vec![
            (KeyId("k-new".into()), 3),
            (KeyId("k-old".into()), 2),
            (KeyId("k-other".into()), 1),
        ]
    );
    assert_eq!(
        all_not_wrapped_by(store, &org, "k-new", 10).await,
        vec![
            rewrapped(&keks[1], &raced),
            keks[4].clone(),
            keks[5].clone()
        ]
    );
}

/// A re-wrap batch is refused whole, writing nothing, if the org changed
/// since it was read or its job is no longer running.
pub async fn rewraps_conflict_on_a_stale_version_or_a_job_not_running(store: &dyn Store) {
    const CHECK: u32 = 14;
    let org = org_id("rewrap-conflict");
    let mut version = org_with_keys(
        store,
        CHECK,
        &org,
        &[
            ("k-1", KeyState::Active),
            ("k-2", KeyState::Pending),
            ("k-3", KeyState::Pending),
        ],
    )
    .await;
    let keks: Vec<StoredKek> = (1..=2)
        .map(|n| kek(CHECK, n, &format!("r-{n}"), "k-1"))
        .collect();
    for kek in &keks {
        store
            .insert_kek(&org, version, kek.clone(), Vec::new())
            .await
            .expect("insert_kek");
    }
    version = store
        .commit(start_rotation(&org, version, "k-2", &["k-1"], 10))
        .await
        .expect("start");
    let batch: Vec<Rewrap> = keks.iter().map(|k| rewrap(k, "k-2")).collect();

    let assert_untouched = |why: &'static str| {
        let org = org.clone();
        let keks = keks.clone();
        async move {
            for kek in &keks {
                assert_eq!(
                    store.kek(&org, &kek.id).await.expect("kek"),
                    Some(kek.clone()),
                    "{why}"
                );
            }
        }
    };

    for stale in [version - 1, version + 1, u64::MAX] {
        match store.rewrap_keks(&org, stale, 1, batch.clone()).await {
            Err(StoreError::Conflict(conflicting)) => assert_eq!(conflicting, org),
            other => panic!("rewrap at version {stale} of {version}: {other:?}"),
        }
        assert_untouched("a stale version writes nothing").await;
    }
    for job in [0, 2, u64::MAX] {
        assert!(
            matches!(
                store.rewrap_keks(&org, version, job, batch.clone()).await,
                Err(StoreError::Conflict(_))
            ),
            "job {job} does not exist"
        );
        assert_untouched("an unknown job writes nothing").await;
    }

    // Superseded: job 1 is no longer running.
    version = store
        .commit(start_rotation(&org, version, "k-3", &["k-1", "k-2"], 20))
        .await
        .expect("start again");
    assert!(matches!(
        store.rewrap_keks(&org, version, 1, batch.clone()).await,
        Err(StoreError::Conflict(_))
    ));
    assert_untouched("a superseded job writes nothing").await;

    // Finished: job 2 is no longer running either.
    version = store
        .commit(finish_rotation(&org, version, 2, 30))
        .await
        .expect("finish");
    let batch: Vec<Rewrap> = keks.iter().map(|k| rewrap(k, "k-3")).collect();
    assert!(matches!(
        store.rewrap_keks(&org, version, 2, batch).await,
        Err(StoreError::Conflict(_))
    ));
    assert_untouched("a finished job writes nothing").await;
    let job = store
        .latest_rotation(&org)
        .await
        .expect("latest_rotation")
        .expect("job");
    assert_eq!((job.id, job.done), (2, 0));

    // Another org's job is not this org's.
    let other = org_id("rewrap-conflict-other");
    let other_version = org_with_keys(
        store,
        CHECK,
        &other,
        &[("k-1", KeyState::Active), ("k-2", KeyState::Pending)],
    )
    .await;
    let other_version = store
        .commit(start_rotation(&other, other_version, "k-2", &["k-1"], 40))
        .await
        .expect("start in another org");
    let batch: Vec<Rewrap> = keks.iter().map(|k| rewrap(k, "k-2")).collect();
    assert_eq!(
        store
            .rewrap_keks(&other, other_version, 1, batch)
            .await
            .expect("rewrap in another org"),
        0,
        "KEKs of another org are not re-wrapped"
    );
    assert_untouched("KEKs of another org are not re-wrapped").await;
}

/// A commit that requires a key to wrap no KEK fails, writing nothing, while
/// one still does.
pub async fn keys_still_wrapping_keks_cannot_be_required_unreferenced(store: &dyn Store) {
    const CHECK: u32 = 15;
    let org = org_id("unreferenced");
    let mut version = org_with_keys(
        store,
        CHECK,
        &org,
        &[("k-old", KeyState::Rotating), ("k-new", KeyState::Active)],
    )
    .await;
    let held = kek(CHECK, 1, "r-1", "k-old");
    store
        .insert_kek(&org, version, held.clone(), Vec::new())
        .await
        .expect("insert_kek");
    version = store
        .commit(start_rotation(&org, version, "k-new", &["k-old"], 10))
        .await
        .expect("start");

    // Everything a commit can carry, so that any part written despite the
    // refusal shows.
    let deactivate = |version| Commit {
        require_unreferenced: vec![KeyId("k-new".into()), KeyId("k-old".into())],
        rotation: Some(RotationChange::Finish {
            job: 1,
            at: Timestamp(20),
        }),
        add_intents: vec![intent(
            handle(CHECK, 1),
            IntentKind::Destroy,
            Some(&org),
            20,
        )],
        ..commit(
            &org,
            Some(version),
            vec![key_in(
                "k-old",
                handle(CHECK, 1000),
                KeyState::Deactivated,
                None,
            )],
            vec![event("deactivate")],
        )
    };
    let before = store.load_org(&org).await.expect("load_org");
    let chain_before = chain_of(store, &org).await;
    match store.commit(deactivate(version)).await {
        Err(StoreError::Conflict(conflicting)) => assert_eq!(conflicting, org),
        other => panic!("k-old still wraps a KEK: {other:?}"),
    }
    assert_eq!(store.load_org(&org).await.expect("load_org"), before);
    assert_eq!(chain_of(store, &org).await, chain_before);
    assert!(open_among(store, &[handle(CHECK, 1)]).await.is_empty());
    assert_eq!(
        store
            .latest_rotation(&org)
            .await
            .expect("latest_rotation")
            .map(|j| j.state),
        Some(JobState::Running)
    );

    // Once the last KEK is re-wrapped away, the same change commits.
    assert_eq!(
        store
            .rewrap_keks(&org, version, 1, vec![rewrap(&held, "k-new")])
            .await
            .expect("rewrap"),
        1
    );
    let Err(StoreError::Conflict(_)) = store
        .commit(Commit {
            require_unreferenced: vec![KeyId("k-new".into())],
            ..deactivate(version)
        })
        .await
    else {
        panic!("k-new now wraps the KEK");
    };
    version = store
        .commit(Commit {
            require_unreferenced: vec![KeyId("k-old".into()), KeyId("k-unknown".into())],
            ..deactivate(version)
        })
        .await
        .expect("deactivate");
    let loaded = store.load_org(&org).await.expect("load_org").expect("org");
    assert_eq!(loaded.version, version);
    assert!(
        loaded
            .keys
            .iter()
            .any(|k| k.record.id.0 == "k-old" && k.record.state == KeyState::Deactivated)
    );
    assert_eq!(
        store
            .latest_rotation(&org)
            .await
            .expect("latest_rotation")
            .map(|j| j.state),
        Some(JobState::Finished)
    );
    store
        .resolve_intent(&handle(CHECK, 1))
        .await
        .expect("resolve_intent");
}

/// `orgs_using_handle` lists each org with a key record not removed that uses
/// the handle, once, in id order.
pub async fn orgs_using_a_handle_are_found(store: &dyn Store) {
    const CHECK: u32 = 16;
    let shared = handle(CHECK, 1);
    let another = handle(CHECK, 2);
    let cases = [
        (
            "using-twice",
            vec![(KeyState::Active, &shared), (KeyState::Revoked, &shared)],
        ),
        ("using-removed", vec![(KeyState::Removed, &shared)]),
        ("using-deactivated", vec![(KeyState::Deactivated, &shared)]),
        ("using-another", vec![(KeyState::Active, &another)]),
        ("using-deleted", vec![(KeyState::Deleted, &shared)]),
    ];
    let mut n = 0;
    for (name, keys) in cases {
        let keys = keys
            .into_iter()
            .map(|(state, handle)| {
                n += 1;
                key_in(&format!("k-{n}"), handle.clone(), state, None)
            })
            .collect();
        store
            .commit(commit(&org_id(name), None, keys, Vec::new()))
            .await
            .expect("create");
    }
    assert_eq!(
        store
            .orgs_using_handle(&shared)
            .await
            .expect("orgs_using_handle"),
        vec![
            org_id("using-deactivated"),
            org_id("using-deleted"),
            org_id("using-twice"),
        ]
    );
    assert!(
        store
            .orgs_using_handle(&handle(CHECK, 3))
            .await
            .expect("orgs_using_handle")
            .is_empty()
    );
}

/// `aws_keys` lists every key with ARNs that is not removed, by org and then
/// in the order added, with the ARNs as stored; an update is seen.
pub async fn aws_keys_not_removed_are_listed_with_their_org(store: &dyn Store) {
    const CHECK: u32 = 25;
    let in_state = |key: StoredKey, state: KeyState| {
        let mut key = key;
        key.record.state = state;
        key
    };
    let b = vec![
        in_state(aws_key("k-2", handle(CHECK, 2), true), KeyState::Active),
        in_state(key("k-1", handle(CHECK, 1)), KeyState::Rotating),
        in_state(aws_key("k-0", handle(CHECK, 3), false), KeyState::Pending),
        in_state(aws_key("k-9", handle(CHECK, 4), true), KeyState::Removed),
    ];
    let a = vec![in_state(
        aws_key("k-5", handle(CHECK, 5), false),
        KeyState::RevokedByProvider,
    )];
    let none = vec![key("k-6", handle(CHECK, 6))];
    for (name, keys) in [("aws-b", &b), ("aws-a", &a), ("aws-none", &none)] {
        store
            .commit(commit(&org_id(name), None, keys.clone(), Vec::new()))
            .await
            .expect("create");
    }
    let listed = || async {
        store
            .aws_keys()
            .await
            .expect("aws_keys")
            .into_iter()
            .filter(|k| k.org.as_str().starts_with(org_id("aws-").as_str()))
            .collect::<Vec<_>>()
    };
    let of = |org: &str, key: &StoredKey| OrgAwsKey {
        org: org_id(org),
        key: key.clone(),
    };
    assert_eq!(
        listed().await,
        vec![of("aws-a", &a[0]), of("aws-b", &b[0]), of("aws-b", &b[2])],
        "by org id, then in the order added; removed keys and keys without ARNs left out"
    );

    // Removing one takes it off the list.
    let removed = in_state(b[0].clone(), KeyState::Removed);
    store
        .commit(commit(&org_id("aws-b"), Some(1), vec![removed], Vec::new()))
        .await
        .expect("update");
    assert_eq!(listed().await, vec![of("aws-a", &a[0]), of("aws-b", &b[2])]);
}

/// The generic default key is renewed only from the key still stored; the
/// old key is kept as retired until no org uses it, then forgotten with a
/// `Destroy` intent. Needs the generic key that `generic_key_is_stored_once`
/// leaves.
pub async fn generic_key_is_renewed_and_the_old_one_dropped_once_unused(store: &dyn Store) {
    const CHECK: u32 = 17;
    let old = store
        .generic_key()
        .await
        .expect("generic_key")
        .expect("this check needs a store with a generic key");
    let renewed = GenericKey {
        handle: handle(CHECK, 1),
        check_value: "0a0b0c".into(),
        created_at: Timestamp(old.created_at.0 + 100),
    };
    let loser = GenericKey {
        handle: handle(CHECK, 2),
        check_value: "0d0e0f".into(),
        created_at: Timestamp(old.created_at.0 + 101),
    };
    let mine = [&old.handle, &renewed.handle, &loser.handle];
    let retired_among = || async {
        store
            .retired_generic_keys()
            .await
            .expect("retired_generic_keys")
            .into_iter()
            .filter(|k| mine.contains(&&k.handle))
            .collect::<Vec<_>>()
    };
    for k in [&renewed, &loser] {
        store
            .record_intent(intent(k.handle.clone(), IntentKind::Import, None, 1))
            .await
            .expect("record_intent");
    }
    // An org without BYOK uses the old key.
    let org = org_id("generic-renewal");
    let mut user = key_in("k-generic", old.handle.clone(), KeyState::Active, None);
    user.record.source = KeySource::GenericDefault;
    store
        .commit(commit(&org, None, vec![user.clone()], Vec::new()))
        .await
        .expect("create");

    // A renewal from a key that is not the stored one changes nothing.
    assert_eq!(
        store
            .renew_generic_key(&loser.handle, renewed.clone())
            .await
            .expect("renew from a stale handle"),
        old
    );
    assert_eq!(
        store.generic_key().await.expect("generic_key"),
        Some(old.clone())
    );
    assert!(retired_among().await.is_empty());
    assert_eq!(
        open_among(store, &[&renewed.handle]).await.len(),
        1,
        "the unused key's intent stays open"
    );

    assert_eq!(
        store
            .renew_generic_key(&old.handle, renewed.clone())
            .await
            .expect("renew"),
        renewed
    );
    assert_eq!(
        store.generic_key().await.expect("generic_key"),
        Some(renewed.clone())
    );
    assert_eq!(retired_among().await, vec![old.clone()]);
    assert!(
        open_among(store, &[&renewed.handle]).await.is_empty(),
        "storing the key resolves its import intent"
    );

    // A retry after a lost reply is harmless; a racing renewal loses.
    assert_eq!(
        store
            .renew_generic_key(&old.handle, renewed.clone())
            .await
            .expect("renew again"),
        renewed
    );
    assert_eq!(
        store
            .renew_generic_key(&old.handle, loser.clone())
            .await
            .expect("renew racing"),
        renewed
    );
    assert_eq!(retired_among().await, vec![old.clone()]);
    assert_eq!(
        open_among(store, &[&loser.handle]).await,
        vec![intent(loser.handle.clone(), IntentKind::Import, None, 1)],
        "the losing key's intent stays open, so repair destroys its material"
    );
    store
        .resolve_intent(&loser.handle)
        .await
        .expect("resolve_intent");

    // The old key is not dropped while an org's key record uses it.
    let now = Timestamp(1_800_000_000);
    assert_eq!(
        store
            .orgs_using_handle(&old.handle)
            .await
            .expect("orgs_using_handle"),
        vec![org.clone()]
    );
    assert!(
        !store
            .drop_retired_generic_key(&old.handle, now)
            .await
            .expect("drop while in use")
    );
    assert_eq!(retired_among().await, vec![old.clone()]);
    assert!(open_among(store, &[&old.handle]).await.is_empty());
    // Nor is the stored key, which is not retired.
    assert!(
        !store
            .drop_retired_generic_key(&renewed.handle, now)
            .await
            .expect("drop the stored key")
    );
    assert!(open_among(store, &[&renewed.handle]).await.is_empty());

    // Once the org's record is removed, it is dropped with a Destroy intent.
    user.record.state = KeyState::Removed;
    store
        .commit(commit(&org, Some(1), vec![user], Vec::new()))
        .await
        .expect("remove");
    assert!(
        store
            .orgs_using_handle(&old.handle)
            .await
            .expect("orgs_using_handle")
            .is_empty()
    );
    assert!(
        store
            .drop_retired_generic_key(&old.handle, now)
            .await
            .expect("drop")
    );
    assert!(retired_among().await.is_empty());
    assert_eq!(
        open_among(store, &[&old.handle]).await,
        vec![intent(old.handle.clone(), IntentKind::Destroy, None, now.0)]
    );
    assert!(
        !store
            .drop_retired_generic_key(&old.handle, now)
            .await
            .expect("drop again"),
        "a key already dropped is not dropped twice"
    );
    assert_eq!(open_among(store, &[&old.handle]).await.len(), 1);
    store
        .resolve_intent(&old.handle)
        .await
        .expect("resolve_intent");

    // Retired keys are listed oldest first.
    let newest = GenericKey {
        handle: handle(CHECK, 3),
        check_value: "101112".into(),
        created_at: Timestamp(renewed.created_at.0 + 1),
    };
    store
        .record_intent(intent(newest.handle.clone(), IntentKind::Import, None, 1))
        .await
        .expect("record_intent");
    store
        .renew_generic_key(&renewed.handle, newest.clone())
        .await
        .expect("renew");
    let retired = store
        .retired_generic_keys()
        .await
        .expect("retired_generic_keys");
    assert!(retired.contains(&renewed));
    assert!(
        retired
            .windows(2)
            .all(|w| w[0].created_at <= w[1].created_at)
    );
}

/// A lease has one holder at a time: renewed by it, refused to others until
/// it is released or its time runs out, and released only by its holder.
pub async fn leases_have_one_holder_until_released_or_expired(store: &dyn Store) {
    use std::time::Duration;
    let long = Duration::from_secs(60);
    let name = "contract/lease";
    assert!(store.acquire_lease(name, "replica-a", long).await.unwrap());
    assert!(
        !store.acquire_lease(name, "replica-b", long).await.unwrap(),
        "a held lease is refused to another"
    );
    assert!(
        store.acquire_lease(name, "replica-a", long).await.unwrap(),
        "its holder renews it"
    );
    assert!(
        store
            .acquire_lease("contract/other", "replica-b", long)
            .await
            .unwrap(),
        "leases are independent by name"
    );
    store.release_lease(name, "replica-b").await.unwrap();
    assert!(
        !store.acquire_lease(name, "replica-b", long).await.unwrap(),
        "only the holder releases a lease"
    );
    store.release_lease(name, "replica-a").await.unwrap();
    assert!(
        store.acquire_lease(name, "replica-b", long).await.unwrap(),
        "a released lease is free"
    );
    assert!(!store.acquire_lease(name, "replica-a", long).await.unwrap());

    // A renewal with a short time shortens it; once that runs out, anyone
    // may take it and the old holder is refused.
    let short = Duration::from_millis(300);
    assert!(store.acquire_lease(name, "replica-b", short).await.unwrap());
    assert!(!store.acquire_lease(name, "replica-a", long).await.unwrap());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        store.acquire_lease(name, "replica-a", long).await.unwrap(),
        "an expired lease is taken over"
    );
    assert!(
        !store.acquire_lease(name, "replica-b", long).await.unwrap(),
        "the holder whose time ran out has lost it"
    );
    store.release_lease(name, "replica-a").await.unwrap();
    store
        .release_lease("contract/other", "replica-b")
        .await
        .unwrap();
}

/// Of many instances racing for one free lease, exactly one gets it.
pub async fn racing_for_a_lease_one_wins(a: &dyn Store, b: &dyn Store) {
    use std::time::Duration;
    for round in 0..20 {
        let name = format!("contract/race-{round}");
        let ttl = Duration::from_secs(60);
        let (x, y, z, w) = tokio::join!(
            a.acquire_lease(&name, "a1", ttl),
            b.acquire_lease(&name, "b1", ttl),
            a.acquire_lease(&name, "a2", ttl),
            b.acquire_lease(&name, "b2", ttl),
        );
        let granted = [x, y, z, w]
            .into_iter()
            .map(|r| r.expect("a lease race fails nobody"))
            .filter(|g| *g)
            .count();
        assert_eq!(granted, 1, "round {round}: one holder");
    }
}

/// Runs the checks of writers racing through two instances of a store that
/// share one database, as replicas do (for SQLite, two pools on one file).
/// The checks use orgs of their own, so the instances may have run [`all`].
pub async fn two_instances(a: &dyn Store, b: &dyn Store) {
    racing_creates_and_commits_from_one_version_one_wins(a, b).await;
    commits_and_appends_from_two_instances_form_one_chain(a, b).await;
    keks_racing_for_one_resource_are_stored_once(a, b).await;
    a_key_required_unreferenced_gains_no_kek_meanwhile(a, b).await;
    racing_for_a_lease_one_wins(a, b).await;
}

/// Of two creates of one org, and of two commits from one version, exactly
/// one wins, and only the winners' events are appended.
pub async fn racing_creates_and_commits_from_one_version_one_wins(a: &dyn Store, b: &dyn Store) {
    const CHECK: u32 = 18;
    let org = org_id("race");
    let create = |racer: u32| {
        commit(
            &org,
            None,
            vec![key("k", handle(CHECK, racer))],
            vec![event(&format!("create by racer {racer}"))],
        )
    };
    let raced = tokio::join!(a.commit(create(0)), b.commit(create(1)));
    assert_eq!(one_winner(&org, [raced.0, raced.1], "create"), 1);

    const ROUNDS: u32 = 20;
    for round in 1..=ROUNDS {
        let version = u64::from(round);
        let change = |racer: u32| {
            commit(
                &org,
                Some(version),
                vec![key_in(
                    "k",
                    handle(CHECK, 2 * round + racer),
                    KeyState::Pending,
                    None,
                )],
                vec![event(&format!("round {round} racer {racer}"))],
            )
        };
        let raced = tokio::join!(a.commit(change(0)), b.commit(change(1)));
        assert_eq!(
            one_winner(&org, [raced.0, raced.1], &format!("round {round}")),
            version + 1
        );
    }

    let rows = chain_of(a, &org).await;
    assert_eq!(
        rows.len(),
        1 + ROUNDS as usize,
        "only the winners' events were appended"
    );
    assert!(audit::verify(org.as_str(), &rows).is_ok());
    let loaded = b.load_org(&org).await.expect("load_org").expect("org");
    assert_eq!(loaded.version, 1 + u64::from(ROUNDS));
}

/// The one success among `results`, all others being conflicts on `org`.
fn one_winner<T: std::fmt::Debug>(
    org: &OrgId,
    results: impl IntoIterator<Item = Result<T, StoreError>>,
    what: &str,
) -> T {
    let mut won = Vec::new();
    for result in results {
        match result {
            Ok(value) => won.push(value),
            Err(StoreError::Conflict(conflicting)) => assert_eq!(&conflicting, org),
            Err(other) => panic!("{what}: {other:?}"),
        }
    }
    assert_eq!(won.len(), 1, "{what}: exactly one wins: {won:?}");
    won.pop().expect("one winner")
}

/// Writers on two instances that commit (retrying on conflict) and append to
/// one org's chain leave one unbroken chain with each written event once and
/// no event of a refused attempt.
pub async fn commits_and_appends_from_two_instances_form_one_chain(a: &dyn Store, b: &dyn Store) {
    const CHECK: u32 = 19;
    const PER_WRITER: usize = 8;
    let org = org_id("two-writers");
    b.commit(commit(
        &org,
        None,
        vec![key("k", handle(CHECK, 1))],
        vec![event("create")],
    ))
    .await
    .expect("create");

    let (from_a, from_b) = tokio::join!(
        commit_and_append(a, &org, "a", PER_WRITER),
        commit_and_append(b, &org, "b", PER_WRITER),
    );

    let rows = chain_of(a, &org).await;
    assert!(audit::verify(org.as_str(), &rows).is_ok());
    let mut stored: Vec<&str> = rows.iter().map(|r| r.event.action.as_str()).collect();
    stored.sort_unstable();
    let mut expected: Vec<&str> = ["create"]
        .into_iter()
        .chain(from_a.iter().chain(&from_b).map(String::as_str))
        .collect();
    expected.sort_unstable();
    assert_eq!(stored, expected, "each written event once, no refused one");
    let loaded = b.load_org(&org).await.expect("load_org").expect("org");
    assert_eq!(loaded.version, 1 + 2 * PER_WRITER as u64);
}

/// `n` times: a commit of one event, reloading and retrying on conflict, and
/// an append of one; returns the actions of the events written.
async fn commit_and_append(store: &dyn Store, org: &OrgId, name: &str, n: usize) -> Vec<String> {
    let mut written = Vec::new();
    for i in 0..n {
        for attempt in 0.. {
            let version = store
                .load_org(org)
                .await
                .expect("load_org")
                .expect("org")
                .version;
            let action = format!("{name} commit {i} attempt {attempt}");
            match store
                .commit(commit(org, Some(version), Vec::new(), vec![event(&action)]))
                .await
            {
                Ok(_) => {
                    written.push(action);
                    break;
                }
                Err(StoreError::Conflict(_)) => {}
                Err(other) => panic!("{action}: {other:?}"),
            }
        }
        let action = format!("{name} append {i}");
        store
            .append_audit(org, vec![event(&action)])
            .await
            .unwrap_or_else(|e| panic!("{action}: {e:?}"));
        written.push(action);
    }
    written
}

/// Two instances inserting a KEK for one resource at once both get the same
/// stored KEK; only it is counted, and only its event is appended.
pub async fn keks_racing_for_one_resource_are_stored_once(a: &dyn Store, b: &dyn Store) {
    const CHECK: u32 = 20;
    const RESOURCES: u32 = 10;
    let org = org_id("kek-race");
    let version = org_with_keys(a, CHECK, &org, &[("k-1", KeyState::Active)]).await;
    for n in 0..RESOURCES {
        let resource = format!("space:{n}");
        let mine = kek(CHECK, 2 * n, &resource, "k-1");
        let theirs = kek(CHECK, 2 * n + 1, &resource, "k-1");
        let (x, y) = tokio::join!(
            a.insert_kek(&org, version, mine.clone(), vec![event("create KEK")]),
            b.insert_kek(&org, version, theirs.clone(), vec![event("create KEK")]),
        );
        let (x, y) = (x.expect("insert_kek on a"), y.expect("insert_kek on b"));
        assert_eq!(x, y, "both callers get the one stored KEK");
        assert!(x == mine || x == theirs);
    }
    assert_eq!(
        a.kek_counts(&org).await.expect("kek_counts"),
        vec![(KeyId("k-1".into()), u64::from(RESOURCES))]
    );
    let rows = chain_of(b, &org).await;
    assert!(audit::verify(org.as_str(), &rows).is_ok());
    assert_eq!(rows.len(), RESOURCES as usize, "one event per stored KEK");
}

/// A commit requiring a key to wrap no KEK, racing a KEK inserted under that
/// key from another instance: one of them is refused, so the key never ends
/// up deactivated with a KEK that needs it.
pub async fn a_key_required_unreferenced_gains_no_kek_meanwhile(a: &dyn Store, b: &dyn Store) {
    const CHECK: u32 = 21;
    for round in 0..10 {
        let org = org_id(&format!("unreferenced-race-{round}"));
        let version = org_with_keys(
            a,
            CHECK,
            &org,
            &[("k-old", KeyState::Rotating), ("k-new", KeyState::Active)],
        )
        .await;
        let deactivate = Commit {
            require_unreferenced: vec![KeyId("k-old".into())],
            ..commit(&org, Some(version), Vec::new(), vec![event("deactivate")])
        };
        let late = kek(CHECK, round, "space:1", "k-old");
        let (deactivated, inserted) = tokio::join!(
            a.commit(deactivate),
            b.insert_kek(&org, version, late, Vec::new()),
        );
        let wraps: Vec<(KeyId, u64)> = b.kek_counts(&org).await.expect("kek_counts");
        match (deactivated, inserted) {
            (Ok(_), Err(StoreError::Conflict(_))) => assert!(wraps.is_empty()),
            (Err(StoreError::Conflict(_)), Ok(_)) => {
                assert_eq!(wraps, vec![(KeyId("k-old".into()), 1)]);
            }
            other => panic!("round {round}: exactly one must be refused: {other:?}"),
        }
    }
}

/// An audit row changed behind the store's back is named by the domain's
/// `verify`: `change` sets the actor of the org's second event directly in
/// the database, past whatever the schema does to stop it.
pub async fn a_changed_audit_row_is_named_by_verify<F, Fut>(store: &dyn Store, change: F)
where
    F: FnOnce(OrgId) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let org = org_id("tampered");
    store
        .append_audit(&org, vec![event("a"), event("b"), event("c")])
        .await
        .expect("append_audit");
    change(org.clone()).await;
    let rows = chain_of(store, &org).await;
    assert_eq!(
        audit::verify(org.as_str(), &rows),
        Err(ChainError::Altered {
            org: org.as_str().into(),
            seq: 2
        })
    );
}

/// Statements that store values the store never writes, for a backend's
/// test to run directly in the database with the org bound to `$1` (standard
/// SQL, which SQLite and PostgreSQL both accept) from within the `tamper` of
/// [`unknown_stored_values_are_corruption_naming_the_column`].
pub const TAMPERING: [&str; 4] = [
    "UPDATE keys SET state = 'frozen' WHERE org = $1",
    "UPDATE keks SET resource = 'no spaces allowed' WHERE org = $1",
    "UPDATE rotation_jobs SET state = 'paused' WHERE org = $1",
    "INSERT INTO intents (handle, kind, org, created_at) \
     VALUES ('h', 'import', $1 || ' is not an org id', 0)",
];

/// A value the store does not know, written behind its back, is reported as
/// corruption naming the column and the value, never guessed at. `tamper`
/// runs [`TAMPERING`] against an org with a key, a KEK and a running job.
pub async fn unknown_stored_values_are_corruption_naming_the_column<F, Fut>(
    store: &dyn Store,
    tamper: F,
) where
    F: FnOnce(OrgId) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    const CHECK: u32 = 24;
    let org = org_id("corrupt");
    let version = org_with_keys(
        store,
        CHECK,
        &org,
        &[("k-1", KeyState::Active), ("k-2", KeyState::Pending)],
    )
    .await;
    let stored = kek(CHECK, 1, "space:1", "k-1");
    store
        .insert_kek(&org, version, stored.clone(), Vec::new())
        .await
        .expect("insert_kek");
    store
        .commit(start_rotation(&org, version, "k-2", &["k-1"], 1))
        .await
        .expect("start rotation");
    tamper(org.clone()).await;

    let expect_corrupt = |read: Result<(), StoreError>, column: &str, value: &str| match read {
        Err(StoreError::Corrupt(message)) => {
            assert!(message.contains(column), "{message}");
            assert!(message.contains(value), "{message}");
        }
        other => panic!("{column}: {other:?}"),
    };
    expect_corrupt(store.load_org(&org).await.map(drop), "keys.state", "frozen");
    expect_corrupt(
        store.kek(&org, &stored.id).await.map(drop),
        "keks.resource",
        "no spaces allowed",
    );
    expect_corrupt(
        store.latest_rotation(&org).await.map(drop),
        "rotation_jobs.state",
        "paused",
    );
    expect_corrupt(
        store.open_intents().await.map(drop),
        "intents.org",
        "is not an org id",
    );
}

/// What [`write_for_reopening`] stored, for [`assert_reopened`] to find.
#[derive(Debug)]
pub struct Written {
    org: OrgId,
    loaded: StoredOrg,
    chain: Vec<ChainedEvent>,
    intent: Intent,
    generic: GenericKey,
    retired: GenericKey,
    kek: StoredKek,
    job: RotationJob,
    counts: Vec<(KeyId, u64)>,
}

/// Stores something of every kind — an org with keys, its audit chain, an
/// open intent, a KEK, a running rotation job, a generic key and a retired
/// one — so that [`assert_reopened`] can look for all of it in a store opened
/// afresh on the same database. Needs a store with no generic key.
pub async fn write_for_reopening(store: &dyn Store) -> Written {
    const CHECK: u32 = 22;
    let org = org_id("reopen");
    let version = org_with_keys(
        store,
        CHECK,
        &org,
        &[("k-1", KeyState::Active), ("k-2", KeyState::Pending)],
    )
    .await;
    let version = store
        .commit(commit(
            &org,
            Some(version),
            Vec::new(),
            vec![event("upload")],
        ))
        .await
        .expect("commit");
    store
        .append_audit(&org, vec![event("get_keys")])
        .await
        .expect("append_audit");
    let intent = intent(handle(CHECK, 1), IntentKind::Destroy, Some(&org), 5);
    store
        .record_intent(intent.clone())
        .await
        .expect("record_intent");
    let kek = kek(CHECK, 1, "space:1", "k-1");
    store
        .insert_kek(&org, version, kek.clone(), Vec::new())
        .await
        .expect("insert_kek");
    store
        .commit(start_rotation(&org, version, "k-2", &["k-1"], 1))
        .await
        .expect("start rotation");
    let retired = GenericKey {
        handle: handle(CHECK, 2),
        check_value: "a1b2c3".into(),
        created_at: Timestamp(1_700_000_000),
    };
    let generic = GenericKey {
        handle: handle(CHECK, 3),
        ..retired.clone()
    };
    // Each was generated under an intent, as the service does it.
    for k in [&retired, &generic] {
        store
            .record_intent(self::intent(k.handle.clone(), IntentKind::Import, None, 1))
            .await
            .expect("record_intent");
    }
    store
        .put_generic_key(retired.clone())
        .await
        .expect("put_generic_key");
    store
        .renew_generic_key(&retired.handle, generic.clone())
        .await
        .expect("renew_generic_key");
    Written {
        loaded: store.load_org(&org).await.expect("load_org").expect("org"),
        chain: chain_of(store, &org).await,
        job: store
            .latest_rotation(&org)
            .await
            .expect("latest_rotation")
            .expect("job"),
        counts: store.kek_counts(&org).await.expect("kek_counts"),
        org,
        intent,
        generic,
        retired,
        kek,
    }
}

/// Everything [`write_for_reopening`] stored reads back the same, and the
/// audit chain goes on where it stopped.
pub async fn assert_reopened(store: &dyn Store, written: &Written) {
    let Written {
        org,
        loaded,
        chain,
        intent,
        generic,
        retired,
        kek,
        job,
        counts,
    } = written;
    assert_eq!(
        store.load_org(org).await.expect("load_org").as_ref(),
        Some(loaded)
    );
    assert_eq!(&chain_of(store, org).await, chain);
    assert_eq!(
        store.open_intents().await.expect("open_intents"),
        vec![intent.clone()]
    );
    assert_eq!(
        store.generic_key().await.expect("generic_key").as_ref(),
        Some(generic)
    );
    assert_eq!(
        store.retired_generic_keys().await.expect("retired"),
        vec![retired.clone()]
    );
    assert_eq!(
        store.kek(org, &kek.id).await.expect("kek").as_ref(),
        Some(kek)
    );
    assert_eq!(
        store
            .latest_rotation(org)
            .await
            .expect("latest_rotation")
            .as_ref(),
        Some(job)
    );
    assert_eq!(
        store.running_rotations().await.expect("running_rotations"),
        vec![job.clone()]
    );
    assert_eq!(&store.kek_counts(org).await.expect("kek_counts"), counts);

    store
        .append_audit(org, vec![event("list_audit")])
        .await
        .expect("append_audit");
    let longer = chain_of(store, org).await;
    assert_eq!(longer.len(), chain.len() + 1);
    assert_eq!(&longer[..chain.len()], &chain[..]);
    assert!(audit::verify(org.as_str(), &longer).is_ok());
}

/// Batches larger than one statement of either backend are written whole:
/// `seed` stores KEKs without checks (each backend's `insert_keks_unchecked`),
/// and one re-wrap batch mixes several (from, to) pairs, a KEK re-wrapped
/// twice along a chain, a stale `from` and a no-op. Returns the org, so that
/// the caller can compare `kek_counts` with a count of the KEKs themselves.
pub async fn large_batches_are_written_whole_and_counted_exactly<F, Fut>(
    store: &dyn Store,
    seed: F,
) -> OrgId
where
    F: FnOnce(OrgId, Vec<StoredKek>) -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    const CHECK: u32 = 23;
    const KEKS: u32 = 1203;
    let org = org_id("large-batches");
    let keys = [
        ("k-1", KeyState::Rotating),
        ("k-2", KeyState::Rotating),
        ("k-3", KeyState::Active),
    ];
    let version = org_with_keys(store, CHECK, &org, &keys).await;
    // Not a multiple of any backend's rows per statement, and in no
    // particular order.
    let keks: Vec<StoredKek> = (0..KEKS)
        .rev()
        .map(|n| {
            let key = if n % 3 == 0 { "k-2" } else { "k-1" };
            kek(CHECK, n, &format!("space:{n}"), key)
        })
        .collect();
    seed(org.clone(), keks.clone()).await.expect("seed KEKs");
    assert_eq!(
        store.kek_counts(&org).await.expect("kek_counts"),
        vec![(KeyId("k-1".into()), 802), (KeyId("k-2".into()), 401)]
    );
    let version = store
        .commit(start_rotation(&org, version, "k-3", &["k-1", "k-2"], 10))
        .await
        .expect("start rotation");

    let mut batch: Vec<Rewrap> = keks.iter().map(|k| rewrap(k, "k-3")).collect();
    let chained = &keks[1];
    assert_eq!(chained.key.0, "k-1");
    batch[1] = rewrap(chained, "k-2");
    batch.push(Rewrap {
        from: KeyId("k-2".into()),
        ..rewrap(chained, "k-3")
    });
    let stale = &keks[2];
    batch[2] = Rewrap {
        from: KeyId("k-3".into()),
        ..rewrap(stale, "k-3")
    };
    let unchanged = &keks[4];
    batch[4] = rewrap(unchanged, "k-1");
    let written = store
        .rewrap_keks(&org, version, 1, batch)
        .await
        .expect("rewrap_keks");
    // Every KEK but the stale one, plus the chained KEK's second step.
    assert_eq!(written, u64::from(KEKS) - 1 + 1);
    // The stale KEK stays with k-2, the no-op one with k-1.
    assert_eq!(
        (stale.key.0.as_str(), unchanged.key.0.as_str()),
        ("k-2", "k-1")
    );
    assert_eq!(
        store.kek_counts(&org).await.expect("kek_counts"),
        vec![
            (KeyId("k-1".into()), 1),
            (KeyId("k-2".into()), 1),
            (KeyId("k-3".into()), u64::from(KEKS) - 2),
        ]
    );
    assert_eq!(
        store.kek(&org, &chained.id).await.expect("kek"),
        Some(rewrapped(
            chained,
            &Rewrap {
                from: KeyId("k-2".into()),
                ..rewrap(chained, "k-3")
            }
        )),
        "the chained KEK ends with its second step"
    );
    assert_eq!(all_not_wrapped_by(store, &org, "k-3", 1000).await.len(), 2);
    let job = store
        .latest_rotation(&org)
        .await
        .expect("latest_rotation")
        .expect("job");
    assert_eq!((job.total, job.done), (u64::from(KEKS), written));
    org
}
