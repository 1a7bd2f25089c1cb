//! The control plane in this process, over real mutual TLS, against an
//! in-process HSM daemon, with a clock the tests move.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use cmk_control_plane::{RawSettings, Settings, clock::ManualClock};
use cmk_hsm_daemon::Limits;
use cmk_proto::control::v1::key_admin_service_client::KeyAdminServiceClient;
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
