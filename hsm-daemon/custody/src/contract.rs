//! The behaviour every [`Custody`] backend must show, written once and run
//! against each implementation (software keystore, PKCS#11, AWS KMS).
//!
//! Each check panics with a message naming what broke. Enabled by the `contract`
//! feature, which only test builds turn on.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use cmk_secret::SecretBytes;
use rsa::{Oaep, RsaPublicKey, pkcs8::DecodePublicKey, rand_core::OsRng};

use crate::{
    Custody, CustodyError, Destroyed, ImportError, ImportPublicKey, InputError, KeyHandle,
    KeyOrigin, UnwrapItem, WrapItem, envelope, kcv,
};

/// RSA-OAEP-SHA-256 encryption of `plaintext` under `public`, as `openssl pkeyutl`
/// with `rsa_oaep_md:sha256 rsa_mgf1_md:sha256` does.
pub fn wrap_for_import(public: &ImportPublicKey, plaintext: &[u8]) -> Vec<u8> {
    let key = RsaPublicKey::from_public_key_pem(&public.pem).expect("import key PEM");
    key.encrypt(&mut OsRng, Oaep::new::<sha2::Sha256>(), plaintext)
        .expect("RSA-OAEP encryption")
}

/// The same with OAEP SHA-1, OpenSSL's default.
pub fn wrap_for_import_sha1(public: &ImportPublicKey, plaintext: &[u8]) -> Vec<u8> {
    let key = RsaPublicKey::from_public_key_pem(&public.pem).expect("import key PEM");
    key.encrypt(&mut OsRng, Oaep::new::<sha1::Sha1>(), plaintext)
        .expect("RSA-OAEP encryption")
}

/// Random bytes.
pub fn random(len: usize) -> SecretBytes {
    let mut bytes = SecretBytes::zeroed(len);
    crate::fill_random(bytes.expose_mut()).expect("rng");
    bytes
}

/// A fresh random handle, as a caller chooses one.
pub fn handle() -> KeyHandle {
    KeyHandle::random().expect("rng")
}

/// Runs every check of this module against `custody`.
pub async fn all(custody: &dyn Custody, other_import_key: &ImportPublicKey) {
    import_and_round_trip(custody).await;
    generate_and_round_trip(custody).await;
    a_live_handle_is_not_taken_again(custody).await;
    a_destroyed_handle_is_never_reused(custody).await;
    bad_imports_are_refused(custody, other_import_key).await;
    bad_ciphertexts_are_refused(custody).await;
    destroy_is_idempotent_and_final(custody).await;
    a_destroyed_key_comes_back_only_with_its_own_material(custody).await;
    batches_keep_order_and_isolate_failures(custody).await;
    a_live_generated_handle_is_not_taken_again(custody).await;
}

/// Every check that needs no successful import, for a backend on a token that
/// cannot unwrap RSA-OAEP with SHA-256 (SoftHSM2): such a backend must refuse
/// import outright, which its own tests assert. Not a replacement for [`all`]
/// on any backend that can import.
pub async fn without_import(custody: &dyn Custody) {
    generate_and_round_trip(custody).await;
    a_live_generated_handle_is_not_taken_again(custody).await;
    a_destroyed_handle_is_never_reused(custody).await;
    bad_ciphertexts_are_refused(custody).await;
    destroy_is_idempotent_and_final(custody).await;
    a_handle_never_issued_has_nothing_to_recover(custody).await;
    batches_keep_order_and_isolate_failures(custody).await;
}

/// As [`a_live_handle_is_not_taken_again`], for a generated key.
pub async fn a_live_generated_handle_is_not_taken_again(custody: &dyn Custody) {
    let taken = handle();
    let key = custody.generate(&taken).await.expect("generate");
    let secret = random(32);
    let ct = custody
        .wrap(&taken, &secret, b"before")
        .await
        .expect("wrap");
    let other_key = wrap_for_import(custody.import_public_key(), random(32).expose());
    let refusals = [
        custody.generate(&taken).await,
        custody.import(&taken, &other_key).await,
    ];
    for refused in refusals {
        match refused {
            Err(CustodyError::HandleInUse { handle, destroyed }) => {
                assert_eq!((handle, destroyed), (taken, false));
            }
            other => panic!("reusing a live handle: expected HandleInUse, got {other:?}"),
        }
    }
    let out = custody.unwrap(&ct, b"before").await.expect("unwrap");
    assert!(
        out.plaintext.ct_eq(&secret),
        "the key under {taken} changed"
    );
    assert_eq!(out.handle, key.handle);
}

/// Recovery of a handle never issued is [`CustodyError::UnknownKey`], and
/// leaves it unissued.
pub async fn a_handle_never_issued_has_nothing_to_recover(custody: &dyn Custody) {
    let public = custody.import_public_key().clone();
    let unknown = handle();
    assert!(matches!(
        custody
            .recover(&unknown, &wrap_for_import(&public, random(32).expose()))
            .await,
        Err(CustodyError::UnknownKey(h)) if h == unknown
    ));
    assert!(
        matches!(
            custody.destroy(&unknown).await,
            Err(CustodyError::UnknownKey(_))
        ),
        "a refused recovery does not issue the handle"
    );
}

pub async fn import_and_round_trip(custody: &dyn Custody) {
    let cmk = random(32);
    let wrapped = wrap_for_import(custody.import_public_key(), cmk.expose());
    let chosen = handle();
    let info = custody.import(&chosen, &wrapped).await.expect("import");
    assert_eq!(info.handle, chosen, "stored under the handle asked for");
    assert_eq!(info.origin, KeyOrigin::Imported);
    assert_eq!(
        info.check_value,
        kcv::check_value(&cmk).unwrap(),
        "check value is AES-CMAC of a zero block under the imported key"
    );

    let again = custody
        .import(&handle(), &wrapped)
        .await
        .expect("second import");
    assert_eq!(
        again.check_value, info.check_value,
        "same key, same check value"
    );

    let secret = random(32);
    let ct = custody
        .wrap(&info.handle, &secret, b"org/kek")
        .await
        .expect("wrap");
    assert_eq!(
        envelope::parse(&ct),
        Ok(info.handle),
        "ciphertext names its key"
    );
    let out = custody.unwrap(&ct, b"org/kek").await.expect("unwrap");
    assert!(
        out.plaintext.ct_eq(&secret),
        "unwrap returns what was wrapped"
    );
    assert_eq!(out.handle, info.handle);

    // The second handle holds the same key bytes, but the handle is bound into
    // the ciphertext: it cannot be moved to the other handle's name.
    let mut moved = ct.clone();
    moved[1..17].copy_from_slice(again.handle.as_bytes());
    assert!(matches!(
        custody.unwrap(&moved, b"org/kek").await,
        Err(CustodyError::Authentication)
    ));
}

pub async fn generate_and_round_trip(custody: &dyn Custody) {
    let chosen = handle();
    let a = custody.generate(&chosen).await.expect("generate");
    let b = custody.generate(&handle()).await.expect("generate");
    assert_eq!(a.handle, chosen, "stored under the handle asked for");
    assert_eq!(a.origin, KeyOrigin::Generated);
    assert_ne!(a.check_value, b.check_value, "fresh key material each time");
    let secret = random(32);
    let ct = custody.wrap(&a.handle, &secret, b"").await.expect("wrap");
    let out = custody.unwrap(&ct, b"").await.expect("unwrap");
    assert!(out.plaintext.ct_eq(&secret));
    assert_eq!(out.handle, chosen);
}

/// A handle that names a live key is refused for a new one, imported or
/// generated, and the key it names is left as it was.
pub async fn a_live_handle_is_not_taken_again(custody: &dyn Custody) {
    let public = custody.import_public_key().clone();
    let taken = handle();
    custody
        .import(&taken, &wrap_for_import(&public, random(32).expose()))
        .await
        .expect("import");
    let secret = random(32);
    let ct = custody
        .wrap(&taken, &secret, b"before")
        .await
        .expect("wrap");

    let other_key = wrap_for_import(&public, random(32).expose());
    let refusals = [
        custody.import(&taken, &other_key).await,
        custody.generate(&taken).await,
    ];
    for refused in refusals {
        match refused {
            Err(CustodyError::HandleInUse { handle, destroyed }) => {
                assert_eq!((handle, destroyed), (taken, false));
            }
            other => panic!("reusing a live handle: expected HandleInUse, got {other:?}"),
        }
    }
    let err = custody.generate(&taken).await.expect_err("reuse");
    assert_eq!(
        err.to_string(),
        format!("key handle {taken} is already in use")
    );

    // Still the original key: what it wrapped before still unwraps.
    let out = custody.unwrap(&ct, b"before").await.expect("unwrap");
    assert!(
        out.plaintext.ct_eq(&secret),
        "the key under {taken} changed"
    );
    assert_eq!(out.handle, taken);
}

/// A destroyed key's handle is refused for a new key, and stays destroyed.
pub async fn a_destroyed_handle_is_never_reused(custody: &dyn Custody) {
    let retired = handle();
    custody.generate(&retired).await.expect("generate");
    let secret = random(32);
    let ct = custody.wrap(&retired, &secret, b"").await.expect("wrap");
    custody.destroy(&retired).await.expect("destroy");

    let wrapped = wrap_for_import(custody.import_public_key(), random(32).expose());
    let refusals = [
        custody.generate(&retired).await,
        custody.import(&retired, &wrapped).await,
    ];
    for refused in refusals {
        match refused {
            Err(CustodyError::HandleInUse { handle, destroyed }) => {
                assert_eq!((handle, destroyed), (retired, true));
            }
            other => panic!("reusing a destroyed handle: expected HandleInUse, got {other:?}"),
        }
    }
    let err = custody.generate(&retired).await.expect_err("reuse");
    assert_eq!(
        err.to_string(),
        format!("key handle {retired} was used by a destroyed key and is never reused")
    );

    assert_eq!(
        custody.destroy(&retired).await.expect("destroy again"),
        Destroyed::Already,
        "a refused reuse does not bring the handle back"
    );
    assert!(matches!(
        custody.unwrap(&ct, b"").await,
        Err(CustodyError::DestroyedKey(h)) if h == retired
    ));
}

pub async fn bad_imports_are_refused(custody: &dyn Custody, other_import_key: &ImportPublicKey) {
    let public = custody.import_public_key().clone();
    let modulus = public.bits as usize / 8;
    for len in [31, 33, 16, 64] {
        let wrapped = wrap_for_import(&public, random(len).expose());
        match custody.import(&handle(), &wrapped).await {
            Err(CustodyError::Import(ImportError::KeyLength { actual })) => assert_eq!(actual, len),
            other => panic!("{len}-byte key: expected KeyLength, got {other:?}"),
        }
    }
    let sha1 = wrap_for_import_sha1(&public, random(32).expose());
    assert!(
        matches!(
            custody.import(&handle(), &sha1).await,
            Err(CustodyError::Import(ImportError::OaepSha1))
        ),
        "SHA-1 OAEP is named as such"
    );
    let foreign = wrap_for_import(other_import_key, random(32).expose());
    let err = custody
        .import(&handle(), &foreign)
        .await
        .expect_err("foreign key");
    if other_import_key.bits == public.bits {
        assert!(
            matches!(err, CustodyError::Import(ImportError::Undecryptable { .. })),
            "{err:?}"
        );
    } else {
        assert!(
            matches!(
                err,
                CustodyError::Import(ImportError::CiphertextLength { .. })
            ),
            "{err:?}"
        );
    }
    assert!(matches!(
        custody.import(&handle(), &[]).await,
        Err(CustodyError::Import(ImportError::Empty))
    ));
    let garbage = random(modulus);
    assert!(matches!(
        custody.import(&handle(), garbage.expose()).await,
        Err(CustodyError::Import(ImportError::Undecryptable { .. }))
    ));
    match custody
        .import(&handle(), &garbage.expose()[..modulus - 1])
        .await
    {
        Err(CustodyError::Import(ImportError::CiphertextLength {
            actual, expected, ..
        })) => {
            assert_eq!((actual, expected), (modulus - 1, modulus));
        }
        other => panic!("truncated wrapped key: {other:?}"),
    }
}

pub async fn bad_ciphertexts_are_refused(custody: &dyn Custody) {
    let key = custody.generate(&handle()).await.expect("generate");
    let secret = random(32);
    let ct = custody
        .wrap(&key.handle, &secret, b"ctx")
        .await
        .expect("wrap");

    assert!(matches!(
        custody.unwrap(&ct, b"other ctx").await,
        Err(CustodyError::Authentication)
    ));
    let mut tampered = ct.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x80;
    assert!(matches!(
        custody.unwrap(&tampered, b"ctx").await,
        Err(CustodyError::Authentication)
    ));
    assert!(matches!(
        custody.unwrap(&ct[..ct.len() - 1], b"ctx").await,
        Err(CustodyError::Authentication)
    ));
    assert!(matches!(
        custody.unwrap(&ct[..20], b"ctx").await,
        Err(CustodyError::Input(InputError::CiphertextTruncated {
            actual: 20,
            ..
        }))
    ));
    assert!(matches!(
        custody.unwrap(&[], b"ctx").await,
        Err(CustodyError::Input(InputError::EmptyCiphertext))
    ));
    let unknown = handle();
    assert!(matches!(
        custody.wrap(&unknown, &secret, b"").await,
        Err(CustodyError::UnknownKey(h)) if h == unknown
    ));
    let mut foreign = ct.clone();
    foreign[1..17].copy_from_slice(unknown.as_bytes());
    assert!(matches!(
        custody.unwrap(&foreign, b"ctx").await,
        Err(CustodyError::UnknownKey(h)) if h == unknown
    ));
    // The failures above changed nothing: the original still unwraps.
    let out = custody
        .unwrap(&ct, b"ctx")
        .await
        .expect("unwrap after failures");
    assert!(out.plaintext.ct_eq(&secret));
}

pub async fn destroy_is_idempotent_and_final(custody: &dyn Custody) {
    let key = custody.generate(&handle()).await.expect("generate");
    let secret = random(32);
    let ct = custody.wrap(&key.handle, &secret, b"").await.expect("wrap");
    assert_eq!(
        custody.destroy(&key.handle).await.expect("destroy"),
        Destroyed::Now
    );
    assert_eq!(
        custody.destroy(&key.handle).await.expect("destroy again"),
        Destroyed::Already
    );
    assert!(matches!(
        custody.unwrap(&ct, b"").await,
        Err(CustodyError::DestroyedKey(h)) if h == key.handle
    ));
    assert!(matches!(
        custody.wrap(&key.handle, &secret, b"").await,
        Err(CustodyError::DestroyedKey(_))
    ));
    let unknown = handle();
    assert!(matches!(
        custody.destroy(&unknown).await,
        Err(CustodyError::UnknownKey(_))
    ));
}

/// Recovery: the original material of a destroyed key takes its handle back,
/// and what it wrapped opens again; no other material can.
pub async fn a_destroyed_key_comes_back_only_with_its_own_material(custody: &dyn Custody) {
    let cmk = random(32);
    let public = custody.import_public_key();
    let original = custody
        .import(&handle(), &wrap_for_import(public, cmk.expose()))
        .await
        .expect("import");
    let secret = random(32);
    let ct = custody
        .wrap(&original.handle, &secret, b"org/kek")
        .await
        .expect("wrap");
    custody.destroy(&original.handle).await.expect("destroy");

    // Another key, even wrapped under the right import key, is not it.
    let other = wrap_for_import(public, random(32).expose());
    match custody.recover(&original.handle, &other).await {
        Err(CustodyError::NotTheDestroyedKey(h)) => assert_eq!(h, original.handle),
        other => panic!("recovering with other material: {other:?}"),
    }
    assert!(
        matches!(
            custody.unwrap(&ct, b"org/kek").await,
            Err(CustodyError::DestroyedKey(_))
        ),
        "a refused recovery leaves the key destroyed"
    );
    // A malformed upload is refused as an import would be.
    assert!(matches!(
        custody.recover(&original.handle, b"garbage").await,
        Err(CustodyError::Import(_))
    ));
    // A handle never issued has nothing to recover.
    let unknown = handle();
    assert!(matches!(
        custody
            .recover(&unknown, &wrap_for_import(public, cmk.expose()))
            .await,
        Err(CustodyError::UnknownKey(h)) if h == unknown
    ));

    // The original material, freshly wrapped: same handle, same key.
    let again = wrap_for_import(public, cmk.expose());
    let info = custody
        .recover(&original.handle, &again)
        .await
        .expect("recover with the original material");
    assert_eq!(info.handle, original.handle);
    assert_eq!(info.check_value, original.check_value);
    let out = custody
        .unwrap(&ct, b"org/kek")
        .await
        .expect("what the key wrapped before it was destroyed opens again");
    assert!(out.plaintext.ct_eq(&secret));
    assert_eq!(out.handle, original.handle);

    // A retry whose reply was lost succeeds; other material for the live
    // handle is refused as a reuse.
    custody
        .recover(&original.handle, &again)
        .await
        .expect("recovery retried");
    assert!(matches!(
        custody.recover(&original.handle, &other).await,
        Err(CustodyError::HandleInUse {
            destroyed: false,
            ..
        })
    ));
    // Recovered, it lives as any key: destroyed again, recovered again.
    assert_eq!(
        custody
            .destroy(&original.handle)
            .await
            .expect("destroy again"),
        Destroyed::Now
    );
    custody
        .recover(&original.handle, &again)
        .await
        .expect("recover a second time");
    assert!(custody.unwrap(&ct, b"org/kek").await.is_ok());

    // A generated key's material never leaves, so only an import can be
    // recovered from an upload; another key's material is refused.
    let generated = custody.generate(&handle()).await.expect("generate");
    custody.destroy(&generated.handle).await.expect("destroy");
    assert!(matches!(
        custody.recover(&generated.handle, &other).await,
        Err(CustodyError::NotTheDestroyedKey(_))
    ));
}

pub async fn batches_keep_order_and_isolate_failures(custody: &dyn Custody) {
    let key = custody.generate(&handle()).await.expect("generate");
    let unknown = handle();
    let secrets: Vec<SecretBytes> = (0..5).map(|_| random(32)).collect();
    let items = secrets
        .iter()
        .enumerate()
        .map(|(i, s)| WrapItem {
            handle: if i == 2 { unknown } else { key.handle },
            plaintext: s.clone(),
            associated_data: format!("kek-{i}").into_bytes(),
        })
        .collect();
    let wrapped = custody.wrap_batch(items).await;
    assert_eq!(wrapped.len(), 5);
    assert!(matches!(wrapped[2], Err(CustodyError::UnknownKey(_))));

    let items = wrapped
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().ok().map(|ct| (i, ct)))
        .map(|(i, ct)| UnwrapItem {
            ciphertext: ct.clone(),
            // Item 3 is presented with the wrong associated data.
            associated_data: format!("kek-{}", if i == 3 { 99 } else { i }).into_bytes(),
        })
        .collect();
    let unwrapped = custody.unwrap_batch(items).await;
    let expected = [0, 1, 3, 4];
    assert_eq!(unwrapped.len(), expected.len());
    for (result, i) in unwrapped.iter().zip(expected) {
        match (i, result) {
            (3, Err(CustodyError::Authentication)) => {}
            (3, other) => panic!("item 3 should fail authentication: {other:?}"),
            (_, Ok(out)) => assert!(out.plaintext.ct_eq(&secrets[i]), "item {i} out of order"),
            (_, Err(e)) => panic!("item {i}: {e}"),
        }
    }
}
