//! Sink health: telling a sink that fails as a whole (an outage) from an event that fails on
//! its own, so that an outage holds the sink's deliveries instead of spending their attempts or
//! dead-lettering them (SPEC §4, "Outages are not dead letters"). Pure: times and jitter are
//! passed in; the dispatcher keeps one [`Health`] per sink behind a lock.
//!
//! - An attempt's outcome is [`Observed::Down`] when it says nothing about the event and
//!   everything about the sink: no connection, a timeout, 408, 5xx, and 401/403/404 (an endpoint
//!   being redeployed or misconfigured). 429 and every other answer say the sink is up.
//! - The sink is in outage once the last [`OUTAGE_AFTER`] outcomes were all `Down`, came from
//!   at least two users' lanes (one user's failing lane is that user's problem), and nothing
//!   answered for [`outage_quiet`] (a sink that fails some users' events and takes the others'
//!   is up, however the failures happen to bunch).
//! - In outage, the dispatcher claims nothing but one probe at a time, at the backoff pace
//!   (`backoff` doubling to `max_backoff` with each failed probe). Every failed attempt is held:
//!   retried at the next probe's time, uncounted. The first probe that the sink answers (a
//!   success, or an answer about the event itself) ends the outage, and claims resume at once.
//! - A 401/403/404 is final for the event only while the sink answers other deliveries (it
//!   answered within the quiet period), and then after [`SUSPECT_ATTEMPTS`] tries; while nothing
//!   answers it is retried, so that the first failures of a redeploy, which come before the
//!   outage is recognised, are not dead-lettered.
//!
//! With several relays on one database each relay reaches its verdict on its own, from its own
//! attempts: they see the same sink fail, so they agree within a few attempts, and no relay waits
//! on another's view (a shared verdict would need a write per attempt and a leader to probe).

use crate::check::DeliveryPolicy;
use crate::clock::{Millis, millis};
use crate::delivery::Outcome;
use std::collections::VecDeque;
use std::time::Duration;

/// Consecutive sink-level failures, over two users at least, that make an outage.
pub const OUTAGE_AFTER: usize = 5;

/// How long without any answer from the sink (a delivery, or an answer about the event) before
/// failures can make an outage: twice the sink's `backoff` (so every failing lane was tried
/// again at least once), at least 100 ms and at most a second.
pub fn outage_quiet(policy: &DeliveryPolicy) -> Millis {
    millis(policy.backoff.saturating_mul(2)).clamp(100, 1_000)
}

/// Counted failures with 401, 403 or 404 before such an answer is taken as final for the event.
pub const SUSPECT_ATTEMPTS: u32 = 3;

/// What an attempt's outcome says about the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Delivered.
    Up,
    /// The sink answered, about this event (a 400, a 429): it is there.
    Answered,
    /// Nothing about the event, everything about the sink.
    Down,
}

impl Observed {
    pub fn of(outcome: &Outcome) -> Observed {
        match outcome {
            Outcome::Delivered { .. } => Observed::Up,
            Outcome::Retry { status: None, .. } => Observed::Down,
            // 401/403/404 as they come, or as `suspect_first` turned them into a retry.
            Outcome::Retry {
                status: Some(401 | 403 | 404 | 408 | 500..=599),
                ..
            } => Observed::Down,
            Outcome::Permanent {
                status: Some(401 | 403 | 404),
                ..
            } => Observed::Down,
            Outcome::Retry { .. } | Outcome::Permanent { .. } => Observed::Answered,
        }
    }
}

/// A 401/403/404 is retried while the sink answers nothing else (`sink_answering` false: it may
/// be the start of a redeploy that is not yet recognised as an outage), and otherwise until
/// [`SUSPECT_ATTEMPTS`] counted failures.
pub fn suspect_first(outcome: Outcome, counted_failures: u32, sink_answering: bool) -> Outcome {
    match outcome {
        Outcome::Permanent {
            status: Some(status @ (401 | 403 | 404)),
            error,
        } if !sink_answering || counted_failures + 1 < SUSPECT_ATTEMPTS => Outcome::Retry {
            status: Some(status),
            after: None,
            error,
        },
        outcome => outcome,
    }
}

/// What the dispatcher may claim now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// As many as it has permits for.
    All,
    /// One delivery: the outage's probe.
    Probe,
    /// Nothing before this time (a probe is out, or not yet due).
    Not { until: Option<Millis> },
}

/// How a finished attempt changed the sink's state, for the log and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    None,
    OutageBegan { error: String },
    OutageEnded { since: Millis },
}

#[derive(Debug, Clone)]
struct Outage {
    since: Millis,
    /// When the next probe may go.
    probe_at: Millis,
    /// Probes that failed so far: the pace doubles with each.
    failed_probes: u32,
    probe_out: bool,
}

/// One sink's health as this relay sees it.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// The latest outcomes, newest last: whether each was `Down`, and its lane.
    recent: VecDeque<(bool, Option<String>)>,
    /// When the sink last answered (a delivery, or an answer about the event).
    last_answer: Option<Millis>,
    /// When the sink was first tried: the quiet period counts from here until it answers.
    first_tried: Option<Millis>,
    outage: Option<Outage>,
}

impl Health {
    /// When the current outage began; `None` while the sink is ok.
    pub fn outage_since(&self) -> Option<Millis> {
        self.outage.as_ref().map(|outage| outage.since)
    }

    /// Whether the sink answered (anything but a failure of its own) within its quiet period.
    pub fn answering(&self, now: Millis, policy: &DeliveryPolicy) -> bool {
        self.last_answer
            .is_some_and(|at| now.saturating_sub(at) < outage_quiet(policy))
    }

    /// What may be claimed now; a `Probe` answer counts the probe as out.
    pub fn admit(&mut self, now: Millis) -> Admit {
        let Some(outage) = &mut self.outage else {
            return Admit::All;
        };
        if outage.probe_out {
            Admit::Not { until: None }
        } else if now >= outage.probe_at {
            outage.probe_out = true;
            Admit::Probe
        } else {
            Admit::Not {
                until: Some(outage.probe_at),
            }
        }
    }

    /// The probe's claim found nothing due: no probe is out after all.
    pub fn probe_not_sent(&mut self) {
        if let Some(outage) = &mut self.outage {
            outage.probe_out = false;
        }
    }

    /// Records an attempt's outcome. Returns the change of state, and, for a failure while the
    /// sink is (now) in outage, the time to hold the delivery until: it is retried then,
    /// uncounted. `after` is the sink's own `Retry-After`, if it sent one.
    pub fn observe(
        &mut self,
        lane: Option<&str>,
        outcome: &Outcome,
        probe: bool,
        policy: &DeliveryPolicy,
        now: Millis,
        jitter: f64,
    ) -> (Change, Option<Millis>) {
        let observed = Observed::of(outcome);
        let after = match outcome {
            Outcome::Retry { after, .. } => *after,
            _ => None,
        };
        if let Some(outage) = &mut self.outage {
            if probe {
                outage.probe_out = false;
            }
            if observed == Observed::Down {
                if probe {
                    outage.failed_probes += 1;
                    let pace = probe_pace(policy, outage.failed_probes, jitter);
                    let asked = after.map_or(0, |after| millis(after.min(policy.max_backoff)));
                    outage.probe_at = now.saturating_add(millis(pace).max(asked));
                }
                return (Change::None, Some(outage.probe_at));
            }
            // The sink answered (a probe, or an attempt that was out when the outage began).
            let since = outage.since;
            self.outage = None;
            self.recent.clear();
            self.last_answer = Some(now);
            return (Change::OutageEnded { since }, None);
        }
        let down = observed == Observed::Down;
        let first_tried = *self.first_tried.get_or_insert(now);
        if !down {
            self.last_answer = Some(now);
        }
        let last_answer = self.last_answer.unwrap_or(first_tried);
        self.recent.push_back((down, lane.map(str::to_owned)));
        while self.recent.len() > OUTAGE_AFTER {
            self.recent.pop_front();
        }
        let all_down =
            self.recent.len() == OUTAGE_AFTER && self.recent.iter().all(|(down, _)| *down);
        let first = self.recent.front().map(|(_, lane)| lane);
        let several_users = self.recent.iter().any(|(_, lane)| Some(lane) != first);
        let quiet = now.saturating_sub(last_answer) >= outage_quiet(policy);
        if !(all_down && several_users && quiet) {
            return (Change::None, None);
        }
        let probe_at = now.saturating_add(millis(probe_pace(policy, 0, jitter)));
        self.outage = Some(Outage {
            since: now,
            probe_at,
            failed_probes: 0,
            probe_out: false,
        });
        let error = match outcome {
            Outcome::Retry { error, .. } | Outcome::Permanent { error, .. } => error.clone(),
            Outcome::Delivered { .. } => String::new(),
        };
        (Change::OutageBegan { error }, Some(probe_at))
    }
}

/// The wait before the next probe after `failed` failed probes: `backoff` doubling up to
/// `max_backoff`, between half of that and all of it (so that relays spread their probes).
fn probe_pace(policy: &DeliveryPolicy, failed: u32, jitter: f64) -> Duration {
    let ceiling = policy
        .backoff
        .saturating_mul(1u32 << failed.min(31))
        .min(policy.max_backoff);
    ceiling.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> DeliveryPolicy {
        DeliveryPolicy {
            concurrency: 8,
            timeout: Duration::from_secs(10),
            max_attempts: 0,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
            ttl: Duration::from_secs(3600),
        }
    }

    fn down() -> Outcome {
        Outcome::Retry {
            status: None,
            after: None,
            error: "connection refused".into(),
        }
    }

    fn status(status: u16) -> Outcome {
        match status {
            200..=299 => Outcome::Delivered { status },
            408 | 429 | 500..=599 => Outcome::Retry {
                status: Some(status),
                after: None,
                error: format!("HTTP {status}"),
            },
            _ => Outcome::Permanent {
                status: Some(status),
                error: format!("HTTP {status}"),
            },
        }
    }

    #[test]
    fn what_each_answer_says_about_the_sink() {
        assert_eq!(Observed::of(&down()), Observed::Down);
        for code in [408, 500, 502, 503, 504, 401, 403, 404] {
            assert_eq!(Observed::of(&status(code)), Observed::Down, "{code}");
        }
        for code in [400, 409, 410, 422, 429] {
            assert_eq!(Observed::of(&status(code)), Observed::Answered, "{code}");
        }
        assert_eq!(Observed::of(&status(204)), Observed::Up);
        // A 404 that `suspect_first` made a retry still says the sink is down.
        assert_eq!(
            Observed::of(&suspect_first(status(404), 0, true)),
            Observed::Down
        );
    }

    #[test]
    fn failures_of_several_users_make_an_outage_and_one_user_does_not() {
        let mut one_user = Health::default();
        for n in 0..20 {
            let (change, hold) = one_user.observe(Some("U1"), &down(), false, &policy(), n, 0.5);
            assert_eq!((change, hold), (Change::None, None), "attempt {n}");
        }
        let mut health = Health::default();
        for n in 0..4 {
            let lane = format!("U{n}");
            assert_eq!(
                health.observe(Some(&lane), &down(), false, &policy(), 1_000, 0.5),
                (Change::None, None)
            );
        }
        // A success in between starts the count again.
        health.observe(Some("U9"), &status(200), false, &policy(), 1_000, 0.5);
        for n in 0..4 {
            let lane = format!("U{n}");
            assert_eq!(
                health
                    .observe(Some(&lane), &status(503), false, &policy(), 2_000, 0.5)
                    .0,
                Change::None
            );
        }
        let (change, hold) = health.observe(Some("U4"), &status(404), false, &policy(), 2_000, 0.5);
        assert_eq!(
            change,
            Change::OutageBegan {
                error: "HTTP 404".into()
            }
        );
        // The first probe goes after 0.75 × backoff (jitter 0.5), and this delivery waits for it.
        assert_eq!(hold, Some(2_750));
        assert_eq!(health.outage_since(), Some(2_000));
    }

    /// Five failures in a row over several users, while the sink took other users' events a
    /// moment ago, are a bunch, not an outage.
    #[test]
    fn the_quiet_period_follows_the_backoff_within_bounds() {
        let with = |backoff: u64| DeliveryPolicy {
            backoff: Duration::from_millis(backoff),
            ..policy()
        };
        assert_eq!(outage_quiet(&with(10)), 100);
        assert_eq!(outage_quiet(&with(200)), 400);
        assert_eq!(outage_quiet(&with(1_000)), 1_000);
    }

    #[test]
    fn failures_that_bunch_between_answers_are_no_outage() {
        let mut health = Health::default();
        health.observe(Some("U0"), &status(200), false, &policy(), 10_000, 0.5);
        for n in 1..=OUTAGE_AFTER {
            let lane = format!("U{n}");
            let (change, _) =
                health.observe(Some(&lane), &status(500), false, &policy(), 10_500, 0.5);
            assert_eq!(change, Change::None);
        }
        assert_eq!(health.outage_since(), None);
    }

    /// Failures of several users, the first a quiet period before the fifth: an outage at `at`.
    fn in_outage(at: Millis, jitter: f64) -> Health {
        let mut health = Health::default();
        let quiet = outage_quiet(&policy());
        for n in 0..OUTAGE_AFTER {
            let when = at - quiet + quiet * n as i64 / (OUTAGE_AFTER as i64 - 1);
            health.observe(
                Some(&format!("U{n}")),
                &down(),
                false,
                &policy(),
                when,
                jitter,
            );
        }
        assert_eq!(health.outage_since(), Some(at));
        health
    }

    #[test]
    fn an_outage_holds_everything_and_sends_one_probe_at_the_backoff_pace() {
        let mut health = in_outage(0, 1.0);
        assert_eq!(health.admit(500), Admit::Not { until: Some(1_000) });
        // An attempt that was out when the outage began and fails too: held until the probe.
        assert_eq!(
            health.observe(Some("U7"), &down(), false, &policy(), 600, 1.0),
            (Change::None, Some(1_000))
        );
        assert_eq!(health.admit(1_000), Admit::Probe);
        assert_eq!(
            health.admit(1_001),
            Admit::Not { until: None },
            "one probe at a time"
        );
        // The probe fails: the next one waits twice as long, then four times, up to the ceiling.
        let mut now = 1_000;
        for expected_wait in [2_000, 4_000, 8_000, 8_000] {
            let (_, hold) = health.observe(Some("U1"), &down(), true, &policy(), now, 1.0);
            assert_eq!(hold, Some(now + expected_wait));
            now += expected_wait;
            assert_eq!(health.admit(now), Admit::Probe);
        }
        // A Retry-After longer than the pace is honoured, capped at max_backoff.
        let asked = Outcome::Retry {
            status: Some(503),
            after: Some(Duration::from_secs(3600)),
            error: "HTTP 503".into(),
        };
        let (_, hold) = health.observe(Some("U1"), &asked, true, &policy(), now, 0.0);
        assert_eq!(hold, Some(now + 8_000));
        assert_eq!(health.admit(now + 8_000), Admit::Probe);
        // The sink answers: the outage ends, everything may go at once.
        let (change, hold) = health.observe(Some("U1"), &status(200), true, &policy(), 50_000, 0.0);
        assert_eq!((change, hold), (Change::OutageEnded { since: 0 }, None));
        assert_eq!(health.admit(50_001), Admit::All);
        assert_eq!(health.outage_since(), None);
    }

    #[test]
    fn a_probe_that_finds_nothing_due_is_not_out() {
        let mut health = in_outage(0, 0.0);
        assert_eq!(health.admit(10_000), Admit::Probe);
        health.probe_not_sent();
        assert_eq!(health.admit(10_000), Admit::Probe);
    }

    #[test]
    fn a_redeploy_s_404_is_retried_before_it_is_final() {
        let retried = Outcome::Retry {
            status: Some(404),
            after: None,
            error: "HTTP 404".into(),
        };
        assert_eq!(suspect_first(status(404), 0, true), retried);
        // While the sink answers other deliveries, the third 404 is final.
        assert_eq!(
            suspect_first(status(404), SUSPECT_ATTEMPTS - 1, true),
            status(404)
        );
        // While nothing answers (a redeploy), it is retried however often it came.
        assert_eq!(suspect_first(status(404), 50, false), retried);
        assert_eq!(
            suspect_first(status(400), 0, false),
            status(400),
            "a 400 is final at once"
        );
        let mut health = Health::default();
        assert!(!health.answering(1_000, &policy()));
        health.observe(Some("U1"), &status(200), false, &policy(), 1_000, 0.5);
        assert!(health.answering(1_999, &policy()));
        assert!(
            !health.answering(2_000, &policy()),
            "quiet: 2 × backoff, a second at most"
        );
    }
}
