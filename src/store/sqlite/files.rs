//! The files beside the store: the exclusive `<path>.lock`, the WAL the syncer fsyncs, and the
//! directory whose entries must be durable too. Every one of them is readable and writable by
//! the relay's user only (mode 0600, whatever the umask): they hold message text.

use super::StoreError;
use std::fs::File;
use std::path::Path;

/// Opens the store's WAL for the syncer, after syncing the database file, and makes the WAL's
/// directory entry durable once (with `synchronous = NORMAL`, SQLite itself would not until
/// the first checkpoint).
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
    // Pages of the database file still dirty in the page cache (a copy or a restore just
    // before this start) are written out now, before anything is acknowledged: left there,
    // the first checkpoint's fsync would flush them all while acks wait behind it (measured
    // with `benches/purge.rs` on a 415 MiB file written without a sync: ack p99 109 ms in the
    // first seconds, against 9-14 ms with this sync).
    // Opened for writing: some systems flush a file only through a handle that may write it.
    File::options()
        .read(true)
        .write(true)
        .open(path)
        .and_then(|database| database.sync_all())
        .map_err(|error| cannot("sync", path, error))?;
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
    let file = private_options()
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

/// The mode of every file of the store: the relay's user only.
#[cfg(unix)]
const PRIVATE: u32 = 0o600;

/// `File::options()` that create a file with mode 0600 (before the umask, which can only take
/// bits away).
pub(super) fn private_options() -> std::fs::OpenOptions {
    let mut options = File::options();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, PRIVATE);
    options
}

/// Creates the database file with mode 0600 before SQLite opens it (SQLite creates `-wal` and
/// `-shm` with the database file's mode), and sets 0600 on the database, its `-wal`, `-shm`
/// and `.lock` where they exist already (files of an older relay, or made under another
/// umask). Called before the store opens its connections and again once the WAL exists.
pub(super) fn make_private(path: &Path) -> Result<(), StoreError> {
    let cannot = |file: &Path, error: std::io::Error| {
        StoreError::Database(format!(
            "cannot restrict {} to its owner: {error}",
            file.display()
        ))
    };
    private_options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|error| cannot(path, error))?;
    #[cfg(unix)]
    for file in [
        path.to_path_buf(),
        sibling(path, "-wal"),
        sibling(path, "-shm"),
        sibling(path, ".lock"),
        sibling(path, "-claims"),
    ] {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(&file) {
            Ok(metadata) if metadata.permissions().mode() & 0o777 == PRIVATE => {}
            Ok(_) => std::fs::set_permissions(&file, std::fs::Permissions::from_mode(PRIVATE))
                .map_err(|error| cannot(&file, error))?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(cannot(&file, error)),
        }
    }
    Ok(())
}
