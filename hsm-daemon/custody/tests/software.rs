//! The software keystore: the shared custody contract, plus what only a keystore
//! on disk must get right.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{fs, os::unix::fs::PermissionsExt, path::Path};

use cmk_hsm_custody::{
    Custody, CustodyError, ImportKey, ImportKeyBits, MaterialCustody, RootKey, SoftwareCustody,
    contract,
};
use cmk_secret::SecretBytes;

const ROOT: &str = "3f1c9a0e5b7d2486f0a1c3e5b7d92468ace0f1b3c5d7e9f02468ace13579bdf0";

fn root(hex: &str) -> RootKey {
    RootKey::from_hex(&SecretBytes::copy_from(hex.as_bytes())).expect("root key")
}

fn open(dir: &Path) -> SoftwareCustody {
    SoftwareCustody::open(dir, root(ROOT), ImportKeyBits::Rsa3072).expect("open keystore")
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir.join("keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn satisfies_the_custody_contract() {
    let dir = tempfile::tempdir().unwrap();
    let custody = open(dir.path());
    let other = ImportKey::generate(ImportKeyBits::Rsa3072).unwrap();
    contract::all(&custody, other.public()).await;
}

#[tokio::test]
async fn ciphertext_for_a_key_of_another_size_is_named_by_length() {
    let dir = tempfile::tempdir().unwrap();
    let custody = open(dir.path());
    let other = ImportKey::generate(ImportKeyBits::Rsa4096).unwrap();
    contract::bad_imports_are_refused(&custody, other.public()).await;
}

#[test]
fn a_new_keystore_can_have_a_4096_bit_import_key() {
    let dir = tempfile::tempdir().unwrap();
    let custody = SoftwareCustody::open(dir.path(), root(ROOT), ImportKeyBits::Rsa4096).unwrap();
    assert_eq!(custody.import_public_key().bits, 4096);
    drop(custody);
    // The configured size applies to a new keystore only; an existing key is kept.
    let again = open(dir.path());
    assert_eq!(again.import_public_key().bits, 4096);
}

#[tokio::test]
async fn keys_and_destructions_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (kept, gone, ct_kept, ct_gone, public) = {
        let custody = open(dir.path());
        let kept = custody
            .import(
                &contract::handle(),
                &contract::scope(),
                &contract::wrap_for_import(
                    custody.import_public_key(),
                    contract::random(32).expose(),
                ),
            )
            .await
            .unwrap();
        let gone = custody
            .generate(&contract::handle(), &contract::scope())
            .await
            .unwrap();
        let secret = SecretBytes::copy_from(b"kek bytes");
        let ct_kept = custody.wrap(&kept.handle, &secret, b"a").await.unwrap();
        let ct_gone = custody.wrap(&gone.handle, &secret, b"a").await.unwrap();
        custody.destroy(&gone.handle).await.unwrap();
        (
            kept,
            gone,
            ct_kept,
            ct_gone,
            custody.import_public_key().clone(),
        )
    };
    let custody = open(dir.path());
    assert_eq!(custody.import_public_key(), &public, "import key is kept");
    let out = custody.unwrap(&ct_kept, b"a").await.unwrap();
    assert_eq!(out.plaintext.expose(), b"kek bytes");
    assert_eq!(out.handle, kept.handle);
    assert!(matches!(
        custody.unwrap(&ct_gone, b"a").await,
        Err(CustodyError::DestroyedKey(h)) if h == gone.handle
    ));
}

#[tokio::test]
async fn a_different_root_key_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let other = ROOT.replace('3', "4");
    let err = SoftwareCustody::open(dir.path(), root(&other), ImportKeyBits::Rsa3072)
        .expect_err("wrong root key");
    assert!(matches!(err, CustodyError::RootKeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("different root key"), "{err}");
}

#[test]
fn one_daemon_per_keystore() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path());
    let err = SoftwareCustody::open(dir.path(), root(ROOT), ImportKeyBits::Rsa3072)
        .expect_err("second open");
    assert!(
        format!("{err} {:?}", std::error::Error::source(&err)).contains("in use"),
        "{err}"
    );
}

#[tokio::test]
async fn files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let custody = open(&store);
    custody
        .generate(&contract::handle(), &contract::scope())
        .await
        .unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&store), 0o700);
    assert_eq!(mode(&store.join("keys")), 0o700);
    for name in ["keystore.meta", "import-key"] {
        assert_eq!(mode(&store.join(name)), 0o600, "{name}");
    }
    for name in files(&store) {
        assert_eq!(mode(&store.join("keys").join(&name)), 0o600, "{name}");
    }
}

#[tokio::test]
async fn refused_imports_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let custody = open(dir.path());
    custody
        .generate(&contract::handle(), &contract::scope())
        .await
        .unwrap();
    let before = files(dir.path());
    let other = ImportKey::generate(ImportKeyBits::Rsa3072).unwrap();
    contract::bad_imports_are_refused(&custody, other.public()).await;
    assert_eq!(files(dir.path()), before);
}

#[tokio::test]
async fn tampered_and_swapped_key_files_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, ct_a, ct_b) = {
        let custody = open(dir.path());
        let a = custody
            .generate(&contract::handle(), &contract::scope())
            .await
            .unwrap();
        let b = custody
            .generate(&contract::handle(), &contract::scope())
            .await
            .unwrap();
        let s = SecretBytes::copy_from(b"x");
        let ct_a = custody.wrap(&a.handle, &s, b"").await.unwrap();
        let ct_b = custody.wrap(&b.handle, &s, b"").await.unwrap();
        (a, b, ct_a, ct_b)
    };
    let keys = dir.path().join("keys");
    // b's file put in a's place: sealed under b's name, so it fails to open.
    fs::copy(
        keys.join(format!("{}.key", b.handle)),
        keys.join(format!("{}.key", a.handle)),
    )
    .unwrap();
    // One bit of b's own file flipped.
    let path_b = keys.join(format!("{}.key", b.handle));
    let mut bytes = fs::read(&path_b).unwrap();
    bytes[20] ^= 1;
    fs::write(&path_b, bytes).unwrap();

    let custody = open(dir.path());
    for ct in [&ct_a, &ct_b] {
        let err = custody.unwrap(ct, b"").await.expect_err("corrupt file");
        assert!(matches!(err, CustodyError::Corrupt { .. }), "{err}");
    }
}

#[tokio::test]
async fn interrupted_writes_and_destroys_are_finished_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let key = {
        let custody = open(dir.path());
        custody
            .generate(&contract::handle(), &contract::scope())
            .await
            .unwrap()
    };
    let keys = dir.path().join("keys");
    fs::write(keys.join(".tmp.deadbeef.key.0011"), b"torn").unwrap();
    // A destroy that died after writing its tombstone, before removing the key.
    fs::write(keys.join(format!("{}.destroyed", key.handle)), b"").unwrap();

    let custody = open(dir.path());
    assert!(
        !keys.join(".tmp.deadbeef.key.0011").exists(),
        "temp file removed"
    );
    // Before anything loads the key: the tombstone alone retires the handle.
    assert!(matches!(
        custody.generate(&key.handle, &contract::scope()).await,
        Err(CustodyError::HandleInUse { handle, destroyed: true }) if handle == key.handle
    ));
    assert!(matches!(
        custody
            .wrap(&key.handle, &SecretBytes::copy_from(b"x"), b"")
            .await,
        Err(CustodyError::DestroyedKey(_))
    ));
    assert!(
        !keys.join(format!("{}.key", key.handle)).exists(),
        "destroy finished"
    );
}

#[tokio::test]
async fn handles_in_use_are_refused_from_disk_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (live, retired, ct) = {
        let custody = open(dir.path());
        let live = custody
            .generate(&contract::handle(), &contract::scope())
            .await
            .unwrap()
            .handle;
        let retired = custody
            .generate(&contract::handle(), &contract::scope())
            .await
            .unwrap()
            .handle;
        custody.destroy(&retired).await.unwrap();
        let ct = custody
            .wrap(&live, &SecretBytes::copy_from(b"kek"), b"")
            .await
            .unwrap();
        (live, retired, ct)
    };
    let before = files(dir.path());

    // A fresh process: nothing is cached, so the refusals come from the files.
    let custody = open(dir.path());
    let wrapped =
        contract::wrap_for_import(custody.import_public_key(), contract::random(32).expose());
    for (handle, destroyed) in [(live, false), (retired, true)] {
        for result in [
            custody.import(&handle, &contract::scope(), &wrapped).await,
            custody.generate(&handle, &contract::scope()).await,
        ] {
            assert!(
                matches!(result, Err(CustodyError::HandleInUse { handle: h, destroyed: d })
                    if h == handle && d == destroyed),
                "{handle}: {result:?}"
            );
        }
    }
    assert_eq!(files(dir.path()), before, "a refusal left a file behind");
    drop(custody);

    let custody = open(dir.path());
    let out = custody.unwrap(&ct, b"").await.unwrap();
    assert_eq!(
        out.plaintext.expose(),
        b"kek",
        "the live key file was replaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_on_one_handle_admit_exactly_one() {
    let dir = tempfile::tempdir().unwrap();
    let custody = open(dir.path());
    let public = custody.import_public_key().clone();
    let mut wrapped_under_winners = Vec::new();
    for _ in 0..5 {
        let handle = contract::handle();
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let (custody, public) = (custody.clone(), public.clone());
                tokio::spawn(async move {
                    if i % 2 == 0 {
                        custody.generate(&handle, &contract::scope()).await
                    } else {
                        let wrapped =
                            contract::wrap_for_import(&public, contract::random(32).expose());
                        custody.import(&handle, &contract::scope(), &wrapped).await
                    }
                })
            })
            .collect();
        let mut stored = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                Ok(info) => stored.push(info),
                Err(CustodyError::HandleInUse {
                    handle: h,
                    destroyed: false,
                }) if h == handle => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(
            stored.len(),
            1,
            "{handle} was stored {} times",
            stored.len()
        );
        let ct = custody
            .wrap(&handle, &SecretBytes::copy_from(b"x"), b"")
            .await
            .unwrap();
        wrapped_under_winners.push(ct);
    }
    let names = files(dir.path());
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(names.iter().all(|n| n.ends_with(".key")), "{names:?}");

    // The key the winner cached is the one on disk, not a loser's.
    drop(custody);
    let custody = open(dir.path());
    for ct in wrapped_under_winners {
        assert_eq!(
            custody.unwrap(&ct, b"").await.unwrap().plaintext.expose(),
            b"x"
        );
    }
}

#[test]
fn root_keys_must_be_64_hex_characters() {
    for bad in [
        "",
        "abc",
        &ROOT[..62],
        &format!("{ROOT}00"),
        &ROOT.replace('a', "x"),
    ] {
        assert!(
            RootKey::from_hex(&SecretBytes::copy_from(bad.as_bytes())).is_err(),
            "{bad:?}"
        );
    }
    let with_newline = format!("{ROOT}\n");
    assert!(RootKey::from_hex(&SecretBytes::copy_from(with_newline.as_bytes())).is_ok());
}

/// The fingerprint is on disk, sealed: a recovery after a restart works, and
/// no tombstone can be forged or swapped to admit other material.
#[tokio::test]
async fn recovery_works_after_a_restart_and_tombstones_cannot_be_forged() {
    let dir = tempfile::tempdir().unwrap();
    let cmk = contract::random(32);
    let secret = SecretBytes::copy_from(b"kek bytes");
    let (key, other, ct) = {
        let custody = open(dir.path());
        let public = custody.import_public_key().clone();
        let key = custody
            .import(
                &contract::handle(),
                &contract::scope(),
                &contract::wrap_for_import(&public, cmk.expose()),
            )
            .await
            .unwrap();
        let other = custody
            .import(
                &contract::handle(),
                &contract::scope(),
                &contract::wrap_for_import(&public, contract::random(32).expose()),
            )
            .await
            .unwrap();
        let ct = custody.wrap(&key.handle, &secret, b"a").await.unwrap();
        custody.destroy(&key.handle).await.unwrap();
        custody.destroy(&other.handle).await.unwrap();
        (key, other, ct)
    };
    let keys = dir.path().join("keys");
    let tombstone = |h: &cmk_hsm_custody::KeyHandle| keys.join(format!("{h}.destroyed"));
    assert!(
        !fs::read(tombstone(&key.handle)).unwrap().is_empty(),
        "the tombstone keeps the fingerprint"
    );

    // Another destroyed key's tombstone copied over this one's does not open
    // under this handle.
    let saved = fs::read(tombstone(&key.handle)).unwrap();
    fs::copy(tombstone(&other.handle), tombstone(&key.handle)).unwrap();
    let custody = open(dir.path());
    let wrapped = contract::wrap_for_import(custody.import_public_key(), cmk.expose());
    let err = custody
        .recover(&key.handle, &contract::scope(), &wrapped)
        .await
        .unwrap_err();
    assert!(matches!(err, CustodyError::Corrupt { .. }), "{err:?}");
    drop(custody);

    // A tombstone written before fingerprints were kept (an empty file)
    // admits nothing.
    fs::write(tombstone(&key.handle), b"").unwrap();
    let custody = open(dir.path());
    let err = custody
        .recover(&key.handle, &contract::scope(), &wrapped)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CustodyError::Unrecoverable(h) if h == key.handle),
        "{err:?}"
    );
    drop(custody);

    fs::write(tombstone(&key.handle), &saved).unwrap();
    let custody = open(dir.path());
    let info = custody
        .recover(&key.handle, &contract::scope(), &wrapped)
        .await
        .unwrap();
    assert_eq!(info.check_value, key.check_value);
    assert!(!tombstone(&key.handle).exists(), "the tombstone is gone");
    drop(custody);
    // Recovered is durable.
    let custody = open(dir.path());
    let out = custody.unwrap(&ct, b"a").await.unwrap();
    assert!(out.plaintext.ct_eq(&secret));
}

/// A crash between putting the recovered key file in place and removing the
/// tombstone leaves the key destroyed, as before the unacknowledged call.
#[tokio::test]
async fn an_interrupted_recovery_leaves_the_key_destroyed_and_recoverable() {
    let dir = tempfile::tempdir().unwrap();
    let cmk = contract::random(32);
    let custody = open(dir.path());
    let wrapped = contract::wrap_for_import(custody.import_public_key(), cmk.expose());
    let key = custody
        .import(&contract::handle(), &contract::scope(), &wrapped)
        .await
        .unwrap();
    let keys = dir.path().join("keys");
    let key_file = keys.join(format!("{}.key", key.handle));
    let sealed = fs::read(&key_file).unwrap();
    let ct = custody
        .wrap(&key.handle, &SecretBytes::copy_from(b"x"), b"")
        .await
        .unwrap();
    custody.destroy(&key.handle).await.unwrap();
    drop(custody);
    // Both files: what the crash leaves.
    fs::write(&key_file, &sealed).unwrap();
    let custody = open(dir.path());
    assert!(matches!(
        custody.unwrap(&ct, b"").await,
        Err(CustodyError::DestroyedKey(_))
    ));
    assert!(!key_file.exists(), "start-up finished the destroy");
    custody
        .recover(&key.handle, &contract::scope(), &wrapped)
        .await
        .unwrap();
    assert!(custody.unwrap(&ct, b"").await.is_ok());
}
