//! The SQLite store: the shared store contract, plus what only a database file
//! must get right.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{path::Path, sync::Arc};

use cmk_control_plane_domain::{
    KeyId, KeyState, OrgId, Timestamp,
    audit::{self, ChainError},
};
use cmk_control_plane_store::{
    GenericKey, IntentKind, Rewrap, SqliteStore, Store, StoreError, StoredKek,
    contract::{self, commit, event, handle, intent, kek, key, org_id, rewrap},
};
use sqlx::{Connection, SqliteConnection, sqlite::SqliteConnectOptions};
use tempfile::TempDir;

async fn open(dir: &TempDir) -> SqliteStore {
    SqliteStore::open(path(dir).to_str().unwrap())
        .await
        .expect("open store")
}

fn path(dir: &TempDir) -> std::path::PathBuf {
    dir.path().join("metadata.db")
}

/// A connection that bypasses the store, as an operator's shell would.
async fn raw(path: &Path) -> SqliteConnection {
    SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(path))
        .await
        .expect("raw connection")
}

#[tokio::test]
async fn satisfies_the_store_contract() {
    let dir = TempDir::new().unwrap();
    contract::all(&open(&dir).await).await;
}

#[tokio::test]
async fn everything_survives_closing_and_reopening() {
    let dir = TempDir::new().unwrap();
    let org = org_id("reopen");
    let generic = GenericKey {
        handle: handle(100, 1),
        check_value: "a1b2c3".into(),
        created_at: Timestamp(1_700_000_000),
    };
    let pending = intent(handle(100, 2), IntentKind::Destroy, Some(&org), 5);
    let (loaded, chain) = {
        let store = open(&dir).await;
        store
            .commit(commit(
                &org,
                None,
                vec![key("k", handle(100, 3))],
                vec![event("upload")],
            ))
            .await
            .unwrap();
        store
            .append_audit(&org, vec![event("get_keys")])
            .await
            .unwrap();
        store.record_intent(pending.clone()).await.unwrap();
        store.put_generic_key(generic.clone()).await.unwrap();
        let loaded = store.load_org(&org).await.unwrap();
        let chain = contract::chain_of(&store, &org).await;
        store.close().await;
        (loaded, chain)
    };

    // Reopened through a URL this time: the same file either way.
    let url = format!("sqlite://{}", path(&dir).display());
    let store = SqliteStore::open(&url).await.expect("reopen");
    assert_eq!(store.load_org(&org).await.unwrap(), loaded);
    assert!(loaded.is_some());
    assert_eq!(contract::chain_of(&store, &org).await, chain);
    assert_eq!(chain.len(), 2);
    assert_eq!(store.open_intents().await.unwrap(), vec![pending]);
    assert_eq!(store.generic_key().await.unwrap(), Some(generic));
    // The chain goes on where it stopped.
    store
        .append_audit(&org, vec![event("list_audit")])
        .await
        .unwrap();
    let chain = contract::chain_of(&store, &org).await;
    assert_eq!(chain[2].event.seq, 3);
    assert!(audit::verify(org.as_str(), &chain).is_ok());
}

#[tokio::test]
async fn the_database_refuses_to_change_or_remove_audit_rows() {
    let dir = TempDir::new().unwrap();
    let org = org_id("append-only");
    let store = open(&dir).await;
    store
        .append_audit(&org, vec![event("a"), event("b")])
        .await
        .unwrap();
    let before = contract::chain_of(&store, &org).await;

    let mut conn = raw(&path(&dir)).await;
    for statement in [
        "UPDATE audit SET result = 'ok, honest' WHERE seq = 1",
        "DELETE FROM audit WHERE seq = 2",
        "DELETE FROM audit",
        // REPLACE removes a row without firing delete triggers.
        "INSERT OR REPLACE INTO audit (org, seq, time, actor, key, action, result, prev_hash, hash) \
         SELECT org, seq, time, 'mallory', key, action, result, prev_hash, hash \
         FROM audit WHERE seq = 1",
        // A row out of turn, or one that does not link to its predecessor.
        "INSERT INTO audit (org, seq, time, actor, key, action, result, prev_hash, hash) \
         VALUES ('contract-append-only', 4, 0, 'x', NULL, 'x', 'ok', zeroblob(32), zeroblob(32))",
        "INSERT INTO audit (org, seq, time, actor, key, action, result, prev_hash, hash) \
         VALUES ('contract-append-only', 3, 0, 'x', NULL, 'x', 'ok', zeroblob(32), zeroblob(32))",
    ] {
        let refused = sqlx::query(statement).execute(&mut conn).await;
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
    let dir = TempDir::new().unwrap();
    let org = org_id("tampered");
    let store = open(&dir).await;
    store
        .append_audit(&org, vec![event("a"), event("b"), event("c")])
        .await
        .unwrap();

    let mut conn = raw(&path(&dir)).await;
    sqlx::query("DROP TRIGGER audit_no_update")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("UPDATE audit SET actor = 'someone else' WHERE org = ?1 AND seq = 2")
        .bind(org.as_str())
        .execute(&mut conn)
        .await
        .unwrap();

    let rows = contract::chain_of(&store, &org).await;
    assert_eq!(
        audit::verify(org.as_str(), &rows),
        Err(ChainError::Altered {
            org: org.as_str().into(),
            seq: 2
        })
    );
}

#[tokio::test]
async fn an_unknown_stored_value_is_corruption_naming_the_column() {
    let dir = TempDir::new().unwrap();
    let org = org_id("corrupt");
    let store = open(&dir).await;
    store
        .commit(commit(
            &org,
            None,
            vec![key("k", handle(101, 1))],
            Vec::new(),
        ))
        .await
        .unwrap();

    let mut conn = raw(&path(&dir)).await;
    sqlx::query("UPDATE keys SET state = 'frozen' WHERE org = ?1")
        .bind(org.as_str())
        .execute(&mut conn)
        .await
        .unwrap();
    match store.load_org(&org).await {
        Err(StoreError::Corrupt(message)) => {
            assert!(message.contains("keys.state"), "{message}");
            assert!(message.contains("frozen"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    sqlx::query("INSERT INTO intents (handle, kind, org, created_at) VALUES ('h', 'import', 'not an org id', 0)")
        .execute(&mut conn)
        .await
        .unwrap();
    match store.open_intents().await {
        Err(StoreError::Corrupt(message)) => assert!(message.contains("intents.org"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused() {
    let dir = TempDir::new().unwrap();
    std::fs::write(path(&dir), b"not a database, but long enough to have a header ....................................................................").unwrap();
    let opened = SqliteStore::open(path(&dir).to_str().unwrap()).await;
    assert!(
        matches!(opened, Err(StoreError::Corrupt(_))),
        "{:?}",
        opened.err()
    );
}

#[tokio::test]
async fn a_missing_directory_is_unavailable() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("no-such-dir").join("metadata.db");
    let opened = SqliteStore::open(missing.to_str().unwrap()).await;
    assert!(
        matches!(opened, Err(StoreError::Unavailable(_))),
        "{:?}",
        opened.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_two_concurrent_commits_from_one_version_exactly_one_wins() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(open(&dir).await);
    let org = org_id("race");
    store
        .commit(commit(
            &org,
            None,
            vec![key("k", handle(102, 0))],
            Vec::new(),
        ))
        .await
        .unwrap();

    for round in 1..=20u32 {
        let version = u64::from(round);
        let racers: Vec<_> = (0..2u32)
            .map(|racer| {
                let store = Arc::clone(&store);
                let change = commit(
                    &org,
                    Some(version),
                    vec![contract::key_in(
                        "k",
                        handle(102, round * 2 + racer),
                        KeyState::Pending,
                        None,
                    )],
                    vec![event(&format!("round {round} racer {racer}"))],
                );
                tokio::spawn(async move { store.commit(change).await })
            })
            .collect();
        let mut won = 0;
        for racer in racers {
            match racer.await.unwrap() {
                Ok(next) => {
                    assert_eq!(next, version + 1);
                    won += 1;
                }
                Err(StoreError::Conflict(_)) => {}
                Err(other) => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(won, 1, "round {round}");
    }

    let rows = contract::chain_of(&*store, &org).await;
    assert_eq!(rows.len(), 20, "only the winners' events were appended");
    assert!(audit::verify(org.as_str(), &rows).is_ok());
    assert_eq!(store.load_org(&org).await.unwrap().unwrap().version, 21);
}

/// Counts per key as the `keks` table has them, bypassing `kek_counts`.
async fn counted_by_hand(path: &Path, org: &OrgId) -> Vec<(KeyId, u64)> {
    let mut conn = raw(path).await;
    sqlx::query_as::<_, (String, i64)>(
        "SELECT key_id, count(*) FROM keks WHERE org = ?1 GROUP BY key_id ORDER BY key_id",
    )
    .bind(org.as_str())
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .map(|(key, n)| (KeyId(key), u64::try_from(n).unwrap()))
    .collect()
}

#[tokio::test]
async fn large_batches_are_written_whole_and_counted_exactly() {
    const CHECK: u32 = 103;
    let dir = TempDir::new().unwrap();
    let store = open(&dir).await;
    let org = org_id("large-batches");
    let keys = [
        ("k-1", KeyState::Rotating),
        ("k-2", KeyState::Rotating),
        ("k-3", KeyState::Active),
    ];
    let version = contract::org_with_keys(&store, CHECK, &org, &keys).await;
    // More than one multi-row statement's worth, not a multiple of it, and
    // in no particular order.
    let keks: Vec<StoredKek> = (0..1203u32)
        .rev()
        .map(|n| {
            let key = if n % 3 == 0 { "k-2" } else { "k-1" };
            kek(CHECK, n, &format!("space:{n}"), key)
        })
        .collect();
    store
        .insert_keks_unchecked(&org, keks.clone())
        .await
        .unwrap();
    assert_eq!(
        store.kek_counts(&org).await.unwrap(),
        vec![(KeyId("k-1".into()), 802), (KeyId("k-2".into()), 401)]
    );
    let version = store
        .commit(contract::start_rotation(
            &org,
            version,
            "k-3",
            &["k-1", "k-2"],
            10,
        ))
        .await
        .unwrap();

    // One batch with several (from, to) pairs, a KEK re-wrapped twice along a
    // chain (k-1 → k-2 → k-3), a stale `from`, and a no-op from a key to itself.
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
    let written = store.rewrap_keks(&org, version, 1, batch).await.unwrap();
    // Every KEK but the stale one, plus the chained KEK's second step.
    assert_eq!(written, 1203 - 1 + 1);
    assert_eq!(
        store.kek_counts(&org).await.unwrap(),
        counted_by_hand(&path(&dir), &org).await
    );
    // The stale KEK stays with k-2, the no-op one with k-1.
    assert_eq!(
        (stale.key.0.as_str(), unchanged.key.0.as_str()),
        ("k-2", "k-1")
    );
    assert_eq!(
        store.kek_counts(&org).await.unwrap(),
        vec![
            (KeyId("k-1".into()), 1),
            (KeyId("k-2".into()), 1),
            (KeyId("k-3".into()), 1201),
        ]
    );
    assert_eq!(
        contract::all_not_wrapped_by(&store, &org, "k-3", 1000)
            .await
            .len(),
        2
    );
    let job = store.latest_rotation(&org).await.unwrap().unwrap();
    assert_eq!((job.total, job.done), (1203, written));
}

#[tokio::test]
async fn a_second_running_job_of_an_org_is_refused_by_the_database() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir).await;
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
    let mut conn = raw(&path(&dir)).await;
    let refused = sqlx::query(
        "INSERT INTO rotation_jobs (org, job, target, total, done, started_at, ended_at, state) \
         VALUES (?1, 2, 'k-1', 0, 0, 2, NULL, 'running')",
    )
    .bind(org.as_str())
    .execute(&mut conn)
    .await;
    assert!(refused.is_err(), "{refused:?}");
}

#[tokio::test]
async fn unknown_kek_and_job_values_are_corruption_naming_the_column() {
    const CHECK: u32 = 105;
    let dir = TempDir::new().unwrap();
    let store = open(&dir).await;
    let org = org_id("corrupt-keks");
    let version = contract::org_with_keys(
        &store,
        CHECK,
        &org,
        &[("k-1", KeyState::Active), ("k-2", KeyState::Pending)],
    )
    .await;
    let stored = kek(CHECK, 1, "space:1", "k-1");
    store
        .insert_kek(&org, version, stored.clone(), Vec::new())
        .await
        .unwrap();
    store
        .commit(contract::start_rotation(&org, version, "k-2", &["k-1"], 1))
        .await
        .unwrap();

    let mut conn = raw(&path(&dir)).await;
    sqlx::query("UPDATE keks SET resource = 'no spaces allowed' WHERE org = ?1")
        .bind(org.as_str())
        .execute(&mut conn)
        .await
        .unwrap();
    match store.kek(&org, &stored.id).await {
        Err(StoreError::Corrupt(message)) => {
            assert!(message.contains("keks.resource"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    sqlx::query("UPDATE rotation_jobs SET state = 'paused' WHERE org = ?1")
        .bind(org.as_str())
        .execute(&mut conn)
        .await
        .unwrap();
    match store.latest_rotation(&org).await {
        Err(StoreError::Corrupt(message)) => {
            assert!(message.contains("rotation_jobs.state"), "{message}");
            assert!(message.contains("paused"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn keks_jobs_and_retired_keys_survive_closing_and_reopening() {
    const CHECK: u32 = 106;
    let dir = TempDir::new().unwrap();
    let org = org_id("reopen-keks");
    let first = GenericKey {
        handle: handle(CHECK, 1),
        check_value: "a1b2c3".into(),
        created_at: Timestamp(1_700_000_000),
    };
    let second = GenericKey {
        handle: handle(CHECK, 2),
        ..first.clone()
    };
    let stored = kek(CHECK, 1, "space:1", "k-1");
    let (job, counts) = {
        let store = open(&dir).await;
        let version = contract::org_with_keys(
            &store,
            CHECK,
            &org,
            &[("k-1", KeyState::Active), ("k-2", KeyState::Pending)],
        )
        .await;
        store
            .insert_kek(&org, version, stored.clone(), Vec::new())
            .await
            .unwrap();
        store
            .commit(contract::start_rotation(&org, version, "k-2", &["k-1"], 1))
            .await
            .unwrap();
        store.put_generic_key(first.clone()).await.unwrap();
        store
            .renew_generic_key(&first.handle, second.clone())
            .await
            .unwrap();
        let job = store.latest_rotation(&org).await.unwrap();
        let counts = store.kek_counts(&org).await.unwrap();
        store.close().await;
        (job, counts)
    };
    let store = open(&dir).await;
    assert_eq!(store.kek(&org, &stored.id).await.unwrap(), Some(stored));
    assert_eq!(store.latest_rotation(&org).await.unwrap(), job);
    assert!(job.is_some());
    assert_eq!(store.running_rotations().await.unwrap(), vec![job.unwrap()]);
    assert_eq!(store.kek_counts(&org).await.unwrap(), counts);
    assert_eq!(store.generic_key().await.unwrap(), Some(second));
    assert_eq!(store.retired_generic_keys().await.unwrap(), vec![first]);
}
