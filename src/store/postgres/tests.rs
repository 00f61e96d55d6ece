//! Tests of the PostgreSQL store against a real server: the store contract on a fresh database
//! each, several stores (relays) on one database, query plans, and errors without secrets.
//!
//! `BOTRELAY_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) is
//! where each test creates its own `botrelay_test_<random>` database, dropped afterwards. With
//! no server there, a test prints `skipping: no PostgreSQL at …` and passes, unless
//! `BOTRELAY_REQUIRE_POSTGRES=1`, when it fails.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use super::queries::{CLAIM, NEXT_DUE};
use super::write::{PROMOTE, PURGE_DEAD, PURGE_DELIVERED, PURGE_EVENTS};
use crate::clock::Millis;
use crate::event::{Event, EventData, EventId, EventKind, Source};
use crate::sink_name::SinkName;
use crate::store::contract::{self, TestResult};
use crate::store::{NewEvent, Settle, Store, StoreError};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database of its own for one test, dropped (with `FORCE`) when this is dropped.
pub(crate) struct TestDatabase {
    admin_url: String,
    name: String,
    pub(crate) url: String,
}

impl TestDatabase {
    /// A fresh database, or `None` (after one line saying so) when no server answers and
    /// `BOTRELAY_REQUIRE_POSTGRES` is not `1`.
    pub(crate) async fn create()
    -> Result<Option<TestDatabase>, Box<dyn std::error::Error + Send + Sync>> {
        let admin_url =
            std::env::var("BOTRELAY_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.into());
        let connected = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_postgres::connect(&admin_url, tokio_postgres::NoTls),
        )
        .await;
        let client = match connected {
            Ok(Ok((client, connection))) => {
                tokio::spawn(connection);
                client
            }
            failed => {
                let reason = match failed {
                    Ok(Err(error)) => error.to_string(),
                    _ => "timed out".to_owned(),
                };
                let shown = shown(&admin_url);
                if std::env::var("BOTRELAY_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                    return Err(format!("no PostgreSQL at {shown}: {reason}").into());
                }
                println!("skipping: no PostgreSQL at {shown} ({reason})");
                return Ok(None);
            }
        };
        let name = format!("botrelay_test_{:016x}", rand::random::<u64>());
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let mut url = url::Url::parse(&admin_url)?;
        url.set_path(&name);
        Ok(Some(TestDatabase {
            admin_url,
            name,
            url: url.to_string(),
        }))
    }

    pub(crate) async fn open(&self) -> Result<Store, StoreError> {
        Store::open_postgres(&self.url, 8, Duration::from_secs(30)).await
    }

    /// A plain connection to the test database, to look at its rows.
    pub(crate) async fn connect(
        &self,
    ) -> Result<tokio_postgres::Client, Box<dyn std::error::Error + Send + Sync>> {
        let (client, connection) =
            tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // A runtime of its own on a thread of its own: this may run inside a test's runtime.
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

/// The URL without its user and password.
fn shown(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_password(None);
            let _ = parsed.set_username("");
            parsed.to_string()
        }
        Err(_) => "(an unparsable URL)".to_owned(),
    }
}

macro_rules! on_postgres {
    ($($test:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $test() -> TestResult {
            let Some(database) = TestDatabase::create().await? else { return Ok(()) };
            let store = database.open().await?;
            let result = contract::$test(&store).await;
            store.close().await;
            result
        }
    )*};
}

contract::every_contract_test!(on_postgres);

fn message(name: &str, user: &str) -> NewEvent {
    NewEvent {
        event: Event {
            id: EventId::derive(&[name.as_bytes()]),
            source: Source::Webhook,
            kind: EventKind::Message,
            page_id: Some(name.to_owned()),
            user_id: Some(user.to_owned()),
            timestamp_ms: 0,
            data: EventData::Other { key: None },
            webhook: None,
        },
        sinks: vec![SinkName::Bot],
    }
}

/// Three relays starting at once on an empty database all come up; the schema is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_starting_at_once_on_an_empty_database_all_come_up() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let (a, b, c) = tokio::join!(database.open(), database.open(), database.open());
    let stores = [a?, b?, c?];
    let client = database.connect().await?;
    let versions: i64 = client
        .query_one("SELECT COUNT(*) FROM botrelay_migrations", &[])
        .await?
        .get(0);
    assert_eq!(versions, super::schema::MIGRATIONS.len() as i64);
    for store in &stores {
        assert!(store.is_writable(1).await);
        store.close().await;
    }
    Ok(())
}

/// Two relays claiming one sink at once never hold the same lane together, and each user's
/// deliveries go in order, though the events were written by both relays at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_never_share_a_lane_and_keep_each_users_order() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let stores = [database.open().await?, database.open().await?];
    const USERS: usize = 20;
    const PER_USER: usize = 10;
    // Both relays write every user's events, round by round, at the same time: in a round,
    // relay 0 writes the even users' event and relay 1 the odd users'.
    for round in 0..PER_USER {
        let writes = stores.iter().enumerate().map(|(relay, store)| {
            let events: Vec<NewEvent> = (0..USERS)
                .filter(|user| user % 2 == relay)
                .map(|user| message(&format!("{user}/{round}"), &format!("user-{user}")))
                .collect();
            store.enqueue(events, 1_000 + round as Millis)
        });
        for report in futures_util::future::join_all(writes).await {
            assert_eq!(report?.stored, USERS / 2);
        }
    }
    let held: Arc<Mutex<HashSet<String>>> = Arc::default();
    let order: Arc<Mutex<HashMap<String, Vec<usize>>>> = Arc::default();
    let mut workers = tokio::task::JoinSet::new();
    for store in &stores {
        for _ in 0..2 {
            let (store, held, order) = (store.clone(), held.clone(), order.clone());
            workers.spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let batch = store
                        .claim(SinkName::Bot, 4, 10_000, Duration::from_secs(600))
                        .await?;
                    if batch.deliveries.is_empty() {
                        let done = order.lock().unwrap().values().map(Vec::len).sum::<usize>();
                        if done == USERS * PER_USER || Instant::now() > deadline {
                            return Ok::<(), StoreError>(());
                        }
                        tokio::task::yield_now().await;
                        continue;
                    }
                    for delivery in &batch.deliveries {
                        let user = delivery.event.user_id.clone().unwrap_or_default();
                        let name = delivery.event.page_id.clone().unwrap_or_default();
                        let sequence: usize = name
                            .split('/')
                            .nth(1)
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(usize::MAX);
                        assert!(
                            held.lock().unwrap().insert(user.clone()),
                            "{user}'s lane is claimed twice at once"
                        );
                        order
                            .lock()
                            .unwrap()
                            .entry(user)
                            .or_default()
                            .push(sequence);
                    }
                    tokio::task::yield_now().await;
                    for delivery in &batch.deliveries {
                        let user = delivery.event.user_id.clone().unwrap_or_default();
                        // Let go before the settle commits: the next of the lane cannot be
                        // claimed before then anyway.
                        held.lock().unwrap().remove(&user);
                        store
                            .settle(delivery, Settle::Delivered { status: 200 }, 10_000)
                            .await?;
                    }
                }
            });
        }
    }
    while let Some(worker) = workers.join_next().await {
        worker??;
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(order.len(), USERS);
    for (user, sequence) in order.iter() {
        assert_eq!(
            sequence,
            &(0..PER_USER).collect::<Vec<_>>(),
            "{user}'s deliveries out of order or repeated"
        );
    }
    for store in &stores {
        store.close().await;
    }
    Ok(())
}

/// Each lane has at most one head and no lane has waiting rows without one, after two relays
/// wrote, claimed, settled and replayed on the same lanes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_on_shared_lanes_keep_one_head_per_lane() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let stores = [database.open().await?, database.open().await?];
    let mut tasks = tokio::task::JoinSet::new();
    for (relay, store) in stores.iter().cloned().enumerate() {
        tasks.spawn(async move {
            for n in 0..40 {
                let events = (0..5)
                    .map(|user| message(&format!("{relay}-{n}-{user}"), &format!("u{user}")))
                    .collect();
                store.enqueue(events, 1_000).await?;
                let batch = store
                    .claim(SinkName::Bot, 3, 2_000, Duration::from_secs(600))
                    .await?;
                for (k, delivery) in batch.deliveries.iter().enumerate() {
                    let settle = if k % 2 == 0 {
                        Settle::Delivered { status: 200 }
                    } else {
                        Settle::Dead {
                            status: Some(400),
                            error: "no".into(),
                            attempted: true,
                        }
                    };
                    store.settle(delivery, settle, 2_000).await?;
                }
                if n % 10 == 9 {
                    store
                        .replay(Default::default(), &[SinkName::Bot], 2_500)
                        .await?;
                }
            }
            Ok::<(), StoreError>(())
        });
    }
    while let Some(task) = tasks.join_next().await {
        task??;
    }
    let client = database.connect().await?;
    let lanes = client
        .query(
            "SELECT lane,
                    COUNT(*) FILTER (WHERE state IN ('pending', 'in_flight')),
                    COUNT(*) FILTER (WHERE state = 'waiting')
             FROM deliveries GROUP BY lane ORDER BY lane",
            &[],
        )
        .await?;
    assert_eq!(lanes.len(), 5);
    for row in lanes {
        let (lane, heads, waiting): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert!(heads <= 1, "{lane} has {heads} heads");
        assert!(
            waiting == 0 || heads == 1,
            "{lane}: {waiting} waiting rows without a head"
        );
    }
    for store in &stores {
        store.close().await;
    }
    Ok(())
}

/// A relay's dispatcher is woken when another relay commits rows for its sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_relays_commit_wakes_this_relays_dispatcher() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let writer = database.open().await?;
    let dispatcher = database.open().await?;
    let notify = dispatcher.wakers().for_sink(SinkName::Bot);
    // The LISTEN connection wakes every sink once it listens: from then on, notifications
    // arrive.
    tokio::time::timeout(Duration::from_secs(10), notify.notified()).await?;
    let woken = notify.notified();
    tokio::pin!(woken);
    woken.as_mut().enable();
    writer.enqueue(vec![message("wake", "u")], 1_000).await?;
    tokio::time::timeout(Duration::from_secs(5), woken).await?;
    writer.close().await;
    dispatcher.close().await;
    Ok(())
}

/// A pause given through one relay holds on another within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_reaches_every_relay_within_a_second() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let a = database.open().await?;
    let b = database.open().await?;
    for paused in [true, false] {
        let started = Instant::now();
        a.set_paused("psid-1", paused, 1).await?;
        while b.is_paused("psid-1") != paused {
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "relay b did not see the change within a second"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!(
            "pause = {paused} reached the other relay in {:?}",
            started.elapsed()
        );
    }
    // A relay that starts later knows the pauses at once.
    a.set_paused("psid-2", true, 2).await?;
    let c = database.open().await?;
    assert!(c.is_paused("psid-2"));
    for store in [a, b, c] {
        store.close().await;
    }
    Ok(())
}

/// Errors name the database without the user's password.
#[tokio::test]
async fn errors_never_show_the_password() -> TestResult {
    for url in [
        "postgres://botrelay:s3cr3t-pw@127.0.0.1:1/relay",
        "postgres://botrelay:s3cr3t-pw@127.0.0.1:1/relay?sslmode=require",
        "postgres://botrelay:s3cr3t-pw@127.0.0.1:1/relay?sslmode=bogus",
    ] {
        let error = match Store::open_postgres(url, 2, Duration::from_secs(30)).await {
            Ok(_) => return Err(format!("{url} opened").into()),
            Err(error) => error.to_string(),
        };
        assert!(!error.contains("s3cr3t"), "{error}");
        assert!(!error.contains("botrelay:"), "{error}");
        println!("{error}");
    }
    Ok(())
}

/// The claim (and the other per-delivery statements) reach their rows through an index, with a
/// million rows waiting behind the lane heads: never a scan of the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_use_the_lane_head_index_with_a_million_rows_queued() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let store = database.open().await?;
    let client = database.connect().await?;
    let rows: i64 = std::env::var("BOTRELAY_TEST_PLAN_ROWS")
        .ok()
        .and_then(|rows| rows.parse().ok())
        .unwrap_or(1_000_000);
    // 1,000 users' lanes: each a head and the rest waiting; a few thousand finished rows.
    client
        .batch_execute(&format!(
            "INSERT INTO deliveries (event_id, sink, lane, state, due_at, created_at, updated_at)
             SELECT 'e' || n, 'bot', 'user-' || (n % 1000),
                    CASE WHEN n < 1000 THEN 'pending'
                         WHEN n < 5000 THEN 'delivered'
                         ELSE 'waiting' END,
                    n, n, n
             FROM generate_series(0, {rows}) AS n;
             ANALYZE deliveries;"
        ))
        .await?;
    let mut plans = Vec::new();
    for (name, sql, types) in [
        ("claim", CLAIM, "text, int8, int8, int8, text"),
        ("next due", NEXT_DUE, "text"),
        ("promote", PROMOTE, "text, text, int8"),
        ("purge delivered", PURGE_DELIVERED, "int8, int8"),
        ("purge dead", PURGE_DEAD, "int8, int8"),
        ("purge events", PURGE_EVENTS, "int8, int8"),
    ] {
        let arguments = match name {
            "claim" => "'bot', 500000, 530000, 32, 'cut off'",
            "next due" => "'bot'",
            "promote" => "'bot', 'user-7', 1",
            _ => "3000, 2000",
        };
        // The plan a prepared statement gets after a few runs (generic), and the first ones.
        for mode in ["force_generic_plan", "force_custom_plan"] {
            client
                .batch_execute(&format!(
                    "SET plan_cache_mode = {mode}; DEALLOCATE ALL; PREPARE q ({types}) AS {sql}"
                ))
                .await?;
            let plan: Vec<String> = client
                .query(&format!("EXPLAIN EXECUTE q ({arguments})"), &[])
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let plan = plan.join("\n");
            assert!(
                !plan.contains("Seq Scan on deliveries"),
                "{name} ({mode}) scans the deliveries:\n{plan}"
            );
            assert!(
                plan.contains("Index"),
                "{name} ({mode}) uses no index:\n{plan}"
            );
            plans.push(format!("-- {name} ({mode})\n{plan}"));
        }
    }
    println!("{}", plans.join("\n"));
    // And it is fast: a claim of 32 heads among a million rows.
    let started = Instant::now();
    let batch = store
        .claim(SinkName::Bot, 32, 500_000, Duration::from_secs(30))
        .await?;
    println!(
        "claimed {} in {:?}",
        batch.deliveries.len(),
        started.elapsed()
    );
    store.close().await;
    Ok(())
}
