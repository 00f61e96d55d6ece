//! Fan-out from the store to a sink: deliveries per second from a preloaded SQLite store to a
//! local sink that answers at once (each delivery: claim, encode and sign, HTTP POST, durable
//! settle), and latency from the webhook's ack to the sink's receipt at a steady rate.
//!
//! Run: `cargo bench --bench fanout` (BENCH_EVENTS=N to change the backlog; default 30000).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use botrelay::store::Store;
use common::{SinkMode, ms, open_loop, preload, start_relay, start_sink};
use hdrhistogram::Histogram;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const USERS: u64 = 1000;

fn main() {
    let events: u64 = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        println!("botrelay fan-out benchmark: {events} deliveries, {USERS} users, one sink on loopback");
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("fanout.db"), None).unwrap();
        preload(&store, events, USERS).await;
        let (sink_url, stats) = start_sink(SinkMode::Count { timed: false }).await;
        let started = Instant::now();
        let (_url, _stop) = start_relay(store, &sink_url, "concurrency = 64\n").await;
        while stats.received.load(Ordering::Relaxed) < events {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = started.elapsed();
        let db = rusqlite::Connection::open(dir.path().join("fanout.db")).unwrap();
        let mut delivered: i64 = 0;
        for _ in 0..200 {
            delivered = db
                .query_row("SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'", [], |row| row.get(0))
                .unwrap();
            if delivered as u64 == events {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!(
            "drain: {events} deliveries in {:.2}s = {:.0} deliveries/s (settled as delivered in the store: {delivered})",
            elapsed.as_secs_f64(),
            events as f64 / elapsed.as_secs_f64()
        );

        // Latency at a rate well below saturation: webhook ack -> sink receipt.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("latency.db"), None).unwrap();
        let (sink_url, stats) = start_sink(SinkMode::Count { timed: true }).await;
        let (url, _stop) = start_relay(store, &sink_url, "concurrency = 64\n").await;
        for (rate, seconds) in [(500u64, 5u64), (2000, 5)] {
            let first = rate * 1_000_000;
            let load = open_loop(&url, rate, Duration::from_secs(seconds), first, true).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let arrivals = stats.arrivals.lock().unwrap().clone();
            let mut after_ack = Histogram::<u64>::new(3).unwrap();
            let mut end_to_end = Histogram::<u64>::new(3).unwrap();
            let mut missing = 0;
            for (mid, (sent, acked)) in &load.acks {
                match arrivals.get(mid) {
                    // The sink can see the event before the client has read the ack: count 0.
                    Some(arrived) => {
                        after_ack.record(arrived.saturating_duration_since(*acked).as_micros() as u64).unwrap();
                        end_to_end.record(arrived.duration_since(*sent).as_micros() as u64).unwrap();
                    }
                    None => missing += 1,
                }
            }
            println!(
                "at {rate} webhooks/s for {seconds}s: ack -> sink receipt p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
                 send -> sink receipt p50 {:.2} ms, p99 {:.2} ms ({} acked, {missing} not yet received)",
                ms(after_ack.value_at_quantile(0.5)),
                ms(after_ack.value_at_quantile(0.99)),
                ms(after_ack.max()),
                ms(end_to_end.value_at_quantile(0.5)),
                ms(end_to_end.value_at_quantile(0.99)),
                load.acks.len()
            );
        }
    });
}
