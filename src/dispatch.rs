//! The dispatcher: one worker loop per enabled sink takes due deliveries from the store, has the
//! sink encode them, sends them, and records the outcome. This file decides WHEN: the retry
//! schedule (exponential backoff with full jitter, `Retry-After`), and when to give up
//! (`max_attempts`, `ttl`).
//!
//! Each sink has its own loop and its own concurrency bound, so a slow or dead sink never delays
//! another. The store hands out only the head of each user's lane, so one user's deliveries keep
//! their order and a failing user blocks nobody else. A loop sleeps until its next due time or
//! until the store says new rows were committed for it; it never polls when idle.

use crate::clock::{Millis, millis, now_ms};
use crate::config::DeliveryPolicy;
use crate::delivery::{Client, Outcome};
use crate::redact::Redactor;
use crate::sinks::{EncodeError, Route, Sinks};
use crate::store::{Claimed, Settle, Store, StoreError};
use crate::telemetry::{SinkStatus, metric};
use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long past its timeout a claimed delivery stays leased: if the process dies, the
/// delivery becomes claimable again after this (a restart of the embedded store frees it at once).
const LEASE_MARGIN: Duration = Duration::from_secs(30);

/// The users whose events are not forwarded to the bot (Dashbot live-person takeover).
#[derive(Debug, Clone, Default)]
pub struct Paused {
    users: Arc<RwLock<HashSet<String>>>,
    /// One change at a time, store first: so that two changes for one user that cross
    /// (a pause and an unpause) end in memory as they ended in the store.
    changes: Arc<tokio::sync::Mutex<()>>,
}

impl Paused {
    pub fn new(users: impl IntoIterator<Item = String>) -> Paused {
        Paused {
            users: Arc::new(RwLock::new(users.into_iter().collect())),
            changes: Arc::default(),
        }
    }

    /// Stores the pause state durably, then applies it to the dispatcher's view.
    pub async fn change(
        &self,
        store: &Store,
        user: &str,
        paused: bool,
        now: Millis,
    ) -> Result<(), StoreError> {
        let _one_at_a_time = self.changes.lock().await;
        store.set_paused(user, paused, now).await?;
        self.set(user, paused);
        Ok(())
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users
            .read()
            .map(|users| users.contains(user))
            .unwrap_or(false)
    }

    pub fn set(&self, user: &str, paused: bool) {
        if let Ok(mut users) = self.users.write() {
            if paused {
                users.insert(user.to_owned());
            } else {
                users.remove(user);
            }
        }
    }
}

/// What every sink loop shares.
#[derive(Clone)]
pub struct Dispatcher {
    pub store: Store,
    pub sinks: Sinks,
    pub client: Client,
    pub redactor: Redactor,
    pub paused: Paused,
    /// Each sink's last success and last error, for `GET /admin/sinks`.
    pub status: SinkStatus,
}

impl Dispatcher {
    /// Runs one loop per sink until `shutdown`; then lets in-flight attempts finish within
    /// `grace`. Attempts cut off by the grace period stay leased in the store and are sent
    /// again after a restart.
    pub async fn run(self, shutdown: CancellationToken, grace: Duration) {
        let wakers = self.store.wakers();
        let mut loops = JoinSet::new();
        for route in self.sinks.routes() {
            let notify = wakers.for_sink(route.name);
            loops.spawn(
                self.clone()
                    .run_sink(route.clone(), notify, shutdown.clone(), grace),
            );
        }
        while loops.join_next().await.is_some() {}
    }

    async fn run_sink(
        self,
        route: Arc<Route>,
        notify: Arc<Notify>,
        shutdown: CancellationToken,
        grace: Duration,
    ) {
        let permits = Arc::new(Semaphore::new(route.delivery.concurrency));
        let lease = self
            .store
            .claim_lease(route.delivery.timeout + LEASE_MARGIN);
        let mut attempts = JoinSet::new();
        // Claims go through the store's one writer, so they are batched: after an attempt
        // finishes, the loop claims again only once a quarter of the permits are free (or none
        // is in use). A wake-up for new rows or a due retry claims at once, so a sink whose
        // attempts hang can still take new events with the permits it has left; one that
        // comes while every permit is busy is kept until a permit is free. While none is, the
        // loop waits for an attempt to finish, not for a due time it could not act on.
        let batch_threshold = route.delivery.concurrency.div_ceil(4);
        let mut next_due: Option<Millis> = None;
        let mut wake_pending = true;
        loop {
            while attempts.try_join_next().is_some() {}
            let free = permits.available_permits();
            let claim_now = wake_pending || free >= batch_threshold || attempts.is_empty();
            if free > 0 && claim_now {
                wake_pending = false;
                match self.store.claim(route.name, free, now_ms(), lease).await {
                    // Shutdown began while the claim waited for the store: start nothing new.
                    // What it took stays leased and goes out after the restart.
                    Ok(_) if shutdown.is_cancelled() => break,
                    Ok(batch) => {
                        next_due = batch.next_due;
                        for delivery in batch.deliveries {
                            let Ok(permit) = permits.clone().try_acquire_owned() else {
                                break;
                            };
                            let this = self.clone();
                            let route = route.clone();
                            attempts.spawn(async move {
                                this.attempt(&route, delivery, lease).await;
                                drop(permit);
                            });
                        }
                    }
                    Err(error) => {
                        tracing::warn!(sink = %route.name, %error, "Cannot claim deliveries");
                        next_due = Some(now_ms() + 1000);
                    }
                }
            }
            let timer = due_timer(permits.available_permits(), next_due, now_ms());
            tokio::select! {
                // Shutdown first: a wake-up or a finished attempt ready at the same time must
                // not start another round of claims.
                biased;
                () = shutdown.cancelled() => break,
                () = notify.notified() => wake_pending = true,
                () = tokio::time::sleep(timer.unwrap_or_default()), if timer.is_some() => {
                    wake_pending = true;
                }
                Some(_) = attempts.join_next(), if !attempts.is_empty() => {}
            }
        }
        let in_flight = attempts.len();
        if in_flight > 0 {
            tracing::info!(sink = %route.name, in_flight, "Letting in-flight deliveries finish");
            let drained = tokio::time::timeout(grace, async {
                while attempts.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(sink = %route.name, unfinished = attempts.len(), "Grace period over; unfinished deliveries will be sent again after restart");
                attempts.abort_all();
            }
        }
    }

    /// One attempt of one delivery, recorded in the store whatever happens.
    async fn attempt(&self, route: &Route, mut delivery: Claimed, lease: Duration) {
        let span = tracing::info_span!(
            "delivery",
            event_id = %delivery.event.id,
            sink = %route.name,
            kind = %delivery.event.kind,
            attempt = delivery.attempts + 1,
        );
        async {
            let started = Instant::now();
            // Pause is decided at dispatch time, before any encoding: a paused user's events
            // are not forwarded to the bot while the pause lasts (analytics still get them).
            let paused = route.name == crate::config::SinkName::Bot
                && delivery
                    .event
                    .user_id
                    .as_deref()
                    .is_some_and(|user| self.store.is_paused(user));
            let settle = if paused {
                Settle::Skipped {
                    reason: "user is paused".to_owned(),
                }
            } else {
                // A delivery its sink skips was never to be sent: skipped however long it
                // waited, not dead-lettered for its ttl.
                let ttl_ran_out = expired(&route.delivery, &delivery, now_ms());
                match (route.encode(&delivery.event), ttl_ran_out) {
                    (Err(EncodeError::Skip(reason)), _) => Settle::Skipped { reason },
                    (Err(EncodeError::Invalid(reason)), _) => Settle::Dead {
                        status: None,
                        error: self.redactor.redact(&reason),
                        attempted: false,
                    },
                    (Ok(_), Some(error)) => Settle::Dead {
                        status: None,
                        error,
                        attempted: false,
                    },
                    (Ok(request), None) => {
                        let send =
                            self.client
                                .send(&request, route.delivery.timeout, route.classifier());
                        let outcome = self.keep_leased(&mut delivery, lease, send).await;
                        metrics::histogram!(metric::DELIVERY_SECONDS, "sink" => route.name.as_str())
                            .record(started.elapsed().as_secs_f64());
                        let mut settle = schedule(
                            &route.delivery,
                            &delivery,
                            outcome,
                            now_ms(),
                            rand::random::<f64>(),
                        );
                        if let Settle::Retry { error, .. } | Settle::Dead { error, .. } =
                            &mut settle
                        {
                            *error = self.redactor.redact(error);
                        }
                        settle
                    }
                }
            };
            record(route, &settle);
            self.status.record(route.name, &settle);
            for retry in 0..5u32 {
                match self.store.settle(&delivery, settle.clone(), now_ms()).await {
                    Ok(()) => return,
                    Err(error) => {
                        tracing::warn!(%error, "Cannot record the delivery outcome; retrying");
                        tokio::time::sleep(Duration::from_millis(50 << retry)).await;
                    }
                }
            }
            tracing::error!(
                "Delivery outcome not recorded; the lease will run out and it will be sent again"
            );
        }
        .instrument(span)
        .await
    }
}

impl Dispatcher {
    /// Runs `attempt` while renewing the delivery's lease every third of it, so that a long
    /// attempt keeps its claim while a killed relay's claims run out soon (the PostgreSQL
    /// store's `store.lease`).
    async fn keep_leased<T>(
        &self,
        delivery: &mut Claimed,
        lease: Duration,
        attempt: impl std::future::Future<Output = T>,
    ) -> T {
        let every = (lease / 3).max(Duration::from_millis(100));
        let mut attempt = std::pin::pin!(attempt);
        loop {
            tokio::select! {
                done = &mut attempt => return done,
                () = tokio::time::sleep(every) => {
                    match self.store.renew(delivery, now_ms(), lease).await {
                        Ok(true) => {}
                        Ok(false) => tracing::warn!("The delivery's lease was lost during its attempt; its outcome will not be recorded"),
                        Err(error) => tracing::warn!(%error, "Cannot renew the delivery's lease"),
                    }
                }
            }
        }
    }
}

fn record(route: &Route, settle: &Settle) {
    let outcome = match settle {
        Settle::Delivered { status } => {
            tracing::debug!(status, "Delivered");
            "delivered"
        }
        Settle::Retry {
            due_at,
            counted,
            status,
            error,
        } => {
            tracing::info!(status, %error, retry_in_ms = due_at - now_ms(), counted, "Delivery failed; will retry");
            "retried"
        }
        Settle::Dead {
            status,
            error,
            attempted,
        } => {
            tracing::warn!(status, %error, attempted, "Delivery failed for good; dead-lettered");
            "dead"
        }
        Settle::Skipped { reason } => {
            tracing::debug!(%reason, "Delivery skipped");
            "skipped"
        }
    };
    metrics::counter!(metric::DELIVERIES, "sink" => route.name.as_str(), "outcome" => outcome)
        .increment(1);
}

/// How long the dispatcher sleeps before it claims rows that come due: until `next_due` (an
/// hour when nothing is scheduled), or not at all (`None`) while no permit is free. Then only
/// a finished attempt or a wake-up can make progress, and a due time already past would
/// otherwise fire at once, again and again (a spin of the loop).
fn due_timer(free_permits: usize, next_due: Option<Millis>, now: Millis) -> Option<Duration> {
    if free_permits == 0 {
        return None;
    }
    Some(
        next_due
            .map(|due| Duration::from_millis(u64::try_from(due - now).unwrap_or(0)))
            .unwrap_or(Duration::from_secs(3600)),
    )
}

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
/// - Past `max_attempts` counted failures, or when the next attempt would fall after
///   `ttl_from + ttl`, the delivery is dead.
pub fn schedule(
    policy: &DeliveryPolicy,
    delivery: &Claimed,
    outcome: Outcome,
    now: Millis,
    jitter: f64,
) -> Settle {
    let expires = delivery.ttl_from.saturating_add(millis(policy.ttl));
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
                    if failures >= policy.max_attempts {
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
    use crate::config::SinkName;
    use crate::event::{Event, EventData, EventId, EventKind, Source};

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
            event: Event {
                id: EventId::derive(&[b"x"]),
                source: Source::Webhook,
                kind: EventKind::Message,
                page_id: None,
                user_id: None,
                timestamp_ms: 0,
                data: EventData::Other { key: None },
                webhook: None,
            },
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
            retry(Some(Duration::from_secs(7))),
            100,
            0.5,
        );
        assert!(
            matches!(
                settle,
                Settle::Retry {
                    due_at: 7100,
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
    fn a_sink_with_no_free_permit_sets_no_timer() {
        // Saturated with a backlog already due: no timer, or the loop would spin.
        assert_eq!(due_timer(0, Some(1_000), 5_000), None);
        assert_eq!(due_timer(0, None, 5_000), None);
        assert_eq!(
            due_timer(2, Some(1_000), 5_000),
            Some(Duration::ZERO),
            "past due, a permit free: claim now"
        );
        assert_eq!(
            due_timer(1, Some(5_250), 5_000),
            Some(Duration::from_millis(250))
        );
        assert_eq!(due_timer(1, None, 5_000), Some(Duration::from_secs(3600)));
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
