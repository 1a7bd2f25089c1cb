//! What the backend needs to know: which module, which token, its PIN, and how
//! many sessions it may keep open.

use std::{fs, os::unix::fs::MetadataExt, path::Path, path::PathBuf, time::Duration};

use cmk_hsm_custody::ImportKeyBits;
use cmk_secret::SecretBytes;

/// Which token of the module holds the keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSelector {
    /// The token with this label (as `pkcs11-tool -L` shows it). Survives
    /// slot renumbering, which SoftHSM2 does whenever a token is initialised.
    Label(String),
    /// The slot with this id.
    Slot(u64),
}

impl std::fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Label(label) => write!(f, "token {label:?}"),
            Self::Slot(slot) => write!(f, "the token in slot {slot}"),
        }
    }
}

/// Settings of the PKCS#11 backend. `Debug` is safe to log: the PIN prints
/// as a placeholder.
#[derive(Clone, Debug)]
pub struct Pkcs11Settings {
    /// The vendor's PKCS#11 module (a shared library), e.g.
    /// `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token.
    pub token: TokenSelector,
    /// The user PIN of the token.
    pub pin: SecretBytes,
    /// Most sessions open at once, so most token calls in flight at once.
    pub sessions: usize,
    /// How long one call may wait for a session and then for the token.
    pub timeout: Duration,
    /// Size of the RSA import key pair when the token has none yet.
    pub import_key_bits: ImportKeyBits,
}

impl Pkcs11Settings {
    /// Sessions unless configured otherwise.
    pub const DEFAULT_SESSIONS: usize = 8;
    /// Call timeout unless configured otherwise.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Settings with the default pool size, timeout and import key size.
    pub fn new(module: PathBuf, token: TokenSelector, pin: SecretBytes) -> Self {
        Self {
            module,
            token,
            pin,
            sessions: Self::DEFAULT_SESSIONS,
            timeout: Self::DEFAULT_TIMEOUT,
            import_key_bits: ImportKeyBits::default(),
        }
    }
}

/// Reads a PIN file: refused when readable beyond its owner and group (as the
/// root key file is), one trailing line break ignored, never echoed in an
/// error.
pub fn read_pin_file(path: &Path) -> Result<SecretBytes, String> {
    let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.mode() & 0o037 != 0 {
        return Err(format!(
            "{} is open to other users (mode {:o}); chmod 600 (or 640) it",
            path.display(),
            meta.mode() & 0o777
        ));
    }
    let mut pin = SecretBytes::new(fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?);
    pin_from_text(&mut pin).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(pin)
}

/// Strips one trailing line break (`echo pin > file` writes one) and refuses
/// an empty PIN.
pub fn pin_from_text(pin: &mut SecretBytes) -> Result<(), &'static str> {
    let text = pin.expose();
    let len = text
        .strip_suffix(b"\r\n")
        .or_else(|| text.strip_suffix(b"\n"))
        .map_or(text.len(), <[u8]>::len);
    pin.truncate(len);
    if pin.is_empty() {
        return Err("the PIN is empty");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    #[test]
    fn debug_never_prints_the_pin() {
        let settings = Pkcs11Settings::new(
            "/m.so".into(),
            TokenSelector::Label("t".into()),
            SecretBytes::copy_from(b"s3cret-pin"),
        );
        let printed = format!("{settings:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("redacted 10 bytes"), "{printed}");
    }

    #[test]
    fn pin_files_lose_one_line_break_and_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pin");
        fs::write(&path, "1234\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(read_pin_file(&path).expect("pin").expose(), b"1234");
        fs::write(&path, "\n").expect("write");
        let err = read_pin_file(&path).expect_err("empty");
        assert!(err.ends_with("the PIN is empty"), "{err}");
        fs::write(&path, "1234").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = read_pin_file(&path).expect_err("open");
        assert!(err.contains("open to other users"), "{err}");
        assert!(!err.contains("1234"), "{err}");
    }
}
