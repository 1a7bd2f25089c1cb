//! Each org's audit chain ([`AuditStore`](crate::AuditStore)).

use super::*;

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

/// Checkpoints are kept once per (org, seq), listed in order a page at a
/// time, and an org needs one exactly while its newest event is uncovered.
pub async fn checkpoints_are_kept_once_and_cover_the_newest_event(store: &dyn Store) {
    let org = org_id("checkpoints");
    let needs = |orgs: Vec<OrgId>| orgs.contains(&org_id("checkpoints"));
    assert_eq!(store.audit_head(&org).await.unwrap(), None);
    store
        .append_audit(&org, vec![event("a"), event("b"), event("c")])
        .await
        .unwrap();
    let head = store.audit_head(&org).await.unwrap().expect("a head");
    assert_eq!(head.event.seq, 3);
    assert!(needs(store.orgs_needing_checkpoint().await.unwrap()));

    let checkpoint = |seq: u64, signature: u8| StoredCheckpoint {
        org: org.clone(),
        seq,
        head: [seq as u8; 32],
        time: Timestamp(1_700_000_000 + seq as i64),
        key_id: "k".repeat(64),
        signature: vec![signature; 64],
    };
    store.put_checkpoint(&checkpoint(2, 1)).await.unwrap();
    assert!(needs(store.orgs_needing_checkpoint().await.unwrap()));
    store.put_checkpoint(&checkpoint(3, 1)).await.unwrap();
    store.put_checkpoint(&checkpoint(3, 2)).await.unwrap();
    assert!(!needs(store.orgs_needing_checkpoint().await.unwrap()));
    assert_eq!(
        store.checkpoints(&org, 0, 1000).await.unwrap(),
        [checkpoint(2, 1), checkpoint(3, 1)],
        "the first signature of a seq stands"
    );
    assert_eq!(
        store.checkpoints(&org, 2, 1).await.unwrap(),
        [checkpoint(3, 1)]
    );
    store.append_audit(&org, vec![event("d")]).await.unwrap();
    assert!(needs(store.orgs_needing_checkpoint().await.unwrap()));
}
