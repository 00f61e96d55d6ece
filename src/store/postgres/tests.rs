//! Tests of the PostgreSQL store against a real server: the store contract on a fresh database
//! each, several stores (relays) on one database, query plans, and errors without secrets.
//!
//! `BOTRELAY_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) is
//! where each test creates its own `botrelay_test_<random>` database, dropped afterwards. With
//! no server there, a test prints `skipping: no PostgreSQL at …` and passes, unless
//! `BOTRELAY_REQUIRE_POSTGRES=1`, when it fails.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use super::queries::{CLAIM, NEXT_DUE};
use super::settle::BEGIN_BY_INDEX;
use super::settle::{SettleJob, Settled};
use super::write::{
    PROMOTE, PROMOTE_MANY, PURGE_DEAD, PURGE_DELIVERED, PURGE_EVENTS, RECORD_DELIVERED_MANY,
};
use crate::clock::Millis;
use crate::event::{Event, EventData, EventId, EventKind, Source};
use crate::sink_name::SinkName;
use crate::store::contract::{self, TestResult};
use crate::store::{Claimed, NewEvent, Retention, Settle, Store, StoreError};
use std::collections::{BTreeMap, HashMap, HashSet};
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
        TestDatabase::create_with("").await
    }

    /// A fresh database created with `options` (what follows `CREATE DATABASE name`).
    pub(crate) async fn create_with(
        options: &str,
    ) -> Result<Option<TestDatabase>, Box<dyn std::error::Error + Send + Sync>> {
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
            .batch_execute(&format!("CREATE DATABASE {name} {options}"))
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

/// A session the server ends (a failover, `pg_terminate_backend`, an idle-session timeout)
/// fails with an ordinary error that carries a SQLSTATE; it counts as a lost connection, so a
/// failed batch is not written job by job over a connection that is gone. A refused value
/// does not.
#[tokio::test]
async fn a_session_the_server_ends_is_a_lost_connection() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let client = database.connect().await?;
    let refused = client
        .query_one("SELECT 1 / $1::int4", &[&0i32])
        .await
        .err()
        .ok_or("1 / 0 was answered")?;
    assert!(!super::batch::connection_lost(&refused.into()));
    let ended = client
        .query_one("SELECT pg_terminate_backend(pg_backend_pid())", &[])
        .await
        .err()
        .ok_or("the session was not ended")?;
    // What makes it easy to miss: an error from the server, with a code, on a client that
    // does not call itself closed.
    assert_eq!(ended.code().map(|code| code.code()), Some("57P01"));
    assert!(!ended.is_closed());
    assert!(super::batch::connection_lost(&ended.into()));
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
        ("promote lanes", PROMOTE_MANY, "text[], text[], int8[]"),
        (
            "record deliveries",
            RECORD_DELIVERED_MANY,
            "int8[], int8[], int4[], int8[]",
        ),
        ("purge delivered", PURGE_DELIVERED, "int8, int8"),
        ("purge dead", PURGE_DEAD, "int8, int8"),
        ("purge events", PURGE_EVENTS, "int8, int8"),
    ] {
        let arguments = match name {
            "claim" => "'bot', 500000, 530000, 32, 'cut off'",
            "next due" => "'bot'",
            "promote" => "'bot', 'user-7', 1",
            "promote lanes" => "ARRAY['bot', 'bot'], ARRAY['user-7', 'user-8'], ARRAY[1, 1]",
            "record deliveries" => "ARRAY[7, 8], ARRAY[1, 1], ARRAY[200, 200], ARRAY[7, 8]",
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

/// An event named `name` (its page id) of `user`, for `sinks`.
fn message_for(name: &str, user: &str, sinks: &[SinkName]) -> NewEvent {
    NewEvent {
        sinks: sinks.to_vec(),
        ..message(name, user)
    }
}

fn name_of(claimed: &Claimed) -> String {
    claimed.event.page_id.clone().unwrap_or_default()
}

/// The PostgreSQL store behind a store handle.
fn postgres(store: &Store) -> &super::PostgresStore {
    match &store.backend {
        crate::store::Backend::Postgres(store) => store,
        _ => panic!("not a PostgreSQL store"),
    }
}

/// Settles as `Store::settle` does (through the settle batcher), and says what the batcher made
/// of the outcome: recorded, or stale.
async fn settle_and_tell(
    store: &Store,
    claimed: &Claimed,
    settle: Settle,
    now: Millis,
) -> Result<Settled, StoreError> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    let job = SettleJob {
        id: claimed.id,
        sink: claimed.sink,
        lane: claimed.event.user_id.clone(),
        lease_until: claimed.lease_until,
        settle,
        now,
        answer,
    };
    postgres(store)
        .inner
        .settles
        .send(job)
        .await
        .map_err(|_| StoreError::Unavailable)?;
    answered.await.map_err(|_| StoreError::Unavailable)?
}

/// A delivery row as these tests look at it.
#[derive(Debug, Clone)]
struct Row {
    sink: String,
    lane: Option<String>,
    /// The event's name (its page id).
    name: String,
    state: String,
    due_at: i64,
    last_status: Option<i32>,
    last_error: Option<String>,
    /// The transaction that wrote this version of the row.
    xmin: i64,
}

/// Every delivery row, in id order (the order of receipt).
async fn delivery_rows(
    client: &tokio_postgres::Client,
) -> Result<Vec<Row>, Box<dyn std::error::Error + Send + Sync>> {
    Ok(client
        .query(
            "SELECT d.sink, d.lane, e.page_id, d.state, d.due_at, d.last_status, d.last_error,
                    d.xmin::text::int8
             FROM deliveries d JOIN events e ON e.id = d.event_id ORDER BY d.id",
            &[],
        )
        .await?
        .iter()
        .map(|row| Row {
            sink: row.get(0),
            lane: row.get(1),
            name: row.get(2),
            state: row.get(3),
            due_at: row.get(4),
            last_status: row.get(5),
            last_error: row.get(6),
            xmin: row.get(7),
        })
        .collect())
}

/// The rows by event name (for tests with one sink).
async fn rows_by_name(
    client: &tokio_postgres::Client,
) -> Result<HashMap<String, Row>, Box<dyn std::error::Error + Send + Sync>> {
    Ok(delivery_rows(client)
        .await?
        .into_iter()
        .map(|row| (row.name.clone(), row))
        .collect())
}

/// Each lane of one sink: its events' names in id order, with their states.
fn lanes_of(rows: &[Row]) -> BTreeMap<(String, String), Vec<(String, String)>> {
    let mut lanes: BTreeMap<(String, String), Vec<(String, String)>> = BTreeMap::new();
    for row in rows {
        if let Some(lane) = &row.lane {
            lanes
                .entry((row.sink.clone(), lane.clone()))
                .or_default()
                .push((row.name.clone(), row.state.clone()));
        }
    }
    lanes
}

/// Claims and delivers everything due at `now`, round by round (a round settles all its
/// claims at once); each lane's names in the order they were claimed.
async fn drain(
    store: &Store,
    now: Millis,
) -> Result<BTreeMap<String, Vec<String>>, Box<dyn std::error::Error + Send + Sync>> {
    let mut claimed_order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut claimed = Vec::new();
        for sink in [SinkName::Bot, SinkName::Dashbot] {
            claimed.extend(
                store
                    .claim(sink, 1000, now, Duration::from_secs(600))
                    .await?
                    .deliveries,
            );
        }
        if claimed.is_empty() {
            return Ok(claimed_order);
        }
        assert!(Instant::now() < deadline, "the lanes did not drain");
        for delivery in &claimed {
            let lane = format!(
                "{}:{}",
                delivery.sink.as_str(),
                delivery.event.user_id.clone().unwrap_or_default()
            );
            claimed_order
                .entry(lane)
                .or_default()
                .push(name_of(delivery));
        }
        let settles = claimed
            .iter()
            .map(|delivery| store.settle(delivery, Settle::Delivered { status: 200 }, now));
        for settled in futures_util::future::join_all(settles).await {
            settled?;
        }
    }
}

/// One settle batch with every kind of outcome, one of them stale (its claim's lease ran out
/// and another claim took the row): the stale one is not recorded, the others are, all in ONE
/// transaction, and each lane whose head is done lets exactly its next delivery go, once, even
/// where a stale and a current outcome of the same row share the batch (also when both are
/// deliveries, which one statement records together).
#[tokio::test]
async fn one_settle_batch_records_mixed_outcomes_but_not_a_stale_one() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let store = database.open().await?;
    let client = database.connect().await?;
    const T0: Millis = 1_000_000_000;
    const LEASE: Duration = Duration::from_secs(10);
    let mut lanes: Vec<String> = [
        "delivered",
        "retried",
        "dead",
        "skipped",
        "stale",
        "lost",
        "twice",
    ]
    .map(str::to_owned)
    .to_vec();
    lanes.extend((0..20).map(|n| format!("more-{n}")));
    let events = lanes
        .iter()
        .flat_map(|lane| (1..=3).map(move |n| message(&format!("{lane}/{n}"), lane)))
        .collect();
    store.enqueue(events, T0).await?;
    let mut first = store.claim(SinkName::Bot, 100, T0, LEASE).await?.deliveries;
    assert_eq!(first.len(), lanes.len());
    // Every first claim but those of "stale", "lost" and "twice" outlives the second claim
    // below.
    for claimed in &mut first {
        if !matches!(name_of(claimed).as_str(), "stale/1" | "lost/1" | "twice/1") {
            assert!(
                store
                    .renew(claimed, T0 + 5_000, Duration::from_secs(60))
                    .await?
            );
        }
    }
    // The first claims of "stale/1", "lost/1" and "twice/1" ran out; another one (another
    // relay's) takes them.
    let second = store
        .claim(SinkName::Bot, 100, T0 + 20_000, LEASE)
        .await?
        .deliveries;
    let mut taken: Vec<String> = second.iter().map(name_of).collect();
    taken.sort();
    assert_eq!(taken, ["lost/1", "stale/1", "twice/1"]);
    let find = |batch: &[Claimed], name: &str| {
        batch
            .iter()
            .find(|claimed| name_of(claimed) == name)
            .cloned()
            .unwrap()
    };
    let now = T0 + 21_000;
    let retry_at = T0 + 50_000;
    let mut outcomes = vec![
        (
            find(&first, "delivered/1"),
            Settle::Delivered { status: 200 },
            Settled::Done,
        ),
        // The stale outcome of "stale/1" first, its current one later in the same batch.
        (
            find(&first, "stale/1"),
            Settle::Dead {
                status: Some(500),
                error: "too late".into(),
                attempted: true,
            },
            Settled::Stale,
        ),
        (
            find(&first, "retried/1"),
            Settle::Retry {
                due_at: retry_at,
                counted: true,
                status: Some(503),
                error: "busy".into(),
            },
            Settled::Retried,
        ),
        (
            find(&first, "dead/1"),
            Settle::Dead {
                status: Some(400),
                error: "bad request".into(),
                attempted: true,
            },
            Settled::Done,
        ),
        (
            find(&first, "skipped/1"),
            Settle::Skipped {
                reason: "paused".into(),
            },
            Settled::Done,
        ),
        (
            find(&second, "stale/1"),
            Settle::Delivered { status: 201 },
            Settled::Done,
        ),
        // Two deliveries of one row: the stale claim's first, then the current one's.
        (
            find(&first, "twice/1"),
            Settle::Delivered { status: 200 },
            Settled::Stale,
        ),
        (
            find(&second, "twice/1"),
            Settle::Delivered { status: 202 },
            Settled::Done,
        ),
        // Stale, and the claim that took the row has no outcome yet.
        (
            find(&first, "lost/1"),
            Settle::Delivered { status: 200 },
            Settled::Stale,
        ),
    ];
    for n in 0..20 {
        outcomes.push((
            find(&first, &format!("more-{n}/1")),
            Settle::Delivered { status: 200 },
            Settled::Done,
        ));
    }
    // All issued at once: each is in the batcher's queue before it next runs (this runtime has
    // one thread), so they are one batch; the rows' xmin below shows that they were.
    let answers = futures_util::future::join_all(
        outcomes
            .iter()
            .map(|(claimed, settle, _)| settle_and_tell(&store, claimed, settle.clone(), now)),
    )
    .await;
    for ((claimed, _, expected), answer) in outcomes.iter().zip(answers) {
        assert_eq!(answer?, *expected, "the outcome of {}", name_of(claimed));
    }

    let rows = rows_by_name(&client).await?;
    let row = |name: &str| rows.get(name).cloned().unwrap();
    // The recorded outcomes and the promotions: one transaction.
    let mut written: Vec<&str> = vec![
        "delivered/1",
        "delivered/2",
        "retried/1",
        "dead/1",
        "dead/2",
        "skipped/1",
        "skipped/2",
        "stale/1",
        "stale/2",
        "twice/1",
        "twice/2",
    ];
    let more: Vec<String> = (0..20)
        .flat_map(|n| [format!("more-{n}/1"), format!("more-{n}/2")])
        .collect();
    written.extend(more.iter().map(String::as_str));
    let transactions: HashSet<i64> = written.iter().map(|name| row(name).xmin).collect();
    assert_eq!(
        transactions.len(),
        1,
        "the outcomes were recorded in several transactions"
    );
    assert!(!transactions.contains(&row("lost/1").xmin));

    let states = |lane: &str| -> Vec<String> {
        (1..=3).map(|n| row(&format!("{lane}/{n}")).state).collect()
    };
    assert_eq!(states("delivered"), ["delivered", "pending", "waiting"]);
    assert_eq!(row("delivered/1").last_status, Some(200));
    assert_eq!(states("retried"), ["pending", "waiting", "waiting"]);
    assert_eq!(row("retried/1").due_at, retry_at);
    assert_eq!(row("retried/1").last_status, Some(503));
    assert_eq!(row("retried/1").last_error.as_deref(), Some("busy"));
    assert_eq!(states("dead"), ["dead", "pending", "waiting"]);
    assert_eq!(row("dead/1").last_error.as_deref(), Some("bad request"));
    assert_eq!(states("skipped"), ["skipped", "pending", "waiting"]);
    // The current claim's outcome, not the stale one's.
    assert_eq!(states("stale"), ["delivered", "pending", "waiting"]);
    assert_eq!(row("stale/1").last_status, Some(201));
    assert_eq!(row("stale/1").last_error, None);
    assert_eq!(states("twice"), ["delivered", "pending", "waiting"]);
    assert_eq!(row("twice/1").last_status, Some(202));
    // Still the second claim's, under its lease.
    assert_eq!(states("lost"), ["in_flight", "waiting", "waiting"]);
    assert_eq!(row("lost/1").due_at, T0 + 20_000 + 10_000);
    assert_eq!(row("lost/1").last_status, None);
    for n in 0..20 {
        assert_eq!(
            states(&format!("more-{n}")),
            ["delivered", "pending", "waiting"]
        );
    }
    for name in ["delivered/2", "dead/2", "skipped/2", "stale/2", "more-7/2"] {
        assert_eq!(
            row(name).due_at,
            now,
            "{name} is due when its lane moved on"
        );
    }

    // From here each lane goes on in order, once each.
    let order = drain(&store, T0 + 60_000).await?;
    let expected = |lane: &str, from: usize| -> Vec<String> {
        (from..=3).map(|n| format!("{lane}/{n}")).collect()
    };
    for lane in &lanes {
        let from = if matches!(lane.as_str(), "retried" | "lost") {
            1
        } else {
            2
        };
        assert_eq!(
            order.get(&format!("bot:{lane}")),
            Some(&expected(lane, from)),
            "{lane}"
        );
    }
    store.close().await;
    Ok(())
}

/// The settle batch's statements keep their index plans when PostgreSQL cached a plan while
/// `deliveries` was small (a new database, before its first ANALYZE) and the table then grew:
/// such a plan, made for a few rows, hashed the whole table on every batch.
#[tokio::test]
async fn settle_statements_keep_index_plans_cached_while_the_table_was_small() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let store = database.open().await?;
    let client = database.connect().await?;
    let rows = |from: i64, to: i64| {
        format!(
            "INSERT INTO deliveries (event_id, sink, lane, state, due_at, created_at, updated_at)
             SELECT 'e' || n, 'bot', 'user-' || (n % 1000),
                    CASE WHEN n < 1000 AND n % 7 = 0 THEN 'in_flight'
                         WHEN n % 3 = 0 THEN 'waiting'
                         ELSE 'delivered' END, n, n, n
             FROM generate_series({from}, {to}) AS n"
        )
    };
    for (name, sql, types, arguments) in [
        (
            "record deliveries",
            RECORD_DELIVERED_MANY,
            "int8[], int8[], int4[], int8[]",
            "ARRAY[7, 14], ARRAY[1, 1], ARRAY[200, 200], ARRAY[7, 14]",
        ),
        (
            "promote lanes",
            PROMOTE_MANY,
            "text[], text[], int8[]",
            "ARRAY['bot', 'bot'], ARRAY['user-7', 'user-8'], ARRAY[1, 1]",
        ),
    ] {
        client
            .batch_execute(&format!(
                "{BEGIN_BY_INDEX}; {}; PREPARE q ({types}) AS {sql}",
                rows(0, 50)
            ))
            .await?;
        // Enough runs on the small table for a generic plan to be cached, then a table that
        // grew without an ANALYZE.
        for _ in 0..8 {
            client
                .batch_execute(&format!("EXECUTE q ({arguments})"))
                .await?;
        }
        client.batch_execute(&rows(51, 200_000)).await?;
        let plan: Vec<String> = client
            .query(&format!("EXPLAIN EXECUTE q ({arguments})"), &[])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        client.batch_execute("ROLLBACK; DEALLOCATE ALL").await?;
        let plan = plan.join("\n");
        assert!(
            !plan.contains("Seq Scan on deliveries") && !plan.contains("Hash"),
            "{name} scans or hashes the deliveries:\n{plan}"
        );
        assert!(plan.contains("Index"), "{name} uses no index:\n{plan}");
    }
    store.close().await;
    Ok(())
}

/// What `tracing` writes on this thread, kept to be read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// An outcome the database refuses (a character a LATIN1 database cannot hold, in the error
/// the sink answered) fails alone: the batch it was in falls back to one outcome at a time,
/// and the others of the batch are recorded, and their lanes move on.
#[tokio::test]
async fn an_outcome_the_database_refuses_does_not_fail_the_rest_of_its_batch() -> TestResult {
    let Some(database) = TestDatabase::create_with(
        "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    )
    .await?
    else {
        return Ok(());
    };
    // The batcher runs on this thread (one-threaded runtime): what it logs is captured here.
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer({
            let captured = captured.clone();
            move || captured.clone()
        })
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);
    let store = database.open().await?;
    let client = database.connect().await?;
    const T0: Millis = 1_000_000_000;
    let lanes = ["delivered", "retried", "refused", "dead", "more"];
    let events = lanes
        .iter()
        .flat_map(|lane| (1..=2).map(move |n| message(&format!("{lane}/{n}"), lane)))
        .collect();
    store.enqueue(events, T0).await?;
    let claimed = store
        .claim(SinkName::Bot, 100, T0, Duration::from_secs(10))
        .await?
        .deliveries;
    assert_eq!(claimed.len(), lanes.len());
    let now = T0 + 1_000;
    let outcome = |claimed: &Claimed| match claimed.event.user_id.as_deref() {
        Some("retried") => Settle::Retry {
            due_at: T0 + 5_000,
            counted: true,
            status: Some(503),
            error: "busy".into(),
        },
        Some("refused") => Settle::Dead {
            status: Some(400),
            error: "HTTP 400: \u{1f6ab} not allowed".into(),
            attempted: true,
        },
        Some("dead") => Settle::Dead {
            status: Some(410),
            error: "HTTP 410: gone".into(),
            attempted: true,
        },
        _ => Settle::Delivered { status: 200 },
    };
    // All at once: one batch (see the mixed batch test), which the database refuses.
    let answers = futures_util::future::join_all(
        claimed
            .iter()
            .map(|delivery| settle_and_tell(&store, delivery, outcome(delivery), now)),
    )
    .await;
    for (delivery, answer) in claimed.iter().zip(answers) {
        match (name_of(delivery).as_str(), answer) {
            ("refused/1", Err(StoreError::Database(error))) => {
                assert!(error.contains("LATIN1"), "{error}")
            }
            ("refused/1", other) => panic!("the refused outcome was answered {other:?}"),
            ("retried/1", answer) => assert_eq!(answer?, Settled::Retried),
            (_, answer) => assert_eq!(answer?, Settled::Done),
        }
    }
    let logged = captured.text();
    assert_eq!(
        logged
            .matches("A settle batch failed; writing its jobs one by one")
            .count(),
        1,
        "the outcomes were not one batch that fell back:\n{logged}"
    );

    let rows = rows_by_name(&client).await?;
    let state = |name: &str| rows.get(name).map(|row| row.state.clone()).unwrap();
    assert_eq!(
        lanes.map(|lane| [state(&format!("{lane}/1")), state(&format!("{lane}/2"))]),
        [
            ["delivered", "pending"],
            ["pending", "waiting"],
            // Still under its claim: it is tried again when the lease runs out.
            ["in_flight", "waiting"],
            ["dead", "pending"],
            ["delivered", "pending"],
        ]
        .map(|pair| pair.map(str::to_owned))
    );
    assert_eq!(
        rows.get("dead/1")
            .and_then(|row| row.last_error.clone())
            .as_deref(),
        Some("HTTP 410: gone")
    );
    // And the settle connection works on.
    let next = store
        .claim(SinkName::Bot, 100, now, Duration::from_secs(10))
        .await?
        .deliveries;
    for delivery in &next {
        store
            .settle(delivery, Settle::Delivered { status: 200 }, now)
            .await?;
    }
    assert_eq!(next.len(), 3);
    store.close().await;
    Ok(())
}

/// Many enqueues at once for the same lanes, from two relays on one database, each relay's
/// issued all at once round after round: each relay's events keep their order of receipt in
/// every lane, each lane has exactly one head (its first delivery) and the rest wait, and an
/// event both relays received is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueues_of_two_relays_keep_each_lanes_order_and_one_head() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let relays = [database.open().await?, database.open().await?];
    const ROUNDS: usize = 4;
    const PER_ROUND: usize = 12;
    const SINKS: [SinkName; 2] = [SinkName::Bot, SinkName::Dashbot];
    const USERS: [&str; 2] = ["u", "v"];
    let write = |store: Store, relay: &'static str| async move {
        let mut reports = Vec::new();
        for round in 0..ROUNDS {
            // The calls of a round are issued together (`join_all` polls them in order: that
            // is the order they reach the store).
            let mut calls = Vec::new();
            for k in 0..PER_ROUND {
                let seq = round * PER_ROUND + k;
                let events = USERS
                    .iter()
                    .map(|user| message_for(&format!("{relay}/{seq}/{user}"), user, &SINKS))
                    .collect();
                calls.push(store.enqueue(events, 1_000 + seq as Millis));
                if round == 1 && k == PER_ROUND / 2 {
                    calls.push(store.enqueue(vec![message_for("dup", "u", &SINKS)], 2_000));
                }
            }
            for report in futures_util::future::join_all(calls).await {
                reports.push(report?);
            }
        }
        Ok::<_, StoreError>(reports)
    };
    let (a, b) = tokio::join!(write(relays[0].clone(), "a"), write(relays[1].clone(), "b"));
    let reports: Vec<_> = a?.into_iter().chain(b?).collect();
    let per_relay = ROUNDS * PER_ROUND * USERS.len();
    assert_eq!(
        reports.iter().map(|report| report.stored).sum::<usize>(),
        2 * per_relay + 1
    );
    assert_eq!(
        reports
            .iter()
            .map(|report| report.duplicates)
            .sum::<usize>(),
        1
    );
    let client = database.connect().await?;
    let events: i64 = client
        .query_one("SELECT COUNT(*) FROM events", &[])
        .await?
        .get(0);
    assert_eq!(events, (2 * per_relay + 1) as i64);
    let dups: i64 = client
        .query_one("SELECT COUNT(*) FROM events WHERE page_id = 'dup'", &[])
        .await?
        .get(0);
    assert_eq!(dups, 1);

    let rows = delivery_rows(&client).await?;
    // The calls were batched: fewer transactions than calls.
    let transactions: HashSet<i64> = rows.iter().map(|row| row.xmin).collect();
    assert!(
        transactions.len() < reports.len(),
        "{} transactions for {} calls",
        transactions.len(),
        reports.len()
    );
    println!(
        "{} calls in {} transactions",
        reports.len(),
        transactions.len()
    );
    let lanes = lanes_of(&rows);
    assert_eq!(lanes.len(), SINKS.len() * USERS.len());
    for ((sink, user), lane) in &lanes {
        let states: Vec<&str> = lane.iter().map(|(_, state)| state.as_str()).collect();
        assert_eq!(
            states[0], "pending",
            "{sink}:{user}: the first is not the head"
        );
        assert!(
            states[1..].iter().all(|state| *state == "waiting"),
            "{sink}:{user}: more than one head: {states:?}"
        );
        for relay in ["a", "b"] {
            let order: Vec<usize> = lane
                .iter()
                .filter_map(|(name, _)| name.strip_prefix(&format!("{relay}/")))
                .map(|rest| rest.split('/').next().unwrap().parse().unwrap())
                .collect();
            assert_eq!(
                order,
                (0..ROUNDS * PER_ROUND).collect::<Vec<_>>(),
                "{sink}:{user}: relay {relay}'s events out of order"
            );
        }
        let dup = lane.iter().filter(|(name, _)| name == "dup").count();
        assert_eq!(dup, usize::from(user == "u"), "{sink}:{user}");
    }
    // Delivered in that order, one at a time per lane.
    let order = drain(&relays[0], 10_000).await?;
    for ((sink, user), lane) in &lanes {
        let names: Vec<String> = lane.iter().map(|(name, _)| name.clone()).collect();
        assert_eq!(order.get(&format!("{sink}:{user}")), Some(&names));
    }
    for store in &relays {
        store.close().await;
    }
    Ok(())
}

/// `touched_at` is refreshed at most once a minute, yet the purge still removes exactly the
/// lanes that are idle (nothing queued nor in flight) and untouched since the dedupe window
/// began, keeps every lane with work, however old its `touched_at`, and a purged lane works
/// again at its next event.
#[tokio::test]
async fn throttled_touches_keep_the_purge_of_idle_lanes_right() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let store = database.open().await?;
    let client = database.connect().await?;
    const T0: Millis = 1_000_000_000;
    const LEASE: Duration = Duration::from_secs(600);
    let touched = || async {
        let rows = client
            .query("SELECT lane, touched_at FROM lanes ORDER BY lane", &[])
            .await?;
        Ok::<_, tokio_postgres::Error>(
            rows.iter()
                .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1)))
                .collect::<Vec<_>>(),
        )
    };
    store
        .enqueue(
            vec![
                message("idle/1", "idle"),
                message("busy/1", "busy"),
                message("busy/2", "busy"),
                message("due/1", "due"),
                message("recent/1", "recent"),
            ],
            T0,
        )
        .await?;
    // Within the minute: the lane is locked, its row not rewritten.
    store
        .enqueue(vec![message("idle/2", "idle")], T0 + 30_000)
        .await?;
    let claimed = store
        .claim(SinkName::Bot, 100, T0 + 31_000, LEASE)
        .await?
        .deliveries;
    assert_eq!(claimed.len(), 4);
    for delivery in &claimed {
        let outcome = match name_of(delivery).as_str() {
            "idle/1" => Settle::Delivered { status: 200 },
            // Pending, far ahead: a head that is not in flight (and a retry locks no lane).
            "due/1" => Settle::Retry {
                due_at: T0 + 10 * 86_400_000,
                counted: true,
                status: Some(503),
                error: "busy".into(),
            },
            // In flight, with a delivery waiting behind it.
            "busy/1" => continue,
            // More than a minute later: the lane's row is rewritten.
            "recent/1" => {
                store
                    .settle(delivery, Settle::Delivered { status: 200 }, T0 + 90_000)
                    .await?;
                continue;
            }
            other => panic!("{other} claimed"),
        };
        store.settle(delivery, outcome, T0 + 32_000).await?;
    }
    let next = store
        .claim(SinkName::Bot, 100, T0 + 33_000, LEASE)
        .await?
        .deliveries;
    assert_eq!(next.iter().map(name_of).collect::<Vec<_>>(), ["idle/2"]);
    store
        .settle(&next[0], Settle::Delivered { status: 200 }, T0 + 34_000)
        .await?;
    assert_eq!(
        touched().await?,
        [
            ("busy".to_owned(), T0),
            ("due".to_owned(), T0),
            ("idle".to_owned(), T0),
            ("recent".to_owned(), T0 + 90_000),
        ]
    );
    // The dedupe window began at T0 + 60 s: "idle" was last written at T0 + 34 s (its row
    // says T0) and is idle; "busy" and "due" are older still but have work; "recent" was
    // touched after.
    let retention = Retention {
        delivered: Duration::from_secs(86_400),
        dead: Duration::from_secs(86_400),
        dedupe_window: Duration::from_secs(40),
    };
    store.purge(retention, T0 + 100_000).await?;
    assert_eq!(
        touched().await?,
        [
            ("busy".to_owned(), T0),
            ("due".to_owned(), T0),
            ("recent".to_owned(), T0 + 90_000),
        ]
    );
    // The purged lane comes back with its next event, which heads it; the kept ones go on.
    store
        .enqueue(vec![message("idle/3", "idle")], T0 + 110_000)
        .await?;
    let busy = claimed
        .iter()
        .find(|delivery| name_of(delivery) == "busy/1")
        .unwrap();
    store
        .settle(busy, Settle::Delivered { status: 200 }, T0 + 111_000)
        .await?;
    let rows = rows_by_name(&client).await?;
    let state = |name: &str| rows.get(name).map(|row| row.state.as_str()).unwrap();
    assert_eq!(state("idle/3"), "pending");
    assert_eq!(state("busy/2"), "pending");
    assert_eq!(state("due/1"), "pending");
    assert!(
        touched()
            .await?
            .contains(&("idle".to_owned(), T0 + 110_000))
    );
    // Once everything is done and old, every lane goes.
    let order = drain(&store, T0 + 11 * 86_400_000).await?;
    assert_eq!(order.values().map(Vec::len).sum::<usize>(), 3);
    store.purge(retention, T0 + 12 * 86_400_000).await?;
    assert_eq!(touched().await?, []);
    store.close().await;
    Ok(())
}

/// In one enqueue batch, a lane's first event may be one the store already knows (not stored
/// again): the lane's first NEW delivery still heads it when it has no head, and one batch's
/// duplicate of its own event is stored once.
#[tokio::test]
async fn an_enqueue_batch_heads_a_lane_whose_first_event_is_a_duplicate() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let store = database.open().await?;
    let client = database.connect().await?;
    store.enqueue(vec![message("old", "u")], 1_000).await?;
    let claimed = store
        .claim(SinkName::Bot, 10, 1_000, Duration::from_secs(60))
        .await?
        .deliveries;
    store
        .settle(&claimed[0], Settle::Delivered { status: 200 }, 1_001)
        .await?;
    // The lane has no head now. One batch (issued at once, on this one-threaded runtime): the
    // known event first, then two new ones, the second of them twice.
    let calls = [
        vec![message("old", "u")],
        vec![message("new-1", "u")],
        vec![message("new-2", "u"), message("new-2", "u")],
    ]
    .map(|events| store.enqueue(events, 2_000));
    let reports = futures_util::future::join_all(calls).await;
    let reports: Vec<(usize, usize)> = reports
        .into_iter()
        .map(|report| report.map(|report| (report.stored, report.duplicates)))
        .collect::<Result<_, _>>()?;
    assert_eq!(reports, [(0, 1), (1, 0), (1, 1)]);
    let rows = rows_by_name(&client).await?;
    assert_eq!(rows.len(), 3);
    let row = |name: &str| rows.get(name).cloned().unwrap();
    assert_eq!(row("new-1").xmin, row("new-2").xmin, "not one batch");
    assert_eq!(
        ["old", "new-1", "new-2"].map(|name| row(name).state),
        ["delivered", "pending", "waiting"]
    );
    store.close().await;
    Ok(())
}

/// A relay opens the connections its writes use, with their statements prepared, before it
/// takes its first request: the first batches after a start pay neither.
#[tokio::test]
async fn the_store_opens_its_write_connections_with_their_statements_prepared() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let store = database.open().await?;
    let inner = &postgres(&store).inner;
    for (pool, statements, connections) in [
        (&inner.batcher_pool, super::enqueue::STATEMENTS.len(), 1),
        (&inner.settle_pool, super::settle::STATEMENTS.len(), 1),
        (
            &inner.pool,
            super::write::CLAIM_STATEMENTS.len(),
            super::WARM_CONNECTIONS,
        ),
    ] {
        assert_eq!(pool.status().size, connections);
        let client = pool.get().await?;
        assert_eq!(client.statement_cache.size(), statements);
    }
    store.close().await;
    Ok(())
}

/// A relay's own work notifications do not wake it a second time (its commit woke it); another
/// relay's do, and so do those of a relay that does not mark them (an earlier version).
#[test]
fn a_relay_skips_its_own_work_notifications() {
    let sinks = [SinkName::Bot, SinkName::Kochava].into_iter().collect();
    let payload = super::enqueue::work_payload(&sinks, "0123abcd");
    assert_eq!(super::enqueue::foreign_work(&payload, "0123abcd"), None);
    assert_eq!(
        super::enqueue::foreign_work(&payload, "ffff0000"),
        Some(vec![SinkName::Bot, SinkName::Kochava])
    );
    assert_eq!(
        super::enqueue::foreign_work("bot,kochava", "0123abcd"),
        Some(vec![SinkName::Bot, SinkName::Kochava])
    );
    // What a relay of an earlier version makes of the marked payload: the sinks, the mark
    // skipped like a sink it does not know.
    let earlier: Vec<SinkName> = payload.split(',').filter_map(SinkName::parse).collect();
    assert_eq!(earlier, vec![SinkName::Bot, SinkName::Kochava]);
    let none = std::collections::BTreeSet::new();
    assert_eq!(
        super::enqueue::foreign_work(&super::enqueue::work_payload(&none, "x"), "y"),
        Some(vec![])
    );
}

/// A claim and its read of the next due time go in one round trip: the read runs after the
/// claim committed, so it sees the leases the claim just took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_claim_reports_the_next_due_time_after_its_own_leases() -> TestResult {
    let Some(database) = TestDatabase::create().await? else {
        return Ok(());
    };
    let store = database.open().await?;
    store
        .enqueue(vec![message("a", "u1"), message("b", "u2")], 1_000)
        .await?;
    let lease = Duration::from_secs(30);
    let batch = store.claim(SinkName::Bot, 1, 2_000, lease).await?;
    assert_eq!(batch.deliveries.len(), 1);
    // The other head is due now (1,000), not the lease just taken (32,000).
    assert_eq!(batch.next_due, Some(1_000));
    let batch = store.claim(SinkName::Bot, 1, 2_000, lease).await?;
    assert_eq!(batch.deliveries.len(), 1);
    // Both leased: the next due time is the first lease's end.
    assert_eq!(batch.next_due, Some(32_000));
    store.close().await;
    Ok(())
}
