//! The behaviour every custody backend must show, written once and run
//! against each implementation (software keystore, PKCS#11, AWS KMS).
//!
//! A check drives a [`Custody`] — wrap, unwrap, destroy and their batches,
//! which mean the same for every backend once a key is in — and takes keys in
//! through a [`KeySource`]: an upload or a generation for a
//! [`MaterialCustody`], a key reference for AWS KMS. Checks of recovery need a
//! [`Recoverable`] source, one whose caller holds what names the key (the CMK
//! it uploaded, the ARN of a key in AWS KMS) and can present it again. [`all`]
//! and [`without_import`] run the checks against a [`MaterialCustody`];
//! [`by_reference`] against a [`Custody`] whose keys enter by reference.
//!
//! A backend says its refusals in [`CustodyError`]'s words; a ciphertext that
//! does not authenticate may also be refused in its provider's
//! ([`CustodyError::is_authentication`]).
//!
//! Each check panics with a message naming what broke. Enabled by the `contract`
//! feature, which only test builds turn on.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use async_trait::async_trait;
use cmk_secret::SecretBytes;
use rsa::{Oaep, RsaPublicKey, pkcs8::DecodePublicKey, rand_core::OsRng};

use crate::{
    Custody, CustodyError, Destroyed, ImportError, ImportPublicKey, InputError, KeyHandle, KeyInfo,
    KeyOrigin, KeyScope, MaterialCustody, OrgName, UnwrapItem, Unwrapped, WrapItem, envelope, kcv,
};

/// One way a key enters the backend under test.
#[async_trait]
pub trait KeySource: Send + Sync {
    /// What [`KeyInfo::origin`] says of a key that came in this way.
    fn origin(&self) -> KeyOrigin;

    /// Takes a new key into custody under `handle`.
    async fn add(&self, handle: &KeyHandle) -> Result<KeyInfo, CustodyError>;
}

/// A way in whose caller holds what names the key, and can present it again:
/// to add the same key under another handle, or to bring a destroyed one back.
#[async_trait]
pub trait Recoverable: KeySource {
    /// What the caller holds: the CMK it uploads, the reference to a key held
    /// elsewhere.
    type Material: Send + Sync;

    /// The material of a key not yet in custody.
    async fn material(&self) -> Self::Material;

    /// Takes the key of `material` into custody under `handle`.
    async fn add_with(
        &self,
        handle: &KeyHandle,
        material: &Self::Material,
    ) -> Result<KeyInfo, CustodyError>;

    /// Brings the destroyed key `handle` back from `material`, as
    /// [`MaterialCustody::recover`] does.
    async fn recover(
        &self,
        handle: &KeyHandle,
        material: &Self::Material,
    ) -> Result<KeyInfo, CustodyError>;
}

/// Keys uploaded to a [`MaterialCustody`]: random CMKs, wrapped under its
/// import key.
pub struct Imported<'a>(pub &'a dyn MaterialCustody);

#[async_trait]
impl KeySource for Imported<'_> {
    fn origin(&self) -> KeyOrigin {
        KeyOrigin::Imported
    }

    async fn add(&self, handle: &KeyHandle) -> Result<KeyInfo, CustodyError> {
        self.add_with(handle, &random(32)).await
    }
}

#[async_trait]
impl Recoverable for Imported<'_> {
    type Material = SecretBytes;

    async fn material(&self) -> SecretBytes {
        random(32)
    }

    async fn add_with(
        &self,
        handle: &KeyHandle,
        cmk: &SecretBytes,
    ) -> Result<KeyInfo, CustodyError> {
        let wrapped = wrap_for_import(self.0.import_public_key(), cmk.expose());
        self.0.import(handle, &scope(), &wrapped).await
    }

    async fn recover(
        &self,
        handle: &KeyHandle,
        cmk: &SecretBytes,
    ) -> Result<KeyInfo, CustodyError> {
        let wrapped = wrap_for_import(self.0.import_public_key(), cmk.expose());
        self.0.recover(handle, &scope(), &wrapped).await
    }
}

/// Keys a [`MaterialCustody`] generates.
pub struct Generated<'a>(pub &'a dyn MaterialCustody);

#[async_trait]
impl KeySource for Generated<'_> {
    fn origin(&self) -> KeyOrigin {
        KeyOrigin::Generated
    }

    async fn add(&self, handle: &KeyHandle) -> Result<KeyInfo, CustodyError> {
        self.0.generate(handle, &scope()).await
    }
}

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

/// The organisation every key a check adds serves.
pub fn owner() -> OrgName {
    OrgName::parse("contract-org").expect("valid org id")
}

/// Another organisation, which no key a check adds serves.
pub fn stranger() -> OrgName {
    OrgName::parse("contract-stranger").expect("valid org id")
}

/// The scope of every key a check adds: [`owner`]'s.
pub fn scope() -> KeyScope {
    KeyScope::Org(owner())
}

/// A fresh random handle, as a caller chooses one.
pub fn handle() -> KeyHandle {
    KeyHandle::random().expect("rng")
}

/// Runs every check of this module against `custody`.
pub async fn all(custody: &dyn MaterialCustody, other_import_key: &ImportPublicKey) {
    let (imported, generated) = (Imported(custody), Generated(custody));
    import_and_round_trip(custody).await;
    round_trip(custody, &generated).await;
    a_live_handle_is_not_taken_again(custody, &[&imported, &generated]).await;
    a_destroyed_handle_is_never_reused(custody, &[&generated, &imported]).await;
    bad_imports_are_refused(custody, other_import_key).await;
    bad_ciphertexts_are_refused(custody, &generated).await;
    destroy_is_idempotent_and_final(custody, &generated).await;
    a_destroyed_key_comes_back_only_with_its_own_material(custody, &imported).await;
    uploads_that_recover_nothing(custody).await;
    batches_keep_order_and_isolate_failures(custody, &generated).await;
    a_live_handle_is_not_taken_again(custody, &[&generated, &imported]).await;
    a_key_serves_the_scope_it_came_in_with(custody, &imported).await;
    a_key_serves_the_scope_it_came_in_with(custody, &generated).await;
    a_shared_key_serves_every_org(custody).await;
    audit_signatures_verify_under_the_published_key(custody).await;
}

/// Every check that needs no successful import, for a backend on a token that
/// cannot unwrap RSA-OAEP with SHA-256 (SoftHSM2): such a backend must refuse
/// import outright, which its own tests assert. Not a replacement for [`all`]
/// on any backend that can import.
pub async fn without_import(custody: &dyn MaterialCustody) {
    let generated = Generated(custody);
    round_trip(custody, &generated).await;
    a_live_handle_is_not_taken_again(custody, &[&generated, &Imported(custody)]).await;
    a_destroyed_handle_is_never_reused(custody, &[&generated, &Imported(custody)]).await;
    bad_ciphertexts_are_refused(custody, &generated).await;
    destroy_is_idempotent_and_final(custody, &generated).await;
    a_handle_never_issued_has_nothing_to_recover(custody).await;
    batches_keep_order_and_isolate_failures(custody, &generated).await;
    a_key_serves_the_scope_it_came_in_with(custody, &generated).await;
    a_shared_key_serves_every_org(custody).await;
    audit_signatures_verify_under_the_published_key(custody).await;
}

/// Every check that means the same for a backend whose keys enter by
/// reference (AWS KMS) as for one that holds them: `source` is `backend`'s
/// one way in, and a key's material is the reference (presenting the same
/// one again recovers it, another is refused). Left out, because they
/// are about uploaded bytes: [`bad_imports_are_refused`],
/// [`uploads_that_recover_nothing`], [`a_handle_never_issued_has_nothing_to_recover`]
/// (whose point is that the handle is checked before an upload is decrypted),
/// and the check value of [`import_and_round_trip`].
pub async fn by_reference<B, R>(backend: &B, source: &R)
where
    B: Custody + ?Sized,
    R: Recoverable,
{
    round_trip(backend, source).await;
    one_key_under_two_handles(backend, source).await;
    a_live_handle_is_not_taken_again(backend, &[source]).await;
    a_destroyed_handle_is_never_reused(backend, &[source]).await;
    bad_ciphertexts_are_refused(backend, source).await;
    destroy_is_idempotent_and_final(backend, source).await;
    a_key_serves_the_scope_it_came_in_with(backend, source).await;
    a_destroyed_key_comes_back_only_with_its_own_material(backend, source).await;
    batches_keep_order_and_isolate_failures(backend, source).await;
}

/// A key comes in under the handle asked for, with fresh material each time,
/// and what is wrapped under it, with or without associated data, unwraps.
pub async fn round_trip<B, S>(backend: &B, source: &S)
where
    B: Custody + ?Sized,
    S: KeySource + ?Sized,
{
    let chosen = handle();
    let a = source.add(&chosen).await.expect("add");
    let b = source.add(&handle()).await.expect("add");
    assert_eq!(a.handle, chosen, "stored under the handle asked for");
    assert_eq!(a.origin, source.origin());
    assert_ne!(a.check_value, b.check_value, "fresh key material each time");
    for associated_data in [&b""[..], b"org/kek"] {
        let secret = random(32);
        let ct = backend
            .wrap(&a.handle, &secret, associated_data)
            .await
            .expect("wrap");
        assert_eq!(envelope::parse(&ct), Ok(chosen), "ciphertext names its key");
        let out = backend.unwrap(&ct, associated_data).await.expect("unwrap");
        assert!(
            out.plaintext.ct_eq(&secret),
            "unwrap returns what was wrapped"
        );
        assert_eq!(out.handle, chosen);
    }
}

/// An uploaded key's check value is AES-CMAC of a zero block under it, and
/// it round-trips as any key.
pub async fn import_and_round_trip(custody: &dyn MaterialCustody) {
    let imported = Imported(custody);
    let cmk = random(32);
    let info = imported.add_with(&handle(), &cmk).await.expect("import");
    assert_eq!(
        info.check_value,
        kcv::check_value(&cmk).unwrap(),
        "check value is AES-CMAC of a zero block under the imported key"
    );
    round_trip(custody, &imported).await;
    one_key_under_two_handles(custody, &imported).await;
}

/// The same key under two handles has one check value, but the handle is
/// bound into a ciphertext: it cannot be moved to the other handle's name.
pub async fn one_key_under_two_handles<B, R>(backend: &B, source: &R)
where
    B: Custody + ?Sized,
    R: Recoverable + ?Sized,
{
    let material = source.material().await;
    let first = source.add_with(&handle(), &material).await.expect("add");
    let again = source
        .add_with(&handle(), &material)
        .await
        .expect("the same key under a second handle");
    assert_eq!(
        again.check_value, first.check_value,
        "same key, same check value"
    );

    let secret = random(32);
    let ct = backend
        .wrap(&first.handle, &secret, b"org/kek")
        .await
        .expect("wrap");
    let mut moved = ct.clone();
    moved[1..17].copy_from_slice(again.handle.as_bytes());
    match backend.unwrap(&moved, b"org/kek").await {
        Err(err) if err.is_authentication() => {}
        other => {
            panic!("a ciphertext moved to another handle: expected Authentication, got {other:?}")
        }
    }
    let out = backend.unwrap(&ct, b"org/kek").await.expect("unwrap");
    assert!(out.plaintext.ct_eq(&secret));
    assert_eq!(out.handle, first.handle);
}

/// The first of `ways_in` takes a handle; then every one of them is refused
/// it for a new key, and the key it names is left as it was.
pub async fn a_live_handle_is_not_taken_again<B>(backend: &B, ways_in: &[&dyn KeySource])
where
    B: Custody + ?Sized,
{
    let taken = handle();
    ways_in[0].add(&taken).await.expect("add");
    let secret = random(32);
    let ct = backend
        .wrap(&taken, &secret, b"before")
        .await
        .expect("wrap");
    for way in ways_in {
        refused_as_in_use(way.add(&taken).await, taken, false);
    }
    // Still the original key: what it wrapped before still unwraps.
    let out = backend.unwrap(&ct, b"before").await.expect("unwrap");
    assert!(
        out.plaintext.ct_eq(&secret),
        "the key under {taken} changed"
    );
    assert_eq!(out.handle, taken);
}

/// A destroyed key's handle (the first of `ways_in` took it) is refused for
/// a new key by every one of `ways_in`, and stays destroyed.
pub async fn a_destroyed_handle_is_never_reused<B>(backend: &B, ways_in: &[&dyn KeySource])
where
    B: Custody + ?Sized,
{
    let retired = handle();
    ways_in[0].add(&retired).await.expect("add");
    let secret = random(32);
    let ct = backend.wrap(&retired, &secret, b"").await.expect("wrap");
    backend.destroy(&retired).await.expect("destroy");
    for way in ways_in {
        refused_as_in_use(way.add(&retired).await, retired, true);
    }
    assert_eq!(
        backend.destroy(&retired).await.expect("destroy again"),
        Destroyed::Already,
        "a refused reuse does not bring the handle back"
    );
    assert!(matches!(
        backend.unwrap(&ct, b"").await,
        Err(CustodyError::DestroyedKey(h)) if h == retired
    ));
}

/// Asserts that `refused` is [`CustodyError::HandleInUse`] for `taken`, and
/// says so in the words the caller reads.
fn refused_as_in_use(refused: Result<KeyInfo, CustodyError>, taken: KeyHandle, destroyed: bool) {
    match &refused {
        Err(CustodyError::HandleInUse {
            handle,
            destroyed: was,
        }) => assert_eq!((*handle, *was), (taken, destroyed)),
        other => panic!("reusing a handle: expected HandleInUse, got {other:?}"),
    }
    let expected = if destroyed {
        format!("key handle {taken} was used by a destroyed key and is never reused")
    } else {
        format!("key handle {taken} is already in use")
    };
    assert_eq!(refused.unwrap_err().to_string(), expected);
}

/// Altered, truncated and foreign ciphertexts are refused, each with its
/// own error, and change nothing.
pub async fn bad_ciphertexts_are_refused<B, S>(backend: &B, source: &S)
where
    B: Custody + ?Sized,
    S: KeySource + ?Sized,
{
    let key = source.add(&handle()).await.expect("add");
    let secret = random(32);
    let ct = backend
        .wrap(&key.handle, &secret, b"ctx")
        .await
        .expect("wrap");

    assert_fails_authentication(backend.unwrap(&ct, b"other ctx").await, "other ctx");
    let mut tampered = ct.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x80;
    assert_fails_authentication(backend.unwrap(&tampered, b"ctx").await, "tampered");
    assert_fails_authentication(
        backend.unwrap(&ct[..ct.len() - 1], b"ctx").await,
        "truncated by one byte",
    );
    assert!(matches!(
        backend.unwrap(&ct[..20], b"ctx").await,
        Err(CustodyError::Input(InputError::CiphertextTruncated {
            actual: 20,
            ..
        }))
    ));
    assert!(matches!(
        backend.unwrap(&[], b"ctx").await,
        Err(CustodyError::Input(InputError::EmptyCiphertext))
    ));
    let unknown = handle();
    assert!(matches!(
        backend.wrap(&unknown, &secret, b"").await,
        Err(CustodyError::UnknownKey(h)) if h == unknown
    ));
    let mut foreign = ct.clone();
    foreign[1..17].copy_from_slice(unknown.as_bytes());
    assert!(matches!(
        backend.unwrap(&foreign, b"ctx").await,
        Err(CustodyError::UnknownKey(h)) if h == unknown
    ));
    // The failures above changed nothing: the original still unwraps.
    let out = backend
        .unwrap(&ct, b"ctx")
        .await
        .expect("unwrap after failures");
    assert!(out.plaintext.ct_eq(&secret));
}

/// Asserts that `result` is the refusal of a ciphertext that does not
/// authenticate ([`CustodyError::is_authentication`]).
fn assert_fails_authentication(result: Result<Unwrapped, CustodyError>, what: &str) {
    match result {
        Err(err) if err.is_authentication() => {}
        other => panic!("{what}: expected an authentication failure, got {other:?}"),
    }
}

/// A destroyed key neither wraps nor unwraps again; destroying it twice is
/// no error.
pub async fn destroy_is_idempotent_and_final<B, S>(backend: &B, source: &S)
where
    B: Custody + ?Sized,
    S: KeySource + ?Sized,
{
    let key = source.add(&handle()).await.expect("add");
    let secret = random(32);
    let ct = backend.wrap(&key.handle, &secret, b"").await.expect("wrap");
    assert_eq!(
        backend.destroy(&key.handle).await.expect("destroy"),
        Destroyed::Now
    );
    assert_eq!(
        backend.destroy(&key.handle).await.expect("destroy again"),
        Destroyed::Already
    );
    assert!(matches!(
        backend.unwrap(&ct, b"").await,
        Err(CustodyError::DestroyedKey(h)) if h == key.handle
    ));
    assert!(matches!(
        backend.wrap(&key.handle, &secret, b"").await,
        Err(CustodyError::DestroyedKey(_))
    ));
    let unknown = handle();
    assert!(matches!(
        backend.destroy(&unknown).await,
        Err(CustodyError::UnknownKey(_))
    ));
}

/// Recovery: the original material of a destroyed key takes its handle back,
/// and what it wrapped opens again; no other material can.
pub async fn a_destroyed_key_comes_back_only_with_its_own_material<B, R>(backend: &B, source: &R)
where
    B: Custody + ?Sized,
    R: Recoverable + ?Sized,
{
    let material = source.material().await;
    let original = source.add_with(&handle(), &material).await.expect("add");
    let secret = random(32);
    let ct = backend
        .wrap(&original.handle, &secret, b"org/kek")
        .await
        .expect("wrap");
    backend.destroy(&original.handle).await.expect("destroy");

    // Another key, even one this backend would take in, is not it.
    let other = source.material().await;
    match source.recover(&original.handle, &other).await {
        Err(CustodyError::NotTheDestroyedKey(h)) => assert_eq!(h, original.handle),
        other => panic!("recovering with other material: {other:?}"),
    }
    assert!(
        matches!(
            backend.unwrap(&ct, b"org/kek").await,
            Err(CustodyError::DestroyedKey(_))
        ),
        "a refused recovery leaves the key destroyed"
    );
    // A handle never issued has nothing to recover, and is not issued by
    // the attempt.
    let unknown = handle();
    assert!(matches!(
        source.recover(&unknown, &material).await,
        Err(CustodyError::UnknownKey(h)) if h == unknown
    ));
    assert!(
        matches!(
            backend.destroy(&unknown).await,
            Err(CustodyError::UnknownKey(_))
        ),
        "a refused recovery does not issue the handle"
    );

    // The original material, presented again: same handle, same key.
    let info = source
        .recover(&original.handle, &material)
        .await
        .expect("recover with the original material");
    assert_eq!(info.handle, original.handle);
    assert_eq!(info.check_value, original.check_value);
    let out = backend
        .unwrap(&ct, b"org/kek")
        .await
        .expect("what the key wrapped before it was destroyed opens again");
    assert!(out.plaintext.ct_eq(&secret));
    assert_eq!(out.handle, original.handle);

    // A retry whose reply was lost succeeds; other material for the live
    // handle is refused as a reuse.
    source
        .recover(&original.handle, &material)
        .await
        .expect("recovery retried");
    assert!(matches!(
        source.recover(&original.handle, &other).await,
        Err(CustodyError::HandleInUse {
            destroyed: false,
            ..
        })
    ));
    // Recovered, it lives as any key: destroyed again, recovered again.
    assert_eq!(
        backend
            .destroy(&original.handle)
            .await
            .expect("destroy again"),
        Destroyed::Now
    );
    source
        .recover(&original.handle, &material)
        .await
        .expect("recover a second time");
    assert!(backend.unwrap(&ct, b"org/kek").await.is_ok());
}

/// A key serves the one organisation it was added for, whoever asks, and
/// keeps no scope once destroyed; a handle never issued has none.
pub async fn a_key_serves_the_scope_it_came_in_with<B, S>(backend: &B, source: &S)
where
    B: Custody + ?Sized,
    S: KeySource + ?Sized,
{
    let key = source.add(&handle()).await.expect("add");
    for asking in [owner(), stranger()] {
        let scope = backend
            .scope(&key.handle, Some(&asking))
            .await
            .expect("scope");
        assert_eq!(scope, self::scope(), "asked for {asking}");
        assert!(scope.admits(&owner()) && !scope.admits(&stranger()));
    }
    backend.destroy(&key.handle).await.expect("destroy");
    assert!(matches!(
        backend.scope(&key.handle, Some(&owner())).await,
        Err(CustodyError::DestroyedKey(h)) if h == key.handle
    ));
    let unknown = handle();
    assert!(matches!(
        backend.scope(&unknown, None).await,
        Err(CustodyError::UnknownKey(h)) if h == unknown
    ));
}

/// The audit signing key signs with ECDSA P-256 over SHA-256 (`r ‖ s`), and
/// its signatures verify under the public point the backend publishes, for
/// the message signed only.
pub async fn audit_signatures_verify_under_the_published_key(custody: &dyn MaterialCustody) {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
    let public = custody.audit_public_key().to_vec();
    assert_eq!(
        (public.len(), public[0]),
        (65, 4),
        "an uncompressed P-256 point"
    );
    let key = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &public);
    let message = b"cmk-audit-checkpoint-v1\0 a checkpoint";
    let signature = custody.sign_audit(message).await.expect("sign");
    assert_eq!(signature.len(), 64);
    assert!(
        key.verify(message, &signature).is_ok(),
        "the signature verifies"
    );
    assert!(key.verify(b"another message", &signature).is_err());
    let again = custody.sign_audit(message).await.expect("sign again");
    assert!(key.verify(message, &again).is_ok());
    assert_eq!(custody.audit_public_key(), public.as_slice(), "one key");
}

/// A key generated for every organisation (the generic default key) says so.
pub async fn a_shared_key_serves_every_org(custody: &dyn MaterialCustody) {
    let key = custody
        .generate(&handle(), &KeyScope::Shared)
        .await
        .expect("generate");
    let scope = custody.scope(&key.handle, None).await.expect("scope");
    assert_eq!(scope, KeyScope::Shared);
    assert!(scope.admits(&owner()) && scope.admits(&stranger()));
}

/// Uploads that bring nothing back: a malformed one, refused as an import
/// would be, and any for a generated key, whose material never left custody.
pub async fn uploads_that_recover_nothing(custody: &dyn MaterialCustody) {
    let imported = Imported(custody);
    let destroyed = imported.add(&handle()).await.expect("import");
    custody.destroy(&destroyed.handle).await.expect("destroy");
    assert!(matches!(
        custody
            .recover(&destroyed.handle, &scope(), b"garbage")
            .await,
        Err(CustodyError::Import(_))
    ));

    let generated = custody
        .generate(&handle(), &scope())
        .await
        .expect("generate");
    custody.destroy(&generated.handle).await.expect("destroy");
    assert!(matches!(
        imported.recover(&generated.handle, &random(32)).await,
        Err(CustodyError::NotTheDestroyedKey(_))
    ));
}

/// Batch results come in the order of their items, and one item's failure
/// is its own.
pub async fn batches_keep_order_and_isolate_failures<B, S>(backend: &B, source: &S)
where
    B: Custody + ?Sized,
    S: KeySource + ?Sized,
{
    let key = source.add(&handle()).await.expect("add");
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
    let wrapped = backend.wrap_batch(items).await;
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
    let unwrapped = backend.unwrap_batch(items).await;
    let expected = [0, 1, 3, 4];
    assert_eq!(unwrapped.len(), expected.len());
    for (result, i) in unwrapped.iter().zip(expected) {
        match (i, result) {
            (3, Err(err)) if err.is_authentication() => {}
            (3, other) => panic!("item 3 should fail authentication: {other:?}"),
            (_, Ok(out)) => assert!(out.plaintext.ct_eq(&secrets[i]), "item {i} out of order"),
            (_, Err(e)) => panic!("item {i}: {e}"),
        }
    }
}

/// Recovery of a handle never issued is [`CustodyError::UnknownKey`], and
/// leaves it unissued.
pub async fn a_handle_never_issued_has_nothing_to_recover(custody: &dyn MaterialCustody) {
    let public = custody.import_public_key().clone();
    let unknown = handle();
    assert!(matches!(
        custody
            .recover(&unknown, &scope(), &wrap_for_import(&public, random(32).expose()))
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

pub async fn bad_imports_are_refused(
    custody: &dyn MaterialCustody,
    other_import_key: &ImportPublicKey,
) {
    let public = custody.import_public_key().clone();
    let modulus = public.bits as usize / 8;
    for len in [31, 33, 16, 64] {
        let wrapped = wrap_for_import(&public, random(len).expose());
        match custody.import(&handle(), &scope(), &wrapped).await {
            Err(CustodyError::Import(ImportError::KeyLength { actual })) => assert_eq!(actual, len),
            other => panic!("{len}-byte key: expected KeyLength, got {other:?}"),
        }
    }
    let sha1 = wrap_for_import_sha1(&public, random(32).expose());
    assert!(
        matches!(
            custody.import(&handle(), &scope(), &sha1).await,
            Err(CustodyError::Import(ImportError::OaepSha1))
        ),
        "SHA-1 OAEP is named as such"
    );
    let foreign = wrap_for_import(other_import_key, random(32).expose());
    let err = custody
        .import(&handle(), &scope(), &foreign)
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
        custody.import(&handle(), &scope(), &[]).await,
        Err(CustodyError::Import(ImportError::Empty))
    ));
    let garbage = random(modulus);
    assert!(matches!(
        custody.import(&handle(), &scope(), garbage.expose()).await,
        Err(CustodyError::Import(ImportError::Undecryptable { .. }))
    ));
    match custody
        .import(&handle(), &scope(), &garbage.expose()[..modulus - 1])
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
