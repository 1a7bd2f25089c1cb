//! The HSM daemon with `custody = "pkcs11"` on a SoftHSM2 token, end to end
//! over real mutual TLS: Generate, Wrap, Unwrap (single and batch), Destroy,
//! and Import refused with the token's limit named. Fails, never skips,
//! without SoftHSM2.
//!
//! As in the backend's own tests (hsm-daemon/pkcs11/tests/softhsm.rs),
//! `SOFTHSM2_CONF` is read once per process and cannot be set from safe
//! code, so the body runs in a child process of this test binary.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{os::unix::fs::PermissionsExt, path::Path, process::Command};

use cmk_hsm_custody::contract;
use cmk_hsm_daemon::{RawSettings, config::SecretInputs};
use cmk_proto::hsm::v1::{
    BatchUnwrapRequest, BatchWrapRequest, DestroyRequest, Generate, GetImportPublicKeyRequest,
    ImportRequest, UnwrapRequest, WrapRequest, import_request::Source, unwrap_result, wrap_result,
};
use cmk_tests::{CONTROL_PLANE, InProcess, Pki};
use tonic::Code;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const LABEL: &str = "cmk-e2e";
const PIN: &str = "271828";
const CHILD: &str = "CMK_TEST_SOFTHSM_TOKEN_DIR";

#[test]
fn generate_wrap_unwrap_destroy_over_mtls_on_softhsm() {
    if std::env::var_os(CHILD).is_some() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        return runtime.block_on(on_softhsm());
    }
    assert!(
        Path::new(MODULE).is_file(),
        "{MODULE} is missing: install SoftHSM2 (apt-get install softhsm2 opensc; scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("softhsm2.conf");
    let tokens = dir.path().join("tokens");
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
        .args(["--so-pin", "12345678", "--pin", PIN])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("softhsm2-util is missing: apt-get install softhsm2");
    assert!(init.status.success(), "softhsm2-util: {init:?}");
    let name = "generate_wrap_unwrap_destroy_over_mtls_on_softhsm";
    let child = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &conf)
        .env(CHILD, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&child.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&child.stderr));
    assert!(child.status.success(), "the daemon on SoftHSM2 failed");
    assert!(stdout.contains("1 passed"), "the child ran no test");
}

async fn on_softhsm() {
    let pki = Pki::new();
    let pin_file = pki.path("pkcs11.pin");
    std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
    std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let raw = RawSettings {
        listen: Some("127.0.0.1:0".into()),
        custody: Some("pkcs11".into()),
        pkcs11_module: Some(MODULE.into()),
        pkcs11_token_label: Some(LABEL.into()),
        pkcs11_pin_file: Some(pin_file),
        allowed_clients: vec![CONTROL_PLANE.into()],
        tls_cert: Some(pki.path("server.crt")),
        tls_key: Some(pki.path("server.key")),
        tls_client_ca: Some(pki.path("ca.crt")),
        ..RawSettings::default()
    };
    let settings = raw.validate_with(SecretInputs::default()).unwrap();
    let daemon = InProcess::start(settings).await;
    let mut client = pki.hsm_client(daemon.addr).await;

    let public = client
        .get_import_public_key(GetImportPublicKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(public.modulus_bits, 3072);
    assert_eq!(public.key_id.len(), 64);

    let generated = client
        .import(ImportRequest {
            source: Some(Source::Generate(Generate { shared: false })),
            import_key_id: String::new(),
            key_handle: String::new(),
            recover: false,
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(generated.key_check_value.len(), 10);
    let handle = generated.key_handle;

    let ciphertext = client
        .wrap(WrapRequest {
            key_handle: handle.clone(),
            plaintext: vec![7; 32],
            associated_data: b"org-1/kek-1".to_vec(),
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let opened = client
        .unwrap(UnwrapRequest {
            ciphertext: ciphertext.clone(),
            associated_data: b"org-1/kek-1".to_vec(),
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, vec![7; 32]);
    assert_eq!(opened.key_handle, handle);
    let refused = client
        .unwrap(UnwrapRequest {
            ciphertext: ciphertext.clone(),
            associated_data: b"org-1/kek-2".to_vec(),
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .expect_err("other associated data");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    let items = (0..5u8)
        .map(|i| WrapRequest {
            key_handle: handle.clone(),
            plaintext: vec![i; 32],
            associated_data: vec![i],
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .collect();
    let wrapped = client
        .batch_wrap(BatchWrapRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    let items = wrapped
        .into_iter()
        .enumerate()
        .map(|(i, result)| match result.result {
            Some(wrap_result::Result::Ciphertext(ciphertext)) => UnwrapRequest {
                ciphertext,
                associated_data: vec![i as u8],
                org: cmk_tests::HSM_TEST_ORG.into(),
            },
            other => panic!("item {i}: {other:?}"),
        })
        .collect();
    let unwrapped = client
        .batch_unwrap(BatchUnwrapRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    for (i, result) in unwrapped.into_iter().enumerate() {
        match result.result {
            Some(unwrap_result::Result::Ok(out)) => assert_eq!(out.plaintext, vec![i as u8; 32]),
            other => panic!("item {i}: {other:?}"),
        }
    }

    // SoftHSM2 cannot unwrap RSA-OAEP-SHA-256: the upload is refused with
    // the limit named, never decrypted outside the token.
    let import_key = cmk_tests::import_public_key(public);
    let import = client
        .import(ImportRequest {
            source: Some(Source::WrappedKey(contract::wrap_for_import(
                &import_key,
                contract::random(32).expose(),
            ))),
            import_key_id: String::new(),
            key_handle: String::new(),
            recover: false,
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .expect_err("SoftHSM2 cannot import");
    assert_eq!(import.code(), Code::FailedPrecondition, "{import:?}");
    assert!(
        import
            .message()
            .contains("cannot unwrap RSA-OAEP with SHA-256 (SoftHSM2 supports only SHA-1)"),
        "{import:?}"
    );

    let destroyed = client
        .destroy(DestroyRequest {
            key_handle: handle.clone(),
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!destroyed.already_destroyed);
    let gone = client
        .unwrap(UnwrapRequest {
            ciphertext,
            associated_data: b"org-1/kek-1".to_vec(),
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .expect_err("destroyed");
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert!(gone.message().contains("has been destroyed"), "{gone:?}");
    let again = client
        .destroy(DestroyRequest {
            key_handle: handle,
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_destroyed);

    daemon.stop().await.unwrap();
}
