//! Support for the end-to-end tests: a throwaway PKI on disk, the HSM daemon
//! started in-process or as its real binary, and mutual-TLS clients.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod control_plane;
pub mod walkthrough;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use cmk_hsm_daemon::{Limits, LogFormat, RawSettings, Settings};
use cmk_pki::Ca;
use cmk_proto::hsm::v1::hsm_service_client::HsmServiceClient;
use cmk_tls::TlsFiles;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};

/// The control plane's identity: the one the daemon allows.
pub const CONTROL_PLANE: &str = "spiffe://cmk.test/control-plane";
/// A valid certificate from the right CA, but not on the allow-list.
pub const INTRUDER: &str = "spiffe://cmk.test/some-other-service";

/// A root key for tests, as `openssl rand -hex 32` would write it.
pub const ROOT_KEY_HEX: &str = "6b2f0c1d9e8a7b6c5d4e3f201f2e3d4c5b6a79881726354453627180a9b8c7d6";

/// A CA with server and client certificates written under a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let ca = Ca::new("cmk test CA").unwrap();
        ca.write_cert(&p.join("ca.crt")).unwrap();
        ca.server(&["localhost"])
            .unwrap()
            .write(p, "server")
            .unwrap();
        ca.client(CONTROL_PLANE)
            .unwrap()
            .write(p, "control-plane")
            .unwrap();
        ca.client(INTRUDER).unwrap().write(p, "intruder").unwrap();
        for (identity, name) in control_plane::IDENTITIES {
            ca.client(identity).unwrap().write(p, name).unwrap();
        }
        // The same identity as the control plane, issued by a CA nobody trusts.
        let rogue = Ca::new("rogue CA").unwrap();
        rogue
            .client(CONTROL_PLANE)
            .unwrap()
            .write(p, "rogue")
            .unwrap();
        let root = p.join("root.key");
        std::fs::write(&root, ROOT_KEY_HEX).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o600)).unwrap();
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Client TLS files for the identity whose files are `<name>.crt/.key`.
    pub fn client_files(&self, name: &str) -> TlsFiles {
        TlsFiles {
            cert: self.path(&format!("{name}.crt")),
            key: self.path(&format!("{name}.key")),
            ca: self.path("ca.crt"),
        }
    }

    /// Daemon settings using this PKI and `keystore`.
    pub fn settings(&self, keystore: &Path, limits: Limits) -> Settings {
        let raw = RawSettings {
            listen: Some("127.0.0.1:0".into()),
            keystore_dir: Some(keystore.to_path_buf()),
            root_key_file: Some(self.path("root.key")),
            allowed_clients: vec![CONTROL_PLANE.into()],
            tls_cert: Some(self.path("server.crt")),
            tls_key: Some(self.path("server.key")),
            tls_client_ca: Some(self.path("ca.crt")),
            ..RawSettings::default()
        };
        let mut settings = raw.validate(None).unwrap();
        settings.limits = limits;
        settings.log_format = LogFormat::Text;
        assert_eq!(
            settings.allowed_clients,
            BTreeSet::from([CONTROL_PLANE.to_string()])
        );
        settings
    }

    /// A mutual-TLS channel to `addr` presenting `<name>.crt`.
    pub async fn channel(
        &self,
        addr: SocketAddr,
        name: &str,
    ) -> Result<Channel, tonic::transport::Error> {
        channel(addr, &self.client_files(name)).await
    }

    /// An HSM client that authenticates as the control plane.
    pub async fn hsm_client(&self, addr: SocketAddr) -> HsmServiceClient<Channel> {
        HsmServiceClient::new(self.channel(addr, "control-plane").await.unwrap())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

impl Pki {
    /// The control plane's typed client, connected to `addr`.
    pub async fn control_plane_client(
        &self,
        addr: SocketAddr,
    ) -> cmk_control_plane::hsm::HsmClient {
        cmk_control_plane::hsm::HsmClient::connect(
            &format!("https://{addr}"),
            "localhost",
            &self.client_files("control-plane"),
        )
        .await
        .unwrap()
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// A daemon in this process with its own PKI and keystore, ready to call.
pub struct Harness {
    pub pki: Pki,
    /// The keystore directory (deleted when dropped).
    pub store: tempfile::TempDir,
    pub daemon: InProcess,
}

impl Harness {
    pub async fn start(limits: Limits) -> Self {
        let pki = Pki::new();
        let store = tempfile::tempdir().unwrap();
        let daemon = InProcess::start(pki.settings(store.path(), limits)).await;
        Self { pki, store, daemon }
    }
}

/// The daemon running inside the test process.
pub struct InProcess {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), cmk_hsm_daemon::StartError>>>,
}

impl InProcess {
    /// Starts a daemon on `127.0.0.1:0` and waits until it answers.
    pub async fn start(settings: Settings) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(cmk_hsm_daemon::serve(settings, listener, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops it and returns how `serve` ended.
    pub async fn stop(mut self) -> Result<(), cmk_hsm_daemon::StartError> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The daemon's answer to GetImportPublicKey, as the custody crate's type.
pub fn import_public_key(
    response: cmk_proto::hsm::v1::GetImportPublicKeyResponse,
) -> cmk_hsm_custody::ImportPublicKey {
    cmk_hsm_custody::ImportPublicKey {
        pem: response.public_key_pem,
        key_id: response.key_id,
        bits: response.modulus_bits,
    }
}

/// The import key as the control plane's HSM client gives it, in the form
/// the custody contract wraps under.
pub fn client_import_public_key(
    key: cmk_control_plane::hsm::ImportPublicKey,
) -> cmk_hsm_custody::ImportPublicKey {
    cmk_hsm_custody::ImportPublicKey {
        pem: key.public_key_pem,
        key_id: key.key_id,
        bits: key.modulus_bits,
    }
}

/// A mutual-TLS channel to `addr` (server name `localhost`) with `files`.
pub async fn channel(
    addr: SocketAddr,
    files: &TlsFiles,
) -> Result<Channel, tonic::transport::Error> {
    let tls = cmk_tls::client_config(files, "localhost").unwrap();
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Waits (up to 30 s) until the gRPC health check on `addr` answers SERVING.
pub async fn wait_healthy(addr: SocketAddr, files: &TlsFiles) {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    for _ in 0..300 {
        // A fresh development setup writes its CA certificate last.
        if !files.ca.exists() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if let Ok(channel) = channel(addr, files).await {
            let status = HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
                .map(|r| r.into_inner().status);
            if status.ok() == Some(ServingStatus::Serving as i32) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no healthy server on {addr} within 30 s");
}

/// Path of a binary of this workspace, built by `cargo build --bins`.
pub fn binary(name: &str) -> PathBuf {
    // The test executable lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .unwrap();
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// A free TCP port on loopback (bound and released; the caller binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `hsm-daemon` binary as a child process.
pub struct DaemonProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl DaemonProcess {
    /// Starts the real binary on `port` and waits for its health check to pass.
    pub async fn start(pki: &Pki, keystore: &Path, port: u16) -> Self {
        Self::start_with(pki, keystore, port, &[]).await
    }

    /// As [`DaemonProcess::start`], with `env` as extra environment (`CMK_HSM_*`
    /// settings, the AWS SDK's variables).
    pub async fn start_with(pki: &Pki, keystore: &Path, port: u16, env: &[(&str, &str)]) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = Command::new(binary("hsm-daemon"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--keystore-dir")
            .arg(keystore)
            .arg("--root-key-file")
            .arg(pki.path("root.key"))
            .arg("--allowed-client")
            .arg(CONTROL_PLANE)
            .arg("--tls-cert")
            .arg(pki.path("server.crt"))
            .arg("--tls-key")
            .arg(pki.path("server.key"))
            .arg("--tls-client-ca")
            .arg(pki.path("ca.crt"))
            .env_remove("CMK_HSM_ROOT_KEY")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let process = Self { child, addr };
        wait_healthy(addr, &pki.client_files("control-plane")).await;
        process
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A command that starts the control-plane executable `program` on `addr`
/// with the test PKI, against the HSM daemon at `hsm`, with its SQLite file
/// (`cmk.db`) and the tests' [`control_plane::POLICY`] (written now) in `data`.
pub fn control_plane_command(
    program: &Path,
    pki: &Pki,
    hsm: SocketAddr,
    data: &Path,
    addr: SocketAddr,
) -> Command {
    let database = format!("sqlite://{}", data.join("cmk.db").display());
    control_plane_command_on(program, pki, hsm, data, &database, addr)
}

/// As [`control_plane_command`], on the store at the URL `database`.
pub fn control_plane_command_on(
    program: &Path,
    pki: &Pki,
    hsm: SocketAddr,
    data: &Path,
    database: &str,
    addr: SocketAddr,
) -> Command {
    let policy = data.join("policy.toml");
    std::fs::write(&policy, control_plane::POLICY).unwrap();
    let mut command = Command::new(program);
    command
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--tls-cert")
        .arg(pki.path("server.crt"))
        .arg("--tls-key")
        .arg(pki.path("server.key"))
        .arg("--tls-client-ca")
        .arg(pki.path("ca.crt"))
        .arg("--hsm-endpoint")
        .arg(format!("https://{hsm}"))
        .arg("--hsm-tls-cert")
        .arg(pki.path("control-plane.crt"))
        .arg("--hsm-tls-key")
        .arg(pki.path("control-plane.key"))
        .arg("--hsm-tls-ca")
        .arg(pki.path("ca.crt"))
        .arg("--database")
        .arg(database)
        .arg("--policy-file")
        .arg(policy);
    command
}

/// The `control-plane` binary as a child process, killed when dropped.
pub struct ControlPlaneProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ControlPlaneProcess {
    /// Starts the real binary on `port` against the HSM daemon at `hsm`, with
    /// its SQLite file and policy (the tests' [`control_plane::POLICY`]) in
    /// `data`, and `env` as extra `CMK_CP_*` settings; waits for its health
    /// check to pass.
    pub async fn start(
        pki: &Pki,
        hsm: SocketAddr,
        data: &Path,
        port: u16,
        env: &[(&str, &str)],
    ) -> Self {
        let database = format!("sqlite://{}", data.join("cmk.db").display());
        Self::start_on(pki, hsm, data, &database, port, env).await
    }

    /// As [`ControlPlaneProcess::start`], on the store at the URL `database`.
    pub async fn start_on(
        pki: &Pki,
        hsm: SocketAddr,
        data: &Path,
        database: &str,
        port: u16,
        env: &[(&str, &str)],
    ) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let program = binary("control-plane");
        let child = control_plane_command_on(&program, pki, hsm, data, database, addr)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let process = Self { child, addr };
        wait_healthy(addr, &pki.client_files("admin-acme")).await;
        process
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay in front of a server that delivers the server's bytes to the
/// client late, by a delay the test sets: a slow network or a slow backend,
/// with TLS passing through untouched. Requests reach the server at once.
pub struct SlowRelay {
    pub addr: SocketAddr,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: JoinHandle<()>,
}

impl SlowRelay {
    /// Relays connections on a fresh local port to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        use std::sync::{Arc, atomic::AtomicU64};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = delay_ms.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                tokio::spawn(relay(client, server, delay.clone()));
            }
        });
        Self {
            addr,
            delay_ms,
            task,
        }
    }

    /// From now on, the server's bytes reach the client `delay` after they
    /// were sent.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
    }
}

impl Drop for SlowRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });
    // Chunks travel through a queue with their due time, in order.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = server_read.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let delay = delay_ms.load(std::sync::atomic::Ordering::SeqCst);
            let due = tokio::time::Instant::now() + Duration::from_millis(delay);
            if tx.send((due, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    while let Some((due, chunk)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        if client_write.write_all(&chunk).await.is_err() {
            break;
        }
    }
    upstream.abort();
    reader.abort();
}
