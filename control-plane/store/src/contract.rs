//! The behaviour every [`Store`] implementation must show, written once and
//! run against each (SQLite, PostgreSQL).
//!
//! Each check panics with a message naming what broke. The checks use orgs and
//! handles of their own and look only at those in store-wide lists, so they can
//! share one store; [`all`] needs a store nothing else has used, because there
//! is only one generic default key. Enabled by the `contract` feature, which
//! only test builds turn on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use cmk_control_plane_domain::{
    KeyId, KeyRecord, KeySource, KeyState, OrgId, Timestamp,
    audit::{self, ChainedEvent},
};

use crate::{
    Commit, GenericKey, Intent, IntentKind, NewAuditEvent, Store, StoreError, StoredKey, StoredOrg,
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
    orgs_with_expired_keys_are_found(store).await;
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
    }
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
        resolve_intents: vec![material.clone(), handle(CHECK, 99)],
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
