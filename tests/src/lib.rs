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
/// The org the HSM daemon's tests name: every key they add serves it.
pub const HSM_TEST_ORG: &str = "test-org";

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
    /// The real `cmkctl` acting for `org` against the control plane at
    /// `addr`, presenting `<name>.crt`, with no configuration file: add the
    /// command's arguments.
    pub fn cmkctl(&self, addr: SocketAddr, name: &str, org: &str) -> Command {
        let files = self.client_files(name);
        let mut command = Command::new(binary("cmkctl"));
        command
            .args(["--endpoint", &format!("https://{addr}")])
            .args(["--server-name", "localhost", "--org", org])
            .arg("--ca")
            .arg(&files.ca)
            .arg("--cert")
            .arg(&files.cert)
            .arg("--key")
            .arg(&files.key)
            .env_remove("CMKCTL_CONFIG");
        command
    }

    /// The HSM daemon at `daemon`'s audit public key, written as PEM to
    /// `path` (where `control-plane verify-audit` reads it).
    pub async fn write_audit_public_key(&self, daemon: SocketAddr, path: &Path) {
        let (der, _) = self
            .control_plane_client(daemon)
            .await
            .audit_public_key()
            .await
            .unwrap();
        std::fs::write(path, cmk_proto::checkpoint::public_key_pem(&der)).unwrap();
    }

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

/// Loopback with port 0: a server given this binds a port the system picks,
/// and logs it (see [`Listeners`]).
pub const ANY_PORT: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    0,
));

/// The address in a server's log line for its listener `listener` (`grpc`,
/// `health` or `metrics`): each binary logs one such line, with `listener`
/// and `addr` fields, as it binds each port. Reads both log formats.
pub fn logged_addr(line: &str, listener: &str) -> Option<SocketAddr> {
    if line.starts_with('{') {
        let json: serde_json::Value = serde_json::from_str(line).ok()?;
        let fields = json.get("fields")?;
        if fields.get("listener")?.as_str()? != listener {
            return None;
        }
        return fields.get("addr")?.as_str()?.parse().ok();
    }
    let mut words = line.split_whitespace();
    let tag = format!("listener={listener:?}");
    if !words.clone().any(|word| word == tag) {
        return None;
    }
    words.find_map(|word| word.strip_prefix("addr=")?.parse().ok())
}

/// Waits (up to 60 s) until the log file `path`, after its first `from`
/// bytes, has the line of `child`'s listener `listener` (see [`logged_addr`]);
/// the error says why not: the child ended first, or time ran out.
pub async fn logged_in_file(
    path: &Path,
    from: usize,
    child: &mut Child,
    listener: &str,
) -> Result<SocketAddr, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read(path).unwrap_or_default();
        let log = String::from_utf8_lossy(log.get(from..).unwrap_or_default());
        if let Some(addr) = log.lines().find_map(|line| logged_addr(line, listener)) {
            return Ok(addr);
        }
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!(
                "exited ({status}) before logging its {listener} listener"
            ));
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("logged no {listener} listener within 60 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The log (stderr) of a child server, read on a thread: each line goes on
/// to this test's stderr, so that a failure shows it, and the addresses the
/// server logs as it binds its listeners are kept for [`Listeners::addr`].
pub struct Listeners {
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    log: LogLines,
}

/// Every line a child server has logged so far.
#[derive(Clone, Default)]
pub struct LogLines(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl LogLines {
    /// The lines that contain every one of `words`.
    pub fn matching(&self, words: &[&str]) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|line| words.iter().all(|word| line.contains(word)))
            .cloned()
            .collect()
    }
}

impl Listeners {
    /// Follows `log` until it closes (the process has ended).
    pub fn follow(log: impl std::io::Read + Send + 'static) -> Self {
        use std::io::BufRead;
        let (tx, lines) = std::sync::mpsc::channel();
        let all = LogLines::default();
        let kept = all.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(log).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                kept.0.lock().unwrap().push(line.clone());
                if line.contains("listener") {
                    // The test may have stopped listening; the log goes on.
                    let _ = tx.send(line);
                }
            }
        });
        Self {
            lines,
            seen: Vec::new(),
            log: all,
        }
    }

    /// Every line logged so far, growing as the server logs more.
    pub fn log(&self) -> LogLines {
        self.log.clone()
    }

    /// Where the server's listener `listener` is bound, once logged; panics
    /// after 60 s or when the process ends first.
    pub async fn addr(&mut self, listener: &str) -> SocketAddr {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(addr) = self.seen.iter().find_map(|l| logged_addr(l, listener)) {
                return addr;
            }
            match self.lines.try_recv() {
                Ok(line) => self.seen.push(line),
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "no {listener} listener logged within 60 s"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    panic!("the server ended before logging its {listener} listener")
                }
            }
        }
    }
}

/// Starts `command` (a server) with its stderr followed by [`Listeners`].
pub fn spawn_server(command: &mut Command) -> (Child, Listeners) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let listeners = Listeners::follow(child.stderr.take().unwrap());
    (child, listeners)
}

/// A fresh token of the Kryoptic soft token (the module `scripts/kryoptic.sh`
/// builds, named by `CMK_TEST_KRYOPTIC_MODULE`), for daemons started with
/// [`DaemonProcess::start_on_token`] and [`Token::env`]. Kryoptic does
/// RSA-OAEP with SHA-256, so keys can be uploaded to it.
pub struct Token {
    pub module: PathBuf,
    pub label: String,
    pub pin_file: PathBuf,
    /// The token store (`KRYOPTIC_CONF`).
    pub store: PathBuf,
    _dir: tempfile::TempDir,
}

impl Token {
    /// Initialises a token in a temporary directory; fails the test, with how
    /// to build it, when the module is missing.
    pub fn kryoptic() -> Self {
        let module = std::env::var_os("CMK_TEST_KRYOPTIC_MODULE")
            .map(PathBuf::from)
            .filter(|m| m.is_file())
            .expect(
                "CMK_TEST_KRYOPTIC_MODULE names no file: build Kryoptic with \
                 `bash scripts/kryoptic.sh` and set the variable to what it prints \
                 (scripts/test.sh does both)",
            );
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("token.sql");
        let (label, pin) = ("cmk-e2e", "cmk-e2e-user-pin");
        let init = Command::new("pkcs11-tool")
            .arg("--module")
            .arg(&module)
            .args([
                "--init-token",
                "--label",
                label,
                "--so-pin",
                "cmk-e2e-so-pin",
            ])
            .args(["--init-pin", "--pin", pin])
            .env("KRYOPTIC_CONF", &store)
            .output()
            .expect("pkcs11-tool is missing: apt-get install opensc");
        assert!(init.status.success(), "pkcs11-tool --init-token: {init:?}");
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, pin).unwrap();
        std::fs::set_permissions(
            &pin_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        Self {
            module,
            label: label.into(),
            pin_file,
            store,
            _dir: dir,
        }
    }

    /// The environment a daemon on this token needs.
    pub fn env(&self) -> [(&str, &str); 1] {
        [("KRYOPTIC_CONF", self.store.to_str().unwrap())]
    }
}

/// `GET /metrics` at `addr`: the status line and the body.
pub fn scrape_metrics(addr: SocketAddr) -> (String, String) {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    write!(
        tcp,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// The `hsm-daemon` binary as a child process.
pub struct DaemonProcess {
    pub child: Child,
    /// Everything it has logged.
    pub log: LogLines,
    /// Its gRPC listener.
    pub addr: SocketAddr,
    /// Its Prometheus metrics listener.
    pub metrics: SocketAddr,
}

impl DaemonProcess {
    /// Starts the real binary on `listen` ([`ANY_PORT`], or the address a
    /// killed daemon had, so that a control plane finds it again) and waits
    /// for its health check to pass.
    pub async fn start(pki: &Pki, keystore: &Path, listen: SocketAddr) -> Self {
        Self::start_with(pki, keystore, listen, &[]).await
    }

    /// As [`DaemonProcess::start`], with `env` as extra environment (`CMK_HSM_*`
    /// settings, the AWS SDK's variables).
    pub async fn start_with(
        pki: &Pki,
        keystore: &Path,
        listen: SocketAddr,
        env: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new(binary("hsm-daemon"));
        command
            .arg("--keystore-dir")
            .arg(keystore)
            .arg("--root-key-file")
            .arg(pki.path("root.key"))
            .env_remove("CMK_HSM_ROOT_KEY")
            .envs(env.iter().copied());
        Self::spawn(pki, listen, command).await
    }

    /// As [`DaemonProcess::start`], with `custody = "pkcs11"` on the token
    /// `token`, and `env` as extra environment (the module's own variable,
    /// such as `KRYOPTIC_CONF`, naming the token store).
    pub async fn start_on_token(
        pki: &Pki,
        token: &Token,
        listen: SocketAddr,
        env: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new(binary("hsm-daemon"));
        command
            .args(["--custody", "pkcs11", "--pkcs11-module"])
            .arg(&token.module)
            .arg("--pkcs11-token-label")
            .arg(&token.label)
            .arg("--pkcs11-pin-file")
            .arg(&token.pin_file)
            .envs(env.iter().copied());
        Self::spawn(pki, listen, command).await
    }

    /// Starts `command` (the daemon with its custody settings) with the test
    /// PKI on `listen`.
    async fn spawn(pki: &Pki, listen: SocketAddr, mut command: Command) -> Self {
        let (child, mut listeners) = spawn_server(
            command
                .arg("--listen")
                .arg(listen.to_string())
                .arg("--allowed-client")
                .arg(CONTROL_PLANE)
                .arg("--tls-cert")
                .arg(pki.path("server.crt"))
                .arg("--tls-key")
                .arg(pki.path("server.key"))
                .arg("--tls-client-ca")
                .arg(pki.path("ca.crt"))
                .arg("--metrics-listen")
                .arg(ANY_PORT.to_string()),
        );
        let addr = listeners.addr("grpc").await;
        let metrics = listeners.addr("metrics").await;
        wait_healthy(addr, &pki.client_files("control-plane")).await;
        Self {
            child,
            log: listeners.log(),
            addr,
            metrics,
        }
    }

    /// HsmService requests this daemon has answered, by its metrics.
    pub fn hsm_requests_served(&self) -> u64 {
        scrape_metrics(self.metrics)
            .1
            .lines()
            .filter(|l| l.starts_with("cmk_grpc_requests_total{") && l.contains("HsmService/"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>() as u64
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
    control_plane_command_on(program, pki, &[hsm], data, &database, addr)
}

/// As [`control_plane_command`], on the store at the URL `database`, with
/// the HSM daemons at `hsms` (one, or several on one token).
pub fn control_plane_command_on(
    program: &Path,
    pki: &Pki,
    hsms: &[SocketAddr],
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
        .arg(pki.path("ca.crt"));
    for hsm in hsms {
        command.arg("--hsm-endpoint").arg(format!("https://{hsm}"));
    }
    command
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
    /// Starts the real binary on `listen` ([`ANY_PORT`], or the address a
    /// killed one had) against the HSM daemon at `hsm`, with its SQLite file
    /// and policy (the tests' [`control_plane::POLICY`]) in `data`, and `env`
    /// as extra `CMK_CP_*` settings; waits for its health check to pass.
    pub async fn start(
        pki: &Pki,
        hsm: SocketAddr,
        data: &Path,
        listen: SocketAddr,
        env: &[(&str, &str)],
    ) -> Self {
        let database = format!("sqlite://{}", data.join("cmk.db").display());
        Self::start_on(pki, hsm, data, &database, listen, env).await
    }

    /// As [`ControlPlaneProcess::start`], on the store at the URL `database`.
    pub async fn start_on(
        pki: &Pki,
        hsm: SocketAddr,
        data: &Path,
        database: &str,
        listen: SocketAddr,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_over(pki, &[hsm], data, database, listen, env).await
    }

    /// As [`ControlPlaneProcess::start_on`], with the HSM daemons at `hsms`.
    pub async fn start_over(
        pki: &Pki,
        hsms: &[SocketAddr],
        data: &Path,
        database: &str,
        listen: SocketAddr,
        env: &[(&str, &str)],
    ) -> Self {
        let program = binary("control-plane");
        let (child, mut listeners) = spawn_server(
            control_plane_command_on(&program, pki, hsms, data, database, listen)
                .envs(env.iter().copied()),
        );
        let mut process = Self {
            child,
            addr: listen,
        };
        process.addr = listeners.addr("grpc").await;
        wait_healthy(process.addr, &pki.client_files("admin-acme")).await;
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
