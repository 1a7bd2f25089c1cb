//! Keys in AWS KMS through the whole service — adding one, the provider
//! health check, content keys and rotation while AWS reports a key disabled —
//! against a fake HSM daemon that answers as the real one's contract says.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use cmk_control_plane_domain::{KekId, KeyState, OrgId, Place, Policy, ResourceId};
use cmk_control_plane_store::{SqliteStore, Store};
use cmk_proto::hsm::v1::{
    self as pb, hsm_service_server::HsmService, hsm_service_server::HsmServiceServer,
    import_request::Source, unwrap_result, wrap_result,
};
use tonic::{Code, Request, Response, Status, transport::Endpoint};

use crate::{
    authz::{AuthzPolicy, Caller},
    clock::SystemClock,
    error::ServiceError,
    grpc::{Edge, Refusals},
    hsm::HsmClient,
    service::{
        AddAwsKey, AuditPage, AwsSetupRequest, ContentContext, KeyOp, KeyService, KeyView,
        ServiceOptions,
    },
};

/// What the fake daemon holds under a handle.
#[derive(Clone, Debug)]
enum Held {
    /// Key material it generated (the generic default key).
    Generated,
    /// A reference to a key in AWS KMS.
    Aws { key_arn: String },
}

/// The fake daemon's state, shared with the test.
#[derive(Default)]
struct Daemon {
    keys: Mutex<HashMap<String, Held>>,
    /// AWS KMS's state of each key ARN that is not enabled.
    aws_states: Mutex<HashMap<String, pb::ProviderKeyState>>,
    /// AWS KMS out of reach: every call on an AWS key is UNAVAILABLE.
    aws_down: AtomicBool,
    imports: AtomicUsize,
    wraps: AtomicUsize,
    /// The org and the external id of every AWS key import, in order.
    aws_imports: Mutex<Vec<(String, String)>>,
}

#[derive(Clone)]
struct FakeHsm(Arc<Daemon>);

impl Daemon {
    fn set_aws_state(&self, key_arn: &str, state: Option<pb::ProviderKeyState>) {
        let mut states = self.aws_states.lock().unwrap();
        match state {
            Some(state) => states.insert(key_arn.to_owned(), state),
            None => states.remove(key_arn),
        };
    }

    fn aws_handles(&self) -> usize {
        let keys = self.keys.lock().unwrap();
        keys.values()
            .filter(|k| matches!(k, Held::Aws { .. }))
            .count()
    }

    /// As the daemon refuses a call on an AWS key AWS reports unusable.
    fn usable(&self, handle: &str) -> Result<(), Status> {
        let held = self.keys.lock().unwrap().get(handle).cloned();
        let Some(held) = held else {
            return Err(Status::not_found("no such key"));
        };
        let Held::Aws { key_arn } = held else {
            return Ok(());
        };
        if self.aws_down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("AWS KMS is out of reach"));
        }
        match self.aws_states.lock().unwrap().get(&key_arn) {
            None => Ok(()),
            Some(&state) => {
                let code = Code::FailedPrecondition;
                let message = format!("AWS KMS reports key {key_arn} as {}", state.as_str_name());
                let details =
                    cmk_proto::status_details::provider_key_unusable(code, &message, state);
                Err(Status::with_details(code, message, details))
            }
        }
    }

    fn wrap(&self, request: pb::WrapRequest) -> Result<Vec<u8>, Status> {
        self.wraps.fetch_add(1, Ordering::SeqCst);
        self.usable(&request.key_handle)?;
        Ok(format!(
            "{}.{}.{}",
            request.key_handle,
            hex::encode(&request.associated_data),
            hex::encode(&request.plaintext)
        )
        .into_bytes())
    }

    fn unwrap(&self, request: pb::UnwrapRequest) -> Result<pb::UnwrapResponse, Status> {
        let text = String::from_utf8(request.ciphertext)
            .map_err(|_| Status::invalid_argument("not a ciphertext"))?;
        let mut parts = text.split('.');
        let (Some(handle), Some(aad), Some(plaintext)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(Status::invalid_argument("not a ciphertext"));
        };
        self.usable(handle)?;
        if aad != hex::encode(&request.associated_data) {
            return Err(Status::invalid_argument("does not authenticate"));
        }
        Ok(pb::UnwrapResponse {
            plaintext: hex::decode(plaintext).unwrap(),
            key_handle: handle.to_owned(),
        })
    }
}

#[tonic::async_trait]
impl HsmService for FakeHsm {
    async fn get_import_public_key(
        &self,
        _: Request<pb::GetImportPublicKeyRequest>,
    ) -> Result<Response<pb::GetImportPublicKeyResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn get_audit_public_key(
        &self,
        _: Request<pb::GetAuditPublicKeyRequest>,
    ) -> Result<Response<pb::GetAuditPublicKeyResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn sign_checkpoint(
        &self,
        _: Request<pb::SignCheckpointRequest>,
    ) -> Result<Response<pb::SignCheckpointResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn import(
        &self,
        request: Request<pb::ImportRequest>,
    ) -> Result<Response<pb::ImportResponse>, Status> {
        let daemon = &self.0;
        daemon.imports.fetch_add(1, Ordering::SeqCst);
        let pb::ImportRequest {
            source,
            key_handle,
            org,
            ..
        } = request.into_inner();
        let (held, check_value, origin) = match source {
            Some(Source::Generate(_)) => (
                Held::Generated,
                "GEN0000000".to_owned(),
                pb::KeyOrigin::Generated,
            ),
            Some(Source::AwsKmsKey(pb::AwsKmsKey {
                key_arn,
                external_id,
                ..
            })) => {
                daemon
                    .aws_imports
                    .lock()
                    .unwrap()
                    .push((org.clone(), external_id));
                if !key_arn.starts_with("arn:aws:kms:") {
                    return Err(Status::invalid_argument(format!(
                        "key_arn {key_arn:?} is not a KMS key ARN"
                    )));
                }
                if key_arn.ends_with("/denied") {
                    return Err(Status::failed_precondition(
                        "AWS KMS refused DescribeKey: AccessDeniedException: not authorized",
                    ));
                }
                let digest =
                    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key_arn.as_bytes());
                let check_value = hex::encode_upper(&digest.as_ref()[..5]);
                (Held::Aws { key_arn }, check_value, pb::KeyOrigin::AwsKms)
            }
            _ => return Err(Status::unimplemented("not in this fake")),
        };
        daemon.keys.lock().unwrap().insert(key_handle.clone(), held);
        Ok(Response::new(pb::ImportResponse {
            key_handle,
            key_check_value: check_value,
            origin: origin as i32,
        }))
    }

    async fn wrap(
        &self,
        request: Request<pb::WrapRequest>,
    ) -> Result<Response<pb::WrapResponse>, Status> {
        let ciphertext = self.0.wrap(request.into_inner())?;
        Ok(Response::new(pb::WrapResponse { ciphertext }))
    }

    async fn unwrap(
        &self,
        request: Request<pb::UnwrapRequest>,
    ) -> Result<Response<pb::UnwrapResponse>, Status> {
        Ok(Response::new(self.0.unwrap(request.into_inner())?))
    }

    async fn batch_wrap(
        &self,
        request: Request<pb::BatchWrapRequest>,
    ) -> Result<Response<pb::BatchWrapResponse>, Status> {
        let results = request
            .into_inner()
            .items
            .into_iter()
            .map(|item| pb::WrapResult {
                result: Some(match self.0.wrap(item) {
                    Ok(ciphertext) => wrap_result::Result::Ciphertext(ciphertext),
                    Err(status) => wrap_result::Result::Error(item_error(status)),
                }),
            })
            .collect();
        Ok(Response::new(pb::BatchWrapResponse { results }))
    }

    async fn batch_unwrap(
        &self,
        request: Request<pb::BatchUnwrapRequest>,
    ) -> Result<Response<pb::BatchUnwrapResponse>, Status> {
        let results = request
            .into_inner()
            .items
            .into_iter()
            .map(|item| pb::UnwrapResult {
                result: Some(match self.0.unwrap(item) {
                    Ok(out) => unwrap_result::Result::Ok(out),
                    Err(status) => unwrap_result::Result::Error(item_error(status)),
                }),
            })
            .collect();
        Ok(Response::new(pb::BatchUnwrapResponse { results }))
    }

    async fn destroy(
        &self,
        request: Request<pb::DestroyRequest>,
    ) -> Result<Response<pb::DestroyResponse>, Status> {
        let handle = request.into_inner().key_handle;
        let removed = self.0.keys.lock().unwrap().remove(&handle);
        Ok(Response::new(pb::DestroyResponse {
            already_destroyed: removed.is_none(),
        }))
    }
}

fn item_error(status: Status) -> pb::ItemError {
    pb::ItemError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

/// A service over a fresh SQLite store and the fake daemon, and an admin of
/// org `acme` with BYOK on.
struct Setup {
    service: Arc<KeyService>,
    daemon: Arc<Daemon>,
    admin: Caller,
    _dir: tempfile::TempDir,
}

/// The HSM daemon's AWS principal in these tests.
const PRINCIPAL: &str = "arn:aws:iam::999988887777:role/cmk-hsm-daemon";

async fn setup() -> Setup {
    setup_with(Some(PRINCIPAL)).await
}

async fn setup_with(principal: Option<&str>) -> Setup {
    let daemon = Arc::new(Daemon::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HsmServiceServer::new(FakeHsm(daemon.clone())))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(dir.path().join("m.db").to_str().unwrap())
            .await
            .unwrap(),
    );
    let service = Arc::new(
        KeyService::new(
            store,
            HsmClient::over(channel),
            Arc::new(SystemClock),
            Policy::default(),
            ServiceOptions::default(),
        )
        .with_aws_principal(principal.map(str::to_owned)),
    );
    let admin = Caller::for_tests("admin", &OrgId::parse("acme").unwrap());
    service.set_byok(&admin, true).await.unwrap();
    Setup {
        service,
        daemon,
        admin,
        _dir: dir,
    }
}

fn arn(name: &str) -> String {
    format!("arn:aws:kms:eu-west-1:111122223333:key/{name}")
}

fn resource(name: &str) -> ResourceId {
    ResourceId::parse(name).unwrap()
}

fn aws_key(key_arn: String, backup_key_arn: String, role_arn: String) -> AddAwsKey {
    AddAwsKey::new(key_arn, backup_key_arn, role_arn, false).unwrap()
}

impl Setup {
    async fn add(&self, name: &str, activate_now: bool) -> Result<KeyView, ServiceError> {
        let key = AddAwsKey::new(arn(name), String::new(), String::new(), activate_now)?;
        self.service.add_aws_key(&self.admin, key).await
    }

    async fn state_of(&self, view: &KeyView) -> KeyState {
        let id = &view.key.record.id;
        self.service
            .get(&self.admin, id)
            .await
            .unwrap()
            .key
            .record
            .state
    }

    async fn audit_actions(&self) -> Vec<String> {
        self.service
            .audit_events(&self.admin, AuditPage::new(0, 1000))
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event.action)
            .collect()
    }

    /// How many provider changes the audit log records.
    async fn provider_events(&self) -> usize {
        self.audit_actions()
            .await
            .iter()
            .filter(|a| a.starts_with("aws kms reports"))
            .count()
    }

    /// A new KEK of `resource` and a content key under it, opened again.
    async fn content_round_trip(&self, resource: &str) -> Result<(), ServiceError> {
        let kek = self
            .service
            .create_kek(&self.admin, &ResourceId::parse(resource).unwrap())
            .await?;
        self.decrypt_under(kek.id.as_str()).await
    }

    async fn decrypt_under(&self, kek: &str) -> Result<(), ServiceError> {
        let kek = KekId::parse(kek).unwrap();
        let context = ContentContext::new(b"ctx".to_vec()).unwrap();
        let data = self
            .service
            .generate_data_key(&self.admin, &kek, &context)
            .await?;
        let (plaintext, _) = self
            .service
            .decrypt(&self.admin, &data.wrapped, &context)
            .await?;
        assert_eq!(plaintext.expose(), data.plaintext.expose());
        Ok(())
    }
}

#[tokio::test]
async fn arns_are_bounded_before_anything_reaches_the_hsm() {
    let s = setup().await;
    let edge = Edge::new(
        s.service.clone(),
        Arc::new(AuthzPolicy::default()),
        Refusals::Audited,
    );
    let imports = s.daemon.imports.load(Ordering::SeqCst);
    let long = format!("{}{}", arn(""), "k".repeat(2049 - arn("").len()));
    for (key_arn, backup, role, why) in [
        (
            String::new(),
            String::new(),
            String::new(),
            "the key ARN is empty",
        ),
        (
            long.clone(),
            String::new(),
            String::new(),
            "key_arn is 2049 bytes",
        ),
        (
            arn("a"),
            long.clone(),
            String::new(),
            "backup_key_arn is 2049 bytes",
        ),
        (
            arn("a"),
            String::new(),
            long.clone(),
            "role_arn is 2049 bytes",
        ),
    ] {
        // Bounded at the edge, as every RPC's request is read.
        let request = cmk_proto::control::v1::AddAwsKeyRequest {
            org_id: "acme".into(),
            key_arn,
            backup_key_arn: backup,
            role_arn: role,
            activate_now: false,
        };
        let err = edge
            .typed::<_, AddAwsKey>(&s.admin, "add aws key", request)
            .await
            .unwrap_err();
        let status = err.to_status();
        assert_eq!(status.code(), Code::InvalidArgument, "{why}: {status:?}");
        assert!(status.message().contains(why), "{status:?}");
    }
    assert_eq!(s.daemon.imports.load(Ordering::SeqCst), imports);
    let refused = s.audit_actions().await;
    assert_eq!(
        refused.iter().filter(|a| *a == "add aws key").count(),
        4,
        "each refusal is audited: {refused:?}"
    );
}

/// An org cannot make the service use another org's key in AWS KMS: the
/// second registration is refused and nothing of it is kept.
#[tokio::test]
async fn a_key_arn_of_another_org_is_refused() {
    let s = setup().await;
    s.add("a", true).await.unwrap();
    let held = s.daemon.aws_handles();
    let globex = Caller::for_tests("admin", &OrgId::parse("globex").unwrap());
    s.service.set_byok(&globex, true).await.unwrap();
    let key = AddAwsKey::new(arn("a"), String::new(), String::new(), true).unwrap();
    let refused = s
        .service
        .add_aws_key(&globex, key)
        .await
        .unwrap_err()
        .to_status();
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("registered by another organisation"),
        "{refused:?}"
    );
    assert!(
        !refused.message().contains("acme"),
        "the owner is not named"
    );
    assert_eq!(s.daemon.aws_handles(), held, "its reference was discarded");
    assert!(s.service.store.open_intents().await.unwrap().is_empty());
    let listed = s.service.list(&globex).await.unwrap();
    assert!(listed.keys.iter().all(|k| k.aws.is_none()), "{listed:?}");
}

#[tokio::test]
async fn the_daemons_refusal_reaches_the_admin_and_nothing_is_kept() {
    let s = setup().await;
    let refused = s.add("denied", false).await.unwrap_err().to_status();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("AccessDeniedException"),
        "AWS's reason intact: {refused:?}"
    );
    let malformed = s
        .service
        .add_aws_key(
            &s.admin,
            aws_key("alias/mine".into(), String::new(), String::new()),
        )
        .await
        .unwrap_err()
        .to_status();
    assert_eq!(malformed.code(), Code::InvalidArgument, "{malformed:?}");
    assert!(
        malformed.message().contains("not a KMS key ARN"),
        "{malformed:?}"
    );
    assert_eq!(s.daemon.aws_handles(), 0);
    assert!(s.service.store.open_intents().await.unwrap().is_empty());
    let listed = s.service.list(&s.admin).await.unwrap();
    assert!(listed.keys.iter().all(|k| k.aws.is_none()), "{listed:?}");

    s.service.set_byok(&s.admin, false).await.unwrap();
    let off = s.add("a", false).await.unwrap_err();
    assert!(
        matches!(
            off,
            ServiceError::Lifecycle(cmk_control_plane_domain::LifecycleError::ByokOff)
        ),
        "{off:?}"
    );
    assert_eq!(s.daemon.aws_handles(), 0);
}

#[tokio::test]
async fn an_added_key_shows_its_arns_beside_the_active_key_and_is_added_once() {
    let s = setup().await;
    let added = s
        .service
        .add_aws_key(
            &s.admin,
            aws_key(
                arn("a"),
                arn("a-backup"),
                "arn:aws:iam::111122223333:role/cmk".into(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(added.key.record.state, KeyState::Pending);
    let aws = added.key.aws.clone().expect("ARNs");
    assert_eq!(aws.key_arn, arn("a"));
    assert_eq!(aws.backup_key_arn, Some(arn("a-backup")));
    assert_eq!(
        aws.role_arn.as_deref(),
        Some("arn:aws:iam::111122223333:role/cmk")
    );
    let active = added.active.expect("the generic default key is active");
    assert_eq!(active.aws, None);
    assert_eq!(
        s.add("a", true).await.unwrap_err().to_status().code(),
        Code::AlreadyExists
    );
    assert_eq!(
        s.daemon.aws_handles(),
        1,
        "the second reference was discarded"
    );
    assert!(
        s.audit_actions().await.contains(&"add aws key".to_owned()),
        "audited"
    );

    let activated = s
        .service
        .change(&s.admin, KeyOp::Activate, &added.key.record.id)
        .await
        .unwrap();
    assert_eq!(activated.key.record.state, KeyState::Active);
    s.content_round_trip("space:1").await.unwrap();
}

#[tokio::test]
async fn a_disabled_master_blocks_content_at_once_and_works_again_once_enabled() {
    let s = setup().await;
    let a = s.add("a", true).await.unwrap();
    let kek = s
        .service
        .create_kek(&s.admin, &resource("space:1"))
        .await
        .unwrap();
    s.decrypt_under(kek.id.as_str()).await.unwrap();
    assert!(!s.service.kek_cache.is_empty());

    // Nothing changes while AWS cannot be asked.
    s.daemon.aws_down.store(true, Ordering::SeqCst);
    s.daemon
        .set_aws_state(&arn("a"), Some(pb::ProviderKeyState::Disabled));
    s.service.check_providers().await.unwrap();
    assert_eq!(s.state_of(&a).await, KeyState::Active);
    assert_eq!(s.provider_events().await, 0);

    s.daemon.aws_down.store(false, Ordering::SeqCst);
    s.service.check_providers().await.unwrap();
    assert_eq!(
        s.state_of(&a).await,
        KeyState::RevokedByProvider { was: Place::Active }
    );
    assert!(s.service.kek_cache.is_empty(), "the org's KEKs are dropped");
    let actions = s.audit_actions().await;
    assert!(
        actions.contains(&"aws kms reports the key disabled".to_owned()),
        "{actions:?}"
    );
    assert!(
        actions.contains(&"state active → revoked by provider".to_owned()),
        "{actions:?}"
    );
    let blocked = s
        .decrypt_under(kek.id.as_str())
        .await
        .unwrap_err()
        .to_status();
    assert_eq!(blocked.code(), Code::FailedPrecondition);
    assert!(
        blocked
            .message()
            .contains("is revoked by its provider (disabled or pending deletion in AWS KMS)"),
        "{blocked:?}"
    );
    let no_kek = s
        .service
        .create_kek(&s.admin, &resource("space:2"))
        .await
        .unwrap_err();
    assert_eq!(no_kek.to_status().code(), Code::FailedPrecondition);

    // It holds the active place: a new key cannot take it.
    let b = s.add("b", false).await.unwrap();
    let refused = s
        .service
        .change(&s.admin, KeyOp::Activate, &b.key.record.id)
        .await
        .unwrap_err()
        .to_status();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("enable it there again"),
        "{refused:?}"
    );

    // Checked again while still disabled: nothing new.
    s.service.check_providers().await.unwrap();
    assert_eq!(s.provider_events().await, 1);

    s.daemon.set_aws_state(&arn("a"), None);
    s.service.check_providers().await.unwrap();
    assert_eq!(s.state_of(&a).await, KeyState::Active);
    assert!(
        s.audit_actions()
            .await
            .contains(&"aws kms reports the key enabled".to_owned())
    );
    s.decrypt_under(kek.id.as_str()).await.unwrap();
    s.content_round_trip("space:3").await.unwrap();
}

#[tokio::test]
async fn keks_of_a_disabled_rotating_key_are_refused_by_name_and_wait_for_it() {
    let s = setup().await;
    let a = s.add("a", true).await.unwrap();
    let kek = s
        .service
        .create_kek(&s.admin, &resource("space:1"))
        .await
        .unwrap();
    let b = s.add("b", true).await.unwrap();
    assert_eq!(s.state_of(&a).await, KeyState::Rotating);

    s.daemon
        .set_aws_state(&arn("a"), Some(pb::ProviderKeyState::PendingDeletion));
    s.service.check_providers().await.unwrap();
    assert_eq!(
        s.state_of(&a).await,
        KeyState::RevokedByProvider {
            was: Place::Rotating
        }
    );
    assert!(
        s.audit_actions()
            .await
            .contains(&"aws kms reports the key pending deletion".to_owned())
    );
    let refused = s
        .decrypt_under(kek.id.as_str())
        .await
        .unwrap_err()
        .to_status();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().starts_with(&format!(
            "key {} is disabled or scheduled for deletion in AWS KMS",
            a.key.record.id
        )),
        "{refused:?}"
    );
    // New KEKs go to the working master meanwhile.
    s.content_round_trip("space:2").await.unwrap();

    // The job re-wraps nothing of the disabled key, and does not end.
    s.service.run_rotations().await.unwrap();
    let job = s.service.rotation(&s.admin).await.unwrap();
    assert!(job.paused, "{job:?}");
    assert_eq!(job.job.done, 0);
    assert_eq!(
        s.state_of(&a).await,
        KeyState::RevokedByProvider {
            was: Place::Rotating
        }
    );

    s.daemon.set_aws_state(&arn("a"), None);
    s.service.check_providers().await.unwrap();
    assert_eq!(s.state_of(&a).await, KeyState::Rotating);
    s.service.run_rotations().await.unwrap();
    let job = s.service.rotation(&s.admin).await.unwrap();
    assert!(!job.paused, "{job:?}");
    assert_eq!(
        job.job.state,
        cmk_control_plane_store::JobState::Finished,
        "{job:?}"
    );
    let listed = s.service.list(&s.admin).await.unwrap();
    assert!(
        listed.keys.iter().all(|k| k.record.id != a.key.record.id),
        "a rotated-off AWS key leaves the list: {listed:?}"
    );
    assert_eq!(s.daemon.aws_handles(), 1, "and the daemon forgets it");
    assert_eq!(s.state_of(&b).await, KeyState::Active);
    s.decrypt_under(kek.id.as_str()).await.unwrap();
}

#[tokio::test]
async fn a_disabled_pending_key_holds_its_place_until_cancelled() {
    let s = setup().await;
    let a = s.add("a", false).await.unwrap();
    s.daemon
        .set_aws_state(&arn("a"), Some(pb::ProviderKeyState::Disabled));
    s.service.check_providers().await.unwrap();
    assert_eq!(
        s.state_of(&a).await,
        KeyState::RevokedByProvider {
            was: Place::Pending
        }
    );
    let refused = s.add("b", false).await.unwrap_err().to_status();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("or cancel it"), "{refused:?}");
    assert_eq!(s.daemon.aws_handles(), 1, "b's reference was discarded");
    // The master is not an AWS key: content keys work throughout.
    s.content_round_trip("space:1").await.unwrap();

    s.service
        .change(&s.admin, KeyOp::Cancel, &a.key.record.id)
        .await
        .unwrap();
    assert_eq!(s.daemon.aws_handles(), 0, "the daemon forgets it");
    s.add("b", false).await.unwrap();
}

#[tokio::test]
async fn keys_revoked_by_the_admin_are_not_asked_about() {
    let s = setup().await;
    let a = s.add("a", true).await.unwrap();
    s.service
        .change(&s.admin, KeyOp::Revoke, &a.key.record.id)
        .await
        .unwrap();
    s.daemon
        .set_aws_state(&arn("a"), Some(pb::ProviderKeyState::Disabled));
    let wraps = s.daemon.wraps.load(Ordering::SeqCst);
    s.service.check_providers().await.unwrap();
    assert_eq!(s.daemon.wraps.load(Ordering::SeqCst), wraps);
    assert_eq!(s.state_of(&a).await, KeyState::Revoked);
}

#[tokio::test]
async fn unavailable_says_what_the_daemon_cannot_reach_but_not_how_a_connection_failed() {
    let s = setup().await;
    s.add("a", true).await.unwrap();
    s.daemon.aws_down.store(true, Ordering::SeqCst);
    let status = s
        .service
        .create_kek(&s.admin, &resource("space:1"))
        .await
        .unwrap_err()
        .to_status();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        status.message(),
        "the HSM daemon cannot complete the call: AWS KMS is out of reach; retry later"
    );

    // Nothing listens on port 9 of this host.
    let nowhere = HsmClient::over(Endpoint::from_static("http://127.0.0.1:9").connect_lazy());
    let err = nowhere
        .wrap(
            &OrgId::parse("acme").unwrap(),
            &"0".repeat(32),
            &crate::envelope::new_content_key(),
            b"",
        )
        .await
        .unwrap_err();
    let status = ServiceError::from(err).to_status();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        status.message(),
        "the HSM daemon is unavailable; retry later"
    );
}

/// Every org's roles are assumed with the org's own external id: random,
/// the same for every key of the org and in its AWS setup, another for
/// another org, and none sent for a key without a role.
#[tokio::test]
async fn each_org_assumes_its_roles_with_its_own_external_id() {
    let s = setup().await;
    let role = "arn:aws:iam::111122223333:role/cmk-keys".to_owned();
    s.service
        .add_aws_key(
            &s.admin,
            AddAwsKey::new(arn("a"), String::new(), role.clone(), true).unwrap(),
        )
        .await
        .unwrap();
    s.service
        .add_aws_key(
            &s.admin,
            AddAwsKey::new(arn("b"), String::new(), role.clone(), true).unwrap(),
        )
        .await
        .unwrap();
    s.service
        .add_aws_key(
            &s.admin,
            AddAwsKey::new(arn("c"), String::new(), String::new(), true).unwrap(),
        )
        .await
        .unwrap();
    let globex = Caller::for_tests("admin", &OrgId::parse("globex").unwrap());
    s.service.set_byok(&globex, true).await.unwrap();
    s.service
        .add_aws_key(
            &globex,
            AddAwsKey::new(arn("g"), String::new(), role.clone(), true).unwrap(),
        )
        .await
        .unwrap();

    let imports = s.daemon.aws_imports.lock().unwrap().clone();
    let orgs: Vec<&str> = imports.iter().map(|(org, _)| org.as_str()).collect();
    assert_eq!(orgs, ["acme", "acme", "acme", "globex"]);
    let acme_id = &imports[0].1;
    assert!(
        acme_id.starts_with("cmk-") && acme_id.len() == 36,
        "{acme_id:?}"
    );
    assert_eq!(&imports[1].1, acme_id, "stable for the org");
    assert_eq!(imports[2].1, "", "no role, no external id");
    assert_ne!(&imports[3].1, acme_id, "each org has its own");

    let setup = s
        .service
        .aws_setup(&s.admin, AwsSetupRequest::new(vec![arn("next")]).unwrap())
        .await
        .unwrap();
    assert_eq!(&setup.external_id, acme_id);
    assert_eq!(setup.service_principal_arn, PRINCIPAL);
    assert_eq!(setup.key_arns, [arn("a"), arn("b"), arn("c"), arn("next")]);
    assert!(setup.trust_policy_json.contains(acme_id.as_str()));
    assert!(
        setup
            .permissions_policy_json
            .contains(r#""kms:EncryptionContext:cmk:org": "acme""#)
    );
    let globex_setup = s
        .service
        .aws_setup(&globex, AwsSetupRequest::default())
        .await
        .unwrap();
    assert_eq!(globex_setup.external_id, imports[3].1);
    assert_eq!(globex_setup.key_arns, [arn("g")]);

    // An org with no AWS key names the keys it is about to add.
    let initech = Caller::for_tests("admin", &OrgId::parse("initech").unwrap());
    let empty = s
        .service
        .aws_setup(&initech, AwsSetupRequest::default())
        .await
        .unwrap_err()
        .to_status();
    assert_eq!(empty.code(), Code::InvalidArgument, "{empty:?}");
}

/// Without the daemon's principal configured there is no trust policy to
/// give: the admin is told what is missing.
#[tokio::test]
async fn aws_setup_needs_the_daemons_principal() {
    let s = setup_with(None).await;
    let status = s
        .service
        .aws_setup(&s.admin, AwsSetupRequest::new(vec![arn("a")]).unwrap())
        .await
        .unwrap_err()
        .to_status();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("aws_principal_arn"), "{status:?}");
}
