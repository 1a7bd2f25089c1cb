//! Recovery after removal, as an admin lives it with the real binaries over
//! mutual TLS: a master key is revoked and deleted, the control plane is
//! restarted 31 days later (under `faketime`) and its timers remove the key
//! and destroy it in the HSM daemon; the admin uploads the original key bytes
//! again and reactivates it, and every content key made before opens again.
//! Once on SQLite and once on PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{path::Path, time::Duration};

use cmk_control_plane_store::testdb::TestDb;
use cmk_proto::control::v1::{
    self as pb, KeyState, content_key_service_client::ContentKeyServiceClient,
    key_admin_service_client::KeyAdminServiceClient,
};
use cmk_tests::{
    channel,
    control_plane::{
        Admin, Content, ContentKey, assert_all_decrypt, create_keks, files, generate_data_keys,
        openssl, set_byok, upload_new_key,
    },
    walkthrough::Setup,
};
use tonic::Code;

const ORG: &str = "acme";

/// The control plane's clock 31 days on (the restore window is 30): its
/// monotonic clock is left alone so that its timers keep their pace.
const THIRTY_ONE_DAYS_ON: &[&str] = &[
    "env",
    "FAKETIME_DONT_FAKE_MONOTONIC=1",
    "faketime",
    "-f",
    "+31d",
];

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_key_uploaded_again_opens_everything_it_protected_on_sqlite() {
    recovery_after_removal(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_key_uploaded_again_opens_everything_it_protected_on_postgresql() {
    let db = TestDb::create().await;
    recovery_after_removal(Some(db.url())).await;
}

async fn recovery_after_removal(database: Option<String>) {
    let mut args = vec!["--maintenance-interval-secs", "1"];
    if let Some(url) = &database {
        args.extend(["--database", url]);
    }
    let mut setup = Setup::start_with(&[], &args).await;
    let work = tempfile::tempdir().unwrap();
    let (mut admin, content) = clients(&setup).await;

    set_byok(&mut admin, ORG, true).await;
    let master = upload_new_key(&mut admin, ORG, work.path(), "master", true).await;
    assert_eq!(master.state(), KeyState::Active);
    let keks: Vec<String> = create_keks(&content, ORG, "space-", 20, 4)
        .await
        .into_iter()
        .map(|k| k.kek_id)
        .collect();
    let before = generate_data_keys(&content, ORG, &keks).await;
    assert_all_decrypt(&content, ORG, &before).await;

    admin.revoke_key(key(&master.key_id)).await.unwrap();
    admin.delete_key(key(&master.key_id)).await.unwrap();
    let keystore = setup.dev.join("keystore/keys");
    let tombstones_before = tombstones(&keystore);

    // 31 days on: the timers remove the key and the daemon destroys it.
    setup.restart_control_plane(THIRTY_ONE_DAYS_ON).await;
    let (mut admin, mut content) = clients(&setup).await;
    wait_for_state(&mut admin, &master.key_id, KeyState::Removed).await;
    wait_until(|| tombstones(&keystore) == tombstones_before + 1).await;
    let blocked = decrypt(&mut content, &before[0]).await.unwrap_err();
    assert_eq!(blocked.code(), Code::FailedPrecondition, "{blocked:?}");
    assert!(
        blocked.message().contains("upload the original key"),
        "{}",
        blocked.message()
    );

    // Other material is no recovery: it is a new key, which cannot take over.
    let other = upload_new_key(&mut admin, ORG, work.path(), "other", false).await;
    assert_ne!(other.key_id, master.key_id);
    assert_eq!(other.state(), KeyState::Pending);
    let refused = admin.activate_key(key(&other.key_id)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    admin.cancel_key(key(&other.key_id)).await.unwrap();

    // The original bytes, wrapped afresh under the import key, as the admin
    // would from the copy they kept.
    let destroyed = tombstones(&keystore);
    let wrapped = rewrap(work.path(), "master");
    let recovered = admin
        .upload_key(pb::UploadKeyRequest {
            org_id: ORG.into(),
            wrapped_key: wrapped,
            activate_now: false,
            import_key_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(recovered.key_id, master.key_id, "the same key comes back");
    assert_eq!(recovered.state(), KeyState::Revoked);
    assert_eq!(recovered.key_check_value, master.key_check_value);
    assert_eq!(
        tombstones(&keystore),
        destroyed - 1,
        "the key lives again under its own handle in the HSM"
    );
    let back = admin
        .reactivate_key(key(&master.key_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.key.unwrap().state(), KeyState::Active);

    // Everything made before the removal opens, and new work goes on.
    assert_all_decrypt(&content, ORG, &before).await;
    let after = generate_data_keys(&content, ORG, &keks[..3]).await;
    assert_all_decrypt(&content, ORG, &after).await;
    let log = setup.log("control-plane");
    assert!(!log.contains("has been destroyed"), "{log}");
}

async fn clients(setup: &Setup) -> (Admin, Content) {
    let admin =
        KeyAdminServiceClient::new(channel(setup.listen, &setup.files("admin")).await.unwrap());
    let content = ContentKeyServiceClient::new(
        channel(setup.listen, &setup.files("service"))
            .await
            .unwrap(),
    );
    (admin, content)
}

fn key(key_id: &str) -> pb::KeyRequest {
    pb::KeyRequest {
        org_id: ORG.into(),
        key_id: key_id.into(),
    }
}

async fn decrypt(content: &mut Content, key: &ContentKey) -> Result<Vec<u8>, tonic::Status> {
    content
        .decrypt(pb::DecryptRequest {
            org_id: ORG.into(),
            wrapped_key: key.wrapped.clone(),
            context: key.context.clone(),
        })
        .await
        .map(|r| r.into_inner().plaintext)
}

/// `<name>.bin` of `dir` wrapped again under `dir/pub.pem` with the seed's recipe.
fn rewrap(dir: &Path, name: &str) -> Vec<u8> {
    let wrapped = format!("{name}.again");
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
            &wrapped,
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha256",
            "-pkeyopt",
            "rsa_mgf1_md:sha256",
        ],
    );
    std::fs::read(dir.join(wrapped)).unwrap()
}

fn tombstones(keystore: &Path) -> usize {
    files(keystore)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "destroyed"))
        .count()
}

async fn wait_for_state(admin: &mut Admin, key_id: &str, state: KeyState) {
    for _ in 0..100 {
        let listing = admin
            .list_keys(pb::ListKeysRequest { org_id: ORG.into() })
            .await
            .unwrap()
            .into_inner();
        if listing
            .keys
            .iter()
            .any(|k| k.key_id == key_id && k.state() == state)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("key {key_id} never reached {state:?}");
}

async fn wait_until(done: impl Fn() -> bool) {
    for _ in 0..100 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("condition not reached in 20 s");
}
