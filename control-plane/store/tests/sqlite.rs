//! The SQLite store: the shared store contract, plus what only a database file
//! must get right.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;

use cmk_control_plane_domain::{KeyId, KeyState, OrgId};
use cmk_control_plane_store::{
    AuditStore, KekStore, OrgStore, SqliteStore, StoreError,
    contract::{self, event, org_id},
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
    let written = {
        let store = open(&dir).await;
        let written = contract::write_for_reopening(&store).await;
        store.close().await;
        written
    };
    // Reopened through a URL this time: the same file either way.
    let url = format!("sqlite://{}", path(&dir).display());
    let store = SqliteStore::open(&url).await.expect("reopen");
    contract::assert_reopened(&store, &written).await;
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
    let file = path(&dir);
    contract::a_changed_audit_row_is_named_by_verify(&open(&dir).await, |org| async move {
        let mut conn = raw(&file).await;
        sqlx::query("DROP TRIGGER audit_no_update")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("UPDATE audit SET actor = 'someone else' WHERE org = ?1 AND seq = 2")
            .bind(org.as_str())
            .execute(&mut conn)
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn unknown_stored_values_are_corruption_naming_the_column() {
    let dir = TempDir::new().unwrap();
    let file = path(&dir);
    contract::unknown_stored_values_are_corruption_naming_the_column(
        &open(&dir).await,
        |org| async move {
            let mut conn = raw(&file).await;
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

#[tokio::test]
async fn two_stores_on_one_file_lose_no_write() {
    let dir = TempDir::new().unwrap();
    contract::two_instances(&open(&dir).await, &open(&dir).await).await;
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
    let dir = TempDir::new().unwrap();
    let store = open(&dir).await;
    let seeder = &store;
    let org = contract::large_batches_are_written_whole_and_counted_exactly(
        &store,
        |org, keks| async move { seeder.insert_keks_unchecked(&org, keks).await },
    )
    .await;
    assert_eq!(
        store.kek_counts(&org).await.unwrap(),
        counted_by_hand(&path(&dir), &org).await
    );
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
