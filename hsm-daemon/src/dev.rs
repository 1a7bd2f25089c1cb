//! `hsm-daemon dev`: a local daemon on loopback with a development CA and a root
//! key generated under one directory, reused on later runs. For trying the daemon
//! out only: the root key sits in a plain file beside the keystore it protects.

use std::{
    fs,
    path::{Path, PathBuf},
};

use cmk_pki::Ca;
use cmk_secret::SecretBytes;

use crate::config::{RawSettings, Settings};

/// The control plane's identity in development certificates.
pub const DEV_CONTROL_PLANE: &str = "spiffe://cmk.local/control-plane";

/// Creates (or reuses) `dir` with a development PKI, root key and keystore, and
/// returns settings for a daemon on `127.0.0.1:7443`, with `overrides` (flags and
/// environment) applied on top.
pub fn prepare(dir: &Path, overrides: RawSettings) -> Result<Settings, Box<dyn std::error::Error>> {
    let pki = dir.join("pki");
    fs::create_dir_all(&pki)?;
    // Private keys and the root key live here.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    if !pki.join("ca.crt").exists() {
        let ca = Ca::new("cmk development CA")?;
        ca.server(&["localhost", "hsm-daemon"])?
            .write(&pki, "hsm-daemon")?;
        ca.client(DEV_CONTROL_PLANE)?.write(&pki, "control-plane")?;
        // Written last: its presence means the set is complete.
        ca.write_cert(&pki.join("ca.crt"))?;
    }
    let root_key_file = dir.join("root.key");
    if !root_key_file.exists() {
        let mut key = SecretBytes::zeroed(32);
        cmk_hsm_custody::fill_random(key.expose_mut())?;
        write_private(&root_key_file, hex::encode(key.expose()).as_bytes())?;
    }
    let raw = RawSettings {
        listen: Some("127.0.0.1:7443".into()),
        keystore_dir: Some(dir.join("keystore")),
        root_key_file: Some(root_key_file),
        allowed_clients: vec![DEV_CONTROL_PLANE.into()],
        tls_cert: Some(pki.join("hsm-daemon.crt")),
        tls_key: Some(pki.join("hsm-daemon.key")),
        tls_client_ca: Some(pki.join("ca.crt")),
        ..RawSettings::default()
    };
    // The root key comes from the file above, never from the environment.
    Ok(raw.overlay(overrides).validate(None)?)
}

/// What to type next, printed once the daemon is ready.
pub fn banner(dir: &Path, settings: &Settings) -> String {
    let pki = dir.join("pki");
    let p = |name: &str| pki.join(name).display().to_string();
    format!(
        "hsm-daemon (development) on {listen}\n\
         \n\
         Try it with grpcurl, as the control plane:\n\
         \x20 grpcurl -cacert {ca} -cert {cert} -key {key} localhost:{port} list\n\
         \x20 grpcurl -cacert {ca} -cert {cert} -key {key} localhost:{port} cmk.hsm.v1.HsmService/GetImportPublicKey\n\
         \x20 grpcurl -cacert {ca} -cert {cert} -key {key} -d '{{\"generate\":{{}}}}' localhost:{port} cmk.hsm.v1.HsmService/Import\n\
         \n\
         Ctrl-C stops it; running it again reuses {dir}.",
        listen = settings.listen,
        port = settings.listen.port(),
        ca = p("ca.crt"),
        cert = p("control-plane.crt"),
        key = p("control-plane.key"),
        dir = dir.display(),
    )
}

/// Default directory of the development setup.
pub fn default_dir() -> PathBuf {
    PathBuf::from(".cmk-dev")
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}
