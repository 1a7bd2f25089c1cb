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
    path::{Path, PathBuf},
};

use crate::CustodyError;

const TEMP_PREFIX: &str = ".tmp.";

/// Writes `contents` to `dir/name` atomically and durably, with mode 0600.
pub(crate) fn write(dir: &Path, name: &str, contents: &[u8]) -> Result<(), CustodyError> {
    stage(dir, name, contents)?.put_in_place()?;
    sync_dir(dir)
}

/// A file whose contents are on disk under a temporary name, not yet under its
/// final one. Dropped without [`Staged::put_in_place`], it is removed.
pub(crate) struct Staged {
    temp: PathBuf,
    target: PathBuf,
    placed: bool,
}

/// Writes `contents` to a fresh temporary file beside `dir/name`, with mode 0600,
/// and flushes it to disk: the slow part of a write, done before taking any lock
/// that guards the final name.
pub(crate) fn stage(dir: &Path, name: &str, contents: &[u8]) -> Result<Staged, CustodyError> {
    let mut suffix = [0u8; 8];
    crate::fill_random(&mut suffix)?;
    let temp = dir.join(format!("{TEMP_PREFIX}{name}.{}", hex::encode(suffix)));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(|e| CustodyError::storage("create", &temp, e))?;
    // From here on, an early return drops `staged`, which removes the file.
    let staged = Staged {
        temp,
        target: dir.join(name),
        placed: false,
    };
    file.write_all(contents)
        .map_err(|e| CustodyError::storage("write", &staged.temp, e))?;
    file.sync_all()
        .map_err(|e| CustodyError::storage("fsync", &staged.temp, e))?;
    Ok(staged)
}

impl Staged {
    /// Renames the file over its final name, replacing any file there. The rename
    /// is durable only after [`sync_dir`] of the directory.
    pub(crate) fn put_in_place(mut self) -> Result<(), CustodyError> {
        fs::rename(&self.temp, &self.target)
            .map_err(|e| CustodyError::storage("rename", &self.target, e))?;
        self.placed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.placed {
            // Best effort: a leftover is also removed at the next start.
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Whether `path` exists; unlike [`Path::exists`], an error other than "not
/// found" (a permission problem, an I/O error) is reported rather than read as
/// "no".
pub(crate) fn exists(path: &Path) -> Result<bool, CustodyError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(CustodyError::storage("stat", path, e)),
    }
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
