//! The LISTEN connection of the PostgreSQL store: wakes this relay's dispatchers when another
//! relay committed new due rows (`botrelay_work`, payload = sink names), and keeps the
//! in-memory set of paused users fresh (`botrelay_pause`, plus a reload at least once a second,
//! so a pause given to any relay holds on every relay within a second). It reconnects when the
//! connection fails.

use super::enqueue::foreign_work;
use super::write::{PAUSE_CHANNEL, WORK_CHANNEL};
use super::{PgError, Target, Tls, queries};
use crate::sink_name::SinkName;
use crate::store::Wakers;
use deadpool_postgres::Pool;
use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Notification};
use tokio_util::sync::CancellationToken;

/// How often the paused users are read again, notifications or not.
const RELOAD_PAUSED_EVERY: Duration = Duration::from_millis(500);

/// How long to wait before connecting again after the connection failed.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

pub(super) struct Listener {
    pub(super) pool: Pool,
    pub(super) pg_config: tokio_postgres::Config,
    pub(super) tls: Tls,
    pub(super) target: Target,
    pub(super) wakers: Arc<Wakers>,
    pub(super) paused: Arc<RwLock<HashSet<String>>>,
    pub(super) stop: CancellationToken,
    /// This relay's mark on its notifications (see `enqueue::work_payload`).
    pub(super) origin: Arc<str>,
}

pub(super) async fn listen_loop(listener: Listener) {
    let mut failures = 0u32;
    loop {
        let session = listener.session();
        let error = tokio::select! {
            () = listener.stop.cancelled() => return,
            ended = session => ended,
        };
        failures += 1;
        // The first failure is worth a warning; a database that stays away is logged by the
        // writes that fail, not by this loop every second.
        if failures == 1 {
            tracing::warn!(error = %listener.target.scrub(&error.to_string()), "The store's LISTEN connection failed; reconnecting");
        }
        tokio::select! {
            () = listener.stop.cancelled() => return,
            () = tokio::time::sleep(RECONNECT_AFTER) => {}
        }
    }
}

impl Listener {
    /// One connection's life: LISTEN, then wake and reload until it fails.
    async fn session(&self) -> PgError {
        let (client, mut notifications, driver) = match self.connect().await {
            Ok(connected) => connected,
            Err(error) => return error,
        };
        let listened = client
            .batch_execute(&format!("LISTEN {WORK_CHANNEL}; LISTEN {PAUSE_CHANNEL};"))
            .await;
        if let Err(error) = listened {
            driver.abort();
            return error.into();
        }
        // Whatever was notified while this relay was not listening: look now.
        for sink in SinkName::ALL {
            self.wakers.wake(sink);
        }
        let mut reload = tokio::time::interval(RELOAD_PAUSED_EVERY);
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended = loop {
            tokio::select! {
                notification = notifications.recv() => match notification {
                    Some(notification) => self.handle(&notification).await,
                    None => break PgError::Other("the LISTEN connection closed".into()),
                },
                _ = reload.tick() => {
                    if let Err(error) = reload_paused(&self.pool, &self.paused).await {
                        tracing::debug!(error = %self.target.scrub(&error.to_string()), "Cannot read the paused users");
                    }
                }
            }
        };
        driver.abort();
        ended
    }

    async fn handle(&self, notification: &Notification) {
        if notification.channel() == WORK_CHANNEL {
            // This relay's own commits woke its dispatchers already.
            let sinks = foreign_work(notification.payload(), &self.origin);
            for sink in sinks.into_iter().flatten() {
                self.wakers.wake(sink);
            }
        } else if notification.channel() == PAUSE_CHANNEL
            && let Err(error) = reload_paused(&self.pool, &self.paused).await
        {
            tracing::debug!(error = %self.target.scrub(&error.to_string()), "Cannot read the paused users");
        }
    }

    /// A dedicated connection (not from the pool: LISTEN belongs to a session) whose
    /// notifications arrive on the channel; the task driving it ends when it fails.
    async fn connect(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            mpsc::UnboundedReceiver<Notification>,
            tokio::task::JoinHandle<()>,
        ),
        PgError,
    > {
        match &self.tls {
            Tls::Plain => {
                let (client, connection) = self.pg_config.connect(tokio_postgres::NoTls).await?;
                let (receiver, driver) = drive(connection);
                Ok((client, receiver, driver))
            }
            Tls::Rustls(make) => {
                let (client, connection) = self.pg_config.connect(make.clone()).await?;
                let (receiver, driver) = drive(connection);
                Ok((client, receiver, driver))
            }
        }
    }
}

/// Drives `connection`, forwarding its notifications.
fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
) -> (
    mpsc::UnboundedReceiver<Notification>,
    tokio::task::JoinHandle<()>,
)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, receiver) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(notification))) => {
                    if sender.send(notification).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    });
    (receiver, driver)
}

/// Reads the paused users into `paused`.
pub(super) async fn reload_paused(
    pool: &Pool,
    paused: &RwLock<HashSet<String>>,
) -> Result<(), PgError> {
    let users: HashSet<String> = queries::paused_users(pool)
        .await?
        .into_iter()
        .map(|(user, _)| user)
        .collect();
    if let Ok(mut current) = paused.write() {
        *current = users;
    }
    Ok(())
}
