//! What an org's AWS admin needs so that the service may use the org's keys
//! through a role of theirs, without becoming a confused deputy: the org's
//! own external id, which every AssumeRole of the org's roles carries and the
//! role's trust policy requires, and a permissions policy that lets the role
//! encrypt and decrypt only under an encryption context naming the org.

use cmk_control_plane_domain::OrgId;
use serde_json::json;

use super::{KeyService, admin::MAX_ARN_BYTES};
use crate::{authz::Caller, error::ServiceError};

/// Most key ARNs a setup request may add to the policy.
pub const MAX_SETUP_KEY_ARNS: usize = 16;

/// Key ARNs a setup request names, checked before they go into a policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AwsSetupRequest {
    key_arns: Vec<String>,
}

impl AwsSetupRequest {
    /// At most [`MAX_SETUP_KEY_ARNS`] key ARNs
    /// (`arn:<partition>:kms:<region>:<account>:key/<id>`), each bounded.
    pub fn new(key_arns: Vec<String>) -> Result<Self, ServiceError> {
        if key_arns.len() > MAX_SETUP_KEY_ARNS {
            return Err(ServiceError::InvalidArgument(format!(
                "key_arns: {} ARNs, over the limit of {MAX_SETUP_KEY_ARNS}",
                key_arns.len()
            )));
        }
        for arn in &key_arns {
            check_key_arn(arn)?;
        }
        Ok(Self { key_arns })
    }
}

fn check_key_arn(arn: &str) -> Result<(), ServiceError> {
    let invalid = |why: &str| {
        let shown: String = arn.chars().take(MAX_ARN_BYTES.min(256)).collect();
        ServiceError::InvalidArgument(format!("key_arns: {shown:?} {why}"))
    };
    if arn.len() > MAX_ARN_BYTES {
        return Err(invalid("is over the length limit"));
    }
    let fields: Vec<&str> = arn.splitn(6, ':').collect();
    let well_formed = fields.len() == 6
        && fields[0] == "arn"
        && fields[2] == "kms"
        && !fields[3].is_empty()
        && fields[4].len() == 12
        && fields[4].bytes().all(|b| b.is_ascii_digit())
        && fields[5].strip_prefix("key/").is_some_and(|id| {
            !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        && arn
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'/' | b'-'));
    match well_formed {
        true => Ok(()),
        false => Err(invalid(
            "is not a KMS key ARN (arn:<partition>:kms:<region>:<account>:key/<key id>)",
        )),
    }
}

/// What an org's AWS admin needs to set up a role for the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsSetup {
    /// The HSM daemon's AWS principal.
    pub service_principal_arn: String,
    /// The org's external id.
    pub external_id: String,
    /// The role's trust policy.
    pub trust_policy_json: String,
    /// The role's permissions policy.
    pub permissions_policy_json: String,
    /// The keys the permissions policy names.
    pub key_arns: Vec<String>,
}

impl KeyService {
    /// The org's external id for AWS, created (random) on first need and
    /// never changed. Its only use is that no two orgs share one.
    pub(crate) async fn external_id(&self, org: &OrgId) -> Result<String, ServiceError> {
        let mut bytes = [0u8; 16];
        // AWS-LC's RAND_bytes aborts the process rather than return without
        // filling the buffer.
        aws_lc_rs::rand::fill(&mut bytes).expect("AWS-LC RAND_bytes never fails without aborting");
        let fresh = format!("cmk-{}", hex::encode(bytes));
        Ok(self
            .store
            .aws_external_id(org, &fresh, self.clock.now())
            .await?)
    }

    /// The org's AWS setup: the service's principal, the org's external id,
    /// and the role's policies for the org's AWS keys and the keys `request`
    /// names.
    pub async fn aws_setup(
        &self,
        caller: &Caller,
        request: AwsSetupRequest,
    ) -> Result<AwsSetup, ServiceError> {
        self.audited(caller, "get aws setup", None, true, async {
            let org = caller.org();
            let principal = self
                .aws_principal
                .clone()
                .ok_or(ServiceError::NotConfigured(
                    "the operator has not set aws_principal_arn (the HSM daemon's AWS identity), \
                 which a role's trust policy must name",
                ))?;
            let mut key_arns: Vec<String> = Vec::new();
            if let Some(stored) = self.store.load_org(org).await? {
                for key in stored.keys.iter().filter_map(|k| k.aws.as_ref()) {
                    key_arns.push(key.key_arn.clone());
                    key_arns.extend(key.backup_key_arn.clone());
                }
            }
            key_arns.extend(request.key_arns);
            let mut seen = std::collections::HashSet::new();
            key_arns.retain(|arn| seen.insert(arn.clone()));
            if key_arns.is_empty() {
                return Err(ServiceError::InvalidArgument(
                    "key_arns: the org has no AWS key yet; name the keys the role is for".into(),
                ));
            }
            let external_id = self.external_id(org).await?;
            Ok(setup(org, principal, external_id, key_arns))
        })
        .await
    }
}

/// The setup's policy documents.
fn setup(org: &OrgId, principal: String, external_id: String, key_arns: Vec<String>) -> AwsSetup {
    let trust = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "CmkAssumesThisRoleForOneOrg",
            "Effect": "Allow",
            "Principal": { "AWS": principal },
            "Action": "sts:AssumeRole",
            "Condition": { "StringEquals": { "sts:ExternalId": external_id } }
        }]
    });
    let permissions = json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "CmkWrapsOnlyForThisOrg",
                "Effect": "Allow",
                "Action": ["kms:Encrypt", "kms:Decrypt"],
                "Resource": key_arns,
                "Condition": {
                    "StringEquals": { "kms:EncryptionContext:cmk:org": org.as_str() }
                }
            },
            {
                "Sid": "CmkReadsKeyState",
                "Effect": "Allow",
                "Action": ["kms:DescribeKey", "kms:GetKeyRotationStatus"],
                "Resource": key_arns
            }
        ]
    });
    AwsSetup {
        service_principal_arn: principal,
        external_id,
        // Serialising a json! value cannot fail.
        trust_policy_json: serde_json::to_string_pretty(&trust).unwrap_or_default(),
        permissions_policy_json: serde_json::to_string_pretty(&permissions).unwrap_or_default(),
        key_arns,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const KEY: &str = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    #[test]
    fn key_arns_are_checked_before_they_go_into_a_policy() {
        assert!(AwsSetupRequest::new(vec![KEY.into()]).is_ok());
        for bad in [
            "",
            "arn:aws:kms:eu-west-1:111122223333:alias/mine",
            "arn:aws:iam::111122223333:role/x",
            "arn:aws:kms:eu-west-1:1111:key/x",
            "arn:aws:kms:eu-west-1:111122223333:key/\"}],\"Effect\":\"Allow",
        ] {
            assert!(
                matches!(
                    AwsSetupRequest::new(vec![bad.into()]),
                    Err(ServiceError::InvalidArgument(_))
                ),
                "{bad:?}"
            );
        }
        assert!(AwsSetupRequest::new(vec![KEY.into(); MAX_SETUP_KEY_ARNS + 1]).is_err());
    }

    #[test]
    fn the_policies_pin_the_external_id_and_the_org() {
        let org = OrgId::parse("acme").unwrap();
        let setup = setup(
            &org,
            "arn:aws:iam::999988887777:role/cmk-hsm-daemon".into(),
            "cmk-0123".into(),
            vec![KEY.into()],
        );
        let trust: serde_json::Value = serde_json::from_str(&setup.trust_policy_json).unwrap();
        let statement = &trust["Statement"][0];
        assert_eq!(
            statement["Principal"]["AWS"],
            "arn:aws:iam::999988887777:role/cmk-hsm-daemon"
        );
        assert_eq!(statement["Action"], "sts:AssumeRole");
        assert_eq!(
            statement["Condition"]["StringEquals"]["sts:ExternalId"],
            "cmk-0123"
        );
        let permissions: serde_json::Value =
            serde_json::from_str(&setup.permissions_policy_json).unwrap();
        let wrap = &permissions["Statement"][0];
        assert_eq!(wrap["Resource"][0], KEY);
        assert_eq!(
            wrap["Condition"]["StringEquals"]["kms:EncryptionContext:cmk:org"],
            "acme"
        );
        // DescribeKey carries no encryption context: a context condition
        // would deny it.
        assert!(permissions["Statement"][1]["Condition"].is_null());
    }
}
