//! Every store operation as SQL but the claim (`claims`): enqueue, settle,
//! replay, the dead-letter listing, queue depth, purge, pause state. Writes run on the engine's
//! writer, reads on the read connection.

use super::engine::*;
use super::*;
use crate::clock::{Millis, millis};
use crate::event::Event;
use crate::sink_name::SinkName;
use crate::store::{
    Claimed, DeliveryProbe, EnqueueReport, NewEvent, Purged, Retention, Settle, SinkDepth,
    StoreError,
};
use rusqlite::{Connection, params};
use std::collections::HashMap;
use std::time::Duration;

/// The most rows one purge write deletes.
pub(super) const PURGE_CHUNK: u32 = 2000;

/// How long one purge write should take: chunks shrink (to 20 rows at least) when a write
/// takes longer, and grow back (to `PURGE_CHUNK`) when it is quick, so that the webhooks whose
/// answers wait behind it never wait long.
const PURGE_STEP: Duration = Duration::from_millis(20);

// Queries on finished rows repeat `deliveries_done`'s own condition: SQLite uses a partial
// index only when the query's WHERE visibly implies the index's, and it does not see that
// `state = 'dead'` implies it (without it: a scan of every delivery kept).
// `query_plans_use_the_indexes` checks each plan.
/// `deliveries_done`'s condition, for a query that names the deliveries `d`.
pub(super) const FINISHED_D: &str =
    "(d.state = 'delivered' OR d.state = 'dead' OR d.state = 'skipped')";

pub(super) const PURGE_DELIVERED: &str =
    "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries
     WHERE (state = 'delivered' OR state = 'dead' OR state = 'skipped') AND state IN ('delivered', 'skipped')
     AND updated_at < ?1 LIMIT ?2)";
pub(super) const PURGE_DEAD: &str = "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries
     WHERE (state = 'delivered' OR state = 'dead' OR state = 'skipped') AND state = 'dead'
     AND updated_at < ?1 LIMIT ?2)";
/// An event is kept while any delivery refers to it. Its deliveries were created in the same
/// write with `created_at` = its `received_at`, so "is it referred to?" is one seek of
/// `deliveries_created` per event (at that exact time), whatever the number of deliveries kept:
/// a chunk's cost does not grow with the table (a `NOT IN` over every old delivery did).
pub(super) const PURGE_EVENTS: &str =
    "DELETE FROM events WHERE rowid IN (SELECT e.rowid FROM events e
     WHERE e.received_at < ?1
     AND NOT EXISTS (SELECT 1 FROM deliveries d
                     WHERE d.created_at = e.received_at AND d.event_id = e.id)
     LIMIT ?2)";

/// Queue depth per sink and state, the open rows through `deliveries_open`, the dead ones
/// through `deliveries_done`.
pub(super) const DEPTH: [&str; 2] = [
    "SELECT sink, state, COUNT(*) FROM deliveries
     WHERE (state = 'pending' OR state = 'waiting' OR state = 'in_flight') GROUP BY sink, state",
    "SELECT sink, state, COUNT(*) FROM deliveries
     WHERE (state = 'delivered' OR state = 'dead' OR state = 'skipped') AND state = 'dead' GROUP BY sink",
];

/// What settling a delivery needs to know about it.
pub(super) struct SettleRow {
    pub(super) id: i64,
    pub(super) sink: SinkName,
    pub(super) lane: Option<String>,
    /// Its event's id (what `Recent` keeps the event under).
    pub(super) event_id: String,
    /// The claim's lease end, which identifies the claim.
    pub(super) lease_until: Millis,
}

impl SqliteStore {
    pub(crate) async fn enqueue(
        &self,
        events: Vec<NewEvent>,
        now: Millis,
    ) -> Result<EnqueueReport, StoreError> {
        // Encoding runs here, on the caller's thread, to keep the one writer thread short.
        let encoded = events
            .into_iter()
            .map(|NewEvent { event, sinks }| {
                serde_json::to_string(&event)
                    .map(|payload| (Arc::new(event), sinks, payload))
                    .map_err(|error| StoreError::Database(format!("cannot encode event: {error}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Each stored event is kept in memory for its deliveries' claims, from inside the
        // write (before its commit, so a claim that sees the deliveries finds it); a write
        // that fails in the end takes its events out again.
        let kept: Vec<Arc<Event>> = encoded
            .iter()
            .map(|(event, ..)| Arc::clone(event))
            .collect();
        let recent = Arc::clone(&self.recent);
        let written = self.write(move |connection, touched| {
            let mut report = EnqueueReport::default();
            let mut insert_event = connection
                .prepare_cached(
                    "INSERT INTO events (id, source, kind, page_id, user_id, timestamp_ms, received_at, payload)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (id) DO NOTHING",
                )
                .map_err(database)?;
            let mut insert_delivery = connection
                .prepare_cached(INSERT_DELIVERY)
                .map_err(database)?;
            for (event, sinks, payload) in &encoded {
                let inserted = insert_event
                    .execute(params![
                        event.id.as_str(),
                        event.source.as_str(),
                        event.kind.as_str(),
                        event.page_id,
                        event.user_id,
                        event.timestamp_ms,
                        now,
                        payload,
                    ])
                    .map_err(database)?;
                if inserted == 0 {
                    report.duplicates += 1;
                    continue;
                }
                report.stored += 1;
                let lane = event.user_id.as_deref();
                // A row of an event kept in memory needs no read of the file on its first
                // claim (`lanes::Memo`).
                let kept = recent.keep(event, sinks.len(), payload.len());
                for &sink in sinks {
                    // Only the head of a lane goes out: a user's deliveries to a sink go one at
                    // a time, in the order of receipt.
                    let pending =
                        lane.is_none_or(|lane| !touched.lanes.has_head(sink, lane));
                    insert_delivery
                        .execute(params![event.id.as_str(), sink.as_str(), lane, now])
                        .map_err(database)?;
                    let id = connection.last_insert_rowid();
                    let memo = kept.then(|| Memo {
                        event: Arc::clone(event),
                        created_at: now,
                    });
                    touched.lanes.add(sink, lane, id, pending, now, memo);
                    report.deliveries += 1;
                    touched.insert(sink);
                }
            }
            Ok(report)
        })
        .await;
        if written.is_err() {
            for event in &kept {
                self.recent.forget(event);
            }
        }
        written
    }

    pub(crate) async fn settle(
        &self,
        delivery: &Claimed,
        settle: Settle,
        now: Millis,
    ) -> Result<(), StoreError> {
        let row = SettleRow {
            id: delivery.id,
            sink: delivery.sink,
            lane: delivery.event.user_id.clone(),
            event_id: delivery.event.id.as_str().to_owned(),
            lease_until: delivery.lease_until,
        };
        self.settle_row(row, settle, now).await
    }

    pub(super) async fn settle_row(
        &self,
        row: SettleRow,
        settle: Settle,
        now: Millis,
    ) -> Result<(), StoreError> {
        let SettleRow {
            id,
            sink,
            lane,
            event_id,
            lease_until,
        } = row;
        // Only the claim that holds the row records its outcome: one whose lease ran out and
        // whose row was claimed again (or given back) changes nothing.
        if !self.leases.begin_settle(id, lease_until) {
            tracing::warn!(
                delivery = id,
                %sink,
                "An attempt's outcome came after its lease ran out; it is not recorded"
            );
            return Ok(());
        }
        // The end of the settle runs once the write's fate is known, whether or not the caller
        // still waits: a caller that goes away (a shutdown's abort) must not leave its claim
        // between a queued write and that write's outcome, or the write could land after the
        // claim's lease ran out and the row was claimed again.
        let requeued = matches!(settle, Settle::Retry { .. });
        let (leases, wakers, recent) = (
            Arc::clone(&self.leases),
            Arc::clone(&self.wakers),
            Arc::clone(&self.recent),
        );
        let then = Then::new(move |durable| {
            leases.end_settle(id, lease_until, durable);
            if durable {
                if requeued {
                    // A retry puts the row back in the queue, where a claim sees it only once
                    // its claim is dropped: the sink is woken after that, not at the commit.
                    wakers.wake(sink);
                } else {
                    recent.finished(&event_id);
                }
            }
        });
        self.write_then(Self::settle_write(id, sink, lane, settle, now), then)
            .await
    }

    /// Records a settle's outcome, in the writer's group; the lane's next delivery is due
    /// once this one is done (in memory).
    fn settle_write(
        id: i64,
        sink: SinkName,
        lane: Option<String>,
        settle: Settle,
        now: Millis,
    ) -> impl FnMut(&Connection, &mut Touched) -> Result<(), StoreError> + Send + 'static {
        move |connection, touched| {
            let changed = match &settle {
                Settle::Delivered { status } => execute(
                    connection,
                    "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1,
                             last_status = ?3, last_error = NULL, updated_at = ?2,
                             first_attempt_at = COALESCE(first_attempt_at, ?2), last_attempt_at = ?2
                             WHERE id = ?1 AND state = 'pending'",
                    params![id, now, status],
                )?,
                Settle::Retry {
                    due_at,
                    counted,
                    status,
                    error,
                } => execute(
                    connection,
                    "UPDATE deliveries SET state = 'pending', attempts = attempts + 1,
                             throttled = throttled + ?3, due_at = ?4, last_status = ?5,
                             last_error = ?6, updated_at = ?2,
                             first_attempt_at = COALESCE(first_attempt_at, ?2), last_attempt_at = ?2
                             WHERE id = ?1 AND state = 'pending'",
                    params![id, now, i64::from(!counted), due_at, status, error,],
                )?,
                Settle::Dead {
                    status,
                    error,
                    attempted: true,
                } => execute(
                    connection,
                    "UPDATE deliveries SET state = 'dead', attempts = attempts + 1,
                             last_status = ?3, last_error = ?4, updated_at = ?2,
                             first_attempt_at = COALESCE(first_attempt_at, ?2), last_attempt_at = ?2
                             WHERE id = ?1 AND state = 'pending'",
                    params![id, now, status, error],
                )?,
                // Dead before this claim's request: the attempts, their times and the last
                // answer (of an earlier attempt) stay, the reason goes in front of its error.
                Settle::Dead {
                    status,
                    error,
                    attempted: false,
                } => execute(
                    connection,
                    "UPDATE deliveries SET state = 'dead',
                             last_status = COALESCE(?3, last_status),
                             last_error = CASE WHEN last_error IS NULL THEN ?4
                                 ELSE ?4 || '; last error: ' || last_error END,
                             updated_at = ?2
                             WHERE id = ?1 AND state = 'pending'",
                    params![id, now, status, error],
                )?,
                Settle::Skipped { reason } => execute(
                    connection,
                    "UPDATE deliveries SET state = 'skipped', last_error = ?3, updated_at = ?2
                             WHERE id = ?1 AND state = 'pending'",
                    params![id, now, reason],
                )?,
            };
            // The claim holds the row, so it is open; but say so if it were not.
            if changed == 0 {
                return Err(StoreError::Database(format!(
                    "delivery {id} is not open, although a claim holds it"
                )));
            }
            if let Settle::Retry { due_at, .. } = &settle {
                // A retry wakes its sink once its claim is dropped (`settle_row`).
                touched.lanes.reschedule(sink, id, *due_at);
            } else if touched
                .lanes
                .finish(sink, lane.as_deref(), id, now)
                .is_some()
            {
                // The lane's next delivery is due now (in memory: the file holds it as
                // pending already).
                touched.insert(sink);
            }
            Ok(())
        }
    }

    /// Every delivery row, oldest first (the test probe behind `Store::probe_deliveries`).
    pub(crate) async fn probe_deliveries(&self) -> Result<Vec<DeliveryProbe>, StoreError> {
        let (leases, lanes) = (self.leases.clone(), self.lanes.clone());
        self.read(move |connection| {
            let mut select = connection
                .prepare(
                    "SELECT id, event_id, sink, lane, state, attempts, throttled, last_status,
                            last_error, replayed_at IS NOT NULL
                     FROM deliveries ORDER BY id",
                )
                .map_err(database)?;
            select
                .query_map([], |row| {
                    let id = row.get(0)?;
                    let sink: String = row.get(2)?;
                    let user: Option<String> = row.get(3)?;
                    // The file holds every open row as pending; which wait is kept in memory.
                    let waiting = || {
                        SinkName::parse(&sink)
                            .zip(user.as_deref())
                            .is_some_and(|(sink, lane)| lanes.is_waiting(sink, lane, id))
                    };
                    let state = match row.get::<_, String>(4)? {
                        state if state == "pending" && leases.holds(id) => "in_flight".to_owned(),
                        state if state == "pending" && waiting() => "waiting".to_owned(),
                        state => state,
                    };
                    Ok(DeliveryProbe {
                        id,
                        event_id: row.get(1)?,
                        sink,
                        user,
                        state,
                        attempts: row.get(5)?,
                        throttled: row.get(6)?,
                        last_status: row.get(7)?,
                        last_error: row.get(8)?,
                        replayed: row.get(9)?,
                    })
                })
                .map_err(database)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(database)
        })
        .await
    }

    /// Every stored event, in the order of receipt (the probe behind `Store::probe_events`).
    pub(crate) async fn probe_events(&self) -> Result<Vec<Event>, StoreError> {
        self.read(|connection| {
            let mut select = connection
                .prepare("SELECT payload FROM events ORDER BY received_at, rowid")
                .map_err(database)?;
            let payloads = select
                .query_map([], |row| row.get::<_, String>(0))
                .map_err(database)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(database)?;
            payloads
                .iter()
                .map(|payload| {
                    serde_json::from_str(payload).map_err(|error| {
                        StoreError::Database(format!("a stored event is unreadable: {error}"))
                    })
                })
                .collect()
        })
        .await
    }

    pub(crate) async fn depth(&self) -> Result<HashMap<SinkName, SinkDepth>, StoreError> {
        let leases = self.leases.clone();
        self.read(move |connection| {
            let mut depth: HashMap<SinkName, SinkDepth> = HashMap::new();
            for sql in DEPTH {
                let mut select = connection.prepare_cached(sql).map_err(database)?;
                let rows = select
                    .query_map([], |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, String>(1)?,
                            u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0),
                        ))
                    })
                    .map_err(database)?;
                for row in rows {
                    let (sink, state, count) = row.map_err(database)?;
                    let Some(sink) = SinkName::parse(&sink) else {
                        continue;
                    };
                    let entry = depth.entry(sink).or_default();
                    match state.as_str() {
                        "in_flight" => entry.in_flight += count,
                        "dead" => entry.dead += count,
                        _ => entry.queued += count,
                    }
                }
            }
            // Rows held by a claim are `pending` in the file, and in flight.
            for (sink, held) in leases.held_per_sink() {
                let entry = depth.entry(sink).or_default();
                entry.in_flight += held;
                entry.queued = entry.queued.saturating_sub(held);
            }
            Ok(depth)
        })
        .await
    }

    /// Deletes what the retention bounds let go, in writes of at most `PURGE_CHUNK` rows, so
    /// that a large purge (the first after a long stop, or a busy relay's minute) never holds
    /// the writer, and with it every webhook's answer, for long.
    pub(crate) async fn purge(
        &self,
        retention: Retention,
        now: Millis,
    ) -> Result<Purged, StoreError> {
        let delivered_before = now.saturating_sub(millis(retention.delivered));
        let dead_before = now.saturating_sub(millis(retention.dead));
        let forget_before = now.saturating_sub(millis(retention.dedupe_window));
        // Deliveries first: an event goes only once no delivery refers to it.
        Ok(Purged {
            deliveries: self
                .purge_in_chunks(PURGE_DELIVERED, delivered_before)
                .await?
                + self.purge_in_chunks(PURGE_DEAD, dead_before).await?,
            events: self.purge_in_chunks(PURGE_EVENTS, forget_before).await?,
        })
    }

    /// Runs one purge statement (`?1` = the cut, `?2` = the chunk) in writes of at most
    /// `PURGE_CHUNK` rows, sized so that each takes about `PURGE_STEP` and followed by a pause
    /// as long, until a write deletes fewer than it may; returns the rows deleted.
    async fn purge_in_chunks(
        &self,
        sql: &'static str,
        before: Millis,
    ) -> Result<usize, StoreError> {
        let mut total = 0;
        let mut chunk: u32 = 100;
        loop {
            // The whole write as its caller sees it: the statement, and the commit and fsync of
            // the pages it dirtied (the larger part), which the webhooks of its group wait for.
            let started = std::time::Instant::now();
            let deleted = self
                .write(move |connection, _| execute(connection, sql, params![before, chunk]))
                .await?;
            let took = started.elapsed();
            total += deleted;
            if deleted < chunk as usize {
                return Ok(total);
            }
            // The writer is shared with every webhook's answer: between two chunks, leave it
            // to them for as long as the chunk took, so that at most about half of the groups
            // carry a chunk's pages (and its fsync), and the checkpointer keeps up with the
            // frames a purge writes.
            tokio::time::sleep(took.min(PURGE_STEP * 4)).await;
            chunk = if took > PURGE_STEP {
                (chunk / 2).max(20)
            } else if took < PURGE_STEP / 2 {
                chunk.saturating_mul(2).min(PURGE_CHUNK)
            } else {
                chunk
            };
        }
    }

    pub(crate) async fn set_paused(
        &self,
        user: String,
        paused: bool,
        now: Millis,
    ) -> Result<(), StoreError> {
        self.write(move |connection, _| {
            if paused {
                connection
                    .execute(
                        "INSERT INTO paused_users (user_id, paused_at) VALUES (?1, ?2)
                         ON CONFLICT (user_id) DO NOTHING",
                        params![user, now],
                    )
                    .map_err(database)?;
            } else {
                connection
                    .execute("DELETE FROM paused_users WHERE user_id = ?1", [&user])
                    .map_err(database)?;
            }
            Ok(())
        })
        .await
    }

    /// The paused users, read at once (at open, before the handle is shared).
    pub(crate) fn paused_users_now(&self) -> Result<Vec<String>, StoreError> {
        let connection = self.reader.lock().map_err(|_| StoreError::Unavailable)?;
        let mut select = connection
            .prepare("SELECT user_id FROM paused_users")
            .map_err(database)?;
        select
            .query_map([], |row| row.get(0))
            .map_err(database)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(database)
    }

    pub(crate) async fn paused_users(&self) -> Result<Vec<(String, Millis)>, StoreError> {
        self.read(|connection| {
            let mut select = connection
                .prepare("SELECT user_id, paused_at FROM paused_users ORDER BY paused_at, user_id")
                .map_err(database)?;
            select
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(database)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(database)
        })
        .await
    }

    pub(crate) async fn probe(&self, now: Millis) -> Result<(), StoreError> {
        self.write(move |connection, _| {
            connection
                .execute(
                    "INSERT INTO meta (key, value) VALUES ('last_probe', ?1)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    [now.to_string()],
                )
                .map_err(database)?;
            // A write of the same size can succeed in a full file; ask for a fresh page too.
            let free: i64 = connection
                .query_row("PRAGMA freelist_count", [], |row| row.get(0))
                .map_err(database)?;
            let (count, max): (i64, i64) = (
                connection
                    .query_row("PRAGMA page_count", [], |row| row.get(0))
                    .map_err(database)?,
                connection
                    .query_row("PRAGMA max_page_count", [], |row| row.get(0))
                    .map_err(database)?,
            );
            if free == 0 && count >= max {
                return Err(StoreError::Full);
            }
            Ok(())
        })
        .await
    }
}
/// A new delivery. Every open row is `pending` in the file; whether it is its lane's head or
/// waits behind it is the queue's to say, in memory (`lanes`).
pub(super) const INSERT_DELIVERY: &str =
    "INSERT INTO deliveries (event_id, sink, lane, state, due_at, created_at, updated_at)
     VALUES (?1, ?2, ?3, 'pending', ?4, ?4, ?4)";

/// Every open row, for the queue in memory at open.
pub(super) const LOAD_QUEUE: &str = "SELECT id, sink, lane, due_at FROM deliveries
     WHERE (state = 'pending' OR state = 'waiting' OR state = 'in_flight')";

/// At open: the rows an older version left `waiting` behind their lane's head become
/// `pending`, as this version writes them.
pub(super) const UNWAIT: &str = "UPDATE deliveries SET state = 'pending'
     WHERE (state = 'pending' OR state = 'waiting' OR state = 'in_flight') AND state = 'waiting'";
