//! The events of recent enqueues, kept parsed for the claims of their deliveries: a claim that
//! finds its event here reads neither the event's row nor its JSON. Under load nearly every
//! claim is of an event enqueued moments before, and its row would otherwise be read back
//! (on a connection whose page cache every commit empties) and decoded once per sink.
//!
//! An event goes in when its enqueue writes it (before that write's commit, so that no claim
//! can see its deliveries without it here) and out when its last delivery is finished or its
//! enqueue fails. The events kept hold at most `capacity` bytes of stored JSON; past that, new
//! events are not kept (rather than older ones pushed out: a backlog is claimed oldest first,
//! and pushing out the oldest would lose every event just before its claims). What is not here
//! is read from the file, as before: this only saves work, it decides nothing.

use crate::event::Event;
use foldhash::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// How many bytes of stored events (their JSON) are kept by default: thousands of events, the
/// deliveries a relay has in flight and a few seconds of backlog behind them.
pub(super) const RECENT_BYTES: usize = 8 * 1024 * 1024;

pub(super) struct Recent {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    events: HashMap<Box<str>, Kept>,
    bytes: usize,
}

struct Kept {
    event: Arc<Event>,
    /// Its deliveries not finished yet.
    open: usize,
    bytes: usize,
}

impl Recent {
    pub(super) fn new(capacity: usize) -> Recent {
        Recent {
            capacity,
            inner: Mutex::default(),
        }
    }

    /// Keeps `event`, stored as `bytes` of JSON with `deliveries` deliveries, in place of any
    /// event kept under its id; unless that would pass the capacity. Whether it is kept.
    pub(super) fn keep(&self, event: &Arc<Event>, deliveries: usize, bytes: usize) -> bool {
        if deliveries == 0 {
            return false;
        }
        let mut inner = self.lock();
        let id = event.id.as_str();
        let replaced = inner.events.get(id).map_or(0, |kept| kept.bytes);
        if inner.bytes - replaced + bytes > self.capacity {
            return false;
        }
        inner.bytes = inner.bytes - replaced + bytes;
        let kept = Kept {
            event: Arc::clone(event),
            open: deliveries,
            bytes,
        };
        inner.events.insert(id.into(), kept);
        true
    }

    /// The event kept under `id`.
    pub(super) fn get(&self, id: &str) -> Option<Arc<Event>> {
        self.lock()
            .events
            .get(id)
            .map(|kept| Arc::clone(&kept.event))
    }

    /// One delivery of the event `id` is finished; the event leaves with its last.
    pub(super) fn finished(&self, id: &str) {
        let mut inner = self.lock();
        let Some(kept) = inner.events.get_mut(id) else {
            return;
        };
        kept.open = kept.open.saturating_sub(1);
        if kept.open == 0
            && let Some(kept) = inner.events.remove(id)
        {
            inner.bytes -= kept.bytes;
        }
    }

    /// The enqueue that kept `event` failed: it leaves, unless another event took its place.
    pub(super) fn forget(&self, event: &Arc<Event>) {
        let mut inner = self.lock();
        let id = event.id.as_str();
        if inner
            .events
            .get(id)
            .is_some_and(|kept| Arc::ptr_eq(&kept.event, event))
            && let Some(kept) = inner.events.remove(id)
        {
            inner.bytes -= kept.bytes;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    pub(super) fn held(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.events.len(), inner.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventId;

    fn event(name: &str) -> Arc<Event> {
        let mut event = crate::sinks::testing::revenue();
        event.id = EventId::derive(&[name.as_bytes()]);
        Arc::new(event)
    }

    #[test]
    fn an_event_leaves_with_its_last_delivery() {
        let recent = Recent::new(1000);
        let a = event("a");
        recent.keep(&a, 2, 100);
        recent.finished(a.id.as_str());
        assert!(
            recent
                .get(a.id.as_str())
                .is_some_and(|kept| Arc::ptr_eq(&kept, &a))
        );
        recent.finished(a.id.as_str());
        assert!(recent.get(a.id.as_str()).is_none());
        assert_eq!(recent.held(), (0, 0));
        // A delivery of an event no longer kept changes nothing.
        recent.finished(a.id.as_str());
        assert_eq!(recent.held(), (0, 0));
    }

    #[test]
    fn past_the_capacity_new_events_are_not_kept() {
        let recent = Recent::new(250);
        let (a, b, c) = (event("a"), event("b"), event("c"));
        recent.keep(&a, 1, 100);
        recent.keep(&b, 1, 100);
        recent.keep(&c, 1, 100);
        assert!(recent.get(a.id.as_str()).is_some());
        assert!(recent.get(b.id.as_str()).is_some());
        assert!(recent.get(c.id.as_str()).is_none());
        assert_eq!(recent.held(), (2, 200));
        // Kept again (an enqueue's write run a second time): in its own place.
        recent.keep(&b, 1, 150);
        assert_eq!(recent.held(), (2, 250));
        // Room again once an event's last delivery is finished.
        recent.finished(a.id.as_str());
        recent.keep(&c, 1, 100);
        assert!(recent.get(c.id.as_str()).is_some());
        assert_eq!(recent.held(), (2, 250));
    }

    #[test]
    fn a_failed_enqueue_takes_out_only_its_own_event() {
        let recent = Recent::new(1000);
        let (a, same_id) = (event("a"), event("a"));
        recent.keep(&a, 3, 100);
        recent.forget(&same_id);
        assert!(recent.get(a.id.as_str()).is_some());
        recent.forget(&a);
        assert!(recent.get(a.id.as_str()).is_none());
        assert_eq!(recent.held(), (0, 0));
    }
}
