//! End-to-end: the control plane and the HSM daemon over real mutual TLS, the
//! seed's flow with the real `openssl` CLI, a restart of the control plane
//! between every step, timers moved by the test clock, crash repair and the
//! audit chain.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, process::Command, time::Duration};

use cmk_control_plane::clock::Clock;
use cmk_proto::control::v1::{self as pb, KeySource, KeyState};
use cmk_tests::control_plane::{self, Deployment, check_value, files, state_of};
use tonic::Code;

const ORG: &str = "acme";
const DAY: Duration = Duration::from_secs(86_400);

fn key_req(key_id: &str) -> pb::KeyRequest {
    pb::KeyRequest {
        org_id: ORG.into(),
        key_id: key_id.into(),
    }
}

async fn list(d: &Deployment) -> pb::ListKeysResponse {
    d.client("admin-acme")
        .await
        .list_keys(pb::ListKeysRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner()
}

/// A new key wrapped the seed's way, and its check value as openssl computes it.
fn wrap_new_key(dir: &Path, name: &str) -> (Vec<u8>, String) {
    let wrapped = control_plane::wrap_new_key(dir, name);
    (wrapped, check_value(dir, name))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seed_flow_survives_a_restart_between_every_step() {
    let mut d = Deployment::start().await;
    let work = tempfile::tempdir().unwrap();

    // An org without BYOK uses the generic default key.
    let first = list(&d).await;
    assert!(!first.byok_enabled);
    assert_eq!(first.keys.len(), 1);
    assert_eq!(first.keys[0].source(), KeySource::GenericDefault);
    assert_eq!(first.active_key_id, first.keys[0].key_id);
    let generic = first.keys[0].key_id.clone();

    let mut admin = d.client("admin-acme").await;
    admin
        .set_byok(pb::SetByokRequest {
            org_id: ORG.into(),
            enabled: true,
        })
        .await
        .unwrap();
    d.restart().await;

    let mut admin = d.client("admin-acme").await;
    let public = admin
        .get_import_public_key(pb::GetImportPublicKeyRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner();
    std::fs::write(work.path().join("pub.pem"), &public.public_key_pem).unwrap();
    let (wrapped1, kcv1) = wrap_new_key(work.path(), "first");
    d.restart().await;

    // Upload, activate later.
    let uploaded = d
        .client("admin-acme")
        .await
        .upload_key(pb::UploadKeyRequest {
            org_id: ORG.into(),
            wrapped_key: wrapped1.clone(),
            activate_now: false,
            import_key_id: public.key_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let key1 = uploaded.key.unwrap();
    assert_eq!(key1.state(), KeyState::Pending);
    assert_eq!(key1.key_check_value, kcv1, "the KCV openssl computes");
    assert_eq!(uploaded.active_key.unwrap().key_id, generic);
    let key1 = key1.key_id;
    d.restart().await;

    // Activate: the generic default key rotates off and leaves the list.
    let activated = d
        .client("admin-acme")
        .await
        .activate_key(key_req(&key1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(activated.key.unwrap().state(), KeyState::Active);
    d.restart().await;
    let listing = list(&d).await;
    assert_eq!(listing.active_key_id, key1);
    assert_eq!(state_of(&listing, &generic), None);

    // Revoke, reactivate.
    let revoked = d
        .client("admin-acme")
        .await
        .revoke_key(key_req(&key1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.key.unwrap().state(), KeyState::Revoked);
    assert!(revoked.active_key.is_none());
    d.restart().await;
    assert_eq!(list(&d).await.active_key_id, "");

    // A second key may be uploaded while revoked, but not activated.
    let (wrapped2, kcv2) = wrap_new_key(work.path(), "second");
    let key2 = d
        .client("admin-acme")
        .await
        .upload_key(pb::UploadKeyRequest {
            org_id: ORG.into(),
            wrapped_key: wrapped2,
            activate_now: false,
            import_key_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(key2.key_check_value, kcv2);
    let key2 = key2.key_id;
    d.restart().await;
    let refused = d
        .client("admin-acme")
        .await
        .activate_key(key_req(&key2))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("reactivate it first"),
        "{}",
        refused.message()
    );

    d.client("admin-acme")
        .await
        .reactivate_key(key_req(&key1))
        .await
        .unwrap();
    d.restart().await;

    // Rotate to the second key: the first is deactivated, kept for the
    // retention period, then removed from the HSM.
    d.client("admin-acme")
        .await
        .activate_key(key_req(&key2))
        .await
        .unwrap();
    d.restart().await;
    let listing = list(&d).await;
    assert_eq!(listing.active_key_id, key2);
    let old = listing.keys.iter().find(|k| k.key_id == key1).unwrap();
    assert_eq!(old.state(), KeyState::Deactivated);
    let expires = old.expires_at.unwrap().seconds;
    let now = d.clock.now().0;
    assert_eq!(expires - now, 30 * 86_400, "the default retention");

    let destroyed_before = tombstones(d.hsm.store.path());
    d.advance(31 * DAY).await;
    d.restart().await;
    let listing = list(&d).await;
    assert_eq!(
        state_of(&listing, &key1),
        None,
        "removed keys are not listed"
    );
    assert_eq!(tombstones(d.hsm.store.path()), destroyed_before + 1);

    // The audit log holds the whole story and verifies.
    let check = d
        .client("reader-acme")
        .await
        .verify_audit_log(pb::VerifyAuditLogRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner();
    assert!(check.intact, "{}", check.problem);
    let events = d
        .client("reader-acme")
        .await
        .list_audit_events(pb::ListAuditEventsRequest {
            org_id: ORG.into(),
            after_seq: 0,
            page_size: 1000,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    for expected in [
        "upload",
        "activate",
        "revoke",
        "reactivate",
        "remove expired keys",
    ] {
        assert!(actions.contains(&expected), "{expected} in {actions:?}");
    }
    assert!(
        events
            .iter()
            .any(|e| e.action == "state deactivated → removed" && e.actor == "service")
    );
}

/// Destroyed keys leave a tombstone in the software keystore.
fn tombstones(keystore: &Path) -> usize {
    files(keystore)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "destroyed"))
        .count()
}

async fn byok_on(d: &Deployment) {
    d.client("admin-acme")
        .await
        .set_byok(pb::SetByokRequest {
            org_id: ORG.into(),
            enabled: true,
        })
        .await
        .unwrap();
}

async fn public_key(d: &Deployment, dir: &Path) {
    let public = d
        .client("admin-acme")
        .await
        .get_import_public_key(pb::GetImportPublicKeyRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner();
    std::fs::write(dir.join("pub.pem"), public.public_key_pem).unwrap();
}

async fn upload(
    d: &Deployment,
    wrapped: Vec<u8>,
    activate_now: bool,
) -> Result<pb::Key, tonic::Status> {
    Ok(d.client("admin-acme")
        .await
        .upload_key(pb::UploadKeyRequest {
            org_id: ORG.into(),
            wrapped_key: wrapped,
            activate_now,
            import_key_id: String::new(),
        })
        .await?
        .into_inner()
        .key
        .unwrap())
}

/// Delete → restore → delete → the window passes → removed while still needed:
/// the org stays blocked until the original key is uploaded again.
#[tokio::test(flavor = "multi_thread")]
async fn a_removed_master_key_is_recovered_by_uploading_it_again() {
    let d = Deployment::start().await;
    let work = tempfile::tempdir().unwrap();
    byok_on(&d).await;
    public_key(&d, work.path()).await;
    let (wrapped, kcv) = wrap_new_key(work.path(), "master");
    let key = upload(&d, wrapped.clone(), true).await.unwrap();
    assert_eq!(key.state(), KeyState::Active);
    let key = key.key_id;
    let content = d.content("service-acme").await;
    let keks: Vec<String> = control_plane::create_keks(&content, ORG, "space-", 8, 4)
        .await
        .into_iter()
        .map(|k| k.kek_id)
        .collect();
    let made = control_plane::generate_data_keys(&content, ORG, &keks).await;
    let mut admin = d.client("admin-acme").await;
    admin.revoke_key(key_req(&key)).await.unwrap();
    let deleted = admin.delete_key(key_req(&key)).await.unwrap().into_inner();
    let deleted = deleted.key.unwrap();
    assert_eq!(deleted.state(), KeyState::Deleted);
    assert_eq!(
        deleted.expires_at.unwrap().seconds - d.clock.now().0,
        30 * 86_400
    );

    // Restorable inside the window.
    d.advance(29 * DAY).await;
    let restored = admin.restore_key(key_req(&key)).await.unwrap().into_inner();
    assert_eq!(restored.key.unwrap().state(), KeyState::Revoked);
    admin.delete_key(key_req(&key)).await.unwrap();

    // The window ends: the key is destroyed in the HSM but the org still needs it.
    let before = tombstones(d.hsm.store.path());
    d.advance(31 * DAY).await;
    assert_eq!(tombstones(d.hsm.store.path()), before + 1);
    let listing = list(&d).await;
    let removed = listing.keys.iter().find(|k| k.key_id == key).unwrap();
    assert_eq!(removed.state(), KeyState::Removed);
    assert_eq!(removed.key_check_value, kcv);
    let refused = admin.restore_key(key_req(&key)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .contains(&format!("upload the original key (check value {kcv})")),
        "{}",
        refused.message()
    );

    // Another key cannot take over; the original one brings the org back.
    let (other, _) = wrap_new_key(work.path(), "other");
    let other = upload(&d, other, false).await.unwrap().key_id;
    let refused = admin.activate_key(key_req(&other)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("is removed"),
        "{}",
        refused.message()
    );
    admin.cancel_key(key_req(&other)).await.unwrap();

    let recovered = upload(&d, wrapped, false).await.unwrap();
    assert_eq!(
        recovered.key_id, key,
        "recovered by the HSM's fingerprint, same id"
    );
    assert_eq!(recovered.state(), KeyState::Revoked);
    assert_eq!(
        tombstones(d.hsm.store.path()),
        before + 1,
        "the key lives again under its own handle; the cancelled key stays destroyed"
    );
    let back = admin
        .reactivate_key(key_req(&key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.key.unwrap().state(), KeyState::Active);
    assert_eq!(list(&d).await.active_key_id, key);
    // The user's outcome: what the key protected before its removal opens.
    control_plane::assert_all_decrypt(&content, ORG, &made).await;
}

/// Switching BYOK off makes the generic default key the master again.
#[tokio::test(flavor = "multi_thread")]
async fn byok_off_returns_to_the_generic_default_key() {
    let d = Deployment::start().await;
    let work = tempfile::tempdir().unwrap();
    let generic_kcv = list(&d).await.keys[0].key_check_value.clone();
    byok_on(&d).await;
    public_key(&d, work.path()).await;
    let (wrapped, _) = wrap_new_key(work.path(), "own");
    let own = upload(&d, wrapped, true).await.unwrap().key_id;

    let off = d
        .client("admin-acme")
        .await
        .set_byok(pb::SetByokRequest {
            org_id: ORG.into(),
            enabled: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!off.byok_enabled);
    let active = off.active_key.unwrap();
    assert_eq!(active.source(), KeySource::GenericDefault);
    assert_eq!(
        active.key_check_value, generic_kcv,
        "one generic key for all"
    );
    let listing = list(&d).await;
    assert_eq!(state_of(&listing, &own), Some(KeyState::Deactivated));

    // Another org shares the same generic default key.
    let globex = d
        .client("admin-globex")
        .await
        .list_keys(pb::ListKeysRequest {
            org_id: "globex".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(globex.keys[0].key_check_value, generic_kcv);
}

/// The HSM daemon down: key operations fail UNAVAILABLE, reads still work,
/// nothing stored changes.
#[tokio::test(flavor = "multi_thread")]
async fn hsm_down_is_unavailable_and_changes_nothing() {
    let mut d = Deployment::start().await;
    let work = tempfile::tempdir().unwrap();
    byok_on(&d).await;
    public_key(&d, work.path()).await;
    let (wrapped, _) = wrap_new_key(work.path(), "k");
    let before = list(&d).await;

    let daemon = std::mem::replace(
        &mut d.hsm.daemon,
        cmk_tests::InProcess::start(d.hsm.pki.settings(
            tempfile::tempdir().unwrap().path(),
            cmk_hsm_daemon::Limits::default(),
        ))
        .await,
    );
    daemon.stop().await.unwrap();
    // The control plane still points at the stopped daemon's address.
    let refused = upload(&d, wrapped, false).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("HSM daemon is unavailable"));
    let refused = d
        .client("admin-acme")
        .await
        .get_import_public_key(pb::GetImportPublicKeyRequest { org_id: ORG.into() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert_eq!(list(&d).await, before);
}

/// A crash between the HSM import and the database commit leaves an intent;
/// once it is older than an import can take, the timers destroy the material.
#[tokio::test(flavor = "multi_thread")]
async fn an_import_that_never_committed_is_destroyed() {
    use cmk_control_plane_domain::{OrgId, Timestamp};
    use cmk_control_plane_store::{Intent, IntentKind, IntentStore, SqliteStore};

    let mut d = Deployment::start().await;
    d.stop_control_plane().await;
    let hsm = d.hsm.pki.control_plane_client(d.hsm.daemon.addr).await;
    let handle = cmk_control_plane::hsm::random_handle();
    let org = OrgId::parse(ORG).unwrap();
    // What the control plane does before and during an upload, then "crashes".
    let store = SqliteStore::open(&d.database().display().to_string())
        .await
        .unwrap();
    store
        .record_intent(Intent {
            handle: handle.clone(),
            kind: IntentKind::Import,
            org: Some(org.clone()),
            created_at: Timestamp(d.clock.now().0),
        })
        .await
        .unwrap();
    hsm.generate(Some(&org), &handle).await.unwrap();
    store.close().await;

    let secret = cmk_secret::SecretBytes::new(vec![7; 32]);
    d.start_control_plane().await;
    // Young intents are left alone: the import might still be running.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    hsm.wrap(&org, &handle, &secret, b"")
        .await
        .expect("still there");

    d.advance(Duration::from_secs(120)).await;
    let gone = hsm.wrap(&org, &handle, &secret, b"").await.unwrap_err();
    assert!(gone.to_string().contains("destroyed"), "{gone}");
    let store = SqliteStore::open(&d.database().display().to_string())
        .await
        .unwrap();
    assert!(store.open_intents().await.unwrap().is_empty());
}

/// A changed or deleted audit row is found by the API and by the command.
#[tokio::test(flavor = "multi_thread")]
async fn tampering_with_the_audit_log_is_detected() {
    let mut d = Deployment::start().await;
    byok_on(&d).await;
    list(&d).await;
    // A write enrols globex (a read would not).
    control_plane::set_byok(&mut d.client("admin-globex").await, "globex", true).await;
    d.stop_control_plane().await;

    let url = format!("sqlite://{}", d.database().display());
    let key = d.data.path().join("audit-public-key.pem");
    d.hsm
        .pki
        .write_audit_public_key(d.hsm.daemon.addr, &key)
        .await;
    let verify = |org: Option<&str>| {
        let mut cmd = Command::new(cmk_tests::binary("control-plane"));
        cmd.arg("verify-audit").arg("--database").arg(&url);
        cmd.arg("--audit-public-key").arg(&key);
        if let Some(org) = org {
            cmd.arg("--org").arg(org);
        }
        cmd.output().unwrap()
    };
    let intact = verify(None);
    assert!(intact.status.success(), "{intact:?}");
    let stdout = String::from_utf8(intact.stdout).unwrap();
    assert!(stdout.contains("acme: intact"), "{stdout}");

    {
        use sqlx::{Connection, SqliteConnection};
        let mut db = SqliteConnection::connect(&url).await.unwrap();
        // The triggers stop accidents, not someone with the file: drop them.
        sqlx::query("DROP TRIGGER audit_no_update")
            .execute(&mut db)
            .await
            .unwrap();
        sqlx::query("DROP TRIGGER audit_no_delete")
            .execute(&mut db)
            .await
            .unwrap();
        sqlx::query("UPDATE audit SET actor = 'someone else' WHERE org = 'acme' AND seq = 2")
            .execute(&mut db)
            .await
            .unwrap();
        sqlx::query("DELETE FROM audit WHERE org = 'globex' AND seq = 1")
            .execute(&mut db)
            .await
            .unwrap();
        db.close().await.unwrap();
    }

    let broken = verify(None);
    assert_eq!(broken.status.code(), Some(1), "{broken:?}");
    let stdout = String::from_utf8(broken.stdout).unwrap();
    assert!(
        stdout
            .contains("acme: BROKEN: audit chain of org acme breaks at seq 2: the row was changed"),
        "{stdout}"
    );
    assert!(stdout.contains("globex: BROKEN"), "{stdout}");

    d.start_control_plane().await;
    let check = d
        .client("reader-acme")
        .await
        .verify_audit_log(pb::VerifyAuditLogRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!check.intact);
    assert!(check.problem.contains("seq 2"), "{}", check.problem);
}

/// The control plane's client certificate towards the HSM daemon is re-read
/// from disk, as the server certificates are. Started with a certificate the
/// daemon refuses (from the trusted CA, but not on its allow-list), then
/// renewed in place by the control plane's own — written beside and renamed
/// over, as a mounted Secret is updated — key operations succeed within a
/// reload interval, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_renewed_hsm_client_certificate_is_used_without_a_restart() {
    let client = tempfile::tempdir().unwrap();
    let (crt, key) = (
        client.path().join("hsm-client.crt"),
        client.path().join("hsm-client.key"),
    );
    let configured = (crt.clone(), key.clone());
    let d = Deployment::start_with(cmk_hsm_daemon::Limits::default(), move |raw| {
        // The test PKI's directory, which the deployment makes before the
        // control plane starts: begin with the intruder's certificate.
        let pki = raw
            .hsm_tls_cert
            .as_ref()
            .unwrap()
            .parent()
            .unwrap()
            .to_owned();
        if !configured.0.exists() {
            std::fs::copy(pki.join("intruder.crt"), &configured.0).unwrap();
            std::fs::copy(pki.join("intruder.key"), &configured.1).unwrap();
        }
        raw.hsm_tls_cert = Some(configured.0.clone());
        raw.hsm_tls_key = Some(configured.1.clone());
    })
    .await;
    let admin = d.client("admin-acme").await;
    let public_key = || {
        let mut admin = admin.clone();
        async move {
            admin
                .get_import_public_key(pb::GetImportPublicKeyRequest { org_id: ORG.into() })
                .await
        }
    };
    let refused = public_key().await.unwrap_err();
    assert_ne!(refused.code(), Code::Ok);

    for (from, to) in [("control-plane.key", &key), ("control-plane.crt", &crt)] {
        let next = to.with_extension("new");
        std::fs::copy(d.hsm.pki.path(from), &next).unwrap();
        std::fs::rename(&next, to).unwrap();
    }
    let renewed = std::time::Instant::now();
    loop {
        match public_key().await {
            Ok(answer) => {
                assert!(answer.into_inner().public_key_pem.contains("PUBLIC KEY"));
                break;
            }
            Err(_) if renewed.elapsed() < cmk_tls::RELOAD_INTERVAL * 3 => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("the renewed certificate was never used: {status:?}"),
        }
    }
    println!(
        "renewed HSM client certificate in use after {:?}",
        renewed.elapsed()
    );
}

/// An import slower than repair waits for (here: the HSM daemon's answer held
/// back by a slow link while the clock moves an hour) is claimed by repair
/// and its material destroyed; the upload's commit then finds the claim and
/// is refused, so no key is ever kept whose material is gone. Uploading again
/// works.
#[tokio::test(flavor = "multi_thread")]
async fn an_import_repair_abandoned_is_refused_not_kept() {
    let relay_addr = std::sync::Arc::new(std::sync::OnceLock::new());
    let through = relay_addr.clone();
    let mut d = Deployment::start_with(cmk_hsm_daemon::Limits::default(), move |raw| {
        if let Some(relay) = through.get() {
            raw.hsm_endpoints = vec![format!("https://{relay}")];
        }
    })
    .await;
    let relay = cmk_tests::SlowRelay::start(d.hsm.daemon.addr).await;
    relay_addr.set(relay.addr).unwrap();
    d.restart().await;
    let work = tempfile::tempdir().unwrap();
    byok_on(&d).await;
    public_key(&d, work.path()).await;
    let (wrapped, _) = wrap_new_key(work.path(), "slow");
    let destroyed = tombstones(d.hsm.store.path());

    relay.set_delay(Duration::from_secs(4));
    let slow = {
        let wrapped = wrapped.clone();
        let mut admin = d.client("admin-acme").await;
        tokio::spawn(async move {
            admin
                .upload_key(pb::UploadKeyRequest {
                    org_id: ORG.into(),
                    wrapped_key: wrapped,
                    activate_now: false,
                    import_key_id: String::new(),
                })
                .await
        })
    };
    // The import is at the daemon, its answer on the way; an hour passes
    // for the control plane, whose repair finds the import abandoned.
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.advance(Duration::from_secs(3600)).await;
    let refused = slow.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert!(
        refused.message().contains("took too long"),
        "{}",
        refused.message()
    );
    relay.set_delay(Duration::ZERO);
    for _ in 0..50 {
        if tombstones(d.hsm.store.path()) == destroyed + 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        tombstones(d.hsm.store.path()),
        destroyed + 1,
        "repair destroyed the abandoned material"
    );
    let listing = list(&d).await;
    assert!(
        listing
            .keys
            .iter()
            .all(|k| k.source() == KeySource::GenericDefault),
        "no key was kept under destroyed material: {listing:?}"
    );

    let again = upload(&d, wrapped, false).await.unwrap();
    assert_eq!(again.state(), KeyState::Pending);
}
