//! The embedded store's queue in memory: per sink, which deliveries are due and when, and per
//! user (a lane) which delivery is the head and which wait behind it. One relay owns the file,
//! so nothing but this process changes the queue, and the file need not hold it: every open
//! row is `pending` in the file, and which of a lane's rows goes next, and when, is known here
//! only. Claims read the queue here instead of through indexes that every enqueue and settle
//! rewrote at random places, and a lane's next row needs no write of its own when its head is
//! done. At open the queue is rebuilt from the open rows ([`Lanes::load`]): a lane's oldest
//! open row is its head, due when the file says.
//!
//! The writer changes the queue from inside its writes, as SQLite changes the file, and each
//! change is logged ([`Step`]) so that a write SQLite undoes (a savepoint rolled back, a group
//! rolled back and run again) has its changes undone here too ([`Changes::undo_to`]). A row a
//! write made due is "fresh" until the write's group commits ([`Changes::keep`]): claims pass
//! over it, so nothing goes out on the strength of a write that could still be undone (a lane's
//! next row before its head's settle commits, a new row before its event does).

use crate::clock::Millis;
use crate::event::Event;
use crate::sink_name::SinkName;
use foldhash::{HashMap, HashSet};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// One sink's queue.
#[derive(Default)]
struct Queue {
    /// Every pending row (a lane's head, or a row without a lane), in the order claims take
    /// them: due time, then receipt.
    due: BTreeSet<(Millis, i64)>,
    /// Each pending row's due time, to find it in `due`.
    due_at: HashMap<i64, Millis>,
    /// The lanes with a head or a row waiting.
    lanes: HashMap<String, Lane>,
    /// Pending rows whose write is not committed yet: claims pass over them.
    fresh: HashSet<i64>,
    /// Open rows as their enqueue wrote them, never claimed since (see [`Memo`]).
    memos: HashMap<i64, Memo>,
}

/// What a row's first claim would read from the file, known from its enqueue: its event (as
/// the enqueue kept it in memory), and its receipt time. Nothing else is read for such a row: no
/// attempt, no crash, no throttle yet, its lane is its event's user, its ttl counts from its
/// receipt. A memo is taken by the row's first claim; any later claim reads the file. A memo
/// left out or dropped (an undone write, a row the file already held at open, a replay) costs
/// only that read.
///
/// So a memo holds only while nothing writes the row before its first claim: every write to an
/// open row today comes from a claim (a settle, the count of an attempt cut off) or finds the
/// row done (a replay takes dead rows; the purge, finished ones). A write that changes an open
/// row some other way must drop the row's memo ([`Lanes::take_memo`]), or its first claim would
/// hand out attempts and times the file no longer holds (and the claim journal would not match
/// the row after a crash).
pub(super) struct Memo {
    pub(super) event: Arc<Event>,
    pub(super) created_at: Millis,
}

#[derive(Default)]
struct Lane {
    head: Option<i64>,
    /// Oldest first: the next head is the first.
    waiting: BTreeMap<i64, Millis>,
}

impl Queue {
    /// Changes the lane, made if it is new (without allocating its name when it is not).
    fn edit_lane(&mut self, lane: &str, edit: impl FnOnce(&mut Lane)) {
        match self.lanes.get_mut(lane) {
            Some(kept) => edit(kept),
            None => {
                let mut new = Lane::default();
                edit(&mut new);
                self.lanes.insert(lane.to_owned(), new);
            }
        }
    }

    /// Drops a lane that holds nothing, so that memory follows the open rows, not every user
    /// ever seen.
    fn tidy(&mut self, lane: &str) {
        if self
            .lanes
            .get(lane)
            .is_some_and(|kept| kept.head.is_none() && kept.waiting.is_empty())
        {
            self.lanes.remove(lane);
        }
    }

    fn head(&mut self, lane: Option<&str>, id: i64, due_at: Millis) {
        self.due.insert((due_at, id));
        self.due_at.insert(id, due_at);
        if let Some(lane) = lane {
            self.edit_lane(lane, |kept| kept.head = Some(id));
        }
    }

    /// Takes `id` out of the pending rows; its due time, if it was pending.
    fn unhead(&mut self, lane: Option<&str>, id: i64) -> Option<Millis> {
        let due_at = self.due_at.remove(&id)?;
        self.fresh.remove(&id);
        self.memos.remove(&id);
        self.due.remove(&(due_at, id));
        if let Some(lane) = lane {
            if let Some(kept) = self.lanes.get_mut(lane)
                && kept.head == Some(id)
            {
                kept.head = None;
            }
            self.tidy(lane);
        }
        Some(due_at)
    }

    /// The row waits behind its lane's head, and goes no earlier than `not_before` once it is
    /// the head (a retry's time, for a row that was a head before a restart).
    fn wait(&mut self, lane: &str, id: i64, not_before: Millis) {
        self.edit_lane(lane, |kept| {
            kept.waiting.insert(id, not_before);
        });
    }

    /// Takes the row out of its lane's waiting rows; the time it may go no earlier than.
    fn unwait(&mut self, lane: &str, id: i64) -> Option<Millis> {
        let not_before = self
            .lanes
            .get_mut(lane)
            .and_then(|kept| kept.waiting.remove(&id));
        self.tidy(lane);
        not_before
    }

    /// Moves a pending row to `due_at`; its due time before, or `None` (and nothing changed)
    /// when it is not pending.
    fn reschedule(&mut self, id: i64, due_at: Millis) -> Option<Millis> {
        let before = *self.due_at.get(&id)?;
        self.due_at.insert(id, due_at);
        self.due.remove(&(before, id));
        self.due.insert((due_at, id));
        Some(before)
    }
}

/// Every sink's queue.
pub(super) struct Lanes {
    queues: [Mutex<Queue>; SinkName::ALL.len()],
}

/// One change to the queue, as logged to be undone.
pub(super) enum Step {
    /// The row became pending (a head, or a row without a lane).
    Headed {
        sink: SinkName,
        lane: Option<String>,
        id: i64,
    },
    /// The row stopped being pending; it was due at `due_at`.
    Unheaded {
        sink: SinkName,
        lane: Option<String>,
        id: i64,
        due_at: Millis,
    },
    /// The row joined its lane's waiting rows.
    Waited {
        sink: SinkName,
        lane: String,
        id: i64,
    },
    /// The row left its lane's waiting rows, where it went no earlier than `not_before`.
    Unwaited {
        sink: SinkName,
        lane: String,
        id: i64,
        not_before: Millis,
    },
    /// The pending row's due time changed from `from`.
    Rescheduled {
        sink: SinkName,
        id: i64,
        from: Millis,
    },
}

/// A claim's read of a sink's queue.
pub(super) struct Due {
    /// The due rows, in queue order, that the claim may take.
    pub(super) ids: Vec<i64>,
    /// When the first row beyond them falls due (a row not due yet, or one past the limit).
    pub(super) next_due: Option<Millis>,
}

impl Lanes {
    pub(super) fn new() -> Lanes {
        Lanes {
            queues: std::array::from_fn(|_| Mutex::default()),
        }
    }

    fn queue(&self, sink: SinkName) -> MutexGuard<'_, Queue> {
        self.queues[sink as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The queue as the file holds it: every open row (`id, sink, lane, due_at`), in any order.
    /// A lane's oldest row is its head, due at its `due_at`; the others wait behind it, each to
    /// go no earlier than its own `due_at` (a retry's time, for a row that was its lane's head
    /// before a replay put an older row in front of it). A row without a lane is due at its
    /// `due_at`.
    pub(super) fn load(
        &self,
        rows: impl IntoIterator<Item = (i64, SinkName, Option<String>, Millis)>,
    ) {
        let mut rows: Vec<_> = rows.into_iter().collect();
        rows.sort_by_key(|row| row.0);
        for (id, sink, lane, due_at) in rows {
            let mut queue = self.queue(sink);
            match lane.as_deref() {
                Some(lane)
                    if queue
                        .lanes
                        .get(lane)
                        .is_some_and(|kept| kept.head.is_some()) =>
                {
                    queue.wait(lane, id, due_at);
                }
                lane => queue.head(lane, id, due_at),
            }
        }
    }

    /// The rows of `sink` due at `now`, in queue order, at most `limit`, leaving out those
    /// `passes_over` names (rows running claims hold).
    pub(super) fn due(
        &self,
        sink: SinkName,
        now: Millis,
        limit: usize,
        passes_over: impl Fn(i64) -> bool,
    ) -> Due {
        let queue = self.queue(sink);
        let mut due = Due {
            ids: Vec::with_capacity(limit.min(64)),
            next_due: None,
        };
        for &(due_at, id) in &queue.due {
            if queue.fresh.contains(&id) || passes_over(id) {
                continue;
            }
            if due_at > now || due.ids.len() >= limit {
                due.next_due = Some(due_at);
                break;
            }
            due.ids.push(id);
        }
        due
    }

    /// How many rows of each sink are pending and how many wait (for tests).
    #[cfg(test)]
    pub(super) fn counts(&self, sink: SinkName) -> (usize, usize) {
        let queue = self.queue(sink);
        let waiting = queue.lanes.values().map(|lane| lane.waiting.len()).sum();
        (queue.due.len(), waiting)
    }

    /// The memo of the row `id`, taken: its first claim reads nothing from the file.
    pub(super) fn take_memo(&self, sink: SinkName, id: i64) -> Option<Memo> {
        self.queue(sink).memos.remove(&id)
    }

    /// Whether the row `id` has a memo (for tests).
    #[cfg(test)]
    pub(super) fn has_memo(&self, sink: SinkName, id: i64) -> bool {
        self.queue(sink).memos.contains_key(&id)
    }

    /// Whether the open row `id` waits behind its lane's head (for the test probe: the file
    /// holds every open row as `pending`).
    pub(super) fn is_waiting(&self, sink: SinkName, lane: &str, id: i64) -> bool {
        self.queue(sink)
            .lanes
            .get(lane)
            .is_some_and(|kept| kept.waiting.contains_key(&id))
    }

    fn apply_inverse(&self, step: Step) {
        match step {
            Step::Headed { sink, lane, id } => {
                self.queue(sink).unhead(lane.as_deref(), id);
            }
            Step::Unheaded {
                sink,
                lane,
                id,
                due_at,
            } => self.queue(sink).head(lane.as_deref(), id, due_at),
            Step::Waited { sink, lane, id } => {
                let mut queue = self.queue(sink);
                queue.unwait(&lane, id);
                queue.memos.remove(&id);
            }
            Step::Unwaited {
                sink,
                lane,
                id,
                not_before,
            } => self.queue(sink).wait(&lane, id, not_before),
            Step::Rescheduled { sink, id, from } => {
                self.queue(sink).reschedule(id, from);
            }
        }
    }
}

/// The queue as one group of writes changes it: each change is applied at once (so the next
/// write of the group sees it) and logged, so that what SQLite undoes is undone here too.
pub(super) struct Changes {
    lanes: Arc<Lanes>,
    log: Vec<Step>,
}

impl Changes {
    pub(super) fn new(lanes: Arc<Lanes>) -> Changes {
        Changes {
            lanes,
            log: Vec::new(),
        }
    }

    /// A point to undo back to.
    pub(super) fn mark(&self) -> usize {
        self.log.len()
    }

    /// Undoes every change made since `mark`, the last first.
    pub(super) fn undo_to(&mut self, mark: usize) {
        while self.log.len() > mark {
            if let Some(step) = self.log.pop() {
                self.lanes.apply_inverse(step);
            }
        }
    }

    /// The group committed: its changes stay, and the rows it made due are no longer fresh.
    pub(super) fn keep(&mut self) {
        for step in self.log.drain(..) {
            if let Step::Headed { sink, id, .. } = step {
                self.lanes.queue(sink).fresh.remove(&id);
            }
        }
    }

    /// Whether the lane has a head (a delivery pending or in flight) for `sink`.
    pub(super) fn has_head(&self, sink: SinkName, lane: &str) -> bool {
        self.lanes
            .queue(sink)
            .lanes
            .get(lane)
            .is_some_and(|kept| kept.head.is_some())
    }

    /// A new or requeued row: pending at `due_at` (`pending`), or waiting in its lane; with
    /// its memo when its claim need not read the file.
    pub(super) fn add(
        &mut self,
        sink: SinkName,
        lane: Option<&str>,
        id: i64,
        pending: bool,
        due_at: Millis,
        memo: Option<Memo>,
    ) {
        let mut queue = self.lanes.queue(sink);
        match memo {
            Some(memo) => queue.memos.insert(id, memo),
            None => queue.memos.remove(&id),
        };
        match lane {
            Some(lane) if !pending => {
                queue.wait(lane, id, due_at);
                self.log.push(Step::Waited {
                    sink,
                    lane: lane.to_owned(),
                    id,
                });
            }
            _ => {
                queue.head(lane, id, due_at);
                queue.fresh.insert(id);
                self.log.push(Step::Headed {
                    sink,
                    lane: lane.map(str::to_owned),
                    id,
                });
            }
        }
    }

    /// The row is done (delivered, dead or skipped): it leaves the queue, and its lane's next
    /// row, if any, becomes the head, due at `now`. Returns that row.
    pub(super) fn finish(
        &mut self,
        sink: SinkName,
        lane: Option<&str>,
        id: i64,
        now: Millis,
    ) -> Option<i64> {
        let mut queue = self.lanes.queue(sink);
        if let Some(due_at) = queue.unhead(lane, id) {
            self.log.push(Step::Unheaded {
                sink,
                lane: lane.map(str::to_owned),
                id,
                due_at,
            });
        }
        drop(queue);
        self.promote(sink, lane?, now)
    }

    /// When the lane has no head, its oldest waiting row becomes it, due at `now` or at the
    /// time it may go no earlier than, whichever is later (in memory only: the file holds it as
    /// pending already); returns that row.
    pub(super) fn promote(&mut self, sink: SinkName, lane: &str, now: Millis) -> Option<i64> {
        let mut queue = self.lanes.queue(sink);
        let kept = queue.lanes.get(lane)?;
        if kept.head.is_some() {
            return None;
        }
        let next = *kept.waiting.keys().next()?;
        let not_before = queue.unwait(lane, next).unwrap_or(now);
        queue.head(Some(lane), next, now.max(not_before));
        queue.fresh.insert(next);
        self.log.push(Step::Unwaited {
            sink,
            lane: lane.to_owned(),
            id: next,
            not_before,
        });
        self.log.push(Step::Headed {
            sink,
            lane: Some(lane.to_owned()),
            id: next,
        });
        Some(next)
    }

    /// A retry: the pending row is due again at `due_at`.
    pub(super) fn reschedule(&mut self, sink: SinkName, id: i64, due_at: Millis) {
        if let Some(from) = self.lanes.queue(sink).reschedule(id, due_at) {
            self.log.push(Step::Rescheduled { sink, id, from });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(lanes: &Lanes, sink: SinkName, now: Millis) -> Vec<i64> {
        lanes.due(sink, now, 100, |_| false).ids
    }

    #[test]
    fn a_lane_lets_one_row_go_at_a_time_in_the_order_of_receipt() {
        let lanes = Arc::new(Lanes::new());
        let mut changes = Changes::new(lanes.clone());
        let sink = SinkName::Bot;
        for id in 1..=3 {
            let pending = !changes.has_head(sink, "u");
            changes.add(sink, Some("u"), id, pending, 10, None);
        }
        changes.add(sink, None, 4, true, 10, None);
        changes.add(sink, Some("v"), 5, true, 10, None);
        changes.keep();
        assert_eq!(order(&lanes, sink, 10), vec![1, 4, 5]);
        assert_eq!(changes.finish(sink, Some("u"), 1, 20), Some(2));
        changes.keep();
        assert_eq!(order(&lanes, sink, 20), vec![4, 5, 2]);
        changes.reschedule(sink, 2, 50);
        assert_eq!(order(&lanes, sink, 20), vec![4, 5]);
        let later = lanes.due(sink, 20, 100, |_| false);
        assert_eq!(later.next_due, Some(50));
        assert_eq!(changes.finish(sink, Some("u"), 2, 60), Some(3));
        assert_eq!(changes.finish(sink, Some("u"), 3, 60), None);
        assert!(!changes.has_head(sink, "u"));
        assert!(
            !lanes.queue(sink).lanes.contains_key("u"),
            "an empty lane is dropped"
        );
        assert_eq!(lanes.counts(SinkName::Kochava), (0, 0));
    }

    #[test]
    fn a_row_made_due_goes_out_only_once_its_write_commits() {
        let lanes = Arc::new(Lanes::new());
        let mut changes = Changes::new(lanes.clone());
        let sink = SinkName::Bot;
        changes.add(sink, Some("u"), 1, true, 10, None);
        changes.add(sink, Some("u"), 2, false, 10, None);
        changes.add(sink, None, 3, true, 10, None);
        assert_eq!(
            order(&lanes, sink, 10),
            Vec::<i64>::new(),
            "nothing is committed yet"
        );
        assert_eq!(lanes.due(sink, 10, 100, |_| false).next_due, None);
        changes.keep();
        assert_eq!(order(&lanes, sink, 10), vec![1, 3]);
        // The head's settle makes the next row due, but not before the settle commits.
        assert_eq!(changes.finish(sink, Some("u"), 1, 20), Some(2));
        assert_eq!(order(&lanes, sink, 20), vec![3]);
        changes.undo_to(0);
        assert_eq!(
            order(&lanes, sink, 20),
            vec![1, 3],
            "a settle undone leaves its head"
        );
        assert_eq!(changes.finish(sink, Some("u"), 1, 20), Some(2));
        changes.keep();
        assert_eq!(order(&lanes, sink, 20), vec![3, 2]);
    }

    #[test]
    fn undone_changes_leave_the_queue_as_before() {
        let lanes = Arc::new(Lanes::new());
        let mut changes = Changes::new(lanes.clone());
        let sink = SinkName::Dashbot;
        changes.add(sink, Some("u"), 1, true, 10, None);
        changes.add(sink, Some("u"), 2, false, 10, None);
        changes.keep();
        let mark = changes.mark();
        assert_eq!(changes.finish(sink, Some("u"), 1, 20), Some(2));
        changes.reschedule(sink, 2, 90);
        changes.add(sink, Some("u"), 3, false, 20, None);
        changes.add(sink, None, 4, true, 20, None);
        changes.undo_to(mark);
        assert_eq!(order(&lanes, sink, 100), vec![1]);
        assert_eq!(lanes.counts(sink), (1, 1));
        // And forward again: the same changes give the same queue.
        assert_eq!(changes.finish(sink, Some("u"), 1, 20), Some(2));
        changes.keep();
        assert_eq!(order(&lanes, sink, 100), vec![2]);
    }

    #[test]
    fn loading_makes_each_lanes_oldest_row_its_head() {
        let lanes = Lanes::new();
        let sink = SinkName::Bot;
        lanes.load([
            (3, sink, Some("u".to_owned()), 5),
            (1, sink, Some("u".to_owned()), 7),
            (2, sink, Some("u".to_owned()), 0),
            (9, sink, Some("w".to_owned()), 0),
            (8, sink, Some("w".to_owned()), 3),
            (4, SinkName::Kochava, None, 1),
            (5, SinkName::Kochava, None, 0),
        ]);
        // 2 and 3 wait behind 1 (due at 7), 9 behind 8 (due at 3).
        assert_eq!(order(&lanes, sink, 100), vec![8, 1]);
        assert_eq!(order(&lanes, sink, 5), vec![8]);
        assert_eq!(lanes.counts(sink), (2, 3));
        assert!(lanes.is_waiting(sink, "u", 2) && !lanes.is_waiting(sink, "u", 1));
        assert_eq!(order(&lanes, SinkName::Kochava, 100), vec![5, 4]);
    }

    #[test]
    fn a_row_loaded_behind_an_older_one_keeps_its_retry_time() {
        let lanes = Arc::new(Lanes::new());
        let sink = SinkName::Bot;
        // 20 was the lane's head, to be retried at 1,000; 10, older, was replayed behind it.
        lanes.load([
            (20, sink, Some("u".to_owned()), 1_000),
            (10, sink, Some("u".to_owned()), 5),
        ]);
        assert_eq!(order(&lanes, sink, 100), vec![10]);
        let mut changes = Changes::new(lanes.clone());
        // A promotion undone leaves 20 waiting with its time, and done again keeps it.
        assert_eq!(changes.finish(sink, Some("u"), 10, 100), Some(20));
        changes.undo_to(0);
        assert_eq!(order(&lanes, sink, 100), vec![10]);
        assert_eq!(changes.finish(sink, Some("u"), 10, 100), Some(20));
        changes.keep();
        assert_eq!(order(&lanes, sink, 100), Vec::<i64>::new());
        assert_eq!(lanes.due(sink, 100, 10, |_| false).next_due, Some(1_000));
        assert_eq!(order(&lanes, sink, 1_000), vec![20]);
    }
}
