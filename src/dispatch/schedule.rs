//! WHEN to try again, and when to give up: the retry schedule (exponential backoff with full
//! jitter, `Retry-After`), `max_attempts` and `ttl`. Pure: times and jitter are passed in.

use crate::check::DeliveryPolicy;
use crate::clock::{Millis, millis};
use crate::delivery::Outcome;
use crate::store::{Claimed, Settle};
use std::time::Duration;

/// Why a delivery claimed after its ttl ran out is dead without an attempt, if it is: it
/// waited that long behind its lane's head, or for the relay to come back. SPEC §4 sends
/// deliveries past `ttl` to the dead letters (and a bot should not answer an hour-old message).
pub fn expired(policy: &DeliveryPolicy, delivery: &Claimed, now: Millis) -> Option<String> {
    let expires = delivery.ttl_from.saturating_add(millis(policy.ttl));
    (now > expires).then(|| {
        format!(
            "ttl of {} ran out before this attempt",
            humantime::format_duration(policy.ttl)
        )
    })
}

/// Decides what an outcome means for this delivery. `jitter` is uniform in `[0, 1)`.
///
/// - `Retry-After` sets the next attempt and does not count against `max_attempts`. One shorter
///   than `backoff` (`0`, or a date in the past) counts as an ordinary failure, so that a sink
///   that always answers `Retry-After: 0` is not retried at once, uncounted, until the ttl; the
///   next attempt still comes no sooner than the sink asked.
/// - Otherwise the wait is full jitter: uniform in `[0, min(max_backoff, backoff * 2^(n-1))]`
///   after the n-th counted failure.
/// - A `Retry-After` longer than `max_backoff` is capped at `max_backoff`.
/// - Past `max_attempts` counted failures (0: no limit), or when the next attempt would fall
///   after `ttl_from + ttl`, the delivery is dead.
pub fn schedule(
    policy: &DeliveryPolicy,
    delivery: &Claimed,
    outcome: Outcome,
    now: Millis,
    jitter: f64,
) -> Settle {
    let expires = delivery.ttl_from.saturating_add(millis(policy.ttl));
    let outcome = match outcome {
        Outcome::Retry {
            status,
            after: Some(after),
            error,
        } => Outcome::Retry {
            status,
            after: Some(after.min(policy.max_backoff)),
            error,
        },
        outcome => outcome,
    };
    let (outcome, not_before) = match outcome {
        Outcome::Retry {
            status,
            after: Some(after),
            error,
        } if after < policy.backoff => (
            Outcome::Retry {
                status,
                after: None,
                error,
            },
            after,
        ),
        outcome => (outcome, Duration::ZERO),
    };
    match outcome {
        Outcome::Delivered { status } => Settle::Delivered { status },
        Outcome::Permanent { status, error } => Settle::Dead {
            status,
            error,
            attempted: true,
        },
        Outcome::Retry {
            status,
            after,
            error,
        } => {
            let (due_at, counted) = match after {
                Some(after) => (now.saturating_add(millis(after)), false),
                None => {
                    let failures = delivery.attempts.saturating_sub(delivery.throttled) + 1;
                    if policy.max_attempts > 0 && failures >= policy.max_attempts {
                        return Settle::Dead {
                            status,
                            error: format!(
                                "gave up after {failures} attempts; last error: {error}"
                            ),
                            attempted: true,
                        };
                    }
                    let exponent = failures.saturating_sub(1).min(40);
                    let ceiling = policy
                        .backoff
                        .saturating_mul(1u32 << exponent.min(31))
                        .min(policy.max_backoff);
                    let wait =
                        Duration::try_from_secs_f64(ceiling.as_secs_f64() * jitter.clamp(0.0, 1.0))
                            .unwrap_or(ceiling);
                    (now.saturating_add(millis(wait.max(not_before))), true)
                }
            };
            if due_at > expires {
                Settle::Dead {
                    status,
                    error: format!(
                        "ttl of {} exceeded; last error: {error}",
                        humantime::format_duration(policy.ttl)
                    ),
                    attempted: true,
                }
            } else {
                Settle::Retry {
                    due_at,
                    counted,
                    status,
                    error,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventData, EventId, EventKind, Source};
    use crate::sink_name::SinkName;

    fn policy() -> DeliveryPolicy {
        DeliveryPolicy {
            concurrency: 1,
            timeout: Duration::from_secs(10),
            max_attempts: 4,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5),
            ttl: Duration::from_secs(3600),
        }
    }

    fn claimed(attempts: u32, throttled: u32) -> Claimed {
        Claimed {
            id: 1,
            sink: SinkName::Bot,
            event: std::sync::Arc::new(Event {
                id: EventId::derive(&[b"x"]),
                source: Source::Webhook,
                kind: EventKind::Message,
                page_id: None,
                user_id: None,
                timestamp_ms: 0,
                data: EventData::Other { key: None },
                webhook: None,
            }),
            attempts,
            throttled,
            ttl_from: 0,
            lease_until: 0,
        }
    }

    fn retry(after: Option<Duration>) -> Outcome {
        Outcome::Retry {
            status: Some(503),
            after,
            error: "HTTP 503".into(),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_ceiling_with_full_jitter() {
        let cases = [(0, 1000), (1, 2000), (2, 4000)];
        for (attempts, ceiling) in cases {
            let at_top = schedule(&policy(), &claimed(attempts, 0), retry(None), 0, 1.0);
            assert!(
                matches!(at_top, Settle::Retry { due_at, counted: true, .. } if due_at == ceiling),
                "{at_top:?}"
            );
            let at_bottom = schedule(&policy(), &claimed(attempts, 0), retry(None), 0, 0.0);
            assert!(matches!(at_bottom, Settle::Retry { due_at: 0, .. }));
        }
        let capped = DeliveryPolicy {
            max_attempts: 100,
            ..policy()
        };
        let late = schedule(&capped, &claimed(20, 0), retry(None), 0, 1.0);
        assert!(
            matches!(late, Settle::Retry { due_at: 5000, .. }),
            "{late:?}"
        );
    }

    #[test]
    fn max_attempts_counts_only_failures_without_retry_after() {
        assert!(matches!(
            schedule(&policy(), &claimed(3, 0), retry(None), 0, 0.5),
            Settle::Dead { .. }
        ));
        assert!(matches!(
            schedule(&policy(), &claimed(5, 3), retry(None), 0, 0.5),
            Settle::Retry { .. }
        ));
    }

    #[test]
    fn retry_after_is_honoured_and_not_counted() {
        let settle = schedule(
            &policy(),
            &claimed(3, 0),
            retry(Some(Duration::from_secs(4))),
            100,
            0.5,
        );
        assert!(
            matches!(
                settle,
                Settle::Retry {
                    due_at: 4100,
                    counted: false,
                    ..
                }
            ),
            "{settle:?}"
        );
    }

    #[test]
    fn a_retry_after_shorter_than_the_backoff_counts_as_a_failure() {
        for after in [Duration::ZERO, Duration::from_millis(999)] {
            let settle = schedule(&policy(), &claimed(1, 0), retry(Some(after)), 100, 1.0);
            assert!(
                matches!(
                    settle,
                    Settle::Retry {
                        due_at: 2100,
                        counted: true,
                        ..
                    }
                ),
                "{after:?}: {settle:?}"
            );
        }
        // At the limit of counted failures it is dead, like any other failure.
        assert!(matches!(
            schedule(
                &policy(),
                &claimed(3, 0),
                retry(Some(Duration::ZERO)),
                0,
                0.5
            ),
            Settle::Dead { .. }
        ));
    }

    /// A `Retry-After` shorter than `backoff` counts as a failure, yet the jittered wait never
    /// brings the next attempt before the time the sink asked for.
    #[test]
    fn a_retry_after_shorter_than_the_backoff_is_still_honoured() {
        let slow = DeliveryPolicy {
            backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(60),
            ..policy()
        };
        let asked = retry(Some(Duration::from_secs(3)));
        assert!(matches!(
            schedule(&slow, &claimed(0, 0), asked, 100, 0.0),
            Settle::Retry {
                due_at: 3100,
                counted: true,
                ..
            }
        ));
        let asked = retry(Some(Duration::from_secs(3)));
        assert!(matches!(
            schedule(&slow, &claimed(0, 0), asked, 100, 0.9),
            Settle::Retry {
                due_at: 4600,
                counted: true,
                ..
            }
        ));
    }

    #[test]
    fn a_delivery_is_attempted_until_its_ttl_and_not_after() {
        let policy = policy(); // ttl 1h
        let mut delivery = claimed(0, 0);
        delivery.ttl_from = 1_000;
        assert_eq!(expired(&policy, &delivery, 1_000), None);
        assert_eq!(expired(&policy, &delivery, 3_601_000), None);
        assert_eq!(
            expired(&policy, &delivery, 3_601_001).as_deref(),
            Some("ttl of 1h ran out before this attempt")
        );
    }

    #[test]
    fn no_attempt_limit_when_max_attempts_is_zero_and_retry_after_is_capped() {
        let unlimited = DeliveryPolicy {
            max_attempts: 0,
            ..policy()
        };
        assert!(matches!(
            schedule(&unlimited, &claimed(500, 0), retry(None), 0, 1.0),
            Settle::Retry { counted: true, .. }
        ));
        assert!(matches!(
            schedule(&policy(), &claimed(500, 0), retry(None), 0, 1.0),
            Settle::Dead { .. }
        ));
        // `Retry-After: 3600` with max_backoff = 5s waits 5 s.
        assert_eq!(
            schedule(
                &policy(),
                &claimed(0, 0),
                retry(Some(Duration::from_secs(3600))),
                1_000,
                0.0
            ),
            Settle::Retry {
                due_at: 6_000,
                counted: false,
                status: Some(503),
                error: "HTTP 503".into()
            }
        );
    }

    #[test]
    fn ttl_ends_retries() {
        let short = DeliveryPolicy {
            ttl: Duration::from_secs(2),
            ..policy()
        };
        let settle = schedule(
            &short,
            &claimed(0, 0),
            retry(Some(Duration::from_secs(3))),
            0,
            0.5,
        );
        assert!(matches!(settle, Settle::Dead { .. }));
        let settle = schedule(&short, &claimed(1, 0), retry(None), 1500, 1.0);
        assert!(
            matches!(settle, Settle::Dead { ref error, .. } if error.starts_with("ttl of 2s exceeded")),
            "{settle:?}"
        );
    }

    #[test]
    fn permanent_is_dead_and_success_is_delivered() {
        let dead = schedule(
            &policy(),
            &claimed(0, 0),
            Outcome::Permanent {
                status: Some(400),
                error: "bad".into(),
            },
            0,
            0.5,
        );
        assert_eq!(
            dead,
            Settle::Dead {
                status: Some(400),
                error: "bad".into(),
                attempted: true,
            }
        );
        let delivered = schedule(
            &policy(),
            &claimed(0, 0),
            Outcome::Delivered { status: 204 },
            0,
            0.5,
        );
        assert_eq!(delivered, Settle::Delivered { status: 204 });
    }
}
