//! The custody contract (`cmk_hsm_custody::contract`) run against the AWS KMS
//! backend on the emulator (moto server; see `cmk_hsm_aws_kms::emulator` for
//! how it is found). It fails, never skips, when the emulator does not answer.
//!
//! The backend under test is [`AwsKeys`] itself, as a [`Custody`], its
//! references kept in a software keystore as the daemon keeps them. A key
//! enters by reference, through `AwsKeys::add`: its material is the
//! reference, so presenting the same key ARN again recovers a destroyed one,
//! and another ARN is refused.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use async_trait::async_trait;
use cmk_hsm_aws_kms::emulator::{emulator, new_key, settings};
use cmk_hsm_aws_kms::{AwsKeyRef, AwsKeys, DEFAULT_STATE_TTL};
use cmk_hsm_custody::contract::{self, Generated, Imported, KeySource, Recoverable};
use cmk_hsm_custody::{
    CustodyError, ImportKeyBits, KeyHandle, KeyInfo, KeyOrigin, RootKey, SoftwareCustody,
};
use cmk_secret::SecretBytes;
use tempfile::TempDir;

/// Where the contract's keys are made.
const REGION: &str = "us-east-1";

#[tokio::test]
async fn satisfies_the_custody_contract_by_reference() {
    let aws = Aws::open().await;
    contract::by_reference(&aws.keys, &aws).await;
}

/// References and the keystore's own keys share one handle namespace: a
/// handle taken by either, live or destroyed, is refused to both. Each check
/// uses the backend that holds the key its first way in takes.
#[tokio::test]
async fn references_and_keys_share_one_handle_namespace() {
    let aws = Aws::open().await;
    let store = aws.store.as_ref();
    let (imported, generated) = (Imported(store), Generated(store));
    contract::a_live_handle_is_not_taken_again(&aws.keys, &[&aws, &imported, &generated]).await;
    contract::a_live_handle_is_not_taken_again(store, &[&generated, &aws]).await;
    contract::a_destroyed_handle_is_never_reused(&aws.keys, &[&aws, &imported, &generated]).await;
    contract::a_destroyed_handle_is_never_reused(store, &[&imported, &aws]).await;
}

/// The AWS KMS backend, the keystore that keeps its references, and the
/// emulator its keys are made in.
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
        self.keys.add(handle, &contract::owner(), key.clone()).await
    }

    async fn recover(&self, handle: &KeyHandle, key: &AwsKeyRef) -> Result<KeyInfo, CustodyError> {
        self.keys
            .recover(handle, &contract::owner(), key.clone())
            .await
    }
}
