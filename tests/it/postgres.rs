//! Several real relay processes on one PostgreSQL database: each message reaches the bot once
//! and in per-user order, Meta's retry on the other relay is deduplicated, a relay killed with
//! deliveries in flight loses nothing (another takes over after the lease), a pause given
//! through one relay's admin API holds on another within a second, one user's messages posted
//! to both relays reach a slow bot that sometimes fails in posting order, and a rolling restart
//! of both relays under steady load loses nothing acknowledged and keeps each user's order.
//!
//! Each test creates its own database on `BOTRELAY_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and drops it afterwards. Without a server
//! there it prints `skipping: no PostgreSQL at …` and passes, unless
//! `BOTRELAY_REQUIRE_POSTGRES=1`. The tests look at the database only through a [`Store`] of
//! their own on it (PostgreSQL takes several), never through its SQL.

use crate::support::{
    APP_SECRET, DeliveryProbe, MockSink, Received, RelayProcess, Reply, TestResult, VERIFY_TOKEN,
    assert_stays, post_signed, start_relay, text_message, wait_for_store_deliveries, wait_until,
};
use botrelay::store::{DeadLetterFilter, Store};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The relays' `store.lease`: how soon a killed relay's deliveries go to another.
const LEASE: Duration = Duration::from_secs(2);

/// A database of its own, dropped with `FORCE` when this is dropped, and the test's own store
/// handle on it (to look, never to claim: no dispatcher runs on it).
struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
    store: Store,
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
        let store = Store::open_postgres(url.as_str(), 2, LEASE).await?;
        Ok(Some(TestDatabase {
            admin_url,
            name,
            url: url.to_string(),
            store,
        }))
    }

    /// Waits until exactly `expected` deliveries match `matches`; returns them all as then.
    async fn wait_for(
        &self,
        matches: impl Fn(&DeliveryProbe) -> bool,
        expected: usize,
        within: Duration,
    ) -> TestResult<Vec<DeliveryProbe>> {
        wait_for_store_deliveries(&self.store, matches, expected, within).await
    }

    /// How many deliveries match `matches` now.
    async fn count(&self, matches: impl Fn(&DeliveryProbe) -> bool) -> TestResult<usize> {
        Ok(self
            .store
            .probe_deliveries()
            .await?
            .iter()
            .filter(|delivery| matches(delivery))
            .count())
    }

    /// Nothing left to do: no dead letter, and the bot's queue is empty.
    async fn assert_drained(&self) -> TestResult {
        let dead = self.store.dead_letters(DeadLetterFilter::default()).await?;
        assert!(dead.is_empty(), "dead letters: {dead:#?}");
        let depth = self.store.depth().await?;
        for (sink, depth) in &depth {
            assert_eq!(
                (depth.queued, depth.in_flight, depth.dead),
                (0, 0, 0),
                "{sink}'s queue"
            );
        }
        Ok(())
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

/// A delivery to the bot in one of `states`.
fn bot_in(states: &'static [&'static str]) -> impl Fn(&DeliveryProbe) -> bool {
    move |delivery| delivery.sink == "bot" && states.contains(&delivery.state.as_str())
}

/// Writes relay `name`'s config (on `database`, with `bot` as its bot, or no bot): both
/// listeners on port 0, a 2 s lease, fast retries.
fn relay_config(
    dir: &Path,
    name: &str,
    database: &str,
    bot: Option<&MockSink>,
) -> TestResult<PathBuf> {
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
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [store]\nurl = \"{database}\"\nlease = \"{}s\"\npool_size = 4\n{bot}",
            LEASE.as_secs()
        ),
    )?;
    Ok(path)
}

/// Starts the real binary with the config at `config`; ready when this returns.
async fn start(config: &Path) -> TestResult<RelayProcess> {
    start_relay(
        &[OsStr::new("--config"), config.as_os_str()],
        &[
            ("BOTRELAY__MESSENGER__APP_SECRET", APP_SECRET),
            ("BOTRELAY__MESSENGER__VERIFY_TOKEN", VERIFY_TOKEN),
        ],
    )
    .await
}

/// Writes relay `name`'s config and starts it.
async fn start_named(
    dir: &Path,
    name: &str,
    database: &str,
    bot: Option<&MockSink>,
) -> TestResult<RelayProcess> {
    start(&relay_config(dir, name, database, bot)?).await
}

fn mid_of(request: &Received) -> String {
    request.json()["entry"][0]["messaging"][0]["message"]["mid"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Checks that every message of `order` (one user's mids, in posting order) reached the bot in
/// that order: each was answered 200 at least once, the first 200s came in posting order, and no
/// request for a message arrived before an earlier message had been answered 200. Returns how
/// many requests repeated a message that had already been delivered (at least once allows it).
fn assert_in_posting_order(received: &[Received], order: &[String]) -> TestResult<usize> {
    let position: HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(index, mid)| (mid.as_str(), index))
        .collect();
    // How many of the user's messages were delivered (a 200 for each) so far, in order.
    let mut delivered = 0;
    let mut repeats = 0;
    for (at, request) in received.iter().enumerate() {
        let mid = mid_of(request);
        let Some(&index) = position.get(mid.as_str()) else {
            continue;
        };
        if index > delivered {
            return Err(format!(
                "request {at} of the bot's carries {mid} while {} had not been delivered",
                order[delivered]
            )
            .into());
        }
        if index < delivered {
            repeats += 1;
        } else if request.replied == 200 {
            delivered += 1;
        }
    }
    if delivered < order.len() {
        return Err(format!("{} never delivered", order[delivered]).into());
    }
    Ok(repeats)
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
        start_named(dir.path(), "a", &database.url, Some(&bot)).await?,
        start_named(dir.path(), "b", &database.url, Some(&bot)).await?,
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
    database
        .wait_for(
            bot_in(&["delivered"]),
            USERS * ROUNDS,
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
    database.assert_drained().await
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
    let a = start_named(dir.path(), "a", &database.url, Some(&bot)).await?;
    let b = start_named(dir.path(), "b", &database.url, Some(&bot)).await?;
    let http = reqwest::Client::new();
    let body = text_message("PAGE", "U1", "m.retried", "hello", 1_700_000_000_000);
    assert_eq!(post_signed(&http, &a.url, &body).await?.status(), 200);
    bot.wait_for(1, Duration::from_secs(20)).await?;
    assert_eq!(post_signed(&http, &b.url, &body).await?.status(), 200);
    // The same user's next message: had the retry been queued, it would come first.
    let next = text_message("PAGE", "U1", "m.next", "again", 1_700_000_000_001);
    assert_eq!(post_signed(&http, &b.url, &next).await?.status(), 200);
    let deliveries = database
        .wait_for(bot_in(&["delivered"]), 2, Duration::from_secs(20))
        .await?;
    assert_eq!(deliveries.len(), 2, "no delivery row for the retry");
    let mids: Vec<String> = bot.received().iter().map(mid_of).collect();
    assert_eq!(mids, ["m.retried", "m.next"]);
    assert_eq!(database.store.probe_events().await?.len(), 2);
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
    let mut a = start_named(dir.path(), "a", &database.url, Some(&bot)).await?;
    let b = start_named(dir.path(), "b", &database.url, Some(&bot)).await?;
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
    let in_flight = database.count(bot_in(&["in_flight"])).await?;
    a.kill()?; // SIGKILL: no shutdown code runs, its leases stay until they run out.
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
        .wait_for(|d| d.state != "delivered", 0, Duration::from_secs(20))
        .await?;
    database.assert_drained().await?;
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
    let a = start_named(dir.path(), "a", &database.url, None).await?;
    let b = start_named(dir.path(), "b", &database.url, Some(&bot)).await?;
    let http = reqwest::Client::new();
    let mut sent = 0;
    // Posts one message through B and waits until B has forwarded or skipped it.
    let mut post = async |mid: String| -> TestResult {
        sent += 1;
        let body = text_message("PAGE", "PSID", &mid, "hi", 1_700_000_000_000);
        assert_eq!(post_signed(&http, &b.url, &body).await?.status(), 200);
        database
            .wait_for(
                bot_in(&["delivered", "skipped"]),
                sent,
                Duration::from_secs(20),
            )
            .await
            .map(|_| ())
    };
    post("m.before".into()).await?;
    assert_eq!(bot.received().len(), 1);

    let pause = http
        .post(format!("{}/admin/users/PSID/pause", a.admin_url))
        .send()
        .await?;
    assert!(pause.status().is_success(), "{}", pause.status());
    let paused_at = Instant::now();
    let mut first_skip = None;
    for n in 0..200 {
        post(format!("m.paused.{n}")).await?;
        if database.count(bot_in(&["skipped"])).await? > 0 {
            first_skip = Some((n, paused_at.elapsed()));
            break;
        }
    }
    // An upper bound: B skipped it before this test looked.
    let (forwarded_meanwhile, held_after) = first_skip.ok_or("B never skipped the paused user")?;
    println!(
        "pause through A held on B within {held_after:?} ({forwarded_meanwhile} forwarded meanwhile)"
    );
    assert!(held_after <= Duration::from_secs(1), "{held_after:?}");
    // Nothing forwarded for this user more than a second after the pause.
    let late = |bot: &MockSink| {
        bot.received()
            .iter()
            .filter(|request| request.at > paused_at + Duration::from_secs(1))
            .count()
    };
    let forwarded = bot.received().len();
    for n in 0..3 {
        post(format!("m.still.{n}")).await?;
    }
    assert_eq!(database.count(bot_in(&["skipped"])).await?, 4);
    assert_eq!(bot.received().len(), forwarded);
    assert_eq!(late(&bot), 0);

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

/// One user's messages, posted one after another (each once the last was acknowledged)
/// alternately to relay A and relay B, reach a slow bot (it answers after 20 to 140 ms) that
/// answers 503 to three requests in ten, in posting order: every message is delivered, the
/// first delivery of each comes in posting order, and no message reaches the bot before the
/// previous one was delivered, whichever relay took each attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_messages_through_both_relays_reach_a_slow_failing_bot_in_order() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let bot = MockSink::start().await?;
    let requests = Arc::new(AtomicUsize::new(0));
    bot.decide({
        let requests = requests.clone();
        move |_| {
            let n = requests.fetch_add(1, Ordering::SeqCst) as u64;
            let delay = Duration::from_millis(20 + (n * 37) % 121);
            // Requests 1, 4 and 7 of every ten: never two in a row, so each retry gets through.
            let status = if matches!(n % 10, 1 | 4 | 7) {
                503
            } else {
                200
            };
            Some(Reply::status(status).after(delay))
        }
    });
    let relays = [
        start_named(dir.path(), "a", &database.url, Some(&bot)).await?,
        start_named(dir.path(), "b", &database.url, Some(&bot)).await?,
    ];
    const MESSAGES: usize = 40;
    let http = reqwest::Client::new();
    let order: Vec<String> = (0..MESSAGES).map(|n| format!("m.slow.{n}")).collect();
    for (n, mid) in order.iter().enumerate() {
        let body = text_message("PAGE", "PSID", mid, "hi", 1_700_000_000_000 + n as i64);
        let relay = &relays[n % 2];
        assert_eq!(post_signed(&http, &relay.url, &body).await?.status(), 200);
    }
    database
        .wait_for(bot_in(&["delivered"]), MESSAGES, Duration::from_secs(60))
        .await?;
    let received = bot.received();
    let failed = received.iter().filter(|r| r.replied == 503).count();
    let repeats = assert_in_posting_order(&received, &order)?;
    println!(
        "slow bot: {MESSAGES} messages in order through both relays; {} requests, {failed} answered 503, {repeats} repeats",
        received.len()
    );
    assert!(failed > 0, "the bot never failed");
    database.assert_drained().await
}

/// A rolling restart under steady load: users post at a steady rate (each user's next message
/// once the last was acknowledged; a refused or failed post is retried, on whichever relay is
/// up, as Meta retries) while relay A is stopped with SIGTERM and started again, then relay B.
/// Nothing acknowledged is lost, and each user's messages reach the bot in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_nothing_and_keeps_order() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let bot = MockSink::start().await?;
    // A little slow, so that a stop finds attempts in flight.
    bot.set_default(Reply::status(200).after(Duration::from_millis(5)));
    let configs = [
        relay_config(dir.path(), "a", &database.url, Some(&bot))?,
        relay_config(dir.path(), "b", &database.url, Some(&bot))?,
    ];
    let mut relays = [start(&configs[0]).await?, start(&configs[1]).await?];

    const USERS: usize = 4;
    // Per user; about 160 webhooks/s in all.
    const EVERY: Duration = Duration::from_millis(25);
    // The load's bound, should the test fail to stop it.
    const MOST_PER_USER: usize = 2_000;
    // The relays a load balancer would send to now.
    let up = Arc::new(Mutex::new(vec![
        relays[0].url.clone(),
        relays[1].url.clone(),
    ]));
    // Acknowledgements by relay URL.
    let acked: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    // Posts that no relay acknowledged (refused while it stopped) and were sent again.
    let retried = Arc::new(AtomicUsize::new(0));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut load = tokio::task::JoinSet::new();
    for user in 0..USERS {
        let (up, acked, stop, http, retried) = (
            up.clone(),
            acked.clone(),
            stop.clone(),
            http.clone(),
            retried.clone(),
        );
        load.spawn(async move {
            let mut pace = tokio::time::interval(EVERY);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut turn = user;
            let mut posted = 0;
            while !stop.load(Ordering::SeqCst) && posted < MOST_PER_USER {
                let body = text_message(
                    "PAGE",
                    &format!("user-{user}"),
                    &format!("m.{user}.{posted}"),
                    "hi",
                    1_700_000_000_000 + posted as i64,
                );
                let given_up = Instant::now() + Duration::from_secs(30);
                loop {
                    pace.tick().await;
                    turn += 1;
                    let url = up
                        .lock()
                        .ok()
                        .and_then(|up| (!up.is_empty()).then(|| up[turn % up.len()].clone()));
                    if let Some(url) = url
                        && let Ok(answer) = post_signed(&http, &url, &body).await
                        && answer.status() == 200
                    {
                        if let Ok(mut acked) = acked.lock() {
                            *acked.entry(url).or_default() += 1;
                        }
                        break;
                    }
                    if Instant::now() > given_up {
                        return Err(format!("m.{user}.{posted}: no relay acknowledged it"));
                    }
                    retried.fetch_add(1, Ordering::SeqCst);
                }
                posted += 1;
            }
            Ok((user, posted))
        });
    }
    let acked_by = |url: &str| {
        acked
            .lock()
            .map(|acked| acked.get(url).copied().unwrap_or(0))
            .unwrap_or(0)
    };
    wait_until(
        "the bot gets webhooks under load",
        Duration::from_secs(30),
        || bot.received().len() >= 100,
    )
    .await?;
    let mut stopped_with = Vec::new();
    for (index, relay) in relays.iter_mut().enumerate() {
        let old_url = relay.url.clone();
        // Load keeps coming to it while it drains: refused posts go to the other relay.
        let status = relay.terminate(Duration::from_secs(30)).await?;
        stopped_with.push(status);
        if let Ok(mut up) = up.lock() {
            up.retain(|url| url != &old_url);
        }
        let before = bot.received().len();
        // The other relay alone carries on meanwhile.
        wait_until(
            "the other relay delivers alone",
            Duration::from_secs(30),
            || bot.received().len() >= before + 50,
        )
        .await?;
        *relay = start(&configs[index]).await?;
        if let Ok(mut up) = up.lock() {
            up.push(relay.url.clone());
        }
        let url = relay.url.clone();
        wait_until(
            "the restarted relay acknowledges webhooks",
            Duration::from_secs(30),
            || acked_by(&url) >= 40,
        )
        .await?;
    }
    stop.store(true, Ordering::SeqCst);
    let mut posted = vec![0; USERS];
    while let Some(user) = load.join_next().await {
        let (user, count) = user??;
        posted[user] = count;
    }
    for status in &stopped_with {
        assert!(status.success(), "a relay stopped with {status}");
    }
    let total: usize = posted.iter().sum();

    // Every acknowledged message is delivered, once per stored delivery row.
    database
        .wait_for(bot_in(&["delivered"]), total, Duration::from_secs(60))
        .await?;
    assert_eq!(database.store.probe_events().await?.len(), total);
    database.assert_drained().await?;
    let received = bot.received();
    let mut repeats = 0;
    for (user, posted) in posted.iter().enumerate() {
        let order: Vec<String> = (0..*posted).map(|n| format!("m.{user}.{n}")).collect();
        repeats += assert_in_posting_order(&received, &order)
            .map_err(|error| format!("user-{user}: {error}"))?;
    }
    println!(
        "rolling restart: {total} webhooks acknowledged ({posted:?} per user; {} posts sent again), all delivered in per-user order; {repeats} repeated deliveries",
        retried.load(Ordering::SeqCst)
    );
    // Nothing more arrives once everything was delivered.
    let settled = bot.received().len();
    assert_stays(
        "nothing delivered again",
        Duration::from_millis(300),
        || bot.received().len() == settled,
    )
    .await
}

/// Once shutdown has begun the dispatcher starts no new attempt, even when a claim was under
/// way as the signal came (the database busy): what that claim took stays leased and goes out
/// after the restart (here: after the lease), instead of a fresh attempt that the grace period
/// may cut off. (On PostgreSQL, where a claim is a round trip that a lock can hold up; the
/// embedded store's claims read committed rows on a connection of their own and wait for
/// nobody.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_attempt_starts_after_shutdown_began() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let bot = MockSink::start().await?;
    bot.script([Reply::status(503).with_header("retry-after", "1")]);
    let mut relay = start_named(dir.path(), "a", &database.url, Some(&bot)).await?;
    let body = text_message("PAGE", "U1", "m_after_stop", "hello", 1_700_000_000_000);
    let http = reqwest::Client::new();
    assert_eq!(post_signed(&http, &relay.url, &body).await?.status(), 200);
    // Retried in 1 s: the dispatcher sleeps until then.
    database
        .wait_for(
            |delivery| delivery.state == "pending" && delivery.attempts == 1,
            1,
            Duration::from_secs(5),
        )
        .await?;
    let retry_due = bot.wait_for(1, Duration::from_secs(5)).await?[0].at + Duration::from_secs(1);
    // The database is busy (a transaction holds the deliveries table) when the retry falls
    // due, so the dispatcher's claim waits for it; meanwhile the relay is told to stop.
    let (mut holder, connection) =
        tokio_postgres::connect(&database.url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let busy = holder.transaction().await?;
    busy.batch_execute("LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE")
        .await?;
    // The retry is due (by the clock: nothing else shows it), and the claim is under way.
    wait_until("the retry is due", Duration::from_secs(5), || {
        Instant::now() >= retry_due + Duration::from_millis(300)
    })
    .await?;
    let public = relay.url.trim_start_matches("http://").to_owned();
    crate::support::terminate(&relay.child)?;
    // Shutdown has begun once the listener is closed.
    wait_until("the relay stops listening", Duration::from_secs(5), || {
        std::net::TcpStream::connect(&public).is_err()
    })
    .await?;
    busy.rollback().await?;
    let status = relay.wait_exit(Duration::from_secs(20)).await?;
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert_stays(
        "no attempt was started after shutdown began",
        Duration::from_millis(200),
        || bot.received().len() == 1,
    )
    .await?;
    Ok(())
}
