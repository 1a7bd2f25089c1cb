//! The software keystore: CMKs sealed at rest on local disk.
//!
//! ```text
//! <dir>/
//!   .lock                     advisory lock: one daemon per keystore
//!   keystore.meta             sealed marker; proves the root key is the right one
//!   import-key                sealed PKCS#8 of the RSA import key
//!   audit-key                 sealed PKCS#8 of the ECDSA P-256 audit signing key
//!   keys/<handle>.key         sealed record: a CMK (version 3: origin, check
//!                             value, key, scope) or a reference to a key
//!                             held elsewhere (version 4: check value, scope,
//!                             identity, the backend's detail; for AWS KMS
//!                             the primary key ARN, then the backup and role
//!                             ARNs, then the external id). Versions 1 and 2
//!                             are the same without the scope, written before
//!                             keys were bound to an org; the first use of
//!                             such a key rewrites it with its scope
//!   keys/<handle>.destroyed   sealed tombstone: the key existed and was
//!                             destroyed; holds the fingerprint of its material
//! ```
//!
//! Every sealed file is `MAGIC || nonce || AES-256-GCM(root key)` with the file's
//! role and name as associated data, so a file renamed or copied over another one
//! fails to open. All writes go through [`crate::atomic`]; an import or generate
//! returns only after its key file and directory entry are on disk.
//!
//! A handle is taken by its key file and retired by its tombstone, so a handle
//! that has either is refused for a new key; the check and the creation of the
//! key file happen under the same lock as a destroy, and one process at a time
//! uses a keystore, so no interleaving of calls reuses a handle.
//!
//! The one way back for a retired handle is recovery: the tombstone keeps a
//! fingerprint of the destroyed material, HMAC-SHA-256 under a key derived
//! from the root key (for an AWS key reference, of its primary key ARN), and
//! material with that fingerprint may take the handle again. The check value
//! (40 bits, public) is never the proof. Tombstones of keys destroyed before
//! fingerprints were kept are empty files, and their keys cannot be recovered.
//!
//! Unsealed CMKs are cached in memory as expanded AES keys (wiped when dropped),
//! one entry per key used since start; destroyed keys leave a tombstone entry.
//! References are only kept here ([`ReferenceStore`]): the backend they belong
//! to (`cmk-hsm-aws-kms`) reads them back and wraps with the key they name.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock},
};

use async_trait::async_trait;
use aws_lc_rs::{
    hmac,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair},
};
use cmk_secret::SecretBytes;
use futures_util::{StreamExt, stream};
use tracing::{info, warn};

use crate::{
    CMK_LEN, Custody, CustodyError, Destroyed, ImportKey, ImportKeyBits, ImportPublicKey,
    KeyHandle, KeyInfo, KeyOrigin, KeyReference, KeyScope, MaterialCustody, OrgName,
    ReferenceStore, UnwrapItem, Unwrapped, WrapItem, atomic,
    envelope::{self, Sealed, SealingKey},
    handle::KeyCheckValue,
    kcv,
};

const MAGIC: &[u8; 8] = b"CMKSEAL\x01";
const META_FILE: &str = "keystore.meta";
const META_CONTENT: &[u8] = b"cmk software keystore, format 1";
const IMPORT_KEY_FILE: &str = "import-key";
const AUDIT_KEY_FILE: &str = "audit-key";
const KEYS_DIR: &str = "keys";
/// A CMK record without a scope, written before keys were bound.
const UNSCOPED_RECORD_VERSION: u8 = 1;
/// A CMK record.
const RECORD_VERSION: u8 = 3;
/// A CMK record up to its scope: version, origin, check value, key.
const RECORD_LEN: usize = 2 + KeyCheckValue::LEN + CMK_LEN;
/// A reference record without a scope, written before keys were bound.
const UNSCOPED_REFERENCE_RECORD_VERSION: u8 = 2;
/// A record of a reference to a key held elsewhere.
const REFERENCE_RECORD_VERSION: u8 = 4;
/// The origin byte of a generated CMK.
const ORIGIN_GENERATED: u8 = 2;
/// A tombstone that holds the fingerprint of the destroyed material.
const TOMBSTONE_VERSION: u8 = 1;
/// Length of a fingerprint: an HMAC-SHA-256 tag.
const FINGERPRINT_LEN: usize = 32;
/// What the root key signs to derive the fingerprint key, so that the
/// fingerprint key is never the root key itself.
const FINGERPRINT_KEY_LABEL: &[u8] = b"cmk software keystore: fingerprint key, version 1";
/// Batch items in flight at once: a key not cached yet is read from disk on a
/// blocking thread, and one slow read should not hold up the rest.
const BATCH_CONCURRENCY: usize = 16;

/// The 32-byte key every keystore file is sealed under.
#[derive(Debug)]
pub struct RootKey(SecretBytes);

impl RootKey {
    /// Parses 64 hex characters (surrounding whitespace ignored), as written by
    /// `openssl rand -hex 32`.
    pub fn from_hex(text: &SecretBytes) -> Result<Self, &'static str> {
        let trimmed = std::str::from_utf8(text.expose())
            .map_err(|_| "root key is not text: expected 64 hexadecimal characters")?
            .trim();
        if trimmed.len() != 2 * CMK_LEN {
            return Err("root key must be exactly 64 hexadecimal characters (32 bytes)");
        }
        let mut key = SecretBytes::zeroed(CMK_LEN);
        hex::decode_to_slice(trimmed, key.expose_mut())
            .map_err(|_| "root key must be exactly 64 hexadecimal characters (32 bytes)")?;
        Ok(Self(key))
    }
}

/// CMKs on local disk, sealed under a root key, and references to keys held
/// elsewhere sealed the same way. Cheap to clone.
#[derive(Clone)]
pub struct SoftwareCustody {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SoftwareCustody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareCustody")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

struct Inner {
    dir: PathBuf,
    keys_dir: PathBuf,
    root: SealingKey,
    fingerprints: hmac::Key,
    import_key: ImportKey,
    audit_key: EcdsaKeyPair,
    cache: RwLock<HashMap<KeyHandle, Entry>>,
    // Serialises changes to the set of handles: creating a key file (after
    // checking that the handle has neither a key file nor a tombstone) and
    // destroying a key. Without it a destroy could tombstone a handle between an
    // import's check and its rename, or two imports could both claim one handle;
    // and two concurrent destroys of one key agree on which of them destroyed it.
    handles: Mutex<()>,
    // Held for the life of the keystore: two daemons on one directory would each
    // cache keys the other destroys.
    _lock: File,
}

#[derive(Clone)]
enum Entry {
    /// A CMK, and the scope it serves (`None`: stored before keys were bound,
    /// and not used since).
    Key(Arc<SealingKey>, Option<KeyScope>),
    Reference(Arc<KeyReference>),
    Destroyed,
}

impl SoftwareCustody {
    /// Opens the keystore in `dir`, creating it (and an RSA import key of
    /// `new_import_key_bits`) on first use. Blocking: call at start-up.
    pub fn open(
        dir: &Path,
        root_key: RootKey,
        new_import_key_bits: ImportKeyBits,
    ) -> Result<Self, CustodyError> {
        atomic::private_dir(dir)?;
        let mode = fs::metadata(dir)
            .map_err(|e| CustodyError::storage("open", dir, e))?
            .mode();
        if mode & 0o077 != 0 {
            warn!(dir = %dir.display(), mode = format!("{:o}", mode & 0o777),
                "keystore directory is accessible to other users; chmod 700 it");
        }
        let lock = lock(dir)?;
        let keys_dir = dir.join(KEYS_DIR);
        atomic::private_dir(&keys_dir)?;
        let stale = atomic::remove_temp_files(dir)? + atomic::remove_temp_files(&keys_dir)?;
        if stale > 0 {
            info!(
                count = stale,
                "removed temporary files left by an interrupted write"
            );
        }
        let root = SealingKey::new(&root_key.0)?;
        let fingerprints = fingerprint_key(&root_key);
        check_meta(dir, &keys_dir, &root)?;
        let import_key = load_or_create_import_key(dir, &root, new_import_key_bits)?;
        let audit_key = load_or_create_audit_key(dir, &root)?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                keys_dir,
                root,
                fingerprints,
                import_key,
                audit_key,
                cache: RwLock::new(HashMap::new()),
                handles: Mutex::new(()),
                _lock: lock,
            }),
        })
    }

    /// The key or reference `handle` names, unless destroyed.
    async fn live(&self, handle: &KeyHandle) -> Result<Entry, CustodyError> {
        let cached = self.inner.cache().get(handle).cloned();
        let entry = match cached {
            Some(entry) => entry,
            None => {
                let inner = self.inner.clone();
                let handle = *handle;
                blocking(move || inner.load(&handle)).await?
            }
        };
        match entry {
            Entry::Destroyed => Err(CustodyError::DestroyedKey(*handle)),
            live => Ok(live),
        }
    }
}

impl Inner {
    fn cache(&self) -> std::sync::RwLockReadGuard<'_, HashMap<KeyHandle, Entry>> {
        self.cache.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn cache_insert(&self, handle: KeyHandle, entry: Entry) {
        self.cache
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(handle, entry);
    }

    /// Caches what [`Inner::load`] read from disk, unless the cache already holds
    /// the key. An entry only ever moves from live to destroyed, and one written
    /// meanwhile — by a destroy that ran while this read the old key file — is the
    /// newer one; overwriting it would revive a destroyed key until restart.
    fn cache_loaded(&self, handle: KeyHandle, entry: Entry) -> Entry {
        self.cache
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(handle)
            .or_insert(entry)
            .clone()
    }

    fn key_file(handle: &KeyHandle) -> String {
        format!("{handle}.key")
    }

    fn tombstone_file(handle: &KeyHandle) -> String {
        format!("{handle}.destroyed")
    }

    fn key_purpose(handle: &KeyHandle) -> String {
        format!("cmk:{handle}")
    }

    fn tombstone_purpose(handle: &KeyHandle) -> String {
        format!("cmk-destroyed:{handle}")
    }

    /// The fingerprint of material, as kept in a tombstone.
    fn fingerprint(&self, material: Material<'_>) -> [u8; FINGERPRINT_LEN] {
        let mut context = hmac::Context::with_key(&self.fingerprints);
        // Labelled, so that no key bytes can pass for an ARN's.
        match material {
            Material::Key(key) => {
                context.update(b"key\0");
                context.update(key);
            }
            // The label names the one kind of reference there has been; it
            // stays, so that the tombstones already written still match.
            Material::Reference(identity) => {
                context.update(b"aws-kms key\0");
                context.update(identity.as_bytes());
            }
        }
        let mut fingerprint = [0; FINGERPRINT_LEN];
        fingerprint.copy_from_slice(context.sign().as_ref());
        fingerprint
    }

    /// The fingerprint of the material in the sealed record of `path`.
    fn record_fingerprint(
        &self,
        path: &Path,
        record: &SecretBytes,
    ) -> Result<[u8; FINGERPRINT_LEN], CustodyError> {
        match decode_record(record.expose()).ok_or_else(|| corrupt(path))? {
            Record::Key { key, .. } => Ok(self.fingerprint(Material::Key(key))),
            Record::Reference(reference) => {
                Ok(self.fingerprint(Material::Reference(reference.identity())))
            }
        }
    }

    /// The fingerprint of the live key `handle`, read from its key file.
    fn live_fingerprint(
        &self,
        handle: &KeyHandle,
    ) -> Result<Option<[u8; FINGERPRINT_LEN]>, CustodyError> {
        let path = self.keys_dir.join(Self::key_file(handle));
        let Some(sealed) = atomic::read_if_exists(&path)? else {
            return Ok(None);
        };
        let record = self.unseal(&path, &sealed, &Self::key_purpose(handle))?;
        self.record_fingerprint(&path, &record).map(Some)
    }

    /// What `handle`'s tombstone says of the destroyed material, if it has one.
    fn tombstone(&self, handle: &KeyHandle) -> Result<Option<Tombstone>, CustodyError> {
        let path = self.keys_dir.join(Self::tombstone_file(handle));
        let Some(sealed) = atomic::read_if_exists(&path)? else {
            return Ok(None);
        };
        if sealed.is_empty() {
            return Ok(Some(Tombstone::WithoutFingerprint));
        }
        let content = self.unseal(&path, &sealed, &Self::tombstone_purpose(handle))?;
        match content.expose() {
            [TOMBSTONE_VERSION, fingerprint @ ..] if fingerprint.len() == FINGERPRINT_LEN => {
                let mut kept = [0; FINGERPRINT_LEN];
                kept.copy_from_slice(fingerprint);
                Ok(Some(Tombstone::Fingerprint(kept)))
            }
            _ => Err(corrupt(&path)),
        }
    }

    /// Whether material with `fingerprint` may be stored under `handle` by a
    /// recovery. Call with the handle lock held.
    fn check_recoverable(
        &self,
        handle: &KeyHandle,
        fingerprint: &[u8; FINGERPRINT_LEN],
    ) -> Result<Recovery, CustodyError> {
        let same = |kept: &[u8; FINGERPRINT_LEN]| {
            aws_lc_rs::constant_time::verify_slices_are_equal(kept, fingerprint).is_ok()
        };
        match self.tombstone(handle)? {
            Some(Tombstone::Fingerprint(kept)) if same(&kept) => Ok(Recovery::Destroyed),
            Some(Tombstone::Fingerprint(_)) => Err(CustodyError::NotTheDestroyedKey(*handle)),
            Some(Tombstone::WithoutFingerprint) => Err(CustodyError::Unrecoverable(*handle)),
            None => match self.live_fingerprint(handle)? {
                // A retry of a recovery whose reply was lost.
                Some(live) if same(&live) => Ok(Recovery::AlreadyLive),
                Some(_) => Err(CustodyError::HandleInUse {
                    handle: *handle,
                    destroyed: false,
                }),
                None => Err(CustodyError::UnknownKey(*handle)),
            },
        }
    }

    /// Stores `record` under the destroyed `handle` again, if its material
    /// has the fingerprint the tombstone kept; durable when this returns.
    fn restore_record(
        &self,
        handle: KeyHandle,
        record: &SecretBytes,
        entry: Entry,
    ) -> Result<(), CustodyError> {
        let path = self.keys_dir.join(Self::key_file(&handle));
        let fingerprint = self.record_fingerprint(&path, record)?;
        let sealed = self.root.seal(
            MAGIC,
            record.expose(),
            Self::key_purpose(&handle).as_bytes(),
        )?;
        let staged = atomic::stage(&self.keys_dir, &Self::key_file(&handle), &sealed)?;
        let _handles = self.lock_handles();
        if self.check_recoverable(&handle, &fingerprint)? == Recovery::AlreadyLive {
            return Ok(());
        }
        // The key file is durable before the tombstone goes: a crash between
        // the two leaves the key destroyed (start-up finishes the destroy), and
        // the recovery unacknowledged.
        staged.put_in_place()?;
        atomic::sync_dir(&self.keys_dir)?;
        atomic::remove(&self.keys_dir, &Self::tombstone_file(&handle))?;
        self.cache_insert(handle, entry);
        Ok(())
    }

    fn lock_handles(&self) -> MutexGuard<'_, ()> {
        self.handles.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Seals `key` into a new key file under `handle`, unless the handle is or was
    /// in use; durable when this returns.
    fn store(
        &self,
        handle: KeyHandle,
        key: SecretBytes,
        origin: KeyOrigin,
        scope: KeyScope,
        admission: Admission,
    ) -> Result<KeyInfo, CustodyError> {
        let check_value = kcv::check_value(&key)?;
        let origin_byte = match origin {
            KeyOrigin::Generated => ORIGIN_GENERATED,
            KeyOrigin::Imported | KeyOrigin::AwsKms => 1,
        };
        let record = encode_key_record(origin_byte, check_value, &key, &scope);
        let entry = Entry::Key(Arc::new(SealingKey::new(&key)?), Some(scope));
        match admission {
            Admission::New => self.store_record(handle, &record, entry)?,
            Admission::Recover => self.restore_record(handle, &record, entry)?,
        }
        Ok(KeyInfo {
            handle,
            check_value,
            origin,
        })
    }

    /// Seals `reference` into a new key file under `handle`, as
    /// [`Inner::store`] does a CMK.
    fn store_reference(
        &self,
        handle: KeyHandle,
        reference: KeyReference,
        admission: Admission,
    ) -> Result<KeyInfo, CustodyError> {
        let record = SecretBytes::new(encode_reference(&reference));
        let check_value = reference.check_value();
        let entry = Entry::Reference(Arc::new(reference));
        match admission {
            Admission::New => self.store_record(handle, &record, entry)?,
            Admission::Recover => self.restore_record(handle, &record, entry)?,
        }
        Ok(KeyInfo {
            handle,
            check_value,
            origin: KeyOrigin::AwsKms,
        })
    }

    /// Writes a sealed record under `handle`, unless the handle is or was in use,
    /// and caches `entry` for it; durable when this returns.
    fn store_record(
        &self,
        handle: KeyHandle,
        record: &SecretBytes,
        entry: Entry,
    ) -> Result<(), CustodyError> {
        let sealed = self.root.seal(
            MAGIC,
            record.expose(),
            Self::key_purpose(&handle).as_bytes(),
        )?;
        let staged = atomic::stage(&self.keys_dir, &Self::key_file(&handle), &sealed)?;
        {
            let _handles = self.lock_handles();
            self.check_unused(&handle)?;
            staged.put_in_place()?;
            // Under the lock, so that a destroy cannot mark the key destroyed in
            // the cache before this marks it live.
            self.cache_insert(handle, entry);
        }
        // Flushing the directory outside the lock keeps concurrent imports from
        // queueing behind each other's fsync. Until it returns the key is not
        // acknowledged; a destroy meanwhile flushes the directory itself.
        atomic::sync_dir(&self.keys_dir)
    }

    /// Refuses a handle that has a key file or a tombstone. Call with the handle
    /// lock held.
    fn check_unused(&self, handle: &KeyHandle) -> Result<(), CustodyError> {
        // The tombstone first: an interrupted destroy leaves both files.
        for (file, destroyed) in [
            (Self::tombstone_file(handle), true),
            (Self::key_file(handle), false),
        ] {
            if atomic::exists(&self.keys_dir.join(file))? {
                return Err(CustodyError::HandleInUse {
                    handle: *handle,
                    destroyed,
                });
            }
        }
        Ok(())
    }

    /// Reads a key's state from disk into the cache.
    fn load(&self, handle: &KeyHandle) -> Result<Entry, CustodyError> {
        let tombstone = self.keys_dir.join(Self::tombstone_file(handle));
        let entry = if tombstone.exists() {
            // A destroy interrupted between tombstone and removal: finish it.
            atomic::remove(&self.keys_dir, &Self::key_file(handle))?;
            Entry::Destroyed
        } else {
            let path = self.keys_dir.join(Self::key_file(handle));
            let Some(sealed) = atomic::read_if_exists(&path)? else {
                return Err(CustodyError::UnknownKey(*handle));
            };
            let record = self.unseal(&path, &sealed, &Self::key_purpose(handle))?;
            match decode_record(record.expose()).ok_or_else(|| corrupt(&path))? {
                Record::Key { key, scope, .. } => {
                    let key = SecretBytes::copy_from(key);
                    Entry::Key(Arc::new(SealingKey::new(&key)?), scope)
                }
                Record::Reference(reference) => Entry::Reference(Arc::new(reference)),
            }
        };
        Ok(self.cache_loaded(*handle, entry))
    }

    fn unseal(
        &self,
        path: &Path,
        sealed: &[u8],
        purpose: &str,
    ) -> Result<SecretBytes, CustodyError> {
        if !sealed.starts_with(MAGIC) {
            return Err(corrupt(path));
        }
        self.root
            .open(sealed, MAGIC.len(), purpose.as_bytes())
            .map_err(|_| corrupt(path))
    }

    /// Binds the live key `handle`, stored before keys were bound, to the
    /// scope [`Custody::scope`] gives it, by rewriting its record; returns
    /// the scope it has. Durable when this returns.
    fn bind(
        &self,
        handle: &KeyHandle,
        claimant: Option<&OrgName>,
    ) -> Result<KeyScope, CustodyError> {
        let _handles = self.lock_handles();
        let path = self.keys_dir.join(Self::key_file(handle));
        if atomic::exists(&self.keys_dir.join(Self::tombstone_file(handle)))? {
            return Err(CustodyError::DestroyedKey(*handle));
        }
        let sealed = atomic::read_if_exists(&path)?.ok_or(CustodyError::UnknownKey(*handle))?;
        let record = self.unseal(&path, &sealed, &Self::key_purpose(handle))?;
        let (rewritten, entry, scope) = match decode_record(record.expose())
            .ok_or_else(|| corrupt(&path))?
        {
            // Bound meanwhile by another call.
            Record::Key {
                scope: Some(scope), ..
            } => return Ok(scope),
            Record::Reference(reference) if reference.scope().is_some() => {
                return Ok(reference.scope().cloned().unwrap_or(KeyScope::Shared));
            }
            Record::Key {
                origin,
                check_value,
                key,
                scope: None,
            } => {
                let scope = match (origin, claimant) {
                    (ORIGIN_GENERATED, _) => KeyScope::Shared,
                    (_, Some(claimant)) => KeyScope::Org(claimant.clone()),
                    (_, None) => return Err(CustodyError::Unbound(*handle)),
                };
                let key = SecretBytes::copy_from(key);
                let record = encode_key_record(origin, check_value, &key, &scope);
                let entry = Entry::Key(Arc::new(SealingKey::new(&key)?), Some(scope.clone()));
                (record, entry, scope)
            }
            Record::Reference(reference) => {
                let scope = KeyScope::Org(claimant.ok_or(CustodyError::Unbound(*handle))?.clone());
                let reference = KeyReference::new(
                    reference.identity().to_owned(),
                    reference.detail().to_vec(),
                    reference.check_value(),
                    scope.clone(),
                )
                .ok_or_else(|| corrupt(&path))?;
                let record = SecretBytes::new(encode_reference(&reference));
                (record, Entry::Reference(Arc::new(reference)), scope)
            }
        };
        let sealed = self.root.seal(
            MAGIC,
            rewritten.expose(),
            Self::key_purpose(handle).as_bytes(),
        )?;
        atomic::write(&self.keys_dir, &Self::key_file(handle), &sealed)?;
        self.cache_insert(*handle, entry);
        info!(%handle, %scope, "key stored before keys were bound is now bound to its scope");
        Ok(scope)
    }

    fn destroy(&self, handle: &KeyHandle) -> Result<Destroyed, CustodyError> {
        let _handles = self.lock_handles();
        let cached = self.cache().get(handle).cloned();
        let entry = match cached {
            Some(entry) => entry,
            None => self.load(handle)?,
        };
        if let Entry::Destroyed = entry {
            return Ok(Destroyed::Already);
        }
        // The fingerprint of what goes, so that the original can come back.
        let fingerprint = self
            .live_fingerprint(handle)?
            .ok_or(CustodyError::UnknownKey(*handle))?;
        let mut content = vec![TOMBSTONE_VERSION];
        content.extend_from_slice(&fingerprint);
        let tombstone =
            self.root
                .seal(MAGIC, &content, Self::tombstone_purpose(handle).as_bytes())?;
        // Tombstone first: once it is on disk the key counts as destroyed, even if
        // the process dies before the key file is gone (start-up finishes it).
        atomic::write(&self.keys_dir, &Self::tombstone_file(handle), &tombstone)?;
        self.cache_insert(*handle, Entry::Destroyed);
        atomic::remove(&self.keys_dir, &Self::key_file(handle))?;
        Ok(Destroyed::Now)
    }
}

#[async_trait]
impl MaterialCustody for SoftwareCustody {
    fn import_public_key(&self) -> &ImportPublicKey {
        self.inner.import_key.public()
    }

    fn audit_public_key(&self) -> &[u8] {
        self.inner.audit_key.public_key().as_ref()
    }

    async fn sign_audit(&self, message: &[u8]) -> Result<Vec<u8>, CustodyError> {
        let signature = self
            .inner
            .audit_key
            .sign(&aws_lc_rs::rand::SystemRandom::new(), message)
            .map_err(|_| CustodyError::Crypto("ECDSA signing failed"))?;
        Ok(signature.as_ref().to_vec())
    }

    async fn import(
        &self,
        handle: &KeyHandle,
        scope: &KeyScope,
        wrapped_key: &[u8],
    ) -> Result<KeyInfo, CustodyError> {
        let inner = self.inner.clone();
        let (handle, scope) = (*handle, scope.clone());
        let wrapped = wrapped_key.to_vec();
        blocking(move || {
            let cmk = inner.import_key.decrypt_cmk(&wrapped)?;
            inner.store(handle, cmk, KeyOrigin::Imported, scope, Admission::New)
        })
        .await
    }

    async fn recover(
        &self,
        handle: &KeyHandle,
        scope: &KeyScope,
        wrapped_key: &[u8],
    ) -> Result<KeyInfo, CustodyError> {
        let inner = self.inner.clone();
        let (handle, scope) = (*handle, scope.clone());
        let wrapped = wrapped_key.to_vec();
        let info = blocking(move || {
            let cmk = inner.import_key.decrypt_cmk(&wrapped)?;
            inner.store(handle, cmk, KeyOrigin::Imported, scope, Admission::Recover)
        })
        .await?;
        info!(%handle, check_value = %info.check_value, "destroyed key recovered from its original material");
        Ok(info)
    }

    async fn generate(
        &self,
        handle: &KeyHandle,
        scope: &KeyScope,
    ) -> Result<KeyInfo, CustodyError> {
        let inner = self.inner.clone();
        let (handle, scope) = (*handle, scope.clone());
        blocking(move || {
            let mut cmk = SecretBytes::zeroed(CMK_LEN);
            crate::fill_random(cmk.expose_mut())?;
            inner.store(handle, cmk, KeyOrigin::Generated, scope, Admission::New)
        })
        .await
    }
}

#[async_trait]
impl Custody for SoftwareCustody {
    async fn wrap(
        &self,
        handle: &KeyHandle,
        plaintext: &SecretBytes,
        associated_data: &[u8],
    ) -> Result<Vec<u8>, CustodyError> {
        match self.live(handle).await? {
            Entry::Key(key, _) => envelope::wrap(&key, handle, plaintext, associated_data),
            Entry::Reference(_) => Err(CustodyError::ExternalKey(*handle)),
            Entry::Destroyed => Err(CustodyError::DestroyedKey(*handle)),
        }
    }

    async fn unwrap(
        &self,
        ciphertext: &[u8],
        associated_data: &[u8],
    ) -> Result<Unwrapped, CustodyError> {
        let sealed = envelope::read(ciphertext)?;
        let handle = sealed.handle();
        let plaintext = match (sealed, self.live(&handle).await?) {
            (Sealed::Local(_), Entry::Key(key, _)) => {
                envelope::unwrap(&key, ciphertext, associated_data)?
            }
            (Sealed::Aws { .. }, Entry::Reference(_)) => {
                return Err(CustodyError::ExternalKey(handle));
            }
            // The version byte does not match the kind of key it names: the
            // ciphertext was altered.
            _ => return Err(CustodyError::Authentication),
        };
        Ok(Unwrapped { plaintext, handle })
    }

    async fn wrap_batch(&self, items: Vec<WrapItem>) -> Vec<Result<Vec<u8>, CustodyError>> {
        stream::iter(items)
            .map(|item| async move {
                self.wrap(&item.handle, &item.plaintext, &item.associated_data)
                    .await
            })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await
    }

    async fn unwrap_batch(&self, items: Vec<UnwrapItem>) -> Vec<Result<Unwrapped, CustodyError>> {
        stream::iter(items)
            .map(|item| async move { self.unwrap(&item.ciphertext, &item.associated_data).await })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await
    }

    async fn destroy(&self, handle: &KeyHandle) -> Result<Destroyed, CustodyError> {
        let inner = self.inner.clone();
        let handle = *handle;
        blocking(move || inner.destroy(&handle)).await
    }

    async fn scope(
        &self,
        handle: &KeyHandle,
        claimant: Option<&OrgName>,
    ) -> Result<KeyScope, CustodyError> {
        let bound = match self.live(handle).await? {
            Entry::Key(_, scope) => scope,
            Entry::Reference(reference) => reference.scope().cloned(),
            Entry::Destroyed => return Err(CustodyError::DestroyedKey(*handle)),
        };
        match bound {
            Some(scope) => Ok(scope),
            None => {
                let inner = self.inner.clone();
                let (handle, claimant) = (*handle, claimant.cloned());
                blocking(move || inner.bind(&handle, claimant.as_ref())).await
            }
        }
    }
}

#[async_trait]
impl ReferenceStore for SoftwareCustody {
    async fn add_reference(
        &self,
        handle: &KeyHandle,
        reference: KeyReference,
    ) -> Result<KeyInfo, CustodyError> {
        let inner = self.inner.clone();
        let handle = *handle;
        blocking(move || inner.store_reference(handle, reference, Admission::New)).await
    }

    async fn check_recoverable(
        &self,
        handle: &KeyHandle,
        identity: &str,
    ) -> Result<(), CustodyError> {
        let inner = self.inner.clone();
        let (handle, identity) = (*handle, identity.to_owned());
        blocking(move || {
            let fingerprint = inner.fingerprint(Material::Reference(&identity));
            let _handles = inner.lock_handles();
            inner.check_recoverable(&handle, &fingerprint).map(drop)
        })
        .await
    }

    async fn recover_reference(
        &self,
        handle: &KeyHandle,
        reference: KeyReference,
    ) -> Result<KeyInfo, CustodyError> {
        let inner = self.inner.clone();
        let handle = *handle;
        blocking(move || inner.store_reference(handle, reference, Admission::Recover)).await
    }

    async fn reference(
        &self,
        handle: &KeyHandle,
    ) -> Result<Option<Arc<KeyReference>>, CustodyError> {
        match self.live(handle).await? {
            Entry::Reference(reference) => Ok(Some(reference)),
            Entry::Key(..) => Ok(None),
            Entry::Destroyed => Err(CustodyError::DestroyedKey(*handle)),
        }
    }
}

/// Whether a key file is written for a new handle or a destroyed one's
/// original material.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admission {
    New,
    Recover,
}

/// What a fingerprint is taken of.
enum Material<'a> {
    /// CMK bytes.
    Key(&'a [u8]),
    /// The identity of a reference (for AWS KMS, the primary key ARN).
    Reference(&'a str),
}

/// What a tombstone file holds.
enum Tombstone {
    /// The fingerprint of the destroyed material.
    Fingerprint([u8; FINGERPRINT_LEN]),
    /// Nothing: written before fingerprints were kept.
    WithoutFingerprint,
}

/// What a recovery finds under its handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Recovery {
    /// The destroyed key whose material is being brought back.
    Destroyed,
    /// That material, live again already.
    AlreadyLive,
}

/// The key fingerprints are HMACs under: HMAC-SHA-256 of a fixed label under
/// the root key.
fn fingerprint_key(root: &RootKey) -> hmac::Key {
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, root.0.expose()),
        FINGERPRINT_KEY_LABEL,
    );
    hmac::Key::new(hmac::HMAC_SHA256, tag.as_ref())
}

/// Runs file I/O and RSA work off the async worker threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, CustodyError> + Send + 'static,
) -> Result<T, CustodyError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| CustodyError::Crypto("keystore worker task failed"))?
}

/// A CMK record: the version, the origin, the check value, the key, then the
/// scope's byte form ([`KeyScope::to_bytes`]).
fn encode_key_record(
    origin: u8,
    check_value: KeyCheckValue,
    key: &SecretBytes,
    scope: &KeyScope,
) -> SecretBytes {
    let scope = scope.to_bytes();
    let mut record = SecretBytes::zeroed(RECORD_LEN + scope.len());
    let r = record.expose_mut();
    r[0] = RECORD_VERSION;
    r[1] = origin;
    r[2..2 + KeyCheckValue::LEN].copy_from_slice(check_value.as_bytes());
    r[2 + KeyCheckValue::LEN..RECORD_LEN].copy_from_slice(key.expose());
    r[RECORD_LEN..].copy_from_slice(&scope);
    record
}

/// What a key file holds.
enum Record<'a> {
    /// A CMK.
    Key {
        origin: u8,
        check_value: KeyCheckValue,
        key: &'a [u8],
        /// `None` for a record written before keys were bound.
        scope: Option<KeyScope>,
    },
    /// A reference to a key held elsewhere.
    Reference(KeyReference),
}

/// Reads a key file's record of any version; `None` if it is none, which for
/// a record that authenticated under the root key means a bug.
fn decode_record(record: &[u8]) -> Option<Record<'_>> {
    match record.first()? {
        &UNSCOPED_RECORD_VERSION | &RECORD_VERSION if record.len() >= RECORD_LEN => {
            let (fixed, scope) = record.split_at(RECORD_LEN);
            let scope = match (fixed[0], scope) {
                (UNSCOPED_RECORD_VERSION, []) => None,
                (RECORD_VERSION, scope) => Some(KeyScope::from_bytes(scope)?),
                _ => return None,
            };
            let (check_value, key) = fixed[2..].split_first_chunk::<{ KeyCheckValue::LEN }>()?;
            Some(Record::Key {
                origin: fixed[1],
                check_value: KeyCheckValue::from_bytes(*check_value),
                key,
                scope,
            })
        }
        _ => decode_reference(record).map(Record::Reference),
    }
}

/// A reference record: the version, the check value, the scope (a length
/// byte and [`KeyScope::to_bytes`]), the identity with a length prefix (u16,
/// big-endian), then the backend's detail. An unscoped record (version 2) is
/// the same without the scope; an AWS KMS reference written before references
/// were the backend's own has version 2's bytes: its primary key ARN was the
/// first length-prefixed field.
fn encode_reference(reference: &KeyReference) -> Vec<u8> {
    let identity = reference.identity().as_bytes();
    // `KeyReference::new` bounds the identity by u16::MAX.
    let len = u16::try_from(identity.len()).unwrap_or(u16::MAX);
    let scope = reference.scope().map(KeyScope::to_bytes);
    let mut record =
        Vec::with_capacity(4 + KeyCheckValue::LEN + 66 + identity.len() + reference.detail().len());
    match &scope {
        Some(scope) => {
            record.push(REFERENCE_RECORD_VERSION);
            record.extend_from_slice(reference.check_value().as_bytes());
            // A scope is at most 66 bytes.
            record.push(scope.len() as u8);
            record.extend_from_slice(scope);
        }
        None => {
            record.push(UNSCOPED_REFERENCE_RECORD_VERSION);
            record.extend_from_slice(reference.check_value().as_bytes());
        }
    }
    record.extend_from_slice(&len.to_be_bytes());
    record.extend_from_slice(identity);
    record.extend_from_slice(reference.detail());
    record
}

/// Reads what [`encode_reference`] wrote; `None` if it is not that.
fn decode_reference(record: &[u8]) -> Option<KeyReference> {
    let (&version, rest) = record.split_first()?;
    let (check_value, rest) = rest.split_first_chunk::<{ KeyCheckValue::LEN }>()?;
    let (scope, rest) = match version {
        UNSCOPED_REFERENCE_RECORD_VERSION => (None, rest),
        REFERENCE_RECORD_VERSION => {
            let (&len, rest) = rest.split_first()?;
            let (scope, rest) = rest.split_at_checked(usize::from(len))?;
            (Some(KeyScope::from_bytes(scope)?), rest)
        }
        _ => return None,
    };
    let (len, rest) = rest.split_first_chunk::<2>()?;
    let (identity, detail) = rest.split_at_checked(usize::from(u16::from_be_bytes(*len)))?;
    let identity = std::str::from_utf8(identity).ok()?.to_owned();
    KeyReference::stored(
        identity,
        detail.to_vec(),
        KeyCheckValue::from_bytes(*check_value),
        scope,
    )
}

fn corrupt(path: &Path) -> CustodyError {
    CustodyError::Corrupt {
        path: path.display().to_string(),
    }
}

fn lock(dir: &Path) -> Result<File, CustodyError> {
    let path = dir.join(".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| CustodyError::storage("open", &path, e))?;
    file.try_lock().map_err(|_| {
        CustodyError::storage(
            "lock",
            &path,
            std::io::Error::other("the keystore is in use by another hsm-daemon process"),
        )
    })?;
    Ok(file)
}

/// Verifies that the root key opens this keystore, or initialises a new one.
fn check_meta(dir: &Path, keys_dir: &Path, root: &SealingKey) -> Result<(), CustodyError> {
    let path = dir.join(META_FILE);
    match atomic::read_if_exists(&path)? {
        Some(sealed) => {
            let opened = sealed
                .starts_with(MAGIC)
                .then(|| root.open(&sealed, MAGIC.len(), META_FILE.as_bytes()).ok())
                .flatten();
            match opened {
                Some(content) if content.expose() == META_CONTENT => Ok(()),
                _ => Err(CustodyError::RootKeyMismatch {
                    dir: dir.display().to_string(),
                }),
            }
        }
        None => {
            let has_keys = fs::read_dir(keys_dir)
                .map_err(|e| CustodyError::storage("list", keys_dir, e))?
                .next()
                .is_some();
            if has_keys || dir.join(IMPORT_KEY_FILE).exists() {
                return Err(corrupt(&path));
            }
            let sealed = root.seal(MAGIC, META_CONTENT, META_FILE.as_bytes())?;
            atomic::write(dir, META_FILE, &sealed)
        }
    }
}

/// The audit signing key, generated and sealed on first use.
fn load_or_create_audit_key(dir: &Path, root: &SealingKey) -> Result<EcdsaKeyPair, CustodyError> {
    let path = dir.join(AUDIT_KEY_FILE);
    let unusable = || corrupt(&path);
    if let Some(sealed) = atomic::read_if_exists(&path)? {
        if !sealed.starts_with(MAGIC) {
            return Err(unusable());
        }
        let pkcs8 = root
            .open(&sealed, MAGIC.len(), AUDIT_KEY_FILE.as_bytes())
            .map_err(|_| unusable())?;
        return EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.expose())
            .map_err(|_| unusable());
    }
    info!("generating the ECDSA P-256 audit signing key");
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &aws_lc_rs::rand::SystemRandom::new(),
    )
    .map_err(|_| CustodyError::Crypto("generating the audit signing key failed"))?;
    let pkcs8 = SecretBytes::copy_from(pkcs8.as_ref());
    let sealed = root.seal(MAGIC, pkcs8.expose(), AUDIT_KEY_FILE.as_bytes())?;
    atomic::write(dir, AUDIT_KEY_FILE, &sealed)?;
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.expose())
        .map_err(|_| CustodyError::Crypto("the generated audit signing key does not load"))
}

fn load_or_create_import_key(
    dir: &Path,
    root: &SealingKey,
    bits: ImportKeyBits,
) -> Result<ImportKey, CustodyError> {
    let path = dir.join(IMPORT_KEY_FILE);
    if let Some(sealed) = atomic::read_if_exists(&path)? {
        if !sealed.starts_with(MAGIC) {
            return Err(corrupt(&path));
        }
        let der = root
            .open(&sealed, MAGIC.len(), IMPORT_KEY_FILE.as_bytes())
            .map_err(|_| corrupt(&path))?;
        let key = ImportKey::from_pkcs8(&der)?;
        if key.public().bits != bits.bits() {
            warn!(
                existing = key.public().bits,
                configured = bits.bits(),
                "keeping the existing RSA import key; the configured size applies to a new keystore only"
            );
        }
        return Ok(key);
    }
    info!(bits = bits.bits(), "generating the RSA import key");
    let key = ImportKey::generate(bits)?;
    let der = key.to_pkcs8()?;
    let sealed = root.seal(MAGIC, der.expose(), IMPORT_KEY_FILE.as_bytes())?;
    atomic::write(dir, IMPORT_KEY_FILE, &sealed)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acme() -> KeyScope {
        KeyScope::Org(OrgName::parse("acme").expect("valid"))
    }

    #[test]
    fn reference_records_round_trip_and_malformed_ones_are_refused() {
        let check_value = KeyCheckValue::from_bytes([1, 2, 3, 4, 5]);
        let reference = KeyReference::new(
            "arn:aws:kms:x".into(),
            b"\0\0\0\0".to_vec(),
            check_value,
            acme(),
        )
        .expect("valid");
        let record = encode_reference(&reference);
        assert_eq!(
            record,
            [
                &[4, 1, 2, 3, 4, 5, 6, 1, 4][..],
                b"acme",
                &[0, 13],
                b"arn:aws:kms:x",
                b"\0\0\0\0"
            ]
            .concat()
        );
        assert_eq!(decode_reference(&record), Some(reference));
        for cut in 0..15 + 13 {
            assert_eq!(decode_reference(&record[..cut]), None, "cut at {cut}");
        }
        let mut empty = record[..12].to_vec();
        empty.extend_from_slice(&[0, 0]);
        assert_eq!(decode_reference(&empty), None);
    }

    #[test]
    fn unscoped_records_of_earlier_versions_still_read() {
        let check_value = KeyCheckValue::from_bytes([1, 2, 3, 4, 5]);
        let old = [&[2, 1, 2, 3, 4, 5, 0, 13][..], b"arn:aws:kms:x", b"\0\0"].concat();
        let reference = decode_reference(&old).expect("version 2 reads");
        assert_eq!(reference.identity(), "arn:aws:kms:x");
        assert_eq!(reference.detail(), b"\0\0");
        assert_eq!(reference.check_value(), check_value);
        assert_eq!(reference.scope(), None);
        assert_eq!(encode_reference(&reference), old, "written back as it was");

        let mut key = vec![1, ORIGIN_GENERATED, 1, 2, 3, 4, 5];
        key.extend_from_slice(&[7; CMK_LEN]);
        match decode_record(&key) {
            Some(Record::Key {
                origin, key, scope, ..
            }) => {
                assert_eq!(
                    (origin, key, scope),
                    (ORIGIN_GENERATED, &[7; CMK_LEN][..], None)
                );
            }
            _ => panic!("version 1 key record does not read"),
        }
        key.push(0);
        assert!(decode_record(&key).is_none(), "version 1 has no scope");
    }

    #[test]
    fn key_records_carry_their_scope() {
        let check_value = KeyCheckValue::from_bytes([1, 2, 3, 4, 5]);
        let record =
            encode_key_record(1, check_value, &SecretBytes::new(vec![9; CMK_LEN]), &acme());
        match decode_record(record.expose()) {
            Some(Record::Key { scope, key, .. }) => {
                assert_eq!(scope, Some(acme()));
                assert_eq!(key, &[9; CMK_LEN][..]);
            }
            _ => panic!("key record does not read"),
        }
        let bytes = record.expose();
        for cut in 0..bytes.len() {
            assert!(decode_record(&bytes[..cut]).is_none(), "cut at {cut}");
        }
    }

    /// Writes `record` as `handle`'s key file, sealed as a keystore of an
    /// earlier version would have.
    fn write_record(custody: &SoftwareCustody, handle: &KeyHandle, record: &[u8]) {
        let inner = &custody.inner;
        let sealed = inner
            .root
            .seal(MAGIC, record, Inner::key_purpose(handle).as_bytes())
            .expect("seal");
        atomic::write(&inner.keys_dir, &Inner::key_file(handle), &sealed).expect("write");
    }

    fn open(dir: &Path) -> SoftwareCustody {
        let root = RootKey::from_hex(&SecretBytes::copy_from(&[b'7'; 64])).expect("root key");
        SoftwareCustody::open(dir, root, ImportKeyBits::Rsa3072).expect("open")
    }

    /// Keys stored before keys were bound take their scope at first use, for
    /// good: an uploaded key and a reference the first caller's org, a
    /// generated key (the generic default key) every org's.
    #[tokio::test]
    async fn keys_stored_unbound_are_bound_at_first_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (uploaded, generated, reference) = (
            KeyHandle::random().expect("rng"),
            KeyHandle::random().expect("rng"),
            KeyHandle::random().expect("rng"),
        );
        let check_value = KeyCheckValue::from_bytes([1, 2, 3, 4, 5]);
        {
            let custody = open(dir.path());
            for (handle, origin) in [(uploaded, 1), (generated, ORIGIN_GENERATED)] {
                let mut record = vec![UNSCOPED_RECORD_VERSION, origin];
                record.extend_from_slice(check_value.as_bytes());
                record.extend_from_slice(&[handle.as_bytes()[0]; CMK_LEN]);
                write_record(&custody, &handle, &record);
            }
            let old = [&[2, 1, 2, 3, 4, 5, 0, 5][..], b"arn:x", b"\0\0"].concat();
            write_record(&custody, &reference, &old);
        }
        let (acme, globex) = (
            OrgName::parse("acme").expect("valid"),
            OrgName::parse("globex").expect("valid"),
        );
        let custody = open(dir.path());
        let secret = SecretBytes::copy_from(b"kek");
        let ct = custody.wrap(&uploaded, &secret, b"").await.expect("wrap");
        assert_eq!(
            custody.scope(&uploaded, Some(&acme)).await.expect("scope"),
            KeyScope::Org(acme.clone())
        );
        assert_eq!(
            custody
                .scope(&uploaded, Some(&globex))
                .await
                .expect("scope"),
            KeyScope::Org(acme.clone()),
            "the first org keeps it"
        );
        assert_eq!(
            custody
                .scope(&generated, Some(&globex))
                .await
                .expect("scope"),
            KeyScope::Shared
        );
        assert_eq!(
            custody
                .scope(&reference, Some(&globex))
                .await
                .expect("scope"),
            KeyScope::Org(globex.clone())
        );
        drop(custody);

        let custody = open(dir.path());
        assert_eq!(
            custody
                .scope(&uploaded, Some(&globex))
                .await
                .expect("scope"),
            KeyScope::Org(acme.clone()),
            "the binding is on disk"
        );
        assert_eq!(
            custody.scope(&generated, Some(&acme)).await.expect("scope"),
            KeyScope::Shared
        );
        let rebound = custody
            .reference(&reference)
            .await
            .expect("read")
            .expect("reference");
        assert_eq!(rebound.scope(), Some(&KeyScope::Org(globex)));
        assert_eq!(
            (rebound.identity(), rebound.detail()),
            ("arn:x", &b"\0\0"[..])
        );
        let opened = custody
            .unwrap(&ct, b"")
            .await
            .expect("same key after binding");
        assert!(opened.plaintext.ct_eq(&secret));
    }
}
