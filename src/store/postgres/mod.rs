//! The PostgreSQL store: the same contract as the embedded one, for several relays on one
//! database (scale-out and high availability).
//!
//! - `schema.rs`: the embedded migrations, applied at start under `pg_advisory_lock`.
//! - `write.rs`: the enqueue batcher (the events of concurrent requests in ONE transaction) and
//!   every other write: claims (`FOR UPDATE SKIP LOCKED` over lane heads), leases, settles,
//!   replays, purges, pauses.
//! - `queries.rs`: the reads (dead letters, depth, paused users) and the SQL they share.
//! - `listen.rs`: the LISTEN connection: wake-ups for rows another relay committed, and the
//!   paused-user set every relay keeps in memory.
//!
//! What lives where: leases and lane heads live in the database, so any relay may claim any
//! delivery; a lane (sink, user) has at most one head (`pending` or `in_flight`), enforced by a
//! unique partial index, and every change of who heads a lane happens under the lane's row lock
//! in `lanes`, so two relays never promote two heads nor leave waiting rows without one.

mod batch;
mod listen;
mod queries;
mod schema;
mod enqueue;
mod settle;
mod write;
#[cfg(test)]
mod tests;

use super::{
    ClaimBatch, Claimed, DeadLetter, DeadLetterFilter, DeliveryProbe, EnqueueReport, NewEvent,
    Purged, ReplayOutcome, Retention, Settle, SinkDepth, StoreError, Wakers,
};
use crate::clock::Millis;
use crate::event::Event;
use crate::sink_name::SinkName;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a caller waits for a pooled connection, and a new connection for its handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to PostgreSQL. Every message is scrubbed of the password before it
/// becomes a [`StoreError`].
#[derive(Debug, thiserror::Error)]
pub(super) enum PgError {
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{0}")]
    Other(String),
}

impl PgError {
    /// The SQLSTATE of a database error, if it is one.
    fn code(&self) -> Option<&str> {
        match self {
            PgError::Postgres(error) => error.code().map(|code| code.code()),
            PgError::Pool(deadpool_postgres::PoolError::Backend(error)) => {
                error.code().map(|code| code.code())
            }
            _ => None,
        }
    }

    /// A conflict between concurrent transactions (deadlock, serialization failure, or a
    /// unique lane head taken meanwhile): running the transaction again is the answer.
    fn is_transient(&self) -> bool {
        matches!(self.code(), Some("40P01" | "40001" | "23505"))
    }
}

/// Where the store is, for messages: the URL without `user:password@`, and the password to
/// scrub from any error text that might quote it.
#[derive(Debug, Clone)]
pub(super) struct Target {
    described: String,
    password: Option<String>,
}

impl Target {
    fn new(config: &tokio_postgres::Config) -> Target {
        use tokio_postgres::config::Host;
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(index, host)| {
                let name = match host {
                    Host::Tcp(name) => name.clone(),
                    Host::Unix(path) => path.display().to_string(),
                };
                match config.get_ports().get(index).or(config.get_ports().first()) {
                    Some(port) => format!("{name}:{port}"),
                    None => name,
                }
            })
            .collect();
        Target {
            described: format!(
                "postgres://{}/{}",
                hosts.join(","),
                config.get_dbname().unwrap_or_default()
            ),
            password: config
                .get_password()
                .map(|password| String::from_utf8_lossy(password).into_owned())
                .filter(|password| !password.is_empty()),
        }
    }

    /// `message` with the password (should it appear) masked.
    fn scrub(&self, message: &str) -> String {
        match &self.password {
            Some(password) => message.replace(password.as_str(), "***"),
            None => message.to_owned(),
        }
    }

    /// The error as the rest of the relay sees it: full disk and lost connections by kind,
    /// everything else as scrubbed text that names the database.
    fn error(&self, error: PgError) -> StoreError {
        // disk_full, insufficient_resources
        if let Some("53100" | "53000") = error.code() {
            return StoreError::Full;
        }
        let closed = matches!(&error, PgError::Postgres(inner) if inner.is_closed());
        // The causes too: the pool's "error connecting to server" says why only there.
        let mut text = error.to_string();
        let mut cause = std::error::Error::source(&error);
        while let Some(inner) = cause {
            let more = inner.to_string();
            if !text.contains(&more) {
                text = format!("{text}: {more}");
            }
            cause = inner.source();
        }
        let text = self.scrub(&text);
        if closed {
            tracing::warn!(database = %self.described, error = %text, "Lost the database connection");
        }
        StoreError::Database(format!("{}: {text}", self.described))
    }
}

/// TLS to the server, as the URL asks (`sslmode=require`): rustls with the system's roots.
#[derive(Clone)]
pub(super) enum Tls {
    Plain,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Tls {
    fn for_config(config: &mut tokio_postgres::Config) -> Result<Tls, String> {
        use tokio_postgres::config::SslMode;
        if config.get_ssl_mode() != SslMode::Require {
            // `prefer` (tokio-postgres' default) and `disable`: plain, as documented.
            config.ssl_mode(SslMode::Disable);
            return Ok(Tls::Plain);
        }
        let found = rustls_native_certs::load_native_certs();
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(format!(
                "sslmode=require, but no root certificate of this system could be loaded ({} errors)",
                found.errors.len()
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| format!("TLS set-up: {error}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(
            tls,
        )))
    }
}

/// What every handle of one store shares.
struct Inner {
    pool: Pool,
    /// The enqueue batcher's own connection.
    batcher_pool: Pool,
    /// The settle batcher's own connection.
    settle_pool: Pool,
    /// The settle batcher's queue.
    settles: mpsc::Sender<settle::SettleJob>,
    pg_config: tokio_postgres::Config,
    tls: Tls,
    target: Target,
    lease: Duration,
    wakers: Arc<Wakers>,
    paused: Arc<RwLock<HashSet<String>>>,
    /// The enqueue batcher's queue.
    enqueue: mpsc::Sender<enqueue::EnqueueJob>,
    stop: CancellationToken,
    /// This relay's mark on its work notifications, so that its LISTEN connection skips its
    /// own (see `enqueue::work_payload`).
    origin: Arc<str>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Clone)]
pub(in crate::store) struct PostgresStore {
    inner: Arc<Inner>,
}

impl PostgresStore {
    pub(in crate::store) async fn open(
        url: &str,
        pool_size: usize,
        lease: Duration,
        wakers: Arc<Wakers>,
    ) -> Result<PostgresStore, StoreError> {
        let mut pg_config = tokio_postgres::Config::from_str(url).map_err(|_| {
            StoreError::Database(
                "store.url is not a PostgreSQL connection URL (postgres://user@host:port/database)"
                    .into(),
            )
        })?;
        let target = Target::new(&pg_config);
        if pg_config.get_connect_timeout().is_none() {
            pg_config.connect_timeout(CONNECT_TIMEOUT);
        }
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("botrelay");
        }
        let tls = Tls::for_config(&mut pg_config)
            .map_err(|error| StoreError::Database(format!("{}: {error}", target.described)))?;
        let pool = build_pool(&pg_config, &tls, pool_size.max(1))
            .map_err(|error| StoreError::Database(format!("{}: {error}", target.described)))?;
        let batcher_pool = build_pool(&pg_config, &tls, 1)
            .map_err(|error| StoreError::Database(format!("{}: {error}", target.described)))?;
        let settle_pool = build_pool(&pg_config, &tls, 1)
            .map_err(|error| StoreError::Database(format!("{}: {error}", target.described)))?;
        schema::migrate(&pool)
            .await
            .map_err(|error| target.error(error))?;
        // Ready before the first request: the connections the writes use are open and their
        // statements prepared (parsed, the tables' catalog entries loaded in each backend).
        let warmed = tokio::try_join!(
            warm(&batcher_pool, 1, &enqueue::STATEMENTS),
            warm(&settle_pool, 1, &settle::STATEMENTS),
            warm(
                &pool,
                pool_size.clamp(1, WARM_CONNECTIONS),
                &write::CLAIM_STATEMENTS
            ),
        );
        if let Err(error) = warmed {
            // Not fatal: a connection is opened, and a statement prepared, when first used.
            tracing::debug!(error = %target.scrub(&error.to_string()), "Cannot open the store's connections ahead");
        }

        let (enqueue, queue) = mpsc::channel(4096);
        let (settles, settle_queue) = mpsc::channel(4096);
        let stop = CancellationToken::new();
        let paused = Arc::new(RwLock::new(HashSet::new()));
        let inner = Arc::new(Inner {
            pool: pool.clone(),
            batcher_pool,
            settle_pool,
            settles,
            pg_config,
            tls,
            target,
            lease,
            wakers,
            paused,
            enqueue,
            stop,
            origin: format!("{:016x}", rand::random::<u64>()).into(),
            tasks: Mutex::new(Vec::new()),
        });
        let store = PostgresStore { inner };
        // The paused users are known before the first delivery is claimed.
        store.reload_paused().await?;
        let batcher = tokio::spawn(enqueue::batch_loop(store.batcher(), queue));
        let listener = tokio::spawn(listen::listen_loop(store.listener()));
        let settler = tokio::spawn(settle::settle_loop(
            settle::SettleBatcher {
                pool: store.inner.settle_pool.clone(),
                target: store.inner.target.clone(),
                wakers: store.inner.wakers.clone(),
                origin: store.inner.origin.clone(),
            },
            settle_queue,
        ));
        if let Ok(mut tasks) = store.inner.tasks.lock() {
            tasks.push(batcher);
            tasks.push(settler);
            tasks.push(listener);
        }
        Ok(store)
    }

    /// What the batcher needs, without a handle of the store (which would keep its queue open).
    fn batcher(&self) -> enqueue::Batcher {
        enqueue::Batcher {
            pool: self.inner.batcher_pool.clone(),
            target: self.inner.target.clone(),
            wakers: self.inner.wakers.clone(),
            origin: self.inner.origin.clone(),
        }
    }

    fn listener(&self) -> listen::Listener {
        listen::Listener {
            pool: self.inner.pool.clone(),
            pg_config: self.inner.pg_config.clone(),
            tls: self.inner.tls.clone(),
            target: self.inner.target.clone(),
            wakers: self.inner.wakers.clone(),
            paused: self.inner.paused.clone(),
            stop: self.inner.stop.clone(),
            origin: self.inner.origin.clone(),
        }
    }

    pub(in crate::store) fn lease(&self) -> Duration {
        self.inner.lease
    }

    pub(in crate::store) fn is_paused(&self, user: &str) -> bool {
        self.inner
            .paused
            .read()
            .map(|users| users.contains(user))
            .unwrap_or(false)
    }

    fn error(&self, error: PgError) -> StoreError {
        self.inner.target.error(error)
    }

    pub(in crate::store) async fn enqueue(
        &self,
        events: Vec<NewEvent>,
        now: Millis,
    ) -> Result<EnqueueReport, StoreError> {
        if events.is_empty() {
            return Ok(EnqueueReport::default());
        }
        let job = enqueue::EnqueueJob::new(events, now)?;
        let (job, answer) = job;
        self.inner
            .enqueue
            .send(job)
            .await
            .map_err(|_| StoreError::Unavailable)?;
        answer.await.map_err(|_| StoreError::Unavailable)?
    }

    pub(in crate::store) async fn claim(
        &self,
        sink: SinkName,
        limit: usize,
        now: Millis,
        lease: Duration,
    ) -> Result<ClaimBatch, StoreError> {
        write::claim(self, sink, limit, now, lease).await
    }

    pub(in crate::store) async fn settle(
        &self,
        delivery: &Claimed,
        settle: Settle,
        now: Millis,
    ) -> Result<(), StoreError> {
        let row = write::SettleRow {
            id: delivery.id,
            sink: delivery.sink,
            lane: delivery.event.user_id.clone(),
            lease_until: delivery.lease_until,
        };
        write::settle_row(self, row, settle, now).await
    }

    pub(in crate::store) async fn release(
        &self,
        claim: crate::store::ClaimRef,
        now: Millis,
    ) -> Result<(), StoreError> {
        write::release(self, claim, now).await
    }

    pub(in crate::store) async fn renew(
        &self,
        delivery: &mut Claimed,
        now: Millis,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        write::renew(self, delivery, now, lease).await
    }

    pub(in crate::store) async fn replay(
        &self,
        filter: DeadLetterFilter,
        replayable: &[SinkName],
        now: Millis,
    ) -> Result<ReplayOutcome, StoreError> {
        write::replay(self, filter, replayable, now).await
    }

    pub(in crate::store) async fn dead_letters(
        &self,
        filter: DeadLetterFilter,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        queries::dead_letters(self, filter).await
    }

    pub(in crate::store) async fn probe_deliveries(
        &self,
    ) -> Result<Vec<DeliveryProbe>, StoreError> {
        queries::probe_deliveries(self).await
    }

    pub(in crate::store) async fn probe_events(&self) -> Result<Vec<Event>, StoreError> {
        queries::probe_events(self).await
    }

    pub(in crate::store) async fn depth(&self) -> Result<HashMap<SinkName, SinkDepth>, StoreError> {
        queries::depth(self).await
    }

    pub(in crate::store) async fn purge(
        &self,
        retention: Retention,
        now: Millis,
    ) -> Result<Purged, StoreError> {
        write::purge(self, retention, now).await
    }

    pub(in crate::store) async fn set_paused(
        &self,
        user: String,
        paused: bool,
        now: Millis,
    ) -> Result<(), StoreError> {
        write::set_paused(self, &user, paused, now).await?;
        if let Ok(mut users) = self.inner.paused.write() {
            if paused {
                users.insert(user);
            } else {
                users.remove(&user);
            }
        }
        Ok(())
    }

    pub(in crate::store) async fn paused_users(&self) -> Result<Vec<(String, Millis)>, StoreError> {
        queries::paused_users(&self.inner.pool)
            .await
            .map_err(|error| self.error(error))
    }

    /// Reads the paused users into memory.
    async fn reload_paused(&self) -> Result<(), StoreError> {
        listen::reload_paused(&self.inner.pool, &self.inner.paused)
            .await
            .map_err(|error| self.error(error))
    }

    pub(in crate::store) async fn probe(&self, now: Millis) -> Result<(), StoreError> {
        write::probe(self, now).await
    }

    /// Stops the background tasks and closes the pool. Calls after this fail with
    /// `Unavailable` (the pool is closed).
    pub(in crate::store) async fn close(&self) {
        self.inner.stop.cancel();
        let tasks = match self.inner.tasks.lock() {
            Ok(mut tasks) => std::mem::take(&mut *tasks),
            Err(_) => Vec::new(),
        };
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        self.inner.pool.close();
        self.inner.batcher_pool.close();
        self.inner.settle_pool.close();
    }
}

/// Polls the futures (each a statement on one connection) in the order given until all are
/// done: the first poll sends them all, in order, so that they reach the server in one
/// round trip, in that order (pipelining). Their results, in the same order.
async fn pipeline<T>(steps: Vec<futures_util::future::BoxFuture<'_, T>>) -> Vec<T> {
    use futures_util::future::{MaybeDone, maybe_done};
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;
    let mut steps: Vec<Pin<Box<MaybeDone<_>>>> = steps
        .into_iter()
        .map(|step| Box::pin(maybe_done(step)))
        .collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for step in &mut steps {
            done &= step.as_mut().poll(cx).is_ready();
        }
        if done { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    steps
        .iter_mut()
        .filter_map(|step| step.as_mut().take_output())
        .collect()
}

/// How many of the pool's connections are opened at start: under load the dispatchers' claims
/// and the LISTEN connection's reads keep a few of them busy.
const WARM_CONNECTIONS: usize = 4;

/// Opens `connections` connections of `pool` and prepares `statements` on each (pipelined),
/// so that the first writes after a start pay neither a connection's set-up nor a statement's
/// parsing. Measured on a fresh relay without this: its first enqueue batch took 15-22 ms, and
/// the acks queued behind it up to 38 ms.
async fn warm(pool: &Pool, connections: usize, statements: &[&str]) -> Result<(), PgError> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(pool.get().await?);
    }
    for client in &clients {
        futures_util::future::try_join_all(statements.iter().map(|sql| client.prepare_cached(sql)))
            .await?;
    }
    Ok(())
}

/// A pool of at most `size` connections to the server.
fn build_pool(
    pg_config: &tokio_postgres::Config,
    tls: &Tls,
    size: usize,
) -> Result<Pool, deadpool_postgres::BuildError> {
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match tls {
        Tls::Plain => {
            Manager::from_config(pg_config.clone(), tokio_postgres::NoTls, manager_config)
        }
        Tls::Rustls(make) => Manager::from_config(pg_config.clone(), make.clone(), manager_config),
    };
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
}

/// Runs `op` (one transaction) again when it failed only because it met a concurrent one
/// (a deadlock, a serialization failure, a lane head taken meanwhile), a few times.
async fn retrying<T, F, Fut>(mut op: F) -> Result<T, PgError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, PgError>>,
{
    let mut tries = 0u32;
    loop {
        match op().await {
            Err(error) if error.is_transient() && tries < 8 => {
                tries += 1;
                tracing::debug!(%error, tries, "A store transaction met a concurrent one; running it again");
                tokio::time::sleep(Duration::from_millis(
                    u64::from(tries) * 5 + rand::random::<u64>() % 10,
                ))
                .await;
            }
            result => return result,
        }
    }
}

/// A text column's value: PostgreSQL's text cannot hold NUL, which JSON can carry (`\u0000`);
/// the payload keeps the exact value, the columns a replacement character.
fn column(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{fffd}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}
