//! The PostgreSQL schema as embedded, numbered migrations, applied at start under a session
//! advisory lock, so that several relays starting at once on an empty database all come up
//! (one migrates, the others wait, then find nothing to do).

use super::PgError;
use deadpool_postgres::Pool;

/// The advisory lock key every relay takes while it migrates ("botrelay" in ASCII).
const MIGRATION_LOCK: i64 = 0x626f_7472_656c_6179;

/// The migrations, in order; each runs once, in its own transaction. Never edit one that has
/// shipped: add the next.
pub(super) const MIGRATIONS: &[(i32, &str)] = &[(1, V1), (2, V2)];

/// Times are milliseconds since the epoch, from the relays' clocks (as in the embedded store).
const V1: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per event, kept for the dedupe window (and while any delivery needs it).
CREATE TABLE events (
    id           TEXT PRIMARY KEY,
    source       TEXT NOT NULL,
    kind         TEXT NOT NULL,
    page_id      TEXT,
    user_id      TEXT,
    timestamp_ms BIGINT NOT NULL,
    received_at  BIGINT NOT NULL,
    payload      TEXT NOT NULL     -- the event as JSON; the raw webhook item verbatim inside
);
CREATE INDEX events_received ON events (received_at);
-- One row per (event, sink). `id` is the order of receipt.
CREATE TABLE deliveries (
    id               BIGSERIAL PRIMARY KEY,
    event_id         TEXT NOT NULL,
    sink             TEXT NOT NULL,
    lane             TEXT,             -- the user; NULL = no order to keep
    state            TEXT NOT NULL,    -- waiting | pending | in_flight | delivered | dead | skipped
    attempts         INTEGER NOT NULL DEFAULT 0,
    throttled        INTEGER NOT NULL DEFAULT 0,
    due_at           BIGINT NOT NULL,  -- pending: next attempt; in_flight: end of the lease
    created_at       BIGINT NOT NULL,  -- = the event's received_at, always (the purge needs it)
    updated_at       BIGINT NOT NULL,
    first_attempt_at BIGINT,
    last_attempt_at  BIGINT,
    last_status      INTEGER,
    last_error       TEXT,             -- redacted
    replayed_at      BIGINT            -- the last replay: the ttl counts from here
);
-- Claims: the lane heads only (pending or in flight), by due time.
CREATE INDEX deliveries_due ON deliveries (sink, due_at, id)
    WHERE state IN ('pending', 'in_flight');
-- At most one head per lane, whichever relay wrote it.
CREATE UNIQUE INDEX deliveries_lane_head ON deliveries (sink, lane)
    WHERE state IN ('pending', 'in_flight');
CREATE INDEX deliveries_lane_waiting ON deliveries (sink, lane, id)
    WHERE state = 'waiting';
CREATE INDEX deliveries_finished ON deliveries (state, updated_at)
    WHERE state IN ('delivered', 'dead', 'skipped');
CREATE INDEX deliveries_dead ON deliveries (sink, id) WHERE state = 'dead';
-- For the purge: does a delivery still refer to an old event? (created_at = its received_at)
CREATE INDEX deliveries_created ON deliveries (created_at, event_id);
-- One row per (sink, user) lane: its row lock serializes, across relays, every change of who
-- heads the lane (enqueue, promotion after a settle, replay).
CREATE TABLE lanes (
    sink       TEXT NOT NULL,
    lane       TEXT NOT NULL,
    touched_at BIGINT NOT NULL,
    PRIMARY KEY (sink, lane)
);
CREATE TABLE paused_users (
    user_id   TEXT PRIMARY KEY,
    paused_at BIGINT NOT NULL
);
";

/// Attempts cut off by a relay stopping (its claim ran out unsettled), counted by the claim
/// that takes the delivery next.
const V2: &str = "ALTER TABLE deliveries ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;";

/// Applies the migrations this database lacks, under the advisory lock.
pub(super) async fn migrate(pool: &Pool) -> Result<(), PgError> {
    let mut client = pool.get().await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = apply(&mut client).await;
    // The lock is the session's: release it whatever happened (the connection goes back to
    // the pool).
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result?;
    unlocked?;
    Ok(())
}

async fn apply(client: &mut deadpool_postgres::Object) -> Result<(), PgError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS botrelay_migrations (
                 version    INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await?;
    let applied: i32 = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM botrelay_migrations",
            &[],
        )
        .await?
        .try_get(0)?;
    if let Some(&(newest, _)) = MIGRATIONS.last()
        && applied > newest
    {
        return Err(PgError::Other(format!(
            "the database's schema (version {applied}) is newer than this relay's ({newest}); upgrade the relay"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(version, _)| *version > applied) {
        let transaction = client.transaction().await?;
        transaction.batch_execute(sql).await?;
        transaction
            .execute(
                "INSERT INTO botrelay_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
        transaction.commit().await?;
        tracing::info!(version, "Applied a store schema migration");
    }
    Ok(())
}
