//! The PKCS#11 custody backend ([`cmk_hsm_custody::Custody`] and
//! [`cmk_hsm_custody::MaterialCustody`]): every CMK is an AES-256 secret-key object in a
//! token (an HSM, or a soft token such as SoftHSM2 or Kryoptic) that is
//! sensitive and never extractable, so this process never holds CMK bytes.
//!
//! - **Import** is `C_UnwrapKey` with `CKM_RSA_PKCS_OAEP` (SHA-256,
//!   MGF1-SHA-256) under an RSA key pair generated in the token; the key
//!   length is checked with `CKA_VALUE_LEN`. A token that cannot do OAEP with
//!   SHA-256 (SoftHSM2 2.6) refuses every import with
//!   [`token::OAEP_SHA256_UNSUPPORTED`]: there is no fallback that decrypts
//!   in host memory.
//! - **Generate** is `C_GenerateKey`; the check value is AES-CMAC of a zero
//!   block computed in the token.
//! - **Wrap/Unwrap** are `CKM_AES_GCM` `C_Encrypt`/`C_Decrypt` in the token,
//!   producing exactly the version 1 ciphertext of
//!   [`cmk_hsm_custody::envelope`] (version ‖ handle ‖ nonce ‖ ciphertext ‖
//!   tag, the version and handle bound as GCM associated data before the
//!   caller's). The 12-byte nonce is random, drawn on the host.
//! - **Scope**: each key object's label is its handle and the scope it serves
//!   (`<handle> org:<org>` or `<handle> shared`), set when it is admitted and
//!   read back by every daemon on the token; a key object without one is
//!   refused as corrupt.
//! - **Destroy** writes a tombstone data object holding a fingerprint of the
//!   key (two AES-CMAC tags under it, computed in the token) before
//!   `C_DestroyObject`, so a handle is never reused and only the original key
//!   can be recovered under it.
//!
//! A key enters custody in two steps: it is made (generated or unwrapped) as
//! a session object, checked (length, check value, fingerprint), and only
//! then copied to a token object under its handle with `C_CopyObject`, so a
//! refused key leaves nothing on the token. The check that a handle is unused
//! and the copy happen under one lock of this process, and a copy that finds
//! another daemon's under the same handle is withdrawn, so several daemons
//! can serve one token (see `Inner::admit_new`).
//!
//! See [`pool`] for sessions, timeouts and reconnection, and `docs/pkcs11.md`
//! for configuration and what each token can do.

#![forbid(unsafe_code)]

mod pool;
mod settings;
pub mod token;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use async_trait::async_trait;
use cmk_hsm_custody::{
    Custody, CustodyError, Destroyed, ImportError, ImportPublicKey, KeyHandle, KeyInfo, KeyOrigin,
    KeyScope, MaterialCustody, OrgName, UnwrapItem, Unwrapped, WrapItem,
    envelope::{self, HEADER_LEN, Sealed},
};
use cmk_secret::SecretBytes;
use cryptoki::{error::RvError, object::ObjectHandle};
use futures_util::{StreamExt, stream};
use tracing::{info, warn};

pub use settings::{Pkcs11Settings, TokenSelector, pin_from_text, read_pin_file};

use crate::{
    pool::{Fail, Lease, Pool, rv, token as ck},
    token::{HandleState, TempKey},
};

/// Length of the GCM nonce in a ciphertext.
const NONCE_LEN: usize = 12;

/// CMKs as non-extractable objects of a PKCS#11 token. Cheap to clone.
#[derive(Clone)]
pub struct Pkcs11Custody {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pkcs11Custody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Custody")
            .field("import_key_id", &self.inner.public.key_id)
            .finish_non_exhaustive()
    }
}

struct Inner {
    pool: Arc<Pool>,
    public: ImportPublicKey,
    sessions: usize,
    audit_key: token::AuditKey,
    // Serialises the changes to the set of handles of this process: creating
    // a key object after checking that the handle has neither a key nor a
    // tombstone, destroying, recovering.
    handles: Mutex<()>,
    // Object handles of live keys, each valid in the pool generation it was
    // found in. Destroyed and unknown handles are looked up every time.
    objects: Mutex<HashMap<KeyHandle, (u64, ObjectHandle)>>,
    // The scopes of live keys, read from their labels. A handle's scope
    // never changes while it lives, so these hold across pool generations.
    scopes: Mutex<HashMap<KeyHandle, KeyScope>>,
}

impl Pkcs11Custody {
    /// Loads the module, logs in to the token, and finds (or generates) the
    /// RSA import key pair in it. Blocking: call at start-up.
    pub fn open(settings: &Pkcs11Settings) -> Result<Self, CustodyError> {
        let pool = Arc::new(Pool::open(settings)?);
        let bits = settings.import_key_bits.bits();
        let public = pool.within_session("start-up", |lease| {
            token::load_or_create_import_key(&lease.session, bits)
        })?;
        let audit_key = pool.within_session("start-up", |lease| {
            token::load_or_create_audit_key(&lease.session)
        })?;
        if public.bits != bits {
            tracing::warn!(
                existing = public.bits,
                configured = bits,
                "keeping the token's existing RSA import key; the configured size applies to a new token only"
            );
        }
        info!(import_key_id = %public.key_id, "PKCS#11 custody ready");
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                public,
                sessions: settings.sessions.max(1),
                audit_key,
                handles: Mutex::new(()),
                objects: Mutex::new(HashMap::new()),
                scopes: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Refuses a wrapped key that cannot be an OAEP ciphertext under the
    /// import key before the token is asked.
    fn check_wrapped(&self, wrapped: &[u8]) -> Result<(), CustodyError> {
        let expected = self.inner.public.bits as usize / 8;
        if wrapped.is_empty() {
            return Err(ImportError::Empty.into());
        }
        if wrapped.len() != expected {
            return Err(ImportError::CiphertextLength {
                actual: wrapped.len(),
                expected,
                bits: self.inner.public.bits as usize,
            }
            .into());
        }
        Ok(())
    }

    async fn run<T: Send + 'static>(
        &self,
        what: &'static str,
        work: impl FnOnce(&Inner, &Lease) -> Result<T, Fail> + Send + 'static,
    ) -> Result<T, CustodyError> {
        let inner = self.inner.clone();
        self.inner
            .pool
            .run(what, move |lease| work(&inner, lease))
            .await
    }
}

impl Inner {
    fn lock_handles(&self) -> MutexGuard<'_, ()> {
        self.handles.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn objects(&self) -> MutexGuard<'_, HashMap<KeyHandle, (u64, ObjectHandle)>> {
        self.objects.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn scopes(&self) -> MutexGuard<'_, HashMap<KeyHandle, KeyScope>> {
        self.scopes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The scope of the live key `handle`.
    fn scope(&self, lease: &Lease, handle: &KeyHandle) -> Result<KeyScope, Fail> {
        let object = self.live(lease, handle)?;
        if let Some(scope) = self.scopes().get(handle).cloned() {
            return Ok(scope);
        }
        let scope = token::scope(&lease.session, handle, object)?;
        self.scopes().insert(*handle, scope.clone());
        Ok(scope)
    }

    /// The object of the live key `handle`.
    fn live(&self, lease: &Lease, handle: &KeyHandle) -> Result<ObjectHandle, Fail> {
        let cached = self.objects().get(handle).copied();
        if let Some((generation, object)) = cached
            && generation == lease.generation
        {
            return Ok(object);
        }
        match token::state(&lease.session, handle)? {
            HandleState::Live(objects) => {
                let object = objects[0];
                self.objects().insert(*handle, (lease.generation, object));
                Ok(object)
            }
            HandleState::Destroyed { .. } => Err(CustodyError::DestroyedKey(*handle).into()),
            HandleState::Unknown => Err(CustodyError::UnknownKey(*handle).into()),
        }
    }

    /// Runs `op` on the live key `handle`, looking it up again once if the
    /// cached object went away (destroyed meanwhile, here or elsewhere).
    fn with_live<T>(
        &self,
        lease: &Lease,
        handle: &KeyHandle,
        op: impl Fn(ObjectHandle) -> Result<T, cryptoki::error::Error>,
    ) -> Result<T, Fail> {
        let object = self.live(lease, handle)?;
        match op(object) {
            Err(error)
                if matches!(
                    rv(&error),
                    Some(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid)
                ) =>
            {
                self.objects().remove(handle);
                let object = self.live(lease, handle)?;
                op(object).map_err(|e| Fail::Token {
                    call: "C_Encrypt/C_Decrypt",
                    error: e,
                })
            }
            other => other.map_err(|e| Fail::Token {
                call: "C_Encrypt/C_Decrypt",
                error: e,
            }),
        }
    }

    /// Stores the checked session key `temp` under the new `handle`.
    ///
    /// The lock orders this process's admissions; another daemon on the
    /// token may admit the same handle between the check and the copy (a
    /// retried import sent to both), and the token has no atomic "create if
    /// absent". So the copy is checked afterwards: a daemon that then sees
    /// any key under the handle but its own withdraws its copy. Whichever
    /// copies last sees the other's and withdraws, so at most one admission
    /// succeeds, and two keys under one handle never serve.
    fn admit_new(
        &self,
        lease: &Lease,
        handle: &KeyHandle,
        scope: &KeyScope,
        temp: &TempKey<'_>,
    ) -> Result<(), Fail> {
        let session = &lease.session;
        let _handles = self.lock_handles();
        token::check_unused(session, handle)?;
        let object = token::admit(session, temp, handle, scope)?;
        match token::state(session, handle)? {
            HandleState::Live(objects) if objects == [object] => {
                self.objects().insert(*handle, (lease.generation, object));
                Ok(())
            }
            raced => {
                session
                    .destroy_object(object)
                    .map_err(ck("C_DestroyObject"))?;
                warn!(%handle, "another daemon on the token admitted the same handle at once; this copy withdrawn");
                Err(token::in_use(
                    handle,
                    matches!(raced, HandleState::Destroyed { .. }),
                ))
            }
        }
    }

    fn destroy(&self, lease: &Lease, handle: &KeyHandle) -> Result<Destroyed, Fail> {
        let session = &lease.session;
        let _handles = self.lock_handles();
        self.objects().remove(handle);
        self.scopes().remove(handle);
        match token::state(session, handle)? {
            HandleState::Unknown => Err(CustodyError::UnknownKey(*handle).into()),
            HandleState::Destroyed { leftovers, .. } => {
                // A destroy interrupted between tombstone and removal: finish it.
                for object in leftovers {
                    token::destroy_key(session, object)?;
                }
                Ok(Destroyed::Already)
            }
            HandleState::Live(objects) => {
                // The fingerprint of what goes, so that the original can come
                // back; the tombstone first, so that once it is on the token
                // the key counts as destroyed even if the removal fails.
                let fingerprint = token::fingerprint(session, objects[0])?;
                token::write_tombstone(session, handle, &fingerprint)?;
                for object in objects {
                    token::destroy_key(session, object)?;
                }
                Ok(Destroyed::Now)
            }
        }
    }

    fn recover(
        &self,
        lease: &Lease,
        handle: &KeyHandle,
        scope: &KeyScope,
        wrapped: &[u8],
    ) -> Result<KeyInfo, Fail> {
        let session = &lease.session;
        // Nothing to recover costs no RSA operation.
        if let HandleState::Unknown = token::state(session, handle)? {
            return Err(CustodyError::UnknownKey(*handle).into());
        }
        let temp = token::unwrap_cmk(session, wrapped, &self.public)?;
        let fingerprint = token::fingerprint(session, temp.object)?;
        let check_value = token::check_value(session, temp.object)?;
        let same = |kept: &[u8; token::FINGERPRINT_LEN]| constant_time_eq(kept, &fingerprint);
        let info = KeyInfo {
            handle: *handle,
            check_value,
            origin: KeyOrigin::Imported,
        };
        let _handles = self.lock_handles();
        match token::state(session, handle)? {
            HandleState::Unknown => Err(CustodyError::UnknownKey(*handle).into()),
            HandleState::Live(objects) => {
                // A retry of a recovery whose reply was lost.
                if same(&token::fingerprint(session, objects[0])?) {
                    Ok(info)
                } else {
                    Err(token::in_use(handle, false))
                }
            }
            HandleState::Destroyed {
                tombstone,
                fingerprint: kept,
                leftovers,
            } => {
                if !same(&kept) {
                    return Err(CustodyError::NotTheDestroyedKey(*handle).into());
                }
                for object in leftovers {
                    token::destroy_key(session, object)?;
                }
                // The key object first: a crash before the tombstone goes
                // leaves the key destroyed and the recovery unacknowledged.
                let object = token::admit(session, &temp, handle, scope)?;
                session
                    .destroy_object(tombstone)
                    .map_err(ck("C_DestroyObject"))?;
                self.objects().insert(*handle, (lease.generation, object));
                info!(%handle, %check_value, "destroyed key recovered from its original material");
                Ok(info)
            }
        }
    }
}

/// Equality of two fingerprints in time independent of where they differ.
fn constant_time_eq(a: &[u8; token::FINGERPRINT_LEN], b: &[u8; token::FINGERPRINT_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[async_trait]
impl MaterialCustody for Pkcs11Custody {
    fn import_public_key(&self) -> &ImportPublicKey {
        &self.inner.public
    }

    fn audit_public_key(&self) -> &[u8] {
        &self.inner.audit_key.point
    }

    async fn sign_audit(&self, message: &[u8]) -> Result<Vec<u8>, CustodyError> {
        let message = message.to_vec();
        self.run("sign audit checkpoint", move |inner, lease| {
            token::sign_audit(&lease.session, &inner.audit_key.id, &message)
        })
        .await
    }

    async fn import(
        &self,
        handle: &KeyHandle,
        scope: &KeyScope,
        wrapped_key: &[u8],
    ) -> Result<KeyInfo, CustodyError> {
        self.check_wrapped(wrapped_key)?;
        let (handle, scope, wrapped) = (*handle, scope.clone(), wrapped_key.to_vec());
        self.run("import", move |inner, lease| {
            let session = &lease.session;
            // A taken handle is refused before the token spends an RSA
            // operation; checked again when the key is stored.
            token::check_unused(session, &handle)?;
            let temp = token::unwrap_cmk(session, &wrapped, &inner.public)?;
            let check_value = token::check_value(session, temp.object)?;
            inner.admit_new(lease, &handle, &scope, &temp)?;
            Ok(KeyInfo {
                handle,
                check_value,
                origin: KeyOrigin::Imported,
            })
        })
        .await
    }

    async fn recover(
        &self,
        handle: &KeyHandle,
        scope: &KeyScope,
        wrapped_key: &[u8],
    ) -> Result<KeyInfo, CustodyError> {
        self.check_wrapped(wrapped_key)?;
        let (handle, scope, wrapped) = (*handle, scope.clone(), wrapped_key.to_vec());
        self.run("recover", move |inner, lease| {
            inner.recover(lease, &handle, &scope, &wrapped)
        })
        .await
    }

    async fn generate(
        &self,
        handle: &KeyHandle,
        scope: &KeyScope,
    ) -> Result<KeyInfo, CustodyError> {
        let (handle, scope) = (*handle, scope.clone());
        self.run("generate", move |inner, lease| {
            let session = &lease.session;
            token::check_unused(session, &handle)?;
            let temp = token::generate(session)?;
            let check_value = token::check_value(session, temp.object)?;
            inner.admit_new(lease, &handle, &scope, &temp)?;
            Ok(KeyInfo {
                handle,
                check_value,
                origin: KeyOrigin::Generated,
            })
        })
        .await
    }
}

#[async_trait]
impl Custody for Pkcs11Custody {
    async fn wrap(
        &self,
        handle: &KeyHandle,
        plaintext: &SecretBytes,
        associated_data: &[u8],
    ) -> Result<Vec<u8>, CustodyError> {
        let mut nonce = [0; NONCE_LEN];
        cmk_hsm_custody::fill_random(&mut nonce)?;
        let mut header = [0; HEADER_LEN];
        header[0] = envelope::VERSION;
        header[1..].copy_from_slice(handle.as_bytes());
        let aad = [&header[..], associated_data].concat();
        let (handle, plaintext) = (*handle, plaintext.clone());
        self.run("wrap", move |inner, lease| {
            let sealed = inner.with_live(lease, &handle, |key| {
                token::encrypt(&lease.session, key, &nonce, &aad, plaintext.expose())
            })?;
            let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + sealed.len());
            out.extend_from_slice(&header);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&sealed);
            Ok(out)
        })
        .await
    }

    async fn unwrap(
        &self,
        ciphertext: &[u8],
        associated_data: &[u8],
    ) -> Result<Unwrapped, CustodyError> {
        let sealed = envelope::read(ciphertext)?;
        let handle = sealed.handle();
        let local = matches!(sealed, Sealed::Local(_));
        let aad = [&ciphertext[..HEADER_LEN], associated_data].concat();
        let ciphertext = ciphertext.to_vec();
        self.run("unwrap", move |inner, lease| {
            if !local {
                // A version 2 (AWS KMS) ciphertext naming a key of this
                // token: the version byte was altered.
                inner.live(lease, &handle)?;
                return Err(CustodyError::Authentication.into());
            }
            let (nonce, body) = ciphertext[HEADER_LEN..].split_at(NONCE_LEN);
            let opened = inner.with_live(lease, &handle, |key| {
                token::decrypt(&lease.session, key, nonce, &aad, body)
            });
            match opened {
                Ok(plaintext) => Ok(Unwrapped {
                    plaintext: SecretBytes::new(plaintext),
                    handle,
                }),
                Err(Fail::Token { error, .. }) if token::is_authentication_failure(&error) => {
                    Err(CustodyError::Authentication.into())
                }
                Err(other) => Err(other),
            }
        })
        .await
    }

    async fn destroy(&self, handle: &KeyHandle) -> Result<Destroyed, CustodyError> {
        let handle = *handle;
        self.run("destroy", move |inner, lease| inner.destroy(lease, &handle))
            .await
    }

    /// Keys on a token are always bound: PKCS#11 custody came after scopes,
    /// so `_claimant` binds nothing.
    async fn scope(
        &self,
        handle: &KeyHandle,
        _claimant: Option<&OrgName>,
    ) -> Result<KeyScope, CustodyError> {
        if let Some(scope) = self.inner.scopes().get(handle).cloned() {
            return Ok(scope);
        }
        let handle = *handle;
        self.run("scope", move |inner, lease| inner.scope(lease, &handle))
            .await
    }

    async fn wrap_batch(&self, items: Vec<WrapItem>) -> Vec<Result<Vec<u8>, CustodyError>> {
        stream::iter(items)
            .map(|item| async move {
                self.wrap(&item.handle, &item.plaintext, &item.associated_data)
                    .await
            })
            .buffered(self.inner.sessions)
            .collect()
            .await
    }

    async fn unwrap_batch(&self, items: Vec<UnwrapItem>) -> Vec<Result<Unwrapped, CustodyError>> {
        stream::iter(items)
            .map(|item| async move { self.unwrap(&item.ciphertext, &item.associated_data).await })
            .buffered(self.inner.sessions)
            .collect()
            .await
    }
}
