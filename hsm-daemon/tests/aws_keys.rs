//! The daemon's keys: the software keystore holding references to keys in
//! AWS KMS beside its own, composed with the AWS KMS backend, against the KMS
//! emulator (moto server; see `cmk_hsm_aws_kms::emulator` for how it is found).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cmk_hsm_aws_kms::{
    AwsError, AwsKeyRef, AwsKeys, AwsKmsError, KeyArn, ProviderState, check_value,
};
use cmk_hsm_custody::{
    CustodyError, Destroyed, ImportKeyBits, KeyHandle, KeyInfo, KeyOrigin, KeyScope, OrgName,
    ProviderErrorKind, RootKey, SoftwareCustody, UnwrapItem, Unwrapped, WrapItem, envelope,
};
use cmk_hsm_daemon::{Admission, Destroy, ForOrg, Import, ServiceError, Source, keys::Keys};
use cmk_secret::SecretBytes;

use cmk_hsm_aws_kms::emulator::{admin, create_key, emulator, new_key, settings, test_credentials};

/// How long the keystore trusts a key's state here: short, so that tests see
/// their own DisableKey quickly.
const STATE_TTL: Duration = Duration::from_millis(300);

fn open(dir: &Path, endpoint: &str) -> Keys {
    let root = RootKey::from_hex(&SecretBytes::copy_from(&[b'7'; 64])).unwrap();
    let keystore =
        Arc::new(SoftwareCustody::open(dir, root, ImportKeyBits::Rsa3072).expect("open keystore"));
    let aws = AwsKeys::new(settings(endpoint, &[]), STATE_TTL, keystore.clone());
    Keys::new(keystore, Some(aws))
}

/// The calls the tests make, in the words of a custody backend.
trait Calls {
    async fn add_aws_key(
        &self,
        handle: &KeyHandle,
        key: AwsKeyRef,
    ) -> Result<KeyInfo, ServiceError>;
    async fn recover_aws_key(
        &self,
        handle: &KeyHandle,
        key: AwsKeyRef,
    ) -> Result<KeyInfo, ServiceError>;
    async fn generate(&self, handle: &KeyHandle) -> Result<KeyInfo, ServiceError>;
    async fn destroy_one(&self, handle: &KeyHandle) -> Result<Destroyed, ServiceError>;
    async fn wrap_one(
        &self,
        handle: &KeyHandle,
        plaintext: &SecretBytes,
        aad: &[u8],
    ) -> Result<Vec<u8>, ServiceError>;
    async fn unwrap_one(&self, ciphertext: &[u8], aad: &[u8]) -> Result<Unwrapped, ServiceError>;
}

impl Calls for Keys {
    async fn add_aws_key(
        &self,
        handle: &KeyHandle,
        key: AwsKeyRef,
    ) -> Result<KeyInfo, ServiceError> {
        self.import(Import {
            handle: Some(*handle),
            admission: Admission::New,
            scope: scope(),
            source: Source::AwsKms(key),
        })
        .await
    }

    async fn recover_aws_key(
        &self,
        handle: &KeyHandle,
        key: AwsKeyRef,
    ) -> Result<KeyInfo, ServiceError> {
        self.import(Import {
            handle: Some(*handle),
            admission: Admission::Recover,
            scope: scope(),
            source: Source::AwsKms(key),
        })
        .await
    }

    async fn generate(&self, handle: &KeyHandle) -> Result<KeyInfo, ServiceError> {
        self.import(Import {
            handle: Some(*handle),
            admission: Admission::New,
            scope: scope(),
            source: Source::Generate,
        })
        .await
    }

    async fn destroy_one(&self, handle: &KeyHandle) -> Result<Destroyed, ServiceError> {
        self.destroy(&Destroy {
            org: Some(org()),
            handle: *handle,
        })
        .await
    }

    async fn wrap_one(
        &self,
        handle: &KeyHandle,
        plaintext: &SecretBytes,
        aad: &[u8],
    ) -> Result<Vec<u8>, ServiceError> {
        self.wrap(&ForOrg {
            org: org(),
            item: WrapItem {
                handle: *handle,
                plaintext: SecretBytes::copy_from(plaintext.expose()),
                associated_data: aad.to_vec(),
            },
        })
        .await
    }

    async fn unwrap_one(&self, ciphertext: &[u8], aad: &[u8]) -> Result<Unwrapped, ServiceError> {
        self.unwrap(&ForOrg {
            org: org(),
            item: UnwrapItem {
                ciphertext: ciphertext.to_vec(),
                associated_data: aad.to_vec(),
            },
        })
        .await
    }
}

/// The keystore's refusal, whichever backend passed it on.
fn keystore(err: &ServiceError) -> Option<&CustodyError> {
    match err {
        ServiceError::Custody(CustodyError::Provider(_)) => None,
        ServiceError::Custody(err) => Some(err),
        _ => None,
    }
}

/// The AWS KMS backend's own error inside a provider's refusal, and what
/// custody says it means.
fn aws(err: &ServiceError) -> Option<(&AwsKmsError, ProviderErrorKind)> {
    match err {
        ServiceError::Custody(CustodyError::Provider(provider)) => provider
            .downcast_ref::<AwsKmsError>()
            .map(|aws| (aws, provider.kind())),
        _ => None,
    }
}

/// The org every key here serves.
fn org() -> OrgName {
    OrgName::parse("org-a").unwrap()
}

fn scope() -> KeyScope {
    KeyScope::Org(org())
}

fn reference(primary: &KeyArn, backup: Option<&KeyArn>) -> AwsKeyRef {
    AwsKeyRef::new(primary.clone(), backup.cloned(), None).unwrap()
}

fn kek() -> SecretBytes {
    SecretBytes::copy_from(&[0x42; 32])
}

#[tokio::test]
async fn a_reference_wraps_unwraps_and_survives_a_restart_until_forgotten() {
    let endpoint = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let arn = new_key(&endpoint, "us-east-1").await;
    let backup = new_key(&endpoint, "us-west-2").await;
    let key = reference(&arn, Some(&backup));
    let handle = KeyHandle::random().unwrap();

    let custody = open(dir.path(), &endpoint);
    let info = custody.add_aws_key(&handle, key.clone()).await.unwrap();
    assert_eq!(info.handle, handle);
    assert_eq!(info.origin, KeyOrigin::AwsKms);
    assert_eq!(info.check_value, check_value(&key));

    let ct = custody
        .wrap_one(&handle, &kek(), b"org-a/kek-1")
        .await
        .unwrap();
    assert_eq!(ct[0], envelope::VERSION_AWS);
    assert_eq!(envelope::parse(&ct), Ok(handle));
    let out = custody.unwrap_one(&ct, b"org-a/kek-1").await.unwrap();
    assert_eq!(out.handle, handle);
    assert!(out.plaintext.ct_eq(&kek()));

    // The associated data is bound through the encryption context.
    let err = custody.unwrap_one(&ct, b"org-a/kek-2").await.unwrap_err();
    assert!(
        matches!(
            aws(&err),
            Some((
                AwsKmsError::Aws(AwsError::InvalidCiphertext { .. }),
                ProviderErrorKind::Authentication
            ))
        ),
        "{err:?}"
    );
    // A handle is taken by a reference as by a key.
    let err = custody.add_aws_key(&handle, key.clone()).await.unwrap_err();
    assert!(
        matches!(
            keystore(&err),
            Some(CustodyError::HandleInUse {
                destroyed: false,
                ..
            })
        ),
        "{err:?}"
    );

    drop(custody);
    let custody = open(dir.path(), &endpoint);
    let out = custody
        .unwrap_one(&ct, b"org-a/kek-1")
        .await
        .expect("after a restart");
    assert!(out.plaintext.ct_eq(&kek()));

    assert_eq!(custody.destroy_one(&handle).await.unwrap(), Destroyed::Now);
    assert_eq!(
        custody.destroy_one(&handle).await.unwrap(),
        Destroyed::Already
    );
    let err = custody.unwrap_one(&ct, b"org-a/kek-1").await.unwrap_err();
    assert!(
        matches!(keystore(&err), Some(CustodyError::DestroyedKey(h)) if *h == handle),
        "{err:?}"
    );
    // Forgotten here; untouched in AWS.
    let described = admin(&endpoint, "us-east-1", test_credentials())
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
        "Enabled"
    );
}

#[tokio::test]
async fn a_key_that_cannot_be_used_is_not_stored() {
    let endpoint = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let custody = open(dir.path(), &endpoint);
    let handle = KeyHandle::random().unwrap();
    let unknown = KeyArn::parse(
        "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-4000-8000-000000000000",
    )
    .unwrap();

    let err = custody
        .add_aws_key(&handle, reference(&unknown, None))
        .await
        .unwrap_err();
    assert!(
        matches!(
            aws(&err),
            Some((
                AwsKmsError::Aws(AwsError::NotFound { .. }),
                ProviderErrorKind::Refused
            ))
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("does not exist"), "{err}");
    let err = custody.wrap_one(&handle, &kek(), b"").await.unwrap_err();
    assert!(
        matches!(keystore(&err), Some(CustodyError::UnknownKey(_))),
        "{err:?}"
    );
    // Nothing claimed the handle.
    let good = new_key(&endpoint, "us-east-1").await;
    custody
        .add_aws_key(&handle, reference(&good, None))
        .await
        .expect("the handle is still free");
}

#[tokio::test]
async fn a_key_its_owner_disables_is_refused_naming_the_state_until_enabled() {
    let endpoint = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let custody = open(dir.path(), &endpoint);
    let admin = admin(&endpoint, "us-east-1", test_credentials());
    let arn = create_key(&admin).await;
    let handle = KeyHandle::random().unwrap();
    custody
        .add_aws_key(&handle, reference(&arn, None))
        .await
        .unwrap();
    let ct = custody.wrap_one(&handle, &kek(), b"aad").await.unwrap();

    admin
        .disable_key()
        .key_id(arn.key_id())
        .send()
        .await
        .unwrap();
    tokio::time::sleep(STATE_TTL).await;
    for err in [
        custody.wrap_one(&handle, &kek(), b"aad").await.unwrap_err(),
        custody.unwrap_one(&ct, b"aad").await.unwrap_err(),
    ] {
        let Some((AwsKmsError::ProviderKeyState { key, state }, kind)) = aws(&err) else {
            panic!("expected ProviderKeyState, got {err:?}");
        };
        assert_eq!(key, &arn);
        assert_eq!(*state, ProviderState::Disabled);
        assert_eq!(kind, ProviderErrorKind::KeyState(ProviderState::Disabled));
        assert!(err.to_string().contains("disabled in AWS KMS"), "{err}");
    }

    admin
        .enable_key()
        .key_id(arn.key_id())
        .send()
        .await
        .unwrap();
    tokio::time::sleep(STATE_TTL).await;
    assert!(
        custody
            .unwrap_one(&ct, b"aad")
            .await
            .unwrap()
            .plaintext
            .ct_eq(&kek())
    );

    admin
        .schedule_key_deletion()
        .key_id(arn.key_id())
        .pending_window_in_days(7)
        .send()
        .await
        .unwrap();
    tokio::time::sleep(STATE_TTL).await;
    let err = custody.unwrap_one(&ct, b"aad").await.unwrap_err();
    assert!(
        matches!(
            aws(&err),
            Some((
                AwsKmsError::ProviderKeyState {
                    state: ProviderState::PendingDeletion,
                    ..
                },
                ProviderErrorKind::KeyState(ProviderState::PendingDeletion)
            ))
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("cancel the deletion"), "{err}");
}

#[tokio::test]
async fn batches_mix_local_and_aws_keys_and_keep_their_order() {
    let endpoint = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let custody = open(dir.path(), &endpoint);
    let local = KeyHandle::random().unwrap();
    custody.generate(&local).await.unwrap();
    let aws = KeyHandle::random().unwrap();
    let arn = new_key(&endpoint, "us-east-1").await;
    custody
        .add_aws_key(&aws, reference(&arn, None))
        .await
        .unwrap();

    let items: Vec<WrapItem> = (0..40u8)
        .map(|i| WrapItem {
            handle: if i % 3 == 0 { local } else { aws },
            plaintext: SecretBytes::copy_from(&[i; 32]),
            associated_data: vec![i],
        })
        .collect();
    let wrapped: Vec<Vec<u8>> = custody
        .wrap_batch(
            items
                .into_iter()
                .map(|item| Ok(ForOrg { org: org(), item }))
                .collect(),
        )
        .await
        .unwrap()
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    let unwrapped = custody
        .unwrap_batch(
            wrapped
                .iter()
                .enumerate()
                .map(|(i, ct)| {
                    Ok(ForOrg {
                        org: org(),
                        item: UnwrapItem {
                            ciphertext: ct.clone(),
                            associated_data: vec![i as u8],
                        },
                    })
                })
                .collect(),
        )
        .await
        .unwrap();
    for (i, out) in unwrapped.into_iter().enumerate() {
        let out = out.unwrap();
        assert!(out.plaintext.ct_eq(&SecretBytes::copy_from(&[i as u8; 32])));
        assert_eq!(out.handle, if i % 3 == 0 { local } else { aws });
    }

    // A ciphertext whose version byte claims the other kind of key is refused.
    let mut swapped = wrapped[1].clone();
    swapped[0] = envelope::VERSION;
    assert!(matches!(
        custody.unwrap_one(&swapped, &[1]).await,
        Err(ServiceError::Custody(CustodyError::Authentication))
    ));
    let mut swapped = wrapped[0].clone();
    swapped[0] = envelope::VERSION_AWS;
    assert!(matches!(
        custody.unwrap_one(&swapped, &[0]).await,
        Err(ServiceError::Custody(CustodyError::Authentication))
    ));
}

/// A forgotten reference comes back under its own handle for the same primary
/// key ARN (backup and role may differ), so the KEKs it wrapped open again;
/// another key's ARN is refused before AWS is asked.
#[tokio::test]
async fn a_forgotten_reference_is_recovered_only_for_its_own_key() {
    let endpoint = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let arn = new_key(&endpoint, "us-east-1").await;
    let other = new_key(&endpoint, "us-east-1").await;
    let backup = new_key(&endpoint, "us-west-2").await;
    let handle = KeyHandle::random().unwrap();
    let custody = open(dir.path(), &endpoint);
    let info = custody
        .add_aws_key(&handle, reference(&arn, None))
        .await
        .unwrap();
    let ct = custody
        .wrap_one(&handle, &kek(), b"org-a/kek-1")
        .await
        .unwrap();
    custody.destroy_one(&handle).await.unwrap();

    let err = custody
        .recover_aws_key(&handle, reference(&other, None))
        .await
        .unwrap_err();
    assert!(
        matches!(keystore(&err), Some(CustodyError::NotTheDestroyedKey(h)) if *h == handle),
        "{err:?}"
    );
    drop(custody);
    let custody = open(dir.path(), &endpoint);
    let recovered = custody
        .recover_aws_key(&handle, reference(&arn, Some(&backup)))
        .await
        .expect("recover the reference");
    assert_eq!(recovered.handle, handle);
    assert_eq!(recovered.check_value, info.check_value);
    assert_eq!(recovered.origin, KeyOrigin::AwsKms);
    let out = custody.unwrap_one(&ct, b"org-a/kek-1").await.unwrap();
    assert!(out.plaintext.ct_eq(&kek()));
}

/// Every key serves the org it came in for: a wrap, unwrap or destroy naming
/// another org is refused before the key is used (and a batch item alone),
/// a destroy naming no org is refused for a key that is not shared, and the
/// shared generic key serves every org.
#[tokio::test]
async fn every_call_must_name_the_org_its_key_serves() {
    let endpoint = emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let custody = open(dir.path(), &endpoint);
    let arn = new_key(&endpoint, "us-east-1").await;
    let (aws, local) = (KeyHandle::random().unwrap(), KeyHandle::random().unwrap());
    custody
        .add_aws_key(&aws, reference(&arn, None))
        .await
        .unwrap();
    custody.generate(&local).await.unwrap();
    let stranger = OrgName::parse("org-b").unwrap();
    let refused = |result: Result<_, ServiceError>, handle: KeyHandle| match result {
        Err(ServiceError::OtherOrg { handle: h, org }) => {
            assert_eq!((h, org.as_str()), (handle, "org-b"));
        }
        other => panic!("expected OtherOrg, got {:?}", other.map(|_| ())),
    };
    for handle in [aws, local] {
        let ct = custody.wrap_one(&handle, &kek(), b"aad").await.unwrap();
        let wrap = ForOrg {
            org: stranger.clone(),
            item: WrapItem {
                handle,
                plaintext: kek(),
                associated_data: b"aad".to_vec(),
            },
        };
        refused(custody.wrap(&wrap).await.map(drop), handle);
        let unwrap = || ForOrg {
            org: stranger.clone(),
            item: UnwrapItem {
                ciphertext: ct.clone(),
                associated_data: b"aad".to_vec(),
            },
        };
        refused(custody.unwrap(&unwrap()).await.map(drop), handle);
        let batch = custody
            .unwrap_batch(vec![
                Ok(unwrap()),
                Ok(ForOrg {
                    org: org(),
                    item: unwrap().item,
                }),
            ])
            .await
            .unwrap();
        refused(batch[0].as_ref().map(drop).map_err(clone_err), handle);
        assert!(batch[1].as_ref().unwrap().plaintext.ct_eq(&kek()));
        refused(
            custody
                .destroy(&Destroy {
                    org: Some(stranger.clone()),
                    handle,
                })
                .await
                .map(drop),
            handle,
        );
        let unnamed = custody.destroy(&Destroy { org: None, handle }).await;
        assert!(
            matches!(unnamed, Err(ServiceError::InvalidArgument(ref m)) if m.contains("org:org-a")),
            "{unnamed:?}"
        );
        // Nothing was changed by the refusals.
        let out = custody.unwrap_one(&ct, b"aad").await.unwrap();
        assert!(out.plaintext.ct_eq(&kek()));
        assert_eq!(custody.destroy_one(&handle).await.unwrap(), Destroyed::Now);
    }

    let shared = KeyHandle::random().unwrap();
    custody
        .import(Import {
            handle: Some(shared),
            admission: Admission::New,
            scope: KeyScope::Shared,
            source: Source::Generate,
        })
        .await
        .unwrap();
    let wrap = ForOrg {
        org: stranger.clone(),
        item: WrapItem {
            handle: shared,
            plaintext: kek(),
            associated_data: Vec::new(),
        },
    };
    let ct = custody
        .wrap(&wrap)
        .await
        .expect("a shared key serves org-b");
    assert!(custody.unwrap_one(&ct, b"").await.is_ok(), "and org-a");
    let by_one_org = custody
        .destroy(&Destroy {
            org: Some(org()),
            handle: shared,
        })
        .await;
    assert!(
        matches!(by_one_org, Err(ServiceError::InvalidArgument(ref m)) if m.contains("shared by every org")),
        "{by_one_org:?}"
    );
    assert_eq!(
        custody
            .destroy(&Destroy {
                org: None,
                handle: shared
            })
            .await
            .unwrap(),
        Destroyed::Now
    );
}

/// The status a refusal becomes, for comparing batch items.
fn clone_err(err: &ServiceError) -> ServiceError {
    match err {
        ServiceError::OtherOrg { handle, org } => ServiceError::OtherOrg {
            handle: *handle,
            org: org.clone(),
        },
        other => ServiceError::InvalidArgument(other.to_string()),
    }
}

/// moto assumes any role without evaluating its trust policy, and encrypts
/// under any context without a key policy: so what the daemon sends is read
/// off the wire. Every AssumeRole carries the external id of the org the
/// reference serves, and every Encrypt and Decrypt names that org in a
/// `cmk:org` pair of the encryption context.
#[tokio::test]
async fn assume_role_carries_the_external_id_and_kms_calls_name_the_org() {
    use cmk_hsm_aws_kms::{
        ExternalId, RoleArn, emulator::recording_proxy, emulator::role_credentials,
    };

    let endpoint = emulator().await;
    let (proxy, recorded) = recording_proxy(&endpoint).await;
    let role = RoleArn::parse("arn:aws:iam::111111111111:role/cmk/org-a-keys").unwrap();
    let arn = create_key(&admin(
        &endpoint,
        "us-east-1",
        role_credentials(&endpoint, &role).await,
    ))
    .await;
    let external_id = ExternalId::parse("cmk-ext-5b0e6f1c2d3a4958").unwrap();
    let key = AwsKeyRef::new(arn, None, Some(role))
        .unwrap()
        .with_external_id(Some(external_id))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let custody = open(dir.path(), &proxy);
    let handle = KeyHandle::random().unwrap();
    custody.add_aws_key(&handle, key).await.unwrap();
    let ct = custody.wrap_one(&handle, &kek(), b"kek-1").await.unwrap();
    let out = custody.unwrap_one(&ct, b"kek-1").await.unwrap();
    assert!(out.plaintext.ct_eq(&kek()));

    let sent = recorded.text();
    let assume_roles: Vec<&str> = sent
        .split("POST ")
        .filter(|request| request.contains("Action=AssumeRole"))
        .collect();
    assert!(!assume_roles.is_empty(), "no AssumeRole went out:\n{sent}");
    for request in &assume_roles {
        assert!(
            request.contains("ExternalId=cmk-ext-5b0e6f1c2d3a4958"),
            "AssumeRole without the org's external id:\n{request}"
        );
    }
    let kms_calls: Vec<&str> = sent
        .split("POST ")
        .filter(|request| {
            request.contains("TrentService.Encrypt") || request.contains("TrentService.Decrypt")
        })
        .collect();
    // The admission's round trip, then the wrap and the unwrap: every one
    // names the org, so a key policy that requires it admits them all.
    assert!(kms_calls.len() >= 4, "{sent}");
    for request in &kms_calls {
        assert!(
            request.contains(r#""cmk:org":"org-a""#),
            "a KMS call without the org's pair:\n{request}"
        );
    }

    // The org pair is part of what KMS authenticates: the same ciphertext
    // relabelled as wrapped without it does not open.
    let mut unlabelled = ct.clone();
    let flags = envelope::HEADER_LEN + 1;
    unlabelled[flags] &= !0b10;
    let err = custody.unwrap_one(&unlabelled, b"kek-1").await.unwrap_err();
    assert!(
        matches!(aws(&err), Some((_, ProviderErrorKind::Authentication))),
        "{err:?}"
    );
}
