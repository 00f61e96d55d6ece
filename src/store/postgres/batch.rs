//! What the enqueue and settle batchers share: gathering what concurrent callers queued while
//! the previous transaction ran, and writing it in one transaction, or each caller's part
//! alone when the batch failed for a reason of its own (a value the database refuses), so that
//! such a failure stays that caller's.

use super::{PgError, Target, retrying};
use crate::sink_name::SinkName;
use crate::store::StoreError;
use std::collections::BTreeSet;
use std::future::Future;
use tokio::sync::mpsc;

/// The next batch: the first job to arrive, then whatever else is queued already, until the
/// batch weighs `max` (a job weighs `weight(job)`). `None` once the queue is closed.
pub(super) async fn next_batch<J>(
    queue: &mut mpsc::Receiver<J>,
    max: usize,
    weight: impl Fn(&J) -> usize,
) -> Option<Vec<J>> {
    let first = queue.recv().await?;
    let mut total = weight(&first);
    let mut jobs = vec![first];
    while total < max {
        match queue.try_recv() {
            Ok(job) => {
                total += weight(&job);
                jobs.push(job);
            }
            Err(_) => break,
        }
    }
    Some(jobs)
}

/// A batcher's write: its jobs in one transaction.
pub(super) trait BatchWrite {
    type Job;
    type Outcome;
    /// Names the batcher in logs.
    const WHAT: &'static str;
    /// Writes `jobs` in one transaction: one outcome per job, and the sinks given due work.
    fn write<'a>(
        &'a self,
        jobs: &'a [Self::Job],
    ) -> impl Future<Output = Result<(Vec<Self::Outcome>, BTreeSet<SinkName>), PgError>> + Send + 'a;
}

/// Writes `jobs` with `writer` (run again while it meets concurrent transactions). When the
/// batch fails and the connection still stands, writes each job alone. Hands every job its
/// result through `finish`; returns the sinks of the writes that committed.
pub(super) async fn write_all<W: BatchWrite>(
    writer: &W,
    target: &Target,
    jobs: Vec<W::Job>,
    mut finish: impl FnMut(W::Job, Result<W::Outcome, StoreError>),
) -> BTreeSet<SinkName> {
    let batch = jobs.as_slice();
    let together = retrying(move || writer.write(batch)).await;
    match together {
        Ok((outcomes, touched)) => {
            for (job, outcome) in jobs.into_iter().zip(outcomes) {
                finish(job, Ok(outcome));
            }
            touched
        }
        Err(error) if jobs.len() > 1 && !connection_lost(&error) => {
            tracing::debug!(error = %target.scrub(&error.to_string()), "A {} batch failed; writing its jobs one by one", W::WHAT);
            let mut touched = BTreeSet::new();
            for job in jobs {
                let single = std::slice::from_ref(&job);
                let alone = retrying(move || writer.write(single)).await;
                let result = match alone {
                    Ok((mut outcomes, sinks)) => {
                        touched.extend(sinks);
                        outcomes.pop().ok_or(StoreError::Unavailable)
                    }
                    Err(error) => Err(target.error(error)),
                };
                finish(job, result);
            }
            touched
        }
        Err(error) => {
            let error = target.error(error);
            for job in jobs {
                finish(job, Err(error.clone()));
            }
            BTreeSet::new()
        }
    }
}

/// Whether the connection itself is gone (then writing each job alone would fail alike): closed,
/// an error without a SQLSTATE (I/O), or the server ending the session (class 08, connection
/// exception; 57P01-57P05, shut down or terminated), which arrives as an ordinary error.
pub(super) fn connection_lost(error: &PgError) -> bool {
    match error {
        PgError::Postgres(error) => {
            error.is_closed()
                || error.code().is_none_or(|code| {
                    let code = code.code();
                    code.starts_with("08") || code.starts_with("57P")
                })
        }
        PgError::Pool(_) => true,
        PgError::Other(_) => false,
    }
}
