//! What a store must keep across closing and reopening, and what it must
//! refuse to read back: everything stored, and values written behind its back.

use super::*;

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
        Err(StoreError::Corrupt(corruption)) => {
            let message = corruption.to_string();
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
