//! The PKCS#11 backend on a real token: SoftHSM2 (Debian's `softhsm2`), with
//! `pkcs11-tool` (`opensc`) to inspect it. Without them these tests fail: they
//! are never skipped.
//!
//! Each test runs its body on a fresh token of its own, in a child process
//! with `SOFTHSM2_CONF` naming it (see `common`).

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
    Custody, CustodyError, Destroyed, ImportError, KeyHandle, MaterialCustody, contract,
};
use cmk_hsm_pkcs11::{Pkcs11Custody, Pkcs11Settings, TokenSelector, token};
use cmk_secret::SecretBytes;
use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    object::{Attribute, AttributeType, ObjectClass},
    session::{Session, UserType},
    types::AuthPin,
};
use sha2::{Digest, Sha256};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const LABEL: &str = "cmk-test";
const PIN: &str = "1234";
const SO_PIN: &str = "12345678";

/// Runs `body` in a child process whose SoftHSM2 has one fresh token,
/// [`LABEL`] with user PIN [`PIN`].
fn on_fresh_token<F, Fut>(name: &str, body: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    common::on_fresh_token(name, "SoftHSM2", prepare_token, body);
}

/// A SoftHSM2 configuration whose token directory, under `dir`, holds one
/// fresh token.
fn prepare_token(dir: &Path) -> (&'static str, OsString) {
    assert!(
        Path::new(MODULE).is_file(),
        "{MODULE} is missing: install SoftHSM2 (apt-get install softhsm2 opensc; scripts/test.sh does)"
    );
    let conf = dir.join("softhsm2.conf");
    let tokens = dir.join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let init = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", LABEL])
        .args(["--so-pin", SO_PIN, "--pin", PIN])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("softhsm2-util is missing: apt-get install softhsm2");
    assert!(init.status.success(), "softhsm2-util: {init:?}");
    ("SOFTHSM2_CONF", conf.into_os_string())
}

/// A test whose body runs on a fresh SoftHSM2 token.
macro_rules! on_softhsm {
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
        MODULE.into(),
        TokenSelector::Label(LABEL.into()),
        SecretBytes::copy_from(PIN.as_bytes()),
    );
    settings.sessions = 4;
    settings.timeout = Duration::from_secs(20);
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
    let pkcs11 = Pkcs11::new(MODULE).unwrap();
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

fn tombstone_value(session: &Session, handle: &KeyHandle) -> Option<Vec<u8>> {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Label(handle.to_string().into_bytes()),
        ])
        .unwrap();
    let object = *found.first()?;
    session
        .get_attributes(object, &[AttributeType::Value])
        .unwrap()
        .into_iter()
        .find_map(|a| match a {
            Attribute::Value(v) => Some(v),
            _ => None,
        })
}

on_softhsm! {
    /// Everything of the contract that needs no import.
    async fn the_contract_holds_without_import() {
        let custody = open(settings()).await.unwrap();
        contract::without_import(&custody).await;
    }
}

on_softhsm! {
    /// SoftHSM2 2.6 cannot unwrap OAEP with SHA-256: every import and
    /// recovery is refused, naming the limit, and leaves nothing behind.
    async fn import_is_refused_naming_the_token_limit() {
        let custody = open(settings()).await.unwrap();
        let public = custody.import_public_key().clone();
        let handle = contract::handle();
        for wrapped in [
            contract::wrap_for_import(&public, contract::random(32).expose()),
            contract::wrap_for_import_sha1(&public, contract::random(32).expose()),
        ] {
            match custody.import(&handle, &contract::scope(), &wrapped).await {
                Err(err @ CustodyError::DeviceCannot(_)) => {
                    let text = err.to_string();
                    assert!(
                        text.contains("cannot unwrap RSA-OAEP with SHA-256")
                            && text.contains("SoftHSM2 supports only SHA-1"),
                        "{text}"
                    );
                }
                other => panic!("import on SoftHSM2: {other:?}"),
            }
        }
        // Shapes that cannot be a ciphertext are refused before the token.
        assert!(matches!(
            custody.import(&handle, &contract::scope(), &[]).await,
            Err(CustodyError::Import(ImportError::Empty))
        ));
        assert!(matches!(
            custody.import(&handle, &contract::scope(), &[7; 100]).await,
            Err(CustodyError::Import(ImportError::CiphertextLength {
                actual: 100,
                expected: 384,
                bits: 3072
            }))
        ));
        // Nothing was stored: the handle is still free.
        custody.generate(&handle, &contract::scope()).await.expect("handle still unused");

        // Recovery needs the same unwrap: refused the same way for a
        // destroyed key, and an unknown handle is named as such.
        custody.destroy(&handle).await.unwrap();
        let again = contract::wrap_for_import(&public, contract::random(32).expose());
        assert!(matches!(
            custody.recover(&handle, &contract::scope(), &again).await,
            Err(CustodyError::DeviceCannot(token::OAEP_SHA256_UNSUPPORTED))
        ));
        let unknown = contract::handle();
        assert!(matches!(
            custody.recover(&unknown, &contract::scope(), &again).await,
            Err(CustodyError::UnknownKey(h)) if h == unknown
        ));
        assert_eq!(
            custody.destroy(&handle).await.unwrap(),
            Destroyed::Already,
            "a refused recovery leaves the key destroyed"
        );
    }
}

on_softhsm! {
    /// Destroy leaves a tombstone on the token holding a 256-bit fingerprint
    /// computed in the token, different for different keys; the handle stays
    /// retired across a restart.
    async fn destroy_keeps_a_fingerprint_in_a_tombstone() {
        let custody = open(settings()).await.unwrap();
        let (a, b) = (contract::handle(), contract::handle());
        custody.generate(&a, &contract::scope()).await.unwrap();
        custody.generate(&b, &contract::scope()).await.unwrap();
        let inspector = inspector();
        assert_eq!(tombstone_value(&inspector, &a), None);
        assert_eq!(custody.destroy(&a).await.unwrap(), Destroyed::Now);
        assert_eq!(custody.destroy(&b).await.unwrap(), Destroyed::Now);
        let (fa, fb) = (
            tombstone_value(&inspector, &a).expect("tombstone of a"),
            tombstone_value(&inspector, &b).expect("tombstone of b"),
        );
        assert_eq!(fa.len(), 1 + token::FINGERPRINT_LEN);
        assert_eq!(fa[0], 1, "tombstone format version");
        assert_ne!(fa, fb, "fingerprints tell keys apart");
        assert!(fa[1..].iter().any(|&byte| byte != 0));
        // The key object itself is gone.
        let keys = inspector
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Id(a.as_bytes().to_vec()),
            ])
            .unwrap();
        assert!(keys.is_empty(), "the destroyed key is still on the token");

        drop(custody);
        let reopened = open(settings()).await.unwrap();
        assert_eq!(reopened.destroy(&a).await.unwrap(), Destroyed::Already);
        assert!(matches!(
            reopened.generate(&a, &contract::scope()).await,
            Err(CustodyError::HandleInUse { destroyed: true, .. })
        ));
    }
}

on_softhsm! {
    /// The import key pair is generated in the token once and found again;
    /// its public key is published as the software keystore publishes its
    /// own; keys and what they wrapped survive a restart.
    async fn the_import_key_and_the_keys_survive_a_restart() {
        let custody = open(settings()).await.unwrap();
        let public = custody.import_public_key().clone();
        assert_eq!(public.bits, 3072);
        let der = {
            use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
            rsa::RsaPublicKey::from_public_key_pem(&public.pem)
                .unwrap()
                .to_public_key_der()
                .unwrap()
        };
        assert_eq!(public.key_id, hex::encode(Sha256::digest(der.as_bytes())));

        let handle = contract::handle();
        let info = custody.generate(&handle, &contract::scope()).await.unwrap();
        let secret = contract::random(32);
        let ct = custody.wrap(&handle, &secret, b"org/kek").await.unwrap();
        drop(custody);

        let reopened = open(settings()).await.unwrap();
        assert_eq!(reopened.import_public_key(), &public, "the same import key");
        let out = reopened.unwrap(&ct, b"org/kek").await.unwrap();
        assert!(out.plaintext.ct_eq(&secret));
        assert_eq!(out.handle, info.handle);

        let inspector = inspector();
        let private = inspector
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(token::IMPORT_KEY_LABEL.as_bytes().to_vec()),
            ])
            .unwrap();
        assert_eq!(private.len(), 1, "one import key, not one per start");
    }
}

on_softhsm! {
    /// pkcs11-tool, reading the token as an operator would, finds every key
    /// sensitive and never extractable, and one tombstone per destroyed key.
    async fn pkcs11_tool_finds_every_key_sensitive_and_never_extractable() {
        let custody = open(settings()).await.unwrap();
        let handles: Vec<KeyHandle> = (0..3).map(|_| contract::handle()).collect();
        for handle in &handles {
            custody.generate(handle, &contract::scope()).await.unwrap();
        }
        custody.destroy(&handles[0]).await.unwrap();

        common::assert_token_as_operators_see_it(
            Path::new(MODULE),
            LABEL,
            PIN,
            &handles[1..],
            &handles[..1],
        );
    }
}

on_softhsm! {
    /// A token that loses the login (here: logged out behind the backend's
    /// back) makes the call that meets it UNAVAILABLE, not "unknown key";
    /// the next call logs in again and succeeds.
    async fn a_lost_login_is_unavailable_then_recovered() {
        let custody = open(settings()).await.unwrap();
        let handle = contract::handle();
        custody.generate(&handle, &contract::scope()).await.unwrap();
        let secret = contract::random(32);
        let ct = custody.wrap(&handle, &secret, b"").await.unwrap();

        inspector().logout().unwrap();
        match custody.unwrap(&ct, b"").await {
            Err(CustodyError::Unavailable(message)) => {
                assert!(message.contains("reconnecting"), "{message}")
            }
            other => panic!("after a lost login: {other:?}"),
        }
        let out = custody.unwrap(&ct, b"").await.expect("logged in again");
        assert!(out.plaintext.ct_eq(&secret));
        assert!(matches!(
            custody.wrap(&contract::handle(), &secret, b"").await,
            Err(CustodyError::UnknownKey(_))
        ));
    }
}

on_softhsm! {
    /// A wrong PIN or token stops the backend at start with the reason,
    /// never the PIN.
    async fn a_wrong_pin_or_token_is_named_at_start() {
        let mut wrong = settings();
        wrong.pin = SecretBytes::copy_from(b"98765");
        let err = open(wrong).await.expect_err("wrong PIN").to_string();
        assert!(err.contains("CKR_PIN_INCORRECT"), "{err}");
        assert!(!err.contains("98765"), "{err}");

        let mut missing = settings();
        missing.token = TokenSelector::Label("no-such-token".into());
        let err = open(missing).await.expect_err("no token").to_string();
        assert!(err.contains("\"no-such-token\" not found"), "{err}");

        let mut module = settings();
        module.module = PathBuf::from("/nonexistent/libpkcs11.so");
        let err = open(module).await.expect_err("no module").to_string();
        assert!(err.contains("cannot load the PKCS#11 module /nonexistent"), "{err}");
    }
}
