//! The PostgreSQL store's enqueue: a batching task collects what concurrent requests enqueue
//! while the previous transaction commits, writes it in ONE transaction (`UNNEST` arrays,
//! `ON CONFLICT DO NOTHING` on the event id, so relays dedupe against each other), answers every
//! caller after the commit, and wakes the dispatchers; the NOTIFY to the other relays follows
//! the COMMIT on the connection (outside the transaction).
//!
//! The transaction takes one round trip: `BEGIN`, the lane locks, one statement that inserts the
//! events and their deliveries, and `COMMIT` are sent together (pipelined), on a connection of
//! the batcher's own. Under load the database's time per batch, not the number of round trips
//! nor a wait for a pooled connection, is what an ack waits for.

use super::write::{LOCK_LANES, WORK_CHANNEL};
use super::{PgError, Target, batch, column};
use crate::clock::Millis;
use crate::event::Event;
use crate::sink_name::SinkName;
use crate::store::{EnqueueReport, NewEvent, StoreError, Wakers};
use deadpool_postgres::{Object as Client, Pool};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;

pub(super) type Answer = oneshot::Sender<Result<EnqueueReport, StoreError>>;

/// The most events one enqueue transaction takes.
const MAX_BATCH_EVENTS: usize = 2000;

/// The whole enqueue after the lanes are locked, in one statement: inserts the events that are
/// new (`ON CONFLICT DO NOTHING`, in id order, so that two relays inserting the same ids never
/// deadlock), then the deliveries of the new ones in the order given (ids are the order of
/// receipt); a delivery heads its lane when it is the lane's first here and the lane has no
/// head. Returns the ids of the events inserted. Under the lanes' locks, taken by the statement
/// before it, what it reads about the lanes' heads stays true until the commit.
const ENQUEUE: &str = "
    WITH new_events AS (
        INSERT INTO events (id, source, kind, page_id, user_id, timestamp_ms, received_at, payload)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::int8[], $7::int8[], $8::text[])
        ON CONFLICT (id) DO NOTHING
        RETURNING id),
    wanted AS (
        SELECT u.event_id, u.sink, u.lane, u.at, u.n,
               row_number() OVER (PARTITION BY u.sink, u.lane ORDER BY u.n) AS place
        FROM unnest($9::text[], $10::text[], $11::text[], $12::int8[])
            WITH ORDINALITY AS u (event_id, sink, lane, at, n)
        JOIN new_events e ON e.id = u.event_id),
    inserted AS (
        INSERT INTO deliveries (event_id, sink, lane, state, due_at, created_at, updated_at)
        SELECT w.event_id, w.sink, w.lane,
               CASE WHEN w.lane IS NULL THEN 'pending'
                    WHEN w.place = 1 AND NOT EXISTS (
                        SELECT 1 FROM deliveries h WHERE h.sink = w.sink AND h.lane = w.lane
                            AND h.state IN ('pending', 'in_flight')) THEN 'pending'
                    ELSE 'waiting' END,
               w.at, w.at, w.at
        FROM wanted w
        ORDER BY w.n
        RETURNING 1)
    SELECT id FROM new_events";

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
    /// The batcher's own connection (a pool of one, which reconnects): an enqueue never waits
    /// for a connection behind the dispatchers' claims and settles.
    pub(super) pool: Pool,
    pub(super) target: Target,
    pub(super) wakers: Arc<Wakers>,
    /// This relay's mark on its notifications (see `work_payload`).
    pub(super) origin: Arc<str>,
}

/// The batcher: takes every enqueue that arrived while the previous transaction committed,
/// up to `MAX_BATCH_EVENTS`, and writes them in one transaction; answers each caller after
/// the commit; then wakes the local dispatchers and NOTIFYs the other relays.
pub(super) async fn batch_loop(batcher: Batcher, mut queue: mpsc::Receiver<EnqueueJob>) {
    while let Some(jobs) =
        batch::next_batch(&mut queue, MAX_BATCH_EVENTS, |job| job.events.len()).await
    {
        batcher.run(jobs).await;
    }
}

impl Batcher {
    async fn run(&self, jobs: Vec<EnqueueJob>) {
        let touched = batch::write_all(self, &self.target, jobs, |job, report| {
            let _ = job.answer.send(report);
        })
        .await;
        // The other relays were notified right behind the commit.
        for sink in touched {
            self.wakers.wake(sink);
        }
    }
}

impl batch::BatchWrite for Batcher {
    type Job = EnqueueJob;
    type Outcome = EnqueueReport;
    const WHAT: &'static str = "enqueue";

    fn write<'a>(
        &'a self,
        jobs: &'a [EnqueueJob],
    ) -> impl Future<Output = Result<(Vec<EnqueueReport>, BTreeSet<SinkName>), PgError>> + Send + 'a
    {
        write_batch(&self.pool, &self.origin, jobs)
    }
}

/// One batch on the batcher's own connection.
async fn write_batch(
    pool: &Pool,
    origin: &str,
    jobs: &[EnqueueJob],
) -> Result<(Vec<EnqueueReport>, BTreeSet<SinkName>), PgError> {
    let client = pool.get().await?;
    enqueue_batch(&client, jobs, origin).await
}

/// One delivery row to insert, should its event be new.
struct NewDelivery<'a> {
    event_id: &'a str,
    sink: SinkName,
    lane: Option<String>,
    at: Millis,
}

/// Writes the jobs' events and deliveries in one transaction, sent in one round trip (`BEGIN`,
/// the lane locks, the enqueue, `COMMIT`, pipelined on the connection) and the NOTIFY to the
/// other relays right behind it, with this relay's mark (`origin`); the report of each job,
/// and the sinks that got rows.
async fn enqueue_batch(
    client: &Client,
    jobs: &[EnqueueJob],
    origin: &str,
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

    // The deliveries of every first occurrence, in the order of receipt; the statement keeps
    // those of the events it inserted.
    let mut deliveries: Vec<NewDelivery> = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        for (k, (new, _)) in job.events.iter().enumerate() {
            let id = new.event.id.as_str();
            if first.get(id) != Some(&(j, k)) {
                continue;
            }
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
            }
        }
    }
    // The lanes, sorted: locked in a fixed order across relays.
    let mut lanes: BTreeMap<(&str, &str), Millis> = BTreeMap::new();
    for delivery in &deliveries {
        if let Some(lane) = &delivery.lane {
            let at = lanes
                .entry((delivery.sink.as_str(), lane.as_str()))
                .or_insert(delivery.at);
            *at = (*at).max(delivery.at);
        }
    }
    let lane_sinks: Vec<&str> = lanes.keys().map(|(sink, _)| *sink).collect();
    let lane_users: Vec<&str> = lanes.keys().map(|(_, lane)| *lane).collect();
    let lane_times: Vec<i64> = lanes.values().copied().collect();
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
    let may_touch: BTreeSet<SinkName> = deliveries.iter().map(|delivery| delivery.sink).collect();
    let payload = work_payload(&may_touch, origin);

    let (lock, enqueue, notify_statement) = tokio::try_join!(
        client.prepare_cached(LOCK_LANES),
        client.prepare_cached(ENQUEUE),
        client.prepare_cached(NOTIFY),
    )?;
    // All sent before the first answer, in this order (`biased`: the first poll polls each in
    // turn, and a statement is sent when first polled): one round trip. Should a statement
    // fail, those after it fail too and the COMMIT rolls back; the first error is returned.
    let lock_params: [&(dyn ToSql + Sync); 3] = [&lane_sinks, &lane_users, &lane_times];
    let enqueue_params: [&(dyn ToSql + Sync); 12] = [
        &ids,
        &sources,
        &kinds,
        &pages,
        &users,
        &timestamps,
        &received,
        &payloads,
        &event_ids,
        &sinks,
        &delivery_lanes,
        &times,
    ];
    let notify_params: [&(dyn ToSql + Sync); 2] = [&WORK_CHANNEL, &payload];
    let locked = async {
        if lanes.is_empty() {
            Ok(0)
        } else {
            client.execute(&lock, &lock_params).await
        }
    };
    let notified = async {
        if !may_touch.is_empty() {
            Some(client.execute(&notify_statement, &notify_params).await)
        } else {
            None
        }
    };
    let (began, locked, rows, committed, notified) = tokio::join!(
        biased;
        client.batch_execute("BEGIN"),
        locked,
        client.query(&enqueue, &enqueue_params),
        client.batch_execute("COMMIT"),
        notified,
    );
    began?;
    locked?;
    let rows = rows?;
    committed?;
    // A lost NOTIFY costs only latency (see `wake_and_notify`).
    if let Some(Err(error)) = notified {
        // The log writer redacts the database password from every line, this one included.
        tracing::debug!(%error, "Cannot notify the other relays of new work");
    }
    let inserted: HashSet<&str> = rows
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;

    let mut reports = vec![EnqueueReport::default(); jobs.len()];
    let mut touched = BTreeSet::new();
    for (j, job) in jobs.iter().enumerate() {
        for (k, (new, _)) in job.events.iter().enumerate() {
            let id = new.event.id.as_str();
            let is_new = first.get(id) == Some(&(j, k)) && inserted.contains(id);
            if !is_new {
                reports[j].duplicates += 1;
                continue;
            }
            reports[j].stored += 1;
            reports[j].deliveries += new.sinks.len();
            touched.extend(new.sinks.iter().copied());
        }
    }
    Ok((reports, touched))
}

/// The NOTIFY payload: the sinks' names, then the sending relay's mark (`@` and its id), all
/// comma-separated. A relay that does not know the mark skips it as it skips a sink it does
/// not know.
pub(super) fn work_payload(sinks: &BTreeSet<SinkName>, origin: &str) -> String {
    let mut payload = String::new();
    for sink in sinks {
        payload.push_str(sink.as_str());
        payload.push(',');
    }
    payload.push('@');
    payload.push_str(origin);
    payload
}

/// The sinks a work notification names, or `None` when this relay (`origin`) sent it: the
/// relay woke its own dispatchers right after its commit, and a second wake-up would only make
/// them claim again, most often for nothing. A payload without a mark (a relay of an earlier
/// version) is another relay's.
pub(super) fn foreign_work(payload: &str, origin: &str) -> Option<Vec<SinkName>> {
    let mut sinks = Vec::new();
    for item in payload.split(',') {
        match item.strip_prefix('@') {
            Some(sender) if sender == origin => return None,
            Some(_) => {}
            None => sinks.extend(SinkName::parse(item)),
        }
    }
    Some(sinks)
}

pub(super) const NOTIFY: &str = "SELECT pg_notify($1, $2)";

/// The statements the batcher's connection is prepared with when the store opens.
pub(super) const STATEMENTS: [&str; 3] = [LOCK_LANES, ENQUEUE, NOTIFY];

/// Wakes this relay's dispatchers of `sinks`, then tells the other relays (after the commit,
/// outside any transaction). A lost NOTIFY costs only latency: every relay also claims at its
/// next due time, and at least once per lease.
pub(super) async fn wake_and_notify(
    pool: &Pool,
    target: &Target,
    wakers: &Wakers,
    origin: &str,
    sinks: &BTreeSet<SinkName>,
) {
    if sinks.is_empty() {
        return;
    }
    for sink in sinks {
        wakers.wake(*sink);
    }
    let payload = work_payload(sinks, origin);
    let sent = async {
        let client = pool.get().await?;
        let statement = client.prepare_cached(NOTIFY).await?;
        client
            .execute(&statement, &[&WORK_CHANNEL, &payload])
            .await?;
        Ok::<_, PgError>(())
    };
    if let Err(error) = sent.await {
        tracing::debug!(error = %target.scrub(&error.to_string()), "Cannot notify the other relays of new work");
    }
}
