//! The group-commit engine: the writer thread runs callers' writes inside one open transaction,
//! the syncer fsyncs the WAL before anyone is answered, the checkpointer copies WAL frames
//! into the database file off the writer's path.

use super::*;
use super::{StoreError, Wakers};
use crate::sink_name::SinkName;
use rusqlite::Connection;
use std::collections::BTreeSet;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The most writes one transaction takes.
pub(super) const MAX_BATCH: usize = 512;

/// The checkpointer copies committed WAL frames into the database file whenever this many new
/// frames (pages) have been committed, and at least every `CHECKPOINT_EVERY`.
pub(super) const CHECKPOINT_FRAMES: u32 = 256;
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// When the WAL holds this many frames, the writer finishes the checkpoint itself between two
/// groups (the checkpointer has copied all but the last few frames), so that the next commit
/// starts the WAL over instead of growing the file. 8,192 frames of 4 KiB = 32 MiB; measured
/// against 2,048 and 16,384 and no restart at all (`benches/`), this was the fastest.
pub(super) const WAL_RESTART_FRAMES: u32 = 8192;

/// While the syncer is free, the writer commits as soon as the queue is empty or its group has
/// this many writes.
pub(super) const DRAIN_BEFORE_COMMIT: usize = 64;

/// A group younger than this is not committed for want of more writes (see `write_loop`).
pub(super) const MIN_GROUP_AGE: Duration = Duration::from_millis(2);

/// Committed groups waiting for the syncer; when it falls this far behind, the writer waits.
pub(super) const MAX_UNSYNCED_GROUPS: usize = 64;

/// What a group's writes did besides their SQL: the sinks they gave new due work to (woken once
/// the group is durable), and their changes to the queue in memory (`lanes`), which are undone
/// with whatever SQLite undoes.
pub(super) struct Touched {
    sinks: BTreeSet<SinkName>,
    pub(super) lanes: Changes,
}

impl Touched {
    pub(super) fn new(lanes: Arc<Lanes>) -> Touched {
        Touched {
            sinks: BTreeSet::new(),
            lanes: Changes::new(lanes),
        }
    }

    /// `sink` has new due work once this group is durable.
    pub(super) fn insert(&mut self, sink: SinkName) {
        self.sinks.insert(sink);
    }

    /// The transaction was rolled back: nothing of it stays.
    fn undo_all(&mut self) {
        self.sinks.clear();
        self.lanes.undo_to(0);
    }
}

/// One caller's write, waiting in the writer's queue. A write can run more than once: when one
/// write of a group fails, the writer rolls the whole group back and runs every write again,
/// each under its own savepoint, so that the failure undoes only itself (see `write_loop`).
pub(super) trait Job: Send {
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

pub(super) struct WriteJob<T, F> {
    pub(super) write: F,
    pub(super) result: Option<Result<T, StoreError>>,
    pub(super) reply: oneshot::Sender<Result<T, StoreError>>,
    pub(super) then: Then,
}

/// What to do once a write's fate is known, whether or not its caller still waits: run with
/// true once the write is durable, with false when it failed or never ran (the job dropped
/// unanswered: the writer stopped). Runs exactly once, on the thread that answers the write
/// (the syncer's, after the fsync) or drops it.
#[derive(Default)]
pub(super) struct Then(Option<Box<dyn FnOnce(bool) + Send>>);

impl Then {
    pub(super) fn new(then: impl FnOnce(bool) + Send + 'static) -> Then {
        Then(Some(Box::new(then)))
    }

    fn run(&mut self, durable: bool) {
        if let Some(then) = self.0.take() {
            then(durable);
        }
    }
}

impl Drop for Then {
    fn drop(&mut self) {
        self.run(false);
    }
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
        let WriteJob {
            result,
            reply,
            mut then,
            ..
        } = *self;
        let result = match (committed, result) {
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(StoreError::Unavailable),
            (Err(error), _) => Err(error),
        };
        then.run(result.is_ok());
        let _ = reply.send(result);
    }
}

/// What the writer thread receives: a write, or the syncer's word that it is free again.
pub(super) enum ToWriter {
    Write(Box<dyn Job>),
    Synced,
    /// Commit what is open and stop: the syncer then finishes and lets go of the file lock.
    Close,
}

/// The writer: runs writes as they arrive inside an open transaction (a group), and commits
/// the group as soon as the syncer is free to fsync it. While the syncer's fsync of one group
/// is under way, the next group grows; so under load a group holds everything that arrived
/// during one fsync, and the pages every write touches (the tail of the events table, the lane
/// heads) go to the WAL once per group rather than once per write. A group younger than
/// `MIN_GROUP_AGE` whose queue ran dry waits that long for more writes before its commit: at
/// moderate load the syncer is free most of the time, and without the wait every webhook made
/// a group of its own, each writing the same shared pages again and taking an fsync.
pub(super) fn write_loop(
    connection: &Connection,
    mut receiver: mpsc::Receiver<ToWriter>,
    syncer: &std::sync::mpsc::SyncSender<CommittedGroup>,
    syncer_idle: &AtomicBool,
    wal: &WalProgress,
    lanes: &Arc<Lanes>,
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
                        // A young group waits a little for more writes: every group writes
                        // the pages its writes share (index pages, the tables' tails) and
                        // takes an fsync, whatever its size.
                        let age = group.started.elapsed();
                        if age < MIN_GROUP_AGE {
                            std::thread::sleep(MIN_GROUP_AGE - age);
                            continue;
                        }
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
                open.get_or_insert_with(|| Group::begin(connection, lanes.clone()))
                    .add(connection, job);
            }
            Some(ToWriter::Synced) => {}
            Some(ToWriter::Close) | None => break,
        }
    }
    if let Some(group) = open.take() {
        hand_over(connection, group, syncer, syncer_idle, wal);
    }
}

/// Commits `group` and gives it to the syncer, which answers its callers once it is durable.
pub(super) fn hand_over(
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
pub(super) struct Group {
    jobs: Vec<Box<dyn Job>>,
    /// Per write: it made SQLite roll the whole transaction back (a full disk): it keeps its
    /// error and is not run again.
    lost: Vec<bool>,
    touched: Touched,
    /// Writes run under a savepoint each (after one failed without).
    isolated: bool,
    /// The transaction itself failed; every write of the group gets this error.
    broken: Option<StoreError>,
    started: std::time::Instant,
}

impl Group {
    fn begin(connection: &Connection, lanes: Arc<Lanes>) -> Group {
        Group {
            jobs: Vec::with_capacity(64),
            lost: Vec::with_capacity(64),
            touched: Touched::new(lanes),
            isolated: false,
            broken: statement(connection, "BEGIN").err(),
            started: std::time::Instant::now(),
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
    /// settle, a crash count) still commit beside the ones that do not (an enqueue).
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
        // Whatever happens next, the transaction so far is gone, and so are its changes to
        // the queue.
        self.touched.undo_all();
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
            self.touched.undo_all();
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

    fn commit(mut self, connection: &Connection) -> CommittedGroup {
        let result = match self.broken {
            Some(error) => {
                let _ = statement(connection, "ROLLBACK");
                Err(error)
            }
            None => statement(connection, "COMMIT").inspect_err(|_| {
                let _ = statement(connection, "ROLLBACK");
            }),
        };
        match result {
            Ok(()) => self.touched.lanes.keep(),
            Err(_) => self.touched.undo_all(),
        }
        CommittedGroup {
            jobs: self.jobs,
            touched: self.touched.sinks,
            result,
        }
    }
}

/// After `job` ran: when it failed and SQLite has rolled the whole transaction back by itself
/// (it does on a full disk or an I/O error), that write's own error: whatever the group did is
/// gone, and must be run again in a new transaction (writes run outside a transaction would
/// be committed one by one behind the group's back).
pub(super) fn transaction_lost(connection: &Connection, job: &dyn Job) -> Option<StoreError> {
    if job.succeeded() || !connection.is_autocommit() {
        return None;
    }
    Some(job.error().unwrap_or(StoreError::Unavailable))
}

/// Runs one parameterless statement (cached: these run for every group).
pub(super) fn statement(connection: &Connection, sql: &str) -> Result<(), StoreError> {
    execute(connection, sql, []).map(|_| ())
}

/// Runs one cached statement with `params`; the number of rows it changed.
pub(super) fn execute(
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
pub(super) struct CommittedGroup {
    jobs: Vec<Box<dyn Job>>,
    touched: BTreeSet<SinkName>,
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
pub(super) struct Syncer<'a> {
    pub(super) wal_file: &'a File,
    pub(super) wakers: &'a Wakers,
    pub(super) wal: &'a WalProgress,
    pub(super) idle: &'a AtomicBool,
    pub(super) writer: &'a mpsc::WeakSender<ToWriter>,
    pub(super) faults: &'a SyncFaults,
}

/// What the syncer shares with the store's handles: its failure, once an fsync failed (read by
/// `Store::failure`, so `/healthz` tells), and the tests' fault hook.
#[derive(Default)]
pub(super) struct SyncFaults {
    pub(super) failure: std::sync::OnceLock<StoreError>,
    /// Set by a test: the next fsync fails as a failing disk's would.
    pub(super) fail_next: AtomicBool,
}

impl Syncer<'_> {
    pub(super) fn run(&self, groups: &std::sync::mpsc::Receiver<CommittedGroup>) {
        while let Ok(first) = groups.recv() {
            let mut ready = vec![first];
            ready.extend(groups.try_iter());
            let synced = match self.faults.failure.get() {
                Some(error) => Err(error.clone()),
                None if ready.iter().all(|group| group.result.is_err()) => Ok(()),
                None => match self.sync() {
                    Ok(()) => {
                        self.wal.syncs.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    Err(error) => {
                        tracing::error!(%error, "The store could not sync its write-ahead log; restart the relay");
                        let error = StoreError::Database(format!(
                            "the store could not sync its write-ahead log ({error}); restart the relay"
                        ));
                        let _ = self.faults.failure.set(error.clone());
                        Err(error)
                    }
                },
            };
            // Free before answering: the writer can commit its next group while this one's
            // callers are woken.
            self.idle.store(true, Ordering::Release);
            // A full queue means the writer has work and will see `idle` without this word.
            if let Some(writer) = self.writer.upgrade() {
                let _ = writer.try_send(ToWriter::Synced);
            }
            for group in ready {
                let result = group.result.and(synced.clone());
                if result.is_ok() {
                    for sink in &group.touched {
                        self.wakers.wake(*sink);
                    }
                }
                for job in group.jobs {
                    job.answer(result.clone());
                }
            }
        }
    }

    /// Fsyncs the WAL (or fails as the tests' fault hook asks: EIO, as a failing disk).
    fn sync(&self) -> std::io::Result<()> {
        if self.faults.fail_next.swap(false, Ordering::AcqRel) {
            return Err(std::io::Error::from_raw_os_error(5));
        }
        self.wal_file.sync_all()
    }
}

/// How far the WAL is: written by the writer's WAL hook and by the checkpointer.
#[derive(Default)]
pub(super) struct WalProgress {
    /// Frames in the WAL after the last commit.
    pub(super) frames: AtomicU32,
    /// Frames the checkpointer had copied into the database file at the end of its last pass.
    pub(super) copied: AtomicU32,
    /// Set when the writer and the syncer have stopped.
    pub(super) stop: AtomicBool,
    /// Completed fsyncs of the WAL.
    pub(super) syncs: AtomicU64,
}

/// Copies committed WAL frames into the database file, off the writer's path: woken by the
/// writer's WAL hook every `CHECKPOINT_FRAMES`, and every `CHECKPOINT_EVERY` in any case. A
/// PASSIVE checkpoint never blocks the writer; it does what it can and tries again.
pub(super) fn checkpoint_loop(connection: &Connection, wal: &WalProgress) {
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
pub(super) fn run_in_savepoint(connection: &Connection, job: &mut dyn Job, touched: &mut Touched) {
    let run = |sql: &str| statement(connection, sql);
    if let Err(error) = run("SAVEPOINT write") {
        job.fail(error);
        return;
    }
    let mark = touched.lanes.mark();
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
        touched.lanes.undo_to(mark);
    }
}
