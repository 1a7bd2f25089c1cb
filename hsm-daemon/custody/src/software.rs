//! The software keystore: CMKs sealed at rest on local disk.
//!
//! ```text
//! <dir>/
//!   .lock                     advisory lock: one daemon per keystore
//!   keystore.meta             sealed marker; proves the root key is the right one
//!   import-key                sealed PKCS#8 of the RSA import key
//!   keys/<handle>.key         sealed record: a CMK (version 1: origin, check
//!                             value, key) or a reference to a key held
//!                             elsewhere (version 2: check value, identity,
//!                             the backend's detail; for AWS KMS the primary
//!                             key ARN, then the backup and role ARNs)
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
use aws_lc_rs::hmac;
use cmk_secret::SecretBytes;
use futures_util::{StreamExt, stream};
use tracing::{info, warn};

use crate::{
    CMK_LEN, Custody, CustodyError, Destroyed, ImportKey, ImportKeyBits, ImportPublicKey,
    KeyHandle, KeyInfo, KeyOrigin, KeyReference, MaterialCustody, ReferenceStore, UnwrapItem,
    Unwrapped, WrapItem, atomic,
    envelope::{self, Sealed, SealingKey},
    handle::KeyCheckValue,
    kcv,
};

const MAGIC: &[u8; 8] = b"CMKSEAL\x01";
const META_FILE: &str = "keystore.meta";
const META_CONTENT: &[u8] = b"cmk software keystore, format 1";
const IMPORT_KEY_FILE: &str = "import-key";
const KEYS_DIR: &str = "keys";
const RECORD_VERSION: u8 = 1;
const RECORD_LEN: usize = 2 + KeyCheckValue::LEN + CMK_LEN;
/// A record of a reference to a key held elsewhere.
const REFERENCE_RECORD_VERSION: u8 = 2;
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
    Key(Arc<SealingKey>),
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
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                keys_dir,
                root,
                fingerprints,
                import_key,
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
        let r = record.expose();
        match r.first() {
            Some(&RECORD_VERSION) if r.len() == RECORD_LEN => {
                Ok(self.fingerprint(Material::Key(&r[2 + KeyCheckValue::LEN..])))
            }
            Some(&REFERENCE_RECORD_VERSION) => decode_reference(r)
                .map(|reference| self.fingerprint(Material::Reference(reference.identity())))
                .ok_or_else(|| corrupt(path)),
            _ => Err(corrupt(path)),
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
        admission: Admission,
    ) -> Result<KeyInfo, CustodyError> {
        let check_value = kcv::check_value(&key)?;
        let mut record = SecretBytes::zeroed(RECORD_LEN);
        {
            let r = record.expose_mut();
            r[0] = RECORD_VERSION;
            r[1] = match origin {
                KeyOrigin::Generated => 2,
                KeyOrigin::Imported | KeyOrigin::AwsKms => 1,
            };
            r[2..2 + KeyCheckValue::LEN].copy_from_slice(check_value.as_bytes());
            r[2 + KeyCheckValue::LEN..].copy_from_slice(key.expose());
        }
        let entry = Entry::Key(Arc::new(SealingKey::new(&key)?));
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
            let r = record.expose();
            match r.first() {
                Some(&RECORD_VERSION) if r.len() == RECORD_LEN => {
                    let key = SecretBytes::copy_from(&r[2 + KeyCheckValue::LEN..]);
                    Entry::Key(Arc::new(SealingKey::new(&key)?))
                }
                Some(&REFERENCE_RECORD_VERSION) => decode_reference(r)
                    .map(|reference| Entry::Reference(Arc::new(reference)))
                    .ok_or_else(|| corrupt(&path))?,
                _ => return Err(corrupt(&path)),
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

    async fn import(
        &self,
        handle: &KeyHandle,
        wrapped_key: &[u8],
    ) -> Result<KeyInfo, CustodyError> {
        let inner = self.inner.clone();
        let handle = *handle;
        let wrapped = wrapped_key.to_vec();
        blocking(move || {
            let cmk = inner.import_key.decrypt_cmk(&wrapped)?;
            inner.store(handle, cmk, KeyOrigin::Imported, Admission::New)
        })
        .await
    }

    async fn recover(
        &self,
        handle: &KeyHandle,
        wrapped_key: &[u8],
    ) -> Result<KeyInfo, CustodyError> {
        let inner = self.inner.clone();
        let handle = *handle;
        let wrapped = wrapped_key.to_vec();
        let info = blocking(move || {
            let cmk = inner.import_key.decrypt_cmk(&wrapped)?;
            inner.store(handle, cmk, KeyOrigin::Imported, Admission::Recover)
        })
        .await?;
        info!(%handle, check_value = %info.check_value, "destroyed key recovered from its original material");
        Ok(info)
    }

    async fn generate(&self, handle: &KeyHandle) -> Result<KeyInfo, CustodyError> {
        let inner = self.inner.clone();
        let handle = *handle;
        blocking(move || {
            let mut cmk = SecretBytes::zeroed(CMK_LEN);
            crate::fill_random(cmk.expose_mut())?;
            inner.store(handle, cmk, KeyOrigin::Generated, Admission::New)
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
            Entry::Key(key) => envelope::wrap(&key, handle, plaintext, associated_data),
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
            (Sealed::Local(_), Entry::Key(key)) => {
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
            Entry::Key(_) => Ok(None),
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

/// A reference record: the version, the check value, the identity with a
/// length prefix (u16, big-endian), then the backend's detail. An AWS KMS
/// reference written before references were the backend's own has the same
/// bytes: its primary key ARN was the first length-prefixed field.
fn encode_reference(reference: &KeyReference) -> Vec<u8> {
    let identity = reference.identity().as_bytes();
    // `KeyReference::new` bounds the identity by u16::MAX.
    let len = u16::try_from(identity.len()).unwrap_or(u16::MAX);
    let mut record =
        Vec::with_capacity(3 + KeyCheckValue::LEN + identity.len() + reference.detail().len());
    record.push(REFERENCE_RECORD_VERSION);
    record.extend_from_slice(reference.check_value().as_bytes());
    record.extend_from_slice(&len.to_be_bytes());
    record.extend_from_slice(identity);
    record.extend_from_slice(reference.detail());
    record
}

/// Reads what [`encode_reference`] wrote; `None` if it is not that, which for
/// a record that authenticated under the root key means a bug.
fn decode_reference(record: &[u8]) -> Option<KeyReference> {
    let rest = record.strip_prefix(&[REFERENCE_RECORD_VERSION])?;
    let (check_value, rest) = rest.split_first_chunk::<{ KeyCheckValue::LEN }>()?;
    let (len, rest) = rest.split_first_chunk::<2>()?;
    let (identity, detail) = rest.split_at_checked(usize::from(u16::from_be_bytes(*len)))?;
    let identity = std::str::from_utf8(identity).ok()?.to_owned();
    KeyReference::new(
        identity,
        detail.to_vec(),
        KeyCheckValue::from_bytes(*check_value),
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

    #[test]
    fn reference_records_round_trip_and_malformed_ones_are_refused() {
        let check_value = KeyCheckValue::from_bytes([1, 2, 3, 4, 5]);
        let reference =
            KeyReference::new("arn:aws:kms:x".into(), b"\0\0\0\0".to_vec(), check_value)
                .expect("valid");
        let record = encode_reference(&reference);
        assert_eq!(
            record,
            [
                &[2, 1, 2, 3, 4, 5, 0, 13][..],
                b"arn:aws:kms:x",
                b"\0\0\0\0"
            ]
            .concat()
        );
        assert_eq!(decode_reference(&record), Some(reference));
        for cut in 0..8 + 13 {
            assert_eq!(decode_reference(&record[..cut]), None, "cut at {cut}");
        }
        let mut empty = record[..6].to_vec();
        empty.extend_from_slice(&[0, 0]);
        assert_eq!(decode_reference(&empty), None);
    }
}
