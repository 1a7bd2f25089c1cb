//! The typed requests of the HSM service: each `cmk.hsm.v1` request message
//! converted once, every field validated and bounded, with the field named in
//! the INVALID_ARGUMENT message. Messages are destructured without `..`, so a
//! new field fails the build here until it is handled.

use cmk_hsm_aws_kms::{ArnError, AwsKeyRef, ExternalId, KeyArn, MAX_CIPHERTEXT_LEN, RoleArn};
use cmk_hsm_custody::{
    CustodyError, InputError, KeyHandle, KeyScope, OrgName, UnwrapItem, WrapItem, envelope,
};
use cmk_proto::hsm::v1::{self as pb, import_request};
use cmk_secret::SecretBytes;

use crate::{config::Limits, error::ServiceError};

/// A request message with the limits it is checked against.
pub struct Bounded<'a, T>(pub T, pub &'a Limits);

/// What an import stores.
#[derive(Debug)]
pub struct Import {
    /// The handle the caller chose, so that it can record it before the
    /// call; `None` lets the daemon choose.
    pub handle: Option<KeyHandle>,
    /// A new key, or a destroyed key's original material.
    pub admission: Admission,
    /// Whom the key serves from now on.
    pub scope: KeyScope,
    /// The material.
    pub source: Source,
}

/// A request for one organisation: the key it uses must serve that org.
#[derive(Debug)]
pub struct ForOrg<T> {
    /// The organisation the call is for.
    pub org: OrgName,
    /// What is asked.
    pub item: T,
}

/// Whether material goes under a new handle or back under a destroyed one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// A handle never used.
    New,
    /// The handle of a destroyed key whose original material this is.
    Recover,
}

/// The material of an import.
#[derive(Debug)]
pub enum Source {
    /// An RSA-OAEP ciphertext of the key bytes.
    Wrapped {
        /// The ciphertext.
        wrapped_key: Vec<u8>,
        /// The id of the import key the caller encrypted under, when it said.
        import_key_id: Option<String>,
    },
    /// A key generated inside custody; never with [`Admission::Recover`].
    Generate,
    /// A reference to a key that stays in AWS KMS.
    AwsKms(AwsKeyRef),
}

impl TryFrom<pb::ImportRequest> for Import {
    type Error = ServiceError;

    fn try_from(request: pb::ImportRequest) -> Result<Self, ServiceError> {
        let pb::ImportRequest {
            source,
            import_key_id,
            key_handle,
            recover,
            org,
        } = request;
        let admission = match recover {
            true => Admission::Recover,
            false => Admission::New,
        };
        if admission == Admission::Recover && key_handle.is_empty() {
            return Err(ServiceError::InvalidArgument(
                "recover needs key_handle: the handle of the destroyed key to bring back".into(),
            ));
        }
        let handle = (!key_handle.is_empty())
            .then(|| key_handle.parse::<KeyHandle>())
            .transpose()
            .map_err(CustodyError::from)?;
        let source = match source {
            Some(import_request::Source::WrappedKey(wrapped_key)) => Source::Wrapped {
                wrapped_key,
                import_key_id: checked_import_key_id(import_key_id)?,
            },
            Some(import_request::Source::Generate(pb::Generate { shared })) => {
                if admission == Admission::Recover {
                    return Err(ServiceError::InvalidArgument(
                        "a generated key cannot be recovered: its material never left custody"
                            .into(),
                    ));
                }
                if shared {
                    if !org.is_empty() {
                        return Err(ServiceError::InvalidArgument(
                            "a shared key serves every org: org must be empty with generate.shared"
                                .into(),
                        ));
                    }
                    return Ok(Self {
                        handle,
                        admission,
                        scope: KeyScope::Shared,
                        source: Source::Generate,
                    });
                }
                Source::Generate
            }
            Some(import_request::Source::AwsKmsKey(key)) => Source::AwsKms(aws_key_ref(key)?),
            None => {
                return Err(ServiceError::InvalidArgument(
                    "import request sets none of wrapped_key, generate and aws_kms_key".into(),
                ));
            }
        };
        Ok(Self {
            handle,
            admission,
            scope: KeyScope::Org(org_field(&org)?),
            source,
        })
    }
}

/// The `org` field of a request: required, and well-formed.
fn org_field(org: &str) -> Result<OrgName, ServiceError> {
    if org.is_empty() {
        return Err(ServiceError::InvalidArgument(
            "org is required: the organisation the key serves".into(),
        ));
    }
    Ok(OrgName::parse(org).map_err(CustodyError::from)?)
}

/// The import key id of a request, checked before it is ever compared, so
/// that only a well-formed id is echoed back in an error.
fn checked_import_key_id(id: String) -> Result<Option<String>, ServiceError> {
    if id.is_empty() {
        return Ok(None);
    }
    if id.len() != 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(ServiceError::InvalidArgument(
            "import_key_id must be empty or 64 lower-case hexadecimal characters".into(),
        ));
    }
    Ok(Some(id))
}

/// The key reference of an import request, each malformed ARN named by its
/// field.
fn aws_key_ref(key: pb::AwsKmsKey) -> Result<AwsKeyRef, ServiceError> {
    let pb::AwsKmsKey {
        key_arn,
        backup_key_arn,
        role_arn,
        external_id,
    } = key;
    let invalid =
        |field: &str, err: ArnError| ServiceError::InvalidArgument(format!("{field}: {err}"));
    let primary = KeyArn::parse(&key_arn).map_err(|e| invalid("key_arn", e))?;
    let backup = (!backup_key_arn.is_empty())
        .then(|| KeyArn::parse(&backup_key_arn))
        .transpose()
        .map_err(|e| invalid("backup_key_arn", e))?;
    let role = (!role_arn.is_empty())
        .then(|| RoleArn::parse(&role_arn))
        .transpose()
        .map_err(|e| invalid("role_arn", e))?;
    let external_id = (!external_id.is_empty())
        .then(|| ExternalId::parse(&external_id))
        .transpose()
        .map_err(|e| invalid("external_id", e))?;
    AwsKeyRef::new(primary, backup, role)
        .and_then(|key| key.with_external_id(external_id))
        .map_err(|err| ServiceError::InvalidArgument(err.to_string()))
}

impl TryFrom<Bounded<'_, pb::WrapRequest>> for ForOrg<WrapItem> {
    type Error = ServiceError;

    fn try_from(
        Bounded(request, limits): Bounded<'_, pb::WrapRequest>,
    ) -> Result<Self, ServiceError> {
        let pb::WrapRequest {
            key_handle,
            plaintext,
            associated_data,
            org,
        } = request;
        let plaintext = SecretBytes::new(plaintext);
        let handle = key_handle
            .parse::<KeyHandle>()
            .map_err(CustodyError::from)?;
        if plaintext.is_empty() {
            return Err(CustodyError::Input(InputError::EmptyPlaintext).into());
        }
        check_len("plaintext", plaintext.len(), limits.max_plaintext_bytes)?;
        check_len(
            "associated data",
            associated_data.len(),
            limits.max_associated_data_bytes,
        )?;
        Ok(ForOrg {
            org: org_field(&org)?,
            item: WrapItem {
                handle,
                plaintext,
                associated_data,
            },
        })
    }
}

impl TryFrom<Bounded<'_, pb::UnwrapRequest>> for ForOrg<UnwrapItem> {
    type Error = ServiceError;

    fn try_from(
        Bounded(request, limits): Bounded<'_, pb::UnwrapRequest>,
    ) -> Result<Self, ServiceError> {
        let pb::UnwrapRequest {
            ciphertext,
            associated_data,
            org,
        } = request;
        check_len(
            "associated data",
            associated_data.len(),
            limits.max_associated_data_bytes,
        )?;
        // A ciphertext longer than the largest possible Wrap output cannot be ours.
        let max = (envelope::MIN_LEN + limits.max_plaintext_bytes).max(MAX_CIPHERTEXT_LEN);
        check_len("ciphertext", ciphertext.len(), max)?;
        Ok(ForOrg {
            org: org_field(&org)?,
            item: UnwrapItem {
                ciphertext,
                associated_data,
            },
        })
    }
}

/// The items of a batch wrap: the batch is refused as a whole when it is
/// empty or too long, an item that is malformed fails on its own.
pub struct BatchWrap(pub Vec<Result<ForOrg<WrapItem>, ServiceError>>);

impl TryFrom<Bounded<'_, pb::BatchWrapRequest>> for BatchWrap {
    type Error = ServiceError;

    fn try_from(
        Bounded(request, limits): Bounded<'_, pb::BatchWrapRequest>,
    ) -> Result<Self, ServiceError> {
        let pb::BatchWrapRequest { items } = request;
        check_batch(items.len(), limits)?;
        Ok(Self(
            items
                .into_iter()
                .map(|item| ForOrg::try_from(Bounded(item, limits)))
                .collect(),
        ))
    }
}

/// The items of a batch unwrap, checked as [`BatchWrap`]'s are.
pub struct BatchUnwrap(pub Vec<Result<ForOrg<UnwrapItem>, ServiceError>>);

impl TryFrom<Bounded<'_, pb::BatchUnwrapRequest>> for BatchUnwrap {
    type Error = ServiceError;

    fn try_from(
        Bounded(request, limits): Bounded<'_, pb::BatchUnwrapRequest>,
    ) -> Result<Self, ServiceError> {
        let pb::BatchUnwrapRequest { items } = request;
        check_batch(items.len(), limits)?;
        Ok(Self(
            items
                .into_iter()
                .map(|item| ForOrg::try_from(Bounded(item, limits)))
                .collect(),
        ))
    }
}

/// The key a destroy names, and the org it is for: `None` for a shared key
/// (the generic default key), which serves no org of its own.
pub struct Destroy {
    /// The org, unless the key is shared.
    pub org: Option<OrgName>,
    /// The key.
    pub handle: KeyHandle,
}

impl TryFrom<pb::DestroyRequest> for Destroy {
    type Error = ServiceError;

    fn try_from(request: pb::DestroyRequest) -> Result<Self, ServiceError> {
        let pb::DestroyRequest { key_handle, org } = request;
        let handle = key_handle
            .parse::<KeyHandle>()
            .map_err(CustodyError::from)?;
        let org = (!org.is_empty())
            .then(|| OrgName::parse(&org))
            .transpose()
            .map_err(CustodyError::from)?;
        Ok(Self { org, handle })
    }
}

/// A checkpoint to sign: the org, the chain's newest seq and its hash.
pub struct SignCheckpoint {
    /// The organisation.
    pub org: OrgName,
    /// At least 1.
    pub seq: u64,
    /// 32 bytes.
    pub head: [u8; 32],
}

impl TryFrom<pb::SignCheckpointRequest> for SignCheckpoint {
    type Error = ServiceError;

    fn try_from(request: pb::SignCheckpointRequest) -> Result<Self, ServiceError> {
        let pb::SignCheckpointRequest {
            org,
            seq,
            head_hash,
        } = request;
        if seq == 0 {
            return Err(ServiceError::InvalidArgument(
                "seq is 0: a checkpoint covers at least one event".into(),
            ));
        }
        let head = <[u8; 32]>::try_from(head_hash.as_slice()).map_err(|_| {
            ServiceError::InvalidArgument(format!(
                "head_hash is {} bytes; a SHA-256 hash is 32",
                head_hash.len()
            ))
        })?;
        Ok(Self {
            org: org_field(&org)?,
            seq,
            head,
        })
    }
}

fn check_len(what: &str, len: usize, max: usize) -> Result<(), ServiceError> {
    if len > max {
        return Err(ServiceError::InvalidArgument(format!(
            "{what} is {len} bytes, over the limit of {max}"
        )));
    }
    Ok(())
}

fn check_batch(len: usize, limits: &Limits) -> Result<(), ServiceError> {
    if len == 0 {
        return Err(ServiceError::InvalidArgument("batch has no items".into()));
    }
    if len > limits.max_batch_items {
        return Err(ServiceError::InvalidArgument(format!(
            "batch has {len} items, over the limit of {}",
            limits.max_batch_items
        )));
    }
    Ok(())
}
