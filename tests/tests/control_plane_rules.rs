//! End-to-end: what the admin API refuses, over real mutual TLS. Every illegal
//! lifecycle transition, every kind of bad wrapped key, and every identity ×
//! RPC × organisation of the authorisation policy; each refusal must carry the
//! right code and say why, change nothing stored (the listing, the HSM
//! keystore), and be in the organisation's audit log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use cmk_control_plane_store::{IntentStore, SqliteStore};
use cmk_proto::control::v1::{
    self as pb, KeySource, KeyState, key_admin_service_client::KeyAdminServiceClient,
};
use cmk_tests::{
    CONTROL_PLANE, INTRUDER,
    control_plane::{
        ADMIN_ACME, ADMIN_GLOBEX, Content, Deployment, READER_ACME, SERVICE_ACME, SERVICE_GLOBEX,
        files, openssl, state_of, wrap, wrap_new_key,
    },
};
use tonic::{Code, Status, transport::Channel};

type Client = KeyAdminServiceClient<Channel>;

const ACME: &str = "acme";
const GLOBEX: &str = "globex";
/// A well-formed key id that no organisation has.
const NO_SUCH_KEY: &str = "key-0000000000000000";
/// A well-formed KEK id that no organisation has.
const NO_SUCH_KEK: &str = "kek-00000000000000000000000000000000";

/// Pending, active, rotating → deactivated, revoked, deleted and removed keys,
/// and BYOK off: every action a state does not allow is refused with
/// FAILED_PRECONDITION and what the state does allow, changes nothing and is
/// audited; unknown, malformed and duplicate input gets its own code.
#[tokio::test(flavor = "multi_thread")]
async fn every_illegal_transition_is_failed_precondition_and_changes_nothing() {
    use Rpc as R;
    const PRECONDITION: Code = Code::FailedPrecondition;

    let d = Deployment::start().await;
    let work = tempfile::tempdir().unwrap();
    let mut admin = Observer::new(&d, "admin-acme", ACME).await;

    // BYOK off: acme shows the generic default key. A read does not enrol
    // it (nor would a refusal); a write does, here turning BYOK off, which
    // it already is.
    let first = admin.keys().await;
    assert!(!first.byok_enabled);
    cmk_tests::control_plane::set_byok(&mut admin.client, ACME, false).await;
    assert_eq!(admin.keys().await.active_key_id, first.active_key_id);
    let generic = first.active_key_id.clone();
    assert_eq!(first.keys[0].source(), KeySource::GenericDefault);
    refused(
        &mut admin,
        R::RevokeKey(generic.clone()),
        PRECONDITION,
        "which an organisation cannot revoke; activate your own key first",
    )
    .await;
    public_key(&mut admin, work.path()).await;
    let k1_material = wrap_new_key(work.path(), "k1");
    let k2_material = wrap_new_key(work.path(), "k2");
    let k3_material = wrap_new_key(work.path(), "k3");
    for rpc in [Rpc::upload(&k1_material), R::ActivateKey(generic.clone())] {
        refused(
            &mut admin,
            rpc,
            PRECONDITION,
            "bring-your-own-key is switched off for this organisation",
        )
        .await;
    }

    set_byok(&mut admin, true).await;
    refused(
        &mut admin,
        R::ActivateKey(generic.clone()),
        PRECONDITION,
        "the generic default key is replaced by activating a key of your own",
    )
    .await;

    // Unknown and malformed ids (while the master can be activated: with a
    // revoked master, activation is refused before the key is looked up).
    for rpc in [
        R::GetKey(NO_SUCH_KEY.into()),
        R::ActivateKey(NO_SUCH_KEY.into()),
        R::RevokeKey(NO_SUCH_KEY.into()),
        R::RestoreKey(NO_SUCH_KEY.into()),
    ] {
        refused(
            &mut admin,
            rpc,
            Code::NotFound,
            &format!("the organisation has no key {NO_SUCH_KEY}"),
        )
        .await;
    }
    for rpc in [R::GetKey("bad id!".into()), R::DeleteKey("bad id!".into())] {
        rejected(
            &mut admin,
            ACME,
            rpc,
            Code::InvalidArgument,
            "key_id: key id may contain only letters, digits",
        )
        .await;
    }
    for rpc in [R::ListKeys, R::RestoreKey(generic.clone())] {
        rejected(
            &mut admin,
            "bad org!",
            rpc,
            Code::InvalidArgument,
            "org_id: organisation id may contain only letters, digits",
        )
        .await;
    }

    // Pending.
    let k1 = upload(&mut admin, &k1_material, false).await;
    assert_eq!(k1.state(), KeyState::Pending);
    let k1 = k1.key_id;
    for rpc in [
        R::RevokeKey(k1.clone()),
        R::ReactivateKey(k1.clone()),
        R::DeleteKey(k1.clone()),
        R::RestoreKey(k1.clone()),
    ] {
        refused(
            &mut admin,
            rpc,
            PRECONDITION,
            "a pending key can be activated or cancelled",
        )
        .await;
    }
    refused(
        &mut admin,
        Rpc::upload(&k2_material),
        PRECONDITION,
        &format!("key {k1} is already pending: activate or cancel it before adding another"),
    )
    .await;
    refused(
        &mut admin,
        Rpc::upload(&k1_material),
        Code::AlreadyExists,
        &format!("this key material is already key {k1} (pending)"),
    )
    .await;

    // Active; the generic default key rotates off and is removed.
    change(&mut admin, R::ActivateKey(k1.clone())).await;
    assert_eq!(admin.keys().await.active_key_id, k1);
    for rpc in [
        R::ActivateKey(k1.clone()),
        R::CancelKey(k1.clone()),
        R::ReactivateKey(k1.clone()),
        R::DeleteKey(k1.clone()),
        R::RestoreKey(k1.clone()),
    ] {
        refused(
            &mut admin,
            rpc,
            PRECONDITION,
            "an active key can be revoked, or replaced by activating a pending key",
        )
        .await;
    }
    refused(
        &mut admin,
        R::RevokeKey(generic.clone()),
        PRECONDITION,
        "a removed key is gone",
    )
    .await;

    // Rotating, and at once deactivated (no KEK to re-wrap).
    let k2 = upload(&mut admin, &k2_material, true).await;
    assert_eq!(k2.state(), KeyState::Active);
    let k2 = k2.key_id;
    assert_eq!(
        state_of(&admin.keys().await, &k1),
        Some(KeyState::Deactivated)
    );
    for rpc in [
        R::ActivateKey(k1.clone()),
        R::CancelKey(k1.clone()),
        R::RevokeKey(k1.clone()),
        R::ReactivateKey(k1.clone()),
        R::DeleteKey(k1.clone()),
        R::RestoreKey(k1.clone()),
    ] {
        refused(
            &mut admin,
            rpc,
            PRECONDITION,
            "a deactivated key is removed when its retention ends",
        )
        .await;
    }
    refused(
        &mut admin,
        Rpc::upload(&k1_material),
        Code::AlreadyExists,
        &format!("this key material is already key {k1} (deactivated)"),
    )
    .await;

    // Revoked.
    change(&mut admin, R::RevokeKey(k2.clone())).await;
    for rpc in [
        R::RevokeKey(k2.clone()),
        R::CancelKey(k2.clone()),
        R::RestoreKey(k2.clone()),
    ] {
        refused(
            &mut admin,
            rpc,
            PRECONDITION,
            "a revoked key can be reactivated or deleted",
        )
        .await;
    }
    let master_revoked =
        format!("master key {k2} is revoked: reactivate it first, then rotate to a new key");
    refused(
        &mut admin,
        R::ActivateKey(k2.clone()),
        PRECONDITION,
        &master_revoked,
    )
    .await;
    refused(&mut admin, R::SetByok(false), PRECONDITION, &master_revoked).await;
    // A new key may be uploaded while the master is revoked, not activated.
    let k3 = upload(&mut admin, &k3_material, false).await.key_id;
    refused(
        &mut admin,
        R::ActivateKey(k3.clone()),
        PRECONDITION,
        &master_revoked,
    )
    .await;

    // Deleted.
    let deleted = change(&mut admin, R::DeleteKey(k2.clone())).await;
    let restorable_until = deleted.expires_at.unwrap().seconds;
    for rpc in [
        R::RevokeKey(k2.clone()),
        R::ReactivateKey(k2.clone()),
        R::DeleteKey(k2.clone()),
        R::CancelKey(k2.clone()),
    ] {
        refused(
            &mut admin,
            rpc,
            PRECONDITION,
            &format!(
                "a deleted key can be restored until {}",
                cmk_control_plane_domain::Timestamp(restorable_until)
            ),
        )
        .await;
    }
    for rpc in [R::ActivateKey(k2.clone()), R::ActivateKey(k3.clone())] {
        refused(
            &mut admin,
            rpc,
            PRECONDITION,
            &format!("master key {k2} is deleted: restore and reactivate it first"),
        )
        .await;
    }

    // Nothing above broke anything: the legal way out still works.
    change(&mut admin, R::RestoreKey(k2.clone())).await;
    change(&mut admin, R::ReactivateKey(k2.clone())).await;
    change(&mut admin, R::ActivateKey(k3.clone())).await;
    let last = admin.keys().await;
    assert_eq!(last.active_key_id, k3);
    assert_eq!(state_of(&last, &k2), Some(KeyState::Deactivated));
    assert_intact(&mut admin).await;
}

/// Key material the HSM cannot accept, and oversized or empty uploads: the
/// admin gets INVALID_ARGUMENT with the reason, and neither the listing nor the
/// HSM keystore nor the control plane's custody intents change.
#[tokio::test(flavor = "multi_thread")]
async fn bad_wrapped_keys_reach_the_admin_as_invalid_argument_and_store_nothing() {
    let d = Deployment::start().await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let mut admin = Observer::new(&d, "admin-acme", ACME).await;
    set_byok(&mut admin, true).await;
    let public = public_key(&mut admin, dir).await;
    assert_eq!(public.modulus_bits, 3072);

    let short = wrap(dir, "short", 31, "pub.pem", "sha256");
    let sha1 = wrap(dir, "sha1", 32, "pub.pem", "sha1");
    openssl(dir, &["rand", "-out", "garbage.bin", "384"]);
    let garbage = std::fs::read(dir.join("garbage.bin")).unwrap();
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:3072",
            "-out",
            "other.key",
        ],
    );
    openssl(
        dir,
        &["pkey", "-in", "other.key", "-pubout", "-out", "other.pem"],
    );
    let foreign = wrap(dir, "foreign", 32, "other.pem", "sha256");
    let good = wrap_new_key(dir, "good");
    let stale_id = "0".repeat(public.key_id.len());
    assert_ne!(stale_id, public.key_id);

    let keystore = d.hsm.store.path();
    let files_before = files(keystore);
    let hsm_refused = "the HSM refused the key: ";
    let cases: [(&str, Vec<u8>, &str, Vec<String>); 8] = [
        (
            "31 key bytes",
            short,
            "",
            vec![
                format!("{hsm_refused}unwrapped key is 31 bytes"),
                "must be exactly 32 bytes (AES-256)".into(),
            ],
        ),
        (
            "OAEP with SHA-1",
            sha1,
            "",
            vec![format!(
                "{hsm_refused}wrapped key uses RSA-OAEP with SHA-1; use SHA-256 with MGF1-SHA-256"
            )],
        ),
        (
            "384 random bytes",
            garbage,
            "",
            vec![format!(
                "{hsm_refused}wrapped key is not an RSA-OAEP (SHA-256, MGF1-SHA-256) ciphertext \
                 for import key {}",
                public.key_id
            )],
        ),
        (
            "wrapped for another RSA-3072 key",
            foreign,
            "",
            vec![
                format!("{hsm_refused}wrapped key is not an RSA-OAEP"),
                "encrypted under another public key".into(),
            ],
        ),
        ("empty", Vec::new(), "", vec!["wrapped_key is empty".into()]),
        (
            "2000 bytes",
            vec![0x5a; 2000],
            "",
            vec!["wrapped_key is 2000 bytes, over the limit of 1024".into()],
        ),
        (
            "a malformed import key id (never echoed)",
            good.clone(),
            "../x",
            vec![
                "import_key_id must be empty or the 64 hexadecimal characters of the import \
                  key's id, as GetImportPublicKey returns it"
                    .into(),
            ],
        ),
        (
            "a good key with another import key id",
            good.clone(),
            &stale_id,
            vec![format!(
                "{hsm_refused}wrapped key was made for import key {stale_id}, but this service's \
                 import key is {}",
                public.key_id
            )],
        ),
    ];
    for (what, wrapped_key, import_key_id, says) in cases {
        let rpc = Rpc::UploadKey {
            wrapped_key,
            import_key_id: import_key_id.into(),
            activate_now: true,
        };
        // The HSM's refusals pass through the service, which audits them; the
        // size checks are the adapter's, before the service.
        let status = if says[0].starts_with(hsm_refused) {
            refused(&mut admin, rpc, Code::InvalidArgument, &says[0]).await
        } else {
            rejected(&mut admin, ACME, rpc, Code::InvalidArgument, &says[0]).await
        };
        for fragment in &says[1..] {
            assert!(
                status.message().contains(fragment.as_str()),
                "{what}: {status:?}"
            );
        }
        assert!(!status.message().contains("../x"), "{what}: {status:?}");
        assert_eq!(
            files(keystore),
            files_before,
            "{what}: the HSM keystore changed"
        );
    }
    let store = SqliteStore::open(&d.database().display().to_string())
        .await
        .unwrap();
    assert_eq!(
        store.open_intents().await.unwrap(),
        Vec::new(),
        "every refused import's intent is resolved"
    );
    store.close().await;

    // The "good" key was good: with the right import key id it is taken, as
    // one new key file.
    let taken = d
        .client("admin-acme")
        .await
        .upload_key(pb::UploadKeyRequest {
            org_id: ACME.into(),
            wrapped_key: good,
            activate_now: false,
            import_key_id: public.key_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(taken.state(), KeyState::Pending);
    let added: Vec<PathBuf> = files(keystore).difference(&files_before).cloned().collect();
    assert_eq!(added.len(), 1, "{added:?}");
    assert!(
        added[0].starts_with("keys") && added[0].extension().is_some_and(|e| e == "key"),
        "{added:?}"
    );
    assert_intact(&mut admin).await;
}

/// An identity's role in an organisation, as the test policy grants it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    None,
    ReadOnly,
    Admin,
    Service,
}

/// What an RPC needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Needs {
    Read,
    Manage,
    UseKeys,
}

impl Needs {
    fn granted_to(self, role: Role) -> bool {
        matches!(
            (self, role),
            (Self::Read, Role::Admin | Role::ReadOnly)
                | (Self::Manage, Role::Admin)
                | (Self::UseKeys, Role::Service)
        )
    }

    /// The roles a refusal names.
    fn roles(self) -> &'static str {
        match self {
            Self::Read => "the admin or read-only role",
            Self::Manage => "the admin role",
            Self::UseKeys => "the internal-service role",
        }
    }
}

/// One call of either control-plane API.
#[derive(Clone)]
enum Call {
    Admin(Rpc),
    Content(ContentRpc),
}

impl Call {
    /// `Service/Method`, as the descriptors name it.
    fn method(&self) -> String {
        match self {
            Self::Admin(rpc) => format!("KeyAdminService/{}", rpc.method()),
            Self::Content(rpc) => format!("ContentKeyService/{}", rpc.method()),
        }
    }

    fn action(&self) -> &'static str {
        match self {
            Self::Admin(rpc) => rpc.action(),
            Self::Content(rpc) => rpc.action(),
        }
    }

    fn key_id(&self) -> &str {
        match self {
            Self::Admin(rpc) => rpc.key_id(),
            Self::Content(_) => "",
        }
    }

    async fn call(
        &self,
        admin: &mut Client,
        content: &mut Content,
        org: &str,
    ) -> Result<(), Status> {
        match self {
            Self::Admin(rpc) => rpc.call(admin, org).await,
            Self::Content(rpc) => rpc.call(content, org).await,
        }
    }
}

/// One content-key API call with harmless arguments.
#[derive(Clone, Copy)]
enum ContentRpc {
    CreateKek,
    GenerateDataKey,
    Decrypt,
}

impl ContentRpc {
    fn method(self) -> &'static str {
        match self {
            Self::CreateKek => "CreateKek",
            Self::GenerateDataKey => "GenerateDataKey",
            Self::Decrypt => "Decrypt",
        }
    }

    fn action(self) -> &'static str {
        match self {
            Self::CreateKek => "create KEK",
            Self::GenerateDataKey => "generate data key",
            Self::Decrypt => "decrypt",
        }
    }

    /// A malformed resource, an unknown KEK, a blob that is no content key:
    /// nothing is created when the call is allowed.
    async fn call(self, content: &mut Content, org: &str) -> Result<(), Status> {
        let org_id = org.to_owned();
        match self {
            Self::CreateKek => content
                .create_kek(pb::CreateKekRequest {
                    org_id,
                    resource: String::new(),
                })
                .await
                .map(drop),
            Self::GenerateDataKey => content
                .generate_data_key(pb::GenerateDataKeyRequest {
                    org_id,
                    kek_id: NO_SUCH_KEK.into(),
                    context: Vec::new(),
                })
                .await
                .map(drop),
            Self::Decrypt => content
                .decrypt(pb::DecryptRequest {
                    org_id,
                    wrapped_key: vec![7; 64],
                    context: Vec::new(),
                })
                .await
                .map(drop),
        }
    }
}

/// Every RPC of the control plane's services (`Service/Method`), read from
/// the descriptors compiled into the server: a new RPC without a row in the
/// matrix fails the test.
fn every_control_plane_rpc() -> std::collections::BTreeSet<String> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(cmk_proto::FILE_DESCRIPTOR_SET).unwrap();
    set.file
        .iter()
        .filter(|f| f.package() == "cmk.control.v1")
        .flat_map(|f| &f.service)
        .flat_map(|s| {
            s.method
                .iter()
                .map(move |m| format!("{}/{}", s.name(), m.name()))
        })
        .collect()
}

/// Every identity × every RPC of both services × both organisations:
/// PERMISSION_DENIED exactly when the identity lacks the role, audited in the
/// target organisation's log, and nothing changed by the refused calls.
#[tokio::test(flavor = "multi_thread")]
async fn authorisation_matrix() {
    use Needs::{Manage, Read, UseKeys};

    // The test policy's grants, written out.
    #[rustfmt::skip]
    let grants: [(&str, &str, Role, Role); 7] = [
        // certificate      identity        on acme          on globex
        ("admin-acme",      ADMIN_ACME,     Role::Admin,     Role::None),
        ("reader-acme",     READER_ACME,    Role::ReadOnly,  Role::None),
        ("service-acme",    SERVICE_ACME,   Role::Service,   Role::None),
        ("admin-globex",    ADMIN_GLOBEX,   Role::None,      Role::Admin),
        ("service-globex",  SERVICE_GLOBEX, Role::None,      Role::Service),
        ("intruder",        INTRUDER,       Role::None,      Role::None),
        // The HSM daemon trusts the control plane's identity; these APIs do not.
        ("control-plane",   CONTROL_PLANE,  Role::None,      Role::None),
    ];
    // Every RPC with harmless arguments, what it needs, and what it answers
    // when allowed.
    let junk = vec![7; 384];
    let key = || NO_SUCH_KEY.to_owned();
    let admin = Call::Admin;
    let content = Call::Content;
    #[rustfmt::skip]
    let rpcs: [(Call, Needs, Code); 21] = [
        // rpc                                     needs    answers when allowed
        (admin(Rpc::GetImportPublicKey),           Read,    Code::Ok),
        (admin(Rpc::GetKey(key())),                Read,    Code::NotFound),
        (admin(Rpc::ListKeys),                     Read,    Code::Ok),
        (admin(Rpc::ListAuditEvents),              Read,    Code::Ok),
        (admin(Rpc::WatchEvents),                  Read,    Code::Ok),
        (admin(Rpc::VerifyAuditLog),               Read,    Code::Ok),
        (admin(Rpc::GetRotation),                  Read,    Code::NotFound),
        (admin(Rpc::PreviewRevocation(key())),     Read,    Code::NotFound),
        (admin(Rpc::SetByok(true)),                Manage,  Code::Ok),
        (admin(Rpc::upload(&junk)),                Manage,  Code::InvalidArgument),
        (admin(Rpc::AddAwsKey),                    Manage,  Code::InvalidArgument),
        (admin(Rpc::GetAwsSetup),                  Manage,  Code::InvalidArgument),
        (admin(Rpc::ActivateKey(key())),           Manage,  Code::NotFound),
        (admin(Rpc::CancelKey(key())),             Manage,  Code::NotFound),
        (admin(Rpc::RevokeKey(key())),             Manage,  Code::NotFound),
        (admin(Rpc::ReactivateKey(key())),         Manage,  Code::NotFound),
        (admin(Rpc::DeleteKey(key())),             Manage,  Code::NotFound),
        (admin(Rpc::RestoreKey(key())),            Manage,  Code::NotFound),
        (content(ContentRpc::CreateKek),           UseKeys, Code::InvalidArgument),
        (content(ContentRpc::GenerateDataKey),     UseKeys, Code::NotFound),
        (content(ContentRpc::Decrypt),             UseKeys, Code::InvalidArgument),
    ];
    let covered: std::collections::BTreeSet<String> =
        rpcs.iter().map(|(rpc, _, _)| rpc.method()).collect();
    assert_eq!(
        covered,
        every_control_plane_rpc(),
        "the matrix has a row for every RPC the services serve"
    );

    let d = Deployment::start().await;
    let mut acme = Observer::new(&d, "admin-acme", ACME).await;
    let mut globex = Observer::new(&d, "admin-globex", GLOBEX).await;
    // BYOK on in both, so that the allowed SetByok(true) changes nothing.
    set_byok(&mut acme, true).await;
    set_byok(&mut globex, true).await;
    let acme_keys = acme.keys().await;
    let globex_keys = globex.keys().await;

    for (cert, identity, on_acme, on_globex) in grants {
        let mut admin_client = d.client(cert).await;
        let mut content_client = d.content(cert).await;
        for (org, role) in [(ACME, on_acme), (GLOBEX, on_globex)] {
            for (rpc, needs, when_allowed) in &rpcs {
                let what = format!("{cert} {} on {org}", rpc.method());
                let result = rpc.call(&mut admin_client, &mut content_client, org).await;
                if needs.granted_to(role) {
                    let code = result.err().map_or(Code::Ok, |s| s.code());
                    assert_ne!(code, Code::PermissionDenied, "{what}");
                    assert_eq!(code, *when_allowed, "{what}");
                    continue;
                }
                let status = result.expect_err(&what);
                assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
                let reason = format!(
                    "{identity} may not do this in organisation {org}: it needs {}",
                    needs.roles()
                );
                assert_eq!(status.message(), reason, "{what}");
                let audit = if org == ACME { &mut acme } else { &mut globex };
                let events = audit.new_events().await;
                let expected = format!("PermissionDenied: {reason}");
                assert!(
                    events.iter().any(|e| e.actor == identity
                        && e.action == rpc.action()
                        && e.key_id == rpc.key_id()
                        && e.result == expected),
                    "{what}: not audited in {org}'s log: {events:#?}"
                );
            }
        }
        // In particular, nothing of acme changed after globex's admin tried
        // everything on it.
        assert_eq!(acme.keys().await, acme_keys, "after {cert}");
        assert_eq!(globex.keys().await, globex_keys, "after {cert}");
    }
    assert_intact(&mut acme).await;
    assert_intact(&mut globex).await;
}

/// One admin-API call with the arguments a test chose.
#[derive(Clone)]
enum Rpc {
    GetImportPublicKey,
    GetKey(String),
    ListKeys,
    ListAuditEvents,
    VerifyAuditLog,
    SetByok(bool),
    UploadKey {
        wrapped_key: Vec<u8>,
        import_key_id: String,
        activate_now: bool,
    },
    ActivateKey(String),
    CancelKey(String),
    RevokeKey(String),
    ReactivateKey(String),
    DeleteKey(String),
    RestoreKey(String),
    /// With a malformed key ARN: refused before AWS is asked.
    AddAwsKey,
    /// With a malformed key ARN: refused before anything is written.
    GetAwsSetup,
    /// Opens the stream, and lets it go at once.
    WatchEvents,
    GetRotation,
    PreviewRevocation(String),
}

impl Rpc {
    /// The method's name in the service's descriptor.
    fn method(&self) -> &'static str {
        match self {
            Self::GetImportPublicKey => "GetImportPublicKey",
            Self::GetKey(_) => "GetKey",
            Self::ListKeys => "ListKeys",
            Self::ListAuditEvents => "ListAuditEvents",
            Self::VerifyAuditLog => "VerifyAuditLog",
            Self::SetByok(_) => "SetByok",
            Self::UploadKey { .. } => "UploadKey",
            Self::ActivateKey(_) => "ActivateKey",
            Self::CancelKey(_) => "CancelKey",
            Self::RevokeKey(_) => "RevokeKey",
            Self::ReactivateKey(_) => "ReactivateKey",
            Self::DeleteKey(_) => "DeleteKey",
            Self::RestoreKey(_) => "RestoreKey",
            Self::AddAwsKey => "AddAwsKey",
            Self::GetAwsSetup => "GetAwsSetup",
            Self::WatchEvents => "WatchEvents",
            Self::GetRotation => "GetRotation",
            Self::PreviewRevocation(_) => "PreviewRevocation",
        }
    }

    /// An upload to activate later, with no import key id.
    fn upload(wrapped_key: &[u8]) -> Self {
        Self::UploadKey {
            wrapped_key: wrapped_key.to_vec(),
            import_key_id: String::new(),
            activate_now: false,
        }
    }

    /// The RPC's name and key, for failure messages.
    fn name(&self) -> String {
        let rpc = match self {
            Self::GetImportPublicKey => "GetImportPublicKey",
            Self::GetKey(_) => "GetKey",
            Self::ListKeys => "ListKeys",
            Self::ListAuditEvents => "ListAuditEvents",
            Self::VerifyAuditLog => "VerifyAuditLog",
            Self::SetByok(true) => "SetByok(on)",
            Self::SetByok(false) => "SetByok(off)",
            Self::UploadKey { .. } => "UploadKey",
            Self::ActivateKey(_) => "ActivateKey",
            Self::CancelKey(_) => "CancelKey",
            Self::RevokeKey(_) => "RevokeKey",
            Self::ReactivateKey(_) => "ReactivateKey",
            Self::DeleteKey(_) => "DeleteKey",
            Self::RestoreKey(_) => "RestoreKey",
            Self::AddAwsKey
            | Self::GetAwsSetup
            | Self::WatchEvents
            | Self::GetRotation
            | Self::PreviewRevocation(_) => self.method(),
        };
        match self.key_id() {
            "" => rpc.to_owned(),
            key => format!("{rpc}({key})"),
        }
    }

    /// How the audit log names the call.
    fn action(&self) -> &'static str {
        match self {
            Self::GetImportPublicKey => "get import public key",
            Self::GetKey(_) => "get key",
            Self::ListKeys => "list keys",
            Self::ListAuditEvents => "list audit events",
            Self::VerifyAuditLog => "verify audit log",
            Self::SetByok(true) => "byok on",
            Self::SetByok(false) => "byok off",
            Self::UploadKey { .. } => "upload",
            Self::ActivateKey(_) => "activate",
            Self::CancelKey(_) => "cancel",
            Self::RevokeKey(_) => "revoke",
            Self::ReactivateKey(_) => "reactivate",
            Self::DeleteKey(_) => "delete",
            Self::RestoreKey(_) => "restore",
            Self::AddAwsKey => "add aws key",
            Self::GetAwsSetup => "get aws setup",
            Self::WatchEvents => "watch audit events",
            Self::GetRotation => "get rotation",
            Self::PreviewRevocation(_) => "preview revocation",
        }
    }

    /// The key the call names, or "".
    fn key_id(&self) -> &str {
        match self {
            Self::GetKey(key)
            | Self::ActivateKey(key)
            | Self::CancelKey(key)
            | Self::RevokeKey(key)
            | Self::ReactivateKey(key)
            | Self::DeleteKey(key)
            | Self::RestoreKey(key)
            | Self::PreviewRevocation(key) => key,
            Self::GetImportPublicKey
            | Self::ListKeys
            | Self::ListAuditEvents
            | Self::VerifyAuditLog
            | Self::SetByok(_)
            | Self::UploadKey { .. }
            | Self::AddAwsKey
            | Self::GetAwsSetup
            | Self::WatchEvents
            | Self::GetRotation => "",
        }
    }

    /// Makes the call on `org`; only the status matters.
    async fn call(&self, client: &mut Client, org: &str) -> Result<(), Status> {
        let org_id = org.to_owned();
        let key = |key_id: &String| pb::KeyRequest {
            org_id: org.to_owned(),
            key_id: key_id.clone(),
        };
        match self {
            Self::GetImportPublicKey => client
                .get_import_public_key(pb::GetImportPublicKeyRequest { org_id })
                .await
                .map(drop),
            Self::GetKey(k) => client.get_key(key(k)).await.map(drop),
            Self::ListKeys => client
                .list_keys(pb::ListKeysRequest { org_id })
                .await
                .map(drop),
            Self::ListAuditEvents => client
                .list_audit_events(pb::ListAuditEventsRequest {
                    org_id,
                    after_seq: 0,
                    page_size: 1,
                })
                .await
                .map(drop),
            Self::VerifyAuditLog => client
                .verify_audit_log(pb::VerifyAuditLogRequest { org_id })
                .await
                .map(drop),
            Self::SetByok(enabled) => client
                .set_byok(pb::SetByokRequest {
                    org_id,
                    enabled: *enabled,
                })
                .await
                .map(drop),
            Self::UploadKey {
                wrapped_key,
                import_key_id,
                activate_now,
            } => client
                .upload_key(pb::UploadKeyRequest {
                    org_id,
                    wrapped_key: wrapped_key.clone(),
                    activate_now: *activate_now,
                    import_key_id: import_key_id.clone(),
                })
                .await
                .map(drop),
            Self::ActivateKey(k) => client.activate_key(key(k)).await.map(drop),
            Self::CancelKey(k) => client.cancel_key(key(k)).await.map(drop),
            Self::RevokeKey(k) => client.revoke_key(key(k)).await.map(drop),
            Self::ReactivateKey(k) => client.reactivate_key(key(k)).await.map(drop),
            Self::DeleteKey(k) => client.delete_key(key(k)).await.map(drop),
            Self::RestoreKey(k) => client.restore_key(key(k)).await.map(drop),
            Self::AddAwsKey => client
                .add_aws_key(pb::AddAwsKeyRequest {
                    org_id,
                    key_arn: "not-an-arn".into(),
                    backup_key_arn: String::new(),
                    role_arn: String::new(),
                    activate_now: false,
                })
                .await
                .map(drop),
            Self::GetAwsSetup => client
                .get_aws_setup(pb::GetAwsSetupRequest {
                    org_id,
                    key_arns: vec!["not-an-arn".into()],
                })
                .await
                .map(drop),
            Self::WatchEvents => client
                .watch_events(pb::WatchEventsRequest {
                    org_id,
                    after_seq: 0,
                })
                .await
                .map(drop),
            Self::GetRotation => client
                .get_rotation(pb::GetRotationRequest { org_id })
                .await
                .map(drop),
            Self::PreviewRevocation(k) => client.preview_revocation(key(k)).await.map(drop),
        }
    }
}

/// An organisation's admin: the client it calls with, and how far it has
/// read the organisation's audit log.
struct Observer {
    client: Client,
    org: &'static str,
    identity: &'static str,
    seen: u64,
}

impl Observer {
    async fn new(d: &Deployment, cert: &str, org: &'static str) -> Self {
        let identity = match cert {
            "admin-acme" => ADMIN_ACME,
            "admin-globex" => ADMIN_GLOBEX,
            other => panic!("{other} is no admin"),
        };
        Self {
            client: d.client(cert).await,
            org,
            identity,
            seen: 0,
        }
    }

    async fn keys(&mut self) -> pb::ListKeysResponse {
        self.client
            .list_keys(pb::ListKeysRequest {
                org_id: self.org.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// The audit events since the last call.
    async fn new_events(&mut self) -> Vec<pb::AuditEvent> {
        let mut events = Vec::new();
        loop {
            let page = self
                .client
                .list_audit_events(pb::ListAuditEventsRequest {
                    org_id: self.org.into(),
                    after_seq: self.seen,
                    page_size: 1000,
                })
                .await
                .unwrap()
                .into_inner();
            if let Some(last) = page.events.last() {
                self.seen = last.seq;
            }
            events.extend(page.events);
            if page.next_after_seq == 0 {
                return events;
            }
        }
    }
}

/// Makes `rpc` as the observer and checks that the service refused it with
/// `code` and a message containing `says`, that nothing listed changed, and
/// that the refusal is in the audit log with the message the caller got.
async fn refused(admin: &mut Observer, rpc: Rpc, code: Code, says: &str) -> Status {
    let org = admin.org;
    let status = rejected(admin, org, rpc.clone(), code, says).await;
    let expected = format!("{code:?}: {}", status.message());
    let events = admin.new_events().await;
    assert!(
        events.iter().any(|e| e.actor == admin.identity
            && e.action == rpc.action()
            && e.key_id == rpc.key_id()
            && e.result == expected),
        "{}: the refusal is not audited as {expected:?}: {events:#?}",
        rpc.name()
    );
    status
}

/// Makes `rpc` on `org` as the observer and checks that it was refused with
/// `code` and a message containing `says`, and that nothing listed in the
/// observer's organisation changed.
async fn rejected(admin: &mut Observer, org: &str, rpc: Rpc, code: Code, says: &str) -> Status {
    let before = admin.keys().await;
    admin.new_events().await;
    let status = rpc
        .call(&mut admin.client, org)
        .await
        .expect_err(&format!("{} is refused", rpc.name()));
    assert_eq!(status.code(), code, "{}: {status:?}", rpc.name());
    assert!(
        status.message().contains(says),
        "{}: {:?} does not say {says:?}",
        rpc.name(),
        status.message()
    );
    assert_eq!(
        admin.keys().await,
        before,
        "{}: the refusal changed the listing",
        rpc.name()
    );
    status
}

/// A change the lifecycle allows; the key as it is now.
async fn change(admin: &mut Observer, rpc: Rpc) -> pb::Key {
    let key = |key_id: &String| pb::KeyRequest {
        org_id: admin.org.into(),
        key_id: key_id.clone(),
    };
    let c = &mut admin.client;
    let response = match &rpc {
        Rpc::ActivateKey(k) => c.activate_key(key(k)).await,
        Rpc::RevokeKey(k) => c.revoke_key(key(k)).await,
        Rpc::ReactivateKey(k) => c.reactivate_key(key(k)).await,
        Rpc::DeleteKey(k) => c.delete_key(key(k)).await,
        Rpc::RestoreKey(k) => c.restore_key(key(k)).await,
        _ => panic!("{} is not a key change", rpc.name()),
    };
    response
        .unwrap_or_else(|s| panic!("{}: {s:?}", rpc.name()))
        .into_inner()
        .key
        .unwrap()
}

async fn upload(admin: &mut Observer, wrapped_key: &[u8], activate_now: bool) -> pb::Key {
    admin
        .client
        .upload_key(pb::UploadKeyRequest {
            org_id: admin.org.into(),
            wrapped_key: wrapped_key.to_vec(),
            activate_now,
            import_key_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
}

async fn set_byok(admin: &mut Observer, enabled: bool) {
    let response = admin
        .client
        .set_byok(pb::SetByokRequest {
            org_id: admin.org.into(),
            enabled,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.byok_enabled, enabled);
}

/// Downloads the import public key to `dir/pub.pem`.
async fn public_key(admin: &mut Observer, dir: &Path) -> pb::GetImportPublicKeyResponse {
    let public = admin
        .client
        .get_import_public_key(pb::GetImportPublicKeyRequest {
            org_id: admin.org.into(),
        })
        .await
        .unwrap()
        .into_inner();
    std::fs::write(dir.join("pub.pem"), &public.public_key_pem).unwrap();
    public
}

async fn assert_intact(admin: &mut Observer) {
    let check = admin
        .client
        .verify_audit_log(pb::VerifyAuditLogRequest {
            org_id: admin.org.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(check.intact, "{}: {}", admin.org, check.problem);
}
