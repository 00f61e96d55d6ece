//! The PostgreSQL store's settles: a batching task, like the enqueue's, records the outcomes of
//! concurrent attempts in ONE transaction, sent in one round trip on a connection of its own:
//! `BEGIN`, the locks of the lanes whose head is done (sorted: a fixed order across relays),
//! each outcome (only under its claim's lease), the promotion of each such lane's next
//! delivery, `COMMIT`. Each caller is answered after the commit. At thousands of deliveries a
//! second this is a commit per batch instead of one per delivery.

use super::enqueue::wake_and_notify;
use super::write::{LOCK_LANES, PROMOTE, RECORDS, record_sql, record_values};
use super::{PgError, Target, batch, pipeline, queries};
use crate::clock::Millis;
use crate::sink_name::SinkName;
use crate::store::{Settle, StoreError, Wakers};
use deadpool_postgres::Pool;
use futures_util::future::BoxFuture;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;

/// The most outcomes one settle transaction records.
const MAX_BATCH_SETTLES: usize = 256;

/// The statements the batcher's connection is prepared with when the store opens.
pub(super) const STATEMENTS: [&str; 7] = [
    LOCK_LANES, PROMOTE, RECORDS[0], RECORDS[1], RECORDS[2], RECORDS[3], RECORDS[4],
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

/// Records the outcomes in one transaction; each one's outcome, and the sinks of the lanes
/// whose next delivery was let go.
async fn settle_batch(
    pool: &Pool,
    jobs: &[SettleJob],
) -> Result<(Vec<Settled>, BTreeSet<SinkName>), PgError> {
    let client = pool.get().await?;
    // The lanes whose head is done, in order; each locked and promoted once.
    let mut lanes: BTreeMap<(&str, &str), Millis> = BTreeMap::new();
    for job in jobs {
        if let Some(lane) = job.done_lane() {
            let at = lanes.entry((job.sink.as_str(), lane)).or_insert(job.now);
            *at = (*at).max(job.now);
        }
    }
    let (lock, promote) = tokio::try_join!(
        client.prepare_cached(LOCK_LANES),
        client.prepare_cached(PROMOTE)
    )?;
    let mut records = Vec::with_capacity(jobs.len());
    for job in jobs {
        records.push(client.prepare_cached(record_sql(&job.settle)).await?);
    }
    let values: Vec<Vec<Box<dyn ToSql + Sync + Send>>> = jobs
        .iter()
        .map(|job| record_values(job.id, &job.settle, job.now, job.lease_until))
        .collect();
    let values: Vec<Vec<&(dyn ToSql + Sync)>> =
        values.iter().map(|one| queries::parameters(one)).collect();
    let lane_sinks: Vec<&str> = lanes.keys().map(|(sink, _)| *sink).collect();
    let lane_users: Vec<&str> = lanes.keys().map(|(_, lane)| *lane).collect();
    let lane_times: Vec<i64> = lanes.values().copied().collect();
    let lock_values: [&(dyn ToSql + Sync); 3] = [&lane_sinks, &lane_users, &lane_times];
    let promote_values: Vec<[&(dyn ToSql + Sync); 3]> = lanes
        .iter()
        .map(|((sink, lane), now)| [sink as &(dyn ToSql + Sync), lane, now])
        .collect();

    // In this order, all sent before the first answer. Should the outcome of a lane's head be
    // stale, its promotion is still right: it lets a waiting row go only when the lane has no
    // head.
    let transaction = !lanes.is_empty() || jobs.len() > 1;
    let mut steps: Vec<BoxFuture<'_, Result<u64, tokio_postgres::Error>>> = Vec::new();
    if transaction {
        steps.push(Box::pin(async {
            client.batch_execute("BEGIN").await.map(|()| 0)
        }));
        steps.push(Box::pin(client.execute(&lock, &lock_values)));
    }
    for (record, values) in records.iter().zip(&values) {
        steps.push(Box::pin(client.execute(record, values)));
    }
    for values in &promote_values {
        steps.push(Box::pin(client.execute(&promote, values)));
    }
    if transaction {
        steps.push(Box::pin(async {
            client.batch_execute("COMMIT").await.map(|()| 0)
        }));
    }
    let results = pipeline(steps).await;
    let mut counts = Vec::with_capacity(results.len());
    for result in results {
        counts.push(result?);
    }
    let skip = if transaction { 2 } else { 0 };
    let changed = counts.get(skip..skip + jobs.len()).unwrap_or_default();
    let promoted_counts = counts
        .get(skip + jobs.len()..skip + jobs.len() + lanes.len())
        .unwrap_or_default();
    let outcomes = jobs
        .iter()
        .zip(changed)
        .map(|(job, &changed)| match (changed, &job.settle) {
            (0, _) => Settled::Stale,
            (_, Settle::Retry { .. }) => Settled::Retried,
            _ => Settled::Done,
        })
        .collect();
    let promoted = lanes
        .keys()
        .zip(promoted_counts)
        .filter(|(_, count)| **count > 0)
        .filter_map(|((sink, _), _)| SinkName::parse(sink))
        .collect();
    Ok((outcomes, promoted))
}
