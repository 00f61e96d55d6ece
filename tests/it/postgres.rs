//! Several real relay processes on one PostgreSQL database: each message reaches the bot once
//! and in per-user order, Meta's retry on the other relay is deduplicated, a relay killed with
//! deliveries in flight loses nothing (another takes over after the lease), and a pause given
//! through one relay's admin API holds on another within a second.
//!
//! Each test creates its own database on `BOTRELAY_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and drops it afterwards. Without a server
//! there it prints `skipping: no PostgreSQL at …` and passes, unless
//! `BOTRELAY_REQUIRE_POSTGRES=1`.

use crate::support::{
    APP_SECRET, MockSink, Reply, TestResult, VERIFY_TOKEN, post_signed, relay_command, text_message,
};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database of its own, dropped with `FORCE` when this is dropped.
struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
    client: tokio_postgres::Client,
}

impl TestDatabase {
    async fn create() -> TestResult<Option<TestDatabase>> {
        let admin_url =
            std::env::var("BOTRELAY_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.into());
        let connected = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_postgres::connect(&admin_url, tokio_postgres::NoTls),
        )
        .await;
        let admin = match connected {
            Ok(Ok((client, connection))) => {
                tokio::spawn(connection);
                client
            }
            failed => {
                let reason = match failed {
                    Ok(Err(error)) => error.to_string(),
                    _ => "timed out".to_owned(),
                };
                let mut shown = url::Url::parse(&admin_url)?;
                let _ = shown.set_password(None);
                if std::env::var("BOTRELAY_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                    return Err(format!("no PostgreSQL at {shown}: {reason}").into());
                }
                println!("skipping: no PostgreSQL at {shown} ({reason})");
                return Ok(None);
            }
        };
        let name = format!("botrelay_test_{:016x}", rand::random::<u64>());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let mut url = url::Url::parse(&admin_url)?;
        url.set_path(&name);
        let (client, connection) =
            tokio_postgres::connect(url.as_str(), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(Some(TestDatabase {
            admin_url,
            name,
            url: url.to_string(),
            client,
        }))
    }

    async fn count(&self, sql: &str) -> TestResult<i64> {
        Ok(self.client.query_one(sql, &[]).await?.try_get(0)?)
    }

    /// Waits until `sql` (a count) is `expected`.
    async fn wait_for_count(&self, sql: &str, expected: i64, within: Duration) -> TestResult {
        let deadline = Instant::now() + within;
        loop {
            // Before the first relay has migrated, the table may not exist yet.
            let count = self.count(sql).await.unwrap_or(-1);
            if count == expected {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("`{sql}` is {count}, expected {expected}").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let (client, connection) =
                    tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
                        .await
                        .ok()?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        });
        let _ = dropped.join();
    }
}

/// A relay process; killed when dropped.
struct Relay {
    child: Child,
    url: String,
    admin_url: String,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the real binary on `database` with `bot` as its bot (or no bot).
fn start_relay(
    dir: &Path,
    name: &str,
    database: &str,
    bot: Option<&MockSink>,
) -> TestResult<Relay> {
    let path = dir.join(format!("{name}.toml"));
    let bot = match bot {
        Some(bot) => format!(
            "[bot]\nurl = \"{}\"\ntimeout = \"1s\"\nbackoff = \"20ms\"\nmax_backoff = \"200ms\"\n\
             max_attempts = 100000\nconcurrency = 16\n",
            bot.url("/webhook")
        ),
        None => String::new(),
    };
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n\
             [store]\nurl = \"{database}\"\nlease = \"2s\"\npool_size = 4\n{bot}"
        ),
    )?;
    let mut child = relay_command()
        .arg("--config")
        .arg(&path)
        .env("BOTRELAY__MESSENGER__APP_SECRET", APP_SECRET)
        .env("BOTRELAY__MESSENGER__VERIFY_TOKEN", VERIFY_TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let (public, admin) = loop {
        let Some(line) = lines.next() else {
            let _ = child.kill();
            return Err(format!("relay {name} exited before listening").into());
        };
        let line = line?;
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if entry["message"] == "Listening" {
            let address = |key: &str| {
                entry[key]
                    .as_str()
                    .map(|address| format!("http://{address}"))
                    .ok_or(format!("no {key} address in the log"))
            };
            break (address("public")?, address("admin")?);
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok(Relay {
        child,
        url: public,
        admin_url: admin,
    })
}

fn mid_of(request: &crate::support::Received) -> String {
    request.json()["entry"][0]["messaging"][0]["message"]["mid"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// 200 messages from 20 users, posted round-robin to two relays on one database, each reach
/// the bot exactly once and in each user's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_deliver_each_message_once_in_per_user_order() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let bot = MockSink::start().await?;
    let relays = [
        start_relay(dir.path(), "a", &database.url, Some(&bot))?,
        start_relay(dir.path(), "b", &database.url, Some(&bot))?,
    ];
    const USERS: usize = 20;
    const ROUNDS: usize = 10;
    let http = reqwest::Client::new();
    // Round by round (a user's next message only after the last was acknowledged), each round's
    // messages at once, alternating between the relays.
    for round in 0..ROUNDS {
        let mut posts = tokio::task::JoinSet::new();
        for user in 0..USERS {
            let relay = &relays[(user + round) % 2];
            let (http, url) = (http.clone(), relay.url.clone());
            let body = text_message(
                "PAGE",
                &format!("user-{user}"),
                &format!("m.{user}.{round}"),
                "hi",
                1_700_000_000_000,
            );
            posts.spawn(async move { post_signed(&http, &url, &body).await.map(|r| r.status()) });
        }
        while let Some(status) = posts.join_next().await {
            assert_eq!(status??, 200);
        }
    }
    let total = (USERS * ROUNDS) as i64;
    database
        .wait_for_count(
            "SELECT COUNT(*) FROM deliveries WHERE sink = 'bot' AND state = 'delivered'",
            total,
            Duration::from_secs(60),
        )
        .await?;
    let received = bot.received();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut order: HashMap<String, Vec<usize>> = HashMap::new();
    for request in &received {
        let mid = mid_of(request);
        *seen.entry(mid.clone()).or_default() += 1;
        let mut parts = mid.split('.').skip(1);
        let (user, round) = (parts.next(), parts.next().and_then(|r| r.parse().ok()));
        if let (Some(user), Some(round)) = (user, round) {
            order.entry(user.to_owned()).or_default().push(round);
        }
    }
    assert_eq!(received.len(), USERS * ROUNDS, "every message once");
    assert!(seen.values().all(|count| *count == 1));
    assert_eq!(order.len(), USERS);
    for (user, rounds) in &order {
        assert_eq!(
            rounds,
            &(0..ROUNDS).collect::<Vec<_>>(),
            "user {user}'s messages out of order"
        );
    }
    Ok(())
}

/// Meta retries a webhook, and the retry lands on the other relay: acknowledged, not delivered
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metas_retry_on_the_other_relay_is_deduplicated() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let bot = MockSink::start().await?;
    let a = start_relay(dir.path(), "a", &database.url, Some(&bot))?;
    let b = start_relay(dir.path(), "b", &database.url, Some(&bot))?;
    let http = reqwest::Client::new();
    let body = text_message("PAGE", "U1", "m.retried", "hello", 1_700_000_000_000);
    assert_eq!(post_signed(&http, &a.url, &body).await?.status(), 200);
    bot.wait_for(1, Duration::from_secs(20)).await?;
    assert_eq!(post_signed(&http, &b.url, &body).await?.status(), 200);
    // The same user's next message: had the retry been queued, it would come first.
    let next = text_message("PAGE", "U1", "m.next", "again", 1_700_000_000_001);
    assert_eq!(post_signed(&http, &b.url, &next).await?.status(), 200);
    database
        .wait_for_count(
            "SELECT COUNT(*) FROM deliveries WHERE sink = 'bot' AND state = 'delivered'",
            2,
            Duration::from_secs(20),
        )
        .await?;
    let mids: Vec<String> = bot.received().iter().map(mid_of).collect();
    assert_eq!(mids, ["m.retried", "m.next"]);
    assert_eq!(database.count("SELECT COUNT(*) FROM events").await?, 2);
    Ok(())
}

/// `kill -9` of a relay whose deliveries are in flight while the bot is down: once the bot is
/// back, every acknowledged event arrives, through the other relay once the lease ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relays_deliveries_are_taken_over_by_the_other() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let bot = MockSink::start().await?;
    let down = Arc::new(AtomicBool::new(true));
    bot.decide({
        let down = down.clone();
        move |_| {
            Some(if down.load(Ordering::SeqCst) {
                Reply::hang()
            } else {
                Reply::status(200)
            })
        }
    });
    let mut a = start_relay(dir.path(), "a", &database.url, Some(&bot))?;
    let b = start_relay(dir.path(), "b", &database.url, Some(&bot))?;
    const COUNT: usize = 60;
    let http = reqwest::Client::new();
    for index in 0..COUNT {
        let relay = if index % 3 == 2 { &b } else { &a };
        let body = text_message(
            "PAGE",
            &format!("user-{}", index % 20),
            &format!("m.kill.{index}"),
            "hi",
            1_700_000_000_000,
        );
        assert_eq!(post_signed(&http, &relay.url, &body).await?.status(), 200);
    }
    // Both relays have attempts hanging at the bot, their leases renewed meanwhile.
    bot.wait_for(20, Duration::from_secs(20)).await?;
    let in_flight = database
        .count("SELECT COUNT(*) FROM deliveries WHERE state = 'in_flight'")
        .await?;
    a.child.kill()?; // SIGKILL: no shutdown code runs, its leases stay until they run out.
    a.child.wait()?;
    let killed = Instant::now();
    down.store(false, Ordering::SeqCst);

    let accepted = |bot: &MockSink| -> HashMap<String, usize> {
        let mut accepted = HashMap::new();
        for request in bot.received().iter().filter(|r| r.replied == 200) {
            *accepted.entry(mid_of(request)).or_default() += 1;
        }
        accepted
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while accepted(&bot).len() < COUNT && Instant::now() < deadline {
        bot.wait_for(bot.received().len() + 1, Duration::from_millis(500))
            .await
            .ok();
    }
    let accepted = accepted(&bot);
    let lost: Vec<usize> = (0..COUNT)
        .filter(|index| !accepted.contains_key(&format!("m.kill.{index}")))
        .collect();
    println!(
        "kill test: {in_flight} in flight at the kill; all {} delivered {:?} after it; duplicates {}",
        accepted.len(),
        killed.elapsed(),
        accepted.values().map(|n| n - 1).sum::<usize>()
    );
    assert!(lost.is_empty(), "never delivered: {lost:?}");
    database
        .wait_for_count(
            "SELECT COUNT(*) FROM deliveries WHERE state <> 'delivered'",
            0,
            Duration::from_secs(20),
        )
        .await?;
    drop(b);
    Ok(())
}

/// A pause given through relay A's admin API stops forwarding through relay B within a second;
/// an unpause through A lets B forward again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_through_one_relay_holds_on_the_other_within_a_second() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let bot = MockSink::start().await?;
    // A forwards nothing itself (no bot): every delivery goes through B.
    let a = start_relay(dir.path(), "a", &database.url, None)?;
    let b = start_relay(dir.path(), "b", &database.url, Some(&bot))?;
    let http = reqwest::Client::new();
    let mut sent = 0;
    let mut post = async |mid: String| -> TestResult {
        sent += 1;
        let body = text_message("PAGE", "PSID", &mid, "hi", 1_700_000_000_000);
        assert_eq!(post_signed(&http, &b.url, &body).await?.status(), 200);
        database
            .wait_for_count(
                "SELECT COUNT(*) FROM deliveries
                 WHERE sink = 'bot' AND state IN ('delivered', 'skipped')",
                sent,
                Duration::from_secs(20),
            )
            .await
    };
    post("m.before".into()).await?;
    assert_eq!(bot.received().len(), 1);

    let pause = http
        .post(format!("{}/admin/users/PSID/pause", a.admin_url))
        .send()
        .await?;
    assert!(pause.status().is_success(), "{}", pause.status());
    let paused_at = botrelay::clock::now_ms();
    let mut first_skip = None;
    for n in 0..200 {
        post(format!("m.paused.{n}")).await?;
        let skipped = database
            .count("SELECT COUNT(*) FROM deliveries WHERE state = 'skipped'")
            .await?;
        if skipped > 0 {
            first_skip = Some(n);
            break;
        }
    }
    let first_skip = first_skip.ok_or("B never skipped the paused user")?;
    let skipped_at = database
        .count("SELECT MIN(updated_at) FROM deliveries WHERE state = 'skipped'")
        .await?;
    println!(
        "pause through A held on B after {} ms ({first_skip} forwarded meanwhile)",
        skipped_at - paused_at
    );
    // Nothing forwarded for this user more than a second after the pause.
    let late = database
        .count(&format!(
            "SELECT COUNT(*) FROM deliveries
             WHERE sink = 'bot' AND state = 'delivered' AND updated_at > {}",
            paused_at + 1000
        ))
        .await?;
    assert_eq!(late, 0);
    assert!(skipped_at - paused_at <= 1000);
    for n in 0..3 {
        post(format!("m.still.{n}")).await?;
    }
    assert_eq!(
        database
            .count("SELECT COUNT(*) FROM deliveries WHERE state = 'skipped'")
            .await?,
        4
    );
    let forwarded = bot.received().len();

    let unpause = http
        .post(format!("{}/admin/users/PSID/unpause", a.admin_url))
        .send()
        .await?;
    assert!(unpause.status().is_success());
    let unpaused = Instant::now();
    loop {
        post(format!("m.after.{}", unpaused.elapsed().as_millis())).await?;
        if bot.received().len() > forwarded {
            break;
        }
        assert!(
            unpaused.elapsed() < Duration::from_secs(1),
            "still paused on B"
        );
    }
    Ok(())
}
