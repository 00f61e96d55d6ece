//! The embedded store: SQLite in WAL mode, every acknowledged write fsynced before its answer.
//!
//! Three threads own the store's connections:
//! - the writer runs callers' writes as they arrive inside one open transaction (a group), with
//!   no savepoints; if one write fails, the group is rolled back and run again with a savepoint
//!   per write, so that the failure undoes only itself. It commits the group as soon as the
//!   syncer is free, so under load a group is everything that arrived during one fsync (group
//!   commit);
//! - the syncer fsyncs the WAL after each commit and only then wakes the dispatchers and
//!   answers the group's callers. This is `synchronous = FULL`'s guarantee (nothing is
//!   acknowledged before it is on disk), with the fsync moved off the writer so that it overlaps
//!   the next group's work; the connection itself runs `synchronous = NORMAL`;
//! - the checkpointer copies WAL frames into the database file, woken by the writer's WAL hook.
//!
//! Reads use a fourth connection (WAL lets it read while the writer writes).
//!
//! Lanes: a delivery row carries `lane` = the user. Only the oldest open row of a (sink, lane) is
//! `pending` or `in_flight` (the lane's head); the rows behind it are `waiting` until it is
//! delivered, dead or skipped. So one user's deliveries to one sink keep their order, and a
//! failing user blocks nobody else.

use super::{
    ClaimBatch, Claimed, DeadLetter, DeadLetterFilter, EnqueueReport, NewEvent, Purged,
    ReplayOutcome, Retention, Settle, SinkDepth, StoreError, Wakers,
};
use crate::clock::{Millis, millis};
use crate::event::Event;
use crate::sink_name::SinkName;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The most writes one transaction takes.
const MAX_BATCH: usize = 512;

/// The most rows one purge write deletes.
const PURGE_CHUNK: u32 = 2000;

/// The most dead letters one write of a replay requeues (see `replay`).
const REPLAY_CHUNK: usize = 2000;

// Queries on finished rows repeat `deliveries_finished`'s own condition: SQLite uses a partial
// index only when the query's WHERE visibly implies the index's, and it does not see that
// `state = 'dead'` implies `state IN ('delivered', 'dead', 'skipped')` (without it: a scan of
// every delivery kept). `query_plans_use_the_indexes` checks each plan.
const FINISHED: &str = "state IN ('delivered', 'dead', 'skipped')";

const PURGE_DELIVERED: &str = "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries
     WHERE state IN ('delivered', 'dead', 'skipped') AND state IN ('delivered', 'skipped')
     AND updated_at < ?1 LIMIT ?2)";
const PURGE_DEAD: &str = "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries
     WHERE state IN ('delivered', 'dead', 'skipped') AND state = 'dead'
     AND updated_at < ?1 LIMIT ?2)";
/// An event is kept while any delivery refers to it. Its deliveries were created in the same
/// write with `created_at` = its `received_at`, so only deliveries created before the cut can
/// refer to an event before it: an index range, not the whole table.
const PURGE_EVENTS: &str = "DELETE FROM events WHERE rowid IN (SELECT rowid FROM events
     WHERE received_at < ?1
     AND id NOT IN (SELECT event_id FROM deliveries WHERE created_at < ?1) LIMIT ?2)";

/// Queue depth per sink and state, each state through its own partial index.
const DEPTH: [&str; 3] = [
    "SELECT sink, state, COUNT(*) FROM deliveries WHERE state IN ('pending', 'in_flight')
     GROUP BY sink, state",
    "SELECT sink, state, COUNT(*) FROM deliveries WHERE state = 'waiting' GROUP BY sink",
    "SELECT sink, state, COUNT(*) FROM deliveries
     WHERE state IN ('delivered', 'dead', 'skipped') AND state = 'dead' GROUP BY sink",
];

/// The checkpointer copies committed WAL frames into the database file whenever this many new
/// frames (pages) have been committed, and at least every `CHECKPOINT_EVERY`.
const CHECKPOINT_FRAMES: u32 = 256;
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// When the WAL holds this many frames, the writer finishes the checkpoint itself between two
/// groups (the checkpointer has copied all but the last few frames), so that the next commit
/// starts the WAL over instead of growing the file. 8,192 frames of 4 KiB = 32 MiB; measured
/// against 2,048 and 16,384 and no restart at all (`benches/`), this was the fastest.
const WAL_RESTART_FRAMES: u32 = 8192;

/// While the syncer is free, the writer commits as soon as the queue is empty or its group has
/// this many writes.
const DRAIN_BEFORE_COMMIT: usize = 64;

/// Committed groups waiting for the syncer; when it falls this far behind, the writer waits.
const MAX_UNSYNCED_GROUPS: usize = 64;

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
    created_at       INTEGER NOT NULL, -- = the event's received_at, always (the purge needs it)
    updated_at       INTEGER NOT NULL,
    first_attempt_at INTEGER,
    last_attempt_at  INTEGER,
    last_status      INTEGER,
    last_error       TEXT,             -- redacted
    replayed_at      INTEGER           -- the last replay: the ttl counts from here (NULL: created_at)
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
-- For the purge: the deliveries old enough to refer to an event past the dedupe window. Written
-- in time order, so it costs each group one page at its right edge.
CREATE INDEX IF NOT EXISTS deliveries_created ON deliveries (created_at);
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
    /// The write's error, when it failed.
    fn error(&self) -> Option<StoreError>;
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

    fn error(&self) -> Option<StoreError> {
        match &self.result {
            Some(Err(error)) => Some(error.clone()),
            _ => None,
        }
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
    ttl_from: Millis,
    lane: Option<String>,
    payload: Option<String>,
}

/// What settling a delivery needs to know about it.
struct SettleRow {
    id: i64,
    sink: SinkName,
    lane: Option<String>,
    /// The claim's lease end, which the row still carries while the claim holds.
    lease_until: Millis,
}

#[derive(Clone)]
pub(super) struct SqliteStore {
    writes: mpsc::Sender<ToWriter>,
    reader: Arc<Mutex<Connection>>,
    #[cfg(test)]
    wal: Arc<WalProgress>,
}

impl SqliteStore {
    pub(super) fn open(
        path: &Path,
        max_bytes: Option<u64>,
        wakers: Arc<Wakers>,
    ) -> Result<SqliteStore, StoreError> {
        let directory = directory_of(path);
        std::fs::create_dir_all(directory).map_err(|error| {
            StoreError::Database(format!("cannot create {}: {error}", directory.display()))
        })?;
        let lock = lock_file(path)?;
        let mut writer = Connection::open(path).map_err(database)?;
        // `synchronous = NORMAL` only because the syncer thread fsyncs the WAL itself after
        // every commit and before any caller is answered: as durable as FULL, but the fsync of
        // one group overlaps the next group's work (see `sync_loop`). NORMAL still syncs the WAL
        // before a checkpoint and the database file after one.
        // Checkpoints are not run inside the writer's commits (where every caller of the batch
        // would wait for them) but by a checkpointer thread; see `checkpoint_loop`.
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;
                 PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 67108864;
                 PRAGMA temp_store = MEMORY; PRAGMA cache_size = -8192;",
            )
            .map_err(database)?;
        // Plans must not depend on bound values: otherwise SQLite re-prepares a statement
        // whenever a lane or a time changes (measured: 15% of the writer's time).
        writer
            .set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(database)?;
        writer.execute_batch(SCHEMA).map_err(database)?;
        migrate(&writer)?;
        // This process holds the file lock, so every lease in the file belongs to a process
        // that is gone: release them now instead of waiting for them to run out.
        writer
            .execute(
                "UPDATE deliveries SET state = 'pending', due_at = 0 WHERE state = 'in_flight'",
                [],
            )
            .map_err(database)?;
        // The cap applies from here: the start-up writes above (the schema, a migration, the
        // leases of the last run) must not keep a full store from starting and draining.
        if let Some(max_bytes) = max_bytes {
            let page_size: i64 = writer
                .query_row("PRAGMA page_size", [], |row| row.get(0))
                .map_err(database)?;
            let pages = (i64::try_from(max_bytes).unwrap_or(i64::MAX) / page_size.max(1)).max(1);
            writer
                .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
                .map_err(database)?;
        }
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

        let wal_file = open_wal(path)?;
        let (writes, receiver) = mpsc::channel::<ToWriter>(8192);
        let (committed, uncommitted) = std::sync::mpsc::sync_channel(MAX_UNSYNCED_GROUPS);
        let syncer_idle = Arc::new(AtomicBool::new(true));
        std::thread::Builder::new()
            .name("botrelay-sync".into())
            .spawn({
                // Weak: the store's handles alone keep the writer's queue open.
                let (wal, idle, writer) = (wal.clone(), syncer_idle.clone(), writes.downgrade());
                move || {
                    // The syncer is the last to finish, so it holds the file lock.
                    let _lock = lock;
                    sync_loop(&wal_file, &uncommitted, &wakers, &wal, &idle, &writer);
                    wal.stop.store(true, Ordering::Relaxed);
                }
            })
            .map_err(|error| {
                StoreError::Database(format!("cannot start the sync thread: {error}"))
            })?;
        #[cfg(test)]
        let wal_progress = wal.clone();
        std::thread::Builder::new()
            .name("botrelay-store".into())
            .spawn(move || write_loop(&writer, receiver, &committed, &syncer_idle, &wal))
            .map_err(|error| {
                StoreError::Database(format!("cannot start the writer thread: {error}"))
            })?;
        Ok(SqliteStore {
            writes,
            reader: Arc::new(Mutex::new(reader)),
            #[cfg(test)]
            wal: wal_progress,
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
            .send(ToWriter::Write(Box::new(job)))
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
                         RETURNING id, event_id, attempts, throttled,
                                   COALESCE(replayed_at, created_at), lane",
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
                            ttl_from: row.get(4)?,
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
                        lease_until: lease_end,
                    };
                    // If even that fails, the row's lease frees it later; the rows claimed
                    // with it go out now rather than wait for theirs.
                    if let Err(error) = self
                        .settle_row(
                            unreadable,
                            Settle::Dead {
                                status: None,
                                error: reason,
                                attempted: false,
                            },
                            now,
                        )
                        .await
                    {
                        tracing::warn!(delivery = row.id, %error, "Cannot dead-letter a delivery whose event is unreadable");
                    }
                    continue;
                }
            };
            batch.deliveries.push(Claimed {
                id: row.id,
                sink,
                event,
                attempts: row.attempts,
                throttled: row.throttled,
                ttl_from: row.ttl_from,
                lease_until: lease_end,
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
            lease_until: delivery.lease_until,
        };
        self.settle_row(row, settle, now).await
    }

    async fn settle_row(
        &self,
        row: SettleRow,
        settle: Settle,
        now: Millis,
    ) -> Result<(), StoreError> {
        let SettleRow {
            id,
            sink,
            lane,
            lease_until,
        } = row;
        self.write(move |connection, touched| {
            // Each update applies only while the row is still under this claim's lease.
            let (changed, done) = match &settle {
                Settle::Delivered { status } => (
                    execute(
                        connection,
                        "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1,
                             last_status = ?3, last_error = NULL, updated_at = ?2,
                             first_attempt_at = COALESCE(first_attempt_at, ?2), last_attempt_at = ?2
                             WHERE id = ?1 AND state = 'in_flight' AND due_at = ?4",
                        params![id, now, status, lease_until],
                    )?,
                    true,
                ),
                Settle::Retry {
                    due_at,
                    counted,
                    status,
                    error,
                } => (
                    execute(
                        connection,
                        "UPDATE deliveries SET state = 'pending', attempts = attempts + 1,
                             throttled = throttled + ?3, due_at = ?4, last_status = ?5,
                             last_error = ?6, updated_at = ?2,
                             first_attempt_at = COALESCE(first_attempt_at, ?2), last_attempt_at = ?2
                             WHERE id = ?1 AND state = 'in_flight' AND due_at = ?7",
                        params![
                            id,
                            now,
                            i64::from(!counted),
                            due_at,
                            status,
                            error,
                            lease_until
                        ],
                    )?,
                    false,
                ),
                Settle::Dead {
                    status,
                    error,
                    attempted: true,
                } => (
                    execute(
                        connection,
                        "UPDATE deliveries SET state = 'dead', attempts = attempts + 1,
                             last_status = ?3, last_error = ?4, updated_at = ?2,
                             first_attempt_at = COALESCE(first_attempt_at, ?2), last_attempt_at = ?2
                             WHERE id = ?1 AND state = 'in_flight' AND due_at = ?5",
                        params![id, now, status, error, lease_until],
                    )?,
                    true,
                ),
                // Dead before this claim's request: the attempts, their times and the last
                // answer (of an earlier attempt) stay, the reason goes in front of its error.
                Settle::Dead {
                    status,
                    error,
                    attempted: false,
                } => (
                    execute(
                        connection,
                        "UPDATE deliveries SET state = 'dead',
                             last_status = COALESCE(?3, last_status),
                             last_error = CASE WHEN last_error IS NULL THEN ?4
                                 ELSE ?4 || '; last error: ' || last_error END,
                             updated_at = ?2
                             WHERE id = ?1 AND state = 'in_flight' AND due_at = ?5",
                        params![id, now, status, error, lease_until],
                    )?,
                    true,
                ),
                Settle::Skipped { reason } => (
                    execute(
                        connection,
                        "UPDATE deliveries SET state = 'skipped', last_error = ?3, updated_at = ?2
                             WHERE id = ?1 AND state = 'in_flight' AND due_at = ?4",
                        params![id, now, reason, lease_until],
                    )?,
                    true,
                ),
            };
            if changed == 0 {
                // The lease ran out and the delivery was claimed again (or released by a
                // restart): the newer claim's outcome is the one that counts.
                tracing::warn!(
                    delivery = id,
                    "An attempt's outcome came after its lease ran out; it is not recorded"
                );
                return Ok(());
            }
            if !done || promote(connection, sink, lane.as_deref(), now)? {
                touched.insert(sink);
            }
            Ok(())
        })
        .await
    }

    /// Requeues the matching dead letters, oldest first, in writes of at most `REPLAY_CHUNK`
    /// rows, so that replaying a large dead-letter store never holds the writer (and with it
    /// every webhook's answer) for long. The ids are read first, off the writer; a row that is
    /// no longer dead when its write runs (replayed by another request, or purged) is left
    /// alone, and a row that dies again during the replay is not picked up twice. Rows of a
    /// sink not in `replayable` (not enabled now, or unknown to this build) stay dead and are
    /// counted: no dispatcher would take them.
    pub(super) async fn replay(
        &self,
        filter: DeadLetterFilter,
        replayable: &[SinkName],
        now: Millis,
    ) -> Result<ReplayOutcome, StoreError> {
        let rows = self
            .read(move |connection| {
                let (condition, values) = dead_letter_condition(&filter);
                let mut select = connection
                    .prepare(&replay_select(&condition))
                    .map_err(database)?;
                select
                    .query_map(rusqlite::params_from_iter(values.iter()), |row| {
                        Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
                    })
                    .map_err(database)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(database)
            })
            .await?;
        let mut outcome = ReplayOutcome::default();
        let mut letters: Vec<(i64, SinkName)> = Vec::with_capacity(rows.len());
        for (id, name) in rows {
            match SinkName::parse(&name) {
                Some(sink) if replayable.contains(&sink) => letters.push((id, sink)),
                _ => *outcome.left_dead.entry(name).or_default() += 1,
            }
        }
        for chunk in letters.chunks(REPLAY_CHUNK) {
            let chunk = chunk.to_vec();
            outcome.replayed += self
                .write(move |connection, touched| replay_chunk(connection, touched, &chunk, now))
                .await?;
        }
        Ok(outcome)
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
                            d.last_status, d.last_error, d.first_attempt_at, d.last_attempt_at,
                            d.updated_at
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
                        dead_at: row.get(10)?,
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
            let mut depth: HashMap<SinkName, SinkDepth> = HashMap::new();
            for sql in DEPTH {
                let mut select = connection.prepare_cached(sql).map_err(database)?;
                let rows = select
                    .query_map([], |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, String>(1)?,
                            u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0),
                        ))
                    })
                    .map_err(database)?;
                for row in rows {
                    let (sink, state, count) = row.map_err(database)?;
                    let Some(sink) = SinkName::parse(&sink) else {
                        continue;
                    };
                    let entry = depth.entry(sink).or_default();
                    match state.as_str() {
                        "in_flight" => entry.in_flight += count,
                        "dead" => entry.dead += count,
                        _ => entry.queued += count,
                    }
                }
            }
            Ok(depth)
        })
        .await
    }

    /// Deletes what the retention bounds let go, in writes of at most `PURGE_CHUNK` rows, so
    /// that a large purge (the first after a long stop, or a busy relay's minute) never holds
    /// the writer, and with it every webhook's answer, for long.
    pub(super) async fn purge(
        &self,
        retention: Retention,
        now: Millis,
    ) -> Result<Purged, StoreError> {
        let delivered_before = now.saturating_sub(millis(retention.delivered));
        let dead_before = now.saturating_sub(millis(retention.dead));
        let forget_before = now.saturating_sub(millis(retention.dedupe_window));
        // Deliveries first: an event goes only once no delivery refers to it.
        Ok(Purged {
            deliveries: self
                .purge_in_chunks(PURGE_DELIVERED, delivered_before)
                .await?
                + self.purge_in_chunks(PURGE_DEAD, dead_before).await?,
            events: self.purge_in_chunks(PURGE_EVENTS, forget_before).await?,
        })
    }

    /// Runs one purge statement (`?1` = the cut, `?2` = the chunk) in writes of at most
    /// `PURGE_CHUNK` rows until a write deletes fewer; returns the rows deleted.
    async fn purge_in_chunks(
        &self,
        sql: &'static str,
        before: Millis,
    ) -> Result<usize, StoreError> {
        let mut total = 0;
        loop {
            let deleted = self
                .write(move |connection, _| execute(connection, sql, params![before, PURGE_CHUNK]))
                .await?;
            total += deleted;
            if deleted < PURGE_CHUNK as usize {
                return Ok(total);
            }
        }
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

/// Brings a store written by an earlier version up to `SCHEMA` (which only creates what is
/// missing). Each step checks for itself whether it is needed, so this runs at every start.
fn migrate(connection: &Connection) -> Result<(), StoreError> {
    // 0.1 replays reset `created_at` to start the ttl again; that column must stay the event's
    // receipt time (the purge keeps an event while a delivery created before the cut exists).
    // The rows such a replay changed get their receipt time back, and the replay time moves
    // to `replayed_at` (where the ttl now counts from), in the transaction that adds it.
    if !has_column(connection, "deliveries", "replayed_at").map_err(database)? {
        connection
            .execute_batch(
                "BEGIN;
                 ALTER TABLE deliveries ADD COLUMN replayed_at INTEGER;
                 UPDATE deliveries
                    SET replayed_at = created_at,
                        created_at = (SELECT received_at FROM events WHERE id = event_id)
                  WHERE created_at > (SELECT received_at FROM events WHERE id = event_id);
                 COMMIT;",
            )
            .map_err(database)?;
    }
    Ok(())
}

fn has_column(connection: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    connection.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
        params![table, column],
        |row| row.get(0),
    )
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

/// The dead letters a replay takes, oldest first, for a `dead_letter_condition`.
fn replay_select(condition: &str) -> String {
    format!("SELECT d.id, d.sink FROM deliveries d WHERE {condition} ORDER BY d.id")
}

/// Requeues the dead letters among `letters` (ascending ids, known sinks). A replayed letter
/// rejoins its lane at its original place (its id): it waits if the lane is busy, and is the
/// next to go otherwise.
fn replay_chunk(
    connection: &Connection,
    touched: &mut Touched,
    letters: &[(i64, SinkName)],
    now: Millis,
) -> Result<usize, StoreError> {
    // A lane-less letter has no order to keep and goes at once; a lane's letter waits, and
    // `promote` lets the lane's oldest go if the lane is free.
    let mut requeue = connection
        .prepare_cached(
            "UPDATE deliveries SET attempts = 0, throttled = 0,
             state = CASE WHEN lane IS NULL THEN 'pending' ELSE 'waiting' END,
             replayed_at = ?2, updated_at = ?2, due_at = ?2
             WHERE id = ?1 AND state = 'dead' RETURNING lane",
        )
        .map_err(database)?;
    let mut requeued = 0;
    for (id, sink) in letters {
        let lane: Option<Option<String>> = requeue
            .query_row(params![id, now], |row| row.get(0))
            .optional()
            .map_err(database)?;
        let Some(lane) = lane else { continue };
        promote(connection, *sink, lane.as_deref(), now)?;
        touched.insert(*sink);
        requeued += 1;
    }
    Ok(requeued)
}

fn dead_letter_condition(filter: &DeadLetterFilter) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut condition = format!("d.{FINISHED} AND d.state = 'dead'");
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
    if let Some(after) = filter.after {
        values.push(Value::Integer(after));
        condition.push_str(&format!(" AND d.id > ?{}", values.len()));
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

/// What the writer thread receives: a write, or the syncer's word that it is free again.
enum ToWriter {
    Write(Box<dyn Job>),
    Synced,
}

/// The writer: runs writes as they arrive inside an open transaction (a group), and commits
/// the group as soon as the syncer is free to fsync it. While the syncer's fsync of one group
/// is under way, the next group grows; so under load a group holds everything that arrived
/// during one fsync, and the pages every write touches (the tail of the events table, the lane
/// heads) go to the WAL once per group rather than once per write.
fn write_loop(
    connection: &Connection,
    mut receiver: mpsc::Receiver<ToWriter>,
    syncer: &std::sync::mpsc::SyncSender<CommittedGroup>,
    syncer_idle: &AtomicBool,
    wal: &WalProgress,
) {
    let mut open: Option<Group> = None;
    loop {
        let message = match &open {
            // Nothing open: wait for work.
            None => receiver.blocking_recv(),
            Some(group) => {
                let idle = syncer_idle.load(Ordering::Acquire);
                // Commit when the syncer is free and the queue is drained (or the group is
                // big already), or when the group is full, or once a write lost the
                // transaction (see `Group::add`).
                if (idle && group.jobs.len() >= DRAIN_BEFORE_COMMIT)
                    || group.jobs.len() >= MAX_BATCH
                    || group.lost_once()
                {
                    if let Some(group) = open.take() {
                        hand_over(connection, group, syncer, syncer_idle, wal);
                    }
                    continue;
                }
                match receiver.try_recv() {
                    Ok(message) => Some(message),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                    Err(mpsc::error::TryRecvError::Empty) if idle => {
                        if let Some(group) = open.take() {
                            hand_over(connection, group, syncer, syncer_idle, wal);
                        }
                        continue;
                    }
                    // The syncer is busy: wait for more work or for its word.
                    Err(mpsc::error::TryRecvError::Empty) => receiver.blocking_recv(),
                }
            }
        };
        match message {
            Some(ToWriter::Write(job)) => {
                open.get_or_insert_with(|| Group::begin(connection))
                    .add(connection, job);
            }
            Some(ToWriter::Synced) => {}
            None => break,
        }
    }
    if let Some(group) = open.take() {
        hand_over(connection, group, syncer, syncer_idle, wal);
    }
}

/// Commits `group` and gives it to the syncer, which answers its callers once it is durable.
fn hand_over(
    connection: &Connection,
    group: Group,
    syncer: &std::sync::mpsc::SyncSender<CommittedGroup>,
    syncer_idle: &AtomicBool,
    wal: &WalProgress,
) {
    let committed = group.commit(connection);
    syncer_idle.store(false, Ordering::Release);
    if let Err(std::sync::mpsc::SendError(group)) = syncer.send(committed) {
        for job in group.jobs {
            job.answer(Err(StoreError::Unavailable));
        }
    }
    // When the WAL is long, finish the checkpoint the checkpointer has mostly done already
    // (the last few frames), so that the next commit starts the WAL over instead of growing
    // the file.
    if wal.frames.load(Ordering::Relaxed) >= WAL_RESTART_FRAMES
        && let Err(error) = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
    {
        tracing::debug!(%error, "Checkpoint did not run");
    }
}

/// An open transaction and the writes run in it so far.
struct Group {
    jobs: Vec<Box<dyn Job>>,
    /// Per write: it made SQLite roll the whole transaction back (a full disk): it keeps its
    /// error and is not run again.
    lost: Vec<bool>,
    touched: Touched,
    /// Writes run under a savepoint each (after one failed without).
    isolated: bool,
    /// The transaction itself failed; every write of the group gets this error.
    broken: Option<StoreError>,
}

impl Group {
    fn begin(connection: &Connection) -> Group {
        Group {
            jobs: Vec::with_capacity(64),
            lost: Vec::with_capacity(64),
            touched: Touched::new(),
            isolated: false,
            broken: statement(connection, "BEGIN").err(),
        }
    }

    /// True once a write of the group lost the transaction: the writer commits the group at
    /// once rather than let it grow, since every further loss runs the group again.
    fn lost_once(&self) -> bool {
        self.lost.contains(&true)
    }

    /// Runs `job` in the group. Writes share the transaction without savepoints (a savepoint
    /// copies every page it touches); when one fails, the group is rolled back and every write
    /// of it run again, each under its own savepoint, so that the failure undoes only itself.
    ///
    /// A write that makes SQLite roll the whole transaction back by itself (a full disk, an
    /// I/O error) fails with its own error and is not run again; the other writes of the group
    /// are run again in a new transaction, so that in a full store the writes that fit (a
    /// settle, a claim) still commit beside the ones that do not (an enqueue).
    fn add(&mut self, connection: &Connection, mut job: Box<dyn Job>) {
        if self.broken.is_some() {
            self.jobs.push(job);
            self.lost.push(false);
            return;
        }
        if self.isolated {
            run_in_savepoint(connection, job.as_mut(), &mut self.touched);
            let lost = transaction_lost(connection, job.as_ref()).is_some();
            self.jobs.push(job);
            self.lost.push(lost);
            if lost {
                self.run_again(connection);
            }
            return;
        }
        let ok = job.run(connection, &mut self.touched);
        let lost = !ok && transaction_lost(connection, job.as_ref()).is_some();
        self.jobs.push(job);
        self.lost.push(lost);
        if ok {
            return;
        }
        self.isolated = true;
        if !lost && let Err(error) = statement(connection, "ROLLBACK") {
            self.broken = Some(error);
            return;
        }
        self.run_again(connection);
    }

    /// Runs the group's writes again in a new transaction, each under its own savepoint, but
    /// for those that lost a transaction; until none loses it again (each round leaves out
    /// one more write, so this ends).
    fn run_again(&mut self, connection: &Connection) {
        loop {
            self.touched.clear();
            if let Err(error) = statement(connection, "BEGIN") {
                self.broken = Some(error);
                return;
            }
            let mut lost_again = false;
            for (job, lost) in self.jobs.iter_mut().zip(self.lost.iter_mut()) {
                if *lost {
                    continue;
                }
                run_in_savepoint(connection, job.as_mut(), &mut self.touched);
                if transaction_lost(connection, job.as_ref()).is_some() {
                    *lost = true;
                    lost_again = true;
                    break;
                }
            }
            if !lost_again {
                return;
            }
        }
    }

    fn commit(self, connection: &Connection) -> CommittedGroup {
        let result = match self.broken {
            Some(error) => {
                let _ = statement(connection, "ROLLBACK");
                Err(error)
            }
            None => statement(connection, "COMMIT").inspect_err(|_| {
                let _ = statement(connection, "ROLLBACK");
            }),
        };
        CommittedGroup {
            jobs: self.jobs,
            touched: self.touched,
            result,
        }
    }
}

/// After `job` ran: when it failed and SQLite has rolled the whole transaction back by itself
/// (it does on a full disk or an I/O error), that write's own error: whatever the group did is
/// gone, and must be run again in a new transaction (writes run outside a transaction would
/// be committed one by one behind the group's back).
fn transaction_lost(connection: &Connection, job: &dyn Job) -> Option<StoreError> {
    if job.succeeded() || !connection.is_autocommit() {
        return None;
    }
    Some(job.error().unwrap_or(StoreError::Unavailable))
}

/// Runs one parameterless statement (cached: these run for every group).
fn statement(connection: &Connection, sql: &str) -> Result<(), StoreError> {
    execute(connection, sql, []).map(|_| ())
}

/// Runs one cached statement with `params`; the number of rows it changed.
fn execute(
    connection: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<usize, StoreError> {
    connection
        .prepare_cached(sql)
        .and_then(|mut statement| statement.execute(params))
        .map_err(database)
}

/// A committed group on its way to disk: its callers are answered after the WAL's fsync.
struct CommittedGroup {
    jobs: Vec<Box<dyn Job>>,
    touched: Touched,
    result: Result<(), StoreError>,
}

/// Makes committed groups durable: fsyncs the WAL, then wakes the dispatchers and answers the
/// callers, then tells the writer it is free. Every group taken here was committed before the
/// fsync starts, so one fsync covers all of them; while it runs, the writer already gathers
/// the next group. This is what `synchronous = FULL` would do inside the commit, moved out of
/// the writer's way.
///
/// After a failed fsync nothing is known about what reached the disk (the kernel may have
/// dropped the dirty pages), so the store answers errors from then on, until a restart.
fn sync_loop(
    wal_file: &File,
    groups: &std::sync::mpsc::Receiver<CommittedGroup>,
    wakers: &Wakers,
    wal: &WalProgress,
    idle: &AtomicBool,
    writer: &mpsc::WeakSender<ToWriter>,
) {
    let mut broken: Option<StoreError> = None;
    while let Ok(first) = groups.recv() {
        let mut ready = vec![first];
        ready.extend(groups.try_iter());
        let synced = match &broken {
            Some(error) => Err(error.clone()),
            None if ready.iter().all(|group| group.result.is_err()) => Ok(()),
            None => match wal_file.sync_all() {
                Ok(()) => {
                    wal.syncs.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Err(error) => {
                    tracing::error!(%error, "The store could not sync its write-ahead log; restart the relay");
                    let error = StoreError::Database(format!(
                        "the store could not sync its write-ahead log ({error}); restart the relay"
                    ));
                    broken = Some(error.clone());
                    Err(error)
                }
            },
        };
        // Free before answering: the writer can commit its next group while this one's
        // callers are woken.
        idle.store(true, Ordering::Release);
        // A full queue means the writer has work and will see `idle` without this word.
        if let Some(writer) = writer.upgrade() {
            let _ = writer.try_send(ToWriter::Synced);
        }
        for group in ready {
            let result = group.result.and(synced.clone());
            if result.is_ok() {
                for sink in &group.touched {
                    wakers.wake(*sink);
                }
            }
            for job in group.jobs {
                job.answer(result.clone());
            }
        }
    }
}

/// Opens the store's WAL for the syncer, and makes its directory entry durable once (with
/// `synchronous = NORMAL`, SQLite itself would not until the first checkpoint).
fn open_wal(path: &Path) -> Result<File, StoreError> {
    let wal_path = sibling(path, "-wal");
    let cannot = |what: &str, file: &Path, error: std::io::Error| {
        StoreError::Database(format!("cannot {what} {}: {error}", file.display()))
    };
    let wal_file = File::options()
        .read(true)
        .write(true)
        .open(&wal_path)
        .map_err(|error| cannot("open", &wal_path, error))?;
    let directory = directory_of(path);
    match File::open(directory).and_then(|directory| directory.sync_all()) {
        Ok(()) => {}
        // Some filesystems cannot fsync a directory at all (EINVAL); SQLite ignores that too.
        // The WAL's entry then becomes durable with the filesystem's own next sync.
        Err(error) if directory_sync_unsupported(&error) => tracing::warn!(
            directory = %directory.display(),
            %error,
            "This filesystem cannot sync a directory; the store's files are synced, their directory entries are not"
        ),
        Err(error) => return Err(cannot("sync", directory, error)),
    }
    Ok(wal_file)
}

/// Whether a directory fsync failed only because the filesystem does not do it.
fn directory_sync_unsupported(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
    )
}

/// The directory the store file is in (`.` for a bare file name).
fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// `<path><suffix>`: the files SQLite and the relay keep beside the store (`-wal`, `.lock`).
fn sibling(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut sibling = path.as_os_str().to_owned();
    sibling.push(suffix);
    sibling.into()
}

/// How far the WAL is: written by the writer's WAL hook and by the checkpointer.
#[derive(Default)]
struct WalProgress {
    /// Frames in the WAL after the last commit.
    frames: AtomicU32,
    /// Frames the checkpointer had copied into the database file at the end of its last pass.
    copied: AtomicU32,
    /// Set when the writer and the syncer have stopped.
    stop: AtomicBool,
    /// Completed fsyncs of the WAL.
    syncs: AtomicU64,
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
    let run = |sql: &str| statement(connection, sql);
    if let Err(error) = run("SAVEPOINT write") {
        job.fail(error);
        return;
    }
    let released = if job.run(connection, touched) {
        run("RELEASE write")
    } else {
        Ok(())
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
    let lock_path = sibling(path, ".lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|error| {
            StoreError::Database(format!("cannot open {}: {error}", lock_path.display()))
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(StoreError::Locked(path.display().to_string()))
        }
        Err(std::fs::TryLockError::Error(error)) => Err(StoreError::Database(format!(
            "cannot lock {}: {error}",
            lock_path.display()
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

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
            PURGE_DELIVERED,
            PURGE_DEAD,
            PURGE_EVENTS,
            listing.as_str(),
            replay.as_str(),
        ];
        queries.extend(DEPTH);
        for sql in queries {
            let mut explain = connection.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
            let parameters = explain.parameter_count();
            let steps: Vec<String> = explain
                .query_map(
                    rusqlite::params_from_iter(std::iter::repeat_n(1, parameters)),
                    |row| row.get::<_, String>(3),
                )?
                .collect::<Result<_, _>>()?;
            for step in &steps {
                assert!(
                    !step.starts_with("SCAN") || step.contains("USING"),
                    "{sql}\n  scans a table: {steps:?}"
                );
            }
        }
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
        let reader = Connection::open(dir.path().join("store.db"))?;
        let mut states = reader.prepare(
            "SELECT sink, COALESCE(lane, '-'), state, MIN(id), COUNT(*), SUM(attempts)
             FROM deliveries GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        )?;
        let states: Vec<(String, String, String, i64, i64, i64)> = states
            .query_map([], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                    row.get(5)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
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
        let states = || async {
            store
                .read(|connection| {
                    let mut select = connection
                        .prepare("SELECT state, attempts FROM deliveries ORDER BY id")
                        .map_err(database)?;
                    let rows = select
                        .query_map([], |row| {
                            Ok((row.get::<_, String>(0)?, row.get::<_, u32>(1)?))
                        })
                        .map_err(database)?
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(database)?;
                    Ok(rows)
                })
                .await
        };
        let lease = Duration::from_secs(10);
        let first = store.claim(SinkName::Bot, 8, t0, lease).await?;
        assert_eq!(first.deliveries.len(), 1);
        // The first attempt hangs past its lease; the delivery is claimed again.
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
                [("in_flight".to_owned(), 0), ("waiting".to_owned(), 0)]
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
            [("delivered".to_owned(), 1), ("pending".to_owned(), 0)]
        );
        Ok(())
    }

    /// A delivery retried after a 503 whose ttl then runs out before its next attempt (the
    /// relay was down): its dead letter keeps the one attempt made, its status and its error.
    #[tokio::test]
    async fn dead_without_an_attempt_keeps_the_last_answer()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = open(&dir);
        let t0: Millis = 1_000_000;
        store
            .enqueue(vec![bot_message(b"ttl-after-503", t0)], t0)
            .await?;
        let lease = Duration::from_secs(10);
        let first = store.claim(SinkName::Bot, 8, t0, lease).await?;
        store
            .settle(
                &first.deliveries[0],
                Settle::Retry {
                    due_at: t0 + 1_000,
                    counted: true,
                    status: Some(503),
                    error: "HTTP 503: busy".into(),
                },
                t0,
            )
            .await?;
        let later = t0 + 10_000_000;
        let second = store.claim(SinkName::Bot, 8, later, lease).await?;
        store
            .settle(
                &second.deliveries[0],
                Settle::Dead {
                    status: None,
                    error: "ttl of 1h ran out before this attempt".into(),
                    attempted: false,
                },
                later,
            )
            .await?;
        let letters = store.dead_letters(DeadLetterFilter::default()).await?;
        let [letter] = letters.as_slice() else {
            return Err(format!("{} dead letters", letters.len()).into());
        };
        assert_eq!(letter.attempts, 1);
        assert_eq!(letter.last_status, Some(503));
        assert_eq!(
            letter.last_error.as_deref(),
            Some("ttl of 1h ran out before this attempt; last error: HTTP 503: busy")
        );
        assert_eq!(letter.last_attempt_at, Some(t0));
        assert_eq!(letter.dead_at, later);
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
}
