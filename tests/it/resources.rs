//! Bounded resources and the truth of the relay's health: the store's files are private.

use crate::support::{TestResult, spawn_app, text_message};
use std::path::Path;

/// Every file in `dir` with its mode bits.
#[cfg(unix)]
fn modes(dir: &Path) -> TestResult<Vec<(String, u32)>> {
    use std::os::unix::fs::PermissionsExt;
    let mut modes = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let mode = entry.metadata()?.permissions().mode() & 0o777;
        modes.push((entry.file_name().to_string_lossy().into_owned(), mode));
    }
    modes.sort();
    Ok(modes)
}

/// The store holds message text: its database, `-wal`, `-shm` and `.lock` are 0600 under the
/// usual umask (022, which would leave them readable by everyone), while the relay runs and
/// after it stopped.
#[cfg(unix)]
#[tokio::test]
async fn store_files_are_readable_by_the_relays_user_only() -> TestResult {
    use nix::sys::stat::{Mode, umask};
    umask(Mode::from_bits_truncate(0o022));
    let app = spawn_app("").await?;
    let response = app
        .post_webhook(&text_message("PAGE", "u1", "m.private", "secret text", 1))
        .await?;
    assert_eq!(response.status(), 200);
    let dir = app.store_path.parent().ok_or("no store dir")?.to_path_buf();
    let running = modes(&dir)?;
    let names: Vec<&str> = running.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "botrelay.db",
            "botrelay.db-shm",
            "botrelay.db-wal",
            "botrelay.db.lock"
        ]
    );
    let kept = app.stop_keeping_files().await?;
    let stopped = modes(kept.path())?;
    for (name, mode) in running.iter().chain(&stopped) {
        assert_eq!(*mode, 0o600, "{name} has mode {mode:o}");
    }
    Ok(())
}
