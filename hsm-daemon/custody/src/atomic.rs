//! Crash-safe file operations for the keystore.
//!
//! A file is written to a fresh temporary name in the same directory, flushed to
//! disk, renamed over its final name, and the directory is flushed so the rename
//! itself survives a power cut. Either the old or the new file is seen after a
//! crash, never a torn one; orphaned temporary files are removed on start-up.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use crate::CustodyError;

const TEMP_PREFIX: &str = ".tmp.";

/// Writes `contents` to `dir/name` atomically and durably, with mode 0600.
pub(crate) fn write(dir: &Path, name: &str, contents: &[u8]) -> Result<(), CustodyError> {
    let mut suffix = [0u8; 8];
    crate::fill_random(&mut suffix)?;
    let temp = dir.join(format!("{TEMP_PREFIX}{name}.{}", hex::encode(suffix)));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| CustodyError::storage("create", &temp, e))?;
        file.write_all(contents)
            .map_err(|e| CustodyError::storage("write", &temp, e))?;
        file.sync_all()
            .map_err(|e| CustodyError::storage("fsync", &temp, e))?;
        let target = dir.join(name);
        fs::rename(&temp, &target).map_err(|e| CustodyError::storage("rename", &target, e))
    })();
    if result.is_err() {
        // Best effort: a leftover is also removed at the next start.
        let _ = fs::remove_file(&temp);
    }
    result?;
    sync_dir(dir)
}

/// Removes `dir/name` durably. A file that is already gone is not an error.
pub(crate) fn remove(dir: &Path, name: &str) -> Result<(), CustodyError> {
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CustodyError::storage("remove", &path, e)),
    }
}

/// Flushes a directory's entries (creations, renames, removals) to disk.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), CustodyError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CustodyError::storage("fsync directory", dir, e))
}

/// Creates `dir` with mode 0700 unless it exists; refuses a non-directory.
pub(crate) fn private_dir(dir: &Path) -> Result<(), CustodyError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(CustodyError::storage(
            "open",
            dir,
            io::Error::other("not a directory"),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|e| CustodyError::storage("create", dir, e))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| CustodyError::storage("chmod", dir, e))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
            Ok(())
        }
        Err(e) => Err(CustodyError::storage("open", dir, e)),
    }
}

/// Deletes temporary files a crash left behind in `dir`.
pub(crate) fn remove_temp_files(dir: &Path) -> Result<usize, CustodyError> {
    let mut removed = 0;
    let entries = fs::read_dir(dir).map_err(|e| CustodyError::storage("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| CustodyError::storage("list", dir, e))?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            fs::remove_file(entry.path())
                .map_err(|e| CustodyError::storage("remove", &entry.path(), e))?;
            removed += 1;
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Reads a whole file; `Ok(None)` when it does not exist.
pub(crate) fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, CustodyError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CustodyError::storage("read", path, e)),
    }
}
