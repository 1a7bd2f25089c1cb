//! The local quickstart: one directory holding a development CA and every
//! certificate, the HSM daemon's root key and keystore, the control plane's
//! SQLite database, configuration files for both processes and for `cmkctl`,
//! and their logs. [`prepare`] creates what is missing and keeps what is there,
//! so a second run finds the same keys.
//!
//! For trying cmk out only: the root key sits in a plain file beside the
//! keystore it protects, and one CA signs every identity.

#![forbid(unsafe_code)]

use std::{
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use cmk_pki::Ca;

/// The control plane's identity towards the HSM daemon.
pub const CONTROL_PLANE_IDENTITY: &str = "spiffe://cmk.local/control-plane";

/// The client identities made for each development organisation: file name
/// stem, identity (with `{org}` replaced), role in that organisation.
const ORG_IDENTITIES: [(&str, &str, &str); 3] = [
    ("admin", "spiffe://cmk.local/admin/{org}", "admin"),
    ("reader", "spiffe://cmk.local/reader/{org}", "read-only"),
    (
        "service",
        "spiffe://cmk.local/service/{org}",
        "internal-service",
    ),
];

/// Where everything lives and which ports the two processes listen on.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The quickstart directory, absolute.
    pub dir: PathBuf,
    /// The control plane's listen address.
    pub listen: SocketAddr,
    /// The HSM daemon's listen address.
    pub hsm_listen: SocketAddr,
    /// The organisation the generated admin, reader and service certificates act for.
    pub org: String,
}

/// Why the quickstart directory could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// A file or directory could not be created or read.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A certificate could not be made.
    #[error(transparent)]
    Pki(#[from] cmk_pki::PkiError),
    /// The root key could not be generated.
    #[error("cannot generate the root key: {0}")]
    Random(#[from] cmk_hsm_custody::CustodyError),
    /// The organisation id is not usable.
    #[error("--org: {0}")]
    Org(String),
}

impl Layout {
    /// The layout of `dir` (made absolute against the current directory, so
    /// the configuration files work from anywhere).
    pub fn new(
        dir: &Path,
        listen: SocketAddr,
        hsm_listen: SocketAddr,
        org: &str,
    ) -> Result<Self, PrepareError> {
        cmk_control_plane_domain::OrgId::parse(org).map_err(PrepareError::Org)?;
        let dir = std::path::absolute(dir).map_err(io_error(dir))?;
        Ok(Self {
            dir,
            listen,
            hsm_listen,
            org: org.into(),
        })
    }

    /// `<dir>/<name>`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `<dir>/pki/<name>`.
    pub fn pki(&self, name: &str) -> PathBuf {
        self.dir.join("pki").join(name)
    }

    /// The HSM daemon's configuration file.
    pub fn hsm_config(&self) -> PathBuf {
        self.path("hsm-daemon.toml")
    }

    /// The control plane's configuration file.
    pub fn control_plane_config(&self) -> PathBuf {
        self.path("control-plane.toml")
    }

    /// `cmkctl`'s configuration for the role file stem `admin`, `reader` or `service`.
    pub fn cmkctl_config(&self, stem: &str) -> PathBuf {
        match stem {
            "admin" => self.path("cmkctl.toml"),
            other => self.path(&format!("cmkctl-{other}.toml")),
        }
    }
}

/// Creates whatever of the layout is missing: the CA and certificates, the root
/// key, the authorisation policy (kept once written, so that it can be edited),
/// and (re)writes the configuration files for the current addresses.
pub fn prepare(layout: &Layout) -> Result<(), PrepareError> {
    let dir = &layout.dir;
    let pki = dir.join("pki");
    for sub in [dir.clone(), pki.clone(), dir.join("logs")] {
        fs::create_dir_all(&sub).map_err(io_error(&sub))?;
    }
    // Private keys and the root key live here.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_error(dir))?;

    if !pki.join("ca.crt").exists() {
        let ca = Ca::new("cmk development CA")?;
        ca.server(&["localhost", "hsm-daemon"])?
            .write(&pki, "hsm-daemon")?;
        ca.server(&["localhost", "control-plane"])?
            .write(&pki, "control-plane")?;
        ca.client(CONTROL_PLANE_IDENTITY)?
            .write(&pki, "control-plane-client")?;
        for (stem, identity, _) in ORG_IDENTITIES {
            ca.client(&identity.replace("{org}", &layout.org))?
                .write(&pki, stem)?;
        }
        // Written last: its presence means the set is complete.
        ca.write_cert(&pki.join("ca.crt"))?;
    }

    let root_key = dir.join("root.key");
    if !root_key.exists() {
        let mut key = cmk_secret::SecretBytes::zeroed(32);
        cmk_hsm_custody::fill_random(key.expose_mut())?;
        let hex = zeroize::Zeroizing::new(hex::encode(key.expose()));
        write_new(&root_key, hex.as_bytes(), 0o600)?;
    }

    let policy = dir.join("policy.toml");
    if !policy.exists() {
        write_new(&policy, policy_toml(&layout.org).as_bytes(), 0o644)?;
    }
    replace(&layout.hsm_config(), &hsm_toml(layout))?;
    replace(&layout.control_plane_config(), &control_plane_toml(layout))?;
    for (stem, _, _) in ORG_IDENTITIES {
        replace(&layout.cmkctl_config(stem), &cmkctl_toml(layout, stem))?;
    }
    Ok(())
}

/// Whether the gRPC health check on `addr` answers SERVING over mutual TLS
/// with `files`.
pub async fn healthy(addr: SocketAddr, files: &cmk_tls::TlsFiles) -> bool {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let Ok(tls) = cmk_tls::client_config(files, "localhost") else {
        return false;
    };
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("https://{addr}")) else {
        return false;
    };
    let Ok(endpoint) = endpoint.tls_config(tls) else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(std::time::Duration::from_secs(2))
        .timeout(std::time::Duration::from_secs(2))
        .connect()
        .await
    else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
}

/// What to try next, printed once both processes answer.
pub fn banner(layout: &Layout, hsm_pid: u32, control_plane_pid: u32) -> String {
    let dir = layout.dir.display();
    let log = |name: &str| layout.path("logs").join(name).display().to_string();
    let pki = |name: &str| layout.pki(name).display().to_string();
    let grpcurl = |stem: &str| {
        format!(
            "grpcurl -cacert {} -cert {} -key {}",
            pki("ca.crt"),
            pki(&format!("{stem}.crt")),
            pki(&format!("{stem}.key"))
        )
    };
    let org = &layout.org;
    let cp = layout.listen;
    format!(
        "cmk is running (development setup: not for production)\n\
         \x20 control-plane  {cp}  pid {control_plane_pid}  log {cp_log}\n\
         \x20 hsm-daemon     {hsm}  pid {hsm_pid}  log {hsm_log}\n\
         Certificates for the admin, reader and internal service of organisation \"{org}\" are in {pki_dir}.\n\
         \n\
         Try cmkctl, in another terminal in this repository:\n\
         \x20 alias cmkctl='cargo run -q --release -p cmkctl --'\n\
         \x20 export CMKCTL_CONFIG={cmkctl}   # admin; cmkctl-reader.toml, cmkctl-service.toml beside it\n\
         \x20 cmkctl list\n\
         \x20 cmkctl byok on\n\
         \x20 cmkctl public-key --out pub.pem\n\
         \x20 cmkctl wrap --public-key pub.pem --generate cmk.key --out cmk.wrapped\n\
         \x20 cmkctl upload --wrapped cmk.wrapped --activate now\n\
         \n\
         Or grpcurl (server reflection is on):\n\
         \x20 {admin} {cp} list\n\
         \x20 {admin} -d '{{\"org_id\":\"{org}\"}}' {cp} cmk.control.v1.KeyAdminService/ListKeys\n\
         \x20 {service} -d '{{\"org_id\":\"{org}\",\"resource\":\"meeting-1\"}}' {cp} cmk.control.v1.ContentKeyService/CreateKek\n\
         \n\
         The whole walk-through is docs/walkthrough.md. Ctrl-C stops both; running again reuses {dir}.",
        hsm = layout.hsm_listen,
        cp_log = log("control-plane.log"),
        hsm_log = log("hsm-daemon.log"),
        pki_dir = layout.path("pki").display(),
        cmkctl = layout.cmkctl_config("admin").display(),
        admin = grpcurl("admin"),
        service = grpcurl("service"),
    )
}

/// Where `init` put everything, and how to start the real binaries on it.
pub fn init_summary(layout: &Layout) -> String {
    format!(
        "Prepared {dir}. Start the two processes from their configuration files:\n\
         \x20 hsm-daemon --config {hsm}\n\
         \x20 control-plane --config {cp}\n\
         and talk to the control plane with cmkctl --config {cmkctl}",
        dir = layout.dir.display(),
        hsm = layout.hsm_config().display(),
        cp = layout.control_plane_config().display(),
        cmkctl = layout.cmkctl_config("admin").display(),
    )
}

fn policy_toml(org: &str) -> String {
    let mut text = String::from(
        "# Who may do what, per organisation. Add [[grant]] entries for more\n\
         # organisations; this file is kept across quickstart runs.\n",
    );
    for (_, identity, role) in ORG_IDENTITIES {
        text.push_str(&format!(
            "\n[[grant]]\nidentity = {}\norg = {}\nrole = {}\n",
            quote(&identity.replace("{org}", org)),
            quote(org),
            quote(role),
        ));
    }
    text
}

fn hsm_toml(layout: &Layout) -> String {
    let p = |name: &str| quote_path(&layout.pki(name));
    format!(
        "# Written by cmk-quickstart on every start; change its flags instead.\n\
         listen = {listen}\n\
         keystore_dir = {keystore}\n\
         root_key_file = {root_key}\n\
         allowed_clients = [{client}]\n\
         tls_cert = {cert}\n\
         tls_key = {key}\n\
         tls_client_ca = {ca}\n\
         log_format = \"text\"\n",
        listen = quote(&layout.hsm_listen.to_string()),
        keystore = quote_path(&layout.path("keystore")),
        root_key = quote_path(&layout.path("root.key")),
        client = quote(CONTROL_PLANE_IDENTITY),
        cert = p("hsm-daemon.crt"),
        key = p("hsm-daemon.key"),
        ca = p("ca.crt"),
    )
}

fn control_plane_toml(layout: &Layout) -> String {
    let p = |name: &str| quote_path(&layout.pki(name));
    let database = format!("sqlite://{}", layout.path("cmk.db").display());
    format!(
        "# Written by cmk-quickstart on every start; change its flags instead.\n\
         listen = {listen}\n\
         tls_cert = {cert}\n\
         tls_key = {key}\n\
         tls_client_ca = {ca}\n\
         hsm_endpoints = [{hsm}]\n\
         hsm_server_name = \"localhost\"\n\
         hsm_tls_cert = {hsm_cert}\n\
         hsm_tls_key = {hsm_key}\n\
         hsm_tls_ca = {ca}\n\
         database = {database}\n\
         policy_file = {policy}\n\
         log_format = \"text\"\n",
        listen = quote(&layout.listen.to_string()),
        cert = p("control-plane.crt"),
        key = p("control-plane.key"),
        ca = p("ca.crt"),
        hsm = quote(&format!("https://{}", layout.hsm_listen)),
        hsm_cert = p("control-plane-client.crt"),
        hsm_key = p("control-plane-client.key"),
        database = quote(&database),
        policy = quote_path(&layout.path("policy.toml")),
    )
}

fn cmkctl_toml(layout: &Layout, stem: &str) -> String {
    format!(
        "# cmkctl as {stem} of {org}; paths are relative to this file.\n\
         endpoint = {endpoint}\n\
         server_name = \"localhost\"\n\
         ca = \"pki/ca.crt\"\n\
         cert = \"pki/{stem}.crt\"\n\
         key = \"pki/{stem}.key\"\n\
         org = {org_value}\n",
        org = layout.org,
        endpoint = quote(&format!("https://{}", layout.listen)),
        org_value = quote(&layout.org),
    )
}

/// A TOML basic string, escaped by the `toml` crate.
fn quote(value: &str) -> String {
    toml::Value::String(value.into()).to_string()
}

fn quote_path(path: &Path) -> String {
    quote(&path.display().to_string())
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> PrepareError + '_ {
    move |source| PrepareError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), PrepareError> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_error(path))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_error(path))
}

/// Writes `contents` to `path` through a temporary file, so that a reader sees
/// the old file or the new one, never half of one.
fn replace(path: &Path, contents: &str) -> Result<(), PrepareError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(parent).map_err(io_error(parent))?;
    use std::io::Write;
    file.write_all(contents.as_bytes())
        .map_err(io_error(path))?;
    file.persist(path).map_err(|e| PrepareError::Io {
        path: path.display().to_string(),
        source: e.error,
    })?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn layout(dir: &Path) -> Layout {
        Layout::new(
            dir,
            "127.0.0.1:18443".parse().unwrap(),
            "127.0.0.1:17443".parse().unwrap(),
            "acme",
        )
        .unwrap()
    }

    #[test]
    fn prepares_a_directory_both_binaries_accept_and_keeps_keys_on_rerun() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = layout(&tmp.path().join("dev"));
        prepare(&layout).unwrap();
        let hsm = cmk_hsm_daemon::RawSettings::from_file(&layout.hsm_config())
            .unwrap()
            .validate(None)
            .unwrap();
        assert_eq!(hsm.listen, layout.hsm_listen);
        let cp = cmk_control_plane::RawSettings::from_file(&layout.control_plane_config())
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(cp.listen, layout.listen);

        let ca = fs::read(layout.pki("ca.crt")).unwrap();
        let root = fs::read(layout.path("root.key")).unwrap();
        fs::write(layout.path("policy.toml"), "# edited\n").unwrap();
        let moved = Layout {
            listen: "127.0.0.1:28443".parse().unwrap(),
            ..layout.clone()
        };
        prepare(&moved).unwrap();
        assert_eq!(fs::read(layout.pki("ca.crt")).unwrap(), ca);
        assert_eq!(fs::read(layout.path("root.key")).unwrap(), root);
        assert_eq!(
            fs::read_to_string(layout.path("policy.toml")).unwrap(),
            "# edited\n"
        );
        let cmkctl = fs::read_to_string(layout.cmkctl_config("admin")).unwrap();
        assert!(cmkctl.contains("https://127.0.0.1:28443"), "{cmkctl}");
    }

    #[test]
    fn secrets_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let layout = layout(tmp.path());
        prepare(&layout).unwrap();
        for path in [
            layout.path("root.key"),
            layout.pki("admin.key"),
            layout.pki("hsm-daemon.key"),
        ] {
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        let mode = fs::metadata(&layout.dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn refuses_an_unusable_org() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for org in ["", "a b", &"x".repeat(65)] {
            assert!(
                Layout::new(Path::new("d"), addr, addr, org).is_err(),
                "{org}"
            );
        }
    }
}
