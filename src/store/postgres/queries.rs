//! The PostgreSQL store's reads (dead letters, queue depth, paused users) and the SQL that
//! both reads and writes use. Each reaches its rows through an index (tests check the plans).

use super::{PgError, PostgresStore};
use crate::clock::Millis;
use crate::event::Event;
use crate::sink_name::SinkName;
use crate::store::{DeadLetter, DeadLetterFilter, DeliveryProbe, SinkDepth, StoreError};
use deadpool_postgres::Pool;
use std::collections::HashMap;
use tokio_postgres::types::ToSql;

/// Leases up to `$4` due lane heads of sink `$1` at `$2` until `$3`. Only heads are in
/// `deliveries_due`, so this never reads the rows waiting behind them; rows another relay is
/// claiming right now are skipped, not waited for.
pub(super) const CLAIM: &str = "
    WITH picked AS (
        SELECT id FROM deliveries
        WHERE sink = $1 AND state IN ('pending', 'in_flight') AND due_at <= $2
        ORDER BY due_at, id
        LIMIT $4
        FOR UPDATE SKIP LOCKED)
    UPDATE deliveries d SET state = 'in_flight', due_at = $3, updated_at = $2,
        crashes = d.crashes + CASE WHEN d.state = 'in_flight' THEN 1 ELSE 0 END,
        attempts = d.attempts + CASE WHEN d.state = 'in_flight' THEN 1 ELSE 0 END,
        last_error = CASE WHEN d.state = 'in_flight' THEN $5 ELSE d.last_error END
    FROM picked WHERE d.id = picked.id
    RETURNING d.id, d.event_id, d.attempts, d.throttled, COALESCE(d.replayed_at, d.created_at),
              d.lane, (SELECT payload FROM events e WHERE e.id = d.event_id), d.crashes";

/// When the sink's next head falls due (a retry, or another relay's lease running out).
pub(super) const NEXT_DUE: &str = "
    SELECT due_at FROM deliveries
    WHERE sink = $1 AND state IN ('pending', 'in_flight')
    ORDER BY due_at LIMIT 1";

/// Queue depth per sink and state, each state through its own partial index.
pub(super) const DEPTH: [&str; 3] = [
    "SELECT sink, state, COUNT(*) FROM deliveries WHERE state IN ('pending', 'in_flight')
     GROUP BY sink, state",
    "SELECT sink, 'waiting', COUNT(*) FROM deliveries WHERE state = 'waiting' GROUP BY sink",
    "SELECT sink, 'dead', COUNT(*) FROM deliveries WHERE state = 'dead' GROUP BY sink",
];

/// The WHERE clause (over `deliveries d`) and its parameters for a dead-letter filter.
pub(super) fn dead_letter_condition(
    filter: &DeadLetterFilter,
) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
    let mut condition = String::from("d.state = 'dead'");
    let mut values: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    if let Some(sink) = filter.sink {
        values.push(Box::new(sink.as_str().to_owned()));
        condition.push_str(&format!(" AND d.sink = ${}", values.len()));
    }
    if let Some(user) = &filter.user {
        values.push(Box::new(user.clone()));
        condition.push_str(&format!(" AND d.lane = ${}", values.len()));
    }
    if let Some(since) = filter.since {
        values.push(Box::new(since));
        condition.push_str(&format!(" AND d.updated_at >= ${}", values.len()));
    }
    if let Some(after) = filter.after {
        values.push(Box::new(after));
        condition.push_str(&format!(" AND d.id > ${}", values.len()));
    }
    if let Some(ids) = &filter.ids {
        if ids.is_empty() {
            condition.push_str(" AND false");
        } else {
            values.push(Box::new(ids.clone()));
            condition.push_str(&format!(" AND d.id = ANY(${})", values.len()));
        }
    }
    (condition, values)
}

/// The dead-letter listing for a condition from `dead_letter_condition`.
pub(super) fn listing(condition: &str, newest_first: bool, limit: u32) -> String {
    let order = if newest_first {
        "d.updated_at DESC, d.id DESC"
    } else {
        "d.id"
    };
    format!(
        "SELECT d.id, d.event_id, d.sink, COALESCE(e.kind, ''), d.lane, d.attempts,
                d.last_status, d.last_error, d.first_attempt_at, d.last_attempt_at, d.updated_at
         FROM deliveries d LEFT JOIN events e ON e.id = d.event_id
         WHERE {condition} ORDER BY {order} LIMIT {limit}"
    )
}

/// The parameters as `query` takes them.
pub(super) fn parameters(values: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    values
        .iter()
        .map(|value| value.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

pub(super) async fn dead_letters(
    store: &PostgresStore,
    filter: DeadLetterFilter,
) -> Result<Vec<DeadLetter>, StoreError> {
    let read = async {
        let (condition, values) = dead_letter_condition(&filter);
        let limit = filter.limit.unwrap_or(100).min(10_000);
        let sql = listing(&condition, filter.newest_first, limit);
        let client = store.inner.pool.get().await?;
        let rows = client.query(&sql, &parameters(&values)).await?;
        rows.iter()
            .map(|row| {
                Ok(DeadLetter {
                    id: row.try_get(0)?,
                    event_id: row.try_get(1)?,
                    sink: row.try_get(2)?,
                    kind: row.try_get(3)?,
                    user: row.try_get(4)?,
                    attempts: unsigned(row.try_get::<_, i32>(5)?),
                    last_status: row
                        .try_get::<_, Option<i32>>(6)?
                        .and_then(|status| u16::try_from(status).ok()),
                    last_error: row.try_get(7)?,
                    first_attempt_at: row.try_get(8)?,
                    last_attempt_at: row.try_get(9)?,
                    dead_at: row.try_get(10)?,
                })
            })
            .collect::<Result<Vec<_>, PgError>>()
    };
    read.await.map_err(|error| store.error(error))
}

pub(super) async fn depth(
    store: &PostgresStore,
) -> Result<HashMap<SinkName, SinkDepth>, StoreError> {
    let read = async {
        let client = store.inner.pool.get().await?;
        let mut depth: HashMap<SinkName, SinkDepth> = HashMap::new();
        for sql in DEPTH {
            let statement = client.prepare_cached(sql).await?;
            for row in client.query(&statement, &[]).await? {
                let sink: String = row.try_get(0)?;
                let state: String = row.try_get(1)?;
                let count = u64::try_from(row.try_get::<_, i64>(2)?).unwrap_or(0);
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
        Ok::<_, PgError>(depth)
    };
    read.await.map_err(|error| store.error(error))
}

pub(super) async fn paused_users(pool: &Pool) -> Result<Vec<(String, Millis)>, PgError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT user_id, paused_at FROM paused_users ORDER BY paused_at, user_id",
            &[],
        )
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

/// Every delivery row, oldest first (the probe behind `Store::probe_deliveries`).
pub(super) async fn probe_deliveries(
    store: &PostgresStore,
) -> Result<Vec<DeliveryProbe>, StoreError> {
    let read = async {
        let client = store.inner.pool.get().await?;
        let rows = client
            .query(
                "SELECT id, event_id, sink, lane, state, attempts, throttled, last_status,
                        last_error, replayed_at IS NOT NULL
                 FROM deliveries ORDER BY id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(DeliveryProbe {
                    id: row.try_get(0)?,
                    event_id: row.try_get(1)?,
                    sink: row.try_get(2)?,
                    user: row.try_get(3)?,
                    state: row.try_get(4)?,
                    attempts: unsigned(row.try_get::<_, i32>(5)?),
                    throttled: unsigned(row.try_get::<_, i32>(6)?),
                    last_status: row
                        .try_get::<_, Option<i32>>(7)?
                        .and_then(|status| u16::try_from(status).ok()),
                    last_error: row.try_get(8)?,
                    replayed: row.try_get(9)?,
                })
            })
            .collect::<Result<Vec<_>, PgError>>()
    };
    read.await.map_err(|error| store.error(error))
}

/// Every stored event, in the order of receipt (the probe behind `Store::probe_events`).
pub(super) async fn probe_events(store: &PostgresStore) -> Result<Vec<Event>, StoreError> {
    let read = async {
        let client = store.inner.pool.get().await?;
        let rows = client
            .query("SELECT payload FROM events ORDER BY received_at, id", &[])
            .await?;
        rows.iter()
            .map(|row| row.try_get::<_, String>(0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(PgError::from)
    };
    let payloads = read.await.map_err(|error| store.error(error))?;
    payloads
        .iter()
        .map(|payload| {
            serde_json::from_str(payload).map_err(|error| {
                StoreError::Database(format!("a stored event is unreadable: {error}"))
            })
        })
        .collect()
}

/// A stored count (never negative) as the API's type.
pub(super) fn unsigned(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}
