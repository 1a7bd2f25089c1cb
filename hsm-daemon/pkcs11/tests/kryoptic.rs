//! The PKCS#11 backend on Kryoptic, a soft token that unwraps RSA-OAEP with
//! SHA-256: the whole custody contract, import and recovery included, and the
//! seed flow with the OpenSSL CLI followed by an operator's inspection of the
//! token with `pkcs11-tool` (`opensc`).
//!
//! The module is the one `scripts/kryoptic.sh` builds, named by
//! `CMK_TEST_KRYOPTIC_MODULE` (`scripts/test.sh` sets it). Without it, or
//! without `pkcs11-tool` and `openssl`, these tests fail: they are never
//! skipped.
//!
//! Kryoptic finds its token store through `KRYOPTIC_CONF`, which it reads
//! once per process, so each test runs its body in a child process of this
//! test binary with `KRYOPTIC_CONF` naming a fresh token of its own, as
//! `softhsm.rs` does with `SOFTHSM2_CONF`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::{
    ffi::OsString,
    future::Future,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use cmk_hsm_custody::{
    Custody, CustodyError, ImportError, ImportKey, ImportKeyBits, KeyOrigin, MaterialCustody,
    contract,
};
use cmk_hsm_pkcs11::{Pkcs11Custody, Pkcs11Settings, TokenSelector};
use cmk_secret::SecretBytes;
use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    session::{Session, UserType},
    types::AuthPin,
};

/// Names the module built by `scripts/kryoptic.sh`.
const MODULE_VAR: &str = "CMK_TEST_KRYOPTIC_MODULE";
const LABEL: &str = "cmk-test";
const PIN: &str = "cmk-test-pin";
const SO_PIN: &str = "cmk-test-so-pin";

/// The Kryoptic module; a missing or unloadable one fails the test with how
/// to build it.
fn module() -> PathBuf {
    let how = "build it with `bash scripts/kryoptic.sh` and run the tests with \
               CMK_TEST_KRYOPTIC_MODULE=$(bash scripts/kryoptic.sh) (scripts/test.sh does both)";
    let module = std::env::var_os(MODULE_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{MODULE_VAR} is not set: {how}"));
    if let Err(error) = Pkcs11::new(&module) {
        panic!(
            "the Kryoptic module {} does not load ({error}): {how}",
            module.display()
        );
    }
    module
}

/// Runs `body` in a child process whose Kryoptic has one fresh token,
/// [`LABEL`] with user PIN [`PIN`], stored in `<tempdir>/token.sql`.
fn on_fresh_token<F, Fut>(name: &str, body: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    common::on_fresh_token(name, "Kryoptic", prepare_token, body);
}

/// A Kryoptic token store under `dir` with one fresh token.
fn prepare_token(dir: &Path) -> (&'static str, OsString) {
    let module = module();
    let conf = dir.join("token.sql");
    let init = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(&module)
        .args(["--init-token", "--label", LABEL, "--so-pin", SO_PIN])
        .args(["--init-pin", "--pin", PIN])
        .env("KRYOPTIC_CONF", &conf)
        .output()
        .expect("pkcs11-tool is missing: apt-get install opensc");
    assert!(init.status.success(), "pkcs11-tool --init-token: {init:?}");
    ("KRYOPTIC_CONF", conf.into_os_string())
}

/// A test whose body runs on a fresh Kryoptic token.
macro_rules! on_kryoptic {
    ($(#[doc = $doc:literal])* async fn $name:ident() $body:block) => {
        $(#[doc = $doc])*
        #[test]
        fn $name() {
            on_fresh_token(stringify!($name), || async move $body)
        }
    };
}

fn settings() -> Pkcs11Settings {
    let mut settings = Pkcs11Settings::new(
        module(),
        TokenSelector::Label(LABEL.into()),
        SecretBytes::copy_from(PIN.as_bytes()),
    );
    settings.sessions = 4;
    settings.timeout = Duration::from_secs(30);
    settings
}

async fn open(settings: Pkcs11Settings) -> Result<Pkcs11Custody, CustodyError> {
    tokio::task::spawn_blocking(move || Pkcs11Custody::open(&settings))
        .await
        .unwrap()
}

/// A session of the test's own on the token (the module is loaded once per
/// process, so this shares the backend's login).
fn inspector() -> Session {
    let pkcs11 = Pkcs11::new(module()).unwrap();
    let _ = pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = pkcs11
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|slot| pkcs11.get_token_info(*slot).unwrap().label() == LABEL)
        .unwrap();
    let session = pkcs11.open_rw_session(slot).unwrap();
    let _ = session.login(UserType::User, Some(&AuthPin::from(PIN)));
    session
}

/// The token directory of the running child.
fn token_dir() -> PathBuf {
    common::token_dir().unwrap()
}

/// The public half of an RSA key that is not the token's import key.
fn other_import_key(bits: ImportKeyBits) -> cmk_hsm_custody::ImportPublicKey {
    ImportKey::generate(bits).unwrap().public().clone()
}

/// Runs `program` and returns its standard output; fails the test if it
/// cannot run or fails.
fn run(program: &str, args: &[&str], cwd: &Path) -> Vec<u8> {
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("{program} cannot run ({e}): scripts/test.sh installs it"));
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
    out.stdout
}

on_kryoptic! {
    /// The whole contract: import by `C_UnwrapKey` with OAEP-SHA-256, the
    /// 32-byte rule, the SHA-1 hint, refusals of other import keys,
    /// recovery, wrap/unwrap, batches and destroy.
    async fn the_full_contract_holds() {
        let custody = open(settings()).await.unwrap();
        assert_eq!(custody.import_public_key().bits, 3072);
        contract::all(&custody, &other_import_key(ImportKeyBits::Rsa3072)).await;
        // An upload for an import key of another size is refused by its
        // length, before the token is asked.
        contract::bad_imports_are_refused(&custody, &other_import_key(ImportKeyBits::Rsa4096))
            .await;
        contract::a_handle_never_issued_has_nothing_to_recover(&custody).await;
    }
}

on_kryoptic! {
    /// Kryoptic answers an OAEP ciphertext that does not decrypt with
    /// `CKR_DEVICE_ERROR`, which the backend reads as a bad upload only while
    /// the session still answers, logged in. A token that lost the login
    /// (here: logged out behind the backend's back) makes the import
    /// UNAVAILABLE, never "undecryptable", and the next one logs in again.
    async fn a_lost_login_during_import_is_unavailable_not_a_bad_upload() {
        let custody = open(settings()).await.unwrap();
        let public = custody.import_public_key().clone();
        let garbage = contract::random(public.bits as usize / 8);
        assert!(matches!(
            custody.import(&contract::handle(), &contract::scope(), garbage.expose()).await,
            Err(CustodyError::Import(ImportError::Undecryptable { .. }))
        ));

        inspector().logout().unwrap();
        match custody.import(&contract::handle(), &contract::scope(), garbage.expose()).await {
            Err(CustodyError::Unavailable(message)) => {
                assert!(message.contains("reconnecting"), "{message}")
            }
            other => panic!("import after a lost login: {other:?}"),
        }
        let cmk = contract::random(32);
        custody
            .import(&contract::handle(), &contract::scope(), &contract::wrap_for_import(&public, cmk.expose()))
            .await
            .expect("logged in again");
    }
}

on_kryoptic! {
    /// Imported keys, what they wrapped, tombstones and recovery survive a
    /// restart of the backend on the same token.
    async fn imported_keys_and_tombstones_survive_a_restart() {
        let custody = open(settings()).await.unwrap();
        let public = custody.import_public_key().clone();
        let cmk = contract::random(32);
        let handle = contract::handle();
        let info = custody
            .import(&handle, &contract::scope(), &contract::wrap_for_import(&public, cmk.expose()))
            .await
            .unwrap();
        let secret = contract::random(32);
        let ct = custody.wrap(&handle, &secret, b"org/kek").await.unwrap();
        custody.destroy(&handle).await.unwrap();
        drop(custody);

        let reopened = open(settings()).await.unwrap();
        assert_eq!(reopened.import_public_key(), &public, "the same import key");
        assert!(matches!(
            reopened.unwrap(&ct, b"org/kek").await,
            Err(CustodyError::DestroyedKey(h)) if h == handle
        ));
        let other = contract::wrap_for_import(&public, contract::random(32).expose());
        assert!(matches!(
            reopened.recover(&handle, &contract::scope(), &other).await,
            Err(CustodyError::NotTheDestroyedKey(_))
        ));
        let recovered = reopened
            .recover(&handle, &contract::scope(), &contract::wrap_for_import(&public, cmk.expose()))
            .await
            .unwrap();
        assert_eq!(recovered.check_value, info.check_value);
        let out = reopened.unwrap(&ct, b"org/kek").await.unwrap();
        assert!(out.plaintext.ct_eq(&secret));
    }
}

on_kryoptic! {
    /// The seed flow as a customer runs it — a random key wrapped with the
    /// OpenSSL CLI recipe under the published PEM — imported into Kryoptic;
    /// then `pkcs11-tool`, reading the token as an operator would, finds
    /// every CMK sensitive and never extractable, and no file of the token
    /// holds the key's value in clear (raw, hex or base64).
    async fn the_seed_flow_keeps_the_key_inside_the_token() {
        let custody = open(settings()).await.unwrap();
        let work = tempfile::tempdir().unwrap();
        let cwd = work.path();
        std::fs::write(cwd.join("pub.pem"), &custody.import_public_key().pem).unwrap();
        run("openssl", &["rand", "-out", "cmk.bin", "32"], cwd);
        run(
            "openssl",
            &[
                "pkeyutl", "-encrypt", "-pubin", "-inkey", "pub.pem", "-in", "cmk.bin",
                "-out", "cmk.wrapped", "-pkeyopt", "rsa_padding_mode:oaep",
                "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha256",
            ],
            cwd,
        );
        let cmk = SecretBytes::new(std::fs::read(cwd.join("cmk.bin")).unwrap());
        assert_eq!(cmk.expose().len(), 32);
        let wrapped = std::fs::read(cwd.join("cmk.wrapped")).unwrap();

        let handle = contract::handle();
        let info = custody.import(&handle, &contract::scope(), &wrapped).await.expect("import");
        assert_eq!(info.origin, KeyOrigin::Imported);
        // The check value the customer computes with the same CLI.
        std::fs::write(cwd.join("zero.bin"), [0; 16]).unwrap();
        let hexkey = format!("hexkey:{}", hex::encode(cmk.expose()));
        let cmac = run(
            "openssl",
            &["mac", "-cipher", "AES-256-CBC", "-macopt", &hexkey, "-in", "zero.bin", "CMAC"],
            cwd,
        );
        let cmac = String::from_utf8(cmac).unwrap().trim().to_uppercase();
        assert_eq!(info.check_value.to_string(), cmac[..10], "check value");
        // OpenSSL's default OAEP (SHA-1) is named as the mistake it is.
        run(
            "openssl",
            &[
                "pkeyutl", "-encrypt", "-pubin", "-inkey", "pub.pem", "-in", "cmk.bin",
                "-out", "sha1.wrapped", "-pkeyopt", "rsa_padding_mode:oaep",
            ],
            cwd,
        );
        let sha1 = std::fs::read(cwd.join("sha1.wrapped")).unwrap();
        assert!(matches!(
            custody.import(&contract::handle(), &contract::scope(), &sha1).await,
            Err(CustodyError::Import(ImportError::OaepSha1))
        ));

        let secret = contract::random(32);
        let ct = custody.wrap(&handle, &secret, b"org/kek").await.unwrap();
        assert!(custody.unwrap(&ct, b"org/kek").await.unwrap().plaintext.ct_eq(&secret));
        let generated = contract::handle();
        custody.generate(&generated, &contract::scope()).await.unwrap();
        let destroyed = contract::handle();
        custody.generate(&destroyed, &contract::scope()).await.unwrap();
        custody.destroy(&destroyed).await.unwrap();

        common::assert_token_as_operators_see_it(
            &module(),
            LABEL,
            PIN,
            &[handle, generated],
            &[destroyed],
        );

        // The token's files, after the backend and pkcs11-tool wrote them.
        drop(custody);
        assert_not_in_files(&token_dir(), &cmk, cwd);
    }
}

/// Asserts that no file under `dir` holds `key` raw, in hex (either case)
/// or in base64.
fn assert_not_in_files(dir: &Path, key: &SecretBytes, work: &Path) {
    let raw = key.expose();
    std::fs::write(work.join("key.bin"), raw).unwrap();
    let base64 = run("openssl", &["base64", "-A", "-in", "key.bin"], work);
    let base64 = String::from_utf8(base64).unwrap().trim().to_owned();
    assert_eq!(base64.len(), 44);
    let url_safe = base64.replace('+', "-").replace('/', "_");
    let needles: Vec<(&str, Vec<u8>)> = vec![
        ("raw", raw.to_vec()),
        ("hex", hex::encode(raw).into_bytes()),
        ("HEX", hex::encode_upper(raw).into_bytes()),
        ("base64", base64.trim_end_matches('=').as_bytes().to_vec()),
        (
            "base64url",
            url_safe.trim_end_matches('=').as_bytes().to_vec(),
        ),
    ];
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        files += 1;
        let bytes = std::fs::read(&path).unwrap();
        for (form, needle) in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                "{} holds the CMK in clear ({form})",
                path.display()
            );
        }
    }
    assert!(files > 0, "no token file in {}", dir.display());
}
