//! The durable store: the seam between the request path (ingest) and the delivery path
//! (dispatch). Events, one delivery per (event, sink), retry state, dead letters and the paused
//! users live here until delivered or dead. One contract, several backends; the dispatcher and
//! the admin API never know which one runs.
//!
//! # The contract every backend keeps
//!
//! 1. **Enqueue is durable and idempotent.** [`Store::enqueue`] returns only after the events
//!    and their deliveries are committed durably (the caller answers 2xx after it). An event id
//!    already known within the dedupe window is counted as a duplicate and gets no deliveries.
//! 2. **A claim is a lease, and the attempt it starts is recorded.** [`Store::claim`] hands out
//!    due deliveries, each leased until [`Claimed::lease_until`], which identifies the claim.
//!    [`Store::renew`] extends a lease the claim still holds. An outcome ([`Store::settle`])
//!    counts only under its claim's lease: one that comes after the lease ran out and the
//!    delivery was claimed again changes nothing. A lease that runs out (a crashed relay) makes
//!    the delivery due again, and the claim that takes it counts the cut-off attempt as failed
//!    (SQLite, whose leases live in memory, counts a crash's cut-off attempts when it opens the
//!    file, from its claim journal);
//!    the [`CRASH_LIMIT`]-th such claim dead-letters it ([`CRASHED`]) and its lane moves on.
//!    [`Store::release`] gives back a claim whose attempt a shutdown cut off: due at once,
//!    nothing counted.
//! 3. **Lanes keep order.** One user's deliveries to one sink form a lane; only its head (the
//!    oldest open delivery) is ever claimable. The next one goes when the head is delivered,
//!    dead or skipped. A replayed dead letter rejoins its lane at its original place, its
//!    attempts and crash count at zero.
//! 4. **Retry state lives here.** A retry is a due time in the store; a restart loses none.
//! 5. **Dead letters** are listed with filters, replayed (only for sinks enabled now; the
//!    others stay dead and are counted) and purged after their retention, like delivered rows
//!    and events past the dedupe window, in bounded chunks.
//! 6. **Pause state** is durable; [`Store::is_paused`] answers from memory and reflects a pause
//!    given anywhere (any relay on the same database) within a second.
//! 7. **Wake-ups** belong to the store: [`Store::wakers`] fires a sink's [`Notify`] when rows
//!    became due for it (committed here, or by another relay). A lost wake-up costs at most the
//!    dispatcher's idle recheck ([`IDLE_RECHECK`]), never more.
//! 8. [`Store::close`] stops the backend and releases what it holds (SQLite's file lock) before
//!    it returns.
//! 9. **A broken store says so.** [`Store::failure`] is cheap (no IO) and names a failure the
//!    store cannot recover from without a restart (SQLite: a failed fsync, after which nothing
//!    is known about what reached the disk); `/healthz` turns 503 and the relay exits non-zero
//!    on it. A passing outage (a full store, a lost database connection) is not one.
//!
//! Backends: `sqlite` (the embedded default: one relay owns one file, so its claims and
//! leases live in memory and only settles are written), `postgres` (several
//! relays on one database: claims, leases and lane heads in the database, wake-ups and pauses
//! by LISTEN/NOTIFY) and `Discard` (the ingest benchmark's baseline, which stores nothing). The
//! `contract` tests run against both real backends.

#[cfg(test)]
mod contract;
mod postgres;
mod sqlite;

use crate::clock::Millis;
use crate::event::Event;
use crate::sink_name::SinkName;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::Notify;

/// How many times an attempt of one delivery may be cut off by the relay stopping (a crash, a
/// `kill -9`, a power loss: its claim was never settled) before the delivery is taken for what
/// brings the relay down and dead-lettered with `crashed the relay`, so that its lane moves on.
pub const CRASH_LIMIT: u32 = 3;

/// What a dead letter that brought the relay down says.
pub const CRASHED: &str = "crashed the relay";

/// What an attempt that the relay's stopping cut off leaves as its last error.
pub(crate) const CUT_OFF: &str =
    "the attempt was cut off: the relay stopped before its answer was recorded";

/// The event a claimed row hands out, or why the row is dead-lettered instead: it crashed the
/// relay [`CRASH_LIMIT`] times, or (which cannot happen while the purge keeps events with open
/// deliveries and the encoding is ours) its stored event is missing or unreadable. Either way
/// the row must not keep its lane, or the sink's claims, stuck. `kept` is the event when the
/// store still has it parsed (the embedded store's copy from the enqueue); `payload` is read
/// only without it.
pub(crate) fn claimed_event(
    crashes: u32,
    kept: Option<Arc<Event>>,
    payload: Option<&str>,
) -> Result<Arc<Event>, String> {
    if crashes >= CRASH_LIMIT {
        tracing::error!(
            "A delivery's attempts were cut off by the relay stopping {CRASH_LIMIT} times: dead-lettered as `{CRASHED}`, its lane moves on"
        );
        return Err(CRASHED.to_owned());
    }
    if let Some(event) = kept {
        return Ok(event);
    }
    match payload.map(serde_json::from_str::<Event>) {
        Some(Ok(event)) => Ok(Arc::new(event)),
        Some(Err(error)) => Err(format!("the stored event is unreadable: {error}")),
        None => Err("the event is missing from the store".to_owned()),
    }
}

/// The longest a sink's dispatcher sleeps without looking at the store, so that a wake-up that
/// was lost (or sent by a relay this one cannot hear) costs at most this much delay.
pub const IDLE_RECHECK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the store is not running")]
    Unavailable,
    #[error("the store is full")]
    Full,
    #[error("database error: {0}")]
    Database(String),
    #[error("the store file is used by another botrelay process: {0}")]
    Locked(String),
}

/// One event to store, with the sinks that should receive it.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event: Event,
    pub sinks: Vec<SinkName>,
}

/// What an enqueue did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EnqueueReport {
    /// Events stored for the first time.
    pub stored: usize,
    /// Events already known within the dedupe window: acked, not delivered again.
    pub duplicates: usize,
    /// Delivery rows created.
    pub deliveries: usize,
}

/// A delivery handed to a worker, leased until it settles or the lease runs out.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub sink: SinkName,
    /// Shared: the embedded store hands out the event it kept from the enqueue.
    pub event: Arc<Event>,
    /// HTTP attempts made so far (all of them).
    pub attempts: u32,
    /// Attempts answered with `Retry-After`; they do not count against `max_attempts`.
    pub throttled: u32,
    /// Where `ttl` counts from: the delivery's creation (the event's receipt), or its last
    /// replay from the dead letters.
    pub ttl_from: Millis,
    /// When this claim's lease ends. It identifies the claim: an outcome recorded after the
    /// lease ran out and the delivery was claimed again changes nothing (the newer attempt's
    /// outcome counts).
    pub lease_until: Millis,
}

/// A claim, by what identifies it: the delivery and its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimRef {
    pub sink: SinkName,
    pub id: i64,
    pub lease_until: Millis,
}

impl Claimed {
    pub fn claim_ref(&self) -> ClaimRef {
        ClaimRef {
            sink: self.sink,
            id: self.id,
            lease_until: self.lease_until,
        }
    }
}

/// The deliveries a claim got, and when the sink's next one falls due.
#[derive(Debug, Default)]
pub struct ClaimBatch {
    pub deliveries: Vec<Claimed>,
    pub next_due: Option<Millis>,
}

/// How an attempt ended, as the dispatcher decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    Delivered {
        status: u16,
    },
    /// Try again at `due_at`. `counted` is false for `Retry-After` answers.
    Retry {
        due_at: Millis,
        counted: bool,
        status: Option<u16>,
        error: String,
    },
    /// Permanent failure, or past `max_attempts`/`ttl`: a dead letter. `error` is redacted.
    /// `attempted` is false when it died before this claim's request was made (its ttl had run
    /// out, or the encoder found the event invalid): the attempt count and times, and the last
    /// status of an earlier attempt, stay as they were; `error` goes in front of its error.
    Dead {
        status: Option<u16>,
        error: String,
        attempted: bool,
    },
    /// Nothing to send (encoder declined, user paused): done without an attempt.
    Skipped {
        reason: String,
    },
}

/// Which dead letters a replay or a listing is about. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    pub sink: Option<SinkName>,
    pub user: Option<String>,
    /// Dead since this time (last attempt at or after).
    pub since: Option<Millis>,
    pub ids: Option<Vec<i64>>,
    /// Only letters with a larger id: the cursor of the oldest-first listing, which a letter
    /// that was replayed and failed again (dead again, with its id) cannot hold back.
    pub after: Option<i64>,
    pub limit: Option<u32>,
    /// List the most recently failed first (default: oldest first).
    pub newest_first: bool,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayOutcome {
    /// Dead letters requeued.
    pub replayed: usize,
    /// Matching dead letters left dead because their sink was not among the replayable ones
    /// (a sink not enabled now: its requeued rows would only wait), by sink name.
    pub left_dead: BTreeMap<String, usize>,
}

/// A dead letter as the admin API lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub event_id: String,
    pub sink: String,
    pub kind: String,
    pub user: Option<String>,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub first_attempt_at: Option<Millis>,
    pub last_attempt_at: Option<Millis>,
    /// When it became a dead letter.
    pub dead_at: Millis,
}

/// Queue figures of one sink.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SinkDepth {
    /// Deliveries waiting for their turn, due, or scheduled for a retry.
    pub queued: u64,
    pub in_flight: u64,
    pub dead: u64,
}

/// Bounds for [`Store::purge`].
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub delivered: Duration,
    pub dead: Duration,
    pub dedupe_window: Duration,
}

/// What a purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub deliveries: usize,
    pub events: usize,
}

/// One delivery row as the store holds it: what tests assert on (through
/// [`Store::probe_deliveries`]) instead of reading a backend's tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryProbe {
    pub id: i64,
    pub event_id: String,
    pub sink: String,
    pub user: Option<String>,
    /// `waiting`, `pending`, `in_flight`, `delivered`, `dead` or `skipped`.
    pub state: String,
    pub attempts: u32,
    pub throttled: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    /// Replayed from the dead letters at least once.
    pub replayed: bool,
}

/// The paused users as this process sees them: loaded at open, changed by every pause given
/// through this handle (store first, then memory, one change at a time so that a pause and an
/// unpause that cross end in memory as they ended in the store).
#[derive(Debug, Default)]
struct PauseCache {
    users: RwLock<HashSet<String>>,
    changes: tokio::sync::Mutex<()>,
}

impl PauseCache {
    fn contains(&self, user: &str) -> bool {
        self.users
            .read()
            .map(|users| users.contains(user))
            .unwrap_or(false)
    }

    fn set(&self, user: &str, paused: bool) {
        if let Ok(mut users) = self.users.write() {
            if paused {
                users.insert(user.to_owned());
            } else {
                users.remove(user);
            }
        }
    }

    fn replace(&self, paused: impl IntoIterator<Item = String>) {
        if let Ok(mut users) = self.users.write() {
            *users = paused.into_iter().collect();
        }
    }
}

/// Wakes each sink's dispatcher when rows for it were committed.
#[derive(Debug, Default)]
pub struct Wakers {
    by_sink: HashMap<SinkName, Arc<Notify>>,
}

impl Wakers {
    pub fn new() -> Wakers {
        Wakers {
            by_sink: SinkName::ALL
                .into_iter()
                .map(|sink| (sink, Arc::new(Notify::new())))
                .collect(),
        }
    }

    /// The notifier a sink's dispatcher waits on.
    pub fn for_sink(&self, sink: SinkName) -> Arc<Notify> {
        self.by_sink
            .get(&sink)
            .cloned()
            .unwrap_or_else(|| Arc::new(Notify::new()))
    }

    fn wake(&self, sink: SinkName) {
        if let Some(notify) = self.by_sink.get(&sink) {
            notify.notify_one();
        }
    }
}

#[derive(Clone)]
enum Backend {
    Sqlite(sqlite::SqliteStore),
    /// Several relays on one database.
    Postgres(postgres::PostgresStore),
    /// Acknowledges every write without storing it: the baseline of the ingest benchmark.
    Discard,
}

/// The store handle.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    wakers: Arc<Wakers>,
    paused: Arc<PauseCache>,
}

impl Store {
    /// Opens (or creates) the SQLite store at `path` and starts its writer thread.
    ///
    /// Only one relay may use a file at a time (it is locked); leases of a previous process
    /// that crashed are released at once, so its in-flight deliveries are sent again.
    pub fn open_sqlite(path: &Path, max_bytes: Option<u64>) -> Result<Store, StoreError> {
        let wakers = Arc::new(Wakers::new());
        let backend = sqlite::SqliteStore::open(path, max_bytes, wakers.clone())?;
        let paused = Arc::new(PauseCache::default());
        paused.replace(backend.paused_users_now()?);
        Ok(Store {
            backend: Backend::Sqlite(backend),
            wakers,
            paused,
        })
    }

    /// Connects to PostgreSQL at `url` (several relays may share one database), applies the
    /// embedded migrations under an advisory lock, and starts the background tasks (the
    /// enqueue batcher, the LISTEN connection). `lease` is what [`Store::claim_lease`] gives.
    pub async fn open_postgres(
        url: &str,
        pool_size: usize,
        lease: Duration,
    ) -> Result<Store, StoreError> {
        let wakers = Arc::new(Wakers::new());
        let backend = postgres::PostgresStore::open(url, pool_size, lease, wakers.clone()).await?;
        Ok(Store {
            backend: Backend::Postgres(backend),
            wakers,
            paused: Arc::default(),
        })
    }

    /// A store that forgets everything: only for measuring the HTTP path without storage.
    #[doc(hidden)]
    pub fn discarding() -> Store {
        Store {
            backend: Backend::Discard,
            wakers: Arc::new(Wakers::new()),
            paused: Arc::default(),
        }
    }

    pub fn wakers(&self) -> Arc<Wakers> {
        self.wakers.clone()
    }

    /// Stores events and their deliveries durably; returns after the commit.
    /// Idempotent on event id: a known event is counted as a duplicate and gets no deliveries.
    pub async fn enqueue(
        &self,
        events: Vec<NewEvent>,
        now: Millis,
    ) -> Result<EnqueueReport, StoreError> {
        match &self.backend {
            Backend::Sqlite(store) => store.enqueue(events, now).await,
            Backend::Postgres(store) => store.enqueue(events, now).await,
            Backend::Discard => Ok(EnqueueReport {
                stored: events.len(),
                ..EnqueueReport::default()
            }),
        }
    }

    /// Leases up to `limit` due deliveries of `sink` (the head of each user's lane only).
    pub async fn claim(
        &self,
        sink: SinkName,
        limit: usize,
        now: Millis,
        lease: Duration,
    ) -> Result<ClaimBatch, StoreError> {
        match &self.backend {
            Backend::Sqlite(store) => store.claim(sink, limit, now, lease).await,
            Backend::Postgres(store) => store.claim(sink, limit, now, lease).await,
            Backend::Discard => Ok(ClaimBatch::default()),
        }
    }

    /// Records the end of an attempt; a delivery that is done lets the next in its lane go.
    pub async fn settle(
        &self,
        delivery: &Claimed,
        settle: Settle,
        now: Millis,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(store) => store.settle(delivery, settle, now).await,
            Backend::Postgres(store) => store.settle(delivery, settle, now).await,
            Backend::Discard => Ok(()),
        }
    }

    /// Requeues the matching dead letters of the `replayable` sinks; those of any other sink
    /// stay dead and are counted in the outcome.
    pub async fn replay(
        &self,
        filter: DeadLetterFilter,
        replayable: &[SinkName],
        now: Millis,
    ) -> Result<ReplayOutcome, StoreError> {
        match &self.backend {
            Backend::Sqlite(store) => store.replay(filter, replayable, now).await,
            Backend::Postgres(store) => store.replay(filter, replayable, now).await,
            Backend::Discard => Ok(ReplayOutcome::default()),
        }
    }

    pub async fn dead_letters(
        &self,
        filter: DeadLetterFilter,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        match &self.backend {
            Backend::Sqlite(store) => store.dead_letters(filter).await,
            Backend::Postgres(store) => store.dead_letters(filter).await,
            Backend::Discard => Ok(Vec::new()),
        }
    }

    pub async fn depth(&self) -> Result<HashMap<SinkName, SinkDepth>, StoreError> {
        match &self.backend {
            Backend::Sqlite(store) => store.depth().await,
            Backend::Postgres(store) => store.depth().await,
            Backend::Discard => Ok(HashMap::new()),
        }
    }

    /// Removes delivered rows, old dead letters and forgotten events.
    pub async fn purge(&self, retention: Retention, now: Millis) -> Result<Purged, StoreError> {
        match &self.backend {
            Backend::Sqlite(store) => store.purge(retention, now).await,
            Backend::Postgres(store) => store.purge(retention, now).await,
            Backend::Discard => Ok(Purged::default()),
        }
    }

    /// Pauses or unpauses a user durably; [`Store::is_paused`] reflects it when this returns.
    pub async fn set_paused(
        &self,
        user: &str,
        paused: bool,
        now: Millis,
    ) -> Result<(), StoreError> {
        let _one_at_a_time = self.paused.changes.lock().await;
        match &self.backend {
            Backend::Sqlite(store) => store.set_paused(user.to_owned(), paused, now).await?,
            Backend::Postgres(store) => store.set_paused(user.to_owned(), paused, now).await?,
            Backend::Discard => {}
        }
        self.paused.set(user, paused);
        Ok(())
    }

    /// Whether nothing from `user` may reach the bot now. Answered from memory: PostgreSQL
    /// keeps its set fresh by LISTEN/NOTIFY and a reload at least once a second, so a pause
    /// given to any relay holds on every relay within a second.
    pub fn is_paused(&self, user: &str) -> bool {
        match &self.backend {
            Backend::Postgres(store) => store.is_paused(user),
            Backend::Sqlite(_) | Backend::Discard => self.paused.contains(user),
        }
    }

    /// How long a claim is leased. The embedded store frees a dead process's leases when it
    /// opens the file, so it takes `default` (the attempt's timeout plus a margin); PostgreSQL
    /// takes `store.lease`, renewed while an attempt runs, so that another relay takes over a
    /// killed relay's deliveries soon.
    pub fn claim_lease(&self, default: Duration) -> Duration {
        match &self.backend {
            Backend::Postgres(store) => store.lease(),
            Backend::Sqlite(_) | Backend::Discard => default,
        }
    }

    /// Extends `delivery`'s lease to `now + lease` while its claim still holds it; false when
    /// the lease was lost (the outcome will not count).
    pub async fn renew(
        &self,
        delivery: &mut Claimed,
        now: Millis,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let until = now.saturating_add(crate::clock::millis(lease));
        let renewed = match &self.backend {
            Backend::Sqlite(store) => store.renew(delivery, until, now).await?,
            // Updates `lease_until` itself.
            Backend::Postgres(store) => return store.renew(delivery, now, lease).await,
            Backend::Discard => true,
        };
        if renewed {
            delivery.lease_until = until;
        }
        Ok(renewed)
    }

    /// Gives back a claim whose attempt did not run to its end because the relay is shutting
    /// down: due again at `now`, no attempt counted (unlike an attempt a crash cut off).
    pub async fn release(&self, claim: ClaimRef, now: Millis) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(store) => store.release(claim, now).await,
            Backend::Postgres(store) => store.release(claim, now).await,
            Backend::Discard => Ok(()),
        }
    }

    /// Stops the backend and releases what it holds (the embedded store's file lock); returns
    /// once released. Every handle's later calls fail with [`StoreError::Unavailable`].
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(store) => store.close().await,
            Backend::Postgres(store) => store.close().await,
            Backend::Discard => {}
        }
    }

    /// Every delivery, oldest first: a probe for tests and diagnostics, not for the hot path.
    #[doc(hidden)]
    pub async fn probe_deliveries(&self) -> Result<Vec<DeliveryProbe>, StoreError> {
        match &self.backend {
            Backend::Sqlite(store) => store.probe_deliveries().await,
            Backend::Postgres(store) => store.probe_deliveries().await,
            Backend::Discard => Ok(Vec::new()),
        }
    }

    /// Every stored event, in the order of receipt: a probe for tests and diagnostics.
    #[doc(hidden)]
    pub async fn probe_events(&self) -> Result<Vec<Event>, StoreError> {
        match &self.backend {
            Backend::Sqlite(store) => store.probe_events().await,
            Backend::Postgres(store) => store.probe_events().await,
            Backend::Discard => Ok(Vec::new()),
        }
    }

    pub async fn paused_users(&self) -> Result<Vec<(String, Millis)>, StoreError> {
        match &self.backend {
            Backend::Sqlite(store) => store.paused_users().await,
            Backend::Postgres(store) => store.paused_users().await,
            Backend::Discard => Ok(Vec::new()),
        }
    }

    /// A failure the store cannot recover from until the relay restarts, if there was one
    /// (SQLite: a failed fsync of its WAL). Reads no IO: for `/healthz` and the liveness watch.
    /// PostgreSQL recovers from its failures by itself (a new connection): always `None`.
    pub fn failure(&self) -> Option<StoreError> {
        match &self.backend {
            Backend::Sqlite(store) => store.failure(),
            Backend::Postgres(_) | Backend::Discard => None,
        }
    }

    /// True unless [`Store::failure`] names a failure.
    pub fn is_healthy(&self) -> bool {
        self.failure().is_none()
    }

    /// A fault hook for tests: the embedded store's next fsync of its WAL fails as a failing
    /// disk's would (no effect on other backends).
    #[doc(hidden)]
    pub fn fail_next_sync_for_test(&self) {
        if let Backend::Sqlite(store) = &self.backend {
            store.fail_next_sync();
        }
    }

    /// A small durable write: true when the store takes writes now.
    pub async fn is_writable(&self, now: Millis) -> bool {
        match &self.backend {
            Backend::Sqlite(store) => store.probe(now).await.is_ok(),
            Backend::Postgres(store) => store.probe(now).await.is_ok(),
            Backend::Discard => true,
        }
    }
}
