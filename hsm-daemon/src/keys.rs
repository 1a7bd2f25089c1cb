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
//!
//! Every key is bound to the org it serves when it comes in (or to every org,
//! for the generic default key), and every wrap, unwrap and destroy names an
//! org: a key that does not serve it is refused with
//! [`ServiceError::OtherOrg`] before it is used, and the refusal is logged.

use std::sync::Arc;

use cmk_hsm_aws_kms::AwsKeys;
use cmk_hsm_custody::{
    Custody, CustodyError, Destroyed, ImportError, ImportPublicKey, KeyHandle, KeyInfo,
    MaterialCustody, UnwrapItem, Unwrapped, WrapItem,
    envelope::{self, Sealed},
};
use cmk_hsm_custody::{KeyScope, OrgName};
use cmk_proto::checkpoint::{self, Checkpoint};
use futures_util::future;
use tracing::warn;

use crate::{
    error::ServiceError,
    request::{Admission, Destroy, ForOrg, Import, Source},
};

/// Custody, and the AWS KMS backend when custody keeps references.
pub struct Keys {
    custody: Arc<dyn MaterialCustody>,
    aws: Option<AwsKeys>,
    /// The audit public key as published, derived once.
    audit_key: std::sync::OnceLock<AuditPublicKey>,
}

impl Keys {
    /// Keys held by `custody`, and by AWS KMS through `aws` when given.
    pub fn new(custody: Arc<dyn MaterialCustody>, aws: Option<AwsKeys>) -> Self {
        Self {
            custody,
            aws,
            audit_key: std::sync::OnceLock::new(),
        }
    }

    /// The RSA public key customers wrap their CMK under.
    pub fn import_public_key(&self) -> &ImportPublicKey {
        self.custody.import_public_key()
    }

    /// The audit signing key's public half: SubjectPublicKeyInfo DER and id.
    pub fn audit_public_key(&self) -> Result<&AuditPublicKey, ServiceError> {
        if let Some(key) = self.audit_key.get() {
            return Ok(key);
        }
        let der = checkpoint::spki_from_point(self.custody.audit_public_key()).ok_or(
            CustodyError::Crypto("the audit signing key is not an uncompressed P-256 point"),
        )?;
        Ok(self.audit_key.get_or_init(|| AuditPublicKey {
            pem: checkpoint::public_key_pem(&der),
            key_id: checkpoint::key_id(&der),
        }))
    }

    /// Signs a checkpoint of `org`'s audit chain at `seq` with head `head`,
    /// built here, with the time of this call.
    pub async fn sign_checkpoint(
        &self,
        org: &OrgName,
        seq: u64,
        head: [u8; checkpoint::HASH_LEN],
    ) -> Result<SignedCheckpoint, ServiceError> {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let checkpoint = Checkpoint {
            org: org.as_str().to_owned(),
            seq,
            head,
            time,
        };
        let signature = self
            .custody
            .sign_audit(&checkpoint.to_signed_bytes())
            .await?;
        Ok(SignedCheckpoint {
            time,
            signature,
            key_id: self.audit_public_key()?.key_id.clone(),
        })
    }

    /// Stores what `request` brings, under its handle or a fresh one.
    pub async fn import(&self, request: Import) -> Result<KeyInfo, ServiceError> {
        let Import {
            handle,
            admission,
            scope,
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
                    Admission::New => self.custody.import(&handle, &scope, &wrapped_key).await?,
                    Admission::Recover => {
                        self.custody.recover(&handle, &scope, &wrapped_key).await?
                    }
                })
            }
            (Source::Generate, Admission::New) => {
                Ok(self.custody.generate(&handle, &scope).await?)
            }
            // The typed request refuses this; kept exhaustive rather than trusted.
            (Source::Generate, Admission::Recover) => Err(ServiceError::InvalidArgument(
                "a generated key cannot be recovered: its material never left custody".into(),
            )),
            (Source::AwsKms(key), admission) => {
                let aws = self.aws.as_ref().ok_or(CustodyError::Unsupported(
                    "this custody backend does not hold references to AWS KMS keys",
                ))?;
                // The typed request gives every key but a generated one an org.
                let KeyScope::Org(org) = scope else {
                    return Err(ServiceError::InvalidArgument(
                        "a key in AWS KMS serves one org: org is required".into(),
                    ));
                };
                Ok(match admission {
                    Admission::New => aws.add(&handle, &org, key).await?,
                    Admission::Recover => aws.recover(&handle, &org, key).await?,
                })
            }
        }
    }

    /// Wraps one item under the key it names, if that key serves the org.
    pub async fn wrap(&self, request: &ForOrg<WrapItem>) -> Result<Vec<u8>, ServiceError> {
        let ForOrg {
            org,
            item:
                WrapItem {
                    handle,
                    plaintext,
                    associated_data,
                },
        } = request;
        let holder = self.holder(handle).await;
        self.check_scope(holder, handle, org).await?;
        let backend = self.backend(holder);
        Ok(backend.wrap(handle, plaintext, associated_data).await?)
    }

    /// Unwraps one item with the key its ciphertext names, if that key
    /// serves the org.
    pub async fn unwrap(&self, request: &ForOrg<UnwrapItem>) -> Result<Unwrapped, ServiceError> {
        let ForOrg {
            org,
            item:
                UnwrapItem {
                    ciphertext,
                    associated_data,
                },
        } = request;
        let holder = self.opener(ciphertext);
        // A ciphertext too malformed to name a key is refused by the backend,
        // in its words.
        if let Ok(sealed) = envelope::read(ciphertext) {
            self.check_scope(holder, &sealed.handle(), org).await?;
        }
        let backend = self.backend(holder);
        Ok(backend.unwrap(ciphertext, associated_data).await?)
    }

    /// Wraps many items; each succeeds or fails on its own, results in order.
    /// Each backend gets its items in one batch, both at once.
    pub async fn wrap_batch(
        &self,
        items: Vec<Result<ForOrg<WrapItem>, ServiceError>>,
    ) -> Result<Vec<Result<Vec<u8>, ServiceError>>, ServiceError> {
        let mut routed = Vec::with_capacity(items.len());
        for item in items {
            routed.push(match item {
                Err(err) => Err(err),
                Ok(ForOrg { org, item }) => {
                    let holder = self.holder(&item.handle).await;
                    match self.check_scope(holder, &item.handle, &org).await {
                        Ok(()) => Ok((holder, item)),
                        Err(err) => Err(err),
                    }
                }
            });
        }
        self.run_batch(routed, |backend, items| backend.wrap_batch(items))
            .await
    }

    /// Unwraps many items, each sent to the backend its envelope version
    /// names.
    pub async fn unwrap_batch(
        &self,
        items: Vec<Result<ForOrg<UnwrapItem>, ServiceError>>,
    ) -> Result<Vec<Result<Unwrapped, ServiceError>>, ServiceError> {
        let mut routed = Vec::with_capacity(items.len());
        for item in items {
            routed.push(match item {
                Err(err) => Err(err),
                Ok(ForOrg { org, item }) => {
                    let holder = self.opener(&item.ciphertext);
                    let checked = match envelope::read(&item.ciphertext) {
                        Ok(sealed) => self.check_scope(holder, &sealed.handle(), &org).await,
                        Err(_) => Ok(()),
                    };
                    checked.map(|()| (holder, item))
                }
            });
        }
        self.run_batch(routed, |backend, items| backend.unwrap_batch(items))
            .await
    }

    /// Destroys the key or forgets the reference the request names, if it
    /// serves the org the request names; a shared key only by a request that
    /// names none (no one org may destroy what every org uses).
    pub async fn destroy(&self, request: &Destroy) -> Result<Destroyed, ServiceError> {
        let Destroy { org, handle } = request;
        let holder = self.holder(handle).await;
        let scope = match self.backend(holder).scope(handle, org.as_ref()).await {
            Ok(scope) => Some(scope),
            // Destroyed already: the backend says so, and nothing changes.
            Err(CustodyError::DestroyedKey(_)) => None,
            Err(err) => return Err(err.into()),
        };
        match (org, scope) {
            (_, None) | (None, Some(KeyScope::Shared)) => {}
            (Some(org), Some(KeyScope::Org(owner))) if owner == *org => {}
            (Some(org), Some(scope @ KeyScope::Org(_))) => {
                warn!(%handle, asked_for = %org, serves = %scope,
                    "refused: the call names another org than the one the key serves");
                return Err(ServiceError::OtherOrg {
                    handle: *handle,
                    org: org.clone(),
                });
            }
            (Some(org), Some(KeyScope::Shared)) => {
                warn!(%handle, asked_for = %org, "refused: a destroy of a shared key for one org");
                return Err(ServiceError::InvalidArgument(format!(
                    "key {handle} is shared by every org: a destroy of it names no org"
                )));
            }
            (None, Some(scope)) => {
                warn!(%handle, serves = %scope, "refused: a destroy naming no org, of a key that is not shared");
                return Err(ServiceError::InvalidArgument(format!(
                    "key {handle} serves {scope}: a destroy of it must name that org"
                )));
            }
        }
        let backend = self.backend(holder);
        Ok(backend.destroy(handle).await?)
    }

    /// Refuses a call for `org` on a key that does not serve it, before the
    /// key is used. A handle the backend cannot find is its error.
    async fn check_scope(
        &self,
        holder: Holder,
        handle: &KeyHandle,
        org: &OrgName,
    ) -> Result<(), ServiceError> {
        let scope = self.backend(holder).scope(handle, Some(org)).await?;
        if scope.admits(org) {
            return Ok(());
        }
        warn!(%handle, asked_for = %org, serves = %scope,
            "refused: the call names another org than the one the key serves");
        Err(ServiceError::OtherOrg {
            handle: *handle,
            org: org.clone(),
        })
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

/// The audit signing key's public half, as published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditPublicKey {
    /// SubjectPublicKeyInfo PEM.
    pub pem: String,
    /// Hex SHA-256 of the DER.
    pub key_id: String,
}

/// A checkpoint's signature and what the daemon added to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// The daemon's time, part of what was signed.
    pub time: i64,
    /// `r ‖ s`.
    pub signature: Vec<u8>,
    /// The signing key's id.
    pub key_id: String,
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
