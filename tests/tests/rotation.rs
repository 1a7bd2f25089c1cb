//! End-to-end: rotation jobs re-wrap thousands of KEKs to the new master key,
//! report their progress, survive SIGKILL of both processes mid-way (the real
//! binaries), give way to a newer activation, and move to another replica
//! when the one working them dies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use cmk_control_plane_store::testdb::TestDb;

use cmk_hsm_daemon::Limits;
use cmk_proto::control::v1::{self as pb, KeyState, RotationState};
use cmk_tests::{
    ANY_PORT, ControlPlaneProcess, DaemonProcess, Pki,
    control_plane::{
        Admin, Content, ContentKey, Deployment, admin_at, assert_all_decrypt, audit_log,
        content_at, create_keks, generate_data_keys, preview_revocation, seed_keks, set_byok,
        state_of, upload_new_key, wait_for_rotation,
    },
};

const ORG: &str = "acme";
/// Parallel callers creating KEKs.
const CALLERS: usize = 32;
/// KEKs of each test created through CreateKek; the rest are seeded.
const THROUGH_API: usize = 200;
/// Longest any rotation here may take before the test gives up on it.
const PATIENCE: Duration = Duration::from_secs(60);

fn key_req(key_id: &str) -> pb::KeyRequest {
    pb::KeyRequest {
        org_id: ORG.into(),
        key_id: key_id.into(),
    }
}

async fn rotation(admin: &mut Admin) -> pb::Rotation {
    admin
        .get_rotation(pb::GetRotationRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn list(admin: &mut Admin) -> pb::ListKeysResponse {
    admin
        .list_keys(pb::ListKeysRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Where a deployment's parts are, for seeding KEKs.
struct Parts<'a> {
    pki: &'a Pki,
    hsm: SocketAddr,
    /// The store's URL.
    database: String,
}

/// BYOK on and an uploaded master key; `n` KEKs under it — `THROUGH_API` of
/// them created through CreateKek by concurrent callers, the rest seeded — and
/// a content key under every `every`-th. Returns the key, the KEK ids and the
/// content keys.
async fn org_with_keks(
    admin: &mut Admin,
    svc: &Content,
    parts: Parts<'_>,
    dir: &Path,
    n: usize,
    every: usize,
) -> (String, Vec<String>, Vec<ContentKey>) {
    set_byok(admin, ORG, true).await;
    let master = upload_new_key(admin, ORG, dir, "first", true).await;
    assert_eq!(master.state(), KeyState::Active);
    let started = Instant::now();
    let mut keks: Vec<String> = create_keks(svc, ORG, "api:", THROUGH_API, CALLERS)
        .await
        .into_iter()
        .map(|k| {
            assert!(k.created);
            assert_eq!(k.key_id, master.key_id);
            k.kek_id
        })
        .collect();
    let created = started.elapsed();
    let seeded = seed_keks(
        parts.pki,
        parts.hsm,
        &parts.database,
        ORG,
        "seeded:",
        n - THROUGH_API,
    )
    .await;
    println!(
        "{THROUGH_API} KEKs created in {created:?}, {} seeded in {:?}",
        seeded.len(),
        started.elapsed() - created
    );
    // The service sees a seeded KEK as its own.
    let same = svc
        .clone()
        .create_kek(pb::CreateKekRequest {
            org_id: ORG.into(),
            resource: "seeded:7".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((&same.kek_id, same.created), (&seeded[7], false));
    assert_eq!(same.key_id, master.key_id);
    keks.extend(seeded);
    let some: Vec<String> = keks.iter().step_by(every).cloned().collect();
    let samples = generate_data_keys(svc, ORG, &some).await;
    (master.key_id, keks, samples)
}

/// Every KEK wrapped by `active`, none by any other key, the old ones
/// deactivated, every content key still opening, and (with `every_kek`) every
/// KEK still serving new content keys.
async fn assert_rotated(
    admin: &mut Admin,
    svc: &Content,
    active: &str,
    old: &[&str],
    keks: &[String],
    samples: &[ContentKey],
    every_kek: bool,
) {
    let listing = list(admin).await;
    assert_eq!(listing.active_key_id, active);
    for key in old {
        assert_eq!(
            state_of(&listing, key),
            Some(KeyState::Deactivated),
            "{key}"
        );
        let preview = preview_revocation(admin, ORG, key).await;
        assert_eq!(preview.keks_wrapped_by_key, 0, "{key}");
    }
    let preview = preview_revocation(admin, ORG, active).await;
    assert_eq!(preview.keks_wrapped_by_key, keks.len() as u64);
    // Revoking blocks the whole org; the generic default key cannot be revoked.
    let unreadable = if preview.revocable {
        keks.len() as u64
    } else {
        0
    };
    assert_eq!(preview.keks_unreadable, unreadable);
    assert_all_decrypt(svc, ORG, samples).await;
    if every_kek {
        // A content key under every KEK: each one unwraps.
        generate_data_keys(svc, ORG, keks).await;
    }
    let check = admin
        .verify_audit_log(pb::VerifyAuditLogRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner();
    assert!(check.intact, "{}", check.problem);
}

/// The audit events of a finished rotation from `old` to `new`.
async fn assert_rotation_audited(admin: &mut Admin, old: &[&str], new: &str, job: &pb::Rotation) {
    let events = audit_log(admin, ORG).await;
    let has = |action: &str| {
        events
            .iter()
            .any(|e| e.action == action && e.result == "ok" && e.actor == "service")
    };
    for key in old {
        let finished = format!("rotation finished for key {key}: 0 KEKs wrapped by it (counted)");
        assert!(has(&finished), "{finished:?}");
    }
    let finished = format!(
        "rotation job {} finished: {} of {} KEKs re-wrapped to {new}",
        job.job_id, job.done, job.total
    );
    assert!(has(&finished), "{finished:?}");
    let started = format!(
        "rotation started: re-wrapping the KEKs of {} to {new}",
        old.join(", ")
    );
    assert!(
        events
            .iter()
            .any(|e| e.action == started && e.key_id == new && e.result == "ok"),
        "{started:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_rewraps_thousands_of_keks_and_reports_its_progress() {
    const KEKS: usize = 3000;
    let mut d =
        Deployment::start_with(Limits::default(), |raw| raw.rotation_batch = Some(25)).await;
    let work = tempfile::tempdir().unwrap();
    let mut admin = d.client("admin-acme").await;
    let svc = d.content("service-acme").await;
    let (old, keks, samples) =
        org_with_keks(&mut admin, &svc, parts(&d), work.path(), KEKS, 10).await;

    let new = upload_new_key(&mut admin, ORG, work.path(), "second", false)
        .await
        .key_id;
    let activated = admin
        .activate_key(key_req(&new))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(activated.key.unwrap().state(), KeyState::Active);
    let started = Instant::now();

    // Progress as an admin watches it.
    let mut seen = vec![rotation(&mut admin).await];
    let first = &seen[0];
    assert_eq!(first.target_key_id, new);
    assert_eq!(first.from_key_ids, vec![old.clone()]);
    assert_eq!(first.total, KEKS as u64);
    assert!(first.started_at.is_some());
    while seen.last().unwrap().state() == RotationState::Running {
        assert!(started.elapsed() < PATIENCE, "{:?}", seen.last());
        tokio::time::sleep(Duration::from_millis(10)).await;
        seen.push(rotation(&mut admin).await);
    }
    println!("{KEKS} KEKs re-wrapped in {:?}", started.elapsed());
    let last = seen.last().unwrap().clone();
    assert_eq!(last.state(), RotationState::Finished, "{last:?}");
    assert_eq!((last.done, last.total), (KEKS as u64, KEKS as u64));
    assert!(last.ended_at.is_some());
    assert_eq!(last.eta_seconds, 0);
    for pair in seen.windows(2) {
        assert_eq!(pair[0].job_id, pair[1].job_id);
        assert_eq!(pair[0].total, pair[1].total);
        assert!(pair[0].done <= pair[1].done, "progress only grows");
    }
    let midway: Vec<_> = seen
        .iter()
        .filter(|j| j.state() == RotationState::Running && j.done > 0 && j.done < j.total)
        .collect();
    println!(
        "{} polls, {} while part-way: {:?}",
        seen.len(),
        midway.len(),
        midway.iter().map(|j| j.done).collect::<Vec<_>>()
    );
    assert!(!midway.is_empty(), "progress was visible part-way");
    assert!(
        midway.iter().all(|j| j.rate_per_second >= 0.0),
        "{midway:?}"
    );

    assert_rotated(&mut admin, &svc, &new, &[&old], &keks, &samples, false).await;
    assert_rotation_audited(&mut admin, &[&old], &new, &last).await;
    // With a cold cache every KEK is unwrapped by the new key.
    d.restart().await;
    let mut admin = d.client("admin-acme").await;
    let svc = d.content("service-acme").await;
    assert_rotated(&mut admin, &svc, &new, &[&old], &keks, &samples, true).await;
}

/// A second activation while the first job runs: the first job is
/// superseded, the second re-wraps everything to the newest key, and both
/// older keys end deactivated.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_activation_supersedes_the_running_job() {
    const KEKS: usize = 1500;
    // One KEK per batch, so that the first job is still part-way when the
    // third key is activated: in batches of 10 a fast run had re-wrapped all
    // 1500 by then.
    let d = Deployment::start_with(Limits::default(), |raw| raw.rotation_batch = Some(1)).await;
    let work = tempfile::tempdir().unwrap();
    let mut admin = d.client("admin-acme").await;
    let svc = d.content("service-acme").await;
    let (first, keks, samples) =
        org_with_keks(&mut admin, &svc, parts(&d), work.path(), KEKS, 10).await;
    let second = upload_new_key(&mut admin, ORG, work.path(), "second", false)
        .await
        .key_id;
    admin.activate_key(key_req(&second)).await.unwrap();
    let job1 = wait_for_rotation(&mut admin, ORG, PATIENCE, |j| j.done > 0).await;
    assert_eq!(job1.target_key_id, second);
    // Content keys made while the first job runs, under the first and second key.
    let during = generate_data_keys(&svc, ORG, &keks[..50]).await;
    let third = upload_new_key(&mut admin, ORG, work.path(), "third", true)
        .await
        .key_id;

    let job2 = rotation(&mut admin).await;
    assert_eq!(job2.job_id, job1.job_id + 1);
    assert_eq!(job2.target_key_id, third);
    assert_eq!(
        job2.from_key_ids,
        vec![first.clone(), second.clone()],
        "the first key was still rotating: the first job had not finished"
    );
    assert_eq!(job2.total, KEKS as u64, "every KEK needs the third key");
    let job1_row = job_row(&d, job1.job_id).await;
    println!("first job superseded at {} of {KEKS}", job1_row.1);
    assert_eq!(job1_row.0, "superseded");
    assert!(
        job1_row.1 < KEKS as u64,
        "superseded part-way: {job1_row:?}"
    );

    let job2 = wait_for_rotation(&mut admin, ORG, PATIENCE, |j| {
        j.state() != RotationState::Running
    })
    .await;
    assert_eq!(job2.state(), RotationState::Finished, "{job2:?}");
    assert_eq!((job2.done, job2.total), (KEKS as u64, KEKS as u64));
    assert_eq!(job_row(&d, job1.job_id).await.0, "superseded");

    let samples: Vec<ContentKey> = samples.into_iter().chain(during).collect();
    assert_rotated(
        &mut admin,
        &svc,
        &third,
        &[&first, &second],
        &keks,
        &samples,
        true,
    )
    .await;
    assert_rotation_audited(&mut admin, &[&first, &second], &third, &job2).await;
}

/// Revoking the new key mid-way pauses the job (nothing can be wrapped);
/// reactivating it resumes the job, which finishes with every KEK counted once.
#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_pauses_the_job_and_a_reactivation_resumes_it() {
    // One KEK per batch: each batch is two HSM calls and a commit, so the job
    // lasts seconds and the revoke lands part-way on any machine.
    const KEKS: usize = 2000;
    let d = Deployment::start_with(Limits::default(), |raw| raw.rotation_batch = Some(1)).await;
    let work = tempfile::tempdir().unwrap();
    let mut admin = d.client("admin-acme").await;
    let mut svc = d.content("service-acme").await;
    let (old, keks, samples) =
        org_with_keks(&mut admin, &svc, parts(&d), work.path(), KEKS, 10).await;
    let new = upload_new_key(&mut admin, ORG, work.path(), "second", true)
        .await
        .key_id;
    wait_for_rotation(&mut admin, ORG, PATIENCE, |j| j.done > 0).await;
    admin.revoke_key(key_req(&new)).await.unwrap();
    let paused = rotation(&mut admin).await;
    assert_eq!(paused.state(), RotationState::Paused, "{paused:?}");
    assert!(paused.done < paused.total, "paused part-way: {paused:?}");
    assert_eq!(paused.eta_seconds, 0);
    // An admin watching with cmkctl sees the pause, then the end of the job.
    let watch = d
        .hsm
        .pki
        .cmkctl(d.addr(), "admin-acme", ORG)
        .args(["rotation", "watch", "--interval-ms", "100"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let listing = list(&mut admin).await;
    assert_eq!(state_of(&listing, &old), Some(KeyState::Rotating));
    assert_eq!(listing.active_key_id, "");
    let blocked = svc
        .generate_data_key(pb::GenerateDataKeyRequest {
            org_id: ORG.into(),
            kek_id: keks[0].clone(),
            context: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(blocked.code(), tonic::Code::FailedPrecondition);
    assert!(blocked.message().contains("is revoked"), "{blocked:?}");
    // Nothing is re-wrapped while paused, across maintenance ticks.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let still = rotation(&mut admin).await;
    assert_eq!(still.state(), RotationState::Paused);
    assert_eq!(still.done, paused.done);

    admin.reactivate_key(key_req(&new)).await.unwrap();
    let job = wait_for_rotation(&mut admin, ORG, PATIENCE, |j| {
        j.state() != RotationState::Running
    })
    .await;
    assert_eq!(job.state(), RotationState::Finished, "{job:?}");
    assert_eq!(job.job_id, paused.job_id, "the same job resumed");
    assert_eq!((job.done, job.total), (KEKS as u64, KEKS as u64));
    let watched = tokio::task::spawn_blocking(|| watch.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&watched.stdout),
        String::from_utf8_lossy(&watched.stderr),
    );
    assert!(watched.status.success(), "{watched:?}");
    assert!(
        stderr.contains("paused: the master key is revoked; waiting for reactivation"),
        "{stderr}"
    );
    let finished = format!(
        "rotation job {} finished: {KEKS} of {KEKS} KEKs re-wrapped to {new}",
        job.job_id
    );
    assert!(stdout.contains(&finished), "{stdout}");
    assert_rotated(&mut admin, &svc, &new, &[&old], &keks, &samples, true).await;
}

/// Two control-plane replicas on one database both work the job; every KEK
/// is re-wrapped and counted exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_finish_a_job_without_losing_or_double_counting() {
    const KEKS: usize = 1500;
    let d = Deployment::start_with(Limits::default(), |raw| raw.rotation_batch = Some(25)).await;
    let replica = d.start_replica().await;
    let work = tempfile::tempdir().unwrap();
    let mut admin = d.client("admin-acme").await;
    let svc = d.content("service-acme").await;
    let (old, keks, samples) =
        org_with_keks(&mut admin, &svc, parts(&d), work.path(), KEKS, 10).await;
    // Activated through the replica; the first control plane finds the job at
    // its next tick.
    let mut other = replica.client("admin-acme").await;
    let new = upload_new_key(&mut other, ORG, work.path(), "second", true)
        .await
        .key_id;
    let job = wait_for_rotation(&mut admin, ORG, PATIENCE, |j| {
        j.state() != RotationState::Running
    })
    .await;
    assert_eq!(job.state(), RotationState::Finished, "{job:?}");
    assert_eq!((job.done, job.total), (KEKS as u64, KEKS as u64));
    assert_rotated(&mut admin, &svc, &new, &[&old], &keks, &samples, true).await;
    let replica_svc = replica.content("service-acme").await;
    assert_all_decrypt(&replica_svc, ORG, &samples).await;
    replica.stop().await;
}

/// Switching BYOK off makes the generic default key the master again: the
/// org's KEKs are re-wrapped to it, and once the uploaded key's retention
/// ends and it is destroyed in the HSM, every content key still opens.
#[tokio::test(flavor = "multi_thread")]
async fn byok_off_rewraps_to_the_generic_default_key_and_the_old_key_can_go() {
    const KEKS: usize = 60;
    let mut d = Deployment::start().await;
    let work = tempfile::tempdir().unwrap();
    let mut admin = d.client("admin-acme").await;
    let svc = d.content("service-acme").await;
    set_byok(&mut admin, ORG, true).await;
    let own = upload_new_key(&mut admin, ORG, work.path(), "own", true)
        .await
        .key_id;
    let keks: Vec<String> = create_keks(&svc, ORG, "space:", KEKS, 8)
        .await
        .into_iter()
        .map(|k| k.kek_id)
        .collect();
    let samples = generate_data_keys(&svc, ORG, &keks).await;

    let off = admin
        .set_byok(pb::SetByokRequest {
            org_id: ORG.into(),
            enabled: false,
        })
        .await
        .unwrap()
        .into_inner();
    let generic = off.active_key.unwrap();
    assert_eq!(generic.source(), pb::KeySource::GenericDefault);
    let job = wait_for_rotation(&mut admin, ORG, PATIENCE, |j| {
        j.state() == RotationState::Finished && j.target_key_id == generic.key_id
    })
    .await;
    assert_eq!(job.from_key_ids, vec![own.clone()]);
    assert_eq!((job.done, job.total), (KEKS as u64, KEKS as u64));
    assert_rotated(
        &mut admin,
        &svc,
        &generic.key_id,
        &[&own],
        &keks,
        &samples,
        true,
    )
    .await;

    let tombstones = || {
        cmk_tests::control_plane::files(d.hsm.store.path())
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "destroyed"))
            .count()
    };
    let before = tombstones();
    d.advance(Duration::from_secs(31 * 86_400)).await;
    assert_eq!(tombstones(), before + 1, "the uploaded key is destroyed");
    d.restart().await;
    let mut admin = d.client("admin-acme").await;
    let svc = d.content("service-acme").await;
    assert_eq!(state_of(&list(&mut admin).await, &own), None);
    assert_all_decrypt(&svc, ORG, &samples).await;
    generate_data_keys(&svc, ORG, &keks).await;
}

fn parts(d: &Deployment) -> Parts<'_> {
    Parts {
        pki: &d.hsm.pki,
        hsm: d.hsm.daemon.addr,
        database: d.database_url(),
    }
}

/// State and progress of the org's job `job`, read from the database.
async fn job_row(d: &Deployment, job: u64) -> (String, u64) {
    use sqlx::{Connection, Row, SqliteConnection};
    let url = format!("sqlite://{}?mode=ro", d.database().display());
    let mut db = SqliteConnection::connect(&url).await.unwrap();
    let row = sqlx::query("SELECT state, done FROM rotation_jobs WHERE org = ?1 AND job = ?2")
        .bind(ORG)
        .bind(job as i64)
        .fetch_one(&mut db)
        .await
        .unwrap();
    let out = (
        row.get::<String, _>("state"),
        row.get::<i64, _>("done") as u64,
    );
    db.close().await.unwrap();
    out
}

/// How many KEKs of the org each key wraps, read from the database.
async fn kek_rows(data: &Path) -> Vec<(String, u64)> {
    use sqlx::{Connection, Row, SqliteConnection};
    let url = format!("sqlite://{}?mode=ro", data.join("cmk.db").display());
    let mut db = SqliteConnection::connect(&url).await.unwrap();
    let rows = sqlx::query(
        "SELECT key_id, count(*) AS n FROM keks WHERE org = ?1 GROUP BY key_id ORDER BY key_id",
    )
    .bind(ORG)
    .fetch_all(&mut db)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get::<String, _>("key_id"), r.get::<i64, _>("n") as u64))
    .collect();
    db.close().await.unwrap();
    rows
}

/// Both services as real processes, killed with SIGKILL while the job runs:
/// both at once, then the HSM daemon alone, then the control plane alone.
/// The job resumes each time and every KEK ends wrapped by the new key.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_survives_sigkill_of_both_processes() {
    const KEKS: usize = 3000;
    let pki = Pki::new();
    let keystore = tempfile::tempdir().unwrap();
    // As a deployment would have it; the daemon warns otherwise.
    std::fs::set_permissions(
        keystore.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let env = [
        ("CMK_CP_ROTATION_BATCH", "20"),
        ("CMK_CP_MAINTENANCE_INTERVAL_SECS", "1"),
    ];
    // Each process is restarted on the address it had, where the other (and
    // the test) calls it.
    let start_hsm = |listen| DaemonProcess::start(&pki, keystore.path(), listen);
    let mut hsm = start_hsm(ANY_PORT).await;
    let start_cp = |hsm: std::net::SocketAddr, listen| {
        ControlPlaneProcess::start(&pki, hsm, data.path(), listen, &env)
    };
    let mut cp = start_cp(hsm.addr, ANY_PORT).await;
    let mut admin = admin_at(&pki, cp.addr, "admin-acme").await;
    let svc = content_at(&pki, cp.addr, "service-acme").await;
    let parts = Parts {
        pki: &pki,
        hsm: hsm.addr,
        database: format!("sqlite://{}", data.path().join("cmk.db").display()),
    };
    let (old, keks, samples) = org_with_keks(&mut admin, &svc, parts, work.path(), KEKS, 10).await;
    let new = upload_new_key(&mut admin, ORG, work.path(), "second", true)
        .await
        .key_id;

    // 1. Both processes, part-way.
    let job = wait_for_rotation(&mut admin, ORG, PATIENCE, |j| j.done > 0).await;
    cp.kill();
    hsm.kill();
    assert!(job.done < job.total, "caught part-way: {job:?}");
    let rows = kek_rows(data.path()).await;
    println!("killed both at {} of {}: {rows:?}", job.done, job.total);
    assert_eq!(rows.iter().map(|(_, n)| n).sum::<u64>(), KEKS as u64);
    assert!(rows.iter().all(|(k, _)| k == &old || k == &new), "{rows:?}");
    hsm = start_hsm(hsm.addr).await;
    cp = start_cp(hsm.addr, cp.addr).await;
    let mut admin = admin_at(&pki, cp.addr, "admin-acme").await;
    let svc = content_at(&pki, cp.addr, "service-acme").await;
    assert_all_decrypt(&svc, ORG, &samples[..20]).await;

    // 2. The HSM daemon alone: the job cannot progress, then resumes.
    let at = job.done;
    let job = wait_for_rotation(&mut admin, ORG, PATIENCE, |j| j.done > at).await;
    hsm.kill();
    assert!(job.done < job.total, "caught part-way: {job:?}");
    let stalled = rotation(&mut admin).await;
    assert_eq!(stalled.state(), RotationState::Running);
    assert!(stalled.done < stalled.total);
    hsm = start_hsm(hsm.addr).await;

    // 3. The control plane alone.
    let at = stalled.done;
    let job = wait_for_rotation(&mut admin, ORG, PATIENCE, |j| j.done > at).await;
    cp.kill();
    assert!(job.done < job.total, "caught part-way: {job:?}");
    cp = start_cp(hsm.addr, cp.addr).await;
    let mut admin = admin_at(&pki, cp.addr, "admin-acme").await;
    let svc = content_at(&pki, cp.addr, "service-acme").await;

    let job = wait_for_rotation(&mut admin, ORG, PATIENCE, |j| {
        j.state() != RotationState::Running
    })
    .await;
    assert_eq!(job.state(), RotationState::Finished, "{job:?}");
    assert_eq!(job.target_key_id, new);
    assert_eq!(
        (job.done, job.total),
        (KEKS as u64, KEKS as u64),
        "no KEK counted twice or lost"
    );
    assert_rotated(&mut admin, &svc, &new, &[&old], &keks, &samples, true).await;
    assert_rotation_audited(&mut admin, &[&old], &new, &job).await;
    drop((cp, hsm));
    assert_eq!(kek_rows(data.path()).await, vec![(new, KEKS as u64)]);
}

/// The holder of the lease `name` in the PostgreSQL database `db`, if held.
async fn lease_holder(db: &TestDb, name: &str) -> Option<String> {
    use sqlx::{Connection, Row};
    let mut conn = db.raw().await;
    let holder = sqlx::query("SELECT holder FROM leases WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut conn)
        .await
        .unwrap()
        .map(|row| row.get::<String, _>("holder"));
    conn.close().await.unwrap();
    holder
}

/// The process id in a lease holder's name (`host:pid:suffix`).
fn holder_pid(holder: &str) -> u32 {
    holder.split(':').nth(1).unwrap().parse().unwrap()
}

/// Two control-plane processes on one PostgreSQL database and one HSM
/// daemon, as an HA deployment runs them. A revocation made through one is
/// in force on the other within 5 s. The replica working the rotation job —
/// the one holding its lease — is killed with SIGKILL part-way; the other
/// takes the job over once the lease runs out and finishes it, with every
/// KEK re-wrapped and counted exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_mid_rotation_is_taken_over_by_the_other() {
    const KEKS: usize = 3000;
    let db = TestDb::create().await;
    let url = db.url();
    let pki = Pki::new();
    let keystore = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        keystore.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let hsm = DaemonProcess::start(&pki, keystore.path(), ANY_PORT).await;
    let env = [
        ("CMK_CP_ROTATION_BATCH", "20"),
        ("CMK_CP_MAINTENANCE_INTERVAL_SECS", "1"),
        ("CMK_CP_LEASE_TTL_SECS", "3"),
    ];
    let start = || ControlPlaneProcess::start_on(&pki, hsm.addr, data.path(), &url, ANY_PORT, &env);
    let (a, b) = (start().await, start().await);
    let mut admin_a = admin_at(&pki, a.addr, "admin-acme").await;
    let mut admin_b = admin_at(&pki, b.addr, "admin-acme").await;
    let svc_a = content_at(&pki, a.addr, "service-acme").await;
    let svc_b = content_at(&pki, b.addr, "service-acme").await;
    let parts = Parts {
        pki: &pki,
        hsm: hsm.addr,
        database: url.clone(),
    };
    let (old, keks, samples) =
        org_with_keks(&mut admin_a, &svc_a, parts, work.path(), KEKS, 10).await;

    // A revocation through A is in force on B, whose view of the org is
    // warm, within 5 s; a reactivation through B, on A.
    assert_all_decrypt(&svc_b, ORG, &samples[..5]).await;
    admin_a.revoke_key(key_req(&old)).await.unwrap();
    let took = until_decrypt(&svc_b, &samples[0], false).await;
    println!("revocation through one replica in force on the other after {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    admin_b.reactivate_key(key_req(&old)).await.unwrap();
    let took = until_decrypt(&svc_a, &samples[0], true).await;
    println!("reactivation through one replica in force on the other after {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // Activated through B; whichever replica claimed the job is killed.
    let new = upload_new_key(&mut admin_b, ORG, work.path(), "second", true)
        .await
        .key_id;
    let job = wait_for_rotation(&mut admin_a, ORG, PATIENCE, |j| j.done > 0).await;
    let holder = lease_holder(&db, "rotation/acme")
        .await
        .expect("the job is claimed");
    let (mut victim, survivor) = match holder_pid(&holder) {
        pid if pid == a.child.id() => (a, b),
        pid if pid == b.child.id() => (b, a),
        pid => panic!("the job's lease names neither replica: {holder} (pid {pid})"),
    };
    victim.kill();
    let killed = Instant::now();
    assert!(job.done < job.total, "caught part-way: {job:?}");
    println!(
        "killed the replica working the job at {} of {}",
        job.done, job.total
    );

    let mut admin = admin_at(&pki, survivor.addr, "admin-acme").await;
    let svc = content_at(&pki, survivor.addr, "service-acme").await;
    // Samples decrypt through the survivor while it takes over.
    assert_all_decrypt(&svc, ORG, &samples[..20]).await;
    let survivor_pid = survivor.child.id();
    let took_over = loop {
        match lease_holder(&db, "rotation/acme").await {
            Some(h) if holder_pid(&h) == survivor_pid => break Some(killed.elapsed()),
            // Finished (and the lease given up) between two looks.
            None if rotation(&mut admin).await.state() == RotationState::Finished => break None,
            _ if killed.elapsed() > PATIENCE => panic!("the survivor never took the job over"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    println!("the surviving replica took the job over after {took_over:?}");
    let job = wait_for_rotation(&mut admin, ORG, PATIENCE, |j| {
        j.state() != RotationState::Running
    })
    .await;
    assert_eq!(job.state(), RotationState::Finished, "{job:?}");
    assert_eq!(job.target_key_id, new);
    assert_eq!(
        (job.done, job.total),
        (KEKS as u64, KEKS as u64),
        "no KEK lost or re-wrapped twice"
    );
    assert_rotated(&mut admin, &svc, &new, &[&old], &keks, &samples, true).await;
    assert_rotation_audited(&mut admin, &[&old], &new, &job).await;
    assert_eq!(
        lease_holder(&db, "rotation/acme").await,
        None,
        "the lease is given up"
    );
    drop((survivor, victim, hsm));
}

/// Decrypts `key` through `svc` until it succeeds (`opens`) or is refused
/// for the revoked master (not `opens`); returns how long that took.
async fn until_decrypt(svc: &Content, key: &ContentKey, opens: bool) -> Duration {
    let start = Instant::now();
    loop {
        let result = svc
            .clone()
            .decrypt(pb::DecryptRequest {
                org_id: ORG.into(),
                wrapped_key: key.wrapped.clone(),
                context: key.context.clone(),
            })
            .await;
        match (result, opens) {
            (Ok(_), true) => return start.elapsed(),
            (Err(status), false) if status.code() == tonic::Code::FailedPrecondition => {
                return start.elapsed();
            }
            (Ok(_), false) => {}
            (Err(status), _) if opens && status.code() == tonic::Code::FailedPrecondition => {}
            (Err(status), _) => panic!("Decrypt: {status:?}"),
        }
        assert!(start.elapsed() < PATIENCE, "never changed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
