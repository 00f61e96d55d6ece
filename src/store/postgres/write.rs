//! The PostgreSQL store's writes: the enqueue batcher (the events of concurrent requests go to
//! the database in ONE transaction, committed before any of their callers is answered), claims,
//! lease renewal, settles, replays, purges, pauses and the writable probe.
//!
//! Lanes across relays: every write that can change who heads a lane (enqueue, a settle that
//! ends the head, a replay) first locks the lane's row in `lanes`, in (sink, lane) order, so
//! that what it reads about the lane stays true until it commits. The unique index
//! `deliveries_lane_head` makes a second head impossible whatever happens.

use super::queries::{self, CLAIM, NEXT_DUE};
use super::{PgError, PostgresStore, Target, column, retrying};
use crate::clock::{Millis, millis};
use crate::event::Event;
use crate::sink_name::SinkName;
use crate::store::{
    ClaimBatch, Claimed, DeadLetterFilter, EnqueueReport, NewEvent, Purged, ReplayOutcome,
    Retention, Settle, StoreError, Wakers,
};
use deadpool_postgres::{GenericClient, Pool};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The most events one enqueue transaction takes.
const MAX_BATCH_EVENTS: usize = 2000;

/// The most rows one purge statement deletes.
pub(super) const PURGE_CHUNK: i64 = 2000;

/// The most dead letters one replay transaction requeues.
const REPLAY_CHUNK: usize = 2000;

/// The channel a relay NOTIFYs after it committed new due rows; the payload is the sinks'
/// names, comma-separated.
pub(super) const WORK_CHANNEL: &str = "botrelay_work";

/// The channel a relay NOTIFYs (at commit) after it paused or unpaused a user.
pub(super) const PAUSE_CHANNEL: &str = "botrelay_pause";

const INSERT_EVENTS: &str = "
    INSERT INTO events (id, source, kind, page_id, user_id, timestamp_ms, received_at, payload)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::int8[], $7::int8[], $8::text[])
    ON CONFLICT (id) DO NOTHING
    RETURNING id";

/// Creates the lanes that do not exist and locks them all, in the order given.
const LOCK_LANES: &str = "
    INSERT INTO lanes (sink, lane, touched_at)
    SELECT * FROM unnest($1::text[], $2::text[], $3::int8[])
    ON CONFLICT (sink, lane) DO UPDATE SET touched_at = GREATEST(lanes.touched_at, EXCLUDED.touched_at)";

/// Which of the given lanes have a head.
const BUSY_LANES: &str = "
    SELECT d.sink, d.lane FROM unnest($1::text[], $2::text[]) AS l (sink, lane)
    JOIN deliveries d ON d.sink = l.sink AND d.lane = l.lane
        AND d.state IN ('pending', 'in_flight')";

/// Inserts deliveries in the order given (ids are the order of receipt).
const INSERT_DELIVERIES: &str = "
    INSERT INTO deliveries (event_id, sink, lane, state, due_at, created_at, updated_at)
    SELECT event_id, sink, lane, state, at, at, at
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[])
        WITH ORDINALITY AS u (event_id, sink, lane, state, at, n)
    ORDER BY n";

/// Lets the oldest waiting delivery of lane ($1, $2) go, if the lane has no head.
pub(super) const PROMOTE: &str = "
    UPDATE deliveries SET state = 'pending', due_at = $3, updated_at = $3
    WHERE id = (SELECT id FROM deliveries WHERE sink = $1 AND lane = $2 AND state = 'waiting'
                ORDER BY id LIMIT 1)
      AND NOT EXISTS (SELECT 1 FROM deliveries WHERE sink = $1 AND lane = $2
                      AND state IN ('pending', 'in_flight'))";

pub(super) const PURGE_DELIVERED: &str = "DELETE FROM deliveries WHERE id IN (
    SELECT id FROM deliveries
    WHERE state IN ('delivered', 'dead', 'skipped') AND state IN ('delivered', 'skipped')
      AND updated_at < $1 LIMIT $2)";
pub(super) const PURGE_DEAD: &str = "DELETE FROM deliveries WHERE id IN (
    SELECT id FROM deliveries
    WHERE state IN ('delivered', 'dead', 'skipped') AND state = 'dead'
      AND updated_at < $1 LIMIT $2)";
/// An event is kept while any delivery refers to it; its deliveries were created with
/// `created_at` = its `received_at`, so that is where to look (an index seek per event).
pub(super) const PURGE_EVENTS: &str = "DELETE FROM events WHERE id IN (
    SELECT e.id FROM events e
    WHERE e.received_at < $1
      AND NOT EXISTS (SELECT 1 FROM deliveries d
                      WHERE d.created_at = e.received_at AND d.event_id = e.id)
    LIMIT $2)";
/// Lanes nobody touched since the cut and with no open delivery; a lane some write holds
/// right now is skipped.
pub(super) const PURGE_LANES: &str = "DELETE FROM lanes WHERE (sink, lane) IN (
    SELECT l.sink, l.lane FROM lanes l
    WHERE l.touched_at < $1
      AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.sink = l.sink AND d.lane = l.lane
                      AND d.state IN ('pending', 'in_flight'))
      AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.sink = l.sink AND d.lane = l.lane
                      AND d.state = 'waiting')
    LIMIT $2 FOR UPDATE SKIP LOCKED)";

type Answer = oneshot::Sender<Result<EnqueueReport, StoreError>>;

/// One caller's enqueue, waiting for the batcher.
pub(super) struct EnqueueJob {
    events: Vec<(NewEvent, String)>,
    now: Millis,
    answer: Answer,
}

impl EnqueueJob {
    /// The job (events encoded here, on the caller's task) and where its answer will come.
    pub(super) fn new(
        events: Vec<NewEvent>,
        now: Millis,
    ) -> Result<
        (
            EnqueueJob,
            oneshot::Receiver<Result<EnqueueReport, StoreError>>,
        ),
        StoreError,
    > {
        let events = events
            .into_iter()
            .map(|new| {
                serde_json::to_string(&new.event)
                    .map(|payload| (new, payload))
                    .map_err(|error| StoreError::Database(format!("cannot encode event: {error}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (answer, receiver) = oneshot::channel();
        Ok((
            EnqueueJob {
                events,
                now,
                answer,
            },
            receiver,
        ))
    }
}

/// What the batcher task holds (not a store handle: the handles alone keep its queue open).
pub(super) struct Batcher {
    pub(super) pool: Pool,
    pub(super) target: Target,
    pub(super) wakers: Arc<Wakers>,
}

/// The batcher: takes every enqueue that arrived while the previous transaction committed,
/// up to `MAX_BATCH_EVENTS`, and writes them in one transaction; answers each caller after
/// the commit; then wakes the local dispatchers and NOTIFYs the other relays.
pub(super) async fn batch_loop(batcher: Batcher, mut queue: mpsc::Receiver<EnqueueJob>) {
    while let Some(first) = queue.recv().await {
        let mut events = first.events.len();
        let mut jobs = vec![first];
        while events < MAX_BATCH_EVENTS {
            match queue.try_recv() {
                Ok(job) => {
                    events += job.events.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        batcher.run(jobs).await;
    }
}

impl Batcher {
    async fn run(&self, jobs: Vec<EnqueueJob>) {
        let mut touched = BTreeSet::new();
        let (pool, batch) = (&self.pool, jobs.as_slice());
        match retrying(move || enqueue_batch(pool, batch)).await {
            Ok((reports, sinks)) => {
                touched = sinks;
                for (job, report) in jobs.into_iter().zip(reports) {
                    let _ = job.answer.send(Ok(report));
                }
            }
            // One caller's events may be what failed (a value the database refuses): each
            // job alone, so that the failure is only that caller's.
            Err(error) if jobs.len() > 1 && !connection_lost(&error) => {
                tracing::debug!(error = %self.target.scrub(&error.to_string()), "An enqueue batch failed; writing its requests one by one");
                for job in jobs {
                    let single = std::slice::from_ref(&job);
                    let result = retrying(move || enqueue_batch(pool, single)).await;
                    match result {
                        Ok((mut reports, sinks)) => {
                            touched.extend(sinks);
                            let _ = job.answer.send(Ok(reports.pop().unwrap_or_default()));
                        }
                        Err(error) => {
                            let _ = job.answer.send(Err(self.target.error(error)));
                        }
                    }
                }
            }
            Err(error) => {
                let error = self.target.error(error);
                for job in jobs {
                    let _ = job.answer.send(Err(error.clone()));
                }
            }
        }
        wake_and_notify(&self.pool, &self.target, &self.wakers, &touched).await;
    }
}

fn connection_lost(error: &PgError) -> bool {
    match error {
        PgError::Postgres(error) => error.is_closed() || error.code().is_none(),
        PgError::Pool(_) => true,
        PgError::Other(_) => false,
    }
}

/// One delivery row to insert.
struct NewDelivery<'a> {
    event_id: &'a str,
    sink: SinkName,
    lane: Option<String>,
    at: Millis,
}

/// Writes the jobs' events and deliveries in one transaction; the report of each job, and the
/// sinks that got rows.
async fn enqueue_batch(
    pool: &Pool,
    jobs: &[EnqueueJob],
) -> Result<(Vec<EnqueueReport>, BTreeSet<SinkName>), PgError> {
    // The first occurrence of each id in the batch is the one that may be new.
    let mut first: HashMap<&str, (usize, usize)> = HashMap::new();
    for (j, job) in jobs.iter().enumerate() {
        for (k, (new, _)) in job.events.iter().enumerate() {
            first.entry(new.event.id.as_str()).or_insert((j, k));
        }
    }
    // Inserted in id order, so that two relays inserting the same ids never deadlock.
    let mut unique: Vec<(&Event, &str, Millis)> = first
        .values()
        .map(|&(j, k)| {
            let (new, payload) = &jobs[j].events[k];
            (&new.event, payload.as_str(), jobs[j].now)
        })
        .collect();
    unique.sort_by(|a, b| a.0.id.as_str().cmp(b.0.id.as_str()));
    let ids: Vec<&str> = unique
        .iter()
        .map(|(event, _, _)| event.id.as_str())
        .collect();
    let sources: Vec<&str> = unique
        .iter()
        .map(|(event, _, _)| event.source.as_str())
        .collect();
    let kinds: Vec<&str> = unique
        .iter()
        .map(|(event, _, _)| event.kind.as_str())
        .collect();
    let pages: Vec<Option<String>> = unique
        .iter()
        .map(|(event, _, _)| {
            event
                .page_id
                .as_deref()
                .map(|page| column(page).into_owned())
        })
        .collect();
    let users: Vec<Option<String>> = unique
        .iter()
        .map(|(event, _, _)| {
            event
                .user_id
                .as_deref()
                .map(|user| column(user).into_owned())
        })
        .collect();
    let timestamps: Vec<i64> = unique
        .iter()
        .map(|(event, _, _)| event.timestamp_ms)
        .collect();
    let received: Vec<i64> = unique.iter().map(|(_, _, now)| *now).collect();
    let payloads: Vec<&str> = unique.iter().map(|(_, payload, _)| *payload).collect();

    let mut client = pool.get().await?;
    let transaction = client.transaction().await?;
    let insert_events = transaction.prepare_cached(INSERT_EVENTS).await?;
    let inserted: HashSet<String> = transaction
        .query(
            &insert_events,
            &[
                &ids,
                &sources,
                &kinds,
                &pages,
                &users,
                &timestamps,
                &received,
                &payloads,
            ],
        )
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;

    let mut reports = vec![EnqueueReport::default(); jobs.len()];
    let mut deliveries: Vec<NewDelivery> = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        for (k, (new, _)) in job.events.iter().enumerate() {
            let id = new.event.id.as_str();
            let is_new = first.get(id) == Some(&(j, k)) && inserted.contains(id);
            if !is_new {
                reports[j].duplicates += 1;
                continue;
            }
            reports[j].stored += 1;
            for sink in &new.sinks {
                deliveries.push(NewDelivery {
                    event_id: id,
                    sink: *sink,
                    lane: new
                        .event
                        .user_id
                        .as_deref()
                        .map(|user| column(user).into_owned()),
                    at: job.now,
                });
                reports[j].deliveries += 1;
            }
        }
    }
    let touched: BTreeSet<SinkName> = deliveries.iter().map(|delivery| delivery.sink).collect();
    if deliveries.is_empty() {
        transaction.commit().await?;
        return Ok((reports, touched));
    }

    // Lock the lanes (sorted: a fixed order across relays), then see which have a head.
    let mut lanes: BTreeMap<(&str, &str), Millis> = BTreeMap::new();
    for delivery in &deliveries {
        if let Some(lane) = &delivery.lane {
            let at = lanes
                .entry((delivery.sink.as_str(), lane.as_str()))
                .or_insert(delivery.at);
            *at = (*at).max(delivery.at);
        }
    }
    let mut busy: HashSet<(String, String)> = HashSet::new();
    if !lanes.is_empty() {
        let lane_sinks: Vec<&str> = lanes.keys().map(|(sink, _)| *sink).collect();
        let lane_users: Vec<&str> = lanes.keys().map(|(_, lane)| *lane).collect();
        let lane_times: Vec<i64> = lanes.values().copied().collect();
        let lock = transaction.prepare_cached(LOCK_LANES).await?;
        transaction
            .execute(&lock, &[&lane_sinks, &lane_users, &lane_times])
            .await?;
        let heads = transaction.prepare_cached(BUSY_LANES).await?;
        for row in transaction
            .query(&heads, &[&lane_sinks, &lane_users])
            .await?
        {
            busy.insert((row.try_get(0)?, row.try_get(1)?));
        }
    }
    let mut states: Vec<&str> = Vec::with_capacity(deliveries.len());
    for delivery in &deliveries {
        let state = match &delivery.lane {
            None => "pending",
            Some(lane) => {
                if busy.insert((delivery.sink.as_str().to_owned(), lane.clone())) {
                    "pending"
                } else {
                    "waiting"
                }
            }
        };
        states.push(state);
    }
    let event_ids: Vec<&str> = deliveries
        .iter()
        .map(|delivery| delivery.event_id)
        .collect();
    let sinks: Vec<&str> = deliveries
        .iter()
        .map(|delivery| delivery.sink.as_str())
        .collect();
    let delivery_lanes: Vec<Option<&str>> = deliveries
        .iter()
        .map(|delivery| delivery.lane.as_deref())
        .collect();
    let times: Vec<i64> = deliveries.iter().map(|delivery| delivery.at).collect();
    let insert = transaction.prepare_cached(INSERT_DELIVERIES).await?;
    transaction
        .execute(
            &insert,
            &[&event_ids, &sinks, &delivery_lanes, &states, &times],
        )
        .await?;
    transaction.commit().await?;
    Ok((reports, touched))
}

/// Wakes this relay's dispatchers of `sinks`, then tells the other relays (after the commit,
/// outside any transaction). A lost NOTIFY costs only latency: every relay also claims at its
/// next due time, and at least once per lease.
async fn wake_and_notify(
    pool: &Pool,
    target: &Target,
    wakers: &Wakers,
    sinks: &BTreeSet<SinkName>,
) {
    if sinks.is_empty() {
        return;
    }
    for sink in sinks {
        wakers.wake(*sink);
    }
    let payload = sinks
        .iter()
        .map(|sink| sink.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let sent = async {
        let client = pool.get().await?;
        client
            .execute("SELECT pg_notify($1, $2)", &[&WORK_CHANNEL, &payload])
            .await?;
        Ok::<_, PgError>(())
    };
    if let Err(error) = sent.await {
        tracing::debug!(error = %target.scrub(&error.to_string()), "Cannot notify the other relays of new work");
    }
}

/// A claimed row; the payload is decoded after the claim.
struct ClaimedRow {
    id: i64,
    attempts: u32,
    throttled: u32,
    ttl_from: Millis,
    lane: Option<String>,
    payload: Option<String>,
}

pub(super) async fn claim(
    store: &PostgresStore,
    sink: SinkName,
    limit: usize,
    now: Millis,
    lease: Duration,
) -> Result<ClaimBatch, StoreError> {
    let lease_end = now.saturating_add(millis(lease));
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let pool = &store.inner.pool;
    let claimed = retrying(move || async move {
        let client = pool.get().await?;
        let statement = client.prepare_cached(CLAIM).await?;
        let mut rows = client
            .query(&statement, &[&sink.as_str(), &now, &lease_end, &limit])
            .await?
            .iter()
            .map(|row| {
                Ok(ClaimedRow {
                    id: row.try_get(0)?,
                    attempts: queries::unsigned(row.try_get(2)?),
                    throttled: queries::unsigned(row.try_get(3)?),
                    ttl_from: row.try_get(4)?,
                    lane: row.try_get(5)?,
                    payload: row.try_get(6)?,
                })
            })
            .collect::<Result<Vec<_>, PgError>>()?;
        rows.sort_by_key(|row| row.id);
        let next = client.prepare_cached(NEXT_DUE).await?;
        let next_due: Option<i64> = client
            .query_opt(&next, &[&sink.as_str()])
            .await?
            .map(|row| row.try_get(0))
            .transpose()?;
        Ok((rows, next_due))
    })
    .await
    .map_err(|error| store.error(error))?;
    let (rows, next_due) = claimed;
    // Another relay may schedule retries this one does not hear of, and die: look again at
    // least once per lease.
    let look_again = now.saturating_add(millis(store.lease()).max(1000));
    let mut batch = ClaimBatch {
        deliveries: Vec::with_capacity(rows.len()),
        next_due: Some(next_due.map_or(look_again, |due| due.min(look_again))),
    };
    for row in rows {
        let event = match row.payload.as_deref().map(serde_json::from_str::<Event>) {
            Some(Ok(event)) => event,
            // As in the embedded store: dead-letter the row so that neither its lane nor the
            // sink's claims get stuck on it.
            unreadable => {
                let reason = match unreadable {
                    Some(Err(error)) => format!("the stored event is unreadable: {error}"),
                    _ => "the event is missing from the store".to_owned(),
                };
                let row = SettleRow {
                    id: row.id,
                    sink,
                    lane: row.lane,
                    lease_until: lease_end,
                };
                let dead = Settle::Dead {
                    status: None,
                    error: reason,
                    attempted: false,
                };
                if let Err(error) = settle_row(store, row, dead, now).await {
                    tracing::warn!(%error, "Cannot dead-letter a delivery whose event is unreadable");
                }
                continue;
            }
        };
        batch.deliveries.push(Claimed {
            id: row.id,
            sink,
            event,
            attempts: row.attempts,
            throttled: row.throttled,
            ttl_from: row.ttl_from,
            lease_until: lease_end,
        });
    }
    Ok(batch)
}

/// What settling a delivery needs to know about it.
pub(super) struct SettleRow {
    pub(super) id: i64,
    pub(super) sink: SinkName,
    pub(super) lane: Option<String>,
    /// The claim's lease end, which the row still carries while the claim holds.
    pub(super) lease_until: Millis,
}

/// What a settle changed.
#[derive(PartialEq)]
enum Settled {
    /// The lease had been lost: nothing recorded.
    Stale,
    /// Retry scheduled.
    Retried,
    /// Done; the next of the lane (if any) is due now when `promoted`.
    Done { promoted: bool },
}

pub(super) async fn settle_row(
    store: &PostgresStore,
    row: SettleRow,
    settle: Settle,
    now: Millis,
) -> Result<(), StoreError> {
    let SettleRow {
        id,
        sink,
        lane,
        lease_until,
    } = row;
    let lane = lane.map(|lane| column(&lane).into_owned());
    let pool = &store.inner.pool;
    let (settle, lane_ref) = (&settle, &lane);
    let settled = retrying(move || async move {
        let mut client = pool.get().await?;
        let transaction = client.transaction().await?;
        let done = !matches!(*settle, Settle::Retry { .. });
        if done && let Some(lane) = lane_ref {
            lock_lane(&transaction, sink, lane, now).await?;
        }
        let changed = record(&transaction, id, settle, now, lease_until).await?;
        if changed == 0 {
            transaction.rollback().await?;
            return Ok(Settled::Stale);
        }
        let promoted = match (lane_ref, done) {
            (Some(lane), true) => promote(&transaction, sink, lane, now).await?,
            _ => false,
        };
        transaction.commit().await?;
        Ok(if done {
            Settled::Done { promoted }
        } else {
            Settled::Retried
        })
    })
    .await
    .map_err(|error| store.error(error))?;
    match settled {
        Settled::Stale => tracing::warn!(
            delivery = id,
            "An attempt's outcome came after its lease ran out; it is not recorded"
        ),
        // A retry is this relay's to schedule: wake its own dispatcher only.
        Settled::Retried => store.inner.wakers.wake(sink),
        Settled::Done { promoted: true } => {
            wake_and_notify(
                pool,
                &store.inner.target,
                &store.inner.wakers,
                &BTreeSet::from([sink]),
            )
            .await;
        }
        Settled::Done { promoted: false } => {}
    }
    Ok(())
}

/// Records an outcome, only while the row is still under this claim's lease; rows changed.
async fn record(
    client: &impl GenericClient,
    id: i64,
    settle: &Settle,
    now: Millis,
    lease_until: Millis,
) -> Result<u64, PgError> {
    let changed = match settle {
        Settle::Delivered { status } => {
            client
                .execute(
                    "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1,
                         last_status = $3, last_error = NULL, updated_at = $2,
                         first_attempt_at = COALESCE(first_attempt_at, $2), last_attempt_at = $2
                     WHERE id = $1 AND state = 'in_flight' AND due_at = $4",
                    &[&id, &now, &i32::from(*status), &lease_until],
                )
                .await?
        }
        Settle::Retry {
            due_at,
            counted,
            status,
            error,
        } => {
            client
                .execute(
                    "UPDATE deliveries SET state = 'pending', attempts = attempts + 1,
                         throttled = throttled + $3, due_at = $4, last_status = $5,
                         last_error = $6, updated_at = $2,
                         first_attempt_at = COALESCE(first_attempt_at, $2), last_attempt_at = $2
                     WHERE id = $1 AND state = 'in_flight' AND due_at = $7",
                    &[
                        &id,
                        &now,
                        &i32::from(!counted),
                        due_at,
                        &status.map(i32::from),
                        &column(error).as_ref(),
                        &lease_until,
                    ],
                )
                .await?
        }
        Settle::Dead {
            status,
            error,
            attempted: true,
        } => {
            client
                .execute(
                    "UPDATE deliveries SET state = 'dead', attempts = attempts + 1,
                         last_status = $3, last_error = $4, updated_at = $2,
                         first_attempt_at = COALESCE(first_attempt_at, $2), last_attempt_at = $2
                     WHERE id = $1 AND state = 'in_flight' AND due_at = $5",
                    &[
                        &id,
                        &now,
                        &status.map(i32::from),
                        &column(error).as_ref(),
                        &lease_until,
                    ],
                )
                .await?
        }
        // Dead before this claim's request: the attempts, their times and the last answer (of
        // an earlier attempt) stay, the reason goes in front of its error.
        Settle::Dead {
            status,
            error,
            attempted: false,
        } => {
            client
                .execute(
                    "UPDATE deliveries SET state = 'dead',
                         last_status = COALESCE($3, last_status),
                         last_error = CASE WHEN last_error IS NULL THEN $4::text
                             ELSE $4::text || '; last error: ' || last_error END,
                         updated_at = $2
                     WHERE id = $1 AND state = 'in_flight' AND due_at = $5",
                    &[
                        &id,
                        &now,
                        &status.map(i32::from),
                        &column(error).as_ref(),
                        &lease_until,
                    ],
                )
                .await?
        }
        Settle::Skipped { reason } => {
            client
                .execute(
                    "UPDATE deliveries SET state = 'skipped', last_error = $3, updated_at = $2
                     WHERE id = $1 AND state = 'in_flight' AND due_at = $4",
                    &[&id, &now, &column(reason).as_ref(), &lease_until],
                )
                .await?
        }
    };
    Ok(changed)
}

/// Locks one lane's row (creating it if a purge removed it).
async fn lock_lane(
    client: &impl GenericClient,
    sink: SinkName,
    lane: &str,
    now: Millis,
) -> Result<(), PgError> {
    let locked = client
        .query_opt(
            "SELECT 1 FROM lanes WHERE sink = $1 AND lane = $2 FOR UPDATE",
            &[&sink.as_str(), &lane],
        )
        .await?;
    if locked.is_none() {
        let statement = client.prepare_cached(LOCK_LANES).await?;
        client
            .execute(&statement, &[&vec![sink.as_str()], &vec![lane], &vec![now]])
            .await?;
    }
    Ok(())
}

/// After the head of a lane is done, lets the next waiting delivery go; true when one did.
/// The caller holds the lane's lock.
async fn promote(
    client: &impl GenericClient,
    sink: SinkName,
    lane: &str,
    now: Millis,
) -> Result<bool, PgError> {
    let statement = client.prepare_cached(PROMOTE).await?;
    Ok(client
        .execute(&statement, &[&sink.as_str(), &lane, &now])
        .await?
        > 0)
}

pub(super) async fn renew(
    store: &PostgresStore,
    delivery: &mut Claimed,
    now: Millis,
    lease: Duration,
) -> Result<bool, StoreError> {
    let until = now.saturating_add(millis(lease));
    let (id, held) = (delivery.id, delivery.lease_until);
    let pool = &store.inner.pool;
    let renewed: Option<i64> = retrying(move || async move {
        let client = pool.get().await?;
        let row = client
            .query_opt(
                "UPDATE deliveries SET due_at = GREATEST(due_at, $3)
                 WHERE id = $1 AND state = 'in_flight' AND due_at = $2
                 RETURNING due_at",
                &[&id, &held, &until],
            )
            .await?;
        Ok(row.map(|row| row.try_get(0)).transpose()?)
    })
    .await
    .map_err(|error| store.error(error))?;
    match renewed {
        Some(until) => {
            delivery.lease_until = until;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Requeues the matching dead letters of the `replayable` sinks, oldest first, in
/// transactions of at most `REPLAY_CHUNK`; a letter rejoins its lane at its original place (its
/// id). Rows no longer dead when their transaction runs are left alone.
pub(super) async fn replay(
    store: &PostgresStore,
    filter: DeadLetterFilter,
    replayable: &[SinkName],
    now: Millis,
) -> Result<ReplayOutcome, StoreError> {
    let pool = &store.inner.pool;
    let rows: Vec<(i64, String)> = async {
        let (condition, values) = queries::dead_letter_condition(&filter);
        let client = pool.get().await?;
        let rows = client
            .query(
                &format!("SELECT d.id, d.sink FROM deliveries d WHERE {condition} ORDER BY d.id"),
                &queries::parameters(&values),
            )
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<Vec<_>, PgError>>()
    }
    .await
    .map_err(|error| store.error(error))?;
    let mut outcome = ReplayOutcome::default();
    let mut letters: Vec<i64> = Vec::with_capacity(rows.len());
    for (id, name) in rows {
        match SinkName::parse(&name) {
            Some(sink) if replayable.contains(&sink) => letters.push(id),
            _ => *outcome.left_dead.entry(name).or_default() += 1,
        }
    }
    for chunk in letters.chunks(REPLAY_CHUNK) {
        let (requeued, touched) = retrying(move || replay_chunk(pool, chunk, now))
            .await
            .map_err(|error| store.error(error))?;
        outcome.replayed += requeued;
        wake_and_notify(pool, &store.inner.target, &store.inner.wakers, &touched).await;
    }
    Ok(outcome)
}

async fn replay_chunk(
    pool: &Pool,
    ids: &[i64],
    now: Millis,
) -> Result<(usize, BTreeSet<SinkName>), PgError> {
    let mut client = pool.get().await?;
    let transaction = client.transaction().await?;
    // The lanes first, in order, then the rows.
    let mut lanes: BTreeSet<(String, String)> = BTreeSet::new();
    for row in transaction
        .query(
            "SELECT sink, lane FROM deliveries
             WHERE id = ANY($1) AND state = 'dead' AND lane IS NOT NULL",
            &[&ids],
        )
        .await?
    {
        lanes.insert((row.try_get(0)?, row.try_get(1)?));
    }
    if !lanes.is_empty() {
        let sinks: Vec<&str> = lanes.iter().map(|(sink, _)| sink.as_str()).collect();
        let users: Vec<&str> = lanes.iter().map(|(_, lane)| lane.as_str()).collect();
        let times: Vec<i64> = vec![now; lanes.len()];
        let lock = transaction.prepare_cached(LOCK_LANES).await?;
        transaction
            .execute(&lock, &[&sinks, &users, &times])
            .await?;
    }
    let requeued = transaction
        .query(
            "UPDATE deliveries SET attempts = 0, throttled = 0,
                 state = CASE WHEN lane IS NULL THEN 'pending' ELSE 'waiting' END,
                 replayed_at = $2, updated_at = $2, due_at = $2
             WHERE id = ANY($1) AND state = 'dead'
             RETURNING sink, lane",
            &[&ids, &now],
        )
        .await?;
    let mut touched = BTreeSet::new();
    let mut requeued_lanes: BTreeSet<(SinkName, String)> = BTreeSet::new();
    for row in &requeued {
        let Some(sink) = SinkName::parse(row.try_get::<_, &str>(0)?) else {
            continue;
        };
        touched.insert(sink);
        if let Some(lane) = row.try_get::<_, Option<String>>(1)? {
            requeued_lanes.insert((sink, lane));
        }
    }
    for (sink, lane) in &requeued_lanes {
        promote(&transaction, *sink, lane, now).await?;
    }
    transaction.commit().await?;
    Ok((requeued.len(), touched))
}

/// Deletes what the retention bounds let go, in statements of at most `PURGE_CHUNK` rows.
pub(super) async fn purge(
    store: &PostgresStore,
    retention: Retention,
    now: Millis,
) -> Result<Purged, StoreError> {
    let delivered_before = now.saturating_sub(millis(retention.delivered));
    let dead_before = now.saturating_sub(millis(retention.dead));
    let forget_before = now.saturating_sub(millis(retention.dedupe_window));
    let pool = &store.inner.pool;
    let purged = async {
        // Deliveries first: an event goes only once no delivery refers to it.
        let deliveries = purge_in_chunks(pool, PURGE_DELIVERED, delivered_before).await?
            + purge_in_chunks(pool, PURGE_DEAD, dead_before).await?;
        let events = purge_in_chunks(pool, PURGE_EVENTS, forget_before).await?;
        purge_in_chunks(pool, PURGE_LANES, forget_before).await?;
        Ok::<_, PgError>(Purged { deliveries, events })
    };
    purged.await.map_err(|error| store.error(error))
}

async fn purge_in_chunks(pool: &Pool, sql: &str, before: Millis) -> Result<usize, PgError> {
    let mut total = 0;
    loop {
        let deleted = retrying(move || async move {
            let client = pool.get().await?;
            let statement = client.prepare_cached(sql).await?;
            Ok(client.execute(&statement, &[&before, &PURGE_CHUNK]).await?)
        })
        .await?;
        total += usize::try_from(deleted).unwrap_or(usize::MAX);
        if deleted < u64::try_from(PURGE_CHUNK).unwrap_or(0) {
            return Ok(total);
        }
    }
}

pub(super) async fn set_paused(
    store: &PostgresStore,
    user: &str,
    paused: bool,
    now: Millis,
) -> Result<(), StoreError> {
    let pool = &store.inner.pool;
    let user = column(user);
    let user = user.as_ref();
    retrying(move || async move {
        let mut client = pool.get().await?;
        let transaction = client.transaction().await?;
        if paused {
            transaction
                .execute(
                    "INSERT INTO paused_users (user_id, paused_at) VALUES ($1, $2)
                     ON CONFLICT (user_id) DO NOTHING",
                    &[&user, &now],
                )
                .await?;
        } else {
            transaction
                .execute("DELETE FROM paused_users WHERE user_id = $1", &[&user])
                .await?;
        }
        // Delivered to the other relays when this commits.
        transaction
            .execute("SELECT pg_notify($1, $2)", &[&PAUSE_CHANNEL, &user])
            .await?;
        transaction.commit().await?;
        Ok(())
    })
    .await
    .map_err(|error| store.error(error))
}

pub(super) async fn probe(store: &PostgresStore, now: Millis) -> Result<(), StoreError> {
    let pool = &store.inner.pool;
    let value = now.to_string();
    let value = &value;
    retrying(move || async move {
        let client = pool.get().await?;
        client
            .execute(
                "INSERT INTO meta (key, value) VALUES ('last_probe', $1)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&value],
            )
            .await?;
        Ok(())
    })
    .await
    .map_err(|error| store.error(error))
}
