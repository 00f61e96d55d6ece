//! The store set-ups side by side, in one run on one machine, so that their ratios mean
//! something however busy the machine is: the embedded SQLite store, one relay on PostgreSQL,
//! and two relays on one PostgreSQL database (two relays in this process, each with its own
//! store handle and connection pool, the same database). The same load generators as the
//! `ingest` and `fanout` benchmarks, against each set-up in turn:
//!
//! 1. ingest: signed webhooks, closed loop (64 connections), requests/s and latency; the bot
//!    is enabled but parked, so every event gets its delivery row and nothing is delivered;
//! 2. fan-out: a backlog of queued deliveries (1,000 users) drained to a local bot that answers
//!    at once: deliveries/s (claim, sign, POST, settle), over at most one phase;
//! 3. ack latency at 2,000 webhooks/s, open loop (from each request's scheduled time): with
//!    the bot parked (ingest alone, as in the `ingest` benchmark), and while the relays deliver
//!    to a bot that answers at once. The PostgreSQL target is p99 < 20 ms.
//!
//! Each set-up gets a fresh store (a new database on PostgreSQL, dropped afterwards).
//!
//! Run: `cargo bench --bench postgres`. The server is `BOTRELAY_BENCH_DATABASE_URL`, else
//! `BOTRELAY_TEST_DATABASE_URL`, else `postgres://postgres@127.0.0.1:5432/postgres` (a user that
//! may create databases); without one answering it prints one line and exits 0.
//! `BENCH_SECONDS` (default and at most 5) is the length of each phase, `BENCH_EVENTS` (default
//! 20000) the fan-out backlog. The whole run takes about a minute and a half.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use botrelay::store::Store;
use common::{
    LoadResult, PgServer, SinkMode, USERS, closed_loop_over, open_loop_over, preload, start_relay,
    start_sink,
};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const CONNECTIONS: u64 = 64;
const RATE: u64 = 2000;
const P99_TARGET_MS: f64 = 20.0;

#[derive(Clone, Copy, PartialEq)]
enum Setup {
    Sqlite,
    OneRelay,
    TwoRelays,
}

const SETUPS: [Setup; 3] = [Setup::Sqlite, Setup::OneRelay, Setup::TwoRelays];

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Sqlite => "sqlite, 1 relay    ",
            Setup::OneRelay => "postgres, 1 relay  ",
            Setup::TwoRelays => "postgres, 2 relays ",
        }
    }
}

/// A set-up's stores, one per relay, and what to remove afterwards.
struct Stores {
    stores: Vec<Store>,
    database: Option<String>,
    _dir: tempfile::TempDir,
}

impl Stores {
    async fn open(setup: Setup, server: &PgServer) -> Stores {
        let dir = tempfile::tempdir().unwrap();
        let relays = if setup == Setup::TwoRelays { 2 } else { 1 };
        let (stores, database) = match setup {
            Setup::Sqlite => (
                vec![Store::open_sqlite(&dir.path().join("bench.db"), None).unwrap()],
                None,
            ),
            Setup::OneRelay | Setup::TwoRelays => {
                let (url, name) = server.create().await;
                let mut stores = Vec::new();
                for _ in 0..relays {
                    stores.push(
                        Store::open_postgres(&url, 16, Duration::from_secs(30))
                            .await
                            .unwrap(),
                    );
                }
                (stores, Some(name))
            }
        };
        Stores {
            stores,
            database,
            _dir: dir,
        }
    }

    /// Starts one relay per store, all with the bot at `bot_url`; their URLs and stop handles.
    async fn start(
        &self,
        bot_url: &str,
        bot_keys: &str,
    ) -> (Vec<String>, Vec<tokio::sync::oneshot::Sender<()>>) {
        let mut urls = Vec::new();
        let mut stops = Vec::new();
        for store in &self.stores {
            let (url, stop) = start_relay(store.clone(), bot_url, bot_keys).await;
            urls.push(url);
            stops.push(stop);
        }
        (urls, stops)
    }

    /// Stops the relays (by dropping `stops`), closes the stores and drops the database.
    async fn finish(self, stops: Vec<tokio::sync::oneshot::Sender<()>>, server: &PgServer) {
        drop(stops);
        for store in &self.stores {
            store.close().await;
        }
        if let Some(name) = &self.database {
            server.drop_database(name).await;
        }
    }
}

fn ratio(of: f64, to: f64) -> String {
    if to > 0.0 {
        format!("{:.2}", of / to)
    } else {
        "-".into()
    }
}

/// The PostgreSQL set-ups' ack p99 against the target.
fn verdicts(paced: &[(Setup, LoadResult)]) {
    for (setup, load) in paced {
        if *setup == Setup::Sqlite {
            continue;
        }
        let p99 = common::ms(load.latency.value_at_quantile(0.99));
        println!(
            "  {}p99 {p99:.2} ms: target < {P99_TARGET_MS} ms {}",
            setup.name(),
            if p99 < P99_TARGET_MS {
                "met"
            } else {
                "NOT met"
            }
        );
    }
}

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .clamp(1, 5);
    let events: u64 = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let server = match PgServer::connect().await {
            Ok(server) => server,
            Err(reason) => {
                println!("postgres benchmark skipped: {reason}");
                return;
            }
        };
        let phase = Duration::from_secs(seconds);
        let started = Instant::now();
        println!(
            "botrelay store benchmark: SQLite vs PostgreSQL {} ({}), one run, {} cores, {seconds}s phases",
            server.version().await,
            server.url.host_str().unwrap_or_default(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
        );

        // 1. Ingest, closed loop.
        println!("ingest: signed ~400-byte webhooks, closed loop, {CONNECTIONS} connections over the relays (bot parked):");
        let (parked_bot, _) = start_sink(SinkMode::Hang).await;
        let mut ingest = Vec::new();
        let mut ingest_paced: Vec<(Setup, LoadResult)> = Vec::new();
        for (index, setup) in SETUPS.into_iter().enumerate() {
            let stores = Stores::open(setup, &server).await;
            let (urls, stops) = stores
                .start(&parked_bot, "concurrency = 1\ntimeout = \"1h\"\n")
                .await;
            let first = index as u64 * 100_000_000;
            closed_loop_over(&urls, CONNECTIONS, Duration::from_secs(1), first, USERS).await; // warm-up
            let load = closed_loop_over(&urls, CONNECTIONS, phase, first + 20_000_000, USERS).await;
            println!("  {} {}", setup.name(), load.summary());
            ingest.push(load.rate());
            let paced = open_loop_over(&urls, RATE, phase, first + 50_000_000, USERS, false).await;
            ingest_paced.push((setup, paced));
            stores.finish(stops, &server).await;
        }
        println!(
            "  ratios: postgres 1 relay / sqlite {}; postgres 2 relays / 1 relay {}; 2 relays / sqlite {}",
            ratio(ingest[1], ingest[0]),
            ratio(ingest[2], ingest[1]),
            ratio(ingest[2], ingest[0])
        );
        println!("ack latency, ingest alone: open loop, {RATE} webhooks/s for {seconds}s over the relays, latency from the scheduled send (bot parked):");
        for (setup, load) in &ingest_paced {
            println!("  {} {}", setup.name(), load.summary());
        }
        verdicts(&ingest_paced);

        // 2. Fan-out of a backlog.
        println!("fan-out: a backlog of {events} deliveries ({USERS} users) to a bot that answers at once, concurrency 64 per relay:");
        let mut fanout = Vec::new();
        for setup in SETUPS {
            let stores = Stores::open(setup, &server).await;
            preload(&stores.stores[0], events, USERS).await;
            let (bot_url, stats) = start_sink(SinkMode::Count { timed: false }).await;
            let began = Instant::now();
            let (_urls, stops) = stores.start(&bot_url, "concurrency = 64\n").await;
            let deadline = began + phase;
            while stats.received.load(Ordering::Relaxed) < events && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let (received, elapsed) = (stats.received.load(Ordering::Relaxed), began.elapsed());
            let rate = received as f64 / elapsed.as_secs_f64();
            println!(
                "  {} {rate:>8.0} deliveries/s  ({received} in {:.2}s)",
                setup.name(),
                elapsed.as_secs_f64()
            );
            fanout.push(rate);
            stores.finish(stops, &server).await;
        }
        println!(
            "  ratios: postgres 1 relay / sqlite {}; postgres 2 relays / 1 relay {}; 2 relays / sqlite {}",
            ratio(fanout[1], fanout[0]),
            ratio(fanout[2], fanout[1]),
            ratio(fanout[2], fanout[0])
        );

        // 3. Ack latency at a steady rate, with the bot receiving meanwhile.
        println!("ack latency, delivering meanwhile: open loop, {RATE} webhooks/s for {seconds}s over the relays, latency from the scheduled send, the bot receiving (concurrency 64 per relay):");
        let mut paced: Vec<(Setup, LoadResult)> = Vec::new();
        for (index, setup) in SETUPS.into_iter().enumerate() {
            let stores = Stores::open(setup, &server).await;
            let (bot_url, _) = start_sink(SinkMode::Count { timed: false }).await;
            let (urls, stops) = stores.start(&bot_url, "concurrency = 64\n").await;
            let first = 1_000_000_000 + index as u64 * 100_000_000;
            let load = open_loop_over(&urls, RATE, phase, first, USERS, false).await;
            println!("  {} {}", setup.name(), load.summary());
            paced.push((setup, load));
            stores.finish(stops, &server).await;
        }
        verdicts(&paced);
        println!("whole run: {:.0}s", started.elapsed().as_secs_f64());
    });
}
