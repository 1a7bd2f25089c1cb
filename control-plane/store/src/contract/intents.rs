//! The intents that make custody calls repairable
//! ([`IntentStore`](crate::IntentStore)).

use super::*;

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
            vec![key_in("k", material.clone(), KeyState::Removed)],
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
