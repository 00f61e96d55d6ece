//! Power loss, not just `kill -9`: a killed process's writes stay in the page cache, so a
//! crash test passes even without an fsync. Here the real binary runs with an `LD_PRELOAD`
//! shim (`tests/powerloss/shim.c`, built by the test with `cc`) that keeps, for every file of
//! the store, an image of its content as of its last fsync. At each of many crash points the
//! relay is killed while webhooks are being acked, the store's files are replaced by those
//! images (every write not synced is lost, as on a power cut), and every acked webhook must be
//! in the store. Remove the syncer's fsync before the ack and this test fails.

use crate::support::{
    APP_SECRET, TestResult, VERIFY_TOKEN, post_signed, start_relay, text_message,
};
use botrelay::event::EventData;
use botrelay::store::Store;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Crash points: relay runs, each killed at another moment of a stream of webhooks.
const CRASHES: usize = 20;

/// Builds the shim into `dir`; `None` (the test is skipped, loudly) without a C compiler.
fn build_shim(dir: &Path) -> TestResult<Option<PathBuf>> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/powerloss/shim.c");
    let library = dir.join("powerloss-shim.so");
    let built = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&library)
        .arg(&source)
        .args(["-ldl", "-lpthread"])
        .output();
    match built {
        Ok(output) if output.status.success() => Ok(Some(library)),
        Ok(output) => Err(format!(
            "cannot build the power-loss shim: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Replaces every file of `store` by its image in `shadow`, as a disk would hold it after a
/// power cut: files without an image (never synced, such as `-shm`) are gone.
fn power_cut(store: &Path, shadow: &Path) -> TestResult {
    for entry in std::fs::read_dir(store)? {
        std::fs::remove_file(entry?.path())?;
    }
    for entry in std::fs::read_dir(shadow)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".tmp") {
            continue;
        }
        std::fs::copy(entry.path(), store.join(&name))?;
    }
    Ok(())
}

/// After a clean open and close in this process, the store's files are what is durable: they
/// become the images the next run starts from.
fn reset_images(store: &Path, shadow: &Path) -> TestResult {
    for entry in std::fs::read_dir(shadow)? {
        std::fs::remove_file(entry?.path())?;
    }
    for entry in std::fs::read_dir(store)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().ends_with("-shm") {
            continue;
        }
        std::fs::copy(entry.path(), shadow.join(&name))?;
        if let Ok(file) = std::fs::File::open(entry.path()) {
            file.sync_all()?;
        }
    }
    Ok(())
}

/// The mids of the message events in the store at `path`.
async fn stored_mids(path: &Path) -> TestResult<HashSet<String>> {
    let store = Store::open_sqlite(path, None)?;
    let events = store.probe_events().await;
    store.close().await;
    Ok(events?
        .into_iter()
        .filter_map(|event| match event.data {
            EventData::Message { mid, .. } => mid,
            _ => None,
        })
        .collect())
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acked_webhook_survives_a_power_cut_at_any_moment() -> TestResult {
    let root = tempfile::tempdir()?;
    let root_path = root.path().canonicalize()?;
    let Some(shim) = build_shim(&root_path)? else {
        println!("power-loss test skipped: no C compiler (cc)");
        return Ok(());
    };
    let store_dir = root_path.join("store");
    let shadow = root_path.join("shadow");
    std::fs::create_dir(&store_dir)?;
    std::fs::create_dir(&shadow)?;
    let store_path = store_dir.join("botrelay.db");
    let config = root_path.join("botrelay.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [log]\nformat = \"json\"\n[store]\npath = \"{}\"\n",
            store_path.display()
        ),
    )?;
    let env = [
        ("BOTRELAY__MESSENGER__APP_SECRET", APP_SECRET),
        ("BOTRELAY__MESSENGER__VERIFY_TOKEN", VERIFY_TOKEN),
        ("LD_PRELOAD", shim.to_str().ok_or("shim path")?),
        ("POWERLOSS_DIR", store_dir.to_str().ok_or("store path")?),
        ("POWERLOSS_SHADOW", shadow.to_str().ok_or("shadow path")?),
    ];
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut acked_total: HashSet<String> = HashSet::new();
    let mut lost_total = 0;
    let mut report = Vec::new();
    for crash in 0..CRASHES {
        let mut relay = start_relay(&["--config".as_ref(), config.as_os_str()], &env).await?;
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut posting = tokio::task::JoinSet::new();
        for worker in 0..6 {
            let (http, url) = (http.clone(), relay.url.clone());
            let (acked, stop) = (acked.clone(), stop.clone());
            posting.spawn(async move {
                let mut index = 0;
                while !stop.load(Ordering::Relaxed) {
                    let mid = format!("m.power.{crash}.{worker}.{index}");
                    index += 1;
                    let body = text_message("PAGE", &format!("u{worker}"), &mid, "hi", 1);
                    match post_signed(&http, &url, &body).await {
                        Ok(response) if response.status() == 200 => {
                            if let Ok(mut acked) = acked.lock() {
                                acked.push(mid);
                            }
                        }
                        // The relay is gone (or failing): stop.
                        _ => break,
                    }
                }
            });
        }
        // A different moment each time: 150 ms to about 1.1 s into the stream.
        let at = Duration::from_millis(150 + (crash as u64 * 211) % 950);
        tokio::time::sleep(at).await;
        relay.kill()?;
        stop.store(true, Ordering::Relaxed);
        while posting.join_next().await.is_some() {}
        let acked: Vec<String> = acked.lock().map_err(|_| "poisoned")?.clone();

        power_cut(&store_dir, &shadow)?;
        let stored = stored_mids(&store_path).await?;
        acked_total.extend(acked.iter().cloned());
        let lost: Vec<&String> = acked_total
            .iter()
            .filter(|mid| !stored.contains(*mid))
            .collect();
        report.push(format!(
            "crash {crash} at {at:?}: acked {}, stored {}, lost {}",
            acked.len(),
            stored.len(),
            lost.len()
        ));
        lost_total += lost.len();
        if !lost.is_empty() {
            let mut sample: Vec<&&String> = lost.iter().take(5).collect();
            sample.sort();
            report.push(format!("  lost, e.g.: {sample:?}"));
            // The next round starts from what survived.
            acked_total.retain(|mid| stored.contains(mid));
        }
        reset_images(&store_dir, &shadow)?;
    }
    println!("power-loss test:\n{}", report.join("\n"));
    assert!(
        acked_total.len() > CRASHES * 10,
        "too few webhooks were acked for the test to mean anything: {}",
        acked_total.len()
    );
    assert_eq!(
        lost_total,
        0,
        "acked webhooks lost in a power cut:\n{}",
        report.join("\n")
    );
    Ok(())
}
