//! The purge under load: a store holding 1M delivered deliveries and 1M dead letters past their
//! retention (and their 2M events past the dedupe window), purged by the relay at start while
//! 500 signed webhooks/s arrive. Prints how long the purge took and the ack latency meanwhile.
//! Acks wait behind whatever the store's one writer runs, so the ack maximum bounds the longest
//! store step (a purge chunk) as well.
//!
//! Run: `cargo bench --bench purge` (BENCH_ROWS=N per kind, default 1000000; BENCH_RATE,
//! default 500).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use botrelay::store::{DeadLetterFilter, Store};
use common::{SinkMode, ms, open_loop, start_relay, start_sink};
use std::time::{Duration, Instant};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rows = env("BENCH_ROWS", 1_000_000);
    let rate = env("BENCH_RATE", 500);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("purge.db");
        // The schema, then the old rows, written straight into the file (60 days old: past
        // every retention and the dedupe window).
        let store = Store::open_sqlite(&path, None).unwrap();
        store.close().await;
        let started = Instant::now();
        let old = botrelay::clock::now_ms() - 60 * 86_400_000;
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF;
             BEGIN;
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {total})
             INSERT INTO events (id, source, kind, page_id, user_id, timestamp_ms, received_at, payload)
             SELECT printf('old%08d', i), 'webhook', 'message', 'PAGE', 'u' || (i % 1000), {old},
                    {old} + i / 1000, '{{}}' FROM n;
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {total})
             INSERT INTO deliveries (event_id, sink, lane, state, attempts, due_at, created_at,
                                     updated_at, last_status, last_error)
             SELECT printf('old%08d', i), 'bot', 'u' || (i % 1000),
                    CASE WHEN i <= {rows} THEN 'delivered' ELSE 'dead' END, 1, {old},
                    {old} + i / 1000, {old} + i / 1000,
                    CASE WHEN i <= {rows} THEN 200 ELSE 400 END,
                    CASE WHEN i <= {rows} THEN NULL ELSE 'HTTP 400' END FROM n;
             COMMIT;
             PRAGMA wal_checkpoint(TRUNCATE);",
            total = 2 * rows,
        ))
        .unwrap();
        drop(db);
        println!(
            "botrelay purge benchmark: {rows} delivered + {rows} dead letters past retention, \
             {} events past the dedupe window (written in {:.1}s; file {} MiB)",
            2 * rows,
            started.elapsed().as_secs_f64(),
            std::fs::metadata(&path).map(|meta| meta.len() >> 20).unwrap_or(0)
        );

        // The file was written without a sync, so its pages are still dirty in the page cache:
        // the store flushes them at open, before it answers anything.
        let opening = Instant::now();
        let store = Store::open_sqlite(&path, None).unwrap();
        println!("store opened in {:.2}s", opening.elapsed().as_secs_f64());
        let probe = store.clone();
        let (sink_url, _stats) = start_sink(SinkMode::Count { timed: false }).await;
        let purge_started = Instant::now();
        // The relay purges at start, then every minute.
        let (url, _stop) = start_relay(store, &sink_url, "").await;
        let watcher = tokio::spawn(async move {
            loop {
                let left = probe
                    .dead_letters(DeadLetterFilter {
                        limit: Some(1),
                        ..DeadLetterFilter::default()
                    })
                    .await
                    .map(|letters| letters.len())
                    .unwrap_or(1);
                let depth = probe.depth().await.unwrap_or_default();
                let dead = depth.values().map(|depth| depth.dead).sum::<u64>();
                if left == 0 && dead == 0 {
                    return purge_started.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        let mut seconds = 0u64;
        let mut during = Vec::new();
        while !watcher.is_finished() && seconds < 300 {
            let load = open_loop(&url, rate, Duration::from_secs(5), seconds * rate, false).await;
            println!("  while purging, {rate} webhooks/s: {}", load.summary());
            during.push(load);
            seconds += 5;
        }
        let purge = watcher.await.unwrap();
        let worst_p99 = during
            .iter()
            .map(|load| load.latency.value_at_quantile(0.99))
            .max()
            .unwrap_or(0);
        let worst_max = during.iter().map(|load| load.latency.max()).max().unwrap_or(0);
        println!(
            "purge of {} deliveries and their events: {:.1}s; ack p99 during it {:.2} ms (target < 50 ms), \
             ack max {:.2} ms (bounds every store step; target < 100 ms)",
            2 * rows,
            purge.as_secs_f64(),
            ms(worst_p99),
            ms(worst_max)
        );
    });
}
