//! Signed audit checkpoints against an attacker who can write the database:
//! the real control plane and HSM daemon over mutual TLS write the log and
//! its checkpoints; the test then drops the append-only triggers, as an
//! attacker would, rewrites or cuts rows (recomputing the hash chain so that
//! it still verifies on its own) or forges a checkpoint, on SQLite and on
//! PostgreSQL, and `control-plane verify-audit` (exit code and message) and
//! `VerifyAuditLog` say what was done.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::PathBuf, process::Command};

use cmk_control_plane_domain::{OrgId, audit};
use cmk_control_plane_store::{Store, testdb::TestDb};
use cmk_hsm_daemon::Limits;
use cmk_proto::control::v1 as pb;
use cmk_tests::control_plane::{self, Deployment};

/// Where the control plane keeps its metadata in one run.
enum Database {
    Sqlite,
    Postgres(Box<TestDb>),
}

/// A value bound to a tampering statement.
enum Bind {
    Text(String),
    Int(i64),
    Bytes(Vec<u8>),
}

impl Database {
    /// Both processes, the control plane exporting checkpoints to `export`.
    async fn start(&self, export: PathBuf) -> Deployment {
        let url = match self {
            Self::Sqlite => None,
            Self::Postgres(db) => Some(db.url()),
        };
        Deployment::start_with(Limits::default(), move |raw| {
            if let Some(url) = &url {
                raw.database = Some(url.clone());
            }
            raw.audit_export_file = Some(export.clone());
        })
        .await
    }

    fn url(&self, d: &Deployment) -> String {
        match self {
            Self::Sqlite => d.database_url(),
            Self::Postgres(db) => db.url(),
        }
    }

    async fn store(&self, d: &Deployment) -> Box<dyn Store> {
        match self {
            Self::Sqlite => Box::new(
                cmk_control_plane_store::SqliteStore::open(&d.database().display().to_string())
                    .await
                    .unwrap(),
            ),
            Self::Postgres(db) => Box::new(db.open().await),
        }
    }

    /// Runs `sql` with `binds` ($1, $2, … on both) on the raw database.
    async fn exec(&self, d: &Deployment, sql: &str, binds: Vec<Bind>) {
        use sqlx::Connection;
        macro_rules! run {
            ($conn:expr) => {{
                let mut query = sqlx::query(sql);
                for bind in binds {
                    query = match bind {
                        Bind::Text(v) => query.bind(v),
                        Bind::Int(v) => query.bind(v),
                        Bind::Bytes(v) => query.bind(v),
                    };
                }
                query.execute(&mut $conn).await.unwrap();
            }};
        }
        match self {
            Self::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&d.database_url())
                    .await
                    .unwrap();
                run!(conn);
                conn.close().await.unwrap();
            }
            Self::Postgres(db) => {
                let mut conn = db.raw().await;
                run!(conn);
                conn.close().await.unwrap();
            }
        }
    }

    /// Drops the append-only triggers of the rows and of the checkpoints.
    async fn drop_triggers(&self, d: &Deployment) {
        let on = |table: &str| match self {
            Self::Sqlite => String::new(),
            Self::Postgres(_) => format!(" ON {table}"),
        };
        for (trigger, table) in [
            ("audit_no_update", "audit"),
            ("audit_no_delete", "audit"),
            ("audit_checkpoints_no_update", "audit_checkpoints"),
            ("audit_checkpoints_no_delete", "audit_checkpoints"),
        ] {
            let sql = format!("DROP TRIGGER {trigger}{}", on(table));
            self.exec(d, &sql, Vec::new()).await;
        }
    }
}

/// The daemon's audit public key, written where verify-audit reads it.
async fn audit_public_key(d: &Deployment, dir: &std::path::Path) -> PathBuf {
    let path = dir.join("audit-public-key.pem");
    d.hsm
        .pki
        .write_audit_public_key(d.hsm.daemon.addr, &path)
        .await;
    path
}

/// `control-plane verify-audit` on the database: exit code and stdout.
fn verify_audit(url: &str, key: &std::path::Path) -> (i32, String) {
    let out = Command::new(cmk_tests::binary("control-plane"))
        .arg("verify-audit")
        .arg("--database")
        .arg(url)
        .arg("--audit-public-key")
        .arg(key)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    eprintln!(
        "verify-audit: {:?}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap(), stdout)
}

#[tokio::test(flavor = "multi_thread")]
async fn rewrites_cut_rows_and_forged_checkpoints_are_found_on_sqlite() {
    tampering_is_found(Database::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rewrites_cut_rows_and_forged_checkpoints_are_found_on_postgresql() {
    tampering_is_found(Database::Postgres(Box::new(TestDb::create().await))).await;
}

async fn tampering_is_found(db: Database) {
    let work = tempfile::tempdir().unwrap();
    let export = work.path().join("checkpoints.jsonl");
    let mut d = db.start(export.clone()).await;
    // Key-state changes (checkpointed at once) and reads (by the timers or
    // the clean stop) in two orgs.
    for org in ["acme", "globex"] {
        let mut admin = d.client(&format!("admin-{org}")).await;
        control_plane::set_byok(&mut admin, org, true).await;
        control_plane::set_byok(&mut admin, org, false).await;
        control_plane::set_byok(&mut admin, org, true).await;
        for _ in 0..3 {
            admin
                .list_keys(pb::ListKeysRequest { org_id: org.into() })
                .await
                .unwrap();
        }
    }
    // Reads change no key state: the timers (every second here) cover them.
    let mut reader = d.client("reader-acme").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let check = reader
            .verify_audit_log(pb::VerifyAuditLogRequest {
                org_id: "acme".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(check.intact, "{}", check.problem);
        // Each verification is itself audited after it checked.
        if check.covered_through_seq == check.events {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "events left uncovered by the timers: {check:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    d.stop_control_plane().await;
    let key = audit_public_key(&d, work.path()).await;
    let url = db.url(&d);

    let (code, stdout) = verify_audit(&url, &key);
    assert_eq!(code, 0, "{stdout}");
    let store = db.store(&d).await;
    for org in ["acme", "globex"] {
        let org_id = OrgId::parse(org).unwrap();
        let head = store.audit_head(&org_id).await.unwrap().unwrap().event.seq;
        assert!(
            stdout.contains(&format!("{org}: intact, {head} events"))
                && stdout.contains(&format!("covered through seq {head}\n")),
            "a clean stop leaves every event of {org} under a signed checkpoint: {stdout}"
        );
    }

    // Every checkpoint stored went to the export too, verifiable offline.
    let der =
        cmk_proto::checkpoint::public_key_der(&std::fs::read_to_string(&key).unwrap()).unwrap();
    let lines = std::fs::read_to_string(&export).unwrap();
    let mut exported = 0;
    for line in lines.lines() {
        let c: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(c["type"], "checkpoint");
        let checkpoint = cmk_proto::checkpoint::Checkpoint {
            org: c["org"].as_str().unwrap().to_owned(),
            seq: c["seq"].as_u64().unwrap(),
            head: hex::decode(c["head"].as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap(),
            time: c["time"].as_i64().unwrap(),
        };
        let signature = hex::decode(c["signature"].as_str().unwrap()).unwrap();
        assert!(checkpoint.verify(&der, &signature), "{line}");
        exported += 1;
    }
    let mut stored = 0;
    for org in ["acme", "globex"] {
        stored += store
            .checkpoints(&OrgId::parse(org).unwrap(), 0, 1000)
            .await
            .unwrap()
            .len();
    }
    assert_eq!(exported, stored, "{lines}");

    db.drop_triggers(&d).await;

    // acme: one row changed and the chain recomputed from there on, so that
    // the chain alone still verifies.
    let acme = OrgId::parse("acme").unwrap();
    let mut rows = store.audit_events(&acme, 0, 1000).await.unwrap();
    rows[1].event.actor = "spiffe://cmk.test/someone-else".into();
    let mut prev: Option<audit::ChainedEvent> = Some(rows[0].clone());
    for row in rows.iter().skip(1) {
        let rechained = audit::chain(prev.as_ref(), row.event.clone());
        db.exec(
            &d,
            "UPDATE audit SET actor = $1, prev_hash = $2, hash = $3 WHERE org = 'acme' AND seq = $4",
            vec![
                Bind::Text(rechained.event.actor.clone()),
                Bind::Bytes(rechained.prev_hash.to_vec()),
                Bind::Bytes(rechained.hash.to_vec()),
                Bind::Int(rechained.event.seq as i64),
            ],
        )
        .await;
        prev = Some(rechained);
    }
    let rewritten = store.audit_events(&acme, 0, 1000).await.unwrap();
    assert!(
        audit::verify("acme", &rewritten).is_ok(),
        "the chain alone says intact"
    );

    // globex: a checkpoint signed by another key, at a seq no checkpoint has.
    let globex = OrgId::parse("globex").unwrap();
    let globex_rows = store.audit_events(&globex, 0, 1000).await.unwrap();
    let covered: Vec<u64> = store
        .checkpoints(&globex, 0, 1000)
        .await
        .unwrap()
        .iter()
        .map(|c| c.seq)
        .collect();
    let free = globex_rows
        .iter()
        .find(|r| !covered.contains(&r.event.seq))
        .expect("a seq without a checkpoint");
    db.exec(
        &d,
        "INSERT INTO audit_checkpoints (org, seq, head, time, key_id, signature) \
         VALUES ('globex', $1, $2, 1700000000, $3, $4)",
        vec![
            Bind::Int(free.event.seq as i64),
            Bind::Bytes(free.hash.to_vec()),
            Bind::Text("ab".repeat(32)),
            Bind::Bytes(vec![7; 64]),
        ],
    )
    .await;

    let (code, stdout) = verify_audit(&url, &key);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(
            "acme: BROKEN: the event at seq 2 differs from the one the checkpoint signed at"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "globex: BROKEN: checkpoint at seq {} is signed by key {}, which is not the audit signing key",
            free.event.seq,
            "ab".repeat(32)
        )),
        "{stdout}"
    );

    // globex again: the forged checkpoint gone, the newest two rows cut off.
    db.exec(
        &d,
        "DELETE FROM audit_checkpoints WHERE org = 'globex' AND key_id = $1",
        vec![Bind::Text("ab".repeat(32))],
    )
    .await;
    let last = globex_rows.last().unwrap().event.seq;
    db.exec(
        &d,
        "DELETE FROM audit WHERE org = 'globex' AND seq > $1",
        vec![Bind::Int(last as i64 - 2)],
    )
    .await;
    let (code, stdout) = verify_audit(&url, &key);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!(
            "globex: BROKEN: the chain ends at seq {}, but the checkpoint signed at",
            last - 2
        )) && stdout.contains(&format!("counts {last} events: rows were cut off")),
        "{stdout}"
    );

    // globex once more: a real checkpoint's signature altered by one bit.
    let first = store.checkpoints(&globex, 0, 1).await.unwrap().remove(0);
    let mut altered = first.signature.clone();
    altered[10] ^= 1;
    db.exec(
        &d,
        "UPDATE audit_checkpoints SET signature = $1 WHERE org = 'globex' AND seq = $2",
        vec![Bind::Bytes(altered), Bind::Int(first.seq as i64)],
    )
    .await;
    let (code, stdout) = verify_audit(&url, &key);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!(
            "globex: BROKEN: checkpoint at seq {} has a signature that does not verify",
            first.seq
        )),
        "{stdout}"
    );

    // The API says the same to the org's admin.
    d.start_control_plane().await;
    let check = d
        .client("admin-acme")
        .await
        .verify_audit_log(pb::VerifyAuditLogRequest {
            org_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!check.intact);
    assert!(check.problem.contains("rewritten"), "{}", check.problem);
}
