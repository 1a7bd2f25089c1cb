//! The token objects of this backend and the operations on them, each a few
//! PKCS#11 calls on one session.
//!
//! | object | class | CKA_LABEL | CKA_ID | CKA_VALUE |
//! |---|---|---|---|---|
//! | a CMK | secret key, AES-256 | the handle (32 hex characters) | the handle's 16 bytes | (sensitive) |
//! | a destroyed CMK's tombstone | data, CKA_APPLICATION [`TOMBSTONE_APPLICATION`] | the handle | | `01` ‖ 32-byte fingerprint |
//! | the RSA import key pair | private and public key | [`IMPORT_KEY_LABEL`] | [`IMPORT_KEY_LABEL`] | (sensitive) |
//!
//! Every CMK and the import private key are `CKA_TOKEN`, `CKA_PRIVATE`,
//! `CKA_SENSITIVE` and not `CKA_EXTRACTABLE`; tombstones are `CKA_TOKEN` and
//! `CKA_PRIVATE`.

use cmk_hsm_custody::{
    CMK_LEN, CustodyError, ImportError, ImportPublicKey, KeyCheckValue, KeyHandle, KeyScope,
};
use cryptoki::{
    error::{Error, RvError},
    mechanism::{
        Mechanism, MechanismType,
        aead::GcmParams,
        rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource},
    },
    object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle},
    session::{Session, SessionState},
};
use rsa::{
    BigUint, RsaPublicKey,
    pkcs8::{EncodePublicKey, LineEnding},
};
use sha2::{Digest, Sha256};

use crate::pool::{Fail, rv, token};

/// Label and id of the RSA import key pair.
pub const IMPORT_KEY_LABEL: &str = "cmk-import-key";
/// CKA_APPLICATION of a tombstone.
pub const TOMBSTONE_APPLICATION: &str = "cmk-hsm-daemon: destroyed key";
/// Format of a tombstone's value.
const TOMBSTONE_VERSION: u8 = 1;
/// Length of a fingerprint: two AES-CMAC tags.
pub const FINGERPRINT_LEN: usize = 32;
/// What the fingerprint is the AES-CMAC of, under the CMK: two fixed 32-byte
/// messages, neither of them the zero block of the check value.
const FINGERPRINT_MESSAGES: [&[u8; 32]; 2] = [
    b"cmk-hsm-pkcs11 fingerprint v1 #1",
    b"cmk-hsm-pkcs11 fingerprint v1 #2",
];
const GCM_TAG_BITS: u64 = 128;

/// What the refusal of an import on a token without OAEP-SHA-256 says.
pub const OAEP_SHA256_UNSUPPORTED: &str = "this PKCS#11 token cannot unwrap RSA-OAEP with SHA-256 \
     (SoftHSM2 supports only SHA-1); use a token that can, such as Kryoptic or a hardware HSM. \
     The key is never decrypted outside the token, so it cannot be imported here";

/// What the token holds under a handle.
pub(crate) enum HandleState {
    /// A live key (and any duplicates a crash of a recovery left).
    Live(Vec<ObjectHandle>),
    /// A tombstone, and key objects an interrupted destroy left behind.
    Destroyed {
        tombstone: ObjectHandle,
        fingerprint: [u8; FINGERPRINT_LEN],
        leftovers: Vec<ObjectHandle>,
    },
    /// Nothing: never issued here.
    Unknown,
}

/// Looks `handle` up. "Unknown" is answered only by a session that is logged
/// in: a session that lost its login finds no private object at all.
pub(crate) fn state(session: &Session, handle: &KeyHandle) -> Result<HandleState, Fail> {
    let keys = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(handle.as_bytes().to_vec()),
        ])
        .map_err(token("C_FindObjects"))?;
    let tombstones = session
        .find_objects(&tombstone_search(handle))
        .map_err(token("C_FindObjects"))?;
    if let Some(&tombstone) = tombstones.first() {
        let fingerprint = read_tombstone(session, handle, tombstone)?;
        return Ok(HandleState::Destroyed {
            tombstone,
            fingerprint,
            leftovers: keys,
        });
    }
    if !keys.is_empty() {
        return Ok(HandleState::Live(keys));
    }
    ensure_logged_in(session)?;
    Ok(HandleState::Unknown)
}

/// Refuses a handle the token holds a key or tombstone for.
pub(crate) fn check_unused(session: &Session, handle: &KeyHandle) -> Result<(), Fail> {
    match state(session, handle)? {
        HandleState::Unknown => Ok(()),
        HandleState::Live(_) => Err(in_use(handle, false)),
        HandleState::Destroyed { .. } => Err(in_use(handle, true)),
    }
}

pub(crate) fn in_use(handle: &KeyHandle, destroyed: bool) -> Fail {
    Fail::Custody(CustodyError::HandleInUse {
        handle: *handle,
        destroyed,
    })
}

fn ensure_logged_in(session: &Session) -> Result<(), Fail> {
    let info = session
        .get_session_info()
        .map_err(token("C_GetSessionInfo"))?;
    match info.session_state() {
        SessionState::RwUser | SessionState::RoUser => Ok(()),
        _ => Err(Fail::Token {
            call: "C_GetSessionInfo",
            error: Error::Pkcs11(
                RvError::UserNotLoggedIn,
                cryptoki::context::Function::GetSessionInfo,
            ),
        }),
    }
}

fn tombstone_search(handle: &KeyHandle) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Application(TOMBSTONE_APPLICATION.as_bytes().to_vec()),
        Attribute::Label(handle.to_string().into_bytes()),
    ]
}

fn read_tombstone(
    session: &Session,
    handle: &KeyHandle,
    object: ObjectHandle,
) -> Result<[u8; FINGERPRINT_LEN], Fail> {
    let attributes = session
        .get_attributes(object, &[AttributeType::Value])
        .map_err(token("C_GetAttributeValue"))?;
    let value = attributes.iter().find_map(|a| match a {
        Attribute::Value(v) => Some(v.as_slice()),
        _ => None,
    });
    match value {
        Some([TOMBSTONE_VERSION, fingerprint @ ..]) if fingerprint.len() == FINGERPRINT_LEN => {
            let mut kept = [0; FINGERPRINT_LEN];
            kept.copy_from_slice(fingerprint);
            Ok(kept)
        }
        _ => Err(Fail::Custody(CustodyError::Corrupt {
            path: format!("PKCS#11 tombstone object of key {handle}"),
        })),
    }
}

/// Destroys the key object `object`. One that is gone already was destroyed
/// by another daemon on the token at the same moment, which is what this
/// call wanted.
pub(crate) fn destroy_key(session: &Session, object: ObjectHandle) -> Result<(), Fail> {
    match session.destroy_object(object) {
        Err(Error::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _)) => Ok(()),
        other => other.map_err(token("C_DestroyObject")),
    }
}

/// Stores the tombstone of `handle`, holding `fingerprint`.
pub(crate) fn write_tombstone(
    session: &Session,
    handle: &KeyHandle,
    fingerprint: &[u8; FINGERPRINT_LEN],
) -> Result<(), Fail> {
    let mut value = vec![TOMBSTONE_VERSION];
    value.extend_from_slice(fingerprint);
    let mut template = tombstone_search(handle);
    template.extend([
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Modifiable(false),
        Attribute::Value(value),
    ]);
    session
        .create_object(&template)
        .map_err(token("C_CreateObject"))?;
    Ok(())
}

/// The attributes of a CMK, as a session object (`token` false, for checks
/// before it is admitted) or a token object.
fn cmk_template(token: bool) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(token),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        // AES-CMAC, for the check value and the fingerprint.
        Attribute::Sign(true),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]
}

/// A session object destroyed when dropped: a key on its way into custody.
pub(crate) struct TempKey<'s> {
    session: &'s Session,
    pub(crate) object: ObjectHandle,
}

impl Drop for TempKey<'_> {
    fn drop(&mut self) {
        // A session object dies with its session anyway; pooled sessions live
        // long, so it is destroyed now.
        let _ = self.session.destroy_object(self.object);
    }
}

/// A fresh AES-256 key, generated in the token as a session object.
pub(crate) fn generate(session: &Session) -> Result<TempKey<'_>, Fail> {
    let mut template = cmk_template(false);
    template.push(Attribute::ValueLen((CMK_LEN as u64).into()));
    let object = session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(token("C_GenerateKey"))?;
    Ok(TempKey { session, object })
}

/// Makes the session key `temp` a token object under `handle`, serving
/// `scope`: its id is the handle's bytes, its label the handle and the scope
/// (`<handle> org:<org>` or `<handle> shared`), which every daemon on the
/// token reads back.
pub(crate) fn admit(
    session: &Session,
    temp: &TempKey<'_>,
    handle: &KeyHandle,
    scope: &KeyScope,
) -> Result<ObjectHandle, Fail> {
    session
        .copy_object(
            temp.object,
            &[
                Attribute::Token(true),
                Attribute::Id(handle.as_bytes().to_vec()),
                Attribute::Label(format!("{handle} {scope}").into_bytes()),
            ],
        )
        .map_err(token("C_CopyObject"))
}

/// The scope the key object `object` of `handle` serves, from its label.
pub(crate) fn scope(
    session: &Session,
    handle: &KeyHandle,
    object: ObjectHandle,
) -> Result<KeyScope, Fail> {
    let attributes = session
        .get_attributes(object, &[AttributeType::Label])
        .map_err(token("C_GetAttributeValue"))?;
    let label = attributes.iter().find_map(|a| match a {
        Attribute::Label(label) => Some(label.as_slice()),
        _ => None,
    });
    let prefix = format!("{handle} ");
    label
        .and_then(|label| std::str::from_utf8(label).ok())
        .and_then(|label| label.strip_prefix(&prefix))
        .and_then(|scope| scope.parse().ok())
        .ok_or_else(|| {
            Fail::Custody(CustodyError::Corrupt {
                path: format!("PKCS#11 key object of key {handle} (no scope in its label)"),
            })
        })
}

/// The check value, computed in the token: AES-CMAC of a zero block.
pub(crate) fn check_value(session: &Session, key: ObjectHandle) -> Result<KeyCheckValue, Fail> {
    let tag = session
        .sign(&Mechanism::AesCMac, key, &[0; 16])
        .map_err(token("C_Sign (AES-CMAC)"))?;
    KeyCheckValue::from_cmac_of_zero_block(&tag).ok_or(Fail::Custody(CustodyError::Crypto(
        "the token's AES-CMAC tag is too short",
    )))
}

/// The fingerprint kept in a tombstone, computed in the token: the AES-CMAC
/// tags of two fixed messages under the key, 256 bits in all. (SoftHSM2 does
/// not HMAC under an AES key; AES-CMAC every token with AES has.)
pub(crate) fn fingerprint(
    session: &Session,
    key: ObjectHandle,
) -> Result<[u8; FINGERPRINT_LEN], Fail> {
    let mut fingerprint = [0; FINGERPRINT_LEN];
    for (part, message) in fingerprint.chunks_mut(16).zip(FINGERPRINT_MESSAGES) {
        let tag = session
            .sign(&Mechanism::AesCMac, key, message)
            .map_err(token("C_Sign (AES-CMAC)"))?;
        if tag.len() != part.len() {
            return Err(Fail::Custody(CustodyError::Crypto(
                "the token's AES-CMAC tag is not 16 bytes",
            )));
        }
        part.copy_from_slice(&tag);
    }
    Ok(fingerprint)
}

/// AES-256-GCM encryption in the token: ciphertext ‖ tag.
pub(crate) fn encrypt(
    session: &Session,
    key: ObjectHandle,
    nonce: &[u8; 12],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    let mut iv = *nonce;
    let params = GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into())?;
    session.encrypt(&Mechanism::AesGcm(params), key, plaintext)
}

/// AES-256-GCM decryption in the token.
pub(crate) fn decrypt(
    session: &Session,
    key: ObjectHandle,
    nonce: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Vec<u8>, Error> {
    let mut iv = [0; 12];
    iv.copy_from_slice(nonce);
    let params = GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into())?;
    session.decrypt(&Mechanism::AesGcm(params), key, ciphertext)
}

/// Whether a failed GCM decryption means the ciphertext did not
/// authenticate. SoftHSM2 answers a wrong tag with `CKR_GENERAL_ERROR`, so
/// that code counts too.
pub(crate) fn is_authentication_failure(error: &Error) -> bool {
    use RvError::*;
    matches!(
        rv(error),
        Some(
            EncryptedDataInvalid
                | EncryptedDataLenRange
                | DataLenRange
                | DataInvalid
                | GeneralError
        )
    )
}

fn oaep(sha256: bool) -> Mechanism<'static> {
    let params = if sha256 {
        PkcsOaepParams::new(
            MechanismType::SHA256,
            PkcsMgfType::MGF1_SHA256,
            PkcsOaepSource::empty(),
        )
    } else {
        PkcsOaepParams::new(
            MechanismType::SHA1,
            PkcsMgfType::MGF1_SHA1,
            PkcsOaepSource::empty(),
        )
    };
    Mechanism::RsaPkcsOaep(params)
}

/// Unwraps an uploaded CMK (RSA-OAEP, SHA-256, MGF1-SHA-256, under the import
/// key) into a session object, or says precisely why not, as the software
/// keystore does; nothing of it is ever decrypted outside the token.
pub(crate) fn unwrap_cmk<'s>(
    session: &'s Session,
    wrapped: &[u8],
    public: &ImportPublicKey,
) -> Result<TempKey<'s>, Fail> {
    let private = import_private_key(session, public)?;
    let error = match session.unwrap_key(&oaep(true), private, wrapped, &cmk_template(false)) {
        Ok(object) => {
            let temp = TempKey { session, object };
            let len = value_len(session, object)?;
            if len != CMK_LEN {
                return Err(ImportError::KeyLength { actual: len }.into());
            }
            return Ok(temp);
        }
        Err(error) => error,
    };
    if matches!(
        rv(&error),
        Some(RvError::ArgumentsBad | RvError::MechanismParamInvalid | RvError::MechanismInvalid)
    ) {
        return Err(CustodyError::DeviceCannot(OAEP_SHA256_UNSUPPORTED).into());
    }
    if !is_undecryptable(session, &error) {
        return Err(token("C_UnwrapKey")(error));
    }
    // Why it failed: another length (which an AES template refuses), SHA-1
    // (OpenSSL's default, the usual mistake), or not ours at all. Probed by
    // unwrapping as generic secrets, never by decrypting.
    let generic = |sha256: bool| {
        session
            .unwrap_key(&oaep(sha256), private, wrapped, &generic_template())
            .map(|object| TempKey { session, object })
    };
    if let Ok(probe) = generic(true) {
        let len = value_len(session, probe.object)?;
        return match len {
            CMK_LEN => Err(token("C_UnwrapKey")(error)),
            actual => Err(ImportError::KeyLength { actual }.into()),
        };
    }
    if generic(false).is_ok() {
        return Err(ImportError::OaepSha1.into());
    }
    // The probes failed as the unwrap did; a token that failed meanwhile
    // rather than refused the ciphertext is unavailable, not the upload bad.
    if !is_undecryptable(session, &error) {
        return Err(token("C_UnwrapKey")(error));
    }
    Err(ImportError::Undecryptable {
        key_id: public.key_id.clone(),
    }
    .into())
}

/// Whether a failed `C_UnwrapKey` of an RSA-OAEP ciphertext means the
/// ciphertext does not decrypt under the import key. Kryoptic 1.5 answers
/// a bad OAEP padding (another key, another hash, garbage) with
/// `CKR_DEVICE_ERROR`, the code of a failed device, so that code counts as
/// "does not decrypt" only while the session still answers, logged in.
fn is_undecryptable(session: &Session, error: &Error) -> bool {
    match rv(error) {
        Some(RvError::DeviceError) => ensure_logged_in(session).is_ok(),
        _ => !crate::pool::is_connection_failure(error),
    }
}

fn generic_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
    ]
}

fn value_len(session: &Session, object: ObjectHandle) -> Result<usize, Fail> {
    session
        .get_attributes(object, &[AttributeType::ValueLen])
        .map_err(token("C_GetAttributeValue"))?
        .into_iter()
        .find_map(|a| match a {
            Attribute::ValueLen(len) => Some(usize::from(len)),
            _ => None,
        })
        .ok_or(Fail::Custody(CustodyError::Crypto(
            "the token does not report CKA_VALUE_LEN of an unwrapped key",
        )))
}

fn import_key_search(class: ObjectClass) -> Vec<Attribute> {
    vec![
        Attribute::Class(class),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Label(IMPORT_KEY_LABEL.as_bytes().to_vec()),
    ]
}

/// The private half of the import key whose public half is `public`.
fn import_private_key(session: &Session, public: &ImportPublicKey) -> Result<ObjectHandle, Fail> {
    let found = session
        .find_objects(&import_key_search(ObjectClass::PRIVATE_KEY))
        .map_err(token("C_FindObjects"))?;
    if let [only] = found.as_slice() {
        return Ok(*only);
    }
    for object in found {
        if public_key(session, object)?.key_id == public.key_id {
            return Ok(object);
        }
    }
    Err(Fail::Custody(CustodyError::Unavailable(format!(
        "the RSA import key {} is no longer on the PKCS#11 token",
        public.key_id
    ))))
}

/// The RSA import key pair of the token, generated there on first use.
/// Several (two daemons that started at once on a new token) are settled by
/// keeping the one with the smallest key id, so that every daemon on the
/// token offers the same public key.
pub(crate) fn load_or_create_import_key(
    session: &Session,
    bits: u32,
) -> Result<ImportPublicKey, Fail> {
    let mut found = session
        .find_objects(&import_key_search(ObjectClass::PRIVATE_KEY))
        .map_err(token("C_FindObjects"))?;
    if found.is_empty() {
        tracing::info!(
            bits,
            "generating the RSA import key pair in the PKCS#11 token"
        );
        let id = IMPORT_KEY_LABEL.as_bytes().to_vec();
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::ModulusBits(u64::from(bits).into()),
            Attribute::PublicExponent(vec![1, 0, 1]),
            Attribute::Encrypt(true),
            Attribute::Wrap(true),
            Attribute::Verify(false),
            Attribute::Label(id.clone()),
            Attribute::Id(id.clone()),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            // Unwrap only: the token never hands an uploaded key to the host.
            Attribute::Unwrap(true),
            Attribute::Decrypt(false),
            Attribute::Sign(false),
            Attribute::Label(id.clone()),
            Attribute::Id(id),
        ];
        let (_, private) = session
            .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
            .map_err(token("C_GenerateKeyPair"))?;
        found = vec![private];
    }
    let mut keys = found
        .into_iter()
        .map(|object| public_key(session, object))
        .collect::<Result<Vec<_>, _>>()?;
    if keys.len() > 1 {
        tracing::warn!(
            count = keys.len(),
            "the PKCS#11 token holds several RSA import keys; using the one with the smallest key id"
        );
    }
    keys.sort_by(|a, b| a.key_id.cmp(&b.key_id));
    keys.into_iter()
        .next()
        .ok_or(Fail::Custody(CustodyError::Crypto(
            "no RSA import key after generating one",
        )))
}

/// The SubjectPublicKeyInfo PEM and key id of a token RSA key, from its
/// modulus and public exponent, as the software keystore computes them.
fn public_key(session: &Session, private: ObjectHandle) -> Result<ImportPublicKey, Fail> {
    let attributes = session
        .get_attributes(
            private,
            &[AttributeType::Modulus, AttributeType::PublicExponent],
        )
        .map_err(token("C_GetAttributeValue"))?;
    let (mut n, mut e) = (None, None);
    for attribute in attributes {
        match attribute {
            Attribute::Modulus(v) => n = Some(v),
            Attribute::PublicExponent(v) => e = Some(v),
            _ => {}
        }
    }
    let unusable = || {
        Fail::Custody(CustodyError::Crypto(
            "the token's RSA import key is unusable",
        ))
    };
    let (n, e) = n.zip(e).ok_or_else(unusable)?;
    let key = RsaPublicKey::new(BigUint::from_bytes_be(&n), BigUint::from_bytes_be(&e))
        .map_err(|_| unusable())?;
    let der = key.to_public_key_der().map_err(|_| unusable())?;
    let pem = key
        .to_public_key_pem(LineEnding::LF)
        .map_err(|_| unusable())?;
    let bits =
        u32::try_from(rsa::traits::PublicKeyParts::n(&key).bits()).map_err(|_| unusable())?;
    Ok(ImportPublicKey {
        pem,
        key_id: hex::encode(Sha256::digest(der.as_bytes())),
        bits,
    })
}

/// Label of the ECDSA P-256 audit signing key pair.
pub const AUDIT_KEY_LABEL: &str = "cmk-audit-signing-key";

/// DER of the P-256 curve's OID (prime256v1), as CKA_EC_PARAMS.
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The token's audit signing key: its private object's CKA_ID, and its
/// public point (uncompressed, 65 bytes).
pub(crate) struct AuditKey {
    pub(crate) id: Vec<u8>,
    pub(crate) point: Vec<u8>,
}

fn audit_key_search(class: ObjectClass) -> Vec<Attribute> {
    vec![
        Attribute::Class(class),
        Attribute::KeyType(KeyType::EC),
        Attribute::Label(AUDIT_KEY_LABEL.as_bytes().to_vec()),
    ]
}

/// The audit signing key pair of the token, generated there on first use
/// (sensitive, never extractable, sign only). Several (two daemons that
/// started at once on a new token) are settled by keeping the pair with the
/// smallest public point, so that every daemon signs with the same key.
pub(crate) fn load_or_create_audit_key(session: &Session) -> Result<AuditKey, Fail> {
    let mut publics = session
        .find_objects(&audit_key_search(ObjectClass::PUBLIC_KEY))
        .map_err(token("C_FindObjects"))?;
    if publics.is_empty() {
        tracing::info!("generating the ECDSA P-256 audit signing key pair in the PKCS#11 token");
        let mut id = vec![0; 16];
        cmk_hsm_custody::fill_random(&mut id).map_err(Fail::Custody)?;
        let label = AUDIT_KEY_LABEL.as_bytes().to_vec();
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::EcParams(P256_PARAMS.to_vec()),
            Attribute::Verify(true),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
            Attribute::Label(label.clone()),
            Attribute::Id(id.clone()),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Label(label),
            Attribute::Id(id),
        ];
        let (public, _) = session
            .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
            .map_err(token("C_GenerateKeyPair"))?;
        publics = vec![public];
    }
    let mut keys = Vec::with_capacity(publics.len());
    for object in publics {
        let attributes = session
            .get_attributes(object, &[AttributeType::Id, AttributeType::EcPoint])
            .map_err(token("C_GetAttributeValue"))?;
        let (mut id, mut point) = (None, None);
        for attribute in attributes {
            match attribute {
                Attribute::Id(v) => id = Some(v),
                Attribute::EcPoint(v) => point = Some(v),
                _ => {}
            }
        }
        let unusable = || {
            Fail::Custody(CustodyError::Crypto(
                "the token's audit signing key is unusable",
            ))
        };
        let (id, point) = id.zip(point).ok_or_else(unusable)?;
        // CKA_EC_POINT is a DER OCTET STRING around the point (some tokens
        // give the bare point).
        let point = match point.as_slice() {
            [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest.to_vec(),
            bare if bare.len() == 65 && bare[0] == 0x04 => bare.to_vec(),
            _ => return Err(unusable()),
        };
        keys.push(AuditKey { id, point });
    }
    if keys.len() > 1 {
        tracing::warn!(
            count = keys.len(),
            "the PKCS#11 token holds several audit signing keys; using the one with the smallest public point"
        );
    }
    keys.sort_by(|a, b| a.point.cmp(&b.point));
    keys.into_iter()
        .next()
        .ok_or(Fail::Custody(CustodyError::Crypto(
            "no audit signing key after generating one",
        )))
}

/// Signs `message` with the audit signing key `id`: ECDSA over its SHA-256
/// in the token, `r ‖ s`.
pub(crate) fn sign_audit(session: &Session, id: &[u8], message: &[u8]) -> Result<Vec<u8>, Fail> {
    let mut search = audit_key_search(ObjectClass::PRIVATE_KEY);
    search.push(Attribute::Id(id.to_vec()));
    let private = *session
        .find_objects(&search)
        .map_err(token("C_FindObjects"))?
        .first()
        .ok_or_else(|| {
            Fail::Custody(CustodyError::Unavailable(
                "the audit signing key is no longer on the PKCS#11 token".into(),
            ))
        })?;
    let digest = Sha256::digest(message);
    session
        .sign(&Mechanism::Ecdsa, private, &digest)
        .map_err(token("C_Sign (ECDSA)"))
}
