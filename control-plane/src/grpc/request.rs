//! Every request of `cmk.control.v1`, read once into typed values: the org
//! it names (read before the caller is authorised, see [`Scoped`]), then the
//! rest of its fields (`TryFrom`, after). A field that does not parse is
//! refused with INVALID_ARGUMENT, through [`ServiceError::InvalidArgument`],
//! before the service is called.
//!
//! Conversions destructure each message without `..`, so a field added to
//! the protocol breaks the build here until it is read.

use cmk_control_plane_domain::{KekId, KeyId, ResourceId};
use cmk_proto::control::v1 as pb;

use crate::{
    error::ServiceError,
    service::{AddAwsKey, AuditPage, AwsSetupRequest, ContentContext, UploadKey},
};

/// What the edge reads of a request before its caller is authorised.
pub(crate) trait Scoped {
    /// The org the request names, as sent.
    fn org_id(&self) -> &str;

    /// The key the request names, as sent: recorded with a refused
    /// authorisation when it is a well-formed id.
    fn key_id(&self) -> Option<&str> {
        None
    }
}

macro_rules! scoped {
    ($($message:ty),* $(,)?) => {
        $(impl Scoped for $message {
            fn org_id(&self) -> &str {
                &self.org_id
            }
        })*
    };
}

scoped!(
    pb::GetImportPublicKeyRequest,
    pb::SetByokRequest,
    pb::UploadKeyRequest,
    pb::AddAwsKeyRequest,
    pb::GetAwsSetupRequest,
    pb::ListKeysRequest,
    pb::ListAuditEventsRequest,
    pb::WatchEventsRequest,
    pb::VerifyAuditLogRequest,
    pb::GetRotationRequest,
    pb::CreateKekRequest,
    pb::GenerateDataKeyRequest,
    pb::DecryptRequest,
);

impl Scoped for pb::KeyRequest {
    fn org_id(&self) -> &str {
        &self.org_id
    }

    fn key_id(&self) -> Option<&str> {
        Some(&self.key_id)
    }
}

/// A request that names nothing but its org.
pub(crate) struct OrgOnly;

macro_rules! org_only {
    ($($message:ident),* $(,)?) => {
        $(impl TryFrom<pb::$message> for OrgOnly {
            type Error = ServiceError;

            fn try_from(message: pb::$message) -> Result<Self, ServiceError> {
                // The org was read before authorisation.
                let pb::$message { org_id: _ } = message;
                Ok(Self)
            }
        })*
    };
}

org_only!(
    GetImportPublicKeyRequest,
    ListKeysRequest,
    VerifyAuditLogRequest,
    GetRotationRequest,
);

/// BYOK on or off.
pub(crate) struct SetByok {
    pub(crate) enabled: bool,
}

impl TryFrom<pb::SetByokRequest> for SetByok {
    type Error = ServiceError;

    fn try_from(message: pb::SetByokRequest) -> Result<Self, ServiceError> {
        let pb::SetByokRequest { org_id: _, enabled } = message;
        Ok(Self { enabled })
    }
}

impl TryFrom<pb::UploadKeyRequest> for UploadKey {
    type Error = ServiceError;

    fn try_from(message: pb::UploadKeyRequest) -> Result<Self, ServiceError> {
        let pb::UploadKeyRequest {
            org_id: _,
            wrapped_key,
            activate_now,
            import_key_id,
        } = message;
        UploadKey::new(wrapped_key, &import_key_id, activate_now)
    }
}

/// Where a watch of the audit log starts.
pub(crate) struct WatchFrom {
    pub(crate) after_seq: u64,
}

impl TryFrom<pb::WatchEventsRequest> for WatchFrom {
    type Error = ServiceError;

    fn try_from(message: pb::WatchEventsRequest) -> Result<Self, ServiceError> {
        let pb::WatchEventsRequest {
            org_id: _,
            after_seq,
        } = message;
        Ok(Self { after_seq })
    }
}

impl TryFrom<pb::GetAwsSetupRequest> for AwsSetupRequest {
    type Error = ServiceError;

    fn try_from(message: pb::GetAwsSetupRequest) -> Result<Self, ServiceError> {
        let pb::GetAwsSetupRequest {
            org_id: _,
            key_arns,
        } = message;
        AwsSetupRequest::new(key_arns)
    }
}

impl TryFrom<pb::AddAwsKeyRequest> for AddAwsKey {
    type Error = ServiceError;

    fn try_from(message: pb::AddAwsKeyRequest) -> Result<Self, ServiceError> {
        let pb::AddAwsKeyRequest {
            org_id: _,
            key_arn,
            backup_key_arn,
            role_arn,
            activate_now,
        } = message;
        AddAwsKey::new(key_arn, backup_key_arn, role_arn, activate_now)
    }
}

/// One key of the org.
pub(crate) struct KeyTarget {
    pub(crate) key: KeyId,
}

impl TryFrom<pb::KeyRequest> for KeyTarget {
    type Error = ServiceError;

    fn try_from(message: pb::KeyRequest) -> Result<Self, ServiceError> {
        let pb::KeyRequest { org_id: _, key_id } = message;
        let key = KeyId::parse(&key_id)
            .map_err(|e| ServiceError::InvalidArgument(format!("key_id: {e}")))?;
        Ok(Self { key })
    }
}

impl TryFrom<pb::ListAuditEventsRequest> for AuditPage {
    type Error = ServiceError;

    fn try_from(message: pb::ListAuditEventsRequest) -> Result<Self, ServiceError> {
        let pb::ListAuditEventsRequest {
            org_id: _,
            after_seq,
            page_size,
        } = message;
        Ok(AuditPage::new(after_seq, page_size))
    }
}

/// The KEK of a resource.
pub(crate) struct CreateKek {
    pub(crate) resource: ResourceId,
}

impl TryFrom<pb::CreateKekRequest> for CreateKek {
    type Error = ServiceError;

    fn try_from(message: pb::CreateKekRequest) -> Result<Self, ServiceError> {
        let pb::CreateKekRequest {
            org_id: _,
            resource,
        } = message;
        let resource = ResourceId::parse(&resource)
            .map_err(|e| ServiceError::InvalidArgument(format!("resource: {e}")))?;
        Ok(Self { resource })
    }
}

/// A new content key under a KEK.
pub(crate) struct GenerateDataKey {
    pub(crate) kek: KekId,
    pub(crate) context: ContentContext,
}

impl TryFrom<pb::GenerateDataKeyRequest> for GenerateDataKey {
    type Error = ServiceError;

    fn try_from(message: pb::GenerateDataKeyRequest) -> Result<Self, ServiceError> {
        let pb::GenerateDataKeyRequest {
            org_id: _,
            kek_id,
            context,
        } = message;
        let kek = KekId::parse(&kek_id)
            .map_err(|e| ServiceError::InvalidArgument(format!("kek_id: {e}")))?;
        Ok(Self {
            kek,
            context: ContentContext::new(context)?,
        })
    }
}

/// A wrapped content key to open. Its format is the envelope's to parse,
/// which the service does once it holds the KEK it names.
pub(crate) struct Decrypt {
    pub(crate) wrapped_key: Vec<u8>,
    pub(crate) context: ContentContext,
}

impl TryFrom<pb::DecryptRequest> for Decrypt {
    type Error = ServiceError;

    fn try_from(message: pb::DecryptRequest) -> Result<Self, ServiceError> {
        let pb::DecryptRequest {
            org_id: _,
            wrapped_key,
            context,
        } = message;
        Ok(Self {
            context: ContentContext::new(context)?,
            wrapped_key,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use tonic::Code;

    use super::*;

    fn refused<T>(converted: Result<T, ServiceError>) -> tonic::Status {
        match converted {
            Ok(_) => panic!("accepted"),
            Err(err) => err.to_status(),
        }
    }

    #[test]
    fn malformed_ids_are_invalid_arguments_named_by_field() {
        let key = refused(KeyTarget::try_from(pb::KeyRequest {
            org_id: "acme".into(),
            key_id: String::new(),
        }));
        assert_eq!(key.code(), Code::InvalidArgument);
        assert!(key.message().starts_with("key_id: "), "{key:?}");
        let resource = refused(CreateKek::try_from(pb::CreateKekRequest {
            org_id: "acme".into(),
            resource: String::new(),
        }));
        assert_eq!(resource.code(), Code::InvalidArgument);
        assert!(resource.message().starts_with("resource: "), "{resource:?}");
        let kek = refused(GenerateDataKey::try_from(pb::GenerateDataKeyRequest {
            org_id: "acme".into(),
            kek_id: "not a kek".into(),
            context: Vec::new(),
        }));
        assert_eq!(kek.code(), Code::InvalidArgument);
        assert!(kek.message().starts_with("kek_id: "), "{kek:?}");
    }

    #[test]
    fn a_context_over_the_limit_is_refused_before_the_wrapped_key_is_read() {
        let long = vec![0; crate::envelope::MAX_CONTEXT_BYTES + 1];
        let status = refused(Decrypt::try_from(pb::DecryptRequest {
            org_id: "acme".into(),
            wrapped_key: Vec::new(),
            context: long,
        }));
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            Decrypt::try_from(pb::DecryptRequest {
                org_id: "acme".into(),
                wrapped_key: Vec::new(),
                context: vec![0; crate::envelope::MAX_CONTEXT_BYTES],
            })
            .is_ok()
        );
    }

    #[test]
    fn uploads_are_bounded_and_name_their_import_key_in_lower_case() {
        let upload = |wrapped_key: Vec<u8>, import_key_id: &str| {
            UploadKey::try_from(pb::UploadKeyRequest {
                org_id: "acme".into(),
                wrapped_key,
                activate_now: false,
                import_key_id: import_key_id.into(),
            })
        };
        for (wrapped, id, why) in [
            (Vec::new(), "", "wrapped_key is empty"),
            (vec![1; 1025], "", "wrapped_key is 1025 bytes"),
            (vec![1; 256], "abc", "import_key_id must be empty or"),
            (
                vec![1; 256],
                &"g".repeat(64),
                "import_key_id must be empty or",
            ),
        ] {
            let status = refused(upload(wrapped, id));
            assert_eq!(status.code(), Code::InvalidArgument, "{why}: {status:?}");
            assert!(status.message().contains(why), "{status:?}");
        }
        assert_eq!(
            upload(vec![1; 1024], &"AB".repeat(32)).unwrap(),
            UploadKey::new(vec![1; 1024], &"ab".repeat(32), false).unwrap()
        );
    }
}
