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
use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The most writes one transaction takes.
const MAX_BATCH: usize = 512;

/// The checkpointer copies committed WAL frames into the database file whenever this many new
/// frames (pages) have been committed, and at least every `CHECKPOINT_EVERY`.
const CHECKPOINT_FRAMES: u32 = 256;
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// When the WAL holds this many frames, the writer finishes the checkpoint itself after
/// answering its callers (the checkpointer has copied all but the last few frames), so that the
/// next commit starts the WAL over instead of growing the file. 2,048 frames of 4 KiB = 8 MiB.
const WAL_RESTART_FRAMES: u32 = 2048;

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
-- Lanes: the head of a lane (pending or in flight) and the rows waiting behind it, in two small
-- indexes so that finding whether a lane is busy, and who is next, is one seek each.
DROP INDEX IF EXISTS deliveries_lane;
CREATE INDEX IF NOT EXISTS deliveries_lane_head ON deliveries (sink, lane)
    WHERE state IN ('pending', 'in_flight');
CREATE INDEX IF NOT EXISTS deliveries_lane_waiting ON deliveries (sink, lane, id)
    WHERE state = 'waiting';
CREATE INDEX IF NOT EXISTS deliveries_finished ON deliveries (state, updated_at)
    WHERE state IN ('delivered', 'dead', 'skipped');
-- No index on deliveries.event_id: it would be a random-order write on every enqueue, and only
-- the once-a-minute purge needs that direction (it uses NOT IN over one scan instead).
CREATE TABLE IF NOT EXISTS paused_users (
    user_id   TEXT PRIMARY KEY,
    paused_at INTEGER NOT NULL
);
";

/// The sinks a transaction gave new due work to; the writer wakes their dispatchers after commit.
type Touched = BTreeSet<SinkName>;

/// One caller's write, waiting in the writer's queue. A write can run more than once: when one
/// write of a group fails, the writer rolls the whole group back and runs every write again,
/// each under its own savepoint, so that the failure undoes only itself (see `write_loop`).
trait Job: Send {
    /// Runs the write in the open transaction and keeps its result; false when it failed.
    fn run(&mut self, connection: &Connection, touched: &mut Touched) -> bool;
    /// Records a failure around the write (its savepoint could not be taken or released).
    fn fail(&mut self, error: StoreError);
    fn succeeded(&self) -> bool;
    /// Answers the caller once the transaction's fate is known.
    fn answer(self: Box<Self>, committed: Result<(), StoreError>);
}

struct WriteJob<T, F> {
    write: F,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for WriteJob<T, F>
where
    T: Send,
    F: FnMut(&Connection, &mut Touched) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, connection: &Connection, touched: &mut Touched) -> bool {
        let result = (self.write)(connection, touched);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn fail(&mut self, error: StoreError) {
        self.result = Some(Err(error));
    }

    fn succeeded(&self) -> bool {
        matches!(self.result, Some(Ok(_)))
    }

    fn answer(self: Box<Self>, committed: Result<(), StoreError>) {
        let result = match (committed, self.result) {
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(StoreError::Unavailable),
            (Err(error), _) => Err(error),
        };
        let _ = self.reply.send(result);
    }
}

/// A claimed row as the writer returns it; the caller decodes the payload.
struct ClaimedRow {
    id: i64,
    event_id: String,
    attempts: u32,
    throttled: u32,
    created_at: Millis,
    lane: Option<String>,
    payload: Option<String>,
}

/// What settling a delivery needs to know about it.
struct SettleRow {
    id: i64,
    sink: SinkName,
    lane: Option<String>,
}

#[derive(Clone)]
pub(super) struct SqliteStore {
    writes: mpsc::Sender<Box<dyn Job>>,
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
        let mut writer = Connection::open(path).map_err(database)?;
        // Checkpoints are not run inside the writer's commits (where every caller of the batch
        // would wait for them) but by a checkpointer thread; see `checkpoint_loop`.
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;
                 PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 67108864;
                 PRAGMA temp_store = MEMORY;",
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
        // Plans must not depend on bound values: otherwise SQLite re-prepares a statement
        // whenever a lane or a time changes (measured: 15% of the writer's time).
        writer
            .set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(database)?;
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
        let wal = Arc::new(WalProgress::default());
        let checkpointer = std::thread::Builder::new()
            .name("botrelay-checkpoint".into())
            .spawn({
                let wal = wal.clone();
                move || checkpoint_loop(&checkpointer, &wal)
            })
            .map_err(|error| {
                StoreError::Database(format!("cannot start the checkpoint thread: {error}"))
            })?
            .thread()
            .clone();
        // After every commit SQLite tells the writer how many frames the WAL holds.
        writer
            .wal_hook(Some({
                let wal = wal.clone();
                move |_: &mut rusqlite::hooks::Wal, frames: std::ffi::c_int| {
                    let frames = u32::try_from(frames).unwrap_or(0);
                    wal.frames.store(frames, Ordering::Relaxed);
                    let copied = wal.copied.load(Ordering::Relaxed);
                    // Below `copied` the WAL has started over.
                    let copied = if frames < copied { 0 } else { copied };
                    if frames - copied >= CHECKPOINT_FRAMES {
                        checkpointer.unpark();
                    }
                    Ok(())
                }
            }))
            .map_err(database)?;

        let (writes, receiver) = mpsc::channel::<Box<dyn Job>>(8192);
        std::thread::Builder::new()
            .name("botrelay-store".into())
            .spawn(move || {
                let _lock = lock;
                write_loop(writer, receiver, &wakers, &wal);
                wal.stop.store(true, Ordering::Relaxed);
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
    /// `write` may run twice (see `Job`); it must act only on the connection and `touched`.
    async fn write<T, F>(&self, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&Connection, &mut Touched) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, receiver) = oneshot::channel();
        let job = WriteJob {
            write,
            result: None,
            reply,
        };
        self.writes
            .send(Box::new(job))
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
            // A lane with waiting rows always has a head, so a busy lane is one with a head.
            let mut lane_busy = connection
                .prepare_cached(LANE_HEAD)
                .map_err(database)?;
            let mut insert_delivery = connection
                .prepare_cached(
                    "INSERT INTO deliveries (event_id, sink, lane, state, due_at, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?5)",
                )
                .map_err(database)?;
            for (NewEvent { event, sinks }, payload) in &encoded {
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
                        Some(lane) => lane_busy
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
                    touched.insert(*sink);
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
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (rows, next_due) = self
            .write(move |connection, _| {
                let mut claim = connection
                    .prepare_cached(
                        "UPDATE deliveries SET state = 'in_flight', due_at = ?3, updated_at = ?2
                         WHERE id IN (
                             SELECT id FROM deliveries
                             WHERE sink = ?1 AND state IN ('pending', 'in_flight') AND due_at <= ?2
                             ORDER BY due_at, id LIMIT ?4)
                         RETURNING id, event_id, attempts, throttled, created_at, lane",
                    )
                    .map_err(database)?;
                let mut payload = connection
                    .prepare_cached("SELECT payload FROM events WHERE id = ?1")
                    .map_err(database)?;
                let mut rows = claim
                    .query_map(params![sink.as_str(), now, lease_end, limit], |row| {
                        Ok(ClaimedRow {
                            id: row.get(0)?,
                            event_id: row.get(1)?,
                            attempts: row.get(2)?,
                            throttled: row.get(3)?,
                            created_at: row.get(4)?,
                            lane: row.get(5)?,
                            payload: None,
                        })
                    })
                    .map_err(database)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(database)?;
                for row in &mut rows {
                    row.payload = payload
                        .query_row([&row.event_id], |stored| stored.get(0))
                        .optional()
                        .map_err(database)?;
                }
                let next_due = connection
                    .prepare_cached(
                        "SELECT due_at FROM deliveries
                         WHERE sink = ?1 AND state IN ('pending', 'in_flight')
                         ORDER BY due_at LIMIT 1",
                    )
                    .map_err(database)?
                    .query_row([sink.as_str()], |row| row.get::<_, i64>(0))
                    .optional()
                    .map_err(database)?;
                Ok((rows, next_due))
            })
            .await?;
        // Decoding runs here, on the caller's thread, to keep the one writer thread short.
        let mut batch = ClaimBatch {
            deliveries: Vec::with_capacity(rows.len()),
            next_due,
        };
        for row in rows {
            let event = match row.payload.as_deref().map(serde_json::from_str::<Event>) {
                Some(Ok(event)) => event,
                // Cannot happen while purge keeps events with open deliveries and the encoding
                // is ours; if it does, dead-letter the row so that neither its lane nor the
                // sink's claims get stuck on it.
                unreadable => {
                    let reason = match unreadable {
                        Some(Err(error)) => format!("the stored event is unreadable: {error}"),
                        _ => "the event is missing from the store".to_owned(),
                    };
                    let unreadable = SettleRow {
                        id: row.id,
                        sink,
                        lane: row.lane,
                    };
                    self.settle_row(
                        unreadable,
                        Settle::Dead {
                            status: None,
                            error: reason,
                        },
                        now,
                    )
                    .await?;
                    continue;
                }
            };
            batch.deliveries.push(Claimed {
                id: row.id,
                sink,
                event,
                attempts: row.attempts,
                throttled: row.throttled,
                created_at: row.created_at,
            });
        }
        Ok(batch)
    }

    pub(super) async fn settle(
        &self,
        delivery: &Claimed,
        settle: Settle,
        now: Millis,
    ) -> Result<(), StoreError> {
        let row = SettleRow {
            id: delivery.id,
            sink: delivery.sink,
            lane: delivery.event.user_id.clone(),
        };
        self.settle_row(row, settle, now).await
    }

    async fn settle_row(
        &self,
        row: SettleRow,
        settle: Settle,
        now: Millis,
    ) -> Result<(), StoreError> {
        let SettleRow { id, sink, lane } = row;
        self.write(move |connection, touched| {
            let done = match &settle {
                Settle::Delivered { status } => {
                    connection
                        .prepare_cached(
                            "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1,
                             last_status = ?3, last_error = NULL, updated_at = ?2,
                             first_attempt_at = COALESCE(first_attempt_at, ?2), last_attempt_at = ?2
                             WHERE id = ?1 AND state = 'in_flight'",
                        )
                        .and_then(|mut update| update.execute(params![id, now, status]))
                        .map_err(database)?;
                    true
                }
                Settle::Retry { due_at, counted, status, error } => {
                    connection
                        .prepare_cached(
                            "UPDATE deliveries SET state = 'pending', attempts = attempts + 1,
                             throttled = throttled + ?3, due_at = ?4, last_status = ?5,
                             last_error = ?6, updated_at = ?2,
                             first_attempt_at = COALESCE(first_attempt_at, ?2), last_attempt_at = ?2
                             WHERE id = ?1 AND state = 'in_flight'",
                        )
                        .and_then(|mut update| {
                            update.execute(params![id, now, i64::from(!counted), due_at, status, error])
                        })
                        .map_err(database)?;
                    touched.insert(sink);
                    false
                }
                Settle::Dead { status, error } => {
                    connection
                        .prepare_cached(
                            "UPDATE deliveries SET state = 'dead', attempts = attempts + 1,
                             last_status = ?3, last_error = ?4, updated_at = ?2,
                             first_attempt_at = COALESCE(first_attempt_at, ?2), last_attempt_at = ?2
                             WHERE id = ?1 AND state = 'in_flight'",
                        )
                        .and_then(|mut update| update.execute(params![id, now, status, error]))
                        .map_err(database)?;
                    true
                }
                Settle::Skipped { reason } => {
                    connection
                        .prepare_cached(
                            "UPDATE deliveries SET state = 'skipped', last_error = ?3, updated_at = ?2
                             WHERE id = ?1 AND state = 'in_flight'",
                        )
                        .and_then(|mut update| update.execute(params![id, now, reason]))
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
                    .execute("DELETE FROM paused_users WHERE user_id = ?1", [&user])
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

/// The head of a lane: its one delivery that is pending or in flight, if any. Only the head of
/// a lane is ever pending or in flight; the rows behind it wait (invariant kept by `promote`).
const LANE_HEAD: &str = "SELECT 1 FROM deliveries
    WHERE sink = ?1 AND lane = ?2 AND state IN ('pending', 'in_flight') LIMIT 1";

/// After the head of a lane is done, lets the next waiting delivery of that lane go.
/// Returns true when one was promoted.
///
/// The queries repeat the partial indexes' conditions exactly, so that SQLite uses them.
fn promote(
    connection: &Connection,
    sink: SinkName,
    lane: Option<&str>,
    now: Millis,
) -> Result<bool, StoreError> {
    let Some(lane) = lane else { return Ok(false) };
    let busy = connection
        .prepare_cached(LANE_HEAD)
        .map_err(database)?
        .query_row(params![sink.as_str(), lane], |_| Ok(()))
        .optional()
        .map_err(database)?
        .is_some();
    if busy {
        return Ok(false);
    }
    let next: Option<i64> = connection
        .prepare_cached(
            "SELECT id FROM deliveries WHERE sink = ?1 AND lane = ?2 AND state = 'waiting'
             ORDER BY id LIMIT 1",
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

fn write_loop(
    mut connection: Connection,
    mut receiver: mpsc::Receiver<Box<dyn Job>>,
    wakers: &Wakers,
    wal: &WalProgress,
) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = receiver.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        let mut touched = Touched::new();
        // First, all writes share the transaction with no savepoints (a savepoint copies every
        // page it touches). Only when one of them fails is the group run again with a savepoint
        // per write, so that the failure undoes only its own changes.
        let committed = match run_group(&mut connection, &mut batch, &mut touched, false) {
            Ok(GroupRun::Committed) => Ok(()),
            Ok(GroupRun::WriteFailed) => {
                touched.clear();
                match run_group(&mut connection, &mut batch, &mut touched, true) {
                    Ok(_) => Ok(()),
                    Err(error) => Err(error),
                }
            }
            Err(error) => Err(error),
        };
        if committed.is_ok() {
            for sink in &touched {
                wakers.wake(*sink);
            }
        }
        for job in batch.drain(..) {
            job.answer(committed.clone());
        }
        // The callers have their answers. When the WAL is long, finish the checkpoint the
        // checkpointer has mostly done already (the last few frames), so that the next commit
        // starts the WAL over instead of growing the file.
        if wal.frames.load(Ordering::Relaxed) >= WAL_RESTART_FRAMES
            && let Err(error) =
                connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            tracing::debug!(%error, "Checkpoint did not run");
        }
    }
}

enum GroupRun {
    Committed,
    /// A write failed without savepoints: the group was rolled back and must run again.
    WriteFailed,
}

/// Runs every job of `batch` in one transaction and commits it. Without `isolated`, the first
/// failing write rolls the whole transaction back; with it, each write runs under its own
/// savepoint and a failure undoes only that write.
fn run_group(
    connection: &mut Connection,
    batch: &mut [Box<dyn Job>],
    touched: &mut Touched,
    isolated: bool,
) -> Result<GroupRun, StoreError> {
    let transaction = connection.transaction().map_err(database)?;
    for job in batch.iter_mut() {
        if isolated {
            run_in_savepoint(&transaction, job.as_mut(), touched);
        } else if !job.run(&transaction, touched) {
            transaction.rollback().map_err(database)?;
            return Ok(GroupRun::WriteFailed);
        }
    }
    transaction.commit().map_err(database)?;
    Ok(GroupRun::Committed)
}

/// How far the WAL is: written by the writer's WAL hook and by the checkpointer.
#[derive(Default)]
struct WalProgress {
    /// Frames in the WAL after the last commit.
    frames: AtomicU32,
    /// Frames the checkpointer had copied into the database file at the end of its last pass.
    copied: AtomicU32,
    /// Set when the writer has stopped.
    stop: AtomicBool,
}

/// Copies committed WAL frames into the database file, off the writer's path: woken by the
/// writer's WAL hook every `CHECKPOINT_FRAMES`, and every `CHECKPOINT_EVERY` in any case. A
/// PASSIVE checkpoint never blocks the writer; it does what it can and tries again.
fn checkpoint_loop(connection: &Connection, wal: &WalProgress) {
    while !wal.stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(CHECKPOINT_EVERY);
        match connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            row.get::<_, i64>(2)
        }) {
            Ok(copied) => wal
                .copied
                .store(u32::try_from(copied).unwrap_or(0), Ordering::Relaxed),
            Err(error) => tracing::debug!(%error, "Checkpoint did not run"),
        }
    }
}

/// Runs one job under a savepoint so that its failure undoes only itself.
fn run_in_savepoint(connection: &Connection, job: &mut dyn Job, touched: &mut Touched) {
    let run = |sql: &str| {
        connection
            .prepare_cached(sql)
            .and_then(|mut statement| statement.execute([]))
            .map_err(database)
    };
    if let Err(error) = run("SAVEPOINT write") {
        job.fail(error);
        return;
    }
    let released = if job.run(connection, touched) {
        run("RELEASE write")
    } else {
        Ok(0)
    };
    if let Err(error) = released {
        job.fail(error);
    }
    if !job.succeeded() {
        let _ = run("ROLLBACK TO write");
        let _ = run("RELEASE write");
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
