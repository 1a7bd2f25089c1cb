//! The control plane in this process, over real mutual TLS, against an
//! in-process HSM daemon, with a clock the tests move.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use cmk_control_plane::{RawSettings, Settings, clock::ManualClock};
use cmk_hsm_daemon::Limits;
use cmk_proto::control::v1::{
    self as pb, KeyState, key_admin_service_client::KeyAdminServiceClient,
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

/// Every admin-side identity with the file name of its certificate.
pub const IDENTITIES: [(&str, &str); 4] = [
    (ADMIN_ACME, "admin-acme"),
    (READER_ACME, "reader-acme"),
    (SERVICE_ACME, "service-acme"),
    (ADMIN_GLOBEX, "admin-globex"),
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
"#;

/// Both services, the control plane's data directory and its clock.
pub struct Deployment {
    pub hsm: Harness,
    pub data: tempfile::TempDir,
    pub clock: Arc<ManualClock>,
    control_plane: Option<ControlPlane>,
}

struct ControlPlane {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), cmk_control_plane::StartError>>,
}

impl Deployment {
    /// Starts the HSM daemon and the control plane, and waits until both answer.
    pub async fn start() -> Self {
        let hsm = Harness::start(Limits::default()).await;
        let data = tempfile::tempdir().unwrap();
        std::fs::write(data.path().join("policy.toml"), POLICY).unwrap();
        let mut deployment = Self {
            hsm,
            data,
            clock: Arc::new(ManualClock::new()),
            control_plane: None,
        };
        deployment.start_control_plane().await;
        deployment
    }

    /// The control plane's settings: this PKI, a SQLite file in the data
    /// directory, timers every second.
    pub fn settings(&self) -> Settings {
        let pki = &self.hsm.pki;
        RawSettings {
            listen: Some("127.0.0.1:0".into()),
            tls_cert: Some(pki.path("server.crt")),
            tls_key: Some(pki.path("server.key")),
            tls_client_ca: Some(pki.path("ca.crt")),
            hsm_endpoint: Some(format!("https://{}", self.hsm.daemon.addr)),
            hsm_server_name: Some("localhost".into()),
            hsm_tls_cert: Some(pki.path("control-plane.crt")),
            hsm_tls_key: Some(pki.path("control-plane.key")),
            hsm_tls_ca: Some(pki.path("ca.crt")),
            database: Some(format!("sqlite://{}", self.database().display())),
            policy_file: Some(self.data.path().join("policy.toml")),
            maintenance_interval_secs: Some(1),
            ..RawSettings::default()
        }
        .validate()
        .unwrap()
    }

    /// The SQLite file.
    pub fn database(&self) -> PathBuf {
        self.data.path().join("cmk.db")
    }

    /// The control plane's address.
    pub fn addr(&self) -> SocketAddr {
        self.control_plane.as_ref().unwrap().addr
    }

    /// Starts the control plane (again) on the same database and waits until it answers.
    pub async fn start_control_plane(&mut self) {
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
        self.control_plane = Some(ControlPlane { addr, stop, task });
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
