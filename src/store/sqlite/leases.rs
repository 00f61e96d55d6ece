//! Claims of the embedded store live in memory, not in the file: one relay owns the file (it
//! holds its lock), so a claim never needs to reach the disk. Everything unsettled is simply
//! due again after a restart. The settle is the one durable write of an attempt.
//!
//! What the file would have told a restart, that an attempt was under way when the relay
//! stopped (the crash counting of the store contract), comes from a small journal beside the
//! store (`<path>-claims`): each claim appends `(delivery, attempts, updated_at)` to it with a
//! plain `write`, no fsync. A process that crashes, panics or is killed keeps its writes in the
//! page cache, so the next start finds the journal whole; a delivery it names that is still
//! unsettled and unchanged since that claim (same attempt count, same `updated_at`) had its
//! attempt cut off, and counts it. A power loss may lose the journal's tail: such attempts
//! are sent again without being counted, which is not the delivery's fault anyway. A clean
//! close empties the journal. When it has grown long, it is rewritten with the claims held now.
//!
//! Claims read the committed state of the queue in memory (`lanes`), and of the file, for a row
//! whose first claim this is not, on connections of their own (one per sink), so they never
//! wait for the writer or an fsync. (A commit is visible before its fsync, so a row
//! can go out before it is durable; a power loss then can make a sink see it again, which
//! at-least-once allows.) A settle marks its claim as settling, writes in the writer's group,
//! and drops the claim once the group is durable (and so surely visible to every reader). A
//! claim whose read began before such a drop might still see the row as it was, so the last
//! drops are remembered with a sequence number, and a claim skips the rows dropped since its
//! read began (they are due again, if at all, at the next claim).

use super::StoreError;
use super::files::{private_options, sibling};
use crate::clock::Millis;
use crate::sink_name::SinkName;
use foldhash::{HashMap, HashMapExt, HashSet};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// How many drops are remembered for claims whose read overlapped them. A claim that
/// overlapped more than this reads again.
const REMEMBERED_DROPS: usize = 8192;

/// The journal is rewritten with the claims held now once this many claims were appended.
const JOURNAL_REWRITE_AFTER: usize = 16_384;

/// The attempt count of a journal record that says the claim was given back (`release`).
const RELEASED: u32 = u32::MAX;

/// One journal record: the delivery, its attempt count and `updated_at` as the claim found them.
const RECORD: usize = 8 + 4 + 8;

/// A claim the journal names: an attempt was under way on this row, as it was then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Journaled {
    pub(super) id: i64,
    pub(super) attempts: u32,
    pub(super) updated_at: Millis,
}

/// A claim held now.
#[derive(Debug, Clone, Copy)]
struct Held {
    sink: SinkName,
    lease_until: Millis,
    /// Its outcome is being written: no lease end makes it claimable again.
    settling: bool,
    row: Journaled,
}

struct Inner {
    /// The store closed: claims fail, the journal takes nothing more.
    closed: bool,
    held: HashMap<i64, Held>,
    /// (sequence, delivery) of the last drops, oldest first.
    dropped: VecDeque<(u64, i64)>,
    /// Drops so far.
    drops: u64,
    journal: Option<File>,
    /// The journal's length up to its last whole record.
    journal_len: u64,
    appended: usize,
    /// A journal write failed and was not followed by one that succeeded (warned once).
    failing: bool,
}

pub(super) struct Leases {
    inner: Mutex<Inner>,
    path: PathBuf,
}

/// A claim's read, taken when its view began.
pub(super) struct View {
    drops: u64,
    /// This sink's claims held when the read began: id → (lease end, settling).
    held: HashMap<i64, (Millis, bool)>,
}

impl View {
    /// Whether the read should pass over this row (held by a claim whose lease still runs, or
    /// whose outcome is being written).
    pub(super) fn passes_over(&self, id: i64, now: Millis) -> bool {
        self.held
            .get(&id)
            .is_some_and(|&(lease_until, settling)| settling || lease_until > now)
    }

    /// The earliest end of a lease of this sink still running (when its row falls due again).
    pub(super) fn next_lease_end(&self, now: Millis) -> Option<Millis> {
        self.held
            .values()
            .filter(|(lease_until, settling)| !settling && *lease_until > now)
            .map(|(lease_until, _)| *lease_until)
            .min()
    }
}

/// How a row a claim read was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Taken {
    /// Not held before.
    New,
    /// Held by a claim whose lease ran out without an outcome: that attempt was cut off.
    LeaseRanOut,
}

impl Leases {
    /// Opens the journal of the store at `path` and returns what it names (the claims of the
    /// last run that were never settled, or settled since: the caller tells them apart). The
    /// journal is kept as it is until [`Leases::start`], after the caller has counted them.
    pub(super) fn open(path: &Path) -> Result<(Leases, Vec<Journaled>), StoreError> {
        let path = sibling(path, "-claims");
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut file) => {
                file.read_to_end(&mut bytes).map_err(|error| {
                    StoreError::Database(format!("cannot read {}: {error}", path.display()))
                })?;
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(StoreError::Database(format!(
                    "cannot open {}: {error}",
                    path.display()
                )));
            }
        }
        let leases = Leases {
            inner: Mutex::new(Inner {
                closed: false,
                held: HashMap::new(),
                dropped: VecDeque::new(),
                drops: 0,
                journal: None,
                journal_len: 0,
                appended: 0,
                failing: false,
            }),
            path,
        };
        Ok((leases, decode(&bytes)))
    }

    /// Starts an empty journal (what the last one named has been counted).
    pub(super) fn start(&self) -> Result<(), StoreError> {
        let journal = self.create_journal(&self.path)?;
        let mut inner = self.lock();
        inner.journal = Some(journal);
        inner.journal_len = 0;
        inner.appended = 0;
        Ok(())
    }

    fn create_journal(&self, path: &Path) -> Result<File, StoreError> {
        // A file left from an earlier run keeps its mode through `truncate`: start afresh.
        match std::fs::remove_file(path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(StoreError::Database(format!(
                    "cannot remove {}: {error}",
                    path.display()
                )));
            }
            _ => {}
        }
        private_options()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
            .map_err(|error| {
                StoreError::Database(format!("cannot open {}: {error}", path.display()))
            })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while the lock was held leaves the map as consistent as any single step.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where a claim's read begins.
    pub(super) fn view(&self, sink: SinkName) -> View {
        let inner = self.lock();
        View {
            drops: inner.drops,
            held: inner
                .held
                .iter()
                .filter(|(_, held)| held.sink == sink)
                .map(|(&id, held)| (id, (held.lease_until, held.settling)))
                .collect(),
        }
    }

    /// Takes the rows a read found due, in order and at most `limit`, under a lease until
    /// `lease_until`: each row as it was read (`attempts`, `updated_at`), and how it was taken.
    /// Rows held meanwhile by another claim, and rows dropped since the read began, are left.
    /// `None` when too many drops overlapped the read: read again.
    pub(super) fn take(
        &self,
        sink: SinkName,
        view: &View,
        rows: &[Journaled],
        limit: usize,
        now: Millis,
        lease_until: Millis,
    ) -> Option<Vec<(Journaled, Taken)>> {
        let mut inner = self.lock();
        let overlapped = inner.drops - view.drops;
        if overlapped > inner.dropped.len() as u64 {
            return None;
        }
        let dropped_since: HashSet<i64> = inner
            .dropped
            .iter()
            .rev()
            .take_while(|(sequence, _)| *sequence > view.drops)
            .map(|(_, id)| *id)
            .collect();
        let mut taken = Vec::new();
        for row in rows {
            if taken.len() >= limit {
                break;
            }
            if dropped_since.contains(&row.id) {
                continue;
            }
            let how = match inner.held.get(&row.id) {
                None => Taken::New,
                Some(held) if !held.settling && held.lease_until <= now => Taken::LeaseRanOut,
                Some(_) => continue,
            };
            inner.held.insert(
                row.id,
                Held {
                    sink,
                    lease_until,
                    settling: false,
                    row: *row,
                },
            );
            taken.push((*row, how));
        }
        Some(taken)
    }

    /// Records in the journal the rows these claims took, as their attempts begin.
    pub(super) fn journal(&self, taken: &[Journaled]) {
        if taken.is_empty() {
            return;
        }
        let mut inner = self.lock();
        for row in taken {
            // The row as the attempt starts on it (an expired lease's count already applied).
            if let Some(held) = inner.held.get_mut(&row.id) {
                held.row = *row;
            }
        }
        let mut bytes = Vec::with_capacity(taken.len() * RECORD);
        for row in taken {
            encode(row, &mut bytes);
        }
        append(&mut inner, &bytes);
        inner.appended += taken.len();
        if inner.appended >= JOURNAL_REWRITE_AFTER {
            self.rewrite(&mut inner);
        }
    }

    /// Rewrites the journal with the claims held now, through a new file renamed over it.
    fn rewrite(&self, inner: &mut Inner) {
        if inner.closed {
            return;
        }
        let fresh = sibling(&self.path, ".new");
        let mut bytes = Vec::with_capacity(inner.held.len() * RECORD);
        for held in inner.held.values() {
            encode(&held.row, &mut bytes);
        }
        let rewritten = self.create_journal(&fresh).and_then(|mut file| {
            file.write_all(&bytes)
                .map_err(|error| StoreError::Database(error.to_string()))?;
            std::fs::rename(&fresh, &self.path)
                .map_err(|error| StoreError::Database(error.to_string()))?;
            Ok(file)
        });
        match rewritten {
            Ok(file) => {
                inner.journal = Some(file);
                inner.journal_len = bytes.len() as u64;
                inner.appended = inner.held.len();
            }
            Err(error) => {
                // Keep appending to the old one; try again after as many claims more.
                tracing::warn!(%error, "Cannot rewrite the claim journal");
                inner.appended = 0;
            }
        }
    }

    /// Extends a claim's lease if the claim still holds it.
    pub(super) fn renew(&self, id: i64, held: Millis, until: Millis) -> bool {
        match self.lock().held.get_mut(&id) {
            Some(claim) if claim.lease_until == held && !claim.settling => {
                claim.lease_until = until;
                true
            }
            _ => false,
        }
    }

    /// Marks a claim as settling if it still holds its row; false when the lease ran out and
    /// the row was claimed again, or the claim was given back.
    pub(super) fn begin_settle(&self, id: i64, held: Millis) -> bool {
        match self.lock().held.get_mut(&id) {
            Some(claim) if claim.lease_until == held => {
                claim.settling = true;
                true
            }
            _ => false,
        }
    }

    /// Ends a settle: the outcome is durable (drop the claim) or was not written (the claim
    /// holds on, and its lease runs as before).
    pub(super) fn end_settle(&self, id: i64, held: Millis, written: bool) {
        let mut inner = self.lock();
        if written {
            if inner
                .held
                .get(&id)
                .is_some_and(|claim| claim.lease_until == held)
            {
                drop_claim(&mut inner, id);
            }
        } else if let Some(claim) = inner.held.get_mut(&id)
            && claim.lease_until == held
        {
            claim.settling = false;
        }
    }

    /// Gives back a claim a shutdown cut off; the sink to wake when it was still held.
    pub(super) fn release(&self, id: i64, held: Millis) -> Option<SinkName> {
        let mut inner = self.lock();
        let claim = *inner.held.get(&id)?;
        if claim.lease_until != held || claim.settling {
            return None;
        }
        drop_claim(&mut inner, id);
        // The journal's last word on it: given back, not cut off by a crash.
        let mut bytes = Vec::with_capacity(RECORD);
        encode(
            &Journaled {
                id,
                attempts: RELEASED,
                updated_at: 0,
            },
            &mut bytes,
        );
        append(&mut inner, &bytes);
        Some(claim.sink)
    }

    /// Ends a claim's lease now (its cut-off attempt could not be counted): the next claim
    /// takes it as one whose lease ran out, and counts it.
    pub(super) fn expire(&self, id: i64, held: Millis, now: Millis) {
        if let Some(claim) = self.lock().held.get_mut(&id)
            && claim.lease_until == held
            && !claim.settling
        {
            claim.lease_until = now;
        }
    }

    /// Whether the store closed.
    pub(super) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Claims held now, per sink.
    pub(super) fn held_per_sink(&self) -> HashMap<SinkName, u64> {
        let mut counts = HashMap::new();
        for held in self.lock().held.values() {
            *counts.entry(held.sink).or_default() += 1;
        }
        counts
    }

    /// Whether a claim holds this delivery now.
    pub(super) fn holds(&self, id: i64) -> bool {
        self.lock().held.contains_key(&id)
    }

    /// A clean close: nothing held is a crash's doing, so the journal is emptied.
    pub(super) fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        if let Some(journal) = inner.journal.take()
            && let Err(error) = journal.set_len(0)
        {
            tracing::warn!(%error, "Cannot empty the claim journal at close");
        }
    }
}

/// Appends whole records to the journal. A write that fails part-way (a full disk) is cut back
/// to the last whole record, so that the records after it stay aligned; the first failure of a
/// run of them is logged. Only the counting of attempts a crash cuts off depends on the journal:
/// deliveries go on without it.
fn append(inner: &mut Inner, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom};
    let good = inner.journal_len;
    let Some(journal) = inner.journal.as_mut() else {
        return;
    };
    match journal.write_all(bytes) {
        Ok(()) => {
            inner.journal_len = good + bytes.len() as u64;
            inner.failing = false;
        }
        Err(error) => {
            let _ = journal
                .set_len(good)
                .and_then(|()| journal.seek(SeekFrom::Start(good)));
            if !inner.failing {
                tracing::warn!(%error, "Cannot record claims in the claim journal; a crash now would not count the attempts it cuts off");
            }
            inner.failing = true;
        }
    }
}

fn drop_claim(inner: &mut Inner, id: i64) {
    inner.held.remove(&id);
    inner.drops += 1;
    let sequence = inner.drops;
    inner.dropped.push_back((sequence, id));
    if inner.dropped.len() > REMEMBERED_DROPS {
        inner.dropped.pop_front();
    }
}

fn encode(row: &Journaled, bytes: &mut Vec<u8>) {
    bytes.extend_from_slice(&row.id.to_le_bytes());
    bytes.extend_from_slice(&row.attempts.to_le_bytes());
    bytes.extend_from_slice(&row.updated_at.to_le_bytes());
}

/// The journal's records, the last of each delivery; a torn last record is left out.
fn decode(bytes: &[u8]) -> Vec<Journaled> {
    let mut last: HashMap<i64, Journaled> = HashMap::new();
    let mut order = Vec::new();
    for record in bytes.chunks_exact(RECORD) {
        let (id, rest) = record.split_at(8);
        let (attempts, updated_at) = rest.split_at(4);
        let (Ok(id), Ok(attempts), Ok(updated_at)) = (
            <[u8; 8]>::try_from(id),
            <[u8; 4]>::try_from(attempts),
            <[u8; 8]>::try_from(updated_at),
        ) else {
            continue;
        };
        let row = Journaled {
            id: i64::from_le_bytes(id),
            attempts: u32::from_le_bytes(attempts),
            updated_at: i64::from_le_bytes(updated_at),
        };
        if last.insert(row.id, row).is_none() {
            order.push(row.id);
        }
    }
    order
        .into_iter()
        .filter_map(|id| last.remove(&id))
        .filter(|row| row.attempts != RELEASED)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BOT: SinkName = SinkName::Bot;

    fn row(id: i64) -> Journaled {
        Journaled {
            id,
            attempts: 0,
            updated_at: 1,
        }
    }

    fn opened(dir: &tempfile::TempDir) -> (Leases, Vec<Journaled>) {
        let (leases, journaled) = Leases::open(&dir.path().join("store.db")).unwrap();
        (leases, journaled)
    }

    #[test]
    fn the_journal_names_what_was_claimed_and_a_clean_close_empties_it() {
        let dir = tempfile::tempdir().unwrap();
        let (leases, journaled) = opened(&dir);
        assert!(journaled.is_empty());
        leases.start().unwrap();
        let view = leases.view(BOT);
        let taken = leases
            .take(BOT, &view, &[row(1), row(2)], 10, 0, 100)
            .unwrap_or_default();
        assert_eq!(taken.len(), 2);
        let rows: Vec<Journaled> = taken.iter().map(|(row, _)| *row).collect();
        leases.journal(&rows);
        // The same row claimed again later (after a retry): its last record counts.
        let again = Journaled {
            id: 1,
            attempts: 1,
            updated_at: 5,
        };
        leases.journal(&[again]);
        drop(leases); // a crash: no close
        let (leases, journaled) = opened(&dir);
        assert_eq!(journaled, [again, row(2)]);
        leases.start().unwrap();
        leases.close();
        let (_, journaled) = opened(&dir);
        assert!(journaled.is_empty(), "{journaled:?}");
    }

    #[test]
    fn a_claim_given_back_is_not_named() {
        let mut bytes = Vec::new();
        encode(&row(7), &mut bytes);
        encode(&row(8), &mut bytes);
        encode(
            &Journaled {
                id: 7,
                attempts: RELEASED,
                updated_at: 0,
            },
            &mut bytes,
        );
        assert_eq!(decode(&bytes), [row(8)]);
    }

    #[test]
    fn a_torn_last_record_is_left_out() {
        let mut bytes = Vec::new();
        encode(&row(7), &mut bytes);
        encode(&row(8), &mut bytes);
        bytes.truncate(bytes.len() - 3);
        assert_eq!(decode(&bytes), [row(7)]);
    }

    #[test]
    fn a_held_row_is_passed_over_until_its_lease_runs_out_unless_it_is_settling() {
        let dir = tempfile::tempdir().unwrap();
        let (leases, _) = opened(&dir);
        let view = leases.view(BOT);
        let taken = leases.take(BOT, &view, &[row(1), row(2)], 10, 0, 100);
        assert_eq!(taken.map(|taken| taken.len()), Some(2));
        let view = leases.view(BOT);
        assert!(view.passes_over(1, 50));
        assert_eq!(view.next_lease_end(50), Some(100));
        assert!(!view.passes_over(1, 100), "the lease ran out");
        let taken = leases.take(BOT, &view, &[row(1)], 10, 100, 200);
        assert_eq!(taken, Some(vec![(row(1), Taken::LeaseRanOut)]));
        // The first claim's outcome no longer counts; the second's does.
        assert!(!leases.begin_settle(1, 100));
        assert!(leases.begin_settle(1, 200));
        let view = leases.view(BOT);
        assert!(
            view.passes_over(1, 10_000),
            "settling: no lease end frees it"
        );
        leases.end_settle(1, 200, false);
        assert!(
            !leases.view(BOT).passes_over(1, 10_000),
            "not written: the lease runs"
        );
        assert!(leases.renew(2, 100, 300));
        assert!(
            !leases.renew(2, 100, 400),
            "the old lease no longer identifies it"
        );
        assert_eq!(leases.held_per_sink().get(&BOT), Some(&2));
    }

    #[test]
    fn a_claim_leaves_rows_dropped_while_it_read() {
        let dir = tempfile::tempdir().unwrap();
        let (leases, _) = opened(&dir);
        let first = leases.view(BOT);
        assert!(leases.take(BOT, &first, &[row(1)], 1, 0, 100).is_some());
        // A read begins, then the settle of row 1 becomes durable and drops the claim.
        let reading = leases.view(BOT);
        assert!(leases.begin_settle(1, 100));
        leases.end_settle(1, 100, true);
        assert!(!leases.holds(1));
        // The read saw row 1 as it was before the settle: it is left alone.
        let taken = leases.take(BOT, &reading, &[row(1), row(2)], 10, 0, 100);
        assert_eq!(taken, Some(vec![(row(2), Taken::New)]));
        // A read that overlapped more drops than are remembered reads again.
        let stale = leases.view(BOT);
        for id in 10..(10 + REMEMBERED_DROPS as i64 + 1) {
            let view = leases.view(BOT);
            let _ = leases.take(BOT, &view, &[row(id)], 1, 0, 100);
            leases.release(id, 100);
        }
        assert_eq!(leases.take(BOT, &stale, &[row(3)], 1, 0, 100), None);
    }
}
