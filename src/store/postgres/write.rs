//! The PostgreSQL store's writes other than enqueue (`enqueue.rs`): claims, lease renewal,
//! settles, replays, purges, pauses and the writable probe.
//!
//! Lanes across relays: every write that can change who heads a lane (enqueue, a settle that
//! ends the head, a replay) first locks the lane's row in `lanes`, in (sink, lane) order, so
//! that what it reads about the lane stays true until it commits. The unique index
//! `deliveries_lane_head` makes a second head impossible whatever happens.

use super::enqueue::wake_and_notify;
use super::queries::{self, CLAIM, NEXT_DUE};
use super::settle::{SettleJob, Settled};
use super::{PgError, PostgresStore, column, retrying};
use crate::clock::{Millis, millis};
use crate::sink_name::SinkName;
use crate::store::{
    CUT_OFF, ClaimBatch, ClaimRef, Claimed, DeadLetterFilter, Purged, ReplayOutcome, Retention,
    Settle, StoreError,
};
use deadpool_postgres::{GenericClient, Pool};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio_postgres::types::ToSql;

/// The most rows one purge statement deletes.
pub(super) const PURGE_CHUNK: i64 = 2000;

/// The most dead letters one replay transaction requeues.
const REPLAY_CHUNK: usize = 2000;

/// The channel a relay NOTIFYs after it committed new due rows; the payload is the sinks'
/// names, comma-separated.
pub(super) const WORK_CHANNEL: &str = "botrelay_work";

/// The channel a relay NOTIFYs (at commit) after it paused or unpaused a user.
pub(super) const PAUSE_CHANNEL: &str = "botrelay_pause";

/// Creates the lanes that do not exist and locks them all, in the order given. A lane that
/// exists is locked without a new row version, unless its `touched_at` (which only the purge
/// reads, against the dedupe window) is a minute old or more: `ON CONFLICT DO UPDATE` locks
/// the row whether or not its `WHERE` lets it be updated.
pub(super) const LOCK_LANES: &str = "
    INSERT INTO lanes (sink, lane, touched_at)
    SELECT * FROM unnest($1::text[], $2::text[], $3::int8[])
    ON CONFLICT (sink, lane) DO UPDATE SET touched_at = EXCLUDED.touched_at
        WHERE lanes.touched_at < EXCLUDED.touched_at - 60000";

/// Lets the oldest waiting delivery of lane ($1, $2) go, if the lane has no head.
pub(super) const PROMOTE: &str = "
    UPDATE deliveries SET state = 'pending', due_at = $3, updated_at = $3
    WHERE id = (SELECT id FROM deliveries WHERE sink = $1 AND lane = $2 AND state = 'waiting'
                ORDER BY id LIMIT 1)
      AND NOT EXISTS (SELECT 1 FROM deliveries WHERE sink = $1 AND lane = $2
                      AND state IN ('pending', 'in_flight'))";

/// `PROMOTE` for several lanes in one statement (arrays of sink, lane and time, one entry per
/// lane); returns the sink of each delivery it let go. The settle batch uses it, inside a
/// transaction whose plans reach rows through indexes only (`settle::BEGIN_BY_INDEX`); a
/// replay keeps `PROMOTE`, whose scalar form gets an index plan whatever the statistics say.
pub(super) const PROMOTE_MANY: &str = "
    WITH next AS (
        SELECT l.at, (SELECT w.id FROM deliveries w
                      WHERE w.sink = l.sink AND w.lane = l.lane AND w.state = 'waiting'
                      ORDER BY w.id LIMIT 1) AS id
        FROM unnest($1::text[], $2::text[], $3::int8[]) AS l(sink, lane, at)
        WHERE NOT EXISTS (SELECT 1 FROM deliveries h WHERE h.sink = l.sink AND h.lane = l.lane
                          AND h.state IN ('pending', 'in_flight')))
    UPDATE deliveries d SET state = 'pending', due_at = next.at, updated_at = next.at
    FROM next WHERE d.id = next.id
    RETURNING d.sink";

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

/// The statements each pooled connection opened at start is prepared with: claims, and the
/// NOTIFY after a settle that let a lane's next delivery go.
pub(super) const CLAIM_STATEMENTS: [&str; 3] = [CLAIM, NEXT_DUE, super::enqueue::NOTIFY];

/// A claimed row; the payload is decoded after the claim.
struct ClaimedRow {
    id: i64,
    /// Attempts cut off by a relay stopping, this claim's included.
    crashes: u32,
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
        let (statement, next) = tokio::try_join!(
            client.prepare_cached(CLAIM),
            client.prepare_cached(NEXT_DUE)
        )?;
        let sink_name = sink.as_str();
        let claim_values: [&(dyn ToSql + Sync); 5] =
            [&sink_name, &now, &lease_end, &limit, &CUT_OFF];
        let next_values: [&(dyn ToSql + Sync); 1] = [&sink_name];
        // Both in one round trip (`biased`: sent in this order): the claim commits before the
        // server runs the second statement, which so sees this claim's leases.
        let (claimed, next_due) = tokio::join!(
            biased;
            client.query(&statement, &claim_values),
            client.query_opt(&next, &next_values),
        );
        let mut rows = claimed?
            .iter()
            .map(|row| {
                Ok(ClaimedRow {
                    id: row.try_get(0)?,
                    crashes: queries::unsigned(row.try_get(7)?),
                    attempts: queries::unsigned(row.try_get(2)?),
                    throttled: queries::unsigned(row.try_get(3)?),
                    ttl_from: row.try_get(4)?,
                    lane: row.try_get(5)?,
                    payload: row.try_get(6)?,
                })
            })
            .collect::<Result<Vec<_>, PgError>>()?;
        rows.sort_by_key(|row| row.id);
        let next_due: Option<i64> = next_due?.map(|row| row.try_get(0)).transpose()?;
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
        let event = match crate::store::claimed_event(row.crashes, None, row.payload.as_deref()) {
            Ok(event) => event,
            Err(reason) => {
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
                    tracing::warn!(%error, "Cannot dead-letter a delivery on its claim");
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
    let (answer, answered) = tokio::sync::oneshot::channel();
    let job = SettleJob {
        id,
        sink,
        lane: lane.map(|lane| column(&lane).into_owned()),
        lease_until,
        settle,
        now,
        answer,
    };
    store
        .inner
        .settles
        .send(job)
        .await
        .map_err(|_| StoreError::Unavailable)?;
    let settled = answered.await.map_err(|_| StoreError::Unavailable)??;
    if settled == Settled::Stale {
        tracing::warn!(
            delivery = id,
            sink = %sink,
            "An attempt's outcome came after its lease ran out; it is not recorded"
        );
    }
    Ok(())
}

/// Records deliveries as delivered, each only while its row is still under its claim's lease:
/// arrays of id, time, status and the claim's lease end; returns the id and lease end of each
/// row it changed (the others' leases had been lost; two outcomes of one row in a batch, from
/// two claims, differ by their lease).
pub(super) const RECORD_DELIVERED_MANY: &str = "
    UPDATE deliveries d SET state = 'delivered', attempts = d.attempts + 1,
        last_status = v.status, last_error = NULL, updated_at = v.at,
        first_attempt_at = COALESCE(d.first_attempt_at, v.at), last_attempt_at = v.at
    FROM unnest($1::int8[], $2::int8[], $3::int4[], $4::int8[]) AS v(id, at, status, held)
    WHERE d.id = v.id AND d.state = 'in_flight' AND d.due_at = v.held
    RETURNING d.id, v.held";

/// Schedules a retry.
const RECORD_RETRY: &str = "
    UPDATE deliveries SET state = 'pending', attempts = attempts + 1,
        throttled = throttled + $3, due_at = $4, last_status = $5,
        last_error = $6, updated_at = $2,
        first_attempt_at = COALESCE(first_attempt_at, $2), last_attempt_at = $2
    WHERE id = $1 AND state = 'in_flight' AND due_at = $7";

/// A dead letter after this claim's attempt.
const RECORD_DEAD: &str = "
    UPDATE deliveries SET state = 'dead', attempts = attempts + 1,
        last_status = $3, last_error = $4, updated_at = $2,
        first_attempt_at = COALESCE(first_attempt_at, $2), last_attempt_at = $2
    WHERE id = $1 AND state = 'in_flight' AND due_at = $5";

/// Dead before this claim's request: the attempts, their times and the last answer (of an
/// earlier attempt) stay, the reason goes in front of its error.
const RECORD_DEAD_UNATTEMPTED: &str = "
    UPDATE deliveries SET state = 'dead',
        last_status = COALESCE($3, last_status),
        last_error = CASE WHEN last_error IS NULL THEN $4::text
            ELSE $4::text || '; last error: ' || last_error END,
        updated_at = $2
    WHERE id = $1 AND state = 'in_flight' AND due_at = $5";

/// Nothing to send: done without an attempt.
const RECORD_SKIPPED: &str = "
    UPDATE deliveries SET state = 'skipped', last_error = $3, updated_at = $2
    WHERE id = $1 AND state = 'in_flight' AND due_at = $4";

/// Every statement `record` may return (prepared ahead by the settle batcher).
pub(super) const RECORDS: [&str; 4] = [
    RECORD_RETRY,
    RECORD_DEAD,
    RECORD_DEAD_UNATTEMPTED,
    RECORD_SKIPPED,
];

/// The statement that records an outcome other than delivered (those go in bulk, through
/// `RECORD_DELIVERED_MANY`), only while the row is still under this claim's lease, and its
/// parameters.
pub(super) fn record(
    id: i64,
    settle: &Settle,
    now: Millis,
    lease_until: Millis,
) -> Option<(&'static str, Vec<Box<dyn ToSql + Sync + Send>>)> {
    Some(match settle {
        Settle::Delivered { .. } => return None,
        Settle::Retry {
            due_at,
            counted,
            status,
            error,
        } => (
            RECORD_RETRY,
            vec![
                Box::new(id),
                Box::new(now),
                Box::new(i32::from(!counted)),
                Box::new(*due_at),
                Box::new(status.map(i32::from)),
                Box::new(column(error).into_owned()),
                Box::new(lease_until),
            ],
        ),
        Settle::Dead {
            status,
            error,
            attempted,
        } => (
            if *attempted {
                RECORD_DEAD
            } else {
                RECORD_DEAD_UNATTEMPTED
            },
            vec![
                Box::new(id),
                Box::new(now),
                Box::new(status.map(i32::from)),
                Box::new(column(error).into_owned()),
                Box::new(lease_until),
            ],
        ),
        Settle::Skipped { reason } => (
            RECORD_SKIPPED,
            vec![
                Box::new(id),
                Box::new(now),
                Box::new(column(reason).into_owned()),
                Box::new(lease_until),
            ],
        ),
    })
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

/// Gives back a claim a shutdown cut off: due at `now`, nothing counted.
pub(super) async fn release(
    store: &PostgresStore,
    claim: ClaimRef,
    now: Millis,
) -> Result<(), StoreError> {
    let (id, held) = (claim.id, claim.lease_until);
    let pool = &store.inner.pool;
    retrying(move || async move {
        let client = pool.get().await?;
        client
            .execute(
                "UPDATE deliveries SET state = 'pending', due_at = $3, updated_at = $3
                 WHERE id = $1 AND state = 'in_flight' AND due_at = $2",
                &[&id, &held, &now],
            )
            .await?;
        Ok(())
    })
    .await
    .map_err(|error| store.error(error))
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
        wake_and_notify(
            pool,
            &store.inner.target,
            &store.inner.wakers,
            &store.inner.origin,
            &touched,
        )
        .await;
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
            "UPDATE deliveries SET attempts = 0, throttled = 0, crashes = 0,
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
