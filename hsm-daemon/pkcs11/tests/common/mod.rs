//! Running a test's body on a fresh token of its own. Soft tokens find their
//! store through an environment variable they read once per process
//! (`SOFTHSM2_CONF`, `KRYOPTIC_CONF`), and a test cannot set a variable for
//! itself (`set_var` is unsafe under edition 2024, and unsafe code is
//! forbidden here). So the test prepares a token in a fresh directory and
//! runs itself again as a child process with the variable set: tests stay
//! parallel and never share a token.

use std::{ffi::OsString, future::Future, path::Path, process::Command};

/// Set in the child process: the token directory.
const CHILD: &str = "CMK_TEST_PKCS11_TOKEN_DIR";

/// In the child process, runs `body`. In the parent, has `prepare` set up a
/// token in a fresh directory and return the variable (name and value) that
/// points `token`'s module at it, then runs the test `name` again in a child
/// process with it and requires that it ran and passed.
pub fn on_fresh_token<F, Fut>(
    name: &str,
    token: &str,
    prepare: impl FnOnce(&Path) -> (&'static str, OsString),
    body: F,
) where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    if std::env::var_os(CHILD).is_some() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        return runtime.block_on(body());
    }
    let dir = tempfile::tempdir().unwrap();
    let (variable, value) = prepare(dir.path());
    let child = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(variable, value)
        .env(CHILD, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&child.stdout);
    let stderr = String::from_utf8_lossy(&child.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(child.status.success(), "{name} failed on {token}");
    assert!(
        stdout.contains("1 passed"),
        "{name} did not run in the child process"
    );
}

/// The token directory of the child process.
#[allow(dead_code)]
pub fn token_dir() -> Option<std::path::PathBuf> {
    std::env::var_os(CHILD).map(Into::into)
}

/// Reads the token as an operator would, with pkcs11-tool, and asserts that
/// every secret and private key (the RSA import key and the audit signing
/// key) is sensitive and never extractable, that
/// `live` are listed by their labels (handle and scope), and that each of `destroyed` left one
/// tombstone.
pub fn assert_token_as_operators_see_it(
    module: &Path,
    label: &str,
    pin: &str,
    live: &[cmk_hsm_custody::KeyHandle],
    destroyed: &[cmk_hsm_custody::KeyHandle],
) {
    let listing = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(module)
        .args([
            "--token-label",
            label,
            "--login",
            "--pin",
            pin,
            "--list-objects",
        ])
        .output()
        .expect("pkcs11-tool is missing: apt-get install opensc");
    assert!(listing.status.success(), "{listing:?}");
    let text = String::from_utf8_lossy(&listing.stdout);
    let objects = blocks(&text);
    let of_kind = |kind: &'static str| -> Vec<&String> {
        objects.iter().filter(|b| b.starts_with(kind)).collect()
    };
    let secret_keys = of_kind("Secret Key Object");
    assert_eq!(secret_keys.len(), live.len(), "the live keys in:\n{text}");
    let private_keys = of_kind("Private Key Object");
    // The RSA import key and the ECDSA audit signing key, nothing else.
    assert_eq!(private_keys.len(), 2, "two private keys in:\n{text}");
    for (kind, label) in [("RSA", "cmk-import-key"), ("EC", "cmk-audit-signing-key")] {
        assert!(
            private_keys
                .iter()
                .any(|b| b.starts_with(&format!("Private Key Object; {kind}")) && b.contains(label)),
            "no {kind} private key {label} in:\n{text}"
        );
    }
    for block in secret_keys.iter().chain(&private_keys) {
        let access = block
            .lines()
            .find(|l| l.trim_start().starts_with("Access:"))
            .unwrap_or_else(|| panic!("no access line in:\n{block}"));
        assert!(access.contains("sensitive"), "{block}");
        assert!(access.contains("never extractable"), "{block}");
        assert!(
            !access
                .replace("never extractable", "")
                .contains("extractable"),
            "extractable key:\n{block}"
        );
    }
    // Each live key labelled with its handle and the scope it serves: every
    // key these tests add serves the contract's org.
    for handle in live {
        let label = format!("{handle} {}", cmk_hsm_custody::contract::scope());
        assert!(
            secret_keys.iter().any(|b| b.contains(&label)),
            "{handle} not listed by its label {label:?}:\n{text}"
        );
    }
    let tombstones = of_kind("Data object");
    assert_eq!(tombstones.len(), destroyed.len(), "{text}");
    for handle in destroyed {
        assert!(
            tombstones.iter().any(|b| b.contains(&handle.to_string())
                && b.contains(cmk_hsm_pkcs11::token::TOMBSTONE_APPLICATION)),
            "no tombstone of {handle} in:\n{text}"
        );
    }
}

/// pkcs11-tool's listing, one block per object.
fn blocks(listing: &str) -> Vec<String> {
    let mut blocks: Vec<String> = Vec::new();
    for line in listing.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            blocks.push(String::new());
        }
        if let Some(block) = blocks.last_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    blocks
}
