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

/// A delivery whose attempt is under way each time the relay dies (a poison event: here the
/// relay is killed with SIGKILL while the bot holds that one request) is dead-lettered as
/// `crashed the relay` after three such crashes, and its user's next message goes out; the
/// relay does not crash-loop on it for its `ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_crashed_the_relay_three_times_is_dead_lettered() -> TestResult {
    let dir = tempfile::tempdir()?;
    let bot = MockSink::start().await?;
    bot.decide(|request| request.text().contains("m.poison").then(Reply::hang));
    let config = write_config(dir.path(), &bot)?;
    let mut relay = start(&config).await?;
    let http = reqwest::Client::new();
    for mid in ["m.poison", "m.next"] {
        let body = text_message("PAGE", "victim", mid, "hi", 1_700_000_000_000);
        assert_eq!(post_signed(&http, &relay.url, &body).await?.status(), 200);
    }
    let sent = |mid: &str| {
        bot.received()
            .iter()
            .filter(|request| request.text().contains(mid))
            .count()
    };
    for crash in 1..=botrelay::store::CRASH_LIMIT as usize {
        wait_until(
            "the poison's attempt is under way",
            Duration::from_secs(20),
            || sent("m.poison") == crash,
        )
        .await?;
        relay.kill()?;
        relay = start(&config).await?;
    }
    wait_until(
        "the user's next message goes out",
        Duration::from_secs(20),
        || sent("m.next") == 1,
    )
    .await?;
    assert_eq!(sent("m.poison"), botrelay::store::CRASH_LIMIT as usize);
    relay.terminate(Duration::from_secs(20)).await?;
    let store = botrelay::store::Store::open_sqlite(&dir.path().join("botrelay.db"), None)?;
    let letters = store.dead_letters(Default::default()).await?;
    store.close().await;
    let [letter] = letters.as_slice() else {
        return Err(format!("{} dead letters", letters.len()).into());
    };
    assert!(
        letter
            .last_error
            .as_deref()
            .is_some_and(|error| error.starts_with(botrelay::store::CRASHED)),
        "{letter:?}"
    );
    assert_eq!(letter.user.as_deref(), Some("victim"));
    Ok(())
}

/// An attempt that a graceful shutdown cuts off (it outlived `shutdown_grace`) is given back:
/// after the restart it goes out again, and the cut-off attempt does not count as a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_cut_off_by_a_shutdown_is_given_back_uncounted() -> TestResult {
    let dir = tempfile::tempdir()?;
    let bot = MockSink::start().await?;
    bot.set_default(Reply::hang());
    let config = write_config(dir.path(), &bot)?;
    let mut relay = start(&config).await?;
    let body = text_message("PAGE", "patient", "m.slow", "hi", 1_700_000_000_000);
    let http = reqwest::Client::new();
    assert_eq!(post_signed(&http, &relay.url, &body).await?.status(), 200);
    bot.wait_for(1, Duration::from_secs(20)).await?;
    // The grace (2 s) runs out with the attempt still hanging.
    let status = relay.terminate(Duration::from_secs(20)).await?;
    assert!(status.success(), "exit status after SIGTERM: {status}");
    bot.set_default(Reply::status(200));
    let mut relay = start(&config).await?;
    bot.wait_for(2, Duration::from_secs(20)).await?;
    relay.terminate(Duration::from_secs(20)).await?;
    let store = botrelay::store::Store::open_sqlite(&dir.path().join("botrelay.db"), None)?;
    let deliveries = store.probe_deliveries().await?;
    store.close().await;
    let [delivery] = deliveries.as_slice() else {
        return Err(format!("{} deliveries", deliveries.len()).into());
    };
    assert_eq!(
        (delivery.state.as_str(), delivery.attempts),
        ("delivered", 1),
        "the cut-off attempt counts nothing"
    );
    Ok(())
}
