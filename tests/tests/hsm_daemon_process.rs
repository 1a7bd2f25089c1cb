//! The real `hsm-daemon` binary, started as a user or Kubernetes starts it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, Payload},
};
use cmk_hsm_custody::{ImportPublicKey, contract};
use cmk_proto::hsm::v1::{
    DestroyRequest, Generate, GetImportPublicKeyRequest, ImportRequest, UnwrapRequest, WrapRequest,
    import_request::Source,
};
use cmk_tests::{ANY_PORT, DaemonProcess, Pki, binary};

/// Decrypts a Wrap ciphertext with the raw key, per the documented v1 format:
/// proves the daemon wraps with exactly the key that was imported.
fn open_locally(cmk: &[u8], ciphertext: &[u8], aad: &[u8]) -> Vec<u8> {
    let (header, rest) = ciphertext.split_at(17);
    let (nonce, body) = rest.split_at(12);
    let cipher = Aes256Gcm::new_from_slice(cmk).unwrap();
    cipher
        .decrypt(
            &Nonce::try_from(nonce).unwrap(),
            Payload {
                msg: body,
                aad: &[header, aad].concat(),
            },
        )
        .expect("the stored key is the imported key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_stream_of_imports_loses_no_acknowledged_key() {
    let pki = Pki::new();
    let store = tempfile::tempdir().unwrap();
    // (key handle, the raw key bytes that were imported under it)
    type Acked = Arc<Mutex<Vec<(String, Vec<u8>)>>>;
    let acked: Acked = Arc::default();
    let mut public: Option<ImportPublicKey> = None;

    for round in 0..3 {
        let mut daemon = DaemonProcess::start(&pki, store.path(), ANY_PORT).await;
        let mut client = pki.hsm_client(daemon.addr).await;
        let this = cmk_tests::import_public_key(
            client
                .get_import_public_key(GetImportPublicKeyRequest {})
                .await
                .unwrap()
                .into_inner(),
        );
        if let Some(first) = &public {
            assert_eq!(first, &this, "the import key survives restarts");
        }
        public = Some(this.clone());

        let before = acked.lock().unwrap().len();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (mut client, public, acked) = (client.clone(), this.clone(), acked.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let cmk = contract::random(32);
                    let wrapped = contract::wrap_for_import(&public, cmk.expose());
                    let request = ImportRequest {
                        source: Some(Source::WrappedKey(wrapped)),
                        import_key_id: String::new(),
                        key_handle: String::new(),
                        recover: false,
                        org: cmk_tests::HSM_TEST_ORG.into(),
                    };
                    match client.import(request).await {
                        Ok(r) => acked
                            .lock()
                            .unwrap()
                            .push((r.into_inner().key_handle, cmk.expose().to_vec())),
                        Err(_) => return,
                    }
                }
            }));
        }
        // Kill while imports are in flight, once some have been acknowledged.
        for _ in 0..500 {
            if acked.lock().unwrap().len() >= before + 20 + 7 * round {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        daemon.kill();
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .unwrap()
                .unwrap();
        }
        assert!(
            acked.lock().unwrap().len() > before,
            "round {round}: no import was acknowledged"
        );
    }

    let daemon = DaemonProcess::start(&pki, store.path(), ANY_PORT).await;
    let mut client = pki.hsm_client(daemon.addr).await;
    let acked = acked.lock().unwrap().clone();
    for (handle, cmk) in &acked {
        let ct = client
            .wrap(WrapRequest {
                key_handle: handle.clone(),
                plaintext: b"kek".to_vec(),
                associated_data: b"a".to_vec(),
                org: cmk_tests::HSM_TEST_ORG.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("acknowledged key {handle} lost: {e}"))
            .into_inner()
            .ciphertext;
        assert_eq!(open_locally(cmk, &ct, b"a"), b"kek");
        let out = client
            .unwrap(UnwrapRequest {
                ciphertext: ct,
                associated_data: b"a".to_vec(),
                org: cmk_tests::HSM_TEST_ORG.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(out.plaintext, b"kek");
    }
    let leftovers: Vec<_> = std::fs::read_dir(store.path().join("keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp."))
        .collect();
    assert!(
        leftovers.is_empty(),
        "torn writes left behind: {leftovers:?}"
    );
    eprintln!("{} acknowledged imports survived 3 SIGKILLs", acked.len());
}

#[test]
fn refuses_to_start_without_a_root_key_and_names_every_bad_setting() {
    let pki = Pki::new();
    let out = Command::new(binary("hsm-daemon"))
        .args(["--listen", "not-an-address", "--import-key-bits", "2048"])
        .arg("--tls-cert")
        .arg(pki.path("server.crt"))
        .env_remove("CMK_HSM_ROOT_KEY")
        // Settings from the environment are validated the same way.
        .env("CMK_HSM_MAX_BATCH_ITEMS", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "root key: none configured; make one with `openssl rand -hex 32 > root.key && chmod 600 root.key`",
        "listen: invalid socket address",
        "import_key_bits: 2048 is not offered; use 3072 or 4096",
        "keystore_dir: required",
        "tls_key: required",
        "allowed_clients:",
        "max_batch_items: 0 is out of range 1..=100000",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}

#[tokio::test]
async fn reflection_serves_grpcio_v1alpha_and_tonic_v1() {
    let pki = Pki::new();
    let store = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start(&pki, store.path(), ANY_PORT).await;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/reflection_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(daemon.addr.to_string())
        .arg(pki.path("ca.crt"))
        .arg(pki.path("control-plane.crt"))
        .arg(pki.path("control-plane.key"))
        .output()
        .expect("python3 (with grpcio and grpcio-reflection) is required");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "reflection client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "service cmk.hsm.v1.HsmService",
        "service grpc.health.v1.Health",
        "method Import",
        "method BatchUnwrap",
        "method Destroy",
        "key_id ",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut v1 =
        ServerReflectionClient::new(pki.channel(daemon.addr, "control-plane").await.unwrap());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = v1
        .server_reflection_info(tokio_stream_once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"cmk.hsm.v1.HsmService".to_string()),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.starts_with("cmk.control")),
        "only the daemon's own API is listed: {names:?}"
    );
}

fn tokio_stream_once<T: Send + 'static>(
    item: T,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> {
    tonic::codegen::tokio_stream::iter([item])
}

/// Over mutual TLS, from the control plane's identity: a key generated for
/// one org is refused (PERMISSION_DENIED) to a Wrap, Unwrap or Destroy that
/// names another, the daemon logs each refusal, and the key still serves its
/// own org afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_refused_to_calls_for_another_org_and_the_refusal_logged() {
    let pki = Pki::new();
    let store = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start(&pki, store.path(), ANY_PORT).await;
    let mut client = pki.hsm_client(daemon.addr).await;
    let handle = client
        .import(ImportRequest {
            source: Some(Source::Generate(Generate { shared: false })),
            import_key_id: String::new(),
            key_handle: String::new(),
            recover: false,
            org: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .key_handle;
    let wrap = |org: &str| WrapRequest {
        key_handle: handle.clone(),
        plaintext: b"kek".to_vec(),
        associated_data: b"a".to_vec(),
        org: org.into(),
    };
    let ciphertext = client
        .wrap(wrap("acme"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let unwrap = |org: &str| UnwrapRequest {
        ciphertext: ciphertext.clone(),
        associated_data: b"a".to_vec(),
        org: org.into(),
    };

    let refusals = [
        client.wrap(wrap("globex")).await.map(drop),
        client.unwrap(unwrap("globex")).await.map(drop),
        client
            .destroy(DestroyRequest {
                key_handle: handle.clone(),
                org: "globex".into(),
            })
            .await
            .map(drop),
    ];
    for refused in refusals {
        let status = refused.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert_eq!(
            status.message(),
            format!("key {handle} does not serve org globex")
        );
    }
    // The log is read on a thread of its own: give it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let logged = loop {
        let logged = daemon
            .log
            .matching(&["refused", &handle, "globex", "org:acme"]);
        if logged.len() >= 3 || std::time::Instant::now() > deadline {
            break logged;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(logged.len(), 3, "one log line per refusal: {logged:#?}");

    let opened = client.unwrap(unwrap("acme")).await.unwrap().into_inner();
    assert_eq!(opened.plaintext, b"kek", "the refusals changed nothing");
}

/// The daemon publishes its audit public key (the file at start, and the
/// RPC), signs checkpoints it builds from the fields it is given and its own
/// clock, and refuses fields that are no checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_checkpoints_verify_under_the_published_key() {
    use cmk_proto::{
        checkpoint::{self, Checkpoint},
        hsm::v1::{GetAuditPublicKeyRequest, SignCheckpointRequest},
    };
    let pki = Pki::new();
    let store = tempfile::tempdir().unwrap();
    let published = store.path().join("audit-public-key.pem");
    let daemon = DaemonProcess::start_with(
        &pki,
        &store.path().join("keystore"),
        ANY_PORT,
        &[("CMK_HSM_AUDIT_PUBLIC_KEY_FILE", published.to_str().unwrap())],
    )
    .await;
    let mut client = pki.hsm_client(daemon.addr).await;
    let key = client
        .get_audit_public_key(GetAuditPublicKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(key.algorithm, "ECDSA_P256_SHA256");
    assert_eq!(
        std::fs::read_to_string(&published).unwrap(),
        key.public_key_pem
    );
    let der = checkpoint::public_key_der(&key.public_key_pem).unwrap();
    assert_eq!(checkpoint::key_id(&der), key.key_id);

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let signed = client
        .sign_checkpoint(SignCheckpointRequest {
            org: "acme".into(),
            seq: 12,
            head_hash: vec![9; 32],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(signed.key_id, key.key_id);
    assert!(
        (before..before + 60).contains(&signed.time),
        "the daemon's clock"
    );
    let checkpoint = Checkpoint {
        org: "acme".into(),
        seq: 12,
        head: [9; 32],
        time: signed.time,
    };
    assert!(checkpoint.verify(&der, &signed.signature));
    assert!(
        !Checkpoint {
            seq: 13,
            ..checkpoint
        }
        .verify(&der, &signed.signature)
    );

    for (org, seq, head) in [
        ("acme", 0, vec![9; 32]),
        ("acme", 1, vec![9; 31]),
        ("", 1, vec![9; 32]),
        ("a b", 1, vec![9; 32]),
    ] {
        let status = client
            .sign_checkpoint(SignCheckpointRequest {
                org: org.into(),
                seq,
                head_hash: head,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
}
