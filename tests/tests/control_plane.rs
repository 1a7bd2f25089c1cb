//! End-to-end: the control plane and the HSM daemon over real mutual TLS, the
//! seed's flow with the real `openssl` CLI, a restart of the control plane
//! between every step, timers moved by the test clock, crash repair and the
//! audit chain.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, process::Command, time::Duration};

use cmk_control_plane::clock::Clock;
use cmk_proto::control::v1::{self as pb, KeySource, KeyState};
use cmk_tests::control_plane::Deployment;
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

fn state_of(listing: &pb::ListKeysResponse, key_id: &str) -> Option<KeyState> {
    listing
        .keys
        .iter()
        .find(|k| k.key_id == key_id)
        .map(|k| k.state())
}

/// Runs `openssl` with `args` in `dir`; panics with its stderr on failure.
fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// What an admin does by hand: 32 random bytes, wrapped with the seed's exact
/// `openssl pkeyutl` recipe. Returns the wrapped key and the key check value
/// computed independently with `openssl mac` (AES-CMAC over a zero block).
fn wrap_new_key(dir: &Path, name: &str) -> (Vec<u8>, String) {
    openssl(dir, &["rand", "-out", &format!("{name}.bin"), "32"]);
    openssl(
        dir,
        &[
            "pkeyutl",
            "-encrypt",
            "-pubin",
            "-inkey",
            "pub.pem",
            "-in",
            &format!("{name}.bin"),
            "-out",
            &format!("{name}.wrapped"),
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha256",
            "-pkeyopt",
            "rsa_mgf1_md:sha256",
        ],
    );
    let key_hex = hex::encode(std::fs::read(dir.join(format!("{name}.bin"))).unwrap());
    std::fs::write(dir.join("zero.bin"), [0u8; 16]).unwrap();
    let mac = openssl(
        dir,
        &[
            "mac",
            "-cipher",
            "AES-256-CBC",
            "-macopt",
            &format!("hexkey:{key_hex}"),
            "-in",
            "zero.bin",
            "CMAC",
        ],
    );
    let kcv = String::from_utf8(mac).unwrap().trim()[..10].to_uppercase();
    (
        std::fs::read(dir.join(format!("{name}.wrapped"))).unwrap(),
        kcv,
    )
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
    walk(keystore)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "destroyed"))
        .count()
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
