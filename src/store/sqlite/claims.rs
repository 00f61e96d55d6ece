//! Claims on the embedded store: a read of the sink's queue on the sink's own connection, the
//! rows no running claim holds taken in memory (`leases`), and an attempt whose lease ran out
//! counted before its row goes out again. Renewing and giving back a claim touch memory only.

use super::leases::{Journaled, Taken};
use super::queries::SettleRow;
use super::*;
use crate::clock::{Millis, millis};
use crate::event::Event;
use crate::sink_name::SinkName;
use crate::store::{CUT_OFF, ClaimBatch, ClaimRef, Claimed, Settle, StoreError};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A claimed row as the claim's read returns it; the caller decodes the payload.
pub(super) struct ClaimedRow {
    id: i64,
    /// Attempts cut off by the relay stopping, this claim's included.
    crashes: u32,
    attempts: u32,
    throttled: u32,
    ttl_from: Millis,
    lane: Option<String>,
    event_id: String,
    /// The event as its enqueue kept it (`Recent`), else its stored JSON (`None`: missing).
    event: Option<Arc<Event>>,
    payload: Option<String>,
    updated_at: Millis,
    /// An earlier claim's lease ran out on this row without an outcome.
    lease_ran_out: bool,
}

impl SqliteStore {
    pub(crate) async fn claim(
        &self,
        sink: SinkName,
        limit: usize,
        now: Millis,
        lease: Duration,
    ) -> Result<ClaimBatch, StoreError> {
        // A store that failed (an fsync) or closed answers only errors, claims included:
        // its readers would still see rows that were committed but never made durable.
        if let Some(failure) = self.failure() {
            return Err(failure);
        }
        if self.leases.is_closed() {
            return Err(StoreError::Unavailable);
        }
        let lease_end = now.saturating_add(millis(lease));
        // A claim reads hot pages on the sink's own connection (nothing else uses it but the
        // sink's one loop; a WAL reader waits for no writer, and its busy timeout is short):
        // tens of microseconds, run right here rather than handed to a blocking thread, which
        // cost more than the read (measured).
        let (mut rows, next_due) = {
            let connection = self
                .claimers
                .get(&sink)
                .ok_or(StoreError::Unavailable)?
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            claim_rows(self, &connection, sink, limit, now, lease_end)?
        };
        // An attempt whose lease ran out without an outcome was cut off: it counts, durably,
        // before the delivery goes out again.
        let cut_off: Vec<i64> = rows
            .iter()
            .filter(|row| row.lease_ran_out)
            .map(|row| row.id)
            .collect();
        if !cut_off.is_empty() {
            let counted = self
                .write(move |connection, _| {
                    let mut count = connection
                        .prepare_cached(
                            "UPDATE deliveries SET crashes = crashes + 1, attempts = attempts + 1,
                                 last_error = ?2, updated_at = ?3
                             WHERE id = ?1 AND state = 'pending' RETURNING attempts, crashes",
                        )
                        .map_err(database)?;
                    let mut counted = HashMap::new();
                    for &id in &cut_off {
                        if let Some(now_counted) = count
                            .query_row(params![id, CUT_OFF, now], |row| {
                                Ok((row.get::<_, u32>(0)?, row.get::<_, u32>(1)?))
                            })
                            .optional()
                            .map_err(database)?
                        {
                            counted.insert(id, now_counted);
                        }
                    }
                    Ok(counted)
                })
                .await;
            match counted {
                Ok(counted) => {
                    for row in rows.iter_mut().filter(|row| row.lease_ran_out) {
                        if let Some(&(attempts, crashes)) = counted.get(&row.id) {
                            (row.attempts, row.crashes, row.updated_at) = (attempts, crashes, now);
                        }
                    }
                }
                Err(error) => {
                    // Nothing goes out uncounted: the new claims are given back, and the ones
                    // whose count failed stay expired, so that the next claim counts them.
                    for row in &rows {
                        if row.lease_ran_out {
                            self.leases.expire(row.id, lease_end, now);
                        } else {
                            self.leases.release(row.id, lease_end);
                        }
                    }
                    return Err(error);
                }
            }
        }
        self.leases.journal(
            &rows
                .iter()
                .map(|row| Journaled {
                    id: row.id,
                    attempts: row.attempts,
                    updated_at: row.updated_at,
                })
                .collect::<Vec<_>>(),
        );
        // Decoding runs here, on the caller's thread, to keep the one writer thread short.
        let mut batch = ClaimBatch {
            deliveries: Vec::with_capacity(rows.len()),
            next_due,
        };
        for row in rows {
            let event = match crate::store::claimed_event(
                row.crashes,
                row.event,
                row.payload.as_deref(),
            ) {
                Ok(event) => event,
                Err(reason) => {
                    let unreadable = SettleRow {
                        id: row.id,
                        sink,
                        lane: row.lane,
                        event_id: row.event_id,
                        lease_until: lease_end,
                    };
                    // If even that fails, the row's lease frees it later; the rows claimed
                    // with it go out now rather than wait for theirs.
                    if let Err(error) = self
                        .settle_row(
                            unreadable,
                            Settle::Dead {
                                status: None,
                                error: reason,
                                attempted: false,
                            },
                            now,
                        )
                        .await
                    {
                        tracing::warn!(delivery = row.id, %error, "Cannot dead-letter a delivery on its claim");
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

    /// Extends a claim's lease while its attempt runs, if the claim still holds it.
    pub(crate) async fn renew(
        &self,
        delivery: &Claimed,
        until: Millis,
        _now: Millis,
    ) -> Result<bool, StoreError> {
        if self.leases.is_closed() {
            return Err(StoreError::Unavailable);
        }
        Ok(self.leases.renew(delivery.id, delivery.lease_until, until))
    }

    /// Gives back a claim a shutdown cut off: due again at once (it was due when claimed),
    /// nothing counted.
    pub(crate) async fn release(&self, claim: ClaimRef, _now: Millis) -> Result<(), StoreError> {
        if self.leases.is_closed() {
            return Err(StoreError::Unavailable);
        }
        if let Some(sink) = self.leases.release(claim.id, claim.lease_until) {
            self.wakers.wake(sink);
        }
        Ok(())
    }
}

/// What a claimed row hands out, for a row without a memo (a row with one, never claimed since
/// its enqueue, is handed out from memory; see `lanes::Memo`). The queue in memory names only
/// rows of committed writes (it passes over fresh ones, see `lanes`); the file is asked for
/// the row as pending for this sink all the same, and a row it does not hold so is passed
/// over, so that no slip between memory and the file can hand out a row of another sink or one
/// that is done (a write rolled back gives its row ids back, and the next insert, for another
/// sink, may take the same id; the rollback takes the row's memo with it).
pub(super) const CLAIM_FETCH: &str =
    "SELECT attempts, throttled, COALESCE(replayed_at, created_at), lane, crashes, updated_at,
            event_id
     FROM deliveries WHERE id = ?1 AND sink = ?2 AND state = 'pending'";

/// How many due rows beyond its limit a claim reads from the queue in memory, so that rows the
/// file check passes over do not take the places of rows it could hand out (with a limit of
/// one, as a probe's, a single such row would leave it nothing).
const CLAIM_SLACK: usize = 16;

/// A claimed row's event, when its enqueue's copy is no longer kept in memory.
pub(super) const CLAIM_EVENT: &str = "SELECT payload FROM events WHERE id = ?1";

/// How many times a claim reads again when settles kept dropping claims faster than it could
/// tell which rows they were (see `Leases::take`).
const CLAIM_READS: usize = 4;

/// A claim's read, on the sink's own connection: the due rows of `sink` in queue order that no
/// running claim holds, at most `limit`, taken under a lease until `lease_end` (`store`'s
/// leases), each with its event when `store` still keeps it ([`super::recent::Recent`]); and
/// when the sink's next row falls due (a row not due yet, a row beyond `limit`, or a lease's
/// end).
pub(super) fn claim_rows(
    store: &SqliteStore,
    connection: &Connection,
    sink: SinkName,
    limit: usize,
    now: Millis,
    lease_end: Millis,
) -> Result<(Vec<ClaimedRow>, Option<Millis>), StoreError> {
    let (leases, recent) = (&store.leases, &store.recent);
    for _ in 0..CLAIM_READS {
        let view = leases.view(sink);
        // The queue's order is in memory (`lanes`). Rows held by running claims are still
        // pending there: passed over, at most as many as the sink holds.
        let queue = store.lanes.due(sink, now, limit + CLAIM_SLACK, |id| {
            view.passes_over(id, now)
        });
        let due = queue.ids;
        let next_due = [view.next_lease_end(now), queue.next_due]
            .into_iter()
            .flatten()
            .min();
        let mut fetch = connection.prepare_cached(CLAIM_FETCH).map_err(database)?;
        let mut fetched = Vec::with_capacity(due.len());
        for id in due {
            if fetched.len() == limit {
                break;
            }
            // A row as its enqueue wrote it, never claimed since: nothing to read.
            if let Some(Memo { event, created_at }) = store.lanes.take_memo(sink, id) {
                fetched.push(ClaimedRow {
                    id,
                    attempts: 0,
                    throttled: 0,
                    ttl_from: created_at,
                    lane: event.user_id.clone(),
                    crashes: 0,
                    updated_at: created_at,
                    event_id: event.id.as_str().to_owned(),
                    event: Some(event),
                    payload: None,
                    lease_ran_out: false,
                });
                continue;
            }
            let row = fetch
                .query_row(params![id, sink.as_str()], |row| {
                    Ok(ClaimedRow {
                        id,
                        attempts: row.get(0)?,
                        throttled: row.get(1)?,
                        ttl_from: row.get(2)?,
                        lane: row.get(3)?,
                        crashes: row.get(4)?,
                        updated_at: row.get(5)?,
                        event_id: row.get(6)?,
                        event: None,
                        payload: None,
                        lease_ran_out: false,
                    })
                })
                .optional()
                .map_err(database)?;
            let Some(mut row) = row else { continue };
            row.event = recent.get(&row.event_id);
            if row.event.is_none() {
                row.payload = connection
                    .prepare_cached(CLAIM_EVENT)
                    .map_err(database)?
                    .query_row([&row.event_id], |found| found.get(0))
                    .optional()
                    .map_err(database)?;
            }
            fetched.push(row);
        }
        let as_read: Vec<Journaled> = fetched
            .iter()
            .map(|row| Journaled {
                id: row.id,
                attempts: row.attempts,
                updated_at: row.updated_at,
            })
            .collect();
        let Some(taken) = leases.take(sink, &view, &as_read, limit, now, lease_end) else {
            continue;
        };
        let taken: foldhash::HashMap<i64, Taken> =
            taken.into_iter().map(|(row, how)| (row.id, how)).collect();
        let claimed = fetched
            .into_iter()
            .filter_map(|mut row| {
                let how = taken.get(&row.id)?;
                row.lease_ran_out = *how == Taken::LeaseRanOut;
                Some(row)
            })
            .collect();
        return Ok((claimed, next_due));
    }
    Err(StoreError::Database(
        "a claim kept overlapping more settles than it can tell apart".to_owned(),
    ))
}
