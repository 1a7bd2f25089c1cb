//! The HSM daemon end to end: real mutual TLS, real keystore on disk.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{fs, path::Path, process::Command};

use cmk_hsm_custody::{ImportKey, ImportKeyBits, ImportPublicKey, contract};
use cmk_hsm_daemon::Limits;
use cmk_proto::hsm::v1::{
    self as pb, AwsKmsKey, BatchUnwrapRequest, BatchWrapRequest, DestroyRequest,
    GetImportPublicKeyRequest, ImportRequest, UnwrapRequest, WrapRequest,
    hsm_service_client::HsmServiceClient, import_request::Source, unwrap_result, wrap_result,
};
use cmk_tests::{Harness, Pki};
use sha2::{Digest, Sha256};
use tonic::{Code, Status, transport::Channel};

type Client = HsmServiceClient<Channel>;

async fn public_key(client: &mut Client) -> ImportPublicKey {
    cmk_tests::import_public_key(
        client
            .get_import_public_key(GetImportPublicKeyRequest {})
            .await
            .unwrap()
            .into_inner(),
    )
}

async fn import(client: &mut Client, wrapped: Vec<u8>) -> Result<pb::ImportResponse, Status> {
    client
        .import(ImportRequest {
            source: Some(Source::WrappedKey(wrapped)),
            import_key_id: String::new(),
            key_handle: String::new(),
            recover: false,
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn generate(client: &mut Client) -> pb::ImportResponse {
    client
        .import(ImportRequest {
            source: Some(Source::Generate(pb::Generate { shared: false })),
            import_key_id: String::new(),
            key_handle: String::new(),
            recover: false,
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn wrap(
    client: &mut Client,
    handle: &str,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, Status> {
    client
        .wrap(WrapRequest {
            key_handle: handle.into(),
            plaintext: plaintext.to_vec(),
            associated_data: aad.to_vec(),
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .map(|r| r.into_inner().ciphertext)
}

async fn unwrap(
    client: &mut Client,
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<pb::UnwrapResponse, Status> {
    client
        .unwrap(UnwrapRequest {
            ciphertext: ciphertext.to_vec(),
            associated_data: aad.to_vec(),
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .map(|r| r.into_inner())
}

fn assert_status(result: Result<impl std::fmt::Debug, Status>, code: Code, needle: &str) {
    match result {
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(needle),
                "expected {needle:?} in {:?}",
                status.message()
            );
        }
        Ok(value) => panic!("expected {code:?} ({needle}), got {value:?}"),
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for sub in ["", "keys"] {
        for entry in fs::read_dir(dir.join(sub)).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            names.push(format!("{sub}/{:?} {}", entry.file_name(), meta.len()));
        }
    }
    names.sort();
    names
}

#[tokio::test]
async fn import_wrap_unwrap_batch_destroy() {
    let Harness {
        pki,
        store: _store,
        daemon,
    } = Harness::start(Limits::default()).await;
    let mut client = pki.hsm_client(daemon.addr).await;

    let public = public_key(&mut client).await;
    assert!(
        public.pem.starts_with("-----BEGIN PUBLIC KEY-----"),
        "{}",
        public.pem
    );
    assert_eq!(public.bits, 3072);
    let der = rsa::pkcs8::Document::from_pem(&public.pem).unwrap().1;
    assert_eq!(public.key_id, hex::encode(Sha256::digest(der.as_bytes())));
    let algorithm = client
        .get_import_public_key(GetImportPublicKeyRequest {})
        .await
        .unwrap()
        .into_inner()
        .algorithm;
    assert_eq!(algorithm, "RSAES_OAEP_SHA_256");

    let cmk = contract::random(32);
    let imported = client
        .import(ImportRequest {
            source: Some(Source::WrappedKey(contract::wrap_for_import(
                &public,
                cmk.expose(),
            ))),
            import_key_id: public.key_id.clone(),
            key_handle: String::new(),
            recover: false,
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(imported.key_handle.len(), 32);
    assert_eq!(imported.key_check_value.len(), 10);
    assert_eq!(imported.origin, pb::KeyOrigin::Imported as i32);

    let kek = b"0123456789abcdef0123456789abcdef";
    let ct = wrap(&mut client, &imported.key_handle, kek, b"org-1/kek-1")
        .await
        .unwrap();
    let out = unwrap(&mut client, &ct, b"org-1/kek-1").await.unwrap();
    assert_eq!(out.plaintext, kek);
    assert_eq!(out.key_handle, imported.key_handle);

    let generated = generate(&mut client).await;
    assert_eq!(generated.origin, pb::KeyOrigin::Generated as i32);
    let items = (0..50)
        .map(|i| WrapRequest {
            key_handle: if i % 2 == 0 {
                imported.key_handle.clone()
            } else {
                generated.key_handle.clone()
            },
            plaintext: vec![i as u8; 32],
            associated_data: format!("kek-{i}").into_bytes(),
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
        .iter()
        .enumerate()
        .map(|(i, r)| match &r.result {
            Some(wrap_result::Result::Ciphertext(ct)) => UnwrapRequest {
                ciphertext: ct.clone(),
                associated_data: format!("kek-{i}").into_bytes(),
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
    assert_eq!(unwrapped.len(), 50);
    for (i, r) in unwrapped.iter().enumerate() {
        match &r.result {
            Some(unwrap_result::Result::Ok(out)) => assert_eq!(out.plaintext, vec![i as u8; 32]),
            other => panic!("item {i}: {other:?}"),
        }
    }

    let destroyed = client
        .destroy(DestroyRequest {
            key_handle: generated.key_handle.clone(),
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!destroyed.already_destroyed);
    let again = client
        .destroy(DestroyRequest {
            key_handle: generated.key_handle.clone(),
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_destroyed, "destroy is idempotent");
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn every_bad_input_is_named_and_changes_nothing() {
    let limits = Limits {
        max_message_bytes: 64 << 10,
        max_batch_items: 10,
        ..Limits::default()
    };
    let Harness { pki, store, daemon } = Harness::start(limits).await;
    let mut client = pki.hsm_client(daemon.addr).await;
    let public = public_key(&mut client).await;

    let key = generate(&mut client).await;
    let kek = [7u8; 32];
    let ct = wrap(&mut client, &key.key_handle, &kek, b"ctx")
        .await
        .unwrap();
    let doomed = generate(&mut client).await;
    let doomed_ct = wrap(&mut client, &doomed.key_handle, &kek, b"ctx")
        .await
        .unwrap();
    client
        .destroy(DestroyRequest {
            key_handle: doomed.key_handle.clone(),
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .unwrap();
    let before = listing(store.path());

    // Uploaded keys.
    for len in [31usize, 33] {
        assert_status(
            import(
                &mut client,
                contract::wrap_for_import(&public, &vec![1; len]),
            )
            .await,
            Code::InvalidArgument,
            &format!(
                "unwrapped key is {len} bytes; a customer master key must be exactly 32 bytes"
            ),
        );
    }
    assert_status(
        import(
            &mut client,
            contract::wrap_for_import_sha1(&public, &[1; 32]),
        )
        .await,
        Code::InvalidArgument,
        "uses RSA-OAEP with SHA-1; use SHA-256 with MGF1-SHA-256",
    );
    let other = ImportKey::generate(ImportKeyBits::Rsa3072).unwrap();
    assert_status(
        import(
            &mut client,
            contract::wrap_for_import(other.public(), &[1; 32]),
        )
        .await,
        Code::InvalidArgument,
        "encrypted under another public key, with other padding parameters, or is corrupt",
    );
    assert_status(
        import(&mut client, vec![]).await,
        Code::InvalidArgument,
        "wrapped key is empty",
    );
    assert_status(
        import(&mut client, contract::random(384).expose().to_vec()).await,
        Code::InvalidArgument,
        "is not an RSA-OAEP (SHA-256, MGF1-SHA-256) ciphertext",
    );
    assert_status(
        import(&mut client, contract::random(100).expose().to_vec()).await,
        Code::InvalidArgument,
        "wrapped key is 100 bytes, but an RSA-3072 OAEP ciphertext is exactly 384 bytes",
    );
    assert_status(
        client
            .import(ImportRequest {
                source: Some(Source::WrappedKey(contract::wrap_for_import(
                    &public, &[1; 32],
                ))),
                import_key_id: other.public().key_id.clone(),
                key_handle: String::new(),
                recover: false,
                org: cmk_tests::HSM_TEST_ORG.into(),
            })
            .await,
        Code::InvalidArgument,
        "download the current public key",
    );
    assert_status(
        client
            .import(ImportRequest {
                source: None,
                import_key_id: String::new(),
                key_handle: String::new(),
                recover: false,
                org: cmk_tests::HSM_TEST_ORG.into(),
            })
            .await,
        Code::InvalidArgument,
        "sets none of wrapped_key, generate and aws_kms_key",
    );
    // Malformed ARNs are refused before AWS is contacted, each field named.
    for (key, words) in [
        (
            AwsKmsKey {
                key_arn: "arn:aws:kms:us-east-1:123456789012:alias/cmk".into(),
                ..AwsKmsKey::default()
            },
            "key_arn: \"arn:aws:kms:us-east-1:123456789012:alias/cmk\" is a KMS alias ARN",
        ),
        (
            AwsKmsKey {
                key_arn:
                    "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
                        .into(),
                backup_key_arn: "arn:aws:kms:eu-west-1:12345:key/x".into(),
                role_arn: String::new(),
                external_id: String::new(),
            },
            "backup_key_arn: ARN account \"12345\" is malformed",
        ),
        (
            AwsKmsKey {
                key_arn:
                    "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
                        .into(),
                backup_key_arn: String::new(),
                role_arn: "arn:aws:iam::123456789012:user/me".into(),
                external_id: String::new(),
            },
            "role_arn: IAM ARN resource \"user/me\" is not a role",
        ),
    ] {
        assert_status(
            client
                .import(ImportRequest {
                    source: Some(Source::AwsKmsKey(key)),
                    import_key_id: String::new(),
                    key_handle: String::new(),
                    recover: false,
                    org: cmk_tests::HSM_TEST_ORG.into(),
                })
                .await,
            Code::InvalidArgument,
            words,
        );
    }

    // Wrap ciphertexts.
    let mut tampered = ct.clone();
    tampered[40] ^= 1;
    assert_status(
        unwrap(&mut client, &tampered, b"ctx").await,
        Code::InvalidArgument,
        "does not authenticate",
    );
    assert_status(
        unwrap(&mut client, &ct[..ct.len() - 5], b"ctx").await,
        Code::InvalidArgument,
        "does not authenticate",
    );
    assert_status(
        unwrap(&mut client, &ct[..30], b"ctx").await,
        Code::InvalidArgument,
        "ciphertext is truncated: 30 bytes",
    );
    assert_status(
        unwrap(&mut client, &[], b"ctx").await,
        Code::InvalidArgument,
        "ciphertext is empty",
    );
    assert_status(
        unwrap(&mut client, contract::random(80).expose(), b"ctx").await,
        Code::InvalidArgument,
        "format version",
    );
    assert_status(
        unwrap(&mut client, &ct, b"other").await,
        Code::InvalidArgument,
        "associated data differs",
    );

    // Handles.
    let unknown = "00112233445566778899aabbccddeeff";
    assert_status(
        wrap(&mut client, unknown, &kek, b"").await,
        Code::NotFound,
        "no key with handle 0011",
    );
    assert_status(
        wrap(&mut client, "not-a-handle", &kek, b"").await,
        Code::InvalidArgument,
        "is malformed",
    );
    assert_status(
        unwrap(&mut client, &doomed_ct, b"ctx").await,
        Code::NotFound,
        "has been destroyed",
    );
    assert_status(
        wrap(&mut client, &doomed.key_handle, &kek, b"").await,
        Code::NotFound,
        "has been destroyed",
    );
    assert_status(
        client
            .destroy(DestroyRequest {
                key_handle: unknown.into(),
                org: cmk_tests::HSM_TEST_ORG.into(),
            })
            .await,
        Code::NotFound,
        "no key with handle",
    );

    // Sizes.
    assert_status(
        wrap(&mut client, &key.key_handle, &vec![0; 100 << 10], b"").await,
        Code::ResourceExhausted,
        "the limit is: 65536 bytes",
    );
    assert_status(
        wrap(&mut client, &key.key_handle, &vec![0; 2000], b"").await,
        Code::InvalidArgument,
        "plaintext is 2000 bytes, over the limit of 1024",
    );
    assert_status(
        wrap(&mut client, &key.key_handle, &[], b"").await,
        Code::InvalidArgument,
        "plaintext is empty",
    );
    let items = (0..11)
        .map(|_| WrapRequest {
            key_handle: key.key_handle.clone(),
            plaintext: kek.to_vec(),
            associated_data: vec![],
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .collect();
    assert_status(
        client.batch_wrap(BatchWrapRequest { items }).await,
        Code::InvalidArgument,
        "batch has 11 items, over the limit of 10",
    );
    assert_status(
        client
            .batch_unwrap(BatchUnwrapRequest { items: vec![] })
            .await,
        Code::InvalidArgument,
        "batch has no items",
    );
    // In a batch, a bad item fails alone, with the single-call code and message.
    let results = client
        .batch_unwrap(BatchUnwrapRequest {
            items: vec![
                UnwrapRequest {
                    ciphertext: ct.clone(),
                    associated_data: b"ctx".to_vec(),
                    org: cmk_tests::HSM_TEST_ORG.into(),
                },
                UnwrapRequest {
                    ciphertext: tampered.clone(),
                    associated_data: b"ctx".to_vec(),
                    org: cmk_tests::HSM_TEST_ORG.into(),
                },
                UnwrapRequest {
                    ciphertext: doomed_ct.clone(),
                    associated_data: b"ctx".to_vec(),
                    org: cmk_tests::HSM_TEST_ORG.into(),
                },
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(matches!(&results[0].result, Some(unwrap_result::Result::Ok(o)) if o.plaintext == kek));
    assert!(matches!(&results[1].result,
        Some(unwrap_result::Result::Error(e)) if e.code == Code::InvalidArgument as i32 && e.message.contains("does not authenticate")));
    assert!(matches!(&results[2].result,
        Some(unwrap_result::Result::Error(e)) if e.code == Code::NotFound as i32 && e.message.contains("destroyed")));

    assert_eq!(
        listing(store.path()),
        before,
        "a refused request changed the keystore"
    );
    let out = unwrap(&mut client, &ct, b"ctx").await.unwrap();
    assert_eq!(out.plaintext, kek, "the stored key still works");
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn the_caller_chooses_the_handle_and_it_is_never_reused() {
    use cmk_control_plane::hsm::random_handle;
    let Harness { pki, store, daemon } = Harness::start(Limits::default()).await;
    let mut client = pki.hsm_client(daemon.addr).await;
    let public = public_key(&mut client).await;
    let under = |handle: &str, source: Source| ImportRequest {
        source: Some(source),
        import_key_id: String::new(),
        key_handle: handle.into(),
        recover: false,
        org: cmk_tests::HSM_TEST_ORG.into(),
    };
    let upload = || {
        Source::WrappedKey(contract::wrap_for_import(
            &public,
            contract::random(32).expose(),
        ))
    };
    let generate = || Source::Generate(pb::Generate { shared: false });

    let chosen = random_handle();
    let imported = client
        .import(under(&chosen, upload()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(imported.key_handle, chosen);
    assert_eq!(imported.origin, pb::KeyOrigin::Imported as i32);
    let kek = [5u8; 32];
    let ct = wrap(&mut client, &chosen, &kek, b"aad").await.unwrap();
    let generated_handle = random_handle();
    let generated = client
        .import(under(&generated_handle, generate()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(generated.key_handle, generated_handle);
    assert_eq!(generated.origin, pb::KeyOrigin::Generated as i32);
    let before = listing(store.path());

    for source in [upload(), generate()] {
        assert_status(
            client.import(under(&chosen, source)).await,
            Code::AlreadyExists,
            &format!("key handle {chosen} is already in use"),
        );
    }
    for malformed in [
        chosen.to_uppercase(),
        chosen[..30].to_owned(),
        format!("{chosen}00"),
        "not-a-handle".to_owned(),
    ] {
        assert_status(
            client.import(under(&malformed, upload())).await,
            Code::InvalidArgument,
            "is malformed: expected 32 lower-case hexadecimal characters",
        );
    }
    assert_eq!(
        listing(store.path()),
        before,
        "a refused import changed the keystore"
    );
    let out = unwrap(&mut client, &ct, b"aad").await.unwrap();
    assert_eq!(
        out.plaintext, kek,
        "the key under the handle is the first one"
    );

    let destroyed = client
        .destroy(DestroyRequest {
            key_handle: chosen.clone(),
            org: cmk_tests::HSM_TEST_ORG.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!destroyed.already_destroyed);
    for source in [upload(), generate()] {
        assert_status(
            client.import(under(&chosen, source)).await,
            Code::AlreadyExists,
            &format!("key handle {chosen} was used by a destroyed key and is never reused"),
        );
    }
    assert_status(
        unwrap(&mut client, &ct, b"aad").await,
        Code::NotFound,
        "has been destroyed",
    );
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_key_wrapped_by_the_openssl_cli_imports_and_round_trips() {
    let Harness {
        pki,
        store: _store,
        daemon,
    } = Harness::start(Limits::default()).await;
    let mut client = pki.hsm_client(daemon.addr).await;
    let public = public_key(&mut client).await;

    let work = tempfile::tempdir().unwrap();
    let w = |name: &str| work.path().join(name);
    fs::write(w("pub.pem"), &public.pem).unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(work.path())
            .output()
            .expect("openssl CLI");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    // docs/api.md, "Uploading a key", verbatim.
    openssl(&["rand", "-out", "cmk.bin", "32"]);
    openssl(&[
        "pkeyutl",
        "-encrypt",
        "-pubin",
        "-inkey",
        "pub.pem",
        "-pkeyopt",
        "rsa_padding_mode:oaep",
        "-pkeyopt",
        "rsa_oaep_md:sha256",
        "-pkeyopt",
        "rsa_mgf1_md:sha256",
        "-in",
        "cmk.bin",
        "-out",
        "cmk.enc",
    ]);
    let imported = import(&mut client, fs::read(w("cmk.enc")).unwrap())
        .await
        .unwrap();

    // The admin can check the key check value locally with OpenSSL too.
    fs::write(w("zero.bin"), [0u8; 16]).unwrap();
    let hexkey = format!("hexkey:{}", hex::encode(fs::read(w("cmk.bin")).unwrap()));
    let mac = openssl(&[
        "mac",
        "-cipher",
        "AES-256-CBC",
        "-macopt",
        &hexkey,
        "-in",
        "zero.bin",
        "CMAC",
    ]);
    assert_eq!(
        imported.key_check_value,
        String::from_utf8(mac).unwrap().trim()[..10]
    );

    let ct = wrap(&mut client, &imported.key_handle, b"a KEK", b"aad")
        .await
        .unwrap();
    assert_eq!(
        unwrap(&mut client, &ct, b"aad").await.unwrap().plaintext,
        b"a KEK"
    );

    // OpenSSL's default OAEP digest is SHA-1: the error says what to change.
    openssl(&[
        "pkeyutl",
        "-encrypt",
        "-pubin",
        "-inkey",
        "pub.pem",
        "-pkeyopt",
        "rsa_padding_mode:oaep",
        "-in",
        "cmk.bin",
        "-out",
        "sha1.enc",
    ]);
    assert_status(
        import(&mut client, fs::read(w("sha1.enc")).unwrap()).await,
        Code::InvalidArgument,
        "-pkeyopt rsa_oaep_md:sha256",
    );
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn only_allow_listed_identities_with_certificates_from_the_ca_get_in() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let Harness { pki, store, daemon } = Harness::start(Limits::default()).await;

    // Allowed.
    let mut health = HealthClient::new(pki.channel(daemon.addr, "control-plane").await.unwrap());
    health.check(HealthCheckRequest::default()).await.unwrap();

    // A valid certificate from the right CA, but an identity not on the list.
    let channel = pki.channel(daemon.addr, "intruder").await.unwrap();
    let mut intruder = HsmServiceClient::new(channel.clone());
    assert_status(
        intruder
            .get_import_public_key(GetImportPublicKeyRequest {})
            .await,
        Code::PermissionDenied,
        "client identity spiffe://cmk.test/some-other-service is not allowed",
    );
    assert_status(
        intruder
            .import(ImportRequest {
                source: Some(Source::Generate(pb::Generate { shared: false })),
                import_key_id: String::new(),
                key_handle: String::new(),
                recover: false,
                org: cmk_tests::HSM_TEST_ORG.into(),
            })
            .await,
        Code::PermissionDenied,
        "not allowed",
    );
    assert_status(
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await,
        Code::PermissionDenied,
        "not allowed",
    );

    // No client certificate, or one from another CA: the handshake itself fails.
    for (name, files) in [
        ("no client certificate", None),
        (
            "certificate from another CA",
            Some(pki.client_files("rogue")),
        ),
    ] {
        let err = raw_handshake(daemon.addr, &pki, files)
            .await
            .expect_err(name);
        assert!(
            err.contains("CertificateRequired")
                || err.contains("UnknownCA")
                || err.contains("BadCertificate"),
            "{name}: {err}"
        );
    }
    assert!(
        fs::read_dir(store.path().join("keys"))
            .unwrap()
            .next()
            .is_none(),
        "nothing was stored"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn an_idle_client_cannot_stall_shutdown() {
    let limits = Limits {
        request_timeout: std::time::Duration::from_secs(1),
        ..Limits::default()
    };
    let Harness {
        pki,
        store: _store,
        daemon,
    } = Harness::start(limits).await;
    // An authenticated HTTP/2 connection that never reads again.
    let idle = connect_raw(daemon.addr, &pki, Some(pki.client_files("control-plane")))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(10), daemon.stop())
        .await
        .expect("stop returned despite the idle connection")
        .unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(idle);
}

/// A TLS 1.3 handshake plus one read, so that the server's verdict on the client
/// certificate (sent after the client's Finished in TLS 1.3) reaches us.
async fn raw_handshake(
    addr: std::net::SocketAddr,
    pki: &Pki,
    client: Option<cmk_tls::TlsFiles>,
) -> Result<(), String> {
    connect_raw(addr, pki, client).await.map(drop)
}

/// A raw TLS connection that has sent the HTTP/2 preface and seen the server's
/// first bytes (its SETTINGS, or the alert refusing the client certificate).
async fn connect_raw(
    addr: std::net::SocketAddr,
    pki: &Pki,
    client: Option<cmk_tls::TlsFiles>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.path("ca.crt")).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(files) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(&files.cert).unwrap()],
                PrivateKeyDer::from_pem_file(&files.key).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("{e:?}"))?;
    // HTTP/2 preface, then read: the server answers with its settings or an alert.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .map_err(|e| format!("{e:?}"))?;
    let mut buf = [0u8; 64];
    match tls.read(&mut buf).await {
        Ok(0) => Err("connection closed".into()),
        Ok(_) => Ok(tls),
        Err(e) => Err(format!("{e:?}")),
    }
}

#[tokio::test]
async fn the_control_plane_client_speaks_to_the_daemon() {
    use cmk_control_plane::hsm::{Admission, HsmError, random_handle};
    use cmk_secret::SecretBytes;
    let Harness {
        pki,
        store: _store,
        daemon,
    } = Harness::start(Limits::default()).await;
    let client = pki.control_plane_client(daemon.addr).await;
    let org = cmk_control_plane_domain::OrgId::parse(cmk_tests::HSM_TEST_ORG).unwrap();

    let public = cmk_tests::client_import_public_key(client.import_public_key().await.unwrap());
    let wrapped = contract::wrap_for_import(&public, &[0x11; 32]);
    let handle = random_handle();
    let imported = client
        .import(
            &org,
            &handle,
            Admission::New,
            wrapped.clone(),
            String::new(),
        )
        .await
        .unwrap();
    assert_eq!(imported.handle, handle);
    let generated = client.generate(Some(&org), &random_handle()).await.unwrap();
    assert_ne!(imported.check_value, generated.check_value);
    match client
        .import(&org, &handle, Admission::New, wrapped, String::new())
        .await
    {
        Err(HsmError::Status(status)) => assert_eq!(status.code(), Code::AlreadyExists),
        other => panic!("import under a handle in use: {other:?}"),
    }

    let kek = SecretBytes::copy_from(&[0x22; 32]);
    let ct = client
        .wrap(&org, &imported.handle, &kek, b"org/kek")
        .await
        .unwrap();
    let unwrapped = client.unwrap(&org, &ct, b"org/kek").await.unwrap();
    assert!(unwrapped.plaintext.ct_eq(&kek));
    assert_eq!(unwrapped.handle, imported.handle);

    let wrapped = client
        .wrap_batch(
            &org,
            &[
                (&imported.handle, &kek, b"a"),
                ("00112233445566778899aabbccddeeff", &kek, b"b"),
                (&generated.handle, &kek, b"c"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(wrapped[1].as_ref().unwrap_err().code(), Code::NotFound);
    let (a, c) = (wrapped[0].as_ref().unwrap(), wrapped[2].as_ref().unwrap());
    let unwrapped = client
        .unwrap_batch(&org, &[(a, b"a"), (c, b"wrong")])
        .await
        .unwrap();
    assert!(unwrapped[0].as_ref().unwrap().plaintext.ct_eq(&kek));
    assert_eq!(unwrapped[0].as_ref().unwrap().handle, imported.handle);
    assert_eq!(
        unwrapped[1].as_ref().unwrap_err().code(),
        Code::InvalidArgument
    );

    assert!(!client.destroy(Some(&org), &generated.handle).await.unwrap());
    assert!(client.destroy(Some(&org), &generated.handle).await.unwrap());
    match client.unwrap(&org, c, b"c").await {
        Err(HsmError::Status(status)) => assert_eq!(status.code(), Code::NotFound),
        other => panic!("unwrap under a destroyed key: {other:?}"),
    }
    daemon.stop().await.unwrap();
}
