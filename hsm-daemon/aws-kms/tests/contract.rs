//! The custody contract (`cmk_hsm_custody::contract`) run against the AWS KMS
//! backend on the emulator (moto server; see `cmk_hsm_aws_kms::emulator` for
//! how it is found). It fails, never skips, when the emulator does not answer.
//!
//! The backend is put together as the daemon does it (`hsm-daemon/src/keys.rs`):
//! references kept in a software keystore, a handle that names one and a
//! version 2 ciphertext sent to [`AwsKeys`], everything else to the keystore.
//! A key enters by reference: its material is the reference, so presenting
//! the same key ARN again recovers a destroyed one, and another ARN is
//! refused.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use async_trait::async_trait;
use cmk_hsm_aws_kms::emulator::{emulator, new_key, settings};
use cmk_hsm_aws_kms::{AwsError, AwsKeyRef, AwsKeys, AwsKmsError, DEFAULT_STATE_TTL};
use cmk_hsm_custody::contract::{self, Generated, Imported, KeySource, Recoverable};
use cmk_hsm_custody::{
    Custody, CustodyError, Destroyed, ImportKeyBits, KeyHandle, KeyInfo, KeyOrigin, RootKey,
    SoftwareCustody, UnwrapItem, Unwrapped, WrapItem,
    envelope::{self, Sealed},
};
use cmk_secret::SecretBytes;
use tempfile::TempDir;

/// Where the contract's keys are made.
const REGION: &str = "us-east-1";

#[tokio::test]
async fn satisfies_the_custody_contract_by_reference() {
    contract::by_reference(&Aws::open().await).await;
}

/// References and the keystore's own keys share one handle namespace: a
/// handle taken by either, live or destroyed, is refused to both.
#[tokio::test]
async fn references_and_keys_share_one_handle_namespace() {
    let aws = Aws::open().await;
    let store: &dyn Custody = aws.store.as_ref();
    let (imported, generated) = (Imported(store), Generated(store));
    contract::a_live_handle_is_not_taken_again(&aws, &[&aws, &imported, &generated]).await;
    contract::a_live_handle_is_not_taken_again(&aws, &[&generated, &aws]).await;
    contract::a_destroyed_handle_is_never_reused(&aws, &[&aws, &imported, &generated]).await;
    contract::a_destroyed_handle_is_never_reused(&aws, &[&imported, &aws]).await;
}

/// The AWS KMS backend beside the keystore that keeps its references.
struct Aws {
    keys: AwsKeys,
    store: Arc<SoftwareCustody>,
    endpoint: String,
    _dir: TempDir,
}

impl Aws {
    /// A fresh keystore; panics with how to start the emulator when it does
    /// not answer.
    async fn open() -> Self {
        let endpoint = emulator().await;
        let dir = tempfile::tempdir().unwrap();
        let root = RootKey::from_hex(&SecretBytes::copy_from(&[b'7'; 64])).unwrap();
        let store = Arc::new(
            SoftwareCustody::open(dir.path(), root, ImportKeyBits::Rsa3072).expect("open keystore"),
        );
        let keys = AwsKeys::new(settings(&endpoint, &[]), DEFAULT_STATE_TTL, store.clone());
        Self {
            keys,
            store,
            endpoint,
            _dir: dir,
        }
    }
}

/// The backend's refusals in custody's words, where they mean the same: the
/// keystore's own as they are (unknown, destroyed, in use, not the destroyed
/// key), and a ciphertext KMS refuses, or whose KMS part does not even parse,
/// as one that does not authenticate (the daemon answers both
/// INVALID_ARGUMENT). The contract provokes no other failure.
fn custody_error(error: AwsKmsError) -> CustodyError {
    match error {
        AwsKmsError::Keystore(error) => error,
        AwsKmsError::Aws(AwsError::InvalidCiphertext { .. }) | AwsKmsError::Ciphertext(_) => {
            CustodyError::Authentication
        }
        other => panic!("AWS KMS failed where the contract expects an answer: {other:?}"),
    }
}

#[async_trait]
impl contract::Backend for Aws {
    async fn wrap(
        &self,
        handle: &KeyHandle,
        plaintext: &SecretBytes,
        associated_data: &[u8],
    ) -> Result<Vec<u8>, CustodyError> {
        match self.keys.key(handle).await.map_err(custody_error)? {
            Some(key) => self
                .keys
                .wrap(handle, &key, plaintext, associated_data)
                .await
                .map_err(custody_error),
            None => Custody::wrap(self.store.as_ref(), handle, plaintext, associated_data).await,
        }
    }

    async fn unwrap(
        &self,
        ciphertext: &[u8],
        associated_data: &[u8],
    ) -> Result<Unwrapped, CustodyError> {
        // The keystore reads the envelope itself, and refuses a version 1
        // ciphertext that names a reference as altered.
        let Sealed::Aws { handle, body } = envelope::read(ciphertext)? else {
            return Custody::unwrap(self.store.as_ref(), ciphertext, associated_data).await;
        };
        match self.keys.key(&handle).await.map_err(custody_error)? {
            Some(key) => Ok(Unwrapped {
                plaintext: self
                    .keys
                    .unwrap(&handle, &key, body, associated_data)
                    .await
                    .map_err(custody_error)?,
                handle,
            }),
            // A version 2 ciphertext naming a key the keystore holds: altered.
            None => Err(CustodyError::Authentication),
        }
    }

    /// The keystore forgets the reference; the key in AWS is left as it is.
    async fn destroy(&self, handle: &KeyHandle) -> Result<Destroyed, CustodyError> {
        Custody::destroy(self.store.as_ref(), handle).await
    }

    async fn wrap_batch(&self, items: Vec<WrapItem>) -> Vec<Result<Vec<u8>, CustodyError>> {
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            results.push(
                contract::Backend::wrap(self, &item.handle, &item.plaintext, &item.associated_data)
                    .await,
            );
        }
        results
    }

    async fn unwrap_batch(&self, items: Vec<UnwrapItem>) -> Vec<Result<Unwrapped, CustodyError>> {
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            results.push(
                contract::Backend::unwrap(self, &item.ciphertext, &item.associated_data).await,
            );
        }
        results
    }
}

#[async_trait]
impl KeySource for Aws {
    fn origin(&self) -> KeyOrigin {
        KeyOrigin::AwsKms
    }

    async fn add(&self, handle: &KeyHandle) -> Result<KeyInfo, CustodyError> {
        self.add_with(handle, &self.material().await).await
    }
}

#[async_trait]
impl Recoverable for Aws {
    type Material = AwsKeyRef;

    /// A reference to a new key of its own in the emulator.
    async fn material(&self) -> AwsKeyRef {
        let arn = new_key(&self.endpoint, REGION).await;
        AwsKeyRef::new(arn, None, None).expect("a reference to one key")
    }

    async fn add_with(&self, handle: &KeyHandle, key: &AwsKeyRef) -> Result<KeyInfo, CustodyError> {
        self.keys
            .add(handle, key.clone())
            .await
            .map_err(custody_error)
    }

    async fn recover(&self, handle: &KeyHandle, key: &AwsKeyRef) -> Result<KeyInfo, CustodyError> {
        self.keys
            .recover(handle, key.clone())
            .await
            .map_err(custody_error)
    }
}
