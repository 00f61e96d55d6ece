//! The dispatcher: one worker loop per enabled sink takes due deliveries from the store, has the
//! sink encode them, sends them, and records the outcome. This file decides WHEN: the retry
//! schedule (exponential backoff with full jitter, `Retry-After`), and when to give up
//! (`max_attempts`, `ttl`).
//!
//! Each sink has its own loop and its own concurrency bound, so a slow or dead sink never delays
//! another. The store hands out only the head of each user's lane, so one user's deliveries keep
//! their order and a failing user blocks nobody else. A loop sleeps until its next due time or
//! until the store says new rows were committed for it; it never polls when idle.

use crate::clock::{Millis, now_ms};
use crate::delivery::{Client, Outcome};
use crate::liveness::Liveness;
use crate::redact::Redactor;
use crate::sinks::{EncodeError, Route, Sinks};
use crate::store::{ClaimRef, Claimed, IDLE_RECHECK, Settle, Store};
use crate::telemetry::{SinkStatus, metric};
use foldhash::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Level, Span};

mod health;
mod schedule;

use health::{Admit, Change};
pub use health::{Health, OUTAGE_AFTER};
pub use schedule::{expired, schedule};

/// How long past its timeout a claimed delivery stays leased: if the process dies, the
/// delivery becomes claimable again after this (a restart of the embedded store frees it at once).
const LEASE_MARGIN: Duration = Duration::from_secs(30);

/// How long before a lease's first renewal an attempt must have given up for the renewal to be
/// left out (see `holding_lease`): the send's own timer may fire a little late.
const RENEWAL_SLACK: Duration = Duration::from_secs(1);

/// What every sink loop shares.
#[derive(Clone)]
pub struct Dispatcher {
    pub store: Store,
    pub sinks: Sinks,
    pub client: Client,
    pub redactor: Redactor,
    /// Each sink's last success and last error, for `GET /admin/sinks`.
    pub status: SinkStatus,
}

impl Dispatcher {
    /// Runs one loop per sink until `shutdown`; then lets in-flight attempts finish within
    /// `grace`. Attempts cut off by the grace period are given back to the store (`release`:
    /// nothing counted) and are sent again after a restart.
    ///
    /// Each sink's loop is watched by `liveness`: one that ends or panics before `shutdown`
    /// makes the relay failing (`/healthz` 503, a non-zero exit), naming the sink.
    pub async fn run(self, shutdown: CancellationToken, grace: Duration, liveness: Liveness) {
        let wakers = self.store.wakers();
        let mut loops = Vec::new();
        for route in self.sinks.routes() {
            let notify = wakers.for_sink(route.name);
            loops.push(
                liveness.spawn(
                    format!("{} dispatcher loop", route.name),
                    &shutdown,
                    self.clone()
                        .run_sink(route.clone(), notify, shutdown.clone(), grace),
                ),
            );
        }
        for sink_loop in loops {
            let _ = sink_loop.await;
        }
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
        // Claims are batched (each is a read of the queue, and on PostgreSQL a round trip):
        // after an attempt finishes, the loop claims again only once a quarter of the permits
        // are free (or none is in use), and only if its last claim took all it asked for. A
        // claim that came back short found the queue empty of due rows, and every row that
        // becomes due later comes with a wake-up (an enqueue, a retry, a lane's next, a
        // replay, a release, another relay's commit: the store wakes a sink only once a claim
        // can see the row) or at `next_due` (a retry's time, a lease's end); so claiming again
        // on a finished attempt alone would find nothing.
        // A wake-up for new rows or a due retry claims at once, so a sink whose attempts hang
        // can still take new events with the permits it has left; one that comes while every
        // permit is busy is kept until a permit is free. While none is, the loop waits for an
        // attempt to finish, not for a due time it could not act on.
        let batch_threshold = route.delivery.concurrency.div_ceil(4);
        let metrics = Arc::new(SinkMetrics::new(route.name.as_str()));
        let health = Arc::new(Mutex::new(Health::default()));
        // The claims whose attempts run now (id → lease): what a shutdown that cuts them off
        // gives back to the store, so that they do not count as cut off by a crash.
        let claims: Arc<Mutex<HashMap<i64, ClaimRef>>> = Arc::default();
        let mut next_due: Option<Millis> = None;
        let mut wake_pending = true;
        // The last claim came back with fewer deliveries than it asked for.
        let mut queue_empty = false;
        loop {
            while attempts.try_join_next().is_some() {}
            let free = permits.available_permits();
            let claim_now =
                wake_pending || (!queue_empty && (free >= batch_threshold || attempts.is_empty()));
            // In an outage nothing is claimed but the probe; `held` is when to look again.
            let mut held: Option<Option<Millis>> = None;
            if free > 0 && claim_now {
                wake_pending = false;
                let (limit, probe) = match lock(&health).admit(now_ms()) {
                    Admit::All => (free, false),
                    Admit::Probe => (1, true),
                    Admit::Not { until } => {
                        held = Some(until);
                        (0, false)
                    }
                };
                if limit > 0 {
                    match self.store.claim(route.name, limit, now_ms(), lease).await {
                        // Shutdown began while the claim waited for the store: start nothing
                        // new. What it took stays leased and goes out after the restart.
                        Ok(_) if shutdown.is_cancelled() => break,
                        Ok(batch) => {
                            next_due = batch.next_due;
                            queue_empty = batch.deliveries.len() < limit;
                            if probe && batch.deliveries.is_empty() {
                                lock(&health).probe_not_sent();
                            }
                            for delivery in batch.deliveries {
                                let Ok(permit) = permits.clone().try_acquire_owned() else {
                                    break;
                                };
                                let this = self.clone();
                                let (route, health) = (route.clone(), health.clone());
                                let (claims, metrics) = (claims.clone(), metrics.clone());
                                lock_map(&claims).insert(delivery.id, delivery.claim_ref());
                                attempts.spawn(async move {
                                    let attempt = Attempt {
                                        route: &route,
                                        health: &health,
                                        held: &claims,
                                        metrics: &metrics,
                                        probe,
                                        lease,
                                        span_made: false,
                                    };
                                    // Boxed: the attempt's state is large, and the task
                                    // would otherwise be copied whole into its cell.
                                    Box::pin(this.attempt(attempt, delivery, permit)).await;
                                });
                            }
                        }
                        Err(error) => {
                            if probe {
                                lock(&health).probe_not_sent();
                            }
                            tracing::warn!(sink = %route.name, %error, "Cannot claim deliveries");
                            next_due = Some(now_ms() + 1000);
                            queue_empty = false;
                        }
                    }
                }
            }
            let timer = match held {
                // A probe is out: its end (an attempt finishing) is what to wait for.
                Some(None) => None,
                Some(Some(probe_at)) => due_timer(1, Some(probe_at), now_ms()),
                None => due_timer(permits.available_permits(), next_due, now_ms()),
            };
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
                // Cut off by the shutdown, not by a crash: due again at once, nothing counted.
                let cut: Vec<ClaimRef> =
                    lock_map(&claims).drain().map(|(_, claim)| claim).collect();
                for claim in cut {
                    if let Err(error) = self.store.release(claim, now_ms()).await {
                        tracing::warn!(delivery = claim.id, %error, "Cannot give back a delivery cut off by the shutdown");
                    }
                }
            }
        }
    }

    /// One attempt of one delivery, recorded in the store whatever happens.
    ///
    /// `permit` (one of the sink's `concurrency`) is given back once the sink has answered,
    /// before the outcome is recorded: it bounds the requests to the sink, and holding it
    /// through the settle's commit and fsync capped a sink at `concurrency` deliveries per
    /// settle latency (the drain after a burst ran at two thirds of the CPU it could use).
    ///
    /// Its lines carry the `delivery` span. Made for every attempt it would cost more than the
    /// attempt's own work, so it is made up front only when debug lines (which every attempt
    /// logs) are on; otherwise each line an attempt logs, which is rare, makes it then
    /// ([`Attempt::log_span`]).
    async fn attempt(
        &self,
        mut attempt: Attempt<'_>,
        mut delivery: Claimed,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let Attempt { route, held, .. } = attempt;
        attempt.span_made = tracing::enabled!(Level::DEBUG)
            || tracing::enabled!(target: "botrelay::delivery", Level::DEBUG);
        let span = if attempt.span_made {
            delivery_span(route, &delivery)
        } else {
            Span::none()
        };
        async {
            let started = Instant::now();
            // Pause is decided at dispatch time, before any encoding: a paused user's events
            // are not forwarded to the bot while the pause lasts (analytics still get them).
            let paused = route.name == crate::sink_name::SinkName::Bot
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
                // A panic in the attempt (a bug) counts as a failed attempt, like a crash.
                let once =
                    std::panic::AssertUnwindSafe(self.try_once(&attempt, &mut delivery, started));
                match futures_util::FutureExt::catch_unwind(once).await {
                    Ok(settle) => settle,
                    Err(panic) => {
                        let failed = Outcome::Retry {
                            status: None,
                            after: None,
                            error: format!("the attempt panicked (a bug): {}", panic_text(&*panic)),
                        };
                        attempt.log_span(&delivery).in_scope(|| {
                            // The panic hook's own line came before this span existed: the
                            // message goes here too, beside the delivery's fields.
                            tracing::error!(
                                delivery = delivery.id,
                                panic = panic_text(&*panic),
                                "A delivery attempt panicked; it counts as failed"
                            );
                        });
                        schedule(
                            &route.delivery,
                            &delivery,
                            failed,
                            now_ms(),
                            rand::random::<f64>(),
                        )
                    }
                }
            };
            drop(permit);
            match settle {
                Settle::Delivered { .. } | Settle::Skipped { .. } => {
                    record(attempt.metrics, &settle);
                }
                Settle::Retry { .. } | Settle::Dead { .. } => attempt
                    .log_span(&delivery)
                    .in_scope(|| record(attempt.metrics, &settle)),
            }
            self.status.record(route.name, &settle);
            for retry in 0..5u32 {
                match self.store.settle(&delivery, settle.clone(), now_ms()).await {
                    Ok(()) => {
                        lock_map(held).remove(&delivery.id);
                        return;
                    }
                    Err(error) => {
                        attempt.log_span(&delivery).in_scope(|| {
                            tracing::warn!(%error, "Cannot record the delivery outcome; retrying");
                        });
                        tokio::time::sleep(Duration::from_millis(50 << retry)).await;
                    }
                }
            }
            attempt.log_span(&delivery).in_scope(|| {
                tracing::error!(
                    "Delivery outcome not recorded; the lease will run out and it will be sent again"
                );
            });
        }
        .instrument(span)
        .await
    }
}

/// The span of one delivery attempt's lines.
fn delivery_span(route: &Route, delivery: &Claimed) -> Span {
    tracing::info_span!(
        "delivery",
        event_id = %delivery.event.id,
        sink = %route.name,
        kind = %delivery.event.kind,
        attempt = delivery.attempts + 1,
    )
}

/// A sink's delivery metrics, looked up once for its loop instead of once per attempt.
struct SinkMetrics {
    delivered: metrics::Counter,
    retried: metrics::Counter,
    dead: metrics::Counter,
    skipped: metrics::Counter,
    seconds: metrics::Histogram,
}

impl SinkMetrics {
    fn new(sink: &'static str) -> SinkMetrics {
        let outcome = |outcome: &'static str| metrics::counter!(metric::DELIVERIES, "sink" => sink, "outcome" => outcome);
        SinkMetrics {
            delivered: outcome("delivered"),
            retried: outcome("retried"),
            dead: outcome("dead"),
            skipped: outcome("skipped"),
            seconds: metrics::histogram!(metric::DELIVERY_SECONDS, "sink" => sink),
        }
    }
}

fn record(metrics: &SinkMetrics, settle: &Settle) {
    let counter = match settle {
        Settle::Delivered { status } => {
            tracing::debug!(status, "Delivered");
            &metrics.delivered
        }
        Settle::Retry {
            due_at,
            counted,
            status,
            error,
        } => {
            tracing::info!(status, %error, retry_in_ms = due_at - now_ms(), counted, "Delivery failed; will retry");
            &metrics.retried
        }
        Settle::Dead {
            status,
            error,
            attempted,
        } => {
            tracing::warn!(status, %error, attempted, "Delivery failed for good; dead-lettered");
            &metrics.dead
        }
        Settle::Skipped { reason } => {
            tracing::debug!(%reason, "Delivery skipped");
            &metrics.skipped
        }
    };
    counter.increment(1);
}

/// What one attempt needs besides its delivery.
#[derive(Clone, Copy)]
struct Attempt<'a> {
    route: &'a Route,
    health: &'a Mutex<Health>,
    /// The sink loop's claims in flight; this attempt's entry follows its lease.
    held: &'a Mutex<HashMap<i64, ClaimRef>>,
    metrics: &'a SinkMetrics,
    /// The one delivery an outage lets through to see whether the sink is back.
    probe: bool,
    lease: Duration,
    /// The attempt runs in its `delivery` span (made up front because debug lines are on).
    span_made: bool,
}

impl Attempt<'_> {
    /// The span for a line the attempt logs: the one it runs in, else one made now.
    fn log_span(&self, delivery: &Claimed) -> Span {
        if self.span_made {
            Span::current()
        } else {
            delivery_span(self.route, delivery)
        }
    }
}

/// The sink's health; a panic elsewhere while it was held leaves it as it was.
fn lock(health: &Mutex<Health>) -> std::sync::MutexGuard<'_, Health> {
    health
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a panic said, for the delivery's last error.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

/// The claims in flight, likewise.
fn lock_map(
    held: &Mutex<HashMap<i64, ClaimRef>>,
) -> std::sync::MutexGuard<'_, HashMap<i64, ClaimRef>> {
    held.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Dispatcher {
    /// Logs, counts and shows an outage's start or end (one line each).
    fn outage_changed(&self, route: &Route, change: Change, now: Millis) {
        match change {
            Change::None => {}
            Change::OutageBegan { error } => {
                tracing::warn!(
                    sink = %route.name,
                    %error,
                    "Sink outage began: its deliveries wait, in order, without spending attempts; one probe at a time"
                );
                self.status.set_outage(route.name, Some(now));
            }
            Change::OutageEnded { since } => {
                tracing::info!(
                    sink = %route.name,
                    lasted = %humantime::format_duration(Duration::from_millis(
                        u64::try_from(now - since).unwrap_or(0)
                    )),
                    "Sink outage ended: delivery resumes"
                );
                self.status.set_outage(route.name, None);
            }
        }
    }

    /// Encodes and sends one delivery, and decides what its outcome means: the attempt proper,
    /// which `attempt` runs so that a panic in it counts as a failed attempt.
    async fn try_once(
        &self,
        attempt: &Attempt<'_>,
        delivery: &mut Claimed,
        started: Instant,
    ) -> Settle {
        let Attempt {
            route,
            health,
            metrics,
            probe,
            ..
        } = *attempt;
        let delivery = &mut *delivery;
        // A delivery its sink skips was never to be sent: skipped however long it
        // waited, not dead-lettered for its ttl.
        let ttl_ran_out = expired(&route.delivery, delivery, now_ms());
        match (route.encode(&delivery.event, now_ms()), ttl_ran_out) {
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
                let send = self
                    .client
                    .send(request, route.delivery.timeout, route.classifier());
                let sent = self.holding_lease(send, delivery, attempt).await;
                if let Some(notice) = sent.notice.filter(|_| route.heeds_version_warnings()) {
                    attempt
                        .log_span(delivery)
                        .in_scope(|| self.status.warn(route.name, &notice, now_ms()));
                }
                let outcome = sent.outcome;
                let took = started.elapsed().as_secs_f64();
                metrics.seconds.record(took);
                self.status.history().latency(route.name, took, now_ms());
                let counted = delivery.attempts.saturating_sub(delivery.throttled);
                let (now, jitter) = (now_ms(), rand::random::<f64>());
                let answering = lock(health).answering(now, &route.delivery);
                let outcome = health::suspect_first(outcome, counted, answering);
                let user = delivery.event.user_id.as_deref();
                let (change, hold) =
                    lock(health).observe(user, &outcome, probe, &route.delivery, now, jitter);
                if !matches!(change, Change::None) {
                    attempt
                        .log_span(delivery)
                        .in_scope(|| self.outage_changed(route, change, now));
                }
                let mut settle = match (hold, outcome) {
                    // The sink is down: wait for the probe, spending no attempt.
                    (
                        Some(until),
                        Outcome::Retry { status, error, .. } | Outcome::Permanent { status, error },
                    ) => Settle::Retry {
                        due_at: until,
                        counted: false,
                        status,
                        error,
                    },
                    (_, outcome) => schedule(&route.delivery, delivery, outcome, now, jitter),
                };
                if let Settle::Retry { error, .. } | Settle::Dead { error, .. } = &mut settle {
                    *error = self.redactor.redact(error);
                }
                settle
            }
        }
    }

    /// Runs `attempt` while renewing `delivery`'s lease every third of it, so that a claim
    /// outlives an attempt however long the attempt takes. A lease that was lost (the store
    /// gave the delivery to someone else) is logged; its outcome will not count.
    async fn holding_lease<T>(
        &self,
        send: impl Future<Output = T>,
        delivery: &mut Claimed,
        attempt: &Attempt<'_>,
    ) -> T {
        let (lease, held) = (attempt.lease, attempt.held);
        let every = (lease / 3).max(Duration::from_millis(100));
        // The send gives up at the sink's `timeout` (connect, answer and body together): when
        // that comes before the first renewal would, the lease needs none, and the attempt no
        // timer for it. So it is with the embedded store, whose lease is the timeout plus 30 s,
        // for any timeout up to 13 s.
        if every > attempt.route.delivery.timeout + RENEWAL_SLACK {
            return send.await;
        }
        let mut renewal = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tokio::pin!(send);
        loop {
            tokio::select! {
                outcome = &mut send => return outcome,
                _ = renewal.tick() => match self.store.renew(delivery, now_ms(), lease).await {
                    Ok(true) => {
                        lock_map(held).insert(delivery.id, delivery.claim_ref());
                    }
                    Ok(false) => attempt.log_span(delivery).in_scope(|| {
                        tracing::warn!(delivery = delivery.id, "The delivery's lease was lost during its attempt");
                    }),
                    Err(error) => attempt.log_span(delivery).in_scope(|| {
                        tracing::warn!(delivery = delivery.id, %error, "Cannot renew the delivery's lease");
                    }),
                },
            }
        }
    }
}

/// How long a sink loop with free permits sleeps before it looks at the store again: until
/// its next due delivery, and never longer than [`IDLE_RECHECK`], so that work a wake-up did
/// not announce (a lost wake-up, another relay's commit) waits at most that long. `None`
/// while no permit is free: then only a finished attempt or a wake-up can make progress, and a
/// due time already past would fire again and again (a spin of the loop).
fn due_timer(free_permits: usize, next_due: Option<Millis>, now: Millis) -> Option<Duration> {
    if free_permits == 0 {
        return None;
    }
    Some(
        next_due
            .map(|due| Duration::from_millis(u64::try_from(due - now).unwrap_or(0)))
            .unwrap_or(IDLE_RECHECK)
            .min(IDLE_RECHECK),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(due_timer(1, None, 5_000), Some(IDLE_RECHECK));
        assert_eq!(
            due_timer(1, Some(3_605_000), 5_000),
            Some(IDLE_RECHECK),
            "a retry due in an hour: the store is still looked at every second"
        );
    }
}
