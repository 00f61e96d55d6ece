//! Bounded resources and the truth of the relay's health: connections held at once, the
//! open-files limit, the store's files private.

use crate::support::{
    APP_SECRET, MockSink, Reply, TestResult, VERIFY_TOKEN, fast_bot, metrics_text, post_signed,
    relay_command, spawn_app, start_relay, text_message, wait_until,
};
use botrelay::config::Config;
use botrelay::liveness::Liveness;
use botrelay::store::Store;
use std::path::Path;
use std::time::{Duration, Instant};

/// Open file descriptors and resident memory (KiB) of process `pid`, from `/proc`.
fn descriptors_and_rss(pid: u32) -> TestResult<(usize, u64)> {
    let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no VmRSS")?;
    Ok((descriptors, rss))
}

/// 300 idle connections against `max_connections = 64` (the real binary): the relay holds at
/// most 64 of them (its descriptors say so), the rest wait in the kernel's accept queue; the
/// read timeout cuts the idle ones 64 at a time, so a webhook posted behind them is acked and
/// delivered; memory stays flat, and once the clients are gone no descriptor is left over.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_max_connections_wait_in_the_kernel_and_cost_nothing() -> TestResult
{
    const IDLE: usize = 300;
    const MAX: usize = 64;
    let dir = tempfile::tempdir()?;
    let bot = MockSink::start().await?;
    let config = dir.path().join("botrelay.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nread_timeout = \"1s\"\nmax_connections = {MAX}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n[store]\npath = \"{}\"\n\
             [bot]\nurl = \"{}\"\n",
            dir.path().join("botrelay.db").display(),
            bot.url("/webhook")
        ),
    )?;
    let mut relay = start_relay(
        &["--config".as_ref(), config.as_os_str()],
        &[
            ("BOTRELAY__MESSENGER__APP_SECRET", APP_SECRET),
            ("BOTRELAY__MESSENGER__VERIFY_TOKEN", VERIFY_TOKEN),
        ],
    )
    .await?;
    let limit = relay
        .start_up_log()?
        .into_iter()
        .find(|line| line["message"] == "Open-files limit")
        .ok_or("no `Open-files limit` line")?;
    assert_eq!(
        limit["soft"], limit["hard"],
        "the soft limit is raised: {limit}"
    );
    let pid = relay.child.id();
    let (descriptors_before, rss_before) = descriptors_and_rss(pid)?;
    let address = relay.url.trim_start_matches("http://").to_owned();

    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(tokio::net::TcpStream::connect(&address).await?);
    }
    // The relay accepts up to its cap, and no more.
    wait_until(
        "the relay holds max_connections connections",
        Duration::from_secs(5),
        || descriptors_and_rss(pid).is_ok_and(|(now, _)| now >= descriptors_before + MAX),
    )
    .await?;

    // Posted behind 300 idle clients: served once the read timeout has cut the ones ahead.
    let started = Instant::now();
    let webhook = {
        let url = relay.url.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?;
            let body = text_message("PAGE", "u1", "m.behind.idle", "hi", 1_700_000_000_000);
            let status = post_signed(&http, &url, &body).await?.status();
            Ok::<_, reqwest::Error>(status)
        })
    };
    let (mut most_descriptors, mut most_rss) = (0, 0);
    while !webhook.is_finished() {
        let (descriptors, rss) = descriptors_and_rss(pid)?;
        most_descriptors = most_descriptors.max(descriptors);
        most_rss = most_rss.max(rss);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = webhook.await??;
    assert_eq!(status, 200);
    println!(
        "acked after {:?} behind {IDLE} idle connections; descriptors {descriptors_before} → at most {most_descriptors}; VmRSS {rss_before} KiB → at most {most_rss} KiB",
        started.elapsed()
    );
    assert!(
        most_descriptors <= descriptors_before + MAX + 2,
        "at most {MAX} connections held: {descriptors_before} descriptors before, {most_descriptors} at most"
    );
    assert!(
        most_rss < rss_before + 32 * 1024,
        "VmRSS grew from {rss_before} KiB to {most_rss} KiB"
    );
    bot.wait_for(1, Duration::from_secs(10)).await?;

    drop(idle);
    // The delivery's connection to the bot stays in the client's pool, and SQLite may have
    // opened the WAL once more for a read: a few descriptors, not 300.
    let closed = wait_until(
        "every idle connection is closed",
        Duration::from_secs(10),
        || descriptors_and_rss(pid).is_ok_and(|(now, _)| now <= descriptors_before + 3),
    )
    .await;
    if closed.is_err() {
        let open: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .map(|target| target.display().to_string())
            .collect();
        return Err(
            format!("descriptors left open (before: {descriptors_before}): {open:?}").into(),
        );
    }
    let status = relay.terminate(Duration::from_secs(20)).await?;
    assert!(status.success(), "exit status after SIGTERM: {status}");
    Ok(())
}

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

/// The store holds message text: its database, `-wal`, `-shm`, `.lock` and `-claims` are 0600 under the
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
            "botrelay.db-claims",
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

/// A relay in this process whose [`Liveness`] the test holds (for its fault hook).
struct Watched {
    url: String,
    admin_url: String,
    store: Store,
    liveness: Liveness,
    run: tokio::task::JoinHandle<anyhow::Result<()>>,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn start_watched(extra: &str) -> TestResult<Watched> {
    let dir = tempfile::tempdir()?;
    let toml = format!(
        "[messenger]\napp_secret = \"{APP_SECRET}\"\nverify_token = \"{VERIFY_TOKEN}\"\n\
         [server]\nshutdown_grace = \"2s\"\n[store]\npath = \"{}\"\n{extra}",
        dir.path().join("botrelay.db").display()
    );
    let config = Config::from_sources(&toml, std::collections::HashMap::new())?;
    let store = Store::open_sqlite(&config.store.path, None)?;
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", public.local_addr()?);
    let admin_url = format!("http://{}", admin.local_addr()?);
    let liveness = Liveness::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(botrelay::run_with_liveness(
        config,
        store.clone(),
        botrelay::Listeners { public, admin },
        async move {
            let _ = stopped.await;
        },
        liveness.clone(),
    ));
    Ok(Watched {
        url,
        admin_url,
        store,
        liveness,
        run,
        _stop: stop,
        _dir: dir,
    })
}

impl Watched {
    /// `/healthz` of both listeners: status and body each.
    async fn health(&self) -> TestResult<[(u16, String); 2]> {
        let http = reqwest::Client::new();
        let mut answers = Vec::new();
        for base in [&self.url, &self.admin_url] {
            let response = http.get(format!("{base}/healthz")).send().await?;
            answers.push((response.status().as_u16(), response.text().await?));
        }
        let [public, admin]: [(u16, String); 2] = answers.try_into().map_err(|_| "two answers")?;
        Ok([public, admin])
    }

    /// Waits for the run to end (it must, within the grace and a margin) and returns its error.
    async fn run_error(self) -> TestResult<String> {
        let ended = tokio::time::timeout(Duration::from_secs(5), self.run).await??;
        let error = ended.err().ok_or("the run ended without an error")?;
        self.store.close().await;
        Ok(format!("{error:#}"))
    }
}

/// A background loop that dies while the relay is not shutting down (killed through the
/// liveness fault hook: a bot dispatcher loop, the purge loop, the metrics upkeep) turns
/// `/healthz` to 503 on both listeners, naming it, and the run ends with an error (a non-zero
/// exit) within the shutdown grace.
#[tokio::test]
async fn a_dead_background_loop_fails_healthz_and_ends_the_run_with_an_error() -> TestResult {
    let bot = MockSink::start().await?;
    for name in ["bot dispatcher loop", "purge loop", "metrics upkeep loop"] {
        let relay = start_watched(&fast_bot(&bot.url("/webhook"))).await?;
        let [public, admin] = relay.health().await?;
        assert_eq!((public.0, admin.0), (200, 200), "{name}: healthy at first");
        assert!(
            relay.liveness.abort_loop_for_test(name),
            "no loop named {name}"
        );
        let started = Instant::now();
        let mut health = relay.health().await?;
        while health.iter().any(|(status, _)| *status != 503)
            && started.elapsed() < Duration::from_secs(2)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
            health = relay.health().await.unwrap_or(health);
        }
        for (status, body) in &health {
            assert_eq!(*status, 503, "{name}: {body}");
            assert!(body.contains(name), "{name}: {body}");
        }
        let error = relay.run_error().await?;
        assert!(error.contains(name), "{name}: {error}");
    }
    Ok(())
}

/// A failed fsync of the store's WAL (the syncer's fault hook): the webhook it was for gets
/// 503, `/healthz` turns 503, and the run ends with an error.
#[tokio::test]
async fn a_failed_fsync_fails_healthz_and_ends_the_run_with_an_error() -> TestResult {
    let relay = start_watched("").await?;
    let http = reqwest::Client::new();
    let body = text_message("PAGE", "u1", "m.before", "hi", 1);
    assert_eq!(post_signed(&http, &relay.url, &body).await?.status(), 200);
    relay.store.fail_next_sync_for_test();
    let body = text_message("PAGE", "u1", "m.unsynced", "hi", 2);
    assert_eq!(post_signed(&http, &relay.url, &body).await?.status(), 503);
    for (status, body) in relay.health().await? {
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("could not sync"), "{body}");
    }
    let error = relay.run_error().await?;
    assert!(
        error.contains("could not sync its write-ahead log"),
        "{error}"
    );
    Ok(())
}

/// The real binary with a stdout pipe nobody reads once it said `Listening`, logging at
/// `trace` (several lines per request and per failed delivery): webhooks are acked and
/// deliveries go on long after the pipe's 64 KiB and the log's queue are full, since the log
/// drops lines (and counts them) instead of waiting for stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_acked_while_stdout_is_stalled() -> TestResult {
    use std::io::BufRead;
    const WEBHOOKS: usize = 600;
    // A bot failing for 300 users, retried every few ms: a flood of log lines on the delivery
    // path too.
    let bot = MockSink::start().await?;
    // Half the users fail for good (so the sink as a whole is not in an outage, which would
    // hold their retries back).
    bot.decide(|request| {
        let user = request.json()["entry"][0]["messaging"][0]["sender"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let odd = user.ends_with(['1', '3', '5', '7', '9']);
        Some(Reply::status(if odd { 500 } else { 200 }))
    });
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("botrelay.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [log]\nformat = \"json\"\nlevel = \"trace\"\n[store]\npath = \"{}\"\n\
             {}max_attempts = 1000000\nconcurrency = 64\n",
            dir.path().join("botrelay.db").display(),
            fast_bot(&bot.url("/webhook"))
        ),
    )?;
    let mut child = relay_command()
        .arg("--config")
        .arg(&config)
        .current_dir(dir.path())
        .env("BOTRELAY__MESSENGER__APP_SECRET", APP_SECRET)
        .env("BOTRELAY__MESSENGER__VERIFY_TOKEN", VERIFY_TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    // Read up to `Listening`, then never again (the pipe stays open).
    let ((url, admin_url), _unread) = tokio::task::spawn_blocking(
        move || -> TestResult<((String, String), std::io::BufReader<std::process::ChildStdout>)> {
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 {
                    return Err("the relay closed stdout before listening".into());
                }
                let entry: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if entry["message"] == "Listening" {
                    let address = |name: &str| {
                        format!("http://{}", entry[name].as_str().unwrap_or_default())
                    };
                    return Ok(((address("public"), address("admin")), reader));
                }
            }
        },
    )
    .await??;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let started = Instant::now();
    let mut posting = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let (http, url) = (http.clone(), url.clone());
        posting.spawn(async move {
            for index in (worker..WEBHOOKS).step_by(8) {
                let mid = format!("m.stalled.{index}");
                let body = text_message(
                    "PAGE",
                    &format!("u{index}"),
                    &mid,
                    &"long text ".repeat(20),
                    1,
                );
                let status = post_signed(&http, &url, &body)
                    .await
                    .map_err(|error| error.to_string())?
                    .status();
                if status != 200 {
                    return Err(format!("webhook {index}: {status}"));
                }
            }
            Ok(())
        });
    }
    while let Some(posted) = posting.join_next().await {
        posted??;
    }
    println!(
        "{WEBHOOKS} webhooks acked in {:?} with stdout stalled",
        started.elapsed()
    );
    // The pipe is full, and the lines beyond the queue were dropped and counted (the metric is
    // brought up to date every 5 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    let dropped = loop {
        let metrics = metrics_text(&http, &admin_url).await?;
        let dropped: u64 = metrics
            .lines()
            .find_map(|line| line.strip_prefix("botrelay_log_lines_dropped_total "))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0);
        if dropped > 0 || Instant::now() > deadline {
            break dropped;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        dropped > 0,
        "no log line was dropped: was stdout ever stalled?"
    );
    // Deliveries go on too: the failing users' deliveries are tried again and again.
    let tried = bot.received().len();
    wait_until("the bot is tried again", Duration::from_secs(5), || {
        bot.received().len() > tried + 100
    })
    .await?;
    println!(
        "{dropped} log lines dropped; the bot was tried {} times",
        bot.received().len()
    );
    child.kill()?;
    child.wait()?;
    Ok(())
}
