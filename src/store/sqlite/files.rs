//! The files beside the store: the exclusive `<path>.lock`, the WAL the syncer fsyncs, and the
//! directory whose entries must be durable too.

use super::StoreError;
use std::fs::File;
use std::path::Path;

/// Opens the store's WAL for the syncer, and makes its directory entry durable once (with
/// `synchronous = NORMAL`, SQLite itself would not until the first checkpoint).
pub(super) fn open_wal(path: &Path) -> Result<File, StoreError> {
    let wal_path = sibling(path, "-wal");
    let cannot = |what: &str, file: &Path, error: std::io::Error| {
        StoreError::Database(format!("cannot {what} {}: {error}", file.display()))
    };
    let wal_file = File::options()
        .read(true)
        .write(true)
        .open(&wal_path)
        .map_err(|error| cannot("open", &wal_path, error))?;
    let directory = directory_of(path);
    match File::open(directory).and_then(|directory| directory.sync_all()) {
        Ok(()) => {}
        // Some filesystems cannot fsync a directory at all (EINVAL); SQLite ignores that too.
        // The WAL's entry then becomes durable with the filesystem's own next sync.
        Err(error) if directory_sync_unsupported(&error) => tracing::warn!(
            directory = %directory.display(),
            %error,
            "This filesystem cannot sync a directory; the store's files are synced, their directory entries are not"
        ),
        Err(error) => return Err(cannot("sync", directory, error)),
    }
    Ok(wal_file)
}

/// Whether a directory fsync failed only because the filesystem does not do it.
pub(super) fn directory_sync_unsupported(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
    )
}

/// The directory the store file is in (`.` for a bare file name).
pub(super) fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// `<path><suffix>`: the files SQLite and the relay keep beside the store (`-wal`, `.lock`).
pub(super) fn sibling(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut sibling = path.as_os_str().to_owned();
    sibling.push(suffix);
    sibling.into()
}

/// Takes an exclusive lock on `<path>.lock` so that two relays never share one store file.
pub(super) fn lock_file(path: &Path) -> Result<File, StoreError> {
    let lock_path = sibling(path, ".lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|error| {
            StoreError::Database(format!("cannot open {}: {error}", lock_path.display()))
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(StoreError::Locked(path.display().to_string()))
        }
        Err(std::fs::TryLockError::Error(error)) => Err(StoreError::Database(format!(
            "cannot lock {}: {error}",
            lock_path.display()
        ))),
    }
}
