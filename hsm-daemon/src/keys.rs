//! The daemon's keys: its custody backend and, beside it, the AWS KMS backend,
//! composed behind one set of operations on typed requests.
//!
//! This is where the decisions between the two live. A handle that names a
//! reference to a key in AWS KMS (the keystore says so) goes to the AWS
//! backend, every other handle to custody; a ciphertext goes by its envelope
//! version, and a version that does not match the kind of key its handle
//! names is refused as altered. A PKCS#11 token keeps no references, so with
//! it there is no AWS backend and adding an AWS key is unsupported.

use std::sync::Arc;

use cmk_hsm_aws_kms::{AwsKeyRef, AwsKeys};
use cmk_hsm_custody::{
    Custody, CustodyError, Destroyed, ImportError, ImportPublicKey, KeyHandle, KeyInfo, UnwrapItem,
    Unwrapped, WrapItem,
    envelope::{self, Sealed},
};
use futures_util::{StreamExt, future, stream};

use crate::{
    error::ServiceError,
    request::{Admission, Import, Source},
};

/// AWS KMS items of a batch in flight at once: each is a network round trip.
const AWS_BATCH_CONCURRENCY: usize = 16;

/// Custody, and the AWS KMS backend when custody keeps references.
pub struct Keys {
    custody: Arc<dyn Custody>,
    aws: Option<AwsKeys>,
}

impl Keys {
    /// Keys held by `custody`, and by AWS KMS through `aws` when given.
    pub fn new(custody: Arc<dyn Custody>, aws: Option<AwsKeys>) -> Self {
        Self { custody, aws }
    }

    /// The RSA public key customers wrap their CMK under.
    pub fn import_public_key(&self) -> &ImportPublicKey {
        self.custody.import_public_key()
    }

    /// Stores what `request` brings, under its handle or a fresh one.
    pub async fn import(&self, request: Import) -> Result<KeyInfo, ServiceError> {
        let Import {
            handle,
            admission,
            source,
        } = request;
        let handle = match handle {
            Some(handle) => handle,
            None => KeyHandle::random()?,
        };
        match (source, admission) {
            (
                Source::Wrapped {
                    wrapped_key,
                    import_key_id,
                },
                admission,
            ) => {
                let current = &self.custody.import_public_key().key_id;
                // Refused before any decryption is attempted.
                if let Some(given) = import_key_id.filter(|given| given != current) {
                    return Err(CustodyError::Import(ImportError::ImportKeyMismatch {
                        given,
                        current: current.clone(),
                    })
                    .into());
                }
                Ok(match admission {
                    Admission::New => self.custody.import(&handle, &wrapped_key).await?,
                    Admission::Recover => self.custody.recover(&handle, &wrapped_key).await?,
                })
            }
            (Source::Generate, Admission::New) => Ok(self.custody.generate(&handle).await?),
            // The typed request refuses this; kept exhaustive rather than trusted.
            (Source::Generate, Admission::Recover) => Err(ServiceError::InvalidArgument(
                "a generated key cannot be recovered: its material never left custody".into(),
            )),
            (Source::AwsKms(key), admission) => {
                let aws = self.aws()?;
                Ok(match admission {
                    Admission::New => aws.add(&handle, key).await?,
                    Admission::Recover => aws.recover(&handle, key).await?,
                })
            }
        }
    }

    /// Wraps one item under the key it names.
    pub async fn wrap(&self, item: &WrapItem) -> Result<Vec<u8>, ServiceError> {
        let WrapItem {
            handle,
            plaintext,
            associated_data,
        } = item;
        match self.aws_key(handle).await? {
            Some((aws, key)) => Ok(aws.wrap(handle, &key, plaintext, associated_data).await?),
            None => Ok(self
                .custody
                .wrap(handle, plaintext, associated_data)
                .await?),
        }
    }

    /// Unwraps one item with the key its ciphertext names.
    pub async fn unwrap(&self, item: &UnwrapItem) -> Result<Unwrapped, ServiceError> {
        let UnwrapItem {
            ciphertext,
            associated_data,
        } = item;
        match (&self.aws, envelope::read(ciphertext)) {
            (Some(aws), Ok(Sealed::Aws { handle, body })) => match aws.key(&handle).await? {
                Some(key) => Ok(Unwrapped {
                    plaintext: aws.unwrap(&handle, &key, body, associated_data).await?,
                    handle,
                }),
                // A version 2 ciphertext naming a key custody holds: altered.
                None => Err(CustodyError::Authentication.into()),
            },
            // Custody reads the envelope itself, and refuses a version 1
            // ciphertext that names a reference as altered.
            _ => Ok(self.custody.unwrap(ciphertext, associated_data).await?),
        }
    }

    /// Wraps many items; each succeeds or fails on its own, results in order.
    /// Items under keys custody holds go to it in one batch, the others to
    /// AWS KMS alongside.
    pub async fn wrap_batch(
        &self,
        items: Vec<Result<WrapItem, ServiceError>>,
    ) -> Result<Vec<Result<Vec<u8>, ServiceError>>, ServiceError> {
        let mut routed = Vec::with_capacity(items.len());
        for item in items {
            routed.push(match item {
                Err(err) => Route::Failed(err),
                Ok(item) => match self.aws_key(&item.handle).await {
                    Err(err) => Route::Failed(err),
                    Ok(Some((_, key))) => Route::Aws(item, key),
                    Ok(None) => Route::Custody(item),
                },
            });
        }
        self.run_batch(
            routed,
            |items| self.custody.wrap_batch(items),
            |(item, key)| async move {
                match &self.aws {
                    Some(aws) => Ok(aws
                        .wrap(&item.handle, &key, &item.plaintext, &item.associated_data)
                        .await?),
                    None => Err(self.aws_unsupported()),
                }
            },
        )
        .await
    }

    /// Unwraps many items, routed as [`Keys::wrap_batch`] routes them.
    pub async fn unwrap_batch(
        &self,
        items: Vec<Result<UnwrapItem, ServiceError>>,
    ) -> Result<Vec<Result<Unwrapped, ServiceError>>, ServiceError> {
        let routed = items
            .into_iter()
            .map(|item| match item {
                Err(err) => Route::Failed(err),
                Ok(item) => match (&self.aws, envelope::read(&item.ciphertext)) {
                    (Some(_), Ok(Sealed::Aws { .. })) => Route::Aws(item, ()),
                    _ => Route::Custody(item),
                },
            })
            .collect();
        self.run_batch(
            routed,
            |items| self.custody.unwrap_batch(items),
            |(item, ())| async move { self.unwrap(&item).await },
        )
        .await
    }

    /// Destroys the key or forgets the reference `handle` names (the
    /// keystore holds both).
    pub async fn destroy(&self, handle: &KeyHandle) -> Result<Destroyed, ServiceError> {
        Ok(self.custody.destroy(handle).await?)
    }

    fn aws(&self) -> Result<&AwsKeys, ServiceError> {
        self.aws.as_ref().ok_or_else(|| self.aws_unsupported())
    }

    fn aws_unsupported(&self) -> ServiceError {
        CustodyError::Unsupported("this custody backend does not hold references to AWS KMS keys")
            .into()
    }

    /// The AWS backend and the key `handle` refers to, when it names one.
    async fn aws_key(
        &self,
        handle: &KeyHandle,
    ) -> Result<Option<(&AwsKeys, AwsKeyRef)>, ServiceError> {
        let Some(aws) = &self.aws else {
            return Ok(None);
        };
        Ok(aws.key(handle).await?.map(|key| (aws, key)))
    }

    /// Runs one routed batch: custody's items in one call, AWS KMS's
    /// concurrently beside it, and the results merged back in order. Fails
    /// as a whole only when custody answers with the wrong number of results.
    async fn run_batch<Item, Extra, Out, CustodyFut, AwsFut>(
        &self,
        routed: Vec<Route<Item, Extra>>,
        custody: impl FnOnce(Vec<Item>) -> CustodyFut,
        aws: impl Fn((Item, Extra)) -> AwsFut,
    ) -> Result<Vec<Result<Out, ServiceError>>, ServiceError>
    where
        CustodyFut: Future<Output = Vec<Result<Out, CustodyError>>>,
        AwsFut: Future<Output = Result<Out, ServiceError>>,
    {
        let mut slots = Vec::with_capacity(routed.len());
        let (mut to_custody, mut to_aws) = (Vec::new(), Vec::new());
        for route in routed {
            slots.push(match route {
                Route::Failed(err) => Slot::Done(Err(err)),
                Route::Custody(item) => {
                    to_custody.push(item);
                    Slot::Custody
                }
                Route::Aws(item, extra) => {
                    to_aws.push((item, extra));
                    Slot::Aws
                }
            });
        }
        let expected = to_custody.len();
        let aws_results = stream::iter(to_aws)
            .map(aws)
            .buffered(AWS_BATCH_CONCURRENCY)
            .collect::<Vec<_>>();
        let custody_results = async {
            if to_custody.is_empty() {
                Vec::new()
            } else {
                custody(to_custody).await
            }
        };
        let (custody_results, aws_results) = future::join(custody_results, aws_results).await;
        if custody_results.len() < expected {
            return Err(ServiceError::BatchResults);
        }
        let mut from_custody = custody_results.into_iter();
        let mut from_aws = aws_results.into_iter();
        slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Done(result) => Ok(result),
                Slot::Custody => from_custody
                    .next()
                    .map(|result| result.map_err(ServiceError::from))
                    .ok_or(ServiceError::BatchResults),
                // `buffered` yields one result per item it was given.
                Slot::Aws => from_aws.next().ok_or(ServiceError::BatchResults),
            })
            .collect()
    }
}

/// Where one batch item goes.
enum Route<Item, Extra> {
    /// It failed validation or routing.
    Failed(ServiceError),
    /// To custody, in one batch call.
    Custody(Item),
    /// To AWS KMS, with what routing learnt.
    Aws(Item, Extra),
}

/// Where one batch item's result comes from.
enum Slot<Out> {
    Done(Result<Out, ServiceError>),
    Custody,
    Aws,
}
