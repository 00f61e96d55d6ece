//! Crash safety of the real binary: what was acked survives `kill -9` and is delivered after
//! the restart, and SIGTERM shuts down cleanly with exit 0.

use crate::support::{
    APP_SECRET, MockSink, RelayProcess, Reply, TestResult, VERIFY_TOKEN, post_signed, start_relay,
    text_message, wait_until,
};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// The real binary with `config`, started on port 0 and ready.
async fn start(config: &Path) -> TestResult<RelayProcess> {
    start_relay(
        &["--config".as_ref(), config.as_os_str()],
        &[
            ("BOTRELAY__MESSENGER__APP_SECRET", APP_SECRET),
            ("BOTRELAY__MESSENGER__VERIFY_TOKEN", VERIFY_TOKEN),
        ],
    )
    .await
}

fn write_config(dir: &Path, bot: &MockSink) -> TestResult<std::path::PathBuf> {
    let path = dir.join("botrelay.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [log]\nformat = \"json\"\n[store]\npath = \"{}\"\n\
             [bot]\nurl = \"{}\"\nbackoff = \"20ms\"\nmax_backoff = \"200ms\"\nmax_attempts = 100000\nconcurrency = 16\n",
            dir.join("botrelay.db").display(),
            bot.url("/webhook")
        ),
    )?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_webhooks_survive_kill_9_and_arrive_after_restart() -> TestResult {
    const COUNT: usize = 500;
    let dir = tempfile::tempdir()?;
    let bot = MockSink::start().await?;
    bot.set_default(Reply::status(503));
    let config = write_config(dir.path(), &bot)?;
    let mut relay = start(&config).await?;
    let url = relay.url.clone();

    let http = reqwest::Client::new();
    let mut posting = tokio::task::JoinSet::new();
    for worker in 0..10 {
        let http = http.clone();
        let url = url.clone();
        posting.spawn(async move {
            let mut acked = 0;
            for index in (worker..COUNT).step_by(10) {
                let body = text_message(
                    "PAGE",
                    &format!("user-{}", index % 25),
                    &format!("m.crash.{index}"),
                    "hi",
                    1_700_000_000_000,
                );
                let response = post_signed(&http, &url, &body).await?;
                if response.status() == 200 {
                    acked += 1;
                }
            }
            Ok::<usize, reqwest::Error>(acked)
        });
    }
    let mut acked = 0;
    while let Some(result) = posting.join_next().await {
        acked += result??;
    }
    assert_eq!(acked, COUNT, "every webhook was acked");
    // The bot has been failing all along; some attempts are in flight right now.
    bot.wait_for(1, Duration::from_secs(10)).await?;
    relay.kill()?; // SIGKILL: no shutdown code runs.

    bot.set_default(Reply::status(200));
    let mut relay = start(&config).await?;
    // Count what the bot accepted (answered 200), per mid.
    let accepted = |bot: &MockSink| {
        let mut accepted: HashMap<String, usize> = HashMap::new();
        for request in bot
            .received()
            .iter()
            .filter(|request| request.replied == 200)
        {
            let item = &request.json()["entry"][0]["messaging"][0];
            let mid = item["message"]["mid"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            *accepted.entry(mid).or_default() += 1;
        }
        accepted
    };
    // Looked at below: losses are counted, not only a timeout reported.
    let _ = wait_until(
        "the bot accepted every webhook",
        Duration::from_secs(60),
        || accepted(&bot).len() >= COUNT,
    )
    .await;
    let accepted = accepted(&bot);
    let losses = (0..COUNT)
        .filter(|index| !accepted.contains_key(&format!("m.crash.{index}")))
        .count();
    let duplicates: usize = accepted.values().map(|count| count - 1).sum();
    println!(
        "crash test: acked {acked}, delivered {}, losses {losses}, duplicates {duplicates}",
        accepted.len()
    );
    assert_eq!(
        losses, 0,
        "every acked webhook reached the bot after the restart"
    );

    // SIGTERM: graceful shutdown, exit 0.
    let status = relay.terminate(Duration::from_secs(20)).await?;
    assert!(status.success(), "exit status after SIGTERM: {status}");
    Ok(())
}
