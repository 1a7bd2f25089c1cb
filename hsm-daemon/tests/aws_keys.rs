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
    CustodyError, Destroyed, ImportKeyBits, KeyHandle, KeyInfo, KeyOrigin, ProviderErrorKind,
    RootKey, SoftwareCustody, UnwrapItem, Unwrapped, WrapItem, envelope,
};
use cmk_hsm_daemon::{Admission, Import, ServiceError, Source, keys::Keys};
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
            source: Source::AwsKms(key),
        })
        .await
    }

    async fn generate(&self, handle: &KeyHandle) -> Result<KeyInfo, ServiceError> {
        self.import(Import {
            handle: Some(*handle),
            admission: Admission::New,
            source: Source::Generate,
        })
        .await
    }

    async fn wrap_one(
        &self,
        handle: &KeyHandle,
        plaintext: &SecretBytes,
        aad: &[u8],
    ) -> Result<Vec<u8>, ServiceError> {
        self.wrap(&WrapItem {
            handle: *handle,
            plaintext: SecretBytes::copy_from(plaintext.expose()),
            associated_data: aad.to_vec(),
        })
        .await
    }

    async fn unwrap_one(&self, ciphertext: &[u8], aad: &[u8]) -> Result<Unwrapped, ServiceError> {
        self.unwrap(&UnwrapItem {
            ciphertext: ciphertext.to_vec(),
            associated_data: aad.to_vec(),
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

    assert_eq!(custody.destroy(&handle).await.unwrap(), Destroyed::Now);
    assert_eq!(custody.destroy(&handle).await.unwrap(), Destroyed::Already);
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
        .wrap_batch(items.into_iter().map(Ok).collect())
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
                    Ok(UnwrapItem {
                        ciphertext: ct.clone(),
                        associated_data: vec![i as u8],
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
    custody.destroy(&handle).await.unwrap();

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
