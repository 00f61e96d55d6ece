//! Signed-webhook ingest: the real relay with the durable SQLite store (group commit,
//! synchronous=FULL) against the same relay with the store replaced by a no-op, in one run, load
//! from this machine over loopback. Prints requests/s, latency percentiles and the ratio.
//!
//! Run: `cargo bench --bench ingest` (BENCH_SECONDS=N for longer phases; default 5).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use botrelay::store::Store;
use common::{SinkMode, closed_loop, open_loop, start_relay, start_sink};
use std::time::Duration;

const CONNECTIONS_DEFAULT: u64 = 64;
const RATE: u64 = 2000;

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let connections: u64 = std::env::var("BENCH_CONNECTIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CONNECTIONS_DEFAULT);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let phase = Duration::from_secs(seconds);
        // The bot sink is enabled (so every event also gets its delivery row) but parked on a
        // sink that never answers: the dispatcher holds one attempt and stays out of the way.
        let (parked_bot, _) = start_sink(SinkMode::Hang).await;
        let bot_keys = "concurrency = 1\ntimeout = \"1h\"\n";
        let dir = tempfile::tempdir().unwrap();
        let durable = Store::open_sqlite(&dir.path().join("bench.db"), None).unwrap();
        let (durable_url, _stop_durable) = start_relay(durable, &parked_bot, bot_keys).await;
        let (noop_url, _stop_noop) = start_relay(Store::discarding(), &parked_bot, bot_keys).await;

        println!("botrelay ingest benchmark: signed ~400-byte webhooks over loopback, {seconds}s per phase");
        closed_loop(&noop_url, connections, Duration::from_secs(1), 0).await; // warm-up
        closed_loop(&durable_url, connections, Duration::from_secs(1), 10_000_000).await;

        let noop = closed_loop(&noop_url, connections, phase, 20_000_000).await;
        let durable = closed_loop(&durable_url, connections, phase, 30_000_000).await;
        println!("closed loop, {connections} connections:");
        println!("  no-op store      {}", noop.summary());
        println!("  durable store    {}", durable.summary());
        println!("  ratio durable/no-op: {:.2}", durable.rate() / noop.rate());

        let noop_paced = open_loop(&noop_url, RATE, phase, 40_000_000, false).await;
        let durable_paced = open_loop(&durable_url, RATE, phase, 50_000_000, false).await;
        println!("open loop, {RATE} requests/s (latency from the scheduled send time):");
        println!("  no-op store      {}", noop_paced.summary());
        println!("  durable store    {}", durable_paced.summary());
        let stored: i64 = rusqlite::Connection::open(dir.path().join("bench.db"))
            .unwrap()
            .query_row("SELECT COUNT(*) FROM events", [], |row| row.get(0))
            .unwrap();
        println!("  events committed to the durable store: {stored}");
    });
}
