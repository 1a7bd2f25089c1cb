//! The KMS clients (one per region and role) and the operations on a key
//! reference.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::sts::AssumeRoleProvider;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_kms::config::{Credentials, IdentityCache};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{EncryptionAlgorithmSpec, KeyMetadata, KeySpec, KeyState, KeyUsageType};
use cmk_hsm_custody::OrgName;
use cmk_secret::SecretBytes;
use tokio::sync::OnceCell;

use super::arn::{ArnError, KeyArn, RoleArn};
use super::context::EncryptionContext;
use super::error::{AwsDetail, AwsError, Call, classify};
use super::wrapped::{MAX_BLOB_LEN, WrappedByAws};

/// KMS's limit on the plaintext of one Encrypt call.
pub const MAX_PLAINTEXT_LEN: usize = 4096;

/// The role session name, visible in the key owner's CloudTrail.
pub const ROLE_SESSION_NAME: &str = "cmk-hsm-daemon";

/// How long before their expiry assumed-role credentials are renewed (the SDK
/// jitters this down to half): long enough for a slow STS call and some clock
/// skew, short against a session of an hour.
const CREDENTIALS_REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(60);

/// The bytes `verify_access` sends through KMS.
const PROBE_LEN: usize = 32;

/// An IAM role this service assumes to use a customer's key, with the
/// external id the role's trust policy requires (`sts:ExternalId`): the id is
/// the customer's org's own, so the service cannot be made to assume one
/// org's role for another org (the "confused deputy").
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AssumedRole {
    arn: RoleArn,
    external_id: Option<ExternalId>,
}

impl AssumedRole {
    /// The role's ARN.
    pub fn arn(&self) -> &RoleArn {
        &self.arn
    }

    /// The external id sent with every AssumeRole call.
    pub fn external_id(&self) -> Option<&ExternalId> {
        self.external_id.as_ref()
    }
}

impl fmt::Display for AssumedRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.arn, f)
    }
}

/// The `sts:ExternalId` of an AssumeRole call: 2 to 1224 characters of
/// letters, digits and `+=,.@:/-_`, as STS accepts. Not a secret (it appears
/// in CloudTrail); what matters is that each org has its own.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ExternalId(String);

impl ExternalId {
    /// The longest external id STS accepts.
    pub const MAX_LEN: usize = 1224;

    /// Parses an external id.
    pub fn parse(text: &str) -> Result<Self, ArnError> {
        let valid = (2..=Self::MAX_LEN).contains(&text.len())
            && text.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(
                        b,
                        b'+' | b'=' | b',' | b'.' | b'@' | b':' | b'/' | b'-' | b'_'
                    )
            });
        match valid {
            true => Ok(Self(text.to_owned())),
            false => Err(ArnError::ExternalId),
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One KMS key with, optionally, a backup key (normally in another region) and an
/// IAM role to assume for both.
///
/// Every call on a key goes to the region named in its ARN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsKeyRef {
    primary: KeyArn,
    backup: Option<KeyArn>,
    role: Option<AssumedRole>,
}

impl AwsKeyRef {
    /// A key reference. The backup must be another key, and every ARN must be in
    /// the primary's partition, where one set of credentials works.
    pub fn new(
        primary: KeyArn,
        backup: Option<KeyArn>,
        role: Option<RoleArn>,
    ) -> Result<Self, ArnError> {
        if let Some(backup) = &backup {
            if backup == &primary {
                return Err(ArnError::BackupIsPrimary);
            }
            if backup.partition() != primary.partition() {
                return Err(ArnError::PartitionMismatch {
                    what: "backup key",
                    found: backup.partition(),
                    expected: primary.partition(),
                });
            }
        }
        if let Some(role) = role
            .as_ref()
            .filter(|r| r.partition() != primary.partition())
        {
            return Err(ArnError::PartitionMismatch {
                what: "role",
                found: role.partition(),
                expected: primary.partition(),
            });
        }
        Ok(Self {
            primary,
            backup,
            role: role.map(|arn| AssumedRole {
                arn,
                external_id: None,
            }),
        })
    }

    /// This reference with `external_id` sent on every AssumeRole of its
    /// role; an external id without a role is refused.
    pub fn with_external_id(mut self, external_id: Option<ExternalId>) -> Result<Self, ArnError> {
        match (&mut self.role, external_id) {
            (_, None) => {}
            (Some(role), id) => role.external_id = id,
            (None, Some(_)) => return Err(ArnError::ExternalIdWithoutRole),
        }
        Ok(self)
    }

    /// The key every secret is wrapped under and first unwrapped with.
    pub fn primary(&self) -> &KeyArn {
        &self.primary
    }

    /// The key every secret is also wrapped under, tried when the primary's
    /// region fails.
    pub fn backup(&self) -> Option<&KeyArn> {
        self.backup.as_ref()
    }

    /// The role assumed for every call on both keys.
    pub fn role(&self) -> Option<&RoleArn> {
        self.role.as_ref().map(AssumedRole::arn)
    }

    /// The external id of the role's AssumeRole calls.
    pub fn external_id(&self) -> Option<&ExternalId> {
        self.role.as_ref().and_then(AssumedRole::external_id)
    }

    /// The role with its external id.
    pub fn assumed_role(&self) -> Option<&AssumedRole> {
        self.role.as_ref()
    }
}

/// Where this service's own AWS identity comes from.
#[derive(Clone, Debug, Default)]
pub enum AwsCredentials {
    /// The SDK's default provider chain: the environment (`AWS_ACCESS_KEY_ID`,
    /// …), the shared profile files (`AWS_PROFILE`; with `credential_process`,
    /// but not SSO sessions, which would compile two more SDK services), web
    /// identity (`AWS_WEB_IDENTITY_TOKEN_FILE`, as EKS injects it), the ECS
    /// container endpoint, and the EC2 instance metadata service.
    #[default]
    DefaultChain,
    /// A fixed access key: for an emulator in tests, or a deployment that hands
    /// the key to the daemon explicitly.
    Static {
        /// The access key id (not secret: it appears in CloudTrail).
        access_key_id: String,
        /// The secret access key.
        secret_access_key: SecretBytes,
    },
}

/// How [`AwsKms`] reaches AWS.
#[derive(Clone, Debug)]
pub struct AwsSettings {
    /// Sends every KMS and STS call here instead of AWS's endpoint for the
    /// region (an emulator; a proxy).
    pub endpoint: Option<String>,
    /// Per region, overrides `endpoint` for KMS and STS calls in that region: a
    /// VPC endpoint per region, or in tests a dead address that plays a failed
    /// region.
    pub endpoint_for_region: BTreeMap<String, String>,
    /// This service's own identity; a key's role is assumed with it.
    pub credentials: AwsCredentials,
    /// Limit on establishing a connection.
    pub connect_timeout: Duration,
    /// Limit on one attempt of a call.
    pub attempt_timeout: Duration,
    /// Limit on a call with all its retries: the most a failed region can cost
    /// before failover.
    pub operation_timeout: Duration,
    /// Attempts per call, the first included (0 counts as 1), in the SDK's
    /// standard retry mode (exponential backoff with jitter, a client-side retry
    /// quota).
    pub max_attempts: u32,
}

impl Default for AwsSettings {
    fn default() -> Self {
        Self {
            endpoint: None,
            endpoint_for_region: BTreeMap::new(),
            credentials: AwsCredentials::DefaultChain,
            connect_timeout: Duration::from_secs(3),
            attempt_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(15),
            max_attempts: 3,
        }
    }
}

/// What DescribeKey says about a key's usability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AwsKeyState {
    /// Usable.
    Enabled,
    /// Disabled by its owner; can be re-enabled.
    Disabled,
    /// Scheduled for deletion (or, for a multi-region replica, its deletion is
    /// pending): unusable, and gone for good at the end of the waiting period.
    PendingDeletion,
    /// Its imported key material is missing or expired.
    PendingImport,
    /// Its custom key store is disconnected.
    Unavailable,
    /// Any other state (`Creating`, `Updating`, a state newer than this code).
    Other(String),
}

impl AwsKeyState {
    fn from_sdk(state: &KeyState) -> Self {
        match state {
            KeyState::Enabled => Self::Enabled,
            KeyState::Disabled => Self::Disabled,
            KeyState::PendingDeletion | KeyState::PendingReplicaDeletion => Self::PendingDeletion,
            KeyState::PendingImport => Self::PendingImport,
            KeyState::Unavailable => Self::Unavailable,
            other => Self::Other(other.as_str().to_owned()),
        }
    }
}

/// A client of AWS KMS for [`AwsKeyRef`]s.
///
/// There is intentionally no call that deletes, disables or schedules the
/// deletion of a key: the customer owns the key, and "destroy" in this service
/// only forgets its ARN.
pub struct AwsKms {
    settings: AwsSettings,
    /// The SDK's shared configuration (credential chain, HTTP client, retry and
    /// timeout settings), loaded on first use because loading is async.
    base: OnceCell<SdkConfig>,
    /// One client per (region, role): a client is bound to one region, and to
    /// one credentials provider with its cache of assumed-role credentials.
    clients: Mutex<HashMap<(String, Option<AssumedRole>), aws_sdk_kms::Client>>,
}

impl fmt::Debug for AwsKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKms")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl AwsKms {
    /// A client; nothing is contacted until the first call.
    pub fn new(settings: AwsSettings) -> Self {
        Self {
            settings,
            base: OnceCell::new(),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Encrypts `plaintext` under the primary key and, when one is configured,
    /// under the backup key too.
    ///
    /// Fails as a whole when either fails: a secret that could not be wrapped
    /// under the backup would silently lose the failover the admin configured, so
    /// the caller retries instead (while the backup's region is down, nothing new
    /// is wrapped; everything already wrapped still unwraps).
    pub async fn encrypt(
        &self,
        key: &AwsKeyRef,
        plaintext: &SecretBytes,
        context: &EncryptionContext,
    ) -> Result<WrappedByAws, AwsError> {
        if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(AwsError::PlaintextSize(plaintext.len()));
        }
        let role = key.role.as_ref();
        let primary = self.encrypt_one(&key.primary, role, plaintext, context);
        let (primary, backup) = match &key.backup {
            None => (primary.await?, None),
            Some(backup) => {
                let (primary, backup) =
                    tokio::join!(primary, self.encrypt_one(backup, role, plaintext, context));
                (primary?, Some(backup?))
            }
        };
        // encrypt_one bounded both blobs, so this cannot fail; an error rather
        // than a panic should that change.
        WrappedByAws::new(primary, backup).map_err(|error| AwsError::Other {
            operation: "Encrypt",
            key: key.primary.clone(),
            detail: AwsDetail {
                code: "ciphertext".into(),
                message: error.to_string(),
            },
            source: None,
        })
    }

    /// Decrypts with the primary key; when the primary's region is unavailable
    /// ([`AwsError::is_unavailable`]), with the backup key and the backup
    /// ciphertext. An answer from the primary — a wrong ciphertext or context,
    /// access denied, the key disabled or gone — is returned as it is.
    pub async fn decrypt(
        &self,
        key: &AwsKeyRef,
        wrapped: &WrappedByAws,
        context: &EncryptionContext,
    ) -> Result<SecretBytes, AwsError> {
        let role = key.role.as_ref();
        let primary = match self
            .decrypt_one(&key.primary, role, wrapped.primary(), context)
            .await
        {
            Err(error) if error.is_unavailable() => error,
            answered => return answered,
        };
        // A secret wrapped before the backup was configured has no backup
        // ciphertext; one wrapped with a backup since removed is decrypted with
        // the primary only.
        let (Some(backup_key), Some(backup_blob)) = (&key.backup, wrapped.backup()) else {
            return Err(primary);
        };
        tracing::warn!(
            primary = %key.primary,
            backup = %backup_key,
            error = %primary,
            "AWS KMS primary key unavailable; decrypting with the backup key"
        );
        self.decrypt_one(backup_key, role, backup_blob, context)
            .await
            .map_err(|backup| AwsError::Failover {
                primary: Box::new(primary),
                backup: Box::new(backup),
            })
    }

    /// Checks that the service can use the key (and the backup): DescribeKey
    /// reports a symmetric encrypt/decrypt key that is enabled, and 32 random
    /// bytes survive an Encrypt and Decrypt round trip. The round trip's
    /// encryption context names `org` when given, as every later call will,
    /// so that a key policy that requires it admits the probe too.
    pub async fn verify_access(
        &self,
        key: &AwsKeyRef,
        org: Option<&OrgName>,
    ) -> Result<(), AwsError> {
        let role = key.role.as_ref();
        let mut context = EncryptionContext::new("cmk:purpose", "verify-access")?;
        if let Some(org) = org {
            context = context.with(crate::CONTEXT_ORG, org.as_str())?;
        }
        let primary = self.verify_one(&key.primary, role, &context);
        match &key.backup {
            None => primary.await,
            Some(backup) => {
                let (primary, backup) =
                    tokio::join!(primary, self.verify_one(backup, role, &context));
                primary.and(backup)
            }
        }
    }

    /// The key's state, for a health check that notices a key disabled or
    /// deleted by its owner. A key that no longer exists is
    /// [`AwsError::NotFound`].
    pub async fn key_state(
        &self,
        key: &KeyArn,
        role: Option<&AssumedRole>,
    ) -> Result<AwsKeyState, AwsError> {
        let metadata = self.describe(key, role).await?;
        Ok(metadata
            .key_state()
            .map_or_else(|| AwsKeyState::Other(String::new()), AwsKeyState::from_sdk))
    }

    async fn verify_one(
        &self,
        key: &KeyArn,
        role: Option<&AssumedRole>,
        context: &EncryptionContext,
    ) -> Result<(), AwsError> {
        let metadata = self.describe(key, role).await?;
        let unsuitable = |reason: String| AwsError::Unsuitable {
            key: key.clone(),
            reason,
        };
        if metadata.arn().is_some_and(|arn| arn != key.as_str()) {
            return Err(unsuitable(format!(
                "DescribeKey answered for another key, {}",
                metadata.arn().unwrap_or_default()
            )));
        }
        match metadata.key_state() {
            Some(KeyState::Enabled) => {}
            state => {
                return Err(AwsError::KeyDisabled {
                    key: key.clone(),
                    detail: AwsDetail {
                        code: "KeyState".into(),
                        message: format!(
                            "DescribeKey reports the key {}",
                            state.map_or("without a state", KeyState::as_str)
                        ),
                    },
                });
            }
        }
        match metadata.key_spec() {
            Some(KeySpec::SymmetricDefault) => {}
            spec => {
                return Err(unsuitable(format!(
                    "its key spec is {}, but a SYMMETRIC_DEFAULT key is required",
                    spec.map_or("missing", KeySpec::as_str)
                )));
            }
        }
        // A SYMMETRIC_DEFAULT key can only be ENCRYPT_DECRYPT (or
        // GENERATE_VERIFY_MAC, which it is not); the emulator omits the usage of
        // keys created without one.
        if let Some(usage) = metadata
            .key_usage()
            .filter(|usage| **usage != KeyUsageType::EncryptDecrypt)
        {
            return Err(unsuitable(format!(
                "its key usage is {}, but ENCRYPT_DECRYPT is required",
                usage.as_str()
            )));
        }
        let mut probe = SecretBytes::zeroed(PROBE_LEN);
        cmk_hsm_custody::fill_random(probe.expose_mut()).map_err(|_| AwsError::Other {
            operation: "verify",
            key: key.clone(),
            detail: AwsDetail {
                code: "random".into(),
                message: "the random number generator failed".into(),
            },
            source: None,
        })?;
        let blob = self.encrypt_one(key, role, &probe, context).await?;
        let back = self.decrypt_one(key, role, &blob, context).await?;
        if !back.ct_eq(&probe) {
            return Err(unsuitable(
                "a test Encrypt and Decrypt round trip returned different bytes".into(),
            ));
        }
        Ok(())
    }

    async fn encrypt_one(
        &self,
        key: &KeyArn,
        role: Option<&AssumedRole>,
        plaintext: &SecretBytes,
        context: &EncryptionContext,
    ) -> Result<Vec<u8>, AwsError> {
        let call = Call {
            operation: "Encrypt",
            key,
            role,
        };
        // The SDK needs its own copy, which it serialises into the request body;
        // neither can be wiped from here.
        let output = self
            .client(&call)
            .await?
            .encrypt()
            .key_id(key.as_str())
            .plaintext(Blob::new(plaintext.expose().to_vec()))
            .set_encryption_context(Some(context.to_sdk()))
            .encryption_algorithm(EncryptionAlgorithmSpec::SymmetricDefault)
            .send()
            .await
            .map_err(|error| classify(&call, error))?;
        check_key_id(&call, output.key_id.as_deref())?;
        let blob = output
            .ciphertext_blob
            .map(Blob::into_inner)
            .ok_or_else(|| malformed(&call, "no CiphertextBlob"))?;
        if blob.is_empty() || blob.len() > MAX_BLOB_LEN {
            return Err(malformed(
                &call,
                &format!("a CiphertextBlob of {} bytes", blob.len()),
            ));
        }
        Ok(blob)
    }

    async fn decrypt_one(
        &self,
        key: &KeyArn,
        role: Option<&AssumedRole>,
        blob: &[u8],
        context: &EncryptionContext,
    ) -> Result<SecretBytes, AwsError> {
        let call = Call {
            operation: "Decrypt",
            key,
            role,
        };
        // KeyId always: KMS then refuses a ciphertext made under any other key,
        // so a ciphertext cannot redirect the call to a key of its choosing.
        let mut output = self
            .client(&call)
            .await?
            .decrypt()
            .key_id(key.as_str())
            .ciphertext_blob(Blob::new(blob))
            .set_encryption_context(Some(context.to_sdk()))
            .encryption_algorithm(EncryptionAlgorithmSpec::SymmetricDefault)
            .send()
            .await
            .map_err(|error| classify(&call, error))?;
        // Moved, not copied, into the zeroizing type. (The response body the SDK
        // parsed it from is beyond reach.)
        let plaintext = output
            .plaintext
            .take()
            .map(|blob| SecretBytes::new(blob.into_inner()))
            .ok_or_else(|| malformed(&call, "no Plaintext"))?;
        check_key_id(&call, output.key_id.as_deref())?;
        Ok(plaintext)
    }

    async fn describe(
        &self,
        key: &KeyArn,
        role: Option<&AssumedRole>,
    ) -> Result<KeyMetadata, AwsError> {
        let call = Call {
            operation: "DescribeKey",
            key,
            role,
        };
        self.client(&call)
            .await?
            .describe_key()
            .key_id(key.as_str())
            .send()
            .await
            .map_err(|error| classify(&call, error))?
            .key_metadata
            .ok_or_else(|| malformed(&call, "no KeyMetadata"))
    }

    /// The client for the key's region and the role, made on first use.
    async fn client(&self, call: &Call<'_>) -> Result<aws_sdk_kms::Client, AwsError> {
        let region = call.key.region();
        let cache_key = (region.to_owned(), call.role.cloned());
        if let Some(client) = self.lock_clients().get(&cache_key) {
            return Ok(client.clone());
        }
        let mut config = self.base(call).await?.to_builder();
        config.set_region(Some(Region::new(region.to_owned())));
        if let Some(endpoint) = self
            .settings
            .endpoint_for_region
            .get(region)
            .or(self.settings.endpoint.as_ref())
        {
            config.set_endpoint_url(Some(endpoint.clone()));
        }
        let config = config.build();
        let mut kms = aws_sdk_kms::config::Builder::from(&config).identity_cache(
            IdentityCache::lazy()
                .buffer_time(CREDENTIALS_REFRESH_BEFORE_EXPIRY)
                .build(),
        );
        if let Some(role) = call.role {
            // STS in the key's own region, so that a failed region takes only its
            // own keys down and the backup's region assumes the role by itself.
            // The provider calls STS on every request for credentials; the
            // client's identity cache above keeps them and renews them before
            // they expire.
            let mut provider = AssumeRoleProvider::builder(role.arn().as_str());
            if let Some(external_id) = role.external_id() {
                provider = provider.external_id(external_id.as_str());
            }
            let provider = provider
                .session_name(ROLE_SESSION_NAME)
                .region(Region::new(region.to_owned()))
                .configure(&config)
                .build()
                .await;
            kms = kms.credentials_provider(provider);
        }
        let client = aws_sdk_kms::Client::from_conf(kms.build());
        // Two first calls may both build a client; either serves.
        Ok(self
            .lock_clients()
            .entry(cache_key)
            .or_insert(client)
            .clone())
    }

    fn lock_clients(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, Option<AssumedRole>), aws_sdk_kms::Client>>
    {
        // The map is never left half-updated, so a panic elsewhere while it was
        // held does not make it unusable.
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn base(&self, call: &Call<'_>) -> Result<&SdkConfig, AwsError> {
        self.base
            .get_or_try_init(|| async {
                let settings = &self.settings;
                let mut loader = aws_config::defaults(BehaviorVersion::latest())
                    // Every client sets its key's region; this only keeps the
                    // loader from probing for a default region.
                    .region(Region::from_static("us-east-1"))
                    // The SDK requires at least the first attempt.
                    .retry_config(
                        RetryConfig::standard().with_max_attempts(settings.max_attempts.max(1)),
                    )
                    .timeout_config(
                        TimeoutConfig::builder()
                            .connect_timeout(settings.connect_timeout)
                            .operation_attempt_timeout(settings.attempt_timeout)
                            .operation_timeout(settings.operation_timeout)
                            .build(),
                    );
                if let AwsCredentials::Static {
                    access_key_id,
                    secret_access_key,
                } = &settings.credentials
                {
                    let secret = std::str::from_utf8(secret_access_key.expose()).map_err(|_| {
                        AwsError::Credentials {
                            key: call.key.clone(),
                            detail: AwsDetail {
                                code: "credentials".into(),
                                message: "the configured secret access key is not UTF-8".into(),
                            },
                        }
                    })?;
                    // The SDK keeps its copy in a zeroizing string.
                    loader = loader.credentials_provider(Credentials::new(
                        access_key_id.clone(),
                        secret,
                        None,
                        None,
                        "cmk-settings",
                    ));
                }
                Ok(loader.load().await)
            })
            .await
    }
}

/// KMS names the key it used; with KeyId given it must be that key. A
/// difference means a misrouted endpoint, and the answer is not trusted.
fn check_key_id(call: &Call<'_>, answered: Option<&str>) -> Result<(), AwsError> {
    match answered {
        Some(id) if id != call.key.as_str() => {
            Err(malformed(call, &format!("an answer for another key, {id}")))
        }
        _ => Ok(()),
    }
}

fn malformed(call: &Call<'_>, what: &str) -> AwsError {
    AwsError::Other {
        operation: call.operation,
        key: call.key.clone(),
        detail: AwsDetail {
            code: "malformed-response".into(),
            message: format!("KMS sent {what}"),
        },
        source: None,
    }
}
