//! The embedded store's schema (tables and indexes, created when missing) and the migrations
//! that bring a file written by an earlier version up to it.

use super::StoreError;
use super::*;
use rusqlite::{Connection, params};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per event, kept for the dedupe window (and while any delivery needs it).
CREATE TABLE IF NOT EXISTS events (
    id           TEXT PRIMARY KEY,
    source       TEXT NOT NULL,
    kind         TEXT NOT NULL,
    page_id      TEXT,
    user_id      TEXT,
    timestamp_ms INTEGER NOT NULL,
    received_at  INTEGER NOT NULL,
    payload      TEXT NOT NULL     -- the event as JSON; the raw webhook item verbatim inside
);
CREATE INDEX IF NOT EXISTS events_received ON events (received_at);
-- One row per (event, sink). `id` is the order of receipt.
CREATE TABLE IF NOT EXISTS deliveries (
    id               INTEGER PRIMARY KEY,
    event_id         TEXT NOT NULL,
    sink             TEXT NOT NULL,
    lane             TEXT,            -- the user; NULL = no order to keep
    state            TEXT NOT NULL,   -- pending | delivered | dead | skipped (waiting, in_flight: older files only; made pending at open)
    attempts         INTEGER NOT NULL DEFAULT 0,
    throttled        INTEGER NOT NULL DEFAULT 0,
    due_at           INTEGER NOT NULL, -- pending: a retry's next attempt, else when it was queued (no earlier than this; lanes, claims and leases live in memory)
    created_at       INTEGER NOT NULL, -- = the event's received_at, always (the purge needs it)
    updated_at       INTEGER NOT NULL,
    first_attempt_at INTEGER,
    last_attempt_at  INTEGER,
    last_status      INTEGER,
    last_error       TEXT,             -- redacted
    replayed_at      INTEGER,          -- the last replay: the ttl counts from here (NULL: created_at)
    crashes          INTEGER NOT NULL DEFAULT 0 -- attempts cut off by the relay stopping
);
-- The queue itself (due order, lane heads, waiting rows) lives in memory (`lanes`), built at
-- open from the open rows, which this index finds. Its entries go in at the right edge of
-- each (sink, state), so an enqueue or a settle touches a few hot pages, where the three
-- indexes of earlier versions (due order, lane heads, waiting rows) each took a page at
-- random for most writes.
DROP INDEX IF EXISTS deliveries_lane;
DROP INDEX IF EXISTS deliveries_due;
DROP INDEX IF EXISTS deliveries_lane_head;
DROP INDEX IF EXISTS deliveries_lane_waiting;
-- Its condition uses `=` and OR, as `deliveries_done`'s does (below), and queries that use it
-- repeat it exactly.
CREATE INDEX IF NOT EXISTS deliveries_open ON deliveries (sink, state)
    WHERE (state = 'pending' OR state = 'waiting' OR state = 'in_flight');
-- Finished rows, for the purge and the dead letters. The condition is written with `=` and OR:
-- SQLite checks a partial index's condition on every insert and update of the table, and an
-- IN list of three values costs a temporary b-tree each time (`deliveries_finished`, which
-- had one, is dropped).
DROP INDEX IF EXISTS deliveries_finished;
CREATE INDEX IF NOT EXISTS deliveries_done ON deliveries (state, updated_at)
    WHERE (state = 'delivered' OR state = 'dead' OR state = 'skipped');
-- For the purge: the deliveries old enough to refer to an event past the dedupe window. Written
-- in time order, so it costs each group one page at its right edge.
CREATE INDEX IF NOT EXISTS deliveries_created ON deliveries (created_at);
-- No index on deliveries.event_id: it would be a random-order write on every enqueue, and only
-- the once-a-minute purge needs that direction (it uses NOT IN over one scan instead).
CREATE TABLE IF NOT EXISTS paused_users (
    user_id   TEXT PRIMARY KEY,
    paused_at INTEGER NOT NULL
);
";

/// Brings a store written by an earlier version up to `SCHEMA` (which only creates what is
/// missing). Each step checks for itself whether it is needed, so this runs at every start.
pub(super) fn migrate(connection: &Connection) -> Result<(), StoreError> {
    // 0.1 replays reset `created_at` to start the ttl again; that column must stay the event's
    // receipt time (the purge keeps an event while a delivery created before the cut exists).
    // The rows such a replay changed get their receipt time back, and the replay time moves
    // to `replayed_at` (where the ttl now counts from), in the transaction that adds it.
    if !has_column(connection, "deliveries", "replayed_at").map_err(database)? {
        connection
            .execute_batch(
                "BEGIN;
                 ALTER TABLE deliveries ADD COLUMN replayed_at INTEGER;
                 UPDATE deliveries
                    SET replayed_at = created_at,
                        created_at = (SELECT received_at FROM events WHERE id = event_id)
                  WHERE created_at > (SELECT received_at FROM events WHERE id = event_id);
                 COMMIT;",
            )
            .map_err(database)?;
    }
    if !has_column(connection, "deliveries", "crashes").map_err(database)? {
        connection
            .execute_batch("ALTER TABLE deliveries ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;")
            .map_err(database)?;
    }
    Ok(())
}

pub(super) fn has_column(
    connection: &Connection,
    table: &str,
    column: &str,
) -> rusqlite::Result<bool> {
    connection.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
        params![table, column],
        |row| row.get(0),
    )
}
