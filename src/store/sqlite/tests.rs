//! Tests of the embedded store's own mechanics: query plans, group commit, fsync, chunks,
//! migrations, a full store.
#![allow(clippy::expect_used)]

use super::claims::*;
use super::dead_letters::*;
use super::engine::*;
use super::files::*;
use super::queries::*;
use super::*;
use crate::clock::Millis;
use crate::event::Event;
use crate::store::*;
use rusqlite::{Connection, params};
use std::sync::atomic::Ordering;

fn open(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(&dir.path().join("store.db"), None, Arc::new(Wakers::new()))
        .expect("open the store")
}

/// A message of user `u` at `at` for the bot sink, its id derived from `name`.
fn bot_message(name: &[u8], at: Millis) -> NewEvent {
    use crate::event::{EventData, EventId, EventKind, Source};
    NewEvent {
        event: Event {
            id: EventId::derive(&[name]),
            source: Source::Webhook,
            kind: EventKind::Message,
            page_id: Some("p".into()),
            user_id: Some("u".into()),
            timestamp_ms: at,
            data: EventData::Other { key: None },
            webhook: None,
        },
        sinks: vec![SinkName::Bot],
    }
}

async fn insert_meta(store: &SqliteStore, key: String, fail: bool) -> Result<(), StoreError> {
    store
        .write(move |connection, _| {
            connection
                .execute("INSERT INTO meta (key, value) VALUES (?1, 'x')", [&key])
                .map_err(database)?;
            if fail {
                return Err(StoreError::Database(
                    "this write fails after inserting".into(),
                ));
            }
            Ok(())
        })
        .await
}

/// Column `column` of every row of an `EXPLAIN` (or `EXPLAIN QUERY PLAN`) statement, each of
/// its parameters bound to 1.
fn explain(connection: &Connection, sql: &str, column: usize) -> rusqlite::Result<Vec<String>> {
    let mut explain = connection.prepare(sql)?;
    let parameters = explain.parameter_count();
    explain
        .query_map(
            rusqlite::params_from_iter(std::iter::repeat_n(1, parameters)),
            |row| row.get::<_, String>(column),
        )?
        .collect()
}

/// The purge, the queue depth and the dead-letter list run often on tables of millions of
/// rows: each must reach its rows through an index, never by a scan of the table.
#[tokio::test]
async fn query_plans_use_the_indexes() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let _store = open(&dir);
    let connection = Connection::open(dir.path().join("store.db"))?;
    let (dead_letters, _) = dead_letter_condition(&DeadLetterFilter {
        sink: Some(SinkName::Bot),
        ..DeadLetterFilter::default()
    });
    let listing = format!(
        "SELECT d.id FROM deliveries d LEFT JOIN events e ON e.id = d.event_id
         WHERE {dead_letters} ORDER BY d.id LIMIT 100"
    );
    let replay = replay_select(&dead_letters);
    let mut queries = vec![
        LOAD_QUEUE,
        CLAIM_FETCH,
        CLAIM_EVENT,
        PURGE_DELIVERED,
        PURGE_DEAD,
        PURGE_EVENTS,
        listing.as_str(),
        replay.as_str(),
    ];
    queries.extend(DEPTH);
    for sql in queries {
        let steps = explain(&connection, &format!("EXPLAIN QUERY PLAN {sql}"), 3)?;
        for step in &steps {
            assert!(
                !step.starts_with("SCAN") || step.contains("USING"),
                "{sql}\n  scans a table: {steps:?}"
            );
        }
    }
    Ok(())
}

/// SQLite checks every partial index's condition on each insert and update of `deliveries`;
/// a condition that needs a temporary b-tree (an IN list of three values does) would build
/// one per row written, on the one writer thread, for every enqueue and settle.
#[tokio::test]
async fn writes_to_deliveries_build_no_temporary_btree() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.db");
    // A file from before has the index with the IN list: opening drops it.
    reopen_capped(&dir, None).await?;
    Connection::open(&path)?.execute_batch(
        "CREATE INDEX deliveries_finished ON deliveries (state, updated_at)
         WHERE state IN ('delivered', 'dead', 'skipped')",
    )?;
    reopen_capped(&dir, None).await?;
    let connection = Connection::open(&path)?;
    let indexes: Vec<String> = connection
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'deliveries_%'",
        )?
        .query_map([], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    assert!(
        indexes.contains(&"deliveries_done".to_owned()),
        "{indexes:?}"
    );
    assert!(
        !indexes.contains(&"deliveries_finished".to_owned()),
        "{indexes:?}"
    );
    for sql in [
        INSERT_DELIVERY,
        "UPDATE deliveries SET state = ?2, attempts = attempts + 1, updated_at = ?3
         WHERE id = ?1 AND state = 'pending'",
    ] {
        let opcodes = explain(&connection, &format!("EXPLAIN {sql}"), 1)?;
        assert!(
            !opcodes.iter().any(|opcode| opcode == "OpenEphemeral"),
            "{sql}\n  builds a temporary b-tree: {opcodes:?}"
        );
    }
    Ok(())
}

/// A claim hands out the event its enqueue kept in memory, the same one, until the event's
/// last delivery is finished; an event no longer kept is read from the file, the same as it
/// was enqueued; and an enqueue that fails keeps nothing.
#[tokio::test]
async fn claims_take_the_event_their_enqueue_kept() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = open(&dir);
    let lease = Duration::from_secs(60);
    let mut new = bot_message(b"kept", 1_000);
    new.sinks = vec![SinkName::Bot, SinkName::Kochava];
    let enqueued = new.event.clone();
    store.enqueue(vec![new], 1_000).await?;
    assert_eq!(store.recent.held().0, 1);
    for (sink, left) in [(SinkName::Bot, 1), (SinkName::Kochava, 0)] {
        let mut claimed = store.claim(sink, 10, 2_000, lease).await?.deliveries;
        assert_eq!(claimed.len(), 1, "{sink}");
        let delivery = claimed.remove(0);
        let kept = store.recent.get(enqueued.id.as_str()).ok_or("not kept")?;
        assert!(
            Arc::ptr_eq(&delivery.event, &kept),
            "{sink}: not the kept event"
        );
        store
            .settle(&delivery, Settle::Delivered { status: 200 }, 2_000)
            .await?;
        assert_eq!(store.recent.held().0, left, "after {sink}");
    }

    // Not kept (as after a restart): read back from the file, as it went in.
    let mut new = bot_message(b"read back", 3_000);
    new.sinks = vec![SinkName::Kochava];
    let enqueued = Arc::new(new.event.clone());
    store.enqueue(vec![new], 3_000).await?;
    let kept = store.recent.get(enqueued.id.as_str()).ok_or("not kept")?;
    store.recent.forget(&kept);
    assert_eq!(store.recent.held(), (0, 0));
    let row = store.probe_deliveries().await?.last().ok_or("no row")?.id;
    assert!(store.lanes.take_memo(SinkName::Kochava, row).is_some());
    let claimed = store
        .claim(SinkName::Kochava, 10, 4_000, lease)
        .await?
        .deliveries;
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        serde_json::to_value(&*claimed[0].event)?,
        serde_json::to_value(&*enqueued)?
    );
    store.close().await;

    // An enqueue whose write ran but whose commit never became durable (a failed fsync)
    // fails: its event is not kept.
    let dir = tempfile::tempdir()?;
    let store = open(&dir);
    store.fail_next_sync();
    let refused = store
        .enqueue(vec![bot_message(b"unsynced", 5_000)], 5_000)
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(store.recent.held(), (0, 0));
    store.close().await;
    Ok(())
}

/// A row's first claim reads nothing from the file: it hands out, from what its enqueue kept
/// in memory, what a claim that reads the file hands out for the same row.
#[tokio::test]
async fn a_first_claim_hands_out_from_memory_what_the_file_holds()
-> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = open(&dir);
    let lease = Duration::from_secs(60);
    let mut new = bot_message(b"remembered", 1_000);
    new.event.user_id = Some("someone".into());
    store.enqueue(vec![new], 1_500).await?;
    let row = store.probe_deliveries().await?[0].id;
    assert!(store.lanes.has_memo(SinkName::Bot, row));
    let first = claim_bot(&store, 2_000, lease).await?;
    assert!(
        !store.lanes.has_memo(SinkName::Bot, row),
        "the claim took it"
    );
    // Given back uncounted, and claimed again: now from the file.
    store.release(first[0].claim_ref(), 2_000).await?;
    let again = claim_bot(&store, 2_000, lease).await?;
    let fields = |claimed: &Claimed| {
        (
            claimed.id,
            claimed.attempts,
            claimed.throttled,
            claimed.ttl_from,
            claimed.lease_until,
            claimed.event.user_id.clone(),
            serde_json::to_value(&*claimed.event).ok(),
        )
    };
    assert_eq!(first.len(), 1);
    assert_eq!(again.len(), 1);
    assert_eq!(fields(&first[0]), fields(&again[0]));
    assert_eq!(first[0].ttl_from, 1_500, "the ttl counts from the receipt");
    store.close().await;
    Ok(())
}

/// More dead letters than one replay write takes: every one is requeued, each lane lets
/// only its oldest go, lane-less letters all go, and the letters of a sink this build does
/// not know stay dead and are counted as left dead.
#[tokio::test]
async fn a_replay_larger_than_one_chunk_requeues_every_letter_in_lane_order()
-> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = open(&dir);
    let known = REPLAY_CHUNK * 2 + 5;
    {
        let mut connection = Connection::open(dir.path().join("store.db"))?;
        connection.busy_timeout(Duration::from_secs(5))?;
        let transaction = connection.transaction()?;
        for n in 0..known + 3 {
            // Three lanes and lane-less letters; the last three belong to a sink "gone".
            let lane = match n % 4 {
                3 => None,
                lane => Some(format!("u{lane}")),
            };
            let sink = if n < known { "bot" } else { "gone" };
            transaction.execute(
                "INSERT INTO deliveries (event_id, sink, lane, state, attempts, due_at,
                                         created_at, updated_at)
                 VALUES (?1, ?2, ?3, 'dead', 5, 0, 0, ?4)",
                params![format!("e{n}"), sink, lane, i64::try_from(n)?],
            )?;
        }
        transaction.commit()?;
    }
    let outcome = store
        .replay(DeadLetterFilter::default(), &[SinkName::Bot], 1_000_000)
        .await?;
    assert_eq!(outcome.replayed, known);
    assert_eq!(
        outcome.left_dead,
        std::collections::BTreeMap::from([("gone".to_owned(), 3)])
    );
    // Per (sink, lane, state): the first id, how many, their attempts.
    let mut groups: std::collections::BTreeMap<(String, String, String), (i64, i64, i64)> =
        std::collections::BTreeMap::new();
    for delivery in store.probe_deliveries().await? {
        let key = (
            delivery.sink,
            delivery.user.unwrap_or_else(|| "-".to_owned()),
            delivery.state,
        );
        let group = groups.entry(key).or_insert((delivery.id, 0, 0));
        group.0 = group.0.min(delivery.id);
        group.1 += 1;
        group.2 += i64::from(delivery.attempts);
    }
    let states: Vec<(String, String, String, i64, i64, i64)> = groups
        .into_iter()
        .map(|((sink, lane, state), (first, count, attempts))| {
            (sink, lane, state, first, count, attempts)
        })
        .collect();
    let row = |sink: &str, lane: &str, state: &str, first: i64, count: i64, attempts: i64| {
        (
            sink.into(),
            lane.into(),
            state.into(),
            first,
            count,
            attempts,
        )
    };
    // Rows 1..=4005 are the bot's: ids 1, 5, 9, ... are u0's (1,002 of them), 2, 6, ...
    // u1's and 3, 7, ... u2's (1,001 each), 4, 8, ... lane-less (1,001).
    assert_eq!(
        states,
        vec![
            row("bot", "-", "pending", 4, 1001, 0),
            row("bot", "u0", "pending", 1, 1, 0),
            row("bot", "u0", "waiting", 5, 1001, 0),
            row("bot", "u1", "pending", 2, 1, 0),
            row("bot", "u1", "waiting", 6, 1000, 0),
            row("bot", "u2", "pending", 3, 1, 0),
            row("bot", "u2", "waiting", 7, 1000, 0),
            row("gone", "-", "dead", 4008, 1, 5),
            row("gone", "u1", "dead", 4006, 1, 5),
            row("gone", "u2", "dead", 4007, 1, 5),
        ]
    );
    // Nothing is dead any more, so a second replay finds nothing.
    let again = store
        .replay(DeadLetterFilter::default(), &[SinkName::Bot], 1_000_001)
        .await?;
    assert_eq!(again.replayed, 0);
    Ok(())
}

/// More rows than one purge write takes: the purge goes on in further writes until all
/// are gone, and keeps an old event whose delivery is still open.
#[tokio::test]
async fn a_purge_larger_than_one_chunk_removes_everything_it_may()
-> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = open(&dir);
    let rows = i64::from(PURGE_CHUNK) * 2 + 7;
    let day: Millis = 86_400_000;
    {
        let mut connection = Connection::open(dir.path().join("store.db"))?;
        connection.busy_timeout(Duration::from_secs(5))?;
        let transaction = connection.transaction()?;
        for n in 0..=rows {
            // Row `rows` is an old event whose delivery is still pending.
            let state = if n == rows { "pending" } else { "delivered" };
            transaction.execute(
                "INSERT INTO events (id, source, kind, timestamp_ms, received_at, payload)
                 VALUES (?1, 'webhook', 'message', 0, ?2, '{}')",
                params![format!("e{n}"), n],
            )?;
            transaction.execute(
                "INSERT INTO deliveries (event_id, sink, state, due_at, created_at, updated_at)
                 VALUES (?1, 'bot', ?2, ?3, ?3, ?3)",
                params![format!("e{n}"), state, n],
            )?;
        }
        transaction.commit()?;
    }
    let retention = Retention {
        delivered: Duration::from_secs(86_400),
        dead: Duration::from_secs(86_400),
        dedupe_window: Duration::from_secs(86_400),
    };
    let purged = store.purge(retention, 2 * day).await?;
    let expected = usize::try_from(rows)?;
    assert_eq!((purged.deliveries, purged.events), (expected, expected));
    let reader = Connection::open(dir.path().join("store.db"))?;
    let left: (String, String) = reader.query_row(
        "SELECT e.id, d.state FROM events e JOIN deliveries d ON d.event_id = e.id",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    assert_eq!(left, (format!("e{rows}"), "pending".to_owned()));
    let counts: (i64, i64) = reader.query_row(
        "SELECT (SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM deliveries)",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    assert_eq!(counts, (1, 1));
    Ok(())
}

#[test]
fn only_a_filesystem_without_directory_sync_is_tolerated() {
    use std::io::{Error, ErrorKind};
    assert!(directory_sync_unsupported(&Error::from_raw_os_error(22))); // EINVAL
    assert!(directory_sync_unsupported(&Error::from(
        ErrorKind::Unsupported
    )));
    assert!(!directory_sync_unsupported(&Error::from_raw_os_error(5))); // EIO
    assert!(!directory_sync_unsupported(&Error::from(
        ErrorKind::PermissionDenied
    )));
}

/// The store's files are the relay's user's only, whatever the umask allowed, including the
/// files an older relay left readable by others.
#[cfg(unix)]
#[tokio::test]
async fn every_store_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.db");
    std::fs::write(&path, b"").expect("an old, readable store file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let store = SqliteStore::open(&path, None, Arc::new(Wakers::new())).expect("open");
    insert_meta(&store, "k".into(), false).await.expect("write");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(dir.path()).expect("read_dir") {
        let entry = entry.expect("entry");
        let mode = entry.metadata().expect("metadata").permissions().mode() & 0o777;
        seen.push(entry.file_name().to_string_lossy().into_owned());
        assert_eq!(mode, 0o600, "{:?} has mode {mode:o}", entry.file_name());
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "store.db",
            "store.db-claims",
            "store.db-shm",
            "store.db-wal",
            "store.db.lock"
        ]
    );
    store.close().await;
}

#[tokio::test]
async fn every_answer_waits_for_an_fsync_of_the_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let before = store.wal.syncs.load(Ordering::Relaxed);
    // One at a time: each write is its own group, and each answer needs its own fsync.
    for n in 0..20 {
        insert_meta(&store, format!("sequential-{n}"), false)
            .await
            .expect("write");
    }
    let syncs = store.wal.syncs.load(Ordering::Relaxed) - before;
    assert!(syncs >= 20, "20 answered writes, only {syncs} fsyncs");
}

#[tokio::test]
async fn a_failing_write_undoes_only_itself_within_its_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let writes = (0..40).map(|n| {
        let store = store.clone();
        tokio::spawn(async move { insert_meta(&store, format!("key-{n}"), n % 4 == 0).await })
    });
    let results = join_all(writes).await;
    for (n, result) in results.iter().enumerate() {
        assert_eq!(result.is_ok(), n % 4 != 0, "write {n}: {result:?}");
    }
    let stored: Vec<String> = store
        .read(|connection| {
            let mut select = connection
                .prepare("SELECT key FROM meta WHERE key LIKE 'key-%' ORDER BY key")
                .map_err(database)?;
            select
                .query_map([], |row| row.get(0))
                .map_err(database)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(database)
        })
        .await
        .expect("read");
    let mut expected: Vec<String> = (0..40)
        .filter(|n| n % 4 != 0)
        .map(|n| format!("key-{n}"))
        .collect();
    expected.sort();
    assert_eq!(stored, expected);
}

/// A dead letter older than the dedupe window, replayed, is still deliverable after the
/// next purge (the replay leaves `created_at`, which the purge relies on, alone), and its
/// ttl starts again at the replay.
#[tokio::test]
async fn a_replayed_old_dead_letter_keeps_its_event_through_a_purge()
-> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = open(&dir);
    let day: Millis = 86_400_000;
    let t0: Millis = 100 * day;
    let lease = Duration::from_secs(40);
    store
        .enqueue(vec![bot_message(b"review-replay", t0)], t0)
        .await?;
    let first = store.claim(SinkName::Bot, 8, t0, lease).await?;
    assert_eq!(first.deliveries.len(), 1);
    store
        .settle(
            &first.deliveries[0],
            Settle::Dead {
                status: Some(400),
                error: "HTTP 400".into(),
                attempted: true,
            },
            t0,
        )
        .await?;
    // Eight days later (past the 7-day dedupe window, well within the 30-day dead-letter
    // retention) the operator replays it; the minute's purge runs before it is sent.
    let later = t0 + 8 * day;
    let outcome = store
        .replay(DeadLetterFilter::default(), &[SinkName::Bot], later)
        .await?;
    assert_eq!(outcome.replayed, 1);
    let retention = Retention {
        delivered: Duration::from_secs(7 * 86_400),
        dead: Duration::from_secs(30 * 86_400),
        dedupe_window: Duration::from_secs(7 * 86_400),
    };
    store.purge(retention, later).await?;
    let again = store.claim(SinkName::Bot, 8, later, lease).await?;
    let state: (String, Option<String>) = store
        .read(|connection| {
            connection
                .query_row("SELECT state, last_error FROM deliveries", [], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .map_err(database)
        })
        .await?;
    assert_eq!(
        again.deliveries.len(),
        1,
        "the replayed delivery must be claimable with its event; row is {state:?}"
    );
    assert_eq!(again.deliveries[0].ttl_from, later);
    Ok(())
}

/// An outcome that arrives after its lease ran out and the delivery was claimed again
/// changes nothing: not the row, not its lane. The newer claim's outcome counts.
#[tokio::test]
async fn an_outcome_after_the_lease_ran_out_leaves_the_newer_claim_alone()
-> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = open(&dir);
    let t0: Millis = 1_000_000;
    store
        .enqueue(
            vec![
                bot_message(b"lease-first", t0),
                bot_message(b"lease-second", t0),
            ],
            t0,
        )
        .await?;
    // As the store tells it: a row a claim holds is in flight.
    let states = || async {
        store.probe_deliveries().await.map(|rows| {
            rows.into_iter()
                .map(|row| (row.state, row.attempts))
                .collect::<Vec<_>>()
        })
    };
    let lease = Duration::from_secs(10);
    let first = store.claim(SinkName::Bot, 8, t0, lease).await?;
    assert_eq!(first.deliveries.len(), 1);
    // The first attempt hangs past its lease; the delivery is claimed again, and the attempt
    // whose lease ran out counts as failed.
    let second = store.claim(SinkName::Bot, 8, t0 + 11_000, lease).await?;
    assert_eq!(second.deliveries.len(), 1);
    assert_eq!(second.deliveries[0].id, first.deliveries[0].id);

    for late in [
        Settle::Retry {
            due_at: t0 + 12_000,
            counted: true,
            status: Some(500),
            error: "HTTP 500".into(),
        },
        Settle::Delivered { status: 200 },
    ] {
        store
            .settle(&first.deliveries[0], late, t0 + 12_000)
            .await?;
        assert_eq!(
            states().await?,
            [("in_flight".to_owned(), 1), ("waiting".to_owned(), 0)]
        );
    }
    store
        .settle(
            &second.deliveries[0],
            Settle::Delivered { status: 200 },
            t0 + 12_000,
        )
        .await?;
    assert_eq!(
        states().await?,
        [("delivered".to_owned(), 2), ("pending".to_owned(), 0)]
    );
    Ok(())
}

/// Claims live in memory; what tells the next start that an attempt was under way when the
/// relay stopped is the claim journal. A stop without a close (a crash: the journal is as the
/// page cache has it) counts the attempt cut off; a delivery settled for a retry after its
/// claim, or given back, or held at a clean close, counts nothing.
#[tokio::test]
async fn the_claim_journal_counts_only_attempts_a_crash_cut_off()
-> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let lease = Duration::from_secs(30);
    let t0: Millis = 1_000_000;
    let store = open(&dir);
    store
        .enqueue(
            [b"journal-cut".as_slice(), b"journal-retried"]
                .into_iter()
                .map(|name| {
                    // Each in a lane of its own, so that both are claimed at once.
                    let mut message = bot_message(name, t0);
                    message.event.user_id = Some(String::from_utf8_lossy(name).into_owned());
                    message
                })
                .collect(),
            t0,
        )
        .await?;
    let claimed = store.claim(SinkName::Bot, 8, t0, lease).await?.deliveries;
    assert_eq!(claimed.len(), 2);
    let (cut, retried) = (claimed[0].id, &claimed[1]);
    store
        .settle(
            retried,
            Settle::Retry {
                due_at: t0,
                counted: true,
                status: Some(500),
                error: "HTTP 500".into(),
            },
            t0 + 1,
        )
        .await?;
    // Crash: the threads stop and the lock goes, but nothing is closed.
    drop(store);
    let store = open_capped(&dir, None).await?;
    let attempts = |rows: &[DeliveryProbe]| {
        rows.iter()
            .map(|row| (row.id, row.attempts, row.last_error.clone()))
            .collect::<Vec<_>>()
    };
    let after_crash = attempts(&store.probe_deliveries().await?);
    assert_eq!(
        after_crash,
        [
            (cut, 1, Some(CUT_OFF.to_owned())),
            (retried.id, 1, Some("HTTP 500".to_owned()))
        ]
    );
    // Claimed again, and held at a clean close: nothing more counts.
    let claimed = store
        .claim(SinkName::Bot, 8, t0 + 10, lease)
        .await?
        .deliveries;
    assert_eq!(claimed.len(), 2);
    assert!(claimed.iter().all(|delivery| delivery.attempts == 1));
    store.close().await;
    let store = open_capped(&dir, None).await?;
    assert_eq!(attempts(&store.probe_deliveries().await?), after_crash);
    // A crash after a shutdown gave a claim back: that one counts nothing either.
    let claimed = store
        .claim(SinkName::Bot, 8, t0 + 20, lease)
        .await?
        .deliveries;
    for delivery in &claimed {
        store.release(delivery.claim_ref(), t0 + 21).await?;
    }
    drop(store);
    let store = open_capped(&dir, None).await?;
    assert_eq!(attempts(&store.probe_deliveries().await?), after_crash);
    store.close().await;
    Ok(())
}

/// A file an older build left with a delivery `in_flight` (its claim was in the file, and the
/// relay died): the attempt counts as cut off at open, and the delivery is due at once.
#[tokio::test]
async fn an_older_files_in_flight_row_counts_as_cut_off() -> Result<(), Box<dyn std::error::Error>>
{
    let dir = tempfile::tempdir()?;
    let t0: Millis = 1_000_000;
    let store = open(&dir);
    store
        .enqueue(vec![bot_message(b"older-in-flight", t0)], t0)
        .await?;
    store.close().await;
    // As an older build left it (the store API never writes this state any more).
    Connection::open(dir.path().join("store.db"))?
        .execute_batch("UPDATE deliveries SET state = 'in_flight', due_at = 9999999999999")?;
    let store = open_capped(&dir, None).await?;
    let rows = store.probe_deliveries().await?;
    let [row] = rows.as_slice() else {
        return Err(format!("{rows:?}").into());
    };
    assert_eq!(
        (row.state.as_str(), row.attempts, row.last_error.as_deref()),
        ("pending", 1, Some(CUT_OFF))
    );
    let claimed = store
        .claim(SinkName::Bot, 8, t0, Duration::from_secs(30))
        .await?;
    assert_eq!(claimed.deliveries.len(), 1, "due at once");
    assert_eq!(claimed.deliveries[0].attempts, 1);
    store.close().await;
    Ok(())
}

/// Opens the store in `dir` with `max_bytes` and drops it again (a dropped store lets its
/// file lock go when its threads have finished).
async fn reopen_capped(
    dir: &tempfile::TempDir,
    max_bytes: Option<u64>,
) -> Result<(), Box<dyn std::error::Error>> {
    drop(open_capped(dir, max_bytes).await?);
    Ok(())
}

/// Opens the store in `dir` with `max_bytes`, once the store opened before has let its
/// file lock go.
async fn open_capped(
    dir: &tempfile::TempDir,
    max_bytes: Option<u64>,
) -> Result<SqliteStore, Box<dyn std::error::Error>> {
    let path = dir.path().join("store.db");
    for _ in 0..500 {
        match SqliteStore::open(&path, max_bytes, Arc::new(Wakers::new())) {
            Err(StoreError::Locked(_)) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            opened => return Ok(opened?),
        }
    }
    Err("the store stayed locked".into())
}

/// A store in `dir` changed by `sql`, then compacted so that no free page is left: opened
/// with a cap below its size (which caps it at its size), it is full.
async fn compacted_store(
    dir: &tempfile::TempDir,
    sql: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    reopen_capped(dir, None).await?;
    Connection::open(dir.path().join("store.db"))?
        .execute_batch(&format!("{sql} PRAGMA wal_checkpoint(TRUNCATE); VACUUM;"))?;
    Ok(())
}

/// A store written before `replayed_at` existed gains the column when it is opened.
#[tokio::test]
async fn an_older_store_gains_the_replayed_at_column_and_its_replays_their_receipt_time()
-> Result<(), Box<dyn std::error::Error>> {
    let reopen = |dir| reopen_capped(dir, None);
    let columns = |path: &std::path::Path| -> rusqlite::Result<i64> {
        has_column(&Connection::open(path)?, "deliveries", "replayed_at").map(i64::from)
    };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.db");
    reopen(&dir).await?;
    // What 0.1 left: a delivery as enqueued (created_at = the event's receipt) and one it
    // replayed (created_at = the replay's time).
    Connection::open(&path)?.execute_batch(
        "ALTER TABLE deliveries DROP COLUMN replayed_at;
         INSERT INTO events (id, source, kind, timestamp_ms, received_at, payload)
         VALUES ('e1', 'webhook', 'message', 1, 1000, '{}');
         INSERT INTO deliveries (id, event_id, sink, state, due_at, created_at, updated_at)
         VALUES (1, 'e1', 'bot', 'delivered', 1000, 1000, 1200),
                (2, 'e1', 'dashbot', 'pending', 5000, 5000, 5000);",
    )?;
    assert_eq!(columns(&path)?, 0);
    reopen(&dir).await?;
    assert_eq!(columns(&path)?, 1);
    let times = || -> rusqlite::Result<Vec<(i64, Option<i64>)>> {
        let connection = Connection::open(&path)?;
        let mut select =
            connection.prepare("SELECT created_at, replayed_at FROM deliveries ORDER BY id")?;
        select
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect()
    };
    assert_eq!(times()?, [(1000, None), (1000, Some(5000))]);
    reopen(&dir).await?; // and a second start finds nothing to do
    assert_eq!(columns(&path)?, 1);
    assert_eq!(times()?, [(1000, None), (1000, Some(5000))]);
    Ok(())
}

/// A full store of an older version still starts: the migration that rewrites its rows
/// runs before the size cap applies.
#[tokio::test]
async fn a_full_older_store_is_migrated_before_the_cap_applies()
-> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.db");
    // 0.1's replays, 2,000 of them, in a file with no free page left.
    compacted_store(
        &dir,
        "ALTER TABLE deliveries DROP COLUMN replayed_at;
         INSERT INTO events (id, source, kind, timestamp_ms, received_at, payload)
         VALUES ('e1', 'webhook', 'message', 1, 1000, '{}');
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
         INSERT INTO deliveries (event_id, sink, state, due_at, created_at, updated_at)
         SELECT 'e1', 'bot', 'dead', 5000, 5000 + i, 5000 + i FROM n;",
    )
    .await?;
    reopen_capped(&dir, Some(1)).await?;
    let replayed: i64 = Connection::open(&path)?.query_row(
        "SELECT COUNT(*) FROM deliveries WHERE created_at = 1000 AND replayed_at > 5000",
        [],
        |row| row.get(0),
    )?;
    assert_eq!(replayed, 2000);
    Ok(())
}

/// In a full store a write that needs a new page fails, and SQLite rolls back the whole
/// transaction by itself; the writes that shared its group and fit (a settle, a claim, an
/// update in place) are run again and commit: only the write that did not fit fails.
#[tokio::test]
async fn in_a_full_store_only_the_write_that_does_not_fit_fails()
-> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    compacted_store(
        &dir,
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 39)
         INSERT INTO meta (key, value) SELECT 'small-' || i, 'before' FROM n;",
    )
    .await?;
    let store = open_capped(&dir, Some(1)).await?;
    for round in 0..5 {
        let writes = (0..40).map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(move |connection, _| {
                        if n % 2 == 0 {
                            // Far more than the free space of any page: a new page.
                            execute(
                                connection,
                                "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                                params![format!("big-{round}-{n}"), "x".repeat(20_000)],
                            )
                        } else {
                            execute(
                                connection,
                                "UPDATE meta SET value = ?2 WHERE key = ?1",
                                params![format!("small-{n}"), format!("after{round}")],
                            )
                        }
                    })
                    .await
            })
        });
        let results = join_all(writes).await;
        for (n, result) in results.iter().enumerate() {
            if n % 2 == 0 {
                assert!(
                    matches!(result, Err(StoreError::Full)),
                    "write {n}: {result:?}"
                );
            } else {
                assert!(
                    matches!(result, Ok(1)),
                    "round {round}, write {n} fits but failed: {result:?}"
                );
            }
        }
    }
    Ok(())
}

async fn join_all<T: Send + 'static>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut results = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        results.push(handle.await.expect("task"));
    }
    results
}

/// A settle whose caller goes away after its write was queued (an aborted task, a timeout):
/// the write still commits, and the claim ends with it: the row is not reported in flight
/// afterwards, and its next claim counts no crash.
#[tokio::test]
async fn a_settle_whose_caller_goes_away_still_ends_its_claim()
-> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = open(&dir);
    let t0: Millis = 1_000_000;
    let lease = Duration::from_secs(10);
    store
        .enqueue(vec![bot_message(b"review-cancelled-settle", t0)], t0)
        .await?;
    let claimed = store.claim(SinkName::Bot, 8, t0, lease).await?.deliveries;
    let delivery = claimed.first().ok_or("nothing claimed")?;
    let retry = Settle::Retry {
        due_at: t0 + 60_000,
        counted: true,
        status: Some(500),
        error: "HTTP 500".into(),
    };
    // Hold the writer so that the settle is surely still waiting when its caller goes away.
    let (release_tx, blocker) = hold_the_writer(&store).await?;
    // Polled once (the write is queued), then dropped.
    let cancelled = futures_util::FutureExt::now_or_never(store.settle(delivery, retry, t0 + 1));
    assert!(cancelled.is_none(), "the settle was cut off mid-await");
    let _ = release_tx.send(());
    blocker.await??;
    // A later write: answered only after the settle's group is durable.
    store.probe(t0 + 2).await?;
    let rows = store.probe_deliveries().await?;
    assert_eq!(rows[0].attempts, 1, "the retry was recorded");
    assert_eq!(
        rows[0].state, "pending",
        "recorded as a retry, yet still reported in flight"
    );
    let depth = store.depth().await?;
    assert_eq!(depth.get(&SinkName::Bot).map(|d| d.in_flight), Some(0));
    let again = store
        .claim(SinkName::Bot, 8, t0 + 60_000, lease)
        .await?
        .deliveries;
    assert_eq!(
        again.first().map(|d| d.attempts),
        Some(1),
        "no attempt was cut off; none may be counted"
    );
    store.close().await;
    Ok(())
}

/// A settle whose caller goes away while its write is queued keeps its claim settling until
/// the write's outcome is known, so a claim after the lease's end does not take the row and
/// hand out a delivery that the queued write then records as delivered.
#[tokio::test]
async fn a_settle_cut_off_by_its_caller_is_not_recorded_under_a_newer_claim()
-> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = open(&dir);
    let t0: Millis = 1_000_000;
    let lease = Duration::from_secs(10);
    store
        .enqueue(vec![bot_message(b"review-stale-settle", t0)], t0)
        .await?;
    let claimed = store.claim(SinkName::Bot, 8, t0, lease).await?.deliveries;
    let delivery = claimed.first().ok_or("nothing claimed")?.clone();
    // Hold the writer (a slow group: a purge chunk, a checkpoint, a slow disk).
    let (release_tx, blocker) = hold_the_writer(&store).await?;
    // The old attempt's settle is queued, then its caller goes away.
    let cancelled = futures_util::FutureExt::now_or_never(store.settle(
        &delivery,
        Settle::Delivered { status: 200 },
        t0 + 1,
    ));
    assert!(cancelled.is_none());
    // The lease runs out; the sink's next claim takes the row (its cut-off count queues).
    let second = {
        let store = store.clone();
        tokio::spawn(async move { store.claim(SinkName::Bot, 8, t0 + 20_000, lease).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = release_tx.send(());
    blocker.await??;
    let second = second.await??.deliveries;
    let rows = store.probe_deliveries().await?;
    assert_eq!(rows[0].state, "delivered", "the stale outcome was recorded");
    assert!(
        second.is_empty(),
        "a delivery recorded as delivered was handed out again: {:?}",
        second.iter().map(|d| d.id).collect::<Vec<_>>()
    );
    store.close().await;
    Ok(())
}

/// After a failed fsync the store answers only errors until a restart, claims included: a
/// claim's reader would see the committed, never synced rows (here the enqueue failed, and
/// the webhook was answered 503).
#[tokio::test]
async fn a_failed_store_hands_out_no_claims() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = open(&dir);
    let t0: Millis = 1_000_000;
    store.fail_next_sync();
    assert!(
        store
            .enqueue(vec![bot_message(b"review-unsynced", t0)], t0)
            .await
            .is_err()
    );
    assert!(store.failure().is_some());
    let claimed = store
        .claim(SinkName::Bot, 8, t0, Duration::from_secs(10))
        .await;
    assert!(
        !matches!(&claimed, Ok(batch) if !batch.deliveries.is_empty()),
        "a failed store handed out a delivery whose enqueue was never acknowledged"
    );
    store.close().await;
    Ok(())
}

/// After `close` every call fails with `Unavailable`: a claim too (it reads the file on a
/// connection of its own), and renewing or giving back a claim taken before.
#[tokio::test]
async fn claims_after_close_fail() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = open(&dir);
    let t0: Millis = 1_000_000;
    let lease = Duration::from_secs(10);
    store
        .enqueue(
            vec![
                bot_message(b"before-close", t0),
                bot_message(b"after-close", t0),
            ],
            t0,
        )
        .await?;
    let held = store.claim(SinkName::Bot, 1, t0, lease).await?.deliveries;
    let [held] = held.as_slice() else {
        return Err("one claim expected".into());
    };
    store.close().await;
    let claimed = store.claim(SinkName::Bot, 8, t0, lease).await;
    assert!(
        matches!(claimed, Err(StoreError::Unavailable)),
        "claim after close: {:?}",
        claimed.map(|batch| batch.deliveries.len())
    );
    assert!(matches!(
        store.renew(held, t0 + 5_000, t0 + 1).await,
        Err(StoreError::Unavailable)
    ));
    assert!(matches!(
        store.release(held.claim_ref(), t0 + 1).await,
        Err(StoreError::Unavailable)
    ));
    Ok(())
}

/// Holds the store's writer in a write of its own until the returned sender sends (or is
/// dropped); returns once the write runs. The handle yields that write's result.
async fn hold_the_writer(
    store: &SqliteStore,
) -> Result<
    (
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<(), StoreError>>,
    ),
    Box<dyn std::error::Error>,
> {
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let mut started_tx = Some(started_tx);
    let store = store.clone();
    let blocker = tokio::spawn(async move {
        store
            .write(move |_, _| {
                if let Some(started) = started_tx.take() {
                    let _ = started.send(());
                }
                let _ = release_rx.recv();
                Ok(())
            })
            .await
    });
    started_rx.await?;
    Ok((release_tx, blocker))
}

/// The queue in memory follows what SQLite keeps: a group in which one write fails is rolled
/// back and run again, and the enqueues it held must not be counted twice in their lane (the
/// second run would find the first's head and make its own row wait behind it forever).
#[tokio::test]
async fn a_failing_write_leaves_the_queue_in_memory_as_the_file_has_it()
-> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = open(&dir);
    let t0: Millis = 1_000_000;
    let lease = Duration::from_secs(10);
    let (release_tx, blocker) = hold_the_writer(&store).await?;
    // Three writes queued behind the held one, so that the four share a group.
    let writes = vec![
        tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .enqueue(vec![bot_message(b"first", t0)], t0)
                    .await
                    .map(|_| ())
            }
        }),
        tokio::spawn({
            let store = store.clone();
            async move { insert_meta(&store, "fails".into(), true).await }
        }),
        tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .enqueue(vec![bot_message(b"second", t0)], t0)
                    .await
                    .map(|_| ())
            }
        }),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.writes.max_capacity() - store.writes.capacity() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writes never queued"
        );
        tokio::task::yield_now().await;
    }
    // The held write runs again when the group does: it must not wait a second time.
    let _ = release_tx.send(());
    drop(release_tx);
    blocker.await??;
    let results = join_all(writes.into_iter()).await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(results[1].is_err(), "{results:?}");
    assert_eq!(store.lanes.counts(SinkName::Bot), (1, 1));
    // One at a time, both, in the file's order.
    let mut delivered = Vec::new();
    for at in [t0 + 1, t0 + 2] {
        let claimed = store.claim(SinkName::Bot, 8, at, lease).await?.deliveries;
        assert_eq!(
            claimed.len(),
            1,
            "at {at}: {:?}",
            claimed.iter().map(|d| d.id).collect::<Vec<_>>()
        );
        store
            .settle(&claimed[0], Settle::Delivered { status: 200 }, at)
            .await?;
        delivered.push(claimed[0].id);
    }
    assert!(delivered[0] < delivered[1], "{delivered:?}");
    assert_eq!(store.lanes.counts(SinkName::Bot), (0, 0));
    let states: Vec<String> = store
        .probe_deliveries()
        .await?
        .into_iter()
        .map(|row| row.state)
        .collect();
    assert_eq!(states, ["delivered", "delivered"]);
    store.close().await;
    Ok(())
}

/// At open the queue in memory is rebuilt from the file: each lane's oldest open row is its head,
/// due when the file says (a retry keeps its time), and the lane's other rows wait behind it in
/// order. An older version's file, which holds those rows as `waiting` and has the indexes that
/// held the queue then, is brought up to this version's: every open row `pending`, the indexes
/// dropped.
#[tokio::test]
async fn reopening_rebuilds_the_queue_from_the_file() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let t0: Millis = 1_000_000;
    // Long enough that no claim of this test runs out, the last one being at the real now.
    let lease = Duration::from_secs(100 * 365 * 24 * 3600);
    let user = |name: &[u8], user: &str| {
        let mut new = bot_message(name, t0);
        new.event.user_id = Some(user.into());
        new
    };
    let store = open(&dir);
    for (name, who) in [(b"u1", "u"), (b"u2", "u"), (b"u3", "u"), (b"v1", "v")] {
        store.enqueue(vec![user(name, who)], t0).await?;
    }
    for (name, who) in [(b"w1", "w"), (b"w2", "w"), (b"w3", "w")] {
        store.enqueue(vec![user(name, who)], t0).await?;
    }
    // u's head fails and is due again in a minute.
    let claimed = store.claim(SinkName::Bot, 8, t0, lease).await?.deliveries;
    assert_eq!(claimed.len(), 3, "one head per lane");
    let by_user = |who: &str| {
        claimed
            .iter()
            .find(|d| d.event.user_id.as_deref() == Some(who))
            .ok_or("no head")
    };
    store
        .settle(
            by_user("u")?,
            Settle::Retry {
                due_at: t0 + 60_000,
                counted: true,
                status: Some(503),
                error: "HTTP 503".into(),
            },
            t0,
        )
        .await?;
    for who in ["v", "w"] {
        store.release(by_user(who)?.claim_ref(), t0).await?;
    }
    store.close().await;
    drop(store);
    // The file as an earlier version would have left it, had w's head been delivered last: its
    // indexes, and the rows behind each lane's head `waiting`.
    {
        let connection = Connection::open(dir.path().join("store.db"))?;
        connection.execute_batch(
            "CREATE INDEX deliveries_lane_head ON deliveries (sink, lane)
                 WHERE state IN ('pending', 'in_flight');
             CREATE INDEX deliveries_lane_waiting ON deliveries (sink, lane, id)
                 WHERE state = 'waiting';",
        )?;
        connection.execute(
            "UPDATE deliveries SET state = 'delivered' WHERE id = ?1",
            [by_user("w")?.id],
        )?;
        connection.execute(
            "UPDATE deliveries SET state = 'waiting'
             WHERE state = 'pending' AND id NOT IN (?1, ?2)",
            [by_user("u")?.id, by_user("v")?.id],
        )?;
    }
    let store = open_capped(&dir, None).await?;
    assert_eq!(store.lanes.counts(SinkName::Bot), (3, 3));
    let file = Connection::open(dir.path().join("store.db"))?;
    let indexes: Vec<String> = file
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'deliveries_lane%'",
        )?
        .query_map([], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    assert!(indexes.is_empty(), "{indexes:?}");
    let waiting: i64 = file.query_row(
        "SELECT COUNT(*) FROM deliveries WHERE state = 'waiting'",
        [],
        |row| row.get(0),
    )?;
    assert_eq!(waiting, 0, "every open row is pending in the file");
    let states: Vec<(String, String)> = store
        .probe_deliveries()
        .await?
        .into_iter()
        .map(|row| (row.user.unwrap_or_default(), row.state))
        .collect();
    assert_eq!(
        states,
        [
            ("u", "pending"),
            ("u", "waiting"),
            ("u", "waiting"),
            ("v", "pending"),
            ("w", "delivered"),
            ("w", "pending"),
            ("w", "waiting"),
        ]
        .map(|(user, state)| (user.to_owned(), state.to_owned()))
    );
    // Before u's retry is due: v's head, and w's oldest open row (due since its receipt).
    let first = claim_bot(&store, t0 + 1, lease).await?;
    assert_eq!(
        ids_of(&first),
        [user(b"v1", "v").event.id, user(b"w2", "w").event.id]
    );
    for claimed in &first {
        store
            .settle(claimed, Settle::Delivered { status: 200 }, t0 + 1)
            .await?;
    }
    let next = claim_bot(&store, t0 + 2, lease).await?;
    assert_eq!(ids_of(&next), [user(b"w3", "w").event.id]);
    // Then u's head, the same row as before, with its attempt counted; u's next only after it.
    let retried = claim_bot(&store, t0 + 60_000, lease).await?;
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].id, by_user("u")?.id);
    assert_eq!(retried[0].attempts, 1);
    store
        .settle(&retried[0], Settle::Delivered { status: 200 }, t0 + 60_000)
        .await?;
    let next = claim_bot(&store, t0 + 60_001, lease).await?;
    assert_eq!(ids_of(&next), [user(b"u2", "u").event.id]);
    store.close().await;
    Ok(())
}

/// The bot sink's claim at `at`.
async fn claim_bot(
    store: &SqliteStore,
    at: Millis,
    lease: Duration,
) -> Result<Vec<Claimed>, StoreError> {
    Ok(store.claim(SinkName::Bot, 8, at, lease).await?.deliveries)
}

/// The events of `claimed`, in the order handed out.
fn ids_of(claimed: &[Claimed]) -> Vec<crate::event::EventId> {
    claimed.iter().map(|d| d.event.id.clone()).collect()
}

/// A claim hands out only rows the file holds as pending for its own sink, even when the queue
/// in memory names a row id the file holds for another sink (a rolled-back write gives its ids
/// back, and the next insert may take one for another sink) or no row at all (a write not
/// committed yet); and the rows it passes over do not take the places of rows it can hand out,
/// even with a limit of one.
#[tokio::test]
async fn a_claim_passes_over_rows_the_file_does_not_hold_for_its_sink()
-> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = open(&dir);
    let t0: Millis = 1_000_000;
    let lease = Duration::from_secs(60);
    let mut for_kochava = bot_message(b"kochava's", t0);
    for_kochava.sinks = vec![SinkName::Kochava];
    for_kochava.event.user_id = None;
    store.enqueue(vec![for_kochava], t0).await?;
    let kochava_row = store.probe_deliveries().await?[0].id;
    // The queue in memory names, first in the bot's order, kochava's row and a row that is
    // not in the file.
    let mut changes = Changes::new(store.lanes.clone());
    changes.add(SinkName::Bot, None, kochava_row, true, 0, None);
    changes.add(SinkName::Bot, None, 999_999, true, 0, None);
    changes.keep();
    store
        .enqueue(vec![bot_message(b"the bot's", t0)], t0)
        .await?;
    let bot_row = store.probe_deliveries().await?[1].id;
    let claimed = store.claim(SinkName::Bot, 1, t0, lease).await?.deliveries;
    assert_eq!(claimed.iter().map(|d| d.id).collect::<Vec<_>>(), [bot_row]);
    let claimed = store
        .claim(SinkName::Kochava, 8, t0, lease)
        .await?
        .deliveries;
    assert_eq!(
        claimed.iter().map(|d| d.id).collect::<Vec<_>>(),
        [kochava_row]
    );
    store.close().await;
    Ok(())
}
