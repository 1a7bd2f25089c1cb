//! End-to-end: master keys that stay in AWS KMS. The real `hsm-daemon` and
//! `control-plane` binaries over real mutual TLS, the daemon talking to the
//! AWS KMS and STS emulator (moto server, started by the test command; these
//! tests fail, never skip, when it does not answer).
//!
//! Known emulator limits, and how the tests live with them: moto does not
//! enforce key state on Encrypt and Decrypt, so a disabled key is noticed
//! through DescribeKey (as a real deployment should do too); it cannot decrypt
//! a multi-region replica's ciphertext, so the backup is a separate key in
//! another region, under which every KEK is wrapped as well; and it reports a
//! key in an account the caller cannot reach as not found, where AWS would
//! deny access.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use cmk_hsm_aws_kms::{
    KeyArn, RoleArn,
    emulator::{
        self, admin as kms_admin, create_key, new_key, role_credentials, set_enabled,
        test_credentials,
    },
};
use cmk_proto::control::v1::{self as pb, KeyState, RotationState};
use cmk_tests::{
    ANY_PORT, ControlPlaneProcess, DaemonProcess, Pki,
    control_plane::{
        Admin, Content, ContentKey, admin_at, assert_all_decrypt, audit_log, content_at,
        create_keks, generate_data_keys, set_byok, upload_new_key, wait_for_rotation,
    },
};
use tonic::Code;

const ORG: &str = "acme";
/// The HSM daemon's AWS principal, as the operator configures it.
const DAEMON_PRINCIPAL: &str = "arn:aws:iam::999988887777:role/cmk-hsm-daemon";
/// Longest the tests wait for the service to notice something by itself.
const PATIENCE: Duration = Duration::from_secs(30);
/// Where nothing listens: a region that is down.
const DEAD: &str = "http://127.0.0.1:1";

/// Both processes, their files, and the emulator's address.
struct Setup {
    pki: Pki,
    endpoint: String,
    keystore: tempfile::TempDir,
    // The control plane's database, kept until the end of the test.
    data: tempfile::TempDir,
    daemon: DaemonProcess,
    control_plane: ControlPlaneProcess,
}

impl Setup {
    /// Both processes, the daemon reaching AWS KMS at the emulator (with
    /// `regions` as region=url overrides) under the test identity.
    async fn start(regions: &str) -> Self {
        let endpoint = emulator::emulator().await;
        let pki = Pki::new();
        let keystore = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let daemon = start_daemon(&pki, keystore.path(), ANY_PORT, &endpoint, regions).await;
        let control_plane = ControlPlaneProcess::start(
            &pki,
            daemon.addr,
            data.path(),
            ANY_PORT,
            &[
                ("CMK_CP_MAINTENANCE_INTERVAL_SECS", "1"),
                ("CMK_CP_KEK_CACHE_TTL_SECS", "1"),
                ("CMK_CP_AWS_PRINCIPAL_ARN", DAEMON_PRINCIPAL),
            ],
        )
        .await;
        Self {
            pki,
            endpoint,
            keystore,
            data,
            daemon,
            control_plane,
        }
    }

    async fn admin(&self) -> Admin {
        admin_at(&self.pki, self.control_plane.addr, "admin-acme").await
    }

    async fn content(&self) -> Content {
        content_at(&self.pki, self.control_plane.addr, "service-acme").await
    }

    /// Restarts the daemon on its address (where the control plane calls it)
    /// and keystore with other region overrides.
    async fn restart_daemon(&mut self, regions: &str) {
        let addr = self.daemon.addr;
        self.daemon.kill();
        self.daemon = start_daemon(
            &self.pki,
            self.keystore.path(),
            addr,
            &self.endpoint,
            regions,
        )
        .await;
    }
}

async fn start_daemon(
    pki: &Pki,
    keystore: &Path,
    listen: SocketAddr,
    endpoint: &str,
    regions: &str,
) -> DaemonProcess {
    DaemonProcess::start_with(
        pki,
        keystore,
        listen,
        &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("CMK_HSM_AWS_ENDPOINT", endpoint),
            ("CMK_HSM_AWS_REGION_ENDPOINTS", regions),
            ("CMK_HSM_AWS_KEY_STATE_TTL_SECS", "1"),
        ],
    )
    .await
}

fn add(
    key: &KeyArn,
    backup: Option<&KeyArn>,
    role: Option<&RoleArn>,
    now: bool,
) -> pb::AddAwsKeyRequest {
    pb::AddAwsKeyRequest {
        org_id: ORG.into(),
        key_arn: key.to_string(),
        backup_key_arn: backup.map(ToString::to_string).unwrap_or_default(),
        role_arn: role.map(ToString::to_string).unwrap_or_default(),
        activate_now: now,
    }
}

async fn add_key(admin: &mut Admin, request: pb::AddAwsKeyRequest) -> pb::Key {
    admin
        .add_aws_key(request)
        .await
        .unwrap_or_else(|e| panic!("AddAwsKey: {e:?}"))
        .into_inner()
        .key
        .unwrap()
}

async fn list(admin: &mut Admin) -> pb::ListKeysResponse {
    admin
        .list_keys(pb::ListKeysRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner()
}

fn key_req(key_id: &str) -> pb::KeyRequest {
    pb::KeyRequest {
        org_id: ORG.into(),
        key_id: key_id.into(),
    }
}

/// Polls the key list until `key_id` is in `state`; panics with the last
/// listing after [`PATIENCE`]. Returns how long it took.
async fn wait_for_state(admin: &mut Admin, key_id: &str, state: KeyState) -> Duration {
    let start = Instant::now();
    loop {
        let listing = list(admin).await;
        let found = listing.keys.iter().find(|k| k.key_id == key_id);
        if found.is_some_and(|k| k.state() == state) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{key_id} not {state:?} within {PATIENCE:?}: {listing:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The refusal of a Decrypt of `key`.
async fn refused_decrypt(content: &Content, key: &ContentKey) -> tonic::Status {
    content
        .clone()
        .decrypt(pb::DecryptRequest {
            org_id: ORG.into(),
            wrapped_key: key.wrapped.clone(),
            context: key.context.clone(),
        })
        .await
        .expect_err("Decrypt must be refused")
}

async fn assert_intact(admin: &mut Admin) {
    let check = admin
        .verify_audit_log(pb::VerifyAuditLogRequest { org_id: ORG.into() })
        .await
        .unwrap()
        .into_inner();
    assert!(check.intact, "{}", check.problem);
}

#[tokio::test]
async fn an_aws_key_is_added_only_once_the_service_can_use_it() {
    let setup = Setup::start("").await;
    let mut admin = setup.admin().await;
    set_byok(&mut admin, ORG, true).await;
    let before = list(&mut admin).await;
    let good = new_key(&setup.endpoint, "us-east-1").await;

    let refused = |key_arn: &str, backup: &str, role: &str| pb::AddAwsKeyRequest {
        org_id: ORG.into(),
        key_arn: key_arn.into(),
        backup_key_arn: backup.into(),
        role_arn: role.into(),
        activate_now: true,
    };
    let alias = "arn:aws:kms:us-east-1:123456789012:alias/cmk";
    for (request, code, words) in [
        (refused("", "", ""), Code::InvalidArgument, "ARN is empty"),
        (
            refused("not-an-arn", "", ""),
            Code::InvalidArgument,
            "not an ARN",
        ),
        (refused(alias, "", ""), Code::InvalidArgument, "alias"),
        (
            refused(good.as_str(), "arn:aws:kms:eu-west-1:12345:key/x", ""),
            Code::InvalidArgument,
            "backup_key_arn",
        ),
        (
            refused(good.as_str(), good.as_str(), ""),
            Code::InvalidArgument,
            "backup must be another key",
        ),
        (
            refused(good.as_str(), "", "arn:aws:iam::123456789012:user/me"),
            Code::InvalidArgument,
            "role_arn",
        ),
        // A key that does not exist.
        (
            refused(
                "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-4000-8000-000000000000",
                "",
                "",
            ),
            Code::FailedPrecondition,
            "does not exist",
        ),
    ] {
        let status = admin.add_aws_key(request.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{request:?}: {status:?}");
        assert!(
            status.message().contains(words),
            "{request:?}: {:?} lacks {words:?}",
            status.message()
        );
    }

    // A key in an account the service's identity has no access to.
    let role = RoleArn::parse("arn:aws:iam::111111111111:role/cmk-key-user").unwrap();
    let theirs = create_key(&kms_admin(
        &setup.endpoint,
        "us-east-1",
        role_credentials(&setup.endpoint, &role).await,
    ))
    .await;
    let status = admin
        .add_aws_key(add(&theirs, None, None, true))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains(theirs.as_str()), "{status:?}");
    assert_eq!(list(&mut admin).await, before, "nothing was added");

    // A usable key, with a backup in another region, activated later.
    let backup = new_key(&setup.endpoint, "us-west-2").await;
    let key = add_key(&mut admin, add(&good, Some(&backup), None, false)).await;
    assert_eq!(key.state(), KeyState::Pending);
    assert_eq!(key.source(), pb::KeySource::AwsKms);
    assert_eq!(key.key_check_value.len(), 10);
    let aws = key.aws.clone().unwrap();
    assert_eq!(aws.key_arn, good.as_str());
    assert_eq!(aws.backup_key_arn, backup.as_str());
    assert_eq!(aws.role_arn, "");
    let listed = list(&mut admin).await;
    assert!(listed.keys.iter().any(|k| k == &key), "{listed:?}");

    // The same key again is recognised by its check value.
    let status = admin
        .add_aws_key(add(&good, None, None, false))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(status.message().contains(&key.key_id), "{status:?}");

    let events = audit_log(&mut admin, ORG).await;
    let adds: Vec<&pb::AuditEvent> = events.iter().filter(|e| e.action.contains("aws")).collect();
    assert!(
        adds.iter().filter(|e| e.result != "ok").count() >= 9,
        "every refusal is audited: {adds:?}"
    );
    assert!(
        adds.iter()
            .any(|e| e.result == "ok" && e.key_id == key.key_id)
    );
    assert_intact(&mut admin).await;
}

#[tokio::test]
async fn a_key_is_used_through_an_assumed_role() {
    let setup = Setup::start("").await;
    let mut admin = setup.admin().await;
    set_byok(&mut admin, ORG, true).await;
    let role = RoleArn::parse("arn:aws:iam::111111111111:role/cmk/cmk-key-user").unwrap();
    let arn = create_key(&kms_admin(
        &setup.endpoint,
        "us-east-1",
        role_credentials(&setup.endpoint, &role).await,
    ))
    .await;
    assert_eq!(arn.account(), "111111111111");

    // The org's admin asks what to create in AWS, with cmkctl.
    let setup_json = cmkctl(&setup, &["aws-setup", "--key-arn", arn.as_str()]);
    let aws_setup: serde_json::Value = serde_json::from_str(&setup_json).unwrap();
    assert_eq!(aws_setup["service_principal_arn"], DAEMON_PRINCIPAL);
    let external_id = aws_setup["external_id"].as_str().unwrap().to_owned();
    assert!(external_id.starts_with("cmk-"), "{setup_json}");
    let trust = &aws_setup["trust_policy"]["Statement"][0];
    assert_eq!(trust["Principal"]["AWS"], DAEMON_PRINCIPAL);
    assert_eq!(
        trust["Condition"]["StringEquals"]["sts:ExternalId"],
        external_id.as_str()
    );
    let wrap = &aws_setup["permissions_policy"]["Statement"][0];
    assert_eq!(wrap["Resource"][0], arn.as_str());
    assert_eq!(
        wrap["Condition"]["StringEquals"]["kms:EncryptionContext:cmk:org"],
        ORG
    );

    // Out of reach of the daemon's own identity...
    let status = admin
        .add_aws_key(add(&arn, None, None, true))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    // ...and usable through the role.
    let key = add_key(&mut admin, add(&arn, None, Some(&role), true)).await;
    assert_eq!(key.state(), KeyState::Active);
    assert_eq!(key.aws.unwrap().role_arn, role.as_str());
    // The daemon was given the org's external id for the role (what it sends
    // on AssumeRole is checked on the wire in hsm-daemon/tests/aws_keys.rs).
    let given = setup.daemon.log.matching(&[
        "verifying access to an AWS KMS key",
        role.as_str(),
        &external_id,
    ]);
    assert!(
        !given.is_empty(),
        "the daemon was not given the org's external id"
    );
    // The same id, now and later.
    let again: serde_json::Value = serde_json::from_str(&cmkctl(&setup, &["aws-setup"])).unwrap();
    assert_eq!(again["external_id"], external_id.as_str());

    let content = setup.content().await;
    let keks = create_keks(&content, ORG, "space:", 5, 5).await;
    assert!(keks.iter().all(|k| k.key_id == key.key_id));
    let ids: Vec<String> = keks.into_iter().map(|k| k.kek_id).collect();
    let samples = generate_data_keys(&content, ORG, &ids).await;
    // Past the KEK cache: the KEKs are unwrapped by AWS KMS again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_all_decrypt(&content, ORG, &samples).await;
}

#[tokio::test]
async fn an_org_rotates_from_an_uploaded_key_to_an_aws_key_and_back() {
    let setup = Setup::start("").await;
    let mut admin = setup.admin().await;
    let content = setup.content().await;
    let dir = tempfile::tempdir().unwrap();
    set_byok(&mut admin, ORG, true).await;
    let uploaded = upload_new_key(&mut admin, ORG, dir.path(), "first", true).await;
    let keks: Vec<String> = create_keks(&content, ORG, "space:", 60, 16)
        .await
        .into_iter()
        .map(|k| k.kek_id)
        .collect();
    let mut samples = generate_data_keys(&content, ORG, &keks).await;

    // To AWS KMS, with a backup key.
    let primary = new_key(&setup.endpoint, "eu-west-1").await;
    let backup = new_key(&setup.endpoint, "eu-central-1").await;
    let aws = add_key(&mut admin, add(&primary, Some(&backup), None, true)).await;
    assert_eq!(aws.state(), KeyState::Active);
    let job = wait_for_rotation(&mut admin, ORG, PATIENCE, |j| {
        j.state() == RotationState::Finished && j.target_key_id == aws.key_id
    })
    .await;
    assert_eq!((job.done, job.total), (60, 60));
    wait_for_state(&mut admin, &uploaded.key_id, KeyState::Deactivated).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_all_decrypt(&content, ORG, &samples).await;
    let more: Vec<String> = create_keks(&content, ORG, "meeting:", 10, 10)
        .await
        .into_iter()
        .map(|k| {
            assert_eq!(k.key_id, aws.key_id);
            k.kek_id
        })
        .collect();
    samples.extend(generate_data_keys(&content, ORG, &more).await);

    // The AWS key shares the lifecycle: revoke blocks the org, reactivate ends it.
    admin.revoke_key(key_req(&aws.key_id)).await.unwrap();
    let status = refused_decrypt(&content, &samples[0]).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    admin.reactivate_key(key_req(&aws.key_id)).await.unwrap();
    assert_all_decrypt(&content, ORG, &samples).await;

    // And back to an uploaded key: the AWS key leaves the list once its KEKs
    // are re-wrapped, and is left as it is in AWS.
    let second = upload_new_key(&mut admin, ORG, dir.path(), "second", true).await;
    let job = wait_for_rotation(&mut admin, ORG, PATIENCE, |j| {
        j.state() == RotationState::Finished && j.target_key_id == second.key_id
    })
    .await;
    assert_eq!((job.done, job.total), (70, 70));
    let start = Instant::now();
    while list(&mut admin)
        .await
        .keys
        .iter()
        .any(|k| k.key_id == aws.key_id)
    {
        assert!(start.elapsed() < PATIENCE, "the AWS key is still listed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = admin.get_key(key_req(&aws.key_id)).await;
    assert!(
        status
            .as_ref()
            .map_or(true, |k| k.get_ref().key.as_ref().unwrap().state()
                == KeyState::Removed),
        "{status:?}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_all_decrypt(&content, ORG, &samples).await;
    for arn in [&primary, &backup] {
        let described = admin_client(&setup.endpoint, arn)
            .describe_key()
            .key_id(arn.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(
            described
                .key_metadata()
                .unwrap()
                .key_state()
                .unwrap()
                .as_str(),
            "Enabled",
            "nothing is disabled or deleted in AWS"
        );
    }
    let events = audit_log(&mut admin, ORG).await;
    for words in ["state active → rotating", "state rotating → removed"] {
        assert!(
            events
                .iter()
                .any(|e| e.key_id == aws.key_id && e.action == words),
            "no {words:?} for the AWS key: {events:?}"
        );
    }
    assert_intact(&mut admin).await;
}

#[tokio::test]
async fn unwrapping_fails_over_to_the_backup_key_when_the_primary_region_is_down() {
    let mut setup = Setup::start("").await;
    let mut admin = setup.admin().await;
    let content = setup.content().await;
    set_byok(&mut admin, ORG, true).await;
    let primary = new_key(&setup.endpoint, "us-east-1").await;
    let backup = new_key(&setup.endpoint, "us-west-2").await;
    let aws = add_key(&mut admin, add(&primary, Some(&backup), None, true)).await;
    let keks: Vec<String> = create_keks(&content, ORG, "space:", 8, 8)
        .await
        .into_iter()
        .map(|k| k.kek_id)
        .collect();
    let samples = generate_data_keys(&content, ORG, &keks).await;

    // us-east-1 goes down.
    setup.restart_daemon(&format!("us-east-1={DEAD}")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    assert_all_decrypt(&content, ORG, &samples).await;
    println!(
        "{} content keys opened through the backup key in {:?}",
        samples.len(),
        started.elapsed()
    );
    // Nothing new is wrapped while a copy under the backup cannot be made
    // alongside: here the primary is the one that is down.
    let status = content
        .clone()
        .create_kek(pb::CreateKekRequest {
            org_id: ORG.into(),
            resource: "space:new".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("us-east-1"), "{status:?}");
    let listing = list(&mut admin).await;
    assert_eq!(
        listing.active_key_id, aws.key_id,
        "a region outage revokes nothing"
    );

    // The region is back.
    setup.restart_daemon("").await;
    create_keks(&content, ORG, "space:new", 1, 1).await;
    assert_all_decrypt(&content, ORG, &samples).await;
}

#[tokio::test]
async fn a_key_its_owner_disables_is_revoked_by_provider_until_enabled_again() {
    let setup = Setup::start("").await;
    let mut admin = setup.admin().await;
    let content = setup.content().await;
    set_byok(&mut admin, ORG, true).await;
    let arn = new_key(&setup.endpoint, "us-east-1").await;
    let key = add_key(&mut admin, add(&arn, None, None, true)).await;
    let keks: Vec<String> = create_keks(&content, ORG, "space:", 4, 4)
        .await
        .into_iter()
        .map(|k| k.kek_id)
        .collect();
    let samples = generate_data_keys(&content, ORG, &keks).await;

    set_enabled(&setup.endpoint, &arn, false).await;
    let took = wait_for_state(&mut admin, &key.key_id, KeyState::RevokedByProvider).await;
    println!("disabled in AWS → revoked by provider after {took:?}");
    let status = refused_decrypt(&content, &samples[0]).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("provider") && status.message().contains("AWS KMS"),
        "the cause is named: {status:?}"
    );
    let status = content
        .clone()
        .create_kek(pb::CreateKekRequest {
            org_id: ORG.into(),
            resource: "space:new".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    set_enabled(&setup.endpoint, &arn, true).await;
    let took = wait_for_state(&mut admin, &key.key_id, KeyState::Active).await;
    println!("enabled in AWS → active after {took:?}");
    assert_all_decrypt(&content, ORG, &samples).await;

    // Scheduled for deletion, the same; cancelling the deletion leaves the
    // key disabled (as in AWS) until it is enabled.
    let kms = admin_client(&setup.endpoint, &arn);
    kms.schedule_key_deletion()
        .key_id(arn.key_id())
        .pending_window_in_days(7)
        .send()
        .await
        .unwrap();
    wait_for_state(&mut admin, &key.key_id, KeyState::RevokedByProvider).await;
    kms.cancel_key_deletion()
        .key_id(arn.key_id())
        .send()
        .await
        .unwrap();
    set_enabled(&setup.endpoint, &arn, true).await;
    wait_for_state(&mut admin, &key.key_id, KeyState::Active).await;
    assert_all_decrypt(&content, ORG, &samples).await;

    let events = audit_log(&mut admin, ORG).await;
    let provider: Vec<&str> = events
        .iter()
        .filter(|e| e.key_id == key.key_id && e.actor == "service")
        .map(|e| e.action.as_str())
        .collect();
    assert!(
        provider
            .iter()
            .filter(|a| **a == "state active → revoked by provider")
            .count()
            == 2
            && provider
                .iter()
                .filter(|a| **a == "state revoked by provider → active")
                .count()
                == 2,
        "{provider:?}"
    );
    assert_intact(&mut admin).await;
}

/// The key owner's own client, for what the service never does.
fn admin_client(endpoint: &str, key: &KeyArn) -> aws_sdk_kms::Client {
    kms_admin(endpoint, key.region(), test_credentials())
}

/// An AWS key removed while the org still needed it (revoked, deleted, the
/// restore window over: the control plane restarted 31 days later under
/// faketime) comes back under its own handle when the admin adds the same key
/// ARN again, and every content key made before opens once it is reactivated.
#[tokio::test(flavor = "multi_thread")]
async fn a_removed_aws_key_added_again_opens_everything_it_protected() {
    let mut setup = Setup::start("").await;
    let primary = new_key(&setup.endpoint, "us-east-1").await;
    let mut admin = setup.admin().await;
    let content = setup.content().await;
    set_byok(&mut admin, ORG, true).await;
    let aws = add_key(&mut admin, add(&primary, None, None, true)).await;
    let keks: Vec<String> = create_keks(&content, ORG, "space:", 10, 4)
        .await
        .into_iter()
        .map(|k| k.kek_id)
        .collect();
    let samples = generate_data_keys(&content, ORG, &keks).await;
    admin.revoke_key(key_req(&aws.key_id)).await.unwrap();
    admin.delete_key(key_req(&aws.key_id)).await.unwrap();

    setup.control_plane.kill();
    setup.control_plane = ControlPlaneProcess::start(
        &setup.pki,
        setup.daemon.addr,
        setup.data.path(),
        ANY_PORT,
        &[
            ("CMK_CP_MAINTENANCE_INTERVAL_SECS", "1"),
            ("LD_PRELOAD", FAKETIME_LIBRARY),
            ("FAKETIME", "+31d"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    )
    .await;
    let mut admin = setup.admin().await;
    let content = setup.content().await;
    wait_for_state(&mut admin, &aws.key_id, KeyState::Removed).await;
    let status = refused_decrypt(&content, &samples[0]).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    let back = add_key(&mut admin, add(&primary, None, None, false)).await;
    assert_eq!(back.key_id, aws.key_id, "the same key comes back");
    assert_eq!(back.state(), KeyState::Revoked);
    admin.reactivate_key(key_req(&aws.key_id)).await.unwrap();
    assert_all_decrypt(&content, ORG, &samples).await;
}

/// libfaketime, from Debian's `faketime` package (installed by the test
/// command): the control plane's clock moved by `FAKETIME`.
const FAKETIME_LIBRARY: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Runs the real cmkctl as the org's admin, JSON output; its standard output.
fn cmkctl(setup: &Setup, args: &[&str]) -> String {
    let out = setup
        .pki
        .cmkctl(setup.control_plane.addr, "admin-acme", ORG)
        .args(["--output", "json"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "cmkctl {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}
