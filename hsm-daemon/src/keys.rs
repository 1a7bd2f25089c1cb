//! The daemon's keys: its custody backend and, beside it, the AWS KMS backend,
//! composed behind one set of operations on typed requests.
//!
//! Both are [`Custody`] backends, and this is where the decision between them
//! lives: a handle that names a reference to a key in AWS KMS (the AWS backend
//! [holds](AwsKeys::holds) it) goes to the AWS backend, every other handle to
//! custody; a ciphertext goes by its envelope version. Each backend refuses a
//! ciphertext whose version does not match the kind of key its handle names
//! as altered. Only taking a key in differs by backend: custody takes CMKs
//! ([`MaterialCustody`]), the AWS backend key references. A PKCS#11 token
//! keeps no references, so with it there is no AWS backend and adding an AWS
//! key is unsupported.

use std::sync::Arc;

use cmk_hsm_aws_kms::AwsKeys;
use cmk_hsm_custody::{
    Custody, CustodyError, Destroyed, ImportError, ImportPublicKey, KeyHandle, KeyInfo,
    MaterialCustody, UnwrapItem, Unwrapped, WrapItem,
    envelope::{self, Sealed},
};
use futures_util::future;

use crate::{
    error::ServiceError,
    request::{Admission, Import, Source},
};

/// Custody, and the AWS KMS backend when custody keeps references.
pub struct Keys {
    custody: Arc<dyn MaterialCustody>,
    aws: Option<AwsKeys>,
}

impl Keys {
    /// Keys held by `custody`, and by AWS KMS through `aws` when given.
    pub fn new(custody: Arc<dyn MaterialCustody>, aws: Option<AwsKeys>) -> Self {
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
                let aws = self.aws.as_ref().ok_or(CustodyError::Unsupported(
                    "this custody backend does not hold references to AWS KMS keys",
                ))?;
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
        let backend = self.backend(self.holder(handle).await);
        Ok(backend.wrap(handle, plaintext, associated_data).await?)
    }

    /// Unwraps one item with the key its ciphertext names.
    pub async fn unwrap(&self, item: &UnwrapItem) -> Result<Unwrapped, ServiceError> {
        let UnwrapItem {
            ciphertext,
            associated_data,
        } = item;
        let backend = self.backend(self.opener(ciphertext));
        Ok(backend.unwrap(ciphertext, associated_data).await?)
    }

    /// Wraps many items; each succeeds or fails on its own, results in order.
    /// Each backend gets its items in one batch, both at once.
    pub async fn wrap_batch(
        &self,
        items: Vec<Result<WrapItem, ServiceError>>,
    ) -> Result<Vec<Result<Vec<u8>, ServiceError>>, ServiceError> {
        let mut routed = Vec::with_capacity(items.len());
        for item in items {
            routed.push(match item {
                Err(err) => Err(err),
                Ok(item) => Ok((self.holder(&item.handle).await, item)),
            });
        }
        self.run_batch(routed, |backend, items| backend.wrap_batch(items))
            .await
    }

    /// Unwraps many items, each sent to the backend its envelope version
    /// names.
    pub async fn unwrap_batch(
        &self,
        items: Vec<Result<UnwrapItem, ServiceError>>,
    ) -> Result<Vec<Result<Unwrapped, ServiceError>>, ServiceError> {
        let routed = items
            .into_iter()
            .map(|item| item.map(|item| (self.opener(&item.ciphertext), item)))
            .collect();
        self.run_batch(routed, |backend, items| backend.unwrap_batch(items))
            .await
    }

    /// Destroys the key or forgets the reference `handle` names.
    pub async fn destroy(&self, handle: &KeyHandle) -> Result<Destroyed, ServiceError> {
        let backend = self.backend(self.holder(handle).await);
        Ok(backend.destroy(handle).await?)
    }

    /// Which backend holds the key `handle` names. Custody answers for every
    /// handle the AWS backend does not hold: its own keys, and unknown and
    /// destroyed handles (the keystore keeps both kinds in one namespace).
    async fn holder(&self, handle: &KeyHandle) -> Holder {
        match &self.aws {
            Some(aws) if aws.holds(handle).await => Holder::Aws,
            _ => Holder::Custody,
        }
    }

    /// Which backend makes ciphertexts of the envelope version `ciphertext`
    /// has; custody reads (and refuses) everything else itself.
    fn opener(&self, ciphertext: &[u8]) -> Holder {
        match (&self.aws, envelope::read(ciphertext)) {
            (Some(_), Ok(Sealed::Aws { .. })) => Holder::Aws,
            _ => Holder::Custody,
        }
    }

    fn backend(&self, holder: Holder) -> &dyn Custody {
        match (holder, &self.aws) {
            (Holder::Aws, Some(aws)) => aws,
            // Routing names AWS only when there is an AWS backend.
            _ => self.custody.as_ref(),
        }
    }

    /// Runs one routed batch: each backend's items in one `call`, both at
    /// once, and the results merged back in order. Fails as a whole only when
    /// a backend answers with too few results.
    async fn run_batch<'a, Item, Out, Fut>(
        &'a self,
        routed: Vec<Result<(Holder, Item), ServiceError>>,
        call: impl Fn(&'a dyn Custody, Vec<Item>) -> Fut,
    ) -> Result<Vec<Result<Out, ServiceError>>, ServiceError>
    where
        Fut: Future<Output = Vec<Result<Out, CustodyError>>>,
    {
        let mut slots = Vec::with_capacity(routed.len());
        let (mut to_custody, mut to_aws) = (Vec::new(), Vec::new());
        for route in routed {
            slots.push(match route {
                Err(err) => Slot::Done(Err(err)),
                Ok((holder, item)) => {
                    match holder {
                        Holder::Custody => to_custody.push(item),
                        Holder::Aws => to_aws.push(item),
                    }
                    Slot::From(holder)
                }
            });
        }
        let run = |holder: Holder, items: Vec<Item>| {
            let expected = items.len();
            let results = (!items.is_empty()).then(|| call(self.backend(holder), items));
            async move {
                let results = match results {
                    Some(results) => results.await,
                    None => Vec::new(),
                };
                if results.len() < expected {
                    return Err(ServiceError::BatchResults);
                }
                Ok(results.into_iter())
            }
        };
        let (from_custody, from_aws) =
            future::join(run(Holder::Custody, to_custody), run(Holder::Aws, to_aws)).await;
        let (mut from_custody, mut from_aws) = (from_custody?, from_aws?);
        slots
            .into_iter()
            .map(|slot| {
                let next = match slot {
                    Slot::Done(result) => return Ok(result),
                    Slot::From(Holder::Custody) => from_custody.next(),
                    Slot::From(Holder::Aws) => from_aws.next(),
                };
                next.map(|result| result.map_err(ServiceError::from))
                    .ok_or(ServiceError::BatchResults)
            })
            .collect()
    }
}

/// One of the daemon's two backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    /// The custody backend: the software keystore or a PKCS#11 token.
    Custody,
    /// The AWS KMS backend.
    Aws,
}

/// Where one batch item's result comes from.
enum Slot<Out> {
    /// It failed validation.
    Done(Result<Out, ServiceError>),
    /// That backend's batch.
    From(Holder),
}
