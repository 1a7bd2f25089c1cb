//! The AWS KMS client against the real KMS and STS emulator (moto server).
//!
//! Start it with `scripts/moto.sh start`; the tests reach it at
//! `CMK_TEST_AWS_ENDPOINT` (default http://127.0.0.1:4566) and fail, never
//! skip, when it does not answer. Every test makes its own keys, so they run in
//! parallel against one server.
//!
//! The emulator does not enforce key state on Encrypt and Decrypt (a disabled
//! key still encrypts there), so key-state checks go through DescribeKey, as the
//! client's own checks do.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use aws_sdk_kms::types::{KeySpec, KeyUsageType};
use cmk_hsm_aws_kms::{
    ArnError, AwsCredentials, AwsError, AwsKeyRef, AwsKeyState, AwsKms, AwsSettings,
    EncryptionContext, KeyArn, RoleArn, WrappedByAws,
};
use cmk_secret::SecretBytes;

/// An address where nothing listens: a region that is down.
const DEAD: &str = "http://127.0.0.1:1";

use cmk_hsm_aws_kms::emulator::{
    ACCOUNT, admin, create_key, credentials, emulator, new_key, role_credentials, settings,
    test_credentials,
};

/// The client under test, with every region on the emulator except those
/// given, which get their own endpoint.
fn client(endpoint: &str, regions: &[(&str, &str)]) -> AwsKms {
    AwsKms::new(settings(endpoint, regions))
}

fn context(kek: &str) -> EncryptionContext {
    EncryptionContext::new("cmk:org", "org-test")
        .and_then(|c| c.with("cmk:kek", kek))
        .unwrap()
}

fn secret() -> SecretBytes {
    SecretBytes::copy_from(&[0x5a; 32])
}

fn key_ref(primary: &KeyArn, backup: Option<&KeyArn>) -> AwsKeyRef {
    AwsKeyRef::new(primary.clone(), backup.cloned(), None).unwrap()
}

#[tokio::test]
async fn a_key_verifies_wraps_and_unwraps() {
    let endpoint = emulator().await;
    let arn = new_key(&endpoint, "us-east-1").await;
    assert_eq!(arn.region(), "us-east-1");
    assert_eq!(arn.account(), ACCOUNT);
    assert_eq!(KeyArn::parse(&arn.to_string()).unwrap(), arn);
    let kms = client(&endpoint, &[]);
    let key = key_ref(&arn, None);

    kms.verify_access(&key, None).await.expect("usable key");
    assert_eq!(
        kms.key_state(&arn, None).await.unwrap(),
        AwsKeyState::Enabled
    );

    let wrapped = kms
        .encrypt(&key, &secret(), &context("kek-1"))
        .await
        .unwrap();
    assert!(wrapped.backup().is_none());
    // Through the byte form the caller stores.
    let stored = WrappedByAws::from_bytes(&wrapped.to_bytes()).unwrap();
    let plaintext = kms.decrypt(&key, &stored, &context("kek-1")).await.unwrap();
    assert!(plaintext.ct_eq(&secret()));
}

#[tokio::test]
async fn a_malformed_arn_is_refused_with_the_reason() {
    let error = KeyArn::parse("arn:aws:kms:us-east-1:123456789012:alias/cmk").unwrap_err();
    assert!(matches!(error, ArnError::Alias(_)));
    assert!(
        error.to_string().contains("alias can be repointed"),
        "{error}"
    );
    let error = KeyArn::parse("arn:aws:kms:us-east-1:12345:key/x").unwrap_err();
    assert!(error.to_string().contains("12-digit"), "{error}");
    let error = RoleArn::parse("arn:aws:iam::123456789012:user/admin").unwrap_err();
    assert!(error.to_string().contains("not a role"), "{error}");
    let primary = KeyArn::parse(
        "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    )
    .unwrap();
    assert_eq!(
        AwsKeyRef::new(primary.clone(), Some(primary), None),
        Err(ArnError::BackupIsPrimary)
    );
}

#[tokio::test]
async fn an_unknown_key_is_not_found_with_awss_message() {
    let endpoint = emulator().await;
    let kms = client(&endpoint, &[]);
    let arn = KeyArn::parse(&format!(
        "arn:aws:kms:us-east-1:{ACCOUNT}:key/00000000-0000-4000-8000-000000000000"
    ))
    .unwrap();
    let key = key_ref(&arn, None);

    let error = kms.verify_access(&key, None).await.unwrap_err();
    let AwsError::NotFound { detail, .. } = &error else {
        panic!("expected NotFound, got {error:?}");
    };
    assert_eq!(detail.code, "NotFoundException");
    assert!(detail.message.contains("does not exist"), "{detail}");
    assert!(error.to_string().contains(arn.as_str()), "{error}");

    let error = kms.key_state(&arn, None).await.unwrap_err();
    assert!(matches!(error, AwsError::NotFound { .. }), "{error:?}");
    let error = kms
        .encrypt(&key, &secret(), &context("kek-1"))
        .await
        .unwrap_err();
    assert!(matches!(error, AwsError::NotFound { .. }), "{error:?}");
}

#[tokio::test]
async fn a_key_in_a_region_or_account_the_emulator_does_not_have_is_not_found() {
    let endpoint = emulator().await;
    let kms = client(&endpoint, &[]);
    let real = new_key(&endpoint, "us-east-1").await;
    // The same key id, but in a region where it does not exist.
    let elsewhere =
        KeyArn::parse(&real.to_string().replace(":us-east-1:", ":ap-southeast-2:")).unwrap();
    let error = kms
        .verify_access(&key_ref(&elsewhere, None), None)
        .await
        .unwrap_err();
    assert!(matches!(error, AwsError::NotFound { .. }), "{error:?}");
    // An account nobody created anything in.
    let foreign = KeyArn::parse(
        "arn:aws:kms:eu-central-1:210987654321:key/11111111-2222-4333-8444-555555555555",
    )
    .unwrap();
    let error = kms.key_state(&foreign, None).await.unwrap_err();
    assert!(matches!(error, AwsError::NotFound { .. }), "{error:?}");
}

#[tokio::test]
async fn a_disabled_key_is_refused_until_it_is_enabled_again() {
    let endpoint = emulator().await;
    let admin = admin(&endpoint, "us-east-1", test_credentials());
    let arn = create_key(&admin).await;
    let kms = client(&endpoint, &[]);
    let key = key_ref(&arn, None);

    // moto's DisableKey and EnableKey take the key id, not the ARN.
    admin
        .disable_key()
        .key_id(arn.key_id())
        .send()
        .await
        .unwrap();
    assert_eq!(
        kms.key_state(&arn, None).await.unwrap(),
        AwsKeyState::Disabled
    );
    let error = kms.verify_access(&key, None).await.unwrap_err();
    let AwsError::KeyDisabled { detail, .. } = &error else {
        panic!("expected KeyDisabled, got {error:?}");
    };
    assert!(detail.message.contains("Disabled"), "{detail}");

    admin
        .enable_key()
        .key_id(arn.key_id())
        .send()
        .await
        .unwrap();
    assert_eq!(
        kms.key_state(&arn, None).await.unwrap(),
        AwsKeyState::Enabled
    );
    kms.verify_access(&key, None).await.expect("enabled again");
}

#[tokio::test]
async fn a_key_scheduled_for_deletion_is_pending_deletion() {
    let endpoint = emulator().await;
    let admin = admin(&endpoint, "us-east-1", test_credentials());
    let arn = create_key(&admin).await;
    let kms = client(&endpoint, &[]);

    admin
        .schedule_key_deletion()
        .key_id(arn.key_id())
        .pending_window_in_days(7)
        .send()
        .await
        .unwrap();
    assert_eq!(
        kms.key_state(&arn, None).await.unwrap(),
        AwsKeyState::PendingDeletion
    );
    let error = kms
        .verify_access(&key_ref(&arn, None), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, AwsError::KeyDisabled { detail, .. } if detail.message.contains("PendingDeletion")),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_key_that_is_not_symmetric_is_unsuitable() {
    let endpoint = emulator().await;
    let admin = admin(&endpoint, "us-east-1", test_credentials());
    let created = admin
        .create_key()
        .key_usage(KeyUsageType::EncryptDecrypt)
        .key_spec(KeySpec::Rsa2048)
        .send()
        .await
        .unwrap();
    let arn = KeyArn::parse(created.key_metadata().unwrap().arn().unwrap()).unwrap();
    let error = client(&endpoint, &[])
        .verify_access(&key_ref(&arn, None), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, AwsError::Unsuitable { reason, .. } if reason.contains("RSA_2048")),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_wrong_context_or_ciphertext_is_refused_without_failover() {
    let endpoint = emulator().await;
    let primary = new_key(&endpoint, "us-east-1").await;
    let backup = new_key(&endpoint, "eu-west-1").await;
    let key = key_ref(&primary, Some(&backup));
    let wrapped = client(&endpoint, &[])
        .encrypt(&key, &secret(), &context("kek-1"))
        .await
        .unwrap();
    assert!(wrapped.backup().is_some());
    // The backup's region is dead here: had the refusal failed over, the error
    // would be a Failover, not the primary's answer.
    let kms = client(&endpoint, &[("eu-west-1", DEAD)]);

    let error = kms
        .decrypt(&key, &wrapped, &context("kek-2"))
        .await
        .unwrap_err();
    let AwsError::InvalidCiphertext { detail, key: which } = &error else {
        panic!("expected InvalidCiphertext, got {error:?}");
    };
    assert_eq!(detail.code, "InvalidCiphertextException");
    assert_eq!(which, &primary);

    // The backup's ciphertext offered as the primary's: refused (AWS says
    // IncorrectKeyException, the emulator AccessDeniedException), no failover.
    let swapped = WrappedByAws::new(wrapped.backup().unwrap().to_vec(), None).unwrap();
    let error = kms
        .decrypt(&key, &swapped, &context("kek-1"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            AwsError::InvalidCiphertext { .. } | AwsError::AccessDenied { .. }
        ),
        "{error:?}"
    );

    // An altered ciphertext: refused, no failover.
    let mut altered = wrapped.primary().to_vec();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    let altered = WrappedByAws::new(altered, wrapped.backup().map(<[u8]>::to_vec)).unwrap();
    let error = kms
        .decrypt(&key, &altered, &context("kek-1"))
        .await
        .unwrap_err();
    assert!(
        !error.is_unavailable() && !matches!(error, AwsError::Failover { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn decryption_fails_over_to_the_backup_when_the_primary_region_is_down() {
    let endpoint = emulator().await;
    let primary = new_key(&endpoint, "us-east-1").await;
    let backup = new_key(&endpoint, "eu-west-1").await;
    let key = key_ref(&primary, Some(&backup));
    let healthy = client(&endpoint, &[]);
    healthy.verify_access(&key, None).await.unwrap();
    let wrapped = healthy
        .encrypt(&key, &secret(), &context("kek-1"))
        .await
        .unwrap();
    let unprotected = healthy
        .encrypt(&key_ref(&primary, None), &secret(), &context("kek-2"))
        .await
        .unwrap();

    let primary_down = client(&endpoint, &[("us-east-1", DEAD)]);
    let started = Instant::now();
    let plaintext = primary_down
        .decrypt(&key, &wrapped, &context("kek-1"))
        .await
        .expect("decrypted through the backup");
    assert!(plaintext.ct_eq(&secret()));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "failover took {took:?}");

    // Without a backup ciphertext there is nothing to fail over to.
    let error = primary_down
        .decrypt(&key, &unprotected, &context("kek-2"))
        .await
        .unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
    assert!(error.to_string().contains("us-east-1"), "{error}");

    // Nothing new is wrapped while the primary is down.
    let error = primary_down
        .encrypt(&key, &secret(), &context("kek-3"))
        .await
        .unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");

    // Both regions down: both reasons.
    let both_down = client(&endpoint, &[("us-east-1", DEAD), ("eu-west-1", DEAD)]);
    let error = both_down
        .decrypt(&key, &wrapped, &context("kek-1"))
        .await
        .unwrap_err();
    let AwsError::Failover {
        primary: p,
        backup: b,
    } = &error
    else {
        panic!("expected Failover, got {error:?}");
    };
    assert!(p.is_unavailable() && b.is_unavailable(), "{error}");
}

/// A region that accepts connections and never answers: the timeouts, not a
/// refused connection, must end the wait.
#[tokio::test]
async fn a_region_that_never_answers_times_out_and_fails_over() {
    let endpoint = emulator().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = format!("http://{}", listener.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let primary = new_key(&endpoint, "us-east-1").await;
    let backup = new_key(&endpoint, "eu-west-1").await;
    let key = key_ref(&primary, Some(&backup));
    let wrapped = client(&endpoint, &[])
        .encrypt(&key, &secret(), &context("kek-1"))
        .await
        .unwrap();

    let kms = AwsKms::new(AwsSettings {
        endpoint: Some(endpoint.clone()),
        endpoint_for_region: [("us-east-1".to_owned(), silent)].into(),
        credentials: credentials(),
        attempt_timeout: Duration::from_millis(500),
        operation_timeout: Duration::from_millis(1500),
        ..AwsSettings::default()
    });
    let started = Instant::now();
    let plaintext = kms
        .decrypt(&key, &wrapped, &context("kek-1"))
        .await
        .expect("decrypted through the backup");
    assert!(plaintext.ct_eq(&secret()));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "failover took {took:?}"
    );
    let error = kms.key_state(&primary, None).await.unwrap_err();
    assert!(
        matches!(&error, AwsError::Unavailable { detail, .. } if detail.code == "timeout"),
        "{error:?}"
    );
    holder.abort();
}

#[tokio::test]
async fn wrapping_fails_as_a_whole_when_the_backup_fails() {
    let endpoint = emulator().await;
    let primary = new_key(&endpoint, "us-east-1").await;
    let backup = new_key(&endpoint, "eu-west-1").await;
    let kms = client(&endpoint, &[("eu-west-1", DEAD)]);
    let error = kms
        .encrypt(
            &key_ref(&primary, Some(&backup)),
            &secret(),
            &context("kek-1"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&error, AwsError::Unavailable { key, .. } if key == &backup),
        "{error:?}"
    );
    let error = kms
        .verify_access(&key_ref(&primary, Some(&backup)), None)
        .await
        .unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
}

#[tokio::test]
async fn plaintext_sizes_outside_kms_limits_are_refused_before_any_call() {
    // No emulator needed: the check comes first. A dead endpoint proves no
    // call is made (it would be Unavailable).
    let kms = client(DEAD, &[]);
    let arn = KeyArn::parse(
        "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    )
    .unwrap();
    for len in [0, 4097] {
        let error = kms
            .encrypt(
                &key_ref(&arn, None),
                &SecretBytes::zeroed(len),
                &context("kek-1"),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(error, AwsError::PlaintextSize(n) if n == len),
            "{error:?}"
        );
    }
}

#[tokio::test]
async fn a_key_is_used_through_an_assumed_role() {
    let endpoint = emulator().await;
    let role = RoleArn::parse("arn:aws:iam::111111111111:role/cmk/cmk-hsm-test").unwrap();
    // moto gives credentials from AssumeRole the role's account: a key made
    // with them is in 111111111111, out of reach of the plain test identity.
    let as_role = role_credentials(&endpoint, &role).await;
    let arn = create_key(&admin(&endpoint, "us-east-1", as_role)).await;
    assert_eq!(arn.account(), "111111111111");

    let kms = client(&endpoint, &[]);
    let key = AwsKeyRef::new(arn.clone(), None, Some(role.clone())).unwrap();
    kms.verify_access(&key, None)
        .await
        .expect("usable through the role");
    let wrapped = kms
        .encrypt(&key, &secret(), &context("kek-1"))
        .await
        .unwrap();
    let plaintext = kms
        .decrypt(&key, &wrapped, &context("kek-1"))
        .await
        .unwrap();
    assert!(plaintext.ct_eq(&secret()));
    assert_eq!(
        kms.key_state(&arn, key.assumed_role()).await.unwrap(),
        AwsKeyState::Enabled
    );

    // Without the role the same key does not exist for this identity: the role
    // above was really assumed.
    let error = kms.key_state(&arn, None).await.unwrap_err();
    assert!(matches!(error, AwsError::NotFound { .. }), "{error:?}");
}

#[tokio::test]
async fn an_unreachable_sts_fails_over_like_an_unreachable_kms() {
    let endpoint = emulator().await;
    let role = RoleArn::parse("arn:aws:iam::123456789012:role/cmk-hsm-test").unwrap();
    let arn = new_key(&endpoint, "us-east-1").await;
    let kms = client(&endpoint, &[("us-east-1", DEAD)]);
    let key = AwsKeyRef::new(arn, None, Some(role)).unwrap();
    let error = kms.verify_access(&key, None).await.unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
}

#[test]
fn settings_never_print_the_secret_key() {
    let settings = AwsSettings {
        credentials: AwsCredentials::Static {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: SecretBytes::copy_from(b"wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        },
        ..AwsSettings::default()
    };
    let printed = format!("{settings:?}");
    assert!(!printed.contains("wJalrXUtnFEMI"), "{printed}");
    assert!(printed.contains("redacted"), "{printed}");
    let printed = format!("{:?}", AwsKms::new(settings));
    assert!(!printed.contains("wJalrXUtnFEMI"), "{printed}");
}
