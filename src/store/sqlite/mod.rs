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
//! Reads use another connection (WAL lets it read while the writer writes), and each sink's
//! claims one of their own. Claims and leases live in memory (`leases`: one relay owns the
//! file, so nothing unsettled needs a claim on disk to be due again after a restart); the
//! settle is an attempt's one durable write.
//!
//! Lanes: a delivery row carries `lane` = the user. One open row of a (sink, lane) goes out at a
//! time (the lane's head: its oldest open row, but for a replayed dead letter, which waits
//! behind a head already under way); the rows behind it wait until it is delivered, dead or
//! skipped, and then the oldest of them is the head.
//! So one user's deliveries to one sink keep their order, and a failing user blocks nobody
//! else. Who is due, and who is next, is kept in memory only (`lanes`), in step with what
//! SQLite commits: the file holds every open row as `pending` (`waiting` and `in_flight` are
//! found only in files of older versions, and are turned back at open), so a lane's next row
//! takes no write of its own.
//!
//! Split by job: `schema` (tables, indexes, migrations), `engine` (the writer, syncer and
//! checkpointer threads: group commit and durability), `queries` (each store operation's SQL),
//! `leases` (claims in memory and their journal), `lanes` (the queue in memory), `files` (the
//! lock file, the WAL's fsync, the directory).

mod claims;
mod dead_letters;
mod engine;
mod files;
mod lanes;
mod leases;
mod queries;
mod recent;
mod schema;
#[cfg(test)]
mod tests;

use crate::sink_name::SinkName;
use crate::store::{StoreError, Wakers};
use engine::*;
use files::*;
use lanes::{Changes, Lanes, Memo};
use leases::{Journaled, Leases};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode};
use schema::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

#[derive(Clone)]
pub(super) struct SqliteStore {
    writes: mpsc::Sender<ToWriter>,
    reader: Arc<Mutex<Connection>>,
    /// The claims held now (in memory only), and their journal.
    leases: Arc<Leases>,
    /// The queue (due rows, lane heads, waiting rows), kept in memory by the writer.
    lanes: Arc<Lanes>,
    /// Each sink's claims read on a connection of their own, never waiting for another's.
    claimers: Arc<HashMap<SinkName, Mutex<Connection>>>,
    /// The events of recent enqueues, parsed, for the claims of their deliveries.
    recent: Arc<recent::Recent>,
    /// To wake a sink whose claim a shutdown gave back.
    wakers: Arc<Wakers>,
    /// Becomes true once the writer and the syncer have stopped and the file lock is released.
    closed: tokio::sync::watch::Receiver<bool>,
    /// The checkpointer thread, and whether it has stopped.
    checkpointer: std::thread::Thread,
    checkpointer_done: tokio::sync::watch::Receiver<bool>,
    /// The syncer's failure (a failed fsync), and the tests' fault hook.
    faults: Arc<SyncFaults>,
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
        make_private(path)?;
        let mut writer = Connection::open(path).map_err(database)?;
        // `synchronous = NORMAL` only because the syncer thread fsyncs the WAL itself after
        // every commit and before any caller is answered: as durable as FULL, but the fsync of
        // one group overlaps the next group's work (see `Syncer`). NORMAL still syncs the WAL
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
        // This process holds the file lock, so every claim of the last run belongs to a
        // process that is gone: the attempts the journal names whose rows are still as those
        // claims found them were cut off, and count (see `leases`).
        let (leases, journaled) = Leases::open(path)?;
        let opened_at = crate::clock::now_ms();
        count_cut_off(&mut writer, &journaled, opened_at)?;
        leases.start()?;
        let lanes = Arc::new(load_lanes(&writer)?);
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
        let read_only = || -> Result<Connection, StoreError> {
            let reader = Connection::open(path).map_err(database)?;
            reader
                .execute_batch("PRAGMA busy_timeout = 5000; PRAGMA query_only = 1;")
                .map_err(database)?;
            // As on the writer: a claim's bound sink or time must not re-prepare its
            // statements (measured: a third of a claim's time without it).
            reader
                .set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
                .map_err(database)?;
            Ok(reader)
        };
        let reader = read_only()?;
        // A claim runs on a tokio worker: a reader that finds the WAL index busy (rare: the
        // writer restarting the WAL) gives up quickly, and the sink claims again within a second.
        let claimer = || -> Result<Connection, StoreError> {
            let connection = read_only()?;
            connection
                .busy_timeout(std::time::Duration::from_millis(20))
                .map_err(database)?;
            Ok(connection)
        };
        let claimers = SinkName::ALL
            .into_iter()
            .map(|sink| Ok((sink, Mutex::new(claimer()?))))
            .collect::<Result<HashMap<_, _>, StoreError>>()?;

        let checkpointer = Connection::open(path).map_err(database)?;
        checkpointer
            .execute_batch("PRAGMA busy_timeout = 5000;")
            .map_err(database)?;
        let wal = Arc::new(WalProgress::default());
        // Becomes true once the checkpointer has stopped and closed its connection: after
        // that, nothing of this store writes the database file (see `close`).
        let (checkpointer_stopped, checkpointer_done) = tokio::sync::watch::channel(false);
        let checkpointer = std::thread::Builder::new()
            .name("botrelay-checkpoint".into())
            .spawn({
                let wal = wal.clone();
                move || {
                    checkpoint_loop(&checkpointer, &wal);
                    drop(checkpointer);
                    let _ = checkpointer_stopped.send(true);
                }
            })
            .map_err(|error| {
                StoreError::Database(format!("cannot start the checkpoint thread: {error}"))
            })?
            .thread()
            .clone();
        // After every commit SQLite tells the writer how many frames the WAL holds.
        let checkpointer_thread = checkpointer.clone();
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
        // The WAL and the shared-memory index exist now (SQLite gave them the database
        // file's mode; this covers files an older relay made).
        make_private(path)?;
        let (writes, receiver) = mpsc::channel::<ToWriter>(8192);
        let (committed, uncommitted) = std::sync::mpsc::sync_channel(MAX_UNSYNCED_GROUPS);
        let syncer_idle = Arc::new(AtomicBool::new(true));
        let faults = Arc::new(SyncFaults::default());
        let (closed_sender, closed) = tokio::sync::watch::channel(false);
        std::thread::Builder::new()
            .name("botrelay-sync".into())
            .spawn({
                // Weak: the store's handles alone keep the writer's queue open.
                let (wal, idle, writer) = (wal.clone(), syncer_idle.clone(), writes.downgrade());
                let (faults, wakers) = (faults.clone(), wakers.clone());
                move || {
                    // The syncer is the last to finish, so it holds the file lock.
                    let syncer = Syncer {
                        wal_file: &wal_file,
                        wakers: &wakers,
                        wal: &wal,
                        idle: &idle,
                        writer: &writer,
                        faults: &faults,
                    };
                    syncer.run(&uncommitted);
                    wal.stop.store(true, Ordering::Relaxed);
                    drop(lock);
                    let _ = closed_sender.send(true);
                }
            })
            .map_err(|error| {
                StoreError::Database(format!("cannot start the sync thread: {error}"))
            })?;
        #[cfg(test)]
        let wal_progress = wal.clone();
        std::thread::Builder::new()
            .name("botrelay-store".into())
            .spawn({
                let lanes = lanes.clone();
                move || write_loop(&writer, receiver, &committed, &syncer_idle, &wal, &lanes)
            })
            .map_err(|error| {
                StoreError::Database(format!("cannot start the writer thread: {error}"))
            })?;
        Ok(SqliteStore {
            writes,
            reader: Arc::new(Mutex::new(reader)),
            leases: Arc::new(leases),
            lanes,
            claimers: Arc::new(claimers),
            recent: Arc::new(recent::Recent::new(recent::RECENT_BYTES)),
            wakers,
            closed,
            checkpointer: checkpointer_thread,
            checkpointer_done,
            faults,
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
        let (job, answer) = queued(write, Then::default());
        self.writes
            .send(job)
            .await
            .map_err(|_| StoreError::Unavailable)?;
        answer.await.map_err(|_| StoreError::Unavailable)?
    }

    /// As `write`, and `then` runs once the write's fate is known (see [`Then`]), even if the
    /// caller has gone away by then: the write is in the writer's queue before this first
    /// yields (or, when the queue is full, handed to a task that waits for room), so a caller
    /// dropped at any await leaves neither the write nor `then` half done.
    async fn write_then<T, F>(&self, write: F, then: Then) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&Connection, &mut Touched) -> Result<T, StoreError> + Send + 'static,
    {
        let (job, answer) = queued(write, then);
        match self.writes.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(job)) => {
                let writes = self.writes.clone();
                // A send that fails drops the job, and with it runs `then(false)`.
                tokio::spawn(async move { writes.send(job).await });
            }
            // Dropped here: `then(false)`.
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(StoreError::Unavailable),
        }
        answer.await.map_err(|_| StoreError::Unavailable)?
    }

    /// Commits what the writer has open, stops the store's threads and releases the file lock;
    /// returns once it is released. Writes sent afterwards, by any handle, fail.
    pub(super) async fn close(&self) {
        // What is held now is cut off by this close, not by a crash: the journal is emptied
        // (and takes no more claims) before the file lock goes to the next relay.
        self.leases.close();
        let _ = self.writes.send(ToWriter::Close).await;
        let mut closed = self.closed.clone();
        let _ = closed.wait_for(|closed| *closed).await;
        // The syncer has told the checkpointer to stop: wake it, and wait until it has, so that
        // no checkpoint writes the database file after `close` returns (a copy of the files, or
        // the next relay on them, sees them whole).
        self.checkpointer.unpark();
        let mut done = self.checkpointer_done.clone();
        let _ = done.wait_for(|done| *done).await;
    }

    /// The failed fsync after which this store answers only errors, if there was one.
    pub(super) fn failure(&self) -> Option<StoreError> {
        self.faults.failure.get().cloned()
    }

    /// Makes the syncer's next fsync fail (tests).
    pub(super) fn fail_next_sync(&self) {
        self.faults.fail_next.store(true, Ordering::Release);
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
}

/// Counts the attempts the last run's stopping cut off: every claim the journal names whose
/// row is still open and unchanged since, and every row an older version left `in_flight`.
/// They are due at once, and their next claim sees the count (`CRASH_LIMIT`). Synced before
/// the journal that names them is emptied.
fn count_cut_off(
    connection: &mut Connection,
    journaled: &[Journaled],
    now: crate::clock::Millis,
) -> Result<(), StoreError> {
    connection
        .execute_batch("PRAGMA synchronous = FULL")
        .map_err(database)?;
    let transaction = connection.transaction().map_err(database)?;
    transaction
        .execute(
            "UPDATE deliveries SET state = 'pending', due_at = 0, updated_at = ?1,
                 crashes = crashes + 1, attempts = attempts + 1, last_error = ?2
             WHERE (state = 'pending' OR state = 'waiting' OR state = 'in_flight')
                 AND state = 'in_flight'",
            rusqlite::params![now, crate::store::CUT_OFF],
        )
        .map_err(database)?;
    {
        let mut count = transaction
            .prepare(
                "UPDATE deliveries SET due_at = 0, updated_at = ?4,
                     crashes = crashes + 1, attempts = attempts + 1, last_error = ?5
                 WHERE id = ?1 AND state = 'pending' AND attempts = ?2 AND updated_at = ?3",
            )
            .map_err(database)?;
        for claim in journaled {
            count
                .execute(rusqlite::params![
                    claim.id,
                    claim.attempts,
                    claim.updated_at,
                    now,
                    crate::store::CUT_OFF
                ])
                .map_err(database)?;
        }
    }
    transaction.commit().map_err(database)?;
    connection
        .execute_batch("PRAGMA synchronous = NORMAL")
        .map_err(database)
}

/// Where a write's answer comes.
type Answer<T> = oneshot::Receiver<Result<T, StoreError>>;

/// `write` as the writer's queue takes it, and where its answer will come.
fn queued<T, F>(write: F, then: Then) -> (ToWriter, Answer<T>)
where
    T: Send + 'static,
    F: FnMut(&Connection, &mut Touched) -> Result<T, StoreError> + Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    let job = WriteJob {
        write,
        result: None,
        reply,
        then,
    };
    (ToWriter::Write(Box::new(job)), answer)
}

/// The queue as the file holds it, in memory. An older version's file holds the rows behind a
/// lane's head as `waiting`: they become `pending`, as this version writes every open row (which
/// row of a lane goes next is the queue's to say, in memory).
fn load_lanes(connection: &Connection) -> Result<Lanes, StoreError> {
    connection.execute(queries::UNWAIT, []).map_err(database)?;
    let lanes = Lanes::new();
    let rows = {
        let mut select = connection.prepare(queries::LOAD_QUEUE).map_err(database)?;
        select
            .query_map([], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, Option<String>>(2)?,
                    row.get::<_, crate::clock::Millis>(3)?,
                ))
            })
            .map_err(database)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(database)?
    };
    lanes.load(
        rows.into_iter()
            .filter_map(|(id, sink, lane, due)| Some((id, SinkName::parse(&sink)?, lane, due))),
    );
    Ok(lanes)
}

fn database(error: rusqlite::Error) -> StoreError {
    match error.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => StoreError::Full,
        _ => StoreError::Database(error.to_string()),
    }
}
