//! The control plane in this process, over real mutual TLS, against an
//! in-process HSM daemon, with a clock the tests move.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use cmk_control_plane::{RawSettings, Settings, clock::ManualClock};
use cmk_hsm_daemon::Limits;
use cmk_proto::control::v1::{
    self as pb, KeyState, content_key_service_client::ContentKeyServiceClient,
    key_admin_service_client::KeyAdminServiceClient,
};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

use crate::Harness;

/// Full admin of org `acme`.
pub const ADMIN_ACME: &str = "spiffe://cmk.test/admin/acme";
/// Read-only admin of org `acme`.
pub const READER_ACME: &str = "spiffe://cmk.test/reader/acme";
/// An internal service of org `acme`.
pub const SERVICE_ACME: &str = "spiffe://cmk.test/service/acme";
/// Full admin of org `globex`.
pub const ADMIN_GLOBEX: &str = "spiffe://cmk.test/admin/globex";
/// An internal service of org `globex`.
pub const SERVICE_GLOBEX: &str = "spiffe://cmk.test/service/globex";

/// Every admin-side identity with the file name of its certificate.
pub const IDENTITIES: [(&str, &str); 5] = [
    (ADMIN_ACME, "admin-acme"),
    (READER_ACME, "reader-acme"),
    (SERVICE_ACME, "service-acme"),
    (ADMIN_GLOBEX, "admin-globex"),
    (SERVICE_GLOBEX, "service-globex"),
];

/// The authorisation policy of these tests.
pub const POLICY: &str = r#"
[[grant]]
identity = "spiffe://cmk.test/admin/acme"
org = "acme"
role = "admin"

[[grant]]
identity = "spiffe://cmk.test/reader/acme"
org = "acme"
role = "read-only"

[[grant]]
identity = "spiffe://cmk.test/service/acme"
org = "acme"
role = "internal-service"

[[grant]]
identity = "spiffe://cmk.test/admin/globex"
org = "globex"
role = "admin"

[[grant]]
identity = "spiffe://cmk.test/service/globex"
org = "globex"
role = "internal-service"
"#;

/// Both services, the control plane's data directory and its clock.
pub struct Deployment {
    pub hsm: Harness,
    pub data: tempfile::TempDir,
    pub clock: Arc<ManualClock>,
    control_plane: Option<ControlPlane>,
    /// Applied to the control plane's raw settings at every (re)start.
    configure: Arc<Configure>,
}

/// A change to the control plane's raw settings.
pub type Configure = dyn Fn(&mut RawSettings) + Send + Sync;

struct ControlPlane {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), cmk_control_plane::StartError>>,
}

impl Deployment {
    /// Starts the HSM daemon and the control plane, and waits until both answer.
    pub async fn start() -> Self {
        Self::start_with(Limits::default(), |_| {}).await
    }

    /// As [`Deployment::start`], with the HSM daemon's `limits` and the
    /// control plane's settings changed by `configure` (at every restart too).
    pub async fn start_with(
        limits: Limits,
        configure: impl Fn(&mut RawSettings) + Send + Sync + 'static,
    ) -> Self {
        let hsm = Harness::start(limits).await;
        let data = tempfile::tempdir().unwrap();
        std::fs::write(data.path().join("policy.toml"), POLICY).unwrap();
        let mut deployment = Self {
            hsm,
            data,
            clock: Arc::new(ManualClock::new()),
            control_plane: None,
            configure: Arc::new(configure),
        };
        deployment.start_control_plane().await;
        deployment
    }

    /// The control plane's settings: this PKI, a SQLite file in the data
    /// directory, timers every second.
    pub fn settings(&self) -> Settings {
        let pki = &self.hsm.pki;
        let mut raw = RawSettings {
            listen: Some("127.0.0.1:0".into()),
            tls_cert: Some(pki.path("server.crt")),
            tls_key: Some(pki.path("server.key")),
            tls_client_ca: Some(pki.path("ca.crt")),
            hsm_endpoints: vec![format!("https://{}", self.hsm.daemon.addr)],
            hsm_server_name: Some("localhost".into()),
            hsm_tls_cert: Some(pki.path("control-plane.crt")),
            hsm_tls_key: Some(pki.path("control-plane.key")),
            hsm_tls_ca: Some(pki.path("ca.crt")),
            database: Some(self.database_url()),
            policy_file: Some(self.data.path().join("policy.toml")),
            maintenance_interval_secs: Some(1),
            ..RawSettings::default()
        };
        (self.configure)(&mut raw);
        raw.validate().unwrap()
    }

    /// The SQLite file.
    pub fn database(&self) -> PathBuf {
        self.data.path().join("cmk.db")
    }

    /// The SQLite file's URL.
    pub fn database_url(&self) -> String {
        format!("sqlite://{}", self.database().display())
    }

    /// The control plane's address.
    pub fn addr(&self) -> SocketAddr {
        self.control_plane.as_ref().unwrap().addr
    }

    /// Starts the control plane (again) on the same database and waits until it answers.
    pub async fn start_control_plane(&mut self) {
        self.control_plane = Some(self.spawn_control_plane().await);
    }

    /// A second control plane on the same database and HSM daemon, as another
    /// replica of a deployment would be.
    pub async fn start_replica(&self) -> Replica<'_> {
        Replica {
            pki: &self.hsm.pki,
            control_plane: Some(self.spawn_control_plane().await),
        }
    }

    async fn spawn_control_plane(&self) -> ControlPlane {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(cmk_control_plane::serve(
            self.settings(),
            self.clock.clone(),
            listener,
            async {
                let _ = stopped.await;
            },
        ));
        crate::wait_healthy(addr, &self.hsm.pki.client_files("admin-acme")).await;
        ControlPlane { addr, stop, task }
    }

    /// Stops the control plane (as a deployment would) and starts it again on
    /// the same database.
    pub async fn restart(&mut self) {
        self.stop_control_plane().await;
        self.start_control_plane().await;
    }

    /// Stops the control plane.
    pub async fn stop_control_plane(&mut self) {
        if let Some(cp) = self.control_plane.take() {
            let _ = cp.stop.send(());
            cp.task.await.unwrap().unwrap();
        }
    }

    /// An admin-API client presenting `<name>.crt`.
    pub async fn client(&self, name: &str) -> KeyAdminServiceClient<Channel> {
        KeyAdminServiceClient::new(self.hsm.pki.channel(self.addr(), name).await.unwrap())
    }

    /// A content-key client presenting `<name>.crt`.
    pub async fn content(&self, name: &str) -> ContentKeyServiceClient<Channel> {
        ContentKeyServiceClient::new(self.hsm.pki.channel(self.addr(), name).await.unwrap())
    }

    /// Moves the control plane's clock and waits for its timers to run twice.
    pub async fn advance(&self, by: Duration) {
        self.clock.advance(by);
        tokio::time::sleep(Duration::from_millis(2200)).await;
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if let Some(cp) = &self.control_plane {
            cp.task.abort();
        }
    }
}

/// Another control plane of a [`Deployment`]; stopped when dropped.
pub struct Replica<'a> {
    pki: &'a crate::Pki,
    control_plane: Option<ControlPlane>,
}

impl Replica<'_> {
    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.control_plane.as_ref().unwrap().addr
    }

    /// An admin-API client presenting `<name>.crt`.
    pub async fn client(&self, name: &str) -> Admin {
        admin_at(self.pki, self.addr(), name).await
    }

    /// A content-key client presenting `<name>.crt`.
    pub async fn content(&self, name: &str) -> Content {
        content_at(self.pki, self.addr(), name).await
    }

    /// Stops it as a deployment would.
    pub async fn stop(mut self) {
        if let Some(cp) = self.control_plane.take() {
            let _ = cp.stop.send(());
            cp.task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Replica<'_> {
    fn drop(&mut self) {
        if let Some(cp) = &self.control_plane {
            cp.task.abort();
        }
    }
}

pub fn state_of(listing: &pb::ListKeysResponse, key_id: &str) -> Option<KeyState> {
    listing
        .keys
        .iter()
        .find(|k| k.key_id == key_id)
        .map(|k| k.state())
}

/// Runs `openssl` with `args` in `dir`; panics with its stderr on failure.
pub fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// What an admin does by hand: 32 random bytes (kept in `<name>.bin`),
/// wrapped under `pub.pem` with the seed's exact `openssl pkeyutl` recipe.
pub fn wrap_new_key(dir: &Path, name: &str) -> Vec<u8> {
    wrap(dir, name, 32, "pub.pem", "sha256")
}

/// `len` random bytes wrapped under the public key in `public` with RSA-OAEP,
/// `digest` for both OAEP and MGF1.
pub fn wrap(dir: &Path, name: &str, len: usize, public: &str, digest: &str) -> Vec<u8> {
    let plain = format!("{name}.bin");
    let wrapped = format!("{name}.wrapped");
    openssl(dir, &["rand", "-out", &plain, &len.to_string()]);
    openssl(
        dir,
        &[
            "pkeyutl",
            "-encrypt",
            "-pubin",
            "-inkey",
            public,
            "-in",
            &plain,
            "-out",
            &wrapped,
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            &format!("rsa_oaep_md:{digest}"),
            "-pkeyopt",
            &format!("rsa_mgf1_md:{digest}"),
        ],
    );
    std::fs::read(dir.join(wrapped)).unwrap()
}

/// Every file under `dir`, relative to it.
pub fn files(dir: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// The key check value of the key in `<name>.bin`, computed independently with
/// `openssl mac`: AES-CMAC over a zero block, first 5 bytes, upper-case hex.
pub fn check_value(dir: &Path, name: &str) -> String {
    let key_hex = hex::encode(std::fs::read(dir.join(format!("{name}.bin"))).unwrap());
    std::fs::write(dir.join("zero.bin"), [0u8; 16]).unwrap();
    let mac = openssl(
        dir,
        &[
            "mac",
            "-cipher",
            "AES-256-CBC",
            "-macopt",
            &format!("hexkey:{key_hex}"),
            "-in",
            "zero.bin",
            "CMAC",
        ],
    );
    String::from_utf8(mac).unwrap().trim()[..10].to_uppercase()
}

/// An admin-API client.
pub type Admin = KeyAdminServiceClient<Channel>;
/// A content-key API client.
pub type Content = ContentKeyServiceClient<Channel>;

/// An admin-API client of the control plane at `addr`, presenting `<name>.crt`.
pub async fn admin_at(pki: &crate::Pki, addr: SocketAddr, name: &str) -> Admin {
    KeyAdminServiceClient::new(pki.channel(addr, name).await.unwrap())
}

/// A content-key client of the control plane at `addr`, presenting `<name>.crt`.
pub async fn content_at(pki: &crate::Pki, addr: SocketAddr, name: &str) -> Content {
    ContentKeyServiceClient::new(pki.channel(addr, name).await.unwrap())
}

/// Switches bring-your-own-key on or off for `org`.
pub async fn set_byok(admin: &mut Admin, org: &str, enabled: bool) {
    admin
        .set_byok(pb::SetByokRequest {
            org_id: org.into(),
            enabled,
        })
        .await
        .unwrap();
}

/// What an admin does to add a key: downloads the import public key into
/// `dir/pub.pem`, wraps 32 fresh random bytes (kept in `dir/<name>.bin`) with
/// the seed's `openssl` recipe, and uploads them.
pub async fn upload_new_key(
    admin: &mut Admin,
    org: &str,
    dir: &Path,
    name: &str,
    activate_now: bool,
) -> pb::Key {
    let public = admin
        .get_import_public_key(pb::GetImportPublicKeyRequest { org_id: org.into() })
        .await
        .unwrap()
        .into_inner();
    std::fs::write(dir.join("pub.pem"), &public.public_key_pem).unwrap();
    let wrapped = wrap_new_key(dir, name);
    admin
        .upload_key(pb::UploadKeyRequest {
            org_id: org.into(),
            wrapped_key: wrapped,
            activate_now,
            import_key_id: public.key_id,
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
}

/// `f(0)`, …, `f(n - 1)`, run by `concurrency` tasks at once; results in index
/// order.
pub async fn run_concurrently<T, F, Fut>(n: usize, concurrency: usize, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = T> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let next = next.clone();
        let f = f.clone();
        workers.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return out;
                }
                out.push((i, f(i).await));
            }
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(done) = workers.join_next().await {
        all.extend(done.unwrap());
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, t)| t).collect()
}

/// KEKs of `org` for the resources `<prefix>0` … `<prefix>{n-1}`, created
/// through the API by `concurrency` callers at once; in resource order.
pub async fn create_keks(
    content: &Content,
    org: &str,
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> Vec<pb::CreateKekResponse> {
    let (content, org, prefix) = (content.clone(), org.to_owned(), prefix.to_owned());
    run_concurrently(n, concurrency, move |i| {
        let (mut content, org, resource) = (content.clone(), org.clone(), format!("{prefix}{i}"));
        async move {
            let kek = content
                .create_kek(pb::CreateKekRequest {
                    org_id: org,
                    resource: resource.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("CreateKek {resource}: {e:?}"))
                .into_inner();
            assert_eq!(kek.resource, resource);
            kek
        }
    })
    .await
}

/// A content key made through the API, and what it takes to open it again.
#[derive(Clone)]
pub struct ContentKey {
    pub kek_id: String,
    pub context: Vec<u8>,
    pub wrapped: Vec<u8>,
    pub plaintext: Vec<u8>,
}

/// One content key under each of `keks`, each with its own context.
pub async fn generate_data_keys(content: &Content, org: &str, keks: &[String]) -> Vec<ContentKey> {
    let (content, org, keks) = (content.clone(), org.to_owned(), Arc::new(keks.to_vec()));
    run_concurrently(keks.len(), 16, move |i| {
        let (mut content, org, kek_id) = (content.clone(), org.clone(), keks[i].clone());
        async move {
            let context = format!("doc/{i}/{kek_id}").into_bytes();
            let made = content
                .generate_data_key(pb::GenerateDataKeyRequest {
                    org_id: org,
                    kek_id: kek_id.clone(),
                    context: context.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("GenerateDataKey under {kek_id}: {e:?}"))
                .into_inner();
            assert_eq!(made.kek_id, kek_id);
            assert_eq!(made.plaintext.len(), 32);
            ContentKey {
                kek_id,
                context,
                wrapped: made.wrapped_key,
                plaintext: made.plaintext,
            }
        }
    })
    .await
}

/// Decrypts every one of `keys` through the API and checks that each gives
/// back its content key and names its KEK.
pub async fn assert_all_decrypt(content: &Content, org: &str, keys: &[ContentKey]) {
    let (content, org, keys) = (content.clone(), org.to_owned(), Arc::new(keys.to_vec()));
    let n = keys.len();
    run_concurrently(n, 16, move |i| {
        let (mut content, org, keys) = (content.clone(), org.clone(), keys.clone());
        async move {
            let key = &keys[i];
            let opened = content
                .decrypt(pb::DecryptRequest {
                    org_id: org,
                    wrapped_key: key.wrapped.clone(),
                    context: key.context.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("Decrypt of content key {i} ({}): {e:?}", key.kek_id))
                .into_inner();
            assert!(opened.plaintext == key.plaintext, "content key {i} changed");
            assert_eq!(opened.kek_id, key.kek_id);
        }
    })
    .await;
}

/// Polls the org's rotation job until `done` holds for it, for at most
/// `limit`; panics with the last job seen otherwise.
pub async fn wait_for_rotation(
    admin: &mut Admin,
    org: &str,
    limit: Duration,
    done: impl Fn(&pb::Rotation) -> bool,
) -> pb::Rotation {
    let start = std::time::Instant::now();
    loop {
        let job = admin
            .get_rotation(pb::GetRotationRequest { org_id: org.into() })
            .await
            .map(tonic::Response::into_inner);
        match job {
            Ok(job) if done(&job) => return job,
            last if start.elapsed() > limit => {
                panic!("rotation of {org} not as expected within {limit:?}; last seen: {last:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The org's whole audit log, oldest first.
pub async fn audit_log(admin: &mut Admin, org: &str) -> Vec<pb::AuditEvent> {
    let mut events = Vec::new();
    let mut after_seq = 0;
    loop {
        let page = admin
            .list_audit_events(pb::ListAuditEventsRequest {
                org_id: org.into(),
                after_seq,
                // A page of 1000 can exceed the server's 64 KiB message limit.
                page_size: 100,
            })
            .await
            .unwrap()
            .into_inner();
        events.extend(page.events);
        if page.next_after_seq == 0 {
            return events;
        }
        after_seq = page.next_after_seq;
    }
}

/// What revoking `key_id` would make unreadable.
pub async fn preview_revocation(
    admin: &mut Admin,
    org: &str,
    key_id: &str,
) -> pb::PreviewRevocationResponse {
    admin
        .preview_revocation(pb::KeyRequest {
            org_id: org.into(),
            key_id: key_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// `n` KEKs of `org` for the resources `<prefix>0` … `<prefix>{n-1}`, made as
/// CreateKek makes them — 32 random bytes wrapped by the HSM daemon at `hsm`
/// under the org's active key, bound to the org and KEK id — but written to
/// the store at the URL `database` directly, in one transaction and without an audit
/// event each: CreateKek costs two fsync'd commits per KEK, so thousands take
/// seconds. The control plane may be running. Returns the KEK ids in
/// resource order.
pub async fn seed_keks(
    pki: &crate::Pki,
    hsm: SocketAddr,
    database: &str,
    org: &str,
    prefix: &str,
    n: usize,
) -> Vec<String> {
    use cmk_control_plane::envelope;
    use cmk_control_plane_domain::{KekId, OrgId, ResourceId, Timestamp};
    use cmk_control_plane_store::{Backend, OrgStore, PgStore, SqliteStore, StoredKek};

    let org = OrgId::parse(org).unwrap();
    let stored = match Backend::of(database) {
        Some(Backend::Sqlite) => {
            let store = SqliteStore::open(database).await.unwrap();
            let stored = store.load_org(&org).await.unwrap();
            store.close().await;
            stored
        }
        _ => {
            let store = PgStore::open(database).await.unwrap();
            let stored = store.load_org(&org).await.unwrap();
            store.close().await;
            stored
        }
    }
    .expect("the org exists");
    let active = stored
        .keys
        .iter()
        .find(|k| k.record.state == cmk_control_plane_domain::KeyState::Active)
        .expect("the org has an active key");
    let client = pki.control_plane_client(hsm).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut rows = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let keks: Vec<_> = chunk
            .iter()
            .map(|_| {
                let random = envelope::new_content_key();
                let id = KekId::from_random(random.expose()[..16].try_into().unwrap());
                let aad = envelope::kek_associated_data(&org, &id);
                (id, envelope::new_content_key(), aad)
            })
            .collect();
        let items: Vec<_> = keks
            .iter()
            .map(|(_, kek, aad)| (active.handle.as_str(), kek, aad.as_slice()))
            .collect();
        let wrapped = client.wrap_batch(&org, &items).await.unwrap();
        for ((i, (id, _, _)), wrapped) in chunk.iter().zip(keks).zip(wrapped) {
            rows.push((id, format!("{prefix}{i}"), wrapped.unwrap()));
        }
    }
    // The store's own bulk insert keeps the per-key KEK counts in step.
    let keks = rows
        .iter()
        .map(|(id, resource, wrapped)| StoredKek {
            id: id.clone(),
            resource: ResourceId::parse(resource).unwrap(),
            key: active.record.id.clone(),
            wrapped: wrapped.clone(),
            created_at: Timestamp(now),
        })
        .collect();
    match Backend::of(database) {
        Some(Backend::Sqlite) => {
            let store = SqliteStore::open(database).await.unwrap();
            store.insert_keks_unchecked(&org, keks).await.unwrap();
            store.close().await;
        }
        _ => {
            let store = PgStore::open(database).await.unwrap();
            store.insert_keks_unchecked(&org, keks).await.unwrap();
            store.close().await;
        }
    }
    rows.into_iter()
        .map(|(id, _, _)| id.as_str().to_owned())
        .collect()
}
