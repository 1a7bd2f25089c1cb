//! The PostgreSQL store against a real server: the shared store contract,
//! writers racing through two stores as replicas do, and what only the
//! server's schema must get right.
//!
//! Each test works in a database of its own (see `testdb`); these tests
//! are never skipped: without a server, every one of them fails and says how
//! to start one.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use cmk_control_plane_domain::{KeyId, KeyState, OrgId};
use sqlx::Connection;

use cmk_control_plane_store::{
    AuditStore, GenericKeyStore, IntentStore, KekStore, OrgStore, PgStore, PgStoreOptions,
    StoreError,
    contract::{self, commit, event, handle, kek, key, org_id},
    testdb::TestDb,
};

#[tokio::test]
async fn satisfies_the_store_contract() {
    let db = TestDb::create().await;
    contract::all(&db.open().await).await;
}

#[tokio::test]
async fn two_stores_on_one_database_lose_no_write() {
    let db = TestDb::create().await;
    // The store must name its isolation level rather than take the
    // database's: under SERIALIZABLE, a writer's snapshot would predate the
    // lock it waits for.
    sqlx::raw_sql(&format!(
        "ALTER DATABASE {} SET default_transaction_isolation = 'serializable'",
        db.name()
    ))
    .execute(&mut db.raw().await)
    .await
    .unwrap();
    let (a, b) = (db.open().await, db.open().await);
    contract::two_instances(&a, &b).await;
}

#[tokio::test]
async fn everything_survives_closing_and_reopening() {
    let db = TestDb::create().await;
    let written = {
        let store = PgStore::open(&db.url()).await.expect("open");
        let written = contract::write_for_reopening(&store).await;
        store.close().await;
        written
    };
    // Migrations already applied are recognised, not run again.
    let store = PgStore::open(&db.url()).await.expect("reopen");
    contract::assert_reopened(&store, &written).await;
}

#[tokio::test]
async fn ids_are_ordered_bytewise_whatever_the_database_collation() {
    let db = TestDb::create().await;
    let store = db.open().await;
    // In en-US these sort `_`, `.z`, `a`, `B`; in byte order `.z`, `B`, `_`, `a`.
    let names = ["contract-a", "contract-B", "contract-_", "contract-.z"];
    let orgs: Vec<OrgId> = names.iter().map(|n| OrgId::parse(n).unwrap()).collect();
    for org in &orgs {
        store
            .append_audit(org, vec![event("get_keys")])
            .await
            .unwrap();
    }
    let mut expected = orgs.clone();
    expected.sort();
    assert_eq!(store.audited_orgs().await.unwrap(), expected);

    let org = org_id("collation");
    let keys = [
        ("k-a", KeyState::Rotating),
        ("k-B", KeyState::Rotating),
        ("k-_", KeyState::Active),
    ];
    let version = contract::org_with_keys(&store, 107, &org, &keys).await;
    for (n, (key, _)) in (0..).zip(keys) {
        store
            .insert_kek(
                &org,
                version,
                kek(107, n, &format!("r-{n}"), key),
                Vec::new(),
            )
            .await
            .unwrap();
    }
    let mut expected: Vec<(KeyId, u64)> =
        keys.iter().map(|(k, _)| (KeyId((*k).into()), 1)).collect();
    expected.sort();
    assert_eq!(store.kek_counts(&org).await.unwrap(), expected);
}

#[tokio::test]
async fn the_database_refuses_to_change_or_remove_audit_rows() {
    let db = TestDb::create().await;
    let org = org_id("append-only");
    let store = db.open().await;
    store
        .append_audit(&org, vec![event("a"), event("b")])
        .await
        .unwrap();
    let before = contract::chain_of(&store, &org).await;

    let mut conn = db.raw().await;
    for statement in [
        "UPDATE audit SET result = 'ok, honest' WHERE seq = 1",
        "DELETE FROM audit WHERE seq = 2",
        "DELETE FROM audit",
        "TRUNCATE audit",
        // An upsert that would replace a row goes through the update trigger.
        "INSERT INTO audit (org, seq, time, actor, key, action, result, prev_hash, hash) \
         SELECT org, seq, time, 'mallory', key, action, result, prev_hash, hash \
         FROM audit WHERE seq = 1 \
         ON CONFLICT (org, seq) DO UPDATE SET actor = excluded.actor",
        // A row out of turn, or one that does not link to its predecessor.
        "INSERT INTO audit (org, seq, time, actor, key, action, result, prev_hash, hash) \
         VALUES ('contract-append-only', 4, 0, 'x', NULL, 'x', 'ok', \
                 decode(repeat('00', 32), 'hex'), decode(repeat('00', 32), 'hex'))",
        "INSERT INTO audit (org, seq, time, actor, key, action, result, prev_hash, hash) \
         VALUES ('contract-append-only', 3, 0, 'x', NULL, 'x', 'ok', \
                 decode(repeat('00', 32), 'hex'), decode(repeat('00', 32), 'hex'))",
    ] {
        let refused = sqlx::raw_sql(statement).execute(&mut conn).await;
        let Err(sqlx::Error::Database(e)) = refused else {
            panic!("{statement}: {refused:?}");
        };
        assert!(
            e.message().starts_with("audit rows "),
            "{statement}: refused by a trigger, not by chance: {}",
            e.message()
        );
    }
    assert_eq!(contract::chain_of(&store, &org).await, before);
}

#[tokio::test]
async fn a_row_changed_behind_the_triggers_back_is_named_by_verify() {
    let db = TestDb::create().await;
    let mut conn = db.raw().await;
    contract::a_changed_audit_row_is_named_by_verify(&db.open().await, |org| async move {
        sqlx::raw_sql("ALTER TABLE audit DISABLE TRIGGER audit_no_update")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("UPDATE audit SET actor = 'someone else' WHERE org = $1 AND seq = 2")
            .bind(org.as_str())
            .execute(&mut conn)
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn unknown_stored_values_are_corruption_naming_the_column() {
    let db = TestDb::create().await;
    let mut conn = db.raw().await;
    contract::unknown_stored_values_are_corruption_naming_the_column(
        &db.open().await,
        |org| async move {
            for statement in contract::TAMPERING {
                sqlx::query(statement)
                    .bind(org.as_str())
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_second_running_job_of_an_org_is_refused_by_the_database() {
    let db = TestDb::create().await;
    let store = db.open().await;
    let org = org_id("one-running");
    let version = contract::org_with_keys(
        &store,
        104,
        &org,
        &[("k-1", KeyState::Active), ("k-2", KeyState::Pending)],
    )
    .await;
    store
        .commit(contract::start_rotation(&org, version, "k-2", &["k-1"], 1))
        .await
        .unwrap();
    let refused = sqlx::query(
        "INSERT INTO rotation_jobs (org, job, target, total, done, started_at, ended_at, state) \
         VALUES ($1, 2, 'k-1', 0, 0, 2, NULL, 'running')",
    )
    .bind(org.as_str())
    .execute(&mut db.raw().await)
    .await;
    assert!(refused.is_err(), "{refused:?}");
}

#[tokio::test]
async fn large_batches_are_written_whole_and_counted_exactly() {
    let db = TestDb::create().await;
    let store = db.open().await;
    let seeder = &store;
    let org = contract::large_batches_are_written_whole_and_counted_exactly(
        &store,
        |org, keks| async move { seeder.insert_keks_unchecked(&org, keks).await },
    )
    .await;
    // Counted from the KEKs themselves, bypassing `kek_counts`.
    let by_hand: Vec<(KeyId, u64)> = sqlx::query_as::<_, (String, i64)>(
        "SELECT key_id, count(*) FROM keks WHERE org = $1 GROUP BY key_id ORDER BY key_id",
    )
    .bind(org.as_str())
    .fetch_all(&mut db.raw().await)
    .await
    .unwrap()
    .into_iter()
    .map(|(key, n)| (KeyId(key), u64::try_from(n).unwrap()))
    .collect();
    assert_eq!(store.kek_counts(&org).await.unwrap(), by_hand);
}

#[tokio::test]
async fn a_writer_kept_waiting_past_the_lock_timeout_is_unavailable() {
    let db = TestDb::create().await;
    // A URL that turns the lock timeout off is overridden.
    let url = format!("{}&options=-c%20lock_timeout%3D0", db.url());
    let store = PgStore::open(&url).await.expect("open");
    let org = org_id("lock-timeout");
    store
        .commit(commit(
            &org,
            None,
            vec![key("k", handle(108, 1))],
            Vec::new(),
        ))
        .await
        .unwrap();

    // An operator's transaction holds the org's row.
    let mut conn = db.raw().await;
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM orgs WHERE org = $1 FOR UPDATE")
        .bind(org.as_str())
        .execute(&mut *tx)
        .await
        .unwrap();
    let started = Instant::now();
    let blocked = store
        .commit(commit(&org, Some(1), Vec::new(), vec![event("blocked")]))
        .await;
    assert!(
        matches!(blocked, Err(StoreError::Unavailable(_))),
        "{blocked:?}"
    );
    let waited = started.elapsed();
    assert!(
        (Duration::from_secs(4)..Duration::from_secs(30)).contains(&waited),
        "waited {waited:?}"
    );
    tx.rollback().await.unwrap();
    assert!(contract::chain_of(&store, &org).await.is_empty());
    assert_eq!(
        store
            .commit(commit(&org, Some(1), Vec::new(), Vec::new()))
            .await
            .unwrap(),
        2
    );
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    let options = PgStoreOptions {
        acquire_timeout: Duration::from_secs(1),
        ..PgStoreOptions::default()
    };
    // Port 1 on the loopback interface: nothing listens there.
    let opened = PgStore::open_with("postgres://postgres@127.0.0.1:1/test", options).await;
    assert!(
        matches!(opened, Err(StoreError::Unavailable(_))),
        "{:?}",
        opened.err()
    );
}

/// The generic key's race with real concurrency: a commit that gives an org
/// the key waits for a renewal in progress (which holds the key's row), then
/// sees the renewed key and is refused; so a drop of the old key, which comes
/// after the renewal, can never miss the org's record of it.
#[tokio::test]
async fn a_commit_taking_the_generic_key_waits_for_a_renewal_and_sees_it() {
    let db = TestDb::create().await;
    let store = db.open().await;
    let (old, new) = (handle(109, 1), handle(109, 2));
    store
        .record_intent(contract::intent(
            old.clone(),
            cmk_control_plane_store::IntentKind::Import,
            None,
            1,
        ))
        .await
        .unwrap();
    store
        .put_generic_key(cmk_control_plane_store::GenericKey {
            handle: old.clone(),
            check_value: "109109".into(),
            created_at: cmk_control_plane_domain::Timestamp(1),
        })
        .await
        .unwrap();

    // A renewal in progress on another replica: the row is locked and
    // already holds the new handle, not yet committed.
    let mut conn = db.raw().await;
    let mut renewal = conn.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM generic_key WHERE id = 1 FOR UPDATE")
        .execute(&mut *renewal)
        .await
        .unwrap();
    sqlx::query("UPDATE generic_key SET handle = $1 WHERE id = 1")
        .bind(&new)
        .execute(&mut *renewal)
        .await
        .unwrap();

    let org = org_id("generic-lock");
    let mut user = contract::key_in("k-generic", old.clone(), KeyState::Active);
    user.record.source = cmk_control_plane_domain::KeySource::GenericDefault;
    let taking = cmk_control_plane_store::Commit {
        uses_generic: Some(old.clone()),
        ..commit(&org, None, vec![user], Vec::new())
    };
    let racer = {
        let store = db.open().await;
        tokio::spawn(async move { store.commit(taking).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!racer.is_finished(), "the commit waits for the renewal");
    renewal.commit().await.unwrap();
    let taken = racer.await.unwrap();
    assert!(
        matches!(taken, Err(StoreError::GenericKeyChanged)),
        "{taken:?}"
    );
    assert_eq!(store.load_org(&org).await.unwrap(), None);
}
