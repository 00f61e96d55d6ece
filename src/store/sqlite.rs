//! The embedded store: SQLite in WAL mode with `synchronous=FULL` (one fsync per commit).
//!
//! One writer thread owns the write connection. Callers send it closures; it runs every closure
//! that is queued (up to `MAX_BATCH`) inside one transaction, each under its own savepoint so a
//! failing write does not undo the others, commits once, and only then answers each caller.
//! That is group commit: under load many requests share one fsync. Reads use a second
//! connection (WAL lets it read while the writer writes).
//!
//! Lanes: a delivery row carries `lane` = the user. Only the oldest open row of a (sink, lane) is
//! `pending`; the rows behind it are `waiting` until it is delivered, dead or skipped. So one
//! user's deliveries to one sink keep their order, and a failing user blocks nobody else.

use super::{
    ClaimBatch, Claimed, DeadLetter, DeadLetterFilter, EnqueueReport, Millis, NewEvent, Purged,
    Retention, Settle, SinkDepth, StoreError, Wakers, millis,
};
use crate::config::SinkName;
use crate::event::Event;
use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The most writes one transaction takes.
const MAX_BATCH: usize = 512;

/// How often the checkpointer copies committed WAL frames into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Every this many commits the writer finishes a checkpoint itself (after answering its
/// callers), so that the WAL file is reused from its start instead of growing.
const BATCHES_PER_WAL_RESTART: u32 = 32;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per event, kept for the dedupe window (and while any delivery needs it).
CREATE TABLE IF NOT EXISTS events (
    id           TEXT PRIMARY KEY,
    source       TEXT NOT NULL,
    kind         TEXT NOT NULL,
    page_id      TEXT,
    user_id      TEXT,
    timestamp_ms INTEGER NOT NULL,
    received_at  INTEGER NOT NULL,
    payload      TEXT NOT NULL     -- the event as JSON; the raw webhook item verbatim inside
);
CREATE INDEX IF NOT EXISTS events_received ON events (received_at);
-- One row per (event, sink). `id` is the order of receipt.
CREATE TABLE IF NOT EXISTS deliveries (
    id               INTEGER PRIMARY KEY,
    event_id         TEXT NOT NULL,
    sink             TEXT NOT NULL,
    lane             TEXT,            -- the user; NULL = no order to keep
    state            TEXT NOT NULL,   -- waiting | pending | in_flight | delivered | dead | skipped
    attempts         INTEGER NOT NULL DEFAULT 0,
    throttled        INTEGER NOT NULL DEFAULT 0,
    due_at           INTEGER NOT NULL, -- pending: next attempt; in_flight: end of the lease
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    first_attempt_at INTEGER,
    last_attempt_at  INTEGER,
    last_status      INTEGER,
    last_error       TEXT              -- redacted
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (sink, due_at)
    WHERE state IN ('pending', 'in_flight');
CREATE INDEX IF NOT EXISTS deliveries_lane ON deliveries (sink, lane, id)
    WHERE state IN ('waiting', 'pending', 'in_flight');
CREATE INDEX IF NOT EXISTS deliveries_finished ON deliveries (state, updated_at)
    WHERE state IN ('delivered', 'dead', 'skipped');
-- No index on deliveries.event_id: it would be a random-order write on every enqueue, and only
-- the once-a-minute purge needs that direction (it uses NOT IN over one scan instead).
CREATE TABLE IF NOT EXISTS paused_users (
    user_id   TEXT PRIMARY KEY,
    paused_at INTEGER NOT NULL
);
";

/// A write to run inside the group transaction; what it returns answers the caller after commit.
type Write = Box<dyn FnOnce(&Connection, &mut BTreeSet<SinkName>) -> Reply + Send>;
type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

#[derive(Clone)]
pub(super) struct SqliteStore {
    writes: mpsc::Sender<Write>,
    reader: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    pub(super) fn open(
        path: &Path,
        max_bytes: Option<u64>,
        wakers: Arc<Wakers>,
    ) -> Result<SqliteStore, StoreError> {
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|error| {
                StoreError::Database(format!("cannot create {}: {error}", parent.display()))
            })?;
        }
        let lock = lock_file(path)?;
        let writer = Connection::open(path).map_err(database)?;
        // Checkpoints are not run inside the writer's commits (where every caller of the batch
        // would wait for them) but by a checkpointer thread; see `checkpoint_loop`.
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;
                 PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 67108864;",
            )
            .map_err(database)?;
        if let Some(max_bytes) = max_bytes {
            let page_size: i64 = writer
                .query_row("PRAGMA page_size", [], |row| row.get(0))
                .map_err(database)?;
            let pages = (i64::try_from(max_bytes).unwrap_or(i64::MAX) / page_size.max(1)).max(1);
            writer
                .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
                .map_err(database)?;
        }
        writer.execute_batch(SCHEMA).map_err(database)?;
        // This process holds the file lock, so every lease in the file belongs to a process
        // that is gone: release them now instead of waiting for them to run out.
        writer
            .execute(
                "UPDATE deliveries SET state = 'pending', due_at = 0 WHERE state = 'in_flight'",
                [],
            )
            .map_err(database)?;
        let reader = Connection::open(path).map_err(database)?;
        reader
            .execute_batch("PRAGMA busy_timeout = 5000; PRAGMA query_only = 1;")
            .map_err(database)?;

        let checkpointer = Connection::open(path).map_err(database)?;
        checkpointer
            .execute_batch("PRAGMA busy_timeout = 5000;")
            .map_err(database)?;
        let stop_checkpoints = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let checkpoints_stopped = stop_checkpoints.clone();
        std::thread::Builder::new()
            .name("botrelay-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpointer, &checkpoints_stopped))
            .map_err(|error| {
                StoreError::Database(format!("cannot start the checkpoint thread: {error}"))
            })?;

        let (writes, receiver) = mpsc::channel::<Write>(8192);
        std::thread::Builder::new()
            .name("botrelay-store".into())
            .spawn(move || {
                let _lock = lock;
                write_loop(writer, receiver, &wakers);
                stop_checkpoints.store(true, std::sync::atomic::Ordering::Relaxed);
            })
            .map_err(|error| {
                StoreError::Database(format!("cannot start the writer thread: {error}"))
            })?;
        Ok(SqliteStore {
            writes,
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    /// Runs `write` in the next group transaction and returns its result after the commit.
    async fn write<T, F>(&self, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut BTreeSet<SinkName>) -> Result<T, StoreError> + Send + 'static,
    {
        let (sender, receiver) = oneshot::channel();
        let job: Write = Box::new(move |connection, touched| {
            let result = in_savepoint(connection, |connection| write(connection, touched));
            Box::new(move |committed: Result<(), StoreError>| {
                let _ = sender.send(committed.and(result));
            })
        });
        self.writes
            .send(job)
            .await
            .map_err(|_| StoreError::Unavailable)?;
        receiver.await.map_err(|_| StoreError::Unavailable)?
    }

    async fn read<T, F>(&self, read: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let connection = reader.lock().map_err(|_| StoreError::Unavailable)?;
            read(&connection)
        })
        .await
        .map_err(|_| StoreError::Unavailable)?
    }

    pub(super) async fn enqueue(
        &self,
        events: Vec<NewEvent>,
        now: Millis,
    ) -> Result<EnqueueReport, StoreError> {
        // Encoding runs here, on the caller's thread, to keep the one writer thread short.
        let encoded = events
            .into_iter()
            .map(|new| {
                serde_json::to_string(&new.event)
                    .map(|payload| (new, payload))
                    .map_err(|error| StoreError::Database(format!("cannot encode event: {error}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.write(move |connection, touched| {
            let mut report = EnqueueReport::default();
            let mut insert_event = connection
                .prepare_cached(
                    "INSERT INTO events (id, source, kind, page_id, user_id, timestamp_ms, received_at, payload)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (id) DO NOTHING",
                )
                .map_err(database)?;
            let mut lane_open = connection
                .prepare_cached(
                    "SELECT 1 FROM deliveries WHERE sink = ?1 AND lane = ?2
                     AND state IN ('waiting', 'pending', 'in_flight') LIMIT 1",
                )
                .map_err(database)?;
            let mut insert_delivery = connection
                .prepare_cached(
                    "INSERT INTO deliveries (event_id, sink, lane, state, due_at, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?5)",
                )
                .map_err(database)?;
            for (NewEvent { event, sinks }, payload) in encoded {
                let inserted = insert_event
                    .execute(params![
                        event.id.as_str(),
                        event.source.as_str(),
                        event.kind.as_str(),
                        event.page_id,
                        event.user_id,
                        event.timestamp_ms,
                        now,
                        payload,
                    ])
                    .map_err(database)?;
                if inserted == 0 {
                    report.duplicates += 1;
                    continue;
                }
                report.stored += 1;
                for sink in sinks {
                    let lane = event.user_id.as_deref();
                    let behind_another = match lane {
                        None => false,
                        Some(lane) => lane_open
                            .query_row(params![sink.as_str(), lane], |_| Ok(()))
                            .optional()
                            .map_err(database)?
                            .is_some(),
                    };
                    let state = if behind_another { "waiting" } else { "pending" };
                    insert_delivery
                        .execute(params![event.id.as_str(), sink.as_str(), lane, state, now])
                        .map_err(database)?;
                    report.deliveries += 1;
                    touched.insert(sink);
                }
            }
            Ok(report)
        })
        .await
    }

    pub(super) async fn claim(
        &self,
        sink: SinkName,
        limit: usize,
        now: Millis,
        lease: Duration,
    ) -> Result<ClaimBatch, StoreError> {
        let lease_end = now.saturating_add(millis(lease));
        self.write(move |connection, _| {
            let mut claim = connection
                .prepare_cached(
                    "UPDATE deliveries SET state = 'in_flight', due_at = ?3, updated_at = ?2
                     WHERE id IN (
                         SELECT id FROM deliveries
                         WHERE sink = ?1 AND state IN ('pending', 'in_flight') AND due_at <= ?2
                         ORDER BY due_at, id LIMIT ?4)
                     RETURNING id, event_id, attempts, throttled, created_at",
                )
                .map_err(database)?;
            let rows = claim
                .query_map(
                    params![sink.as_str(), now, lease_end, i64::try_from(limit).unwrap_or(i64::MAX)],
                    |row| {
                        Ok((
                            row.get::<_, i64>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, u32>(2)?,
                            row.get::<_, u32>(3)?,
                            row.get::<_, i64>(4)?,
                        ))
                    },
                )
                .map_err(database)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(database)?;
            let mut payload = connection
                .prepare_cached("SELECT payload FROM events WHERE id = ?1")
                .map_err(database)?;
            let mut batch = ClaimBatch::default();
            for (id, event_id, attempts, throttled, created_at) in rows {
                let stored: Option<String> = payload
                    .query_row([&event_id], |row| row.get(0))
                    .optional()
                    .map_err(database)?;
                let event = match stored.as_deref().map(serde_json::from_str::<Event>) {
                    Some(Ok(event)) => Ok(event),
                    Some(Err(error)) => Err(format!("the stored event is unreadable: {error}")),
                    None => Err("the event is missing from the store".to_owned()),
                };
                match event {
                    Ok(event) => batch.deliveries.push(Claimed {
                        id,
                        sink,
                        event,
                        attempts,
                        throttled,
                        created_at,
                    }),
                    // Cannot happen while purge keeps events with open deliveries and the
                    // encoding is ours; if it does, dead-letter the row so that neither its
                    // lane nor the sink's claims get stuck on it.
                    Err(reason) => {
                        connection
                            .execute(
                                "UPDATE deliveries SET state = 'dead', updated_at = ?2, last_error = ?3
                                 WHERE id = ?1",
                                params![id, now, reason],
                            )
                            .map_err(database)?;
                        promote(connection, sink, None, now)?;
                    }
                }
            }
            batch.next_due = connection
                .query_row(
                    "SELECT due_at FROM deliveries WHERE sink = ?1 AND state IN ('pending', 'in_flight')
                     ORDER BY due_at LIMIT 1",
                    [sink.as_str()],
                    |row| row.get::<_, i64>(0),
                )
                .optional()
                .map_err(database)?;
            Ok(batch)
        })
        .await
    }

    pub(super) async fn settle(
        &self,
        delivery: &Claimed,
        settle: Settle,
        now: Millis,
    ) -> Result<(), StoreError> {
        let id = delivery.id;
        let sink = delivery.sink;
        let lane = delivery.event.user_id.clone();
        self.write(move |connection, touched| {
            let first_attempt = "first_attempt_at = COALESCE(first_attempt_at, ?2), last_attempt_at = ?2";
            let done = match settle {
                Settle::Delivered { status } => {
                    connection
                        .execute(
                            &format!(
                                "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1,
                                 last_status = ?3, last_error = NULL, updated_at = ?2, {first_attempt}
                                 WHERE id = ?1 AND state = 'in_flight'"
                            ),
                            params![id, now, status],
                        )
                        .map_err(database)?;
                    true
                }
                Settle::Retry { due_at, counted, status, error } => {
                    connection
                        .execute(
                            &format!(
                                "UPDATE deliveries SET state = 'pending', attempts = attempts + 1,
                                 throttled = throttled + ?3, due_at = ?4, last_status = ?5,
                                 last_error = ?6, updated_at = ?2, {first_attempt}
                                 WHERE id = ?1 AND state = 'in_flight'"
                            ),
                            params![id, now, i64::from(!counted), due_at, status, error],
                        )
                        .map_err(database)?;
                    touched.insert(sink);
                    false
                }
                Settle::Dead { status, error } => {
                    connection
                        .execute(
                            &format!(
                                "UPDATE deliveries SET state = 'dead', attempts = attempts + 1,
                                 last_status = ?3, last_error = ?4, updated_at = ?2, {first_attempt}
                                 WHERE id = ?1 AND state = 'in_flight'"
                            ),
                            params![id, now, status, error],
                        )
                        .map_err(database)?;
                    true
                }
                Settle::Skipped { reason } => {
                    connection
                        .execute(
                            "UPDATE deliveries SET state = 'skipped', last_error = ?3, updated_at = ?2
                             WHERE id = ?1 AND state = 'in_flight'",
                            params![id, now, reason],
                        )
                        .map_err(database)?;
                    true
                }
            };
            if done && promote(connection, sink, lane.as_deref(), now)? {
                touched.insert(sink);
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn replay(
        &self,
        filter: DeadLetterFilter,
        now: Millis,
    ) -> Result<usize, StoreError> {
        self.write(move |connection, touched| {
            let (condition, values) = dead_letter_condition(&filter);
            let mut select = connection
                .prepare(&format!(
                    "SELECT id, sink, lane FROM deliveries d WHERE {condition} ORDER BY id"
                ))
                .map_err(database)?;
            let rows = select
                .query_map(rusqlite::params_from_iter(values.iter()), |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, Option<String>>(2)?,
                    ))
                })
                .map_err(database)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(database)?;
            // A replayed letter rejoins its lane at its original place (its id): it waits if
            // the lane is busy, and is the next to go otherwise.
            let mut lanes = Vec::new();
            for (id, sink, lane) in &rows {
                connection
                    .execute(
                        "UPDATE deliveries SET state = 'waiting', attempts = 0, throttled = 0,
                         created_at = ?2, updated_at = ?2, due_at = ?2 WHERE id = ?1",
                        params![id, now],
                    )
                    .map_err(database)?;
                if let Some(sink) = SinkName::parse(sink) {
                    lanes.push((sink, lane.clone(), *id));
                }
            }
            for (sink, lane, id) in lanes {
                match lane {
                    Some(lane) => {
                        promote(connection, sink, Some(&lane), now)?;
                    }
                    None => {
                        connection
                            .execute(
                                "UPDATE deliveries SET state = 'pending' WHERE id = ?1",
                                [id],
                            )
                            .map_err(database)?;
                    }
                }
                touched.insert(sink);
            }
            Ok(rows.len())
        })
        .await
    }

    pub(super) async fn dead_letters(
        &self,
        filter: DeadLetterFilter,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(move |connection| {
            let (condition, values) = dead_letter_condition(&filter);
            let limit = filter.limit.unwrap_or(100).min(10_000);
            let order = if filter.newest_first {
                "d.updated_at DESC, d.id DESC"
            } else {
                "d.id"
            };
            let mut select = connection
                .prepare(&format!(
                    "SELECT d.id, d.event_id, d.sink, COALESCE(e.kind, ''), d.lane, d.attempts,
                            d.last_status, d.last_error, d.first_attempt_at, d.last_attempt_at
                     FROM deliveries d LEFT JOIN events e ON e.id = d.event_id
                     WHERE {condition} ORDER BY {order} LIMIT {limit}"
                ))
                .map_err(database)?;
            select
                .query_map(rusqlite::params_from_iter(values.iter()), |row| {
                    Ok(DeadLetter {
                        id: row.get(0)?,
                        event_id: row.get(1)?,
                        sink: row.get(2)?,
                        kind: row.get(3)?,
                        user: row.get(4)?,
                        attempts: row.get(5)?,
                        last_status: row.get(6)?,
                        last_error: row.get(7)?,
                        first_attempt_at: row.get(8)?,
                        last_attempt_at: row.get(9)?,
                    })
                })
                .map_err(database)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(database)
        })
        .await
    }

    pub(super) async fn depth(&self) -> Result<HashMap<SinkName, SinkDepth>, StoreError> {
        self.read(|connection| {
            let mut select = connection
                .prepare(
                    "SELECT sink, state, COUNT(*) FROM deliveries
                     WHERE state IN ('waiting', 'pending', 'in_flight', 'dead') GROUP BY sink, state",
                )
                .map_err(database)?;
            let rows = select
                .query_map([], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0)))
                })
                .map_err(database)?;
            let mut depth: HashMap<SinkName, SinkDepth> = HashMap::new();
            for row in rows {
                let (sink, state, count) = row.map_err(database)?;
                let Some(sink) = SinkName::parse(&sink) else { continue };
                let entry = depth.entry(sink).or_default();
                match state.as_str() {
                    "in_flight" => entry.in_flight += count,
                    "dead" => entry.dead += count,
                    _ => entry.queued += count,
                }
            }
            Ok(depth)
        })
        .await
    }

    pub(super) async fn purge(
        &self,
        retention: Retention,
        now: Millis,
    ) -> Result<Purged, StoreError> {
        self.write(move |connection, _| {
            let delivered_before = now.saturating_sub(millis(retention.delivered));
            let dead_before = now.saturating_sub(millis(retention.dead));
            let forget_before = now.saturating_sub(millis(retention.dedupe_window));
            let mut purged = Purged::default();
            purged.deliveries += connection
                .execute(
                    "DELETE FROM deliveries WHERE state IN ('delivered', 'skipped') AND updated_at < ?1",
                    [delivered_before],
                )
                .map_err(database)?;
            purged.deliveries += connection
                .execute(
                    "DELETE FROM deliveries WHERE state = 'dead' AND updated_at < ?1",
                    [dead_before],
                )
                .map_err(database)?;
            purged.events += connection
                .execute(
                    "DELETE FROM events WHERE received_at < ?1
                     AND id NOT IN (SELECT event_id FROM deliveries)",
                    [forget_before],
                )
                .map_err(database)?;
            Ok(purged)
        })
        .await
    }

    pub(super) async fn set_paused(
        &self,
        user: String,
        paused: bool,
        now: Millis,
    ) -> Result<(), StoreError> {
        self.write(move |connection, _| {
            if paused {
                connection
                    .execute(
                        "INSERT INTO paused_users (user_id, paused_at) VALUES (?1, ?2)
                         ON CONFLICT (user_id) DO NOTHING",
                        params![user, now],
                    )
                    .map_err(database)?;
            } else {
                connection
                    .execute("DELETE FROM paused_users WHERE user_id = ?1", [user])
                    .map_err(database)?;
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn paused_users(&self) -> Result<Vec<(String, Millis)>, StoreError> {
        self.read(|connection| {
            let mut select = connection
                .prepare("SELECT user_id, paused_at FROM paused_users ORDER BY paused_at, user_id")
                .map_err(database)?;
            select
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(database)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(database)
        })
        .await
    }

    pub(super) async fn probe(&self, now: Millis) -> Result<(), StoreError> {
        self.write(move |connection, _| {
            connection
                .execute(
                    "INSERT INTO meta (key, value) VALUES ('last_probe', ?1)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    [now.to_string()],
                )
                .map_err(database)?;
            // A write of the same size can succeed in a full file; ask for a fresh page too.
            let free: i64 = connection
                .query_row("PRAGMA freelist_count", [], |row| row.get(0))
                .map_err(database)?;
            let (count, max): (i64, i64) = (
                connection
                    .query_row("PRAGMA page_count", [], |row| row.get(0))
                    .map_err(database)?,
                connection
                    .query_row("PRAGMA max_page_count", [], |row| row.get(0))
                    .map_err(database)?,
            );
            if free == 0 && count >= max {
                return Err(StoreError::Full);
            }
            Ok(())
        })
        .await
    }
}

/// After the head of a lane is done, lets the next waiting delivery of that lane go.
/// Returns true when one was promoted.
///
/// Both queries name every open state so that SQLite uses the partial `deliveries_lane` index
/// (a narrower `state = 'waiting'` alone would not imply the index's condition and would scan).
fn promote(
    connection: &Connection,
    sink: SinkName,
    lane: Option<&str>,
    now: Millis,
) -> Result<bool, StoreError> {
    let Some(lane) = lane else { return Ok(false) };
    let busy = connection
        .prepare_cached(
            "SELECT 1 FROM deliveries WHERE sink = ?1 AND lane = ?2
             AND state IN ('waiting', 'pending', 'in_flight') AND state <> 'waiting' LIMIT 1",
        )
        .map_err(database)?
        .query_row(params![sink.as_str(), lane], |_| Ok(()))
        .optional()
        .map_err(database)?
        .is_some();
    if busy {
        return Ok(false);
    }
    // Nothing of the lane is pending or in flight, so its oldest open row is waiting.
    let next: Option<i64> = connection
        .prepare_cached(
            "SELECT id FROM deliveries WHERE sink = ?1 AND lane = ?2
             AND state IN ('waiting', 'pending', 'in_flight') ORDER BY id LIMIT 1",
        )
        .map_err(database)?
        .query_row(params![sink.as_str(), lane], |row| row.get(0))
        .optional()
        .map_err(database)?;
    let Some(next) = next else { return Ok(false) };
    connection
        .prepare_cached(
            "UPDATE deliveries SET state = 'pending', due_at = ?2, updated_at = ?2 WHERE id = ?1",
        )
        .map_err(database)?
        .execute(params![next, now])
        .map_err(database)?;
    Ok(true)
}

fn dead_letter_condition(filter: &DeadLetterFilter) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut condition = String::from("d.state = 'dead'");
    let mut values = Vec::new();
    if let Some(sink) = filter.sink {
        values.push(Value::Text(sink.as_str().to_owned()));
        condition.push_str(&format!(" AND d.sink = ?{}", values.len()));
    }
    if let Some(user) = &filter.user {
        values.push(Value::Text(user.clone()));
        condition.push_str(&format!(" AND d.lane = ?{}", values.len()));
    }
    if let Some(since) = filter.since {
        values.push(Value::Integer(since));
        condition.push_str(&format!(" AND d.updated_at >= ?{}", values.len()));
    }
    if let Some(ids) = &filter.ids {
        let mut placeholders = Vec::new();
        for id in ids {
            values.push(Value::Integer(*id));
            placeholders.push(format!("?{}", values.len()));
        }
        if placeholders.is_empty() {
            condition.push_str(" AND 0");
        } else {
            condition.push_str(&format!(" AND d.id IN ({})", placeholders.join(", ")));
        }
    }
    (condition, values)
}

fn write_loop(mut connection: Connection, mut receiver: mpsc::Receiver<Write>, wakers: &Wakers) {
    let mut batch: Vec<Write> = Vec::with_capacity(MAX_BATCH);
    let mut batches_since_checkpoint = 0;
    while let Some(first) = receiver.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        let mut touched = BTreeSet::new();
        let mut replies = Vec::with_capacity(batch.len());
        let committed = match connection.transaction() {
            Err(error) => Err(database(error)),
            Ok(transaction) => {
                for write in batch.drain(..) {
                    replies.push(write(&transaction, &mut touched));
                }
                transaction.commit().map_err(database)
            }
        };
        // Writes that never ran (the transaction could not begin) are dropped: their callers
        // see a closed reply channel, which reads as `StoreError::Unavailable`.
        batch.clear();
        if committed.is_ok() {
            for sink in &touched {
                wakers.wake(*sink);
            }
        }
        for reply in replies {
            reply(committed.clone());
        }
        // The callers have their answers. Now and then, finish the checkpoint the checkpointer
        // has mostly done already (the last few frames), so that the next commit starts the WAL
        // over instead of growing the file.
        batches_since_checkpoint += 1;
        if batches_since_checkpoint >= BATCHES_PER_WAL_RESTART {
            batches_since_checkpoint = 0;
            if let Err(error) =
                connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            {
                tracing::debug!(%error, "Checkpoint did not run");
            }
        }
    }
}

/// Copies committed WAL frames into the database file, off the writer's path. A PASSIVE
/// checkpoint never blocks the writer; it does what it can and tries again.
fn checkpoint_loop(connection: &Connection, stop: &std::sync::atomic::AtomicBool) {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(CHECKPOINT_EVERY);
        if let Err(error) = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(%error, "Checkpoint did not run");
        }
    }
}

/// Runs one write under a savepoint so that its failure undoes only itself.
fn in_savepoint<T>(
    connection: &Connection,
    write: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    connection
        .execute_batch("SAVEPOINT write")
        .map_err(database)?;
    match write(connection) {
        Ok(value) => {
            connection
                .execute_batch("RELEASE write")
                .map_err(database)?;
            Ok(value)
        }
        Err(error) => {
            let _ = connection.execute_batch("ROLLBACK TO write; RELEASE write");
            Err(error)
        }
    }
}

fn database(error: rusqlite::Error) -> StoreError {
    match error.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => StoreError::Full,
        _ => StoreError::Database(error.to_string()),
    }
}

/// Takes an exclusive lock on `<path>.lock` so that two relays never share one store file.
fn lock_file(path: &Path) -> Result<File, StoreError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|error| {
            StoreError::Database(format!(
                "cannot open {}: {error}",
                Path::new(&lock_path).display()
            ))
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(StoreError::Locked(path.display().to_string()))
        }
        Err(std::fs::TryLockError::Error(error)) => Err(StoreError::Database(format!(
            "cannot lock {}: {error}",
            Path::new(&lock_path).display()
        ))),
    }
}
