//! The last hour of each sink, minute by minute, in memory: attempts by outcome (delivered,
//! retried, dead, skipped) and the delivery time of each attempt in a fixed set of latency
//! buckets, from which p50 and p99 per minute are read. Fed by the dispatcher (through
//! [`super::SinkStatus`]), read by `GET /admin/sinks/history` for the status page.
//!
//! One ring of [`MINUTES`] slots per sink: a slot is the minute `at / 60 s` modulo 60, and is
//! cleared when a newer minute lands on it, so memory is fixed (about 8 KiB per sink) and no
//! timer is needed. This is the history of this process only: on PostgreSQL each relay shows
//! its own deliveries.

use crate::clock::Millis;
use crate::sink_name::SinkName;
use crate::store::Settle;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// How many minutes are kept.
pub const MINUTES: usize = 60;

/// One minute in milliseconds.
pub const MINUTE_MS: Millis = 60_000;

/// Upper bounds (milliseconds) of the latency buckets; one more bucket takes everything above
/// the last. Roughly 1-2-3-5 steps: a quantile read from them is off by at most half a step.
pub const LATENCY_BOUNDS_MS: [f64; 29] = [
    1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0,
    750.0, 1_000.0, 1_500.0, 2_000.0, 3_000.0, 5_000.0, 7_500.0, 10_000.0, 15_000.0, 20_000.0,
    30_000.0, 60_000.0, 120_000.0,
];

const BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// The outcome of a settled delivery, as counted per minute (the `outcome` label of
/// `botrelay_deliveries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Delivered,
    Retried,
    Dead,
    Skipped,
}

impl Counted {
    pub fn of(settle: &Settle) -> Counted {
        match settle {
            Settle::Delivered { .. } => Counted::Delivered,
            Settle::Retry { .. } => Counted::Retried,
            Settle::Dead { .. } => Counted::Dead,
            Settle::Skipped { .. } => Counted::Skipped,
        }
    }
}

/// One minute of one sink.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Minutes since the epoch; `None` for a slot never written.
    minute: Option<i64>,
    outcomes: [u32; 4],
    latency: [u32; BUCKETS],
    /// The slowest attempt, the top of the overflow bucket.
    max_ms: f64,
}

impl Slot {
    const EMPTY: Slot = Slot {
        minute: None,
        outcomes: [0; 4],
        latency: [0; BUCKETS],
        max_ms: 0.0,
    };
}

/// The slots of one sink.
#[derive(Debug, Clone)]
struct Ring([Slot; MINUTES]);

impl Ring {
    /// The slot of minute `minute`, cleared first when it holds an older minute; `None` for a
    /// minute older than the one the slot holds (a late write after the ring moved on).
    fn slot(&mut self, minute: i64) -> Option<&mut Slot> {
        let slot = &mut self.0[index(minute)];
        match slot.minute {
            Some(held) if held > minute => None,
            Some(held) if held == minute => Some(slot),
            _ => {
                *slot = Slot {
                    minute: Some(minute),
                    ..Slot::EMPTY
                };
                Some(slot)
            }
        }
    }
}

fn index(minute: i64) -> usize {
    // rem_euclid of a positive modulus is in 0..MINUTES.
    usize::try_from(minute.rem_euclid(MINUTES as i64)).unwrap_or(0)
}

/// The last hour of one sink, oldest minute first: one entry per minute in each list.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkHistory {
    /// The start of the first minute.
    pub start: Millis,
    pub delivered: Vec<u32>,
    pub retried: Vec<u32>,
    pub dead: Vec<u32>,
    pub skipped: Vec<u32>,
    /// Delivery time (ms) of half the minute's attempts or less; `None` without attempts.
    pub p50_ms: Vec<Option<f64>>,
    pub p99_ms: Vec<Option<f64>>,
}

/// Every sink's last hour. A cheap `Clone` handle.
#[derive(Debug, Clone, Default)]
pub struct History {
    by_sink: Arc<Mutex<HashMap<SinkName, Box<Ring>>>>,
}

impl History {
    fn rings(&self) -> MutexGuard<'_, HashMap<SinkName, Box<Ring>>> {
        self.by_sink.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn with_slot(&self, sink: SinkName, at: Millis, change: impl FnOnce(&mut Slot)) {
        let mut rings = self.rings();
        let ring = rings
            .entry(sink)
            .or_insert_with(|| Box::new(Ring([Slot::EMPTY; MINUTES])));
        if let Some(slot) = ring.slot(at.div_euclid(MINUTE_MS)) {
            change(slot);
        }
    }

    /// Counts one settled delivery of `sink` at `at`.
    pub fn count(&self, sink: SinkName, outcome: Counted, at: Millis) {
        self.with_slot(sink, at, |slot| {
            let count = &mut slot.outcomes[outcome as usize];
            *count = count.saturating_add(1);
        });
    }

    /// Records that one attempt to `sink`, ended at `at`, took `seconds`.
    pub fn latency(&self, sink: SinkName, seconds: f64, at: Millis) {
        let ms = (seconds * 1000.0).max(0.0);
        let bucket = LATENCY_BOUNDS_MS
            .iter()
            .position(|bound| ms <= *bound)
            .unwrap_or(BUCKETS - 1);
        self.with_slot(sink, at, |slot| {
            slot.latency[bucket] = slot.latency[bucket].saturating_add(1);
            slot.max_ms = slot.max_ms.max(ms);
        });
    }

    /// The [`MINUTES`] minutes of `sink` up to and including the one of `now`.
    pub fn last_hour(&self, sink: SinkName, now: Millis) -> SinkHistory {
        let current = now.div_euclid(MINUTE_MS);
        let first = first_minute(now).div_euclid(MINUTE_MS);
        let rings = self.rings();
        let ring = rings.get(&sink);
        let mut history = SinkHistory {
            start: first * MINUTE_MS,
            delivered: Vec::with_capacity(MINUTES),
            retried: Vec::with_capacity(MINUTES),
            dead: Vec::with_capacity(MINUTES),
            skipped: Vec::with_capacity(MINUTES),
            p50_ms: Vec::with_capacity(MINUTES),
            p99_ms: Vec::with_capacity(MINUTES),
        };
        for minute in first..=current {
            let slot = ring
                .map(|ring| &ring.0[index(minute)])
                .filter(|slot| slot.minute == Some(minute))
                .unwrap_or(&Slot::EMPTY);
            history
                .delivered
                .push(slot.outcomes[Counted::Delivered as usize]);
            history
                .retried
                .push(slot.outcomes[Counted::Retried as usize]);
            history.dead.push(slot.outcomes[Counted::Dead as usize]);
            history
                .skipped
                .push(slot.outcomes[Counted::Skipped as usize]);
            history.p50_ms.push(quantile(slot, 0.50));
            history.p99_ms.push(quantile(slot, 0.99));
        }
        history
    }
}

/// The start of the first of the [`MINUTES`] minutes that end with the one of `now`.
pub fn first_minute(now: Millis) -> Millis {
    (now.div_euclid(MINUTE_MS) - (MINUTES as i64 - 1)) * MINUTE_MS
}

/// The `q` quantile of a minute's delivery times, interpolated linearly inside its bucket,
/// rounded to 0.1 ms.
fn quantile(slot: &Slot, q: f64) -> Option<f64> {
    let total: u64 = slot.latency.iter().map(|count| u64::from(*count)).sum();
    if total == 0 {
        return None;
    }
    // The rank of the attempt that the quantile falls on, 1-based.
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut below = 0u64;
    for (bucket, count) in slot.latency.iter().enumerate() {
        let count = u64::from(*count);
        if below + count >= rank {
            let lower = if bucket == 0 {
                0.0
            } else {
                LATENCY_BOUNDS_MS[bucket - 1]
            };
            let upper = LATENCY_BOUNDS_MS
                .get(bucket)
                .copied()
                .unwrap_or(slot.max_ms)
                .min(slot.max_ms.max(lower));
            let within = (rank - below) as f64 / count as f64;
            let value = lower + (upper - lower) * within;
            return Some((value * 10.0).round() / 10.0);
        }
        below += count;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_700_000_040_000; // a minute's start

    #[test]
    fn outcomes_are_counted_per_minute_and_an_hour_is_kept() {
        let history = History::default();
        history.count(SinkName::Bot, Counted::Delivered, T0);
        history.count(SinkName::Bot, Counted::Delivered, T0 + 59_999);
        history.count(SinkName::Bot, Counted::Retried, T0 + 60_000);
        history.count(SinkName::Bot, Counted::Dead, T0 + 120_500);
        history.count(SinkName::Kochava, Counted::Skipped, T0);
        let bot = history.last_hour(SinkName::Bot, T0 + 120_500);
        assert_eq!(bot.start, T0 + 120_000 - 59 * MINUTE_MS);
        assert_eq!(bot.delivered.len(), MINUTES);
        assert_eq!(&bot.delivered[57..], [2, 0, 0]);
        assert_eq!(&bot.retried[57..], [0, 1, 0]);
        assert_eq!(&bot.dead[57..], [0, 0, 1]);
        assert!(bot.skipped.iter().all(|count| *count == 0));
        assert_eq!(
            history.last_hour(SinkName::Kochava, T0).skipped[59],
            1,
            "sinks are kept apart"
        );

        // An hour later the first minute's slot holds the new minute, and the old counts are
        // neither shown nor added to.
        let later = T0 + 60 * MINUTE_MS;
        history.count(SinkName::Bot, Counted::Delivered, later);
        let bot = history.last_hour(SinkName::Bot, later);
        assert_eq!(bot.delivered[59], 1);
        assert_eq!(bot.delivered.iter().sum::<u32>(), 1);
        assert_eq!(
            &bot.retried[..1],
            [1],
            "T0 + 1 min is still within the hour"
        );
        // A late write for a minute the ring has moved past changes nothing.
        history.count(SinkName::Bot, Counted::Delivered, T0);
        assert_eq!(history.last_hour(SinkName::Bot, later).delivered[59], 1);
        // An hour of silence: all zeros.
        let silent = history.last_hour(SinkName::Bot, later + 61 * MINUTE_MS);
        assert!(silent.delivered.iter().all(|count| *count == 0));
        assert!(silent.p50_ms.iter().all(Option::is_none));
    }

    #[test]
    fn p50_and_p99_come_from_the_latency_buckets() {
        let history = History::default();
        // 98 attempts of 4 ms, one of 180 ms, one of 200 s (beyond the last bound).
        for _ in 0..98 {
            history.latency(SinkName::Bot, 0.004, T0);
        }
        history.latency(SinkName::Bot, 0.180, T0);
        history.latency(SinkName::Bot, 200.0, T0);
        let bot = history.last_hour(SinkName::Bot, T0);
        let (p50, p99) = (bot.p50_ms[59], bot.p99_ms[59]);
        // 4 ms is in (3, 5]: the quantile is read inside that bucket.
        assert!(p50.is_some_and(|p50| (3.0..=5.0).contains(&p50)), "{p50:?}");
        assert!(
            p99.is_some_and(|p99| (150.0..=200.0).contains(&p99)),
            "{p99:?}"
        );
        assert_eq!(bot.p50_ms[58], None);

        // One slow attempt alone: its own bucket, capped by the slowest seen.
        history.latency(SinkName::Dashbot, 200.0, T0);
        assert_eq!(
            history.last_hour(SinkName::Dashbot, T0).p99_ms[59],
            Some(200_000.0)
        );
        history.latency(SinkName::Kochava, 0.0101, T0);
        let kochava = history.last_hour(SinkName::Kochava, T0).p50_ms[59];
        assert!(
            kochava.is_some_and(|p50| (10.0..=10.2).contains(&p50)),
            "{kochava:?}"
        );
    }
}
