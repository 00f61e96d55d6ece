//! The PostgreSQL store's settles: a batching task, like the enqueue's, records the outcomes of
//! concurrent attempts in ONE transaction, sent in one round trip on a connection of its own:
//! `BEGIN` (its statements reach rows through indexes only), the locks of the lanes whose head
//! is done (sorted: a fixed order across relays), the deliveries in one statement, each other
//! outcome in one of its own (all only under their claim's lease), the promotion of each such
//! lane's next delivery in one statement, `COMMIT`. Each caller is answered after the commit.
//! At thousands of deliveries a second this is a commit and a few statements per batch instead
//! of a commit and two statements per delivery.

use super::enqueue::wake_and_notify;
use super::write::{LOCK_LANES, PROMOTE_MANY, RECORD_DELIVERED_MANY, RECORDS, record};
use super::{PgError, Target, batch, pipeline, queries};
use crate::clock::Millis;
use crate::sink_name::SinkName;
use crate::store::{Settle, StoreError, Wakers};
use deadpool_postgres::Pool;
use futures_util::future::BoxFuture;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;

/// The most outcomes one settle transaction records.
const MAX_BATCH_SETTLES: usize = 256;

/// The statements the batcher's connection is prepared with when the store opens.
pub(super) const STATEMENTS: [&str; 7] = [
    LOCK_LANES,
    RECORD_DELIVERED_MANY,
    PROMOTE_MANY,
    RECORDS[0],
    RECORDS[1],
    RECORDS[2],
    RECORDS[3],
];

/// What a settle changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Settled {
    /// The lease had been lost: nothing recorded.
    Stale,
    /// Retry scheduled.
    Retried,
    /// Done (the next of the lane, if any, was let go).
    Done,
}

/// One outcome to record, waiting for the batcher.
pub(super) struct SettleJob {
    pub(super) id: i64,
    pub(super) sink: SinkName,
    /// The lane, as stored (see `column`).
    pub(super) lane: Option<String>,
    /// The claim's lease end, which the row still carries while the claim holds.
    pub(super) lease_until: Millis,
    pub(super) settle: Settle,
    pub(super) now: Millis,
    pub(super) answer: oneshot::Sender<Result<Settled, StoreError>>,
}

impl SettleJob {
    /// Whether this outcome ends the head of a lane (the lane, if so).
    fn done_lane(&self) -> Option<&str> {
        match self.settle {
            Settle::Retry { .. } => None,
            _ => self.lane.as_deref(),
        }
    }
}

/// What the settle batcher task holds.
pub(super) struct SettleBatcher {
    /// Its own connection (a pool of one, which reconnects).
    pub(super) pool: Pool,
    pub(super) target: Target,
    pub(super) wakers: Arc<Wakers>,
    /// This relay's mark on its notifications (see `enqueue::work_payload`).
    pub(super) origin: Arc<str>,
}

pub(super) async fn settle_loop(batcher: SettleBatcher, mut queue: mpsc::Receiver<SettleJob>) {
    while let Some(jobs) = batch::next_batch(&mut queue, MAX_BATCH_SETTLES, |_| 1).await {
        batcher.run(jobs).await;
    }
}

impl SettleBatcher {
    async fn run(&self, jobs: Vec<SettleJob>) {
        let pool = &self.pool;
        let mut wake = BTreeSet::new();
        let promoted = batch::write_all(self, &self.target, jobs, |job, outcome| {
            if matches!(outcome, Ok(Settled::Retried)) {
                wake.insert(job.sink);
            }
            let _ = job.answer.send(outcome);
        })
        .await;
        // A retry is this relay's to schedule: its own dispatcher only. A promoted delivery is
        // due now: every relay may take it.
        for sink in wake.difference(&promoted) {
            self.wakers.wake(*sink);
        }
        wake_and_notify(pool, &self.target, &self.wakers, &self.origin, &promoted).await;
    }
}

impl batch::BatchWrite for SettleBatcher {
    type Job = SettleJob;
    type Outcome = Settled;
    const WHAT: &'static str = "settle";

    fn write<'a>(
        &'a self,
        jobs: &'a [SettleJob],
    ) -> impl Future<Output = Result<(Vec<Settled>, BTreeSet<SinkName>), PgError>> + Send + 'a {
        settle_batch(&self.pool, jobs)
    }
}

/// How a settle transaction begins: its statements reach rows through indexes only, whatever
/// the statistics say (see `settle_batch`).
pub(super) const BEGIN_BY_INDEX: &str = "BEGIN; SET LOCAL enable_seqscan = off;
    SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off";

/// What one statement of a settle transaction answered.
enum Answer {
    /// Rows changed (an outcome other than delivered), or nothing (`BEGIN`, the lane locks).
    Count(u64),
    /// The rows the statement returned (the deliveries recorded, the promotions).
    Rows(Vec<tokio_postgres::Row>),
}

/// Records the outcomes in one transaction; each one's outcome, and the sinks of the lanes
/// whose next delivery was let go.
///
/// The deliveries (nearly every outcome) are recorded by one statement over arrays, and the
/// lanes' promotions by another: PostgreSQL spent more on running a statement per row than on
/// the rows themselves (one settle and one promotion per delivery, `benches/pipeline.rs` with
/// two relays). The rarer outcomes take a statement each.
async fn settle_batch(
    pool: &Pool,
    jobs: &[SettleJob],
) -> Result<(Vec<Settled>, BTreeSet<SinkName>), PgError> {
    let connection = pool.get().await?;
    let client: &deadpool_postgres::ClientWrapper = &connection;
    // The lanes whose head is done, in order; each locked and promoted once.
    let mut lanes: BTreeMap<(&str, &str), Millis> = BTreeMap::new();
    for job in jobs {
        if let Some(lane) = job.done_lane() {
            let at = lanes.entry((job.sink.as_str(), lane)).or_insert(job.now);
            *at = (*at).max(job.now);
        }
    }
    // The deliveries, with their status; every other outcome with its statement and parameters.
    let mut delivered: Vec<(&SettleJob, u16)> = Vec::with_capacity(jobs.len());
    let mut others = Vec::new();
    for job in jobs {
        if let Settle::Delivered { status } = job.settle {
            delivered.push((job, status));
        } else if let Some((sql, values)) = record(job.id, &job.settle, job.now, job.lease_until) {
            others.push((job, sql, values));
        }
    }
    let (lock, record_many, promote) = tokio::try_join!(
        client.prepare_cached(LOCK_LANES),
        client.prepare_cached(RECORD_DELIVERED_MANY),
        client.prepare_cached(PROMOTE_MANY)
    )?;
    let mut records = Vec::with_capacity(others.len());
    for (_, sql, values) in &others {
        records.push((
            client.prepare_cached(sql).await?,
            queries::parameters(values),
        ));
    }
    let delivered_ids: Vec<i64> = delivered.iter().map(|(job, _)| job.id).collect();
    let delivered_at: Vec<i64> = delivered.iter().map(|(job, _)| job.now).collect();
    let delivered_status: Vec<i32> = delivered
        .iter()
        .map(|(_, status)| i32::from(*status))
        .collect();
    let delivered_held: Vec<i64> = delivered.iter().map(|(job, _)| job.lease_until).collect();
    let record_values: [&(dyn ToSql + Sync); 4] = [
        &delivered_ids,
        &delivered_at,
        &delivered_status,
        &delivered_held,
    ];
    let lane_sinks: Vec<&str> = lanes.keys().map(|(sink, _)| *sink).collect();
    let lane_users: Vec<&str> = lanes.keys().map(|(_, lane)| *lane).collect();
    let lane_times: Vec<i64> = lanes.values().copied().collect();
    let lane_values: [&(dyn ToSql + Sync); 3] = [&lane_sinks, &lane_users, &lane_times];

    // In this order, all sent before the first answer. Should the outcome of a lane's head be
    // stale, its promotion is still right: it lets a waiting row go only when the lane has no
    // head.
    // Every row is reached through an index, whatever the statistics say: a plan cached while
    // `deliveries` was small (a new database, before its first ANALYZE) hashed the whole table
    // for a few rows, and planning each batch afresh cost PostgreSQL more than the promotions
    // themselves (pg_stat_statements). Only this transaction's statements are planned so.
    let mut steps: Vec<BoxFuture<'_, Result<Answer, tokio_postgres::Error>>> = Vec::new();
    steps.push(Box::pin(async {
        client
            .batch_execute(BEGIN_BY_INDEX)
            .await
            .map(|()| Answer::Count(0))
    }));
    steps.push(Box::pin(async {
        client.execute(&lock, &lane_values).await.map(Answer::Count)
    }));
    if !delivered.is_empty() {
        steps.push(Box::pin(async {
            client
                .query(&record_many, &record_values)
                .await
                .map(Answer::Rows)
        }));
    }
    for (statement, values) in &records {
        steps.push(Box::pin(async move {
            client.execute(statement, values).await.map(Answer::Count)
        }));
    }
    if !lanes.is_empty() {
        steps.push(Box::pin(async {
            client.query(&promote, &lane_values).await.map(Answer::Rows)
        }));
    }
    steps.push(Box::pin(async {
        client
            .batch_execute("COMMIT")
            .await
            .map(|()| Answer::Count(0))
    }));
    let mut answers = Vec::with_capacity(steps.len());
    for answer in pipeline(steps).await {
        answers.push(answer?);
    }
    let mut answers = answers.into_iter().skip(2);
    // (id, lease end) of each delivery recorded.
    let recorded: HashSet<(i64, i64)> = if delivered.is_empty() {
        HashSet::new()
    } else {
        match answers.next() {
            Some(Answer::Rows(rows)) => rows
                .iter()
                .map(|row| Ok((row.try_get::<_, i64>(0)?, row.try_get::<_, i64>(1)?)))
                .collect::<Result<_, tokio_postgres::Error>>()?,
            _ => HashSet::new(),
        }
    };
    // Rows changed by each other outcome, in the order of `others`, which is the jobs' order.
    let others_changed: Vec<u64> = others
        .iter()
        .map(|_| match answers.next() {
            Some(Answer::Count(count)) => count,
            _ => 0,
        })
        .collect();
    let promoted: BTreeSet<SinkName> = match answers.next() {
        Some(Answer::Rows(rows)) if !lanes.is_empty() => rows
            .iter()
            .map(|row| row.try_get::<_, &str>(0))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter_map(SinkName::parse)
            .collect(),
        _ => BTreeSet::new(),
    };
    let mut others_changed = others_changed.into_iter();
    let outcomes = jobs
        .iter()
        .map(|job| {
            let changed = match job.settle {
                Settle::Delivered { .. } => recorded.contains(&(job.id, job.lease_until)),
                _ => others_changed.next().is_some_and(|count| count > 0),
            };
            match (changed, &job.settle) {
                (false, _) => Settled::Stale,
                (true, Settle::Retry { .. }) => Settled::Retried,
                (true, _) => Settled::Done,
            }
        })
        .collect();
    Ok((outcomes, promoted))
}
