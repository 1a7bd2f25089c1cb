//! The generic default key ([`GenericKeyStore`](crate::GenericKeyStore)).

use super::*;

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
        let mut user = key_in("k-generic", handle.to_owned(), KeyState::Active);
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
        (
            "using-deactivated",
            vec![(
                KeyState::Deactivated {
                    remove_at: Timestamp(1),
                },
                &shared,
            )],
        ),
        ("using-another", vec![(KeyState::Active, &another)]),
        (
            "using-deleted",
            vec![(
                KeyState::Deleted {
                    restore_until: Timestamp(1),
                },
                &shared,
            )],
        ),
    ];
    let mut n = 0;
    for (name, keys) in cases {
        let keys = keys
            .into_iter()
            .map(|(state, handle)| {
                n += 1;
                key_in(&format!("k-{n}"), handle.clone(), state)
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
    let mut user = key_in("k-generic", old.handle.clone(), KeyState::Active);
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
