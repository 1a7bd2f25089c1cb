//! End-to-end: two HSM daemons (the real binary) on one PKCS#11 token
//! (Kryoptic, which imports with RSA-OAEP-SHA-256) behind one control plane
//! that lists both. Both serve the same keys and share the calls; one is
//! killed with SIGKILL in the middle of a rotation, and content-key calls
//! — with a KEK cache of one entry, so each goes to a daemon — keep
//! succeeding while the rotation finishes on the other.
//!
//! Fails, never skips, without the Kryoptic module (`scripts/test.sh`
//! builds it and sets `CMK_TEST_KRYOPTIC_MODULE`) or `pkcs11-tool`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use cmk_proto::control::v1::{self as pb, KeyState, RotationState};
use cmk_tests::{
    ANY_PORT, ControlPlaneProcess, DaemonProcess, Pki, Token,
    control_plane::{
        Content, ContentKey, admin_at, assert_all_decrypt, content_at, create_keks,
        generate_data_keys, preview_revocation, seed_keks, set_byok, state_of, upload_new_key,
        wait_for_rotation,
    },
};

const ORG: &str = "acme";
/// KEKs under the first master key: enough that a rotation in batches of
/// 20 is caught part-way.
const KEKS: usize = 3000;
const PATIENCE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn two_daemons_on_one_token_serve_on_when_one_is_killed_mid_rotation() {
    let pki = Pki::new();
    let token = Token::kryoptic();
    let env = token.env();
    let mut a = DaemonProcess::start_on_token(&pki, &token, ANY_PORT, &env).await;
    let b = DaemonProcess::start_on_token(&pki, &token, ANY_PORT, &env).await;
    // One token, one import key: an admin may wrap for either daemon.
    let public_a = pki.control_plane_client(a.addr).await;
    let public_b = pki.control_plane_client(b.addr).await;
    assert_eq!(
        public_a.import_public_key().await.unwrap(),
        public_b.import_public_key().await.unwrap()
    );

    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", data.path().join("cmk.db").display());
    let cp = ControlPlaneProcess::start_over(
        &pki,
        &[a.addr, b.addr],
        data.path(),
        &database,
        ANY_PORT,
        &[
            ("CMK_CP_ROTATION_BATCH", "20"),
            ("CMK_CP_MAINTENANCE_INTERVAL_SECS", "1"),
            // Every content-key call unwraps its KEK at a daemon.
            ("CMK_CP_KEK_CACHE_ENTRIES", "1"),
        ],
    )
    .await;
    let mut admin = admin_at(&pki, cp.addr, "admin-acme").await;
    let svc = content_at(&pki, cp.addr, "service-acme").await;

    set_byok(&mut admin, ORG, true).await;
    let old = upload_new_key(&mut admin, ORG, work.path(), "first", true).await;
    assert_eq!(old.state(), KeyState::Active);
    let mut keks: Vec<String> = create_keks(&svc, ORG, "api:", 100, 8)
        .await
        .into_iter()
        .map(|k| k.kek_id)
        .collect();
    keks.extend(seed_keks(&pki, b.addr, &database, ORG, "seeded:", KEKS - 100).await);
    let some: Vec<String> = keks.iter().step_by(30).cloned().collect();
    let samples = generate_data_keys(&svc, ORG, &some).await;
    assert_all_decrypt(&svc, ORG, &samples).await;

    // The calls took turns: each daemon served a good share of them.
    let (served_a, served_b) = (a.hsm_requests_served(), b.hsm_requests_served());
    println!("HSM requests served before the kill: {served_a} and {served_b}");
    for served in [served_a, served_b] {
        assert!(
            served * 4 > served_a.min(served_b) + served_a.max(served_b),
            "one daemon served almost nothing: {served_a} and {served_b}"
        );
    }

    // Content-key calls run throughout, from before the kill to after the
    // rotation ends; none may fail.
    let running = Arc::new(AtomicBool::new(true));
    let done = Arc::new(AtomicUsize::new(0));
    let traffic = tokio::spawn(content_traffic(
        svc.clone(),
        samples.clone(),
        running.clone(),
        done.clone(),
    ));

    let new = upload_new_key(&mut admin, ORG, work.path(), "second", true)
        .await
        .key_id;
    let job = wait_for_rotation(&mut admin, ORG, PATIENCE, |j| j.done > 0).await;
    a.kill();
    let killed = Instant::now();
    let calls_before = done.load(Ordering::Relaxed);
    println!(
        "killed one daemon with the rotation at {} of {}",
        job.done, job.total
    );
    assert!(job.done < job.total, "caught part-way: {job:?}");

    let job = wait_for_rotation(&mut admin, ORG, PATIENCE, |j| {
        j.state() != RotationState::Running
    })
    .await;
    println!(
        "the rotation finished {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(job.state(), RotationState::Finished, "{job:?}");
    assert_eq!(job.done, job.total, "{job:?}");
    assert!(job.total >= KEKS as u64, "{job:?}");
    // A little more traffic on the surviving daemon alone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.store(false, Ordering::Relaxed);
    let created = traffic.await.unwrap();
    let after_kill = done.load(Ordering::Relaxed) - calls_before;
    println!("{after_kill} content-key calls succeeded after the kill, none failed");
    assert!(after_kill > 0, "no content-key call ran after the kill");

    // The old key rotated off, every KEK now under the new one, and every
    // content key made before still opens.
    let listing = admin
        .list_keys(pb::ListKeysRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listing.active_key_id, new);
    assert_eq!(state_of(&listing, &old.key_id), Some(KeyState::Deactivated));
    let preview = preview_revocation(&mut admin, ORG, &new).await;
    assert_eq!(preview.keks_wrapped_by_key, (KEKS + created) as u64);
    assert_all_decrypt(&svc, ORG, &samples).await;

    // The killed daemon, started again where it was, is put back in service
    // by the health checks and takes its turn again.
    let a = DaemonProcess::start_on_token(&pki, &token, a.addr, &env).await;
    let back = Instant::now();
    while a.hsm_requests_served() == 0 {
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "the restarted daemon is never called"
        );
        assert_all_decrypt(&svc, ORG, &samples[..10]).await;
    }
    println!(
        "the restarted daemon serves again after {:?}",
        back.elapsed()
    );
    drop((cp, a, b));
}

/// Both daemons asked at once to generate a key under one handle — what a
/// retried Import sent to each could do — never leave two different keys
/// under it: at most one call succeeds, and whatever the handle names is
/// one key on both daemons.
#[tokio::test(flavor = "multi_thread")]
async fn two_daemons_never_admit_two_keys_under_one_handle() {
    use cmk_proto::hsm::v1::{
        Generate, ImportRequest, UnwrapRequest, WrapRequest, import_request::Source,
    };
    let pki = Pki::new();
    let token = Token::kryoptic();
    let env = token.env();
    let a = DaemonProcess::start_on_token(&pki, &token, ANY_PORT, &env).await;
    let b = DaemonProcess::start_on_token(&pki, &token, ANY_PORT, &env).await;
    let clients = [pki.hsm_client(a.addr).await, pki.hsm_client(b.addr).await];
    let mut admitted = [0; 2];
    for round in 0..20u8 {
        let handle = format!("{round:02x}{}", "7".repeat(30));
        let generate = |mut client: cmk_proto::hsm::v1::hsm_service_client::HsmServiceClient<_>| {
            let handle = handle.clone();
            async move {
                client
                    .import(ImportRequest {
                        source: Some(Source::Generate(Generate { shared: false })),
                        import_key_id: String::new(),
                        key_handle: handle,
                        recover: false,
                        org: cmk_tests::HSM_TEST_ORG.into(),
                    })
                    .await
            }
        };
        let (on_a, on_b) = tokio::join!(generate(clients[0].clone()), generate(clients[1].clone()));
        for (i, result) in [&on_a, &on_b].into_iter().enumerate() {
            match result {
                Ok(_) => admitted[i] += 1,
                // Kryoptic's store (SQLite) can be busy with the other
                // process's write: the daemon says so rather than guess.
                Err(status) => assert!(
                    matches!(
                        status.code(),
                        tonic::Code::AlreadyExists | tonic::Code::Unavailable
                    ),
                    "{status:?}"
                ),
            }
        }
        assert!(on_a.is_err() || on_b.is_err(), "both admitted {handle}");
        // Wrapped on either daemon, unwrapped on the other: one key, or
        // (when both refused) none.
        for (from, to) in [(0, 1), (1, 0)] {
            let wrapped = clients[from]
                .clone()
                .wrap(WrapRequest {
                    key_handle: handle.clone(),
                    plaintext: vec![round; 32],
                    associated_data: b"ha".to_vec(),
                    org: cmk_tests::HSM_TEST_ORG.into(),
                })
                .await;
            let ciphertext = match wrapped {
                Ok(answer) => answer.into_inner().ciphertext,
                Err(status) if status.code() == tonic::Code::NotFound => {
                    assert!(on_a.is_err() && on_b.is_err(), "{status:?}");
                    continue;
                }
                Err(status) => panic!("Wrap under {handle}: {status:?}"),
            };
            let opened = clients[to]
                .clone()
                .unwrap(UnwrapRequest {
                    ciphertext,
                    associated_data: b"ha".to_vec(),
                    org: cmk_tests::HSM_TEST_ORG.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(opened.plaintext, vec![round; 32]);
        }
    }
    println!("admissions that won the race: {admitted:?} of 20 each");
    assert!(admitted[0] + admitted[1] > 0, "no admission ever succeeded");
}

/// Decrypts `samples` in turn, and now and then creates a KEK and a content
/// key under it, until `running` is cleared; counts successes in `done`,
/// panics at the first failure, and returns how many KEKs it created.
async fn content_traffic(
    svc: Content,
    samples: Vec<ContentKey>,
    running: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> usize {
    let (mut i, mut created) = (0usize, 0);
    while running.load(Ordering::Relaxed) {
        let sample = &samples[i % samples.len()];
        let opened = svc
            .clone()
            .decrypt(pb::DecryptRequest {
                org_id: ORG.into(),
                wrapped_key: sample.wrapped.clone(),
                context: sample.context.clone(),
            })
            .await
            .unwrap_or_else(|status| panic!("Decrypt failed during failover: {status:?}"))
            .into_inner();
        assert_eq!(opened.plaintext, sample.plaintext);
        if i % 10 == 0 {
            let kek = svc
                .clone()
                .create_kek(pb::CreateKekRequest {
                    org_id: ORG.into(),
                    resource: format!("during:{i}"),
                })
                .await
                .unwrap_or_else(|status| panic!("CreateKek failed during failover: {status:?}"))
                .into_inner();
            assert!(kek.created);
            created += 1;
            generate_data_keys(&svc, ORG, &[kek.kek_id]).await;
        }
        i += 1;
        done.fetch_add(1, Ordering::Relaxed);
    }
    created
}
