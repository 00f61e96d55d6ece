//! The embedded store's queue in memory: per sink, which deliveries are due and when, and per
//! user (a lane) which delivery is the head and which wait behind it. One relay owns the file,
//! so nothing but this process changes the queue, and the file need not index it: claims read
//! it here instead of through three indexes that every enqueue and settle rewrote at random
//! places (a lane's head, its waiting rows, the due order). The rows' `state` and `due_at` in
//! the file stay exact; they are what the queue is rebuilt from at open
//! ([`Lanes::load`]).
//!
//! The writer changes the queue from inside its writes, as SQLite changes the file, and each
//! change is logged ([`Step`]) so that a write SQLite undoes (a savepoint rolled back, a group
//! rolled back and run again) has its changes undone here too ([`Changes::undo_to`]). A claim can
//! therefore see a row of a group not yet committed: it reads the row's `state` from the file
//! before handing it out, and passes over a row the file does not show as pending yet.

use crate::clock::Millis;
use crate::sink_name::SinkName;
use std::collections::{BTreeSet, HashMap};
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
}

#[derive(Default)]
struct Lane {
    head: Option<i64>,
    /// Oldest first: the next head is the first.
    waiting: BTreeSet<i64>,
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

    fn wait(&mut self, lane: &str, id: i64) {
        self.edit_lane(lane, |kept| {
            kept.waiting.insert(id);
        });
    }

    fn unwait(&mut self, lane: &str, id: i64) {
        if let Some(kept) = self.lanes.get_mut(lane) {
            kept.waiting.remove(&id);
        }
        self.tidy(lane);
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
    /// The row left its lane's waiting rows.
    Unwaited {
        sink: SinkName,
        lane: String,
        id: i64,
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

    /// The queue as the file holds it: every open row (`id, sink, lane, pending, due_at`), in
    /// any order. A lane's head is its pending row. What no version of this relay leaves in a
    /// file is set right, and returned (`id`, pending) for the file to say so too: a lane with
    /// more than one pending row keeps the oldest as its head and the others wait; a lane with
    /// rows waiting but no head, or a waiting row without a lane, has its oldest made pending,
    /// due at `now`.
    pub(super) fn load(
        &self,
        rows: impl IntoIterator<Item = (i64, SinkName, Option<String>, bool, Millis)>,
        now: Millis,
    ) -> Vec<(i64, bool)> {
        let mut rows: Vec<_> = rows.into_iter().collect();
        rows.sort_by_key(|row| row.0);
        let mut corrected = Vec::new();
        for (id, sink, lane, pending, due_at) in rows {
            let mut queue = self.queue(sink);
            match lane.as_deref() {
                None if pending => queue.head(None, id, due_at),
                None => {
                    queue.head(None, id, now);
                    corrected.push((id, true));
                }
                Some(lane)
                    if pending && queue.lanes.get(lane).is_none_or(|kept| kept.head.is_none()) =>
                {
                    queue.head(Some(lane), id, due_at);
                }
                Some(lane) => {
                    queue.wait(lane, id);
                    if pending {
                        corrected.push((id, false));
                    }
                }
            }
        }
        for sink in SinkName::ALL {
            let mut queue = self.queue(sink);
            let headless: Vec<(String, i64)> = queue
                .lanes
                .iter()
                .filter(|(_, lane)| lane.head.is_none())
                .filter_map(|(name, lane)| Some((name.clone(), *lane.waiting.first()?)))
                .collect();
            for (lane, next) in headless {
                queue.unwait(&lane, next);
                queue.head(Some(&lane), next, now);
                corrected.push((next, true));
            }
        }
        corrected.sort_unstable();
        corrected
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
            if passes_over(id) {
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
            Step::Waited { sink, lane, id } => self.queue(sink).unwait(&lane, id),
            Step::Unwaited { sink, lane, id } => self.queue(sink).wait(&lane, id),
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

    /// The group committed: its changes stay.
    pub(super) fn keep(&mut self) {
        self.log.clear();
    }

    /// Whether the lane has a head (a delivery pending or in flight) for `sink`.
    pub(super) fn has_head(&self, sink: SinkName, lane: &str) -> bool {
        self.lanes
            .queue(sink)
            .lanes
            .get(lane)
            .is_some_and(|kept| kept.head.is_some())
    }

    /// A new or requeued row: pending at `due_at` (`pending`), or waiting in its lane.
    pub(super) fn add(
        &mut self,
        sink: SinkName,
        lane: Option<&str>,
        id: i64,
        pending: bool,
        due_at: Millis,
    ) {
        let mut queue = self.lanes.queue(sink);
        match lane {
            Some(lane) if !pending => {
                queue.wait(lane, id);
                self.log.push(Step::Waited {
                    sink,
                    lane: lane.to_owned(),
                    id,
                });
            }
            _ => {
                queue.head(lane, id, due_at);
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

    /// When the lane has no head, its oldest waiting row becomes it, due at `now`; returns
    /// that row.
    pub(super) fn promote(&mut self, sink: SinkName, lane: &str, now: Millis) -> Option<i64> {
        let mut queue = self.lanes.queue(sink);
        let kept = queue.lanes.get(lane)?;
        if kept.head.is_some() {
            return None;
        }
        let next = *kept.waiting.first()?;
        queue.unwait(lane, next);
        queue.head(Some(lane), next, now);
        self.log.push(Step::Unwaited {
            sink,
            lane: lane.to_owned(),
            id: next,
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
            changes.add(sink, Some("u"), id, pending, 10);
        }
        changes.add(sink, None, 4, true, 10);
        changes.add(sink, Some("v"), 5, true, 10);
        assert_eq!(order(&lanes, sink, 10), vec![1, 4, 5]);
        assert_eq!(changes.finish(sink, Some("u"), 1, 20), Some(2));
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
    fn undone_changes_leave_the_queue_as_before() {
        let lanes = Arc::new(Lanes::new());
        let mut changes = Changes::new(lanes.clone());
        let sink = SinkName::Dashbot;
        changes.add(sink, Some("u"), 1, true, 10);
        changes.add(sink, Some("u"), 2, false, 10);
        changes.keep();
        let mark = changes.mark();
        assert_eq!(changes.finish(sink, Some("u"), 1, 20), Some(2));
        changes.reschedule(sink, 2, 90);
        changes.add(sink, Some("u"), 3, false, 20);
        changes.add(sink, None, 4, true, 20);
        changes.undo_to(mark);
        assert_eq!(order(&lanes, sink, 100), vec![1]);
        assert_eq!(lanes.counts(sink), (1, 1));
        // And forward again: the same changes give the same queue.
        assert_eq!(changes.finish(sink, Some("u"), 1, 20), Some(2));
        assert_eq!(order(&lanes, sink, 100), vec![2]);
    }

    #[test]
    fn loading_keeps_one_head_per_lane_and_sets_right_what_it_finds_wrong() {
        let lanes = Lanes::new();
        let sink = SinkName::Bot;
        let corrected = lanes.load(
            [
                (3, sink, Some("u".to_owned()), true, 5),
                (1, sink, Some("u".to_owned()), true, 7),
                (2, sink, Some("u".to_owned()), false, 0),
                (9, sink, Some("w".to_owned()), false, 0),
                (8, sink, Some("w".to_owned()), false, 0),
                (4, SinkName::Kochava, None, true, 1),
                (5, SinkName::Kochava, None, false, 0),
            ],
            50,
        );
        // 3 waits behind 1, 8 heads lane w, 5 (no lane) is pending.
        assert_eq!(corrected, vec![(3, false), (5, true), (8, true)]);
        assert_eq!(order(&lanes, sink, 100), vec![1, 8]);
        assert_eq!(lanes.counts(sink), (2, 3));
        assert_eq!(order(&lanes, SinkName::Kochava, 100), vec![4, 5]);
    }
}
