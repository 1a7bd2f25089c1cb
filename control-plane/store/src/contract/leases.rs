//! Leases ([`LeaseStore`](crate::LeaseStore)).

use super::*;

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
