//! The dead letters of the embedded store: the listing (filters, the `after` cursor, newest or
//! oldest first) and the replay, in writes of bounded size so that a large replay never holds
//! the writer, and every webhook's answer behind it, for long.

use super::engine::*;
use super::queries::FINISHED_D;
use super::*;
use crate::clock::Millis;
use crate::sink_name::SinkName;
use crate::store::{DeadLetter, DeadLetterFilter, ReplayOutcome, StoreError};
use rusqlite::{Connection, OptionalExtension, params};

/// The most dead letters one write of a replay requeues (see `replay`).
pub(super) const REPLAY_CHUNK: usize = 2000;

impl SqliteStore {
    /// Requeues the matching dead letters, oldest first, in writes of at most `REPLAY_CHUNK`
    /// rows, so that replaying a large dead-letter store never holds the writer (and with it
    /// every webhook's answer) for long. The ids are read first, off the writer; a row that is
    /// no longer dead when its write runs (replayed by another request, or purged) is left
    /// alone, and a row that dies again during the replay is not picked up twice. Rows of a
    /// sink not in `replayable` (not enabled now, or unknown to this build) stay dead and are
    /// counted: no dispatcher would take them.
    pub(crate) async fn replay(
        &self,
        filter: DeadLetterFilter,
        replayable: &[SinkName],
        now: Millis,
    ) -> Result<ReplayOutcome, StoreError> {
        let rows = self
            .read(move |connection| {
                let (condition, values) = dead_letter_condition(&filter);
                let mut select = connection
                    .prepare(&replay_select(&condition))
                    .map_err(database)?;
                select
                    .query_map(rusqlite::params_from_iter(values.iter()), |row| {
                        Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
                    })
                    .map_err(database)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(database)
            })
            .await?;
        let mut outcome = ReplayOutcome::default();
        let mut letters: Vec<(i64, SinkName)> = Vec::with_capacity(rows.len());
        for (id, name) in rows {
            match SinkName::parse(&name) {
                Some(sink) if replayable.contains(&sink) => letters.push((id, sink)),
                _ => *outcome.left_dead.entry(name).or_default() += 1,
            }
        }
        for chunk in letters.chunks(REPLAY_CHUNK) {
            let chunk = chunk.to_vec();
            outcome.replayed += self
                .write(move |connection, touched| replay_chunk(connection, touched, &chunk, now))
                .await?;
        }
        Ok(outcome)
    }

    pub(crate) async fn dead_letters(
        &self,
        filter: DeadLetterFilter,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(move |connection| {
            let (condition, values) = dead_letter_condition(&filter);
            let limit = filter.limit.unwrap_or(100).min(10_000);
            let order = if filter.newest_first {
                "d.updated_at DESC, d.id DESC"
            } else {
                "d.id"
            };
            let mut select = connection
                .prepare(&format!(
                    "SELECT d.id, d.event_id, d.sink, COALESCE(e.kind, ''), d.lane, d.attempts,
                            d.last_status, d.last_error, d.first_attempt_at, d.last_attempt_at,
                            d.updated_at
                     FROM deliveries d LEFT JOIN events e ON e.id = d.event_id
                     WHERE {condition} ORDER BY {order} LIMIT {limit}"
                ))
                .map_err(database)?;
            select
                .query_map(rusqlite::params_from_iter(values.iter()), |row| {
                    Ok(DeadLetter {
                        id: row.get(0)?,
                        event_id: row.get(1)?,
                        sink: row.get(2)?,
                        kind: row.get(3)?,
                        user: row.get(4)?,
                        attempts: row.get(5)?,
                        last_status: row.get(6)?,
                        last_error: row.get(7)?,
                        first_attempt_at: row.get(8)?,
                        last_attempt_at: row.get(9)?,
                        dead_at: row.get(10)?,
                    })
                })
                .map_err(database)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(database)
        })
        .await
    }
}

/// The dead letters a replay takes, oldest first, for a `dead_letter_condition`.
pub(super) fn replay_select(condition: &str) -> String {
    format!("SELECT d.id, d.sink FROM deliveries d WHERE {condition} ORDER BY d.id")
}

/// Requeues the dead letters among `letters` (ascending ids, known sinks). A replayed letter
/// rejoins its lane at its original place (its id): it waits if the lane is busy, and is the
/// next to go otherwise.
pub(super) fn replay_chunk(
    connection: &Connection,
    touched: &mut Touched,
    letters: &[(i64, SinkName)],
    now: Millis,
) -> Result<usize, StoreError> {
    // A lane-less letter has no order to keep and goes at once; a lane's letter waits, and the
    // lane's oldest goes if the lane is free (the queue in memory says which: in the file,
    // every open row is pending).
    let mut requeue = connection
        .prepare_cached(
            "UPDATE deliveries SET attempts = 0, throttled = 0, crashes = 0, state = 'pending',
             replayed_at = ?2, updated_at = ?2, due_at = ?2
             WHERE id = ?1 AND state = 'dead' RETURNING lane",
        )
        .map_err(database)?;
    let mut requeued = 0;
    for (id, sink) in letters {
        let lane: Option<Option<String>> = requeue
            .query_row(params![id, now], |row| row.get(0))
            .optional()
            .map_err(database)?;
        let Some(lane) = lane else { continue };
        touched
            .lanes
            .add(*sink, lane.as_deref(), *id, lane.is_none(), now, None);
        if let Some(lane) = &lane {
            touched.lanes.promote(*sink, lane, now);
        }
        touched.insert(*sink);
        requeued += 1;
    }
    Ok(requeued)
}

pub(super) fn dead_letter_condition(
    filter: &DeadLetterFilter,
) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut condition = format!("{FINISHED_D} AND d.state = 'dead'");
    let mut values = Vec::new();
    if let Some(sink) = filter.sink {
        values.push(Value::Text(sink.as_str().to_owned()));
        condition.push_str(&format!(" AND d.sink = ?{}", values.len()));
    }
    if let Some(user) = &filter.user {
        values.push(Value::Text(user.clone()));
        condition.push_str(&format!(" AND d.lane = ?{}", values.len()));
    }
    if let Some(since) = filter.since {
        values.push(Value::Integer(since));
        condition.push_str(&format!(" AND d.updated_at >= ?{}", values.len()));
    }
    if let Some(after) = filter.after {
        values.push(Value::Integer(after));
        condition.push_str(&format!(" AND d.id > ?{}", values.len()));
    }
    if let Some(ids) = &filter.ids {
        let mut placeholders = Vec::new();
        for id in ids {
            values.push(Value::Integer(*id));
            placeholders.push(format!("?{}", values.len()));
        }
        if placeholders.is_empty() {
            condition.push_str(" AND 0");
        } else {
            condition.push_str(&format!(" AND d.id IN ({})", placeholders.join(", ")));
        }
    }
    (condition, values)
}
